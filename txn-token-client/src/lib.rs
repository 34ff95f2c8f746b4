//! OAuth Transaction Tokens for Elevate: the RFC 8693 client profiled by
//! draft-ietf-oauth-transaction-tokens ([`client`]), Txn-Token verification
//! with a cached, rotating JWKS ([`verify`]), and the reference Transaction
//! Token Service ([`service`]) that runs over HTTP or in process with the
//! same minting and validation code.
//!
//! Module map, by protocol step: [`protocol`] (wire names and messages),
//! [`assertion`] (RFC 7523 client authentication), [`breaker`] (outage →
//! fast Retry), [`entry`] (the produce-side entry flow: user token in,
//! subject context out), [`cli`] (the `txn-token-service` binary).

pub mod assertion;
pub mod breaker;
pub mod cli;
pub mod client;
pub mod entry;
pub mod protocol;
pub mod service;
pub mod verify;

pub use client::{TtsClient, TtsClientConfig};
pub use entry::{TestIssuer, subject_context};
pub use service::{InProcessTts, Issuer, IssuerSettings, RunningTts, ServiceConfig};
pub use verify::{JwksProvider, TxnTokenVerifier, VerifyError};

/// Installs the aws-lc-rs rustls crypto provider as the process default.
///
/// Several dependencies enable both rustls providers; rustls then refuses to
/// pick one, so Elevate installs one explicitly. "Already installed" is fine.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
