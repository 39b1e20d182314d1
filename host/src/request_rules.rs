//! What a downstream request must satisfy before it is routed, and how its
//! head is normalized for an HTTP/1.1 backend. Every byte a client sends is
//! hostile: a request breaking these rules is the client's fault (4xx),
//! never reaches a backend and never counts against one.
//!
//! | rule | answer | source |
//! | --- | --- | --- |
//! | `CONNECT` (no forward-proxy tunnels), except HTTP/2's extended CONNECT with `:protocol` | 501 | RFC 9110 §9.3.6, RFC 8441; NGINX and HAProxy refuse it too |
//! | request target longer than `max_request_line_bytes` | 414 | NGINX `large_client_header_buffers` |
//! | header fields over `max_header_bytes` (name + value + 4 each) or `max_headers` | 431 | RFC 6585 §5 |
//! | HTTP/1.1 without `Host` | 400 | RFC 9112 §3.2 |
//! | more than one `Host`, or an invalid one (not `host[:port]`, userinfo, empty) | 400 | RFC 9112 §3.2 |
//! | HTTP/2 `host` differing from `:authority` | 400 | RFC 9113 §8.3.1 |
//!
//! Normalization (the request then carries exactly one `Host`, the one
//! routing and `X-Forwarded-Host` use):
//! - HTTP/1.1 absolute-form (`GET http://a.example/x`): the target's
//!   authority replaces `Host` (RFC 9112 §3.2.2).
//! - HTTP/2: `:authority` becomes `Host` (RFC 9113 §8.3.1); several `cookie`
//!   fields are joined with `"; "` into one (RFC 9113 §8.2.3).
//!
//! The header-size limit for HTTP/1 is also enforced by hyper's read buffer
//! (a head that does not fit is 431 before it is parsed; see
//! [`h1_max_buf_size`]), and for HTTP/2 by `SETTINGS_MAX_HEADER_LIST_SIZE`.

use http::header::{self, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::config::RequestLimits;

/// A request refused before routing: the status and a short reason for the
/// client (no internal detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// 400, 414, 431 or 501.
    pub status: StatusCode,
    /// One line, safe to show the client.
    pub reason: &'static str,
}

const fn reject(status: StatusCode, reason: &'static str) -> Rejection {
    Rejection { status, reason }
}

/// Check `parts` against the rules of this module and normalize its `Host`
/// (and, for HTTP/2, its cookies) in place.
///
/// # Errors
/// The [`Rejection`] for the first rule broken.
pub fn check(parts: &mut http::request::Parts, limits: &RequestLimits) -> Result<(), Rejection> {
    if parts.method == Method::CONNECT && !crate::headers::is_extended_connect(parts) {
        return Err(reject(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not supported",
        ));
    }
    if target_len(parts) > limits.max_request_line_bytes {
        return Err(reject(StatusCode::URI_TOO_LONG, "request target too long"));
    }
    if parts.headers.len() > limits.max_headers
        || header_bytes(&parts.headers) > limits.max_header_bytes
    {
        return Err(reject(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header fields too large",
        ));
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(reject(StatusCode::BAD_REQUEST, "more than one Host header"));
    }
    if let Some(h) = &host
        && !valid_host(h.as_bytes())
    {
        return Err(reject(StatusCode::BAD_REQUEST, "invalid Host header"));
    }
    let target_authority = parts.uri.authority().map(|a| a.as_str());
    match parts.version {
        Version::HTTP_2 | Version::HTTP_3 => {
            if let Some(authority) = target_authority {
                if !valid_host(authority.as_bytes()) {
                    return Err(reject(StatusCode::BAD_REQUEST, "invalid :authority"));
                }
                if host
                    .as_ref()
                    .is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(authority.as_bytes()))
                {
                    return Err(reject(
                        StatusCode::BAD_REQUEST,
                        "host differs from :authority",
                    ));
                }
                set_host(&mut parts.headers, authority)?;
            }
            join_cookies(&mut parts.headers);
        }
        Version::HTTP_11 if host.is_none() => {
            return Err(reject(StatusCode::BAD_REQUEST, "missing Host header"));
        }
        _ => {
            // Absolute-form: the target's authority wins over Host.
            if let Some(authority) = target_authority {
                if !valid_host(authority.as_bytes()) {
                    return Err(reject(StatusCode::BAD_REQUEST, "invalid request target"));
                }
                set_host(&mut parts.headers, authority)?;
            }
        }
    }
    Ok(())
}

