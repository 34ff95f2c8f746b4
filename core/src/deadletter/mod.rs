//! The dead-letter envelope: what a broker binding publishes for a message
//! that must not reach the handler, so that replaying it re-runs the policy.
//!
//! A dead letter never carries a credential: every header the scan flags is
//! removed, every `ztauth-ctx-ref` value that is not a context reference (a
//! Txn-Token sent in its place, say) is removed, JSON credentials are removed
//! from the payload, and a payload that still carries one (a token in text or
//! binary data) or that the scan cannot inspect is withheld. What was removed
//! is listed in [`H_REMOVED`] by name, kind and SHA-256.
//!
//! A dead letter always fits its broker: see [`fit`] for the trimming order.

mod fit;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ctxbind::{CTX_BIND_HEADER, looks_like_binding};
use crate::ctxref::{CTX_REF_HEADER, CTX_REF_TYP};
use crate::keys::sha256_hex;
use crate::message::{Coordinates, Headers, InboundMessage};
use crate::strip::CredentialPolicy;
use crate::verdict::{Reason, Verdict};

pub use fit::{Excess, fit, minimal};

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
/// Header: a key that is the same for every dead letter of one original
/// message (its stable position, the reference's and the payload's hashes),
/// so that a DLQ reader can drop the duplicates at-least-once delivery makes.
pub const H_IDEMPOTENCY_KEY: &str = "ztauth-idempotency-key";
/// Header: SHA-256 (hex) of the original `ztauth-ctx-ref` value, kept even
/// when the reference itself had to be trimmed or removed.
pub const H_CTX_REF_SHA256: &str = "ztauth-ctx-ref-sha256";
/// Header: JSON list of what was removed because it is (or may be) a
/// credential: `{"in","name","kind","sha256"}` (at most [`MAX_LISTED`] entries,
/// then `{"more": n}`).
pub const H_REMOVED: &str = "ztauth-removed";
/// Header: JSON list of original headers replaced to make the letter fit:
/// `{"name","length","sha256"}`.
pub const H_TRIMMED: &str = "ztauth-trimmed-headers";
/// Header: JSON [`PayloadRef`] when the payload is not in the letter (moved
/// to a claim check, or withheld).
pub const H_PAYLOAD: &str = "ztauth-payload";

/// Header: what a binding could not read of a `malformed-message` (its
/// client library's refusal), with unreadable bytes percent-encoded.
pub const H_MALFORMED: &str = "ztauth-malformed";

/// Every header the envelope adds (removed from an incoming message before
/// its letter is built, so a publisher cannot forge them, and when a dead
/// letter is replayed).
pub const ENVELOPE_HEADERS: [&str; 13] = [
    H_DECISION_ID,
    H_VERDICT,
    H_REASON,
    H_REASON_CLASS,
    H_SOURCE,
    H_TIME,
    H_ORIGINAL_DESTINATION,
    H_IDEMPOTENCY_KEY,
    H_CTX_REF_SHA256,
    H_REMOVED,
    H_TRIMMED,
    H_PAYLOAD,
    H_MALFORMED,
];

/// How many entries [`H_REMOVED`] and [`H_TRIMMED`] list before summarising.
pub const MAX_LISTED: usize = 32;

/// Where a payload that is not in the letter went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRef {
    /// Length of the original payload.
    pub length: usize,
    /// SHA-256 (hex) of the original payload.
    pub sha256: String,
    /// Where it is.
    #[serde(flatten)]
    pub at: PayloadAt,
}

/// A payload moved out of its letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "payload", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PayloadAt {
    /// Stored by the dead-letter publisher's claim-check store.
    ClaimCheck {
        /// The store (`nats-object-store`, `kafka-topic`...).
        store: String,
        /// Where in it (bucket/object, topic/partition/offset...).
        location: String,
        /// Number of chunks (1 when the store chunks by itself).
        chunks: u32,
    },
    /// Not kept: it may carry a credential, or it fits nowhere.
    Withheld {
        /// Why the original message was not kept (for operators; never the message itself).
        why: String,
    },
}

/// One entry of [`H_REMOVED`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// `header` or `payload`.
    #[serde(rename = "in")]
    pub place: String,
    /// Header name or JSON path (`$` for the whole payload).
    pub name: String,
    /// Why it was removed (a credential kind, or `not-a-context-reference`).
    pub kind: String,
    /// SHA-256 (hex) of the removed value.
    pub sha256: String,
}

/// A dead letter ready to publish.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Original headers minus credentials, plus the envelope headers.
    pub headers: Headers,
    /// The original payload minus credentials; empty when moved or withheld ([`H_PAYLOAD`]).
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
    /// Same for every letter of one original message ([`H_IDEMPOTENCY_KEY`]).
    pub idempotency_key: String,
    /// The original's broker key (Kafka), for the letter to keep.
    pub key: Option<Bytes>,
    /// The original's broker properties (AMQP content-type, ...), for the
    /// letter to keep where its broker has them.
    pub properties: Vec<(String, String)>,
    /// The payload before it was moved out of the letter (claim check), if it was.
    original_payload: Option<Bytes>,
}

