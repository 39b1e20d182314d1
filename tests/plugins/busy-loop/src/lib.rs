//! Hostile test plugin: loops forever in every select.
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
    #[allow(clippy::empty_loop)]
    fn select(&mut self, _: &dyn Context) -> Decision {
        let mut i: u64 = 0;
        loop {
            i = core::hint::black_box(i.wrapping_add(1));
        }
    }
}

wasmlb_sdk::export_strategy!(Hostile);
