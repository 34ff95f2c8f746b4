//! The authenticated admin API (`[admin]`): register or update, revoke,
//! suspend and reinstate workloads, rotate the signing keys, list the state
//! and the audit log — over the service's own listener, at `/admin/…`.
//!
//! **Authentication.** Every call carries `Authorization: Bearer <admin
//! assertion>`: a JWS (`typ` [`ADMIN_TYP`]) signed by an operator key listed
//! in `[admin] operators`, with `iss` = `sub` = the operator id, `aud` =
//! the admin base URL (`BASE/admin`, BASE being any URL the token endpoint
//! is reachable under, e.g. `public_url`), `iat`/`exp` at most
//! `max_assertion_secs` apart, a fresh `jti` (single-use: claimed in the
//! shared store in fleet mode, so a captured assertion cannot be replayed at
//! another replica either), and the request it authorizes: `htm` (method),
//! `htu` (path) and `body_sha256` (hex SHA-256 of the body). Anything else is
//! 401; the assertion is logged by SHA-256, never as is. No trust comes from
//! the peer address.
//!
//! **Audit.** Every accepted change is written to the audit log — in fleet
//! mode in the same statement as the change itself (`tts_audit`), in the
//! embedded mode in memory — and logged (target `elevate_tts::audit`).

// The handlers' helpers return the refusal itself (an axum `Response`) as
// their error: built once per refused call, never on a hot path.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use elevate_core::ctxref::{MAX_LEEWAY, unix_now};
use elevate_core::jws::{self, JwsError};
use elevate_core::keys::{KeySet, SigningKey, sha256_hex};
use elevate_core::scope::Scope;
use jsonwebtoken::jwk::Jwk;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use txn_token_client::assertion::AssertionClaims;
use txn_token_client::protocol::ClientAuthMethod;

use crate::config::{AdminConfig, ConfigError, resolve};
use crate::fleet::record_of;
use crate::issuer::Issuer;
use crate::key_files::{jwks_from_value, read_key_file};
use crate::registry::WorkloadEntry;
use crate::store::{AuditEntry, AuditRecord, now_ms};

/// `typ` of admin assertions.
pub const ADMIN_TYP: &str = "elevate-admin+jwt";
/// Path prefix of the admin API.
pub const ADMIN_PREFIX: &str = "/admin";
/// Register or update a workload (`POST`, JSON [`RegisterRequest`]).
pub const WORKLOADS_PATH: &str = "/admin/workloads";
/// Revoke a workload (`POST`, `{"id": …}`).
pub const REVOKE_PATH: &str = "/admin/workloads/revoke";
/// Suspend a workload (`POST`, `{"id": …}`).
pub const SUSPEND_PATH: &str = "/admin/workloads/suspend";
/// Reinstate a workload (`POST`, `{"id": …}`).
pub const REINSTATE_PATH: &str = "/admin/workloads/reinstate";
/// The registry and signing keys (`GET`).
pub const STATE_PATH: &str = "/admin/state";
/// The audit log (`GET`, `?limit=N`).
pub const AUDIT_PATH: &str = "/admin/audit";
/// Most audit entries kept in memory (embedded mode).
const MAX_MEMORY_AUDIT: usize = 10_000;

/// Claims of an admin assertion: those of a client assertion (`iss` = `sub`
/// = the operator id, `aud` = the admin base URL, a single-use `jti`, `iat`,
/// `exp`, optional `nbf`; the same time-window check,
/// [`AssertionClaims::check_time_window`]) and the request it authorizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminClaims {
    /// The operator (`iss`, `sub`), the admin base URL (`aud`), `jti` and the time window.
    #[serde(flatten)]
    pub assertion: AssertionClaims,
    /// HTTP method of the request it authorizes.
    pub htm: String,
    /// Path of the request it authorizes.
    pub htu: String,
    /// Hex SHA-256 of the request body.
    pub body_sha256: String,
}

