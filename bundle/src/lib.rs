//! Signed policy bundles for Elevate's PDPs (ZTAuth*'s transferable,
//! versioned, immutable, resilient auth* models).
//!
//! - [`archive`]: the format — a `tar.gz` of the Cedar bundle files and a
//!   manifest (every file's SHA-256 and size, a revision, the creation
//!   time) signed as a JWS by a bundle-signing key. The version is the
//!   manifest's hash.
//! - [`source`]: where archives come from — a file, an HTTP(S) server
//!   polled with `If-None-Match`, or a NATS JetStream Object Store object.
//! - [`sync`]: activation — verify, refuse rollback and equivocation,
//!   validate, persist, swap atomically; offline start from the cache;
//!   `stale_after` warns and `expire_after` turns decisions into Retry.
//!
//! `elevate-bundle` (this crate's binary) builds, signs, verifies,
//! inspects and publishes bundles.

pub mod archive;
pub mod source;
pub mod sync;

pub use archive::{ArchiveError, Manifest, Opened};
pub use source::{BundleSource, Fetched, FileSource, HttpSource, ObjectStoreSource, SourceError};
pub use sync::{BundleStatus, BundleSync, ExpiringPdp, Polled, SyncConfig, SyncError};

/// The source named by `location`: `http://` / `https://` URL, a
/// `nats://host:port/<bucket>/<object>` Object Store object, or a path to
/// an archive file.
///
/// # Errors
/// A [`source::SourceError`] when the location is malformed or the NATS
/// server does not answer.
pub async fn source_for(
    location: &str,
    timeout: std::time::Duration,
) -> Result<std::sync::Arc<dyn BundleSource>, source::SourceError> {
    let bad = |problem: String| source::SourceError {
        source_name: location.to_string(),
        problem,
    };
    if location.starts_with("http://") || location.starts_with("https://") {
        return Ok(std::sync::Arc::new(HttpSource::new(location, timeout)?));
    }
    if let Some(rest) = location.strip_prefix("nats://") {
        let (server, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected nats://host:port/<bucket>/<object>".into()))?;
        let (bucket, object) = path
            .split_once('/')
            .filter(|(b, o)| !b.is_empty() && !o.is_empty())
            .ok_or_else(|| bad("expected nats://host:port/<bucket>/<object>".into()))?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(timeout)
            .connect(format!("nats://{server}"))
            .await
            .map_err(|e| bad(format!("NATS at {server}: {e}")))?;
        return Ok(std::sync::Arc::new(ObjectStoreSource::new(
            async_nats::jetstream::new(client),
            bucket,
            object,
        )));
    }
    Ok(std::sync::Arc::new(FileSource::new(location)))
}

/// The trusted bundle-signing keys of a JWKS file (public keys with `kid`
/// and `alg`; `elevate-config key public` writes one).
///
/// # Errors
/// A message naming the file when it cannot be read, is not a JWKS, or
/// holds no usable key.
pub fn signers_from_jwks_file(
    path: &std::path::Path,
) -> Result<elevate_core::keys::KeySet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&text).map_err(|e| format!("{}: not a JWKS: {e}", path.display()))?;
    let keys = elevate_core::keys::KeySet::from_jwks(&set)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if keys.is_empty() {
        return Err(format!("{}: no bundle-signing key", path.display()));
    }
    Ok(keys)
}
