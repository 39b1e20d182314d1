//! The operator's side of a fleet (`wasmlb fleet ...`): publish a plugin
//! to an upstream (optionally as a canary), promote or roll back, and read
//! every instance's status.

use std::collections::BTreeMap;
use std::path::Path;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::Serialize;

use super::{Assignment, InstanceStatus, Keys, MAX_PLUGIN_BYTES, Target, now_unix_ms};
use crate::etcd::{EtcdError, connect};

/// Why a fleet command failed; nothing was changed unless it says so.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// etcd could not be reached, or a request failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The plugin file cannot be read or is not a component.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The command does not apply (no assignment, not a canary, a canary
    /// that rolled back, another publish raced this one, bad arguments).
    #[error("{0}")]
    Refused(String),
}

/// Every assignment and every registered instance.
#[derive(Debug, Clone, Serialize)]
pub struct FleetStatus {
    /// Assignments by upstream.
    pub assignments: BTreeMap<String, Assignment>,
    /// Registered instances, by name; a value that does not parse is
    /// listed under `unreadable`.
    pub instances: Vec<InstanceStatus>,
    /// Keys under `instances/` whose value is not an [`InstanceStatus`].
    pub unreadable: Vec<String>,
}

async fn client(endpoints: &[String]) -> Result<Client, FleetError> {
    for e in endpoints {
        crate::etcd::check_endpoint(e).map_err(FleetError::Refused)?;
    }
    Ok(connect(endpoints).await?)
}

fn check_upstream(upstream: &str) -> Result<(), FleetError> {
    if upstream.is_empty() || upstream.contains('/') {
        return Err(FleetError::Refused(format!(
            "{upstream:?} is not an upstream name"
        )));
    }
    Ok(())
}

/// The assignment of `upstream` and its key's modification revision (0
/// if none).
async fn assignment(
    c: &mut Client,
    endpoints: &[String],
    keys: &Keys,
    upstream: &str,
) -> Result<(Option<Assignment>, i64), FleetError> {
    let r = c
        .get(keys.assignment(upstream), None)
        .await
        .map_err(|e| EtcdError::new(endpoints, e))?;
    let Some(kv) = r.kvs().first() else {
        return Ok((None, 0));
    };
    let a = serde_json::from_slice(kv.value()).map_err(|e| {
        FleetError::Refused(format!(
            "{}: not an assignment: {e}",
            keys.assignment(upstream)
        ))
    })?;
    Ok((Some(a), kv.mod_revision()))
}

/// Put `a` as `upstream`'s assignment if the key is still at `revision`
/// (0: absent), so two racing publishes cannot lose one another.
async fn put_if_unchanged(
    c: &mut Client,
    endpoints: &[String],
    keys: &Keys,
    upstream: &str,
    revision: i64,
    a: Option<&Assignment>,
) -> Result<(), FleetError> {
    let key = keys.assignment(upstream);
    let op = match a {
        Some(a) => TxnOp::put(
            key.clone(),
            serde_json::to_vec(a).map_err(|e| FleetError::Refused(e.to_string()))?,
            None,
        ),
        None => TxnOp::delete(key.clone(), None),
    };
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
        .and_then([op]);
    let r = c.txn(txn).await.map_err(|e| EtcdError::new(endpoints, e))?;
    if r.succeeded() {
        Ok(())
    } else {
        Err(FleetError::Refused(format!(
            "the assignment of {upstream:?} changed meanwhile (another publish?); nothing changed, run the command again"
        )))
    }
}

