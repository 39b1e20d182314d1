//! A real DNS server for the tests: `dnsmasq` (Debian package `dnsmasq`)
//! on 127.0.0.1 at a port from [`crate::free_port`], answering A and AAAA
//! queries from a hosts file that [`DnsServer::set_hosts`] rewrites (then
//! SIGHUP makes dnsmasq re-read it). Killed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::WAIT;

/// A running dnsmasq.
#[derive(Debug)]
pub struct DnsServer {
    child: Option<Child>,
    srv: Vec<String>,
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    hosts: PathBuf,
    _dir: tempfile::TempDir,
}

impl DnsServer {
    /// Start dnsmasq serving `hosts` (hosts-file lines, `IP name`) with a
    /// TTL of `ttl_s` seconds, and wait until it answers.
    pub fn start(hosts: &str, ttl_s: u32) -> Self {
        Self::start_with_srv(hosts, &[], ttl_s)
    }

    /// As [`DnsServer::start`], also answering SRV records, each written as
    /// dnsmasq's `--srv-host` value: `_service._proto.domain,target,port,priority,weight`.
    pub fn start_with_srv(hosts: &str, srv: &[&str], ttl_s: u32) -> Self {
        let dir = tempfile::tempdir().expect("dns dir");
        let file = dir.path().join("hosts");
        std::fs::write(&file, hosts).expect("hosts file");
        let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let mut server = Self {
            child: None,
            srv: srv.iter().map(|s| format!("--srv-host={s}")).collect(),
            addr,
            hosts: file,
            _dir: dir,
        };
        server.spawn(ttl_s);
        server
    }

    fn spawn(&mut self, ttl_s: u32) {
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--pid-file",
                "--user=root",
                "--log-facility=-",
                "--log-queries",
            ])
            .arg(format!("--port={}", self.addr.port()))
            .arg(format!("--addn-hosts={}", self.hosts.display()))
            .arg(format!("--local-ttl={ttl_s}"))
            .args(&self.srv)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.hosts.with_file_name("log"))
                    .expect("dnsmasq log"),
            )
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq; .ci/run installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| {
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                s.send_to(&query(), self.addr)?;
                let mut buf = [0u8; 512];
                s.recv(&mut buf)
            })
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "dnsmasq did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many A queries for `name` it has answered so far (from its
    /// `--log-queries` log).
    pub fn queries(&self, name: &str) -> usize {
        let log = std::fs::read_to_string(self.hosts.with_file_name("log")).unwrap_or_default();
        let needle = format!("query[A] {name} ");
        log.lines().filter(|l| l.contains(&needle)).count()
    }

    /// Replace the records and make dnsmasq re-read them.
    pub fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("hosts file");
        self.signal("HUP");
    }

    fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status();
        }
    }

    /// Replace the SRV records (dnsmasq reads them at start only: it is
    /// restarted on the same port).
    pub fn set_srv(&mut self, srv: &[&str], ttl_s: u32) {
        self.srv = srv.iter().map(|s| format!("--srv-host={s}")).collect();
        self.restart(ttl_s);
    }

    /// Kill it (queries then time out) until [`DnsServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port with the current hosts file.
    pub fn restart(&mut self, ttl_s: u32) {
        self.stop();
        self.spawn(ttl_s);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A DNS query for `localhost.` A: any answer (even NXDOMAIN) shows the
/// server is up.
fn query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x09localhost\x00\x00\x01\x00\x01");
    q
}
