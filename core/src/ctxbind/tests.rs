//! The per-context mode's properties, one test each: what a per-message
//! signature guarantees must still hold with one signature per context.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::*;
use crate::ctxref::{
    ContextRefMinter, ContextRefVerifier, MintRequest, RefError, VerifiedRef, VerifyPolicy,
    unix_now,
};
use crate::keys::{KeySet, SigningAlg, SigningKey};
use crate::scope::Scope;
use crate::verdict::Reason;
use crate::{ContextRefClaims, SubjectKind};

const PRODUCER: &str = "spiffe://example.org/orders";
const RELAY: &str = "spiffe://example.org/relay";
const CONSUMER: &str = "spiffe://example.org/billing";
const OTHER: &str = "spiffe://example.org/audit";
const DST: &str = "orders";

struct World {
    minter: ContextRefMinter,
    relay: ContextRefMinter,
    binder: ContextBinder,
    consumer_key: KeyAgreementKey,
    other_key: KeyAgreementKey,
    keys: KeySet,
}

fn world() -> World {
    let producer = SigningKey::generate(SigningAlg::ES256, "orders-1").unwrap();
    let relay = SigningKey::generate(SigningAlg::EdDSA, "relay-1").unwrap();
    let mut keys = KeySet::new();
    keys.insert_workload_key(PRODUCER, &producer).unwrap();
    keys.insert_workload_key(RELAY, &relay).unwrap();
    let consumer_key = KeyAgreementKey::generate("billing-enc-1").unwrap();
    let other_key = KeyAgreementKey::generate("audit-enc-1").unwrap();
    let mut audiences = AudienceKeys::new();
    audiences
        .insert(CONSUMER, consumer_key.public_jwk())
        .unwrap();
    audiences.insert(OTHER, other_key.public_jwk()).unwrap();
    audiences.insert(RELAY, consumer_key.public_jwk()).unwrap();
    let ttl = Duration::from_secs(600);
    World {
        minter: ContextRefMinter::new(PRODUCER, producer, ttl),
        relay: ContextRefMinter::new(RELAY, relay, ttl),
        binder: ContextBinder::new(audiences, ttl).with_open_after(1),
        consumer_key,
        other_key,
        keys,
    }
}

impl World {
    fn claims(&self, audience: &str, txn: &str, payload: &[u8]) -> ContextRefClaims {
        self.minter.origin_claims(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[audience.to_string()],
            scope: &Scope::parse("orders.read"),
            txn,
            destination: DST,
            payload,
        })
    }

    fn seal(&self, audience: &str, txn: &str, payload: &[u8]) -> (String, String) {
        let sealed = self
            .binder
            .seal(&self.minter, &self.claims(audience, txn, payload))
            .unwrap()
            .expect("an audience with a key is sealed per context");
        (sealed.reference.token, sealed.binding)
    }

    fn verifier(&self, audience: &str, key: &KeyAgreementKey) -> ContextRefVerifier {
        ContextRefVerifier::new(self.keys.clone(), VerifyPolicy::new(audience))
            .with_context_opener(ContextOpener::new([key.clone()]))
    }

    fn consumer(&self) -> ContextRefVerifier {
        self.verifier(CONSUMER, &self.consumer_key)
    }
}

fn verify(
    v: &ContextRefVerifier,
    token: &str,
    binding: &str,
    payload: &[u8],
) -> Result<VerifiedRef, RefError> {
    v.verify_message_at(token, Some(binding), DST, payload, unix_now())
}

fn reason(r: Result<VerifiedRef, RefError>) -> Reason {
    r.map(|_| ()).unwrap_err().reason()
}

