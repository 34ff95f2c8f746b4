//! The Txn-Token client: RFC 8693 token exchange as profiled by
//! draft-ietf-oauth-transaction-tokens, authenticated with an RFC 7523 client
//! assertion or, with [`ClientAuthMethod::TlsClientAuth`], by the workload's
//! X.509 certificate on the TLS connection (RFC 8705), with a per-request timeout, a bounded jittered retry for
//! transient failures and a circuit breaker, and every returned token verified.
//!
//! A fleet reached without a load balancer: [`TtsClientConfig::replica_endpoints`]
//! lists the other replicas' token endpoints; exchanges then go round-robin
//! over all of them, and a connection failure moves the exchange on to the
//! next endpoint at once (the failed one is passed over for
//! [`ENDPOINT_PASS_OVER`]).
//!
//! Error classes: an OAuth error code is terminal ([`TokenError::Denied`]);
//! network errors, timeouts, 5xx, 429 and an open circuit are
//! [`TokenError::Unavailable`] (Retry); a broken response or a token that does
//! not verify is [`TokenError::Invalid`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use elevate_core::keys::{CurrentKey, SigningKey};
use elevate_core::scope::Scope;
use elevate_core::token::{SecretToken, TokenError, TokenRequest, TokenSource, TxnToken};
use reqwest::StatusCode;

use crate::assertion::sign_assertion;
use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker, Permit};
use crate::protocol::{
    ClientAuthMethod, ErrorResponse, ExchangeForm, JWKS_PATH, TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_JWT, TOKEN_TYPE_NA, TOKEN_TYPE_TXN_TOKEN, TokenResponse, exchange_form,
    with_client_assertion, with_client_id,
};
use crate::verify::{FailoverJwks, HttpJwks, JwksProvider, TxnTokenVerifier};

/// How long a token endpoint whose connection failed is passed over while
/// others are configured ([`TtsClientConfig::replica_endpoints`]): it is
/// tried again after this, or earlier when every endpoint has failed.
pub const ENDPOINT_PASS_OVER: Duration = Duration::from_secs(2);

