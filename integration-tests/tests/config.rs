//! `elevate.toml` end to end: workloads built by `elevate_config::Workload`
//! from real files (PEM keys, the example Cedar bundle) against the TTS
//! binary on loopback, trusting producers through its key directory.
//! Wrong files get named errors; replay protection is on unless turned off;
//! a signing-key rollover (two keys, then the old one removed) keeps every
//! message flowing, and the rotated key is trusted by the running consumer
//! without a restart; `[tts] replica_urls` gets tokens from a live replica
//! when `url` refuses connections.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use elevate_config::{ConfigError, ErrorKind, Loaded, Workload};
use elevate_core::{GuardDecision, InboundMessage, Reason};
use elevate_testing::domain::{FileDomain, key, message_for_alice, refusal, write_public_keys};
use elevate_testing::env::{TRUST_DOMAIN, policy_dir};

const BIN: &str = env!("CARGO_BIN_EXE_elevate-tts");
const DESTINATION: &str = "orders";
const ACTION: &str = "test.process";

fn wl(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{name}")
}

async fn build(path: &Path) -> Result<Workload, ConfigError> {
    Workload::build(&Loaded::read_file_only(path)?).await
}

async fn workload(path: &Path) -> Workload {
    build(path)
        .await
        .unwrap_or_else(|e| panic!("workload from {}: {e}", path.display()))
}

fn expect_error(r: Result<Workload, ConfigError>, kind: ErrorKind, key: &str) -> ConfigError {
    match r {
        Ok(w) => panic!("expected a {kind:?} error at `{key}`, built {w:?}"),
        Err(e) => {
            assert_eq!(e.kind, kind, "{e}");
            assert_eq!(e.key, key, "{e}");
            assert!(!e.fix.is_empty(), "an error says what to do: {e}");
            e
        }
    }
}

/// Publishes one message through `producer` for `consumer`; returns it as
/// the consumer reads it, and the signing key's id.
async fn publish(producer: &Workload, consumer: &Workload, n: u64) -> (InboundMessage, String) {
    let kid = producer.signing_key().get().kid().to_string();
    let msg = message_for_alice(producer, consumer, DESTINATION, ACTION, n).await;
    (msg, kid)
}

/// The TTS binary with `orders-api` and `test-worker` (one key each), and
/// the producer built from its file.
async fn orders_domain() -> (FileDomain, Workload) {
    let (p1, w1) = (key("orders-api-1"), key("test-worker-1"));
    let d = FileDomain::start(
        Path::new(BIN),
        TRUST_DOMAIN,
        &[ACTION],
        &[("orders-api", &[&p1]), ("test-worker", &[&w1])],
    );
    let producer = workload(&d.workload_config("orders-api", DESTINATION, ACTION, "")).await;
    (d, producer)
}

