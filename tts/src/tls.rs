//! TLS at the service (rustls, aws-lc-rs) and the client certificates of
//! RFC 8705 `tls_client_auth`.
//!
//! The listener presents the configured server certificate and, when a
//! client CA bundle is configured, asks every client for a certificate
//! without requiring one: a certificate that is presented must chain to that
//! bundle (else the handshake fails), and a client that presents none still
//! connects and authenticates with a `private_key_jwt` assertion. The
//! verified leaf certificate of each connection reaches the token endpoint as
//! a [`TlsConnection`] request extension.
//!
//! Several dependencies enable both rustls crypto providers, so nothing here
//! relies on a process default: every configuration is built with
//! [`provider`] (aws-lc-rs), and the same provider is installed as the
//! process default for anything else in the process that uses rustls.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, TlsConfig, resolve};

/// The crypto provider of every TLS configuration the service builds: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM input holds nothing usable of what it should.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input (`server certificate`, `server key`, `client CA`).
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificates or key.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The listener's TLS configuration.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    client_auth: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

fn certificates(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

impl ServerTls {
    /// A configuration from PEM text: the server's certificate chain (leaf
    /// first), its private key (PKCS#8, SEC1 or PKCS#1), and optionally the
    /// CA certificates client certificates must chain to. Without
    /// `client_ca_pem` no client certificate is asked for.
    ///
    /// # Errors
    ///
    /// Returns [`TlsError::Pem`] if an input has no certificate (or key) or does
    /// not parse, and [`TlsError::Rustls`] if rustls refuses a CA certificate, the
    /// key, or the key for the certificate.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        client_ca_pem: Option<&[u8]>,
    ) -> Result<Self, TlsError> {
        let certs = certificates("server certificate", cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
            what: "server key",
            reason: e.to_string(),
        })?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match client_ca_pem {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in certificates("client CA", pem)? {
                    roots
                        .add(ca)
                        .map_err(|e| TlsError::Rustls(format!("client CA: {e}")))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        // Asked for, not required: private_key_jwt clients connect without one.
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| TlsError::Rustls(format!("client CA: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            client_auth: client_ca_pem.is_some(),
        })
    }

    /// Reads the files of a `[tls]` table (relative paths against `base`).
    ///
    /// # Errors
    ///
    /// Returns [`ConfigError::Io`] if a file cannot be read and [`ConfigError::Tls`] for the
    /// errors of [`from_pem`](Self::from_pem), naming the file.
    pub fn load(cfg: &TlsConfig, base: &Path) -> Result<Self, ConfigError> {
        let read = |p: &Path| {
            let path = resolve(base, p);
            std::fs::read(&path).map_err(|source| ConfigError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        let cert = read(&cfg.cert)?;
        let key = read(&cfg.key)?;
        let ca = cfg.client_ca.as_deref().map(read).transpose()?;
        Self::from_pem(&cert, &key, ca.as_deref()).map_err(|e| ConfigError::Tls {
            files: format!(
                "cert {}, key {}{}",
                cfg.cert.display(),
                cfg.key.display(),
                cfg.client_ca
                    .as_ref()
                    .map(|c| format!(", client_ca {}", c.display()))
                    .unwrap_or_default()
            ),
            reason: e.to_string(),
        })
    }

    /// True when client certificates are asked for (a client CA is configured):
    /// the listener then offers `tls_client_auth`.
    pub fn client_auth(&self) -> bool {
        self.client_auth
    }

    /// The rustls configuration.
    pub fn rustls_config(&self) -> &Arc<ServerConfig> {
        &self.config
    }
}

/// A client certificate that verified during the TLS handshake (its leaf).
/// Logs name it by [`sha256_hex`](Self::sha256_hex), never by its bytes.
#[derive(Clone)]
pub struct ClientCertificate {
    der: CertificateDer<'static>,
    sha256_hex: String,
    x5t_s256: String,
    uri_sans: Vec<String>,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("sha256", &self.sha256_hex)
            .field("uri_sans", &self.uri_sans)
            .finish_non_exhaustive()
    }
}

impl ClientCertificate {
    /// Reads a verified leaf certificate (DER). A certificate whose
    /// extensions do not parse gets no URI SANs, so it authenticates nobody.
    pub fn from_der(der: CertificateDer<'static>) -> Self {
        let digest = Sha256::digest(der.as_ref());
        let uri_sans = uri_sans(der.as_ref());
        ClientCertificate {
            sha256_hex: digest.iter().map(|b| format!("{b:02x}")).collect(),
            x5t_s256: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest),
            uri_sans,
            der,
        }
    }

    /// The URI subject alternative names (a SPIFFE X.509-SVID has exactly one:
    /// `spiffe://trust-domain/path`).
    pub fn uri_sans(&self) -> &[String] {
        &self.uri_sans
    }

    /// Hex SHA-256 of the DER certificate: how logs name it.
    pub fn sha256_hex(&self) -> &str {
        &self.sha256_hex
    }

    /// base64url SHA-256 of the DER certificate: the `x5t#S256` confirmation
    /// method of a certificate-bound token (RFC 8705 §3.1).
    pub fn x5t_s256(&self) -> &str {
        &self.x5t_s256
    }

    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        self.der.as_ref()
    }
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What the TLS listener knows about one connection, inserted into every
/// request on it. Absent on plain HTTP.
#[derive(Debug, Clone, Default)]
pub struct TlsConnection {
    /// The client's verified certificate, when it presented one.
    pub client_certificate: Option<Arc<ClientCertificate>>,
}
