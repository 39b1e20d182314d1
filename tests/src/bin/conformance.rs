//! `conformance`: run the conformance corpus (`wasmlb_tests::corpus`)
//! against wasmlb and, where installed, NGINX and HAProxy on the same two
//! raw recording backends, and print the differential table (Markdown).
//!
//! Each cell is `status/complete requests at the backends` (`closed`: no
//! response; `RST` / `GOAWAY`: HTTP/2 stream reset / connection closed).
//! The last column says whether wasmlb met the case's expectation.
//! Everything listens on 127.0.0.1; every process started is stopped.
//!
//! `cargo run -p wasmlb-tests --bin conformance [-- --only wasmlb]`

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wasmlb_tests::corpus::{self, Outcome, Target};
use wasmlb_tests::raw::RecordingBackend;
use wasmlb_tests::{InProcessProxy, closed_port, plugins};

/// A peer proxy run as a child process, killed on drop.
struct Peer {
    name: &'static str,
    h1: SocketAddr,
    h2: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], wasmlb_tests::free_port()))
}

fn installed(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn nginx(b0: SocketAddr, b1: SocketAddr, dead: SocketAddr) -> Option<Peer> {
    if !installed("nginx") {
        return None;
    }
    let dir = tempfile::tempdir().ok()?;
    let (h1, h2) = (free_port(), free_port());
    let d = dir.path().display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
         events {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/b;\n  proxy_temp_path {d}/p;\n\
         fastcgi_temp_path {d}/f;\n  uwsgi_temp_path {d}/u;\n  scgi_temp_path {d}/s;\n\
         upstream app {{ server {b0}; server {b1}; keepalive 8; }}\n\
         upstream dead {{ server {dead}; server {b1}; }}\n\
         server {{\n    listen {h1};\n    listen {h2} http2;\n\
         location /dead/ {{ proxy_pass http://dead; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $http_host; }}\n\
         location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $http_host; }}\n  }}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).ok()?;
    let args = [
        "-p".to_string(),
        d.to_string(),
        "-c".into(),
        path.display().to_string(),
    ];
    start_peer("nginx", &args, dir, h1, h2)
}

fn haproxy(b0: SocketAddr, b1: SocketAddr, dead: SocketAddr) -> Option<Peer> {
    if !installed("haproxy") {
        return None;
    }
    let dir = tempfile::tempdir().ok()?;
    let (h1, h2) = (free_port(), free_port());
    let conf = format!(
        "defaults\n  mode http\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n  retries 2\n  option redispatch\n\n\
         frontend f\n  bind {h1}\n  bind {h2} proto h2\n  use_backend dead if {{ path_beg /dead/ }}\n  default_backend app\n\n\
         backend app\n  balance first\n  server b0 {b0}\n  server b1 {b1}\n\n\
         backend dead\n  balance first\n  server d {dead}\n  server b1 {b1}\n"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, conf).ok()?;
    let args = ["-db".to_string(), "-f".into(), path.display().to_string()];
    start_peer("haproxy", &args, dir, h1, h2)
}

/// Run `name` with `args` (its config in `dir`), wait until it listens on
/// `h1`, and keep it (with `dir`) until dropped.
fn start_peer(
    name: &'static str,
    args: &[String],
    dir: tempfile::TempDir,
    h1: SocketAddr,
    h2: SocketAddr,
) -> Option<Peer> {
    let child = Command::new(name)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_listening(h1);
    Some(Peer {
        name,
        h1,
        h2,
        child,
        _dir: dir,
    })
}

fn wait_listening(addr: SocketAddr) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn run_all(target: Target<'_>, cases: &[corpus::Case]) -> Vec<Outcome> {
    let mut out = Vec::new();
    for case in cases {
        out.push(corpus::run(case, target).await);
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let only_wasmlb = std::env::args().any(|a| a == "wasmlb");
    let backends = vec![
        RecordingBackend::start("b0").await,
        RecordingBackend::start("b1").await,
    ];
    let (b0, b1, dead) = (backends[0].addr, backends[1].addr, closed_port());
    let cases = corpus::cases();
    let mut columns: Vec<(&str, Vec<Outcome>)> = Vec::new();

    let config = corpus::wasmlb_config(plugins::HEADER_ROUTE, b0, b1, dead);
    let proxy = InProcessProxy::start(&config).await;
    let target = Target {
        h1: proxy.addrs[0],
        h2: proxy.addrs[0],
        backends: &backends,
    };
    columns.push(("wasmlb", run_all(target, &cases).await));
    proxy.stop().await;

    if !only_wasmlb {
        for peer in [nginx(b0, b1, dead), haproxy(b0, b1, dead)]
            .into_iter()
            .flatten()
        {
            let target = Target {
                h1: peer.h1,
                h2: peer.h2,
                backends: &backends,
            };
            columns.push((peer.name, run_all(target, &cases).await));
        }
    }

    print!("| case | what |");
    for (name, _) in &columns {
        print!(" {name} |");
    }
    println!(" wasmlb meets expectation |");
    print!("| --- | --- |");
    for _ in &columns {
        print!(" --- |");
    }
    println!(" --- |");
    let mut passed = 0;
    for (i, case) in cases.iter().enumerate() {
        let what = case.what.replace('|', "\\|").replace('\n', "\\n");
        let what: String = what.chars().take(70).collect();
        print!("| {} | {} |", case.id, what);
        for (_, outcomes) in &columns {
            print!(" {} |", outcomes[i].cell());
        }
        let failures = columns[0].1[i].failures(case);
        if failures.is_empty() {
            passed += 1;
            println!(" yes |");
        } else {
            println!(" no: {} |", failures.join("; ").replace('|', "\\|"));
        }
    }
    println!();
    println!(
        "wasmlb: {passed} of {} cases meet their expectation; peers run: {}",
        cases.len(),
        columns
            .iter()
            .skip(1)
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    );
}
