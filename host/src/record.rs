//! The trace recorder of an upstream (`[upstream.NAME.record]`): one JSON
//! line per sampled request, in the format `wasmlb simulate --trace`
//! replays, written off the request path.
//!
//! A line holds what the plugin decided on and what came of it:
//!
//! ```json
//! {"at_ms":1763800000123.4,"method":"GET","path":"/a?b=1","client":"10.0.0.7:51234",
//!  "headers":{"x-user":"42"},"backend":"10.0.1.2:8080","status":200,"duration_ms":3.2}
//! ```
//!
//! `at_ms` is the arrival time in ms since the Unix epoch; `headers` are
//! only the request headers the plugin read during its decision (so cookies
//! and credentials it never looked at stay out of the file); `backend` is
//! the backend of the last attempt (absent when none was chosen);
//! `duration_ms` runs from the request's arrival to its response head.
//! Lines are written when the response head is known, so they are not in
//! `at_ms` order; `simulate` sorts them.
//!
//! A bounded channel ([`QUEUE`]) carries records to one writer thread, which
//! appends them to the file and flushes every 100 ms; a full channel drops
//! the record (counted in [`Recorder::dropped`]). Recording stops for good,
//! logged once, when the file reaches `max_bytes`.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use crate::config::RecordConfig;

/// Records that may wait for the writer; more are dropped.
pub const QUEUE: usize = 16 * 1024;

/// The recorder could not open its file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct RecordError {
    /// The file.
    pub path: String,
    /// The OS error.
    pub source: std::io::Error,
}

/// One line of a trace.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TraceRecord {
    /// Arrival, in ms since the Unix epoch.
    pub at_ms: f64,
    /// The request method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The client address.
    pub client: SocketAddr,
    /// The request headers the plugin read, lowercase names.
    pub headers: BTreeMap<String, String>,
    /// The backend of the last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<SocketAddr>,
    /// The response status.
    pub status: u16,
    /// From arrival to the response head, in ms.
    pub duration_ms: f64,
}

/// A sampled request's record, waiting for its response.
#[derive(Debug)]
pub struct TraceStart {
    recorder: Arc<Recorder>,
    started: Instant,
    record: TraceRecord,
}

impl TraceStart {
    /// Complete the record with the response's `status` and the last
    /// attempt's `backend`, and hand it to the writer.
    pub fn finish(mut self, status: u16, backend: Option<SocketAddr>) {
        self.record.status = status;
        self.record.backend = backend;
        self.record.duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.recorder.push(self.record);
    }
}

/// A running recorder; its writer thread ends when the last handle goes.
#[derive(Debug)]
pub struct Recorder {
    tx: SyncSender<TraceRecord>,
    sampler: crate::sampling::Sampler,
    dropped: AtomicU64,
    /// Set by the writer once `max_bytes` is reached.
    full: Arc<AtomicBool>,
}

impl Recorder {
    /// Open (append to) the file `config` names and start its writer.
    ///
    /// # Errors
    /// [`RecordError`] if the file cannot be opened or the thread started.
    pub fn start(config: &RecordConfig, upstream: &str) -> Result<Arc<Self>, RecordError> {
        let shown = config.path.display().to_string();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)
            .map_err(|source| RecordError {
                path: shown.clone(),
                source,
            })?;
        let written = file.metadata().map_or(0, |m| m.len());
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let full = Arc::new(AtomicBool::new(written >= config.max_bytes));
        let writer = Writer {
            out: BufWriter::new(file),
            path: config.path.clone(),
            written,
            max_bytes: config.max_bytes,
            full: full.clone(),
            upstream: upstream.to_string(),
        };
        std::thread::Builder::new()
            .name("wasmlb-record".into())
            .spawn(move || writer.run(&rx))
            .map_err(|source| RecordError {
                path: shown,
                source,
            })?;
        Ok(Arc::new(Self {
            tx,
            sampler: crate::sampling::Sampler::new(config.sample_percent),
            dropped: AtomicU64::new(0),
            full,
        }))
    }

    /// Begin the record of a request arriving now, if it is sampled (and
    /// the file is not full): `headers` are those the plugin read, with
    /// their values in `request`.
    pub fn begin(
        self: &Arc<Self>,
        request: &http::request::Parts,
        client: SocketAddr,
        started: Instant,
        headers: &[String],
    ) -> Option<Box<TraceStart>> {
        if self.full.load(Ordering::Relaxed) || !self.sampler.sample() {
            return None;
        }
        let at = SystemTime::now()
            .checked_sub(started.elapsed())
            .unwrap_or_else(SystemTime::now);
        let at_ms = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let headers = headers
            .iter()
            .filter_map(|name| {
                let value = request.headers.get(name.as_str())?;
                Some((
                    name.clone(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                ))
            })
            .collect();
        Some(Box::new(TraceStart {
            recorder: self.clone(),
            started,
            record: TraceRecord {
                at_ms: (at_ms * 10.0).round() / 10.0,
                method: request.method.to_string(),
                path: request
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string(),
                client,
                headers,
                backend: None,
                status: 0,
                duration_ms: 0.0,
            },
        }))
    }

    fn push(&self, record: TraceRecord) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(record) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

struct Writer {
    out: BufWriter<std::fs::File>,
    path: PathBuf,
    written: u64,
    max_bytes: u64,
    full: Arc<AtomicBool>,
    upstream: String,
}

impl Writer {
    fn run(mut self, rx: &Receiver<TraceRecord>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(record) => self.write(&record),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.out.flush();
                    return;
                }
            }
            while let Ok(record) = rx.try_recv() {
                self.write(&record);
            }
            if let Err(e) = self.out.flush() {
                tracing::warn!(upstream = %self.upstream, file = %self.path.display(), "trace recorder: {e}");
            }
        }
    }

    fn write(&mut self, record: &TraceRecord) {
        if self.full.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        if self.written + line.len() as u64 > self.max_bytes {
            self.full.store(true, Ordering::Relaxed);
            tracing::warn!(
                upstream = %self.upstream,
                file = %self.path.display(),
                max_bytes = self.max_bytes,
                "trace recorder: max_bytes reached, recording stopped"
            );
            return;
        }
        if let Err(e) = self.out.write_all(&line) {
            tracing::warn!(upstream = %self.upstream, file = %self.path.display(), "trace recorder: {e}");
            return;
        }
        self.written += line.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_hold_the_read_headers_only_and_stop_at_max_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        let config = RecordConfig {
            path: path.clone(),
            sample_percent: 100,
            max_bytes: 600,
        };
        let recorder = Recorder::start(&config, "app").unwrap();
        let request = http::Request::builder()
            .uri("/a?b=1")
            .header("x-user", "42")
            .header("cookie", "secret")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let client: SocketAddr = "10.0.0.7:5000".parse().unwrap();
        let backend: SocketAddr = "10.0.1.2:80".parse().unwrap();
        let mut begun = 0;
        for _ in 0..10 {
            // None once the writer has found the file full.
            if let Some(t) = recorder.begin(
                &request,
                client,
                Instant::now(),
                &["x-user".into(), "x-missing".into()],
            ) {
                t.finish(200, Some(backend));
                begun += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(begun >= 2, "{begun}");
        drop(recorder);
        std::thread::sleep(Duration::from_millis(300));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= 600, "{}", text.len());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() >= 2 && lines.len() < 10, "{}", lines.len());
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["headers"], serde_json::json!({"x-user": "42"}));
        assert_eq!(first["backend"], "10.0.1.2:80");
        assert_eq!(first["path"], "/a?b=1");
        assert!(!text.contains("secret"));
    }
}
