//! The Transaction Token Service as a fleet: two replicas of the real binary,
//! as separate processes, on one PostgreSQL schema (each test its own, dropped
//! at the end), behind one public name (`public_url`), over real HTTP on
//! loopback. Shows: an assertion replayed at the other replica is refused; a
//! workload revoked through one replica's admin API is refused by the other
//! within the measured bound, messages in flight for it included; a key
//! rotated fleet-wide keeps every token verifiable, each new key published by
//! both replicas before either signs with it; killing one replica mid-load
//! loses no exchange the client retries against the other; the admin API
//! refuses unauthenticated and wrongly authenticated calls and audits every
//! change; the embedded mode (no store) serves the admin API too; one client
//! given both replicas' endpoints spreads its exchanges over them and fails
//! over when one dies; `/readyz` is 503 while the store is unreachable (a TCP
//! forwarder in front of PostgreSQL, stopped and started by the test) and 200
//! when it is back; and a change whose NOTIFY is lost (the forwarder drops
//! it) is honoured within `poll_ms`.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 (`scripts/services-up`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use elevate_core::ctxref::{MintRequest, MintedRef, SubjectKind, unix_now};
use elevate_core::jws;
use elevate_core::keys::{KeySet, sha256_hex};
use elevate_core::scope::Scope;
use elevate_core::token::TXN_TOKEN_TYP;
use elevate_testing::tts::{
    FleetStore, TTS_TRUST_DOMAIN, TestOperator, TestWorkload, TtsConfigDir, TtsProcess,
    write_config, write_fleet_config,
};
use elevate_tts::admin::{ADMIN_TYP, AdminClaims};
use elevate_tts::{AdminConfig, ServiceConfig};
use txn_token_client::assertion::{AssertionClaims, sign_assertion};
use txn_token_client::protocol::{
    ExchangeForm, TOKEN_TYPE_JWT, exchange_form, with_client_assertion,
};
use txn_token_client::{TtsClient, TtsClientConfig};

const BIN: &str = env!("CARGO_BIN_EXE_elevate-tts");
/// The name both replicas serve under (assertion and admin `aud`).
const PUBLIC: &str = "http://tts.fleet.test";

struct Fleet {
    producer: TestWorkload,
    consumer: TestWorkload,
    operator: TestOperator,
    a: TtsProcess,
    b: TtsProcess,
    _cfg: TtsConfigDir,
    _store: FleetStore,
}

fn fleet(tune: impl Fn(&mut ServiceConfig)) -> Fleet {
    let producer = TestWorkload::generate("orders", &["orders.read", "orders.write"]);
    let consumer = TestWorkload::generate("billing", &["orders.read"]);
    let operator = TestOperator::generate("alice");
    let store = FleetStore::new();
    let (cfg, paths) = write_fleet_config(
        &[&producer, &consumer],
        &store,
        &[&operator],
        &["replica-a", "replica-b"],
        |c| {
            c.public_url = Some(PUBLIC.into());
            tune(c);
        },
    );
    let a = TtsProcess::spawn(Path::new(BIN), &paths[0], None)
        .unwrap_or_else(|e| panic!("start replica a: {e}"));
    let b = TtsProcess::spawn(Path::new(BIN), &paths[1], None)
        .unwrap_or_else(|e| panic!("start replica b: {e}"));
    Fleet {
        producer,
        consumer,
        operator,
        a,
        b,
        _cfg: cfg,
        _store: store,
    }
}

fn reference(producer: &TestWorkload, consumer: &TestWorkload, txn: &str) -> MintedRef {
    producer
        .minter(Duration::from_secs(300))
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: std::slice::from_ref(&consumer.id),
            scope: &Scope::parse("orders.read"),
            txn,
            destination: "billing",
            payload: b"{\"order\":1}",
        })
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A token request by `who` for `r`, with a fresh client assertion to `PUBLIC`.
fn form(who: &TestWorkload, r: &MintedRef) -> ExchangeForm {
    let assertion = sign_assertion(
        &who.key,
        &who.id,
        &format!("{PUBLIC}/token"),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    with_client_assertion(
        exchange_form(
            TTS_TRUST_DOMAIN,
            &Scope::parse("orders.read"),
            &r.token,
            TOKEN_TYPE_JWT,
            &serde_json::json!({}),
            &serde_json::json!({}),
        ),
        &assertion,
    )
}

/// Posts `form` to `tts`; the status and body, or `None` when the replica is unreachable.
async fn post(
    http: &reqwest::Client,
    tts_base: &str,
    form: &ExchangeForm,
) -> Option<(u16, serde_json::Value)> {
    let pairs: Vec<(&str, &str)> = form.pairs().collect();
    let resp = http
        .post(format!("{tts_base}/token"))
        .form(&pairs)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.json().await.unwrap_or(serde_json::Value::Null)))
}

