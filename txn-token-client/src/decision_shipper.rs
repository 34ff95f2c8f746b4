//! Shipping the decision spool to an HTTP endpoint: `POST` of each batch as
//! a gzipped JSON array of chained entries (`Content-Type:
//! application/json`, `Content-Encoding: gzip`) with the batch headers
//! (`Idempotency-Key`, stream, seq range, `prev`). A 2xx is the
//! acknowledgement; anything else, or no answer within the timeout, is
//! retried by the ship loop. It lives here because this crate already has
//! the workspace's HTTP client (reqwest on rustls with aws-lc-rs).

use std::time::Duration;

use elevate_core::decision::Batch;
use elevate_core::decision::ship::{ShipError, Shipper, batch_headers};

/// A [`Shipper`] to an `http(s)://` endpoint.
#[derive(Clone)]
pub struct HttpDecisionShipper {
    http: reqwest::Client,
    url: reqwest::Url,
    shown: String,
    bearer: Option<String>,
}

impl std::fmt::Debug for HttpDecisionShipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpDecisionShipper")
            .field("url", &self.shown)
            .field("bearer", &self.bearer.as_ref().map(|_| "…"))
            .finish()
    }
}

/// The endpoint cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("decision shipping endpoint: {0}")]
pub struct HttpShipperError(String);

impl HttpDecisionShipper {
    /// A shipper to `url` (`http://` or `https://`); `root_ca_pem` adds a
    /// trusted CA for an endpoint not under a public one; `timeout` bounds
    /// each `POST`. Installs the aws-lc-rs crypto provider for `https`.
    ///
    /// # Errors
    /// [`HttpShipperError`] for a URL that is not http(s), a CA that is
    /// not PEM, or an HTTP client that cannot be built.
    pub fn new(
        url: &str,
        root_ca_pem: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Self, HttpShipperError> {
        let url = reqwest::Url::parse(url).map_err(|e| HttpShipperError(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HttpShipperError(format!(
                "`{}` is not an http(s) URL",
                url.scheme()
            )));
        }
        if url.scheme() == "https" {
            crate::install_crypto_provider();
        }
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)));
        if let Some(pem) = root_ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| HttpShipperError(format!("root CA: {e}")))?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder
            .build()
            .map_err(|e| HttpShipperError(e.to_string()))?;
        let mut shown = url.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        shown.set_query(None);
        Ok(HttpDecisionShipper {
            http,
            shown: shown.to_string(),
            url,
            bearer: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` with every batch (never logged).
    #[must_use]
    pub fn with_bearer(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }
}

#[async_trait::async_trait]
impl Shipper for HttpDecisionShipper {
    fn target(&self) -> String {
        self.shown.clone()
    }

    async fn ship(&self, batch: &Batch) -> Result<(), ShipError> {
        let err = |reason: String| ShipError {
            target: self.shown.clone(),
            reason,
        };
        let body = batch.to_gzip_json().map_err(|e| err(e.to_string()))?;
        let mut req = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::CONTENT_ENCODING, "gzip")
            .body(body);
        for (k, v) in batch_headers(batch) {
            req = req.header(k, v);
        }
        if let Some(t) = &self.bearer {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| {
            err(if e.is_timeout() {
                "timed out".to_string()
            } else if e.is_connect() {
                "connection refused or unreachable".to_string()
            } else {
                e.without_url().to_string()
            })
        })?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(err(format!("HTTP {status}")))
        }
    }
}