/// Settings of a [`TtsClient`].
#[derive(Clone)]
pub struct TtsClientConfig {
    /// Token endpoint URL (also the client assertion's `aud`).
    pub token_endpoint: String,
    /// Further token endpoints of the same trust domain: the other replicas
    /// of a TTS fleet when no load balancer stands in front of them (empty:
    /// `token_endpoint` alone). Exchanges go round-robin over
    /// `token_endpoint` and these; when an endpoint refuses or cannot take
    /// the connection, the same attempt goes on to the next endpoint at once
    /// and the failed one is passed over for [`ENDPOINT_PASS_OVER`]; a
    /// timeout, 5xx or 429 is retried (within `max_attempts`) at the next
    /// endpoint. Each client assertion is addressed (`aud`) to the endpoint
    /// it is sent to, so every replica must accept its own URL (its bound
    /// address, or its `public_url`).
    pub replica_endpoints: Vec<String>,
    /// JWKS URL; defaults to `/.well-known/jwks.json` on the token endpoint's
    /// origin (with `replica_endpoints`: on each endpoint's origin, the first
    /// that answers).
    pub jwks_url: Option<String>,
    /// The trust domain: `audience` of the request and `aud` of the token.
    pub trust_domain: String,
    /// This workload's id (client assertion `iss`/`sub`; expected `req_wl`).
    pub workload_id: String,
    /// Timeout of one HTTP attempt.
    pub request_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Attempts per call, first included (1 = no in-call retry).
    pub max_attempts: usize,
    /// Smallest backoff between attempts (jittered, exponential).
    pub backoff_min: Duration,
    /// Largest backoff between attempts.
    pub backoff_max: Duration,
    /// A `Retry-After` up to this long is waited out within the call; longer ends the call.
    pub max_in_call_retry_after: Duration,
    /// Circuit breaker settings.
    pub breaker: BreakerConfig,
    /// Clock leeway for Txn-Token verification (≤ 30 s).
    pub leeway: Duration,
    /// Lifetime of each client assertion (≤ 60 s).
    pub assertion_ttl: Duration,
    /// Minimum time between JWKS refreshes triggered by an unknown `kid`.
    pub jwks_min_refresh: Duration,
    /// `request_context` sent with every request (a JSON object).
    pub request_context: serde_json::Value,
    /// How the client authenticates at the token endpoint (default
    /// [`ClientAuthMethod::PrivateKeyJwt`]: a client assertion signed with
    /// the workload key). [`ClientAuthMethod::TlsClientAuth`] sends no
    /// assertion and needs [`mtls_identity_pem`](Self::mtls_identity_pem)
    /// and an `https` token endpoint; the signing key is still this
    /// workload's key for everything else it signs (context references).
    pub auth: ClientAuthMethod,
    /// The mTLS client identity: PEM with the certificate chain and its
    /// private key (an X.509-SVID with its key). Presented on every TLS
    /// connection; with `private_key_jwt` too (for a proxy that requires it),
    /// but a TTS that sees both a certificate and an assertion refuses the
    /// request (one method per request, RFC 6749 §2.3).
    pub mtls_identity_pem: Option<Vec<u8>>,
    /// Optional extra trusted root CA (PEM) for an HTTPS token endpoint.
    pub root_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TtsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtsClientConfig")
            .field("token_endpoint", &self.token_endpoint)
            .field("replica_endpoints", &self.replica_endpoints)
            .field("trust_domain", &self.trust_domain)
            .field("workload_id", &self.workload_id)
            .field("request_timeout", &self.request_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("breaker", &self.breaker)
            .field("auth", &self.auth)
            .field("mtls", &self.mtls_identity_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl TtsClientConfig {
    /// Defaults: 2 s per attempt, 3 attempts (50–500 ms jittered backoff),
    /// breaker opens after 5 consecutive failures for 5 s, 30 s leeway.
    pub fn new(
        token_endpoint: impl Into<String>,
        trust_domain: impl Into<String>,
        workload_id: impl Into<String>,
    ) -> Self {
        TtsClientConfig {
            token_endpoint: token_endpoint.into(),
            replica_endpoints: Vec::new(),
            jwks_url: None,
            trust_domain: trust_domain.into(),
            workload_id: workload_id.into(),
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            max_attempts: 3,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            max_in_call_retry_after: Duration::from_secs(1),
            breaker: BreakerConfig::default(),
            leeway: Duration::from_secs(30),
            assertion_ttl: Duration::from_secs(30),
            jwks_min_refresh: Duration::from_secs(1),
            request_context: serde_json::json!({ "mode": "async" }),
            auth: ClientAuthMethod::PrivateKeyJwt,
            mtls_identity_pem: None,
            root_ca_pem: None,
        }
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientBuildError {
    /// A URL in the configuration is not valid.
    #[error("invalid URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The HTTP client (TLS, identity) could not be built.
    #[error("HTTP client: {0}")]
    Http(String),
    /// The client authentication method cannot work as configured (e.g.
    /// `tls_client_auth` without a certificate, or over plain HTTP).
    #[error("client authentication {method}: {reason}")]
    Auth {
        /// The configured method.
        method: ClientAuthMethod,
        /// What is missing.
        reason: String,
    },
}

/// One token endpoint and until when it is passed over.
#[derive(Debug)]
struct Endpoint {
    url: String,
    /// Milliseconds since the client's start until which it is passed over (0: never).
    down_until_ms: AtomicU64,
}

/// The RFC 8693 Txn-Token client for one consuming (or producing) workload.
pub struct TtsClient {
    config: TtsClientConfig,
    key: CurrentKey,
    http: reqwest::Client,
    verifier: TxnTokenVerifier,
    breaker: CircuitBreaker,
    /// `token_endpoint` first, then `replica_endpoints`.
    endpoints: Vec<Endpoint>,
    /// Round-robin position.
    next: AtomicUsize,
    started: Instant,
}

impl std::fmt::Debug for TtsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtsClient")
            .field("config", &self.config)
            .field("key", &self.key)
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

/// The JWKS URL on the same origin as `token_endpoint`.
///
/// # Errors
///
/// Returns [`ClientBuildError::Url`] if `token_endpoint` is not a valid absolute URL.
pub fn default_jwks_url(token_endpoint: &str) -> Result<String, ClientBuildError> {
    let mut url = reqwest::Url::parse(token_endpoint).map_err(|e| ClientBuildError::Url {
        url: token_endpoint.to_string(),
        reason: e.to_string(),
    })?;
    url.set_path(JWKS_PATH);
    url.set_query(None);
    Ok(url.to_string())
}

/// One failed attempt and whether another attempt may help.
#[derive(Debug)]
struct AttemptError {
    error: TokenError,
    retryable: bool,
}

impl AttemptError {
    fn terminal(error: TokenError) -> Self {
        AttemptError {
            error,
            retryable: false,
        }
    }

    fn transient(reason: String, retry_after: Option<Duration>) -> Self {
        AttemptError {
            error: TokenError::Unavailable {
                reason,
                retry_after,
            },
            retryable: true,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match &self.error {
            TokenError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Parses `Retry-After` as delta-seconds (HTTP-dates are ignored).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Checks a 200 response body as the draft requires; returns the token.
///
/// # Errors
///
/// Returns [`TokenError::Invalid`] if `token_type` is not `N_A`, `issued_token_type` is not the
/// Txn-Token type, a `refresh_token` was issued, or `access_token` is empty.
pub fn check_token_response(resp: TokenResponse) -> Result<String, TokenError> {
    if !resp.token_type.eq_ignore_ascii_case(TOKEN_TYPE_NA) {
        return Err(TokenError::Invalid(format!(
            "token_type {:?} where N_A is required",
            resp.token_type
        )));
    }
    if resp.issued_token_type != TOKEN_TYPE_TXN_TOKEN {
        return Err(TokenError::Invalid(format!(
            "issued_token_type {:?} is not a Txn-Token",
            resp.issued_token_type
        )));
    }
    if resp.refresh_token.is_some() {
        return Err(TokenError::Invalid(
            "a refresh_token was issued with a Txn-Token".into(),
        ));
    }
    if resp.access_token.is_empty() {
        return Err(TokenError::Invalid("empty access_token".into()));
    }
    Ok(resp.access_token)
}

/// Largest token-endpoint response body read (a Txn-Token is a few KB).
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Reads a response body, refusing one larger than `limit` (terminal: a TTS
/// that answers with megabytes is misbehaving, not overloaded).
async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, AttemptError> {
    let too_large = || {
        AttemptError::terminal(TokenError::Invalid(format!(
            "response body larger than {limit} bytes"
        )))
    };
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| AttemptError::transient(format!("reading the response: {e}"), None))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl TtsClient {
    /// Builds the client: one keep-alive HTTP client shared by token and JWKS requests.
    ///
    /// # Errors
    ///
    /// Returns [`ClientBuildError::Url`] if the token endpoint (or the JWKS URL derived from it) is
    /// not a valid URL, [`ClientBuildError::Http`] if the mTLS identity or root CA PEM does not
    /// parse or the HTTP client cannot be built, and [`ClientBuildError::Auth`] if
    /// [`ClientAuthMethod::TlsClientAuth`] has no mTLS identity or the token endpoint is not
    /// `https`.
    pub fn new(config: TtsClientConfig, key: SigningKey) -> Result<Self, ClientBuildError> {
        Self::with_current_key(config, CurrentKey::new(key))
    }

    /// As [`TtsClient::new`], signing each client assertion with whatever key
    /// `key` holds at that moment (a rotated key file takes effect without a
    /// restart; the TTS must already know the new public key).
    ///
    /// # Errors
    ///
    /// The errors of [`TtsClient::new`].
    pub fn with_current_key(
        config: TtsClientConfig,
        key: CurrentKey,
    ) -> Result<Self, ClientBuildError> {
        crate::install_crypto_provider();
        let urls: Vec<String> = std::iter::once(config.token_endpoint.clone())
            .chain(config.replica_endpoints.iter().cloned())
            .collect();
        let mut parsed = Vec::with_capacity(urls.len());
        for u in &urls {
            parsed.push(reqwest::Url::parse(u).map_err(|e| ClientBuildError::Url {
                url: u.clone(),
                reason: e.to_string(),
            })?);
        }
        if config.auth == ClientAuthMethod::TlsClientAuth {
            let refuse = |reason: &str| ClientBuildError::Auth {
                method: config.auth,
                reason: reason.to_string(),
            };
            if config.mtls_identity_pem.is_none() {
                return Err(refuse(
                    "needs the workload's certificate and key (mtls_identity_pem)",
                ));
            }
            if parsed.iter().any(|u| u.scheme() != "https") {
                return Err(refuse(
                    "needs an https token endpoint (a certificate only travels over TLS)",
                ));
            }
        }
        let mut jwks_urls: Vec<String> = Vec::new();
        match &config.jwks_url {
            Some(u) => jwks_urls.push(u.clone()),
            None => {
                for u in &urls {
                    let j = default_jwks_url(u)?;
                    if !jwks_urls.contains(&j) {
                        jwks_urls.push(j);
                    }
                }
            }
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // Never follow a redirect: a 307/308 would re-send the client
            // assertion and the context reference to another endpoint.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "elevate-txn-token-client/",
                env!("CARGO_PKG_VERSION")
            ));
        if let Some(pem) = &config.mtls_identity_pem {
            let id = reqwest::Identity::from_pem(pem)
                .map_err(|e| ClientBuildError::Http(format!("mTLS identity: {e}")))?;
            builder = builder.identity(id);
        }
        if let Some(pem) = &config.root_ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| ClientBuildError::Http(format!("root CA: {e}")))?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder
            .build()
            .map_err(|e| ClientBuildError::Http(e.to_string()))?;
        let mut providers: Vec<Arc<dyn JwksProvider>> = jwks_urls
            .into_iter()
            .map(|u| {
                Arc::new(HttpJwks::new(http.clone(), u, Duration::from_secs(5)))
                    as Arc<dyn JwksProvider>
            })
            .collect();
        let provider: Arc<dyn JwksProvider> = if providers.len() == 1 {
            providers.remove(0)
        } else {
            Arc::new(FailoverJwks::new(providers))
        };
        let verifier = TxnTokenVerifier::with_provider(&config.trust_domain, provider)
            .with_leeway(config.leeway)
            .with_min_refresh_interval(config.jwks_min_refresh);
        Ok(TtsClient {
            breaker: CircuitBreaker::new(config.breaker),
            endpoints: urls
                .into_iter()
                .map(|url| Endpoint {
                    url,
                    down_until_ms: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            started: Instant::now(),
            config,
            key,
            http,
            verifier,
        })
    }

    /// The workload this client authenticates as.
    pub fn workload_id(&self) -> &str {
        &self.config.workload_id
    }

    /// The verifier this client checks tokens with (share it to verify inbound `Txn-Token` headers).
    pub fn verifier(&self) -> &TxnTokenVerifier {
        &self.verifier
    }

    /// The circuit breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Entry flow: exchanges a user's access token for a Txn-Token for this workload.
    ///
    /// # Errors
    ///
    /// The same as [`exchange`](Self::exchange).
    pub async fn exchange_access_token(
        &self,
        access_token: &str,
        scope: &Scope,
        request_details: &serde_json::Value,
    ) -> Result<TxnToken, TokenError> {
        self.exchange(
            access_token,
            TOKEN_TYPE_ACCESS_TOKEN,
            scope,
            request_details,
        )
        .await
    }

    /// One token exchange with retries; the returned token is verified.
    ///
    /// # Errors
    ///
    /// Returns [`TokenError::Unavailable`] if the circuit breaker is open, or the service stays
    /// unreachable, times out, or answers 5xx or 429 after the retries (also when its keys cannot
    /// be fetched to verify the token); [`TokenError::Denied`] if it answers with an RFC 6749
    /// error; and [`TokenError::Invalid`] if the assertion cannot be signed, the response breaks
    /// the protocol, or the token fails verification or is not issued for this workload.
    pub async fn exchange(
        &self,
        subject_token: &str,
        subject_token_type: &str,
        scope: &Scope,
        request_details: &serde_json::Value,
    ) -> Result<TxnToken, TokenError> {
        let base = exchange_form(
            &self.config.trust_domain,
            scope,
            subject_token,
            subject_token_type,
            &self.config.request_context,
            request_details,
        );
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.config.backoff_min)
            .with_max_delay(self.config.backoff_max)
            .with_max_times(self.config.max_attempts.saturating_sub(1))
            .with_jitter();
        let max_ra = self.config.max_in_call_retry_after;
        // Round-robin over the endpoints; each retry starts at the next one.
        let turn = AtomicUsize::new(self.next.fetch_add(1, Ordering::Relaxed));
        let token = (|| self.attempt(&base, turn.fetch_add(1, Ordering::Relaxed)))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &AttemptError| e.retryable)
            .adjust(move |e, next| match (next, e.retry_after()) {
                (None, _) => None,
                (Some(_), Some(ra)) if ra <= max_ra => Some(ra),
                (Some(_), Some(_)) => None,
                (next, None) => next,
            })
            .notify(|e, wait| {
                tracing::debug!(error = %e.error, ?wait, "Txn-Token request failed; retrying");
            })
            .await
            .map_err(|e| e.error)?;
        let claims = self.verifier.verify(&token).await?;
        if claims.req_wl != self.config.workload_id {
            return Err(TokenError::Invalid(format!(
                "req_wl {:?} is not this workload",
                claims.req_wl
            )));
        }
        let token = SecretToken::new(token);
        tracing::debug!(txn = %claims.txn, sub = %claims.sub, scope = %claims.scope, token_sha256 = %token.sha256(), "Txn-Token obtained");
        Ok(TxnToken {
            token,
            claims: claims.into(),
        })
    }

    /// The endpoints in the order one attempt tries them: round-robin from
    /// `turn`, those passed over after the others.
    fn order(&self, turn: usize) -> Vec<&Endpoint> {
        let n = self.endpoints.len();
        let now = self.now_ms();
        let rotated = (0..n).map(|i| &self.endpoints[(turn + i) % n]);
        let (up, down): (Vec<&Endpoint>, Vec<&Endpoint>) =
            rotated.partition(|e| e.down_until_ms.load(Ordering::Relaxed) <= now);
        up.into_iter().chain(down).collect()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The request for `url`: with `private_key_jwt`, a fresh client
    /// assertion addressed to `url`.
    fn form_for(&self, base: &ExchangeForm, url: &str) -> Result<ExchangeForm, AttemptError> {
        Ok(match self.config.auth {
            // RFC 8705 §2: the certificate authenticates, client_id names the client.
            ClientAuthMethod::TlsClientAuth => {
                with_client_id(base.clone(), &self.config.workload_id)
            }
            _ => {
                let assertion = sign_assertion(
                    &self.key.get(),
                    &self.config.workload_id,
                    url,
                    self.config.assertion_ttl,
                )
                .map_err(|e| {
                    AttemptError::terminal(TokenError::Invalid(format!("signing: {e}")))
                })?;
                with_client_assertion(base.clone(), &assertion)
            }
        })
    }

    async fn attempt(&self, base: &ExchangeForm, turn: usize) -> Result<String, AttemptError> {
        let permit = self.breaker.acquire().map_err(|open| {
            AttemptError::terminal(TokenError::Unavailable {
                reason: open.to_string(),
                retry_after: Some(open.wait),
            })
        })?;
        let order = self.order(turn);
        let mut causes = Vec::new();
        for (i, ep) in order.iter().enumerate() {
            let form = self.form_for(base, &ep.url)?;
            let pairs: Vec<(&str, &str)> = form.pairs().collect();
            let sent = self
                .http
                .post(&ep.url)
                .timeout(self.config.request_timeout)
                .header(reqwest::header::ACCEPT, "application/json")
                .form(&pairs)
                .send()
                .await;
            let e = match sent {
                Ok(resp) => return self.answer(resp, permit, &ep.url).await,
                Err(e) => e,
            };
            let what = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connection refused or unreachable"
            } else {
                "transport"
            };
            causes.push(format!("{what} at POST {}: {e}", ep.url));
            if e.is_connect() && order.len() > 1 {
                // Never delivered: the next endpoint may take it at once.
                let until = self.now_ms() + ENDPOINT_PASS_OVER.as_millis() as u64;
                ep.down_until_ms.store(until, Ordering::Relaxed);
                if i + 1 < order.len() {
                    tracing::debug!(endpoint = %ep.url, error = %e, "token endpoint unreachable; trying the next");
                    continue;
                }
            }
            break;
        }
        let cause = causes.join("; ");
        permit.failure_because(cause.clone());
        Err(AttemptError::transient(cause, None))
    }

    /// Reads the answer of `url`.
    async fn answer(
        &self,
        resp: reqwest::Response,
        permit: Permit<'_>,
        url: &str,
    ) -> Result<String, AttemptError> {
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let cause = format!("HTTP {status} at POST {url}");
            permit.failure_because(cause.clone());
            let ra = retry_after(resp.headers());
            return Err(AttemptError::transient(cause, ra));
        }
        permit.success();
        let body = read_capped(resp, MAX_RESPONSE_BYTES).await?;
        if status == StatusCode::OK {
            let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                AttemptError::terminal(TokenError::Invalid(format!(
                    "200 response is not a token response: {e}"
                )))
            })?;
            return check_token_response(parsed).map_err(AttemptError::terminal);
        }
        if status.is_client_error() {
            return match serde_json::from_slice::<ErrorResponse>(&body) {
                Ok(err) if !err.error.is_empty() => {
                    Err(AttemptError::terminal(TokenError::Denied {
                        code: err.error,
                        description: err.error_description,
                    }))
                }
                _ => Err(AttemptError::terminal(TokenError::Invalid(format!(
                    "HTTP {status} without an RFC 6749 error body"
                )))),
            };
        }
        Err(AttemptError::terminal(TokenError::Invalid(format!(
            "unexpected HTTP {status}"
        ))))
    }
}

#[async_trait::async_trait]
impl TokenSource for TtsClient {
    async fn acquire(&self, req: &TokenRequest<'_>) -> Result<TxnToken, TokenError> {
        self.exchange(
            &req.reference.token,
            TOKEN_TYPE_JWT,
            req.scope,
            &req.request_details.to_value(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp() -> TokenResponse {
        TokenResponse {
            access_token: "a.b.c".into(),
            issued_token_type: TOKEN_TYPE_TXN_TOKEN.into(),
            token_type: "N_A".into(),
            expires_in: Some(60),
            scope: None,
            refresh_token: None,
        }
    }

    #[test]
    fn response_checks() {
        assert!(check_token_response(resp()).is_ok());
        let mut r = resp();
        r.token_type = "Bearer".into();
        assert!(matches!(
            check_token_response(r),
            Err(TokenError::Invalid(_))
        ));
        let mut r = resp();
        r.issued_token_type = TOKEN_TYPE_JWT.into();
        assert!(matches!(
            check_token_response(r),
            Err(TokenError::Invalid(_))
        ));
        let mut r = resp();
        r.refresh_token = Some("r".into());
        assert!(matches!(
            check_token_response(r),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn tls_client_auth_needs_a_certificate_and_https() {
        let key = SigningKey::generate(elevate_core::keys::SigningAlg::ES256, "k").unwrap();
        let mut cfg = TtsClientConfig::new("https://tts.example/token", "td", "spiffe://td/a");
        cfg.auth = ClientAuthMethod::TlsClientAuth;
        let e = TtsClient::new(cfg.clone(), key.clone()).unwrap_err();
        assert!(
            matches!(e, ClientBuildError::Auth { .. })
                && e.to_string().contains("mtls_identity_pem"),
            "{e}"
        );
        cfg.token_endpoint = "http://tts.example/token".into();
        cfg.mtls_identity_pem = Some(b"not used before the scheme check".to_vec());
        let e = TtsClient::new(cfg, key.clone()).unwrap_err();
        assert!(e.to_string().contains("https"), "{e}");
        // private_key_jwt (the default) needs neither
        let cfg = TtsClientConfig::new("http://tts.example/token", "td", "spiffe://td/a");
        assert_eq!(cfg.auth, ClientAuthMethod::PrivateKeyJwt);
        assert!(TtsClient::new(cfg, key).is_ok());
        assert_eq!(
            ClientAuthMethod::parse("tls_client_auth"),
            Some(ClientAuthMethod::TlsClientAuth)
        );
        assert_eq!(ClientAuthMethod::parse("TLS_CLIENT_AUTH"), None);
    }

    #[test]
    fn jwks_url_and_retry_after() {
        assert_eq!(
            default_jwks_url("http://127.0.0.1:8400/oauth/token?x=1").unwrap(),
            "http://127.0.0.1:8400/.well-known/jwks.json"
        );
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    fn two_endpoint_config(first: &str, second: &str) -> TtsClientConfig {
        let mut cfg = TtsClientConfig::new(first, "td", "spiffe://td/a");
        cfg.replica_endpoints = vec![second.to_string()];
        cfg.max_attempts = 1;
        cfg
    }

    #[test]
    fn endpoints_round_robin_and_a_failed_one_goes_last() {
        let key = SigningKey::generate(elevate_core::keys::SigningAlg::ES256, "k").unwrap();
        let mut cfg = two_endpoint_config("http://a.test/token", "http://b.test/token");
        cfg.replica_endpoints.push("http://c.test/token".into());
        let c = TtsClient::new(cfg, key).unwrap();
        let urls = |turn| -> Vec<String> { c.order(turn).iter().map(|e| e.url.clone()).collect() };
        assert_eq!(
            urls(0),
            [
                "http://a.test/token",
                "http://b.test/token",
                "http://c.test/token"
            ]
        );
        assert_eq!(
            urls(4),
            [
                "http://b.test/token",
                "http://c.test/token",
                "http://a.test/token"
            ]
        );
        c.endpoints[1]
            .down_until_ms
            .store(c.now_ms() + 60_000, Ordering::Relaxed);
        assert_eq!(
            urls(1),
            [
                "http://c.test/token",
                "http://a.test/token",
                "http://b.test/token"
            ]
        );
        // the JWKS of each endpoint's origin, tried in turn
        let cfg = two_endpoint_config("http://a.test/token", "https://b.test/token");
        let mut mtls = cfg.clone();
        mtls.auth = ClientAuthMethod::TlsClientAuth;
        mtls.mtls_identity_pem = Some(b"unused before the scheme check".to_vec());
        mtls.token_endpoint = "https://a.test/token".into();
        mtls.replica_endpoints = vec!["http://b.test/token".into()];
        let key = SigningKey::generate(elevate_core::keys::SigningAlg::ES256, "k").unwrap();
        let e = TtsClient::new(mtls, key.clone()).unwrap_err();
        assert!(e.to_string().contains("https"), "every endpoint: {e}");
        let mut bad = cfg;
        bad.replica_endpoints = vec!["not a url".into()];
        assert!(matches!(
            TtsClient::new(bad, key),
            Err(ClientBuildError::Url { .. })
        ));
    }

    /// Answers every HTTP request with `400 {"error":"invalid_grant"}` and
    /// sends each request's body to the returned channel.
    async fn refusing_endpoint() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let body = loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break text[end + 4..end + 4 + len].to_string();
                        }
                    };
                    let _ = tx.send(body);
                    let answer = r#"{"error":"invalid_grant","error_description":"test"}"#;
                    let resp = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        (url, rx)
    }

    /// The `aud` of the client assertion in a token request body.
    fn assertion_aud(body: &str) -> String {
        let assertion = form_urlencoded::parse(body.as_bytes())
            .find(|(k, _)| k == "client_assertion")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        let claims: crate::assertion::AssertionClaims =
            elevate_core::jws::parse(&assertion, crate::assertion::ASSERTION_TYP)
                .unwrap()
                .claims()
                .unwrap();
        claims.aud.into_iter().next().unwrap()
    }

    #[tokio::test]
    async fn a_refused_connection_fails_over_to_the_next_endpoint_at_once() {
        crate::install_crypto_provider();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/token", l.local_addr().unwrap())
        };
        let (live, mut bodies) = refusing_endpoint().await;
        let key = SigningKey::generate(elevate_core::keys::SigningAlg::ES256, "k").unwrap();
        let c = TtsClient::new(two_endpoint_config(&closed, &live), key).unwrap();
        let scope = Scope::parse("s");
        for round in 0..4 {
            // One attempt (max_attempts = 1), whichever endpoint the turn starts at:
            // the refused connection goes on to the live endpoint within it.
            let e = c
                .exchange("ref", TOKEN_TYPE_JWT, &scope, &serde_json::json!({}))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, TokenError::Denied { code, .. } if code == "invalid_grant"),
                "round {round}: {e}"
            );
            let body = bodies.try_recv().unwrap();
            assert_eq!(assertion_aud(&body), live, "aud is the endpoint sent to");
        }
        assert!(bodies.try_recv().is_err(), "one request per exchange");
        // the closed endpoint is passed over now
        assert_eq!(c.order(0)[0].url, live);
        assert_eq!(c.breaker_state(), BreakerState::Closed);
    }
}
