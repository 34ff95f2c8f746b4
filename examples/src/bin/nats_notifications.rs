//! Notifications over NATS JetStream through Elevate: the `orders-api`
//! service publishes notification requests (email, sms, push subjects)
//! through the credential-stripping [`NatsPublisher`], and a guarded
//! `notify-worker` consumes them from a durable pull consumer with
//! [`GuardedConsumer`]; denied and forged messages go to a dead-letter stream.
//!
//! Needs a NATS server with JetStream (`--url`, default `NATS_URL` or
//! `nats://127.0.0.1:4222`). Creates its own streams and deletes them at the end.
//! Exits non-zero if any notification ends differently than the policy says.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use clap::Parser;
use elevate_core::OutboundMessage;
use elevate_core::decision::TracingSink;
use elevate_core::keys::SigningAlg;
use elevate_core::producer::PublishRequest;
use elevate_core::settle::Processor;
use elevate_examples::wiring::{self, ORDERS_API as PRODUCER, TrustDomain, USERS};
use elevate_examples::worker::{Running, permit_printer, print_dead_letter, report};
use elevate_nats::{
    GuardedConsumer, NatsDeadLetters, NatsPublisher, from_nats_headers, to_nats_headers,
};

const WORKER: &str = "spiffe://elevate.example/notify-worker";
const ACTION: &str = "notification.send";

type AppResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Notifications over NATS JetStream with a guarded worker.
#[derive(Parser, Debug)]
struct Args {
    /// NATS server URL (JetStream enabled).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// How many notifications to publish (users take turns: alice, bob, carol, mallory).
    #[arg(long, default_value_t = 8)]
    notifications: usize,
    /// Keep the streams after the run (to inspect them with the `nats` CLI).
    #[arg(long)]
    keep: bool,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("nats_notifications failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> AppResult<()> {
    wiring::init_tracing();

    // NATS: the server given, one stream for notifications, one for dead letters.
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(3))
            .connect(&args.url),
    )
    .await
    .map_err(|_| {
        format!(
            "no NATS server at {} (start nats-server with -js, or set --url)",
            args.url
        )
    })??;
    let js = jetstream::new(client.clone());
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let stream_name = format!("NOTIFICATIONS_{run_id}");
    let dlq_stream = format!("{stream_name}_DLQ");
    let prefix = format!("notify.{run_id}");
    let dlq_subject = format!("{prefix}.dead");
    js.create_stream(stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{prefix}.send.*")],
        ..Default::default()
    })
    .await?;
    js.create_stream(stream::Config {
        name: dlq_stream.clone(),
        subjects: vec![dlq_subject.clone()],
        ..Default::default()
    })
    .await?;
    println!(
        "nats: {}; stream {stream_name} ({prefix}.send.*), dead letters {dlq_stream} ({dlq_subject})",
        args.url
    );
    let outcome = demo(
        &args,
        &client,
        &js,
        &stream_name,
        &dlq_stream,
        &prefix,
        &dlq_subject,
    )
    .await;
    if !args.keep {
        let _ = js.delete_stream(&stream_name).await;
        let _ = js.delete_stream(&dlq_stream).await;
    }
    outcome
}

