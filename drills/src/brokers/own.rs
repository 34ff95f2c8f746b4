//! Broker instances of the drill's own, on ports of their own, for the
//! scenarios that restart the broker (the machine's services are never
//! stopped): `nats-server -js` with its own store directory, tansu on a
//! PostgreSQL database of its own (created, given tansu's schema, dropped at
//! the end), and a second RabbitMQ node (its own node name, ports, Mnesia and
//! log directories, no plugins).
//!
//! Each is restarted on the same port with the same storage, so what the
//! broker had stored survives; only the processes this module started are
//! ever signalled, by pid.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::BrokerKind;
use crate::procs::{Proc, Registry, free_port, wait_listening};

/// Where the broker binaries and PostgreSQL are.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `nats-server`.
    pub nats_server: PathBuf,
    /// `tansu`.
    pub tansu: PathBuf,
    /// RabbitMQ's start script (`/usr/lib/rabbitmq/bin/rabbitmq-server`, run
    /// directly so the node is this process's descendant, not `su`'s).
    pub rabbitmq_server: PathBuf,
    /// `psql`.
    pub psql: PathBuf,
    /// The PostgreSQL server for tansu (`postgres://postgres@localhost`).
    pub pg_url: String,
    /// tansu's PostgreSQL schema (`etc/initdb.d/010-schema.sql` of the tansu
    /// release in use); tansu 0.6 does not create its tables itself.
    pub tansu_schema: Option<PathBuf>,
}

/// Finds a program: `env` if set, else the first of `candidates` that exists, else on `PATH`.
pub fn find_program(env: &str, candidates: &[&str], name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env)
        && !p.is_empty()
    {
        return PathBuf::from(p);
    }
    for c in candidates {
        let c = shellexpand_home(c);
        if c.is_file() {
            return c;
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from(name)
}

fn shellexpand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

impl Tools {
    /// From the environment (`NATS_SERVER_BIN`, `TANSU_BIN`,
    /// `RABBITMQ_SERVER_BIN`, `PSQL_BIN`, `DRILL_PG_URL`, `TANSU_PG_SCHEMA`)
    /// and the usual places.
    pub fn from_env() -> Self {
        let tansu_schema = match std::env::var("TANSU_PG_SCHEMA") {
            Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => {
                let p = shellexpand_home("~/.cache/elevate/tansu-0.6.0-pg-schema.sql");
                p.is_file().then_some(p)
            }
        };
        Tools {
            nats_server: find_program(
                "NATS_SERVER_BIN",
                &["/usr/sbin/nats-server", "/usr/local/bin/nats-server"],
                "nats-server",
            ),
            tansu: find_program("TANSU_BIN", &["~/.cargo/bin/tansu"], "tansu"),
            rabbitmq_server: find_program(
                "RABBITMQ_SERVER_BIN",
                &["/usr/lib/rabbitmq/bin/rabbitmq-server"],
                "rabbitmq-server",
            ),
            psql: find_program("PSQL_BIN", &["/usr/bin/psql"], "psql"),
            pg_url: std::env::var("DRILL_PG_URL")
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "postgres://postgres@localhost".into()),
            tansu_schema,
        }
    }
}

/// A broker instance the drill started.
#[derive(Debug)]
pub struct OwnBroker {
    kind: BrokerKind,
    port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
    registry: Registry,
    tools: Tools,
    /// tansu: the database; RabbitMQ: the node name and distribution port.
    db: Option<String>,
    node: Option<(String, u16)>,
    starts: u32,
}