fn set_host(headers: &mut http::HeaderMap, authority: &str) -> Result<(), Rejection> {
    let value = HeaderValue::from_str(authority)
        .map_err(|_| reject(StatusCode::BAD_REQUEST, "invalid :authority"))?;
    headers.insert(header::HOST, value);
    Ok(())
}

/// Length of the request target as received: the path and query, plus the
/// scheme and authority of an absolute-form target (HTTP/2's `:path`).
fn target_len(parts: &http::request::Parts) -> usize {
    let path = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if parts.version == Version::HTTP_2 {
        return path;
    }
    match (parts.uri.scheme_str(), parts.uri.authority()) {
        (Some(scheme), Some(authority)) => scheme.len() + 3 + authority.as_str().len() + path,
        _ => path,
    }
}

/// Bytes of the header fields, each counted as `name: value\r\n`.
fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

/// The bytes of a reg-name (RFC 3986 §3.2.2: unreserved, sub-delims and
/// `%` of a pct-encoded byte), one lookup a byte.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            );
        b += 1;
    }
    table
};

/// `uri-host [ ":" port ]` (RFC 9110 §7.2): a reg-name, IPv4 or bracketed IPv6
/// host, non-empty, no userinfo, path or whitespace; a port of digits only.
pub fn valid_host(value: &[u8]) -> bool {
    if value.is_empty() || value.len() > 255 + 6 {
        return false;
    }
    let (host, port) = if value[0] == b'[' {
        let Some(end) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let inside = &value[1..end];
        if inside.is_empty()
            || !inside
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        match &value[end + 1..] {
            [] => (&value[..=end], None),
            [b':', port @ ..] => (&value[..=end], Some(port)),
            _ => return false,
        }
    } else {
        match value.iter().rposition(|&b| b == b':') {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (value, None),
        }
    };
    let reg_name_ok = host.first() == Some(&b'[')
        || (!host.is_empty() && host.iter().all(|&b| REG_NAME[usize::from(b)]));
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    reg_name_ok && port_ok
}

