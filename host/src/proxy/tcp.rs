//! TCP mode (L4): a listener with `mode = "tcp"` balances whole connections,
//! as HAProxy `mode tcp` and NGINX `stream` do. The upstream's plugin is
//! asked once per connection (its request reads as a connection: the client
//! address, `scheme` = `tcp`, and with `tls_passthrough` the SNI name of the
//! client's ClientHello; method, path and headers absent); the backend is
//! connected to within `connect_timeout_ms`, a failed connect is retried on
//! another backend (nothing was sent yet) and counts for `max_fails` and
//! outlier ejection; then bytes are relayed both ways
//! ([`crate::tunnel::relay`]) until both sides close or nothing moves for
//! `tunnel_idle_timeout_ms`. The connection counts as in flight to its
//! backend for its whole life.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::{ListenerKey, Proxy, UpstreamPool};
use crate::plugin::RequestView;
use crate::tunnel::{Prefixed, RelayCounters, relay};
use crate::upstream::{InFlight, Selection};

/// Most bytes read looking for a complete ClientHello (a few records; a
/// post-quantum key share makes one about 1.8 KB).
const MAX_CLIENT_HELLO_BYTES: usize = 64 * 1024;

impl Proxy {
    /// Serve TCP-mode connection `client` from `peer` to `local` on
    /// `listener` (see the module docs). With `accept_proxy_protocol`, its
    /// PROXY header is read first and names the client; with `passthrough`,
    /// the ClientHello is read next. Both are read under the head-read
    /// timeout (`header_read_timeout_ms`), and a connection that does not
    /// open with them is closed. Never fails: how it ended is logged at
    /// debug level.
    pub async fn serve_tcp<C>(
        self: Arc<Self>,
        listener: ListenerKey,
        (mut peer, mut local): (SocketAddr, SocketAddr),
        mut client: C,
        passthrough: bool,
    ) where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let mut early = Bytes::new();
        if self.accepts_proxy_protocol(&listener) {
            let timeout = self.downstream_timeouts.0;
            match crate::proxy_protocol::read_addresses(&mut client, timeout, (peer, local)).await {
                Ok((addresses, rest)) => {
                    (peer, local) = addresses;
                    early = rest;
                }
                Err(e) => {
                    tracing::debug!(%peer, "TCP listener: no PROXY protocol header: {e}");
                    return;
                }
            }
        }
        let mut client = Prefixed::new(early, client);
        let (hello, sni) = if passthrough {
            match peek_client_hello(&mut client, self.downstream_timeouts.0).await {
                Ok(read) => read,
                Err(e) => {
                    tracing::debug!(%peer, "TCP listener: no TLS ClientHello: {e}");
                    return;
                }
            }
        } else {
            (Bytes::new(), None)
        };
        let Some(UpstreamPool { upstream, .. }) = self
            .route_tcp(&listener, sni.as_deref())
            .and_then(|i| self.upstreams.get(i))
        else {
            return;
        };
        let policy = &upstream.retry;
        let mut retry = policy.begin(&Method::GET);
        let mut view = RequestView {
            parts: Request::new(()).into_parts().0,
            client: peer,
            https: false,
            server_name: sni,
            tcp: true,
        };
        let mut tried: Vec<usize> = Vec::new();
        loop {
            let (selection, v) = upstream.select(view, &tried);
            view = v;
            let chosen = match selection {
                Selection::Plugin { chosen, .. } | Selection::Fallback { chosen } => chosen,
                // A reply is HTTP; a TCP connection has none to give.
                Selection::Unavailable { .. } | Selection::Refused | Selection::Respond { .. } => {
                    self.metrics.unrouted(upstream.name(), 503);
                    tracing::debug!(%peer, upstream = upstream.name(), "TCP listener: no backend available");
                    return;
                }
            };
            let proxied = crate::proxy_protocol::Addresses {
                source: peer,
                destination: local,
            };
            let backend = match upstream.connector.open(chosen.address, Some(proxied)).await {
                Ok(backend) => backend,
                Err(e) => {
                    if crate::fd_limit::is_local_resource_error(&e) {
                        self.metrics
                            .resources()
                            .local_error(crate::metrics::LocalOp::Connect);
                        return;
                    }
                    tracing::debug!(address = %chosen.address, "TCP listener: connect failed: {e}");
                    upstream.report_connect_failure(&chosen);
                    tried.push(chosen.id);
                    if !policy.allow(&mut retry, true, true) {
                        return;
                    }
                    upstream.metrics().retries.inc();
                    continue;
                }
            };
            upstream.report_connected(&chosen);
            let metrics = upstream.metrics();
            let _in_flight = InFlight::begin(&chosen, metrics.in_flight.clone());
            let counters = RelayCounters {
                to_backend: metrics.tunnel_bytes_to_backend.clone(),
                to_client: metrics.tunnel_bytes_to_client.clone(),
            };
            metrics.tunnels_open.inc();
            let mut client = Prefixed::new(hello, &mut client);
            let mut backend = backend;
            let result = relay(
                &mut client,
                &mut backend,
                upstream.tunnel_idle_timeout,
                &counters,
            )
            .await;
            metrics.tunnels_open.dec();
            tracing::debug!(%peer, address = %chosen.address, "TCP connection ended: {result:?}");
            return;
        }
    }

    /// The upstream of a TCP connection on `listener` with SNI `sni`: the
    /// first route whose `sni` matches, else the listener's default.
    fn route_tcp(&self, listener: &ListenerKey, sni: Option<&str>) -> Option<usize> {
        sni.and_then(|name| {
            self.routes
                .iter()
                .find(|r| r.sni.as_deref().is_some_and(|p| sni_matches(p, name)))
        })
        .map(|r| r.upstream)
        .or_else(|| self.listener_defaults.get(listener).copied())
    }
}