/// Signs an admin assertion for one request (`method`, `path`, `body`) to
/// the admin API at `admin_base` (`BASE/admin`), as `operator`.
///
/// # Errors
///
/// Returns [`JwsError`] if the claims cannot be signed with `key`.
pub fn sign_admin_assertion(
    key: &SigningKey,
    operator: &str,
    admin_base: &str,
    method: &str,
    path: &str,
    body: &[u8],
    ttl: Duration,
) -> Result<String, JwsError> {
    let now = unix_now();
    let claims = AdminClaims {
        assertion: AssertionClaims {
            iss: operator.to_string(),
            sub: operator.to_string(),
            aud: vec![admin_base.to_string()],
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            exp: now + ttl.as_secs().max(1) as i64,
            nbf: None,
        },
        htm: method.to_string(),
        htu: path.to_string(),
        body_sha256: sha256_hex(body),
    };
    jws::sign(key, ADMIN_TYP, &claims)
}

/// The admin API's state: the operators' keys, the local seen-set (embedded
/// mode) and the in-memory audit log (embedded mode).
#[derive(Debug)]
pub struct AdminApi {
    operators: KeySet,
    max_lifetime: Duration,
    seen: Mutex<HashMap<(String, String), i64>>,
    audit: Mutex<Vec<AuditEntry>>,
}

/// Register or update a workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Workload id.
    pub id: String,
    /// Its public key(s): one JWK or a JWKS (`{"keys": [...]}`).
    pub jwks: serde_json::Value,
    /// Scopes it may be granted.
    #[serde(default)]
    pub allowed_scopes: Vec<String>,
    /// Client authentication methods (default `private_key_jwt` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_methods: Option<Vec<ClientAuthMethod>>,
}

/// Names a workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadId {
    /// Workload id.
    pub id: String,
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

/// The authenticated operator of one call.
#[derive(Debug)]
struct Operator {
    id: String,
    assertion_sha256: String,
}

