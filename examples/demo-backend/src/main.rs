//! `demo-backend ADDR...`: serve one tiny HTTP/1.1 backend on each address.
//!
//! Backend `i` (1-based, in argument order) is named `b<i>` and answers every
//! request with `200`, header `x-backend: b<i>` and body `hello from b<i>\n`.
//! Port 0 picks a free port; the bound addresses are printed, one
//! `b<i> listening on ADDR` line each. Runs until killed.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serve tiny named HTTP backends.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Addresses to listen on, e.g. 127.0.0.1:9001 127.0.0.1:9002.
    #[arg(required = true)]
    addresses: Vec<SocketAddr>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut tasks = Vec::new();
    for (i, addr) in cli.addresses.iter().enumerate() {
        let name = format!("b{}", i + 1);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
        println!("{name} listening on {}", listener.local_addr()?);
        tasks.push(tokio::spawn(serve(listener, name)));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn serve(listener: TcpListener, name: String) -> anyhow::Result<()> {
    let body = Bytes::from(format!("hello from {name}\n"));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (name, body) = (name.clone(), body.clone());
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let response = Response::builder()
                    .header("x-backend", name.as_str())
                    .body(Full::new(body.clone()));
                async move { response }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
