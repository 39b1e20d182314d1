//! HTTP/1.1 upgrades (WebSocket and a raw `Upgrade: echo`) through wasmlb:
//! real WebSocket clients and servers (tokio-tungstenite), the tunnel's
//! half-close, backpressure and idle timeout, a backend killed mid-tunnel,
//! least-connections over 1,000 concurrent WebSockets, tunnels surviving a
//! plugin swap and a reload, and `Upgrade: h2c` not forwarded.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wasmlb_tests::ws::*;
use wasmlb_tests::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn list(backends: &[&TunnelBackend]) -> String {
    backends
        .iter()
        .map(|b| format!("{{ address = \"{}\" }}", b.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"\n";

async fn ws(addr: SocketAddr, path: &str) -> (Ws, hyper::HeaderMap) {
    let (ws, response) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{addr}{path}")),
    )
    .await
    .expect("handshake in time")
    .expect("WebSocket handshake through the proxy");
    (ws, response.headers().clone())
}

async fn echo(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text)).await.expect("send");
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo in time")
        {
            Some(Ok(Message::Text(t))) => return t.as_str().to_string(),
            Some(Ok(_)) => continue,
            other => panic!("no echo: {other:?}"),
        }
    }
}

async fn metric(proxy: &InProcessProxy, name: &str) -> f64 {
    let text = text(&client(), &proxy.admin_url("/metrics")).await;
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn websocket_echoes_through_wasmlb_and_the_backend_sees_the_upgrade() {
    let backend = TunnelBackend::start("w1", TunnelKind::WebSocket).await;
    let proxy = InProcessProxy::start(&format!(
        "{}{ADMIN}",
        app_config("round-robin", &list(&[&backend]), "debug_headers = true")
    ))
    .await;
    let (mut ws, headers) = ws(proxy.addrs[0], "/chat?room=1").await;
    assert_eq!(
        headers["x-wasmlb-plugin"],
        builtin_name("round-robin").as_str()
    );
    assert_eq!(echo(&mut ws, "hello").await, "w1: hello");
    // Binary, a large message (several relay buffers) and a ping.
    let big = vec![0xabu8; 200_000];
    ws.send(Message::binary(big.clone())).await.expect("send");
    ws.send(Message::Ping(vec![1, 2, 3].into()))
        .await
        .expect("ping");
    let mut got_binary = false;
    let mut got_pong = false;
    while !(got_binary && got_pong) {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(&b[..], &big[..]);
                got_binary = true;
            }
            Some(Ok(Message::Pong(p))) => {
                assert_eq!(&p[..], &[1, 2, 3]);
                got_pong = true;
            }
            other => panic!("unexpected: {other:?}"),
        }
    }
    assert_eq!(metric(&proxy, "wasmlb_tunnels_open{").await, 1.0);
    // The tunnel counts as in flight to its backend while open.
    let up = proxy.upstream("app");
    assert_eq!(up.snapshot().backends[0].in_flight, 1);
    let head = &backend.heads()[0];
    assert!(head.starts_with("get /chat?room=1"), "{head}");
    for needed in [
        "connection: upgrade",
        "upgrade: websocket",
        "sec-websocket-key:",
        "x-forwarded-for: 127.0.0.1",
    ] {
        assert!(head.contains(needed), "backend head lacks {needed}: {head}");
    }
    ws.close(None).await.expect("close");
    // The close handshake completes and both sides end.
    while let Some(Ok(_)) = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("closed in time")
    {}
    drop(ws);
    wait_until("the tunnel to end", || {
        up.snapshot().backends[0].in_flight == 0 && backend.open() == 0
    })
    .await;
    assert_eq!(metric(&proxy, "wasmlb_tunnels_open{").await, 0.0);
    assert!(
        metric(
            &proxy,
            "wasmlb_tunnel_bytes_total{upstream=\"app\",direction=\"to_backend\"}"
        )
        .await
            > 200_000.0
    );
    assert!(
        metric(
            &proxy,
            "wasmlb_tunnel_bytes_total{upstream=\"app\",direction=\"to_client\"}"
        )
        .await
            > 200_000.0
    );
}

