//! The guarded worker: wraps a lapin [`Consumer`] and settles every delivery
//! through core's [`Processor`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use elevate_core::CTX_REF_HEADER;
use elevate_core::message::{Coordinates, InboundMessage};
use elevate_core::runtime::{RunError, Runtime, Source};
use elevate_core::settle::{DeadLetterPublisher, Delivery, Processor, TransportError};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Acker, BasicProperties, Consumer};

use crate::deadletter::AmqpDeadLetters;
use crate::headers::{self, as_str, as_u64};
use crate::publish::{ConfirmChannel, carried_properties, destination, properties_by_name};
use crate::{Error, H_ATTEMPT, H_DESTINATION, X_DEATH};

/// Runs a user's lapin consumer through the guard.
///
/// Concurrency: at most [`concurrency`](Self::concurrency) deliveries are processed at
/// once. The broker-side bound is the channel's `basic_qos` prefetch, which **the user
/// sets** on the consumer's channel before `basic_consume`; set both to the same value
/// (a prefetch above the limit only parks messages in memory, one below it idles workers).
///
/// Settlement (all decided by core's [`Processor`]): Permit → handler → `basic_ack`;
/// Deny/Quarantine → dead letter published and confirmed → `basic_ack`; Retry → a copy
/// goes to the retry queue `<queue>.retry` with `x-elevate-attempt` = attempt + 1 and a
/// per-message `expiration` = the delay, the copy's confirm is awaited, then the
/// original is acked; the retry queue dead-letters it back to `<queue>` when the delay
/// ends (see [`crate::declare_queues`]). A delivery that cannot be settled (broker
/// error) is handed back with `basic_nack(requeue)` after
/// [`unsettled_requeue_delay`](Self::unsettled_requeue_delay); if the channel or
/// connection is gone, the broker requeues every unacked message itself. Nothing is
/// ever acked unsettled.
pub struct GuardedConsumer {
    consumer: Consumer,
    processor: Arc<Processor>,
    retry: ConfirmChannel,
    queue: String,
    retry_queue: String,
    retry_user: Option<String>,
    concurrency: usize,
    requeue_delay: Duration,
    drain_timeout: Duration,
    ack_timeout: Duration,
}

