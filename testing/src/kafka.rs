//! The conformance binding for Kafka, with two fixtures: a real
//! Kafka-protocol broker at `KAFKA_BOOTSTRAP` (default `127.0.0.1:9092`, the
//! tansu broker `scripts/kafka-up` starts) and librdkafka's in-process mock
//! cluster (the embedded default).

use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_core::settle::Processor;
use elevate_core::{Headers, OutboundMessage};
use elevate_kafka::headers::{from_kafka, to_kafka};
use elevate_kafka::{EmbeddedKafka, GuardedConsumer, KafkaDeadLetters, KafkaProducer};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::binding::{
    BindResult, BrokerBinding, ConsumerHandle, ConsumerOptions, Endpoint, InboundLimits,
    RawHandler, RawMessage,
};

/// Partitions of every scenario topic by default (dead-letter topics get one);
/// see [`KafkaBinding::with_partitions`].
pub const PARTITIONS: i32 = 3;

/// Messages in flight in the binding's guarded consumer by default.
pub const CONCURRENCY: usize = 8;

/// One record read back with a plain consumer.
#[derive(Debug, Clone)]
pub struct Record {
    /// The partition the record was read from.
    pub partition: i32,
    /// The record's offset in its partition.
    pub offset: i64,
    /// The record's key, if it has one (it picks the partition).
    pub key: Option<Vec<u8>>,
    /// The record's headers as stored, to check what was stripped or attached.
    pub headers: Headers,
    /// The record's value as stored.
    pub payload: Vec<u8>,
}

impl From<Record> for RawMessage {
    fn from(r: Record) -> Self {
        RawMessage {
            headers: r.headers,
            payload: r.payload,
        }
    }
}

/// A Kafka fixture: the real broker or the embedded mock cluster.
pub struct KafkaBinding {
    name: &'static str,
    bootstrap: String,
    // (fields drop in order: the producer goes before the mock cluster it
    // talks to, which would otherwise log every broker as down)
    plain: FutureProducer,
    embedded: Option<Arc<EmbeddedKafka>>,
    partitions: i32,
    consumer_settings: Vec<(String, String)>,
}

fn kafka_err(e: impl std::fmt::Display) -> String {
    format!("kafka: {e}")
}

