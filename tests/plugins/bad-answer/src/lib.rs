//! Hostile test plugin: answers a backend id outside the set.
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;

/// See the crate docs.
#[derive(Debug, Default)]
pub struct Hostile;

impl Strategy for Hostile {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Self)
    }
    fn set_backends(&mut self, _: Vec<Backend>) {}
    fn select(&mut self, cx: &dyn Context) -> Decision {
        Decision::Backend(cx.backend_count() + 1000)
    }
}

wasmlb_sdk::export_strategy!(Hostile);
