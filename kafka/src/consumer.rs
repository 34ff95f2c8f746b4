//! The guarded consumer: wraps a configured `StreamConsumer` as a
//! [`Source`] for core's [`Runtime`] (one ordered lane per assigned
//! partition, bounded across partitions), and stores a record's offset only
//! once the processor settled it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use elevate_core::runtime::{RunError, Runtime, Source};
use elevate_core::settle::{DeadLetterPublisher, Delivery, RedeliveryMode, TransportError};
use elevate_core::{Coordinates, InboundMessage, Processor};
use rdkafka::consumer::{
    CommitMode, Consumer, ConsumerContext, DefaultConsumerContext, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::deadletter::{KafkaDeadLetters, producer_config_of};
use crate::headers::from_kafka;

/// Why the guarded consumer could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The wrapped consumer is configured in a way that would break settlement.
    #[error("consumer misconfigured: {0}")]
    Config(String),
    /// librdkafka reported a fatal error.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Core's runtime refused to start (a start check) or stopped (a
    /// partition's task panicked: the records it held are unstored, so
    /// rather than store later offsets past them the consumer stops; restart
    /// it and the group re-reads from the committed offsets).
    #[error(transparent)]
    Runtime(#[from] elevate_core::runtime::RunError<std::convert::Infallible>),
}

type PartitionKey = (String, i32);

/// One record awaiting settlement; `ack` stores `offset + 1` for its partition.
pub struct KafkaDelivery<C: ConsumerContext + 'static = DefaultConsumerContext> {
    consumer: Arc<StreamConsumer<C>>,
    msg: InboundMessage,
    topic: String,
    partition: i32,
    offset: i64,
    revoked: Arc<AtomicBool>,
    stored: Arc<AtomicBool>,
}

impl<C: ConsumerContext + 'static> KafkaDelivery<C> {
    /// The record's topic, partition and offset.
    pub fn position(&self) -> (&str, i32, i64) {
        (&self.topic, self.partition, self.offset)
    }
}

#[async_trait::async_trait]
impl<C: ConsumerContext + 'static> Delivery for KafkaDelivery<C> {
    fn message(&self) -> &InboundMessage {
        &self.msg
    }

    async fn ack(self) -> Result<(), TransportError> {
        if self.revoked.load(Ordering::SeqCst) {
            // The partition went to another member: whoever owns it now re-reads this record.
            return Err(TransportError::new("store offset", "partition revoked"));
        }
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(self.offset + 1))
            .map_err(|e| TransportError::new("store offset", e))?;
        self.consumer
            .store_offsets(&tpl)
            .map_err(|e| TransportError::new("store offset", e))?;
        self.stored.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn redeliver(self, _delay: Duration) -> Result<(), TransportError> {
        // Never called in RedeliveryMode::InPlace; leaving the offset unstored is the safe answer.
        Err(TransportError::new(
            "redeliver",
            "kafka retries in place; the offset stays unstored",
        ))
    }

    fn redelivery_mode(&self) -> RedeliveryMode {
        RedeliveryMode::InPlace
    }
}

/// What the source tracks per assigned partition.
struct Partition {
    key: PartitionKey,
    revoked: Arc<AtomicBool>,
    /// Offset of the last record received in this assignment.
    last_offset: Option<i64>,
    /// Offset gaps seen in this assignment.
    gaps: u64,
}

/// Wraps the `StreamConsumer` the application configured (group, subscription)
/// and drives every record through the [`Processor`].
///
/// Requirements: `enable.auto.offset.store=false` (checked in the configuration:
/// [`GuardedConsumer::from_config`] refuses otherwise). The guard commits stored offsets itself every
/// [`GuardedConsumer::commit_interval`] (default 200 ms) and at shutdown,
/// whatever `enable.auto.commit` says (librdkafka's own auto-commit, every
/// 5 s by default, would leave up to 5 s of handled messages to be handled
/// again after a crash). For a fast return after a restart, give each
/// instance a stable `group.instance.id` (static membership): a restarted
/// member gets its partitions back without a rebalance.
pub struct GuardedConsumer<C: ConsumerContext + 'static = DefaultConsumerContext> {
    consumer: Arc<StreamConsumer<C>>,
    processor: Arc<Processor>,
    concurrency: usize,
    buffer: usize,
    commit_interval: Duration,
    shutdown_grace: Duration,
    /// Set when an offset was stored since the last commit.
    stored: Arc<AtomicBool>,
}

