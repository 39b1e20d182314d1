//! Hostile plugins: traps, endless loops, nonsense answers, memory bombs,
//! unbounded recursion, host-call floods. For each, the proxy stays up, the
//! call is cut (trap or deadline), another upstream on the same proxy is
//! unaffected, the event is counted, the circuit breaker opens (later
//! requests skip the plugin until a fresh instance is probed), and the
//! request is served per `on_plugin_error`: by the round-robin fallback
//! (default) or with 503 (`fail`).

use std::sync::atomic::Ordering;

use wasmlb::plugin::FailureKind;
use wasmlb_tests::{InProcessProxy, TestBackend, app_config, backend_list, client, get, plugins};

/// `deadline_ms`: 20 for plugins that must be cut by time; 2000 for those that
/// must be stopped by the memory cap or the stack limit, so that a slow
/// debug build on a loaded machine cannot turn them into deadline overruns.
async fn serve_with(plugin: &str, expected: FailureKind, deadline_ms: u64) {
    for policy in ["fallback", "fail"] {
        let backends = TestBackend::start_many(2).await;
        let refs: Vec<_> = backends.iter().collect();
        let list = backend_list(&refs);
        let other = TestBackend::start("other").await;
        let extra = format!(
            "plugin_deadline_ms = {deadline_ms}\non_plugin_error = \"{policy}\"\n\
             [[route]]\npath_prefix = \"/other\"\nupstream = \"healthy\"\n\
             [upstream.healthy]\nplugin = \"round-robin\"\nbackends = [ {} ]\n",
            backend_list(&[&other])
        );
        let proxy = InProcessProxy::start(&app_config(plugin, &list, &extra)).await;
        let c = client();
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (status, backend, body) = get(&c, &proxy.url("/")).await;
            if policy == "fallback" {
                assert_eq!(status, 200, "{plugin}: {body}");
                seen.push(backend);
            } else {
                assert_eq!(status, 503, "{plugin}: {body}");
            }
            // The other upstream on the same proxy is served by its own plugin.
            let (status, backend, _) = get(&c, &proxy.url("/other/x")).await;
            assert_eq!((status, backend.as_str()), (200, "other"));
        }
        if policy == "fallback" {
            // The fallback rotates over the upstream's backends.
            assert_eq!(seen.iter().filter(|b| *b == "b0").count(), 3, "{seen:?}");
        } else {
            assert_eq!(backends[0].hits() + backends[1].hits(), 0);
        }
        let up = proxy.upstream("app");
        let stats = up.stats();
        // Every request either called the plugin (and it failed) or was
        // decided without it while the circuit breaker was open.
        let failed = stats.failures(expected);
        let skipped = stats.skipped.load(Ordering::Relaxed);
        assert!(failed >= 1, "{plugin} {policy}: {expected:?}");
        assert_eq!(failed + skipped, 6, "{plugin} {policy}: {expected:?}");
        assert_eq!(stats.breaker_trips.load(Ordering::Relaxed), failed);
        // Each call after the first was a half-open probe of a fresh instance.
        assert_eq!(stats.replacements.load(Ordering::Relaxed), failed - 1);
        let snapshot = up.snapshot();
        assert_eq!(snapshot.plugin.status, "failing");
        assert!(matches!(snapshot.plugin.breaker, "open" | "half_open"));
        let fallbacks = if policy == "fallback" { 6 } else { 0 };
        assert_eq!(stats.fallbacks.load(Ordering::Relaxed), fallbacks);
        let healthy = proxy.upstream("healthy");
        assert_eq!(healthy.stats().fallbacks.load(Ordering::Relaxed), 0);
        assert!(!healthy.stats().failing());
        assert!(proxy.stop().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_plugin() {
    serve_with(plugins::TRAP, FailureKind::Trap, 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_loop_is_cut_at_the_deadline() {
    serve_with(plugins::BUSY_LOOP, FailureKind::Deadline, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_backend_answer() {
    serve_with(plugins::BAD_ANSWER, FailureKind::BadAnswer, 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_hits_the_memory_cap() {
    serve_with(plugins::MEMORY_BOMB, FailureKind::Trap, 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_recursion_overflows_the_stack() {
    serve_with(plugins::DEEP_RECURSION, FailureKind::Trap, 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_call_flood_is_cut_at_the_deadline() {
    serve_with(plugins::HOST_CALL_FLOOD, FailureKind::Deadline, 20).await;
}
