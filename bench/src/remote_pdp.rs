//! The status-quo baseline of the benchmarks: a remote Policy Decision Point
//! reached over HTTP for every message, AuthZEN-style.
//!
//! [`router`] serves `POST /access/v1/evaluation` (one request) and
//! `POST /access/v1/evaluations` (a batch) in front of any
//! [`PolicyDecisionPoint`] (the benchmark wraps the same Cedar PDP as its
//! guarded rows use), and [`RemotePdp`] is the matching `reqwest` client
//! implementing [`PolicyDecisionPoint`], so a guard can use it instead of the
//! local PDP. It lives with the benchmark, not in `core`: the core depends on
//! no HTTP crate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use elevate_core::pdp::{AccessDecision, AccessRequest, EntityRef, PdpError, PolicyDecisionPoint};
use serde::{Deserialize, Serialize};

/// Path of the single-evaluation endpoint.
pub const EVALUATION_PATH: &str = "/access/v1/evaluation";
/// Path of the batch endpoint.
pub const EVALUATIONS_PATH: &str = "/access/v1/evaluations";

/// AuthZEN action: `{"name": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Action {
    /// The action name.
    pub name: String,
}

/// An AuthZEN evaluation request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    /// Who acts (`{type, id}`).
    pub subject: EntityRef,
    /// The action.
    pub action: Action,
    /// What is acted on (`{type, id}`).
    pub resource: EntityRef,
    /// Request context.
    #[serde(default)]
    pub context: serde_json::Value,
}

/// An AuthZEN evaluation response; the PDP's reasons ride in `context`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluationResponse {
    /// True only when permitted.
    pub decision: bool,
    /// `{"policies": [...], "errors": [...]}`.
    #[serde(default)]
    pub context: EvaluationReasons,
}

/// Why the PDP answered as it did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvaluationReasons {
    /// Policies that determined the answer.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Evaluation errors.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// A batch of evaluations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluations {
    /// The requests, answered in order.
    pub evaluations: Vec<Evaluation>,
}

/// The answers of a batch, in request order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluationsResponse {
    /// One response per request.
    pub evaluations: Vec<EvaluationResponse>,
}

impl From<&AccessRequest> for Evaluation {
    fn from(r: &AccessRequest) -> Self {
        Evaluation {
            subject: r.subject.clone(),
            action: Action {
                name: r.action.clone(),
            },
            resource: r.resource.clone(),
            context: r.context.clone(),
        }
    }
}

impl From<Evaluation> for AccessRequest {
    fn from(e: Evaluation) -> Self {
        AccessRequest {
            subject: e.subject,
            action: e.action.name,
            resource: e.resource,
            context: e.context,
        }
    }
}

impl From<AccessDecision> for EvaluationResponse {
    fn from(d: AccessDecision) -> Self {
        EvaluationResponse {
            decision: d.allowed,
            context: EvaluationReasons {
                policies: d.policies,
                errors: d.errors,
            },
        }
    }
}

impl From<EvaluationResponse> for AccessDecision {
    fn from(r: EvaluationResponse) -> Self {
        AccessDecision {
            allowed: r.decision,
            policies: r.context.policies,
            errors: r.context.errors,
        }
    }
}

