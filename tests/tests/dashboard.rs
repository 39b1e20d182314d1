//! The live dashboard at `GET /` on the admin address, in a real headless
//! Chromium over WebDriver: it asks for the token, shows the backends,
//! updates after traffic, and its buttons drain and ready a backend, swap
//! the plugin to a built-in and reload the config. A screenshot is written
//! to `$CARGO_TARGET_TMPDIR/dashboard.png`.
//!
//! Without a browser: the assets' headers, the token rules and the
//! cross-origin refusal.

use std::path::PathBuf;

use fantoccini::Locator;
use wasmlb_tests::browser::Browser;
use wasmlb_tests::{InProcessProxy, TestBackend, app_config, backend_list, builtin_name, client};

const TOKEN: &str = "dash-s3cret";

async fn start_proxy(backends: &[TestBackend]) -> InProcessProxy {
    let list = backend_list(&backends.iter().collect::<Vec<_>>());
    let admin = "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = \"token\"\n";
    InProcessProxy::start_with(&app_config("round-robin", &list, admin), |dir| {
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).expect("token file");
    })
    .await
}

/// `GET /upstreams/app` through the API, as JSON.
async fn app_snapshot(proxy: &InProcessProxy) -> serde_json::Value {
    client()
        .get(proxy.admin_url("/upstreams/app"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET /upstreams/app")
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).expect("JSON"))
        .expect("body")
}

