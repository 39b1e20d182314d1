//! `[listener.tls]`, `[upstream.NAME.tls]` and `protocol`: their types and
//! validation. Certificate, key and CA files are read and checked here, so a
//! bad one rejects the config (or the reload) naming the file, line and key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::Spanned;

use super::ConfigError;
use super::raw::{RawListenerTls, RawUpstreamTls};
use super::validate::Validator;
use crate::tls::{ClientSettings, ServerCert, TlsVersion};

/// `[listener.tls]`: TLS termination on a listener.
#[derive(Debug, Clone)]
pub struct ListenerTlsConfig {
    /// Certificates with their keys (`certificates`, PEM files relative to
    /// the config file), chosen by SNI; the first is the default.
    pub certificates: Vec<Arc<ServerCert>>,
    /// ALPN protocols offered, in order (`alpn`, default `["h2", "http/1.1"]`).
    pub alpn: Vec<String>,
    /// The lowest TLS version accepted (`min_version`, `"1.2"` (default) or `"1.3"`).
    pub min_version: TlsVersion,
    /// The rustls config built from the above.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl PartialEq for ListenerTlsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.certificates == other.certificates
            && self.alpn == other.alpn
            && self.min_version == other.min_version
    }
}

/// The protocol an upstream speaks to its backends (`protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, over TLS if `[upstream.NAME.tls]` is set (`"http1"`, the default).
    #[default]
    Http1,
    /// HTTP/2 over plaintext, prior knowledge (`"h2c"`).
    H2c,
    /// HTTP/2 over TLS, negotiated by ALPN (`"h2"`; needs `tls`).
    H2,
    /// Over TLS, whichever of HTTP/2 and HTTP/1.1 ALPN chooses (`"auto"`; needs `tls`).
    Auto,
}

impl UpstreamProtocol {
    /// The ALPN protocols offered to a backend over TLS.
    pub fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
            UpstreamProtocol::H2 => vec![b"h2".to_vec()],
            UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            UpstreamProtocol::H2c => Vec::new(),
        }
    }
}

/// `[upstream.NAME.tls]`: TLS to the backends (and their health checks).
#[derive(Debug, Clone)]
pub struct UpstreamTlsConfig {
    /// SNI and the name verified (`server_name`; default: the backend's
    /// host, an IP address, verified against the certificate's IP names).
    pub server_name: Option<String>,
    /// Roots (`ca_file`, PEM; default: the system's).
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS (`client_cert`, with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// The client certificate's key (`client_key`).
    pub client_key: Option<PathBuf>,
    /// Do not verify the backend's certificate (`insecure_skip_verify`,
    /// default false; warned about at start).
    pub insecure_skip_verify: bool,
    /// The rustls config built from the above and the upstream's protocol.
    pub client_config: Arc<rustls::ClientConfig>,
}

impl PartialEq for UpstreamTlsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name
            && self.ca_file == other.ca_file
            && self.client_cert == other.client_cert
            && self.client_key == other.client_key
            && self.insecure_skip_verify == other.insecure_skip_verify
            && Arc::ptr_eq(&self.client_config, &other.client_config)
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Validator<'_> {
    fn base(&self) -> &Path {
        self.path.parent().unwrap_or_else(|| Path::new("."))
    }

    /// Validate `[listener.tls]` at `key` (e.g. `listener[0].tls`).
    pub(super) fn listener_tls(
        &self,
        key: &str,
        raw: &Spanned<RawListenerTls>,
    ) -> Result<ListenerTlsConfig, ConfigError> {
        let span = raw.span();
        let raw = raw.get_ref();
        if raw.certificates.get_ref().is_empty() {
            return Err(self.err(
                Some(raw.certificates.span()),
                format!("{key}.certificates"),
                "at least one { cert = \"...\", key = \"...\" } is required",
            ));
        }
        let mut certificates = Vec::new();
        for (j, c) in raw.certificates.get_ref().iter().enumerate() {
            let at = format!("{key}.certificates[{j}]");
            let cert = ServerCert::load(&self.base().join(&c.cert), &self.base().join(&c.key))
                .map_err(|e| self.err(Some(raw.certificates.span()), at.clone(), e.to_string()))?;
            if cert.expired_at(now_unix()) {
                self.warnings.borrow_mut().push(format!(
                    "{}: {at}: the certificate {} expired on {}",
                    self.path.display(),
                    cert.cert_path.display(),
                    cert.not_after_text
                ));
            }
            certificates.push(Arc::new(cert));
        }
        let alpn = match &raw.alpn {
            None => vec!["h2".to_string(), "http/1.1".to_string()],
            Some(a) => {
                for p in a.get_ref() {
                    if !matches!(p.as_str(), "h2" | "http/1.1") {
                        return Err(self.err(
                            Some(a.span()),
                            format!("{key}.alpn"),
                            format!("{p:?} is not served: use \"h2\" and/or \"http/1.1\""),
                        ));
                    }
                }
                a.get_ref().clone()
            }
        };
        let min_version = match raw.min_version.as_ref().map(|v| (v.get_ref().as_str(), v)) {
            None | Some(("1.2", _)) => TlsVersion::V1_2,
            Some(("1.3", _)) => TlsVersion::V1_3,
            Some((other, v)) => {
                return Err(self.err(
                    Some(v.span()),
                    format!("{key}.min_version"),
                    format!("{other:?}: use \"1.2\" or \"1.3\""),
                ));
            }
        };
        let server_config = crate::tls::server_config(certificates.clone(), &alpn, min_version)
            .map_err(|e| self.err(Some(span), key, e.to_string()))?;
        Ok(ListenerTlsConfig {
            certificates,
            alpn,
            min_version,
            server_config,
        })
    }

