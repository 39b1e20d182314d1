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
//! For a gRPC request (`content-type: application/grpc*`) they are
//! gRPC-shaped instead, as Envoy makes them: HTTP 200, trailers-only, with
//! `grpc-status` ([`grpc_status`]) and `grpc-message`.
//!
//! A failed attempt is retried on another backend (the plugin is asked
//! again; backends already tried are skipped) up to the upstream's `retries`,
//! within its retry budget, and only where [`crate::retry`] says it is safe.
//! Every attempt's outcome feeds outlier detection.

mod body;
mod forward;
mod mirror;
mod pool;
mod tcp;
mod tunnel;

pub use body::{BodyIdleTimeout, BodyTimeout, ProxyBody};
pub use tunnel::{H2Tunnel, Tunnel};

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::access_log::{AccessLog, Entry, Pending};
use crate::config::{Config, RequestLimits, RouteConfig};
use crate::conn::RequestGuard;
pub use crate::headers::is_grpc;
use crate::headers::{authority, host_without_port};
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::plugin::Runtime;

use crate::upstream::Upstream;

/// A map looked up on every request or connection (a listener's settings,
/// the pool's idle connections by backend), hashed with foldhash, seeded
/// per process, rather than SipHash: SipHash over a socket address cost
/// about 400 instructions per lookup, more than the rest of the lookup
/// (`bench/instructions.py`). Where keys come from clients (the pool's,
/// with `send_proxy_protocol`), the random seed keeps them from being
/// chosen to collide.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A set hashed as [`FastMap`] is.
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Errors building the proxy from a config.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// An upstream's plugin failed to load or initialize (the plugin error
    /// is the [`std::error::Error::source`]).
    #[error("{at}")]
    Plugin {
        /// The upstream.
        upstream: String,
        /// Where its plugin is set: `file:line: upstream.NAME.plugin`.
        at: String,
        /// What failed.
        source: crate::plugin::PluginError,
    },
    /// The plugin runtime could not start.
    #[error(transparent)]
    Runtime(crate::plugin::PluginError),
    /// A trace recorder's file cannot be opened.
    #[error("{at}: cannot open the trace file: {source}")]
    Record {
        /// Where it is set: `file:line: upstream.NAME.record.path`.
        at: String,
        /// The OS error.
        source: crate::record::RecordError,
    },
    /// The access log file cannot be opened.
    #[error("{at}")]
    AccessLog {
        /// Where it is set: `file:line: access_log.path`.
        at: String,
        /// Why it cannot be opened.
        source: crate::access_log::AccessLogError,
    },
}

/// What the proxy knows of a downstream connection.
#[derive(Debug)]
pub struct Downstream {
    /// The client's address (from the PROXY header, with
    /// `accept_proxy_protocol`).
    pub peer: SocketAddr,
    /// The address the client connected to (likewise).
    pub local: SocketAddr,
    /// The client's IP, formatted for `X-Forwarded-For` once.
    pub client_ip: crate::headers::ClientIp,
    /// The TLS session, if the listener terminates TLS.
    pub tls: Option<DownstreamTls>,
    /// A backend that switched protocols, for the connection to splice with
    /// once its 101 is written.
    tunnel: std::sync::Mutex<Option<Box<Tunnel>>>,
    /// The timer of the response-head deadline, kept between requests (see
    /// [`crate::conn::LazyTimer`]); empty while a request is using it.
    response_timer: std::sync::Mutex<Option<crate::conn::LazyTimer>>,
}

impl Downstream {
    /// A connection from `peer` to `local`, over TLS if `tls` is set.
    pub fn new(peer: SocketAddr, local: SocketAddr, tls: Option<DownstreamTls>) -> Self {
        Self {
            peer,
            local,
            client_ip: crate::headers::ClientIp::new(peer),
            tls,
            tunnel: std::sync::Mutex::new(None),
            response_timer: std::sync::Mutex::new(None),
        }
    }

