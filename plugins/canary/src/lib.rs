//! `canary`: a weighted split of requests between groups of backends chosen
//! by a label, for canary releases and blue/green switches.
//!
//! Source: Envoy's `weighted_clusters` route action and NGINX
//! `split_clients`, with the group override header of Istio/Argo Rollouts
//! style canaries. Backends are grouped by the value of one label (`group`
//! by default); `weights` gives each group's share of the requests. The
//! split is exact over any window of `sum(weights)` requests and spread out
//! within it (NGINX smooth weighted round-robin over the groups, then over
//! the healthy backends of the chosen group, by backend weight; O(1) when
//! the group's weights are equal).
//!
//! A request header (`x-canary` by default) overrides the split:
//! - `always`: the canary group (`canary`, by default `"canary"`);
//! - `never`: the split among the other groups;
//! - a group's name: that group.
//!
//! A forced group with no healthy backend answers `Unavailable` (503), so a
//! tester sees that the canary is down. Without a header, a group with no
//! healthy backend is skipped and the others share its requests; with no
//! healthy backend in any weighted group the answer is `Unavailable`. Groups
//! missing from `weights` get no traffic unless forced by the header.
//!
//! Rolling the canary forward (5 → 50 → 100 %) or switching blue to green is
//! a config change: `PUT /upstreams/NAME/plugin` with a new `plugin_config`
//! re-initializes the plugin without dropping a request.
//!
//! ```toml
//! [upstream.app.plugin_config]
//! label = "group"                          # default
//! weights = { stable = 95, canary = 5 }
//! header = "x-canary"                      # default; "" disables the override
//! canary = "canary"                        # default
//! ```
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;
use wasmlb_sdk::weighted::{Rotation, Smooth};

/// `plugin_config` of `canary`.
#[derive(Debug, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// The backend label whose value names a backend's group.
    pub label: String,
    /// Relative share of requests per group (label value → weight).
    pub weights: BTreeMap<String, u32>,
    /// Request header that forces a group; empty: no override.
    pub header: String,
    /// The group that `always` and `never` refer to.
    pub canary: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            label: "group".into(),
            weights: BTreeMap::new(),
            header: "x-canary".into(),
            canary: "canary".into(),
        }
    }
}

/// One group: its backends and NGINX smooth-weighting state.
#[derive(Debug, Default)]
struct Group {
    name: String,
    weight: u32,
    /// Backend ids in the group.
    members: Vec<u32>,
    /// Rotation over the healthy members (health arrives with
    /// `set-backends`, so this is rebuilt there).
    healthy: Rotation,
}

/// What the override header asks for.
enum Force {
    None,
    Group(usize),
    NotCanary,
}

/// Canary state.
#[derive(Debug)]
pub struct Canary {
    config: Config,
    groups: Vec<Group>,
    /// Smooth weighting over the groups.
    current: Smooth,
}

impl Canary {
    fn pick_in(&mut self, g: usize) -> Option<u32> {
        self.groups[g].healthy.next()
    }

    fn has_healthy(&self, g: usize) -> bool {
        !self.groups[g].healthy.is_empty()
    }

    fn group(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    fn force(&self, cx: &dyn Context) -> Force {
        if self.config.header.is_empty() {
            return Force::None;
        }
        match cx.header(&self.config.header).as_deref().map(str::trim) {
            Some("always") => self
                .group(&self.config.canary)
                .map_or(Force::None, Force::Group),
            Some("never") => Force::NotCanary,
            Some(name) => self.group(name).map_or(Force::None, Force::Group),
            None => Force::None,
        }
    }
}

impl Strategy for Canary {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.label.is_empty() {
            return Err("`label` must not be empty".into());
        }
        if config.weights.values().all(|&w| w == 0) {
            return Err("`weights` needs at least one group with a weight above 0".into());
        }
        let groups = config
            .weights
            .iter()
            .map(|(name, &weight)| Group {
                name: name.clone(),
                weight,
                ..Group::default()
            })
            .collect::<Vec<_>>();
        Ok(Self {
            current: Smooth::new(groups.len()),
            groups,
            config,
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        for g in &mut self.groups {
            g.members.clear();
        }
        // Groups named only by labels (not in `weights`) are rebuilt below,
        // with weight 0.
        let weights = &self.config.weights;
        self.groups.retain(|g| weights.contains_key(&g.name));
        for b in &backends {
            let Some(name) = b.label(&self.config.label) else {
                continue;
            };
            let g = match self.groups.iter().position(|g| g.name == name) {
                Some(g) => g,
                None => {
                    self.groups.push(Group {
                        name: name.to_string(),
                        ..Group::default()
                    });
                    self.groups.len() - 1
                }
            };
            self.groups[g].members.push(b.id);
        }
        for g in &mut self.groups {
            g.healthy = Rotation::new(
                g.members
                    .iter()
                    .map(|&id| &backends[id as usize])
                    .filter(|b| b.healthy)
                    .map(|b| (b.id, b.weight))
                    .collect(),
            );
        }
        self.current = Smooth::new(self.groups.len());
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        let canary = self.group(&self.config.canary);
        let exclude = match self.force(cx) {
            Force::Group(g) => {
                return self
                    .pick_in(g)
                    .map_or(Decision::Unavailable, Decision::Backend);
            }
            Force::NotCanary => canary,
            Force::None => None,
        };
        let eligible: Vec<(usize, u32)> = (0..self.groups.len())
            .filter(|&g| Some(g) != exclude && self.groups[g].weight > 0 && self.has_healthy(g))
            .map(|g| (g, self.groups[g].weight))
            .collect();
        let Some(g) = self.current.pick(eligible.iter().copied()) else {
            return Decision::Unavailable;
        };
        self.pick_in(g)
            .map_or(Decision::Unavailable, Decision::Backend)
    }
}

wasmlb_sdk::export_strategy!(Canary);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends, spread};

