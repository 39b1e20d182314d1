//! Example strategy (WIT 0.2): a token bucket per client, then round-robin.
//!
//! Config (`[upstream.NAME.plugin_config]`):
//! - `rate_per_second`: tokens added per second to each bucket (default 10).
//! - `burst`: a bucket's size, the requests a quiet client may send at once
//!   (default 20).
//! - `header`: key the buckets by this request header's value instead of
//!   the client's network (an API key, a tenant); a request without it is
//!   keyed by its network.
//! - `max_keys`: buckets kept at most (default 100000). When full, the
//!   buckets that are full again (idle clients) are dropped.
//!
//! Without `header`, a client is its /24 (IPv4) or /64 (IPv6) network, never
//! a value from the request. A request that finds a token goes to the next
//! healthy backend in rotation; one that finds none gets `429 Too Many
//! Requests` with `retry-after` (whole seconds until a token, at least 1),
//! from the proxy, without reaching a backend.
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::hashing::hash64;
use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;
use wasmlb_sdk::weighted::Rotation;
use wasmlb_sdk::{IpAddr, Reply};

/// `plugin_config` of this strategy.
#[derive(Debug, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Tokens per second per bucket.
    pub rate_per_second: f64,
    /// Bucket size, in requests.
    pub burst: u32,
    /// Request header to key buckets by (empty: the client's network).
    pub header: String,
    /// Most buckets kept.
    pub max_keys: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            rate_per_second: 10.0,
            burst: 20,
            header: String::new(),
            max_keys: 100_000,
        }
    }
}

/// The strategy's state: the buckets by key (tokens left, at ns), and the
/// rotation.
#[derive(Debug)]
pub struct RateLimit {
    config: Config,
    buckets: BTreeMap<u64, (f64, u64)>,
    rotation: Rotation,
}

/// The bucket key of a client: its /24 or /64 network.
pub fn network_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8),
        // The top 64 bits, with the top bit set: apart from v4 keys (< 2^24).
        IpAddr::V6(v6) => ((u128::from(v6) >> 64) as u64) | (1 << 63),
    }
}

impl RateLimit {
    fn key(&self, cx: &dyn Context) -> u64 {
        if !self.config.header.is_empty()
            && let Some(value) = cx.header(&self.config.header)
        {
            return hash64(value.as_bytes(), 0x5eed);
        }
        network_key(cx.client_address().ip())
    }

    /// Take a token from `key`'s bucket at `now_ns`: `Ok` if there was one,
    /// else `Err(seconds until the next one)`.
    pub fn take(&mut self, key: u64, now_ns: u64) -> Result<(), u64> {
        let (rate, burst) = (self.config.rate_per_second, f64::from(self.config.burst));
        let refill = |&(tokens, at_ns): &(f64, u64)| {
            (tokens + now_ns.saturating_sub(at_ns) as f64 / 1e9 * rate).min(burst)
        };
        if self.buckets.len() >= self.config.max_keys && !self.buckets.contains_key(&key) {
            self.buckets.retain(|_, b| refill(b) < burst);
            if self.buckets.len() >= self.config.max_keys {
                self.buckets.clear(); // all busy: fail open rather than grow
            }
        }
        let bucket = self.buckets.entry(key).or_insert((burst, now_ns));
        let tokens = refill(bucket);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now_ns);
            return Ok(());
        }
        *bucket = (tokens, now_ns);
        // Whole seconds until a token, rounded up (`ceil` is not in `core`).
        let wait_s = (1.0 - tokens) / rate;
        Err((wait_s as u64 + u64::from((wait_s as u64 as f64) < wait_s)).max(1))
    }
}

impl Strategy for RateLimit {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if !(config.rate_per_second > 0.0 && config.rate_per_second.is_finite()) {
            return Err("`rate_per_second` must be a positive number".into());
        }
        if config.burst == 0 || config.max_keys == 0 {
            return Err("`burst` and `max_keys` must be at least 1".into());
        }
        Ok(Self {
            config,
            buckets: BTreeMap::new(),
            rotation: Rotation::default(),
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.rotation = Rotation::healthy(&backends);
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        let key = self.key(cx);
        match self.take(key, cx.monotonic_now()) {
            Ok(()) => self
                .rotation
                .next()
                .map_or(Decision::Unavailable, Decision::Backend),
            Err(retry_after_s) => Reply::new(429)
                .header("retry-after", &format!("{retry_after_s}"))
                .text("too many requests\n")
                .into(),
        }
    }
}

wasmlb_sdk::export_strategy!(RateLimit);
