//! An event-driven pipeline across three brokers, one delegation chain:
//!
//! ```text
//! HTTP POST /orders (user token) → orders-api ─Kafka orders→ order-worker
//!   ─NATS JetStream billing→ billing-worker ─RabbitMQ notifications→ notify-worker
//! ```
//!
//! The producer service (a small axum endpoint on loopback) exchanges the
//! user's token for a Txn-Token (entry flow) and publishes the order with an
//! origin context reference. Each guarded worker verifies the reference (and
//! its whole history), gets its own Txn-Token, runs trust elevation, and
//! publishes downstream with a *derived* reference: it joins the `act` chain,
//! and the scope narrows at every hop. Every decision record shows the chain.
//!
//! `--compromised-middle-hop`: billing-worker signs notification references
//! with a scope its parent never had; notify-worker quarantines them
//! (`scope-widened`) and dead-letters them on RabbitMQ.
//!
//! Kafka runs on librdkafka's in-process mock cluster unless
//! `--kafka-bootstrap` names a broker; NATS (JetStream) and RabbitMQ must be
//! running (`NATS_URL`, `AMQP_URL`). Exits non-zero if any order ends
//! differently than the policy says it must.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use clap::Parser;
use elevate_amqp::{AmqpDeadLetters, AmqpPublisher, ConfirmChannel, declare_queue_set};
use elevate_core::deadletter::H_REASON;
use elevate_core::decision::{DecisionRecord, FileSink, MemorySink, TeeSink};
use elevate_core::keys::SigningAlg;
use elevate_core::producer::{DerivedPublish, PublishRequest};
use elevate_core::replay::InMemoryReplayGuard;
use elevate_core::scope::Scope;
use elevate_core::settle::{HandlerError, Processor};
use elevate_core::{
    AuthContext, CTX_REF_HEADER, Guard, Headers, InboundMessage, OutboundMessage, handler_fn,
};
use elevate_examples::wiring::{self, ORDERS_API, TrustDomain, short};
use elevate_kafka::headers::from_kafka;
use elevate_kafka::{EmbeddedKafka, KafkaDeadLetters, KafkaProducer};
use elevate_nats::{NatsDeadLetters, NatsPublisher, from_nats_headers};
use elevate_tts::InProcessTts;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use txn_token_client::subject_context;

const ORDER_WORKER: &str = "spiffe://elevate.example/order-worker";
const BILLING_WORKER: &str = "spiffe://elevate.example/billing-worker";
const NOTIFY_WORKER: &str = "spiffe://elevate.example/notify-worker";
const ORIGIN_SCOPE: &str = "order.process billing.charge notification.send";
const BILLING_SCOPE: &str = "billing.charge notification.send";
const NOTIFY_SCOPE: &str = "notification.send";
const WAIT: Duration = Duration::from_secs(60);

type AppResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A three-broker pipeline carrying one delegation chain.
#[derive(Parser, Debug)]
struct Args {
    /// A real Kafka broker (default: librdkafka's in-process mock cluster).
    #[arg(long)]
    kafka_bootstrap: Option<String>,
    /// NATS server with JetStream.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// RabbitMQ.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// billing-worker tries to widen the scope of the references it signs.
    #[arg(long)]
    compromised_middle_hop: bool,
}

#[tokio::main]
async fn main() {
    match run(Args::parse()).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("pipeline failed: {e}");
            std::process::exit(1);
        }
    }
}

fn kafka_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

