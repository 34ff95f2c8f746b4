//! In-process end-to-end tests of the shared issuer code.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::ctxref::{ContextRefMinter, MintRequest, SubjectKind, VerifiedRef, unix_now};
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::scope::Scope;
use elevate_core::token::{TokenError, TokenRequest, TokenSource};

use super::*;
use crate::assertion::sign_assertion;
use crate::entry::{TestIssuer, subject_context};
use crate::protocol::{ErrorCode, TOKEN_TYPE_JWT, exchange_form, with_client_assertion};

const TD: &str = "example.org";
const PRODUCER: &str = "spiffe://example.org/orders";
const CONSUMER: &str = "spiffe://example.org/billing";
const OTHER: &str = "spiffe://example.org/shipping";

struct World {
    issuer: Arc<Issuer>,
    producer: ContextRefMinter,
    consumer_key: SigningKey,
    idp: TestIssuer,
}

fn world() -> World {
    let issuer = Issuer::generate(IssuerSettings::new(TD)).unwrap();
    let pk = SigningKey::generate(SigningAlg::EdDSA, "orders-1").unwrap();
    let ck = SigningKey::generate(SigningAlg::ES256, "billing-1").unwrap();
    let ok = SigningKey::generate(SigningAlg::ES256, "shipping-1").unwrap();
    issuer
        .register_workload(
            PRODUCER,
            pk.public_jwk(),
            &Scope::parse("orders.read orders.write"),
        )
        .unwrap();
    issuer
        .register_workload(CONSUMER, ck.public_jwk(), &Scope::parse("orders.read"))
        .unwrap();
    issuer
        .register_workload(OTHER, ok.public_jwk(), &Scope::parse("orders.ship"))
        .unwrap();
    let idp = TestIssuer::new("https://idp.example.org", "elevate").unwrap();
    issuer.set_user_issuer(idp.verifier());
    World {
        issuer,
        producer: ContextRefMinter::new(PRODUCER, pk, Duration::from_secs(300)),
        consumer_key: ck,
        idp,
    }
}

fn reference(w: &World, aud: &str, scope: &str) -> VerifiedRef {
    let minted = w
        .producer
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[aud.to_string()],
            scope: &Scope::parse(scope),
            txn: "txn-1",
            destination: "orders",
            payload: b"{}",
        })
        .unwrap();
    VerifiedRef {
        token_sha256: String::new(),
        token: minted.token,
        claims: minted.claims,
    }
}

fn consumer(w: &World) -> InProcessTts {
    InProcessTts::new(w.issuer.clone(), CONSUMER, w.consumer_key.clone())
}

fn denied_code(r: Result<elevate_core::token::TxnToken, TokenError>) -> String {
    match r {
        Err(TokenError::Denied { code, .. }) => code,
        other => panic!("expected Denied, got {other:?}"),
    }
}

#[tokio::test]
async fn happy_path_and_claims() {
    let w = world();
    let r = reference(&w, CONSUMER, "orders.read");
    let scope = Scope::parse("orders.read");
    let tts = consumer(&w);
    let t = tts
        .acquire(&TokenRequest {
            reference: &r,
            scope: &scope,
            request_details: serde_json::json!({"source": {"topic": "orders"}}),
        })
        .await
        .unwrap();
    assert_eq!(t.claims.sub, "alice");
    assert_eq!(t.claims.txn, "txn-1");
    assert_eq!(t.claims.req_wl, CONSUMER);
    assert_eq!(t.claims.aud, vec![TD.to_string()]);
    let tctx = t.claims.tctx.unwrap();
    assert_eq!(tctx["producer"], PRODUCER);
    assert_eq!(tctx["destination"], "orders");
    assert_eq!(tctx["chain"], serde_json::json!([PRODUCER]));
    assert_eq!(
        t.claims.rctx.unwrap()["request_details"]["source"]["topic"],
        "orders"
    );
    assert!(t.claims.exp - t.claims.iat == 60);
}

#[tokio::test]
async fn refusals_have_the_right_codes() {
    let w = world();
    let tts = consumer(&w);
    let details = serde_json::json!({});
    // scope escalation beyond the reference
    let r = reference(&w, CONSUMER, "orders.read");
    let code = denied_code(
        tts.exchange(
            &r.token,
            TOKEN_TYPE_JWT,
            &Scope::parse("orders.read orders.write"),
            &details,
        )
        .await,
    );
    assert_eq!(code, "invalid_scope");
    // unknown scope
    let code = denied_code(
        tts.exchange(&r.token, TOKEN_TYPE_JWT, &Scope::parse("root"), &details)
            .await,
    );
    assert_eq!(code, "invalid_scope");
    // reference addressed to another workload
    let r2 = reference(&w, OTHER, "orders.read");
    let code = denied_code(
        tts.exchange(
            &r2.token,
            TOKEN_TYPE_JWT,
            &Scope::parse("orders.read"),
            &details,
        )
        .await,
    );
    assert_eq!(code, "invalid_grant");
    // expired reference
    let mut claims = r.claims.clone();
    claims.iat = unix_now() - 600;
    claims.exp = unix_now() - 300;
    let expired = w.producer.sign(claims).unwrap();
    let code = denied_code(
        tts.exchange(
            &expired.token,
            TOKEN_TYPE_JWT,
            &Scope::parse("orders.read"),
            &details,
        )
        .await,
    );
    assert_eq!(code, "invalid_grant");
    // unsupported subject token type
    let code = denied_code(
        tts.exchange(&r.token, "urn:x", &Scope::parse("orders.read"), &details)
            .await,
    );
    assert_eq!(code, "invalid_request");
}