/// Raw bytes through an `Upgrade: echo` tunnel: bytes sent with the request
/// head arrive first, a half-close lets the echo finish, and the connection
/// then ends.
#[tokio::test]
async fn a_raw_upgrade_tunnel_keeps_early_bytes_and_honours_half_close() {
    let backend = TunnelBackend::start("e1", TunnelKind::RawEcho).await;
    let proxy = InProcessProxy::start(&app_config("round-robin", &list(&[&backend]), "")).await;
    let mut s = TcpStream::connect(proxy.addrs[0]).await.expect("connect");
    // The head and the tunnel's first bytes in one write.
    s.write_all(
        b"GET /e HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\nearly-bytes|",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("101 head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    // 1 MiB more, then the client ends its side; the echo still comes back whole.
    let payload: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write");
        w.shutdown().await.expect("half-close");
        w
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut echoed))
        .await
        .expect("echo ends in time")
        .expect("read");
    let _w = writer.await.expect("writer");
    assert_eq!(&echoed[..12], b"early-bytes|");
    assert_eq!(echoed.len(), 12 + payload.len());
    assert!(echoed[12..] == payload[..], "echo differs");
}

/// Write `request` on `s` and read one answer (up to 4 KiB), lowercased.
async fn exchange(s: &mut TcpStream, request: &[u8]) -> String {
    s.write_all(request).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase()
}

/// A backend that refuses the upgrade answers normally; the connection then
/// serves the next request. `Upgrade: h2c` is never forwarded.
#[tokio::test]
async fn a_refused_upgrade_is_an_ordinary_response_and_h2c_is_not_forwarded() {
    let echo = TunnelBackend::start("e1", TunnelKind::RawEcho).await;
    let proxy = InProcessProxy::start(&app_config("round-robin", &list(&[&echo]), "")).await;
    let mut s = TcpStream::connect(proxy.addrs[0]).await.expect("connect");
    let text = exchange(&mut s, b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n").await;
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.ends_with("no upgrade"), "{text}");
    let head = &echo.heads()[0];
    assert!(!head.contains("upgrade"), "h2c upgrade forwarded: {head}");
    assert!(!head.contains("http2-settings"), "{head}");
    // A protocol the backend does not speak: its 426 passes through, and
    // the client's connection serves the next request.
    let mut s = TcpStream::connect(proxy.addrs[0]).await.expect("connect");
    let text = exchange(
        &mut s,
        b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("http/1.1 426"), "{text}");
    assert!(text.ends_with("echo"), "{text}");
    let text = exchange(&mut s, b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert_eq!(echo.accepted(), 0);
    assert!(
        echo.heads()[1].contains("upgrade: websocket"),
        "{:?}",
        echo.heads()
    );
}

/// A backend killed mid-tunnel: the client's side closes promptly, and the
/// backend's in-flight count is released.
#[tokio::test]
async fn a_backend_killed_mid_tunnel_closes_the_client_side() {
    let backend = TunnelBackend::start("w1", TunnelKind::WebSocket).await;
    let proxy = InProcessProxy::start(&app_config("round-robin", &list(&[&backend]), "")).await;
    let (mut ws, _) = ws(proxy.addrs[0], "/").await;
    assert_eq!(echo(&mut ws, "a").await, "w1: a");
    backend.kill();
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("the client side closes within the wait");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "no more messages: {end:?}"
    );
    // The client closes its socket on the end of stream, as browsers do.
    drop(ws);
    let up = proxy.upstream("app");
    wait_until("in-flight released", || {
        up.snapshot().backends[0].in_flight == 0
    })
    .await;
}

