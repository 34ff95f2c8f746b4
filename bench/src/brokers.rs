//! The brokers a run can use, each one the test kit's binding
//! ([`elevate_testing::binding::BrokerBinding`]), tuned as the benchmark
//! measures them.

use elevate_testing::amqp::AmqpBinding;
use elevate_testing::binding::BrokerBinding;
use elevate_testing::kafka::KafkaBinding;
use elevate_testing::memory::MemoryBinding;
use elevate_testing::nats::{NatsBinding, NatsMode};

use crate::{Args, BrokerKind};

/// Partitions per Kafka topic: the guarded consumer works one record per
/// partition at a time.
const KAFKA_PARTITIONS: i32 = 8;

/// Connects to (or starts) the broker of `kind` at the address `args` give.
///
/// # Errors
///
/// Says why the broker cannot be used (not reachable, no JetStream, …): its
/// rows then fail with that.
pub async fn connect(kind: BrokerKind, args: &Args) -> Result<Box<dyn BrokerBinding>, String> {
    // Kafka consumers fetch with a short wait, so an idle consumer sees a
    // trickled record at once.
    let kafka = |b: KafkaBinding| {
        Box::new(
            b.with_partitions(KAFKA_PARTITIONS)
                .with_consumer_setting("fetch.wait.max.ms", "10"),
        ) as Box<dyn BrokerBinding>
    };
    Ok(match kind {
        BrokerKind::Memory => Box::new(MemoryBinding::new().await),
        BrokerKind::KafkaMock => kafka(KafkaBinding::start_mock()?),
        BrokerKind::Kafka => kafka(KafkaBinding::connect(&args.kafka_bootstrap)?),
        BrokerKind::Amqp => Box::new(AmqpBinding::connect_to(&args.amqp_url).await?),
        BrokerKind::Nats => {
            Box::new(NatsBinding::connect_to(&args.nats_url, NatsMode::JetStream).await?)
        }
    })
}
