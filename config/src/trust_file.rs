//! A trusted-producer JWKS file (`trust.jwks_file`), re-read when it
//! changes. A file that does not parse is logged with its name and the keys
//! in force stay in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use elevate_core::keys::KeySet;

/// Re-reads `path` every `every`; a changed, valid file replaces `keys`.
pub(crate) fn spawn_reloader(
    path: PathBuf,
    producers: Option<Vec<String>>,
    keys: Arc<ArcSwap<KeySet>>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = std::fs::read(&path).ok();
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = std::fs::read(&path).ok();
            if now == seen {
                continue;
            }
            let Some(bytes) = &now else {
                tracing::error!(file = %path.display(), "trusted producer file unreadable; the keys in force stay");
                continue;
            };
            match std::str::from_utf8(bytes)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    crate::build::parse_jwks(t, producers.as_deref()).map_err(|e| e.to_string())
                }) {
                Ok(set) => {
                    tracing::info!(file = %path.display(), keys = set.len(), "trusted producer keys reloaded");
                    keys.store(Arc::new(set));
                    seen = now;
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "trusted producer file not reloaded; the keys in force stay");
                }
            }
        }
    })
}
