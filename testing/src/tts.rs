//! Process-level helpers for the Transaction Token Service tests: generate
//! workloads, write a TOML configuration with fresh keys, start the TTS binary
//! on a loopback port, kill it and start it again on the same port.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use elevate_core::ctxref::ContextRefMinter;
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_tts::admin::sign_admin_assertion;
use elevate_tts::{
    AdminConfig, OperatorConfig, ServiceConfig, StoreConfig, TestIssuer, WorkloadConfig,
};
use txn_token_client::{TtsClient, TtsClientConfig};

/// Trust domain of the process-level TTS tests.
pub const TTS_TRUST_DOMAIN: &str = "tts.test.example";

/// A workload identity with its key and the scopes the registry allows it.
#[derive(Debug, Clone)]
pub struct TestWorkload {
    /// Workload id (`spiffe://…`).
    pub id: String,
    /// Its signing key (client assertions and context references).
    pub key: SigningKey,
    /// Scopes the TTS may grant it.
    pub allowed_scopes: Vec<String>,
}

impl TestWorkload {
    /// A workload `spiffe://{trust domain}/{name}` with a fresh ES256 key.
    pub fn generate(name: &str, allowed_scopes: &[&str]) -> Self {
        let key = SigningKey::generate(
            SigningAlg::ES256,
            format!("{name}-{}", uuid::Uuid::new_v4()),
        )
        .unwrap_or_else(|e| panic!("key generation: {e}"));
        TestWorkload {
            id: format!("spiffe://{TTS_TRUST_DOMAIN}/{name}"),
            key,
            allowed_scopes: allowed_scopes.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A context-reference minter signing as this workload.
    pub fn minter(&self, ttl: Duration) -> ContextRefMinter {
        ContextRefMinter::new(&self.id, self.key.clone(), ttl)
    }

    /// Its registry entry.
    pub fn config(&self) -> WorkloadConfig {
        WorkloadConfig {
            id: self.id.clone(),
            public_jwk: serde_json::to_value(self.key.public_jwk()).ok(),
            jwk_file: None,
            allowed_scopes: self.allowed_scopes.clone(),
        }
    }
}

/// A configuration directory: TOML file plus the service's signing key PEM.
#[derive(Debug)]
pub struct TtsConfigDir {
    /// The temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// Path of `tts.toml`.
    pub path: PathBuf,
    /// The configuration written.
    pub config: ServiceConfig,
}

/// Writes `tts.toml` for these workloads (admin endpoints on, fresh signing
/// key stored as a PEM file so a restarted process signs with the same key).
pub fn write_config(workloads: &[&TestWorkload], users: Option<&TestIssuer>) -> TtsConfigDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let key = SigningKey::generate(SigningAlg::ES256, "unused")
        .unwrap_or_else(|e| panic!("key generation: {e}"));
    let pem_path = dir.path().join("tts-signing.pem");
    std::fs::write(&pem_path, key.to_pkcs8_pem()).unwrap_or_else(|e| panic!("write key: {e}"));
    let mut config = ServiceConfig::new(TTS_TRUST_DOMAIN);
    config.listen = "127.0.0.1:0".into();
    config.signing_key_pem = Some(PathBuf::from("tts-signing.pem"));
    config.admin_endpoints = true;
    config.workloads = workloads.iter().map(|w| w.config()).collect();
    config.user_issuer = users.map(TestIssuer::config);
    let path = dir.path().join("tts.toml");
    let text = config.to_toml().unwrap_or_else(|e| panic!("config: {e}"));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write config: {e}"));
    TtsConfigDir { dir, path, config }
}

/// The TTS binary running as a child process.
#[derive(Debug)]
pub struct TtsProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl TtsProcess {
    /// Starts `bin --config config [--listen listen]` and waits for its
    /// `listening on http://ADDR` line (stderr goes to `tts.log` beside the config).
    ///
    /// # Errors
    ///
    /// Returns an I/O error if the log file cannot be opened or `bin` cannot be started, or if the
    /// process does not print `listening on http://ADDR` as its first line within 30 s (the error
    /// then carries the log).
    pub fn spawn(bin: &Path, config: &Path, listen: Option<SocketAddr>) -> std::io::Result<Self> {
        Self::spawn_logging(bin, config, listen, "info")
    }

