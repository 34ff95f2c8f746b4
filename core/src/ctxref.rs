//! The context reference: a signed, message-bound, non-credential pointer to
//! the target identity's context (header `ztauth-ctx-ref`, `typ: ctx-ref+jwt`).
//!
//! Minting binds the reference to one destination and one payload (`dig`);
//! verification runs parse → signature → claims → binding → chain, and every
//! rejection is a distinct [`RefError`] that maps to a [`Reason`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::ctxbind::{BindingError, ContextOpener};
use crate::jws::{self, JwsError};
use crate::keys::{CurrentKey, KeySet, SigningKey, sha256_b64url, sha256_hex};
use crate::scope::Scope;
use crate::token::Redacted;
use crate::verdict::Reason;

/// The header that carries the context reference on every broker.
pub const CTX_REF_HEADER: &str = "ztauth-ctx-ref";
/// The JOSE `typ` of a context reference.
pub const CTX_REF_TYP: &str = "ctx-ref+jwt";

/// The most clock leeway any verifier grants, whatever it is configured with.
pub const MAX_LEEWAY: Duration = Duration::from_secs(30);

/// Whether the target identity is a person or a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SubjectKind {
    /// A human user.
    Human,
    /// A workload acting for itself.
    Workload,
}

impl SubjectKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Human => "human",
            SubjectKind::Workload => "workload",
        }
    }
}

/// One prior hop of a delegation chain (RFC 8693 `act`, most recent outermost).
///
/// `sub` is the workload that signed the previous reference and `scope` the
/// scope that reference carried; the current hop is the reference's `iss`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// Workload id of the prior hop's signer.
    pub sub: String,
    /// Scope the prior hop held.
    pub scope: String,
    /// The hop before that, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
    /// The prior hop's own reference (compact JWS), on the outermost actor only:
    /// it proves the history — each hop is verified against its signer's key.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor")
            .field("sub", &self.sub)
            .field("scope", &self.scope)
            .field("act", &self.act)
            .field("reference", &self.reference.as_deref().map(Redacted))
            .finish()
    }
}

impl Actor {
    /// The chain from most recent prior hop to the origin producer.
    pub fn iter(&self) -> impl Iterator<Item = &Actor> {
        let mut next = Some(self);
        std::iter::from_fn(move || {
            let cur = next?;
            next = cur.act.as_deref();
            Some(cur)
        })
    }
}

/// Claims of a context reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextRefClaims {
    /// Workload id of the signer (producer, or the hop that derived it).
    pub iss: String,
    /// Target identity.
    pub sub: String,
    /// Whether `sub` is a human or a workload.
    pub sub_kind: SubjectKind,
    /// Intended consumer audiences.
    #[serde(deserialize_with = "crate::token::one_or_many")]
    pub aud: Vec<String>,
    /// Space-delimited ceiling on what the async work may do.
    pub scope: String,
    /// Origin transaction id.
    pub txn: String,
    /// Unique id of this reference.
    pub jti: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expiry: the async horizon (seconds since the epoch).
    pub exp: i64,
    /// Not before (seconds since the epoch, RFC 7519 §4.1.5), when present: the
    /// reference is refused as `not-yet-valid` until then (with the same capped
    /// leeway as `iat`). Minted references carry none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Destination (topic, exchange/routing key, subject) the message was
    /// published to. Empty (absent on the wire) in a context reference, whose
    /// messages carry it in their binding.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dst: String,
    /// base64url SHA-256 of the payload. Empty (absent) in a context reference.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dig: String,
    /// RFC 7800 confirmation: in a context reference (per-context mode), the
    /// key its messages are MACed with, encrypted to the audience. Absent in
    /// a per-message reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<crate::ctxbind::Confirmation>,
    /// Prior hops, for multi-hop work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// Number of prior hops (length of `act`).
    #[serde(default)]
    pub depth: u32,
    /// Maximum number of hops the origin allows.
    pub max_depth: u32,
}

impl ContextRefClaims {
    /// Workload ids of the chain, origin first, current signer last.
    pub fn chain(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .act
            .iter()
            .flat_map(|a| a.iter())
            .map(|a| a.sub.clone())
            .collect();
        v.reverse();
        v.push(self.iss.clone());
        v
    }

    /// The scope as a set.
    pub fn scope_set(&self) -> Scope {
        Scope::parse(&self.scope)
    }
}

/// Why a reference could not be minted or derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// A derived reference asked for scope its parent did not have.
    #[error("scope {requested:?} is not within the parent scope {parent:?}")]
    ScopeWidened {
        /// Scope asked for.
        requested: String,
        /// Scope of the parent.
        parent: String,
    },
    /// Deriving would exceed `max_depth`.
    #[error("depth {depth} would exceed max_depth {max}")]
    DepthExceeded {
        /// The depth the new reference would have.
        depth: u32,
        /// The allowed maximum.
        max: u32,
    },
    /// Signing failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// What a producer binds a new reference to.
