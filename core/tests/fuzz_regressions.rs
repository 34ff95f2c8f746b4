//! Inputs found by the fuzz targets under `fuzz/` (see `scripts/fuzz`), kept
//! as regression tests of the verification code they broke.

use std::time::Duration;

use elevate_core::ctxref::{ContextRefMinter, ContextRefVerifier, MintRequest, VerifyPolicy};
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::scope::Scope;
use elevate_core::{Reason, SubjectKind};

const PRODUCER: &str = "spiffe://fuzz.example/producer";
const RELAY: &str = "spiffe://fuzz.example/relay";
const CONSUMER: &str = "spiffe://fuzz.example/consumer";

/// ctxref target: a two-hop chain whose embedded parent reference (validly
/// signed by its workload) claims `"depth": 4294967295`. Checking the parent
/// against its successor computed `parent.depth + 1` and panicked with
/// "attempt to add with overflow" wherever overflow checks are on (debug
/// builds, tests, the fuzz build); in release it wrapped to 0.
#[test]
fn parent_depth_at_u32_max_is_an_invalid_chain_not_an_overflow() {
    let pk = SigningKey::generate(SigningAlg::ES256, "fuzz-producer-1").unwrap();
    let rk = SigningKey::generate(SigningAlg::EdDSA, "fuzz-relay-1").unwrap();
    let mut keys = KeySet::new();
    keys.insert_workload_key(PRODUCER, &pk).unwrap();
    keys.insert_workload_key(RELAY, &rk).unwrap();
    let ttl = Duration::from_secs(300);
    let producer = ContextRefMinter::new(PRODUCER, pk, ttl);
    let relay = ContextRefMinter::new(RELAY, rk, ttl);
    let parent = producer
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[RELAY.to_string()],
            scope: &Scope::parse("orders:read orders:write"),
            txn: "txn-0190a1b2",
            destination: "orders",
            payload: b"p",
        })
        .unwrap();
    let child = relay
        .derive(
            &parent.claims,
            &parent.token,
            None,
            &[CONSUMER.to_string()],
            "orders",
            b"c",
        )
        .unwrap();
    // The parent as the fuzzer mutated it, signed by its owner.
    let mut bad_parent = parent.claims.clone();
    bad_parent.depth = u32::MAX;
    let bad_parent = producer.sign(bad_parent).unwrap().token;
    let mut claims = child.claims.clone();
    claims.act.as_mut().unwrap().reference = Some(bad_parent);
    let token = relay.sign(claims).unwrap().token;

    let verifier = ContextRefVerifier::new(keys, VerifyPolicy::new(CONSUMER));
    let err = verifier.verify(&token, "orders", b"c").unwrap_err();
    assert_eq!(err.reason(), Reason::ChainInvalid, "{err}");
    // the unmodified chain still verifies
    verifier.verify(&child.token, "orders", b"c").unwrap();
}