fn json_error(status: StatusCode, error: &str, description: impl Into<String>) -> Response {
    let mut resp = (
        status,
        axum::Json(serde_json::json!({ "error": error, "error_description": description.into() })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn unauthorized(realm: &str, why: &str) -> Response {
    let mut resp = json_error(StatusCode::UNAUTHORIZED, "invalid_token", why);
    let realm = txn_token_client::protocol::sanitize_description(realm);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "Bearer realm=\"{realm}\", error=\"invalid_token\""
    )) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

impl AdminApi {
    /// Loads the operators' public keys (`base` resolves `jwk_file`).
    ///
    /// # Errors
    ///
    /// Returns [`ConfigError::Parse`] naming `[admin] operator ID` if its key does not parse or
    /// is refused (private material, no `kid`, a `kid` used twice); [`ConfigError::Io`] if its
    /// `jwk_file` cannot be read; [`ConfigError::Invalid`] if it has both or neither of
    /// `public_jwk` and `jwk_file`.
    pub fn from_config(cfg: &AdminConfig, base: &Path) -> Result<Self, ConfigError> {
        let mut operators = KeySet::new();
        for o in &cfg.operators {
            let what = format!("[admin] operator {:?}", o.id);
            let jwks = match (&o.public_jwk, &o.jwk_file) {
                (Some(v), None) => {
                    jwks_from_value(v.clone()).map_err(|reason| ConfigError::Parse {
                        path: what.clone(),
                        reason,
                    })?
                }
                (None, Some(p)) => read_key_file(&resolve(base, p))?,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "{what} needs exactly one of public_jwk or jwk_file"
                    )));
                }
            };
            for jwk in &jwks {
                if let Some(kid) = jwk.common.key_id.as_deref()
                    && operators.get(kid).is_some()
                {
                    return Err(ConfigError::Parse {
                        path: what.clone(),
                        reason: format!(
                            "kid {kid:?} is used by another operator key: give each key its own kid"
                        ),
                    });
                }
                operators
                    .insert_jwk_owned(jwk, Some(o.id.clone()))
                    .map_err(|e| ConfigError::Parse {
                        path: what.clone(),
                        reason: e.to_string(),
                    })?;
            }
        }
        Ok(AdminApi {
            operators,
            max_lifetime: Duration::from_secs(cfg.max_assertion_secs),
            seen: Mutex::new(HashMap::new()),
            audit: Mutex::new(Vec::new()),
        })
    }

    /// Checks the admin assertion of one request.
    async fn authenticate(
        &self,
        issuer: &Issuer,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Operator, Response> {
        let realm = issuer.trust_domain();
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            tracing::warn!(target: "elevate_tts::audit", path = %uri.path(), "admin call without credentials refused");
            return Err(unauthorized(
                realm,
                "admin assertion required (Authorization: Bearer)",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .unwrap_or_default();
        let fp = sha256_hex(token.as_bytes());
        let refuse = |why: String| {
            tracing::warn!(target: "elevate_tts::audit", path = %uri.path(), assertion_sha256 = %fp, reason = %why, "admin call refused");
            unauthorized(realm, &why)
        };
        let claims = self
            .check(issuer, method, uri, token, body)
            .map_err(&refuse)?
            .assertion;
        let leeway = MAX_LEEWAY.as_secs() as i64;
        let first = match issuer.fleet() {
            Some(f) => {
                let t = std::time::Instant::now();
                let r = f
                    .store()
                    .claim_jti("admin", &claims.iss, &claims.jti, claims.exp + leeway)
                    .await;
                issuer.metrics().store_call(t.elapsed(), r.is_ok());
                match r {
                    Ok(first) => first,
                    Err(e) => {
                        tracing::error!(error = %e, "admin jti claim failed: refusing");
                        return Err(json_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "temporarily_unavailable",
                            "shared state unavailable; retry",
                        ));
                    }
                }
            }
            None => {
                let now = unix_now();
                let mut seen = self.seen.lock();
                seen.retain(|_, until| *until > now);
                seen.insert(
                    (claims.iss.clone(), claims.jti.clone()),
                    claims.exp + leeway,
                )
                .is_none()
            }
        };
        if !first {
            return Err(refuse("admin assertion replayed".into()));
        }
        Ok(Operator {
            id: claims.iss,
            assertion_sha256: fp.clone(),
        })
    }

    fn check(
        &self,
        issuer: &Issuer,
        method: &Method,
        uri: &Uri,
        token: &str,
        body: &[u8],
    ) -> Result<AdminClaims, String> {
        if token.is_empty() {
            return Err("admin assertion required (Authorization: Bearer)".into());
        }
        let parsed = jws::parse(token, ADMIN_TYP).map_err(|e| e.to_string())?;
        let key = parsed.verify(&self.operators).map_err(|e| e.to_string())?;
        let claims: AdminClaims = parsed.claims().map_err(|e| e.to_string())?;
        let a = &claims.assertion;
        if a.iss != a.sub || key.owner.as_deref() != Some(a.iss.as_str()) {
            return Err(format!(
                "issuer {:?} is not the operator owning the signing key",
                a.iss
            ));
        }
        let audiences = issuer.admin_audiences();
        if !a.aud.iter().any(|x| audiences.contains(x)) {
            return Err(format!("aud {:?} is not this admin endpoint", a.aud));
        }
        a.check_time_window(unix_now(), MAX_LEEWAY, self.max_lifetime)
            .map_err(|e| e.to_string())?;
        if a.jti.is_empty() {
            return Err("empty jti".into());
        }
        if !claims.htm.eq_ignore_ascii_case(method.as_str()) || claims.htu != uri.path() {
            return Err(format!(
                "assertion is for {} {}, not this request",
                claims.htm, claims.htu
            ));
        }
        if claims.body_sha256 != sha256_hex(body) {
            return Err("body_sha256 does not match the request body".into());
        }
        Ok(claims)
    }

    fn record(
        &self,
        issuer: &Issuer,
        op: &Operator,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> AuditRecord {
        AuditRecord {
            operator: op.id.clone(),
            replica: issuer
                .fleet()
                .map(|f| f.replica().to_string())
                .unwrap_or_else(|| "embedded".into()),
            action: action.to_string(),
            target: target.to_string(),
            detail: serde_json::json!({ "assertion_sha256": op.assertion_sha256, "request": detail }),
        }
    }

    /// Writes an accepted change to the in-memory audit log (embedded mode)
    /// and to the log (both modes).
    fn audited(&self, issuer: &Issuer, rec: &AuditRecord) {
        tracing::info!(target: "elevate_tts::audit", operator = %rec.operator, replica = %rec.replica, action = %rec.action, target_id = %rec.target, detail = %rec.detail, "admin change");
        if issuer.fleet().is_none() {
            let mut log = self.audit.lock();
            let seq = log.last().map(|e| e.seq + 1).unwrap_or(1);
            log.push(AuditEntry {
                seq,
                at_ms: now_ms(),
                operator: rec.operator.clone(),
                replica: rec.replica.clone(),
                action: rec.action.clone(),
                target: rec.target.clone(),
                detail: rec.detail.clone(),
            });
            if log.len() > MAX_MEMORY_AUDIT {
                let extra = log.len() - MAX_MEMORY_AUDIT;
                log.drain(..extra);
            }
        }
    }
}

fn store_unavailable(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "admin change not written to the shared store");
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "shared state unavailable; nothing changed, retry",
    )
}

