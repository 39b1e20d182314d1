//! Runtime glue behind [`export_strategy!`](crate::export_strategy): the
//! generated bindings, the instance's strategy cell, the allocator and the
//! panic handler. wasm32 only; not a public API.
#![allow(unsafe_code, missing_docs)]

use core::cell::RefCell;

pub use alloc::string::String;
pub use alloc::vec::Vec;

use crate::{Backend, Context, Decision, Level, SocketAddr, Strategy};

/// Bindings for the `wasmlb:plugin/balancer` world.
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "stateful-balancer",
        pub_export_macro: true,
        export_macro_name: "__export_balancer",
        default_bindings_module: "wasmlb_sdk::__rt::bindings",
        runtime_path: "wasmlb_sdk::wit_bindgen::rt",
    });
}

use bindings::wasmlb::plugin as wit;

/// `memcmp` for `core` and `alloc` (slice and `str` comparison). On
/// wasm32-wasip2 it normally comes from wasi-libc, which a `no_std` plugin does
/// not link (its `libc.a` would also shadow wit-bindgen's `cabi_realloc`).
/// `compiler_builtins` supplies `memcpy`, `memmove` and `memset` but not this.
///
/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are readable for n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `bcmp`: like [`memcmp`], but only zero versus non-zero is meaningful.
///
/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The canonical ABI allocator (`cabi_realloc`), through which the host
/// lowers strings and lists into the guest. On wasm32-wasip2 wit-bindgen leaves
/// it to wasi-libc, which a `no_std` plugin does not link; this is the same
/// code wit-bindgen uses on other targets, over the global allocator.
///
/// # Safety
/// Called by the canonical ABI only, with `old_ptr`/`old_len`/`align` from an
/// earlier allocation of this function (or `old_len == 0`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, realloc};
    // SAFETY: the canonical ABI passes a power-of-two `align` and, for a
    // reallocation, the pointer and size it got from this function.
    let ptr = unsafe {
        if old_len == 0 {
            if new_len == 0 {
                return align as *mut u8;
            }
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}

#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// A panic traps the instance; the host serves the request with its fallback
/// and replaces the instance. Nothing is printed: printing needs `wasi:cli`.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

/// Holds the instance's strategy. A component instance runs on one thread at
/// a time and the host never re-enters it, so the `RefCell` borrows never
/// overlap.
#[allow(missing_debug_implementations)]
pub struct StrategyCell<S>(RefCell<Option<S>>);

// SAFETY: wasm32 component instances are single-threaded (no shared memory,
// no threads are spawned by this SDK), so the cell is never accessed from two
// threads.
unsafe impl<S> Sync for StrategyCell<S> {}

impl<S: Strategy> StrategyCell<S> {
    pub const fn new() -> Self {
        Self(RefCell::new(None))
    }

    pub fn init(&self, config: &str) -> Result<(), String> {
        let strategy = crate::instantiate::<S>(config)?;
        *self.0.borrow_mut() = Some(strategy);
        Ok(())
    }

    pub fn set_backends(&self, backends: Vec<wit::types::Backend>) {
        let backends = backends
            .into_iter()
            .map(|b| Backend {
                id: b.id,
                address: b.address,
                weight: b.weight,
                healthy: b.healthy,
                labels: b.labels,
            })
            .collect();
        if let Some(s) = self.0.borrow_mut().as_mut() {
            s.set_backends(backends);
        }
    }

    pub fn export_state(&self) -> Vec<u8> {
        self.0
            .borrow()
            .as_ref()
            .map(Strategy::export_state)
            .unwrap_or_default()
    }

    pub fn import_state(&self, state: &[u8]) -> Result<(), String> {
        match self.0.borrow_mut().as_mut() {
            Some(s) => s.import_state(state),
            None => Err("import-state before init".into()),
        }
    }

    pub fn select(&self) -> wit::types::Decision {
        let mut guard = self.0.borrow_mut();
        let Some(s) = guard.as_mut() else {
            // select before a successful init: the host treats this as a bad answer.
            return wit::types::Decision::Unavailable;
        };
        match s.select(&WasmContext) {
            Decision::Backend(id) => wit::types::Decision::Backend(id),
            Decision::Candidates(ids) => wit::types::Decision::Candidates(ids),
            Decision::Unavailable => wit::types::Decision::Unavailable,
            Decision::Respond(r) => wit::types::Decision::Respond(wit::types::Reply {
                status: r.status,
                headers: r.headers,
                body: r.body,
            }),
        }
    }
}

impl<S: Strategy> Default for StrategyCell<S> {
    fn default() -> Self {
        Self::new()
    }
}

/// [`Context`] backed by the host imports.
struct WasmContext;

impl Context for WasmContext {
    fn method(&self) -> String {
        wit::request::method()
    }
    fn authority(&self) -> String {
        wit::request::authority()
    }
    fn path(&self) -> String {
        wit::request::path()
    }
    fn header(&self, name: &str) -> Option<String> {
        wit::request::header(name)
    }
    fn header_all(&self, name: &str) -> Vec<String> {
        wit::request::header_all(name)
    }
    fn scheme(&self) -> String {
        wit::request::scheme()
    }
    fn http_version(&self) -> String {
        wit::request::http_version()
    }
    fn server_name(&self) -> Option<String> {
        wit::request::server_name()
    }
    fn is_grpc(&self) -> bool {
        wit::request::is_grpc()
    }
    fn client_address(&self) -> SocketAddr {
        let a = wit::request::client_address();
        let ip = match a.ip {
            wit::types::IpAddress::Ipv4((a, b, c, d)) => {
                crate::IpAddr::V4(crate::Ipv4Addr::new(a, b, c, d))
            }
            wit::types::IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
                crate::IpAddr::V6(crate::Ipv6Addr::new(a, b, c, d, e, f, g, h))
            }
        };
        SocketAddr::new(ip, a.port)
    }
    fn backend_count(&self) -> u32 {
        wit::backend_state::backend_count()
    }
    fn in_flight(&self, id: u32) -> u32 {
        wit::backend_state::in_flight(id)
    }
    fn in_flight_all(&self) -> Vec<u32> {
        wit::backend_state::in_flight_all()
    }
    fn healthy(&self, id: u32) -> bool {
        wit::backend_state::healthy(id)
    }
    fn rtt_estimate(&self, id: u32) -> u64 {
        wit::backend_state::rtt_estimate(id)
    }
    fn draining(&self, id: u32) -> bool {
        wit::backend_state::draining(id)
    }
    fn add_response_header(&self, name: &str, value: &str) {
        wit::response::add_header(name, value)
    }
    fn set_request_header(&self, name: &str, value: &str) {
        wit::forward::set_header(name, value)
    }
    fn remove_request_header(&self, name: &str) {
        wit::forward::remove_header(name)
    }
    fn set_path(&self, path_and_query: &str) {
        wit::forward::set_path(path_and_query)
    }
    fn mirror(&self, id: u32) {
        wit::forward::mirror(id)
    }
    fn monotonic_now(&self) -> u64 {
        wit::clock::monotonic_now()
    }
    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Trace => wit::types::Level::Trace,
            Level::Debug => wit::types::Level::Debug,
            Level::Info => wit::types::Level::Info,
            Level::Warn => wit::types::Level::Warn,
            Level::Error => wit::types::Level::Error,
        };
        wit::log::log(level, message);
    }
}
