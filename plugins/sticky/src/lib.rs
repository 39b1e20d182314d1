//! `sticky`: sticky sessions by cookie, over smooth weighted round-robin.
//!
//! Source: HAProxy `cookie SERVERID insert` and Traefik's `sticky.cookie`.
//! A request without a valid session cookie goes to a backend chosen by
//! NGINX smooth weighted round-robin over the healthy backends, and the
//! response carries `Set-Cookie: <cookie>=<backend token>; <attributes>`
//! (through the host's `response.add-header`). A request with the cookie goes
//! to that backend while it is available: healthy, or draining (a draining
//! backend takes no new sessions but keeps its own, as HAProxy does for
//! persistent connections). When the backend is gone (removed, unhealthy,
//! ejected or in maintenance) the request is balanced afresh and the cookie
//! rewritten.
//!
//! The token is 16 hex digits of a hash of the backend's address: it does
//! not reveal the address, and every balancer with the same backends reads
//! the same cookies, across restarts and plugin swaps.
//!
//! Per request: a cookie lookup in a `BTreeMap`; a new session costs an
//! O(1) rotation when the healthy backends' weights are equal (O(n) smooth
//! weighting otherwise) and one `add-header` host call.
//!
//! `plugin_config`: `cookie` (name, default `wasmlb_sticky`) and
//! `attributes` (appended to the cookie, default `Path=/; HttpOnly`; add
//! `Secure` behind TLS, `Max-Age=...` for persistence across browser
//! sessions).
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::hashing::{cookie, hash64};
use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;
use wasmlb_sdk::weighted::Rotation;

/// `plugin_config` of `sticky`.
#[derive(Debug, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// The session cookie's name.
    pub cookie: String,
    /// Attributes appended to the `Set-Cookie` value.
    pub attributes: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cookie: "wasmlb_sticky".into(),
            attributes: "Path=/; HttpOnly".into(),
        }
    }
}

/// The cookie token of a backend address, as a number (the cookie holds it
/// as 16 hex digits).
pub fn token_of(address: &str) -> u64 {
    hash64(address.as_bytes(), 0x5eed)
}

/// The cookie token of a backend address, as the cookie holds it.
pub fn token(address: &str) -> String {
    format!("{:016x}", token_of(address))
}

/// Sticky-session state.
#[derive(Debug)]
pub struct Sticky {
    config: Config,
    backends: Vec<Backend>,
    /// Backend id by token.
    by_token: BTreeMap<u64, u32>,
    /// `Set-Cookie` value per backend id (built once per backend set).
    set_cookie: Vec<String>,
    /// New sessions rotate over the healthy backends.
    rotation: Rotation,
}

impl Sticky {
    /// The backend named by the request's session cookie, if it may serve it.
    fn session(&self, cx: &dyn Context) -> Option<u32> {
        let value = cookie(&cx.header_all("cookie"), &self.config.cookie)?;
        let token = u64::from_str_radix(&value, 16).ok()?;
        let id = *self.by_token.get(&token)?;
        let healthy = self.backends.get(id as usize).is_some_and(|b| b.healthy);
        (healthy || cx.draining(id)).then_some(id)
    }
}

