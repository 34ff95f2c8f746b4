//! Fault drills on the real brokers.
//!
//! Two binaries share this library:
//!
//! * `drill-worker` — one guarded consumer process for one broker (Kafka,
//!   RabbitMQ or NATS JetStream), always supervised, with the HTTP TTS client,
//!   the Cedar bundle watched on disk, the JSON Lines decision log and a
//!   handled log (one line per handled message, written before the handler
//!   returns, so a `kill -9` loses nothing already handled).
//! * `drill` — the orchestrator: keys, the TTS process, broker instances of
//!   its own where a scenario restarts the broker, destinations, 10,000
//!   messages through the guarded producer (80 % permitted, 20 % denied), one
//!   fault while a `drill-worker` drains them, and the count: produced /
//!   handled (distinct) / duplicates / dead-lettered by reason / lost /
//!   handled without a Permit.
//!
//! Every process the orchestrator starts is ended by pid when it is done
//! with it, when it fails, and when it is interrupted ([`procs`]).

pub mod brokers;
pub mod drill;
pub mod procs;
pub mod report;
pub mod tts;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use elevate_core::keys::KeySet;
use serde::{Deserialize, Serialize};

/// The trust domain of the example bundle (and of the drill's TTS).
pub const TRUST_DOMAIN: &str = "elevate.example";
/// The producing workload (registered in the example bundle, trust level 3).
pub const PRODUCER: &str = "spiffe://elevate.example/orders-api";
/// The consuming workload (the example bundle's `test-worker`).
pub const WORKER: &str = "spiffe://elevate.example/test-worker";
/// The action every drill message asks for.
pub const ACTION: &str = "test.process";

/// Users the example bundle permits `test.process` for.
pub const PERMITTED_USERS: [&str; 2] = ["alice", "carol"];
/// Users it denies: `bob` lacks the entitlement, `mallory` is suspended.
pub const DENIED_USERS: [&str; 2] = ["bob", "mallory"];

/// The user of message number `n`: eight in ten permitted (alice, carol
/// alternating), one bob, one mallory.
pub fn user_for(n: u64) -> &'static str {
    match n % 10 {
        8 => DENIED_USERS[0],
        9 => DENIED_USERS[1],
        k => PERMITTED_USERS[(k % 2) as usize],
    }
}

/// Whether the example bundle permits `user` to `test.process`.
pub fn is_permitted(user: &str) -> bool {
    PERMITTED_USERS.contains(&user)
}

/// The brokers a drill runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum BrokerKind {
    /// Kafka protocol (tansu).
    Kafka,
    /// RabbitMQ (AMQP 0-9-1).
    Amqp,
    /// NATS JetStream.
    Nats,
}

impl BrokerKind {
    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "kafka",
            BrokerKind::Amqp => "amqp",
            BrokerKind::Nats => "nats",
        }
    }
}

impl std::fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The payload of one drill message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Message id, unique per run (`m000042`).
    pub id: String,
    /// The user the message acts for.
    pub user: String,
}

impl Job {
    /// Message number `n` of a run.
    pub fn numbered(n: u64) -> Self {
        Job {
            id: format!("m{n:06}"),
            user: user_for(n).to_string(),
        }
    }

    /// The JSON payload.
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a payload back; `None` when it is not a drill job.
    pub fn from_payload(payload: &[u8]) -> Option<Self> {
        serde_json::from_slice(payload).ok()
    }
}

/// One line of the handled log: a message the handler ran for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandledLine {
    /// The message id from the payload.
    pub id: String,
    /// The decision that permitted the dispatch (`AuthContext::decision_id`).
    pub decision: String,
    /// The worker process that handled it.
    pub pid: u32,
    /// When, in milliseconds since the Unix epoch.
    pub t_ms: u64,
}

/// The handled log: JSON Lines, one `write` per line on an append-only file
/// (no user-space buffer), so a line written is in the kernel's hands and
/// survives a `kill -9` of the worker.
#[derive(Debug)]
pub struct HandledLog {
    file: Mutex<File>,
}

impl HandledLog {
    /// Opens (creating or appending to) the log.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(HandledLog {
            file: Mutex::new(file),
        })
    }

    /// Appends one line.
    pub fn append(&self, line: &HandledLine) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        let mut file = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("handled log lock poisoned"))?;
        file.write_all(&bytes)?;
        file.flush()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read the key file: {0}")]
    Io(String),
    /// It is neither a JWK nor a JWKS, or a key is unusable.
    #[error("unusable key file: {0}")]
    Invalid(String),
}

/// Reads a public JWK or a JWKS (`{"keys": [...]}`) from `path`; every key
/// is trusted for references signed by `owner` only.
pub fn load_trusted_keys(path: &Path, owner: &str) -> Result<KeySet, KeyFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KeyFileError::Io(format!("{}: {e}", path.display())))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| KeyFileError::Invalid(format!("{}: {e}", path.display())))?;
    let jwks: Vec<serde_json::Value> = match value.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.clone(),
        Some(_) => {
            return Err(KeyFileError::Invalid(format!(
                "{}: \"keys\" is not an array",
                path.display()
            )));
        }
        None => vec![value],
    };
    let mut set = KeySet::new();
    for v in jwks {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(v)
            .map_err(|e| KeyFileError::Invalid(format!("{}: {e}", path.display())))?;
        set.insert_jwk_owned(&jwk, Some(owner.to_string()))
            .map_err(|e| KeyFileError::Invalid(format!("{}: {e}", path.display())))?;
    }
    if set.is_empty() {
        return Err(KeyFileError::Invalid(format!(
            "{}: no key in the file",
            path.display()
        )));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_in_ten_permitted() {
        let permitted = (0..1000).filter(|n| is_permitted(user_for(*n))).count();
        assert_eq!(permitted, 800);
        let job = Job::numbered(42);
        assert_eq!(Job::from_payload(&job.to_payload()), Some(job));
        assert_eq!(Job::from_payload(b"not json"), None);
    }

    #[test]
    fn trusted_keys_from_jwk_and_jwks() {
        let key = elevate_core::keys::SigningKey::generate(
            elevate_core::keys::SigningAlg::ES256,
            "orders-api-1",
        )
        .expect("key generation");
        let dir = tempfile::tempdir().expect("tempdir");
        let one = dir.path().join("one.json");
        std::fs::write(&one, serde_json::to_vec(key.public_jwk()).expect("jwk")).expect("write");
        assert_eq!(load_trusted_keys(&one, PRODUCER).expect("jwk").len(), 1);
        let set = dir.path().join("set.json");
        let jwks = serde_json::json!({ "keys": [key.public_jwk()] });
        std::fs::write(&set, jwks.to_string()).expect("write");
        assert_eq!(load_trusted_keys(&set, PRODUCER).expect("jwks").len(), 1);
        std::fs::write(&set, "{\"keys\": []}").expect("write");
        assert!(load_trusted_keys(&set, PRODUCER).is_err());
    }
}
