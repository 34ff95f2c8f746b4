//! Unit tests of the guard pipeline and settlement over the in-memory
//! transport, with test doubles for the token source and the PDP (the real
//! TTS and Cedar engine are exercised by the integration tests).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use elevate_core::ctxref::{ContextRefMinter, ContextRefVerifier, VerifyPolicy};
use elevate_core::deadletter::{H_DECISION_ID, H_REASON, H_SOURCE, H_VERDICT};
use elevate_core::decision::{DecisionRecord, DecisionSink, MemorySink, SinkError};
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::memory::MemoryBroker;
use elevate_core::pdp::{AccessDecision, AccessRequest, PdpError, PolicyDecisionPoint};
use elevate_core::producer::{ProducerGuard, PublishRequest, SubjectContext};
use elevate_core::retry::RetryPolicy;
use elevate_core::scope::Scope;
use elevate_core::settle::{
    Delivery, HandlerError, Outcome, Processor, RedeliveryMode, TransportError,
};
use elevate_core::token::{
    SecretToken, TokenError, TokenRequest, TokenSource, TxnToken, TxnTokenClaims,
};
use elevate_core::*;

const PRODUCER: &str = "spiffe://t/producer";
const WORKER: &str = "spiffe://t/worker";
const Q: &str = "jobs";
const DLQ: &str = "jobs.dlq";

/// Test double: mints an unsigned-but-consistent token, or fails on demand.
#[derive(Default)]
struct FakeTokens {
    down: AtomicBool,
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl TokenSource for FakeTokens {
    async fn acquire(&self, req: &TokenRequest<'_>) -> Result<TxnToken, TokenError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(TokenError::Unavailable {
                reason: "connection refused".into(),
                retry_after: None,
            });
        }
        let c = &req.reference.claims;
        Ok(TxnToken {
            token: SecretToken::new(format!("tok-{}", c.jti)),
            claims: std::sync::Arc::new(TxnTokenClaims {
                iat: c.iat,
                exp: c.iat + 60,
                aud: vec!["t".into()],
                txn: c.txn.clone(),
                sub: c.sub.clone(),
                scope: req.scope.to_string(),
                req_wl: WORKER.into(),
                jti: None,
                tctx: None,
                rctx: None,
            }),
        })
    }
}

/// Test double: permits everything except subjects in `denied` doing anything themselves.
struct FakePdp {
    denied: HashSet<String>,
}

#[async_trait::async_trait]
impl PolicyDecisionPoint for FakePdp {
    async fn evaluate(&self, req: &AccessRequest) -> Result<AccessDecision, PdpError> {
        let allowed = !self.denied.contains(&req.subject.id);
        Ok(AccessDecision {
            allowed,
            policies: vec![],
            errors: vec![],
        })
    }
    fn policy_version(&self) -> String {
        "test".into()
    }
}

/// Test double: a decision log that can be made to fail.
#[derive(Default)]
struct FlakySink {
    inner: MemorySink,
    failing: AtomicBool,
}

impl DecisionSink for FlakySink {
    fn record(&self, rec: &DecisionRecord) -> Result<(), SinkError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(SinkError {
                sink: "flaky".into(),
                reason: "disk full".into(),
            });
        }
        self.inner.record(rec)
    }
}

struct Env {
    broker: MemoryBroker,
    producer: ProducerGuard,
    tokens: Arc<FakeTokens>,
    log: Arc<FlakySink>,
    handled: Arc<parking_lot::Mutex<Vec<(String, AuthContext)>>>,
    processor: Arc<Processor>,
}

