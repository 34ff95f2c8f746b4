//! AMQP on the real RabbitMQ (`AMQP_URL`, default the local broker): the
//! conformance suite, plus the AMQP acceptance tests of the AMQP issue.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use elevate_amqp::{
    AmqpDeadLetters, AmqpPublisher, ConfirmChannel, GuardedConsumer, Queues, declare_queues,
    headers,
};
use elevate_core::deadletter::{H_DECISION_ID, H_REASON, H_SOURCE, H_VERDICT};
use elevate_core::producer::PublishRequest;
use elevate_core::settle::Processor;
use elevate_core::{CTX_REF_HEADER, Coordinates, Headers, OutboundMessage};
use elevate_testing::amqp::{AmqpBinding, connect, scenario_queue_args};
use elevate_testing::env::{ACTION, CONSUMER, PRODUCER, Recorder, TestEnv};
use elevate_testing::wait::poll_until;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

mod real {
    use super::*;
    elevate_testing::conformance_suite!(AmqpBinding::real());
    elevate_testing::delivery_contract!(AmqpBinding::real());
}

const TIMEOUT: Duration = Duration::from_secs(120);

fn uid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A running guarded worker on its own named connection.
struct Worker {
    name: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), elevate_amqp::Error>>,
    _conn: Connection,
}