    /// The connection's addresses, as a PROXY header to a backend names them.
    pub fn addresses(&self) -> crate::proxy_protocol::Addresses {
        crate::proxy_protocol::Addresses {
            source: self.peer,
            destination: self.local,
        }
    }

    /// The tunnel a `101 Switching Protocols` response left, if any: once
    /// hyper has written the 101 and handed the connection back, the
    /// connection's task runs it ([`Tunnel::run`]).
    pub fn take_tunnel(&self) -> Option<Box<Tunnel>> {
        self.tunnel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The connection's response timer, armed for `at_ms` or earlier; a
    /// new one if another request (an HTTP/2 stream) is using it. Give it
    /// back with [`Downstream::keep_response_timer`].
    fn take_response_timer(&self, at_ms: u64) -> crate::conn::LazyTimer {
        self.response_timer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| crate::conn::LazyTimer::new(at_ms))
    }

    /// Keep `timer` for the connection's next request.
    fn keep_response_timer(&self, timer: crate::conn::LazyTimer) {
        *self
            .response_timer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(timer);
    }

    fn leave_tunnel(&self, tunnel: Tunnel) {
        *self
            .tunnel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(tunnel));
    }
}

/// A downstream TLS session.
#[derive(Debug, Clone, Default)]
pub struct DownstreamTls {
    /// The server name the client asked for (SNI), if it sent one.
    pub sni: Option<Arc<str>>,
    /// The protocol ALPN chose (`h2`, `http/1.1`), if any.
    pub alpn: Option<Vec<u8>>,
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
    sni: Option<String>,
    upstream: usize,
}

/// The routing table, the upstreams and their connection pools: everything a
/// request needs, built from one config. Immutable; a reload builds a new one
/// and swaps it in whole.
pub struct Proxy {
    /// Ordered by name; routes index into it.
    upstreams: Vec<UpstreamPool>,
    routes: Vec<Route>,
    listener_defaults: FastMap<ListenerKey, usize>,
    listener_tls: FastMap<ListenerKey, tokio_rustls::TlsAcceptor>,
    /// TCP-mode listeners, with their `tls_passthrough`.
    listener_tcp: FastMap<ListenerKey, bool>,
    /// Listeners with `accept_proxy_protocol`.
    listener_accept_proxy: FastSet<ListenerKey>,
    metrics: Arc<Metrics>,
    downstream_timeouts: (Duration, Duration),
    limits: RequestLimits,
    access_log: Option<Arc<AccessLog>>,
}

