//! The instance's side of a fleet: register under a lease, follow the
//! assignments, swap plugins in, watch each swap and roll it back by
//! itself when its plugin fails (see the module docs of [`super`]).
//!
//! One task per instance. Each etcd session grants a lease of
//! `lease_ttl_ms` (kept alive every third of it), reads every assignment,
//! then watches them; the instance's status is put under the lease every
//! second when it changed. Every second it also reconciles each upstream
//! with its assignment, so a reload (which restores the configured plugins)
//! is followed by the fleet's plugin again. When etcd fails, the instance
//! keeps running what it runs and starts a new session after a backoff
//! (250 ms doubling to 5 s). At shutdown it revokes its lease, so it leaves
//! the status at once.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Assignment, InstanceStatus, Keys, RolledBack, Target, UpstreamStatus};
use crate::config::FleetConfig;
use crate::control::{Control, PluginSource};
use crate::etcd::{EtcdError, connect, read_and_watch};
use crate::plugin::Plugin;
use crate::upstream::Upstream;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the rollback windows are checked.
const TICK: Duration = Duration::from_millis(250);
/// How often the upstreams are reconciled and the status put (if changed).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// A running fleet agent; [`AgentHandle::stop`] revokes its registration.
#[derive(Debug)]
pub struct AgentHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// This instance's name in the fleet.
    pub instance: String,
}

impl AgentHandle {
    /// Stop the agent and revoke its lease (waits at most 2 s).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// This instance's name: `fleet.instance`, else the host name and
/// `port` (the first listener's), `host:port`.
pub fn instance_name(fleet: &FleetConfig, port: u16) -> String {
    if let Some(name) = &fleet.instance {
        return name.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().replace('/', "_"))
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wasmlb".to_string());
    format!("{host}:{port}")
}

/// Start the agent of `control`'s server as `instance`. Must run inside a
/// tokio runtime.
pub fn start(control: Control, fleet: FleetConfig, instance: String) -> AgentHandle {
    let (stop, stopped) = watch::channel(false);
    let agent = Agent {
        keys: Keys::new(&fleet.prefix),
        control,
        fleet,
        instance: instance.clone(),
        assignments: BTreeMap::new(),
        states: BTreeMap::new(),
    };
    let task = tokio::spawn(agent.run(stopped));
    AgentHandle {
        stop,
        task,
        instance,
    }
}

struct Agent {
    control: Control,
    fleet: FleetConfig,
    keys: Keys,
    instance: String,
    assignments: BTreeMap<String, Assignment>,
    states: BTreeMap<String, State>,
}

/// A publication: what to run and when it was published.
type Applied = (Target, u64);

/// The fleet's hold on one upstream.
#[derive(Default)]
struct State {
    /// What the fleet swapped in (`None`: the configured plugin).
    applied: Option<Applied>,
    /// What ran before the last fleet swap, to swap back to.
    before: Option<Before>,
    /// The rollback window of the last fleet swap.
    window: Option<Window>,
    /// Publications rolled back here: never applied again.
    refused: HashSet<(String, u64)>,
    rolled_back: Option<RolledBack>,
    /// A publication that could not be applied, and why (not retried until
    /// the assignment changes).
    error: Option<(Applied, String)>,
}

struct Before {
    plugin: Arc<Plugin>,
    config_json: String,
    applied: Option<Applied>,
}

struct Window {
    upstream: Weak<Upstream>,
    started: Instant,
    calls: u64,
    failures: u64,
    skipped: u64,
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

impl Agent {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        let mut failing: Option<String> = None;
        loop {
            match self.session(&mut stop).await {
                Ok(()) => return,
                Err(e) => {
                    if failing.as_deref() != Some(e.message.as_str()) {
                        tracing::warn!(
                            instance = %self.instance,
                            "fleet: {e}; running plugins stay, retrying"
                        );
                        failing = Some(e.message.clone());
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One etcd session; `Ok` when stopped.
    async fn session(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), EtcdError> {
        let endpoints = self.fleet.endpoints.clone();
        let fail = |e: etcd_client::Error| EtcdError::new(&endpoints, e);
        let mut c = connect(&endpoints).await?;
        let ttl_s = i64::try_from(self.fleet.lease_ttl_ms.div_ceil(1000)).unwrap_or(10);
        let lease = c.lease_grant(ttl_s, None).await.map_err(fail)?.id();
        // The lease is kept alive by its own task, so a slow swap (a large
        // plugin compiling) never lets the registration lapse.
        let mut keeping = AbortOnDrop(tokio::spawn(keep_alive(
            c.clone(),
            lease,
            Duration::from_millis(self.fleet.lease_ttl_ms / 3),
            endpoints.clone(),
        )));
        let (kvs, mut stream) =
            read_and_watch(&mut c, &endpoints, &self.keys.assignments()).await?;
        self.assignments.clear();
        for (key, value) in &kvs {
            self.on_put(key, value);
        }
        tracing::info!(instance = %self.instance, lease, "fleet: registered");
        // Registered at once, then brought in line with the assignments.
        let mut last_status: Option<InstanceStatus> = None;
        self.put_status(&mut c, lease, &mut last_status).await?;
        self.reconcile(&c).await;
        self.put_status(&mut c, lease, &mut last_status).await?;
        let mut reported = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(lease)).await;
                    tracing::info!(instance = %self.instance, "fleet: left (lease revoked)");
                    return Ok(());
                }
                kept = &mut keeping.0 => {
                    return Err(kept.unwrap_or_else(|e| Err(EtcdError::new(&endpoints, e))).err()
                        .unwrap_or_else(|| EtcdError::new(&endpoints, "the lease keeper ended")));
                }
                m = stream.message() => {
                    let Some(response) = m.map_err(fail)? else {
                        return Err(EtcdError::new(&endpoints, "the watch stream ended"));
                    };
                    if response.canceled() {
                        return Err(EtcdError::new(&endpoints, format!("the watch was cancelled ({})", response.cancel_reason())));
                    }
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        match event.event_type() {
                            EventType::Put => self.on_put(kv.key(), kv.value()),
                            EventType::Delete => {
                                let key = String::from_utf8_lossy(kv.key());
                                if let Some(name) = key.strip_prefix(&self.keys.assignments()) {
                                    self.assignments.remove(name);
                                }
                            }
                        }
                    }
                    self.reconcile(&c).await;
                    self.put_status(&mut c, lease, &mut last_status).await?;
                }
                _ = tick.tick() => {
                    if self.check_windows().await {
                        self.put_status(&mut c, lease, &mut last_status).await?;
                    }
                    if reported.elapsed() >= STATUS_EVERY {
                        self.reconcile(&c).await;
                        self.put_status(&mut c, lease, &mut last_status).await?;
                        reported = Instant::now();
                    }
                }
            }
        }
    }

