//! The conformance binding for NATS, on the real server at `NATS_URL`
//! (default `nats://127.0.0.1:4222`, NATS 2.9 with JetStream), in two modes:
//! a guarded JetStream pull consumer, and a guarded core NATS queue subscriber.
//!
//! Every scenario gets its own stream (memory storage) capturing its subject,
//! and a dead-letter stream; in core mode the stream is only the wire tap the
//! scenario reads back, the guard subscribes to the subject directly.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, consumer, stream};
use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_core::settle::Processor;
use elevate_core::{Headers, OutboundMessage};
use elevate_nats::{
    GuardedConsumer, GuardedSubscriber, NatsDeadLetters, NatsPublisher, from_nats_headers,
    to_nats_headers,
};

use crate::binding::{
    BindResult, BrokerBinding, ConsumerHandle, ConsumerOptions, DeadLetterTap, Endpoint,
    InboundLimits, RawHandler, RawMessage,
};

/// Prefix of every stream the tests create (old ones are swept at start).
pub const STREAM_PREFIX: &str = "ELVT_";

/// Which guard the binding runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsMode {
    /// A durable, explicit-ack JetStream pull consumer (at-least-once).
    JetStream,
    /// A core NATS queue subscriber (at-most-once).
    Core,
}

/// One message read back from a stream with a plain client.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    /// Stream sequence.
    pub seq: u64,
    /// Subject it was published to.
    pub subject: String,
    /// The message headers as stored in the stream, to check what was stripped or attached.
    pub headers: Headers,
    /// The message body as stored in the stream.
    pub payload: Vec<u8>,
}

impl From<StreamRecord> for RawMessage {
    fn from(r: StreamRecord) -> Self {
        RawMessage {
            headers: r.headers,
            payload: r.payload,
        }
    }
}

/// How a test consumer is set up.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Messages in flight.
    pub concurrency: usize,
    /// The consumer's `ack_wait` (redelivery after a crash).
    pub ack_wait: Duration,
    /// The consumer's `max_deliver` (-1: unlimited).
    pub max_deliver: i64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 16,
            ack_wait: Duration::from_secs(5),
            max_deliver: -1,
        }
    }
}

/// The NATS fixture.
pub struct NatsBinding {
    mode: NatsMode,
    url: String,
    client: Client,
    js: jetstream::Context,
}

fn nats_err(e: impl std::fmt::Display) -> String {
    format!("nats: {e}")
}

/// The server URL: `NATS_URL`, else the local server, else a container where
/// Docker runs (see [`crate::fixture`]).
pub fn nats_url() -> String {
    crate::fixture::address(crate::fixture::Service::Nats)
}

/// Connects to `url`; panics with how to start the local server if it cannot.
pub async fn connect(url: &str) -> Client {
    try_connect(url).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Connects to `url`.
///
/// # Errors
///
/// Returns how to start the local server if the connection fails or takes over 5 s.
pub async fn try_connect(url: &str) -> BindResult<Client> {
    let how = "start the local NATS server with JetStream: `start-stop-daemon --start --oknodo --background \
               --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log` \
               (or point NATS_URL at a NATS 2.9+ server with JetStream)";
    let opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(3));
    match tokio::time::timeout(Duration::from_secs(5), opts.connect(url)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!(
            "cannot connect to NATS at {url} (NATS_URL): {e}; {how}"
        )),
        Err(_) => Err(format!(
            "no NATS server reachable at {url} (NATS_URL); {how}"
        )),
    }
}

impl NatsBinding {
    /// The JetStream fixture; panics with how to start NATS if unreachable.
    pub async fn jetstream() -> Self {
        Self::new(NatsMode::JetStream).await
    }

    /// The core NATS fixture; panics with how to start NATS if unreachable.
    pub async fn core() -> Self {
        Self::new(NatsMode::Core).await
    }

