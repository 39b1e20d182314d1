//! Distribution over real backends through the real proxy.

use std::collections::HashMap;
use std::time::Duration;

use wasmlb_tests::{InProcessProxy, TestBackend, app_config, backend_list, client, get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_sequential_gives_exactly_a_quarter_each() {
    let backends = TestBackend::start_many(4).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy = InProcessProxy::start(&app_config("round-robin", &backend_list(&refs), "")).await;
    let c = client();
    let mut order = Vec::new();
    for _ in 0..100 {
        let (status, backend, body) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, format!("hello from {backend}"));
        order.push(backend);
    }
    for b in &backends {
        assert_eq!(b.hits(), 25, "{}: {}", b.name, b.hits());
    }
    assert_eq!(&order[..4], &["b0", "b1", "b2", "b3"]);
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_weights_one_to_three_give_25_75() {
    let backends = TestBackend::start_many(2).await;
    let list = format!(
        r#"{{ address = "{}", weight = 1 }}, {{ address = "{}", weight = 3 }}"#,
        backends[0].addr, backends[1].addr
    );
    let proxy = InProcessProxy::start(&app_config("round-robin", &list, "")).await;
    let c = client();
    for _ in 0..100 {
        assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    }
    assert_eq!((backends[0].hits(), backends[1].hits()), (25, 75));
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_global_across_16_concurrent_clients() {
    let backends = TestBackend::start_many(4).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy = InProcessProxy::start(&app_config("round-robin", &backend_list(&refs), "")).await;
    let url = proxy.url("/");
    let per_client = 100;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client(); // one connection per client
            let mut seen = HashMap::<String, u32>::new();
            for _ in 0..per_client {
                let (status, backend, _) = get(&c, &url).await;
                assert_eq!(status, 200);
                *seen.entry(backend).or_default() += 1;
            }
            seen
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = 16 * per_client as u64;
    for b in &backends {
        let share = b.hits() as f64 / total as f64;
        assert!(
            (share - 0.25).abs() <= 0.02 * 0.25 + f64::EPSILON,
            "{}: {} of {total}",
            b.name,
            b.hits()
        );
    }
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_the_backend_holding_slow_requests() {
    let backends = TestBackend::start_many(3).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy =
        InProcessProxy::start(&app_config("least-connections", &backend_list(&refs), "")).await;
    let upstream = proxy.upstream("app");
    let c = client();
    let slow_url = proxy.url("/slow?ms=1500");
    let mut slow = Vec::new();
    for _ in 0..3 {
        let c = c.clone();
        let u = slow_url.clone();
        slow.push(tokio::spawn(async move { get(&c, &u).await }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three slow requests, one per backend (least-connections spreads them).
    let in_flight: Vec<u32> = upstream
        .backends()
        .iter()
        .map(|b| b.live.in_flight.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert_eq!(in_flight, vec![1, 1, 1]);
    // Two more slow requests land on b0 and b1, leaving b2 the least loaded.
    for _ in 0..2 {
        let c = c.clone();
        let u = slow_url.clone();
        slow.push(tokio::spawn(async move { get(&c, &u).await }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before: Vec<u64> = backends.iter().map(TestBackend::hits).collect();
    for _ in 0..10 {
        let (status, backend, _) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200);
        assert_eq!(
            backend, "b2",
            "fast requests must avoid the backends holding slow ones"
        );
    }
    assert_eq!(backends[2].hits() - before[2], 10);
    for s in slow {
        assert_eq!(s.await.unwrap().0, 200);
    }
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_by_weight_over_real_backends() {
    let backends = TestBackend::start_many(2).await;
    let list = format!(
        r#"{{ address = "{}", weight = 1 }}, {{ address = "{}", weight = 3 }}"#,
        backends[0].addr, backends[1].addr
    );
    let extra = "[upstream.app.plugin_config]\nseed = 7\n";
    let proxy = InProcessProxy::start(&app_config("random", &list, extra)).await;
    let c = client();
    for _ in 0..400 {
        assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    }
    // Binomial(400, 1/4): mean 100, standard deviation 8.7.
    let light = backends[0].hits();
    assert!((65..=135).contains(&light), "b0 served {light} of 400");
    assert_eq!(light + backends[1].hits(), 400);
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_requests_away_from_the_backend_holding_a_slow_one() {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy = InProcessProxy::start(&app_config("p2c", &backend_list(&refs), "")).await;
    let c = client();
    let slow = {
        let (c, u) = (c.clone(), proxy.url("/slow?ms=1500"));
        tokio::spawn(async move { get(&c, &u).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let busy = backends
        .iter()
        .position(|b| b.hits() == 1)
        .expect("the slow request reached a backend");
    let idle = 1 - busy;
    // With two backends both are always drawn: the idle one always wins.
    for _ in 0..20 {
        let (status, backend, _) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200);
        assert_eq!(backend, backends[idle].name);
    }
    assert_eq!(slow.await.unwrap().0, 200);
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_keeps_a_client_on_one_backend() {
    let backends = TestBackend::start_many(4).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy = InProcessProxy::start(&app_config("ip-hash", &backend_list(&refs), "")).await;
    for _ in 0..40 {
        // A fresh connection (new source port) each time: only the address counts.
        let (status, _, _) = get(&client(), &proxy.url("/")).await;
        assert_eq!(status, 200);
    }
    let mut hits: Vec<u64> = backends.iter().map(TestBackend::hits).collect();
    hits.sort_unstable();
    assert_eq!(hits, vec![0, 0, 0, 40]);
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_and_ring_hash_on_a_header_keep_each_user_on_one_backend() {
    for plugin in ["maglev", "ring-hash"] {
        let backends = TestBackend::start_many(4).await;
        let refs: Vec<_> = backends.iter().collect();
        let extra = "[upstream.app.plugin_config]\nhash_on = \"header\"\nname = \"x-user\"\n";
        let proxy = InProcessProxy::start(&app_config(plugin, &backend_list(&refs), extra)).await;
        let c = client();
        let mut user_backend = HashMap::new();
        for round in 0..3 {
            for user in 0..40 {
                let r = c
                    .get(proxy.url("/"))
                    .header("x-user", format!("user-{user}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let backend = r.headers()["x-backend"].to_str().unwrap().to_string();
                let first = user_backend.entry(user).or_insert_with(|| backend.clone());
                assert_eq!(
                    *first,
                    backend,
                    "{plugin}: user-{user} moved in round {round}; upstream: {:?}",
                    proxy.upstream("app").snapshot()
                );
            }
        }
        // 40 users over 4 backends: every backend has some.
        for b in &backends {
            assert!(
                b.hits() >= 3,
                "{plugin}: {} served {} of 120",
                b.name,
                b.hits()
            );
        }
        assert!(proxy.stop().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_gets_its_share_and_the_header_forces_it() {
    let backends = TestBackend::start_many(4).await;
    let list = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let group = if i == 3 { "canary" } else { "stable" };
            format!(
                r#"{{ address = "{}", labels = {{ group = "{group}" }} }}"#,
                b.addr
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let extra = "[upstream.app.plugin_config]\nweights = { stable = 90, canary = 10 }\n";
    let proxy = InProcessProxy::start(&app_config("canary", &list, extra)).await;
    let c = client();
    for _ in 0..100 {
        assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    }
    assert_eq!(backends[3].hits(), 10, "the canary's 10 %");
    for b in &backends[..3] {
        assert_eq!(b.hits(), 30, "{}", b.name);
    }
    for _ in 0..5 {
        let r = c
            .get(proxy.url("/"))
            .header("x-canary", "always")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-backend"], backends[3].name.as_str());
    }
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_a_slow_backend_after_its_first_slow_response() {
    let backends = TestBackend::start_many(3).await;
    backends[2].set_mode(wasmlb_tests::Mode::Delay(150));
    let refs: Vec<_> = backends.iter().collect();
    let proxy = InProcessProxy::start(&app_config("peak-ewma", &backend_list(&refs), "")).await;
    let c = client();
    for _ in 0..60 {
        assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    }
    // Until the fast backends are measured, the slow one may be drawn and win
    // a tie; once it is measured (150 ms against about 1 ms) it never wins.
    let slow = backends[2].hits();
    assert!(slow <= 3, "the slow backend served {slow} of 60");
    // The host's estimates, as the admin API shows them.
    let snapshot = proxy.upstream("app").snapshot();
    for b in &snapshot.backends[..2] {
        assert!(b.rtt_ms > 0.0 && b.rtt_ms < 150.0, "{b:?}");
    }
    if slow > 0 {
        assert!(
            snapshot.backends[2].rtt_ms >= 150.0,
            "{:?}",
            snapshot.backends[2]
        );
    }
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_sessions_follow_the_cookie_through_drain_and_move_when_gone() {
    use wasmlb::config::AdminState;
    let backends = TestBackend::start_many(3).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy = InProcessProxy::start(&app_config("sticky", &backend_list(&refs), "")).await;
    let c = client();
    let url = proxy.url("/");
    // The first response sets the cookie.
    let r = c.get(&url).send().await.unwrap();
    let home = r.headers()["x-backend"].to_str().unwrap().to_string();
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set_cookie.starts_with("wasmlb_sticky=") && set_cookie.contains("HttpOnly"));
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let with_cookie = || c.get(&url).header("cookie", cookie.clone()).send();
    for _ in 0..5 {
        let r = with_cookie().await.unwrap();
        assert_eq!(r.headers()["x-backend"], home.as_str());
        assert!(r.headers().get("set-cookie").is_none());
    }
    // Draining: the session stays, new sessions go elsewhere.
    let home_backend = backends.iter().find(|b| b.name == home).unwrap();
    let upstream = proxy.upstream("app");
    upstream
        .set_admin_state(home_backend.addr, AdminState::Drain)
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            with_cookie().await.unwrap().headers()["x-backend"],
            home.as_str()
        );
        let fresh = c.get(&url).send().await.unwrap();
        assert_ne!(fresh.headers()["x-backend"], home.as_str());
    }
    // In maintenance the backend is gone: the session moves, the cookie is rewritten.
    upstream
        .set_admin_state(home_backend.addr, AdminState::Maint)
        .unwrap();
    let r = with_cookie().await.unwrap();
    assert_ne!(r.headers()["x-backend"], home.as_str());
    let rewritten = r.headers()["set-cookie"].to_str().unwrap();
    assert!(!rewritten.starts_with(&cookie), "{rewritten}");
    assert!(proxy.stop().await);
}
