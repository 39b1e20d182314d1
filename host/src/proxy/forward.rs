//! The request path of one routed request, in phases: select a backend
//! (the plugin), [`Proxy::attempt`] it (prepare the head, send, classify the
//! outcome), and on a failure ask the upstream's
//! [`crate::retry::RetryPolicy`] whether to go again on another backend.
//! Every attempt's outcome feeds outlier detection.

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::ProxyBody;
use super::pool::{ConnPool, SendError};
use super::{Attempts, Downstream, Proxy, error_chain, error_response, server_error};
use crate::headers::{prepare_request, strip_hop_by_hop};
use crate::log_limit::LogLimiter;
use crate::metrics::LocalOp;
use crate::plugin::{Plugin, RequestView};
use crate::retry::ReplayBody;
use crate::upstream::{InFlight, Selection, Target, Upstream};

impl Proxy {
    /// Ask the plugin, attempt, and retry a failed attempt on another backend
    /// while the upstream's [`crate::retry::RetryPolicy`] allows. A client
    /// fault is never retried; a failure the proxy caused itself (out of
    /// local resources) neither.
    #[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
    pub(super) fn forward(
        &self,
        upstream: &Arc<Upstream>,
        pool: &Arc<ConnPool>,
        downstream: &Downstream,
        mut parts: http::request::Parts,
        body: Incoming,
        attempts: &mut Attempts,
    ) -> impl std::future::Future<Output = Response<ProxyBody>> + Send {
        async move {
            // Only a recorder needs the arrival time.
            let arrived = upstream.records().then(std::time::Instant::now);
            let client = downstream.peer;
            let https = downstream.tls.is_some();
            // An HTTP/1.1 upgrade (WebSocket): `Connection: upgrade` and
            // `Upgrade` are forwarded, for such requests only. An HTTP/2
            // extended CONNECT (RFC 8441) goes to the backend as one, and its
            // client side is upgraded once the 200 is sent.
            let (upgrade, client_upgrade) =
                match crate::headers::extended_connect_as_upgrade(&mut parts) {
                    Ok(Some(protocols)) => (
                        Some(protocols),
                        parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
                    ),
                    Ok(None) => (crate::headers::upgrade_protocols(&parts), None),
                    Err(reason) => {
                        self.metrics.unrouted(upstream.name(), 400);
                        return error_response(StatusCode::BAD_REQUEST, reason);
                    }
                };
            let policy = &upstream.retry;
            let mut retry = policy.begin(&parts.method);
            let body = ReplayBody::new(body, policy.buffer_bytes);
            if let Some(received) = attempts.bytes_in.clone() {
                body.count_received(received);
            }
            // Boxed: it goes into the plugin's store and back on every call.
            let mut view = Box::new(RequestView {
                parts,
                client,
                https,
                server_name: downstream.tls.as_ref().and_then(|t| t.sni.clone()),
                tcp: false,
            });
            let mut tried: Vec<usize> = Vec::new();
            // What a retry sends again: taken before the first attempt, which
            // moves the head itself to the backend (see [`HeadSnapshot`]).
            let mut snapshot: Option<HeadSnapshot> = None;
            // Boxed: kept across awaits only after a failed attempt.
            let mut last_failure: Option<Box<Response<ProxyBody>>> = None;
            loop {
                let asked = attempts.bytes_in.is_some().then(std::time::Instant::now);
                let (selection, v, trace) = upstream.select_traced(view, &tried, arrived);
                if trace.is_some() {
                    attempts.trace = trace;
                }
                if let Some(at) = asked {
                    attempts.decision += at.elapsed();
                }
                view = v;
                let (chosen, plugin, response_headers, edits, mirror_target) = match selection {
                    Selection::Plugin {
                        chosen,
                        plugin,
                        response_headers,
                        edits,
                        mirror,
                    } => (chosen, plugin, response_headers, edits, mirror),
                    Selection::Fallback { chosen } => {
                        attempts.fallback = true;
                        (chosen, None, Vec::new(), None, None)
                    }
                    Selection::Respond { reply } => {
                        self.metrics
                            .unrouted(upstream.name(), reply.status.as_u16());
                        return reply_response(*reply);
                    }
                    Selection::Unavailable { .. } | Selection::Refused => {
                        if let Some(failure) = last_failure {
                            // Every backend was tried: answer with the last failure.
                            return *failure;
                        }
                        let reason = if matches!(selection, Selection::Refused) {
                            "the plugin failed (on_plugin_error = \"fail\")"
                        } else {
                            "no backend available"
                        };
                        self.metrics.unrouted(upstream.name(), 503);
                        return server_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            reason,
                            reason.into(),
                        );
                    }
                };
                attempts.backend = Some(chosen.address);
                attempts.count += 1;
                // The head goes to the backend as it is; a retry makes it
                // again from the snapshot.
                if policy.enabled() && snapshot.is_none() {
                    snapshot = Some(HeadSnapshot::of(&view.parts));
                }
                let mut head = std::mem::replace(&mut view.parts, Request::new(()).into_parts().0);
                // A 0.2 plugin's request changes, and its mirror (never of an
                // upgrade: a tunnel cannot be copied).
                let mirror = edits.and_then(|edits| {
                    edits.apply(&mut head);
                    edits.mirror.filter(|_| upgrade.is_none())?;
                    Some((mirror_target, copy_head(&head)))
                });
                let failure = match self
                    .attempt(
                        upstream,
                        pool,
                        downstream,
                        head,
                        (&body, upgrade.as_ref(), client_upgrade.as_ref()),
                        &chosen,
                    )
                    .await
                {
                    Ok(mut response) => {
                        if let Some((target, head)) = mirror {
                            super::mirror::mirror(upstream, pool, downstream, head, &body, target);
                        }
                        let headers = response.headers_mut();
                        for (name, value) in response_headers {
                            headers.append(name, value);
                        }
                        if upstream.debug_headers() {
                            debug_headers(&mut response, plugin.as_deref(), &chosen);
                        }
                        return response;
                    }
                    Err(failure) => failure,
                };
                let address = chosen.address;
                tracing::debug!(upstream = upstream.name(), %address, "attempt failed: {failure}");
                let status = failure.status();
                match &failure {
                    Failure::Invalid { reason } => {
                        self.metrics.unrouted(upstream.name(), 400);
                        return error_response(status, reason);
                    }
                    Failure::Client => {
                        self.metrics.unrouted(upstream.name(), 400);
                        let mut response = error_response(status, failure.reason());
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        return response;
                    }
                    Failure::UpgradeOverH2 => {
                        self.metrics.unrouted(upstream.name(), 502);
                        return server_error(status, failure.reason(), failure.to_string());
                    }
                    Failure::Local { detail } => {
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
                        return error_response(status, failure.reason());
                    }
                    _ => {}
                }
                if failure.nothing_sent() {
                    upstream.report_connect_failure(&chosen);
                } else {
                    upstream.report(&chosen, false);
                }
                chosen.live.metrics.response(status.as_u16());
                tried.push(chosen.id);
                let mut response = server_error(
                    status,
                    failure.reason(),
                    format!("{failure} (backend {address}, attempt {})", tried.len()),
                );
                if upstream.debug_headers() {
                    debug_headers(&mut response, plugin.as_deref(), &chosen);
                    if let Ok(v) = HeaderValue::from_str(&failure.to_string()) {
                        response
                            .headers_mut()
                            .insert(HeaderName::from_static("x-wasmlb-error"), v);
                    }
                }
                if !policy.allow(&mut retry, failure.nothing_sent(), body.replayable()) {
                    return response;
                }
                if let Some(snapshot) = &snapshot {
                    // For the plugin's next decision and the next attempt.
                    match snapshot.head() {
                        Some(head) => view.parts = head,
                        None => return response,
                    }
                }
                last_failure = Some(Box::new(response));
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

    /// One attempt on `chosen`: rewrite `head` for the backend, send it with
    /// an attempt of `body`, and wait up to `response_timeout_ms` for the
    /// response head. On a response, the backend's RTT, connect success and
    /// status are recorded (a 5xx counts for outlier detection) and the
    /// response is returned with its hop-by-hop headers removed and its body
    /// streaming. Otherwise the [`Failure`], classified by the side at fault;
    /// recording a failure against the backend is left to the caller.
    ///
    /// With `upgrade` (the protocols of an upgrade request), `Connection:
    /// upgrade` and `Upgrade` go to the backend; if it answers 101, the
    /// response keeps them and the [`super::Tunnel`] is left on `downstream`.
    /// With `client_upgrade` too (an HTTP/2 extended CONNECT), the 101
    /// becomes a 200 ([`crate::headers::tunnel_established`]) carrying an
    /// [`super::H2Tunnel`] in its extensions for the connection to run, and
    /// any other 2xx is a 502 (to HTTP/2, a 2xx means the tunnel is open).
    #[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
    fn attempt(
        &self,
        upstream: &Upstream,
        pool: &Arc<ConnPool>,
        downstream: &Downstream,
        mut head: http::request::Parts,
        (body, upgrade, client_upgrade): (
            &ReplayBody,
            Option<&HeaderValue>,
            Option<&hyper::upgrade::OnUpgrade>,
        ),
        chosen: &Target,
    ) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Failure>> + Send {
        async move {
            let https = downstream.tls.is_some();
            prepare_request(&mut head, &downstream.client_ip, &chosen.authority, https)
                .map_err(|reason| Failure::Invalid { reason })?;
            if let Some(protocols) = upgrade {
                head.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                head.headers.insert(header::UPGRADE, protocols.clone());
            }
            let guard = InFlight::begin(chosen, upstream.metrics().in_flight.clone());
            let request = Request::from_parts(head, body.attempt());
            let sent_ns = crate::plugin::monotonic_ns();
            // The connection's timer, kept between its requests (dropped
            // with this future if the client leaves first).
            let at_ms = crate::conn::now_ms().saturating_add(
                u64::try_from(upstream.response_timeout.as_millis()).unwrap_or(u64::MAX),
            );
            let mut timer = downstream.take_response_timer(at_ms);
            let addresses = downstream.addresses();
            let send = std::pin::pin!(pool.send(chosen.address, &addresses, request));
            let result = timer.within(at_ms, send).await;
            downstream.keep_response_timer(timer);
            let failure = match result {
                Ok(Ok((mut response, lease))) => {
                    let now_ns = crate::plugin::monotonic_ns();
                    chosen
                        .live
                        .rtt
                        .observe(now_ns.saturating_sub(sent_ns), now_ns);
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        if upgrade.is_none() {
                            // RFC 9110 §15.2.2: only in answer to an Upgrade.
                            drop(guard);
                            return Err(Failure::Broken {
                                detail:
                                    "101 Switching Protocols to a request that asked no upgrade"
                                        .into(),
                            });
                        }
                        let on_upgrade = hyper::upgrade::on(&mut response);
                        let (mut parts, _) = response.into_parts();
                        upstream.report_connected(chosen);
                        upstream.report(chosen, true);
                        chosen.live.metrics.response(101);
                        // The connection is the tunnel's now, never pooled.
                        drop(lease);
                        let tunnel =
                            super::Tunnel::new(on_upgrade, chosen.address, upstream, guard);
                        let empty = ProxyBody::full(bytes::Bytes::new());
                        if let Some(client) = client_upgrade {
                            let parts = crate::headers::tunnel_established(parts);
                            let mut response = Response::from_parts(parts, empty);
                            response
                                .extensions_mut()
                                .insert(super::H2Tunnel::new(client.clone(), tunnel));
                            return Ok(response);
                        }
                        let switched = parts.headers.get(header::UPGRADE).cloned();
                        strip_hop_by_hop(&mut parts.headers);
                        parts
                            .headers
                            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        if let Some(switched) = switched {
                            parts.headers.insert(header::UPGRADE, switched);
                        }
                        downstream.leave_tunnel(tunnel);
                        return Ok(Response::from_parts(parts, empty));
                    }
                    if client_upgrade.is_some() && response.status().is_success() {
                        drop(guard);
                        return Err(Failure::Broken {
                            detail: format!(
                                "{} to an upgrade request: the backend did not switch protocols",
                                response.status()
                            ),
                        });
                    }
                    let (mut parts, incoming) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    upstream.report_connected(chosen);
                    upstream.report(chosen, !parts.status.is_server_error());
                    chosen.live.metrics.response(parts.status.as_u16());
                    return Ok(Response::from_parts(
                        parts,
                        ProxyBody::upstream(incoming, guard, lease, upstream.response_body_timeout),
                    ));
                }
                // The client's body failed: whatever the backend did, it is
                // not its fault, and nothing may be retried.
                _ if body.client_failed() => Failure::Client,
                Ok(Err(e)) if crate::fd_limit::local_resource_error(&e).is_some() => {
                    Failure::Local {
                        detail: error_chain(&e),
                    }
                }
                Ok(Err(SendError::UpgradeOverH2)) => Failure::UpgradeOverH2,
                Ok(Err(SendError::Connect(e))) => Failure::Connect {
                    timed_out: e.kind() == std::io::ErrorKind::TimedOut,
                    detail: e.to_string(),
                },
                Ok(Err(e)) => Failure::Broken {
                    detail: error_chain(&e),
                },
                Err(_) => Failure::ResponseTimeout,
            };
            drop(guard);
            Err(failure)
        }
    }
}

/// Why an attempt failed, classified by the side at fault.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The request head cannot be turned into a backend request (an invalid
    /// authority or `X-Forwarded-For`): 400, nothing sent.
    #[error("invalid request: {reason}")]
    Invalid { reason: &'static str },
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
    /// An upgrade request met an HTTP/2 backend connection (`protocol =
    /// "auto"` chose h2): 502, nothing sent, not blamed, not retried.
    #[error("an upgrade needs HTTP/1.1 to the backend; ALPN chose HTTP/2")]
    UpgradeOverH2,
}

impl Failure {
    fn status(&self) -> StatusCode {
        match self {
            Failure::Client | Failure::Invalid { .. } => StatusCode::BAD_REQUEST,
            Failure::Connect {
                timed_out: true, ..
            }
            | Failure::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Connect { .. } | Failure::Broken { .. } | Failure::UpgradeOverH2 => {
                StatusCode::BAD_GATEWAY
            }
            Failure::Local { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the client is told: generic, no backend address (the detail is
    /// logged, and shown in `x-wasmlb-error` with `debug_headers`).
    fn reason(&self) -> &'static str {
        match self {
            Failure::Client => "the request body was incomplete or malformed",
            Failure::Invalid { reason } => reason,
            Failure::Connect {
                timed_out: true, ..
            } => "connecting to the backend timed out",
            Failure::Connect { .. } => "the backend could not be reached",
            Failure::Broken { .. } => "the backend closed the connection without a response",
            Failure::ResponseTimeout => "the backend did not answer in time",
            Failure::Local { .. } => "the proxy is out of resources, try again",
            Failure::UpgradeOverH2 => {
                "this upstream's backends speak HTTP/2, which has no upgrades"
            }
        }
    }

    fn nothing_sent(&self) -> bool {
        matches!(self, Failure::Connect { .. })
    }
}

/// The response for a plugin's own answer (the `respond` decision): its
/// status, headers and body, with `content-length` from the body. A 204 or
/// 304 carries no body (RFC 9110 §15.3.5, §15.4.5): one the plugin gave is
/// dropped. To a gRPC client, a reply that is not 2xx becomes a
/// trailers-only gRPC error like the proxy's own (`grpc_shaped`).
fn reply_response(reply: crate::plugin::Reply) -> Response<ProxyBody> {
    let body = match reply.status {
        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED => bytes::Bytes::new(),
        _ => reply.body,
    };
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    for (name, value) in reply.headers {
        headers.append(name, value);
    }
    response
}

/// `x-wasmlb-plugin` and `x-wasmlb-backend` (see `debug_headers`).
fn debug_headers(response: &mut Response<ProxyBody>, plugin: Option<&Plugin>, chosen: &Target) {
    let plugin = plugin.map_or("(fallback)", |p| p.name());
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(plugin) {
        headers.insert(HeaderName::from_static("x-wasmlb-plugin"), v);
    }
    if let Ok(v) = HeaderValue::from_str(chosen.authority.as_str()) {
        headers.insert(HeaderName::from_static("x-wasmlb-backend"), v);
    }
}

/// A request head kept for a retry: the method, the version, and the URI's
/// parts and the header fields (in order, no extensions) copied into one
/// buffer. Taking it hashes no name and builds no header map; only a retry,
/// the rare case, builds the head again ([`HeadSnapshot::head`]). Copying the
/// head into a new map for every request instead cost about 880 instructions
/// per request (`bench/instructions.py`).
///
/// Copied, not cloned: hyper parses the URI and the header values as slices
/// of the client connection's read buffer, and the snapshot lives until the
/// backend's response head arrives. Clones kept that 8 KiB buffer alive for
/// every request in flight, while hyper read ahead into a new one: about 1.2
/// MiB more resident memory at 256 connections (`bench/run.py`).
struct HeadSnapshot {
    method: http::Method,
    version: http::Version,
    /// The scheme, the authority, the path and query, then each field's name
    /// and value, back to back.
    bytes: Vec<u8>,
    /// Where the scheme, the authority and the path and query end in `bytes`
    /// (an absent part is empty, and absent again in the copy).
    uri: [usize; 3],
    /// Per field: where its name and its value end in `bytes`, and whether
    /// the value is sensitive (not to be indexed by HPACK).
    fields: Vec<(usize, usize, bool)>,
}

impl HeadSnapshot {
    fn of(parts: &http::request::Parts) -> Self {
        let uri = &parts.uri;
        let scheme = uri.scheme_str().unwrap_or("");
        let authority = uri.authority().map_or("", |a| a.as_str());
        let path = uri.path_and_query().map_or("", |p| p.as_str());
        let len = scheme.len()
            + authority.len()
            + path.len()
            + parts
                .headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len())
                .sum::<usize>();
        let mut bytes = Vec::with_capacity(len);
        let mut end = |part: &[u8]| {
            bytes.extend_from_slice(part);
            bytes.len()
        };
        let uri = [
            end(scheme.as_bytes()),
            end(authority.as_bytes()),
            end(path.as_bytes()),
        ];
        let fields = parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    end(name.as_str().as_bytes()),
                    end(value.as_bytes()),
                    value.is_sensitive(),
                )
            })
            .collect();
        Self {
            method: parts.method.clone(),
            version: parts.version,
            bytes,
            uri,
            fields,
        }
    }

