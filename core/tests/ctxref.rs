//! Every context-reference verification failure, each mapped to its verdict
//! and reason, plus a property test: any byte change is rejected.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use elevate_core::ctxref::{
    Actor, ContextRefClaims, ContextRefMinter, ContextRefVerifier, MintRequest, VerifyPolicy,
    unix_now,
};
use elevate_core::jws;
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::scope::Scope;
use elevate_core::{Reason, SubjectKind, Verdict};
use jsonwebtoken::EncodingKey;
use proptest::prelude::*;

const PRODUCER: &str = "spiffe://elevate.example/orders-api";
const CONSUMER: &str = "spiffe://elevate.example/invoice-worker";
const DST: &str = "orders";
const PAYLOAD: &[u8] = br#"{"order":42}"#;

struct Fixture {
    key: SigningKey,
    minter: ContextRefMinter,
    verifier: ContextRefVerifier,
}

fn fixture(alg: SigningAlg) -> Fixture {
    let key = SigningKey::generate(alg, "orders-api-1").unwrap();
    let mut keys = KeySet::new();
    keys.insert_workload_key(PRODUCER, &key).unwrap();
    Fixture {
        minter: ContextRefMinter::new(PRODUCER, key.clone(), Duration::from_secs(600)),
        verifier: ContextRefVerifier::new(keys, VerifyPolicy::new(CONSUMER)),
        key,
    }
}

fn mint(f: &Fixture) -> (String, ContextRefClaims) {
    let scope = Scope::parse("invoice.create order.process");
    let r = f
        .minter
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[CONSUMER.to_string()],
            scope: &scope,
            txn: "txn-1",
            destination: DST,
            payload: PAYLOAD,
        })
        .unwrap();
    (r.token, r.claims)
}

fn reason_of(f: &Fixture, token: &str, dst: &str, payload: &[u8]) -> Reason {
    f.verifier.verify(token, dst, payload).unwrap_err().reason()
}

fn resign(f: &Fixture, claims: ContextRefClaims) -> String {
    f.minter.sign(claims).unwrap().token
}

#[test]
fn valid_reference_verifies_for_both_algorithms() {
    for alg in [SigningAlg::ES256, SigningAlg::EdDSA] {
        let f = fixture(alg);
        let (token, claims) = mint(&f);
        let v = f.verifier.verify(&token, DST, PAYLOAD).unwrap();
        assert_eq!(v.claims, claims);
        assert_eq!(v.claims.chain(), vec![PRODUCER.to_string()]);
    }
}

#[test]
fn forged_signature_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let (_, claims) = mint(&f);
    // Same kid, different key: a forger who knows the kid but not the key.
    let forger = SigningKey::generate(SigningAlg::ES256, "orders-api-1").unwrap();
    let forged = jws::sign(&forger, "ctx-ref+jwt", &claims).unwrap();
    let r = reason_of(&f, &forged, DST, PAYLOAD);
    assert_eq!(r, Reason::BadSignature);
    assert_eq!(r.verdict(), Verdict::Quarantine);
}

#[test]
fn unknown_kid_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let (_, claims) = mint(&f);
    let other = SigningKey::generate(SigningAlg::ES256, "somebody-else").unwrap();
    let t = jws::sign(&other, "ctx-ref+jwt", &claims).unwrap();
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::UnknownKey);
    assert_eq!(Reason::UnknownKey.verdict(), Verdict::Quarantine);
}

#[test]
fn missing_kid_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let (_, claims) = mint(&f);
    let t = jws::sign_with(
        f.key.encoding_key(),
        SigningAlg::ES256,
        None,
        "ctx-ref+jwt",
        &claims,
    )
    .unwrap();
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::MissingKid);
}

#[test]
fn alg_none_is_rejected() {
    let f = fixture(SigningAlg::ES256);
    let (_, claims) = mint(&f);
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"ctx-ref+jwt","kid":"orders-api-1"}"#);
    let p = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    for t in [format!("{h}.{p}."), format!("{h}.{p}.AAAA")] {
        let r = reason_of(&f, &t, DST, PAYLOAD);
        assert_eq!(r, Reason::AlgorithmNotAllowed);
        assert_eq!(r.verdict(), Verdict::Quarantine);
    }
}

