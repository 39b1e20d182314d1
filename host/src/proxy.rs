//! Per-request work: route to an upstream, ask its plugin for a backend,
//! rewrite headers, forward, and stream the response back.
//!
//! Header handling (hop-by-hop removal, `X-Forwarded-*`, `Host`) is in
//! [`crate::headers`].
//!
//! Status codes the proxy itself produces, each with a one-line plain-text
//! reason: 502 when the backend cannot be connected to or breaks the response,
//! 503 when no backend is available, 504 when connecting or waiting for the
//! response headers times out, or the request outlives `request_timeout_ms`.
//!
//! A failed attempt is retried on another backend (the plugin is asked
//! again; backends already tried are skipped) up to the upstream's `retries`,
//! within its retry budget, and only where [`crate::retry`] says it is safe.
//! Every attempt's outcome feeds outlier detection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::{Config, RequestLimits, RouteConfig};
use crate::conn::RequestGuard;
use crate::headers::{authority, host_without_port, prepare_request, strip_hop_by_hop};
use crate::log_limit::LogLimiter;
use crate::metrics::{LocalOp, Metrics};
use crate::plugin::{RequestView, Runtime};
use crate::retry::{AttemptBody, ReplayBody};
use crate::upstream::{Chosen, InFlight, Selection, Upstream};

/// Errors building the proxy from a config.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// An upstream's plugin failed to load or initialize (the plugin error
    /// is the [`std::error::Error::source`]).
    #[error("upstream {upstream}")]
    Plugin {
        /// The upstream.
        upstream: String,
        /// What failed.
        source: crate::plugin::PluginError,
    },
    /// The plugin runtime could not start.
    #[error(transparent)]
    Runtime(crate::plugin::PluginError),
}

/// Identifies a listener across reloads: its configured address, and its
/// position among listeners configured with that same address (they can only
/// repeat with port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// The configured address.
    pub address: SocketAddr,
    /// 0 for the first listener with this address, 1 for the second, ...
    pub nth: usize,
}

impl ListenerKey {
    /// The keys of a config's listeners, in config order.
    pub fn all(config: &Config) -> Vec<ListenerKey> {
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        config
            .listeners
            .iter()
            .map(|l| {
                let nth = seen.entry(l.address).or_default();
                let key = ListenerKey {
                    address: l.address,
                    nth: *nth,
                };
                *nth += 1;
                key
            })
            .collect()
    }
}

struct Route {
    host: Option<String>,
    path_prefix: Option<String>,
    upstream: usize,
}

type HttpClient = Client<HttpConnector, AttemptBody>;