    fn on_put(&mut self, key: &[u8], value: &[u8]) {
        let key = String::from_utf8_lossy(key);
        let Some(name) = key.strip_prefix(&self.keys.assignments()) else {
            return;
        };
        match serde_json::from_slice::<Assignment>(value) {
            Ok(a) => {
                self.assignments.insert(name.to_string(), a);
            }
            Err(e) => tracing::warn!(
                instance = %self.instance,
                "fleet: {key}: not an assignment ({e}); skipped, the upstream keeps what it runs"
            ),
        }
    }

    /// Make each upstream run what its assignment says for this instance.
    async fn reconcile(&mut self, client: &Client) {
        let proxy = self.control.proxy();
        let names: Vec<String> = proxy.upstreams().map(|u| u.name().to_string()).collect();
        for name in names {
            let Some(upstream) = proxy.upstream(&name).cloned() else {
                continue;
            };
            let desired: Option<Applied> = self.assignments.get(&name).and_then(|a| {
                a.for_instance(&self.instance)
                    .map(|t| (t.clone(), a.published_unix_ms))
            });
            let state = self.states.entry(name.clone()).or_default();
            if state
                .error
                .as_ref()
                .is_some_and(|(e, _)| Some(e) != desired.as_ref())
            {
                // The assignment moved on from what could not be applied.
                state.error = None;
            }
            match desired {
                None => {
                    if state.applied.is_some() {
                        let Some(cfg) = self.control.upstream_config(&name).await else {
                            continue;
                        };
                        let swapped = self
                            .control
                            .swap_plugin(
                                &name,
                                PluginSource::Ref(cfg.plugin),
                                Some(cfg.plugin_config),
                            )
                            .await;
                        if let Err(e) = swapped {
                            tracing::error!(upstream = %name, "fleet: cannot restore the configured plugin: {e}");
                            continue;
                        }
                        tracing::info!(upstream = %name, "fleet: no assignment for this instance; the configured plugin runs");
                        state.applied = None;
                        state.window = None;
                        state.before = None;
                    }
                }
                Some(want) => {
                    let key = (want.0.digest.clone(), want.1);
                    let running = upstream.plugin().digest() == want.0.digest;
                    if state.refused.contains(&key)
                        || (state.applied.as_ref().map(|(t, _)| t) == Some(&want.0) && running)
                        || state.error.as_ref().is_some_and(|(e, _)| *e == want)
                    {
                        continue;
                    }
                    let applied = apply(
                        &self.control,
                        client.clone(),
                        &self.fleet.endpoints,
                        &self.keys,
                        &name,
                        &upstream,
                        &want,
                    )
                    .await;
                    match applied {
                        Ok(before) => {
                            state.before = Some(Before {
                                applied: state.applied.take(),
                                ..before
                            });
                            state.applied = Some(want);
                            state.error = None;
                            state.window = Some(Window {
                                upstream: Arc::downgrade(&upstream),
                                started: Instant::now(),
                                calls: load(&upstream.stats().calls),
                                failures: upstream.stats().failures_total(),
                                skipped: load(&upstream.stats().skipped),
                            });
                        }
                        Err(Refusal::Transient(reason)) => {
                            // etcd failed: tried again at the next reconcile.
                            tracing::warn!(upstream = %name, digest = %want.0.digest, "fleet: not applied yet: {reason}");
                        }
                        Err(Refusal::Final(reason)) => {
                            tracing::error!(upstream = %name, digest = %want.0.digest, "fleet: not applied: {reason}");
                            state.error = Some((want, reason));
                        }
                    }
                }
            }
        }
    }

