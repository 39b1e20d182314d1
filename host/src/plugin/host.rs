//! The host side of the WIT contract: what a plugin's store holds, and the
//! host functions plugins import (`log`, `clock`, `backend-state`,
//! `request`, `response`, and since 0.2 `forward`), for the 0.2 contract.
//! [`super::host_v0_1`] answers a 0.1 component's imports with these.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use wasmtime::{Store, StoreLimits};

use super::bindings::{
    self,
    wasmlb::plugin::types::{self as wit_types, IpAddress, Level, SocketAddress},
};
use super::*;
use crate::backend::Backend;
use crate::plugin_call::CallDeadline;

/// What a plugin's store holds: its limits, the live backend state and, during
/// `select`, the request.
#[derive(Debug)]
pub struct HostState {
    pub(super) limits: StoreLimits,
    pub(super) upstream: Arc<str>,
    pub(super) log_limit: Arc<crate::log_limit::LogLimiter>,
    pub(super) backends: Arc<[Backend]>,
    pub(super) request: Option<Box<RequestView>>,
    /// Headers added with `response.add-header` during the current `select`.
    pub(super) response_headers: ResponseHeaders,
    /// Changes asked with the `forward` interface during the current
    /// `select`.
    pub(super) edits: RequestEdits,
    /// With a trace recorder: the names of the request headers read during
    /// the current `select` (lowercase, each once).
    pub(super) header_reads: Option<Vec<String>>,
    /// The CPU-time deadline of the call in progress.
    pub(super) deadline: CallDeadline,
}

impl HostState {
    /// Note that the plugin read header `name` (with a recorder only).
    fn note_read(&mut self, name: &str) {
        if let Some(reads) = self.header_reads.as_mut()
            && reads.len() < MAX_NOTED_READS
            && !reads.iter().any(|r| r.eq_ignore_ascii_case(name))
        {
            reads.push(name.to_ascii_lowercase());
        }
    }
}

/// Header names noted per `select` at most (a plugin reading every name it
/// can think of is not recorded further).
const MAX_NOTED_READS: usize = 32;

/// Start a call on `store` with a budget of `budget_ms` ms of CPU time
/// ([`crate::plugin_call`]); the call counts as in progress (for the epoch
/// ticker, see [`super::EPOCH_IDLE_TICK`]) until the returned guard drops.
#[must_use = "the call is in progress while the guard lives"]
pub(super) fn arm(store: &mut Store<HostState>, budget_ms: u64) -> InCall {
    let ticks = store.data_mut().deadline.arm(budget_ms);
    store.set_epoch_deadline(ticks);
    super::CALLS_IN_PROGRESS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    InCall(())
}

/// A plugin call in progress; see [`arm`].
#[derive(Debug)]
pub(super) struct InCall(());

