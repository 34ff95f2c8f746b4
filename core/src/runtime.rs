//! The consumer runtime, one for every broker. A binding supplies a small
//! [`Source`] (receive deliveries, say what the broker limits, hand back what
//! it buffered); the runtime owns everything else, the same way on every
//! broker:
//!
//! - **start checks**: the retry policies must fit the broker's redelivery
//!   limit, a keep-alive must beat the broker's ack deadline (warned), an
//!   at-least-once source needs a dead-letter publisher that stores what it
//!   confirms, and every source's dead letters must be storable
//!   ([`crate::settle::DeadLetterPublisher::preflight`]);
//! - **concurrency**: at most [`Runtime::concurrency`] deliveries in
//!   progress; deliveries with an [`InboundMessage::order_key`] are processed
//!   one at a time per key, in order (Kafka partitions), with a bounded
//!   buffer per key, past which the source is asked to pause that key;
//! - **backpressure**: while a dependency is down
//!   ([`Processor::admission`]) one delivery at a time is taken, as a probe;
//! - **panics**: a handler panic is a `handler-failed` dead letter (the
//!   [`Processor`] catches it). A panic anywhere else is a bug: an unordered
//!   delivery is left unsettled for the broker to redeliver and the runtime
//!   goes on; on an ordered key it stops the run ([`RunError::Panicked`]),
//!   since settling later positions of that key would skip the lost one;
//! - **shutdown**: stop receiving, give in-flight deliveries one grace
//!   ([`Runtime::shutdown_grace`]), abandon the rest unsettled (the broker
//!   redelivers them), then let the source close (hand back its buffer,
//!   commit). When the source failed for good (a lost connection), nothing
//!   in flight can be settled any more and it is abandoned at once.
//!
//! [`InboundMessage::order_key`]: crate::message::InboundMessage::order_key

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::admission::Admit;
use crate::settle::{Delivery, Outcome, Processor, TransportError};

/// What the broker imposes on a source, for the start checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The broker stops redelivering after this many deliveries (JetStream
    /// `max_deliver`); `None` for no limit.
    pub max_deliveries: Option<u64>,
    /// The broker redelivers a message not settled or kept alive within
    /// this long (JetStream `ack_wait`); `None` for no deadline.
    pub ack_wait: Option<Duration>,
    /// Whether the broker redelivers what is not settled (at-least-once).
    /// Such a source needs dead letters that are stored, not merely sent.
    pub at_least_once: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_deliveries: None,
            ack_wait: None,
            at_least_once: true,
        }
    }
}

impl Limits {
    /// No redelivery limit, no deadline, at-least-once.
    pub fn at_least_once() -> Self {
        Self::default()
    }

    /// A source that never redelivers (core NATS).
    pub fn at_most_once() -> Self {
        Limits {
            at_least_once: false,
            ..Self::default()
        }
    }

    /// With a redelivery limit.
    #[must_use]
    pub fn with_max_deliveries(mut self, max: Option<u64>) -> Self {
        self.max_deliveries = max;
        self
    }

    /// With an ack deadline.
    #[must_use]
    pub fn with_ack_wait(mut self, wait: Option<Duration>) -> Self {
        self.ack_wait = wait;
        self
    }
}

/// Where deliveries come from: a broker binding's part of a guarded consumer.
#[async_trait::async_trait]
pub trait Source: Send {
    /// One received message awaiting settlement.
    type Delivery: Delivery + 'static;
    /// Why the source could not go on (a lost connection, a cancelled consumer).
    type Error: std::error::Error + Send + Sync + 'static;

    /// What the source reads (topics, a queue, a stream), for logs and the
    /// dead-letter start checks.
    fn names(&self) -> Vec<String>;

    /// The broker's limits on this source.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// Whether deliveries carry order keys (Kafka partitions). An ordered
    /// source is read continuously (its buffers are bounded per key, by
    /// pausing keys); an unordered one only as far as there are free slots.
    fn ordered(&self) -> bool {
        false
    }

