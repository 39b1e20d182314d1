//! The conformance corpus: raw HTTP/1 and HTTP/2 requests (framing and
//! smuggling shapes, malformed and broken bodies with and without retries,
//! host rules, limits, hop-by-hop headers, HTTP/2 to HTTP/1.1 translation),
//! each with what the client must get and what the backends may see.
//!
//! Run against wasmlb by `tests/tests/conformance.rs`, and against NGINX and
//! HAProxy by the `conformance` binary (`cargo run -p wasmlb-tests --bin
//! conformance`), which prints the differential table.
//!
//! Every case runs against a proxy whose default route uses two
//! [`RecordingBackend`]s `b0` and `b1` with a plugin that honours the
//! `x-backend` header (`examples/header-route`): requests name `b0`, so a
//! retry goes to `b1`. Paths under `/dead/` go to an upstream whose pinned
//! backend `d` refuses connections, and paths under `/r/` to an upstream
//! over the same two backends without outlier detection (the retry cases
//! make `b0` fail on purpose). Status `0` in an expectation means "no
//! response" (the connection closed); for HTTP/2, `1` means the stream was
//! reset and `2` that the connection got GOAWAY.

use std::net::SocketAddr;

use crate::raw::{
    After, H2Frame, H2Outcome, Recorded, RecordingBackend, RecordingMode, h1_exchange, h2_exchange,
    h2_request,
};

/// No response: the connection was closed.
pub const CLOSED: u16 = 0;
/// HTTP/2: the stream was reset (RST_STREAM).
pub const RESET: u16 = 1;
/// HTTP/2: the connection was closed with GOAWAY.
pub const GOAWAY: u16 = 2;

/// A check on what the backends received.
pub type BackendCheck = fn(&[Recorded]) -> Result<(), String>;

/// What is sent.
#[derive(Debug, Clone)]
pub enum Send {
    /// Raw HTTP/1 bytes, written in steps, then `after`; `responses`
    /// complete responses are awaited.
    H1 {
        /// Byte chunks, written 20 ms apart.
        steps: Vec<Vec<u8>>,
        /// Then.
        after: After,
        /// Responses to wait for.
        responses: usize,
    },
    /// Raw HTTP/2 frames; the outcome of stream 1 is checked, and a probe
    /// request afterwards tells whether the connection survived.
    H2 {
        /// Frames after the preface and SETTINGS.
        frames: Vec<H2Frame>,
    },
}

/// One case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Short unique id (`group-n`).
    pub id: String,
    /// What it tries.
    pub what: String,
    /// What is sent.
    pub send: Send,
    /// How `b0` answers (b1 answers normally).
    pub b0: RecordingMode,
    /// Statuses the client may get (see [`CLOSED`], [`RESET`], [`GOAWAY`]).
    pub status: Vec<u16>,
    /// Complete requests the backends must have received, in all.
    pub complete: usize,
    /// A further check on what they received.
    pub check: Option<BackendCheck>,
    /// HTTP/2: the connection must still serve a new stream afterwards.
    pub connection_survives: bool,
}

/// What happened in one case.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The client's status (see [`Case::status`]).
    pub status: u16,
    /// Complete requests the backends received.
    pub complete: usize,
    /// Connections the backends saw end mid-request.
    pub incomplete: usize,
    /// Requests with invalid framing the backends received (must be 0).
    pub malformed: usize,
    /// The complete requests.
    pub recorded: Vec<Recorded>,
    /// HTTP/2: the probe's status after the case, if one was answered.
    pub probe: Option<u16>,
    /// HTTP/1: responses the client received.
    pub responses: usize,
}

impl Outcome {
    /// The failures of `case`'s expectations, empty when it passed.
    pub fn failures(&self, case: &Case) -> Vec<String> {
        let mut f = Vec::new();
        if !case.status.contains(&self.status) {
            f.push(format!("status {} not in {:?}", self.status, case.status));
        }
        if self.complete != case.complete {
            f.push(format!(
                "backends received {} complete requests, expected {}",
                self.complete, case.complete
            ));
        }
        if self.malformed > 0 {
            f.push(format!(
                "backends received {} malformed requests",
                self.malformed
            ));
        }
        // Desync: with healthy backends (no retries), every request a
        // backend completed must have been answered to the client.
        if case.b0 == RecordingMode::Normal
            && matches!(
                case.send,
                Send::H1 {
                    after: After::Wait | After::HalfClose,
                    ..
                }
            )
            && self.complete > self.responses
        {
            f.push(format!(
                "desync: backends completed {} requests, the client got {} responses",
                self.complete, self.responses
            ));
        }
        if let Some(check) = case.check
            && let Err(e) = check(&self.recorded)
        {
            f.push(e);
        }
        if case.connection_survives && self.probe != Some(200) {
            f.push(format!(
                "the HTTP/2 connection did not survive (probe: {:?})",
                self.probe
            ));
        }
        f
    }

