//! NATS: the conformance suite on the real server (`NATS_URL`, default
//! `nats://127.0.0.1:4222`) for the JetStream guard and the core NATS guard,
//! plus the NATS acceptance tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use elevate_core::deadletter::{H_DECISION_ID, H_REASON, H_SOURCE, H_VERDICT};
use elevate_core::producer::PublishError;
use elevate_core::settle::Handler;
use elevate_core::{
    AuthContext, Coordinates, Headers, InboundMessage, OutboundMessage, handler_fn,
};
use elevate_nats::unreadable::{H_MALFORMED, MALFORMED_MESSAGE};
use elevate_nats::{GuardedConsumer, NatsDeadLetters, UnreadableMessages};
use elevate_testing::binding::BrokerBinding;
use elevate_testing::env::{ACTION, CONSUMER, PRODUCER, TestEnv};
use elevate_testing::nats::{NatsBinding, STREAM_PREFIX, StreamRecord, WorkerConfig};
use elevate_testing::wait::poll_until;
use futures::StreamExt;
use parking_lot::Mutex;

mod jetstream {
    use super::*;
    elevate_testing::conformance_suite!(NatsBinding::jetstream());
    elevate_testing::delivery_contract!(NatsBinding::jetstream());
}

mod core_nats {
    use super::*;
    elevate_testing::conformance_suite!(NatsBinding::core());
}

/// One handler call.
#[derive(Debug, Clone)]
struct Call {
    subject: String,
    stream_seq: Option<u64>,
    attempt: u32,
    payload: serde_json::Value,
    auth_subject: String,
    auth_workload: String,
    auth_producer: String,
    auth_action: String,
}

#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Call>>>);

impl Calls {
    fn handler(&self, delay: Duration) -> Arc<dyn Handler> {
        let calls = self.0.clone();
        Arc::new(handler_fn(move |msg: InboundMessage, auth: AuthContext| {
            let calls = calls.clone();
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let c = &msg.coordinates;
                let subject = c
                    .field_str("subject")
                    .map_or_else(|| c.to_string(), str::to_string);
                let stream_seq = c
                    .field_i64("stream_seq")
                    .and_then(|q| u64::try_from(q).ok());
                calls.lock().push(Call {
                    subject,
                    stream_seq,
                    attempt: msg.delivery_attempt,
                    payload: serde_json::from_slice(&msg.payload)
                        .unwrap_or(serde_json::Value::Null),
                    auth_subject: auth.subject().to_string(),
                    auth_workload: auth.workload().to_string(),
                    auth_producer: auth.producer().to_string(),
                    auth_action: auth.action().to_string(),
                });
                Ok(())
            }
        }))
    }

    fn count(&self) -> usize {
        self.0.lock().len()
    }

    fn snapshot(&self) -> Vec<Call> {
        self.0.lock().clone()
    }

    fn distinct(&self) -> usize {
        self.0
            .lock()
            .iter()
            .map(|c| c.payload["n"].as_u64().unwrap_or(u64::MAX))
            .collect::<HashSet<_>>()
            .len()
    }

    async fn wait_distinct(&self, n: usize, timeout: Duration) {
        poll_until(timeout, Duration::from_millis(25), || self.distinct() >= n).await;
    }
}

/// A fresh stream `<prefix>_<id>` on `<subj>.<id>.*` and its dead-letter stream.
struct Streams {
    stream: String,
    subject_prefix: String,
    dlq_stream: String,
    dlq_subject: String,
}

