//! The README's wrapping lines, run on the real brokers: a workload built
//! from its `elevate.toml` (real key files, the TTS binary on loopback,
//! trust from its key directory) guards the consumer a user already has
//! with one constructor per broker, and that constructor binds the default
//! dead-letter destination `<destination>.dlq` by itself. A permitted
//! message reaches the handler; a message without a reference is
//! dead-lettered there, readable with a plain client.
//!
//! The NATS wrapper also refuses, at start, a stream that would capture its
//! own dead letters (a filter ending in `>`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use elevate_config::Workload;
use elevate_core::deadletter::H_REASON;
use elevate_core::producer::{PublishRequest, SubjectContext};
use elevate_core::scope::Scope;
use elevate_core::{
    AuthContext, Headers, InboundMessage, OutboundMessage, SubjectKind, handler_fn,
};
use elevate_testing::amqp::AmqpBinding;
use elevate_testing::binding::{BrokerBinding, Endpoint, RawMessage};
use elevate_testing::domain::{FileDomain, key};
use elevate_testing::env::TRUST_DOMAIN;
use elevate_testing::kafka::KafkaBinding;
use elevate_testing::nats::{NatsBinding, STREAM_PREFIX, WorkerConfig};
use futures::FutureExt;
use rdkafka::consumer::Consumer;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_elevate-tts");
const ACTION: &str = "test.process";
const WAIT: Duration = Duration::from_secs(30);

/// The producer and the worker of one scenario, built from their files.
struct Scenario {
    _domain: FileDomain,
    producer: Workload,
    worker: Workload,
}

async fn scenario(destination: &str) -> Scenario {
    let (p, w) = (key("orders-api-1"), key("test-worker-1"));
    let domain = FileDomain::start(
        Path::new(BIN),
        TRUST_DOMAIN,
        &[ACTION],
        &[("orders-api", &[&p]), ("test-worker", &[&w])],
    );
    let load = |name: &'static str| {
        let path = domain.workload_config(name, destination, ACTION, "");
        async move {
            Workload::from_file(&path)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        }
    };
    let producer = load("orders-api").await;
    let worker = load("test-worker").await;
    Scenario {
        _domain: domain,
        producer,
        worker,
    }
}

/// A handler that reports each permitted message's subject.
fn reporting(tx: mpsc::UnboundedSender<String>) -> Arc<dyn elevate_core::Handler> {
    Arc::new(handler_fn(move |_m: InboundMessage, auth: AuthContext| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(auth.subject().to_string());
            Ok(())
        }
    }))
}

/// Publishes one permitted message (guarded, for the worker) and one
/// without any reference (plain client).
async fn publish_both(b: &dyn BrokerBinding, ep: &Endpoint, s: &Scenario) {
    let subject = SubjectContext {
        subject: "alice".into(),
        sub_kind: SubjectKind::Human,
        txn: uuid::Uuid::now_v7().to_string(),
        scope: Scope::parse(ACTION),
    };
    let audience = [s.worker.id().to_string()];
    let req = PublishRequest {
        subject: &subject,
        action: ACTION,
        audience: &audience,
        destination: &ep.destination,
        scope: None,
    };
    let msg = OutboundMessage {
        headers: Headers::new(),
        payload: b"{\"order\":1}".to_vec(),
    };
    b.publish_guarded(ep, s.producer.producer(), &req, msg)
        .await
        .unwrap_or_else(|e| panic!("guarded publish: {e}"));
    b.publish_raw(ep, Headers::new(), b"{\"order\":2}".to_vec())
        .await
        .unwrap_or_else(|e| panic!("raw publish: {e}"));
}

