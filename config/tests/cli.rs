//! `elevate-config check` as an operator runs it: the annotated example
//! parses, a wrong value given through the environment is reported with the
//! variable's name and the key, a missing file with its path.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_elevate-config");

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("elevate.example.toml")
}

#[test]
fn the_annotated_example_is_a_valid_configuration() {
    let l = elevate_config::Loaded::read_file_only(example())
        .unwrap_or_else(|e| panic!("the example does not read: {e}"));
    assert_eq!(l.config.workload, "spiffe://elevate.example/orders-worker");
    assert_eq!(l.spiffe_trust_domain().as_deref(), Some("elevate.example"));
}

#[test]
fn the_readme_configuration_is_valid() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap_or_else(|e| panic!("README: {e}"));
    let block = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("the README shows no elevate.toml"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("elevate.toml");
    std::fs::write(&path, block).unwrap_or_else(|e| panic!("{e}"));
    let l = elevate_config::Loaded::read_file_only(&path)
        .unwrap_or_else(|e| panic!("the README's elevate.toml does not read: {e}"));
    assert_eq!(l.config.actions.len(), 1);
    assert!(l.config.tts.is_some() && l.config.pdp.bundle.is_some());
}

#[test]
fn an_environment_override_is_read_and_named_when_wrong() {
    let out = Command::new(BIN)
        .arg("check")
        .arg(example())
        .env("ELEVATE_REPLAY__STORE", "postgres://nope")
        .output()
        .unwrap_or_else(|e| panic!("run {BIN}: {e}"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replay.store"), "{err}");
    assert!(err.contains("ELEVATE_REPLAY__STORE"), "{err}");
    assert!(err.contains("postgres://nope"), "{err}");
}

#[test]
fn a_missing_file_is_named() {
    let out = Command::new(BIN)
        .args(["check", "/nonexistent/elevate.toml"])
        .output()
        .unwrap_or_else(|e| panic!("run {BIN}: {e}"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/elevate.toml") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn key_new_writes_a_private_key_and_key_public_the_jwks_the_tts_registers() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pem = dir.path().join("orders-api-2.pem");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {BIN}: {e}"))
    };
    let path = pem.to_str().unwrap_or_default();
    let out = run(&["key", "new", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pem).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(
            mode.ok(),
            Some(0o600),
            "a private key is readable by its owner only"
        );
    }
    let again = run(&["key", "new", path]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "an existing key is never overwritten"
    );

    let out = run(&["key", "public", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwks: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON: {e}"));
    let keys = jwks["keys"].as_array().cloned().unwrap_or_default();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], "orders-api-2");
    assert!(
        keys[0].get("d").is_none(),
        "no private member in the public file"
    );
    // The key signs what its public half verifies.
    let key = elevate_core::keys::SigningKey::from_pem_file(
        elevate_core::keys::SigningAlg::ES256,
        "orders-api-2",
        &pem,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        serde_json::to_value(key.public_jwk()).unwrap_or_default(),
        keys[0]
    );
}

#[test]
fn key_new_and_public_make_a_key_agreement_key_and_the_audience_jwks_producers_read() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pem = dir.path().join("test-worker-enc-1.pem");
    let path = pem.to_str().unwrap_or_default();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {BIN}: {e}"))
    };
    let out = run(&["key", "new", "--alg", "ECDH-ES+A256KW", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let no_owner = run(&["key", "public", "--alg", "ECDH-ES+A256KW", path]);
    assert_eq!(no_owner.status.code(), Some(2), "the owner must be named");
    let workload = "spiffe://elevate.example/test-worker";
    let out = run(&[
        "key",
        "public",
        "--alg",
        "ECDH-ES+A256KW",
        "--workload",
        workload,
        path,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwks: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON: {e}"));
    assert_eq!(jwks["keys"][0]["kid"], "test-worker-enc-1");
    assert_eq!(jwks["keys"][0]["elevate_owner"], workload);
    assert_eq!(jwks["keys"][0]["use"], "enc");
    assert!(jwks["keys"][0].get("d").is_none());
    // what a producer reads, and what the consumer unwraps with
    let audiences = elevate_core::ctxbind::AudienceKeys::from_jwks_json(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(audiences.len(), 1);
    let key = elevate_core::ctxbind::KeyAgreementKey::from_pem_file("test-worker-enc-1", &pem)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        key.public_jwk().parameter("x"),
        jwks["keys"][0].get("x"),
        "the public file holds the key's public half"
    );
}

fn decision(i: u64) -> elevate_core::decision::DecisionRecord {
    use elevate_core::verdict::{Reason, Verdict};
    elevate_core::decision::DecisionRecord {
        decision_id: format!("d{i}"),
        time: "2026-12-03T00:00:00Z".into(),
        verdict: Verdict::Permit,
        reason: Reason::Permitted,
        detail: None,
        subject: Some("alice".into()),
        workload: "spiffe://elevate.example/w".into(),
        producer: None,
        action: None,
        resource: None,
        txn: None,
        chain: vec![],
        source: elevate_core::memory::coordinates("orders", i),
        attempt: 1,
        policy_version: "v1".into(),
        bundle_revision: Some(1),
        latency_us: 10,
        trace_id: "t".into(),
        ctx_ref_sha256: None,
        txn_token_sha256: None,
    }
}

fn verify(paths: &[&Path]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["decisions", "verify"])
        .args(paths)
        .output()
        .unwrap_or_else(|e| panic!("run {BIN}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `decisions verify` on a spool directory and on what a receiver stored:
/// intact is exit 0, an edited entry or a gap exit 1 with what broke.
#[test]
fn decisions_verify_reports_intact_edited_and_missing_entries() {
    use elevate_core::decision::{DecisionSink, Spool, SpoolConfig};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let spool_dir = dir.path().join("spool");
    {
        let spool = Spool::open(SpoolConfig::new(&spool_dir)).unwrap_or_else(|e| panic!("{e}"));
        for i in 1..=30 {
            spool.record(&decision(i)).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let (code, out) = verify(&[&spool_dir]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("entries up to seq 30 intact"), "{out}");

    // what a receiver stored: the entry lines, once as shipped, then with one missing
    let segment = std::fs::read_dir(&spool_dir)
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap_or_else(|| panic!("no segment in {}", spool_dir.display()));
    let text = std::fs::read_to_string(&segment).unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<&str> = text.trim_end_matches('\0').lines().collect();
    assert_eq!(lines.len(), 30);
    let stored = dir.path().join("stored.jsonl");
    std::fs::write(&stored, lines.join("\n") + "\n").unwrap_or_else(|e| panic!("{e}"));
    let (code, out) = verify(&[&stored]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("30 entries") && out.contains("intact"),
        "{out}"
    );
    let gap: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 11)
        .map(|(_, l)| *l)
        .collect();
    std::fs::write(&stored, gap.join("\n") + "\n").unwrap_or_else(|e| panic!("{e}"));
    let (code, out) = verify(&[&stored]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("gaps [12..=12]"), "{out}");

    // an edited decision in the spool itself
    std::fs::write(
        &segment,
        text.replacen("\"verdict\":\"permit\"", "\"verdict\":\"deny\"", 1),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (code, out) = verify(&[&spool_dir]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("does not link"), "{out}");
}
