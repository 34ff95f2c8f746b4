//! Verification of a user's OAuth access token presented as `subject_token`
//! in the entry flow: a JWT from one configured issuer, checked against that
//! issuer's JWKS, `iss`, `aud` and time window.

use std::path::Path;
use std::time::Duration;

use elevate_core::ctxref::unix_now;
use elevate_core::jws::{self, JwsError};
use elevate_core::keys::KeySet;
use elevate_core::scope::Scope;
use serde::Deserialize;

use super::config::{ConfigError, UserIssuerConfig, read_json, resolve};
use txn_token_client::verify::keyset_from_jwks_json;

/// The claims of a verified user access token that the TTS uses.
#[derive(Debug, Clone, Deserialize)]
pub struct UserClaims {
    /// The identity provider that issued the token (`iss`); must be the configured issuer.
    pub iss: String,
    /// The user.
    pub sub: String,
    /// The token's audiences (`aud`); one must be the configured audience.
    #[serde(deserialize_with = "elevate_core::token::one_or_many")]
    pub aud: Vec<String>,
    /// When the token expires (`exp`, seconds since the epoch); past it (plus leeway) it is refused.
    pub exp: i64,
    /// Issued at.
    #[serde(default)]
    pub iat: Option<i64>,
    /// Not before (RFC 7519 §4.1.5), when present.
    #[serde(default)]
    pub nbf: Option<i64>,
    /// Granted scope (space-delimited).
    #[serde(default)]
    pub scope: Option<String>,
}

impl UserClaims {
    /// The token's scope as a set.
    pub fn scope_set(&self) -> Scope {
        Scope::parse(self.scope.as_deref().unwrap_or_default())
    }
}

/// Why a user access token was rejected (all become `invalid_grant`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessTokenError {
    /// The JWS layer rejected it.
    #[error(transparent)]
    Jws(#[from] JwsError),
    /// Wrong `iss`.
    #[error("issuer {0:?} is not the configured user issuer")]
    WrongIssuer(String),
    /// `aud` does not include the configured audience.
    #[error("audience does not include {0:?}")]
    WrongAudience(String),
    /// Expired, issued in the future or not valid yet (`nbf`).
    #[error("access token outside its validity window")]
    Time,
    /// Empty `sub`.
    #[error("access token has no subject")]
    NoSubject,
}

/// Verifies access tokens of one issuer.
#[derive(Debug, Clone)]
pub struct AccessTokenVerifier {
    issuer: String,
    audience: String,
    keys: KeySet,
    leeway: i64,
}

impl AccessTokenVerifier {
    /// A verifier for `issuer`'s tokens addressed to `audience`, signed by `keys`.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>, keys: KeySet) -> Self {
        AccessTokenVerifier {
            issuer: issuer.into(),
            audience: audience.into(),
            keys,
            leeway: 30,
        }
    }

    /// Sets the clock leeway (capped at 30 s).
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway.min(Duration::from_secs(30)).as_secs() as i64;
        self
    }

    /// Builds from the `[user_issuer]` configuration section.
    ///
    /// # Errors
    ///
    /// Returns [`ConfigError::Invalid`] if the section has both or neither of `jwks` and
    /// `jwks_file`, [`ConfigError::Io`] or [`ConfigError::Parse`] if the file cannot be read or is
    /// not JSON, and [`ConfigError::Parse`] if the document has no `keys` array.
    pub fn from_config(cfg: &UserIssuerConfig, base: &Path) -> Result<Self, ConfigError> {
        let doc = match (&cfg.jwks, &cfg.jwks_file) {
            (Some(v), None) => v.clone(),
            (None, Some(p)) => read_json(&resolve(base, p))?,
            _ => {
                return Err(ConfigError::Invalid(
                    "user_issuer needs exactly one of jwks or jwks_file".into(),
                ));
            }
        };
        let keys = keyset_from_jwks_json(&doc).map_err(|reason| ConfigError::Parse {
            path: "user_issuer.jwks".into(),
            reason,
        })?;
        Ok(Self::new(&cfg.issuer, &cfg.audience, keys))
    }

    /// The configured issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies an access token (`typ` `at+jwt` per RFC 9068, or `JWT`).
    ///
    /// # Errors
    ///
    /// Returns [`AccessTokenError::Jws`] if the token is malformed, not `at+jwt` or `JWT`, signed
    /// by an unknown key or has a bad signature; [`AccessTokenError::WrongIssuer`] or
    /// [`AccessTokenError::WrongAudience`] if `iss` or `aud` is not this issuer's;
    /// [`AccessTokenError::Time`] if it is expired, issued in the future or not yet valid; and
    /// [`AccessTokenError::NoSubject`] if `sub` is empty.
    pub fn verify(&self, token: &str) -> Result<UserClaims, AccessTokenError> {
        let parsed = match jws::parse(token, "at+jwt") {
            Err(JwsError::WrongType { .. }) => jws::parse(token, "JWT")?,
            other => other?,
        };
        parsed.verify(&self.keys)?;
        let claims: UserClaims = parsed.claims()?;
        if claims.iss != self.issuer {
            return Err(AccessTokenError::WrongIssuer(claims.iss));
        }
        if !claims.aud.iter().any(|a| a == &self.audience) {
            return Err(AccessTokenError::WrongAudience(self.audience.clone()));
        }
        let now = unix_now();
        let future = |t: Option<i64>| t.is_some_and(|t| t > now.saturating_add(self.leeway));
        if claims.exp.saturating_add(self.leeway) <= now || future(claims.iat) || future(claims.nbf)
        {
            return Err(AccessTokenError::Time);
        }
        if claims.sub.is_empty() {
            return Err(AccessTokenError::NoSubject);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elevate_core::keys::{SigningAlg, SigningKey};

    fn token(key: &SigningKey, extra: serde_json::Value) -> String {
        let now = unix_now();
        let mut claims = serde_json::json!({
            "iss": "https://idp.test", "sub": "alice", "aud": "elevate",
            "iat": now, "exp": now + 60, "scope": "orders.read",
        });
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        jws::sign(key, "at+jwt", &claims).unwrap()
    }

    #[test]
    fn time_window_honours_nbf_and_does_not_overflow() {
        let key = SigningKey::generate(SigningAlg::ES256, "idp-1").unwrap();
        let mut ks = KeySet::new();
        ks.insert_signing_key(&key).unwrap();
        let v = AccessTokenVerifier::new("https://idp.test", "elevate", ks)
            .with_leeway(Duration::from_secs(600));
        let now = unix_now();
        assert!(v.verify(&token(&key, serde_json::json!({}))).is_ok());
        assert!(
            v.verify(&token(&key, serde_json::json!({"nbf": now - 5})))
                .is_ok()
        );
        for extra in [
            serde_json::json!({"nbf": now + 31}),
            serde_json::json!({"nbf": i64::MAX}),
            serde_json::json!({"iat": i64::MAX}),
            serde_json::json!({"exp": now - 31}),
        ] {
            assert_eq!(
                v.verify(&token(&key, extra.clone())).unwrap_err(),
                AccessTokenError::Time,
                "{extra}"
            );
        }
        // a far-future exp is not wrapped into the past
        assert!(
            v.verify(&token(&key, serde_json::json!({"exp": i64::MAX})))
                .is_ok()
        );
    }
}
