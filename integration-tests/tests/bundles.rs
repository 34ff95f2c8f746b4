//! Signed policy bundles on real sources: an archive file, an HTTP server
//! on loopback (ETag / If-None-Match), and the local NATS JetStream Object
//! Store. A consumer built from its `elevate.toml` (the TTS binary on
//! loopback, real key files) decides with the signed bundle; a new revision
//! published to the source is in force within one poll; a tampered archive,
//! a wrong signature, an unsigned archive, a lower revision, another bundle
//! under the same revision and a schema-invalid bundle are each refused
//! with the bundle in force kept; a consumer restarted while the source is
//! down decides with the persisted bundle, and past `expire_after` its
//! messages are Retry (`pdp-unavailable`) until the source answers again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use elevate_bundle::{ArchiveError, BundleSync, Polled, SyncConfig, SyncError, archive};
use elevate_config::Workload;
use elevate_core::keys::{KeySet, SigningKey};
use elevate_core::{GuardDecision, Reason};
use elevate_testing::domain::{FileDomain, decide_for_alice, key, refusal, write_atomically};
use elevate_testing::env::{TRUST_DOMAIN, policy_dir};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_elevate-tts");
const DESTINATION: &str = "orders";
const ACTION: &str = "test.process";
const POLL: Duration = Duration::from_millis(300);

/// Revision 2 forbids alice everything: how a test tells the bundles apart.
const FORBID_ALICE: &str =
    "@id(\"rev.forbid-alice\")\nforbid (principal == User::\"alice\", action, resource);\n";

fn example_files() -> Vec<(String, Vec<u8>)> {
    elevate_cedar::read_bundle_files(&policy_dir()).unwrap_or_else(|e| panic!("{e}"))
}

fn with_file(mut files: Vec<(String, Vec<u8>)>, name: &str, text: &str) -> Vec<(String, Vec<u8>)> {
    files.push((name.to_string(), text.as_bytes().to_vec()));
    files
}

fn signed(revision: u64, files: &[(String, Vec<u8>)], signer: &SigningKey) -> Vec<u8> {
    archive::build("orders", revision, 0, files, signer).unwrap_or_else(|e| panic!("build: {e}"))
}

fn signers(key: &SigningKey) -> KeySet {
    let mut k = KeySet::new();
    k.insert_signing_key(key).unwrap_or_else(|e| panic!("{e}"));
    k
}

/// A trust domain with a producer and a worker whose `elevate.toml` names
/// the signed bundle at `location`, trusted signers in `bundle-signers.jwks.json`.
struct Scenario {
    domain: FileDomain,
    producer: Workload,
    signer: SigningKey,
}

impl Scenario {
    async fn start() -> Self {
        let (p, w) = (key("orders-api-1"), key("test-worker-1"));
        let domain = FileDomain::start(
            Path::new(BIN),
            TRUST_DOMAIN,
            &[ACTION],
            &[("orders-api", &[&p]), ("test-worker", &[&w])],
        );
        let signer = key("bundles-1");
        let jwks = serde_json::json!({ "keys": [signer.public_jwk()] });
        write_atomically(
            &domain.path().join("bundle-signers.jwks.json"),
            jwks.to_string().as_bytes(),
        );
        let producer =
            Workload::from_file(domain.workload_config("orders-api", DESTINATION, ACTION, ""))
                .await
                .unwrap_or_else(|e| panic!("producer: {e}"));
        Scenario {
            domain,
            producer,
            signer,
        }
    }

    /// The worker's configuration with the signed bundle at `location`.
    fn worker_config(&self, location: &str, extra: &str) -> PathBuf {
        let path = self
            .domain
            .workload_config("test-worker", DESTINATION, ACTION, "");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        let pdp = format!(
            "[pdp]\nbundle = \"{location}\"\nbundle_keys = \"bundle-signers.jwks.json\"\npoll_secs = 1\n{extra}\n"
        );
        let text = text
            .split("[pdp]")
            .next()
            .map(|head| {
                let tail = text.split("[trust]").nth(1).unwrap_or_default();
                format!("{head}{pdp}\n[trust]{tail}")
            })
            .unwrap_or(text.clone());
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        path
    }

