//! The fault drills: on every broker (in parallel, one row at a time per
//! broker), each scenario produces N messages (80 % permitted, 20 % denied)
//! and applies one fault while a `drill-worker` process drains them, then
//! prints produced / handled (distinct) / duplicates / dead-lettered by
//! reason / lost / handled without a Permit. Exits non-zero if any row lost a
//! message or handled one without a Permit (or, in the outage scenario,
//! dead-lettered a permitted message).
//!
//! `--quick` (CI): 1,000 messages per row and shorter faults.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use elevate_drills::BrokerKind;
use elevate_drills::brokers::own::Tools;
use elevate_drills::drill::{Case, Env, Plan, Scenario, run_case};
use elevate_drills::procs::Registry;
use elevate_drills::report::{Row, duplicate_rates, table};

/// Which brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BrokerArg {
    Kafka,
    Amqp,
    Nats,
    All,
}

/// Which scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ScenarioArg {
    TtsKill,
    ConsumerKill,
    BrokerRestart,
    Bundle,
    TtsFreeze,
    Outage,
    All,
}

/// Fault drills against the real brokers.
#[derive(Parser, Debug)]
#[command(name = "drill")]
struct Args {
    /// CI size: 1,000 messages, shorter faults (the outage 15 s instead of 90 s).
    #[arg(long)]
    quick: bool,
    /// The broker(s).
    #[arg(long, value_enum, default_value = "all")]
    broker: BrokerArg,
    /// The scenario(s).
    #[arg(long, value_enum, default_value = "all")]
    scenario: ScenarioArg,
    /// Messages per row (default 10,000; 1,000 with --quick).
    #[arg(long)]
    messages: Option<u64>,
    /// Outage length of the `outage` scenario (default 90 s; 15 s with --quick).
    #[arg(long, value_parser = humantime::parse_duration)]
    outage: Option<Duration>,
    /// How `broker-restart` stops the broker: `kill` (SIGKILL) or `term`
    /// (SIGTERM, a clean shutdown). Default: term; kill with --quick.
    #[arg(long, value_parser = ["kill", "term"])]
    broker_signal: Option<String>,
    /// Kafka consumer kill: also run it without group.instance.id (a
    /// measurement: on tansu 0.6 the restarted member is left with no
    /// partitions, so that row fails; see drills/README.md).
    #[arg(long)]
    dynamic_membership: bool,
    /// Run the brokers one after the other instead of side by side.
    #[arg(long)]
    sequential: bool,
    /// Where rows keep their files (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep every row's files (failed rows always keep theirs).
    #[arg(long)]
    keep: bool,
    /// Also write the tables (Markdown) to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The machine's Kafka broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    kafka_bootstrap: String,
    /// The machine's RabbitMQ.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The machine's NATS server (with JetStream).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "error,lapin=off,librdkafka=off,rdkafka=off".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    // One thread: every child is spawned from it, and PR_SET_PDEATHSIG ties a
    // child's life to the thread that forked it.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drill: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = rt.block_on(async {
        tokio::select! {
            code = run(args) => code,
            sig = interrupted() => {
                // Dropping `run` drops every process guard: children are killed by pid.
                eprintln!("drill: {sig}: stopping every process it started");
                130
            }
        }
    });
    drop(rt);
    std::process::exit(code);
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = hup.recv() => "SIGHUP",
    }
}

