//! One row of the table: produce N messages once, drain them with the raw
//! and then the guarded consumer, then trickle a few to both for latency.

use std::sync::Arc;
use std::time::Duration;

use elevate_testing::binding::{BrokerBinding, ConsumerOptions};

use crate::env::BenchEnv;
use crate::report::Progress;
use crate::scenario::Scenario;
use crate::tally::{H_SEQ, Tally, cpu_time, stamp};

/// How long a consumer may hold a message before JetStream delivers it
/// again: far longer than a row's drain keeps one waiting.
const REDELIVER_AFTER: Duration = Duration::from_secs(30);

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub broker: &'static str,
    pub scenario: Scenario,
    pub raw_rate: Option<f64>,
    pub guarded_rate: Option<f64>,
    pub raw_p50: Option<f64>,
    pub raw_p99: Option<f64>,
    pub guarded_p50: Option<f64>,
    pub guarded_p99: Option<f64>,
    pub raw_cpu_us: f64,
    pub guarded_cpu_us: f64,
    pub handled: usize,
    pub dead: usize,
    /// Messages published in this row (drained + trickled).
    pub produced: usize,
    pub duplicates: usize,
    /// Messages in flight per consumer in this row.
    pub concurrency: usize,
    /// Size of each drained message's payload, in bytes.
    pub payload_bytes: usize,
    pub problem: Option<String>,
}

impl Row {
    /// An empty row of `broker` and `scenario`.
    pub fn new(broker: &'static str, scenario: Scenario) -> Row {
        Row {
            broker,
            scenario,
            raw_rate: None,
            guarded_rate: None,
            raw_p50: None,
            raw_p99: None,
            guarded_p50: None,
            guarded_p99: None,
            raw_cpu_us: 0.0,
            guarded_cpu_us: 0.0,
            handled: 0,
            dead: 0,
            produced: 0,
            duplicates: 0,
            concurrency: 0,
            payload_bytes: 0,
            problem: None,
        }
    }

    /// Guarded / raw throughput.
    pub fn ratio(&self) -> Option<f64> {
        Some(self.guarded_rate? / self.raw_rate?)
    }

    /// Guarded minus raw CPU per message, in µs (`None` when the row failed
    /// before both drains were measured).
    pub fn added_cpu_us(&self) -> Option<f64> {
        (self.raw_rate.is_some() && self.guarded_rate.is_some())
            .then_some(self.guarded_cpu_us - self.raw_cpu_us)
    }

    /// Guarded minus raw latency (p99 or p50), in µs.
    pub fn added(&self, p99: bool) -> Option<f64> {
        if p99 {
            Some(self.guarded_p99? - self.raw_p99?)
        } else {
            Some(self.guarded_p50? - self.raw_p50?)
        }
    }
}

/// What every row does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Messages drained per row.
    pub messages: usize,
    /// Messages trickled for latency.
    pub latency_messages: usize,
    /// Time between two trickled messages.
    pub latency_interval: Duration,
    /// Messages in flight per consumer (raw and guarded alike).
    pub concurrency: usize,
    /// Payload size of every message, in bytes (`None`: the ~100-byte order).
    pub payload_bytes: Option<usize>,
}

/// Runs row `row` of `scenario` on `broker`; a failure is the row's `problem`.
pub async fn run(
    env: &BenchEnv,
    broker: &dyn BrokerBinding,
    name: &'static str,
    row: usize,
    sc: Scenario,
    plan: &Plan,
    progress: &Progress,
) -> Row {
    let mut out = Row::new(name, sc);
    out.concurrency = plan.concurrency;
    if let Err(e) = run_inner(env, broker, row, sc, plan, progress, &mut out).await {
        out.problem = Some(e);
    }
    out
}

