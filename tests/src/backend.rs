//! Test backends: in-process ones ([`TestBackend`]) and the `demo-backend`
//! binary as a child process ([`BackendProcess`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::*;

pub(crate) type TestBody = BoxBody<Bytes, Infallible>;

/// A test backend on an ephemeral port. Every response carries
/// `x-backend: <name>`. Paths:
/// - `/slow?ms=N`: answer after N ms.
/// - `/headers`: the request headers as a JSON object of arrays.
/// - `/upload`: read the body, answer `<bytes> <sha256 hex>`.
/// - `/download?bytes=N`: stream N bytes of [`pattern`] in 64 KiB chunks.
/// - `/healthz`: 200, or 503 after [`TestBackend::set_healthy`]`(false)`; not
///   counted in [`TestBackend::hits`].
/// - anything else: `hello from <name>`.
///
/// Every other request's `x-request-id` is recorded ([`TestBackend::ids`]);
/// [`TestBackend::set_mode`] makes it answer a fixed status or drop the
/// connection after reading the whole request.
#[derive(Debug)]
pub struct TestBackend {
    /// The backend's name.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<Shared>,
    /// Connections accepted and connections open now.
    conns: Arc<(AtomicU64, AtomicU64)>,
    task: JoinHandle<()>,
}

/// How a [`TestBackend`] answers requests other than `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As documented on [`TestBackend`].
    Normal,
    /// Answer this status with a short body.
    Status(u16),
    /// Read the whole request (recording its id), then close the connection
    /// without answering.
    Drop,
    /// Wait this many ms, then answer as `Normal`.
    Delay(u64),
}

#[derive(Debug)]
pub(crate) struct Shared {
    mode: std::sync::Mutex<Mode>,
    ids: std::sync::Mutex<Vec<String>>,
    paths: std::sync::Mutex<Vec<String>>,
}

