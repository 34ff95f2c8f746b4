use std::sync::Mutex;

use super::*;
use crate::keys::{SigningAlg, SigningKey};
use crate::settle::{DeadLetterPublisher, TransportError};

fn jwt(typ: &str) -> String {
    let k = SigningKey::generate(SigningAlg::ES256, "k").unwrap();
    crate::jws::sign(&k, typ, &serde_json::json!({"sub":"alice"})).unwrap()
}

fn message(headers: Headers, payload: &[u8]) -> InboundMessage {
    InboundMessage::new(
        crate::memory::coordinates("q", 7),
        "q",
        headers,
        Bytes::copy_from_slice(payload),
    )
}

fn letter(msg: &InboundMessage) -> DeadLetter {
    DeadLetter::build(
        msg,
        "d-1",
        Verdict::Quarantine,
        Reason::CredentialInMessage,
        &CredentialPolicy::default(),
    )
}

fn removed(l: &DeadLetter) -> Vec<Removed> {
    serde_json::from_slice(l.headers.get(H_REMOVED).unwrap()).unwrap()
}

#[test]
fn a_letter_never_carries_a_credential() {
    let txn_token = jwt("txntoken+jwt");
    let ctx_ref = jwt(CTX_REF_TYP);
    let h: Headers = [
        ("authorization", "Bearer\tsecret-one".to_string()),
        ("x-forwarded", format!("Bearer {txn_token}")),
        (CTX_REF_HEADER, txn_token.clone()),
        (CTX_REF_HEADER, ctx_ref.clone()),
        ("content-type", "application/json".to_string()),
        (H_REASON, "permitted".to_string()),
    ]
    .into_iter()
    .collect();
    let payload = serde_json::json!({"order": 1, "access_token": "secret-two", "note": txn_token});
    let msg = message(h, &serde_json::to_vec(&payload).unwrap());
    let l = letter(&msg);
    let all: Vec<u8> = l
        .headers
        .iter()
        .flat_map(|(n, v)| [n.as_bytes(), v].concat())
        .chain(l.payload.iter().copied())
        .collect();
    let text = String::from_utf8_lossy(&all);
    for secret in ["secret-one", "secret-two", txn_token.as_str()] {
        assert!(!text.contains(secret), "{secret} in the letter");
    }
    // the real context reference stays, so replaying the letter re-runs the policy
    assert_eq!(l.headers.get_str(CTX_REF_HEADER), Some(ctx_ref.as_str()));
    // a forged envelope header is replaced by the real one
    assert_eq!(l.headers.get_all(H_REASON).count(), 1);
    assert_eq!(l.headers.get_str(H_REASON), Some("credential-in-message"));
    let r = removed(&l);
    assert_eq!(r.len(), 5, "{r:?}");
    assert!(r.iter().any(
        |e| e.kind == "not-a-context-reference" && e.sha256 == sha256_hex(txn_token.as_bytes())
    ));
    assert!(r.iter().any(|e| e.place == "payload"
        && e.name == "access_token"
        && e.sha256 == sha256_hex(b"secret-two")));
    let kept: serde_json::Value = serde_json::from_slice(&l.payload).unwrap();
    assert_eq!(kept, serde_json::json!({"order": 1}));
}

#[test]
fn uninspectable_and_token_carrying_payloads_are_withheld() {
    let deep = format!("{}\"secret\"{}", "[".repeat(200), "]".repeat(200));
    let raw_token = jwt("JWT");
    for payload in [deep.as_bytes(), raw_token.as_bytes()] {
        let l = letter(&message(Headers::new(), payload));
        assert!(l.payload.is_empty());
        let r = l.payload_ref().unwrap();
        assert_eq!(r.sha256, sha256_hex(payload));
        assert_eq!(r.length, payload.len());
        assert!(matches!(r.at, PayloadAt::Withheld { .. }));
    }
}

#[test]
fn the_idempotency_key_is_stable_across_redeliveries() {
    let h: Headers = [(CTX_REF_HEADER, jwt(CTX_REF_TYP))].into_iter().collect();
    let first = message(h.clone(), b"{}");
    let mut again = first.clone();
    again.delivery_attempt = 3;
    let a = letter(&first);
    let b = DeadLetter::build(
        &again,
        "d-2",
        Verdict::Deny,
        Reason::RetriesExhausted,
        &CredentialPolicy::default(),
    );
    assert_eq!(a.idempotency_key, b.idempotency_key);
    let mut other = first.clone();
    other.coordinates = crate::memory::coordinates("q", 8);
    other.position = other.coordinates.to_string();
    assert_ne!(a.idempotency_key, letter(&other).idempotency_key);
}

