//! The admin API: JSON over HTTP/1.1 on `[admin] address` (Envoy's
//! conventional port is 9901).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /upstreams` | every upstream: backends (address, weight, state, in-flight, requests served) and plugin (name, digest, load time, status, failure counts) |
//! | `GET /upstreams/{name}` | one upstream, or 404 |
//! | `PUT /upstreams/{name}/plugin` | swap the plugin: body is a component (bytes starting with `\0asm`), or JSON `{"plugin": "<built-in or path>", "plugin_config": {...}}` (both keys optional; a missing `plugin` re-initializes the current one). 200 with the swap report; 404; 422 with `{"error": ...}` and the old plugin keeps serving |
//! | `PUT /upstreams/{name}/backends/{backend}/state` | set a backend's state (HAProxy `set server ... state`): body `ready`, `drain` or `maint`; `{backend}` is its address or id. 200 with the backend's snapshot (its `state` turns `drained` when nothing is in flight); 404; 422 for another body. Kept across reloads unless the config's `state` for the backend changes |
//! | `POST /upstreams/{name}/backends` | add a backend (HAProxy `add server`): JSON `{"address": "ip:port", "weight": 1, "labels": {}, "state": "ready"}` (all but `address` optional). 201 with its snapshot; 400 for a bad body; 404; 409 if the address is there already or a discovery source owns the upstream. Lasts until the next reload |
//! | `DELETE /upstreams/{name}/backends/{backend}` | remove a backend (HAProxy `del server`): it drains, then leaves when nothing is in flight. 200 `{"removed": true, ...}` if it left at once, 202 `{"removed": false, "in_flight": N}` while it drains; 404; 409 for a discovery-managed upstream |
//! | `POST /reload` | re-read the config file (as SIGHUP does). 200 with the reload report; 422 with `{"error": ...}` and the running config keeps serving |
//! | `GET /metrics` | Prometheus text format 0.0.4, or OpenMetrics 1.0 when `Accept` prefers it |
//! | `GET /` | the live dashboard ([`dashboard`]): HTML, with `/dashboard.js` and `/dashboard.css`; served without the token, and everything it shows or does goes through the API above |
//!
//! Security: the config refuses a non-loopback `address` without
//! `token_file`. With a token, every request needs `Authorization: Bearer
//! <token>` (else 401); the comparison takes the same time whatever the
//! value (both sides are hashed with SHA-256 first, so not even the length
//! leaks). Bodies over `max_body_bytes` get 413. A plugin path must be a
//! `.wasm` file inside `plugin_dirs` (default: the config file's directory),
//! after resolving `..` and links; errors never quote a file or a resolved
//! path. A connection must send its request head within the server's
//! `header_read_timeout_ms`, its body within as long again, and is closed
//! after `idle_timeout_ms` without a request; at most `max_connections` are
//! open (more wait in the kernel's backlog). A request other than `GET` or
//! `HEAD` that carries an `Origin` header must come from the admin address
//! itself (`Origin: http://<Host>`), else 403: a web page elsewhere cannot
//! make a browser drain a backend or reload the config (cross-site request
//! forgery), token or not.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::config::{AdminConfig, AdminState, PluginRef};
use crate::conn::TimedIo;
use crate::control::{Control, MembershipError, PluginSource, SwapError, error_chain};
use crate::metrics::{BackendState, Format, PluginState};

pub mod dashboard;

/// A running admin listener.
#[derive(Debug)]
pub struct AdminHandle {
    /// Where it listens.
    pub local: SocketAddr,
    /// The accept loop.
    pub task: JoinHandle<()>,
}

