//! The reference Transaction Token Service: one [`Issuer`] (registry, key
//! ring, validation, minting) behind two faces — the axum HTTP(S) service
//! ([`RunningTts`], TLS and RFC 8705 client certificates in [`tls`]) and the in-process [`InProcessTts`] — and the
//! `txn-token-service` binary ([`cli`]).
//!
//! It is its own crate so that a consumer, which only needs the client side
//! (`txn-token-client`), does not build the HTTP server, the command line or
//! the configuration parser. The wire types it shares with the client
//! (`txn_token_client::protocol`, `txn_token_client::assertion`) live in the
//! client crate, so both sides speak one definition of the protocol.

pub mod admin;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod http;
pub mod inprocess;
pub mod issuer;
pub mod key_files;
pub mod keyring;
pub mod metrics;
pub mod registry;
pub mod store;
pub mod test_issuer;
pub mod tls;
pub mod user_issuer;

pub use config::{
    AdminConfig, ConfigError, OperatorConfig, ServiceConfig, StoreConfig, TlsConfig,
    UserIssuerConfig, WorkloadConfig,
};
pub use http::{RunningTts, router};
pub use inprocess::InProcessTts;
pub use issuer::{Issued, Issuer, IssuerSettings, MintedClaims};
pub use key_files::KeyFileWatcher;
pub use test_issuer::TestIssuer;
pub use tls::{ClientCertificate, ServerTls, TlsConnection};
pub use user_issuer::AccessTokenVerifier;

#[cfg(test)]
mod tests;