#[test]
fn hs256_with_public_key_as_secret_is_rejected() {
    let f = fixture(SigningAlg::ES256);
    let (_, claims) = mint(&f);
    // The classic confusion attack: HMAC keyed with the public key's bytes.
    let public = serde_json::to_vec(f.key.public_jwk()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.typ = Some("ctx-ref+jwt".into());
    header.kid = Some("orders-api-1".into());
    let t = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&public)).unwrap();
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::AlgorithmNotAllowed);
}

#[test]
fn algorithm_not_matching_the_key_is_rejected() {
    let f = fixture(SigningAlg::ES256);
    let (_, claims) = mint(&f);
    // An EdDSA token under the ES256 key's kid.
    let ed = SigningKey::generate(SigningAlg::EdDSA, "orders-api-1").unwrap();
    let t = jws::sign(&ed, "ctx-ref+jwt", &claims).unwrap();
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::AlgorithmNotAllowed);
}

#[test]
fn wrong_typ_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let (_, claims) = mint(&f);
    for typ in ["JWT", "txntoken+jwt", "at+jwt"] {
        let t = jws::sign(&f.key, typ, &claims).unwrap();
        assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::WrongType, "{typ}");
    }
    assert_eq!(Reason::WrongType.verdict(), Verdict::Quarantine);
}

#[test]
fn expired_is_denied() {
    let f = fixture(SigningAlg::ES256);
    let (_, mut claims) = mint(&f);
    let now = unix_now();
    claims.iat = now - 700;
    claims.exp = now - 100;
    let t = resign(&f, claims);
    let r = reason_of(&f, &t, DST, PAYLOAD);
    assert_eq!(r, Reason::Expired);
    assert_eq!(r.verdict(), Verdict::Deny);
}

#[test]
fn expiry_within_leeway_is_accepted() {
    let f = fixture(SigningAlg::ES256);
    let (_, mut claims) = mint(&f);
    claims.iat = unix_now() - 100;
    claims.exp = unix_now() - 10; // leeway is 30 s
    let t = resign(&f, claims);
    assert!(f.verifier.verify(&t, DST, PAYLOAD).is_ok());
}

#[test]
fn a_window_that_is_not_a_window_is_malformed() {
    let f = fixture(SigningAlg::ES256);
    let (_, claims) = mint(&f);
    let now = unix_now();
    for (iat, exp) in [
        (now, now - 10),
        (0, now + 60),
        (-5, i64::MAX),
        (now, i64::MIN),
    ] {
        let t = resign(
            &f,
            ContextRefClaims {
                iat,
                exp,
                ..claims.clone()
            },
        );
        assert_eq!(
            reason_of(&f, &t, DST, PAYLOAD),
            Reason::MalformedReference,
            "iat {iat} exp {exp}"
        );
    }
    // A far-future exp is refused by the horizon check, not wrapped around.
    let t = resign(
        &f,
        ContextRefClaims {
            iat: now,
            exp: i64::MAX,
            ..claims
        },
    );
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::HorizonTooLong);
}

#[test]
fn not_yet_valid_is_denied() {
    let f = fixture(SigningAlg::ES256);
    let (_, mut claims) = mint(&f);
    claims.iat = unix_now() + 300;
    claims.exp = claims.iat + 600;
    let t = resign(&f, claims);
    let r = reason_of(&f, &t, DST, PAYLOAD);
    assert_eq!(r, Reason::NotYetValid);
    assert_eq!(r.verdict(), Verdict::Deny);
}

#[test]
fn horizon_beyond_maximum_is_denied() {
    let f = fixture(SigningAlg::ES256);
    let (_, mut claims) = mint(&f);
    claims.exp = claims.iat + 30 * 24 * 3600;
    let t = resign(&f, claims);
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::HorizonTooLong);
}

