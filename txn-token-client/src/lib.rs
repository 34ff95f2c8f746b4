//! OAuth Transaction Tokens for Elevate: the RFC 8693 client profiled by
//! draft-ietf-oauth-transaction-tokens ([`client`]) and Txn-Token
//! verification with a cached, rotating JWKS ([`verify`]). The reference
//! Transaction Token Service is the `elevate-tts` crate, which speaks the
//! same wire types ([`protocol`], [`assertion`]) and so stays in step with
//! this client.
//!
//! Module map, by protocol step: [`protocol`] (wire names and messages),
//! [`assertion`] (RFC 7523 client authentication), [`breaker`] (outage →
//! fast Retry), [`entry`] (the produce-side entry flow: verified Txn-Token
//! in, subject context out), [`key_directory`] (the trust domain's producer
//! keys, fetched from the TTS and refreshed on rotation),
//! [`decision_shipper`] (the decision spool's HTTP shipper, on the same client).

pub mod assertion;
pub mod breaker;
pub mod client;
pub mod decision_shipper;
pub mod entry;
pub mod key_directory;
pub mod protocol;
pub mod verify;

pub use client::{TtsClient, TtsClientConfig};
pub use decision_shipper::HttpDecisionShipper;
pub use entry::subject_context;
pub use key_directory::{KeyDirectory, KeyDirectoryConfig, KeyDirectoryError};
pub use protocol::ClientAuthMethod;
pub use verify::{FailoverJwks, JwksProvider, TxnTokenVerifier, VerifyError};

/// Installs the aws-lc-rs rustls crypto provider as the process default.
///
/// Several dependencies enable both rustls providers; rustls then refuses to
/// pick one, so Elevate installs one explicitly. "Already installed" is fine.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