impl std::fmt::Debug for GuardedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedConsumer")
            .field("queue", &self.queue)
            .field("retry_queue", &self.retry_queue)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl GuardedConsumer {
    /// Wraps `consumer` (created by the user with `basic_consume`, `no_ack: false`).
    /// `retry` is a confirming channel used to publish retry copies (it may be the
    /// dead-letter publisher's channel).
    ///
    /// A processor without a dead-letter publisher gets the default: letters
    /// of `<queue>` go to the queue `<queue>` + [`Processor::dead_letter_suffix`]
    /// (`.dlq`, as [`crate::declare_queues`] declares it) through `retry`'s
    /// confirming channel. Declare it: a letter to a missing queue is
    /// returned unroutable and its message stays unsettled.
    pub fn new(consumer: Consumer, processor: Arc<Processor>, retry: ConfirmChannel) -> Self {
        let queue = consumer.queue().to_string();
        let processor = processor
            .or_bind_dead_letters(|suffix| {
                Ok::<_, std::convert::Infallible>(Arc::new(AmqpDeadLetters::with_confirm_channel(
                    retry.clone(),
                    "",
                    format!("{queue}{suffix}"),
                ))
                    as Arc<dyn DeadLetterPublisher>)
            })
            .unwrap_or_else(|never| match never {});
        GuardedConsumer {
            retry_queue: crate::retry_queue_name(&queue),
            queue,
            consumer,
            processor,
            retry,
            concurrency: elevate_core::runtime::DEFAULT_CONCURRENCY,
            retry_user: None,
            requeue_delay: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(5),
        }
    }

    /// How long an ack or nack may wait for the broker (default 5 s). On a
    /// connection that died silently it never completes; past this the
    /// delivery counts as unsettled and the broker redelivers it.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Maximum deliveries processed at once (default 32, core's
    /// [`elevate_core::runtime::DEFAULT_CONCURRENCY`]; match the channel's prefetch).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Uses another retry queue than `<queue>.retry`.
    pub fn retry_queue(mut self, name: impl Into<String>) -> Self {
        self.retry_queue = name.into();
        self
    }

    /// Authenticates retry copies by the broker user this worker connects as.
    ///
    /// A retry copy carries the destination the message was first delivered
    /// through (`x-elevate-destination`), since it comes back through the
    /// default exchange. Headers can be forged by anyone who may publish to
    /// the work queue; the AMQP `user-id` property cannot: RabbitMQ refuses a
    /// publish whose `user-id` is not the connection's user. With this set,
    /// retry copies are published with `user-id = user` and a returning
    /// copy's destination is believed only when its `user-id` matches;
    /// anything else is checked against the exchange and routing key it
    /// really arrived by. Without it, the header is believed on any message
    /// that shows the retry queue in `x-death` (a warning says so at start).
    pub fn retry_user(mut self, user: impl Into<String>) -> Self {
        self.retry_user = Some(user.into());
        self
    }

    /// How long an unsettleable delivery is held before `basic_nack(requeue)` (default 1 s;
    /// holding its prefetch slot throttles a broker that keeps failing).
    pub fn unsettled_requeue_delay(mut self, delay: Duration) -> Self {
        self.requeue_delay = delay;
        self
    }

    /// How long `run` waits for in-flight deliveries when it ends (default 30 s); those
    /// still running then are aborted, unsettled, and go back to the broker.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Processes deliveries until `shutdown` completes (`Ok`), or the
    /// consumer is cancelled by the broker ([`Error::ConsumerCancelled`]) or
    /// the channel or connection fails (returned as an error: unacked
    /// messages are back with the broker; reconnect and run again, or use
    /// [`crate::supervise_worker`], which does). Core's [`Runtime`] drives it:
    /// start checks, concurrency, backpressure, panics and the shutdown
    /// grace ([`drain_timeout`](Self::drain_timeout)); buffered deliveries
    /// are handed back (`basic_nack(requeue)`) at the end, and on a lost
    /// connection in-flight deliveries are abandoned at once (the broker
    /// already requeued them).
    ///
    /// # Errors
    ///
    /// Returns [`Error::ConsumerCancelled`] if the broker cancels the consumer, [`Error::Lapin`] if
    /// the channel or connection fails, [`Error::ConfirmChannelClosed`] if the channel used for
    /// retry copies closes, and [`Error::Runtime`] if core's runtime refuses to start (a start
    /// check) or a task panics.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let (runtime, source, processor) = self.into_parts();
        runtime
            .run(source, processor, shutdown)
            .await
            .map_err(RunError::flatten)
    }

    /// The worker taken apart: core's [`Runtime`] as configured, the queue
    /// as a [`Source`], and the processor; [`run`](Self::run) is
    /// `runtime.run(source, processor, shutdown)`. The parts let a test kit
    /// drive the source by hand (`elevate_testing::delivery`, the Delivery
    /// contract) or an application run the source in a runtime of its own.
    pub fn into_parts(self) -> (Runtime, AmqpSource, Arc<Processor>) {
        let GuardedConsumer {
            consumer,
            processor,
            retry,
            queue,
            retry_queue,
            retry_user,
            concurrency,
            requeue_delay,
            drain_timeout,
            ack_timeout,
        } = self;
        if retry_user.is_none() {
            tracing::warn!(%queue, "retry copies are not authenticated: a publisher to the work queue could claim another destination; set GuardedConsumer::retry_user");
        }
        let ctx = Arc::new(Ctx {
            retry,
            queue,
            retry_queue,
            retry_user,
            requeue_delay,
            ack_timeout,
        });
        let runtime = Runtime::new()
            .concurrency(concurrency)
            .shutdown_grace(drain_timeout);
        (runtime, AmqpSource { consumer, ctx }, processor)
    }
}

/// The work queue as a [`Source`] for core's runtime: receives
/// [`AmqpDelivery`]s, hands back what it buffered on close. Made by
/// [`GuardedConsumer::into_parts`].
pub struct AmqpSource {
    consumer: Consumer,
    ctx: Arc<Ctx>,
}

/// How long one receive waits for a delivery before the runtime looks around.
const RECEIVE_IDLE: Duration = Duration::from_millis(500);

#[async_trait::async_trait]
impl Source for AmqpSource {
    type Delivery = AmqpDelivery;
    type Error = Error;

