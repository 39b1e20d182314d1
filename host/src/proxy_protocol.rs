//! HAProxy's PROXY protocol, versions 1 (text) and 2 (binary)
//! (<https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt>): the
//! header a proxy puts before a connection's first byte to name the
//! original client. Parsing and encoding are the `ppp` crate's; this module
//! reads a header off a connection ([`read_header`], `accept_proxy_protocol`
//! on a listener) and makes one for a backend connection ([`encode`],
//! `send_proxy_protocol` on an upstream).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ProxyProtocolVersion;

/// Most bytes read looking for a complete header: a v1 header is at most
/// 107 bytes; a v2 header is 16 bytes, the addresses (at most 216) and
/// TLVs, which senders keep small (AWS's VPC endpoint ID, a few dozen).
pub const MAX_HEADER_BYTES: usize = 4096;

/// A connection's addresses as a PROXY header gave them: `source` the
/// client, `destination` the address it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The original client.
    pub source: SocketAddr,
    /// The address the client connected to (the first proxy's listener).
    pub destination: SocketAddr,
}

/// Read a PROXY protocol header (v1 or v2, told apart by its signature)
/// from `io` within `timeout`, reading no further than the header's end
/// unless the client sent more at once. Returns the addresses (`None` for
/// a v2 `LOCAL` command, a v1 `UNKNOWN` or a v2 family other than TCP over
/// IPv4/IPv6: the connection's own addresses then apply, as the spec asks)
/// and the bytes read past the header, which belong to the connection.
///
/// # Errors
/// `TimedOut` (no complete header within `timeout`), `UnexpectedEof`, or
/// `InvalidData` naming what is wrong: not a PROXY header, or longer than
/// [`MAX_HEADER_BYTES`].
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> io::Result<(Option<Addresses>, Bytes)> {
    let read = async {
        let mut seen: Vec<u8> = Vec::with_capacity(256);
        let mut buf = [0u8; 512];
        loop {
            let n = io.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed before a complete PROXY protocol header",
                ));
            }
            seen.extend_from_slice(&buf[..n]);
            let header = HeaderResult::parse(&seen);
            if header.is_incomplete() {
                if seen.len() > MAX_HEADER_BYTES {
                    return Err(invalid(format!(
                        "no complete PROXY protocol header in {MAX_HEADER_BYTES} bytes"
                    )));
                }
                continue;
            }
            let (length, addresses) = match header {
                HeaderResult::V1(Ok(h)) => (h.header.len(), v1_addresses(h.addresses)),
                HeaderResult::V2(Ok(h)) => (h.len(), v2_addresses(&h)),
                HeaderResult::V1(Err(e)) => {
                    return Err(invalid(format!("not a PROXY protocol header: {e}")));
                }
                HeaderResult::V2(Err(e)) => {
                    return Err(invalid(format!("invalid PROXY protocol v2 header: {e}")));
                }
            };
            let rest = Bytes::copy_from_slice(seen.get(length..).unwrap_or_default());
            return Ok((addresses, rest));
        }
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no PROXY protocol header within header_read_timeout_ms = {}",
                timeout.as_millis()
            ),
        )
    })?
}

