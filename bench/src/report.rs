//! The output: the progress line, the Markdown table, the targets checked
//! against it, and the results file (docs/BENCHMARKS.md).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::floor::Floor;
use crate::row::{Plan, Row};
use crate::scaling::{SeenSetMemory, live_entries};
use crate::scenario::{Contexts, LogMode, PdpMode, Scenario, TtsMode};

/// Everything from this line on in the results file is kept when the harness regenerates it
/// (the profile and optimisation notes written by hand).
pub const MANUAL_MARK: &str = "<!-- notes kept across regenerations -->";

/// The progress line on a terminal.
pub struct Progress {
    on: bool,
    total: usize,
    done: AtomicUsize,
    dirty: AtomicBool,
}

impl Progress {
    /// A progress bar over `total` rows, drawn only when `on` (stdout is a terminal).
    pub fn new(on: bool, total: usize) -> Progress {
        Progress {
            on,
            total,
            done: AtomicUsize::new(0),
            dirty: AtomicBool::new(false),
        }
    }

    /// Shows the phase of the row in progress.
    pub fn step(&self, broker: &str, sc: &Scenario, phase: &str) {
        if !self.on {
            return;
        }
        let done = self.done.load(Ordering::Relaxed);
        let width = 24;
        let filled = (done * width).checked_div(self.total).unwrap_or(0);
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        let mut out = std::io::stdout();
        let _ = write!(
            out,
            "\r\x1b[2K[{bar}] {done}/{} {broker}: {} ({phase})",
            self.total,
            sc.label()
        );
        let _ = out.flush();
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Counts a finished row.
    pub fn row_done(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Erases the progress line.
    pub fn clear(&self) {
        if self.on && self.dirty.swap(false, Ordering::Relaxed) {
            print!("\r\x1b[2K");
            let _ = std::io::stdout().flush();
        }
    }
}

/// A rate in messages per second, or `–`.
pub fn fmt_rate(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.0}")).unwrap_or_else(|| "–".into())
}

fn fmt_ms(us: Option<f64>) -> String {
    us.map(|u| format!("{:.2}", u / 1000.0))
        .unwrap_or_else(|| "–".into())
}

/// Added CPU per message, µs, or `–`.
fn fmt_added(r: &Row) -> String {
    r.added_cpu_us()
        .map(|x| format!("{x:.0}"))
        .unwrap_or_else(|| "–".into())
}

/// Added CPU per message as a multiple of the row's floor, or `–`.
fn fmt_multiple(r: &Row, floor: Option<&Floor>) -> String {
    match (r.added_cpu_us(), floor) {
        (Some(a), Some(f)) => format!("{:.1}×", a / f.bound_us(r.scenario.binding)),
        _ => "–".into(),
    }
}

/// The Markdown table of the rows; with the `floor`, the added CPU per
/// message is also given as a multiple of the floor the row is bound by.
pub fn table(rows: &[Row], floor: Option<&Floor>) -> String {
    let mut s = String::new();
    s.push_str("| broker | scenario | msgs/s raw | msgs/s guarded | ratio | added p50 (ms) | added p99 (ms) | CPU µs/msg raw | CPU µs/msg guarded | added CPU µs/msg | × floor |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let ratio = r
            .ratio()
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "–".into());
        let scenario = match &r.problem {
            Some(p) => format!("{} — FAILED: {p}", r.scenario.label()),
            None => r.scenario.label(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} |\n",
            r.broker,
            scenario,
            fmt_rate(r.raw_rate),
            fmt_rate(r.guarded_rate),
            ratio,
            fmt_ms(r.added(false)),
            fmt_ms(r.added(true)),
            r.raw_cpu_us,
            r.guarded_cpu_us,
            fmt_added(r),
            fmt_multiple(r, floor),
        ));
    }
    s
}

/// The scaling table: one line per (broker, concurrency, payload size).
pub fn scaling_table(rows: &[Row], floor: Option<&Floor>) -> String {
    let mut s = String::from(
        "| broker | concurrency | payload (B) | produced | msgs/s raw | msgs/s guarded | ratio | CPU µs/msg raw | CPU µs/msg guarded | added CPU µs/msg | × floor |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        if let Some(p) = &r.problem {
            s.push_str(&format!(
                "| {} | {} | {} | – | FAILED: {p} | | | | | | |\n",
                r.broker, r.concurrency, r.payload_bytes
            ));
            continue;
        }
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} |\n",
            r.broker,
            r.concurrency,
            r.payload_bytes,
            r.produced,
            fmt_rate(r.raw_rate),
            fmt_rate(r.guarded_rate),
            r.ratio()
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "–".into()),
            r.raw_cpu_us,
            r.guarded_cpu_us,
            fmt_added(r),
            fmt_multiple(r, floor),
        ));
    }
    s
}

