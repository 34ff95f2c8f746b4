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

use elevate_core::deadletter::{H_REASON, H_VERDICT};
use elevate_core::decision::{FileSink, TeeSink, TracingSink};
use elevate_core::keys::SigningAlg;
use elevate_core::memory::MemoryBroker;
use elevate_core::producer::PublishRequest;
use elevate_core::settle::{Delivery, Outcome, Processor};
use elevate_core::{AuthContext, Headers, InboundMessage, OutboundMessage, handler_fn};
use elevate_examples::wiring::{self, ORDERS_API as PRODUCER, TrustDomain};

const WORKER: &str = "spiffe://elevate.example/invoice-worker";
const QUEUE: &str = "invoices";
const DLQ: &str = "invoices.dlq";
const ACTION: &str = "invoice.create";

type DemoResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> DemoResult<()> {
    wiring::init_tracing();

    // Policy (the example bundle, see examples/policies/*.cedar) and identities:
    // workload keys, the TTS, a user-token issuer.
    let mut domain = TrustDomain::new()?;
    println!(
        "policy bundle {} (version {})",
        wiring::policy_bundle().display(),
        domain.pdp.version()
    );
    let scopes = "invoice.create order.process";
    domain
        .register(PRODUCER, SigningAlg::ES256, scopes)?
        .register(WORKER, SigningAlg::EdDSA, scopes)?;
    let producer_tts = domain.tts_for(PRODUCER)?;

    // The producer service and the broker.
    let broker = MemoryBroker::new();
    let producer = domain.producer(PRODUCER)?;

    // The guarded worker, logging decisions to a JSON Lines file.
    let log_path = std::env::temp_dir().join("elevate-demo-decisions.jsonl");
    let _ = std::fs::remove_file(&log_path);
    let log = Arc::new(TeeSink::new(vec![
        Arc::new(FileSink::open(&log_path)?),
        Arc::new(TracingSink),
    ]));
    let guard = domain.guard(WORKER, &[PRODUCER], ACTION, log)?;
    let handler = handler_fn(|msg: InboundMessage, auth: AuthContext| async move {
        println!(
            "    handler: creating invoice {} for {} (txn {}, scope \"{}\", token sha256:{}…)",
            String::from_utf8_lossy(&msg.payload),
            auth.subject(),
            auth.txn(),
            auth.scope(),
            &auth.txn_token().token.sha256()[..12]
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
        let (user_token, subject) = domain
            .sign_in(&producer_tts, user, ACTION, "POST /invoices")
            .await?;
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
    let forged_body = b"{\"invoice\":\"INV-X\"}";
    let forged = wiring::forged_reference(PRODUCER, WORKER, ACTION, QUEUE, forged_body)?;
    broker.publish(QUEUE, forged, &forged_body[..]);
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
            other => println!("  {payload}: {other:?}"),
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
