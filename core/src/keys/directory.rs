//! The trust domain's key directory: a JWKS (RFC 7517) of every registered
//! workload's public keys, each JWK carrying the workload that owns it in the
//! [`OWNER_MEMBER`] member. The TTS publishes it
//! (`GET /.well-known/workload-jwks`); a consumer builds its producer key set
//! from it with [`KeySet::from_workload_jwks`].
//!
//! ```json
//! {"keys":[{"kty":"EC","crv":"P-256","x":"…","y":"…","kid":"orders-2",
//!           "alg":"ES256","use":"sig","elevate_owner":"spiffe://elevate.example/orders-api"}]}
//! ```
//!
//! The document is taken or refused as a whole: a key without `kid`, `alg`
//! or owner, with a curve or algorithm outside ES256/EdDSA, with private
//! material, or a `kid` listed twice makes the whole document
//! [`KeyError::MalformedJwks`] — no key is silently skipped, so a consumer
//! never trusts half of a broken document.

use jsonwebtoken::jwk::Jwk;
use serde_json::{Map, Value};

use super::{KeyError, KeySet, SigningAlg};

/// The JWK member naming the workload that owns the key (a private,
/// collision-resistant parameter name in the sense of RFC 7517 §4): a
/// reference signed with the key must have that workload as its `iss`.
pub const OWNER_MEMBER: &str = "elevate_owner";

/// The most keys a workload key directory may list.
pub const MAX_DIRECTORY_KEYS: usize = 10_000;

/// What is wrong with a workload key directory document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwksProblem {
    /// The text is not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// The document is not a JSON object with a `keys` array.
    #[error("not a JWKS: no \"keys\" array")]
    NoKeysArray,
    /// More than [`MAX_DIRECTORY_KEYS`] keys.
    #[error("{0} keys, more than the {MAX_DIRECTORY_KEYS} allowed")]
    TooManyKeys(usize),
    /// `keys[index]` is not a JSON object.
    #[error("keys[{index}] is not a JSON object")]
    NotAnObject {
        /// Position in the `keys` array.
        index: usize,
    },
    /// `keys[index]` has no (string) `kid`.
    #[error("keys[{index}] has no kid")]
    MissingKid {
        /// Position in the `keys` array.
        index: usize,
    },
    /// `keys[index]` has no (string) `alg`.
    #[error("keys[{index}] (kid {kid:?}) has no alg")]
    MissingAlg {
        /// Position in the `keys` array.
        index: usize,
        /// Its `kid`.
        kid: String,
    },
    /// `keys[index]` names no owner (`elevate_owner`, a non-empty string).
    #[error("keys[{index}] (kid {kid:?}) names no owner ({OWNER_MEMBER})")]
    MissingOwner {
        /// Position in the `keys` array.
        index: usize,
        /// Its `kid`.
        kid: String,
    },
    /// Two keys share a `kid`.
    #[error("kid {kid:?} is listed more than once")]
    DuplicateKid {
        /// The repeated `kid`.
        kid: String,
    },
    /// `keys[index]` is not a usable public signing key: algorithm or curve
    /// outside ES256/EdDSA, `alg` not matching the curve, `use` other than
    /// `sig`, private material, or key bytes that do not decode.
    #[error("keys[{index}] (kid {kid:?}): {reason}")]
    InvalidKey {
        /// Position in the `keys` array.
        index: usize,
        /// Its `kid`.
        kid: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The directory entry for `jwk` owned by `owner`: the public JWK with its
/// `alg` (derived from the curve when the registered JWK had none), `use:
/// sig` and [`OWNER_MEMBER`].
///
/// # Errors
///
/// Returns [`KeyError::InvalidJwk`] if `owner` is empty or the JWK is not an
/// EC P-256 or OKP Ed25519 public key with a `kid` (see
/// [`KeySet::insert_jwk_owned`]).
pub fn workload_jwk(jwk: &Jwk, owner: &str) -> Result<Value, KeyError> {
    let invalid = |reason: &str| KeyError::InvalidJwk {
        kid: jwk.common.key_id.clone(),
        reason: reason.to_string(),
    };
    if owner.is_empty() {
        return Err(invalid("empty owner"));
    }
    // The same checks a verifier makes (kid, curve, alg, no private part).
    let mut probe = KeySet::new();
    probe.insert_jwk_owned(jwk, Some(owner.to_string()))?;
    let kid = jwk.common.key_id.as_deref().unwrap_or_default();
    let alg = probe
        .get(kid)
        .map(|k| k.alg)
        .ok_or_else(|| invalid("not usable"))?;
    let Value::Object(mut obj) = serde_json::to_value(jwk).map_err(|e| invalid(&e.to_string()))?
    else {
        return Err(invalid("JWK does not serialize as an object"));
    };
    obj.insert("alg".into(), Value::String(alg.as_str().into()));
    obj.insert("use".into(), Value::String("sig".into()));
    obj.insert(OWNER_MEMBER.into(), Value::String(owner.into()));
    Ok(Value::Object(obj))
}

/// The directory document for `keys` (owner, JWK), sorted by owner then
/// `kid` so that equal key sets give byte-equal documents (and ETags).
///
/// # Errors
///
/// Returns the first error of [`workload_jwk`].
pub fn workload_jwks_document<'a>(
    keys: impl IntoIterator<Item = (&'a str, &'a Jwk)>,
) -> Result<Value, KeyError> {
    let mut entries: Vec<(String, String, Value)> = Vec::new();
    for (owner, jwk) in keys {
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        entries.push((owner.to_string(), kid, workload_jwk(jwk, owner)?));
    }
    entries.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    Ok(serde_json::json!({ "keys": entries.into_iter().map(|e| e.2).collect::<Vec<_>>() }))
}