/// An upstream and the connection pool its requests go through.
struct UpstreamPool {
    upstream: Arc<Upstream>,
    pool: Arc<pool::ConnPool>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.upstreams().collect::<Vec<_>>())
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
        let mut upstreams: Vec<UpstreamPool> = Vec::new();
        for (name, cfg) in &config.upstreams {
            let old = previous.and_then(|p| p.upstreams.iter().find(|u| u.upstream.name() == name));
            let counters = old.map(|o| o.upstream.counters()).unwrap_or_default();
            let failed = |source| ProxyError::Plugin {
                upstream: name.clone(),
                at: config.locate(&format!("upstream.{name}"), "plugin"),
                source,
            };
            let plugin = runtime.load(&cfg.plugin).map_err(failed)?;
            let mut upstream =
                Upstream::build(name, cfg, plugin, &counters, &metrics).map_err(failed)?;
            if let Some(record) = &cfg.record {
                let recorder = crate::record::Recorder::start(record, name).map_err(|source| {
                    ProxyError::Record {
                        at: config.locate(&format!("upstream.{name}.record"), "path"),
                        source,
                    }
                })?;
                upstream.set_recorder(recorder);
            }
            if let Some(shadow) = &cfg.shadow {
                let failed = |source| ProxyError::Plugin {
                    upstream: name.clone(),
                    at: config.locate(&format!("upstream.{name}"), "shadow_plugin"),
                    source,
                };
                let candidate = runtime.load(&shadow.plugin).map_err(failed)?;
                upstream
                    .start_shadow(
                        candidate,
                        shadow.plugin_config.to_string(),
                        shadow.sample_percent,
                        metrics.shadow(name),
                    )
                    .map_err(failed)?;
            }
            let settings = pool::PoolSettings::new(cfg);
            let pool = match old {
                Some(o) if o.pool.fits(&upstream.connector, &settings) => o.pool.clone(),
                _ => pool::ConnPool::new(upstream.connector.clone(), settings),
            };
            upstreams.push(UpstreamPool {
                upstream: Arc::new(upstream),
                pool,
            });
        }
        let index = |name: &str| {
            upstreams
                .iter()
                .position(|u| u.upstream.name() == name)
                .unwrap_or(0)
        };
        let routes = config
            .routes
            .iter()
            .map(
                |RouteConfig {
                     host,
                     path_prefix,
                     sni,
                     upstream,
                 }| Route {
                    host: host.clone(),
                    path_prefix: path_prefix.clone(),
                    sni: sni.clone(),
                    upstream: index(upstream),
                },
            )
            .collect();
        let listener_defaults = ListenerKey::all(config)
            .into_iter()
            .zip(&config.listeners)
            .map(|(key, l)| (key, index(&l.upstream)))
            .collect();
        let listener_tcp = ListenerKey::all(config)
            .into_iter()
            .zip(&config.listeners)
            .filter(|(_, l)| l.mode == crate::config::ListenerMode::Tcp)
            .map(|(key, l)| (key, l.tls_passthrough))
            .collect();
        let listener_accept_proxy = ListenerKey::all(config)
            .into_iter()
            .zip(&config.listeners)
            .filter(|(_, l)| l.accept_proxy_protocol)
            .map(|(key, _)| key)
            .collect();
        let listener_tls = ListenerKey::all(config)
            .into_iter()
            .zip(&config.listeners)
            .filter_map(|(key, l)| {
                let tls = l.tls.as_ref()?;
                Some((
                    key,
                    tokio_rustls::TlsAcceptor::from(tls.server_config.clone()),
                ))
            })
            .collect();
        let access_log = config
            .access_log
            .as_ref()
            .map(|c| AccessLog::start(c, metrics.resources().access_log_dropped.clone()))
            .transpose()
            .map_err(|source| ProxyError::AccessLog {
                at: config.locate("access_log", "path"),
                source,
            })?;
        Ok(Self {
            upstreams,
            routes,
            listener_defaults,
            listener_tls,
            listener_tcp,
            listener_accept_proxy,
            metrics,
            downstream_timeouts: (
                Duration::from_millis(config.server.header_read_timeout_ms),
                Duration::from_millis(config.server.idle_timeout_ms),
            ),
            limits: config.server.limits,
            access_log,
        })
    }

    /// The access log, if configured (reopen it for log rotation).
    pub fn access_log(&self) -> Option<&Arc<AccessLog>> {
        self.access_log.as_ref()
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
        self.upstreams().find(|u| u.name() == name)
    }

    /// Every upstream, ordered by name.
    pub fn upstreams(&self) -> impl ExactSizeIterator<Item = &Arc<Upstream>> + '_ {
        self.upstreams.iter().map(|u| &u.upstream)
    }

    /// Index of the upstream serving a request on `listener`: the first route
    /// whose host and path prefix both match, else the listener's default.
    fn route(&self, listener: &ListenerKey, parts: &http::request::Parts) -> Option<usize> {
        // The host is looked up (a header lookup and a search for the
        // port) only for a route that names one.
        let mut host = None;
        let path = parts.uri.path();
        self.routes
            .iter()
            .find(|r| {
                r.sni.is_none()
                    && r.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
                    && r.host.as_deref().is_none_or(|h| {
                        h.eq_ignore_ascii_case(
                            host.get_or_insert_with(|| host_without_port(authority(parts))),
                        )
                    })
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

    /// True if `listener`'s connections open with a PROXY protocol header
    /// (`accept_proxy_protocol`).
    pub fn accepts_proxy_protocol(&self, listener: &ListenerKey) -> bool {
        self.listener_accept_proxy.contains(listener)
    }

    /// `Some(tls_passthrough)` if `listener` is in TCP mode.
    pub fn tcp_mode(&self, listener: &ListenerKey) -> Option<bool> {
        self.listener_tcp.get(listener).copied()
    }

    /// The TLS acceptor of `listener` (certificates as of this config), if
    /// it terminates TLS.
    pub fn tls_acceptor(&self, listener: &ListenerKey) -> Option<tokio_rustls::TlsAcceptor> {
        self.listener_tls.get(listener).cloned()
    }

    /// The downstream head-read and idle keep-alive timeouts (see [`crate::conn`]).
    pub fn downstream_timeouts(&self) -> (Duration, Duration) {
        self.downstream_timeouts
    }

    /// Serve one downstream request that arrived on `listener` over the
    /// `downstream` connection; the response body holds the connection's
    /// request `guard` until it is finished (an HTTP/2 extended CONNECT's
    /// tunnel holds it instead, for its life).
    /// Never fails: a request breaking [`crate::request_rules`] gets its 4xx,
    /// other errors become 400/502/503/504 responses (see `forward::Failure`).
    #[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
    pub fn handle(
        self: Arc<Self>,
        listener: ListenerKey,
        downstream: Arc<Downstream>,
        request: Request<Incoming>,
        guard: RequestGuard,
    ) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send {
        async move {
            let grpc = is_grpc(request.headers());
            let mut served = Served {
                entry: self.access_log.as_ref().map(|_| {
                    Box::new(Entry::new(
                        downstream.peer,
                        request.method().clone(),
                        request
                            .uri()
                            .path_and_query()
                            .map_or("/", |p| p.as_str())
                            .to_string(),
                        request.version(),
                    ))
                }),
                upstream: None,
                attempts: Attempts::default(),
            };
            if served.entry.is_some() {
                served.attempts.bytes_in = Some(Arc::default());
            }
            // One future for the whole request (no inner `async` layer to
            // move the request into and the response out of).
            let mut response = 'serve: {
                let client = downstream.peer;
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
                    break 'serve response;
                }
                let Some(UpstreamPool { upstream, pool }) = self
                    .route(&listener, &parts)
                    .and_then(|i| self.upstreams.get(i))
                else {
                    let response = server_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no upstream for this listener",
                        "no route matched and the listener has no upstream".into(),
                    );
                    log_proxy_error(&response, "none", client, &parts.method, parts.uri.path());
                    break 'serve response;
                };
                if served.entry.is_some() {
                    served.upstream = Some(upstream.shared_name().clone());
                }
                let deadline = upstream
                    .request_timeout
                    .map(|t| tokio::time::Instant::now() + t);
                // For the error log. The path is copied, not cloned: hyper
                // parses the URI as a slice of the connection's read buffer,
                // and a clone would keep that 8 KiB buffer alive until the
                // response (as the retry snapshot's copy avoids too).
                let (method, path) = (parts.method.clone(), Box::<str>::from(parts.uri.path()));
                // Boxed: the request path's state (about 3 KB) is then written
                // once, into its own allocation, instead of being copied into each
                // enclosing future (the timeout, this one, the service's box)
                // as each is created: that copying cost about 10 % of the CPU per
                // request (`bench/profile.py`, memmove).
                let forward = Box::pin(self.forward(
                    upstream,
                    pool,
                    &downstream,
                    parts,
                    body,
                    &mut served.attempts,
                ));
                let mut response = match deadline {
                    None => forward.await,
                    Some(at) => match tokio::time::timeout_at(at, forward).await {
                        Ok(response) => response,
                        Err(_) => {
                            self.metrics.unrouted(upstream.name(), 504);
                            let reason = format!(
                                "no response within request_timeout_ms = {}",
                                upstream.request_timeout.map_or(0, |t| t.as_millis())
                            );
                            server_error(StatusCode::GATEWAY_TIMEOUT, &reason, reason.clone())
                        }
                    },
                };
                log_proxy_error(&response, upstream.name(), client, &method, &path);
                if let Some(at) = deadline {
                    response
                        .body_mut()
                        .set_deadline(Box::pin(tokio::time::sleep_until(at)));
                }
                upstream
                    .metrics()
                    .request_duration
                    .observe(started.elapsed().as_secs_f64());
                response
            };
            if let Some(trace) = served.attempts.trace.take() {
                trace.finish(response.status().as_u16(), served.attempts.backend);
            }
            // Taken before gRPC shaping, which makes a new response.
            let error = served.entry.as_ref().and_then(|_| {
                let made = response.extensions().get::<ProxyMade>()?;
                Some(made.detail.clone())
            });
            if grpc {
                response = grpc_shaped(response);
            }
            if let (Some(mut entry), Some(log)) = (served.entry, self.access_log.as_ref()) {
                entry.status = response.status().as_u16();
                entry.upstream = served.upstream;
                entry.backend = served.attempts.backend;
                entry.attempts = served.attempts.count;
                entry.decision_us =
                    u64::try_from(served.attempts.decision.as_micros()).unwrap_or(u64::MAX);
                entry.fallback = served.attempts.fallback;
                entry.error = error;
                response.body_mut().set_access(Pending::new(
                    entry,
                    log.clone(),
                    served.attempts.bytes_in,
                ));
            }
            if let Some(tunnel) = response.extensions_mut().remove::<H2Tunnel>() {
                // An HTTP/2 extended CONNECT's tunnel: hyper upgrades the
                // stream once this 200 is sent (its body is never sent).
                tokio::spawn(tunnel.run(guard));
            } else {
                response.body_mut().hold_request_guard(guard);
            }
            Ok(response)
        }
    }
}

