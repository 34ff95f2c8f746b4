//! One guarded consumer process for one broker, as a deployment would run
//! it: supervised (`supervise_consumer`, `supervise_worker`, or the JetStream
//! guard with its unreadable-message sweep under core's supervisor), the HTTP
//! TTS client behind a `CachingTokenSource`, the Cedar bundle watched on disk
//! behind a `CachingPdp`, the JSON Lines decision log, and a handler that
//! appends one line per handled message to the handled log.
//!
//! Ends on SIGTERM or SIGINT (finishing the messages in flight); the drills
//! also end it with SIGKILL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use elevate_cedar::CedarPdp;
use elevate_core::ctxref::{ContextRefVerifier, VerifyPolicy};
use elevate_core::decision::FileSink;
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::pdp::PolicyDecisionPoint;
use elevate_core::pdp_cache::CachingPdp;
use elevate_core::retry::RetryPolicy;
use elevate_core::settle::{DeadLetterPublisher, HandlerError, UnboundDeadLetters};
use elevate_core::supervise::{Restartable, RoundShutdown, default_backoff, supervise};
use elevate_core::token::TokenSource;
use elevate_core::token_cache::CachingTokenSource;
use elevate_core::{AuthContext, FixedAction, Guard, InboundMessage, Processor, handler_fn};
use elevate_drills::{BrokerKind, HandledLine, HandledLog, Job, now_ms};
use txn_token_client::{TtsClient, TtsClientConfig};

type AppResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A supervised guarded consumer for the fault drills.
#[derive(Parser, Debug)]
#[command(name = "drill-worker")]
struct Args {
    /// Which broker.
    #[arg(long, value_enum)]
    broker: BrokerKind,
    /// Kafka bootstrap servers, AMQP URI or NATS URL.
    #[arg(long)]
    url: String,
    /// The topic, work queue or JetStream stream to consume.
    #[arg(long)]
    source: String,
    /// Dead letters: Kafka topic, JetStream subject; AMQP uses `<queue>.dlq` (checked).
    #[arg(long)]
    dlq: String,
    /// Kafka group id, JetStream durable consumer name, AMQP connection name.
    #[arg(long)]
    consumer: String,
    /// Kafka static membership: this instance's `group.instance.id`.
    #[arg(long)]
    group_instance_id: Option<String>,
    /// Kafka `session.timeout.ms` (default: librdkafka's, 45 s).
    #[arg(long)]
    session_timeout_ms: Option<u32>,
    /// The TTS token endpoint (`http://127.0.0.1:PORT/token`).
    #[arg(long)]
    tts_url: String,
    /// The trust domain (audience of the exchange).
    #[arg(long, default_value = elevate_drills::TRUST_DOMAIN)]
    trust_domain: String,
    /// This workload's id.
    #[arg(long, default_value = elevate_drills::WORKER)]
    workload: String,
    /// This workload's signing key (PKCS#8 PEM).
    #[arg(long)]
    key: PathBuf,
    /// The key's id (as registered at the TTS).
    #[arg(long)]
    kid: String,
    /// The key's algorithm: ES256 or EdDSA.
    #[arg(long, default_value = "ES256")]
    key_alg: String,
    /// The producer whose references are trusted.
    #[arg(long, default_value = elevate_drills::PRODUCER)]
    trusted_producer: String,
    /// Its public key: a JWK or a JWKS file.
    #[arg(long)]
    trusted_key: PathBuf,
    /// The action every message is checked for.
    #[arg(long, default_value = elevate_drills::ACTION)]
    action: String,
    /// The Cedar bundle directory (reloaded when it changes).
    #[arg(long)]
    bundle: PathBuf,
    /// How often the bundle directory is checked for changes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    bundle_poll: Duration,
    /// The decision log (JSON Lines).
    #[arg(long)]
    decision_log: PathBuf,
    /// The handled log (JSON Lines: message id, decision id, pid, time).
    #[arg(long)]
    handled_log: PathBuf,
    /// Messages in flight (AMQP prefetch, JetStream and Kafka concurrency).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Longest wait between outage retries and gate probes (default: core's, 30 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    retry_max_delay: Option<Duration>,
    /// Time budget of a message through an outage (default: core's, 30 min).
    #[arg(long, value_parser = humantime::parse_duration)]
    outage_budget: Option<Duration>,
    /// Timeout of one TTS request.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    tts_timeout: Duration,
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,elevate::decision=off".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drill-worker: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("drill-worker: {e}");
        std::process::exit(1);
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers: running until killed");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown signal: finishing the messages in flight");
}

