//! The fault suite: faults outside the request path must not turn into
//! storms of failed requests, ejected backends, descriptors, memory or log
//! lines. Each test is bounded in time and asserts failures, resources (fds,
//! RSS, cache entries) and log volume where the fault could inflate them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wasmlb_tests::{
    InProcessProxy, Launch, ProxyProcess, TestBackend, WAIT, app_config, backend_list, client,
    closed_port, collect, load, plugins,
};

/// Log lines per second of a run, at most, for any fault.
const MAX_LOG_LINES_PER_S: f64 = 10.0;

/// Run `clients` load clients against `url` for `secs`; returns (ok, failed).
async fn run_load(url: &str, clients: usize, secs: u64) -> (usize, usize, Option<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(url.to_string(), clients, stop.clone());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(tasks).await;
    let failed: Vec<_> = seen.iter().filter(|s| s.status != Ok(200)).collect();
    let example = failed.first().map(|s| format!("{:?}", s.status));
    (seen.len() - failed.len(), failed.len(), example)
}

/// The proxy with an admin API (the last address) and its log captured at info.
fn launch_logged(toml: &str) -> ProxyProcess {
    ProxyProcess::launch(
        toml,
        2,
        &Launch {
            capture_log: true,
            log_level: Some("info"),
            ..Launch::default()
        },
    )
}

/// Fewer than [`MAX_LOG_LINES_PER_S`] log lines per second since `started`;
/// returns the lines.
fn assert_quiet(proxy: &ProxyProcess, started: std::time::Instant) -> Vec<String> {
    let lines = proxy.log_lines();
    let rate = lines.len() as f64 / started.elapsed().as_secs_f64();
    assert!(rate < MAX_LOG_LINES_PER_S, "{rate:.1} lines/s: {lines:#?}");
    lines
}

fn admin_url(p: &ProxyProcess, path: &str) -> String {
    format!("http://{}{path}", p.addrs[p.addrs.len() - 1])
}

async fn metric(p: &ProxyProcess, name: &str) -> f64 {
    let text = wasmlb_tests::text(&client(), &admin_url(p, "/metrics")).await;
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Under `RLIMIT_NOFILE` = 256, 400 idle client connections and load: the
/// cap derived from the limit makes the proxy stop accepting instead of
/// failing backend connects; nothing is ejected, no health check fails,
/// and the log stays quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fd_limit_queues_clients_instead_of_failing_them() {
    let backends = TestBackend::start_many(4).await;
    let refs: Vec<_> = backends.iter().collect();
    let toml = format!(
        "[server]\nheader_read_timeout_ms = 500\n\
         [admin]\naddress = \"127.0.0.1:0\"\nmax_connections = 8\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [upstream.app]\nplugin = \"round-robin\"\nbackends = [ {} ]\n\
         [upstream.app.health_check]\ninterval_ms = 200\ntimeout_ms = 1000\n\
         [upstream.app.outlier_detection]\n",
        backend_list(&refs)
    );
    let proxy = ProxyProcess::launch(
        &toml,
        2,
        &Launch {
            wrapper: &["prlimit", "--nofile=256"],
            log_level: Some("info"),
            capture_log: true,
            ..Launch::default()
        },
    );
    let started = std::time::Instant::now();
    let max = metric(&proxy, "wasmlb_connections_max").await;
    // (256 - 32 reserved - 8 admin - 4 health checks - 16 cached plugins) / 2
    assert_eq!(max, 98.0);
    // 400 silent connections: the kernel completes their handshakes; the
    // proxy accepts up to its cap and cuts each at header_read_timeout_ms.
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(TcpStream::connect(proxy.addrs[0]).await.unwrap());
    }
    let (ok, failed, example) = run_load(&proxy.url("/"), 32, 6).await;
    assert!(ok > 0, "no request completed");
    assert!(
        failed * 100 <= ok + failed,
        "{failed} of {} failed (more than 1 %), e.g. {example:?}",
        ok + failed
    );
    let upstreams: serde_json::Value =
        wasmlb_tests::json(&client(), &admin_url(&proxy, "/upstreams/app")).await;
    for b in upstreams["backends"].as_array().unwrap() {
        assert_eq!(b["state"], "healthy", "{b}");
    }
    assert_eq!(metric(&proxy, "wasmlb_outlier_ejections_total").await, 0.0);
    assert!(metric(&proxy, "wasmlb_connections_cap_reached_total").await >= 1.0);
    drop(idle);
    let lines = assert_quiet(&proxy, started);
    for l in &lines {
        assert!(
            !l.contains("ejected") && !l.contains("unreachable") && !l.contains("now unhealthy"),
            "{l}"
        );
    }
}

