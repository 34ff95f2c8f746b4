//! Dead-letter publishing to a Kafka topic (default `<source topic>.dlq`),
//! returning only after the broker acknowledged the record.
//!
//! Letters always fit: [`KafkaDeadLetters`] measures a letter as a record
//! against the producer's `message.max.bytes` and core trims it
//! (`elevate_core::deadletter::fit`). A payload too large for a letter is
//! stored in chunks on the claim-check topic (`<dead-letter topic>.claims`),
//! every chunk keyed by the letter's idempotency key so the chunks share a
//! partition and stay in order; the letter's `ztauth-payload` header names
//! the topic, partition and offsets. Broker refusals a retry cannot change
//! (too large, invalid record, not authorized) are permanent errors, so core
//! publishes the minimal letter instead of retrying forever.

use std::time::Duration;

use bytes::Bytes;
use elevate_core::deadletter::{DeadLetter, Excess, PayloadAt};
use elevate_core::settle::{DeadLetterPublisher, TransportError};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::headers::to_kafka;

/// Suffix of the default dead-letter topic: `<source topic>.dlq` (core's
/// one default for every broker).
pub const DEFAULT_DLQ_SUFFIX: &str = elevate_core::settle::DEFAULT_DEAD_LETTER_SUFFIX;

/// Suffix of the claim-check topic: `<dead-letter topic>.claims`.
pub const CLAIMS_SUFFIX: &str = ".claims";

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Bytes a record costs beyond its key, value and headers (record batch v2
/// header, record framing and varints), with a margin.
const RECORD_OVERHEAD: usize = 128;

/// Header of each claim-check chunk: `<index>/<count>` (1-based).
pub const H_CLAIM_CHUNK: &str = "ztauth-claim-chunk";

#[derive(Debug, Clone)]
enum Target {
    Suffix(String),
    Fixed(String),
}

/// Publishes dead letters with a `FutureProducer` (configure it with `acks=all`).
///
/// The dead letter keeps the original record's key when it is published from
/// inside [`crate::GuardedConsumer`], so per-key order carries over.
pub struct KafkaDeadLetters<C: ClientContext + 'static = DefaultClientContext> {
    producer: FutureProducer<C>,
    target: Target,
    timeout: Duration,
    max_message_bytes: usize,
}

impl KafkaDeadLetters<DefaultClientContext> {
    /// Creates its own producer from `config` with `acks=all` and idempotence
    /// forced on; its `message.max.bytes` bounds every letter.
    ///
    /// # Errors
    ///
    /// Returns the [`KafkaError`] librdkafka gives if the producer cannot be created from `config`
    /// (an invalid or conflicting property).
    pub fn from_config(config: &ClientConfig) -> KafkaResult<Self> {
        let mut config = config.clone();
        config.set("acks", "all").set("enable.idempotence", "true");
        let max = config
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        Ok(Self::new(config.create()?).with_max_message_bytes(max))
    }
}

/// Consumer settings a dead-letter producer made from a consumer's
/// configuration keeps: where the cluster is and how to reach it.
const SHARED_PREFIXES: [&str; 8] = [
    "bootstrap.servers",
    "metadata.broker.list",
    "client.id",
    "broker.address.family",
    "security.",
    "ssl.",
    "sasl.",
    "socket.",
];

/// The producer configuration of a consumer's default dead-letter
/// publisher: the consumer's connection and security settings (servers,
/// `security.*`, `ssl.*`, `sasl.*`, `socket.*`, client id), none of its
/// consumer settings (librdkafka warns on each of those).
pub fn producer_config_of(consumer: &ClientConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in consumer.config_map() {
        if SHARED_PREFIXES.iter().any(|p| {
            if p.ends_with('.') {
                k.starts_with(p)
            } else {
                k == *p
            }
        }) {
            config.set(k, v);
        }
    }
    config
}

impl<C: ClientContext + 'static> KafkaDeadLetters<C> {
    /// Uses the application's producer (it should have `acks=all`); letters
    /// are sized for librdkafka's default `message.max.bytes` unless
    /// [`with_max_message_bytes`](Self::with_max_message_bytes) says otherwise.
    pub fn new(producer: FutureProducer<C>) -> Self {
        KafkaDeadLetters {
            producer,
            target: Target::Suffix(DEFAULT_DLQ_SUFFIX.to_string()),
            timeout: Duration::from_secs(30),
            max_message_bytes: DEFAULT_MESSAGE_MAX_BYTES,
        }
    }

    /// Sends every dead letter to one topic instead of `<source topic>.dlq`.
    pub fn to_topic(mut self, topic: impl Into<String>) -> Self {
        self.target = Target::Fixed(topic.into());
        self
    }

    /// Uses `<source topic><suffix>` as the dead-letter topic.
    pub fn with_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.target = Target::Suffix(suffix.into());
        self
    }

    /// Bounds the wait for the broker's acknowledgement (default 30 s); past it the publish fails.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The largest record the producer (and the dead-letter topic) accepts:
    /// the smaller of the producer's `message.max.bytes` and the topic's
    /// `max.message.bytes`.
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes.max(1024);
        self
    }

    /// The dead-letter topic for records read from `source_topic`.
    pub fn topic_for(&self, source_topic: &str) -> String {
        match &self.target {
            Target::Fixed(t) => t.clone(),
            Target::Suffix(s) => format!("{source_topic}{s}"),
        }
    }

    fn letter_topic(&self, letter: &DeadLetter) -> String {
        let source = match letter.source.broker() {
            "kafka" => letter
                .source
                .field_str("topic")
                .unwrap_or(&letter.original_destination),
            _ => letter.original_destination.as_str(),
        };
        self.topic_for(source)
    }

    /// Sends one record and waits for the broker's acknowledgement;
    /// returns its partition and offset.
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
        permanent: fn(&KafkaError) -> bool,
    ) -> Result<(i32, i64), TransportError> {
        const OP: &str = "dead-letter publish";
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).payload(payload).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        // The queue timeout bounds local buffering; `message.timeout.ms` bounds delivery.
        let send = self.producer.send(record, self.timeout);
        match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
            Ok(Err((e, _))) if permanent(&e) => Err(TransportError::permanent(OP, e)),
            Ok(Err((e, _))) => Err(TransportError::new(OP, e)),
            Err(_) => Err(TransportError::new(
                OP,
                format!(
                    "no acknowledgement from the broker within {:?}",
                    self.timeout
                ),
            )),
        }
    }
}