fn order_id(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("order").and_then(|o| o.as_str()).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Size in bytes of the context reference a message carries.
fn ref_len(msg: &InboundMessage) -> usize {
    msg.headers
        .get_str(CTX_REF_HEADER)
        .map(str::len)
        .unwrap_or(0)
}

/// The workloads of the pipeline and their key algorithms; each trusts references from all of them.
const WORKLOADS: [(&str, SigningAlg); 4] = [
    (ORDERS_API, SigningAlg::ES256),
    (ORDER_WORKER, SigningAlg::EdDSA),
    (BILLING_WORKER, SigningAlg::ES256),
    (NOTIFY_WORKER, SigningAlg::EdDSA),
];

/// The trust domain, plus where the pipeline's decisions go.
struct Identities {
    domain: TrustDomain,
    log: Arc<TeeSink>,
    memory: MemorySink,
}

impl Identities {
    fn guard(&self, id: &str, action: &str) -> AppResult<Guard> {
        let trusted = WORKLOADS.map(|(w, _)| w);
        Ok(self
            .domain
            .guard(id, &trusted, action, self.log.clone())?
            .with_replay_guard(Arc::new(InMemoryReplayGuard::new())))
    }
}

/// Shared state of the producer service's HTTP endpoint.
#[derive(Clone)]
struct Front {
    tts: Arc<InProcessTts>,
    producer: Arc<KafkaProducer>,
    topic: String,
}

/// `POST /orders` with `Authorization: Bearer <user token>` and a JSON order.
async fn post_order(
    State(front): State<Front>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return (StatusCode::UNAUTHORIZED, "bearer token required".into());
    };
    let txn_token = match front
        .tts
        .exchange_access_token(
            token.trim(),
            &Scope::parse(ORIGIN_SCOPE),
            &serde_json::json!({"http": "POST /orders"}),
        )
        .await
    {
        Ok(t) => t,
        Err(e) => {
            return (
                StatusCode::FORBIDDEN,
                format!("token exchange refused: {e}"),
            );
        }
    };
    let subject = subject_context(&txn_token.claims);
    let audience = [ORDER_WORKER.to_string()];
    let req = PublishRequest {
        subject: &subject,
        action: "order.process",
        audience: &audience,
        destination: &front.topic,
        scope: None,
    };
    let msg = OutboundMessage {
        headers: Headers::new(),
        payload: body.into_bytes(),
    };
    match front.producer.publish(&req, msg).await {
        Ok(r) => (
            StatusCode::ACCEPTED,
            format!(
                "{} txn {}",
                r.at.map_or_else(|| r.destination.clone(), |at| at.to_string()),
                subject.txn
            ),
        ),
        Err(e) => (StatusCode::FORBIDDEN, e.to_string()),
    }
}

