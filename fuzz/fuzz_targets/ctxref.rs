//! Compact JWS parsing and context-reference verification (`core/src/jws.rs`,
//! `core/src/ctxref.rs`).
//!
//! Input: one mode byte, then
//! - even mode: the rest is a compact JWS handed to the verifier as is;
//! - odd mode: up to four segments separated by 0x1E, each signed in turn by a
//!   fixed key so the fuzzer gets past the signature. A segment is a key byte
//!   (low bits: producer, relay, untrusted consumer key; bit 7: the segment
//!   starts with its own protected header up to the first `\n`) followed by
//!   the payload bytes. `@PREV@` becomes the previous segment's token (an
//!   `act.ref`), `@DIG@` the digest of the bound payload. The last token is verified.
//!
//! Checks: nothing panics; an accepted reference satisfies every rule the
//! verifier promises (audience, binding, time window, depth, chain of trusted signers).

#![no_main]

use std::sync::LazyLock;

use elevate_core::ctxref::{CTX_REF_TYP, ContextRefVerifier, MAX_LEEWAY};
use elevate_core::jws;
use elevate_core::keys::{SigningKey, sha256_hex};
use elevate_fuzz as fx;
use libfuzzer_sys::fuzz_target;

struct Fixture {
    verifier: ContextRefVerifier,
    keys: [SigningKey; 3],
    digest: String,
}

static FX: LazyLock<Fixture> = LazyLock::new(|| Fixture {
    verifier: fx::verifier(),
    keys: [fx::producer_key(), fx::relay_key(), fx::consumer_key()],
    digest: fx::payload_digest(),
});

fn build_chain(fx: &Fixture, data: &[u8]) -> String {
    let mut token = String::new();
    for segment in data.split(|b| *b == 0x1E).take(4) {
        let Some((&k, rest)) = segment.split_first() else {
            continue;
        };
        let key = &fx.keys[usize::from(k & 0x7F) % fx.keys.len()];
        let rest = elevate_fuzz::replace_all(rest, fx::PREV, token.as_bytes());
        let rest = elevate_fuzz::replace_all(&rest, fx::DIG, fx.digest.as_bytes());
        token = if k & 0x80 != 0 {
            let (header, payload) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (&rest[..], &[][..]),
            };
            fx::sign_raw(key, header, payload)
        } else {
            fx::sign_raw(key, fx::standard_header(key).as_bytes(), &rest)
        };
    }
    token
}

fuzz_target!(|data: &[u8]| {
    let fx = &*FX;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        build_chain(fx, rest)
    };

    // The detector and the parser on their own, with other `typ`s.
    let _ = jws::looks_like_jwt(&token);
    for typ in ["JWT", "txntoken+jwt", CTX_REF_TYP] {
        if let Ok(p) = jws::parse(&token, typ) {
            let _ = p.claims::<serde_json::Value>();
        }
    }

    match fx
        .verifier
        .verify_at(&token, fx::DESTINATION, fx::PAYLOAD, fx::NOW)
    {
        Ok(v) => {
            let c = &v.claims;
            let policy = fx.verifier.policy();
            let leeway = policy.leeway.min(MAX_LEEWAY).as_secs() as i64;
            assert!(c.aud.iter().any(|a| a == fx::CONSUMER), "{c:?}");
            assert_eq!(c.dst, fx::DESTINATION);
            assert_eq!(c.dig, fx.digest);
            assert!(c.iat > 0 && c.iat <= c.exp, "{c:?}");
            assert!(
                c.iat <= fx::NOW + leeway && c.exp + leeway > fx::NOW,
                "{c:?}"
            );
            assert!(c.exp - c.iat <= policy.max_horizon.as_secs() as i64);
            assert!(c.depth <= c.max_depth.min(policy.max_depth), "{c:?}");
            let chain = c.chain();
            assert_eq!(chain.len(), c.depth as usize + 1, "{c:?}");
            assert!(
                chain.iter().all(|w| w == fx::PRODUCER || w == fx::RELAY),
                "untrusted workload in an accepted chain: {chain:?}"
            );
            assert_eq!(v.token_sha256, sha256_hex(token.as_bytes()));
        }
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }
});
