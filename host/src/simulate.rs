//! `wasmlb simulate`: run a strategy plugin offline, against synthetic or
//! recorded traffic, and report how it spreads the requests.
//!
//! The plugin is loaded and called exactly as in the proxy (the same
//! [`Upstream`], host functions and fallback), but requests never leave the
//! process: each one holds its backend's in-flight count for a simulated
//! latency on a virtual clock, so load-aware strategies see the load they
//! would see in production, each completion feeds the backend's response-time
//! estimate (`rtt-estimate`) on the virtual clock, and a simulated failure
//! feeds outlier detection like a 5xx. Runs are deterministic for a given seed and trace.
//!
//! Figures reported per backend: requests, share against the weight's share,
//! failures and peak in-flight requests; overall: unavailable answers,
//! plugin fallbacks, Jain's fairness index over requests per unit of weight
//! (R. Jain, D. Chiu, W. Hawe, DEC-TR-301, 1984: 1.0 is perfectly fair,
//! `1/n` is everything on one backend), the hot-spot ratio (the largest
//! share divided by its weight's share) and simulated latency percentiles.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use crate::backend::{BackendLive, InFlight};
use crate::config::{BackendConfig, PluginRef, UpstreamConfig};
use crate::metrics::Metrics;
use crate::plugin::{PluginError, RequestView, Runtime};
use crate::upstream::Upstream;

/// One simulated backend.
#[derive(Debug, Clone, PartialEq)]
pub struct SimBackend {
    /// Relative weight, at least 1.
    pub weight: u32,
    /// Labels handed to the plugin.
    pub labels: BTreeMap<String, String>,
    /// Mean response latency, in ms (each request draws uniformly from
    /// 0.5× to 1.5× of it).
    pub latency_ms: f64,
    /// Probability that a request fails (counted like a 5xx), 0.0 to 1.0.
    pub failure_rate: f64,
    /// The address the plugin sees (default: 127.0.0.1:10000 + its index);
    /// give a recorded upstream's addresses to replay its trace against
    /// the same set (hashing strategies hash addresses).
    pub address: Option<SocketAddr>,
}

impl Default for SimBackend {
    fn default() -> Self {
        Self {
            weight: 1,
            labels: BTreeMap::new(),
            latency_ms: 5.0,
            failure_rate: 0.0,
            address: None,
        }
    }
}

/// One request of the traffic.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimRequest {
    /// Arrival time, in µs from the start (trace files give `at_ms`).
    #[serde(skip)]
    pub at_us: u64,
    /// Method (default `GET`).
    #[serde(default = "default_method")]
    pub method: String,
    /// Path and query (default `/`).
    #[serde(default = "default_path")]
    pub path: String,
    /// Client address (default `192.0.2.1:40000`).
    #[serde(default = "default_client")]
    pub client: SocketAddr,
    /// Request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// In a recorded trace: the backend that served it live.
    #[serde(default)]
    pub backend: Option<SocketAddr>,
    /// In a recorded trace: the live response status (not replayed).
    #[serde(default)]
    pub status: Option<u16>,
    /// In a recorded trace: the live response time in ms (not replayed).
    #[serde(default)]
    pub duration_ms: Option<f64>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_client() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 40000))
}

/// Synthetic traffic: `requests` requests at `rate` per second from
/// `clients` distinct client addresses (10.a.b.c), each request carrying
/// `x-user: user-<client>`, path `/item/<n mod 1000>` and the extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synthetic {
    /// Number of requests.
    pub requests: u64,
    /// Arrivals per second (evenly spaced).
    pub rate: u64,
    /// Distinct clients, used in turn.
    pub clients: u32,
    /// Headers added to every request.
    pub headers: BTreeMap<String, String>,
}