/// The seen-set's memory per message, and what it comes to per horizon at
/// 1,000 messages per second.
pub fn seen_set_table(mem: &[SeenSetMemory]) -> String {
    let mut s = String::from(
        "| seen-set | entries inserted | bytes per message | at 1,000 msgs/s, 10 min horizon | at 1,000 msgs/s, 1 h horizon |\n|---|---:|---:|---:|---:|\n",
    );
    let mib = |b: f64| format!("{:.0} MiB", b / (1024.0 * 1024.0));
    for m in mem {
        match &m.bytes_per_entry {
            Ok(b) => s.push_str(&format!(
                "| {} | {} | {b:.0} | {} | {} |\n",
                m.store,
                m.entries,
                mib(b * live_entries(1000.0, 600.0)),
                mib(b * live_entries(1000.0, 3600.0)),
            )),
            Err(e) => s.push_str(&format!(
                "| {} | {} | FAILED: {e} | | |\n",
                m.store, m.entries
            )),
        }
    }
    s.push_str("\nMethod: ");
    s.push_str(
        &mem.iter()
            .map(|m| format!("{}: {}", m.store, m.method))
            .collect::<Vec<_>>()
            .join("; "),
    );
    s.push_str(". An entry lives until its reference expires plus 60 s, so the live set is rate × (horizon + 60 s).\n");
    s
}

/// The issue's targets, checked against the rows.
pub fn targets(rows: &[Row]) -> String {
    let ok = |b: bool| if b { "met" } else { "**missed**" };
    let mut s = String::new();
    let repeated: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.scenario.contexts == Contexts::Repeated
                && r.scenario.pdp == PdpMode::Local
                && r.scenario.log == LogMode::File
                && r.problem.is_none()
        })
        .collect();
    let ratio_ok =
        !repeated.is_empty() && repeated.iter().all(|r| r.ratio().is_some_and(|x| x >= 0.9));
    let worst_ratio = repeated
        .iter()
        .filter_map(|r| r.ratio())
        .fold(f64::INFINITY, f64::min);
    let p99_ok = !repeated.is_empty()
        && repeated
            .iter()
            .all(|r| r.added(true).is_some_and(|x| x <= 1000.0));
    let worst_p99 = repeated
        .iter()
        .filter_map(|r| r.added(true))
        .fold(f64::NEG_INFINITY, f64::max);
    s.push_str(&format!(
        "- repeated context, guarded ≥ 90% of raw on every broker: {} (worst ratio {:.2})\n",
        ok(ratio_ok),
        worst_ratio
    ));
    s.push_str(&format!(
        "- repeated context, added p99 ≤ 1 ms: {} (worst {:.2} ms)\n",
        ok(p99_ok),
        worst_p99 / 1000.0
    ));
    let distinct: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.scenario.contexts == Contexts::Distinct
                && r.scenario.pdp == PdpMode::Local
                && r.problem.is_none()
        })
        .collect();
    let min_distinct = distinct
        .iter()
        .filter_map(|r| r.guarded_rate)
        .fold(f64::INFINITY, f64::min);
    let max_distinct = distinct
        .iter()
        .filter_map(|r| r.guarded_rate)
        .fold(0.0, f64::max);
    s.push_str(&format!(
        "- distinct context, ≥ 5,000 msgs/s guarded: {} (from {:.0} to {:.0} msgs/s across brokers and TTS modes)\n",
        ok(!distinct.is_empty() && min_distinct >= 5000.0),
        min_distinct,
        max_distinct
    ));
    let mut vs = Vec::new();
    for b in rows
        .iter()
        .filter(|r| r.scenario.pdp == PdpMode::Remote && r.problem.is_none())
    {
        if let Some(base) = b.guarded_rate {
            for d in distinct.iter().filter(|d| d.broker == b.broker) {
                if let Some(g) = d.guarded_rate {
                    vs.push((b.broker, d.scenario.label(), g / base));
                }
            }
        }
    }
    s.push_str(&spool_target(rows));
    let vs_ok = !vs.is_empty() && vs.iter().all(|(_, _, x)| *x >= 10.0);
    let detail: Vec<String> = vs
        .iter()
        .map(|(b, l, x)| format!("{b} {l}: {x:.1}×"))
        .collect();
    s.push_str(&format!(
        "- distinct context ≥ 10× the remote-PDP baseline: {} ({})\n",
        ok(vs_ok),
        if detail.is_empty() {
            "no baseline row".into()
        } else {
            detail.join("; ")
        }
    ));
    s
}

