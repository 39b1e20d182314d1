//! Test plugin for WIT 0.1.1 (`request.scheme`, `http-version`,
//! `server-name`, `is-grpc`): gRPC requests go to backend 0, other HTTPS
//! requests to backend 1, the rest to backend 2 (ids modulo the backend
//! count), and the response carries `x-seen: <scheme> <version> <sni|-> <grpc>`.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use wasmlb_sdk::prelude::*;

/// See the crate docs.
#[derive(Debug, Default)]
pub struct ProtocolRoute {
    count: u32,
}

impl Strategy for ProtocolRoute {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Self::default())
    }
    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.count = backends.len() as u32;
    }
    fn select(&mut self, cx: &dyn Context) -> Decision {
        if self.count == 0 {
            return Decision::Unavailable;
        }
        let (scheme, grpc) = (cx.scheme(), cx.is_grpc());
        let sni = cx.server_name().unwrap_or_else(|| "-".into());
        cx.add_response_header(
            "x-seen",
            &format!("{scheme} {} {sni} {grpc}", cx.http_version()),
        );
        let id = if grpc {
            0
        } else if scheme == "https" {
            1
        } else {
            2
        };
        Decision::Backend(id % self.count)
    }
}

wasmlb_sdk::export_strategy!(ProtocolRoute);