/// A plugin that traps on every call: the circuit breaker keeps it from
/// being called (and instantiated, and logged) per request; the fallback
/// serves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_trapping_plugin_is_called_a_few_times_not_per_request() {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<_> = backends.iter().collect();
    let toml = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n{}",
        app_config(plugins::TRAP, &backend_list(&refs), "")
    );
    let proxy = launch_logged(&toml);
    let started = std::time::Instant::now();
    let (ok, failed, example) = run_load(&proxy.url("/"), 8, 4).await;
    assert_eq!(failed, 0, "e.g. {example:?}");
    let app: serde_json::Value =
        wasmlb_tests::json(&client(), &admin_url(&proxy, "/upstreams/app")).await;
    let plugin = &app["plugin"];
    assert_eq!(plugin["status"], "failing", "{plugin}");
    let trips = plugin["breaker_trips"].as_u64().unwrap();
    let skipped = plugin["skipped"].as_u64().unwrap();
    // 4 s of backoff from 100 ms doubling: about 6 probes, whatever the load.
    assert!(trips <= 10, "{trips} trips: {plugin}");
    assert!(skipped as usize >= ok - 10, "{skipped} skipped of {ok}");
    assert_eq!(plugin["fallbacks"].as_u64().unwrap() as usize, ok);
    assert_quiet(&proxy, started);
}

/// A backend that sends its response head and part of the body, then
/// nothing: cut at `response_body_timeout_ms`, both connections closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_body_is_cut_at_its_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = s.read(&mut buf).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
            .await
            .unwrap();
        // Stall; the proxy must close the connection.
        let n = s.read(&mut buf).await.unwrap_or(0);
        let _ = closed_tx.send(n);
    });
    let toml = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [upstream.app]\nplugin = \"round-robin\"\nresponse_body_timeout_ms = 300\n\
         backends = [ {{ address = \"{addr}\" }} ]\n"
    );
    let proxy = InProcessProxy::start(&toml).await;
    let r = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = tokio::time::timeout(WAIT, r.bytes())
        .await
        .expect("cut in time");
    assert!(body.is_err(), "a cut body must not look complete");
    let n = tokio::time::timeout(WAIT, closed_rx)
        .await
        .expect("backend connection closed")
        .unwrap();
    assert_eq!(n, 0, "the backend saw EOF");
    assert!(proxy.stop().await);
}

/// A connection that never sends a byte is closed at
/// `header_read_timeout_ms`, not kept for the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_cut_at_the_head_timeout() {
    let backend = TestBackend::start("b0").await;
    let toml = app_config("round-robin", &backend_list(&[&backend]), "").replace(
        "[[listener]]",
        "[server]\nheader_read_timeout_ms = 300\nidle_timeout_ms = 600000\n[[listener]]",
    );
    let proxy = InProcessProxy::start(&toml).await;
    let addr: SocketAddr = proxy.url("").trim_start_matches("http://").parse().unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("closed long before the 600 s idle timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // A connection that does send is served as usual.
    let (status, _, _) = wasmlb_tests::get(&client(), &proxy.url("/")).await;
    assert_eq!(status, 200);
    assert!(proxy.stop().await);
}

/// Two of four backends dead, outlier detection with defaults: both leave
/// rotation (connect failures, `max_fails`), no request fails, and the
/// "not ejected" case is counted, not logged per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dead_backends_both_leave_rotation_quietly() {
    let live = TestBackend::start_many(2).await;
    let dead = [closed_port(), closed_port()];
    let list = format!(
        "{}, {{ address = \"{}\" }}, {{ address = \"{}\" }}",
        backend_list(&[&live[0], &live[1]]),
        dead[0],
        dead[1]
    );
    let toml = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n{}[upstream.app.outlier_detection]\n",
        app_config("round-robin", &list, "")
    );
    let proxy = launch_logged(&toml);
    let started = std::time::Instant::now();
    let (ok, failed, example) = run_load(&proxy.url("/"), 8, 3).await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed, e.g. {example:?}",
        ok + failed
    );
    let app: serde_json::Value =
        wasmlb_tests::json(&client(), &admin_url(&proxy, "/upstreams/app")).await;
    for b in app["backends"].as_array().unwrap() {
        let address: SocketAddr = b["address"].as_str().unwrap().parse().unwrap();
        if dead.contains(&address) {
            assert_eq!(b["state"], "unreachable", "{b}");
        }
    }
    assert_quiet(&proxy, started);
}