    /// The source's own start checks (its configuration), after core's.
    ///
    /// # Errors
    /// The source cannot be guarded as configured.
    async fn check(&mut self, _processor: &Processor) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The next deliveries, at most `max` (at least 1). Returns within about
    /// a second, with nothing if nothing arrived, so that the runtime can
    /// notice shutdown, revocations and finished work in between.
    ///
    /// # Errors
    /// The source cannot go on; the run ends with this error.
    async fn receive(&mut self, max: usize) -> Result<Vec<Self::Delivery>, Self::Error>;

    /// Order keys no longer this consumer's since the last call (Kafka:
    /// revoked partitions): their queued deliveries are dropped unsettled
    /// and the one in progress abandoned.
    fn revoked(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Stops (`true`) or resumes (`false`) receiving for `key`, whose buffer
    /// is full (Kafka: pause the partition, the consumer keeps polling).
    fn pause(&mut self, _key: &str, _paused: bool) {}

    /// Whether deliveries in flight can still be settled after `error`.
    /// Default no: a failed source is taken to have lost its connection.
    fn can_settle_after(&self, _error: &Self::Error) -> bool {
        false
    }

    /// Called once when shutdown begins. A source that returns `true` keeps
    /// delivering what it already holds (core NATS: messages pushed to the
    /// process are lost unless processed) and then ends by failing
    /// `receive`; the runtime takes that end as the shutdown. Default
    /// `false`: stop receiving at once.
    async fn drain(&mut self) -> bool {
        false
    }

    /// At the end of a run, after in-flight deliveries settled or were
    /// abandoned: hand back what was received but never started, commit.
    async fn close(&mut self) {}
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The broker would stop redelivering before core dead-letters.
    #[error(
        "the broker stops redelivering after {max} deliveries, not above the {needed} the retry \
         policies can use: a message would stay unsettled instead of being dead-lettered; \
         raise the broker's limit or lift it"
    )]
    MaxDeliveries {
        /// The broker's limit.
        max: u64,
        /// What the retry policies can use.
        needed: u64,
    },
    /// An at-least-once source with dead letters that are sent, not stored.
    #[error(
        "dead letters of {source_name} must be stored by the broker (a stream, a durable queue, a \
         topic): a letter that is only sent is lost while its original is settled"
    )]
    DeadLettersNotDurable {
        /// The source.
        source_name: String,
    },
    /// The dead letters of a source cannot be stored.
    #[error("dead letters of {source_name} cannot be stored: {error}")]
    DeadLetters {
        /// The source.
        source_name: String,
        /// What the dead-letter publisher found (in the message: an operator
        /// printing the error sees what to fix).
        error: TransportError,
    },
}

/// Why a run ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError<E: std::error::Error + 'static> {
    /// Refused before the first delivery.
    #[error("consumer refused at start: {0}")]
    Start(#[from] StartError),
    /// The source failed (see its error).
    #[error(transparent)]
    Source(E),
    /// A task of an ordered key panicked (a bug, not a handler panic).
    #[error(
        "the task of ordered key {key} panicked ({reason}): stopped rather than settle later \
         positions past the lost one; restart to re-read from the last settled position"
    )]
    Panicked {
        /// The order key.
        key: String,
        /// The panic message.
        reason: String,
    },
}

impl<E: std::error::Error + 'static> RunError<E> {
    /// Into a binding's own error type: the source's error as it is, a
    /// start or panic error through the binding's `From<RunError<Infallible>>`
    /// (one `#[from]` arm), so callers match one error type.
    pub fn flatten<T>(self) -> T
    where
        T: From<E> + From<RunError<std::convert::Infallible>>,
    {
        match self {
            RunError::Start(s) => T::from(RunError::Start(s)),
            RunError::Panicked { key, reason } => T::from(RunError::Panicked { key, reason }),
            RunError::Source(e) => T::from(e),
        }
    }
}

