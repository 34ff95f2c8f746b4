//! Where a repeated-context message's CPU goes: the guard's steps measured
//! one at a time on one thread, without a broker, per message and per
//! context binding. Each row runs its step over the same prepared messages
//! (100 per origin context, the bench's repeated scenario) after a warm-up
//! pass, and prints CPU µs per message (getrusage).
//!
//! Rows, each on its own: the credential scan; the reference verification
//! (per message: one ES256 signature; per context: the cached context, the
//! binding's MAC and the payload digest); the decision's `decide` with the
//! record kept in memory and written to the JSON Lines file (TTS in
//! process behind the token cache, Cedar behind the answer cache: what the
//! bench's repeated row runs); and the `FileSink` alone. What `decide`
//! costs beyond its parts is the record's construction, the token and
//! answer caches, and the action mapping.
//!
//! ```sh
//! cargo run --release -p elevate-bench --bin guard_path -- [--messages N]
//! ```

#[path = "../tally.rs"]
#[allow(dead_code)]
mod tally;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use elevate_core::ctxbind::{BindingMode, CTX_BIND_HEADER};
use elevate_core::decision::{DecisionSink, FileSink, MemorySink};
use elevate_core::pdp_cache::CachingPdp;
use elevate_core::token_cache::CachingTokenSource;
use elevate_core::{CTX_REF_HEADER, Coordinates, Headers, InboundMessage, OutboundMessage};
use elevate_testing::env::TestEnv;

/// Runs `$body` for each of `$msgs` once to warm up, then again measured,
/// and prints the row (a macro: the body may `.await`).
macro_rules! row {
    ($mode:expr, $what:expr, $msgs:expr, |$m:ident| $body:block) => {{
        for $m in $msgs.iter() {
            $body
        }
        let t0 = tally::cpu_time();
        for $m in $msgs.iter() {
            $body
        }
        let us = (tally::cpu_time() - t0).as_secs_f64() * 1e6 / $msgs.len() as f64;
        println!("| {} | {} | {us:.1} |", $mode, $what);
    }};
}

/// Messages per origin context (the bench's repeated scenario).
const PER_CONTEXT: usize = 100;