#[derive(Debug, Clone)]
pub struct MintRequest<'a> {
    /// Target identity.
    pub subject: &'a str,
    /// Human or workload.
    pub sub_kind: SubjectKind,
    /// Consumer audiences.
    pub audience: &'a [String],
    /// Ceiling scope.
    pub scope: &'a Scope,
    /// Origin transaction id (from the producer's Txn-Token).
    pub txn: &'a str,
    /// Destination the message is published to.
    pub destination: &'a str,
    /// The payload as it will be sent (after stripping).
    pub payload: &'a [u8],
}

/// A freshly signed reference and its claims (`Debug` shows the JWS as a hash).
#[derive(Clone)]
pub struct MintedRef {
    /// The compact JWS for the `ztauth-ctx-ref` header.
    pub token: String,
    /// The claims it carries.
    pub claims: ContextRefClaims,
}

/// Signs context references for one producer workload.
#[derive(Debug, Clone)]
pub struct ContextRefMinter {
    key: CurrentKey,
    issuer: String,
    ttl: Duration,
    max_depth: u32,
}

impl ContextRefMinter {
    /// A minter for workload `issuer`, signing with `key`; `ttl` is the async horizon.
    pub fn new(issuer: impl Into<String>, key: SigningKey, ttl: Duration) -> Self {
        Self::with_current_key(issuer, CurrentKey::new(key), ttl)
    }

    /// A minter signing with whatever key `key` holds at the time of each
    /// signature, so that a rotated key file takes effect without a restart.
    pub fn with_current_key(issuer: impl Into<String>, key: CurrentKey, ttl: Duration) -> Self {
        ContextRefMinter {
            key,
            issuer: issuer.into(),
            ttl,
            max_depth: 3,
        }
    }

    /// Sets the `max_depth` placed on origin references (default 3 hops).
    pub fn with_max_depth(mut self, max_depth: u32) -> Self {
        self.max_depth = max_depth;
        self
    }

    /// The workload id this minter signs as.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The async horizon placed on references.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Mints an origin (depth 0) reference bound to destination and payload.
    ///
    /// # Errors
    ///
    /// Returns [`MintError::Signing`] if the claims cannot be signed with this minter's key.
    pub fn mint(&self, req: &MintRequest<'_>) -> Result<MintedRef, MintError> {
        self.sign(self.origin_claims(req))
    }

    /// The claims [`mint`](Self::mint) signs: an origin (depth 0) reference
    /// bound to destination and payload, issued now.
    pub fn origin_claims(&self, req: &MintRequest<'_>) -> ContextRefClaims {
        let now = unix_now();
        ContextRefClaims {
            iss: self.issuer.clone(),
            sub: req.subject.to_string(),
            sub_kind: req.sub_kind,
            aud: req.audience.to_vec(),
            scope: req.scope.to_string(),
            txn: req.txn.to_string(),
            jti: uuid::Uuid::now_v7().to_string(),
            iat: now,
            exp: now + self.ttl.as_secs() as i64,
            nbf: None,
            dst: req.destination.to_string(),
            dig: sha256_b64url(req.payload),
            cnf: None,
            act: None,
            depth: 0,
            max_depth: self.max_depth,
        }
    }

    /// Derives the next hop's reference from a verified parent: appends the
    /// parent's signer to `act`, keeps `sub`/`txn`/`max_depth`, may only narrow scope.
    /// The new reference never outlives its parent.
    ///
    /// # Errors
    ///
    /// Returns [`MintError::ScopeWidened`] if `scope` is not a subset of the parent's scope,
    /// [`MintError::DepthExceeded`] if the new depth would pass the parent's `max_depth`, and
    /// [`MintError::Signing`] if signing fails.
    pub fn derive(
        &self,
        parent: &ContextRefClaims,
        parent_token: &str,
        scope: Option<&Scope>,
        audience: &[String],
        destination: &str,
        payload: &[u8],
    ) -> Result<MintedRef, MintError> {
        self.sign(self.derived_claims(
            parent,
            parent_token,
            scope,
            audience,
            destination,
            payload,
        )?)
    }

    /// The claims [`derive`](Self::derive) signs.
    ///
    /// # Errors
    ///
    /// [`MintError::ScopeWidened`] and [`MintError::DepthExceeded`], as [`derive`](Self::derive).
    pub fn derived_claims(
        &self,
        parent: &ContextRefClaims,
        parent_token: &str,
        scope: Option<&Scope>,
        audience: &[String],
        destination: &str,
        payload: &[u8],
    ) -> Result<ContextRefClaims, MintError> {
        let parent_scope = parent.scope_set();
        let scope = match scope {
            Some(s) if !s.is_subset(&parent_scope) => {
                return Err(MintError::ScopeWidened {
                    requested: s.to_string(),
                    parent: parent.scope.clone(),
                });
            }
            Some(s) => s.clone(),
            None => parent_scope,
        };
        let depth = parent.depth + 1;
        if depth > parent.max_depth {
            return Err(MintError::DepthExceeded {
                depth,
                max: parent.max_depth,
            });
        }
        let now = unix_now();
        let claims = ContextRefClaims {
            iss: self.issuer.clone(),
            sub: parent.sub.clone(),
            sub_kind: parent.sub_kind,
            aud: audience.to_vec(),
            scope: scope.to_string(),
            txn: parent.txn.clone(),
            jti: uuid::Uuid::now_v7().to_string(),
            iat: now,
            exp: (now + self.ttl.as_secs() as i64).min(parent.exp.max(now)),
            nbf: None,
            dst: destination.to_string(),
            dig: sha256_b64url(payload),
            cnf: None,
            act: Some(Actor {
                sub: parent.iss.clone(),
                scope: parent.scope.clone(),
                act: parent.act.clone().map(|mut a| {
                    a.reference = None;
                    Box::new(a)
                }),
                reference: Some(parent_token.to_string()),
            }),
            depth,
            max_depth: parent.max_depth,
        };
        Ok(claims)
    }