async fn demo(
    args: &Args,
    client: &async_nats::Client,
    js: &jetstream::Context,
    stream_name: &str,
    dlq_stream: &str,
    prefix: &str,
    dlq_subject: &str,
) -> AppResult<()> {
    // Policy and identities.
    let mut domain = TrustDomain::new()?;
    domain
        .register(PRODUCER, SigningAlg::ES256, ACTION)?
        .register(WORKER, SigningAlg::EdDSA, ACTION)?;
    let producer_tts = domain.tts_for(PRODUCER)?;

    // The guarded worker wraps a durable, explicit-ack pull consumer created as usual.
    // max_deliver stays unlimited (-1): Elevate's retry policy bounds redeliveries.
    let pull: consumer::PullConsumer = js
        .get_stream(stream_name)
        .await?
        .get_or_create_consumer(
            "notify-worker",
            consumer::pull::Config {
                durable_name: Some("notify-worker".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await?;
    let guard = domain.guard(WORKER, &[PRODUCER], ACTION, Arc::new(TracingSink))?;
    let (handled, handler) = permit_printer(|msg| format!("at {}", msg.coordinates));
    let dead_letters = NatsDeadLetters::jetstream(js.clone(), dlq_subject);
    let processor = Arc::new(Processor::new(
        Arc::new(guard),
        Arc::new(handler),
        Arc::new(dead_letters),
    ));
    let worker = GuardedConsumer::new(pull, processor)
        .concurrency(4)
        .unreadable(elevate_nats::unreadable::UnreadableMessages::new(
            js.clone(),
        ));
    let worker = Running::spawn(|stopped| worker.run(stopped));

    // The producer service: each user's request arrives with a bearer token.
    println!("\n== produce: user token -> Txn-Token for orders-api -> notification with no token");
    let publisher = NatsPublisher::new(client.clone(), domain.producer(PRODUCER)?);
    let channels = ["email", "sms", "push"];
    let mut expected_handled = 0;
    for i in 0..args.notifications {
        let user = USERS[i % USERS.len()];
        let channel = channels[i % channels.len()];
        let (user_token, subject_ctx) = domain
            .sign_in(&producer_tts, user, ACTION, "POST /orders")
            .await?;
        // a careless service forwards the user's token: the publisher strips it
        let headers = wiring::forwarded_token(&user_token);
        let subject = format!("{prefix}.send.{channel}");
        let body = format!(
            r#"{{"notification":"N-{}","user":"{user}","channel":"{channel}","text":"your order shipped"}}"#,
            i + 1
        );
        let receipt = publisher
            .publish_jetstream(
                &PublishRequest {
                    subject: &subject_ctx,
                    action: ACTION,
                    audience: &[WORKER.to_string()],
                    destination: &subject,
                    scope: None,
                },
                OutboundMessage {
                    headers,
                    payload: body.into_bytes(),
                },
            )
            .await?;
        let at = receipt.at.as_ref();
        let stream = at.and_then(|a| a.field_str("stream")).unwrap_or("?");
        let seq = at.and_then(|a| a.field_i64("stream_seq")).unwrap_or(0);
        println!(
            "  {user:8} {channel:5} -> {stream}/{seq} on {subject} (stripped {})",
            receipt.stripped.len()
        );
        expected_handled += usize::from(user == "alice");
    }
    // An unguarded publisher with a forged reference.
    let subject = format!("{prefix}.send.email");
    let body = br#"{"notification":"N-X","user":"alice","channel":"email","text":"click here"}"#;
    let forged_headers = wiring::forged_reference(PRODUCER, WORKER, ACTION, &subject, body)?;
    js.publish_with_headers(
        subject,
        to_nats_headers(&forged_headers)?,
        body.as_slice().into(),
    )
    .await?
    .await?;
    println!("  (attacker) forged reference for alice, sent with a plain client");
    let published = args.notifications + 1;
    let expected_dead = published - expected_handled;

    println!(
        "\n== consume: verify -> Txn-Token for notify-worker -> trust elevation -> dispatch or dead-letter"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let dlq = js.get_stream(dlq_stream).await?;
    loop {
        let dead = dlq.get_info().await?.state.messages as usize;
        if (handled.get() >= expected_handled && dead >= expected_dead)
            || tokio::time::Instant::now() >= deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await??;

    println!("\n== dead letters in {dlq_stream}");
    let state = dlq.get_info().await?.state;
    let mut letters = 0;
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = dlq.get_raw_message(seq).await else {
            continue;
        };
        let headers = from_nats_headers(Some(&m.headers));
        letters += 1;
        print_dead_letter(&headers, &m.payload);
    }
    report(published, handled.get(), letters, expected_handled)
}
