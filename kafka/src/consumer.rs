//! The guarded consumer: wraps a configured `StreamConsumer`, runs one worker
//! per assigned partition (ordered, bounded across partitions), hands every
//! record to [`Processor::process`] and stores its offset only once settled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CStr, CString, c_char};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use elevate_core::settle::{Delivery, RedeliveryMode, TransportError};
use elevate_core::{Coordinates, InboundMessage, Processor};
use rdkafka::consumer::{
    CommitMode, Consumer, ConsumerContext, DefaultConsumerContext, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::deadletter::SOURCE_KEY;
use crate::headers::from_kafka;

/// Why the guarded consumer could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The wrapped consumer is configured in a way that would break settlement.
    #[error("consumer misconfigured: {0}")]
    Config(String),
    /// librdkafka reported a fatal error.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A partition worker ended unexpectedly (a bug: handler panics are caught
    /// by the processor). The records it held are unstored; rather than store
    /// later offsets past them, the consumer stops: restart it, and the group
    /// re-reads from the committed offsets.
    #[error("the worker of {topic}/{partition} died: {reason}")]
    WorkerDied {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// What is known of why.
        reason: String,
    },
}

type PartitionKey = (String, i32);

/// One record awaiting settlement; `ack` stores `offset + 1` for its partition.
pub struct KafkaDelivery<C: ConsumerContext + 'static = DefaultConsumerContext> {
    consumer: Arc<StreamConsumer<C>>,
    msg: InboundMessage,
    topic: String,
    partition: i32,
    offset: i64,
    revoked: Arc<Revoked>,
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
        if self.revoked.is_set() {
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

/// A record copied out of librdkafka, on its way to its partition's worker.
struct Item {
    msg: InboundMessage,
    key: Option<Bytes>,
    offset: i64,
}

/// Set when a partition is revoked: its worker stops and abandons the record in progress.
#[derive(Default)]
struct Revoked {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Revoked {
    fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

struct Worker {
    tx: mpsc::Sender<Item>,
    revoked: Arc<Revoked>,
    pending: VecDeque<Item>,
    paused: bool,
    /// Offset of the last record dispatched in this assignment.
    last_offset: Option<i64>,
    /// Offset gaps seen in this assignment.
    gaps: u64,
}

/// Wraps the `StreamConsumer` the application configured (group, subscription)
/// and drives every record through the [`Processor`].
///
/// Requirements: `enable.auto.offset.store=false` (checked: [`GuardedConsumer::new`]
/// refuses otherwise). The guard commits stored offsets itself every
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

fn conf_value<C: ConsumerContext>(consumer: &StreamConsumer<C>, name: &str) -> Option<String> {
    let name = CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    let mut size = buf.len();
    // SAFETY: `native_ptr` is the live `rd_kafka_t` owned by `consumer`, which is
    // borrowed for this whole block. `rd_kafka_conf` returns `&rk->rk_conf`, a
    // read-only view owned by that handle (nothing is copied or freed here), and
    // the properties read are fixed at creation. `rd_kafka_conf_get` copies at
    // most `size - 1` bytes plus a NUL into `buf` (truncating longer values, see
    // `rd_kafka_anyconf_get0` in librdkafka 2.12.1) and only then sets `size` to the
    // full length; `buf` stays NUL-terminated, so `from_bytes_until_nul` is bounded.
    let res = unsafe {
        let conf = rdkafka::bindings::rd_kafka_conf(consumer.client().native_ptr());
        rdkafka::bindings::rd_kafka_conf_get(
            conf,
            name.as_ptr(),
            buf.as_mut_ptr().cast::<c_char>(),
            &mut size,
        )
    };
    if res != rdkafka::bindings::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK {
        return None;
    }
    CStr::from_bytes_until_nul(&buf)
        .ok()?
        .to_str()
        .ok()
        .map(str::to_string)
}

/// Checks that `consumer` can be guarded (`enable.auto.offset.store=false`);
/// returns true when auto-commit is off (the guard then commits stored offsets itself).
pub fn check_config<C: ConsumerContext>(consumer: &StreamConsumer<C>) -> Result<bool, Error> {
    match conf_value(consumer, "enable.auto.offset.store").as_deref() {
        Some("false") => {}
        other => {
            return Err(Error::Config(format!(
                "enable.auto.offset.store must be \"false\" (is {other:?}): offsets are stored only after settlement"
            )));
        }
    }
    Ok(conf_value(consumer, "enable.auto.commit").as_deref() == Some("false"))
}

impl<C: ConsumerContext + 'static> GuardedConsumer<C> {
    /// Wraps a configured consumer; fails if `enable.auto.offset.store` is not `false`
    /// (librdkafka would then store offsets of unsettled records).
    pub fn new(
        consumer: impl Into<Arc<StreamConsumer<C>>>,
        processor: Arc<Processor>,
    ) -> Result<Self, Error> {
        let consumer = consumer.into();
        check_config(&consumer)?;
        Ok(GuardedConsumer {
            consumer,
            processor,
            concurrency: 16,
            buffer: 256,
            commit_interval: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(10),
            stored: Arc::new(AtomicBool::new(false)),
        })
    }

    /// At most `n` records are processed at once across partitions (default 16; one per partition at a time).
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

    /// How long `run` waits at shutdown for records in progress (default 10 s); the rest stay unstored.
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
    /// Records are dispatched to one ordered worker per partition; a record's
    /// offset is stored only after the processor settled it. Partitions whose
    /// buffer is full are paused (the consumer keeps polling, so the group
    /// session stays alive); revoked partitions drop their queued records
    /// unstored. At shutdown, records in progress get `shutdown_grace` to
    /// settle, then stored offsets are committed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        self.preflight().await?;
        let semaphore = Arc::new(Semaphore::new(self.concurrency));
        let stopping = Arc::new(AtomicBool::new(false));
        let mut workers: HashMap<PartitionKey, Worker> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_commit = tokio::time::Instant::now();
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                _ = tick.tick() => {
                    self.flush_pending(&mut workers);
                    self.drop_revoked(&mut workers);
                    if let Some(died) = reap_workers(&mut tasks) {
                        break Err(died);
                    }
                    if last_commit.elapsed() >= self.commit_interval && self.stored.swap(false, Ordering::SeqCst) {
                        last_commit = tokio::time::Instant::now();
                        self.commit(CommitMode::Async);
                    }
                }
                received = self.consumer.recv() => match received {
                    Ok(m) => {
                        let (key, item) = to_item(&m);
                        tracing::trace!(topic = %key.0, partition = key.1, offset = item.offset, "received");
                        drop(m);
                        if let Err(died) = self.dispatch(key, item, &mut workers, &mut tasks, &semaphore, &stopping) {
                            break Err(died);
                        }
                    }
                    Err(e) => {
                        if let Some((code, reason)) = self.consumer.client().fatal_error() {
                            tracing::error!(?code, %reason, "fatal consumer error");
                            break Err(Error::Kafka(KafkaError::MessageConsumptionFatal(code)));
                        }
                        tracing::warn!(error = %e, "consumer error");
                    }
                }
            }
        };
        // Stop: finish what is in progress (bounded), leave the rest unstored.
        stopping.store(true, Ordering::SeqCst);
        workers.clear();
        if tokio::time::timeout(self.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(grace = ?self.shutdown_grace, "records still in progress at shutdown: left unstored");
            tasks.shutdown().await;
        }
        self.commit(CommitMode::Sync);
        result
    }

    /// Checks, for every subscribed topic (patterns excepted), that its dead
    /// letters can be stored; a broker that cannot be asked now is a warning.
    async fn preflight(&self) -> Result<(), Error> {
        let topics: Vec<String> = match self.consumer.subscription() {
            Ok(list) => list
                .elements()
                .iter()
                .map(|e| e.topic().to_string())
                .filter(|t| !t.starts_with('^'))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the subscription: dead-letter topics not checked");
                return Ok(());
            }
        };
        for topic in topics {
            match self.processor.preflight(&topic).await {
                Ok(()) => {}
                Err(e) if e.is_permanent() => return Err(Error::Config(e.to_string())),
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "dead-letter destination not checked at start")
                }
            }
        }
        Ok(())
    }

    fn commit(&self, mode: CommitMode) {
        match self.consumer.commit_consumer_state(mode) {
            Ok(()) => {}
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "commit of stored offsets failed"),
        }
    }

    fn dispatch(
        &self,
        key: PartitionKey,
        item: Item,
        workers: &mut HashMap<PartitionKey, Worker>,
        tasks: &mut JoinSet<()>,
        semaphore: &Arc<Semaphore>,
        stopping: &Arc<AtomicBool>,
    ) -> Result<(), Error> {
        // A worker still in the map (not revoked) whose channel closed has died:
        // the records it held are unstored, so nothing later may be stored.
        if workers.get(&key).is_some_and(|w| w.tx.is_closed()) {
            return Err(Error::WorkerDied {
                topic: key.0,
                partition: key.1,
                reason: "its channel closed while the partition was assigned".into(),
            });
        }
        if !workers.contains_key(&key) {
            let worker = self.spawn_worker(&key, tasks, semaphore, stopping);
            workers.insert(key.clone(), worker);
        }
        let Some(worker) = workers.get_mut(&key) else {
            return Ok(());
        };
        // Offsets only grow within an assignment: a record at or below the last one
        // dispatched is a duplicate from the client or broker (already queued here).
        if worker.last_offset.is_some_and(|last| item.offset <= last) {
            tracing::debug!(topic = %key.0, partition = key.1, offset = item.offset, "duplicate record skipped");
            return Ok(());
        }
        if let Some(last) = worker.last_offset.filter(|last| item.offset > last + 1) {
            // Legitimate after compaction or transaction markers; otherwise the broker
            // skipped records (tansu 0.6: a fetch starting inside a stored batch, as after
            // a resume). Loud but bounded: warned at the 1st, 2nd, 4th, 8th... gap.
            worker.gaps += 1;
            let skipped = item.offset - last - 1;
            if worker.gaps.is_power_of_two() {
                tracing::warn!(topic = %key.0, partition = key.1, after = last, offset = item.offset, skipped, gaps = worker.gaps,
                    "offset gap: the broker did not deliver these offsets; unless the topic is compacted or transactional this is a broker fault and the records are lost to this consumer");
            } else {
                tracing::debug!(topic = %key.0, partition = key.1, after = last, offset = item.offset, skipped, gaps = worker.gaps, "offset gap");
            }
        }
        worker.last_offset = Some(item.offset);
        if !worker.pending.is_empty() {
            worker.pending.push_back(item);
            return Ok(());
        }
        match worker.tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item))
            | Err(mpsc::error::TrySendError::Closed(item)) => {
                worker.pending.push_back(item);
                if !worker.paused {
                    match self.consumer.pause(&single(&key)) {
                        Ok(()) => {
                            tracing::debug!(topic = %key.0, partition = key.1, "partition paused: its buffer is full");
                            worker.paused = true
                        }
                        Err(e) => {
                            tracing::warn!(topic = %key.0, partition = key.1, error = %e, "cannot pause partition")
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn flush_pending(&self, workers: &mut HashMap<PartitionKey, Worker>) {
        for (key, worker) in workers.iter_mut() {
            while let Some(item) = worker.pending.pop_front() {
                match worker.tx.try_send(item) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(item))
                    | Err(mpsc::error::TrySendError::Closed(item)) => {
                        worker.pending.push_front(item);
                        break;
                    }
                }
            }
            if worker.paused && worker.pending.is_empty() {
                match self.consumer.resume(&single(key)) {
                    Ok(()) => {
                        tracing::debug!(topic = %key.0, partition = key.1, "partition resumed");
                        worker.paused = false
                    }
                    Err(e) => {
                        tracing::warn!(topic = %key.0, partition = key.1, error = %e, "cannot resume partition")
                    }
                }
            }
        }
    }

    /// Workers of partitions no longer assigned stop; their queued records are dropped unstored.
    fn drop_revoked(&self, workers: &mut HashMap<PartitionKey, Worker>) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let assigned: HashSet<PartitionKey> = assignment
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        workers.retain(|key, worker| {
            let keep = assigned.contains(key);
            if !keep {
                tracing::info!(topic = %key.0, partition = key.1, dropped = worker.pending.len(), "partition revoked: queued records dropped unstored");
                worker.revoked.set();
            }
            keep
        });
    }

    fn spawn_worker(
        &self,
        key: &PartitionKey,
        tasks: &mut JoinSet<()>,
        semaphore: &Arc<Semaphore>,
        stopping: &Arc<AtomicBool>,
    ) -> Worker {
        let (tx, mut rx) = mpsc::channel::<Item>(self.buffer);
        let revoked = Arc::new(Revoked::default());
        let consumer = self.consumer.clone();
        let processor = self.processor.clone();
        let semaphore = semaphore.clone();
        let stopping = stopping.clone();
        let worker_revoked = revoked.clone();
        let stored = self.stored.clone();
        let (topic, partition) = key.clone();
        tasks.spawn(async move {
            while let Some(item) = rx.recv().await {
                if worker_revoked.is_set() || stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(_permit) = semaphore.acquire().await else {
                    break;
                };
                // Backpressure during a dependency outage: one probe at a time
                // across partitions; the loop keeps polling, so the group
                // session stays alive while full partitions are paused.
                tokio::select! {
                    _ = processor.admission().wait() => {}
                    _ = worker_revoked.wait() => break,
                }
                let delivery = KafkaDelivery {
                    consumer: consumer.clone(),
                    msg: item.msg,
                    topic: topic.clone(),
                    partition,
                    offset: item.offset,
                    revoked: worker_revoked.clone(),
                    stored: stored.clone(),
                };
                let processed = tokio::select! {
                    r = SOURCE_KEY.scope(item.key, processor.process(delivery)) => r,
                    _ = worker_revoked.wait() => {
                        tracing::info!(%topic, partition, offset = item.offset, "partition revoked: record in progress abandoned unstored");
                        break;
                    }
                };
                match processed {
                    Ok(outcome) => {
                        tracing::debug!(%topic, partition, offset = item.offset, ?outcome, "settled")
                    }
                    Err(e) => {
                        // Only the offset store can fail here (InPlace mode): the
                        // record is re-read by whoever owns the partition next.
                        tracing::warn!(%topic, partition, offset = item.offset, error = %e, "record left unsettled");
                    }
                }
            }
        });
        Worker {
            tx,
            revoked,
            pending: VecDeque::new(),
            paused: false,
            last_offset: None,
            gaps: 0,
        }
    }
}