    /// Signs claims as they are (tests use it to build invalid references).
    ///
    /// # Errors
    ///
    /// Returns [`MintError::Signing`] if the claims cannot be serialized or signed with this
    /// minter's key.
    pub fn sign(&self, claims: ContextRefClaims) -> Result<MintedRef, MintError> {
        let token = jws::sign(&self.key.get(), CTX_REF_TYP, &claims)
            .map_err(|e| MintError::Signing(e.to_string()))?;
        Ok(MintedRef { token, claims })
    }
}

/// Why a context reference was rejected. Each maps to one [`Reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefError {
    /// The JWS layer rejected it (format, algorithm, key, signature, `typ`).
    #[error(transparent)]
    Jws(#[from] JwsError),
    /// `iss` is not the workload that owns the signing key.
    #[error("issuer {iss:?} does not own key {kid:?}")]
    IssuerMismatch {
        /// Claimed issuer.
        iss: String,
        /// Key used.
        kid: String,
    },
    /// `aud` does not include this consumer.
    #[error("audience {aud:?} does not include {expected:?}")]
    WrongAudience {
        /// Audiences in the reference.
        aud: Vec<String>,
        /// This consumer's audience.
        expected: String,
    },
    /// Past `exp` plus leeway.
    #[error("expired at {exp}, now {now}")]
    Expired {
        /// The reference's `exp` claim (seconds since the epoch).
        exp: i64,
        /// Verification time.
        now: i64,
    },
    /// `iat` after now plus leeway.
    #[error("issued at {iat}, in the future (now {now})")]
    NotYetValid {
        /// Issued at.
        iat: i64,
        /// Verification time.
        now: i64,
    },
    /// `nbf` after now plus leeway: not valid yet (same reason as a future `iat`).
    #[error("not valid before {nbf} (now {now})")]
    NotBefore {
        /// Not before.
        nbf: i64,
        /// Verification time.
        now: i64,
    },
    /// `exp - iat` longer than the configured maximum horizon.
    #[error("lifetime {lifetime}s exceeds the maximum async horizon {max}s")]
    HorizonTooLong {
        /// Lifetime in seconds.
        lifetime: i64,
        /// Allowed maximum.
        max: u64,
    },
    /// `dst` is not where the message was read from.
    #[error("destination {dst:?} where {expected:?} was expected")]
    WrongDestination {
        /// Bound destination.
        dst: String,
        /// Actual destination.
        expected: String,
    },
    /// The payload digest does not match `dig`.
    #[error("payload digest does not match dig")]
    DigestMismatch,
    /// A hop widened scope.
    #[error("scope widened along the chain at {at:?}")]
    ScopeWidened {
        /// Workload at which the widening was found.
        at: String,
    },
    /// `depth` too large.
    #[error("depth {depth} exceeds max {max}")]
    DepthExceeded {
        /// The depth.
        depth: u32,
        /// The maximum in force.
        max: u32,
    },
    /// `depth` inconsistent with `act`, or the chain otherwise malformed.
    #[error("chain invalid: {0}")]
    ChainInvalid(String),
    /// The `kid` is not trusted yet and the key source could not be
    /// reached to look it up ([`KeyRefreshed::Unavailable`]): retry later.
    #[error("key {kid:?} is not in the trusted set and the key source is unreachable")]
    KeysUnavailable {
        /// The key looked for.
        kid: String,
    },
    /// The per-context binding failed: missing, malformed, wrong MAC, for
    /// another context, or its key cannot be unwrapped here.
    #[error(transparent)]
    Binding(#[from] BindingError),
}

impl RefError {
    /// The reason code (and thus verdict) of this rejection.
    pub fn reason(&self) -> Reason {
        match self {
            RefError::Jws(j) => match j {
                JwsError::Malformed(_) => Reason::MalformedReference,
                JwsError::AlgorithmNotAllowed(_) => Reason::AlgorithmNotAllowed,
                JwsError::MissingKid => Reason::MissingKid,
                JwsError::UnknownKey(_) => Reason::UnknownKey,
                JwsError::BadSignature => Reason::BadSignature,
                JwsError::WrongType { .. } => Reason::WrongType,
            },
            RefError::IssuerMismatch { .. } => Reason::IssuerMismatch,
            RefError::WrongAudience { .. } => Reason::WrongAudience,
            RefError::Expired { .. } => Reason::Expired,
            RefError::NotYetValid { .. } | RefError::NotBefore { .. } => Reason::NotYetValid,
            RefError::HorizonTooLong { .. } => Reason::HorizonTooLong,
            RefError::WrongDestination { .. } => Reason::WrongDestination,
            RefError::DigestMismatch => Reason::DigestMismatch,
            RefError::ScopeWidened { .. } => Reason::ScopeWidened,
            RefError::DepthExceeded { .. } => Reason::DepthExceeded,
            RefError::ChainInvalid(_) => Reason::ChainInvalid,
            RefError::KeysUnavailable { .. } => Reason::KeysUnavailable,
            RefError::Binding(b) => match b {
                BindingError::Missing(_) => Reason::MissingBinding,
                BindingError::KeyUnavailable(_) => Reason::BindingKeyUnavailable,
                _ => Reason::BadBinding,
            },
        }
    }
}

/// Rules a consumer verifies references against.
#[derive(Debug, Clone)]
pub struct VerifyPolicy {
    /// This consumer's audience (its workload id); must be in `aud`.
    pub audience: String,
    /// Clock leeway for `exp`, `iat` and `nbf` (capped at [`MAX_LEEWAY`]).
    pub leeway: Duration,
    /// Longest accepted `exp - iat`.
    pub max_horizon: Duration,
    /// Local cap on chain depth, on top of the reference's own `max_depth`.
    pub max_depth: u32,
}

impl VerifyPolicy {
    /// Defaults: 30 s leeway, 24 h horizon, 4 hops.
    pub fn new(audience: impl Into<String>) -> Self {
        VerifyPolicy {
            audience: audience.into(),
            leeway: Duration::from_secs(30),
            max_horizon: Duration::from_secs(24 * 3600),
            max_depth: 4,
        }
    }
}

/// A reference that passed every check, with its claims (`Debug` shows the JWS as a hash).
#[derive(Clone)]
pub struct VerifiedRef {
    /// The verified claims.
    pub claims: ContextRefClaims,
    /// The compact JWS as received (the `subject_token` of the exchange).
    pub token: String,
    /// SHA-256 (hex) of the compact JWS: how logs name it.
    pub token_sha256: String,
}

impl std::fmt::Debug for MintedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedRef")
            .field("token", &Redacted(&self.token))
            .field("claims", &self.claims)
            .finish()
    }
}

