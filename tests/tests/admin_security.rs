//! The admin API against hostile input: plugin paths confined to
//! `plugin_dirs` with errors that leak no file bytes, no resolved path and
//! no file's existence; exact bearer tokens; header-read timeout and a
//! connection cap.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmlb_tests::{InProcessProxy, TestBackend, app_config, backend_list, client, plugins};

async fn swap(proxy: &InProcessProxy, plugin: &str) -> (u16, String) {
    let r = client()
        .put(proxy.admin_url("/upstreams/app/plugin"))
        .body(serde_json::json!({ "plugin": plugin }).to_string())
        .send()
        .await
        .expect("admin answers");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_paths_are_confined_and_errors_leak_nothing() {
    let b = TestBackend::start("b0").await;
    let proxy = InProcessProxy::start_with(
        &app_config(
            "round-robin",
            &backend_list(&[&b]),
            "[admin]\naddress = \"127.0.0.1:0\"\nplugin_dirs = [\"plugins\"]\n",
        ),
        |dir| std::fs::create_dir(dir.join("plugins")).expect("mkdir"),
    )
    .await;
    let dir = proxy.config_dir().to_path_buf();
    let plugins_dir = dir.join("plugins");
    std::fs::copy(plugins::HEADER_ROUTE, plugins_dir.join("good.wasm")).expect("copy");
    std::fs::copy(plugins::HEADER_ROUTE, dir.join("outside.wasm")).expect("copy");
    std::fs::write(
        plugins_dir.join("text.wasm"),
        "root:x:0:0:root:/root:/bin/bash\n",
    )
    .expect("write");
    std::os::unix::fs::symlink("/etc/passwd", plugins_dir.join("link.wasm")).expect("symlink");
    std::os::unix::fs::symlink(dir.join("outside.wasm"), plugins_dir.join("escape.wasm"))
        .expect("symlink");
    let big = std::fs::File::create(plugins_dir.join("big.wasm")).expect("create");
    big.set_len(17 << 20).expect("sparse file");

    let secret_dir = dir.display().to_string();
    let confined = "not a .wasm file inside the allowed plugin directories";
    let cases: &[(&str, &str)] = &[
        ("/etc/passwd", confined),
        ("../../../../etc/passwd", confined),
        ("../../../../etc/passwd.wasm", confined),
        ("/nonexistent/x.wasm", confined),
        ("outside.wasm", confined),
        ("plugins/../outside.wasm", confined),
        ("plugins/link.wasm", confined),
        ("plugins/escape.wasm", confined),
        (
            "plugins/missing.wasm",
            "not found in the plugin directories",
        ),
        ("plugins/text.wasm", "not a WebAssembly file"),
        ("plugins/big.wasm", "larger than"),
    ];
    for (path, expected) in cases {
        let (status, body) = swap(&proxy, path).await;
        assert_eq!(status, 422, "{path}: {body}");
        assert!(body.contains(expected), "{path}: {body}");
        for leak in ["0x72", "root:", &secret_dir] {
            assert!(
                !body.contains(leak),
                "{path}: the answer leaks {leak:?}: {body}"
            );
        }
    }
    // An existing and a missing file outside the directories get the same answer.
    let (_, existing) = swap(&proxy, "/etc/hostname.wasm").await;
    let (_, missing) = swap(&proxy, "/etc/no-such-file.wasm").await;
    assert_eq!(
        existing.replace("hostname", "X"),
        missing.replace("no-such-file", "X")
    );
    let (status, body) = swap(&proxy, "plugins/good.wasm").await;
    assert_eq!(status, 200, "{body}");
    let app: Value = wasmlb_tests::json(&client(), &proxy.admin_url("/upstreams/app")).await;
    assert_eq!(app["plugin"]["name"], "plugins/good.wasm", "shown as given");
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_must_match_exactly() {
    let b = TestBackend::start("b0").await;
    let proxy = InProcessProxy::start_with(
        &app_config(
            "round-robin",
            &backend_list(&[&b]),
            "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = \"token\"\n",
        ),
        |dir| std::fs::write(dir.join("token"), "s3cret\n").expect("token"),
    )
    .await;
    let url = proxy.admin_url("/upstreams");
    for (auth, want) in [
        ("Bearer s3cret", 200),
        ("bearer s3cret", 200),
        // (Trailing whitespace never arrives: RFC 9110 §5.5 strips it from
        // field values; inner whitespace must match.)
        ("Bearer s3cret\t", 200),
        ("Bearer s3cret x", 401),
        ("Bearer  s3cret", 401),
        ("Bearer s3cre", 401),
        ("Bearer s3cretX", 401),
        ("Basic s3cret", 401),
        ("", 401),
    ] {
        let status = client()
            .get(&url)
            .header("authorization", auth)
            .send()
            .await
            .expect("admin")
            .status()
            .as_u16();
        assert_eq!(status, want, "{auth:?}");
    }
    assert!(proxy.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_have_a_head_timeout_and_a_cap() {
    let b = TestBackend::start("b0").await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &backend_list(&[&b]),
        "[server]\nheader_read_timeout_ms = 1500\n\n[admin]\naddress = \"127.0.0.1:0\"\nmax_connections = 2\n",
    ))
    .await;
    let admin: std::net::SocketAddr = proxy
        .admin_url("")
        .trim_start_matches("http://")
        .parse()
        .expect("admin addr");
    // A half-sent head is cut at header_read_timeout_ms.
    let mut slow = TcpStream::connect(admin).await.expect("connect");
    slow.write_all(b"GET /upstreams HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "a half-sent head was not closed: {read:?}"
    );
    drop(slow);
    // Two connections held open fill the cap; a third waits in the backlog
    // until one closes (or, silent, the first two are cut at
    // header_read_timeout_ms after accept; the check ends well before).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let first = TcpStream::connect(admin).await.expect("connect");
    let second = TcpStream::connect(admin).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(admin).await.expect("backlog accepts");
    third
        .write_all(b"GET /upstreams HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond max_connections: {early:?}");
    drop(first);
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut out))
        .await
        .expect("served once a slot is free")
        .expect("read");
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    drop(second);
    assert!(proxy.stop().await);
}
