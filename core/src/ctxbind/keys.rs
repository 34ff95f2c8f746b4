//! The key-agreement keys of the per-context binding: a consumer's private
//! P-256 key ([`KeyAgreementKey`], never used to sign) and, on the producer,
//! the public keys of the audiences it binds contexts for ([`AudienceKeys`]).
//!
//! JWE (RFC 7516/7518) comes from `josekit`: `ECDH-ES+A256KW` key
//! management, `A256GCM` content encryption. Nothing here is hand-written
//! cryptography.

use std::collections::HashMap;
use std::path::Path;

use josekit::jwe::ECDH_ES_A256KW;
use josekit::jwe::alg::ecdh_es::{EcdhEsJweDecrypter, EcdhEsJweEncrypter};
use josekit::jwk::Jwk;
use josekit::jwk::KeyPair;
use josekit::jwk::alg::ec::EcCurve;

use crate::keys::directory::OWNER_MEMBER;

/// The JWE `alg` the binding key is wrapped with.
pub const KEY_WRAP_ALG: &str = "ECDH-ES+A256KW";
/// The JWE `enc` of the wrapped binding key.
pub const CONTENT_ENC: &str = "A256GCM";

/// Why a key-agreement key could not be made, read or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgreementKeyError {
    /// The key material is not a P-256 key this algorithm can use.
    #[error("key-agreement key {kid:?}: {why}")]
    Invalid {
        /// The key's id (or where it came from).
        kid: String,
        /// What was wrong.
        why: String,
    },
    /// The key file could not be read.
    #[error("key-agreement key file {path}: {why}")]
    File {
        /// The file.
        path: String,
        /// What failed.
        why: String,
    },
}

/// A consumer's private key-agreement key (P-256, `ECDH-ES+A256KW`): the
/// key a producer wraps each context's binding key to. Kept apart from the
/// workload's signing key: one key, one use.
#[derive(Clone)]
pub struct KeyAgreementKey {
    kid: String,
    decrypter: EcdhEsJweDecrypter,
    public: Jwk,
    private_pem: Vec<u8>,
}

impl std::fmt::Debug for KeyAgreementKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAgreementKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl KeyAgreementKey {
    /// A fresh P-256 key named `kid`.
    ///
    /// # Errors
    ///
    /// [`AgreementKeyError::Invalid`] if OpenSSL cannot generate the key.
    pub fn generate(kid: impl Into<String>) -> Result<Self, AgreementKeyError> {
        let kid = kid.into();
        let invalid = |e: josekit::JoseError| AgreementKeyError::Invalid {
            kid: kid.clone(),
            why: e.to_string(),
        };
        let pair = ECDH_ES_A256KW
            .generate_ec_key_pair(EcCurve::P256)
            .map_err(invalid)?;
        Self::from_pem(kid.clone(), &pair.to_pem_private_key())
    }

    /// The key in PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), named `kid`.
    ///
    /// # Errors
    ///
    /// [`AgreementKeyError::Invalid`] if the PEM is not a P-256 private key.
    pub fn from_pem(kid: impl Into<String>, pem: &[u8]) -> Result<Self, AgreementKeyError> {
        let kid = kid.into();
        let invalid = |why: String| AgreementKeyError::Invalid {
            kid: kid.clone(),
            why,
        };
        let decrypter = ECDH_ES_A256KW
            .decrypter_from_pem(pem)
            .map_err(|e| invalid(e.to_string()))?;
        let pair = josekit::jwk::alg::ec::EcKeyPair::from_pem(pem, Some(EcCurve::P256))
            .map_err(|e| invalid(e.to_string()))?;
        let mut public = pair.to_jwk_public_key();
        public.set_key_id(kid.clone());
        public.set_key_use("enc");
        public.set_algorithm(KEY_WRAP_ALG);
        Ok(KeyAgreementKey {
            kid,
            decrypter,
            public,
            private_pem: pem.to_vec(),
        })
    }

    /// Reads a PKCS#8 PEM file; the key is named `kid`.
    ///
    /// # Errors
    ///
    /// [`AgreementKeyError::File`] if it cannot be read, [`AgreementKeyError::Invalid`] if it is
    /// not a P-256 private key.
    pub fn from_pem_file(kid: impl Into<String>, path: &Path) -> Result<Self, AgreementKeyError> {
        let pem = std::fs::read(path).map_err(|e| AgreementKeyError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Self::from_pem(kid, &pem)
    }

    /// The key id (`kid` of the public JWK and of the JWE header).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK (`use: enc`, `alg: ECDH-ES+A256KW`) producers wrap to.
    pub fn public_jwk(&self) -> &Jwk {
        &self.public
    }

    /// The private key as PKCS#8 PEM (to write a key file).
    pub fn to_pkcs8_pem(&self) -> &[u8] {
        &self.private_pem
    }

    pub(crate) fn decrypter(&self) -> &EcdhEsJweDecrypter {
        &self.decrypter
    }
}

/// One audience's public key-agreement key, ready to wrap to.
#[derive(Clone)]
pub(crate) struct AudienceKey {
    pub(crate) kid: String,
    pub(crate) encrypter: EcdhEsJweEncrypter,
}

/// The producer's view of its audiences' public key-agreement keys, by
/// workload id. An audience without a key gets per-message references.
#[derive(Clone, Default)]
pub struct AudienceKeys {
    keys: HashMap<String, AudienceKey>,
}

impl std::fmt::Debug for AudienceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.keys.keys()).finish()
    }
}

