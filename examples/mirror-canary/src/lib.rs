//! Example strategy (WIT 0.2): serve every request from the stable group and
//! mirror a share of them to the canary group, whose answers are discarded.
//!
//! Config (`[upstream.NAME.plugin_config]`):
//! - `label`: the backend label naming its group (default `group`).
//! - `stable`, `canary`: the two groups' label values (default `stable`,
//!   `canary`).
//! - `mirror_percent`: the share of requests copied to the canary, 0 to 100
//!   (default 10). The share is exact, not sampled: of every 10 requests at
//!   10 %, one is mirrored.
//!
//! The healthy backends of each group take turns (round-robin). The proxy
//! sends the copy after the real response head, bounded by
//! `mirror_max_in_flight`; a canary that hangs or is down costs clients
//! nothing. With no healthy stable backend the request is unavailable (the
//! canary never serves live traffic).
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;
use wasmlb_sdk::weighted::Rotation;

/// `plugin_config` of this strategy.
#[derive(Debug, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Label naming a backend's group.
    pub label: String,
    /// The serving group.
    pub stable: String,
    /// The mirrored group.
    pub canary: String,
    /// Share of requests mirrored, in percent.
    pub mirror_percent: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            label: "group".into(),
            stable: "stable".into(),
            canary: "canary".into(),
            mirror_percent: 10,
        }
    }
}

/// The strategy's state.
#[derive(Debug)]
pub struct MirrorCanary {
    config: Config,
    stable: Rotation,
    canary: Rotation,
    /// Percent accumulated toward the next mirror (0..100).
    credit: u32,
}

impl MirrorCanary {
    fn group(&self, backends: &[Backend], name: &str) -> Rotation {
        Rotation::new(
            backends
                .iter()
                .filter(|b| b.healthy && b.label(&self.config.label) == Some(name))
                .map(|b| (b.id, b.weight))
                .collect(),
        )
    }
}

impl Strategy for MirrorCanary {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.mirror_percent > 100 {
            return Err("`mirror_percent` must be 0 to 100".into());
        }
        if config.stable == config.canary {
            return Err("`stable` and `canary` must name different groups".into());
        }
        Ok(Self {
            config,
            stable: Rotation::default(),
            canary: Rotation::default(),
            credit: 0,
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.stable = self.group(&backends, &self.config.stable);
        self.canary = self.group(&backends, &self.config.canary);
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        let Some(id) = self.stable.next() else {
            return Decision::Unavailable;
        };
        self.credit += self.config.mirror_percent;
        if self.credit < 100 {
            return Decision::Backend(id);
        }
        self.credit -= 100;
        match self.canary.next() {
            Some(canary) => cx.forward(id).mirror(canary).decision(),
            None => Decision::Backend(id),
        }
    }
}

wasmlb_sdk::export_strategy!(MirrorCanary);