    /// The head again, with room for the headers [`prepare_request`] adds.
    /// `None` if a part no longer parses, which cannot happen: each was
    /// parsed from the same bytes before.
    fn head(&self) -> Option<http::request::Parts> {
        let text = |from: usize, to: usize| std::str::from_utf8(&self.bytes[from..to]).ok();
        let [scheme_end, authority_end, path_end] = self.uri;
        let mut uri = http::uri::Builder::new();
        if scheme_end > 0 {
            uri = uri.scheme(text(0, scheme_end)?);
        }
        if authority_end > scheme_end {
            uri = uri.authority(text(scheme_end, authority_end)?);
        }
        if path_end > authority_end || scheme_end > 0 {
            uri = uri.path_and_query(text(authority_end, path_end)?);
        }
        let uri = uri.build().ok()?;
        let mut head = new_head(
            (&self.method, &uri, self.version),
            std::iter::empty(),
            self.fields.len(),
        );
        let mut start = path_end;
        for &(name_end, value_end, sensitive) in &self.fields {
            let name = HeaderName::from_bytes(&self.bytes[start..name_end]).ok()?;
            let mut value = HeaderValue::from_bytes(&self.bytes[name_end..value_end]).ok()?;
            value.set_sensitive(sensitive);
            head.headers.append(name, value);
            start = value_end;
        }
        Some(head)
    }
}