#[tokio::test]
async fn form_level_refusals() {
    let w = world();
    let r = reference(&w, CONSUMER, "orders.read");
    let assertion = || {
        sign_assertion(
            &w.consumer_key,
            CONSUMER,
            &w.issuer.token_endpoint(),
            Duration::from_secs(30),
        )
        .unwrap()
    };
    let base = || {
        exchange_form(
            TD,
            &Scope::parse("orders.read"),
            &r.token,
            TOKEN_TYPE_JWT,
            &serde_json::json!({}),
            &serde_json::json!({}),
        )
    };
    let code = |f| w.issuer.exchange(&f).unwrap_err().code;
    assert_eq!(
        code(with_client_assertion(base(), &assertion()).set("grant_type", "client_credentials")),
        ErrorCode::UnsupportedGrantType
    );
    assert_eq!(code(base()), ErrorCode::InvalidClient);
    assert_eq!(
        code(with_client_assertion(base(), &assertion()).set("audience", "other.org")),
        ErrorCode::InvalidTarget
    );
    assert_eq!(
        code(with_client_assertion(base(), &assertion()).set("request_details", "[1]")),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(
            with_client_assertion(base(), &assertion()).set("requested_token_type", TOKEN_TYPE_JWT)
        ),
        ErrorCode::InvalidRequest
    );
    // replayed assertion
    let a = assertion();
    assert!(
        w.issuer
            .exchange(&with_client_assertion(base(), &a))
            .is_ok()
    );
    assert_eq!(
        code(with_client_assertion(base(), &a)),
        ErrorCode::InvalidClient
    );
    // forged assertion: right kid, wrong key
    let forger = SigningKey::generate(SigningAlg::ES256, "billing-1").unwrap();
    let forged = sign_assertion(
        &forger,
        CONSUMER,
        &w.issuer.token_endpoint(),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(
        code(with_client_assertion(base(), &forged)),
        ErrorCode::InvalidClient
    );
}

#[tokio::test]
async fn entry_flow_from_user_token() {
    let w = world();
    let pk = SigningKey::generate(SigningAlg::ES256, "orders-client").unwrap();
    // the producer authenticates with a second registered key
    w.issuer
        .register_workload(
            PRODUCER,
            pk.public_jwk(),
            &Scope::parse("orders.read orders.write"),
        )
        .unwrap();
    let tts = InProcessTts::new(w.issuer.clone(), PRODUCER, pk);
    let at = w
        .idp
        .issue_access_token(
            "alice",
            "orders.read orders.write",
            Duration::from_secs(300),
        )
        .unwrap();
    let t = tts
        .exchange_access_token(&at, &Scope::parse("orders.write"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(t.claims.sub, "alice");
    assert_eq!(t.claims.req_wl, PRODUCER);
    let ctx = crate::entry::subject_context_from_header(tts.verifier(), t.token.expose())
        .await
        .unwrap();
    assert_eq!(ctx.subject, "alice");
    assert_eq!(ctx.sub_kind, SubjectKind::Human);
    assert_eq!(ctx.txn, t.claims.txn);
    assert_eq!(
        subject_context(&t.claims).scope,
        Scope::parse("orders.write")
    );
    // a token of another issuer is invalid_grant
    let rogue = TestIssuer::new("https://idp.example.org", "elevate").unwrap();
    let bad = rogue
        .issue_access_token("mallory", "orders.read", Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        denied_code(
            tts.exchange_access_token(&bad, &Scope::parse("orders.read"), &serde_json::json!({}))
                .await
        ),
        "invalid_grant"
    );
}

#[tokio::test]
async fn rotation_keeps_old_tokens_verifying() {
    let w = world();
    let tts = consumer(&w);
    let r = reference(&w, CONSUMER, "orders.read");
    let s = Scope::parse("orders.read");
    let d = serde_json::json!({});
    let before = tts
        .exchange(&r.token, TOKEN_TYPE_JWT, &s, &d)
        .await
        .unwrap();
    let old_kid = w.issuer.current_kid();
    let new_kid = w.issuer.rotate_keys().unwrap();
    assert_ne!(old_kid, new_kid);
    let after = tts
        .exchange(&r.token, TOKEN_TYPE_JWT, &s, &d)
        .await
        .unwrap();
    let v = crate::verify::TxnTokenVerifier::from_keys(TD, w.issuer.public_keys());
    assert!(v.verify(before.token.expose()).await.is_ok());
    assert!(v.verify(after.token.expose()).await.is_ok());
}

/// orders → billing → relay → notify: a three-signer chain ending at `notify`.
struct ChainWorld {
    w: World,
    notify: InProcessTts,
    final_ref: String,
}

const RELAY: &str = "spiffe://example.org/relay";
const NOTIFY: &str = "spiffe://example.org/notify";

fn chain_world() -> ChainWorld {
    let w = world();
    let relay_key = SigningKey::generate(SigningAlg::EdDSA, "relay-1").unwrap();
    let notify_key = SigningKey::generate(SigningAlg::ES256, "notify-1").unwrap();
    let read = Scope::parse("orders.read");
    w.issuer
        .register_workload(RELAY, relay_key.public_jwk(), &read)
        .unwrap();
    w.issuer
        .register_workload(NOTIFY, notify_key.public_jwk(), &read)
        .unwrap();
    let origin = w
        .producer
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[CONSUMER.to_string()],
            scope: &Scope::parse("orders.read orders.write"),
            txn: "txn-chain",
            destination: "orders",
            payload: b"o",
        })
        .unwrap();
    let billing = ContextRefMinter::new(CONSUMER, w.consumer_key.clone(), Duration::from_secs(300));
    let hop1 = billing
        .derive(
            &origin.claims,
            &origin.token,
            Some(&read),
            &[RELAY.to_string()],
            "relay",
            b"r",
        )
        .unwrap();
    let relay = ContextRefMinter::new(RELAY, relay_key, Duration::from_secs(300));
    let hop2 = relay
        .derive(
            &hop1.claims,
            &hop1.token,
            None,
            &[NOTIFY.to_string()],
            "notify",
            b"n",
        )
        .unwrap();
    ChainWorld {
        notify: InProcessTts::new(w.issuer.clone(), NOTIFY, notify_key),
        w,
        final_ref: hop2.token,
    }
}

async fn exchange_final(c: &ChainWorld) -> Result<elevate_core::token::TxnToken, TokenError> {
    c.notify
        .exchange(
            &c.final_ref,
            TOKEN_TYPE_JWT,
            &Scope::parse("orders.read"),
            &serde_json::json!({}),
        )
        .await
}

#[tokio::test]
async fn chain_is_validated_and_carried_in_tctx() {
    let c = chain_world();
    let t = exchange_final(&c).await.unwrap();
    let tctx = t.claims.tctx.unwrap();
    assert_eq!(
        tctx["chain"],
        serde_json::json!([PRODUCER, CONSUMER, RELAY])
    );
    assert_eq!(tctx["depth"], 2);
    assert_eq!(tctx["max_depth"], 3);
    assert_eq!(
        tctx["hops"],
        serde_json::json!([
            {"wl": PRODUCER, "scope": "orders.read orders.write"},
            {"wl": CONSUMER, "scope": "orders.read"},
            {"wl": RELAY, "scope": "orders.read"},
        ])
    );
    assert_eq!(t.claims.req_wl, NOTIFY);
}

#[tokio::test]
async fn suspended_middle_workload_denies_every_downstream_exchange() {
    let c = chain_world();
    assert!(c.w.issuer.suspend_workload(CONSUMER));
    assert!(!c.w.issuer.is_trusted_workload(CONSUMER));
    let err = exchange_final(&c).await.unwrap_err();
    match &err {
        TokenError::Denied { code, description } => {
            assert_eq!(code, "invalid_grant");
            assert!(
                description
                    .as_deref()
                    .unwrap_or_default()
                    .contains("suspended"),
                "{err}"
            );
        }
        other => panic!("expected invalid_grant, got {other:?}"),
    }
    // the suspended workload itself gets no token either
    let own = consumer(&c.w);
    let r = reference(&c.w, CONSUMER, "orders.read");
    let code = denied_code(
        own.exchange(
            &r.token,
            TOKEN_TYPE_JWT,
            &Scope::parse("orders.read"),
            &serde_json::json!({}),
        )
        .await,
    );
    assert_eq!(code, "unauthorized_client");
    // trust restored: the same message in flight is accepted again
    assert!(c.w.issuer.reinstate_workload(CONSUMER));
    assert!(exchange_final(&c).await.is_ok());
}

#[tokio::test]
async fn removed_middle_workload_denies_messages_in_flight() {
    let c = chain_world();
    assert!(exchange_final(&c).await.is_ok());
    assert!(c.w.issuer.revoke_workload(CONSUMER));
    assert!(!c.w.issuer.revoke_workload(CONSUMER), "already gone");
    assert_eq!(denied_code(exchange_final(&c).await), "invalid_grant");
}

#[tokio::test]
async fn removed_origin_producer_denies_the_whole_chain() {
    let c = chain_world();
    assert!(c.w.issuer.revoke_workload(PRODUCER));
    assert_eq!(denied_code(exchange_final(&c).await), "invalid_grant");
}
