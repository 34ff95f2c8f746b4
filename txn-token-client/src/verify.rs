//! Txn-Token verification: parse (`typ` `txntoken+jwt`, alg allow-list) →
//! signature (key by `kid` from a cached JWKS) → claims (required set, `aud`
//! = own trust domain, `exp`/`iat` with explicit leeway ≤ 30 s).
//!
//! Keys come from a [`JwksProvider`] (the TTS's `/.well-known/jwks.json`, or
//! the in-process service). On an unknown `kid` the verifier refreshes once,
//! rate-limited and single-flight: concurrent verifications share one fetch,
//! and the last good key set is kept when the fetch fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use elevate_core::ctxref::unix_now;
use elevate_core::jws::{self, JwsError};
use elevate_core::keys::KeySet;
use elevate_core::token::{TXN_TOKEN_TYP, TokenError, TxnTokenClaims};
use jsonwebtoken::jwk::Jwk;

/// Claims every Txn-Token must carry.
pub const REQUIRED_CLAIMS: [&str; 7] = ["iat", "exp", "aud", "txn", "sub", "scope", "req_wl"];
/// Upper bound on clock leeway.
pub const MAX_LEEWAY: Duration = elevate_core::ctxref::MAX_LEEWAY;

/// Longest `exp - iat` a Txn-Token may have (the TTS refuses to be configured
/// past it): Txn-Tokens are short-lived by design.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Why a Txn-Token was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The JWS layer rejected it (format, algorithm, missing or unknown `kid`, signature, `typ`).
    #[error(transparent)]
    Jws(#[from] JwsError),
    /// A required claim is absent.
    #[error("required claim {0:?} is missing")]
    MissingClaim(&'static str),
    /// Claims present but of the wrong shape.
    #[error("claims malformed: {0}")]
    Malformed(String),
    /// `aud` does not name this trust domain.
    #[error("audience {aud:?} does not include trust domain {expected:?}")]
    WrongAudience {
        /// Audiences in the token.
        aud: Vec<String>,
        /// This trust domain.
        expected: String,
    },
    /// Past `exp` plus leeway.
    #[error("expired at {exp}, now {now}")]
    Expired {
        /// The token's `exp` claim (seconds since the epoch).
        exp: i64,
        /// Verification time.
        now: i64,
    },
    /// `iat` after now plus leeway, or after `exp`.
    #[error("issued at {iat}, not valid yet (now {now})")]
    NotYetValid {
        /// Issued at.
        iat: i64,
        /// Verification time.
        now: i64,
    },
    /// `nbf` after now plus leeway (RFC 7519 §4.1.5).
    #[error("not valid before {nbf} (now {now})")]
    NotBefore {
        /// Not before.
        nbf: i64,
        /// Verification time.
        now: i64,
    },
    /// The key for this `kid` could not be fetched (TTS down, or refresh rate-limited).
    #[error("signing keys unavailable: {reason}")]
    KeysUnavailable {
        /// What happened.
        reason: String,
        /// When a refresh will be allowed again.
        retry_after: Option<Duration>,
    },
}

impl From<VerifyError> for TokenError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::KeysUnavailable {
                reason,
                retry_after,
            } => TokenError::Unavailable {
                reason: format!("Txn-Token keys unavailable: {reason}"),
                retry_after,
            },
            other => TokenError::Invalid(format!("Txn-Token rejected: {other}")),
        }
    }
}

/// Where verification keys come from.
#[async_trait::async_trait]
pub trait JwksProvider: Send + Sync {
    /// Fetches the current key set (the TTS's current and previous keys).
    ///
    /// # Errors
    ///
    /// Returns a message saying why if the key set cannot be fetched or parsed; the verifier turns
    /// it into [`VerifyError::KeysUnavailable`].
    async fn fetch(&self) -> Result<KeySet, String>;
}

