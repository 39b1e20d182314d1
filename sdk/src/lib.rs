//! The SDK for writing [wasmlb](https://example.invalid/wasmlb) load-balancing
//! strategies as WebAssembly components.
//!
//! A strategy is one [`Strategy`] impl and one [`export_strategy!`] call:
//!
//! ```
//! #![cfg_attr(target_arch = "wasm32", no_std)]
//! use wasmlb_sdk::prelude::*;
//!
//! /// Always the first healthy backend.
//! #[derive(Default)]
//! pub struct First { backends: Vec<Backend> }
//!
//! impl Strategy for First {
//!     type Config = NoConfig;
//!     fn new(_: NoConfig) -> Result<Self, String> { Ok(Self::default()) }
//!     fn set_backends(&mut self, backends: Vec<Backend>) { self.backends = backends; }
//!     fn select(&mut self, _cx: &dyn Context) -> Decision {
//!         match self.backends.iter().find(|b| b.healthy) {
//!             Some(b) => Decision::Backend(b.id),
//!             None => Decision::Unavailable,
//!         }
//!     }
//! }
//!
//! wasmlb_sdk::export_strategy!(First);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type
//! `cdylib`) and point an upstream's `plugin` at the `.wasm` file.
//!
//! # Why `no_std`
//!
//! The host grants a plugin only the `wasmlb:plugin` imports (log, clock,
//! backend state, request, response) and rejects any component importing `wasi:*`. Rust's
//! `std` on `wasm32-wasip2` imports 14 `wasi:cli`/`wasi:io` interfaces just to
//! print panic messages, so a plugin crate is `no_std` on wasm32 (the
//! `cfg_attr` line above; it stays `std` natively, so `cargo test` works) and
//! uses `alloc` through [`prelude`]. This SDK supplies the global allocator
//! (dlmalloc) and a panic handler that traps; the host then serves the request
//! with its fallback policy and replaces the instance.
//!
//! # Randomness
//!
//! A plugin has no `wasi:random`. Strategies that pick at random keep a
//! [`fastrand::Rng`] (re-exported) seeded from their config, or from
//! [`Context::monotonic_now`] on the first pick; [`weighted::WeightedTable`]
//! turns it into a weighted choice in O(log n).
//!
//! # Rotating over backends
//!
//! [`weighted::Rotation`] is round-robin over the healthy backends: an O(1)
//! cursor when their weights are equal, NGINX's smooth weighted round-robin
//! otherwise. The built-in `round-robin`, `sticky` and `canary` rotate with it.
//!
//! # Config structs and `#[serde(crate = "wasmlb_sdk::serde")]`
//!
//! A strategy's [`Strategy::Config`] derives `serde::Deserialize`. serde's
//! derive writes paths that start at `::serde`, so it needs a crate named
//! `serde` in the plugin's dependencies. A plugin depends only on this SDK,
//! which re-exports [`serde`]; the attribute tells the derive to use that
//! re-export instead:
//!
//! ```
//! use wasmlb_sdk::serde::Deserialize;
//! #[derive(Deserialize, Default)]
//! #[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
//! pub struct Config { pub header: String }
//! ```
//!
//! A plugin that adds `serde` (with `derive`, without `std`) to its own
//! dependencies can leave the attribute out. The SDK keeps serde out of the
//! plugin's manifest so that the plugin and the SDK always agree on one serde
//! version, the one whose `Deserialize` [`Strategy::Config`] requires.
//!
//! # Testing natively
//!
//! [`testing::MockContext`] stands in for the host: backends, in-flight counts,
//! health, headers, client address and clock are plain fields, so selection
//! logic is unit-tested with `cargo test`, without wasm.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;
// Lets the generated bindings name this crate the same way from inside and outside.
#[cfg(target_arch = "wasm32")]
extern crate self as wasmlb_sdk;

use alloc::string::String;
use alloc::vec::Vec;
pub use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use fastrand;
pub use serde;
pub use serde_json;
pub use wit_bindgen;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __rt;
pub mod hashing;
pub mod testing;
pub mod weighted;

/// Everything a strategy usually needs, including `alloc`'s `Vec`, `String`,
/// `Box`, `BTreeMap`, `vec!` and `format!` for `no_std` crates.
pub mod prelude {
    pub use crate::{Backend, Context, Decision, Forward, Level, NoConfig, Reply, Strategy};
    pub use alloc::boxed::Box;
    pub use alloc::collections::BTreeMap;
    pub use alloc::string::{String, ToString};
    pub use alloc::vec::Vec;
    pub use alloc::{format, vec};
}

