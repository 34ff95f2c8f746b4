//! The per-context binding (`core/src/ctxbind*`): a context reference with
//! its `cnf.jwe`, and a message binding (`ztauth-ctx-bind`).
//!
//! Input: one mode byte, then
//! - mode 0: the rest is the binding, handed as is with a valid context reference;
//! - mode 1: the rest is the binding's claims (any bytes; `@REF@` becomes
//!   the context reference's hash, `@DIG@` the payload's digest), MACed with
//!   the real context key so that the fuzzer reaches the claim checks;
//! - mode 2: the rest is the `cnf.jwe` of a context reference the producer
//!   signs (the JWE parser on hostile input), bound by a MAC under a fixed key.
//!
//! Checks: nothing panics; an accepted message satisfies every rule the
//! verifier promises (audience, destination, payload digest, the context's
//! time window, the binding's reference).

#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use elevate_core::ctxbind::{AudienceKeys, ContextBinder, ContextOpener, KeyAgreementKey};
use elevate_core::ctxref::{ContextRefClaims, ContextRefMinter, ContextRefVerifier, VerifyPolicy};
use elevate_core::keys::sha256_b64url;
use elevate_core::{SubjectKind, jws};
use elevate_fuzz as fx;
use libfuzzer_sys::fuzz_target;

struct Fixture {
    verifier: ContextRefVerifier,
    context: String,
    binding: String,
    claims: ContextRefClaims,
    key: Vec<u8>,
}

const HEADER: &str = r#"{"alg":"HS256","typ":"ctx-bind+jwt"}"#;

static FX: LazyLock<Fixture> = LazyLock::new(|| {
    let agreement = KeyAgreementKey::generate("fuzz-consumer-enc-1").expect("key");
    let mut audiences = AudienceKeys::new();
    audiences
        .insert(fx::CONSUMER, agreement.public_jwk())
        .expect("audience key");
    let minter = ContextRefMinter::new(
        fx::PRODUCER,
        fx::producer_key(),
        std::time::Duration::from_secs(600),
    );
    let mut claims = minter.origin_claims(&elevate_core::ctxref::MintRequest {
        subject: "alice",
        sub_kind: SubjectKind::Human,
        audience: &[fx::CONSUMER.to_string()],
        scope: &elevate_core::scope::Scope::parse("orders.read"),
        txn: "txn-fuzz",
        destination: fx::DESTINATION,
        payload: fx::PAYLOAD,
    });
    claims.iat = fx::NOW;
    claims.exp = fx::NOW + 600;
    let sealed = ContextBinder::new(audiences, std::time::Duration::from_secs(600))
        .with_open_after(1)
        .seal(&minter, &claims)
        .expect("seal")
        .expect("the consumer has a key");
    let context = sealed.reference.token.clone();
    let signed: ContextRefClaims = jws::parse(&context, elevate_core::ctxref::CTX_REF_TYP)
        .and_then(|p| p.claims())
        .expect("context claims");
    let key = unwrap_key(&signed, &agreement);
    let verifier = ContextRefVerifier::new(fx::trusted_keys(), VerifyPolicy::new(fx::CONSUMER))
        .with_context_opener(ContextOpener::new([agreement]));
    Fixture {
        verifier,
        context,
        binding: sealed.binding,
        claims: signed,
        key,
    }
});

/// The context's binding key, decrypted from its `cnf.jwe` with the
/// consumer's key (what a holder of that key can do).
fn unwrap_key(claims: &ContextRefClaims, key: &KeyAgreementKey) -> Vec<u8> {
    let jwe = &claims.cnf.as_ref().expect("cnf").jwe;
    let decrypter = josekit::jwe::ECDH_ES_A256KW
        .decrypter_from_pem(key.to_pkcs8_pem())
        .expect("decrypter");
    let (plain, _) = josekit::jwe::deserialize_compact(jwe, &decrypter).expect("decrypts");
    let jwk: serde_json::Value = serde_json::from_slice(&plain).expect("jwk");
    URL_SAFE_NO_PAD
        .decode(jwk["k"].as_str().expect("k"))
        .expect("k is base64url")
}

/// A binding over `claims` (any bytes) MACed with `key`.
fn mac(key: &[u8], claims: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let tag = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(key),
        jsonwebtoken::Algorithm::HS256,
    )
    .expect("HS256 with any key");
    format!("{input}.{tag}")
}

fuzz_target!(|data: &[u8]| {
    let fx = &*FX;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (context, binding) = match mode % 3 {
        // no bytes: the producer's own binding (the accepted path)
        0 if rest.is_empty() => (fx.context.clone(), fx.binding.clone()),
        0 => (
            fx.context.clone(),
            String::from_utf8_lossy(rest).into_owned(),
        ),
        1 => {
            let reference = sha256_b64url(fx.context.as_bytes());
            let claims = fx::replace_all(rest, b"@REF@", reference.as_bytes());
            let claims = fx::replace_all(&claims, fx::DIG, fx::payload_digest().as_bytes());
            (fx.context.clone(), mac(&fx.key, &claims))
        }
        _ => {
            let mut claims = fx.claims.clone();
            if let Some(cnf) = claims.cnf.as_mut() {
                cnf.jwe = String::from_utf8_lossy(rest).into_owned();
            }
            let token = fx::sign_claims(
                &fx::producer_key(),
                &serde_json::to_value(&claims).expect("claims"),
            );
            let b = serde_json::json!({
                "ref": sha256_b64url(token.as_bytes()),
                "dst": fx::DESTINATION,
                "dig": fx::payload_digest(),
                "jti": "m-1",
                "iat": fx::NOW,
            });
            (token, mac(&[7u8; 32], b.to_string().as_bytes()))
        }
    };
    let _ = elevate_core::ctxbind::looks_like_binding(binding.as_bytes());
    match fx.verifier.verify_message_at(
        &context,
        Some(&binding),
        fx::DESTINATION,
        fx::PAYLOAD,
        fx::NOW,
    ) {
        Ok(v) => {
            let c = &v.claims;
            assert!(c.aud.iter().any(|a| a == fx::CONSUMER), "{c:?}");
            assert_eq!(c.dst, fx::DESTINATION);
            assert_eq!(c.dig, fx::payload_digest());
            assert!(
                c.iat >= fx.claims.iat - 30 && c.iat <= fx.claims.exp,
                "{c:?}"
            );
            assert!(!c.jti.is_empty());
            assert_eq!(v.token, context);
            assert_ne!(
                mode % 3,
                2,
                "a context whose key is not the consumer's is never accepted"
            );
        }
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }
});
