//! Test plugin for WIT 0.2 (`respond`, `forward`): what it does depends on
//! the request's `x-case` header; every request goes to backend 0 unless
//! the case answers itself. The cases (see `tests/tests/contract_0_2.rs`):
//! - `respond-101`, `respond-600`, `respond-big`: bad answers (a 1xx
//!   status, a status past 599, a body over 64 KiB);
//! - `respond-max`: 418 with a 64 KiB body; `respond-204`: 204 with a body
//!   (which must not be sent);
//! - `respond-headers`: 403 `nope` with valid, hop-by-hop, framing and
//!   injected headers, plus a `response.add-header`;
//! - `edit-hostile`: request changes the host must refuse (host, framing,
//!   CRLF, absolute and scheme-relative paths, an unknown mirror) beside
//!   valid ones (`x-ok`, removing `cookie`);
//! - `path-rewrite`: the path becomes `/headers?rewritten=1`, with
//!   `x-rewritten: yes`;
//! - `flood-edits`: 100 header changes (16 are kept);
//! - `mirror-1`: forward to 0 and mirror to backend 1.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use wasmlb_sdk::prelude::*;

/// See the crate docs.
#[derive(Debug, Default)]
pub struct EditCorpus;

impl Strategy for EditCorpus {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Self)
    }
    fn set_backends(&mut self, _: Vec<Backend>) {}
    fn select(&mut self, cx: &dyn Context) -> Decision {
        let case = cx.header("x-case").unwrap_or_default();
        match case.as_str() {
            "respond-101" => cx.respond(101).into(),
            "respond-600" => cx.respond(600).into(),
            "respond-big" => cx.respond(200).body(vec![b'x'; 64 * 1024 + 1]).into(),
            "respond-204" => cx.respond(204).body("ignored").into(),
            "respond-max" => cx.respond(418).body(vec![b'x'; 64 * 1024]).into(),
            "respond-headers" => {
                cx.add_response_header("x-added", "1");
                cx.respond(403)
                    .header("x-ok", "1")
                    .header("content-length", "5")
                    .header("transfer-encoding", "chunked")
                    .header("connection", "close")
                    .header("x-bad", "a\r\nx-injected: 1")
                    .header("bad name", "x")
                    .header("set-cookie", "a=1")
                    .body("nope")
                    .into()
            }
            "edit-hostile" => cx
                .forward(0)
                .set_header("host", "evil.example")
                .set_header("content-length", "0")
                .set_header("transfer-encoding", "chunked")
                .set_header("connection", "close")
                .set_header("x-bad", "v\r\nx-injected: 1")
                .set_header("x-ok", "1")
                .remove_header("cookie")
                .remove_header("content-length")
                .path("//evil.example/x")
                .path("http://evil.example/x")
                .path("/x y")
                .mirror(9999)
                .decision(),
            "path-rewrite" => cx
                .forward(0)
                .path("/headers?rewritten=1")
                .set_header("x-rewritten", "yes")
                .decision(),
            "flood-edits" => {
                for i in 0..100 {
                    cx.set_request_header(&format!("x-flood-{i}"), "v");
                }
                Decision::Backend(0)
            }
            "mirror-1" => cx.forward(0).mirror(1).decision(),
            _ => Decision::Backend(0),
        }
    }
}

wasmlb_sdk::export_strategy!(EditCorpus);