/// Rebuilds a binding with other claims under `key` (what a holder of the key could do).
fn rebind(binding: &str, key: &[u8], edit: impl FnOnce(&mut BindingClaims)) -> String {
    let mut parts = binding.split('.');
    let h = parts.next().unwrap();
    let mut claims: BindingClaims =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap()).unwrap();
    edit(&mut claims);
    let input = format!(
        "{h}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
    );
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let tag = aws_lc_rs::hmac::sign(&k, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// The claims a signed reference carries (read without verifying).
fn signed_claims<T: serde::de::DeserializeOwned>(token: &str) -> T {
    crate::jws::parse(token, crate::ctxref::CTX_REF_TYP)
        .unwrap()
        .claims()
        .unwrap()
}

/// What a binding's `ref` names for `token`.
fn ref_hash(token: &str) -> String {
    crate::keys::sha256_b64url(token.as_bytes())
}

/// The binding key of a context, unwrapped with `key` (a stolen consumer key).
fn unwrap_key(token: &str, key: &KeyAgreementKey) -> Vec<u8> {
    let claims: ContextRefClaims = signed_claims(token);
    let (plain, _) =
        josekit::jwe::deserialize_compact(&claims.cnf.unwrap().jwe, key.decrypter()).unwrap();
    let jwk: BindingKeyJwk = serde_json::from_slice(&plain).unwrap();
    URL_SAFE_NO_PAD.decode(jwk.k).unwrap()
}

#[test]
fn one_context_reference_serves_many_messages_each_with_its_own_id() {
    let w = world();
    let v = w.consumer();
    let (t1, b1) = w.seal(CONSUMER, "txn-1", b"one");
    let (t2, b2) = w.seal(CONSUMER, "txn-1", b"two");
    assert_eq!(t1, t2, "same origin context and audience: one signature");
    assert_ne!(b1, b2);
    let r1 = verify(&v, &t1, &b1, b"one").unwrap();
    let r2 = verify(&v, &t2, &b2, b"two").unwrap();
    assert_ne!(
        r1.claims.jti, r2.claims.jti,
        "the replay guard sees one id per message"
    );
    assert_eq!(r1.claims.sub, "alice");
    assert_eq!(r1.claims.dst, DST);
    assert_eq!(r1.token_sha256, r2.token_sha256);
    assert!(r1.claims.cnf.is_some());
    // another transaction is another context
    let (t3, _) = w.seal(CONSUMER, "txn-2", b"three");
    assert_ne!(t1, t3);
    // the context reference itself names no destination or payload
    let ctx: serde_json::Value = signed_claims(&t1);
    assert!(ctx.get("dst").is_none() && ctx.get("dig").is_none());
    assert!(ctx["cnf"]["jwe"].as_str().unwrap().split('.').count() == 5);
}

#[test]
fn payload_and_destination_are_bound_by_the_mac() {
    let w = world();
    let v = w.consumer();
    let (t, b) = w.seal(CONSUMER, "txn-1", b"pay");
    assert_eq!(reason(verify(&v, &t, &b, b"paY")), Reason::DigestMismatch);
    assert_eq!(
        reason(v.verify_message_at(&t, Some(&b), "elsewhere", b"pay", unix_now())),
        Reason::WrongDestination
    );
    assert!(verify(&v, &t, &b, b"pay").is_ok());
}

#[test]
fn a_wrong_mac_is_a_bad_binding() {
    let w = world();
    let v = w.consumer();
    let (t, b) = w.seal(CONSUMER, "txn-1", b"x");
    // another key: a forger without the context's key
    let forged = rebind(&b, &[7u8; 32], |c| {
        c.dig = crate::keys::sha256_b64url(b"evil")
    });
    assert_eq!(reason(verify(&v, &t, &forged, b"evil")), Reason::BadBinding);
    // a flipped MAC byte
    let mut bytes = b.clone().into_bytes();
    let last = bytes.len() - 2;
    bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(bytes).unwrap();
    assert_eq!(reason(verify(&v, &t, &flipped, b"x")), Reason::BadBinding);
    // another header (alg none)
    let none = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"ctx-bind+jwt"}"#),
        b.split_once('.').unwrap().1
    );
    assert_eq!(reason(verify(&v, &t, &none, b"x")), Reason::BadBinding);
    assert_eq!(reason(verify(&v, &t, "garbage", b"x")), Reason::BadBinding);
}