fn ok(v: serde_json::Value) -> Response {
    let mut resp = axum::Json(v).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("body: {e}"),
        )
    })
}

/// The keys of a register request, checked: parseable, public, with `kid`,
/// none owned by another workload.
fn checked_keys(issuer: &Issuer, req: &RegisterRequest) -> Result<Vec<Jwk>, Response> {
    let bad = |why: String| json_error(StatusCode::BAD_REQUEST, "invalid_request", why);
    let jwks = jwks_from_value(req.jwks.clone()).map_err(|e| bad(format!("jwks: {e}")))?;
    let mut trial = KeySet::new();
    for jwk in &jwks {
        let Some(kid) = jwk.common.key_id.as_deref() else {
            return Err(bad("jwks: a key without kid".into()));
        };
        if trial.get(kid).is_some() {
            return Err(bad(format!("jwks: kid {kid:?} listed twice")));
        }
        trial
            .insert_jwk_owned(jwk, Some(req.id.clone()))
            .map_err(|e| bad(format!("jwks: {e}")))?;
        if let Some(owner) = issuer.workload_entries().iter().find(|e| {
            e.id != req.id
                && e.jwks
                    .iter()
                    .any(|j| j.common.key_id.as_deref() == Some(kid))
        }) {
            return Err(bad(format!("kid {kid:?} is registered to {}", owner.id)));
        }
    }
    if req.id.is_empty() {
        return Err(bad("id is empty".into()));
    }
    Ok(jwks)
}

async fn admin_call(
    State(issuer): State<Arc<Issuer>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    query: Query<AuditQuery>,
    body: Bytes,
) -> Response {
    let Some(api) = issuer.admin().cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let op = match api
        .authenticate(&issuer, &method, &uri, &headers, &body)
        .await
    {
        Ok(op) => op,
        Err(resp) => return resp,
    };
    match (method.as_str(), uri.path()) {
        ("POST", WORKLOADS_PATH) => register(&api, &issuer, &op, &body).await,
        ("POST", REVOKE_PATH) => change(&api, &issuer, &op, &body, "revoke").await,
        ("POST", SUSPEND_PATH) => change(&api, &issuer, &op, &body, "suspend").await,
        ("POST", REINSTATE_PATH) => change(&api, &issuer, &op, &body, "reinstate").await,
        ("POST", crate::http::ROTATE_PATH) => rotate(&api, &issuer, &op).await,
        ("GET", STATE_PATH) => ok(state_of(&issuer)),
        ("GET", AUDIT_PATH) => audit_log(&api, &issuer, query.limit.unwrap_or(100)).await,
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such admin call"),
    }
}