/// Checks that a consumer built from `config` can be guarded:
/// `enable.auto.offset.store` must be `false` (librdkafka would otherwise
/// store the offsets of records that are not settled). Read from the
/// configuration, not from a live client, so no FFI is needed.
///
/// # Errors
/// [`Error::Config`] naming the setting.
pub fn check_config(config: &ClientConfig) -> Result<(), Error> {
    match config.get("enable.auto.offset.store") {
        Some("false") => Ok(()),
        other => Err(Error::Config(format!(
            "enable.auto.offset.store must be \"false\" (is {other:?}): offsets are stored only after settlement"
        ))),
    }
}

impl GuardedConsumer<DefaultConsumerContext> {
    /// Builds the consumer from `config` (which must set `group.id` and
    /// `enable.auto.offset.store=false`, checked before anything is
    /// created); subscribe through [`GuardedConsumer::consumer`], then run.
    /// A processor without a dead-letter publisher gets the default: a
    /// producer on the same cluster (`acks=all`, idempotent) writing to
    /// `<source topic>` + [`Processor::dead_letter_suffix`] (`.dlq`); the
    /// topic must exist, which the start check verifies.
    ///
    /// # Errors
    /// A configuration the guard refuses, or one librdkafka refuses.
    pub fn from_config(config: &ClientConfig, processor: Arc<Processor>) -> Result<Self, Error> {
        Self::from_config_and_context(config, DefaultConsumerContext, processor)
    }
}

impl<C: ConsumerContext + 'static> GuardedConsumer<C> {
    /// As [`GuardedConsumer::from_config`], with the application's consumer context.
    ///
    /// # Errors
    /// A configuration the guard refuses, or one librdkafka refuses.
    pub fn from_config_and_context(
        config: &ClientConfig,
        context: C,
        processor: Arc<Processor>,
    ) -> Result<Self, Error> {
        check_config(config)?;
        let processor = processor.or_bind_dead_letters(|suffix| {
            let letters = KafkaDeadLetters::from_config(&producer_config_of(config))?;
            Ok::<_, Error>(Arc::new(letters.with_suffix(suffix)) as Arc<dyn DeadLetterPublisher>)
        })?;
        let consumer: StreamConsumer<C> = config.create_with_context(context)?;
        Ok(GuardedConsumer {
            consumer: Arc::new(consumer),
            processor,
            concurrency: elevate_core::runtime::DEFAULT_CONCURRENCY,
            buffer: elevate_core::runtime::DEFAULT_KEY_BUFFER,
            commit_interval: Duration::from_millis(200),
            shutdown_grace: elevate_core::runtime::DEFAULT_SHUTDOWN_GRACE,
            stored: Arc::new(AtomicBool::new(false)),
        })
    }

    /// At most `n` records are processed at once across partitions (default 32, core's; one per partition at a time).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Records buffered per partition before it is paused (default 256).
    pub fn buffer(mut self, n: usize) -> Self {
        self.buffer = n.max(1);
        self
    }

    /// How often newly stored offsets are committed (default 200 ms): the
    /// window of records handled again after a crash.
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.commit_interval = every;
        self
    }

    /// How long `run` waits at shutdown for records in progress (default 30 s, core's); the rest stay unstored.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// The wrapped consumer.
    pub fn consumer(&self) -> &Arc<StreamConsumer<C>> {
        &self.consumer
    }

    /// Consumes until `shutdown` completes or librdkafka reports a fatal error.
    ///
    /// Core's [`Runtime`] drives the records: one ordered lane per
    /// partition, at most [`concurrency`](Self::concurrency) in progress; a
    /// record's offset is stored only after the processor settled it.
    /// Partitions whose buffer is full are paused (the consumer keeps
    /// polling, so the group session stays alive); revoked partitions drop
    /// their queued records unstored. At shutdown, records in progress get
    /// [`shutdown_grace`](Self::shutdown_grace) to settle, then stored
    /// offsets are committed.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Kafka`] if librdkafka reports a fatal consumer error (a failed offset
    /// commit is only logged), and [`Error::Runtime`] if core's runtime refuses to start (a start
    /// check fails) or a partition's task panics; records not yet settled stay unstored and are
    /// re-read after a restart.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let (runtime, source, processor) = self.into_parts();
        runtime
            .run(source, processor, shutdown)
            .await
            .map_err(RunError::flatten)
    }

    /// The consumer taken apart: core's [`Runtime`] as configured, the
    /// subscription as a [`Source`], and the processor; [`run`](Self::run)
    /// is `runtime.run(source, processor, shutdown)`. The parts let a test
    /// kit drive the source by hand (`elevate_testing::delivery`, the
    /// Delivery contract) or an application run it in a runtime of its own.
    pub fn into_parts(self) -> (Runtime, KafkaSource<C>, Arc<Processor>) {
        let runtime = Runtime::new()
            .concurrency(self.concurrency)
            .key_buffer(self.buffer)
            .shutdown_grace(self.shutdown_grace);
        let source = KafkaSource {
            consumer: self.consumer,
            stored: self.stored,
            commit_interval: self.commit_interval,
            last_commit: tokio::time::Instant::now(),
            last_assignment_check: tokio::time::Instant::now(),
            partitions: HashMap::new(),
        };
        (runtime, source, self.processor)
    }
}

