//! Compact JWS parse → verify, split by protocol step, shared by every signed
//! object Elevate handles (context references, Txn-Tokens, client assertions).
//!
//! The header is parsed by hand first so that `alg: none`, HS* and unknown
//! algorithms are rejected as such (a distinct error) before any key is used.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::keys::{KeySet, SigningAlg, SigningKey, VerifyingKey};

/// Upper bound on a compact JWS we are willing to parse (bytes).
pub const MAX_JWS_LEN: usize = 16 * 1024;

/// Why a compact JWS was rejected before its claims were looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwsError {
    /// Not three base64url segments with a JSON header and payload.
    #[error("malformed JWS: {0}")]
    Malformed(String),
    /// `alg` outside ES256/EdDSA, or not the algorithm of the key named by `kid`.
    #[error("algorithm {0:?} is not allowed")]
    AlgorithmNotAllowed(String),
    /// No `kid` header.
    #[error("JWS header has no kid")]
    MissingKid,
    /// `kid` not in the key set.
    #[error("unknown kid {0:?}")]
    UnknownKey(String),
    /// Signature does not verify under the key.
    #[error("signature does not verify")]
    BadSignature,
    /// `typ` header is not the expected one.
    #[error("typ {found:?} where {expected:?} is required")]
    WrongType {
        /// The required `typ`.
        expected: &'static str,
        /// What the header carried.
        found: Option<String>,
    },
}

/// The protected header fields Elevate reads.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct JwsHeader {
    /// Algorithm (checked against the allow-list).
    pub alg: String,
    /// Media type of the object.
    pub typ: Option<String>,
    /// Key id.
    pub kid: Option<String>,
    /// Critical header names: any present means we must reject (we understand none).
    pub crit: Option<Vec<String>>,
}

/// A parsed, not yet verified compact JWS.
#[derive(Debug)]
pub struct ParsedJws<'a> {
    /// The decoded protected header.
    pub header: JwsHeader,
    /// The allow-listed algorithm from the header.
    pub alg: SigningAlg,
    /// Decoded payload bytes.
    pub payload: Vec<u8>,
    signing_input: &'a str,
    signature: &'a str,
}

/// Step 1: parse a compact JWS, check the algorithm allow-list and `typ`.
///
/// # Errors
///
/// Returns [`JwsError::Malformed`] if the token is longer than the size limit, is not three
/// base64url segments, has a header that is not JSON or carries a `crit` header;
/// [`JwsError::AlgorithmNotAllowed`] if `alg` is not ES256 or EdDSA; [`JwsError::WrongType`] if
/// `typ` is not `expected_typ`; and [`JwsError::BadSignature`] if the signature segment is empty.
pub fn parse<'a>(token: &'a str, expected_typ: &'static str) -> Result<ParsedJws<'a>, JwsError> {
    if token.len() > MAX_JWS_LEN {
        return Err(JwsError::Malformed(format!(
            "longer than {MAX_JWS_LEN} bytes"
        )));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwsError::Malformed(
            "not three dot-separated segments".into(),
        ));
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|e| JwsError::Malformed(format!("header is not base64url: {e}")))?;
    let header: JwsHeader = serde_json::from_slice(&header_bytes)
        .map_err(|e| JwsError::Malformed(format!("header is not a JSON object with alg: {e}")))?;
    let alg = SigningAlg::parse(&header.alg)
        .ok_or_else(|| JwsError::AlgorithmNotAllowed(header.alg.clone()))?;
    if header.crit.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(JwsError::Malformed("unsupported crit header".into()));
    }
    if !typ_matches(header.typ.as_deref(), expected_typ) {
        return Err(JwsError::WrongType {
            expected: expected_typ,
            found: header.typ.clone(),
        });
    }
    let payload = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|e| JwsError::Malformed(format!("payload is not base64url: {e}")))?;
    if s.is_empty() {
        return Err(JwsError::BadSignature);
    }
    let signing_input = &token[..h.len() + 1 + p.len()];
    Ok(ParsedJws {
        header,
        alg,
        payload,
        signing_input,
        signature: s,
    })
}

/// `typ` comparison per RFC 7515 §4.1.9: case-insensitive, `application/` prefix optional.
fn typ_matches(found: Option<&str>, expected: &str) -> bool {
    let Some(found) = found else { return false };
    let found = found
        .strip_prefix("application/")
        .or_else(|| found.strip_prefix("APPLICATION/"))
        .unwrap_or(found);
    found.eq_ignore_ascii_case(expected)
}

