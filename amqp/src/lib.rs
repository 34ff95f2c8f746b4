//! Elevate for AMQP 0-9-1 (RabbitMQ) on lapin: a confirming, credential-stripping
//! publisher and a guard around the lapin [`Consumer`](lapin::Consumer) you already have.
//!
//! This crate is a thin binding: header mapping, confirmed publishing, the worker
//! loop and settlement actions. Verification, policy, retry bounds and verdicts all
//! live in [`elevate_core`] ([`Processor`](elevate_core::Processor)).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use lapin::{options::*, types::FieldTable, Connection, ConnectionProperties};
//! # use elevate_amqp::{AmqpDeadLetters, ConfirmChannel, GuardedConsumer, declare_queues};
//! # async fn demo(guard: Arc<elevate_core::Guard>, handler: Arc<dyn elevate_core::Handler>) -> Result<(), Box<dyn std::error::Error>> {
//! let conn = Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ConnectionProperties::default()).await?;
//! let ch = conn.create_channel().await?;
//! let queues = declare_queues(&ch, "invoices").await?;           // invoices, invoices.retry, invoices.dlq
//! ch.basic_qos(32, BasicQosOptions::default()).await?;            // prefetch = concurrency
//! let consumer = ch.basic_consume("invoices".into(), "worker".into(),
//!     BasicConsumeOptions::default(), FieldTable::default()).await?;
//!
//! let confirms = ConfirmChannel::new(conn.create_channel().await?).await?;
//! let dead_letters = AmqpDeadLetters::with_confirm_channel(confirms.clone(), "", &queues.dead_letter);
//! let processor = Arc::new(elevate_core::Processor::new(guard, handler, Arc::new(dead_letters)));
//! GuardedConsumer::new(consumer, processor, confirms)
//!     .concurrency(32)
//!     .run(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! **Destinations.** A context reference is bound to the routing key (= queue name)
//! when published to the default exchange `""`, else to `<exchange>/<routing_key>`;
//! a worker rebuilds the same string from the delivery's exchange and routing key.
//!
//! **Headers.** AMQP tables cannot repeat a key: duplicated header names travel as a
//! field array of `LongString`s and are decoded back into repeated values (see
//! [`headers`]).
//!
//! **Retries** use the standard RabbitMQ retry-queue pattern (see [`declare_queues`]
//! and [`GuardedConsumer`]): a delay is a message parked on the broker, so it survives
//! a worker crash and holds no prefetch slot. Per-message TTLs expire only at the head
//! of a classic queue, so a delay can run longer than asked when a longer one is ahead
//! of it; it is never shorter.

pub mod deadletter;
pub mod headers;
pub mod publish;
pub mod supervised;
pub mod worker;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

pub use deadletter::AmqpDeadLetters;
pub use elevate_core::producer::Receipt;
pub use publish::{AmqpPublisher, ConfirmChannel, address, destination};
pub use supervised::{WorkerConfig, supervise_worker};
pub use worker::{AmqpDelivery, AmqpSource, GuardedConsumer};

/// Header: the delivery attempt a retry copy is for (2 for the first retry).
pub const H_ATTEMPT: &str = "x-elevate-attempt";
/// Header: the destination a retry copy was originally read from (trusted only on
/// copies that come back from the retry queue; see [`GuardedConsumer`]).
pub const H_DESTINATION: &str = "x-elevate-destination";
/// The broker's dead-lettering history header.
pub const X_DEATH: &str = "x-death";

/// The retry queue paired with `queue`: `<queue>.retry`.
pub fn retry_queue_name(queue: &str) -> String {
    format!("{queue}.retry")
}

/// The default dead-letter queue for `queue`: `<queue>.dlq`.
pub fn dead_letter_queue_name(queue: &str) -> String {
    format!(
        "{queue}{}",
        elevate_core::settle::DEFAULT_DEAD_LETTER_SUFFIX
    )
}

