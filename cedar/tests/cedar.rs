//! Acceptance tests of the embedded Cedar PDP against the example bundle.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use elevate_cedar::{BundleError, CedarPdp};
use elevate_core::pdp::{
    AccessDecision, AccessRequest, ElevationRequest, EntityRef, PdpError, PolicyDecisionPoint,
};

const BUNDLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policies");
const D: &str = "spiffe://elevate.example/";

fn wl(name: &str) -> String {
    format!("{D}{name}")
}

fn pdp() -> CedarPdp {
    CedarPdp::load_dir(BUNDLE).expect("example bundle loads")
}

fn elevation(workload: &str, subject: EntityRef, action: &str, depth: u32) -> ElevationRequest {
    ElevationRequest {
        workload: wl(workload),
        subject,
        action: action.to_string(),
        resource: EntityRef::new("Destination", "invoices"),
        scope: vec![action.to_string()],
        chain: vec![wl("orders-api")],
        depth,
        txn: "txn-1".to_string(),
    }
}

fn user(id: &str) -> EntityRef {
    EntityRef::new("User", id)
}

async fn decide(pdp: &CedarPdp, e: &ElevationRequest) -> (AccessDecision, AccessDecision) {
    let mut out = pdp
        .evaluate_all(&e.requests())
        .await
        .expect("valid request");
    assert_eq!(out.len(), 2);
    let direct = out.remove(1);
    let delegation = out.remove(0);
    (delegation, direct)
}

#[tokio::test]
async fn permits_both_halves_for_entitled_user_and_trusted_worker() {
    let pdp = pdp();
    let (a, b) = decide(
        &pdp,
        &elevation("invoice-worker", user("alice"), "invoice.create", 1),
    )
    .await;
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.policies, vec!["delegation.trusted-workload"]);
    assert!(b.allowed, "{b:?}");
    assert_eq!(b.policies, vec!["subjects.active-user"]);
    assert!(a.errors.is_empty() && b.errors.is_empty());
}

#[tokio::test]
async fn denies_delegation_for_an_action_the_worker_may_not_delegate() {
    let pdp = pdp();
    // alice may charge, but invoice-worker may not charge for anyone.
    let (a, b) = decide(
        &pdp,
        &elevation("invoice-worker", user("alice"), "billing.charge", 1),
    )
    .await;
    assert!(!a.allowed);
    assert!(a.policies.is_empty());
    assert!(b.allowed);
}

#[tokio::test]
async fn denies_subject_half_when_user_lacks_the_entitlement() {
    let pdp = pdp();
    // invoice-worker may create invoices for others, but bob may not create them.
    let (a, b) = decide(
        &pdp,
        &elevation("invoice-worker", user("bob"), "invoice.create", 1),
    )
    .await;
    assert!(a.allowed);
    assert!(!b.allowed);
    // bob may process orders through order-worker.
    let (a, b) = decide(
        &pdp,
        &elevation("order-worker", user("bob"), "order.process", 1),
    )
    .await;
    assert!(a.allowed && b.allowed);
}

#[tokio::test]
async fn workload_subject_uses_its_own_entitlements() {
    let pdp = pdp();
    let batch = EntityRef::new("Workload", wl("batch-job"));
    let (a, b) = decide(
        &pdp,
        &elevation("invoice-worker", batch.clone(), "invoice.create", 0),
    )
    .await;
    assert!(a.allowed && b.allowed, "{a:?} {b:?}");
    assert_eq!(b.policies, vec!["subjects.workload-entitlement"]);
    let (_, b) = decide(&pdp, &elevation("order-worker", batch, "order.process", 0)).await;
    assert!(!b.allowed);
}

#[tokio::test]
async fn untrusted_workload_is_denied() {
    let pdp = pdp();
    let (a, b) = decide(
        &pdp,
        &elevation("untrusted-worker", user("alice"), "invoice.create", 1),
    )
    .await;
    assert!(!a.allowed, "trust_level 0 must not delegate");
    assert!(b.allowed);
}