/// Issue 14: the decision spool costs at most 5 % of guarded throughput
/// (repeated context, TTS in process, embedded PDP: file vs spool, per broker).
fn spool_target(rows: &[Row]) -> String {
    let base = |r: &&Row| {
        r.scenario.contexts == Contexts::Repeated
            && r.scenario.tts == TtsMode::InProcess
            && r.scenario.pdp == PdpMode::Local
            && r.problem.is_none()
    };
    let mut pairs = Vec::new();
    for spool in rows
        .iter()
        .filter(base)
        .filter(|r| r.scenario.log != LogMode::File)
    {
        if let Some(file) = rows
            .iter()
            .filter(base)
            .find(|r| r.broker == spool.broker && r.scenario.log == LogMode::File)
            && let (Some(f), Some(s)) = (file.guarded_rate, spool.guarded_rate)
        {
            let cpu = spool.guarded_cpu_us - file.guarded_cpu_us;
            let mode = if spool.scenario.log == LogMode::Spool {
                "fsync"
            } else {
                "no fsync"
            };
            pairs.push((spool.broker, mode, f, s, cpu));
        }
    }
    if pairs.is_empty() {
        return "- decision spool costs ≤ 5 % of guarded throughput: no spool row\n".into();
    }
    let ok = pairs
        .iter()
        .filter(|p| p.1 == "fsync")
        .all(|(_, _, f, s, _)| *s >= 0.95 * f);
    let detail: Vec<String> = pairs
        .iter()
        .map(|(b, mode, f, s, cpu)| {
            format!(
                "{b}: file {f:.0} → spool ({mode}) {s:.0} msgs/s ({:+.1} %, {cpu:+.0} µs CPU/msg)",
                (s / f - 1.0) * 100.0
            )
        })
        .collect();
    format!(
        "- decision spool (group commit + fsync + HTTP shipping) costs ≤ 5 % of guarded throughput: {} ({})\n",
        if ok { "met" } else { "**missed**" },
        detail.join("; ")
    )
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn machine(quick: bool, plan: &Plan, elapsed: Duration) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    format!(
        "- date: {}\n- machine: {cores} cores, {}; load average at the end {load}\n- mode: {}{}, {} messages per row + {} paced for latency, concurrency {} per consumer; run took {:.0} s\n",
        elevate_core::now_rfc3339(),
        cpu_model(),
        if quick { "quick" } else { "full" },
        if cfg!(debug_assertions) {
            " (debug build: numbers are not representative)"
        } else {
            " (release build)"
        },
        plan.messages,
        plan.latency_messages,
        plan.concurrency,
        elapsed.as_secs_f64()
    )
}

const NOTES: &str = r#"## How to read it

- **raw**: the broker's plain client consumes the same N messages (Kafka: a
  `StreamConsumer` in its own group; RabbitMQ: `basic_consume` + ack, same
  prefetch; NATS: a pull consumer with double ack; memory: receive + ack) and
  the handler only counts. **guarded**: the broker crate's guarded consumer
  and core's `Processor`: credential scan, context-reference verification
  (ES256), Txn-Token (per-context cache in front of the in-process TTS or the
  HTTP client on loopback), trust elevation on the embedded Cedar PDP (both
  checks; behind `CachingPdp`, which reuses the answer to the same two
  questions under the same policy version, so one context's messages cost
  one Cedar evaluation), a JSON Lines decision record written and flushed to a file, then
  the same handler, then settlement.
- **msgs/s** is drain throughput over a backlog of N messages (first to last
  handler call). **ratio** = guarded / raw.
- **added p50/p99** = guarded minus raw latency, publish timestamp (header
  `x-bench-ts`) → handler, over a paced trickle sent to both consumers after
  the drain.