/// CPU per message of each step of the guard.
#[derive(Debug, Parser)]
#[command(name = "guard_path")]
struct Args {
    /// Messages per row.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let env = TestEnv::start().await;
    println!("| binding | step | CPU µs/msg |\n|---|---|---:|");
    for mode in [BindingMode::PerMessage, BindingMode::PerContext] {
        let msgs = prepare(&env, mode, args.messages).await?;
        let m = mode.as_str();
        let scan = env.credentials();
        row!(m, "credential scan", msgs, |msg| {
            std::hint::black_box(scan.scan(&msg.headers, &msg.payload));
        });
        let verifier = env.verifier();
        row!(m, "reference verification", msgs, |msg| {
            let r = msg.headers.get_str(CTX_REF_HEADER).unwrap_or_default();
            let b = msg.headers.get_str(CTX_BIND_HEADER);
            let v = verifier.verify_message_at(
                r,
                b,
                &msg.destination,
                &msg.payload,
                elevate_core::ctxref::unix_now(),
            );
            assert!(v.is_ok(), "{v:?}");
        });
        for (sink_name, sink) in sinks()? {
            let guard = cached_guard(&env, sink);
            let what = format!("decide, record {sink_name}");
            row!(m, what, msgs, |msg| {
                let d = guard.decide(msg, 1).await;
                assert!(matches!(d, elevate_core::GuardDecision::Permit(_)), "{d:?}");
            });
        }
    }
    // The same messages through the memory broker: raw (publish, receive,
    // ack) and through the processor (guard, handler, settlement).
    for mode in [BindingMode::PerMessage, BindingMode::PerContext] {
        let msgs = prepare(&env, mode, args.messages).await?;
        let broker = elevate_core::memory::MemoryBroker::new();
        row!(
            mode.as_str(),
            "memory broker: publish, receive, ack (raw)",
            msgs,
            |msg| {
                let d = deliver(&broker, msg).await?;
                elevate_core::Delivery::ack(d)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        );
        let guard = cached_guard(&env, Arc::new(file_sink()?));
        let processor = env.processor_on(
            guard,
            Arc::new(elevate_core::handler_fn(|_, _| async { Ok(()) })),
        );
        row!(
            mode.as_str(),
            "memory broker: the same through Processor::process (guarded)",
            msgs,
            |msg| {
                let d = deliver(&broker, msg).await?;
                let o = processor.process(d).await.map_err(|e| e.to_string())?;
                assert!(matches!(o, elevate_core::Outcome::Handled { .. }), "{o:?}");
            }
        );
    }
    let file = file_sink()?;
    let record = {
        let kept = MemorySink::new();
        let guard = env.guard_with(
            env.in_process_tokens(),
            env.pdp.clone(),
            Arc::new(kept.clone()),
        );
        let msgs = prepare(&env, BindingMode::PerMessage, 1).await?;
        let _ = guard.decide(&msgs[0], 1).await;
        kept.records().pop().ok_or("no record")?
    };
    let one = vec![(); args.messages];
    let t0 = tally::cpu_time();
    for _ in &one {
        file.commit(&record).await.map_err(|e| e.to_string())?;
    }
    let us = (tally::cpu_time() - t0).as_secs_f64() * 1e6 / one.len() as f64;
    println!("| either | FileSink::commit alone (write + flush) | {us:.1} |");
    Ok(())
}

/// The bench's repeated-row guard: the in-process TTS behind the token
/// cache, Cedar behind the answer cache, decisions to `sink`.
fn cached_guard(env: &TestEnv, sink: Arc<dyn DecisionSink>) -> elevate_core::Guard {
    env.guard_with(
        Arc::new(CachingTokenSource::new(
            env.in_process_tokens(),
            10_000,
            Duration::from_secs(30),
        )),
        Arc::new(CachingPdp::new(env.pdp.clone(), 10_000)),
        sink,
    )
}

/// Publishes `msg` to the memory broker and receives it back as a delivery.
async fn deliver(
    broker: &elevate_core::memory::MemoryBroker,
    msg: &InboundMessage,
) -> Result<elevate_core::memory::MemoryDelivery, String> {
    broker.publish("orders", msg.headers.clone(), msg.payload.clone());
    broker
        .receive("orders", Duration::from_secs(1))
        .await
        .ok_or_else(|| "no delivery".to_string())
}

/// A decision sink and how the table names it.
type NamedSink = (&'static str, Arc<dyn DecisionSink>);

/// The decision sinks `decide` is measured with.
fn sinks() -> Result<Vec<NamedSink>, String> {
    Ok(vec![
        ("in memory", Arc::new(MemorySink::new())),
        ("to the JSON Lines file", Arc::new(file_sink()?)),
    ])
}

fn file_sink() -> Result<FileSink, String> {
    let path = std::env::temp_dir().join(format!(
        "elevate-guard-path-{}-{}.jsonl",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    FileSink::open(&path).map_err(|e| e.to_string())
}

/// `n` guarded messages as the consumer reads them, `PER_CONTEXT` per origin context.
async fn prepare(
    env: &TestEnv,
    mode: BindingMode,
    n: usize,
) -> Result<Vec<InboundMessage>, String> {
    let audience = env.audience();
    let producer = env.producer_in(mode);
    let mut subject = env.subject("alice");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if i % PER_CONTEXT == 0 {
            subject = env.subject("alice");
        }
        let mut headers = Headers::new();
        headers.append("content-type", "application/json");
        let p = producer
            .prepare(
                &env.publish_request(&subject, &audience, "orders"),
                OutboundMessage {
                    headers,
                    payload: format!(r#"{{"order":{i},"amount":"9.99"}}"#).into_bytes(),
                },
            )
            .await
            .map_err(|e| format!("prepare: {e}"))?;
        out.push(InboundMessage::new(
            Coordinates::new("bench", format!("orders/{i}")),
            "orders",
            p.headers,
            p.payload,
        ));
    }
    Ok(out)
}
