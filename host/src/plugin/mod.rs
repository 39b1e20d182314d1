//! The plugin runtime: one wasmtime [`Engine`], components compiled once,
//! long-lived instances called synchronously under an epoch deadline and a
//! memory cap.
//!
//! Follows wasmtime's `wasi-http` host: bindings generated in a private module,
//! an [`InstancePre`](wasmtime::component::InstancePre) per component so
//! (re)instantiation does no linking, and `Config::epoch_interruption` with a
//! ticker thread advancing the epoch every [`EPOCH_TICK`]. Per
//! `shared/PERF-NOTES.md`: `concurrency_support(false)` and synchronous calls
//! (about 350 ns cheaper per call than the defaults), the backend list is
//! lowered only on change, and request fields are read through host calls on
//! demand rather than copied in.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store, StoreLimitsBuilder, UpdateDeadline};

use crate::backend::Backend;
use crate::builtin;
use crate::config::PluginRef;
pub use crate::plugin_call::FailureKind;

mod cache;
pub mod edits;
mod host;
mod host_v0_1;
mod instance;

use crate::plugin_call::{CallDeadline, Verdict};
use cache::ComponentCache;
pub use edits::{
    MAX_REPLY_BODY_BYTES, MAX_RESPONSE_HEADER_BYTES, MAX_RESPONSE_HEADERS, Reply, RequestEdits,
    ResponseHeaders,
};
use host::arm;
pub use host::{HostState, monotonic_ns};
#[cfg(test)]
use instance::validate;
use instance::{Bindings, backend_list, describe_error, state_funcs};
pub use instance::{Instance, RequestView};

/// The current contract, `wasmlb:plugin@0.2.0` (`wit/plugin.wit`).
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "balancer",
    });
}

/// The 0.1 contract, `wasmlb:plugin@0.1.1` (`wit/v0.1/plugin.wit`, frozen),
/// which 0.1.0 and 0.1.1 components are linked against.
pub(crate) mod bindings_v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1",
        world: "balancer",
    });
}

pub use bindings::wasmlb::plugin::types::Decision;

/// How often the epoch advances while a plugin call is in progress;
/// deadlines are whole ticks (ms).
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How often the epoch advances while no plugin call is in progress. Calls
/// last about a microsecond, so under load the ticker almost always finds
/// none in progress and wakes 100 times a second rather than 1,000 (each
/// wake-up preempts a worker: about 1.5 µs of CPU per request at 20k
/// requests/s on a 2-core VM, measured with /proc/PID/task/*/schedstat). The
/// cost: a call that starts just after a tick runs up to this much longer
/// before its deadline is first looked at.
pub const EPOCH_IDLE_TICK: Duration = Duration::from_millis(10);

/// Plugin calls in progress, over every instance (see [`EPOCH_IDLE_TICK`]).
static CALLS_IN_PROGRESS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The WIT package plugins may import from, and the interfaces in it.
const ALLOWED_PACKAGE: &str = "wasmlb:plugin";
const ALLOWED_INTERFACES: &[&str] = &[
    "types",
    "log",
    "clock",
    "backend-state",
    "request",
    "response",
    "forward",
];
/// Log messages from plugins are truncated to this many bytes.
const MAX_LOG_BYTES: usize = 4096;

/// Errors loading or initializing a plugin. Every variant names the plugin
/// (built-in name or file path).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file could not be read.
    #[error("plugin {plugin}: cannot read: {message}")]
    Read {
        /// The plugin.
        plugin: String,
        /// The I/O error.
        message: String,
    },
    /// The bytes are not a valid WebAssembly component.
    #[error("plugin {plugin}: not a valid WebAssembly component: {message}")]
    Compile {
        /// The plugin.
        plugin: String,
        /// wasmtime's reason.
        message: String,
    },
    /// The component imports something outside `wasmlb:plugin`.
    #[error(
        "plugin {plugin}: imports {}, which wasmlb does not provide \
         (plugins may import only wasmlb:plugin/{{log,clock,backend-state,request,response,forward}}; \
         build with the wasmlb SDK, which is no_std)",
        imports.iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
    )]
    ForbiddenImport {
        /// The plugin.
        plugin: String,
        /// Every offending import, e.g. `wasi:filesystem/preopens@0.2.6`.
        imports: Vec<String>,
    },
    /// The component does not match the `balancer` world of 0.1 or 0.2
    /// (missing export, wrong signature, unknown version).
    #[error("plugin {plugin}: does not implement wasmlb:plugin/balancer@0.1 or @0.2: {message}")]
    Link {
        /// The plugin.
        plugin: String,
        /// wasmtime's reason, naming the export or import.
        message: String,
    },
    /// `init` returned an error, or a call trapped while the instance was
    /// being set up.
    #[error("plugin {plugin}: {stage} failed: {message}")]
    Init {
        /// The plugin.
        plugin: String,
        /// `init`, `set-backends` or `instantiate`.
        stage: &'static str,
        /// The plugin's message or the trap.
        message: String,
    },
    /// The engine could not be created.
    #[error("plugin runtime: {0}")]
    Engine(String),
    /// The on-disk compilation cache could not be set up.
    #[error("plugin cache directory {}: {message}", dir.display())]
    DiskCache {
        /// The directory.
        dir: std::path::PathBuf,
        /// wasmtime's reason (not absolute, cannot be created).
        message: String,
    },
}

