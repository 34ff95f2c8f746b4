//! The embedded default: librdkafka's in-process mock cluster
//! (`rdkafka::mocking::MockCluster`), so the Kafka path runs with no server —
//! for tests and the demo, never for production (nothing is durable).

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::mocking::MockCluster;

enum Command {
    CreateTopic {
        name: String,
        partitions: i32,
        reply: mpsc::Sender<KafkaResult<()>>,
    },
    Stop,
}

/// An in-process mock Kafka cluster listening on loopback; stops when dropped.
///
/// The cluster lives on its own thread (librdkafka's handle is not `Send`),
/// so this value can be shared across tasks.
pub struct EmbeddedKafka {
    bootstrap: String,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedKafka")
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

impl EmbeddedKafka {
    /// Starts a mock cluster of `brokers` brokers.
    ///
    /// # Errors
    ///
    /// Returns a [`KafkaError`] if librdkafka cannot create the mock cluster, and
    /// [`KafkaError::ClientCreation`] if its thread cannot be spawned or ends before reporting the
    /// bootstrap servers.
    pub fn start(brokers: i32) -> KafkaResult<Self> {
        let (ready_tx, ready_rx) = mpsc::channel::<KafkaResult<String>>();
        let (commands, rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("elevate-mock-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Command::CreateTopic {
                            name,
                            partitions,
                            reply,
                        } => {
                            let _ = reply.send(cluster.create_topic(&name, partitions, 1));
                        }
                        Command::Stop => break,
                    }
                }
            })
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| KafkaError::ClientCreation("mock cluster thread ended".into()))??;
        Ok(EmbeddedKafka {
            bootstrap,
            commands,
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` value for clients.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic with `partitions` partitions (replication factor 1).
    ///
    /// # Errors
    ///
    /// Returns [`KafkaError::ClientCreation`] if the mock cluster has stopped, and librdkafka's
    /// error if it refuses the topic (for example, an invalid name or partition count).
    pub fn create_topic(&self, name: &str, partitions: i32) -> KafkaResult<()> {
        let (reply, rx) = mpsc::channel();
        self.commands
            .send(Command::CreateTopic {
                name: name.to_string(),
                partitions,
                reply,
            })
            .map_err(|_| KafkaError::ClientCreation("mock cluster stopped".into()))?;
        rx.recv()
            .map_err(|_| KafkaError::ClientCreation("mock cluster stopped".into()))?
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
