//! The consume-side pipeline, defined once for every broker:
//! credentials scan → verify reference → replay check → map action →
//! acquire Txn-Token → trust elevation at the PDP → record → verdict.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::AuthContext;
use crate::ctxref::{
    CTX_REF_HEADER, ContextRefClaims, ContextRefVerifier, SubjectKind, VerifiedRef,
};
use crate::decision::{DecisionRecord, DecisionSink};
use crate::message::InboundMessage;
use crate::pdp::{
    ElevationRequest, EntityRef, PdpError, PolicyDecisionPoint, USER_TYPE, WORKLOAD_TYPE,
};
use crate::replay::{ReplayGuard, Seen};
use crate::scope::Scope;
use crate::strip::CredentialPolicy;
use crate::token::{TokenError, TokenRequest, TokenSource, TxnToken};
use crate::verdict::{Reason, Verdict};

/// Maps a message to the action its handler performs and the resource it acts on.
pub trait ActionMapper: Send + Sync {
    /// The (action, resource) pair for trust elevation; an error denies the message.
    fn map(
        &self,
        msg: &InboundMessage,
        claims: &ContextRefClaims,
    ) -> Result<(String, EntityRef), String>;
}

/// One fixed action per consumer; the resource is the destination, typed `resource_type`.
#[derive(Debug, Clone)]
pub struct FixedAction {
    /// Action name (e.g. `invoice.create`).
    pub action: String,
    /// Cedar type of the resource (e.g. `Queue`).
    pub resource_type: String,
}

impl FixedAction {
    /// A fixed action on the message's destination.
    pub fn new(action: impl Into<String>, resource_type: impl Into<String>) -> Self {
        FixedAction {
            action: action.into(),
            resource_type: resource_type.into(),
        }
    }
}

impl ActionMapper for FixedAction {
    fn map(
        &self,
        msg: &InboundMessage,
        _: &ContextRefClaims,
    ) -> Result<(String, EntityRef), String> {
        Ok((
            self.action.clone(),
            EntityRef::new(&self.resource_type, &msg.destination),
        ))
    }
}

impl<F> ActionMapper for F
where
    F: Fn(&InboundMessage, &ContextRefClaims) -> Result<(String, EntityRef), String> + Send + Sync,
{
    fn map(
        &self,
        msg: &InboundMessage,
        claims: &ContextRefClaims,
    ) -> Result<(String, EntityRef), String> {
        self(msg, claims)
    }
}

/// The guard's answer for one delivery.
#[derive(Debug, Clone)]
pub struct GuardDecision {
    /// Decision id (also in the record and any dead letter).
    pub decision_id: String,
    /// Verdict.
    pub verdict: Verdict,
    /// Reason.
    pub reason: Reason,
    /// Detail for operators (never a token).
    pub detail: Option<String>,
    /// Present exactly when the verdict is Permit.
    pub auth: Option<AuthContext>,
    /// Server-suggested wait for a Retry.
    pub retry_after: Option<Duration>,
}

/// The consume-side guard for one consuming workload.
pub struct Guard {
    workload: String,
    verifier: ContextRefVerifier,
    tokens: Arc<dyn TokenSource>,
    pdp: Arc<dyn PolicyDecisionPoint>,
    log: Arc<dyn DecisionSink>,
    credentials: CredentialPolicy,
    actions: Arc<dyn ActionMapper>,
    replay: Option<Arc<dyn ReplayGuard>>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("workload", &self.workload)
            .finish_non_exhaustive()
    }
}

/// Intermediate facts gathered while deciding, for the record.
#[derive(Default)]
struct Facts {
    reference: Option<VerifiedRef>,
    action: Option<String>,
    resource: Option<EntityRef>,
    token: Option<TxnToken>,
}

struct Rejection {
    reason: Reason,
    detail: Option<String>,
    retry_after: Option<Duration>,
}

impl Rejection {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: Some(detail.into()),
            retry_after: None,
        }
    }
}