    async fn new(mode: NatsMode) -> Self {
        Self::connect_to(&nats_url(), mode)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The fixture on the server at `url`, running the guard of `mode`;
    /// test streams older than an hour are deleted first.
    ///
    /// # Errors
    ///
    /// Returns how to start the server if it cannot be reached or has no JetStream.
    pub async fn connect_to(url: &str, mode: NatsMode) -> BindResult<Self> {
        let client = try_connect(url).await?;
        let js = jetstream::new(client.clone());
        // (account info is probed raw: async-nats 0.51 cannot decode NATS 2.9's reply)
        if let Err(e) = client.request("$JS.API.INFO", bytes::Bytes::new()).await {
            return Err(format!(
                "NATS at {url} has no JetStream ({e}): start nats-server with `-js`"
            ));
        }
        let b = NatsBinding {
            mode,
            url: url.to_string(),
            client,
            js,
        };
        b.sweep_old_streams().await;
        Ok(b)
    }

    /// The plain client (also what the guarded publisher wraps).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The JetStream context.
    pub fn js(&self) -> &jetstream::Context {
        &self.js
    }

    /// The server URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A guarded publisher over the plain client.
    pub fn publisher(&self, guard: &ProducerGuard) -> NatsPublisher {
        NatsPublisher::new(self.client.clone(), guard.clone())
    }

    /// Deletes test streams older than an hour (left by earlier runs).
    async fn sweep_old_streams(&self) {
        use futures::StreamExt;
        let mut names = self.js.stream_names();
        let mut old = Vec::new();
        while let Some(Ok(name)) = names.next().await {
            if !name.starts_with(STREAM_PREFIX) {
                continue;
            }
            if let Ok(s) = self.js.get_stream(&name).await {
                let age = s.cached_info().created;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or_default();
                if now - age.unix_timestamp() > 3600 {
                    old.push(name);
                }
            }
        }
        for name in old {
            let _ = self.js.delete_stream(&name).await;
        }
    }

    /// Creates a memory-storage stream capturing `subjects`.
    ///
    /// # Errors
    ///
    /// Returns a message if the server refuses the stream (a name or subject in use by another
    /// stream, JetStream disabled).
    pub async fn create_stream(
        &self,
        name: &str,
        subjects: Vec<String>,
    ) -> BindResult<stream::Stream> {
        self.js
            .create_stream(stream::Config {
                name: name.to_string(),
                subjects,
                storage: stream::StorageType::Memory,
                max_age: Duration::from_secs(3600),
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(nats_err)
    }

    /// Creates (or returns) the durable, explicit-ack pull consumer `durable` on `stream`.
    ///
    /// # Errors
    ///
    /// Returns a message if `stream` does not exist, or the consumer cannot be created (an existing
    /// one with a different configuration).
    pub async fn create_consumer(
        &self,
        stream: &str,
        durable: &str,
        cfg: &WorkerConfig,
    ) -> BindResult<consumer::PullConsumer> {
        self.js
            .get_stream(stream)
            .await
            .map_err(nats_err)?
            .get_or_create_consumer(durable, consumer_config(durable, cfg))
            .await
            .map_err(nats_err)
    }

    /// Starts a guarded JetStream worker on its own connection (so `kill` drops it like a crash).
    ///
    /// # Errors
    ///
    /// Returns a message if `stream` does not exist or the consumer cannot be created. Errors of
    /// the running worker are not returned here.
    pub async fn spawn_jetstream(
        &self,
        stream: &str,
        durable: &str,
        dead_letter_subject: &str,
        processor: Arc<Processor>,
        cfg: &WorkerConfig,
    ) -> BindResult<ConsumerHandle> {
        self.spawn_jetstream_tapped(stream, durable, dead_letter_subject, processor, cfg, None)
            .await
    }

    /// [`NatsBinding::spawn_jetstream`], its dead letters seen by `tap`.
    async fn spawn_jetstream_tapped(
        &self,
        stream: &str,
        durable: &str,
        dead_letter_subject: &str,
        processor: Arc<Processor>,
        cfg: &WorkerConfig,
        tap: Option<DeadLetterTap>,
    ) -> BindResult<ConsumerHandle> {
        let conn = try_connect(&self.url).await?;
        let js = jetstream::new(conn);
        let consumer: consumer::PullConsumer = js
            .get_stream(stream)
            .await
            .map_err(nats_err)?
            .get_or_create_consumer(durable, consumer_config(durable, cfg))
            .await
            .map_err(nats_err)?;
        let dead_letters = NatsDeadLetters::jetstream(js.clone(), dead_letter_subject);
        let dead_letters = tapped(tap).dead_letters(Arc::new(dead_letters));
        let processor = Arc::new(processor.with_dead_letters(dead_letters));
        let guarded = GuardedConsumer::new(consumer, processor)
            .concurrency(cfg.concurrency)
            .fetch_expires(Duration::from_millis(500))
            .unreadable(elevate_nats::unreadable::UnreadableMessages::new(js));
        Ok(spawn(
            move |stopped| async move { guarded.run(stopped).await },
        ))
    }

    /// Starts a guarded core NATS subscriber in queue group `group`, on its own connection.
    ///
    /// # Errors
    ///
    /// Returns a message if the subscription or its flush fails, or the dead-letter target cannot
    /// be chosen (see [`NatsDeadLetters::auto`]).
    pub async fn spawn_core(
        &self,
        subject: &str,
        group: &str,
        dead_letter_subject: &str,
        processor: Arc<Processor>,
        concurrency: usize,
    ) -> BindResult<ConsumerHandle> {
        self.spawn_core_tapped(
            subject,
            group,
            dead_letter_subject,
            processor,
            concurrency,
            None,
        )
        .await
    }

    /// [`NatsBinding::spawn_core`], its dead letters seen by `tap`.
    async fn spawn_core_tapped(
        &self,
        subject: &str,
        group: &str,
        dead_letter_subject: &str,
        processor: Arc<Processor>,
        concurrency: usize,
        tap: Option<DeadLetterTap>,
    ) -> BindResult<ConsumerHandle> {
        let conn = try_connect(&self.url).await?;
        let subscriber = conn
            .queue_subscribe(subject.to_string(), group.to_string())
            .await
            .map_err(nats_err)?;
        // the subscription is registered on the server before anything is published
        conn.flush().await.map_err(nats_err)?;
        let dead_letters = NatsDeadLetters::auto(conn.clone(), dead_letter_subject)
            .await
            .map_err(nats_err)?;
        let dead_letters = tapped(tap).dead_letters(Arc::new(dead_letters));
        let processor = Arc::new(processor.with_dead_letters(dead_letters));
        let guarded = GuardedSubscriber::new(subscriber, processor).concurrency(concurrency);
        Ok(spawn(move |stopped| async move {
            let r = guarded.run(stopped).await;
            drop(conn);
            r
        }))
    }

    /// Reads every message of `stream` (waiting until it holds `expected`, or `timeout`).
    ///
    /// # Errors
    ///
    /// Returns a message if the stream or its info cannot be read. Fewer than `expected` messages
    /// by `timeout` is not an error, and sequences without a message are skipped.
    pub async fn read_stream(
        &self,
        stream: &str,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<StreamRecord>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let s = self.js.get_stream(stream).await.map_err(nats_err)?;
        let state = loop {
            let info = s.get_info().await.map_err(nats_err)?;
            if info.state.messages as usize >= expected || tokio::time::Instant::now() >= deadline {
                break info.state;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut out = Vec::with_capacity(state.messages as usize);
        if state.messages == 0 {
            return Ok(out);
        }
        for seq in state.first_sequence..=state.last_sequence {
            match s.get_raw_message(seq).await {
                Ok(m) => out.push(StreamRecord {
                    seq: m.sequence,
                    subject: m.subject.to_string(),
                    headers: from_nats_headers(Some(&m.headers)),
                    payload: m.payload.to_vec(),
                }),
                Err(e) => tracing::debug!(seq, error = %e, "no message at sequence"),
            }
        }
        Ok(out)
    }

    /// Publishes exactly these headers and payload with the plain client (JetStream publish, acked).
    ///
    /// # Errors
    ///
    /// Returns a message if a header cannot be encoded for NATS, or the publish is not acknowledged
    /// by a stream (no stream captures `subject`, or a timeout).
    pub async fn publish_plain(
        &self,
        subject: &str,
        headers: &Headers,
        payload: Vec<u8>,
    ) -> BindResult<()> {
        let map = to_nats_headers(headers).map_err(nats_err)?;
        self.js
            .publish_with_headers(subject.to_string(), map, payload.into())
            .await
            .map_err(nats_err)?
            .await
            .map_err(nats_err)
            .map(|_| ())
    }
}

/// Options that only tap dead letters.
fn tapped(tap: Option<DeadLetterTap>) -> ConsumerOptions {
    ConsumerOptions {
        dead_letter_tap: tap,
        ..ConsumerOptions::default()
    }
}

/// The worker config `opts` ask for, on the binding's defaults.
fn worker_config(opts: &ConsumerOptions) -> WorkerConfig {
    let default = WorkerConfig::default();
    WorkerConfig {
        concurrency: opts.concurrency_or(default.concurrency),
        ack_wait: opts.redeliver_after.unwrap_or(default.ack_wait),
        max_deliver: default.max_deliver,
    }
}

fn consumer_config(durable: &str, cfg: &WorkerConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(durable.to_string()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: cfg.ack_wait,
        max_deliver: cfg.max_deliver,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

fn spawn<F, Fut>(run: F) -> ConsumerHandle
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = Result<(), elevate_nats::Error>> + Send,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let stopped = Box::pin(async move {
            let _ = stopped.await;
        });
        if let Err(e) = run(stopped).await {
            tracing::error!(error = %e, "guarded NATS consumer ended");
        }
    });
    ConsumerHandle {
        stop: Some(stop),
        task,
    }
}

/// Stream names derived from an endpoint.
pub fn stream_names(ep: &Endpoint) -> (String, String) {
    (ep.name.clone(), format!("{}_DLQ", ep.name))
}

#[async_trait::async_trait]
impl BrokerBinding for NatsBinding {
    fn name(&self) -> &'static str {
        match self.mode {
            NatsMode::JetStream => "nats-jetstream",
            NatsMode::Core => "nats-core",
        }
    }

    fn limits(&self) -> InboundLimits {
        // max_payload bounds headers and payload together; a stored message's
        // header block stays under 64 KiB.
        InboundLimits {
            // originals just under the limits; their letters (+ the envelope) over them
            header_bytes: 65_000,
            payload_bytes: Some(self.client.server_info().max_payload.saturating_sub(300)),
            claim_check: true,
            enforced: true,
        }
    }

    async fn setup(&self, scenario: &str) -> BindResult<Endpoint> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let tag = scenario.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let name = format!("{STREAM_PREFIX}{tag}_{id}");
        let destination = format!("elvt.{tag}.{id}.in");
        let dead_letter = format!("elvt.{tag}.{id}.dlq");
        self.create_stream(&name, vec![destination.clone()]).await?;
        self.create_stream(&format!("{name}_DLQ"), vec![dead_letter.clone()])
            .await?;
        Ok(Endpoint {
            name,
            destination,
            dead_letter,
        })
    }

    async fn publish_guarded(
        &self,
        ep: &Endpoint,
        producer: &ProducerGuard,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> BindResult<()> {
        let publisher = self.publisher(producer);
        let req = PublishRequest {
            destination: &ep.destination,
            ..req.clone()
        };
        match self.mode {
            NatsMode::JetStream => publisher.publish_jetstream(&req, msg).await.map(|_| ()),
            NatsMode::Core => match publisher.publish(&req, msg).await {
                Ok(_) => publisher.flush().await,
                Err(e) => Err(e),
            },
        }
        .map_err(|e| e.to_string())
    }

    async fn publish_raw(
        &self,
        ep: &Endpoint,
        headers: Headers,
        payload: Vec<u8>,
    ) -> BindResult<()> {
        match self.mode {
            NatsMode::JetStream => self.publish_plain(&ep.destination, &headers, payload).await,
            NatsMode::Core => {
                let map = to_nats_headers(&headers).map_err(nats_err)?;
                self.client
                    .publish_with_headers(ep.destination.clone(), map, payload.into())
                    .await
                    .map_err(nats_err)?;
                self.client.flush().await.map_err(nats_err)
            }
        }
    }

    async fn publish_batch(
        &self,
        ep: &Endpoint,
        messages: Vec<(Headers, Vec<u8>)>,
    ) -> BindResult<()> {
        if self.mode == NatsMode::Core {
            for (headers, payload) in messages {
                self.publish_raw(ep, headers, payload).await?;
            }
            return Ok(());
        }
        // Up to 500 JetStream publishes in flight, each awaited for the stream's ack.
        for chunk in messages.chunks(500) {
            let mut acks = Vec::with_capacity(chunk.len());
            for (headers, payload) in chunk {
                let map = to_nats_headers(headers).map_err(nats_err)?;
                acks.push(
                    self.js
                        .publish_with_headers(ep.destination.clone(), map, payload.clone().into())
                        .await
                        .map_err(nats_err)?,
                );
            }
            for ack in acks {
                ack.await.map_err(nats_err)?;
            }
        }
        Ok(())
    }

    async fn start_consumer_with(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
        opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle> {
        let cfg = worker_config(opts);
        let tap = opts.dead_letter_tap.clone();
        match self.mode {
            NatsMode::JetStream => {
                self.spawn_jetstream_tapped(
                    &ep.name,
                    "worker",
                    &ep.dead_letter,
                    processor,
                    &cfg,
                    tap,
                )
                .await
            }
            NatsMode::Core => {
                self.spawn_core_tapped(
                    &ep.destination,
                    "workers",
                    &ep.dead_letter,
                    processor,
                    cfg.concurrency,
                    tap,
                )
                .await
            }
        }
    }

    /// JetStream: a durable pull consumer `raw` on the endpoint's stream,
    /// double-acking. Core NATS: a plain subscriber to the subject (it sees
    /// only what is published after it subscribed).
    async fn start_raw_consumer(
        &self,
        ep: &Endpoint,
        on_message: RawHandler,
        opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle> {
        let cfg = worker_config(opts);
        let concurrency = cfg.concurrency;
        match self.mode {
            NatsMode::JetStream => {
                let messages = self
                    .create_consumer(&ep.name, "raw", &cfg)
                    .await?
                    .messages()
                    .await
                    .map_err(nats_err)?;
                let on_each = move |m: Result<jetstream::Message, _>| {
                    let on_message = on_message.clone();
                    async move {
                        if let Ok(m) = m {
                            on_message(&from_nats_headers(m.headers.as_ref()), &m.payload);
                            let _ = m.double_ack().await;
                        }
                    }
                };
                let done = std::future::ready(());
                Ok(ConsumerHandle::spawn_plain(
                    messages,
                    concurrency,
                    on_each,
                    done,
                ))
            }
            NatsMode::Core => {
                let subscriber = self
                    .client
                    .subscribe(ep.destination.clone())
                    .await
                    .map_err(nats_err)?;
                self.client.flush().await.map_err(nats_err)?;
                let on_each = move |m: async_nats::Message| {
                    on_message(&from_nats_headers(m.headers.as_ref()), &m.payload);
                    std::future::ready(())
                };
                let done = std::future::ready(());
                Ok(ConsumerHandle::spawn_plain(
                    subscriber,
                    concurrency,
                    on_each,
                    done,
                ))
            }
        }
    }

    async fn teardown(&self, ep: &Endpoint) {
        let (stream, dlq) = stream_names(ep);
        let _ = self.js.delete_stream(&stream).await;
        let _ = self.js.delete_stream(&dlq).await;
    }

    async fn dead_letters(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>> {
        let (_, dlq) = stream_names(ep);
        Ok(self
            .read_stream(&dlq, expected, timeout)
            .await?
            .into_iter()
            .map(RawMessage::from)
            .collect())
    }

    async fn read_raw(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>> {
        Ok(self
            .read_stream(&ep.name, expected, timeout)
            .await?
            .into_iter()
            .map(RawMessage::from)
            .collect())
    }
}

/// The `ack_wait` of the Delivery contract's durable consumer: how soon a
/// dropped delivery comes back.
const CONTRACT_ACK_WAIT: Duration = Duration::from_secs(3);

#[async_trait::async_trait]
impl crate::delivery::DeliveryBinding for NatsBinding {
    type Source = elevate_nats::JetStreamSource;

    async fn open_source(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
    ) -> BindResult<Self::Source> {
        if !matches!(self.mode, NatsMode::JetStream) {
            return Err("core NATS keeps nothing: it is not an at-least-once source".into());
        }
        let cfg = WorkerConfig {
            ack_wait: CONTRACT_ACK_WAIT,
            ..WorkerConfig::default()
        };
        let consumer: consumer::PullConsumer = self
            .js
            .get_stream(&ep.name)
            .await
            .map_err(nats_err)?
            .get_or_create_consumer("contract", consumer_config("contract", &cfg))
            .await
            .map_err(nats_err)?;
        let guarded = GuardedConsumer::new(consumer, processor)
            .fetch_expires(Duration::from_millis(500))
            .unreadable(elevate_nats::unreadable::UnreadableMessages::new(
                self.js.clone(),
            ));
        Ok(guarded.into_parts().1)
    }

    fn unsettled_window(&self) -> Duration {
        CONTRACT_ACK_WAIT + Duration::from_secs(1)
    }
}