impl std::fmt::Debug for VerifiedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedRef")
            .field("claims", &self.claims)
            .field("token_sha256", &self.token_sha256)
            .finish()
    }
}

/// Updates a verifier's shared key set when a reference names a key it does
/// not know (a producer that just rotated its key), e.g. by refetching the
/// trust domain's key directory (`txn_token_client::key_directory`).
#[async_trait::async_trait]
pub trait KeyRefresh: Send + Sync {
    /// Asked once per reference whose `kid` (or a prior hop's `kid`) is not in
    /// the key set. [`KeyRefreshed::Updated`]: the shared key set may now
    /// hold it (the verifier verifies once more); [`KeyRefreshed::Unchanged`]:
    /// the source answered (now or within its rate limit) without it, and
    /// the reference is refused exactly as without the refresh;
    /// [`KeyRefreshed::Unavailable`]: the source could not be reached, so
    /// nobody knows whether the key is good — the reference waits
    /// (`keys-unavailable`, a Retry) instead of being quarantined.
    async fn refresh(&self, kid: &str) -> KeyRefreshed;
}

/// What a [`KeyRefresh`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefreshed {
    /// The key set was refetched (or already holds the key): verify again.
    Updated,
    /// The source answered and does not list the key.
    Unchanged,
    /// The source could not be reached (its last fetch failed).
    Unavailable,
}

/// Verifies context references against a swappable set of producer keys.
#[derive(Clone)]
pub struct ContextRefVerifier {
    keys: Arc<ArcSwap<KeySet>>,
    policy: VerifyPolicy,
    refresh: Option<Arc<dyn KeyRefresh>>,
    opener: Option<ContextOpener>,
}

/// What a reference must be bound to.
#[derive(Clone, Copy)]
enum Bound<'a> {
    /// A per-message reference for this destination and payload.
    Message(&'a str, &'a [u8]),
    /// A context reference (its messages carry bindings).
    Context,
    /// Either, unbound (the TTS, which never sees the message).
    Unbound,
}

impl std::fmt::Debug for ContextRefVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextRefVerifier")
            .field("policy", &self.policy)
            .field("refresh", &self.refresh.is_some())
            .field("opener", &self.opener)
            .finish_non_exhaustive()
    }
}

/// The most prior hops [`ContextRefVerifier::verify_refreshing`] looks through
/// for a key it does not know.
const MAX_REFRESH_HOPS: usize = 16;

impl ContextRefVerifier {
    /// A verifier over trusted producer keys.
    pub fn new(keys: KeySet, policy: VerifyPolicy) -> Self {
        ContextRefVerifier {
            keys: Arc::new(ArcSwap::from_pointee(keys)),
            policy,
            refresh: None,
            opener: None,
        }
    }

    /// A verifier sharing a key-set handle that someone else updates (registry, rotation).
    pub fn with_shared_keys(keys: Arc<ArcSwap<KeySet>>, policy: VerifyPolicy) -> Self {
        ContextRefVerifier {
            keys,
            policy,
            refresh: None,
            opener: None,
        }
    }

