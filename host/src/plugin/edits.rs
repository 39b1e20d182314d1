//! What a 0.2 plugin may ask of the request and response beyond a backend:
//! headers added to the response, an answer of its own ([`Reply`]), and
//! changes to the forwarded request ([`RequestEdits`]: headers, path, a
//! mirror). Each is checked here, with the same limits and refusals
//! wherever it comes from, so what reaches the wire is valid HTTP and never
//! touches the host's framing.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{StatusCode, request::Parts};

/// Most headers a plugin may add to one response (`response.add-header`
/// and a reply's headers).
pub const MAX_RESPONSE_HEADERS: usize = 16;
/// Most bytes (names and values) a plugin may add to one response.
pub const MAX_RESPONSE_HEADER_BYTES: usize = 8192;
/// Most request changes (`forward.set-header`, `forward.remove-header`)
/// per request.
pub const MAX_REQUEST_EDITS: usize = 16;
/// Most bytes of names and values the request changes may carry, and the
/// longest path `forward.set-path` accepts.
pub const MAX_REQUEST_EDIT_BYTES: usize = 8192;
/// Largest body of a plugin's reply, in bytes (64 KiB).
pub const MAX_REPLY_BODY_BYTES: usize = 64 * 1024;

/// A header a plugin asked for, checked: a valid name and value, and not
/// one the host owns (hop-by-hop or framing headers; `host` for requests).
///
/// # Errors
/// Why it is refused, for the log.
pub fn checked_header(
    name: &str,
    value: &str,
    request: bool,
) -> Result<(HeaderName, HeaderValue), &'static str> {
    let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) else {
        return Err("not a valid HTTP header name or value");
    };
    owned_by_host(&n, request)?;
    Ok((n, v))
}

/// Refuse the names the host writes itself.
fn owned_by_host(name: &HeaderName, request: bool) -> Result<(), &'static str> {
    let framing = [
        http::header::CONTENT_LENGTH,
        http::header::TRANSFER_ENCODING,
        http::header::CONTENT_ENCODING,
    ];
    if crate::headers::HOP_BY_HOP.contains(&name.as_str()) || framing.contains(name) {
        return Err("hop-by-hop and framing headers are the host's");
    }
    if request && name == http::header::HOST {
        return Err("the host writes `host` from the request and the backend");
    }
    Ok(())
}

/// Headers for one response, added within [`MAX_RESPONSE_HEADERS`] and
/// [`MAX_RESPONSE_HEADER_BYTES`].
#[derive(Debug, Default)]
pub struct ResponseHeaders {
    /// The headers kept, in order.
    pub list: Vec<(HeaderName, HeaderValue)>,
    bytes: usize,
}

impl ResponseHeaders {
    /// Add `name: value`.
    ///
    /// # Errors
    /// Why it is refused: over the caps, invalid, or the host's.
    pub fn add(&mut self, name: &str, value: &str) -> Result<(), &'static str> {
        if self.list.len() >= MAX_RESPONSE_HEADERS
            || self.bytes + name.len() + value.len() > MAX_RESPONSE_HEADER_BYTES
        {
            return Err("more than 16 headers or 8 KiB for this response");
        }
        let header = checked_header(name, value, false)?;
        self.bytes += name.len() + value.len();
        self.list.push(header);
        Ok(())
    }

    /// Forget every header (a new `select`).
    pub fn clear(&mut self) {
        self.list.clear();
        self.bytes = 0;
    }
}

/// One change to the forwarded request's headers, in call order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit {
    /// Replace every value of the header with this one.
    Set(HeaderName, HeaderValue),
    /// Remove every value of the header.
    Remove(HeaderName),
}

/// The changes a plugin asked for with the `forward` interface during one
/// `select`: applied to each attempt's request head before it is prepared
/// for the backend ([`RequestEdits::apply`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestEdits {
    /// Header changes, applied in order.
    pub headers: Vec<HeaderEdit>,
    /// The new path and query, if any.
    pub path: Option<PathAndQuery>,
    /// The backend id to send a copy of the request to, if any.
    pub mirror: Option<u32>,
    bytes: usize,
}