#[test]
fn a_reference_swapped_under_a_valid_mac_is_refused() {
    let w = world();
    let v = w.consumer();
    let (t1, b1) = w.seal(CONSUMER, "txn-1", b"x");
    let (t2, _) = w.seal(CONSUMER, "txn-2", b"x");
    // a valid binding of context 1 presented with context 2 (another subject, txn or scope)
    assert_eq!(reason(verify(&v, &t2, &b1, b"x")), Reason::BadBinding);
    // even by someone holding context 1's key, re-MACed for context 2's key they lack
    let k1 = unwrap_key(&t1, &w.consumer_key);
    let swapped = rebind(&b1, &k1, |c| c.reference = ref_hash(&t2));
    assert_eq!(reason(verify(&v, &t2, &swapped, b"x")), Reason::BadBinding);
}

#[test]
fn a_key_for_another_audience_cannot_be_unwrapped() {
    let w = world();
    let (t, b) = w.seal(OTHER, "txn-1", b"x");
    // the consumer is not the audience: refused before any unwrap
    assert_eq!(
        reason(verify(&w.consumer(), &t, &b, b"x")),
        Reason::WrongAudience
    );
    // a consumer that is in the audience but holds another key-agreement key
    let wrong_key = w.verifier(OTHER, &w.consumer_key);
    assert_eq!(
        reason(verify(&wrong_key, &t, &b, b"x")),
        Reason::BindingKeyUnavailable
    );
    // a consumer with no key-agreement key at all
    let none = ContextRefVerifier::new(w.keys.clone(), VerifyPolicy::new(OTHER));
    assert_eq!(
        reason(verify(&none, &t, &b, b"x")),
        Reason::BindingKeyUnavailable
    );
    assert!(verify(&w.verifier(OTHER, &w.other_key), &t, &b, b"x").is_ok());
}

#[test]
fn modes_do_not_mix() {
    let w = world();
    let v = w.consumer();
    let (t, b) = w.seal(CONSUMER, "txn-1", b"x");
    // a context reference without its binding
    assert_eq!(
        reason(v.verify_message_at(&t, None, DST, b"x", unix_now())),
        Reason::MissingBinding
    );
    // a binding with a per-message reference
    let per_message = w.minter.mint(&MintRequest {
        subject: "alice",
        sub_kind: SubjectKind::Human,
        audience: &[CONSUMER.to_string()],
        scope: &Scope::parse("orders.read"),
        txn: "txn-1",
        destination: DST,
        payload: b"x",
    });
    let per_message = per_message.unwrap().token;
    assert_eq!(
        reason(verify(&v, &per_message, &b, b"x")),
        Reason::MissingBinding
    );
    assert!(
        v.verify_message_at(&per_message, None, DST, b"x", unix_now())
            .is_ok()
    );
    // a signed context reference that also names dst/dig is malformed
    let mut claims: ContextRefClaims = signed_claims(&t);
    claims.dst = DST.into();
    let both = w.minter.sign(claims).unwrap().token;
    assert_eq!(reason(verify(&v, &both, &b, b"x")), Reason::BadBinding);
}

#[test]
fn no_forgery_without_the_producers_key() {
    let w = world();
    let v = w.consumer();
    let (t, b) = w.seal(CONSUMER, "txn-1", b"x");
    let mut claims: ContextRefClaims = signed_claims(&t);
    claims.sub = "mallory".into();
    let forger = SigningKey::generate(SigningAlg::ES256, "orders-1").unwrap();
    let forged = crate::jws::sign(&forger, crate::ctxref::CTX_REF_TYP, &claims).unwrap();
    let k = unwrap_key(&t, &w.consumer_key);
    let b2 = rebind(&b, &k, |c| c.reference = ref_hash(&forged));
    assert_eq!(reason(verify(&v, &forged, &b2, b"x")), Reason::BadSignature);
}

