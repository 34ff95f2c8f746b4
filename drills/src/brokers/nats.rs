//! NATS JetStream: a file-backed work stream with a durable explicit-ack
//! pull consumer (`max_deliver` unlimited: Elevate bounds the retries), a
//! file-backed dead-letter stream, jobs published through the guarded
//! `NatsPublisher` (each awaiting its stream ack), dead letters read back by
//! stream sequence.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use elevate_core::OutboundMessage;
use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_nats::{NatsPublisher, from_nats_headers};
use futures::StreamExt;

use super::{Broker, DlqReader, Letter, Names, PRODUCE_CONCURRENCY, subject_of};
use crate::{BrokerKind, Job};

fn nerr(e: impl std::fmt::Display) -> String {
    format!("nats: {e}")
}

/// The JetStream consumer's `ack_wait`: how long a delivered, unsettled
/// message (its worker killed) waits before the server redelivers it.
pub const ACK_WAIT: Duration = Duration::from_secs(30);

/// The orchestrator's NATS client.
pub struct NatsBroker {
    url: String,
    client: async_nats::Client,
    js: jetstream::Context,
}

impl NatsBroker {
    /// Connects (async-nats reconnects by itself afterwards).
    pub async fn connect(url: &str) -> Result<Self, String> {
        let opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(3));
        let client = tokio::time::timeout(Duration::from_secs(5), opts.connect(url))
            .await
            .map_err(|_| format!("no NATS server at {url} (NATS_URL)"))?
            .map_err(|e| format!("cannot connect to NATS at {url} (NATS_URL): {e}"))?;
        Ok(NatsBroker {
            url: url.to_string(),
            js: jetstream::new(client.clone()),
            client,
        })
    }

    fn dlq_stream(names: &Names) -> String {
        format!("{}_DLQ", names.source)
    }
}

#[async_trait::async_trait(?Send)]
impl Broker for NatsBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Nats
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    async fn setup(&self, names: &Names) -> Result<(), String> {
        for (name, subject) in [
            (names.source.clone(), names.publish_to.clone()),
            (Self::dlq_stream(names), names.dlq.clone()),
        ] {
            self.js
                .create_stream(stream::Config {
                    name,
                    subjects: vec![subject],
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(nerr)?;
        }
        self.js
            .get_stream(&names.source)
            .await
            .map_err(nerr)?
            .get_or_create_consumer(
                &names.consumer,
                consumer::pull::Config {
                    durable_name: Some(names.consumer.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_deliver: -1,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map(|_| ())
            .map_err(nerr)
    }

    async fn produce(
        &self,
        names: &Names,
        producer: &ProducerGuard,
        jobs: &[Job],
    ) -> Result<usize, String> {
        // A shared, loaded server may take longer than async-nats' default 5 s
        // to ack a stored message; a publish that times out is not retried (its
        // message may be stored), so wait longer instead.
        let mut js = jetstream::new(self.client.clone());
        js.set_timeout(Duration::from_secs(30));
        let publisher =
            NatsPublisher::new(self.client.clone(), producer.clone()).with_jetstream(js);
        let audience = [crate::WORKER.to_string()];
        let subject = names.publish_to.as_str();
        let results: Vec<Result<(), String>> = futures::stream::iter(jobs)
            .map(|job| {
                let publisher = &publisher;
                let audience = &audience;
                async move {
                    let ctx = subject_of(job);
                    let req = PublishRequest {
                        subject: &ctx,
                        action: crate::ACTION,
                        audience,
                        destination: subject,
                        scope: None,
                    };
                    let msg = OutboundMessage {
                        headers: Default::default(),
                        payload: job.to_payload(),
                    };
                    publisher
                        .publish_jetstream(&req, msg)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("nats: publish {}: {e}", job.id))
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
        Ok(Box::new(NatsDlq {
            js: self.js.clone(),
            stream: Self::dlq_stream(names),
            next: 1,
        }))
    }

    async fn teardown(&self, names: &Names) {
        let _ = self.js.delete_stream(&names.source).await;
        let _ = self.js.delete_stream(Self::dlq_stream(names)).await;
    }
}

struct NatsDlq {
    js: jetstream::Context,
    stream: String,
    next: u64,
}

#[async_trait::async_trait(?Send)]
impl DlqReader for NatsDlq {
    async fn poll(&mut self) -> Result<Vec<Letter>, String> {
        let mut out = Vec::new();
        let Ok(mut s) = self.js.get_stream(&self.stream).await else {
            // The server may be restarting: nothing new this time.
            return Ok(out);
        };
        let Ok(info) = s.info().await else {
            return Ok(out);
        };
        let last = info.state.last_sequence;
        // At most a quarter second per poll, so the caller keeps observing.
        let until = tokio::time::Instant::now() + Duration::from_millis(250);
        while self.next <= last && tokio::time::Instant::now() < until {
            match s.get_raw_message(self.next).await {
                Ok(m) => {
                    let headers = from_nats_headers(Some(&m.headers));
                    out.push(Letter::from_parts(&headers, &m.payload));
                }
                Err(e) => {
                    use async_nats::jetstream::stream::RawMessageErrorKind;
                    if e.kind() != RawMessageErrorKind::NoMessageFound {
                        // Not read this time: read it on the next poll.
                        tracing::debug!(error = %e, seq = self.next, "dead-letter reader");
                        return Ok(out);
                    }
                }
            }
            self.next += 1;
        }
        Ok(out)
    }
}
