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

/// The access log's lines in `path` as JSON, once there are at least `n`.
async fn access_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + wasmlb_tests::WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} has {} of {n} lines:\n{text}",
            path.display(),
            text.lines().count()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// One JSON access-log line per request with every field: a 200 with a
/// body each way, a retry, a 502 with the proxy's reason, a fallback
/// decision and a refused request; then SIGUSR1 reopens the file after a
/// rotation, and `combined` lines follow NGINX's layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_records_every_request_with_every_field() {
    let live = TestBackend::start("live").await;
    let dead = closed_port();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("access.log");
    let toml = format!(
        "[access_log]\npath = \"{}\"\nformat = \"json\"\n\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [[route]]\npath_prefix = \"/dead\"\nupstream = \"dead\"\n\
         [[route]]\npath_prefix = \"/trap\"\nupstream = \"trap\"\n\n\
         [upstream.app]\nplugin = \"round-robin\"\nretries = 1\n\
         backends = [ {{ address = \"{dead}\" }}, {{ address = \"{}\" }} ]\n\
         [upstream.dead]\nplugin = \"round-robin\"\nretries = 0\n\
         backends = [ {{ address = \"{dead}\" }} ]\n\
         [upstream.trap]\nplugin = '{}'\nbackends = [ {{ address = \"{}\" }} ]\n",
        path.display(),
        live.addr,
        wasmlb_tests::plugins::TRAP,
        live.addr,
    );
    let proxy = ProxyProcess::launch(&toml, 1, &Launch::default());
    let c = client();
    // 1: round-robin starts on the dead backend: a retry reaches the live one.
    let r = c
        .post(proxy.url("/upload?x=1"))
        .body(vec![7u8; 1000])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let answer = r.text().await.expect("body");
    // 2: the live backend directly (round-robin's next).
    assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    // 3: a 502 from the proxy.
    assert_eq!(get(&c, &proxy.url("/dead/x")).await.0, 502);
    // 4: the plugin traps: the fallback decides.
    assert_eq!(get(&c, &proxy.url("/trap")).await.0, 200);
    // 5: refused before routing (two Host headers).
    let reply = wasmlb_tests::raw::h1_exchange(
        proxy.addrs[0],
        &[b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec()],
        wasmlb_tests::raw::After::Wait,
        1,
    )
    .await;
    let raw = String::from_utf8_lossy(&reply.raw);
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");

    let lines = access_lines(&path, 5).await;
    let retried = &lines[0];
    assert_eq!(retried["method"], "POST", "{retried}");
    assert_eq!(retried["path"], "/upload?x=1");
    assert_eq!(retried["protocol"], "HTTP/1.1");
    assert_eq!(retried["status"], 200);
    assert_eq!(retried["client"], "127.0.0.1");
    assert_eq!(retried["bytes_in"], 1000);
    assert_eq!(retried["bytes_out"], answer.len());
    assert_eq!(retried["upstream"], "app");
    assert_eq!(retried["backend"], live.addr.to_string());
    assert_eq!(retried["attempts"], 2);
    assert_eq!(retried["fallback"], false);
    assert_eq!(retried["error"], serde_json::Value::Null);
    assert!(retried["decision_us"].as_u64().is_some(), "{retried}");
    assert!(
        retried["duration_ms"].as_f64().is_some_and(|d| d > 0.0),
        "{retried}"
    );
    let time = retried["time"].as_str().expect("time");
    assert!(
        time.len() >= 20 && time.ends_with('Z') && time.contains('T'),
        "{time}"
    );
    assert_eq!(lines[1]["attempts"], 1);
    let failed = &lines[2];
    assert_eq!(failed["status"], 502, "{failed}");
    assert_eq!(failed["upstream"], "dead");
    assert_eq!(failed["backend"], dead.to_string());
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains(&dead.to_string())),
        "the proxy's reason: {failed}"
    );
    assert_eq!(lines[3]["fallback"], true, "{}", lines[3]);
    assert_eq!(lines[3]["status"], 200);
    let refused = &lines[4];
    assert_eq!(refused["status"], 400, "{refused}");
    assert_eq!(refused["upstream"], serde_json::Value::Null);
    assert_eq!(refused["backend"], serde_json::Value::Null);
    assert_eq!(refused["attempts"], 0);
    assert!(
        refused["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{refused}"
    );

    // Rotation: move the file away, SIGUSR1, and new lines go to a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    let signalled = std::process::Command::new("kill")
        .args(["-USR1", &proxy.pid().to_string()])
        .status()
        .expect("kill");
    assert!(signalled.success());
    let deadline = tokio::time::Instant::now() + wasmlb_tests::WAIT;
    while !path.exists() {
        assert!(tokio::time::Instant::now() < deadline, "not reopened");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    assert_eq!(access_lines(&path, 1).await.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&rotated)
            .expect("rotated")
            .lines()
            .count(),
        5
    );
    drop(proxy);

    // `combined`: NGINX's layout, plus request time, upstream, backend and
    // attempts.
    let combined_path = dir.path().join("combined.log");
    let toml = toml
        .replace(
            &path.display().to_string(),
            &combined_path.display().to_string(),
        )
        .replace("format = \"json\"", "format = \"combined\"");
    let proxy = ProxyProcess::launch(&toml, 1, &Launch::default());
    assert_eq!(get(&c, &proxy.url("/dead/q?a=b")).await.0, 502);
    let deadline = tokio::time::Instant::now() + wasmlb_tests::WAIT;
    let line = loop {
        let text = std::fs::read_to_string(&combined_path).unwrap_or_default();
        if let Some(l) = text.lines().next() {
            break l.to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "no combined line");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains("\"GET /dead/q?a=b HTTP/1.1\" 502 "), "{line}");
    assert!(line.ends_with(&format!(" dead {dead} 1")), "{line}");
}