    fn names(&self) -> Vec<String> {
        vec![self.ctx.queue.clone()]
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<AmqpDelivery>, Error> {
        // Without its confirming channel no Deny, Quarantine or Retry can be
        // settled: every such delivery would be requeued again and again.
        // Stop and let the caller reconnect (unacked messages go back).
        if !self.ctx.retry.channel().status().connected() {
            return Err(Error::ConfirmChannelClosed);
        }
        let mut out = Vec::new();
        match tokio::time::timeout(RECEIVE_IDLE, self.consumer.next()).await {
            Err(_) => return Ok(out),
            Ok(next) => out.push(self.delivery(next)?),
        }
        while out.len() < max {
            match self.consumer.next().now_or_never() {
                Some(next) => out.push(self.delivery(next)?),
                None => break,
            }
        }
        Ok(out)
    }

    fn can_settle_after(&self, error: &Error) -> bool {
        // A cancelled consumer's channel still settles what is in flight.
        matches!(error, Error::ConsumerCancelled(_))
    }

    async fn close(&mut self) {
        // Hand back what is buffered but not started.
        while let Some(Some(Ok(d))) = self.consumer.next().now_or_never() {
            let _ = d
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
        }
    }
}

impl AmqpSource {
    fn delivery(
        &self,
        next: Option<Result<lapin::message::Delivery, lapin::Error>>,
    ) -> Result<AmqpDelivery, Error> {
        match next {
            None => Err(Error::ConsumerCancelled(self.ctx.queue.clone())),
            Some(Err(e)) => Err(Error::Lapin(e)),
            Some(Ok(d)) => Ok(AmqpDelivery::from_lapin(d, self.ctx.clone())),
        }
    }
}

struct Ctx {
    retry: ConfirmChannel,
    queue: String,
    retry_queue: String,
    retry_user: Option<String>,
    requeue_delay: Duration,
    ack_timeout: Duration,
}

/// One AMQP delivery awaiting settlement.
pub struct AmqpDelivery {
    msg: InboundMessage,
    acker: Acker,
    properties: BasicProperties,
    ctx: Arc<Ctx>,
    settled: bool,
    /// A retry copy of this worker's own (its broker history may be believed).
    authentic: bool,
}

impl std::fmt::Debug for AmqpDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpDelivery")
            .field("source", &self.msg.coordinates)
            .finish_non_exhaustive()
    }
}

impl AmqpDelivery {
    fn from_lapin(d: lapin::message::Delivery, ctx: Arc<Ctx>) -> Self {
        let lapin::message::Delivery {
            delivery_tag,
            exchange,
            routing_key,
            properties,
            data,
            acker,
            ..
        } = d;
        let table = properties.headers().as_ref();
        // A retry copy is believed (its destination, its attempt count) only
        // when its user-id is the worker's: RabbitMQ checks that property.
        let authentic = ctx
            .retry_user
            .as_deref()
            .is_none_or(|u| properties.user_id().as_ref().map(|id| id.as_str()) == Some(u));
        let destination = inbound_destination(
            exchange.as_str(),
            routing_key.as_str(),
            table,
            &ctx.queue,
            &ctx.retry_queue,
            authentic,
        );
        let coordinates = Coordinates::new("amqp", format!("{}/{delivery_tag}", ctx.queue))
            .with("queue", ctx.queue.as_str())
            .with("exchange", exchange.as_str())
            .with("routing_key", routing_key.as_str())
            .with("delivery_tag", delivery_tag);
        let headers = headers::decode(table);
        let message_id = properties.message_id().as_ref().map(|m| m.to_string());
        // Delivery tags change on redelivery: the publisher's message id is the
        // only stable handle (a verbatim copy with the same id looks like a
        // redelivery: documented), else the reference's hash.
        let position = match &message_id {
            Some(id) => format!("amqp:{}/{id}", ctx.queue),
            None => format!(
                "amqp:{}#{}",
                ctx.queue,
                elevate_core::keys::sha256_hex(headers.get(CTX_REF_HEADER).unwrap_or_default())
            ),
        };
        let mut msg = InboundMessage::new(coordinates, destination, headers, Bytes::from(data));
        msg.message_id = message_id;
        msg.position = position;
        msg.delivery_attempt = attempt(table, &ctx.retry_queue, authentic);
        msg.published_at_ms = properties
            .timestamp()
            .and_then(|t| i64::try_from(t).ok())
            .map(|t| t.saturating_mul(1000));
        msg.properties = properties_by_name(&properties);
        AmqpDelivery {
            msg,
            acker,
            properties,
            ctx,
            settled: false,
            authentic,
        }
    }

