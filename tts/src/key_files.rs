//! Workload key files and their reloading: how a producer's key is rotated
//! at the TTS without a restart. The operator writes the workload's new
//! public key into the file the configuration names (`jwk_file`, also
//! spelled `jwks_file`: one JWK, or a JWKS of several); a [`KeyFileWatcher`]
//! re-reads every such file every `key_reload_secs` and, when its content
//! changed, makes the workload's keys exactly the file's
//! ([`Issuer::replace_workload_keys`]). The key directory
//! (`/.well-known/workload-jwks`) shows the change at once.
//!
//! A file that cannot be read, does not parse, holds no key or a key the
//! registry refuses is logged with its path, once per distinct content, and
//! the workload keeps the keys it had: a broken file never removes trust and
//! never stops the service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use elevate_core::keys::sha256_hex;
use jsonwebtoken::jwk::Jwk;
use serde_json::Value;

use super::config::{ConfigError, ServiceConfig, resolve};
use super::issuer::Issuer;

/// The largest key file read (bytes).
pub const MAX_KEY_FILE: u64 = 1024 * 1024;

/// The public keys in a key file's JSON: one JWK object, or a JWKS
/// (`{"keys": [...]}`); at least one, none with private material (`d`).
///
/// # Errors
///
/// Returns a message saying what is wrong: not an object, an empty or
/// missing `keys` array, an entry that is not a JWK, or private key material.
pub fn jwks_from_value(doc: Value) -> Result<Vec<Jwk>, String> {
    let entries = match doc {
        Value::Object(mut obj) if obj.contains_key("keys") => match obj.remove("keys") {
            Some(Value::Array(keys)) => keys,
            _ => return Err("\"keys\" is not an array".into()),
        },
        obj @ Value::Object(_) => vec![obj],
        _ => return Err("neither a JWK nor a JWKS (not a JSON object)".into()),
    };
    if entries.is_empty() {
        return Err("no keys".into());
    }
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            if entry.get("d").is_some() {
                return Err(format!(
                    "key {i}: private key material (write the public key only)"
                ));
            }
            serde_json::from_value::<Jwk>(entry).map_err(|e| format!("key {i}: not a JWK: {e}"))
        })
        .collect()
}

/// Reads a workload key file (see [`jwks_from_value`]).
///
/// # Errors
///
/// Returns [`ConfigError::Io`] if the file cannot be read, and
/// [`ConfigError::Parse`] (naming the file) if it is larger than
/// [`MAX_KEY_FILE`], is not JSON, or [`jwks_from_value`] refuses it.
pub fn read_key_file(path: &Path) -> Result<Vec<Jwk>, ConfigError> {
    let bytes = read_bounded(path)?;
    parse_key_file(path, &bytes)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_KEY_FILE {
        return Err(ConfigError::Parse {
            path: path.display().to_string(),
            reason: format!("{len} bytes, more than {MAX_KEY_FILE}"),
        });
    }
    std::fs::read(path).map_err(io)
}

fn parse_key_file(path: &Path, bytes: &[u8]) -> Result<Vec<Jwk>, ConfigError> {
    let parse = |reason: String| ConfigError::Parse {
        path: path.display().to_string(),
        reason,
    };
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| parse(e.to_string()))?;
    jwks_from_value(doc).map_err(parse)
}

/// One watched file.
#[derive(Debug)]
struct Watched {
    workload: String,
    path: PathBuf,
    /// SHA-256 of the content last acted on (applied or refused), or of the
    /// read error last logged.
    last: Option<String>,
}

/// What one [`KeyFileWatcher::poll`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Workloads whose keys changed, with their `kid`s now.
    pub reloaded: Vec<(String, Vec<String>)>,
    /// Files that changed but were refused (path, why); their workloads kept their keys.
    pub failed: Vec<(PathBuf, String)>,
}

/// Re-reads workload key files and applies what changed (see the module docs).
#[derive(Debug)]
pub struct KeyFileWatcher {
    files: Vec<Watched>,
    interval: Duration,
}

impl KeyFileWatcher {
    /// A watcher with no files, polling every `interval`.
    pub fn new(interval: Duration) -> Self {
        KeyFileWatcher {
            files: Vec::new(),
            interval,
        }
    }

    /// Every workload key file of `cfg` (paths resolved against `base`),
    /// polled every `key_reload_secs`.
    pub fn from_config(cfg: &ServiceConfig, base: &Path) -> Self {
        let mut w = Self::new(Duration::from_secs(cfg.key_reload_secs));
        for wl in &cfg.workloads {
            if let Some(p) = &wl.jwk_file {
                w.watch(&wl.id, resolve(base, p));
            }
        }
        w
    }

    /// Watches `path` as the key file of workload `workload`.
    pub fn watch(&mut self, workload: &str, path: PathBuf) {
        self.files.push(Watched {
            workload: workload.to_string(),
            path,
            last: None,
        });
    }

