//! A handler publishing downstream: the producer-side PDP check sees the real
//! chain and the depth of the reference about to be signed, and the derived
//! reference extends the chain with narrowed scope.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::ctxref::{ContextRefMinter, MintRequest};
use elevate_core::ctxref::{ContextRefVerifier, VerifyPolicy};
use elevate_core::decision::MemorySink;
use elevate_core::keys::KeySet;
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::pdp::{AccessDecision, AccessRequest, EntityRef, PdpError, PolicyDecisionPoint};
use elevate_core::producer::{DerivedPublish, ProducerGuard};
use elevate_core::scope::Scope;
use elevate_core::token::{SecretToken, TxnToken, TxnTokenClaims};
use elevate_core::token::{TokenError, TokenRequest, TokenSource};
use elevate_core::{
    CTX_REF_HEADER, FixedAction, Guard, Headers, InboundMessage, OutboundMessage, SubjectKind,
};
use parking_lot::Mutex;

const ORIGIN: &str = "spiffe://d/orders-api";
const ORDER: &str = "spiffe://d/order-worker";
const BILLING: &str = "spiffe://d/billing-worker";

#[derive(Default)]
struct RecordingPdp {
    seen: Mutex<Vec<AccessRequest>>,
}

#[async_trait::async_trait]
impl PolicyDecisionPoint for RecordingPdp {
    async fn evaluate(&self, req: &AccessRequest) -> Result<AccessDecision, PdpError> {
        self.seen.lock().push(req.clone());
        Ok(AccessDecision {
            allowed: true,
            policies: vec![],
            errors: vec![],
        })
    }

    fn policy_version(&self) -> String {
        "test".into()
    }
}

/// A TTS double: the Txn-Token the reference asks for, for the order worker.
struct MatchingTokens;

#[async_trait::async_trait]
impl TokenSource for MatchingTokens {
    async fn acquire(&self, req: &TokenRequest<'_>) -> Result<TxnToken, TokenError> {
        let c = &req.reference.claims;
        Ok(TxnToken {
            token: SecretToken::new("t"),
            claims: std::sync::Arc::new(TxnTokenClaims {
                iat: c.iat,
                exp: c.exp,
                aud: vec![],
                txn: c.txn.clone(),
                sub: c.sub.clone(),
                scope: req.scope.to_string(),
                req_wl: ORDER.into(),
                jti: None,
                tctx: None,
                rctx: None,
            }),
        })
    }
}

#[tokio::test]
async fn derived_publish_shows_the_chain_to_the_pdp() {
    let origin_key = SigningKey::generate(SigningAlg::ES256, "o-1").unwrap();
    let order_key = SigningKey::generate(SigningAlg::EdDSA, "w-1").unwrap();
    let origin = ContextRefMinter::new(ORIGIN, origin_key.clone(), Duration::from_secs(60))
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[ORDER.to_string()],
            scope: &Scope::parse("order.process billing.charge"),
            txn: "txn-1",
            destination: "orders",
            payload: b"o",
        })
        .unwrap();
    // The handler's context, as only the guard can make one: the order
    // worker's guard verifies the origin reference and permits it.
    let mut trusted = KeySet::new();
    trusted.insert_workload_key(ORIGIN, &origin_key).unwrap();
    let consumer = Guard::new(
        ORDER,
        ContextRefVerifier::new(trusted, VerifyPolicy::new(ORDER)),
        Arc::new(MatchingTokens),
        Arc::new(RecordingPdp::default()),
        Arc::new(MemorySink::default()),
        Arc::new(FixedAction::new("order.process", "Destination")),
    );
    let headers: Headers = [(CTX_REF_HEADER, origin.token.clone())]
        .into_iter()
        .collect();
    let msg = InboundMessage::new(
        elevate_core::memory::coordinates("orders", 1),
        "orders",
        headers,
        b"o".to_vec(),
    );
    let decision = consumer.decide(&msg, 1).await;
    let auth = decision
        .auth()
        .expect("the guard permits the origin message")
        .clone();
    let pdp = Arc::new(RecordingPdp::default());
    let guard = ProducerGuard::new(
        ContextRefMinter::new(ORDER, order_key, Duration::from_secs(60)),
        pdp.clone(),
    );
    let audience = [BILLING.to_string()];
    let scope = Scope::parse("billing.charge");
    let prepared = guard
        .prepare_derived(
            &auth,
            &DerivedPublish {
                action: "billing.charge",
                audience: &audience,
                destination: "billing",
                scope: Some(&scope),
            },
            OutboundMessage {
                headers: Headers::new(),
                payload: b"b".to_vec(),
            },
        )
        .await
        .unwrap();
    let seen = pdp.seen.lock().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].subject, EntityRef::new("Workload", ORDER));
    assert_eq!(seen[0].context["chain"], serde_json::json!([ORIGIN]));
    assert_eq!(seen[0].context["depth"], 1);
    assert_eq!(seen[0].context["action"], "billing.charge");
    let c = &prepared.reference.claims;
    assert_eq!(c.chain(), vec![ORIGIN.to_string(), ORDER.to_string()]);
    assert_eq!(c.depth, 1);
    assert_eq!(c.scope, "billing.charge");
    // asking for more than the parent had is refused before anything is signed
    let wider = Scope::parse("billing.charge refund.issue");
    let refused = guard
        .prepare_derived(
            &auth,
            &DerivedPublish {
                action: "billing.charge",
                audience: &audience,
                destination: "billing",
                scope: Some(&wider),
            },
            OutboundMessage {
                headers: Headers::new(),
                payload: b"b".to_vec(),
            },
        )
        .await;
    assert!(refused.is_err());
}
