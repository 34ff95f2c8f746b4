//! The HTTP face of the service (axum): the token endpoint, the JWKS, the
//! workload key directory, a health check and an optional loopback-only
//! key-rotation endpoint — over plain HTTP ([`RunningTts::start`]) or TLS
//! ([`RunningTts::start_tls`]), where each connection's verified client
//! certificate reaches the token endpoint (RFC 8705 `tls_client_auth`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::issuer::Issuer;
use super::key_files::KeyFileWatcher;
use super::tls::{ClientCertificate, ServerTls, TlsConnection};
use txn_token_client::protocol::{
    ClientAuthMethod, ErrorCode, ExchangeForm, JWKS_PATH, OAuthError, WORKLOAD_JWKS_PATH,
    check_form_content_type, sanitize_description,
};

/// Path of the key-rotation admin endpoint.
pub const ROTATE_PATH: &str = "/admin/rotate-keys";
/// Largest accepted token request body.
pub const MAX_BODY: usize = 64 * 1024;
/// The authentication scheme a 401 challenge names: the one client
/// authentication method the token endpoint supports (RFC 7523 client
/// assertion, `private_key_jwt` in the OAuth Token Endpoint Authentication
/// Methods registry). See the README for why not `Bearer`.
pub const CLIENT_AUTH_SCHEME: &str = "private_key_jwt";
/// The challenge scheme of RFC 8705 certificate authentication, named after
/// `private_key_jwt` when the service asks clients for certificates.
pub const TLS_CLIENT_AUTH_SCHEME: &str = "tls_client_auth";
/// Longest time a TLS handshake may take before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest `Authorization` scheme echoed back in a challenge.
const MAX_ECHOED_SCHEME: usize = 32;

#[derive(Clone)]
struct AppState {
    issuer: Arc<Issuer>,
    admin: bool,
}

fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// The RFC 6749 §5.2 response for `e`; the code rides along as a response
/// extension so the challenge layer can name it in `WWW-Authenticate`.
fn error_response(e: &OAuthError) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = no_store((status, axum::Json(e.body())).into_response());
    resp.extensions_mut().insert(e.code);
    resp
}

/// The token request as the endpoint receives it: the media type is checked
/// case-insensitively (RFC 9110 §8.3.1), then the urlencoded body is decoded.
fn token_request(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<ExchangeForm, OAuthError> {
    check_form_content_type(headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes))?;
    let body = body.map_err(|rej| {
        OAuthError::new(
            ErrorCode::InvalidRequest,
            format!("request body not read: {rej}"),
        )
    })?;
    ExchangeForm::from_urlencoded(&body)
}

async fn token(
    State(state): State<AppState>,
    tls: Option<Extension<TlsConnection>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let cert: Option<&ClientCertificate> = tls
        .as_ref()
        .and_then(|Extension(t)| t.client_certificate.as_deref());
    let result = match token_request(&headers, body) {
        Ok(f) => state.issuer.exchange_shared(&f, cert).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(issued) => no_store((StatusCode::OK, axum::Json(issued.response)).into_response()),
        Err(e) => error_response(&e),
    }
}

/// True for an RFC 9110 `token` (an auth-scheme).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The scheme of an `Authorization` request header, when it is a valid token.
fn authorization_scheme(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let scheme = text.trim_start().split(' ').next()?;
    (is_token(scheme) && scheme.len() <= MAX_ECHOED_SCHEME).then(|| scheme.to_string())
}

/// The `WWW-Authenticate` challenges of a 401 (RFC 9110 §11.6.1, RFC 6749 §5.2):
/// one naming [`CLIENT_AUTH_SCHEME`], preceded by one in the scheme the client
/// used when it tried the `Authorization` header (RFC 6749 §5.2 requires a
/// challenge "matching the authentication scheme used by the client").
/// `realm` is the trust domain; `code` is added as `error="..."`.
pub fn challenges(
    realm: &str,
    used_scheme: Option<&str>,
    code: Option<ErrorCode>,
) -> Vec<HeaderValue> {
    challenges_for(realm, used_scheme, code, &[ClientAuthMethod::PrivateKeyJwt])
}

