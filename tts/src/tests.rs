//! In-process end-to-end tests of the shared issuer code.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::ctxref::{ContextRefMinter, MintRequest, SubjectKind, VerifiedRef, unix_now};
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::scope::Scope;
use elevate_core::token::{TokenError, TokenRequest, TokenSource};

use super::*;
use txn_token_client::assertion::sign_assertion;
use txn_token_client::entry::subject_context;
use txn_token_client::protocol::{ErrorCode, TOKEN_TYPE_JWT, exchange_form, with_client_assertion};

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
            request_details: serde_json::json!({"source": {"topic": "orders"}}).into(),
        })
        .await
        .unwrap();
    assert_eq!(t.claims.sub, "alice");
    assert_eq!(t.claims.txn, "txn-1");
    assert_eq!(t.claims.req_wl, CONSUMER);
    assert_eq!(t.claims.aud, vec![TD.to_string()]);
    let tctx = t.claims.tctx.clone().unwrap();
    assert_eq!(tctx["producer"], PRODUCER);
    assert_eq!(tctx["destination"], "orders");
    assert_eq!(tctx["chain"], serde_json::json!([PRODUCER]));
    assert_eq!(tctx["request_details"]["source"]["topic"], "orders");
    assert_eq!(
        t.claims.rctx.clone().unwrap()["request_context"]["mode"],
        "in-process"
    );
    assert!(t.claims.exp - t.claims.iat == 60);
}

/// A context reference (per-context binding) is exchanged like a
/// per-message one; the Txn-Token names no destination for it.
#[tokio::test]
async fn a_context_reference_is_exchanged_and_names_no_destination() {
    use elevate_core::ctxbind::{AudienceKeys, ContextBinder, KeyAgreementKey};
    let w = world();
    let agreement = KeyAgreementKey::generate("billing-enc-1").unwrap();
    let mut audiences = AudienceKeys::new();
    audiences.insert(CONSUMER, agreement.public_jwk()).unwrap();
    let claims = w.producer.origin_claims(&MintRequest {
        subject: "alice",
        sub_kind: SubjectKind::Human,
        audience: &[CONSUMER.to_string()],
        scope: &Scope::parse("orders.read"),
        txn: "txn-ctx",
        destination: "orders",
        payload: b"{}",
    });
    let sealed = ContextBinder::new(audiences, Duration::from_secs(300))
        .with_open_after(1)
        .seal(&w.producer, &claims)
        .unwrap()
        .unwrap();
    let r = VerifiedRef {
        token_sha256: String::new(),
        token: sealed.reference.token,
        claims: sealed.reference.claims,
    };
    let t = consumer(&w)
        .acquire(&TokenRequest {
            reference: &r,
            scope: &Scope::parse("orders.read"),
            request_details: serde_json::json!({}).into(),
        })
        .await
        .unwrap();
    assert_eq!(t.claims.txn, "txn-ctx");
    let tctx = t.claims.tctx.clone().unwrap();
    assert!(tctx["destination"].is_null(), "{tctx}");
    assert_eq!(tctx["producer"], PRODUCER);
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
    let ctx =
        txn_token_client::entry::subject_context_from_header(tts.verifier(), t.token.expose())
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
    let v = txn_token_client::verify::TxnTokenVerifier::from_keys(TD, w.issuer.public_keys());
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
    let tctx = t.claims.tctx.clone().unwrap();
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

// ---- conformance: RFC 7523 §3 nbf, RFC 6749 §5.2, RFC 9110, the draft's context mapping ----

use txn_token_client::assertion::{ASSERTION_TYP, AssertionClaims};
use txn_token_client::protocol::{
    ExchangeForm, MAX_CONTEXT_PARAM_BYTES, MAX_CONTEXT_PARAM_DEPTH, OAuthError, is_description_char,
};

/// A client assertion for `CONSUMER` with explicit `iat`/`exp`/`nbf`.
fn assertion_with(w: &World, iat: i64, exp: i64, nbf: Option<i64>) -> String {
    elevate_core::jws::sign(
        &w.consumer_key,
        ASSERTION_TYP,
        &AssertionClaims {
            iss: CONSUMER.into(),
            sub: CONSUMER.into(),
            aud: vec![w.issuer.token_endpoint()],
            jti: uuid::Uuid::new_v4().to_string(),
            iat,
            exp,
            nbf,
        },
    )
    .unwrap()
}

fn fresh_assertion(w: &World) -> String {
    sign_assertion(
        &w.consumer_key,
        CONSUMER,
        &w.issuer.token_endpoint(),
        Duration::from_secs(30),
    )
    .unwrap()
}

fn good_form(w: &World, reference: &str) -> ExchangeForm {
    with_client_assertion(
        exchange_form(
            TD,
            &Scope::parse("orders.read"),
            reference,
            TOKEN_TYPE_JWT,
            &serde_json::json!({"mode": "test"}),
            &serde_json::json!({"message_id": "m1"}),
        ),
        &fresh_assertion(w),
    )
}

#[test]
fn assertion_with_future_nbf_is_invalid_client() {
    let w = world();
    let r = reference(&w, CONSUMER, "orders.read");
    let now = unix_now();
    let form = |nbf| {
        with_client_assertion(
            exchange_form(
                TD,
                &Scope::parse("orders.read"),
                &r.token,
                TOKEN_TYPE_JWT,
                &serde_json::Value::Null,
                &serde_json::Value::Null,
            ),
            &assertion_with(&w, now, now + 60, nbf),
        )
    };
    for nbf in [now + 31, now + 3600, i64::MAX] {
        let e = w.issuer.exchange(&form(Some(nbf))).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidClient, "nbf {nbf}: {e}");
        assert!(e.description().contains("not valid before"), "{e}");
    }
    for nbf in [Some(now + 29), Some(now - 10), None] {
        assert!(w.issuer.exchange(&form(nbf)).is_ok(), "nbf {nbf:?}");
    }
}

