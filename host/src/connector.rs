//! Opening a connection to a backend, as its upstream says: TCP within
//! `connect_timeout_ms`, then TLS if `[upstream.NAME.tls]` is set (SNI and
//! the verified name: `server_name`, else the backend's IP address; ALPN
//! offered per `protocol`), then the HTTP handshake of the protocol in use:
//! HTTP/1.1, HTTP/2 with prior knowledge (`h2c`), or what ALPN chose (`h2`
//! and `auto`; a backend that picks no protocol gets HTTP/1.1 under `auto`
//! and fails the connect under `h2`). Used by the connection pool and by
//! health checks, so both speak to a backend the same way. With
//! `send_proxy_protocol`, a PROXY protocol header naming the client goes
//! first, before TLS ([`crate::proxy_protocol`]).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{ProxyProtocolVersion, UpstreamConfig, UpstreamProtocol, UpstreamTlsConfig};
use crate::proxy_protocol::Addresses;

/// A connection ready for requests with body type `B`.
#[derive(Debug)]
pub enum Sender<B> {
    /// One request at a time.
    H1(http1::SendRequest<B>),
    /// Multiplexed: clones share the connection, up to the backend's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` streams at once (more wait).
    H2(http2::SendRequest<B>),
}

/// How an upstream connects to its backends.
#[derive(Clone)]
pub struct Connector {
    connect_timeout: Duration,
    protocol: UpstreamProtocol,
    tls: Option<(TlsConnector, Option<ServerName<'static>>)>,
    proxy_protocol: Option<ProxyProtocolVersion>,
    settings: Settings,
}

/// What a connector is built from: connect timeout (ms), protocol, TLS and
/// PROXY protocol.
type Settings = (
    u64,
    UpstreamProtocol,
    Option<UpstreamTlsConfig>,
    Option<ProxyProtocolVersion>,
);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("connect_timeout", &self.connect_timeout)
            .field("protocol", &self.protocol)
            .field("tls", &self.tls.is_some())
            .field("proxy_protocol", &self.proxy_protocol)
            .finish()
    }
}

impl PartialEq for Connector {
    /// Built from the same settings (a reload that keeps them keeps the pool).
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

impl Connector {
    /// The connector of an upstream.
    pub fn new(config: &UpstreamConfig) -> Self {
        let tls = config.tls.as_ref().map(|t| {
            let name = t
                .server_name
                .as_deref()
                .and_then(|n| ServerName::try_from(n.to_string()).ok());
            (TlsConnector::from(t.client_config.clone()), name)
        });
        Self {
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            protocol: config.protocol,
            tls,
            proxy_protocol: config.send_proxy_protocol,
            settings: (
                config.connect_timeout_ms,
                config.protocol,
                config.tls.clone(),
                config.send_proxy_protocol,
            ),
        }
    }

    /// A plaintext HTTP/1.1 connector (tests and tools).
    pub fn plain(connect_timeout: Duration) -> Self {
        let ms = u64::try_from(connect_timeout.as_millis()).unwrap_or(u64::MAX);
        Self {
            connect_timeout,
            protocol: UpstreamProtocol::Http1,
            tls: None,
            proxy_protocol: None,
            settings: (ms, UpstreamProtocol::Http1, None, None),
        }
    }

    /// True if requests go over TLS (`https` is their scheme).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True if every connection opens with a PROXY protocol header naming
    /// its client, so it may carry that client's requests only.
    pub fn sends_proxy_protocol(&self) -> bool {
        self.proxy_protocol.is_some()
    }

    /// True if connections may be HTTP/2 (`protocol` other than `http1`).
    pub fn may_be_h2(&self) -> bool {
        self.protocol != UpstreamProtocol::Http1
    }

