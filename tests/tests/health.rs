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
