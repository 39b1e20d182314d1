//! TLS material and rustls configs (crypto provider: `ring`, which builds
//! with the C compiler Rust already needs).
//!
//! - **Server side** (`[listener.tls]`): PEM certificate chains and keys,
//!   loaded and checked ([`ServerCert::load`]: readable, PEM, key matching
//!   the certificate); the certificate is chosen by SNI against each
//!   certificate's DNS names (subject alternative names, else the common
//!   name; `*.example.com` matches one label), the first being the default
//!   for a client that sends no SNI or an unknown one, as NGINX's
//!   `default_server` certificate; ALPN and the minimum version are set
//!   ([`server_config`]).
//! - **Client side** (`[upstream.NAME.tls]`): the roots (a CA file, else the
//!   system's), an optional client certificate (mutual TLS), and
//!   `insecure_skip_verify` (certificate not verified; handshake signatures
//!   still are) ([`client_config`]).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Why TLS material could not be loaded or used. Every variant names the
/// file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// No PEM `CERTIFICATE` block in the file.
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// No unencrypted PEM private key in the file.
    #[error(
        "{}: no unencrypted PEM private key in it (PKCS#8, PKCS#1 or SEC1; a \
         password-protected key must be decrypted first, e.g. `openssl pkey -in KEY -out KEY.plain`)",
        path.display()
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The certificate or key is malformed or unsupported.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("the key in {} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the combination (protocol versions).
    #[error("{0}")]
    Config(String),
}

/// The crypto provider every config uses: ring's, with the cipher suites
/// ordered by preference as a server applies them: TLS 1.3 before 1.2, and
/// within each, SHA-256 suites (AES-128-GCM, then ChaCha20-Poly1305) before
/// AES-256-GCM/SHA-384.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        let tls13 = suite.tls13().is_some();
        let sha384 = suite
            .suite()
            .as_str()
            .is_some_and(|n| n.ends_with("SHA384"));
        (!tls13, sha384)
    });
    Arc::new(provider)
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
///
/// # Errors
/// [`TlsError::Read`], [`TlsError::NoCertificate`] or [`TlsError::Invalid`].
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not a valid PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first unencrypted private key in a PEM file.
///
/// # Errors
/// [`TlsError::Read`] or [`TlsError::NoKey`] (also for an encrypted key).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
        path: path.to_path_buf(),
    })
}

/// A certificate chain with its key, loaded from PEM files and checked.
pub struct ServerCert {
    /// The certificate chain file.
    pub cert_path: PathBuf,
    /// The key file.
    pub key_path: PathBuf,
    /// The DNS names the leaf certificate is valid for (subject alternative
    /// names, else the subject's common name), lowercase.
    pub names: Vec<String>,
    /// The leaf's `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
    /// The leaf's `notAfter`, as the certificate says it (for messages).
    pub not_after_text: String,
    /// The chain and signing key rustls serves.
    pub key: Arc<CertifiedKey>,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("names", &self.names)
            .field("not_after", &self.not_after_text)
            .finish()
    }
}

impl PartialEq for ServerCert {
    /// Same files, same certificate chain.
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path
            && self.key_path == other.key_path
            && self.key.cert == other.key.cert
    }
}

impl Eq for ServerCert {}

impl ServerCert {
    /// Load `cert` (a PEM chain, leaf first) and `key` (PEM) and check that
    /// the key is the leaf's.
    ///
    /// # Errors
    /// A [`TlsError`] naming the file at fault.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = load_certificates(cert)?;
        let key_der = load_key(key)?;
        let provider = provider();
        let signer = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| TlsError::Invalid {
                path: key.to_path_buf(),
                reason: format!("unsupported private key: {e}"),
            })?;
        let (names, not_after, not_after_text) = leaf_facts(cert, &chain[0])?;
        let certified = CertifiedKey::new(chain, signer);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(TlsError::Mismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                });
            }
            // The key type cannot tell (rustls returns Unknown): the
            // handshake's signature check is the proof then.
            Err(_) => {}
        }
        Ok(Self {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            names,
            not_after,
            not_after_text,
            key: Arc::new(certified),
        })
    }

    /// True if the leaf certificate's `notAfter` is before `now` (seconds
    /// since the Unix epoch).
    pub fn expired_at(&self, now: i64) -> bool {
        self.not_after < now
    }

    /// True if this certificate is valid for the DNS name `sni`.
    pub fn serves(&self, sni: &str) -> bool {
        self.names.iter().any(|n| name_matches(n, sni))
    }
}