/// A component with `tag` appended as a custom section: a distinct digest,
/// the same behavior.
fn distinct_component(base: &[u8], tag: usize) -> Vec<u8> {
    let name = b"wasmlb-test";
    let payload = tag.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    let mut out = base.to_vec();
    out.push(0); // custom section
    out.push(u8::try_from(size).expect("a short section"));
    out.push(u8::try_from(name.len()).expect("a short name"));
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

/// Many distinct uploads: the compiled-component cache stays within its
/// bound, and so do descriptors (each compiled image holds a memfd) and RSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_distinct_uploads_stay_within_the_cache_bound() {
    let backend = TestBackend::start("b0").await;
    let toml = format!(
        "[server]\nplugin_cache_entries = 3\n[admin]\naddress = \"127.0.0.1:0\"\n{}",
        app_config("round-robin", &backend_list(&[&backend]), "")
    );
    let proxy = ProxyProcess::launch(&toml, 2, &Launch::default());
    let base = wasmlb::builtin::get("round-robin").unwrap().to_vec();
    let c = client();
    let mut fds = Vec::new();
    let mut rss = Vec::new();
    for i in 0..10 {
        let r = c
            .put(admin_url(&proxy, "/upstreams/app/plugin"))
            .body(distinct_component(&base, i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        let (status, _, _) = wasmlb_tests::get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200);
        fds.push(proxy.fds());
        rss.push(proxy.memory_kib("VmRSS"));
    }
    assert!(metric(&proxy, "wasmlb_plugin_cache_entries").await <= 3.0);
    // Once the cache is full, descriptors stop growing (a small allowance
    // for pooled connections), and so does memory (generously bounded).
    let (early, late) = (fds[4], fds[9]);
    assert!(
        late <= early + 4,
        "fds grew from {early} to {late}: {fds:?}"
    );
    let (early, late) = (rss[4], rss[9]);
    assert!(
        late <= early + early / 5,
        "RSS grew from {early} to {late} KiB: {rss:?}"
    );
}

/// Long-lived HTTP/2 connections under load: memory levels off instead of
/// growing with the request count (a 10-minute run is in the README; this
/// is the bounded regression guard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_h2_connections_keep_memory_flat() {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy = ProxyProcess::spawn(&app_config("round-robin", &backend_list(&refs), ""), 1);
    let url = proxy.url("/");
    let stop = Arc::new(AtomicBool::new(false));
    // Four connections (one client each), ten streams in flight on each.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let c = wasmlb_tests::h2c_client();
                let mut failed = 0usize;
                let mut done = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<_> = (0..10).map(|_| c.get(&url).send()).collect();
                    for r in futures_util::future::join_all(batch).await {
                        let ok = match r {
                            Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                            Err(_) => false,
                        };
                        if ok {
                            done += 1;
                        } else {
                            failed += 1;
                        }
                    }
                }
                (done, failed)
            })
        })
        .collect();
    // Warm up (allocator arenas, pools), then sample.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let early = proxy.memory_kib("VmRSS");
    tokio::time::sleep(Duration::from_secs(9)).await;
    let late = proxy.memory_kib("VmRSS");
    stop.store(true, Ordering::Relaxed);
    let (mut done, mut failed) = (0, 0);
    for t in tasks {
        let (d, f) = t.await.unwrap();
        done += d;
        failed += f;
    }
    assert_eq!(failed, 0);
    assert!(done > 1000, "{done} requests");
    assert!(
        late <= early + early / 5,
        "RSS grew from {early} to {late} KiB over {done} requests"
    );
}

/// Resident memory of the proxy process per idle keep-alive connection, after
/// `n` connections each made one request and stayed open (one more is
/// opened before the baseline). Polls for up to 5 s, until the figure is at
/// most `bound`, while the connections park and freed memory goes back to
/// the OS; returns the last figure in KiB, and the connections.
async fn idle_kib_per_connection(
    proxy: &ProxyProcess,
    n: usize,
    bound: f64,
) -> (f64, Vec<TcpStream>) {
    async fn one_request(address: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(address).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"hello from idle") {
            let k = s.read(&mut buf).await.expect("read");
            assert!(k > 0, "closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..k]);
        }
        s
    }
    let mut open = vec![one_request(proxy.addrs[0]).await];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let baseline = proxy.memory_kib("VmRSS");
    for _ in 0..n {
        open.push(one_request(proxy.addrs[0]).await);
    }
    let mut per = f64::INFINITY;
    for _ in 0..20 {
        per = proxy.memory_kib("VmRSS").saturating_sub(baseline) as f64 / n as f64;
        if per <= bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (per, open)
}

/// Idle keep-alive connections are small: once parked, a connection holds
/// its socket, task and timer, not hyper's 8 KiB read and 8 KiB write
/// buffers (which 250 connections would hold as about 4 MiB). And the binary
/// runs on jemalloc with its background purging thread (`.cargo/config.toml`),
/// which gives freed memory back to the OS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_a_few_kib_each() {
    let backend = TestBackend::start("idle").await;
    let proxy = ProxyProcess::spawn(
        &app_config("round-robin", &backend_list(&[&backend]), ""),
        1,
    );
    // About 2.4 KiB in a release build, 5 in a debug one (larger futures);
    // an unparked connection holds 16 KiB of buffers alone.
    const BOUND_KIB: f64 = 8.0;
    let (per, open) = idle_kib_per_connection(&proxy, 250, BOUND_KIB).await;
    assert!(per <= BOUND_KIB, "{per:.2} KiB per idle connection");
    eprintln!("{per:.2} KiB per idle connection");
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", proxy.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    assert!(
        threads.iter().any(|t| t.starts_with("jemalloc_bg")),
        "no jemalloc background thread: {threads:?}"
    );
    drop(open);
}
