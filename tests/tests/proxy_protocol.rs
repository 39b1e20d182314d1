//! The PROXY protocol (HAProxy's v1 and v2): `send_proxy_protocol` on HTTP
//! and TCP upstreams (a header naming the client before each backend
//! connection's first byte; HTTP connections kept per client; health checks
//! send `LOCAL`/`UNKNOWN`), and `accept_proxy_protocol` on HTTP and TCP
//! listeners (the header's client then feeds `X-Forwarded-For` and what the
//! backend is told; a connection without a valid header is closed).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wasmlb::config::ProxyProtocolVersion;
use wasmlb::proxy_protocol::{Addresses, encode, read_header};
use wasmlb_tests::raw::{After, h1_exchange};
use wasmlb_tests::*;

/// What a backend connection's PROXY header said (`None`: LOCAL/UNKNOWN).
type Seen = Arc<Mutex<Vec<Option<Addresses>>>>;

/// A backend that requires a PROXY header on every connection (as one
/// behind HAProxy `send-proxy` does), then speaks HTTP/1.1 (`http`: the
/// body names the header's source and the request's `X-Forwarded-For`) or
/// echoes bytes.
struct ProxiedBackend {
    addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProxiedBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ProxiedBackend {
    async fn start(http: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Seen::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                conns.spawn(async move {
                    let Ok((addresses, rest)) =
                        read_header(&mut stream, Duration::from_secs(5)).await
                    else {
                        // No header: refused, as a real PROXY-protocol server does.
                        return;
                    };
                    record.lock().expect("lock").push(addresses);
                    let mut stream = wasmlb::tunnel::Prefixed::new(rest, stream);
                    if !http {
                        let (mut r, mut w) = tokio::io::split(stream);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        return;
                    }
                    let source = addresses.map_or("local".to_string(), |a| a.source.to_string());
                    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let xff = req
                            .headers()
                            .get("x-forwarded-for")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let body = format!("source={source} xff={xff}");
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(&mut stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    /// The headers seen from clients (health checks' LOCAL left out).
    fn clients(&self) -> Vec<Addresses> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .flatten()
            .copied()
            .collect()
    }

    fn locals(&self) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.is_none())
            .count()
    }
}

/// A keep-alive HTTP/1.1 client connection to `addr` that first writes
/// `preface` (a PROXY header, or nothing).
async fn h1(
    addr: SocketAddr,
    preface: &[u8],
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    SocketAddr,
) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let local = tcp.local_addr().expect("local");
    tcp.write_all(preface).await.expect("preface");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    (sender, local)
}

async fn body(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> String {
    let request = hyper::Request::builder()
        .uri("/")
        .header("host", "app.example")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn an_http_upstream_names_each_client_in_a_proxy_header_and_keeps_its_connections_apart() {
    for version in ["v1", "v2"] {
        let backend = ProxiedBackend::start(true).await;
        let proxy = InProcessProxy::start(&app_config(
            "round-robin",
            &format!("{{ address = \"{}\" }}", backend.addr),
            &format!(
                "send_proxy_protocol = \"{version}\"\n\
                 [upstream.app.health_check]\ninterval_ms = 100\n"
            ),
        ))
        .await;
        let listener = proxy.addrs[0];
        let (mut a, a_addr) = h1(listener, b"").await;
        let (mut b, b_addr) = h1(listener, b"").await;
        for _ in 0..3 {
            assert_eq!(
                body(&mut a).await,
                format!("source={a_addr} xff=127.0.0.1"),
                "{version}"
            );
        }
        assert_eq!(body(&mut b).await, format!("source={b_addr} xff=127.0.0.1"));
        assert_eq!(body(&mut a).await, format!("source={a_addr} xff=127.0.0.1"));
        // One backend connection per client (reused by its keep-alive
        // requests), never one client's connection for another.
        let clients = backend.clients();
        assert_eq!(clients.len(), 2, "{version}: {clients:?}");
        for c in &clients {
            assert_eq!(c.destination, listener, "{version}");
        }
        // Health checks connect with the LOCAL / UNKNOWN form, and pass.
        wait_until("health checks", || backend.locals() >= 4).await;
        assert!(proxy.upstream("app").snapshot().backends[0].check_passing);
    }
}

#[tokio::test]
async fn a_listener_accepting_proxy_protocol_takes_the_client_from_the_header() {
    let backend = ProxiedBackend::start(true).await;
    let proxy = InProcessProxy::start(&format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\naccept_proxy_protocol = true\n\n\
         [upstream.app]\nplugin = 'round-robin'\nbackends = [ {{ address = \"{}\" }} ]\n\
         send_proxy_protocol = \"v2\"\n",
        backend.addr
    ))
    .await;
    let listener = proxy.addrs[0];
    for (version, client, destination) in [
        (
            ProxyProtocolVersion::V1,
            "203.0.113.9:40000",
            "198.51.100.1:443",
        ),
        (
            ProxyProtocolVersion::V2,
            "[2001:db8::9]:41000",
            "[2001:db8::1]:443",
        ),
    ] {
        let told = Addresses {
            source: client.parse().expect("addr"),
            destination: destination.parse().expect("addr"),
        };
        let (mut sender, _) = h1(listener, &encode(version, Some(told))).await;
        let ip = told.source.ip();
        // The header's client is X-Forwarded-For's, and what the backend's
        // own PROXY header names (source and destination).
        assert_eq!(
            body(&mut sender).await,
            format!("source={} xff={ip}", told.source)
        );
        assert_eq!(backend.clients().last(), Some(&told));
    }
    // LOCAL (a health check of the proxy in front): the socket's own addresses.
    let (mut sender, own) = h1(listener, &encode(ProxyProtocolVersion::V2, None)).await;
    assert_eq!(
        body(&mut sender).await,
        format!("source={own} xff=127.0.0.1")
    );
    // The header and the request in one packet.
    let mut packet = encode(
        ProxyProtocolVersion::V1,
        Some(Addresses {
            source: "192.0.2.1:1000".parse().expect("addr"),
            destination: "192.0.2.2:80".parse().expect("addr"),
        }),
    );
    packet.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let reply = h1_exchange(listener, &[packet], After::Wait, 1).await;
    let raw = String::from_utf8_lossy(&reply.raw);
    assert_eq!(reply.status, Some(200), "{raw}");
    assert!(raw.contains("xff=192.0.2.1"), "{raw}");
    // Hostile prefaces: the connection is closed, nothing is answered,
    // nothing reaches a backend.
    let before = backend.seen.lock().expect("lock").len();
    for garbage in [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 80\nGET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        b"\r\n\r\n\0\r\nQUIT\n\x22\x11\x00\x0c\x01\x02\x03\x04\x05\x06\x07\x08\x00\x01\x00\x02"
            .to_vec(),
        vec![b'P'; 5000],
    ] {
        let reply = h1_exchange(listener, std::slice::from_ref(&garbage), After::Wait, 1).await;
        assert_eq!(
            reply.responses,
            0,
            "{:?} got {:?}",
            String::from_utf8_lossy(&garbage),
            String::from_utf8_lossy(&reply.raw)
        );
    }
    assert_eq!(backend.seen.lock().expect("lock").len(), before);
    // A client that sends nothing is closed at the head-read timeout, and
    // the listener keeps serving meanwhile.
    let mut silent = TcpStream::connect(listener).await.expect("connect");
    let (mut sender, _) = h1(listener, &encode(ProxyProtocolVersion::V1, None)).await;
    assert!(body(&mut sender).await.starts_with("source="));
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("closed within the head-read timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn tcp_mode_accepts_and_sends_proxy_protocol() {
    let backend = ProxiedBackend::start(false).await;
    let proxy = InProcessProxy::start(&format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\nmode = \"tcp\"\n\
         accept_proxy_protocol = true\n\n\
         [upstream.app]\nplugin = 'round-robin'\nbackends = [ {{ address = \"{}\" }} ]\n\
         send_proxy_protocol = \"v1\"\n",
        backend.addr
    ))
    .await;
    let listener = proxy.addrs[0];
    let told = Addresses {
        source: "203.0.113.7:5555".parse().expect("addr"),
        destination: "198.51.100.7:6379".parse().expect("addr"),
    };
    let mut client = TcpStream::connect(listener).await.expect("connect");
    // The header and the first bytes in one write: the bytes are relayed.
    let mut first = encode(ProxyProtocolVersion::V2, Some(told));
    first.extend_from_slice(b"PING\r\n");
    client.write_all(&first).await.expect("write");
    let mut echoed = [0u8; 6];
    tokio::time::timeout(WAIT, client.read_exact(&mut echoed))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&echoed, b"PING\r\n");
    assert_eq!(backend.clients(), vec![told]);
    drop(client);
    // No header: closed, never connected to the backend.
    let mut bare = TcpStream::connect(listener).await.expect("connect");
    bare.write_all(b"PING\r\nPING\r\nPING\r\nPING\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, bare.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(backend.seen.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn bad_proxy_protocol_settings_are_refused_naming_the_key() {
    let cases = [
        (
            // line 4
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\naccept_proxy_protocol = \"yes\"\n\n\
             [upstream.app]\nplugin = 'round-robin'\nbackends = [ { address = \"127.0.0.1:1\" } ]\n",
            "wasmlb.toml:4: listener[0].accept_proxy_protocol: invalid type",
        ),
        (
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
             [upstream.app]\nplugin = 'round-robin'\nbackends = [ { address = \"127.0.0.1:1\" } ]\n\
             send_proxy_protocol = \"v3\"\n",
            "wasmlb.toml:8: upstream.app.send_proxy_protocol",
        ),
    ];
    for (toml, key) in cases {
        let file = ConfigFile::new(toml);
        let err = wasmlb::config::Config::load(&file.path)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(key), "{err}");
        assert!(
            err.contains("wasmlb.toml:"),
            "names the file and line: {err}"
        );
    }
}
