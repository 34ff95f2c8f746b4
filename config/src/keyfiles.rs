//! The workload's signing keys, read from PEM files and re-read when the
//! files change (the pattern of spiffe-helper and cert-manager, which write
//! key files and rotate them in place). Several keys may be present during
//! a rollover; the file written last signs. A file that cannot be read or
//! parsed is logged with its name and the keys in force stay in force.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use elevate_core::keys::{CurrentKey, SigningAlg, SigningKey};

/// One key as read from its file.
#[derive(Debug, Clone)]
pub struct KeyFile {
    /// The file.
    pub path: PathBuf,
    /// Its modification time (the newest signs).
    pub modified: SystemTime,
    /// The key; its `kid` is the file name without extension.
    pub key: SigningKey,
}

/// Where the keys are read from.
#[derive(Debug, Clone)]
pub struct KeySources {
    /// Named files.
    pub files: Vec<PathBuf>,
    /// A directory of `*.pem` files.
    pub dir: Option<PathBuf>,
    /// Their algorithm.
    pub alg: SigningAlg,
}

/// Why keys could not be read: the file and what is wrong with it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct KeyFileError {
    /// The file (or directory).
    pub path: String,
    /// What is wrong.
    pub problem: String,
}

impl KeySources {
    /// Every key file, in a stable order.
    fn paths(&self) -> Result<Vec<PathBuf>, KeyFileError> {
        let mut out = self.files.clone();
        if let Some(dir) = &self.dir {
            let entries = std::fs::read_dir(dir).map_err(|e| KeyFileError {
                path: dir.display().to_string(),
                problem: format!("cannot list the key directory: {e}"),
            })?;
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().and_then(|x| x.to_str()) == Some("pem") {
                    out.push(p);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Reads every key. At least one must be there.
    ///
    /// # Errors
    /// A file that cannot be read, holds no PKCS#8 key of the algorithm, or
    /// no key at all.
    pub fn read(&self) -> Result<Vec<KeyFile>, KeyFileError> {
        let mut keys = Vec::new();
        for path in self.paths()? {
            keys.push(read_one(&path, self.alg)?);
        }
        if keys.is_empty() {
            return Err(KeyFileError {
                path: self
                    .dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_else(|| "keys".into()),
                problem: "no key file (*.pem) found".into(),
            });
        }
        Ok(keys)
    }

    /// A fingerprint that changes when any key file is added, removed or rewritten.
    fn fingerprint(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        self.paths()
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok();
                let modified = meta.as_ref().and_then(|m| m.modified().ok());
                let len = meta.map(|m| m.len()).unwrap_or(0);
                (p, modified, len)
            })
            .collect()
    }
}

fn read_one(path: &Path, alg: SigningAlg) -> Result<KeyFile, KeyFileError> {
    let err = |problem: String| KeyFileError {
        path: path.display().to_string(),
        problem,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let kid = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err("the file name gives no key id".into()))?;
    let key = SigningKey::from_pkcs8_pem(alg, kid, &pem).map_err(|e| err(e.to_string()))?;
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(KeyFile {
        path: path.to_path_buf(),
        modified,
        key,
    })
}

/// The key that signs among `keys`: the newest file (ties: the last by name).
pub fn signing(keys: &[KeyFile]) -> Option<&KeyFile> {
    keys.iter()
        .max_by(|a, b| a.modified.cmp(&b.modified).then(a.path.cmp(&b.path)))
}

/// Re-reads `sources` every `every` and, when a file changed and every key
/// still reads, makes the newest key the one `current` signs with. Ends
/// when the runtime does.
pub fn spawn_reloader(
    sources: KeySources,
    current: CurrentKey,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = sources.fingerprint();
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = sources.fingerprint();
            if now == seen {
                continue;
            }
            match sources.read() {
                Ok(keys) => {
                    seen = now;
                    if let Some(k) = signing(&keys) {
                        let before = current.get().kid().to_string();
                        if before != k.key.kid() {
                            tracing::info!(from = %before, to = %k.key.kid(), file = %k.path.display(), "signing key rotated");
                        }
                        current.set(k.key.clone());
                    }
                }
                Err(e) => {
                    // Written half-way, or broken: keep signing with the key in
                    // force and look again on the next tick.
                    tracing::error!(error = %e, "signing keys not reloaded; the key in force stays");
                }
            }
        }
    })
}
