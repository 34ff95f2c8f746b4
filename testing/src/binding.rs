//! The small broker-binding trait the conformance suite is written against.
//! Each broker (memory, Kafka, AMQP, NATS) implements it once; every scenario
//! in [`crate::conformance`] then runs unchanged on it, and the benchmark
//! (`elevate-bench`) drives the same bindings: a plain consumer as its raw
//! baseline ([`BrokerBinding::start_raw_consumer`]), pipelined publishing
//! ([`BrokerBinding::publish_batch`]) and consumers tuned by
//! [`ConsumerOptions`].

use std::sync::Arc;
use std::time::Duration;

use elevate_core::Headers;
use elevate_core::OutboundMessage;
use elevate_core::deadletter::{DeadLetter, Excess, PayloadAt};
use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_core::settle::{DeadLetterPublisher, Processor, TransportError};

/// Result type of binding operations (errors are messages for the test report).
pub type BindResult<T> = Result<T, String>;

/// One isolated destination for a scenario.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Unique name (topic, queue, stream) created for the scenario.
    pub name: String,
    /// The destination string references are bound to (what `InboundMessage::destination` will be).
    pub destination: String,
    /// Where dead letters go.
    pub dead_letter: String,
}

/// A running guarded consumer; dropping it or calling `stop` ends it.
pub struct ConsumerHandle {
    /// Signals the consumer loop to stop.
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The consumer task.
    pub task: tokio::task::JoinHandle<()>,
}

/// The future a consumer spawned with [`ConsumerHandle::spawn`] runs until:
/// it completes when the handle stops the consumer.
pub type Stopped = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl ConsumerHandle {
    /// Runs `consumer` on its own task; it is given the [`Stopped`] future to
    /// end on.
    pub fn spawn<F, Fut>(consumer: F) -> ConsumerHandle
    where
        F: FnOnce(Stopped) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(consumer(Box::pin(async move {
            let _ = stopped.await;
        })));
        ConsumerHandle {
            stop: Some(stop),
            task,
        }
    }

    /// Spawns a plain consumer: every item of `messages` goes to `each`, up
    /// to `concurrency` at once, until the stream ends or the handle stops it;
    /// then `after` runs (to close what the consumer held).
    pub fn spawn_plain<S, F, Fut, A>(messages: S, concurrency: usize, each: F, after: A) -> Self
    where
        S: futures::Stream + Send + 'static,
        F: FnMut(S::Item) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
        A: std::future::Future<Output = ()> + Send + 'static,
    {
        use futures::StreamExt;
        Self::spawn(|stopped| async move {
            tokio::select! {
                _ = stopped => {}
                _ = messages.for_each_concurrent(concurrency, each) => {}
            }
            after.await;
        })
    }

    /// Stops the consumer and waits for it (bounded).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
        self.task.abort();
    }

    /// Kills the consumer abruptly (simulated crash): nothing in flight is settled.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// Called with the headers and payload of every message a plain consumer
/// ([`BrokerBinding::start_raw_consumer`]) receives, before it acknowledges it.
pub type RawHandler = Arc<dyn Fn(&Headers, &[u8]) + Send + Sync>;

/// Called with every dead letter a guarded consumer published, once the
/// broker confirmed it (the benchmark counts them).
pub type DeadLetterTap = Arc<dyn Fn(&DeadLetter) + Send + Sync>;

/// How a consumer a binding starts is tuned. The default is the binding's
/// own tuning, what the conformance suite runs with.
#[derive(Clone, Default)]
pub struct ConsumerOptions {
    /// Messages in flight at once (on RabbitMQ also the channel's prefetch);
    /// `None`: the binding's default.
    pub concurrency: Option<usize>,
    /// How long the broker waits for a settlement before it delivers the
    /// message again, where it redelivers by time (JetStream's `ack_wait`;
    /// the other brokers ignore it); `None`: the binding's default.
    pub redeliver_after: Option<Duration>,
    /// Sees every dead letter the guarded consumer published.
    pub dead_letter_tap: Option<DeadLetterTap>,
}

impl ConsumerOptions {
    /// The concurrency to run with: the option, else the binding's `default`.
    pub fn concurrency_or(&self, default: usize) -> usize {
        self.concurrency.unwrap_or(default).max(1)
    }

    /// `inner`, behind the dead-letter tap when there is one.
    pub fn dead_letters(
        &self,
        inner: Arc<dyn DeadLetterPublisher>,
    ) -> Arc<dyn DeadLetterPublisher> {
        match &self.dead_letter_tap {
            Some(tap) => Arc::new(TappedDeadLetters {
                inner,
                tap: tap.clone(),
            }),
            None => inner,
        }
    }
}

/// A dead-letter publisher that hands every letter the broker confirmed to a
/// [`DeadLetterTap`], and is otherwise the publisher it wraps.
pub struct TappedDeadLetters {
    inner: Arc<dyn DeadLetterPublisher>,
    tap: DeadLetterTap,
}

