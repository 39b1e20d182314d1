//! The 0.1 contract (`wit/v0.1/plugin.wit`, `wasmlb:plugin@0.1.1`), served
//! beside 0.2: a 0.1.0 or 0.1.1 component's imports are answered by the 0.2
//! host functions ([`super::host`]); only the types are converted. 0.1
//! names every import `@0.1.x`, which wasmtime links only to a `0.1`
//! definition (0.2 is not semver-compatible with it), hence the second set.

use super::HostState;
use super::bindings::wasmlb::plugin as v2;
use super::bindings_v0_1::wasmlb::plugin as v1;

/// A 0.1 decision as the 0.2 one it means (0.2 only added `respond`).
pub(super) fn decision(d: v1::types::Decision) -> v2::types::Decision {
    match d {
        v1::types::Decision::Backend(id) => v2::types::Decision::Backend(id),
        v1::types::Decision::Candidates(ids) => v2::types::Decision::Candidates(ids),
        v1::types::Decision::Unavailable => v2::types::Decision::Unavailable,
    }
}

/// A 0.2 backend record as 0.1's (the same fields).
pub(super) fn backend(b: v2::types::Backend) -> v1::types::Backend {
    v1::types::Backend {
        id: b.id,
        address: b.address,
        weight: b.weight,
        healthy: b.healthy,
        labels: b.labels,
    }
}

impl v1::types::Host for HostState {}

impl v1::log::Host for HostState {
    fn log(&mut self, level: v1::types::Level, message: String) {
        let level = match level {
            v1::types::Level::Trace => v2::types::Level::Trace,
            v1::types::Level::Debug => v2::types::Level::Debug,
            v1::types::Level::Info => v2::types::Level::Info,
            v1::types::Level::Warn => v2::types::Level::Warn,
            v1::types::Level::Error => v2::types::Level::Error,
        };
        v2::log::Host::log(self, level, message);
    }
}

impl v1::clock::Host for HostState {
    fn monotonic_now(&mut self) -> u64 {
        v2::clock::Host::monotonic_now(self)
    }
}

impl v1::backend_state::Host for HostState {
    fn backend_count(&mut self) -> u32 {
        v2::backend_state::Host::backend_count(self)
    }
    fn in_flight(&mut self, id: u32) -> u32 {
        v2::backend_state::Host::in_flight(self, id)
    }
    fn in_flight_all(&mut self) -> Vec<u32> {
        v2::backend_state::Host::in_flight_all(self)
    }
    fn healthy(&mut self, id: u32) -> bool {
        v2::backend_state::Host::healthy(self, id)
    }
    fn rtt_estimate(&mut self, id: u32) -> u64 {
        v2::backend_state::Host::rtt_estimate(self, id)
    }
    fn draining(&mut self, id: u32) -> bool {
        v2::backend_state::Host::draining(self, id)
    }
}

impl v1::response::Host for HostState {
    fn add_header(&mut self, name: String, value: String) {
        v2::response::Host::add_header(self, name, value);
    }
}

impl v1::request::Host for HostState {
    fn method(&mut self) -> String {
        v2::request::Host::method(self)
    }
    fn authority(&mut self) -> String {
        v2::request::Host::authority(self)
    }
    fn path(&mut self) -> String {
        v2::request::Host::path(self)
    }
    fn header(&mut self, name: String) -> Option<String> {
        v2::request::Host::header(self, name)
    }
    fn header_all(&mut self, name: String) -> Vec<String> {
        v2::request::Host::header_all(self, name)
    }
    fn client_address(&mut self) -> v1::types::SocketAddress {
        let a = v2::request::Host::client_address(self);
        v1::types::SocketAddress {
            ip: match a.ip {
                v2::types::IpAddress::Ipv4(o) => v1::types::IpAddress::Ipv4(o),
                v2::types::IpAddress::Ipv6(s) => v1::types::IpAddress::Ipv6(s),
            },
            port: a.port,
        }
    }
    fn scheme(&mut self) -> String {
        v2::request::Host::scheme(self)
    }
    fn http_version(&mut self) -> String {
        v2::request::Host::http_version(self)
    }
    fn server_name(&mut self) -> Option<String> {
        v2::request::Host::server_name(self)
    }
    fn is_grpc(&mut self) -> bool {
        v2::request::Host::is_grpc(self)
    }
}