    /// One cell of the differential table: `status/complete`.
    pub fn cell(&self) -> String {
        let status = match self.status {
            CLOSED => "closed".to_string(),
            RESET => "RST".to_string(),
            GOAWAY => "GOAWAY".to_string(),
            s => s.to_string(),
        };
        format!("{status}/{}", self.complete)
    }
}

/// Where to send a case: the proxy's HTTP/1 and h2c addresses (the same
/// port for wasmlb) and the two recording backends behind it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// HTTP/1.1 listener.
    pub h1: SocketAddr,
    /// h2c (prior knowledge) listener.
    pub h2: SocketAddr,
    /// `b0`, `b1`.
    pub backends: &'a [RecordingBackend],
}

/// Run `case` against `target`.
pub async fn run(case: &Case, target: Target<'_>) -> Outcome {
    for b in target.backends {
        b.reset();
        b.set_mode(RecordingMode::Normal);
    }
    target.backends[0].set_mode(case.b0);
    let mut answered = 0;
    let (status, probe) = match &case.send {
        Send::H1 {
            steps,
            after,
            responses,
        } => {
            let reply = h1_exchange(target.h1, steps, *after, *responses).await;
            answered = reply.responses;
            (reply.status.unwrap_or(CLOSED), None)
        }
        Send::H2 { frames } => {
            let (outcomes, probe) =
                h2_exchange(target.h2, frames, &[1], case.connection_survives).await;
            let status = match outcomes.first() {
                Some(H2Outcome::Status(s)) => *s,
                Some(H2Outcome::Reset(_)) => RESET,
                Some(H2Outcome::GoAway(_)) => GOAWAY,
                _ => CLOSED,
            };
            (status, probe)
        }
    };
    // Let backend connections settle (an aborted upload ends shortly after).
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    target.backends[0].set_mode(RecordingMode::Normal);
    let recorded: Vec<Recorded> = target
        .backends
        .iter()
        .flat_map(|b| b.requests())
        .filter(|r| r.target != "/probe")
        .collect();
    Outcome {
        status,
        complete: recorded.len(),
        incomplete: target.backends.iter().map(|b| b.incomplete()).sum(),
        malformed: target.backends.iter().map(|b| b.malformed()).sum(),
        recorded,
        probe,
        responses: answered,
    }
}

const HOST: &str = "Host: conformance.example\r\nx-backend: b0\r\n";

