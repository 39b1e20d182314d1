//! The conformance corpus (`wasmlb_tests::corpus`) through the real proxy:
//! raw HTTP/1 and HTTP/2 clients, raw recording backends. Each case asserts
//! what the client got and what the backends received; afterwards, no
//! backend was ejected by any of the client-side garbage.

use wasmlb_tests::corpus::{self, Target};
use wasmlb_tests::raw::RecordingBackend;
use wasmlb_tests::{InProcessProxy, closed_port, plugins};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_corpus_holds() {
    let backends = vec![
        RecordingBackend::start("b0").await,
        RecordingBackend::start("b1").await,
    ];
    let config = corpus::wasmlb_config(
        plugins::HEADER_ROUTE,
        backends[0].addr,
        backends[1].addr,
        closed_port(),
    );
    let proxy = InProcessProxy::start(&config).await;
    let target = Target {
        h1: proxy.addrs[0],
        h2: proxy.addrs[0],
        backends: &backends,
    };
    let cases = corpus::cases();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let mut failed = Vec::new();
    // Client-side cases first (b0 answers normally), then the ones where b0
    // itself fails, whose outlier reports are the backend's due.
    let (client_side, backend_faults): (Vec<_>, Vec<_>) = cases
        .iter()
        .partition(|c| c.b0 == wasmlb_tests::raw::RecordingMode::Normal);
    let mut run = async |cases: Vec<&corpus::Case>| {
        for case in cases {
            let outcome = corpus::run(case, target).await;
            let f = outcome.failures(case);
            if !f.is_empty() {
                failed.push(format!("{} ({}): {}", case.id, case.what, f.join("; ")));
            }
        }
    };
    run(client_side).await;
    // Client garbage never counts against a backend (outlier detection is
    // on, consecutive_5xx = 3).
    let app = proxy.upstream("app").snapshot();
    let blamed: Vec<_> = app
        .backends
        .iter()
        .filter(|b| b.state != "healthy" || b.ejections > 0)
        .collect();
    run(backend_faults).await;
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
    assert!(
        blamed.is_empty(),
        "client faults were blamed on backends: {blamed:?}"
    );
    println!("{} conformance cases passed", cases.len());
    proxy.stop().await;
}
