//! The orchestrator's side of each broker, with plain clients: create the
//! destinations, produce through the binding's guarded producer, read the
//! dead letters back, delete the destinations. And broker instances of the
//! drill's own ([`own`]) for the scenarios that restart the broker.

pub mod amqp;
pub mod kafka;
pub mod nats;
pub mod own;

use elevate_core::Headers;
use elevate_core::deadletter::{H_IDEMPOTENCY_KEY, H_REASON};
use elevate_core::producer::ProducerGuard;

use crate::{BrokerKind, Job};

/// The destinations of one drill row.
#[derive(Debug, Clone)]
pub struct Names {
    /// Kafka topic, AMQP work queue, JetStream stream.
    pub source: String,
    /// What messages are published to: the topic, the queue (default
    /// exchange), the stream's subject.
    pub publish_to: String,
    /// Kafka dead-letter topic, AMQP `<queue>.dlq`, JetStream dead-letter subject.
    pub dlq: String,
    /// Kafka group id, JetStream durable consumer, AMQP connection name.
    pub consumer: String,
}

impl Names {
    /// Fresh names for `broker`, unique per `run_id`.
    pub fn new(broker: BrokerKind, run_id: &str) -> Self {
        match broker {
            BrokerKind::Kafka => {
                let topic = format!("drill-{run_id}");
                Names {
                    dlq: format!("{topic}{}", elevate_kafka::DEFAULT_DLQ_SUFFIX),
                    publish_to: topic.clone(),
                    consumer: format!("drill-worker-{run_id}"),
                    source: topic,
                }
            }
            BrokerKind::Amqp => {
                let queue = format!("drill-{run_id}");
                Names {
                    dlq: elevate_amqp::dead_letter_queue_name(&queue),
                    publish_to: queue.clone(),
                    consumer: format!("drill-worker-{run_id}"),
                    source: queue,
                }
            }
            BrokerKind::Nats => {
                let id = run_id.to_uppercase();
                Names {
                    source: format!("DRILL_{id}"),
                    publish_to: format!("drill.{run_id}.jobs"),
                    dlq: format!("drill.{run_id}.dlq"),
                    consumer: "drill-worker".to_string(),
                }
            }
        }
    }
}

/// One dead letter as read back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Letter {
    /// `ztauth-reason`.
    pub reason: String,
    /// `ztauth-idempotency-key`.
    pub idempotency_key: Option<String>,
    /// The message id from the payload, when it is a drill job.
    pub id: Option<String>,
}

impl Letter {
    /// Reads a letter's envelope headers and payload.
    pub fn from_parts(headers: &Headers, payload: &[u8]) -> Self {
        Letter {
            reason: headers.get_str(H_REASON).unwrap_or("?").to_string(),
            idempotency_key: headers.get_str(H_IDEMPOTENCY_KEY).map(str::to_string),
            id: Job::from_payload(payload).map(|j| j.id),
        }
    }
}

/// Reads the dead letters of one row as they arrive.
#[async_trait::async_trait(?Send)]
pub trait DlqReader {
    /// The letters that arrived since the last call (reconnecting if needed).
    async fn poll(&mut self) -> Result<Vec<Letter>, String>;

    /// What went wrong with the reader itself since the last call (for the row's notes).
    fn incidents(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// One broker, as the orchestrator uses it.
#[async_trait::async_trait(?Send)]
pub trait Broker {
    /// Which broker.
    fn kind(&self) -> BrokerKind;
    /// The address the worker connects to.
    fn url(&self) -> String;
    /// Creates the destinations (and dead-letter destinations).
    async fn setup(&self, names: &Names) -> Result<(), String>;
    /// Publishes every job through the binding's guarded producer; returns
    /// how many the broker confirmed.
    async fn produce(
        &self,
        names: &Names,
        producer: &ProducerGuard,
        jobs: &[Job],
    ) -> Result<usize, String>;
    /// A reader of the dead-letter destination.
    async fn dlq_reader(&self, names: &Names) -> Result<Box<dyn DlqReader>, String>;
    /// Deletes the destinations (drop the [`DlqReader`] first: a Kafka
    /// consumer of a deleted topic crashes on tansu, see [`kafka`]).
    async fn teardown(&self, names: &Names);
}

/// Connects the orchestrator's clients to `kind` at `url`.
pub async fn connect(kind: BrokerKind, url: &str) -> Result<Box<dyn Broker>, String> {
    Ok(match kind {
        BrokerKind::Kafka => Box::new(kafka::KafkaBroker::connect(url)?),
        BrokerKind::Amqp => Box::new(amqp::AmqpBroker::connect(url).await?),
        BrokerKind::Nats => Box::new(nats::NatsBroker::connect(url).await?),
    })
}

/// How many publishes are in flight at once while producing.
pub const PRODUCE_CONCURRENCY: usize = 64;

/// The subject context of one job: its user, a transaction of its own.
pub fn subject_of(job: &Job) -> elevate_core::producer::SubjectContext {
    elevate_core::producer::SubjectContext {
        subject: job.user.clone(),
        sub_kind: elevate_core::SubjectKind::Human,
        txn: uuid::Uuid::now_v7().to_string(),
        scope: elevate_core::scope::Scope::parse(crate::ACTION),
    }
}
