//! One full pipeline pass over the in-memory transport: publish a prepared
//! message, receive it, and let the processor verify the reference, obtain a
//! Txn-Token from the in-process TTS, run trust elevation on the real Cedar
//! PDP (the example bundle), record the decision, dispatch and ack — once
//! with a per-context Txn-Token cache (repeated context) and once with a
//! token exchange per message.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use elevate_cedar::CedarPdp;
use elevate_core::ctxref::{ContextRefMinter, ContextRefVerifier, VerifyPolicy};
use elevate_core::decision::{DecisionRecord, DecisionSink, SinkError};
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::memory::MemoryBroker;
use elevate_core::pdp::PolicyDecisionPoint;
use elevate_core::pdp_cache::CachingPdp;
use elevate_core::producer::{ProducerGuard, PublishRequest, SubjectContext};
use elevate_core::scope::Scope;
use elevate_core::settle::{Outcome, Processor};
use elevate_core::token::TokenSource;
use elevate_core::token_cache::CachingTokenSource;
use elevate_core::{FixedAction, Guard, OutboundMessage, SubjectKind, handler_fn};
use elevate_tts::{InProcessTts, Issuer, IssuerSettings};

const PRODUCER: &str = "spiffe://elevate.example/orders-api";
const CONSUMER: &str = "spiffe://elevate.example/test-worker";
const QUEUE: &str = "bench";

/// Serializes each record as the file sink does, without the disk.
struct SerializingSink;

impl DecisionSink for SerializingSink {
    fn record(&self, rec: &DecisionRecord) -> Result<(), SinkError> {
        std::hint::black_box(serde_json::to_vec(rec).map_err(|e| SinkError {
            sink: "bench".into(),
            reason: e.to_string(),
        })?);
        Ok(())
    }
}

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let pdp = Arc::new(CedarPdp::load_dir(bundle).expect("bundle"));
    let producer_key = SigningKey::generate(SigningAlg::ES256, "p1").expect("key");
    let consumer_key = SigningKey::generate(SigningAlg::EdDSA, "c1").expect("key");
    let issuer = Issuer::generate(IssuerSettings::new("elevate.example")).expect("issuer");
    let scope = Scope::parse("test.process");
    issuer
        .register_workload(PRODUCER, producer_key.public_jwk(), &scope)
        .expect("register");
    issuer
        .register_workload(CONSUMER, consumer_key.public_jwk(), &scope)
        .expect("register");
    let mut keys = KeySet::new();
    keys.insert_workload_key(PRODUCER, &producer_key)
        .expect("jwk");
    let producer = ProducerGuard::new(
        ContextRefMinter::new(PRODUCER, producer_key, Duration::from_secs(3600)),
        pdp.clone(),
    );
    let subject = SubjectContext {
        subject: "carol".into(),
        sub_kind: SubjectKind::Human,
        txn: "txn-bench".into(),
        scope: scope.clone(),
    };
    let audience = [CONSUMER.to_string()];
    let prepared = rt
        .block_on(producer.prepare(
            &PublishRequest {
                subject: &subject,
                action: "test.process",
                audience: &audience,
                destination: QUEUE,
                scope: None,
            },
            OutboundMessage {
                headers: Default::default(),
                payload: br#"{"order":42,"amount":120}"#.to_vec(),
            },
        ))
        .expect("prepare");

    // (cached Txn-Token, cached decisions): the repeated-context setup;
    // (cached Txn-Token, Cedar every time); (exchange per message, Cedar every time).
    for (cached, cached_pdp) in [(true, true), (true, false), (false, false)] {
        let tts: Arc<dyn TokenSource> = Arc::new(InProcessTts::new(
            issuer.clone(),
            CONSUMER,
            consumer_key.clone(),
        ));
        let tokens: Arc<dyn TokenSource> = if cached {
            Arc::new(CachingTokenSource::new(tts, 1024, Duration::from_secs(10)))
        } else {
            tts
        };
        let guard = Guard::new(
            CONSUMER,
            ContextRefVerifier::new(keys.clone(), VerifyPolicy::new(CONSUMER)),
            tokens,
            if cached_pdp {
                Arc::new(CachingPdp::new(pdp.clone(), 1024)) as Arc<dyn PolicyDecisionPoint>
            } else {
                pdp.clone()
            },
            Arc::new(SerializingSink),
            Arc::new(FixedAction::new("test.process", "Destination")),
        );
        let broker = MemoryBroker::new();
        let processor = Processor::new(
            Arc::new(guard),
            Arc::new(handler_fn(|_, _| async { Ok(()) })),
            Arc::new(broker.dead_letter_queue("bench.dlq")),
        );
        let name = match (cached, cached_pdp) {
            (true, true) => {
                "pipeline pass, memory transport, cached Txn-Token and decisions (repeated context)"
            }
            (true, false) => "pipeline pass, memory transport, cached Txn-Token, Cedar every time",
            _ => "pipeline pass, memory transport, in-process TTS exchange per message",
        };
        c.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                broker.publish(QUEUE, prepared.headers.clone(), prepared.payload.clone());
                let d = broker
                    .receive(QUEUE, Duration::from_secs(1))
                    .await
                    .expect("delivery");
                let out = processor.process(d).await.expect("settled");
                assert!(matches!(out, Outcome::Handled { .. }), "{out:?}");
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = pipeline
}
criterion_main!(benches);