async fn exchange(
    http: &reqwest::Client,
    tts: &TtsProcess,
    form: &ExchangeForm,
) -> (u16, serde_json::Value) {
    post(http, &tts.base_url(), form)
        .await
        .unwrap_or_else(|| panic!("replica {} unreachable", tts.addr()))
}

async fn jwks(http: &reqwest::Client, tts: &TtsProcess) -> KeySet {
    let doc: serde_json::Value = http
        .get(tts.jwks_url())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let set = serde_json::from_value(doc).unwrap_or_else(|e| panic!("JWKS: {e}"));
    KeySet::from_jwks(&set).unwrap_or_else(|e| panic!("{e}"))
}

fn kid_of(token: &str) -> String {
    jws::parse(token, TXN_TOKEN_TYP)
        .ok()
        .and_then(|p| p.header.kid.clone())
        .unwrap_or_default()
}

fn verifies(token: &str, keys: &KeySet) -> bool {
    jws::parse(token, TXN_TOKEN_TYP).is_ok_and(|p| p.verify(keys).is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assertion_replayed_at_the_other_replica_is_refused() {
    let f = fleet(|_| {});
    let http = reqwest::Client::new();
    let r = reference(&f.producer, &f.consumer, "txn-replay");
    let once = form(&f.consumer, &r);
    let (status, body) = exchange(&http, &f.a, &once).await;
    assert_eq!(status, 200, "first use at replica a: {body}");
    let (status, body) = exchange(&http, &f.b, &once).await;
    assert_eq!(status, 401, "the same assertion at replica b: {body}");
    assert_eq!(body["error"], "invalid_client");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap_or_default()
            .contains("replayed"),
        "{body}"
    );
    // and the other way round, with a fresh assertion
    let again = form(&f.consumer, &r);
    assert_eq!(exchange(&http, &f.b, &again).await.0, 200);
    assert_eq!(exchange(&http, &f.a, &again).await.0, 401);
    let metrics = f.a.metrics(&http).await;
    assert!(
        metrics.contains("tts_exchanges_total{outcome=\"refused\",code=\"invalid_client\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tts_store_duration_seconds_count"),
        "{metrics}"
    );
    for tts in [&f.a, &f.b] {
        let ready = http
            .get(format!("{}/readyz", tts.base_url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ready.status().as_u16(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_revoked_at_one_replica_is_refused_by_the_other_within_the_bound() {
    let f = fleet(|_| {});
    let http = reqwest::Client::new();
    // A message in flight: the producer signed its reference before the revocation.
    let in_flight = reference(&f.producer, &f.consumer, "txn-in-flight");
    assert_eq!(
        exchange(&http, &f.b, &form(&f.consumer, &in_flight))
            .await
            .0,
        200
    );
    let sent = Instant::now();
    let (status, body) = f
        .operator
        .call(
            &http,
            &f.a,
            "POST",
            "/admin/workloads/revoke",
            Some(serde_json::json!({ "id": f.producer.id })),
        )
        .await;
    let acknowledged = Instant::now();
    assert_eq!(status, 200, "{body}");
    // Replica b: poll until the next hop's exchange of the in-flight message is refused.
    let mut refused_at = None;
    let mut last = (0, serde_json::Value::Null);
    while sent.elapsed() < Duration::from_secs(5) {
        last = exchange(&http, &f.b, &form(&f.consumer, &in_flight)).await;
        if last.0 != 200 {
            refused_at = Some(Instant::now());
            break;
        }
    }
    let refused_at =
        refused_at.unwrap_or_else(|| panic!("replica b still issues after 5 s: {last:?}"));
    assert_eq!(last.0, 400, "{last:?}");
    assert_eq!(last.1["error"], "invalid_grant", "{last:?}");
    let bound = refused_at.duration_since(sent);
    eprintln!(
        "revocation at replica a honoured by replica b after {:?} (admin call answered after {:?}; upper bound incl. one exchange)",
        bound,
        acknowledged.duration_since(sent)
    );
    // The configured bound when a notification is lost is poll_ms (1 s); with
    // LISTEN/NOTIFY it is one delivery.
    assert!(bound < Duration::from_millis(1500), "bound {bound:?}");
    // The revoked workload itself gets nothing at either replica.
    let own = reference(&f.producer, &f.producer, "txn-self");
    for tts in [&f.a, &f.b] {
        let (status, body) = exchange(&http, tts, &form(&f.producer, &own)).await;
        assert_eq!(status, 401, "{body}");
    }
    // Audited once, with the operator, visible from the other replica.
    let (status, log) = f
        .operator
        .call(&http, &f.b, "GET", "/admin/audit", None)
        .await;
    assert_eq!(status, 200, "{log}");
    let entries = log["entries"].as_array().cloned().unwrap_or_default();
    let revokes: Vec<_> = entries.iter().filter(|e| e["action"] == "revoke").collect();
    assert_eq!(revokes.len(), 1, "{log}");
    assert_eq!(revokes[0]["operator"], f.operator.id.as_str());
    assert_eq!(revokes[0]["target"], f.producer.id.as_str());
    assert_eq!(revokes[0]["replica"], "replica-a");
    // A restart does not bring it back from the configuration (tombstone).
    let mut b = f.b;
    b.kill();
    drop(b);
    let (status, state) = f
        .operator
        .call(&http, &f.a, "GET", "/admin/state", None)
        .await;
    assert_eq!(status, 200);
    assert!(!state.to_string().contains(&f.producer.id), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_registered_and_suspended_through_the_admin_api_holds_fleet_wide() {
    let f = fleet(|_| {});
    let http = reqwest::Client::new();
    let newcomer = TestWorkload::generate("invoices", &["orders.read"]);
    let r = reference(&f.producer, &newcomer, "txn-new");
    assert_eq!(
        exchange(&http, &f.b, &form(&newcomer, &r)).await.0,
        401,
        "not registered yet"
    );
    let (status, body) = f
        .operator
        .call(
            &http,
            &f.a,
            "POST",
            "/admin/workloads",
            Some(serde_json::json!({
                "id": newcomer.id,
                "jwks": serde_json::to_value(newcomer.key.public_jwk()).unwrap_or_default(),
                "allowed_scopes": ["orders.read"],
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let start = Instant::now();
    loop {
        let (status, body) = exchange(&http, &f.b, &form(&newcomer, &r)).await;
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{status} {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _) = f
        .operator
        .call(
            &http,
            &f.b,
            "POST",
            "/admin/workloads/suspend",
            Some(serde_json::json!({ "id": newcomer.id })),
        )
        .await;
    assert_eq!(status, 200);
    let start = Instant::now();
    loop {
        let (status, body) = exchange(&http, &f.a, &form(&newcomer, &r)).await;
        if status != 200 {
            assert_eq!(body["error"], "unauthorized_client", "{body}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _) = f
        .operator
        .call(
            &http,
            &f.a,
            "POST",
            "/admin/workloads/reinstate",
            Some(serde_json::json!({ "id": newcomer.id })),
        )
        .await;
    assert_eq!(status, 200);
    let (_, log) = f
        .operator
        .call(&http, &f.a, "GET", "/admin/audit", None)
        .await;
    let actions: Vec<&str> = log["entries"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(actions, vec!["register", "suspend", "reinstate"], "{log}");
}

/// An admin assertion with chosen claims.
fn custom_assertion(op: &TestOperator, edit: impl Fn(&mut AdminClaims)) -> String {
    let now = unix_now();
    let mut c = AdminClaims {
        assertion: AssertionClaims {
            iss: op.id.clone(),
            sub: op.id.clone(),
            aud: vec![format!("{PUBLIC}/admin")],
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            exp: now + 30,
            nbf: None,
        },
        htm: "GET".into(),
        htu: "/admin/state".into(),
        body_sha256: sha256_hex(b""),
    };
    edit(&mut c);
    jws::sign(&op.key, ADMIN_TYP, &c).unwrap_or_else(|e| panic!("{e}"))
}

async fn admin_status(http: &reqwest::Client, tts: &TtsProcess, bearer: Option<&str>) -> u16 {
    let mut req = http.get(format!("{}/admin/state", tts.base_url()));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_unauthenticated_and_wrongly_authenticated_calls() {
    let f = fleet(|_| {});
    let http = reqwest::Client::new();
    let stranger = TestOperator::generate("mallory");
    let op = &f.operator;
    assert_eq!(admin_status(&http, &f.a, None).await, 401, "no credentials");
    assert_eq!(
        admin_status(&http, &f.a, Some("not-a-jws")).await,
        401,
        "garbage"
    );
    let cases: Vec<(&str, String)> = vec![
        ("unknown operator key", custom_assertion(&stranger, |_| {})),
        (
            "operator id not the key's owner",
            custom_assertion(op, |c| {
                c.assertion.iss = "ops:root".into();
                c.assertion.sub = "ops:root".into();
            }),
        ),
        (
            "wrong audience",
            custom_assertion(op, |c| {
                c.assertion.aud = vec!["http://elsewhere/admin".into()]
            }),
        ),
        (
            "expired",
            custom_assertion(op, |c| {
                c.assertion.iat = unix_now() - 120;
                c.assertion.exp = unix_now() - 90;
            }),
        ),
        (
            "not valid yet (nbf)",
            custom_assertion(op, |c| c.assertion.nbf = Some(unix_now() + 120)),
        ),
        (
            "too long-lived",
            custom_assertion(op, |c| c.assertion.exp = c.assertion.iat + 3600),
        ),
        (
            "for another path",
            custom_assertion(op, |c| c.htu = "/admin/audit".into()),
        ),
        (
            "for another method",
            custom_assertion(op, |c| c.htm = "POST".into()),
        ),
        (
            "for another body",
            custom_assertion(op, |c| c.body_sha256 = sha256_hex(b"{}")),
        ),
        ("client-assertion typ", {
            let c = AdminClaims {
                assertion: AssertionClaims {
                    iss: op.id.clone(),
                    sub: op.id.clone(),
                    aud: vec![format!("{PUBLIC}/admin")],
                    jti: "x".into(),
                    iat: unix_now(),
                    exp: unix_now() + 30,
                    nbf: None,
                },
                htm: "GET".into(),
                htu: "/admin/state".into(),
                body_sha256: sha256_hex(b""),
            };
            jws::sign(&op.key, "JWT", &c).unwrap_or_else(|e| panic!("{e}"))
        }),
    ];
    for (what, token) in &cases {
        assert_eq!(admin_status(&http, &f.a, Some(token)).await, 401, "{what}");
    }
    // A good assertion works once, fleet-wide.
    let good = custom_assertion(op, |_| {});
    assert_eq!(admin_status(&http, &f.a, Some(&good)).await, 200);
    assert_eq!(
        admin_status(&http, &f.a, Some(&good)).await,
        401,
        "replayed at the same replica"
    );
    assert_eq!(
        admin_status(&http, &f.b, Some(&good)).await,
        401,
        "replayed at the other replica"
    );
    // A change signed by a stranger changes nothing and is not audited.
    let body = serde_json::json!({ "id": f.consumer.id }).to_string();
    let forged = {
        let key = &stranger.key;
        elevate_tts::admin::sign_admin_assertion(
            key,
            &stranger.id,
            &format!("{PUBLIC}/admin"),
            "POST",
            "/admin/workloads/revoke",
            body.as_bytes(),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let resp = http
        .post(format!("{}/admin/workloads/revoke", f.a.base_url()))
        .bearer_auth(forged)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.headers().get("www-authenticate").is_some());
    let (_, log) = op.call(&http, &f.b, "GET", "/admin/audit", None).await;
    assert_eq!(log["entries"].as_array().map(Vec::len), Some(0), "{log}");
    let r = reference(&f.producer, &f.consumer, "txn-still");
    assert_eq!(exchange(&http, &f.b, &form(&f.consumer, &r)).await.0, 200);
    assert!(
        !f.a.log().contains(&good) && !f.b.log().contains(&good),
        "an admin assertion was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_fleet_wide_keeps_every_token_verifiable() {
    let f = fleet(|c| {
        if let Some(st) = c.store.as_mut() {
            st.key_activation_secs = 2;
            st.poll_ms = 500;
        }
    });
    let http = reqwest::Client::new();
    let r = reference(&f.producer, &f.consumer, "txn-rotate");
    let first = exchange(&http, &f.a, &form(&f.consumer, &r)).await;
    let old_kid = kid_of(first.1["access_token"].as_str().unwrap_or_default());
    let (status, rotated) = f
        .operator
        .call(&http, &f.b, "POST", "/admin/rotate-keys", None)
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new_kid = rotated["kid"].as_str().unwrap_or_default().to_string();
    assert_ne!(new_kid, old_kid);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut kids = HashSet::new();
    let mut tokens = 0;
    while Instant::now() < deadline {
        // What each replica publishes *before* the token is issued.
        let published = [jwks(&http, &f.a).await, jwks(&http, &f.b).await];
        for tts in [&f.a, &f.b] {
            let (status, body) = exchange(&http, tts, &form(&f.consumer, &r)).await;
            assert_eq!(status, 200, "{body}");
            let token = body["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            for keys in &published {
                assert!(
                    verifies(&token, keys),
                    "token signed with {} before both replicas published it",
                    kid_of(&token)
                );
            }
            kids.insert(kid_of(&token));
            tokens += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        kids.contains(&old_kid) && kids.contains(&new_kid),
        "{kids:?}"
    );
    // After: both sign with the new key, the old one stays published.
    for tts in [&f.a, &f.b] {
        let (_, body) = exchange(&http, tts, &form(&f.consumer, &r)).await;
        assert_eq!(
            kid_of(body["access_token"].as_str().unwrap_or_default()),
            new_kid
        );
        let keys = jwks(&http, tts).await;
        assert!(keys.get(&old_kid).is_some() && keys.get(&new_kid).is_some());
        assert!(verifies(
            first.1["access_token"].as_str().unwrap_or_default(),
            &keys
        ));
    }
    eprintln!("{tokens} tokens across the rotation, kids {kids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_replica_mid_load_loses_no_exchange_retried_against_the_other() {
    let f = fleet(|_| {});
    let http = reqwest::Client::new();
    let r = Arc::new(reference(&f.producer, &f.consumer, "txn-load"));
    let bases = Arc::new([f.a.base_url(), f.b.base_url()]);
    let consumer = Arc::new(f.consumer.clone());
    let done = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    const PER_TASK: u64 = 150;
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let (http, r, bases, consumer, done, retried) = (
            http.clone(),
            r.clone(),
            bases.clone(),
            consumer.clone(),
            done.clone(),
            retried.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..PER_TASK {
                let first = ((t + i) % 2) as usize;
                let mut ok = false;
                for attempt in 0..2 {
                    let base = &bases[(first + attempt) % 2];
                    // a fresh assertion per attempt: retries are new requests
                    match post(&http, base, &form(&consumer, &r)).await {
                        Some((200, _)) => {
                            ok = true;
                            break;
                        }
                        Some((status, body)) if status < 500 => {
                            failures.push(format!("{status} {body}"));
                            break;
                        }
                        _ => {
                            retried.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push(format!("exchange {t}/{i} failed at both replicas"));
                }
            }
            failures
        }));
    }
    while done.load(Ordering::Relaxed) < 4 * PER_TASK / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut a = f.a;
    a.kill();
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(done.load(Ordering::Relaxed), 4 * PER_TASK);
    assert!(
        retried.load(Ordering::Relaxed) > 0,
        "the kill hit no exchange"
    );
    eprintln!(
        "{} exchanges, {} retried against the surviving replica",
        done.load(Ordering::Relaxed),
        retried.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_mode_serves_the_admin_api_without_a_store() {
    let producer = TestWorkload::generate("orders", &["orders.read"]);
    let consumer = TestWorkload::generate("billing", &["orders.read"]);
    let op = TestOperator::generate("bob");
    let mut cfg = write_config(&[&producer, &consumer], None);
    cfg.config.admin = Some(AdminConfig {
        operators: vec![op.config()],
        max_assertion_secs: 60,
    });
    std::fs::write(&cfg.path, cfg.config.to_toml().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}"));
    let tts = TtsProcess::spawn(Path::new(BIN), &cfg.path, None).unwrap_or_else(|e| panic!("{e}"));
    let http = reqwest::Client::new();
    // The loopback-only rotate is gone once [admin] is configured.
    let resp = http
        .post(tts.rotate_url())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 401);
    let (status, _) = op
        .call(&http, &tts, "POST", "/admin/rotate-keys", None)
        .await;
    assert_eq!(status, 200);
    let (status, body) = op
        .call(
            &http,
            &tts,
            "POST",
            "/admin/workloads/revoke",
            Some(serde_json::json!({ "id": producer.id })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let r = reference(&producer, &consumer, "txn-embedded");
    let assertion = sign_assertion(
        &consumer.key,
        &consumer.id,
        &tts.token_endpoint(),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let form = with_client_assertion(
        exchange_form(
            TTS_TRUST_DOMAIN,
            &Scope::parse("orders.read"),
            &r.token,
            TOKEN_TYPE_JWT,
            &serde_json::json!({}),
            &serde_json::json!({}),
        ),
        &assertion,
    );
    let (status, body) = exchange(&http, &tts, &form).await;
    assert_eq!(status, 400, "{body}");
    let (_, log) = op.call(&http, &tts, "GET", "/admin/audit", None).await;
    let actions: Vec<&str> = log["entries"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(actions, vec!["rotate-keys", "revoke"], "{log}");
    assert!(
        tts.log().contains("elevate_tts::audit"),
        "audit lines in the log"
    );
    let ready = http
        .get(format!("{}/readyz", tts.base_url()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ready.status().as_u16(), 200);
}

/// Exchanges per second with `clients` concurrent clients spread over `targets` for `secs`.
async fn throughput(
    targets: &[String],
    producer: &TestWorkload,
    consumer: &TestWorkload,
    clients: usize,
    secs: u64,
) -> f64 {
    let r = Arc::new(reference(producer, consumer, "txn-bench"));
    let consumer = Arc::new(consumer.clone());
    let count = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let base = targets[c % targets.len()].clone();
        let (r, consumer, count) = (r.clone(), consumer.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while Instant::now() < stop {
                if let Some((200, _)) = post(&http, &base, &form(&consumer, &r)).await {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    count.load(Ordering::Relaxed) as f64 / secs as f64
}

/// Exchanges/s of one replica and of two on one store (the numbers in
/// `tts/README.md`). Manual: `ELEVATE_TTS_BIN=target/release/txn-token-service
/// cargo test -p elevate-integration-tests --test tts_fleet -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn fleet_throughput() {
    let bin = std::env::var("ELEVATE_TTS_BIN").unwrap_or_else(|_| BIN.to_string());
    let producer = TestWorkload::generate("orders", &["orders.read"]);
    let consumer = TestWorkload::generate("billing", &["orders.read"]);
    let operator = TestOperator::generate("alice");
    let store = FleetStore::new();
    let (_cfg, paths) = write_fleet_config(
        &[&producer, &consumer],
        &store,
        &[&operator],
        &["replica-a", "replica-b"],
        |c| c.public_url = Some(PUBLIC.into()),
    );
    let a = TtsProcess::spawn(Path::new(&bin), &paths[0], None).unwrap_or_else(|e| panic!("{e}"));
    let embedded_cfg = write_config(&[&producer, &consumer], None);
    let mut embedded_text = embedded_cfg.config.clone();
    embedded_text.public_url = Some(PUBLIC.into());
    std::fs::write(
        &embedded_cfg.path,
        embedded_text.to_toml().unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let e = TtsProcess::spawn(Path::new(&bin), &embedded_cfg.path, None)
        .unwrap_or_else(|e| panic!("{e}"));
    for clients in [4usize, 16] {
        let embedded = throughput(&[e.base_url()], &producer, &consumer, clients, 3).await;
        let one = throughput(&[a.base_url()], &producer, &consumer, clients, 3).await;
        let b =
            TtsProcess::spawn(Path::new(&bin), &paths[1], None).unwrap_or_else(|e| panic!("{e}"));
        let two = throughput(
            &[a.base_url(), b.base_url()],
            &producer,
            &consumer,
            clients,
            3,
        )
        .await;
        drop(b);
        eprintln!(
            "clients {clients}: embedded (no store) {embedded:.0}/s, one replica on PostgreSQL {one:.0}/s, two replicas {two:.0}/s"
        );
    }
}

/// Tokens a replica issued so far (`tts_exchanges_total{outcome="issued"}`).
async fn issued(http: &reqwest::Client, tts: &TtsProcess) -> u64 {
    tts.metric(http, "tts_exchanges_total{outcome=\"issued\"")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_spreads_exchanges_over_both_replicas_and_fails_over() {
    let f = fleet(|_| {});
    let http = reqwest::Client::new();
    let r = reference(&f.producer, &f.consumer, "txn-client");
    // Each replica accepts its own address as the assertion's aud (no load balancer).
    let client = |first: &TtsProcess, second: &TtsProcess| {
        let mut cfg =
            TtsClientConfig::new(first.token_endpoint(), TTS_TRUST_DOMAIN, &f.consumer.id);
        cfg.replica_endpoints = vec![second.token_endpoint()];
        cfg.request_timeout = Duration::from_secs(2);
        TtsClient::new(cfg, f.consumer.key.clone()).unwrap_or_else(|e| panic!("{e}"))
    };
    let c = client(&f.a, &f.b);
    let scope = Scope::parse("orders.read");
    let details = serde_json::json!({});
    const N: u64 = 40;
    for i in 0..N {
        c.exchange(&r.token, TOKEN_TYPE_JWT, &scope, &details)
            .await
            .unwrap_or_else(|e| panic!("exchange {i}: {e}"));
    }
    let (at_a, at_b) = (issued(&http, &f.a).await, issued(&http, &f.b).await);
    assert_eq!(at_a + at_b, N);
    assert_eq!((at_a, at_b), (N / 2, N / 2), "round-robin");
    let mut a = f.a;
    a.kill();
    // Every exchange still succeeds, each in one call: a refused connection
    // goes on to the other replica within the attempt.
    let started = Instant::now();
    for i in 0..N {
        c.exchange(&r.token, TOKEN_TYPE_JWT, &scope, &details)
            .await
            .unwrap_or_else(|e| panic!("exchange {i} after the kill: {e}"));
    }
    assert_eq!(issued(&http, &f.b).await, N / 2 + N);
    eprintln!(
        "{N} exchanges with one replica down in {:?}",
        started.elapsed()
    );
    // A fresh client whose first endpoint is the dead replica: tokens, and
    // the JWKS to verify them, come from the other.
    let fresh = client(&a, &f.b);
    let token = fresh
        .exchange(&r.token, TOKEN_TYPE_JWT, &scope, &details)
        .await
        .unwrap_or_else(|e| panic!("fresh client: {e}"));
    assert_eq!(token.claims.req_wl, f.consumer.id);
    assert!(!fresh.verifier().cached_kids().is_empty());
}

/// A TCP forwarder between a replica and PostgreSQL that the test stops and
/// starts, and that can drop the server's notifications (protocol message
/// `A`, NotificationResponse) on their way to the replica while every
/// connection stays up: a lost NOTIFY.
struct PgProxy {
    addr: std::net::SocketAddr,
    target: std::net::SocketAddr,
    drop_notifications: Arc<std::sync::atomic::AtomicBool>,
    dropped: Arc<AtomicU64>,
    tasks: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl PgProxy {
    async fn start(target: std::net::SocketAddr) -> PgProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("proxy: {e}"));
        let proxy = PgProxy {
            addr: listener.local_addr().unwrap_or_else(|e| panic!("{e}")),
            target,
            drop_notifications: Arc::default(),
            dropped: Arc::default(),
            tasks: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (target, drop, dropped, tasks) = (
            self.target,
            self.drop_notifications.clone(),
            self.dropped.clone(),
            self.tasks.clone(),
        );
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (drop, dropped) = (drop.clone(), dropped.clone());
                let conn = tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    // No Nagle delay added to the replica's store round trips.
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = forward_messages(&mut sr, &mut cw, &drop, &dropped);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
                tasks.lock().push(conn);
            }
        });
        self.tasks.lock().push(accept);
    }

    /// Closes the listener and every forwarded connection.
    fn stop(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }

    /// Listens on the same address again.
    async fn restart(&self) {
        for _ in 0..50 {
            if let Ok(l) = tokio::net::TcpListener::bind(self.addr).await {
                self.serve(l);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("proxy could not listen on {} again", self.addr);
    }

    /// `store`'s connection string, pointed at this proxy.
    fn url(&self, store: &FleetStore) -> String {
        let cfg: tokio_postgres::Config = store.url.parse().unwrap_or_else(|e| panic!("{e}"));
        let mut url = format!("host=127.0.0.1 port={}", self.addr.port());
        if let Some(u) = cfg.get_user() {
            url.push_str(&format!(" user={u}"));
        }
        if let Some(d) = cfg.get_dbname() {
            url.push_str(&format!(" dbname={d}"));
        }
        if let Some(p) = cfg.get_password() {
            url.push_str(&format!(" password={}", String::from_utf8_lossy(p)));
        }
        url
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The TCP address `store` connects to.
async fn server_of(store: &FleetStore) -> std::net::SocketAddr {
    let cfg: tokio_postgres::Config = store.url.parse().unwrap_or_else(|e| panic!("{e}"));
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("PostgreSQL host {host}:{port} does not resolve"))
}

/// Copies the server's protocol messages (type byte, length, body) to the
/// client, leaving out NotificationResponse messages while `drop` is set.
async fn forward_messages(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    drop: &std::sync::atomic::AtomicBool,
    dropped: &AtomicU64,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut message = vec![0u8; 5];
        from.read_exact(&mut message).await?;
        let len = u32::from_be_bytes([message[1], message[2], message[3], message[4]]) as usize;
        message.resize(1 + len.max(4), 0);
        from.read_exact(&mut message[5..]).await?;
        if message[0] == b'A' && drop.load(Ordering::SeqCst) {
            dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        to.write_all(&message).await?;
    }
}

async fn readyz(http: &reqwest::Client, tts: &TtsProcess) -> (u16, String) {
    let resp = http
        .get(format!("{}/readyz", tts.base_url()))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("readyz: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Polls `/readyz` until it answers `want`; how long that took.
async fn readyz_becomes(http: &reqwest::Client, tts: &TtsProcess, want: u16) -> Duration {
    let start = Instant::now();
    loop {
        let (status, body) = readyz(http, tts).await;
        if status == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "/readyz still {status} {body:?} after 15 s (want {want})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replicas on one store, those named in `proxied` reaching PostgreSQL
/// through a [`PgProxy`], every one polling every `poll`.
struct ProxiedFleet {
    producer: TestWorkload,
    consumer: TestWorkload,
    operator: TestOperator,
    replicas: Vec<TtsProcess>,
    proxy: PgProxy,
    _cfg: TtsConfigDir,
    _store: FleetStore,
}

async fn proxied_fleet(names: &[&str], proxied: &[&str], poll: Duration) -> ProxiedFleet {
    let producer = TestWorkload::generate("orders", &["orders.read"]);
    let consumer = TestWorkload::generate("billing", &["orders.read"]);
    let operator = TestOperator::generate("alice");
    let store = FleetStore::new();
    let proxy = PgProxy::start(server_of(&store).await).await;
    let via_proxy = proxy.url(&store);
    let (cfg, paths) =
        write_fleet_config(&[&producer, &consumer], &store, &[&operator], names, |c| {
            c.public_url = Some(PUBLIC.into());
            if let Some(st) = c.store.as_mut() {
                st.poll_ms = poll.as_millis() as u64;
                if st.replica.as_deref().is_some_and(|r| proxied.contains(&r)) {
                    st.postgres = via_proxy.clone();
                }
            }
        });
    let replicas = paths
        .iter()
        .zip(names)
        .map(|(p, name)| {
            TtsProcess::spawn(Path::new(BIN), p, None)
                .unwrap_or_else(|e| panic!("start replica {name}: {e}"))
        })
        .collect();
    ProxiedFleet {
        producer,
        consumer,
        operator,
        replicas,
        proxy,
        _cfg: cfg,
        _store: store,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_store_is_unreachable_and_200_when_it_returns() {
    let f = proxied_fleet(&["replica-p"], &["replica-p"], Duration::from_millis(500)).await;
    let (tts, proxy, consumer) = (&f.replicas[0], &f.proxy, &f.consumer);
    let http = reqwest::Client::new();
    let r = reference(&f.producer, consumer, "txn-ready");
    assert_eq!(readyz(&http, tts).await.0, 200);
    assert_eq!(exchange(&http, tts, &form(consumer, &r)).await.0, 200);

    proxy.stop();
    let down = readyz_becomes(&http, tts, 503).await;
    let (status, body) = readyz(&http, tts).await;
    assert_eq!(status, 503);
    assert!(body.contains("shared store unreachable"), "{body}");
    // Deny by default: no assertion can be claimed, so no token.
    let (status, body) = exchange(&http, tts, &form(consumer, &r)).await;
    assert!(status >= 500, "{status} {body}");
    assert_eq!(body["error"], "server_error", "{body}");
    // The process stays up and healthy, just not ready.
    let health = http
        .get(format!("{}/healthz", tts.base_url()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(health.status().as_u16(), 200);

    proxy.restart().await;
    let up = readyz_becomes(&http, tts, 200).await;
    assert_eq!(exchange(&http, tts, &form(consumer, &r)).await.0, 200);
    let errors = tts.metric(&http, "tts_store_errors_total ").await;
    assert!(errors > 0, "no store error counted");
    eprintln!(
        "store unreachable: /readyz 503 after {down:?}; back: 200 after {up:?}; {errors} store errors counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_notification_is_lost_is_honoured_within_poll_ms() {
    const POLL: Duration = Duration::from_millis(1000);
    // Replica a talks to PostgreSQL directly, replica b through the proxy.
    let f = proxied_fleet(&["replica-a", "replica-b"], &["replica-b"], POLL).await;
    let (a, b, proxy, operator) = (&f.replicas[0], &f.replicas[1], &f.proxy, &f.operator);
    let http = reqwest::Client::new();
    let newcomer = TestWorkload::generate("invoices", &["orders.read"]);
    let r = reference(&f.producer, &newcomer, "txn-lost-notify");
    assert_eq!(exchange(&http, b, &form(&newcomer, &r)).await.0, 401);

    proxy.drop_notifications.store(true, Ordering::SeqCst);
    let register = serde_json::json!({
        "id": newcomer.id,
        "jwks": serde_json::to_value(newcomer.key.public_jwk()).unwrap_or_default(),
        "allowed_scopes": ["orders.read"],
    });
    let id = serde_json::json!({ "id": newcomer.id });
    let mut bounds = Vec::new();
    for (path, body, issues) in [
        ("/admin/workloads", register, true),
        ("/admin/workloads/suspend", id.clone(), false),
        ("/admin/workloads/reinstate", id, true),
    ] {
        // The worst case: the change comes just after replica b reloaded,
        // so without its notification b sees it only at its next poll.
        let n = b.metric(&http, "tts_state_reloads_total").await;
        let synced = Instant::now();
        while b.metric(&http, "tts_state_reloads_total").await == n {
            assert!(synced.elapsed() < POLL * 3, "replica b does not poll");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = proxy.dropped.load(Ordering::SeqCst);
        let (status, answer) = operator.call(&http, a, "POST", path, Some(body)).await;
        assert_eq!(status, 200, "{path}: {answer}");
        let acknowledged = Instant::now();
        // Replica b: the first exchange that shows the change.
        loop {
            let (status, body) = exchange(&http, b, &form(&newcomer, &r)).await;
            if (status == 200) == issues {
                break;
            }
            assert!(
                acknowledged.elapsed() < POLL * 3,
                "{path}: replica b does not honour it after {:?}: {status} {body}",
                acknowledged.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = acknowledged.elapsed();
        // The change's NOTIFY reached the proxy and was kept from replica b.
        let deadline = Instant::now() + Duration::from_secs(2);
        while proxy.dropped.load(Ordering::SeqCst) == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            proxy.dropped.load(Ordering::SeqCst) > before,
            "{path}: no notification was dropped on its way to replica b"
        );
        bounds.push((path, took));
    }
    eprintln!(
        "notification lost, change made just after replica b's reload honoured by b after: {bounds:?} (poll_ms {POLL:?})"
    );
    for (path, took) in &bounds {
        // The bound without a notification: one poll interval plus one
        // reload (and one exchange of the measurement) ...
        assert!(
            *took <= POLL + Duration::from_millis(500),
            "{path}: {took:?}"
        );
        // ... and not sooner than a poll could explain: no notification came through.
        assert!(*took >= POLL / 2, "{path}: {took:?}");
    }
}
