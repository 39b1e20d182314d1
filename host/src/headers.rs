//! Header rules shared by the request path and the plugin runtime: which
//! headers are hop-by-hop, a request's authority, and the rewrite of a
//! downstream request head into a backend request head.
//!
//! Follows RFC 9110 §7.6.1: `Connection`, every header it names, and the
//! fixed hop-by-hop set ([`HOP_BY_HOP`]) are removed in both directions.
//! `X-Forwarded-For` gets the downstream peer's IP appended (after the
//! removal, so `Connection: x-forwarded-for` cannot hide the peer);
//! `X-Forwarded-Proto` and `X-Forwarded-Host` are set. The `Host` header is
//! kept (as HAProxy and Envoy do); for HTTP/2 clients it is filled from
//! `:authority`.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};

/// Headers that apply to one connection only and are never forwarded
/// (RFC 9110 §7.6.1, plus the de-facto `Proxy-Connection` and `Keep-Alive`).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

static HOP_BY_HOP_NAMES: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The request's authority: the `Host` header, else the URI's authority
/// (HTTP/2 `:authority`), else empty.
pub fn authority(parts: &http::request::Parts) -> &str {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
}

/// `host` of `host[:port]`, keeping IPv6 brackets (`[::1]:80` gives `[::1]`).
pub fn host_without_port(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    }
}

/// A downstream client's IP with its `X-Forwarded-For` element formatted
/// once per connection (not per request).
#[derive(Debug, Clone)]
pub struct ClientIp {
    ip: std::net::IpAddr,
    value: HeaderValue,
}

impl ClientIp {
    /// The IP of `peer`.
    pub fn new(peer: SocketAddr) -> Self {
        let value = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            ip: peer.ip(),
            value,
        }
    }
}

/// True for a gRPC request: `content-type: application/grpc` or
/// `application/grpc+...` / `application/grpc;...` (gRPC over HTTP/2 spec;
/// `application/grpc-web*` counts too).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(..16))
        .is_some_and(|v| v.eq_ignore_ascii_case("application/grpc"))
}

/// True for an HTTP/2 extended CONNECT (RFC 8441 §4: `CONNECT` with a
/// `:protocol`, such as WebSocket over HTTP/2); hyper admits it only when
/// the listener announced `SETTINGS_ENABLE_CONNECT_PROTOCOL`.
pub fn is_extended_connect(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::CONNECT
        && parts.version == Version::HTTP_2
        && parts.extensions.get::<hyper::ext::Protocol>().is_some()
}

/// Turn an HTTP/2 extended CONNECT (RFC 8441 §4, e.g. WebSocket over
/// HTTP/2) into the head of the HTTP/1.1 upgrade request it stands for, as
/// Envoy does: the method becomes `GET`, `:protocol` becomes the returned
/// `Upgrade` value, and for `websocket` a fresh `Sec-WebSocket-Key` is added
/// (RFC 8441 §5: HTTP/2 clients send none; the backend's
/// `Sec-WebSocket-Accept` is then dropped, see [`tunnel_established`]).
/// `Ok(None)` for any other request, which is left alone.
///
/// # Errors
/// A `:protocol` that is no valid header value (400), or no randomness for
/// the key.
pub fn extended_connect_as_upgrade(
    parts: &mut http::request::Parts,
) -> Result<Option<HeaderValue>, &'static str> {
    if !is_extended_connect(parts) {
        return Ok(None);
    }
    let Some(protocol) = parts.extensions.remove::<hyper::ext::Protocol>() else {
        return Ok(None);
    };
    let value = HeaderValue::from_str(protocol.as_str()).map_err(|_| "invalid :protocol")?;
    parts.method = http::Method::GET;
    if protocol.as_str().eq_ignore_ascii_case("websocket")
        && !parts.headers.contains_key(header::SEC_WEBSOCKET_KEY)
    {
        let mut nonce = [0u8; 16];
        getrandom::getrandom(&mut nonce).map_err(|_| "no randomness for Sec-WebSocket-Key")?;
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        let key = HeaderValue::from_str(&key).map_err(|_| "invalid Sec-WebSocket-Key")?;
        parts.headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    Ok(Some(value))
}

/// The head of the `200` that tells an HTTP/2 client its extended CONNECT
/// tunnel is open (RFC 8441 §5), made from the backend's `101` head: its
/// hop-by-hop fields, `Upgrade` and `Sec-WebSocket-Accept` (which answers
/// the key the proxy made, not the client) go.
pub fn tunnel_established(mut parts: http::response::Parts) -> http::response::Parts {
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::UPGRADE);
    parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.status = http::StatusCode::OK;
    parts.version = Version::HTTP_2;
    parts
}