/// The routing table, the upstreams and their connection pools: everything a
/// request needs, built from one config. Immutable; a reload builds a new one
/// and swaps it in whole.
pub struct Proxy {
    upstreams: Vec<Arc<Upstream>>,
    clients: Vec<HttpClient>,
    routes: Vec<Route>,
    listener_defaults: HashMap<ListenerKey, usize>,
    metrics: Arc<Metrics>,
    downstream_timeouts: (Duration, Duration),
    limits: RequestLimits,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.upstreams)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Load every upstream's plugin and build the routing table.
    ///
    /// With `previous` (the proxy this one replaces), each backend that keeps
    /// its address in an upstream of the same name keeps its counters
    /// (in-flight, requests), and connection pools of unchanged upstreams
    /// are reused. Compiled plugins come from the runtime's digest cache.
    ///
    /// # Errors
    /// [`ProxyError`] naming the upstream whose plugin failed.
    pub fn build(
        config: &Config,
        runtime: &Runtime,
        metrics: Arc<Metrics>,
        previous: Option<&Proxy>,
    ) -> Result<Self, ProxyError> {
        let mut upstreams = Vec::new();
        let mut clients = Vec::new();
        for (name, cfg) in &config.upstreams {
            let old = previous.and_then(|p| {
                p.upstreams
                    .iter()
                    .position(|u| u.name() == name)
                    .map(|i| (p, i))
            });
            let counters = old
                .map(|(p, i)| p.upstreams[i].counters())
                .unwrap_or_default();
            let plugin = runtime
                .load(&cfg.plugin)
                .map_err(|source| ProxyError::Plugin {
                    upstream: name.clone(),
                    source,
                })?;
            let upstream =
                Upstream::build(name, cfg, plugin, &counters, &metrics).map_err(|source| {
                    ProxyError::Plugin {
                        upstream: name.clone(),
                        source,
                    }
                })?;
            let client = match old {
                Some((p, i)) if p.upstreams[i].connect_timeout == upstream.connect_timeout => {
                    p.clients[i].clone()
                }
                _ => http_client(&upstream),
            };
            clients.push(client);
            upstreams.push(Arc::new(upstream));
        }
        let index = |name: &str| upstreams.iter().position(|u| u.name() == name).unwrap_or(0);
        let routes = config
            .routes
            .iter()
            .map(
                |RouteConfig {
                     host,
                     path_prefix,
                     upstream,
                 }| Route {
                    host: host.clone(),
                    path_prefix: path_prefix.clone(),
                    upstream: index(upstream),
                },
            )
            .collect();
        let listener_defaults = ListenerKey::all(config)
            .into_iter()
            .zip(&config.listeners)
            .map(|(key, l)| (key, index(&l.upstream)))
            .collect();
        Ok(Self {
            upstreams,
            clients,
            routes,
            listener_defaults,
            metrics,
            downstream_timeouts: (
                Duration::from_millis(config.server.header_read_timeout_ms),
                Duration::from_millis(config.server.idle_timeout_ms),
            ),
            limits: config.server.limits,
        })
    }

    /// As [`Proxy::build`] with fresh metrics and no predecessor.
    ///
    /// # Errors
    /// As [`Proxy::build`].
    pub fn new(config: &Config, runtime: &Runtime) -> Result<Self, ProxyError> {
        Self::build(config, runtime, Arc::new(Metrics::new()), None)
    }

    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name() == name)
    }

    /// Every upstream, ordered by name.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Index of the upstream serving a request on `listener`: the first route
    /// whose host and path prefix both match, else the listener's default.
    fn route(&self, listener: &ListenerKey, parts: &http::request::Parts) -> Option<usize> {
        let host = host_without_port(authority(parts));
        let path = parts.uri.path();
        self.routes
            .iter()
            .find(|r| {
                r.host
                    .as_deref()
                    .is_none_or(|h| h.eq_ignore_ascii_case(host))
                    && r.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
            })
            .map(|r| r.upstream)
            .or_else(|| self.listener_defaults.get(listener).copied())
    }

    /// The metrics registry requests are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The downstream request limits (see [`crate::request_rules`]).
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// The downstream head-read and idle keep-alive timeouts (see [`crate::conn`]).
    pub fn downstream_timeouts(&self) -> (Duration, Duration) {
        self.downstream_timeouts
    }

    /// Serve one downstream request that arrived on `listener` from `client`.
    /// Never fails: a request breaking [`crate::request_rules`] gets its 4xx,
    /// other errors become 400/502/503/504 responses (see [`Failure`]).
    pub async fn handle(
        self: Arc<Self>,
        listener: ListenerKey,
        client: SocketAddr,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        if let Err(rejection) = crate::request_rules::check(&mut parts, &self.limits) {
            tracing::debug!(%client, status = rejection.status.as_u16(), "request refused: {}", rejection.reason);
            let mut response = error_response(rejection.status, rejection.reason);
            // The rest of the connection cannot be trusted to be framed as
            // the client meant: answer, then close.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(response);
        }
        let index = self.route(&listener, &parts);
        let (Some(upstream), Some(http)) = (
            index.and_then(|i| self.upstreams.get(i)),
            index.and_then(|i| self.clients.get(i)),
        ) else {
            return Ok(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream for this listener",
            ));
        };
        let deadline = upstream
            .request_timeout
            .map(|t| tokio::time::Instant::now() + t);
        let forward = self.forward(upstream, http, client, parts, body);
        let mut response = match deadline {
            None => forward.await,
            Some(at) => match tokio::time::timeout_at(at, forward).await {
                Ok(response) => response,
                Err(_) => {
                    self.metrics.unrouted(upstream.name(), 504);
                    error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "no response within request_timeout_ms = {}",
                            upstream.request_timeout.map_or(0, |t| t.as_millis())
                        ),
                    )
                }
            },
        };
        if let Some(at) = deadline {
            response.body_mut().deadline = Some(Box::pin(tokio::time::sleep_until(at)));
        }
        upstream
            .metrics()
            .request_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(response)
    }

    /// Ask the plugin, forward, and retry a failed attempt on another backend
    /// while the rules of [`crate::retry`], the upstream's `retries` and its
    /// retry budget allow. A connect failure (nothing was sent) is retried
    /// without drawing on the budget, on up to [`MAX_CONNECT_RETRIES`] other
    /// backends; a client fault is never retried.
    async fn forward(
        &self,
        upstream: &Upstream,
        http: &HttpClient,
        client: SocketAddr,
        parts: http::request::Parts,
        body: Incoming,
    ) -> Response<ProxyBody> {
        let idempotent = crate::retry::idempotent(&parts.method);
        let body = ReplayBody::new(body, upstream.retry_buffer_bytes);
        if upstream.retries > 0 {
            // The budget only matters to upstreams that retry.
            upstream.deposit_request();
        }
        let mut view = RequestView { parts, client };
        let mut tried: Vec<usize> = Vec::new();
        let (mut retries, mut connect_retries) = (0u32, 0u32);
        let mut last_failure = None;
        loop {
            let (mut selection, v) = upstream.select(view, &tried);
            view = v;
            let Some(chosen) = selection.backend.take() else {
                if let Some(failure) = last_failure {
                    // Every backend was tried: answer with the last failure.
                    return failure;
                }
                let reason = if selection.failed {
                    "the plugin failed (on_plugin_error = \"fail\")"
                } else {
                    "no backend available"
                };
                self.metrics.unrouted(upstream.name(), 503);
                return error_response(StatusCode::SERVICE_UNAVAILABLE, reason);
            };
            // A retry needs the head again; without retries, move it.
            let mut head = if upstream.retries == 0 {
                std::mem::replace(&mut view.parts, Request::new(()).into_parts().0)
            } else {
                copy_head(&view.parts)
            };
            if let Err(reason) = prepare_request(&mut head, client, &chosen.authority) {
                self.metrics.unrouted(upstream.name(), 400);
                return error_response(StatusCode::BAD_REQUEST, reason);
            }
            let guard = InFlight::begin(&chosen, upstream.metrics().in_flight.clone());
            let request = Request::from_parts(head, body.attempt());
            let sent_ns = crate::plugin::monotonic_ns();
            let result =
                tokio::time::timeout(upstream.response_timeout, http.request(request)).await;
            let address = chosen.address;
            let failure = match result {
                Ok(Ok(response)) => {
                    let now_ns = crate::plugin::monotonic_ns();
                    chosen
                        .counters
                        .rtt
                        .observe(now_ns.saturating_sub(sent_ns), now_ns);
                    let (mut parts, incoming) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    upstream.report_connected(&chosen);
                    upstream.report(&chosen, !parts.status.is_server_error());
                    chosen.counters.metrics.response(parts.status.as_u16());
                    for (name, value) in std::mem::take(&mut selection.response_headers) {
                        parts.headers.append(name, value);
                    }
                    let mut response = Response::from_parts(
                        parts,
                        ProxyBody::upstream(incoming, guard, upstream.response_body_timeout),
                    );
                    if upstream.debug_headers() {
                        debug_headers(&mut response, &selection, &chosen);
                    }
                    return response;
                }
                // The client's body failed: whatever the backend did, it is
                // not its fault, and nothing may be retried.
                _ if body.client_failed() => Failure::Client,
                Ok(Err(e)) if crate::fd_limit::local_resource_error(&e).is_some() => {
                    Failure::Local {
                        detail: error_chain(&e),
                    }
                }
                Ok(Err(e)) if e.is_connect() => Failure::Connect {
                    timed_out: is_timeout(&e),
                    detail: e.to_string(),
                },
                Ok(Err(e)) => Failure::Broken {
                    detail: error_chain(&e),
                },
                Err(_) => Failure::ResponseTimeout,
            };
            drop(guard);
            tracing::debug!(upstream = upstream.name(), %address, "attempt failed: {failure}");
            if let Failure::Client = failure {
                self.metrics.unrouted(upstream.name(), 400);
                let mut response = error_response(StatusCode::BAD_REQUEST, failure.reason());
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return response;
            }
            if let Failure::Local { detail } = &failure {
                // The proxy's own shortage: not the backend's fault, and
                // another backend would fare no better.
                static LOCAL: LogLimiter = LogLimiter::new();
                self.metrics.resources().local_error(LocalOp::Connect);
                self.metrics.unrouted(upstream.name(), 503);
                if let Some(suppressed) = LOCAL.admit() {
                    tracing::warn!(
                        upstream = upstream.name(),
                        suppressed,
                        "cannot open a backend connection, out of local resources \
                         (raise RLIMIT_NOFILE or lower max_connections): {detail}"
                    );
                }
                return error_response(StatusCode::SERVICE_UNAVAILABLE, failure.reason());
            }
            let status = failure.status();
            if failure.nothing_sent() {
                upstream.report_connect_failure(&chosen);
            } else {
                upstream.report(&chosen, false);
            }
            chosen.counters.metrics.response(status.as_u16());
            tried.push(chosen.id);
            let mut response = error_response(status, failure.reason());
            if upstream.debug_headers() {
                debug_headers(&mut response, &selection, &chosen);
                if let Ok(v) = HeaderValue::from_str(&failure.to_string()) {
                    response
                        .headers_mut()
                        .insert(HeaderName::from_static("x-wasmlb-error"), v);
                }
            }
            let retry = upstream.retries > 0
                && body.replayable()
                && if failure.nothing_sent() {
                    // Connect failures: the backend saw nothing, so retrying
                    // is always safe; bounded per request, not budgeted.
                    connect_retries < MAX_CONNECT_RETRIES && {
                        connect_retries += 1;
                        true
                    }
                } else {
                    retries < upstream.retries && idempotent && upstream.withdraw_retry() && {
                        retries += 1;
                        true
                    }
                };
            if !retry {
                return response;
            }
            last_failure = Some(response);
            upstream.metrics().retries.inc();
            tracing::debug!(
                upstream = upstream.name(),
                %address,
                attempt = tried.len() + 1,
                "retrying on another backend"
            );
        }
    }
}

