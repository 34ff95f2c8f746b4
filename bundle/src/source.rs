//! Where signed bundle archives come from. Every source answers the same
//! question — "is there an archive newer than the one I have (`etag`)?" —
//! so the sync does not care whether it polls a file, an HTTP(S) server
//! (any static file server or object store, with `ETag` /
//! `If-None-Match`), or a NATS JetStream Object Store object (the broker the
//! workload already runs; its digest is the etag).

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::archive::MAX_ARCHIVE_BYTES;

/// What a poll found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The archive is the one already held (its etag matched).
    NotModified,
    /// An archive, with the etag that names it.
    Archive {
        /// The archive bytes (not yet verified).
        bytes: Vec<u8>,
        /// What names this archive at the source (an HTTP `ETag`, an
        /// object digest, a file hash).
        etag: Option<String>,
    },
}

/// A source could not be read (the PDP keeps deciding with the bundle in force).
#[derive(Debug, thiserror::Error)]
#[error("bundle source {source_name}: {problem}")]
pub struct SourceError {
    /// The source, as configured.
    pub source_name: String,
    /// What went wrong.
    pub problem: String,
}

/// A place signed bundle archives are fetched from.
#[async_trait::async_trait]
pub trait BundleSource: Send + Sync {
    /// The source as an operator configured it (for logs and errors).
    fn describe(&self) -> String;

    /// Fetches the archive unless it is still the one named `etag`.
    ///
    /// # Errors
    /// A [`SourceError`] when the source cannot be read.
    async fn fetch(&self, etag: Option<&str>) -> Result<Fetched, SourceError>;
}

fn error(source: &dyn BundleSource, problem: impl std::fmt::Display) -> SourceError {
    SourceError {
        source_name: source.describe(),
        problem: problem.to_string(),
    }
}

/// An archive file on disk (what an operator copies or a sidecar syncs).
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    /// The archive at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource { path: path.into() }
    }
}

#[async_trait::async_trait]
impl BundleSource for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    async fn fetch(&self, etag: Option<&str>) -> Result<Fetched, SourceError> {
        let meta = tokio::fs::metadata(&self.path)
            .await
            .map_err(|e| error(self, e))?;
        if meta.len() > MAX_ARCHIVE_BYTES as u64 {
            return Err(error(self, format!("{} bytes: too large", meta.len())));
        }
        let bytes = tokio::fs::read(&self.path)
            .await
            .map_err(|e| error(self, e))?;
        let tag = hex::encode(Sha256::digest(&bytes));
        if etag == Some(tag.as_str()) {
            return Ok(Fetched::NotModified);
        }
        Ok(Fetched::Archive {
            bytes,
            etag: Some(tag),
        })
    }
}

/// An archive served over HTTP(S), polled with `If-None-Match`.
#[derive(Debug, Clone)]
pub struct HttpSource {
    url: String,
    http: reqwest::Client,
}

impl HttpSource {
    /// The archive at `url` (`http://` or `https://`), each request bounded by `timeout`.
    ///
    /// # Errors
    /// A [`SourceError`] when the HTTP client cannot be built.
    pub fn new(url: impl Into<String>, timeout: Duration) -> Result<Self, SourceError> {
        let url = url.into();
        // Both rustls providers are in the dependency graph: pick one.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| SourceError {
                source_name: url.clone(),
                problem: e.to_string(),
            })?;
        Ok(HttpSource { url, http })
    }
}

#[async_trait::async_trait]
impl BundleSource for HttpSource {
    fn describe(&self) -> String {
        self.url.clone()
    }

    async fn fetch(&self, etag: Option<&str>) -> Result<Fetched, SourceError> {
        let mut req = self.http.get(&self.url);
        if let Some(tag) = etag {
            req = req.header(reqwest::header::IF_NONE_MATCH, tag);
        }
        let mut resp = req.send().await.map_err(|e| error(self, e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(Fetched::NotModified);
        }
        if !status.is_success() {
            return Err(error(self, format!("HTTP {status}")));
        }
        let tag = resp
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_ARCHIVE_BYTES as u64)
        {
            return Err(error(self, "archive too large"));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| error(self, e))? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_ARCHIVE_BYTES {
                return Err(error(self, "archive too large"));
            }
        }
        Ok(Fetched::Archive { bytes, etag: tag })
    }
}

/// An archive stored as an object of a NATS JetStream Object Store bucket
/// (`elevate-bundle publish --nats`); the object's digest is its etag.
#[derive(Clone)]
pub struct ObjectStoreSource {
    js: async_nats::jetstream::Context,
    bucket: String,
    object: String,
}

impl std::fmt::Debug for ObjectStoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ObjectStoreSource {
    /// The object `object` of bucket `bucket`.
    pub fn new(
        js: async_nats::jetstream::Context,
        bucket: impl Into<String>,
        object: impl Into<String>,
    ) -> Self {
        ObjectStoreSource {
            js,
            bucket: bucket.into(),
            object: object.into(),
        }
    }
}

#[async_trait::async_trait]
impl BundleSource for ObjectStoreSource {
    fn describe(&self) -> String {
        format!("nats object store {}/{}", self.bucket, self.object)
    }

    async fn fetch(&self, etag: Option<&str>) -> Result<Fetched, SourceError> {
        use tokio::io::AsyncReadExt;
        let store = self
            .js
            .get_object_store(&self.bucket)
            .await
            .map_err(|e| error(self, e))?;
        let info = store.info(&self.object).await.map_err(|e| error(self, e))?;
        if info.size > MAX_ARCHIVE_BYTES {
            return Err(error(self, format!("{} bytes: too large", info.size)));
        }
        let tag = info.digest.clone().unwrap_or_else(|| info.nuid.clone());
        if etag == Some(tag.as_str()) {
            return Ok(Fetched::NotModified);
        }
        let mut object = store.get(&self.object).await.map_err(|e| error(self, e))?;
        let mut bytes = Vec::with_capacity(info.size);
        (&mut object)
            .take(MAX_ARCHIVE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| error(self, e))?;
        if bytes.len() > MAX_ARCHIVE_BYTES {
            return Err(error(self, "archive too large"));
        }
        Ok(Fetched::Archive {
            bytes,
            etag: Some(tag),
        })
    }
}
