//! The workload registry: each workload's public keys (bound to its id as the
//! key owner, so a key only ever speaks for its workload) and the scopes it may
//! be granted. Shared with the context-reference verifier, so producer keys
//! and requester keys are one set.
//!
//! A workload can be **removed** (its keys and allowance are gone: nothing it
//! ever signed verifies any more) or **suspended** (keys kept, trust withdrawn:
//! it gets no Txn-Token and no chain that passes through it is honoured).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use elevate_core::keys::{KeyError, KeySet};
use elevate_core::scope::Scope;
use jsonwebtoken::jwk::Jwk;
use parking_lot::{Mutex, RwLock};

/// Registered workloads, their keys and allowed scopes.
#[derive(Debug)]
pub struct WorkloadRegistry {
    keys: Arc<ArcSwap<KeySet>>,
    scopes: RwLock<HashMap<String, Scope>>,
    extra_known: RwLock<Scope>,
    suspended: RwLock<HashSet<String>>,
    write: Mutex<()>,
}

impl Default for WorkloadRegistry {
    fn default() -> Self {
        WorkloadRegistry {
            keys: Arc::new(ArcSwap::from_pointee(KeySet::new())),
            scopes: RwLock::new(HashMap::new()),
            extra_known: RwLock::new(Scope::default()),
            suspended: RwLock::new(HashSet::new()),
            write: Mutex::new(()),
        }
    }
}

impl WorkloadRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared key-set handle (keys owned by workload ids).
    pub fn keys(&self) -> &Arc<ArcSwap<KeySet>> {
        &self.keys
    }

    /// Registers (or updates) a workload with one public key and its allowed scopes.
    /// A `kid` already registered to another workload is refused.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if the `kid` is registered to another workload, or the JWK
    /// has no `kid`, carries private material, or is not an EC P-256 or OKP Ed25519 key.
    pub fn register(&self, id: &str, jwk: &Jwk, allowed: &Scope) -> Result<(), KeyError> {
        let _w = self.write.lock();
        let mut set = (**self.keys.load()).clone();
        if let Some(kid) = jwk.common.key_id.as_deref()
            && let Some(existing) = set.get(kid)
            && existing.owner.as_deref() != Some(id)
        {
            return Err(KeyError::InvalidJwk {
                kid: Some(kid.to_string()),
                reason: "kid already registered to another workload".into(),
            });
        }
        set.insert_jwk_owned(jwk, Some(id.to_string()))?;
        self.keys.store(Arc::new(set));
        self.scopes.write().insert(id.to_string(), allowed.clone());
        Ok(())
    }

    /// Removes a workload: every key it owns and its allowed scopes. Returns
    /// false when it was not registered. References it signed no longer verify.
    pub fn remove(&self, id: &str) -> bool {
        let _w = self.write.lock();
        let mut set = (**self.keys.load()).clone();
        let owned: Vec<String> = set
            .kids()
            .filter(|kid| set.get(kid).and_then(|k| k.owner.as_deref()) == Some(id))
            .map(str::to_string)
            .collect();
        for kid in &owned {
            set.remove(kid);
        }
        self.keys.store(Arc::new(set));
        self.suspended.write().remove(id);
        self.scopes.write().remove(id).is_some() || !owned.is_empty()
    }

    /// Withdraws trust from a registered workload (keys kept). Returns false
    /// when it is not registered.
    pub fn suspend(&self, id: &str) -> bool {
        if !self.scopes.read().contains_key(id) {
            return false;
        }
        self.suspended.write().insert(id.to_string());
        true
    }

    /// Restores trust in a suspended workload. Returns false when it was not suspended.
    pub fn reinstate(&self, id: &str) -> bool {
        self.suspended.write().remove(id)
    }

    /// True when `id` is registered and not suspended.
    pub fn is_trusted(&self, id: &str) -> bool {
        self.scopes.read().contains_key(id) && !self.suspended.read().contains(id)
    }

    /// True when `id` is registered and suspended.
    pub fn is_suspended(&self, id: &str) -> bool {
        self.suspended.read().contains(id)
    }

    /// Adds scopes that are known (valid to ask for) without being allowed to anyone yet.
    pub fn add_known_scopes(&self, scopes: &Scope) {
        let mut known = self.extra_known.write();
        *known = known.iter().chain(scopes.iter()).collect();
    }

    /// The scopes `workload` may be granted, or `None` when it is not registered.
    pub fn allowed(&self, workload: &str) -> Option<Scope> {
        self.scopes.read().get(workload).cloned()
    }

    /// True when `token` is a scope anyone could be granted (or was declared known).
    pub fn is_known_scope(&self, token: &str) -> bool {
        self.extra_known.read().contains(token)
            || self.scopes.read().values().any(|s| s.contains(token))
    }

    /// Number of registered workloads.
    pub fn len(&self) -> usize {
        self.scopes.read().len()
    }

    /// True when no workload is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elevate_core::keys::{SigningAlg, SigningKey};

    #[test]
    fn keys_are_owned_and_kids_not_shared() {
        let r = WorkloadRegistry::new();
        let k = SigningKey::generate(SigningAlg::ES256, "k1").unwrap();
        r.register("spiffe://d/a", k.public_jwk(), &Scope::parse("x y"))
            .unwrap();
        assert_eq!(
            r.keys().load().get("k1").unwrap().owner.as_deref(),
            Some("spiffe://d/a")
        );
        let k2 = SigningKey::generate(SigningAlg::ES256, "k1").unwrap();
        assert!(
            r.register("spiffe://d/b", k2.public_jwk(), &Scope::parse("x"))
                .is_err()
        );
        assert!(r.is_known_scope("y"));
        assert!(!r.is_known_scope("z"));
        r.add_known_scopes(&Scope::parse("z"));
        assert!(r.is_known_scope("z"));
        assert_eq!(r.allowed("spiffe://d/a"), Some(Scope::parse("x y")));
        assert_eq!(r.allowed("spiffe://d/b"), None);
    }

    #[test]
    fn remove_drops_keys_and_suspend_keeps_them() {
        let r = WorkloadRegistry::new();
        let a = SigningKey::generate(SigningAlg::ES256, "a-1").unwrap();
        let b = SigningKey::generate(SigningAlg::EdDSA, "b-1").unwrap();
        r.register("spiffe://d/a", a.public_jwk(), &Scope::parse("x"))
            .unwrap();
        r.register("spiffe://d/b", b.public_jwk(), &Scope::parse("x"))
            .unwrap();
        assert!(r.is_trusted("spiffe://d/a"));
        assert!(r.suspend("spiffe://d/a"));
        assert!(!r.is_trusted("spiffe://d/a"));
        assert!(
            r.keys().load().get("a-1").is_some(),
            "suspension keeps keys"
        );
        assert!(r.reinstate("spiffe://d/a"));
        assert!(r.is_trusted("spiffe://d/a"));
        assert!(!r.suspend("spiffe://d/nobody"));
        assert!(r.remove("spiffe://d/a"));
        assert!(r.keys().load().get("a-1").is_none());
        assert!(r.keys().load().get("b-1").is_some());
        assert!(!r.is_trusted("spiffe://d/a"));
        assert_eq!(r.allowed("spiffe://d/a"), None);
        assert!(!r.remove("spiffe://d/a"));
    }
}
