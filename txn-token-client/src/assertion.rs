//! RFC 7523 client authentication: the requesting workload signs a short JWT
//! (`iss` = `sub` = its workload id, `aud` = the token endpoint, fresh `jti`)
//! with its workload key; the service verifies it against its registry and
//! remembers each `jti` until the assertion expires.

use std::collections::HashMap;
use std::time::Duration;

use elevate_core::ctxref::{MAX_LEEWAY, unix_now};
use elevate_core::jws::{self, JwsError};
use elevate_core::keys::{KeySet, SigningKey};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// `typ` of client assertions this crate signs and accepts.
pub const ASSERTION_TYP: &str = "JWT";
/// Longest assertion lifetime the client signs (`exp - iat`).
pub const MAX_ASSERTION_TTL: Duration = Duration::from_secs(60);

/// Claims of a client assertion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    /// The workload id (the client).
    pub iss: String,
    /// The workload id again (RFC 7523 §3: `sub` = client id).
    pub sub: String,
    /// The token endpoint URL.
    #[serde(deserialize_with = "elevate_core::token::one_or_many")]
    pub aud: Vec<String>,
    /// Unique id, remembered by the service until `exp`.
    pub jti: String,
    /// Issued at.
    pub iat: i64,
    /// When the assertion expires (`exp`, seconds since the epoch); the service refuses it after.
    pub exp: i64,
    /// Not before (RFC 7523 §3 item 6), when present: the assertion is refused
    /// until then, with the same leeway as `iat`. [`sign_assertion`] sets none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

impl AssertionClaims {
    /// The time window (RFC 7523 §3 items 4–6): `iat` positive and not after
    /// `exp`, not expired, not issued in the future, not before `nbf`, each
    /// with `leeway` (capped at 30 s), and `exp - iat` at most `max_lifetime`.
    /// The TTS's admin assertions (`elevate_tts::admin::AdminClaims`) carry
    /// these claims and pass the same check.
    ///
    /// # Errors
    ///
    /// Returns [`AssertionError::Time`] saying which bound is broken.
    pub fn check_time_window(
        &self,
        now: i64,
        leeway: Duration,
        max_lifetime: Duration,
    ) -> Result<(), AssertionError> {
        let leeway = leeway.min(MAX_LEEWAY).as_secs() as i64;
        if self.iat <= 0 || self.exp < self.iat {
            return Err(AssertionError::Time(format!(
                "iat {} and exp {} are not a time window",
                self.iat, self.exp
            )));
        }
        if self.exp.saturating_add(leeway) <= now {
            return Err(AssertionError::Time(format!("expired at {}", self.exp)));
        }
        if self.iat > now.saturating_add(leeway) {
            return Err(AssertionError::Time("issued in the future".into()));
        }
        if let Some(nbf) = self.nbf
            && nbf > now.saturating_add(leeway)
        {
            return Err(AssertionError::Time(format!("not valid before {nbf}")));
        }
        let max = i64::try_from(max_lifetime.as_secs()).unwrap_or(i64::MAX);
        if self.exp - self.iat > max {
            return Err(AssertionError::Time(format!(
                "lifetime {}s exceeds {max}s",
                self.exp - self.iat
            )));
        }
        Ok(())
    }
}

/// Signs a fresh client assertion for `workload` addressed to `token_endpoint`.
///
/// # Errors
///
/// Returns [`JwsError::Malformed`] if the claims cannot be signed with `key`.
pub fn sign_assertion(
    key: &SigningKey,
    workload: &str,
    token_endpoint: &str,
    ttl: Duration,
) -> Result<String, JwsError> {
    let now = unix_now();
    let ttl = ttl.min(MAX_ASSERTION_TTL).as_secs().max(1) as i64;
    let claims = AssertionClaims {
        iss: workload.to_string(),
        sub: workload.to_string(),
        aud: vec![token_endpoint.to_string()],
        jti: uuid::Uuid::new_v4().to_string(),
        iat: now,
        exp: now + ttl,
        nbf: None,
    };
    jws::sign(key, ASSERTION_TYP, &claims)
}