#[test]
fn reference_with_future_nbf_is_invalid_grant() {
    let w = world();
    let mut claims = reference(&w, CONSUMER, "orders.read").claims;
    claims.nbf = Some(unix_now() + 120);
    let future = w.producer.sign(claims.clone()).unwrap();
    let e = w
        .issuer
        .exchange(&good_form(&w, &future.token))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidGrant, "{e}");
    assert!(e.description().contains("not valid before"), "{e}");
    claims.nbf = Some(unix_now() - 1);
    let past = w.producer.sign(claims).unwrap();
    assert!(w.issuer.exchange(&good_form(&w, &past.token)).is_ok());
}

#[test]
fn request_details_feed_tctx_and_request_context_feeds_rctx() {
    let w = world();
    let r = reference(&w, CONSUMER, "orders.read");
    let details = serde_json::json!({
        "source": {"topic": "orders", "offset": 7},
        // attempts to speak for the TTS: they stay inside request_details
        "txn": "forged", "producer": "spiffe://example.org/mallory",
        "chain": ["spiffe://example.org/mallory"], "depth": 0,
    });
    let context = serde_json::json!({"mode": "async", "req_wl": "spiffe://example.org/mallory"});
    let form = with_client_assertion(
        exchange_form(
            TD,
            &Scope::parse("orders.read"),
            &r.token,
            TOKEN_TYPE_JWT,
            &context,
            &details,
        ),
        &fresh_assertion(&w),
    );
    let issued = w.issuer.exchange(&form).unwrap();
    let tctx = &issued.claims.tctx;
    assert_eq!(tctx[super::issuer::TCTX_REQUEST_DETAILS], details);
    assert_eq!(tctx["txn"], "txn-1");
    assert_eq!(tctx["producer"], PRODUCER);
    assert_eq!(tctx["chain"], serde_json::json!([PRODUCER]));
    assert_eq!(tctx["depth"], 0);
    let rctx = &issued.claims.rctx;
    assert_eq!(rctx["req_wl"], CONSUMER);
    assert_eq!(rctx["request_context"], context);
    assert!(
        rctx.get("request_details").is_none(),
        "details moved to tctx"
    );

    // absent parameters leave no trace
    let bare = with_client_assertion(
        exchange_form(
            TD,
            &Scope::parse("orders.read"),
            &r.token,
            TOKEN_TYPE_JWT,
            &serde_json::Value::Null,
            &serde_json::Value::Null,
        ),
        &fresh_assertion(&w),
    );
    let issued = w.issuer.exchange(&bare).unwrap();
    assert!(issued.claims.tctx.get("request_details").is_none());
    assert_eq!(issued.claims.rctx, serde_json::json!({"req_wl": CONSUMER}));
}

