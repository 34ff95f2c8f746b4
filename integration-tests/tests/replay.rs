//! Replay protection shared by a consumer group through Redis (127.0.0.1:6379
//! or REDIS_URL): a replayed message is quarantined by whichever instance sees
//! it; a redelivery after a crash is processed, not quarantined.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::ctxbind::BindingMode;
use elevate_core::deadletter::H_REASON;
use elevate_core::memory::MemoryBroker;
use elevate_core::settle::{Delivery, Outcome};
use elevate_core::{Headers, OutboundMessage};
use elevate_testing::env::{Recorder, TestEnv, with_binding};
use elevate_testing::wait::redis_seen_set;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_seen_set() {
    with_binding(BindingMode::PerMessage, shared_seen_set()).await;
}

/// Per context, the seen-set keys on the message binding's `jti`: a
/// replayed binding (same MAC, same context reference) is quarantined, while
/// the next message of the same context (same reference, new binding) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_seen_set_per_context() {
    with_binding(BindingMode::PerContext, shared_seen_set()).await;
}

/// One guarded message to `q` in `subject`'s origin transaction.
async fn prepare(
    env: &TestEnv,
    subject: &elevate_core::producer::SubjectContext,
    audience: &[String],
) -> elevate_core::producer::PreparedMessage {
    env.producer
        .prepare(
            &env.publish_request(subject, audience, "q"),
            OutboundMessage {
                headers: Headers::new(),
                payload: b"pay".to_vec(),
            },
        )
        .await
        .unwrap()
}

async fn shared_seen_set() {
    let env = TestEnv::start().await;
    let broker = MemoryBroker::new();
    let seen = redis_seen_set().await;
    let rec = Recorder::new();
    // two consumer instances of one group: separate guards, one shared seen-set
    let a = env
        .processor_with(rec.handler(), TestEnv::patient_retry(), Some(seen.clone()))
        .with_dead_letters(Arc::new(broker.dead_letter_queue("q.dlq")));
    let b = env
        .processor_with(rec.handler(), TestEnv::patient_retry(), Some(seen.clone()))
        .with_dead_letters(Arc::new(broker.dead_letter_queue("q.dlq")));

    let subject = env.subject("alice");
    let audience = env.audience();
    let p = prepare(&env, &subject, &audience).await;
    broker.publish("q", p.headers.clone(), p.payload.clone());

    // instance A takes it and crashes before settling: the broker redelivers
    let d = broker.receive("q", Duration::from_secs(1)).await.unwrap();
    assert_eq!(d.message().delivery_attempt, 1);
    let crashed = env
        .processor_with(
            Arc::new(elevate_core::handler_fn(|_, _| async {
                Err(elevate_core::HandlerError::Transient("crash".into()))
            })),
            TestEnv::patient_retry(),
            Some(seen.clone()),
        )
        .with_dead_letters(Arc::new(broker.dead_letter_queue("q.dlq")));
    let o = crashed.process(d).await.unwrap();
    assert!(matches!(o, Outcome::Redelivering { .. }), "{o:?}");

    // the redelivery is processed by instance B, not quarantined
    let d = broker.receive("q", Duration::from_secs(2)).await.unwrap();
    assert_eq!(d.message().delivery_attempt, 2);
    let o = b.process(d).await.unwrap();
    assert!(
        matches!(o, Outcome::Handled { .. }),
        "redelivery must be handled: {o:?}"
    );

    // an attacker replays the same message (same reference, same payload) later:
    // whichever instance sees it quarantines it
    for instance in [&a, &b] {
        broker.publish("q", p.headers.clone(), p.payload.clone());
        let d = broker.receive("q", Duration::from_secs(1)).await.unwrap();
        let o = instance.process(d).await.unwrap();
        assert!(
            matches!(
                o,
                Outcome::DeadLettered {
                    reason: elevate_core::Reason::Replayed,
                    ..
                }
            ),
            "{o:?}"
        );
    }
    assert_eq!(rec.count(), 1, "handled exactly once");

    // the next message of the same origin context is new, not a replay
    let next = prepare(&env, &subject, &audience).await;
    assert_eq!(
        next.headers.get(elevate_core::CTX_REF_HEADER)
            == p.headers.get(elevate_core::CTX_REF_HEADER),
        env.binding() == BindingMode::PerContext,
        "per context, both messages carry the one context reference"
    );
    broker.publish("q", next.headers.clone(), next.payload.clone());
    let d = broker.receive("q", Duration::from_secs(1)).await.unwrap();
    let o = a.process(d).await.unwrap();
    assert!(matches!(o, Outcome::Handled { .. }), "{o:?}");
    assert_eq!(rec.count(), 2);
    let dl = broker.drain("q.dlq");
    assert_eq!(dl.len(), 2);
    assert!(
        dl.iter()
            .all(|m| m.headers.get_str(H_REASON) == Some("replayed"))
    );
}