/// `METHOD target HTTP/1.1` with the standard Host and pin headers, then
/// `headers` (each a full `Name: value` line without CRLF), then the body.
fn h1(method: &str, target: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\n{HOST}").into_bytes();
    for h in headers {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

struct Builder {
    cases: Vec<Case>,
}

impl Builder {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        group: &str,
        what: &str,
        send: Send,
        b0: RecordingMode,
        status: &[u16],
        complete: usize,
        check: Option<BackendCheck>,
        connection_survives: bool,
    ) {
        let n = self
            .cases
            .iter()
            .filter(|c| c.id.starts_with(group))
            .count()
            + 1;
        self.cases.push(Case {
            id: format!("{group}-{n}"),
            what: what.to_string(),
            send,
            b0,
            status: status.to_vec(),
            complete,
            check,
            connection_survives,
        });
    }

    fn h1(
        &mut self,
        group: &str,
        what: &str,
        bytes: Vec<u8>,
        after: After,
        status: &[u16],
        complete: usize,
    ) {
        self.h1_with(
            group,
            what,
            vec![bytes],
            after,
            RecordingMode::Normal,
            status,
            complete,
            None,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn h1_with(
        &mut self,
        group: &str,
        what: &str,
        steps: Vec<Vec<u8>>,
        after: After,
        b0: RecordingMode,
        status: &[u16],
        complete: usize,
        check: Option<BackendCheck>,
    ) {
        self.add(
            group,
            what,
            Send::H1 {
                steps,
                after,
                responses: 1,
            },
            b0,
            status,
            complete,
            check,
            false,
        );
    }

    fn h2(
        &mut self,
        what: &str,
        frames: Vec<H2Frame>,
        status: &[u16],
        complete: usize,
        check: Option<BackendCheck>,
        survives: bool,
    ) {
        self.add(
            "h2",
            what,
            Send::H2 { frames },
            RecordingMode::Normal,
            status,
            complete,
            check,
            survives,
        );
    }
}

fn headers_of(stream: u32, fields: Vec<(Vec<u8>, Vec<u8>)>, end_stream: bool) -> H2Frame {
    H2Frame::Headers {
        stream,
        fields,
        end_stream,
    }
}

fn data(stream: u32, bytes: &[u8], end_stream: bool) -> H2Frame {
    H2Frame::Data {
        stream,
        data: bytes.to_vec(),
        end_stream,
    }
}

fn pinned(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("x-backend", "b0")];
    v.extend_from_slice(extra);
    v
}

fn one_host(rs: &[Recorded]) -> Result<(), String> {
    match rs.first().map(|r| r.header_values("host")) {
        Some(h) if h.len() == 1 => Ok(()),
        other => Err(format!("backend Host fields: {other:?}")),
    }
}

/// The whole corpus.
pub fn cases() -> Vec<Case> {
    use After::{Close, HalfClose, Wait};
    let mut b = Builder { cases: Vec::new() };
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

    // --- framing and smuggling (RFC 9112 §6) ---------------------------
    let cl_te = [
        (
            "CL.TE",
            vec!["Content-Length: 6", "Transfer-Encoding: chunked"],
        ),
        (
            "TE.CL",
            vec!["Transfer-Encoding: chunked", "Content-Length: 6"],
        ),
    ];
    fn no_smuggled(rs: &[Recorded]) -> Result<(), String> {
        match rs.iter().find(|r| r.target.contains("smuggled")) {
            Some(r) => Err(format!("a smuggled request reached {}", r.backend)),
            None => Ok(()),
        }
    }
    for (name, hs) in cl_te {
        let body = format!("0\r\n\r\n{smuggled}");
        // RFC 9112 §6.1: Transfer-Encoding wins, Content-Length is removed,
        // and the connection closes after the response: the bytes after
        // the chunked body are never parsed as a request.
        b.h1_with(
            "framing",
            &format!("{name} with a smuggled request"),
            vec![h1("POST", "/f", &hs, body.as_bytes())],
            Wait,
            RecordingMode::Normal,
            &[200, 400],
            1,
            Some(no_smuggled),
        );
    }
    // (field, statuses, complete requests, responses): where the proxy
    // accepts the framing, the bytes after the body are a second,
    // pipelined request that it parsed, forwarded and answered itself (the
    // backend count equals the response count: no desync).
    let te_variants: &[(&str, &[u16], usize, usize)] = &[
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
            &[400, 501, CLOSED],
            0,
            1,
        ),
        ("Transfer-Encoding: xchunked", &[400, 501, CLOSED], 0, 1),
        (
            "Transfer-Encoding: chunked, identity",
            &[400, 501, CLOSED],
            0,
            1,
        ),
        ("Transfer-Encoding: identity, chunked", &[200], 2, 2),
        ("Transfer-Encoding: \"chunked\"", &[400, 501, CLOSED], 0, 1),
        ("Transfer-Encoding : chunked", &[400, CLOSED], 0, 1),
        ("Transfer-Encoding:\x0bchunked", &[400, 501, CLOSED], 0, 1),
        ("Transfer-Encoding: chunked\r\n x", &[400, CLOSED], 0, 1),
        ("Transfer-Encoding\r\n : chunked", &[400, CLOSED], 0, 1),
        ("X: y\nTransfer-Encoding: chunked", &[200], 2, 2),
        ("Transfer-Encoding: chunked\x00", &[400, CLOSED], 0, 1),
        ("Transfer-Encoding: CHUNKED", &[200], 2, 2),
        // Not Transfer-Encoding: no body; the chunk bytes are garbage (400).
        ("Transfer_Encoding: chunked", &[200], 1, 2),
    ];
    for (te, status, complete, responses) in te_variants {
        let body = format!("5\r\nhello\r\n0\r\n\r\n{smuggled}");
        b.add(
            "framing",
            &format!("TE obfuscation {te:?}"),
            Send::H1 {
                steps: vec![h1("POST", "/f", &[te], body.as_bytes())],
                after: Wait,
                responses: *responses,
            },
            RecordingMode::Normal,
            status,
            *complete,
            None,
            false,
        );
    }
    let cl_variants: &[(&str, &[u16], usize)] = &[
        ("Content-Length: 5\r\nContent-Length: 6", &[400, CLOSED], 0),
        ("Content-Length: 5, 6", &[400, CLOSED], 0),
        ("Content-Length: 5\r\nContent-Length: 5", &[200], 2),
        ("Content-Length: -5", &[400, CLOSED], 0),
        ("Content-Length: +5", &[400, CLOSED], 0),
        ("Content-Length: 5x", &[400, CLOSED], 0),
        ("Content-Length: 0x5", &[400, CLOSED], 0),
        (
            "Content-Length: 99999999999999999999999",
            &[400, 413, CLOSED],
            0,
        ),
        ("Content-Length:", &[400, CLOSED], 0),
        ("Content-Length: 5 5", &[400, CLOSED], 0),
    ];
    for (cl, status, complete) in cl_variants {
        let body = format!("hello{smuggled}");
        b.add(
            "framing",
            &format!("Content-Length {cl:?}"),
            Send::H1 {
                steps: vec![h1("POST", "/f", &[cl], body.as_bytes())],
                after: Wait,
                responses: *complete,
            },
            RecordingMode::Normal,
            status,
            *complete,
            None,
            false,
        );
    }
    let head_variants: &[(&[u8], &[u16], usize)] = &[
        (b"GET /f HTTP/1.1\r\nHost: a\rb\r\n\r\n", &[400, CLOSED], 0),
        (
            b"GET /f HTTP/1.1\r\nHost: conformance.example\r\nX: a\x00b\r\n\r\n",
            &[400, CLOSED],
            0,
        ),
        (
            b"GET /f HTTP/1.1\r\nHost: conformance.example\r\nX: a\r\n b\r\n\r\n",
            &[400, CLOSED],
            0,
        ),
        (
            b"GET /f HTTP/1.1\r\nHost: conformance.example\r\nNoColon\r\n\r\n",
            &[400, CLOSED],
            0,
        ),
        (
            b"GET /f HTTP/1.1\r\nHost: conformance.example\r\nX : y\r\n\r\n",
            &[400, CLOSED],
            0,
        ),
        (
            b"GET  /f HTTP/1.1\r\nHost: conformance.example\r\n\r\n",
            &[400, CLOSED],
            0,
        ),
        (
            b"GET /f HTTP/1.2\r\nHost: conformance.example\r\n\r\n",
            &[400, 505, CLOSED],
            0,
        ),
        (
            b"GET /f HTTP/2.0\r\nHost: conformance.example\r\n\r\n",
            &[400, 505, CLOSED],
            0,
        ),
        (b"GET /f\r\n\r\n", &[400, CLOSED], 0),
        (
            b"G\x00T /f HTTP/1.1\r\nHost: conformance.example\r\n\r\n",
            &[400, CLOSED],
            0,
        ),
        (
            b"GET /f\x7f HTTP/1.1\r\nHost: conformance.example\r\n\r\n",
            &[400, CLOSED],
            0,
        ),
        (
            b"GET /f HTTP/1.1\nHost: conformance.example\nx-backend: b0\n\n",
            &[200],
            1,
        ),
        (
            b"\r\nGET /f HTTP/1.1\r\nHost: conformance.example\r\nx-backend: b0\r\n\r\n",
            &[200],
            1,
        ),
    ];
    for (bytes, status, complete) in head_variants {
        let complete = if status.contains(&200) { *complete } else { 0 };
        b.h1(
            "head",
            &format!("head {:?}", String::from_utf8_lossy(bytes)),
            bytes.to_vec(),
            Wait,
            status,
            complete,
        );
    }

    // --- broken request bodies, two backends, retries on (defect 1, 2) ---
    let broken: &[(&str, Vec<Vec<u8>>, After)] = &[
        (
            "chunk then half-close",
            vec![b"5\r\nhello\r\n".to_vec()],
            HalfClose,
        ),
        ("chunk then close", vec![b"5\r\nhello\r\n".to_vec()], Close),
        (
            "bad chunk terminator",
            vec![b"5\r\nhelloXX0\r\n\r\n".to_vec()],
            Wait,
        ),
        (
            "chunk-size overflow",
            vec![b"5\r\nhello\r\nffffffffffffffffff\r\n".to_vec()],
            Wait,
        ),
        (
            "20 KB chunk extension",
            vec![format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(20_000)).into_bytes()],
            Wait,
        ),
        (
            "non-hex chunk size",
            vec![b"5\r\nhello\r\nzz\r\n".to_vec()],
            Wait,
        ),
        (
            "negative chunk size",
            vec![b"-1\r\nhello\r\n".to_vec()],
            Wait,
        ),
        (
            "last chunk, no final CRLF, close",
            vec![b"5\r\nhello\r\n0\r\n".to_vec()],
            HalfClose,
        ),
        (
            "chunk longer than its size",
            vec![b"3\r\nhello\r\n0\r\n\r\n".to_vec()],
            Wait,
        ),
        (
            "bad trailer",
            vec![b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n".to_vec()],
            Wait,
        ),
    ];
    for method in ["PUT", "DELETE", "POST"] {
        for (what, body, after) in broken {
            let mut steps = vec![h1(method, "/up", &["Transfer-Encoding: chunked"], b"")];
            steps.extend(body.iter().cloned());
            b.h1_with(
                "body",
                &format!("{method} chunked: {what}"),
                steps,
                *after,
                RecordingMode::Normal,
                &[400, CLOSED],
                0,
                None,
            );
        }
    }
    for method in ["PUT", "POST"] {
        let steps = vec![h1(method, "/up", &["Content-Length: 10"], b"hello")];
        b.h1_with(
            "body",
            &format!("{method} Content-Length 10, 5 sent, half-close"),
            steps.clone(),
            HalfClose,
            RecordingMode::Normal,
            &[400, CLOSED],
            0,
            None,
        );
        b.h1_with(
            "body",
            &format!("{method} Content-Length 10, 5 sent, close"),
            steps,
            Close,
            RecordingMode::Normal,
            &[400, CLOSED],
            0,
            None,
        );
    }
    // The first backend fails first, then the client's body breaks during
    // the retry's replay: nothing may complete anywhere.
    for method in ["PUT", "DELETE"] {
        let steps = vec![
            h1(
                method,
                "/up",
                &["Transfer-Encoding: chunked"],
                b"5\r\nhello\r\n",
            ),
            b"5\r\nworld\r\n".to_vec(),
            b"zz\r\n".to_vec(),
        ];
        b.h1_with(
            "body",
            &format!("{method}: backend fails, then the client's body breaks"),
            steps,
            Wait,
            RecordingMode::CloseAfterHead,
            &[400, 502, CLOSED],
            0,
            None,
        );
    }

    // --- retries that are allowed ------------------------------------------
    fn full_body_on_b1(rs: &[Recorded]) -> Result<(), String> {
        match rs.iter().find(|r| r.backend == "b1") {
            Some(r) if r.body == b"helloworld" => Ok(()),
            other => Err(format!("b1 did not get the whole body: {other:?}")),
        }
    }
    b.h1_with(
        "retry",
        "GET: backend closes after the request, retried on b1",
        vec![h1("GET", "/r/x", &[], b"")],
        Wait,
        RecordingMode::CloseAfterRequest,
        &[200],
        2,
        None,
    );
    b.h1_with(
        "retry",
        "POST: backend closes after the request, not retried",
        vec![h1("POST", "/r/x", &["Content-Length: 5"], b"hello")],
        Wait,
        RecordingMode::CloseAfterRequest,
        &[502],
        1,
        None,
    );
    b.h1_with(
        "retry",
        "PUT with Content-Length: backend closes after the request, replayed whole",
        vec![h1("PUT", "/r/x", &["Content-Length: 10"], b"helloworld")],
        Wait,
        RecordingMode::CloseAfterRequest,
        &[200],
        2,
        Some(full_body_on_b1),
    );
    b.h1_with(
        "retry",
        "PUT chunked, complete: backend closes after the head, replayed whole",
        vec![h1(
            "PUT",
            "/r/x",
            &["Transfer-Encoding: chunked"],
            b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n",
        )],
        Wait,
        RecordingMode::CloseAfterHead,
        &[200],
        1,
        Some(full_body_on_b1),
    );
    b.h1_with(
        "retry",
        "POST chunked: backend closes after the head, not retried",
        vec![h1(
            "POST",
            "/r/x",
            &["Transfer-Encoding: chunked"],
            b"5\r\nhello\r\n0\r\n\r\n",
        )],
        Wait,
        RecordingMode::CloseAfterHead,
        &[502],
        0,
        None,
    );
    b.h1(
        "retry",
        "GET to a backend refusing connections: retried",
        h1("GET", "/dead/x", &[], b"").replace_pin("d"),
        Wait,
        &[200],
        1,
    );
    b.h1(
        "retry",
        "POST to a backend refusing connections: retried",
        h1("POST", "/dead/x", &["Content-Length: 5"], b"hello").replace_pin("d"),
        Wait,
        &[200],
        1,
    );

    // --- Host (RFC 9112 §3.2) ----------------------------------------------
    let raw_host =
        |lines: &str| format!("GET /h HTTP/1.1\r\n{lines}x-backend: b0\r\n\r\n").into_bytes();
    b.h1(
        "host",
        "two Host fields",
        raw_host("Host: a.example\r\nHost: b.example\r\n"),
        Wait,
        &[400],
        0,
    );
    b.h1(
        "host",
        "two identical Host fields",
        raw_host("Host: a.example\r\nHost: a.example\r\n"),
        Wait,
        &[400],
        0,
    );
    b.h1(
        "host",
        "HTTP/1.1 without Host",
        raw_host(""),
        Wait,
        &[400],
        0,
    );
    b.h1(
        "host",
        "HTTP/1.0 without Host",
        b"GET /h HTTP/1.0\r\nx-backend: b0\r\n\r\n".to_vec(),
        Wait,
        &[200],
        1,
    );
    for bad in [
        "",
        "a b",
        "user@a.example",
        "a.example/x",
        "a.example:80x",
        "[::1",
        "a.example:123456",
    ] {
        b.h1(
            "host",
            &format!("invalid Host {bad:?}"),
            raw_host(&format!("Host: {bad}\r\n")),
            Wait,
            &[400],
            0,
        );
    }
    for good in [
        "a.example:8080",
        "[::1]:80",
        "127.0.0.1",
        "A.Example",
        "a.example.",
    ] {
        b.h1_with(
            "host",
            &format!("valid Host {good:?}"),
            vec![raw_host(&format!("Host: {good}\r\n"))],
            Wait,
            RecordingMode::Normal,
            &[200],
            1,
            Some(one_host),
        );
    }
    fn host_is_target(rs: &[Recorded]) -> Result<(), String> {
        match rs.first().map(|r| r.header_values("host")) {
            Some(h) if h == ["b.example"] => Ok(()),
            other => Err(format!(
                "absolute-form: backend Host {other:?}, expected [\"b.example\"]"
            )),
        }
    }
    b.h1_with(
        "host",
        "absolute-form target wins over Host",
        vec![
            b"GET http://b.example/h HTTP/1.1\r\nHost: a.example\r\nx-backend: b0\r\n\r\n".to_vec(),
        ],
        Wait,
        RecordingMode::Normal,
        &[200],
        1,
        Some(host_is_target),
    );

    // --- hop-by-hop (RFC 9110 §7.6.1) --------------------------------------
    fn no_hop_by_hop(rs: &[Recorded]) -> Result<(), String> {
        let r = rs.first().ok_or("no request")?;
        for h in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
            "x-secret",
            "proxy-authorization",
            "http2-settings",
        ] {
            if !r.header_values(h).is_empty() {
                return Err(format!("{h} reached the backend"));
            }
        }
        let xff = r.header_values("x-forwarded-for");
        if xff.last().is_none_or(|v| !v.ends_with("127.0.0.1")) {
            return Err(format!("x-forwarded-for {xff:?} lacks the peer"));
        }
        Ok(())
    }
    for hs in [
        vec!["Connection: x-forwarded-for", "X-Forwarded-For: 10.9.9.9"],
        vec!["Connection: close, x-secret", "X-Secret: 1"],
        vec![
            "Connection: Upgrade, HTTP2-Settings",
            "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA",
        ],
        vec![
            "TE: trailers",
            "Keep-Alive: timeout=5",
            "Proxy-Connection: keep-alive",
        ],
        vec!["Proxy-Authorization: Basic Zm9vOmJhcg=="],
    ] {
        b.h1_with(
            "hop",
            &format!("hop-by-hop {hs:?}"),
            vec![h1("GET", "/hop", &hs, b"")],
            Wait,
            RecordingMode::Normal,
            &[200],
            1,
            Some(no_hop_by_hop),
        );
    }

    // --- limits (defect 9) ---------------------------------------------------
    for (len, status, complete) in [
        (8_000usize, 200u16, 1usize),
        (9_000, 414, 0),
        (60_000, 414, 0),
        (100_000, 414, 0),
    ] {
        let target = format!("/{}", "a".repeat(len));
        let allowed: &[u16] = if len > 64_000 {
            &[414, 431, 400]
        } else {
            std::slice::from_ref(&status)
        };
        let allowed = allowed.to_vec();
        let bytes = h1("GET", &target, &[], b"");
        b.add(
            "limits",
            &format!("request target of {len} bytes"),
            Send::H1 {
                steps: vec![bytes],
                after: Wait,
                responses: 1,
            },
            RecordingMode::Normal,
            &allowed,
            complete,
            None,
            false,
        );
    }
    for (len, status, complete) in [
        (15_000usize, 200u16, 1usize),
        (20_000, 431, 0),
        (100_000, 431, 0),
    ] {
        let header = format!("X-Big: {}", "v".repeat(len));
        b.h1(
            "limits",
            &format!("one header of {len} bytes"),
            h1("GET", "/l", &[&header], b""),
            Wait,
            &[status],
            complete,
        );
    }
    for (n, status, complete) in [(90usize, 200u16, 1usize), (150, 431, 0)] {
        let hs: Vec<String> = (0..n).map(|i| format!("X-H{i}: 1")).collect();
        let hs: Vec<&str> = hs.iter().map(String::as_str).collect();
        b.h1(
            "limits",
            &format!("{n} header fields"),
            h1("GET", "/l", &hs, b""),
            Wait,
            &[status],
            complete,
        );
    }

    // --- methods -------------------------------------------------------------
    b.h1(
        "method",
        "CONNECT",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n".to_vec(),
        Wait,
        &[405, 501, 400],
        0,
    );
    b.h1(
        "method",
        "CONNECT to the backend's address form",
        b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n".to_vec(),
        Wait,
        &[405, 501, 400],
        0,
    );
    b.add(
        "method",
        "pipelined GETs",
        Send::H1 {
            steps: vec![[h1("GET", "/p1", &[], b""), h1("GET", "/p2", &[], b"")].concat()],
            after: Wait,
            responses: 2,
        },
        RecordingMode::Normal,
        &[200],
        2,
        None,
        false,
    );
    b.h1(
        "method",
        "unknown method",
        h1("FOO", "/m", &[], b""),
        Wait,
        &[200, 405, 501],
        1,
    );

    // --- HTTP/2 (RFC 9113) ---------------------------------------------------
    let get = |extra: &[(&'static str, &'static str)]| {
        headers_of(
            1,
            h2_request("GET", "conformance.example", "/h2", &pinned(extra)),
            true,
        )
    };
    b.h2("plain GET", vec![get(&[])], &[200], 1, Some(one_host), true);
    fn cookies_joined(rs: &[Recorded]) -> Result<(), String> {
        match rs.first().map(|r| r.header_values("cookie")) {
            Some(c) if c == ["a=1; b=2; c=3"] => Ok(()),
            other => Err(format!(
                "cookies {other:?}, expected one field \"a=1; b=2; c=3\""
            )),
        }
    }
    b.h2(
        "three cookie fields are joined",
        vec![get(&[
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("cookie", "c=3"),
        ])],
        &[200],
        1,
        Some(cookies_joined),
        true,
    );
    fn host_is_authority(rs: &[Recorded]) -> Result<(), String> {
        match rs.first().map(|r| r.header_values("host")) {
            Some(h) if h == ["conformance.example"] => Ok(()),
            other => Err(format!("backend Host {other:?}")),
        }
    }
    b.h2(
        "host equal to :authority",
        vec![get(&[("host", "conformance.example")])],
        &[200],
        1,
        Some(host_is_authority),
        true,
    );
    b.h2(
        "host differing from :authority",
        vec![get(&[("host", "other.example")])],
        &[400],
        0,
        None,
        true,
    );
    b.h2(
        "two host fields",
        vec![get(&[
            ("host", "conformance.example"),
            ("host", "x.example"),
        ])],
        &[400],
        0,
        None,
        true,
    );
    b.h2(
        "host without :authority",
        vec![headers_of(
            1,
            h2_request(
                "GET",
                "",
                "/h2",
                &pinned(&[("host", "conformance.example")]),
            ),
            true,
        )],
        &[200],
        1,
        Some(host_is_authority),
        true,
    );
    b.h2(
        "CONNECT",
        vec![headers_of(
            1,
            vec![
                (b":method".to_vec(), b"CONNECT".to_vec()),
                (b":authority".to_vec(), b"a.example:443".to_vec()),
            ],
            true,
        )],
        &[405, 501, 400, RESET],
        0,
        None,
        true,
    );
    for (name, value) in [
        ("connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
        ("keep-alive", "5"),
        ("te", "gzip"),
    ] {
        b.h2(
            &format!("connection-specific field {name}: {value}"),
            vec![get(&[(name, value)])],
            &[400, RESET],
            0,
            None,
            true,
        );
    }
    b.h2(
        "te: trailers is allowed and not forwarded",
        vec![get(&[("te", "trailers")])],
        &[200],
        1,
        Some(no_te),
        true,
    );
    fn no_te(rs: &[Recorded]) -> Result<(), String> {
        match rs.first() {
            Some(r) if r.header_values("te").is_empty() => Ok(()),
            other => Err(format!("te reached the backend: {other:?}")),
        }
    }
    b.h2(
        "pseudo-header after a regular field",
        vec![headers_of(
            1,
            vec![
                (b":method".to_vec(), b"GET".to_vec()),
                (b"x-a".to_vec(), b"1".to_vec()),
                (b":path".to_vec(), b"/h2".to_vec()),
                (b":scheme".to_vec(), b"http".to_vec()),
            ],
            true,
        )],
        &[400, RESET],
        0,
        None,
        true,
    );
    b.h2(
        "duplicate :path",
        vec![headers_of(
            1,
            h2_request("GET", "conformance.example", "/h2", &[(":path", "/x")]),
            true,
        )],
        &[400, RESET],
        0,
        None,
        true,
    );
    b.h2(
        "missing :path",
        vec![headers_of(
            1,
            h2_request("GET", "conformance.example", "", &[]),
            true,
        )],
        &[400, RESET],
        0,
        None,
        true,
    );
    b.h2(
        "unknown pseudo-header",
        vec![headers_of(
            1,
            h2_request("GET", "conformance.example", "/h2", &[(":foo", "1")]),
            true,
        )],
        &[400, RESET, GOAWAY],
        0,
        None,
        false,
    );
    fn lowercase_names(rs: &[Recorded]) -> Result<(), String> {
        match rs.first() {
            None => Ok(()),
            Some(r) => Err(format!(
                "an uppercase field name was forwarded: {:?}",
                r.headers
            )),
        }
    }
    // h2 (the crate) fails HPACK decoding of an uppercase name or an
    // unknown pseudo-header: a connection error (GOAWAY). Never forwarded.
    b.h2(
        "uppercase field name",
        vec![get(&[("X-Upper", "1")])],
        &[400, RESET, GOAWAY],
        0,
        Some(lowercase_names),
        false,
    );
    // h2 (the crate) treats a field value with CR/LF/NUL as an HPACK
    // decoding error, which is connection-level: GOAWAY. Peers reset only
    // the stream. Recorded as a known deviation; never forwarded.
    b.h2(
        "field value with a line feed",
        vec![get(&[("x-bad", "a\nb")])],
        &[400, RESET, GOAWAY],
        0,
        None,
        false,
    );
    b.h2(
        "field value with NUL",
        vec![get(&[("x-bad", "a\0b")])],
        &[400, RESET, GOAWAY],
        0,
        None,
        false,
    );
    fn body_hello(rs: &[Recorded]) -> Result<(), String> {
        match rs.first() {
            Some(r) if r.body == b"hello" => Ok(()),
            other => Err(format!("body: {other:?}")),
        }
    }
    let put = |extra: &[(&'static str, &'static str)]| {
        headers_of(
            1,
            h2_request("PUT", "conformance.example", "/up", &pinned(extra)),
            false,
        )
    };
    b.h2(
        "PUT with a body",
        vec![put(&[]), data(1, b"hello", true)],
        &[200],
        1,
        Some(body_hello),
        true,
    );
    b.h2(
        "PUT, content-length 10, 5 bytes then END_STREAM",
        vec![put(&[("content-length", "10")]), data(1, b"hello", true)],
        &[400, RESET],
        0,
        None,
        true,
    );
    b.h2(
        "PUT, content-length 3, 5 bytes",
        vec![put(&[("content-length", "3")]), data(1, b"hello", true)],
        &[400, RESET],
        0,
        None,
        true,
    );
    b.h2(
        "PUT, then RST_STREAM(CANCEL) mid-body",
        vec![
            put(&[]),
            data(1, b"hello", false),
            H2Frame::Reset {
                stream: 1,
                code: 0x8,
            },
        ],
        &[400, RESET, CLOSED],
        0,
        None,
        true,
    );
    b.h2(
        "POST, then RST_STREAM(CANCEL) mid-body",
        vec![
            headers_of(
                1,
                h2_request("POST", "conformance.example", "/up", &pinned(&[])),
                false,
            ),
            data(1, b"hello", false),
            H2Frame::Reset {
                stream: 1,
                code: 0x8,
            },
        ],
        &[400, RESET, CLOSED],
        0,
        None,
        true,
    );
    let big = "v".repeat(40_000);
    let big: &'static str = Box::leak(big.into_boxed_str());
    b.h2(
        "header list over the limit",
        vec![get(&[("x-big", big)])],
        &[431, RESET],
        0,
        None,
        false,
    );
    let long_path = format!("/{}", "a".repeat(9_000));
    let long_path: &'static str = Box::leak(long_path.into_boxed_str());
    b.h2(
        ":path over max_request_line_bytes",
        vec![headers_of(
            1,
            h2_request("GET", "conformance.example", long_path, &pinned(&[])),
            true,
        )],
        &[414, 431, RESET],
        0,
        None,
        false,
    );

    b.cases
}

trait ReplacePin {
    fn replace_pin(self, to: &str) -> Vec<u8>;
}

impl ReplacePin for Vec<u8> {
    /// Pin the request to backend `to` instead of `b0`.
    fn replace_pin(self, to: &str) -> Vec<u8> {
        String::from_utf8_lossy(&self)
            .replacen("x-backend: b0", &format!("x-backend: {to}"), 1)
            .into_bytes()
    }
}

/// The wasmlb config the corpus expects, on `b0` and `b1`: header-route
/// pinning by `x-backend`, and under `/dead/` an upstream whose pinned
/// backend `d` (at `dead`) refuses connections.
pub fn wasmlb_config(
    header_route: &str,
    b0: SocketAddr,
    b1: SocketAddr,
    dead: SocketAddr,
) -> String {
    format!(
        r#"[[listener]]
address = "127.0.0.1:0"
upstream = "app"

[[route]]
path_prefix = "/dead/"
upstream = "dead"

[upstream.app]
plugin = '{header_route}'
backends = [ {{ address = "{b0}", labels = {{ name = "b0" }} }}, {{ address = "{b1}", labels = {{ name = "b1" }} }} ]
response_timeout_ms = 2000
[upstream.app.outlier_detection]
consecutive_5xx = 3

[[route]]
path_prefix = "/r/"
upstream = "retry"

[upstream.retry]
plugin = '{header_route}'
backends = [ {{ address = "{b0}", labels = {{ name = "b0" }} }}, {{ address = "{b1}", labels = {{ name = "b1" }} }} ]
response_timeout_ms = 2000

[upstream.dead]
plugin = '{header_route}'
backends = [ {{ address = "{dead}", labels = {{ name = "d" }} }}, {{ address = "{b1}", labels = {{ name = "b1" }} }} ]
"#
    )
}