impl KafkaBinding {
    /// The real broker at `KAFKA_BOOTSTRAP` (default `127.0.0.1:9092`); panics with how to start it if unreachable.
    pub async fn real() -> Self {
        let bootstrap = crate::fixture::address(crate::fixture::Service::Kafka);
        Self::connect(&bootstrap).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The real broker at `bootstrap` (comma-separated servers).
    ///
    /// # Errors
    ///
    /// Returns how to start the local broker if nothing answers at the first
    /// server within 2 s, and a message if the plain producer cannot be created.
    pub fn connect(bootstrap: &str) -> BindResult<Self> {
        let first = bootstrap.split(',').next().unwrap_or_default().to_string();
        let reachable = match first.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()),
            Err(_) => false,
        };
        if !reachable {
            return Err(format!(
                "no Kafka broker reachable at {bootstrap} (KAFKA_BOOTSTRAP): start the local tansu broker with `scripts/kafka-up` \
                 (or point KAFKA_BOOTSTRAP at an Apache Kafka)"
            ));
        }
        Self::with_bootstrap("kafka", bootstrap.to_string(), None)
    }

    /// librdkafka's in-process mock cluster (no server needed).
    pub async fn mock() -> Self {
        Self::start_mock().unwrap_or_else(|e| panic!("{e}"))
    }

    /// librdkafka's in-process mock cluster, started now.
    ///
    /// # Errors
    ///
    /// Returns a message if the mock cluster or the plain producer cannot be created.
    pub fn start_mock() -> BindResult<Self> {
        let embedded = EmbeddedKafka::start(1).map_err(|e| format!("mock cluster: {e}"))?;
        let bootstrap = embedded.bootstrap_servers().to_string();
        Self::with_bootstrap("kafka-mock", bootstrap, Some(Arc::new(embedded)))
    }

    fn with_bootstrap(
        name: &'static str,
        bootstrap: String,
        embedded: Option<Arc<EmbeddedKafka>>,
    ) -> BindResult<Self> {
        let mut config = Self::config_for(&bootstrap);
        config
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "30000");
        if embedded.is_none() {
            // One record per batch on a real broker: see the tansu note in
            // kafka/README.md. The mock cluster reads batches whole (and a
            // consumer of single-record batches there is several times slower).
            config.set("batch.num.messages", "1");
        }
        let plain = config.create().map_err(|e| format!("producer: {e}"))?;
        Ok(KafkaBinding {
            name,
            bootstrap,
            embedded,
            plain,
            partitions: PARTITIONS,
            consumer_settings: Vec::new(),
        })
    }

    /// The same binding creating endpoint topics of `partitions` partitions
    /// (default [`PARTITIONS`]); the guarded consumer works one record per
    /// partition at a time.
    #[must_use]
    pub fn with_partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    /// The same binding setting `key` to `value` in the config of every
    /// consumer it creates, guarded and plain (e.g. `fetch.wait.max.ms`).
    #[must_use]
    pub fn with_consumer_setting(mut self, key: &str, value: &str) -> Self {
        self.consumer_settings
            .push((key.to_string(), value.to_string()));
        self
    }

    fn config_for(bootstrap: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap)
            .set("topic.metadata.refresh.interval.ms", "1000");
        c
    }

    /// Bootstrap servers of this fixture.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// A client config pointing at this fixture.
    pub fn config(&self) -> ClientConfig {
        Self::config_for(&self.bootstrap)
    }

    /// The plain (unguarded) producer.
    pub fn plain_producer(&self) -> &FutureProducer {
        &self.plain
    }

    /// A guarded producer over this fixture's plain producer.
    pub fn guarded_producer(&self, guard: &ProducerGuard) -> KafkaProducer {
        KafkaProducer::new(self.plain.clone(), guard.clone())
    }

    /// Creates a topic (idempotent).
    ///
    /// # Errors
    ///
    /// Returns a message if the admin client cannot be created or the request fails, the broker
    /// refuses the topic (other than "already exists"), or not all its partitions are visible in
    /// metadata after 50 probes (at least 5 s).
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> BindResult<()> {
        if let Some(e) = &self.embedded {
            return e.create_topic(topic, partitions).map_err(kafka_err);
        }
        let admin: AdminClient<DefaultClientContext> = self.config().create().map_err(kafka_err)?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let results = admin
            .create_topics(
                [&new],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(kafka_err)?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(format!("create topic {t}: {code}")),
            }
        }
        // wait until the metadata shows every partition
        let probe: StreamConsumer = self
            .config()
            .set("group.id", "elevate-probe")
            .create()
            .map_err(kafka_err)?;
        for _ in 0..50 {
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
        Err(format!("topic {topic} not visible in metadata"))
    }

    /// Consumer config for a guarded consumer in `group` (offsets stored after settlement).
    pub fn guarded_consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.plain_consumer_config(group);
        c.set("enable.auto.offset.store", "false");
        c
    }

    /// Consumer config for a plain consumer in `group`: from the earliest
    /// offset, committing automatically what it was handed.
    pub fn plain_consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.config();
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "200")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
        for (k, v) in &self.consumer_settings {
            c.set(k, v);
        }
        c
    }

    /// Waits until the group has assigned `consumer` partitions (bounded: 60 s).
    async fn wait_assigned(consumer: &StreamConsumer, topic: &str, group: &str) -> BindResult<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "consumer in group {group} got no partitions of {topic} within 60 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Starts a guarded consumer on `topic` in `group`, dead letters to `<topic>.dlq`;
    /// returns once the group has assigned it partitions (bounded: 60 s).
    ///
    /// # Errors
    ///
    /// Returns a message if the dead-letter producer or the guarded consumer cannot be created
    /// (including a consumer configuration the guard refuses), the subscription fails, or the group
    /// assigns no partitions within 60 s.
    pub async fn spawn_guarded(
        &self,
        topic: &str,
        group: &str,
        processor: Arc<Processor>,
        concurrency: usize,
    ) -> BindResult<ConsumerHandle> {
        let opts = ConsumerOptions {
            concurrency: Some(concurrency),
            ..ConsumerOptions::default()
        };
        self.spawn_guarded_with(topic, group, processor, &opts)
            .await
    }

    /// [`KafkaBinding::spawn_guarded`] tuned by `opts` (concurrency, dead-letter tap).
    async fn spawn_guarded_with(
        &self,
        topic: &str,
        group: &str,
        processor: Arc<Processor>,
        opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle> {
        // One record per batch: tansu 0.6 loses records when a fetch starts inside a
        // stored multi-record batch (kafka/README.md); Apache Kafka does not need this.
        let mut dl_config = self.config();
        dl_config.set("batch.num.messages", "1");
        let dead_letters = KafkaDeadLetters::from_config(&dl_config).map_err(kafka_err)?;
        let processor =
            Arc::new(processor.with_dead_letters(opts.dead_letters(Arc::new(dead_letters))));
        let guarded = GuardedConsumer::from_config(&self.guarded_consumer_config(group), processor)
            .map_err(kafka_err)?
            .concurrency(opts.concurrency_or(CONCURRENCY));
        guarded.consumer().subscribe(&[topic]).map_err(kafka_err)?;
        let watch = guarded.consumer().clone();
        let handle = ConsumerHandle::spawn(|stopped| async move {
            if let Err(e) = guarded.run(stopped).await {
                tracing::error!(error = %e, "guarded consumer ended");
            }
        });
        if let Err(e) = Self::wait_assigned(&watch, topic, group).await {
            handle.kill();
            return Err(e);
        }
        Ok(handle)
    }

    /// Reads `topic` from the beginning with a plain consumer: waits until at
    /// least `expected` records exist (or `timeout`), then returns everything up
    /// to the high watermarks, in partition/offset order.
    ///
    /// # Errors
    ///
    /// Returns a message if the reader cannot be created or assigned, the topic's metadata or
    /// watermarks cannot be fetched, or the topic has no partitions. Fewer than `expected` records
    /// by `timeout` is not an error.
    pub async fn read_records(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<Record>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let consumer: StreamConsumer = self
            .config()
            .set(
                "group.id",
                format!("elevate-reader-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .map_err(kafka_err)?;
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(kafka_err)?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(format!("topic {topic} has no partitions"));
        }
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .map_err(kafka_err)?;
        }
        consumer.assign(&tpl).map_err(kafka_err)?;
        let mut next: HashMap<i32, i64> = partitions.iter().map(|p| (*p, 0)).collect();
        let mut out: Vec<Record> = Vec::new();
        loop {
            let mut high: HashMap<i32, i64> = HashMap::new();
            for p in &partitions {
                let (_, h) = consumer
                    .fetch_watermarks(topic, *p, Duration::from_secs(5))
                    .map_err(kafka_err)?;
                high.insert(*p, h);
            }
            let total: i64 = high.values().sum();
            let caught_up =
                |next: &HashMap<i32, i64>| partitions.iter().all(|p| next[p] >= high[p]);
            while !caught_up(&next) {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break;
                }
                match tokio::time::timeout(deadline - now, consumer.recv()).await {
                    Ok(Ok(m)) => {
                        let e = next.entry(m.partition()).or_insert(0);
                        if m.offset() < *e {
                            continue;
                        }
                        *e = m.offset() + 1;
                        out.push(Record {
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(|k| k.to_vec()),
                            headers: from_kafka(m.headers()),
                            payload: m.payload().unwrap_or_default().to_vec(),
                        });
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "reader"),
                    Err(_) => break,
                }
            }
            if (total as usize >= expected && caught_up(&next))
                || tokio::time::Instant::now() >= deadline
            {
                out.sort_by_key(|r| (r.partition, r.offset));
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Committed offsets of `group` on `topic`, per partition (None if nothing committed).
    ///
    /// # Errors
    ///
    /// Returns a message if the consumer cannot be created, or the topic's metadata or the group's
    /// committed offsets cannot be fetched (within 5 s and 10 s).
    pub async fn committed(
        &self,
        topic: &str,
        group: &str,
    ) -> BindResult<HashMap<i32, Option<i64>>> {
        let consumer: StreamConsumer = self
            .config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka_err)?;
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(kafka_err)?;
        let mut tpl = TopicPartitionList::new();
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                tpl.add_partition(topic, p.id());
            }
        }
        let got = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(kafka_err)?;
        Ok(got
            .elements()
            .iter()
            .map(|e| {
                let off = match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                };
                (e.partition(), off)
            })
            .collect())
    }

    /// Sends a record with the plain producer to a partition, exactly as given.
    ///
    /// # Errors
    ///
    /// Returns a message if the broker does not acknowledge the record within 10 s or refuses it
    /// (unknown topic or partition, too large).
    pub async fn send_raw(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        headers: &Headers,
        payload: &[u8],
    ) -> BindResult<(i32, i64)> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .payload(payload)
            .headers(to_kafka(headers));
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        self.plain
            .send(record, Duration::from_secs(10))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| kafka_err(e))
    }
}