/// [`read_header`], answered as the connection's (client, destination):
/// the header's, or `own` (the socket's) for a `LOCAL`/`UNKNOWN` header;
/// with the bytes read past the header.
///
/// # Errors
/// As [`read_header`].
pub async fn read_addresses<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
    own: (SocketAddr, SocketAddr),
) -> io::Result<((SocketAddr, SocketAddr), Bytes)> {
    let (addresses, rest) = read_header(io, timeout).await?;
    Ok((addresses.map_or(own, |a| (a.source, a.destination)), rest))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn v1_addresses(addresses: ppp::v1::Addresses) -> Option<Addresses> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        ppp::v1::Addresses::Tcp6(a) => Some(Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_addresses(header: &ppp::v2::Header<'_>) -> Option<Addresses> {
    if header.command == ppp::v2::Command::Local {
        return None;
    }
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        ppp::v2::Addresses::IPv6(a) => Some(Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    }
}

/// The header in `version` naming `addresses`, or, with `None` (a health
/// check: no client), the v2 `LOCAL` command or v1 `PROXY UNKNOWN`, which a
/// receiver answers with the connection's own addresses. When the source
/// and destination families differ, the IPv4 one is written IPv4-mapped
/// (the spec has one family per header).
pub fn encode(version: ProxyProtocolVersion, addresses: Option<Addresses>) -> Vec<u8> {
    let pair = addresses.map(|a| same_family(a.source, a.destination));
    match version {
        ProxyProtocolVersion::V1 => {
            let addresses = pair.map_or(ppp::v1::Addresses::Unknown, Into::into);
            addresses.to_string().into_bytes()
        }
        ProxyProtocolVersion::V2 => {
            use ppp::v2::{Builder, Command, Protocol, Version};
            let builder = match pair {
                Some(pair) => {
                    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, pair)
                }
                None => Builder::with_addresses(
                    Version::Two | Command::Local,
                    Protocol::Unspecified,
                    ppp::v2::Addresses::Unspecified,
                ),
            };
            // Writing into a Vec cannot fail; the fallback is unreachable.
            builder.build().unwrap_or_default()
        }
    }
}

/// `source` and `destination` in one address family: an IPv4 one is mapped
/// into IPv6 when the other is IPv6.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(source: &str, destination: &str) -> Addresses {
        Addresses {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    async fn read(bytes: &[u8]) -> io::Result<(Option<Addresses>, Bytes)> {
        let mut io = bytes;
        read_header(&mut io, Duration::from_secs(1)).await
    }

    #[tokio::test]
    async fn both_versions_round_trip_and_keep_the_bytes_after_the_header() {
        for version in [ProxyProtocolVersion::V1, ProxyProtocolVersion::V2] {
            for a in [
                addresses("192.0.2.7:51000", "10.0.0.1:443"),
                addresses("[2001:db8::7]:51000", "[2001:db8::1]:443"),
            ] {
                let mut wire = encode(version, Some(a));
                wire.extend_from_slice(b"GET / HTTP/1.1\r\n");
                let (got, rest) = read(&wire).await.unwrap();
                assert_eq!(got, Some(a), "{version:?}");
                assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n");
            }
            // No client (a health check): LOCAL / UNKNOWN.
            let (got, rest) = read(&encode(version, None)).await.unwrap();
            assert_eq!(got, None);
            assert!(rest.is_empty());
        }
        assert_eq!(
            encode(
                ProxyProtocolVersion::V1,
                Some(addresses("192.0.2.7:5", "10.0.0.1:80"))
            ),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 5 80\r\n"
        );
    }

    #[tokio::test]
    async fn mixed_families_are_written_ipv4_mapped() {
        let a = addresses("192.0.2.7:5", "[2001:db8::1]:80");
        let (got, _) = read(&encode(ProxyProtocolVersion::V1, Some(a)))
            .await
            .unwrap();
        let got = got.unwrap();
        assert_eq!(got.source.port(), 5);
        assert_eq!(
            got.source.ip(),
            IpAddr::V6(
                "192.0.2.7"
                    .parse::<std::net::Ipv4Addr>()
                    .unwrap()
                    .to_ipv6_mapped()
            )
        );
    }

    #[tokio::test]
    async fn a_header_split_across_reads_is_reassembled() {
        let wire = encode(
            ProxyProtocolVersion::V2,
            Some(addresses("192.0.2.7:5", "10.0.0.1:80")),
        );
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for byte in wire {
                client.write_all(&[byte]).await.unwrap();
                client.flush().await.unwrap();
            }
            client
        });
        let (got, _) = read_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.unwrap().source, "192.0.2.7:5".parse().unwrap());
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY TCP4 999.0.0.1 10.0.0.1 5 80\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 99999 80\r\n",
            b"PROXY TCP9 1.2.3.4 10.0.0.1 5 80\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 5 80\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            // v2 signature, version 1 (invalid).
            b"\r\n\r\n\0\r\nQUIT\n\x11\x11\x00\x0c\x01\x02\x03\x04\x05\x06\x07\x08\x00\x01\x00\x02",
        ];
        for case in cases {
            let e = read(case).await.unwrap_err();
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ),
                "{:?}: {e}",
                String::from_utf8_lossy(case)
            );
        }
        // A v1 line that never ends is cut at the cap.
        let endless = vec![b'P'; 1]
            .into_iter()
            .chain(*b"ROXY TCP4 ")
            .chain(std::iter::repeat_n(b'1', 10_000))
            .collect::<Vec<_>>();
        assert!(read(&endless).await.is_err());
        // A v2 header announcing 60 KB of TLVs is refused at the cap.
        let mut huge = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xea\x60".to_vec();
        huge.extend(std::iter::repeat_n(0u8, 8_000));
        assert_eq!(
            read(&huge).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let (_client, mut server) = tokio::io::duplex(64);
        let e = read_header(&mut server, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