#[test]
fn wrong_audience_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let (_, mut claims) = mint(&f);
    claims.aud = vec!["spiffe://elevate.example/somebody-else".into()];
    let t = resign(&f, claims);
    let r = reason_of(&f, &t, DST, PAYLOAD);
    assert_eq!(r, Reason::WrongAudience);
    assert_eq!(r.verdict(), Verdict::Quarantine);
}

#[test]
fn wrong_destination_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let (t, _) = mint(&f);
    let r = reason_of(&f, &t, "payments", PAYLOAD);
    assert_eq!(r, Reason::WrongDestination);
    assert_eq!(r.verdict(), Verdict::Quarantine);
}

#[test]
fn payload_changed_by_one_byte_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let (t, _) = mint(&f);
    let mut p = PAYLOAD.to_vec();
    p[3] ^= 1;
    let r = reason_of(&f, &t, DST, &p);
    assert_eq!(r, Reason::DigestMismatch);
    assert_eq!(r.verdict(), Verdict::Quarantine);
}

#[test]
fn issuer_not_owning_the_key_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let (_, mut claims) = mint(&f);
    claims.iss = "spiffe://elevate.example/impostor".into();
    let t = resign(&f, claims);
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::IssuerMismatch);
}

fn chained(f: &Fixture, scope_now: &str, hops: &[(&str, &str)], max_depth: u32) -> String {
    let (_, mut claims) = mint(f);
    claims.scope = scope_now.into();
    let mut act: Option<Actor> = None;
    for (sub, scope) in hops.iter().rev() {
        act = Some(Actor {
            sub: sub.to_string(),
            scope: scope.to_string(),
            act: act.map(Box::new),
            reference: None,
        });
    }
    claims.depth = hops.len() as u32;
    claims.max_depth = max_depth;
    claims.act = act;
    resign(f, claims)
}

/// A three-hop chain built by real derivation: producer → order-worker → billing-worker.
struct Chain {
    verifier: ContextRefVerifier,
    keys: KeySet,
    hop1: (String, ContextRefClaims),
    hop2: (String, ContextRefClaims),
    billing_key: SigningKey,
}

const ORDER_WORKER: &str = "spiffe://elevate.example/order-worker";
const BILLING_WORKER: &str = "spiffe://elevate.example/billing-worker";
const NOTIFY_WORKER: &str = "spiffe://elevate.example/notify-worker";

fn chain() -> Chain {
    let f = fixture(SigningAlg::ES256);
    let scope = Scope::parse("order.process billing.charge notification.send");
    let origin = f
        .minter
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[ORDER_WORKER.to_string()],
            scope: &scope,
            txn: "txn-chain",
            destination: "orders",
            payload: b"o",
        })
        .unwrap();
    let order_key = SigningKey::generate(SigningAlg::EdDSA, "order-1").unwrap();
    let billing_key = SigningKey::generate(SigningAlg::ES256, "billing-1").unwrap();
    let mut keys = KeySet::new();
    keys.insert_workload_key(PRODUCER, &f.key).unwrap();
    keys.insert_workload_key(ORDER_WORKER, &order_key).unwrap();
    keys.insert_workload_key(BILLING_WORKER, &billing_key)
        .unwrap();
    let order = ContextRefMinter::new(ORDER_WORKER, order_key, Duration::from_secs(600));
    let hop1 = order
        .derive(
            &origin.claims,
            &origin.token,
            Some(&Scope::parse("billing.charge notification.send")),
            &[BILLING_WORKER.to_string()],
            "billing",
            b"b",
        )
        .unwrap();
    let billing = ContextRefMinter::new(
        BILLING_WORKER,
        billing_key.clone(),
        Duration::from_secs(600),
    );
    let hop2 = billing
        .derive(
            &hop1.claims,
            &hop1.token,
            Some(&Scope::parse("notification.send")),
            &[NOTIFY_WORKER.to_string()],
            "notifications",
            b"n",
        )
        .unwrap();
    Chain {
        verifier: ContextRefVerifier::new(keys.clone(), VerifyPolicy::new(NOTIFY_WORKER)),
        keys,
        hop1: (hop1.token, hop1.claims),
        hop2: (hop2.token, hop2.claims),
        billing_key,
    }
}

