//! The HTTP face of the service (axum): the token endpoint, the JWKS, a
//! health check and an optional loopback-only key-rotation endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::issuer::Issuer;
use crate::protocol::{ErrorCode, ExchangeForm, JWKS_PATH, OAuthError};

/// Path of the key-rotation admin endpoint.
pub const ROTATE_PATH: &str = "/admin/rotate-keys";
/// Largest accepted token request body.
pub const MAX_BODY: usize = 64 * 1024;

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

fn error_response(e: &OAuthError) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    no_store((status, axum::Json(e.body())).into_response())
}

async fn token(
    State(state): State<AppState>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let pairs = match form {
        Ok(Form(p)) => p,
        Err(rej) => {
            return error_response(&OAuthError::new(
                ErrorCode::InvalidRequest,
                format!("body must be application/x-www-form-urlencoded: {rej}"),
            ));
        }
    };
    let result = ExchangeForm::from_pairs(pairs).and_then(|f| state.issuer.exchange(&f));
    match result {
        Ok(issued) => no_store((StatusCode::OK, axum::Json(issued.response)).into_response()),
        Err(e) => error_response(&e),
    }
}

async fn jwks(State(state): State<AppState>) -> Response {
    let mut resp = axum::Json(state.issuer.jwks()).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
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

/// The service's routes: `POST {token_path}`, `GET /.well-known/jwks.json`,
/// `GET /healthz`, and `POST /admin/rotate-keys` when `admin` is true.
pub fn router(issuer: Arc<Issuer>, admin: bool) -> Router {
    let path = issuer.settings().token_path.clone();
    Router::new()
        .route(&path, post(token))
        .route(JWKS_PATH, get(jwks))
        .route("/healthz", get(|| async { "ok" }))
        .route(ROTATE_PATH, post(rotate))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(AppState { issuer, admin })
}

/// A running HTTP service.
#[derive(Debug)]
pub struct RunningTts {
    addr: SocketAddr,
    issuer: Arc<Issuer>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningTts {
    /// Binds `listen` (port 0 for an ephemeral port) and serves `issuer` in the background.
    pub async fn start(
        issuer: Arc<Issuer>,
        listen: SocketAddr,
        admin: bool,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let path = &issuer.settings().token_path;
        issuer.add_token_endpoint(format!("http://{addr}{path}"));
        if addr.ip().is_loopback() {
            issuer.add_token_endpoint(format!("http://localhost:{}{path}", addr.port()));
        }
        let app = router(issuer.clone(), admin);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
        });
        tracing::info!(%addr, token_path = %path, "transaction token service listening");
        Ok(RunningTts {
            addr,
            issuer,
            shutdown: Some(tx),
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint URL.
    pub fn token_endpoint(&self) -> String {
        format!("{}{}", self.base_url(), self.issuer.settings().token_path)
    }

    /// The JWKS URL.
    pub fn jwks_url(&self) -> String {
        format!("{}{JWKS_PATH}", self.base_url())
    }

    /// The issuer behind the service (rotate keys, register workloads).
    pub fn issuer(&self) -> &Arc<Issuer> {
        &self.issuer
    }

    /// Stops accepting, finishes in-flight requests and waits for the server.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.map_err(std::io::Error::other)?
    }

    /// Runs until `signal` completes, then shuts down gracefully.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        signal.await;
        self.shutdown().await
    }
}
