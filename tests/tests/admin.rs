//! The admin API: state, plugin swaps, reloads, metrics and its security.

use serde_json::{Value, json};
use wasmlb_tests::{
    ConfigFile, InProcessProxy, TestBackend, app_config, backend_list, builtin_name, check, client,
    get, json, named_backend_list, plugins, text,
};

fn config_with_admin(plugin: &str, backends: &str, extra: &str) -> String {
    let admin = "[admin]\naddress = \"127.0.0.1:0\"\nmax_body_bytes = 2000000\n";
    app_config(
        plugin,
        backends,
        &format!("debug_headers = true\n{extra}\n{admin}"),
    )
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
    )
}

/// Two backends behind round-robin with the admin API, after 4 requests
/// (2 each).
async fn round_robin_after_four_requests() -> (Vec<TestBackend>, InProcessProxy) {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy =
        InProcessProxy::start(&config_with_admin("round-robin", &backend_list(&refs), "")).await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    }
    (backends, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_are_reported_with_backends_and_plugin() {
    let (backends, proxy) = round_robin_after_four_requests().await;
    let c = client();
    let (status, all) = json_of(c.get(proxy.admin_url("/upstreams")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(all.as_array().unwrap().len(), 1);
    let (status, app) = json_of(
        c.get(proxy.admin_url("/upstreams/app"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(app["name"], "app");
    assert_eq!(app["plugin"]["name"], builtin_name("round-robin").as_str());
    assert!(
        app["plugin"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(app["plugin"]["status"], "ok");
    assert_eq!(app["plugin"]["failures"]["trap"], 0);
    assert_eq!(app["backends"][0]["address"], backends[0].addr.to_string());
    assert_eq!(app["backends"][0]["requests"], 2);
    assert_eq!(app["backends"][1]["in_flight"], 0);
    assert_eq!(app["backends"][1]["state"], "healthy");
    let r = c
        .get(proxy.admin_url("/upstreams/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let metrics = text(&c, &proxy.admin_url("/metrics")).await;
    let line = format!(
        r#"wasmlb_requests_total{{upstream="app",backend="{}",class="2xx"}} 2"#,
        backends[0].addr
    );
    assert!(metrics.contains(&line), "{metrics}");
    assert!(
        metrics.contains("wasmlb_plugin_decision_duration_seconds_count{upstream=\"app\"} 4"),
        "{metrics}"
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_swaps_by_name_by_upload_and_bad_plugins_are_refused() {
    let backends = TestBackend::start_many(2).await;
    let list = named_backend_list(&backends);
    let proxy = InProcessProxy::start(&config_with_admin("round-robin", &list, "")).await;
    let c = client();
    let put = |body: reqwest::Body| {
        c.put(proxy.admin_url("/upstreams/app/plugin"))
            .body(body)
            .send()
    };

    // By name, with a config.
    let (status, report) = json_of(
        put(json!({"plugin": "least-connections"}).to_string().into())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["plugin"], "least-connections");
    let r = c.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.headers()["x-wasmlb-plugin"], "least-connections");

    // Uploaded bytes: the header-route example, then the same bytes again (cached).
    let wasm = std::fs::read(plugins::HEADER_ROUTE).unwrap();
    let (status, report) = json_of(put(wasm.clone().into()).await.unwrap()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["cached"], false);
    let r = c
        .get(proxy.url("/"))
        .header("x-backend", "b1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-wasmlb-plugin"], "(uploaded)");
    assert_eq!(r.headers()["x-backend"], "b1");
    put(json!({"plugin": "round-robin"}).to_string().into())
        .await
        .unwrap();
    let (_, report) = json_of(put(wasm.into()).await.unwrap()).await;
    assert_eq!(report["cached"], true, "{report}");

    // Refused: a plugin importing wasi, an init failure, a bad plugin_config,
    // garbage, an unknown upstream. The old plugin keeps serving each time.
    let wasi = std::fs::read(plugins::WASI_IMPORT).unwrap();
    let (status, e) = json_of(put(wasi.into()).await.unwrap()).await;
    assert_eq!(status, 422);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("`wasi:filesystem/preopens@"),
        "{e}"
    );
    let (status, e) = json_of(
        put(std::fs::read(plugins::BAD_INIT).unwrap().into())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("bad-init refuses every config"),
        "{e}"
    );
    let bad_config = json!({"plugin": "round-robin", "plugin_config": {"speed": 1}});
    let (status, e) = json_of(put(bad_config.to_string().into()).await.unwrap()).await;
    assert_eq!(status, 422);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `speed`"),
        "{e}"
    );
    let (status, _) = json_of(
        put(b"\0asm\x0d\0\x01\0garbage".to_vec().into())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 422);
    let (status, _) = json_of(put("not json".into()).await.unwrap()).await;
    assert_eq!(status, 400);
    let r = c
        .put(proxy.admin_url("/upstreams/nope/plugin"))
        .body(json!({"plugin": "round-robin"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .get(proxy.url("/"))
        .header("x-backend", "b0")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-wasmlb-plugin"],
        "(uploaded)",
        "the last good plugin still serves"
    );
    assert_eq!(r.headers()["x-backend"], "b0");

    // Too large: refused on the declared length, before any body is read.
    let admin_addr = proxy
        .admin_url("")
        .trim_start_matches("http://")
        .to_string();
    let mut raw = tokio::net::TcpStream::connect(&admin_addr).await.unwrap();
    let head = format!(
        "PUT /upstreams/app/plugin HTTP/1.1\r\nhost: {admin_addr}\r\ncontent-length: 3000000\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut raw, head.as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::io::AsyncReadExt::read(&mut raw, &mut answer)
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    let metrics = text(&c, &proxy.admin_url("/metrics")).await;
    assert!(
        metrics.contains(r#"wasmlb_plugin_swaps_total{upstream="app",outcome="ok"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"wasmlb_plugin_swaps_total{upstream="app",outcome="error"} 4"#),
        "{metrics}"
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_good_config_and_rejects_a_broken_one() {
    let backends = TestBackend::start_many(3).await;
    let first = config_with_admin("round-robin", &backend_list(&[&backends[0]]), "");
    let proxy = InProcessProxy::start(&first).await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/")).await.1, "b0");

    proxy.rewrite_config(&config_with_admin(
        "round-robin",
        &backend_list(&[&backends[1], &backends[2]]),
        "",
    ));
    let (status, report) = json_of(c.post(proxy.admin_url("/reload")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{report}");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(get(&c, &proxy.url("/")).await.1);
    }
    assert!(seen.iter().all(|b| b == "b1" || b == "b2"), "{seen:?}");

    proxy.rewrite_config("[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"gone\"\n");
    let (status, e) = json_of(c.post(proxy.admin_url("/reload")).send().await.unwrap()).await;
    assert_eq!(status, 422);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("listener[0].upstream: no upstream named \"gone\""),
        "{e}"
    );
    let b = get(&c, &proxy.url("/")).await.1;
    assert!(
        b == "b1" || b == "b2",
        "the running config keeps serving: {b}"
    );
    let metrics = text(&c, &proxy.admin_url("/metrics")).await;
    assert!(
        metrics.contains("wasmlb_reloads_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wasmlb_reloads_total{outcome=\"error\"} 1"),
        "{metrics}"
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_when_configured() {
    let file = ConfigFile::new("");
    std::fs::write(file.dir().join("token"), "s3cret\n").unwrap();
    let token_path = file.dir().join("token");
    let extra = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = '{}'\n",
        token_path.display()
    );
    let proxy = InProcessProxy::start(&app_config("round-robin", "", &extra)).await;
    let c = client();
    assert_eq!(
        c.get(proxy.admin_url("/upstreams"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let wrong = c
        .get(proxy.admin_url("/upstreams"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = c
        .get(proxy.admin_url("/upstreams"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    assert!(proxy.stop().await);
}

#[test]
fn admin_on_a_non_loopback_address_without_a_token_refuses_to_start() {
    let file = ConfigFile::new(&app_config(
        "round-robin",
        "",
        "[admin]\naddress = \"0.0.0.0:0\"\n",
    ));
    let (code, _, stderr) = check(&file.path);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("admin.address: 0.0.0.0:0 is not a loopback address: set admin.token_file"),
        "{stderr}"
    );
    // The binary refuses to start for the same reason (and binds nothing).
    let out = std::process::Command::new(wasmlb_tests::wasmlb_bin())
        .arg("--config")
        .arg(&file.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_policy_answers_503_and_reports_a_failing_plugin() {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<_> = backends.iter().collect();
    let toml = config_with_admin(
        plugins::TRAP,
        &backend_list(&refs),
        "on_plugin_error = \"fail\"",
    );
    let proxy = InProcessProxy::start(&toml).await;
    let c = client();
    for _ in 0..6 {
        let (status, _, body) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 503);
        assert!(body.contains("on_plugin_error = \"fail\""), "{body}");
    }
    assert_eq!(backends[0].hits() + backends[1].hits(), 0);
    let app = json(&c, &proxy.admin_url("/upstreams/app")).await;
    assert_eq!(app["plugin"]["status"], "failing", "{app}");
    // Each request either called the plugin (a trap) or was refused without
    // calling it while the circuit breaker was open.
    let traps = app["plugin"]["failures"]["trap"].as_u64().unwrap();
    let skipped = app["plugin"]["skipped"].as_u64().unwrap();
    assert!(traps >= 1, "{app}");
    assert_eq!(traps + skipped, 6, "{app}");
    assert_eq!(app["plugin"]["breaker_trips"], traps);
    assert_eq!(app["plugin"]["on_plugin_error"], "fail");
    let metrics = text(&c, &proxy.admin_url("/metrics")).await;
    for line in [
        format!(r#"wasmlb_plugin_failures_total{{upstream="app",kind="trap"}} {traps}"#),
        format!(r#"wasmlb_plugin_calls_skipped_total{{upstream="app"}} {skipped}"#),
    ] {
        assert!(metrics.contains(&line), "{line} not in {metrics}");
    }
    // Swapping in a good plugin recovers.
    let r = c
        .put(proxy.admin_url("/upstreams/app/plugin"))
        .body(json!({"plugin": "round-robin"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    let app = json(&c, &proxy.admin_url("/upstreams/app")).await;
    assert_eq!(app["plugin"]["status"], "ok");
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_handed_over_across_a_swap() {
    let backends = TestBackend::start_many(4).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy =
        InProcessProxy::start(&config_with_admin("round-robin", &backend_list(&refs), "")).await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/")).await.1, "b0");
    assert_eq!(get(&c, &proxy.url("/")).await.1, "b1");
    let put = |plugin: &str| {
        c.put(proxy.admin_url("/upstreams/app/plugin"))
            .body(json!({ "plugin": plugin }).to_string())
            .send()
    };
    // round-robin -> round-robin (e.g. a new version): the rotation continues.
    let (status, report) = json_of(put("round-robin").await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(
        report["state_bytes"].as_u64().is_some_and(|n| n > 0),
        "{report}"
    );
    assert_eq!(
        get(&c, &proxy.url("/")).await.1,
        "b2",
        "rotation continues after the swap"
    );
    // round-robin -> least-connections: the formats differ, the import is
    // refused, least-connections starts fresh; its own state then carries on.
    let (_, report) = json_of(put("least-connections").await.unwrap()).await;
    assert_eq!(report["state_bytes"], Value::Null, "{report}");
    assert_eq!(get(&c, &proxy.url("/")).await.1, "b0");
    let (_, report) = json_of(put("least-connections").await.unwrap()).await;
    assert_eq!(report["state_bytes"], 12, "{report}");
    assert_eq!(get(&c, &proxy.url("/")).await.1, "b1");
    assert!(proxy.stop().await);
}

/// Time from sending the PUT to the first response decided by the new plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_to_first_request_latency_new_and_cached() {
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<_> = backends.iter().collect();
    let proxy =
        InProcessProxy::start(&config_with_admin("round-robin", &backend_list(&refs), "")).await;
    let c = client();
    let wasm = std::fs::read(plugins::HEADER_ROUTE).unwrap();
    let mut figures = Vec::new();
    for round in ["new", "cached"] {
        let started = std::time::Instant::now();
        let r = c
            .put(proxy.admin_url("/upstreams/app/plugin"))
            .body(wasm.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let (_, report) = json_of(r).await;
        assert_eq!(report["cached"], round == "cached");
        let r = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(r.headers()["x-wasmlb-plugin"], "(uploaded)");
        figures.push(format!(
            "{round}: {:.2} ms (host-side swap {:.2} ms)",
            started.elapsed().as_secs_f64() * 1e3,
            report["elapsed_ms"].as_f64().unwrap()
        ));
        // Back to round-robin so the next round is a swap again.
        c.put(proxy.admin_url("/upstreams/app/plugin"))
            .body(json!({"plugin": "round-robin"}).to_string())
            .send()
            .await
            .unwrap();
    }
    eprintln!(
        "PUT -> first request on the new plugin: {}",
        figures.join("; ")
    );
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listeners() {
    let b = TestBackend::start("b0").await;
    let one = config_with_admin("round-robin", &backend_list(&[&b]), "");
    let two = format!("{one}\n[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n");
    let proxy = InProcessProxy::start(&one).await;
    let control = proxy.control();
    let c = client();
    let first = control.local_addrs()[0];

    proxy.rewrite_config(&two);
    let (status, report) = json_of(c.post(proxy.admin_url("/reload")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{report}");
    let addrs = control.local_addrs();
    assert_eq!(addrs.len(), 2);
    assert_eq!(addrs[0], first, "the kept listener keeps its socket");
    assert_eq!(report["listeners_added"][0], addrs[1].to_string());
    assert_eq!(get(&c, &format!("http://{}/", addrs[1])).await.1, "b0");

    proxy.rewrite_config(&one);
    let (status, report) = json_of(c.post(proxy.admin_url("/reload")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["listeners_removed"][0], addrs[1].to_string());
    assert_eq!(control.local_addrs(), vec![first]);
    // The removed listener stops accepting (bounded wait for its task to close it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addrs[1]).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "removed listener still accepts"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(get(&c, &format!("http://{first}/")).await.1, "b0");
    assert!(proxy.stop().await);
}

/// `GET /metrics` with `accept`: its content type and body.
async fn scrape(c: &reqwest::Client, url: &str, accept: Option<&str>) -> (String, String) {
    let mut request = c.get(url);
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let r = request.send().await.expect("scrape");
    assert_eq!(r.status(), 200);
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (content_type, r.text().await.expect("body"))
}

/// Python's `prometheus_client` parsers (Debian `python3-prometheus-client`,
/// the reference implementation) over `text`: `[name, type, samples]` per
/// family, as JSON.
fn python_parse(text: &str, openmetrics: bool) -> Value {
    use std::io::Write;
    let module = if openmetrics {
        "prometheus_client.openmetrics.parser"
    } else {
        "prometheus_client.parser"
    };
    let script = format!(
        "import json, sys\nfrom {module} import text_string_to_metric_families as parse\n\
         print(json.dumps([[f.name, f.type, [[s.name, s.labels, s.value] for s in f.samples]] \
         for f in parse(sys.stdin.read())]))"
    );
    // Debian's interpreter, where the Debian package installs the module
    // (a pyenv or venv python3 earlier on PATH would not see it).
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut child = std::process::Command::new(python)
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition (python3-prometheus-client; .ci/run installs it): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

/// The value of the sample `name` with `labels` (a subset) in Python's parse.
fn python_sample(families: &Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families.as_array()?.iter().find_map(|f| {
        f[2].as_array()?.iter().find_map(|s| {
            let matches = s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v);
            matches.then(|| s[2].as_f64()).flatten()
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_negotiated_and_read_by_real_parsers_in_both_formats() {
    use openmetrics_parser::{OpenMetricsType, PrometheusType, PrometheusValue};
    let (backends, proxy) = round_robin_after_four_requests().await;
    let c = client();
    let drained = c
        .put(proxy.admin_url(&format!(
            "/upstreams/app/backends/{}/state",
            backends[1].addr
        )))
        .body("drain")
        .send()
        .await
        .expect("drain");
    assert_eq!(drained.status(), 200);
    let url = proxy.admin_url("/metrics");
    let (b0, b1) = (backends[0].addr.to_string(), backends[1].addr.to_string());

    // Text 0.0.4 without Accept (curl), and for `text/plain` scrapers.
    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let (content_type, body) = scrape(&c, &url, accept).await;
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert!(!body.contains("# EOF"), "{body}");
    }
    let (_, body) = scrape(&c, &url, None).await;
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&body)
        .unwrap_or_else(|e| panic!("not text 0.0.4: {e:?}\n{body}"));
    let family = |name: &str| {
        parsed
            .families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name}:\n{body}"))
    };
    let requests = family("wasmlb_requests_total");
    assert_eq!(requests.family_type, PrometheusType::Counter);
    let count = |family: &openmetrics_parser::PrometheusMetricFamily, labels: &[(&str, &str)]| {
        family
            .iter_samples()
            .find(|s| {
                let set = s.get_labelset().expect("labels");
                labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
            })
            .map(|s| match &s.value {
                PrometheusValue::Counter(c) => c.value.as_f64(),
                PrometheusValue::Gauge(g) => g.as_f64(),
                other => panic!("unexpected value {other:?}"),
            })
    };
    assert_eq!(
        count(requests, &[("backend", &b0), ("class", "2xx")]),
        Some(2.0)
    );
    // Counters of events that have not happened are there, at 0.
    for (name, labels) in [
        ("wasmlb_plugin_swaps_total", vec![("outcome", "error")]),
        ("wasmlb_reloads_total", vec![("outcome", "ok")]),
        (
            "wasmlb_requests_total",
            vec![("backend", "none"), ("class", "5xx")],
        ),
        ("wasmlb_retries_total", vec![("upstream", "app")]),
        ("wasmlb_outlier_ejections_total", vec![("upstream", "app")]),
        ("wasmlb_access_log_dropped_total", vec![]),
    ] {
        let f = family(name);
        assert_eq!(f.family_type, PrometheusType::Counter, "{name}");
        assert_eq!(count(f, &labels), Some(0.0), "{name} {labels:?}");
    }
    // Per-backend state: the drained backend is not up; both pass checks.
    for (name, backend, value) in [
        ("wasmlb_backend_up", &b0, 1.0),
        ("wasmlb_backend_up", &b1, 0.0),
        ("wasmlb_backend_check_passing", &b1, 1.0),
        ("wasmlb_backend_ejected", &b0, 0.0),
        ("wasmlb_backend_effective_weight", &b0, 1.0),
        ("wasmlb_backend_in_flight", &b1, 0.0),
    ] {
        let f = family(name);
        assert_eq!(f.family_type, PrometheusType::Gauge, "{name}");
        assert_eq!(
            count(f, &[("backend", backend)]),
            Some(value),
            "{name} {backend}"
        );
    }
    let rtt = count(
        family("wasmlb_backend_response_time_seconds"),
        &[("backend", &b0)],
    )
    .expect("a response-time sample");
    assert!(rtt > 0.0 && rtt < 5.0, "{rtt}");
    let info = family("wasmlb_plugin_info");
    let sample = info.iter_samples().next().expect("one plugin");
    let labels = sample.get_labelset().expect("labels");
    assert_eq!(
        labels.get_label_value("plugin"),
        Some(builtin_name("round-robin").as_str())
    );
    assert!(
        labels
            .get_label_value("digest")
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    // Python's reference parser: counters typed as counters, with samples;
    // no family of unknown type.
    let py = python_parse(&body, false);
    for f in py.as_array().expect("families") {
        assert_ne!(f[1], "unknown", "{f}");
    }
    let requests = py
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f[0] == "wasmlb_requests"))
        .expect("wasmlb_requests");
    assert_eq!(requests[1], "counter");
    assert!(!requests[2].as_array().expect("samples").is_empty());
    assert_eq!(
        python_sample(&py, "wasmlb_backend_up", &[("backend", &b1)]),
        Some(0.0)
    );

    // OpenMetrics for a scraper that prefers it (Prometheus's own Accept).
    let prometheus_accept = "application/openmetrics-text;version=1.0.0;q=0.5,\
        application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let (content_type, body) = scrape(&c, &url, Some(prometheus_accept)).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&body)
        .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{body}"));
    let requests = parsed
        .families
        .get("wasmlb_requests")
        .unwrap_or_else(|| panic!("no wasmlb_requests:\n{body}"));
    assert_eq!(requests.family_type, OpenMetricsType::Counter);
    assert!(requests.iter_samples().count() >= 5);
    let py = python_parse(&body, true);
    assert_eq!(
        python_sample(
            &py,
            "wasmlb_requests_total",
            &[("backend", &b0), ("class", "2xx")]
        ),
        Some(2.0)
    );
    assert_eq!(
        python_sample(&py, "wasmlb_backend_up", &[("backend", &b1)]),
        Some(0.0)
    );
    assert!(proxy.stop().await);
}
