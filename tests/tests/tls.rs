//! TLS termination (SNI, ALPN, reload, bad input, stalled handshakes), TLS
//! and HTTP/2 to backends (mutual TLS, h2 by ALPN, h2c), and health checks
//! over TLS. Certificates are made in the test.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmlb_tests::tls::*;
use wasmlb_tests::*;

/// A config whose listener terminates TLS with `certs` (TOML inline tables)
/// in front of `backends`; `extra` goes into `[upstream.app]`.
fn tls_config(certs: &str, backends: &str, extra: &str) -> String {
    format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [listener.tls]\ncertificates = [ {certs} ]\n\n\
         [upstream.app]\nplugin = 'round-robin'\nbackends = [ {backends} ]\n{extra}\n"
    )
}

const SITE_API: &str =
    r#"{ cert = "site.pem", key = "site.key" }, { cert = "api.pem", key = "api.key" }"#;

#[tokio::test]
async fn tls_listener_picks_the_certificate_by_sni_and_the_protocol_by_alpn() {
    let b = TestBackend::start("b0").await;
    let pki = Pki::new();
    let mut issued = Vec::new();
    let proxy =
        InProcessProxy::start_with(&tls_config(SITE_API, &backend_list(&[&b]), ""), |dir| {
            issued.push(pki.issue(dir, "site", &["site.test"]));
            issued.push(pki.issue(dir, "api", &["api.test", "*.api.test"]));
        })
        .await;
    let (site, api) = (&issued[0], &issued[1]);
    let addr = proxy.addrs[0];

    // SNI picks the certificate; the chain verifies against the CA.
    for (sni, want) in [("site.test", site), ("api.test", api), ("v2.api.test", api)] {
        let verified = client_config(Some(pki.roots()), &[b"http/1.1"]);
        let s = tls_connect(addr, sni, verified)
            .await
            .expect("verified handshake");
        let (leaf, alpn) = presented(&s);
        assert_eq!(leaf, want.der, "certificate for {sni}");
        assert_eq!(alpn.as_deref(), Some(b"http/1.1".as_slice()));
        let (status, _, body) = get_over(s, false, sni, "/").await;
        assert_eq!((status, body.as_str()), (200, "hello from b0"));
    }
    // An unknown SNI gets the first (default) certificate.
    let s = tls_connect(addr, "unknown.test", client_config(None, &[b"http/1.1"]))
        .await
        .expect("handshake");
    assert_eq!(presented(&s).0, site.der, "the default certificate");

    // ALPN negotiates h2; requests over it reach the backend.
    let s = tls_connect(
        addr,
        "site.test",
        client_config(Some(pki.roots()), &[b"h2", b"http/1.1"]),
    )
    .await
    .expect("handshake");
    assert_eq!(presented(&s).1.as_deref(), Some(b"h2".as_slice()));
    let (status, _, body) = get_over(s, true, "site.test", "/headers").await;
    assert_eq!(status, 200);
    let headers: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(headers["x-forwarded-proto"][0], "https", "{headers}");
    assert_eq!(headers["host"][0], "site.test", "{headers}");

    // Over HTTP/1.1 too.
    let s = tls_connect(addr, "site.test", client_config(Some(pki.roots()), &[]))
        .await
        .unwrap();
    let (_, _, body) = get_over(s, false, "site.test", "/headers").await;
    assert!(body.contains(r#""x-forwarded-proto":["https"]"#), "{body}");
}

#[tokio::test]
async fn curl_speaks_http2_over_tls_to_the_listener() {
    let version = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .expect("curl is installed (.ci/run installs it)");
    let b = TestBackend::start("b0").await;
    let pki = Pki::new();
    let mut ca = None;
    let proxy = InProcessProxy::start_with(
        &tls_config(
            r#"{ cert = "site.pem", key = "site.key" }"#,
            &backend_list(&[&b]),
            "",
        ),
        |dir| {
            pki.issue(dir, "site", &["site.test"]);
            ca = Some(pki.write_ca(dir, "ca.pem"));
        },
    )
    .await;
    let ca = ca.expect("CA written");
    let port = proxy.addrs[0].port();
    let http2 = String::from_utf8_lossy(&version.stdout).contains("HTTP2");
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("site.test:{port}:127.0.0.1")])
        .args(["-w", "\n%{http_version}"]);
    if http2 {
        cmd.arg("--http2");
    }
    cmd.arg(format!("https://site.test:{port}/"));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("hello from b0"), "{text}");
    if http2 {
        assert!(text.trim_end().ends_with('2'), "HTTP/2 negotiated: {text}");
    }
}

