//! Txn-Token mint (one in-process token exchange: client assertion, subject
//! reference check, signing) and verify (signature, `typ`, `aud`, expiry, claims).

// criterion_group! and criterion_main! write public functions without doc comments.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use elevate_core::SubjectKind;
use elevate_core::ctxref::{ContextRefMinter, MintRequest};
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::scope::Scope;
use elevate_tts::{Issuer, IssuerSettings};
use txn_token_client::TxnTokenVerifier;
use txn_token_client::assertion::sign_assertion;
use txn_token_client::protocol::{TOKEN_TYPE_JWT, exchange_form, with_client_assertion};

const DOMAIN: &str = "elevate.example";
const PRODUCER: &str = "spiffe://elevate.example/orders-api";
const CONSUMER: &str = "spiffe://elevate.example/invoice-worker";

fn txn_token(c: &mut Criterion) {
    let issuer = Issuer::generate(IssuerSettings::new(DOMAIN)).expect("issuer");
    let producer = SigningKey::generate(SigningAlg::ES256, "p1").expect("key");
    let consumer = SigningKey::generate(SigningAlg::EdDSA, "c1").expect("key");
    let scope = Scope::parse("invoice.create");
    issuer
        .register_workload(PRODUCER, producer.public_jwk(), &scope)
        .expect("register");
    issuer
        .register_workload(CONSUMER, consumer.public_jwk(), &scope)
        .expect("register");
    let payload = br#"{"invoice":"INV-1","amount":120}"#;
    let reference = ContextRefMinter::new(PRODUCER, producer, Duration::from_secs(600))
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[CONSUMER.to_string()],
            scope: &scope,
            txn: "txn-bench",
            destination: "invoices",
            payload,
        })
        .expect("reference")
        .token;
    let endpoint = issuer.token_endpoint();
    let details =
        serde_json::json!({"source": {"broker": "memory", "queue": "invoices", "seq": 1}});
    let context = serde_json::json!({"mode": "bench"});
    let exchange = || {
        // a client assertion is single-use: each exchange signs its own
        let assertion = sign_assertion(&consumer, CONSUMER, &endpoint, Duration::from_secs(30))
            .expect("assertion");
        let form = with_client_assertion(
            exchange_form(
                DOMAIN,
                &scope,
                &reference,
                TOKEN_TYPE_JWT,
                &context,
                &details,
            ),
            &assertion,
        );
        issuer.exchange(&form).expect("exchange")
    };
    c.bench_function(
        "Txn-Token mint (in-process exchange: assertion, reference, sign)",
        |b| b.iter(exchange),
    );

    let token = exchange().response.access_token;
    let verifier = TxnTokenVerifier::from_keys(DOMAIN, issuer.public_keys());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    c.bench_function("Txn-Token verify (ES256, cached JWKS)", |b| {
        b.to_async(&rt)
            .iter(|| async { verifier.verify(&token).await.expect("verify") })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = txn_token
}
criterion_main!(benches);