async fn register(api: &AdminApi, issuer: &Issuer, op: &Operator, body: &[u8]) -> Response {
    let req: RegisterRequest = match parse_body(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let jwks = match checked_keys(issuer, &req) {
        Ok(j) => j,
        Err(resp) => return resp,
    };
    let kids: Vec<String> = jwks
        .iter()
        .filter_map(|j| j.common.key_id.clone())
        .collect();
    let rec = api.record(
        issuer,
        op,
        "register",
        &req.id,
        serde_json::json!({ "kids": kids, "allowed_scopes": req.allowed_scopes, "auth_methods": req.auth_methods }),
    );
    let entry = WorkloadEntry {
        id: req.id.clone(),
        jwks: jwks.clone(),
        allowed: req.allowed_scopes.iter().collect::<Scope>(),
        auth_methods: req.auth_methods.clone(),
        suspended: false,
    };
    match issuer.fleet() {
        Some(f) => {
            if let Err(e) = f.store().put_workload(&record_of(&entry), &rec).await {
                return store_unavailable(e);
            }
            if let Err(e) = f.refresh(issuer).await {
                tracing::warn!(error = %e, "reload after a change failed; the poll catches up");
            }
        }
        None => {
            let Some(first) = jwks.first() else {
                return json_error(StatusCode::BAD_REQUEST, "invalid_request", "jwks: no keys");
            };
            let r = issuer
                .register_workload(&req.id, first, &entry.allowed)
                .and_then(|()| issuer.replace_workload_keys(&req.id, &jwks));
            if let Err(e) = r {
                return json_error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
            }
            let methods = req
                .auth_methods
                .clone()
                .unwrap_or_else(|| vec![ClientAuthMethod::PrivateKeyJwt]);
            issuer.set_workload_auth_methods(&req.id, &methods);
            issuer.reinstate_workload(&req.id);
        }
    }
    api.audited(issuer, &rec);
    ok(serde_json::json!({ "registered": req.id, "kids": kids }))
}

async fn change(
    api: &AdminApi,
    issuer: &Issuer,
    op: &Operator,
    body: &[u8],
    action: &str,
) -> Response {
    let req: WorkloadId = match parse_body(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let rec = api.record(issuer, op, action, &req.id, serde_json::json!({}));
    let changed = match issuer.fleet() {
        Some(f) => {
            let r = match action {
                "revoke" => f.store().revoke_workload(&req.id, &rec).await,
                "suspend" => f.store().set_suspended(&req.id, true, &rec).await,
                _ => f.store().set_suspended(&req.id, false, &rec).await,
            };
            let changed = match r {
                Ok(c) => c,
                Err(e) => return store_unavailable(e),
            };
            if changed && let Err(e) = f.refresh(issuer).await {
                tracing::warn!(error = %e, "reload after a change failed; the poll catches up");
            }
            changed
        }
        None => match action {
            "revoke" => issuer.revoke_workload(&req.id),
            "suspend" => issuer.is_trusted_workload(&req.id) && issuer.suspend_workload(&req.id),
            _ => issuer.reinstate_workload(&req.id),
        },
    };
    if !changed {
        return json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "workload {:?} is not registered (or already so): nothing changed",
                req.id
            ),
        );
    }
    api.audited(issuer, &rec);
    ok(serde_json::json!({ "action": action, "id": req.id }))
}

async fn rotate(api: &AdminApi, issuer: &Issuer, op: &Operator) -> Response {
    let rec = api.record(issuer, op, "rotate-keys", "", serde_json::json!({}));
    let (kid, not_before_ms) = match issuer.fleet() {
        Some(f) => match f.rotate(issuer, &rec).await {
            Ok(r) => r,
            Err(e) => return store_unavailable(e),
        },
        None => match issuer.rotate_keys() {
            Ok(kid) => (kid, now_ms()),
            Err(e) => {
                tracing::error!(error = %e, "key rotation failed");
                return json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "key rotation failed",
                );
            }
        },
    };
    let mut rec = rec;
    rec.target = kid.clone();
    api.audited(issuer, &rec);
    ok(serde_json::json!({ "kid": kid, "not_before_ms": not_before_ms, "jwks": issuer.jwks() }))
}