#[tokio::test]
async fn untrusted_workload_in_the_chain_taints_the_work() {
    let pdp = pdp();
    let mut e = elevation("invoice-worker", user("alice"), "invoice.create", 1);
    e.chain.push(wl("untrusted-worker"));
    let (a, _) = decide(&pdp, &e).await;
    assert!(!a.allowed);
    assert_eq!(a.policies, vec!["chains.untrusted-origin"]);
}

#[tokio::test]
async fn suspended_user_is_denied() {
    let pdp = pdp();
    let (a, b) = decide(
        &pdp,
        &elevation("invoice-worker", user("mallory"), "invoice.create", 1),
    )
    .await;
    assert!(a.allowed, "delegation itself is fine");
    assert!(!b.allowed, "mallory is suspended");
}

#[tokio::test]
async fn unknown_user_is_denied() {
    let pdp = pdp();
    let (a, b) = decide(
        &pdp,
        &elevation("invoice-worker", user("dave"), "invoice.create", 1),
    )
    .await;
    assert!(
        a.allowed,
        "delegation does not read the subject's attributes"
    );
    assert!(!b.allowed);
    assert!(!b.errors.is_empty(), "reading an absent entity is an error");
    let (a, _) = decide(
        &pdp,
        &elevation("ghost-worker", user("alice"), "invoice.create", 1),
    )
    .await;
    assert!(!a.allowed, "unknown workload");
}

#[tokio::test]
async fn depth_over_two_is_denied() {
    let pdp = pdp();
    let (a, _) = decide(
        &pdp,
        &elevation("invoice-worker", user("alice"), "invoice.create", 2),
    )
    .await;
    assert!(a.allowed);
    let (a, b) = decide(
        &pdp,
        &elevation("invoice-worker", user("alice"), "invoice.create", 3),
    )
    .await;
    assert!(!a.allowed);
    assert_eq!(a.policies, vec!["chains.max-depth"]);
    assert!(b.allowed);
}

#[tokio::test]
async fn test_worker_and_carol_pass_the_conformance_action() {
    let pdp = pdp();
    for who in ["alice", "carol"] {
        let (a, b) = decide(
            &pdp,
            &elevation("test-worker", user(who), "test.process", 0),
        )
        .await;
        assert!(a.allowed && b.allowed, "{who}");
    }
}

#[tokio::test]
async fn requests_that_do_not_fit_the_schema_are_invalid() {
    let pdp = pdp();
    let good = elevation("invoice-worker", user("alice"), "invoice.create", 1).requests();

    let mut r = good[1].clone();
    r.action = "invoice.delete".into();
    assert!(matches!(
        pdp.evaluate(&r).await,
        Err(PdpError::InvalidRequest(m)) if m.contains("unknown action")
    ));

    let mut r = good[1].clone();
    r.context["depth"] = serde_json::json!("three");
    assert!(matches!(
        pdp.evaluate(&r).await,
        Err(PdpError::InvalidRequest(_))
    ));

    let mut r = good[1].clone();
    r.subject = EntityRef::new("Robot", "r2");
    assert!(matches!(
        pdp.evaluate(&r).await,
        Err(PdpError::InvalidRequest(_))
    ));

    // actFor does not apply to a Destination resource.
    let r = AccessRequest {
        resource: EntityRef::new("Destination", "invoices"),
        ..good[0].clone()
    };
    assert!(matches!(
        pdp.evaluate(&r).await,
        Err(PdpError::InvalidRequest(_))
    ));
}

