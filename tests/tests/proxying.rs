//! Routing, status codes, header handling, HTTP/2 and custom plugins.

use serde_json::Value;
use wasmlb_tests::{
    InProcessProxy, TestBackend, app_config, backend_list, client, closed_port, get, h2c_client,
    named_backend_list, plugins,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_host_and_path_prefix_first_match_wins() {
    let (web, api, admin) = (
        TestBackend::start("web").await,
        TestBackend::start("api").await,
        TestBackend::start("admin").await,
    );
    let toml = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
upstream = "web"

[[route]]
host = "api.example.com"
path_prefix = "/admin"
upstream = "admin"

[[route]]
host = "api.example.com"
upstream = "api"

[[route]]
path_prefix = "/v1/"
upstream = "api"

[upstream.web]
plugin = "round-robin"
backends = [ {{ address = "{}" }} ]
[upstream.api]
plugin = "round-robin"
backends = [ {{ address = "{}" }} ]
[upstream.admin]
plugin = "least-connections"
backends = [ {{ address = "{}" }} ]
"#,
        web.addr, api.addr, admin.addr
    );
    let proxy = InProcessProxy::start(&toml).await;
    let c = client();
    let send = |host: &'static str, path: &'static str| {
        let c = c.clone();
        let url = proxy.url(path);
        async move {
            let r = c.get(url).header("host", host).send().await.unwrap();
            r.headers()["x-backend"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(send("API.example.com:8080", "/admin/users").await, "admin");
    assert_eq!(send("api.example.com", "/items").await, "api");
    assert_eq!(send("www.example.com", "/v1/items").await, "api");
    assert_eq!(
        send("www.example.com", "/v1").await,
        "web",
        "prefix /v1/ does not match /v1"
    );
    assert_eq!(send("www.example.com", "/").await, "web");
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_backend_port_is_502_and_empty_upstream_is_503() {
    let dead = closed_port();
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &format!("{{ address = \"{dead}\" }}"),
        "",
    ))
    .await;
    let (status, _, body) = get(&client(), &proxy.url("/")).await;
    assert_eq!(status, 502);
    assert!(body.contains("the backend could not be reached"), "{body}");
    assert!(!body.contains(&dead.to_string()), "{body}");
    assert!(proxy.stop().await);

    let proxy = InProcessProxy::start(&app_config("round-robin", "", "")).await;
    let (status, _, body) = get(&client(), &proxy.url("/")).await;
    assert_eq!(status, 503);
    assert!(body.contains("no backend available"), "{body}");
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_is_504_after_the_response_timeout() {
    let b = TestBackend::start("slow").await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &backend_list(&[&b]),
        "response_timeout_ms = 200",
    ))
    .await;
    let (status, _, body) = get(&client(), &proxy.url("/slow?ms=3000")).await;
    assert_eq!(status, 504);
    assert!(body.contains("did not answer in time"), "{body}");
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_and_x_forwarded_for_appended() {
    let b = TestBackend::start("b0").await;
    let proxy = InProcessProxy::start(&app_config("round-robin", &backend_list(&[&b]), "")).await;
    let r = client()
        .get(proxy.url("/headers"))
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic eA==")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-kept", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    for gone in [
        "connection",
        "x-drop-me",
        "keep-alive",
        "te",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the backend: {seen}"
        );
    }
    assert_eq!(seen["x-kept"][0], "1");
    assert_eq!(seen["x-forwarded-for"][0], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"][0], "http");
    assert_eq!(seen["x-forwarded-host"][0], proxy.addrs[0].to_string());
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_clients_are_served() {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy = InProcessProxy::start(&app_config("round-robin", &backend_list(&refs), "")).await;
    let c = h2c_client();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = c.get(proxy.url("/headers")).send().await.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        seen.push(r.headers()["x-backend"].to_str().unwrap().to_string());
        let headers: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(
            headers["host"][0],
            proxy.addrs[0].to_string(),
            "authority becomes Host"
        );
    }
    assert_eq!(seen, ["b0", "b1", "b0", "b1"]);
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_plugin_from_examples_routes_by_header() {
    let backends = TestBackend::start_many(3).await;
    let list = named_backend_list(&backends);
    let extra = "[upstream.app.plugin_config]\nheader = \"x-pin\"";
    let proxy = InProcessProxy::start(&app_config(plugins::HEADER_ROUTE, &list, extra)).await;
    let c = client();
    for _ in 0..5 {
        let r = c
            .get(proxy.url("/"))
            .header("x-pin", "b2")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-backend"], "b2");
    }
    // Without the header: least-connections, rotating over idle backends.
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(get(&c, &proxy.url("/")).await.1);
    }
    seen.sort();
    assert_eq!(seen, ["b0", "b1", "b2"]);
    assert_eq!(
        proxy
            .upstream("app")
            .stats()
            .fallbacks
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_serves_its_default_upstream() {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let toml = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
upstream = "first"

[[listener]]
address = "127.0.0.1:0"
upstream = "second"

[upstream.first]
plugin = "round-robin"
backends = [ {{ address = "{}" }} ]
[upstream.second]
plugin = "least-connections"
backends = [ {{ address = "{}" }} ]
"#,
        a.addr, b.addr
    );
    let proxy = InProcessProxy::start(&toml).await;
    assert_eq!(proxy.addrs.len(), 2);
    assert_ne!(proxy.addrs[0], proxy.addrs[1]);
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &format!("http://{}/", proxy.addrs[0])).await.1, "a");
        assert_eq!(get(&c, &format!("http://{}/", proxy.addrs[1])).await.1, "b");
    }
    assert!(proxy.stop().await);
}

