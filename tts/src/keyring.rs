//! The service's signing keys: one current key signs, the previous ones stay
//! published in the JWKS so tokens in flight keep verifying after a rotation.
//!
//! A retired key stays published while a token it signed can still be
//! accepted (the ring's *retention*: token lifetime plus verifier leeway),
//! however many rotations happen meanwhile; `keep_previous` only adds keys
//! kept beyond that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use elevate_core::keys::{KeyError, KeySet, SigningAlg, SigningKey};
use parking_lot::Mutex;

/// A key that no longer signs, and when it stopped.
#[derive(Debug, Clone)]
struct Retired {
    key: SigningKey,
    at: Instant,
}

#[derive(Debug)]
struct Ring {
    current: SigningKey,
    previous: Vec<Retired>,
    jwks: serde_json::Value,
    keyset: KeySet,
}

impl Ring {
    fn build(current: SigningKey, previous: Vec<Retired>) -> Result<Self, KeyError> {
        let mut keyset = KeySet::new();
        let mut jwks = Vec::with_capacity(previous.len() + 1);
        for k in std::iter::once(&current).chain(previous.iter().map(|r| &r.key)) {
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
    retention: Duration,
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

/// Generates a fresh ES256 service key with a unique `kid` (the default
/// algorithm; see [`generate_key_of`]).
///
/// # Errors
///
/// The errors of [`generate_key_of`].
pub fn generate_key() -> Result<SigningKey, KeyError> {
    generate_key_of(SigningAlg::ES256)
}

/// Generates a fresh service key of `alg` (`signing_alg` in the service
/// configuration) with a `kid` derived from its public key.
///
/// # Errors
///
/// Returns [`KeyError::Generation`] if the system random source fails, or
/// [`KeyError::InvalidPrivateKey`] if the generated key cannot be reloaded under its `kid`.
pub fn generate_key_of(alg: SigningAlg) -> Result<SigningKey, KeyError> {
    let tmp = SigningKey::generate(alg, "pending")?;
    let kid = derived_kid(&tmp);
    SigningKey::from_pkcs8_pem(alg, kid, &tmp.to_pkcs8_pem())
}

/// Loads a service key from PKCS#8 PEM whatever its algorithm (ES256 or
/// EdDSA: the PKCS#8 algorithm identifier says which), e.g. a key record of
/// the fleet's shared store, written by a replica that may sign with the
/// other algorithm during a migration.
///
/// # Errors
///
/// Returns [`KeyError::InvalidPrivateKey`] (for EdDSA, the last tried) if the
/// PEM holds a key of neither algorithm.
pub fn key_from_pem_any(kid: &str, pem: &str) -> Result<SigningKey, KeyError> {
    SigningKey::from_pkcs8_pem(SigningAlg::ES256, kid, pem)
        .or_else(|_| SigningKey::from_pkcs8_pem(SigningAlg::EdDSA, kid, pem))
}

impl KeyRing {
    /// A ring with `current` signing. After a rotation a retired key stays
    /// published for at least `retention` (give it the longest a token can be
    /// accepted: token lifetime plus verifier leeway), and the `keep_previous`
    /// most recently retired keys stay published even longer.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if the public half of `current` cannot be published in the
    /// key set.
    pub fn new(
        current: SigningKey,
        keep_previous: usize,
        retention: Duration,
    ) -> Result<Self, KeyError> {
        Ok(KeyRing {
            ring: ArcSwap::from_pointee(Ring::build(current, Vec::new())?),
            keep_previous,
            retention,
            write: Mutex::new(()),
        })
    }

    /// How long a retired key stays published at least.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The key that signs new tokens.
    pub fn current(&self) -> SigningKey {
        self.ring.load().current.clone()
    }

    /// The published JWKS document (current first, then previous keys, newest first).
    pub fn jwks(&self) -> serde_json::Value {
        self.ring.load().jwks.clone()
    }

    /// The published keys as a key set.
    pub fn keyset(&self) -> KeySet {
        self.ring.load().keyset.clone()
    }

    /// Makes `next` the signing key; the old one stays published (see
    /// [`KeyRing::new`] for how long). Returns the new `kid`.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if the published key set cannot be built with `next`; the
    /// current key then stays in use.
    pub fn rotate_to(&self, next: SigningKey) -> Result<String, KeyError> {
        self.rotate_to_at(next, Instant::now())
    }

    /// [`KeyRing::rotate_to`] at an explicit time (tests move the clock).
    fn rotate_to_at(&self, next: SigningKey, now: Instant) -> Result<String, KeyError> {
        let _w = self.write.lock();
        let old = self.ring.load_full();
        let retired = std::iter::once(Retired {
            key: old.current.clone(),
            at: now,
        })
        .chain(old.previous.iter().cloned());
        let previous: Vec<Retired> = retired
            .enumerate()
            .filter(|(i, r)| {
                *i < self.keep_previous || now.saturating_duration_since(r.at) < self.retention
            })
            .map(|(_, r)| r)
            .collect();
        let kid = next.kid().to_string();
        self.ring.store(Arc::new(Ring::build(next, previous)?));
        Ok(kid)
    }

    /// Makes `current` the signing key and `others` the other published keys
    /// (a fleet replica installing the shared key ring; the store decides
    /// which keys are retired). Returns false, changing nothing, when the
    /// ring already is exactly that.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if a key cannot be published.
    pub fn install(&self, current: SigningKey, others: Vec<SigningKey>) -> Result<bool, KeyError> {
        let _w = self.write.lock();
        let old = self.ring.load_full();
        let same = old.current.kid() == current.kid()
            && old.previous.len() == others.len()
            && old
                .previous
                .iter()
                .zip(&others)
                .all(|(a, b)| a.key.kid() == b.kid());
        if same {
            return Ok(false);
        }
        let now = Instant::now();
        let previous = others
            .into_iter()
            .map(|key| Retired { key, at: now })
            .collect();
        self.ring.store(Arc::new(Ring::build(current, previous)?));
        Ok(true)
    }

    /// The `kid`s published, current first.
    pub fn kids(&self) -> Vec<String> {
        let r = self.ring.load();
        std::iter::once(&r.current)
            .chain(r.previous.iter().map(|p| &p.key))
            .map(|k| k.kid().to_string())
            .collect()
    }

    /// Rotates to a freshly generated key of the current key's algorithm
    /// (the service's `signing_alg`).
    ///
    /// # Errors
    ///
    /// Returns a [`KeyError`] if no key can be generated (see [`generate_key_of`]) or the key set
    /// cannot be rebuilt with it.
    pub fn rotate(&self) -> Result<String, KeyError> {
        let alg = self.ring.load().current.alg();
        self.rotate_to(generate_key_of(alg)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kids(ring: &KeyRing) -> Vec<String> {
        ring.jwks()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn rotation_keeps_previous_beyond_the_retention() {
        // No retention: keep_previous alone decides, as before.
        let ring = KeyRing::new(generate_key().unwrap(), 1, Duration::ZERO).unwrap();
        let k0 = ring.current().kid().to_string();
        let k1 = ring.rotate().unwrap();
        assert_ne!(k0, k1);
        let ks = ring.keyset();
        assert!(ks.get(&k0).is_some() && ks.get(&k1).is_some());
        let k2 = ring.rotate().unwrap();
        let ks = ring.keyset();
        assert!(ks.get(&k0).is_none() && ks.get(&k1).is_some() && ks.get(&k2).is_some());
        assert_eq!(kids(&ring), vec![k2, k1]);
        let none = KeyRing::new(generate_key().unwrap(), 0, Duration::ZERO).unwrap();
        let k = none.rotate().unwrap();
        assert_eq!(kids(&none), vec![k]);
    }

    #[test]
    fn an_eddsa_ring_rotates_to_eddsa_and_publishes_okp_keys() {
        let ring = KeyRing::new(
            generate_key_of(SigningAlg::EdDSA).unwrap(),
            1,
            Duration::ZERO,
        )
        .unwrap();
        let k0 = ring.current().kid().to_string();
        let k1 = ring.rotate().unwrap();
        assert_eq!(ring.current().alg(), SigningAlg::EdDSA);
        for kid in [&k0, &k1] {
            assert_eq!(ring.keyset().get(kid).unwrap().alg, SigningAlg::EdDSA);
        }
        for k in ring.jwks()["keys"].as_array().unwrap() {
            assert_eq!(
                (k["kty"].as_str(), k["crv"].as_str()),
                (Some("OKP"), Some("Ed25519"))
            );
            assert_eq!(k["alg"], "EdDSA");
        }
        // kids derived from the public key: distinct keys, distinct kids
        assert_ne!(k0, k1);
        // PEM of either algorithm loads back as what it is
        for alg in [SigningAlg::ES256, SigningAlg::EdDSA] {
            let k = generate_key_of(alg).unwrap();
            assert_eq!(key_from_pem_any("k", &k.to_pkcs8_pem()).unwrap().alg(), alg);
        }
        assert!(
            key_from_pem_any(
                "k",
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            )
            .is_err()
        );
    }

    #[test]
    fn retired_keys_stay_for_the_retention_whatever_keep_previous_says() {
        let retention = Duration::from_secs(90);
        for keep in [0, 2] {
            let ring = KeyRing::new(generate_key().unwrap(), keep, retention).unwrap();
            let t0 = Instant::now();
            let k0 = ring.current().kid().to_string();
            let mut all = vec![k0];
            // three rotations within one retention: every key stays published
            for i in 0..3u64 {
                let k = ring
                    .rotate_to_at(generate_key().unwrap(), t0 + Duration::from_secs(i))
                    .unwrap();
                all.push(k);
            }
            let mut newest_first = all.clone();
            newest_first.reverse();
            assert_eq!(kids(&ring), newest_first, "keep_previous {keep}");
            // k0 retired at t0, k1 at t0+1, k2 at t0+2: at t0+91 the first two
            // are past the retention, k2 (89 s) and k3 (just retired) are not
            let k4 = ring
                .rotate_to_at(generate_key().unwrap(), t0 + Duration::from_secs(91))
                .unwrap();
            assert_eq!(
                kids(&ring),
                vec![k4.clone(), all[3].clone(), all[2].clone()],
                "keep_previous {keep}"
            );
            // long after: the key just retired, plus keep_previous beyond it
            let k5 = ring
                .rotate_to_at(generate_key().unwrap(), t0 + Duration::from_secs(500))
                .unwrap();
            let mut expected = vec![k5, k4];
            if keep == 2 {
                expected.push(all[3].clone());
            }
            assert_eq!(kids(&ring), expected, "keep_previous {keep}");
        }
    }
}