/// As [`challenges`], naming each of `methods` (in order) instead of
/// `private_key_jwt` alone: a service that asks for client certificates
/// names `private_key_jwt` and [`TLS_CLIENT_AUTH_SCHEME`].
pub fn challenges_for(
    realm: &str,
    used_scheme: Option<&str>,
    code: Option<ErrorCode>,
    methods: &[ClientAuthMethod],
) -> Vec<HeaderValue> {
    let realm = sanitize_description(realm);
    let params = match code {
        Some(c) => format!("realm=\"{realm}\", error=\"{}\"", c.as_str()),
        None => format!("realm=\"{realm}\""),
    };
    let mut schemes = Vec::with_capacity(1 + methods.len());
    if let Some(used) = used_scheme.filter(|s| is_token(s))
        && !methods
            .iter()
            .any(|m| used.eq_ignore_ascii_case(m.as_str()))
    {
        schemes.push(used);
    }
    schemes.extend(methods.iter().map(|m| m.as_str()));
    schemes
        .into_iter()
        .filter_map(|scheme| HeaderValue::from_str(&format!("{scheme} {params}")).ok())
        .collect()
}

/// Adds the challenges to every 401 that has none, whichever route produced it.
async fn www_authenticate(State(issuer): State<Arc<Issuer>>, req: Request, next: Next) -> Response {
    let used = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(authorization_scheme);
    let mut resp = next.run(req).await;
    if resp.status() == StatusCode::UNAUTHORIZED
        && !resp.headers().contains_key(header::WWW_AUTHENTICATE)
    {
        let code = resp.extensions().get::<ErrorCode>().copied();
        let methods: &[ClientAuthMethod] = if issuer.offers_tls_client_auth() {
            &[
                ClientAuthMethod::PrivateKeyJwt,
                ClientAuthMethod::TlsClientAuth,
            ]
        } else {
            &[ClientAuthMethod::PrivateKeyJwt]
        };
        for value in challenges_for(issuer.trust_domain(), used.as_deref(), code, methods) {
            resp.headers_mut().append(header::WWW_AUTHENTICATE, value);
        }
    }
    resp
}

async fn jwks(State(state): State<AppState>) -> Response {
    let mut resp = axum::Json(state.issuer.jwks()).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    resp
}

/// The strong ETag of a key directory document: a hash of its bytes.
fn etag(body: &[u8]) -> String {
    format!("\"{}\"", &elevate_core::keys::sha256_hex(body)[..32])
}

/// True when an `If-None-Match` value names `tag` (or is `*`).
fn none_match(value: &HeaderValue, tag: &str) -> bool {
    value
        .to_str()
        .map(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/"))
                .any(|t| t == tag || t == "*")
        })
        .unwrap_or(false)
}

/// `GET /.well-known/workload-jwks`: every registered, non-suspended
/// workload's keys with their owners, `Cache-Control: public, max-age=N`
/// and an `ETag` (a matching `If-None-Match` gets `304 Not Modified`).
async fn workload_jwks(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let body = state.issuer.workload_jwks().to_string();
    let tag = etag(body.as_bytes());
    let max_age = state.issuer.settings().workload_jwks_max_age.as_secs();
    let mut resp = match headers.get(header::IF_NONE_MATCH) {
        Some(v) if none_match(v, &tag) => StatusCode::NOT_MODIFIED.into_response(),
        _ => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={max_age}")) {
        h.insert(header::CACHE_CONTROL, v);
    }
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    resp
}

