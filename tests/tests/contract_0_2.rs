//! WIT 0.2 through the real proxy: plugins that answer (`respond`), change
//! the forwarded request and mirror it (`forward`), the three examples built
//! on them, the host's refusals of hostile answers and changes, and 0.1
//! components (every built-in as built against 0.1.1) deciding exactly as
//! their 0.2 builds do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmlb::config::{BackendConfig, PluginRef, UpstreamConfig};
use wasmlb::plugin::{Contract, RequestView, Runtime};
use wasmlb::upstream::{Selection, Upstream};
use wasmlb_tests::plugins::{
    EDIT_CORPUS, MIRROR_CANARY, PATH_ROUTER, RATE_LIMIT, builtin_wit_0_1_1,
};
use wasmlb_tests::raw::{After, h1_exchange};
use wasmlb_tests::{
    InProcessProxy, Mode, TestBackend, app_config, assert_all_ok, backend_list, client,
    closed_port, collect, load, text, wait_until,
};

const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"\n";

fn upstream(plugin: PluginRef, name: &str, runtime: &Runtime) -> Upstream {
    let backends = (0..7)
        .map(|i| {
            let mut b = BackendConfig::new(SocketAddr::from(([127, 0, 0, 1], 9000 + i)));
            let group = if i % 3 == 2 { "canary" } else { "stable" };
            b.labels.insert("group".into(), group.into());
            b.weight = 1 + u32::from(i % 2);
            b
        })
        .collect();
    let mut config = UpstreamConfig::new(plugin, backends);
    config.plugin_config = match name {
        "random" | "p2c" | "peak-ewma" => serde_json::json!({"seed": 7}),
        "canary" => serde_json::json!({"weights": {"stable": 80, "canary": 20}}),
        _ => serde_json::json!({}),
    };
    let metrics = wasmlb::metrics::Metrics::new();
    Upstream::new("app", &config, runtime, &metrics).expect("upstream")
}

/// Request `i` of a varied sequence: clients, paths, cookies, users.
fn request(i: u16) -> RequestView {
    let mut builder = hyper::Request::get(format!("http://app.example/items/{}?q={i}", i % 13))
        .header("x-user", format!("user-{}", i % 17));
    if i.is_multiple_of(4) {
        builder = builder.header("cookie", format!("wasmlb=127.0.0.1:{}", 9000 + i % 7));
    }
    let (parts, ()) = builder.body(()).expect("request").into_parts();
    let client = SocketAddr::from(([10, 0, (i % 5) as u8, (i % 251) as u8], 40000 + i));
    RequestView::new(parts, client)
}

fn outcome(selection: &Selection) -> String {
    match selection {
        Selection::Plugin {
            chosen,
            response_headers,
            ..
        } => format!("{} {response_headers:?}", chosen.address),
        other => format!("{other:?}"),
    }
}

