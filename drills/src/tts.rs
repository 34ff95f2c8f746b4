//! The Transaction Token Service as a separate process: the workspace's
//! `txn-token-service` binary with a TOML configuration, a signing key kept
//! in a PEM file (so a restarted service signs with the same key), started on
//! an ephemeral loopback port and restarted on the same port.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_tts::{ServiceConfig, WorkloadConfig};

use crate::procs::{Proc, Registry};

/// Writes `tts.toml` and `tts-signing.pem` into `dir`, registering each
/// `(workload id, key, allowed scopes)`.
pub fn write_config(
    dir: &Path,
    workloads: &[(&str, &SigningKey, &str)],
) -> Result<PathBuf, String> {
    let key = SigningKey::generate(SigningAlg::ES256, "tts")
        .map_err(|e| format!("TTS key generation: {e}"))?;
    std::fs::write(dir.join("tts-signing.pem"), key.to_pkcs8_pem())
        .map_err(|e| format!("write the TTS key: {e}"))?;
    let mut config = ServiceConfig::new(crate::TRUST_DOMAIN);
    config.listen = "127.0.0.1:0".into();
    config.signing_key_pem = Some(PathBuf::from("tts-signing.pem"));
    config.workloads = workloads
        .iter()
        .map(|(id, key, scopes)| WorkloadConfig {
            id: id.to_string(),
            public_jwk: serde_json::to_value(key.public_jwk()).ok(),
            jwk_file: None,
            allowed_scopes: scopes.split_whitespace().map(str::to_string).collect(),
        })
        .collect();
    let path = dir.join("tts.toml");
    let text = config.to_toml().map_err(|e| format!("TTS config: {e}"))?;
    std::fs::write(&path, text).map_err(|e| format!("write the TTS config: {e}"))?;
    Ok(path)
}

/// The TTS process (at most one at a time) and the address it keeps.
#[derive(Debug)]
pub struct Tts {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    proc: Option<Proc>,
    registry: Registry,
}

impl Tts {
    /// Starts the service on an ephemeral loopback port (log: `tts.log` beside the config).
    pub async fn start(bin: &Path, config: &Path, registry: &Registry) -> Result<Tts, String> {
        let log = config.with_file_name("tts.log");
        let (proc, addr) = spawn(bin, config, &log, None, registry).await?;
        Ok(Tts {
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            log,
            addr,
            proc: Some(proc),
            registry: registry.clone(),
        })
    }

    /// The token endpoint URL (the same across restarts).
    pub fn token_endpoint(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The pid of the running service.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill_hard();
        }
    }

    /// Sends a signal (SIGSTOP, SIGCONT) to the running service.
    pub fn signal(&self, signal: libc::c_int) -> Result<(), String> {
        match &self.proc {
            Some(p) => p.signal(signal).map_err(|e| format!("signal the TTS: {e}")),
            None => Err("the TTS is not running".into()),
        }
    }

    /// Starts the service again on the same address (retrying while the port
    /// is still held).
    pub async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let mut last = String::new();
        for _ in 0..50 {
            match spawn(
                &self.bin,
                &self.config,
                &self.log,
                Some(self.addr),
                &self.registry,
            )
            .await
            {
                Ok((p, _)) => {
                    self.proc = Some(p);
                    return Ok(());
                }
                Err(e) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(format!(
            "the TTS did not start again on {}: {last}",
            self.addr
        ))
    }

    /// Whether the process has exited on its own.
    pub fn died(&mut self) -> Option<String> {
        let p = self.proc.as_mut()?;
        p.exited()
            .map(|s| format!("the TTS exited ({s}); its log ends:\n{}", p.log_tail(10)))
    }
}

async fn spawn(
    bin: &Path,
    config: &Path,
    log: &Path,
    listen: Option<SocketAddr>,
    registry: &Registry,
) -> Result<(Proc, SocketAddr), String> {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("TTS log {}: {e}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err));
    if let Some(l) = listen {
        cmd.arg("--listen").arg(l.to_string());
    }
    let mut proc = Proc::spawn_with_stdio(cmd, "txn-token-service", log, registry)
        .map_err(|e| e.to_string())?;
    let stdout = proc
        .child_mut()
        .stdout
        .take()
        .ok_or("the TTS has no stdout")?;
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        for _ in lines {}
    });
    let first = match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(line)) => line,
        _ => {
            let tail = proc.log_tail(10);
            proc.kill_hard();
            return Err(format!(
                "the TTS did not report its address; its log ends:\n{tail}"
            ));
        }
    };
    let addr = first
        .strip_prefix("listening on http://")
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| format!("unexpected first line from the TTS: {first:?}"))?;
    Ok((proc, addr))
}