/// What [`Runtime::disk_cache`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCacheCounts {
    /// The cache's folder (canonical).
    pub dir: std::path::PathBuf,
    /// Components read from the folder instead of compiled.
    pub hits: usize,
    /// Components compiled and written to the folder.
    pub misses: usize,
}

/// The process's plugin runtime: the engine, the linker holding the host
/// functions, and the epoch ticker. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    /// Compiled components by sha256 of their bytes: loading known bytes again
    /// (a swap back, a reload) skips compilation. In memory, because
    /// `Component::deserialize` is `unsafe` and the host forbids unsafe code.
    cache: Arc<Mutex<ComponentCache>>,
    /// wasmtime's compilation cache on disk, if one is configured (its
    /// counters are shared with the engine's copy).
    disk_cache: Option<wasmtime::Cache>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Create the engine and start the epoch ticker thread (it stops when the
    /// last clone of the engine is dropped). Compiled components are kept in
    /// memory only; [`Runtime::with_disk_cache`] also keeps them on disk.
    ///
    /// # Errors
    /// [`PluginError::Engine`] if wasmtime rejects the configuration.
    pub fn new() -> Result<Self, PluginError> {
        Self::with_disk_cache(None)
    }

    /// As [`Runtime::new`], and with `dir` (an absolute path) also keep every
    /// compiled component on disk there, so that a later process loading the
    /// same bytes with the same wasmtime build skips compilation. This is
    /// wasmtime's own compilation cache, as the `wasmtime` CLI and Spin use
    /// it: entries are keyed by the sha256 of the component bytes, the
    /// wasmtime version and the compiler settings; zstd-compressed; written
    /// atomically (a temporary file, then a rename), so processes may share
    /// the directory; and trimmed to 512 MiB and 65,536 files (least
    /// recently used first, at most hourly) by a low-priority worker thread.
    /// A miss is compressed and written by the loading thread; entries are
    /// never recompressed. A process that starts from it never runs
    /// the compiler, which keeps cranelift's code and its working memory out
    /// of the process (about 4 MiB of resident memory). A cache entry is
    /// native code: `dir` must be writable only by the user wasmlb runs as.
    ///
    /// # Errors
    /// [`PluginError::Engine`] if wasmtime rejects the configuration, or
    /// [`PluginError::DiskCache`] if `dir` is relative or cannot be created.
    pub fn with_disk_cache(dir: Option<&std::path::Path>) -> Result<Self, PluginError> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.concurrency_support(false);
        config.max_wasm_stack(512 * 1024);
        let disk_cache = match dir {
            Some(dir) => {
                let mut cache = wasmtime::CacheConfig::new();
                // Never recompress an entry at zstd level 20 (wasmtime does
                // after 256 reads): that would run in the serving process.
                cache
                    .with_directory(dir)
                    .with_optimized_compression_usage_counter_threshold(u64::MAX);
                Some(
                    wasmtime::Cache::new(cache).map_err(|e| PluginError::DiskCache {
                        dir: dir.to_path_buf(),
                        message: format!("{e:#}"),
                    })?,
                )
            }
            None => None,
        };
        config.cache(disk_cache.clone());
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        bindings::Balancer::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        bindings_v0_1::Balancer::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasmlb-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    let busy = CALLS_IN_PROGRESS.load(std::sync::atomic::Ordering::Relaxed) > 0;
                    std::thread::sleep(if busy { EPOCH_TICK } else { EPOCH_IDLE_TICK });
                }
            })
            .map_err(|e| PluginError::Engine(format!("spawning the epoch ticker: {e}")))?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            cache: Arc::new(Mutex::new(ComponentCache {
                max_entries: crate::config::DEFAULT_PLUGIN_CACHE_ENTRIES,
                max_bytes: crate::config::DEFAULT_PLUGIN_CACHE_MIB << 20,
                ..ComponentCache::default()
            })),
            disk_cache,
        })
    }

    /// The disk cache's folder and its counts since start: components read
    /// from it (hits) and compiled and written to it (misses). `None`
    /// without a disk cache.
    pub fn disk_cache(&self) -> Option<DiskCacheCounts> {
        self.disk_cache.as_ref().map(|c| DiskCacheCounts {
            dir: c.directory().clone(),
            hits: c.cache_hits(),
            misses: c.cache_misses(),
        })
    }

    /// Bound the compiled-component cache to `max_entries` components and
    /// `max_bytes` of compiled code (least recently used released first),
    /// reporting its size to `metrics`.
    pub fn set_cache_limits(
        &self,
        max_entries: usize,
        max_bytes: usize,
        metrics: crate::metrics::ResourceMetrics,
    ) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.max_entries = max_entries.max(1);
        cache.max_bytes = max_bytes;
        cache.metrics = Some(metrics);
        cache.evict();
    }

    /// Compiled components in the cache, and their compiled code in bytes.
    pub fn cache_size(&self) -> (usize, usize) {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        (cache.entries.len(), cache.bytes)
    }

    /// Load and compile a plugin, check its imports and link it.
    ///
    /// # Errors
    /// [`PluginError::Read`], [`PluginError::Compile`],
    /// [`PluginError::ForbiddenImport`] (naming every import outside
    /// `wasmlb:plugin`) or [`PluginError::Link`].
    pub fn load(&self, source: &PluginRef) -> Result<Arc<Plugin>, PluginError> {
        let name = source.to_string();
        let bytes: std::borrow::Cow<'static, [u8]> = match source {
            PluginRef::Builtin(n) => builtin::get(n)
                .ok_or_else(|| PluginError::Read {
                    plugin: name.clone(),
                    message: "no such built-in".into(),
                })?
                .into(),
            PluginRef::File { path, .. } => crate::config::read_plugin_file(path)
                .map_err(|message| PluginError::Read {
                    plugin: name.clone(),
                    message,
                })?
                .into(),
        };
        self.load_bytes(&name, &bytes)
    }

    /// As [`Runtime::load`], from component bytes; `name` is used in messages.
    ///
    /// # Errors
    /// As [`Runtime::load`], without `Read`.
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        let digest = digest(bytes);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&digest);
        let from_cache = cached.is_some();
        let component = match cached {
            Some(c) => c,
            None => Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
                plugin: name.to_string(),
                message: if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
                    // A core module (version 1), not a component layer.
                    "this is a core WebAssembly module, not a component: build for \
                     wasm32-wasip2 with the wasmlb SDK (`cargo build --release --target \
                     wasm32-wasip2`), which makes a component"
                        .to_string()
                } else {
                    format!("{e:#}")
                },
            })?,
        };
        let forbidden: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .map(|(import, _)| import)
            .filter(|import| !import_allowed(import))
            .map(str::to_string)
            .collect();
        if !forbidden.is_empty() {
            return Err(PluginError::ForbiddenImport {
                plugin: name.to_string(),
                imports: forbidden,
            });
        }
        let link_err = |e: wasmtime::Error| PluginError::Link {
            plugin: name.to_string(),
            message: format!("{e:#}"),
        };
        let linked = self.linker.instantiate_pre(&component).map_err(link_err)?;
        let pre = match contract_version(&self.engine, &component) {
            Some(Contract::V0_1) => {
                Pre::V0_1(bindings_v0_1::BalancerPre::new(linked).map_err(link_err)?)
            }
            Some(Contract::V0_2) => {
                Pre::V0_2(bindings::BalancerPre::new(linked).map_err(link_err)?)
            }
            None => {
                return Err(PluginError::Link {
                    plugin: name.to_string(),
                    message: "it exports no wasmlb:plugin/strategy@0.1.x or @0.2.x".into(),
                });
            }
        };
        if !from_cache {
            self.cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(digest.clone(), component);
        }
        Ok(Arc::new(Plugin {
            name: name.to_string(),
            digest,
            from_cache,
            engine: self.engine.clone(),
            pre,
        }))
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in hash {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The contract a component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `wasmlb:plugin@0.1.0` or `@0.1.1`.
    V0_1,
    /// `wasmlb:plugin@0.2.x`.
    V0_2,
}

