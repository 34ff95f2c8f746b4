//! Transaction Tokens as the pipeline sees them: the acquisition trait the
//! `txn-token-client` crate implements, verified claims, and a secret wrapper
//! that never prints the token.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::ctxref::VerifiedRef;
use crate::keys::sha256_hex;
use crate::message::InboundMessage;
use crate::scope::Scope;

/// The JOSE `typ` of a Transaction Token.
pub const TXN_TOKEN_TYP: &str = "txntoken+jwt";

/// A bearer credential that must never be logged: `Debug`/`Display` show its SHA-256.
///
/// Cheap to clone (shared): a cached Txn-Token is handed to every message
/// of its context, and its SHA-256 is computed once.
#[derive(Clone)]
pub struct SecretToken(Arc<SecretInner>);

struct SecretInner {
    token: String,
    sha256: std::sync::OnceLock<String>,
}

impl PartialEq for SecretToken {
    fn eq(&self, other: &Self) -> bool {
        self.0.token == other.0.token
    }
}

impl Eq for SecretToken {}

impl SecretToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        SecretToken(Arc::new(SecretInner {
            token: token.into(),
            sha256: std::sync::OnceLock::new(),
        }))
    }

    /// The token itself, for an outgoing `Txn-Token` header. Never log it.
    pub fn expose(&self) -> &str {
        &self.0.token
    }

    /// SHA-256 (hex) of the token: what logs and records carry.
    pub fn sha256(&self) -> String {
        self.0
            .sha256
            .get_or_init(|| sha256_hex(self.0.token.as_bytes()))
            .clone()
    }
}

impl std::fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretToken(sha256:{})", &self.sha256()[..16])
    }
}

impl std::fmt::Display for SecretToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.sha256())
    }
}

/// A token shown in `Debug` output as its SHA-256 prefix only, so that a
/// `?value` in a log line never leaks a reference or a credential.
pub struct Redacted<'a>(pub &'a str);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sha256:{}",
            &crate::keys::sha256_hex(self.0.as_bytes())[..16]
        )
    }
}

/// Claims of a verified Txn-Token (draft-ietf-oauth-transaction-tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxnTokenClaims {
    /// Issued at.
    pub iat: i64,
    /// The token's `exp` claim (seconds since the epoch); past it the token is refused.
    pub exp: i64,
    /// Trust domain.
    #[serde(deserialize_with = "crate::token::one_or_many")]
    pub aud: Vec<String>,
    /// Transaction id.
    pub txn: String,
    /// The subject the transaction acts for (the `sub` claim).
    pub sub: String,
    /// Granted scope.
    pub scope: String,
    /// The requesting workload.
    pub req_wl: String,
    /// Token id, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Transaction context (origin txn, producer, destination, chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tctx: Option<serde_json::Value>,
    /// Requester context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rctx: Option<serde_json::Value>,
}

/// Accepts a JSON string or array of strings (the `aud` claim).
///
/// # Errors
///
/// Returns the deserializer's error if the value is neither a string nor an array of strings.
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// A verified Txn-Token: the secret and its claims. Cheap to clone (both
/// are shared): the token cache hands one to every message of a context.
#[derive(Debug, Clone)]
pub struct TxnToken {
    /// The token, for downstream calls.
    pub token: SecretToken,
    /// Its verified claims.
    pub claims: Arc<TxnTokenClaims>,
}

/// What the pipeline asks a token source for.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    /// The verified reference (its compact form is the `subject_token`).
    pub reference: &'a VerifiedRef,
    /// The scope to request (the reference's scope by default).
    pub scope: &'a Scope,
    /// `request_details`: broker coordinates and message id.
    pub request_details: RequestDetails<'a>,
}

impl<'a> TokenRequest<'a> {
    /// Builds the request for one message: scope = the reference's, details = its coordinates.
    pub fn for_message(
        reference: &'a VerifiedRef,
        scope: &'a Scope,
        msg: &'a InboundMessage,
    ) -> Self {
        TokenRequest {
            reference,
            scope,
            request_details: RequestDetails::Message(msg),
        }
    }
}

/// The `request_details` of an exchange, built only when an exchange is
/// made: most messages are served by a cached token, and building the JSON
/// per message was a copy of its coordinates for nothing.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RequestDetails<'a> {
    /// The message's coordinates, destination and id.
    Message(&'a InboundMessage),
    /// Given as is.
    Value(serde_json::Value),
}

impl RequestDetails<'_> {
    /// The JSON sent as `request_details`.
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            RequestDetails::Message(msg) => serde_json::json!({
                "source": msg.coordinates,
                "destination": msg.destination,
                "message_id": msg.message_id,
            }),
            RequestDetails::Value(v) => v.clone(),
        }
    }
}

impl From<serde_json::Value> for RequestDetails<'_> {
    fn from(v: serde_json::Value) -> Self {
        RequestDetails::Value(v)
    }
}

/// Why no Txn-Token was obtained; the class decides Retry versus Deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Network failure, timeout, 5xx, 429, open circuit: try again later.
    #[error("token service unavailable: {reason}")]
    Unavailable {
        /// What happened.
        reason: String,
        /// Server-suggested wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The service refused (RFC 6749 §5.2 error code): terminal.
    #[error("token service refused: {code}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Denied {
        /// The OAuth error code (`invalid_grant`, `invalid_scope`...).
        code: String,
        /// `error_description`, if any.
        description: Option<String>,
    },
    /// A token came back but failed verification or the response broke the protocol.
    #[error("invalid token or response: {0}")]
    Invalid(String),
}

/// Obtains a fresh Txn-Token for the consuming workload from a context reference.
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync {
    /// Exchanges the reference; the returned token is already verified.
    async fn acquire(&self, req: &TokenRequest<'_>) -> Result<TxnToken, TokenError>;
}
