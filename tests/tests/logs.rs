//! The process log: a `warn` line per proxy-made 5xx (rate-limited),
//! `--log-format json`, and the plugin runtime's crates kept quiet at
//! `--log-level debug`.

use wasmlb_tests::{
    Launch, ProxyProcess, TestBackend, app_config, backend_list, client, closed_port, get,
};

/// Every line of `proxy`'s log as JSON (panics on a line that is not).
fn json_lines(proxy: &ProxyProcess) -> Vec<serde_json::Value> {
    proxy
        .log_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_made_5xx_are_logged_at_warn_with_their_reason_and_rate_limited() {
    let dead = closed_port();
    let toml = app_config(
        "round-robin",
        &format!("{{ address = \"{dead}\" }}"),
        "retries = 0",
    );
    let proxy = ProxyProcess::launch(
        &toml,
        1,
        &Launch {
            capture_log: true,
            log_level: Some("info"),
            args: &["--log-format", "json"],
            ..Launch::default()
        },
    );
    let c = client();
    let started = std::time::Instant::now();
    for _ in 0..30 {
        assert_eq!(get(&c, &proxy.url("/some/path?q=1")).await.0, 502);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let errors = |lines: &[serde_json::Value]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("proxy answered 502"))
            })
            .cloned()
            .collect()
    };
    let lines = json_lines(&proxy);
    let first = errors(&lines);
    assert!(!first.is_empty(), "no line for the 502s: {lines:#?}");
    // At most 3 per second window: 30 errors cannot write 30 lines.
    assert!(
        first.len() as f64 <= 3.0 * (elapsed.ceil() + 1.0),
        "{} lines in {elapsed:.1} s",
        first.len()
    );
    let line = &first[0];
    assert_eq!(line["level"], "WARN", "{line}");
    let fields = &line["fields"];
    assert_eq!(fields["status"], 502, "{line}");
    assert_eq!(fields["upstream"], "app", "{line}");
    assert_eq!(fields["method"], "GET", "{line}");
    assert_eq!(fields["path"], "/some/path", "{line}");
    assert!(
        fields["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:"))
    );
    let message = fields["message"].as_str().expect("message");
    assert!(
        message.contains(&dead.to_string()) && message.contains("attempt 1"),
        "the detail names the backend and the attempt: {message}"
    );
    // After the window, the next line says how many were suppressed.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(get(&c, &proxy.url("/")).await.0, 502);
    let lines = json_lines(&proxy);
    let later = errors(&lines);
    let suppressed: u64 = later
        .iter()
        .filter_map(|l| l["fields"]["suppressed"].as_u64())
        .sum();
    assert_eq!(
        suppressed + later.len() as u64,
        31,
        "every 502 is either logged or counted as suppressed: {later:#?}"
    );
    // A client fault (a bad request) is not a proxy 5xx: no line.
    let before = errors(&lines).len();
    let r = c
        .get(proxy.url("/"))
        .header("content-length", "x")
        .send()
        .await;
    assert!(r.is_err() || r.is_ok_and(|r| r.status().is_client_error()));
    assert_eq!(errors(&json_lines(&proxy)).len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_keep_the_plugin_runtime_quiet_unless_named() {
    let backend = TestBackend::start("b0").await;
    let toml = app_config("round-robin", &backend_list(&[&backend]), "");
    for (level, runtime_lines_expected) in [("debug", false), ("debug,cranelift=debug", true)] {
        let proxy = ProxyProcess::launch(
            &toml,
            1,
            &Launch {
                capture_log: true,
                log_level: Some(level),
                args: &["--log-format", "json"],
                ..Launch::default()
            },
        );
        assert_eq!(get(&client(), &proxy.url("/")).await.0, 200);
        let lines = json_lines(&proxy);
        let runtime = lines
            .iter()
            .filter(|l| {
                l["target"].as_str().is_some_and(|t| {
                    wasmlb::logging::QUIET_TARGETS
                        .iter()
                        .any(|q| t.starts_with(q))
                        && l["level"] != "WARN"
                        && l["level"] != "ERROR"
                })
            })
            .count();
        assert_eq!(
            runtime > 0,
            runtime_lines_expected,
            "{level}: {runtime} plugin-runtime lines of {}",
            lines.len()
        );
        assert!(
            lines.iter().any(|l| l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("wasmlb"))),
            "{level}: wasmlb's own debug lines are there"
        );
        drop(proxy);
    }
}
