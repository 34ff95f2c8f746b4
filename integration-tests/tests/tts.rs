//! The reference Transaction Token Service as a real process on loopback,
//! exercised over HTTP: happy path, every error code, forged and replayed
//! client assertions, key rotation with tokens in flight, and an outage
//! (process killed) that turns into fast Retry answers and then recovers.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use elevate_core::ctxref::{MintRequest, MintedRef, SubjectKind, VerifiedRef, unix_now};
use elevate_core::keys::{SigningAlg, SigningKey, sha256_hex};
use elevate_core::scope::Scope;
use elevate_core::token::{TokenError, TokenRequest, TokenSource, TxnToken};
use elevate_testing::tts::{
    TTS_TRUST_DOMAIN, TestWorkload, TtsConfigDir, TtsProcess, client, client_config, write_config,
};
use elevate_tts::TestIssuer;
use txn_token_client::assertion::sign_assertion;
use txn_token_client::assertion::{ASSERTION_TYP, AssertionClaims};
use txn_token_client::breaker::{BreakerConfig, BreakerState};
use txn_token_client::protocol::{
    ExchangeForm, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, exchange_form, is_description_char,
    with_client_assertion,
};
use txn_token_client::{TtsClient, TxnTokenVerifier};

const BIN: &str = env!("CARGO_BIN_EXE_elevate-tts");

struct Setup {
    producer: TestWorkload,
    consumer: TestWorkload,
    other: TestWorkload,
    idp: TestIssuer,
    cfg: TtsConfigDir,
    tts: TtsProcess,
}

fn setup() -> Setup {
    let producer = TestWorkload::generate("orders", &["orders.read", "orders.write"]);
    let consumer = TestWorkload::generate("billing", &["orders.read"]);
    let other = TestWorkload::generate("shipping", &["orders.read", "orders.ship"]);
    let idp = TestIssuer::new("https://idp.tts.test.example", "elevate")
        .unwrap_or_else(|e| panic!("{e}"));
    let cfg = write_config(&[&producer, &consumer, &other], Some(&idp));
    let tts = TtsProcess::spawn(Path::new(BIN), &cfg.path, None)
        .unwrap_or_else(|e| panic!("start TTS: {e}"));
    Setup {
        producer,
        consumer,
        other,
        idp,
        cfg,
        tts,
    }
}

fn reference(s: &Setup, aud: &str, scope: &str) -> MintedRef {
    s.producer
        .minter(Duration::from_secs(300))
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[aud.to_string()],
            scope: &Scope::parse(scope),
            txn: "txn-tts-1",
            destination: "orders",
            payload: b"{\"order\":1}",
        })
        .unwrap_or_else(|e| panic!("{e}"))
}

fn verified(m: &MintedRef) -> VerifiedRef {
    VerifiedRef {
        claims: m.claims.clone(),
        token: m.token.clone(),
        token_sha256: sha256_hex(m.token.as_bytes()),
    }
}

async fn acquire(c: &TtsClient, r: &MintedRef, scope: &str) -> Result<TxnToken, TokenError> {
    let v = verified(r);
    let scope = Scope::parse(scope);
    c.acquire(&TokenRequest {
        reference: &v,
        scope: &scope,
        request_details:
            serde_json::json!({"source": {"topic": "orders", "partition": 0, "offset": 7}}).into(),
    })
    .await
}

fn denied(r: Result<TxnToken, TokenError>) -> String {
    match r {
        Err(TokenError::Denied { code, .. }) => code,
        other => panic!("expected Denied, got {other:?}"),
    }
}

/// Raw POST of a form; returns status, Cache-Control and JSON body.
async fn post_raw(url: &str, form: &[(&str, &str)]) -> (u16, String, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .form(form)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST: {e}"));
    let status = resp.status().as_u16();
    let cc = resp
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, cc, body)
}

