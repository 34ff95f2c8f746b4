//! The dead-letter envelope: what a broker binding publishes for a message
//! that must not reach the handler, so that replaying it re-runs the policy.

use bytes::Bytes;

use crate::message::{Coordinates, Headers, InboundMessage};
use crate::strip::CredentialPolicy;
use crate::verdict::{Reason, Verdict};

/// Header: the decision id.
pub const H_DECISION_ID: &str = "ztauth-decision-id";
/// Header: the verdict (`deny`, `quarantine`, `retry`).
pub const H_VERDICT: &str = "ztauth-verdict";
/// Header: the reason code.
pub const H_REASON: &str = "ztauth-reason";
/// Header: the reason class (`denied`, `invalid`, `exhausted`).
pub const H_REASON_CLASS: &str = "ztauth-reason-class";
/// Header: the source coordinates as JSON.
pub const H_SOURCE: &str = "ztauth-source";
/// Header: RFC 3339 time of dead-lettering.
pub const H_TIME: &str = "ztauth-time";
/// Header: the destination the message was originally published to.
pub const H_ORIGINAL_DESTINATION: &str = "ztauth-original-destination";

/// Every header the envelope adds (removed again when a dead letter is replayed).
pub const ENVELOPE_HEADERS: [&str; 7] = [
    H_DECISION_ID,
    H_VERDICT,
    H_REASON,
    H_REASON_CLASS,
    H_SOURCE,
    H_TIME,
    H_ORIGINAL_DESTINATION,
];

/// A dead letter ready to publish.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Original headers minus credentials (context reference kept), plus the envelope headers.
    pub headers: Headers,
    /// The original payload, minus configured credential fields.
    pub payload: Bytes,
    /// Where the original was read from.
    pub source: Coordinates,
    /// The destination it was published to.
    pub original_destination: String,
    /// The decision id.
    pub decision_id: String,
    /// The verdict that sent it here.
    pub verdict: Verdict,
    /// The reason.
    pub reason: Reason,
}

impl DeadLetter {
    /// Builds the envelope for `msg`; credentials are stripped from it first.
    pub fn build(
        msg: &InboundMessage,
        decision_id: &str,
        verdict: Verdict,
        reason: Reason,
        credentials: &CredentialPolicy,
    ) -> Self {
        let mut headers = msg.headers.clone();
        for h in ENVELOPE_HEADERS {
            headers.remove(h);
        }
        credentials.strip_headers(&mut headers);
        let mut found = Vec::new();
        let payload = credentials
            .strip_payload(&msg.payload, &mut found)
            .map(Bytes::from)
            .unwrap_or_else(|| msg.payload.clone());
        let source = serde_json::to_string(&msg.coordinates).unwrap_or_default();
        headers.append(H_DECISION_ID, decision_id);
        headers.append(H_VERDICT, verdict.as_str());
        headers.append(H_REASON, reason.code());
        headers.append(H_REASON_CLASS, reason.class());
        headers.append(H_SOURCE, source);
        headers.append(H_TIME, crate::now_rfc3339());
        headers.append(H_ORIGINAL_DESTINATION, msg.destination.as_str());
        DeadLetter {
            headers,
            payload,
            source: msg.coordinates.clone(),
            original_destination: msg.destination.clone(),
            decision_id: decision_id.to_string(),
            verdict,
            reason,
        }
    }
}
