//! The supervised worker: connects, declares, consumes, and on a lost
//! connection or a cancelled consumer reconnects with backoff and goes on
//! (`elevate_core::supervise`). What a user of RabbitMQ gets by default.

use std::future::Future;
use std::sync::Arc;

use elevate_core::Processor;
use elevate_core::supervise::{Restartable, RoundShutdown, default_backoff, supervise};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use crate::{AmqpDeadLetters, ConfirmChannel, Error, GuardedConsumer, declare_queues, uri_user};

/// What a supervised worker connects to and consumes.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `amqp://user:pass@host:port/vhost`.
    pub uri: String,
    /// The work queue.
    pub queue: String,
    /// Prefetch and concurrency (both; default 32).
    pub prefetch: u16,
    /// Declare the queue set (`queue`, `<queue>.retry`, `<queue>.dlq`) on each connect (default true).
    pub declare: bool,
    /// A name for the connection, shown by `rabbitmqctl list_connections`.
    pub connection_name: String,
}

impl WorkerConfig {
    /// Consumes `queue` at `uri` with the defaults.
    pub fn new(uri: impl Into<String>, queue: impl Into<String>) -> Self {
        let queue = queue.into();
        WorkerConfig {
            uri: uri.into(),
            connection_name: format!("elevate-worker-{queue}"),
            queue,
            prefetch: 32,
            declare: true,
        }
    }
}

impl Restartable for Error {
    /// Everything but a configuration or protocol-limit error is a passing
    /// broker or connection fault.
    fn restartable(&self) -> bool {
        !matches!(
            self,
            Error::InvalidName { .. }
                | Error::ConfirmsOff
                | Error::Runtime(elevate_core::runtime::RunError::Start(_))
        )
    }
}

/// Runs a guarded worker on `config.queue` until `shutdown`, reconnecting
/// with backoff whenever the connection, a channel or the consumer is lost.
/// Each round opens one connection with a consuming channel (prefetch =
/// concurrency) and a confirming channel for retry copies and dead letters
/// (to `<queue>.dlq`), and authenticates retry copies by the URI's user.
///
/// # Errors
/// Only errors a reconnect cannot cure (see [`Restartable`]).
pub async fn supervise_worker(
    config: WorkerConfig,
    processor: Arc<Processor>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let what = format!("amqp:{}", config.queue);
    supervise(&what, default_backoff(), shutdown, |signal| {
        run_round(config.clone(), processor.clone(), signal)
    })
    .await
}

async fn run_round(
    config: WorkerConfig,
    processor: Arc<Processor>,
    shutdown: RoundShutdown,
) -> Result<(), Error> {
    let props = ConnectionProperties::default().with_connection_name(config.connection_name.into());
    let conn = Connection::connect(&config.uri, props).await?;
    let channel = conn.create_channel().await?;
    let confirms = ConfirmChannel::open(&conn).await?;
    let queues = if config.declare {
        declare_queues(&channel, &config.queue).await?
    } else {
        crate::Queues::named(&config.queue)
    };
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let dead_letters =
        AmqpDeadLetters::with_confirm_channel(confirms.clone(), "", &queues.dead_letter);
    let processor = Arc::new(processor.with_dead_letters(Arc::new(dead_letters)));
    let mut worker = GuardedConsumer::new(consumer, processor, confirms)
        .concurrency(usize::from(config.prefetch.max(1)))
        .retry_queue(queues.retry.clone());
    if let Some(user) = uri_user(&config.uri) {
        worker = worker.retry_user(user);
    }
    tracing::info!(queue = %config.queue, "AMQP worker connected");
    let result = worker.run(shutdown).await;
    let _ = conn.close(200, "elevate worker stopping".into()).await;
    result
}