impl Worker {
    async fn start(queues: &Queues, processor: Arc<Processor>, prefetch: u16) -> Worker {
        let name = format!("elevate-worker-{}", uid());
        let conn = connect(&name).await;
        let ch = conn.create_channel().await.expect("channel");
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .expect("qos");
        let consumer = ch
            .basic_consume(
                queues.work.as_str().into(),
                name.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let confirms = ConfirmChannel::new(conn.create_channel().await.expect("channel"))
            .await
            .expect("confirms");
        let dl = AmqpDeadLetters::with_confirm_channel(confirms.clone(), "", &queues.dead_letter);
        let processor = Arc::new(processor.with_dead_letters(Arc::new(dl)));
        let worker =
            GuardedConsumer::new(consumer, processor, confirms).concurrency(usize::from(prefetch));
        let worker = match elevate_amqp::uri_user(&elevate_testing::amqp::amqp_url()) {
            Some(user) => worker.retry_user(user),
            None => worker,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            worker
                .run(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Worker {
            name,
            stop,
            task,
            _conn: conn,
        }
    }

    async fn stop(self) -> Result<(), elevate_amqp::Error> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("worker stops")
            .expect("worker task")
    }
}

/// A message read back with a plain client.
#[derive(Debug, Clone)]
struct Got {
    props: BasicProperties,
    headers: Headers,
    payload: Vec<u8>,
}

async fn get_all(ch: &Channel, queue: &str, expected: usize, timeout: Duration) -> Vec<Got> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        match ch
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            Some(m) => {
                out.push(Got {
                    props: m.delivery.properties.clone(),
                    headers: headers::decode(m.delivery.properties.headers().as_ref()),
                    payload: m.delivery.data.clone(),
                });
                m.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("ack");
            }
            None => {
                if out.len() >= expected || tokio::time::Instant::now() >= deadline {
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn depth(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

/// Declares the work, retry and dead-letter queues (durable; they expire 10 minutes
/// after last use, so a failed run leaves nothing behind for long).
async fn declare(ch: &Channel, queue: &str) -> Queues {
    elevate_amqp::declare_queue_set(ch, queue, scenario_queue_args(), scenario_queue_args())
        .await
        .expect("declare")
}

async fn delete_queues(ch: &Channel, q: &Queues) {
    for name in [&q.work, &q.retry, &q.dead_letter] {
        let _ = ch
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Publishes `n` guarded messages `u=<user>;i=<i>` round-robin over `users`, 50 in flight at a time.
async fn publish_many(
    publisher: &AmqpPublisher,
    env: &TestEnv,
    queue: &str,
    users: &[&str],
    range: std::ops::Range<usize>,
) {
    let subjects: Vec<_> = users.iter().map(|u| env.subject(u)).collect();
    let audience = env.audience();
    let idx: Vec<usize> = range.collect();
    for chunk in idx.chunks(50) {
        let sends = chunk.iter().map(|&i| {
            let s = &subjects[i % users.len()];
            let req = env.publish_request(s, &audience, queue);
            let body = format!("u={};i={i}", users[i % users.len()]);
            async move {
                publisher
                    .publish(
                        &req,
                        OutboundMessage {
                            headers: Headers::new(),
                            payload: body.into_bytes(),
                        },
                    )
                    .await
                    .expect("guarded publish confirmed")
            }
        });
        futures::future::join_all(sends).await;
    }
}

fn user_of(payload: &[u8]) -> String {
    let s = String::from_utf8_lossy(payload);
    s.strip_prefix("u=")
        .and_then(|r| r.split(';').next())
        .unwrap_or_default()
        .to_string()
}

/// alice and carol may `test.process`; mallory is suspended; bob lacks the entitlement.
const USERS: [&str; 4] = ["alice", "carol", "mallory", "bob"];

fn permitted(user: &str) -> bool {
    matches!(user, "alice" | "carol")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_from_several_subjects() {
    let env = TestEnv::start().await;
    let conn = connect(&format!("elevate-acc-{}", uid())).await;
    let admin = conn.create_channel().await.expect("channel");
    let queue = format!("elevate-acc-1k-{}", uid());
    let q = declare(&admin, &queue).await;
    let publisher = AmqpPublisher::new(
        conn.create_channel().await.expect("channel"),
        env.producer.clone(),
    )
    .await
    .expect("publisher");
    let n = 1000;
    let t0 = Instant::now();
    publish_many(&publisher, &env, &queue, &USERS, 0..n).await;
    let publish_time = t0.elapsed();
    assert_eq!(
        depth(&admin, &queue).await,
        n as u32,
        "all published messages are on the durable queue"
    );

    let rec = Recorder::new();
    let t1 = Instant::now();
    let worker = Worker::start(&q, env.processor(rec.handler()), 32).await;
    let expected_handled = (0..n).filter(|i| permitted(USERS[i % USERS.len()])).count();
    let letters = get_all(&admin, &q.dead_letter, n - expected_handled, TIMEOUT).await;
    rec.wait_for(expected_handled, TIMEOUT).await;
    let guard_time = t1.elapsed();
    worker.stop().await.expect("clean stop");
    eprintln!(
        "amqp: published {n} guarded messages in {publish_time:?} ({:.0} msg/s confirmed); \
         guard settled {n} in {guard_time:?} ({:.0} msg/s, prefetch/concurrency 32)",
        n as f64 / publish_time.as_secs_f64(),
        n as f64 / guard_time.as_secs_f64()
    );

    let seen = rec.snapshot();
    assert_eq!(seen.len(), expected_handled);
    assert_eq!(
        rec.distinct_payloads(),
        expected_handled,
        "no message handled twice"
    );
    for h in &seen {
        let user = user_of(h.payload.as_bytes());
        assert!(permitted(&user), "{user} was handled");
        assert_eq!(
            h.subject, user,
            "AuthContext subject is the message's subject"
        );
        assert_eq!(h.workload, CONSUMER);
        assert_eq!(h.producer, PRODUCER);
        assert_eq!(h.action, ACTION);
    }
    assert_eq!(letters.len(), n - expected_handled);
    assert_eq!(
        seen.len() + letters.len(),
        n,
        "handled + dead-lettered = published"
    );
    let decisions: HashMap<String, String> = env
        .decisions()
        .into_iter()
        .map(|d| (d.decision_id.clone(), d.reason.code().to_string()))
        .collect();
    let mut payloads = HashSet::new();
    for l in &letters {
        let user = user_of(&l.payload);
        assert!(!permitted(&user), "{user} was dead-lettered");
        payloads.insert(l.payload.clone());
        let id = l.headers.get_str(H_DECISION_ID).expect("decision id");
        let reason = l.headers.get_str(H_REASON).expect("reason");
        assert_eq!(
            decisions.get(id).map(String::as_str),
            Some(reason),
            "letter matches the decision log"
        );
        assert!(
            matches!(reason, "subject-denied" | "delegation-denied"),
            "reason {reason}"
        );
        assert_eq!(l.headers.get_str(H_VERDICT), Some("deny"));
        let source: Coordinates =
            serde_json::from_slice(l.headers.get(H_SOURCE).expect("source")).expect("source json");
        match (
            source.broker(),
            source.field_str("queue"),
            source.field_str("routing_key"),
        ) {
            ("amqp", Some(sq), Some(routing_key)) => {
                assert_eq!(sq, queue);
                assert_eq!(routing_key, queue);
            }
            _ => panic!("source {source:?}"),
        }
        assert!(l.props.message_id().is_some(), "original message id kept");
        assert_eq!(
            *l.props.delivery_mode(),
            Some(2),
            "dead letter is persistent"
        );
        assert!(
            l.headers.get(CTX_REF_HEADER).is_some(),
            "reference kept for replay"
        );
    }
    assert_eq!(
        payloads.len(),
        letters.len(),
        "no message dead-lettered twice"
    );
    assert_eq!(depth(&admin, &queue).await, 0);
    assert_eq!(depth(&admin, &q.retry).await, 0);
    delete_queues(&admin, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_messages_carry_no_token_and_unroutable_is_an_error() {
    let env = TestEnv::start().await;
    let conn = connect(&format!("elevate-acc-{}", uid())).await;
    let admin = conn.create_channel().await.expect("channel");
    let queue = format!("elevate-acc-wire-{}", uid());
    let q = declare_queues(&admin, &queue).await.expect("declare");
    let publisher = AmqpPublisher::new(
        conn.create_channel().await.expect("channel"),
        env.producer.clone(),
    )
    .await
    .expect("publisher");
    let (mut hdrs, payload, secrets) = env.credential_laden_message();
    hdrs.append("x-hop", "a");
    hdrs.append("x-hop", "b");
    let subject = env.subject("alice");
    let audience = env.audience();
    let req = env.publish_request(&subject, &audience, &queue);
    let mut props_table = FieldTable::default();
    props_table.insert(
        "txn-token".into(),
        AMQPValue::LongString("txn-token-ffff".into()),
    );
    let receipt = publisher
        .publish_with_properties(
            &req,
            OutboundMessage {
                headers: hdrs,
                payload,
            },
            BasicProperties::default()
                .with_headers(props_table)
                .with_content_type("application/json".into()),
        )
        .await
        .expect("confirmed");
    assert_eq!(receipt.destination, queue);
    assert!(
        receipt.stripped.len() >= 6,
        "stripped {:?}",
        receipt.stripped
    );

    // A plain lapin consumer reads what is on the wire.
    let ch = conn.create_channel().await.expect("channel");
    let mut plain = ch
        .basic_consume(
            queue.as_str().into(),
            "plain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let d = tokio::time::timeout(Duration::from_secs(10), plain.next())
        .await
        .expect("a message")
        .expect("stream")
        .expect("delivery");
    let table = d.properties.headers().clone().unwrap_or_default();
    let mut wire = String::from_utf8_lossy(&d.data).into_owned();
    for (k, v) in &table {
        wire.push_str(k.as_str());
        wire.push_str(&headers::to_json(v).to_string());
    }
    for s in secrets.iter().map(String::as_str).chain(["txn-token-ffff"]) {
        assert!(!wire.contains(s), "a credential reached the wire");
    }
    assert!(matches!(
        table.inner().get(CTX_REF_HEADER),
        Some(AMQPValue::LongString(_))
    ));
    match table.inner().get("x-hop") {
        Some(AMQPValue::FieldArray(a)) => assert_eq!(
            a.as_slice(),
            &[
                AMQPValue::LongString("a".into()),
                AMQPValue::LongString("b".into())
            ]
        ),
        other => panic!("duplicates travel as an array: {other:?}"),
    }
    assert_eq!(
        d.properties.message_id().as_ref().map(|m| m.to_string()),
        receipt.message_id.clone()
    );
    assert_eq!(*d.properties.delivery_mode(), Some(2));
    assert_eq!(
        d.properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    let decoded = headers::decode(Some(&table));
    assert!(env.credentials().scan(&decoded, &d.data).is_empty());
    assert_eq!(decoded.get_all("x-hop").count(), 2);
    d.acker.ack(BasicAckOptions::default()).await.expect("ack");

    // Unroutable (mandatory) publishes are errors, not successes.
    let nowhere = format!("no-such-queue-{}", uid());
    let lost = publisher
        .publish(
            &PublishRequest {
                destination: &nowhere,
                ..req.clone()
            },
            OutboundMessage {
                headers: Headers::new(),
                payload: b"{}".to_vec(),
            },
        )
        .await;
    assert!(
        matches!(&lost, Err(e) if e.to_string().contains("unroutable")),
        "{lost:?}"
    );
    delete_queues(&admin, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_publisher_messages_never_reach_the_handler() {
    let env = TestEnv::start().await;
    let conn = connect(&format!("elevate-acc-{}", uid())).await;
    let admin = conn.create_channel().await.expect("channel");
    let queue = format!("elevate-acc-hostile-{}", uid());
    let q = declare(&admin, &queue).await;
    let mut hostile: Vec<(String, FieldTable, Vec<u8>)> = env
        .hostile_messages(&queue)
        .into_iter()
        .map(|(r, h, p)| (r.to_string(), headers::encode(&h).expect("encode"), p))
        .collect();
    // AMQP-specific disguises: a bearer token inside an array value, two references in one array,
    // a JWT inside a nested table, a destination claim without the retry path.
    let valid = env.hostile_messages(&queue)[1]
        .1
        .get_str(CTX_REF_HEADER)
        .expect("ref")
        .to_string();
    let body = br#"{"job":"hostile"}"#.to_vec();
    let mut t = FieldTable::default();
    t.insert(
        CTX_REF_HEADER.into(),
        AMQPValue::LongString(valid.as_str().into()),
    );
    t.insert(
        "x-forwarded".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongString("ok".into()),
            AMQPValue::LongString("Bearer opaque-secret".into()),
        ])),
    );
    hostile.push(("credential-in-message".into(), t, body.clone()));
    let mut t = FieldTable::default();
    t.insert(
        CTX_REF_HEADER.into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongString(valid.as_str().into()),
            AMQPValue::LongString(valid.as_str().into()),
        ])),
    );
    hostile.push(("ambiguous-context".into(), t, body.clone()));
    let mut nested = FieldTable::default();
    nested.insert(
        "upstream".into(),
        AMQPValue::LongString(valid.as_str().into()),
    );
    let mut t = FieldTable::default();
    t.insert(
        CTX_REF_HEADER.into(),
        AMQPValue::LongString(valid.as_str().into()),
    );
    t.insert("x-meta".into(), AMQPValue::FieldTable(nested));
    hostile.push(("credential-in-message".into(), t, body.clone()));
    // A reference bound to another destination, claiming it via the retry header.
    let other = env.hostile_messages("billing/invoice.create")[1]
        .1
        .get_str(CTX_REF_HEADER)
        .expect("ref")
        .to_string();
    let mut t = FieldTable::default();
    t.insert(
        CTX_REF_HEADER.into(),
        AMQPValue::LongString(other.as_str().into()),
    );
    t.insert(
        elevate_amqp::H_DESTINATION.into(),
        AMQPValue::LongString("billing/invoice.create".into()),
    );
    hostile.push(("wrong-destination".into(), t.clone(), body.clone()));
    // The same, with a forged x-death entry for the retry queue: a retry copy
    // in every header, but without the worker's broker-checked user-id.
    let mut death = FieldTable::default();
    death.insert(
        "queue".into(),
        AMQPValue::LongString(q.retry.as_str().into()),
    );
    death.insert("reason".into(), AMQPValue::LongString("expired".into()));
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    t.insert(
        elevate_amqp::X_DEATH.into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    hostile.push(("wrong-destination".into(), t, body.clone()));

    let rec = Recorder::new();
    let worker = Worker::start(&q, env.processor(rec.handler()), 8).await;
    let plain = conn.create_channel().await.expect("channel");
    let mut ids = HashSet::new();
    for (i, (_, table, payload)) in hostile.iter().enumerate() {
        let id = format!("hostile-{i}-{}", uid());
        ids.insert(id.clone());
        plain
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                payload,
                BasicProperties::default()
                    .with_headers(table.clone())
                    .with_message_id(id.into())
                    .with_correlation_id("corr-7".into())
                    .with_content_type("application/json".into()),
            )
            .await
            .expect("publish");
    }
    let letters = get_all(&admin, &q.dead_letter, hostile.len(), TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop().await.expect("clean stop");
    assert_eq!(
        rec.count(),
        0,
        "a plain-publisher message reached the handler"
    );
    let mut got: Vec<String> = letters
        .iter()
        .map(|l| l.headers.get_str(H_REASON).unwrap_or("<none>").to_string())
        .collect();
    got.sort();
    let mut want: Vec<String> = hostile.iter().map(|(r, _, _)| r.clone()).collect();
    want.sort();
    assert_eq!(got, want);
    for l in &letters {
        assert!(
            env.credentials().scan(&l.headers, &l.payload).is_empty(),
            "dead letter carries no credential"
        );
        assert!(
            ids.contains(
                l.props
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str())
                    .unwrap_or_default()
            )
        );
        assert_eq!(
            l.props.correlation_id().as_ref().map(|c| c.as_str()),
            Some("corr-7")
        );
        assert_eq!(
            l.props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert!(l.headers.get(H_DECISION_ID).is_some());
    }
    assert_eq!(depth(&admin, &queue).await, 0);
    delete_queues(&admin, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tts_outage_mid_stream_delays_and_loses_nothing() {
    let env = Arc::new(TestEnv::start().await);
    let conn = connect(&format!("elevate-acc-{}", uid())).await;
    let admin = conn.create_channel().await.expect("channel");
    let queue = format!("elevate-acc-tts-{}", uid());
    let q = declare(&admin, &queue).await;
    let publisher = AmqpPublisher::new(
        conn.create_channel().await.expect("channel"),
        env.producer.clone(),
    )
    .await
    .expect("publisher");
    let rec = Recorder::new();
    let worker = Worker::start(&q, env.processor(rec.handler()), 16).await;
    let n = 300;
    let pace = {
        let env = env.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            for i in 0..n {
                publish_many(&publisher, &env, &queue, &["alice", "carol"], i..i + 1).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    rec.wait_for(60, TIMEOUT).await;
    env.stop_tts().await;
    tokio::time::sleep(Duration::from_secs(2)).await; // in-flight work that already had a token finishes
    let at_outage = rec.count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        rec.count(),
        at_outage,
        "nothing handled while the TTS is down"
    );
    assert!(rec.count() < n, "the outage hit mid-stream");
    assert!(
        get_all(&admin, &q.dead_letter, 0, Duration::from_millis(200))
            .await
            .is_empty(),
        "nothing dead-lettered"
    );
    assert!(
        env.decisions()
            .iter()
            .any(|d| d.reason.code() == "tts-unavailable")
    );
    env.start_tts().await;
    pace.await.expect("publisher");
    poll_until(TIMEOUT, Duration::from_millis(50), || {
        rec.distinct_payloads() >= n
    })
    .await;
    worker.stop().await.expect("clean stop");
    assert_eq!(
        rec.distinct_payloads(),
        n,
        "every message completes after the outage"
    );
    assert_eq!(rec.count(), n, "none handled twice");
    assert!(
        get_all(&admin, &q.dead_letter, 0, Duration::from_millis(200))
            .await
            .is_empty()
    );
    let retried = env.decisions().iter().filter(|d| d.attempt > 1).count();
    assert!(
        retried > 0,
        "retries went through the retry queue (attempt > 1)"
    );
    assert_eq!(depth(&admin, &queue).await, 0);
    assert_eq!(depth(&admin, &q.retry).await, 0);
    delete_queues(&admin, &q).await;
}

/// Closes the broker side of every connection whose client-provided name contains `name`.
fn broker_close_connection(name: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl (run the test on the RabbitMQ host)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(name)) {
        let pid = line.split_whitespace().next().unwrap_or_default();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test"])
            .status()
            .expect("rabbitmqctl close_connection");
        assert!(status.success());
        closed += 1;
    }
    closed
}

async fn interrupted_stream(interrupt: impl AsyncFnOnce(Worker)) {
    let env = TestEnv::start().await;
    let conn = connect(&format!("elevate-acc-{}", uid())).await;
    let admin = conn.create_channel().await.expect("channel");
    let queue = format!("elevate-acc-interrupt-{}", uid());
    let q = declare(&admin, &queue).await;
    let publisher = AmqpPublisher::new(
        conn.create_channel().await.expect("channel"),
        env.producer.clone(),
    )
    .await
    .expect("publisher");
    let n = 400;
    let users = ["alice", "carol", "alice", "mallory"];
    publish_many(&publisher, &env, &queue, &users, 0..n).await;
    let expected_handled = (0..n).filter(|i| permitted(users[i % 4])).count();
    let rec = Recorder::new();
    // The first worker crawls after 20 messages (1 s each, 8 at a time), so the
    // interruption always lands mid-stream however slow `rabbitmqctl` is.
    let slow = {
        let inner = rec.handler();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        Arc::new(elevate_core::handler_fn(
            move |m: elevate_core::InboundMessage, a: elevate_core::AuthContext| {
                let inner = inner.clone();
                let calls = calls.clone();
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 20 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    inner.handle(&m, &a).await
                }
            },
        ))
    };
    let first = Worker::start(&q, env.processor(slow), 8).await;
    rec.wait_for(20, TIMEOUT).await;
    interrupt(first).await;
    let handled_before = rec.distinct_payloads();
    assert!(
        handled_before < expected_handled,
        "interrupted mid-stream ({handled_before})"
    );
    let second = Worker::start(&q, env.processor(rec.handler()), 16).await;
    let letters = get_all(&admin, &q.dead_letter, n - expected_handled, TIMEOUT).await;
    poll_until(TIMEOUT, Duration::from_millis(50), || {
        rec.distinct_payloads() >= expected_handled
    })
    .await;
    second.stop().await.expect("clean stop");
    let distinct_letters: HashSet<Vec<u8>> = letters.iter().map(|l| l.payload.clone()).collect();
    eprintln!(
        "amqp interruption: {handled_before} handled before, {} handler calls for {} distinct after restart, {} letters ({} distinct)",
        rec.count(),
        rec.distinct_payloads(),
        letters.len(),
        distinct_letters.len()
    );
    assert_eq!(
        rec.distinct_payloads(),
        expected_handled,
        "no permitted message lost"
    );
    assert_eq!(
        distinct_letters.len(),
        n - expected_handled,
        "no denied message lost"
    );
    assert_eq!(depth(&admin, &queue).await, 0);
    delete_queues(&admin, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closes_the_connection_mid_stream_and_nothing_is_lost() {
    interrupted_stream(async |w: Worker| {
        let name = w.name.clone();
        let closed = tokio::task::spawn_blocking(move || broker_close_connection(&name))
            .await
            .expect("rabbitmqctl");
        assert_eq!(
            closed, 1,
            "the worker's connection was closed by the broker"
        );
        let ended = tokio::time::timeout(Duration::from_secs(30), w.task)
            .await
            .expect("the worker notices")
            .expect("worker task");
        assert!(ended.is_err(), "run reports the lost connection: {ended:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_stream_and_nothing_is_lost() {
    interrupted_stream(async |w: Worker| {
        w.task.abort();
        let _ = w.task.await;
        drop(w._conn); // the process is gone: its connection goes with it
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_copy_keeps_attempt_and_destination_through_a_named_exchange() {
    // Covered end to end by the conformance retry scenarios (which publish through a
    // named exchange); here: the retry copy on the broker carries the attempt and the
    // original destination, and comes back to the work queue with an x-death entry.
    let env = TestEnv::start().await;
    let binding = AmqpBinding::real().await;
    use elevate_testing::binding::BrokerBinding;
    let ep = binding.setup("retrycopy").await.expect("setup");
    env.stop_tts().await;
    let rec = Recorder::new();
    let consumer = binding
        .start_consumer(&ep, env.processor(rec.handler()))
        .await
        .expect("consumer");
    let subject = env.subject("alice");
    let audience = env.audience();
    let req = env.publish_request(&subject, &audience, &ep.destination);
    binding
        .publish_guarded(
            &ep,
            &env.producer,
            &req,
            OutboundMessage {
                headers: Headers::new(),
                payload: b"retry-me".to_vec(),
            },
        )
        .await
        .expect("publish");
    poll_until(TIMEOUT, Duration::from_millis(50), || {
        env.decisions()
            .iter()
            .filter(|d| d.reason.code() == "tts-unavailable")
            .count()
            >= 3
    })
    .await;
    env.start_tts().await;
    rec.wait_for(1, TIMEOUT).await;
    consumer.stop().await;
    assert_eq!(rec.count(), 1);
    let attempts: Vec<u32> = env.decisions().iter().map(|d| d.attempt).collect();
    assert!(
        attempts.windows(2).all(|w| w[1] == w[0] + 1),
        "attempts count up: {attempts:?}"
    );
    let last = env.decisions().last().cloned().expect("decision");
    assert_eq!(last.reason.code(), "permitted");
    assert_eq!(
        last.source.field_str("exchange"),
        Some(""),
        "came back through the retry queue: {:?}",
        last.source
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_worker_reconnects_when_the_broker_closes_its_connection() {
    let env = TestEnv::start().await;
    let conn = connect(&format!("elevate-acc-{}", uid())).await;
    let admin = conn.create_channel().await.expect("channel");
    let queue = format!("elevate-acc-supervised-{}", uid());
    let q = declare(&admin, &queue).await;
    let publisher = AmqpPublisher::new(
        conn.create_channel().await.expect("channel"),
        env.producer.clone(),
    )
    .await
    .expect("publisher");
    let rec = Recorder::new();
    let mut config =
        elevate_amqp::WorkerConfig::new(elevate_testing::amqp::amqp_url(), queue.clone());
    config.declare = false;
    config.prefetch = 8;
    config.connection_name = format!("elevate-supervised-{}", uid());
    let name = config.connection_name.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(elevate_amqp::supervise_worker(
        config,
        env.processor(rec.handler()),
        async move {
            let _ = stopped.await;
        },
    ));
    let n = 200;
    publish_many(&publisher, &env, &queue, &USERS, 0..n / 2).await;
    rec.wait_for(10, TIMEOUT).await;
    let closed = tokio::task::spawn_blocking(move || broker_close_connection(&name))
        .await
        .expect("rabbitmqctl");
    assert_eq!(
        closed, 1,
        "the worker's connection was closed by the broker"
    );
    let cut = Instant::now();
    let before = rec.distinct_payloads();
    publish_many(&publisher, &env, &queue, &USERS, n / 2..n).await;
    poll_until(TIMEOUT, Duration::from_millis(20), || {
        rec.distinct_payloads() > before
    })
    .await;
    let resumed = cut.elapsed();
    let expected = (0..n).filter(|i| permitted(USERS[i % 4])).count();
    let letters = get_all(&admin, &q.dead_letter, n - expected, TIMEOUT).await;
    poll_until(TIMEOUT, Duration::from_millis(50), || {
        rec.distinct_payloads() >= expected
    })
    .await;
    assert!(!worker.is_finished(), "the supervised worker goes on");
    let _ = stop.send(());
    let ended = tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker stops on shutdown")
        .expect("task");
    assert!(ended.is_ok(), "{ended:?}");
    eprintln!("amqp supervised: handling resumed {resumed:?} after the connection was closed");
    assert!(
        resumed < Duration::from_secs(15),
        "reconnected promptly ({resumed:?})"
    );
    assert_eq!(
        rec.distinct_payloads(),
        expected,
        "no permitted message lost"
    );
    let distinct: HashSet<Vec<u8>> = letters.iter().map(|l| l.payload.clone()).collect();
    assert_eq!(distinct.len(), n - expected, "no denied message lost");
    delete_queues(&admin, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_cannot_spend_a_messages_retries() {
    // A plain publisher sets x-elevate-attempt and a forged x-death to make the
    // first transient handler error final; only the broker's own count counts.
    let env = TestEnv::start().await;
    let conn = connect(&format!("elevate-acc-{}", uid())).await;
    let admin = conn.create_channel().await.expect("channel");
    let queue = format!("elevate-acc-attempt-{}", uid());
    let q = declare(&admin, &queue).await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rec = Recorder::new();
    let flaky = {
        let inner = rec.handler();
        let calls = calls.clone();
        Arc::new(elevate_core::handler_fn(
            move |m: elevate_core::InboundMessage, a: elevate_core::AuthContext| {
                let inner = inner.clone();
                let calls = calls.clone();
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                        return Err(elevate_core::HandlerError::Transient("flaky".into()));
                    }
                    inner.handle(&m, &a).await
                }
            },
        ))
    };
    let worker = Worker::start(&q, env.processor(flaky), 4).await;
    let payload = b"forged-attempt".to_vec();
    let mut table = FieldTable::default();
    table.insert(
        CTX_REF_HEADER.into(),
        AMQPValue::LongString(env.signed_ref(&queue, &payload).into()),
    );
    table.insert(elevate_amqp::H_ATTEMPT.into(), AMQPValue::LongLongInt(99));
    let mut death = FieldTable::default();
    death.insert(
        "queue".into(),
        AMQPValue::LongString(q.retry.as_str().into()),
    );
    death.insert("reason".into(), AMQPValue::LongString("expired".into()));
    death.insert("count".into(), AMQPValue::LongLongInt(50));
    table.insert(
        elevate_amqp::X_DEATH.into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    admin
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default()
                .with_headers(table)
                .with_message_id(uid().into()),
        )
        .await
        .expect("publish");
    rec.wait_for(1, TIMEOUT).await;
    worker.stop().await.expect("clean stop");
    assert_eq!(rec.count(), 1, "handled after its own retries");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    let first = env.decisions().into_iter().next().expect("a decision");
    assert_eq!(first.attempt, 1, "the forged count is not believed");
    assert!(
        get_all(&admin, &q.dead_letter, 0, Duration::from_millis(300))
            .await
            .is_empty()
    );
    delete_queues(&admin, &q).await;
}
