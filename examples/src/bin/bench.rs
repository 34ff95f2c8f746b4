//! The end-to-end benchmark: what does the guard cost?
//!
//! For each broker (the in-memory transport, Kafka on librdkafka's mock
//! cluster and on the real broker, RabbitMQ, NATS JetStream) and each
//! scenario, it produces N messages once and consumes them twice in the same
//! run — with the plain client (raw) and through the broker crate's guarded
//! consumer and core's `Processor` (guarded) — then sends a paced trickle to
//! both consumers to measure latency from the publish timestamp (header
//! `x-bench-ts`) to the handler. It prints one table and, in full mode or
//! with `--write`, regenerates `docs/BENCHMARKS.md`.
//!
//! ```sh
//! cargo run --release -p elevate-examples --bin bench -- [--quick] [--messages N] \
//!     [--brokers memory,kafka-mock,kafka,amqp,nats] [--write]
//! ```
//!
//! Exits non-zero when a guarded run loses a message or handles one twice
//! (handled + dead-lettered must equal produced), or a broker cannot be used.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use elevate_cedar::CedarPdp;
use elevate_core::ctxref::{ContextRefMinter, ContextRefVerifier, VerifyPolicy};
use elevate_core::deadletter::DeadLetter;
use elevate_core::decision::FileSink;
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::memory::MemoryBroker;
use elevate_core::pdp::PolicyDecisionPoint;
use elevate_core::pdp_cache::CachingPdp;
use elevate_core::producer::{ProducerGuard, PublishRequest, SubjectContext};
use elevate_core::scope::Scope;
use elevate_core::settle::{DeadLetterPublisher, Processor, TransportError};
use elevate_core::token::TokenSource;
use elevate_core::token_cache::CachingTokenSource;
use elevate_core::{
    AuthContext, FixedAction, Guard, Headers, InboundMessage, OutboundMessage, SubjectKind,
    handler_fn,
};
use elevate_examples::remote_pdp::{self, RemotePdp};
use elevate_tts::{InProcessTts, Issuer, IssuerSettings, RunningTts};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Semaphore, oneshot};
use txn_token_client::{TtsClient, TtsClientConfig};

const TRUST_DOMAIN: &str = "elevate.example";
const PRODUCER: &str = "spiffe://elevate.example/orders-api";
const CONSUMER: &str = "spiffe://elevate.example/test-worker";
const ACTION: &str = "test.process";
const SUBJECT: &str = "carol";
/// Header: the message's sequence number in its row.
const H_SEQ: &str = "x-bench-seq";
/// Header: publish time, microseconds since the epoch (set just before the send).
const H_TS: &str = "x-bench-ts";
/// Messages per origin transaction in the repeated-context scenario.
const PER_CONTEXT: usize = 100;