/// Collects finished worker tasks; a panicked one is reported as a dead worker.
fn reap_workers(tasks: &mut JoinSet<()>) -> Option<Error> {
    while let Some(done) = tasks.try_join_next() {
        if let Err(e) = done
            && e.is_panic()
        {
            tracing::error!(error = %e, "a partition worker panicked: stopping the consumer");
            return Some(Error::WorkerDied {
                topic: String::new(),
                partition: -1,
                reason: format!("panicked: {e}"),
            });
        }
    }
    None
}

fn single(key: &PartitionKey) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(&key.0, key.1);
    tpl
}

/// Copies a record out of librdkafka into the broker-neutral message.
fn to_item(m: &BorrowedMessage<'_>) -> (PartitionKey, Item) {
    let topic = m.topic().to_string();
    let msg = InboundMessage {
        headers: from_kafka(m.headers()),
        payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        coordinates: Coordinates::Kafka {
            topic: topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
        },
        destination: topic.clone(),
        message_id: None,
        // Kafka keeps no delivery count: in-place retries are counted by the processor.
        delivery_attempt: 1,
        published_at_ms: m.timestamp().to_millis(),
    };
    (
        (topic, m.partition()),
        Item {
            msg,
            key: m.key().map(Bytes::copy_from_slice),
            offset: m.offset(),
        },
    )
}
