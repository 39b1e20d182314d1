//! Plugin swaps and config reloads while 16 clients send requests without
//! pause: no request may fail. Bounded: 100 swaps, 20 reloads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use wasmlb_tests::{
    InProcessProxy, ProxyProcess, TestBackend, app_config, assert_all_ok, backend_list, client,
    collect, get, json, load,
};

const CLIENTS: usize = 16;

/// Debug headers, the admin API, and a select deadline generous enough that a
/// call descheduled on this loaded 2-core machine is not cut (these tests are
/// about swaps and reloads; deadlines have their own tests).
fn admin(extra: &str) -> String {
    format!(
        "debug_headers = true\nplugin_deadline_ms = 100\n{extra}\n[admin]\naddress = \"127.0.0.1:0\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_swaps_under_load_lose_nothing_and_take_effect_at_once() {
    let backends = TestBackend::start_many(4).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy =
        InProcessProxy::start(&app_config("round-robin", &backend_list(&refs), &admin(""))).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(proxy.url("/"), CLIENTS, stop.clone());
    let c = client();
    // (sent, done, plugin) per swap.
    let mut swaps = Vec::new();
    for i in 0..100u32 {
        let plugin = if i.is_multiple_of(2) {
            "least-connections"
        } else {
            "round-robin"
        };
        tokio::time::sleep(Duration::from_millis(15)).await;
        let sent = Instant::now();
        let r = c
            .put(proxy.admin_url("/upstreams/app/plugin"))
            .body(json!({ "plugin": plugin }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "swap {i}: {}", r.text().await.unwrap());
        swaps.push((sent, Instant::now(), plugin));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(tasks).await;

    assert_all_ok(&seen);
    let fallbacks = seen.iter().filter(|s| s.plugin == "(fallback)").count();
    assert_eq!(fallbacks, 0, "requests served by the fallback");
    // A request that started after swap k returned and finished before swap
    // k+1 was sent was decided by swap k's plugin.
    let mut checked = 0;
    for (k, (_, done, plugin)) in swaps.iter().enumerate() {
        let next_sent = swaps.get(k + 1).map(|s| s.0);
        for s in seen
            .iter()
            .filter(|s| s.started > *done && next_sent.is_none_or(|n| s.finished < n))
        {
            assert_eq!(
                s.plugin, *plugin,
                "request after swap {k} decided by {}",
                s.plugin
            );
            checked += 1;
        }
    }
    eprintln!(
        "{} requests during 100 swaps, {checked} checked against the swap before them, 0 failed",
        seen.len()
    );
    assert!(
        checked > 100,
        "too few requests between swaps to check: {checked}"
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_lose_nothing() {
    let backends = TestBackend::start_many(6).await;
    let aux = TestBackend::start("aux").await;
    // Even reloads: b0..b3 and a route /aux; odd: b0, b1, b4, b5 and no route.
    let config = |k: usize| {
        let set: Vec<&TestBackend> = if k.is_multiple_of(2) {
            backends[..4].iter().collect()
        } else {
            vec![&backends[0], &backends[1], &backends[4], &backends[5]]
        };
        let route = if k.is_multiple_of(2) {
            "[[route]]\npath_prefix = \"/aux\"\nupstream = \"aux\"\n"
        } else {
            ""
        };
        let aux_upstream = format!(
            "[upstream.aux]\nplugin = \"round-robin\"\nbackends = [ {} ]\n",
            backend_list(&[&aux])
        );
        app_config(
            "least-connections",
            &backend_list(&set),
            &format!("{}\n{route}\n{aux_upstream}", admin("")),
        )
    };
    let proxy = InProcessProxy::start(&config(0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(proxy.url("/"), CLIENTS, stop.clone());
    let c = client();
    let mut late_hits = 0;
    for k in 1..=20 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        if k == 10 {
            // A broken config in the middle: rejected, nothing changes.
            proxy.rewrite_config("[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n[upstream.app]\nplugin = \"nope\"\n");
            let r = c.post(proxy.admin_url("/reload")).send().await.unwrap();
            assert_eq!(r.status(), 422);
            let snapshot = json(&c, &proxy.admin_url("/upstreams/app")).await;
            assert_eq!(snapshot["backends"].as_array().unwrap().len(), 4);
        }
        proxy.rewrite_config(&config(k));
        let r = c.post(proxy.admin_url("/reload")).send().await.unwrap();
        assert_eq!(r.status(), 200, "reload {k}: {}", r.text().await.unwrap());
        // Backends not in this config: only requests already in flight (at
        // most one per client) may still reach them.
        let removed: Vec<&TestBackend> = if k.is_multiple_of(2) {
            vec![&backends[4], &backends[5]]
        } else {
            vec![&backends[2], &backends[3]]
        };
        let before: u64 = removed.iter().map(|b| b.hits()).sum();
        let route = get(&c, &proxy.url("/aux/x")).await;
        assert_eq!(route.0, 200);
        assert_eq!(
            route.1 == "aux",
            k.is_multiple_of(2),
            "route /aux present only in even configs (reload {k})"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
        let after: u64 = removed.iter().map(|b| b.hits()).sum();
        late_hits += after - before;
        assert!(
            after - before <= CLIENTS as u64,
            "removed backends got {} new requests after reload {k}",
            after - before
        );
    }
    stop.store(true, Ordering::Relaxed);
    let seen = collect(tasks).await;
    assert_all_ok(&seen);
    // The final config (k = 20, even) has b0..b3; b4/b5 got nothing after the last reload settled.
    let b4 = backends[4].hits();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backends[4].hits(), b4);
    assert!(seen.iter().all(|s| !s.backend.is_empty()));
    eprintln!(
        "{} requests during 20 reloads, 0 failed; {late_hits} reached removed backends while in flight",
        seen.len()
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary() {
    let backends = TestBackend::start_many(2).await;
    let mut proxy = ProxyProcess::spawn(
        &app_config("round-robin", &backend_list(&[&backends[0]]), ""),
        1,
    );
    let c = client();
    assert_eq!(get(&c, &proxy.url("/")).await.1, "b0");
    proxy.rewrite_config(&app_config(
        "round-robin",
        &backend_list(&[&backends[1]]),
        "",
    ));
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, backend, _) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200);
        if backend == "b1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.terminate().success());
}