/// True if SNI `name` (lowercase) matches route `pattern`: equal, or
/// `*.rest` matching exactly one label before `rest` (RFC 6125 §6.4.3).
fn sni_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(rest) => name
            .split_once('.')
            .is_some_and(|(label, tail)| !label.is_empty() && tail == rest),
        None => pattern == name,
    }
}

/// Read the client's TLS ClientHello (rustls parses it; nothing is
/// answered) within `timeout`; the bytes read, to forward unchanged, and its
/// SNI name, lowercase.
///
/// # Errors
/// `TimedOut`, `UnexpectedEof`, or `InvalidData` if the bytes are not a TLS
/// ClientHello or exceed [`MAX_CLIENT_HELLO_BYTES`].
async fn peek_client_hello<C: AsyncRead + Unpin>(
    client: &mut C,
    timeout: Duration,
) -> io::Result<(Bytes, Option<Arc<str>>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    let read = async {
        loop {
            let n = client.read(&mut buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.len() > MAX_CLIENT_HELLO_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no complete ClientHello in 64 KiB",
                ));
            }
            let mut fresh = &buf[..n];
            while !fresh.is_empty() {
                acceptor.read_tls(&mut fresh)?;
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let sni = accepted
                        .client_hello()
                        .server_name()
                        .map(|n| Arc::from(n.to_ascii_lowercase()));
                    return Ok(sni);
                }
                Ok(None) => {}
                Err((e, _)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("not a TLS ClientHello: {e}"),
                    ));
                }
            }
        }
    };
    let sni = tokio::time::timeout(timeout, read).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "no ClientHello within header_read_timeout_ms",
        )
    })??;
    Ok((Bytes::from(seen), sni))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_patterns_match_exactly_or_one_label() {
        assert!(sni_matches("db.example.com", "db.example.com"));
        assert!(!sni_matches("db.example.com", "x.db.example.com"));
        assert!(sni_matches("*.example.com", "db.example.com"));
        assert!(!sni_matches("*.example.com", "a.b.example.com"));
        assert!(!sni_matches("*.example.com", "example.com"));
    }

    #[tokio::test]
    async fn the_client_hello_is_read_whole_and_its_sni_found() {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            rustls::pki_types::ServerName::try_from("DB.Example.com").expect("name"),
        )
        .expect("client");
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).expect("hello");
        // Delivered in two pieces.
        let (a, b) = hello.split_at(7);
        let mut stream = tokio_test_stream(&[a, b]);
        let (bytes, sni) = peek_client_hello(&mut stream, Duration::from_secs(5))
            .await
            .expect("peek");
        assert_eq!(&bytes[..], &hello[..], "forwarded unchanged");
        assert_eq!(sni.as_deref(), Some("db.example.com"));
        let mut garbage = tokio_test_stream(&[b"GET / HTTP/1.1\r\n\r\n"]);
        let e = peek_client_hello(&mut garbage, Duration::from_secs(5))
            .await
            .expect_err("not TLS");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    /// A stream that yields `pieces` one read at a time, then EOF.
    fn tokio_test_stream(pieces: &[&[u8]]) -> Box<dyn AsyncRead + Unpin + Send> {
        let mut chain: Box<dyn AsyncRead + Unpin + Send> = Box::new(tokio::io::empty());
        for piece in pieces.iter().rev() {
            chain = Box::new(AsyncReadExt::chain(
                std::io::Cursor::new(piece.to_vec()),
                chain,
            ));
        }
        chain
    }
}