/// The gRPC status code for an HTTP status the proxy produced: 14
/// UNAVAILABLE for 502, 503 and 429; 4 DEADLINE_EXCEEDED for 504; 8
/// RESOURCE_EXHAUSTED for 413 and 431; 13 INTERNAL otherwise (gRPC's "HTTP
/// to gRPC status code mapping", with 504 as DEADLINE_EXCEEDED).
pub fn grpc_status(status: StatusCode) -> u8 {
    match status.as_u16() {
        502 | 503 | 429 => 14,
        504 => 4,
        413 | 431 => 8,
        _ => 13,
    }
}

/// A proxy-made error as a gRPC trailers-only response (HTTP 200,
/// `grpc-status`, `grpc-message` percent-encoded); a backend's response is
/// passed as it is.
fn grpc_shaped(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    if !response.body().is_proxy_made() || response.status().is_success() {
        return response;
    }
    let code = grpc_status(response.status());
    let reason = response.body_mut().take_text().unwrap_or_default();
    let message: String = reason
        .trim_end()
        .bytes()
        .flat_map(|b| {
            // Percent-encode outside printable ASCII and '%' (gRPC spec).
            if (0x20..0x7f).contains(&b) && b != b'%' {
                vec![b as char]
            } else {
                format!("%{b:02X}").chars().collect()
            }
        })
        .collect();
    let mut shaped = Response::new(ProxyBody::full(Bytes::new()));
    let headers = shaped.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if let Ok(v) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", v);
    }
    if let Some(close) = response.headers().get(header::CONNECTION) {
        headers.insert(header::CONNECTION, close.clone());
    }
    shaped
}