/// One backend (server) of the upstream, as the host hands it over in
/// [`Strategy::set_backends`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Index in the current backend list, `0..len`. Decisions and [`Context`]
    /// methods name backends by it. Stable only until the next
    /// `set_backends`; use [`Backend::address`] as the stable identity.
    pub id: u32,
    /// `host:port` as written in the config.
    pub address: String,
    /// Effective weight, at least 1, relative to the other backends.
    pub weight: u32,
    /// False when the host has marked the backend down.
    pub healthy: bool,
    /// Labels from the config, in config order.
    pub labels: Vec<(String, String)>,
}

impl Backend {
    /// The value of label `key`, if the backend has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The answer of [`Strategy::select`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve the request with the backend of this id.
    Backend(u32),
    /// Backend ids in order of preference; the host uses the first and may
    /// retry on later ones in order. Must not be empty.
    Candidates(Vec<u32>),
    /// No backend can serve the request: the host answers 503.
    Unavailable,
    /// Answer the request without a backend (WIT 0.2 `respond`): a 429, a
    /// redirect, a maintenance page. Build it with [`Reply`] or
    /// `cx.respond(status)`.
    Respond(Reply),
}

/// A response the host sends itself, without contacting a backend (the
/// WIT 0.2 `respond` decision). A typed builder:
///
/// ```
/// use wasmlb_sdk::prelude::*;
/// let d: Decision = Reply::new(429).header("retry-after", "2").text("slow down\n").into();
/// # assert!(matches!(d, Decision::Respond(_)));
/// ```
///
/// The host checks it: a status outside 200-599 or a body over 64 KiB is a
/// bad answer (the request goes to the fallback); an invalid, hop-by-hop
/// or framing header (`content-length` is the host's), and anything past
/// 16 headers or 8 KiB, is dropped and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The status, 200 to 599.
    pub status: u16,
    /// Response headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body, at most 64 KiB.
    pub body: Vec<u8>,
}

impl Reply {
    /// Largest body the host accepts, in bytes (64 KiB).
    pub const MAX_BODY_BYTES: usize = 64 * 1024;

    /// A reply with `status`, no headers and an empty body.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A redirect (`status` 301, 302, 303, 307 or 308) to `location`.
    pub fn redirect(status: u16, location: &str) -> Self {
        Self::new(status).header("location", location)
    }

    /// Add header `name: value`.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((String::from(name), String::from(value)));
        self
    }

    /// Set the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Set a plain-text body, with `content-type: text/plain; charset=utf-8`.
    pub fn text(self, text: &str) -> Self {
        self.header("content-type", "text/plain; charset=utf-8")
            .body(text.as_bytes())
    }
}

impl From<Reply> for Decision {
    fn from(reply: Reply) -> Self {
        Decision::Respond(reply)
    }
}

/// A typed builder for a decision that forwards the request with changes
/// (WIT 0.2 `forward`), from [`Context::forward`]-style calls on a
/// `&dyn Context`:
///
/// ```
/// use wasmlb_sdk::prelude::*;
/// use wasmlb_sdk::testing::{backends, MockContext};
/// let set = backends(&[1, 1]);
/// let cx = MockContext::new(&set).with_path("/api/items?id=3");
/// let dyn_cx: &dyn Context = &cx;
/// let d = dyn_cx.forward(0).set_header("x-route", "api").path("/items?id=3").mirror(1).decision();
/// assert_eq!(d, Decision::Backend(0));
/// assert_eq!(cx.forwarded_path(), "/items?id=3");
/// assert_eq!(cx.forwarded_header("x-route").as_deref(), Some("api"));
/// assert_eq!(cx.mirrored(), Some(1));
/// ```
///
/// Each call takes effect on the host at once (the builder only chains
/// them); the host refuses, and logs, what `Context::set_request_header`
/// and friends document.
#[must_use = "a Forward is a decision: return `.decision()` or `.into()` from select"]
pub struct Forward<'a> {
    cx: &'a dyn Context,
    decision: Decision,
}

impl core::fmt::Debug for Forward<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Forward")
            .field("decision", &self.decision)
            .finish_non_exhaustive()
    }
}

