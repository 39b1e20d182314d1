//! Hostile test plugin: calls host functions in an endless loop in every select.
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
        let mut total: u64 = 0;
        loop {
            total = total.wrapping_add(u64::from(cx.in_flight(0)) + cx.monotonic_now());
            if cx.header("x-never").is_some() && total == 0 {
                return Decision::Unavailable;
            }
        }
    }
}

wasmlb_sdk::export_strategy!(Hostile);
