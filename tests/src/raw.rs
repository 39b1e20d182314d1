//! Raw-socket tools for conformance tests: a recording backend that logs
//! every byte and counts complete requests with a strict HTTP/1.1 parser,
//! a raw HTTP/1 client, and a raw HTTP/2 (h2c prior knowledge) client that
//! can send frames no well-behaved library would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One request a [`RecordingBackend`] received completely.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The backend's name.
    pub backend: String,
    /// Method token.
    pub method: String,
    /// Request target.
    pub target: String,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Vec<u8>,
}

impl Recorded {
    /// Every value of header `name` (lowercase), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// How a [`RecordingBackend`] answers a complete request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordingMode {
    /// `200` with a body naming the backend.
    Normal,
    /// Close the connection as soon as the head is read (before any body):
    /// a backend fault after the request was (partly) sent.
    CloseAfterHead,
    /// Read the complete request, then close without answering.
    CloseAfterRequest,
}

#[derive(Debug, Default)]
struct Log {
    complete: Vec<Recorded>,
    /// Connections closed with a request started but not complete.
    incomplete: usize,
    /// Requests whose framing the strict parser refused.
    malformed: usize,
    bytes: usize,
}

/// A raw-TCP HTTP/1.1 backend on 127.0.0.1 that logs what it receives and
/// counts complete requests (strict framing: one `Content-Length`, or
/// `Transfer-Encoding: chunked` with valid chunks and trailers).
#[derive(Debug)]
pub struct RecordingBackend {
    /// Its name (`x-backend` of its responses).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    mode: Arc<Mutex<RecordingMode>>,
    task: JoinHandle<()>,
}