impl Forward<'_> {
    /// Set request header `name` to `value` (replacing its values).
    pub fn set_header(self, name: &str, value: &str) -> Self {
        self.cx.set_request_header(name, value);
        self
    }

    /// Remove request header `name`.
    pub fn remove_header(self, name: &str) -> Self {
        self.cx.remove_request_header(name);
        self
    }

    /// Replace the path and query the backend sees (origin-form, starting
    /// with `/`).
    pub fn path(self, path_and_query: &str) -> Self {
        self.cx.set_path(path_and_query);
        self
    }

    /// Also send a copy of the request to backend `id`; its response is
    /// discarded.
    pub fn mirror(self, id: u32) -> Self {
        self.cx.mirror(id);
        self
    }

    /// The decision to return from [`Strategy::select`].
    pub fn decision(self) -> Decision {
        self.decision
    }
}

impl From<Forward<'_>> for Decision {
    fn from(forward: Forward<'_>) -> Self {
        forward.decision
    }
}

impl<'a> dyn Context + 'a {
    /// Forward to backend `id`, with the changes chained on the returned
    /// [`Forward`].
    pub fn forward(&self, id: u32) -> Forward<'_> {
        Forward {
            cx: self,
            decision: Decision::Backend(id),
        }
    }

    /// Forward to the first of `ids` (the rest for retries), with changes.
    pub fn forward_candidates(&self, ids: Vec<u32>) -> Forward<'_> {
        Forward {
            cx: self,
            decision: Decision::Candidates(ids),
        }
    }

    /// Start a reply with `status` (see [`Reply`]).
    pub fn respond(&self, status: u16) -> Reply {
        Reply::new(status)
    }
}

/// Severity of a log record sent with [`Context::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Very verbose diagnostics.
    Trace,
    /// Diagnostics.
    Debug,
    /// Normal events.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something the plugin could not handle.
    Error,
}

/// The host, as seen from [`Strategy::select`]: the request being balanced
/// and the live state of the backends.
///
/// In a wasm build every method is one host call (about 60 ns); read only what
/// the decision needs. Natively, [`testing::MockContext`] implements it.
pub trait Context {
    /// The request method, e.g. `GET`.
    fn method(&self) -> String;
    /// The request authority (`Host` or `:authority`), empty if absent.
    fn authority(&self) -> String;
    /// The path and query, e.g. `/v1/items?id=3`.
    fn path(&self) -> String;
    /// The first value of header `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<String>;
    /// Every value of header `name`, in order.
    fn header_all(&self, name: &str) -> Vec<String>;
    /// The downstream TCP peer's address (never taken from a header).
    fn client_address(&self) -> SocketAddr;
    /// `https` if the client came over TLS, else `http` (WIT 0.1.1).
    fn scheme(&self) -> String;
    /// The client's HTTP version: `HTTP/1.0`, `HTTP/1.1` or `HTTP/2` (WIT 0.1.1).
    fn http_version(&self) -> String;
    /// The TLS server name (SNI) the client asked for, lowercase; `None` on
    /// plaintext or without SNI (WIT 0.1.1).
    fn server_name(&self) -> Option<String>;
    /// True for a gRPC request (`content-type: application/grpc*`) (WIT 0.1.1).
    fn is_grpc(&self) -> bool;
    /// Number of backends in the current set.
    fn backend_count(&self) -> u32;
    /// Requests in flight to backend `id` (0 for an unknown id).
    fn in_flight(&self, id: u32) -> u32;
    /// In-flight counts of all backends, indexed by id, in one host call.
    fn in_flight_all(&self) -> Vec<u32>;
    /// Whether backend `id` is currently healthy (false for an unknown id).
    fn healthy(&self, id: u32) -> bool;
    /// The host's peak-EWMA of backend `id`'s response time, in ns (0 until
    /// its first response, and for an unknown id). Samples above the estimate
    /// replace it; lower ones decay in over about 10 s (tower's `PeakEwma`).
    fn rtt_estimate(&self, id: u32) -> u64;
    /// Whether backend `id` is set to drain and still passes its health
    /// checks: it reads `healthy = false` (no new sessions), but requests of
    /// a session it already serves may still go to it (sticky sessions).
    fn draining(&self, id: u32) -> bool;
    /// Add `name: value` to the response sent to the client (for example a
    /// `set-cookie`). Only valid during `select`; the host ignores invalid,
    /// hop-by-hop and framing headers, and more than 16 headers or 8 KiB.
    fn add_response_header(&self, name: &str, value: &str);
    /// Set request header `name` to `value` for the backend, replacing its
    /// values (WIT 0.2 `forward.set-header`). The host refuses an invalid
    /// field, hop-by-hop and framing headers, `host`, and more than 16
    /// changes or 8 KiB per request.
    fn set_request_header(&self, name: &str, value: &str);
    /// Remove request header `name` before forwarding (WIT 0.2).
    fn remove_request_header(&self, name: &str);
    /// Replace the path and query the backend sees, e.g. `/items?id=3`
    /// (WIT 0.2 `forward.set-path`; origin-form, at most 8 KiB).
    fn set_path(&self, path_and_query: &str);
    /// Also send a copy of the request to backend `id`, its response
    /// discarded (WIT 0.2 `forward.mirror`; the last call wins).
    fn mirror(&self, id: u32);
    /// Monotonic clock, in nanoseconds since an arbitrary fixed point.
    fn monotonic_now(&self) -> u64;
    /// Log through the host's logger, tagged with the upstream's name.
    fn log(&self, level: Level, message: &str);
}

