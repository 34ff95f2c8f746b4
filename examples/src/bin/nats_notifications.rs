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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
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
use elevate_nats::{
    GuardedConsumer, NatsDeadLetters, NatsPublisher, from_nats_headers, to_nats_headers,
};
use txn_token_client::{InProcessTts, Issuer, IssuerSettings, TestIssuer, subject_context};

const TRUST_DOMAIN: &str = "elevate.example";
const PRODUCER: &str = "spiffe://elevate.example/orders-api";
const WORKER: &str = "spiffe://elevate.example/notify-worker";
const ACTION: &str = "notification.send";

type AppResult<T> = Result<T, Box<dyn std::error::Error>>;

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,elevate::decision=off".into()),
        )
        .init();

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
    let pdp = Arc::new(CedarPdp::load_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
    )?);
    let producer_key = SigningKey::generate(SigningAlg::ES256, "orders-api-1")?;
    let worker_key = SigningKey::generate(SigningAlg::EdDSA, "notify-worker-1")?;
    let tts = Issuer::generate(IssuerSettings::new(TRUST_DOMAIN))?;
    let scopes = Scope::parse(ACTION);
    tts.register_workload(PRODUCER, producer_key.public_jwk(), &scopes)?;
    tts.register_workload(WORKER, worker_key.public_jwk(), &scopes)?;
    let idp = TestIssuer::new("https://idp.elevate.example", TRUST_DOMAIN)?;
    tts.set_user_issuer(idp.verifier());
    let producer_tts = InProcessTts::new(tts.clone(), PRODUCER, producer_key.clone());
    let worker_tts = Arc::new(InProcessTts::new(tts.clone(), WORKER, worker_key.clone()));

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
    let dead_letters = NatsDeadLetters::jetstream(js.clone(), dlq_subject);
    let processor = Arc::new(Processor::new(
        Arc::new(guard),
        Arc::new(handler),
        Arc::new(dead_letters),
    ));
    let worker = GuardedConsumer::new(pull, processor).concurrency(4);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    // The producer service: each user's request arrives with a bearer token.
    println!("\n== produce: user token -> Txn-Token for orders-api -> notification with no token");
    let publisher = NatsPublisher::new(
        client.clone(),
        ProducerGuard::new(
            ContextRefMinter::new(PRODUCER, producer_key.clone(), Duration::from_secs(3600)),
            pdp.clone(),
        ),
    );
    let users = ["alice", "bob", "carol", "mallory"];
    let channels = ["email", "sms", "push"];
    let mut expected_handled = 0;
    for i in 0..args.notifications {
        let user = users[i % users.len()];
        let channel = channels[i % channels.len()];
        let user_token = idp.issue_access_token(user, ACTION, Duration::from_secs(300))?;
        let txn_token = producer_tts
            .exchange_access_token(
                &user_token,
                &Scope::parse(ACTION),
                &serde_json::json!({"http": "POST /orders"}),
            )
            .await?;
        let subject_ctx = subject_context(&txn_token.claims);
        let mut headers = Headers::new();
        // a careless service forwards the user's token: the publisher strips it
        headers.append("Authorization", format!("Bearer {user_token}"));
        let subject = format!("{prefix}.send.{channel}");
        let body = format!(
            r#"{{"notification":"N-{}","user":"{user}","channel":"{channel}","text":"your order shipped"}}"#,
            i + 1
        );
        let receipt = publisher
            .publish_jetstream(
                &subject,
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
        let (stream, seq) = receipt
            .ack
            .as_ref()
            .map(|a| (a.stream.as_str(), a.sequence))
            .unwrap_or(("?", 0));
        println!(
            "  {user:8} {channel:5} -> {stream}/{seq} on {subject} (stripped {})",
            receipt.stripped.len()
        );
        expected_handled += usize::from(user == "alice");
    }
    // An unguarded publisher with a forged reference.
    let forger = SigningKey::generate(SigningAlg::ES256, "orders-api-1")?;
    let subject = format!("{prefix}.send.email");
    let body = br#"{"notification":"N-X","user":"alice","channel":"email","text":"click here"}"#;
    let forged =
        ContextRefMinter::new(PRODUCER, forger, Duration::from_secs(60)).mint(&MintRequest {
            subject: "alice",
            sub_kind: elevate_core::SubjectKind::Human,
            audience: &[WORKER.to_string()],
            scope: &Scope::parse(ACTION),
            txn: "forged",
            destination: &subject,
            payload: body,
        })?;
    let forged_headers: Headers = [(CTX_REF_HEADER, forged.token)].into_iter().collect();
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
        if (handled.load(Ordering::SeqCst) >= expected_handled && dead >= expected_dead)
            || tokio::time::Instant::now() >= deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    worker.await??;

    println!("\n== dead letters in {dlq_stream}");
    let state = dlq.get_info().await?.state;
    let mut letters = 0;
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = dlq.get_raw_message(seq).await else {
            continue;
        };
        let headers = from_nats_headers(Some(&m.headers));
        letters += 1;
        println!(
            "  {} / {}: {} (from {})",
            headers.get_str(H_VERDICT).unwrap_or("?"),
            headers.get_str(H_REASON).unwrap_or("?"),
            String::from_utf8_lossy(&m.payload),
            headers.get_str(H_SOURCE).unwrap_or("?")
        );
    }
    let handled = handled.load(Ordering::SeqCst);
    println!("\npublished {published}, handled {handled}, dead-lettered {letters}");
    if handled != expected_handled || letters != expected_dead {
        return Err(format!("unexpected outcome: expected {expected_handled} handled and {expected_dead} dead-lettered").into());
    }
    Ok(())
}