impl AudienceKeys {
    /// No audience keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `jwk` (a public P-256 JWK with a `kid`) as `workload`'s
    /// key-agreement key, replacing any before.
    ///
    /// # Errors
    ///
    /// [`AgreementKeyError::Invalid`] if the JWK has no `kid`, is not a P-256 EC key, says another
    /// `alg` or `use`, or carries private material.
    pub fn insert(
        &mut self,
        workload: impl Into<String>,
        jwk: &Jwk,
    ) -> Result<(), AgreementKeyError> {
        let kid = jwk.key_id().unwrap_or_default().to_string();
        let invalid = |why: String| AgreementKeyError::Invalid {
            kid: kid.clone(),
            why,
        };
        if kid.is_empty() {
            return Err(invalid("no kid".into()));
        }
        if jwk.parameter("d").is_some() {
            return Err(invalid(
                "a public key was expected; this JWK holds a private one".into(),
            ));
        }
        if jwk.algorithm().is_some_and(|a| a != KEY_WRAP_ALG) {
            return Err(invalid(format!(
                "alg {:?}: only {KEY_WRAP_ALG}",
                jwk.algorithm()
            )));
        }
        if jwk.key_use().is_some_and(|u| u != "enc") {
            return Err(invalid(format!("use {:?}: only \"enc\"", jwk.key_use())));
        }
        if jwk.curve() != Some("P-256") {
            return Err(invalid(format!("curve {:?}: only P-256", jwk.curve())));
        }
        let encrypter = ECDH_ES_A256KW
            .encrypter_from_jwk(jwk)
            .map_err(|e| invalid(e.to_string()))?;
        self.keys
            .insert(workload.into(), AudienceKey { kid, encrypter });
        Ok(())
    }

    /// Reads a JWKS document whose keys each name their workload in
    /// `elevate_owner`, as the workload key directory does
    /// (`{"keys": [{"kty": "EC", "crv": "P-256", "x": …, "y": …, "kid": …,
    /// "use": "enc", "alg": "ECDH-ES+A256KW", "elevate_owner": "spiffe://…"}]}`).
    ///
    /// # Errors
    ///
    /// [`AgreementKeyError::Invalid`] for a document that is not such a JWKS or any key that
    /// [`insert`](Self::insert) refuses: the set is taken whole or not at all.
    pub fn from_jwks_json(doc: &[u8]) -> Result<Self, AgreementKeyError> {
        let invalid = |why: String| AgreementKeyError::Invalid {
            kid: "<audience key set>".into(),
            why,
        };
        let set = josekit::jwk::JwkSet::from_bytes(doc).map_err(|e| invalid(e.to_string()))?;
        let mut keys = AudienceKeys::new();
        for jwk in set.keys() {
            let owner = jwk
                .parameter(OWNER_MEMBER)
                .and_then(|v| v.as_str())
                .filter(|o| !o.is_empty())
                .ok_or_else(|| {
                    invalid(format!(
                        "key {:?} names no workload in {OWNER_MEMBER}",
                        jwk.key_id()
                    ))
                })?;
            keys.insert(owner, jwk)?;
        }
        Ok(keys)
    }

    /// The key of `workload`, if it has one.
    pub(crate) fn get(&self, workload: &str) -> Option<&AudienceKey> {
        self.keys.get(workload)
    }

    /// How many audiences have a key.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No audience has a key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A JWKS document (`{"keys": […]}`) of consumers' public key-agreement
/// keys, each naming its workload in `elevate_owner`: what
/// [`AudienceKeys::from_jwks_json`] reads.
pub fn audience_jwks(entries: &[(&str, &KeyAgreementKey)]) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = entries
        .iter()
        .map(|(workload, key)| {
            let mut jwk = key.public_jwk().clone();
            // A JWK may carry members of its own (RFC 7517 §4).
            let _ = jwk.set_parameter(OWNER_MEMBER, Some(serde_json::Value::from(*workload)));
            serde_json::Value::Object(jwk.as_ref().clone())
        })
        .collect();
    serde_json::json!({ "keys": keys })
}
