//! Elevate as separate services (see `examples/deploy/README.md` and
//! `scripts/demo-deploy`): what the orders API, the workers and the client
//! agree on — the workload ids, the three destinations of one run, the
//! order a user places, and the outcome the example policy prescribes.

use serde::{Deserialize, Serialize};

/// The example trust domain (`examples/policies/entities.json`).
pub const TRUST_DOMAIN: &str = "elevate.example";
/// The test IdP's issuer id (the TTS's `[user_issuer]`).
pub const IDP_ISSUER: &str = "https://idp.elevate.example";
/// The entry service.
pub const ORDERS_API: &str = "spiffe://elevate.example/orders-api";
/// What the entry service asks the TTS for, for a signed-in user.
pub const ORIGIN_SCOPE: &str = "order.process billing.charge notification.send";

/// The guarded workers: broker, workload, action.
pub const WORKERS: [Worker; 3] = [
    Worker {
        broker: Broker::Kafka,
        name: "order-worker",
        action: "order.process",
    },
    Worker {
        broker: Broker::Nats,
        name: "billing-worker",
        action: "billing.charge",
    },
    Worker {
        broker: Broker::Amqp,
        name: "notify-worker",
        action: "notification.send",
    },
];

/// A broker the deployment runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Broker {
    /// Kafka (tansu locally).
    Kafka,
    /// NATS JetStream.
    Nats,
    /// RabbitMQ.
    Amqp,
}

/// One guarded worker of the deployment.
#[derive(Debug, Clone, Copy)]
pub struct Worker {
    /// Its broker.
    pub broker: Broker,
    /// Its short name (`spiffe://elevate.example/<name>`, its directory).
    pub name: &'static str,
    /// The action its messages ask for.
    pub action: &'static str,
}

impl Worker {
    /// Its workload id.
    pub fn id(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}", self.name)
    }

    /// Its destination in run `run`: a Kafka topic, a JetStream subject or
    /// a RabbitMQ queue (dead letters: the same + `.dlq`).
    pub fn destination(&self, run: &str) -> String {
        match self.broker {
            Broker::Kafka => format!("deploy-orders-{run}"),
            Broker::Nats => format!("deploy.{run}.billing"),
            Broker::Amqp => format!("deploy-notify-{run}"),
        }
    }

    /// Whether the example policy at bundle `revision` lets it act for
    /// `user`: every worker for alice; for bob the order worker (he is
    /// entitled to `order.process`), and from revision 2 — which
    /// `scripts/demo-deploy` publishes midway, entitling him to
    /// `billing.charge` — the billing worker too; none for mallory (inactive).
    pub fn permits(&self, user: &str, revision: u64) -> bool {
        match user {
            "alice" => true,
            "bob" => {
                self.action == "order.process" || (revision >= 2 && self.action == "billing.charge")
            }
            _ => false,
        }
    }
}

/// The JetStream Object Store bucket holding run `run`'s signed policy bundle.
pub fn bundle_bucket(run: &str) -> String {
    format!("ELEVATE_BUNDLES_{run}")
}

/// The JetStream stream of run `run` (its dead letters: `<stream>_DLQ`).
pub fn nats_stream(run: &str) -> String {
    format!("DEPLOY_{run}")
}

/// What `POST /orders` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placed {
    /// The order id.
    pub order: String,
    /// The user it acts for.
    pub user: String,
    /// The origin transaction (the Txn-Token's `txn`).
    pub txn: String,
    /// The key id the references were signed with.
    pub kid: String,
    /// Where each message went.
    pub published: Vec<String>,
}

/// Boxed error of the deployment's programs.
pub type AppResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Where the brokers are (flags, else the environment, else the local services).
#[derive(clap::Args, Debug, Clone)]
pub struct Brokers {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka: String,
    /// NATS server (with JetStream).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// RabbitMQ.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp: String,
}

impl Brokers {
    /// A Kafka client configuration for the cluster.
    pub fn kafka_config(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.kafka);
        c
    }

    /// A NATS connection.
    ///
    /// # Errors
    /// The server does not answer (named by its URL).
    pub async fn nats_client(&self) -> AppResult<async_nats::Client> {
        async_nats::connect(&self.nats)
            .await
            .map_err(|e| format!("NATS at {}: {e} (start nats-server -js)", self.nats).into())
    }

    /// A JetStream context.
    ///
    /// # Errors
    /// As [`Brokers::nats_client`].
    pub async fn jetstream(&self) -> AppResult<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::new(self.nats_client().await?))
    }

    /// A RabbitMQ connection.
    ///
    /// # Errors
    /// The broker does not answer (named by its URL).
    pub async fn amqp_connection(&self) -> AppResult<lapin::Connection> {
        lapin::Connection::connect(&self.amqp, lapin::ConnectionProperties::default())
            .await
            .map_err(|e| format!("RabbitMQ at {}: {e}", self.amqp).into())
    }
}

/// Completes on SIGTERM or Ctrl-C: how a supervisor stops a service.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
