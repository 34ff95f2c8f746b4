//! `elevate-bundle` as an operator runs it, on real files: build a signed
//! archive from the example bundle, verify it against the signer's JWKS
//! (and refuse it against another), inspect it, publish it to a path; an
//! invalid bundle directory is refused before anything is signed. Exit
//! codes: 0 ok, 2 refused.

use std::path::Path;
use std::process::{Command, Output};

use elevate_core::keys::{SigningAlg, SigningKey};

const BIN: &str = env!("CARGO_BIN_EXE_elevate-bundle");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {BIN}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn key_files(dir: &Path, kid: &str) -> (String, String) {
    let key = SigningKey::generate(SigningAlg::ES256, kid).unwrap_or_else(|e| panic!("{e}"));
    let pem = dir.join(format!("{kid}.pem"));
    std::fs::write(&pem, key.to_pkcs8_pem()).unwrap_or_else(|e| panic!("{e}"));
    let jwks = dir.join(format!("{kid}.jwks.json"));
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": [key.public_jwk()] }).to_string(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (pem.display().to_string(), jwks.display().to_string())
}

#[test]
fn build_verify_inspect_publish() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let (pem, jwks) = key_files(dir.path(), "bundles-1");
    let (_, other_jwks) = key_files(dir.path(), "bundles-2");
    let archive = dir.path().join("orders.tar.gz").display().to_string();

    let o = run(&[
        "build",
        policies.to_str().unwrap_or_default(),
        "--revision",
        "7",
        "--key",
        &pem,
        "--out",
        &archive,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("revision 7"), "{}", text(&o));

    let o = run(&["verify", &archive, "--keys", &jwks, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(v["revision"], 7);
    assert_eq!(v["signed_by"], "bundles-1");
    assert!(v["policies"].as_array().is_some_and(|p| !p.is_empty()));

    let o = run(&["verify", &archive, "--keys", &other_jwks]);
    assert_eq!(o.status.code(), Some(2), "another signer: {}", text(&o));
    assert!(text(&o).contains("unknown kid"), "{}", text(&o));

    let o = run(&["inspect", &archive]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("entities.json") && text(&o).contains("not verified"));

    let published = dir.path().join("served.tar.gz").display().to_string();
    let o = run(&["publish", &archive, "--to", &published]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(&published).ok(),
        std::fs::read(&archive).ok(),
        "published as built"
    );

    // A directory that is not a valid bundle is refused before signing.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap_or_else(|e| panic!("{e}"));
    for f in ["schema.cedarschema", "entities.json", "subjects.cedar"] {
        std::fs::copy(policies.join(f), broken.join(f)).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(
        broken.join("bad.cedar"),
        "permit (principal, action, resource) when { nope };",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("broken.tar.gz");
    let o = run(&[
        "build",
        broken.to_str().unwrap_or_default(),
        "--revision",
        "8",
        "--key",
        &pem,
        "--out",
        out.to_str().unwrap_or_default(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(!out.exists(), "nothing written for a refused bundle");
}