impl Synthetic {
    /// The requests.
    pub fn requests(&self) -> Vec<SimRequest> {
        let gap_us = 1_000_000 / self.rate.max(1);
        (0..self.requests)
            .map(|i| {
                let k = (i % u64::from(self.clients.max(1))) as u32;
                let ip = Ipv4Addr::new(10, (k >> 16) as u8, (k >> 8) as u8, k as u8);
                let mut headers = self.headers.clone();
                headers.insert("x-user".into(), format!("user-{k}"));
                SimRequest {
                    at_us: i * gap_us,
                    method: default_method(),
                    path: format!("/item/{}", i % 1000),
                    client: SocketAddr::from((ip, 40000)),
                    headers,
                    backend: None,
                    status: None,
                    duration_ms: None,
                }
            })
            .collect()
    }
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The plugin failed to load or initialize.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The trace file could not be read.
    #[error("reading trace {path}: {source}")]
    TraceIo {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A trace line is not a valid request.
    #[error("{path}:{line}: {message}")]
    Trace {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The scenario is inconsistent (no backends, bad request fields).
    #[error("{0}")]
    Invalid(String),
}

/// Read a trace: JSON lines of [`SimRequest`] fields plus `at_ms` (arrival,
/// in ms, default: 1 ms after the previous line), as `[upstream.NAME.record]`
/// writes them ([`crate::record`]); the requests are replayed in `at_ms`
/// order. Blank lines and lines starting with `#` are skipped.
///
/// # Errors
/// [`SimError::TraceIo`], or [`SimError::Trace`] naming the line at fault.
pub fn read_trace(path: &Path) -> Result<Vec<SimRequest>, SimError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SimError::TraceIo {
        path: name.clone(),
        source,
    })?;
    let mut out: Vec<SimRequest> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: String| SimError::Trace {
            path: name.clone(),
            line: i + 1,
            message,
        };
        let mut value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        let at_ms = match value.as_object_mut().and_then(|o| o.remove("at_ms")) {
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| err("at_ms: not a number".into()))?,
            ),
            None => None,
        };
        let mut request: SimRequest =
            serde_json::from_value(value).map_err(|e| err(e.to_string()))?;
        let previous = out.last().map_or(0, |r| r.at_us);
        request.at_us = match at_ms {
            Some(ms) if ms >= 0.0 && ms.is_finite() => (ms * 1000.0) as u64,
            Some(_) => return Err(err("at_ms: negative or not finite".into())),
            None if out.is_empty() => 0,
            None => previous + 1000,
        };
        out.push(request);
    }
    // A recorder writes lines as responses end, not in arrival order.
    out.sort_by_key(|r| r.at_us);
    Ok(out)
}

/// One backend's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendReport {
    /// The synthetic address the plugin saw.
    pub address: SocketAddr,
    /// Its weight.
    pub weight: u32,
    /// Requests the trace says it served live (a recorded trace replayed
    /// against the recorded addresses).
    pub recorded: u64,
    /// Requests it was chosen for.
    pub requests: u64,
    /// Of those, simulated failures.
    pub failures: u64,
    /// Most requests in flight at once.
    pub peak_in_flight: u32,
}

/// The outcome of a simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The plugin, as given.
    pub plugin: String,
    /// Requests simulated.
    pub requests: u64,
    /// Per backend, in id order.
    pub backends: Vec<BackendReport>,
    /// Requests that got no backend (503).
    pub unavailable: u64,
    /// Requests the plugin answered itself (a WIT 0.2 `respond`: a 429 of
    /// a rate limiter, a redirect), by status, ascending.
    pub answered: Vec<(u16, u64)>,
    /// Requests decided by the host's fallback after a plugin failure.
    pub fallbacks: u64,
    /// Jain's fairness index over requests per unit of weight, 0 to 1.
    pub fairness: f64,
    /// Largest share divided by its weight's share (1.0: none above its share).
    pub hot_spot: f64,
    /// Simulated latency percentiles p50, p99, in ms.
    pub latency_ms: (f64, f64),
}

