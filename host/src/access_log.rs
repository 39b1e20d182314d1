//! The access log: one line per request, written off the request path.
//!
//! A request's [`Entry`] is filled as it is served and handed over when its
//! response body ends (or is dropped: a client that went away is logged
//! too), as Envoy logs at stream end. A bounded channel carries entries to
//! one writer thread, which wakes every [`FLUSH_INTERVAL_MS`], formats what
//! queued (`json`, or NGINX's/Apache's `combined`) into a buffer and
//! flushes it: a request neither formats nor wakes anyone.
//! The request path never waits for the disk: when the channel is full
//! ([`QUEUE_ENTRIES`]), the entry is dropped and counted
//! (`wasmlb_access_log_dropped_total`), as NGINX's `buffer=` and Envoy's async file
//! sink bound their memory.
//!
//! [`AccessLog::reopen`] (SIGUSR1, and every reload) closes and reopens the
//! file by its path, so a rotated file is let go (logrotate's `create`
//! mode, as NGINX's `USR1`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Instant, SystemTime};

use crate::config::{AccessLogConfig, AccessLogFormat};

/// Entries that may wait for the writer; more are dropped and counted.
pub const QUEUE_ENTRIES: usize = 16 * 1024;

/// One request, as the access log records it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When the request head was received.
    pub time: SystemTime,
    /// The same instant, for the duration.
    pub started: Instant,
    /// When the response ended (set by [`Pending`]).
    pub ended: Option<Instant>,
    /// The client (the PROXY header's, with `accept_proxy_protocol`).
    pub client: SocketAddr,
    /// The request method.
    pub method: http::Method,
    /// Path and query, as sent.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub protocol: http::Version,
    /// The response status sent.
    pub status: u16,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// The upstream that served it (`None`: no route matched, or refused
    /// before routing).
    pub upstream: Option<Arc<str>>,
    /// The backend of the last attempt (`None`: the proxy answered itself
    /// without trying one).
    pub backend: Option<SocketAddr>,
    /// Attempts made on backends (retries included).
    pub attempts: u32,
    /// Time spent choosing backends (plugin calls, host side), in µs.
    pub decision_us: u64,
    /// The fallback strategy decided (the plugin failed or its circuit
    /// breaker was open) at least once.
    pub fallback: bool,
    /// The proxy's own reason when it answered itself (a 4xx or 5xx no
    /// backend sent).
    pub error: Option<String>,
}

impl Entry {
    /// An entry for a request whose head was just received.
    pub fn new(
        client: SocketAddr,
        method: http::Method,
        path: String,
        protocol: http::Version,
    ) -> Self {
        Self {
            time: SystemTime::now(),
            started: Instant::now(),
            ended: None,
            client,
            method,
            path,
            protocol,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            upstream: None,
            backend: None,
            attempts: 0,
            decision_us: 0,
            fallback: false,
            error: None,
        }
    }

    /// From request head received to response end, in ms.
    pub fn duration_ms(&self) -> f64 {
        let end = self.ended.unwrap_or_else(Instant::now);
        end.duration_since(self.started).as_secs_f64() * 1000.0
    }

    fn protocol_str(&self) -> &'static str {
        match self.protocol {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_3 => "HTTP/3.0",
            _ => "HTTP/1.1",
        }
    }

    /// The JSON line (without its newline).
    pub fn json(&self) -> String {
        let mut out = Vec::with_capacity(320);
        // Writing into a Vec cannot fail.
        let _ = self.write_json(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Write the JSON object (without its newline) to `out`: serde_json over
    /// a borrowed view, no intermediate tree.
    fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            time: String,
            client: std::net::IpAddr,
            method: &'a str,
            path: &'a str,
            protocol: &'a str,
            status: u16,
            bytes_in: u64,
            bytes_out: u64,
            duration_ms: f64,
            upstream: Option<&'a str>,
            backend: Option<SocketAddr>,
            attempts: u32,
            decision_us: u64,
            fallback: bool,
            error: Option<&'a str>,
        }
        let line = Line {
            time: time::OffsetDateTime::from(self.time)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            client: self.client.ip(),
            method: self.method.as_str(),
            path: &self.path,
            protocol: self.protocol_str(),
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration_ms: (self.duration_ms() * 1000.0).round() / 1000.0,
            upstream: self.upstream.as_deref(),
            backend: self.backend,
            attempts: self.attempts,
            decision_us: self.decision_us,
            fallback: self.fallback,
            error: self.error.as_deref(),
        };
        serde_json::to_writer(out, &line).map_err(std::io::Error::other)
    }

    /// The NGINX/Apache `combined` line (without its newline), with the
    /// request time in seconds, the upstream, the backend and the attempts
    /// appended as NGINX's `$request_time $upstream_addr` are often added.
    /// Referer and user agent are not kept: `"-"`.
    pub fn combined(&self) -> String {
        const CLF: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
            "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
        );
        let time = time::OffsetDateTime::from(self.time)
            .format(CLF)
            .unwrap_or_default();
        let quoted = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        format!(
            "{} - - [{time}] \"{} {} {}\" {} {} \"-\" \"-\" {:.3} {} {} {}",
            self.client.ip(),
            self.method,
            quoted(&self.path),
            self.protocol_str(),
            self.status,
            self.bytes_out,
            self.duration_ms() / 1000.0,
            self.upstream.as_deref().unwrap_or("-"),
            self.backend
                .map_or_else(|| "-".to_string(), |b| b.to_string()),
            self.attempts,
        )
    }
}

