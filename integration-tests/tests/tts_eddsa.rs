//! The TTS's own token-signing algorithm (`signing_alg` in its
//! configuration, `--signing-alg` on its command line), end to end: the TTS
//! binary on loopback over HTTP, real keys, real context references
//! exchanged by the real client, its JWKS fetched over HTTP by the real
//! verifier. What users rely on: an EdDSA TTS issues Ed25519-signed
//! Txn-Tokens that verify with its published keys alone, rotates to EdDSA,
//! and every published key pins its algorithm, so a token whose `alg` is
//! not its key's is refused, whichever way round.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use elevate_core::ctxref::{MintRequest, MintedRef, SubjectKind, VerifiedRef};
use elevate_core::jws::{self, JwsError};
use elevate_core::keys::{SigningAlg, SigningKey, sha256_hex};
use elevate_core::scope::Scope;
use elevate_core::token::{TXN_TOKEN_TYP, TokenRequest, TokenSource, TxnToken};
use elevate_testing::tts::{TTS_TRUST_DOMAIN, TestWorkload, TtsProcess, client};
use elevate_tts::ServiceConfig;
use txn_token_client::TxnTokenVerifier;
use txn_token_client::verify::VerifyError;

const BIN: &str = env!("CARGO_BIN_EXE_elevate-tts");

/// A producer and a consumer registered at a TTS process.
struct Setup {
    producer: TestWorkload,
    consumer: TestWorkload,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// Writes `tts.toml` (admin endpoints on, for rotation) with `signing_alg`
/// when given, and `signing_key_pem` holding `pem_key` when given.
fn setup(alg: Option<SigningAlg>, pem_key: Option<&SigningKey>) -> Setup {
    let producer = TestWorkload::generate("orders", &["orders.read"]);
    let consumer = TestWorkload::generate("billing", &["orders.read"]);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut config = ServiceConfig::new(TTS_TRUST_DOMAIN);
    config.listen = "127.0.0.1:0".into();
    config.admin_endpoints = true;
    if let Some(alg) = alg {
        config.signing_alg = alg;
    }
    if let Some(k) = pem_key {
        std::fs::write(dir.path().join("tts-signing.pem"), k.to_pkcs8_pem())
            .unwrap_or_else(|e| panic!("write key: {e}"));
        config.signing_key_pem = Some("tts-signing.pem".into());
    }
    config.workloads = vec![producer.config(), consumer.config()];
    let path = dir.path().join("tts.toml");
    let text = config.to_toml().unwrap_or_else(|e| panic!("config: {e}"));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write config: {e}"));
    Setup {
        producer,
        consumer,
        _dir: dir,
        path,
    }
}

impl Setup {
    fn spawn(&self, args: &[&str]) -> std::io::Result<TtsProcess> {
        TtsProcess::spawn_with_args(Path::new(BIN), &self.path, None, "info", args)
    }

    fn reference(&self, txn: &str) -> VerifiedRef {
        let m: MintedRef = self
            .producer
            .minter(Duration::from_secs(300))
            .mint(&MintRequest {
                subject: "alice",
                sub_kind: SubjectKind::Human,
                audience: std::slice::from_ref(&self.consumer.id),
                scope: &Scope::parse("orders.read"),
                txn,
                destination: "orders",
                payload: b"{\"order\":1}",
            })
            .unwrap_or_else(|e| panic!("mint: {e}"));
        VerifiedRef {
            token_sha256: sha256_hex(m.token.as_bytes()),
            claims: m.claims,
            token: m.token,
        }
    }