    /// Check every open rollback window; roll back the plugins that fail.
    /// Returns whether anything changed.
    async fn check_windows(&mut self) -> bool {
        let window = Duration::from_millis(self.fleet.rollback_window_ms);
        let mut changed = false;
        for (name, state) in &mut self.states {
            let Some(w) = &state.window else { continue };
            let Some(upstream) = w.upstream.upgrade() else {
                // A reload rebuilt the upstream: reconcile swaps again and
                // opens a new window.
                state.window = None;
                continue;
            };
            let stats = upstream.stats();
            let calls = load(&stats.calls).saturating_sub(w.calls);
            let skipped = load(&stats.skipped).saturating_sub(w.skipped);
            let failed = upstream.stats().failures_total().saturating_sub(w.failures) + skipped;
            let total = calls + skipped;
            let percent = u64::from(self.fleet.rollback_failure_percent);
            if total >= self.fleet.rollback_min_requests && failed * 100 > percent * total {
                let Some((target, published)) = state.applied.clone() else {
                    state.window = None;
                    continue;
                };
                let reason = format!(
                    "{failed} of {total} decisions failed ({} %) in {:.1} s after the swap (limit {percent} %)",
                    failed * 100 / total,
                    w.started.elapsed().as_secs_f64()
                );
                let Some(before) = state.before.take() else {
                    state.window = None;
                    continue;
                };
                let config = serde_json::from_str(&before.config_json).ok();
                let swapped = self
                    .control
                    .swap_plugin(name, PluginSource::Loaded(before.plugin), config)
                    .await;
                match swapped {
                    Ok(_) => tracing::error!(
                        upstream = %name,
                        digest = %target.digest,
                        "fleet: rolled back by itself: {reason}"
                    ),
                    Err(e) => tracing::error!(
                        upstream = %name,
                        "fleet: rollback of {} failed: {e}",
                        target.digest
                    ),
                }
                state.refused.insert((target.digest.clone(), published));
                state.rolled_back = Some(RolledBack {
                    digest: target.digest,
                    reason,
                });
                state.applied = before.applied;
                state.window = None;
                changed = true;
            } else if w.started.elapsed() >= window {
                state.window = None;
                state.before = None;
            }
        }
        changed
    }

    fn status(&self, config_digest: String) -> InstanceStatus {
        let proxy = self.control.proxy();
        let upstreams = proxy
            .upstreams()
            .map(|u| {
                let state = self.states.get(u.name());
                let plugin = u.plugin();
                let stats = u.stats();
                let status = UpstreamStatus {
                    plugin: plugin.name().to_string(),
                    digest: plugin.digest().to_string(),
                    health: if stats.failing() { "failing" } else { "ok" }.to_string(),
                    calls: load(&stats.calls),
                    failures: stats.failures_total(),
                    fallbacks: load(&stats.fallbacks),
                    fleet_digest: state
                        .and_then(|s| s.applied.as_ref())
                        .map(|(t, _)| t.digest.clone()),
                    rolled_back: state.and_then(|s| s.rolled_back.clone()),
                    error: state.and_then(|s| s.error.as_ref()).map(|(_, e)| e.clone()),
                };
                (u.name().to_string(), status)
            })
            .collect();
        InstanceStatus {
            instance: self.instance.clone(),
            config_digest,
            listeners: self
                .control
                .local_addrs()
                .iter()
                .map(ToString::to_string)
                .collect(),
            upstreams,
        }
    }