/// Connect failures of one request retried on other backends at most
/// (NGINX `proxy_next_upstream error timeout` tries every server; this
/// bounds the wait when many connects time out).
pub const MAX_CONNECT_RETRIES: u32 = 8;

/// Why an attempt failed, classified by the side at fault.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The client's request body failed (it aborted, or its framing broke):
    /// 400, never blamed on the backend, never retried.
    #[error("the client's request body failed")]
    Client,
    /// Connecting failed (refused, unreachable, or `connect_timeout_ms`):
    /// nothing was sent. 502, or 504 if it timed out.
    #[error("connect failed: {detail}")]
    Connect { timed_out: bool, detail: String },
    /// The request was (perhaps) sent, then the connection broke before a
    /// response head: 502.
    #[error("the backend broke the connection: {detail}")]
    Broken { detail: String },
    /// No response head within `response_timeout_ms`: 504.
    #[error("no response head within response_timeout_ms")]
    ResponseTimeout,
    /// The proxy itself is out of descriptors, buffers, memory or ports
    /// ([`crate::fd_limit`]): 503, not blamed on the backend, not retried.
    #[error("out of local resources: {detail}")]
    Local { detail: String },
}

impl Failure {
    fn status(&self) -> StatusCode {
        match self {
            Failure::Client => StatusCode::BAD_REQUEST,
            Failure::Connect {
                timed_out: true, ..
            }
            | Failure::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Connect { .. } | Failure::Broken { .. } => StatusCode::BAD_GATEWAY,
            Failure::Local { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the client is told: generic, no backend address (the detail is
    /// logged, and shown in `x-wasmlb-error` with `debug_headers`).
    fn reason(&self) -> &'static str {
        match self {
            Failure::Client => "the request body was incomplete or malformed",
            Failure::Connect {
                timed_out: true, ..
            } => "connecting to the backend timed out",
            Failure::Connect { .. } => "the backend could not be reached",
            Failure::Broken { .. } => "the backend closed the connection without a response",
            Failure::ResponseTimeout => "the backend did not answer in time",
            Failure::Local { .. } => "the proxy is out of resources, try again",
        }
    }

    fn nothing_sent(&self) -> bool {
        matches!(self, Failure::Connect { .. })
    }
}

/// `e` and its sources, joined by `: ` (hyper-util's errors say little on
/// their own).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `x-wasmlb-plugin` and `x-wasmlb-backend` (see `debug_headers`).
fn debug_headers(response: &mut Response<ProxyBody>, selection: &Selection, chosen: &Chosen) {
    let plugin = selection
        .decided_by
        .as_ref()
        .map_or("(fallback)", |p| p.name());
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(plugin) {
        headers.insert(HeaderName::from_static("x-wasmlb-plugin"), v);
    }
    if let Ok(v) = HeaderValue::from_str(chosen.authority.as_str()) {
        headers.insert(HeaderName::from_static("x-wasmlb-backend"), v);
    }
}

/// A copy of a request head (method, URI, version, headers) for one attempt.
fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

fn http_client(upstream: &Upstream) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(upstream.connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .build(connector)
}

/// True if a connect or I/O timeout is anywhere in the error's source chain.
fn is_timeout(e: &hyper_util::client::legacy::Error) -> bool {
    crate::fd_limit::io_error_in(e, |io| io.kind() == std::io::ErrorKind::TimedOut).is_some()
}

/// A proxy-made error response: `status` with a one-line plain-text reason.
fn error_response(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let text = format!("{status}: {reason}\n");
    let mut response = Response::new(ProxyBody::full(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The body of a response sent downstream: a backend's streamed body (holding
/// its in-flight count until finished or dropped), or a small fixed body.
/// With `request_timeout_ms`, the body fails (the response is cut) at the
/// request's deadline. A backend body also fails when the backend sends
/// nothing for `response_body_timeout_ms` while the proxy waits on it (a slow
/// client reading is not the backend's inactivity: no read is pending then).
#[derive(Debug)]
pub struct ProxyBody {
    kind: BodyKind,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _request: Option<RequestGuard>,
}

/// The request's deadline passed while the response body was streaming.
#[derive(Debug, thiserror::Error)]
#[error("request_timeout_ms reached while sending the response body")]
pub struct BodyTimeout;

/// The backend sent no part of the response body for
/// `response_body_timeout_ms` (NGINX `proxy_read_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing for response_body_timeout_ms")]
pub struct BodyIdleTimeout;

#[derive(Debug)]
enum BodyKind {
    Upstream {
        body: Incoming,
        _in_flight: InFlight,
        idle: IdleTimer,
    },
    Full(Option<Bytes>),
}

/// The inactivity timer of a backend body: armed only when a read would
/// block (most bodies finish without one, and pay no timer), re-armed after
/// each frame.
#[derive(Debug)]
struct IdleTimer {
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    progressed: bool,
}

impl IdleTimer {
    /// Poll the timer after a read returned `Pending`; ready when it expired.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let at = tokio::time::Instant::now() + self.limit;
        match &mut self.sleep {
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            Some(sleep) if self.progressed => sleep.as_mut().reset(at),
            Some(_) => {}
        }
        self.progressed = false;
        self.sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }
}

impl ProxyBody {
    fn upstream(body: Incoming, in_flight: InFlight, idle_limit: Duration) -> Self {
        Self {
            kind: BodyKind::Upstream {
                body,
                _in_flight: in_flight,
                idle: IdleTimer {
                    limit: idle_limit,
                    sleep: None,
                    progressed: false,
                },
            },
            deadline: None,
            _request: None,
        }
    }

    fn full(bytes: Bytes) -> Self {
        Self {
            kind: BodyKind::Full(Some(bytes)),
            deadline: None,
            _request: None,
        }
    }

    /// Keep the downstream connection's request guard until the body is
    /// finished (see [`crate::conn`]).
    pub fn with_request_guard(mut self, guard: RequestGuard) -> Self {
        self._request = Some(guard);
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match &mut this.kind {
            BodyKind::Upstream { body, idle, .. } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(f) => {
                    idle.progressed = true;
                    Poll::Ready(f.map(|r| r.map_err(Into::into)))
                }
                Poll::Pending if idle.poll_expired(cx) => {
                    return Poll::Ready(Some(Err(Box::new(BodyIdleTimeout))));
                }
                Poll::Pending => Poll::Pending,
            },
            BodyKind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        if frame.is_pending()
            && let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Upstream { body, .. } => body.is_end_stream(),
            BodyKind::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Upstream { body, .. } => body.size_hint(),
            BodyKind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            BodyKind::Full(None) => SizeHint::with_exact(0),
        }
    }
}