enum Message {
    Entry(Box<Entry>),
    Reopen,
}

/// Where lines go.
enum Sink {
    Stdout,
    File { path: PathBuf, out: BufWriter<File> },
}

impl Sink {
    fn open(path: &Path) -> std::io::Result<Self> {
        if path == Path::new("-") {
            return Ok(Self::Stdout);
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self::File {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(64 * 1024, file),
        })
    }

    fn write_entry(&mut self, entry: &Entry, format: AccessLogFormat) -> std::io::Result<()> {
        fn write(
            out: &mut impl Write,
            entry: &Entry,
            format: AccessLogFormat,
        ) -> std::io::Result<()> {
            match format {
                AccessLogFormat::Json => entry.write_json(out)?,
                AccessLogFormat::Combined => out.write_all(entry.combined().as_bytes())?,
            }
            out.write_all(b"\n")
        }
        match self {
            Self::Stdout => write(&mut std::io::stdout().lock(), entry, format),
            Self::File { out, .. } => write(out, entry, format),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Stdout => std::io::stdout().flush(),
            Self::File { out, .. } => out.flush(),
        }
    }
}

/// Errors opening the access log.
#[derive(Debug, thiserror::Error)]
#[error("cannot open {path} for appending: {source}")]
pub struct AccessLogError {
    /// The path.
    pub path: String,
    /// Why it cannot be opened.
    pub source: std::io::Error,
}

/// The access log's sending side: cheap to share between requests.
#[derive(Debug)]
pub struct AccessLog {
    tx: SyncSender<Message>,
    /// `wasmlb_access_log_dropped_total` (process-wide: it survives reloads).
    dropped: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Entry(_) => "Entry",
            Self::Reopen => "Reopen",
        })
    }
}

impl AccessLog {
    /// Open the log `config` describes and start its writer thread (which
    /// ends once every [`AccessLog`] handle is dropped and the queue is
    /// written).
    ///
    /// # Errors
    /// The file cannot be opened for appending.
    pub fn start(
        config: &AccessLogConfig,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Result<Arc<Self>, AccessLogError> {
        let failed = |source| AccessLogError {
            path: config.path.display().to_string(),
            source,
        };
        let sink = Sink::open(&config.path).map_err(failed)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_ENTRIES);
        let format = config.format;
        std::thread::Builder::new()
            .name("wasmlb-access-log".into())
            .spawn(move || write_loop(&rx, sink, format))
            .map_err(failed)?;
        Ok(Arc::new(Self { tx, dropped }))
    }

    /// Queue `entry`; dropped (and counted) if the writer is behind.
    pub fn log(&self, entry: Box<Entry>) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Message::Entry(entry))
        {
            self.dropped.inc();
        }
    }

    /// Close and reopen the file by its path (log rotation).
    pub fn reopen(&self) {
        // A full queue: the reopen waits its turn rather than be lost.
        let _ = self.tx.send(Message::Reopen);
    }

    /// Entries dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

/// How often the writer drains the queue and flushes, in ms: lines reach
/// the file within about this long (NGINX's `flush=`), and requests never
/// wake the writer (a wake-up per request costs more than the line).
pub const FLUSH_INTERVAL_MS: u64 = 50;

