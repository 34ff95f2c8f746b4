//! The trust domain's key directory over real HTTP on loopback: the TTS
//! publishes every registered workload key with its owner
//! (`/.well-known/workload-jwks`), reloads the key files an operator edits,
//! and a consumer's `KeyDirectory` keeps its verifier in step — rotation and
//! rollover without a restart, malformed documents refused by name, and the
//! unknown-`kid` refetch rate bound. Real keys and signatures, real files in
//! a tempdir; the rotation tests run the TTS binary, the rate and malformed
//! document tests an in-process TTS behind a counting layer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use elevate_core::Reason;
use elevate_core::ctxref::{
    ContextRefMinter, ContextRefVerifier, MintRequest, RefError, SubjectKind, VerifiedRef,
    VerifyPolicy,
};
use elevate_core::jws::JwsError;
use elevate_core::keys::{JwksProblem, OWNER_MEMBER, SigningKey};
use elevate_core::scope::Scope;
use elevate_core::token::{TokenError, TokenRequest, TokenSource};
use elevate_testing::domain::{FileDomain, key, write_atomically, write_public_keys};
use elevate_testing::tts::{TTS_TRUST_DOMAIN, TtsProcess};
use elevate_tts::{Issuer, KeyFileWatcher, ServiceConfig};
use parking_lot::Mutex;
use txn_token_client::key_directory::{KeyDirectory, KeyDirectoryConfig, KeyDirectoryError};
use txn_token_client::protocol::WORKLOAD_JWKS_PATH;
use txn_token_client::{TtsClient, TtsClientConfig};

const BIN: &str = env!("CARGO_BIN_EXE_elevate-tts");
const DESTINATION: &str = "orders";
const PAYLOAD: &[u8] = b"{\"order\":1}";

fn wl(name: &str) -> String {
    format!("spiffe://{TTS_TRUST_DOMAIN}/{name}")
}

/// A TTS configuration directory: every workload's keys in `<name>.jwks.json`.
fn config_dir(workloads: &[(&str, &[&SigningKey])]) -> FileDomain {
    FileDomain::write(TTS_TRUST_DOMAIN, &["orders.read"], workloads)
}

fn service(cfg: &FileDomain) -> &ServiceConfig {
    cfg.service_config()
        .unwrap_or_else(|| panic!("a written domain has a TTS configuration"))
}

fn reference(iss: &str, key: &SigningKey, aud: &str) -> String {
    ContextRefMinter::new(iss, key.clone(), Duration::from_secs(300))
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[aud.to_string()],
            scope: &Scope::parse("orders.read"),
            txn: "txn-kd-1",
            destination: DESTINATION,
            payload: PAYLOAD,
        })
        .unwrap_or_else(|e| panic!("mint: {e}"))
        .token
}

async fn verify(v: &ContextRefVerifier, token: &str) -> Result<VerifiedRef, RefError> {
    v.verify_refreshing(token, DESTINATION, PAYLOAD).await
}

/// The reason a verification refused with, if it did.
fn refused(r: Result<VerifiedRef, RefError>) -> Option<Reason> {
    r.err().map(|e| e.reason())
}

fn directory(url: &str, min_refresh: Duration, interval: Duration) -> KeyDirectory {
    let mut cfg = KeyDirectoryConfig::new(url);
    cfg.min_refresh = min_refresh;
    cfg.refresh_interval = interval;
    cfg.request_timeout = Duration::from_secs(2);
    KeyDirectory::new(cfg).unwrap_or_else(|e| panic!("directory: {e}"))
}

