//! Step 7: the decision record, written before anything is dispatched.
//! It names the reference and the Txn-Token by SHA-256 only.

use std::time::Instant;

use crate::ctxref::VerifiedRef;
use crate::decision::DecisionRecord;
use crate::message::InboundMessage;
use crate::pdp::EntityRef;
use crate::token::TxnToken;
use crate::verdict::Reason;

/// What the steps learned before the verdict, for the record.
#[derive(Default)]
pub(crate) struct Facts {
    pub(crate) reference: Option<VerifiedRef>,
    pub(crate) action: Option<String>,
    pub(crate) resource: Option<EntityRef>,
    pub(crate) token: Option<TxnToken>,
}

/// The record of one decision (or disposition) about `msg`.
pub(crate) struct Recorded<'a> {
    pub(crate) workload: &'a str,
    pub(crate) policy_version: String,
    pub(crate) bundle_revision: Option<u64>,
    pub(crate) msg: &'a InboundMessage,
    pub(crate) decision_id: &'a str,
    pub(crate) attempt: u32,
    pub(crate) started: Instant,
}

impl Recorded<'_> {
    /// The record for `reason`, with what `facts` learned.
    pub(crate) fn build(
        &self,
        reason: Reason,
        detail: Option<String>,
        facts: &Facts,
    ) -> DecisionRecord {
        let claims = facts.reference.as_ref().map(|r| &r.claims);
        DecisionRecord {
            decision_id: self.decision_id.to_string(),
            time: crate::now_rfc3339(),
            verdict: reason.verdict(),
            reason,
            detail,
            subject: claims.map(|c| c.sub.clone()),
            workload: self.workload.to_string(),
            producer: claims.map(|c| c.iss.clone()),
            action: facts.action.clone(),
            resource: facts.resource.as_ref().map(|r| r.to_string()),
            txn: claims.map(|c| c.txn.clone()),
            chain: claims.map(|c| c.chain()).unwrap_or_default(),
            source: self.msg.coordinates.clone(),
            attempt: self.attempt,
            policy_version: self.policy_version.clone(),
            bundle_revision: self.bundle_revision,
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            trace_id: trace_id(self.msg).unwrap_or_else(|| self.decision_id.to_string()),
            ctx_ref_sha256: facts.reference.as_ref().map(|r| r.token_sha256.clone()),
            txn_token_sha256: facts.token.as_ref().map(|t| t.token.sha256()),
        }
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