/// A script returning whether the row of `address` shows `state`.
fn row_state_is(address: &str, state: &str) -> String {
    format!(
        r#"const c = document.querySelector('tr[data-backend="{address}"] td.state');
           return c !== null && c.textContent === "{state}";"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_backends_updates_and_acts_in_chromium() {
    let backends = TestBackend::start_many(3).await;
    let proxy = start_proxy(&backends).await;
    let browser = Browser::start().await;
    let b = &browser.client;

    // The page loads without the token, then asks for it.
    b.goto(&proxy.admin_url("/"))
        .await
        .expect("open the dashboard");
    browser
        .wait_for(
            "the token form",
            "return !document.getElementById('token-form').hidden;",
        )
        .await;
    b.find(Locator::Id("token"))
        .await
        .expect("token field")
        .send_keys(TOKEN)
        .await
        .expect("type the token");
    browser.click("#token-form button").await;

    // The backends, the plugin and its digest.
    browser
        .wait_for(
            "three backend rows",
            "return document.querySelectorAll('section[data-upstream=\"app\"] tr[data-backend]').length === 3;",
        )
        .await;
    for backend in &backends {
        browser
            .wait_for(
                "a healthy backend",
                &row_state_is(&backend.addr.to_string(), "healthy"),
            )
            .await;
    }
    let snapshot = app_snapshot(&proxy).await;
    let digest = snapshot["plugin"]["digest"].as_str().expect("digest");
    let shown = b
        .find(Locator::Css(".plugin-digest"))
        .await
        .expect("digest")
        .attr("title")
        .await
        .expect("title");
    assert_eq!(shown.as_deref(), Some(digest));
    let name = b.find(Locator::Css(".plugin-name")).await.expect("name");
    assert_eq!(
        name.text().await.expect("text"),
        builtin_name("round-robin")
    );

    // Traffic: the request counts, the share and the chart follow.
    let c = client();
    for _ in 0..30 {
        let r = c.get(proxy.url("/")).send().await.expect("request");
        assert_eq!(r.status(), 200);
    }
    browser
        .wait_for(
            "30 requests, a third each",
            r#"const rows = [...document.querySelectorAll('tr[data-backend]')];
               return rows.length === 3
                 && rows.every(r => r.querySelector('td.requests').textContent === "10")
                 && rows.every(r => r.querySelector('td.share').textContent.startsWith("33.3%"));"#,
        )
        .await;
    let drawn: serde_json::Value = b
        .execute(
            r#"const c = document.querySelector('canvas.chart');
               const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
               let colored = 0;
               for (let i = 0; i < d.length; i += 4) {
                 if (d[i + 3] > 0 && !(d[i] === d[i + 1] && d[i + 1] === d[i + 2]) && !(d[i] > 200 && d[i+1] > 200)) colored++;
               }
               return colored;"#,
            vec![],
        )
        .await
        .expect("read the chart");
    assert!(
        drawn.as_u64().unwrap_or(0) > 50,
        "the chart drew no backend line: {drawn}"
    );

    // Drain the first backend from its row: the API sees it, the row shows it.
    let first = backends[0].addr.to_string();
    let row = format!("tr[data-backend=\"{first}\"]");
    browser.click(&format!("{row} button.drain")).await;
    browser
        .wait_for("the drained row", &row_state_is(&first, "drained"))
        .await;
    assert_eq!(
        app_snapshot(&proxy).await["backends"][0]["admin_state"],
        "drain"
    );
    for _ in 0..6 {
        let r = c.get(proxy.url("/")).send().await.expect("request");
        assert_ne!(
            r.headers()["x-backend"],
            backends[0].name.as_str(),
            "a drained backend got a new request"
        );
    }
    browser.click(&format!("{row} button.ready")).await;
    browser
        .wait_for("the ready row", &row_state_is(&first, "healthy"))
        .await;
    assert_eq!(
        app_snapshot(&proxy).await["backends"][0]["admin_state"],
        "ready"
    );

    // Swap to a built-in, then reload (the config's plugin comes back).
    b.find(Locator::Css(
        "section[data-upstream=\"app\"] select.swap-to",
    ))
    .await
    .expect("swap select")
    .select_by_value("least-connections")
    .await
    .expect("choose least-connections");
    browser
        .click("section[data-upstream=\"app\"] button.swap")
        .await;
    browser
        .wait_for(
            "the swapped plugin",
            "return document.querySelector('.plugin-name').textContent === 'least-connections';",
        )
        .await;
    assert_eq!(
        app_snapshot(&proxy).await["plugin"]["name"],
        "least-connections"
    );

    // A shadow plugin shows with its figures; its button promotes it.
    let r = client()
        .put(proxy.admin_url("/upstreams/app/shadow"))
        .bearer_auth(TOKEN)
        .body(r#"{"plugin": "round-robin"}"#)
        .send()
        .await
        .expect("start a shadow");
    assert_eq!(r.status(), 200);
    for _ in 0..10 {
        c.get(proxy.url("/")).send().await.expect("request");
    }
    browser
        .wait_for(
            "the shadow line",
            "const t = document.querySelector('section[data-upstream=\"app\"] .shadow-text'); \
             return t && !t.closest('.shadow').hidden && t.textContent.startsWith('shadow round-robin') \
             && /agree \\d+, differ \\d+/.test(t.textContent);",
        )
        .await;
    browser
        .click("section[data-upstream=\"app\"] button.promote")
        .await;
    browser
        .wait_for(
            "the promoted plugin",
            "return document.querySelector('.plugin-name').textContent === 'round-robin' \
             && document.querySelector('.shadow').hidden;",
        )
        .await;
    browser.click("#reload").await;
    browser
        .wait_for(
            "the reload report",
            "return document.getElementById('message').textContent.startsWith('config reloaded');",
        )
        .await;

    let png = b.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    eprintln!("dashboard screenshot: {}", path.display());

    browser.close().await;
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_public_its_data_is_not_and_other_origins_are_refused() {
    let backends = TestBackend::start_many(1).await;
    let proxy = start_proxy(&backends).await;
    let c = client();
    for (path, kind) in [
        ("/", "text/html"),
        ("/dashboard.js", "text/javascript"),
        ("/dashboard.css", "text/css"),
    ] {
        let r = c.get(proxy.admin_url(path)).send().await.expect(path);
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(h["x-content-type-options"], "nosniff");
        let body = r.text().await.expect("body");
        assert!(!body.contains(TOKEN));
        assert!(
            !body.contains("https://") && !body.contains("http://"),
            "{path} refers elsewhere"
        );
    }
    // The data and the actions keep the token rules.
    let r = c
        .get(proxy.admin_url("/upstreams"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    let state = format!("/upstreams/app/backends/{}/state", backends[0].addr);
    let r = c
        .put(proxy.admin_url(&state))
        .body("drain")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 401);

    // A page elsewhere cannot act through a browser, even with the token.
    let admin = proxy.admin_url("");
    let own_origin = admin.trim_end_matches('/');
    for origin in [
        "http://evil.example",
        "null",
        "https://127.0.0.1",
        "http://localhost",
    ] {
        let r = c
            .post(proxy.admin_url("/reload"))
            .bearer_auth(TOKEN)
            .header("origin", origin)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 403, "Origin: {origin}");
        let r = c
            .put(proxy.admin_url(&state))
            .bearer_auth(TOKEN)
            .header("origin", origin)
            .body("drain")
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 403, "Origin: {origin}");
    }
    assert_eq!(
        app_snapshot(&proxy).await["backends"][0]["admin_state"],
        "ready"
    );
    let r = c
        .put(proxy.admin_url(&state))
        .bearer_auth(TOKEN)
        .header("origin", own_origin)
        .body("drain")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200, "Origin: {own_origin}");
    assert!(proxy.stop().await);
}