async fn rotate(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !state.admin {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !peer.ip().is_loopback() {
        return StatusCode::FORBIDDEN.into_response();
    }
    match state.issuer.rotate_keys() {
        Ok(kid) => no_store(
            axum::Json(serde_json::json!({ "kid": kid, "jwks": state.issuer.jwks() }))
                .into_response(),
        ),
        Err(e) => {
            tracing::error!(error = %e, "key rotation failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// `GET /readyz`: 200 when the signing keys are loaded and, in fleet mode,
/// the shared store answers and this replica's copy of it is fresh; else 503.
async fn readyz(State(state): State<AppState>) -> Response {
    let issuer = &state.issuer;
    if issuer.published_kids().is_empty() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no signing key").into_response();
    }
    if let Some(f) = issuer.fleet() {
        let ping = f.store().ping().await;
        issuer
            .metrics()
            .store_call(ping.as_ref().map(|d| *d).unwrap_or_default(), ping.is_ok());
        if let Err(e) = ping {
            tracing::warn!(error = %e, "not ready: shared store unreachable");
            return (StatusCode::SERVICE_UNAVAILABLE, "shared store unreachable").into_response();
        }
        if !f.is_fresh() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "shared state not reloaded recently",
            )
                .into_response();
        }
    }
    "ready".into_response()
}

/// `GET /metrics`: the Prometheus text exposition.
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.issuer.metrics().render(),
    )
        .into_response()
}

/// The service's routes: `POST {token_path}`, `GET /.well-known/jwks.json`,
/// `GET /.well-known/workload-jwks`, `GET /healthz`, `GET /readyz`, `GET
/// /metrics`, the authenticated admin API ([`crate::admin`]) when the issuer
/// has one, else `POST /admin/rotate-keys` from loopback peers when `admin`
/// is true. Every 401 carries
/// `WWW-Authenticate` ([`challenges_for`]). On a TLS connection the token
/// endpoint reads the client certificate from the [`TlsConnection`] request
/// extension ([`RunningTts::start_tls`] inserts it).
pub fn router(issuer: Arc<Issuer>, admin: bool) -> Router {
    let path = issuer.settings().token_path.clone();
    let mut app = Router::new()
        .route(&path, post(token))
        .route(JWKS_PATH, get(jwks))
        .route(WORKLOAD_JWKS_PATH, get(workload_jwks))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let authenticated_admin = issuer.admin().is_some();
    if !authenticated_admin {
        app = app.route(ROTATE_PATH, post(rotate));
    }
    let app = app.with_state(AppState {
        issuer: issuer.clone(),
        admin,
    });
    let app = if authenticated_admin {
        app.merge(crate::admin::router(issuer.clone()))
    } else {
        app
    };
    app.layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            issuer.clone(),
            www_authenticate,
        ))
}

/// A background task aborted when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running HTTP or HTTPS service.
#[derive(Debug)]
pub struct RunningTts {
    addr: SocketAddr,
    scheme: &'static str,
    issuer: Arc<Issuer>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    background: Vec<AbortOnDrop>,
}

impl RunningTts {
    /// Binds `listen` (port 0 for an ephemeral port) and serves `issuer` in the background.
    ///
    /// # Errors
    ///
    /// Returns the I/O error if `listen` cannot be bound (address in use, no permission) or its
    /// local address cannot be read.
    pub async fn start(
        issuer: Arc<Issuer>,
        listen: SocketAddr,
        admin: bool,
    ) -> std::io::Result<Self> {
        Self::start_with(issuer, listen, admin, None).await
    }

    /// As [`start`](Self::start), over TLS: every connection is a TLS
    /// connection (no plain HTTP on this port). When `tls` has a client CA,
    /// each connection's verified client certificate is passed to the token
    /// endpoint and `tls_client_auth` is offered.
    ///
    /// # Errors
    ///
    /// The errors of [`start`](Self::start).
    pub async fn start_tls(
        issuer: Arc<Issuer>,
        listen: SocketAddr,
        admin: bool,
        tls: ServerTls,
    ) -> std::io::Result<Self> {
        Self::start_with(issuer, listen, admin, Some(tls)).await
    }

