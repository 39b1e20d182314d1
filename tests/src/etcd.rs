//! A real etcd for the tests (Debian package `etcd-server`): one member on
//! 127.0.0.1, client and peer ports from [`crate::free_port`], its data in a
//! temp dir. It can be killed and started again on the same ports with the
//! same data. Killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::WAIT;

/// A running etcd.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`, its client URL.
    pub endpoint: String,
    peer: String,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Start etcd and wait until it answers.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("etcd dir");
        let mut server = Self {
            child: None,
            endpoint: format!("http://127.0.0.1:{}", crate::free_port()),
            peer: format!("http://127.0.0.1:{}", crate::free_port()),
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.endpoint))
            .arg(format!("--advertise-client-urls={}", self.endpoint))
            .arg(format!("--listen-peer-urls={}", self.peer))
            .arg(format!("--initial-advertise-peer-urls={}", self.peer))
            .arg(format!("--initial-cluster=test={}", self.peer))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian package etcd-server; .ci/run installs it)");
        self.child = Some(child);
        let health = format!("{}/health", self.endpoint);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if http_get(&health).is_some_and(|body| body.contains("\"health\":\"true\"")) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill it (requests then fail) until [`EtcdServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A client of this server.
    pub async fn client(&self) -> wasmlb::etcd::Client {
        wasmlb::etcd::connect(std::slice::from_ref(&self.endpoint))
            .await
            .expect("etcd client")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// GET `url` (plain HTTP/1.0): the body, if it answered.
fn http_get(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let mut s = std::net::TcpStream::connect(authority).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
