//! The JetStream pull-consumer guard: fetches in batches from a durable,
//! explicit-ack consumer the application created, runs every message through
//! core's [`Processor`] with bounded concurrency, and settles with JetStream
//! acks: `+ACK` (handled), `+TERM` (dead letter confirmed), `-NAK {delay}`
//! (retry later), `+WPI` (still working, while waiting on the TTS or handler).
//!
//! Delivery semantics: at-least-once. A message is acked only after its
//! handler succeeded or its dead letter was stored; anything unsettled (crash,
//! lost connection, failed ack) is redelivered by the server after `ack_wait`.
//! The delivery count is the server's (`delivered` in the message info).
//!
//! Limits: the consumer's `max_deliver` must be larger than the number of
//! deliveries the processor's retry policies can use (or unlimited, `-1`):
//! core dead-letters `retries-exhausted` at its own bound (a count, or for
//! outages a duration, see [`elevate_core::retry::RetryPolicy`]). If the
//! server hit `max_deliver` first it would stop redelivering: the message
//! would stay in the stream, unacked and not dead-lettered (the server only
//! emits a `MAX_DELIVERIES` advisory). [`GuardedConsumer::run`] refuses to
//! start on such a consumer.
//!
//! Backpressure: while a dependency of the guard is down
//! ([`elevate_core::Processor::admission`]) the guard pulls one message at a
//! time, as a probe, instead of a batch.
//!
//! Unreadable messages: a message whose header block async-nats cannot parse
//! (not UTF-8, a bad name, no `:`, a status line, a bare CR) never reaches the
//! guard; async-nats drops the connection on it (or, for a bare CR, panics).
//! With [`GuardedConsumer::unreadable`] the guard reads such messages from the
//! stream and dead-letters them `malformed-message` (see [`crate::unreadable`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, Subject};
use bytes::Bytes;
use elevate_core::message::{Coordinates, InboundMessage};
use elevate_core::runtime::{Limits, RunError, Runtime, Source};
use elevate_core::settle::{DeadLetterPublisher, Delivery, Processor, TransportError};
use futures::StreamExt;

use crate::Error;
use crate::deadletter::NatsDeadLetters;
use crate::headers::{NATS_MSG_ID, from_nats_headers};
use crate::unreadable::{Sweeper, UnreadableMessages};

/// Guards a JetStream pull consumer.
pub struct GuardedConsumer {
    consumer: PullConsumer,
    processor: Arc<Processor>,
    concurrency: usize,
    batch: usize,
    fetch_expires: Duration,
    confirm_settlement: bool,
    settle_timeout: Duration,
    unreadable: Option<UnreadableMessages>,
}