#[tokio::test]
async fn plaintext_truncated_and_stalled_handshakes_are_closed_and_good_traffic_flows() {
    let _ = wasmlb::fd_limit::raise_nofile();
    let b = TestBackend::start("b0").await;
    let pki = Pki::new();
    let toml = format!(
        "[server]\nheader_read_timeout_ms = 1000\n\n[admin]\naddress = \"127.0.0.1:0\"\n\n{}",
        tls_config(
            r#"{ cert = "site.pem", key = "site.key" }"#,
            &backend_list(&[&b]),
            ""
        )
    );
    let proxy = InProcessProxy::start_with(&toml, |dir| {
        pki.issue(dir, "site", &["site.test"]);
    })
    .await;
    let addr = proxy.addrs[0];

    // Plaintext HTTP to the TLS port: closed, not left hanging.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a TLS alert, then the close
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "plaintext on a TLS port must be closed");

    // A truncated client hello, then silence; and many connections that
    // never start a handshake.
    let mut truncated = tokio::net::TcpStream::connect(addr).await.unwrap();
    truncated
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    let mut stalled = Vec::new();
    for _ in 0..1000 {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => stalled.push(s),
            Err(_) => break, // a low descriptor limit: as many as it allows
        }
    }
    assert!(stalled.len() >= 200, "opened only {}", stalled.len());
    // Good traffic is served meanwhile.
    for _ in 0..5 {
        let s = tls_connect(
            addr,
            "site.test",
            client_config(Some(pki.roots()), &[b"h2"]),
        )
        .await
        .expect("a good handshake is served");
        let (status, _, body) = get_over(s, true, "site.test", "/").await;
        assert_eq!((status, body.as_str()), (200, "hello from b0"));
    }
    // The stalled ones are closed by the head-read timeout (1 s).
    let deadline = Duration::from_secs(20);
    let mut one = [0u8; 1];
    let t = tokio::time::timeout(deadline, truncated.read(&mut one)).await;
    assert!(
        matches!(t, Ok(Ok(0)) | Ok(Err(_))),
        "truncated handshake closed"
    );
    for s in stalled.iter_mut().step_by(50) {
        let r = tokio::time::timeout(deadline, s.read(&mut one)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "stalled handshake closed"
        );
    }
    drop(stalled);
    let c = client();
    let metrics = text(&c, &proxy.admin_url("/metrics")).await;
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wasmlb_tls_handshake_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the handshake failure counter");
    assert!(
        failures >= 2.0,
        "plaintext and truncated counted: {failures}"
    );
}