fn env(fail_handler: Option<HandlerError>) -> Env {
    let key = SigningKey::generate(SigningAlg::ES256, "p1").unwrap();
    let mut keys = KeySet::new();
    keys.insert_workload_key(PRODUCER, &key).unwrap();
    let pdp = Arc::new(FakePdp {
        denied: ["mallory".to_string()].into_iter().collect(),
    });
    let producer = ProducerGuard::new(
        ContextRefMinter::new(PRODUCER, key, Duration::from_secs(300)),
        pdp.clone(),
    );
    let tokens = Arc::new(FakeTokens::default());
    let log = Arc::new(FlakySink::default());
    let guard = Guard::new(
        WORKER,
        ContextRefVerifier::new(keys, VerifyPolicy::new(WORKER)),
        tokens.clone(),
        pdp,
        log.clone(),
        Arc::new(FixedAction::new("job.run", "Queue")),
    );
    let handled = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let h = handled.clone();
    let handler = handler_fn(move |msg: InboundMessage, auth: AuthContext| {
        let h = h.clone();
        let fail = fail_handler.clone();
        async move {
            if msg.payload.as_ref() == b"panic" {
                panic!("handler bug on {}", auth.subject());
            }
            if let Some(e) = fail {
                return Err(e);
            }
            h.lock()
                .push((String::from_utf8_lossy(&msg.payload).into_owned(), auth));
            Ok(())
        }
    });
    let broker = MemoryBroker::new();
    let fast = RetryPolicy {
        max_attempts: 4,
        max_elapsed: None,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        factor: 2.0,
        jitter: false,
    };
    let processor = Arc::new(
        Processor::new(
            Arc::new(guard),
            Arc::new(handler),
            Arc::new(broker.dead_letter_queue(DLQ)),
        )
        .with_retry(fast)
        .with_handler_retry(fast),
    );
    Env {
        broker,
        producer,
        tokens,
        log,
        handled,
        processor,
    }
}

fn subject(name: &str) -> SubjectContext {
    SubjectContext {
        subject: name.into(),
        sub_kind: SubjectKind::Human,
        txn: format!("txn-{name}"),
        scope: Scope::parse("job.run"),
    }
}

async fn publish(e: &Env, who: &str, body: &str, headers: Headers) {
    let s = subject(who);
    let p = e
        .producer
        .prepare(
            &PublishRequest {
                subject: &s,
                action: "job.run",
                audience: &[WORKER.to_string()],
                destination: Q,
                scope: None,
            },
            OutboundMessage {
                headers,
                payload: body.as_bytes().to_vec(),
            },
        )
        .await
        .unwrap();
    e.broker.publish(Q, p.headers, p.payload);
}

async fn run_until_idle(e: &Env) -> Vec<Outcome> {
    let mut out = vec![];
    while let Some(d) = e.broker.receive(Q, Duration::from_millis(300)).await {
        out.push(e.processor.process(d).await.unwrap());
    }
    out
}

#[tokio::test]
async fn permit_dispatches_with_auth_context_and_acks() {
    let e = env(None);
    publish(&e, "alice", "one", Headers::new()).await;
    let out = run_until_idle(&e).await;
    assert!(matches!(out[..], [Outcome::Handled { .. }]));
    let h = e.handled.lock();
    assert_eq!(h[0].0, "one");
    assert_eq!(h[0].1.subject(), "alice");
    assert_eq!(h[0].1.workload(), WORKER);
    assert_eq!(h[0].1.producer(), PRODUCER);
    assert_eq!(h[0].1.chain().to_vec(), vec![PRODUCER.to_string()]);
    assert_eq!(e.broker.unacked_len(Q), 0);
    let recs = e.log.inner.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].verdict, Verdict::Permit);
    assert!(recs[0].txn_token_sha256.is_some());
    // the record never holds the token itself
    let line = serde_json::to_string(&recs[0]).unwrap();
    assert!(!line.contains(h[0].1.txn_token().token.expose()));
}

#[tokio::test]
async fn deny_dead_letters_with_envelope_then_acks() {
    let e = env(None);
    publish(&e, "mallory", "bad", Headers::new()).await;
    let out = run_until_idle(&e).await;
    assert!(matches!(
        &out[..],
        [Outcome::DeadLettered {
            reason: Reason::SubjectDenied,
            ..
        }]
    ));
    assert!(e.handled.lock().is_empty());
    let dl = e.broker.drain(DLQ);
    assert_eq!(dl.len(), 1);
    let h = &dl[0].headers;
    assert_eq!(h.get_str(H_VERDICT), Some("deny"));
    assert_eq!(h.get_str(H_REASON), Some("subject-denied"));
    assert!(h.get_str(H_DECISION_ID).is_some());
    assert!(h.get_str(H_SOURCE).unwrap().contains("\"queue\":\"jobs\""));
    assert!(
        h.get(CTX_REF_HEADER).is_some(),
        "reference kept so a replay re-runs the policy"
    );
    assert_eq!(&dl[0].payload[..], b"bad");
}