fn base_form(subject_token: &str, scope: &str) -> ExchangeForm {
    exchange_form(
        TTS_TRUST_DOMAIN,
        &Scope::parse(scope),
        subject_token,
        TOKEN_TYPE_JWT,
        &serde_json::json!({}),
        &serde_json::json!({"message_id": "m1"}),
    )
}

fn assertion(s: &Setup, w: &TestWorkload) -> String {
    sign_assertion(
        &w.key,
        &w.id,
        &s.tts.token_endpoint(),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_token_verifies_with_published_jwks_alone() {
    let s = setup();
    let c = client(&s.tts, &s.consumer);
    let r = reference(&s, &s.consumer.id, "orders.read");
    let t = acquire(&c, &r, "orders.read")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.claims.sub, "alice");
    assert_eq!(t.claims.txn, "txn-tts-1");
    assert_eq!(t.claims.req_wl, s.consumer.id);
    assert_eq!(t.claims.scope, "orders.read");
    let tctx = t.claims.tctx.clone().unwrap_or_default();
    assert_eq!(tctx["producer"], s.producer.id.as_str());
    assert_eq!(tctx["destination"], "orders");
    // request_details feed tctx (under their own member), request_context rctx
    assert_eq!(tctx["request_details"]["source"]["offset"], 7);
    let rctx = t.claims.rctx.clone().unwrap_or_default();
    assert_eq!(rctx["req_wl"], s.consumer.id.as_str());
    assert_eq!(rctx["request_context"]["mode"], "async");
    assert!(rctx.get("request_details").is_none());

    // A verifier that knows nothing but the JWKS URL.
    let fresh =
        TxnTokenVerifier::remote(TTS_TRUST_DOMAIN, reqwest::Client::new(), &s.tts.jwks_url());
    let claims = fresh
        .verify(t.token.expose())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(claims, *t.claims);
    // ... and not for another trust domain
    let other =
        TxnTokenVerifier::remote("other.example", reqwest::Client::new(), &s.tts.jwks_url());
    assert!(other.verify(t.token.expose()).await.is_err());

    // Entry flow: a user's access token for the producer workload.
    let p = client(&s.tts, &s.producer);
    let at = s
        .idp
        .issue_access_token("bob", "orders.read orders.write", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    let entry = p
        .exchange_access_token(
            &at,
            &Scope::parse("orders.write"),
            &serde_json::json!({"http": "POST /orders"}),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(entry.claims.sub, "bob");
    assert_eq!(entry.claims.req_wl, s.producer.id);
    let ctx =
        txn_token_client::entry::subject_context_from_header(p.verifier(), entry.token.expose())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ctx.subject, "bob");
    assert_eq!(ctx.sub_kind, SubjectKind::Human);
    assert_ne!(ctx.txn, "txn-tts-1");

    // One log line per issuance, with the token's SHA-256 and never the token.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = s.tts.log();
    assert!(log.contains(&t.token.sha256()), "issuance logged by hash");
    assert!(!log.contains(t.token.expose()), "token never logged");
    assert!(!log.contains(&r.token), "subject token never logged");
    assert!(!log.contains(&at), "access token never logged");
    assert_eq!(log.matches("txn-token issued").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_over_http() {
    let s = setup();
    let url = s.tts.token_endpoint();
    let r = reference(&s, &s.consumer.id, "orders.read");
    let check =
        |(status, cc, body): (u16, String, serde_json::Value), want_status: u16, want: &str| {
            assert_eq!(status, want_status, "status for {want}: {body}");
            assert_eq!(body["error"], want, "{body}");
            assert!(body["error_description"].is_string());
            assert_eq!(cc, "no-store");
        };
    let good = || {
        with_client_assertion(
            base_form(&r.token, "orders.read"),
            &assertion(&s, &s.consumer),
        )
    };
    let send = |f: ExchangeForm| {
        let url = url.clone();
        async move {
            let pairs: Vec<(String, String)> = f
                .pairs()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let refs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            post_raw(&url, &refs).await
        }
    };

    // success carries no-store, token_type N_A
    let (status, cc, body) = send(good()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cc, "no-store");
    assert_eq!(body["token_type"], "N_A");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:txn_token"
    );
    assert!(body.get("refresh_token").is_none());

    // invalid_request: missing subject_token; repeated parameter; not a form
    check(
        send(good().set("subject_token", "")).await,
        400,
        "invalid_request",
    );
    let a = assertion(&s, &s.consumer);
    check(
        post_raw(
            &url,
            &[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("scope", "a"),
                ("scope", "b"),
                ("client_assertion", &a),
            ],
        )
        .await,
        400,
        "invalid_request",
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&serde_json::json!({"grant_type": "x"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_eq!(body["error"], "invalid_request");
    // invalid_client (401): no client authentication; forged assertion
    check(
        send(base_form(&r.token, "orders.read")).await,
        401,
        "invalid_client",
    );
    let forger = SigningKey::generate(SigningAlg::ES256, s.consumer.key.kid())
        .unwrap_or_else(|e| panic!("{e}"));
    let forged = sign_assertion(&forger, &s.consumer.id, &url, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    check(
        send(with_client_assertion(
            base_form(&r.token, "orders.read"),
            &forged,
        ))
        .await,
        401,
        "invalid_client",
    );
    // invalid_client: assertion for another endpoint
    let elsewhere = sign_assertion(
        &s.consumer.key,
        &s.consumer.id,
        "http://127.0.0.1:1/token",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    check(
        send(with_client_assertion(
            base_form(&r.token, "orders.read"),
            &elsewhere,
        ))
        .await,
        401,
        "invalid_client",
    );
    // invalid_grant: reference for another workload
    let r_other = reference(&s, &s.other.id, "orders.read");
    check(
        send(with_client_assertion(
            base_form(&r_other.token, "orders.read"),
            &assertion(&s, &s.consumer),
        ))
        .await,
        400,
        "invalid_grant",
    );
    // invalid_scope: unknown scope
    check(
        send(good().set("scope", "admin.everything")).await,
        400,
        "invalid_scope",
    );
    // invalid_target: wrong audience
    check(
        send(good().set("audience", "other.example")).await,
        400,
        "invalid_target",
    );
    // unsupported_grant_type
    check(
        send(good().set("grant_type", "client_credentials")).await,
        400,
        "unsupported_grant_type",
    );
    let _ = &s.cfg;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_rules_through_the_client() {
    let s = setup();
    let c = client(&s.tts, &s.consumer);
    // expired reference
    let mut claims = reference(&s, &s.consumer.id, "orders.read").claims;
    claims.iat = unix_now() - 900;
    claims.exp = unix_now() - 600;
    let expired = s
        .producer
        .minter(Duration::from_secs(300))
        .sign(claims)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        denied(acquire(&c, &expired, "orders.read").await),
        "invalid_grant"
    );
    // addressed to another workload
    let r_other = reference(&s, &s.other.id, "orders.read");
    assert_eq!(
        denied(acquire(&c, &r_other, "orders.read").await),
        "invalid_grant"
    );
    // scope escalation beyond the reference
    let r = reference(&s, &s.consumer.id, "orders.read");
    assert_eq!(
        denied(acquire(&c, &r, "orders.read orders.write").await),
        "invalid_scope"
    );
    // scope escalation beyond what the registry allows this workload
    let wide = reference(&s, &s.consumer.id, "orders.read orders.write");
    assert_eq!(
        denied(acquire(&c, &wide, "orders.write").await),
        "invalid_scope"
    );
    // a reference signed by an unregistered key
    let rogue = TestWorkload::generate("orders", &[]);
    let forged = rogue
        .minter(Duration::from_secs(60))
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: std::slice::from_ref(&s.consumer.id),
            scope: &Scope::parse("orders.read"),
            txn: "t",
            destination: "orders",
            payload: b"",
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        denied(acquire(&c, &forged, "orders.read").await),
        "invalid_grant"
    );
    // still fine for the right request
    assert!(acquire(&c, &r, "orders.read").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_client_assertion_jti_is_refused() {
    let s = setup();
    let r = reference(&s, &s.consumer.id, "orders.read");
    let a = assertion(&s, &s.consumer);
    let form = with_client_assertion(base_form(&r.token, "orders.read"), &a);
    let pairs: Vec<(&str, &str)> = form.pairs().collect();
    let (status, _, body) = post_raw(&s.tts.token_endpoint(), &pairs).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = post_raw(&s.tts.token_endpoint(), &pairs).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_with_tokens_in_flight() {
    let s = setup();
    let mut cfg = client_config(&s.tts, &s.consumer);
    cfg.jwks_min_refresh = Duration::ZERO;
    let c = Arc::new(TtsClient::new(cfg, s.consumer.key.clone()).unwrap_or_else(|e| panic!("{e}")));
    let r = Arc::new(reference(&s, &s.consumer.id, "orders.read"));
    let before = acquire(&c, &r, "orders.read")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Acquire continuously from 4 tasks while the key rotates underneath.
    let stop = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, r) = (c.clone(), r.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while Instant::now() < stop {
                got.push(acquire(&c, &r, "orders.read").await);
            }
            got
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = reqwest::Client::new()
        .post(s.tts.rotate_url())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 200);
    let rotated: serde_json::Value = resp.json().await.unwrap_or_default();
    let new_kid = rotated["kid"].as_str().unwrap_or_default().to_string();

    let mut tokens = vec![before];
    for t in tasks {
        for res in t.await.unwrap_or_else(|e| panic!("{e}")) {
            tokens.push(res.unwrap_or_else(|e| panic!("acquisition failed during rotation: {e}")));
        }
    }
    let after = acquire(&c, &r, "orders.read")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokens.push(after);
    // Every token, old or new, verifies with the JWKS as published now.
    let fresh =
        TxnTokenVerifier::remote(TTS_TRUST_DOMAIN, reqwest::Client::new(), &s.tts.jwks_url());
    let mut kids = std::collections::HashSet::new();
    for t in &tokens {
        fresh
            .verify(t.token.expose())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let header = t.token.expose().split('.').next().unwrap_or_default();
        kids.insert(header.to_string());
    }
    assert!(kids.len() >= 2, "tokens from both keys");
    assert!(fresh.cached_kids().contains(&new_kid));
    assert!(tokens.len() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_gives_fast_retry_then_recovers_on_restart() {
    let mut s = setup();
    let mut cfg = client_config(&s.tts, &s.consumer);
    cfg.max_attempts = 2;
    cfg.request_timeout = Duration::from_millis(500);
    cfg.breaker = BreakerConfig {
        threshold: 3,
        cool_down: Duration::from_millis(500),
    };
    let c = TtsClient::new(cfg, s.consumer.key.clone()).unwrap_or_else(|e| panic!("{e}"));
    let r = reference(&s, &s.consumer.id, "orders.read");
    for _ in 0..5 {
        acquire(&c, &r, "orders.read")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let addr = s.tts.addr();
    s.tts.kill();

    // Every call is Retry (Unavailable); once the breaker opens, answers are immediate.
    let mut open_latencies = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        match acquire(&c, &r, "orders.read").await {
            Err(TokenError::Unavailable { .. }) => {}
            other => panic!("expected Unavailable, got {other:?}"),
        }
        if c.breaker_state() == BreakerState::Open {
            open_latencies.push(t0.elapsed());
        }
    }
    assert_eq!(c.breaker_state(), BreakerState::Open);
    let fast = open_latencies
        .iter()
        .filter(|d| **d < Duration::from_millis(20))
        .count();
    assert!(fast >= 5, "open circuit answers fast: {open_latencies:?}");

    // Restart on the same port; after the cool-down a probe closes the circuit.
    s.tts =
        TtsProcess::respawn(Path::new(BIN), &s.cfg.path, addr).unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match acquire(&c, &r, "orders.read").await {
            Ok(t) => {
                assert_eq!(t.claims.sub, "alice");
                break;
            }
            Err(TokenError::Unavailable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("did not recover: {e}"),
        }
    }
    assert_eq!(c.breaker_state(), BreakerState::Closed);
}

// ---- conformance: RFC 7523 §3 (nbf), RFC 6749 §5.2 (WWW-Authenticate,
// error_description), RFC 9110 §8.3.1 (media types), the draft's tctx/rctx
// mapping, and key retention across rotations ----

/// A raw answer of the token endpoint.
struct Raw {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: serde_json::Value,
}

impl Raw {
    fn challenges(&self) -> Vec<String> {
        self.headers
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// POSTs `form` urlencoded, with `content_type` instead of the usual one when given.
async fn post_form(url: &str, form: &ExchangeForm, content_type: Option<&str>) -> Raw {
    let http = reqwest::Client::new();
    let pairs: Vec<(&str, &str)> = form.pairs().collect();
    let mut req = http
        .post(url)
        .form(&pairs)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(ct) = content_type {
        let v = reqwest::header::HeaderValue::from_str(ct).unwrap_or_else(|e| panic!("{e}"));
        req.headers_mut().insert(reqwest::header::CONTENT_TYPE, v);
    }
    let resp = http
        .execute(req)
        .await
        .unwrap_or_else(|e| panic!("POST: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    Raw {
        status,
        headers,
        body,
    }
}

/// A client assertion with explicit time claims.
fn assertion_at(s: &Setup, iat: i64, exp: i64, nbf: Option<i64>) -> String {
    elevate_core::jws::sign(
        &s.consumer.key,
        ASSERTION_TYP,
        &AssertionClaims {
            iss: s.consumer.id.clone(),
            sub: s.consumer.id.clone(),
            aud: vec![s.tts.token_endpoint()],
            jti: uuid::Uuid::new_v4().to_string(),
            iat,
            exp,
            nbf,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn challenge() -> String {
    format!("private_key_jwt realm=\"{TTS_TRUST_DOMAIN}\", error=\"invalid_client\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbf_in_the_future_is_refused_for_assertions_and_references() {
    let s = setup();
    let url = s.tts.token_endpoint();
    let r = reference(&s, &s.consumer.id, "orders.read");
    let now = unix_now();
    // client assertion not valid for another 10 minutes: invalid_client (401)
    let a = assertion_at(&s, now, now + 60, Some(now + 600));
    let raw = post_form(
        &url,
        &with_client_assertion(base_form(&r.token, "orders.read"), &a),
        None,
    )
    .await;
    assert_eq!(raw.status, 401, "{}", raw.body);
    assert_eq!(raw.body["error"], "invalid_client");
    assert_eq!(raw.challenges(), vec![challenge()]);
    // ... accepted within the 30 s leeway
    let a = assertion_at(&s, now, now + 60, Some(now + 20));
    let raw = post_form(
        &url,
        &with_client_assertion(base_form(&r.token, "orders.read"), &a),
        None,
    )
    .await;
    assert_eq!(raw.status, 200, "{}", raw.body);
    // a context reference not valid yet: invalid_grant
    let mut claims = r.claims.clone();
    claims.nbf = Some(now + 600);
    let future = s
        .producer
        .minter(Duration::from_secs(300))
        .sign(claims)
        .unwrap_or_else(|e| panic!("{e}"));
    let c = client(&s.tts, &s.consumer);
    match acquire(&c, &future, "orders.read").await {
        Err(TokenError::Denied { code, description }) => {
            assert_eq!(code, "invalid_grant");
            assert!(
                description.unwrap_or_default().contains("not valid before"),
                "names the reason"
            );
        }
        other => panic!("expected invalid_grant, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_401_carries_www_authenticate() {
    let s = setup();
    let url = s.tts.token_endpoint();
    let r = reference(&s, &s.consumer.id, "orders.read");
    let base = || base_form(&r.token, "orders.read");
    let now = unix_now();
    let forger = SigningKey::generate(SigningAlg::ES256, s.consumer.key.kid())
        .unwrap_or_else(|e| panic!("{e}"));
    let forged = sign_assertion(&forger, &s.consumer.id, &url, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let elsewhere = sign_assertion(
        &s.consumer.key,
        &s.consumer.id,
        "http://127.0.0.1:1/token",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let replayed = assertion(&s, &s.consumer);
    let first = post_form(&url, &with_client_assertion(base(), &replayed), None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.challenges().is_empty(), "no challenge on a 200");
    let cases = vec![
        ("no client authentication", base()),
        (
            "unsupported assertion type",
            with_client_assertion(base(), &assertion(&s, &s.consumer))
                .set("client_assertion_type", "urn:x"),
        ),
        ("forged", with_client_assertion(base(), &forged)),
        (
            "another endpoint",
            with_client_assertion(base(), &elsewhere),
        ),
        ("replayed", with_client_assertion(base(), &replayed)),
        (
            "expired",
            with_client_assertion(base(), &assertion_at(&s, now - 300, now - 200, None)),
        ),
        (
            "issued in the future",
            with_client_assertion(base(), &assertion_at(&s, now + 600, now + 630, None)),
        ),
        (
            "nbf in the future",
            with_client_assertion(base(), &assertion_at(&s, now, now + 60, Some(now + 600))),
        ),
    ];
    for (what, form) in &cases {
        let raw = post_form(&url, form, None).await;
        assert_eq!(raw.status, 401, "{what}: {}", raw.body);
        assert_eq!(raw.body["error"], "invalid_client", "{what}");
        assert_eq!(raw.challenges(), vec![challenge()], "{what}");
    }
    // RFC 6749 §5.2: a client that tried the Authorization header gets a
    // challenge in the scheme it used, besides the one the service supports
    let resp = reqwest::Client::new()
        .post(&url)
        .basic_auth("client", Some("secret"))
        .form(&base().pairs().collect::<Vec<_>>())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 401);
    let got: Vec<String> = resp
        .headers()
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        got,
        vec![
            format!("Basic realm=\"{TTS_TRUST_DOMAIN}\", error=\"invalid_client\""),
            challenge()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_descriptions_stay_within_the_rfc6749_character_set() {
    let s = setup();
    let url = s.tts.token_endpoint();
    let r = reference(&s, &s.consumer.id, "orders.read");
    let good = || {
        with_client_assertion(
            base_form(&r.token, "orders.read"),
            &assertion(&s, &s.consumer),
        )
    };
    let nasty = "q\"b\\s\u{1}c\u{e9}\u{1F600}\nn";
    let now = unix_now();
    let mut expired = r.claims.clone();
    expired.iat = now - 900;
    expired.exp = now - 600;
    let expired = s
        .producer
        .minter(Duration::from_secs(300))
        .sign(expired)
        .unwrap_or_else(|e| panic!("{e}"))
        .token;
    let other = reference(&s, &s.other.id, "orders.read").token;
    let not_owner = sign_assertion(&s.consumer.key, nasty, &url, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let elsewhere = sign_assertion(
        &s.consumer.key,
        &s.consumer.id,
        nasty,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let cases: Vec<(&str, ExchangeForm, Option<&str>)> = vec![
        (
            "unsupported grant_type",
            good().set("grant_type", nasty),
            None,
        ),
        (
            "no client authentication",
            base_form(&r.token, "orders.read"),
            None,
        ),
        (
            "malformed assertion",
            good().set("client_assertion", nasty),
            None,
        ),
        (
            "assertion issuer not key owner",
            with_client_assertion(base_form(&r.token, "orders.read"), &not_owner),
            None,
        ),
        (
            "assertion for another endpoint",
            with_client_assertion(base_form(&r.token, "orders.read"), &elsewhere),
            None,
        ),
        ("client_id mismatch", good().set("client_id", nasty), None),
        (
            "nbf in the future",
            with_client_assertion(
                base_form(&r.token, "orders.read"),
                &assertion_at(&s, now, now + 60, Some(now + 600)),
            ),
            None,
        ),
        (
            "wrong requested_token_type",
            good().set("requested_token_type", nasty),
            None,
        ),
        ("wrong audience", good().set("audience", nasty), None),
        (
            "missing subject_token",
            good().set("subject_token", ""),
            None,
        ),
        (
            "request_details not an object",
            good().set("request_details", nasty),
            None,
        ),
        (
            "request_context too large",
            good().set(
                "request_context",
                format!("{{\"k\":\"{}\"}}", "\\\"".repeat(2048)),
            ),
            None,
        ),
        (
            "unsupported subject_token_type",
            good().set("subject_token_type", nasty),
            None,
        ),
        (
            "malformed reference",
            good().set("subject_token", nasty),
            None,
        ),
        (
            "expired reference",
            good().set("subject_token", expired),
            None,
        ),
        (
            "reference for another workload",
            good().set("subject_token", other),
            None,
        ),
        (
            "bad access token",
            good()
                .set("subject_token", nasty)
                .set("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
            None,
        ),
        ("unknown scope", good().set("scope", nasty), None),
        (
            "scope beyond the reference",
            good().set("scope", "orders.read orders.write"),
            None,
        ),
        ("not a form", good(), Some("application/json")),
        ("bad media type", good(), Some("text/plain; charset=\"\\\"")),
    ];
    for (what, form, ct) in &cases {
        let raw = post_form(&url, form, *ct).await;
        assert!(
            raw.status == 400 || raw.status == 401,
            "{what}: {}",
            raw.status
        );
        let d = raw.body["error_description"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {}", raw.body));
        assert!(!d.is_empty(), "{what}");
        assert!(
            d.chars().all(is_description_char),
            "{what}: error_description outside RFC 6749 §5.2: {d:?}"
        );
        for v in raw.headers.get_all(reqwest::header::WWW_AUTHENTICATE) {
            assert!(v.to_str().is_ok(), "{what}: challenge is visible ASCII");
        }
    }
    // a repeated parameter whose name needs escaping
    let resp = reqwest::Client::new()
        .post(&url)
        .form(&[("a\"\\", "1"), ("a\"\\", "2")])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let d = body["error_description"].as_str().unwrap_or_default();
    assert!(
        d.contains("repeated") && d.chars().all(is_description_char),
        "{d:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_types_are_case_insensitive() {
    let s = setup();
    let url = s.tts.token_endpoint();
    let r = reference(&s, &s.consumer.id, "orders.read");
    for ct in [
        "Application/X-WWW-Form-Urlencoded; charset=UTF-8",
        "APPLICATION/X-WWW-FORM-URLENCODED",
        "application/x-www-form-urlencoded;CHARSET=utf-8",
    ] {
        let form = with_client_assertion(
            base_form(&r.token, "orders.read"),
            &assertion(&s, &s.consumer),
        );
        let raw = post_form(&url, &form, Some(ct)).await;
        assert_eq!(raw.status, 200, "{ct}: {}", raw.body);
        assert_eq!(raw.body["token_type"], "N_A");
    }
    for ct in [
        "application/x-www-form-urlencodedx",
        "application/json",
        "application/x-www-form-urlencoded; charset=latin1",
    ] {
        let form = with_client_assertion(
            base_form(&r.token, "orders.read"),
            &assertion(&s, &s.consumer),
        );
        let raw = post_form(&url, &form, Some(ct)).await;
        assert_eq!(raw.status, 400, "{ct}");
        assert_eq!(raw.body["error"], "invalid_request", "{ct}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_details_cannot_overwrite_what_the_tts_puts_in_tctx() {
    let s = setup();
    let url = s.tts.token_endpoint();
    let r = reference(&s, &s.consumer.id, "orders.read");
    let details = serde_json::json!({
        "txn": "forged", "producer": "spiffe://tts.test.example/mallory",
        "destination": "elsewhere", "chain": [], "hops": [], "depth": 3,
        "source": {"topic": "orders"},
    });
    let context =
        serde_json::json!({"req_wl": "spiffe://tts.test.example/mallory", "mode": "async"});
    let form = with_client_assertion(
        exchange_form(
            TTS_TRUST_DOMAIN,
            &Scope::parse("orders.read"),
            &r.token,
            TOKEN_TYPE_JWT,
            &context,
            &details,
        ),
        &assertion(&s, &s.consumer),
    );
    let raw = post_form(&url, &form, None).await;
    assert_eq!(raw.status, 200, "{}", raw.body);
    let token = raw.body["access_token"].as_str().unwrap_or_default();
    let verifier =
        TxnTokenVerifier::remote(TTS_TRUST_DOMAIN, reqwest::Client::new(), &s.tts.jwks_url());
    let claims = verifier
        .verify(token)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let tctx = claims.tctx.unwrap_or_default();
    assert_eq!(tctx["txn"], "txn-tts-1");
    assert_eq!(tctx["producer"], s.producer.id.as_str());
    assert_eq!(tctx["destination"], "orders");
    assert_eq!(tctx["chain"], serde_json::json!([s.producer.id]));
    assert_eq!(tctx["depth"], 0);
    assert_eq!(tctx["request_details"], details);
    let rctx = claims.rctx.unwrap_or_default();
    assert_eq!(rctx["req_wl"], s.consumer.id.as_str());
    assert_eq!(rctx["request_context"], context);
    // oversized details are refused, not truncated
    let big = serde_json::json!({"blob": "x".repeat(4096)});
    let form = with_client_assertion(
        exchange_form(
            TTS_TRUST_DOMAIN,
            &Scope::parse("orders.read"),
            &r.token,
            TOKEN_TYPE_JWT,
            &context,
            &big,
        ),
        &assertion(&s, &s.consumer),
    );
    let raw = post_form(&url, &form, None).await;
    assert_eq!(raw.status, 400);
    assert_eq!(raw.body["error"], "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_more_often_than_keep_previous_keeps_old_tokens_verifying() {
    let s = setup();
    assert_eq!(s.cfg.config.keep_previous_keys, 1);
    let mut cfg = client_config(&s.tts, &s.consumer);
    cfg.jwks_min_refresh = Duration::ZERO; // the client refetches the JWKS for the new kid
    let c = TtsClient::new(cfg, s.consumer.key.clone()).unwrap_or_else(|e| panic!("{e}"));
    let r = reference(&s, &s.consumer.id, "orders.read");
    let before = acquire(&c, &r, "orders.read")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // three rotations within the token's lifetime (keep_previous_keys = 1)
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let resp = http
            .post(s.tts.rotate_url())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status().as_u16(), 200);
    }
    let jwks: serde_json::Value = http
        .get(s.tts.jwks_url())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(4), "{jwks}");
    // a verifier that knows only the published JWKS still accepts the old token
    let fresh =
        TxnTokenVerifier::remote(TTS_TRUST_DOMAIN, reqwest::Client::new(), &s.tts.jwks_url());
    let claims = fresh
        .verify(before.token.expose())
        .await
        .unwrap_or_else(|e| panic!("token signed before the rotations: {e}"));
    assert_eq!(claims.sub, "alice");
    // and new tokens still come and verify
    let after = acquire(&c, &r, "orders.read")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(fresh.verify(after.token.expose()).await.is_ok());
}
