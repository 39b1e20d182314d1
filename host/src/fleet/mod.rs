//! A fleet of wasmlb instances sharing plugins through etcd.
//!
//! Every key lives under the fleet's prefix `P` (default `/wasmlb/`):
//!
//! | key | value |
//! | --- | --- |
//! | `P/plugins/<hex>` | a plugin's component bytes; `<hex>` is their SHA-256 |
//! | `P/assignments/<upstream>` | an [`Assignment`] (JSON): the plugin every instance's upstream of that name runs |
//! | `P/instances/<instance>` | an [`InstanceStatus`] (JSON), put with the instance's lease |
//!
//! An instance with `[fleet]` ([`agent`]) registers itself under a lease
//! (it leaves the status `lease_ttl_ms` after it stops), watches the
//! assignments, and makes each of its upstreams run what its assignment
//! says: it fetches the plugin, checks the bytes against the digest, and
//! swaps it in through the same path as the admin API's swap (compiled,
//! imports checked, initialized before it serves). An upstream with no
//! assignment runs its configured plugin.
//!
//! `wasmlb fleet publish` stores a plugin and assigns it ([`ops`]). With
//! `--canary N`, the assignment names N instances: only they swap, the rest
//! keep the previous assignment; `promote` extends it to every instance,
//! `rollback` restores the previous one everywhere. After any fleet swap an
//! instance watches the plugin for `rollback_window_ms`; if more than
//! `rollback_failure_percent` of at least `rollback_min_requests` decisions
//! failed (trap, deadline, bad answer, or skipped by the open circuit
//! breaker), it swaps back by itself, never applies that publication again,
//! and reports why in its status, which `fleet status` shows. This follows
//! the canary analysis of Spinnaker/Kayenta and Argo Rollouts, reduced to
//! the plugin failure rate each instance measures itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod agent;
pub mod ops;

pub use ops::{FleetError, promote, publish, rollback, status};

/// Largest plugin `publish` stores, in bytes (1,500,000: under etcd's
/// default `--max-request-bytes` of 1.5 MiB).
pub const MAX_PLUGIN_BYTES: usize = 1_500_000;

/// What an upstream should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// `sha256:<hex>` of the plugin's bytes (`P/plugins/<hex>`).
    pub digest: String,
    /// The plugin file's name, for people (instances show it as
    /// `fleet:<name>`).
    #[serde(default)]
    pub name: String,
    /// The plugin's config (JSON object); `None` keeps the upstream's
    /// configured `plugin_config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_config: Option<serde_json::Value>,
}

/// `P/assignments/<upstream>`: the plugin an upstream runs fleet-wide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// What to run.
    #[serde(flatten)]
    pub target: Target,
    /// While a canary: the only instances that run `target`; the others
    /// run `previous`. `None` once promoted (every instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Vec<String>>,
    /// What ran before (`None`: each instance's configured plugin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Target>,
    /// When it was published, in ms since the Unix epoch; with the digest,
    /// it names the publication an instance may refuse after rolling back.
    pub published_unix_ms: u64,
}

impl Assignment {
    /// What `instance` should run: the target, or while a canary that
    /// leaves it out, the previous one (`None`: its configured plugin).
    pub fn for_instance(&self, instance: &str) -> Option<&Target> {
        match &self.canary {
            Some(names) if !names.iter().any(|n| n == instance) => self.previous.as_ref(),
            _ => Some(&self.target),
        }
    }
}

/// `P/instances/<instance>`: what an instance reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Its name.
    pub instance: String,
    /// `sha256:<hex>` of its config file's text.
    pub config_digest: String,
    /// Its listeners' bound addresses.
    pub listeners: Vec<String>,
    /// Each upstream, by name.
    pub upstreams: BTreeMap<String, UpstreamStatus>,
}

/// One upstream in [`InstanceStatus`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// The running plugin's name (a built-in, a path, or `fleet:<file>`).
    pub plugin: String,
    /// `sha256:<hex>` of its bytes.
    pub digest: String,
    /// `ok` or `failing` (as the admin API's plugin status).
    pub health: String,
    /// Decisions that reached the plugin since the upstream was built.
    pub calls: u64,
    /// Failed decisions (trap, deadline, bad answer).
    pub failures: u64,
    /// Requests decided by the fallback.
    pub fallbacks: u64,
    /// The fleet digest it runs, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_digest: Option<String>,
    /// The last automatic rollback, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RolledBack>,
    /// Why the assigned plugin could not be applied, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An automatic rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// The digest swapped out.
    pub digest: String,
    /// Why, e.g. `40 of 41 decisions failed (97 %) in 1.2 s after the swap`.
    pub reason: String,
}

/// The keys of a fleet under `prefix` (ending in `/`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `prefix` (a final `/` is added if missing).
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    /// `P/plugins/<hex>` for `digest` (`sha256:<hex>`).
    pub fn plugin(&self, digest: &str) -> String {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        format!("{}plugins/{hex}", self.prefix)
    }

    /// `P/assignments/`.
    pub fn assignments(&self) -> String {
        format!("{}assignments/", self.prefix)
    }

    /// `P/assignments/<upstream>`.
    pub fn assignment(&self, upstream: &str) -> String {
        format!("{}{upstream}", self.assignments())
    }

    /// `P/instances/`.
    pub fn instances(&self) -> String {
        format!("{}instances/", self.prefix)
    }

    /// `P/instances/<instance>`.
    pub fn instance(&self, instance: &str) -> String {
        format!("{}{instance}", self.instances())
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(d: &str) -> Target {
        Target {
            digest: d.into(),
            name: "x.wasm".into(),
            plugin_config: None,
        }
    }

    #[test]
    fn a_canary_runs_the_target_and_the_rest_the_previous() {
        let mut a = Assignment {
            target: target("sha256:new"),
            canary: Some(vec!["lb-1".into()]),
            previous: Some(target("sha256:old")),
            published_unix_ms: 1,
        };
        assert_eq!(a.for_instance("lb-1"), Some(&target("sha256:new")));
        assert_eq!(a.for_instance("lb-2"), Some(&target("sha256:old")));
        a.previous = None;
        assert_eq!(a.for_instance("lb-2"), None);
        a.canary = None;
        assert_eq!(a.for_instance("lb-2"), Some(&target("sha256:new")));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Assignment>(&json).unwrap(), a);
    }

    #[test]
    fn keys_sit_under_the_prefix() {
        let k = Keys::new("/f");
        assert_eq!(k.plugin("sha256:ab"), "/f/plugins/ab");
        assert_eq!(k.assignment("app"), "/f/assignments/app");
        assert_eq!(k.instance("lb-1"), "/f/instances/lb-1");
    }
}
