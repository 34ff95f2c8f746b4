//! A handler publishing downstream: the producer-side PDP check sees the real
//! chain and the depth of the reference about to be signed, and the derived
//! reference extends the chain with narrowed scope.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::ctxref::{ContextRefMinter, MintRequest};
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::pdp::{AccessDecision, AccessRequest, EntityRef, PdpError, PolicyDecisionPoint};
use elevate_core::producer::{DerivedPublish, ProducerGuard};
use elevate_core::scope::Scope;
use elevate_core::token::{SecretToken, TxnToken, TxnTokenClaims};
use elevate_core::{AuthContext, Headers, OutboundMessage, SubjectKind};
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

#[tokio::test]
async fn derived_publish_shows_the_chain_to_the_pdp() {
    let origin_key = SigningKey::generate(SigningAlg::ES256, "o-1").unwrap();
    let order_key = SigningKey::generate(SigningAlg::EdDSA, "w-1").unwrap();
    let origin = ContextRefMinter::new(ORIGIN, origin_key, Duration::from_secs(60))
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
    let auth = AuthContext {
        decision_id: "d-1".into(),
        subject: "alice".into(),
        sub_kind: SubjectKind::Human,
        workload: ORDER.into(),
        producer: ORIGIN.into(),
        txn: "txn-1".into(),
        scope: Scope::parse("order.process billing.charge"),
        chain: origin.claims.chain(),
        action: "order.process".into(),
        resource: EntityRef::new("Destination", "orders"),
        txn_token: TxnToken {
            token: SecretToken::new("t"),
            claims: TxnTokenClaims {
                iat: 0,
                exp: 0,
                aud: vec![],
                txn: "txn-1".into(),
                sub: "alice".into(),
                scope: "order.process billing.charge".into(),
                req_wl: ORDER.into(),
                jti: None,
                tctx: None,
                rctx: None,
            },
        },
        reference: origin.claims.clone(),
        reference_token: origin.token.clone(),
    };
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