impl Guard {
    /// A guard for consuming workload `workload` (its id is also the expected `aud`
    /// of references and the `req_wl` of Txn-Tokens).
    pub fn new(
        workload: impl Into<String>,
        verifier: ContextRefVerifier,
        tokens: Arc<dyn TokenSource>,
        pdp: Arc<dyn PolicyDecisionPoint>,
        log: Arc<dyn DecisionSink>,
        actions: Arc<dyn ActionMapper>,
    ) -> Self {
        Guard {
            workload: workload.into(),
            verifier,
            tokens,
            pdp,
            log,
            credentials: CredentialPolicy::default(),
            actions,
            replay: None,
        }
    }

    /// Uses a non-default credential policy for the consumer-side scan.
    pub fn with_credentials(mut self, credentials: CredentialPolicy) -> Self {
        self.credentials = credentials;
        self
    }

    /// Enables replay protection with a seen-set.
    pub fn with_replay_guard(mut self, replay: Arc<dyn ReplayGuard>) -> Self {
        self.replay = Some(replay);
        self
    }

    /// The consuming workload id.
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// The credential policy (dead letters are stripped with it).
    pub fn credentials(&self) -> &CredentialPolicy {
        &self.credentials
    }

    /// The decision sink (the settlement loop records dispositions to it).
    pub fn decision_log(&self) -> &Arc<dyn DecisionSink> {
        &self.log
    }

    /// The policy version in force.
    pub fn policy_version(&self) -> String {
        self.pdp.policy_version()
    }

    /// Decides one delivery and records the decision before returning it.
    pub async fn decide(&self, msg: &InboundMessage, attempt: u32) -> GuardDecision {
        let started = Instant::now();
        let decision_id = uuid::Uuid::now_v7().to_string();
        let mut facts = Facts::default();
        let result = self.evaluate(msg, &decision_id, &mut facts).await;
        let (reason, detail, retry_after, auth) = match result {
            Ok(auth) => (Reason::Permitted, None, None, Some(auth)),
            Err(r) => (r.reason, r.detail, r.retry_after, None),
        };
        let record = self.record(
            msg,
            &decision_id,
            reason,
            detail.clone(),
            attempt,
            &facts,
            started,
        );
        if let Err(e) = self.log.record(&record) {
            tracing::error!(target: "elevate::decision", decision_id = %decision_id, error = %e, "decision log write failed: not dispatching");
            return GuardDecision {
                decision_id,
                verdict: Verdict::Retry,
                reason: Reason::DecisionLogUnavailable,
                detail: Some(e.to_string()),
                auth: None,
                retry_after: None,
            };
        }
        GuardDecision {
            decision_id,
            verdict: reason.verdict(),
            reason,
            detail,
            auth,
            retry_after,
        }
    }

    /// Writes a disposition record (retries exhausted, handler failed) for a message.
    pub fn record_disposition(
        &self,
        msg: &InboundMessage,
        decision_id: &str,
        reason: Reason,
        detail: Option<String>,
        attempt: u32,
    ) -> Result<(), crate::decision::SinkError> {
        let rec = self.record(
            msg,
            decision_id,
            reason,
            detail,
            attempt,
            &Facts::default(),
            Instant::now(),
        );
        self.log.record(&rec)
    }

