//! Kafka order events through Elevate: an order-events producer (the
//! `orders-api` service) publishes through the credential-stripping
//! [`KafkaProducer`], and a guarded `order-worker` consumes them with
//! [`GuardedConsumer`]. Runs on librdkafka's in-process mock cluster by
//! default (no server), or on a real broker with `--bootstrap HOST:PORT`
//! (e.g. the tansu broker from `scripts/kafka-up`).
//!
//! Exits non-zero if any order ends differently than the policy says it must.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use elevate_core::cedar::CedarPdp;
use elevate_core::ctxref::{ContextRefMinter, ContextRefVerifier, MintRequest, VerifyPolicy};
use elevate_core::deadletter::{H_REASON, H_SOURCE, H_VERDICT};
use elevate_core::decision::TracingSink;
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_core::scope::Scope;
use elevate_core::settle::Processor;
use elevate_core::{
    AuthContext, CTX_REF_HEADER, FixedAction, Guard, Headers, InboundMessage, OutboundMessage,
    handler_fn,
};
use elevate_kafka::headers::{from_kafka, to_kafka};
use elevate_kafka::{EmbeddedKafka, GuardedConsumer, KafkaDeadLetters, KafkaProducer};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use txn_token_client::{InProcessTts, Issuer, IssuerSettings, TestIssuer, subject_context};

const TRUST_DOMAIN: &str = "elevate.example";
const PRODUCER: &str = "spiffe://elevate.example/orders-api";
const WORKER: &str = "spiffe://elevate.example/order-worker";
const ACTION: &str = "order.process";

type AppResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Order events over Kafka with a guarded worker.
#[derive(Parser, Debug)]
struct Args {
    /// A real broker's bootstrap servers (default: the in-process mock cluster).
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    bootstrap: Option<String>,
    /// How many orders to publish (users take turns: alice, bob, carol, mallory).
    #[arg(long, default_value_t = 8)]
    orders: usize,
    /// Partitions of the orders topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("kafka_orders failed: {e}");
        std::process::exit(1);
    }
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

async fn create_topics(
    embedded: Option<&EmbeddedKafka>,
    bootstrap: &str,
    topics: &[(&str, i32)],
) -> AppResult<()> {
    if let Some(k) = embedded {
        for (t, p) in topics {
            k.create_topic(t, *p)?;
        }
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    for r in admin.create_topics(&new, &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(format!("cannot create topic {t}: {code}").into()),
        }
    }
    Ok(())
}

