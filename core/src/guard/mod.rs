//! The consume-side pipeline, defined once for every broker, one module per
//! step: [`credentials`] scan → [`reference`] verification → [`replay`]
//! check → [`action`] mapping → Txn-Token ([`token`]) → trust
//! [`elevation`] at the PDP → [`record`] → verdict. Each step returns the
//! reason it refuses with; the guard records the outcome before answering.

mod action;
mod credentials;
mod elevation;
mod record;
mod reference;
mod rejection;
mod replay;
#[cfg(test)]
mod tests;
mod token;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use action::{ActionMapper, FixedAction};
pub use record::trace_id;

use self::record::{Facts, Recorded};
use self::rejection::Step;
use crate::auth::AuthContext;
use crate::ctxref::ContextRefVerifier;
use crate::decision::{DecisionSink, SinkError};
use crate::message::InboundMessage;
use crate::pdp::PolicyDecisionPoint;
use crate::replay::ReplayGuard;
use crate::strip::CredentialPolicy;
use crate::token::TokenSource;
use crate::verdict::{Reason, Verdict};

/// Why the guard did not permit a message: the recorded decision, its
/// reason and operator detail (never a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    decision_id: String,
    reason: Reason,
    detail: Option<String>,
    retry_after: Option<Duration>,
}

impl Refusal {
    /// The recorded decision's id (also in any dead letter).
    pub fn decision_id(&self) -> &str {
        &self.decision_id
    }

    /// The reason code for the refusal, which decides dead-letter or retry.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// Detail for operators (never a token).
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// The wait a dependency suggested (`Retry-After`), for a Retry.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

/// The guard's answer for one delivery, already recorded. Only the guard
/// builds one, and a Permit always owns the [`AuthContext`] the handler
/// receives: "permitted without a context" cannot be represented.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum GuardDecision {
    /// Dispatch to the handler with this context.
    Permit(Box<AuthContext>),
    /// Refused by policy or verification: dead-letter.
    Deny(Refusal),
    /// Suspicious (a credential, an uninspectable payload): dead-letter.
    Quarantine(Refusal),
    /// A dependency (TTS, PDP, replay store, decision log) is unavailable:
    /// try again later.
    Retry(Refusal),
}

impl GuardDecision {
    fn refused(refusal: Refusal) -> Self {
        match refusal.reason.verdict() {
            Verdict::Quarantine => GuardDecision::Quarantine(refusal),
            Verdict::Retry => GuardDecision::Retry(refusal),
            // a Permit reason never reaches here; deny by default
            Verdict::Deny | Verdict::Permit => GuardDecision::Deny(refusal),
        }
    }

    /// The recorded decision's id.
    pub fn decision_id(&self) -> &str {
        match self {
            GuardDecision::Permit(auth) => auth.decision_id(),
            GuardDecision::Deny(r) | GuardDecision::Quarantine(r) | GuardDecision::Retry(r) => {
                &r.decision_id
            }
        }
    }

    /// The verdict.
    pub fn verdict(&self) -> Verdict {
        match self {
            GuardDecision::Permit(_) => Verdict::Permit,
            GuardDecision::Deny(_) => Verdict::Deny,
            GuardDecision::Quarantine(_) => Verdict::Quarantine,
            GuardDecision::Retry(_) => Verdict::Retry,
        }
    }

    /// The reason (`permitted` for a Permit).
    pub fn reason(&self) -> Reason {
        self.refusal().map_or(Reason::Permitted, Refusal::reason)
    }

    /// The refusal, unless permitted.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            GuardDecision::Permit(_) => None,
            GuardDecision::Deny(r) | GuardDecision::Quarantine(r) | GuardDecision::Retry(r) => {
                Some(r)
            }
        }
    }

    /// The handler's context, when permitted.
    pub fn auth(&self) -> Option<&AuthContext> {
        match self {
            GuardDecision::Permit(auth) => Some(auth),
            _ => None,
        }
    }
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
    #[must_use]
    pub fn with_credentials(mut self, credentials: CredentialPolicy) -> Self {
        self.credentials = credentials;
        self
    }

    /// Enables replay protection with a seen-set.
    #[must_use]
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
    /// A decision that cannot be recorded is never a Permit: it is a Retry
    /// (`decision-log-unavailable`).
    pub async fn decide(&self, msg: &InboundMessage, attempt: u32) -> GuardDecision {
        let started = Instant::now();
        let decision_id = uuid::Uuid::now_v7().to_string();
        let mut facts = Facts::default();
        let result = self.evaluate(msg, &decision_id, &mut facts).await;
        let (reason, detail, retry_after) = match &result {
            Ok(_) => (Reason::Permitted, None, None),
            Err(r) => (r.reason, r.detail.clone(), r.retry_after),
        };
        let record =
            self.recorded(msg, &decision_id, attempt, started)
                .build(reason, detail.clone(), facts);
        if let Err(e) = self.log.commit(&record).await {
            tracing::error!(target: "elevate::decision", decision_id = %decision_id, error = %e, "decision log write failed: not dispatching");
            return GuardDecision::Retry(Refusal {
                decision_id,
                reason: Reason::DecisionLogUnavailable,
                detail: Some(e.to_string()),
                retry_after: None,
            });
        }
        match result {
            Ok(auth) => GuardDecision::Permit(Box::new(auth)),
            Err(_) => GuardDecision::refused(Refusal {
                decision_id,
                reason,
                detail,
                retry_after,
            }),
        }
    }

    /// Writes a disposition record (retries exhausted, handler failed) for
    /// a message, and waits until it is durable.
    ///
    /// # Errors
    /// The decision log could not store it.
    pub async fn record_disposition(
        &self,
        msg: &InboundMessage,
        decision_id: &str,
        reason: Reason,
        detail: Option<String>,
        attempt: u32,
    ) -> Result<(), SinkError> {
        let rec = self
            .recorded(msg, decision_id, attempt, Instant::now())
            .build(reason, detail, Facts::default());
        self.log.commit(&rec).await
    }

    fn recorded<'a>(
        &'a self,
        msg: &'a InboundMessage,
        decision_id: &'a str,
        attempt: u32,
        started: Instant,
    ) -> Recorded<'a> {
        Recorded {
            workload: &self.workload,
            policy_version: self.pdp.policy_version(),
            bundle_revision: self.pdp.policy_revision(),
            msg,
            decision_id,
            attempt,
            started,
        }
    }

    /// The steps in order; the first refusal ends the walk.
    async fn evaluate(
        &self,
        msg: &InboundMessage,
        decision_id: &str,
        facts: &mut Facts,
    ) -> Step<AuthContext> {
        credentials::check(&self.credentials, msg)?;
        let verified = reference::verify(&self.verifier, msg).await?;
        facts.reference(&verified);
        let claims = &verified.claims;
        replay::check(self.replay.as_deref(), msg, claims).await?;
        let ref_scope = claims.scope_set();
        let (action, resource) = action::map(&*self.actions, msg, claims, &ref_scope)?;
        facts.action = Some(action.clone());
        facts.resource(&resource);
        let txn_token = token::acquire(&*self.tokens, &verified, &ref_scope, msg).await?;
        facts.token(&txn_token);
        let token_scope = token::check(&txn_token, &self.workload, &verified, &ref_scope, &action)?;
        elevation::elevate(
            &*self.pdp,
            &self.workload,
            claims,
            &action,
            &resource,
            &token_scope,
        )
        .await?;
        Ok(AuthContext::new(
            decision_id,
            &self.workload,
            verified,
            token_scope,
            action,
            resource,
            txn_token,
        ))
    }
}
