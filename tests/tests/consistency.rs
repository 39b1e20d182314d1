//! Two wasmlb instances with the same backends agree: the hashing
//! strategies give the same backend for the same key on both, and a sticky
//! cookie set by one is honoured by the other. maglev and ring-hash hash
//! backend addresses, so the instances list the backends in opposite
//! orders; ip-hash follows NGINX's arithmetic over the list, so its
//! instances list them in the same order (as DNS discovery does: sorted).

use wasmlb_tests::{InProcessProxy, TestBackend, app_config, backend_list, client};

async fn pair(
    plugin: &str,
    config: &str,
    reversed: bool,
) -> (Vec<TestBackend>, InProcessProxy, InProcessProxy) {
    let backends = TestBackend::start_many(5).await;
    let forward: Vec<&TestBackend> = backends.iter().collect();
    let mut other = forward.clone();
    if reversed {
        other.reverse();
    }
    let a = InProcessProxy::start(&app_config(plugin, &backend_list(&forward), config)).await;
    let b = InProcessProxy::start(&app_config(plugin, &backend_list(&other), config)).await;
    (backends, a, b)
}

async fn backend_for(proxy: &InProcessProxy, header: Option<(&str, String)>) -> String {
    let mut req = client().get(proxy.url("/"));
    if let Some((name, value)) = header {
        req = req.header(name, value);
    }
    let r = req.send().await.expect("request");
    assert_eq!(r.status(), 200);
    r.headers()["x-backend"]
        .to_str()
        .expect("x-backend")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_strategies_agree_across_instances() {
    for plugin in ["maglev", "ring-hash"] {
        let config = format!(
            "[upstream.app.plugin_config]\nhash_on = \"header\"\nname = \"x-user\"\n# {plugin}\n"
        );
        let (_backends, a, b) = pair(plugin, &config, true).await;
        let mut spread = std::collections::HashSet::new();
        for user in 0..60 {
            let key = || Some(("x-user", format!("user-{user}")));
            let (on_a, on_b) = (backend_for(&a, key()).await, backend_for(&b, key()).await);
            assert_eq!(on_a, on_b, "{plugin}: user-{user}");
            spread.insert(on_a);
        }
        assert!(
            spread.len() >= 3,
            "{plugin}: 60 keys on {} backends",
            spread.len()
        );
        assert!(a.stop().await && b.stop().await);
    }

    let (_backends, a, b) = pair("ip-hash", "", false).await;
    assert_eq!(backend_for(&a, None).await, backend_for(&b, None).await);
    assert!(a.stop().await && b.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_from_one_instance_holds_on_another() {
    let (_backends, a, b) = pair("sticky", "", true).await;
    for _ in 0..5 {
        let r = client().get(a.url("/")).send().await.expect("request");
        let backend = r.headers()["x-backend"].to_str().unwrap().to_string();
        let cookie = r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        for _ in 0..3 {
            assert_eq!(
                backend_for(&b, Some(("cookie", cookie.clone()))).await,
                backend,
                "{cookie}"
            );
        }
    }
    assert!(a.stop().await && b.stop().await);
}