#[async_trait::async_trait]
impl DeadLetterPublisher for TappedDeadLetters {
    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError> {
        self.inner.publish(letter).await?;
        (self.tap)(letter);
        Ok(())
    }

    fn measure(&self, letter: &DeadLetter) -> Excess {
        self.inner.measure(letter)
    }

    async fn store_claim(&self, letter: &DeadLetter) -> Result<PayloadAt, TransportError> {
        self.inner.store_claim(letter).await
    }

    fn durable(&self) -> bool {
        self.inner.durable()
    }

    async fn preflight(&self, source: &str) -> Result<(), TransportError> {
        self.inner.preflight(source).await
    }
}

/// A raw message as read back from a broker.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// The message headers as the broker returned them, to check what was stripped or attached.
    pub headers: Headers,
    /// The message body as the broker returned it.
    pub payload: Vec<u8>,
}

/// How large a message a plain producer can publish to a binding's
/// endpoints (the broker's limits), for the oversized-letter scenario.
#[derive(Debug, Clone, Copy)]
pub struct InboundLimits {
    /// A header value this long (plus a small payload) is accepted.
    pub header_bytes: usize,
    /// A payload this long (with no other header) is accepted, when the
    /// broker bounds the whole message (NATS `max_payload`, Kafka
    /// `message.max.bytes`); `None` where only headers are bounded.
    pub payload_bytes: Option<usize>,
    /// Whether the binding's dead letters keep oversized payloads in a claim check.
    pub claim_check: bool,
    /// Whether the broker enforces these limits (a letter of an original at
    /// them must be trimmed); false for the in-memory transport.
    pub enforced: bool,
}

/// What a broker must provide to run the conformance suite.
#[async_trait::async_trait]
pub trait BrokerBinding: Send + Sync {
    /// Short name for reports (`memory`, `kafka`, `amqp`, `nats`).
    fn name(&self) -> &'static str;

    /// The largest messages a plain producer can publish (see [`InboundLimits`]).
    fn limits(&self) -> InboundLimits;

    /// Creates a fresh, empty destination and dead-letter destination for a scenario.
    async fn setup(&self, scenario: &str) -> BindResult<Endpoint>;

    /// Publishes through the binding's guarded producer (PDP check, stripping, reference).
    async fn publish_guarded(
        &self,
        ep: &Endpoint,
        producer: &ProducerGuard,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> BindResult<()>;

    /// Publishes exactly these headers and payload with the plain client (legacy or hostile producer).
    async fn publish_raw(
        &self,
        ep: &Endpoint,
        headers: Headers,
        payload: Vec<u8>,
    ) -> BindResult<()>;

    /// Publishes these messages with the plain client, in order, and returns
    /// once the broker has taken them all (confirmed, where it confirms).
    /// The default publishes them one by one with [`BrokerBinding::publish_raw`];
    /// a binding whose client can pipeline publishes does.
    async fn publish_batch(
        &self,
        ep: &Endpoint,
        messages: Vec<(Headers, Vec<u8>)>,
    ) -> BindResult<()> {
        for (headers, payload) in messages {
            self.publish_raw(ep, headers, payload).await?;
        }
        Ok(())
    }

    /// Starts the binding's guarded consumer on the endpoint with this processor,
    /// tuned as the binding tunes it ([`ConsumerOptions::default`]).
    async fn start_consumer(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
    ) -> BindResult<ConsumerHandle> {
        self.start_consumer_with(ep, processor, &ConsumerOptions::default())
            .await
    }

    /// Starts the binding's guarded consumer on the endpoint with this processor.
    /// The processor's dead-letter publisher is `UnboundDeadLetters` (refuses
    /// everything); the binding binds its own with `processor.with_dead_letters(..)`
    /// pointing at `ep.dead_letter` (behind `opts`' tap, see
    /// [`ConsumerOptions::dead_letters`]). Returns once the consumer can receive.
    async fn start_consumer_with(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
        opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle>;

    /// Starts a plain, unguarded consumer of everything published to the
    /// endpoint, beside the guarded one (its own queue, group or durable
    /// consumer: both see every message): no guard, no processor, each
    /// message handed to `on_message` and acknowledged. The benchmark's raw
    /// baseline. Returns once the consumer can receive.
    async fn start_raw_consumer(
        &self,
        ep: &Endpoint,
        on_message: RawHandler,
        opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle>;

    /// Deletes what [`BrokerBinding::setup`] created (best effort). The
    /// default leaves it to expire; the benchmark, which creates an endpoint
    /// per row, calls it.
    async fn teardown(&self, _ep: &Endpoint) {}

    /// Reads dead letters with a plain client, waiting until `expected` arrived or `timeout`.
    async fn dead_letters(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>>;

    /// Reads what is on the wire at the destination with a plain client
    /// (every message published so far, without consuming it from the guarded consumer).
    async fn read_raw(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>>;
}
