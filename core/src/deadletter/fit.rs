//! Dead letters that always fit: a letter is the original plus the envelope,
//! so an original near its broker's limit gives a letter over it, which the
//! broker refuses for good (and RabbitMQ answers an oversized header frame by
//! closing the whole connection). Before publishing, the letter is measured
//! by its publisher ([`DeadLetterPublisher::measure`], the broker's real
//! limits) and shrunk in this order until it fits:
//!
//! 1. original headers, largest first, are replaced by `{name, length,
//!    sha256}` entries in [`H_TRIMMED`] (the context reference too: its hash
//!    stays in [`super::H_CTX_REF_SHA256`]);
//! 2. the payload moves to the publisher's claim-check store
//!    ([`DeadLetterPublisher::store_claim`]) and [`H_PAYLOAD`] says where; a
//!    publisher without one withholds it (length and SHA-256 kept);
//! 3. the lists in [`H_REMOVED`] and [`H_TRIMMED`] shrink to counts.
//!
//! The decision id, verdict, reason, source coordinates, idempotency key and
//! the reference's hash are never removed. [`minimal`] is steps 1–3 at once:
//! what is published after a permanent refusal of a fitted letter.

use bytes::Bytes;

use super::{
    DeadLetter, ENVELOPE_HEADERS, H_PAYLOAD, H_REMOVED, H_TRIMMED, PayloadAt, PayloadRef, json,
    listed,
};
use crate::keys::sha256_hex;
use crate::settle::{DeadLetterPublisher, TransportError};

/// How far a letter is over its broker's limits (bytes; zero = fits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Excess {
    /// Over the limit on the encoded headers (AMQP header frame, NATS header block).
    pub headers: usize,
    /// Over the limit on the whole message (NATS `max_payload`, Kafka `message.max.bytes`).
    pub total: usize,
}

impl Excess {
    /// True when the letter fits.
    pub fn fits(&self) -> bool {
        self.headers == 0 && self.total == 0
    }
}

#[derive(serde::Serialize)]
struct Trimmed {
    name: String,
    length: usize,
    sha256: String,
}

/// Shrinks `letter` until `publisher` measures it as fitting (module docs).
///
/// # Errors
/// The claim-check store failed transiently (the message is kept and
/// retried), or even the envelope alone does not fit (a misconfigured limit).
pub async fn fit(
    mut letter: DeadLetter,
    publisher: &dyn DeadLetterPublisher,
) -> Result<DeadLetter, TransportError> {
    if publisher.measure(&letter).fits() {
        return Ok(letter);
    }
    trim_headers(&mut letter, publisher, false);
    if publisher.measure(&letter).fits() {
        return Ok(letter);
    }
    move_payload(&mut letter, publisher).await?;
    if publisher.measure(&letter).fits() {
        return Ok(letter);
    }
    summarise_lists(&mut letter);
    let excess = publisher.measure(&letter);
    if excess.fits() {
        return Ok(letter);
    }
    Err(TransportError::permanent(
        "dead-letter publish",
        format!(
            "even the minimal dead letter exceeds the destination's limits ({excess:?} bytes over): \
             raise the broker limit or shorten the destination name"
        ),
    ))
}

/// The smallest letter: no original header (all listed in [`H_TRIMMED`]),
/// the payload in the claim-check store or withheld, lists summarised.
///
/// # Errors
/// As [`fit`].
pub async fn minimal(
    mut letter: DeadLetter,
    publisher: &dyn DeadLetterPublisher,
) -> Result<DeadLetter, TransportError> {
    trim_headers(&mut letter, publisher, true);
    move_payload(&mut letter, publisher).await?;
    summarise_lists(&mut letter);
    Ok(letter)
}

fn is_envelope(name: &str) -> bool {
    ENVELOPE_HEADERS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// Replaces original headers, largest first, until the letter fits (or all of them).
fn trim_headers(letter: &mut DeadLetter, publisher: &dyn DeadLetterPublisher, all: bool) {
    let mut originals: Vec<(usize, String, Vec<u8>)> = letter
        .headers
        .iter()
        .filter(|(n, _)| !is_envelope(n))
        .map(|(n, v)| (n.len() + v.len(), n.to_string(), v.to_vec()))
        .collect();
    if originals.is_empty() {
        return;
    }
    originals.sort_by_key(|o| std::cmp::Reverse(o.0));
    let mut trimmed: Vec<Trimmed> = letter
        .headers
        .get(H_TRIMMED)
        .and_then(|v| serde_json::from_slice::<Vec<serde_json::Value>>(v).ok())
        .map(|list| {
            list.into_iter()
                .filter_map(|e| {
                    Some(Trimmed {
                        name: e.get("name")?.as_str()?.to_string(),
                        length: e.get("length")?.as_u64()? as usize,
                        sha256: e.get("sha256")?.as_str()?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    for (_, name, value) in originals {
        if !all && publisher.measure(letter).fits() {
            break;
        }
        // Remove this one value (a name may repeat with other, smaller values).
        let mut gone = false;
        letter.headers.retain(|n, v| {
            if !gone && n == name && v == value.as_slice() {
                gone = true;
                return false;
            }
            true
        });
        trimmed.push(Trimmed {
            name,
            length: value.len(),
            sha256: sha256_hex(&value),
        });
        letter.headers.insert(H_TRIMMED, listed(&trimmed));
    }
}

/// Moves the payload to the claim-check store, or withholds it.
async fn move_payload(
    letter: &mut DeadLetter,
    publisher: &dyn DeadLetterPublisher,
) -> Result<(), TransportError> {
    if letter.payload.is_empty() {
        return Ok(());
    }
    let payload = letter.payload.clone();
    let reference = |at: PayloadAt| PayloadRef {
        length: payload.len(),
        sha256: sha256_hex(&payload),
        at,
    };
    let r = match publisher.store_claim(letter).await {
        Ok(at) => reference(at),
        Err(e) if e.is_permanent() => {
            tracing::warn!(decision_id = %letter.decision_id, error = %e,
                "payload too large for the dead letter and no claim-check store took it: withheld (length and SHA-256 kept)");
            reference(PayloadAt::Withheld {
                why: format!("too large for the dead-letter destination; claim check: {e}"),
            })
        }
        Err(e) => return Err(e),
    };
    letter.original_payload = Some(payload);
    letter.payload = Bytes::new();
    letter.headers.insert(H_PAYLOAD, json(&r));
    Ok(())
}

/// Replaces the lists of removed and trimmed headers by their counts.
fn summarise_lists(letter: &mut DeadLetter) {
    for h in [H_REMOVED, H_TRIMMED] {
        if let Some(v) = letter.headers.get(h) {
            let n = serde_json::from_slice::<Vec<serde_json::Value>>(v)
                .map(|l| {
                    l.iter()
                        .map(|e| e.get("more").and_then(|m| m.as_u64()).unwrap_or(1))
                        .sum::<u64>()
                })
                .unwrap_or(0);
            letter
                .headers
                .insert(h, serde_json::json!([{ "more": n }]).to_string());
        }
    }
}