impl DeadLetter {
    /// Builds the envelope for `msg`, never carrying a credential (see the module docs).
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
        let mut removed: Vec<Removed> = credentials
            .strip_headers(&mut headers)
            .into_iter()
            .map(|f| removed_entry(&f))
            .collect();
        let ctx_ref_sha = msg.headers.get(CTX_REF_HEADER).map(sha256_hex);
        headers.retain(|name, value| {
            let kind = if name.eq_ignore_ascii_case(CTX_REF_HEADER) {
                if is_context_reference(value) {
                    return true;
                }
                "not-a-context-reference"
            } else if name.eq_ignore_ascii_case(CTX_BIND_HEADER) {
                if looks_like_binding(value) {
                    return true;
                }
                "not-a-binding"
            } else {
                return true;
            };
            removed.push(Removed {
                place: "header".into(),
                name: name.to_string(),
                kind: kind.into(),
                sha256: sha256_hex(value),
            });
            false
        });
        let stripped = credentials.strip_payload(&msg.headers, &msg.payload);
        removed.extend(stripped.removed.iter().map(removed_entry));
        let mut payload_ref = None;
        let payload = if let Some(first) = stripped.unremovable.first() {
            removed.extend(stripped.unremovable.iter().map(removed_entry));
            payload_ref = Some(PayloadRef {
                length: msg.payload.len(),
                sha256: sha256_hex(&msg.payload),
                at: PayloadAt::Withheld {
                    why: match &first.detail {
                        Some(d) => format!("cannot be shown to be credential-free: {d}"),
                        None => "carries a credential that cannot be removed".into(),
                    },
                },
            });
            Bytes::new()
        } else {
            stripped
                .rewritten
                .map(Bytes::from)
                .unwrap_or_else(|| msg.payload.clone())
        };
        let idempotency_key = idempotency_key(msg, ctx_ref_sha.as_deref());
        let source = serde_json::to_string(&msg.coordinates).unwrap_or_default();
        headers.append(H_DECISION_ID, decision_id);
        headers.append(H_VERDICT, verdict.as_str());
        headers.append(H_REASON, reason.code());
        headers.append(H_REASON_CLASS, reason.class());
        headers.append(H_SOURCE, source);
        headers.append(H_TIME, crate::now_rfc3339());
        headers.append(H_ORIGINAL_DESTINATION, msg.destination.as_str());
        headers.append(H_IDEMPOTENCY_KEY, idempotency_key.as_str());
        if let Some(sha) = ctx_ref_sha {
            headers.append(H_CTX_REF_SHA256, sha);
        }
        if !removed.is_empty() {
            headers.append(H_REMOVED, listed(&removed));
        }
        if let Some(r) = &payload_ref {
            headers.append(H_PAYLOAD, json(r));
        }
        DeadLetter {
            headers,
            payload,
            source: msg.coordinates.clone(),
            original_destination: msg.destination.clone(),
            decision_id: decision_id.to_string(),
            verdict,
            reason,
            idempotency_key,
            key: msg.key.clone(),
            properties: msg.properties.clone(),
            original_payload: None,
        }
    }

    /// The payload to store in a claim check: the letter's payload, or the
    /// one it had before it was moved out.
    pub fn claim_payload(&self) -> &Bytes {
        self.original_payload.as_ref().unwrap_or(&self.payload)
    }

    /// Where the payload went when it is not in the letter.
    pub fn payload_ref(&self) -> Option<PayloadRef> {
        self.headers
            .get(H_PAYLOAD)
            .and_then(|v| serde_json::from_slice(v).ok())
    }
}

/// Whether a `ztauth-ctx-ref` value is structurally a context reference
/// (compact JWS, allowed algorithm, `typ: ctx-ref+jwt`); anything else in
/// that header (a Txn-Token, an access token) must not reach a dead letter.
fn is_context_reference(value: &[u8]) -> bool {
    std::str::from_utf8(value)
        .ok()
        .is_some_and(|v| crate::jws::parse(v.trim(), CTX_REF_TYP).is_ok())
}

fn removed_entry(f: &crate::strip::Finding) -> Removed {
    let (place, name) = match &f.location {
        crate::strip::Location::Header(n) => ("header", n.clone()),
        crate::strip::Location::Payload(p) => ("payload", p.clone()),
    };
    Removed {
        place: place.into(),
        name,
        kind: serde_json::to_value(f.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        sha256: f.sha256.clone(),
    }
}

/// A JSON list of at most [`MAX_LISTED`] entries, then `{"more": n}`.
fn listed<T: Serialize>(items: &[T]) -> String {
    let mut list: Vec<serde_json::Value> = items
        .iter()
        .take(MAX_LISTED)
        .filter_map(|i| serde_json::to_value(i).ok())
        .collect();
    if items.len() > MAX_LISTED {
        list.push(serde_json::json!({"more": items.len() - MAX_LISTED}));
    }
    serde_json::Value::Array(list).to_string()
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The same for every delivery of one original message: its stable
/// position (the replay position: broker-assigned where the broker has one),
/// the reference's hash and the payload's hash.
fn idempotency_key(msg: &InboundMessage, ctx_ref_sha: Option<&str>) -> String {
    let material = format!(
        "{}\n{}\n{}",
        msg.position,
        ctx_ref_sha.unwrap_or("-"),
        sha256_hex(&msg.payload)
    );
    sha256_hex(material.as_bytes())
}

#[cfg(test)]
mod tests;
