//! RabbitMQ: the worker's queue set declared up front (durable work, retry
//! and dead-letter queues), jobs published to the default exchange through
//! the confirming `AmqpPublisher`, dead letters read back with `basic.get`
//! (and acked: the orchestrator keeps them), reconnecting after a restart.

use std::time::Duration;

use elevate_amqp::AmqpPublisher;
use elevate_core::OutboundMessage;
use elevate_core::producer::{ProducerGuard, PublishRequest};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties};

use super::{Broker, DlqReader, Letter, Names, PRODUCE_CONCURRENCY, subject_of};
use crate::{BrokerKind, Job};

fn aerr(e: impl std::fmt::Display) -> String {
    format!("amqp: {e}")
}

async fn open(url: &str, name: &str) -> Result<(Connection, Channel), String> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props))
        .await
        .map_err(|_| format!("RabbitMQ at {url} (AMQP_URL) did not answer"))?
        .map_err(|e| format!("cannot connect to RabbitMQ at {url} (AMQP_URL): {e}"))?;
    let channel = conn.create_channel().await.map_err(aerr)?;
    Ok((conn, channel))
}

/// The orchestrator's RabbitMQ connection.
pub struct AmqpBroker {
    url: String,
    conn: Connection,
    admin: Channel,
}

impl AmqpBroker {
    /// Connects.
    pub async fn connect(url: &str) -> Result<Self, String> {
        let (conn, admin) = open(url, "elevate-drill").await?;
        Ok(AmqpBroker {
            url: url.to_string(),
            conn,
            admin,
        })
    }
}

#[async_trait::async_trait(?Send)]
impl Broker for AmqpBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Amqp
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    async fn setup(&self, names: &Names) -> Result<(), String> {
        elevate_amqp::declare_queues(&self.admin, &names.source)
            .await
            .map(|_| ())
            .map_err(aerr)
    }

    async fn produce(
        &self,
        names: &Names,
        producer: &ProducerGuard,
        jobs: &[Job],
    ) -> Result<usize, String> {
        let channel = self.conn.create_channel().await.map_err(aerr)?;
        let publisher = AmqpPublisher::new(channel, producer.clone())
            .await
            .map_err(aerr)?;
        let audience = [crate::WORKER.to_string()];
        let queue = names.publish_to.as_str();
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
                        destination: queue,
                        scope: None,
                    };
                    let msg = OutboundMessage {
                        headers: Default::default(),
                        payload: job.to_payload(),
                    };
                    publisher
                        .publish(&req, msg)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("amqp: publish {}: {e}", job.id))
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
        Ok(Box::new(AmqpDlq {
            url: self.url.clone(),
            queue: names.dlq.clone(),
            open: None,
        }))
    }

    async fn teardown(&self, names: &Names) {
        for q in [
            names.source.clone(),
            elevate_amqp::retry_queue_name(&names.source),
            names.dlq.clone(),
        ] {
            let _ = self
                .admin
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "drill done".into()).await;
    }
}

struct AmqpDlq {
    url: String,
    queue: String,
    open: Option<(Connection, Channel)>,
}

#[async_trait::async_trait(?Send)]
impl DlqReader for AmqpDlq {
    async fn poll(&mut self) -> Result<Vec<Letter>, String> {
        if self
            .open
            .as_ref()
            .is_none_or(|(c, _)| !c.status().connected())
        {
            self.open = None;
            match open(&self.url, "elevate-drill-dlq-reader").await {
                Ok(o) => self.open = Some(o),
                Err(e) => {
                    // The broker may be restarting: nothing new this time.
                    tracing::debug!(error = %e, "dead-letter reader");
                    return Ok(Vec::new());
                }
            }
        }
        let Some((_, channel)) = &self.open else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        // At most a quarter second per poll, so the caller keeps observing.
        let until = tokio::time::Instant::now() + Duration::from_millis(250);
        while tokio::time::Instant::now() < until {
            let got = channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
                .await;
            match got {
                Ok(Some(m)) => {
                    let headers =
                        elevate_amqp::headers::decode(m.delivery.properties.headers().as_ref());
                    out.push(Letter::from_parts(&headers, &m.delivery.data));
                    if let Err(e) = m.delivery.acker.ack(BasicAckOptions::default()).await {
                        // Not acked: the broker gives it back, it is read again (a raw duplicate).
                        tracing::debug!(error = %e, "dead-letter ack");
                        self.open = None;
                        return Ok(out);
                    }
                }
                Ok(None) => return Ok(out),
                Err(e) => {
                    tracing::debug!(error = %e, "dead-letter reader: reconnecting");
                    self.open = None;
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }
}
