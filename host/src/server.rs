//! Listeners and connections: accept, serve HTTP/1.1 and HTTP/2 cleartext
//! (prior knowledge) on the same port, and shut down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::plugin::Runtime;
use crate::proxy::{Proxy, ProxyError};
use crate::upstream::Upstream;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Loading plugins or building the proxy failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A listener could not bind (the OS error is the source).
    #[error("listener[{index}]: cannot bind {address}")]
    Bind {
        /// The listener's index in the config.
        index: usize,
        /// Its configured address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Entry point for embedding: start every listener of a config.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Load the plugins, bind every listener and start serving. Plugin
    /// compilation runs on the calling thread (tens of ms per plugin).
    ///
    /// # Errors
    /// [`ServerError`] naming the upstream or listener at fault.
    pub async fn start(config: &Config) -> Result<RunningServer, ServerError> {
        let runtime = Runtime::new().map_err(ProxyError::Runtime)?;
        let proxy = Arc::new(Proxy::new(config, &runtime)?);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let listener =
                TcpListener::bind(l.address)
                    .await
                    .map_err(|source| ServerError::Bind {
                        index,
                        address: l.address,
                        source,
                    })?;
            let local = listener.local_addr().map_err(|source| ServerError::Bind {
                index,
                address: l.address,
                source,
            })?;
            addrs.push(local);
            tasks.push(tokio::spawn(accept_loop(
                index,
                listener,
                proxy.clone(),
                shutdown_rx.clone(),
            )));
        }
        Ok(RunningServer {
            addrs,
            proxy,
            shutdown_tx,
            tasks,
            shutdown_timeout: Duration::from_millis(config.server.shutdown_timeout_ms),
            _runtime: runtime,
        })
    }
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    addrs: Vec<SocketAddr>,
    proxy: Arc<Proxy>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<bool>>,
    shutdown_timeout: Duration,
    _runtime: Runtime,
}

impl RunningServer {
    /// The bound address of each listener, in config order (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The upstream named `name`, for its live state and plugin counters.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.proxy.upstream(name)
    }

    /// Stop accepting, let in-flight requests finish for at most the
    /// configured `shutdown_timeout_ms`, then return. Returns true if every
    /// connection finished in time.
    pub async fn shutdown(self) -> bool {
        let _ = self.shutdown_tx.send(true);
        let mut clean = true;
        for task in self.tasks {
            clean &= tokio::time::timeout(self.shutdown_timeout, task)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false);
        }
        clean
    }
}

/// Accept connections until shutdown, then wait for open connections to
/// finish their in-flight requests. Returns true if all finished.
async fn accept_loop(
    index: usize,
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(listener = index, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                let service = service_fn(move |req| proxy.clone().handle(index, peer, req));
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "connection ended with an error: {e}");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    true
}