/// Why a client assertion was rejected (all become `invalid_client`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssertionError {
    /// The JWS layer rejected it (format, algorithm, key, signature, `typ`).
    #[error(transparent)]
    Jws(#[from] JwsError),
    /// `iss` and `sub` differ, or do not name the owner of the signing key.
    #[error("assertion issuer {iss:?} is not the owner of its signing key")]
    NotKeyOwner {
        /// Claimed issuer.
        iss: String,
    },
    /// `client_id` was sent and differs from the assertion issuer.
    #[error("client_id does not match the assertion issuer")]
    ClientIdMismatch,
    /// `aud` is not this token endpoint.
    #[error("assertion audience {aud:?} is not this token endpoint")]
    WrongAudience {
        /// The audiences presented.
        aud: Vec<String>,
    },
    /// Expired, not yet valid, or valid for longer than allowed.
    #[error("assertion time window invalid: {0}")]
    Time(String),
    /// The `jti` was already used.
    #[error("assertion jti replayed")]
    Replayed,
}

/// Verifies client assertions and remembers `jti`s until they expire.
#[derive(Debug)]
pub struct AssertionVerifier {
    leeway: Duration,
    max_lifetime: Duration,
    seen: Mutex<ReplayCache>,
}

#[derive(Debug, Default)]
struct ReplayCache {
    entries: HashMap<(String, String), i64>,
    inserts: u64,
}

impl ReplayCache {
    /// Records `(iss, jti)` until `until`; false if it is already present.
    fn insert(&mut self, iss: &str, jti: &str, until: i64, now: i64) -> bool {
        self.inserts += 1;
        if self.inserts & 1023 == 0 || self.entries.len() > 100_000 {
            self.entries.retain(|_, exp| *exp >= now);
        }
        let key = (iss.to_string(), jti.to_string());
        match self.entries.get(&key) {
            Some(exp) if *exp >= now => false,
            _ => {
                self.entries.insert(key, until);
                true
            }
        }
    }
}

impl Default for AssertionVerifier {
    fn default() -> Self {
        Self::new(Duration::from_secs(30), Duration::from_secs(300))
    }
}

impl AssertionVerifier {
    /// A verifier with clock `leeway` (for `exp`, `iat` and `nbf`, capped at 30 s)
    /// accepting assertions living at most `max_lifetime`.
    pub fn new(leeway: Duration, max_lifetime: Duration) -> Self {
        AssertionVerifier {
            leeway: leeway.min(MAX_LEEWAY),
            max_lifetime,
            seen: Mutex::new(ReplayCache::default()),
        }
    }