async fn run(args: Args) -> AppResult<bool> {
    wiring::init_tracing();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();

    // ---- identities, registry, policy
    let mut domain = TrustDomain::new()?;
    for (id, alg) in WORKLOADS {
        domain.register(id, alg, ORIGIN_SCOPE)?;
    }
    let log_path = std::env::temp_dir().join(format!("elevate-pipeline-{run_id}.jsonl"));
    let memory = MemorySink::new();
    let log = Arc::new(TeeSink::new(vec![
        Arc::new(FileSink::open(&log_path)?),
        Arc::new(memory.clone()),
    ]));
    let ids = Arc::new(Identities {
        domain,
        log,
        memory,
    });
    println!(
        "policy bundle version {}; decision log {}",
        ids.domain.pdp.version(),
        log_path.display()
    );

    // ---- brokers
    let embedded = match &args.kafka_bootstrap {
        None => Some(EmbeddedKafka::start(1)?),
        Some(_) => None,
    };
    let bootstrap = match (&args.kafka_bootstrap, &embedded) {
        (Some(b), _) => b.clone(),
        (None, Some(k)) => k.bootstrap_servers().to_string(),
        (None, None) => return Err("no Kafka".into()),
    };
    let topic = format!("orders-{run_id}");
    let topic_dlq = format!("{topic}{}", elevate_kafka::DEFAULT_DLQ_SUFFIX);
    match &embedded {
        Some(k) => {
            k.create_topic(&topic, 1)?;
            k.create_topic(&topic_dlq, 1)?;
        }
        None => {
            let admin: AdminClient<DefaultClientContext> = kafka_config(&bootstrap).create()?;
            let new = [&topic, &topic_dlq].map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)));
            for r in admin.create_topics(&new, &AdminOptions::new()).await? {
                if let Err((t, code)) = r
                    && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
                {
                    return Err(format!("cannot create topic {t}: {code}").into());
                }
            }
        }
    }
    let nats = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(&args.nats_url)
        .await
        .map_err(|e| {
            format!(
                "NATS at {} (NATS_URL): {e}; start nats-server with -js",
                args.nats_url
            )
        })?;
    let js = jetstream::new(nats.clone());
    let billing_subject = format!("billing.{run_id}");
    let billing_dlq = format!("billing.{run_id}.dlq");
    let billing_stream = format!("PIPELINE_BILLING_{run_id}");
    let billing_dlq_stream = format!("{billing_stream}_DLQ");
    for (name, subject) in [
        (&billing_stream, &billing_subject),
        (&billing_dlq_stream, &billing_dlq),
    ] {
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::Memory,
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await?;
    }
    let amqp = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("RabbitMQ at {} (AMQP_URL): {e}", args.amqp_url))?;
    let admin = amqp.create_channel().await?;
    let mut expiring = FieldTable::default();
    expiring.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    let notifications = declare_queue_set(
        &admin,
        &format!("notifications-{run_id}"),
        expiring.clone(),
        expiring,
    )
    .await?;
    println!(
        "kafka {} ({bootstrap}) topic {topic}; NATS JetStream subject {billing_subject}; RabbitMQ queue {}",
        if embedded.is_some() {
            "mock cluster"
        } else {
            "broker"
        },
        notifications.work
    );

    // ---- notify-worker (RabbitMQ): the last hop
    let delivered = Arc::new(Mutex::new(Vec::<String>::new()));
    let notify_handler = {
        let delivered = delivered.clone();
        handler_fn(move |msg: InboundMessage, auth: AuthContext| {
            let delivered = delivered.clone();
            async move {
                println!(
                    "  notify-worker: notifying {} about {} (scope \"{}\", chain {:?}, reference {} B)",
                    auth.subject(),
                    order_id(&msg.payload),
                    auth.scope(),
                    auth.chain().iter().map(|w| short(w)).collect::<Vec<_>>(),
                    ref_len(&msg)
                );
                delivered.lock().push(order_id(&msg.payload));
                Ok(())
            }
        })
    };
    let confirms = ConfirmChannel::new(amqp.create_channel().await?).await?;
    let notify_processor = Processor::new(
        Arc::new(ids.guard(NOTIFY_WORKER, "notification.send")?),
        Arc::new(notify_handler),
        Arc::new(AmqpDeadLetters::with_confirm_channel(
            confirms.clone(),
            "",
            &notifications.dead_letter,
        )),
    );
    let consume_ch = amqp.create_channel().await?;
    consume_ch.basic_qos(8, BasicQosOptions::default()).await?;
    let consumer = consume_ch
        .basic_consume(
            notifications.work.as_str().into(),
            "notify-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (stop_notify, notify_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut notify_worker =
        elevate_amqp::GuardedConsumer::new(consumer, Arc::new(notify_processor), confirms.clone())
            .concurrency(8);
    if let Some(user) = elevate_amqp::uri_user(&args.amqp_url) {
        notify_worker = notify_worker.retry_user(user);
    }
    let notify_task = tokio::spawn(notify_worker.run(async {
        let _ = notify_stopped.await;
    }));

    // ---- billing-worker (NATS JetStream): derives the notification reference
    let amqp_publisher =
        AmqpPublisher::with_confirm_channel(confirms.clone(), ids.domain.producer(BILLING_WORKER)?);
    let billing_minter = ids.domain.minter(BILLING_WORKER)?;
    let compromised = args.compromised_middle_hop;
    let notify_queue = notifications.work.clone();
    let billing_handler = handler_fn(move |msg: InboundMessage, auth: AuthContext| {
        let publisher = amqp_publisher.clone();
        let minter = billing_minter.clone();
        let queue = notify_queue.clone();
        async move {
            let audience = [NOTIFY_WORKER.to_string()];
            let order = order_id(&msg.payload);
            let perm = |e: String| HandlerError::Permanent(e);
            if !compromised {
                println!(
                    "  billing-worker: charging {} for {} (reference {} B)",
                    auth.subject(),
                    order,
                    ref_len(&msg)
                );
                let scope = Scope::parse(NOTIFY_SCOPE);
                let next = DerivedPublish {
                    action: "notification.send",
                    audience: &audience,
                    destination: &queue,
                    scope: Some(&scope),
                };
                let out = OutboundMessage {
                    headers: Headers::new(),
                    payload: msg.payload.to_vec(),
                };
                return publisher
                    .publish_derived(&auth, &next, out, BasicProperties::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| perm(e.to_string()));
            }
            // Compromised: ask for more than the parent had. The guard refuses...
            let wider = Scope::parse("notification.send order.process");
            let refused =
                auth.derive_reference(&minter, Some(&wider), &audience, &queue, &msg.payload);
            println!(
                "  billing-worker (COMPROMISED): guard refuses the wider scope for {order}: {}",
                refused
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "not refused?!".into())
            );
            // ...so it signs the widened reference itself and publishes it raw.
            let mut claims = auth
                .derive_reference(&minter, None, &audience, &queue, &msg.payload)
                .map_err(|e| perm(e.to_string()))?
                .claims;
            claims.scope = wider.to_string();
            let token = minter.sign(claims).map_err(|e| perm(e.to_string()))?.token;
            let headers: Headers = [(CTX_REF_HEADER, token)].into_iter().collect();
            let table = elevate_amqp::headers::encode(&headers).map_err(|e| perm(e.to_string()))?;
            publisher
                .channel()
                .publish(
                    "",
                    &queue,
                    &msg.payload,
                    BasicProperties::default()
                        .with_headers(table)
                        .with_message_id(uuid::Uuid::new_v4().to_string().into()),
                )
                .await
                .map_err(|e| perm(e.to_string()))
        }
    });
    let billing_processor = Processor::new(
        Arc::new(ids.guard(BILLING_WORKER, "billing.charge")?),
        Arc::new(billing_handler),
        Arc::new(NatsDeadLetters::jetstream(js.clone(), &billing_dlq)),
    );
    let pull: consumer::PullConsumer = js
        .get_stream(&billing_stream)
        .await?
        .get_or_create_consumer(
            "billing-worker",
            consumer::pull::Config {
                durable_name: Some("billing-worker".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await?;
    let (stop_billing, billing_stopped) = tokio::sync::oneshot::channel::<()>();
    let billing_task = tokio::spawn(
        elevate_nats::GuardedConsumer::new(pull, Arc::new(billing_processor))
            .concurrency(8)
            .fetch_expires(Duration::from_millis(500))
            .unreadable(elevate_nats::unreadable::UnreadableMessages::new(
                js.clone(),
            ))
            .run(async {
                let _ = billing_stopped.await;
            }),
    );

    // ---- order-worker (Kafka): derives the billing reference
    let nats_publisher = NatsPublisher::new(nats.clone(), ids.domain.producer(ORDER_WORKER)?);
    let subject = billing_subject.clone();
    let order_handler = handler_fn(move |msg: InboundMessage, auth: AuthContext| {
        let publisher = nats_publisher.clone();
        let subject = subject.clone();
        async move {
            println!(
                "  order-worker: processing {} for {} (reference {} B)",
                order_id(&msg.payload),
                auth.subject(),
                ref_len(&msg)
            );
            let audience = [BILLING_WORKER.to_string()];
            let scope = Scope::parse(BILLING_SCOPE);
            let next = DerivedPublish {
                action: "billing.charge",
                audience: &audience,
                destination: &subject,
                scope: Some(&scope),
            };
            let out = OutboundMessage {
                headers: Headers::new(),
                payload: msg.payload.to_vec(),
            };
            publisher
                .publish_derived_jetstream(&auth, &next, out)
                .await
                .map(|_| ())
                .map_err(|e| HandlerError::Permanent(e.to_string()))
        }
    });
    let order_processor = Processor::new(
        Arc::new(ids.guard(ORDER_WORKER, "order.process")?),
        Arc::new(order_handler),
        Arc::new(KafkaDeadLetters::from_config(&kafka_config(&bootstrap))?),
    );
    let order_consumer = elevate_kafka::GuardedConsumer::from_config(
        kafka_config(&bootstrap)
            .set("group.id", format!("order-worker-{run_id}"))
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000"),
        Arc::new(order_processor),
    )?;
    order_consumer.consumer().subscribe(&[topic.as_str()])?;
    let (stop_order, order_stopped) = tokio::sync::oneshot::channel::<()>();
    let order_task = tokio::spawn(order_consumer.concurrency(4).run(async {
        let _ = order_stopped.await;
    }));

    // ---- the producer service: an HTTP endpoint on loopback
    let plain: FutureProducer = kafka_config(&bootstrap).set("acks", "all").create()?;
    let front = Front {
        tts: Arc::new(ids.domain.tts_for(ORDERS_API)?),
        producer: Arc::new(KafkaProducer::new(plain, ids.domain.producer(ORDERS_API)?)),
        topic: topic.clone(),
    };
    let app = axum::Router::new()
        .route("/orders", axum::routing::post(post_order))
        .with_state(front);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/orders", listener.local_addr()?);
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .await
    });

    // ---- requests: (order, user, where it must end)
    let alice_end = if compromised {
        "dead letter at notifications: scope-widened"
    } else {
        "delivered to notify-worker"
    };
    let plan: Vec<(&str, Option<&str>, &str)> = vec![
        ("ORD-1", Some("alice"), alice_end),
        ("ORD-2", Some("alice"), alice_end),
        // bob may process orders but not be charged: stopped at the billing hop
        (
            "ORD-3",
            Some("bob"),
            "dead letter at billing: subject-denied",
        ),
        // mallory's account is suspended: stopped at the first hop
        (
            "ORD-4",
            Some("mallory"),
            "dead letter at orders: subject-denied",
        ),
        // no token: refused at the door
        ("ORD-5", None, "HTTP 401"),
    ];
    println!("\n== POST {url}");
    let http = reqwest::Client::new();
    let mut outcome: BTreeMap<String, String> = BTreeMap::new();
    for (order, user, _) in &plan {
        let mut req = http
            .post(&url)
            .body(serde_json::json!({"order": order, "amount": 42}).to_string());
        if let Some(u) = user {
            req = req.bearer_auth(ids.domain.idp.issue_access_token(
                u,
                ORIGIN_SCOPE,
                Duration::from_secs(300),
            )?);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        println!(
            "  {order} {:8} -> HTTP {} {text}",
            user.unwrap_or("(none)"),
            status.as_u16()
        );
        if !status.is_success() {
            outcome.insert(order.to_string(), format!("HTTP {}", status.as_u16()));
        }
    }

    // ---- wait for every accepted order to end somewhere
    println!("\n== hops");
    let expected_letters = |at: &str| {
        plan.iter()
            .filter(|(_, _, end)| end.contains(&format!("at {at}:")))
            .count()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut kafka_dl, mut nats_dl, mut amqp_dl) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        if kafka_dl.len() < expected_letters("orders") {
            kafka_dl = read_kafka(&bootstrap, &topic_dlq).await?;
        }
        if nats_dl.len() < expected_letters("billing") {
            nats_dl = read_stream(&js, &billing_dlq_stream).await?;
        }
        amqp_dl.extend(drain_queue(&admin, &notifications.dead_letter).await?);
        let delivered_n = delivered.lock().len();
        let done = delivered_n >= plan.iter().filter(|p| p.2.starts_with("delivered")).count()
            && kafka_dl.len() >= expected_letters("orders")
            && nats_dl.len() >= expected_letters("billing")
            && amqp_dl.len() >= expected_letters("notifications");
        if done || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for o in delivered.lock().iter() {
        outcome.insert(o.clone(), "delivered to notify-worker".into());
    }
    for (at, letters) in [
        ("orders", &kafka_dl),
        ("billing", &nats_dl),
        ("notifications", &amqp_dl),
    ] {
        for (headers, payload) in letters {
            let reason = headers.get_str(H_REASON).unwrap_or("?");
            outcome.insert(order_id(payload), format!("dead letter at {at}: {reason}"));
        }
    }

    // ---- decision records: the chain at every hop
    println!("\n== decision records (also in {})", log_path.display());
    let mut records: Vec<DecisionRecord> = ids.memory.records();
    records.sort_by(|a, b| a.time.cmp(&b.time));
    for r in &records {
        println!(
            "  {:15} {:10} {:15} sub={:8} chain={:?}",
            short(&r.workload),
            format!("{:?}", r.verdict).to_lowercase(),
            r.reason.code(),
            r.subject.as_deref().unwrap_or("-"),
            r.chain.iter().map(|w| short(w)).collect::<Vec<_>>()
        );
        if let Some(d) = r
            .detail
            .as_deref()
            .filter(|_| r.verdict != elevate_core::Verdict::Permit)
        {
            println!("  {:15} └ {d}", "");
        }
    }

    // ---- summary
    println!(
        "\n== summary ({})",
        if compromised {
            "compromised middle hop"
        } else {
            "honest pipeline"
        }
    );
    let mut ok = true;
    for (order, user, expected) in &plan {
        let got = outcome
            .get(*order)
            .cloned()
            .unwrap_or_else(|| "no outcome".into());
        let good = got == *expected;
        ok &= good;
        println!(
            "  {} {order} {:8} {got}{}",
            if good { "ok  " } else { "FAIL" },
            user.unwrap_or("(none)"),
            if good {
                String::new()
            } else {
                format!(" (expected: {expected})")
            }
        );
    }

    let _ = stop_http.send(());
    let _ = stop_order.send(());
    let _ = stop_billing.send(());
    let _ = stop_notify.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        let _ = http_task.await;
        let _ = order_task.await;
        let _ = billing_task.await;
        let _ = notify_task.await;
    })
    .await;
    for s in [&billing_stream, &billing_dlq_stream] {
        let _ = js.delete_stream(s).await;
    }
    println!(
        "\n{}",
        if ok {
            "all outcomes as the policy says"
        } else {
            "UNEXPECTED OUTCOMES"
        }
    );
    Ok(ok)
}