#[tokio::test]
async fn credential_in_message_is_quarantined_and_stripped_from_the_dead_letter() {
    let e = env(None);
    publish(&e, "alice", "x", Headers::new()).await;
    // an intermediary adds a bearer token after the producer
    let mut m = e.broker.drain(Q).remove(0);
    m.headers
        .append("X-Forward-Auth", "Bearer secret-token-value");
    e.broker.publish(Q, m.headers, m.payload);
    let out = run_until_idle(&e).await;
    assert!(matches!(
        &out[..],
        [Outcome::DeadLettered {
            reason: Reason::CredentialInMessage,
            ..
        }]
    ));
    let dl = e.broker.drain(DLQ);
    assert_eq!(dl[0].headers.get_str(H_VERDICT), Some("quarantine"));
    assert!(dl[0].headers.get("x-forward-auth").is_none());
    assert_eq!(
        e.tokens.calls.load(Ordering::SeqCst),
        0,
        "no exchange for a quarantined message"
    );
}

#[tokio::test]
async fn missing_reference_is_denied() {
    let e = env(None);
    e.broker.publish(Q, Headers::new(), &b"naked"[..]);
    let out = run_until_idle(&e).await;
    assert!(matches!(
        &out[..],
        [Outcome::DeadLettered {
            reason: Reason::MissingContext,
            ..
        }]
    ));
}

#[tokio::test]
async fn retry_then_recovery() {
    let e = env(None);
    e.tokens.down.store(true, Ordering::SeqCst);
    publish(&e, "alice", "later", Headers::new()).await;
    let d = e
        .broker
        .receive(Q, Duration::from_millis(100))
        .await
        .unwrap();
    let o = e.processor.process(d).await.unwrap();
    assert!(matches!(
        o,
        Outcome::Redelivering {
            reason: Reason::TtsUnavailable,
            ..
        }
    ));
    assert!(e.handled.lock().is_empty());
    e.tokens.down.store(false, Ordering::SeqCst);
    let out = run_until_idle(&e).await;
    assert!(matches!(&out[..], [Outcome::Handled { .. }]));
    assert_eq!(e.handled.lock().len(), 1);
    assert!(e.broker.drain(DLQ).is_empty());
}

#[tokio::test]
async fn retries_exhausted_dead_letters_never_dispatches() {
    let e = env(None);
    e.tokens.down.store(true, Ordering::SeqCst);
    publish(&e, "alice", "never", Headers::new()).await;
    let out = run_until_idle(&e).await;
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(matches!(
        out.last(),
        Some(Outcome::DeadLettered {
            reason: Reason::RetriesExhausted,
            ..
        })
    ));
    assert!(e.handled.lock().is_empty());
    let dl = e.broker.drain(DLQ);
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].headers.get_str(H_REASON), Some("retries-exhausted"));
}

#[tokio::test]
async fn decision_log_failure_is_never_silent_and_never_dispatches() {
    let e = env(None);
    e.log.failing.store(true, Ordering::SeqCst);
    publish(&e, "alice", "x", Headers::new()).await;
    let d = e
        .broker
        .receive(Q, Duration::from_millis(100))
        .await
        .unwrap();
    let o = e.processor.process(d).await.unwrap();
    assert!(matches!(
        o,
        Outcome::Redelivering {
            reason: Reason::DecisionLogUnavailable,
            ..
        }
    ));
    assert!(e.handled.lock().is_empty());
    e.log.failing.store(false, Ordering::SeqCst);
    let out = run_until_idle(&e).await;
    assert!(matches!(&out[..], [Outcome::Handled { .. }]));
}

#[tokio::test]
async fn transient_handler_errors_retry_then_dead_letter() {
    let e = env(Some(HandlerError::Transient("db down".into())));
    publish(&e, "alice", "x", Headers::new()).await;
    let out = run_until_idle(&e).await;
    assert!(matches!(
        out.last(),
        Some(Outcome::DeadLettered {
            reason: Reason::HandlerFailed,
            ..
        })
    ));
    assert_eq!(out.len(), 4);
    let e = env(Some(HandlerError::Permanent("bad input".into())));
    publish(&e, "alice", "x", Headers::new()).await;
    let out = run_until_idle(&e).await;
    assert!(matches!(
        &out[..],
        [Outcome::DeadLettered {
            reason: Reason::HandlerFailed,
            ..
        }]
    ));
}