fn write_loop(rx: &Receiver<Message>, mut sink: Sink, format: AccessLogFormat) {
    static WRITE_FAILED: crate::log_limit::LogLimiter = crate::log_limit::LogLimiter::new();
    let report = |e: std::io::Error| {
        if let Some(suppressed) = WRITE_FAILED.admit() {
            tracing::warn!(suppressed, "access log write failed: {e}");
        }
    };
    loop {
        let mut wrote = false;
        let closed = loop {
            match rx.try_recv() {
                Ok(Message::Entry(entry)) => {
                    wrote = true;
                    if let Err(e) = sink.write_entry(&entry, format) {
                        report(e);
                    }
                }
                Ok(Message::Reopen) => {
                    if let Err(e) = sink.flush() {
                        report(e);
                    }
                    if let Sink::File { path, .. } = &sink {
                        match Sink::open(&path.clone()) {
                            Ok(s) => sink = s,
                            Err(e) => report(e),
                        }
                    }
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if wrote && let Err(e) = sink.flush() {
            report(e);
        }
        if closed {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(FLUSH_INTERVAL_MS));
    }
}

/// An entry waiting for its response body to end; logged on drop.
#[derive(Debug)]
pub struct Pending {
    entry: Option<Box<Entry>>,
    log: Arc<AccessLog>,
    bytes_in: Option<Arc<AtomicU64>>,
}

impl Pending {
    /// `entry` to be written to `log` when this is dropped, with the
    /// request body bytes read from `bytes_in` then.
    pub fn new(entry: Box<Entry>, log: Arc<AccessLog>, bytes_in: Option<Arc<AtomicU64>>) -> Self {
        Self {
            entry: Some(entry),
            log,
            bytes_in,
        }
    }

    /// Count `n` response body bytes sent.
    pub fn sent(&mut self, n: usize) {
        if let Some(e) = self.entry.as_mut() {
            e.bytes_out += n as u64;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut entry) = self.entry.take() {
            entry.ended = Some(Instant::now());
            if let Some(n) = &self.bytes_in {
                entry.bytes_in = n.load(Ordering::Relaxed);
            }
            self.log.log(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut e = Entry::new(
            "10.0.0.1:5555".parse().expect("addr"),
            http::Method::POST,
            "/a?b=\"c\"".into(),
            http::Version::HTTP_11,
        );
        e.time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        e.ended = Some(e.started + std::time::Duration::from_millis(12));
        e.status = 502;
        e.bytes_in = 3;
        e.bytes_out = 40;
        e.upstream = Some("app".into());
        e.backend = Some("127.0.0.1:9".parse().expect("addr"));
        e.attempts = 2;
        e.error = Some("the backend could not be reached".into());
        e
    }

    #[test]
    fn json_lines_carry_every_field() {
        let v: serde_json::Value = serde_json::from_str(&entry().json()).expect("json");
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["client"], "10.0.0.1");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/a?b=\"c\"");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["status"], 502);
        assert_eq!(v["bytes_in"], 3);
        assert_eq!(v["bytes_out"], 40);
        assert_eq!(v["duration_ms"], 12.0);
        assert_eq!(v["upstream"], "app");
        assert_eq!(v["backend"], "127.0.0.1:9");
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["fallback"], false);
        assert_eq!(v["error"], "the backend could not be reached");
    }

    #[test]
    fn combined_lines_follow_nginx() {
        assert_eq!(
            entry().combined(),
            "10.0.0.1 - - [14/Nov/2023:22:13:20 +0000] \"POST /a?b=\\\"c\\\" HTTP/1.1\" 502 40 \
             \"-\" \"-\" 0.012 app 127.0.0.1:9 2"
        );
    }

    #[test]
    fn lines_reach_the_file_and_a_reopen_follows_a_rotation() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("access.log");
        let log = AccessLog::start(
            &AccessLogConfig {
                path: path.clone(),
                format: AccessLogFormat::Json,
            },
            prometheus_client::metrics::counter::Counter::default(),
        )
        .expect("start");
        log.log(Box::new(entry()));
        let wait_for = |p: &Path, lines: usize| {
            for _ in 0..500 {
                if std::fs::read_to_string(p).is_ok_and(|t| t.lines().count() >= lines) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("{} never had {lines} lines", p.display());
        };
        wait_for(&path, 1);
        // logrotate: move the file away, then ask for a reopen.
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).expect("rotate");
        log.reopen();
        log.log(Box::new(entry()));
        wait_for(&path, 1);
        assert_eq!(
            std::fs::read_to_string(&rotated)
                .expect("rotated")
                .lines()
                .count(),
            1
        );
        assert_eq!(log.dropped(), 0);
    }
}