/// Read from `stream` until `done` holds for what was read, or EOF or an
/// error (bounded by [`wasmlb_tests::WAIT`]); what was read, and whether the
/// read ended in time.
async fn read_until(
    stream: &mut tokio::net::TcpStream,
    done: impl Fn(&str) -> bool,
) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let read = tokio::time::timeout(wasmlb_tests::WAIT, async {
        let mut buf = [0u8; 4096];
        while !done(&String::from_utf8_lossy(&out)) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (String::from_utf8_lossy(&out).into_owned(), read.is_ok())
}

/// Read from `stream` until EOF or an error (bounded by [`wasmlb_tests::WAIT`]);
/// what was read.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    let (got, in_time) = read_until(stream, |_| false).await;
    assert!(in_time, "the proxy never closed the connection");
    got
}

/// A proxy in front of one backend `b0` with the given `header_read_timeout_ms`
/// and `idle_timeout_ms`.
async fn proxy_with_timeouts(header_read_ms: u64, idle_ms: u64) -> (TestBackend, InProcessProxy) {
    let b = TestBackend::start("b0").await;
    let config = format!(
        "{}\n[server]\nheader_read_timeout_ms = {header_read_ms}\nidle_timeout_ms = {idle_ms}\n",
        app_config("round-robin", &backend_list(&[&b]), "")
    );
    let proxy = InProcessProxy::start(&config).await;
    (b, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_and_idle_keep_alive_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let (_b, proxy) = proxy_with_timeouts(300, 600).await;

    // Slowloris: half a head, then nothing.
    let mut slow = tokio::net::TcpStream::connect(proxy.addrs[0])
        .await
        .expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let got = read_until_closed(&mut slow).await;
    assert!(!got.contains("hello"), "no request was served: {got:?}");

    // Idle keep-alive: one request, then silence.
    let mut idle = tokio::net::TcpStream::connect(proxy.addrs[0])
        .await
        .expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let got = read_until_closed(&mut idle).await;
    assert!(
        got.starts_with("HTTP/1.1 200") && got.contains("hello from b0"),
        "{got:?}"
    );

    // A request in progress longer than both timeouts is not cut.
    let (status, _, body) = get(&client(), &proxy.url("/slow?ms=900")).await;
    assert_eq!(status, 200, "{body}");
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_the_whole_request() {
    let b = TestBackend::start("b0").await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &backend_list(&[&b]),
        "request_timeout_ms = 300",
    ))
    .await;
    let (status, _, body) = get(&client(), &proxy.url("/slow?ms=3000")).await;
    assert_eq!(status, 504);
    assert!(body.contains("request_timeout_ms = 300"), "{body}");
    let (status, _, _) = get(&client(), &proxy.url("/")).await;
    assert_eq!(status, 200);
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_waiting_at_its_deadline() {
    let b = TestBackend::start("b0").await;
    let config = format!(
        "{}\n[server]\nshutdown_timeout_ms = 300\n",
        app_config("round-robin", &backend_list(&[&b]), "")
    );
    let proxy = InProcessProxy::start(&config).await;
    let url = proxy.url("/slow?ms=5000");
    let slow = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) });
    let up = proxy.upstream("app");
    let deadline = std::time::Instant::now() + wasmlb_tests::WAIT;
    while up.backends()[0]
        .live
        .in_flight
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        !proxy.stop().await,
        "a request outliving shutdown_timeout_ms is not waited for"
    );
    slow.abort();
}