#[test]
fn policy_ids_are_annotations_or_file_and_index() {
    let pdp = pdp();
    let snap = pdp.snapshot();
    let ids: Vec<(&str, &str)> = snap.policy_ids().collect();
    assert!(ids.contains(&("delegation.trusted-workload", "delegation.cedar")));
    assert!(ids.contains(&("chains.max-depth", "chains.cedar")));

    let inline = CedarPdp::from_sources(
        "permit (principal, action, resource);\n@id(\"named\") forbid (principal, action, resource);\npermit (principal, action, resource);",
        &std::fs::read_to_string(format!("{BUNDLE}/schema.cedarschema")).unwrap(),
        "[]",
    )
    .unwrap();
    let snap = inline.snapshot();
    let ids: Vec<&str> = snap.policy_ids().map(|(id, _)| id).collect();
    assert_eq!(ids, vec!["named", "policies.cedar:0", "policies.cedar:2"]);
}

#[test]
fn version_is_a_content_hash() {
    let a = pdp();
    let b = pdp();
    assert_eq!(a.version(), b.version());
    assert_eq!(a.version().len(), 16);
    assert_eq!(a.content_hash().len(), 64);
    assert!(a.content_hash().starts_with(&a.version()));
    assert_eq!(a.policy_version(), a.version());

    let dir = copy_bundle();
    std::fs::write(dir.path().join("NOTES.md"), "not part of the bundle").unwrap();
    let c = CedarPdp::load_dir(dir.path()).unwrap();
    assert_eq!(c.version(), a.version(), "non-bundle files are not hashed");
    std::fs::write(
        dir.path().join("extra.cedar"),
        "// a comment changes the content\n",
    )
    .unwrap();
    assert_ne!(c.reload().unwrap(), a.version());
}

const SCHEMA_INLINE: &str = r#"
entity User = { active: Bool };
entity Destination;
action "read" appliesTo { principal: User, resource: Destination, context: {} };
"#;

#[test]
fn schema_invalid_policy_is_rejected_with_a_clear_message() {
    let err = CedarPdp::from_sources(
        "@id(\"uses-age\")\npermit (principal, action, resource) when { principal.age > 18 };",
        SCHEMA_INLINE,
        r#"[{"uid":{"type":"User","id":"alice"},"attrs":{"active":true},"parents":[]}]"#,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BundleError::Validation { .. }), "{msg}");
    assert!(msg.contains("uses-age"), "{msg}");
    assert!(msg.contains("age"), "{msg}");
    assert!(msg.contains("policies.cedar"), "{msg}");
    assert!(msg.contains("schema.cedarschema"), "{msg}");
    println!("{msg}");
}

#[test]
fn broken_schema_policy_and_entities_name_the_file() {
    let err = CedarPdp::from_sources(
        "permit (principal, action, resource);",
        "entity User = { active: Bool ",
        "[]",
    )
    .unwrap_err();
    assert!(matches!(err, BundleError::Schema { .. }), "{err}");
    assert!(err.to_string().starts_with("schema.cedarschema:"), "{err}");
    println!("{err}");

    let err = CedarPdp::from_sources("permit (principal, action, resource", SCHEMA_INLINE, "[]")
        .unwrap_err();
    assert!(matches!(err, BundleError::PolicyParse { .. }), "{err}");
    assert!(err.to_string().starts_with("policies.cedar:"), "{err}");
    println!("{err}");

    let err = CedarPdp::from_sources(
        "permit (principal, action, resource);",
        SCHEMA_INLINE,
        r#"[{"uid":{"type":"User","id":"alice"},"attrs":{"active":"yes"},"parents":[]}]"#,
    )
    .unwrap_err();
    assert!(matches!(err, BundleError::Entities { .. }), "{err}");
    assert!(err.to_string().starts_with("entities.json:"), "{err}");
    println!("{err}");

    let err = CedarPdp::from_sources(
        "@id(\"x\") permit (principal, action, resource);\n@id(\"x\") forbid (principal, action, resource);",
        SCHEMA_INLINE,
        "[]",
    )
    .unwrap_err();
    assert!(
        matches!(err, BundleError::DuplicatePolicyId { .. }),
        "{err}"
    );
    println!("{err}");
}

#[test]
fn bundle_layout_errors() {
    let dir = copy_bundle();
    std::fs::write(dir.path().join("other.cedarschema"), SCHEMA_INLINE).unwrap();
    let err = CedarPdp::load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, BundleError::MultipleSchemas { .. }), "{err}");

    let dir = copy_bundle();
    std::fs::remove_file(dir.path().join("entities.json")).unwrap();
    let err = CedarPdp::load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, BundleError::MissingEntities { .. }), "{err}");

    let inline =
        CedarPdp::from_sources("permit (principal, action, resource);", SCHEMA_INLINE, "[]")
            .unwrap();
    assert!(matches!(inline.reload(), Err(BundleError::NoSource)));
}

