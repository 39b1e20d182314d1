//! TLS for the tests: a certificate authority and certificates made in the
//! test (rcgen), a TLS client that reports what the server presented, and
//! TLS / HTTP/2 backends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

/// A test certificate authority.
pub struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A certificate and key written as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The key (PEM).
    pub key: PathBuf,
    /// The certificate's DER, to compare with what a server presented.
    pub der: Vec<u8>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki")
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A fresh CA.
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wasmlb test CA");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca = params.self_signed(&ca_key).expect("CA");
        Self { ca, ca_key }
    }

    /// Write the CA certificate to `dir/name`.
    pub fn write_ca(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.ca.pem()).expect("write CA");
        path
    }

    /// The CA as a root store.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("add CA");
        roots
    }

    /// Issue a certificate for `names` (DNS names or IP addresses) and write
    /// it to `dir/<stem>.pem` and `dir/<stem>.key`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> Issued {
        self.issue_with(dir, stem, names, |_| {})
    }

    /// As [`Pki::issue`], expired since 2021.
    pub fn issue_expired(&self, dir: &Path, stem: &str, names: &[&str]) -> Issued {
        self.issue_with(dir, stem, names, |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    fn issue_with(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> Issued {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or(stem),
        );
        edit(&mut params);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign");
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        Issued {
            cert: cert_path,
            key: key_path,
            der: cert.der().to_vec(),
        }
    }
}

/// Accepts any server certificate (the tests compare what was presented).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config offering `alpn`: verifying against `roots`, or (None)
/// accepting any certificate.
pub fn client_config(
    roots: Option<rustls::RootCertStore>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let mut config = match roots {
        Some(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS session to `addr` for `sni`.
pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Connect to `addr` over TLS with SNI `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The leaf certificate `stream`'s server presented, and the ALPN protocol.
pub fn presented(stream: &TlsStream) -> (Vec<u8>, Option<Vec<u8>>) {
    let session = stream.get_ref().1;
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    (leaf, session.alpn_protocol().map(<[u8]>::to_vec))
}

/// Send `GET path` (Host `host`) on `stream`, HTTP/2 if ALPN chose h2, else
/// HTTP/1.1; the status, headers and body.
pub async fn get_over<I>(
    stream: I,
    h2: bool,
    host: &str,
    path: &str,
) -> (u16, hyper::HeaderMap, String)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        let request = Request::get(format!("https://{host}{path}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        sender.send_request(request).await.expect("response")
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        let request = Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .expect("request");
        sender.send_request(request).await.expect("response")
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    (status, headers, body)
}

/// A backend that answers `hello from <name> over <HTTP version>` (and its
/// request headers as JSON at `/headers`): over TLS with `cert` if given
/// (HTTP/2 or HTTP/1.1 by ALPN; requiring a client certificate signed by
/// `client_ca` if given), else plaintext HTTP/2 (h2c) if `h2c`, else
/// plaintext HTTP/1.1. Stops when dropped.
#[derive(Debug)]
pub struct ProtoBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProtoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ProtoBackend {
    /// Start one (see [`ProtoBackend`]).
    pub async fn start(
        name: &str,
        cert: Option<&Issued>,
        client_ca: Option<&Pki>,
        alpn: &[&[u8]],
        h2c: bool,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = cert.map(|c| {
            let chain = vec![CertificateDer::from(c.der.clone())];
            let key = {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::PrivateKeyDer::from_pem_file(&c.key).expect("key")
            };
            let builder = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions");
            let builder = match client_ca {
                Some(ca) => builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(ca.roots()),
                        provider(),
                    )
                    .build()
                    .expect("client verifier"),
                ),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_single_cert(chain, key).expect("server config");
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let name = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (name, acceptor) = (name.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let name = name.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&name, req).await) }
                    });
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                            serve(TokioIo::new(tls), h2, service).await;
                        }
                        None => serve(TokioIo::new(tcp), h2c, service).await,
                    }
                });
            }
        });
        Self { addr, task }
    }
}

async fn serve<I, S>(io: I, h2: bool, service: S)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    }
}

async fn answer(name: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let body = if req.uri().path() == "/headers" {
        let mut map = serde_json::Map::new();
        for (k, v) in req.headers() {
            map.insert(
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            );
        }
        map.insert(
            ":authority".into(),
            req.uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default()
                .into(),
        );
        serde_json::Value::Object(map).to_string()
    } else {
        format!("hello from {name} over {:?}", req.version())
    };
    Response::new(Full::new(Bytes::from(body)))
}
