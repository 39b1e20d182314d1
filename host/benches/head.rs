//! The request head's rewrite for the backend (`headers::prepare_request`:
//! hop-by-hop removal, `X-Forwarded-*`, origin-form) on a browser-like head
//! of 10 headers, after a clone of the head as a retryable request makes one.
//!
//! Run: `cargo bench -p wasmlb --bench head`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use wasmlb::headers::{ClientIp, prepare_request};

fn head() -> http::request::Parts {
    let (parts, ()) = http::Request::get("http://shop.example.com/api/items?id=7")
        .header("host", "shop.example.com")
        .header(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        )
        .header(
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        )
        .header("accept-language", "en-US,en;q=0.5")
        .header("accept-encoding", "gzip, deflate, br, zstd")
        .header("connection", "keep-alive")
        .header("cookie", "session=0123456789abcdef; theme=dark")
        .header("upgrade-insecure-requests", "1")
        .header("sec-fetch-dest", "document")
        .header("priority", "u=0, i")
        .body(())
        .expect("request")
        .into_parts();
    parts
}

fn bench(c: &mut Criterion) {
    let client = SocketAddr::from(([192, 0, 2, 1], 40000));
    let client_ip = ClientIp::new(client);
    let backend = http::uri::Authority::from_static("127.0.0.1:9001");
    let original = head();
    c.bench_function("head/clone+prepare_request", |b| {
        b.iter(|| {
            let mut parts = http::Request::new(()).into_parts().0;
            parts.method = original.method.clone();
            parts.uri = original.uri.clone();
            parts.headers = original.headers.clone();
            prepare_request(&mut parts, &client_ip, &backend, false).expect("valid");
            black_box(parts)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
