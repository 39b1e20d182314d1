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
        .map(|b| {
            b.counters
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
        })
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
