//! The integration-test harness: real backends on ephemeral 127.0.0.1 ports,
//! the real proxy (in-process through the `wasmlb` library, or the `wasmlb`
//! binary as a child process), and a real HTTP client. Everything started here
//! is stopped on drop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use wasmlb;

pub mod corpus;
pub mod raw;

/// Paths of the plugins built for the tests by `build.rs`.
pub mod plugins {
    /// `examples/header-route`.
    pub const HEADER_ROUTE: &str = concat!(env!("OUT_DIR"), "/header-route.wasm");
    /// Panics in every `select`.
    pub const TRAP: &str = concat!(env!("OUT_DIR"), "/test-plugin-trap.wasm");
    /// Loops forever in every `select`.
    pub const BUSY_LOOP: &str = concat!(env!("OUT_DIR"), "/test-plugin-busy-loop.wasm");
    /// Answers a backend id outside the set.
    pub const BAD_ANSWER: &str = concat!(env!("OUT_DIR"), "/test-plugin-bad-answer.wasm");
    /// Fails `init`.
    pub const BAD_INIT: &str = concat!(env!("OUT_DIR"), "/test-plugin-bad-init.wasm");
    /// Allocates without bound (memory.grow until the cap).
    pub const MEMORY_BOMB: &str = concat!(env!("OUT_DIR"), "/test-plugin-memory-bomb.wasm");
    /// Recurses without bound.
    pub const DEEP_RECURSION: &str = concat!(env!("OUT_DIR"), "/test-plugin-deep-recursion.wasm");
    /// Calls host functions in an endless loop.
    pub const HOST_CALL_FLOOD: &str = concat!(env!("OUT_DIR"), "/test-plugin-host-call-flood.wasm");
    /// A std guest importing `wasi:filesystem`.
    pub const WASI_IMPORT: &str = concat!(env!("OUT_DIR"), "/test-plugin-wasi-import.wasm");
}

/// Upper bound on any single wait in the harness.
pub const WAIT: Duration = Duration::from_secs(20);

type TestBody = BoxBody<Bytes, Infallible>;

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
struct Shared {
    mode: std::sync::Mutex<Mode>,
    ids: std::sync::Mutex<Vec<String>>,
}