/// `tunnel_idle_timeout_ms`: a silent tunnel is cut, a chatty one is not.
#[tokio::test]
async fn a_silent_tunnel_is_cut_at_the_idle_timeout_and_a_chatty_one_lives() {
    let backend = TunnelBackend::start("w1", TunnelKind::WebSocket).await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &list(&[&backend]),
        "tunnel_idle_timeout_ms = 400",
    ))
    .await;
    let (mut chatty, _) = ws(proxy.addrs[0], "/").await;
    let (mut silent, _) = ws(proxy.addrs[0], "/").await;
    // 1.2 s of traffic every 100 ms: three idle timeouts long.
    for i in 0..12 {
        assert_eq!(echo(&mut chatty, &i.to_string()).await, format!("w1: {i}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = tokio::time::timeout(WAIT, silent.next())
        .await
        .expect("cut in time");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    assert_eq!(echo(&mut chatty, "still").await, "w1: still");
}

/// 1,000 concurrent WebSockets over least-connections and four backends:
/// each backend holds 250 ± 10 %, because a tunnel counts as in flight for
/// its whole life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_spreads_a_thousand_websockets_evenly() {
    let _ = wasmlb::fd_limit::raise_nofile();
    let mut backends = Vec::new();
    for i in 0..4 {
        backends.push(TunnelBackend::start(&format!("w{i}"), TunnelKind::WebSocket).await);
    }
    let refs: Vec<&TunnelBackend> = backends.iter().collect();
    let proxy = InProcessProxy::start(&app_config("least-connections", &list(&refs), "")).await;
    let addr = proxy.addrs[0];
    let mut sockets = Vec::new();
    // 50 at a time: concurrent handshakes, all tunnels open at the end.
    for _ in 0..20 {
        let batch = futures_util::future::join_all((0..50).map(|_| ws(addr, "/"))).await;
        sockets.extend(batch.into_iter().map(|(w, _)| w));
    }
    wait_until("1,000 upgrades", || {
        backends.iter().map(TunnelBackend::accepted).sum::<usize>() == 1000
    })
    .await;
    for b in &backends {
        let n = b.open();
        assert!(
            (225..=275).contains(&n),
            "{} holds {n} of 1000: {:?}",
            b.name,
            backends.iter().map(TunnelBackend::open).collect::<Vec<_>>()
        );
    }
    // Every tunnel still carries traffic.
    for w in sockets.iter_mut().step_by(97) {
        let reply = echo(w, "x").await;
        assert!(reply.ends_with(": x"), "{reply}");
    }
    drop(sockets);
    wait_until("all tunnels to close", || {
        backends.iter().all(|b| b.open() == 0)
    })
    .await;
}

/// 100 tunnels open across a plugin swap and a reload: they keep working,
/// and tunnels opened afterwards follow the new plugin and backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_survive_a_plugin_swap_and_a_reload() {
    let a = TunnelBackend::start("a", TunnelKind::WebSocket).await;
    let b = TunnelBackend::start("b", TunnelKind::WebSocket).await;
    let config = |backends: &str, plugin: &str| {
        format!(
            "{}{ADMIN}",
            app_config(plugin, backends, "debug_headers = true")
        )
    };
    let proxy = InProcessProxy::start(&config(&list(&[&a]), "round-robin")).await;
    let addr = proxy.addrs[0];
    let mut old = Vec::new();
    for _ in 0..100 {
        old.push(ws(addr, "/").await.0);
    }
    let c = client();
    let swapped = c
        .put(proxy.admin_url("/upstreams/app/plugin"))
        .body(r#"{"plugin": "least-connections"}"#)
        .send()
        .await
        .expect("swap");
    assert_eq!(swapped.status(), 200);
    let (mut fresh, headers) = ws(addr, "/").await;
    assert_eq!(headers["x-wasmlb-plugin"], "least-connections");
    assert_eq!(echo(&mut fresh, "new").await, "a: new");
    // Reload: only backend b now.
    proxy.rewrite_config(&config(&list(&[&b]), "round-robin"));
    let reloaded = c
        .post(proxy.admin_url("/reload"))
        .send()
        .await
        .expect("reload");
    assert_eq!(reloaded.status(), 200);
    let (mut after, _) = ws(addr, "/").await;
    assert_eq!(echo(&mut after, "new").await, "b: new");
    for (i, w) in old.iter_mut().enumerate() {
        assert_eq!(
            echo(w, &i.to_string()).await,
            format!("a: {i}"),
            "tunnel {i}"
        );
    }
    assert_eq!(a.open(), 101);
}

/// WebSocket over a TLS listener (wss): the tunnel runs over the TLS
/// session.
#[tokio::test]
async fn websocket_over_a_tls_listener() {
    use wasmlb_tests::tls::*;
    let backend = TunnelBackend::start("w1", TunnelKind::WebSocket).await;
    let pki = Pki::new();
    let proxy = InProcessProxy::start_with(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\
             [listener.tls]\ncertificates = [ {{ cert = \"site.pem\", key = \"site.key\" }} ]\n\
             [upstream.app]\nplugin = 'round-robin'\nbackends = [ {} ]\n",
            list(&[&backend])
        ),
        |dir| {
            pki.issue(dir, "site", &["proxy.test"]);
        },
    )
    .await;
    let config = client_config(Some(pki.roots()), &[b"http/1.1"]);
    let tls = tls_connect(proxy.addrs[0], "proxy.test", config)
        .await
        .expect("TLS handshake");
    let (mut ws, _) = tokio_tungstenite::client_async("wss://proxy.test/chat", tls)
        .await
        .expect("wss handshake");
    ws.send(Message::text("over tls")).await.expect("send");
    let reply = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("in time");
    assert!(
        matches!(&reply, Some(Ok(Message::Text(t))) if t.as_str() == "w1: over tls"),
        "{reply:?}"
    );
}

/// Hostile backend: `101 Switching Protocols` to a request that asked no
/// upgrade (RFC 9110 §15.2.2) is refused with 502, never spliced.
#[tokio::test]
async fn a_101_to_a_request_without_upgrade_is_a_502() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: evil\r\n\r\nsmuggled")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &format!("{{ address = \"{addr}\" }}"),
        "retries = 0",
    ))
    .await;
    let mut s = TcpStream::connect(proxy.addrs[0]).await.expect("connect");
    let text = exchange(&mut s, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(text.starts_with("http/1.1 502"), "{text}");
    assert!(!text.contains("smuggled"), "{text}");
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// An HTTP/2 (prior knowledge) client connection to `addr`.
async fn h2_connection(addr: SocketAddr) -> H2Sender {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// RFC 8441 extended CONNECT on `sender` for `protocol` at `path`.
async fn extended_connect(
    sender: &mut H2Sender,
    addr: SocketAddr,
    protocol: &'static str,
    path: &str,
) -> hyper::Response<hyper::body::Incoming> {
    // The client refuses `:protocol` until the server's SETTINGS (with
    // SETTINGS_ENABLE_CONNECT_PROTOCOL) arrived: retry until then.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let request = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(format!("http://{addr}{path}"))
            .header("sec-websocket-version", "13")
            .extension(hyper::ext::Protocol::from_static(protocol))
            .body(http_body_util::Empty::new())
            .expect("request");
        match tokio::time::timeout_at(deadline, sender.send_request(request))
            .await
            .expect("in time")
        {
            Ok(response) => return response,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("extended CONNECT failed: {e}"),
        }
    }
}

/// WebSocket over HTTP/2 (RFC 8441): the extended CONNECT goes to an
/// HTTP/1.1 backend as a classic upgrade with a key of the proxy's making,
/// the client gets 200 without `Sec-WebSocket-Accept`, two WebSockets share
/// one HTTP/2 connection, and each counts in flight while open.
#[tokio::test]
async fn websocket_over_http2_extended_connect_reaches_an_http1_backend() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let backend = TunnelBackend::start("w2", TunnelKind::WebSocket).await;
    let proxy = InProcessProxy::start(&format!(
        "{}{ADMIN}",
        app_config("round-robin", &list(&[&backend]), "")
    ))
    .await;
    let addr = proxy.addrs[0];
    let mut sender = h2_connection(addr).await;
    let mut sockets = Vec::new();
    for path in ["/chat?room=1", "/chat?room=2"] {
        let mut response = extended_connect(&mut sender, addr, "websocket", path).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("sec-websocket-accept").is_none());
        assert!(response.headers().get("upgrade").is_none());
        let stream = hyper::upgrade::on(&mut response)
            .await
            .expect("upgraded stream");
        let ws = WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(stream),
            Role::Client,
            None,
        )
        .await;
        sockets.push(ws);
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        let text = format!("over h2 {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let got = loop {
            match tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("echo in time")
            {
                Some(Ok(Message::Text(t))) => break t.as_str().to_string(),
                Some(Ok(_)) => continue,
                other => panic!("no echo: {other:?}"),
            }
        };
        assert_eq!(got, format!("w2: {text}"));
    }
    let head = &backend.heads()[0];
    assert!(head.starts_with("get /chat?room=1\r\n"), "{head}");
    for needed in [
        "connection: upgrade",
        "upgrade: websocket",
        "sec-websocket-key:",
        "sec-websocket-version: 13",
    ] {
        assert!(head.contains(needed), "backend head lacks {needed}: {head}");
    }
    let up = proxy.upstream("app");
    assert_eq!(up.snapshot().backends[0].in_flight, 2);
    assert_eq!(metric(&proxy, "wasmlb_tunnels_open{").await, 2.0);
    for mut ws in sockets {
        ws.close(None).await.expect("close");
        while let Some(Ok(_)) = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("closed in time")
        {}
    }
    wait_until("the tunnels to end", || {
        up.snapshot().backends[0].in_flight == 0
    })
    .await;
}

