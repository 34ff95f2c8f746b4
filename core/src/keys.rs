//! Workload signing keys and public key sets (JWK), ES256 and EdDSA only.
//!
//! One key type serves every signature Elevate makes: context references,
//! client assertions and Txn-Tokens. Keys are PKCS#8 (PEM on disk); public
//! halves are published as JWKs and looked up by `kid`.

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};

pub mod directory;

pub use directory::{JwksProblem, OWNER_MEMBER};

/// Signature algorithms Elevate accepts; nothing else (no `none`, no HS*, no RSA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SigningAlg {
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl SigningAlg {
    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::ES256 => "ES256",
            SigningAlg::EdDSA => "EdDSA",
        }
    }

    /// Parses a JOSE `alg` value; anything outside the allow-list is `None`.
    pub fn parse(alg: &str) -> Option<Self> {
        match alg {
            "ES256" => Some(SigningAlg::ES256),
            "EdDSA" => Some(SigningAlg::EdDSA),
            _ => None,
        }
    }

    /// The jsonwebtoken algorithm for this allow-listed alg.
    pub fn jwt_alg(self) -> Algorithm {
        match self {
            SigningAlg::ES256 => Algorithm::ES256,
            SigningAlg::EdDSA => Algorithm::EdDSA,
        }
    }
}

/// Errors while loading or generating keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The PEM or DER could not be parsed as a PKCS#8 key of the stated algorithm.
    #[error("invalid {alg:?} private key: {reason}")]
    InvalidPrivateKey {
        /// Algorithm the key was expected to be.
        alg: SigningAlg,
        /// What went wrong.
        reason: String,
    },
    /// A JWK could not be used as a verification key.
    #[error("invalid JWK (kid {kid:?}): {reason}")]
    InvalidJwk {
        /// The JWK's `kid`, if any.
        kid: Option<String>,
        /// What went wrong.
        reason: String,
    },
    /// A workload key directory (JWKS with owners) was refused as a whole.
    #[error("malformed workload JWKS: {0}")]
    MalformedJwks(JwksProblem),
    /// Key generation failed in the crypto library.
    #[error("key generation failed: {0}")]
    Generation(String),
    /// Reading a key file failed.
    #[error("cannot read key file {path}: {source}")]
    Io {
        /// The path read.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The signing key in force for one workload, shared by everything that
/// signs for it (the context-reference minter, the TTS client's assertions)
/// and swapped when the key rotates: whoever watches the key files calls
/// [`CurrentKey::set`], and the next signature uses the new key.
#[derive(Clone)]
pub struct CurrentKey(Arc<arc_swap::ArcSwap<SigningKey>>);

impl CurrentKey {
    /// Starts with `key`.
    pub fn new(key: SigningKey) -> Self {
        CurrentKey(Arc::new(arc_swap::ArcSwap::from_pointee(key)))
    }

    /// The key to sign with now.
    pub fn get(&self) -> Arc<SigningKey> {
        self.0.load_full()
    }

    /// Signs with `key` from now on (every clone of this handle sees it).
    pub fn set(&self, key: SigningKey) {
        self.0.store(Arc::new(key));
    }
}

impl std::fmt::Debug for CurrentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CurrentKey")
            .field(&self.0.load().kid)
            .finish()
    }
}

impl From<SigningKey> for CurrentKey {
    fn from(key: SigningKey) -> Self {
        CurrentKey::new(key)
    }
}

