//! Elevate binding for Kafka (rdkafka with its bundled librdkafka).
//!
//! A thin layer over [`elevate_core`]: header mapping ([`headers`]), a
//! credential-stripping producer ([`KafkaProducer`]), a guarded consumer that
//! wraps the `StreamConsumer` you already configured ([`GuardedConsumer`]),
//! offset-store settlement ([`KafkaDelivery`]) and dead-letter publishing
//! ([`KafkaDeadLetters`]). Every verdict, retry and settlement rule lives in
//! [`elevate_core::Processor`]; nothing here decides.
//!
//! Wrapping a consumer:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use rdkafka::ClientConfig;
//! # use rdkafka::consumer::Consumer;
//! # async fn demo(processor: Arc<elevate_core::Processor>) -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = ClientConfig::new();
//! config
//!     .set("bootstrap.servers", "127.0.0.1:9092")
//!     .set("group.id", "orders-worker")
//!     .set("enable.auto.offset.store", "false"); // required: offsets are stored after settlement
//! let guarded = elevate_kafka::GuardedConsumer::from_config(&config, processor)?;
//! guarded.consumer().subscribe(&["orders"])?;
//! guarded
//!     .concurrency(8)
//!     .run(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Delivery semantics: at least once. An offset is stored (and then committed,
//! by auto-commit or by the guard) only after the message is settled — the
//! handler succeeded or its dead letter was acknowledged by the broker with
//! `acks=all` — and only in order within a partition, so no commit, including
//! the one librdkafka makes on a rebalance, ever passes an unsettled message.
//! A Retry verdict blocks its partition in place while other partitions go on.

pub mod consumer;
pub mod deadletter;
pub mod decisions;
pub mod embedded;
pub mod headers;
pub mod producer;
pub mod supervised;

pub use consumer::{Error, GuardedConsumer, KafkaDelivery, KafkaSource};
pub use deadletter::{DEFAULT_DLQ_SUFFIX, KafkaDeadLetters};
pub use decisions::KafkaDecisionShipper;
pub use elevate_core::producer::Receipt;
pub use embedded::EmbeddedKafka;
pub use producer::KafkaProducer;
pub use supervised::supervise_consumer;
