//! The mirror canary, natively: exact shares, stable-only serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mirror_canary::MirrorCanary;
use wasmlb_sdk::prelude::*;
use wasmlb_sdk::testing::{MockContext, backends};

fn set() -> Vec<Backend> {
    let mut set = backends(&[1, 1, 1]);
    for (b, g) in set.iter_mut().zip(["stable", "stable", "canary"]) {
        b.labels.push(("group".into(), g.into()));
    }
    set
}

/// Requests served per backend and mirrors per backend, over `n` selections.
fn run(config: &str, set: &[Backend], n: usize) -> (Vec<u32>, Vec<u32>) {
    let mut s: MirrorCanary = wasmlb_sdk::instantiate(config).unwrap();
    s.set_backends(set.to_vec());
    let cx = MockContext::new(set);
    let (mut served, mut mirrored) = (vec![0; set.len()], vec![0; set.len()]);
    for _ in 0..n {
        cx.reset_forward();
        match s.select(&cx) {
            Decision::Backend(id) => served[id as usize] += 1,
            other => panic!("{other:?}"),
        }
        if let Some(m) = cx.mirrored() {
            mirrored[m as usize] += 1;
        }
    }
    (served, mirrored)
}

#[test]
fn stable_serves_everything_and_ten_percent_is_mirrored() {
    let (served, mirrored) = run("{}", &set(), 1000);
    assert_eq!(served, [500, 500, 0]);
    assert_eq!(mirrored, [0, 0, 100]);
}

#[test]
fn the_share_follows_the_config() {
    let (_, mirrored) = run(r#"{"mirror_percent": 25}"#, &set(), 1000);
    assert_eq!(mirrored[2], 250);
    let (_, none) = run(r#"{"mirror_percent": 0}"#, &set(), 1000);
    assert_eq!(none[2], 0);
    let (_, all) = run(r#"{"mirror_percent": 100}"#, &set(), 1000);
    assert_eq!(all[2], 1000);
}

#[test]
fn without_a_canary_nothing_is_mirrored_and_without_stable_nothing_is_served() {
    let mut set = set();
    set[2].healthy = false;
    let (served, mirrored) = run("{}", &set, 100);
    assert_eq!((served[0] + served[1], mirrored[2]), (100, 0));
    let mut s: MirrorCanary = wasmlb_sdk::instantiate("{}").unwrap();
    let mut only_canary = self::set();
    only_canary[0].healthy = false;
    only_canary[1].healthy = false;
    s.set_backends(only_canary.clone());
    assert_eq!(
        s.select(&MockContext::new(&only_canary)),
        Decision::Unavailable
    );
}

#[test]
fn bad_configs_are_refused() {
    for bad in [
        r#"{"mirror_percent": 101}"#,
        r#"{"stable": "a", "canary": "a"}"#,
        r#"{"percent": 5}"#,
    ] {
        assert!(
            wasmlb_sdk::instantiate::<MirrorCanary>(bad).is_err(),
            "{bad}"
        );
    }
}