async fn run(args: Args) -> AppResult<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,elevate::decision=off".into()),
        )
        .init();

    // Kafka: the embedded mock cluster, or the broker given.
    let embedded = match &args.bootstrap {
        None => Some(EmbeddedKafka::start(1)?),
        Some(_) => None,
    };
    let bootstrap = match (&args.bootstrap, &embedded) {
        (Some(b), _) => b.clone(),
        (None, Some(k)) => k.bootstrap_servers().to_string(),
        (None, None) => unreachable!("one of them is set"),
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let topic = if embedded.is_some() {
        "orders".to_string()
    } else {
        format!("orders-{}", &run_id[..8])
    };
    let dlq = format!("{topic}{}", elevate_kafka::DEFAULT_DLQ_SUFFIX);
    create_topics(
        embedded.as_ref(),
        &bootstrap,
        &[(&topic, args.partitions), (&dlq, 1)],
    )
    .await?;
    println!(
        "kafka: {} at {bootstrap}; topic {topic} ({} partitions), dead letters {dlq}",
        if embedded.is_some() {
            "in-process mock cluster"
        } else {
            "broker"
        },
        args.partitions
    );

    // Policy and identities.
    let pdp = Arc::new(CedarPdp::load_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
    )?);
    let producer_key = SigningKey::generate(SigningAlg::ES256, "orders-api-1")?;
    let worker_key = SigningKey::generate(SigningAlg::EdDSA, "order-worker-1")?;
    let tts = Issuer::generate(IssuerSettings::new(TRUST_DOMAIN))?;
    let scopes = Scope::parse(ACTION);
    tts.register_workload(PRODUCER, producer_key.public_jwk(), &scopes)?;
    tts.register_workload(WORKER, worker_key.public_jwk(), &scopes)?;
    let idp = TestIssuer::new("https://idp.elevate.example", TRUST_DOMAIN)?;
    tts.set_user_issuer(idp.verifier());
    let producer_tts = InProcessTts::new(tts.clone(), PRODUCER, producer_key.clone());
    let worker_tts = Arc::new(InProcessTts::new(tts.clone(), WORKER, worker_key.clone()));

    // The guarded worker: wraps a StreamConsumer configured as usual, plus enable.auto.offset.store=false.
    let consumer: StreamConsumer = client_config(&bootstrap)
        .set("group.id", format!("order-worker-{run_id}"))
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[topic.as_str()])?;
    let mut producer_keys = KeySet::new();
    producer_keys.insert_workload_key(PRODUCER, &producer_key)?;
    let guard = Guard::new(
        WORKER,
        ContextRefVerifier::new(producer_keys, VerifyPolicy::new(WORKER)),
        worker_tts,
        pdp.clone(),
        Arc::new(TracingSink),
        Arc::new(FixedAction::new(ACTION, "Destination")),
    );
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let handler = handler_fn(move |msg: InboundMessage, auth: AuthContext| {
        let counter = counter.clone();
        async move {
            println!(
                "  PERMIT  {} for {} at {} (txn {}, scope \"{}\")",
                String::from_utf8_lossy(&msg.payload),
                auth.subject,
                msg.coordinates,
                auth.txn,
                auth.scope
            );
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let dead_letters = KafkaDeadLetters::from_config(&client_config(&bootstrap))?;
    let processor = Arc::new(Processor::new(
        Arc::new(guard),
        Arc::new(handler),
        Arc::new(dead_letters),
    ));
    let worker = GuardedConsumer::new(consumer, processor)?.concurrency(4);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    // The producer service: each user's request arrives with a bearer token.
    println!("\n== produce: user token -> Txn-Token for orders-api -> order event with no token");
    let plain: FutureProducer = client_config(&bootstrap).set("acks", "all").create()?;
    let producer = KafkaProducer::new(
        plain.clone(),
        ProducerGuard::new(
            ContextRefMinter::new(PRODUCER, producer_key.clone(), Duration::from_secs(3600)),
            pdp.clone(),
        ),
    );
    let users = ["alice", "bob", "carol", "mallory"];
    let mut expected_handled = 0;
    for i in 0..args.orders {
        let user = users[i % users.len()];
        let user_token = idp.issue_access_token(user, ACTION, Duration::from_secs(300))?;
        let txn_token = producer_tts
            .exchange_access_token(
                &user_token,
                &Scope::parse(ACTION),
                &serde_json::json!({"http": "POST /orders"}),
            )
            .await?;
        let subject = subject_context(&txn_token.claims);
        let mut headers = Headers::new();
        // a careless service forwards the user's token: the producer strips it
        headers.append("Authorization", format!("Bearer {user_token}"));
        let order = format!("ORD-{}", i + 1);
        let body = format!(
            r#"{{"order":"{order}","user":"{user}","amount":{}}}"#,
            10 + i * 7
        );
        let receipt = producer
            .publish(
                &topic,
                Some(order.as_bytes()),
                &PublishRequest {
                    subject: &subject,
                    action: ACTION,
                    audience: &[WORKER.to_string()],
                    destination: &topic,
                    scope: None,
                },
                OutboundMessage {
                    headers,
                    payload: body.into_bytes(),
                },
            )
            .await?;
        println!(
            "  {user:8} {order:7} -> {}/{} offset {} (stripped {})",
            receipt.topic,
            receipt.partition,
            receipt.offset,
            receipt.stripped.len()
        );
        expected_handled += usize::from(matches!(user, "alice" | "bob"));
    }
    // An unguarded producer with a forged reference.
    let forger = SigningKey::generate(SigningAlg::ES256, "orders-api-1")?;
    let body = br#"{"order":"ORD-X","user":"alice","amount":1}"#;
    let forged =
        ContextRefMinter::new(PRODUCER, forger, Duration::from_secs(60)).mint(&MintRequest {
            subject: "alice",
            sub_kind: elevate_core::SubjectKind::Human,
            audience: &[WORKER.to_string()],
            scope: &Scope::parse(ACTION),
            txn: "forged",
            destination: &topic,
            payload: body,
        })?;
    let forged_headers: Headers = [(CTX_REF_HEADER, forged.token)].into_iter().collect();
    plain
        .send(
            FutureRecord::<[u8], [u8]>::to(&topic)
                .payload(&body[..])
                .headers(to_kafka(&forged_headers)),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    println!("  (attacker) forged reference for alice, sent with a plain producer");
    let published = args.orders + 1;
    let expected_dead = published - expected_handled;

    println!(
        "\n== consume: verify -> Txn-Token for order-worker -> trust elevation -> dispatch or dead-letter"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while handled.load(Ordering::SeqCst) < expected_handled
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let letters = read_dead_letters(&bootstrap, &dlq, expected_dead, deadline).await?;
    let _ = stop.send(());
    worker.await??;

    println!("\n== dead letters in {dlq}");
    for (headers, payload) in &letters {
        println!(
            "  {} / {}: {} (from {})",
            headers.get_str(H_VERDICT).unwrap_or("?"),
            headers.get_str(H_REASON).unwrap_or("?"),
            String::from_utf8_lossy(payload),
            headers.get_str(H_SOURCE).unwrap_or("?")
        );
    }
    let handled = handled.load(Ordering::SeqCst);
    println!(
        "\npublished {published}, handled {handled}, dead-lettered {}",
        letters.len()
    );
    if handled != expected_handled || letters.len() != expected_dead {
        return Err(format!("unexpected outcome: expected {expected_handled} handled and {expected_dead} dead-lettered").into());
    }
    Ok(())
}

/// Reads the dead-letter topic from the start with a plain consumer until `expected` arrived or the deadline.
async fn read_dead_letters(
    bootstrap: &str,
    dlq: &str,
    expected: usize,
    deadline: tokio::time::Instant,
) -> AppResult<Vec<(Headers, Vec<u8>)>> {
    let reader: StreamConsumer = client_config(bootstrap)
        .set(
            "group.id",
            format!("dlq-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(dlq, 0, Offset::Beginning)?;
    reader.assign(&tpl)?;
    let mut out = Vec::new();
    while out.len() < expected {
        match tokio::time::timeout_at(deadline, reader.recv()).await {
            Ok(Ok(m)) => out.push((
                from_kafka(m.headers()),
                m.payload().unwrap_or_default().to_vec(),
            )),
            Ok(Err(e)) => tracing::warn!(error = %e, "dead-letter reader"),
            Err(_) => break,
        }
    }
    Ok(out)
}