/// Store the plugin at `path` (at most [`MAX_PLUGIN_BYTES`]) under its
/// digest and assign it to `upstream` fleet-wide, with `plugin_config` (a
/// JSON object) if given. With `canary = Some(n)`, only the first `n`
/// registered instances (by name) that serve `upstream` run it; the rest
/// keep what ran before.
///
/// # Errors
/// [`FleetError`]: the file is unreadable, too large or not a wasm
/// component; `plugin_config` is not an object; `n` is 0 or no instance
/// serves `upstream`; etcd fails.
pub async fn publish(
    endpoints: &[String],
    prefix: &str,
    upstream: &str,
    path: &Path,
    plugin_config: Option<serde_json::Value>,
    canary: Option<usize>,
) -> Result<Assignment, FleetError> {
    check_upstream(upstream)?;
    let file_error = |message: String| FleetError::File {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
    if bytes.len() > MAX_PLUGIN_BYTES {
        return Err(file_error(format!(
            "{} bytes, more than the {MAX_PLUGIN_BYTES} a fleet plugin may have (etcd's request limit)",
            bytes.len()
        )));
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(file_error("not a WebAssembly component".into()));
    }
    if let Some(c) = &plugin_config
        && !c.is_object()
    {
        return Err(FleetError::Refused("--config must be a JSON object".into()));
    }
    if canary == Some(0) {
        return Err(FleetError::Refused("--canary must be at least 1".into()));
    }
    let keys = Keys::new(prefix);
    let mut c = client(endpoints).await?;
    let digest = crate::plugin::digest(&bytes);
    c.put(keys.plugin(&digest), bytes, None)
        .await
        .map_err(|e| EtcdError::new(endpoints, e))?;
    let (current, revision) = assignment(&mut c, endpoints, &keys, upstream).await?;
    let previous = current.and_then(|a| {
        if a.canary.is_some() {
            a.previous
        } else {
            Some(a.target)
        }
    });
    let canary = match canary {
        None => None,
        Some(n) => {
            let status = read_status(&mut c, endpoints, &keys).await?;
            let names: Vec<String> = status
                .instances
                .iter()
                .filter(|i| i.upstreams.contains_key(upstream))
                .map(|i| i.instance.clone())
                .take(n)
                .collect();
            if names.is_empty() {
                return Err(FleetError::Refused(format!(
                    "no registered instance serves upstream {upstream:?}: nothing to run a canary on"
                )));
            }
            Some(names)
        }
    };
    let a = Assignment {
        target: Target {
            digest,
            name: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            plugin_config,
        },
        canary,
        previous,
        published_unix_ms: now_unix_ms(),
    };
    put_if_unchanged(&mut c, endpoints, &keys, upstream, revision, Some(&a)).await?;
    Ok(a)
}

/// End `upstream`'s canary: every instance runs its target. Refused while
/// a canary instance reports an automatic rollback of that digest, unless
/// `force`.
///
/// # Errors
/// [`FleetError::Refused`] with no assignment, no canary, or a rolled-back
/// canary; etcd failures.
pub async fn promote(
    endpoints: &[String],
    prefix: &str,
    upstream: &str,
    force: bool,
) -> Result<Assignment, FleetError> {
    check_upstream(upstream)?;
    let keys = Keys::new(prefix);
    let mut c = client(endpoints).await?;
    let (current, revision) = assignment(&mut c, endpoints, &keys, upstream).await?;
    let Some(mut a) = current else {
        return Err(FleetError::Refused(format!(
            "upstream {upstream:?} has no fleet assignment"
        )));
    };
    if a.canary.is_none() {
        return Err(FleetError::Refused(format!(
            "upstream {upstream:?}: {} is not a canary (already on every instance)",
            a.target.digest
        )));
    }
    if !force {
        let status = read_status(&mut c, endpoints, &keys).await?;
        for i in &status.instances {
            if let Some(r) = i
                .upstreams
                .get(upstream)
                .and_then(|u| u.rolled_back.as_ref())
                .filter(|r| r.digest == a.target.digest)
            {
                return Err(FleetError::Refused(format!(
                    "{} rolled {} back by itself: {}; `--force` promotes anyway",
                    i.instance, r.digest, r.reason
                )));
            }
        }
    }
    a.canary = None;
    put_if_unchanged(&mut c, endpoints, &keys, upstream, revision, Some(&a)).await?;
    Ok(a)
}

/// Restore what `upstream` ran before its current assignment, on every
/// instance (no previous assignment: the assignment is removed and each
/// instance runs its configured plugin). Returns the new assignment.
///
/// # Errors
/// [`FleetError::Refused`] with no assignment; etcd failures.
pub async fn rollback(
    endpoints: &[String],
    prefix: &str,
    upstream: &str,
) -> Result<Option<Assignment>, FleetError> {
    check_upstream(upstream)?;
    let keys = Keys::new(prefix);
    let mut c = client(endpoints).await?;
    let (current, revision) = assignment(&mut c, endpoints, &keys, upstream).await?;
    let Some(a) = current else {
        return Err(FleetError::Refused(format!(
            "upstream {upstream:?} has no fleet assignment"
        )));
    };
    let restored = a.previous.map(|target| Assignment {
        target,
        canary: None,
        previous: None,
        published_unix_ms: now_unix_ms(),
    });
    put_if_unchanged(
        &mut c,
        endpoints,
        &keys,
        upstream,
        revision,
        restored.as_ref(),
    )
    .await?;
    Ok(restored)
}

/// Every assignment and registered instance.
///
/// # Errors
/// etcd failures.
pub async fn status(endpoints: &[String], prefix: &str) -> Result<FleetStatus, FleetError> {
    let keys = Keys::new(prefix);
    let mut c = client(endpoints).await?;
    read_status(&mut c, endpoints, &keys).await
}

async fn read_status(
    c: &mut Client,
    endpoints: &[String],
    keys: &Keys,
) -> Result<FleetStatus, FleetError> {
    let fail = |e| EtcdError::new(endpoints, e);
    let mut status = FleetStatus {
        assignments: BTreeMap::new(),
        instances: Vec::new(),
        unreadable: Vec::new(),
    };
    let r = c
        .get(keys.assignments(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(fail)?;
    for kv in r.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match serde_json::from_slice::<Assignment>(kv.value()) {
            Ok(a) => {
                let name = key.strip_prefix(&keys.assignments()).unwrap_or(&key);
                status.assignments.insert(name.to_string(), a);
            }
            Err(_) => status.unreadable.push(key),
        }
    }
    let r = c
        .get(keys.instances(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(fail)?;
    for kv in r.kvs() {
        match serde_json::from_slice::<InstanceStatus>(kv.value()) {
            Ok(i) => status.instances.push(i),
            Err(_) => status
                .unreadable
                .push(String::from_utf8_lossy(kv.key()).into_owned()),
        }
    }
    status.instances.sort_by(|a, b| a.instance.cmp(&b.instance));
    Ok(status)
}

/// `sha256:` and the first 12 hex digits.
fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

/// `status` as text: the assignments, then one line per instance and
/// upstream.
pub fn render(status: &FleetStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if status.assignments.is_empty() {
        out.push_str("assignments: none (every instance runs its configured plugins)\n");
    }
    for (upstream, a) in &status.assignments {
        let _ = write!(
            out,
            "assignment {upstream}: {} {}",
            short(&a.target.digest),
            a.target.name
        );
        match &a.canary {
            Some(names) => {
                let _ = write!(out, " (canary on {}", names.join(", "));
                match &a.previous {
                    Some(p) => {
                        let _ = write!(out, "; the others run {})", short(&p.digest));
                    }
                    None => out.push_str("; the others run their configured plugin)"),
                }
            }
            None => out.push_str(" (every instance)"),
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{:<16} {:<20} {:<12} {:<24} {:<20} {:<8} {:>9} {:>9} {:>9}  FLEET",
        "INSTANCE",
        "CONFIG",
        "UPSTREAM",
        "PLUGIN",
        "DIGEST",
        "HEALTH",
        "CALLS",
        "FAILURES",
        "FALLBACKS"
    );
    for i in &status.instances {
        for (name, u) in &i.upstreams {
            let mut fleet = match &u.fleet_digest {
                Some(d) if *d == u.digest => "from the fleet".to_string(),
                Some(d) => format!("assigned {}", short(d)),
                None => "configured plugin".to_string(),
            };
            if let Some(r) = &u.rolled_back {
                let _ = write!(fleet, "; ROLLED BACK {}: {}", short(&r.digest), r.reason);
            }
            if let Some(e) = &u.error {
                let _ = write!(fleet, "; ERROR: {e}");
            }
            let _ = writeln!(
                out,
                "{:<16} {:<20} {:<12} {:<24} {:<20} {:<8} {:>9} {:>9} {:>9}  {fleet}",
                i.instance,
                short(&i.config_digest),
                name,
                u.plugin,
                short(&u.digest),
                u.health,
                u.calls,
                u.failures,
                u.fallbacks,
            );
        }
    }
    if status.instances.is_empty() {
        out.push_str("(no instance registered)\n");
    }
    for key in &status.unreadable {
        let _ = writeln!(out, "unreadable: {key}");
    }
    out
}