/// The protocols an HTTP/1.1 request asks to upgrade to (RFC 9110 §7.8):
/// its `Upgrade` value, if `Connection` names `upgrade`, less `h2c` (a
/// client's h2c upgrade is not forwarded: the request is served as HTTP/1.1,
/// as NGINX and Envoy do). `None` for other requests, HTTP/1.0 and HTTP/2
/// (which has no `Upgrade`), or if only `h2c` was asked for.
pub fn upgrade_protocols(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let upgrade = parts.headers.get(header::UPGRADE)?;
    let asked = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asked {
        return None;
    }
    let value = upgrade.to_str().ok()?;
    if !value
        .split(',')
        .any(|p| p.trim().eq_ignore_ascii_case("h2c"))
    {
        return Some(upgrade.clone());
    }
    let kept: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c"))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// Remove `Connection`, the headers it names, and [`HOP_BY_HOP`].
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most messages carry none of these, and
    // comparing a few names is cheaper than nine hashed removals.
    if !headers.keys().any(|k| HOP_BY_HOP_NAMES.contains(k)) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Headers [`prepare_request`] usually adds to a head (`X-Forwarded-For`,
/// `-Proto`, `-Host`, and `Host` or `TE`), for a copy to reserve room for:
/// a capacity hint, not a bound (a request may need both `Host` and `TE`).
pub const ADDED_HEADERS: usize = 4;

/// Turn a downstream request's head into the backend request's head:
/// hop-by-hop headers removed (but `te: trailers`, see
/// [`crate::connector::adapt_head`]), `X-Forwarded-For`/`-Proto`/`-Host`
/// set (`-Proto` is `https` if the client came over TLS), `Host`
/// kept (taken from an HTTP/2 `:authority`, or the backend's `backend`
/// authority if the client sent none), the URI in origin-form and the version
/// HTTP/1.1.
///
/// # Errors
/// A static reason (answered 400) if the authority, `X-Forwarded-For` or the
/// backend authority cannot be a header value.
pub fn prepare_request(
    parts: &mut http::request::Parts,
    client: &ClientIp,
    backend: &http::uri::Authority,
    https: bool,
) -> Result<(), &'static str> {
    // The Host header, else (HTTP/2) `:authority`; shared, not copied.
    let host = match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => match parts.uri.authority() {
            Some(a) => Some(HeaderValue::from_str(a.as_str()).map_err(|_| "invalid authority")?),
            None => None,
        },
    };
    // `te: trailers` is the one TE an HTTP/2 backend may get (gRPC needs
    // it); the pool drops it again for HTTP/1.1 backends.
    let te_trailers = parts.headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    strip_hop_by_hop(&mut parts.headers);
    let headers = &mut parts.headers;
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(host) = &host
        && !headers.contains_key(header::HOST)
    {
        headers.insert(header::HOST, host.clone());
    }
    // One lookup (an entry) for the chain: hashing this custom name costs
    // about 100 instructions each time (`bench/instructions.py`).
    match headers.entry(&X_FORWARDED_FOR) {
        http::header::Entry::Occupied(mut chain) => {
            let mut joined = chain
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            joined.push_str(", ");
            joined.push_str(&client.ip.to_string());
            chain.insert(HeaderValue::from_str(&joined).map_err(|_| "invalid X-Forwarded-For")?);
        }
        // The common case: no chain yet, the connection's own value.
        http::header::Entry::Vacant(slot) => {
            slot.insert(client.value.clone());
        }
    }
    headers.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    if let Some(host) = host
        && !host.is_empty()
    {
        headers.insert(&X_FORWARDED_HOST, host);
    }
    if !headers.contains_key(header::HOST) {
        // An HTTP/1.0 request without `Host`: name the backend (RFC 9112
        // §3.2 requires `Host` in HTTP/1.1).
        headers.insert(
            header::HOST,
            HeaderValue::from_str(backend.as_str()).map_err(|_| "invalid backend authority")?,
        );
    }
    // Origin-form (RFC 9112 §3.2.1), reusing the parsed path and query (a
    // cheap `Bytes` clone, no re-parse).
    let path = std::mem::take(&mut parts.uri)
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
    parts.version = Version::HTTP_11;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = Request::builder().uri("/a/b?c=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut p = parts(&[
            ("host", "example.com"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ]);
        prepare_request(
            &mut p,
            &ClientIp::new("192.0.2.7:5000".parse().unwrap()),
            &http::uri::Authority::from_static("127.0.0.1:9001"),
            false,
        )
        .unwrap();
        for gone in ["connection", "x-secret", "keep-alive", "upgrade"] {
            assert!(!p.headers.contains_key(gone), "{gone} should be removed");
        }
        // Kept for an HTTP/2 backend only (the pool drops it for HTTP/1.1).
        assert_eq!(p.headers["te"], "trailers");
        assert_eq!(p.headers["x-kept"], "yes");
        assert_eq!(p.headers["host"], "example.com");
        assert_eq!(p.uri, "/a/b?c=1");
    }

    #[test]
    fn forwarded_headers_are_appended_and_set() {
        let mut p = parts(&[
            ("host", "example.com:8080"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ]);
        prepare_request(
            &mut p,
            &ClientIp::new("192.0.2.7:5000".parse().unwrap()),
            &http::uri::Authority::from_static("127.0.0.1:9001"),
            false,
        )
        .unwrap();
        assert_eq!(p.headers["x-forwarded-for"], "203.0.113.9, 192.0.2.7");
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["x-forwarded-host"], "example.com:8080");
        let mut p = parts(&[("host", "example.com"), ("te", "gzip")]);
        let backend = http::uri::Authority::from_static("127.0.0.1:9001");
        prepare_request(
            &mut p,
            &ClientIp::new("192.0.2.7:5000".parse().unwrap()),
            &backend,
            true,
        )
        .unwrap();
        assert_eq!(p.headers["x-forwarded-proto"], "https", "behind TLS");
        assert!(
            !p.headers.contains_key("te"),
            "a TE other than trailers goes"
        );
    }

    #[test]
    fn connection_cannot_strip_the_peer_from_x_forwarded_for() {
        let mut p = parts(&[
            ("connection", "x-forwarded-for"),
            ("x-forwarded-for", "10.9.9.9"),
        ]);
        prepare_request(
            &mut p,
            &ClientIp::new("192.0.2.7:5000".parse().unwrap()),
            &http::uri::Authority::from_static("127.0.0.1:9001"),
            false,
        )
        .unwrap();
        assert_eq!(p.headers["x-forwarded-for"], "192.0.2.7");
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut p = Request::builder()
            .uri("http://example.com/x")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        prepare_request(
            &mut p,
            &ClientIp::new("[::1]:5000".parse().unwrap()),
            &http::uri::Authority::from_static("127.0.0.1:9001"),
            false,
        )
        .unwrap();
        assert_eq!(p.headers["host"], "example.com");
        assert_eq!(p.headers["x-forwarded-for"], "::1");
    }

    #[test]
    fn an_extended_connect_becomes_a_websocket_upgrade() {
        let mut p = Request::builder()
            .method(http::Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("https://chat.example/room?x=1")
            .header("sec-websocket-version", "13")
            .extension(hyper::ext::Protocol::from_static("websocket"))
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let upgrade = extended_connect_as_upgrade(&mut p).unwrap().unwrap();
        assert_eq!(upgrade, "websocket");
        assert_eq!(p.method, http::Method::GET);
        assert!(p.extensions.get::<hyper::ext::Protocol>().is_none());
        let key = p
            .headers
            .get("sec-websocket-key")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(key.len(), 24, "16 bytes, base64");
        assert_eq!(p.headers["sec-websocket-version"], "13");
        // A plain request is left alone.
        let mut plain = parts(&[("host", "a")]);
        assert!(extended_connect_as_upgrade(&mut plain).unwrap().is_none());
        assert_eq!(plain.method, http::Method::GET);
        // The 200 drops what answered the proxy's key.
        let response = http::Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "x")
            .header("sec-websocket-protocol", "chat")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let ok = tunnel_established(response);
        assert_eq!(ok.status, 200);
        assert_eq!(ok.headers.len(), 1);
        assert_eq!(ok.headers["sec-websocket-protocol"], "chat");
    }

    #[test]
    fn upgrades_are_recognised_and_h2c_is_not_forwarded() {
        let ws = parts(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_protocols(&ws).unwrap(), "websocket");
        let no_token = parts(&[("connection", "keep-alive"), ("upgrade", "websocket")]);
        assert!(upgrade_protocols(&no_token).is_none());
        let no_upgrade = parts(&[("connection", "upgrade")]);
        assert!(upgrade_protocols(&no_upgrade).is_none());
        let h2c = parts(&[
            ("connection", "upgrade, http2-settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(upgrade_protocols(&h2c).is_none());
        let both = parts(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]);
        assert_eq!(upgrade_protocols(&both).unwrap(), "websocket");
        let mut http10 = parts(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        http10.version = Version::HTTP_10;
        assert!(upgrade_protocols(&http10).is_none());
    }

    #[test]
    fn host_port_is_ignored_for_routing() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }
}