/// Bind the admin listener and serve it.
///
/// # Errors
/// The bind error.
pub async fn start(config: &AdminConfig, control: Control) -> std::io::Result<AdminHandle> {
    let listener = TcpListener::bind(config.address).await?;
    let local = listener.local_addr()?;
    let config = config.clone();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let task = tokio::spawn(async move {
        loop {
            // At the cap, stop accepting: the kernel's backlog holds the rest.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let (header_read, idle) = control.proxy().downstream_timeouts();
            let (stream, activity) = TimedIo::new(stream, header_read, idle);
            let (control, config) = (control.clone(), config.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let (control, config) = (control.clone(), config.clone());
                    let guard = activity.begin();
                    async move {
                        let response = handle(&control, &config, req, header_read).await;
                        drop(guard);
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(slot);
            });
        }
    });
    tracing::info!(%local, "admin API listening");
    Ok(AdminHandle { local, task })
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    // A final newline, so a shell prompt or the next output starts on a line
    // of its own (curl prints bodies as they are).
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

fn authorized(config: &AdminConfig, req: &Request<Incoming>) -> bool {
    let Some(token) = &config.token else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is compared
    // exactly, whitespace included.
    let given = given.as_bytes();
    let (scheme, credentials) = given.split_at(given.len().min(7));
    scheme.eq_ignore_ascii_case(b"bearer ") && token_matches(credentials, token.as_bytes())
}

/// Whether a request that may change something comes from a page of this
/// admin address: `GET` and `HEAD` always pass, as does a request without
/// `Origin` (curl, scripts); otherwise `Origin` must be `http://` plus the
/// request's `Host`, compared case-insensitively (RFC 6454 §4 serializes
/// the scheme and host in lowercase).
fn same_origin(req: &Request<Incoming>) -> bool {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return true;
    }
    let Some(origin) = req.headers().get(http::header::ORIGIN) else {
        return true;
    };
    let host = req.headers().get(http::header::HOST);
    match (origin.to_str(), host.map(|h| h.to_str())) {
        (Ok(origin), Some(Ok(host))) => origin
            .strip_prefix("http://")
            .is_some_and(|o| o.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// Whether `given` equals `token`, in time independent of both: the SHA-256
/// digests are compared without an early exit, so neither the position of
/// the first difference nor the token's length leaks.
fn token_matches(given: &[u8], token: &[u8]) -> bool {
    use sha2::Digest as _;
    let (a, b) = (sha2::Sha256::digest(given), sha2::Sha256::digest(token));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The request body, or 413 if it is larger than `max` bytes, or 408 if it
/// does not arrive within `timeout`.
async fn body(
    req: Request<Incoming>,
    max: u64,
    timeout: Duration,
) -> Result<Bytes, Response<Full<Bytes>>> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than max_body_bytes ({max})"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    match tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(_)) => Err(too_large()),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapRequest {
    plugin: Option<String>,
    plugin_config: Option<serde_json::Value>,
    sample_percent: Option<u32>,
}

/// What a swap request asks for: the plugin, its config, its sample share.
type SwapAsk = (PluginSource, Option<serde_json::Value>, Option<u32>);

/// Read a swap request's body: wasm component bytes, or JSON `{"plugin",
/// "plugin_config", "sample_percent"}` (all optional). The error is the
/// answer to send (413, 408, 400, 422).
async fn read_swap(
    control: &Control,
    config: &AdminConfig,
    req: Request<Incoming>,
    body_timeout: Duration,
) -> Result<SwapAsk, Box<Response<Full<Bytes>>>> {
    let bytes = body(req, config.max_body_bytes, body_timeout)
        .await
        .map_err(Box::new)?;
    if bytes.starts_with(b"\0asm") {
        return Ok((PluginSource::Bytes(bytes.to_vec()), None, None));
    }
    let r = serde_json::from_slice::<SwapRequest>(&bytes).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("body must be a wasm component or JSON {{\"plugin\", \"plugin_config\"}}: {e}"),
        ))
    })?;
    let source = match r.plugin {
        Some(p) => PluginRef::resolve_confined(&p, config_dir(control), &config.plugin_dirs)
            .map(PluginSource::Ref)
            .map_err(|e| Box::new(error(StatusCode::UNPROCESSABLE_ENTITY, e)))?,
        None => PluginSource::Current,
    };
    if r.plugin_config.as_ref().is_some_and(|c| !c.is_object()) {
        return Err(Box::new(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "plugin_config must be a JSON object",
        )));
    }
    Ok((source, r.plugin_config, r.sample_percent))
}

