//! The reference Transaction Token Service: one [`Issuer`] (registry, key
//! ring, validation, minting) behind two faces — the axum HTTP service
//! ([`RunningTts`]) and the in-process [`InProcessTts`].

pub mod config;
pub mod http;
pub mod inprocess;
pub mod issuer;
pub mod keyring;
pub mod registry;
pub mod user_issuer;

pub use config::{ConfigError, ServiceConfig, UserIssuerConfig, WorkloadConfig};
pub use http::{RunningTts, router};
pub use inprocess::InProcessTts;
pub use issuer::{Issued, Issuer, IssuerSettings, MintedClaims};
pub use user_issuer::AccessTokenVerifier;

#[cfg(test)]
mod tests;
