//! Backends written as `name:port`, resolved through a real DNS server
//! (dnsmasq on 127.0.0.1): the set follows the records under load with no
//! failed request, a dead DNS server keeps the last good set, and a name
//! that does not resolve at start is a config error naming it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmlb_tests::dns::DnsServer;
use wasmlb_tests::{
    ConfigFile, InProcessProxy, TestBackend, app_config, assert_all_ok, check, client, collect,
    free_port, load, wait_until,
};

/// Backends on 127.0.0.2.. at one port: what one name with several A
/// records points at.
async fn backends_at(port: u16, last_octets: &[u8]) -> Vec<TestBackend> {
    let mut out = Vec::new();
    for &o in last_octets {
        let addr = SocketAddr::from(([127, 0, 0, o], port));
        out.push(TestBackend::start_at(&format!("s{o}"), addr).await);
    }
    out
}

fn hosts(name: &str, last_octets: &[u8]) -> String {
    last_octets
        .iter()
        .map(|o| format!("127.0.0.{o} {name}\n"))
        .collect()
}

fn config(dns: &DnsServer, backends: &str) -> String {
    app_config(
        "round-robin",
        backends,
        &format!(
            "[dns]\nnameservers = [\"{}\"]\ndns_min_ttl_ms = 100\n[admin]\naddress = \"127.0.0.1:0\"\n",
            dns.addr
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_follows_its_records_under_load_and_outlives_its_dns_server() {
    let port = free_port();
    let servers = backends_at(port, &[2, 3, 4]).await;
    let mut dns = DnsServer::start(&hosts("app.test", &[2, 3]), 0);
    let static_backend = TestBackend::start("static").await;
    let proxy = InProcessProxy::start(&config(
        &dns,
        &format!(
            r#"{{ address = "app.test:{port}", labels = {{ via = "dns" }} }}, {{ address = "{}" }}"#,
            static_backend.addr
        ),
    ))
    .await;
    let mut want: Vec<String> = ["127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|ip| format!("{ip}:{port}"))
        .collect();
    want.push(static_backend.addr.to_string());
    assert_eq!(
        proxy.backend_addresses("app"),
        want,
        "resolved at start, in order"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(proxy.url("/"), 16, stop.clone());

    // A record added: its backend gets traffic.
    dns.set_hosts(&hosts("app.test", &[2, 3, 4]));
    wait_until("127.0.0.4 to get traffic", || servers[2].hits() > 0).await;

    // A record removed: its backend stops getting traffic.
    dns.set_hosts(&hosts("app.test", &[3, 4]));
    let mut want: Vec<String> = [3, 4]
        .iter()
        .map(|o| format!("127.0.0.{o}:{port}"))
        .collect();
    want.push(static_backend.addr.to_string());
    proxy.wait_for_backends("app", &want).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gone_hits = servers[0].hits();

    // The DNS server dies: the last good set keeps serving.
    dns.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kept = proxy.backend_addresses("app");
    assert!(kept.contains(&format!("127.0.0.3:{port}")), "{kept:?}");
    assert!(kept.contains(&format!("127.0.0.4:{port}")), "{kept:?}");
    assert_eq!(
        servers[0].hits(),
        gone_hits,
        "a removed backend got traffic"
    );

    // It comes back with a changed answer: the set follows again.
    dns.set_hosts(&hosts("app.test", &[2]));
    dns.restart(0);
    wait_until("127.0.0.2 to get traffic again", || {
        servers[0].hits() > gone_hits
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = collect(clients).await;
    assert_all_ok(&seen);
    let mut want = vec![format!("127.0.0.2:{port}")];
    want.push(static_backend.addr.to_string());
    assert_eq!(proxy.backend_addresses("app"), want);

    // A name-managed upstream is not edited through the admin API.
    let r = client()
        .post(proxy.admin_url("/upstreams/app/backends"))
        .body(r#"{"address": "127.0.0.9:1"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 409);
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ttl_paces_lookups() {
    // Two names over 3 s, both with a 100 ms floor: one with a TTL of 0
    // (asked about every 100 ms), one behind a server answering with a TTL
    // of 30 s (asked again only after 30 s, so once or twice). The bounds
    // are generous both ways: a slow machine asks less often, never more.
    let port = free_port();
    let _servers = backends_at(port, &[5]).await;
    let fast = DnsServer::start(&hosts("fast.test", &[5]), 0);
    let slow = DnsServer::start(&hosts("slow.test", &[5]), 30);
    let fast_proxy = InProcessProxy::start(&config(
        &fast,
        &format!(r#"{{ address = "fast.test:{port}" }}"#),
    ))
    .await;
    let slow_proxy = InProcessProxy::start(&config(
        &slow,
        &format!(r#"{{ address = "slow.test:{port}" }}"#),
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (f, s) = (fast.queries("fast.test"), slow.queries("slow.test"));
    assert!(f >= 5, "TTL 0, floor 100 ms: only {f} queries in 3 s");
    assert!(s <= 3, "TTL 30 s: {s} queries in 3 s");
    assert!(fast_proxy.stop().await && slow_proxy.stop().await);
}

#[test]
fn a_name_that_does_not_resolve_is_a_config_error_naming_it() {
    let dns = DnsServer::start("127.0.0.2 known.test\n", 0);
    let port = free_port();
    for (backends, want) in [
        (
            format!(r#"{{ address = "missing.test:{port}" }}"#),
            "upstream.app.backends[0].address: cannot resolve \"missing.test\"",
        ),
        (
            format!(r#"{{ address = "known.test:{port}" }}, {{ address = "KNOWN.test:{port}" }}"#),
            "upstream.app.backends[1].address: duplicate backend known.test",
        ),
        (
            r#"{ address = "bad name:80" }"#.to_string(),
            "upstream.app.backends[0].address: \"bad name:80\" is not an IP:port address",
        ),
        (
            r#"{ address = "known.test:http" }"#.to_string(),
            "upstream.app.backends[0].address",
        ),
        (
            r#"{ address = "known.test:70000" }"#.to_string(),
            "upstream.app.backends[0].address",
        ),
    ] {
        let file = ConfigFile::new(&config(&dns, &backends));
        let (code, _, stderr) = check(&file.path);
        assert_ne!(code, 0, "{backends}");
        assert!(
            stderr.contains(want),
            "{backends}: want {want:?} in\n{stderr}"
        );
    }
    for (extra, want) in [
        ("[dns]\nnameservers = [\"nowhere\"]\n", "dns.nameservers[0]"),
        (
            "[dns]\ndns_min_ttl_ms = 0\n",
            "dns.dns_min_ttl_ms: must be at least 1",
        ),
        (
            "[dns]\ndns_min_ttl_ms = 5000\ndns_max_ttl_ms = 1000\n",
            "dns.dns_min_ttl_ms: 5000 is more than dns_max_ttl_ms (1000)",
        ),
        ("[dns]\nresolver = \"x\"\n", "dns.resolver"),
    ] {
        let file = ConfigFile::new(&app_config("round-robin", "", extra));
        let (code, _, stderr) = check(&file.path);
        assert_ne!(code, 0, "{extra}");
        assert!(stderr.contains(want), "{extra}: want {want:?} in\n{stderr}");
    }
    // localhost comes from /etc/hosts with the system's resolver.
    let file = ConfigFile::new(&app_config(
        "round-robin",
        &format!(r#"{{ address = "localhost:{port}" }}"#),
        "",
    ));
    let (code, stdout, stderr) = check(&file.path);
    assert_eq!((code, stdout.trim()), (0, "ok"), "{stderr}");
}

/// `kind = "dns-srv"`: the lowest priority that resolves, weights from the
/// records, the set following the records under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_the_backends_by_priority_and_weight() {
    let port = free_port();
    let servers = backends_at(port, &[7, 8, 9]).await;
    let records = "127.0.0.7 a.test\n127.0.0.8 b.test\n127.0.0.9 c.test\n";
    let srv = |priority_c: u16| {
        [
            format!("_http._tcp.app.test,a.test,{port},10,1"),
            format!("_http._tcp.app.test,b.test,{port},10,3"),
            format!("_http._tcp.app.test,c.test,{port},{priority_c},5"),
        ]
    };
    let first = srv(20);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut dns = DnsServer::start_with_srv(records, &first, 0);
    let extra = format!(
        "[upstream.app.discovery]\nkind = \"dns-srv\"\nname = \"_http._tcp.app.test\"\n\
         [dns]\nnameservers = [\"{}\"]\ndns_min_ttl_ms = 100\n[admin]\naddress = \"127.0.0.1:0\"\n",
        dns.addr
    );
    let proxy = InProcessProxy::start(&app_config("round-robin", "", &extra)).await;
    let got: Vec<(String, u32)> = proxy
        .upstream("app")
        .backends()
        .iter()
        .map(|b| (b.address.to_string(), b.configured_weight))
        .collect();
    assert_eq!(
        got,
        [
            (format!("127.0.0.7:{port}"), 1),
            (format!("127.0.0.8:{port}"), 3)
        ],
        "priority 10 only, the records' weights"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(proxy.url("/"), 16, stop.clone());
    // c.test moves to priority 10: it joins.
    let joined = srv(10);
    let joined: Vec<&str> = joined.iter().map(String::as_str).collect();
    dns.set_srv(&joined, 0);
    wait_until("c.test to get traffic", || servers[2].hits() > 0).await;
    stop.store(true, Ordering::Relaxed);
    assert_all_ok(&collect(clients).await);
    assert!(
        servers[1].hits() > servers[0].hits(),
        "weight 3 over weight 1"
    );
    assert!(proxy.stop().await);

    // An SRV name that does not resolve is a config error naming it.
    let missing = extra.replace("_http._tcp.app.test", "_http._tcp.missing.test");
    let file = ConfigFile::new(&app_config("round-robin", "", &missing));
    let (code, _, stderr) = check(&file.path);
    assert_ne!(code, 0);
    assert!(
        stderr.contains(
            "upstream.app.discovery.name: cannot resolve SRV \"_http._tcp.missing.test\""
        ),
        "{stderr}"
    );
}