fn binaries() -> Result<(PathBuf, PathBuf), String> {
    let exe = std::env::current_exe().map_err(|e| format!("where am I: {e}"))?;
    let dir = exe.parent().ok_or("the drill binary has no directory")?;
    let worker = dir.join("drill-worker");
    if !worker.is_file() {
        return Err(format!(
            "{} not found: build it with `cargo build -p elevate-drills --bins`",
            worker.display()
        ));
    }
    let tts = dir.join("txn-token-service");
    if !tts.is_file() {
        println!("txn-token-service not found next to the drill: building it");
        let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
        cmd.args(["build", "-p", "elevate-tts", "--bin", "txn-token-service"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run cargo to build txn-token-service: {e}"))?;
        if !status.success() || !tts.is_file() {
            return Err(format!(
                "building txn-token-service failed or did not produce {}",
                tts.display()
            ));
        }
    }
    Ok((worker, tts))
}

fn cases(args: &Args) -> Vec<Case> {
    let brokers: Vec<BrokerKind> = match args.broker {
        BrokerArg::Kafka => vec![BrokerKind::Kafka],
        BrokerArg::Amqp => vec![BrokerKind::Amqp],
        BrokerArg::Nats => vec![BrokerKind::Nats],
        BrokerArg::All => vec![BrokerKind::Kafka, BrokerKind::Amqp, BrokerKind::Nats],
    };
    let scenarios: Vec<Scenario> = match args.scenario {
        ScenarioArg::TtsKill => vec![Scenario::TtsKill],
        ScenarioArg::ConsumerKill => vec![Scenario::ConsumerKill],
        ScenarioArg::BrokerRestart => vec![Scenario::BrokerRestart],
        ScenarioArg::Bundle => vec![Scenario::Bundle],
        ScenarioArg::TtsFreeze => vec![Scenario::TtsFreeze],
        ScenarioArg::Outage => vec![Scenario::Outage],
        ScenarioArg::All => Scenario::ALL.to_vec(),
    };
    let dynamic = args.dynamic_membership;
    let mut out = Vec::new();
    for b in brokers {
        for s in &scenarios {
            out.push(Case {
                broker: b,
                scenario: *s,
                static_membership: b == BrokerKind::Kafka,
            });
            if b == BrokerKind::Kafka && *s == Scenario::ConsumerKill && dynamic {
                out.push(Case {
                    broker: b,
                    scenario: *s,
                    static_membership: false,
                });
            }
        }
    }
    out
}

async fn run(args: Args) -> i32 {
    let started = Instant::now();
    let mut plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(n) = args.messages {
        plan.messages = n.max(10);
    }
    if let Some(o) = args.outage {
        plan.outage = o;
    }
    if let Some(sig) = &args.broker_signal {
        plan.broker_kill = sig == "kill";
    }
    let (worker_bin, tts_bin) = match binaries() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("drill: {e}");
            return 2;
        }
    };
    let (work_dir, temp) = match &args.work_dir {
        Some(d) => (d.clone(), None),
        None => match tempfile::Builder::new().prefix("elevate-drills-").tempdir() {
            Ok(t) => (t.path().to_path_buf(), Some(t)),
            Err(e) => {
                eprintln!("drill: temporary directory: {e}");
                return 2;
            }
        },
    };
    if let Err(e) = std::fs::create_dir_all(&work_dir) {
        eprintln!("drill: {}: {e}", work_dir.display());
        return 2;
    }
    let env = Env {
        worker_bin,
        tts_bin,
        bundle: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policies")),
        registry: Registry::with_pidfile(work_dir.join("pids")),
        work_dir: work_dir.clone(),
        kafka: args.kafka_bootstrap.clone(),
        amqp: args.amqp_url.clone(),
        nats: args.nats_url.clone(),
        tools: Tools::from_env(),
    };
    let cases = cases(&args);
    println!(
        "drill: {} rows, {} messages each ({}), brokers {}; files in {}",
        cases.len(),
        plan.messages,
        if plan.quick { "quick" } else { "full" },
        if args.sequential {
            "one after the other"
        } else {
            "side by side"
        },
        work_dir.display()
    );

    let mut rows: Vec<Row> = Vec::new();
    if args.sequential {
        for c in &cases {
            rows.push(run_case(&env, &plan, *c).await);
        }
    } else {
        let mut per_broker: Vec<Vec<Case>> = Vec::new();
        for c in &cases {
            match per_broker.iter_mut().find(|v| v[0].broker == c.broker) {
                Some(v) => v.push(*c),
                None => per_broker.push(vec![*c]),
            }
        }
        let lanes = per_broker.into_iter().map(|lane| {
            let env = &env;
            let plan = &plan;
            async move {
                let mut out = Vec::new();
                for c in lane {
                    out.push(run_case(env, plan, c).await);
                }
                out
            }
        });
        for lane in futures::future::join_all(lanes).await {
            rows.extend(lane);
        }
    }

    let failed: Vec<&Row> = rows.iter().filter(|r| !r.failures().is_empty()).collect();
    let mut report = String::new();
    report.push_str(&format!(
        "## Fault drills ({} run, {} messages per row, {:.0} s)\n\n",
        if plan.quick { "quick" } else { "full" },
        plan.messages,
        started.elapsed().as_secs_f64()
    ));
    report.push_str(&table(&rows));
    report.push_str("\n### Duplicate rates\n\n");
    report.push_str(&duplicate_rates(&rows));
    report.push_str("\n### What happened\n\n");
    for r in &rows {
        report.push_str(&format!("- {} / {}:\n", r.broker, r.scenario));
        for n in &r.notes {
            report.push_str(&format!("  - {n}\n"));
        }
        if let Some(e) = &r.error {
            report.push_str(&format!("  - ERROR: {}\n", e.replace('\n', "\n    ")));
        }
    }
    println!("\n{report}");
    if let Some(path) = &args.report
        && let Err(e) = std::fs::write(path, &report)
    {
        eprintln!("drill: cannot write {}: {e}", path.display());
    }
    if failed.is_empty() {
        println!(
            "drill: every row passed in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        if !args.keep && args.work_dir.is_none() {
            drop(temp);
        } else if let Some(t) = temp {
            let _ = t.keep();
        }
        0
    } else {
        println!(
            "drill: {} of {} rows FAILED; their files are in {}",
            failed.len(),
            rows.len(),
            work_dir.display()
        );
        if let Some(t) = temp {
            let _ = t.keep();
        }
        1
    }
}