/// An AMQP error from the binding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client or broker failed (connection, channel, protocol).
    #[error("AMQP: {0}")]
    Lapin(#[from] lapin::Error),
    /// The broker nacked a publish.
    #[error("the broker nacked the publish")]
    Nacked,
    /// A mandatory publish could not be routed to any queue (`basic.return`).
    #[error("unroutable publish returned by the broker: {code} {text}")]
    Unroutable {
        /// AMQP reply code (312 NO_ROUTE).
        code: u16,
        /// Reply text.
        text: String,
    },
    /// The channel is not in confirm mode.
    #[error("publisher confirms are not enabled on the channel")]
    ConfirmsOff,
    /// The confirming channel used for retry copies closed: nothing can be
    /// settled through it any more, so the worker stops (reconnect and run again).
    #[error("the confirming channel for retries and dead letters is closed")]
    ConfirmChannelClosed,
    /// A name longer than AMQP's 255-byte short-string limit.
    #[error("{what} of {len} bytes exceeds AMQP's 255-byte limit")]
    InvalidName {
        /// What it names.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A header name too long for AMQP.
    #[error(transparent)]
    HeaderName(#[from] headers::HeaderNameTooLong),
    /// The message's content header frame would exceed the connection's
    /// `frame_max`; it was not sent (the broker would close the connection).
    #[error("header frame of {size} bytes exceeds the connection's frame_max {frame_max}")]
    HeaderFrameTooLarge {
        /// Encoded size of the header frame.
        size: usize,
        /// The connection's limit.
        frame_max: u32,
    },
    /// No confirm (or ack) arrived in time: the connection may be gone.
    #[error("no answer from the broker within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    /// The broker cancelled the consumer (queue deleted, node lost, `basic.cancel`):
    /// unlike a shutdown, nothing stopped it on purpose.
    #[error("the broker cancelled the consumer of queue {0}")]
    ConsumerCancelled(String),
    /// Core's runtime refused to start (a start check) or stopped (a bug).
    #[error(transparent)]
    Runtime(#[from] elevate_core::runtime::RunError<std::convert::Infallible>),
}

impl Error {
    /// Whether the same publish would be refused again (too large, unroutable,
    /// a name too long): such a dead letter is replaced by the minimal one.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::HeaderFrameTooLarge { .. }
                | Error::Unroutable { .. }
                | Error::InvalidName { .. }
                | Error::HeaderName(_)
        )
    }
}

/// The user name in an AMQP URI (`amqp://user:pass@host/vhost`), for
/// [`GuardedConsumer::retry_user`]: the broker user the worker connects as.
pub fn uri_user(url: &str) -> Option<String> {
    url.parse::<lapin::uri::AMQPUri>()
        .ok()
        .map(|u| u.authority.userinfo.username)
}

/// The queues a guarded worker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queues {
    /// The work queue.
    pub work: String,
    /// The retry queue (`<work>.retry`).
    pub retry: String,
    /// The dead-letter queue (`<work>.dlq`).
    pub dead_letter: String,
}

impl Queues {
    /// The names of the queue set of `queue`, without declaring anything.
    pub fn named(queue: &str) -> Self {
        Queues {
            work: queue.to_string(),
            retry: retry_queue_name(queue),
            dead_letter: dead_letter_queue_name(queue),
        }
    }
}

/// Declares (idempotently, all durable) the work queue `queue`, its retry queue
/// `<queue>.retry` (arguments `x-dead-letter-exchange: ""`,
/// `x-dead-letter-routing-key: <queue>`, so a retry copy returns to the work queue
/// when its per-message `expiration` ends) and the dead-letter queue `<queue>.dlq`.
///
/// # Errors
///
/// The same as [`declare_queue_set`].
pub async fn declare_queues(channel: &Channel, queue: &str) -> Result<Queues, Error> {
    declare_queues_with(channel, queue, FieldTable::default()).await
}

/// As [`declare_queues`], with extra arguments for the work queue (e.g.
/// `x-queue-type`, `x-max-priority`). The retry and dead-letter queues take
/// only its `x-queue-type`: they have no consumers, so `x-expires`, a message
/// TTL or a length limit there would delete parked retries and confirmed
/// dead letters.
///
/// # Errors
///
/// The same as [`declare_queue_set`].
pub async fn declare_queues_with(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
) -> Result<Queues, Error> {
    // The retry and dead-letter queues keep only the queue type of the work queue.
    let mut side_args = FieldTable::default();
    if let Some(kind) = arguments.inner().get("x-queue-type") {
        side_args.insert(ShortString::from("x-queue-type"), kind.clone());
    }
    declare_queue_set(channel, queue, arguments, side_args).await
}

/// As [`declare_queues_with`], with the arguments of the retry and dead-letter
/// queues given explicitly (`side_args`). For throw-away queues (tests, demos)
/// an `x-expires` there cleans up; in production it would delete parked
/// retries and dead letters, so leave it out.
///
/// # Errors
///
/// Returns [`Error::InvalidName`] if a queue name (with its `.retry` or `.dlq` suffix) is longer
/// than 255 bytes, and [`Error::Lapin`] if a declaration fails: the channel is closed, or a queue
/// exists with different arguments (`PRECONDITION_FAILED`, which also closes the channel).
pub async fn declare_queue_set(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
    side_args: FieldTable,
) -> Result<Queues, Error> {
    let q = Queues {
        work: queue.to_string(),
        retry: retry_queue_name(queue),
        dead_letter: dead_letter_queue_name(queue),
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            publish::short("queue", &q.work)?,
            durable,
            arguments.clone(),
        )
        .await?;
    let mut retry_args = side_args.clone();
    retry_args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from("")),
    );
    retry_args.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(LongString::from(q.work.as_bytes())),
    );
    channel
        .queue_declare(publish::short("queue", &q.retry)?, durable, retry_args)
        .await?;
    channel
        .queue_declare(publish::short("queue", &q.dead_letter)?, durable, side_args)
        .await?;
    Ok(q)
}