#[async_trait::async_trait]
impl BrokerBinding for KafkaBinding {
    fn name(&self) -> &'static str {
        self.name
    }

    fn limits(&self) -> InboundLimits {
        // librdkafka's default message.max.bytes (1,000,000) bounds the whole record.
        InboundLimits {
            // originals just under it; their letters (+ the envelope) over it
            header_bytes: 999_500,
            payload_bytes: Some(999_800),
            claim_check: true,
            enforced: true,
        }
    }

    async fn setup(&self, scenario: &str) -> BindResult<Endpoint> {
        let name = format!("{scenario}-{}", uuid::Uuid::new_v4().simple());
        let dead_letter = format!("{name}.dlq");
        self.create_topic(&name, self.partitions).await?;
        self.create_topic(&dead_letter, 1).await?;
        // tansu creates no topic on demand: the claim-check topic too
        self.create_topic(
            &format!("{dead_letter}{}", elevate_kafka::deadletter::CLAIMS_SUFFIX),
            1,
        )
        .await?;
        Ok(Endpoint {
            destination: name.clone(),
            dead_letter,
            name,
        })
    }

    async fn publish_guarded(
        &self,
        ep: &Endpoint,
        producer: &ProducerGuard,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> BindResult<()> {
        let req = PublishRequest {
            destination: &ep.name,
            ..req.clone()
        };
        self.guarded_producer(producer)
            .publish(&req, msg)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn publish_raw(
        &self,
        ep: &Endpoint,
        headers: Headers,
        payload: Vec<u8>,
    ) -> BindResult<()> {
        self.send_raw(&ep.name, None, None, &headers, &payload)
            .await
            .map(|_| ())
    }

    async fn publish_batch(
        &self,
        ep: &Endpoint,
        messages: Vec<(Headers, Vec<u8>)>,
    ) -> BindResult<()> {
        // Up to 500 sends in flight, each awaited for its acknowledgement.
        for chunk in messages.chunks(500) {
            let sends = chunk.iter().map(|(headers, payload)| {
                let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&ep.name)
                    .payload(payload.as_slice())
                    .headers(to_kafka(headers));
                self.plain.send(record, Duration::from_secs(10))
            });
            for r in futures::future::join_all(sends).await {
                r.map_err(|(e, _)| kafka_err(e))?;
            }
        }
        Ok(())
    }

    async fn start_consumer_with(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
        opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle> {
        self.spawn_guarded_with(&ep.name, &format!("{}-group", ep.name), processor, opts)
            .await
    }

    async fn start_raw_consumer(
        &self,
        ep: &Endpoint,
        on_message: RawHandler,
        _opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle> {
        // Its own group: it reads every record the guarded consumer's group does.
        let group = format!("{}-raw", ep.name);
        let consumer: StreamConsumer = self
            .plain_consumer_config(&group)
            .create()
            .map_err(kafka_err)?;
        consumer.subscribe(&[ep.name.as_str()]).map_err(kafka_err)?;
        let consumer = Arc::new(consumer);
        let reader = consumer.clone();
        // One record at a time, as it arrives; offsets are committed automatically.
        let handle = ConsumerHandle::spawn(|mut stopped| async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    m = reader.recv() => match m {
                        Ok(m) => on_message(&from_kafka(m.headers()), m.payload().unwrap_or_default()),
                        Err(e) => tracing::warn!(error = %e, "plain consumer"),
                    }
                }
            }
        });
        if let Err(e) = Self::wait_assigned(&consumer, &ep.name, &group).await {
            handle.kill();
            return Err(e);
        }
        Ok(handle)
    }

    async fn teardown(&self, ep: &Endpoint) {
        if self.embedded.is_some() {
            return; // the mock cluster goes with the binding
        }
        let claims = format!(
            "{}{}",
            ep.dead_letter,
            elevate_kafka::deadletter::CLAIMS_SUFFIX
        );
        if let Ok(admin) = self.config().create::<AdminClient<DefaultClientContext>>() {
            let _ = admin
                .delete_topics(
                    &[ep.name.as_str(), ep.dead_letter.as_str(), claims.as_str()],
                    &AdminOptions::new(),
                )
                .await;
        }
    }

    async fn dead_letters(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>> {
        Ok(self
            .read_records(&ep.dead_letter, expected, timeout)
            .await?
            .into_iter()
            .map(RawMessage::from)
            .collect())
    }

    async fn read_raw(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>> {
        Ok(self
            .read_records(&ep.name, expected, timeout)
            .await?
            .into_iter()
            .map(RawMessage::from)
            .collect())
    }
}

#[async_trait::async_trait]
impl crate::delivery::DeliveryBinding for KafkaBinding {
    type Source = elevate_kafka::KafkaSource;

    async fn open_source(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
    ) -> BindResult<Self::Source> {
        // One group for every source of the endpoint: a reopened source
        // resumes from the offsets the previous one committed.
        let group = format!("{}-contract", ep.name);
        let guarded =
            GuardedConsumer::from_config(&self.guarded_consumer_config(&group), processor)
                .map_err(kafka_err)?;
        guarded
            .consumer()
            .subscribe(&[ep.name.as_str()])
            .map_err(kafka_err)?;
        Ok(guarded.into_parts().1)
    }

    fn unsettled_window(&self) -> Duration {
        // Nothing returns by time: an unstored offset is read again by the
        // next member of the group.
        Duration::from_secs(1)
    }
}
