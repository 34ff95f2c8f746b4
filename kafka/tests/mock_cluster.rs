//! What the embedded default (librdkafka's mock cluster) supports, checked:
//! duplicate header keys, consumer groups, stored offsets and their commit.

use std::time::Duration;

use elevate_core::Headers;
use elevate_kafka::EmbeddedKafka;
use elevate_kafka::headers::{from_kafka, to_kafka};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_cluster_headers_groups_and_stored_offsets() {
    let kafka = EmbeddedKafka::start(1).unwrap();
    kafka.create_topic("t", 2).unwrap();
    let producer: FutureProducer = config(kafka.bootstrap_servers()).create().unwrap();
    let mut h = Headers::new();
    h.append("dup", b"1".to_vec());
    h.append("dup", vec![0u8, 1, 2]);
    for i in 0..10 {
        let payload = format!("m{i}");
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to("t")
                    .partition(i % 2)
                    .payload(payload.as_bytes())
                    .headers(to_kafka(&h)),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    let group_config = || {
        let mut c = config(kafka.bootstrap_servers());
        c.set("group.id", "g")
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000");
        c
    };
    let consumer: StreamConsumer = group_config().create().unwrap();
    consumer.subscribe(&["t"]).unwrap();
    let mut got = 0;
    while got < 10 {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            from_kafka(m.headers()),
            h,
            "headers with duplicate keys survive"
        );
        // store only the first 3 of each partition
        if m.offset() < 3 {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset("t", m.partition(), Offset::Offset(m.offset() + 1))
                .unwrap();
            consumer.store_offsets(&tpl).unwrap();
        }
        got += 1;
    }
    consumer.commit_consumer_state(CommitMode::Sync).unwrap();
    let committed = consumer
        .committed(Duration::from_secs(5))
        .unwrap()
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect::<Vec<_>>();
    assert_eq!(committed.len(), 2);
    for (_, o) in committed {
        assert_eq!(o, Offset::Offset(3), "only stored offsets are committed");
    }
    drop(consumer);
    // a new member of the group resumes from the committed offsets
    let consumer: StreamConsumer = group_config().create().unwrap();
    consumer.subscribe(&["t"]).unwrap();
    let t = std::time::Instant::now();
    let m = tokio::time::timeout(Duration::from_secs(40), consumer.recv())
        .await
        .unwrap()
        .unwrap();
    eprintln!("rejoined and received after {:?}", t.elapsed());
    assert_eq!(m.offset(), 3);
}

#[tokio::test]
async fn guarded_consumer_refuses_auto_offset_store() {
    let kafka = EmbeddedKafka::start(1).unwrap();
    // Checked in the configuration, before any consumer exists (no FFI read).
    let mut unset = config(kafka.bootstrap_servers());
    unset.set("group.id", "g");
    let err = elevate_kafka::consumer::check_config(&unset).unwrap_err();
    assert!(err.to_string().contains("enable.auto.offset.store"));
    let mut on = unset.clone();
    on.set("enable.auto.offset.store", "true");
    assert!(elevate_kafka::consumer::check_config(&on).is_err());
    let mut ok = unset.clone();
    ok.set("enable.auto.offset.store", "false");
    assert!(elevate_kafka::consumer::check_config(&ok).is_ok());
}

/// Fuzz findings (kafka_headers) end to end through librdkafka's producer and
/// fetch parser: a header key that is not UTF-8 (sent by any producer) no
/// longer panics the consumer's header mapping, and a name with a NUL byte
/// is not sent under a name the producer's scan never saw.
#[tokio::test]
#[allow(unsafe_code)] // crafts a record with a non-UTF-8 key through librdkafka (rdkafka takes only &str)
async fn raw_header_keys_survive_the_consumer_mapping() {
    use rdkafka::bindings::{rd_kafka_header_add, rd_kafka_headers_t};
    use rdkafka::message::{BorrowedHeaders, OwnedHeaders};

    let kafka = EmbeddedKafka::start(1).unwrap();
    kafka.create_topic("raw", 1).unwrap();
    let producer: FutureProducer = config(kafka.bootstrap_servers()).create().unwrap();
    // A foreign producer's record: rdkafka's API only takes `&str` keys, so
    // add the raw key through librdkafka itself.
    let raw = OwnedHeaders::new_with_capacity(2);
    let native = raw.as_borrowed() as *const BorrowedHeaders as *mut rd_kafka_headers_t;
    for (key, value) in [(&b"x-\xff\xfe"[..], &b"v"[..]), (b"ok", b"1")] {
        // SAFETY: `native` is `raw`'s live list; librdkafka copies the bytes.
        unsafe {
            rd_kafka_header_add(
                native,
                key.as_ptr().cast(),
                key.len() as isize,
                value.as_ptr().cast(),
                value.len() as isize,
            );
        }
    }
    let mut smuggled = Headers::new();
    smuggled.append("cookie\0x", "session=abc");
    smuggled.append("x-keep", "1");
    for headers in [raw, to_kafka(&smuggled)] {
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to("raw")
                    .payload(&b"p"[..])
                    .headers(headers),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    let consumer: StreamConsumer = config(kafka.bootstrap_servers())
        .set("group.id", "raw")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["raw"]).unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .unwrap()
            .unwrap();
        let h = from_kafka(m.headers());
        got.push(
            h.iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        got,
        vec![
            vec![
                ("x-\u{FFFD}\u{FFFD}".to_string(), b"v".to_vec()),
                ("ok".to_string(), b"1".to_vec()),
            ],
            vec![("x-keep".to_string(), b"1".to_vec())],
        ]
    );
}
