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