    /// Asks `refresh` for a key this verifier does not know before refusing a
    /// reference as `unknown-key` (or `chain-invalid`, for a prior hop's key);
    /// see [`verify_refreshing`](Self::verify_refreshing). `refresh` should
    /// update the key set this verifier shares ([`keys`](Self::keys)).
    #[must_use]
    pub fn with_refresh(mut self, refresh: Arc<dyn KeyRefresh>) -> Self {
        self.refresh = Some(refresh);
        self
    }

    /// Accepts per-context references too: their binding keys are unwrapped
    /// with `opener`'s key-agreement keys (see [`crate::ctxbind`]). Without
    /// one, a message with a binding is refused as `binding-key-unavailable`.
    #[must_use]
    pub fn with_context_opener(mut self, opener: ContextOpener) -> Self {
        self.opener = Some(opener);
        self
    }

    /// Verifies like [`verify`](Self::verify); when that fails only because a
    /// `kid` is not in the key set (the reference's own, or a prior hop's in
    /// its `act.ref` history) and a [`KeyRefresh`] is set, asks it once for
    /// that `kid` and, if it reports a change, verifies again against the
    /// refreshed set. Deny by default: a refresh that fails (or changes
    /// nothing) returns the first error, so the reason is the same as without
    /// a refresh.
    ///
    /// # Errors
    ///
    /// The errors of [`verify`](Self::verify), from the second attempt when
    /// there was one.
    pub async fn verify_refreshing(
        &self,
        token: &str,
        destination: &str,
        payload: &[u8],
    ) -> Result<VerifiedRef, RefError> {
        self.verify_message(token, None, destination, payload).await
    }

    /// Verifies a message's reference and, in the per-context mode, its
    /// binding (the `ztauth-ctx-bind` header), refreshing an unknown key as
    /// [`verify_refreshing`](Self::verify_refreshing) does.
    ///
    /// # Errors
    ///
    /// The errors of [`verify_message_at`](Self::verify_message_at).
    pub async fn verify_message(
        &self,
        token: &str,
        binding: Option<&str>,
        destination: &str,
        payload: &[u8],
    ) -> Result<VerifiedRef, RefError> {
        let first = self.verify_message_at(token, binding, destination, payload, unix_now());
        let (Err(err), Some(refresh)) = (&first, &self.refresh) else {
            return first;
        };
        let Some(kid) = self.unknown_kid(err, token) else {
            return first;
        };
        match refresh.refresh(&kid).await {
            KeyRefreshed::Updated => {
                self.verify_message_at(token, binding, destination, payload, unix_now())
            }
            KeyRefreshed::Unchanged => {
                tracing::debug!(%kid, "unknown kid: the key source does not list it");
                first
            }
            KeyRefreshed::Unavailable => Err(RefError::KeysUnavailable { kid }),
        }
    }