impl RecordingBackend {
    /// Start one named `name` on 127.0.0.1:0.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(Log::default()));
        let mode = Arc::new(Mutex::new(RecordingMode::Normal));
        let (l, m, n) = (log.clone(), mode.clone(), name.to_string());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, n.clone(), l.clone(), m.clone()));
            }
        });
        Self {
            name: name.into(),
            addr,
            log,
            mode,
            task,
        }
    }

    /// Change how it answers.
    pub fn set_mode(&self, mode: RecordingMode) {
        *self.mode.lock().expect("mode") = mode;
    }

    /// Forget everything recorded.
    pub fn reset(&self) {
        *self.log.lock().expect("log") = Log::default();
    }

    /// Complete requests received.
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().expect("log").complete.clone()
    }

    /// Connections that ended inside a request (an aborted partial).
    pub fn incomplete(&self) -> usize {
        self.log.lock().expect("log").incomplete
    }

    /// Requests whose framing was invalid (a proxy must never send one).
    pub fn malformed(&self) -> usize {
        self.log.lock().expect("log").malformed
    }

    /// Bytes received.
    pub fn bytes(&self) -> usize {
        self.log.lock().expect("log").bytes
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Parsed {
    Complete(Recorded, usize),
    NeedMore { started: bool },
    Malformed,
}

async fn serve(
    mut stream: TcpStream,
    name: String,
    log: Arc<Mutex<Log>>,
    mode: Arc<Mutex<RecordingMode>>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Answer every complete request already buffered.
        loop {
            let current = *mode.lock().expect("mode");
            if current == RecordingMode::CloseAfterHead && head_end(&buf).is_some() {
                // Count what was started, then fail like a crashing backend.
                log.lock().expect("log").incomplete += 1;
                return;
            }
            match parse(&buf, &name) {
                Parsed::Complete(req, used) => {
                    buf.drain(..used);
                    let summary =
                        format!("{} {} {} {}", name, req.method, req.target, req.body.len());
                    log.lock().expect("log").complete.push(req);
                    if current == RecordingMode::CloseAfterRequest {
                        return;
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-backend: {name}\r\n\r\n{summary}",
                        summary.len()
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Parsed::NeedMore { .. } => break,
                Parsed::Malformed => {
                    log.lock().expect("log").malformed += 1;
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if let Parsed::NeedMore { started: true } = parse(&buf, &name) {
                    log.lock().expect("log").incomplete += 1;
                }
                return;
            }
            Ok(n) => {
                log.lock().expect("log").bytes += n;
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Strictly parse one request at the start of `buf`.
fn parse(buf: &[u8], backend: &str) -> Parsed {
    if buf.is_empty() {
        return Parsed::NeedMore { started: false };
    }
    let Some(end) = head_end(buf) else {
        return if buf.len() > 1 << 20 {
            Parsed::Malformed
        } else {
            Parsed::NeedMore { started: true }
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end - 4]) else {
        return Parsed::Malformed;
    };
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = line.split(' ').collect();
    if parts.len() != 3 || parts[2] != "HTTP/1.1" {
        return Parsed::Malformed;
    }
    let mut headers = Vec::new();
    for l in lines {
        let Some((n, v)) = l.split_once(':') else {
            return Parsed::Malformed;
        };
        if n.is_empty() || n.contains([' ', '\t', '\r', '\n']) || v.contains(['\r', '\n', '\0']) {
            return Parsed::Malformed;
        }
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    let values = |name: &str| {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let te = values("transfer-encoding");
    let cl = values("content-length");
    let rest = &buf[end..];
    let (body, used) = if !te.is_empty() {
        if !cl.is_empty() || te.len() != 1 || !te[0].eq_ignore_ascii_case("chunked") {
            return Parsed::Malformed;
        }
        match dechunk(rest) {
            Ok(Some((body, used))) => (body, used),
            Ok(None) => return Parsed::NeedMore { started: true },
            Err(()) => return Parsed::Malformed,
        }
    } else if !cl.is_empty() {
        let Ok(n) = cl[0].parse::<usize>() else {
            return Parsed::Malformed;
        };
        if cl.len() != 1 || !cl[0].bytes().all(|b| b.is_ascii_digit()) {
            return Parsed::Malformed;
        }
        if rest.len() < n {
            return Parsed::NeedMore { started: true };
        }
        (rest[..n].to_vec(), n)
    } else {
        (Vec::new(), 0)
    };
    Parsed::Complete(
        Recorded {
            backend: backend.to_string(),
            method: parts[0].to_string(),
            target: parts[1].to_string(),
            headers,
            body,
        },
        end + used,
    )
}

/// Decode a chunked body: `Ok(None)` if incomplete, `Err` if malformed.
#[allow(clippy::type_complexity)]
fn dechunk(mut buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ()> {
    let total = buf.len();
    let mut body = Vec::new();
    loop {
        let Some(nl) = buf.windows(2).position(|w| w == b"\r\n") else {
            return if buf.len() > 4096 { Err(()) } else { Ok(None) };
        };
        let line = std::str::from_utf8(&buf[..nl]).map_err(|_| ())?;
        let size = line.split(';').next().unwrap_or_default();
        if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(());
        }
        let size = usize::from_str_radix(size, 16).map_err(|_| ())?;
        buf = &buf[nl + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(nl) = buf.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                let line = &buf[..nl];
                buf = &buf[nl + 2..];
                if line.is_empty() {
                    return Ok(Some((body, total - buf.len())));
                }
                if !line.contains(&b':') {
                    return Err(());
                }
            }
        }
        if buf.len() < size + 2 {
            return Ok(None);
        }
        if &buf[size..size + 2] != b"\r\n" {
            return Err(());
        }
        body.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

/// What a raw client does after writing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Keep the connection open and read.
    Wait,
    /// Shut down the write side (FIN), then read.
    HalfClose,
    /// Close the connection at once (no read).
    Close,
}

/// What a raw HTTP/1 client got back.
#[derive(Debug, Clone, Default)]
pub struct H1Reply {
    /// Status of the first response, if any arrived.
    pub status: Option<u16>,
    /// Number of response status lines seen.
    pub responses: usize,
    /// Everything received.
    pub raw: Vec<u8>,
}

/// Send `steps` to `addr` (pausing 20 ms between steps), do `after`, and
/// read until the proxy closes, `expect` complete responses have arrived,
/// or 3 s pass.
pub async fn h1_exchange(
    addr: SocketAddr,
    steps: &[Vec<u8>],
    after: After,
    expect: usize,
) -> H1Reply {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return H1Reply::default();
    };
    for (i, step) in steps.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if stream.write_all(step).await.is_err() {
            break;
        }
    }
    match after {
        After::Close => {
            drop(stream);
            // Give the proxy time to act on what it got.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return H1Reply::default();
        }
        After::HalfClose => {
            let _ = stream.shutdown().await;
        }
        After::Wait => {}
    }
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        if complete_responses(&raw) >= expect.max(1) {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let status = raw
        .strip_prefix(b"HTTP/1.1 ".as_slice())
        .or_else(|| raw.strip_prefix(b"HTTP/1.0 ".as_slice()))
        .and_then(|r| std::str::from_utf8(r.get(..3)?).ok()?.parse().ok());
    let responses = raw
        .windows(9)
        .filter(|w| w == b"HTTP/1.1 " || w == b"HTTP/1.0 ")
        .count();
    H1Reply {
        status,
        responses,
        raw,
    }
}

/// Count responses in `raw` whose head and `content-length` body are complete.
fn complete_responses(raw: &[u8]) -> usize {
    let mut n = 0;
    let mut rest = raw;
    while let Some(end) = head_end(rest) {
        let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        match len {
            Some(len) if rest.len() >= end + len => {
                n += 1;
                rest = &rest[end + len..];
            }
            _ => break,
        }
    }
    n
}

/// One HTTP/2 frame to send (raw: anything goes).
#[derive(Debug, Clone)]
pub enum H2Frame {
    /// HEADERS on `stream` with these fields (HPACK literal, never indexed,
    /// no validation: names and values are sent as given).
    Headers {
        /// Stream id.
        stream: u32,
        /// Fields, pseudo-headers included, in order.
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        /// END_STREAM.
        end_stream: bool,
    },
    /// DATA on `stream`.
    Data {
        /// Stream id.
        stream: u32,
        /// Payload.
        data: Vec<u8>,
        /// END_STREAM.
        end_stream: bool,
    },
    /// RST_STREAM with `code`.
    Reset {
        /// Stream id.
        stream: u32,
        /// Error code.
        code: u32,
    },
}

/// How an HTTP/2 stream ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum H2Outcome {
    /// A response with this status.
    Status(u16),
    /// The server reset the stream with this error code.
    Reset(u32),
    /// The server sent GOAWAY with this error code before answering.
    GoAway(u32),
    /// Nothing within the time limit, or the connection closed.
    Nothing,
}

/// Convenience: the fields of a request (`:method`, `:scheme` http,
/// `:authority`, `:path`) followed by `extra`.
pub fn h2_request(
    method: &str,
    authority: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut f: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b":method".to_vec(), method.as_bytes().to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
    ];
    if !authority.is_empty() {
        f.push((b":authority".to_vec(), authority.as_bytes().to_vec()));
    }
    if !path.is_empty() {
        f.push((b":path".to_vec(), path.as_bytes().to_vec()));
    }
    for (n, v) in extra {
        f.push((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    f
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK "literal header field never indexed, new name", no Huffman.
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    fn int(out: &mut Vec<u8>, prefix_bits: u8, first: u8, mut v: usize) {
        let max = (1usize << prefix_bits) - 1;
        if v < max {
            out.push(first | v as u8);
            return;
        }
        out.push(first | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }
    out.push(0x10);
    int(out, 7, 0, name.len());
    out.extend_from_slice(name);
    int(out, 7, 0, value.len());
    out.extend_from_slice(value);
}

/// Open an h2c (prior knowledge) connection to `addr`, send `frames`, and
/// report how each stream in `watch` ended (3 s at most). Also tells
/// whether the connection still served a fresh `GET /` afterwards (`None`
/// if the server had already sent GOAWAY).
pub async fn h2_exchange(
    addr: SocketAddr,
    frames: &[H2Frame],
    watch: &[u32],
    probe_after: bool,
) -> (Vec<H2Outcome>, Option<u16>) {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return (watch.iter().map(|_| H2Outcome::Nothing).collect(), None);
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    let encode = |fields: &[(Vec<u8>, Vec<u8>)]| {
        let mut block = Vec::new();
        for (n, v) in fields {
            hpack_literal(&mut block, n, v);
        }
        block
    };
    let mut last_stream = 0;
    let mut client_reset = Vec::new();
    for f in frames {
        match f {
            H2Frame::Headers {
                stream,
                fields,
                end_stream,
            } => {
                last_stream = last_stream.max(*stream);
                // HEADERS, then CONTINUATION frames: no frame over the
                // default SETTINGS_MAX_FRAME_SIZE (16,384 bytes).
                let block = encode(fields);
                let pieces: Vec<&[u8]> = block.chunks(16_384).collect();
                for (i, piece) in pieces.iter().enumerate() {
                    let last = i + 1 == pieces.len();
                    let end_headers = if last { 0x4 } else { 0 };
                    if i == 0 {
                        let flags = end_headers | if *end_stream { 0x1 } else { 0 };
                        out.extend(frame(0x1, flags, *stream, piece));
                    } else {
                        out.extend(frame(0x9, end_headers, *stream, piece));
                    }
                }
            }
            H2Frame::Data {
                stream,
                data,
                end_stream,
            } => out.extend(frame(0x0, u8::from(*end_stream), *stream, data)),
            H2Frame::Reset { stream, code } => {
                client_reset.push(*stream);
                out.extend(frame(0x3, 0, *stream, &code.to_be_bytes()))
            }
        }
    }
    if stream.write_all(&out).await.is_err() {
        return (watch.iter().map(|_| H2Outcome::Nothing).collect(), None);
    }
    let mut decoder = fluke_hpack::Decoder::new();
    let mut results: Vec<H2Outcome> = watch.iter().map(|_| H2Outcome::Nothing).collect();
    let mut buf: Vec<u8> = Vec::new();
    let mut goaway: Option<u32> = None;
    let mut probe_id: Option<u32> = None;
    let mut probe: Option<u16> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Parse every whole frame buffered.
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                0x1 => {
                    let mut block = &payload[..];
                    if flags & 0x8 != 0 && !block.is_empty() {
                        let pad = usize::from(block[0]);
                        block = &block[1..block.len().saturating_sub(pad)];
                    }
                    if flags & 0x20 != 0 && block.len() >= 5 {
                        block = &block[5..];
                    }
                    let status = decoder.decode(block).ok().and_then(|fields| {
                        fields
                            .iter()
                            .find(|(n, _)| n == b":status")
                            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
                    });
                    if let Some(i) = watch.iter().position(|&w| w == id)
                        && results[i] == H2Outcome::Nothing
                    {
                        results[i] = status.map_or(H2Outcome::Nothing, H2Outcome::Status);
                    }
                    if Some(id) == probe_id {
                        probe = status;
                    }
                }
                0x3 if payload.len() >= 4 => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if let Some(i) = watch.iter().position(|&w| w == id)
                        && results[i] == H2Outcome::Nothing
                    {
                        results[i] = H2Outcome::Reset(code);
                    }
                }
                0x4 if flags & 0x1 == 0 => {
                    let _ = stream.write_all(&frame(0x4, 0x1, 0, &[])).await;
                }
                0x6 if flags & 0x1 == 0 => {
                    let _ = stream.write_all(&frame(0x6, 0x1, 0, &payload)).await;
                }
                0x7 if payload.len() >= 8 => {
                    goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
                _ => {}
            }
        }
        // A stream the client reset itself gets no answer: done.
        let watched_done = results
            .iter()
            .zip(watch)
            .all(|(r, id)| *r != H2Outcome::Nothing || client_reset.contains(id));
        if watched_done && probe_after && probe_id.is_none() && goaway.is_none() {
            let id = last_stream + 2;
            probe_id = Some(id);
            let block = encode(&h2_request("GET", "probe.example", "/probe", &[]));
            let _ = stream.write_all(&frame(0x1, 0x5, id, &block)).await;
        }
        let probe_done = !probe_after || probe.is_some() || goaway.is_some();
        if watched_done && (probe_done || goaway.is_some()) {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    if let Some(code) = goaway {
        for r in &mut results {
            if *r == H2Outcome::Nothing {
                *r = H2Outcome::GoAway(code);
            }
        }
    }
    (results, probe)
}
