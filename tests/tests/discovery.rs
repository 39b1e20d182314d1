//! Backends that change while wasmlb serves: a `kind = "file"` discovery
//! source (re-read on change, a bad file keeps the last good set), and the
//! admin API's add and remove (HAProxy `add server` / `del server`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmlb_tests::{
    ConfigFile, InProcessProxy, Mode, TestBackend, WAIT, app_config, assert_all_ok, backend_list,
    check, client, collect, load, wait_until,
};

/// Replace `path` atomically (write a sibling, rename over), as tools that
/// publish backend lists do.
fn publish(path: &Path, text: &str) {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).expect("write the list");
    std::fs::rename(&tmp, path).expect("rename over the list");
}

fn list_of(backends: &[&TestBackend]) -> String {
    let entries: Vec<String> = backends
        .iter()
        .map(|b| format!(r#"{{"address": "{}"}}"#, b.addr))
        .collect();
    format!("[{}]", entries.join(",\n "))
}

/// The addresses of `backends`, as the admin API and the harness show them.
fn addrs(backends: &[&TestBackend]) -> Vec<String> {
    backends.iter().map(|b| b.addr.to_string()).collect()
}

/// `POST /upstreams/{upstream}/backends` with `body`.
async fn add_backend(proxy: &InProcessProxy, upstream: &str, body: String) -> reqwest::Response {
    client()
        .post(proxy.admin_url(&format!("/upstreams/{upstream}/backends")))
        .body(body)
        .send()
        .await
        .expect("POST backends")
}

const DISCOVERY: &str = "[upstream.app.discovery]\nkind = \"file\"\npath = \"backends.json\"\nrefresh_interval_ms = 50\n\
     [admin]\naddress = \"127.0.0.1:0\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_source_changes_the_set_under_load_and_a_bad_file_changes_nothing() {
    let backends = TestBackend::start_many(3).await;
    let (b1, b2, b3) = (&backends[0], &backends[1], &backends[2]);
    let first = list_of(&[b1]);
    let proxy = InProcessProxy::start_with(&app_config("round-robin", "", DISCOVERY), |dir| {
        std::fs::write(dir.join("backends.json"), &first).expect("list");
    })
    .await;
    let file = proxy.config_dir().join("backends.json");
    assert_eq!(proxy.backend_addresses("app"), [b1.addr.to_string()]);

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(proxy.url("/"), 16, stop.clone());

    // Joins: traffic reaches the new backends.
    publish(&file, &list_of(&[b1, b2, b3]));
    wait_until("b2 and b3 to get traffic", || {
        b2.hits() > 0 && b3.hits() > 0
    })
    .await;

    // Bad files: the set stays, traffic flows.
    let bad = [
        "not json".to_string(),
        String::new(),
        r#"[{"address": "localhost:9001"}]"#.to_string(),
        r#"[{"address": "127.0.0.1:1", "weight": 0}]"#.to_string(),
        r#"[{"address": "127.0.0.1:1", "extra": true}]"#.to_string(),
        format!("[{}]", r#"{"address": "127.0.0.1:1"},"#.repeat(200_000)),
        "[".repeat(10_000),
        format!("{},", list_of(&[b1])),
    ];
    for text in &bad {
        publish(&file, text);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let want: Vec<String> = [b1, b2, b3].iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(
            proxy.backend_addresses("app"),
            want,
            "after a bad file: {:.60}",
            text
        );
    }

    // Leaves: b1 gets nothing more, and no request fails.
    publish(&file, &list_of(&[b2, b3]));
    proxy.wait_for_backends("app", &addrs(&[b2, b3])).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b1_hits = b1.hits();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(clients).await;
    assert_all_ok(&seen);
    assert_eq!(b1.hits(), b1_hits, "a removed backend got traffic");

    // The admin API leaves a discovery-managed upstream alone.
    let c = client();
    let r = add_backend(
        &proxy,
        "app",
        format!(r#"{{"address": "{}"}}"#, b1.addr).to_string(),
    )
    .await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("discovery source"));
    let r = c
        .delete(proxy.admin_url(&format!("/upstreams/app/backends/{}", b2.addr)))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 409);
    assert!(proxy.stop().await);
}

#[test]
fn bad_discovery_config_is_refused_naming_the_key_and_the_file() {
    let cases: [(&str, Option<&str>, &str); 6] = [
        (
            "[upstream.app.discovery]\nkind = \"file\"\npath = \"backends.json\"\n",
            Some("[{\"address\": \"127.0.0.1:1\"},\n {\"address\": \"nope\"}]"),
            "upstream.app.discovery.path: ",
        ),
        (
            "[upstream.app.discovery]\nkind = \"file\"\npath = \"missing.json\"\n",
            None,
            "upstream.app.discovery.path: ",
        ),
        (
            "[upstream.app.discovery]\nkind = \"file\"\n",
            None,
            "upstream.app.discovery.path: a file source needs path",
        ),
        (
            "[upstream.app.discovery]\nkind = \"consul\"\n",
            None,
            "upstream.app.discovery.kind: unknown discovery kind \"consul\"",
        ),
        (
            "[upstream.app.discovery]\nkind = \"file\"\npath = \"backends.json\"\nrefresh_interval_ms = 0\n",
            Some("[]"),
            "upstream.app.discovery.refresh_interval_ms: must be at least 1",
        ),
        (
            "[upstream.app.discovery]\nkind = \"file\"\npath = \"backends.json\"\nport = 1\n",
            Some("[]"),
            "upstream.app.discovery.port",
        ),
    ];
    for (extra, file, want) in cases {
        let config = ConfigFile::new(&app_config("round-robin", "", extra));
        if let Some(text) = file {
            std::fs::write(config.dir().join("backends.json"), text).unwrap();
        }
        let (code, _, stderr) = check(&config.path);
        assert_ne!(code, 0, "{extra}");
        assert!(
            stderr.contains(want),
            "{extra}\nwant {want:?} in:\n{stderr}"
        );
    }
    // The file's own place: FILE:LINE:COLUMN.
    let config = ConfigFile::new(&app_config("round-robin", "", cases[0].0));
    std::fs::write(config.dir().join("backends.json"), cases[0].1.unwrap()).unwrap();
    let (_, _, stderr) = check(&config.path);
    assert!(
        stderr.contains("backends.json:2:") && stderr.contains("\"nope\" is not an IP:port"),
        "{stderr}"
    );
    // Listed backends and a source exclude each other.
    let both = ConfigFile::new(&app_config(
        "round-robin",
        r#"{ address = "127.0.0.1:1" }"#,
        "[upstream.app.discovery]\nkind = \"file\"\npath = \"b.json\"\n",
    ));
    let (code, _, stderr) = check(&both.path);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("upstream.app.discovery: backends and discovery exclude each other"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_adds_and_removes_backends_without_failing_a_request() {
    let backends = TestBackend::start_many(3).await;
    let (b1, b2, b3) = (&backends[0], &backends[1], &backends[2]);
    let extra = "[upstream.app.health_check]\npath = \"/healthz\"\ninterval_ms = 50\n\
                 timeout_ms = 500\nunhealthy_threshold = 1\n\
                 [admin]\naddress = \"127.0.0.1:0\"\n";
    let proxy =
        InProcessProxy::start(&app_config("round-robin", &backend_list(&[b1]), extra)).await;
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(proxy.url("/"), 16, stop.clone());

    // Add b2 and b3 (b3 with a weight and labels).
    let r = add_backend(
        &proxy,
        "app",
        format!(r#"{{"address": "{}"}}"#, b2.addr).to_string(),
    )
    .await;
    assert_eq!(r.status(), 201);
    let r = add_backend(
        &proxy,
        "app",
        format!(
            r#"{{"address": "{}", "weight": 2, "labels": {{"zone": "b"}}}}"#,
            b3.addr
        )
        .to_string(),
    )
    .await;
    assert_eq!(r.status(), 201);
    let added: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (added["id"].as_u64(), added["weight"].as_u64()),
        (Some(2), Some(2))
    );
    wait_until("the added backends to get traffic", || {
        b2.hits() > 0 && b3.hits() > 0
    })
    .await;

    // The added backend is health-checked like a configured one.
    b3.set_healthy(false);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = c
            .get(proxy.admin_url("/upstreams/app"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if v["backends"][2]["state"] == "unhealthy" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b3 never failed its checks: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b3.set_healthy(true);

    // Hostile and conflicting bodies.
    let hostile = [
        ("not json", 400),
        ("", 400),
        (r#"{"address": "localhost:80"}"#, 400),
        (r#"{"address": "127.0.0.1:1", "weight": 0}"#, 400),
        (r#"{"address": "127.0.0.1:1", "weight": -1}"#, 400),
        (r#"{"address": "127.0.0.1:1", "state": "gone"}"#, 400),
        (r#"{"address": "127.0.0.1:1", "extra": 1}"#, 400),
        (r#"[{"address": "127.0.0.1:1"}]"#, 400),
        ("\u{0}\u{ff}", 400),
    ];
    for (body, status) in hostile {
        let r = add_backend(&proxy, "app", body.to_string()).await;
        assert_eq!(r.status(), status, "{body:?}");
    }
    let r = add_backend(
        &proxy,
        "app",
        format!(r#"{{"address": "{}"}}"#, b2.addr).to_string(),
    )
    .await;
    assert_eq!(r.status(), 409, "a duplicate");
    let r = add_backend(
        &proxy,
        "nope",
        format!(r#"{{"address": "{}"}}"#, b2.addr).to_string(),
    )
    .await;
    assert_eq!(r.status(), 404);
    for gone in [
        "/upstreams/app/backends/127.0.0.1:1",
        "/upstreams/app/backends/99",
        "/upstreams/nope/backends/0",
    ] {
        let r = c
            .delete(proxy.admin_url(gone))
            .send()
            .await
            .expect("delete");
        assert_eq!(r.status(), 404, "{gone}");
    }

    // Remove b1 under load: it drains, then leaves; nothing fails.
    let r = c
        .delete(proxy.admin_url(&format!("/upstreams/app/backends/{}", b1.addr)))
        .send()
        .await
        .expect("delete");
    assert!(r.status() == 200 || r.status() == 202, "{}", r.status());
    proxy.wait_for_backends("app", &addrs(&[b2, b3])).await;
    let b1_hits = b1.hits();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(clients).await;
    assert_all_ok(&seen);
    assert_eq!(b1.hits(), b1_hits, "a removed backend got traffic");

    // A slow request holds a removal until it ends (three requests: weighted
    // round-robin over b2 (weight 1) and b3 (weight 2) sends b2 one of any
    // three in a row).
    b2.set_mode(Mode::Delay(800));
    b3.set_mode(Mode::Delay(800));
    let before = b2.hits();
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let url = proxy.url("/");
            tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    wait_until("a request in flight on b2", || b2.hits() > before).await;
    let r = c
        .delete(proxy.admin_url(&format!("/upstreams/app/backends/{}", b2.addr)))
        .send()
        .await
        .expect("delete");
    let status = r.status();
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["removed"], false, "{body}");
    assert!(body["in_flight"].as_u64() >= Some(1), "{body}");
    assert!(
        proxy
            .backend_addresses("app")
            .contains(&b2.addr.to_string())
    );
    for request in slow {
        assert_eq!(request.await.expect("slow request").expect("sent"), 200);
    }
    proxy.wait_for_backends("app", &addrs(&[b3])).await;

    // A reload rebuilds the set from the config file.
    let r = c
        .post(proxy.admin_url("/reload"))
        .send()
        .await
        .expect("reload");
    assert_eq!(r.status(), 200);
    proxy.wait_for_backends("app", &addrs(&[b1])).await;
    assert!(proxy.stop().await);
}