/// A private signing key with its `kid` and algorithm.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    alg: SigningAlg,
    encoding: EncodingKey,
    public_jwk: Jwk,
    pkcs8_der: Arc<Vec<u8>>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a fresh key pair (used by tests, the demo and key rotation).
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::Generation`] if the system random source fails, and
    /// [`KeyError::InvalidPrivateKey`] if the generated key cannot be loaded back.
    pub fn generate(alg: SigningAlg, kid: impl Into<String>) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let der = match alg {
            SigningAlg::ES256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|e| KeyError::Generation(e.to_string()))?
                    .as_ref()
                    .to_vec()
            }
            SigningAlg::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|e| KeyError::Generation(e.to_string()))?
                .as_ref()
                .to_vec(),
        };
        Self::from_pkcs8_der(alg, kid, &der)
    }

    /// Loads a PKCS#8 DER private key.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidPrivateKey`] if `der` is not a PKCS#8 key of algorithm `alg` (or,
    /// for ES256, its public point is not an uncompressed P-256 point).
    pub fn from_pkcs8_der(
        alg: SigningAlg,
        kid: impl Into<String>,
        der: &[u8],
    ) -> Result<Self, KeyError> {
        let kid = kid.into();
        let invalid = |reason: String| KeyError::InvalidPrivateKey { alg, reason };
        let (encoding, public_jwk) = match alg {
            SigningAlg::ES256 => {
                let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .map_err(|e| invalid(e.to_string()))?;
                let point = pair.public_key().as_ref();
                if point.len() != 65 || point[0] != 4 {
                    return Err(invalid("unexpected P-256 public point encoding".into()));
                }
                let jwk = serde_json::json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                });
                (EncodingKey::from_ec_der(der), jwk)
            }
            SigningAlg::EdDSA => {
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                    .map_err(|e| invalid(e.to_string()))?;
                let jwk = serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
                    "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
                });
                (EncodingKey::from_ed_der(der), jwk)
            }
        };
        let public_jwk: Jwk =
            serde_json::from_value(public_jwk).map_err(|e| invalid(e.to_string()))?;
        Ok(SigningKey {
            kid,
            alg,
            encoding,
            public_jwk,
            pkcs8_der: Arc::new(der.to_vec()),
        })
    }

    /// Loads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidPrivateKey`] if the PEM body is not base64 or does not hold a
    /// PKCS#8 key of algorithm `alg`.
    pub fn from_pkcs8_pem(
        alg: SigningAlg,
        kid: impl Into<String>,
        pem: &str,
    ) -> Result<Self, KeyError> {
        let body: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect();
        let der = STANDARD
            .decode(body.as_bytes())
            .map_err(|e| KeyError::InvalidPrivateKey {
                alg,
                reason: format!("PEM body is not base64: {e}"),
            })?;
        Self::from_pkcs8_der(alg, kid, &der)
    }

    /// Reads a PKCS#8 PEM private key from a file.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::Io`] if the file cannot be read, and [`KeyError::InvalidPrivateKey`] if
    /// it does not hold a PKCS#8 PEM key of algorithm `alg`.
    pub fn from_pem_file(
        alg: SigningAlg,
        kid: impl Into<String>,
        path: &std::path::Path,
    ) -> Result<Self, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pkcs8_pem(alg, kid, &pem)
    }

    /// The key as PKCS#8 PEM, for writing key files.
    pub fn to_pkcs8_pem(&self) -> String {
        let b64 = STANDARD.encode(self.pkcs8_der.as_slice());
        let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END PRIVATE KEY-----\n");
        out
    }

    /// The key id carried in every JWS header this key signs.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The signature algorithm.
    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    /// The jsonwebtoken encoding key.
    pub fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }

    /// The public half as a JWK (with `kid`, `alg` and `use: sig`).
    pub fn public_jwk(&self) -> &Jwk {
        &self.public_jwk
    }
}

/// A verification key resolved from a JWK.
#[derive(Clone)]
pub struct VerifyingKey {
    /// The allow-listed algorithm this key verifies.
    pub alg: SigningAlg,
    /// The jsonwebtoken decoding key.
    pub key: DecodingKey,
    /// The workload that owns this key, when known: a token signed with it
    /// must name this workload as its issuer.
    pub owner: Option<String>,
}

/// Public keys by `kid`, each pinned to one algorithm.
///
/// Pinning the algorithm to the key (from the JWK's `kty`/`crv`) is what
/// stops algorithm confusion: a token's `alg` must equal the key's.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, VerifyingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.keys.keys()).finish()
    }
}

impl KeySet {
    /// An empty key set (verifies nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a public JWK; it must carry a `kid` and be EC P-256 or OKP Ed25519.
    ///
    /// # Errors
    ///
    /// The same as [`insert_jwk_owned`](Self::insert_jwk_owned).
    pub fn insert_jwk(&mut self, jwk: &Jwk) -> Result<(), KeyError> {
        self.insert_jwk_owned(jwk, None)
    }