/// `e` and its sources, joined by `: ` (hyper's errors say little on their
/// own).
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

/// What serving one request did, for its access log entry.
#[derive(Debug, Default)]
struct Served {
    /// The entry, when the access log is on.
    entry: Option<Box<Entry>>,
    /// The upstream routed to.
    upstream: Option<Arc<str>>,
    /// What forwarding did.
    attempts: Attempts,
}

/// What forwarding a request did: filled by `Proxy::forward`.
#[derive(Debug, Default)]
pub(super) struct Attempts {
    /// The backend of the last attempt.
    pub(super) backend: Option<SocketAddr>,
    /// Attempts made on backends.
    pub(super) count: u32,
    /// Time spent in `Upstream::select` (plugin calls, host side).
    pub(super) decision: Duration,
    /// The fallback strategy chose at least once.
    pub(super) fallback: bool,
    /// Request body bytes read from the client; `Some` only while the
    /// access log is on (which also turns on the decision timing).
    pub(super) bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The trace record of a sampled request, finished with its response.
    pub(super) trace: Option<Box<crate::record::TraceStart>>,
}

/// Marks a response the proxy made itself (no backend answered it) with
/// the reason for the operator: the access log's `error`, and with `warn`
/// a `warn` line from [`log_proxy_error`].
#[derive(Debug, Clone)]
struct ProxyMade {
    /// What went wrong, with detail the client may not be told (the
    /// backend's address, the error chain).
    detail: String,
    /// Log it at `warn` (a 5xx whose cause has no line of its own).
    warn: bool,
}