    /// Verifies `assertion` against the workload `keys` for one of `endpoints`;
    /// returns the authenticated workload id.
    ///
    /// # Errors
    ///
    /// Returns [`AssertionError::Jws`] if the assertion is malformed, has an empty `jti`, names an
    /// unknown key or fails its signature; [`AssertionError::NotKeyOwner`] if `iss` and `sub`
    /// differ or the key is not owned by `iss`; [`AssertionError::ClientIdMismatch`] if `client_id`
    /// is given and is not `iss`; [`AssertionError::WrongAudience`] if `aud` names none of
    /// `endpoints`; [`AssertionError::Time`] if it is expired, issued in the future, not yet valid
    /// or lives too long; and [`AssertionError::Replayed`] if its `jti` was seen before.
    pub fn verify(
        &self,
        assertion: &str,
        client_id: Option<&str>,
        keys: &KeySet,
        endpoints: &[String],
    ) -> Result<String, AssertionError> {
        let parsed = jws::parse(assertion, ASSERTION_TYP)?;
        let key = parsed.verify(keys)?;
        let claims: AssertionClaims = parsed.claims()?;
        if claims.iss != claims.sub || key.owner.as_deref() != Some(claims.iss.as_str()) {
            return Err(AssertionError::NotKeyOwner { iss: claims.iss });
        }
        if client_id.is_some_and(|c| c != claims.iss) {
            return Err(AssertionError::ClientIdMismatch);
        }
        if !claims.aud.iter().any(|a| endpoints.contains(a)) {
            return Err(AssertionError::WrongAudience { aud: claims.aud });
        }
        let now = unix_now();
        claims.check_time_window(now, self.leeway, self.max_lifetime)?;
        if claims.jti.is_empty() {
            return Err(AssertionError::Jws(JwsError::Malformed("empty jti".into())));
        }
        let until = claims.exp.saturating_add(self.leeway.as_secs() as i64);
        if !self
            .seen
            .lock()
            .insert(&claims.iss, &claims.jti, until, now)
        {
            return Err(AssertionError::Replayed);
        }
        Ok(claims.iss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elevate_core::keys::SigningAlg;

    const WL: &str = "spiffe://example.org/consumer";
    const EP: &str = "http://127.0.0.1:1/token";

    fn setup() -> (SigningKey, KeySet) {
        let key = SigningKey::generate(SigningAlg::ES256, "wl-1").unwrap();
        let mut ks = KeySet::new();
        ks.insert_workload_key(WL, &key).unwrap();
        (key, ks)
    }

    #[test]
    fn accepts_once_then_replay() {
        let (key, ks) = setup();
        let v = AssertionVerifier::default();
        let a = sign_assertion(&key, WL, EP, Duration::from_secs(30)).unwrap();
        assert_eq!(v.verify(&a, None, &ks, &[EP.into()]).unwrap(), WL);
        assert_eq!(
            v.verify(&a, None, &ks, &[EP.into()]),
            Err(AssertionError::Replayed)
        );
    }

    #[test]
    fn rejects_wrong_audience_owner_and_client_id() {
        let (key, ks) = setup();
        let v = AssertionVerifier::default();
        let a = sign_assertion(&key, WL, "http://elsewhere/token", MAX_ASSERTION_TTL).unwrap();
        assert!(matches!(
            v.verify(&a, None, &ks, &[EP.into()]),
            Err(AssertionError::WrongAudience { .. })
        ));
        let a = sign_assertion(&key, "spiffe://example.org/other", EP, MAX_ASSERTION_TTL).unwrap();
        assert!(matches!(
            v.verify(&a, None, &ks, &[EP.into()]),
            Err(AssertionError::NotKeyOwner { .. })
        ));
        let a = sign_assertion(&key, WL, EP, MAX_ASSERTION_TTL).unwrap();
        assert_eq!(
            v.verify(&a, Some("someone"), &ks, &[EP.into()]),
            Err(AssertionError::ClientIdMismatch)
        );
    }

    #[test]
    fn rejects_forged_signature() {
        let (_, ks) = setup();
        let forger = SigningKey::generate(SigningAlg::ES256, "wl-1").unwrap();
        let a = sign_assertion(&forger, WL, EP, MAX_ASSERTION_TTL).unwrap();
        assert_eq!(
            AssertionVerifier::default().verify(&a, None, &ks, &[EP.into()]),
            Err(AssertionError::Jws(JwsError::BadSignature))
        );
    }

    fn signed(key: &SigningKey, iat: i64, exp: i64, nbf: Option<i64>) -> String {
        jws::sign(
            key,
            ASSERTION_TYP,
            &AssertionClaims {
                iss: WL.into(),
                sub: WL.into(),
                aud: vec![EP.into()],
                jti: uuid::Uuid::new_v4().to_string(),
                iat,
                exp,
                nbf,
            },
        )
        .unwrap()
    }

    #[test]
    fn rejects_nbf_in_the_future_beyond_the_capped_leeway() {
        let (key, ks) = setup();
        let now = unix_now();
        // the leeway asked for is 10 min; 30 s is what applies
        let v = AssertionVerifier::new(Duration::from_secs(600), Duration::from_secs(300));
        for nbf in [now + 60, now + 3600, i64::MAX] {
            assert!(
                matches!(
                    v.verify(
                        &signed(&key, now, now + 60, Some(nbf)),
                        None,
                        &ks,
                        &[EP.into()]
                    ),
                    Err(AssertionError::Time(_))
                ),
                "nbf {nbf}"
            );
        }
        // within the leeway, in the past, or absent: accepted
        for nbf in [Some(now + 10), Some(now - 60), Some(i64::MIN), None] {
            assert_eq!(
                v.verify(&signed(&key, now, now + 60, nbf), None, &ks, &[EP.into()]),
                Ok(WL.to_string()),
                "nbf {nbf:?}"
            );
        }
        // sign_assertion sets no nbf
        let a = sign_assertion(&key, WL, EP, MAX_ASSERTION_TTL).unwrap();
        let claims: serde_json::Value = jws::parse(&a, ASSERTION_TYP).unwrap().claims().unwrap();
        assert!(claims.get("nbf").is_none());
    }

    #[test]
    fn rejects_expired_and_long_lived() {
        let (key, ks) = setup();
        let v = AssertionVerifier::default();
        let now = unix_now();
        let mk = |iat: i64, exp: i64| signed(&key, iat, exp, None);
        assert!(matches!(
            v.verify(&mk(now - 200, now - 100), None, &ks, &[EP.into()]),
            Err(AssertionError::Time(_))
        ));
        assert!(matches!(
            v.verify(&mk(now, now + 3600), None, &ks, &[EP.into()]),
            Err(AssertionError::Time(_))
        ));
    }
}
