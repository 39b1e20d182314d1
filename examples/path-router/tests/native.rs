//! The path router, natively: matching, stripping, groups and 404s.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use path_router::{PathRouter, strip_prefix};
use wasmlb_sdk::prelude::*;
use wasmlb_sdk::testing::{MockContext, backends};

const CONFIG: &str = r#"{"routes": [
    {"prefix": "/api", "group": "api", "strip": true},
    {"prefix": "/api/v2/", "group": "v2", "strip": true},
    {"prefix": "/static", "group": "web"}
]}"#;

fn set() -> Vec<Backend> {
    let mut set = backends(&[1, 1, 1, 1]);
    for (b, g) in set.iter_mut().zip(["api", "api", "web", "v2"]) {
        b.labels.push(("group".into(), g.into()));
    }
    set
}

fn router(config: &str) -> PathRouter {
    let mut r: PathRouter = wasmlb_sdk::instantiate(config).unwrap();
    r.set_backends(set());
    r
}

#[test]
fn prefixes_match_whole_segments() {
    assert_eq!(strip_prefix("/api", "/api"), Some(""));
    assert_eq!(strip_prefix("/api/x", "/api"), Some("/x"));
    assert_eq!(strip_prefix("/api?q=1", "/api"), Some("?q=1"));
    assert_eq!(strip_prefix("/apix", "/api"), None);
    assert_eq!(strip_prefix("/ap", "/api"), None);
}

#[test]
fn routes_strip_the_prefix_and_rotate_in_their_group() {
    let mut r = router(CONFIG);
    let set = set();
    let cases = [
        ("/api/items?id=3", 0, "/items?id=3"),
        ("/api/items", 1, "/items"),
        ("/api", 0, "/"),
        ("/api?x=1", 1, "/?x=1"),
        ("/api/v2/users", 3, "/users"),
        ("/static/app.js", 2, "/static/app.js"),
    ];
    for (path, want, seen) in cases {
        let cx = MockContext::new(&set).with_path(path);
        assert_eq!(r.select(&cx), Decision::Backend(want), "{path}");
        assert_eq!(cx.forwarded_path(), seen, "{path}");
        assert!(cx.forward.borrow().refused.is_empty(), "{path}");
        if seen != path {
            let prefix = cx.forwarded_header("x-forwarded-prefix").unwrap();
            assert!(path.starts_with(&prefix), "{path}");
        }
    }
}

#[test]
fn unmatched_paths_get_404_or_the_default_group() {
    let mut r = router(CONFIG);
    let set = set();
    let cx = MockContext::new(&set).with_path("/apix");
    match r.select(&cx) {
        Decision::Respond(reply) => assert_eq!(reply.status, 404),
        other => panic!("{other:?}"),
    }
    let mut d =
        router(r#"{"routes": [{"prefix": "/api", "group": "api"}], "default_group": "web"}"#);
    assert_eq!(
        d.select(&MockContext::new(&set).with_path("/")),
        Decision::Backend(2)
    );
    assert_eq!(d.select(&cx), Decision::Backend(2));
}

#[test]
fn an_empty_or_unhealthy_group_is_unavailable() {
    let mut r = router(r#"{"routes": [{"prefix": "/", "group": "nobody"}]}"#);
    let set = set();
    assert_eq!(
        r.select(&MockContext::new(&set).with_path("/x")),
        Decision::Unavailable
    );
    let mut r = router(CONFIG);
    let mut sick = set.clone();
    sick[2].healthy = false;
    r.set_backends(sick.clone());
    let cx = MockContext::new(&sick).with_path("/static/x");
    assert_eq!(r.select(&cx), Decision::Unavailable);
}

#[test]
fn bad_routes_are_refused() {
    for bad in [
        r#"{"routes": [{"prefix": "api", "group": "api"}]}"#,
        r#"{"routes": [{"prefix": "/api", "group": ""}]}"#,
        r#"{"routes": [{"prefix": "/api"}]}"#,
        r#"{"routes": [{"prefix": "/api", "group": "a", "rewrite": "/"}]}"#,
    ] {
        assert!(wasmlb_sdk::instantiate::<PathRouter>(bad).is_err(), "{bad}");
    }
}
