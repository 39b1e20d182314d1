//! Hostile test plugin: fails init with a message.
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;

/// See the crate docs.
#[derive(Debug, Default)]
pub struct Hostile;

impl Strategy for Hostile {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Err("bad-init refuses every config".into())
    }
    fn set_backends(&mut self, _: Vec<Backend>) {}
    fn select(&mut self, _: &dyn Context) -> Decision {
        Decision::Unavailable
    }
}

wasmlb_sdk::export_strategy!(Hostile);