async fn run(args: Args) -> AppResult<()> {
    let alg = SigningAlg::parse(&args.key_alg)
        .ok_or_else(|| format!("--key-alg {}: use ES256 or EdDSA", args.key_alg))?;
    let key = SigningKey::from_pem_file(alg, args.kid.clone(), &args.key)?;
    let trusted = elevate_drills::load_trusted_keys(&args.trusted_key, &args.trusted_producer)?;

    let cedar = Arc::new(CedarPdp::load_dir(&args.bundle)?);
    let _watcher = cedar.spawn_watcher(args.bundle_poll);
    let pdp: Arc<dyn PolicyDecisionPoint> = Arc::new(CachingPdp::new(cedar.clone(), 10_000));

    let mut tts = TtsClientConfig::new(&args.tts_url, &args.trust_domain, &args.workload);
    tts.request_timeout = args.tts_timeout;
    let tts: Arc<dyn TokenSource> = Arc::new(TtsClient::new(tts, key)?);
    let tokens: Arc<dyn TokenSource> = Arc::new(CachingTokenSource::new(
        tts,
        10_000,
        Duration::from_secs(10),
    ));

    let sink = Arc::new(FileSink::open(&args.decision_log)?);
    let guard = Guard::new(
        args.workload.clone(),
        ContextRefVerifier::new(trusted, VerifyPolicy::new(args.workload.clone())),
        tokens,
        pdp,
        sink,
        Arc::new(FixedAction::new(args.action.clone(), "Destination")),
    );

    let log = Arc::new(HandledLog::open(&args.handled_log)?);
    let pid = std::process::id();
    let handler = handler_fn(move |msg: InboundMessage, auth: AuthContext| {
        let log = log.clone();
        async move {
            let job = Job::from_payload(&msg.payload)
                .ok_or_else(|| HandlerError::Permanent("the payload is not a drill job".into()))?;
            log.append(&HandledLine {
                id: job.id,
                decision: auth.decision_id().to_string(),
                pid,
                t_ms: now_ms(),
            })
            .map_err(|e| HandlerError::Transient(format!("handled log: {e}")))
        }
    });

    let mut retry = RetryPolicy::default();
    if let Some(d) = args.retry_max_delay {
        retry.max_delay = d;
    }
    if let Some(b) = args.outage_budget {
        retry.max_elapsed = Some(b);
    }
    let placeholder: Arc<dyn DeadLetterPublisher> = Arc::new(UnboundDeadLetters);
    let processor = Processor::new(Arc::new(guard), Arc::new(handler), placeholder)
        .with_retry(retry)
        .with_keep_alive_every(Duration::from_secs(5));
    tracing::info!(broker = %args.broker, source = %args.source, pid, policy = %cedar.version(), "drill worker starting");

    match args.broker {
        BrokerKind::Kafka => run_kafka(&args, processor).await,
        BrokerKind::Amqp => run_amqp(&args, processor).await,
        BrokerKind::Nats => run_nats(&args, processor).await,
    }
}