/// Broker or client refusals that the same record will meet again.
fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    let code = match e {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::MessageBatchTooLarge
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::UnsupportedForMessageFormat
    )
}

/// As [`is_permanent`], and a claim-check topic that does not exist (it will
/// not appear by itself: the payload is withheld instead of retried forever).
fn is_permanent_for_claims(e: &KafkaError) -> bool {
    is_permanent(e)
        || matches!(
            e,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
            )
        )
}

/// Bytes of `letter` as one record with the original key.
fn record_len(letter: &DeadLetter, key_len: usize) -> usize {
    let headers: usize = letter
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 10)
        .sum();
    RECORD_OVERHEAD + key_len + letter.payload.len() + headers
}

#[async_trait::async_trait]
impl<C: ClientContext + 'static> DeadLetterPublisher for KafkaDeadLetters<C> {
    /// The dead-letter and claim-check topics of `source` must exist (tansu,
    /// and Kafka with `auto.create.topics.enable=false`, create none).
    async fn preflight(&self, source: &str) -> Result<(), TransportError> {
        const OP: &str = "dead-letter preflight";
        let topic = self.topic_for(source);
        let claims = format!("{topic}{CLAIMS_SUFFIX}");
        for t in [topic.clone(), claims.clone()] {
            let producer = self.producer.clone();
            let name = t.clone();
            let meta = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&name), Duration::from_secs(10))
            })
            .await
            .map_err(|e| TransportError::new(OP, e))?
            .map_err(|e| TransportError::new(OP, e))?;
            let missing = meta
                .topics()
                .iter()
                .find(|m| m.name() == t)
                .is_none_or(|m| m.error().is_some() || m.partitions().is_empty());
            if missing && t == claims {
                tracing::warn!(topic = %t, %source, "the claim-check topic does not exist: payloads too large for a dead letter will be withheld (length and SHA-256 kept); create it to keep them");
            } else if missing {
                return Err(TransportError::permanent(
                    OP,
                    format!("topic {t} does not exist: create it (letters of {source} go there)"),
                ));
            }
        }
        Ok(())
    }

    fn measure(&self, letter: &DeadLetter) -> Excess {
        let key = letter.key.as_ref().map_or(0, Bytes::len);
        Excess {
            headers: 0,
            total: record_len(letter, key).saturating_sub(self.max_message_bytes),
        }
    }

    async fn store_claim(&self, letter: &DeadLetter) -> Result<PayloadAt, TransportError> {
        let topic = format!("{}{CLAIMS_SUFFIX}", self.letter_topic(letter));
        let key = letter.idempotency_key.as_bytes();
        let room = self
            .max_message_bytes
            .saturating_sub(RECORD_OVERHEAD + key.len() + 256)
            .max(1);
        let payload = letter.claim_payload();
        let count = payload.len().div_ceil(room).max(1);
        let mut first = None;
        let mut last = (0, 0);
        for (i, chunk) in payload.chunks(room).enumerate() {
            let chunk_header = format!("{}/{count}", i + 1);
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: elevate_core::deadletter::H_IDEMPOTENCY_KEY,
                    value: Some(key),
                })
                .insert(Header {
                    key: H_CLAIM_CHUNK,
                    value: Some(chunk_header.as_bytes()),
                });
            last = self
                .send(&topic, Some(key), chunk, headers, is_permanent_for_claims)
                .await?;
            first.get_or_insert(last);
        }
        let (partition, first_offset) = first.unwrap_or(last);
        Ok(PayloadAt::ClaimCheck {
            store: "kafka-topic".into(),
            location: format!("{topic}/{partition}/{first_offset}-{}", last.1),
            chunks: u32::try_from(count).unwrap_or(u32::MAX),
        })
    }

    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError> {
        let topic = self.letter_topic(letter);
        let key = letter.key.clone();
        self.send(
            &topic,
            key.as_deref(),
            &letter.payload,
            to_kafka(&letter.headers),
            is_permanent,
        )
        .await
        .map(|_| ())
    }
}