impl Report {
    /// The report as a plain-text table.
    pub fn render(&self) -> String {
        let total_weight: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        let served: u64 = self.backends.iter().map(|b| b.requests).sum();
        let mut out = format!(
            "plugin {}: {} requests over {} backends\n\n",
            self.plugin,
            self.requests,
            self.backends.len()
        );
        out.push_str(
            "backend            weight  requests   share  weight share  failures  peak in-flight\n",
        );
        let recorded: u64 = self.backends.iter().map(|b| b.recorded).sum();
        for b in &self.backends {
            let share = 100.0 * b.requests as f64 / served.max(1) as f64;
            let expected = 100.0 * f64::from(b.weight) / total_weight.max(1) as f64;
            let _ = writeln!(
                out,
                "{:<18} {:>6}  {:>8}  {:>5.1}%  {:>11.1}%  {:>8}  {:>14}",
                b.address.to_string(),
                b.weight,
                b.requests,
                share,
                expected,
                b.failures,
                b.peak_in_flight
            );
        }
        if recorded > 0 {
            out.push_str("\nrecorded live (the trace's backend field):\n");
            for b in &self.backends {
                let _ = writeln!(
                    out,
                    "{:<18} {:>8}  {:>5.1}%  (simulated {:>5.1}%)",
                    b.address.to_string(),
                    b.recorded,
                    100.0 * b.recorded as f64 / recorded as f64,
                    100.0 * b.requests as f64 / served.max(1) as f64,
                );
            }
        }
        let _ = write!(
            out,
            "\nunavailable (503): {}   answered by the plugin: {}   plugin fallbacks: {}\n\
             fairness (Jain's index over requests per unit of weight): {:.3}\n\
             hot spot (largest share / its weight's share): {:.2}\n\
             simulated latency: p50 {:.1} ms, p99 {:.1} ms\n",
            self.unavailable,
            if self.answered.is_empty() {
                "0".to_string()
            } else {
                self.answered
                    .iter()
                    .map(|(status, n)| format!("{n} × {status}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            self.fallbacks,
            self.fairness,
            self.hot_spot,
            self.latency_ms.0,
            self.latency_ms.1
        );
        out
    }
}

/// The upstream config of a simulation: `plugin` with `plugin_config` over
/// `backends` at synthetic addresses 127.0.0.1:10000, :10001, ... Nothing
/// ever connects to them.
pub fn upstream_config(
    plugin: PluginRef,
    plugin_config: serde_json::Value,
    backends: &[SimBackend],
) -> UpstreamConfig {
    let list = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let address = b
                .address
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)));
            let mut c = BackendConfig::new(address);
            c.weight = b.weight.max(1);
            c.labels = b.labels.clone();
            c
        })
        .collect();
    let mut config = UpstreamConfig::new(plugin, list);
    config.plugin_config = plugin_config;
    // A busy machine must not turn a slow call into a fallback here.
    config.plugin_deadline_ms = 1000;
    config
}

/// Run `requests` through the plugin of `config` (backends as `backends`,
/// in the same order), with `seed` for latencies and failures.
///
/// # Errors
/// [`SimError::Plugin`] if the plugin does not load or initialize;
/// [`SimError::Invalid`] if there are no backends or a request's method,
/// path or header is not valid HTTP.
pub fn run(
    runtime: &Runtime,
    config: &UpstreamConfig,
    backends: &[SimBackend],
    requests: &[SimRequest],
    seed: u64,
) -> Result<Report, SimError> {
    if backends.is_empty() || backends.len() != config.backends.len() {
        return Err(SimError::Invalid(
            "a simulation needs at least one backend".into(),
        ));
    }
    let metrics = Metrics::new();
    let upstream = Upstream::new("simulate", config, runtime, &metrics)?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = backends.len();
    let mut reports: Vec<BackendReport> = config
        .backends
        .iter()
        .map(|b| BackendReport {
            address: b.address,
            weight: b.weight,
            recorded: 0,
            requests: 0,
            failures: 0,
            peak_in_flight: 0,
        })
        .collect();
    // Completions on the virtual clock: (done at µs, slot of the guard).
    let mut pending: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    // Per slot: the in-flight guard, the backend's counters and the latency.
    let mut guards: Vec<Option<(InFlight, Arc<BackendLive>, u64)>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut latencies: Vec<f64> = Vec::with_capacity(requests.len());
    let (mut unavailable, mut fallbacks) = (0u64, 0u64);
    let mut answered: std::collections::BTreeMap<u16, u64> = Default::default();
    for request in requests {
        while let Some(Reverse((done, slot))) = pending.peek().copied() {
            if done > request.at_us {
                break;
            }
            pending.pop();
            // The response arrives: the host's response-time estimate sees it.
            if let Some((_, counters, latency_ns)) = guards[slot].take() {
                counters.rtt.observe(latency_ns, done * 1000);
            }
            free.push(slot);
        }
        if let Some(live) = request.backend
            && let Some(r) = reports.iter_mut().find(|r| r.address == live)
        {
            r.recorded += 1;
        }
        let view = RequestView::new(request_parts(request)?, request.client);
        let (selection, _) = upstream.select(view, &[]);
        fallbacks += u64::from(selection.is_fallback());
        if let crate::upstream::Selection::Respond { reply } = &selection {
            *answered.entry(reply.status.as_u16()).or_default() += 1;
            continue;
        }
        let Some(chosen) = selection.target().cloned() else {
            unavailable += 1;
            continue;
        };
        let id = chosen.id.min(n - 1);
        let sim = &backends[id];
        let guard = InFlight::begin(&chosen, upstream.metrics().in_flight.clone());
        let failed = rng.f64() < sim.failure_rate;
        upstream.report(&chosen, !failed);
        let latency_ms = sim.latency_ms.max(0.0) * (0.5 + rng.f64());
        latencies.push(latency_ms);
        let report = &mut reports[id];
        report.requests += 1;
        report.failures += u64::from(failed);
        let in_flight = chosen
            .live
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed);
        report.peak_in_flight = report.peak_in_flight.max(in_flight);
        let entry = Some((guard, chosen.live.clone(), (latency_ms * 1e6) as u64));
        let slot = match free.pop() {
            Some(s) => {
                guards[s] = entry;
                s
            }
            None => {
                guards.push(entry);
                guards.len() - 1
            }
        };
        pending.push(Reverse((
            request.at_us + (latency_ms * 1000.0) as u64,
            slot,
        )));
    }
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let (fairness, hot_spot) = spread_figures(&reports);
    Ok(Report {
        plugin: config.plugin.to_string(),
        requests: requests.len() as u64,
        backends: reports,
        unavailable,
        answered: answered.into_iter().collect(),
        fallbacks,
        fairness,
        hot_spot,
        latency_ms: (pick(0.50), pick(0.99)),
    })
}

