//! Shadow mode: a candidate plugin decides beside the live one, on the same
//! requests and the same backend state, and its answers are only counted.
//!
//! For each sampled request (`shadow_sample_percent`), once the live plugin
//! has decided, the upstream hands a copy of the request view, the backend
//! set the live plugin decided on and the live choice to the shadow's own
//! thread through a bounded queue ([`QUEUE`]; a full queue drops the sample,
//! counted as `dropped`). The live request waits for none of it: its cost is
//! the copy and a queue push. The thread owns the candidate's instance (its
//! own store, deadline and memory cap), tells it of a new backend set before
//! it decides, and compares: `agree` when both name the same backend (or
//! both none), `differ` otherwise, `error` when the candidate traps, misses
//! its deadline or answers nonsense. After an error the instance is dropped
//! and rebuilt after a backoff (1 s, doubling to 30 s), so a candidate that
//! always fails costs a call per backoff, not one per request.
//!
//! The share of requests each plugin gave each backend is kept per 10 s
//! over the last minute. As in Envoy's request mirroring and GitHub's
//! Scientist library, the candidate's answer is never used; unlike them the
//! candidate sees the very decision input the live plugin saw.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::backend::Backend;
use crate::plugin::{Decision, Instance, InstanceSettings, Plugin, PluginError, RequestView};
use crate::plugin_call::FailureKind;

/// Samples queued for the shadow's thread at most; more are dropped.
pub const QUEUE: usize = 1024;

/// First wait before a failed candidate is instantiated again.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest wait.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Width of one bucket of the share window, in seconds.
const BUCKET_S: u64 = 10;
/// Buckets kept: one minute.
const BUCKETS: usize = 6;

/// One 10 s bucket of the share window: its number, and per backend (or
/// none) the requests the live plugin and the candidate gave it.
type Bucket = (u64, HashMap<Option<SocketAddr>, [u64; 2]>);

/// One sampled request for the shadow's thread.
struct Job {
    view: RequestView,
    backends: Arc<[Backend]>,
    live: Option<SocketAddr>,
}

/// A running shadow plugin of one upstream. Dropping it ends its thread.
pub struct Shadow {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
    sampler: crate::sampling::Sampler,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("plugin", &self.shared.plugin.name())
            .field("sample_percent", &self.sampler.percent())
            .finish_non_exhaustive()
    }
}

/// What the thread and the snapshots share.
struct Shared {
    plugin: Arc<Plugin>,
    config_json: String,
    /// agree, differ, error (Prometheus).
    counters: [Counter; 3],
    agree: AtomicU64,
    differ: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    failures: [AtomicU64; 3],
    shares: Mutex<VecDeque<Bucket>>,
    started: Instant,
}

/// The admin API's view of a shadow plugin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShadowSnapshot {
    /// The candidate's name (built-in or path).
    pub plugin: String,
    /// `sha256:<hex>` of its bytes.
    pub digest: String,
    /// Share of requests it decides, in percent.
    pub sample_percent: u32,
    /// Decisions that named the same backend as the live plugin's.
    pub agree: u64,
    /// Decisions that named another backend (or none where the live
    /// plugin chose one, or one where it chose none).
    pub differ: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Samples dropped because the shadow's queue was full.
    pub dropped: u64,
    /// Failed calls by kind (`trap`, `deadline`, `bad_answer`).
    pub failures: BTreeMap<&'static str, u64>,
    /// Over the last minute: per backend (`none`: no backend), the requests
    /// each plugin gave it and their share in percent.
    pub share_last_minute: Vec<ShareRow>,
}

/// One backend in [`ShadowSnapshot::share_last_minute`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShareRow {
    /// The backend's address, or `none`.
    pub backend: String,
    /// Sampled requests the live plugin gave it.
    pub live: u64,
    /// Sampled requests the candidate would have given it.
    pub shadow: u64,
    /// `live` as a share of the sampled requests, in percent.
    pub live_percent: f64,
    /// `shadow` as a share of the sampled requests, in percent.
    pub shadow_percent: f64,
}

