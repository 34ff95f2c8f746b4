//! The consumer side: a context reference is verified and its binding key
//! unwrapped once (cached by the reference's SHA-256); each message's
//! binding is then checked with one MAC.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::keys::{CONTENT_ENC, KEY_WRAP_ALG, KeyAgreementKey};
use super::{BindingClaims, BindingKeyJwk, BindingParts};
use crate::ctxref::{ContextRefClaims, VerifiedRef};
use crate::keys::{KeySet, sha256_b64url, sha256_hex};

/// The most opened contexts a consumer keeps (least recently used go first).
const MAX_OPENED: u64 = 10_000;
/// An opened context unused for this long is forgotten.
const OPENED_IDLE: Duration = Duration::from_secs(600);

/// Why a message binding (or its absence) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    /// A context reference (`cnf`) arrived without a `ztauth-ctx-bind`
    /// header, or a binding with a reference that is not a context reference.
    #[error("{0}")]
    Missing(&'static str),
    /// The binding is not a compact `ctx-bind+jwt` JWS with `alg: HS256` and its claims.
    #[error("malformed binding: {0}")]
    Malformed(String),
    /// The MAC does not verify under the context's key.
    #[error("binding MAC does not verify under the context's key")]
    BadMac,
    /// The binding names another context reference (`ref`).
    #[error("binding is for another context reference")]
    OtherReference,
    /// The binding's `iat` is outside its context's lifetime (plus leeway) or in the future.
    #[error("bound at {iat}, outside the context ({from}..{until}) or after now")]
    OutsideContext {
        /// The binding's `iat`.
        iat: i64,
        /// The context's `iat`.
        from: i64,
        /// The context's `exp`.
        until: i64,
    },
    /// The context's binding key cannot be unwrapped with this consumer's
    /// key-agreement keys (wrapped for another key or audience, no key configured, bad JWE).
    #[error("binding key cannot be unwrapped: {0}")]
    KeyUnavailable(String),
}

/// A context reference verified and its binding key unwrapped.
pub(crate) struct Opened {
    claims: ContextRefClaims,
    key: hmac::Key,
    ref_hash: String,
    token_sha256: String,
    /// The trusted key set it was verified against (held, so that its
    /// address cannot be reused): a context opened under another set is
    /// verified again.
    key_set: Arc<KeySet>,
}

/// A consumer's key-agreement keys and the contexts it has opened.
#[derive(Clone)]
pub struct ContextOpener {
    keys: Arc<HashMap<String, KeyAgreementKey>>,
    opened: moka::sync::Cache<[u8; 32], Arc<Opened>>,
}

impl std::fmt::Debug for ContextOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextOpener")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("opened", &self.opened.entry_count())
            .finish()
    }
}

impl ContextOpener {
    /// An opener unwrapping with any of `keys` (the current one and, while a
    /// rotation settles, the previous ones), chosen by the JWE's `kid`.
    pub fn new(keys: impl IntoIterator<Item = KeyAgreementKey>) -> Self {
        ContextOpener {
            keys: Arc::new(keys.into_iter().map(|k| (k.kid().to_string(), k)).collect()),
            opened: moka::sync::Cache::builder()
                .max_capacity(MAX_OPENED)
                .time_to_idle(OPENED_IDLE)
                .build(),
        }
    }

    /// The opened context for `token`, if one is cached for this key set.
    pub(crate) fn cached(&self, token: &str, key_set: &Arc<KeySet>) -> Option<Arc<Opened>> {
        let id = context_id(token);
        let o = self.opened.get(&id)?;
        if Arc::ptr_eq(&o.key_set, key_set) {
            Some(o)
        } else {
            self.opened.invalidate(&id);
            None
        }
    }