/// The subscription as a [`Source`] for core's runtime: one order key per
/// partition, offsets stored as deliveries settle and committed every
/// [`GuardedConsumer::commit_interval`]. Made by [`GuardedConsumer::into_parts`].
pub struct KafkaSource<C: ConsumerContext + 'static = DefaultConsumerContext> {
    consumer: Arc<StreamConsumer<C>>,
    stored: Arc<AtomicBool>,
    commit_interval: Duration,
    last_commit: tokio::time::Instant,
    last_assignment_check: tokio::time::Instant,
    /// By order key (`topic/partition`).
    partitions: HashMap<String, Partition>,
}

/// How long one receive waits for a record before the runtime looks around
/// (pauses, revocations, commits).
const RECEIVE_IDLE: Duration = Duration::from_millis(100);

#[async_trait::async_trait]
impl<C: ConsumerContext + 'static> Source for KafkaSource<C> {
    type Delivery = KafkaDelivery<C>;
    type Error = Error;

    /// Every subscribed topic (patterns excepted) is checked for its dead letters.
    fn names(&self) -> Vec<String> {
        match self.consumer.subscription() {
            Ok(list) => list
                .elements()
                .iter()
                .map(|e| e.topic().to_string())
                .filter(|t| !t.starts_with('^'))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the subscription: dead-letter topics not checked");
                Vec::new()
            }
        }
    }

    fn ordered(&self) -> bool {
        true
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<KafkaDelivery<C>>, Error> {
        if self.last_commit.elapsed() >= self.commit_interval
            && self.stored.swap(false, Ordering::SeqCst)
        {
            self.last_commit = tokio::time::Instant::now();
            commit(&self.consumer, CommitMode::Async);
        }
        let mut out = Vec::new();
        let consumer = self.consumer.clone();
        // Wait (bounded) for the first record only; then take what librdkafka
        // already holds, so no record waits for a batch to fill.
        let mut first = true;
        while out.len() < max {
            let received = if first {
                first = false;
                match tokio::time::timeout(RECEIVE_IDLE, consumer.recv()).await {
                    Err(_) => break,
                    Ok(r) => r,
                }
            } else {
                match futures::FutureExt::now_or_never(consumer.recv()) {
                    None => break,
                    Some(r) => r,
                }
            };
            match received {
                Ok(m) => {
                    if let Some(d) = self.delivery(&m) {
                        out.push(d);
                    }
                }
                Err(e) => {
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        tracing::error!(?code, %reason, "fatal consumer error");
                        return Err(Error::Kafka(KafkaError::MessageConsumptionFatal(code)));
                    }
                    tracing::warn!(error = %e, "consumer error");
                }
            }
        }
        Ok(out)
    }

    fn revoked(&mut self) -> Vec<String> {
        // The runtime asks after every receive; librdkafka's assignment is
        // looked at no more than every RECEIVE_IDLE.
        if self.last_assignment_check.elapsed() < RECEIVE_IDLE {
            return Vec::new();
        }
        self.last_assignment_check = tokio::time::Instant::now();
        let Ok(assignment) = self.consumer.assignment() else {
            return Vec::new();
        };
        let assigned: HashSet<PartitionKey> = assignment
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let mut gone = Vec::new();
        self.partitions.retain(|key, p| {
            let keep = assigned.contains(&p.key);
            if !keep {
                p.revoked.store(true, Ordering::SeqCst);
                gone.push(key.clone());
            }
            keep
        });
        gone
    }

    fn pause(&mut self, key: &str, paused: bool) {
        let Some(p) = self.partitions.get(key) else {
            return;
        };
        let tpl = single(&p.key);
        let done = if paused {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        if let Err(e) = done {
            tracing::warn!(topic = %p.key.0, partition = p.key.1, paused, error = %e, "cannot pause or resume the partition");
        }
    }

    async fn close(&mut self) {
        commit(&self.consumer, CommitMode::Sync);
    }
}

