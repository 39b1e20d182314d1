//! Adding and removing backends through the admin API, as HAProxy's
//! `add server` and `del server`: only for upstreams whose backends the
//! config lists (a discovery source owns the others), and until the next
//! reload, which rebuilds the set from the config file.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Control;
use crate::config::{AdminState, BackendConfig};
use crate::upstream::{BackendSnapshot, Upstream};

/// How often a removal waits for a draining backend's last request, in ms.
const REMOVAL_POLL_MS: u64 = 50;

/// Why a backend could not be added or removed. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// No upstream has that name (404).
    #[error("no upstream named {0:?}")]
    UnknownUpstream(String),
    /// The upstream has no such backend (404).
    #[error("upstream {upstream:?} has no backend {backend:?} (an address or id)")]
    UnknownBackend {
        /// The upstream.
        upstream: String,
        /// The backend as given.
        backend: String,
    },
    /// A discovery source owns the upstream's backends (409).
    #[error(
        "upstream {0:?} takes its backends from a discovery source; change them there, not through the admin API"
    )]
    Discovered(String),
    /// The backend is already in the upstream (409).
    #[error("upstream {upstream:?} already has backend {address}")]
    Exists {
        /// The upstream.
        upstream: String,
        /// The backend.
        address: SocketAddr,
    },
}

/// The outcome of a removal.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Removal {
    /// The backend.
    pub address: SocketAddr,
    /// True when it left at once (nothing in flight); false while it drains
    /// (it leaves when its last request ends).
    pub removed: bool,
    /// Requests still in flight on it.
    pub in_flight: u32,
}

impl Control {
    fn managed_upstream(&self, name: &str) -> Result<Arc<Upstream>, MembershipError> {
        let upstream = self
            .proxy()
            .upstream(name)
            .cloned()
            .ok_or_else(|| MembershipError::UnknownUpstream(name.to_string()))?;
        if upstream.discovery().is_some() {
            return Err(MembershipError::Discovered(name.to_string()));
        }
        Ok(upstream)
    }

    /// Add `backend` to upstream `name`: it takes the next id, gets health
    /// checks when the upstream has them, and starts in slow start when
    /// `slow_start_ms` is set. Returns its snapshot.
    ///
    /// # Errors
    /// [`MembershipError`]: unknown upstream, a discovery-managed upstream,
    /// or an address already in it.
    pub async fn add_backend(
        &self,
        name: &str,
        backend: BackendConfig,
    ) -> Result<BackendSnapshot, MembershipError> {
        let upstream = self.managed_upstream(name)?;
        let address = backend.address;
        let metrics = self.shared.serving.metrics.clone();
        let change = upstream.edit_backends(&metrics, |list| {
            if list.iter().any(|b| b.address == address) {
                return Err(MembershipError::Exists {
                    upstream: name.to_string(),
                    address,
                });
            }
            list.push(backend);
            Ok(())
        })?;
        let health_check = {
            let control = self.shared.control.lock().await;
            control
                .config
                .upstreams
                .get(name)
                .and_then(|u| u.health_check.clone())
        };
        if let Some(hc) = health_check {
            crate::health::watch(&upstream, &change.added, &hc, &metrics);
        }
        tracing::info!(upstream = name, backend = %address, "backend added through the admin API");
        upstream
            .snapshot()
            .backends
            .into_iter()
            .find(|b| b.address == address)
            .ok_or(MembershipError::UnknownBackend {
                upstream: name.to_string(),
                backend: address.to_string(),
            })
    }

    /// Remove backend `backend` (an address or id) from upstream `name`: it
    /// is drained first (no new request goes to it) and leaves when nothing
    /// is in flight on it, at once if nothing is.
    ///
    /// # Errors
    /// [`MembershipError`]: unknown upstream or backend, or a
    /// discovery-managed upstream.
    pub fn remove_backend(&self, name: &str, backend: &str) -> Result<Removal, MembershipError> {
        let upstream = self.managed_upstream(name)?;
        let Some(found) = upstream.find_backend(backend) else {
            return Err(MembershipError::UnknownBackend {
                upstream: name.to_string(),
                backend: backend.to_string(),
            });
        };
        let (address, live) = (found.address, found.live.clone());
        upstream.set_admin_state(address, AdminState::Drain);
        let in_flight = live.in_flight.load(Ordering::Relaxed);
        if in_flight == 0 {
            self.take_out(&upstream, address);
            return Ok(Removal {
                address,
                removed: true,
                in_flight,
            });
        }
        tracing::info!(upstream = name, backend = %address, in_flight, "backend draining before removal");
        let control = self.clone();
        let weak = Arc::downgrade(&upstream);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(REMOVAL_POLL_MS)).await;
                // A reload rebuilt the upstream: the config decides now.
                let Some(upstream) = weak.upgrade() else {
                    return;
                };
                if live.in_flight.load(Ordering::Relaxed) == 0 {
                    control.take_out(&upstream, address);
                    return;
                }
            }
        });
        Ok(Removal {
            address,
            removed: false,
            in_flight,
        })
    }

    fn take_out(&self, upstream: &Upstream, address: SocketAddr) {
        let metrics = self.shared.serving.metrics.clone();
        let _ = upstream.edit_backends(&metrics, |list| {
            list.retain(|b| b.address != address);
            Ok::<(), MembershipError>(())
        });
        tracing::info!(upstream = upstream.name(), backend = %address, "backend removed through the admin API");
    }
}