fn pdp_error(e: PdpError) -> Response {
    let status = match e {
        PdpError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        // unavailable, and whatever a later core adds: try again later
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (
        status,
        axum::Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response()
}

fn bad_body(rej: JsonRejection) -> Response {
    pdp_error(PdpError::InvalidRequest(rej.body_text()))
}

async fn evaluation(
    State(pdp): State<Arc<dyn PolicyDecisionPoint>>,
    body: Result<axum::Json<Evaluation>, JsonRejection>,
) -> Response {
    let axum::Json(e) = match body {
        Ok(b) => b,
        Err(rej) => return bad_body(rej),
    };
    match pdp.evaluate(&e.into()).await {
        Ok(d) => axum::Json(EvaluationResponse::from(d)).into_response(),
        Err(e) => pdp_error(e),
    }
}

async fn evaluations(
    State(pdp): State<Arc<dyn PolicyDecisionPoint>>,
    body: Result<axum::Json<Evaluations>, JsonRejection>,
) -> Response {
    let axum::Json(batch) = match body {
        Ok(b) => b,
        Err(rej) => return bad_body(rej),
    };
    let reqs: Vec<AccessRequest> = batch.evaluations.into_iter().map(Into::into).collect();
    match pdp.evaluate_all(&reqs).await {
        Ok(ds) => axum::Json(EvaluationsResponse {
            evaluations: ds.into_iter().map(Into::into).collect(),
        })
        .into_response(),
        Err(e) => pdp_error(e),
    }
}

/// The AuthZEN routes in front of `pdp`.
pub fn router(pdp: Arc<dyn PolicyDecisionPoint>) -> Router {
    Router::new()
        .route(EVALUATION_PATH, post(evaluation))
        .route(EVALUATIONS_PATH, post(evaluations))
        .with_state(pdp)
}

/// Serves `pdp` on `listen` (port 0: ephemeral) in the background; returns the bound address.
pub async fn serve(
    pdp: Arc<dyn PolicyDecisionPoint>,
    listen: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(pdp);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "remote PDP server ended");
        }
    });
    Ok((addr, task))
}

/// A [`PolicyDecisionPoint`] that asks a remote AuthZEN PDP over HTTP (keep-alive).
///
/// Transport failures, timeouts and 5xx are `Unavailable` (Retry); 4xx is
/// `InvalidRequest` (Deny); an answer that does not decode is `Unavailable`,
/// never a permit.
#[derive(Debug, Clone)]
pub struct RemotePdp {
    http: reqwest::Client,
    base: String,
    version: String,
}

impl RemotePdp {
    /// A client for the PDP at `base` (e.g. `http://127.0.0.1:8181`); `version`
    /// is what decision records name as the policy version.
    pub fn new(base: impl Into<String>, version: impl Into<String>) -> reqwest::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(RemotePdp {
            http,
            base: base.into().trim_end_matches('/').to_string(),
            version: version.into(),
        })
    }

    async fn post<B: Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, PdpError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(|e| PdpError::Unavailable(e.to_string()))?;
        let status = resp.status();
        if status.is_client_error() {
            let text = resp.text().await.unwrap_or_default();
            return Err(PdpError::InvalidRequest(format!("{status}: {text}")));
        }
        if !status.is_success() {
            return Err(PdpError::Unavailable(format!(
                "remote PDP answered {status}"
            )));
        }
        resp.json::<R>()
            .await
            .map_err(|e| PdpError::Unavailable(format!("undecodable PDP answer: {e}")))
    }
}

#[async_trait::async_trait]
impl PolicyDecisionPoint for RemotePdp {
    async fn evaluate(&self, req: &AccessRequest) -> Result<AccessDecision, PdpError> {
        let r: EvaluationResponse = self.post(EVALUATION_PATH, &Evaluation::from(req)).await?;
        Ok(r.into())
    }

    async fn evaluate_all(&self, reqs: &[AccessRequest]) -> Result<Vec<AccessDecision>, PdpError> {
        let batch = Evaluations {
            evaluations: reqs.iter().map(Evaluation::from).collect(),
        };
        let r: EvaluationsResponse = self.post(EVALUATIONS_PATH, &batch).await?;
        if r.evaluations.len() != reqs.len() {
            return Err(PdpError::Unavailable(format!(
                "remote PDP answered {} of {} evaluations",
                r.evaluations.len(),
                reqs.len()
            )));
        }
        Ok(r.evaluations.into_iter().map(Into::into).collect())
    }

    fn policy_version(&self) -> String {
        self.version.clone()
    }
}
