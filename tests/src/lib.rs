//! The integration-test harness: real backends on ephemeral 127.0.0.1 ports,
//! the real proxy (in-process through the `wasmlb` library, or the `wasmlb`
//! binary as a child process), and a real HTTP client. Everything started here
//! is stopped on drop.

use std::time::Duration;

pub use wasmlb;

pub mod backend;
pub mod browser;
pub mod client;
pub mod config;
pub mod corpus;
pub mod dns;
pub mod etcd;
pub mod load;
pub mod proxy;
pub mod raw;
pub mod tls;
pub mod ws;

pub use backend::*;
pub use client::*;
pub use config::*;
pub use load::*;
pub use proxy::*;

/// Paths of the plugins built for the tests by `build.rs`.
pub mod plugins {
    /// `examples/header-route`.
    pub const HEADER_ROUTE: &str = concat!(env!("OUT_DIR"), "/header-route.wasm");
    /// `examples/rate-limit` (WIT 0.2).
    pub const RATE_LIMIT: &str = concat!(env!("OUT_DIR"), "/rate-limit.wasm");
    /// `examples/path-router` (WIT 0.2).
    pub const PATH_ROUTER: &str = concat!(env!("OUT_DIR"), "/path-router.wasm");
    /// `examples/mirror-canary` (WIT 0.2).
    pub const MIRROR_CANARY: &str = concat!(env!("OUT_DIR"), "/mirror-canary.wasm");
    /// WIT 0.2: answers and edits requests per `x-case` (hostile and valid).
    pub const EDIT_CORPUS: &str = concat!(env!("OUT_DIR"), "/test-plugin-edit-corpus.wasm");
    /// The built-in `name` as built against WIT 0.1.1, before 0.2 (kept as
    /// built then, in `tests/fixtures/`).
    pub fn builtin_wit_0_1_1(name: &str) -> String {
        format!(
            "{}/fixtures/{name}-wit-0.1.1.wasm",
            env!("CARGO_MANIFEST_DIR")
        )
    }
    /// Panics in every `select`.
    pub const TRAP: &str = concat!(env!("OUT_DIR"), "/test-plugin-trap.wasm");
    /// Loops forever in every `select`.
    pub const BUSY_LOOP: &str = concat!(env!("OUT_DIR"), "/test-plugin-busy-loop.wasm");
    /// Answers a backend id outside the set.
    pub const BAD_ANSWER: &str = concat!(env!("OUT_DIR"), "/test-plugin-bad-answer.wasm");
    /// Fails `init`.
    pub const BAD_INIT: &str = concat!(env!("OUT_DIR"), "/test-plugin-bad-init.wasm");
    /// Allocates without bound (memory.grow until the cap).
    pub const MEMORY_BOMB: &str = concat!(env!("OUT_DIR"), "/test-plugin-memory-bomb.wasm");
    /// Recurses without bound.
    pub const DEEP_RECURSION: &str = concat!(env!("OUT_DIR"), "/test-plugin-deep-recursion.wasm");
    /// WIT 0.1.1: routes by scheme and gRPC, echoes what it saw in `x-seen`.
    pub const PROTOCOL_ROUTE: &str = concat!(env!("OUT_DIR"), "/test-plugin-protocol-route.wasm");
    /// Built against WIT 0.1.0 (kept as built then): `round-robin`.
    pub const ROUND_ROBIN_WIT_0_1_0: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/round-robin-wit-0.1.0.wasm"
    );
    /// Built against WIT 0.1.0: `sticky` (request headers, response headers, state).
    pub const STICKY_WIT_0_1_0: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/sticky-wit-0.1.0.wasm"
    );
    /// Calls host functions in an endless loop.
    pub const HOST_CALL_FLOOD: &str = concat!(env!("OUT_DIR"), "/test-plugin-host-call-flood.wasm");
    /// A std guest importing `wasi:filesystem`.
    pub const WASI_IMPORT: &str = concat!(env!("OUT_DIR"), "/test-plugin-wasi-import.wasm");
}

/// Upper bound on any single wait in the harness.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `done` every 10 ms until true; panics after [`WAIT`].
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port for a server that must be told its port (redis-server, postgres,
/// a tutorial's fixed ports): free when chosen, and outside the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`), so that meanwhile no
/// listener another test binds to port 0, and no outgoing connection's
/// source port, can take it. (A port from binding port 0 and releasing it
/// could go to another test's proxy, whose clients then met this server's
/// readiness checks.)
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // Below the range if there is room, else above it.
    let (start, end) = if low > 11_000 {
        (10_000, low)
    } else {
        (high + 1, 65_536)
    };
    let span = end - start;
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = start + seed.wrapping_add(n.wrapping_mul(104_729)) % span;
        let port = u16::try_from(port).expect("a port");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {start}..{end}");
}
