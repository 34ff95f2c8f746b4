//! The embedded Elevate demo: no server at all. An in-process Transaction
//! Token Service, the example Cedar bundle, a small in-process user-token
//! issuer and the in-memory transport carry a handful of "invoice" jobs for
//! three users from a producer service to a guarded worker, and the program
//! prints what happened to each message and where the decision log went.
//!
//! It exits non-zero if any message ends differently than the policy says it
//! must, so running it is also a check.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::cedar::CedarPdp;
use elevate_core::ctxref::{ContextRefMinter, ContextRefVerifier, VerifyPolicy};
use elevate_core::deadletter::{H_REASON, H_VERDICT};
use elevate_core::decision::{FileSink, TeeSink, TracingSink};
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::memory::MemoryBroker;
use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_core::scope::Scope;
use elevate_core::settle::{Delivery, Outcome, Processor};
use elevate_core::{
    AuthContext, CTX_REF_HEADER, FixedAction, Guard, Headers, InboundMessage, OutboundMessage,
    handler_fn,
};
use txn_token_client::{InProcessTts, Issuer, IssuerSettings, TestIssuer, subject_context};

const TRUST_DOMAIN: &str = "elevate.example";
const PRODUCER: &str = "spiffe://elevate.example/orders-api";
const WORKER: &str = "spiffe://elevate.example/invoice-worker";
const QUEUE: &str = "invoices";
const DLQ: &str = "invoices.dlq";
const ACTION: &str = "invoice.create";

