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