#[tokio::test]
async fn bad_certificates_and_keys_are_rejected_naming_the_file_and_key() {
    let pki = Pki::new();
    let other = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki.issue(d, "site", &["site.test"]);
    let stray = other.issue(d, "stray", &["site.test"]);
    std::fs::write(
        d.join("locked.key"),
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(d.join("junk.pem"), "not a certificate\n").unwrap();
    let check = |certs: &str| {
        let path = d.join("wasmlb.toml");
        std::fs::write(
            &path,
            tls_config(certs, r#"{ address = "127.0.0.1:9" }"#, ""),
        )
        .unwrap();
        wasmlb::config::Config::load(&path).map_err(|e| e.to_string())
    };
    let mismatch = check(&format!(
        r#"{{ cert = "site.pem", key = "{}" }}"#,
        stray.key.display()
    ))
    .unwrap_err();
    assert!(
        mismatch.contains("wasmlb.toml:") && mismatch.contains("listener[0].tls.certificates[0]"),
        "{mismatch}"
    );
    assert!(mismatch.contains("does not match"), "{mismatch}");
    let locked = check(r#"{ cert = "site.pem", key = "locked.key" }"#).unwrap_err();
    assert!(
        locked.contains("locked.key") && locked.contains("password-protected"),
        "{locked}"
    );
    let junk = check(r#"{ cert = "junk.pem", key = "site.key" }"#).unwrap_err();
    assert!(
        junk.contains("junk.pem") && junk.contains("no PEM certificate"),
        "{junk}"
    );
    let missing = check(r#"{ cert = "nope.pem", key = "site.key" }"#).unwrap_err();
    assert!(
        missing.contains("nope.pem") && missing.contains("cannot read"),
        "{missing}"
    );
    let bad_version = {
        let path = d.join("wasmlb.toml");
        let text = tls_config(
            r#"{ cert = "site.pem", key = "site.key" }"#,
            r#"{ address = "127.0.0.1:9" }"#,
            "",
        )
        .replace(
            "[listener.tls]\n",
            "[listener.tls]\nmin_version = \"1.1\"\n",
        );
        std::fs::write(&path, text).unwrap();
        wasmlb::config::Config::load(&path).unwrap_err().to_string()
    };
    assert!(
        bad_version.contains("listener[0].tls.min_version"),
        "{bad_version}"
    );

    // An expired certificate loads, with a warning naming the file and date;
    // `--check` prints it.
    pki.issue_expired(d, "old", &["site.test"]);
    let config = check(r#"{ cert = "old.pem", key = "old.key" }"#).expect("expired still loads");
    let warning = config.warnings.join("\n");
    assert!(
        warning.contains("old.pem") && warning.contains("expired on") && warning.contains("2021"),
        "{warning}"
    );
    let out = std::process::Command::new(wasmlb_bin())
        .args(["--check", "--config"])
        .arg(d.join("wasmlb.toml"))
        .output()
        .expect("run wasmlb --check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("warning:") && stdout.contains("old.pem"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_reload_rereads_certificates_and_a_bad_one_keeps_the_old_serving() {
    let b = TestBackend::start("b0").await;
    let pki = Pki::new();
    let mut first = None;
    let toml = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n\n{}",
        tls_config(
            r#"{ cert = "site.pem", key = "site.key" }"#,
            &backend_list(&[&b]),
            ""
        )
    );
    let proxy = InProcessProxy::start_with(&toml, |dir| {
        first = Some(pki.issue(dir, "site", &["site.test"]));
    })
    .await;
    let first = first.expect("issued");
    let addr = proxy.addrs[0];
    let served = || async {
        let s = tls_connect(addr, "site.test", client_config(None, &[]))
            .await
            .unwrap();
        presented(&s).0
    };
    assert_eq!(served().await, first.der);
    // New certificate on disk, reload: new connections get it.
    let second = pki.issue(proxy.config_dir(), "site", &["site.test"]);
    let c = client();
    let r = c.post(proxy.admin_url("/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!(served().await, second.der);
    // A broken key: the reload is refused, the running certificate serves.
    std::fs::write(proxy.config_dir().join("site.key"), "garbage").unwrap();
    let r = c.post(proxy.admin_url("/reload")).send().await.unwrap();
    let body = r.text().await.unwrap_or_default();
    assert!(
        body.contains("site.key"),
        "the reload error names the key file: {body}"
    );
    assert_eq!(served().await, second.der);
}

#[tokio::test]
async fn mutual_tls_to_a_backend_that_requires_a_client_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let server = pki.issue(dir.path(), "backend", &["backend.test"]);
    let backend =
        ProtoBackend::start("secure", Some(&server), Some(&pki), &[b"http/1.1"], false).await;
    let upstream = |client: bool| {
        let mut t = "[upstream.app.tls]\nserver_name = \"backend.test\"\nca_file = \"ca.pem\"\n"
            .to_string();
        if client {
            t.push_str("client_cert = \"client.pem\"\nclient_key = \"client.key\"\n");
        }
        app_config(
            "round-robin",
            &format!("{{ address = \"{}\" }}", backend.addr),
            &format!("debug_headers = true\nretries = 0\n{t}"),
        )
    };
    let with = InProcessProxy::start_with(&upstream(true), |d| {
        pki.write_ca(d, "ca.pem");
        pki.issue(d, "client", &["client.test"]);
    })
    .await;
    let c = client();
    let (status, _, body) = get(&c, &with.url("/")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from secure over HTTP/1.1"),
        "with a client certificate"
    );
    let without = InProcessProxy::start_with(&upstream(false), |d| {
        pki.write_ca(d, "ca.pem");
    })
    .await;
    let r = c.get(without.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 502, "refused without a client certificate");
    let error = r
        .headers()
        .get("x-wasmlb-error")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    assert!(
        error.to_lowercase().contains("certificate"),
        "says why: {error}"
    );
    // A backend whose certificate is not for the configured name fails to
    // connect (and names TLS).
    let wrong =
        InProcessProxy::start_with(&upstream(true).replace("backend.test", "other.test"), |d| {
            pki.write_ca(d, "ca.pem");
            pki.issue(d, "client", &["client.test"]);
        })
        .await;
    let r = c.get(wrong.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let error = r
        .headers()
        .get("x-wasmlb-error")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    assert!(
        error.unwrap_or_default().contains("TLS handshake failed"),
        "names TLS"
    );
}

#[tokio::test]
async fn http2_to_backends_over_tls_by_alpn_and_over_plaintext_h2c() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let server = pki.issue(dir.path(), "backend", &["127.0.0.1"]);
    let tls_h2 =
        ProtoBackend::start("tls", Some(&server), None, &[b"h2", b"http/1.1"], false).await;
    let h2c = ProtoBackend::start("h2c", None, None, &[], true).await;
    let c = client();
    for (protocol, addr, want) in [
        ("h2", tls_h2.addr, "hello from tls over HTTP/2.0"),
        ("auto", tls_h2.addr, "hello from tls over HTTP/2.0"),
        ("http1", tls_h2.addr, "hello from tls over HTTP/1.1"),
        ("h2c", h2c.addr, "hello from h2c over HTTP/2.0"),
    ] {
        let tls = if protocol == "h2c" {
            ""
        } else {
            "[upstream.app.tls]\nca_file = \"ca.pem\"\n"
        };
        let toml = app_config(
            "round-robin",
            &format!("{{ address = \"{addr}\" }}"),
            &format!("protocol = \"{protocol}\"\n{tls}"),
        );
        let proxy = InProcessProxy::start_with(&toml, |d| {
            pki.write_ca(d, "ca.pem");
        })
        .await;
        // Many concurrent requests share the HTTP/2 connection.
        let url = proxy.url("/");
        let requests = (0..20).map(|_| get(&c, &url));
        for (status, _, body) in futures_util::future::join_all(requests).await {
            assert_eq!(
                (status, body.as_str()),
                (200, want),
                "protocol = {protocol}"
            );
        }
        let (_, _, headers) = get(&c, &proxy.url("/headers")).await;
        if protocol != "http1" {
            assert!(headers.contains(r#"":authority":"127.0.0.1:"#), "{headers}");
        }
    }
    // h2 needs TLS, h2c refuses it: config errors name the key.
    let err = wasmlb::config::Config::parse(
        &app_config(
            "round-robin",
            "{ address = \"127.0.0.1:9\" }",
            "protocol = \"h2\"\n",
        ),
        std::path::Path::new("/tmp/x.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("upstream.app.protocol") && err.contains("h2c"),
        "{err}"
    );
}

#[tokio::test]
async fn health_checks_use_the_upstreams_tls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let server = pki.issue(dir.path(), "backend", &["backend.test"]);
    let secure = ProtoBackend::start("secure", Some(&server), None, &[b"http/1.1"], false).await;
    let toml = app_config(
        "round-robin",
        &format!("{{ address = \"{}\" }}", secure.addr),
        "[upstream.app.tls]\nserver_name = \"backend.test\"\nca_file = \"ca.pem\"\n\
         [upstream.app.health_check]\ninterval_ms = 100\ntimeout_ms = 1000\nunhealthy_threshold = 1\n",
    );
    let proxy = InProcessProxy::start_with(&toml, |d| {
        pki.write_ca(d, "ca.pem");
    })
    .await;
    let up = proxy.upstream("app");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        up.backends()[0]
            .live
            .check_passing
            .load(std::sync::atomic::Ordering::Relaxed),
        "passes over TLS"
    );
    let c = client();
    let (status, _, _) = get(&c, &proxy.url("/")).await;
    assert_eq!(status, 200);
    // Against a CA that did not sign it, the check fails.
    let toml = toml.replace("ca.pem", "other-ca.pem");
    let other = Pki::new();
    let proxy = InProcessProxy::start_with(&toml, |d| {
        other.write_ca(d, "other-ca.pem");
    })
    .await;
    let up = proxy.upstream("app");
    let mut failing = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !up.backends()[0]
            .live
            .check_passing
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            failing = true;
            break;
        }
    }
    assert!(failing, "an untrusted backend certificate fails the check");
}

#[tokio::test]
async fn a_trapping_plugin_under_tls_still_serves_through_the_fallback() {
    let b = TestBackend::start("b0").await;
    let pki = Pki::new();
    let toml = tls_config(
        r#"{ cert = "site.pem", key = "site.key" }"#,
        &backend_list(&[&b]),
        "",
    )
    .replace(
        "plugin = 'round-robin'",
        &format!("plugin = '{}'", plugins::TRAP),
    );
    let proxy = InProcessProxy::start_with(&toml, |d| {
        pki.issue(d, "site", &["site.test"]);
    })
    .await;
    for _ in 0..3 {
        let s = tls_connect(
            proxy.addrs[0],
            "site.test",
            client_config(Some(pki.roots()), &[b"h2"]),
        )
        .await
        .unwrap();
        let (status, _, body) = get_over(s, true, "site.test", "/").await;
        assert_eq!((status, body.as_str()), (200, "hello from b0"));
    }
}

#[tokio::test]
async fn an_http2_backend_s_max_concurrent_streams_is_honoured() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // An h2c backend that allows one stream at a time and records how many
    // it ever served at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (now, peak, conns) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (n, p, c) = (now.clone(), peak.clone(), conns.clone());
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::Relaxed);
            let (n, p) = (n.clone(), p.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let (n, p) = (n.clone(), p.clone());
                    async move {
                        let in_flight = n.fetch_add(1, Ordering::Relaxed) + 1;
                        p.fetch_max(in_flight, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        n.fetch_sub(1, Ordering::Relaxed);
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"one at a time")),
                        ))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(1)
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
            });
        }
    });
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &format!("{{ address = \"{addr}\" }}"),
        "protocol = \"h2c\"\n",
    ))
    .await;
    let c = client();
    // Open the shared connection first, so the backend's SETTINGS are known.
    assert_eq!(get(&c, &proxy.url("/")).await.0, 200);
    let url = proxy.url("/");
    let all = futures_util::future::join_all((0..8).map(|_| get(&c, &url))).await;
    for (status, _, body) in all {
        assert_eq!((status, body.as_str()), (200, "one at a time"));
    }
    assert_eq!(
        peak.load(Ordering::Relaxed),
        1,
        "never more streams than the backend allows"
    );
    assert_eq!(
        conns.load(Ordering::Relaxed),
        1,
        "one multiplexed connection"
    );
    server.abort();
}
