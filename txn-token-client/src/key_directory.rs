//! The consumer's view of the trust domain's key directory: the TTS
//! publishes every registered workload's public keys with their owners
//! (`GET /.well-known/workload-jwks`, see `elevate_core::keys::directory`),
//! and a [`KeyDirectory`] keeps a context-reference verifier's producer keys
//! in step with it, so a consumer needs only the TTS URL to trust producers
//! and a producer can rotate keys without a consumer restart.
//!
//! * **Fetch**: [`KeyDirectory::fetch_now`] (at start; its error tells a
//!   builder the directory was unreachable or malformed), then in the
//!   background every `refresh_interval` (or the document's shorter
//!   `Cache-Control: max-age`, never below `min_refresh`), with
//!   `If-None-Match`.
//! * **Unknown `kid`**: the verifier asks the directory ([`KeyRefresh`]);
//!   it refetches at most once per `min_refresh`, and concurrent askers
//!   share one fetch. Within the interval the answer is "no change" and the
//!   reference is refused as it would have been (`unknown-key`).
//! * **Failure**: an unreachable TTS, a non-2xx answer, an oversized or
//!   malformed document keeps the last good key set (logged with the URL);
//!   a malformed document is refused as a whole
//!   ([`KeyDirectoryError::Malformed`]).
//! * **Owner rule**: every key is bound to its owner; a reference it signs
//!   must name that owner as `iss`. `trusted_owners` narrows which owners'
//!   keys are kept at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use elevate_core::ctxref::{ContextRefVerifier, KeyRefresh, KeyRefreshed, VerifyPolicy};
use elevate_core::keys::{JwksProblem, KeyError, KeySet};
use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, ETAG, IF_NONE_MATCH};

use crate::protocol::WORKLOAD_JWKS_PATH;

/// Default minimum time between fetches caused by unknown `kid`s.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(5);
/// Default background refresh interval.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// Largest directory document accepted (bytes).
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Why the key directory could not be fetched or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyDirectoryError {
    /// A URL is not valid.
    #[error("invalid URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(String),
    /// The request failed (connection refused, timeout, reset, body not read).
    #[error("GET {url}: {reason}")]
    Unreachable {
        /// The directory URL.
        url: String,
        /// What happened.
        reason: String,
    },
    /// The TTS answered with a status other than 200 or 304.
    #[error("GET {url}: HTTP {status}")]
    Status {
        /// The directory URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The document is larger than [`MAX_DOCUMENT_BYTES`].
    #[error("GET {url}: document larger than {limit} bytes")]
    TooLarge {
        /// The directory URL.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// The document is not a workload JWKS Elevate can use; nothing of it was
    /// used ([`KeyError::MalformedJwks`] names the problem).
    #[error("key directory at {url} refused: {source}")]
    Malformed {
        /// The directory URL.
        url: String,
        /// What is wrong with it.
        source: KeyError,
    },
}

impl KeyDirectoryError {
    /// The document's problem, when it was malformed.
    pub fn problem(&self) -> Option<&JwksProblem> {
        match self {
            KeyDirectoryError::Malformed {
                source: KeyError::MalformedJwks(p),
                ..
            } => Some(p),
            _ => None,
        }
    }
}

/// The workload key directory URL on the same origin as `token_endpoint`
/// (`/.well-known/workload-jwks`).
///
/// # Errors
///
/// Returns [`KeyDirectoryError::Url`] if `token_endpoint` is not a valid absolute URL.
pub fn workload_jwks_url(token_endpoint: &str) -> Result<String, KeyDirectoryError> {
    let mut url = reqwest::Url::parse(token_endpoint).map_err(|e| KeyDirectoryError::Url {
        url: token_endpoint.to_string(),
        reason: e.to_string(),
    })?;
    url.set_path(WORKLOAD_JWKS_PATH);
    url.set_query(None);
    url.set_fragment(None);
    Ok(url.to_string())
}

/// Settings of a [`KeyDirectory`].
#[derive(Debug, Clone)]
pub struct KeyDirectoryConfig {
    /// The directory URL (`https://tts.example/.well-known/workload-jwks`).
    pub url: String,
    /// Minimum time between fetches caused by unknown `kid`s (default 5 s).
    pub min_refresh: Duration,
    /// Background refresh interval (default 60 s; a shorter `max-age` from
    /// the TTS wins, but never below `min_refresh`).
    pub refresh_interval: Duration,
    /// Timeout of one request, body included (default 5 s).
    pub request_timeout: Duration,
    /// TCP connect timeout (default 2 s).
    pub connect_timeout: Duration,
    /// When set, only keys owned by one of these workloads are kept.
    pub trusted_owners: Option<Vec<String>>,
    /// An extra trusted root CA (PEM) for an `https` directory whose server
    /// certificate is not from a public CA (the TTS client's `root_ca_pem`).
    pub root_ca_pem: Option<Vec<u8>>,
}

impl KeyDirectoryConfig {
    /// Defaults for the directory at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        KeyDirectoryConfig {
            url: url.into(),
            min_refresh: DEFAULT_MIN_REFRESH,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            trusted_owners: None,
            root_ca_pem: None,
        }
    }

    /// Defaults for the directory of the TTS whose token endpoint is `token_endpoint`.
    ///
    /// # Errors
    ///
    /// Returns [`KeyDirectoryError::Url`] if `token_endpoint` is not a valid absolute URL.
    pub fn for_token_endpoint(token_endpoint: &str) -> Result<Self, KeyDirectoryError> {
        Ok(Self::new(workload_jwks_url(token_endpoint)?))
    }
}