#[test]
fn every_builtin_built_against_0_1_1_decides_as_its_0_2_build() {
    let runtime = Runtime::new().expect("runtime");
    assert_eq!(wasmlb::builtin::PLUGINS.len(), 10);
    for &(name, _) in wasmlb::builtin::PLUGINS {
        let path = builtin_wit_0_1_1(name);
        let old = runtime
            .load(&PluginRef::File {
                path: path.clone().into(),
                shown: path.clone(),
            })
            .expect("0.1.1 plugin loads");
        assert_eq!(old.contract(), Contract::V0_1, "{name}");
        let new = runtime
            .load(&PluginRef::Builtin(name.into()))
            .expect("built-in");
        assert_eq!(new.contract(), Contract::V0_2, "{name}");
        let a = upstream(
            PluginRef::File {
                path: path.clone().into(),
                shown: path,
            },
            name,
            &runtime,
        );
        let b = upstream(PluginRef::Builtin(name.into()), name, &runtime);
        for i in 0..400 {
            let (sa, _) = a.select(request(i), &[]);
            let (sb, _) = b.select(request(i), &[]);
            assert_eq!(outcome(&sa), outcome(&sb), "{name}, request {i}");
            assert!(matches!(sa, Selection::Plugin { .. }), "{name}: {sa:?}");
        }
        let stats = a.stats();
        assert_eq!(stats.fallbacks.load(Ordering::Relaxed), 0, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_example_answers_429_past_its_budget() {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let extra = format!(
        "[upstream.app.plugin_config]\nrate_per_second = 0.01\nburst = 3\nheader = \"x-api-key\"\n{ADMIN}"
    );
    let proxy = InProcessProxy::start(&app_config(RATE_LIMIT, &backend_list(&refs), &extra)).await;
    let c = client();
    let send = |key: &'static str| {
        let c = c.clone();
        let url = proxy.url("/");
        async move {
            let r = c
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .expect("request");
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or_default().to_string());
            let status = r.status().as_u16();
            (status, retry, r.text().await.expect("body"))
        }
    };
    for _ in 0..3 {
        let (status, retry, body) = send("alpha").await;
        assert_eq!((status, retry), (200, None), "{body}");
        assert!(body.starts_with("hello from"), "{body}");
    }
    let (status, retry, body) = send("alpha").await;
    assert_eq!(status, 429, "{body}");
    // 1 token at 0.01/s: 100 s, give or take the time the test took.
    let secs: u64 = retry.expect("retry-after").parse().expect("whole seconds");
    assert!((90..=100).contains(&secs), "retry-after {secs}");
    assert_eq!(body, "too many requests\n");
    // Another key has its own budget; the backends saw only what was served.
    assert_eq!(send("beta").await.0, 200);
    let hits: u64 = backends.iter().map(TestBackend::hits).sum();
    assert_eq!(hits, 4);
    // A 429 of the plugin is the upstream's 4xx with no backend.
    let metrics = text(&c, &proxy.admin_url("/metrics")).await;
    let line = "wasmlb_requests_total{upstream=\"app\",backend=\"none\",class=\"4xx\"} 1";
    assert!(metrics.contains(line), "missing {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_router_strips_the_prefix_the_backend_sees() {
    let api = TestBackend::start("api").await;
    let web = TestBackend::start("web").await;
    let toml = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [upstream.app]\nplugin = '{PATH_ROUTER}'\nbackends = [\n\
         {{ address = \"{}\", labels = {{ group = \"api\" }} }},\n\
         {{ address = \"{}\", labels = {{ group = \"web\" }} }},\n]\n\
         [upstream.app.plugin_config]\nroutes = [\n\
         {{ prefix = \"/api\", group = \"api\", strip = true }},\n\
         {{ prefix = \"/static\", group = \"web\" }},\n]\n",
        api.addr, web.addr
    );
    let proxy = InProcessProxy::start(&toml).await;
    let c = client();
    for (path, backend) in [
        ("/api/items?id=3", "api"),
        ("/api", "api"),
        ("/static/app.js", "web"),
    ] {
        let r = c.get(proxy.url(path)).send().await.expect("request");
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["x-backend"], backend, "{path}");
    }
    assert_eq!(api.paths(), ["/items?id=3", "/"]);
    assert_eq!(web.paths(), ["/static/app.js"]);
    // The prefix travels in x-forwarded-prefix; the body of a POST too.
    let r = c
        .get(proxy.url("/api/headers"))
        .send()
        .await
        .expect("request");
    let headers: serde_json::Value =
        serde_json::from_str(&r.text().await.expect("body")).expect("json");
    assert_eq!(headers["x-forwarded-prefix"][0], "/api", "{headers}");
    let r = c
        .post(proxy.url("/api/upload"))
        .body(vec![7u8; 100_000])
        .send()
        .await
        .expect("upload");
    let answer = r.text().await.expect("body");
    assert!(answer.starts_with("100000 "), "{answer}");
    // No route: 404 from the proxy, no backend asked.
    let before = api.hits() + web.hits();
    let r = c.get(proxy.url("/apix")).send().await.expect("request");
    assert_eq!(r.status(), 404);
    assert_eq!(api.hits() + web.hits(), before);
}

/// 16 clients for `ms` against `url`: every request must succeed. Returns
/// the request latencies, in µs.
async fn load_for(url: String, ms: u64) -> Vec<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(url, 16, stop.clone());
    tokio::time::sleep(Duration::from_millis(ms)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(clients).await;
    assert_all_ok(&seen);
    let mut micros: Vec<u64> = seen
        .iter()
        .map(|s| s.finished.duration_since(s.started).as_micros() as u64)
        .collect();
    micros.sort_unstable();
    micros
}

fn p99(sorted: &[u64]) -> u64 {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

fn mirror_config(stable: &TestBackend, canary: &str) -> String {
    format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [upstream.app]\nplugin = '{MIRROR_CANARY}'\nresponse_timeout_ms = 300\n\
         mirror_max_in_flight = 8\nbackends = [\n\
         {{ address = \"{}\", labels = {{ group = \"stable\" }} }},\n\
         {{ address = \"{canary}\", labels = {{ group = \"canary\" }} }},\n]\n{ADMIN}",
        stable.addr
    )
}

fn mirrors(metrics: &str, outcome: &str) -> u64 {
    let prefix = format!("wasmlb_mirror_requests_total{{upstream=\"app\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_canary_copies_ten_percent_and_a_bad_canary_changes_nothing() {
    let stable = TestBackend::start("stable").await;
    let canary = TestBackend::start("canary").await;
    let c = client();
    // Sequential requests: exactly one in ten is copied, with its body.
    let proxy = InProcessProxy::start(&mirror_config(&stable, &canary.addr.to_string())).await;
    for i in 0..200 {
        let r = c
            .post(proxy.url(&format!("/upload?i={i}")))
            .body(vec![1u8; 1000])
            .send()
            .await
            .expect("request");
        assert_eq!(r.headers()["x-backend"], "stable");
        assert!(r.text().await.expect("body").starts_with("1000 "));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while canary.hits() < 20 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = text(&c, &proxy.admin_url("/metrics")).await;
    assert_eq!(
        (canary.hits(), mirrors(&m, "sent"), mirrors(&m, "skipped")),
        (20, 20, 0),
        "{m}"
    );
    assert_eq!(stable.hits(), 200);
    let copied = canary.paths();
    assert!(
        copied.iter().all(|p| p.starts_with("/upload?i=")),
        "{copied:?}"
    );
    let healthy_p99 = p99(&load_for(proxy.url("/"), 1000).await);
    assert!(proxy.stop().await);

    // A canary that hangs, then one that is down: clients see no failure;
    // the copies fail or are skipped at the cap, and are counted.
    canary.set_mode(Mode::Delay(60_000));
    let proxy = InProcessProxy::start(&mirror_config(&stable, &canary.addr.to_string())).await;
    let hung = load_for(proxy.url("/"), 1000).await;
    let m = text(&c, &proxy.admin_url("/metrics")).await;
    assert!(mirrors(&m, "failed") + mirrors(&m, "skipped") > 0, "{m}");
    assert!(proxy.stop().await);
    let proxy = InProcessProxy::start(&mirror_config(&stable, &closed_port().to_string())).await;
    let down = load_for(proxy.url("/"), 1000).await;
    let m = text(&c, &proxy.admin_url("/metrics")).await;
    // Its first refused connect takes it out of rotation (max_fails 1,
    // fail_timeout 10 s, as NGINX): it is not dialled again; only copies
    // already under way (at most mirror_max_in_flight, 8) fail too.
    let failed = mirrors(&m, "failed");
    assert!((1..=9).contains(&failed), "{m}");
    assert_eq!(mirrors(&m, "sent"), 0);
    // Reported, not asserted (wall-clock times are never asserted).
    eprintln!(
        "p99 µs: healthy canary {healthy_p99}, hung canary {}, down canary {} ({} and {} requests)",
        p99(&hung),
        p99(&down),
        hung.len(),
        down.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_and_request_changes_are_refused() {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let proxy = InProcessProxy::start(&app_config(EDIT_CORPUS, &backend_list(&refs), ADMIN)).await;
    let c = client();
    let case = |name: &'static str, path: &'static str| {
        c.get(proxy.url(path))
            .header("x-case", name)
            .header("cookie", "secret=1")
            .send()
    };
    // Bad answers: each is a plugin failure, and the fallback serves the
    // request (200 from a backend). Each failure opens the breaker for a
    // while, so each case is sent until the plugin itself refused it.
    let bad_answers = || {
        proxy
            .upstream("app")
            .stats()
            .bad_answers
            .load(Ordering::Relaxed)
    };
    for (n, bad) in [(1, "respond-101"), (2, "respond-600"), (3, "respond-big")] {
        let deadline = tokio::time::Instant::now() + wasmlb_tests::WAIT;
        while bad_answers() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{bad} never reached the plugin"
            );
            let r = case(bad, "/").await.expect("request");
            assert_eq!(r.status(), 200, "{bad}");
            assert!(r.text().await.expect("body").starts_with("hello from"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(bad_answers(), n, "{bad}");
    }
    // The largest body allowed (sent until the breaker lets the plugin in).
    let deadline = tokio::time::Instant::now() + wasmlb_tests::WAIT;
    let r = loop {
        let r = case("respond-max", "/").await.expect("request");
        if r.status() != 200 || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.status(), 418);
    assert_eq!(r.headers()["content-length"], "65536");
    assert_eq!(r.bytes().await.expect("body").len(), 65536);
    // No body on a 204, whatever the plugin said; none on a HEAD either.
    let r = case("respond-204", "/").await.expect("request");
    assert_eq!(r.status(), 204);
    assert!(r.bytes().await.expect("body").is_empty());
    let r = c
        .head(proxy.url("/"))
        .header("x-case", "respond-max")
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), 418);
    assert!(r.bytes().await.expect("body").is_empty());
    // Over HTTP/2 (h2c) too.
    let r = wasmlb_tests::h2c_client()
        .get(proxy.url("/"))
        .header("x-case", "respond-headers")
        .send()
        .await
        .expect("h2c");
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (403, reqwest::Version::HTTP_2)
    );
    assert_eq!(r.headers()["x-ok"], "1");
    assert_eq!(r.text().await.expect("body"), "nope");
    // A reply keeps its valid headers only; content-length is the body's.
    let r = case("respond-headers", "/").await.expect("request");
    assert_eq!(r.status(), 403);
    let h = r.headers().clone();
    assert_eq!(h["x-ok"], "1");
    assert_eq!(h["set-cookie"], "a=1");
    assert_eq!(h["x-added"], "1");
    assert_eq!(h["content-length"], "4");
    for gone in ["transfer-encoding", "x-bad", "x-injected", "bad name"] {
        assert!(!h.contains_key(gone), "{gone}: {h:?}");
    }
    assert_eq!(r.text().await.expect("body"), "nope");
    // Hostile request changes: refused; the valid ones applied.
    let other = backends[1].hits();
    let r = case("edit-hostile", "/headers").await.expect("request");
    assert_eq!(r.status(), 200);
    let seen: serde_json::Value =
        serde_json::from_str(&r.text().await.expect("body")).expect("json");
    assert_eq!(seen["x-ok"][0], "1", "{seen}");
    assert!(seen.get("cookie").is_none(), "{seen}");
    assert!(seen.get("x-bad").is_none() && seen.get("x-injected").is_none());
    assert!(seen.get("transfer-encoding").is_none(), "{seen}");
    assert_ne!(seen["host"][0], "evil.example", "{seen}");
    assert_eq!(
        backends[0].paths().last().map(String::as_str),
        Some("/headers")
    );
    assert_eq!(backends[1].hits(), other, "no mirror to an unknown backend");
    // A path and a header rewrite.
    let r = case("path-rewrite", "/anything").await.expect("request");
    let seen: serde_json::Value =
        serde_json::from_str(&r.text().await.expect("body")).expect("json");
    assert_eq!(seen["x-rewritten"][0], "yes");
    assert_eq!(
        backends[0].paths().last().map(String::as_str),
        Some("/headers?rewritten=1")
    );
    // 100 changes: 16 kept.
    let r = case("flood-edits", "/headers").await.expect("request");
    let seen: serde_json::Value =
        serde_json::from_str(&r.text().await.expect("body")).expect("json");
    let flood = seen
        .as_object()
        .expect("object")
        .keys()
        .filter(|k| k.starts_with("x-flood-"))
        .count();
    assert_eq!(flood, 16);
    // A mirror of a request whose body the client never finished is never
    // sent: the client's fault, nothing completed anywhere.
    let before = backends[1].hits();
    let addr: SocketAddr = proxy
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("proxy address");
    let head =
        b"POST /upload HTTP/1.1\r\nhost: x\r\nx-case: mirror-1\r\ncontent-length: 100\r\n\r\nshort";
    let reply = h1_exchange(addr, &[head.to_vec()], After::HalfClose, 1).await;
    assert!(reply.status.is_none_or(|s| s >= 400), "{reply:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backends[1].hits(), before, "a copy of an incomplete body");
    // A complete one is copied.
    let r = c
        .post(proxy.url("/upload"))
        .header("x-case", "mirror-1")
        .body("abc")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    wait_until("the mirror gets its copy", || {
        backends[1].hits() == before + 1
    })
    .await;
}

#[test]
fn bad_mirror_max_in_flight_is_refused_naming_the_key() {
    wasmlb_tests::assert_config_errors(&[
        (
            "mirror_max_in_flight = -1",
            "wasmlb.toml:8: upstream.app.mirror_max_in_flight: invalid value: integer `-1`",
        ),
        (
            "mirror_max_in_flight = \"many\"",
            "wasmlb.toml:8: upstream.app.mirror_max_in_flight: invalid type: string",
        ),
        (
            "mirror_max_in_flight = 1.5",
            "wasmlb.toml:8: upstream.app.mirror_max_in_flight: invalid type: floating point",
        ),
        (
            "mirror_max_in_flight = 4294967296",
            "wasmlb.toml:8: upstream.app.mirror_max_in_flight: invalid value: integer `4294967296`",
        ),
    ]);
}
