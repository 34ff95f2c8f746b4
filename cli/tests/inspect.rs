//! `elevate inspect` run as a binary on real signed references.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use elevate_core::SubjectKind;
use elevate_core::ctxbind::{AudienceKeys, ContextBinder, KeyAgreementKey};
use elevate_core::ctxref::{ContextRefClaims, ContextRefMinter, MintRequest};
use elevate_core::keys::directory::workload_jwks_document;
use elevate_core::keys::{SigningAlg, SigningKey, sha256_hex};
use elevate_core::scope::Scope;
use serde_json::Value;

const PRODUCER: &str = "spiffe://example.org/orders";
const CONSUMER: &str = "spiffe://example.org/billing";
const DST: &str = "orders";
const PAYLOAD: &[u8] = br#"{"order":42}"#;

struct World {
    dir: tempfile::TempDir,
    key: SigningKey,
    minter: ContextRefMinter,
    jwks: PathBuf,
    payload: PathBuf,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate(SigningAlg::ES256, "orders-1").unwrap();
    let doc = workload_jwks_document([(PRODUCER, key.public_jwk())]).unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, doc.to_string()).unwrap();
    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, PAYLOAD).unwrap();
    let minter = ContextRefMinter::new(PRODUCER, key.clone(), Duration::from_secs(600));
    World {
        dir,
        key,
        minter,
        jwks,
        payload,
    }
}

fn claims(minter: &ContextRefMinter) -> ContextRefClaims {
    minter.origin_claims(&MintRequest {
        subject: "alice",
        sub_kind: SubjectKind::Human,
        audience: &[CONSUMER.to_string()],
        scope: &Scope::parse("orders.read"),
        txn: "txn-1",
        destination: DST,
        payload: PAYLOAD,
    })
}

