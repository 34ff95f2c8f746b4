//! The workload registry: each workload's public keys (bound to its id as the
//! key owner, so a key only ever speaks for its workload) and the scopes it may
//! be granted. Shared with the context-reference verifier, so producer keys
//! and requester keys are one set.
//!
//! A workload may hold **several keys** at once (rollover: the old and the
//! new key both verify while messages signed by the old one are in flight):
//! [`WorkloadRegistry::add_key`], [`WorkloadRegistry::remove_key`], or
//! [`WorkloadRegistry::replace_keys`] (what a reloaded key file does). The
//! registry keeps every public JWK it was given, to publish them as the
//! trust domain's key directory ([`WorkloadRegistry::workload_jwks`]).
//!
//! A workload can be **removed** (its keys and allowance are gone: nothing it
//! ever signed verifies any more) or **suspended** (keys kept, trust withdrawn:
//! it gets no Txn-Token and no chain that passes through it is honoured).
//!
//! Each workload has the **client authentication methods** it may use at
//! the token endpoint ([`WorkloadRegistry::set_auth_methods`]):
//! `private_key_jwt` unless it opts into something else, deny by default.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use elevate_core::keys::{KeyError, KeySet};
use elevate_core::scope::Scope;
use jsonwebtoken::jwk::Jwk;
use parking_lot::{Mutex, RwLock};
use txn_token_client::protocol::ClientAuthMethod;

/// A registered public key: the workload that owns it and the JWK as given.
#[derive(Debug, Clone)]
struct OwnedJwk {
    owner: String,
    jwk: Jwk,
}

/// One workload of a whole registry ([`WorkloadRegistry::replace_all`]).
#[derive(Debug, Clone)]
pub struct WorkloadEntry {
    /// Workload id.
    pub id: String,
    /// Its public keys.
    pub jwks: Vec<Jwk>,
    /// Scopes it may be granted.
    pub allowed: Scope,
    /// Client authentication methods (`None`: `private_key_jwt` only).
    pub auth_methods: Option<Vec<ClientAuthMethod>>,
    /// Trust withdrawn, keys kept.
    pub suspended: bool,
}

/// Registered workloads, their keys and allowed scopes.
#[derive(Debug)]
pub struct WorkloadRegistry {
    keys: Arc<ArcSwap<KeySet>>,
    /// Every registered public JWK by `kid` (changed only under `write`,
    /// always together with `keys`).
    jwks: RwLock<BTreeMap<String, OwnedJwk>>,
    scopes: RwLock<HashMap<String, Scope>>,
    extra_known: RwLock<Scope>,
    suspended: RwLock<HashSet<String>>,
    /// Client authentication methods of the workloads that opted into a set
    /// other than the default (`private_key_jwt` only).
    auth_methods: RwLock<HashMap<String, Vec<ClientAuthMethod>>>,
    write: Mutex<()>,
}