    /// As [`spawn`](Self::spawn), with `RUST_LOG` = `rust_log` (`info` logs
    /// a line per issuance; the benchmark runs replicas at `warn`, as it runs
    /// its in-process TTS).
    ///
    /// # Errors
    ///
    /// The errors of [`spawn`](Self::spawn).
    pub fn spawn_logging(
        bin: &Path,
        config: &Path,
        listen: Option<SocketAddr>,
        rust_log: &str,
    ) -> std::io::Result<Self> {
        Self::spawn_with_args(bin, config, listen, rust_log, &[])
    }

    /// As [`spawn_logging`](Self::spawn_logging), with more command-line
    /// arguments after `--config` (e.g. `["--signing-alg", "EdDSA"]`: tests
    /// of the command line's overrides).
    ///
    /// # Errors
    ///
    /// The errors of [`spawn`](Self::spawn).
    pub fn spawn_with_args(
        bin: &Path,
        config: &Path,
        listen: Option<SocketAddr>,
        rust_log: &str,
        args: &[&str],
    ) -> std::io::Result<Self> {
        // `tts.toml` logs to `tts.log`; each fleet replica's `NAME.toml` to `NAME.log`.
        let stem = config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tts".into());
        let log = config.with_file_name(format!("{stem}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        if let Some(l) = listen {
            cmd.arg("--listen").arg(l.to_string());
        }
        cmd.args(args);
        let mut child = cmd.spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {}
        });
        let first = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "TTS did not report its address; log:\n{log_text}"
                )));
            }
        };
        let addr = first
            .strip_prefix("listening on http://")
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("unexpected first line {first:?}")))?;
        Ok(TtsProcess { child, addr, log })
    }

    /// Starts it again on the same address (retrying while the port is released).
    ///
    /// # Errors
    ///
    /// Returns the last error of [`spawn`](Self::spawn) if it fails 50 times (about 5 s).
    pub fn respawn(bin: &Path, config: &Path, addr: SocketAddr) -> std::io::Result<Self> {
        let mut last = None;
        for _ in 0..50 {
            match Self::spawn(bin, config, Some(addr)) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("respawn failed")))
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token endpoint URL.
    pub fn token_endpoint(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The JWKS URL.
    pub fn jwks_url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    /// `http://ADDR`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin API base (`aud` of admin assertions).
    pub fn admin_base(&self) -> String {
        format!("http://{}/admin", self.addr)
    }

    /// The key-rotation admin URL.
    pub fn rotate_url(&self) -> String {
        format!("http://{}/admin/rotate-keys", self.addr)
    }

    /// Its `/metrics` page (Prometheus text; empty when it does not answer).
    pub async fn metrics(&self, http: &reqwest::Client) -> String {
        match http
            .get(format!("{}/metrics", self.base_url()))
            .send()
            .await
        {
            Ok(resp) => resp.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The sum of its `/metrics` samples whose line starts with `prefix`
    /// (e.g. `tts_exchanges_total{outcome="issued"`: the tokens it issued).
    pub async fn metric(&self, http: &reqwest::Client, prefix: &str) -> u64 {
        self.metrics(http)
            .await
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks the process to stop (SIGTERM: it finishes in-flight requests) and
    /// waits up to `timeout` for it to exit; true when it did.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TtsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client configuration for `workload` against `tts` with test-friendly timings.
pub fn client_config(tts: &TtsProcess, workload: &TestWorkload) -> TtsClientConfig {
    let mut cfg = TtsClientConfig::new(tts.token_endpoint(), TTS_TRUST_DOMAIN, &workload.id);
    cfg.request_timeout = Duration::from_secs(2);
    cfg
}

/// A client for `workload` against `tts`.
pub fn client(tts: &TtsProcess, workload: &TestWorkload) -> TtsClient {
    TtsClient::new(client_config(tts, workload), workload.key.clone())
        .unwrap_or_else(|e| panic!("TTS client: {e}"))
}

/// An operator of the admin API: its id and signing key.
#[derive(Debug, Clone)]
pub struct TestOperator {
    /// Operator id.
    pub id: String,
    /// Its signing key.
    pub key: SigningKey,
}

impl TestOperator {
    /// An operator `ops:{name}` with a fresh ES256 key.
    pub fn generate(name: &str) -> Self {
        let key = SigningKey::generate(
            SigningAlg::ES256,
            format!("op-{name}-{}", uuid::Uuid::new_v4().simple()),
        )
        .unwrap_or_else(|e| panic!("key generation: {e}"));
        TestOperator {
            id: format!("ops:{name}"),
            key,
        }
    }

    /// Its `[admin] operators` entry.
    pub fn config(&self) -> OperatorConfig {
        OperatorConfig {
            id: self.id.clone(),
            public_jwk: serde_json::to_value(self.key.public_jwk()).ok(),
            jwk_file: None,
        }
    }

    /// An admin assertion for `method path` with `body` at `tts`.
    pub fn assertion(&self, tts: &TtsProcess, method: &str, path: &str, body: &[u8]) -> String {
        sign_admin_assertion(
            &self.key,
            &self.id,
            &tts.admin_base(),
            method,
            path,
            body,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("admin assertion: {e}"))
    }

    /// Sends an authenticated admin call; returns the status and the JSON body.
    pub async fn call(
        &self,
        http: &reqwest::Client,
        tts: &TtsProcess,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let token = self.assertion(tts, method, path, &bytes);
        let url = format!("{}{path}", tts.base_url());
        let req = match method {
            "GET" => http.get(url),
            _ => http
                .post(url)
                .header("content-type", "application/json")
                .body(bytes),
        };
        let resp = req
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("admin call {method} {path}: {e}"));
        let status = resp.status().as_u16();
        let json = resp.json().await.unwrap_or(serde_json::Value::Null);
        (status, json)
    }
}

/// A PostgreSQL schema of its own for one fleet test (dropped on drop).
#[derive(Debug)]
pub struct FleetStore {
    /// Connection string (`ELEVATE_TEST_POSTGRES`, default the local server, database `test`).
    pub url: String,
    /// The schema.
    pub schema: String,
}

impl FleetStore {
    /// A fresh schema name on the local PostgreSQL; panics with how to start
    /// it when it is not reachable.
    pub fn new() -> Self {
        Self::try_new().unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`new`](Self::new), returning the message instead of panicking.
    ///
    /// # Errors
    ///
    /// Says how to start PostgreSQL when nothing listens on 127.0.0.1:5432
    /// (and `ELEVATE_TEST_POSTGRES` names no other server).
    pub fn try_new() -> Result<Self, String> {
        let url = std::env::var("ELEVATE_TEST_POSTGRES")
            .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
        let reachable = std::net::TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 5432)),
            Duration::from_secs(2),
        )
        .is_ok();
        if !reachable && std::env::var("ELEVATE_TEST_POSTGRES").is_err() {
            return Err(
                "PostgreSQL is not reachable on 127.0.0.1:5432; start it with scripts/services-up \
                 (or set ELEVATE_TEST_POSTGRES to a connection string)"
                    .into(),
            );
        }
        Ok(FleetStore {
            url,
            schema: format!(
                "tts_fleet_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..16]
            ),
        })
    }

    /// Its `[store]` table for a replica named `replica`.
    pub fn config(&self, replica: &str) -> StoreConfig {
        let mut st = StoreConfig::new(&self.url);
        st.schema = self.schema.clone();
        st.replica = Some(replica.to_string());
        st
    }
}