type BenchResult<T> = Result<T, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BrokerKind {
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
    fn name(self) -> &'static str {
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
struct Args {
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
    /// Write the results file even in --quick mode.
    #[arg(long)]
    write: bool,
    /// Where the results go.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    output: PathBuf,
    /// Messages in flight per consumer (raw and guarded alike).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Kafka bootstrap servers of the real broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    kafka_bootstrap: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// NATS URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
}

// ---------------------------------------------------------------- scenarios

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contexts {
    /// 100 messages per origin transaction: one Txn-Token serves them all.
    Repeated,
    /// Every message its own origin transaction: one token exchange each.
    Distinct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TtsMode {
    InProcess,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PdpMode {
    /// The embedded Cedar PDP.
    Local,
    /// The status quo: an AuthZEN call over HTTP per message.
    Remote,
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    contexts: Contexts,
    tts: TtsMode,
    pdp: PdpMode,
}

impl Scenario {
    fn label(&self) -> String {
        let ctx = match self.contexts {
            Contexts::Repeated => "repeated ctx",
            Contexts::Distinct => "distinct ctx",
        };
        let tts = match self.tts {
            TtsMode::InProcess => "TTS in-process",
            TtsMode::Http => "TTS HTTP",
        };
        match self.pdp {
            PdpMode::Local => format!("{ctx}, {tts}"),
            PdpMode::Remote => format!("baseline: remote PDP (HTTP), {ctx}, {tts}"),
        }
    }
}

fn scenarios(quick: bool, broker: BrokerKind) -> Vec<Scenario> {
    let s = |contexts, tts, pdp| Scenario { contexts, tts, pdp };
    use Contexts::*;
    use PdpMode::*;
    use TtsMode::*;
    if quick {
        let mut v = vec![s(Repeated, InProcess, Local), s(Distinct, Http, Local)];
        if broker == BrokerKind::Memory {
            v.push(s(Repeated, InProcess, Remote));
        }
        v
    } else {
        vec![
            s(Repeated, InProcess, Local),
            s(Repeated, Http, Local),
            s(Distinct, InProcess, Local),
            s(Distinct, Http, Local),
            s(Repeated, InProcess, Remote),
        ]
    }
}

// ---------------------------------------------------------------- measuring

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// CPU time (user + system) of the whole process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes a plain C struct we own; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What one consumer (raw or guarded) saw.
#[derive(Default)]
struct Tally {
    /// Messages of the throughput phase (seq < n).
    n: usize,
    seen: Mutex<HashSet<u64>>,
    in_phase: AtomicUsize,
    handled: AtomicUsize,
    dead: AtomicUsize,
    duplicates: AtomicUsize,
    malformed: AtomicUsize,
    first: Mutex<Option<Instant>>,
    done: Mutex<Option<Instant>>,
    latencies_us: Mutex<Vec<u64>>,
}

impl Tally {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Tally {
            n,
            ..Default::default()
        })
    }

    /// Records one message by its headers (from the handler, or a dead letter).
    fn mark(&self, headers: &Headers, dead: bool) {
        let now = Instant::now();
        let at_us = now_us();
        let seq = headers.get_str(H_SEQ).and_then(|s| s.parse::<u64>().ok());
        let ts = headers.get_str(H_TS).and_then(|s| s.parse::<u64>().ok());
        let Some(seq) = seq else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !self.seen.lock().insert(seq) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if dead {
            self.dead.fetch_add(1, Ordering::Relaxed);
        } else {
            self.handled.fetch_add(1, Ordering::Relaxed);
        }
        if (seq as usize) < self.n {
            self.first.lock().get_or_insert(now);
            if self.in_phase.fetch_add(1, Ordering::Relaxed) + 1 == self.n {
                *self.done.lock() = Some(now);
            }
        } else if let Some(ts) = ts {
            self.latencies_us.lock().push(at_us.saturating_sub(ts));
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().len()
    }

    fn throughput(&self) -> Option<f64> {
        let first = (*self.first.lock())?;
        let done = (*self.done.lock())?;
        let secs = done.duration_since(first).as_secs_f64();
        if self.n <= 1 || secs <= 0.0 {
            return None;
        }
        Some((self.n - 1) as f64 / secs)
    }

    fn percentile(&self, p: f64) -> Option<f64> {
        let mut v = self.latencies_us.lock().clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(idx.min(v.len() - 1)).map(|x| *x as f64)
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// Counts dead letters (by the original message's headers), then publishes them.
struct CountingDeadLetters {
    inner: Arc<dyn DeadLetterPublisher>,
    tally: Arc<Tally>,
}

#[async_trait::async_trait]
impl DeadLetterPublisher for CountingDeadLetters {
    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError> {
        self.inner.publish(letter).await?;
        self.tally.mark(&letter.headers, true);
        Ok(())
    }
}

/// A consumer running in the background until stopped.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn spawn<F>(f: impl FnOnce(oneshot::Receiver<()>) -> F) -> Running
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Running {
            stop: Some(stop),
            task: tokio::spawn(f(stopped)),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

async fn stopped(rx: oneshot::Receiver<()>) {
    let _ = rx.await;
}

// ---------------------------------------------------------------- environment

/// Keys, the TTS (in process and over HTTP), the PDPs, the producer guard.
struct Env {
    pdp: Arc<CedarPdp>,
    producer: ProducerGuard,
    consumer_key: SigningKey,
    producer_keys: KeySet,
    issuer: Arc<Issuer>,
    tts_endpoint: String,
    _tts: RunningTts,
    remote_pdp_url: String,
    log: Arc<FileSink>,
    log_path: PathBuf,
}

impl Env {
    async fn start() -> BenchResult<Env> {
        let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let pdp = Arc::new(CedarPdp::load_dir(&bundle).map_err(|e| e.to_string())?);
        let producer_key = SigningKey::generate(SigningAlg::ES256, "orders-api-bench")
            .map_err(|e| e.to_string())?;
        let consumer_key = SigningKey::generate(SigningAlg::EdDSA, "test-worker-bench")
            .map_err(|e| e.to_string())?;
        let issuer = Issuer::generate(
            IssuerSettings::new(TRUST_DOMAIN).with_token_lifetime(Duration::from_secs(300)),
        )
        .map_err(|e| e.to_string())?;
        let scope = Scope::parse(ACTION);
        issuer
            .register_workload(PRODUCER, producer_key.public_jwk(), &scope)
            .map_err(|e| e.to_string())?;
        issuer
            .register_workload(CONSUMER, consumer_key.public_jwk(), &scope)
            .map_err(|e| e.to_string())?;
        let tts = RunningTts::start(issuer.clone(), SocketAddr::from(([127, 0, 0, 1], 0)), false)
            .await
            .map_err(|e| format!("TTS on loopback: {e}"))?;
        let tts_endpoint = format!("http://{}{}", tts.addr(), issuer.settings().token_path);
        let (pdp_addr, _task) =
            remote_pdp::serve(pdp.clone(), SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| format!("remote PDP on loopback: {e}"))?;
        let mut producer_keys = KeySet::new();
        producer_keys
            .insert_workload_key(PRODUCER, &producer_key)
            .map_err(|e| e.to_string())?;
        let producer = ProducerGuard::new(
            ContextRefMinter::new(PRODUCER, producer_key, Duration::from_secs(3600)),
            pdp.clone(),
        );
        let log_path = std::env::temp_dir().join(format!(
            "elevate-bench-decisions-{}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&log_path);
        let log = Arc::new(FileSink::open(&log_path).map_err(|e| e.to_string())?);
        Ok(Env {
            pdp,
            producer,
            consumer_key,
            producer_keys,
            issuer,
            tts_endpoint,
            _tts: tts,
            remote_pdp_url: format!("http://{pdp_addr}"),
            log,
            log_path,
        })
    }

    /// The guarded side of one row: a fresh token cache, the TTS and PDP the scenario names,
    /// the decision log on disk, and a handler that tallies.
    fn processor(
        &self,
        sc: Scenario,
        tally: &Arc<Tally>,
        dead_letters: Arc<dyn DeadLetterPublisher>,
    ) -> BenchResult<Arc<Processor>> {
        let inner: Arc<dyn TokenSource> = match sc.tts {
            TtsMode::InProcess => Arc::new(InProcessTts::new(
                self.issuer.clone(),
                CONSUMER,
                self.consumer_key.clone(),
            )),
            TtsMode::Http => {
                let cfg = TtsClientConfig::new(self.tts_endpoint.clone(), TRUST_DOMAIN, CONSUMER);
                Arc::new(TtsClient::new(cfg, self.consumer_key.clone()).map_err(|e| e.to_string())?)
            }
        };
        let tokens: Arc<dyn TokenSource> = Arc::new(CachingTokenSource::new(
            inner,
            10_000,
            Duration::from_secs(30),
        ));
        let pdp: Arc<dyn PolicyDecisionPoint> = match sc.pdp {
            // The embedded Cedar PDP behind its per-version answer cache
            // (elevate_core::pdp_cache): one context's messages ask the same two questions.
            PdpMode::Local => Arc::new(CachingPdp::new(self.pdp.clone(), 10_000)),
            PdpMode::Remote => Arc::new(
                RemotePdp::new(&self.remote_pdp_url, self.pdp.version())
                    .map_err(|e| e.to_string())?,
            ),
        };
        let guard = Guard::new(
            CONSUMER,
            ContextRefVerifier::new(self.producer_keys.clone(), VerifyPolicy::new(CONSUMER)),
            tokens,
            pdp,
            self.log.clone(),
            Arc::new(FixedAction::new(ACTION, "Destination")),
        );
        let t = tally.clone();
        let handler = handler_fn(move |msg: InboundMessage, _auth: AuthContext| {
            let t = t.clone();
            async move {
                t.mark(&msg.headers, false);
                Ok(())
            }
        });
        let dead_letters = Arc::new(CountingDeadLetters {
            inner: dead_letters,
            tally: tally.clone(),
        });
        Ok(Arc::new(Processor::new(
            Arc::new(guard),
            Arc::new(handler),
            dead_letters,
        )))
    }

    /// Prepares `n` messages (producer PDP check, stripping, a signed reference) starting at `seq0`.
    async fn prepare(
        &self,
        sc: Scenario,
        destination: &str,
        seq0: usize,
        n: usize,
    ) -> BenchResult<Vec<(Headers, Vec<u8>)>> {
        let audience = [CONSUMER.to_string()];
        let mut subject = self.subject();
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let seq = seq0 + i;
            let new_context = match sc.contexts {
                Contexts::Repeated => i % PER_CONTEXT == 0,
                Contexts::Distinct => true,
            };
            if new_context && i > 0 {
                subject = self.subject();
            }
            let mut headers = Headers::new();
            headers.append(H_SEQ, seq.to_string());
            headers.append("content-type", "application/json");
            headers.append(
                "traceparent",
                format!("00-{}-00f067aa0ba902b7-01", uuid::Uuid::new_v4().simple()),
            );
            let payload = serde_json::to_vec(&serde_json::json!({
                "order": seq, "amount": 120 + (seq % 50), "currency": "EUR",
                "lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}]
            }))
            .map_err(|e| e.to_string())?;
            let prepared = self
                .producer
                .prepare(
                    &PublishRequest {
                        subject: &subject,
                        action: ACTION,
                        audience: &audience,
                        destination,
                        scope: None,
                    },
                    OutboundMessage { headers, payload },
                )
                .await
                .map_err(|e| format!("prepare: {e}"))?;
            out.push((prepared.headers, prepared.payload));
        }
        Ok(out)
    }

    fn subject(&self) -> SubjectContext {
        SubjectContext {
            subject: SUBJECT.to_string(),
            sub_kind: SubjectKind::Human,
            txn: uuid::Uuid::now_v7().to_string(),
            scope: Scope::parse(ACTION),
        }
    }
}

fn stamp(headers: &Headers) -> Headers {
    let mut h = headers.clone();
    h.insert(H_TS, now_us().to_string());
    h
}

// ---------------------------------------------------------------- brokers

/// One row's broker resources.
#[derive(Debug, Clone)]
struct Endpoint {
    /// The destination references are bound to.
    destination: String,
    /// Topic / queue / stream names (broker-specific meaning).
    raw: String,
    guarded: String,
    dlq: String,
}

#[async_trait::async_trait]
trait Broker: Send + Sync {
    /// Creates the row's topic/queues/stream.
    async fn setup(&self, row: usize) -> BenchResult<Endpoint>;
    /// Publishes every message so that the raw and the guarded consumer both get it;
    /// stamps `x-bench-ts` just before each send; waits for the broker's confirmations.
    async fn publish(&self, ep: &Endpoint, msgs: &[(Headers, Vec<u8>)]) -> BenchResult<()>;
    /// Starts the plain consumer.
    async fn spawn_raw(
        &self,
        ep: &Endpoint,
        tally: Arc<Tally>,
        concurrency: usize,
    ) -> BenchResult<Running>;
    /// Starts the guarded consumer; `make` builds the processor around the broker's dead-letter publisher.
    async fn spawn_guarded(
        &self,
        ep: &Endpoint,
        make: &(dyn Fn(Arc<dyn DeadLetterPublisher>) -> BenchResult<Arc<Processor>> + Sync),
        concurrency: usize,
    ) -> BenchResult<Running>;
    /// Removes what `setup` created (best effort).
    async fn teardown(&self, _ep: &Endpoint) {}
}

// --- memory

struct MemoryBench {
    broker: MemoryBroker,
}

#[async_trait::async_trait]
impl Broker for MemoryBench {
    async fn setup(&self, row: usize) -> BenchResult<Endpoint> {
        Ok(Endpoint {
            destination: format!("bench-{row}"),
            raw: format!("bench-{row}.raw"),
            guarded: format!("bench-{row}"),
            dlq: format!("bench-{row}.dlq"),
        })
    }

    async fn publish(&self, ep: &Endpoint, msgs: &[(Headers, Vec<u8>)]) -> BenchResult<()> {
        for (h, p) in msgs {
            let h = stamp(h);
            self.broker.publish(&ep.raw, h.clone(), p.clone());
            self.broker.publish(&ep.guarded, h, p.clone());
        }
        Ok(())
    }

    async fn spawn_raw(&self, ep: &Endpoint, tally: Arc<Tally>, _: usize) -> BenchResult<Running> {
        let broker = self.broker.clone();
        let queue = ep.raw.clone();
        Ok(Running::spawn(|stop| async move {
            let stop = stopped(stop);
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    d = broker.receive(&queue, Duration::from_millis(100)) => {
                        if let Some(d) = d {
                            use elevate_core::settle::Delivery;
                            tally.mark(&d.message().headers, false);
                            let _ = d.ack().await;
                        }
                    }
                }
            }
        }))
    }

    async fn spawn_guarded(
        &self,
        ep: &Endpoint,
        make: &(dyn Fn(Arc<dyn DeadLetterPublisher>) -> BenchResult<Arc<Processor>> + Sync),
        concurrency: usize,
    ) -> BenchResult<Running> {
        let processor = make(Arc::new(self.broker.dead_letter_queue(&ep.dlq)))?;
        let broker = self.broker.clone();
        let queue = ep.guarded.clone();
        let slots = Arc::new(Semaphore::new(concurrency));
        Ok(Running::spawn(|stop| async move {
            let stop = stopped(stop);
            tokio::pin!(stop);
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                tokio::select! {
                    _ = &mut stop => return,
                    d = broker.receive(&queue, Duration::from_millis(100)) => {
                        if let Some(d) = d {
                            let p = processor.clone();
                            tokio::spawn(async move {
                                let _permit = permit;
                                if let Err(e) = p.process(d).await {
                                    tracing::warn!(error = %e, "unsettled");
                                }
                            });
                        }
                    }
                }
            }
        }))
    }
}

// --- kafka (mock cluster or real broker)

mod kafka {
    use super::*;
    use elevate_kafka::headers::{from_kafka, to_kafka};
    use elevate_kafka::{EmbeddedKafka, GuardedConsumer, KafkaDeadLetters};
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    /// Partitions per topic: the guarded consumer works one record per partition at a time.
    pub const PARTITIONS: i32 = 8;

    pub struct KafkaBench {
        pub bootstrap: String,
        // (fields drop in order: the producer goes before the mock cluster it talks to)
        pub producer: FutureProducer,
        pub embedded: Option<EmbeddedKafka>,
        pub run_id: String,
    }

    fn kerr(e: impl std::fmt::Display) -> String {
        format!("kafka: {e}")
    }

    impl KafkaBench {
        pub fn mock() -> BenchResult<Self> {
            let embedded = EmbeddedKafka::start(1).map_err(kerr)?;
            let bootstrap = embedded.bootstrap_servers().to_string();
            Self::new(bootstrap, Some(embedded))
        }

        pub fn real(bootstrap: &str) -> BenchResult<Self> {
            use std::net::ToSocketAddrs;
            let first = bootstrap.split(',').next().unwrap_or_default();
            let reachable = first
                .to_socket_addrs()
                .map(|mut a| {
                    a.any(|a| {
                        std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
                    })
                })
                .unwrap_or(false);
            if !reachable {
                return Err(format!(
                    "no Kafka broker at {bootstrap} (KAFKA_BOOTSTRAP): start one with `scripts/kafka-up`"
                ));
            }
            Self::new(bootstrap.to_string(), None)
        }

        fn new(bootstrap: String, embedded: Option<EmbeddedKafka>) -> BenchResult<Self> {
            let mut config = Self::config_for(&bootstrap);
            config
                .set("message.timeout.ms", "30000")
                .set("acks", "all")
                .set("linger.ms", "1");
            if embedded.is_none() {
                // One record per batch on the real broker: tansu 0.6 serves a fetch that
                // starts inside a stored multi-record batch from the *next* batch, so
                // the rest of that batch is lost to a consumer that refetches mid-batch
                // (the guarded consumer does after every pause/resume). See kafka/README.md.
                config.set("batch.num.messages", "1");
            }
            let producer = config.create().map_err(kerr)?;
            Ok(KafkaBench {
                bootstrap,
                embedded,
                producer,
                run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            })
        }

        fn config_for(bootstrap: &str) -> ClientConfig {
            let mut c = ClientConfig::new();
            c.set("bootstrap.servers", bootstrap)
                .set("topic.metadata.refresh.interval.ms", "1000");
            c
        }

        fn consumer_config(&self, group: &str) -> ClientConfig {
            let mut c = Self::config_for(&self.bootstrap);
            c.set("group.id", group)
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "true")
                .set("auto.commit.interval.ms", "500")
                .set("session.timeout.ms", "6000")
                .set("heartbeat.interval.ms", "500")
                .set("fetch.wait.max.ms", "10");
            c
        }

        async fn create_topic(&self, topic: &str, partitions: i32) -> BenchResult<()> {
            if let Some(e) = &self.embedded {
                return e.create_topic(topic, partitions).map_err(kerr);
            }
            let admin: AdminClient<DefaultClientContext> =
                Self::config_for(&self.bootstrap).create().map_err(kerr)?;
            let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
            let results = admin
                .create_topics(
                    [&new],
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
                )
                .await
                .map_err(kerr)?;
            for r in results {
                match r {
                    Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, code)) => return Err(format!("create topic {t}: {code}")),
                }
            }
            let probe: StreamConsumer = Self::config_for(&self.bootstrap)
                .set("group.id", "elevate-bench-probe")
                .create()
                .map_err(kerr)?;
            for _ in 0..100 {
                if let Ok(md) = probe.fetch_metadata(Some(topic), Duration::from_secs(2))
                    && md.topics().iter().any(|t| {
                        t.name() == topic
                            && t.error().is_none()
                            && t.partitions().len() == partitions as usize
                    })
                {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(format!("topic {topic} not visible in metadata"))
        }

        async fn wait_assigned(consumer: &StreamConsumer, what: &str) -> BenchResult<()> {
            let deadline = Instant::now() + Duration::from_secs(60);
            while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
                if Instant::now() > deadline {
                    return Err(format!("{what}: no partitions assigned within 60 s"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl Broker for KafkaBench {
        async fn setup(&self, row: usize) -> BenchResult<Endpoint> {
            let topic = format!("elevate-bench-{}-{row}", self.run_id);
            self.create_topic(&topic, PARTITIONS).await?;
            let dlq = format!("{topic}.dlq");
            self.create_topic(&dlq, 1).await?;
            Ok(Endpoint {
                destination: topic.clone(),
                raw: format!("bench-raw-{}-{row}", self.run_id),
                guarded: format!("bench-guarded-{}-{row}", self.run_id),
                dlq,
            })
        }

        async fn publish(&self, ep: &Endpoint, msgs: &[(Headers, Vec<u8>)]) -> BenchResult<()> {
            for chunk in msgs.chunks(500) {
                let sends = chunk.iter().map(|(h, p)| {
                    let headers = to_kafka(&stamp(h));
                    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&ep.destination)
                        .payload(p.as_slice())
                        .headers(headers);
                    self.producer.send(record, Duration::from_secs(10))
                });
                for r in futures::future::join_all(sends).await {
                    r.map_err(|(e, _)| kerr(e))?;
                }
            }
            Ok(())
        }

        async fn spawn_raw(
            &self,
            ep: &Endpoint,
            tally: Arc<Tally>,
            _: usize,
        ) -> BenchResult<Running> {
            let consumer: StreamConsumer = self.consumer_config(&ep.raw).create().map_err(kerr)?;
            consumer.subscribe(&[&ep.destination]).map_err(kerr)?;
            let consumer = Arc::new(consumer);
            let c = consumer.clone();
            let running = Running::spawn(|stop| async move {
                let stop = stopped(stop);
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        _ = &mut stop => return,
                        m = c.recv() => match m {
                            Ok(m) => tally.mark(&from_kafka(m.headers()), false),
                            Err(e) => tracing::warn!(error = %e, "raw consumer"),
                        }
                    }
                }
            });
            Self::wait_assigned(&consumer, "raw consumer").await?;
            Ok(running)
        }

        async fn spawn_guarded(
            &self,
            ep: &Endpoint,
            make: &(dyn Fn(Arc<dyn DeadLetterPublisher>) -> BenchResult<Arc<Processor>> + Sync),
            concurrency: usize,
        ) -> BenchResult<Running> {
            let dead_letters = KafkaDeadLetters::from_config(&Self::config_for(&self.bootstrap))
                .map_err(kerr)?
                .to_topic(&ep.dlq);
            let processor = make(Arc::new(dead_letters))?;
            let guarded = GuardedConsumer::from_config(
                self.consumer_config(&ep.guarded)
                    .set("enable.auto.offset.store", "false"),
                processor,
            )
            .map_err(kerr)?
            .concurrency(concurrency);
            guarded
                .consumer()
                .subscribe(&[&ep.destination])
                .map_err(kerr)?;
            let watch = guarded.consumer().clone();
            let running = Running::spawn(|stop| async move {
                if let Err(e) = guarded.run(stopped(stop)).await {
                    tracing::error!(error = %e, "guarded consumer ended");
                }
            });
            Self::wait_assigned(&watch, "guarded consumer").await?;
            Ok(running)
        }

        async fn teardown(&self, ep: &Endpoint) {
            if self.embedded.is_some() {
                return;
            }
            if let Ok(admin) =
                Self::config_for(&self.bootstrap).create::<AdminClient<DefaultClientContext>>()
            {
                let _ = admin
                    .delete_topics(&[&ep.destination, &ep.dlq], &AdminOptions::new())
                    .await;
            }
        }
    }
}

// --- amqp

mod amqp {
    use super::*;
    use elevate_amqp::{AmqpDeadLetters, ConfirmChannel, GuardedConsumer, headers};
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

    const ROUTING_KEY: &str = "bench";

    pub struct AmqpBench {
        conn: Connection,
        admin: Channel,
        publish: Channel,
        user: Option<String>,
    }

    fn aerr(e: impl std::fmt::Display) -> String {
        format!("amqp: {e}")
    }

    fn queue_args() -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        t
    }

    impl AmqpBench {
        pub async fn connect(url: &str) -> BenchResult<Self> {
            let props =
                ConnectionProperties::default().with_connection_name("elevate-bench".into());
            let conn = tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props))
                .await
                .map_err(|_| format!("RabbitMQ at {url} (AMQP_URL) did not answer: start it with `rabbitmq-server -detached`"))?
                .map_err(|e| format!("cannot connect to RabbitMQ at {url} (AMQP_URL): {e}"))?;
            let admin = conn.create_channel().await.map_err(aerr)?;
            let publish = conn.create_channel().await.map_err(aerr)?;
            publish
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(aerr)?;
            Ok(AmqpBench {
                conn,
                admin,
                publish,
                user: elevate_amqp::uri_user(url),
            })
        }
    }

    #[async_trait::async_trait]
    impl Broker for AmqpBench {
        async fn setup(&self, row: usize) -> BenchResult<Endpoint> {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let exchange = format!("elevate.bench.{id}");
            self.admin
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(aerr)?;
            let guarded = elevate_amqp::declare_queue_set(
                &self.admin,
                &format!("elevate-bench-{row}-{id}"),
                queue_args(),
                queue_args(),
            )
            .await
            .map_err(aerr)?;
            let raw = format!("elevate-bench-{row}-{id}.raw");
            self.admin
                .queue_declare(
                    raw.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    queue_args(),
                )
                .await
                .map_err(aerr)?;
            for q in [&guarded.work, &raw] {
                self.admin
                    .queue_bind(
                        q.as_str().into(),
                        exchange.as_str().into(),
                        ROUTING_KEY.into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(aerr)?;
            }
            Ok(Endpoint {
                destination: elevate_amqp::destination(&exchange, ROUTING_KEY),
                raw,
                guarded: guarded.work,
                dlq: guarded.dead_letter,
            })
        }

        async fn publish(&self, ep: &Endpoint, msgs: &[(Headers, Vec<u8>)]) -> BenchResult<()> {
            let (exchange, rk) = ep
                .destination
                .split_once('/')
                .unwrap_or(("", &ep.destination));
            for chunk in msgs.chunks(500) {
                let mut confirms = Vec::with_capacity(chunk.len());
                for (h, p) in chunk {
                    let table = headers::encode(&stamp(h)).map_err(aerr)?;
                    let props = BasicProperties::default()
                        .with_headers(table)
                        .with_delivery_mode(2)
                        .with_message_id(uuid::Uuid::new_v4().to_string().into())
                        .with_timestamp(now_us() / 1_000_000);
                    confirms.push(
                        self.publish
                            .basic_publish(
                                exchange.into(),
                                rk.into(),
                                BasicPublishOptions {
                                    mandatory: true,
                                    immediate: false,
                                },
                                p,
                                props,
                            )
                            .await
                            .map_err(aerr)?,
                    );
                }
                for c in confirms {
                    match c.await.map_err(aerr)? {
                        lapin::Confirmation::Ack(None) => {}
                        other => return Err(format!("amqp: publish not confirmed: {other:?}")),
                    }
                }
            }
            Ok(())
        }

        async fn spawn_raw(
            &self,
            ep: &Endpoint,
            tally: Arc<Tally>,
            concurrency: usize,
        ) -> BenchResult<Running> {
            let ch = self.conn.create_channel().await.map_err(aerr)?;
            ch.basic_qos(concurrency as u16, BasicQosOptions::default())
                .await
                .map_err(aerr)?;
            let consumer = ch
                .basic_consume(
                    ep.raw.as_str().into(),
                    "bench-raw".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(aerr)?;
            Ok(Running::spawn(|stop| async move {
                let work = consumer.for_each_concurrent(concurrency, |d| {
                    let tally = tally.clone();
                    async move {
                        if let Ok(d) = d {
                            tally.mark(&headers::decode(d.properties.headers().as_ref()), false);
                            let _ = d.acker.ack(BasicAckOptions::default()).await;
                        }
                    }
                });
                tokio::select! {
                    _ = stopped(stop) => {}
                    _ = work => {}
                }
                let _ = ch.close(200, "bye".into()).await;
            }))
        }

        async fn spawn_guarded(
            &self,
            ep: &Endpoint,
            make: &(dyn Fn(Arc<dyn DeadLetterPublisher>) -> BenchResult<Arc<Processor>> + Sync),
            concurrency: usize,
        ) -> BenchResult<Running> {
            let confirms = ConfirmChannel::new(self.conn.create_channel().await.map_err(aerr)?)
                .await
                .map_err(aerr)?;
            let dead_letters = AmqpDeadLetters::with_confirm_channel(confirms.clone(), "", &ep.dlq);
            let processor = make(Arc::new(dead_letters))?;
            let ch = self.conn.create_channel().await.map_err(aerr)?;
            ch.basic_qos(concurrency as u16, BasicQosOptions::default())
                .await
                .map_err(aerr)?;
            let consumer = ch
                .basic_consume(
                    ep.guarded.as_str().into(),
                    "bench-guarded".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(aerr)?;
            let mut guarded =
                GuardedConsumer::new(consumer, processor, confirms).concurrency(concurrency);
            if let Some(user) = &self.user {
                guarded = guarded.retry_user(user.clone());
            }
            Ok(Running::spawn(|stop| async move {
                if let Err(e) = guarded.run(stopped(stop)).await {
                    tracing::error!(error = %e, "guarded consumer ended");
                }
                let _ = ch.close(200, "bye".into()).await;
            }))
        }

        async fn teardown(&self, ep: &Endpoint) {
            for q in [
                &ep.raw,
                &ep.guarded,
                &ep.dlq,
                &elevate_amqp::retry_queue_name(&ep.guarded),
            ] {
                let _ = self
                    .admin
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
    }
}

// --- nats

mod nats {
    use super::*;
    use async_nats::jetstream::{self, consumer, stream};
    use elevate_nats::{GuardedConsumer, NatsDeadLetters, from_nats_headers, to_nats_headers};

    pub struct NatsBench {
        js: jetstream::Context,
        run_id: String,
    }

    fn nerr(e: impl std::fmt::Display) -> String {
        format!("nats: {e}")
    }

    impl NatsBench {
        pub async fn connect(url: &str) -> BenchResult<Self> {
            let opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(3));
            let client = tokio::time::timeout(Duration::from_secs(5), opts.connect(url))
                .await
                .map_err(|_| format!("no NATS server at {url} (NATS_URL)"))?
                .map_err(|e| format!("cannot connect to NATS at {url} (NATS_URL): {e}"))?;
            Ok(NatsBench {
                js: jetstream::new(client),
                run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_uppercase(),
            })
        }

        async fn consumer(&self, stream: &str, name: &str) -> BenchResult<consumer::PullConsumer> {
            let s = self.js.get_stream(stream).await.map_err(nerr)?;
            s.get_or_create_consumer(
                name,
                consumer::pull::Config {
                    durable_name: Some(name.to_string()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_deliver: -1,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(nerr)
        }
    }

    #[async_trait::async_trait]
    impl Broker for NatsBench {
        async fn setup(&self, row: usize) -> BenchResult<Endpoint> {
            let name = format!("ELVT_BENCH_{}_{row}", self.run_id);
            let subject = format!("bench.{}.{row}", self.run_id);
            let dlq_subject = format!("benchdlq.{}.{row}", self.run_id);
            for (n, s) in [
                (name.clone(), subject.clone()),
                (format!("{name}_DLQ"), dlq_subject.clone()),
            ] {
                self.js
                    .create_stream(stream::Config {
                        name: n,
                        subjects: vec![s],
                        storage: stream::StorageType::Memory,
                        ..Default::default()
                    })
                    .await
                    .map_err(nerr)?;
            }
            Ok(Endpoint {
                destination: subject,
                raw: name.clone(),
                guarded: name,
                dlq: dlq_subject,
            })
        }

        async fn publish(&self, ep: &Endpoint, msgs: &[(Headers, Vec<u8>)]) -> BenchResult<()> {
            for chunk in msgs.chunks(500) {
                let mut acks = Vec::with_capacity(chunk.len());
                for (h, p) in chunk {
                    let headers = to_nats_headers(&stamp(h)).map_err(nerr)?;
                    acks.push(
                        self.js
                            .publish_with_headers(
                                ep.destination.clone(),
                                headers,
                                bytes::Bytes::from(p.clone()),
                            )
                            .await
                            .map_err(nerr)?,
                    );
                }
                for a in acks {
                    a.await.map_err(nerr)?;
                }
            }
            Ok(())
        }

        async fn spawn_raw(
            &self,
            ep: &Endpoint,
            tally: Arc<Tally>,
            concurrency: usize,
        ) -> BenchResult<Running> {
            let consumer = self.consumer(&ep.raw, "raw").await?;
            let messages = consumer.messages().await.map_err(nerr)?;
            Ok(Running::spawn(|stop| async move {
                let work = messages.for_each_concurrent(concurrency, |m| {
                    let tally = tally.clone();
                    async move {
                        if let Ok(m) = m {
                            tally.mark(&from_nats_headers(m.headers.as_ref()), false);
                            let _ = m.double_ack().await;
                        }
                    }
                });
                tokio::select! {
                    _ = stopped(stop) => {}
                    _ = work => {}
                }
            }))
        }

        async fn spawn_guarded(
            &self,
            ep: &Endpoint,
            make: &(dyn Fn(Arc<dyn DeadLetterPublisher>) -> BenchResult<Arc<Processor>> + Sync),
            concurrency: usize,
        ) -> BenchResult<Running> {
            let processor = make(Arc::new(NatsDeadLetters::jetstream(
                self.js.clone(),
                &ep.dlq,
            )))?;
            let consumer = self.consumer(&ep.guarded, "guarded").await?;
            let guarded = GuardedConsumer::new(consumer, processor)
                .concurrency(concurrency)
                .fetch_expires(Duration::from_millis(200));
            Ok(Running::spawn(|stop| async move {
                if let Err(e) = guarded.run(stopped(stop)).await {
                    tracing::error!(error = %e, "guarded consumer ended");
                }
            }))
        }

        async fn teardown(&self, ep: &Endpoint) {
            let _ = self.js.delete_stream(&ep.raw).await;
            let _ = self.js.delete_stream(format!("{}_DLQ", ep.raw)).await;
        }
    }
}

// ---------------------------------------------------------------- one row

/// One line of the table.
#[derive(Debug, Clone)]
struct Row {
    broker: &'static str,
    scenario: Scenario,
    raw_rate: Option<f64>,
    guarded_rate: Option<f64>,
    raw_p50: Option<f64>,
    raw_p99: Option<f64>,
    guarded_p50: Option<f64>,
    guarded_p99: Option<f64>,
    raw_cpu_us: f64,
    guarded_cpu_us: f64,
    handled: usize,
    dead: usize,
    duplicates: usize,
    problem: Option<String>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        Some(self.guarded_rate? / self.raw_rate?)
    }
    fn added(&self, p99: bool) -> Option<f64> {
        if p99 {
            Some(self.guarded_p99? - self.raw_p99?)
        } else {
            Some(self.guarded_p50? - self.raw_p50?)
        }
    }
}

struct Plan {
    messages: usize,
    latency_messages: usize,
    latency_interval: Duration,
    concurrency: usize,
}

async fn run_row(
    env: &Env,
    broker: &dyn Broker,
    name: &'static str,
    row: usize,
    sc: Scenario,
    plan: &Plan,
    progress: &Progress,
) -> Row {
    let mut out = Row {
        broker: name,
        scenario: sc,
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
        duplicates: 0,
        problem: None,
    };
    if let Err(e) = run_row_inner(env, broker, row, sc, plan, progress, &mut out).await {
        out.problem = Some(e);
    }
    out
}

async fn run_row_inner(
    env: &Env,
    broker: &dyn Broker,
    row: usize,
    sc: Scenario,
    plan: &Plan,
    progress: &Progress,
    out: &mut Row,
) -> BenchResult<()> {
    let n = plan.messages;
    let l = plan.latency_messages;
    let ep = broker.setup(row).await?;
    progress.step(out.broker, &sc, "producing");
    let msgs = env.prepare(sc, &ep.destination, 0, n).await?;
    let trickle = env.prepare(sc, &ep.destination, n, l).await?;
    broker.publish(&ep, &msgs).await?;
    let budget = Duration::from_secs(30) + Duration::from_millis(n as u64 * 5);

    // raw
    progress.step(out.broker, &sc, "raw");
    let raw = Tally::new(n);
    let cpu0 = cpu_time();
    let raw_run = broker.spawn_raw(&ep, raw.clone(), plan.concurrency).await?;
    let raw_ok = raw.wait_for(n, budget).await;
    out.raw_cpu_us = (cpu_time() - cpu0).as_secs_f64() * 1e6 / n as f64;
    out.raw_rate = raw.throughput();

    // guarded
    progress.step(out.broker, &sc, "guarded");
    let guarded = Tally::new(n);
    let make = |dl: Arc<dyn DeadLetterPublisher>| env.processor(sc, &guarded, dl);
    let cpu0 = cpu_time();
    let guarded_run = broker.spawn_guarded(&ep, &make, plan.concurrency).await?;
    let guarded_ok = guarded.wait_for(n, budget).await;
    out.guarded_cpu_us = (cpu_time() - cpu0).as_secs_f64() * 1e6 / n as f64;
    out.guarded_rate = guarded.throughput();

    // latency: a paced trickle both consumers receive while idle otherwise
    progress.step(out.broker, &sc, "latency");
    let mut tick = tokio::time::interval(plan.latency_interval);
    for m in trickle.chunks(1) {
        tick.tick().await;
        broker.publish(&ep, m).await?;
    }
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
    out.handled = guarded.handled.load(Ordering::Relaxed);
    out.dead = guarded.dead.load(Ordering::Relaxed);
    out.duplicates = guarded.duplicates.load(Ordering::Relaxed);
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
    let malformed = guarded.malformed.load(Ordering::Relaxed);
    if malformed > 0 {
        problems.push(format!("guarded: {malformed} messages without {H_SEQ}"));
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(())
}

// ---------------------------------------------------------------- output

struct Progress {
    on: bool,
    total: usize,
    done: AtomicUsize,
    dirty: AtomicBool,
}

impl Progress {
    fn step(&self, broker: &str, sc: &Scenario, phase: &str) {
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

    fn row_done(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn clear(&self) {
        if self.on && self.dirty.swap(false, Ordering::Relaxed) {
            print!("\r\x1b[2K");
            let _ = std::io::stdout().flush();
        }
    }
}

fn fmt_rate(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.0}")).unwrap_or_else(|| "–".into())
}

fn fmt_ms(us: Option<f64>) -> String {
    us.map(|u| format!("{:.2}", u / 1000.0))
        .unwrap_or_else(|| "–".into())
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| broker | scenario | msgs/s raw | msgs/s guarded | ratio | added p50 (ms) | added p99 (ms) | CPU µs/msg raw | CPU µs/msg guarded |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
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
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} |\n",
            r.broker,
            scenario,
            fmt_rate(r.raw_rate),
            fmt_rate(r.guarded_rate),
            ratio,
            fmt_ms(r.added(false)),
            fmt_ms(r.added(true)),
            r.raw_cpu_us,
            r.guarded_cpu_us,
        ));
    }
    s
}

/// The issue's targets, checked against the rows.
fn targets(rows: &[Row]) -> String {
    let ok = |b: bool| if b { "met" } else { "**missed**" };
    let mut s = String::new();
    let repeated: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.scenario.contexts == Contexts::Repeated
                && r.scenario.pdp == PdpMode::Local
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

fn machine(args: &Args, plan: &Plan, elapsed: Duration) -> String {
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
        if args.quick { "quick" } else { "full" },
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
- **repeated ctx**: 100 messages per origin transaction (one Txn-Token each
  100 messages, never across contexts); **distinct ctx**: a new origin
  transaction per message, so one token exchange per message.
- **baseline**: the status quo, one authorization call per message to a
  remote PDP (AuthZEN `POST /access/v1/evaluations`, axum on loopback, the
  same Cedar bundle) instead of the embedded PDP.
- The machine is shared (2 cores, other builds running): compare rows of the
  same run, not runs.

Regenerate: `cargo run --release -p elevate-examples --bin bench` (full) or
`-- --quick --write`.
"#;

fn render(args: &Args, plan: &Plan, rows: &[Row], elapsed: Duration, extra: &str) -> String {
    format!(
        "# Benchmarks: raw vs guarded\n\n_Generated by `cargo run --release -p elevate-examples --bin bench`; do not edit by hand._\n\n{}\n{}\n## Targets (issue 8)\n\n{}\n{}{}",
        machine(args, plan, elapsed),
        table(rows),
        targets(rows),
        NOTES,
        extra
    )
}

// ---------------------------------------------------------------- main

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

async fn run(args: Args) -> BenchResult<bool> {
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
    };
    let env = Env::start().await?;
    let total: usize = args
        .brokers
        .iter()
        .map(|b| scenarios(args.quick, *b).len())
        .sum();
    let progress = Progress {
        on: std::io::stdout().is_terminal(),
        total,
        done: AtomicUsize::new(0),
        dirty: AtomicBool::new(false),
    };
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
    for kind in &args.brokers {
        let broker: Result<Box<dyn Broker>, String> = match kind {
            BrokerKind::Memory => Ok(Box::new(MemoryBench {
                broker: MemoryBroker::new(),
            })),
            BrokerKind::KafkaMock => {
                kafka::KafkaBench::mock().map(|b| Box::new(b) as Box<dyn Broker>)
            }
            BrokerKind::Kafka => kafka::KafkaBench::real(&args.kafka_bootstrap)
                .map(|b| Box::new(b) as Box<dyn Broker>),
            BrokerKind::Amqp => amqp::AmqpBench::connect(&args.amqp_url)
                .await
                .map(|b| Box::new(b) as Box<dyn Broker>),
            BrokerKind::Nats => nats::NatsBench::connect(&args.nats_url)
                .await
                .map(|b| Box::new(b) as Box<dyn Broker>),
        };
        for sc in scenarios(args.quick, *kind) {
            row_id += 1;
            let row = match &broker {
                Ok(b) => run_row(&env, b.as_ref(), kind.name(), row_id, sc, &plan, &progress).await,
                Err(e) => Row {
                    broker: kind.name(),
                    scenario: sc,
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
                    duplicates: 0,
                    problem: Some(e.clone()),
                },
            };
            progress.row_done();
            progress.clear();
            match &row.problem {
                None => println!(
                    "{:10} {:52} raw {:>6} msgs/s  guarded {:>6} msgs/s  ({} handled, {} dead-lettered)",
                    row.broker,
                    sc.label(),
                    fmt_rate(row.raw_rate),
                    fmt_rate(row.guarded_rate),
                    row.handled,
                    row.dead
                ),
                Some(p) => println!("{:10} {:52} FAILED: {p}", row.broker, sc.label()),
            }
            rows.push(row);
        }
    }
    progress.clear();
    let _ = std::fs::remove_file(&env.log_path);
    let elapsed = started.elapsed();
    println!("\n{}", table(&rows));
    println!("{}", targets(&rows));
    if !args.quick || args.write {
        let extra = std::fs::read_to_string(&args.output)
            .ok()
            .and_then(|old| old.find(MANUAL_MARK).map(|i| old[i..].to_string()))
            .unwrap_or_default();
        let doc = render(&args, &plan, &rows, elapsed, &extra);
        std::fs::write(&args.output, doc)
            .map_err(|e| format!("write {}: {e}", args.output.display()))?;
        println!("wrote {}", args.output.display());
    }
    Ok(rows.iter().all(|r| r.problem.is_none()))
}

/// Everything from this line on in the results file is kept when the harness regenerates it
/// (the profile and optimisation notes written by hand).
const MANUAL_MARK: &str = "<!-- notes kept across regenerations -->";