/// Read from `stream` until `marker` (the end of a response body) arrived
/// `n` times (bounded by [`wasmlb_tests::WAIT`]); what was read.
async fn read_responses(stream: &mut tokio::net::TcpStream, marker: &str, n: usize) -> String {
    let (got, in_time) = read_until(stream, |out| out.matches(marker).count() >= n).await;
    assert!(in_time, "no {n} responses in time: {got:?}");
    got
}

/// An idle HTTP/1.1 keep-alive connection gives up hyper's buffers while it
/// waits (see `wasmlb::conn::TimedIo`): whatever arrives next on it, however
/// split, is served as before, and the timeouts still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keep_alive_connections_serve_what_comes_next() {
    use tokio::io::AsyncWriteExt;
    const HELLO: &str = "hello from b0";
    // Longer than the park grace (PARK_AFTER, 50 ms): each pause parks.
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(150));
    let (_b, proxy) = proxy_with_timeouts(400, 60_000).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addrs[0])
        .await
        .expect("connect");
    // Requests after pauses, one head split across a pause, a pipelined pair.
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let got = read_responses(&mut s, HELLO, 1).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    pause().await;
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.expect("write");
    pause().await;
    s.write_all(b"st: x\r\n\r\n").await.expect("write");
    let got = read_responses(&mut s, HELLO, 1).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    pause().await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let got = read_responses(&mut s, HELLO, 2).await;
    assert_eq!(got.matches("HTTP/1.1 200").count(), 2, "{got:?}");
    // A POST whose body follows its head after a pause.
    pause().await;
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        .await
        .expect("write");
    pause().await;
    s.write_all(b"abcde").await.expect("write");
    // sha256("abcde")
    let got = read_responses(
        &mut s,
        "36bbe50ed96841d10443bcb670d6554f0a34b761be67ec9c4a8ad2c0c44ca42c",
        1,
    )
    .await;
    assert!(
        got.starts_with("HTTP/1.1 200") && got.contains("\r\n\r\n5 "),
        "{got:?}"
    );
    // Half a head after a served request: closed at the head-read timeout
    // (400 ms); the idle one (60 s) is longer than read_until_closed waits.
    pause().await;
    s.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
    let got = read_until_closed(&mut s).await;
    assert!(!got.contains("hello"), "{got:?}");

    // An HTTP/2 preface split across reads still selects HTTP/2.
    let mut h2 = tokio::net::TcpStream::connect(proxy.addrs[0])
        .await
        .expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
    pause().await;
    h2.write_all(b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("write");
    let mut head = [0u8; 9];
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(wasmlb_tests::WAIT, h2.read_exact(&mut head))
        .await
        .expect("an answer in time")
        .expect("read");
    assert_eq!(
        head[3], 0x4,
        "the server's first frame is SETTINGS: {head:?}"
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_pool_keeps_at_most_max_idle_connections_and_closes_them_when_idle() {
    let b = TestBackend::start("b").await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &backend_list(&[&b]),
        "pool_max_idle_per_backend = 2\npool_idle_timeout_ms = 2000\n",
    ))
    .await;
    let c = client();
    // Eight requests in flight at once need eight backend connections.
    let slow = proxy.url("/slow?ms=300");
    let burst = (0..8).map(|_| get(&c, &slow));
    for (status, backend, _) in futures_util::future::join_all(burst).await {
        assert_eq!((status, backend.as_str()), (200, "b"));
    }
    assert_eq!(b.accepted(), 8);
    // Returned to the pool: past the cap of 2, the least recently used close.
    wasmlb_tests::wait_until("6 of 8 backend connections closed", || {
        b.open_connections() == 2
    })
    .await;
    // The two kept carry the next requests.
    for _ in 0..3 {
        assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    }
    assert_eq!(b.accepted(), 8, "pooled connections are reused");
    // With no request for pool_idle_timeout_ms, the sweep closes them.
    wasmlb_tests::wait_until("every idle backend connection closed", || {
        b.open_connections() == 0
    })
    .await;
    assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    assert_eq!(b.accepted(), 9);
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_max_idle_zero_closes_each_backend_connection_after_its_response() {
    let b = TestBackend::start("b").await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &backend_list(&[&b]),
        "pool_max_idle_per_backend = 0\n",
    ))
    .await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    }
    assert_eq!(b.accepted(), 3, "no backend connection is reused");
    wasmlb_tests::wait_until("every backend connection closed", || {
        b.open_connections() == 0
    })
    .await;
    assert!(proxy.stop().await);
}
