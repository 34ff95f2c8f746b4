//! A guarded worker of the deployment, one process per broker. The
//! workload comes from its `elevate.toml`; wrapping the broker's consumer
//! is the README's one constructor, with dead letters at
//! `<destination>.dlq`. Each permitted message prints a `PERMIT` line;
//! every decision goes to the file the configuration names. Ends on
//! SIGTERM or Ctrl-C, finishing the messages in progress.

use std::sync::Arc;

use clap::Parser;
use elevate_config::Workload;
use elevate_core::{AuthContext, InboundMessage, handler_fn};
use elevate_deploy::{AppResult, Broker, nats_stream, shutdown_signal};

/// A guarded worker.
#[derive(Parser, Debug)]
struct Args {
    /// The broker.
    #[arg(long, value_enum)]
    broker: Broker,
    /// Its `elevate.toml`.
    #[arg(long)]
    config: std::path::PathBuf,
    /// The run id (names the JetStream stream).
    #[arg(long)]
    run: String,
    /// What it consumes: a Kafka topic, a JetStream subject, a RabbitMQ queue.
    #[arg(long)]
    source: String,
    /// The broker's address (Kafka bootstrap servers, NATS or AMQP URL).
    #[arg(long)]
    url: String,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,elevate_core=info,elevate_bundle=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("deploy-worker: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> AppResult<()> {
    let workload = Workload::from_file(&args.config).await?;
    let me = workload.id().to_string();
    let handler: Arc<dyn elevate_core::Handler> =
        Arc::new(handler_fn(move |msg: InboundMessage, auth: AuthContext| {
            let me = me.clone();
            async move {
                println!(
                    "PERMIT {me} {} for {} (txn {})",
                    String::from_utf8_lossy(&msg.payload),
                    auth.subject(),
                    auth.txn()
                );
                Ok(())
            }
        }));
    println!(
        "{} consuming {} ({:?})",
        workload.id(),
        args.source,
        args.broker
    );
    match args.broker {
        Broker::Kafka => {
            use rdkafka::consumer::Consumer;
            let mut config = rdkafka::ClientConfig::new();
            config
                .set("bootstrap.servers", &args.url)
                .set("group.id", format!("{}-{}", args.source, "worker"))
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest");
            let guarded =
                elevate_kafka::GuardedConsumer::from_config(&config, workload.processor(handler))?;
            guarded.consumer().subscribe(&[args.source.as_str()])?;
            guarded.run(shutdown_signal()).await?;
        }
        Broker::Amqp => {
            use lapin::options::{BasicConsumeOptions, BasicQosOptions};
            let conn =
                lapin::Connection::connect(&args.url, lapin::ConnectionProperties::default())
                    .await?;
            let channel = conn.create_channel().await?;
            channel.basic_qos(32, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    args.source.as_str().into(),
                    "deploy-worker".into(),
                    BasicConsumeOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await?;
            let confirms = elevate_amqp::ConfirmChannel::open(&conn).await?;
            elevate_amqp::GuardedConsumer::new(consumer, workload.processor(handler), confirms)
                .run(shutdown_signal())
                .await?;
        }
        Broker::Nats => {
            use async_nats::jetstream::consumer::{AckPolicy, pull};
            let js = async_nats::jetstream::new(async_nats::connect(&args.url).await?);
            let consumer = js
                .get_stream(nats_stream(&args.run))
                .await?
                .get_or_create_consumer(
                    "deploy-worker",
                    pull::Config {
                        durable_name: Some("deploy-worker".into()),
                        filter_subject: args.source.clone(),
                        ack_policy: AckPolicy::Explicit,
                        ..Default::default()
                    },
                )
                .await?;
            elevate_nats::GuardedConsumer::bind(&js, consumer, workload.processor(handler))
                .run(shutdown_signal())
                .await?;
        }
    }
    println!("stopped");
    Ok(())
}
