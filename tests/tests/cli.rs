//! The real binary: `--check` on broken configs and plugins, streaming large
//! bodies with bounded memory, and graceful shutdown on SIGTERM.

use std::time::{Duration, Instant};

use wasmlb_tests::{
    ConfigFile, ProxyProcess, TestBackend, app_config, backend_list, builtin_name, check, client,
    pattern_body, pattern_digest, plugins,
};

fn with_plugin(plugin: &str, extra: &str) -> String {
    app_config(plugin, r#"{ address = "127.0.0.1:9" }"#, extra)
}

fn check_fails(toml: &str, expected: &[&str]) {
    let file = ConfigFile::new(toml);
    let (code, stdout, stderr) = check(&file.path);
    assert_ne!(code, 0, "expected failure, got stdout {stdout:?}");
    for e in expected {
        assert!(stderr.contains(e), "stderr lacks {e:?}:\n{stderr}");
    }
}

#[test]
fn check_rejects_broken_configs_naming_file_line_and_key() {
    let file_hint = "wasmlb.toml:";
    check_fails(
        &with_plugin("round-robin", "bogus_key = 1"),
        &[file_hint, "unknown field `bogus_key`"],
    );
    check_fails(
        &with_plugin("round-robin", "").replace("upstream = \"app\"", "upstream = \"nope\""),
        &["wasmlb.toml:3: listener[0].upstream: no upstream named \"nope\""],
    );
    check_fails(
        &with_plugin("round-robin", "").replace("127.0.0.1:9", "not-an-address"),
        &[
            "wasmlb.toml:7: upstream.app.backends[0].address",
            "not an IP:port",
        ],
    );
    check_fails(
        &with_plugin("missing.wasm", ""),
        &["upstream.app.plugin: plugin file", "missing.wasm not found"],
    );
    check_fails(
        &with_plugin("round-robin", "[upstream.app]\nplugin = \"round-robin\""),
        &["duplicate key"],
    );
}

#[test]
fn check_rejects_broken_plugins_naming_the_fault() {
    check_fails(
        &with_plugin(plugins::WASI_IMPORT, ""),
        &[
            "wasmlb.toml:6: upstream.app.plugin: plugin",
            "`wasi:filesystem/preopens@",
            "which wasmlb does not provide",
        ],
    );
    check_fails(
        &with_plugin(plugins::BAD_INIT, ""),
        &[
            "wasmlb.toml:6: upstream.app.plugin",
            "init failed: bad-init refuses every config",
        ],
    );
    check_fails(
        &with_plugin("round-robin", "[upstream.app.plugin_config]\nspeed = 3"),
        &[format!(
            "plugin {}: init failed: invalid plugin_config: unknown field `speed`",
            builtin_name("round-robin")
        )
        .as_str()],
    );
    let junk = ConfigFile::new("");
    let junk_wasm = junk.dir().join("junk.wasm");
    std::fs::write(&junk_wasm, b"\0asm but not really").unwrap();
    check_fails(
        &with_plugin(junk_wasm.to_str().unwrap(), ""),
        &["junk.wasm: not a valid WebAssembly component"],
    );
}

/// The corpus of config mistakes an operator makes in the first hour: each
/// error is `file:line: key.path: message`, with a hint where one helps.
#[test]
fn check_names_the_key_path_of_every_config_error() {
    check_fails(
        &with_plugin("round-robin", "")
            .replace("127.0.0.1:9\" }", "127.0.0.1:9\", weight = \"3\" }"),
        &["wasmlb.toml:7: upstream.app.backends[0].weight: invalid type: string \"3\""],
    );
    check_fails(
        &with_plugin("round-robin", "plugin = \"random\""),
        &["wasmlb.toml:8: upstream.app.plugin: duplicate key"],
    );
    check_fails(
        &with_plugin("round-robin", "").replace("[[listener]]", "[listener]"),
        &[
            "wasmlb.toml:1: listener: ",
            "write [[listener]] for each entry",
        ],
    );
    check_fails(
        &format!(
            "{}[[server]]\nidle_timeout_ms = 5\n",
            with_plugin("round-robin", "")
        ),
        &["server[0]: ", "write [server] once, not [[server]]"],
    );
    check_fails(
        &with_plugin("round-robin", "").replace("127.0.0.1:0", "::1:0"),
        &[
            "wasmlb.toml:2: listener[0].address: \"::1:0\" is not an IP:port address",
            "an IPv6 address goes in brackets: \"[::1]:0\"",
        ],
    );
    // Every timeout: zero is refused, naming the key.
    for (table, key) in [
        ("[server]", "shutdown_timeout_ms"),
        ("[server]", "header_read_timeout_ms"),
        ("[server]", "idle_timeout_ms"),
        ("", "connect_timeout_ms"),
        ("", "response_timeout_ms"),
        ("", "response_body_timeout_ms"),
        ("", "tunnel_idle_timeout_ms"),
        ("", "pool_idle_timeout_ms"),
        ("", "request_timeout_ms"),
        ("", "fail_timeout_ms"),
    ] {
        let prefix = if table.is_empty() {
            "upstream.app"
        } else {
            "server"
        };
        check_fails(
            &with_plugin("round-robin", &format!("{table}\n{key} = 0")),
            &[&format!(
                "wasmlb.toml:9: {prefix}.{key}: must be at least 1"
            )],
        );
    }
    // The access log: a bad format, an empty path, a directory that does
    // not exist (found when the file is opened), an unknown key.
    for (access_log, expected) in [
        (
            "path = \"a.log\"\nformat = \"xml\"",
            "wasmlb.toml:10: access_log.format: \"xml\" is not a format (use \"json\" or \"combined\")",
        ),
        (
            "path = \"\"",
            "wasmlb.toml:9: access_log.path: must be a file path",
        ),
        (
            "path = \"/nonexistent-wasmlb-dir/access.log\"",
            "wasmlb.toml:9: access_log.path: cannot open /nonexistent-wasmlb-dir/access.log",
        ),
        ("path = \"a.log\"\nbuffer = 4", "unknown field `buffer`"),
    ] {
        check_fails(
            &with_plugin("round-robin", &format!("[access_log]\n{access_log}")),
            &[expected],
        );
    }
    // A core module where a component belongs.
    let dir = ConfigFile::new("");
    let module = dir.dir().join("module.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").expect("write");
    check_fails(
        &with_plugin(module.to_str().expect("utf-8 path"), ""),
        &[
            "wasmlb.toml:6: upstream.app.plugin: plugin",
            "core WebAssembly module, not a component: build for wasm32-wasip2 with the wasmlb SDK",
        ],
    );
    // An address in use (as a running server would find it).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    check_fails(
        &with_plugin("round-robin", "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
        &[&format!(
            "wasmlb.toml:2: listener[0].address: cannot listen on 127.0.0.1:{port}"
        )],
    );
}

#[test]
fn check_accepts_the_example_plugin_by_path() {
    let file = ConfigFile::new(&with_plugin(
        plugins::HEADER_ROUTE,
        "[upstream.app.plugin_config]\nheader = \"x-user\"",
    ));
    let (code, stdout, stderr) = check(&file.path);
    assert_eq!((code, stdout.trim()), (0, "ok"), "{stderr}");
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_bounded_memory() {
    let backend = TestBackend::start("big").await;
    let toml = app_config("round-robin", &backend_list(&[&backend]), "");
    let proxy = ProxyProcess::spawn(&toml, 1);
    let c = client();
    // Warm up (first request, pools) before taking the baseline.
    assert_eq!(c.get(proxy.url("/")).send().await.unwrap().status(), 200);
    let baseline = proxy.memory_kib("VmRSS");

    let size = 64 * MIB;
    let (len, digest) = pattern_digest(size);
    let up = c
        .post(proxy.url("/upload"))
        .body(pattern_body(size))
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 200);
    assert_eq!(
        up.text().await.unwrap(),
        format!("{len} {digest}"),
        "upload checksum"
    );

    let mut down = c
        .get(proxy.url(&format!("/download?bytes={size}")))
        .send()
        .await
        .unwrap();
    assert_eq!(down.status(), 200);
    let mut h = sha2::Sha256::default();
    let mut got = 0u64;
    while let Some(chunk) = down.chunk().await.unwrap() {
        sha2::Digest::update(&mut h, &chunk);
        got += chunk.len() as u64;
    }
    let hex: String = sha2::Digest::finalize(h)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!((got, hex), (len, digest), "download checksum");

    let peak = proxy.memory_kib("VmHWM");
    let growth_mib = peak.saturating_sub(baseline) as f64 / 1024.0;
    eprintln!(
        "proxy RSS baseline {baseline} KiB, peak {peak} KiB, growth {growth_mib:.1} MiB for 2 x 64 MiB"
    );
    assert!(
        growth_mib < 16.0,
        "proxy memory grew by {growth_mib:.1} MiB while streaming 64 MiB bodies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let backend = TestBackend::start("b").await;
    let toml = app_config("round-robin", &backend_list(&[&backend]), "");
    let mut proxy = ProxyProcess::spawn(&toml, 1);
    let url = proxy.url("/slow?ms=800");
    let addr = proxy.addrs[0];
    let in_flight =
        tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || proxy.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the in-flight request completes"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "exit waited for the in-flight request"
    );
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "listener closed after exit"
    );
}

