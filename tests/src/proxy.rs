//! The proxy under test: in-process ([`InProcessProxy`]) or the `wasmlb`
//! binary as a child process ([`ProxyProcess`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::*;

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
        std::fs::write(&self._config.path, builtins_from_env(toml)).expect("rewrite config");
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

    /// The addresses of upstream `name`'s backends now, in id order.
    pub fn backend_addresses(&self, name: &str) -> Vec<String> {
        self.upstream(name)
            .backends()
            .iter()
            .map(|b| b.address.to_string())
            .collect()
    }

    /// Wait (at most [`crate::WAIT`]) until upstream `name`'s backends are
    /// `want`, in order; panics with what they are otherwise.
    pub async fn wait_for_backends(&self, name: &str, want: &[String]) {
        let deadline = tokio::time::Instant::now() + crate::WAIT;
        loop {
            let got = self.backend_addresses(name);
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "backends of {name} are {got:?}, want {want:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
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
pub(crate) fn workspace_bin(name: &str, env: &str) -> PathBuf {
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

/// For each `(extra, want)`: `wasmlb --check` on an `app` upstream
/// (round-robin over one backend) with `extra` appended exits 1 and its
/// error contains `want`.
pub fn assert_config_errors(cases: &[(&str, &str)]) {
    for (extra, want) in cases {
        let file = ConfigFile::new(&app_config(
            "round-robin",
            "{ address = \"127.0.0.1:1\" }",
            extra,
        ));
        let (code, _, err) = check(&file.path);
        assert_eq!(code, 1, "{extra}: {err}");
        assert!(err.contains(want), "{extra}: got {err:?}, want {want:?}");
    }
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
    /// More arguments for wasmlb (`["--log-format", "json"]`).
    pub args: &'a [&'a str],
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
            .args(launch.args)
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
        std::fs::write(&self._config.path, builtins_from_env(toml)).expect("rewrite config");
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