impl Shadow {
    /// Instantiate `plugin` with `settings` (the live plugin's, with the
    /// candidate's config) over `backends`, and start its thread.
    ///
    /// # Errors
    /// [`PluginError`] if the candidate fails to instantiate or initialize.
    pub fn start(
        plugin: Arc<Plugin>,
        settings: InstanceSettings,
        backends: Arc<[Backend]>,
        sample_percent: u32,
        counters: [Counter; 3],
    ) -> Result<Self, PluginError> {
        let instance = plugin.instantiate(&settings, backends.clone())?;
        let shared = Arc::new(Shared {
            plugin,
            config_json: settings.config_json.clone(),
            counters,
            agree: AtomicU64::new(0),
            differ: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failures: Default::default(),
            shares: Mutex::new(VecDeque::new()),
            started: Instant::now(),
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let name = shared.plugin.name().to_string();
        let worker = Worker {
            shared: shared.clone(),
            settings,
            instance: Some(instance),
            backends,
            retry_at: None,
            backoff: BACKOFF_MIN,
        };
        std::thread::Builder::new()
            .name("wasmlb-shadow".into())
            .spawn(move || worker.run(&rx))
            .map_err(|e| PluginError::Init {
                plugin: name,
                stage: "shadow thread",
                message: e.to_string(),
            })?;
        Ok(Self {
            tx,
            shared,
            sampler: crate::sampling::Sampler::new(sample_percent),
        })
    }

    /// The candidate.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.shared.plugin
    }

    /// The candidate's config, as JSON.
    pub fn config_json(&self) -> &str {
        &self.shared.config_json
    }

    /// Share of requests it decides, in percent.
    pub fn sample_percent(&self) -> u32 {
        self.sampler.percent()
    }

    /// Whether this request is sampled (`sample_percent` of them).
    pub fn sampled(&self) -> bool {
        self.sampler.sample()
    }

    /// Queue one decision: `view` (a copy), the `backends` the live plugin
    /// decided on, and its choice. Never blocks; a full queue drops it.
    pub fn offer(&self, view: RequestView, backends: Arc<[Backend]>, live: Option<SocketAddr>) {
        let job = Job {
            view,
            backends,
            live,
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(job) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Its counters and the last minute's shares.
    pub fn snapshot(&self) -> ShadowSnapshot {
        let s = &self.shared;
        let mut totals: BTreeMap<Option<SocketAddr>, [u64; 2]> = BTreeMap::new();
        let now = bucket(s.started);
        for (b, counts) in s
            .shares
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            if now.saturating_sub(*b) < BUCKETS as u64 {
                for (address, [live, shadow]) in counts {
                    let t = totals.entry(*address).or_default();
                    t[0] += live;
                    t[1] += shadow;
                }
            }
        }
        let sampled = totals.values().map(|t| t[0]).sum::<u64>().max(1) as f64;
        let share_last_minute = totals
            .into_iter()
            .map(|(address, [live, shadow])| ShareRow {
                backend: address.map_or_else(|| "none".to_string(), |a| a.to_string()),
                live,
                shadow,
                live_percent: live as f64 * 100.0 / sampled,
                shadow_percent: shadow as f64 * 100.0 / sampled,
            })
            .collect();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ShadowSnapshot {
            plugin: s.plugin.name().to_string(),
            digest: s.plugin.digest().to_string(),
            sample_percent: self.sampler.percent(),
            agree: load(&s.agree),
            differ: load(&s.differ),
            errors: load(&s.errors),
            dropped: load(&s.dropped),
            failures: [
                FailureKind::Trap,
                FailureKind::Deadline,
                FailureKind::BadAnswer,
            ]
            .into_iter()
            .map(|k| (k.as_str(), load(&s.failures[failure_index(k)])))
            .collect(),
            share_last_minute,
        }
    }
}

fn failure_index(kind: FailureKind) -> usize {
    match kind {
        FailureKind::Trap => 0,
        FailureKind::Deadline => 1,
        FailureKind::BadAnswer => 2,
    }
}

/// The 10 s bucket `started.elapsed()` falls in.
fn bucket(started: Instant) -> u64 {
    started.elapsed().as_secs() / BUCKET_S
}

/// The shadow's thread: owns the candidate's instance.
struct Worker {
    shared: Arc<Shared>,
    settings: InstanceSettings,
    instance: Option<Instance>,
    backends: Arc<[Backend]>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Worker {
    fn run(mut self, rx: &Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            self.decide(job);
        }
    }

    fn decide(&mut self, job: Job) {
        if self.instance.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return;
            }
            match self
                .shared
                .plugin
                .instantiate(&self.settings, job.backends.clone())
            {
                Ok(i) => {
                    self.instance = Some(i);
                    self.backends = job.backends.clone();
                }
                Err(e) => {
                    tracing::warn!(upstream = &*self.settings.upstream, "shadow plugin: {e}");
                    self.failed(FailureKind::Trap);
                    return;
                }
            }
        }
        let Some(instance) = self.instance.as_mut() else {
            return;
        };
        if !Arc::ptr_eq(&self.backends, &job.backends) {
            if let Err(e) = instance.set_backends(job.backends.clone()) {
                tracing::warn!(
                    upstream = &*self.settings.upstream,
                    "shadow plugin: set-backends: {e}"
                );
                self.failed(FailureKind::Trap);
                return;
            }
            self.backends = job.backends.clone();
        }
        let (result, _view) = instance.select(job.view);
        let _ = instance.take_response_headers();
        let _ = instance.take_edits();
        let chosen = match result {
            Ok(Decision::Backend(id)) => job.backends.get(id as usize).map(|b| b.address),
            Ok(Decision::Candidates(ids)) => ids
                .first()
                .and_then(|&id| job.backends.get(id as usize))
                .map(|b| b.address),
            // An answer of its own: no backend, compared as such.
            Ok(Decision::Unavailable | Decision::Respond(_)) => None,
            Err((kind, message)) => {
                tracing::debug!(
                    upstream = &*self.settings.upstream,
                    "shadow plugin failed: {message}"
                );
                self.failed(kind);
                return;
            }
        };
        self.backoff = BACKOFF_MIN;
        let s = &self.shared;
        if chosen == job.live {
            s.agree.fetch_add(1, Ordering::Relaxed);
            s.counters[0].inc();
        } else {
            s.differ.fetch_add(1, Ordering::Relaxed);
            s.counters[1].inc();
        }
        let now = bucket(s.started);
        let mut shares = s.shares.lock().unwrap_or_else(PoisonError::into_inner);
        if shares.back().is_none_or(|(b, _)| *b != now) {
            shares.push_back((now, HashMap::new()));
            while shares.len() > BUCKETS {
                shares.pop_front();
            }
        }
        if let Some((_, counts)) = shares.back_mut() {
            counts.entry(job.live).or_default()[0] += 1;
            counts.entry(chosen).or_default()[1] += 1;
        }
    }

    /// Count a failure, drop the instance, and back off.
    fn failed(&mut self, kind: FailureKind) {
        let s = &self.shared;
        s.errors.fetch_add(1, Ordering::Relaxed);
        s.failures[failure_index(kind)].fetch_add(1, Ordering::Relaxed);
        s.counters[2].inc();
        self.instance = None;
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}
