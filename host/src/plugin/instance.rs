//! A live plugin instance: its store, its exports, and the calls into it
//! (`select`, `set-backends`, the optional state hand-off), each under its
//! deadline, with every answer validated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::header::{HeaderName, HeaderValue};
use wasmtime::Store;
use wasmtime::component::TypedFunc;

use super::bindings::{
    self,
    wasmlb::plugin::types::{self as wit_types},
};
use super::*;
use crate::backend::Backend;
use crate::plugin_call::FailureKind;

/// The optional `wasmlb:plugin/state` export.
pub(super) struct StateFuncs {
    pub(super) export: TypedFunc<(), (Vec<u8>,)>,
    pub(super) import: TypedFunc<(Vec<u8>,), (Result<(), String>,)>,
}

/// Names of the optional state interface export, newest first (0.2.0,
/// 0.1.1, 0.1.0).
pub(super) const STATE_INTERFACES: [&str; 3] = [
    "wasmlb:plugin/state@0.2.0",
    "wasmlb:plugin/state@0.1.1",
    "wasmlb:plugin/state@0.1.0",
];

/// The state functions, if the component exports the `state` interface with
/// the expected signatures.
pub(super) fn state_funcs(
    store: &mut Store<HostState>,
    instance: &wasmtime::component::Instance,
) -> Option<StateFuncs> {
    let iface = STATE_INTERFACES
        .iter()
        .find_map(|name| instance.get_export_index(&mut *store, None, name))?;
    let export = instance.get_export_index(&mut *store, Some(&iface), "export-state")?;
    let import = instance.get_export_index(&mut *store, Some(&iface), "import-state")?;
    let typed = (
        instance.get_typed_func::<(), (Vec<u8>,)>(&mut *store, &export),
        instance.get_typed_func::<(Vec<u8>,), (Result<(), String>,)>(&mut *store, &import),
    );
    match typed {
        (Ok(export), Ok(import)) => Some(StateFuncs { export, import }),
        _ => {
            tracing::warn!(
                upstream = &*store.data().upstream,
                "wasmlb:plugin/state has unexpected signatures; ignored"
            );
            None
        }
    }
}

/// The exports of an instance, for the contract it was built against.
pub(super) enum Bindings {
    V0_1(super::bindings_v0_1::Balancer),
    V0_2(bindings::Balancer),
}

impl Bindings {
    /// `strategy.init`.
    pub(super) fn init(
        &self,
        store: &mut Store<HostState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Bindings::V0_1(b) => b.wasmlb_plugin_strategy().call_init(store, config),
            Bindings::V0_2(b) => b.wasmlb_plugin_strategy().call_init(store, config),
        }
    }

    /// `strategy.set-backends`.
    pub(super) fn set_backends(
        &self,
        store: &mut Store<HostState>,
        list: Vec<wit_types::Backend>,
    ) -> wasmtime::Result<()> {
        match self {
            Bindings::V0_1(b) => {
                let list: Vec<_> = list.into_iter().map(super::host_v0_1::backend).collect();
                b.wasmlb_plugin_strategy().call_set_backends(store, &list)
            }
            Bindings::V0_2(b) => b.wasmlb_plugin_strategy().call_set_backends(store, &list),
        }
    }

    /// `strategy.select`, as a 0.2 decision.
    fn select(&self, store: &mut Store<HostState>) -> wasmtime::Result<Decision> {
        match self {
            Bindings::V0_1(b) => b
                .wasmlb_plugin_strategy()
                .call_select(store)
                .map(super::host_v0_1::decision),
            Bindings::V0_2(b) => b.wasmlb_plugin_strategy().call_select(store),
        }
    }
}