    /// Open a TCP connection to `address` within `connect_timeout_ms`, with
    /// `TCP_NODELAY`.
    ///
    /// # Errors
    /// The socket's error, or `TimedOut` naming the timeout.
    pub async fn tcp(&self, address: SocketAddr) -> io::Result<TcpStream> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no connection within connect_timeout_ms = {}",
                        self.connect_timeout.as_millis()
                    ),
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// [`Connector::tcp`], then, with `send_proxy_protocol`, the PROXY
    /// header naming `client` (`None`: a health check's `LOCAL`/`UNKNOWN`
    /// form), written within `connect_timeout_ms` too.
    ///
    /// # Errors
    /// As [`Connector::tcp`], or the write's error.
    pub async fn open(
        &self,
        address: SocketAddr,
        client: Option<Addresses>,
    ) -> io::Result<TcpStream> {
        let mut stream = self.tcp(address).await?;
        if let Some(version) = self.proxy_protocol {
            use tokio::io::AsyncWriteExt;
            let header = crate::proxy_protocol::encode(version, client);
            tokio::time::timeout(self.connect_timeout, stream.write_all(&header))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the PROXY protocol header was not taken within connect_timeout_ms",
                    )
                })??;
        }
        Ok(stream)
    }

    /// Connect to `address` (TCP, the PROXY header if configured, then TLS
    /// if configured) without the HTTP handshake. A `tcp` health check.
    ///
    /// # Errors
    /// As [`Connector::connect`].
    pub async fn reach(&self, address: SocketAddr) -> io::Result<()> {
        let stream = self.open(address, None).await?;
        if let Some((tls, name)) = &self.tls {
            self.tls_handshake(tls, name, address, stream).await?;
        }
        Ok(())
    }

    async fn tls_handshake(
        &self,
        tls: &TlsConnector,
        name: &Option<ServerName<'static>>,
        address: SocketAddr,
        stream: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(address.ip().into()));
        // The handshake counts against the connect timeout too.
        tokio::time::timeout(self.connect_timeout, tls.connect(name, stream))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no TLS handshake within connect_timeout_ms = {}",
                        self.connect_timeout.as_millis()
                    ),
                )
            })?
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))
    }

    /// Open a connection to `address` for `client` (its PROXY header, if
    /// configured; `None` for health checks) and do the HTTP handshake; its
    /// connection task is spawned on the current runtime.
    ///
    /// # Errors
    /// An `io::Error` from connecting, TLS (a handshake failure, an
    /// untrusted or misnamed certificate, a refused client certificate) or
    /// the HTTP/2 handshake; nothing of a request was sent in any case.
    pub async fn connect<B>(
        &self,
        address: SocketAddr,
        client: Option<Addresses>,
    ) -> io::Result<Sender<B>>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Boxed: the TLS and HTTP/2 handshakes' state is about 9 KB, and
        // every future awaiting a connection (each request's, up to the
        // connection task's) would otherwise hold room for it and copy it
        // at each await; a connect is rare next to a pooled request.
        Box::pin(self.open_and_handshake(address, client)).await
    }

    async fn open_and_handshake<B>(
        &self,
        address: SocketAddr,
        client: Option<Addresses>,
    ) -> io::Result<Sender<B>>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.open(address, client).await?;
        match &self.tls {
            None => {
                let h2 = self.protocol == UpstreamProtocol::H2c;
                handshake(stream, h2, address).await
            }
            Some((tls, name)) => {
                let stream = self.tls_handshake(tls, name, address, stream).await?;
                let alpn_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                if self.protocol == UpstreamProtocol::H2 && !alpn_h2 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "protocol = \"h2\" but the backend did not choose h2 by ALPN",
                    ));
                }
                handshake(stream, alpn_h2, address).await
            }
        }
    }
}

/// The HTTP handshake on `io`, HTTP/2 if `h2`.
async fn handshake<I, B>(io: I, h2: bool, address: SocketAddr) -> io::Result<Sender<B>>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(io);
    let failed = |e: hyper::Error| io::Error::other(format!("HTTP handshake failed: {e}"));
    if h2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%address, "backend HTTP/2 connection ended with an error: {e}");
            }
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::handshake(io).await.map_err(failed)?;
        tokio::spawn(async move {
            // With upgrades: a 101 hands the connection to the response's
            // `hyper::upgrade::on` (a tunnel, see `proxy::Tunnel`).
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%address, "backend connection ended with an error: {e}");
            }
        });
        Ok(Sender::H1(sender))
    }
}

/// Adapt a backend request head (origin-form URI, `Host` set, as
/// [`crate::headers::prepare_request`] makes it) to the connection: for
/// HTTP/2 the URI becomes absolute (`:scheme` from `tls`, `:authority` from
/// `Host`, which is removed, RFC 9113 §8.3.1); for HTTP/1.1 `TE` is removed
/// (it is kept only as `te: trailers`, for HTTP/2, RFC 9113 §8.2.2). A
/// `Host` that is no valid authority gives way to `address`.
pub fn adapt_head<B>(request: &mut http::Request<B>, h2: bool, tls: bool, address: SocketAddr) {
    if !h2 {
        request.headers_mut().remove(http::header::TE);
        return;
    }
    let authority = request
        .headers_mut()
        .remove(http::header::HOST)
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok());
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(if tls {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    parts.authority =
        authority.or_else(|| http::uri::Authority::try_from(address.to_string()).ok());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    *request.version_mut() = http::Version::HTTP_2;
}
