//! A tiny in-process OAuth issuer of user access tokens ([`TestIssuer`]) for
//! the entry flow in the demo and tests: it signs RFC 9068-style access
//! tokens and hands the TTS what it needs to accept them, a verifier for the
//! in-process mode and the `[user_issuer]` section of a configuration file.

use std::time::Duration;

use elevate_core::ctxref::unix_now;
use elevate_core::jws::{self, JwsError};
use elevate_core::keys::{KeyError, KeySet, SigningAlg, SigningKey};

use crate::config::UserIssuerConfig;
use crate::user_issuer::AccessTokenVerifier;

/// A tiny in-process OAuth issuer of user access tokens (demo and tests only).
#[derive(Debug, Clone)]
pub struct TestIssuer {
    issuer: String,
    audience: String,
    key: SigningKey,
}

impl TestIssuer {
    /// An issuer `issuer` whose tokens are addressed to `audience`, with a fresh ES256 key.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::Generation`] if the ES256 key cannot be generated.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Result<Self, KeyError> {
        Ok(TestIssuer {
            issuer: issuer.into(),
            audience: audience.into(),
            key: SigningKey::generate(SigningAlg::ES256, "test-idp-1")?,
        })
    }

    /// An issuer signing with `key` (a key file an operator made), so that
    /// a TTS started separately can be given its public key beforehand.
    pub fn with_key(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        key: SigningKey,
    ) -> Self {
        TestIssuer {
            issuer: issuer.into(),
            audience: audience.into(),
            key,
        }
    }

    /// Issues an RFC 9068-style access token (`typ` `at+jwt`) for `sub` with `scope`.
    ///
    /// # Errors
    ///
    /// Returns [`JwsError::Malformed`] if the token cannot be signed.
    pub fn issue_access_token(
        &self,
        sub: &str,
        scope: &str,
        ttl: Duration,
    ) -> Result<String, JwsError> {
        let now = unix_now();
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": sub,
            "aud": self.audience,
            "iat": now,
            "exp": now + ttl.as_secs() as i64,
            "jti": uuid::Uuid::new_v4().to_string(),
            "client_id": "elevate-test-client",
            "scope": scope,
        });
        jws::sign(&self.key, "at+jwt", &claims)
    }

    /// The issuer id (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The audience its tokens carry.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The signing key (tests use it to forge variants).
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Its JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.key.public_jwk()] })
    }

    /// Its public keys.
    pub fn keyset(&self) -> KeySet {
        let mut ks = KeySet::new();
        // A freshly generated key always converts to a valid JWK.
        let _ = ks.insert_signing_key(&self.key);
        ks
    }

    /// A verifier for the TTS's in-process mode (`Issuer::set_user_issuer`).
    pub fn verifier(&self) -> AccessTokenVerifier {
        AccessTokenVerifier::new(&self.issuer, &self.audience, self.keyset())
    }

    /// The `[user_issuer]` section for a service configuration file.
    pub fn config(&self) -> UserIssuerConfig {
        UserIssuerConfig {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            jwks: Some(self.jwks()),
            jwks_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_issuer_tokens_verify() {
        let idp = TestIssuer::new("https://idp.test", "elevate").unwrap();
        let t = idp
            .issue_access_token("alice", "orders.read", Duration::from_secs(60))
            .unwrap();
        let c = idp.verifier().verify(&t).unwrap();
        assert_eq!(c.sub, "alice");
        let other = TestIssuer::new("https://idp.test", "other-aud").unwrap();
        let t2 = other
            .issue_access_token("bob", "x", Duration::from_secs(60))
            .unwrap();
        assert!(idp.verifier().verify(&t2).is_err());
    }
}