impl RequestEdits {
    /// True when nothing was asked.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.path.is_none() && self.mirror.is_none()
    }

    fn budget(&self, more: usize) -> Result<(), &'static str> {
        if self.headers.len() >= MAX_REQUEST_EDITS || self.bytes + more > MAX_REQUEST_EDIT_BYTES {
            return Err("more than 16 request header changes or 8 KiB for this request");
        }
        Ok(())
    }

    /// `forward.set-header`.
    ///
    /// # Errors
    /// Why it is refused.
    pub fn set_header(&mut self, name: &str, value: &str) -> Result<(), &'static str> {
        self.budget(name.len() + value.len())?;
        let (n, v) = checked_header(name, value, true)?;
        self.bytes += name.len() + value.len();
        self.headers.push(HeaderEdit::Set(n, v));
        Ok(())
    }

    /// `forward.remove-header`.
    ///
    /// # Errors
    /// Why it is refused.
    pub fn remove_header(&mut self, name: &str) -> Result<(), &'static str> {
        self.budget(name.len())?;
        let n =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| "not a valid HTTP header name")?;
        owned_by_host(&n, true)?;
        self.bytes += name.len();
        self.headers.push(HeaderEdit::Remove(n));
        Ok(())
    }

    /// `forward.set-path`: an origin-form request-target (RFC 9112
    /// §3.2.1), starting with `/`, at most 8 KiB.
    ///
    /// # Errors
    /// Why it is refused.
    pub fn set_path(&mut self, path: &str) -> Result<(), &'static str> {
        if path.len() > MAX_REQUEST_EDIT_BYTES {
            return Err("a path longer than 8 KiB");
        }
        if !path.starts_with('/') || path.starts_with("//") {
            return Err("a path must start with a single `/` (origin-form)");
        }
        let parsed = PathAndQuery::try_from(path).map_err(|_| "not a valid path and query")?;
        // `PathAndQuery` accepts a `#`, which origin-form does not.
        if path.contains('#') {
            return Err("a fragment is not part of a request-target");
        }
        self.path = Some(parsed);
        Ok(())
    }

    /// Apply the header and path changes to a request head (the mirror is
    /// the caller's).
    pub fn apply(&self, parts: &mut Parts) {
        for edit in &self.headers {
            match edit {
                HeaderEdit::Set(n, v) => {
                    parts.headers.insert(n.clone(), v.clone());
                }
                HeaderEdit::Remove(n) => {
                    parts.headers.remove(n);
                }
            }
        }
        if let Some(path) = &self.path {
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = Some(path.clone());
            // Only the path changed, so the parts stay a valid URI; the
            // fallback keeps the request well-formed regardless.
            parts.uri = http::Uri::from_parts(uri).unwrap_or_else(|_| {
                http::Uri::from_maybe_shared(Bytes::copy_from_slice(path.as_str().as_bytes()))
                    .unwrap_or_default()
            });
        }
    }
}

/// A plugin's own answer (the 0.2 `respond` decision), checked.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status, 200 to 599.
    pub status: StatusCode,
    /// The headers kept (with any from `response.add-header` after them).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body, at most [`MAX_REPLY_BODY_BYTES`].
    pub body: Bytes,
}

