//! One drill: one broker, one fault, while a `drill-worker` process drains.
//!
//! Sequence: keys and the TTS configuration into the row's directory, the TTS
//! process, the broker (the machine's, or one of the drill's own when the
//! scenario restarts it), destinations, every message produced through the
//! guarded producer, then the worker; once a quarter of the permitted
//! messages is handled the fault is applied; then the drill waits until every
//! message is accounted for (handled or dead-lettered) or the deadline
//! passes, stops the worker and counts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use elevate_cedar::CedarPdp;
use elevate_core::ctxref::ContextRefMinter;
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::producer::ProducerGuard;

use crate::brokers::own::{OwnBroker, Tools};
use crate::brokers::{self, DlqReader, Names};
use crate::procs::{Proc, Registry};
use crate::report::{Row, Tail, Tally, read_decisions};
use crate::tts::{self, Tts};
use crate::{BrokerKind, Job, now_ms};

/// A fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// (a) `kill -9` the TTS, start it again after a pause.
    TtsKill,
    /// (b) `kill -9` the consumer process, start it again.
    ConsumerKill,
    /// (c) restart the broker (an instance of the drill's own).
    BrokerRestart,
    /// (d) replace the policy bundle with a broken one, then a good one.
    Bundle,
    /// (e) freeze the TTS (SIGSTOP), then SIGCONT.
    TtsFreeze,
    /// (f) the TTS down for a long outage: no permitted message may be dead-lettered.
    Outage,
}

impl Scenario {
    /// Every scenario, in the order.
    pub const ALL: [Scenario; 6] = [
        Scenario::TtsKill,
        Scenario::ConsumerKill,
        Scenario::BrokerRestart,
        Scenario::Bundle,
        Scenario::TtsFreeze,
        Scenario::Outage,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::TtsKill => "tts-kill",
            Scenario::ConsumerKill => "consumer-kill",
            Scenario::BrokerRestart => "broker-restart",
            Scenario::Bundle => "bundle",
            Scenario::TtsFreeze => "tts-freeze",
            Scenario::Outage => "outage",
        }
    }
}

/// One row to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// The broker.
    pub broker: BrokerKind,
    /// The fault.
    pub scenario: Scenario,
    /// Kafka only: the worker has a stable `group.instance.id`.
    pub static_membership: bool,
}

impl Case {
    /// The scenario as the table shows it.
    pub fn label(&self) -> String {
        match (self.broker, self.scenario) {
            (BrokerKind::Kafka, Scenario::ConsumerKill) => format!(
                "consumer-kill ({})",
                if self.static_membership {
                    "static group.instance.id"
                } else {
                    "no group.instance.id"
                }
            ),
            (_, s) => s.name().to_string(),
        }
    }

    /// Whether this row runs on a broker instance of the drill's own. Kafka's
    /// consumer kill does too: static membership is measured on tansu with
    /// PostgreSQL storage.
    pub fn own_broker(&self) -> bool {
        self.scenario == Scenario::BrokerRestart
            || (self.broker == BrokerKind::Kafka && self.scenario == Scenario::ConsumerKill)
    }
}

/// Sizes and durations of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `--quick`.
    pub quick: bool,
    /// Messages per row.
    pub messages: u64,
    /// The share of permitted messages handled before the fault.
    pub trigger: f64,
    /// (a) how long the TTS stays dead.
    pub tts_down: Duration,
    /// (b) how long the consumer stays dead.
    pub consumer_down: Duration,
    /// (c) how long the broker stays down.
    pub broker_down: Duration,
    /// (c) stop the broker with SIGKILL instead of SIGTERM.
    pub broker_kill: bool,
    /// (d) how long the broken bundle stays in place.
    pub bundle_broken: Duration,
    /// (e) how long the TTS stays frozen.
    pub tts_freeze: Duration,
    /// (f) how long the TTS stays down.
    pub outage: Duration,
    /// After the fault, how long the drain may take.
    pub drain_timeout: Duration,
    /// The worker's `--retry-max-delay` (None: core's default, 30 s).
    pub retry_max_delay: Option<Duration>,
    /// The worker's concurrency.
    pub concurrency: usize,
    /// Kafka `session.timeout.ms` of the worker (None: librdkafka's 45 s).
    pub session_timeout_ms: Option<u32>,
}