#[test]
fn expiry_holds_on_the_cached_context() {
    let w = world();
    let v = w.consumer();
    let (t, b) = w.seal(CONSUMER, "txn-1", b"x");
    let now = unix_now();
    assert!(v.verify_message_at(&t, Some(&b), DST, b"x", now).is_ok());
    // the same (now cached) context, later than its exp plus leeway
    assert_eq!(
        reason(v.verify_message_at(&t, Some(&b), DST, b"x", now + 600 + 31)),
        Reason::Expired
    );
    // and on a fresh verifier (not cached)
    assert_eq!(
        reason(
            w.consumer()
                .verify_message_at(&t, Some(&b), DST, b"x", now + 600 + 31)
        ),
        Reason::Expired
    );
    // a binding dated after its context's exp, MACed with the real key
    let k = unwrap_key(&t, &w.consumer_key);
    let late = rebind(&b, &k, |c| c.iat = now + 601);
    assert_eq!(
        reason(v.verify_message_at(&t, Some(&late), DST, b"x", now + 601)),
        Reason::BadBinding
    );
    let early = rebind(&b, &k, |c| c.iat = now - 3600);
    assert_eq!(reason(verify(&v, &t, &early, b"x")), Reason::BadBinding);
}

#[test]
fn a_revoked_producer_key_ends_its_cached_contexts() {
    let w = world();
    let v = w.consumer();
    let (t, b) = w.seal(CONSUMER, "txn-1", b"x");
    assert!(verify(&v, &t, &b, b"x").is_ok());
    let mut revoked = (**v.keys().load()).clone();
    assert!(revoked.remove("orders-1"));
    v.keys().store(std::sync::Arc::new(revoked));
    assert_eq!(reason(verify(&v, &t, &b, b"x")), Reason::UnknownKey);
}

#[test]
fn a_derived_publish_is_a_new_context_signed_by_the_hop() {
    let w = world();
    // the relay consumes a context addressed to it…
    let relay_in = w.verifier(RELAY, &w.consumer_key);
    let (t, b) = w.seal(RELAY, "txn-1", b"in");
    let parent = verify(&relay_in, &t, &b, b"in").unwrap();
    // …and publishes downstream for the consumer, per context
    let claims = w
        .relay
        .derived_claims(
            &parent.claims,
            &parent.token,
            None,
            &[CONSUMER.to_string()],
            DST,
            b"out",
        )
        .unwrap();
    let sealed = w.binder.seal(&w.relay, &claims).unwrap().unwrap();
    let v = w.consumer();
    let r = verify(&v, &sealed.reference.token, &sealed.binding, b"out").unwrap();
    assert_eq!(r.claims.iss, RELAY);
    assert_eq!(
        r.claims.chain(),
        vec![PRODUCER.to_string(), RELAY.to_string()]
    );
    assert_eq!(r.claims.depth, 1);
    // a history the relay made up (another parent) breaks the chain
    let mut claims = w
        .relay
        .derived_claims(
            &parent.claims,
            &parent.token,
            None,
            &[CONSUMER.to_string()],
            DST,
            b"o2",
        )
        .unwrap();
    claims.act.as_mut().unwrap().reference = Some(w.seal(RELAY, "txn-9", b"z").0);
    let bad = w.binder.seal(&w.relay, &claims).unwrap().unwrap();
    assert_eq!(
        reason(verify(&v, &bad.reference.token, &bad.binding, b"o2")),
        Reason::ChainInvalid
    );
}

