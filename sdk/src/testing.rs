//! A native stand-in for the host, to unit-test strategies with `cargo test`.
//!
//! ```
//! use wasmlb_sdk::prelude::*;
//! use wasmlb_sdk::testing::{backends, MockContext};
//! # #[derive(Default)] struct First { b: Vec<Backend> }
//! # impl Strategy for First {
//! #   type Config = NoConfig;
//! #   fn new(_: NoConfig) -> Result<Self, String> { Ok(Self::default()) }
//! #   fn set_backends(&mut self, b: Vec<Backend>) { self.b = b; }
//! #   fn select(&mut self, _: &dyn Context) -> Decision { Decision::Backend(self.b[0].id) }
//! # }
//! let mut s: First = wasmlb_sdk::instantiate("{}").unwrap();
//! let set = backends(&[1, 1, 1]);
//! s.set_backends(set.clone());
//! let cx = MockContext::new(&set).with_header("x-user", "42");
//! assert_eq!(s.select(&cx), Decision::Backend(0));
//! ```

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use crate::{Backend, Context, Decision, Ipv4Addr, Level, SocketAddr, Strategy};

/// `n = weights.len()` healthy backends `127.0.0.1:9001..` with the given
/// weights and no labels; `id` is the index.
pub fn backends(weights: &[u32]) -> Vec<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Backend {
            id: i as u32,
            address: format!("127.0.0.1:{}", 9001 + i),
            weight: w,
            healthy: true,
            labels: Vec::new(),
        })
        .collect()
}

/// The host as a plain value: request fields, per-backend in-flight counts and
/// health, a settable clock, and a record of log calls.
#[derive(Debug, Clone)]
pub struct MockContext {
    /// Request method (default `GET`).
    pub method: String,
    /// Request authority (default `example.com`).
    pub authority: String,
    /// Path and query (default `/`).
    pub path: String,
    /// Headers as (name, value); names compare case-insensitively.
    pub headers: Vec<(String, String)>,
    /// Client socket address (default `192.0.2.1:40000`).
    pub client: SocketAddr,
    /// Scheme (default `http`).
    pub scheme: String,
    /// HTTP version (default `HTTP/1.1`).
    pub http_version: String,
    /// TLS server name (default none).
    pub server_name: Option<String>,
    /// In-flight requests per backend id.
    pub in_flight: Vec<u32>,
    /// Health per backend id.
    pub healthy: Vec<bool>,
    /// Response-time estimate per backend id, in ns (default 0: unmeasured).
    pub rtt_ns: Vec<u64>,
    /// Draining per backend id (default false).
    pub draining: Vec<bool>,
    /// Every [`Context::add_response_header`] call, in order.
    pub response_headers: RefCell<Vec<(String, String)>>,
    /// What [`Context::monotonic_now`] returns, in ns.
    pub now_ns: Cell<u64>,
    /// Every [`Context::log`] call, in order.
    pub logs: RefCell<Vec<(Level, String)>>,
    /// The request changes asked so far (WIT 0.2 `forward`); see
    /// [`MockContext::forwarded_header`], [`MockContext::forwarded_path`],
    /// [`MockContext::mirrored`], and [`MockContext::reset_forward`]
    /// between selections.
    pub forward: RefCell<ForwardLog>,
}

/// What a strategy asked of the forwarded request through a
/// [`MockContext`]: header changes in order (`None` = removed), the path,
/// the mirror, and the calls the host would refuse, with the reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardLog {
    /// `(name, Some(value))` for a set, `(name, None)` for a removal.
    pub headers: Vec<(String, Option<String>)>,
    /// The new path and query, if set.
    pub path: Option<String>,
    /// The mirror's backend id, if any.
    pub mirror: Option<u32>,
    /// Calls the host would refuse: `(call, reason)`.
    pub refused: Vec<(String, String)>,
}

/// Request headers the host keeps to itself (hop-by-hop, framing, `host`).
const HOST_OWNED: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-encoding",
    "host",
];

fn header_refusal(name: &str, value: &str) -> Option<&'static str> {
    let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    if name.is_empty() || !name.bytes().all(token) {
        return Some("not a valid header name");
    }
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Some("not a valid header value");
    }
    HOST_OWNED
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
        .then_some("hop-by-hop, framing and host headers are the host's")
}

impl MockContext {
    /// The value of request header `name` as the backend would see it:
    /// the mock's headers with the changes asked so far applied.
    pub fn forwarded_header(&self, name: &str) -> Option<String> {
        let log = self.forward.borrow();
        let edited = log
            .headers
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name));
        match edited {
            Some((_, value)) => value.clone(),
            None => self.header(name),
        }
    }

    /// The path and query the backend would see.
    pub fn forwarded_path(&self) -> String {
        self.forward
            .borrow()
            .path
            .clone()
            .unwrap_or_else(|| self.path.clone())
    }

    /// The backend id a copy would be mirrored to, if any.
    pub fn mirrored(&self) -> Option<u32> {
        self.forward.borrow().mirror
    }

    /// Forget the changes asked so far (the host starts every `select`
    /// with none).
    pub fn reset_forward(&self) {
        *self.forward.borrow_mut() = ForwardLog::default();
    }
}