impl<C: ConsumerContext + 'static> KafkaSource<C> {
    /// The record as a delivery of its partition's lane; `None` for a
    /// duplicate the client delivered twice within one assignment.
    fn delivery(&mut self, m: &BorrowedMessage<'_>) -> Option<KafkaDelivery<C>> {
        let msg = to_message(m);
        let (topic, partition, offset) = (m.topic().to_string(), m.partition(), m.offset());
        let key = msg.order_key.clone().unwrap_or_default();
        let p = self.partitions.entry(key).or_insert_with(|| Partition {
            key: (topic.clone(), partition),
            revoked: Arc::new(AtomicBool::new(false)),
            last_offset: None,
            gaps: 0,
        });
        // Offsets only grow within an assignment: a record at or below the last one
        // received is a duplicate from the client or broker (already queued).
        if p.last_offset.is_some_and(|last| offset <= last) {
            tracing::debug!(%topic, partition, offset, "duplicate record skipped");
            return None;
        }
        if let Some(last) = p.last_offset.filter(|last| offset > last + 1) {
            // Legitimate after compaction or transaction markers; otherwise the broker
            // skipped records (tansu 0.6: a fetch starting inside a stored batch, as after
            // a resume). Loud but bounded: warned at the 1st, 2nd, 4th, 8th... gap.
            p.gaps += 1;
            let skipped = offset - last - 1;
            if p.gaps.is_power_of_two() {
                tracing::warn!(%topic, partition, after = last, offset, skipped, gaps = p.gaps,
                    "offset gap: the broker did not deliver these offsets; unless the topic is compacted or transactional this is a broker fault and the records are lost to this consumer");
            } else {
                tracing::debug!(%topic, partition, after = last, offset, skipped, gaps = p.gaps, "offset gap");
            }
        }
        p.last_offset = Some(offset);
        Some(KafkaDelivery {
            consumer: self.consumer.clone(),
            msg,
            topic,
            partition,
            offset,
            revoked: p.revoked.clone(),
            stored: self.stored.clone(),
        })
    }
}

fn commit<C: ConsumerContext>(consumer: &StreamConsumer<C>, mode: CommitMode) {
    match consumer.commit_consumer_state(mode) {
        Ok(()) => {}
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "commit of stored offsets failed"),
    }
}

fn single(key: &PartitionKey) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(&key.0, key.1);
    tpl
}

/// Copies a record out of librdkafka into the broker-neutral message:
/// ordered by partition, its key kept for the dead letter.
fn to_message(m: &BorrowedMessage<'_>) -> InboundMessage {
    let topic = m.topic();
    let coordinates =
        Coordinates::new("kafka", format!("{topic}/{}/{}", m.partition(), m.offset()))
            .with("topic", topic)
            .with("partition", m.partition())
            .with("offset", m.offset());
    let mut msg = InboundMessage::new(
        coordinates,
        topic,
        from_kafka(m.headers()),
        Bytes::copy_from_slice(m.payload().unwrap_or_default()),
    );
    // Kafka keeps no delivery count: in-place retries are counted by the processor.
    msg.published_at_ms = m.timestamp().to_millis();
    msg.order_key = Some(format!("{topic}/{}", m.partition()));
    msg.key = m.key().map(Bytes::copy_from_slice);
    msg
}