#[test]
fn derived_chain_verifies_with_its_history() {
    let c = chain();
    let v = c.verifier.verify(&c.hop2.0, "notifications", b"n").unwrap();
    assert_eq!(v.claims.depth, 2);
    assert_eq!(v.claims.txn, "txn-chain");
    assert_eq!(
        v.claims.chain(),
        vec![PRODUCER, ORDER_WORKER, BILLING_WORKER]
    );
    let outer = v.claims.act.as_ref().unwrap();
    assert_eq!(outer.sub, ORDER_WORKER);
    assert!(outer.reference.is_some());
}

#[test]
fn forged_middle_hop_is_quarantined() {
    let c = chain();
    // billing-worker fabricates the order-worker hop (for another subject) and
    // signs it itself: it does not hold order-worker's key.
    let fake_parent = jws::sign(
        &c.billing_key,
        "ctx-ref+jwt",
        &ContextRefClaims {
            sub: "mallory".into(),
            ..c.hop1.1.clone()
        },
    )
    .unwrap();
    let mut claims = c.hop2.1.clone();
    claims.sub = "mallory".into();
    if let Some(a) = claims.act.as_mut() {
        a.reference = Some(fake_parent);
    }
    let billing = ContextRefMinter::new(
        BILLING_WORKER,
        c.billing_key.clone(),
        Duration::from_secs(600),
    );
    let t = billing.sign(claims).unwrap().token;
    let err = c.verifier.verify(&t, "notifications", b"n").unwrap_err();
    assert_eq!(err.reason(), Reason::ChainInvalid, "{err}");
    assert_eq!(err.reason().verdict(), Verdict::Quarantine);
    // and dropping the proof altogether is no better
    let mut claims = c.hop2.1.clone();
    if let Some(a) = claims.act.as_mut() {
        a.reference = None;
    }
    let t = billing.sign(claims).unwrap().token;
    assert_eq!(
        c.verifier
            .verify(&t, "notifications", b"n")
            .unwrap_err()
            .reason(),
        Reason::ChainInvalid
    );
}

#[test]
fn revoked_middle_workload_invalidates_messages_in_flight() {
    let c = chain();
    let mut keys = c.keys.clone();
    assert!(keys.remove("order-1"));
    let v = ContextRefVerifier::new(keys, VerifyPolicy::new(NOTIFY_WORKER));
    let err = v.verify(&c.hop2.0, "notifications", b"n").unwrap_err();
    assert_eq!(err.reason(), Reason::ChainInvalid, "{err}");
}

#[test]
fn scope_widened_in_the_chain_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let t = chained(
        &f,
        "invoice.create refund.issue",
        &[
            ("spiffe://w/billing", "invoice.create"),
            (PRODUCER, "invoice.create order.process"),
        ],
        3,
    );
    let r = reason_of(&f, &t, DST, PAYLOAD);
    assert_eq!(r, Reason::ScopeWidened);
    assert_eq!(r.verdict(), Verdict::Quarantine);
    // widening in the middle of the chain too
    let t = chained(
        &f,
        "invoice.create",
        &[
            ("spiffe://w/billing", "invoice.create admin"),
            (PRODUCER, "invoice.create"),
        ],
        3,
    );
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::ScopeWidened);
}

#[test]
fn depth_over_max_is_denied() {
    let f = fixture(SigningAlg::ES256);
    let hops = [
        ("spiffe://w/a", "invoice.create"),
        ("spiffe://w/b", "invoice.create"),
        (PRODUCER, "invoice.create"),
    ];
    let t = chained(&f, "invoice.create", &hops, 2);
    let r = reason_of(&f, &t, DST, PAYLOAD);
    assert_eq!(r, Reason::DepthExceeded);
    assert_eq!(r.verdict(), Verdict::Deny);
    // the consumer's local cap applies even when the reference allows more
    let t = chained(
        &f,
        "invoice.create",
        &[("spiffe://w/a", "invoice.create"); 5],
        10,
    );
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::DepthExceeded);
}

