//! Elevate for NATS (async-nats): a guarded publisher for core NATS and
//! JetStream, a guard for JetStream pull consumers (at-least-once) and for
//! core NATS subscribers (at-most-once), and a dead-letter publisher.
//!
//! The crate is thin: header mapping, publishing what
//! [`elevate_core::producer::ProducerGuard`] prepared, and JetStream settlement
//! (`+ACK`, `+TERM`, `-NAK {delay}`, `+WPI`). Every verdict, retry and
//! dead-letter decision is [`elevate_core::Processor`]'s.
//!
//! Wrapping a consumer the application already has:
//!
//! ```no_run
//! # async fn demo(processor: std::sync::Arc<elevate_core::Processor>) -> Result<(), async_nats::Error> {
//! // `processor` = Processor::new(guard, handler, Arc::new(NatsDeadLetters::jetstream(js.clone(), "dlq.orders")))
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let js = async_nats::jetstream::new(client);
//! let consumer: async_nats::jetstream::consumer::PullConsumer =
//!     js.get_stream("ORDERS").await?.get_consumer("billing").await?;
//! elevate_nats::GuardedConsumer::new(consumer, processor)
//!     .concurrency(32)
//!     .run(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Subjects: a context reference is bound to the subject the message was
//! published to; the consumer checks it against the subject it received
//! (JetStream keeps the original subject), so a message moved to another
//! subject is quarantined `wrong-destination`.

pub mod core_nats;
pub mod deadletter;
pub mod decisions;
pub mod headers;
pub mod jetstream;
pub mod publisher;
pub mod unreadable;

pub use core_nats::{CoreDelivery, CoreSource, GuardedSubscriber};
pub use deadletter::NatsDeadLetters;
pub use decisions::JetStreamDecisionShipper;
pub use elevate_core::producer::Receipt;
pub use headers::{HeaderError, from_nats_headers, to_nats_headers};
pub use jetstream::{GuardedConsumer, JetStreamDelivery, JetStreamSource};
pub use publisher::NatsPublisher;
pub use unreadable::UnreadableMessages;

/// Errors of the NATS guards.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The consumer is configured in a way the guard cannot settle safely.
    #[error("consumer configuration: {0}")]
    Config(String),
    /// A message without JetStream metadata where one was expected.
    #[error("not a JetStream message: {0}")]
    NotJetStream(String),
    /// The client stopped for good (its connection task ended, e.g. async-nats
    /// panicked on a message it could not parse): connect a new client and run
    /// the guard again; its first sweep dead-letters the message.
    #[error("the NATS client stopped: {0}")]
    ClientClosed(String),
    /// A core NATS subscription ended (unsubscribed or drained).
    #[error("the subscription ended")]
    SubscriptionEnded,
    /// Core's runtime refused to start (a start check) or stopped (a bug).
    #[error(transparent)]
    Runtime(#[from] elevate_core::runtime::RunError<std::convert::Infallible>),
}
