//! The floor, measured in the same run as the rows: what one message's
//! checks cannot cost less than. One context-reference verification per
//! signature algorithm (the project's own `ContextRefVerifier`: parse,
//! signature, claims, time window, destination and payload digest), one
//! HMAC-SHA256 over ~200 bytes (the per-message MAC a per-context binding
//! would check), one uncached trust elevation (both Cedar checks on the
//! embedded PDP the guard uses, no answer cache) and one answer-cache hit
//! (`CachingPdp`, same two questions).
//!
//! Each is timed in process over a few batches of many iterations, each
//! batch running for a fixed time budget; the figure is the median of the
//! batch means.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use elevate_core::ctxref::{
    ContextRefMinter, ContextRefVerifier, MintRequest, SubjectKind, VerifyPolicy,
};
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::pdp::{ElevationRequest, EntityRef, PolicyDecisionPoint, USER_TYPE};
use elevate_core::pdp_cache::CachingPdp;
use elevate_core::scope::Scope;
use elevate_testing::env::{ACTION, CONSUMER, PRODUCER};

use crate::scenario::Binding;

/// Batches per measurement; the median of their means is reported.
const BATCHES: usize = 5;
/// Iterations between two looks at the clock.
const CHUNK: u64 = 16;

/// The floor of one run, in µs per operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Floor {
    /// One ES256 context-reference verification.
    pub verify_es256_us: f64,
    /// One EdDSA (Ed25519) context-reference verification.
    pub verify_eddsa_us: f64,
    /// One HMAC-SHA256 over ~200 bytes.
    pub mac_us: f64,
    /// One trust elevation (both Cedar checks), uncached.
    pub cedar_elevation_us: f64,
    /// One answer-cache hit for the same two questions.
    pub cache_hit_us: f64,
}

impl Floor {
    /// What a guarded message of `binding` cannot cost less than, in µs:
    /// per-message, one ES256 verification and one answer-cache hit (the
    /// repeated context's Txn-Token comes from the token cache); per
    /// context, one MAC and one cache hit.
    pub fn bound_us(&self, binding: Binding) -> f64 {
        match binding {
            Binding::PerMessage => self.verify_es256_us + self.cache_hit_us,
            Binding::PerContext => self.mac_us + self.cache_hit_us,
        }
    }

    /// The floor as a Markdown table.
    pub fn table(&self) -> String {
        let row = |what: &str, us: f64| format!("| {what} | {us:.2} | {:.0} |\n", 1e6 / us);
        let mut s = String::from("| operation | µs | per second (one core) |\n|---|---:|---:|\n");
        s.push_str(&row(
            "context-reference verification, ES256",
            self.verify_es256_us,
        ));
        s.push_str(&row(
            "context-reference verification, EdDSA (Ed25519)",
            self.verify_eddsa_us,
        ));
        s.push_str(&row("HMAC-SHA256 over 200 bytes", self.mac_us));
        s.push_str(&row(
            "trust elevation, both Cedar checks, uncached",
            self.cedar_elevation_us,
        ));
        s.push_str(&row("answer-cache hit (CachingPdp)", self.cache_hit_us));
        s
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times `$body` (an expression, may use `?` and `.await`) over
/// [`BATCHES`] batches of `$budget` each; evaluates to the median µs per run.
macro_rules! measure {
    ($budget:expr, $body:expr) => {{
        let mut means = Vec::with_capacity(BATCHES);
        for _ in 0..BATCHES {
            let started = Instant::now();
            let mut n = 0u64;
            while n == 0 || started.elapsed() < $budget {
                for _ in 0..CHUNK {
                    std::hint::black_box($body);
                }
                n += CHUNK;
            }
            means.push(started.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
        median(means)
    }};
}

/// A verifier for references signed with a fresh key of `alg`, and one such reference.
fn reference(
    alg: SigningAlg,
    destination: &str,
    payload: &[u8],
) -> Result<(ContextRefVerifier, String), String> {
    let key =
        SigningKey::generate(alg, format!("floor-{}", alg.as_str())).map_err(|e| e.to_string())?;
    let mut keys = KeySet::new();
    keys.insert_workload_key(PRODUCER, &key)
        .map_err(|e| e.to_string())?;
    let minter = ContextRefMinter::new(PRODUCER, key, Duration::from_secs(600));
    let audience = vec![CONSUMER.to_string()];
    let scope = Scope::parse(ACTION);
    let minted = minter
        .mint(&MintRequest {
            subject: "carol",
            sub_kind: SubjectKind::Human,
            audience: &audience,
            scope: &scope,
            txn: "floor-txn",
            destination,
            payload,
        })
        .map_err(|e| e.to_string())?;
    Ok((
        ContextRefVerifier::new(keys, VerifyPolicy::new(CONSUMER)),
        minted.token,
    ))
}

/// Measures the floor on `cedar` (the embedded PDP the guard uses, without
/// its answer cache); `quick` shortens every measurement.
///
/// # Errors
///
/// Says which operation failed (a reference that does not verify, a PDP
/// that refuses the benchmark's own request).
pub async fn measure(cedar: Arc<dyn PolicyDecisionPoint>, quick: bool) -> Result<Floor, String> {
    let budget = Duration::from_millis(if quick { 8 } else { 60 });
    let destination = "bench-floor";
    let payload = br#"{"order":1,"amount":120,"currency":"EUR","lines":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}]}"#;

    let verify = |alg| -> Result<f64, String> {
        let (verifier, token) = reference(alg, destination, payload)?;
        verifier
            .verify(&token, destination, payload)
            .map_err(|e| format!("floor: {alg:?} reference does not verify: {e}"))?;
        Ok(measure!(
            budget,
            verifier.verify(&token, destination, payload).is_ok()
        ))
    };
    let verify_es256_us = verify(SigningAlg::ES256)?;
    let verify_eddsa_us = verify(SigningAlg::EdDSA)?;

    // The input a per-message MAC covers: the reference's hash, destination,
    // payload digest, jti and iat — about 200 bytes.
    let key = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
    let input = [0x5au8; 200];
    let mac_us = measure!(budget, hmac::sign(&key, &input));

    let elevation = ElevationRequest {
        workload: CONSUMER.to_string(),
        subject: EntityRef::new(USER_TYPE, "carol"),
        action: ACTION.to_string(),
        resource: EntityRef::new("Destination", destination),
        scope: vec![ACTION.to_string()],
        chain: vec![PRODUCER.to_string()],
        depth: 0,
        txn: "floor-txn".to_string(),
    };
    let answers = cedar
        .evaluate_all(&elevation.requests())
        .await
        .map_err(|e| format!("floor: trust elevation: {e}"))?;
    if answers.len() != 2 || !answers.iter().all(|a| a.allowed) {
        return Err(format!(
            "floor: the example bundle does not permit the benchmark's elevation: {answers:?}"
        ));
    }
    // As the guard does per message: build both questions, ask both.
    let cedar_elevation_us = measure!(
        budget,
        cedar.evaluate_all(&elevation.requests()).await.is_ok()
    );
    let cached = CachingPdp::new(cedar, 16);
    let _ = cached.evaluate_all(&elevation.requests()).await;
    let cache_hit_us = measure!(
        budget,
        cached.evaluate_all(&elevation.requests()).await.is_ok()
    );
    Ok(Floor {
        verify_es256_us,
        verify_eddsa_us,
        mac_us,
        cedar_elevation_us,
        cache_hit_us,
    })
}