#[derive(Debug, Default)]
struct FetchState {
    /// When the last fetch caused by an unknown `kid` started.
    last_unknown_kid_fetch: Option<Instant>,
    /// Whether the last fetch (refresh or unknown `kid`) failed: an unknown
    /// `kid` is then `keys-unavailable` (Retry), not `unknown-key`.
    last_fetch_failed: bool,
    etag: Option<String>,
}

struct Inner {
    config: KeyDirectoryConfig,
    http: reqwest::Client,
    keys: Arc<ArcSwap<KeySet>>,
    /// Held for the whole of a fetch: concurrent callers share one.
    state: tokio::sync::Mutex<FetchState>,
    /// Fetches started (every HTTP request).
    fetches: AtomicU64,
    /// The last `max-age` the TTS sent, in seconds (`u64::MAX`: none).
    max_age: AtomicU64,
}

/// The trust domain's key directory as a consumer sees it (see the module
/// docs). Cheap to clone: clones share the key set and the fetch state.
#[derive(Clone)]
pub struct KeyDirectory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeyDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDirectory")
            .field("url", &self.inner.config.url)
            .field("keys", &self.inner.keys.load())
            .finish_non_exhaustive()
    }
}

impl KeyDirectory {
    /// A directory with an empty key set (nothing fetched yet: call
    /// [`fetch_now`](Self::fetch_now) and [`spawn_refresh`](Self::spawn_refresh)).
    ///
    /// # Errors
    ///
    /// Returns [`KeyDirectoryError::Url`] if `config.url` is not a valid
    /// absolute URL, and [`KeyDirectoryError::Http`] if `root_ca_pem` does
    /// not parse or the HTTP client cannot be built.
    pub fn new(config: KeyDirectoryConfig) -> Result<Self, KeyDirectoryError> {
        crate::install_crypto_provider();
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &config.root_ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| KeyDirectoryError::Http(format!("root CA: {e}")))?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "elevate-txn-token-client/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(|e| KeyDirectoryError::Http(e.to_string()))?;
        Self::with_http_client(config, http)
    }

    /// As [`new`](Self::new), with an HTTP client of the caller's (TLS
    /// roots, mTLS identity); `request_timeout` still bounds each request.
    ///
    /// # Errors
    ///
    /// Returns [`KeyDirectoryError::Url`] if `config.url` is not a valid absolute URL.
    pub fn with_http_client(
        config: KeyDirectoryConfig,
        http: reqwest::Client,
    ) -> Result<Self, KeyDirectoryError> {
        reqwest::Url::parse(&config.url).map_err(|e| KeyDirectoryError::Url {
            url: config.url.clone(),
            reason: e.to_string(),
        })?;
        Ok(KeyDirectory {
            inner: Arc::new(Inner {
                config,
                http,
                keys: Arc::new(ArcSwap::from_pointee(KeySet::new())),
                state: tokio::sync::Mutex::new(FetchState::default()),
                fetches: AtomicU64::new(0),
                max_age: AtomicU64::new(u64::MAX),
            }),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &KeyDirectoryConfig {
        &self.inner.config
    }

    /// The shared key-set handle (give it to
    /// [`ContextRefVerifier::with_shared_keys`]).
    pub fn keys(&self) -> &Arc<ArcSwap<KeySet>> {
        &self.inner.keys
    }

    /// A context-reference verifier over this directory's keys that asks
    /// the directory about unknown `kid`s.
    pub fn verifier(&self, policy: VerifyPolicy) -> ContextRefVerifier {
        ContextRefVerifier::with_shared_keys(self.inner.keys.clone(), policy)
            .with_refresh(Arc::new(self.clone()))
    }

    /// How many fetches (HTTP requests) this directory has started.
    pub fn fetch_count(&self) -> u64 {
        self.inner.fetches.load(Ordering::Acquire)
    }

    /// Fetches the directory now (not rate-limited; waits for a fetch in
    /// progress). Returns how many keys are in force afterwards.
    ///
    /// # Errors
    ///
    /// Returns [`KeyDirectoryError::Unreachable`], [`KeyDirectoryError::Status`],
    /// [`KeyDirectoryError::TooLarge`] or [`KeyDirectoryError::Malformed`]
    /// when the fetch fails; the previous key set stays in force.
    pub async fn fetch_now(&self) -> Result<usize, KeyDirectoryError> {
        let mut state = self.inner.state.lock().await;
        self.inner.fetch(&mut state).await
    }

    /// Refreshes in the background every `refresh_interval` (or the TTS's
    /// shorter `max-age`, at least `min_refresh`) until every clone of this
    /// directory is dropped or the task is aborted. Needs a Tokio runtime.
    pub fn spawn_refresh(&self) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let delay = match weak.upgrade() {
                    Some(inner) => inner.next_refresh(),
                    None => return,
                };
                tokio::time::sleep(delay).await;
                let Some(inner) = weak.upgrade() else { return };
                let mut state = inner.state.lock().await;
                // Failures are logged by `fetch`; the last good set stays.
                let _ = inner.fetch(&mut state).await;
            }
        })
    }

    /// One fetch for an unknown `kid`, rate-limited and single-flight: true
    /// when `kid` is in the key set afterwards.
    async fn refresh_for(&self, kid: &str) -> KeyRefreshed {
        let inner = &self.inner;
        let found = |state: &FetchState| {
            if inner.keys.load().get(kid).is_some() {
                KeyRefreshed::Updated
            } else if state.last_fetch_failed {
                KeyRefreshed::Unavailable
            } else {
                KeyRefreshed::Unchanged
            }
        };
        if inner.keys.load().get(kid).is_some() {
            return KeyRefreshed::Updated;
        }
        let seen = inner.fetches.load(Ordering::Acquire);
        let mut state = inner.state.lock().await;
        if inner.fetches.load(Ordering::Acquire) != seen {
            // Someone fetched while we waited: share their result.
            return found(&state);
        }
        if let Some(at) = state.last_unknown_kid_fetch
            && at.elapsed() < inner.config.min_refresh
        {
            tracing::debug!(url = %inner.config.url, %kid,
                "unknown kid; key directory fetched {} ms ago, not again yet", at.elapsed().as_millis());
            return found(&state);
        }
        state.last_unknown_kid_fetch = Some(Instant::now());
        tracing::info!(url = %inner.config.url, %kid, "unknown kid: fetching the key directory");
        let _ = inner.fetch(&mut state).await;
        found(&state)
    }
}