impl Drop for InCall {
    fn drop(&mut self) {
        super::CALLS_IN_PROGRESS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(super) fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Nanoseconds on the host's monotonic clock (what plugins read as
/// `monotonic-now`).
pub fn monotonic_ns() -> u64 {
    u64::try_from(process_start().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl wit_types::Host for HostState {}

impl bindings::wasmlb::plugin::log::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        // info and above are rate-limited per upstream; trace and debug are
        // off by default and not limited.
        let suppressed = match level {
            Level::Trace | Level::Debug => 0,
            _ => match self.log_limit.admit() {
                Some(n) => n,
                None => return,
            },
        };
        let mut message = message;
        if message.len() > MAX_LOG_BYTES {
            let mut cut = MAX_LOG_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let upstream = &*self.upstream;
        match level {
            Level::Trace => tracing::trace!(target: "wasmlb::plugin", upstream, "{message}"),
            Level::Debug => tracing::debug!(target: "wasmlb::plugin", upstream, "{message}"),
            Level::Info => {
                tracing::info!(target: "wasmlb::plugin", upstream, suppressed, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "wasmlb::plugin", upstream, suppressed, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "wasmlb::plugin", upstream, suppressed, "{message}")
            }
        }
    }
}

impl bindings::wasmlb::plugin::clock::Host for HostState {
    fn monotonic_now(&mut self) -> u64 {
        monotonic_ns()
    }
}

impl bindings::wasmlb::plugin::backend_state::Host for HostState {
    fn backend_count(&mut self) -> u32 {
        self.backends.len() as u32
    }
    fn in_flight(&mut self, id: u32) -> u32 {
        self.backends
            .get(id as usize)
            .map_or(0, |b| b.live.in_flight.load(Ordering::Relaxed))
    }
    fn in_flight_all(&mut self) -> Vec<u32> {
        self.backends
            .iter()
            .map(|b| b.live.in_flight.load(Ordering::Relaxed))
            .collect()
    }
    fn healthy(&mut self, id: u32) -> bool {
        self.backends
            .get(id as usize)
            .is_some_and(|b| b.live.healthy.load(Ordering::Relaxed))
    }
    fn rtt_estimate(&mut self, id: u32) -> u64 {
        self.backends
            .get(id as usize)
            .map_or(0, |b| b.live.rtt.get_ns())
    }
    fn draining(&mut self, id: u32) -> bool {
        self.backends.get(id as usize).is_some_and(|b| {
            b.live.admin_state() == crate::config::AdminState::Drain
                && b.live.check_passing.load(Ordering::Relaxed)
        })
    }
}

impl HostState {
    /// Log a refused `response` or `forward` call (rate-limited).
    fn refused(&self, call: &str, name: &str, why: &str) {
        if let Some(suppressed) = self.log_limit.admit() {
            tracing::warn!(
                target: "wasmlb::plugin",
                upstream = &*self.upstream,
                header = %name,
                suppressed,
                "{call} ignored: {why}"
            );
        }
    }
}

impl bindings::wasmlb::plugin::response::Host for HostState {
    fn add_header(&mut self, name: String, value: String) {
        if self.request.is_none() {
            return; // only during select
        }
        if let Err(why) = self.response_headers.add(&name, &value) {
            self.refused("response.add-header", &name, why);
        }
    }
}

impl bindings::wasmlb::plugin::forward::Host for HostState {
    fn set_header(&mut self, name: String, value: String) {
        if self.http().is_none() {
            return;
        }
        if let Err(why) = self.edits.set_header(&name, &value) {
            self.refused("forward.set-header", &name, why);
        }
    }
    fn remove_header(&mut self, name: String) {
        if self.http().is_none() {
            return;
        }
        if let Err(why) = self.edits.remove_header(&name) {
            self.refused("forward.remove-header", &name, why);
        }
    }
    fn set_path(&mut self, path_and_query: String) {
        if self.http().is_none() {
            return;
        }
        if let Err(why) = self.edits.set_path(&path_and_query) {
            self.refused("forward.set-path", &path_and_query, why);
        }
    }
    fn mirror(&mut self, id: u32) {
        if self.http().is_none() {
            return;
        }
        if (id as usize) < self.backends.len() {
            self.edits.mirror = Some(id);
        } else {
            self.refused("forward.mirror", "-", "no backend with this id");
        }
    }
}

impl HostState {
    /// The request being balanced, if it is an HTTP request (not a
    /// TCP-mode connection, whose HTTP fields read as absent).
    fn http(&self) -> Option<&RequestView> {
        self.request.as_deref().filter(|r| !r.tcp)
    }
}

impl bindings::wasmlb::plugin::request::Host for HostState {
    fn method(&mut self) -> String {
        self.http()
            .map(|r| r.parts.method.as_str().to_string())
            .unwrap_or_default()
    }
    fn authority(&mut self) -> String {
        self.http()
            .map(|r| crate::headers::authority(&r.parts).to_string())
            .unwrap_or_default()
    }
    fn path(&mut self) -> String {
        self.http()
            .and_then(|r| r.parts.uri.path_and_query())
            .map(|p| p.as_str().to_string())
            .unwrap_or_default()
    }
    fn header(&mut self, name: String) -> Option<String> {
        self.http()?;
        self.note_read(&name);
        let value = self.http()?.parts.headers.get(name.as_str())?;
        Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
    }
    fn header_all(&mut self, name: String) -> Vec<String> {
        if self.http().is_some() {
            self.note_read(&name);
        }
        let Some(r) = self.http() else {
            return Vec::new();
        };
        r.parts
            .headers
            .get_all(name.as_str())
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }
    fn client_address(&mut self) -> SocketAddress {
        let addr = self
            .request
            .as_deref()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |r| r.client);
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                IpAddress::Ipv4((a, b, c, d))
            }
            std::net::IpAddr::V6(v6) => {
                let [a, b, c, d, e, f, g, h] = v6.segments();
                IpAddress::Ipv6((a, b, c, d, e, f, g, h))
            }
        };
        SocketAddress {
            ip,
            port: addr.port(),
        }
    }
    fn scheme(&mut self) -> String {
        match self.request.as_deref() {
            Some(r) if r.tcp => "tcp".into(),
            Some(r) if r.https => "https".into(),
            Some(_) => "http".into(),
            None => String::new(),
        }
    }
    fn http_version(&mut self) -> String {
        let Some(r) = self.http() else {
            return String::new();
        };
        match r.parts.version {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        }
        .into()
    }
    fn server_name(&mut self) -> Option<String> {
        self.request
            .as_deref()?
            .server_name
            .as_deref()
            .map(str::to_string)
    }
    fn is_grpc(&mut self) -> bool {
        self.http()
            .is_some_and(|r| crate::headers::is_grpc(&r.parts.headers))
    }
}