/// Every record of a (one-partition) Kafka topic so far.
async fn read_kafka(bootstrap: &str, topic: &str) -> AppResult<Vec<(Headers, Vec<u8>)>> {
    let c: StreamConsumer = kafka_config(bootstrap)
        .set(
            "group.id",
            format!("pipeline-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let (_, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(5))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    c.assign(&tpl)?;
    let mut out = Vec::new();
    while (out.len() as i64) < high {
        match tokio::time::timeout(Duration::from_secs(5), c.recv()).await {
            Ok(Ok(m)) => out.push((
                from_kafka(m.headers()),
                m.payload().unwrap_or_default().to_vec(),
            )),
            _ => break,
        }
    }
    Ok(out)
}

/// Every message of a JetStream stream so far.
async fn read_stream(js: &jetstream::Context, name: &str) -> AppResult<Vec<(Headers, Vec<u8>)>> {
    let s = js.get_stream(name).await?;
    let state = s.get_info().await?.state;
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push((from_nats_headers(Some(&m.headers)), m.payload.to_vec()));
        }
    }
    Ok(out)
}

/// Takes what is in a RabbitMQ queue now.
async fn drain_queue(ch: &lapin::Channel, queue: &str) -> AppResult<Vec<(Headers, Vec<u8>)>> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await?
    {
        out.push((
            elevate_amqp::headers::decode(m.delivery.properties.headers().as_ref()),
            m.delivery.data.clone(),
        ));
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(out)
}