impl Default for FleetStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FleetStore {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(elevate_tts::store::postgres::PgStore::drop_schema(
                    &url, &schema,
                ));
            }
        })
        .join();
    }
}

/// Writes one configuration per replica (`NAME.toml`, same directory, same
/// signing key PEM, same store, `[admin]` with `operators`); `tune` adjusts
/// each before it is written. Returns the directory and the paths, in order.
pub fn write_fleet_config(
    workloads: &[&TestWorkload],
    store: &FleetStore,
    operators: &[&TestOperator],
    replicas: &[&str],
    tune: impl Fn(&mut ServiceConfig),
) -> (TtsConfigDir, Vec<PathBuf>) {
    let base = write_config(workloads, None);
    let mut paths = Vec::new();
    for name in replicas {
        let mut cfg = base.config.clone();
        cfg.admin_endpoints = false;
        cfg.store = Some(store.config(name));
        cfg.admin = Some(AdminConfig {
            operators: operators.iter().map(|o| o.config()).collect(),
            max_assertion_secs: 60,
        });
        tune(&mut cfg);
        let path = base.dir.path().join(format!("{name}.toml"));
        let text = cfg.to_toml().unwrap_or_else(|e| panic!("config: {e}"));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write config: {e}"));
        paths.push(path);
    }
    (base, paths)
}