impl Default for WorkloadRegistry {
    fn default() -> Self {
        WorkloadRegistry {
            keys: Arc::new(ArcSwap::from_pointee(KeySet::new())),
            jwks: RwLock::new(BTreeMap::new()),
            scopes: RwLock::new(HashMap::new()),
            extra_known: RwLock::new(Scope::default()),
            suspended: RwLock::new(HashSet::new()),
            auth_methods: RwLock::new(HashMap::new()),
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
    /// A `kid` already registered to another workload is refused. Keys the
    /// workload already has are kept (see [`replace_keys`](Self::replace_keys)).
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
        self.store_jwk(id, jwk);
        self.keys.store(Arc::new(set));
        self.scopes.write().insert(id.to_string(), allowed.clone());
        Ok(())
    }

    fn store_jwk(&self, id: &str, jwk: &Jwk) {
        if let Some(kid) = &jwk.common.key_id {
            self.jwks.write().insert(
                kid.clone(),
                OwnedJwk {
                    owner: id.to_string(),
                    jwk: jwk.clone(),
                },
            );
        }
    }

    fn not_registered(&self, id: &str, jwk: Option<&Jwk>) -> Option<KeyError> {
        (!self.scopes.read().contains_key(id)).then(|| KeyError::InvalidJwk {
            kid: jwk.and_then(|j| j.common.key_id.clone()),
            reason: format!("workload {id:?} is not registered"),
        })
    }

    /// Adds a public key to a registered workload, keeping the keys it has
    /// (the first half of a rollover).
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if `id` is not registered, the `kid`
    /// is registered to another workload, or the JWK is refused (see
    /// [`register`](Self::register)).
    pub fn add_key(&self, id: &str, jwk: &Jwk) -> Result<(), KeyError> {
        if let Some(e) = self.not_registered(id, Some(jwk)) {
            return Err(e);
        }
        let allowed = self.allowed(id).unwrap_or_default();
        self.register(id, jwk, &allowed)
    }

    /// Removes one key of workload `id` (the end of a rollover); a `kid` it
    /// does not own is left alone. Returns true when a key was removed.
    pub fn remove_key(&self, id: &str, kid: &str) -> bool {
        let _w = self.write.lock();
        let mut set = (**self.keys.load()).clone();
        if set.get(kid).and_then(|k| k.owner.as_deref()) != Some(id) {
            return false;
        }
        set.remove(kid);
        self.jwks.write().remove(kid);
        self.keys.store(Arc::new(set));
        true
    }

    /// Makes `jwks` the whole key set of registered workload `id`, at once:
    /// its keys not in `jwks` are removed, the others added. All or nothing —
    /// on an error the workload keeps the keys it had.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if `id` is not registered, `jwks` is
    /// empty or names a `kid` twice, a `kid` is registered to another
    /// workload, or a JWK is refused (see [`register`](Self::register)).
    pub fn replace_keys(&self, id: &str, jwks: &[Jwk]) -> Result<(), KeyError> {
        let _w = self.write.lock();
        if let Some(e) = self.not_registered(id, None) {
            return Err(e);
        }
        if jwks.is_empty() {
            return Err(KeyError::InvalidJwk {
                kid: None,
                reason: format!("no keys for workload {id:?} (to remove it, revoke it)"),
            });
        }
        let mut set = (**self.keys.load()).clone();
        let owned: Vec<String> = self.kids_of(id);
        for kid in &owned {
            set.remove(kid);
        }
        let mut seen = HashSet::new();
        for jwk in jwks {
            let kid = jwk.common.key_id.clone();
            if let Some(k) = kid.as_deref() {
                if !seen.insert(k.to_string()) {
                    return Err(KeyError::InvalidJwk {
                        kid,
                        reason: "kid listed twice".into(),
                    });
                }
                if set.get(k).is_some() {
                    return Err(KeyError::InvalidJwk {
                        kid,
                        reason: "kid already registered to another workload".into(),
                    });
                }
            }
            set.insert_jwk_owned(jwk, Some(id.to_string()))?;
        }
        {
            let mut published = self.jwks.write();
            for kid in &owned {
                published.remove(kid);
            }
        }
        for jwk in jwks {
            self.store_jwk(id, jwk);
        }
        self.keys.store(Arc::new(set));
        Ok(())
    }

    /// The `kid`s workload `id` owns, sorted.
    pub fn kids_of(&self, id: &str) -> Vec<String> {
        self.jwks
            .read()
            .iter()
            .filter(|(_, k)| k.owner == id)
            .map(|(kid, _)| kid.clone())
            .collect()
    }

    /// The trust domain's key directory: a JWKS of every key of every
    /// registered, non-suspended workload, each with its owner
    /// ([`elevate_core::keys::OWNER_MEMBER`]), sorted by owner and `kid`
    /// (see [`elevate_core::keys::directory`]).
    pub fn workload_jwks(&self) -> serde_json::Value {
        let published = self.jwks.read();
        let suspended = self.suspended.read();
        let trusted = published
            .values()
            .filter(|k| !suspended.contains(&k.owner))
            .map(|k| (k.owner.as_str(), &k.jwk));
        match elevate_core::keys::directory::workload_jwks_document(trusted) {
            Ok(doc) => doc,
            Err(e) => {
                // Every stored JWK was accepted by the key set, so this is a bug.
                tracing::error!(error = %e, "workload key directory cannot be built");
                serde_json::json!({ "keys": [] })
            }
        }
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
        {
            let mut published = self.jwks.write();
            for kid in &owned {
                published.remove(kid);
            }
        }
        self.keys.store(Arc::new(set));
        self.suspended.write().remove(id);
        self.auth_methods.write().remove(id);
        self.scopes.write().remove(id).is_some() || !owned.is_empty()
    }

    /// Makes the registry exactly `entries` (what a replica does with the
    /// fleet's shared state), at once. The known scopes declared with
    /// [`add_known_scopes`](Self::add_known_scopes) stay. A workload whose
    /// keys are refused (a `kid` owned twice, a bad JWK) is left out and
    /// returned with the reason: deny by default.
    pub fn replace_all(&self, entries: &[WorkloadEntry]) -> Vec<(String, String)> {
        let _w = self.write.lock();
        let mut set = KeySet::new();
        let mut jwks = BTreeMap::new();
        let mut scopes = HashMap::new();
        let mut suspended = HashSet::new();
        let mut methods = HashMap::new();
        let mut refused = Vec::new();
        'entry: for e in entries {
            let mut trial = set.clone();
            for jwk in &e.jwks {
                let kid = jwk.common.key_id.as_deref().unwrap_or_default();
                if trial.get(kid).is_some() {
                    refused.push((e.id.clone(), format!("kid {kid:?} owned twice")));
                    continue 'entry;
                }
                if let Err(err) = trial.insert_jwk_owned(jwk, Some(e.id.clone())) {
                    refused.push((e.id.clone(), err.to_string()));
                    continue 'entry;
                }
            }
            set = trial;
            for jwk in &e.jwks {
                if let Some(kid) = &jwk.common.key_id {
                    jwks.insert(
                        kid.clone(),
                        OwnedJwk {
                            owner: e.id.clone(),
                            jwk: jwk.clone(),
                        },
                    );
                }
            }
            scopes.insert(e.id.clone(), e.allowed.clone());
            if e.suspended {
                suspended.insert(e.id.clone());
            }
            if let Some(m) = &e.auth_methods {
                methods.insert(e.id.clone(), m.clone());
            }
        }
        *self.jwks.write() = jwks;
        *self.scopes.write() = scopes;
        *self.suspended.write() = suspended;
        *self.auth_methods.write() = methods;
        self.keys.store(Arc::new(set));
        refused
    }