fn simulate(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(wasmlb_tests::wasmlb_bin())
        .arg("simulate")
        .args(args)
        .output()
        .expect("run wasmlb simulate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn simulate_reports_the_spread_of_a_built_in_strategy() {
    let (ok, report, err) = simulate(&[
        "--plugin",
        "round-robin",
        "--backends",
        "4",
        "--requests",
        "400",
    ]);
    assert!(ok, "{err}");
    assert_eq!(report.matches("    100   25.0%").count(), 4, "{report}");
    assert!(
        report.contains("Jain's index") && report.contains(": 1.000"),
        "{report}"
    );
}

#[test]
fn simulate_replays_a_trace_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    let lines: Vec<String> = (0..30)
        .map(|i| format!(r#"{{"at_ms": {i}, "client": "198.51.100.{i}:5000"}}"#))
        .collect();
    std::fs::write(&trace, lines.join("\n")).unwrap();
    let trace_arg = trace.display().to_string();
    // One /24: ip-hash puts all 30 on one backend, a hot spot of 3.
    let (ok, report, err) = simulate(&[
        "--plugin",
        "ip-hash",
        "--backends",
        "3",
        "--trace",
        &trace_arg,
    ]);
    assert!(ok, "{err}");
    assert!(report.contains("30  100.0%"), "{report}");
    assert!(
        report.contains("hot spot (largest share / its weight's share): 3.00"),
        "{report}"
    );

    std::fs::write(&trace, "{\"at_ms\": 0}\n{\"clinet\": \"x\"}\n").unwrap();
    let (ok, _, err) = simulate(&["--plugin", "ip-hash", "--trace", &trace_arg]);
    assert!(!ok);
    assert!(
        err.contains("trace.jsonl:2") && err.contains("clinet"),
        "{err}"
    );
    let (ok, _, err) = simulate(&[
        "--plugin",
        "round-robin",
        "--backends",
        "3",
        "--weights",
        "1,2",
    ]);
    assert!(!ok);
    assert!(err.contains("--weights: 2 values for 3 backends"), "{err}");
    let (ok, _, err) = simulate(&["--plugin", "no-such-strategy"]);
    assert!(!ok);
    assert!(
        err.contains("--plugin") && err.contains("no-such-strategy"),
        "{err}"
    );
}

/// The `plugin disk cache` log line's `read` and `compiled` fields.
fn disk_cache_counts(proxy: &ProxyProcess) -> (u64, u64) {
    let line = proxy
        .log_lines()
        .into_iter()
        .find(|l| l.contains("plugin disk cache"))
        .expect("a `plugin disk cache` line at info");
    let field = |name: &str| -> u64 {
        let at = line.find(&format!("{name}=")).expect(name) + name.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a count")
    };
    (field("read"), field("compiled"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_its_plugins_from_the_disk_cache_instead_of_compiling() {
    let backend = TestBackend::start("b").await;
    let cache = tempfile::tempdir().unwrap();
    let toml = app_config(
        "least-connections",
        &backend_list(&[&backend]),
        &format!(
            "\n[server]\nplugin_cache_dir = \"{}\"\n",
            cache.path().display()
        ),
    );
    let launch = wasmlb_tests::Launch {
        capture_log: true,
        log_level: Some("info"),
        ..wasmlb_tests::Launch::default()
    };
    let mut first = ProxyProcess::launch(&toml, 1, &launch);
    assert_eq!(
        disk_cache_counts(&first),
        (0, 1),
        "nothing to read yet, one plugin compiled"
    );
    let cold_peak = first.memory_kib("VmHWM");
    let c = client();
    assert_eq!(c.get(first.url("/")).send().await.unwrap().status(), 200);
    assert!(first.terminate().success());

    let mut second = ProxyProcess::launch(&toml, 1, &launch);
    assert_eq!(disk_cache_counts(&second), (1, 0), "read, not compiled");
    let warm_peak = second.memory_kib("VmHWM");
    for _ in 0..3 {
        let r = c.get(second.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "hello from b");
    }
    // Without the compiler's code and working memory the process starts
    // smaller (a release build: about 24 -> 15 MiB).
    assert!(
        warm_peak < cold_peak,
        "peak RSS {warm_peak} KiB from the cache, {cold_peak} KiB compiling"
    );
    assert!(second.terminate().success());

    // Unset (the default) or empty: no disk cache, no line, nothing read.
    for extra in ["", "\n[server]\nplugin_cache_dir = \"\"\n"] {
        let off = app_config("least-connections", &backend_list(&[&backend]), extra);
        let proxy = ProxyProcess::launch(&off, 1, &launch);
        assert_eq!(c.get(proxy.url("/")).send().await.unwrap().status(), 200);
        let lines = proxy.log_lines();
        assert!(
            !lines.iter().any(|l| l.contains("plugin disk cache")),
            "{extra:?}: {lines:?}"
        );
    }
}

#[test]
fn check_rejects_a_plugin_cache_dir_that_cannot_be_a_folder() {
    check_fails(
        &with_plugin(
            "round-robin",
            "\n[server]\nplugin_cache_dir = \"/dev/null/cache\"",
        ),
        &[
            "wasmlb.toml:10: server.plugin_cache_dir: cannot create folder \"/dev/null/cache\"",
            "Not a directory",
        ],
    );
}

/// Polls the proxy's log (bounded) until a line contains `needle`.
async fn wait_for_log_line(proxy: &ProxyProcess, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = proxy.log_lines().into_iter().find(|l| l.contains(needle)) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within 10 s: {:?}",
            proxy.log_lines()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_naming_a_plugin_cache_dir_keeps_serving_and_defers_it_to_restart() {
    let backend = TestBackend::start("b").await;
    let config = |extra: &str| app_config("round-robin", &backend_list(&[&backend]), extra);
    let launch = wasmlb_tests::Launch {
        capture_log: true,
        log_level: Some("info"),
        ..wasmlb_tests::Launch::default()
    };
    let proxy = ProxyProcess::launch(&config(""), 1, &launch);
    let c = client();

    // A folder that cannot be one: the reload is rejected, naming the key,
    // and the running config keeps serving.
    proxy.rewrite_config(&config(
        "\n[server]\nplugin_cache_dir = \"/dev/null/cache\"\n",
    ));
    proxy.signal("HUP");
    let rejected = wait_for_log_line(&proxy, "reload rejected").await;
    assert!(
        rejected.contains("server.plugin_cache_dir: cannot create folder"),
        "{rejected}"
    );
    assert_eq!(c.get(proxy.url("/")).send().await.unwrap().status(), 200);

    // A good folder: the reload applies, warns that the folder waits for a
    // restart, and the running runtime stays without a disk cache.
    let cache = tempfile::tempdir().unwrap();
    proxy.rewrite_config(&config(&format!(
        "\n[server]\nplugin_cache_dir = \"{}\"\n",
        cache.path().display()
    )));
    proxy.signal("HUP");
    wait_for_log_line(
        &proxy,
        "server.plugin_cache_dir changed: it takes effect at the next start",
    )
    .await;
    assert_eq!(c.get(proxy.url("/")).send().await.unwrap().status(), 200);
    assert!(
        !proxy
            .log_lines()
            .iter()
            .any(|l| l.contains("plugin disk cache")),
        "{:?}",
        proxy.log_lines()
    );
}
