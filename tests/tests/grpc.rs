//! gRPC end to end through wasmlb against a real gRPC server (tonic, with
//! the standard health and reflection services): unary, server streaming,
//! bidirectional streaming, a non-zero `grpc-status` passed through, a
//! proxy-made UNAVAILABLE, gRPC health checks, and gRPC over a TLS listener.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio_stream::StreamExt;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Status;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use wasmlb_tests::tls::*;
use wasmlb_tests::*;

/// A tonic server with the health and reflection services on 127.0.0.1:0.
struct GrpcServer {
    addr: SocketAddr,
    reporter: HealthReporter,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn grpc_server() -> GrpcServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("reflection service");
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    GrpcServer {
        addr,
        reporter,
        task,
    }
}

async fn channel(proxy: &InProcessProxy) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(proxy.url(""))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the proxy")
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_string(),
    }
}

#[tokio::test]
async fn grpc_unary_streaming_and_bidi_pass_through_with_trailers() {
    let server = grpc_server().await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &format!("{{ address = \"{}\" }}", server.addr),
        "protocol = \"h2c\"\n",
    ))
    .await;
    let mut health = HealthClient::new(channel(&proxy).await);

    // Unary.
    let r = health.check(check("")).await.expect("unary call");
    assert_eq!(r.into_inner().status, Status::Serving as i32);
    // A grpc-status other than 0, from the backend, passes through.
    let e = health.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // Server streaming: each status change arrives as it happens.
    server
        .reporter
        .set_service_status("svc", ServingStatus::Serving)
        .await;
    let mut watch = health
        .watch(check("svc"))
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("first").expect("message");
    assert_eq!(first.status, Status::Serving as i32);
    server
        .reporter
        .set_service_status("svc", ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("streamed, not buffered")
        .expect("second")
        .expect("message");
    assert_eq!(second.status, Status::NotServing as i32);

    // Bidirectional streaming: requests and responses interleave.
    let mut reflection = ServerReflectionClient::new(channel(&proxy).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    tx.send(list()).await.unwrap();
    let mut responses = reflection
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi call")
        .into_inner();
    for round in 0..3 {
        let r = tokio::time::timeout(Duration::from_secs(5), responses.next())
            .await
            .expect("a response per request")
            .expect("response")
            .expect("message");
        let Some(MessageResponse::ListServicesResponse(services)) = r.message_response else {
            panic!("unexpected response {r:?}");
        };
        assert!(
            services
                .service
                .iter()
                .any(|s| s.name == "grpc.health.v1.Health"),
            "{services:?}"
        );
        if round < 2 {
            tx.send(list()).await.unwrap();
        }
    }
    drop(tx);
    assert!(
        responses.next().await.is_none(),
        "the stream ends after the client's"
    );
}

#[tokio::test]
async fn proxy_made_errors_for_grpc_requests_are_grpc_shaped() {
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &format!("{{ address = \"{}\" }}", closed_port()),
        "protocol = \"h2c\"\nretries = 0\n",
    ))
    .await;
    let mut health = HealthClient::new(channel(&proxy).await);
    let e = health.check(check("")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(!e.message().is_empty(), "a grpc-message says why: {e:?}");
    // A plain HTTP request to the same upstream still gets a plain 502.
    let (status, _, _) = get(&client(), &proxy.url("/")).await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn grpc_health_checks_follow_the_serving_status() {
    let server = grpc_server().await;
    let proxy = InProcessProxy::start(&app_config(
        "round-robin",
        &format!("{{ address = \"{}\" }}", server.addr),
        "protocol = \"h2c\"\n[upstream.app.health_check]\nkind = \"grpc\"\ninterval_ms = 100\n\
         timeout_ms = 1000\nunhealthy_threshold = 1\nhealthy_threshold = 1\n",
    ))
    .await;
    let up = proxy.upstream("app");
    let passing = |want: bool| {
        let up = up.clone();
        async move {
            for _ in 0..100 {
                if up.backends()[0]
                    .live
                    .check_passing
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == want
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(passing(true).await, "SERVING passes");
    server
        .reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    assert!(passing(false).await, "NOT_SERVING fails");
    server
        .reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    assert!(passing(true).await, "SERVING again passes");
}

#[tokio::test]
async fn grpc_over_a_tls_listener_with_h2_by_alpn() {
    let server = grpc_server().await;
    let pki = Pki::new();
    let toml = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"grpc\"\n\
         [listener.tls]\ncertificates = [ {{ cert = \"site.pem\", key = \"site.key\" }} ]\n\n\
         [upstream.grpc]\nplugin = 'round-robin'\nprotocol = \"h2c\"\n\
         backends = [ {{ address = \"{}\" }} ]\n",
        server.addr
    );
    let proxy = InProcessProxy::start_with(&toml, |d| {
        pki.issue(d, "site", &["grpc.test"]);
    })
    .await;
    let tls = tls_connect(
        proxy.addrs[0],
        "grpc.test",
        client_config(Some(pki.roots()), &[b"h2"]),
    )
    .await
    .expect("handshake");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let call = |service: &'static [u8]| {
        // A gRPC frame of HealthCheckRequest { service }.
        let mut body = vec![
            0,
            0,
            0,
            0,
            (service.len() + 2) as u8,
            0x0a,
            service.len() as u8,
        ];
        body.extend_from_slice(service);
        hyper::Request::post("https://grpc.test/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let response = sender.send_request(call(b"")).await.unwrap();
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers passed through");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        &collected.to_bytes()[..],
        &[0, 0, 0, 0, 2, 0x08, 0x01],
        "SERVING"
    );
    let response = sender.send_request(call(b"nope")).await.unwrap();
    let status = response.headers().get("grpc-status").cloned();
    let collected = response.into_body().collect().await.unwrap();
    let status = status.or_else(|| {
        collected
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned())
    });
    assert_eq!(
        status.expect("grpc-status"),
        "5",
        "NOT_FOUND passed through"
    );
}
