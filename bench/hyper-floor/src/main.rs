//! The hyper floor: the smallest reverse proxy hyper 1 allows, for
//! `bench/run.py` to measure wasmlb against (not a product).
//!
//! `hyper-floor LISTEN BACKEND...`: one `current_thread` runtime; downstream
//! `hyper::server::conn::http1`; upstream a per-thread pool holding, per
//! backend, the idle `hyper::client::conn::http1::SendRequest`s (a connection
//! is taken when ready and put back as soon as its response head arrives; its
//! connection future runs as a local task); native round-robin; the request
//! URI rewritten to origin-form. No timeouts, retries, metrics or header
//! rewriting: every cost wasmlb adds above this is its own.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Sender = SendRequest<Incoming>;

/// Round-robin over the backends, and each backend's idle connections.
struct Pool {
    backends: Vec<SocketAddr>,
    idle: Vec<RefCell<VecDeque<Sender>>>,
    next: Cell<usize>,
}

impl Pool {
    async fn forward(&self, mut request: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let i = self.next.get() % self.backends.len();
        self.next.set(i.wrapping_add(1));
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| format!("{e}"))?;
        *request.uri_mut() = path;
        // A connection still streaming a response body stays pooled, not ready.
        let ready = {
            let mut idle = self.idle[i].borrow_mut();
            idle.retain(|s| !s.is_closed());
            idle.iter()
                .position(SendRequest::is_ready)
                .and_then(|at| idle.remove(at))
        };
        let mut sender = match ready {
            Some(s) => s,
            None => connect(self.backends[i]).await?,
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        self.idle[i].borrow_mut().push_back(sender);
        Ok(response)
    }
}

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::task::spawn_local(conn);
    Ok(sender)
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |s: &String| s.parse::<SocketAddr>().map_err(|e| format!("{s}: {e}"));
    let (listen, backends) = match args.split_first() {
        Some((l, b)) if !b.is_empty() => (
            parse(l)?,
            b.iter().map(parse).collect::<Result<Vec<_>, _>>()?,
        ),
        _ => return Err("usage: hyper-floor LISTEN BACKEND...".into()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let pool = Rc::new(Pool {
            idle: backends.iter().map(|_| RefCell::default()).collect(),
            backends,
            next: Cell::new(0),
        });
        let listener = TcpListener::bind(listen).await.map_err(|e| e.to_string())?;
        println!(
            "hyper-floor listening on {}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                let service = service_fn(move |request| {
                    let pool = pool.clone();
                    async move {
                        match pool.forward(request).await {
                            Ok(response) => Ok(response),
                            Err(e) => Err(e),
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