fn mint(minter: &ContextRefMinter) -> String {
    minter.sign(claims(minter)).unwrap().token
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_elevate"))
        .arg("inspect")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn per_message_reference_verifies_with_payload_and_destination() {
    let w = world();
    let token = mint(&w.minter);
    let args = [
        &token,
        "--jwks",
        p(&w.jwks),
        "--audience",
        CONSUMER,
        "--payload",
        p(&w.payload),
        "--destination",
        DST,
    ];
    let out = run(&args, None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(text.contains("verified"), "{text}");
    assert!(text.contains(&sha256_hex(token.as_bytes())), "{text}");
    assert!(!text.contains(&token), "the JWS is never printed");

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = run(&json_args, None);
    assert_eq!(out.status.code(), Some(0));
    assert!(!stdout(&out).contains(&token));
    let v = json(&out);
    assert_eq!(v["kind"], "per-message");
    assert_eq!(v["header"]["kid"], "orders-1");
    assert_eq!(v["header"]["typ"], "ctx-ref+jwt");
    assert_eq!(v["claims"]["iss"], PRODUCER);
    assert_eq!(v["claims"]["dst"], DST);
    assert_eq!(v["claims"]["expired"], false);
    assert_eq!(v["chain"], serde_json::json!([PRODUCER]));
    assert_eq!(v["payload"]["matches"], true);
    assert_eq!(v["verification"]["verified"], true);
    assert_eq!(v["reference_sha256"], sha256_hex(token.as_bytes()));
}

#[test]
fn wrong_payload_fails_with_digest_mismatch() {
    let w = world();
    let token = mint(&w.minter);
    let other = w.dir.path().join("other.json");
    std::fs::write(&other, b"{\"order\":43}").unwrap();
    let out = run(
        &[
            &token,
            "--jwks",
            p(&w.jwks),
            "--audience",
            CONSUMER,
            "--payload",
            p(&other),
            "--destination",
            DST,
            "--json",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["verification"]["verified"], false);
    assert_eq!(v["verification"]["reason"], "digest-mismatch");
    assert_eq!(v["payload"]["matches"], false);
}

#[test]
fn payload_alone_is_compared_with_dig() {
    let w = world();
    let token = mint(&w.minter);
    let out = run(&[&token, "--payload", p(&w.payload)], None);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("matches dig"), "{}", stdout(&out));
}

#[test]
fn forged_reference_fails_with_bad_signature() {
    let w = world();
    let forger = SigningKey::generate(SigningAlg::ES256, "orders-1").unwrap();
    let forged = mint(&ContextRefMinter::new(
        PRODUCER,
        forger,
        Duration::from_secs(600),
    ));
    let out = run(
        &[&forged, "--jwks", p(&w.jwks), "--audience", CONSUMER],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("bad-signature"), "{text}");
    assert!(!text.contains(&forged));
}

#[test]
fn context_reference_with_binding_and_agreement_key_verifies() {
    let w = world();
    let agreement = KeyAgreementKey::generate("billing-enc-1").unwrap();
    let pem = w.dir.path().join("billing-enc-1.pem");
    std::fs::write(&pem, agreement.to_pkcs8_pem()).unwrap();
    let mut audiences = AudienceKeys::new();
    audiences.insert(CONSUMER, agreement.public_jwk()).unwrap();
    let binder = ContextBinder::new(audiences, Duration::from_secs(600)).with_open_after(1);
    let sealed = binder
        .seal(&w.minter, &claims(&w.minter))
        .unwrap()
        .expect("sealed per context");
    let (token, binding) = (sealed.reference.token, sealed.binding);
    let headers = serde_json::json!({
        "ztauth-ctx-ref": token,
        "ztauth-ctx-bind": binding,
        "content-type": "application/json",
    })
    .to_string();
    let args = [
        "-",
        "--jwks",
        p(&w.jwks),
        "--audience",
        CONSUMER,
        "--payload",
        p(&w.payload),
        "--destination",
        DST,
        "--agreement-key",
        p(&pem),
        "--json",
    ];
    let out = run(&args, Some(&headers));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(!text.contains(&token) && !text.contains(&binding));
    let v = json(&out);
    assert_eq!(v["kind"], "context");
    assert_eq!(v["cnf"]["alg"], "ECDH-ES+A256KW");
    assert_eq!(v["cnf"]["enc"], "A256GCM");
    assert_eq!(v["binding"]["dst"], DST);
    assert_eq!(v["binding"]["ref_matches"], true);
    assert_eq!(v["binding"]["mac_checked"], true);
    assert_eq!(v["verification"]["verified"], true);

    // Without the agreement key: the binding is decoded, its MAC not checked.
    let out = run(
        &[
            "--binding",
            &binding,
            &token,
            "--payload",
            p(&w.payload),
            "--json",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0));
    let v = json(&out);
    assert_eq!(v["binding"]["mac_checked"], false);
    assert_eq!(v["payload"]["against"], "binding dig");
    assert_eq!(v["payload"]["matches"], true);
}

#[test]
fn dead_letter_headers_on_stdin_are_decoded() {
    let w = world();
    let token = mint(&w.minter);
    let headers =
        serde_json::json!({ "ztauth-ctx-ref": token, "x-elevate-reason": "expired" }).to_string();
    let out = run(&[], Some(&headers));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(text.contains(PRODUCER) && text.contains("txn-1"), "{text}");
    assert!(!text.contains(&token));
    assert!(!text.contains(&w.key.to_pkcs8_pem()));
}

#[test]
fn garbage_input_exits_2_with_advice() {
    let out = run(&["-"], Some("not a token at all"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ztauth-ctx-ref"), "{err}");
    let out = run(&[], Some("{\"other\":\"x\"}"));
    assert_eq!(out.status.code(), Some(2));
    let out = run(
        &["a.b.c", "--jwks", "/nonexistent", "--audience", CONSUMER],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn derived_reference_shows_the_chain_hop_by_hop() {
    let w = world();
    const RELAY: &str = "spiffe://example.org/relay";
    let relay_key = SigningKey::generate(SigningAlg::EdDSA, "relay-1").unwrap();
    let relay = ContextRefMinter::new(RELAY, relay_key.clone(), Duration::from_secs(600));
    // The parent was for the relay, which derived the next hop from it.
    let mut parent_claims = claims(&w.minter);
    parent_claims.aud = vec![RELAY.to_string()];
    let parent = w.minter.sign(parent_claims).unwrap();
    let child = relay
        .derive(
            &parent.claims,
            &parent.token,
            None,
            &[CONSUMER.to_string()],
            "invoices",
            PAYLOAD,
        )
        .unwrap()
        .token;
    let doc = workload_jwks_document([
        (PRODUCER, w.key.public_jwk()),
        (RELAY, relay_key.public_jwk()),
    ])
    .unwrap();
    std::fs::write(&w.jwks, doc.to_string()).unwrap();
    let out = run(
        &[
            &child,
            "--jwks",
            p(&w.jwks),
            "--audience",
            CONSUMER,
            "--json",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(!text.contains(&child) && !text.contains(&parent.token));
    let v = json(&out);
    assert_eq!(v["chain"], serde_json::json!([PRODUCER, RELAY]));
    assert_eq!(v["claims"]["depth"], 1);
    assert_eq!(v["hops"][0]["sub"], PRODUCER);
    assert_eq!(v["hops"][0]["ref_kid"], "orders-1");
    assert_eq!(v["hops"][0]["ref_iss"], PRODUCER);
    assert_eq!(
        v["hops"][0]["ref_sha256"],
        sha256_hex(parent.token.as_bytes())
    );
}
