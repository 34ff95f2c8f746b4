//! Kafka (tansu): topics created with the admin client (tansu does not
//! auto-create), records produced one per batch (tansu 0.6 loses the rest of
//! a batch to a fetch that starts inside it, kafka/README.md), dead letters
//! read back with a plain consumer assigned to the dead-letter topic.
//!
//! That consumer runs in a child process (`drill kafka-dlq-reader`), started
//! again from the next offset when it dies: librdkafka 2.12.1 dereferences a
//! NULL topic name (SIGSEGV in `rd_kafka_metadata_update_op`) when tansu 0.6
//! answers a Fetch with its unknown-topic partition (a zero topic id and a
//! `CurrentLeader` tag), which the drills meet in the orchestrator's reader.

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
    ctx: super::Context,
}

impl KafkaBroker {
    /// Checks the broker answers and creates the producer.
    pub fn connect(bootstrap: &str, ctx: super::Context) -> Result<Self, String> {
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
            ctx,
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
                        .publish(topic, Some(job.id.as_bytes()), &req, msg)
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
        let mut reader = KafkaDlq {
            exe: std::env::current_exe().map_err(|e| format!("where am I: {e}"))?,
            bootstrap: self.bootstrap.clone(),
            topic: names.dlq.clone(),
            ctx: self.ctx.clone(),
            next: 0,
            child: None,
            lines: None,
            starts: 0,
            incidents: Vec::new(),
        };
        reader.spawn()?;
        Ok(Box::new(reader))
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

/// One letter as the reader process prints it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ReadLetter {
    offset: i64,
    letter: Letter,
}

/// The dead-letter reader process: follows `topic` partition 0 from offset
/// `from`, printing one JSON line per letter, until killed.
pub async fn reader_main(bootstrap: &str, topic: &str, from: i64) -> Result<(), String> {
    use std::io::Write;
    let consumer: StreamConsumer = base_config(bootstrap)
        .set(
            "group.id",
            format!("drill-dlq-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .map_err(kerr)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(from))
        .map_err(kerr)?;
    consumer.assign(&tpl).map_err(kerr)?;
    let mut out = std::io::stdout().lock();
    loop {
        match consumer.recv().await {
            Ok(m) => {
                let headers = from_kafka(m.headers());
                let line = ReadLetter {
                    offset: m.offset(),
                    letter: Letter::from_parts(&headers, m.payload().unwrap_or_default()),
                };
                let text = serde_json::to_string(&line).map_err(|e| e.to_string())?;
                writeln!(out, "{text}").map_err(|e| e.to_string())?;
                out.flush().map_err(|e| e.to_string())?;
            }
            // librdkafka reconnects by itself
            Err(e) => tracing::debug!(error = %e, "dead-letter reader"),
        }
    }
}

struct KafkaDlq {
    exe: std::path::PathBuf,
    bootstrap: String,
    topic: String,
    ctx: super::Context,
    next: i64,
    child: Option<crate::procs::Proc>,
    lines: Option<std::sync::mpsc::Receiver<String>>,
    starts: u32,
    incidents: Vec<String>,
}

impl KafkaDlq {
    fn spawn(&mut self) -> Result<(), String> {
        use std::io::BufRead;
        self.starts += 1;
        let log = self.ctx.dir.join(format!("dlq-reader-{}.log", self.starts));
        let err = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("kafka-dlq-reader")
            .arg(&self.bootstrap)
            .arg(&self.topic)
            .arg(self.next.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::from(err));
        let mut child =
            crate::procs::Proc::spawn_with_stdio(cmd, "drill", &log, &self.ctx.registry)
                .map_err(|e| e.to_string())?;
        let stdout = child
            .child_mut()
            .stdout
            .take()
            .ok_or("the dead-letter reader has no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        self.child = Some(child);
        self.lines = Some(rx);
        Ok(())
    }
}

#[async_trait::async_trait(?Send)]
impl DlqReader for KafkaDlq {
    async fn poll(&mut self) -> Result<Vec<Letter>, String> {
        let mut out = Vec::new();
        let mut disconnected = false;
        if let Some(rx) = &self.lines {
            loop {
                match rx.try_recv() {
                    Ok(line) => match serde_json::from_str::<ReadLetter>(&line) {
                        Ok(r) if r.offset >= self.next => {
                            self.next = r.offset + 1;
                            out.push(r.letter);
                        }
                        Ok(_) => {}
                        Err(e) => self
                            .incidents
                            .push(format!("dead-letter reader printed {line:?}: {e}")),
                    },
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
        }
        let exited = self.child.as_mut().and_then(|c| c.exited());
        if disconnected || exited.is_some() {
            let status = match self.child.as_mut() {
                Some(c) => {
                    c.kill_hard();
                    c.exited().map(|s| s.to_string()).unwrap_or_default()
                }
                None => String::new(),
            };
            self.incidents.push(format!(
                "the Kafka dead-letter reader (a librdkafka consumer) died ({status}); \
                 started again from offset {}",
                self.next
            ));
            self.spawn()?;
        }
        if out.is_empty() {
            // Poll pace: the caller loops every quarter second anyway.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(out)
    }

    fn incidents(&mut self) -> Vec<String> {
        std::mem::take(&mut self.incidents)
    }
}