impl TestBackend {
    /// Start a backend named `name` on 127.0.0.1:0.
    pub async fn start(name: &str) -> Self {
        Self::start_at(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Start a backend named `name` on `addr` (e.g. 127.0.0.2 with a port
    /// from [`crate::free_port`], for several backends behind one DNS name).
    pub async fn start_at(name: &str, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind test backend");
        let addr = listener.local_addr().expect("backend addr");
        let hits = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let shared = Arc::new(Shared {
            mode: std::sync::Mutex::new(Mode::Normal),
            ids: std::sync::Mutex::new(Vec::new()),
            paths: std::sync::Mutex::new(Vec::new()),
        });
        let conns = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let (n, h, up, sh, cs) = (
            name.to_string(),
            hits.clone(),
            healthy.clone(),
            shared.clone(),
            conns.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (n, h, up, sh) = (n.clone(), h.clone(), up.clone(), sh.clone());
                cs.0.fetch_add(1, Ordering::SeqCst);
                cs.1.fetch_add(1, Ordering::SeqCst);
                let open = OpenConn(cs.clone());
                tokio::spawn(async move {
                    let _open = open;
                    let service = service_fn(move |req: Request<Incoming>| {
                        let health =
                            (req.uri().path() == "/healthz").then(|| up.load(Ordering::Relaxed));
                        if health.is_none() {
                            h.fetch_add(1, Ordering::Relaxed);
                        }
                        serve(n.clone(), sh.clone(), req, health)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            name: name.to_string(),
            addr,
            hits,
            healthy,
            shared,
            conns,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.conns.0.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted, not yet closed by either side).
    pub fn open_connections(&self) -> u64 {
        self.conns.1.load(Ordering::SeqCst)
    }

    /// Change how it answers (see [`Mode`]).
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().expect("mode") = mode;
    }

    /// The path and query of every request received (not `/healthz`), in
    /// order.
    pub fn paths(&self) -> Vec<String> {
        self.shared.paths.lock().expect("paths").clone()
    }

    /// The `x-request-id` of every request received (not `/healthz`), in order.
    pub fn ids(&self) -> Vec<String> {
        self.shared.ids.lock().expect("ids").clone()
    }

    /// Start `n` backends named `b0..b{n-1}`.
    pub async fn start_many(n: usize) -> Vec<Self> {
        let mut v = Vec::new();
        for i in 0..n {
            v.push(Self::start(&format!("b{i}")).await);
        }
        v
    }

    /// Make `/healthz` answer 200 (`true`) or 503 (`false`).
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Requests received so far (not counting `/healthz`).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One open connection of a [`TestBackend`]: uncounted when dropped.
struct OpenConn(Arc<(AtomicU64, AtomicU64)>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.1.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The byte at offset `i` of a `/download` body.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

/// `(length, sha256 hex)` of `len` bytes of [`pattern`].
pub fn pattern_digest(len: u64) -> (u64, String) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        for (j, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(off + j as u64);
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    (len, hex(&h.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn query_u64(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The request was read and the connection is dropped on purpose.
#[derive(Debug)]
pub(crate) struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for Dropped {}

pub(crate) async fn serve(
    name: String,
    shared: Arc<Shared>,
    req: Request<Incoming>,
    health: Option<bool>,
) -> Result<Response<TestBody>, Dropped> {
    if health.is_some() {
        return respond(name, req, health).await.map_err(|e| match e {});
    }
    if let Some(id) = req.headers().get("x-request-id") {
        let id = String::from_utf8_lossy(id.as_bytes()).into_owned();
        shared.ids.lock().expect("ids").push(id);
    }
    let path = req.uri().path_and_query().map_or("", |p| p.as_str());
    shared.paths.lock().expect("paths").push(path.to_string());
    let mode = *shared.mode.lock().expect("mode");
    match mode {
        Mode::Normal => respond(name, req, None).await.map_err(|e| match e {}),
        Mode::Status(code) => {
            let _ = req.into_body().collect().await;
            Ok(Response::builder()
                .status(code)
                .header("x-backend", name.as_str())
                .body(Full::new(Bytes::from(format!("{code} from {name}"))).boxed())
                .expect("response"))
        }
        Mode::Drop => {
            let _ = req.into_body().collect().await;
            Err(Dropped)
        }
        Mode::Delay(ms) => {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            respond(name, req, None).await.map_err(|e| match e {})
        }
    }
}

pub(crate) async fn respond(
    name: String,
    req: Request<Incoming>,
    health: Option<bool>,
) -> Result<Response<TestBody>, Infallible> {
    let full = |s: String| Full::new(Bytes::from(s)).boxed();
    if let Some(healthy) = health {
        let status = if healthy { 200 } else { 503 };
        let r = Response::builder()
            .status(status)
            .body(full(format!("{name} health")))
            .expect("response");
        return Ok(r);
    }
    let body: TestBody = match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_u64(&req, "ms"))).await;
            full(format!("slow hello from {name}"))
        }
        "/headers" => {
            let mut map = serde_json::Map::new();
            for (k, v) in req.headers() {
                let entry = map
                    .entry(k.as_str())
                    .or_insert_with(|| serde_json::Value::Array(vec![]));
                if let serde_json::Value::Array(a) = entry {
                    a.push(String::from_utf8_lossy(v.as_bytes()).into());
                }
            }
            full(serde_json::Value::Object(map).to_string())
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut h = Sha256::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(data) = frame.data_ref() {
                    len += data.len() as u64;
                    h.update(data);
                }
            }
            full(format!("{len} {}", hex(&h.finalize())))
        }
        "/download" => {
            let total = query_u64(&req, "bytes");
            let chunk = 64 * 1024u64;
            let stream = futures_util::stream::iter((0..total.div_ceil(chunk)).map(move |c| {
                let start = c * chunk;
                let end = (start + chunk).min(total);
                let data: Vec<u8> = (start..end).map(pattern).collect();
                Ok::<_, Infallible>(Frame::data(Bytes::from(data)))
            }));
            BodyExt::boxed(StreamBody::new(stream))
        }
        _ => full(format!("hello from {name}")),
    };
    let response = Response::builder()
        .header("x-backend", name.as_str())
        .body(body)
        .expect("response");
    Ok(response)
}

/// An address on 127.0.0.1 where nothing listens: connecting is refused.
///
/// The port stays bound (never listening) for the life of the test binary,
/// so no backend started by a concurrent test, and no outgoing connection's
/// source port, can take it over; a port bound and released could be handed
/// out again by the kernel and turn a "dead" backend into a live one.
pub fn closed_port() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    HELD.lock().expect("closed ports").push(socket);
    addr
}

/// `demo-backend` (examples/demo-backend) built by `cargo test --workspace`
/// next to the test binary, or `$DEMO_BACKEND_BIN`.
pub fn demo_backend_bin() -> PathBuf {
    workspace_bin("demo-backend", "DEMO_BACKEND_BIN")
}

/// The addresses a child announces on `stdout`, one per `... listening on
/// [http://]ADDR ...` line (wasmlb and demo-backend both print these), read
/// on a thread so the child never blocks on a full pipe.
pub(crate) fn announced_addrs(
    stdout: std::process::ChildStdout,
) -> std::sync::mpsc::Receiver<SocketAddr> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line
                .split("listening on ")
                .nth(1)
                .map(|rest| rest.trim_start_matches("http://"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                let _ = tx.send(addr);
            }
        }
    });
    rx
}

/// A backend in its own process (`demo-backend` on 127.0.0.1:0), so tests can
/// SIGKILL or SIGSTOP it; killed (and resumed first) on drop.
#[derive(Debug)]
pub struct BackendProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl BackendProcess {
    /// Start one and wait for its `listening on` line.
    pub fn spawn() -> Self {
        let mut child = Command::new(demo_backend_bin())
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn demo-backend");
        let rx = announced_addrs(child.stdout.take().expect("stdout"));
        match rx.recv_timeout(WAIT) {
            Ok(addr) => Self { child, addr },
            Err(e) => {
                let _ = child.kill();
                panic!("demo-backend did not report its address: {e}");
            }
        }
    }

    /// Send signal `name` (`KILL`, `STOP`, `CONT`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} failed");
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