impl ParsedJws<'_> {
    /// Step 2: resolve the key by `kid` and verify the signature with the key's pinned algorithm.
    ///
    /// # Errors
    ///
    /// Returns [`JwsError::MissingKid`] if the header has no `kid`, [`JwsError::UnknownKey`] if
    /// `keys` has no key with that `kid`, [`JwsError::AlgorithmNotAllowed`] if the header's `alg`
    /// is not the key's pinned algorithm, and [`JwsError::BadSignature`] if the signature does not
    /// verify.
    pub fn verify<'k>(&self, keys: &'k KeySet) -> Result<&'k VerifyingKey, JwsError> {
        let kid = self.header.kid.as_deref().ok_or(JwsError::MissingKid)?;
        let key = keys
            .get(kid)
            .ok_or_else(|| JwsError::UnknownKey(kid.to_string()))?;
        if key.alg != self.alg {
            return Err(JwsError::AlgorithmNotAllowed(self.header.alg.clone()));
        }
        match jsonwebtoken::crypto::verify(
            self.signature,
            self.signing_input.as_bytes(),
            &key.key,
            key.alg.jwt_alg(),
        ) {
            Ok(true) => Ok(key),
            _ => Err(JwsError::BadSignature),
        }
    }

    /// Step 3: decode the payload as claims of type `T`.
    ///
    /// # Errors
    ///
    /// Returns [`JwsError::Malformed`] if the payload is not JSON that deserializes as `T`.
    pub fn claims<T: DeserializeOwned>(&self) -> Result<T, JwsError> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| JwsError::Malformed(format!("claims: {e}")))
    }
}

/// Signs `claims` as a compact JWS with `typ` and the key's `kid`.
///
/// # Errors
///
/// Returns [`JwsError::Malformed`] if `claims` cannot be serialized or the key cannot sign.
pub fn sign<T: Serialize>(key: &SigningKey, typ: &str, claims: &T) -> Result<String, JwsError> {
    sign_with(key.encoding_key(), key.alg(), Some(key.kid()), typ, claims)
}

/// Signs with an explicit key, algorithm and optional `kid` (tests use it to forge).
///
/// # Errors
///
/// Returns [`JwsError::Malformed`] if `claims` cannot be serialized or `key` cannot sign with
/// `alg`.
pub fn sign_with<T: Serialize>(
    key: &EncodingKey,
    alg: SigningAlg,
    kid: Option<&str>,
    typ: &str,
    claims: &T,
) -> Result<String, JwsError> {
    let mut header = Header::new(alg.jwt_alg());
    header.typ = Some(typ.to_string());
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).map_err(|e| JwsError::Malformed(e.to_string()))
}

/// True when `value` looks like a compact JWS/JWT: three base64url segments
/// whose first decodes to a JSON object with an `alg` member.
pub fn looks_like_jwt(value: &str) -> bool {
    let v = value.trim();
    // No upper bound: a long token is still a token (the scan fails closed).
    if v.len() < 16 {
        return false;
    }
    let mut parts = v.split('.');
    let (Some(h), Some(_), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    // JWE (5 parts) also counts as a token.
    if parts.clone().count() > 2 {
        return false;
    }
    let alphabet_ok = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' || b == b'=');
    if !alphabet_ok {
        return false;
    }
    let Ok(hb) = URL_SAFE_NO_PAD.decode(h.trim_end_matches('=')) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&hb)
        .ok()
        .and_then(|v| v.get("alg").cloned())
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_detection() {
        let k = SigningKey::generate(SigningAlg::ES256, "k").unwrap();
        let t = sign(&k, "JWT", &serde_json::json!({"sub":"x"})).unwrap();
        assert!(looks_like_jwt(&t));
        assert!(!looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt("hello world this is text"));
        assert!(!looks_like_jwt("1.2.3-alpha.4"));
    }

    #[test]
    fn typ_rules() {
        assert!(typ_matches(Some("application/ctx-ref+jwt"), "ctx-ref+jwt"));
        assert!(typ_matches(Some("CTX-REF+JWT"), "ctx-ref+jwt"));
        assert!(!typ_matches(Some("JWT"), "ctx-ref+jwt"));
        assert!(!typ_matches(None, "ctx-ref+jwt"));
    }
}