#[async_trait::async_trait]
impl KeyRefresh for KeyDirectory {
    async fn refresh(&self, kid: &str) -> KeyRefreshed {
        self.refresh_for(kid).await
    }
}

impl Inner {
    fn next_refresh(&self) -> Duration {
        let interval = self.config.refresh_interval;
        let floor = self.config.min_refresh.max(Duration::from_secs(1));
        match self.max_age.load(Ordering::Acquire) {
            u64::MAX => interval,
            secs => interval.min(Duration::from_secs(secs).max(floor)),
        }
    }

    /// One fetch, with the state lock held; logs failures with the URL.
    async fn fetch(&self, state: &mut FetchState) -> Result<usize, KeyDirectoryError> {
        self.fetches.fetch_add(1, Ordering::AcqRel);
        let result = self.fetch_inner(state).await;
        state.last_fetch_failed = result.is_err();
        match result {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::warn!(url = %self.config.url, error = %e, keys = self.keys.load().len(),
                    "key directory fetch failed; keeping the last good key set");
                Err(e)
            }
        }
    }

    async fn fetch_inner(&self, state: &mut FetchState) -> Result<usize, KeyDirectoryError> {
        let url = &self.config.url;
        let mut req = self
            .http
            .get(url)
            .timeout(self.config.request_timeout)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(tag) = &state.etag {
            req = req.header(IF_NONE_MATCH, tag.as_str());
        }
        let unreachable = |e: reqwest::Error| KeyDirectoryError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let mut resp = req.send().await.map_err(unreachable)?;
        if let Some(secs) = resp
            .headers()
            .get(CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age)
        {
            self.max_age.store(secs, Ordering::Release);
        }
        if resp.status() == StatusCode::NOT_MODIFIED && state.etag.is_some() {
            return Ok(self.keys.load().len());
        }
        if resp.status() != StatusCode::OK {
            return Err(KeyDirectoryError::Status {
                url: url.clone(),
                status: resp.status().as_u16(),
            });
        }
        let etag = resp
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let too_large = || KeyDirectoryError::TooLarge {
            url: url.clone(),
            limit: MAX_DOCUMENT_BYTES,
        };
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let malformed = |source| KeyDirectoryError::Malformed {
            url: url.clone(),
            source,
        };
        let text = std::str::from_utf8(&body)
            .map_err(|e| malformed(KeyError::MalformedJwks(JwksProblem::NotJson(e.to_string()))))?;
        let mut set = KeySet::from_workload_jwks_json(text).map_err(malformed)?;
        if let Some(owners) = &self.config.trusted_owners {
            set.retain_owners(owners);
        }
        let n = set.len();
        let before: Vec<String> = sorted_kids(&self.keys.load());
        let after = sorted_kids(&set);
        self.keys.store(Arc::new(set));
        state.etag = etag;
        if before != after {
            tracing::info!(url = %url, kids = ?after, previous = ?before, "key directory updated");
        }
        Ok(n)
    }
}

