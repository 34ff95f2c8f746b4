//! Invoice jobs over RabbitMQ through Elevate: the `orders-api` service
//! publishes "create invoice" jobs for users through the confirming,
//! credential-stripping [`AmqpPublisher`] to the `billing` exchange, and a
//! guarded `invoice-worker` consumes them with [`GuardedConsumer`] wrapped
//! around an ordinary lapin consumer. Denied and forged jobs land in the
//! dead-letter queue with the decision id and reason.
//!
//! Needs RabbitMQ at `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`;
//! start one with `rabbitmq-server -detached`). Exits non-zero if any job ends
//! differently than the policy says it must.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use elevate_amqp::{
    AmqpDeadLetters, AmqpPublisher, ConfirmChannel, GuardedConsumer, declare_queues,
};
use elevate_core::OutboundMessage;
use elevate_core::decision::TracingSink;
use elevate_core::keys::SigningAlg;
use elevate_core::producer::PublishRequest;
use elevate_core::settle::Processor;
use elevate_examples::wiring::{self, ORDERS_API as PRODUCER, TrustDomain, USERS};
use elevate_examples::worker::{Running, permit_printer, print_dead_letter, report};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

const WORKER: &str = "spiffe://elevate.example/invoice-worker";
const ACTION: &str = "invoice.create";
const ROUTING_KEY: &str = "invoice.create";

type AppResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Invoice jobs over RabbitMQ with a guarded worker.
#[derive(Parser, Debug)]
struct Args {
    /// Broker address.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// How many jobs to publish (users take turns: alice, bob, carol, mallory).
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// Prefetch (`basic_qos`) and concurrency of the worker.
    #[arg(long, default_value_t = 8)]
    prefetch: u16,
    /// Keep the exchange and queues afterwards (default: delete them).
    #[arg(long)]
    keep: bool,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("amqp_invoices failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> AppResult<()> {
    wiring::init_tracing();

    let conn = Connection::connect(
        &args.amqp_url,
        ConnectionProperties::default().with_connection_name("amqp_invoices".into()),
    )
    .await
    .map_err(|e| {
        format!(
            "cannot reach RabbitMQ at {} ({e}); start it with `rabbitmq-server -detached`",
            args.amqp_url
        )
    })?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let exchange = format!("billing-{}", &run_id[..8]);
    let queue = format!("invoices-{}", &run_id[..8]);

    // Topology: a direct exchange, the work queue bound to it, its retry and dead-letter queues.
    let admin = conn.create_channel().await?;
    admin
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let queues = declare_queues(&admin, &queue).await?;
    admin
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!(
        "rabbitmq at {}: exchange {exchange} -> queue {queue} (retry {}, dead letters {})",
        args.amqp_url, queues.retry, queues.dead_letter
    );

    // Policy and identities.
    let mut domain = TrustDomain::new()?;
    domain
        .register(PRODUCER, SigningAlg::ES256, ACTION)?
        .register(WORKER, SigningAlg::EdDSA, ACTION)?;
    let producer_tts = domain.tts_for(PRODUCER)?;

    // The worker: an ordinary lapin consumer (prefetch = concurrency), wrapped by the guard.
    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "invoice-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let guard = domain.guard(WORKER, &[PRODUCER], ACTION, Arc::new(TracingSink))?;
    let (handled, handler) = permit_printer(|msg| format!("from {}", msg.destination));
    let confirms = ConfirmChannel::new(conn.create_channel().await?).await?;
    let dead_letters =
        AmqpDeadLetters::with_confirm_channel(confirms.clone(), "", &queues.dead_letter);
    let processor = Arc::new(Processor::new(
        Arc::new(guard),
        Arc::new(handler),
        Arc::new(dead_letters),
    ));
    let mut worker =
        GuardedConsumer::new(consumer, processor, confirms).concurrency(usize::from(args.prefetch));
    if let Some(user) = elevate_amqp::uri_user(&args.amqp_url) {
        worker = worker.retry_user(user); // retry copies authenticated by the broker's user-id check
    }
    let worker = Running::spawn(|stopped| worker.run(stopped));

    // The producer service: each user's request arrives with a bearer token.
    println!(
        "\n== publish: user token -> Txn-Token for orders-api -> invoice job with no token, confirmed by the broker"
    );
    let publisher =
        AmqpPublisher::new(conn.create_channel().await?, domain.producer(PRODUCER)?).await?;
    let mut expected_handled = 0;
    for i in 0..args.jobs {
        let user = USERS[i % USERS.len()];
        let (user_token, subject) = domain
            .sign_in(&producer_tts, user, ACTION, "POST /invoices")
            .await?;
        // a careless service forwards the user's token: the publisher strips it
        let headers = wiring::forwarded_token(&user_token);
        let invoice = format!("INV-{}", i + 1);
        let body = format!(
            r#"{{"invoice":"{invoice}","user":"{user}","amount":{}}}"#,
            20 + i * 13
        );
        let destination = elevate_amqp::destination(&exchange, ROUTING_KEY);
        let receipt = publisher
            .publish(
                &PublishRequest {
                    subject: &subject,
                    action: ACTION,
                    audience: &[WORKER.to_string()],
                    destination: &destination,
                    scope: None,
                },
                OutboundMessage {
                    headers,
                    payload: body.into_bytes(),
                },
            )
            .await?;
        println!(
            "  {user:8} {invoice:6} -> {} confirmed (message {}, stripped {})",
            receipt.destination,
            receipt.message_id.as_deref().unwrap_or("-"),
            receipt.stripped.len()
        );
        expected_handled += usize::from(matches!(user, "alice" | "carol"));
    }
    // An unguarded publisher with a forged reference.
    let body = br#"{"invoice":"INV-X","user":"alice","amount":1}"#;
    let destination = elevate_amqp::destination(&exchange, ROUTING_KEY);
    let forged = wiring::forged_reference(PRODUCER, WORKER, ACTION, &destination, body)?;
    let table = elevate_amqp::headers::encode(&forged)?;
    admin
        .basic_publish(
            exchange.as_str().into(),
            ROUTING_KEY.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_headers(table)
                .with_message_id("forged-1".into()),
        )
        .await?;
    println!("  (attacker) forged reference for alice, sent with a plain lapin publisher");
    let published = args.jobs + 1;
    let expected_dead = published - expected_handled;

    println!(
        "\n== consume: verify -> Txn-Token for invoice-worker -> trust elevation -> handler + ack, or dead letter + ack"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    handled.wait_for(expected_handled, deadline).await;
    let mut letters = Vec::new();
    while letters.len() < expected_dead && tokio::time::Instant::now() < deadline {
        match admin
            .basic_get(
                queues.dead_letter.as_str().into(),
                BasicGetOptions::default(),
            )
            .await?
        {
            Some(m) => {
                letters.push((
                    elevate_amqp::headers::decode(m.delivery.properties.headers().as_ref()),
                    m.delivery.data.clone(),
                ));
                m.delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    worker.stop().await??;

    println!("\n== dead letters in {}", queues.dead_letter);
    for (headers, payload) in &letters {
        print_dead_letter(headers, payload);
    }
    if !args.keep {
        for q in [&queues.work, &queues.retry, &queues.dead_letter] {
            admin
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        admin
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "done".into()).await;
    report(published, handled.get(), letters.len(), expected_handled)
}