fn state_of(issuer: &Issuer) -> serde_json::Value {
    let workloads: Vec<serde_json::Value> = issuer
        .workload_entries()
        .iter()
        .map(|e| {
            serde_json::json!({
                "id": e.id,
                "kids": e.jwks.iter().filter_map(|j| j.common.key_id.clone()).collect::<Vec<_>>(),
                "allowed_scopes": e.allowed.iter().collect::<Vec<_>>(),
                "auth_methods": e.auth_methods.as_ref().map(|m| m.iter().map(|x| x.as_str()).collect::<Vec<_>>()),
                "suspended": e.suspended,
            })
        })
        .collect();
    serde_json::json!({
        "trust_domain": issuer.trust_domain(),
        "replica": issuer.fleet().map(|f| f.replica().to_string()),
        "workloads": workloads,
        "signing": { "current": issuer.current_kid(), "published": issuer.published_kids() },
    })
}

async fn audit_log(api: &AdminApi, issuer: &Issuer, limit: i64) -> Response {
    let limit = limit.clamp(1, 10_000);
    let entries = match issuer.fleet() {
        Some(f) => match f.store().audit_log(limit).await {
            Ok(e) => e,
            Err(e) => return store_unavailable(e),
        },
        None => {
            let log = api.audit.lock();
            let skip = log.len().saturating_sub(limit as usize);
            log[skip..].to_vec()
        }
    };
    ok(serde_json::json!({ "entries": entries }))
}

/// The admin routes, served when `[admin]` is configured
/// ([`Issuer::set_admin`]); each answers 404 otherwise.
pub fn router(issuer: Arc<Issuer>) -> Router {
    Router::new()
        .route(WORKLOADS_PATH, post(admin_call))
        .route(REVOKE_PATH, post(admin_call))
        .route(SUSPEND_PATH, post(admin_call))
        .route(REINSTATE_PATH, post(admin_call))
        .route(crate::http::ROTATE_PATH, post(admin_call))
        .route(STATE_PATH, get(admin_call))
        .route(AUDIT_PATH, get(admin_call))
        .with_state(issuer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use elevate_core::keys::SigningAlg;

    #[test]
    fn admin_claims_are_flat_on_the_wire() {
        let key = SigningKey::generate(SigningAlg::ES256, "op-1").unwrap();
        let token = sign_admin_assertion(
            &key,
            "ops:alice",
            "http://tts/admin",
            "POST",
            REVOKE_PATH,
            b"{}",
            Duration::from_secs(30),
        )
        .unwrap();
        let parsed = jws::parse(&token, ADMIN_TYP).unwrap();
        let raw: serde_json::Value = parsed.claims().unwrap();
        for k in [
            "iss",
            "sub",
            "aud",
            "jti",
            "iat",
            "exp",
            "htm",
            "htu",
            "body_sha256",
        ] {
            assert!(raw.get(k).is_some(), "{k} missing in {raw}");
        }
        assert!(
            raw.get("assertion").is_none() && raw.get("nbf").is_none(),
            "{raw}"
        );
        // a single-string aud and an nbf parse as a client assertion's would
        let mut edited = raw.clone();
        edited["aud"] = serde_json::json!("http://tts/admin");
        edited["nbf"] = serde_json::json!(5);
        let c: AdminClaims = serde_json::from_value(edited).unwrap();
        assert_eq!(c.assertion.aud, vec!["http://tts/admin".to_string()]);
        assert_eq!(c.assertion.nbf, Some(5));
        assert_eq!(c.htu, REVOKE_PATH);
        assert_eq!(c.body_sha256, sha256_hex(b"{}"));
    }
}