/// Join several `cookie` fields into one, separated by `"; "` (RFC 9113
/// §8.2.3: an HTTP/2 client may split cookies; an HTTP/1.1 backend expects
/// one field).
fn join_cookies(headers: &mut http::HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    // Joining valid field values with "; " gives a valid field value.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// hyper's HTTP/1 read buffer limit for these limits: a head that does not
/// fit is answered 431 by hyper before it is parsed, so memory stays
/// bounded. It leaves room for a target up to hyper's own URI limit (64 KiB,
/// answered 414) so that an over-long target gets 414, not 431.
pub fn h1_max_buf_size(limits: &RequestLimits) -> usize {
    (64 * 1024 + limits.max_header_bytes + 1024).max(8192)
}

/// `SETTINGS_MAX_HEADER_LIST_SIZE` for HTTP/2 clients (h2 answers 431 above
/// it): the header limit plus room for the pseudo-header fields.
pub fn h2_max_header_list_size(limits: &RequestLimits) -> u32 {
    u32::try_from(limits.max_header_bytes + limits.max_request_line_bytes + 512).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: Version, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn status(mut p: http::request::Parts) -> Result<http::request::Parts, u16> {
        check(&mut p, &RequestLimits::default())
            .map(|()| p)
            .map_err(|r| r.status.as_u16())
    }

    #[test]
    fn host_rules_follow_rfc_9112() {
        let one = parts(Version::HTTP_11, "/", &[("host", "a.example")]);
        assert!(status(one).is_ok());
        let two = parts(
            Version::HTTP_11,
            "/",
            &[("host", "a.example"), ("host", "b.example")],
        );
        assert_eq!(status(two).unwrap_err(), 400);
        assert_eq!(
            status(parts(Version::HTTP_11, "/", &[])).unwrap_err(),
            400,
            "HTTP/1.1 needs Host"
        );
        assert!(status(parts(Version::HTTP_10, "/", &[])).is_ok());
        for bad in [
            "",
            "a b",
            "u@a.example",
            "a.example/x",
            "a:99999x",
            "[zz]",
            "[::1",
        ] {
            let p = parts(Version::HTTP_11, "/", &[("host", bad)]);
            assert_eq!(status(p).unwrap_err(), 400, "{bad:?}");
        }
        for good in [
            "a.example:8080",
            "[::1]:80",
            "127.0.0.1",
            "xn--bcher-kva.example",
        ] {
            let p = parts(Version::HTTP_11, "/", &[("host", good)]);
            assert!(status(p).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn absolute_form_target_replaces_host() {
        let p = parts(
            Version::HTTP_11,
            "http://b.example/x",
            &[("host", "a.example")],
        );
        assert_eq!(status(p).unwrap().headers["host"], "b.example");
    }

    #[test]
    fn http2_authority_wins_and_cookies_are_joined() {
        let p = parts(
            Version::HTTP_2,
            "http://a.example/x",
            &[("cookie", "a=1"), ("cookie", "b=2")],
        );
        let p = status(p).unwrap();
        assert_eq!(p.headers["host"], "a.example");
        assert_eq!(p.headers.get_all("cookie").iter().count(), 1);
        assert_eq!(p.headers["cookie"], "a=1; b=2");
        let differs = parts(
            Version::HTTP_2,
            "http://a.example/x",
            &[("host", "b.example")],
        );
        assert_eq!(status(differs).unwrap_err(), 400);
        let same = parts(
            Version::HTTP_2,
            "http://a.example/x",
            &[("host", "A.example")],
        );
        assert!(status(same).is_ok());
    }

    #[test]
    fn limits_and_connect() {
        let long = format!("/{}", "a".repeat(9000));
        let p = parts(Version::HTTP_11, &long, &[("host", "a")]);
        assert_eq!(status(p).unwrap_err(), 414);
        let big = "v".repeat(17_000);
        let p = parts(Version::HTTP_11, "/", &[("host", "a"), ("x-big", &big)]);
        assert_eq!(status(p).unwrap_err(), 431);
        let many: Vec<(String, &str)> = (0..101).map(|i| (format!("x-{i}"), "1")).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let mut p = parts(Version::HTTP_11, "/", &many);
        p.headers.insert("host", HeaderValue::from_static("a"));
        assert_eq!(status(p).unwrap_err(), 431);
        let mut p = parts(Version::HTTP_11, "/", &[("host", "a")]);
        p.method = Method::CONNECT;
        assert_eq!(status(p).unwrap_err(), 501);
        // HTTP/2 CONNECT: plain is refused; with `:protocol` (RFC 8441) it
        // is routed; `:protocol` on HTTP/1.1 means nothing.
        let mut p = parts(Version::HTTP_2, "/chat", &[]);
        p.method = Method::CONNECT;
        assert_eq!(status(p).unwrap_err(), 501);
        let mut p = parts(Version::HTTP_2, "/chat", &[]);
        p.method = Method::CONNECT;
        p.extensions
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(crate::headers::is_extended_connect(&p));
        assert!(status(p).is_ok());
        let mut p = parts(Version::HTTP_11, "/", &[("host", "a")]);
        p.method = Method::CONNECT;
        p.extensions
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert_eq!(status(p).unwrap_err(), 501);
    }
}
