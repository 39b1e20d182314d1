//! The WIT contract's versions: plugins built against 0.1.0 keep loading
//! and running unchanged on a host serving 0.1.1, and 0.1.1 plugins see the
//! protocol (scheme, HTTP version, SNI, gRPC).

use std::collections::BTreeMap;

use wasmlb_tests::tls::*;
use wasmlb_tests::*;

#[tokio::test]
async fn plugins_built_against_wit_0_1_0_still_load_and_balance() {
    let backends = TestBackend::start_many(3).await;
    let list = backend_list(&backends.iter().collect::<Vec<_>>());
    let proxy = InProcessProxy::start(&app_config(plugins::ROUND_ROBIN_WIT_0_1_0, &list, "")).await;
    let c = client();
    let mut seen = BTreeMap::new();
    for _ in 0..9 {
        let (status, _, body) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200);
        *seen.entry(body).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "round-robin over all three: {seen:?}");
    assert!(seen.values().all(|n| *n == 3), "{seen:?}");
    assert_eq!(
        proxy
            .upstream("app")
            .stats()
            .fallbacks
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the 0.1.0 plugin decided"
    );

    // sticky@0.1.0 uses request headers, response headers and state.
    let proxy = InProcessProxy::start(&app_config(plugins::STICKY_WIT_0_1_0, &list, "")).await;
    let r = c.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r
        .headers()
        .get("set-cookie")
        .expect("the 0.1.0 sticky plugin sets its cookie")
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let first = r.text().await.unwrap();
    for _ in 0..5 {
        let body = c
            .get(proxy.url("/"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, first, "the session sticks");
    }
}

#[tokio::test]
async fn plugins_see_the_scheme_version_server_name_and_grpc() {
    let backends = TestBackend::start_many(3).await;
    let list = backend_list(&backends.iter().collect::<Vec<_>>());
    let pki = Pki::new();
    let toml = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [listener.tls]\ncertificates = [ {{ cert = \"site.pem\", key = \"site.key\" }} ]\n\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [upstream.app]\nplugin = '{}'\nbackends = [ {list} ]\n",
        plugins::PROTOCOL_ROUTE
    );
    let proxy = InProcessProxy::start_with(&toml, |d| {
        pki.issue(d, "site", &["site.test"]);
    })
    .await;
    // Over TLS with HTTP/2: https, HTTP/2, the SNI; backend 1.
    let s = tls_connect(
        proxy.addrs[0],
        "Site.Test",
        client_config(Some(pki.roots()), &[b"h2"]),
    )
    .await
    .unwrap();
    let (status, headers, body) = get_over(s, true, "site.test", "/").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-seen"], "https HTTP/2 site.test false");
    assert_eq!(body, format!("hello from {}", backends[1].name));
    // Plaintext HTTP/1.1: http, no SNI; backend 2.
    let c = client();
    let r = c
        .get(format!("http://{}/", proxy.addrs[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-seen"], "http HTTP/1.1 - false");
    assert_eq!(
        r.text().await.unwrap(),
        format!("hello from {}", backends[2].name)
    );
    // A gRPC content type: backend 0.
    let r = c
        .post(format!("http://{}/", proxy.addrs[1]))
        .header("content-type", "application/grpc+proto")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-seen"], "http HTTP/1.1 - true");
    assert_eq!(
        r.text().await.unwrap(),
        format!("hello from {}", backends[0].name)
    );
}