/// The backend list as lowered to the plugin.
pub(super) fn backend_list(backends: &[Backend]) -> Vec<wit_types::Backend> {
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| wit_types::Backend {
            id: i as u32,
            address: b.address.to_string(),
            weight: b.weight,
            healthy: b.live.healthy.load(Ordering::Relaxed),
            labels: b
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
        .collect()
}

/// A trap's description: wasmtime's message with the guest backtrace.
pub(super) fn describe_error(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}

/// The request handed to a `select` call. Moved into the store for the call
/// and handed back, so nothing is copied.
#[derive(Debug)]
pub struct RequestView {
    /// Method, URI, version and headers of the downstream request.
    pub parts: http::request::Parts,
    /// The downstream TCP peer.
    pub client: SocketAddr,
    /// The client came over TLS (`request.scheme` is `https`).
    pub https: bool,
    /// The TLS server name (SNI) the client sent, if any (on a TCP
    /// listener, read from its ClientHello with `tls_passthrough`).
    pub server_name: Option<std::sync::Arc<str>>,
    /// A TCP-mode connection, not an HTTP request: `method`, `path`,
    /// `authority` and headers read as absent, `scheme` is `tcp`.
    pub tcp: bool,
}

impl RequestView {
    /// A plaintext request from `client`.
    pub fn new(parts: http::request::Parts, client: SocketAddr) -> Self {
        Self {
            parts,
            client,
            https: false,
            server_name: None,
            tcp: false,
        }
    }

    /// A copy: method, URI, version and headers (no extensions), and the
    /// rest as is (for a shadow plugin's decision).
    pub fn copy(&self) -> Self {
        let mut parts = http::Request::new(()).into_parts().0;
        parts.method = self.parts.method.clone();
        parts.uri = self.parts.uri.clone();
        parts.version = self.parts.version;
        parts.headers = self.parts.headers.clone();
        Self {
            parts,
            client: self.client,
            https: self.https,
            server_name: self.server_name.clone(),
            tcp: self.tcp,
        }
    }
}

/// One live plugin instance: its store and exports. Not `Sync`; an upstream
/// keeps it behind a mutex.
pub struct Instance {
    pub(super) store: Store<HostState>,
    pub(super) bindings: Bindings,
    pub(super) state: Option<StateFuncs>,
    /// Budget of `select` and the state calls, in ms of CPU time.
    pub(super) deadline_ms: u64,
    /// Budget of `init` and `set-backends`, in ms of CPU time.
    pub(super) init_deadline_ms: u64,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("upstream", &self.store.data().upstream)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Call the optional `export-state`. `None` if the plugin has no state
    /// interface; `Some(Err)` with the trap if it failed.
    pub fn export_state(&mut self) -> Option<Result<Vec<u8>, String>> {
        let export = self.state.as_ref()?.export;
        let _call = arm(&mut self.store, self.deadline_ms);
        Some(
            export
                .call(&mut self.store, ())
                .map(|(bytes,)| bytes)
                .map_err(|e| describe_error(&e)),
        )
    }

    /// Call the optional `import-state` with `bytes`. `None` if the plugin has
    /// no state interface; `Some(Err)` with the plugin's message or the trap.
    pub fn import_state(&mut self, bytes: Vec<u8>) -> Option<Result<(), String>> {
        let import = self.state.as_ref()?.import;
        let _call = arm(&mut self.store, self.deadline_ms);
        Some(match import.call(&mut self.store, (bytes,)) {
            Ok((result,)) => result,
            Err(e) => Err(describe_error(&e)),
        })
    }

    /// Replace the instance's backend set and call its `set-backends`.
    ///
    /// # Errors
    /// The trap's description; the instance must then be replaced.
    pub fn set_backends(&mut self, backends: Arc<[Backend]>) -> Result<(), String> {
        let list = backend_list(&backends);
        self.store.data_mut().backends = backends;
        let _call = arm(&mut self.store, self.init_deadline_ms);
        self.bindings
            .set_backends(&mut self.store, list)
            .map_err(|e| describe_error(&e))
    }

    /// Call `select` for `request` and validate the answer against the
    /// current backend set. Returns the request back in every case.
    ///
    /// On `Ok`, a [`Decision`] whose ids are all in range (`Candidates` is
    /// non-empty). On `Err`, why the answer is unusable; after
    /// [`FailureKind::Trap`] or [`FailureKind::Deadline`] the instance must be
    /// replaced.
    pub fn select(
        &mut self,
        request: RequestView,
    ) -> (Result<Decision, (FailureKind, String)>, RequestView) {
        let (result, request) = self.select_boxed(Box::new(request));
        (result, *request)
    }

    /// [`Instance::select`] for a boxed request, which the request path
    /// keeps boxed: a `RequestView` is about 280 bytes, and it goes into
    /// the store and back out on every call.
    pub fn select_boxed(
        &mut self,
        request: Box<RequestView>,
    ) -> (Result<Decision, (FailureKind, String)>, Box<RequestView>) {
        self.store.data_mut().response_headers.clear();
        self.store.data_mut().edits = RequestEdits::default();
        if let Some(reads) = self.store.data_mut().header_reads.as_mut() {
            reads.clear();
        }
        self.store.data_mut().request = Some(request);
        let _call = arm(&mut self.store, self.deadline_ms);
        let result = self.bindings.select(&mut self.store);
        // Only this function fills and empties the slot, so it is always full
        // here; an empty one is reported as a trap rather than a panic.
        let Some(request) = self.store.data_mut().request.take() else {
            let (parts, ()) = http::Request::new(()).into_parts();
            let empty = Box::new(RequestView::new(parts, SocketAddr::from(([0, 0, 0, 0], 0))));
            return (
                Err((
                    FailureKind::Trap,
                    "request slot lost during the call".into(),
                )),
                empty,
            );
        };
        let n = self.store.data().backends.len() as u32;
        let result = match result {
            Ok(decision) => validate(decision, n),
            Err(e) => {
                let kind = match e.downcast_ref::<wasmtime::Trap>() {
                    Some(wasmtime::Trap::Interrupt) => FailureKind::Deadline,
                    _ => FailureKind::Trap,
                };
                Err((kind, describe_error(&e)))
            }
        };
        (result, request)
    }

    /// The names of the request headers the plugin read during the last
    /// [`Instance::select`] (lowercase; empty unless the settings asked to
    /// track them).
    pub fn take_header_reads(&mut self) -> Vec<String> {
        match self.store.data_mut().header_reads.as_mut() {
            Some(reads) => std::mem::take(reads),
            None => Vec::new(),
        }
    }

    /// The headers the plugin added with `response.add-header` during the
    /// last [`Instance::select`] (taken: a second call returns none).
    pub fn take_response_headers(&mut self) -> Vec<(HeaderName, HeaderValue)> {
        let headers = &mut self.store.data_mut().response_headers;
        let list = std::mem::take(&mut headers.list);
        headers.clear();
        list
    }

    /// The request changes the plugin asked for with the `forward`
    /// interface during the last [`Instance::select`] (taken), `None` if
    /// it asked none (always, for a 0.1 plugin).
    pub fn take_edits(&mut self) -> Option<Box<RequestEdits>> {
        let edits = &mut self.store.data_mut().edits;
        if edits.is_empty() {
            return None;
        }
        Some(Box::new(std::mem::take(edits)))
    }
}

pub(super) fn validate(decision: Decision, n: u32) -> Result<Decision, (FailureKind, String)> {
    let bad = |msg: String| Err((FailureKind::BadAnswer, msg));
    match &decision {
        Decision::Backend(id) if *id >= n => {
            bad(format!("answered backend {id}, but the set has {n}"))
        }
        Decision::Candidates(ids) if ids.is_empty() => {
            bad("answered an empty candidate list".into())
        }
        Decision::Candidates(ids) => match ids.iter().find(|&&id| id >= n) {
            Some(id) => bad(format!("answered candidate {id}, but the set has {n}")),
            None => Ok(decision),
        },
        Decision::Respond(reply) => match super::edits::check_reply(reply.status, reply.body.len())
        {
            Ok(_) => Ok(decision),
            Err(msg) => bad(msg),
        },
        _ => Ok(decision),
    }
}
