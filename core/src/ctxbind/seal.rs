//! The producer side: one signed context reference per (origin context,
//! audience, parent hop), reused for every message of that context until it
//! is renewed, and a MAC per message.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use josekit::jwe::JweHeader;
use sha2::{Digest, Sha256};

use super::keys::{AudienceKeys, CONTENT_ENC};
use super::{BINDING_HEADER_JSON, BindingClaims, BindingKeyJwk, Confirmation};
use crate::ctxref::{ContextRefClaims, ContextRefMinter, MintError, MintedRef, unix_now};
use crate::keys::sha256_b64url;

/// A context reference is renewed after this fraction of the producer's
/// async horizon, so that a message bound late in a context's life still
/// has at least 90 % of the horizon before it expires.
pub const DEFAULT_RENEW_AFTER_FRACTION: f64 = 0.1;

/// The most contexts a producer keeps open at once (least recently used go first).
const MAX_SESSIONS: u64 = 10_000;

/// One open context: its signed reference and the key messages are MACed with.
struct Session {
    token: String,
    ref_hash: String,
    key: hmac::Key,
    claims: ContextRefClaims,
}

/// A message sealed in the per-context mode.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The reference (the context's) and the message's view of its claims
    /// (`jti`, `iat`, `dst`, `dig` are the message's).
    pub reference: MintedRef,
    /// The binding for the `ztauth-ctx-bind` header.
    pub binding: String,
}

/// Binds messages per context for one producer: keeps the open contexts
/// (bounded, renewed after a fraction of the horizon) and the audiences'
/// key-agreement keys (swappable at run time).
#[derive(Clone)]
pub struct ContextBinder {
    audiences: Arc<ArcSwap<AudienceKeys>>,
    sessions: moka::sync::Cache<[u8; 32], Arc<Session>>,
    /// Contexts seen fewer than `open_after` times, with their count.
    pending: moka::sync::Cache<[u8; 32], u32>,
    renew_after: Duration,
    open_after: u32,
}

/// A context is opened (signed, its key wrapped) on its second message by
/// default: a context that only ever has one message (a distinct origin
/// transaction per message) is signed per message and pays no key wrap or
/// unwrap, which cost more than the signature they save (docs/BENCHMARKS.md).
pub const DEFAULT_OPEN_AFTER: u32 = 2;

impl std::fmt::Debug for ContextBinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextBinder")
            .field("audiences", &self.audiences.load())
            .field("renew_after", &self.renew_after)
            .field("open_after", &self.open_after)
            .field("open_contexts", &self.sessions.entry_count())
            .finish()
    }
}

impl ContextBinder {
    /// A binder wrapping to `audiences`' keys; contexts are renewed after
    /// [`DEFAULT_RENEW_AFTER_FRACTION`] of `horizon` (the minter's TTL), at
    /// least every second.
    pub fn new(audiences: AudienceKeys, horizon: Duration) -> Self {
        let renew_after = horizon
            .mul_f64(DEFAULT_RENEW_AFTER_FRACTION)
            .max(Duration::from_secs(1));
        Self::with_shared_audiences(Arc::new(ArcSwap::from_pointee(audiences)), renew_after)
    }

    /// A binder sharing an audience-key handle someone else updates, renewing
    /// each context after `renew_after`.
    pub fn with_shared_audiences(
        audiences: Arc<ArcSwap<AudienceKeys>>,
        renew_after: Duration,
    ) -> Self {
        ContextBinder {
            audiences,
            sessions: moka::sync::Cache::builder()
                .max_capacity(MAX_SESSIONS)
                .time_to_live(renew_after)
                .build(),
            pending: moka::sync::Cache::builder()
                .max_capacity(MAX_SESSIONS)
                .time_to_live(renew_after)
                .build(),
            renew_after,
            open_after: DEFAULT_OPEN_AFTER,
        }
    }

    /// Opens a context on its `n`-th message (within one renewal period);
    /// the messages before it are signed per message. 1: on the first
    /// message (every message of a per-context producer is bound).
    #[must_use]
    pub fn with_open_after(mut self, n: u32) -> Self {
        self.open_after = n.max(1);
        self
    }

    /// The message of a context on which it is opened.
    pub fn open_after(&self) -> u32 {
        self.open_after
    }

    /// The audience keys in force (swap to add or rotate one).
    pub fn audiences(&self) -> &Arc<ArcSwap<AudienceKeys>> {
        &self.audiences
    }

    /// How long one context reference is used before a new one is signed.
    pub fn renew_after(&self) -> Duration {
        self.renew_after
    }