    async fn exchange(&self, tts: &TtsProcess, txn: &str) -> TxnToken {
        let r = self.reference(txn);
        client(tts, &self.consumer)
            .acquire(&TokenRequest {
                reference: &r,
                scope: &Scope::parse("orders.read"),
                request_details: serde_json::json!({"source": "eddsa-test"}).into(),
            })
            .await
            .unwrap_or_else(|e| panic!("exchange: {e}; log:\n{}", tts.log()))
    }
}

/// The decoded JSON of one segment (0: header, 1: claims) of a compact JWS.
fn segment(jwt: &str, i: usize) -> serde_json::Value {
    let part = jwt.split('.').nth(i).unwrap_or_else(|| panic!("not a JWS"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap_or_else(|e| panic!("base64: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("JSON: {e}"))
}

/// The TTS's JWKS, fetched over HTTP.
async fn jwks(tts: &TtsProcess) -> Vec<serde_json::Value> {
    let doc: serde_json::Value = reqwest::get(tts.jwks_url())
        .await
        .unwrap_or_else(|e| panic!("GET jwks: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("jwks JSON: {e}"));
    doc["keys"].as_array().cloned().unwrap_or_default()
}

fn assert_all_okp(keys: &[serde_json::Value]) {
    assert!(!keys.is_empty());
    for k in keys {
        assert_eq!(k["kty"], "OKP", "{k}");
        assert_eq!(k["crv"], "Ed25519", "{k}");
        assert_eq!(k["alg"], "EdDSA", "{k}");
        assert_eq!(k["use"], "sig", "{k}");
        assert!(k.get("d").is_none(), "private material published: {k}");
    }
}

fn verifier(tts: &TtsProcess) -> TxnTokenVerifier {
    TxnTokenVerifier::remote(TTS_TRUST_DOMAIN, reqwest::Client::new(), &tts.jwks_url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eddsa_tts_issues_ed25519_txn_tokens_that_verify_with_its_jwks_and_rotates_to_eddsa() {
    let s = setup(Some(SigningAlg::EdDSA), None);
    let tts = s.spawn(&[]).unwrap_or_else(|e| panic!("start TTS: {e}"));
    let keys = jwks(&tts).await;
    assert_all_okp(&keys);
    assert_eq!(keys.len(), 1);
    let kid0 = keys[0]["kid"].as_str().unwrap_or_default().to_string();

    let t = s.exchange(&tts, "txn-eddsa-1").await;
    let header = segment(t.token.expose(), 0);
    assert_eq!(header["alg"], "EdDSA", "{header}");
    assert_eq!(header["kid"], kid0.as_str());
    assert_eq!(header["typ"], TXN_TOKEN_TYP);
    assert_eq!(t.claims.req_wl, s.consumer.id);
    assert_eq!(t.claims.sub, "alice");
    // A verifier with nothing but the published JWKS accepts it.
    let claims = verifier(&tts)
        .verify(t.token.expose())
        .await
        .unwrap_or_else(|e| panic!("verify: {e}"));
    assert_eq!(claims.txn, "txn-eddsa-1");

    // Rotation keeps the algorithm: the new key is Ed25519 too, the old one
    // stays published, and tokens of both verify.
    let resp = reqwest::Client::new()
        .post(tts.rotate_url())
        .send()
        .await
        .unwrap_or_else(|e| panic!("rotate: {e}"));
    assert_eq!(resp.status().as_u16(), 200);
    let keys = jwks(&tts).await;
    assert_all_okp(&keys);
    let kids: Vec<&str> = keys.iter().filter_map(|k| k["kid"].as_str()).collect();
    assert_eq!(kids.len(), 2, "{kids:?}");
    assert!(kids.contains(&kid0.as_str()));
    let t2 = s.exchange(&tts, "txn-eddsa-2").await;
    let h2 = segment(t2.token.expose(), 0);
    assert_eq!(h2["alg"], "EdDSA");
    assert_ne!(h2["kid"], kid0.as_str(), "signed by the new key");
    let v = verifier(&tts);
    for tok in [&t, &t2] {
        v.verify(tok.token.expose())
            .await
            .unwrap_or_else(|e| panic!("verify after rotation: {e}"));
    }
    // The log names the algorithm, never a token.
    let log = tts.log();
    assert!(
        log.contains("alg=\"EdDSA\"") || log.contains("alg=EdDSA"),
        "{log}"
    );
    assert!(!log.contains(t.token.expose()), "token logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_token_verifies_only_with_the_algorithm_its_published_key_pins() {
    for alg in [SigningAlg::EdDSA, SigningAlg::ES256] {
        let other = match alg {
            SigningAlg::EdDSA => SigningAlg::ES256,
            _ => SigningAlg::EdDSA,
        };
        let s = setup(Some(alg), None);
        let tts = s.spawn(&[]).unwrap_or_else(|e| panic!("start TTS: {e}"));
        let real = s.exchange(&tts, "txn-pin-1").await;
        let header = segment(real.token.expose(), 0);
        assert_eq!(header["alg"], alg.as_str());
        let kid = header["kid"].as_str().unwrap_or_default().to_string();
        let claims = segment(real.token.expose(), 1);
        let v = verifier(&tts);
        v.verify(real.token.expose())
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: the real token: {e}"));

        // The same claims under the TTS's kid, signed with the other
        // algorithm: refused as an algorithm the key does not allow, before
        // any signature check.
        let forger = SigningKey::generate(other, "forger").unwrap_or_else(|e| panic!("{e}"));
        let confused = jws::sign_with(
            forger.encoding_key(),
            other,
            Some(&kid),
            TXN_TOKEN_TYP,
            &claims,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let got = v.verify(&confused).await;
        assert!(
            matches!(&got, Err(VerifyError::Jws(JwsError::AlgorithmNotAllowed(a))) if a == other.as_str()),
            "{alg:?} key, {other:?} token: {got:?}"
        );
        // The right algorithm, but not the TTS's key: a bad signature.
        let impostor = SigningKey::generate(alg, "impostor").unwrap_or_else(|e| panic!("{e}"));
        let forged = jws::sign_with(
            impostor.encoding_key(),
            alg,
            Some(&kid),
            TXN_TOKEN_TYP,
            &claims,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let got = v.verify(&forged).await;
        assert!(
            matches!(got, Err(VerifyError::Jws(JwsError::BadSignature))),
            "{alg:?}: {got:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_overrides_signing_alg_and_a_key_file_of_another_algorithm_is_refused() {
    // ES256 by default; --signing-alg EdDSA overrides the file.
    let s = setup(None, None);
    let tts = s.spawn(&[]).unwrap_or_else(|e| panic!("start TTS: {e}"));
    for k in jwks(&tts).await {
        assert_eq!(
            (k["kty"].as_str(), k["alg"].as_str()),
            (Some("EC"), Some("ES256"))
        );
    }
    assert_eq!(
        segment(s.exchange(&tts, "t-es").await.token.expose(), 0)["alg"],
        "ES256"
    );
    drop(tts);
    let tts = s
        .spawn(&["--signing-alg", "EdDSA"])
        .unwrap_or_else(|e| panic!("start TTS: {e}"));
    assert_all_okp(&jwks(&tts).await);
    assert_eq!(
        segment(s.exchange(&tts, "t-ed").await.token.expose(), 0)["alg"],
        "EdDSA"
    );
    drop(tts);

    // A key file of the other algorithm: the service does not start, and says why.
    let es_key = SigningKey::generate(SigningAlg::ES256, "k").unwrap_or_else(|e| panic!("{e}"));
    let s = setup(Some(SigningAlg::EdDSA), Some(&es_key));
    let err = s.spawn(&[]).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("signing_alg = EdDSA"), "{err}");
    assert!(!err.contains("BEGIN"), "key material in the error: {err}");
    // ... and the same key with signing_alg = ES256 (the default) starts.
    let s = setup(None, Some(&es_key));
    let tts = s.spawn(&[]).unwrap_or_else(|e| panic!("start TTS: {e}"));
    assert_eq!(
        jwks(&tts)
            .await
            .first()
            .and_then(|k| k["alg"].as_str().map(str::to_string)),
        Some("ES256".to_string())
    );

    // Anything but the two JOSE names is a usage error (exit 2).
    for bad in ["HS256", "none", "eddsa"] {
        let status = Command::new(BIN)
            .arg("--config")
            .arg(&s.path)
            .args(["--signing-alg", bad])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("run {BIN}: {e}"));
        assert_eq!(status.code(), Some(2), "--signing-alg {bad}");
    }
}