    async fn start_with(
        issuer: Arc<Issuer>,
        listen: SocketAddr,
        admin: bool,
        tls: Option<ServerTls>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let path = &issuer.settings().token_path;
        issuer.add_token_endpoint(format!("{scheme}://{addr}{path}"));
        if addr.ip().is_loopback() {
            issuer.add_token_endpoint(format!("{scheme}://localhost:{}{path}", addr.port()));
        }
        let app = router(issuer.clone(), admin);
        let (tx, rx) = oneshot::channel::<()>();
        let task = match tls {
            None => tokio::spawn(async move {
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
            }),
            Some(tls) => {
                if tls.client_auth() {
                    issuer.offer_tls_client_auth();
                }
                tokio::spawn(serve_tls(listener, tls, app, rx))
            }
        };
        tracing::info!(%addr, %scheme, token_path = %path, tls_client_auth = issuer.offers_tls_client_auth(), "transaction token service listening");
        Ok(RunningTts {
            addr,
            scheme,
            issuer,
            shutdown: Some(tx),
            task,
            background: Vec::new(),
        })
    }

    /// Reloads workload key files with `watcher` in the background for as
    /// long as the service runs (it stops at [`shutdown`](Self::shutdown) or
    /// when this is dropped).
    pub fn watch_key_files(&mut self, watcher: KeyFileWatcher) {
        if watcher.is_empty() || watcher.interval().is_zero() {
            return;
        }
        tracing::info!(files = watcher.len(), interval = ?watcher.interval(), "reloading workload key files when they change");
        self.background
            .push(AbortOnDrop(watcher.spawn(self.issuer.clone())));
    }

    /// Keeps the issuer's copy of the fleet's shared state current in the
    /// background (a no-op without `[store]`), for as long as the service runs.
    pub fn keep_fleet_current(&mut self) {
        if let Some(f) = self.issuer.fleet() {
            self.background
                .push(AbortOnDrop(f.spawn(self.issuer.clone())));
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, or `https://ADDR` over TLS.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The token endpoint URL.
    pub fn token_endpoint(&self) -> String {
        format!("{}{}", self.base_url(), self.issuer.settings().token_path)
    }

    /// The JWKS URL.
    pub fn jwks_url(&self) -> String {
        format!("{}{JWKS_PATH}", self.base_url())
    }

    /// The workload key directory URL.
    pub fn workload_jwks_url(&self) -> String {
        format!("{}{WORKLOAD_JWKS_PATH}", self.base_url())
    }

    /// The issuer behind the service (rotate keys, register workloads).
    pub fn issuer(&self) -> &Arc<Issuer> {
        &self.issuer
    }

    /// Stops accepting, finishes in-flight requests and waits for the server.
    ///
    /// # Errors
    ///
    /// Returns the server's I/O error if it failed while serving, or an error wrapping the join
    /// error if its task panicked or was cancelled.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.background.clear();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.map_err(std::io::Error::other)?
    }

    /// Runs until `signal` completes, then shuts down gracefully.
    ///
    /// # Errors
    ///
    /// The same as [`shutdown`](Self::shutdown).
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        signal.await;
        self.shutdown().await
    }
}

/// The TLS accept loop: each connection's handshake and requests run in a
/// task of their own (a slow handshake holds up nobody, and is dropped after
/// [`TLS_HANDSHAKE_TIMEOUT`]); every request carries the peer address
/// (`ConnectInfo`) and a [`TlsConnection`] with the verified client
/// certificate. At `shutdown` it stops accepting and waits for the open
/// connections to finish their requests.
async fn serve_tls(
    listener: TcpListener,
    tls: ServerTls,
    app: Router,
    mut shutdown: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;

    let acceptor = tokio_rustls::TlsAcceptor::from(tls.rustls_config().clone());
    let builder = Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let app = app.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let client_certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| Arc::new(ClientCertificate::from_der(leaf.clone().into_owned())));
            if let Some(c) = &client_certificate {
                tracing::debug!(%peer, cert_sha256 = %c.sha256_hex(), uri_sans = ?c.uri_sans(), "TLS client certificate verified");
            }
            let connection = TlsConnection { client_certificate };
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req.extensions_mut().insert(connection.clone());
                    tower::ServiceExt::oneshot(app.clone(), req)
                },
            );
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