/// Builds a key set from a JWKS JSON document, skipping keys Elevate cannot use
/// (other key types, no `kid`) so one foreign key does not hide the rest.
///
/// # Errors
///
/// Returns a message if the document has no `keys` array. Unusable keys in it are skipped (and
/// logged), not errors.
pub fn keyset_from_jwks_json(doc: &serde_json::Value) -> Result<KeySet, String> {
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("JWKS has no keys array")?;
    let mut set = KeySet::new();
    for k in keys {
        let parsed = serde_json::from_value::<Jwk>(k.clone())
            .map_err(|e| e.to_string())
            .and_then(|jwk| set.insert_jwk(&jwk).map_err(|e| e.to_string()));
        if let Err(e) = parsed {
            tracing::warn!(error = %e, "skipping unusable JWKS entry");
        }
    }
    Ok(set)
}

/// A JWKS fetched over HTTP (the TTS's `/.well-known/jwks.json`).
#[derive(Debug, Clone)]
pub struct HttpJwks {
    http: reqwest::Client,
    url: String,
    timeout: Duration,
}

impl HttpJwks {
    /// A provider for `url`, reusing `http` (keep-alive, TLS settings).
    pub fn new(http: reqwest::Client, url: impl Into<String>, timeout: Duration) -> Self {
        HttpJwks {
            http,
            url: url.into(),
            timeout,
        }
    }
}

#[async_trait::async_trait]
impl JwksProvider for HttpJwks {
    async fn fetch(&self) -> Result<KeySet, String> {
        let resp = self
            .http
            .get(&self.url)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", self.url))?;
        if !resp.status().is_success() {
            return Err(format!("GET {}: HTTP {}", self.url, resp.status()));
        }
        let doc: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("JWKS from {} is not JSON: {e}", self.url))?;
        keyset_from_jwks_json(&doc)
    }
}

/// Several sources of the same key set, tried in order until one answers:
/// the replicas of a TTS fleet, which all publish the fleet's keys.
pub struct FailoverJwks {
    providers: Vec<Arc<dyn JwksProvider>>,
}

impl std::fmt::Debug for FailoverJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverJwks")
            .field("providers", &self.providers.len())
            .finish()
    }
}

impl FailoverJwks {
    /// Tries `providers` in this order.
    pub fn new(providers: Vec<Arc<dyn JwksProvider>>) -> Self {
        FailoverJwks { providers }
    }
}

#[async_trait::async_trait]
impl JwksProvider for FailoverJwks {
    async fn fetch(&self) -> Result<KeySet, String> {
        let mut errors = Vec::new();
        for p in &self.providers {
            match p.fetch().await {
                Ok(set) => return Ok(set),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            return Err("no JWKS source configured".into());
        }
        Err(errors.join("; "))
    }
}

/// A fixed key set (tests, or a deployment that pins the TTS keys).
#[derive(Debug, Clone)]
pub struct StaticJwks(pub KeySet);

#[async_trait::async_trait]
impl JwksProvider for StaticJwks {
    async fn fetch(&self) -> Result<KeySet, String> {
        Ok(self.0.clone())
    }
}

struct KeyCache {
    provider: Option<Arc<dyn JwksProvider>>,
    keys: ArcSwap<KeySet>,
    generation: AtomicU64,
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
}

impl KeyCache {
    /// One rate-limited, single-flight refresh; returns the key set to use.
    async fn refresh(&self, min_interval: Duration) -> Result<Arc<KeySet>, VerifyError> {
        let seen = self.generation.load(Ordering::Acquire);
        let mut last = self.last_attempt.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            // Someone refreshed while we waited: share their result.
            return Ok(self.keys.load_full());
        }
        let Some(provider) = &self.provider else {
            return Ok(self.keys.load_full());
        };
        if let Some(at) = *last {
            let elapsed = at.elapsed();
            if elapsed < min_interval {
                return Err(VerifyError::KeysUnavailable {
                    reason: format!(
                        "unknown kid and the key set was refreshed {}ms ago",
                        elapsed.as_millis()
                    ),
                    retry_after: Some(min_interval - elapsed),
                });
            }
        }
        *last = Some(Instant::now());
        match provider.fetch().await {
            Ok(set) => {
                let set = Arc::new(set);
                self.keys.store(set.clone());
                self.generation.fetch_add(1, Ordering::AcqRel);
                tracing::debug!(keys = set.len(), "Txn-Token key set refreshed");
                Ok(set)
            }
            Err(reason) => {
                tracing::warn!(%reason, "Txn-Token key set refresh failed; keeping the last good set");
                Err(VerifyError::KeysUnavailable {
                    reason,
                    retry_after: None,
                })
            }
        }
    }
}