    async fn evaluate(
        &self,
        msg: &InboundMessage,
        decision_id: &str,
        facts: &mut Facts,
    ) -> Result<AuthContext, Rejection> {
        // 1. No credential may ride along.
        let findings = self.credentials.scan(&msg.headers, &msg.payload);
        if !findings.is_empty() {
            let at: Vec<String> = findings
                .iter()
                .map(|f| serde_json::to_string(&f.location).unwrap_or_default())
                .collect();
            let credential = findings
                .iter()
                .any(|f| f.kind != crate::strip::CredentialKind::Uninspectable);
            return Err(if credential {
                Rejection::new(
                    Reason::CredentialInMessage,
                    format!("credential found at {}", at.join(", ")),
                )
            } else {
                Rejection::new(
                    Reason::UninspectablePayload,
                    format!(
                        "payload cannot be inspected for credentials: {}",
                        findings
                            .iter()
                            .filter_map(|f| f.detail.as_deref())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                )
            });
        }
        // 2. Exactly one context reference, verified.
        let mut refs = msg.headers.get_all(CTX_REF_HEADER);
        let raw = match (refs.next(), refs.next()) {
            (None, _) => {
                return Err(Rejection::new(
                    Reason::MissingContext,
                    "no ztauth-ctx-ref header",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(Rejection::new(
                    Reason::AmbiguousContext,
                    "more than one ztauth-ctx-ref header",
                ));
            }
            (Some(r), None) => std::str::from_utf8(r).map_err(|_| {
                Rejection::new(Reason::MalformedReference, "reference is not UTF-8")
            })?,
        };
        let verified = self
            .verifier
            .verify(raw.trim(), &msg.destination, &msg.payload)
            .map_err(|e| Rejection::new(e.reason(), e.to_string()))?;
        facts.reference = Some(verified.clone());
        let claims = &verified.claims;
        // 3. Replay.
        if let Some(replay) = &self.replay {
            let position = replay_position(msg);
            match replay.check(&claims.jti, &position, claims.exp).await {
                Ok(Seen::New | Seen::Redelivery) => {}
                Ok(Seen::Replay { first_seen_at }) => {
                    return Err(Rejection::new(
                        Reason::Replayed,
                        format!("reference {} first seen at {first_seen_at}", claims.jti),
                    ));
                }
                Err(e) => {
                    return Err(Rejection::new(
                        Reason::ReplayStoreUnavailable,
                        e.to_string(),
                    ));
                }
            }
        }
        // 4. What would the handler do?
        let (action, resource) = self.actions.map(msg, claims).map_err(|e| {
            Rejection::new(
                Reason::PolicyError,
                format!("cannot map message to an action: {e}"),
            )
        })?;
        facts.action = Some(action.clone());
        facts.resource = Some(resource.clone());
        let ref_scope = claims.scope_set();
        if !ref_scope.contains(&action) {
            return Err(Rejection::new(
                Reason::ScopeInsufficient,
                format!(
                    "action {action:?} is outside the reference scope {:?}",
                    claims.scope
                ),
            ));
        }
        // 5. A fresh Txn-Token for this workload.
        let request = TokenRequest::for_message(&verified, &ref_scope, msg);
        let token = self.tokens.acquire(&request).await.map_err(|e| match e {
            TokenError::Unavailable { retry_after, .. } => Rejection {
                reason: Reason::TtsUnavailable,
                detail: Some(e.to_string()),
                retry_after,
            },
            TokenError::Denied { .. } => Rejection::new(Reason::TokenDenied, e.to_string()),
            TokenError::Invalid(_) => Rejection::new(Reason::TokenInvalid, e.to_string()),
        })?;
        facts.token = Some(token.clone());
        let tc = &token.claims;
        let token_scope = Scope::parse(&tc.scope);
        let mismatch = if tc.sub != claims.sub {
            Some("sub")
        } else if tc.txn != claims.txn {
            Some("txn")
        } else if tc.req_wl != self.workload {
            Some("req_wl")
        } else if !token_scope.is_subset(&ref_scope) {
            Some("scope wider than the reference")
        } else {
            None
        };
        if let Some(what) = mismatch {
            return Err(Rejection::new(
                Reason::TokenInvalid,
                format!("Txn-Token does not match the reference: {what}"),
            ));
        }
        if !token_scope.contains(&action) {
            return Err(Rejection::new(
                Reason::ScopeInsufficient,
                format!(
                    "action {action:?} is outside the Txn-Token scope {:?}",
                    tc.scope
                ),
            ));
        }
        // 6. Trust elevation: both halves must permit.
        let subject = EntityRef::new(
            match claims.sub_kind {
                SubjectKind::Human => USER_TYPE,
                SubjectKind::Workload => WORKLOAD_TYPE,
            },
            &claims.sub,
        );
        let chain = claims.chain();
        let elevation = ElevationRequest {
            workload: self.workload.clone(),
            subject,
            action: action.clone(),
            resource: resource.clone(),
            scope: token_scope.iter().map(str::to_string).collect(),
            chain: chain.clone(),
            depth: claims.depth,
            txn: claims.txn.clone(),
        };
        let decisions =
            self.pdp
                .evaluate_all(&elevation.requests())
                .await
                .map_err(|e| match e {
                    PdpError::Unavailable(_) => {
                        Rejection::new(Reason::PdpUnavailable, e.to_string())
                    }
                    PdpError::InvalidRequest(_) => {
                        Rejection::new(Reason::PolicyError, e.to_string())
                    }
                })?;
        match decisions.as_slice() {
            [delegation, _] if !delegation.allowed => {
                return Err(Rejection::new(
                    Reason::DelegationDenied,
                    format!(
                        "{} may not act for {} ({action}){}",
                        self.workload,
                        claims.sub,
                        errors_suffix(&delegation.errors)
                    ),
                ));
            }
            [_, direct] if !direct.allowed => {
                return Err(Rejection::new(
                    Reason::SubjectDenied,
                    format!(
                        "{} may not {action} on {resource}{}",
                        claims.sub,
                        errors_suffix(&direct.errors)
                    ),
                ));
            }
            [_, _] => {}
            _ => {
                return Err(Rejection::new(
                    Reason::PolicyError,
                    "PDP returned the wrong number of decisions",
                ));
            }
        }
        Ok(AuthContext {
            decision_id: decision_id.to_string(),
            subject: claims.sub.clone(),
            sub_kind: claims.sub_kind,
            workload: self.workload.clone(),
            producer: claims.iss.clone(),
            txn: claims.txn.clone(),
            scope: token_scope,
            chain,
            action,
            resource,
            txn_token: token,
            reference: claims.clone(),
            reference_token: verified.token.clone(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        msg: &InboundMessage,
        decision_id: &str,
        reason: Reason,
        detail: Option<String>,
        attempt: u32,
        facts: &Facts,
        started: Instant,
    ) -> DecisionRecord {
        let claims = facts.reference.as_ref().map(|r| &r.claims);
        DecisionRecord {
            decision_id: decision_id.to_string(),
            time: crate::now_rfc3339(),
            verdict: reason.verdict(),
            reason,
            detail,
            subject: claims.map(|c| c.sub.clone()),
            workload: self.workload.clone(),
            producer: claims.map(|c| c.iss.clone()),
            action: facts.action.clone(),
            resource: facts.resource.as_ref().map(|r| r.to_string()),
            txn: claims.map(|c| c.txn.clone()),
            chain: claims.map(|c| c.chain()).unwrap_or_default(),
            source: msg.coordinates.clone(),
            attempt,
            policy_version: self.pdp.policy_version(),
            latency_us: started.elapsed().as_micros() as u64,
            trace_id: trace_id(msg).unwrap_or_else(|| decision_id.to_string()),
            ctx_ref_sha256: facts.reference.as_ref().map(|r| r.token_sha256.clone()),
            txn_token_sha256: facts.token.as_ref().map(|t| t.token.sha256()),
        }
    }
}

/// Where a message sits, for the replay seen-set: a broker-assigned position
/// when the broker has a stable one (a producer cannot choose it), else the
/// message id. A redelivery keeps its position; a copy of the message does not.
pub fn replay_position(msg: &InboundMessage) -> String {
    use crate::message::Coordinates;
    match &msg.coordinates {
        // topic/partition/offset, stream/sequence and queue/sequence are broker-assigned
        Coordinates::Kafka { .. } | Coordinates::Memory { .. } => msg.coordinates.to_string(),
        Coordinates::Nats {
            stream: Some(_),
            stream_seq: Some(_),
            ..
        } => msg.coordinates.to_string(),
        // core NATS never redelivers: every receipt is its own position, kept
        // across the in-place retries of that receipt
        Coordinates::Nats {
            subject, receipt, ..
        } => match receipt {
            Some(r) => format!("nats:{subject}#{r}"),
            None => format!("nats:{subject}#{}", uuid::Uuid::new_v4()),
        },
        // AMQP delivery tags change on redelivery: the publisher's message id is the
        // only stable handle (documented limitation: a verbatim copy with the same
        // message id looks like a redelivery)
        Coordinates::Amqp { queue, .. } => match &msg.message_id {
            Some(id) => format!("amqp:{queue}/{id}"),
            None => format!("amqp:{queue}"),
        },
    }
}

fn errors_suffix(errors: &[String]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!(" [errors: {}]", errors.join("; "))
    }
}

/// The trace id of a W3C `traceparent` header, if the message carries a valid one.
pub fn trace_id(msg: &InboundMessage) -> Option<String> {
    let tp = msg.headers.get_str("traceparent")?;
    let mut parts = tp.trim().split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != "0".repeat(32))
        .then(|| id.to_ascii_lowercase())
}