impl OwnBroker {
    /// Starts a fresh instance of `kind` with its storage under `dir`.
    pub async fn start(
        kind: BrokerKind,
        dir: &Path,
        tools: &Tools,
        registry: &Registry,
    ) -> Result<OwnBroker, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let mut own = OwnBroker {
            kind,
            port,
            dir: dir.to_path_buf(),
            proc: None,
            registry: registry.clone(),
            tools: tools.clone(),
            db: None,
            node: None,
            starts: 0,
        };
        match kind {
            BrokerKind::Kafka => own.create_database()?,
            BrokerKind::Amqp => {
                let dist = free_port().map_err(|e| format!("no free port: {e}"))?;
                own.node = Some((format!("elevate-drill-{port}@localhost"), dist));
                own.write_rabbit_files()?;
            }
            BrokerKind::Nats => {}
        }
        own.start_again().await?;
        Ok(own)
    }

    /// The address clients use.
    pub fn url(&self) -> String {
        match self.kind {
            BrokerKind::Kafka => format!("127.0.0.1:{}", self.port),
            BrokerKind::Amqp => format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port),
            BrokerKind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// The broker's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Stops the broker: `kill -9` (`hard`, with every process under it) or
    /// SIGTERM and up to 60 s for a clean shutdown.
    pub async fn stop(&mut self, hard: bool) -> Result<(), String> {
        let Some(mut p) = self.proc.take() else {
            return Ok(());
        };
        if hard {
            p.kill_hard();
            return Ok(());
        }
        if p.stop(Duration::from_secs(60)).await {
            Ok(())
        } else {
            Err(format!(
                "{} did not stop within 60 s of SIGTERM (killed)",
                p.name()
            ))
        }
    }

    /// Starts the broker (again) on its port with its storage; returns how
    /// long it took to listen.
    pub async fn start_again(&mut self) -> Result<Duration, String> {
        self.starts += 1;
        let log = self.dir.join(format!("broker-{}.log", self.starts));
        let addr = format!("127.0.0.1:{}", self.port);
        let (cmd, name) = self.command()?;
        let mut proc = Proc::spawn(cmd, name, &log, &self.registry).map_err(|e| e.to_string())?;
        let timeout = match self.kind {
            BrokerKind::Amqp => Duration::from_secs(120),
            _ => Duration::from_secs(30),
        };
        // RabbitMQ's node (beam.smp) runs under its start script: its pid is
        // recorded too, for scripts/drills' exit trap.
        let record = (self.kind == BrokerKind::Amqp).then_some((&self.registry, "beam.smp"));
        let took = wait_listening(&addr, &mut proc, timeout, record).await;
        self.proc = Some(proc);
        took
    }

    fn command(&self) -> Result<(Command, &'static str), String> {
        match self.kind {
            BrokerKind::Nats => {
                let mut c = Command::new(&self.tools.nats_server);
                c.arg("-js")
                    .arg("-a")
                    .arg("127.0.0.1")
                    .arg("-p")
                    .arg(self.port.to_string())
                    .arg("-sd")
                    .arg(self.dir.join("jetstream"));
                Ok((c, "nats-server"))
            }
            BrokerKind::Kafka => {
                let db = self.db.as_deref().ok_or("no database for tansu")?;
                let listener = format!("tcp://127.0.0.1:{}", self.port);
                let mut c = Command::new(&self.tools.tansu);
                c.arg("broker")
                    .arg("--listener-url")
                    .arg(&listener)
                    .arg("--advertised-listener-url")
                    .arg(&listener)
                    .arg("--storage-engine")
                    .arg(format!("{}/{db}", self.tools.pg_url.trim_end_matches('/')))
                    .env("RUST_LOG", "warn");
                Ok((c, "tansu"))
            }
            BrokerKind::Amqp => {
                let (node, dist) = self.node.as_ref().ok_or("no RabbitMQ node name")?;
                let d = &self.dir;
                let mut c = Command::new(&self.tools.rabbitmq_server);
                c.env("RABBITMQ_NODENAME", node)
                    .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                    .env("RABBITMQ_NODE_PORT", self.port.to_string())
                    .env("RABBITMQ_DIST_PORT", dist.to_string())
                    .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
                    .env("RABBITMQ_LOG_BASE", d.join("log"))
                    .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
                    .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
                    .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
                    .env("ERL_EPMD_ADDRESS", "127.0.0.1")
                    .env("HOME", d.join("home"));
                Ok((c, "rabbitmq-server"))
            }
        }
    }

    fn write_rabbit_files(&self) -> Result<(), String> {
        let d = &self.dir;
        let w = |name: &str, text: String| {
            std::fs::write(d.join(name), text).map_err(|e| format!("{name}: {e}"))
        };
        std::fs::create_dir_all(d.join("home")).map_err(|e| e.to_string())?;
        w(
            "rabbitmq.conf",
            format!("listeners.tcp.local = 127.0.0.1:{}\n", self.port),
        )?;
        // No environment file (the machine's names its own node); no plugins.
        w("rabbitmq-env.conf", String::new())?;
        w("enabled_plugins", "[].\n".into())
    }

    fn psql(&self, db: &str, args: &[&str]) -> Result<(), String> {
        let url = format!("{}/{db}", self.tools.pg_url.trim_end_matches('/'));
        let out = Command::new(&self.tools.psql)
            .arg(&url)
            .args(["-q", "-v", "ON_ERROR_STOP=1"])
            .args(args)
            .output()
            .map_err(|e| format!("cannot run psql ({}): {e}", self.tools.psql.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "psql {url} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn create_database(&mut self) -> Result<(), String> {
        let schema = self.tools.tansu_schema.clone().ok_or_else(|| {
            "tansu on PostgreSQL needs its schema, which tansu 0.6 neither creates nor ships in \
             its crate: put tansu v0.6.0's etc/initdb.d/010-schema.sql at \
             ~/.cache/elevate/tansu-0.6.0-pg-schema.sql or name it in TANSU_PG_SCHEMA"
                .to_string()
        })?;
        let db = format!("elevate_drill_{}_{}", std::process::id(), self.port);
        self.psql("postgres", &["-c", &format!("create database {db}")])?;
        self.registry.record_database(&db);
        self.db = Some(db.clone());
        let schema = schema.display().to_string();
        self.psql(&db, &["-f", &schema])
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill_hard();
        }
        if let Some(db) = self.db.take() {
            let _ = self.psql(
                "postgres",
                &["-c", &format!("drop database if exists {db} with (force)")],
            );
        }
    }
}
