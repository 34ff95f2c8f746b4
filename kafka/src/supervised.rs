//! The supervised consumer: builds the `StreamConsumer` from a configuration,
//! subscribes and runs the guard; when the consumer stops (a fatal client
//! error, a partition task that panicked) it is rebuilt and run again with backoff
//! (`elevate_core::supervise`). librdkafka reconnects to brokers by itself;
//! this covers what it cannot recover from. What a user of Kafka gets by
//! default.
//!
//! Give each instance a stable `group.instance.id` (static membership): a
//! restarted member, in this process or after a crash, then gets its
//! partitions back at once instead of after a rebalance or a session timeout.

use std::future::Future;
use std::sync::Arc;

use elevate_core::Processor;
use elevate_core::supervise::{Restartable, RoundShutdown, default_backoff, supervise};
use rdkafka::ClientConfig;
use rdkafka::consumer::Consumer;

use crate::{Error, GuardedConsumer};

impl Restartable for Error {
    /// A misconfigured consumer stays misconfigured; everything else is
    /// worth a new consumer.
    fn restartable(&self) -> bool {
        !matches!(
            self,
            Error::Config(_) | Error::Runtime(elevate_core::runtime::RunError::Start(_))
        )
    }
}

/// Runs a guarded consumer of `topics`, built from `config` (which must set
/// `group.id` and `enable.auto.offset.store=false`), until `shutdown`,
/// rebuilding it with backoff whenever it stops.
///
/// # Errors
/// A configuration the guard refuses ([`Error::Config`]), or one librdkafka
/// refuses when the consumer is created.
pub async fn supervise_consumer(
    config: ClientConfig,
    topics: Vec<String>,
    processor: Arc<Processor>,
    concurrency: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let what = format!("kafka:{}", topics.join(","));
    supervise(&what, default_backoff(), shutdown, |signal| {
        run_round(
            config.clone(),
            topics.clone(),
            processor.clone(),
            concurrency,
            signal,
        )
    })
    .await
}

async fn run_round(
    config: ClientConfig,
    topics: Vec<String>,
    processor: Arc<Processor>,
    concurrency: usize,
    shutdown: RoundShutdown,
) -> Result<(), Error> {
    let guarded = GuardedConsumer::from_config(&config, processor)?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    guarded.consumer().subscribe(&names)?;
    tracing::info!(topics = ?topics, "Kafka consumer subscribed");
    guarded.concurrency(concurrency).run(shutdown).await
}