/// The contract of `component`, from the version of its
/// `wasmlb:plugin/strategy` export; `None` without one.
fn contract_version(engine: &Engine, component: &Component) -> Option<Contract> {
    component
        .component_type()
        .exports(engine)
        .find_map(|(name, _)| {
            let version = name.strip_prefix("wasmlb:plugin/strategy@")?;
            if version.starts_with("0.1.") {
                Some(Contract::V0_1)
            } else if version.starts_with("0.2.") {
                Some(Contract::V0_2)
            } else {
                None
            }
        })
}

/// The linked component, for the contract it was built against.
enum Pre {
    V0_1(bindings_v0_1::BalancerPre<HostState>),
    V0_2(bindings::BalancerPre<HostState>),
}

/// `wasmlb:plugin/<interface>@0.1.x` or `@0.2.x` for a known interface
/// (`forward` exists only in 0.2; linking refuses it in a 0.1 component).
fn import_allowed(import: &str) -> bool {
    let Some((path, version)) = import.split_once('@') else {
        return false;
    };
    let Some((package, interface)) = path.split_once('/') else {
        return false;
    };
    package == ALLOWED_PACKAGE
        && ALLOWED_INTERFACES.contains(&interface)
        && (version.starts_with("0.1.") || version.starts_with("0.2."))
}