fn reason(d: &GuardDecision) -> Option<Reason> {
    refusal(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_file_gets_an_error_naming_the_file_the_key_and_the_fix() {
    let d = FileDomain::empty(TRUST_DOMAIN);
    let k = key("worker-1");
    std::fs::create_dir_all(d.keys_dir("worker")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(d.keys_dir("worker").join("worker-1.pem"), k.to_pkcs8_pem())
        .unwrap_or_else(|e| panic!("{e}"));

    // A file that is not there.
    let missing = d.path().join("nowhere.toml");
    let e = expect_error(build(&missing).await, ErrorKind::File, "");
    assert!(e.origin.contains("nowhere.toml"), "{e}");

    // A typo.
    let typo = d.workload_config(
        "worker",
        DESTINATION,
        ACTION,
        "\n[replay]\nstroe = \"memory\"\n",
    );
    let e = expect_error(build(&typo).await, ErrorKind::UnknownKey, "replay.stroe");
    assert!(
        e.origin.contains("worker.toml") && e.fix.contains("`store`"),
        "{e}"
    );

    // No TTS.
    let no_tts = d.path().join("no-tts.toml");
    std::fs::write(
        &no_tts,
        format!(
            "workload = \"{}\"\n[keys]\ndir = \"worker\"\n[pdp]\ncedar_bundle = \"{}\"\nallow_unsigned = true\n",
            wl("worker"),
            policy_dir().display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    expect_error(build(&no_tts).await, ErrorKind::Missing, "tts");

    // Not a SPIFFE ID.
    let bad_id = d.path().join("bad-id.toml");
    let text = std::fs::read_to_string(&typo)
        .unwrap_or_else(|e| panic!("{e}"))
        .replace(&wl("worker"), "spiffe://Elevate Example/worker")
        .replace("stroe", "store");
    std::fs::write(&bad_id, text).unwrap_or_else(|e| panic!("{e}"));
    expect_error(build(&bad_id).await, ErrorKind::Invalid, "workload");

    // A key file that is not a key.
    std::fs::write(d.keys_dir("worker").join("broken.pem"), "not a key")
        .unwrap_or_else(|e| panic!("{e}"));
    let cfg = d.workload_config("worker", DESTINATION, ACTION, "");
    let e = expect_error(build(&cfg).await, ErrorKind::Key, "keys.dir");
    assert!(e.problem.contains("broken.pem"), "{e}");
    std::fs::remove_file(d.keys_dir("worker").join("broken.pem")).unwrap_or_else(|e| panic!("{e}"));

    // A malformed trusted-producer JWKS.
    let jwks = d.path().join("producers.jwks.json");
    std::fs::write(&jwks, r#"{"keys":[{"kty":"EC","crv":"P-256"}]}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    let cfg = d
        .workload_config("worker", DESTINATION, ACTION, "")
        .with_extension("toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap_or_else(|e| panic!("{e}"))
        .replace(
            "[trust]\n",
            "[trust]\njwks_file = \"producers.jwks.json\"\n",
        );
    std::fs::write(&cfg, text).unwrap_or_else(|e| panic!("{e}"));
    let e = expect_error(build(&cfg).await, ErrorKind::Jwks, "trust.jwks_file");
    assert!(e.problem.contains("producers.jwks.json"), "{e}");

    // An unsigned bundle directory without the development switch.
    let unsigned = d.workload_config("worker", DESTINATION, ACTION, "");
    let text = std::fs::read_to_string(&unsigned)
        .unwrap_or_else(|e| panic!("{e}"))
        .replace("allow_unsigned = true\n", "");
    std::fs::write(&unsigned, text).unwrap_or_else(|e| panic!("{e}"));
    let e = expect_error(
        build(&unsigned).await,
        ErrorKind::Policy,
        "pdp.cedar_bundle",
    );
    assert!(e.fix.contains("pdp.bundle"), "{e}");
    // A signed bundle without the keys that may sign it.
    let text = std::fs::read_to_string(&unsigned)
        .unwrap_or_else(|e| panic!("{e}"))
        .replace("cedar_bundle", "bundle");
    std::fs::write(&unsigned, text).unwrap_or_else(|e| panic!("{e}"));
    expect_error(
        build(&unsigned).await,
        ErrorKind::Missing,
        "pdp.bundle_keys",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_registered_to_another_workload_is_refused() {
    let shared = key("shared-1");
    let d = FileDomain::start(
        Path::new(BIN),
        TRUST_DOMAIN,
        &[ACTION],
        &[("billing", &[&shared])],
    );
    // orders-api presents billing's key as its own.
    std::fs::create_dir_all(d.keys_dir("orders-api")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        d.keys_dir("orders-api").join("shared-1.pem"),
        shared.to_pkcs8_pem(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let cfg = d.workload_config("orders-api", DESTINATION, ACTION, "");
    let e = expect_error(build(&cfg).await, ErrorKind::KeyOwner, "keys");
    assert!(e.problem.contains(&wl("billing")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_tts_at_start_is_a_warning_and_the_workload_builds() {
    let d = FileDomain::empty(TRUST_DOMAIN);
    let k = key("worker-1");
    std::fs::create_dir_all(d.keys_dir("worker")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(d.keys_dir("worker").join("worker-1.pem"), k.to_pkcs8_pem())
        .unwrap_or_else(|e| panic!("{e}"));
    let w = workload(&d.workload_config("worker", DESTINATION, ACTION, "")).await;
    assert_eq!(w.trusted_keys().load().len(), 0);
    assert_eq!(w.signing_key().get().kid(), "worker-1");
    assert_eq!(w.dead_letter_for("orders"), "orders.dlq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_protection_is_on_unless_turned_off() {
    let (d, producer) = orders_domain().await;
    let consumer = workload(&d.workload_config("test-worker", DESTINATION, ACTION, "")).await;
    assert_eq!(consumer.replay_store(), "memory");
    let (msg, _) = publish(&producer, &consumer, 1).await;
    let first = consumer.guard().decide(&msg, 1).await;
    assert_eq!(reason(&first), None, "the first delivery is permitted");
    // The same message copied to another position is a replay.
    let mut copy = msg.clone();
    copy.position = "test:orders/elsewhere".into();
    let second = consumer.guard().decide(&copy, 1).await;
    assert_eq!(reason(&second), Some(Reason::Replayed));

    let off = d.workload_config(
        "test-worker",
        DESTINATION,
        ACTION,
        "\n[replay]\nstore = \"off\"\n",
    );
    let unguarded = workload(&off).await;
    assert_eq!(unguarded.replay_store(), "off");
    assert_eq!(reason(&unguarded.guard().decide(&msg, 1).await), None);
    assert_eq!(reason(&unguarded.guard().decide(&copy, 1).await), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_rollover_keeps_every_message_flowing_without_a_restart() {
    let (k1, k2, w1) = (
        key("orders-api-1"),
        key("orders-api-2"),
        key("test-worker-1"),
    );
    let d = FileDomain::start(
        Path::new(BIN),
        TRUST_DOMAIN,
        &[ACTION],
        &[("orders-api", &[&k1]), ("test-worker", &[&w1])],
    );
    let producer =
        Arc::new(workload(&d.workload_config("orders-api", DESTINATION, ACTION, "")).await);
    let consumer =
        Arc::new(workload(&d.workload_config("test-worker", DESTINATION, ACTION, "")).await);
    assert_eq!(consumer.trusted_keys().load().len(), 2);

    // A steady stream of messages for the whole rollover; every one must pass.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let (producer, consumer, stop) = (producer.clone(), consumer.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let (msg, kid) = publish(&producer, &consumer, n).await;
                let d = consumer.guard().decide(&msg, 1).await;
                seen.push((n, kid, reason(&d)));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. The operator registers key 2 at the TTS, then gives it to the producer.
    write_public_keys(&d.public_keys_file("orders-api"), &[&k1, &k2]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(
        d.keys_dir("orders-api").join("orders-api-2.pem"),
        k2.to_pkcs8_pem(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while producer.signing_key().get().kid() != "orders-api-2" {
        assert!(
            Instant::now() < deadline,
            "the producer never signed with key 2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 2. Key 1 leaves the producer, then the TTS.
    std::fs::remove_file(d.keys_dir("orders-api").join("orders-api-1.pem"))
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    write_public_keys(&d.public_keys_file("orders-api"), &[&k2]);
    tokio::time::sleep(Duration::from_secs(3)).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = stream.await.unwrap_or_else(|e| panic!("stream: {e}"));
    let refused: Vec<_> = seen.iter().filter(|(_, _, r)| r.is_some()).collect();
    assert!(
        refused.is_empty(),
        "refused during the rollover: {refused:?}"
    );
    let by_k2 = seen.iter().filter(|(_, k, _)| k == "orders-api-2").count();
    let by_k1 = seen.len() - by_k2;
    assert!(by_k1 > 5 && by_k2 > 20, "k1 {by_k1}, k2 {by_k2}");
    assert_eq!(producer.signing_key().get().kid(), "orders-api-2");

    // The running consumer trusts key 2 (learned through the directory).
    let (msg, _) = publish(&producer, &consumer, 100_000).await;
    assert_eq!(reason(&consumer.guard().decide(&msg, 1).await), None);
    assert!(consumer.trusted_keys().load().get("orders-api-2").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_built_in_code_guards_like_one_built_from_its_file() {
    let (d, producer) = orders_domain().await;
    let consumer = Workload::builder(wl("test-worker"))
        .tts(d.token_endpoint())
        .signing_key_dir(d.keys_dir("test-worker"))
        .unsigned_cedar_bundle(policy_dir())
        .action(DESTINATION, ACTION, None)
        .dead_letter_suffix(".dead")
        .build()
        .await
        .unwrap_or_else(|e| panic!("in code: {e}"));
    assert_eq!(consumer.replay_store(), "memory", "the file's defaults");
    assert_eq!(consumer.dead_letter_for(DESTINATION), "orders.dead");
    let (msg, _) = publish(&producer, &consumer, 1).await;
    let decided = consumer.guard().decide(&msg, 1).await;
    assert_eq!(reason(&decided), None, "permitted: {decided:?}");
    // An unmatched destination is denied, as from a file.
    let mut elsewhere = msg.clone();
    elsewhere.destination = "payments".into();
    elsewhere.position = "test:payments/1".into();
    assert!(reason(&consumer.guard().decide(&elsewhere, 1).await).is_some());

    // The same checks as a file: a bad id is named, with the origin `(in code)`.
    let e = Workload::builder("spiffe://Bad Domain/x")
        .tts(d.token_endpoint())
        .build()
        .await
        .err()
        .unwrap_or_else(|| panic!("a bad SPIFFE ID built"));
    assert_eq!(
        (e.kind, e.key.as_str()),
        (ErrorKind::Invalid, "workload"),
        "{e}"
    );
    assert!(e.origin.contains("in code"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tts_replica_urls_reach_a_live_replica_when_the_first_url_is_down() {
    let (d, producer) = orders_domain().await;
    let live = d.token_endpoint();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        format!(
            "http://{}/token",
            l.local_addr().unwrap_or_else(|e| panic!("{e}"))
        )
    };
    let origin = live.trim_end_matches("/token");
    // The consumer's first TTS URL refuses connections; `replica_urls` names the live one.
    let path = d.workload_config("test-worker", DESTINATION, ACTION, "");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    let with = |replicas: &str| {
        text.replace(
            &format!("url = \"{live}\""),
            &format!("url = \"{dead}\"\n{replicas}"),
        )
        .replace(
            "[trust]\n",
            &format!("[trust]\njwks_url = \"{origin}/.well-known/workload-jwks\"\n"),
        )
    };
    std::fs::write(&path, with(&format!("replica_urls = [\"{live}\"]")))
        .unwrap_or_else(|e| panic!("{e}"));
    let consumer = workload(&path).await;
    let (msg, _) = publish(&producer, &consumer, 1).await;
    let decided = consumer.guard().decide(&msg, 1).await;
    assert_eq!(reason(&decided), None, "permitted: {decided:?}");
    // The same file without replica_urls: the TTS is unavailable (Retry).
    std::fs::write(&path, with("")).unwrap_or_else(|e| panic!("{e}"));
    let alone = workload(&path).await;
    let (msg, _) = publish(&producer, &alone, 2).await;
    let decided = alone.guard().decide(&msg, 1).await;
    assert_eq!(
        reason(&decided),
        Some(Reason::TtsUnavailable),
        "{decided:?}"
    );
}

/// `[producer] binding = "per-context"` with `audience_keys`, and the
/// consumer's `[keys] agreement_keys`: messages from the file-built producer
/// carry one context reference per origin context and a binding each, and
/// the file-built consumer permits them; a consumer without the key refuses
/// them as `binding-key-unavailable`; per-context without audience keys is a
/// named configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_context_binding_is_configured_from_files() {
    use elevate_core::ctxbind::{CTX_BIND_HEADER, KeyAgreementKey, audience_jwks};
    let (d, _) = orders_domain().await;
    let agreement = KeyAgreementKey::generate("test-worker-enc-1").unwrap();
    std::fs::write(
        d.path().join("test-worker-enc-1.pem"),
        agreement.to_pkcs8_pem(),
    )
    .unwrap();
    std::fs::write(
        d.path().join("audiences.json"),
        audience_jwks(&[(wl("test-worker").as_str(), &agreement)]).to_string(),
    )
    .unwrap();
    // context_open_after = 1: each message here is its own origin context
    let per_context = "\n[producer]\nbinding = \"per-context\"\naudience_keys = \"audiences.json\"\ncontext_open_after = 1\n";
    let producer =
        workload(&d.workload_config("orders-api", DESTINATION, ACTION, per_context)).await;
    let plain = d.workload_config("test-worker", DESTINATION, ACTION, "");
    let with_key = d.path().join("test-worker-enc.toml");
    let text = std::fs::read_to_string(&plain).unwrap().replacen(
        "reload_secs = 1\n",
        "reload_secs = 1\nagreement_keys = [\"test-worker-enc-1.pem\"]\n",
        1,
    );
    std::fs::write(&with_key, text).unwrap();
    let consumer = workload(&with_key).await;

    let (msg, _) = publish(&producer, &consumer, 1).await;
    assert!(
        msg.headers.get(CTX_BIND_HEADER).is_some(),
        "a binding rides with the message"
    );
    assert_eq!(reason(&consumer.guard().decide(&msg, 1).await), None);
    let keyless = workload(&plain).await;
    let (msg, _) = publish(&producer, &keyless, 2).await;
    assert_eq!(
        reason(&keyless.guard().decide(&msg, 1).await),
        Some(Reason::BindingKeyUnavailable)
    );

    let missing = d.workload_config(
        "orders-api",
        DESTINATION,
        ACTION,
        "\n[producer]\nbinding = \"per-context\"\n",
    );
    expect_error(
        build(&missing).await,
        ErrorKind::Missing,
        "producer.audience_keys",
    );
    let unknown = d.workload_config(
        "orders-api",
        DESTINATION,
        ACTION,
        "\n[producer]\nbinding = \"per-hop\"\n",
    );
    expect_error(
        build(&unknown).await,
        ErrorKind::Invalid,
        "producer.binding",
    );
}
