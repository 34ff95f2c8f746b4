//! Where a test's broker comes from: one rule for every service.
//!
//! 1. The address in the service's environment variable (`AMQP_URL`,
//!    `NATS_URL`, `KAFKA_BOOTSTRAP`, `REDIS_URL`), when set.
//! 2. Else the local default, when something listens there (the services
//!    this project's machines run, and `scripts/kafka-up` for Kafka).
//! 3. Else, when a Docker engine answers, a container started with
//!    testcontainers on the default port (named `elevate-test-<service>` and
//!    kept for reuse, so later runs find it like a local service).
//! 4. Else a panic that says how to start the service: never a silent skip.

use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt, ReuseDirective};

/// A service the integration tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// RabbitMQ (AMQP 0-9-1).
    RabbitMq,
    /// NATS with JetStream.
    Nats,
    /// A Kafka-protocol broker.
    Kafka,
    /// Redis (the shared replay seen-set).
    Redis,
}

impl Service {
    /// The environment variable that names the service's address.
    pub fn env_var(self) -> &'static str {
        match self {
            Service::RabbitMq => "AMQP_URL",
            Service::Nats => "NATS_URL",
            Service::Kafka => "KAFKA_BOOTSTRAP",
            Service::Redis => "REDIS_URL",
        }
    }

    /// The local default port.
    pub fn port(self) -> u16 {
        match self {
            Service::RabbitMq => 5672,
            Service::Nats => 4222,
            Service::Kafka => 9092,
            Service::Redis => 6379,
        }
    }

    /// The local default address, in the form the client takes.
    pub fn default_address(self) -> &'static str {
        match self {
            Service::RabbitMq => "amqp://guest:guest@127.0.0.1:5672/%2f",
            Service::Nats => "nats://127.0.0.1:4222",
            Service::Kafka => "127.0.0.1:9092",
            Service::Redis => "redis://127.0.0.1:6379",
        }
    }

    /// How to start the service on this project's machines.
    pub fn how_to_start(self) -> &'static str {
        match self {
            Service::RabbitMq => "rabbitmq-server -detached",
            Service::Nats => {
                "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
                 -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log"
            }
            Service::Kafka => "scripts/kafka-up",
            Service::Redis => {
                "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no"
            }
        }
    }

    /// The container that stands in for the service where Docker is available.
    fn image(self) -> testcontainers::ContainerRequest<GenericImage> {
        let port = self.port();
        let image = match self {
            Service::RabbitMq => GenericImage::new("rabbitmq", "3.10")
                .with_wait_for(WaitFor::message_on_stdout("Server startup complete")),
            Service::Nats => GenericImage::new("nats", "2.9")
                .with_wait_for(WaitFor::message_on_stderr("Server is ready")),
            // KRaft single node; it advertises localhost:9092, which the fixed
            // port mapping below makes true for the host.
            Service::Kafka => GenericImage::new("apache/kafka", "3.9.0")
                .with_wait_for(WaitFor::message_on_stdout("Kafka Server started")),
            Service::Redis => GenericImage::new("redis", "7")
                .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections")),
        };
        let request = image
            .with_mapped_port(port, port.tcp())
            .with_container_name(format!("elevate-test-{self:?}").to_lowercase())
            .with_reuse(ReuseDirective::Always);
        match self {
            Service::Nats => request.with_cmd(["-js"]),
            _ => request,
        }
    }
}

/// The address of `service` by the rule of this module; panics with how to
/// start it when none can be had. Resolved once per test process.
pub fn address(service: Service) -> String {
    static RESOLVED: [OnceLock<String>; 4] = [const { OnceLock::new() }; 4];
    let slot = match service {
        Service::RabbitMq => &RESOLVED[0],
        Service::Nats => &RESOLVED[1],
        Service::Kafka => &RESOLVED[2],
        Service::Redis => &RESOLVED[3],
    };
    slot.get_or_init(|| resolve(service)).clone()
}

fn resolve(service: Service) -> String {
    resolve_with(
        service,
        |var| std::env::var(var).ok(),
        listening,
        start_container,
    )
}

/// The rule itself, with its three sources passed in (so it can be tested
/// without touching the environment, the network or Docker).
fn resolve_with(
    service: Service,
    env: impl Fn(&str) -> Option<String>,
    listening: impl Fn(u16) -> bool,
    start: impl Fn(Service) -> Result<(), String>,
) -> String {
    if let Some(v) = env(service.env_var())
        && !v.trim().is_empty()
    {
        return v;
    }
    if listening(service.port()) {
        return service.default_address().to_string();
    }
    match start(service) {
        Ok(()) => service.default_address().to_string(),
        Err(docker) => panic!(
            "{service:?} is not running on 127.0.0.1:{port} and {var} is not set; no container \
             could be started either (Docker: {docker}). Start it with `{how}`, or set {var}",
            port = service.port(),
            var = service.env_var(),
            how = service.how_to_start(),
        ),
    }
}

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Starts (or reuses) the service's container on its own thread and runtime,
/// so that it does not matter which test's runtime asked first.
fn start_container(service: Service) -> Result<(), String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let container = tokio::time::timeout(Duration::from_secs(180), service.image().start())
                .await
                .map_err(|_| "the container did not start within 180 s".to_string())?
                .map_err(|e| e.to_string())?;
            // Marked for reuse: dropping the handle leaves the container running.
            drop(container);
            Ok(())
        })
    })
    .join()
    .map_err(|_| "the container thread panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Service; 4] = [
        Service::RabbitMq,
        Service::Nats,
        Service::Kafka,
        Service::Redis,
    ];

    #[test]
    fn the_environment_wins_then_the_local_service_then_a_container() {
        for s in ALL {
            let from_env = resolve_with(
                s,
                |v| (v == s.env_var()).then(|| "elsewhere:1".to_string()),
                |_| panic!("not consulted"),
                |_| panic!("not consulted"),
            );
            assert_eq!(from_env, "elsewhere:1");
            let local = resolve_with(s, |_| None, |p| p == s.port(), |_| panic!("not consulted"));
            assert_eq!(local, s.default_address());
            let started = std::cell::Cell::new(false);
            let container = resolve_with(
                s,
                |_| Some("  ".into()),
                |_| false,
                |x| {
                    assert_eq!(x, s);
                    started.set(true);
                    Ok(())
                },
            );
            assert!(started.get());
            assert_eq!(container, s.default_address());
        }
    }

    #[test]
    fn without_any_source_it_fails_saying_how_to_start_the_service() {
        for s in ALL {
            let panic = std::panic::catch_unwind(|| {
                resolve_with(s, |_| None, |_| false, |_| Err("no engine".into()))
            })
            .expect_err("must fail, never skip");
            let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains(s.how_to_start()), "{msg}");
            assert!(msg.contains(s.env_var()), "{msg}");
            assert!(msg.contains("no engine"), "{msg}");
        }
    }
}
