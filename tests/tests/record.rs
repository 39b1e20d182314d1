//! The trace recorder through the real proxy: a recorded run replayed by
//! `wasmlb simulate --trace` against the same backend addresses gives the
//! live per-backend share, and the trace holds only the headers the plugin
//! read.

use std::process::Command;

use wasmlb_tests::{InProcessProxy, TestBackend, app_config, backend_list, client, wasmlb_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_trace_replays_to_the_live_share() {
    let backends = TestBackend::start_many(3).await;
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let extra = "[upstream.app.plugin_config]\nhash_on = \"header\"\nname = \"x-user\"\n\
                 [upstream.app.record]\npath = \"trace.jsonl\"\n";
    let proxy = InProcessProxy::start(&app_config("ring-hash", &backend_list(&refs), extra)).await;
    let c = client();
    let requests = 600;
    let mut tasks = Vec::new();
    for worker in 0..6 {
        let (c, url) = (c.clone(), proxy.url("/item"));
        tasks.push(tokio::spawn(async move {
            for i in 0..requests / 6 {
                let user = format!("user-{}", (worker * 1000 + i) % 97);
                let r = c
                    .get(format!("{url}/{i}?q=1"))
                    .header("x-user", user)
                    .header("cookie", "session=secret")
                    .send()
                    .await
                    .expect("request");
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let trace = proxy.config_dir().join("trace.jsonl");
    let live: Vec<u64> = backends.iter().map(TestBackend::hits).collect();
    // The writer flushes every 100 ms.
    let deadline = std::time::Instant::now() + wasmlb_tests::WAIT;
    let text = loop {
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        if text.lines().count() == requests {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} lines",
            text.lines().count()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let headers = first["headers"].as_object().unwrap();
    assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-user"], "{first}");
    assert!(
        !text.contains("secret"),
        "a header the plugin never read was recorded"
    );
    assert_eq!(first["status"], 200);
    assert!(first["path"].as_str().unwrap().starts_with("/item/"));
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);

    // Replayed against the same addresses, the simulation gives each
    // backend the share it had live (ring-hash on x-user: the very same
    // backends).
    let addresses: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let out = Command::new(wasmlb_bin())
        .args(["simulate", "--plugin", "ring-hash", "--plugin-config"])
        .arg(r#"{"hash_on": "header", "name": "x-user"}"#)
        .arg("--trace")
        .arg(&trace)
        .args(["--addresses", &addresses.join(",")])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (b, live) in backends.iter().zip(&live) {
        let row = report
            .lines()
            .find(|l| l.starts_with(&b.addr.to_string()))
            .unwrap_or_else(|| panic!("{report}"));
        let simulated: u64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
        let diff = (simulated as f64 - *live as f64).abs() / requests as f64;
        assert!(
            diff <= 0.02,
            "{}: live {live}, simulated {simulated}\n{report}",
            b.addr
        );
    }
    assert!(report.contains("recorded live"), "{report}");
    assert!(proxy.stop().await);
}

#[test]
fn bad_record_config_is_refused_naming_the_key() {
    let cases = [
        ("[upstream.app.record]\n", "missing field `path`"),
        (
            "[upstream.app.record]\npath = \"t.jsonl\"\nsample_percent = 0\n",
            "upstream.app.record.sample_percent: must be from 1 to 100",
        ),
        (
            "[upstream.app.record]\npath = \"t.jsonl\"\nmax_bytes = 0\n",
            "upstream.app.record.max_bytes: must be at least 1",
        ),
        (
            "[upstream.app.record]\npath = \"t.jsonl\"\nformat = \"x\"\n",
            "unknown field `format`",
        ),
        (
            "[upstream.app.record]\npath = \"no-such-dir/t.jsonl\"\n",
            "upstream.app.record.path: cannot open the trace file",
        ),
    ];
    wasmlb_tests::assert_config_errors(&cases);
}