/// The permitted message was handled for alice, and the other one is the
/// one dead letter at `ep.dead_letter`, with its reason.
async fn expect_outcomes(
    b: &dyn BrokerBinding,
    ep: &Endpoint,
    handled: &mut mpsc::UnboundedReceiver<String>,
) {
    let who = tokio::time::timeout(WAIT, handled.recv())
        .await
        .unwrap_or_else(|_| panic!("the permitted message was not handled within {WAIT:?}"));
    assert_eq!(who.as_deref(), Some("alice"));
    let letters: Vec<RawMessage> = b
        .dead_letters(ep, 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("reading {}: {e}", ep.dead_letter));
    assert_eq!(
        letters.len(),
        1,
        "one dead letter at {} (the message without a reference)",
        ep.dead_letter
    );
    assert_eq!(
        letters[0].headers.get_str(H_REASON),
        Some("missing-context"),
        "{:?}",
        letters[0].headers
    );
    assert_eq!(letters[0].payload, b"{\"order\":2}");
    assert!(
        handled.try_recv().is_err(),
        "only the permitted message ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_wraps_a_stream_consumer_in_one_constructor_with_dead_letters_at_topic_dlq() {
    let kafka = KafkaBinding::real().await;
    let ep = kafka.setup("wrap").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ep.dead_letter, format!("{}.dlq", ep.name));
    let s = scenario(&ep.destination).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = reporting(tx);
    let consumer_config = kafka.guarded_consumer_config(&format!("{}-worker", ep.name));
    publish_both(&kafka, &ep, &s).await;

    // The README's lines.
    let guarded =
        elevate_kafka::GuardedConsumer::from_config(&consumer_config, s.worker.processor(handler))
            .unwrap_or_else(|e| panic!("{e}"));
    guarded
        .consumer()
        .subscribe(&[ep.name.as_str()])
        .unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(guarded.run(stopped.map(|_| ())));

    expect_outcomes(&kafka, &ep, &mut rx).await;
    let _ = stop.send(());
    run.await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("run: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_wraps_a_lapin_consumer_in_one_constructor_with_dead_letters_at_queue_dlq() {
    use lapin::options::BasicConsumeOptions;
    use lapin::types::FieldTable;
    let amqp = AmqpBinding::real().await;
    let ep = amqp.setup("wrap").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ep.dead_letter, format!("{}.dlq", ep.name));
    let s = scenario(&ep.destination).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = reporting(tx);
    publish_both(&amqp, &ep, &s).await;
    let channel = amqp
        .connection()
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let consumer = channel
        .basic_consume(
            ep.name.as_str().into(),
            "wrap-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The README's lines.
    let confirms = elevate_amqp::ConfirmChannel::open(amqp.connection())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let guarded =
        elevate_amqp::GuardedConsumer::new(consumer, s.worker.processor(handler), confirms);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(guarded.run(stopped.map(|_| ())));

    expect_outcomes(&amqp, &ep, &mut rx).await;
    let _ = stop.send(());
    run.await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("run: {e}"));
}

/// A JetStream endpoint whose dead letters are `<subject>.dlq` in a stream of their own.
async fn jetstream_endpoint(nats: &NatsBinding) -> Endpoint {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{STREAM_PREFIX}wrap_{id}");
    let destination = format!("elvt.wrap.{id}.orders");
    let dead_letter = format!("{destination}.dlq");
    nats.create_stream(&name, vec![destination.clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    nats.create_stream(&format!("{name}_DLQ"), vec![dead_letter.clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    Endpoint {
        name,
        destination,
        dead_letter,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_wraps_a_pull_consumer_in_one_constructor_with_dead_letters_at_subject_dlq() {
    let nats = NatsBinding::jetstream().await;
    let ep = jetstream_endpoint(&nats).await;
    let s = scenario(&ep.destination).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = reporting(tx);
    publish_both(&nats, &ep, &s).await;
    let consumer = nats
        .create_consumer(&ep.name, "wrap-worker", &WorkerConfig::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The README's line.
    let guarded =
        elevate_nats::GuardedConsumer::bind(nats.js(), consumer, s.worker.processor(handler));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(guarded.run(stopped.map(|_| ())));

    expect_outcomes(&nats, &ep, &mut rx).await;
    let _ = stop.send(());
    run.await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("run: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refuses_to_start_when_the_source_stream_would_capture_its_own_dead_letters() {
    let nats = NatsBinding::jetstream().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{STREAM_PREFIX}wraploop_{id}");
    nats.create_stream(&name, vec![format!("elvt.wraploop.{id}.>")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let s = scenario(&format!("elvt.wraploop.{id}.orders")).await;
    let consumer = nats
        .create_consumer(&name, "wrap-worker", &WorkerConfig::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (tx, _rx) = mpsc::unbounded_channel();
    let guarded =
        elevate_nats::GuardedConsumer::bind(nats.js(), consumer, s.worker.processor(reporting(tx)));
    let r = tokio::time::timeout(WAIT, guarded.run(std::future::pending()))
        .await
        .unwrap_or_else(|_| panic!("the consumer started instead of refusing"));
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("would match it again"), "refused with: {e}");
}