#[test]
fn depth_inconsistent_with_chain_is_quarantined() {
    let f = fixture(SigningAlg::ES256);
    let (_, mut claims) = mint(&f);
    claims.depth = 2; // but no act
    let t = resign(&f, claims);
    let r = reason_of(&f, &t, DST, PAYLOAD);
    assert_eq!(r, Reason::ChainInvalid);
    assert_eq!(r.verdict(), Verdict::Quarantine);
}

#[test]
fn malformed_inputs_are_quarantined() {
    let f = fixture(SigningAlg::ES256);
    for t in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.???.###",
        "eyJhbGciOiJFUzI1NiJ9.e30",
    ] {
        let r = reason_of(&f, t, DST, PAYLOAD);
        assert_eq!(r.verdict(), Verdict::Quarantine, "{t:?} gave {r:?}");
    }
    // valid signature over claims missing required fields
    let t = jws::sign(&f.key, "ctx-ref+jwt", &serde_json::json!({"iss": PRODUCER})).unwrap();
    assert_eq!(reason_of(&f, &t, DST, PAYLOAD), Reason::MalformedReference);
}

#[test]
fn derive_narrows_and_extends_the_chain() {
    let f = fixture(SigningAlg::ES256);
    let (t, _) = mint(&f);
    let parent = f.verifier.verify(&t, DST, PAYLOAD).unwrap().claims;
    let worker_key = SigningKey::generate(SigningAlg::EdDSA, "invoice-worker-1").unwrap();
    let worker = ContextRefMinter::new(CONSUMER, worker_key.clone(), Duration::from_secs(600));
    let narrower = Scope::parse("invoice.create");
    let child = worker
        .derive(
            &parent,
            &t,
            Some(&narrower),
            &["spiffe://elevate.example/billing-worker".into()],
            "billing",
            b"x",
        )
        .unwrap();
    assert_eq!(child.claims.depth, 1);
    assert_eq!(child.claims.txn, parent.txn);
    assert_eq!(
        child.claims.chain(),
        vec![PRODUCER.to_string(), CONSUMER.to_string()]
    );
    let mut keys = KeySet::new();
    keys.insert_workload_key(CONSUMER, &worker_key).unwrap();
    keys.insert_workload_key(PRODUCER, &f.key).unwrap();
    let v = ContextRefVerifier::new(
        keys,
        VerifyPolicy::new("spiffe://elevate.example/billing-worker"),
    );
    assert!(v.verify(&child.token, "billing", b"x").is_ok());
    let wider = Scope::parse("invoice.create admin");
    assert!(
        worker
            .derive(&parent, &t, Some(&wider), &[], "billing", b"x")
            .is_err()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Flipping any bit of any byte of the reference is rejected.
    #[test]
    fn any_byte_change_to_the_reference_is_rejected(idx in any::<prop::sample::Index>(), bit in 0u8..8) {
        let f = fixture(SigningAlg::EdDSA);
        let (t, _) = mint(&f);
        let mut bytes = t.into_bytes();
        let i = idx.index(bytes.len());
        bytes[i] ^= 1 << bit;
        let changed = String::from_utf8_lossy(&bytes).into_owned();
        prop_assert!(f.verifier.verify(&changed, DST, PAYLOAD).is_err());
    }

    /// Changing any byte of the payload is rejected.
    #[test]
    fn any_byte_change_to_the_payload_is_rejected(idx in any::<prop::sample::Index>(), delta in 1u8..=255) {
        let f = fixture(SigningAlg::ES256);
        let (t, _) = mint(&f);
        let mut p = PAYLOAD.to_vec();
        let i = idx.index(p.len());
        p[i] = p[i].wrapping_add(delta);
        prop_assert_eq!(f.verifier.verify(&t, DST, &p).unwrap_err().reason(), Reason::DigestMismatch);
    }
}
