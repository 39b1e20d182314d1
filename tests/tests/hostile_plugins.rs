//! Plugins that trap, loop forever or answer nonsense: every request is still
//! served (by the native round-robin fallback), the proxy survives, and the
//! event is counted, and the instance is replaced.

use std::sync::atomic::Ordering;

use wasmlb::plugin::FailureKind;
use wasmlb_tests::{InProcessProxy, TestBackend, app_config, backend_list, client, get, plugins};

async fn serve_with(plugin: &str, expected: FailureKind) {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<_> = backends.iter().collect();
    let list = backend_list(&refs);
    let extra = format!(
        "plugin_deadline_ms = 20

[upstream.healthy]
plugin = \"round-robin\"
backends = [ {list} ]"
    );
    let toml = app_config(plugin, &list, &extra);
    let proxy = InProcessProxy::start(&toml).await;
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (status, backend, body) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200, "{body}");
        seen.push(backend);
    }
    // The fallback rotates too.
    assert_eq!(seen.iter().filter(|b| *b == "b0").count(), 3, "{seen:?}");
    let up = proxy.upstream("app");
    let stats = up.stats();
    assert_eq!(stats.failures(expected), 6, "{expected:?}");
    assert_eq!(stats.fallbacks.load(Ordering::Relaxed), 6);
    assert_eq!(stats.replacements.load(Ordering::Relaxed), 6);
    // Other upstreams are unaffected.
    assert_eq!(
        proxy
            .upstream("healthy")
            .stats()
            .fallbacks
            .load(Ordering::Relaxed),
        0
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_plugin_falls_back_and_is_replaced() {
    serve_with(plugins::TRAP, FailureKind::Trap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_plugin_is_cut_at_its_deadline() {
    serve_with(plugins::BUSY_LOOP, FailureKind::Deadline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_backend_answer_falls_back() {
    serve_with(plugins::BAD_ANSWER, FailureKind::BadAnswer).await;
}
