//! Shadow mode through the real proxy: a candidate plugin decides beside
//! the live one under load, its answers are counted and never used; a
//! trapping or busy-looping candidate changes nothing for clients; a
//! promotion is an ordinary swap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmlb_tests::plugins::{BUSY_LOOP, TRAP};
use wasmlb_tests::{
    InProcessProxy, TestBackend, app_config, assert_all_ok, backend_list, builtin_name, client,
    collect, json, load, text,
};

const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"\n";

/// Run 16 clients for `for_ms`; every request must succeed. Returns how many.
async fn load_for(proxy: &InProcessProxy, for_ms: u64) -> usize {
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(proxy.url("/"), 16, stop.clone());
    tokio::time::sleep(Duration::from_millis(for_ms)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(clients).await;
    assert_all_ok(&seen);
    seen.len()
}

fn shadow_of(snapshot: &serde_json::Value) -> (u64, u64, u64, u64) {
    let s = &snapshot["shadow"];
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    (n("agree"), n("differ"), n("errors"), n("dropped"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_plugin_is_counted_never_used_and_promoted_by_a_swap() {
    let backends = TestBackend::start_many(3).await;
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let extra = format!("shadow_plugin = \"least-connections\"\n{ADMIN}");
    let proxy =
        InProcessProxy::start(&app_config("round-robin", &backend_list(&refs), &extra)).await;
    let c = client();
    let url = proxy.admin_url("/upstreams/app");

    // Live round-robin, least-connections in shadow: every request is
    // decided by both, and the counts add up to the requests.
    let requests = load_for(&proxy, 1500).await as u64;
    let deadline = tokio::time::Instant::now() + wasmlb_tests::WAIT;
    loop {
        let (agree, differ, errors, dropped) = shadow_of(&json(&c, &url).await);
        if agree + differ + errors + dropped == requests {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shadow did not decide every request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot = json(&c, &url).await;
    let (agree, differ, errors, dropped) = shadow_of(&snapshot);
    assert_eq!((errors, dropped), (0, 0), "{snapshot}");
    assert_eq!(agree + differ, requests);
    assert!(
        agree > 0,
        "round-robin and least-connections never agreed: {snapshot}"
    );
    // The share over the last minute covers the same requests.
    let rows = snapshot["shadow"]["share_last_minute"].as_array().unwrap();
    let live: u64 = rows.iter().map(|r| r["live"].as_u64().unwrap()).sum();
    let shadow: u64 = rows.iter().map(|r| r["shadow"].as_u64().unwrap()).sum();
    assert_eq!((live, shadow), (requests, requests), "{rows:?}");
    // Metrics say the same.
    let metrics = text(&c, &proxy.admin_url("/metrics")).await;
    for (outcome, n) in [("agree", agree), ("differ", differ), ("error", 0)] {
        let line =
            format!("wasmlb_shadow_decisions_total{{upstream=\"app\",outcome=\"{outcome}\"}} {n}");
        assert!(metrics.contains(&line), "missing {line}");
    }
    // The live plugin decided: round-robin spread the requests evenly.
    let hits: Vec<u64> = backends.iter().map(TestBackend::hits).collect();
    let (min, max) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
    assert!(max - min <= 1, "not round-robin: {hits:?}");

    // A trapping candidate, then a busy-looping one (sent as bytes): no
    // live request fails, and their failures are counted.
    for (plugin, kind) in [(TRAP, "trap"), (BUSY_LOOP, "deadline")] {
        let r = c
            .put(proxy.admin_url("/upstreams/app/shadow"))
            .body(std::fs::read(plugin).unwrap())
            .send()
            .await
            .unwrap();
        // A plugin that fails its first call still starts (its init passes).
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        load_for(&proxy, 800).await;
        let s = json(&c, &url).await;
        assert!(s["shadow"]["failures"][kind].as_u64().unwrap() >= 1, "{s}");
        assert_eq!(s["plugin"]["name"], builtin_name("round-robin").as_str());
        assert_eq!(s["plugin"]["status"], "ok");
    }

    // Promote: least-connections in shadow, then one call makes it live.
    let r = c
        .put(proxy.admin_url("/upstreams/app/shadow"))
        .body(r#"{"plugin": "least-connections", "sample_percent": 50}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(&c, &url).await["shadow"]["sample_percent"], 50);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(proxy.url("/"), 16, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c
        .post(proxy.admin_url("/upstreams/app/shadow/promote"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    assert_all_ok(&collect(clients).await);
    let s = json(&c, &url).await;
    assert_eq!(s["plugin"]["name"], "least-connections");
    assert!(s.get("shadow").is_none(), "{s}");
    // Nothing left to promote or stop.
    let r = c
        .post(proxy.admin_url("/upstreams/app/shadow/promote"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = c
        .delete(proxy.admin_url("/upstreams/app/shadow"))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body, serde_json::json!({"stopped": false}));
    // Bad requests.
    for (body, status) in [
        (
            r#"{"plugin": "least-connections", "sample_percent": 0}"#,
            422,
        ),
        (r#"{"plugin": "no-such-plugin"}"#, 422),
        (r#"{"sample_percent": 5}"#, 409),
        ("garbage", 400),
    ] {
        let r = c
            .put(proxy.admin_url("/upstreams/app/shadow"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
    }
    let r = c
        .put(proxy.admin_url("/upstreams/app/plugin"))
        .body(r#"{"sample_percent": 5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(proxy.stop().await);
}

#[test]
fn bad_shadow_config_is_refused_naming_the_key() {
    let cases = [
        ("shadow_plugin = \"nope\"\n", "upstream.app.shadow_plugin: "),
        (
            "shadow_plugin = \"least-connections\"\nshadow_sample_percent = 0\n",
            "upstream.app.shadow_sample_percent: must be from 1 to 100",
        ),
        (
            "shadow_plugin = \"least-connections\"\nshadow_sample_percent = 101\n",
            "upstream.app.shadow_sample_percent: a percentage is at most 100",
        ),
        (
            "shadow_sample_percent = 10\n",
            "upstream.app.shadow_plugin: shadow_plugin_config and shadow_sample_percent need shadow_plugin",
        ),
    ];
    wasmlb_tests::assert_config_errors(&cases);
}