    /// Seals `claims` (what a per-message reference would carry) in the
    /// per-context mode, or `None` when that does not apply: more than one
    /// audience, or an audience without a key-agreement key (the caller then
    /// signs per message).
    ///
    /// # Errors
    ///
    /// [`MintError::Signing`] if a new context reference cannot be signed or
    /// its key wrapped, or the binding cannot be serialized.
    pub fn seal(
        &self,
        minter: &ContextRefMinter,
        claims: &ContextRefClaims,
    ) -> Result<Option<Sealed>, MintError> {
        let audiences = self.audiences.load();
        let wrap_to = match claims.aud.as_slice() {
            [audience] => audiences.get(audience),
            _ => None,
        };
        let Some(wrap_to) = wrap_to else {
            return Ok(None);
        };
        let id = session_id(claims, &wrap_to.kid);
        let now = unix_now();
        let session = match self.sessions.get(&id) {
            Some(s) if s.claims.exp > now => s,
            _ if !self.due(id) => return Ok(None),
            _ => {
                let s = Arc::new(open_session(minter, claims, wrap_to)?);
                self.sessions.insert(id, s.clone());
                s
            }
        };
        let binding = BindingClaims {
            reference: session.ref_hash.clone(),
            dst: claims.dst.clone(),
            dig: claims.dig.clone(),
            jti: claims.jti.clone(),
            iat: claims.iat,
        };
        let token = sign_binding(&session.key, &binding)?;
        let mut view = session.claims.clone();
        view.jti = binding.jti;
        view.iat = binding.iat;
        view.dst = binding.dst;
        view.dig = binding.dig;
        Ok(Some(Sealed {
            reference: MintedRef {
                token: session.token.clone(),
                claims: view,
            },
            binding: token,
        }))
    }
}

impl ContextBinder {
    /// Counts one more message of a context that is not open; true when
    /// this one should open it.
    fn due(&self, id: [u8; 32]) -> bool {
        if self.open_after <= 1 {
            return true;
        }
        let seen = self.pending.get(&id).unwrap_or(0) + 1;
        if seen >= self.open_after {
            self.pending.invalidate(&id);
            true
        } else {
            self.pending.insert(id, seen);
            false
        }
    }
}

/// What identifies a context: everything of the reference but the message's
/// own fields (`jti`, `iat`, `exp`, `dst`, `dig`), and the key wrapped to.
fn session_id(c: &ContextRefClaims, kid: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    let parent = c.act.as_ref().and_then(|a| a.reference.as_deref());
    for part in [
        c.iss.as_str(),
        c.sub.as_str(),
        c.sub_kind.as_str(),
        c.scope.as_str(),
        c.txn.as_str(),
        parent.unwrap_or(""),
        kid,
    ]
    .into_iter()
    .chain(c.aud.iter().map(String::as_str))
    {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update(c.depth.to_be_bytes());
    h.update(c.max_depth.to_be_bytes());
    h.finalize().into()
}

/// Signs a new context reference for `claims`' context with a fresh binding
/// key wrapped to `wrap_to`.
fn open_session(
    minter: &ContextRefMinter,
    claims: &ContextRefClaims,
    wrap_to: &super::keys::AudienceKey,
) -> Result<Session, MintError> {
    let signing = |e: String| MintError::Signing(format!("context binding: {e}"));
    let mut secret = [0u8; 32];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| signing("no randomness".into()))?;
    let jwk = serde_json::to_vec(&BindingKeyJwk {
        kty: "oct".into(),
        alg: "HS256".into(),
        k: URL_SAFE_NO_PAD.encode(secret),
    })
    .map_err(|e| signing(e.to_string()))?;
    let mut header = JweHeader::new();
    header.set_content_encryption(CONTENT_ENC);
    header.set_content_type("jwk+json");
    header.set_key_id(wrap_to.kid.clone());
    let jwe = josekit::jwe::serialize_compact(&jwk, &header, &wrap_to.encrypter)
        .map_err(|e| signing(e.to_string()))?;
    let mut context = claims.clone();
    context.jti = uuid::Uuid::now_v7().to_string();
    context.dst = String::new();
    context.dig = String::new();
    context.cnf = Some(Confirmation { jwe });
    let signed = minter.sign(context)?;
    Ok(Session {
        ref_hash: sha256_b64url(signed.token.as_bytes()),
        token: signed.token,
        key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
        claims: signed.claims,
    })
}

/// `b64(header).b64(claims).b64(HMAC-SHA256(key, signing input))`.
fn sign_binding(key: &hmac::Key, claims: &BindingClaims) -> Result<String, MintError> {
    let payload =
        serde_json::to_vec(claims).map_err(|e| MintError::Signing(format!("binding: {e}")))?;
    let mut token = URL_SAFE_NO_PAD.encode(BINDING_HEADER_JSON);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let tag = hmac::sign(key, token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut token);
    Ok(token)
}
