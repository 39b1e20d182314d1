//! Example strategy (WIT 0.2): route by path prefix to labelled backend
//! groups, strip the prefix, and answer 404 for any other path.
//!
//! Config (`[upstream.NAME.plugin_config]`):
//! - `label`: the backend label naming its group (default `group`).
//! - `routes`: `[{ prefix = "/api", group = "api", strip = true }, ...]`,
//!   tried longest prefix first. A prefix matches whole path segments:
//!   `/api` matches `/api`, `/api/x` and `/api?q`, not `/apix`.
//! - `default_group`: the group for a path no route matches; without one
//!   such a request gets `404 Not Found` from the proxy.
//!
//! A group's healthy backends take turns. With `strip`, the backend sees the
//! path without the prefix (`/api/items?id=3` becomes `/items?id=3`, `/api`
//! becomes `/`) and the prefix in `x-forwarded-prefix` (Traefik's StripPrefix).
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;
use wasmlb_sdk::weighted::Rotation;

/// One route.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields)]
pub struct Route {
    /// Path prefix, starting with `/`, without a trailing `/`.
    pub prefix: String,
    /// The group (label value) serving it.
    pub group: String,
    /// Remove the prefix from the path the backend sees.
    #[serde(default)]
    pub strip: bool,
}

/// `plugin_config` of this strategy.
#[derive(Debug, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Label naming a backend's group.
    pub label: String,
    /// The routes.
    pub routes: Vec<Route>,
    /// Group for unmatched paths (empty: 404).
    pub default_group: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            label: "group".into(),
            routes: Vec::new(),
            default_group: String::new(),
        }
    }
}

/// The strategy's state: routes longest first, a rotation per group.
#[derive(Debug)]
pub struct PathRouter {
    config: Config,
    groups: BTreeMap<String, Rotation>,
}

/// The rest of `path` after `prefix` if `prefix` matches whole segments:
/// `Some("")`, `Some("/x")` or `Some("?q")`.
pub fn strip_prefix<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    if prefix == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')).then_some(rest)
}

impl Strategy for PathRouter {
    type Config = Config;

    fn new(mut config: Config) -> Result<Self, String> {
        for r in &mut config.routes {
            if !r.prefix.starts_with('/') || r.group.is_empty() {
                return Err(format!(
                    "route {:?}: `prefix` must start with `/` and `group` must be set",
                    r.prefix
                ));
            }
            while r.prefix.len() > 1 && r.prefix.ends_with('/') {
                r.prefix.pop();
            }
        }
        config
            .routes
            .sort_by_key(|r| core::cmp::Reverse(r.prefix.len()));
        Ok(Self {
            config,
            groups: BTreeMap::new(),
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        let mut members: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
        for b in backends.iter().filter(|b| b.healthy) {
            if let Some(group) = b.label(&self.config.label) {
                members
                    .entry(group.into())
                    .or_default()
                    .push((b.id, b.weight));
            }
        }
        self.groups = members
            .into_iter()
            .map(|(g, m)| (g, Rotation::new(m)))
            .collect();
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        let path = cx.path();
        let route = self
            .config
            .routes
            .iter()
            .find_map(|r| Some((r, strip_prefix(&path, &r.prefix)?)));
        let (group, rewrite) = match route {
            Some((r, rest)) if r.strip && r.prefix != "/" => {
                let new_path = if rest.starts_with('/') {
                    String::from(rest)
                } else {
                    format!("/{rest}")
                };
                (r.group.as_str(), Some((new_path, r.prefix.as_str())))
            }
            Some((r, _)) => (r.group.as_str(), None),
            None if !self.config.default_group.is_empty() => {
                (self.config.default_group.as_str(), None)
            }
            None => return cx.respond(404).text("no route for this path\n").into(),
        };
        let Some(id) = self.groups.get_mut(group).and_then(|g| g.next()) else {
            return Decision::Unavailable;
        };
        match rewrite {
            Some((new_path, prefix)) => cx
                .forward(id)
                .path(&new_path)
                .set_header("x-forwarded-prefix", prefix)
                .decision(),
            None => Decision::Backend(id),
        }
    }
}

wasmlb_sdk::export_strategy!(PathRouter);