/// A compiled, linked plugin component; instantiated once per upstream (and
/// again after a failure).
pub struct Plugin {
    name: String,
    digest: String,
    from_cache: bool,
    engine: Engine,
    pre: Pre,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Per-instance settings, from the upstream's config.
#[derive(Debug, Clone)]
pub struct InstanceSettings {
    /// The upstream's name, attached to the plugin's log records.
    pub upstream: Arc<str>,
    /// `plugin_config` as a JSON object, handed to `init`.
    pub config_json: String,
    /// Deadline of each call, in ms.
    pub deadline_ms: u64,
    /// Deadline of setup calls (instantiation, `init`, `set-backends`), in ms.
    pub init_deadline_ms: u64,
    /// Cap on linear memory, in bytes.
    pub memory_limit_bytes: usize,
    /// The rate limit of the plugin's log lines (shared by its instances,
    /// so a plugin logging on every request writes a few lines a second).
    pub log_limit: Arc<crate::log_limit::LogLimiter>,
    /// Note the names of the request headers the plugin reads in each
    /// `select` ([`Instance::take_header_reads`]), for a trace recorder.
    pub track_header_reads: bool,
}

impl Plugin {
    /// The plugin's name: its built-in name or file path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `sha256:<hex>` of the component bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The contract the component was built against.
    pub fn contract(&self) -> Contract {
        match self.pre {
            Pre::V0_1(_) => Contract::V0_1,
            Pre::V0_2(_) => Contract::V0_2,
        }
    }