/// Extended CONNECT with another protocol is a raw tunnel; a backend that
/// refuses the upgrade is passed through (426), one that answers 200 (no
/// switch: to HTTP/2 a 2xx means the tunnel is open) is a 502, and a plain
/// HTTP/2 CONNECT (a forward-proxy tunnel) is 501.
#[tokio::test]
async fn extended_connect_raw_tunnels_and_refusals() {
    let echo = TunnelBackend::start("e2", TunnelKind::RawEcho).await;
    let proxy = InProcessProxy::start(&app_config("round-robin", &list(&[&echo]), "")).await;
    let addr = proxy.addrs[0];
    let mut sender = h2_connection(addr).await;
    let mut response = extended_connect(&mut sender, addr, "echo", "/raw").await;
    assert_eq!(response.status(), 200);
    let stream = hyper::upgrade::on(&mut response).await.expect("upgraded");
    let mut stream = hyper_util::rt::TokioIo::new(stream);
    stream.write_all(b"ping over h2").await.expect("write");
    let mut got = [0u8; 12];
    tokio::time::timeout(WAIT, stream.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&got, b"ping over h2");
    // Half-close: the echo ends and so does the stream.
    stream.shutdown().await.expect("end of stream");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("clean end");
    assert!(rest.is_empty());
    let refused = extended_connect(&mut sender, addr, "websocket", "/ws").await;
    assert_eq!(refused.status(), 426);
    // The connection still serves ordinary requests.
    let request = hyper::Request::builder()
        .uri(format!("http://{addr}/plain"))
        .body(http_body_util::Empty::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    // A backend that ignores the upgrade and answers 200.
    let plain = TestBackend::start("p").await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &backend_list(&[&plain]),
        "retries = 0",
    ))
    .await;
    let addr = proxy.addrs[0];
    let mut sender = h2_connection(addr).await;
    let response = extended_connect(&mut sender, addr, "websocket", "/").await;
    assert_eq!(response.status(), 502);
    let request = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri("backend.example:443")
        .body(http_body_util::Empty::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 501);
}