/// A proxy-made 5xx logged at `warn`: [`error_response`] with `detail` for
/// the operator.
fn server_error(status: StatusCode, reason: &str, detail: String) -> Response<ProxyBody> {
    let mut response = error_response(status, reason);
    response
        .extensions_mut()
        .insert(ProxyMade { detail, warn: true });
    response
}

/// One `warn` line for a 5xx the proxy made itself: status, reason,
/// upstream, client, method and path. At most
/// [`crate::log_limit::LINES_PER_WINDOW`] per second in all (a dead backend
/// under load cannot flood the log; the next line says how many were
/// suppressed). Client faults (4xx) are not logged here.
fn log_proxy_error(
    response: &Response<ProxyBody>,
    upstream: &str,
    client: std::net::SocketAddr,
    method: &http::Method,
    path: &str,
) {
    static LIMIT: LogLimiter = LogLimiter::new();
    let status = response.status();
    let Some(error) = response.extensions().get::<ProxyMade>() else {
        return;
    };
    if !error.warn || !status.is_server_error() {
        return;
    }
    if let Some(suppressed) = LIMIT.admit() {
        tracing::warn!(
            status = status.as_u16(),
            upstream,
            %client,
            %method,
            path,
            suppressed,
            "proxy answered {status}: {}",
            error.detail
        );
    }
}

/// A proxy-made error response: `status` with a one-line plain-text reason
/// (also its [`ProxyMade`] detail, not logged at `warn`).
fn error_response(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let text = format!("{status}: {reason}\n");
    let mut response = Response::new(ProxyBody::full(Bytes::from(text)));
    *response.status_mut() = status;
    response.extensions_mut().insert(ProxyMade {
        detail: reason.to_string(),
        warn: false,
    });
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_are_told_by_content_type() {
        let mut h = http::HeaderMap::new();
        assert!(!is_grpc(&h));
        for (v, want) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC;charset=utf-8", true),
            ("application/grpc-web", true),
            ("application/json", false),
            ("application/gr", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            assert_eq!(is_grpc(&h), want, "{v}");
        }
    }

    #[test]
    fn proxy_errors_map_to_grpc_codes_and_backend_answers_pass() {
        assert_eq!(grpc_status(StatusCode::BAD_GATEWAY), 14);
        assert_eq!(grpc_status(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(grpc_status(StatusCode::GATEWAY_TIMEOUT), 4);
        assert_eq!(grpc_status(StatusCode::BAD_REQUEST), 13);
        let shaped = grpc_shaped(error_response(StatusCode::GATEWAY_TIMEOUT, "too slow 100%"));
        assert_eq!(shaped.status(), StatusCode::OK);
        assert_eq!(shaped.headers()["grpc-status"], "4");
        assert_eq!(shaped.headers()["content-type"], "application/grpc");
        assert_eq!(
            shaped.headers()["grpc-message"],
            "504 Gateway Timeout: too slow 100%25"
        );
        let ok = Response::new(ProxyBody::full(Bytes::from_static(b"x")));
        assert!(grpc_shaped(ok).headers().get("grpc-status").is_none());
    }
}
