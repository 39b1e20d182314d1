//! Example strategy: pin a request to a backend named in a header, else pick
//! the least-loaded backend.
//!
//! Config (`[upstream.NAME.plugin_config]`):
//! - `header`: the request header to read (default `x-backend`).
//! - `label`: the backend label its value is matched against (default `name`).
//!
//! A request whose header value equals some healthy backend's label goes to
//! that backend; any other request goes to the healthy backend with the fewest
//! in-flight requests per unit of weight (ties in rotation), as the built-in
//! `least-connections` does. Copy this crate to start your own strategy.
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;

/// `plugin_config` of this strategy.
#[derive(Debug, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Header naming the wanted backend.
    pub header: String,
    /// Label compared with the header's value.
    pub label: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header: "x-backend".into(),
            label: "name".into(),
        }
    }
}

/// The strategy's state.
#[derive(Debug)]
pub struct HeaderRoute {
    config: Config,
    backends: Vec<Backend>,
    cursor: usize,
}

impl Strategy for HeaderRoute {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.header.is_empty() {
            return Err("`header` must not be empty".into());
        }
        Ok(Self {
            config,
            backends: Vec::new(),
            cursor: usize::MAX,
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.backends = backends;
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        if let Some(wanted) = cx.header(&self.config.header) {
            let pinned = self
                .backends
                .iter()
                .find(|b| b.healthy && b.label(&self.config.label) == Some(wanted.as_str()));
            if let Some(b) = pinned {
                return Decision::Backend(b.id);
            }
        }
        // Least in-flight per weight, ties in rotation after the last pick.
        let in_flight = cx.in_flight_all();
        let n = self.backends.len();
        let mut best: Option<(usize, u64, u64)> = None;
        // One division, then two plain ranges: a `%` per step costs more
        // than the rest of the loop body.
        let start = self.cursor.wrapping_add(1) % n.max(1);
        for id in (start..n).chain(0..start) {
            let b = &self.backends[id];
            let load = u64::from(in_flight.get(id).copied().unwrap_or(0));
            let weight = u64::from(b.weight.max(1));
            if b.healthy && best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                best = Some((id, load, weight));
            }
        }
        match best {
            Some((id, _, _)) => {
                self.cursor = id;
                Decision::Backend(id as u32)
            }
            None => Decision::Unavailable,
        }
    }
}

wasmlb_sdk::export_strategy!(HeaderRoute);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends, spread};

    fn named(weights: &[u32]) -> Vec<Backend> {
        let mut set = backends(weights);
        for b in &mut set {
            b.labels.push(("name".into(), format!("b{}", b.id)));
        }
        set
    }

    #[test]
    fn header_pins_the_backend() {
        let set = named(&[1, 1, 1]);
        let cx = MockContext::new(&set).with_header("X-Backend", "b2");
        assert_eq!(
            spread::<HeaderRoute>("{}", &set, &cx, 9).unwrap(),
            vec![0, 0, 9]
        );
    }

    #[test]
    fn unknown_or_missing_header_falls_back_to_least_loaded() {
        let set = named(&[1, 1, 1]);
        let cx = MockContext::new(&set)
            .with_header("x-backend", "nope")
            .with_in_flight(&[3, 0, 3]);
        assert_eq!(
            spread::<HeaderRoute>("{}", &set, &cx, 4).unwrap(),
            vec![0, 4, 0]
        );
        let idle = MockContext::new(&set);
        assert_eq!(
            spread::<HeaderRoute>("{}", &set, &idle, 9).unwrap(),
            vec![3, 3, 3]
        );
    }

    #[test]
    fn custom_header_and_label_from_config() {
        let mut set = backends(&[1, 1]);
        set[1].labels.push(("zone".into(), "eu".into()));
        let cx = MockContext::new(&set).with_header("x-zone", "eu");
        let config = r#"{"header":"x-zone","label":"zone"}"#;
        assert_eq!(
            spread::<HeaderRoute>(config, &set, &cx, 5).unwrap(),
            vec![0, 5]
        );
    }

    #[test]
    fn bad_config_is_an_init_error() {
        let e = wasmlb_sdk::instantiate::<HeaderRoute>(r#"{"header":""}"#).unwrap_err();
        assert!(e.contains("must not be empty"), "{e}");
        let e = wasmlb_sdk::instantiate::<HeaderRoute>(r#"{"headr":"x"}"#).unwrap_err();
        assert!(e.contains("unknown field `headr`"), "{e}");
    }
}