/// Jain's index over requests per unit of weight, and the hot-spot ratio.
fn spread_figures(backends: &[BackendReport]) -> (f64, f64) {
    let served: f64 = backends.iter().map(|b| b.requests as f64).sum();
    let total_weight: f64 = backends.iter().map(|b| f64::from(b.weight)).sum();
    if served == 0.0 || total_weight == 0.0 {
        return (0.0, 0.0);
    }
    let x: Vec<f64> = backends
        .iter()
        .map(|b| b.requests as f64 / f64::from(b.weight.max(1)))
        .collect();
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    let fairness = sum * sum / (x.len() as f64 * squares);
    let hot_spot = backends
        .iter()
        .map(|b| (b.requests as f64 / served) / (f64::from(b.weight) / total_weight))
        .fold(0.0, f64::max);
    (fairness, hot_spot)
}

fn request_parts(r: &SimRequest) -> Result<http::request::Parts, SimError> {
    let mut builder = http::Request::builder()
        .method(r.method.as_str())
        .uri(r.path.as_str());
    for (k, v) in &r.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    builder
        .body(())
        .map(|req| req.into_parts().0)
        .map_err(|e| SimError::Invalid(format!("request {} {}: {e}", r.method, r.path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simulate(
        plugin: &str,
        config: &str,
        backends: &[SimBackend],
        traffic: &Synthetic,
    ) -> Report {
        let runtime = Runtime::new().unwrap();
        let cfg = upstream_config(
            PluginRef::Builtin(plugin.into()),
            serde_json::from_str(config).unwrap(),
            backends,
        );
        run(&runtime, &cfg, backends, &traffic.requests(), 1).unwrap()
    }

    fn traffic(requests: u64, rate: u64, clients: u32) -> Synthetic {
        Synthetic {
            requests,
            rate,
            clients,
            headers: BTreeMap::new(),
        }
    }

    #[test]
    fn round_robin_is_perfectly_fair() {
        let backends = vec![SimBackend::default(); 4];
        let r = simulate("round-robin", "{}", &backends, &traffic(1000, 1000, 10));
        assert!(r.backends.iter().all(|b| b.requests == 250), "{r:?}");
        assert!((r.fairness - 1.0).abs() < 1e-9);
        assert!((r.hot_spot - 1.0).abs() < 1e-9);
        assert_eq!((r.unavailable, r.fallbacks), (0, 0));
        assert!(r.render().contains("25.0%"));
    }

    #[test]
    fn a_plugins_own_answers_are_counted_by_status() {
        // examples/rate-limit (WIT 0.2), built by the host's build script.
        let path = concat!(env!("OUT_DIR"), "/rate-limit.wasm");
        let backends = vec![SimBackend::default(); 2];
        let cfg = upstream_config(
            PluginRef::File {
                path: path.into(),
                shown: "rate-limit.wasm".into(),
            },
            serde_json::json!({"rate_per_second": 1, "burst": 10}),
            &backends,
        );
        let runtime = Runtime::new().unwrap();
        let r = run(
            &runtime,
            &cfg,
            &backends,
            &traffic(1000, 1000, 10).requests(),
            1,
        )
        .unwrap();
        let served: u64 = r.backends.iter().map(|b| b.requests).sum();
        let [(429, limited)] = r.answered[..] else {
            panic!("{:?}", r.answered)
        };
        assert!(limited > 0 && served > 0, "{r:?}");
        assert_eq!((served + limited, r.unavailable, r.fallbacks), (1000, 0, 0));
        assert!(
            r.render().contains(&format!("{limited} × 429")),
            "{}",
            r.render()
        );
    }

    #[test]
    fn least_connections_sends_less_to_a_slow_backend() {
        let mut backends = vec![SimBackend::default(); 3];
        backends[2].latency_ms = 50.0;
        // 2000 requests/s at 5 ms: a few in flight at once, more on the slow one.
        let r = simulate(
            "least-connections",
            "{}",
            &backends,
            &traffic(4000, 2000, 10),
        );
        let slow = r.backends[2].requests;
        let fast = r.backends[0].requests;
        assert!(slow * 2 < fast, "slow {slow}, fast {fast}");
        assert!(r.fairness < 0.95);
        // Round-robin ignores the latency.
        let rr = simulate("round-robin", "{}", &backends, &traffic(4000, 2000, 10));
        assert!(rr.backends.iter().all(|b| b.requests.abs_diff(1333) <= 1));
    }

    #[test]
    fn peak_ewma_learns_which_backend_is_slow() {
        let mut backends = vec![SimBackend::default(); 4];
        backends[3].latency_ms = 50.0;
        // 200 requests/s: about one in flight at a time, so only latency tells.
        let r = simulate(
            "peak-ewma",
            r#"{"seed": 1}"#,
            &backends,
            &traffic(2000, 200, 10),
        );
        let slow = r.backends[3].requests;
        assert!(slow < 100, "the slow backend served {slow} of 2000");
        // p2c sees only in-flight counts and sends it far more.
        let p2c = simulate("p2c", r#"{"seed": 1}"#, &backends, &traffic(2000, 200, 10));
        assert!(p2c.backends[3].requests > 3 * slow, "{p2c:?}");
    }

    #[test]
    fn ip_hash_with_one_client_is_one_hot_spot() {
        let backends = vec![SimBackend::default(); 4];
        let r = simulate("ip-hash", "{}", &backends, &traffic(100, 1000, 1));
        assert_eq!(r.backends.iter().filter(|b| b.requests == 100).count(), 1);
        assert!((r.hot_spot - 4.0).abs() < 1e-9);
        assert!((r.fairness - 0.25).abs() < 1e-9);
    }

    #[test]
    fn failures_are_counted_per_backend() {
        let mut backends = vec![SimBackend::default(); 2];
        backends[1].failure_rate = 1.0;
        let r = simulate("round-robin", "{}", &backends, &traffic(100, 1000, 1));
        assert_eq!((r.backends[0].failures, r.backends[1].failures), (0, 50));
    }

    #[test]
    fn traces_are_read_and_bad_lines_named() {
        let dir = std::env::temp_dir().join(format!("wasmlb-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "# comment\n{\"at_ms\": 0, \"path\": \"/a\", \"headers\": {\"x-user\": \"1\"}}\n\n\
             {\"client\": \"10.0.0.9:1\"}\n{\"at_ms\": 5.5, \"method\": \"POST\"}\n",
        )
        .unwrap();
        let requests = read_trace(&good).unwrap();
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[1].at_us, 1000);
        assert_eq!(requests[2].at_us, 5500);
        assert_eq!(requests[0].headers["x-user"], "1");
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"at_ms\": 1}\n{\"pth\": \"/x\"}\n").unwrap();
        let e = read_trace(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2") && e.contains("pth"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
