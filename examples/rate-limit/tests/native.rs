//! The rate limiter, natively: budgets, refills, keys and bounds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rate_limit::{RateLimit, network_key};
use wasmlb_sdk::prelude::*;
use wasmlb_sdk::testing::{MockContext, backends};

fn limiter(config: &str) -> RateLimit {
    let mut s: RateLimit = wasmlb_sdk::instantiate(config).unwrap();
    s.set_backends(backends(&[1, 1, 1]));
    s
}

fn status(d: &Decision) -> Option<(u16, String)> {
    match d {
        Decision::Respond(r) => {
            let retry = r.headers.iter().find(|(n, _)| n == "retry-after");
            Some((r.status, retry.map(|(_, v)| v.clone()).unwrap_or_default()))
        }
        _ => None,
    }
}

#[test]
fn a_burst_is_served_then_429_with_retry_after_then_refilled() {
    let mut s = limiter(r#"{"rate_per_second": 2, "burst": 3}"#);
    let set = backends(&[1, 1, 1]);
    let cx = MockContext::new(&set);
    cx.now_ns.set(1_000_000_000);
    let picks: Vec<Decision> = (0..3).map(|_| s.select(&cx)).collect();
    assert_eq!(
        picks,
        [
            Decision::Backend(0),
            Decision::Backend(1),
            Decision::Backend(2)
        ]
    );
    assert_eq!(status(&s.select(&cx)), Some((429, "1".into())));
    // Half a second later: one token (2 per second).
    cx.now_ns.set(1_500_000_000);
    assert_eq!(s.select(&cx), Decision::Backend(0));
    assert_eq!(status(&s.select(&cx)).unwrap().0, 429);
    // Long idle: refilled to the burst, not beyond.
    cx.now_ns.set(100_000_000_000);
    let served = (0..10).filter(|_| status(&s.select(&cx)).is_none()).count();
    assert_eq!(served, 3);
}

#[test]
fn a_slow_rate_asks_for_a_longer_wait() {
    let mut s = limiter(r#"{"rate_per_second": 0.1, "burst": 1}"#);
    let set = backends(&[1]);
    let cx = MockContext::new(&set);
    assert!(status(&s.select(&cx)).is_none());
    assert_eq!(status(&s.select(&cx)), Some((429, "10".into())));
}

#[test]
fn clients_are_keyed_by_network_or_by_header() {
    let set = backends(&[1, 1]);
    let mut s = limiter(r#"{"rate_per_second": 1, "burst": 1}"#);
    let a = MockContext::new(&set).with_client("203.0.113.7:1000".parse().unwrap());
    let same_24 = MockContext::new(&set).with_client("203.0.113.200:2000".parse().unwrap());
    let other = MockContext::new(&set).with_client("198.51.100.7:1000".parse().unwrap());
    assert!(status(&s.select(&a)).is_none());
    assert_eq!(
        status(&s.select(&same_24)).unwrap().0,
        429,
        "same /24, same bucket"
    );
    assert!(status(&s.select(&other)).is_none());
    let v6a: std::net::IpAddr = "2001:db8:1:2::1".parse().unwrap();
    let v6b: std::net::IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let v6c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(network_key(v6a), network_key(v6b));
    assert_ne!(network_key(v6a), network_key(v6c));

    let mut h = limiter(r#"{"rate_per_second": 1, "burst": 1, "header": "x-api-key"}"#);
    let k1 = MockContext::new(&set).with_header("x-api-key", "alpha");
    let k2 = MockContext::new(&set).with_header("x-api-key", "beta");
    assert!(status(&h.select(&k1)).is_none());
    assert!(
        status(&h.select(&k2)).is_none(),
        "another key, another bucket"
    );
    assert_eq!(status(&h.select(&k1)).unwrap().0, 429);
    // Without the header: the client's network.
    let bare = MockContext::new(&set);
    assert!(status(&h.select(&bare)).is_none());
}

#[test]
fn the_table_stays_bounded() {
    let mut s = limiter(r#"{"rate_per_second": 1, "burst": 2, "max_keys": 4}"#);
    for key in 0..100u64 {
        assert_eq!(s.take(key, 0), Ok(()), "a new key always has its burst");
    }
    // A flood of new keys never denies a new key, and never grows past 4.
    let set = backends(&[1]);
    let cx = MockContext::new(&set);
    assert!(status(&s.select(&cx)).is_none());
}

#[test]
fn bad_configs_are_refused() {
    for bad in [
        r#"{"rate_per_second": 0}"#,
        r#"{"rate_per_second": -1}"#,
        r#"{"burst": 0}"#,
        r#"{"max_keys": 0}"#,
        r#"{"rate": 5}"#,
    ] {
        assert!(wasmlb_sdk::instantiate::<RateLimit>(bad).is_err(), "{bad}");
    }
}

#[test]
fn no_healthy_backend_is_unavailable() {
    let mut s = limiter("{}");
    let mut set = backends(&[1]);
    set[0].healthy = false;
    s.set_backends(set.clone());
    assert_eq!(s.select(&MockContext::new(&set)), Decision::Unavailable);
}