    /// Whether the worker lets alice's message through now.
    async fn decide(&self, worker: &Workload, n: u64) -> GuardDecision {
        decide_for_alice(&self.producer, worker, DESTINATION, ACTION, n).await
    }
}

fn reason(d: &GuardDecision) -> Option<Reason> {
    refusal(d)
}

/// Polls `check` every 50 ms for up to `within`; returns how long it took.
async fn within<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// A static bundle server on loopback: the archive, its SHA-256 as ETag,
/// 304 on a matching If-None-Match; `down` answers 503.
#[derive(Clone, Default)]
struct Served {
    archive: Arc<Mutex<Vec<u8>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    not_modified: Arc<std::sync::atomic::AtomicUsize>,
}

async fn serve_bundle(State(s): State<Served>, headers: HeaderMap) -> Response {
    if s.down.load(std::sync::atomic::Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let bytes = s.archive.lock().clone();
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(&bytes)));
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        s.not_modified
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        return StatusCode::NOT_MODIFIED.into_response();
    }
    ([(header::ETAG, etag)], bytes).into_response()
}

async fn http_server(served: Served) -> SocketAddr {
    let app = axum::Router::new()
        .route("/bundles/orders.tar.gz", axum::routing::get(serve_bundle))
        .with_state(served);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_signed_bundle_is_in_force_on_a_running_consumer_within_one_poll_from_each_source() {
    let s = Scenario::start().await;
    let rev1 = signed(1, &example_files(), &s.signer);
    let rev2 = signed(
        2,
        &with_file(example_files(), "zz.cedar", FORBID_ALICE),
        &s.signer,
    );

    // An archive file.
    let file = s.domain.path().join("orders.tar.gz");
    write_atomically(&file, &rev1);
    let worker = Workload::from_file(s.worker_config("orders.tar.gz", ""))
        .await
        .unwrap_or_else(|e| panic!("worker (file): {e}"));
    assert_eq!(
        reason(&s.decide(&worker, 1).await),
        None,
        "revision 1 permits alice"
    );
    write_atomically(&file, &rev2);
    let took = within(
        "revision 2 from the file",
        Duration::from_secs(3),
        || async { reason(&s.decide(&worker, 2).await) == Some(Reason::SubjectDenied) },
    )
    .await;
    println!("file source: revision 2 in force after {took:?} (poll 1 s)");
    let sync = worker
        .bundle()
        .unwrap_or_else(|| panic!("a signed bundle has a sync"));
    assert_eq!(sync.status().revision, 2);

    // An HTTP server.
    let served = Served::default();
    *served.archive.lock() = rev1.clone();
    let addr = http_server(served.clone()).await;
    let worker = Workload::from_file(s.worker_config(
        &format!("http://{addr}/bundles/orders.tar.gz"),
        "cache_dir = \"cache-http\"",
    ))
    .await
    .unwrap_or_else(|e| panic!("worker (http): {e}"));
    assert_eq!(reason(&s.decide(&worker, 3).await), None);
    // Unchanged polls cost a 304, not a download.
    within("a 304 poll", Duration::from_secs(3), || async {
        served
            .not_modified
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    })
    .await;
    *served.archive.lock() = rev2.clone();
    let took = within("revision 2 over HTTP", Duration::from_secs(3), || async {
        reason(&s.decide(&worker, 4).await) == Some(Reason::SubjectDenied)
    })
    .await;
    println!("http source: revision 2 in force after {took:?}");

    // A NATS JetStream Object Store object.
    let nats = elevate_testing::nats::nats_url();
    let client = elevate_testing::nats::connect(&nats).await;
    let js = async_nats::jetstream::new(client);
    let bucket = format!("ELVT_BUNDLES_{}", uuid::Uuid::new_v4().simple());
    let store = js
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: bucket.clone(),
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("object store: {e}"));
    store
        .put("orders", &mut rev1.as_slice())
        .await
        .unwrap_or_else(|e| panic!("put: {e}"));
    let server = nats.trim_start_matches("nats://");
    let worker = Workload::from_file(s.worker_config(
        &format!("nats://{server}/{bucket}/orders"),
        "cache_dir = \"cache-nats\"",
    ))
    .await
    .unwrap_or_else(|e| panic!("worker (nats): {e}"));
    assert_eq!(reason(&s.decide(&worker, 5).await), None);
    store
        .put("orders", &mut rev2.as_slice())
        .await
        .unwrap_or_else(|e| panic!("put: {e}"));
    let took = within(
        "revision 2 from the object store",
        Duration::from_secs(3),
        || async { reason(&s.decide(&worker, 6).await) == Some(Reason::SubjectDenied) },
    )
    .await;
    println!("nats object store: revision 2 in force after {took:?}");
    let _ = js.delete_object_store(&bucket).await;
}