fn str_member<'v>(obj: &'v Map<String, Value>, name: &str) -> Option<&'v str> {
    obj.get(name).and_then(Value::as_str)
}

impl KeySet {
    /// Builds a key set from a workload key directory document (see the
    /// [module docs](self)): every key is bound to its owner, so a reference
    /// it signs must name that owner as `iss`.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::MalformedJwks`] naming the first problem
    /// ([`JwksProblem`]) when the document is not a JWKS, lists too many
    /// keys, or any key lacks `kid`, `alg` or owner, repeats a `kid`, or is
    /// not an ES256/EdDSA public signing key. Nothing of a malformed
    /// document is used.
    pub fn from_workload_jwks(doc: &Value) -> Result<KeySet, KeyError> {
        let bad = KeyError::MalformedJwks;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(bad(JwksProblem::NoKeysArray))?;
        if keys.len() > MAX_DIRECTORY_KEYS {
            return Err(bad(JwksProblem::TooManyKeys(keys.len())));
        }
        let mut set = KeySet::new();
        for (index, entry) in keys.iter().enumerate() {
            let obj = entry
                .as_object()
                .ok_or(bad(JwksProblem::NotAnObject { index }))?;
            let kid = str_member(obj, "kid")
                .filter(|k| !k.is_empty())
                .ok_or(bad(JwksProblem::MissingKid { index }))?
                .to_string();
            let owner = str_member(obj, OWNER_MEMBER)
                .filter(|o| !o.is_empty())
                .ok_or_else(|| {
                    bad(JwksProblem::MissingOwner {
                        index,
                        kid: kid.clone(),
                    })
                })?
                .to_string();
            let alg = str_member(obj, "alg").ok_or_else(|| {
                bad(JwksProblem::MissingAlg {
                    index,
                    kid: kid.clone(),
                })
            })?;
            let invalid = |reason: String| {
                bad(JwksProblem::InvalidKey {
                    index,
                    kid: kid.clone(),
                    reason,
                })
            };
            if SigningAlg::parse(alg).is_none() {
                return Err(invalid(format!(
                    "alg {alg:?} is not allowed (ES256 or EdDSA only)"
                )));
            }
            if let Some(u) = obj.get("use")
                && u.as_str() != Some("sig")
            {
                return Err(invalid(format!("use {u} is not \"sig\"")));
            }
            if obj.contains_key("d") {
                return Err(invalid("private key material in a public key set".into()));
            }
            if set.get(&kid).is_some() {
                return Err(bad(JwksProblem::DuplicateKid { kid }));
            }
            let mut plain = obj.clone();
            plain.remove(OWNER_MEMBER);
            let jwk: Jwk = serde_json::from_value(Value::Object(plain))
                .map_err(|e| invalid(format!("not a JWK: {e}")))?;
            set.insert_jwk_owned(&jwk, Some(owner))
                .map_err(|e| match e {
                    KeyError::InvalidJwk { reason, .. } => invalid(reason),
                    other => invalid(other.to_string()),
                })?;
        }
        Ok(set)
    }

    /// [`from_workload_jwks`](Self::from_workload_jwks) for the document's text.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::MalformedJwks`] with [`JwksProblem::NotJson`] if
    /// `text` is not JSON, and the errors of
    /// [`from_workload_jwks`](Self::from_workload_jwks).
    pub fn from_workload_jwks_json(text: &str) -> Result<KeySet, KeyError> {
        let doc: Value = serde_json::from_str(text)
            .map_err(|e| KeyError::MalformedJwks(JwksProblem::NotJson(e.to_string())))?;
        Self::from_workload_jwks(&doc)
    }