    /// The original AMQP properties.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    async fn settle_ack(&mut self) -> Result<(), TransportError> {
        self.settled = true;
        let ack = self.acker.ack(BasicAckOptions::default());
        match tokio::time::timeout(self.ctx.ack_timeout, ack).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(TransportError::new(
                "ack",
                "channel closed (the broker will redeliver)",
            )),
            Ok(Err(e)) => Err(TransportError::new("ack", e)),
            Err(_) => Err(TransportError::new(
                "ack",
                "no answer in time: the connection is probably gone (the broker will redeliver)",
            )),
        }
    }

    fn retry_properties(&self, delay: Duration) -> Result<BasicProperties, Error> {
        let o = &self.properties;
        let mut table = o.headers().clone().unwrap_or_default();
        if !self.authentic {
            // A history a publisher wrote would be carried into our own copy
            // (and counted on by the broker): only ours may accumulate.
            let mut map = table.inner().clone();
            map.remove(X_DEATH);
            table = FieldTable::from(map);
        }
        // Informational only: the attempt is read back from the broker's x-death.
        let next = i64::from(self.msg.delivery_attempt.max(1)) + 1;
        table.insert(ShortString::from(H_ATTEMPT), AMQPValue::LongLongInt(next));
        table.insert(
            ShortString::from(H_DESTINATION),
            AMQPValue::LongString(LongString::from(self.msg.destination.as_bytes())),
        );
        let ms = delay.as_millis().min(u128::from(u32::MAX)).to_string();
        let props = carried_properties(o)
            .with_headers(table)
            .with_expiration(ShortString::from(ms))
            .with_delivery_mode(o.delivery_mode().unwrap_or(crate::publish::PERSISTENT));
        Ok(match &self.ctx.retry_user {
            Some(user) => props.with_user_id(ShortString::from(user.as_str())),
            None => props,
        })
    }
}

impl Drop for AmqpDelivery {
    fn drop(&mut self) {
        if self.settled || !self.acker.usable() {
            return;
        }
        // Not settled (broker failure mid-settlement, or the task was aborted):
        // give it back so it is not stuck unacked until the channel closes.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let acker = self.acker.clone();
            let delay = self.ctx.requeue_delay;
            rt.spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
            });
        }
    }
}

#[async_trait::async_trait]
impl Delivery for AmqpDelivery {
    fn message(&self) -> &InboundMessage {
        &self.msg
    }

    async fn ack(mut self) -> Result<(), TransportError> {
        self.settle_ack().await
    }

    async fn redeliver(mut self, delay: Duration) -> Result<(), TransportError> {
        let props = self
            .retry_properties(delay)
            .map_err(|e| TransportError::new("retry publish", e))?;
        if let Err(e) = self.ctx.retry.header_fits(&props, self.msg.payload.len()) {
            // A copy with the retry headers would not fit the connection's
            // frame_max: wait here instead and hand the original back.
            tracing::debug!(source = %self.msg.coordinates, error = %e, ?delay, "retry copy would not fit: waiting in place, then requeueing the original");
            tokio::time::sleep(delay).await;
            self.settled = true;
            let nack = self.acker.nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            });
            return match tokio::time::timeout(self.ctx.ack_timeout, nack).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(TransportError::new("nack", e)),
                Err(_) => Err(TransportError::new("nack", "no answer in time")),
            };
        }
        self.ctx
            .retry
            .publish("", &self.ctx.retry_queue, &self.msg.payload, props)
            .await
            .map_err(|e| TransportError::new("retry publish", e))?;
        self.settle_ack().await
    }
}