    /// Every registered workload as a [`WorkloadEntry`], sorted by id.
    pub fn entries(&self) -> Vec<WorkloadEntry> {
        let _w = self.write.lock();
        let jwks = self.jwks.read();
        let suspended = self.suspended.read();
        let methods = self.auth_methods.read();
        let mut out: Vec<WorkloadEntry> = self
            .scopes
            .read()
            .iter()
            .map(|(id, allowed)| WorkloadEntry {
                id: id.clone(),
                jwks: jwks
                    .values()
                    .filter(|k| &k.owner == id)
                    .map(|k| k.jwk.clone())
                    .collect(),
                allowed: allowed.clone(),
                auth_methods: methods.get(id).cloned(),
                suspended: suspended.contains(id),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
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

    /// Sets the client authentication methods registered workload `id` may
    /// use at the token endpoint (an empty list: none, it cannot
    /// authenticate). Returns false, changing nothing, when `id` is not
    /// registered.
    pub fn set_auth_methods(&self, id: &str, methods: &[ClientAuthMethod]) -> bool {
        let _w = self.write.lock();
        if !self.scopes.read().contains_key(id) {
            return false;
        }
        let mut list: Vec<ClientAuthMethod> = Vec::with_capacity(methods.len());
        for m in methods {
            if !list.contains(m) {
                list.push(*m);
            }
        }
        self.auth_methods.write().insert(id.to_string(), list);
        true
    }

    /// The client authentication methods workload `id` may use: those set
    /// for it, else `private_key_jwt` alone; none when it is not registered.
    pub fn auth_methods(&self, id: &str) -> Vec<ClientAuthMethod> {
        if !self.scopes.read().contains_key(id) {
            return Vec::new();
        }
        self.auth_methods
            .read()
            .get(id)
            .cloned()
            .unwrap_or_else(|| vec![ClientAuthMethod::PrivateKeyJwt])
    }

    /// True when registered workload `id` may authenticate with `method`.
    pub fn allows_auth(&self, id: &str, method: ClientAuthMethod) -> bool {
        self.auth_methods(id).contains(&method)
    }

    /// True when `id` is registered (suspended or not).
    pub fn is_registered(&self, id: &str) -> bool {
        self.scopes.read().contains_key(id)
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

    #[test]
    fn auth_methods_default_to_private_key_jwt_and_go_with_the_workload() {
        let r = WorkloadRegistry::new();
        let a = SigningKey::generate(SigningAlg::ES256, "a-1").unwrap();
        let (jwt, tls) = (
            ClientAuthMethod::PrivateKeyJwt,
            ClientAuthMethod::TlsClientAuth,
        );
        assert!(
            !r.set_auth_methods("spiffe://d/a", &[tls]),
            "not registered"
        );
        assert!(r.auth_methods("spiffe://d/a").is_empty());
        r.register("spiffe://d/a", a.public_jwk(), &Scope::parse("x"))
            .unwrap();
        assert_eq!(r.auth_methods("spiffe://d/a"), [jwt]);
        assert!(!r.allows_auth("spiffe://d/a", tls), "deny by default");
        assert!(r.set_auth_methods("spiffe://d/a", &[tls, tls]));
        assert_eq!(r.auth_methods("spiffe://d/a"), [tls]);
        assert!(
            !r.allows_auth("spiffe://d/a", jwt),
            "exactly the methods set"
        );
        r.add_key(
            "spiffe://d/a",
            SigningKey::generate(SigningAlg::ES256, "a-2")
                .unwrap()
                .public_jwk(),
        )
        .unwrap();
        assert_eq!(
            r.auth_methods("spiffe://d/a"),
            [tls],
            "kept across key changes"
        );
        r.remove("spiffe://d/a");
        r.register("spiffe://d/a", a.public_jwk(), &Scope::parse("x"))
            .unwrap();
        assert_eq!(
            r.auth_methods("spiffe://d/a"),
            [jwt],
            "removed with the workload"
        );
    }

    #[test]
    fn several_keys_per_workload_and_rollover() {
        let r = WorkloadRegistry::new();
        let old = SigningKey::generate(SigningAlg::ES256, "a-1").unwrap();
        let new = SigningKey::generate(SigningAlg::EdDSA, "a-2").unwrap();
        let b = SigningKey::generate(SigningAlg::ES256, "b-1").unwrap();
        // add_key needs a registered workload
        assert!(r.add_key("spiffe://d/a", old.public_jwk()).is_err());
        r.register("spiffe://d/a", old.public_jwk(), &Scope::parse("x"))
            .unwrap();
        r.register("spiffe://d/b", b.public_jwk(), &Scope::parse("x"))
            .unwrap();
        r.add_key("spiffe://d/a", new.public_jwk()).unwrap();
        assert_eq!(r.kids_of("spiffe://d/a"), ["a-1", "a-2"]);
        assert!(r.keys().load().get("a-1").is_some() && r.keys().load().get("a-2").is_some());
        // another workload's kid is refused, and so is removing it as "a"
        assert!(r.add_key("spiffe://d/a", b.public_jwk()).is_err());
        assert!(!r.remove_key("spiffe://d/a", "b-1"));
        assert!(r.remove_key("spiffe://d/a", "a-1"));
        assert!(!r.remove_key("spiffe://d/a", "a-1"));
        assert!(r.keys().load().get("a-1").is_none());
        assert_eq!(r.kids_of("spiffe://d/a"), ["a-2"]);
        assert_eq!(r.allowed("spiffe://d/a"), Some(Scope::parse("x")));
    }

    #[test]
    fn replace_keys_is_all_or_nothing() {
        let r = WorkloadRegistry::new();
        let a1 = SigningKey::generate(SigningAlg::ES256, "a-1").unwrap();
        let a2 = SigningKey::generate(SigningAlg::ES256, "a-2").unwrap();
        let b = SigningKey::generate(SigningAlg::ES256, "b-1").unwrap();
        r.register("spiffe://d/a", a1.public_jwk(), &Scope::parse("x"))
            .unwrap();
        r.register("spiffe://d/b", b.public_jwk(), &Scope::parse("x"))
            .unwrap();
        let jwk = |k: &SigningKey| k.public_jwk().clone();
        // refused: empty, a kid twice, another workload's kid, unregistered
        assert!(r.replace_keys("spiffe://d/a", &[]).is_err());
        assert!(
            r.replace_keys("spiffe://d/a", &[jwk(&a2), jwk(&a2)])
                .is_err()
        );
        assert!(
            r.replace_keys("spiffe://d/a", &[jwk(&a2), jwk(&b)])
                .is_err()
        );
        assert!(r.replace_keys("spiffe://d/c", &[jwk(&a2)]).is_err());
        assert_eq!(r.kids_of("spiffe://d/a"), ["a-1"], "previous keys kept");
        assert!(r.keys().load().get("a-2").is_none());
        // both, then the new one only
        r.replace_keys("spiffe://d/a", &[jwk(&a1), jwk(&a2)])
            .unwrap();
        assert_eq!(r.kids_of("spiffe://d/a"), ["a-1", "a-2"]);
        r.replace_keys("spiffe://d/a", &[jwk(&a2)]).unwrap();
        assert_eq!(r.kids_of("spiffe://d/a"), ["a-2"]);
        assert!(r.keys().load().get("a-1").is_none());
        assert!(r.keys().load().get("b-1").is_some());
    }

    #[test]
    fn the_directory_lists_trusted_keys_with_owners() {
        use elevate_core::keys::OWNER_MEMBER;
        let r = WorkloadRegistry::new();
        let a1 = SigningKey::generate(SigningAlg::ES256, "a-1").unwrap();
        let a2 = SigningKey::generate(SigningAlg::EdDSA, "a-2").unwrap();
        let b = SigningKey::generate(SigningAlg::ES256, "b-1").unwrap();
        r.register("spiffe://d/a", a1.public_jwk(), &Scope::parse("x"))
            .unwrap();
        r.add_key("spiffe://d/a", a2.public_jwk()).unwrap();
        r.register("spiffe://d/b", b.public_jwk(), &Scope::parse("x"))
            .unwrap();
        let owners = |doc: &serde_json::Value| -> Vec<(String, String)> {
            doc["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| {
                    (
                        k["kid"].as_str().unwrap().to_string(),
                        k[OWNER_MEMBER].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        let doc = r.workload_jwks();
        assert_eq!(
            owners(&doc),
            [
                ("a-1".to_string(), "spiffe://d/a".to_string()),
                ("a-2".into(), "spiffe://d/a".into()),
                ("b-1".into(), "spiffe://d/b".into()),
            ]
        );
        let set = KeySet::from_workload_jwks(&doc).unwrap();
        assert_eq!(
            set.get("a-2").unwrap().owner.as_deref(),
            Some("spiffe://d/a")
        );
        // suspended: not published; removed: gone
        r.suspend("spiffe://d/a");
        assert_eq!(
            owners(&r.workload_jwks()),
            [("b-1".to_string(), "spiffe://d/b".to_string())]
        );
        r.reinstate("spiffe://d/a");
        assert_eq!(owners(&r.workload_jwks()).len(), 3);
        r.remove("spiffe://d/a");
        assert_eq!(owners(&r.workload_jwks()).len(), 1);
        assert!(r.kids_of("spiffe://d/a").is_empty());
    }
}
