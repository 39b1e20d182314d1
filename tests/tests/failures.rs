//! Routing around failure with real processes: a backend SIGKILLed or
//! SIGSTOPped under load, retries that never send a POST twice, outlier
//! ejection and the panic threshold. Load phases are bounded: 16 clients
//! for 10 s at most ([`wasmlb_tests::LOAD_MAX_PER_CLIENT`] requests each).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use wasmlb_tests::{
    BackendProcess, InProcessProxy, Mode, Seen, TestBackend, app_config, backend_list, client,
    closed_port, collect, json, load,
};

const CLIENTS: usize = 16;
const LOAD: Duration = Duration::from_secs(10);

fn process_backends(n: usize) -> Vec<BackendProcess> {
    (0..n).map(|_| BackendProcess::spawn()).collect()
}

fn address_list(backends: &[BackendProcess]) -> String {
    backends
        .iter()
        .map(|b| format!("{{ address = \"{}\" }}", b.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Debug headers (the client sees which backend served it), the admin API,
/// outlier detection, fast health checks, and a select deadline generous
/// enough for a loaded 2-core machine.
fn resilient(backends: &str, extra: &str) -> String {
    app_config(
        "round-robin",
        backends,
        &format!(
            "debug_headers = true\nplugin_deadline_ms = 100\n{extra}\n\
             [upstream.app.outlier_detection]\nconsecutive_5xx = 3\nbase_ejection_time_ms = 2000\n\n\
             [upstream.app.health_check]\npath = \"/\"\ninterval_ms = 200\ntimeout_ms = 300\n\
             healthy_threshold = 2\nunhealthy_threshold = 2\n\n\
             [admin]\naddress = \"127.0.0.1:0\"\n"
        ),
    )
}

fn failures(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter().filter(|s| s.status != Ok(200)).collect()
}

/// Milliseconds from `t0` until backend `id` of `app` is no longer offered
/// to the plugin, polling the admin API (bounded).
async fn time_until_unselectable(proxy: &InProcessProxy, id: usize, t0: Instant) -> Duration {
    let c = client();
    loop {
        let app: Value = json(&c, &proxy.admin_url("/upstreams/app")).await;
        if app["backends"][id]["selectable"] == false {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "never ejected: {app}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_backend_under_load_fails_no_request() {
    let backends = process_backends(4);
    let proxy = InProcessProxy::start(&resilient(&address_list(&backends), "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(proxy.url("/"), CLIENTS, stop.clone());
    tokio::time::sleep(LOAD / 3).await;
    let killed_at = Instant::now();
    backends[2].signal("KILL");
    let to_eject = time_until_unselectable(&proxy, 2, killed_at).await;
    tokio::time::sleep(LOAD.saturating_sub(LOAD / 3 + to_eject)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(tasks).await;

    let failed = failures(&seen);
    let dead = backends[2].addr.to_string();
    let after = seen
        .iter()
        .filter(|s| s.started > killed_at + to_eject + Duration::from_millis(50))
        .filter(|s| s.address == dead)
        .count();
    let retries = proxy.upstream("app").metrics().retries.get();
    println!(
        "SIGKILL: {} requests, {} failed, {retries} retried, backend out of rotation after {} ms",
        seen.len(),
        failed.len(),
        to_eject.as_millis()
    );
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(after, 0, "no request is served by the killed backend");
    assert!(seen.len() > 1000, "the load ran: {}", seen.len());
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_times_out_is_retried_ejected_and_readmitted_after_sigcont() {
    let backends = process_backends(4);
    let proxy = InProcessProxy::start(&resilient(
        &address_list(&backends),
        "response_timeout_ms = 500",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(proxy.url("/"), CLIENTS, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped_at = Instant::now();
    backends[1].signal("STOP");
    let to_eject = time_until_unselectable(&proxy, 1, stopped_at).await;
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(to_eject)).await;
    let resumed_at = Instant::now();
    backends[1].signal("CONT");
    tokio::time::sleep(LOAD - Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(tasks).await;

    let failed = failures(&seen);
    let paused = backends[1].addr.to_string();
    let served_again = seen
        .iter()
        .filter(|s| s.started > resumed_at && s.address == paused && s.status == Ok(200))
        .count();
    let up = proxy.upstream("app");
    println!(
        "SIGSTOP: {} requests, {} failed, {} retried, {} ejections, out of rotation after {} ms, \
         {served_again} served by it after SIGCONT",
        seen.len(),
        failed.len(),
        up.metrics().retries.get(),
        up.metrics().ejections.get(),
        to_eject.as_millis()
    );
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        up.metrics().retries.get() > 0,
        "requests to the stopped backend timed out and were retried"
    );
    assert!(served_again > 0, "readmitted after SIGCONT once healthy");
    assert!(proxy.stop().await);
}

/// Send `method /upload` with `x-request-id: id` and `body`; the status.
async fn send(c: &reqwest::Client, url: &str, method: &str, id: &str, body: Vec<u8>) -> u16 {
    c.request(method.parse().expect("method"), url)
        .header("x-request-id", id)
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_whose_body_was_sent_is_never_sent_twice() {
    let ok = TestBackend::start("ok").await;
    let dropper = TestBackend::start("dropper").await;
    dropper.set_mode(Mode::Drop);
    let dead = closed_port();
    let backends = format!(
        "{{ address = \"{dead}\" }}, {}",
        backend_list(&[&ok, &dropper])
    );
    // max_fails = 0: the closed port stays in rotation (by default one
    // refused connect takes it out), so every third POST meets it.
    let proxy = InProcessProxy::start(&app_config("round-robin", &backends, "max_fails = 0")).await;
    let c = client();
    let url = proxy.url("/upload");
    let mut statuses = HashMap::new();
    for i in 0..60 {
        let id = format!("post-{i}");
        let status = send(&c, &url, "POST", &id, vec![b'x'; 1000]).await;
        statuses.insert(id, status);
    }
    let mut received: Vec<String> = ok.ids();
    received.extend(dropper.ids());
    let unique: HashSet<&String> = received.iter().collect();
    assert_eq!(
        unique.len(),
        received.len(),
        "a POST reached backends twice"
    );
    for (id, status) in &statuses {
        let times = received.iter().filter(|r| *r == id).count();
        assert_eq!(times, 1, "{id} ({status}) was received {times} times");
        match status {
            200 => assert!(ok.ids().contains(id)),
            502 => assert!(dropper.ids().contains(id)),
            other => panic!("{id}: unexpected status {other}"),
        }
    }
    // Those first sent to the closed port were retried (never sent there).
    assert!(ok.ids().len() >= 20 && dropper.ids().len() >= 20);
    assert!(proxy.upstream("app").metrics().retries.get() >= 20);

    // An idempotent PUT whose connection broke is retried, its body replayed
    // whole; one larger than retry_buffer_bytes is not.
    let before = ok.ids().len();
    let mut retried = 0;
    for i in 0..6 {
        let id = format!("put-{i}");
        if send(&c, &url, "PUT", &id, vec![b'p'; 10_000]).await == 200 {
            retried += usize::from(dropper.ids().contains(&id));
        }
    }
    assert!(
        retried >= 1,
        "a PUT dropped by one backend succeeded on another"
    );
    assert_eq!(
        ok.ids().len() - before,
        6,
        "every PUT ended on the good backend"
    );
    let big = send(&c, &url, "PUT", "big", vec![b'p'; 200_000]).await;
    let big2 = send(&c, &url, "PUT", "big2", vec![b'p'; 200_000]).await;
    assert!(
        big == 502 || big2 == 502,
        "a PUT too large to replay is not retried ({big}, {big2})"
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_500s_eject_and_the_panic_threshold_keeps_traffic_flowing() {
    let backends = TestBackend::start_many(3).await;
    let refs: Vec<_> = backends.iter().collect();
    let extra = "[upstream.app.outlier_detection]\nconsecutive_5xx = 3\nbase_ejection_time_ms = 60000\n\
                 max_ejection_percent = 100\n\n[admin]\naddress = \"127.0.0.1:0\"\n";
    let proxy =
        InProcessProxy::start(&app_config("round-robin", &backend_list(&refs), extra)).await;
    let c = client();
    backends[1].set_mode(Mode::Status(500));
    for _ in 0..9 {
        c.get(proxy.url("/")).send().await.expect("request");
    }
    let app: Value = json(&c, &proxy.admin_url("/upstreams/app")).await;
    assert_eq!(app["backends"][1]["state"], "ejected", "{app}");
    assert_eq!(app["panic"], false);
    let hits = backends[1].hits();
    for _ in 0..20 {
        let r = c.get(proxy.url("/")).send().await.expect("request");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(backends[1].hits(), hits, "the ejected backend gets nothing");

    // All answer 500: more are ejected until fewer than half are left, then
    // panic mode offers every backend again instead of failing with 503.
    for b in &backends {
        b.set_mode(Mode::Status(500));
    }
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(
            c.get(proxy.url("/"))
                .send()
                .await
                .expect("request")
                .status()
                .as_u16(),
        );
    }
    let app: Value = json(&c, &proxy.admin_url("/upstreams/app")).await;
    assert_eq!(app["panic"], true, "{app}");
    assert!(
        !statuses.contains(&503),
        "never 'no backend available': {statuses:?}"
    );
    let before: Vec<u64> = backends.iter().map(TestBackend::hits).collect();
    backends[0].set_mode(Mode::Normal);
    let mut ok = 0;
    for _ in 0..30 {
        ok += usize::from(
            c.get(proxy.url("/"))
                .send()
                .await
                .expect("request")
                .status()
                == 200,
        );
    }
    for (b, before) in backends.iter().zip(before) {
        assert!(
            b.hits() > before,
            "{} still gets traffic in panic mode",
            b.name
        );
    }
    assert!(ok >= 9, "the recovered backend serves its share: {ok}");
    assert!(proxy.stop().await);
}
