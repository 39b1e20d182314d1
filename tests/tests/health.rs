//! Active health checks: a backend failing its checks stops receiving
//! requests (the plugin is told), and receives them again once it passes.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use wasmlb_tests::{InProcessProxy, TestBackend, app_config, backend_list, client, get, json};

/// Poll the admin API (bounded) until backend `id` of `app` is in `state`.
async fn wait_for_state(proxy: &InProcessProxy, id: usize, state: &str) {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let app: Value = json(&c, &proxy.admin_url("/upstreams/app")).await;
        if app["backends"][id]["state"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {id} never became {state}: {app}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config(backends: &str, kind: &str) -> String {
    let extra = format!(
        "[upstream.app.health_check]\nkind = \"{kind}\"\npath = \"/healthz\"\ninterval_ms = 50\ntimeout_ms = 500\n\
         healthy_threshold = 2\nunhealthy_threshold = 2\n\n[admin]\naddress = \"127.0.0.1:0\"\n"
    );
    app_config("round-robin", backends, &extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_removes_and_readmits_a_backend() {
    let backends = TestBackend::start_many(3).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy = InProcessProxy::start(&config(&backend_list(&refs), "http")).await;
    let c = client();

    backends[1].set_healthy(false);
    wait_for_state(&proxy, 1, "unhealthy").await;
    let before = backends[1].hits();
    for _ in 0..30 {
        let (status, backend, _) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200);
        assert_ne!(backend, "b1");
    }
    assert_eq!(backends[1].hits(), before);
    // The plugin itself skipped it: no request went through the fallback.
    assert_eq!(
        proxy
            .upstream("app")
            .stats()
            .fallbacks
            .load(Ordering::Relaxed),
        0
    );

    backends[1].set_healthy(true);
    wait_for_state(&proxy, 1, "healthy").await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(get(&c, &proxy.url("/")).await.1);
    }
    assert_eq!(seen.iter().filter(|b| *b == "b1").count(), 2, "{seen:?}");
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_removes_a_stopped_backend() {
    let mut backends = TestBackend::start_many(3).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy = InProcessProxy::start(&config(&backend_list(&refs), "tcp")).await;
    let c = client();
    drop(backends.remove(2)); // stops listening
    wait_for_state(&proxy, 2, "unhealthy").await;
    for _ in 0..20 {
        let (status, backend, _) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200, "no request is sent to the stopped backend");
        assert_ne!(backend, "b2");
    }
    assert!(proxy.stop().await);
}

/// `PUT /upstreams/app/backends/{backend}/state` with `state`; the answer.
async fn set_state(proxy: &InProcessProxy, backend: &str, state: &str) -> Value {
    let r = client()
        .put(proxy.admin_url(&format!("/upstreams/app/backends/{backend}/state")))
        .body(state.to_string())
        .send()
        .await
        .expect("admin request");
    assert_eq!(r.status(), 200);
    serde_json::from_str(&r.text().await.expect("body")).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_through_the_admin_api_lets_in_flight_requests_finish() {
    let backends = TestBackend::start_many(3).await;
    let refs: Vec<_> = backends.iter().collect();
    let extra = "[admin]\naddress = \"127.0.0.1:0\"\n";
    let proxy =
        InProcessProxy::start(&app_config("round-robin", &backend_list(&refs), extra)).await;
    let c = client();
    // Round-robin: the first request goes to b0, the second (slow) to b1.
    assert_eq!(get(&c, &proxy.url("/")).await.1, "b0");
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/slow?ms=1500"));
        async move { get(&c, &url).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.upstream("app").backends()[1]
        .live
        .in_flight
        .load(Ordering::Relaxed)
        == 0
    {
        assert!(Instant::now() < deadline, "the slow request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let answer = set_state(&proxy, &backends[1].addr.to_string(), "drain").await;
    assert_eq!(answer["state"], "drain", "{answer}");
    assert_eq!(answer["in_flight"], 1);
    let hits = backends[1].hits();
    for _ in 0..30 {
        let (status, backend, _) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200);
        assert_ne!(backend, "b1", "no new request reaches a drained backend");
    }
    assert_eq!(backends[1].hits(), hits);
    let (status, backend, body) = slow.await.expect("slow request");
    assert_eq!((status, backend.as_str()), (200, "b1"), "{body}");
    wait_for_state(&proxy, 1, "drained").await;

    // maint takes it out too; ready brings it back.
    let answer = set_state(&proxy, "1", "maint").await;
    assert_eq!(answer["admin_state"], "maint");
    set_state(&proxy, "1", "ready").await;
    let seen: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(get(&c, &proxy.url("/")).await.1);
        }
        v
    };
    assert_eq!(seen.iter().filter(|b| *b == "b1").count(), 2, "{seen:?}");

    let bad = client()
        .put(proxy.admin_url("/upstreams/app/backends/1/state"))
        .body("sleeping")
        .send()
        .await
        .expect("admin request");
    assert_eq!(bad.status(), 422);
    assert!(
        bad.text()
            .await
            .unwrap_or_default()
            .contains("expected ready, drain or maint")
    );
    let missing = client()
        .put(proxy.admin_url("/upstreams/app/backends/127.0.0.1:1/state"))
        .body("drain")
        .send()
        .await
        .expect("admin request");
    assert_eq!(missing.status(), 404);
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readmitted_backend_ramps_up_over_the_slow_start_window() {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<_> = backends.iter().collect();
    let extra = "slow_start_ms = 3000\n[upstream.app.health_check]\npath = \"/healthz\"\n\
                 interval_ms = 50\ntimeout_ms = 500\nhealthy_threshold = 1\nunhealthy_threshold = 1\n\n\
                 [admin]\naddress = \"127.0.0.1:0\"\n";
    let proxy =
        InProcessProxy::start(&app_config("round-robin", &backend_list(&refs), extra)).await;
    let c = client();
    backends[1].set_healthy(false);
    wait_for_state(&proxy, 1, "unhealthy").await;
    backends[1].set_healthy(true);
    wait_for_state(&proxy, 1, "healthy").await;

    // Sample b1's share of 100 requests, with its effective weight, until the
    // ramp is over (bounded).
    let mut samples: Vec<(u64, f64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let app: Value = json(&c, &proxy.admin_url("/upstreams/app")).await;
        let weights = (
            app["backends"][0]["effective_weight"].as_u64().unwrap_or(0),
            app["backends"][1]["effective_weight"].as_u64().unwrap_or(0),
        );
        let mut b1 = 0;
        for _ in 0..100 {
            b1 += usize::from(get(&c, &proxy.url("/")).await.1 == "b1");
        }
        samples.push((weights.1, b1 as f64 / 100.0));
        if weights.0 == weights.1 || Instant::now() > deadline {
            break;
        }
    }
    println!("slow start samples (b1 effective weight, b1 share): {samples:?}");
    let (first_weight, first_share) = samples[0];
    let (last_weight, last_share) = samples[samples.len() - 1];
    assert!(
        samples.len() >= 3,
        "the ramp takes several samples: {samples:?}"
    );
    assert!(
        first_weight < 100,
        "it starts below full weight: {samples:?}"
    );
    assert!(
        first_share < 0.35,
        "not its full share at once: {samples:?}"
    );
    assert_eq!(last_weight, 1, "the ramp ends at the configured weight");
    assert!(last_share > 0.45, "full share at the end: {samples:?}");
    assert!(
        samples.windows(2).all(|w| w[1].0 >= w[0].0 || w[1].0 == 1),
        "the effective weight only rises: {samples:?}"
    );
    assert!(proxy.stop().await);
}