/// The consumer runtime's settings; [`Runtime::run`] drives one source.
#[derive(Debug, Clone)]
pub struct Runtime {
    concurrency: usize,
    key_buffer: usize,
    shutdown_grace: Duration,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            concurrency: DEFAULT_CONCURRENCY,
            key_buffer: DEFAULT_KEY_BUFFER,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Default deliveries in progress at once.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Default deliveries buffered per order key before the key is paused.
pub const DEFAULT_KEY_BUFFER: usize = 256;
/// Default time in-flight deliveries get to settle at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

impl Runtime {
    /// The defaults: 32 in progress, 256 buffered per key, 30 s grace.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `n` deliveries in progress at once (default 32). On RabbitMQ,
    /// set the channel's prefetch to the same value.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Deliveries buffered per order key before the source is asked to
    /// pause it (default 256).
    #[must_use]
    pub fn key_buffer(mut self, n: usize) -> Self {
        self.key_buffer = n.max(1);
        self
    }

    /// How long in-flight deliveries get to settle at shutdown (default
    /// 30 s); the rest are abandoned unsettled and redelivered.
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// The configured concurrency.
    pub fn concurrency_limit(&self) -> usize {
        self.concurrency
    }

    /// Drives `source` through `processor` until `shutdown` completes
    /// (`Ok`) or the source fails.
    ///
    /// # Errors
    /// A start check failed, the source failed, or an ordered key's task panicked.
    pub async fn run<S: Source>(
        &self,
        mut source: S,
        processor: Arc<Processor>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RunError<S::Error>> {
        start_checks(&source, &processor).await?;
        source.check(&processor).await.map_err(RunError::Source)?;
        let names = source.names().join(", ");
        tracing::info!(source = %names, concurrency = self.concurrency, ordered = source.ordered(), "guarded consumer started");
        let mut run = Run {
            slots: Arc::new(Semaphore::new(self.concurrency)),
            stopping: Arc::new(AtomicBool::new(false)),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
            lanes: HashMap::new(),
            processor,
            key_buffer: self.key_buffer,
        };
        tokio::pin!(shutdown);
        // `stop`: shutdown was asked for (the future is never polled again);
        // `draining`: the source delivers what it holds, then ends.
        let mut stop = false;
        let mut draining = false;
        let ended: Result<(), RunError<S::Error>> = loop {
            if let Err(e) = run.reap() {
                break Err(e);
            }
            for key in source.revoked() {
                run.revoke(&key);
            }
            run.flush(&mut source);
            if !stop && futures::FutureExt::now_or_never(&mut shutdown).is_some() {
                stop = true;
            }
            if stop && !draining {
                if source.drain().await {
                    tracing::info!(source = %names, "shutdown: draining what the source holds");
                    draining = true;
                } else {
                    break Ok(());
                }
            }
            let mut slots = Vec::new();
            let mut probing = false;
            let max = if source.ordered() {
                // Read on: each lane waits for the gate before each delivery
                // (waiting here too would spend the probe on no delivery), and
                // an ordered source such as Kafka must keep polling to stay in
                // its group; full lanes pause their keys instead.
                self.key_buffer
            } else {
                let admit = tokio::select! {
                    biased;
                    _ = &mut shutdown, if !stop => {
                        stop = true;
                        continue;
                    }
                    a = run.processor.admission().wait() => a,
                };
                let first = tokio::select! {
                    biased;
                    _ = &mut shutdown, if !stop => {
                        stop = true;
                        continue;
                    }
                    p = run.slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break Ok(()),
                    },
                };
                probing = admit == Admit::Probe;
                slots.push(first);
                let want = if admit == Admit::Open {
                    self.concurrency
                } else {
                    1
                };
                while slots.len() < want {
                    match run.slots.clone().try_acquire_owned() {
                        Ok(p) => slots.push(p),
                        Err(_) => break,
                    }
                }
                slots.len()
            };
            let received = match source.receive(max).await {
                Ok(r) => r,
                Err(e) if draining => {
                    tracing::debug!(source = %names, end = %e, "drained");
                    break Ok(());
                }
                Err(e) => {
                    if !source.can_settle_after(&e) {
                        run.abandon();
                    }
                    tracing::warn!(source = %names, error = %e, "source failed: guarded consumer ending");
                    break Err(RunError::Source(e));
                }
            };
            if probing && received.is_empty() {
                run.processor.admission().release_probe();
            }
            for delivery in received {
                match delivery.message().order_key.clone() {
                    Some(key) => run.route(key, delivery, &mut source),
                    None => {
                        let slot = slots.pop();
                        run.spawn_unordered(delivery, slot);
                    }
                }
            }
        };
        run.finish(self.shutdown_grace).await;
        source.close().await;
        tracing::info!(source = %names, "guarded consumer stopped");
        ended
    }
}

/// Refuses a configuration whose broker limits make the no-loss promise
/// unkeepable; warns about what only slows things down.
async fn start_checks<S: Source>(source: &S, processor: &Processor) -> Result<(), StartError> {
    let limits = source.limits();
    let needed = processor
        .retry_policy()
        .deliveries_needed()
        .saturating_add(processor.handler_retry_policy().deliveries_needed());
    if let Some(max) = limits.max_deliveries
        && max <= needed
    {
        return Err(StartError::MaxDeliveries { max, needed });
    }
    if let Some(wait) = limits.ack_wait
        && wait > Duration::ZERO
        && processor.keep_alive_every() >= wait
    {
        tracing::warn!(ack_wait = ?wait, keep_alive_every = ?processor.keep_alive_every(),
            "the keep-alive interval is not shorter than the broker's ack deadline: slow messages may be redelivered while still in progress");
    }
    for name in source.names() {
        if limits.at_least_once && !processor.dead_letters_durable() {
            return Err(StartError::DeadLettersNotDurable { source_name: name });
        }
        match processor.preflight(&name).await {
            Ok(()) => {}
            Err(error) if error.is_permanent() => {
                return Err(StartError::DeadLetters {
                    source_name: name,
                    error,
                });
            }
            Err(e) => {
                tracing::warn!(source = %name, error = %e, "dead-letter destination not checked at start")
            }
        }
    }
    Ok(())
}

/// Set when an order key is revoked: its task stops and abandons the delivery in progress.
#[derive(Default)]
struct Revoked {
    flag: AtomicBool,
    notify: Notify,
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

/// One order key's queue: a bounded channel to its task, overflow held
/// here while the key is paused.
struct Lane<D> {
    tx: mpsc::Sender<D>,
    pending: VecDeque<D>,
    paused: bool,
    revoked: Arc<Revoked>,
}

/// The state of one run.
struct Run<D: Delivery + 'static> {
    slots: Arc<Semaphore>,
    stopping: Arc<AtomicBool>,
    tasks: JoinSet<()>,
    /// What each task works on: an order key, or (unordered) the coordinates.
    task_keys: HashMap<tokio::task::Id, (bool, String)>,
    lanes: HashMap<String, Lane<D>>,
    processor: Arc<Processor>,
    key_buffer: usize,
}

impl<D: Delivery + 'static> Run<D> {
    /// Collects finished tasks; a panicked ordered-key task ends the run.
    fn reap<E: std::error::Error + 'static>(&mut self) -> Result<(), RunError<E>> {
        while let Some(done) = self.tasks.try_join_next_with_id() {
            let (id, failure) = match done {
                Ok((id, ())) => (id, None),
                Err(e) => (e.id(), e.is_panic().then(|| e.to_string())),
            };
            let Some((ordered, what)) = self.task_keys.remove(&id) else {
                continue;
            };
            let Some(reason) = failure else {
                continue;
            };
            if ordered {
                tracing::error!(key = %what, panic = %reason, "the task of an ordered key panicked: stopping");
                return Err(RunError::Panicked { key: what, reason });
            }
            tracing::error!(source = %what, panic = %reason, "a delivery task panicked: the delivery is left unsettled for redelivery");
        }
        Ok(())
    }

    fn revoke(&mut self, key: &str) {
        if let Some(lane) = self.lanes.remove(key) {
            tracing::info!(%key, dropped = lane.pending.len(), "order key revoked: its queued deliveries are dropped unsettled");
            lane.revoked.set();
        }
    }

    /// Moves held deliveries into their lanes; resumes keys that drained.
    fn flush<S: Source<Delivery = D>>(&mut self, source: &mut S) {
        for (key, lane) in &mut self.lanes {
            while let Some(d) = lane.pending.pop_front() {
                match lane.tx.try_send(d) {
                    Ok(()) => {}
                    Err(
                        mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d),
                    ) => {
                        lane.pending.push_front(d);
                        break;
                    }
                }
            }
            if lane.paused && lane.pending.is_empty() {
                source.pause(key, false);
                lane.paused = false;
                tracing::debug!(%key, "order key resumed");
            }
        }
    }

    fn route<S: Source<Delivery = D>>(&mut self, key: String, delivery: D, source: &mut S) {
        if !self.lanes.contains_key(&key) {
            let lane = self.spawn_lane(&key);
            self.lanes.insert(key.clone(), lane);
        }
        let Some(lane) = self.lanes.get_mut(&key) else {
            return;
        };
        if !lane.pending.is_empty() {
            lane.pending.push_back(delivery);
            return;
        }
        match lane.tx.try_send(delivery) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d)) => {
                lane.pending.push_back(d);
                if !lane.paused {
                    source.pause(&key, true);
                    lane.paused = true;
                    tracing::debug!(%key, "order key paused: its buffer is full");
                }
            }
        }
    }

    fn spawn_lane(&mut self, key: &str) -> Lane<D> {
        let (tx, mut rx) = mpsc::channel::<D>(self.key_buffer);
        let revoked = Arc::new(Revoked::default());
        let lane_revoked = revoked.clone();
        let slots = self.slots.clone();
        let stopping = self.stopping.clone();
        let processor = self.processor.clone();
        let lane_key = key.to_string();
        let handle = self.tasks.spawn(async move {
            while let Some(delivery) = rx.recv().await {
                if lane_revoked.is_set() || stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(_slot) = slots.acquire().await else {
                    break;
                };
                // Backpressure: one probe at a time across keys during an outage.
                tokio::select! {
                    _ = processor.admission().wait() => {}
                    _ = lane_revoked.wait() => break,
                }
                let source = delivery.message().coordinates.to_string();
                tokio::select! {
                    r = processor.process(delivery) => log_outcome(&source, r),
                    _ = lane_revoked.wait() => {
                        tracing::info!(key = %lane_key, %source, "order key revoked: the delivery in progress is abandoned unsettled");
                        break;
                    }
                }
            }
        });
        self.task_keys.insert(handle.id(), (true, key.to_string()));
        Lane {
            tx,
            pending: VecDeque::new(),
            paused: false,
            revoked,
        }
    }

    fn spawn_unordered(&mut self, delivery: D, slot: Option<tokio::sync::OwnedSemaphorePermit>) {
        let processor = self.processor.clone();
        let source = delivery.message().coordinates.to_string();
        let what = source.clone();
        let handle = self.tasks.spawn(async move {
            let _slot = slot;
            log_outcome(&source, processor.process(delivery).await);
        });
        self.task_keys.insert(handle.id(), (false, what));
    }

    /// The source failed for good: nothing in flight can settle.
    fn abandon(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for lane in self.lanes.values() {
            lane.revoked.set();
        }
        self.tasks.abort_all();
    }

    /// Stops the lanes taking queued deliveries, gives what is in progress
    /// `grace`, then abandons the rest.
    async fn finish(&mut self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        // Dropping the lanes closes their channels: queued deliveries are
        // dropped unsettled (redelivered), the one in progress finishes.
        self.lanes.clear();
        let in_flight = self.tasks.len();
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = self.tasks.join_next().await {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(panic = %e, "a delivery task panicked while stopping");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                in_flight,
                still = self.tasks.len(),
                ?grace,
                "deliveries still in progress after the shutdown grace: abandoned unsettled, the broker redelivers them"
            );
            self.tasks.shutdown().await;
        }
        self.task_keys.clear();
    }
}

fn log_outcome(source: &str, result: Result<Outcome, crate::settle::ProcessError>) {
    match result {
        Ok(Outcome::Handled { .. }) => {}
        Ok(outcome) => tracing::debug!(%source, ?outcome, "delivery settled"),
        Err(e) => tracing::warn!(%source, error = %e, "delivery left unsettled for redelivery"),
    }
}

#[cfg(test)]
mod tests;
