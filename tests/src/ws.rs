//! Backends for tunnel tests: a WebSocket echo server (tokio-tungstenite)
//! and a raw upgrade echo server (answers `101` to `Upgrade: echo` and
//! echoes bytes until the client ends its stream), each on 127.0.0.1:0 and
//! stopped (every connection cut) on drop or [`TunnelBackend::kill`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// What a tunnel backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    /// WebSocket: text messages come back as `"<name>: <text>"`, binary
    /// ones unchanged.
    WebSocket,
    /// `Upgrade: echo`: after the 101, every byte comes back; a request
    /// without `Upgrade` gets `200` with body `no upgrade`, one upgrading
    /// to another protocol `426 Upgrade Required`.
    RawEcho,
}

/// A tunnel backend.
#[derive(Debug)]
pub struct TunnelBackend {
    /// Its name (in WebSocket echoes).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TunnelBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TunnelBackend {
    /// Start one on 127.0.0.1:0.
    pub async fn start(name: &str, kind: TunnelKind) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (n, o, a, h) = (
            name.to_string(),
            open.clone(),
            accepted.clone(),
            heads.clone(),
        );
        let task = tokio::spawn(async move {
            // Connections live in the set: aborting the accept task cuts them.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let (n, o, a, h) = (n.clone(), o.clone(), a.clone(), h.clone());
                        connections.spawn(async move {
                            o.fetch_add(1, Ordering::SeqCst);
                            match kind {
                                TunnelKind::WebSocket => websocket(stream, &n, &a, &h).await,
                                TunnelKind::RawEcho => raw_echo(stream, &a, &h).await,
                            }
                            o.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Self {
            name: name.to_string(),
            addr,
            open,
            accepted,
            heads,
            task,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Upgrades accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The request heads received, lowercased.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("heads").clone()
    }

    /// Stop listening and cut every connection at once.
    pub fn kill(&self) {
        self.task.abort();
    }
}

async fn websocket(
    stream: TcpStream,
    name: &str,
    accepted: &AtomicUsize,
    heads: &Mutex<Vec<String>>,
) {
    // The callback's error type is tungstenite's (large) error response.
    #[allow(clippy::result_large_err)]
    let record =
        |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
         resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
            let mut head = format!("{} {}\r\n", req.method(), req.uri());
            for (k, v) in req.headers() {
                head.push_str(&format!("{}: {}\r\n", k, v.to_str().unwrap_or("?")));
            }
            heads.lock().expect("heads").push(head.to_ascii_lowercase());
            Ok(resp)
        };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
        return;
    };
    accepted.fetch_add(1, Ordering::SeqCst);
    while let Some(Ok(message)) = ws.next().await {
        let reply = match message {
            Message::Text(t) => Message::text(format!("{name}: {}", t.as_str())),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => break,
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
    let _ = ws.close(None).await;
}

async fn raw_echo(mut stream: TcpStream, accepted: &AtomicUsize, heads: &Mutex<Vec<String>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    heads.lock().expect("heads").push(head.clone());
    if head.contains("\r\nupgrade:") && !head.contains("\r\nupgrade: echo") {
        let _ = stream
            .write_all(
                b"HTTP/1.1 426 Upgrade Required\r\nupgrade: echo\r\ncontent-length: 4\r\n\r\necho",
            )
            .await;
        return;
    }
    if !head.contains("\r\nupgrade: echo") {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nno upgrade")
            .await;
        return;
    }
    if stream
        .write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .is_err()
    {
        return;
    }
    accepted.fetch_add(1, Ordering::SeqCst);
    // Bytes that came with the head are the tunnel's first.
    if stream.write_all(&buf[end..]).await.is_err() {
        return;
    }
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}