    /// Backends 0-3 `stable`, 4 `canary`, 5 unlabelled.
    fn set() -> Vec<Backend> {
        let mut set = backends(&[1; 6]);
        for b in &mut set[..4] {
            b.labels.push(("group".into(), "stable".into()));
        }
        set[4].labels.push(("group".into(), "canary".into()));
        set
    }

    const FIVE_PERCENT: &str = r#"{"weights": {"stable": 95, "canary": 5}}"#;

    fn canary_share(counts: &[u32]) -> u32 {
        counts[4]
    }

    #[test]
    fn five_percent_exactly_over_each_hundred() {
        let set = set();
        let counts = spread::<Canary>(FIVE_PERCENT, &set, &MockContext::new(&set), 1000).unwrap();
        assert_eq!(canary_share(&counts), 50);
        assert_eq!(counts[..4].iter().sum::<u32>(), 950);
        assert!(
            counts[..4].iter().all(|c| (237..=238).contains(c)),
            "{counts:?}"
        );
        assert_eq!(counts[5], 0, "unlabelled backends get nothing");
    }

    #[test]
    fn the_header_forces_or_excludes_the_canary() {
        let set = set();
        let always = MockContext::new(&set).with_header("x-canary", "always");
        let counts = spread::<Canary>(FIVE_PERCENT, &set, &always, 20).unwrap();
        assert_eq!(canary_share(&counts), 20);
        let never = MockContext::new(&set).with_header("x-canary", "never");
        let counts = spread::<Canary>(FIVE_PERCENT, &set, &never, 200).unwrap();
        assert_eq!(canary_share(&counts), 0);
        let by_name = MockContext::new(&set).with_header("x-canary", "stable");
        let counts = spread::<Canary>(FIVE_PERCENT, &set, &by_name, 200).unwrap();
        assert_eq!(canary_share(&counts), 0);
    }

    #[test]
    fn a_down_canary_sheds_its_share_unless_forced() {
        let mut set = set();
        set[4].healthy = false;
        let counts = spread::<Canary>(FIVE_PERCENT, &set, &MockContext::new(&set), 100).unwrap();
        assert_eq!(counts[..4].iter().sum::<u32>(), 100);
        let mut s: Canary = wasmlb_sdk::instantiate(FIVE_PERCENT).unwrap();
        s.set_backends(set.clone());
        let always = MockContext::new(&set).with_header("x-canary", "always");
        assert_eq!(s.select(&always), Decision::Unavailable);
    }

    #[test]
    fn blue_green_switch_is_a_new_config() {
        let mut set = backends(&[1; 4]);
        for (b, g) in set.iter_mut().zip(["blue", "blue", "green", "green"]) {
            b.labels.push(("color".into(), g.into()));
        }
        let blue = r#"{"label": "color", "weights": {"blue": 100, "green": 0}, "canary": "green"}"#;
        let counts = spread::<Canary>(blue, &set, &MockContext::new(&set), 100).unwrap();
        assert_eq!(counts, vec![50, 50, 0, 0]);
        // Testers reach green before the switch.
        let try_green = MockContext::new(&set).with_header("x-canary", "green");
        assert_eq!(
            spread::<Canary>(blue, &set, &try_green, 10).unwrap(),
            vec![0, 0, 5, 5]
        );
        let green =
            r#"{"label": "color", "weights": {"blue": 0, "green": 100}, "canary": "green"}"#;
        let counts = spread::<Canary>(green, &set, &MockContext::new(&set), 100).unwrap();
        assert_eq!(counts, vec![0, 0, 50, 50]);
    }

    #[test]
    fn bad_configs_are_rejected() {
        let err = wasmlb_sdk::instantiate::<Canary>("{}").unwrap_err();
        assert!(err.contains("weights"), "{err}");
        let err = wasmlb_sdk::instantiate::<Canary>(r#"{"weights": {"a": 1}, "lable": "x"}"#)
            .unwrap_err();
        assert!(err.contains("lable"), "{err}");
    }
}