/// Verifies Txn-Tokens for one trust domain.
#[derive(Clone)]
pub struct TxnTokenVerifier {
    trust_domain: Arc<str>,
    leeway: Duration,
    min_refresh: Duration,
    cache: Arc<KeyCache>,
}

impl std::fmt::Debug for TxnTokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnTokenVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("leeway", &self.leeway)
            .field("keys", &self.cache.keys.load())
            .finish_non_exhaustive()
    }
}

impl TxnTokenVerifier {
    fn build(trust_domain: &str, keys: KeySet, provider: Option<Arc<dyn JwksProvider>>) -> Self {
        TxnTokenVerifier {
            trust_domain: trust_domain.into(),
            leeway: Duration::from_secs(30),
            min_refresh: Duration::from_secs(1),
            cache: Arc::new(KeyCache {
                provider,
                keys: ArcSwap::from_pointee(keys),
                generation: AtomicU64::new(0),
                last_attempt: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// A verifier over a fixed key set (in-process mode, tests).
    pub fn from_keys(trust_domain: &str, keys: KeySet) -> Self {
        Self::build(trust_domain, keys, None)
    }

    /// A verifier whose keys come from `provider`, fetched on first use and on unknown `kid`s.
    pub fn with_provider(trust_domain: &str, provider: Arc<dyn JwksProvider>) -> Self {
        Self::build(trust_domain, KeySet::new(), Some(provider))
    }

    /// A verifier over the TTS's JWKS at `jwks_url`, fetched with `http`.
    pub fn remote(trust_domain: &str, http: reqwest::Client, jwks_url: &str) -> Self {
        let provider = HttpJwks::new(http, jwks_url, Duration::from_secs(5));
        Self::with_provider(trust_domain, Arc::new(provider))
    }

    /// Sets the clock leeway for `exp`/`iat` (capped at 30 s; default 30 s).
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway.min(MAX_LEEWAY);
        self
    }

    /// Sets the minimum time between unknown-`kid` refreshes (default 1 s).
    pub fn with_min_refresh_interval(mut self, interval: Duration) -> Self {
        self.min_refresh = interval;
        self
    }

    /// The trust domain tokens must be addressed to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The key ids currently cached.
    pub fn cached_kids(&self) -> Vec<String> {
        self.cache.keys.load().kids().map(str::to_string).collect()
    }

    /// Fetches the key set now (optional warm-up; verification fetches lazily).
    ///
    /// # Errors
    ///
    /// Returns [`VerifyError::KeysUnavailable`] if the key set cannot be fetched (or was fetched
    /// too recently to fetch again). A verifier with a fixed key set never fails.
    pub async fn refresh(&self) -> Result<(), VerifyError> {
        self.cache.refresh(Duration::ZERO).await.map(|_| ())
    }

    /// Verifies a compact Txn-Token and returns its claims.
    ///
    /// # Errors
    ///
    /// Returns [`VerifyError::Jws`] if the token is malformed, has no `kid` or a `kid` unknown even
    /// after a refresh, or fails its signature; [`VerifyError::KeysUnavailable`] if the keys cannot
    /// be fetched; and the claim errors of [`check_claims`].
    pub async fn verify(&self, token: &str) -> Result<TxnTokenClaims, VerifyError> {
        let parsed = jws::parse(token, TXN_TOKEN_TYP)?;
        let kid = parsed.header.kid.as_deref().ok_or(JwsError::MissingKid)?;
        let mut keys = self.cache.keys.load_full();
        if keys.get(kid).is_none() {
            keys = self.cache.refresh(self.min_refresh).await?;
        }
        parsed.verify(&keys)?;
        let value: serde_json::Value = parsed.claims()?;
        check_claims(value, &self.trust_domain, self.leeway, unix_now())
    }
}

/// The claims step: required set, audience, time window (`iat`, `exp`, and
/// `nbf` when present, with the leeway capped at 30 s). Pure, for tests.
///
/// # Errors
///
/// Returns [`VerifyError::Malformed`] if the claims are not an object, have the wrong shape, an
/// impossible or too long time window, or an empty required string; [`VerifyError::MissingClaim`]
/// if a required claim is absent; [`VerifyError::WrongAudience`] if `aud` does not name
/// `trust_domain`; and [`VerifyError::Expired`], [`VerifyError::NotYetValid`] or
/// [`VerifyError::NotBefore`] if `now` is outside the token's time window (with the leeway).
pub fn check_claims(
    value: serde_json::Value,
    trust_domain: &str,
    leeway: Duration,
    now: i64,
) -> Result<TxnTokenClaims, VerifyError> {
    if !value.is_object() {
        return Err(VerifyError::Malformed(
            "claims are not a JSON object".into(),
        ));
    }
    if let Some(missing) = REQUIRED_CLAIMS
        .iter()
        .find(|c| value.get(**c).is_none_or(serde_json::Value::is_null))
    {
        return Err(VerifyError::MissingClaim(missing));
    }
    let nbf = match value.get("nbf") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| VerifyError::Malformed("nbf is not an integer".into()))?,
        ),
    };
    let claims: TxnTokenClaims =
        serde_json::from_value(value).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if !claims.aud.iter().any(|a| a == trust_domain) {
        return Err(VerifyError::WrongAudience {
            aud: claims.aud,
            expected: trust_domain.to_string(),
        });
    }
    let leeway = leeway.min(MAX_LEEWAY).as_secs() as i64;
    if claims.iat <= 0 || claims.exp < claims.iat {
        return Err(VerifyError::Malformed(format!(
            "iat {} and exp {} are not a time window",
            claims.iat, claims.exp
        )));
    }
    if claims.exp - claims.iat > MAX_TOKEN_LIFETIME.as_secs() as i64 {
        return Err(VerifyError::Malformed(format!(
            "lifetime {}s exceeds the {}s a Txn-Token may live",
            claims.exp - claims.iat,
            MAX_TOKEN_LIFETIME.as_secs()
        )));
    }
    if claims.exp.saturating_add(leeway) <= now {
        return Err(VerifyError::Expired {
            exp: claims.exp,
            now,
        });
    }
    if claims.iat > now.saturating_add(leeway) {
        return Err(VerifyError::NotYetValid {
            iat: claims.iat,
            now,
        });
    }
    if let Some(nbf) = nbf
        && nbf > now.saturating_add(leeway)
    {
        return Err(VerifyError::NotBefore { nbf, now });
    }
    for (name, v) in [
        ("txn", &claims.txn),
        ("sub", &claims.sub),
        ("req_wl", &claims.req_wl),
    ] {
        if v.is_empty() {
            return Err(VerifyError::Malformed(format!("empty {name}")));
        }
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use elevate_core::keys::{SigningAlg, SigningKey};
    use serde_json::json;

    const TD: &str = "example.org";

    fn claims(now: i64) -> serde_json::Value {
        json!({"iat": now, "exp": now + 60, "aud": TD, "txn": "t1", "sub": "alice",
               "scope": "orders.read", "req_wl": "spiffe://example.org/c"})
    }

    #[test]
    fn claims_rules() {
        let now = 1_000_000;
        assert!(check_claims(claims(now), TD, MAX_LEEWAY, now).is_ok());
        for c in REQUIRED_CLAIMS {
            let mut v = claims(now);
            v.as_object_mut().unwrap().remove(c);
            assert_eq!(
                check_claims(v, TD, MAX_LEEWAY, now),
                Err(VerifyError::MissingClaim(c))
            );
        }
        assert!(matches!(
            check_claims(claims(now), "other.org", MAX_LEEWAY, now),
            Err(VerifyError::WrongAudience { .. })
        ));
        assert!(matches!(
            check_claims(claims(now), TD, Duration::from_secs(10), now + 71),
            Err(VerifyError::Expired { .. })
        ));
        assert!(check_claims(claims(now), TD, Duration::from_secs(10), now + 69).is_ok());
        assert!(matches!(
            check_claims(claims(now + 100), TD, Duration::from_secs(10), now),
            Err(VerifyError::NotYetValid { .. })
        ));
        // leeway is capped at 30 s even when asked for more
        assert!(matches!(
            check_claims(claims(now), TD, Duration::from_secs(600), now + 91),
            Err(VerifyError::Expired { .. })
        ));
    }

    #[test]
    fn nbf_is_honoured_with_the_capped_leeway() {
        let now = 1_000_000;
        let with_nbf = |nbf: serde_json::Value| {
            let mut v = claims(now);
            v["nbf"] = nbf;
            v
        };
        let lenient = Duration::from_secs(600);
        assert!(check_claims(with_nbf(json!(now + 30)), TD, lenient, now).is_ok());
        assert!(check_claims(with_nbf(json!(now - 30)), TD, lenient, now).is_ok());
        assert!(check_claims(with_nbf(json!(null)), TD, lenient, now).is_ok());
        for nbf in [now + 31, i64::MAX] {
            assert_eq!(
                check_claims(with_nbf(json!(nbf)), TD, lenient, now),
                Err(VerifyError::NotBefore { nbf, now })
            );
        }
        assert!(matches!(
            check_claims(with_nbf(json!("soon")), TD, lenient, now),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn signature_typ_and_kid() {
        let key = SigningKey::generate(SigningAlg::ES256, "tts-1").unwrap();
        let mut ks = KeySet::new();
        ks.insert_signing_key(&key).unwrap();
        let v = TxnTokenVerifier::from_keys(TD, ks);
        let now = unix_now();
        let good = jws::sign(&key, TXN_TOKEN_TYP, &claims(now)).unwrap();
        assert_eq!(v.verify(&good).await.unwrap().sub, "alice");
        let wrong_typ = jws::sign(&key, "JWT", &claims(now)).unwrap();
        assert!(matches!(
            v.verify(&wrong_typ).await,
            Err(VerifyError::Jws(JwsError::WrongType { .. }))
        ));
        let no_kid = jws::sign_with(
            key.encoding_key(),
            key.alg(),
            None,
            TXN_TOKEN_TYP,
            &claims(now),
        )
        .unwrap();
        assert_eq!(
            v.verify(&no_kid).await,
            Err(VerifyError::Jws(JwsError::MissingKid))
        );
        let other = SigningKey::generate(SigningAlg::ES256, "tts-1").unwrap();
        let forged = jws::sign(&other, TXN_TOKEN_TYP, &claims(now)).unwrap();
        assert_eq!(
            v.verify(&forged).await,
            Err(VerifyError::Jws(JwsError::BadSignature))
        );
    }

    struct Counting {
        keys: parking_lot::Mutex<KeySet>,
        calls: AtomicU64,
    }

    #[async_trait::async_trait]
    impl JwksProvider for Counting {
        async fn fetch(&self) -> Result<KeySet, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(self.keys.lock().clone())
        }
    }

    #[tokio::test]
    async fn unknown_kid_refreshes_once_single_flight() {
        let k1 = SigningKey::generate(SigningAlg::ES256, "k1").unwrap();
        let k2 = SigningKey::generate(SigningAlg::EdDSA, "k2").unwrap();
        let mut ks = KeySet::new();
        ks.insert_signing_key(&k1).unwrap();
        let provider = Arc::new(Counting {
            keys: parking_lot::Mutex::new(ks),
            calls: AtomicU64::new(0),
        });
        let v = TxnTokenVerifier::with_provider(TD, provider.clone())
            .with_min_refresh_interval(Duration::from_millis(200));
        let t1 = jws::sign(&k1, TXN_TOKEN_TYP, &claims(unix_now())).unwrap();
        let results = futures::future::join_all((0..8).map(|_| v.verify(&t1))).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(provider.calls.load(Ordering::SeqCst), 1, "single flight");

        // rotation: k2 appears; the first refresh is rate-limited, then allowed
        provider.keys.lock().insert_signing_key(&k2).unwrap();
        let t2 = jws::sign(&k2, TXN_TOKEN_TYP, &claims(unix_now())).unwrap();
        assert!(matches!(
            v.verify(&t2).await,
            Err(VerifyError::KeysUnavailable {
                retry_after: Some(_),
                ..
            })
        ));
        tokio::time::sleep(Duration::from_millis(210)).await;
        assert!(v.verify(&t2).await.is_ok());
        assert!(v.verify(&t1).await.is_ok());
        assert_eq!(provider.calls.load(Ordering::SeqCst), 2);
    }
}