/// The answer to a swap: its report, 404 for an unknown upstream, 409 with
/// no shadow plugin, else 422 with the reason.
fn swap_response(result: Result<crate::server::SwapReport, SwapError>) -> Response<Full<Bytes>> {
    match result {
        Ok(report) => json(StatusCode::OK, &report),
        Err(SwapError::UnknownUpstream(n)) => {
            error(StatusCode::NOT_FOUND, format!("no upstream named {n:?}"))
        }
        Err(e @ SwapError::NoShadow(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, error_chain(&e)),
    }
}

async fn handle(
    control: &Control,
    config: &AdminConfig,
    req: Request<Incoming>,
    body_timeout: Duration,
) -> Response<Full<Bytes>> {
    if req.method() == Method::GET
        && let Some(page) = dashboard::asset(req.uri().path())
    {
        return page;
    }
    if !same_origin(&req) {
        return error(
            StatusCode::FORBIDDEN,
            "cross-origin admin request refused (Origin is not this admin address)",
        );
    }
    if !authorized(config, &req) {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut()
            .insert("www-authenticate", http::HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["upstreams"]) => json(StatusCode::OK, &control.snapshots()),
        (Method::GET, ["upstreams", name]) => match control.proxy().upstream(name) {
            Some(u) => json(StatusCode::OK, &u.snapshot()),
            None => error(StatusCode::NOT_FOUND, format!("no upstream named {name:?}")),
        },
        (Method::PUT, ["upstreams", name, "plugin"]) => {
            let name = name.to_string();
            let (source, plugin_config, sample_percent) =
                match read_swap(control, config, req, body_timeout).await {
                    Ok(r) => r,
                    Err(r) => return *r,
                };
            if sample_percent.is_some() {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "sample_percent applies to a shadow plugin (PUT /upstreams/{name}/shadow)",
                );
            }
            swap_response(control.swap_plugin(&name, source, plugin_config).await)
        }
        (Method::PUT, ["upstreams", name, "shadow"]) => {
            let name = name.to_string();
            let (source, plugin_config, sample_percent) =
                match read_swap(control, config, req, body_timeout).await {
                    Ok(r) => r,
                    Err(r) => return *r,
                };
            if sample_percent.is_some_and(|p| !(1..=100).contains(&p)) {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "sample_percent must be from 1 to 100",
                );
            }
            swap_response(
                control
                    .swap_shadow(&name, source, plugin_config, sample_percent)
                    .await,
            )
        }
        (Method::DELETE, ["upstreams", name, "shadow"]) => match control.stop_shadow(name) {
            Ok(stopped) => json(StatusCode::OK, &serde_json::json!({ "stopped": stopped })),
            Err(e) => swap_response(Err(e)),
        },
        (Method::POST, ["upstreams", name, "shadow", "promote"]) => {
            swap_response(control.promote_shadow(name).await)
        }
        (Method::PUT, ["upstreams", name, "backends", backend, "state"]) => {
            let Some(upstream) = control.proxy().upstream(name).cloned() else {
                return error(StatusCode::NOT_FOUND, format!("no upstream named {name:?}"));
            };
            let Some(address) = upstream.find_backend(backend).map(|b| b.address) else {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("upstream {name:?} has no backend {backend:?} (an address or id)"),
                );
            };
            let bytes = match body(req, config.max_body_bytes, body_timeout).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let state = match AdminState::parse(&String::from_utf8_lossy(&bytes)) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
            };
            match upstream.set_admin_state(address, state) {
                Some(snapshot) => json(StatusCode::OK, &snapshot),
                None => error(StatusCode::NOT_FOUND, "the backend left the upstream"),
            }
        }
        (Method::POST, ["upstreams", name, "backends"]) => {
            let name = name.to_string();
            let bytes = match body(req, config.max_body_bytes, body_timeout).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let backend = match std::str::from_utf8(&bytes)
                .map_err(|_| "body is not UTF-8".to_string())
                .and_then(crate::config::parse_backend)
            {
                Ok(b) => b,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "body must be JSON {{\"address\", \"weight\", \"labels\", \"state\"}}: {e}"
                        ),
                    );
                }
            };
            match control.add_backend(&name, backend).await {
                Ok(snapshot) => json(StatusCode::CREATED, &snapshot),
                Err(e) => membership_error(&e),
            }
        }
        (Method::DELETE, ["upstreams", name, "backends", backend]) => {
            match control.remove_backend(name, backend) {
                Ok(r) if r.removed => json(StatusCode::OK, &r),
                Ok(r) => json(StatusCode::ACCEPTED, &r),
                Err(e) => membership_error(&e),
            }
        }
        (Method::POST, ["reload"]) => match control.reload().await {
            Ok(report) => json(StatusCode::OK, &report),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, error_chain(&e)),
        },
        (Method::GET, ["metrics"]) => {
            let accept = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = Format::negotiate(accept);
            let mut r = Response::new(Full::new(Bytes::from(scrape(control, format))));
            r.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static(format.content_type()),
            );
            r
        }
        (
            _,
            ["upstreams"]
            | ["upstreams", _]
            | ["upstreams", _, "plugin"]
            | ["upstreams", _, "backends"]
            | ["upstreams", _, "backends", _]
            | ["upstreams", _, "backends", _, "state"]
            | ["reload"]
            | ["metrics"],
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

/// 404 for an unknown upstream or backend, 409 for a conflict.
fn membership_error(e: &MembershipError) -> Response<Full<Bytes>> {
    let status = match e {
        MembershipError::UnknownUpstream(_) | MembershipError::UnknownBackend { .. } => {
            StatusCode::NOT_FOUND
        }
        MembershipError::Discovered(_) | MembershipError::Exists { .. } => StatusCode::CONFLICT,
    };
    error(status, e.to_string())
}

/// Plugin paths in admin requests resolve against the config file's directory.
/// The metrics exposition in `format`, with the per-backend and plugin
/// gauges taken from the upstreams' snapshots now.
fn scrape(control: &Control, format: Format) -> String {
    let snapshots = control.snapshots();
    let mut backends = Vec::new();
    let mut plugins = Vec::with_capacity(snapshots.len());
    for u in &snapshots {
        plugins.push(PluginState {
            upstream: u.name.clone(),
            plugin: u.plugin.name.clone(),
            digest: u.plugin.digest.clone(),
        });
        backends.extend(u.backends.iter().map(|b| BackendState {
            upstream: u.name.clone(),
            backend: b.address.to_string(),
            up: b.selectable,
            check_passing: b.check_passing,
            ejected: b.ejected_for_ms.is_some(),
            effective_weight: b.effective_weight,
            in_flight: b.in_flight,
            response_time_seconds: b.rtt_ms / 1000.0,
        }));
    }
    control.metrics().encode(format, &backends, &plugins)
}

fn config_dir(control: &Control) -> &std::path::Path {
    control
        .config_path()
        .parent()
        .unwrap_or_else(|| std::path::Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abc", b"abd"));
        assert!(!token_matches(b"abc", b"abcd"));
        assert!(!token_matches(b"abc ", b"abc"), "trailing whitespace");
        assert!(!token_matches(b"", b"abc"));
    }
}
