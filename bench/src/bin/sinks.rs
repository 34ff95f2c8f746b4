//! The decision log alone: what one record costs in each sink, with the
//! guard's concurrency and nothing else in the process (no broker, no
//! signatures, no PDP), so that the spool's own cost is not lost in the
//! noise of a whole pipeline.
//!
//! Rows: the JSON Lines `FileSink` (write + flush per record, the spool's
//! predecessor), the spool without and with `fsync`, each also with a
//! shipper that gzips every batch (what the HTTP shipper does before the
//! network). Columns: records/s, CPU µs per record (getrusage), group
//! commits (`fdatasync`s) and records per commit.
//!
//! ```sh
//! cargo run --release -p elevate-bench --bin sinks -- [--records N] [--concurrency C]
//! ```

#[path = "../tally.rs"]
#[allow(dead_code)]
mod tally;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use elevate_core::decision::{
    Batch, DecisionRecord, DecisionSink, FileSink, ShipError, Shipper, Spool, SpoolConfig,
};
use elevate_core::verdict::{Reason, Verdict};

/// Records per second and CPU per record of each decision sink.
#[derive(Debug, Parser)]
#[command(name = "sinks")]
struct Args {
    /// Records per row.
    #[arg(long, default_value_t = 50_000)]
    records: usize,
    /// Tasks committing at once (the guard's default concurrency is 32).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Rounds of every row (the table shows each).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

/// A decision record of the size the guard writes (≈ 840 bytes of JSON).
fn record(i: usize) -> DecisionRecord {
    DecisionRecord {
        decision_id: uuid::Uuid::now_v7().to_string(),
        time: "2026-12-03T10:00:00.123456Z".into(),
        verdict: Verdict::Permit,
        reason: Reason::Permitted,
        detail: None,
        subject: Some("user:alice@example.com".into()),
        workload: "spiffe://elevate.example/orders-worker".into(),
        producer: Some("spiffe://elevate.example/orders-api".into()),
        action: Some("orders:process".into()),
        resource: Some(format!("orders/{i}")),
        txn: Some(uuid::Uuid::now_v7().to_string()),
        chain: vec!["spiffe://elevate.example/orders-api".into()],
        source: elevate_core::memory::coordinates("orders", i as u64),
        attempt: 1,
        policy_version: format!("sha256:{}", "0".repeat(64)),
        bundle_revision: Some(3),
        latency_us: 123,
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        ctx_ref_sha256: Some("a".repeat(64)),
        txn_token_sha256: Some("b".repeat(64)),
    }
}

/// Gzips each batch and acknowledges it: the HTTP shipper's CPU without the network.
struct Gzip;

#[async_trait::async_trait]
impl Shipper for Gzip {
    fn target(&self) -> String {
        "gzip (no network)".into()
    }
    async fn ship(&self, batch: &Batch) -> Result<(), ShipError> {
        std::hint::black_box(batch.to_gzip_json()).map_err(|e| ShipError {
            target: self.target(),
            reason: e.to_string(),
        })?;
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Sink {
    File,
    Spool { fsync: bool, ship: bool },
}

impl Sink {
    fn label(self) -> &'static str {
        match self {
            Sink::File => "file (write + flush per record)",
            Sink::Spool {
                fsync: false,
                ship: false,
            } => "spool, no fsync",
            Sink::Spool {
                fsync: false,
                ship: true,
            } => "spool, no fsync, shipping (gzip)",
            Sink::Spool {
                fsync: true,
                ship: false,
            } => "spool, fsync",
            Sink::Spool {
                fsync: true,
                ship: true,
            } => "spool, fsync, shipping (gzip)",
        }
    }

    fn open(self, dir: &std::path::Path) -> Result<Arc<dyn DecisionSink>, String> {
        match self {
            Sink::File => Ok(Arc::new(
                FileSink::open(dir.join("decisions.jsonl")).map_err(|e| e.to_string())?,
            )),
            Sink::Spool { fsync, ship } => {
                let mut cfg = SpoolConfig::new(dir);
                cfg.fsync = fsync;
                let spool = Spool::open(cfg).map_err(|e| e.to_string())?;
                if ship {
                    spool
                        .start_shipping(Arc::new(Gzip), Default::default())
                        .map_err(|e| e.to_string())?;
                }
                Ok(Arc::new(spool))
            }
        }
    }
}

struct Measured {
    rate: f64,
    cpu_us: f64,
    commits: Option<u64>,
}

async fn run(
    sink: Sink,
    args: &Args,
    records: &Arc<Vec<DecisionRecord>>,
) -> Result<Measured, String> {
    let dir = std::env::temp_dir().join(format!("elevate-sinks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log = sink.open(&dir)?;
    // let the spool's spare segment be made before the clock starts
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t0, c0) = (Instant::now(), tally::cpu_time());
    let n = records.len();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let (log, records, step) = (log.clone(), records.clone(), args.concurrency);
            tokio::spawn(async move {
                let mut i = w;
                while i < n {
                    log.commit(&records[i]).await.map_err(|e| e.to_string())?;
                    i += step;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let (wall, cpu) = (t0.elapsed(), tally::cpu_time().saturating_sub(c0));
    let commits = log.spool().map(|s| s.stats().commits);
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        rate: n as f64 / wall.as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
        commits,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let records = Arc::new((0..args.records).map(record).collect::<Vec<_>>());
    let rows = [
        Sink::File,
        Sink::Spool {
            fsync: false,
            ship: false,
        },
        Sink::Spool {
            fsync: false,
            ship: true,
        },
        Sink::Spool {
            fsync: true,
            ship: false,
        },
        Sink::Spool {
            fsync: true,
            ship: true,
        },
    ];
    println!(
        "{} records per row, {} tasks committing at once, 2 runtime workers\n",
        args.records, args.concurrency
    );
    println!("| sink | round | records/s | CPU µs/record | group commits | records per commit |");
    println!("|---|---:|---:|---:|---:|---:|");
    for round in 1..=args.rounds {
        for sink in rows {
            match run(sink, &args, &records).await {
                Ok(m) => {
                    let (commits, per) = m.commits.map_or(("—".into(), "—".into()), |c| {
                        (
                            c.to_string(),
                            format!("{:.1}", args.records as f64 / c.max(1) as f64),
                        )
                    });
                    println!(
                        "| {} | {round} | {:.0} | {:.1} | {commits} | {per} |",
                        sink.label(),
                        m.rate,
                        m.cpu_us
                    );
                }
                Err(e) => {
                    eprintln!("{}: {e}", sink.label());
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
