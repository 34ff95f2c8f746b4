//! The service's signing keys: one current key signs, the previous ones stay
//! published in the JWKS so tokens in flight keep verifying after a rotation.

use std::sync::Arc;

use arc_swap::ArcSwap;
use elevate_core::keys::{KeyError, KeySet, SigningAlg, SigningKey};
use parking_lot::Mutex;

#[derive(Debug)]
struct Ring {
    current: SigningKey,
    previous: Vec<SigningKey>,
    jwks: serde_json::Value,
    keyset: KeySet,
}

impl Ring {
    fn build(current: SigningKey, previous: Vec<SigningKey>) -> Result<Self, KeyError> {
        let mut keyset = KeySet::new();
        let mut jwks = Vec::with_capacity(previous.len() + 1);
        for k in std::iter::once(&current).chain(previous.iter()) {
            keyset.insert_signing_key(k)?;
            jwks.push(
                serde_json::to_value(k.public_jwk()).map_err(|e| KeyError::InvalidJwk {
                    kid: Some(k.kid().to_string()),
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(Ring {
            current,
            previous,
            jwks: serde_json::json!({ "keys": jwks }),
            keyset,
        })
    }
}

/// Current and previous signing keys.
#[derive(Debug)]
pub struct KeyRing {
    ring: ArcSwap<Ring>,
    keep_previous: usize,
    write: Mutex<()>,
}

/// A `kid` derived from the public key (stable across restarts with the same key file).
pub fn derived_kid(key: &SigningKey) -> String {
    let jwk = serde_json::to_value(key.public_jwk()).unwrap_or_default();
    let material = format!(
        "{}{}{}",
        jwk.get("crv").and_then(|v| v.as_str()).unwrap_or_default(),
        jwk.get("x").and_then(|v| v.as_str()).unwrap_or_default(),
        jwk.get("y").and_then(|v| v.as_str()).unwrap_or_default()
    );
    format!(
        "tts-{}",
        &elevate_core::keys::sha256_hex(material.as_bytes())[..16]
    )
}

/// Generates a fresh ES256 service key with a unique `kid`.
pub fn generate_key() -> Result<SigningKey, KeyError> {
    let tmp = SigningKey::generate(SigningAlg::ES256, "pending")?;
    let kid = derived_kid(&tmp);
    SigningKey::from_pkcs8_pem(SigningAlg::ES256, kid, &tmp.to_pkcs8_pem())
}

impl KeyRing {
    /// A ring with `current` signing and up to `keep_previous` older keys published.
    pub fn new(current: SigningKey, keep_previous: usize) -> Result<Self, KeyError> {
        Ok(KeyRing {
            ring: ArcSwap::from_pointee(Ring::build(current, Vec::new())?),
            keep_previous,
            write: Mutex::new(()),
        })
    }

    /// The key that signs new tokens.
    pub fn current(&self) -> SigningKey {
        self.ring.load().current.clone()
    }

    /// The published JWKS document (current first, then previous keys).
    pub fn jwks(&self) -> serde_json::Value {
        self.ring.load().jwks.clone()
    }

    /// The published keys as a key set.
    pub fn keyset(&self) -> KeySet {
        self.ring.load().keyset.clone()
    }

    /// Makes `next` the signing key; the old one stays published. Returns the new `kid`.
    pub fn rotate_to(&self, next: SigningKey) -> Result<String, KeyError> {
        let _w = self.write.lock();
        let old = self.ring.load_full();
        let mut previous = Vec::with_capacity(self.keep_previous);
        if self.keep_previous > 0 {
            previous.push(old.current.clone());
            previous.extend(old.previous.iter().take(self.keep_previous - 1).cloned());
        }
        let kid = next.kid().to_string();
        self.ring.store(Arc::new(Ring::build(next, previous)?));
        Ok(kid)
    }

    /// Rotates to a freshly generated ES256 key.
    pub fn rotate(&self) -> Result<String, KeyError> {
        self.rotate_to(generate_key()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_previous() {
        let ring = KeyRing::new(generate_key().unwrap(), 1).unwrap();
        let k0 = ring.current().kid().to_string();
        let k1 = ring.rotate().unwrap();
        assert_ne!(k0, k1);
        let ks = ring.keyset();
        assert!(ks.get(&k0).is_some() && ks.get(&k1).is_some());
        let k2 = ring.rotate().unwrap();
        let ks = ring.keyset();
        assert!(ks.get(&k0).is_none() && ks.get(&k1).is_some() && ks.get(&k2).is_some());
        assert_eq!(ring.jwks()["keys"].as_array().unwrap().len(), 2);
        assert_eq!(ring.jwks()["keys"][0]["kid"], k2);
    }
}
