//! Request integrity and safe defaults through the real proxy: client
//! faults are the client's (400, never counted against a backend), error
//! bodies name no backend, and with the default config a backend refusing
//! connections costs no request. (The raw framing and body cases are in
//! the conformance corpus, `conformance.rs`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmlb_tests::{
    InProcessProxy, TestBackend, app_config, backend_list, client, closed_port, collect, get, json,
    load, text,
};

/// Send raw bytes, half-close, and return the status line's code (0 if none).
async fn raw_status(addr: std::net::SocketAddr, bytes: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    std::str::from_utf8(out.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_body_faults_are_400_and_never_eject_a_backend() {
    let backends = TestBackend::start_many(2).await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &backend_list(&[&backends[0], &backends[1]]),
        "[upstream.app.outlier_detection]\nconsecutive_5xx = 3\n\n[admin]\naddress = \"127.0.0.1:0\"\n",
    ))
    .await;
    let addr = proxy.addrs[0];
    // The scenario: six malformed chunked POSTs from one client
    // used to eject a healthy backend. Send 30 of several shapes.
    let garbage: [&[u8]; 3] = [
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        b"PUT /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
    ];
    for i in 0..30 {
        let status = raw_status(addr, garbage[i % 3]).await;
        assert!(
            status == 400 || status == 0,
            "client fault answered {status}"
        );
    }
    let app: Value = json(&client(), &proxy.admin_url("/upstreams/app")).await;
    for b in app["backends"].as_array().expect("backends") {
        assert_eq!(b["state"], "healthy", "{app}");
        assert_eq!(b["ejections"], 0, "{app}");
    }
    let metrics = text(&client(), &proxy.admin_url("/metrics")).await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.contains("class=\"5xx\"") && !l.ends_with(" 0")),
        "client faults counted as 5xx:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("backend=\"none\"") && l.contains("class=\"4xx\"")),
        "client faults not counted as 4xx:\n{metrics}"
    );
    // Healthy traffic still flows to both.
    for _ in 0..4 {
        assert_eq!(get(&client(), &proxy.url("/")).await.0, 200);
    }
    assert!(backends.iter().all(|b| b.hits() > 0));
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_name_no_backend_but_debug_headers_do() {
    let dead = closed_port();
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &format!("{{ address = \"{dead}\" }}"),
        "",
    ))
    .await;
    let (status, _, body) = get(&client(), &proxy.url("/")).await;
    assert_eq!(status, 502);
    assert!(body.contains("could not be reached"), "{body}");
    for leak in [
        dead.to_string(),
        dead.port().to_string(),
        "127.0.0.1".into(),
    ] {
        assert!(!body.contains(&leak), "{body} names {leak}");
    }
    assert!(proxy.stop().await);

    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &format!("{{ address = \"{dead}\" }}"),
        "debug_headers = true",
    ))
    .await;
    let r = client().get(proxy.url("/")).send().await.expect("response");
    let error = r
        .headers()
        .get("x-wasmlb-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("connect"), "x-wasmlb-error: {error:?}");
    assert!(proxy.stop().await);
}

/// `clients` tasks POSTing a small body to `url` until `stop`; statuses.
fn post_load(
    url: String,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    (0..clients)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) && statuses.len() < 100_000 {
                    let status = match c.post(&url).body("payload").send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    statuses.push(status);
                }
                statuses
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_costs_no_request_with_the_default_config() {
    let live = TestBackend::start_many(3).await;
    let dead = closed_port();
    let backends = format!(
        "{}, {{ address = \"{dead}\" }}",
        backend_list(&[&live[0], &live[1], &live[2]])
    );
    // Default failure handling; only fail_timeout_ms shortened so the
    // test also sees the backend come back within its window.
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &backends,
        "fail_timeout_ms = 1000\n\n[admin]\naddress = \"127.0.0.1:0\"\n",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let gets = load(proxy.url("/"), 8, stop.clone());
    let posts = post_load(proxy.url("/"), 8, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(gets).await;
    let mut post_statuses = Vec::new();
    for t in posts {
        post_statuses.extend(t.await.expect("post task"));
    }
    let failed_gets = seen.iter().filter(|s| s.status != Ok(200)).count();
    let failed_posts = post_statuses.iter().filter(|&&s| s != 200).count();
    println!(
        "dead backend, default config: {failed_gets} of {} GETs and {failed_posts} of {} POSTs failed",
        seen.len(),
        post_statuses.len()
    );
    assert!(seen.len() > 100 && post_statuses.len() > 100);
    assert_eq!(failed_gets, 0, "GETs failed");
    assert_eq!(failed_posts, 0, "POSTs failed");
    let app: Value = json(&client(), &proxy.admin_url("/upstreams/app")).await;
    assert!(
        matches!(
            app["backends"][3]["state"].as_str(),
            Some("unreachable" | "healthy")
        ),
        "{app}"
    );
    // The backend comes back: within fail_timeout_ms it is tried again and
    // gets traffic.
    let revived = tokio::net::TcpListener::bind(dead).await;
    let Ok(revived) = revived else {
        // The port was taken by someone else meanwhile: nothing to revive.
        assert!(proxy.stop().await);
        return;
    };
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let h = hits.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = revived.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    h.fetch_add(1, Ordering::Relaxed);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while hits.load(Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never tried again");
        assert_eq!(get(&client(), &proxy.url("/")).await.0, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.abort();
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_fails_zero_turns_the_default_ejection_off() {
    let live = TestBackend::start("b0").await;
    let dead = closed_port();
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &format!("{}, {{ address = \"{dead}\" }}", backend_list(&[&live])),
        "max_fails = 0\nretries = 0\n\n[admin]\naddress = \"127.0.0.1:0\"\n",
    ))
    .await;
    let mut failed = 0;
    for _ in 0..10 {
        if get(&client(), &proxy.url("/")).await.0 != 200 {
            failed += 1;
        }
    }
    // Round robin over one live and one dead backend, no retries, no
    // ejection: every other request fails.
    assert_eq!(failed, 5);
    let app: Value = json(&client(), &proxy.admin_url("/upstreams/app")).await;
    assert_eq!(app["backends"][1]["state"], "healthy", "{app}");
    assert!(proxy.stop().await);
}
