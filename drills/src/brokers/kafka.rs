//! Kafka (tansu): topics created with the admin client (tansu does not
//! auto-create), records produced one per batch (tansu 0.6 loses the rest of
//! a batch to a fetch that starts inside it, kafka/README.md), dead letters
//! read back with a plain consumer assigned to the dead-letter topic.
//!
//! That consumer must be gone before its topic is deleted: tansu 0.6 answers
//! a Fetch for a deleted topic with a zero topic id and a `CurrentLeader`
//! tag, and librdkafka 2.12.1 then dereferences a NULL topic name (SIGSEGV in
//! `rd_kafka_metadata_update_op`; `examples/tansu_topic_delete_crash.rs`).

use std::time::Duration;

use elevate_core::OutboundMessage;
use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_kafka::KafkaProducer;
use elevate_kafka::headers::from_kafka;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::{Broker, DlqReader, Letter, Names, PRODUCE_CONCURRENCY, subject_of};
use crate::{BrokerKind, Job};

/// Partitions of a drill's source topic.
pub const PARTITIONS: i32 = 8;

fn kerr(e: impl std::fmt::Display) -> String {
    format!("kafka: {e}")
}

fn base_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("topic.metadata.refresh.interval.ms", "1000");
    if let Ok(debug) = std::env::var("DRILL_KAFKA_DEBUG")
        && !debug.is_empty()
    {
        c.set("debug", debug);
    }
    c
}

/// The orchestrator's Kafka clients.
pub struct KafkaBroker {
    bootstrap: String,
    producer: FutureProducer,
}

impl KafkaBroker {
    /// Checks the broker answers and creates the producer.
    pub fn connect(bootstrap: &str) -> Result<Self, String> {
        if !crate::procs::listening(bootstrap) {
            return Err(format!(
                "no Kafka broker at {bootstrap} (KAFKA_BOOTSTRAP): start one with scripts/kafka-up"
            ));
        }
        let mut config = base_config(bootstrap);
        config
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "1")
            .set("batch.num.messages", "1");
        Ok(KafkaBroker {
            bootstrap: bootstrap.to_string(),
            producer: config.create().map_err(kerr)?,
        })
    }

    async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> =
            base_config(&self.bootstrap).create().map_err(kerr)?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for r in admin.create_topics([&new], &opts).await.map_err(kerr)? {
            match r {
                Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(format!("kafka: create topic {t}: {code}")),
            }
        }
        let probe: StreamConsumer = base_config(&self.bootstrap)
            .set("group.id", "elevate-drill-probe")
            .create()
            .map_err(kerr)?;
        for _ in 0..100 {
            if let Ok(md) = probe.fetch_metadata(Some(topic), Duration::from_secs(2))
                && md.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error().is_none()
                        && t.partitions().len() == partitions as usize
                })
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("kafka: topic {topic} not visible in the metadata"))
    }
}

#[async_trait::async_trait(?Send)]
impl Broker for KafkaBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Kafka
    }

    fn url(&self) -> String {
        self.bootstrap.clone()
    }

    async fn setup(&self, names: &Names) -> Result<(), String> {
        self.create_topic(&names.source, PARTITIONS).await?;
        self.create_topic(&names.dlq, 1).await?;
        let claims = format!("{}{}", names.dlq, elevate_kafka::deadletter::CLAIMS_SUFFIX);
        self.create_topic(&claims, 1).await
    }

    async fn produce(
        &self,
        names: &Names,
        producer: &ProducerGuard,
        jobs: &[Job],
    ) -> Result<usize, String> {
        let publisher = KafkaProducer::new(self.producer.clone(), producer.clone())
            .with_queue_timeout(Duration::from_secs(30));
        let audience = [crate::WORKER.to_string()];
        let topic = names.publish_to.as_str();
        let results: Vec<Result<(), String>> = futures::stream::iter(jobs)
            .map(|job| {
                let publisher = &publisher;
                let audience = &audience;
                async move {
                    let subject = subject_of(job);
                    let req = PublishRequest {
                        subject: &subject,
                        action: crate::ACTION,
                        audience,
                        destination: topic,
                        scope: None,
                    };
                    let msg = OutboundMessage {
                        headers: Default::default(),
                        payload: job.to_payload(),
                    };
                    publisher
                        .publish_keyed(Some(job.id.as_bytes()), &req, msg)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("kafka: publish {}: {e}", job.id))
                }
            })
            .buffer_unordered(PRODUCE_CONCURRENCY)
            .collect()
            .await;
        let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        if let Some(first) = failed.first() {
            return Err(format!("{} publishes failed, first: {first}", failed.len()));
        }
        Ok(jobs.len())
    }

    async fn dlq_reader(&self, names: &Names) -> Result<Box<dyn DlqReader>, String> {
        let consumer: StreamConsumer = base_config(&self.bootstrap)
            .set(
                "group.id",
                format!("drill-dlq-reader-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .map_err(kerr)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&names.dlq, 0, Offset::Beginning)
            .map_err(kerr)?;
        consumer.assign(&tpl).map_err(kerr)?;
        Ok(Box::new(KafkaDlq { consumer }))
    }

    async fn teardown(&self, names: &Names) {
        let Ok(admin) = base_config(&self.bootstrap).create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let claims = format!("{}{}", names.dlq, elevate_kafka::deadletter::CLAIMS_SUFFIX);
        let _ = admin
            .delete_topics(&[&names.source, &names.dlq, &claims], &AdminOptions::new())
            .await;
    }
}

struct KafkaDlq {
    consumer: StreamConsumer,
}

#[async_trait::async_trait(?Send)]
impl DlqReader for KafkaDlq {
    async fn poll(&mut self) -> Result<Vec<Letter>, String> {
        let mut out = Vec::new();
        // At most a quarter second per poll, so the caller keeps observing.
        let until = tokio::time::Instant::now() + Duration::from_millis(250);
        loop {
            let wait = until.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(wait, self.consumer.recv()).await {
                Err(_) => return Ok(out),
                Ok(Ok(m)) => {
                    let headers = from_kafka(m.headers());
                    out.push(Letter::from_parts(
                        &headers,
                        m.payload().unwrap_or_default(),
                    ));
                }
                // librdkafka reconnects by itself; carry on next poll
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "dead-letter reader");
                    return Ok(out);
                }
            }
        }
    }
}
