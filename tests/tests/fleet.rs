//! A fleet of three wasmlb instances sharing plugins through a real etcd:
//! `wasmlb fleet publish` swaps every instance under load with no failed
//! request; a trapping plugin published with `--canary 1` is rolled back by
//! its one instance by itself while the other two never swap, and `fleet
//! status` says why; assignments and plugins that are not what they claim
//! are refused by name and change nothing.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmlb_tests::etcd::EtcdServer;
use wasmlb_tests::plugins::{ROUND_ROBIN_WIT_0_1_0, TRAP};
use wasmlb_tests::{
    InProcessProxy, TestBackend, app_config, assert_all_ok, backend_list, collect, load,
    wait_until, wasmlb_bin,
};

const PREFIX: &str = "/fleet-test/";

/// `wasmlb fleet ARGS --endpoints E --prefix P`: (exit code, stdout, stderr).
fn fleet(etcd: &EtcdServer, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(wasmlb_bin())
        .arg("fleet")
        .args(args)
        .args(["--endpoints", &etcd.endpoint, "--prefix", PREFIX])
        .output()
        .expect("run wasmlb fleet");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(etcd: &EtcdServer) -> serde_json::Value {
    let (code, out, err) = fleet(etcd, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("status JSON")
}

fn digest_of(path: &str) -> String {
    wasmlb::plugin::digest(&std::fs::read(path).expect("plugin file"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_swaps_under_load_and_a_failing_canary_rolls_itself_back() {
    let etcd = EtcdServer::start();
    let backends = TestBackend::start_many(2).await;
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let mut proxies = Vec::new();
    for n in 1..=3 {
        let extra = format!(
            "[fleet]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\ninstance = \"lb-{n}\"\nlease_ttl_ms = 3000\n",
            etcd.endpoint
        );
        proxies.push(
            InProcessProxy::start(&app_config("round-robin", &backend_list(&refs), &extra)).await,
        );
    }
    wait_until("three instances to register", || {
        status_json(&etcd)["instances"]
            .as_array()
            .is_some_and(|a| a.len() == 3)
    })
    .await;
    let (code, out, _) = fleet(&etcd, &["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("lb-1") && out.contains("lb-3") && out.contains("configured plugin"),
        "{out}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for p in &proxies {
        clients.extend(load(p.url("/"), 6, stop.clone()));
    }

    // Publish to everyone: every instance swaps.
    let good = digest_of(ROUND_ROBIN_WIT_0_1_0);
    let (code, out, err) = fleet(
        &etcd,
        &["publish", "--upstream", "app", ROUND_ROBIN_WIT_0_1_0],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&good) && out.contains("every instance"),
        "{out}"
    );
    wait_until("every instance to run the published plugin", || {
        proxies
            .iter()
            .all(|p| p.upstream("app").plugin().digest() == good)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A trapping plugin as a canary on one instance.
    let trap = digest_of(TRAP);
    let (code, out, err) = fleet(
        &etcd,
        &["publish", "--upstream", "app", "--canary", "1", TRAP],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("canary on lb-1"), "{out}");
    let deadline = tokio::time::Instant::now() + wasmlb_tests::WAIT;
    loop {
        // The other two never run it.
        for p in &proxies[1..] {
            assert_eq!(
                p.upstream("app").plugin().digest(),
                good,
                "a non-canary instance swapped"
            );
        }
        let s = status_json(&etcd);
        let lb1 = &s["instances"][0]["upstreams"]["app"];
        if lb1["rolled_back"]["digest"] == trap.as_str() {
            let reason = lb1["rolled_back"]["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("decisions failed"), "{reason}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lb-1 did not roll back: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until("lb-1 to run the good plugin again", || {
        proxies[0].upstream("app").plugin().digest() == good
    })
    .await;
    let (_, out, _) = fleet(&etcd, &["status"]);
    assert!(
        out.contains("ROLLED BACK") && out.contains("canary on lb-1"),
        "{out}"
    );
    // Promoting a canary that rolled back is refused without --force.
    let (code, _, err) = fleet(&etcd, &["promote", "--upstream", "app"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("lb-1 rolled") && err.contains("--force"),
        "{err}"
    );
    // A reload restores the configured plugin; the fleet's comes back.
    proxies[1].control().reload().await.expect("reload");
    wait_until(
        "lb-2 to run the fleet's plugin again after its reload",
        || proxies[1].upstream("app").plugin().digest() == good,
    )
    .await;
    // Rolling back restores the good plugin's assignment everywhere.
    let (code, out, err) = fleet(&etcd, &["rollback", "--upstream", "app"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&good) && out.contains("every instance"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in &proxies {
        assert_eq!(p.upstream("app").plugin().digest(), good);
    }

    // Hostile fleet data: each is refused by name, nothing changes.
    let mut kv = etcd.client().await;
    let fake = format!("sha256:{}", "ab".repeat(32));
    kv.put(
        format!("{PREFIX}plugins/{}", "ab".repeat(32)),
        std::fs::read(TRAP).unwrap(),
        None,
    )
    .await
    .unwrap();
    let forged = serde_json::json!({"digest": fake, "published_unix_ms": 1, "name": "forged.wasm"});
    kv.put(format!("{PREFIX}assignments/app"), forged.to_string(), None)
        .await
        .unwrap();
    wait_until("every instance to refuse the forged digest", || {
        let s = status_json(&etcd);
        s["instances"].as_array().is_some_and(|a| {
            a.iter().all(|i| {
                i["upstreams"]["app"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("not") && e.contains(&fake))
            })
        })
    })
    .await;
    kv.put(format!("{PREFIX}assignments/app"), "not json", None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in &proxies {
        assert_eq!(
            p.upstream("app").plugin().digest(),
            good,
            "hostile data changed a plugin"
        );
    }

    stop.store(true, Ordering::Relaxed);
    let seen = collect(clients).await;
    assert_all_ok(&seen);
    for p in proxies {
        assert!(p.stop().await);
    }
    // Stopped instances revoke their leases: the status empties at once.
    let s = status_json(&etcd);
    assert_eq!(s["instances"].as_array().map(Vec::len), Some(0), "{s}");
}

#[test]
fn fleet_commands_refuse_bad_input_with_a_reason() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("x.wasm");
    std::fs::write(&not_wasm, "hello").unwrap();
    let big = dir.path().join("big.wasm");
    let mut bytes = b"\0asm".to_vec();
    bytes.resize(1_600_000, 0);
    std::fs::write(&big, bytes).unwrap();
    let nw = not_wasm.to_str().unwrap();
    let cases: [(Vec<&str>, &str); 7] = [
        (
            vec!["publish", "--upstream", "app", nw],
            "not a WebAssembly component",
        ),
        (
            vec!["publish", "--upstream", "app", big.to_str().unwrap()],
            "more than the 1500000",
        ),
        (
            vec!["publish", "--upstream", "app", "/nonexistent.wasm"],
            "/nonexistent.wasm:",
        ),
        (
            vec!["publish", "--upstream", "a/b", TRAP],
            "is not an upstream name",
        ),
        (
            vec!["publish", "--upstream", "app", "--canary", "1", TRAP],
            "no registered instance serves upstream",
        ),
        (
            vec!["promote", "--upstream", "app"],
            "has no fleet assignment",
        ),
        (
            vec!["rollback", "--upstream", "app"],
            "has no fleet assignment",
        ),
    ];
    for (args, want) in cases {
        let (code, _, err) = fleet(&etcd, &args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: got {err:?}, want {want:?}");
    }
    let out = Command::new(wasmlb_bin())
        .args(["fleet", "status", "--endpoints", "https://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS to etcd is not supported yet"));
}

#[test]
fn bad_fleet_config_is_refused_naming_the_key() {
    wasmlb_tests::assert_config_errors(&[
        ("[fleet]\n", "fleet.endpoints: needs endpoints"),
        (
            "[fleet]\nendpoints = []\n",
            "fleet.endpoints: must name at least one endpoint",
        ),
        (
            "[fleet]\nendpoints = [\"https://127.0.0.1:2379\"]\n",
            "TLS to etcd is not supported yet",
        ),
        (
            "[fleet]\nendpoints = [\"127.0.0.1:2379\"]\n",
            "is not an http://host:port URL",
        ),
        (
            "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"\"\n",
            "fleet.prefix: must not be empty",
        ),
        (
            "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\ninstance = \"a/b\"\n",
            "fleet.instance: must be 1 to 200 bytes without '/'",
        ),
        (
            "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\nlease_ttl_ms = 500\n",
            "fleet.lease_ttl_ms: must be from 2000 to 3600000",
        ),
        (
            "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\nrollback_failure_percent = 101\n",
            "fleet.rollback_failure_percent: a percentage is at most 100",
        ),
        (
            "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\nrollback_min_requests = 0\n",
            "fleet.rollback_min_requests: must be from 1 to",
        ),
        (
            "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\ncanary = 1\n",
            "unknown field `canary`",
        ),
    ]);
}