#[tokio::test]
async fn a_panicking_handler_dead_letters_instead_of_unwinding() {
    let e = env(None);
    publish(&e, "alice", "panic", Headers::new()).await;
    publish(&e, "alice", "after", Headers::new()).await;
    let out = run_until_idle(&e).await;
    assert!(
        matches!(
            &out[..],
            [
                Outcome::DeadLettered {
                    reason: Reason::HandlerFailed,
                    ..
                },
                Outcome::Handled { .. }
            ]
        ),
        "{out:?}"
    );
    let letters = e.broker.drain(DLQ);
    assert_eq!(letters.len(), 1);
    assert_eq!(e.broker.unacked_len(Q), 0);
    assert_eq!(
        e.handled.lock().len(),
        1,
        "the next message is still handled"
    );
}

#[tokio::test]
async fn counts_are_conserved() {
    let e = env(None);
    for i in 0..60 {
        let who = ["alice", "bob", "mallory"][i % 3];
        publish(&e, who, &format!("m{i}"), Headers::new()).await;
    }
    let out = run_until_idle(&e).await;
    let handled = out
        .iter()
        .filter(|o| matches!(o, Outcome::Handled { .. }))
        .count();
    let dead = e.broker.drain(DLQ).len();
    assert_eq!(handled, 40);
    assert_eq!(dead, 20);
    assert_eq!(handled + dead, 60);
}

/// A delivery that retries in place (as a Kafka partition does).
struct InPlace(elevate_core::memory::MemoryDelivery);

#[async_trait::async_trait]
impl Delivery for InPlace {
    fn message(&self) -> &InboundMessage {
        self.0.message()
    }
    async fn ack(self) -> Result<(), TransportError> {
        self.0.ack().await
    }
    async fn redeliver(self, _: Duration) -> Result<(), TransportError> {
        panic!("in-place deliveries are never handed back")
    }
    fn redelivery_mode(&self) -> RedeliveryMode {
        RedeliveryMode::InPlace
    }
}

#[tokio::test]
async fn in_place_retry_waits_then_recovers_or_exhausts() {
    let e = env(None);
    e.tokens.down.store(true, Ordering::SeqCst);
    publish(&e, "alice", "x", Headers::new()).await;
    let d = e
        .broker
        .receive(Q, Duration::from_millis(100))
        .await
        .unwrap();
    let tokens = e.tokens.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(12)).await;
        tokens.down.store(false, Ordering::SeqCst);
    });
    let o = e.processor.process(InPlace(d)).await.unwrap();
    assert!(matches!(o, Outcome::Handled { .. }), "{o:?}");
    // and when the outage outlasts the budget: dead letter, no dispatch
    e.tokens.down.store(true, Ordering::SeqCst);
    publish(&e, "alice", "y", Headers::new()).await;
    let d = e
        .broker
        .receive(Q, Duration::from_millis(100))
        .await
        .unwrap();
    let o = e.processor.process(InPlace(d)).await.unwrap();
    assert!(
        matches!(
            o,
            Outcome::DeadLettered {
                reason: Reason::RetriesExhausted,
                ..
            }
        ),
        "{o:?}"
    );
    assert_eq!(e.handled.lock().len(), 1);
}

#[tokio::test]
async fn producer_strips_tokens_before_the_wire() {
    let e = env(None);
    let headers: Headers = [("Authorization", "Bearer abc.def.ghi"), ("x-keep", "1")]
        .into_iter()
        .collect();
    let s = subject("alice");
    let p = e
        .producer
        .prepare(
            &PublishRequest {
                subject: &s,
                action: "job.run",
                audience: &[WORKER.to_string()],
                destination: Q,
                scope: None,
            },
            OutboundMessage {
                headers,
                payload: br#"{"access_token":"secret","n":1}"#.to_vec(),
            },
        )
        .await
        .unwrap();
    assert!(p.headers.get("authorization").is_none());
    assert_eq!(p.headers.get_str("x-keep"), Some("1"));
    assert!(!String::from_utf8_lossy(&p.payload).contains("secret"));
    assert_eq!(p.stripped.len(), 2);
    // a scope the subject lacks is refused before anything is signed
    let err = e
        .producer
        .prepare(
            &PublishRequest {
                subject: &s,
                action: "admin.wipe",
                audience: &[WORKER.to_string()],
                destination: Q,
                scope: None,
            },
            OutboundMessage::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        elevate_core::producer::PublishError::ScopeInsufficient { .. }
    ));
}