/// The destination a delivery was read from. A retry copy coming back from
/// `<queue>.retry` (default exchange, routing key = the queue, an `x-death` entry for
/// the retry queue, and `copy_authentic`: its `user-id` is the worker's, when one is
/// configured) keeps the destination recorded in `x-elevate-destination` when it was
/// parked; anything else is `<exchange>/<routing_key>` or the routing key alone.
fn inbound_destination(
    exchange: &str,
    routing_key: &str,
    table: Option<&FieldTable>,
    queue: &str,
    retry_queue: &str,
    copy_authentic: bool,
) -> String {
    let direct = destination(exchange, routing_key);
    if !exchange.is_empty() || routing_key != queue || !copy_authentic {
        return direct;
    }
    let Some(table) = table else {
        return direct;
    };
    let from_retry = deaths(table).any(|d| {
        d.inner().get("queue").and_then(as_str) == Some(retry_queue)
            && d.inner().get("reason").and_then(as_str) == Some("expired")
    });
    match table.inner().get(H_DESTINATION).and_then(as_str) {
        Some(dst) if from_retry && !dst.is_empty() => dst.to_string(),
        _ => direct,
    }
}

fn deaths(table: &FieldTable) -> impl Iterator<Item = &FieldTable> {
    let items = match table.inner().get(X_DEATH) {
        Some(AMQPValue::FieldArray(a)) => a.as_slice(),
        _ => &[],
    };
    items.iter().filter_map(|v| match v {
        AMQPValue::FieldTable(t) => Some(t),
        _ => None,
    })
}

/// Delivery attempt: 1 + the broker's `x-death` count of expiries in the retry
/// queue, on an authentic copy (see [`GuardedConsumer::retry_user`]); 1 for a
/// first delivery or anything a publisher could have written. Never the
/// `x-elevate-attempt` header: a publisher could set it to exhaust retries.
fn attempt(table: Option<&FieldTable>, retry_queue: &str, authentic: bool) -> u32 {
    let Some(table) = table.filter(|_| authentic) else {
        return 1;
    };
    let expired = deaths(table)
        .filter(|d| d.inner().get("queue").and_then(as_str) == Some(retry_queue))
        .filter(|d| d.inner().get("reason").and_then(as_str) == Some("expired"))
        .filter_map(|d| d.inner().get("count").and_then(as_u64))
        .sum::<u64>();
    u32::try_from(expired.saturating_add(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn death(queue: &str, reason: &str, count: i64) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("queue".into(), AMQPValue::LongString(queue.into()));
        t.insert("reason".into(), AMQPValue::LongString(reason.into()));
        t.insert("count".into(), AMQPValue::LongLongInt(count));
        AMQPValue::FieldTable(t)
    }

    #[test]
    fn attempts_come_from_the_brokers_count_only() {
        assert_eq!(attempt(None, "q.retry", true), 1);
        let mut t = FieldTable::default();
        // a publisher-set attempt header is never believed
        t.insert(H_ATTEMPT.into(), AMQPValue::LongLongInt(99));
        assert_eq!(attempt(Some(&t), "q.retry", true), 1);
        t.insert(
            X_DEATH.into(),
            AMQPValue::FieldArray(
                vec![death("q.retry", "expired", 4), death("q", "rejected", 7)].into(),
            ),
        );
        assert_eq!(attempt(Some(&t), "q.retry", true), 5);
        // nor is an x-death on a copy that is not the worker's own
        assert_eq!(attempt(Some(&t), "q.retry", false), 1);
    }

    #[test]
    fn retried_destination_needs_the_retry_path() {
        let mut t = FieldTable::default();
        t.insert(
            H_DESTINATION.into(),
            AMQPValue::LongString("billing/invoice".into()),
        );
        // a plain publish claiming a destination is not believed
        assert_eq!(
            inbound_destination("", "q", Some(&t), "q", "q.retry", true),
            "q"
        );
        t.insert(
            X_DEATH.into(),
            AMQPValue::FieldArray(vec![death("q.retry", "expired", 1)].into()),
        );
        assert_eq!(
            inbound_destination("", "q", Some(&t), "q", "q.retry", true),
            "billing/invoice"
        );
        // the same headers on a copy whose user-id is not the worker's: not believed
        assert_eq!(
            inbound_destination("", "q", Some(&t), "q", "q.retry", false),
            "q"
        );
        // arriving through a named exchange: the broker's facts win
        assert_eq!(
            inbound_destination("x", "rk", Some(&t), "q", "q.retry", true),
            "x/rk"
        );
    }
}