/// The leaf's DNS names and `notAfter`.
fn leaf_facts(
    path: &Path,
    leaf: &CertificateDer<'_>,
) -> Result<(Vec<String>, i64, String), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::Invalid {
        path: path.to_path_buf(),
        reason: format!("not a valid X.509 certificate: {e}"),
    })?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    let not_after = cert.validity().not_after;
    Ok((names, not_after.timestamp(), not_after.to_string()))
}

/// RFC 6125 §6.4 matching: exact (ASCII case-insensitive), or a `*.` wildcard
/// standing for exactly one leftmost label.
fn name_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.');
    if let Some(suffix) = pattern.strip_prefix("*.") {
        return name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix));
    }
    pattern.eq_ignore_ascii_case(name)
}

/// Chooses the certificate by SNI; the first is the default.
#[derive(Debug)]
struct SniResolver {
    certs: Vec<Arc<ServerCert>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|sni| self.certs.iter().find(|c| c.serves(sni)))
            .or_else(|| self.certs.first())?;
        Some(chosen.key.clone())
    }
}

/// The minimum TLS version a listener accepts (`min_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (`"1.2"`, the default).
    #[default]
    V1_2,
    /// TLS 1.3 only (`"1.3"`).
    V1_3,
}

impl TlsVersion {
    fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static V1_2: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static V1_3: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            TlsVersion::V1_2 => &V1_2,
            TlsVersion::V1_3 => &V1_3,
        }
    }
}

/// A listener's rustls config: `certs` chosen by SNI (the first is the
/// default), `alpn` offered in order of preference, `min_version`.
///
/// # Errors
/// [`TlsError::Config`] if rustls refuses the versions (it does not for
/// the two offered).
pub fn server_config(
    certs: Vec<Arc<ServerCert>>,
    alpn: &[String],
    min_version: TlsVersion,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(min_version.versions())
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certs }));
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // The server's order of cipher suites wins (NGINX
    // `ssl_prefer_server_ciphers on`): AES-128-GCM with SHA-256 first. Most
    // clients list AES-256-GCM/SHA-384 first, whose SHA-512 rounds run in
    // ring's portable code on CPUs without its vector paths (about 10 % of
    // a handshake, measured with perf on an AMD EPYC VM); SHA-256 uses the
    // SHA extensions.
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// What an upstream's TLS client config is made of.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings<'a> {
    /// Roots to verify the backend against (PEM); `None`: the system's.
    pub ca_file: Option<&'a Path>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub client_cert: Option<(&'a Path, &'a Path)>,
    /// Do not verify the backend's certificate.
    pub insecure_skip_verify: bool,
    /// ALPN protocols to offer, in order of preference.
    pub alpn: Vec<Vec<u8>>,
}

/// An upstream's rustls client config, and the client certificate it
/// presents (checked as [`ServerCert::load`] checks), if any.
///
/// # Errors
/// A [`TlsError`] naming the CA, certificate or key file at fault.
pub fn client_config(
    settings: &ClientSettings<'_>,
) -> Result<(Arc<rustls::ClientConfig>, Option<ServerCert>), TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match settings.ca_file {
            Some(path) => {
                for cert in load_certificates(path)? {
                    roots.add(cert).map_err(|e| TlsError::Invalid {
                        path: path.to_path_buf(),
                        reason: format!("not a usable CA certificate: {e}"),
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        builder.with_root_certificates(roots)
    };
    let (mut config, client) = match settings.client_cert {
        Some((cert, key)) => {
            // Checked as a server certificate is (the pair matches); its
            // chain is what the client presents.
            let client = ServerCert::load(cert, key)?;
            let config = builder
                .with_client_auth_cert(client.key.cert.clone(), load_key(key)?)
                .map_err(|e| TlsError::Invalid {
                    path: key.to_path_buf(),
                    reason: e.to_string(),
                })?;
            (config, Some(client))
        }
        None => (builder.with_no_client_auth(), None),
    };
    config.alpn_protocols = settings.alpn.clone();
    Ok((Arc::new(config), client))
}

/// `insecure_skip_verify`: accepts any certificate, still checks the
/// handshake signatures with the provider's algorithms.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_exactly_or_by_one_wildcard_label() {
        assert!(name_matches("api.example.com", "API.example.com"));
        assert!(name_matches("api.example.com", "api.example.com."));
        assert!(name_matches("*.example.com", "api.example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("api.example.com", "www.example.com"));
    }
}
