//! The Transaction Token Service's token endpoint (`elevate-tts`: `http.rs`
//! form extraction, `issuer.rs` `Issuer::exchange`; `txn-token-client`:
//! `protocol.rs` `ExchangeForm::from_pairs`), driven through the real axum router.
//!
//! Input: the `application/x-www-form-urlencoded` request body. Placeholders
//! become fresh, valid tokens so that the fuzzer gets past authentication and
//! subject-token checks: `@ASSERTION@` (the consumer's client assertion),
//! `@REF@` (a producer's context reference for the consumer), `@CHAIN@` (a
//! reference derived through a relay), `@AT@` (a user access token).
//!
//! Checks: nothing panics, never a 500; an error is an RFC 6749 JSON error
//! whose description does not echo a credential of the request; a token is
//! only ever issued to the authenticated client, for the trust domain, within
//! the scope the registry allows it.

#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use elevate_core::ctxref::{ContextRefMinter, MintRequest, SubjectKind};
use elevate_core::jws;
use elevate_core::scope::Scope;
use elevate_core::token::TXN_TOKEN_TYP;
use elevate_fuzz as fx;
use elevate_tts::{Issuer, IssuerSettings, MintedClaims, TestIssuer, router};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use txn_token_client::assertion::sign_assertion;

const TRUST_DOMAIN: &str = "fuzz.example";
const CONSUMER_SCOPES: &str = "orders:read orders:write";
const KNOWN_CODES: [&str; 8] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_target",
    "server_error",
];

struct Fixture {
    rt: tokio::runtime::Runtime,
    issuer: Arc<Issuer>,
    app: axum::Router,
    producer: ContextRefMinter,
    relay: ContextRefMinter,
    idp: TestIssuer,
}

static FX: LazyLock<Fixture> = LazyLock::new(|| {
    let mut settings = IssuerSettings::new(TRUST_DOMAIN);
    // No leeway: every client assertion leaves the replay cache two seconds
    // after it was signed, so millions of runs do not grow it.
    settings.leeway = Duration::ZERO;
    let issuer = Issuer::generate(settings).expect("issuer");
    let (p, r, c) = (fx::producer_key(), fx::relay_key(), fx::consumer_key());
    let all = Scope::parse("orders:read orders:write");
    issuer
        .register_workload(fx::PRODUCER, p.public_jwk(), &all)
        .expect("producer");
    issuer
        .register_workload(fx::RELAY, r.public_jwk(), &Scope::parse("orders:read"))
        .expect("relay");
    issuer
        .register_workload(fx::CONSUMER, c.public_jwk(), &Scope::parse(CONSUMER_SCOPES))
        .expect("consumer");
    let idp = TestIssuer::new("https://idp.fuzz.example", TRUST_DOMAIN).expect("idp");
    issuer.set_user_issuer(idp.verifier());
    let ttl = Duration::from_secs(300);
    Fixture {
        rt: tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime"),
        app: router(issuer.clone(), false),
        issuer,
        producer: ContextRefMinter::new(fx::PRODUCER, p, ttl),
        relay: ContextRefMinter::new(fx::RELAY, r, ttl),
        idp,
    }
});

fn mint(m: &ContextRefMinter, aud: &str) -> elevate_core::ctxref::MintedRef {
    m.mint(&MintRequest {
        subject: "alice",
        sub_kind: SubjectKind::Human,
        audience: &[aud.to_string()],
        scope: &Scope::parse("orders:read orders:write"),
        txn: "txn-fuzz",
        destination: fx::DESTINATION,
        payload: fx::PAYLOAD,
    })
    .expect("mint")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Replaces the placeholders; returns the body and the credentials put in it.
fn substitute(fx: &Fixture, data: &[u8]) -> (Vec<u8>, Vec<String>) {
    let mut body = data.to_vec();
    let mut creds = Vec::new();
    let mut put = |body: &mut Vec<u8>, name: &[u8], token: &dyn Fn() -> String| {
        if contains(body, name) {
            let t = token();
            *body = fx::replace_all(body, name, t.as_bytes());
            creds.push(t);
        }
    };
    put(&mut body, b"@ASSERTION@", &|| {
        let endpoint = fx.issuer.token_endpoint();
        sign_assertion(
            &fx::consumer_key(),
            fx::CONSUMER,
            &endpoint,
            Duration::from_secs(2),
        )
        .expect("assertion")
    });
    put(&mut body, b"@REF@", &|| {
        mint(&fx.producer, fx::CONSUMER).token
    });
    put(&mut body, b"@CHAIN@", &|| {
        let parent = mint(&fx.producer, fx::RELAY);
        fx.relay
            .derive(
                &parent.claims,
                &parent.token,
                None,
                &[fx::CONSUMER.to_string()],
                fx::DESTINATION,
                fx::PAYLOAD,
            )
            .expect("derive")
            .token
    });
    put(&mut body, b"@AT@", &|| {
        fx.idp
            .issue_access_token("alice", "orders:read", Duration::from_secs(60))
            .expect("access token")
    });
    (body, creds)
}

fuzz_target!(|data: &[u8]| {
    let fx = &*FX;
    let (body, creds) = substitute(fx, data);
    let request = Request::post(&fx.issuer.settings().token_path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body.clone()))
        .expect("request");
    let (status, bytes) = fx.rt.block_on(async {
        let resp = fx.app.clone().oneshot(request).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, bytes)
    });
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{bytes:?}");
    let json: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON body");

    if status == StatusCode::OK {
        let token = json["access_token"].as_str().expect("access_token");
        let parsed = jws::parse(token, TXN_TOKEN_TYP).expect("issued token parses");
        parsed
            .verify(&fx.issuer.public_keys())
            .expect("issued token verifies");
        let claims: MintedClaims = parsed.claims().expect("issued claims");
        assert_eq!(
            claims.req_wl,
            fx::CONSUMER,
            "issued to a client that did not authenticate"
        );
        assert_eq!(claims.aud, TRUST_DOMAIN);
        assert!(
            Scope::parse(&claims.scope).is_subset(&Scope::parse(CONSUMER_SCOPES)),
            "scope {} beyond the registry allowance",
            claims.scope
        );
        assert_eq!(json["token_type"], "N_A");
        assert!(json.get("refresh_token").is_none());
        return;
    }

    let code = json["error"].as_str().expect("error code");
    assert!(KNOWN_CODES.contains(&code), "{code}");
    let description = json["error_description"].as_str().unwrap_or_default();
    // A credential may only be echoed if the client also put it somewhere
    // that is not a credential parameter (a scope, an audience...).
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    for cred in &creds {
        if description.contains(cred.as_str()) {
            let echoable = pairs.iter().any(|(k, v)| {
                k.contains(cred.as_str())
                    || (!matches!(k.as_str(), "client_assertion" | "subject_token")
                        && v.contains(cred.as_str()))
            });
            assert!(
                echoable,
                "error_description echoes a credential: {description}"
            );
        }
    }
});