    /// Unwraps the binding key of a context reference that `claims` verified,
    /// and caches the result.
    pub(crate) fn open(
        &self,
        token: &str,
        claims: ContextRefClaims,
        key_set: &Arc<KeySet>,
    ) -> Result<Arc<Opened>, BindingError> {
        let unavailable = |why: String| BindingError::KeyUnavailable(why);
        let cnf = claims.cnf.as_ref().ok_or(BindingError::Missing(
            "a binding came with a per-message reference",
        ))?;
        let kid = josekit::jwe::JweHeader::from_bytes(&jwe_header(&cnf.jwe)?)
            .map_err(|e| unavailable(format!("JWE header: {e}")))
            .and_then(|h| {
                let alg_ok = h.algorithm() == Some(KEY_WRAP_ALG);
                let enc_ok = h.content_encryption() == Some(CONTENT_ENC);
                if !alg_ok || !enc_ok {
                    return Err(unavailable(format!(
                        "JWE alg {:?} / enc {:?}: only {KEY_WRAP_ALG} / {CONTENT_ENC}",
                        h.algorithm(),
                        h.content_encryption()
                    )));
                }
                h.key_id()
                    .map(str::to_string)
                    .ok_or_else(|| unavailable("JWE names no kid".into()))
            })?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| unavailable(format!("no key-agreement key {kid:?} here")))?;
        let (plain, _) = josekit::jwe::deserialize_compact(&cnf.jwe, key.decrypter())
            .map_err(|e| unavailable(format!("JWE does not decrypt: {e}")))?;
        let jwk: BindingKeyJwk = serde_json::from_slice(&plain)
            .map_err(|e| unavailable(format!("not a binding key JWK: {e}")))?;
        let secret = URL_SAFE_NO_PAD
            .decode(jwk.k.as_bytes())
            .map_err(|e| unavailable(format!("k: {e}")))?;
        if jwk.kty != "oct" || jwk.alg != "HS256" || secret.len() < 32 {
            return Err(unavailable(
                "the binding key must be an oct HS256 key of at least 256 bits".into(),
            ));
        }
        let opened = Arc::new(Opened {
            claims,
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            ref_hash: sha256_b64url(token.as_bytes()),
            token_sha256: sha256_hex(token.as_bytes()),
            key_set: key_set.clone(),
        });
        self.opened.insert(context_id(token), opened.clone());
        Ok(opened)
    }
}

impl Opened {
    /// The context's verified claims.
    pub(crate) fn claims(&self) -> &ContextRefClaims {
        &self.claims
    }

    /// Checks one message's binding: format, MAC, context, then returns the
    /// message's view of the reference. Destination and digest are left to the caller.
    pub(crate) fn bind(
        &self,
        token: &str,
        binding: &str,
        now: i64,
        leeway: i64,
    ) -> Result<VerifiedRef, BindingError> {
        let claims = read_binding(&self.key, binding)?;
        if claims.reference != self.ref_hash {
            return Err(BindingError::OtherReference);
        }
        let c = &self.claims;
        let within = claims.iat >= c.iat.saturating_sub(leeway)
            && claims.iat <= c.exp
            && claims.iat <= now.saturating_add(leeway);
        if !within {
            return Err(BindingError::OutsideContext {
                iat: claims.iat,
                from: c.iat,
                until: c.exp,
            });
        }
        if claims.jti.is_empty() || claims.jti.len() > 128 {
            return Err(BindingError::Malformed("jti must be 1 to 128 bytes".into()));
        }
        let mut view = c.clone();
        view.jti = claims.jti;
        view.iat = claims.iat;
        view.dst = claims.dst;
        view.dig = claims.dig;
        Ok(VerifiedRef {
            claims: view,
            token: token.to_string(),
            token_sha256: self.token_sha256.clone(),
        })
    }
}

fn context_id(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// The decoded protected header of a compact JWE (5 segments).
fn jwe_header(jwe: &str) -> Result<Vec<u8>, BindingError> {
    let unavailable = |why: &str| BindingError::KeyUnavailable(why.to_string());
    if jwe.split('.').count() != 5 {
        return Err(unavailable("cnf.jwe is not a compact JWE"));
    }
    let head = jwe.split('.').next().unwrap_or_default();
    URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| unavailable("JWE header is not base64url"))
}

/// Parses and MAC-checks a binding; the header must be the one producers
/// write (`alg: HS256`, `typ: ctx-bind+jwt`, nothing else).
fn read_binding(key: &hmac::Key, binding: &str) -> Result<BindingClaims, BindingError> {
    let parts = BindingParts::split(binding)?;
    let tag = URL_SAFE_NO_PAD
        .decode(parts.mac)
        .map_err(|_| BindingError::Malformed("MAC is not base64url".into()))?;
    hmac::verify(key, parts.signing_input.as_bytes(), &tag).map_err(|_| BindingError::BadMac)?;
    parts.claims_unverified()
}
