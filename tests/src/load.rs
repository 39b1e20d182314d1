//! Load generation: many clients, every response checked ([`Seen`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::task::JoinHandle;

use crate::*;

/// One response seen by a [`load`] client.
#[derive(Debug)]
pub struct Seen {
    /// When the request was sent.
    pub started: std::time::Instant,
    /// When its body was complete (or it failed).
    pub finished: std::time::Instant,
    /// The status, or the client error.
    pub status: Result<u16, String>,
    /// `x-wasmlb-plugin` (with `debug_headers`).
    pub plugin: String,
    /// `x-backend` (the backend's own name).
    pub backend: String,
    /// `x-wasmlb-backend` (the backend's address, with `debug_headers`).
    pub address: String,
}

/// Most requests one [`load`] client sends, so a load test is bounded in
/// count as well as in time.
pub const LOAD_MAX_PER_CLIENT: usize = 200_000;

/// Start `clients` tasks sending GET `url` without pause until `stop` (or
/// [`LOAD_MAX_PER_CLIENT`] requests); each returns what it saw.
pub fn load(
    url: String,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<JoinHandle<Vec<Seen>>> {
    (0..clients)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) && seen.len() < LOAD_MAX_PER_CLIENT {
                    let started = std::time::Instant::now();
                    let (status, plugin, backend, address) = match c.get(&url).send().await {
                        Ok(r) => {
                            let header = |n: &str| {
                                r.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            let names = (
                                header("x-wasmlb-plugin"),
                                header("x-backend"),
                                header("x-wasmlb-backend"),
                            );
                            let status = r.status().as_u16();
                            let status = r.bytes().await.map(|_| status).map_err(|e| e.to_string());
                            (status, names.0, names.1, names.2)
                        }
                        Err(e) => (
                            Err(e.to_string()),
                            String::new(),
                            String::new(),
                            String::new(),
                        ),
                    };
                    seen.push(Seen {
                        started,
                        finished: std::time::Instant::now(),
                        status,
                        plugin,
                        backend,
                        address,
                    });
                }
                seen
            })
        })
        .collect()
}

/// Wait for every [`load`] client and merge what they saw.
pub async fn collect(tasks: Vec<JoinHandle<Vec<Seen>>>) -> Vec<Seen> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

/// Every request got a 200 and a complete body.
pub fn assert_all_ok(seen: &[Seen]) {
    let failures: Vec<_> = seen.iter().filter(|s| s.status != Ok(200)).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        seen.len(),
        failures.first()
    );
}