impl Plan {
    /// The full run: 10,000 messages, the durations, core's default retry pacing.
    pub fn full() -> Self {
        Plan {
            quick: false,
            messages: 10_000,
            trigger: 0.25,
            tts_down: Duration::from_secs(10),
            consumer_down: Duration::from_secs(1),
            broker_down: Duration::from_secs(10),
            broker_kill: false,
            bundle_broken: Duration::from_secs(5),
            tts_freeze: Duration::from_secs(20),
            outage: Duration::from_secs(90),
            drain_timeout: Duration::from_secs(600),
            retry_max_delay: None,
            concurrency: 32,
            session_timeout_ms: None,
        }
    }

    /// The CI run: 1,000 messages, shorter faults, retries paced at most 5 s
    /// apart, brokers stopped with SIGKILL (tansu serves for ≈ 5 s after a
    /// SIGTERM, long enough to drain 1,000 messages before it goes).
    pub fn quick() -> Self {
        Plan {
            quick: true,
            broker_kill: true,
            messages: 1_000,
            tts_down: Duration::from_secs(5),
            broker_down: Duration::from_secs(3),
            bundle_broken: Duration::from_secs(3),
            tts_freeze: Duration::from_secs(8),
            outage: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(180),
            retry_max_delay: Some(Duration::from_secs(5)),
            ..Plan::full()
        }
    }
}

/// What every row shares.
#[derive(Debug, Clone)]
pub struct Env {
    /// The `drill-worker` binary.
    pub worker_bin: PathBuf,
    /// The `txn-token-service` binary.
    pub tts_bin: PathBuf,
    /// The policy bundle to copy (`examples/policies`).
    pub bundle: PathBuf,
    /// Where rows put their files.
    pub work_dir: PathBuf,
    /// Where pids are recorded.
    pub registry: Registry,
    /// The machine's brokers.
    pub kafka: String,
    /// The machine's RabbitMQ.
    pub amqp: String,
    /// The machine's NATS.
    pub nats: String,
    /// Broker binaries for instances of the drill's own.
    pub tools: Tools,
}

impl Env {
    fn machine_url(&self, kind: BrokerKind) -> &str {
        match kind {
            BrokerKind::Kafka => &self.kafka,
            BrokerKind::Amqp => &self.amqp,
            BrokerKind::Nats => &self.nats,
        }
    }
}

/// Prints a progress line for one row.
pub fn say(case: &Case, started: Instant, what: impl std::fmt::Display) {
    println!(
        "[{:>6.1}s {}/{}] {what}",
        started.elapsed().as_secs_f64(),
        case.broker,
        case.label()
    );
}

/// Runs one row; never panics, errors end up in the row.
pub async fn run_case(env: &Env, plan: &Plan, case: Case) -> Row {
    let started = Instant::now();
    let mut row = Row {
        broker: case.broker.to_string(),
        scenario: case.label(),
        require_no_permitted_dl: case.scenario == Scenario::Outage,
        ..Row::default()
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let dir = env.work_dir.join(format!(
        "{}-{}{}-{run_id}",
        case.broker,
        case.scenario.name(),
        if case.broker == BrokerKind::Kafka
            && case.scenario == Scenario::ConsumerKill
            && !case.static_membership
        {
            "-dynamic"
        } else {
            ""
        }
    ));
    let mut drill = Drill {
        env,
        plan,
        case,
        started,
        dir,
        run_id,
        row: &mut row,
        state: None,
    };
    if let Err(e) = drill.run().await {
        say(&case, started, format!("ERROR: {e}"));
        drill.row.error = Some(e);
    }
    drill.finish().await;
    row
}

/// The processes and clients of a running row.
struct State {
    tts: Tts,
    own: Option<OwnBroker>,
    broker: Box<dyn brokers::Broker>,
    names: Names,
    dlq: Box<dyn DlqReader>,
    worker: Option<Proc>,
    workers_started: usize,
    handled: Tail,
    tally: Tally,
    keys: Keys,
    bundle: PathBuf,
    /// When the worker was (re)started, and its pid.
    restarted: Option<(u64, u32)>,
    /// The worker may be down (between a kill and its restart).
    worker_may_be_down: bool,
    worker_started_at: Instant,
    /// When every message was first accounted for.
    drained_at: Option<Instant>,
}

struct Keys {
    worker_pem: PathBuf,
    worker_kid: String,
    producer_jwk: PathBuf,
    producer: SigningKey,
}

struct Drill<'a> {
    env: &'a Env,
    plan: &'a Plan,
    case: Case,
    started: Instant,
    dir: PathBuf,
    run_id: String,
    row: &'a mut Row,
    state: Option<State>,
}