#[test]
fn context_parameters_are_bounded_objects() {
    let w = world();
    let r = reference(&w, CONSUMER, "orders.read");
    let big = format!(r#"{{"k":"{}"}}"#, "x".repeat(MAX_CONTEXT_PARAM_BYTES));
    let mut deep = String::from("1");
    for _ in 0..MAX_CONTEXT_PARAM_DEPTH {
        deep = format!(r#"{{"a":{deep}}}"#);
    }
    let too_deep = format!(r#"{{"b":{deep}}}"#);
    for name in ["request_details", "request_context"] {
        for bad in ["[1]", "\"s\"", "null", "{", big.as_str(), too_deep.as_str()] {
            let e = w
                .issuer
                .exchange(&good_form(&w, &r.token).set(name, bad))
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{name}={bad:.40}: {e}");
            assert!(e.description().starts_with(name), "{e}");
        }
        let max_size = format!(r#"{{"k":"{}"}}"#, "x".repeat(MAX_CONTEXT_PARAM_BYTES - 8));
        for fine in [deep.as_str(), max_size.as_str(), "{}"] {
            w.issuer
                .exchange(&good_form(&w, &r.token).set(name, fine))
                .unwrap_or_else(|e| panic!("{name}={fine:.40}: {e}"));
        }
    }
}

#[tokio::test]
async fn null_request_details_are_not_sent() {
    // TokenRequest::request_details may be JSON null (no coordinates): the
    // client omits the parameter instead of sending the string "null".
    let w = world();
    let r = reference(&w, CONSUMER, "orders.read");
    let form = exchange_form(
        TD,
        &Scope::parse("orders.read"),
        &r.token,
        TOKEN_TYPE_JWT,
        &serde_json::Value::Null,
        &serde_json::Value::Null,
    );
    assert!(form.get("request_details").is_none());
    assert!(form.get("request_context").is_none());
    let t = consumer(&w)
        .acquire(&TokenRequest {
            reference: &r,
            scope: &Scope::parse("orders.read"),
            request_details: serde_json::Value::Null.into(),
        })
        .await
        .unwrap();
    assert!(
        t.claims
            .tctx
            .clone()
            .unwrap()
            .get("request_details")
            .is_none()
    );
}

/// Every refusal the issuer can be driven to, with values chosen to carry
/// quotes, backslashes, control and non-ASCII characters into descriptions.
fn every_refusal(w: &World) -> Vec<(&'static str, ExchangeForm)> {
    let r = reference(w, CONSUMER, "orders.read");
    let good = || good_form(w, &r.token);
    let now = unix_now();
    let nasty = "a\"b\\c\u{7}d\u{e9}\u{1F600}\ne";
    let mut expired = r.claims.clone();
    expired.iat = now - 600;
    expired.exp = now - 300;
    let expired = w.producer.sign(expired).unwrap().token;
    let mut not_before = r.claims.clone();
    not_before.nbf = Some(now + 600);
    let not_before = w.producer.sign(not_before).unwrap().token;
    let for_other = reference(w, OTHER, "orders.read").token;
    let wide = reference(w, CONSUMER, "orders.read orders.write").token;
    let narrow = reference(w, CONSUMER, "orders.write").token;
    let forger = SigningKey::generate(SigningAlg::ES256, "billing-1").unwrap();
    let forged = sign_assertion(
        &forger,
        CONSUMER,
        &w.issuer.token_endpoint(),
        Duration::from_secs(30),
    )
    .unwrap();
    let elsewhere =
        sign_assertion(&w.consumer_key, CONSUMER, nasty, Duration::from_secs(30)).unwrap();
    let not_owner = sign_assertion(
        &w.consumer_key,
        nasty,
        &w.issuer.token_endpoint(),
        Duration::from_secs(30),
    )
    .unwrap();
    let replayed = fresh_assertion(w);
    assert!(
        w.issuer
            .exchange(&with_client_assertion(good(), &replayed))
            .is_ok()
    );
    let rogue_idp = TestIssuer::new("https://idp.example.org", "elevate").unwrap();
    let rogue_at = rogue_idp
        .issue_access_token("mallory", "orders.read", Duration::from_secs(60))
        .unwrap();
    let at_form = |at: &str| {
        good().set("subject_token", at).set(
            "subject_token_type",
            txn_token_client::protocol::TOKEN_TYPE_ACCESS_TOKEN,
        )
    };
    vec![
        ("missing grant_type", good().set("grant_type", "")),
        ("unsupported grant_type", good().set("grant_type", nasty)),
        (
            "no client authentication",
            good().set("client_assertion", ""),
        ),
        (
            "unsupported assertion type",
            good().set("client_assertion_type", nasty),
        ),
        ("malformed assertion", good().set("client_assertion", nasty)),
        ("forged assertion", with_client_assertion(good(), &forged)),
        (
            "assertion for another endpoint",
            with_client_assertion(good(), &elsewhere),
        ),
        (
            "assertion issuer not key owner",
            with_client_assertion(good(), &not_owner),
        ),
        ("client_id mismatch", good().set("client_id", nasty)),
        (
            "replayed assertion",
            with_client_assertion(good(), &replayed),
        ),
        (
            "expired assertion",
            with_client_assertion(good(), &assertion_with(w, now - 200, now - 100, None)),
        ),
        (
            "long-lived assertion",
            with_client_assertion(good(), &assertion_with(w, now, now + 3600, None)),
        ),
        (
            "assertion issued in the future",
            with_client_assertion(good(), &assertion_with(w, now + 600, now + 660, None)),
        ),
        (
            "assertion nbf in the future",
            with_client_assertion(good(), &assertion_with(w, now, now + 60, Some(now + 600))),
        ),
        (
            "missing requested_token_type",
            good().set("requested_token_type", ""),
        ),
        (
            "wrong requested_token_type",
            good().set("requested_token_type", nasty),
        ),
        ("missing audience", good().set("audience", "")),
        ("wrong audience", good().set("audience", nasty)),
        ("missing subject_token", good().set("subject_token", "")),
        (
            "missing subject_token_type",
            good().set("subject_token_type", ""),
        ),
        ("missing scope", good().set("scope", "")),
        (
            "request_context not an object",
            good().set("request_context", nasty),
        ),
        (
            "request_details not an object",
            good().set("request_details", "[\"\\\\\"]"),
        ),
        (
            "request_details too large",
            good().set(
                "request_details",
                format!("{{\"k\":\"{}\"}}", "\\\"".repeat(MAX_CONTEXT_PARAM_BYTES)),
            ),
        ),
        (
            "unsupported subject_token_type",
            good().set("subject_token_type", nasty),
        ),
        ("malformed reference", good().set("subject_token", nasty)),
        ("expired reference", good().set("subject_token", expired)),
        (
            "reference not yet valid",
            good().set("subject_token", not_before),
        ),
        (
            "reference for another workload",
            good().set("subject_token", for_other),
        ),
        ("bad access token", at_form(nasty)),
        ("access token of another issuer", at_form(&rogue_at)),
        ("unknown scope", good().set("scope", nasty)),
        (
            "scope beyond the registry",
            good()
                .set("subject_token", wide)
                .set("scope", "orders.write"),
        ),
        (
            "scope beyond the reference",
            good().set("subject_token", narrow),
        ),
    ]
}

fn assert_description_charset(what: &str, e: &OAuthError) {
    let d = e.description();
    assert!(!d.is_empty(), "{what}: empty description");
    assert!(
        d.chars().all(is_description_char),
        "{what}: error_description outside RFC 6749 §5.2: {d:?}"
    );
    let body = serde_json::to_value(e.body()).unwrap();
    assert_eq!(body["error_description"], d, "{what}");
}

#[test]
fn every_error_description_is_within_the_rfc6749_character_set() {
    let w = world();
    let mut codes = std::collections::HashSet::new();
    for (what, form) in every_refusal(&w) {
        let e = w.issuer.exchange(&form).expect_err(what);
        assert_description_charset(what, &e);
        codes.insert(e.code);
    }
    // the form layer: repeated parameter, bad media type
    let e = ExchangeForm::from_pairs(vec![
        ("a\"\\\u{1}".into(), "1".into()),
        ("a\"\\\u{1}".into(), "2".into()),
    ])
    .unwrap_err();
    assert_description_charset("repeated parameter", &e);
    let e =
        txn_token_client::protocol::check_form_content_type(Some(b"text/plain; charset=\"\\\""))
            .unwrap_err();
    assert_description_charset("bad media type", &e);
    // a suspended workload authenticates and gets unauthorized_client
    assert!(w.issuer.suspend_workload(CONSUMER));
    let r = reference(&w, CONSUMER, "orders.read");
    let e = w.issuer.exchange(&good_form(&w, &r.token)).unwrap_err();
    assert_description_charset("suspended workload", &e);
    codes.insert(e.code);
    // every code but server_error (a signing failure) was driven
    for code in [
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidClient,
        ErrorCode::InvalidGrant,
        ErrorCode::UnauthorizedClient,
        ErrorCode::UnsupportedGrantType,
        ErrorCode::InvalidScope,
        ErrorCode::InvalidTarget,
    ] {
        assert!(codes.contains(&code), "{code} never triggered");
    }
}

#[test]
fn the_constructor_sanitizes_any_text() {
    let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
    for chunk in all.chars().collect::<Vec<_>>().chunks(200) {
        let text: String = chunk.iter().collect();
        let e = OAuthError::new(ErrorCode::InvalidRequest, &text);
        assert!(e.description().chars().all(is_description_char), "{text:?}");
    }
    let e = OAuthError::new(ErrorCode::InvalidRequest, "say \"hi\" \\ now\n");
    assert_eq!(e.description(), "say 'hi' / now ");
    let long = OAuthError::new(ErrorCode::InvalidRequest, "x".repeat(10_000));
    assert_eq!(
        long.description().len(),
        txn_token_client::protocol::MAX_DESCRIPTION_LEN
    );
    assert!(long.description().ends_with("..."));
    let exact = "y".repeat(txn_token_client::protocol::MAX_DESCRIPTION_LEN);
    assert_eq!(
        OAuthError::new(ErrorCode::InvalidRequest, &exact).description(),
        exact
    );
}

#[tokio::test]
async fn rotating_more_often_than_keep_previous_keeps_tokens_verifying() {
    let w = world();
    assert_eq!(w.issuer.settings().keep_previous_keys, 1);
    let tts = consumer(&w);
    let r = reference(&w, CONSUMER, "orders.read");
    let before = tts
        .exchange(
            &r.token,
            TOKEN_TYPE_JWT,
            &Scope::parse("orders.read"),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    let first_kid = w.issuer.current_kid();
    for _ in 0..4 {
        w.issuer.rotate_keys().unwrap();
    }
    assert_eq!(w.issuer.jwks()["keys"].as_array().unwrap().len(), 5);
    let v = txn_token_client::verify::TxnTokenVerifier::from_keys(TD, w.issuer.public_keys());
    assert!(v.verify(before.token.expose()).await.is_ok());
    assert!(w.issuer.public_keys().get(&first_kid).is_some());
    assert_eq!(
        w.issuer.settings().key_retention(),
        Duration::from_secs(60 + 30)
    );
}

// ---- over HTTP (axum on loopback) ----

struct Http {
    w: World,
    running: RunningTts,
    http: reqwest::Client,
}

async fn http_world() -> Http {
    let w = world();
    let running = RunningTts::start(w.issuer.clone(), "127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    Http {
        w,
        running,
        http: reqwest::Client::new(),
    }
}

impl Http {
    fn assertion(&self) -> String {
        sign_assertion(
            &self.w.consumer_key,
            CONSUMER,
            &self.running.token_endpoint(),
            Duration::from_secs(30),
        )
        .unwrap()
    }

    fn body(&self, form: &ExchangeForm) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.pairs())
            .finish()
    }

    async fn post(
        &self,
        content_type: Option<&str>,
        body: String,
        authorization: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self.http.post(self.running.token_endpoint()).body(body);
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        if let Some(a) = authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        req.send().await.unwrap()
    }
}

fn challenges_of(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn media_type_is_case_insensitive() {
    let h = http_world().await;
    let r = reference(&h.w, CONSUMER, "orders.read");
    let form = || {
        with_client_assertion(
            exchange_form(
                TD,
                &Scope::parse("orders.read"),
                &r.token,
                TOKEN_TYPE_JWT,
                &serde_json::json!({}),
                &serde_json::json!({}),
            ),
            &h.assertion(),
        )
    };
    for ct in [
        "application/x-www-form-urlencoded",
        "Application/X-WWW-Form-Urlencoded; charset=UTF-8",
        "APPLICATION/X-WWW-FORM-URLENCODED;CHARSET=utf-8",
        "application/x-www-form-urlencoded; Charset=\"UTF-8\"",
    ] {
        let resp = h.post(Some(ct), h.body(&form()), None).await;
        let status = resp.status().as_u16();
        assert_eq!(status, 200, "{ct}: {}", resp.text().await.unwrap());
    }
    for ct in [
        None,
        Some("application/json"),
        Some("application/x-www-form-urlencodedX"),
        Some("application/x-www-form-urlencoded-extra"),
        Some("text/x-www-form-urlencoded"),
        Some("application/x-www-form-urlencoded; charset=iso-8859-1"),
        Some("not a media type"),
    ] {
        let resp = h.post(ct, h.body(&form()), None).await;
        assert_eq!(resp.status().as_u16(), 400, "{ct:?}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request", "{ct:?}");
    }
}

#[tokio::test]
async fn every_401_carries_www_authenticate() {
    let h = http_world().await;
    let r = reference(&h.w, CONSUMER, "orders.read");
    let base = exchange_form(
        TD,
        &Scope::parse("orders.read"),
        &r.token,
        TOKEN_TYPE_JWT,
        &serde_json::json!({}),
        &serde_json::json!({}),
    );
    let replayed = h.assertion();
    let ok = h
        .post(
            Some("application/x-www-form-urlencoded"),
            h.body(&with_client_assertion(base.clone(), &replayed)),
            None,
        )
        .await;
    assert_eq!(ok.status().as_u16(), 200);
    assert!(challenges_of(&ok).is_empty(), "no challenge on success");
    let now = unix_now();
    let future_nbf = elevate_core::jws::sign(
        &h.w.consumer_key,
        ASSERTION_TYP,
        &AssertionClaims {
            iss: CONSUMER.into(),
            sub: CONSUMER.into(),
            aud: vec![h.running.token_endpoint()],
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            exp: now + 60,
            nbf: Some(now + 600),
        },
    )
    .unwrap();
    let cases = [
        ("no client authentication", base.clone()),
        (
            "garbage assertion",
            with_client_assertion(base.clone(), "x.y.z"),
        ),
        (
            "replayed assertion",
            with_client_assertion(base.clone(), &replayed),
        ),
        (
            "assertion nbf in the future",
            with_client_assertion(base.clone(), &future_nbf),
        ),
    ];
    let want = format!("private_key_jwt realm=\"{TD}\", error=\"invalid_client\"");
    for (what, form) in &cases {
        let resp = h
            .post(
                Some("application/x-www-form-urlencoded"),
                h.body(form),
                None,
            )
            .await;
        assert_eq!(resp.status().as_u16(), 401, "{what}");
        assert_eq!(challenges_of(&resp), vec![want.clone()], "{what}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client", "{what}");
    }
    // a client that tried the Authorization header gets a challenge in its scheme too
    let resp = h
        .post(
            Some("application/x-www-form-urlencoded"),
            h.body(&base),
            Some("Basic Y2xpZW50OnNlY3JldA=="),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        challenges_of(&resp),
        vec![
            format!("Basic realm=\"{TD}\", error=\"invalid_client\""),
            want.clone()
        ]
    );
    // a scheme that is not an RFC 9110 token is not echoed
    let resp = h
        .post(
            Some("application/x-www-form-urlencoded"),
            h.body(&base),
            Some("Ba\"sic x"),
        )
        .await;
    assert_eq!(challenges_of(&resp), vec![want]);
    h.running.shutdown().await.unwrap();
}

#[test]
fn challenges_are_valid_header_values_for_any_realm() {
    let c = super::http::challenges(
        "td\"\\\u{1}é",
        Some("Bearer"),
        Some(ErrorCode::InvalidClient),
    );
    let c: Vec<&str> = c.iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(
        c,
        vec![
            "Bearer realm=\"td'/??\", error=\"invalid_client\"",
            "private_key_jwt realm=\"td'/??\", error=\"invalid_client\""
        ]
    );
    let c = super::http::challenges("td", Some("PRIVATE_KEY_JWT"), None);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].to_str().unwrap(), "private_key_jwt realm=\"td\"");
}

// ---- RFC 8705 tls_client_auth (the TLS listener itself is tested with the
// binary in integration-tests/tests/tts_mtls.rs) ----

use crate::tls::{ClientCertificate, ServerTls, TlsError};
use txn_token_client::protocol::{ClientAuthMethod, with_client_id};

/// A CA and a certificate it issued with these URI SANs (DER), and the CA PEM.
fn svid(uris: &[&str]) -> (rustls::pki_types::CertificateDer<'static>, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer as CaIssuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = CaIssuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.der().clone(), ca_cert.pem())
}

fn mtls_form(reference: &str, client_id: Option<&str>) -> ExchangeForm {
    let form = exchange_form(
        TD,
        &Scope::parse("orders.read"),
        reference,
        TOKEN_TYPE_JWT,
        &serde_json::json!({"mode": "test"}),
        &serde_json::Value::Null,
    );
    match client_id {
        Some(c) => with_client_id(form, c),
        None => form,
    }
}

#[test]
fn tls_client_auth_is_opt_in_and_binds_the_token_to_the_certificate() {
    let w = world();
    let r = reference(&w, CONSUMER, "orders.read");
    let cert = ClientCertificate::from_der(svid(&[CONSUMER]).0);
    assert_eq!(cert.uri_sans(), [CONSUMER]);
    let code = |res: Result<Issued, OAuthError>| match res {
        Ok(_) => panic!("issued"),
        Err(e) => (e.code, e.description().to_string()),
    };
    // not opted in: deny by default
    let (c, d) = code(
        w.issuer
            .exchange_with_certificate(&mtls_form(&r.token, Some(CONSUMER)), Some(&cert)),
    );
    assert_eq!(c, ErrorCode::InvalidClient);
    assert!(
        d.contains("may not authenticate with tls_client_auth"),
        "{d}"
    );
    // opted in (certificate only)
    assert!(
        w.issuer
            .set_workload_auth_methods(CONSUMER, &[ClientAuthMethod::TlsClientAuth])
    );
    for client_id in [Some(CONSUMER), None] {
        let issued = w
            .issuer
            .exchange_with_certificate(&mtls_form(&r.token, client_id), Some(&cert))
            .unwrap();
        assert_eq!(issued.claims.req_wl, CONSUMER);
        assert_eq!(
            issued.claims.cnf,
            Some(serde_json::json!({ "x5t#S256": cert.x5t_s256() }))
        );
    }
    // both methods at once; neither; an assertion from a certificate-only workload
    let (c, d) = code(
        w.issuer
            .exchange_with_certificate(&good_form(&w, &r.token), Some(&cert)),
    );
    assert_eq!(c, ErrorCode::InvalidClient);
    assert!(d.contains("one method"), "{d}");
    let (c, _) = code(w.issuer.exchange(&mtls_form(&r.token, Some(CONSUMER))));
    assert_eq!(c, ErrorCode::InvalidClient);
    let (c, d) = code(w.issuer.exchange(&good_form(&w, &r.token)));
    assert_eq!(c, ErrorCode::InvalidClient);
    assert!(
        d.contains("may not authenticate with private_key_jwt"),
        "{d}"
    );
    // a client_id the certificate does not name
    let (c, d) = code(
        w.issuer
            .exchange_with_certificate(&mtls_form(&r.token, Some(OTHER)), Some(&cert)),
    );
    assert_eq!(c, ErrorCode::InvalidClient);
    assert!(d.contains("not a URI SAN"), "{d}");
    // a certificate for nobody registered, and one with no URI SAN
    for uris in [&["spiffe://example.org/nobody"][..], &[]] {
        let stranger = ClientCertificate::from_der(svid(uris).0);
        let (c, d) = code(
            w.issuer
                .exchange_with_certificate(&mtls_form(&r.token, None), Some(&stranger)),
        );
        assert_eq!(c, ErrorCode::InvalidClient);
        assert!(d.contains("no registered workload"), "{d}");
    }
    // both methods allowed: each works alone
    w.issuer.set_workload_auth_methods(
        CONSUMER,
        &[
            ClientAuthMethod::PrivateKeyJwt,
            ClientAuthMethod::TlsClientAuth,
        ],
    );
    let issued = w.issuer.exchange(&good_form(&w, &r.token)).unwrap();
    assert_eq!(issued.claims.cnf, None, "no certificate, no binding");
    assert!(
        w.issuer
            .exchange_with_certificate(&mtls_form(&r.token, None), Some(&cert))
            .is_ok()
    );
}

#[test]
fn a_certificate_naming_two_registered_workloads_needs_client_id() {
    let w = world();
    w.issuer
        .set_workload_auth_methods(CONSUMER, &[ClientAuthMethod::TlsClientAuth]);
    let r = reference(&w, CONSUMER, "orders.read");
    let cert = ClientCertificate::from_der(svid(&[OTHER, CONSUMER]).0);
    let e = w
        .issuer
        .exchange_with_certificate(&mtls_form(&r.token, None), Some(&cert))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidClient);
    assert!(e.description().contains("several"), "{}", e.description());
    let issued = w
        .issuer
        .exchange_with_certificate(&mtls_form(&r.token, Some(CONSUMER)), Some(&cert))
        .unwrap();
    assert_eq!(issued.claims.req_wl, CONSUMER);
}

#[test]
fn server_tls_from_pem_and_bad_pem() {
    let key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (_, ca_pem) = svid(&[CONSUMER]);
    let plain = ServerTls::from_pem(
        server.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        None,
    )
    .unwrap();
    assert!(!plain.client_auth());
    let mtls = ServerTls::from_pem(
        server.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        Some(ca_pem.as_bytes()),
    )
    .unwrap();
    assert!(mtls.client_auth());
    assert_eq!(
        mtls.rustls_config().alpn_protocols,
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    let e = ServerTls::from_pem(b"nothing", key.serialize_pem().as_bytes(), None).unwrap_err();
    assert!(
        matches!(
            e,
            TlsError::Pem {
                what: "server certificate",
                ..
            }
        ),
        "{e}"
    );
    let e = ServerTls::from_pem(server.pem().as_bytes(), b"nothing", None).unwrap_err();
    assert!(
        matches!(
            e,
            TlsError::Pem {
                what: "server key",
                ..
            }
        ),
        "{e}"
    );
    let e = ServerTls::from_pem(
        server.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        Some(b"no CA here"),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            TlsError::Pem {
                what: "client CA",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn auth_methods_in_the_configuration_are_checked() {
    let base = r#"
[[workloads]]
id = "spiffe://example.org/billing"
public_jwk = { kty = "EC", crv = "P-256", kid = "b1", x = "AAAA", y = "BBBB" }
"#;
    let with = |extra: &str| {
        ServiceConfig::from_toml(
            &format!("trust_domain = \"example.org\"\n{extra}\n{base}"),
            "t",
        )
    };
    let tls = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n";
    let ok = with(&format!(
        "{tls}[token_endpoint_auth_methods]\n\"spiffe://example.org/billing\" = [\"tls_client_auth\"]\n"
    ))
    .unwrap();
    assert_eq!(
        ok.token_endpoint_auth_methods["spiffe://example.org/billing"],
        [ClientAuthMethod::TlsClientAuth]
    );
    let again = ServiceConfig::from_toml(&ok.to_toml().unwrap(), "roundtrip").unwrap();
    assert_eq!(again.token_endpoint_auth_methods.len(), 1);
    assert!(again.tls.is_some_and(|t| t.client_ca.is_some()));
    for (bad, why) in [
        (
            format!("{tls}[token_endpoint_auth_methods]\n\"spiffe://example.org/nobody\" = [\"tls_client_auth\"]\n"),
            "not among",
        ),
        (
            format!("{tls}[token_endpoint_auth_methods]\n\"spiffe://example.org/billing\" = []\n"),
            "no method",
        ),
        (
            "[token_endpoint_auth_methods]\n\"spiffe://example.org/billing\" = [\"tls_client_auth\"]\n".to_string(),
            "client_ca",
        ),
        (
            format!("{tls}[token_endpoint_auth_methods]\n\"spiffe://example.org/billing\" = [\"client_secret_basic\"]\n"),
            "unknown variant",
        ),
    ] {
        let e = with(&bad).unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
    }
}

#[test]
fn challenges_name_tls_client_auth_when_offered() {
    let both = [
        ClientAuthMethod::PrivateKeyJwt,
        ClientAuthMethod::TlsClientAuth,
    ];
    let c = super::http::challenges_for("td", Some("Basic"), Some(ErrorCode::InvalidClient), &both);
    let c: Vec<&str> = c.iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(
        c,
        [
            "Basic realm=\"td\", error=\"invalid_client\"",
            "private_key_jwt realm=\"td\", error=\"invalid_client\"",
            "tls_client_auth realm=\"td\", error=\"invalid_client\"",
        ]
    );
    let c = super::http::challenges_for("td", Some("TLS_client_auth"), None, &both);
    assert_eq!(c.len(), 2, "a used scheme that is offered is not repeated");
}
