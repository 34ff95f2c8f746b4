//! The end-to-end benchmark: what does the guard cost?
//!
//! For each broker (the in-memory transport, Kafka on librdkafka's mock
//! cluster and on the real broker, RabbitMQ, NATS JetStream) and each
//! scenario, it produces N messages once and consumes them twice in the same
//! run — with the plain client (raw) and through the broker crate's guarded
//! consumer and core's `Processor` (guarded) — then sends a paced trickle to
//! both consumers to measure latency from the publish timestamp (header
//! `x-bench-ts`) to the handler. It prints one table and, in full mode (all
//! rows) or with `--write`, regenerates `docs/BENCHMARKS.md`.
//!
//! It runs on the test kit (`elevate-testing`): its environment (keys, the
//! example bundle, the TTS on loopback, the producer guard, the consumer's
//! guard and processor) and its broker bindings (setup, publishing, the
//! guarded consumer and a plain one beside it). What is its own: the
//! scenarios ([`scenario`]), the counting ([`tally`]), a row's phases
//! ([`row`]), the remote-PDP baseline ([`remote_pdp`]) and the report
//! ([`report`]).
//!
//! Before the rows it measures the floor in process ([`floor`]: one
//! signature verification per algorithm, one MAC, one uncached trust
//! elevation, one answer-cache hit); every guarded row shows its added CPU
//! per message as µs and as a multiple of that floor. `--scaling` adds the
//! scaling table ([`scaling`]: concurrency and payload size on memory and
//! NATS JetStream, the replay seen-set's memory in process and in Redis);
//! `--quick` runs a minimal version of it on memory. `--json PATH` writes a
//! machine-readable summary ([`json`]).
//!
//! ```sh
//! cargo run --release -p elevate-bench --bin bench -- [--quick] [--messages N] \
//!     [--brokers memory,kafka-mock,kafka,amqp,nats] [--only TEXT] [--write] \
//!     [--scaling] [--json PATH]
//! ```
//!
//! The fleet rows run the `txn-token-service` binary as replicas on the
//! local PostgreSQL ([`fleet`]; `ELEVATE_TTS_BIN`, else built beside the
//! benchmark); without PostgreSQL they fail, saying how to start it.
//!
//! Exits non-zero when a guarded run loses a message or handles one twice
//! (handled + dead-lettered must equal produced), or a broker cannot be used.

mod brokers;
mod env;
mod fleet;
mod floor;
mod json;
mod remote_pdp;
mod report;
mod row;
mod scaling;
mod scenario;
mod tally;
mod targets;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use crate::env::BenchEnv;
use crate::report::{Extras, MANUAL_MARK, Progress, fmt_rate, render, sections, table, targets};
use crate::row::{Plan, Row};
use crate::scenario::{Scenario, TtsMode, scenarios};

/// A broker the benchmark can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    /// core's in-memory transport.
    Memory,
    /// Kafka on librdkafka's in-process mock cluster.
    KafkaMock,
    /// Kafka on the real broker at KAFKA_BOOTSTRAP.
    Kafka,
    /// RabbitMQ at AMQP_URL.
    Amqp,
    /// NATS JetStream at NATS_URL.
    Nats,
}

impl BrokerKind {
    /// The broker's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Memory => "memory",
            BrokerKind::KafkaMock => "kafka-mock",
            BrokerKind::Kafka => "kafka",
            BrokerKind::Amqp => "amqp",
            BrokerKind::Nats => "nats",
        }
    }
}

/// Raw vs guarded consumption on every broker, and the first performance targets.
#[derive(Debug, Parser)]
#[command(name = "bench")]
pub struct Args {
    /// CI smoke: few messages, fewer rows (does not write docs/BENCHMARKS.md unless --write).
    #[arg(long)]
    quick: bool,
    /// Messages per row (default 3000; 200 with --quick).
    #[arg(long)]
    messages: Option<usize>,
    /// Brokers to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "memory,kafka-mock,kafka,amqp,nats"
    )]
    brokers: Vec<BrokerKind>,
    /// Only the rows whose scenario label contains this text (e.g.
    /// `"distinct ctx"`, `replica`); the results file is then written only
    /// with --write.
    #[arg(long)]
    only: Option<String>,
    /// Write the results file even in --quick mode (or with --only).
    #[arg(long)]
    write: bool,
    /// Where the results go.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    output: PathBuf,
    /// Messages in flight per consumer (raw and guarded alike).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Also run the scaling table (concurrency 1/8/32/128, payload 100 B /
    /// 10 KiB / 512 KiB, on memory and nats when selected) and measure the
    /// replay seen-set's memory (in process and in Redis). --quick always
    /// runs a minimal version on memory.
    #[arg(long)]
    scaling: bool,
    /// Write a machine-readable summary (rows and floor) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Kafka bootstrap servers of the real broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka_bootstrap: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// NATS URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,elevate::decision=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    txn_token_client::install_crypto_provider();
    match run(args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    }
}

/// The rows of `broker` this run measures.
fn selected(args: &Args, broker: BrokerKind) -> Vec<Scenario> {
    scenarios(args.quick, broker)
        .into_iter()
        .filter(|sc| args.only.as_deref().is_none_or(|o| sc.label().contains(o)))
        .collect()
}