impl Strategy for Sticky {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let valid = !config.cookie.is_empty()
            && config
                .cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid {
            return Err(format!(
                "cookie: {:?} is not a valid cookie name",
                config.cookie
            ));
        }
        if config.attributes.bytes().any(|b| b.is_ascii_control()) {
            return Err("attributes: control characters are not allowed".into());
        }
        Ok(Self {
            config,
            backends: Vec::new(),
            by_token: BTreeMap::new(),
            set_cookie: Vec::new(),
            rotation: Rotation::default(),
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.by_token = backends
            .iter()
            .map(|b| (token_of(&b.address), b.id))
            .collect();
        self.set_cookie = backends
            .iter()
            .map(|b| {
                let mut value = format!("{}={}", self.config.cookie, token(&b.address));
                if !self.config.attributes.is_empty() {
                    value.push_str("; ");
                    value.push_str(&self.config.attributes);
                }
                value
            })
            .collect();
        self.rotation = Rotation::healthy(&backends);
        self.backends = backends;
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        if let Some(id) = self.session(cx) {
            return Decision::Backend(id);
        }
        let Some(id) = self.rotation.next() else {
            return Decision::Unavailable;
        };
        let id = id as usize;
        cx.add_response_header("set-cookie", &self.set_cookie[id]);
        Decision::Backend(id as u32)
    }
}

wasmlb_sdk::export_strategy!(Sticky);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends};

    fn sticky(set: &[Backend]) -> Sticky {
        let mut s: Sticky = wasmlb_sdk::instantiate("{}").unwrap();
        s.set_backends(set.to_vec());
        s
    }

    fn with_cookie(set: &[Backend], id: usize) -> MockContext {
        let value = format!("theme=dark; wasmlb_sticky={}", token(&set[id].address));
        MockContext::new(set).with_header("cookie", &value)
    }

    #[test]
    fn a_new_session_gets_a_cookie_and_rotation() {
        let set = backends(&[1, 1, 1]);
        let mut s = sticky(&set);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let cx = MockContext::new(&set);
            let Decision::Backend(id) = s.select(&cx) else {
                panic!()
            };
            let headers = cx.response_headers.borrow();
            assert_eq!(headers.len(), 1);
            assert_eq!(headers[0].0, "set-cookie");
            assert_eq!(
                headers[0].1,
                format!(
                    "wasmlb_sticky={}; Path=/; HttpOnly",
                    token(&set[id as usize].address)
                )
            );
            seen.push(id);
        }
        assert_eq!(seen, vec![0, 1, 2]);
    }

    #[test]
    fn a_session_stays_on_its_backend_without_a_new_cookie() {
        let set = backends(&[1, 1, 1]);
        let mut s = sticky(&set);
        for _ in 0..10 {
            let cx = with_cookie(&set, 2);
            assert_eq!(s.select(&cx), Decision::Backend(2));
            assert!(cx.response_headers.borrow().is_empty());
        }
    }

    #[test]
    fn a_draining_backend_keeps_its_sessions_but_gets_no_new_ones() {
        let mut set = backends(&[1, 1, 1]);
        set[1].healthy = false; // the host marks a draining backend not healthy
        let mut s = sticky(&set);
        let mut cx = with_cookie(&set, 1);
        cx.draining[1] = true;
        assert_eq!(s.select(&cx), Decision::Backend(1));
        for _ in 0..10 {
            let mut fresh = MockContext::new(&set);
            fresh.draining[1] = true;
            assert_ne!(s.select(&fresh), Decision::Backend(1));
        }
    }

    #[test]
    fn a_gone_backend_rebalances_and_rewrites_the_cookie() {
        let mut set = backends(&[1, 1, 1]);
        set[1].healthy = false; // down, not draining
        let mut s = sticky(&set);
        let cx = with_cookie(&set, 1);
        let Decision::Backend(id) = s.select(&cx) else {
            panic!()
        };
        assert_ne!(id, 1);
        let headers = cx.response_headers.borrow();
        assert!(
            headers[0].1.contains(&token(&set[id as usize].address)),
            "{headers:?}"
        );
        // A token of no current backend (removed) also rebalances.
        let stale = MockContext::new(&set).with_header("cookie", "wasmlb_sticky=0123456789abcdef");
        assert!(matches!(s.select(&stale), Decision::Backend(0 | 2)));
    }

    #[test]
    fn config_is_checked() {
        let custom = r#"{"cookie": "SRV", "attributes": "Path=/; Secure"}"#;
        let mut s: Sticky = wasmlb_sdk::instantiate(custom).unwrap();
        let set = backends(&[1]);
        s.set_backends(set.clone());
        let cx = MockContext::new(&set);
        s.select(&cx);
        assert!(cx.response_headers.borrow()[0].1.starts_with("SRV="));
        let err = wasmlb_sdk::instantiate::<Sticky>(r#"{"cookie": "a b"}"#).unwrap_err();
        assert!(err.contains("cookie"), "{err}");
        let mut none = backends(&[1]);
        none[0].healthy = false;
        let mut s = sticky(&none);
        assert_eq!(s.select(&MockContext::new(&none)), Decision::Unavailable);
    }
}