/// A copy of a request head (method, URI, version, headers) for a mirror,
/// with room for the headers [`prepare_request`] adds: a cloned map's
/// entries are exactly full, so its first insert reallocated them (two
/// reallocations and about 1,500 instructions per request,
/// `bench/instructions.py`).
fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    new_head(
        (&parts.method, &parts.uri, parts.version),
        parts.headers.iter().map(|(n, v)| (n.clone(), v.clone())),
        parts.headers.len(),
    )
}

/// A request head of `method`, `uri` and `version` with `fields` (`len` of
/// them) appended in order, and room for [`crate::headers::ADDED_HEADERS`]
/// more; no extensions.
fn new_head(
    (method, uri, version): (&http::Method, &http::Uri, http::Version),
    fields: impl Iterator<Item = (HeaderName, HeaderValue)>,
    len: usize,
) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.version_mut() = version;
    let headers = request.headers_mut();
    headers.reserve(len + crate::headers::ADDED_HEADERS);
    for (name, value) in fields {
        headers.append(name, value);
    }
    request.into_parts().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_makes_the_head_again_as_it_was_without_extensions() {
        let mut request = Request::builder()
            .method("PUT")
            .uri("http://example.com/a/b?c=1")
            .version(http::Version::HTTP_10)
            .header("host", "example.com")
            .header("x-many", "1")
            .header("accept", "text/plain")
            .header("x-many", "2")
            .header("x-empty", "")
            .header("x-obs-text", HeaderValue::from_bytes(b"caf\xe9").unwrap())
            .body(())
            .unwrap();
        request.extensions_mut().insert(7u32);
        let mut secret = HeaderValue::from_static("Bearer t");
        secret.set_sensitive(true);
        request.headers_mut().insert(header::AUTHORIZATION, secret);
        let (parts, ()) = request.into_parts();
        let snapshot = HeadSnapshot::of(&parts);
        for _ in 0..2 {
            let head = snapshot.head().expect("the head again");
            assert_eq!(head.method, http::Method::PUT);
            assert_eq!(head.uri, parts.uri);
            assert_eq!(head.version, http::Version::HTTP_10);
            assert_eq!(head.headers, parts.headers);
            let many: Vec<_> = head.headers.get_all("x-many").iter().collect();
            assert_eq!(many, ["1", "2"]);
            assert!(head.headers[header::AUTHORIZATION].is_sensitive());
            assert!(!head.headers["x-many"].is_sensitive());
            assert!(head.extensions.get::<u32>().is_none());
            assert!(head.headers.capacity() >= parts.headers.len() + crate::headers::ADDED_HEADERS);
        }
    }

    #[test]
    fn a_snapshot_keeps_every_form_of_request_target() {
        // RFC 9112 section 3.2: origin-form, absolute-form, authority-form
        // (CONNECT) and asterisk-form (OPTIONS), with an extension method.
        for (method, target) in [
            ("GET", "/"),
            ("GET", "/p%20q/r?s=t&u"),
            ("GET", "http://example.com"),
            ("GET", "https://user@example.com:8443/x?y"),
            ("CONNECT", "example.com:443"),
            ("OPTIONS", "*"),
            ("PURGE", "/cache/item"),
        ] {
            let (parts, ()) = Request::builder()
                .method(method)
                .uri(target)
                .body(())
                .unwrap()
                .into_parts();
            let head = HeadSnapshot::of(&parts).head().expect(target);
            assert_eq!(head.method, parts.method, "{method} {target}");
            assert_eq!(head.uri, parts.uri, "{method} {target}");
            assert_eq!(head.uri.to_string(), parts.uri.to_string(), "{target}");
            assert!(head.headers.is_empty());
        }
    }

    #[test]
    fn a_snapshot_does_not_keep_the_read_buffer_alive() {
        // hyper parses the URI and the header values as slices of the
        // connection's read buffer: a snapshot must hold copies, not them.
        let buffer = bytes::Bytes::from(b"/path?q=1 value-1 value-2".to_vec());
        let mut request = Request::new(());
        *request.uri_mut() = http::Uri::from_maybe_shared(buffer.slice(0..9)).unwrap();
        for (name, range) in [("x-one", 10..17), ("x-two", 18..25)] {
            let value = HeaderValue::from_maybe_shared(buffer.slice(range)).unwrap();
            request.headers_mut().append(name, value);
        }
        let (parts, ()) = request.into_parts();
        assert!(!buffer.is_unique(), "the head shares the buffer");
        let snapshot = HeadSnapshot::of(&parts);
        drop(parts);
        assert!(buffer.is_unique(), "the snapshot shares the buffer");
        let head = snapshot.head().expect("the head again");
        assert_eq!(head.uri, "/path?q=1");
        assert_eq!(head.headers["x-one"], "value-1");
        assert_eq!(head.headers["x-two"], "value-2");
    }
}