/// Verified references for alice on `Q`, one per entry of `txns` (the
/// origin transaction of each), as a consumer would hand them to its token source.
fn verified_refs(txns: &[&str]) -> Vec<elevate_core::ctxref::VerifiedRef> {
    let key = SigningKey::generate(SigningAlg::ES256, "p1").unwrap();
    let mut keys = KeySet::new();
    keys.insert_workload_key(PRODUCER, &key).unwrap();
    let minter = ContextRefMinter::new(PRODUCER, key, Duration::from_secs(300));
    let verifier = ContextRefVerifier::new(keys, VerifyPolicy::new(WORKER));
    let scope = Scope::parse("job.run");
    txns.iter()
        .enumerate()
        .map(|(i, txn)| {
            let body = format!("m{i}");
            let r = minter
                .mint(&elevate_core::ctxref::MintRequest {
                    subject: "alice",
                    sub_kind: SubjectKind::Human,
                    audience: &[WORKER.to_string()],
                    scope: &scope,
                    txn,
                    destination: Q,
                    payload: body.as_bytes(),
                })
                .unwrap();
            verifier.verify(&r.token, Q, body.as_bytes()).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn one_txn_token_per_context_never_across_contexts() {
    use elevate_core::token_cache::CachingTokenSource;
    let inner = Arc::new(FakeTokens::default());
    let cache = CachingTokenSource::new(inner.clone(), 100, Duration::from_secs(5));
    let scope = Scope::parse("job.run");
    let mut tokens = vec![];
    for v in verified_refs(&["t1", "t1", "t1", "t2"]) {
        let req = TokenRequest {
            reference: &v,
            scope: &scope,
            request_details: serde_json::Value::Null.into(),
        };
        tokens.push(cache.acquire(&req).await.unwrap());
    }
    assert_eq!(
        inner.calls.load(Ordering::SeqCst),
        2,
        "one exchange per origin context"
    );
    assert_eq!(tokens[0].token, tokens[2].token);
    assert_ne!(tokens[0].token, tokens[3].token);
    assert_eq!(tokens[3].claims.txn, "t2");
}

/// A token source that takes its time, so that concurrent misses overlap.
struct SlowTokens(FakeTokens);

#[async_trait::async_trait]
impl TokenSource for SlowTokens {
    async fn acquire(&self, req: &TokenRequest<'_>) -> Result<TxnToken, TokenError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.0.acquire(req).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_context_make_one_exchange() {
    use elevate_core::token_cache::CachingTokenSource;
    let inner = Arc::new(SlowTokens(FakeTokens::default()));
    let cache = Arc::new(CachingTokenSource::new(
        inner.clone(),
        100,
        Duration::from_secs(5),
    ));
    let scope = Scope::parse("job.run");
    let txns: Vec<&str> = (0..16).map(|i| if i < 12 { "t1" } else { "t2" }).collect();
    let mut tasks = vec![];
    for v in verified_refs(&txns) {
        let (cache, scope) = (cache.clone(), scope.clone());
        tasks.push(tokio::spawn(async move {
            let req = TokenRequest {
                reference: &v,
                scope: &scope,
                request_details: serde_json::Value::Null.into(),
            };
            cache.acquire(&req).await.unwrap()
        }));
    }
    let mut tokens = vec![];
    for t in tasks {
        tokens.push(t.await.unwrap());
    }
    assert_eq!(
        inner.0.calls.load(Ordering::SeqCst),
        2,
        "16 concurrent messages of two contexts: two exchanges"
    );
    assert!(tokens[..12].iter().all(|t| t.claims.txn == "t1"));
    assert!(tokens[12..].iter().all(|t| t.claims.txn == "t2"));
}
