//! Context-reference sign and verify (ES256, EdDSA) and credential stripping
//! on realistic header sets.

// criterion_group! and criterion_main! write public functions without doc comments.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use elevate_core::ctxref::{ContextRefMinter, ContextRefVerifier, MintRequest, VerifyPolicy};
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::scope::Scope;
use elevate_core::strip::CredentialPolicy;
use elevate_core::{Headers, SubjectKind};

const PRODUCER: &str = "spiffe://elevate.example/orders-api";
const CONSUMER: &str = "spiffe://elevate.example/invoice-worker";

fn reference(c: &mut Criterion) {
    let payload =
        br#"{"invoice":"INV-1","amount":120,"currency":"EUR","lines":[{"sku":"A","qty":2}]}"#;
    let scope = Scope::parse("invoice.create order.process");
    let audience = [CONSUMER.to_string()];
    for alg in [SigningAlg::ES256, SigningAlg::EdDSA] {
        let key = SigningKey::generate(alg, "k1").expect("key");
        let mut keys = KeySet::new();
        keys.insert_workload_key(PRODUCER, &key).expect("jwk");
        let minter = ContextRefMinter::new(PRODUCER, key, Duration::from_secs(600));
        let verifier = ContextRefVerifier::new(keys, VerifyPolicy::new(CONSUMER));
        let req = MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &audience,
            scope: &scope,
            txn: "txn-1",
            destination: "invoices",
            payload,
        };
        c.bench_function(&format!("context reference sign {}", alg.as_str()), |b| {
            b.iter(|| minter.mint(&req).expect("mint"))
        });
        let token = minter.mint(&req).expect("mint").token;
        c.bench_function(&format!("context reference verify {}", alg.as_str()), |b| {
            b.iter(|| {
                verifier
                    .verify(&token, "invoices", payload)
                    .expect("verify")
            })
        });
    }
}

fn stripping(c: &mut Criterion) {
    let key = SigningKey::generate(SigningAlg::ES256, "k").expect("key");
    let jwt =
        elevate_core::jws::sign(&key, "JWT", &serde_json::json!({"sub":"alice"})).expect("jwt");
    let headers: Headers = [
        ("content-type", "application/json".to_string()),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
        ),
        (
            "x-request-id",
            "6c1f2d8e-1a2b-4c3d-9e8f-0a1b2c3d4e5f".to_string(),
        ),
        ("Authorization", format!("Bearer {jwt}")),
        ("Cookie", "session=abc; theme=dark".to_string()),
        ("x-tenant", "acme".to_string()),
        ("x-forwarded-identity", jwt.clone()),
        ("user-agent", "orders-api/1.4".to_string()),
    ]
    .into_iter()
    .collect();
    let payload = serde_json::to_vec(&serde_json::json!({
        "order": {"id": 42, "items": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 3}]},
        "customer": {"name": "alice", "auth": {"access_token": "x", "refresh_token": "y"}},
        "note": "deliver after 5pm"
    }))
    .expect("json");
    let policy = CredentialPolicy::default();
    c.bench_function("strip 8 headers + JSON payload (3 credentials)", |b| {
        b.iter(|| {
            let mut h = headers.clone();
            let mut p = payload.clone();
            policy.apply(&mut h, &mut p).expect("strip")
        })
    });
    let clean: Headers = headers
        .iter()
        .filter(|(n, _)| !n.starts_with('A') && !n.starts_with('C') && !n.starts_with("x-f"))
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect();
    c.bench_function("consumer scan of a clean message", |b| {
        b.iter(|| policy.scan(&clean, &payload))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = reference, stripping
}
criterion_main!(benches);