/// A load-balancing strategy.
///
/// The host keeps one instance per upstream and serializes calls into it, so
/// `&mut self` is the upstream's global state. Register the type with
/// [`export_strategy!`].
pub trait Strategy: Sized {
    /// The upstream's `plugin_config` table, deserialized from JSON with serde.
    /// Use [`NoConfig`] when the strategy takes none.
    type Config: serde::de::DeserializeOwned;

    /// Build the strategy from its config. An `Err` makes the plugin fail to
    /// load; the text is shown to the operator.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// Replace the backend set: called once after [`Strategy::new`] and again
    /// whenever the set, a weight or a health state changes.
    /// `backends[i].id == i`.
    fn set_backends(&mut self, backends: Vec<Backend>);

    /// Choose the backend for the request described by `cx`.
    fn select(&mut self, cx: &dyn Context) -> Decision;

    /// State to hand to the next plugin of the upstream when this one is
    /// swapped out (the `wasmlb:plugin/state` export). Start it with a format
    /// tag. Default: nothing (the next plugin starts fresh).
    fn export_state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restore state exported by the previous plugin of the upstream: called
    /// after [`Strategy::new`] and [`Strategy::set_backends`], before the first
    /// [`Strategy::select`]. The bytes may come from another strategy or an
    /// older version: return `Err` for a format you do not know (the host logs
    /// it and this instance keeps its fresh state). Default: ignore.
    fn import_state(&mut self, state: &[u8]) -> Result<(), String> {
        let _ = state;
        Ok(())
    }
}

/// Config type for strategies that take no `plugin_config`: accepts an empty
/// table and rejects any key, naming it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Parse `plugin_config` JSON and build the strategy. Used by the export glue
/// and by [`testing`]; errors read `invalid plugin_config: <serde message>`.
pub fn instantiate<S: Strategy>(config_json: &str) -> Result<S, String> {
    let config: S::Config = serde_json::from_str(config_json)
        .map_err(|e| alloc::format!("invalid plugin_config: {e}"))?;
    S::new(config)
}

/// Export a [`Strategy`] type as the component's `wasmlb:plugin/strategy`.
///
/// Call it once per plugin crate, at the crate root: `export_strategy!(MyType);`.
/// It expands to nothing outside `wasm32`, so native `cargo test` is unaffected.
#[macro_export]
macro_rules! export_strategy {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static __WASMLB_STATE: $crate::__rt::StrategyCell<$ty> =
                $crate::__rt::StrategyCell::new();
            struct __WasmlbGuest;
            impl $crate::__rt::bindings::exports::wasmlb::plugin::strategy::Guest for __WasmlbGuest {
                fn init(config: $crate::__rt::String) -> ::core::result::Result<(), $crate::__rt::String> {
                    __WASMLB_STATE.init(&config)
                }
                fn set_backends(
                    backends: $crate::__rt::Vec<$crate::__rt::bindings::wasmlb::plugin::types::Backend>,
                ) {
                    __WASMLB_STATE.set_backends(backends)
                }
                fn select() -> $crate::__rt::bindings::wasmlb::plugin::types::Decision {
                    __WASMLB_STATE.select()
                }
            }
            impl $crate::__rt::bindings::exports::wasmlb::plugin::state::Guest for __WasmlbGuest {
                fn export_state() -> $crate::__rt::Vec<u8> {
                    __WASMLB_STATE.export_state()
                }
                fn import_state(state: $crate::__rt::Vec<u8>) -> ::core::result::Result<(), $crate::__rt::String> {
                    __WASMLB_STATE.import_state(&state)
                }
            }
            $crate::__rt::bindings::__export_balancer!(__WasmlbGuest with_types_in $crate::__rt::bindings);
        };
    };
}
