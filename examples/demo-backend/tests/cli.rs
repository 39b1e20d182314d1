//! The `demo-backend` binary: one named backend per address, each announced
//! on stdout and answering with its name. (Having an integration test also
//! makes `cargo test --workspace` build the binary, which the wasmlb
//! integration tests run as a killable backend process.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

#[test]
fn each_address_gets_a_named_backend() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo-backend"))
        .args(["127.0.0.1:0", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn demo-backend");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for expected in ["b1", "b2"] {
        let line = lines.next().expect("a line").expect("utf-8");
        let (name, addr) = line.split_once(" listening on ").expect("announcement");
        assert_eq!(name, expected);
        addrs.push(addr.parse().expect("an address"));
    }
    let mut stream = TcpStream::connect(addrs[1]).expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let _ = child.kill();
    let _ = child.wait();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("x-backend: b2"), "{response}");
    assert!(response.ends_with("hello from b2\n"), "{response}");
}
