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
use elevate_tts::{ServiceConfig, TestIssuer, WorkloadConfig};
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
        let log = config.with_file_name("tts.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        if let Some(l) = listen {
            cmd.arg("--listen").arg(l.to_string());
        }
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

    /// The key-rotation admin URL.
    pub fn rotate_url(&self) -> String {
        format!("http://{}/admin/rotate-keys", self.addr)
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