#[test]
fn a_stolen_consumer_key_gives_no_more_than_the_consumer_has() {
    let w = world();
    let (t, b) = w.seal(CONSUMER, "txn-1", b"x");
    // the thief can bind new payloads to a context addressed to that consumer
    // (what the consumer itself could do with its own Txn-Token)…
    let k = unwrap_key(&t, &w.consumer_key);
    let mine = rebind(&b, &k, |c| {
        c.dig = crate::keys::sha256_b64url(b"new");
        c.jti = "thief-1".into();
    });
    assert!(verify(&w.consumer(), &t, &mine, b"new").is_ok());
    // …but not for any other audience, subject, scope or transaction: those
    // are in the producer-signed context, whose key the thief does not hold.
    assert_eq!(
        reason(verify(&w.verifier(OTHER, &w.other_key), &t, &mine, b"new")),
        Reason::WrongAudience
    );
    let (t_other, _) = w.seal(OTHER, "txn-1", b"x");
    assert!(std::panic::catch_unwind(|| unwrap_key(&t_other, &w.consumer_key)).is_err());
}

#[test]
fn multi_audience_messages_and_audiences_without_a_key_are_signed_per_message() {
    let w = world();
    let mut claims = w.claims(CONSUMER, "txn-1", b"x");
    claims.aud.push(OTHER.into());
    assert!(w.binder.seal(&w.minter, &claims).unwrap().is_none());
    let claims = w.claims("spiffe://example.org/keyless", "txn-1", b"x");
    assert!(w.binder.seal(&w.minter, &claims).unwrap().is_none());
}

#[test]
fn audience_key_sets_are_taken_whole_and_refuse_private_keys() {
    let a = KeyAgreementKey::generate("a-1").unwrap();
    let doc = audience_jwks(&[(CONSUMER, &a)]);
    let keys = AudienceKeys::from_jwks_json(doc.to_string().as_bytes()).unwrap();
    assert_eq!(keys.len(), 1);
    let mut no_owner = doc.clone();
    no_owner["keys"][0]
        .as_object_mut()
        .unwrap()
        .remove("elevate_owner");
    assert!(AudienceKeys::from_jwks_json(no_owner.to_string().as_bytes()).is_err());
    let mut private = doc.clone();
    private["keys"][0]["d"] = serde_json::json!("AAAA");
    assert!(AudienceKeys::from_jwks_json(private.to_string().as_bytes()).is_err());
    // a key file round trip
    let again = KeyAgreementKey::from_pem("a-1", a.to_pkcs8_pem()).unwrap();
    assert_eq!(again.public_jwk(), a.public_jwk());
}

#[test]
fn bindings_are_recognised_structurally() {
    let w = world();
    let (_, b) = w.seal(CONSUMER, "txn-1", b"x");
    assert!(looks_like_binding(b.as_bytes()));
    assert!(!looks_like_binding(b"Bearer abc.def.ghi"));
    let jwt = crate::jws::sign(
        &SigningKey::generate(SigningAlg::ES256, "k").unwrap(),
        "JWT",
        &serde_json::json!({"sub": "alice"}),
    )
    .unwrap();
    assert!(!looks_like_binding(jwt.as_bytes()));
}

#[test]
fn by_default_a_context_is_opened_on_its_second_message() {
    let w = world();
    let mut audiences = AudienceKeys::new();
    audiences
        .insert(CONSUMER, w.consumer_key.public_jwk())
        .unwrap();
    let binder = ContextBinder::new(audiences, Duration::from_secs(600));
    assert_eq!(binder.open_after(), DEFAULT_OPEN_AFTER);
    let seal = |txn: &str| {
        binder
            .seal(&w.minter, &w.claims(CONSUMER, txn, b"x"))
            .unwrap()
    };
    // the first message of a context is signed per message
    assert!(seal("txn-1").is_none());
    // the second opens it, the third reuses it
    let second = seal("txn-1").unwrap();
    let third = seal("txn-1").unwrap();
    assert_eq!(second.reference.token, third.reference.token);
    // another context starts over
    assert!(seal("txn-2").is_none());
    assert!(verify(&w.consumer(), &third.reference.token, &third.binding, b"x").is_ok());
}