async fn run_inner(
    env: &BenchEnv,
    broker: &dyn BrokerBinding,
    row: usize,
    sc: Scenario,
    plan: &Plan,
    progress: &Progress,
    out: &mut Row,
) -> Result<(), String> {
    let n = plan.messages;
    let l = plan.latency_messages;
    let ep = broker.setup(&format!("bench-{row}")).await?;
    progress.step(out.broker, &sc, "producing");
    let msgs = env
        .prepare(sc, &ep.destination, 0, n, plan.payload_bytes)
        .await?;
    let trickle = env
        .prepare(sc, &ep.destination, n, l, plan.payload_bytes)
        .await?;
    out.payload_bytes = msgs.first().map(|(_, p)| p.len()).unwrap_or_default();
    broker
        .publish_batch(
            &ep,
            msgs.iter().map(|(h, p)| (stamp(h), p.clone())).collect(),
        )
        .await?;
    out.produced = n;
    let budget = Duration::from_secs(30) + Duration::from_millis(n as u64 * 5);
    let opts = ConsumerOptions {
        concurrency: Some(plan.concurrency),
        redeliver_after: Some(REDELIVER_AFTER),
        dead_letter_tap: None,
    };

    // raw
    progress.step(out.broker, &sc, "raw");
    let raw = Tally::new(n);
    let cpu0 = cpu_time();
    let t = raw.clone();
    let raw_run = broker
        .start_raw_consumer(&ep, Arc::new(move |h, _| t.mark(h, false)), &opts)
        .await?;
    let raw_ok = raw.wait_for(n, budget).await;
    out.raw_cpu_us = (cpu_time() - cpu0).as_secs_f64() * 1e6 / n as f64;
    out.raw_rate = raw.throughput();

    // guarded
    progress.step(out.broker, &sc, "guarded");
    let guarded = Tally::new(n);
    let cpu0 = cpu_time();
    let processor = env.processor(sc, &guarded)?;
    let t = guarded.clone();
    let guarded_opts = ConsumerOptions {
        dead_letter_tap: Some(Arc::new(move |letter| t.mark(&letter.headers, true))),
        ..opts
    };
    let guarded_run = broker
        .start_consumer_with(&ep, processor, &guarded_opts)
        .await?;
    let guarded_ok = guarded.wait_for(n, budget).await;
    out.guarded_cpu_us = (cpu_time() - cpu0).as_secs_f64() * 1e6 / n as f64;
    out.guarded_rate = guarded.throughput();

    // latency: a paced trickle both consumers receive while idle otherwise
    progress.step(out.broker, &sc, "latency");
    let mut tick = tokio::time::interval(plan.latency_interval);
    for (h, p) in &trickle {
        tick.tick().await;
        broker
            .publish_batch(&ep, vec![(stamp(h), p.clone())])
            .await?;
    }
    out.produced = n + l;
    let _ = raw.wait_for(n + l, Duration::from_secs(30)).await;
    let _ = guarded.wait_for(n + l, Duration::from_secs(30)).await;
    // let late duplicates show up before counting
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw_run.stop().await;
    guarded_run.stop().await;
    broker.teardown(&ep).await;

    out.raw_p50 = raw.percentile(0.50);
    out.raw_p99 = raw.percentile(0.99);
    out.guarded_p50 = guarded.percentile(0.50);
    out.guarded_p99 = guarded.percentile(0.99);
    out.handled = guarded.handled();
    out.dead = guarded.dead();
    out.duplicates = guarded.duplicates();
    let total = n + l;
    let mut problems = Vec::new();
    if !raw_ok || raw.count() != total {
        problems.push(format!("raw consumer got {} of {total}", raw.count()));
    }
    if !guarded_ok || out.handled + out.dead != total {
        problems.push(format!(
            "guarded: handled {} + dead-lettered {} != produced {total}",
            out.handled, out.dead
        ));
    }
    if out.duplicates > 0 {
        problems.push(format!("guarded: {} duplicate deliveries", out.duplicates));
    }
    let malformed = guarded.malformed();
    if malformed > 0 {
        problems.push(format!("guarded: {malformed} messages without {H_SEQ}"));
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(())
}