impl std::fmt::Debug for GuardedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedConsumer")
            .field("consumer", &self.consumer.cached_info().name)
            .field("stream", &self.consumer.cached_info().stream_name)
            .field("concurrency", &self.concurrency)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl GuardedConsumer {
    /// Wraps a pull consumer with the defaults: a processor without a
    /// dead-letter publisher gets one sending the letters of `<subject>` to
    /// `<subject>` + [`Processor::dead_letter_suffix`] (`orders.created.dlq`;
    /// [`crate::NatsDeadLetters::jetstream_by_subject`]: a stream other than
    /// the source stream must store them, checked at start), and messages
    /// async-nats cannot read are swept to the dead letters
    /// ([`GuardedConsumer::unreadable`]).
    pub fn bind(
        js: &jetstream::Context,
        consumer: PullConsumer,
        processor: Arc<Processor>,
    ) -> Self {
        let config = &consumer.cached_info().config;
        let mut filters = config.filter_subjects.clone();
        if !config.filter_subject.is_empty() {
            filters.push(config.filter_subject.clone());
        }
        let processor =
            processor
                .or_bind_dead_letters(|suffix| {
                    Ok::<_, std::convert::Infallible>(Arc::new(
                        NatsDeadLetters::jetstream_by_subject(js.clone(), suffix, filters),
                    )
                        as Arc<dyn DeadLetterPublisher>)
                })
                .unwrap_or_else(|never| match never {});
        Self::new(consumer, processor).unreadable(UnreadableMessages::new(js.clone()))
    }

    /// Wraps a pull consumer (durable, `AckPolicy::Explicit`); dead letters go
    /// wherever the processor's [`elevate_core::DeadLetterPublisher`] sends them
    /// (use [`crate::NatsDeadLetters::jetstream`], or [`GuardedConsumer::bind`]
    /// for the defaults). The runtime refuses to start without one.
    pub fn new(consumer: PullConsumer, processor: Arc<Processor>) -> Self {
        GuardedConsumer {
            consumer,
            processor,
            concurrency: elevate_core::runtime::DEFAULT_CONCURRENCY,
            batch: 64,
            fetch_expires: Duration::from_secs(1),
            confirm_settlement: true,
            settle_timeout: Duration::from_secs(5),
            unreadable: None,
        }
    }

    /// At most `n` messages in flight (verdict, handler, settlement); default 32.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// At most `n` messages per pull request (never more than the free slots); default 64.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// How long one pull request waits for messages; bounds shutdown latency; default 1 s.
    pub fn fetch_expires(mut self, d: Duration) -> Self {
        self.fetch_expires = d.max(Duration::from_millis(100));
        self
    }

    /// Wait for the server to confirm each ack/term/nak (double ack); default on.
    /// Off: settlements are fire-and-forget (faster; a lost ack means a redelivery).
    pub fn confirm_settlement(mut self, on: bool) -> Self {
        self.confirm_settlement = on;
        self
    }

    /// How long to wait for a settlement confirmation; default 5 s.
    pub fn settle_timeout(mut self, d: Duration) -> Self {
        self.settle_timeout = d;
        self
    }

    /// Dead-letters the messages async-nats cannot read, reading them from the
    /// stream (at start, after each reconnect, and periodically; see
    /// [`crate::unreadable`]). Without it, such a message is redelivered every
    /// `ack_wait`, forever, and costs the client a reconnect each time. It also
    /// makes [`GuardedConsumer::run`] end with [`Error::ClientClosed`] when the
    /// client stopped for good (async-nats panicked), instead of retrying forever.
    pub fn unreadable(mut self, unreadable: UnreadableMessages) -> Self {
        self.unreadable = Some(unreadable);
        self
    }

    /// Runs until `shutdown` completes, then finishes the current pull and
    /// waits for the messages in flight. Errors on a misconfigured consumer, and
    /// (with [`GuardedConsumer::unreadable`]) when the client stopped for good.
    /// Core's [`Runtime`] drives it: start checks (`max_deliver` against the
    /// retry policies, `ack_wait` against the keep-alive, durable dead
    /// letters, the dead-letter stream), concurrency, backpressure (a pull of
    /// one while a dependency is down), panics and shutdown.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] if the consumer is misconfigured (for example, not
    /// `AckPolicy::Explicit`), [`Error::ClientClosed`] if the client stopped for good (detected
    /// with [`GuardedConsumer::unreadable`]), and [`Error::Runtime`] if core's runtime refuses to
    /// start (a start check such as `max_deliver` or `ack_wait` against the policies) or a task
    /// panics.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let (runtime, source, processor) = self.into_parts();
        runtime
            .run(source, processor, shutdown)
            .await
            .map_err(RunError::flatten)
    }

    /// The consumer taken apart: core's [`Runtime`] as configured, the pull
    /// consumer as a [`Source`], and the processor; [`run`](Self::run) is
    /// `runtime.run(source, processor, shutdown)`. The parts let a test kit
    /// drive the source by hand (`elevate_testing::delivery`, the Delivery
    /// contract) or an application run it in a runtime of its own.
    pub fn into_parts(self) -> (Runtime, JetStreamSource, Arc<Processor>) {
        let sweeper = match self.unreadable.clone() {
            Some(u) => Some(Sweeper::new(u)),
            None => {
                let info = self.consumer.cached_info();
                tracing::warn!(consumer = %info.name, stream = %info.stream_name,
                    "no GuardedConsumer::unreadable: a message whose headers async-nats cannot parse \
                     is redelivered forever and disconnects the client on each delivery");
                None
            }
        };
        let source = JetStreamSource {
            consumer: self.consumer,
            processor: self.processor.clone(),
            sweeper,
            fetch_expires: self.fetch_expires,
            batch: self.batch,
            settle: Settle {
                confirm: self.confirm_settlement,
                timeout: self.settle_timeout,
            },
            backoff: MIN_BACKOFF,
            pending: None,
        };
        (
            Runtime::new().concurrency(self.concurrency),
            source,
            self.processor,
        )
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The pull consumer as a [`Source`] for core's runtime: at-least-once,
/// the consumer's `max_deliver` and `ack_wait` as its limits, unreadable
/// messages swept aside. Made by [`GuardedConsumer::into_parts`].
pub struct JetStreamSource {
    consumer: PullConsumer,
    processor: Arc<Processor>,
    sweeper: Option<Sweeper>,
    fetch_expires: Duration,
    batch: usize,
    settle: Settle,
    backoff: Duration,
    /// The pull request being delivered, if one is open.
    pending: Option<async_nats::jetstream::consumer::pull::Batch>,
}

#[async_trait::async_trait]
impl Source for JetStreamSource {
    type Delivery = JetStreamDelivery;
    type Error = Error;

    fn names(&self) -> Vec<String> {
        vec![self.consumer.cached_info().stream_name.clone()]
    }

    fn limits(&self) -> Limits {
        let config = &self.consumer.cached_info().config;
        Limits::at_least_once()
            .with_max_deliveries(u64::try_from(config.max_deliver).ok().filter(|m| *m > 0))
            .with_ack_wait(Some(config.ack_wait).filter(|w| *w > Duration::ZERO))
    }

    async fn check(&mut self, _: &Processor) -> Result<(), Error> {
        let info = self.consumer.cached_info();
        if info.config.ack_policy != AckPolicy::Explicit {
            return Err(Error::Config(format!(
                "consumer {} on stream {} must use AckPolicy::Explicit (has {:?})",
                info.name, info.stream_name, info.config.ack_policy
            )));
        }
        tracing::info!(consumer = %info.name, stream = %info.stream_name, "JetStream guard started");
        Ok(())
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<JetStreamDelivery>, Error> {
        if self.pending.is_none() {
            if let Some(s) = self.sweeper.as_mut()
                && s.due()
            {
                s.run(&self.consumer, &self.processor).await;
            }
            let request = self
                .consumer
                .batch()
                .max_messages(max.min(self.batch).max(1))
                .expires(self.fetch_expires)
                .messages();
            match request.await {
                Ok(b) => self.pending = Some(b),
                Err(e) => return self.failed(e.to_string()).await.map(|()| Vec::new()),
            }
        }
        // A pull request delivers over up to `fetch_expires`: hand over what
        // has arrived (waiting a bounded time for the first) and keep the
        // rest of the request for the next call, so no message waits for
        // its batch to end and none that was delivered is left unread.
        let mut out = Vec::new();
        let mut first = true;
        while out.len() < max {
            let Some(batch) = self.pending.as_mut() else {
                break;
            };
            let next = if first {
                first = false;
                match tokio::time::timeout(RECEIVE_IDLE, batch.next()).await {
                    Err(_) => break,
                    Ok(n) => n,
                }
            } else {
                match futures::FutureExt::now_or_never(batch.next()) {
                    None => break,
                    Some(n) => n,
                }
            };
            match next {
                None => {
                    // the request ended (fulfilled or expired): the next call pulls again
                    self.pending = None;
                    self.backoff = MIN_BACKOFF;
                }
                Some(Ok(msg)) => match JetStreamDelivery::new(msg, self.settle.clone()) {
                    Ok(d) => out.push(d),
                    Err(e) => {
                        tracing::warn!(error = %e, "not a JetStream consumer message: skipped")
                    }
                },
                Some(Err(e)) => {
                    self.pending = None;
                    self.failed(e.to_string()).await?;
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// How long one receive waits for the next message of a pull before the
/// runtime looks around.
const RECEIVE_IDLE: Duration = Duration::from_millis(500);

impl JetStreamSource {
    /// A pull failed: ends the run if the client stopped for good, else
    /// waits a growing backoff before the next pull.
    async fn failed(&mut self, e: String) -> Result<(), Error> {
        if let Some(s) = &self.sweeper
            && let Some(why) = s.client_closed().await
        {
            tracing::error!(error = %e, closed = %why, "the NATS client stopped for good: guard ending");
            return Err(Error::ClientClosed(why));
        }
        tracing::warn!(error = %e, backoff = ?self.backoff, "pull request failed: retrying");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }
}

#[derive(Clone)]
struct Settle {
    confirm: bool,
    timeout: Duration,
}

/// One JetStream message awaiting settlement.
pub struct JetStreamDelivery {
    msg: InboundMessage,
    reply: Subject,
    client: Client,
    settle: Settle,
}

impl std::fmt::Debug for JetStreamDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamDelivery")
            .field("coordinates", &self.msg.coordinates)
            .field("attempt", &self.msg.delivery_attempt)
            .finish_non_exhaustive()
    }
}

impl JetStreamDelivery {
    fn new(msg: jetstream::Message, settle: Settle) -> Result<Self, Error> {
        let inbound = inbound_from_jetstream(&msg)?;
        let client = msg.context.client();
        let reply = msg
            .message
            .reply
            .clone()
            .ok_or_else(|| Error::NotJetStream("no reply subject".into()))?;
        Ok(JetStreamDelivery {
            msg: inbound,
            reply,
            client,
            settle,
        })
    }

    async fn send(&self, op: &'static str, kind: AckKind) -> Result<(), TransportError> {
        let payload: Bytes = kind.into();
        let client = &self.client;
        if self.settle.confirm {
            let req = client.request(self.reply.clone(), payload);
            match tokio::time::timeout(self.settle.timeout, req).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(TransportError::new(op, e)),
                Err(_) => Err(TransportError::new(op, "no confirmation from the server")),
            }
        } else {
            client
                .publish(self.reply.clone(), payload)
                .await
                .map_err(|e| TransportError::new(op, e))
        }
    }
}

/// Maps a JetStream message to the broker-neutral message.
///
/// # Errors
///
/// Returns [`Error::NotJetStream`] if the message's reply subject carries no JetStream metadata (it
/// was not delivered by a JetStream consumer).
pub fn inbound_from_jetstream(msg: &jetstream::Message) -> Result<InboundMessage, Error> {
    let info = msg.info().map_err(|e| Error::NotJetStream(e.to_string()))?;
    let headers = from_nats_headers(msg.message.headers.as_ref());
    let message_id = headers.get_str(NATS_MSG_ID).map(str::to_string);
    let published_at_ms = i64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok();
    let subject = msg.message.subject.as_str();
    let mut inbound = InboundMessage::new(
        stream_coordinates(info.stream, info.stream_sequence, subject),
        subject,
        headers,
        msg.message.payload.clone(),
    );
    inbound.message_id = message_id;
    inbound.delivery_attempt = u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX);
    inbound.published_at_ms = published_at_ms;
    Ok(inbound)
}

/// The coordinates of message `seq` of `stream`, published to `subject`
/// (`nats:<stream>/<seq>/<subject>`: a position the server assigned).
pub fn stream_coordinates(stream: &str, seq: u64, subject: &str) -> Coordinates {
    Coordinates::new("nats", format!("{stream}/{seq}/{subject}"))
        .with("subject", subject)
        .with("stream", stream)
        .with("stream_seq", seq)
}

#[async_trait::async_trait]
impl Delivery for JetStreamDelivery {
    fn message(&self) -> &InboundMessage {
        &self.msg
    }

    async fn ack(self) -> Result<(), TransportError> {
        self.send("ack", AckKind::Ack).await
    }

    async fn ack_dead_lettered(self) -> Result<(), TransportError> {
        self.send("term", AckKind::Term).await
    }

    async fn redeliver(self, delay: Duration) -> Result<(), TransportError> {
        self.send("nak", AckKind::Nak(Some(delay))).await
    }

    async fn keep_alive(&self) -> Result<(), TransportError> {
        // Progress is never confirmed: it is repeated, and a lost one only shortens the deadline.
        self.client
            .publish(self.reply.clone(), AckKind::Progress.into())
            .await
            .map_err(|e| TransportError::new("progress", e))
    }
}