/// Check a `respond` decision's status and body size; the headers are
/// checked one by one as they are added.
///
/// # Errors
/// Why the answer is unusable (a bad answer).
pub fn check_reply(status: u16, body_len: usize) -> Result<StatusCode, String> {
    if !(200..=599).contains(&status) {
        return Err(format!(
            "answered respond with status {status}, not 200-599"
        ));
    }
    if body_len > MAX_REPLY_BODY_BYTES {
        return Err(format!(
            "answered respond with a {body_len}-byte body, over the 64 KiB limit"
        ));
    }
    StatusCode::from_u16(status).map_err(|e| format!("answered respond with status {status}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str) -> Parts {
        let mut parts = http::Request::get(uri).body(()).unwrap().into_parts().0;
        parts
            .headers
            .insert("x-keep", HeaderValue::from_static("1"));
        parts
            .headers
            .append("cookie", HeaderValue::from_static("a=1"));
        parts
            .headers
            .append("cookie", HeaderValue::from_static("b=2"));
        parts
    }

    #[test]
    fn header_edits_apply_in_order_and_replace_every_value() {
        let mut e = RequestEdits::default();
        e.set_header("x-user", "7").unwrap();
        e.remove_header("Cookie").unwrap();
        e.set_header("x-keep", "2").unwrap();
        e.remove_header("x-user").unwrap();
        e.set_header("x-user", "8").unwrap();
        let mut parts = head("/a?b=1");
        e.apply(&mut parts);
        assert_eq!(parts.headers.get("x-user").unwrap(), "8");
        assert_eq!(parts.headers.get_all("x-keep").iter().count(), 1);
        assert_eq!(parts.headers.get("x-keep").unwrap(), "2");
        assert!(parts.headers.get("cookie").is_none());
        assert_eq!(parts.uri, "/a?b=1");
    }

    #[test]
    fn the_hosts_headers_and_bad_fields_are_refused() {
        let mut e = RequestEdits::default();
        for name in [
            "connection",
            "Transfer-Encoding",
            "content-length",
            "host",
            "upgrade",
            "te",
            "keep-alive",
            "proxy-connection",
            "trailer",
        ] {
            assert!(e.set_header(name, "x").is_err(), "{name}");
            assert!(e.remove_header(name).is_err(), "{name}");
        }
        assert!(e.set_header("bad name", "x").is_err());
        assert!(e.set_header("x-a", "line\r\nx-injected: 1").is_err());
        assert!(e.set_header("x-a", "nul\0").is_err());
        assert!(e.remove_header("").is_err());
        assert!(e.is_empty());
        // Caps: 16 changes, 8 KiB.
        for i in 0..20 {
            let _ = e.set_header(&format!("x-{i}"), "v");
        }
        assert_eq!(e.headers.len(), MAX_REQUEST_EDITS);
        let mut big = RequestEdits::default();
        assert!(big.set_header("x-big", &"v".repeat(8192)).is_err());
        assert!(big.set_header("x-big", &"v".repeat(8000)).is_ok());
        assert!(big.set_header("x-more", &"v".repeat(500)).is_err());
    }

    #[test]
    fn paths_must_be_origin_form() {
        let mut e = RequestEdits::default();
        for bad in [
            "",
            "items",
            "//evil.example/x",
            "http://evil.example/",
            "/a b",
            "/a\r\nHost: x",
            "/a#frag",
            "*",
        ] {
            assert!(e.set_path(bad).is_err(), "{bad:?}");
        }
        assert!(e.set_path(&format!("/{}", "a".repeat(8192))).is_err());
        assert!(e.path.is_none());
        e.set_path("/items?id=3").unwrap();
        let mut parts = head("http://app.example/api/items?id=3");
        e.apply(&mut parts);
        assert_eq!(parts.uri.path_and_query().unwrap(), "/items?id=3");
        assert_eq!(parts.uri.authority().unwrap(), "app.example");
        let mut origin = head("/api/items");
        e.apply(&mut origin);
        assert_eq!(origin.uri, "/items?id=3");
    }

    #[test]
    fn response_headers_are_capped_and_checked() {
        let mut h = ResponseHeaders::default();
        h.add("retry-after", "3").unwrap();
        assert!(h.add("content-length", "9").is_err());
        assert!(h.add("connection", "close").is_err());
        assert!(h.add("x-a", "a\nb").is_err());
        // `host` is only the request's concern.
        h.add("host", "x").unwrap();
        for i in 0..20 {
            let _ = h.add(&format!("x-{i}"), "v");
        }
        assert_eq!(h.list.len(), MAX_RESPONSE_HEADERS);
        h.clear();
        assert!(h.list.is_empty());
        assert!(
            h.add("x-big", &"v".repeat(MAX_RESPONSE_HEADER_BYTES))
                .is_err()
        );
    }

    #[test]
    fn replies_need_a_final_status_and_a_small_body() {
        assert_eq!(check_reply(429, 10).unwrap(), StatusCode::TOO_MANY_REQUESTS);
        assert!(check_reply(200, MAX_REPLY_BODY_BYTES).is_ok());
        for bad in [0, 99, 100, 101, 199, 600, 999, 65535] {
            assert!(check_reply(bad, 0).is_err(), "{bad}");
        }
        assert!(check_reply(503, MAX_REPLY_BODY_BYTES + 1).is_err());
    }
}