fn sorted_kids(set: &KeySet) -> Vec<String> {
    let mut kids: Vec<String> = set.kids().map(str::to_string).collect();
    kids.sort();
    kids
}

/// The `max-age` of a `Cache-Control` value, when present.
fn max_age(value: &str) -> Option<u64> {
    value.split(',').find_map(|d| {
        let (name, v) = d.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| v.trim().trim_matches('"').parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_from_the_token_endpoint() {
        assert_eq!(
            workload_jwks_url("https://tts.example:8443/oauth/token?x=1#f").unwrap(),
            "https://tts.example:8443/.well-known/workload-jwks"
        );
        assert!(matches!(
            workload_jwks_url("not a url"),
            Err(KeyDirectoryError::Url { .. })
        ));
        let cfg = KeyDirectoryConfig::for_token_endpoint("http://127.0.0.1:8400/token").unwrap();
        assert_eq!(cfg.url, "http://127.0.0.1:8400/.well-known/workload-jwks");
        assert_eq!(cfg.min_refresh, Duration::from_secs(5));
        assert_eq!(cfg.refresh_interval, Duration::from_secs(60));
        assert!(KeyDirectory::new(KeyDirectoryConfig::new("nope")).is_err());
    }

    #[test]
    fn cache_control_max_age() {
        assert_eq!(max_age("public, max-age=30"), Some(30));
        assert_eq!(max_age("Max-Age = 7 , public"), Some(7));
        assert_eq!(max_age("no-store"), None);
        assert_eq!(max_age("max-age=x"), None);
    }

    #[tokio::test]
    async fn the_next_refresh_honours_max_age_within_bounds() {
        let mut cfg = KeyDirectoryConfig::new("http://127.0.0.1:9/x");
        cfg.min_refresh = Duration::from_secs(5);
        let d = KeyDirectory::new(cfg).unwrap();
        assert_eq!(d.inner.next_refresh(), Duration::from_secs(60));
        d.inner.max_age.store(30, Ordering::Release);
        assert_eq!(d.inner.next_refresh(), Duration::from_secs(30));
        d.inner.max_age.store(0, Ordering::Release);
        assert_eq!(d.inner.next_refresh(), Duration::from_secs(5));
        d.inner.max_age.store(600, Ordering::Release);
        assert_eq!(d.inner.next_refresh(), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn an_unreachable_directory_is_an_error_and_refreshes_nothing() {
        // Port 9 (discard) on loopback: connection refused.
        let mut cfg = KeyDirectoryConfig::new("http://127.0.0.1:9/.well-known/workload-jwks");
        cfg.request_timeout = Duration::from_millis(500);
        cfg.connect_timeout = Duration::from_millis(500);
        let d = KeyDirectory::new(cfg).unwrap();
        assert!(matches!(
            d.fetch_now().await,
            Err(KeyDirectoryError::Unreachable { .. })
        ));
        // Nobody can say the key is bad: the reference waits (Retry).
        assert_eq!(d.refresh("k").await, KeyRefreshed::Unavailable);
        // rate-limited: the second unknown kid does not fetch again, and
        // the directory is still known to be unreachable
        assert_eq!(d.refresh("k2").await, KeyRefreshed::Unavailable);
        assert_eq!(d.fetch_count(), 2);
        assert!(d.keys().load().is_empty());
    }
}
