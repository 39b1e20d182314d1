//! Hostile test plugin: recurses without bound in every select (stack overflow).
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
        Decision::Backend(dive(core::hint::black_box(1)))
    }
}

/// Recurse forever; the frame keeps a live array so it cannot become a loop.
#[allow(unconditional_recursion)]
fn dive(n: u32) -> u32 {
    let frame = core::hint::black_box([n; 64]);
    dive(frame[(n % 64) as usize].wrapping_add(1)).wrapping_add(frame[0])
}

wasmlb_sdk::export_strategy!(Hostile);