/// A temporary copy of the example bundle.
fn copy_bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(BUNDLE).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// Bundle B: same schema and entities, every request denied by one forbid.
const DENY_ALL: &str = "@id(\"b.deny-all\")\nforbid (principal, action, resource);\n";
const POLICY_FILES: [&str; 3] = ["chains.cedar", "delegation.cedar", "subjects.cedar"];

fn write_bundle_b(dir: &Path) {
    for f in POLICY_FILES {
        let _ = std::fs::remove_file(dir.join(f));
    }
    std::fs::write(dir.join("deny.cedar"), DENY_ALL).unwrap();
}

fn write_bundle_a(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("deny.cedar"));
    for f in POLICY_FILES {
        std::fs::copy(Path::new(BUNDLE).join(f), dir.join(f)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_atomically_under_concurrent_decisions() {
    let dir = copy_bundle();
    let pdp = Arc::new(CedarPdp::load_dir(dir.path()).unwrap());
    let version_a = pdp.version();
    let reqs = elevation("invoice-worker", user("alice"), "invoice.create", 1).requests();

    let stop = Arc::new(AtomicBool::new(false));
    let seen_a = Arc::new(AtomicUsize::new(0));
    let seen_b = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (pdp, reqs, stop) = (pdp.clone(), reqs.clone(), stop.clone());
        let (seen_a, seen_b) = (seen_a.clone(), seen_b.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let d = pdp.evaluate_all(&reqs).await.unwrap();
                let a_pair = d.iter().all(|x| x.allowed)
                    && d[0].policies == ["delegation.trusted-workload"]
                    && d[1].policies == ["subjects.active-user"];
                let b_pair = d.iter().all(|x| !x.allowed && x.policies == ["b.deny-all"]);
                assert!(a_pair ^ b_pair, "decision split across bundles: {d:?}");
                if a_pair {
                    seen_a.fetch_add(1, Ordering::Relaxed);
                } else {
                    seen_b.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        }));
    }

    let mut version_b = String::new();
    for round in 0..20 {
        let dir = dir.path().to_path_buf();
        let p = pdp.clone();
        let v = tokio::task::spawn_blocking(move || {
            if round % 2 == 0 {
                write_bundle_b(&dir);
            } else {
                write_bundle_a(&dir);
            }
            p.reload()
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(pdp.version(), v, "the new version is reported");
        if round % 2 == 0 {
            assert_ne!(v, version_a);
            version_b = v;
        } else {
            assert_eq!(v, version_a, "same content, same version");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(seen_a.load(Ordering::Relaxed) > 0);
    assert!(seen_b.load(Ordering::Relaxed) > 0);

    // Last round (19) wrote bundle A back.
    assert_eq!(pdp.version(), version_a);
    assert!(!version_b.is_empty());
}

#[tokio::test]
async fn broken_reload_keeps_the_old_bundle() {
    let dir = copy_bundle();
    let pdp = CedarPdp::load_dir(dir.path()).unwrap();
    let before = pdp.version();
    let e = elevation("invoice-worker", user("alice"), "invoice.create", 1);
    let (a, b) = decide(&pdp, &e).await;
    assert!(a.allowed && b.allowed);

    std::fs::write(
        dir.path().join("subjects.cedar"),
        "@id(\"bad\")\npermit (principal is User, action, resource) when { principal.clearance > 2 };",
    )
    .unwrap();
    let err = pdp.reload().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BundleError::Validation { .. }), "{msg}");
    assert!(
        msg.contains("subjects.cedar: policy `bad` (line 2"),
        "{msg}"
    );
    assert!(msg.contains("clearance"), "{msg}");
    assert_eq!(pdp.version(), before);
    let (a2, b2) = decide(&pdp, &e).await;
    assert_eq!((a2, b2), (a, b), "answers as before");

    std::fs::write(dir.path().join("schema.cedarschema"), "entity {").unwrap();
    assert!(matches!(pdp.reload(), Err(BundleError::Schema { .. })));
    assert_eq!(pdp.version(), before);
}

#[tokio::test]
async fn watcher_reloads_on_change_and_survives_a_broken_edit() {
    let dir = copy_bundle();
    let pdp = Arc::new(CedarPdp::load_dir(dir.path()).unwrap());
    let before = pdp.version();
    let watcher = pdp.spawn_watcher(Duration::from_millis(20));

    std::fs::write(dir.path().join("broken.cedar"), "permit (").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pdp.version(), before, "broken edit keeps the old bundle");

    std::fs::remove_file(dir.path().join("broken.cedar")).unwrap();
    write_bundle_b(dir.path());
    let mut changed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if pdp.version() != before {
            changed = true;
            break;
        }
    }
    assert!(changed, "watcher picked up the new bundle");
    let e = elevation("invoice-worker", user("alice"), "invoice.create", 1);
    let (a, _) = decide(&pdp, &e).await;
    assert_eq!(a.policies, vec!["b.deny-all"]);

    drop(pdp);
    tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .expect("watcher ends when the PDP is dropped")
        .unwrap();
}