impl TestBackend {
    /// Start a backend named `name` on 127.0.0.1:0.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test backend");
        let addr = listener.local_addr().expect("backend addr");
        let hits = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let shared = Arc::new(Shared {
            mode: std::sync::Mutex::new(Mode::Normal),
            ids: std::sync::Mutex::new(Vec::new()),
        });
        let (n, h, up, sh) = (
            name.to_string(),
            hits.clone(),
            healthy.clone(),
            shared.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (n, h, up, sh) = (n.clone(), h.clone(), up.clone(), sh.clone());
                tokio::spawn(async move {
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
            task,
        }
    }

    /// Change how it answers (see [`Mode`]).
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().expect("mode") = mode;
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn query_u64(req: &Request<Incoming>, key: &str) -> u64 {
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
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for Dropped {}

async fn serve(
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

async fn respond(
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

/// An address on 127.0.0.1 where nothing listens (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// `{ address = "..." }` entries for a TOML `backends = [...]` list.
pub fn backend_list(backends: &[&TestBackend]) -> String {
    backends
        .iter()
        .map(|b| format!("{{ address = \"{}\" }}", b.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A config with one listener on 127.0.0.1:0 whose default upstream `app`
/// uses `plugin` (a built-in name or a path) over `backends` (the inside of a
/// TOML list, see [`backend_list`]); `extra` is appended verbatim (more keys of
/// `[upstream.app]`, or further tables).
pub fn app_config(plugin: &str, backends: &str, extra: &str) -> String {
    format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [upstream.app]\nplugin = '{plugin}'\nbackends = [ {backends} ]\n{extra}\n"
    )
}

/// Like [`backend_list`], with each backend labelled `name = "<its name>"`
/// (what `examples/header-route` matches its header against).
pub fn named_backend_list(backends: &[TestBackend]) -> String {
    backends
        .iter()
        .map(|b| {
            format!(
                r#"{{ address = "{}", labels = {{ name = "{}" }} }}"#,
                b.addr, b.name
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A config file in a fresh temporary directory (removed on drop).
#[derive(Debug)]
pub struct ConfigFile {
    /// The file.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ConfigFile {
    /// Write `toml` to `<tmp>/wasmlb.toml`.
    pub fn new(toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wasmlb.toml");
        std::fs::write(&path, toml).expect("write config");
        Self { path, _dir: dir }
    }

    /// The directory holding the file.
    pub fn dir(&self) -> &Path {
        self.path.parent().expect("config dir")
    }
}

/// The proxy running in this process through the `wasmlb` library.
#[derive(Debug)]
pub struct InProcessProxy {
    server: Option<wasmlb::server::RunningServer>,
    /// Bound address of each listener.
    pub addrs: Vec<SocketAddr>,
    _config: ConfigFile,
}

impl InProcessProxy {
    /// Load `toml` (listener addresses should use port 0) and start serving.
    pub async fn start(toml: &str) -> Self {
        Self::start_with(toml, |_| {}).await
    }

    /// As [`InProcessProxy::start`], after `prepare` has run on the config
    /// file's directory (to create files the config names).
    pub async fn start_with(toml: &str, prepare: impl FnOnce(&Path)) -> Self {
        let config = ConfigFile::new(toml);
        prepare(config.dir());
        let loaded = wasmlb::config::Config::load(&config.path).expect("valid config");
        let server = wasmlb::server::Server::start(&loaded)
            .await
            .expect("server starts");
        let addrs = server.local_addrs().to_vec();
        Self {
            server: Some(server),
            addrs,
            _config: config,
        }
    }

    /// `http://<listener 0>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addrs[0])
    }

    /// `http://<admin listener><path>`; panics if the config has no `[admin]`.
    pub fn admin_url(&self, path: &str) -> String {
        let admin = self
            .server
            .as_ref()
            .and_then(|s| s.admin_addr())
            .expect("config has [admin]");
        format!("http://{admin}{path}")
    }

    /// Overwrite the config file (for `POST /reload`).
    pub fn rewrite_config(&self, toml: &str) {
        std::fs::write(&self._config.path, toml).expect("rewrite config");
    }

    /// The directory holding the config file.
    pub fn config_dir(&self) -> &Path {
        self._config.dir()
    }

    /// The running server's control plane.
    pub fn control(&self) -> wasmlb::server::Control {
        self.server.as_ref().expect("running").control().clone()
    }

    /// The running upstream `name`.
    pub fn upstream(&self, name: &str) -> Arc<wasmlb::upstream::Upstream> {
        self.server
            .as_ref()
            .and_then(|s| s.upstream(name))
            .expect("upstream exists")
            .clone()
    }

    /// Shut down gracefully; true if every connection finished in time.
    pub async fn stop(mut self) -> bool {
        match self.server.take() {
            Some(s) => s.shutdown().await,
            None => true,
        }
    }
}

/// The `wasmlb` binary built by `cargo test --workspace` (target/<profile>/wasmlb),
/// or `$WASMLB_BIN`.
pub fn wasmlb_bin() -> PathBuf {
    workspace_bin("wasmlb", "WASMLB_BIN")
}

/// Binary `name` of this workspace, next to the running test binary
/// (target/<profile>/deps/<test> -> target/<profile>/<name>), or the path in
/// environment variable `env`. `cargo test --workspace` builds the binaries
/// of packages that have integration tests.
fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.is_file(),
        "{} not found: run `cargo test --workspace` (it builds the binary) or set {env}",
        bin.display()
    );
    bin
}

/// One response seen by a [`load`] client.
#[derive(Debug)]
pub struct Seen {
    /// When the request was sent.
    pub started: std::time::Instant,
    /// When its body was complete (or it failed).
    pub finished: std::time::Instant,
    /// The status, or the client error.
    pub status: Result<u16, String>,
    /// `x-wasmlb-plugin` (with `debug_headers`).
    pub plugin: String,
    /// `x-backend` (the backend's own name).
    pub backend: String,
    /// `x-wasmlb-backend` (the backend's address, with `debug_headers`).
    pub address: String,
}

/// Most requests one [`load`] client sends, so a load test is bounded in
/// count as well as in time.
pub const LOAD_MAX_PER_CLIENT: usize = 200_000;

/// Start `clients` tasks sending GET `url` without pause until `stop` (or
/// [`LOAD_MAX_PER_CLIENT`] requests); each returns what it saw.
pub fn load(
    url: String,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<JoinHandle<Vec<Seen>>> {
    (0..clients)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) && seen.len() < LOAD_MAX_PER_CLIENT {
                    let started = std::time::Instant::now();
                    let (status, plugin, backend, address) = match c.get(&url).send().await {
                        Ok(r) => {
                            let header = |n: &str| {
                                r.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            let names = (
                                header("x-wasmlb-plugin"),
                                header("x-backend"),
                                header("x-wasmlb-backend"),
                            );
                            let status = r.status().as_u16();
                            let status = r.bytes().await.map(|_| status).map_err(|e| e.to_string());
                            (status, names.0, names.1, names.2)
                        }
                        Err(e) => (
                            Err(e.to_string()),
                            String::new(),
                            String::new(),
                            String::new(),
                        ),
                    };
                    seen.push(Seen {
                        started,
                        finished: std::time::Instant::now(),
                        status,
                        plugin,
                        backend,
                        address,
                    });
                }
                seen
            })
        })
        .collect()
}

/// Wait for every [`load`] client and merge what they saw.
pub async fn collect(tasks: Vec<JoinHandle<Vec<Seen>>>) -> Vec<Seen> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

/// Every request got a 200 and a complete body.
pub fn assert_all_ok(seen: &[Seen]) {
    let failures: Vec<_> = seen.iter().filter(|s| s.status != Ok(200)).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        seen.len(),
        failures.first()
    );
}

/// `demo-backend` (examples/demo-backend) built by `cargo test --workspace`
/// next to the test binary, or `$DEMO_BACKEND_BIN`.
pub fn demo_backend_bin() -> PathBuf {
    workspace_bin("demo-backend", "DEMO_BACKEND_BIN")
}

/// The addresses a child announces on `stdout`, one per `... listening on
/// [http://]ADDR ...` line (wasmlb and demo-backend both print these), read
/// on a thread so the child never blocks on a full pipe.
fn announced_addrs(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<SocketAddr> {
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

/// Run `wasmlb --config <file> --check`; returns (exit code, stdout, stderr).
pub fn check(config: &Path) -> (i32, String, String) {
    let out = Command::new(wasmlb_bin())
        .args(["--check", "--config"])
        .arg(config)
        .output()
        .expect("run wasmlb --check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `wasmlb` binary as a child process; killed on drop.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    /// Bound address of each listener, read from its `listening on` lines
    /// (then the admin API's, if configured).
    pub addrs: Vec<SocketAddr>,
    _config: ConfigFile,
    log: Option<PathBuf>,
}

/// How to start a [`ProxyProcess`] beyond its config.
#[derive(Debug, Default)]
pub struct Launch<'a> {
    /// A command and arguments to run wasmlb under (`["prlimit", "--nofile=256"]`).
    pub wrapper: &'a [&'a str],
    /// `--log-level` (default `warn`).
    pub log_level: Option<&'a str>,
    /// Write stderr to a file (read with [`ProxyProcess::log_lines`])
    /// instead of inheriting it.
    pub capture_log: bool,
}

impl ProxyProcess {
    /// Start `wasmlb --config <toml>` and wait for `listeners` "listening on" lines.
    pub fn spawn(toml: &str, listeners: usize) -> Self {
        Self::launch(toml, listeners, &Launch::default())
    }

    /// As [`ProxyProcess::spawn`], as `launch` says.
    pub fn launch(toml: &str, listeners: usize, launch: &Launch<'_>) -> Self {
        let config = ConfigFile::new(toml);
        let (program, wrapper_args) = match launch.wrapper.split_first() {
            Some((p, rest)) => (PathBuf::from(p), rest.to_vec()),
            None => (wasmlb_bin(), Vec::new()),
        };
        let mut command = Command::new(program);
        command.args(wrapper_args);
        if !launch.wrapper.is_empty() {
            command.arg(wasmlb_bin());
        }
        let log = launch.capture_log.then(|| config.dir().join("wasmlb.log"));
        let stderr = match &log {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
            None => Stdio::inherit(),
        };
        let mut child = command
            .arg("--config")
            .arg(&config.path)
            .args(["--log-level", launch.log_level.unwrap_or("warn")])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn wasmlb");
        let rx = announced_addrs(child.stdout.take().expect("stdout"));
        let mut addrs = Vec::new();
        while addrs.len() < listeners {
            match rx.recv_timeout(WAIT) {
                Ok(a) => addrs.push(a),
                Err(e) => {
                    let _ = child.kill();
                    panic!("wasmlb did not report its listeners: {e}");
                }
            }
        }
        Self {
            child,
            addrs,
            _config: config,
            log,
        }
    }

    /// The lines written to stderr so far (with [`Launch::capture_log`]).
    pub fn log_lines(&self) -> Vec<String> {
        let path = self.log.as_ref().expect("started with capture_log");
        std::fs::read_to_string(path)
            .expect("read log")
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Open file descriptors of the process now.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("proc fd")
            .count()
    }

    /// Overwrite the config file (then send SIGHUP with [`ProxyProcess::signal`]).
    pub fn rewrite_config(&self, toml: &str) {
        std::fs::write(&self._config.path, toml).expect("rewrite config");
    }

    /// Send signal `name` (`HUP`, `TERM`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} failed");
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://<listener 0><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addrs[0])
    }

    /// Send SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "wasmlb did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("memory field")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 client that ignores proxy environment variables.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// An HTTP/2 cleartext (prior knowledge) client.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// GET `url`; returns (status, `x-backend` header or "", body).
pub async fn get(client: &reqwest::Client, url: &str) -> (u16, String, String) {
    let r = client.get(url).send().await.expect("request");
    let status = r.status().as_u16();
    let backend = r
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, backend, r.text().await.expect("body"))
}

/// GET `url` and return the body as text (panics on a transport error).
pub async fn text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body")
}

/// GET `url` and parse the body as JSON (panics if it is not).
pub async fn json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let body = text(client, url).await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Stream `len` bytes of [`pattern`] as a request body.
pub fn pattern_body(len: u64) -> reqwest::Body {
    let chunk = 256 * 1024u64;
    let stream = futures_util::stream::iter(0..len.div_ceil(chunk)).map(move |c| {
        let start = c * chunk;
        let end = (start + chunk).min(len);
        Ok::<_, Infallible>(Bytes::from((start..end).map(pattern).collect::<Vec<u8>>()))
    });
    reqwest::Body::wrap_stream(stream)
}
