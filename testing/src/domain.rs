//! A trust domain on disk, as an operator lays it out: the TTS's
//! configuration with one public key file per workload (re-read while it
//! runs), one directory of private PEM key files per workload, and one
//! `elevate.toml` per workload — the files `elevate_config::Workload` reads.
//! Tests of configuration, rotation and the broker wrappers share it.

use std::path::{Path, PathBuf};

use elevate_config::Workload;
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::producer::{PublishRequest, SubjectContext};
use elevate_core::scope::Scope;
use elevate_core::{
    Coordinates, GuardDecision, Headers, InboundMessage, OutboundMessage, Reason, SubjectKind,
};
use elevate_tts::{ServiceConfig, WorkloadConfig};

use crate::env::policy_dir;
use crate::tts::TtsProcess;

/// An ES256 key with this `kid` (panics: test setup).
pub fn key(kid: &str) -> SigningKey {
    SigningKey::generate(SigningAlg::ES256, kid).unwrap_or_else(|e| panic!("key: {e}"))
}

/// Writes a file the way an operator should: a complete document renamed
/// into place, so a watcher never reads half of it.
pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename {}: {e}", path.display()));
}

/// Writes the public keys the TTS registers for a workload (a JWKS file).
pub fn write_public_keys(path: &Path, keys: &[&SigningKey]) {
    let doc =
        serde_json::json!({ "keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() });
    write_atomically(path, doc.to_string().as_bytes());
}

/// A trust domain's files, and the TTS binary serving it when started.
#[derive(Debug)]
pub struct FileDomain {
    dir: tempfile::TempDir,
    trust_domain: String,
    service: Option<ServiceConfig>,
    tts: Option<TtsProcess>,
}

impl FileDomain {
    /// An empty domain directory (no TTS: its URL refuses connections).
    pub fn empty(trust_domain: &str) -> Self {
        FileDomain {
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
            trust_domain: trust_domain.to_string(),
            service: None,
            tts: None,
        }
    }

    /// Registers `workloads` (name, its keys; each may ask for `scopes`),
    /// writes their key files and starts the TTS binary `bin` on a loopback
    /// port, re-reading the key files every second.
    pub fn start(
        bin: &Path,
        trust_domain: &str,
        scopes: &[&str],
        workloads: &[(&str, &[&SigningKey])],
    ) -> Self {
        let mut d = Self::write(trust_domain, scopes, workloads);
        d.tts = Some(
            TtsProcess::spawn(bin, &d.tts_config_path(), None)
                .unwrap_or_else(|e| panic!("TTS: {e}")),
        );
        d
    }

    /// As [`FileDomain::start`], without starting the TTS: the files only
    /// (`tts.toml` listening on port 0, key files re-read every second).
    pub fn write(
        trust_domain: &str,
        scopes: &[&str],
        workloads: &[(&str, &[&SigningKey])],
    ) -> Self {
        let mut d = Self::empty(trust_domain);
        let mut config = ServiceConfig::new(trust_domain);
        config.listen = "127.0.0.1:0".into();
        config.key_reload_secs = 1;
        config.workloads = workloads
            .iter()
            .map(|(name, keys)| {
                let file = format!("{name}.jwks.json");
                write_public_keys(&d.path().join(&file), keys);
                for k in keys.iter() {
                    d.write_private_key(name, k);
                }
                WorkloadConfig {
                    id: d.workload_id(name),
                    public_jwk: None,
                    jwk_file: Some(PathBuf::from(file)),
                    allowed_scopes: scopes.iter().map(|s| s.to_string()).collect(),
                }
            })
            .collect();
        let text = config.to_toml().unwrap_or_else(|e| panic!("config: {e}"));
        std::fs::write(d.tts_config_path(), text).unwrap_or_else(|e| panic!("write config: {e}"));
        d.service = Some(config);
        d
    }

    /// The TTS's configuration file (`tts.toml`).
    pub fn tts_config_path(&self) -> PathBuf {
        self.path().join("tts.toml")
    }

    /// The TTS's configuration as written (`None` for [`FileDomain::empty`]).
    pub fn service_config(&self) -> Option<&ServiceConfig> {
        self.service.as_ref()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `spiffe://<trust domain>/<name>`.
    pub fn workload_id(&self, name: &str) -> String {
        format!("spiffe://{}/{name}", self.trust_domain)
    }

    /// The TTS's token endpoint (a closed port when it was not started).
    pub fn token_endpoint(&self) -> String {
        match &self.tts {
            Some(t) => t.token_endpoint(),
            None => "http://127.0.0.1:9/token".into(),
        }
    }

    /// The running TTS, if started.
    pub fn tts(&self) -> Option<&TtsProcess> {
        self.tts.as_ref()
    }

    /// The directory of workload `name`'s private key files.
    pub fn keys_dir(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// The TTS's public key file of workload `name`.
    pub fn public_keys_file(&self, name: &str) -> PathBuf {
        self.path().join(format!("{name}.jwks.json"))
    }

    /// Puts `key` in workload `name`'s key directory (`<kid>.pem`).
    pub fn write_private_key(&self, name: &str, key: &SigningKey) {
        let dir = self.keys_dir(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join(format!("{}.pem", key.kid())), key.to_pkcs8_pem())
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Writes `<name>.toml` for workload `name`: its key directory, the
    /// TTS (trust from its key directory, refetched at most every second),
    /// the example Cedar bundle, `destination` asking for `action`, and
    /// `extra` TOML appended.
    pub fn workload_config(
        &self,
        name: &str,
        destination: &str,
        action: &str,
        extra: &str,
    ) -> PathBuf {
        let text = format!(
            "workload = \"{}\"\n\n[keys]\ndir = \"{name}\"\nreload_secs = 1\n\n[tts]\nurl = \"{}\"\n\n[pdp]\ncedar_bundle = \"{}\"\nallow_unsigned = true\n\n[trust]\nmin_refresh_secs = 1\n\n[[actions]]\ndestination = \"{destination}\"\naction = \"{action}\"\n{extra}",
            self.workload_id(name),
            self.token_endpoint(),
            policy_dir().display(),
        );
        let path = self.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        path
    }
}

/// A message `producer` publishes for alice to `destination`, asking for
/// `action` for `consumer` (the `n`-th: its position and payload), as the
/// consumer reads it. A fresh transaction each time.
pub async fn message_for_alice(
    producer: &Workload,
    consumer: &Workload,
    destination: &str,
    action: &str,
    n: u64,
) -> InboundMessage {
    let subject = SubjectContext {
        subject: "alice".into(),
        sub_kind: SubjectKind::Human,
        txn: uuid::Uuid::now_v7().to_string(),
        scope: Scope::parse(action),
    };
    let audience = [consumer.id().to_string()];
    let req = PublishRequest {
        subject: &subject,
        action,
        audience: &audience,
        destination,
        scope: None,
    };
    let p = producer
        .producer()
        .prepare(
            &req,
            OutboundMessage {
                headers: Headers::new(),
                payload: format!("{{\"order\":{n}}}").into_bytes(),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("prepare: {e}"));
    InboundMessage::new(
        Coordinates::new("test", format!("{destination}/{n}")),
        destination,
        p.headers,
        p.payload,
    )
}

/// What `consumer` decides about [`message_for_alice`].
pub async fn decide_for_alice(
    producer: &Workload,
    consumer: &Workload,
    destination: &str,
    action: &str,
    n: u64,
) -> GuardDecision {
    let msg = message_for_alice(producer, consumer, destination, action, n).await;
    consumer.guard().decide(&msg, 1).await
}

/// The reason a decision refused with (`None` for a Permit).
pub fn refusal(d: &GuardDecision) -> Option<Reason> {
    match d {
        GuardDecision::Permit(_) => None,
        GuardDecision::Deny(r) | GuardDecision::Quarantine(r) | GuardDecision::Retry(r) => {
            Some(r.reason())
        }
        _ => panic!("a decision this test kit does not know: {d:?}"),
    }
}