/// A publisher with a header budget and a total budget, and an optional claim store.
struct Limited {
    headers: usize,
    total: usize,
    store: bool,
    claims: Mutex<Vec<Bytes>>,
}

fn header_bytes(l: &DeadLetter) -> usize {
    l.headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum()
}

#[async_trait::async_trait]
impl DeadLetterPublisher for Limited {
    async fn publish(&self, _: &DeadLetter) -> Result<(), TransportError> {
        Ok(())
    }

    fn measure(&self, l: &DeadLetter) -> Excess {
        let h = header_bytes(l);
        Excess {
            headers: h.saturating_sub(self.headers),
            total: (h + l.payload.len()).saturating_sub(self.total),
        }
    }

    async fn store_claim(&self, l: &DeadLetter) -> Result<PayloadAt, TransportError> {
        if !self.store {
            return Err(TransportError::permanent("claim check", "none"));
        }
        self.claims.lock().unwrap().push(l.claim_payload().clone());
        Ok(PayloadAt::ClaimCheck {
            store: "test".into(),
            location: l.idempotency_key.clone(),
            chunks: 1,
        })
    }
}

#[tokio::test]
async fn oversized_headers_are_trimmed_largest_first_and_the_envelope_kept() {
    let h: Headers = [
        ("x-big", "a".repeat(5000)),
        ("x-medium", "b".repeat(1500)),
        ("x-small", "c".to_string()),
    ]
    .into_iter()
    .collect();
    let msg = message(h, b"payload");
    let p = Limited {
        headers: 3000,
        total: 1 << 20,
        store: true,
        claims: Mutex::new(vec![]),
    };
    let l = fit(letter(&msg), &p).await.unwrap();
    assert!(p.measure(&l).fits());
    assert!(l.headers.get("x-big").is_none());
    assert!(l.headers.get("x-medium").is_some() && l.headers.get("x-small").is_some());
    let trimmed: Vec<serde_json::Value> =
        serde_json::from_slice(l.headers.get(H_TRIMMED).unwrap()).unwrap();
    assert_eq!(trimmed.len(), 1);
    assert_eq!(trimmed[0]["name"], "x-big");
    assert_eq!(trimmed[0]["length"], 5000);
    assert_eq!(
        trimmed[0]["sha256"],
        sha256_hex("a".repeat(5000).as_bytes())
    );
    assert_eq!(&l.payload[..], b"payload");
    for h in [
        H_DECISION_ID,
        H_REASON,
        H_VERDICT,
        H_SOURCE,
        H_IDEMPOTENCY_KEY,
    ] {
        assert!(l.headers.get(h).is_some(), "{h}");
    }
}

#[tokio::test]
async fn an_oversized_payload_moves_to_the_claim_check_or_is_withheld() {
    let payload = vec![b'x'; 10_000];
    let msg = message(Headers::new(), &payload);
    let with_store = Limited {
        headers: 4096,
        total: 5000,
        store: true,
        claims: Mutex::new(vec![]),
    };
    let l = fit(letter(&msg), &with_store).await.unwrap();
    assert!(l.payload.is_empty());
    let r = l.payload_ref().unwrap();
    assert_eq!(r.sha256, sha256_hex(&payload));
    assert!(matches!(r.at, PayloadAt::ClaimCheck { .. }));
    assert_eq!(with_store.claims.lock().unwrap()[0], payload);
    let without = Limited {
        store: false,
        ..with_store
    };
    let l = fit(letter(&msg), &without).await.unwrap();
    assert!(matches!(
        l.payload_ref().unwrap().at,
        PayloadAt::Withheld { .. }
    ));
}

#[tokio::test]
async fn the_minimal_letter_keeps_only_the_envelope() {
    let h: Headers = [("x-a", "1"), ("x-b", "2")].into_iter().collect();
    let msg = message(h, b"body");
    let p = Limited {
        headers: 1 << 20,
        total: 1 << 20,
        store: true,
        claims: Mutex::new(vec![]),
    };
    let l = minimal(letter(&msg), &p).await.unwrap();
    assert!(l.headers.get("x-a").is_none() && l.headers.get("x-b").is_none());
    assert!(l.payload.is_empty());
    assert_eq!(l.headers.get_str(H_DECISION_ID), Some("d-1"));
    assert!(l.headers.get(H_TRIMMED).is_some());
}