- **CPU µs/msg** = process CPU time (getrusage) during the drain / N; it
  includes the TTS and the remote PDP server, which run in this process.
- **added CPU µs/msg** = guarded minus raw CPU per message; **× floor** =
  that divided by the floor the row's binding is bound by, measured in the
  same run (the Floor table): per-message binding, one ES256
  context-reference verification + one answer-cache hit (the repeated
  context's Txn-Token comes from the token cache, its Cedar answer from
  the answer cache). A distinct context also pays one token exchange per
  message (an assertion signature, the TTS's verifications and signature,
  a Txn-Token verification: about four more signature operations), which
  the floor does not include, so its multiple is against the same
  verification floor and shows what the exchange adds. A per-context
  binding is bound by one MAC + one cache hit (its distinct-context row
  also pays a context signature, a JWE wrap and unwrap and a context
  verification per message). 1.0× would be a guard
  that does nothing but the unavoidable checks.
- **Scaling**: the repeated-context row at other concurrencies (100-byte
  payloads) and payload sizes (concurrency 32; the payload digest grows
  with the payload; at most 150 MiB of payload per drain, so 300 messages
  at 512 KiB).
- **The first row** of a bench process ran 10–15 % faster than the same
  row later (fresh heap); a full run now drains an untimed warm-up row
  (the first broker's first scenario) before the rows that are reported.
- **repeated ctx**: 100 messages per origin transaction (one Txn-Token each
  100 messages, never across contexts); **distinct ctx**: a new origin
  transaction per message, so one token exchange per message.
- **TTS 1 replica / 2 replicas on PostgreSQL**: the `txn-token-service`
  binary as separate processes in fleet mode (`[store]` on the local
  PostgreSQL: every exchange claims its client assertion's `jti` there),
  logging at `warn` like the in-process TTS; the guard's one client sends
  its exchanges round-robin over the replicas it is given
  (`[tts] replica_urls`). Their CPU is not in the CPU column (other
  processes), and they share the 2 cores with this process and PostgreSQL.
  **TTS HTTP** is the same service code over HTTP inside this process, no store.
- **baseline**: the status quo, one authorization call per message to a
  remote PDP (AuthZEN `POST /access/v1/evaluations`, axum on loopback, the
  same Cedar bundle) instead of the embedded PDP.
- The machine is shared (2 cores, other builds running): compare rows of the
  same run, not runs.

Regenerate: `cargo run --release -p elevate-bench --bin bench` (full) or
`-- --quick --write`.
"#;

/// What was measured besides the main table.
pub struct Extras<'a> {
    /// The floor, measured in this run.
    pub floor: Option<&'a Floor>,
    /// The scaling rows (empty when not run).
    pub scaling: &'a [Row],
    /// The seen-set's memory (empty when not run).
    pub seen_set: &'a [SeenSetMemory],
}

/// The floor and scaling sections of the results file (and of the output).
pub fn sections(x: &Extras<'_>) -> String {
    let mut s = String::new();
    if let Some(f) = x.floor {
        s.push_str("## Floor (measured in this run, in process)\n\n");
        s.push_str(&f.table());
        s.push('\n');
    }
    if !x.scaling.is_empty() {
        s.push_str("## Scaling (repeated context, TTS in process, embedded PDP)\n\n");
        s.push_str(&scaling_table(x.scaling, x.floor));
        s.push('\n');
    }
    if !x.seen_set.is_empty() {
        s.push_str("## Replay seen-set memory\n\n");
        s.push_str(&seen_set_table(x.seen_set));
        s.push('\n');
    }
    s
}

/// The results file: machine, floor, table, targets, scaling, how to read
/// it, then `extra` (the notes kept).
pub fn render(
    quick: bool,
    plan: &Plan,
    rows: &[Row],
    x: &Extras<'_>,
    elapsed: Duration,
    extra: &str,
) -> String {
    format!(
        "# Benchmarks: raw vs guarded\n\n_Generated by `cargo run --release -p elevate-bench --bin bench`; do not edit by hand._\n\n{}\n{}\n## Targets (issue 16)\n\n{}\n## Targets (issue 8, earlier)\n\n{}\n{}{}{}",
        machine(quick, plan, elapsed),
        table(rows, x.floor),
        crate::targets::targets(rows, x.floor),
        targets(rows),
        sections(x),
        NOTES,
        extra
    )
}