    /// True if the compiled component came from the runtime's digest cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// Instantiate, call `init(config)` and `set-backends(backends)`, each
    /// under the deadline.
    ///
    /// # Errors
    /// [`PluginError::Init`] with the stage and the plugin's message or trap.
    pub fn instantiate(
        &self,
        settings: &InstanceSettings,
        backends: Arc<[Backend]>,
    ) -> Result<Instance, PluginError> {
        let init_err = |stage, e: wasmtime::Error| PluginError::Init {
            plugin: self.name.clone(),
            stage,
            message: describe_error(&e),
        };
        let state = HostState {
            limits: StoreLimitsBuilder::new()
                .memory_size(settings.memory_limit_bytes)
                .instances(16)
                .build(),
            upstream: settings.upstream.clone(),
            log_limit: settings.log_limit.clone(),
            backends,
            request: None,
            response_headers: ResponseHeaders::default(),
            edits: RequestEdits::default(),
            header_reads: settings.track_header_reads.then(Vec::new),
            deadline: CallDeadline::default(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|mut ctx| {
            let now = Instant::now();
            let cpu = crate::plugin_call::thread_cpu_time();
            Ok(match ctx.data_mut().deadline.check(now, cpu) {
                Verdict::Continue(ticks) => UpdateDeadline::Continue(ticks),
                Verdict::Expire => UpdateDeadline::Interrupt,
            })
        });
        let (deadline_ms, init_deadline_ms) = (settings.deadline_ms, settings.init_deadline_ms);
        let _call = arm(&mut store, init_deadline_ms);
        let linked = match &self.pre {
            Pre::V0_1(pre) => pre.instance_pre(),
            Pre::V0_2(pre) => pre.instance_pre(),
        };
        let instance = linked
            .instantiate(&mut store)
            .map_err(|e| init_err("instantiate", e))?;
        let bindings = match &self.pre {
            Pre::V0_1(_) => bindings_v0_1::Balancer::new(&mut store, &instance).map(Bindings::V0_1),
            Pre::V0_2(_) => bindings::Balancer::new(&mut store, &instance).map(Bindings::V0_2),
        }
        .map_err(|e| init_err("instantiate", e))?;
        let state = state_funcs(&mut store, &instance);
        let _call = arm(&mut store, init_deadline_ms);
        bindings
            .init(&mut store, &settings.config_json)
            .map_err(|e| init_err("init", e))?
            .map_err(|message| PluginError::Init {
                plugin: self.name.clone(),
                stage: "init",
                message,
            })?;
        let list = backend_list(&store.data().backends);
        let _call = arm(&mut store, init_deadline_ms);
        bindings
            .set_backends(&mut store, list)
            .map_err(|e| init_err("set-backends", e))?;
        Ok(Instance {
            store,
            bindings,
            state,
            deadline_ms,
            init_deadline_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn only_wasmlb_plugin_imports_are_allowed() {
        assert!(import_allowed("wasmlb:plugin/log@0.1.0"));
        assert!(import_allowed("wasmlb:plugin/backend-state@0.1.3"));
        assert!(import_allowed("wasmlb:plugin/log@0.2.0"));
        assert!(import_allowed("wasmlb:plugin/forward@0.2.0"));
        assert!(!import_allowed("wasmlb:plugin/log@0.3.0"));
        assert!(!import_allowed("wasmlb:plugin/log@1.0.0"));
        assert!(!import_allowed("wasmlb:plugin/secrets@0.1.0"));
        assert!(!import_allowed("wasi:filesystem/preopens@0.2.6"));
        assert!(!import_allowed("wasmlb:plugin/log"));
        assert!(import_allowed("wasmlb:plugin/response@0.1.0"));
    }

    #[test]
    fn the_component_cache_keeps_the_most_recently_used_within_its_bounds() {
        let runtime = Runtime::new().unwrap();
        let metrics = crate::metrics::ResourceMetrics::default();
        runtime.set_cache_limits(2, usize::MAX, metrics.clone());
        let load = |name: &str| runtime.load(&PluginRef::Builtin(name.into())).unwrap();
        assert!(!load("round-robin").from_cache());
        assert!(!load("random").from_cache());
        assert!(load("round-robin").from_cache()); // now the most recent
        assert!(!load("least-connections").from_cache()); // evicts random
        assert_eq!(runtime.cache_size().0, 2);
        assert_eq!(metrics.plugin_cache_entries.get(), 2);
        assert!(load("round-robin").from_cache());
        assert!(!load("random").from_cache(), "random was evicted");
        // A byte bound below one component keeps only the newest.
        runtime.set_cache_limits(16, 1, metrics.clone());
        assert_eq!(runtime.cache_size().0, 1);
        let (_, bytes) = runtime.cache_size();
        assert!(bytes > 0);
        assert_eq!(metrics.plugin_cache_bytes.get(), bytes as i64);
    }

    #[test]
    fn a_second_runtime_on_the_same_disk_cache_reads_instead_of_compiling() {
        let dir = tempfile::tempdir().unwrap();
        let rr = PluginRef::Builtin("round-robin".into());
        let first = Runtime::with_disk_cache(Some(dir.path())).unwrap();
        first.load(&rr).unwrap();
        let counts = first.disk_cache().unwrap();
        assert_eq!((counts.hits, counts.misses), (0, 1));
        assert_eq!(counts.dir, dir.path().canonicalize().unwrap());
        let files = walk_files(dir.path());
        assert!(!files.is_empty(), "nothing written to {:?}", dir.path());
        drop(first);

        // A new process, as far as wasmtime can tell: a new engine.
        let second = Runtime::with_disk_cache(Some(dir.path())).unwrap();
        let plugin = second.load(&rr).unwrap();
        assert!(!plugin.from_cache(), "not the in-memory cache");
        let counts = second.disk_cache().unwrap();
        assert_eq!((counts.hits, counts.misses), (1, 0));
        // (That the component read back decides as a compiled one does is
        // `upstream::tests::a_plugin_read_from_the_disk_cache_decides_...`.)

        // A different component is a miss on the same folder.
        let random = second.load(&PluginRef::Builtin("random".into())).unwrap();
        assert!(!random.from_cache());
        assert_eq!(second.disk_cache().unwrap().misses, 1);

        // A corrupted entry is compiled again, not trusted.
        for f in walk_files(dir.path()) {
            std::fs::write(&f, b"not a cache entry").unwrap();
        }
        let third = Runtime::with_disk_cache(Some(dir.path())).unwrap();
        third.load(&rr).unwrap();
        let counts = third.disk_cache().unwrap();
        assert_eq!((counts.hits, counts.misses), (0, 1));
    }

    #[test]
    fn a_disk_cache_folder_that_cannot_be_made_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        let e = Runtime::with_disk_cache(Some(&file.join("cache"))).unwrap_err();
        assert!(matches!(e, PluginError::DiskCache { .. }), "{e}");
        assert!(e.to_string().contains("a-file"), "{e}");
        let e = Runtime::with_disk_cache(Some(std::path::Path::new("relative/dir"))).unwrap_err();
        assert!(e.to_string().contains("relative/dir"), "{e}");
        assert!(Runtime::new().unwrap().disk_cache().is_none());
    }

    fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walk_files(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    fn host_state(during_select: bool) -> HostState {
        let (parts, ()) = http::Request::new(()).into_parts();
        HostState {
            limits: StoreLimitsBuilder::new().build(),
            upstream: Arc::from("app"),
            log_limit: Arc::default(),
            backends: Arc::from(Vec::new()),
            request: during_select.then(|| {
                Box::new(RequestView::new(
                    parts,
                    SocketAddr::from(([192, 0, 2, 1], 1)),
                ))
            }),
            response_headers: ResponseHeaders::default(),
            edits: RequestEdits::default(),
            header_reads: None,
            deadline: CallDeadline::default(),
        }
    }

    #[test]
    fn add_header_keeps_valid_headers_and_refuses_the_rest() {
        use bindings::wasmlb::plugin::response::Host as _;
        let mut s = host_state(true);
        s.add_header("set-cookie".into(), "a=1; Path=/".into());
        s.add_header("set-cookie".into(), "b=2".into());
        s.add_header("bad name".into(), "x".into());
        s.add_header("x-ok".into(), "line\nbreak".into());
        s.add_header("connection".into(), "close".into());
        s.add_header("content-length".into(), "0".into());
        s.add_header("Transfer-Encoding".into(), "chunked".into());
        let kept: Vec<_> = s
            .response_headers
            .list
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(kept, ["set-cookie: a=1; Path=/", "set-cookie: b=2"]);
        // Caps: 16 headers, 8 KiB.
        for i in 0..20 {
            s.add_header(format!("x-{i}"), "v".into());
        }
        assert_eq!(s.response_headers.list.len(), MAX_RESPONSE_HEADERS);
        let mut big = host_state(true);
        big.add_header("x-big".into(), "v".repeat(MAX_RESPONSE_HEADER_BYTES));
        assert!(big.response_headers.list.is_empty());
        // Outside select: ignored.
        let mut idle = host_state(false);
        idle.add_header("x-a".into(), "1".into());
        assert!(idle.response_headers.list.is_empty());
    }

    #[test]
    fn answers_are_validated_against_the_set() {
        assert!(validate(Decision::Backend(2), 3).is_ok());
        assert_eq!(
            validate(Decision::Backend(3), 3).unwrap_err().0,
            FailureKind::BadAnswer
        );
        assert_eq!(
            validate(Decision::Candidates(vec![]), 3).unwrap_err().0,
            FailureKind::BadAnswer
        );
        assert_eq!(
            validate(Decision::Candidates(vec![0, 7]), 3).unwrap_err().0,
            FailureKind::BadAnswer
        );
        assert!(validate(Decision::Candidates(vec![2, 0]), 3).is_ok());
        assert!(validate(Decision::Unavailable, 0).is_ok());
    }

    #[test]
    fn builtins_load_and_garbage_is_rejected() {
        let rt = Runtime::new().unwrap();
        for (name, _) in builtin::PLUGINS {
            rt.load(&PluginRef::Builtin((*name).into())).unwrap();
        }
        let e = rt
            .load_bytes("junk.wasm", b"not wasm")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("plugin junk.wasm: not a valid WebAssembly component"),
            "{e}"
        );
    }
}
