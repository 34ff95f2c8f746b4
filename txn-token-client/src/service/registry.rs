//! The workload registry: each workload's public keys (bound to its id as the
//! key owner, so a key only ever speaks for its workload) and the scopes it may
//! be granted. Shared with the context-reference verifier, so producer keys
//! and requester keys are one set.

use std::collections::HashMap;
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
    write: Mutex<()>,
}

impl Default for WorkloadRegistry {
    fn default() -> Self {
        WorkloadRegistry {
            keys: Arc::new(ArcSwap::from_pointee(KeySet::new())),
            scopes: RwLock::new(HashMap::new()),
            extra_known: RwLock::new(Scope::default()),
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
}
