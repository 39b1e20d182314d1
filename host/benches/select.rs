//! Per-request selection: `Upstream::select` (mutex, request moved into the
//! store, epoch deadline, the wasm call, host functions, answer validation)
//! for the built-in plugins at 4, 64 and 1024 backends, beside the same
//! round-robin strategy compiled natively and called directly.
//!
//! Run: `cargo bench -p wasmlb --bench select`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use wasmlb::config::{BackendConfig, PluginRef, UpstreamConfig};
use wasmlb::plugin::{RequestView, Runtime};
use wasmlb::upstream::Upstream;
use wasmlb_sdk::Strategy;

const SIZES: [usize; 3] = [4, 64, 1024];

fn config(plugin: &str, n: usize) -> UpstreamConfig {
    let backends = (0..n)
        .map(|i| {
            let mut b = BackendConfig::new(SocketAddr::from((
                [127, 0, (i / 250) as u8, 1],
                9000 + (i % 250) as u16,
            )));
            // canary: every 4th backend in the canary group.
            let group = if i % 4 == 3 { "canary" } else { "stable" };
            b.labels.insert("group".into(), group.into());
            b
        })
        .collect();
    let mut config = UpstreamConfig::new(PluginRef::Builtin(plugin.into()), backends);
    if plugin == "canary" {
        config.plugin_config = serde_json::json!({"weights": {"stable": 95, "canary": 5}});
    }
    config
}

fn request() -> RequestView {
    let (parts, ()) = http::Request::get("http://example.com/api/items?id=7")
        .header("user-agent", "bench")
        .header("x-user", "42")
        .body(())
        .expect("request")
        .into_parts();
    RequestView::new(parts, SocketAddr::from(([192, 0, 2, 1], 40000)))
}

fn select(c: &mut Criterion) {
    let runtime = Runtime::new().expect("runtime");
    let metrics = wasmlb::metrics::Metrics::new();
    let mut group = c.benchmark_group("select");
    for n in SIZES {
        for plugin in [
            "round-robin",
            "least-connections",
            "random",
            "p2c",
            "ip-hash",
            "maglev",
            "ring-hash",
            "canary",
            "peak-ewma",
            "sticky",
        ] {
            let upstream =
                Upstream::new("bench", &config(plugin, n), &runtime, &metrics).expect("upstream");
            let mut view = Some(request());
            group.bench_with_input(BenchmarkId::new(format!("wasm/{plugin}"), n), &n, |b, _| {
                b.iter(|| {
                    let (selection, back) = upstream.select(view.take().expect("view"), &[]);
                    view = Some(back);
                    black_box(selection)
                })
            });
            assert_eq!(
                upstream
                    .stats()
                    .fallbacks
                    .load(std::sync::atomic::Ordering::Relaxed),
                0
            );
        }
        let set = wasmlb_sdk::testing::backends(&vec![1; n]);
        let mut native: wasmlb_plugin_round_robin::RoundRobin =
            wasmlb_sdk::instantiate("{}").expect("native");
        native.set_backends(set.clone());
        let cx = wasmlb_sdk::testing::MockContext::new(&set);
        group.bench_with_input(BenchmarkId::new("native/round-robin", n), &n, |b, _| {
            b.iter(|| black_box(native.select(black_box(&cx))))
        });
    }
    group.finish();
}

/// The cost shadow mode adds to the live request: round-robin live at 64
/// backends, without and with least-connections in shadow (every request
/// sampled). The candidate's own decision runs on its thread; what the
/// live path pays is the copy of the request head and the queue push.
fn shadow(c: &mut Criterion) {
    let runtime = Runtime::new().expect("runtime");
    let metrics = wasmlb::metrics::Metrics::new();
    let mut group = c.benchmark_group("shadow");
    for with_shadow in [false, true] {
        let upstream = Upstream::new("bench", &config("round-robin", 64), &runtime, &metrics)
            .expect("upstream");
        if with_shadow {
            let candidate = runtime
                .load(&PluginRef::Builtin("least-connections".into()))
                .expect("candidate");
            upstream
                .start_shadow(candidate, "{}".into(), 100, metrics.shadow("bench"))
                .expect("shadow");
        }
        let mut view = Some(request());
        let name = if with_shadow { "live+shadow" } else { "live" };
        group.bench_function(BenchmarkId::new(name, 64), |b| {
            b.iter(|| {
                let (selection, back) = upstream.select(view.take().expect("view"), &[]);
                view = Some(back);
                black_box(selection)
            })
        });
    }
    group.finish();
}

/// A 0.2 upstream at 64 backends labelled `group = api` and `web`.
fn config_0_2(path: &str, plugin_config: serde_json::Value) -> UpstreamConfig {
    let mut config = config("round-robin", 64);
    for (i, b) in config.backends.iter_mut().enumerate() {
        let group = if i % 2 == 0 { "api" } else { "web" };
        b.labels.insert("group".into(), group.into());
    }
    config.plugin = PluginRef::File {
        path: path.into(),
        shown: path.into(),
    };
    config.plugin_config = plugin_config;
    config
}

/// WIT 0.2 decisions at 64 backends: `examples/path-router` (a path
/// rewrite and a request header set: `forward.set-path` and
/// `forward.set-header`, then the host's checks), and
/// `examples/rate-limit` (a token bucket per client /24, the bucket never
/// empty here, then round-robin).
fn contract_0_2(c: &mut Criterion) {
    let runtime = Runtime::new().expect("runtime");
    let metrics = wasmlb::metrics::Metrics::new();
    let mut group = c.benchmark_group("select-0.2");
    let cases = [
        (
            "path-router",
            concat!(env!("OUT_DIR"), "/path-router.wasm"),
            serde_json::json!({"routes": [{"prefix": "/api", "group": "api", "strip": true}]}),
        ),
        (
            "rate-limit",
            concat!(env!("OUT_DIR"), "/rate-limit.wasm"),
            serde_json::json!({"rate_per_second": 1e12, "burst": 1_000_000}),
        ),
    ];
    for (name, path, plugin_config) in cases {
        let upstream = Upstream::new(
            "bench",
            &config_0_2(path, plugin_config),
            &runtime,
            &metrics,
        )
        .expect("upstream");
        let mut view = Some(request());
        group.bench_function(BenchmarkId::new(name, 64), |b| {
            b.iter(|| {
                let (selection, back) = upstream.select(view.take().expect("view"), &[]);
                view = Some(back);
                black_box(selection)
            })
        });
        // Each case decides as described: a backend, with changes for the
        // router (none for the limiter).
        let (selection, _) = upstream.select(request(), &[]);
        match selection {
            wasmlb::upstream::Selection::Plugin { edits, .. } => {
                assert_eq!(edits.is_some(), name == "path-router", "{name}")
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = select, shadow, contract_0_2
}
criterion_main!(benches);
