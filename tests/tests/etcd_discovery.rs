//! `kind = "etcd"` discovery against a real etcd: backends that register
//! with a lease join, those whose lease expires leave, hostile entries are
//! skipped by name, and an etcd outage keeps the last good set until the
//! watch resumes, all under load with no failed request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::PutOptions;
use wasmlb_tests::etcd::EtcdServer;
use wasmlb_tests::{
    ConfigFile, InProcessProxy, TestBackend, app_config, assert_all_ok, check, collect, load,
    wait_until,
};

fn discovery(endpoint: &str) -> String {
    format!(
        "[upstream.app.discovery]\nkind = \"etcd\"\nendpoints = [\"{endpoint}\"]\nprefix = \"/services/app/\"\n"
    )
}

fn entry(b: &TestBackend) -> String {
    format!(r#"{{"address": "{}", "labels": {{"zone": "a"}}}}"#, b.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registrations_join_and_expired_leases_leave_under_load() {
    let mut etcd = EtcdServer::start();
    let backends = TestBackend::start_many(3).await;
    let (b1, b2, b3) = (&backends[0], &backends[1], &backends[2]);
    let mut kv = etcd.client().await;
    kv.put("/services/app/b1", entry(b1), None).await.unwrap();
    let proxy =
        InProcessProxy::start(&app_config("round-robin", "", &discovery(&etcd.endpoint))).await;
    assert_eq!(proxy.backend_addresses("app"), [b1.addr.to_string()]);
    assert_eq!(
        proxy.upstream("app").backend_configs()[0].labels["zone"],
        "a"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(proxy.url("/"), 16, stop.clone());

    // b2 registers with a 2 s lease, kept alive by a task.
    let lease = kv.lease_grant(2, None).await.unwrap().id();
    let (mut keeper, mut acks) = kv.lease_keep_alive(lease).await.unwrap();
    let keeping = Arc::new(AtomicBool::new(true));
    let heartbeat = {
        let keeping = keeping.clone();
        tokio::spawn(async move {
            while keeping.load(Ordering::Relaxed) {
                keeper.keep_alive().await.unwrap();
                let _ = acks.message().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let registered = Instant::now();
    kv.put(
        "/services/app/b2",
        entry(b2),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    wait_until("b2 to get traffic", || b2.hits() > 0).await;
    println!("registered -> traffic: {:?}", registered.elapsed());

    // Hostile entries: each is skipped; the set stays b1, b2.
    let two = vec![b1.addr.to_string(), b2.addr.to_string()];
    let big = format!(
        r#"{{"address": "{}", "labels": {{"x": "{}"}}}}"#,
        b3.addr,
        "a".repeat(100_000)
    );
    let hostile: [(&str, String); 6] = [
        ("/services/app/not-json", "not json".into()),
        ("/services/app/nothost:80", "{}".into()),
        (
            "/services/app/bad-address",
            r#"{"address": "app.internal:80"}"#.into(),
        ),
        ("/services/app/oversized", big),
        (
            "/services/app/zero",
            format!(r#"{{"address": "{}", "weight": 0}}"#, b3.addr),
        ),
        ("/services/app/b1-again", entry(b1)),
    ];
    for (key, value) in &hostile {
        kv.put(*key, value.as_str(), None).await.unwrap();
    }
    // A later good put proves the watch got past them.
    kv.put(
        "/services/app/b1",
        format!(r#"{{"address": "{}", "weight": 2}}"#, b1.addr),
        None,
    )
    .await
    .unwrap();
    wait_until("b1's new weight", || {
        proxy
            .upstream("app")
            .backend_configs()
            .first()
            .is_some_and(|b| b.weight == 2)
    })
    .await;
    assert_eq!(proxy.backend_addresses("app"), two);
    for (key, _) in &hostile {
        kv.delete(*key, None).await.unwrap();
    }

    // b2 stops heartbeating: it leaves when its lease expires.
    keeping.store(false, Ordering::Relaxed);
    heartbeat.await.unwrap();
    let stopped = Instant::now();
    proxy.wait_for_backends("app", &[b1.addr.to_string()]).await;
    println!(
        "heartbeats stopped -> left the set: {:?} (lease TTL 2 s)",
        stopped.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b2_hits = b2.hits();

    // etcd dies: the set stays and traffic flows; it returns: the watch
    // resumes and sees b3.
    etcd.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(proxy.backend_addresses("app"), [b1.addr.to_string()]);
    etcd.restart();
    let mut kv = etcd.client().await;
    kv.put("/services/app/b3", entry(b3), None).await.unwrap();
    wait_until("b3 to get traffic after etcd's restart", || b3.hits() > 0).await;

    stop.store(true, Ordering::Relaxed);
    let seen = collect(clients).await;
    assert_all_ok(&seen);
    assert_eq!(
        b2.hits(),
        b2_hits,
        "a backend whose lease expired got traffic"
    );
    assert!(proxy.stop().await);
}

#[test]
fn bad_etcd_discovery_config_is_refused_naming_the_key() {
    let etcd = EtcdServer::start();
    let closed = wasmlb_tests::closed_port();
    let cases = [
        (
            "[upstream.app.discovery]\nkind = \"etcd\"\nprefix = \"/s/\"\n".to_string(),
            "upstream.app.discovery.endpoints: needs endpoints",
        ),
        (
            "[upstream.app.discovery]\nkind = \"etcd\"\nendpoints = []\nprefix = \"/s/\"\n".into(),
            "must name at least one endpoint",
        ),
        (
            "[upstream.app.discovery]\nkind = \"etcd\"\nendpoints = [\"https://127.0.0.1:1\"]\nprefix = \"/s/\"\n".into(),
            "TLS to etcd is not supported yet",
        ),
        (
            format!("[upstream.app.discovery]\nkind = \"etcd\"\nendpoints = [\"{}\"]\n", etcd.endpoint),
            "upstream.app.discovery.prefix: an etcd source needs prefix",
        ),
        (
            format!("[upstream.app.discovery]\nkind = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"/s/\"\npath = \"x\"\n", etcd.endpoint),
            "upstream.app.discovery.path: not a key of kind \"etcd\"",
        ),
        (
            format!("[upstream.app.discovery]\nkind = \"etcd\"\nendpoints = [\"http://{closed}\"]\nprefix = \"/s/\"\n"),
            "upstream.app.discovery.prefix: etcd http://",
        ),
    ];
    for (extra, want) in cases {
        let file = ConfigFile::new(&app_config("round-robin", "", &extra));
        let (code, _out, err) = check(&file.path);
        assert_eq!(code, 1, "{extra}: {err}");
        assert!(err.contains(want), "{extra}: got {err:?}, want {want:?}");
        assert!(err.contains("wasmlb.toml:"), "no file and line: {err}");
    }
    // A reachable etcd with an empty prefix is a valid, empty upstream.
    let file = ConfigFile::new(&app_config(
        "round-robin",
        "",
        &format!(
            "[upstream.app.discovery]\nkind = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"/s/\"\n",
            etcd.endpoint
        ),
    ));
    let (code, _out, err) = check(&file.path);
    assert_eq!(code, 0, "{err}");
}