/// kid → owner, as the TTS publishes them now (a raw GET, not counted by a directory).
async fn published(url: &str) -> BTreeMap<String, String> {
    let doc: serde_json::Value = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    doc["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys: {doc}"))
        .iter()
        .map(|k| {
            (
                k["kid"].as_str().unwrap_or_default().to_string(),
                k[OWNER_MEMBER].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spawn_tts(cfg: &FileDomain) -> TtsProcess {
    TtsProcess::spawn(Path::new(BIN), &cfg.tts_config_path(), None)
        .unwrap_or_else(|e| panic!("start TTS: {e}"))
}

fn directory_url(tts: &TtsProcess) -> String {
    format!("http://{}{WORKLOAD_JWKS_PATH}", tts.addr())
}

fn tts_client(tts: &TtsProcess, workload: &str, key: &SigningKey) -> TtsClient {
    let mut cfg = TtsClientConfig::new(tts.token_endpoint(), TTS_TRUST_DOMAIN, workload);
    cfg.request_timeout = Duration::from_secs(2);
    TtsClient::new(cfg, key.clone()).unwrap_or_else(|e| panic!("TTS client: {e}"))
}

async fn exchange(c: &TtsClient, v: &VerifiedRef) -> Result<(), TokenError> {
    let scope = Scope::parse("orders.read");
    c.acquire(&TokenRequest {
        reference: v,
        scope: &scope,
        request_details: serde_json::json!({}).into(),
    })
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_publishes_every_key_with_its_owner() {
    let (o1, o2, s1, b1) = (
        key("orders-1"),
        key("orders-2"),
        key("shipping-1"),
        key("billing-1"),
    );
    let cfg = config_dir(&[
        ("orders", &[&o1, &o2]),
        ("shipping", &[&s1]),
        ("billing", &[&b1]),
    ]);
    let tts = spawn_tts(&cfg);
    let url = directory_url(&tts);
    let (orders, shipping, billing) = (wl("orders"), wl("shipping"), wl("billing"));

    // The document: each key with its owner, alg and use; cacheable, with an ETag.
    let resp = reqwest::get(&url).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(header("cache-control"), "public, max-age=30");
    let etag = header("etag");
    assert!(etag.starts_with('"') && etag.len() > 10, "{etag}");
    let doc: serde_json::Value = resp.json().await.unwrap_or_else(|e| panic!("{e}"));
    for k in doc["keys"].as_array().unwrap_or_else(|| panic!("{doc}")) {
        assert_eq!(k["alg"], "ES256", "{k}");
        assert_eq!(k["use"], "sig", "{k}");
        assert!(k.get("d").is_none());
    }
    let expected: BTreeMap<String, String> = [
        ("billing-1", &billing),
        ("orders-1", &orders),
        ("orders-2", &orders),
        ("shipping-1", &shipping),
    ]
    .into_iter()
    .map(|(k, o)| (k.to_string(), o.clone()))
    .collect();
    assert_eq!(published(&url).await, expected);
    let unchanged = reqwest::Client::new()
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(unchanged.status(), 304);

    // A consumer with only the TTS URL trusts every producer key...
    let config = KeyDirectoryConfig::for_token_endpoint(&tts.token_endpoint())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.url, url);
    let dir = KeyDirectory::new(config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dir.fetch_now().await.unwrap_or_else(|e| panic!("{e}")), 4);
    let v = dir.verifier(VerifyPolicy::new(&billing));
    for k in [&o1, &o2] {
        let ok = verify(&v, &reference(&orders, k, &billing)).await;
        assert_eq!(ok.unwrap_or_else(|e| panic!("{e}")).claims.iss, orders);
    }
    // ...but a key only ever signs for its owner.
    assert!(matches!(
        verify(&v, &reference(&orders, &s1, &billing)).await,
        Err(RefError::IssuerMismatch { .. })
    ));
    assert!(matches!(
        verify(&v, &reference(&shipping, &o1, &billing)).await,
        Err(RefError::IssuerMismatch { .. })
    ));
    // trusted_owners narrows the directory: shipping's key is not kept.
    let mut config = KeyDirectoryConfig::new(&url);
    config.trusted_owners = Some(vec![orders.clone()]);
    let narrow = KeyDirectory::new(config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        narrow.fetch_now().await.unwrap_or_else(|e| panic!("{e}")),
        2
    );
    let v = narrow.verifier(VerifyPolicy::new(&billing));
    assert!(verify(&v, &reference(&orders, &o2, &billing)).await.is_ok());
    assert_eq!(
        refused(verify(&v, &reference(&shipping, &s1, &billing)).await),
        Some(Reason::UnknownKey)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_at_the_tts_is_trusted_by_a_running_consumer_then_the_old_one_removed() {
    let (k1, k2, b1) = (key("orders-1"), key("orders-2"), key("billing-1"));
    let cfg = config_dir(&[("orders", &[&k1]), ("billing", &[&b1])]);
    let tts = spawn_tts(&cfg);
    let url = directory_url(&tts);
    let (orders, billing) = (wl("orders"), wl("billing"));
    let consumer_tts = tts_client(&tts, &billing, &b1);

    // The consumer starts with the directory: key 1 only.
    let dir = directory(&url, Duration::from_millis(500), Duration::from_secs(2));
    assert_eq!(dir.fetch_now().await.unwrap_or_else(|e| panic!("{e}")), 2);
    let v = dir.verifier(VerifyPolicy::new(&billing));
    let by_k1 = verify(&v, &reference(&orders, &k1, &billing))
        .await
        .unwrap_or_else(|e| panic!("key 1: {e}"));
    exchange(&consumer_tts, &by_k1)
        .await
        .unwrap_or_else(|e| panic!("exchange (key 1): {e}"));
    let k2_ref = reference(&orders, &k2, &billing);
    assert!(matches!(
        v.verify(&k2_ref, DESTINATION, PAYLOAD),
        Err(RefError::Jws(JwsError::UnknownKey(_)))
    ));

    // The operator adds key 2 to the producer's key file; the TTS reloads it.
    write_public_keys(&cfg.public_keys_file("orders"), &[&k1, &k2]);
    wait_until(
        "the TTS to publish key 2",
        Duration::from_secs(10),
        || async { published(&url).await.contains_key("orders-2") },
    )
    .await;
    // The same running verifier accepts key 2, through the unknown-kid refresh.
    assert!(dir.keys().load().get("orders-2").is_none());
    let fetches = dir.fetch_count();
    let by_k2 = verify(&v, &k2_ref)
        .await
        .unwrap_or_else(|e| panic!("key 2 after rotation: {e}"));
    assert_eq!(
        dir.fetch_count(),
        fetches + 1,
        "one fetch for the unknown kid"
    );
    exchange(&consumer_tts, &by_k2)
        .await
        .unwrap_or_else(|e| panic!("exchange (key 2): {e}"));
    // Rollover: while both are listed, both keep flowing.
    assert!(verify(&v, &reference(&orders, &k1, &billing)).await.is_ok());

    // The old key is removed from the file; the consumer's background refresh
    // drops it: key 1 is refused, key 2 still flows.
    let refresh = dir.spawn_refresh();
    write_public_keys(&cfg.public_keys_file("orders"), &[&k2]);
    wait_until(
        "the TTS to withdraw key 1",
        Duration::from_secs(10),
        || async { !published(&url).await.contains_key("orders-1") },
    )
    .await;
    // The TTS refuses an exchange of a key-1 reference at once.
    match exchange(&consumer_tts, &by_k1).await {
        Err(TokenError::Denied { code, .. }) => assert_eq!(code, "invalid_grant"),
        other => panic!("exchange of a key-1 reference after removal: {other:?}"),
    }
    wait_until(
        "the consumer to drop key 1",
        Duration::from_secs(10),
        || async {
            matches!(
                verify(&v, &reference(&orders, &k1, &billing)).await,
                Err(RefError::Jws(JwsError::UnknownKey(_)))
            )
        },
    )
    .await;
    assert!(verify(&v, &reference(&orders, &k2, &billing)).await.is_ok());
    refresh.abort();
    assert!(
        tts.log().contains("workload keys reloaded"),
        "{}",
        tts.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_key_file_at_the_tts_is_logged_and_the_previous_keys_stay() {
    let (k1, b1) = (key("orders-1"), key("billing-1"));
    let cfg = config_dir(&[("orders", &[&k1]), ("billing", &[&b1])]);
    let tts = spawn_tts(&cfg);
    let url = directory_url(&tts);
    let (orders, billing) = (wl("orders"), wl("billing"));
    let before = published(&url).await;
    let dir = directory(&url, Duration::from_millis(200), Duration::from_secs(60));
    dir.fetch_now().await.unwrap_or_else(|e| panic!("{e}"));
    let v = dir.verifier(VerifyPolicy::new(&billing));

    let file = cfg.public_keys_file("orders");
    let broken: [&[u8]; 3] = [
        b"{\"keys\": [",
        b"{\"keys\": []}",
        b"{\"keys\": [{\"kty\": \"RSA\", \"kid\": \"orders-rsa\", \"n\": \"AQAB\", \"e\": \"AQAB\"}]}",
    ];
    for (i, bytes) in broken.iter().enumerate() {
        write_atomically(&file, bytes);
        let marker = file.display().to_string();
        wait_until(
            "the TTS to log the refused file",
            Duration::from_secs(10),
            || {
                let refused = tts
                    .log()
                    .lines()
                    .filter(|l| l.contains("refused") && l.contains(&marker))
                    .count();
                async move { refused > i }
            },
        )
        .await;
        assert_eq!(published(&url).await, before, "previous keys stay ({i})");
        assert_eq!(dir.fetch_now().await.unwrap_or_else(|e| panic!("{e}")), 2);
        assert!(verify(&v, &reference(&orders, &k1, &billing)).await.is_ok());
    }
    // Mended: applied again.
    let k2 = key("orders-2");
    write_public_keys(&file, &[&k2]);
    wait_until("the mended file", Duration::from_secs(10), || async {
        published(&url).await.contains_key("orders-2")
    })
    .await;
    assert!(verify(&v, &reference(&orders, &k2, &billing)).await.is_ok());
    let _ = service(&cfg);
}

/// An in-process TTS (same configuration code, same key-file watcher)
/// behind a layer that counts directory requests and can serve a fixed
/// answer instead.
struct CountingTts {
    addr: SocketAddr,
    layer: Arc<Layer>,
    server: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
    _cfg: FileDomain,
}

#[derive(Default)]
struct Layer {
    requests: AtomicUsize,
    serve: Mutex<Option<(u16, String)>>,
}

async fn counting(State(layer): State<Arc<Layer>>, req: Request, next: Next) -> Response {
    if req.uri().path() != WORKLOAD_JWKS_PATH {
        return next.run(req).await;
    }
    layer.requests.fetch_add(1, Ordering::SeqCst);
    let fixed = layer.serve.lock().clone();
    match fixed {
        Some((status, body)) => (
            axum::http::StatusCode::from_u16(status)
                .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
            body,
        )
            .into_response(),
        None => next.run(req).await,
    }
}

impl CountingTts {
    async fn start(cfg: FileDomain) -> Self {
        let issuer = Issuer::from_config(service(&cfg), cfg.path())
            .unwrap_or_else(|e| panic!("issuer: {e}"));
        let layer = Arc::new(Layer::default());
        let app = elevate_tts::router(issuer.clone(), false).layer(
            axum::middleware::from_fn_with_state(layer.clone(), counting),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        let watcher = KeyFileWatcher::from_config(service(&cfg), cfg.path()).spawn(issuer);
        CountingTts {
            addr,
            layer,
            server,
            watcher,
            _cfg: cfg,
        }
    }

    fn url(&self) -> String {
        format!("http://{}{WORKLOAD_JWKS_PATH}", self.addr)
    }

    fn requests(&self) -> usize {
        self.layer.requests.load(Ordering::SeqCst)
    }

    fn serve(&self, answer: Option<(u16, &str)>) {
        *self.layer.serve.lock() = answer.map(|(s, b)| (s, b.to_string()));
    }
}

impl Drop for CountingTts {
    fn drop(&mut self) {
        self.server.abort();
        self.watcher.abort();
    }
}

/// Whether a [`JwksProblem`] is the one expected.
type ProblemIs = fn(&JwksProblem) -> bool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_directory_is_a_named_error_and_the_last_good_keys_stay() {
    let (k1, b1) = (key("orders-1"), key("billing-1"));
    let tts = CountingTts::start(config_dir(&[("orders", &[&k1]), ("billing", &[&b1])])).await;
    let (orders, billing) = (wl("orders"), wl("billing"));
    let dir = directory(
        &tts.url(),
        Duration::from_millis(100),
        Duration::from_secs(60),
    );
    assert_eq!(dir.fetch_now().await.unwrap_or_else(|e| panic!("{e}")), 2);
    let v = dir.verifier(VerifyPolicy::new(&billing));
    let good = reference(&orders, &k1, &billing);
    assert!(verify(&v, &good).await.is_ok());

    let jwk = serde_json::to_value(k1.public_jwk()).unwrap_or_default();
    let mut unowned = jwk.clone();
    unowned["alg"] = "ES256".into();
    let mut hs = unowned.clone();
    hs["alg"] = "HS256".into();
    hs[OWNER_MEMBER] = orders.clone().into();
    let mut owned = unowned.clone();
    owned[OWNER_MEMBER] = orders.clone().into();
    let cases: Vec<(String, ProblemIs)> = vec![
        ("{\"keys\": [".into(), |p| {
            matches!(p, JwksProblem::NotJson(_))
        }),
        ("[]".into(), |p| matches!(p, JwksProblem::NoKeysArray)),
        (serde_json::json!({ "keys": [unowned] }).to_string(), |p| {
            matches!(p, JwksProblem::MissingOwner { index: 0, .. })
        }),
        (serde_json::json!({ "keys": [hs] }).to_string(), |p| {
            matches!(p, JwksProblem::InvalidKey { index: 0, .. })
        }),
        (
            serde_json::json!({ "keys": [owned.clone(), owned] }).to_string(),
            |p| matches!(p, JwksProblem::DuplicateKid { .. }),
        ),
    ];
    for (body, expected) in &cases {
        tts.serve(Some((200, body)));
        let err = dir.fetch_now().await.expect_err(body);
        let problem = err.problem().unwrap_or_else(|| panic!("{err}"));
        assert!(expected(problem), "{body}: {problem:?}");
        assert!(err.to_string().contains(&tts.url()), "{err}");
        assert!(
            verify(&v, &good).await.is_ok(),
            "last good keys after {body}"
        );
    }
    tts.serve(Some((503, "down")));
    assert!(matches!(
        dir.fetch_now().await,
        Err(KeyDirectoryError::Status { status: 503, .. })
    ));
    tts.serve(Some((200, &"x".repeat(2 * 1024 * 1024))));
    assert!(matches!(
        dir.fetch_now().await,
        Err(KeyDirectoryError::TooLarge { .. })
    ));
    // A malformed answer to an unknown-kid refresh changes no key; the
    // source cannot be read, so nobody can tell the kid is bad: it waits
    // (keys-unavailable, a Retry) rather than being quarantined.
    tts.serve(Some((200, "{}")));
    let stranger = reference(&orders, &key("orders-9"), &billing);
    assert_eq!(
        refused(verify(&v, &stranger).await),
        Some(Reason::KeysUnavailable)
    );
    assert!(verify(&v, &good).await.is_ok());
    tts.serve(None);
    assert_eq!(dir.fetch_now().await.unwrap_or_else(|e| panic!("{e}")), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_unknown_kids_fetches_at_most_once_per_min_refresh() {
    let (k1, b1) = (key("orders-1"), key("billing-1"));
    let tts = CountingTts::start(config_dir(&[("orders", &[&k1]), ("billing", &[&b1])])).await;
    let (orders, billing) = (wl("orders"), wl("billing"));
    let min_refresh = Duration::from_secs(2);
    let dir = directory(&tts.url(), min_refresh, Duration::from_secs(3600));
    dir.fetch_now().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tts.requests(), 1);
    let v = Arc::new(dir.verifier(VerifyPolicy::new(&billing)));

    // 40 references, each signed by a key the directory has never heard of.
    let forged: Arc<Vec<String>> = Arc::new(
        (0..40)
            .map(|i| reference(&orders, &key(&format!("forged-{i}")), &billing))
            .collect(),
    );
    let burst = || {
        let v = v.clone();
        let forged = forged.clone();
        async move {
            let tasks: Vec<_> = (0..forged.len())
                .map(|i| {
                    let v = v.clone();
                    let forged = forged.clone();
                    tokio::spawn(async move { refused(verify(&v, &forged[i]).await) })
                })
                .collect();
            for t in tasks {
                assert_eq!(
                    t.await.unwrap_or_else(|e| panic!("{e}")),
                    Some(Reason::UnknownKey)
                );
            }
        }
    };
    let started = Instant::now();
    burst().await;
    assert_eq!(tts.requests(), 2, "one shared fetch for the whole burst");
    burst().await;
    burst().await;
    if started.elapsed() < min_refresh {
        assert_eq!(tts.requests(), 2, "no fetch within min_refresh");
    }
    tokio::time::sleep(min_refresh.saturating_sub(started.elapsed()) + Duration::from_millis(100))
        .await;
    burst().await;
    assert_eq!(tts.requests(), 3, "one more after min_refresh");
    // The known key never causes a fetch.
    assert!(verify(&v, &reference(&orders, &k1, &billing)).await.is_ok());
    assert_eq!(tts.requests(), 3);
    assert_eq!(dir.fetch_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_while_the_directory_is_down_waits_and_is_trusted_once_it_answers() {
    let (k1, k2, b1) = (key("orders-1"), key("orders-2"), key("billing-1"));
    let cfg = config_dir(&[("orders", &[&k1]), ("billing", &[&b1])]);
    let mut tts = spawn_tts(&cfg);
    let addr = tts.addr();
    let url = directory_url(&tts);
    let (orders, billing) = (wl("orders"), wl("billing"));
    let dir = directory(&url, Duration::from_millis(200), Duration::from_secs(60));
    assert_eq!(dir.fetch_now().await.unwrap_or_else(|e| panic!("{e}")), 2);
    let v = dir.verifier(VerifyPolicy::new(&billing));

    // The producer rotated to key 2 and the TTS went down before the
    // consumer learned it: nobody can tell the key is bad, so the reference
    // waits (Retry), it is not quarantined.
    write_public_keys(&cfg.public_keys_file("orders"), &[&k1, &k2]);
    tts.kill();
    let k2_ref = reference(&orders, &k2, &billing);
    let r = refused(verify(&v, &k2_ref).await);
    assert_eq!(r, Some(Reason::KeysUnavailable));
    assert_eq!(
        r.map(|r| r.verdict()),
        Some(elevate_core::Verdict::Retry),
        "keys-unavailable is a Retry"
    );
    // Within the rate limit the directory is still known to be down.
    assert_eq!(
        refused(verify(&v, &k2_ref).await),
        Some(Reason::KeysUnavailable)
    );
    // A known key keeps flowing meanwhile.
    assert!(verify(&v, &reference(&orders, &k1, &billing)).await.is_ok());

    // The TTS is back (same port, key 2 registered): the retried reference is trusted.
    let _tts = TtsProcess::respawn(Path::new(BIN), &cfg.tts_config_path(), addr)
        .unwrap_or_else(|e| panic!("restart TTS: {e}"));
    wait_until(
        "the key-2 reference to verify",
        Duration::from_secs(10),
        || async { verify(&v, &k2_ref).await.is_ok() },
    )
    .await;
    // A kid the answering directory does not list is quarantined as before.
    let stranger = key("orders-9");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        refused(verify(&v, &reference(&orders, &stranger, &billing)).await),
        Some(Reason::UnknownKey)
    );
}
