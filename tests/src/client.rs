//! HTTP clients for tests (HTTP/1.1 and h2c) and their helpers.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::*;

/// An HTTP/1.1 client that ignores proxy environment variables.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// An HTTP/2 cleartext (prior knowledge) client.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// GET `url`; returns (status, `x-backend` header or "", body).
pub async fn get(client: &reqwest::Client, url: &str) -> (u16, String, String) {
    let r = client.get(url).send().await.expect("request");
    let status = r.status().as_u16();
    let backend = r
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, backend, r.text().await.expect("body"))
}

/// GET `url` and return the body as text (panics on a transport error).
pub async fn text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body")
}

/// GET `url` and parse the body as JSON (panics if it is not).
pub async fn json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let body = text(client, url).await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Stream `len` bytes of [`pattern`] as a request body.
pub fn pattern_body(len: u64) -> reqwest::Body {
    let chunk = 256 * 1024u64;
    let stream = futures_util::stream::iter(0..len.div_ceil(chunk)).map(move |c| {
        let start = c * chunk;
        let end = (start + chunk).min(len);
        Ok::<_, Infallible>(Bytes::from((start..end).map(pattern).collect::<Vec<u8>>()))
    });
    reqwest::Body::wrap_stream(stream)
}
