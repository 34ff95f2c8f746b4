//! Reproduces a crash of librdkafka 2.12.1 (the version rdkafka 0.39 bundles)
//! on tansu 0.6: a consumer assigned to a topic that is then deleted dies with
//! SIGSEGV. tansu answers the next Fetch with its unknown-topic partition (a
//! zero topic id and a `CurrentLeader` tag, `unknown_topic_response` in
//! `tansu-storage/src/service/fetch.rs`); librdkafka turns the tag into a
//! leader update, finds no topic id, falls back to the topic name, which a
//! Fetch v13+ answer does not carry, and calls `strcmp(NULL)`
//! (`rd_kafka_metadata_update_op`, `rdkafka_metadata.c:2095`).
//!
//! ```sh
//! cargo run -p elevate-drills --example tansu_topic_delete_crash -- 127.0.0.1:9092
//! ```
//!
//! Exits 0 with "no crash" if the client survives (Apache Kafka, a fixed tansu
//! or librdkafka); on tansu 0.6 the process ends with signal 11 instead.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let bootstrap = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9092".into());
    let topic = format!("crash-repro-{}", uuid::Uuid::new_v4().simple());
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", &bootstrap);
    let admin: AdminClient<DefaultClientContext> = base.create().expect("admin client");
    admin
        .create_topics(
            [&NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create the topic");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let producer: FutureProducer = base
        .clone()
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    for i in 0..10 {
        let payload = format!("record {i}");
        producer
            .send(
                FutureRecord::<(), _>::to(&topic).payload(&payload),
                Duration::from_secs(5),
            )
            .await
            .expect("produce");
    }
    let consumer: StreamConsumer = base
        .clone()
        .set("group.id", "crash-repro")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)
        .expect("assignment");
    consumer.assign(&tpl).expect("assign");
    let mut read = 0;
    while read < 10 {
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
            read += 1;
        }
    }
    println!("read {read} records from {topic}; deleting the topic");
    admin
        .delete_topics(&[&topic], &AdminOptions::new())
        .await
        .expect("delete the topic");
    for _ in 0..50 {
        let _ = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
    }
    println!("no crash");
}