    /// Put the status under the lease if it changed since `last`.
    async fn put_status(
        &self,
        c: &mut Client,
        lease: i64,
        last: &mut Option<InstanceStatus>,
    ) -> Result<(), EtcdError> {
        let status = self.status(self.control.config_digest().await);
        if last.as_ref() == Some(&status) {
            return Ok(());
        }
        let value =
            serde_json::to_vec(&status).map_err(|e| EtcdError::new(&self.fleet.endpoints, e))?;
        c.put(
            self.keys.instance(&self.instance),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| EtcdError::new(&self.fleet.endpoints, e))?;
        *last = Some(status);
        Ok(())
    }
}

/// Aborts its task when dropped (a session's lease keeper ends with it).
struct AbortOnDrop(JoinHandle<Result<(), EtcdError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keep `lease` alive every `every` until it fails or is lost.
///
/// # Errors
/// The keep-alive stream failed, or etcd answered that the lease is gone.
async fn keep_alive(
    mut c: Client,
    lease: i64,
    every: Duration,
    endpoints: Vec<String>,
) -> Result<(), EtcdError> {
    let fail = |e: etcd_client::Error| EtcdError::new(&endpoints, e);
    let (mut keeper, mut acks) = c.lease_keep_alive(lease).await.map_err(fail)?;
    loop {
        tokio::time::sleep(every).await;
        keeper.keep_alive().await.map_err(fail)?;
        let ack = acks.message().await.map_err(fail)?;
        if ack.is_none_or(|a| a.ttl() <= 0) {
            return Err(EtcdError::new(&endpoints, "the registration lease expired"));
        }
    }
}

/// Why a publication was not applied.
enum Refusal {
    /// etcd failed: try again.
    Transient(String),
    /// The plugin is missing, its bytes do not match the digest, or the
    /// swap was refused: not tried again until the assignment changes.
    Final(String),
}

/// Fetch `want`'s plugin, check its digest, and swap it into `name`.
/// Returns what ran before (its `applied` left for the caller).
///
/// # Errors
/// [`Refusal`], with a sentence: etcd failed, the plugin is missing or its
/// bytes do not match the digest, or the swap was refused (the admin API's
/// checks: compile, imports, init).
async fn apply(
    control: &Control,
    mut c: Client,
    endpoints: &[String],
    keys: &Keys,
    name: &str,
    upstream: &Upstream,
    want: &Applied,
) -> Result<Before, Refusal> {
    let (target, _) = want;
    let r = c
        .get(keys.plugin(&target.digest), None)
        .await
        .map_err(|e| Refusal::Transient(EtcdError::new(endpoints, e).to_string()))?;
    let Some(kv) = r.kvs().first() else {
        return Err(Refusal::Final(format!(
            "{} is missing",
            keys.plugin(&target.digest)
        )));
    };
    let bytes = kv.value().to_vec();
    let actual = crate::plugin::digest(&bytes);
    if actual != target.digest {
        return Err(Refusal::Final(format!(
            "{} holds bytes whose digest is {actual}, not {}: refused",
            keys.plugin(&target.digest),
            target.digest
        )));
    }
    let before = Before {
        plugin: upstream.plugin(),
        config_json: upstream.plugin_config_json(),
        applied: None,
    };
    let config = match &target.plugin_config {
        Some(c) => c.clone(),
        None => control
            .upstream_config(name)
            .await
            .map(|c| c.plugin_config)
            .unwrap_or_else(|| serde_json::json!({})),
    };
    let report = control
        .swap_plugin(
            name,
            PluginSource::Named {
                name: format!("fleet:{}", target.name),
                bytes,
            },
            Some(config),
        )
        .await
        .map_err(|e| Refusal::Final(crate::control::error_chain(&e)))?;
    tracing::info!(upstream = %name, digest = %report.digest, "fleet: plugin swapped in");
    Ok(before)
}