    /// Adds a public JWK owned by a workload: tokens it signs must have `iss` = `owner`.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if the JWK has no `kid`, carries private key material
    /// (`d`), is not EC P-256 or OKP Ed25519, declares an `alg` that does not match its key type,
    /// or cannot be decoded as a verifying key.
    pub fn insert_jwk_owned(&mut self, jwk: &Jwk, owner: Option<String>) -> Result<(), KeyError> {
        let value = serde_json::to_value(jwk).map_err(|e| KeyError::InvalidJwk {
            kid: jwk.common.key_id.clone(),
            reason: e.to_string(),
        })?;
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| KeyError::InvalidJwk {
                kid: None,
                reason: "missing kid".into(),
            })?;
        let invalid = |reason: &str| KeyError::InvalidJwk {
            kid: Some(kid.clone()),
            reason: reason.to_string(),
        };
        if value.get("d").is_some() {
            return Err(invalid("private key material in a public key set"));
        }
        let alg = match (
            value.get("kty").and_then(|v| v.as_str()),
            value.get("crv").and_then(|v| v.as_str()),
        ) {
            (Some("EC"), Some("P-256")) => SigningAlg::ES256,
            (Some("OKP"), Some("Ed25519")) => SigningAlg::EdDSA,
            _ => {
                return Err(invalid(
                    "only EC P-256 (ES256) and OKP Ed25519 (EdDSA) keys are allowed",
                ));
            }
        };
        if let Some(declared) = value.get("alg").and_then(|v| v.as_str())
            && SigningAlg::parse(declared) != Some(alg)
        {
            return Err(invalid("JWK alg does not match its key type"));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(&e.to_string()))?;
        self.keys.insert(kid, VerifyingKey { alg, key, owner });
        Ok(())
    }

    /// Builds a key set from a JWKS document.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] for the first key in the set that
    /// [`insert_jwk`](Self::insert_jwk) rejects.
    pub fn from_jwks(set: &JwkSet) -> Result<Self, KeyError> {
        let mut ks = KeySet::new();
        for jwk in &set.keys {
            ks.insert_jwk(jwk)?;
        }
        Ok(ks)
    }

    /// Adds the public half of a signing key.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if the key's public JWK is rejected (see
    /// [`insert_jwk`](Self::insert_jwk)).
    pub fn insert_signing_key(&mut self, key: &SigningKey) -> Result<(), KeyError> {
        self.insert_jwk(key.public_jwk())
    }

    /// Adds the public half of a workload's signing key, bound to that workload id.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if the key's public JWK is rejected (see
    /// [`insert_jwk_owned`](Self::insert_jwk_owned)).
    pub fn insert_workload_key(
        &mut self,
        workload: &str,
        key: &SigningKey,
    ) -> Result<(), KeyError> {
        self.insert_jwk_owned(key.public_jwk(), Some(workload.to_string()))
    }

    /// The key ids in the set.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Removes a key (used when a workload is revoked).
    pub fn remove(&mut self, kid: &str) -> bool {
        self.keys.remove(kid).is_some()
    }

    /// Looks up a key by `kid`.
    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is present.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// SHA-256 of bytes as lowercase hex: how Elevate names a token in logs.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

/// SHA-256 of bytes as base64url without padding: the `dig` claim encoding.
pub fn sha256_b64url(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    URL_SAFE_NO_PAD.encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_roundtrip_and_jwk() {
        for alg in [SigningAlg::ES256, SigningAlg::EdDSA] {
            let k = SigningKey::generate(alg, "k1").unwrap();
            let pem = k.to_pkcs8_pem();
            let k2 = SigningKey::from_pkcs8_pem(alg, "k1", &pem).unwrap();
            assert_eq!(
                serde_json::to_value(k.public_jwk()).unwrap(),
                serde_json::to_value(k2.public_jwk()).unwrap()
            );
            let mut ks = KeySet::new();
            ks.insert_signing_key(&k).unwrap();
            assert_eq!(ks.get("k1").unwrap().alg, alg);
        }
    }

    #[test]
    fn rejects_wrong_algorithm_pem() {
        let k = SigningKey::generate(SigningAlg::EdDSA, "k").unwrap();
        assert!(SigningKey::from_pkcs8_pem(SigningAlg::ES256, "k", &k.to_pkcs8_pem()).is_err());
    }
}