type DemoResult<T> = Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> DemoResult<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,elevate::decision=off".into()),
        )
        .init();

    // Policy: the example bundle (see examples/policies/*.cedar).
    let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let pdp = Arc::new(CedarPdp::load_dir(&bundle)?);
    println!(
        "policy bundle {} (version {})",
        bundle.display(),
        pdp.version()
    );

    // Identities: workload keys, the TTS, a user-token issuer.
    let producer_key = SigningKey::generate(SigningAlg::ES256, "orders-api-1")?;
    let worker_key = SigningKey::generate(SigningAlg::EdDSA, "invoice-worker-1")?;
    let tts = Issuer::generate(IssuerSettings::new(TRUST_DOMAIN))?;
    let scopes = Scope::parse("invoice.create order.process");
    tts.register_workload(PRODUCER, producer_key.public_jwk(), &scopes)?;
    tts.register_workload(WORKER, worker_key.public_jwk(), &scopes)?;
    let idp = TestIssuer::new("https://idp.elevate.example", TRUST_DOMAIN)?;
    tts.set_user_issuer(idp.verifier());
    let producer_tts = InProcessTts::new(tts.clone(), PRODUCER, producer_key.clone());
    let worker_tts = Arc::new(InProcessTts::new(tts.clone(), WORKER, worker_key.clone()));

    // The producer service and the broker.
    let broker = MemoryBroker::new();
    let producer = ProducerGuard::new(
        ContextRefMinter::new(PRODUCER, producer_key.clone(), Duration::from_secs(3600)),
        pdp.clone(),
    );

    // The guarded worker, logging decisions to a JSON Lines file.
    let log_path = std::env::temp_dir().join("elevate-demo-decisions.jsonl");
    let _ = std::fs::remove_file(&log_path);
    let log = Arc::new(TeeSink::new(vec![
        Arc::new(FileSink::open(&log_path)?),
        Arc::new(TracingSink),
    ]));
    let mut producer_keys = KeySet::new();
    producer_keys.insert_workload_key(PRODUCER, &producer_key)?;
    let guard = Guard::new(
        WORKER,
        ContextRefVerifier::new(producer_keys, VerifyPolicy::new(WORKER)),
        worker_tts,
        pdp.clone(),
        log,
        Arc::new(FixedAction::new(ACTION, "Destination")),
    );
    let handler = handler_fn(|msg: InboundMessage, auth: AuthContext| async move {
        println!(
            "    handler: creating invoice {} for {} (txn {}, scope \"{}\", token sha256:{}…)",
            String::from_utf8_lossy(&msg.payload),
            auth.subject,
            auth.txn,
            auth.scope,
            &auth.txn_token.token.sha256()[..12]
        );
        Ok(())
    });
    let processor = Processor::new(
        Arc::new(guard),
        Arc::new(handler),
        Arc::new(broker.dead_letter_queue(DLQ)),
    );

    // Entry flow: each user's request reaches the producer with a bearer token.
    println!(
        "\n== produce: user token in -> Txn-Token for orders-api -> message out with no token"
    );
    let jobs = [
        ("alice", r#"{"invoice":"INV-1","amount":120}"#, true),
        (
            "alice",
            r#"{"invoice":"INV-2","amount":75,"access_token":"LEAKED"}"#,
            true,
        ),
        ("carol", r#"{"invoice":"INV-3","amount":9}"#, true),
        ("bob", r#"{"invoice":"INV-4","amount":300}"#, false),
        ("mallory", r#"{"invoice":"INV-5","amount":999}"#, false),
    ];
    let mut expected_handled = 0;
    for (i, (user, body, permitted)) in jobs.iter().enumerate() {
        let user_token =
            idp.issue_access_token(user, "invoice.create", Duration::from_secs(300))?;
        let txn_token = producer_tts
            .exchange_access_token(
                &user_token,
                &Scope::parse("invoice.create"),
                &serde_json::json!({"http": "POST /invoices"}),
            )
            .await?;
        let subject = subject_context(&txn_token.claims);
        let mut headers = Headers::new();
        if i == 1 {
            // a careless service forwards the user's token: it is stripped
            headers.append("Authorization", format!("Bearer {user_token}"));
        }
        let prepared = producer
            .prepare(
                &PublishRequest {
                    subject: &subject,
                    action: ACTION,
                    audience: &[WORKER.to_string()],
                    destination: QUEUE,
                    scope: None,
                },
                OutboundMessage {
                    headers,
                    payload: body.as_bytes().to_vec(),
                },
            )
            .await?;
        let stripped: Vec<String> = prepared
            .stripped
            .iter()
            .map(|f| serde_json::to_string(&f.location).unwrap_or_default())
            .collect();
        println!(
            "  {user:8} {body:45} txn {} {}",
            subject.txn,
            if stripped.is_empty() {
                String::new()
            } else {
                format!("stripped {}", stripped.join(" "))
            }
        );
        let wire = String::from_utf8_lossy(&prepared.payload).into_owned();
        if wire.contains("LEAKED")
            || prepared
                .headers
                .iter()
                .any(|(_, v)| v == user_token.as_bytes())
        {
            return Err("a credential reached the wire".into());
        }
        broker.publish(QUEUE, prepared.headers, prepared.payload);
        expected_handled += usize::from(*permitted);
    }
    // A message from an unguarded producer with a forged reference.
    let forger = SigningKey::generate(SigningAlg::ES256, "orders-api-1")?;
    let forged = ContextRefMinter::new(PRODUCER, forger, Duration::from_secs(60)).mint(
        &elevate_core::ctxref::MintRequest {
            subject: "alice",
            sub_kind: elevate_core::SubjectKind::Human,
            audience: &[WORKER.to_string()],
            scope: &Scope::parse("invoice.create"),
            txn: "forged",
            destination: QUEUE,
            payload: b"{\"invoice\":\"INV-X\"}",
        },
    )?;
    broker.publish(
        QUEUE,
        [(CTX_REF_HEADER, forged.token)]
            .into_iter()
            .collect::<Headers>(),
        &b"{\"invoice\":\"INV-X\"}"[..],
    );
    println!("  (attacker) forged reference for alice");

    println!(
        "\n== consume: verify -> Txn-Token for invoice-worker -> trust elevation -> record -> dispatch"
    );
    let (mut handled, mut dead) = (0, 0);
    while let Some(d) = broker.receive(QUEUE, Duration::from_millis(200)).await {
        let payload = String::from_utf8_lossy(&d.message().payload).into_owned();
        match processor.process(d).await? {
            Outcome::Handled { decision_id } => {
                handled += 1;
                println!("  PERMIT  {payload} (decision {decision_id})");
            }
            Outcome::DeadLettered {
                decision_id,
                reason,
            } => {
                dead += 1;
                println!(
                    "  {:7} {payload} -> {DLQ}: {reason} (decision {decision_id})",
                    reason.verdict().as_str().to_uppercase()
                );
            }
            Outcome::Redelivering { reason, .. } => println!("  RETRY   {payload}: {reason}"),
        }
    }

    println!("\n== dead letters in {DLQ}");
    let letters = broker.drain(DLQ);
    for l in &letters {
        println!(
            "  {} / {}: {}",
            l.headers.get_str(H_VERDICT).unwrap_or("?"),
            l.headers.get_str(H_REASON).unwrap_or("?"),
            String::from_utf8_lossy(&l.payload)
        );
    }
    let records = std::fs::read_to_string(&log_path)?.lines().count();
    println!(
        "\ndecision log: {} ({records} records, JSON Lines, token hashes only)",
        log_path.display()
    );
    println!(
        "published {}, handled {handled}, dead-lettered {dead}",
        jobs.len() + 1
    );

    let published = jobs.len() + 1;
    if handled != expected_handled
        || handled + dead != published
        || letters.len() != dead
        || records != published
    {
        return Err(format!(
            "unexpected outcome: expected {expected_handled} handled of {published}"
        )
        .into());
    }
    Ok(())
}