async fn run(args: Args) -> Result<bool, String> {
    let started = Instant::now();
    let messages = args
        .messages
        .unwrap_or(if args.quick { 200 } else { 3000 })
        .max(2);
    let plan = Plan {
        messages,
        latency_messages: if args.quick { 50 } else { 400 },
        latency_interval: Duration::from_millis(if args.quick { 4 } else { 5 }),
        concurrency: args.concurrency.max(1),
        payload_bytes: None,
    };
    let mut env = BenchEnv::start().await?;
    let floor = floor::measure(env.cedar(), args.quick).await?;
    println!(
        "floor (in process, median of 5 batches):\n{}",
        floor.table()
    );
    let total: usize = args.brokers.iter().map(|b| selected(&args, *b).len()).sum();
    let fleet_rows = args.brokers.iter().any(|b| {
        selected(&args, *b)
            .iter()
            .any(|sc| matches!(sc.tts, TtsMode::Fleet { .. }))
    });
    if fleet_rows {
        env.start_fleet().await;
    }
    let progress = Progress::new(std::io::stdout().is_terminal(), total);
    println!(
        "bench: {} messages per row, {} rows, brokers {}",
        plan.messages,
        total,
        args.brokers
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut rows = Vec::new();
    let mut row_id = 0;
    let mut warm_up = !args.quick;
    for kind in &args.brokers {
        let broker = brokers::connect(*kind, &args).await;
        // The first row of a process ran 10-15 % faster than the same row
        // later (fresh heap): drain the first row once untimed, and discard it.
        if let (true, Ok(b), Some(sc)) = (warm_up, &broker, selected(&args, *kind).first()) {
            warm_up = false;
            row_id += 1;
            let w = row::run(&env, b.as_ref(), kind.name(), row_id, *sc, &plan, &progress).await;
            progress.clear();
            println!(
                "{:10} {:52} (warm-up, discarded: guarded {} msgs/s)",
                w.broker,
                sc.label(),
                fmt_rate(w.guarded_rate)
            );
        }
        for sc in selected(&args, *kind) {
            row_id += 1;
            let row = match &broker {
                Ok(b) => {
                    row::run(&env, b.as_ref(), kind.name(), row_id, sc, &plan, &progress).await
                }
                Err(e) => Row {
                    problem: Some(e.clone()),
                    ..Row::new(kind.name(), sc)
                },
            };
            progress.row_done();
            progress.clear();
            match &row.problem {
                None => println!(
                    "{:10} {:52} raw {:>6} msgs/s  guarded {:>6} msgs/s  ({} handled, {} dead-lettered)  added CPU {} µs/msg = {:.1}× floor",
                    row.broker,
                    sc.label(),
                    fmt_rate(row.raw_rate),
                    fmt_rate(row.guarded_rate),
                    row.handled,
                    row.dead,
                    row.added_cpu_us()
                        .map(|x| format!("{x:.0}"))
                        .unwrap_or_else(|| "–".into()),
                    row.added_cpu_us().unwrap_or(f64::NAN) / floor.bound_us(sc.binding),
                ),
                Some(p) => println!("{:10} {:52} FAILED: {p}", row.broker, sc.label()),
            }
            if let (TtsMode::Fleet { .. }, Some(f)) = (sc.tts, env.fleet()) {
                println!(
                    "{:10} tokens issued so far: {}",
                    "",
                    f.issued_per_replica().await
                );
            }
            rows.push(row);
        }
    }
    let mut scaling_rows = Vec::new();
    let mut seen_set = Vec::new();
    if args.scaling || args.quick {
        for kind in args.brokers.iter().filter(|k| {
            matches!(k, BrokerKind::Memory) || (args.scaling && **k == BrokerKind::Nats)
        }) {
            match brokers::connect(*kind, &args).await {
                Ok(b) => {
                    let r = scaling::run(
                        &env,
                        b.as_ref(),
                        kind.name(),
                        row_id + 1,
                        &plan,
                        !args.scaling,
                        &progress,
                    )
                    .await;
                    row_id += r.len();
                    scaling_rows.extend(r);
                }
                Err(e) => println!("{:10} scaling: FAILED: {e}", kind.name()),
            }
        }
        seen_set.push(scaling::in_memory(if args.scaling { 200_000 } else { 10_000 }).await);
        if args.scaling {
            seen_set.push(scaling::redis(if args.quick { 5_000 } else { 50_000 }).await);
        }
    }
    progress.clear();
    env.remove_log();
    let elapsed = started.elapsed();
    let extras = Extras {
        floor: Some(&floor),
        scaling: &scaling_rows,
        seen_set: &seen_set,
    };
    println!("\n{}", table(&rows, Some(&floor)));
    println!(
        "Targets (issue 16)\n{}",
        targets::targets(&rows, Some(&floor))
    );
    println!("Targets (issue 8, earlier)\n{}", targets(&rows));
    println!("{}", sections(&extras));
    if let Some(path) = &args.json {
        let doc = json::summary(&rows, Some(&floor));
        json::check_schema(&doc).map_err(|e| format!("JSON summary: {e}"))?;
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if (!args.quick && args.only.is_none()) || args.write {
        let extra = std::fs::read_to_string(&args.output)
            .ok()
            .and_then(|old| old.find(MANUAL_MARK).map(|i| old[i..].to_string()))
            .unwrap_or_default();
        let doc = render(args.quick, &plan, &rows, &extras, elapsed, &extra);
        std::fs::write(&args.output, doc)
            .map_err(|e| format!("write {}: {e}", args.output.display()))?;
        println!("wrote {}", args.output.display());
    }
    Ok(rows
        .iter()
        .chain(&scaling_rows)
        .all(|r| r.problem.is_none())
        && seen_set.iter().all(|m| m.bytes_per_entry.is_ok()))
}