    /// The `kid` whose absence from the key set explains `err`, if any: the
    /// reference's own key (`unknown-key`), or for `chain-invalid` the first
    /// prior hop (read without verifying: only to know which key to ask for)
    /// whose key is not in the set.
    fn unknown_kid(&self, err: &RefError, token: &str) -> Option<String> {
        match err {
            RefError::Jws(JwsError::UnknownKey(kid)) => Some(kid.clone()),
            RefError::ChainInvalid(_) => {
                let keys = self.keys.load();
                let mut current = token.to_string();
                for _ in 0..MAX_REFRESH_HOPS {
                    let claims: ContextRefClaims =
                        jws::parse(&current, CTX_REF_TYP).ok()?.claims().ok()?;
                    current = claims.act?.reference?;
                    let kid = jws::parse(&current, CTX_REF_TYP).ok()?.header.kid?;
                    if keys.get(&kid).is_none() {
                        return Some(kid);
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// The shared key-set handle, to add or revoke keys at run time.
    pub fn keys(&self) -> &Arc<ArcSwap<KeySet>> {
        &self.keys
    }

    /// The policy in force.
    pub fn policy(&self) -> &VerifyPolicy {
        &self.policy
    }

    /// Verifies `token` for a message read from `destination` with `payload`, now.
    ///
    /// # Errors
    ///
    /// Same as [`verify_at`](Self::verify_at), at the current time.
    pub fn verify(
        &self,
        token: &str,
        destination: &str,
        payload: &[u8],
    ) -> Result<VerifiedRef, RefError> {
        self.verify_at(token, destination, payload, unix_now())
    }

    /// Verifies at an explicit time (seconds since the epoch).
    ///
    /// # Errors
    ///
    /// Returns a [`RefError`] when the reference fails any check: [`RefError::Jws`] if it is
    /// malformed, uses a disallowed algorithm, names an unknown key or has a bad signature;
    /// [`RefError::IssuerMismatch`] if `iss` is not the signing key's owner;
    /// [`RefError::WrongAudience`]; [`RefError::Expired`], [`RefError::NotYetValid`],
    /// [`RefError::NotBefore`] or [`RefError::HorizonTooLong`] for its time window;
    /// [`RefError::WrongDestination`] or [`RefError::DigestMismatch`] if it is not bound to
    /// `destination` and `payload`; and the chain errors of [`check_chain`].
    pub fn verify_at(
        &self,
        token: &str,
        destination: &str,
        payload: &[u8],
        now: i64,
    ) -> Result<VerifiedRef, RefError> {
        self.verify_message_at(token, None, destination, payload, now)
    }

    /// Verifies a message's reference at `now`: per message when `binding`
    /// is `None`, else the context reference `token` (verified and its key
    /// unwrapped once, then cached) and the message's `binding`.
    ///
    /// # Errors
    ///
    /// The errors of [`verify_at`](Self::verify_at), and [`RefError::Binding`]: a context
    /// reference without a binding or a binding with a per-message reference
    /// (`missing-binding`); a binding that is malformed, fails its MAC, names
    /// another context or was bound outside the context's lifetime
    /// (`bad-binding`); a binding key this consumer cannot unwrap
    /// (`binding-key-unavailable`). `dst` and `dig` of the binding are
    /// checked as a per-message reference's are.
    pub fn verify_message_at(
        &self,
        token: &str,
        binding: Option<&str>,
        destination: &str,
        payload: &[u8],
        now: i64,
    ) -> Result<VerifiedRef, RefError> {
        let keys = self.keys.load_full();
        let Some(binding) = binding else {
            let bound = Bound::Message(destination, payload);
            return self.verify_inner(token, &self.policy.audience, bound, &keys, now);
        };
        let opener = self.opener.as_ref().ok_or(BindingError::KeyUnavailable(
            "this consumer has no key-agreement key".into(),
        ))?;
        let leeway = self.policy.leeway.min(MAX_LEEWAY).as_secs() as i64;
        let opened = match opener.cached(token, &keys) {
            Some(o) => {
                let exp = o.claims().exp;
                if exp.saturating_add(leeway) <= now {
                    return Err(RefError::Expired { exp, now });
                }
                o
            }
            None => {
                let audience = &self.policy.audience;
                let verified = self.verify_inner(token, audience, Bound::Context, &keys, now)?;
                opener.open(token, verified.claims, &keys)?
            }
        };
        let verified = opened.bind(token, binding, now, leeway)?;
        check_binding(&verified.claims, destination, payload)?;
        Ok(verified)
    }

    /// Verifies everything except the message binding (`dst`, `dig`), for a party
    /// that never sees the message: the TTS checks a reference presented as
    /// `subject_token` this way, with `audience` = the requesting workload.
    ///
    /// # Errors
    ///
    /// The same errors as [`verify_at`](Self::verify_at), except [`RefError::WrongDestination`] and
    /// [`RefError::DigestMismatch`], which are not checked here.
    pub fn verify_unbound(&self, token: &str, audience: &str) -> Result<VerifiedRef, RefError> {
        let keys = self.keys.load_full();
        self.verify_inner(token, audience, Bound::Unbound, &keys, unix_now())
    }

    fn verify_inner(
        &self,
        token: &str,
        audience: &str,
        bound: Bound<'_>,
        keys: &KeySet,
        now: i64,
    ) -> Result<VerifiedRef, RefError> {
        // parse
        let parsed = jws::parse(token, CTX_REF_TYP)?;
        // verify signature
        let key = parsed.verify(keys)?;
        let claims: ContextRefClaims = parsed.claims()?;
        // the shape the binding mode requires: a context reference carries
        // `cnf` and no `dst`/`dig`, a per-message one no `cnf`
        match (bound, &claims.cnf) {
            (Bound::Message(..), Some(_)) => {
                return Err(BindingError::Missing(
                    "a context reference (cnf) came without a ztauth-ctx-bind header",
                )
                .into());
            }
            (Bound::Context, None) => {
                return Err(BindingError::Missing(
                    "a ztauth-ctx-bind header came with a per-message reference",
                )
                .into());
            }
            (Bound::Context | Bound::Unbound, Some(_))
                if !claims.dst.is_empty() || !claims.dig.is_empty() =>
            {
                return Err(BindingError::Malformed(
                    "a context reference carries no dst or dig".into(),
                )
                .into());
            }
            _ => {}
        }
        // decide: issuer binding, audience, time, binding, chain
        // Deny by default: a reference key must name the workload that owns it
        // (`KeySet::insert_workload_key`); an unowned key could sign for any `iss`.
        if key.owner.as_deref() != Some(claims.iss.as_str()) {
            return Err(RefError::IssuerMismatch {
                iss: claims.iss,
                kid: parsed.header.kid.unwrap_or_default(),
            });
        }
        if !claims.aud.iter().any(|a| a == audience) {
            return Err(RefError::WrongAudience {
                aud: claims.aud,
                expected: audience.to_string(),
            });
        }
        let leeway = self.policy.leeway.min(MAX_LEEWAY).as_secs() as i64;
        if claims.iat <= 0 || claims.exp < claims.iat {
            return Err(RefError::Jws(JwsError::Malformed(format!(
                "iat {} and exp {} are not a time window",
                claims.iat, claims.exp
            ))));
        }
        if claims.iat > now.saturating_add(leeway) {
            return Err(RefError::NotYetValid {
                iat: claims.iat,
                now,
            });
        }
        if let Some(nbf) = claims.nbf
            && nbf > now.saturating_add(leeway)
        {
            return Err(RefError::NotBefore { nbf, now });
        }
        if claims.exp.saturating_add(leeway) <= now {
            return Err(RefError::Expired {
                exp: claims.exp,
                now,
            });
        }
        let lifetime = claims.exp - claims.iat;
        if lifetime > self.policy.max_horizon.as_secs() as i64 {
            return Err(RefError::HorizonTooLong {
                lifetime,
                max: self.policy.max_horizon.as_secs(),
            });
        }
        if let Bound::Message(destination, payload) = bound {
            check_binding(&claims, destination, payload)?;
        }
        check_chain(&claims, self.policy.max_depth)?;
        self.check_history(&claims, keys, now)?;
        Ok(VerifiedRef {
            claims,
            token_sha256: sha256_hex(token.as_bytes()),
            token: token.to_string(),
        })
    }
}

impl ContextRefVerifier {
    /// Verifies the prior hops a derived reference carries: the parent reference
    /// must be signed by the workload the chain names (a registered key), be
    /// addressed to the current signer, and agree on subject, transaction,
    /// scope, depth and `max_depth`; recursively to the origin. A fabricated or
    /// revoked hop makes the chain invalid.
    fn check_history(
        &self,
        claims: &ContextRefClaims,
        keys: &KeySet,
        now: i64,
    ) -> Result<(), RefError> {
        let Some(actor) = &claims.act else {
            return Ok(());
        };
        let invalid = |why: String| RefError::ChainInvalid(why);
        let token = actor
            .reference
            .as_deref()
            .ok_or_else(|| invalid(format!("hop {:?} carries no reference", actor.sub)))?;
        let parsed = jws::parse(token, CTX_REF_TYP)
            .map_err(|e| invalid(format!("hop {:?}: {e}", actor.sub)))?;
        let key = parsed
            .verify(keys)
            .map_err(|e| invalid(format!("hop {:?}: {e}", actor.sub)))?;
        let parent: ContextRefClaims = parsed
            .claims()
            .map_err(|e| invalid(format!("hop {:?}: {e}", actor.sub)))?;
        if key.owner.as_deref() != Some(parent.iss.as_str()) || parent.iss != actor.sub {
            return Err(invalid(format!(
                "hop {:?} was not signed by that workload",
                actor.sub
            )));
        }
        let consistent = parent.aud.iter().any(|a| a == &claims.iss)
            && parent.sub == claims.sub
            && parent.sub_kind == claims.sub_kind
            && parent.txn == claims.txn
            && parent.scope == actor.scope
            // checked: a signed parent may claim any depth, u32::MAX included
            && parent.depth.checked_add(1) == Some(claims.depth)
            && parent.max_depth == claims.max_depth;
        if !consistent {
            return Err(invalid(format!(
                "hop {:?} does not match its successor",
                actor.sub
            )));
        }
        let leeway = self.policy.leeway.min(MAX_LEEWAY).as_secs() as i64;
        if parent.exp.saturating_add(leeway) <= now {
            return Err(invalid(format!("hop {:?} expired", actor.sub)));
        }
        let mut expected_rest = actor.act.clone();
        let mut actual_rest = parent.act.clone();
        if let Some(a) = actual_rest.as_mut() {
            a.reference = None;
        }
        if let Some(a) = expected_rest.as_mut() {
            a.reference = None;
        }
        if expected_rest.map(|b| *b) != actual_rest {
            return Err(invalid(format!("hop {:?} history differs", actor.sub)));
        }
        check_chain(&parent, self.policy.max_depth)?;
        self.check_history(&parent, keys, now)
    }
}

/// `dst` names `destination` and `dig` is the payload's digest.
fn check_binding(
    claims: &ContextRefClaims,
    destination: &str,
    payload: &[u8],
) -> Result<(), RefError> {
    if claims.dst != destination {
        return Err(RefError::WrongDestination {
            dst: claims.dst.clone(),
            expected: destination.to_string(),
        });
    }
    if !digest_matches(&claims.dig, payload) {
        return Err(RefError::DigestMismatch);
    }
    Ok(())
}

fn digest_matches(dig: &str, payload: &[u8]) -> bool {
    let actual = sha256_b64url(payload);
    // Both are public values; a constant-time compare still costs nothing here.
    actual.len() == dig.len()
        && actual
            .bytes()
            .zip(dig.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Chain rules: `depth` equals the number of prior hops, is within both
/// maxima, and scope never widens from the origin to the current hop.
///
/// # Errors
///
/// Returns [`RefError::ChainInvalid`] if `depth` differs from the number of hops in `act` or a hop
/// has an empty `sub`, [`RefError::DepthExceeded`] if `depth` is above `max_depth` or `local_max`,
/// and [`RefError::ScopeWidened`] if a hop's scope is wider than the one before it.
pub fn check_chain(claims: &ContextRefClaims, local_max: u32) -> Result<(), RefError> {
    let hops: Vec<&Actor> = claims.act.iter().flat_map(|a| a.iter()).collect();
    if hops.len() != claims.depth as usize {
        return Err(RefError::ChainInvalid(format!(
            "depth {} but {} prior hops in act",
            claims.depth,
            hops.len()
        )));
    }
    let max = claims.max_depth.min(local_max);
    if claims.depth > max {
        return Err(RefError::DepthExceeded {
            depth: claims.depth,
            max,
        });
    }
    let mut narrower = claims.scope_set();
    let mut at = claims.iss.clone();
    for hop in hops {
        if hop.sub.is_empty() {
            return Err(RefError::ChainInvalid("empty actor".into()));
        }
        let wider = Scope::parse(&hop.scope);
        if !narrower.is_subset(&wider) {
            return Err(RefError::ScopeWidened { at });
        }
        narrower = wider;
        at = hop.sub.clone();
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod nbf_tests {
    use super::*;
    use crate::keys::SigningAlg;

    const PRODUCER: &str = "spiffe://example.org/orders";
    const CONSUMER: &str = "spiffe://example.org/billing";
    const DST: &str = "orders";
    const PAYLOAD: &[u8] = b"{}";

    fn setup() -> (ContextRefMinter, ContextRefVerifier, ContextRefClaims) {
        let key = SigningKey::generate(SigningAlg::ES256, "orders-1").unwrap();
        let mut keys = KeySet::new();
        keys.insert_workload_key(PRODUCER, &key).unwrap();
        let minter = ContextRefMinter::new(PRODUCER, key, Duration::from_secs(600));
        let verifier = ContextRefVerifier::new(keys, VerifyPolicy::new(CONSUMER));
        let claims = minter
            .mint(&MintRequest {
                subject: "alice",
                sub_kind: SubjectKind::Human,
                audience: &[CONSUMER.to_string()],
                scope: &Scope::parse("orders.read"),
                txn: "txn-1",
                destination: DST,
                payload: PAYLOAD,
            })
            .unwrap()
            .claims;
        (minter, verifier, claims)
    }

    fn verify_at(
        minter: &ContextRefMinter,
        verifier: &ContextRefVerifier,
        claims: &ContextRefClaims,
        now: i64,
    ) -> Result<VerifiedRef, RefError> {
        let token = minter.sign(claims.clone()).unwrap().token;
        verifier.verify_at(&token, DST, PAYLOAD, now)
    }

    #[test]
    fn minted_references_carry_no_nbf() {
        let (minter, _, claims) = setup();
        assert_eq!(claims.nbf, None);
        let token = minter.sign(claims).unwrap().token;
        let parsed = jws::parse(&token, CTX_REF_TYP).unwrap();
        let raw: serde_json::Value = parsed.claims().unwrap();
        assert!(raw.get("nbf").is_none(), "absent nbf is not serialized");
    }

    #[test]
    fn future_nbf_beyond_leeway_is_not_yet_valid() {
        let (minter, verifier, mut claims) = setup();
        let now = claims.iat;
        claims.nbf = Some(now + 31);
        let err = verify_at(&minter, &verifier, &claims, now).unwrap_err();
        assert_eq!(err, RefError::NotBefore { nbf: now + 31, now });
        assert_eq!(err.reason(), Reason::NotYetValid);
        assert_eq!(err.reason().code(), "not-yet-valid");
        // within the 30 s leeway, and once the time has come, it verifies
        claims.nbf = Some(now + 30);
        assert!(verify_at(&minter, &verifier, &claims, now).is_ok());
        claims.nbf = Some(now + 31);
        assert!(verify_at(&minter, &verifier, &claims, now + 1).is_ok());
        // a past nbf is fine
        claims.nbf = Some(now - 100);
        assert!(verify_at(&minter, &verifier, &claims, now).is_ok());
    }

    #[test]
    fn leeway_for_nbf_is_capped_at_30_seconds() {
        let (minter, verifier, mut claims) = setup();
        let mut policy = verifier.policy().clone();
        policy.leeway = Duration::from_secs(3600);
        let lenient = ContextRefVerifier::with_shared_keys(verifier.keys().clone(), policy);
        let now = claims.iat;
        claims.nbf = Some(now + 31);
        assert!(matches!(
            verify_at(&minter, &lenient, &claims, now),
            Err(RefError::NotBefore { .. })
        ));
    }

    #[test]
    fn extreme_nbf_values_do_not_overflow() {
        let (minter, verifier, mut claims) = setup();
        let now = claims.iat;
        claims.nbf = Some(i64::MAX);
        assert!(matches!(
            verify_at(&minter, &verifier, &claims, now),
            Err(RefError::NotBefore { .. })
        ));
        // even when "now" itself is at the end of time
        assert!(matches!(
            verify_at(&minter, &verifier, &claims, i64::MAX),
            Err(RefError::Expired { .. })
        ));
        claims.nbf = Some(i64::MIN);
        assert!(verify_at(&minter, &verifier, &claims, now).is_ok());
    }

    #[test]
    fn unbound_verification_honours_nbf_too() {
        let (minter, verifier, mut claims) = setup();
        claims.nbf = Some(unix_now() + 300);
        let token = minter.sign(claims).unwrap().token;
        assert!(matches!(
            verifier.verify_unbound(&token, CONSUMER),
            Err(RefError::NotBefore { .. })
        ));
    }
}
