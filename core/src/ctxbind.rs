//! The per-context binding: one signature per (origin context, audience),
//! one MAC per message.
//!
//! A per-message reference (`ztauth-ctx-ref` alone) is signed for each
//! message and binds it by `dst` and `dig`. In the per-context mode the
//! producer signs one *context* reference per (origin context, audience,
//! parent hop) that carries no `dst`/`dig` but an RFC 7800 confirmation
//! key: `cnf.jwe`, a fresh 256-bit HMAC key as a JWK, JWE-encrypted
//! (`ECDH-ES+A256KW`, `A256GCM`) to the audience's key-agreement key. Each
//! message then carries a binding (`ztauth-ctx-bind`, a compact JWS with
//! `alg: HS256`, `typ: ctx-bind+jwt`) whose MAC under that key covers the
//! context reference's SHA-256 (`ref`), the destination (`dst`), the payload
//! digest (`dig`), a message id (`jti`) and the time it was bound (`iat`).
//!
//! The consumer verifies the context reference (signature, issuer, audience,
//! lifetime, chain) and unwraps its key once ([`ContextOpener`], a bounded
//! cache keyed by the reference's SHA-256 that forgets an entry at the
//! reference's expiry or when the trusted key set changes) and checks only
//! the MAC per message. The message's `jti` is what the replay guard sees.
//! See docs/DESIGN-NOTES.md, "Per-context binding", for the threat model.

pub mod keys;
mod open;
mod seal;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

pub use keys::{AgreementKeyError, AudienceKeys, KeyAgreementKey, audience_jwks};
pub use open::{BindingError, ContextOpener};
pub use seal::{ContextBinder, DEFAULT_OPEN_AFTER, DEFAULT_RENEW_AFTER_FRACTION, Sealed};

/// The header that carries a message's binding in the per-context mode.
pub const CTX_BIND_HEADER: &str = "ztauth-ctx-bind";
/// The JOSE `typ` of a message binding.
pub const CTX_BIND_TYP: &str = "ctx-bind+jwt";
/// The longest binding token read (bytes).
pub const MAX_BINDING_LEN: usize = 2048;

/// Which wire contract a producer publishes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BindingMode {
    /// Every message carries its own signed reference (`dst`, `dig`).
    #[default]
    PerMessage,
    /// One signed context reference per (origin context, audience), a MAC per message.
    PerContext,
}

impl BindingMode {
    /// The wire and configuration name (`per-message`, `per-context`).
    pub fn as_str(self) -> &'static str {
        match self {
            BindingMode::PerMessage => "per-message",
            BindingMode::PerContext => "per-context",
        }
    }
}

/// RFC 7800 confirmation (`cnf`) of a context reference: the message
/// binding key, encrypted to the audience (`jwe`, compact serialization).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The JWE whose plaintext is the binding key as a JWK (`kty: oct`).
    pub jwe: String,
}

impl std::fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confirmation")
            .field("jwe", &crate::token::Redacted(&self.jwe))
            .finish()
    }
}

/// The claims of a message binding (`ztauth-ctx-bind`), MACed under the
/// context's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingClaims {
    /// base64url SHA-256 of the context reference (compact JWS) it binds to.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Destination the message was published to.
    pub dst: String,
    /// base64url SHA-256 of the payload.
    pub dig: String,
    /// Unique id of this message (the replay guard's key).
    pub jti: String,
    /// When the message was bound (seconds since the epoch).
    pub iat: i64,
}

/// Whether a `ztauth-ctx-bind` value is structurally a message binding (a
/// compact JWS whose header says `alg: HS256`, `typ: ctx-bind+jwt`; the MAC
/// is not checked). The credential scan and the dead letter treat anything
/// else in that header as they would in any other header.
pub fn looks_like_binding(value: &[u8]) -> bool {
    std::str::from_utf8(value).is_ok_and(|v| BindingParts::split(v.trim()).is_ok())
}

/// A binding's three segments, its header checked: the one structural rule
/// the scan, the dead letter, the verifier and the operator CLI share.
pub struct BindingParts<'a> {
    /// `header.claims`, what the MAC covers.
    pub signing_input: &'a str,
    /// The base64url claims segment.
    pub claims: &'a str,
    /// The base64url MAC segment.
    pub mac: &'a str,
}

impl<'a> BindingParts<'a> {
    /// Splits `binding` and checks its size and header.
    ///
    /// # Errors
    ///
    /// [`BindingError::Malformed`] if it is longer than [`MAX_BINDING_LEN`],
    /// not three segments, or its header is not exactly `alg: HS256`,
    /// `typ: ctx-bind+jwt`.
    pub fn split(binding: &'a str) -> Result<Self, BindingError> {
        let malformed = |why: &str| BindingError::Malformed(why.to_string());
        if binding.len() > MAX_BINDING_LEN {
            return Err(malformed("longer than the limit"));
        }
        let mut parts = binding.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three dot-separated segments"));
        };
        // Producers write exactly BINDING_HEADER_JSON (compared without
        // decoding); another serialization of the same two members is
        // accepted, anything more or less is not.
        if h != URL_SAFE_NO_PAD.encode(BINDING_HEADER_JSON) {
            let header = URL_SAFE_NO_PAD
                .decode(h)
                .map_err(|_| malformed("header is not base64url"))?;
            let header: serde_json::Value =
                serde_json::from_slice(&header).map_err(|_| malformed("header is not JSON"))?;
            let expected: serde_json::Value = serde_json::from_str(BINDING_HEADER_JSON)
                .map_err(|_| malformed("internal: binding header"))?;
            if header != expected {
                return Err(malformed(&format!(
                    "header must be {BINDING_HEADER_JSON} (typ {CTX_BIND_TYP})"
                )));
            }
        }
        Ok(BindingParts {
            signing_input: &binding[..h.len() + 1 + p.len()],
            claims: p,
            mac: s,
        })
    }

    /// The claims, decoded (not authenticated: check the MAC first to trust them).
    ///
    /// # Errors
    ///
    /// [`BindingError::Malformed`] if they are not base64url JSON binding claims.
    pub fn claims_unverified(&self) -> Result<BindingClaims, BindingError> {
        let payload = URL_SAFE_NO_PAD
            .decode(self.claims)
            .map_err(|_| BindingError::Malformed("claims are not base64url".into()))?;
        serde_json::from_slice(&payload)
            .map_err(|e| BindingError::Malformed(format!("claims: {e}")))
    }
}

/// The JWK a binding key travels as inside `cnf.jwe`.
#[derive(Serialize, Deserialize)]
struct BindingKeyJwk {
    kty: String,
    alg: String,
    k: String,
}

/// The protected header of every message binding.
const BINDING_HEADER_JSON: &str = r#"{"alg":"HS256","typ":"ctx-bind+jwt"}"#;

#[cfg(test)]
mod tests;