impl MockContext {
    /// A `GET /` request with no in-flight requests; health copied from `backends`.
    pub fn new(backends: &[Backend]) -> Self {
        Self {
            method: "GET".to_string(),
            authority: "example.com".to_string(),
            path: "/".to_string(),
            headers: Vec::new(),
            client: SocketAddr::new(Ipv4Addr::new(192, 0, 2, 1).into(), 40000),
            scheme: "http".to_string(),
            http_version: "HTTP/1.1".to_string(),
            server_name: None,
            in_flight: alloc::vec![0; backends.len()],
            healthy: backends.iter().map(|b| b.healthy).collect(),
            rtt_ns: alloc::vec![0; backends.len()],
            draining: alloc::vec![false; backends.len()],
            response_headers: RefCell::new(Vec::new()),
            now_ns: Cell::new(0),
            logs: RefCell::new(Vec::new()),
            forward: RefCell::new(ForwardLog::default()),
        }
    }

    /// Add a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Set the path.
    pub fn with_path(mut self, path: &str) -> Self {
        self.path = path.to_string();
        self
    }

    /// Set the client address.
    pub fn with_client(mut self, client: SocketAddr) -> Self {
        self.client = client;
        self
    }

    /// A request over TLS (`https`, HTTP/2) for server name `sni`.
    pub fn with_tls(mut self, sni: &str) -> Self {
        self.scheme = "https".to_string();
        self.http_version = "HTTP/2".to_string();
        self.server_name = Some(sni.to_string());
        self
    }

    /// Set the in-flight counts, indexed by backend id.
    pub fn with_in_flight(mut self, in_flight: &[u32]) -> Self {
        self.in_flight = in_flight.to_vec();
        self
    }

    /// Set the response-time estimates, in ms, indexed by backend id.
    pub fn with_rtt_ms(mut self, rtt_ms: &[u64]) -> Self {
        self.rtt_ns = rtt_ms.iter().map(|ms| ms * 1_000_000).collect();
        self
    }
}

impl Context for MockContext {
    fn method(&self) -> String {
        self.method.clone()
    }
    fn authority(&self) -> String {
        self.authority.clone()
    }
    fn path(&self) -> String {
        self.path.clone()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }
    fn client_address(&self) -> SocketAddr {
        self.client
    }
    fn scheme(&self) -> String {
        self.scheme.clone()
    }
    fn http_version(&self) -> String {
        self.http_version.clone()
    }
    fn server_name(&self) -> Option<String> {
        self.server_name.clone()
    }
    fn is_grpc(&self) -> bool {
        self.header("content-type").is_some_and(|v| {
            v.get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"))
        })
    }
    fn backend_count(&self) -> u32 {
        self.healthy.len() as u32
    }
    fn in_flight(&self, id: u32) -> u32 {
        self.in_flight.get(id as usize).copied().unwrap_or(0)
    }
    fn in_flight_all(&self) -> Vec<u32> {
        self.in_flight.clone()
    }
    fn healthy(&self, id: u32) -> bool {
        self.healthy.get(id as usize).copied().unwrap_or(false)
    }
    fn rtt_estimate(&self, id: u32) -> u64 {
        self.rtt_ns.get(id as usize).copied().unwrap_or(0)
    }
    fn draining(&self, id: u32) -> bool {
        self.draining.get(id as usize).copied().unwrap_or(false)
    }
    fn add_response_header(&self, name: &str, value: &str) {
        self.response_headers
            .borrow_mut()
            .push((name.to_string(), value.to_string()));
    }
    fn set_request_header(&self, name: &str, value: &str) {
        let mut log = self.forward.borrow_mut();
        match header_refusal(name, value) {
            Some(why) => log.refused.push(("set-header".into(), why.into())),
            None => log
                .headers
                .push((name.to_ascii_lowercase(), Some(value.to_string()))),
        }
    }
    fn remove_request_header(&self, name: &str) {
        let mut log = self.forward.borrow_mut();
        match header_refusal(name, "") {
            Some(why) => log.refused.push(("remove-header".into(), why.into())),
            None => log.headers.push((name.to_ascii_lowercase(), None)),
        }
    }
    fn set_path(&self, path_and_query: &str) {
        let mut log = self.forward.borrow_mut();
        let ok = path_and_query.starts_with('/')
            && !path_and_query.starts_with("//")
            && path_and_query.len() <= 8192
            && path_and_query
                .bytes()
                .all(|b| b > 0x20 && b < 0x7f && b != b'#');
        if ok {
            log.path = Some(path_and_query.to_string());
        } else {
            log.refused.push((
                "set-path".into(),
                "not an origin-form path and query".into(),
            ));
        }
    }
    fn mirror(&self, id: u32) {
        let mut log = self.forward.borrow_mut();
        if (id as usize) < self.healthy.len() {
            log.mirror = Some(id);
        } else {
            log.refused
                .push(("mirror".into(), "no backend with this id".into()));
        }
    }
    fn monotonic_now(&self) -> u64 {
        self.now_ns.get()
    }
    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }
}

/// Build strategy `S` from `config_json`, hand it `backends`, and make `n`
/// sequential selections with `cx` (in-flight counts unchanged between calls).
/// Returns how often each backend id was chosen (the first candidate counts
/// for a candidate list); `Unavailable` answers are not counted.
///
/// # Errors
/// The strategy's init error, as [`crate::instantiate`] returns it.
pub fn spread<S: Strategy>(
    config_json: &str,
    backends: &[Backend],
    cx: &MockContext,
    n: usize,
) -> Result<Vec<u32>, String> {
    let mut s: S = crate::instantiate(config_json)?;
    s.set_backends(backends.to_vec());
    let mut counts = alloc::vec![0u32; backends.len()];
    for _ in 0..n {
        let id = match s.select(cx) {
            Decision::Backend(id) => Some(id),
            Decision::Candidates(ids) => ids.first().copied(),
            Decision::Unavailable | Decision::Respond(_) => None,
        };
        if let Some(slot) = id.and_then(|id| counts.get_mut(id as usize)) {
            *slot += 1;
        }
    }
    Ok(counts)
}
