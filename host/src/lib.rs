//! wasmlb: a reverse proxy and load balancer whose backend selection is a
//! WebAssembly component plugin.
//!
//! The pieces, each in its own module:
//! - [`config`]: the TOML config file (listeners, routes, upstreams) and its
//!   validation.
//! - [`plugin`]: the wasmtime runtime that loads strategy components, checks
//!   their imports, and calls them under a deadline and a memory cap.
//! - [`plugin_call`]: how a plugin call fails, and its deadline in CPU time.
//! - [`upstream`]: a named group of backends, its plugin instance, the
//!   native round-robin fallback, outlier ejection, panic mode and slow start.
//! - [`backend`]: one backend's live counters and state (health, ejection,
//!   drain, slow start).
//! - [`request_rules`]: what a downstream request must satisfy before it is
//!   routed (limits, `Host`, `CONNECT`, HTTP/2 to HTTP/1.1 translation).
//! - [`proxy`]: per-request routing, header handling and forwarding.
//! - [`listener`]: accept loops, connection caps, HTTP/1.1 and HTTP/2 serving.
//! - [`control`]: the control plane: reloads, plugin swaps, state for the admin API.
//! - [`server`]: start a config's server (and admin API); graceful shutdown.
//! - [`conn`]: downstream connection timeouts (request head read, idle
//!   keep-alive) and the connection cap.
//! - [`log_limit`]: rate limits for log lines on per-request paths.
//! - [`fd_limit`]: the descriptor budget (`RLIMIT_NOFILE`) and local
//!   resource errors.
//! - [`admin`]: the admin API (upstream state, plugin swaps, reloads, metrics).
//! - [`metrics`]: the Prometheus metrics.
//! - [`health`]: active health checks and the per-upstream upkeep loop.
//! - [`scaffold`]: `wasmlb plugin new`, a ready-to-build strategy crate.
//! - [`simulate`]: `wasmlb simulate`, a plugin run offline against synthetic
//!   or recorded traffic.
//!
//! Embedding: load a [`config::Config`], then [`server::Server::start`] it.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod backend;
pub mod builtin;
pub mod config;
pub mod conn;
pub mod connector;
pub mod control;
pub mod discovery;
pub mod dns;
pub mod etcd;
pub mod fd_limit;
pub mod fleet;
pub mod headers;
pub mod health;
pub mod listener;
pub mod log_limit;
pub mod logging;
pub mod metrics;
pub mod plugin;
pub mod plugin_call;
pub mod proxy;
pub mod proxy_protocol;
pub mod record;
pub mod request_rules;
pub mod retry;
pub mod sampling;
pub mod scaffold;
pub mod server;
pub mod simulate;
pub mod tls;
pub mod tunnel;
pub mod upstream;
