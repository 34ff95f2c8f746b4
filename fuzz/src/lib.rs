//! Shared fixtures of Elevate's fuzz targets: fixed workload keys (so that
//! committed seed references keep verifying), a fixed clock, the message a
//! reference is bound to, and the substitution of placeholders by freshly
//! signed tokens so that the fuzzer gets past signatures.
//!
//! The keys below are throwaway test keys generated for fuzzing only; nothing
//! trusts them outside this crate.

use elevate_core::ctxref::{ContextRefVerifier, VerifyPolicy};
use elevate_core::jws;
use elevate_core::keys::{KeySet, SigningAlg, SigningKey, sha256_b64url};

/// Workload id of the producer (ES256 key [`PRODUCER_PEM`]).
pub const PRODUCER: &str = "spiffe://fuzz.example/producer";
/// Workload id of a relay hop (EdDSA key [`RELAY_PEM`]).
pub const RELAY: &str = "spiffe://fuzz.example/relay";
/// Workload id of the consumer (ES256 key [`CONSUMER_PEM`]); the verifier's audience.
pub const CONSUMER: &str = "spiffe://fuzz.example/consumer";

/// `kid` of the producer key.
pub const PRODUCER_KID: &str = "fuzz-producer-1";
/// `kid` of the relay key.
pub const RELAY_KID: &str = "fuzz-relay-1";
/// `kid` of the consumer key.
pub const CONSUMER_KID: &str = "fuzz-consumer-1";

/// Throwaway ES256 producer key (PKCS#8), fuzzing only.
pub const PRODUCER_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSmCr6jwFTGup4c8j
sbfWVYhtQbAG1ofrHbmYTtBQ3OihRANCAATSsV6Lz9j98i6brZ/JN81IWn1C6Mff
kAYGVK1co9q5bqogRYOqd7ZCEFgkAu4HVje1eKjIEDu9t4c225AOOfjD
-----END PRIVATE KEY-----
";

/// Throwaway EdDSA relay key (PKCS#8), fuzzing only.
pub const RELAY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEINRzkS4khNl8zjggFJu/taaEr2uuVbke6RAAaJlsgXA9
-----END PRIVATE KEY-----
";

/// Throwaway ES256 consumer key (PKCS#8), fuzzing only. The context
/// reference verifier does not trust it; the TTS registers it as the client.
pub const CONSUMER_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgOJqUXu7o3gxPWx4F
M4Ww9LfC9cO4h5GNXseZRreS/B2hRANCAARVcPBUoOlwXQcE6M1PSbxtaY/HSjwW
VfEYCOFEsKBBrm6Ui0wkU/RQ/FpFjnmtmYbUnSHmd2wzWPN37ZLsBcnC
-----END PRIVATE KEY-----
";

/// The fixed verification time of the `ctxref` target (2026-01-01T00:00:00Z).
pub const NOW: i64 = 1_767_225_600;
/// The destination a fuzzed reference is checked against.
pub const DESTINATION: &str = "orders";
/// The message payload a fuzzed reference is checked against.
pub const PAYLOAD: &[u8] = br#"{"order":42,"amount":"9.99"}"#;

/// Placeholder replaced by the previous segment's token (`ctxref`).
pub const PREV: &[u8] = b"@PREV@";
/// Placeholder replaced by the base64url SHA-256 of [`PAYLOAD`] (`ctxref`).
pub const DIG: &[u8] = b"@DIG@";

/// The producer's signing key.
pub fn producer_key() -> SigningKey {
    load(SigningAlg::ES256, PRODUCER_KID, PRODUCER_PEM)
}

/// The relay's signing key.
pub fn relay_key() -> SigningKey {
    load(SigningAlg::EdDSA, RELAY_KID, RELAY_PEM)
}

/// The consumer's signing key.
pub fn consumer_key() -> SigningKey {
    load(SigningAlg::ES256, CONSUMER_KID, CONSUMER_PEM)
}

fn load(alg: SigningAlg, kid: &str, pem: &str) -> SigningKey {
    SigningKey::from_pkcs8_pem(alg, kid, pem).expect("fixed fuzz key loads")
}

/// Producer and relay keys, each owned by its workload (what a consumer trusts).
pub fn trusted_keys() -> KeySet {
    let mut ks = KeySet::new();
    ks.insert_workload_key(PRODUCER, &producer_key())
        .expect("producer key");
    ks.insert_workload_key(RELAY, &relay_key())
        .expect("relay key");
    ks
}

/// The verifier of the `ctxref` target: audience [`CONSUMER`], default policy.
pub fn verifier() -> ContextRefVerifier {
    ContextRefVerifier::new(trusted_keys(), VerifyPolicy::new(CONSUMER))
}

/// base64url SHA-256 of [`PAYLOAD`], what a valid `dig` claim holds.
pub fn payload_digest() -> String {
    sha256_b64url(PAYLOAD)
}

/// The protected header the project's own signer writes for `key`.
pub fn standard_header(key: &SigningKey) -> String {
    serde_json::json!({
        "typ": elevate_core::ctxref::CTX_REF_TYP,
        "alg": key.alg().as_str(),
        "kid": key.kid(),
    })
    .to_string()
}

/// A compact JWS over arbitrary header and payload bytes, signed by `key`
/// through jsonwebtoken (the library the project verifies with): lets the
/// fuzzer reach claim parsing with bytes `jws::sign` could never produce.
pub fn sign_raw(key: &SigningKey, header: &[u8], payload: &[u8]) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let sig = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        key.encoding_key(),
        key.alg().jwt_alg(),
    )
    .expect("signing with a fixed key");
    format!("{signing_input}.{sig}")
}

/// Signs `claims` the way the project does (`jws::sign`).
pub fn sign_claims(key: &SigningKey, claims: &serde_json::Value) -> String {
    jws::sign(key, elevate_core::ctxref::CTX_REF_TYP, claims).expect("signing with a fixed key")
}

/// Replaces every occurrence of `from` in `haystack` by `to`.
pub fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return haystack.to_vec();
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}