async fn run_kafka(args: &Args, processor: Processor) -> AppResult<()> {
    use rdkafka::ClientConfig;
    let mut producer = ClientConfig::new();
    producer
        .set("bootstrap.servers", &args.url)
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "1")
        // One record per batch: tansu 0.6 loses the rest of a batch to a fetch that
        // starts inside it (kafka/README.md); the dead-letter topic is read back.
        .set("batch.num.messages", "1");
    let dead_letters = elevate_kafka::KafkaDeadLetters::from_config(&producer)?.to_topic(&args.dlq);
    let processor = Arc::new(processor.with_dead_letters(Arc::new(dead_letters)));
    let mut consumer = ClientConfig::new();
    consumer
        .set("bootstrap.servers", &args.url)
        .set("group.id", &args.consumer)
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "1000");
    if let Some(id) = &args.group_instance_id {
        consumer.set("group.instance.id", id);
    }
    if let Some(ms) = args.session_timeout_ms {
        consumer.set("session.timeout.ms", ms.to_string());
    }
    if let Ok(debug) = std::env::var("DRILL_KAFKA_DEBUG")
        && !debug.is_empty()
    {
        consumer.set("debug", debug);
    }
    elevate_kafka::supervise_consumer(
        consumer,
        vec![args.source.clone()],
        processor,
        args.concurrency,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

async fn run_amqp(args: &Args, processor: Processor) -> AppResult<()> {
    let expected = elevate_amqp::dead_letter_queue_name(&args.source);
    if args.dlq != expected {
        return Err(format!(
            "--dlq {}: the supervised AMQP worker dead-letters to {expected}",
            args.dlq
        )
        .into());
    }
    let mut config = elevate_amqp::WorkerConfig::new(&args.url, &args.source);
    config.prefetch = u16::try_from(args.concurrency).unwrap_or(u16::MAX);
    config.connection_name = args.consumer.clone();
    elevate_amqp::supervise_worker(config, Arc::new(processor), shutdown_signal()).await?;
    Ok(())
}

/// What ends one round of the JetStream worker.
#[derive(Debug)]
enum NatsRound {
    /// Connecting, or finding the stream or the consumer, failed.
    Connect(String),
    /// The guard stopped.
    Guard(elevate_nats::Error),
}

impl std::fmt::Display for NatsRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsRound::Connect(e) => write!(f, "cannot start the consumer: {e}"),
            NatsRound::Guard(e) => write!(f, "{e}"),
        }
    }
}

impl Restartable for NatsRound {
    fn restartable(&self) -> bool {
        !matches!(self, NatsRound::Guard(elevate_nats::Error::Config(_)))
    }
}

/// The JetStream guard under core's supervisor: async-nats reconnects by
/// itself; a round ends only when the client stopped for good (then a new
/// client is connected) or the consumer could not be found.
async fn run_nats(args: &Args, processor: Processor) -> AppResult<()> {
    let processor = Arc::new(processor);
    let what = format!("nats:{}", args.source);
    supervise(&what, default_backoff(), shutdown_signal(), |signal| {
        nats_round(args, processor.clone(), signal)
    })
    .await
    .map_err(|e| e.to_string().into())
}

async fn nats_round(
    args: &Args,
    processor: Arc<Processor>,
    shutdown: RoundShutdown,
) -> Result<(), NatsRound> {
    use async_nats::jetstream;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(&args.url)
        .await
        .map_err(|e| NatsRound::Connect(e.to_string()))?;
    let js = jetstream::new(client);
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(&args.source)
        .await
        .map_err(|e| NatsRound::Connect(format!("stream {}: {e}", args.source)))?
        .get_consumer(&args.consumer)
        .await
        .map_err(|e| NatsRound::Connect(format!("consumer {}: {e}", args.consumer)))?;
    let dead_letters = elevate_nats::NatsDeadLetters::jetstream(js.clone(), &args.dlq);
    let processor = Arc::new(processor.with_dead_letters(Arc::new(dead_letters)));
    tracing::info!(stream = %args.source, consumer = %args.consumer, "NATS worker connected");
    elevate_nats::GuardedConsumer::new(consumer, processor)
        .concurrency(args.concurrency)
        .unreadable(elevate_nats::UnreadableMessages::new(js))
        .run(shutdown)
        .await
        .map_err(NatsRound::Guard)
}
