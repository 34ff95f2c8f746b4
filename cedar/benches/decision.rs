//! One warm Cedar trust-elevation decision: `evaluate_all` of the two requests,
//! evaluated by Cedar, and answered by `CachingPdp` (same request, same policy version).

// criterion_group! and criterion_main! write public functions without doc comments.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use elevate_cedar::CedarPdp;
use elevate_core::pdp::{ElevationRequest, EntityRef, PolicyDecisionPoint};
use elevate_core::pdp_cache::CachingPdp;
use std::sync::Arc;

const BUNDLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policies");

fn decision(c: &mut Criterion) {
    let pdp = CedarPdp::load_dir(BUNDLE).expect("example bundle loads");
    let reqs = ElevationRequest {
        workload: "spiffe://elevate.example/invoice-worker".into(),
        subject: EntityRef::new("User", "alice"),
        action: "invoice.create".into(),
        resource: EntityRef::new("Destination", "invoices"),
        scope: vec!["invoice.create".into()],
        chain: vec!["spiffe://elevate.example/orders-api".into()],
        depth: 1,
        txn: "txn-bench".into(),
    }
    .requests();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    c.bench_function("one warm Cedar trust-elevation decision", |b| {
        b.to_async(&rt).iter(|| async {
            let d = pdp.evaluate_all(&reqs).await.expect("decision");
            assert!(d[0].allowed && d[1].allowed);
            d
        })
    });
    let cached = CachingPdp::new(Arc::new(pdp), 1024);
    c.bench_function(
        "one cached trust-elevation decision (CachingPdp hit)",
        |b| {
            b.to_async(&rt).iter(|| async {
                let d = cached.evaluate_all(&reqs).await.expect("decision");
                assert!(d[0].allowed && d[1].allowed);
                d
            })
        },
    );
}

criterion_group!(benches, decision);
criterion_main!(benches);