impl Drill<'_> {
    fn say(&self, what: impl std::fmt::Display) {
        say(&self.case, self.started, what);
    }

    fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        self.say(&what);
        self.row.notes.push(format!(
            "+{:.1}s {what}",
            self.started.elapsed().as_secs_f64()
        ));
    }

    fn state(&mut self) -> Result<&mut State, String> {
        self.state.as_mut().ok_or_else(|| "no state".to_string())
    }

    async fn run(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let keys = write_keys(&self.dir)?;
        let bundle = self.dir.join("bundle");
        copy_bundle(&self.env.bundle, &bundle)?;

        let worker_key =
            SigningKey::from_pem_file(SigningAlg::ES256, keys.worker_kid.clone(), &keys.worker_pem)
                .map_err(|e| format!("worker key: {e}"))?;
        let config = tts::write_config(
            &self.dir,
            &[
                (crate::PRODUCER, &keys.producer, crate::ACTION),
                (crate::WORKER, &worker_key, crate::ACTION),
            ],
        )?;
        let tts = Tts::start(&self.env.tts_bin, &config, &self.env.registry).await?;
        self.say(format!("TTS up at {}", tts.token_endpoint()));

        let own = if self.case.own_broker() {
            let own = OwnBroker::start(
                self.case.broker,
                &self.dir.join("broker"),
                &self.env.tools,
                &self.env.registry,
            )
            .await?;
            self.say(format!(
                "own {} broker up at {}",
                self.case.broker,
                own.url()
            ));
            Some(own)
        } else {
            None
        };
        let url = own
            .as_ref()
            .map(OwnBroker::url)
            .unwrap_or_else(|| self.env.machine_url(self.case.broker).to_string());
        let broker = brokers::connect(self.case.broker, &url).await?;
        let names = Names::new(self.case.broker, &self.run_id);
        broker.setup(&names).await?;

        let jobs: Vec<Job> = (0..self.plan.messages).map(Job::numbered).collect();
        let pdp = Arc::new(CedarPdp::load_dir(&bundle).map_err(|e| format!("bundle: {e}"))?);
        let producer = ProducerGuard::new(
            ContextRefMinter::new(
                crate::PRODUCER,
                keys.producer.clone(),
                Duration::from_secs(3600),
            ),
            pdp,
        );
        let t = Instant::now();
        let produced = broker.produce(&names, &producer, &jobs).await?;
        self.say(format!(
            "produced {produced} in {:.1}s",
            t.elapsed().as_secs_f64()
        ));
        let dlq = broker.dlq_reader(&names).await?;
        self.state = Some(State {
            tally: Tally::new(&jobs),
            handled: Tail::new(&self.dir.join("handled.jsonl")),
            tts,
            own,
            broker,
            names,
            dlq,
            worker: None,
            workers_started: 0,
            keys,
            bundle,
            restarted: None,
            worker_may_be_down: false,
            worker_started_at: Instant::now(),
            drained_at: None,
        });
        self.start_worker()?;

        // The fault, once a quarter of the permitted messages is handled. A
        // broker stopped with SIGTERM is stopped earlier: it still serves while
        // it shuts down (tansu ≈ 5 s, nats-server up to ≈ 10 s), and the
        // restart must meet messages that are not drained yet.
        let share = if self.case.scenario == Scenario::BrokerRestart && !self.plan.broker_kill {
            self.plan.trigger / 5.0
        } else {
            self.plan.trigger
        };
        let want = ((self.state()?.tally.permitted() as f64) * share).ceil() as usize;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            self.observe().await?;
            if self.state()?.tally.handled_count() >= want.max(1) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {} handled 300 s after the worker started: no fault applied",
                    self.state()?.tally.handled_count()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let handled = self.state()?.tally.handled_count();
        self.say(format!("{handled} handled: applying the fault"));
        self.fault().await?;

        // The drain.
        let deadline = Instant::now() + self.plan.drain_timeout;
        loop {
            self.observe().await?;
            let s = self.state()?;
            if s.tally.covered() == s.tally.jobs.len() {
                break;
            }
            if Instant::now() > deadline {
                let (covered, total) = (s.tally.covered(), s.tally.jobs.len());
                self.note(format!(
                    "drain deadline: {covered} of {total} accounted for after {:?}",
                    self.plan.drain_timeout
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let s = self.state()?;
        self.row.drain = s
            .drained_at
            .map(|at| at.duration_since(s.worker_started_at));
        // A moment for late duplicates (redeliveries in flight) to show.
        let settle_until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < settle_until {
            self.observe().await?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    fn start_worker(&mut self) -> Result<(), String> {
        let env = self.env;
        let plan = self.plan;
        let case = self.case;
        let dir = self.dir.clone();
        let s = self.state()?;
        s.workers_started += 1;
        let mut cmd = Command::new(&env.worker_bin);
        cmd.arg("--broker")
            .arg(case.broker.name())
            .arg("--url")
            .arg(s.broker.url())
            .arg("--source")
            .arg(&s.names.source)
            .arg("--dlq")
            .arg(&s.names.dlq)
            .arg("--consumer")
            .arg(&s.names.consumer)
            .arg("--tts-url")
            .arg(s.tts.token_endpoint())
            .arg("--key")
            .arg(&s.keys.worker_pem)
            .arg("--kid")
            .arg(&s.keys.worker_kid)
            .arg("--trusted-key")
            .arg(&s.keys.producer_jwk)
            .arg("--bundle")
            .arg(&s.bundle)
            .arg("--decision-log")
            .arg(dir.join("decisions.jsonl"))
            .arg("--handled-log")
            .arg(dir.join("handled.jsonl"))
            .arg("--concurrency")
            .arg(plan.concurrency.to_string())
            .env(
                "RUST_LOG",
                std::env::var("DRILL_WORKER_LOG")
                    .unwrap_or_else(|_| "info,elevate::decision=off".into()),
            );
        if let Some(d) = plan.retry_max_delay {
            cmd.arg("--retry-max-delay")
                .arg(humantime::format_duration(d).to_string());
        }
        if case.broker == BrokerKind::Kafka {
            if case.static_membership {
                cmd.arg("--group-instance-id").arg("drill-worker-1");
            }
            if let Some(ms) = plan.session_timeout_ms {
                cmd.arg("--session-timeout-ms").arg(ms.to_string());
            }
        }
        let log = dir.join(format!("worker-{}.log", s.workers_started));
        let proc =
            Proc::spawn(cmd, "drill-worker", &log, &env.registry).map_err(|e| e.to_string())?;
        let pid = proc.pid();
        s.worker = Some(proc);
        if s.workers_started == 1 {
            s.worker_started_at = Instant::now();
        } else {
            s.restarted = Some((now_ms(), pid));
        }
        Ok(())
    }

    /// Reads what happened since the last look; fails if a process died
    /// that should not have.
    async fn observe(&mut self) -> Result<(), String> {
        let s = self.state.as_mut().ok_or("no state")?;
        let lines = s.handled.read_lines();
        s.tally.add_handled(lines);
        let letters = s.dlq.poll().await?;
        s.tally.add_letters(letters);
        let incidents = s.dlq.incidents();
        if s.drained_at.is_none() && s.tally.covered() == s.tally.jobs.len() {
            s.drained_at = Some(Instant::now());
        }
        let mut first = None;
        if let Some((at, pid)) = s.restarted
            && self.row.first_after_restart.is_none()
            && let Some(h) = s.tally.handled.iter().find(|h| h.pid == pid)
        {
            first = Some(Duration::from_millis(h.t_ms.saturating_sub(at)));
        }
        if !s.worker_may_be_down
            && let Some(w) = s.worker.as_mut()
            && let Some(status) = w.exited()
        {
            let tail = w.log_tail(15);
            return Err(format!(
                "the worker exited on its own ({status}); its log ends:\n{tail}"
            ));
        }
        if let Some(died) = s.tts.died() {
            return Err(died);
        }
        for i in incidents {
            self.note(i);
        }
        if let Some(took) = first {
            self.row.first_after_restart = Some(took);
            self.note(format!(
                "restarted worker handled its first message {:.1}s after its start",
                took.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// Waits `d`, still observing.
    async fn wait_observing(&mut self, d: Duration) -> Result<(), String> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.observe().await?;
            tokio::time::sleep(Duration::from_millis(250).min(until - Instant::now())).await;
        }
        Ok(())
    }

    /// Checks that the fault met messages still to drain (else the row
    /// proves nothing and fails), and notes how many were accounted for.
    async fn took_effect(&mut self) -> Result<(), String> {
        self.observe().await?;
        let s = self.state()?;
        let (covered, total) = (s.tally.covered(), s.tally.jobs.len());
        if covered >= total {
            return Err(format!(
                "the drain had finished before the fault took effect ({covered} of {total} \
                 accounted for): use more --messages"
            ));
        }
        self.note(format!(
            "fault in effect with {covered} of {total} messages accounted for"
        ));
        Ok(())
    }

    async fn fault(&mut self) -> Result<(), String> {
        let plan = self.plan.clone();
        match self.case.scenario {
            Scenario::TtsKill | Scenario::Outage => {
                let down = if self.case.scenario == Scenario::Outage {
                    plan.outage
                } else {
                    plan.tts_down
                };
                let pid = self.state()?.tts.pid();
                self.state()?.tts.kill();
                self.note(format!(
                    "TTS (pid {}) killed with SIGKILL, down for {down:?}",
                    show(pid)
                ));
                self.took_effect().await?;
                self.wait_observing(down).await?;
                self.state()?.tts.restart().await?;
                let pid = self.state()?.tts.pid();
                self.note(format!(
                    "TTS started again (pid {}) on the same port",
                    show(pid)
                ));
            }
            Scenario::TtsFreeze => {
                self.state()?.tts.signal(libc::SIGSTOP)?;
                self.note(format!("TTS frozen (SIGSTOP) for {:?}", plan.tts_freeze));
                self.took_effect().await?;
                self.wait_observing(plan.tts_freeze).await?;
                self.state()?.tts.signal(libc::SIGCONT)?;
                self.note("TTS continued (SIGCONT)");
            }
            Scenario::ConsumerKill => {
                let s = self.state()?;
                s.worker_may_be_down = true;
                let pid = s.worker.as_ref().map(Proc::pid);
                if let Some(w) = s.worker.as_mut() {
                    w.kill_hard();
                }
                self.note(format!("worker (pid {}) killed with SIGKILL", show(pid)));
                self.took_effect().await?;
                self.wait_observing(plan.consumer_down).await?;
                self.start_worker()?;
                let s = self.state()?;
                s.worker_may_be_down = false;
                let pid = s.worker.as_ref().map(Proc::pid);
                self.note(format!("worker started again (pid {})", show(pid)));
            }
            Scenario::BrokerRestart => {
                let hard = plan.broker_kill;
                let s = self.state()?;
                let own = s
                    .own
                    .as_mut()
                    .ok_or("broker restart without a broker of our own")?;
                let pid = own.pid();
                own.stop(hard).await?;
                self.note(format!(
                    "broker (pid {}) stopped with {}, down for {:?}",
                    show(pid),
                    if hard { "SIGKILL" } else { "SIGTERM" },
                    plan.broker_down
                ));
                self.took_effect().await?;
                self.wait_observing(plan.broker_down).await?;
                let s = self.state()?;
                let own = s.own.as_mut().ok_or("no broker")?;
                let took = own.start_again().await?;
                let pid = own.pid();
                self.note(format!(
                    "broker started again (pid {}), listening after {:.1}s",
                    show(pid),
                    took.as_secs_f64()
                ));
            }
            Scenario::Bundle => {
                let bundle = self.state()?.bundle.clone();
                write_broken_bundle(&bundle)?;
                self.note("policy bundle replaced by a broken one (a permit-all policy beside a syntax error)");
                self.took_effect().await?;
                self.wait_observing(plan.bundle_broken).await?;
                write_good_bundle(&bundle)?;
                self.note("policy bundle replaced by a good one (a new version)");
            }
        }
        Ok(())
    }

    /// Stops the worker, reads the last of the logs and counts; then cleans up.
    async fn finish(&mut self) {
        let Some(mut s) = self.state.take() else {
            return;
        };
        if let Some(mut w) = s.worker.take()
            && !w.stop(Duration::from_secs(20)).await
        {
            self.note("the worker did not stop within 20 s of SIGTERM (killed)");
        }
        // The last of what was written (the DLQ reader may still need the broker).
        s.tally.add_handled(s.handled.read_lines());
        // Until a poll finds nothing new (each poll reads for at most a quarter second).
        for _ in 0..240 {
            match s.dlq.poll().await {
                Ok(l) if l.is_empty() => break,
                Ok(l) => s.tally.add_letters(l),
                Err(e) => {
                    self.note(format!("reading the last dead letters: {e}"));
                    break;
                }
            }
        }
        let (decisions, bad) = read_decisions(&self.dir.join("decisions.jsonl"));
        if bad > 0 {
            self.note(format!("{bad} decision-log lines did not parse"));
        }
        if s.tally.bad_handled_lines > 0 {
            let n = s.tally.bad_handled_lines;
            self.note(format!("{n} handled-log lines did not parse"));
        }
        if s.tally.jobs.len() as u64 == self.plan.messages {
            self.row.count(&s.tally, &decisions);
        }
        // The reader goes before its topic does (a librdkafka consumer of a
        // topic deleted on tansu crashes the process).
        let State {
            dlq, broker, names, ..
        } = s;
        drop(dlq);
        broker.teardown(&names).await;
        let failures = self.row.failures();
        if failures.is_empty() {
            self.say(format!(
                "ok: {} handled ({} duplicates), {} dead-lettered, 0 lost, 0 unauthorized",
                self.row.handled_distinct,
                self.row.duplicates(),
                self.row.dl_distinct
            ));
        } else {
            self.say(format!(
                "FAILED: {} (files kept in {})",
                failures.join("; "),
                self.dir.display()
            ));
        }
    }
}

fn show(pid: Option<u32>) -> String {
    pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
}

fn write_keys(dir: &Path) -> Result<Keys, String> {
    let short = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let producer = SigningKey::generate(SigningAlg::ES256, format!("orders-api-{short}"))
        .map_err(|e| format!("producer key: {e}"))?;
    let worker_kid = format!("test-worker-{short}");
    let worker = SigningKey::generate(SigningAlg::ES256, worker_kid.clone())
        .map_err(|e| format!("worker key: {e}"))?;
    let worker_pem = dir.join("worker.pem");
    std::fs::write(&worker_pem, worker.to_pkcs8_pem()).map_err(|e| format!("worker key: {e}"))?;
    let producer_jwk = dir.join("orders-api.jwk.json");
    let jwk = serde_json::to_vec_pretty(producer.public_jwk()).map_err(|e| e.to_string())?;
    std::fs::write(&producer_jwk, jwk).map_err(|e| format!("producer key: {e}"))?;
    Ok(Keys {
        worker_pem,
        worker_kid,
        producer_jwk,
        producer,
    })
}

fn copy_bundle(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let entries = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
    for e in entries {
        let e = e.map_err(|e| e.to_string())?;
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .map_err(|err| format!("{}: {err}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Writes `name` in `dir` atomically (a temporary file the bundle loader
/// ignores, then a rename).
fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| format!("{name}: {e}"))
}

/// The broken file: a permit-all policy (what a partial load would let
/// through: every denied user permitted) beside a syntax error.
const BROKEN_POLICY: &str = "// drill: a broken bundle. Were any of it loaded, everyone would be permitted.\n\
permit (principal, action, resource);\n\
permit (principal, action == Action::\"actFor\", resource) when { context.depth >\n";

fn write_broken_bundle(dir: &Path) -> Result<(), String> {
    write_atomic(dir, "zz-drill-broken.cedar", BROKEN_POLICY)
}

fn write_good_bundle(dir: &Path) -> Result<(), String> {
    let subjects = dir.join("subjects.cedar");
    let mut text =
        std::fs::read_to_string(&subjects).map_err(|e| format!("{}: {e}", subjects.display()))?;
    text.push_str(&format!(
        "\n// drill: good bundle written at {}\n",
        now_ms()
    ));
    write_atomic(dir, "subjects.cedar", &text)?;
    std::fs::remove_file(dir.join("zz-drill-broken.cedar"))
        .map_err(|e| format!("remove the broken policy: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broken_bundle_is_refused_and_the_good_one_loads() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
        let dir = tempfile::tempdir().expect("tempdir");
        copy_bundle(&src, dir.path()).expect("copy");
        let pdp = CedarPdp::load_dir(dir.path()).expect("the example bundle loads");
        let before = pdp.version();
        write_broken_bundle(dir.path()).expect("write");
        assert!(pdp.reload().is_err(), "the broken bundle must not load");
        assert_eq!(pdp.version(), before);
        write_good_bundle(dir.path()).expect("write");
        let after = pdp.reload().expect("the good bundle loads");
        assert_ne!(after, before);
    }
}