#[tokio::test]
async fn notify_worker_acts_on_delegated_work_only_via_billing_worker() {
    let pdp = pdp();
    let mut e = elevation("notify-worker", user("alice"), "notification.send", 2);
    e.chain = vec![wl("orders-api"), wl("order-worker"), wl("billing-worker")];
    let (a, b) = decide(&pdp, &e).await;
    assert!(a.allowed && b.allowed, "{a:?} {b:?}");
    // the same work, but billing-worker was skipped
    e.chain = vec![wl("orders-api"), wl("order-worker")];
    e.depth = 1;
    let (a, _) = decide(&pdp, &e).await;
    assert!(!a.allowed);
    assert_eq!(a.policies, vec!["chains.notify-only-via-billing"]);
    // a direct publish by a trusted producer is not delegated work: unaffected
    e.chain = vec![wl("orders-api")];
    e.depth = 0;
    let (a, _) = decide(&pdp, &e).await;
    assert!(a.allowed, "{a:?}");
}

#[tokio::test]
async fn a_forbid_that_errors_still_denies() {
    // Cedar skips a policy whose evaluation errors: here the forbid reads an
    // attribute of a user absent from the entities, so only the permit is
    // left standing. Deny by default: any evaluation error is a denial.
    let pdp = CedarPdp::from_sources(
        "@id(\"all\") permit (principal, action, resource);\n\
         @id(\"inactive\") forbid (principal, action, resource) when { !principal.active };",
        SCHEMA_INLINE,
        r#"[{"uid":{"type":"User","id":"alice"},"attrs":{"active":true},"parents":[]}]"#,
    )
    .unwrap();
    let req = |who: &str| AccessRequest {
        subject: user(who),
        action: "read".to_string(),
        resource: EntityRef::new("Destination", "d"),
        context: serde_json::json!({}),
    };
    let known = pdp.evaluate(&req("alice")).await.unwrap();
    assert!(known.allowed && known.errors.is_empty(), "{known:?}");
    let unknown = pdp.evaluate(&req("ghost")).await.unwrap();
    assert!(!unknown.errors.is_empty(), "{unknown:?}");
    assert_eq!(
        unknown.policies,
        vec!["all"],
        "only the permit was satisfied"
    );
    assert!(
        !unknown.allowed,
        "an erroring forbid must not let the permit through"
    );
}
