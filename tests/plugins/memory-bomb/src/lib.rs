//! Hostile test plugin: allocates without bound in every select (memory.grow until the cap).
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
    fn select(&mut self, _: &dyn Context) -> Decision {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(core::hint::black_box(vec![1u8; 1 << 20]));
        }
    }
}

wasmlb_sdk::export_strategy!(Hostile);