    /// Keeps only the keys owned by one of `owners` (an unowned key is dropped too).
    pub fn retain_owners(&mut self, owners: &[String]) {
        self.keys.retain(|_, k| {
            k.owner
                .as_deref()
                .is_some_and(|o| owners.iter().any(|t| t == o))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::SigningKey;
    use super::*;

    const A: &str = "spiffe://d/a";
    const B: &str = "spiffe://d/b";

    fn key(alg: SigningAlg, kid: &str) -> SigningKey {
        SigningKey::generate(alg, kid).unwrap()
    }

    fn problem(doc: Value) -> JwksProblem {
        match KeySet::from_workload_jwks(&doc) {
            Err(KeyError::MalformedJwks(p)) => p,
            other => panic!("expected MalformedJwks, got {other:?}"),
        }
    }

    #[test]
    fn document_roundtrip_keeps_owners() {
        let a1 = key(SigningAlg::ES256, "a-1");
        let a2 = key(SigningAlg::EdDSA, "a-2");
        let b1 = key(SigningAlg::ES256, "b-1");
        let doc = workload_jwks_document([
            (B, b1.public_jwk()),
            (A, a2.public_jwk()),
            (A, a1.public_jwk()),
        ])
        .unwrap();
        let kids: Vec<&str> = doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids, ["a-1", "a-2", "b-1"], "sorted by owner then kid");
        assert_eq!(doc["keys"][1]["alg"], "EdDSA");
        assert_eq!(doc["keys"][2][OWNER_MEMBER], B);
        let set = KeySet::from_workload_jwks(&doc).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.get("a-2").unwrap().owner.as_deref(), Some(A));
        assert_eq!(set.get("a-2").unwrap().alg, SigningAlg::EdDSA);
        assert_eq!(set.get("b-1").unwrap().owner.as_deref(), Some(B));
        let again = KeySet::from_workload_jwks_json(&doc.to_string()).unwrap();
        assert_eq!(again.len(), 3);
    }

    #[test]
    fn a_jwk_without_alg_is_published_with_the_curves_alg() {
        let k = key(SigningAlg::ES256, "k");
        let mut jwk = k.public_jwk().clone();
        jwk.common.key_algorithm = None;
        jwk.common.public_key_use = None;
        let v = workload_jwk(&jwk, A).unwrap();
        assert_eq!(v["alg"], "ES256");
        assert_eq!(v["use"], "sig");
        assert!(workload_jwk(&jwk, "").is_err());
    }

    #[test]
    fn malformed_documents_are_named_errors() {
        let k = key(SigningAlg::ES256, "k-1");
        let good = workload_jwk(k.public_jwk(), A).unwrap();
        let without = |member: &str| {
            let mut v = good.clone();
            v.as_object_mut().unwrap().remove(member);
            serde_json::json!({ "keys": [v] })
        };
        let with = |member: &str, value: Value| {
            let mut v = good.clone();
            v[member] = value;
            serde_json::json!({ "keys": [v] })
        };
        assert_eq!(problem(serde_json::json!([])), JwksProblem::NoKeysArray);
        assert_eq!(
            problem(serde_json::json!({"keys": {}})),
            JwksProblem::NoKeysArray
        );
        assert_eq!(
            problem(serde_json::json!({"keys": ["x"]})),
            JwksProblem::NotAnObject { index: 0 }
        );
        assert_eq!(
            problem(without("kid")),
            JwksProblem::MissingKid { index: 0 }
        );
        assert_eq!(
            problem(with("kid", Value::from(7))),
            JwksProblem::MissingKid { index: 0 }
        );
        assert_eq!(
            problem(without(OWNER_MEMBER)),
            JwksProblem::MissingOwner {
                index: 0,
                kid: "k-1".into()
            }
        );
        assert_eq!(
            problem(with(OWNER_MEMBER, Value::from(""))),
            JwksProblem::MissingOwner {
                index: 0,
                kid: "k-1".into()
            }
        );
        assert_eq!(
            problem(without("alg")),
            JwksProblem::MissingAlg {
                index: 0,
                kid: "k-1".into()
            }
        );
        for (member, value) in [
            ("alg", Value::from("HS256")),
            ("alg", Value::from("none")),
            ("alg", Value::from("EdDSA")),
            ("crv", Value::from("P-384")),
            ("use", Value::from("enc")),
            ("d", Value::from("AAAA")),
            ("x", Value::from("!!")),
        ] {
            assert!(
                matches!(
                    problem(with(member, value.clone())),
                    JwksProblem::InvalidKey { index: 0, .. }
                ),
                "{member} = {value}"
            );
        }
        assert_eq!(
            problem(serde_json::json!({ "keys": [good.clone(), good.clone()] })),
            JwksProblem::DuplicateKid { kid: "k-1".into() }
        );
        assert!(matches!(
            KeySet::from_workload_jwks_json("{\"keys\": ["),
            Err(KeyError::MalformedJwks(JwksProblem::NotJson(_)))
        ));
        // One bad key refuses the document: the good key before it is not kept.
        let mixed = serde_json::json!({ "keys": [good, {"kid": "x", "kty": "RSA"}] });
        assert!(matches!(
            problem(mixed),
            JwksProblem::MissingOwner { index: 1, .. }
        ));
        // An empty directory is a valid (empty) key set.
        assert!(
            KeySet::from_workload_jwks(&serde_json::json!({"keys": []}))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn retain_owners_drops_other_and_unowned_keys() {
        let mut set = KeySet::new();
        set.insert_workload_key(A, &key(SigningAlg::ES256, "a"))
            .unwrap();
        set.insert_workload_key(B, &key(SigningAlg::ES256, "b"))
            .unwrap();
        set.insert_signing_key(&key(SigningAlg::ES256, "none"))
            .unwrap();
        set.retain_owners(&[A.to_string()]);
        assert_eq!(set.kids().collect::<Vec<_>>(), ["a"]);
    }
}
