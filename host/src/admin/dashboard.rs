//! The live dashboard at `GET /` on the admin address: one HTML page, its
//! script and its stylesheet, embedded in the binary (no CDN, nothing
//! fetched from elsewhere).
//!
//! The page itself holds no state and can do nothing on its own, so it is
//! served without the bearer token, like a login page. Everything it shows
//! or changes goes through the admin API (`GET /upstreams`,
//! `PUT .../backends/{address}/state`, `PUT .../plugin`, `POST /reload`)
//! under the same token rules: with a `token_file`, the page asks for the
//! token (or takes it from the URL fragment `#token=...`, which browsers
//! never send to a server) and sends it as `Authorization: Bearer`.
//!
//! Every asset carries a Content Security Policy that allows only this
//! origin's script, style and API (`connect-src 'self'`) and forbids
//! framing, so injected markup could neither run nor leave the page.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/dashboard.js");
const STYLE: &str = include_str!("assets/dashboard.css");

/// The policy sent with every dashboard asset.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The dashboard asset at `path` (a request path such as `/` or
/// `/dashboard.js`), or `None` when `path` names none (the API routes).
pub fn asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let (body, content_type) = match path {
        "/" | "/index.html" => (Bytes::from(index()), "text/html; charset=utf-8"),
        "/dashboard.js" => (
            Bytes::from_static(SCRIPT.as_bytes()),
            "text/javascript; charset=utf-8",
        ),
        "/dashboard.css" => (
            Bytes::from_static(STYLE.as_bytes()),
            "text/css; charset=utf-8",
        ),
        _ => return None,
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(r)
}

/// The page, with the built-in strategies it offers for a swap.
fn index() -> String {
    let builtins = crate::builtin::names().join(",");
    INDEX.replace("{{BUILTINS}}", &escape_attribute(&builtins))
}

/// `s` safe inside a double-quoted HTML attribute.
fn escape_attribute(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_lists_the_builtins_and_refers_only_to_embedded_assets() {
        let page = index();
        assert!(page.contains(r#"data-builtins="round-robin,"#), "{page}");
        assert!(!page.contains("{{"), "unfilled placeholder");
        assert!(!page.contains("http://") && !page.contains("https://"));
        for (path, kind) in [
            ("/", "text/html"),
            ("/dashboard.js", "text/javascript"),
            ("/dashboard.css", "text/css"),
        ] {
            let r = asset(path).expect(path);
            assert!(
                r.headers()[CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with(kind)
            );
            assert!(r.headers().contains_key("content-security-policy"));
        }
        assert!(asset("/upstreams").is_none());
        assert!(asset("/dashboard.js/").is_none());
    }

    #[test]
    fn attributes_are_escaped() {
        assert_eq!(escape_attribute(r#"a"<b>&"#), "a&quot;&lt;b&gt;&amp;");
    }
}