    /// Validate an upstream's `protocol` and `[upstream.NAME.tls]` (at `prefix`).
    pub(super) fn upstream_protocol(
        &self,
        prefix: &str,
        protocol: Option<&Spanned<String>>,
        tls: Option<&Spanned<RawUpstreamTls>>,
    ) -> Result<(UpstreamProtocol, Option<UpstreamTlsConfig>), ConfigError> {
        let chosen = match protocol.map(|p| (p.get_ref().as_str(), p)) {
            None | Some(("http1", _)) => UpstreamProtocol::Http1,
            Some(("h2c", _)) => UpstreamProtocol::H2c,
            Some(("h2", _)) => UpstreamProtocol::H2,
            Some(("auto", _)) => UpstreamProtocol::Auto,
            Some((other, p)) => {
                return Err(self.err(
                    Some(p.span()),
                    format!("{prefix}.protocol"),
                    format!("{other:?}: use \"http1\", \"h2c\", \"h2\" or \"auto\""),
                ));
            }
        };
        if let Some(p) = protocol {
            match (chosen, tls.is_some()) {
                (UpstreamProtocol::H2 | UpstreamProtocol::Auto, false) => {
                    return Err(self.err(
                        Some(p.span()),
                        format!("{prefix}.protocol"),
                        format!(
                            "{:?} negotiates by ALPN and needs [{prefix}.tls]; for HTTP/2 over plaintext use \"h2c\"",
                            p.get_ref()
                        ),
                    ));
                }
                (UpstreamProtocol::H2c, true) => {
                    return Err(self.err(
                        Some(p.span()),
                        format!("{prefix}.protocol"),
                        "\"h2c\" is HTTP/2 over plaintext; over TLS use \"h2\" or \"auto\"",
                    ));
                }
                _ => {}
            }
        }
        let Some(raw) = tls else {
            return Ok((chosen, None));
        };
        let key = format!("{prefix}.tls");
        let span = raw.span();
        let raw = raw.get_ref();
        if let Some(name) = &raw.server_name
            && rustls::pki_types::ServerName::try_from(name.get_ref().as_str()).is_err()
        {
            return Err(self.err(
                Some(name.span()),
                format!("{key}.server_name"),
                format!("{:?} is not a DNS name or IP address", name.get_ref()),
            ));
        }
        let (client_cert, client_key) = match (&raw.client_cert, &raw.client_key) {
            (Some(c), Some(k)) => (Some(self.base().join(c)), Some(self.base().join(k))),
            (None, None) => (None, None),
            _ => {
                return Err(self.err(
                    Some(span),
                    key,
                    "client_cert and client_key go together (mutual TLS)",
                ));
            }
        };
        let ca_file = raw.ca_file.as_ref().map(|c| self.base().join(c));
        if raw.insecure_skip_verify {
            self.warnings.borrow_mut().push(format!(
                "{}: {key}.insecure_skip_verify = true: the backends' certificates are not verified",
                self.path.display()
            ));
        }
        let settings = ClientSettings {
            ca_file: ca_file.as_deref(),
            client_cert: client_cert.as_deref().zip(client_key.as_deref()),
            insecure_skip_verify: raw.insecure_skip_verify,
            alpn: chosen.alpn(),
        };
        let (client_config, client) = crate::tls::client_config(&settings)
            .map_err(|e| self.err(Some(span), key.clone(), e.to_string()))?;
        if let Some(c) = client
            && c.expired_at(now_unix())
        {
            self.warnings.borrow_mut().push(format!(
                "{}: {key}.client_cert: the certificate {} expired on {}",
                self.path.display(),
                c.cert_path.display(),
                c.not_after_text
            ));
        }
        Ok((
            chosen,
            Some(UpstreamTlsConfig {
                server_name: raw.server_name.as_ref().map(|n| n.get_ref().clone()),
                ca_file,
                client_cert,
                client_key,
                insecure_skip_verify: raw.insecure_skip_verify,
                client_config,
            }),
        ))
    }
}
