//! Kafka order events through Elevate: an order-events producer (the
//! `orders-api` service) publishes through the credential-stripping
//! [`KafkaProducer`], and a guarded `order-worker` consumes them with
//! [`GuardedConsumer`]. Runs on librdkafka's in-process mock cluster by
//! default (no server), or on a real broker with `--bootstrap HOST:PORT`
//! (e.g. the tansu broker from `scripts/kafka-up`).
//!
//! Exits non-zero if any order ends differently than the policy says it must.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use elevate_core::decision::TracingSink;
use elevate_core::keys::SigningAlg;
use elevate_core::producer::PublishRequest;
use elevate_core::settle::Processor;
use elevate_core::{Headers, OutboundMessage};
use elevate_examples::wiring::{self, ORDERS_API as PRODUCER, TrustDomain, USERS};
use elevate_examples::worker::{Running, permit_printer, print_dead_letter, report};
use elevate_kafka::headers::{from_kafka, to_kafka};
use elevate_kafka::{EmbeddedKafka, GuardedConsumer, KafkaDeadLetters, KafkaProducer};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const WORKER: &str = "spiffe://elevate.example/order-worker";
const ACTION: &str = "order.process";

type AppResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

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
    wiring::init_tracing();

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
    let mut domain = TrustDomain::new()?;
    domain
        .register(PRODUCER, SigningAlg::ES256, ACTION)?
        .register(WORKER, SigningAlg::EdDSA, ACTION)?;
    let producer_tts = domain.tts_for(PRODUCER)?;

    // The guarded worker: wraps a StreamConsumer configured as usual, plus enable.auto.offset.store=false.
    let guard = domain.guard(WORKER, &[PRODUCER], ACTION, Arc::new(TracingSink))?;
    let (handled, handler) = permit_printer(|msg| format!("at {}", msg.coordinates));
    let dead_letters = KafkaDeadLetters::from_config(&client_config(&bootstrap))?;
    let processor = Arc::new(Processor::new(
        Arc::new(guard),
        Arc::new(handler),
        Arc::new(dead_letters),
    ));
    let worker = GuardedConsumer::from_config(
        client_config(&bootstrap)
            .set("group.id", format!("order-worker-{run_id}"))
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000"),
        processor,
    )?;
    worker.consumer().subscribe(&[topic.as_str()])?;
    let worker = worker.concurrency(4);
    let worker = Running::spawn(|stopped| worker.run(stopped));

    // The producer service: each user's request arrives with a bearer token.
    println!("\n== produce: user token -> Txn-Token for orders-api -> order event with no token");
    let plain: FutureProducer = client_config(&bootstrap).set("acks", "all").create()?;
    let producer = KafkaProducer::new(plain.clone(), domain.producer(PRODUCER)?);
    let mut expected_handled = 0;
    for i in 0..args.orders {
        let user = USERS[i % USERS.len()];
        let (user_token, subject) = domain
            .sign_in(&producer_tts, user, ACTION, "POST /orders")
            .await?;
        // a careless service forwards the user's token: the producer strips it
        let headers = wiring::forwarded_token(&user_token);
        let order = format!("ORD-{}", i + 1);
        let body = format!(
            r#"{{"order":"{order}","user":"{user}","amount":{}}}"#,
            10 + i * 7
        );
        let receipt = producer
            .publish_keyed(
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
            "  {user:8} {order:7} -> {} (stripped {})",
            receipt
                .at
                .map_or_else(|| receipt.destination.clone(), |at| at.to_string()),
            receipt.stripped.len()
        );
        expected_handled += usize::from(matches!(user, "alice" | "bob"));
    }
    // An unguarded producer with a forged reference.
    let body = br#"{"order":"ORD-X","user":"alice","amount":1}"#;
    let forged_headers = wiring::forged_reference(PRODUCER, WORKER, ACTION, &topic, body)?;
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
    handled.wait_for(expected_handled, deadline).await;
    let letters = read_dead_letters(&bootstrap, &dlq, expected_dead, deadline).await?;
    worker.stop().await??;

    println!("\n== dead letters in {dlq}");
    for (headers, payload) in &letters {
        print_dead_letter(headers, payload);
    }
    report(published, handled.get(), letters.len(), expected_handled)
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