async fn streams(b: &NatsBinding, tag: &str) -> Streams {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let s = Streams {
        stream: format!("{STREAM_PREFIX}{tag}_{id}"),
        subject_prefix: format!("{}.{id}", tag.to_lowercase()),
        dlq_stream: format!("{STREAM_PREFIX}{tag}_{id}_DLQ"),
        dlq_subject: format!("{}.{id}.dead", tag.to_lowercase()),
    };
    b.create_stream(&s.stream, vec![format!("{}.in.*", s.subject_prefix)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.create_stream(&s.dlq_stream, vec![s.dlq_subject.clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s
}

async fn publish_json(
    b: &NatsBinding,
    env: &TestEnv,
    subject: &str,
    user: &str,
    body: serde_json::Value,
    headers: Headers,
) -> elevate_nats::Receipt {
    let who = env.subject(user);
    let audience = env.audience();
    let req = env.publish_request(&who, &audience, subject);
    b.publisher(&env.producer)
        .publish_jetstream(
            &req,
            OutboundMessage {
                headers,
                payload: serde_json::to_vec(&body).unwrap_or_default(),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("guarded publish: {e}"))
}

fn source_seq(letter: &StreamRecord) -> (String, u64) {
    let src: Coordinates =
        serde_json::from_str(letter.headers.get_str(H_SOURCE).expect("ztauth-source"))
            .expect("source JSON");
    match (src.field_str("stream"), src.field_i64("stream_seq")) {
        (Some(s), Some(q)) if src.broker() == "nats" => (s.to_string(), q as u64),
        _ => panic!("dead letter source is not a JetStream position: {src:?}"),
    }
}

async fn consumer_state(b: &NatsBinding, stream: &str, durable: &str) -> (usize, u64, usize) {
    let c = b
        .create_consumer(stream, durable, &WorkerConfig::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let info = c.get_info().await.unwrap_or_else(|e| panic!("{e}"));
    (info.num_ack_pending, info.num_pending, info.num_redelivered)
}

/// 1,000 messages from several subjects through one stream: permitted ones
/// handled with the right AuthContext, denied ones dead-lettered with decision
/// id, reason and source sequence; handled + dead-lettered = published; no
/// token the publisher was given is in any raw message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_from_several_subjects() {
    let b = NatsBinding::jetstream().await;
    let env = TestEnv::start().await;
    let s = streams(&b, "N1K").await;
    let users = ["alice", "carol", "mallory", "bob"];
    let kinds = ["email", "sms", "push"];
    let n = 1000usize;
    let t = Instant::now();
    let receipts: Vec<(usize, elevate_nats::Receipt)> = futures::stream::iter(0..n)
        .map(|i| {
            let (b, env, s) = (&b, &env, &s);
            async move {
                let user = users[i % users.len()];
                let subject = format!("{}.in.{}", s.subject_prefix, kinds[i % kinds.len()]);
                let mut headers = Headers::new();
                headers.append("Authorization", format!("Bearer bearer-{i}-secret"));
                headers.append("x-kind", kinds[i % kinds.len()]);
                let body = serde_json::json!({"n": i, "user": user, "access_token": format!("tok-{i}-secret"), "text": "hello"});
                (i, publish_json(b, env, &subject, user, body, headers).await)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let publish_rate = n as f64 / t.elapsed().as_secs_f64();
    let by_seq: HashMap<u64, usize> = receipts
        .iter()
        .map(|(i, r)| {
            let at =
                r.at.as_ref()
                    .expect("JetStream publishes return the stream ack");
            assert_eq!(at.field_str("stream"), Some(s.stream.as_str()));
            assert!(!r.duplicate);
            (at.field_i64("stream_seq").expect("sequence") as u64, *i)
        })
        .collect();
    assert_eq!(by_seq.len(), n);

    // raw messages read back carry no token the publisher was given
    let raw = b
        .read_stream(&s.stream, n, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(raw.len(), n);
    for m in &raw {
        let mut wire = String::from_utf8_lossy(&m.payload).into_owned();
        for (k, v) in m.headers.iter() {
            wire.push_str(k);
            wire.push_str(&String::from_utf8_lossy(v));
        }
        assert!(
            !wire.contains("-secret"),
            "a token reached the wire: {wire}"
        );
        assert!(m.headers.get(elevate_core::CTX_REF_HEADER).is_some());
        assert!(env.credentials().scan(&m.headers, &m.payload).is_empty());
    }

    let calls = Calls::default();
    let cfg = WorkerConfig {
        concurrency: 32,
        ..WorkerConfig::default()
    };
    let t = Instant::now();
    let worker = b
        .spawn_jetstream(
            &s.stream,
            "notifier",
            &s.dlq_subject,
            env.processor(calls.handler(Duration::ZERO)),
            &cfg,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let expected_handled = n / 2; // alice and carol; mallory is suspended, bob lacks the entitlement
    let letters = b
        .read_stream(
            &s.dlq_stream,
            n - expected_handled,
            Duration::from_secs(180),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    calls
        .wait_distinct(expected_handled, Duration::from_secs(180))
        .await;
    let elapsed = t.elapsed();
    worker.stop().await;
    eprintln!(
        "NATS JetStream guard: {n} messages settled in {elapsed:?} = {:.0} msg/s (concurrency 32, confirmed acks); guarded publish {publish_rate:.0} msg/s",
        n as f64 / elapsed.as_secs_f64()
    );

    let handled = calls.snapshot();
    assert_eq!(
        handled.len(),
        expected_handled,
        "each permitted message handled once"
    );
    assert_eq!(calls.distinct(), expected_handled);
    assert_eq!(letters.len(), n - expected_handled);
    assert_eq!(
        handled.len() + letters.len(),
        n,
        "handled + dead-lettered = published"
    );
    for c in &handled {
        let i = c.payload["n"].as_u64().expect("n") as usize;
        assert_eq!(c.auth_subject, users[i % users.len()]);
        assert!(c.auth_subject == "alice" || c.auth_subject == "carol");
        assert_eq!(c.auth_workload, CONSUMER);
        assert_eq!(c.auth_producer, PRODUCER);
        assert_eq!(c.auth_action, ACTION);
        assert_eq!(
            c.subject,
            format!("{}.in.{}", s.subject_prefix, kinds[i % kinds.len()])
        );
        assert_eq!(by_seq.get(&c.stream_seq.expect("stream seq")), Some(&i));
        assert!(c.payload.get("access_token").is_none());
    }
    let logged: HashSet<String> = env
        .decisions()
        .iter()
        .map(|d| d.decision_id.clone())
        .collect();
    let mut dead_seqs = HashSet::new();
    for l in &letters {
        let id = l.headers.get_str(H_DECISION_ID).expect("decision id");
        assert!(logged.contains(id), "decision {id} is in the decision log");
        assert_eq!(l.headers.get_str(H_VERDICT), Some("deny"));
        assert!(l.headers.get_str(H_REASON).is_some_and(|r| !r.is_empty()));
        let (stream, seq) = source_seq(l);
        assert_eq!(stream, s.stream);
        let i = *by_seq
            .get(&seq)
            .expect("dead letter points at a published message");
        assert!(["mallory", "bob"].contains(&users[i % users.len()]));
        let body: serde_json::Value = serde_json::from_slice(&l.payload).expect("original payload");
        assert_eq!(body["n"].as_u64(), Some(i as u64));
        dead_seqs.insert(seq);
    }
    assert_eq!(
        dead_seqs.len(),
        n - expected_handled,
        "one dead letter per denied message"
    );
    let (ack_pending, pending, _) = consumer_state(&b, &s.stream, "notifier").await;
    assert_eq!((ack_pending, pending), (0, 0), "everything settled");
}

/// Forged, tampered, expired, token-carrying and reference-less messages from
/// a plain async-nats client: 0 handler calls, every one dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_messages_never_reach_the_handler() {
    let b = NatsBinding::jetstream().await;
    let env = TestEnv::start().await;
    let s = streams(&b, "HOSTILE").await;
    let subject = format!("{}.in.x", s.subject_prefix);
    let hostile = env.hostile_messages(&subject);
    let copies = 4;
    let mut expected: Vec<String> = Vec::new();
    for _ in 0..copies {
        for (reason, headers, payload) in &hostile {
            b.publish_plain(&subject, headers, payload.clone())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            expected.push(reason.to_string());
        }
    }
    let calls = Calls::default();
    let worker = b
        .spawn_jetstream(
            &s.stream,
            "worker",
            &s.dlq_subject,
            env.processor(calls.handler(Duration::ZERO)),
            &WorkerConfig::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let letters = b
        .read_stream(&s.dlq_stream, expected.len(), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    worker.stop().await;
    assert_eq!(calls.count(), 0, "a hostile message reached the handler");
    let mut got: Vec<String> = letters
        .iter()
        .map(|l| l.headers.get_str(H_REASON).unwrap_or("").to_string())
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    let seqs: HashSet<u64> = letters.iter().map(|l| source_seq(l).1).collect();
    assert_eq!(seqs, (1..=expected.len() as u64).collect::<HashSet<_>>());
    for l in &letters {
        assert!(
            env.credentials().scan(&l.headers, &l.payload).is_empty(),
            "dead letters carry no credential"
        );
    }
    let (ack_pending, pending, _) = consumer_state(&b, &s.stream, "worker").await;
    assert_eq!((ack_pending, pending), (0, 0));
}

/// TTS stopped mid-stream: messages are nak'ed with a delay, none handled,
/// none lost; TTS back: they all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tts_outage_mid_stream_naks_and_recovers() {
    let b = NatsBinding::jetstream().await;
    let env = TestEnv::start().await;
    let s = streams(&b, "OUTAGE").await;
    let subject = format!("{}.in.x", s.subject_prefix);
    let calls = Calls::default();
    let cfg = WorkerConfig {
        concurrency: 8,
        ..WorkerConfig::default()
    };
    let worker = b
        .spawn_jetstream(
            &s.stream,
            "worker",
            &s.dlq_subject,
            env.processor(calls.handler(Duration::ZERO)),
            &cfg,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..30 {
        publish_json(
            &b,
            &env,
            &subject,
            "alice",
            serde_json::json!({"n": i}),
            Headers::new(),
        )
        .await;
    }
    calls.wait_distinct(30, Duration::from_secs(60)).await;
    assert_eq!(calls.distinct(), 30);
    env.stop_tts().await;
    for i in 30..60 {
        publish_json(
            &b,
            &env,
            &subject,
            "alice",
            serde_json::json!({"n": i}),
            Headers::new(),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(calls.count(), 30, "nothing is handled without a Txn-Token");
    assert!(
        b.read_stream(&s.dlq_stream, 0, Duration::ZERO)
            .await
            .unwrap_or_default()
            .is_empty(),
        "nothing dead-lettered"
    );
    assert!(
        env.decisions()
            .iter()
            .any(|d| d.reason.code() == "tts-unavailable")
    );
    let (_, _, redelivered) = consumer_state(&b, &s.stream, "worker").await;
    assert!(
        redelivered > 0,
        "outage messages were nak'ed for redelivery"
    );
    env.start_tts().await;
    calls.wait_distinct(60, Duration::from_secs(60)).await;
    worker.stop().await;
    assert_eq!(
        calls.distinct(),
        60,
        "every message completes once the TTS is back"
    );
    assert_eq!(calls.count(), 60);
    assert!(
        calls.snapshot().iter().any(|c| c.attempt > 1),
        "completed on a later delivery"
    );
    assert!(
        b.read_stream(&s.dlq_stream, 0, Duration::ZERO)
            .await
            .unwrap_or_default()
            .is_empty()
    );
    let (ack_pending, pending, _) = consumer_state(&b, &s.stream, "worker").await;
    assert_eq!((ack_pending, pending), (0, 0));
}

/// A worker killed mid-stream and restarted loses nothing: the server
/// redelivers its unsettled messages after `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_loses_nothing() {
    let b = NatsBinding::jetstream().await;
    let env = TestEnv::start().await;
    let s = streams(&b, "KILL").await;
    let subject = format!("{}.in.x", s.subject_prefix);
    let n = 80;
    for i in 0..n {
        publish_json(
            &b,
            &env,
            &subject,
            "alice",
            serde_json::json!({"n": i}),
            Headers::new(),
        )
        .await;
    }
    let calls = Calls::default();
    let cfg = WorkerConfig {
        concurrency: 8,
        ack_wait: Duration::from_secs(2),
        max_deliver: -1,
    };
    let processor = env.processor(calls.handler(Duration::from_millis(200)));
    let first = b
        .spawn_jetstream(&s.stream, "worker", &s.dlq_subject, processor.clone(), &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    calls.wait_distinct(16, Duration::from_secs(60)).await;
    first.kill();
    let at_kill = calls.distinct();
    assert!(at_kill < n, "killed mid-stream");
    let (ack_pending, _, _) = consumer_state(&b, &s.stream, "worker").await;
    eprintln!("killed after {at_kill} handled, {ack_pending} unacked in flight");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = b
        .spawn_jetstream(&s.stream, "worker", &s.dlq_subject, processor, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    calls.wait_distinct(n, Duration::from_secs(90)).await;
    second.stop().await;
    assert_eq!(calls.distinct(), n, "nothing lost");
    assert!(calls.count() >= n);
    assert!(
        b.read_stream(&s.dlq_stream, 0, Duration::ZERO)
            .await
            .unwrap_or_default()
            .is_empty()
    );
    let (ack_pending, pending, _) = consumer_state(&b, &s.stream, "worker").await;
    assert_eq!((ack_pending, pending), (0, 0));
}

/// Core NATS guard (queue group of two): denied and hostile messages never
/// reach the handler and are dead-lettered; permitted ones are handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_guard_denied_never_reach_the_handler() {
    let b = NatsBinding::core().await;
    let env = TestEnv::start().await;
    let s = streams(&b, "CORE").await;
    let subject = format!("{}.in.x", s.subject_prefix);
    let calls = Calls::default();
    let processor = env.processor(calls.handler(Duration::ZERO));
    let w1 = b
        .spawn_core(&subject, "workers", &s.dlq_subject, processor.clone(), 8)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let w2 = b
        .spawn_core(&subject, "workers", &s.dlq_subject, processor, 8)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let publisher = b.publisher(&env.producer);
    for i in 0..40 {
        let user = if i % 2 == 0 { "alice" } else { "mallory" };
        let who = env.subject(user);
        let audience = env.audience();
        let req = env.publish_request(&who, &audience, &subject);
        let body = serde_json::json!({"n": i, "user": user});
        let r = publisher
            .publish(
                &req,
                OutboundMessage {
                    headers: Headers::new(),
                    payload: serde_json::to_vec(&body).unwrap_or_default(),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.at.is_none(), "core NATS has no stream ack");
    }
    publisher.flush().await.unwrap_or_else(|e| panic!("{e}"));
    let hostile = env.hostile_messages(&subject);
    for (_, headers, payload) in &hostile {
        BrokerBinding::publish_raw(
            &b,
            &elevate_testing::binding::Endpoint {
                name: s.stream.clone(),
                destination: subject.clone(),
                dead_letter: s.dlq_subject.clone(),
            },
            headers.clone(),
            payload.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let expected_dead = 20 + hostile.len();
    let letters = b
        .read_stream(&s.dlq_stream, expected_dead, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    calls.wait_distinct(20, Duration::from_secs(30)).await;
    w1.stop().await;
    w2.stop().await;
    let handled = calls.snapshot();
    assert!(
        handled
            .iter()
            .all(|c| c.auth_subject == "alice" && c.payload["user"] == "alice"),
        "a denied message reached the handler"
    );
    assert_eq!(
        handled.len(),
        20,
        "queue group: each permitted message handled once"
    );
    assert_eq!(calls.distinct(), 20);
    assert_eq!(letters.len(), expected_dead);
    let reasons: Vec<&str> = letters
        .iter()
        .filter_map(|l| l.headers.get_str(H_REASON))
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "subject-denied").count(),
        20
    );
    for l in &letters {
        assert!(l.headers.get_str(H_DECISION_ID).is_some());
        let src: Coordinates =
            serde_json::from_str(l.headers.get_str(H_SOURCE).unwrap_or("null")).expect("source");
        assert!(
            src.broker() == "nats" && src.field("stream").is_none(),
            "core NATS source has no stream"
        );
    }
}

/// Publisher: the stream ack comes back to the caller; a refused publish never reaches the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_returns_the_stream_ack_and_refusals_stay_local() {
    let b = NatsBinding::jetstream().await;
    let env = TestEnv::start().await;
    let s = streams(&b, "PUB").await;
    let subject = format!("{}.in.x", s.subject_prefix);
    let mut headers = Headers::new();
    headers.append("Nats-Msg-Id", "order-42");
    let first = publish_json(
        &b,
        &env,
        &subject,
        "alice",
        serde_json::json!({"n": 1}),
        headers.clone(),
    )
    .await;
    let again = publish_json(
        &b,
        &env,
        &subject,
        "alice",
        serde_json::json!({"n": 1}),
        headers,
    )
    .await;
    let a1 = first.at.clone().expect("stream ack");
    assert_eq!(
        (
            a1.field_str("stream"),
            a1.field_i64("stream_seq"),
            first.duplicate
        ),
        (Some(s.stream.as_str()), Some(1), false)
    );
    assert!(
        again.at.is_some() && again.duplicate,
        "same Nats-Msg-Id is de-duplicated by the stream"
    );
    assert_eq!(first.message_id.as_deref(), Some("order-42"));
    let plain = publish_json(
        &b,
        &env,
        &subject,
        "alice",
        serde_json::json!({"n": 2}),
        Headers::new(),
    )
    .await;
    assert_eq!(
        plain.message_id.as_deref(),
        Some(plain.reference_id.as_str()),
        "default Nats-Msg-Id is the reference id"
    );
    // an action outside the subject's scope is refused before the broker
    let who = env.subject("alice");
    let audience = env.audience();
    let mut req = env.publish_request(&who, &audience, &subject);
    req.action = "admin.delete";
    let refused = b
        .publisher(&env.producer)
        .publish_jetstream(&req, OutboundMessage::default())
        .await;
    assert!(
        matches!(refused, Err(PublishError::ScopeInsufficient { .. })),
        "{refused:?}"
    );
    let raw = b
        .read_stream(&s.stream, 2, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(raw.len(), 2, "the refused message is not in the stream");
    assert!(raw.iter().all(|m| m.subject == subject));
}

// ---------------------------------------------------------------------------
// Messages async-nats cannot read (header blocks its parser refuses), published
// raw by a hostile client: the server stores them without parsing the block.

/// Publishes `block` (a whole header block) and `payload` to `subject` over a
/// raw TCP connection speaking the NATS protocol (`HPUB`), with a reply inbox
/// so that the stream's ack comes back; returns the stream sequence.
async fn raw_hpub(url: &str, subject: &str, block: &[u8], payload: &[u8]) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("nats://");
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("raw connection to {addr}: {e}"));
    let inbox = format!("_INBOX.raw.{}", uuid::Uuid::new_v4().simple());
    let mut op = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\n\
         SUB {inbox} 1\r\nHPUB {subject} {inbox} {} {}\r\n",
        block.len(),
        block.len() + payload.len()
    )
    .into_bytes();
    op.extend_from_slice(block);
    op.extend_from_slice(payload);
    op.extend_from_slice(b"\r\n");
    conn.write_all(&op)
        .await
        .unwrap_or_else(|e| panic!("raw HPUB: {e}"));
    // read until the stream's ack: `MSG <inbox> 1 <n>\r\n{"stream":..,"seq":..}\r\n`
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(at) = text.find("-ERR") {
            panic!("server refused the raw publish: {}", &text[at..]);
        }
        if let Some(at) = text.find("MSG ") {
            let rest = &text[at..];
            if let Some((line, body)) = rest.split_once("\r\n")
                && let Some(n) = line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<usize>().ok())
                && body.len() >= n
            {
                let ack: serde_json::Value = serde_json::from_str(&body[..n])
                    .unwrap_or_else(|e| panic!("stream ack {:?}: {e}", &body[..n]));
                return ack["seq"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no stream sequence in the ack: {ack}"));
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no stream ack for the raw publish: {text:?}"))
            .unwrap_or_else(|e| panic!("raw read: {e}"));
        assert!(n > 0, "server closed the raw connection: {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A client that counts its `Disconnected` events.
async fn counting_client(url: &str) -> (async_nats::Client, Arc<AtomicU64>) {
    let disconnects = Arc::new(AtomicU64::new(0));
    let d = disconnects.clone();
    let client = async_nats::ConnectOptions::new()
        .event_callback(move |e| {
            let d = d.clone();
            async move {
                if matches!(e, async_nats::Event::Disconnected) {
                    d.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    (client, disconnects)
}

/// A guarded JetStream worker on `client` that dead-letters unreadable messages.
struct UnreadableWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), elevate_nats::Error>>,
}

async fn unreadable_worker(
    client: &async_nats::Client,
    s: &Streams,
    processor: Arc<elevate_core::settle::Processor>,
    every: Duration,
) -> UnreadableWorker {
    use async_nats::jetstream::{self, consumer};
    let js = jetstream::new(client.clone());
    let consumer: consumer::PullConsumer = js
        .get_stream(&s.stream)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get_or_create_consumer(
            "worker",
            consumer::pull::Config {
                durable_name: Some("worker".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: WorkerConfig::default().ack_wait,
                max_deliver: -1,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dead_letters: Arc<dyn elevate_core::DeadLetterPublisher> = Arc::new(
        NatsDeadLetters::jetstream(js.clone(), s.dlq_subject.clone()),
    );
    let processor = Arc::new(processor.with_dead_letters(dead_letters.clone()));
    let guarded = GuardedConsumer::new(consumer, processor)
        .fetch_expires(Duration::from_millis(500))
        .unreadable(UnreadableMessages::new(js).every(every));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(guarded.run(async move {
        let _ = stopped.await;
    }));
    UnreadableWorker { stop, task }
}

impl UnreadableWorker {
    async fn stop(self) -> Result<(), elevate_nats::Error> {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(20), self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("guard task: {e}"),
            Err(_) => panic!("guard did not stop"),
        }
    }
}

/// Checks one dead letter of an unreadable message.
fn assert_malformed_letter(
    env: &TestEnv,
    s: &Streams,
    letter: &StreamRecord,
    seq: u64,
    refusal: &str,
) {
    assert_eq!(letter.headers.get_str(H_REASON), Some(MALFORMED_MESSAGE));
    assert_eq!(letter.headers.get_str(H_VERDICT), Some("quarantine"));
    assert_eq!(
        letter.headers.get_str("ztauth-reason-class"),
        Some("invalid")
    );
    assert_eq!(source_seq(letter), (s.stream.clone(), seq));
    let detail = letter.headers.get_str(H_MALFORMED).unwrap_or_default();
    assert!(
        detail.starts_with(MALFORMED_MESSAGE) && detail.contains(refusal),
        "seq {seq}: {detail:?} should say {refusal:?}"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&letter.payload).ok(),
        Some(serde_json::json!({"seq": "raw", "secret": false})),
        "the original payload is kept"
    );
    let id = letter.headers.get_str(H_DECISION_ID).unwrap_or_default();
    let record = env
        .decisions()
        .into_iter()
        .find(|d| d.decision_id == id)
        .unwrap_or_else(|| panic!("decision {id} is in the decision log"));
    assert!(
        record
            .detail
            .as_deref()
            .is_some_and(|d| d.starts_with(MALFORMED_MESSAGE)),
        "{record:?}"
    );
    assert!(
        env.credentials()
            .scan(&letter.headers, &letter.payload)
            .is_empty()
    );
}

const RAW_PAYLOAD: &[u8] = br#"{"seq":"raw","secret":false}"#;

/// The reported attack and its class: header blocks async-nats 0.51 refuses
/// with an I/O error (a non-UTF-8 value, a name with a space, a line without
/// `:`), published raw, each followed by well-formed messages. Each is
/// dead-lettered `malformed-message` with what async-nats refused, the
/// messages behind them are handled, handled + dead-lettered = published, and
/// the client reconnects at most once per unreadable message (its first
/// delivery; before the fix: every `ack_wait`, forever). No periodic sweep:
/// the reconnect triggers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_headers_are_dead_lettered_and_the_client_recovers() {
    let b = NatsBinding::jetstream().await;
    let env = TestEnv::start().await;
    let s = streams(&b, "UNREADABLE").await;
    let subject = format!("{}.in.x", s.subject_prefix);
    let malformed: [(&[u8], &str); 3] = [
        (
            b"NATS/1.0\r\nX-Bad: \xff\r\nAuthorization: Bearer raw-secret\r\n\r\n",
            "not UTF-8 (byte 0xff at offset 17)",
        ),
        (
            b"NATS/1.0\r\nX Bad: v\r\n\r\n",
            "\"X Bad\" is not a valid NATS header name",
        ),
        (b"NATS/1.0\r\nX-Bad\r\n\r\n", "header line 1 has no ':'"),
    ];
    let per_malformed = 8;
    let mut bad_seqs = Vec::new();
    let mut n = 0u64;
    for (block, refusal) in malformed {
        let seq = raw_hpub(b.url(), &subject, block, RAW_PAYLOAD).await;
        bad_seqs.push((seq, refusal));
        for _ in 0..per_malformed {
            publish_json(
                &b,
                &env,
                &subject,
                "alice",
                serde_json::json!({"n": n}),
                Headers::new(),
            )
            .await;
            n += 1;
        }
    }
    let published = bad_seqs.len() + n as usize;

    let (client, disconnects) = counting_client(b.url()).await;
    let calls = Calls::default();
    let worker = unreadable_worker(
        &client,
        &s,
        env.processor(calls.handler(Duration::ZERO)),
        Duration::from_secs(3600),
    )
    .await;
    let letters = b
        .read_stream(&s.dlq_stream, bad_seqs.len(), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    calls
        .wait_distinct(n as usize, Duration::from_secs(60))
        .await;
    let settled_disconnects = disconnects.load(Ordering::SeqCst);
    // two more ack_waits: nothing is redelivered, nothing disconnects again
    tokio::time::sleep(WorkerConfig::default().ack_wait * 2 + Duration::from_secs(1)).await;
    let final_disconnects = disconnects.load(Ordering::SeqCst);
    let stopped = worker.stop().await;
    eprintln!(
        "unreadable headers: {} dead-lettered, {} handled, {settled_disconnects} client reconnect(s), \
         {final_disconnects} after two more ack_waits",
        letters.len(),
        calls.distinct()
    );

    assert!(stopped.is_ok(), "{stopped:?}");
    assert_eq!(
        letters.len(),
        bad_seqs.len(),
        "one dead letter per unreadable message"
    );
    for (seq, refusal) in &bad_seqs {
        let letter = letters
            .iter()
            .find(|l| source_seq(l).1 == *seq)
            .unwrap_or_else(|| panic!("no dead letter for stream sequence {seq}"));
        assert_malformed_letter(&env, &s, letter, *seq, refusal);
    }
    // the non-UTF-8 value is kept percent-encoded; the credential beside it is stripped
    let first = letters
        .iter()
        .find(|l| source_seq(l).1 == bad_seqs[0].0)
        .unwrap_or_else(|| panic!("first letter"));
    assert_eq!(first.headers.get_str("x-bad"), Some("%FF"));
    assert!(first.headers.get("authorization").is_none());
    assert_eq!(
        calls.distinct(),
        n as usize,
        "every well-formed message handled"
    );
    assert_eq!(calls.count(), n as usize, "each once");
    assert_eq!(
        calls.distinct() + letters.len(),
        published,
        "handled + dead-lettered = published"
    );
    assert!(
        (1..=bad_seqs.len() as u64).contains(&settled_disconnects),
        "at most one reconnect per unreadable message, got {settled_disconnects}"
    );
    assert_eq!(
        final_disconnects, settled_disconnects,
        "no disconnect after dead-lettering"
    );
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    let (ack_pending, pending, _) = consumer_state(&b, &s.stream, "worker").await;
    assert_eq!((ack_pending, pending), (0, 0), "everything settled");
}

/// A header block whose version line carries a status (`NATS/1.0 408 ...`):
/// async-nats takes the message for the server ending the pull request, so
/// it never disconnects and never hands the message out (the messages behind
/// it in the batch are dropped too, every `ack_wait`). The periodic sweep
/// dead-letters it; the messages behind it are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_line_impostor_is_dead_lettered_by_the_periodic_sweep() {
    let b = NatsBinding::jetstream().await;
    let env = TestEnv::start().await;
    let s = streams(&b, "IMPOSTOR").await;
    let subject = format!("{}.in.x", s.subject_prefix);
    let seq = raw_hpub(
        b.url(),
        &subject,
        b"NATS/1.0 408 Request Timeout\r\n\r\n",
        RAW_PAYLOAD,
    )
    .await;
    let n = 10u64;
    for i in 0..n {
        publish_json(
            &b,
            &env,
            &subject,
            "alice",
            serde_json::json!({"n": i}),
            Headers::new(),
        )
        .await;
    }
    let (client, disconnects) = counting_client(b.url()).await;
    let calls = Calls::default();
    let worker = unreadable_worker(
        &client,
        &s,
        env.processor(calls.handler(Duration::ZERO)),
        Duration::from_secs(2),
    )
    .await;
    let letters = b
        .read_stream(&s.dlq_stream, 1, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    calls
        .wait_distinct(n as usize, Duration::from_secs(60))
        .await;
    let stopped = worker.stop().await;
    assert!(stopped.is_ok(), "{stopped:?}");
    assert_eq!(letters.len(), 1);
    assert_malformed_letter(
        &env,
        &s,
        &letters[0],
        seq,
        "carries a status: \"408 Request Timeout\"",
    );
    assert_eq!(calls.distinct(), n as usize);
    assert_eq!(
        calls.distinct() + letters.len(),
        n as usize + 1,
        "handled + dead-lettered = published"
    );
    assert_eq!(disconnects.load(Ordering::SeqCst), 0);
    let (ack_pending, pending, _) = consumer_state(&b, &s.stream, "worker").await;
    assert_eq!((ack_pending, pending), (0, 0), "everything settled");
}

/// A bare CR in a header value makes async-nats 0.51 panic in its connection
/// task: the client is dead for good. The guard ends with `ClientClosed`
/// instead of retrying forever; a guard restarted on a new client dead-letters
/// the message in its first sweep, before pulling, so the new client never
/// receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_kills_the_client_and_a_restarted_guard_dead_letters_it() {
    let b = NatsBinding::jetstream().await;
    let env = TestEnv::start().await;
    let s = streams(&b, "BARECR").await;
    let subject = format!("{}.in.x", s.subject_prefix);
    let seq = raw_hpub(
        b.url(),
        &subject,
        b"NATS/1.0\r\nX-Bad: a\rb\r\n\r\n",
        RAW_PAYLOAD,
    )
    .await;
    let n = 5u64;
    for i in 0..n {
        publish_json(
            &b,
            &env,
            &subject,
            "alice",
            serde_json::json!({"n": i}),
            Headers::new(),
        )
        .await;
    }
    let calls = Calls::default();
    let (first, _) = counting_client(b.url()).await;
    let worker = unreadable_worker(
        &first,
        &s,
        env.processor(calls.handler(Duration::ZERO)),
        Duration::from_secs(3600),
    )
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(30), worker.task)
        .await
        .unwrap_or_else(|_| panic!("the guard on a dead client did not end"))
        .unwrap_or_else(|e| panic!("guard task: {e}"));
    assert!(
        matches!(ended, Err(elevate_nats::Error::ClientClosed(_))),
        "{ended:?}"
    );
    assert_eq!(calls.count(), 0);

    let (second, disconnects) = counting_client(b.url()).await;
    let worker = unreadable_worker(
        &second,
        &s,
        env.processor(calls.handler(Duration::ZERO)),
        Duration::from_secs(3600),
    )
    .await;
    let letters = b
        .read_stream(&s.dlq_stream, 1, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    calls
        .wait_distinct(n as usize, Duration::from_secs(60))
        .await;
    let stopped = worker.stop().await;
    assert!(stopped.is_ok(), "{stopped:?}");
    assert_eq!(letters.len(), 1);
    assert_malformed_letter(&env, &s, &letters[0], seq, "contains a bare CR");
    assert_eq!(letters[0].headers.get_str("x-bad"), Some("a%0Db"));
    assert_eq!(
        calls.distinct() + letters.len(),
        n as usize + 1,
        "handled + dead-lettered = published"
    );
    assert_eq!(
        disconnects.load(Ordering::SeqCst),
        0,
        "the new client never saw it"
    );
    let (ack_pending, pending, _) = consumer_state(&b, &s.stream, "worker").await;
    assert_eq!((ack_pending, pending), (0, 0), "everything settled");
}

/// `elevate_nats::unreadable::refusal` mirrors async-nats's parser: on a real
/// server, a core subscriber receives exactly the blocks it accepts (as plain
/// messages, no status), and loses its connection (or its connection task) on
/// the ones it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_agrees_with_async_nats() {
    let b = NatsBinding::jetstream().await;
    let s = streams(&b, "MIRROR").await;
    let blocks: &[&[u8]] = &[
        b"NATS/1.0\r\nX-A: 1\r\n\r\n",
        b"NATS/1.0\r\nX: folded\r\n  line\r\n\r\n",
        b"NATS/1.0\r\n: empty name\r\n\r\n",
        b"NATS/1.0\r\nX: trailing cr\r\r\n\r\n",
        "NATS/1.0\r\nX: caf\u{e9}\r\n\r\n".as_bytes(),
        b"NATS/1.0\r\nX-Bad: \xff\r\n\r\n",
        b"NATS/1.0\r\nX Bad: v\r\n\r\n",
        b"NATS/1.0\r\nAuthorization : v\r\n\r\n",
        b"NATS/1.0\r\nX-Bad\r\n\r\n",
        b"NATS/2.0\r\nX: v\r\n\r\n",
        b"NATS/1.0 abc\r\n\r\n",
        b"NATS/1.0 408 Request Timeout\r\n\r\n",
        b"NATS/1.0\r\nX: a\rb\r\n\r\n",
    ];
    for (i, block) in blocks.iter().enumerate() {
        let subject = format!("{}.in.m{i}", s.subject_prefix);
        let (client, disconnects) = counting_client(b.url()).await;
        let mut sub = client
            .subscribe(subject.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        client.flush().await.unwrap_or_else(|e| panic!("{e}"));
        let refused = elevate_nats::unreadable::refusal(block);
        // Core NATS is at most once: on a loaded machine a delivery to a
        // core subscriber can be lost, so a block async-nats accepts is sent
        // up to three times and must arrive once; one it refuses never
        // arrives, so a short wait after one publish shows that.
        let (attempts, wait) = if refused.is_none() { (3, 10) } else { (1, 2) };
        let mut delivered = false;
        for _ in 0..attempts {
            raw_hpub(b.url(), &subject, block, b"x").await;
            let got = tokio::time::timeout(Duration::from_secs(wait), sub.next()).await;
            delivered = matches!(&got, Ok(Some(m)) if m.status.is_none());
            if delivered || matches!(got, Ok(None)) {
                break;
            }
        }
        assert_eq!(
            delivered,
            refused.is_none(),
            "{:?}: async-nats delivered={delivered} (disconnects {}), refusal {refused:?}",
            String::from_utf8_lossy(block),
            disconnects.load(Ordering::SeqCst)
        );
    }
}