/// How a case must be refused.
type RefusedAs = fn(&SyncError) -> bool;

/// An archive of `files` with no manifest added (a hand-made tar.gz).
fn plain_archive(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::default());
        let mut b = tar::Builder::new(gz);
        for (name, bytes) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, bytes.as_slice())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        b.into_inner()
            .and_then(|g| g.finish())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    out
}

/// `archive`'s entries (the manifest among them), as stored.
fn entries(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    for e in tar.entries().unwrap_or_else(|e| panic!("{e}")) {
        let mut e = e.unwrap_or_else(|e| panic!("{e}"));
        let name = e
            .path()
            .unwrap_or_else(|e| panic!("{e}"))
            .display()
            .to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes).unwrap_or_else(|e| panic!("{e}"));
        out.push((name, bytes));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bundles_are_refused_and_the_bundle_in_force_is_kept() {
    let signer = key("bundles-1");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let file = dir.path().join("orders.tar.gz");
    let rev5 = signed(5, &example_files(), &signer);
    write_atomically(&file, &rev5);
    let sync = BundleSync::start(
        Arc::new(elevate_bundle::FileSource::new(&file)),
        signers(&signer),
        SyncConfig {
            poll: POLL,
            ..SyncConfig::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("start: {e}"));
    let in_force = sync.status().version;

    let mut refused = Vec::new();
    let mut offer = |name: &str, bytes: Vec<u8>| {
        write_atomically(&file, &bytes);
        refused.push((name.to_string(), bytes));
    };
    // A file inside changed after signing: the same manifest, other bytes.
    let tampered = plain_archive(
        &entries(&signed(6, &example_files(), &signer))
            .into_iter()
            .map(|(name, bytes)| match name.as_str() {
                "subjects.cedar" => (name, FORBID_ALICE.as_bytes().to_vec()),
                _ => (name, bytes),
            })
            .collect::<Vec<_>>(),
    );
    let cases: Vec<(&str, Vec<u8>, RefusedAs)> = vec![
        ("tampered", tampered, |e| {
            matches!(e, SyncError::Archive(ArchiveError::Digest { .. }))
        }),
        (
            "wrong signature",
            signed(7, &example_files(), &key("bundles-1")),
            |e| matches!(e, SyncError::Archive(ArchiveError::Signature(_))),
        ),
        (
            "untrusted signer",
            signed(7, &example_files(), &key("intruder-1")),
            |e| matches!(e, SyncError::Archive(ArchiveError::Signature(_))),
        ),
        ("unsigned", plain_archive(&example_files()), |e| {
            matches!(e, SyncError::Archive(ArchiveError::Unsigned))
        }),
        (
            "lower revision",
            signed(
                4,
                &with_file(example_files(), "zz.cedar", FORBID_ALICE),
                &signer,
            ),
            |e| {
                matches!(
                    e,
                    SyncError::Rollback {
                        active: 5,
                        offered: 4
                    }
                )
            },
        ),
        (
            "same revision, other content",
            signed(
                5,
                &with_file(example_files(), "zz.cedar", FORBID_ALICE),
                &signer,
            ),
            |e| matches!(e, SyncError::Equivocation { revision: 5, .. }),
        ),
        (
            "schema-invalid",
            signed(
                8,
                &with_file(
                    example_files(),
                    "zz.cedar",
                    "@id(\"bad\")\npermit (principal, action, resource) when { principal.no_such_attribute == 1 };\n",
                ),
                &signer,
            ),
            |e| matches!(e, SyncError::Bundle(_)),
        ),
        ("not an archive", b"<html>oops</html>".to_vec(), |e| {
            matches!(e, SyncError::Archive(ArchiveError::Unreadable(_)))
        }),
    ];
    for (name, bytes, expected) in cases {
        offer(name, bytes);
        match sync.poll_once().await {
            Err(e) => {
                assert!(expected(&e), "{name}: refused, but with {e}");
                let st = sync.status();
                assert_eq!(st.revision, 5, "{name}: revision 5 stays in force");
                assert_eq!(st.version, in_force, "{name}");
                assert!(
                    st.last_error.is_some_and(|m| !m.is_empty()),
                    "{name}: status says why"
                );
                println!("{name}: refused — {e}");
            }
            Ok(p) => panic!("{name}: accepted ({p:?})"),
        }
    }
    // The operator may roll back on purpose.
    let sync_rb = BundleSync::start(
        Arc::new(elevate_bundle::FileSource::new(&file)),
        signers(&signer),
        SyncConfig::default(),
    )
    .await;
    assert!(
        sync_rb.is_err(),
        "the last offer (not an archive) cannot start a PDP"
    );
    write_atomically(&file, &rev5);
    let rb = BundleSync::start(
        Arc::new(elevate_bundle::FileSource::new(&file)),
        signers(&signer),
        SyncConfig {
            allow_rollback: true,
            ..SyncConfig::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    write_atomically(&file, &signed(3, &example_files(), &signer));
    assert!(matches!(
        rb.poll_once().await,
        Ok(Polled::Activated { revision: 3, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_restarted_while_the_source_is_down_decides_with_the_cached_bundle_then_expires_into_retry()
 {
    let s = Scenario::start().await;
    let served = Served::default();
    *served.archive.lock() = signed(1, &example_files(), &s.signer);
    let addr = http_server(served.clone()).await;
    let url = format!("http://{addr}/bundles/orders.tar.gz");
    let config = s.worker_config(&url, "cache_dir = \"cache\"\nexpire_after_secs = 3");
    let first = Workload::from_file(&config)
        .await
        .unwrap_or_else(|e| panic!("first start: {e}"));
    assert_eq!(reason(&s.decide(&first, 1).await), None);
    drop(first);

    // The source goes down; the consumer restarts.
    served.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let restarted = Workload::from_file(&config)
        .await
        .unwrap_or_else(|e| panic!("offline start from the cache: {e}"));
    let status = restarted
        .bundle()
        .map(|b| b.status())
        .unwrap_or_else(|| panic!("a signed bundle"));
    assert_eq!(status.revision, 1);
    assert_eq!(
        reason(&s.decide(&restarted, 2).await),
        None,
        "decides with the persisted bundle"
    );
    // Past expire_after without the source: Retry, not a denial, nothing lost.
    within("expiry", Duration::from_secs(8), || async {
        reason(&s.decide(&restarted, 3).await) == Some(Reason::PdpUnavailable)
    })
    .await;
    let d = s.decide(&restarted, 4).await;
    assert_eq!(d.verdict(), elevate_core::Verdict::Retry, "{d:?}");
    assert!(restarted.bundle().is_some_and(|b| b.status().expired));

    // The source answers again: decisions resume on the next poll.
    served
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    within("recovery", Duration::from_secs(4), || async {
        reason(&s.decide(&restarted, 5).await).is_none()
    })
    .await;

    // Without a cache and without the source, a start fails and says why.
    served.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let cold = s.worker_config(&url, "cache_dir = \"empty-cache\"");
    let e = Workload::from_file(&cold)
        .await
        .err()
        .unwrap_or_else(|| panic!("started with no bundle at all"));
    assert_eq!(e.key, "pdp.bundle", "{e}");
    assert!(e.problem.contains("no policy bundle"), "{e}");
}