    /// Number of files watched.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when no file is watched.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The polling interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Reads every watched file once and applies those whose content changed
    /// since the last poll (the first poll applies every file).
    pub fn poll(&mut self, issuer: &Issuer) -> ReloadReport {
        let mut report = ReloadReport::default();
        for f in &mut self.files {
            let bytes = match read_bounded(&f.path) {
                Ok(b) => b,
                Err(e) => {
                    let stamp = format!("error:{e}");
                    if f.last.as_deref() != Some(stamp.as_str()) {
                        tracing::error!(file = %f.path.display(), workload = %f.workload, error = %e,
                            "workload key file unreadable; keeping the workload's previous keys");
                        report.failed.push((f.path.clone(), e.to_string()));
                        f.last = Some(stamp);
                    }
                    continue;
                }
            };
            let stamp = sha256_hex(&bytes);
            if f.last.as_deref() == Some(stamp.as_str()) {
                continue;
            }
            f.last = Some(stamp);
            let before = issuer.workload_kids(&f.workload);
            let applied = parse_key_file(&f.path, &bytes)
                .map_err(|e| e.to_string())
                .and_then(|jwks| {
                    issuer
                        .replace_workload_keys(&f.workload, &jwks)
                        .map_err(|e| format!("{}: {e}", f.path.display()))
                });
            match applied {
                Ok(()) => {
                    let after = issuer.workload_kids(&f.workload);
                    if after != before {
                        tracing::info!(file = %f.path.display(), workload = %f.workload,
                            kids = ?after, previous = ?before, "workload keys reloaded");
                        report.reloaded.push((f.workload.clone(), after));
                    }
                }
                Err(e) => {
                    tracing::error!(file = %f.path.display(), workload = %f.workload, error = %e,
                        kids = ?before, "workload key file refused; keeping the workload's previous keys");
                    report.failed.push((f.path.clone(), e));
                }
            }
        }
        report
    }

    /// Polls in the background every [`interval`](Self::interval) until the
    /// returned task is aborted (nothing is spawned for no files or a zero
    /// interval: the task then ends at once). File reads run on the blocking
    /// pool.
    pub fn spawn(mut self, issuer: Arc<Issuer>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if self.files.is_empty() || self.interval.is_zero() {
                return;
            }
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let issuer = issuer.clone();
                match tokio::task::spawn_blocking(move || {
                    self.poll(&issuer);
                    self
                })
                .await
                {
                    Ok(w) => self = w,
                    Err(e) => {
                        // A panic in a poll is a bug; the keys stay as they are.
                        tracing::error!(error = %e, "workload key file watcher stopped");
                        return;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IssuerSettings;
    use elevate_core::keys::{SigningAlg, SigningKey};
    use elevate_core::scope::Scope;

    const A: &str = "spiffe://d/a";

    fn jwks(keys: &[&SigningKey]) -> String {
        serde_json::json!({ "keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() })
            .to_string()
    }

    #[test]
    fn key_file_shapes() {
        let k = SigningKey::generate(SigningAlg::ES256, "k").unwrap();
        let one = serde_json::to_value(k.public_jwk()).unwrap();
        assert_eq!(jwks_from_value(one.clone()).unwrap().len(), 1);
        let set = serde_json::json!({ "keys": [one.clone(), one.clone()] });
        assert_eq!(jwks_from_value(set).unwrap().len(), 2);
        assert!(jwks_from_value(serde_json::json!({"keys": []})).is_err());
        assert!(jwks_from_value(serde_json::json!({"keys": 1})).is_err());
        assert!(jwks_from_value(serde_json::json!([one.clone()])).is_err());
        let mut private = one;
        private["d"] = "AAAA".into();
        assert!(
            jwks_from_value(private)
                .unwrap_err()
                .contains("private key material")
        );
    }

    #[test]
    fn reload_applies_changes_and_keeps_keys_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jwks.json");
        let k1 = SigningKey::generate(SigningAlg::ES256, "a-1").unwrap();
        let k2 = SigningKey::generate(SigningAlg::EdDSA, "a-2").unwrap();
        let issuer = Issuer::generate(IssuerSettings::new("d")).unwrap();
        issuer
            .register_workload(A, k1.public_jwk(), &Scope::parse("x"))
            .unwrap();
        std::fs::write(&path, jwks(&[&k1])).unwrap();
        let mut w = KeyFileWatcher::new(Duration::from_secs(1));
        w.watch(A, path.clone());
        assert_eq!(w.poll(&issuer), ReloadReport::default(), "same keys");
        // rollover: both, then the new one only
        std::fs::write(&path, jwks(&[&k1, &k2])).unwrap();
        let r = w.poll(&issuer);
        assert_eq!(
            r.reloaded,
            [(A.to_string(), vec!["a-1".into(), "a-2".into()])]
        );
        assert_eq!(w.poll(&issuer), ReloadReport::default(), "unchanged");
        std::fs::write(&path, jwks(&[&k2])).unwrap();
        w.poll(&issuer);
        assert_eq!(issuer.workload_kids(A), ["a-2"]);
        // broken files: reported once each, keys kept
        for bad in [
            "{\"keys\": [",
            "{\"keys\": []}",
            "{\"kty\": \"RSA\", \"kid\": \"r\"}",
        ] {
            std::fs::write(&path, bad).unwrap();
            let r = w.poll(&issuer);
            assert_eq!(r.failed.len(), 1, "{bad}");
            assert!(r.failed[0].1.contains("a.jwks.json"), "{:?}", r.failed);
            assert_eq!(w.poll(&issuer), ReloadReport::default(), "logged once");
            assert_eq!(issuer.workload_kids(A), ["a-2"], "{bad}");
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(w.poll(&issuer).failed.len(), 1);
        assert_eq!(issuer.workload_kids(A), ["a-2"]);
        // fixed again
        std::fs::write(&path, jwks(&[&k1])).unwrap();
        assert_eq!(w.poll(&issuer).reloaded.len(), 1);
        assert_eq!(issuer.workload_kids(A), ["a-1"]);
    }
}
