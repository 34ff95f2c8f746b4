//! Step 7: the decision record, written before anything is dispatched.
//! It names the reference and the Txn-Token by SHA-256 only.

use std::time::Instant;

use crate::ctxref::VerifiedRef;
use crate::decision::DecisionRecord;
use crate::message::InboundMessage;
use crate::pdp::EntityRef;
use crate::token::TxnToken;
use crate::verdict::Reason;

/// What the steps learned before the verdict, for the record: the record's
/// own fields, taken once from what each step holds (never a copy of the
/// verified reference or the Txn-Token themselves).
#[derive(Default)]
pub(crate) struct Facts {
    subject: Option<String>,
    producer: Option<String>,
    txn: Option<String>,
    chain: Vec<String>,
    ctx_ref_sha256: Option<String>,
    pub(crate) action: Option<String>,
    pub(crate) resource: Option<String>,
    txn_token_sha256: Option<String>,
}

impl Facts {
    /// The verified reference's subject, producer, transaction, chain and hash.
    pub(crate) fn reference(&mut self, r: &VerifiedRef) {
        let c = &r.claims;
        self.subject = Some(c.sub.clone());
        self.producer = Some(c.iss.clone());
        self.txn = Some(c.txn.clone());
        self.chain = c.chain();
        self.ctx_ref_sha256 = Some(r.token_sha256.clone());
    }

    /// The Txn-Token, by its SHA-256.
    pub(crate) fn token(&mut self, t: &TxnToken) {
        self.txn_token_sha256 = Some(t.token.sha256());
    }

    /// The mapped resource, as the record names it.
    pub(crate) fn resource(&mut self, r: &EntityRef) {
        self.resource = Some(r.to_string());
    }
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
        self,
        reason: Reason,
        detail: Option<String>,
        facts: Facts,
    ) -> DecisionRecord {
        DecisionRecord {
            decision_id: self.decision_id.to_string(),
            time: crate::now_rfc3339(),
            verdict: reason.verdict(),
            reason,
            detail,
            subject: facts.subject,
            workload: self.workload.to_string(),
            producer: facts.producer,
            action: facts.action,
            resource: facts.resource,
            txn: facts.txn,
            chain: facts.chain,
            source: self.msg.coordinates.clone(),
            attempt: self.attempt,
            policy_version: self.policy_version,
            bundle_revision: self.bundle_revision,
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            trace_id: trace_id(self.msg).unwrap_or_else(|| self.decision_id.to_string()),
            ctx_ref_sha256: facts.ctx_ref_sha256,
            txn_token_sha256: facts.txn_token_sha256,
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
