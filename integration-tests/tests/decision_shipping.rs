//! Decision-log shipping on real parts (issue 14, part 4): the guard records
//! every decision to the durable spool (real files, group commit, fsync),
//! which ships to a remote node — an HTTP receiver on loopback (axum), a
//! JetStream stream on a NATS server this test starts and kills, and the
//! local tansu Kafka. The remote node goes down for a while; decisions keep
//! being made and spooled, then arrive with no gap in the chain (duplicates
//! allowed and counted). A full spool turns verdicts into Retry
//! `decision-log-unavailable`; an edited or truncated spool is refused.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use elevate_core::decision::ship::{ShipConfig, Shipper};
use elevate_core::decision::spool::verify_dir;
use elevate_core::decision::{ChainVerifier, Spool, SpoolConfig, SpoolError};
use elevate_core::memory::coordinates;
use elevate_core::verdict::{Reason, Verdict};
use elevate_core::{CTX_REF_HEADER, Guard, Headers, InboundMessage};
use elevate_testing::env::TestEnv;
use parking_lot::Mutex;

const DESTINATION: &str = "orders";

fn fast() -> ShipConfig {
    ShipConfig {
        max_records: 40,
        interval: Duration::from_millis(50),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
        ..ShipConfig::default()
    }
}

/// Decides `n` valid messages concurrently (16 at a time) and returns the verdicts.
async fn decide(env: &TestEnv, guard: &Arc<Guard>, from: u64, n: u64) -> Vec<(Verdict, Reason)> {
    let mut out = Vec::new();
    let ids: Vec<u64> = (from..from + n).collect();
    for chunk in ids.chunks(16) {
        let futs = chunk.iter().map(|i| {
            let payload = format!(r#"{{"order":{i}}}"#).into_bytes();
            let mut headers = Headers::new();
            headers.append(CTX_REF_HEADER, env.signed_ref(DESTINATION, &payload));
            let msg =
                InboundMessage::new(coordinates(DESTINATION, *i), DESTINATION, headers, payload);
            let g = guard.clone();
            async move {
                let d = g.decide(&msg, 1).await;
                (d.verdict(), d.reason())
            }
        });
        out.extend(futures::future::join_all(futs).await);
    }
    out
}

fn spooled_guard(env: &TestEnv, spool: &Spool) -> Arc<Guard> {
    Arc::new(env.guard_with(
        env.in_process_tokens(),
        env.pdp.clone(),
        Arc::new(spool.clone()),
    ))
}

/// A decision receiver on loopback: stores every gzipped body, can be
/// stopped (the listener goes away) and restarted on the same port, and can
/// lose acknowledgements (stores the batch, answers 503: a duplicate follows).
struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    keys: Arc<Mutex<Vec<String>>>,
    lose_acks: Arc<AtomicU32>,
    down: Arc<AtomicBool>,
    stop: Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::task::JoinHandle<()>,
        )>,
    >,
}

impl Receiver {
    async fn start() -> Receiver {
        let r = Receiver {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            bodies: Arc::default(),
            keys: Arc::default(),
            lose_acks: Arc::default(),
            down: Arc::default(),
            stop: Mutex::new(None),
        };
        let addr = r.addr;
        r.serve(addr).await
    }

    async fn serve(mut self, addr: SocketAddr) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind the decision receiver on {addr}: {e}"));
        self.addr = listener.local_addr().unwrap_or(addr);
        self.listen(listener);
        self
    }

    fn listen(&self, listener: tokio::net::TcpListener) {
        let (bodies, keys, lose, down) = (
            self.bodies.clone(),
            self.keys.clone(),
            self.lose_acks.clone(),
            self.down.clone(),
        );
        let app = axum::Router::new().route(
            "/decisions",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (bodies, keys, lose, down) =
                    (bodies.clone(), keys.clone(), lose.clone(), down.clone());
                async move {
                    if down.load(Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let gzip = headers
                        .get("content-encoding")
                        .is_some_and(|v| v.as_bytes() == b"gzip");
                    if !gzip {
                        return StatusCode::UNSUPPORTED_MEDIA_TYPE;
                    }
                    bodies.lock().push(body.to_vec());
                    if let Some(k) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
                        keys.lock().push(k.to_string());
                    }
                    if lose
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    StatusCode::OK
                }
            }),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        *self.stop.lock() = Some((tx, task));
    }

    fn url(&self) -> String {
        format!("http://{}/decisions", self.addr)
    }

    /// The remote node goes down: no listener on its port.
    async fn stop(&self) {
        self.down.store(true, Ordering::SeqCst);
        let stop = self.stop.lock().take();
        if let Some((tx, task)) = stop {
            let _ = tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Back on the same port.
    async fn restart(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("rebind the decision receiver on {}: {e}", self.addr));
        self.listen(listener);
        self.down.store(false, Ordering::SeqCst);
    }

    fn report(&self) -> elevate_core::decision::ChainReport {
        let mut v = ChainVerifier::new();
        for b in self.bodies.lock().iter() {
            v.add_gzip_batch(b);
        }
        v.report()
    }
}

fn http_shipper(url: &str) -> Arc<dyn Shipper> {
    Arc::new(
        txn_token_client::HttpDecisionShipper::new(url, None, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_outage_decisions_spooled_then_shipped_without_a_gap() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let receiver = Receiver::start().await;
    receiver.lose_acks.store(2, Ordering::SeqCst);
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    spool
        .start_shipping(http_shipper(&receiver.url()), fast())
        .unwrap_or_else(|e| panic!("{e}"));
    let guard = spooled_guard(&env, &spool);

    let first = decide(&env, &guard, 0, 100).await;
    assert!(
        first.iter().all(|(v, _)| *v == Verdict::Permit),
        "{first:?}"
    );
    assert!(
        spool.wait_shipped(Duration::from_secs(20)).await,
        "{:?}",
        spool.stats()
    );

    // the remote node goes down; decisions go on
    receiver.stop().await;
    let during = decide(&env, &guard, 100, 200).await;
    assert!(
        during.iter().all(|(v, _)| *v == Verdict::Permit),
        "a remote outage must not stall the consumer: {during:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = spool.stats();
    assert_eq!(st.head_seq, 300, "{st:?}");
    assert!(st.shipped_seq < 300 && st.ship_failures > 0, "{st:?}");
    assert!(
        st.last_ship_error
            .as_deref()
            .is_some_and(|e| e.contains("127.0.0.1")),
        "{st:?}"
    );

    receiver.restart().await;
    assert!(
        spool.wait_shipped(Duration::from_secs(30)).await,
        "{:?}",
        spool.stats()
    );
    let report = receiver.report();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.streams.len(), 1);
    assert_eq!(report.streams[0].entries, 300, "{report}");
    assert!(
        report.duplicates() > 0,
        "two lost acks make duplicates: {report}"
    );
    assert!(
        receiver
            .keys
            .lock()
            .iter()
            .all(|k| k.starts_with(spool.stream()))
    );
    println!("http: {report}{:?}", spool.stats());

    // the receiver-side check sees a missing batch
    let mut v = ChainVerifier::new();
    let bodies = receiver.bodies.lock().clone();
    let distinct: Vec<_> = {
        let mut seen = std::collections::HashSet::new();
        bodies
            .into_iter()
            .filter(|b| seen.insert(b.clone()))
            .collect()
    };
    for (i, b) in distinct.iter().enumerate() {
        if i != 1 {
            v.add_gzip_batch(b);
        }
    }
    let gapped = v.report();
    assert!(
        !gapped.is_intact() && !gapped.streams[0].gaps.is_empty(),
        "{gapped}"
    );

    // restart: the cursor is kept, nothing is shipped twice more than needed
    spool.stop_shipping();
    drop(guard);
    drop(spool);
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (spool.stats().head_seq, spool.stats().shipped_seq),
        (300, 300)
    );
    spool
        .start_shipping(http_shipper(&receiver.url()), fast())
        .unwrap_or_else(|e| panic!("{e}"));
    let guard = spooled_guard(&env, &spool);
    decide(&env, &guard, 300, 20).await;
    assert!(spool.wait_shipped(Duration::from_secs(20)).await);
    let report = receiver.report();
    assert!(
        report.is_intact() && report.streams[0].entries == 320,
        "{report}"
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_turns_verdicts_into_retry_until_shipping_frees_it() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let receiver = Receiver::start().await;
    receiver.stop().await;
    let spool = Spool::open(SpoolConfig::new(dir.path()).with_max_bytes(64 * 1024))
        .unwrap_or_else(|e| panic!("{e}"));
    spool
        .start_shipping(http_shipper(&receiver.url()), fast())
        .unwrap_or_else(|e| panic!("{e}"));
    let guard = spooled_guard(&env, &spool);
    let verdicts = decide(&env, &guard, 0, 200).await;
    let retry = verdicts
        .iter()
        .filter(|(v, r)| *v == Verdict::Retry && *r == Reason::DecisionLogUnavailable)
        .count();
    let permit = verdicts
        .iter()
        .filter(|(v, _)| *v == Verdict::Permit)
        .count();
    assert!(
        retry > 0,
        "a 64 KiB spool took 200 decisions: {:?}",
        spool.stats()
    );
    assert_eq!(retry + permit, 200, "{verdicts:?}");
    let st = spool.stats();
    assert_eq!(
        st.head_seq as usize, permit,
        "every permit has its record: {st:?}"
    );
    assert!(
        st.used_bytes <= 64 * 1024 && st.rejected_full as usize == retry,
        "{st:?}"
    );

    receiver.restart().await;
    assert!(spool.wait_shipped(Duration::from_secs(30)).await);
    let again = decide(&env, &guard, 200, 20).await;
    assert!(
        again.iter().all(|(v, _)| *v == Verdict::Permit),
        "{again:?}"
    );
    assert!(spool.wait_shipped(Duration::from_secs(30)).await);
    let report = receiver.report();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.streams[0].entries as usize, permit + 20);
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_or_truncated_spool_is_detected() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = SpoolConfig::new(dir.path());
    cfg.segment_bytes = 16 * 1024;
    {
        let spool = Spool::open(cfg.clone()).unwrap_or_else(|e| panic!("{e}"));
        let guard = spooled_guard(&env, &spool);
        decide(&env, &guard, 0, 120).await;
    }
    verify_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let segments = segment_files(dir.path());
    assert!(segments.len() >= 3, "{segments:?}");

    // edited: one decision turned from permit to deny
    let copy = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_dir(dir.path(), copy.path());
    let seg = &segment_files(copy.path())[1];
    let text = std::fs::read_to_string(seg).unwrap_or_default();
    std::fs::write(
        seg,
        text.replacen("\"verdict\":\"permit\"", "\"verdict\":\"deny\"", 1),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    expect_corrupt(copy.path(), "does not link");

    // truncated: a closed segment loses its end
    let copy = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_dir(dir.path(), copy.path());
    let seg = &segment_files(copy.path())[0];
    let text = std::fs::read_to_string(seg).unwrap_or_default();
    let kept: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(seg, kept.join("\n") + "\n").unwrap_or_else(|e| panic!("{e}"));
    expect_corrupt(copy.path(), "missing");

    // a segment removed
    let copy = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_dir(dir.path(), copy.path());
    std::fs::remove_file(&segment_files(copy.path())[1]).unwrap_or_else(|e| panic!("{e}"));
    expect_corrupt(copy.path(), "missing");

    // the original still opens and goes on
    let spool = Spool::open(cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spool.stats().head_seq, 120);
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p: &std::path::PathBuf| p.extension().is_some_and(|e| e == "jsonl"));
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn expect_corrupt(dir: &Path, what: &str) {
    assert!(
        verify_dir(dir).is_err(),
        "verify_dir passed a damaged spool"
    );
    match Spool::open(SpoolConfig::new(dir)) {
        Err(SpoolError::Corrupt { what: w, .. }) => assert!(w.contains(what), "{w}"),
        Err(e) => panic!("not reported as damage: {e}"),
        Ok(_) => panic!("a damaged spool opened"),
    }
}

/// A NATS server with JetStream that this test owns (its own port and
/// store), stopped by its pid to simulate the remote node going down.
struct OwnNats {
    child: std::process::Child,
    port: u16,
    store: std::path::PathBuf,
}

impl OwnNats {
    fn start(port: u16, store: &Path) -> OwnNats {
        let bin = [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nats-server");
        let child = std::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e}; install nats-server (apt-get install nats-server) for this test")
            });
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnNats {
            child,
            port,
            store: store.to_path_buf(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        *self = OwnNats::start(self.port, &self.store.clone());
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_outage_then_no_gap() {
    use async_nats::jetstream::stream;
    let env = TestEnv::start().await;
    let store = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = free_port();
    let mut server = OwnNats::start(port, store.path());
    let url = format!("nats://127.0.0.1:{port}");
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect to the test's own nats-server at {url}: {e}"));
    let js = async_nats::jetstream::new(client);
    let subject = "elevate.decisions.test-worker";
    let stream_name = "ELEVATE_DECISIONS";
    js.create_stream(stream::Config {
        name: stream_name.into(),
        subjects: vec![subject.into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create the decision stream: {e}"));

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    let shipper = elevate_nats::JetStreamDecisionShipper::new(js.clone(), subject);
    spool
        .start_shipping(Arc::new(shipper), fast())
        .unwrap_or_else(|e| panic!("{e}"));
    let guard = spooled_guard(&env, &spool);
    decide(&env, &guard, 0, 100).await;
    assert!(
        spool.wait_shipped(Duration::from_secs(20)).await,
        "{:?}",
        spool.stats()
    );

    server.kill();
    let during = decide(&env, &guard, 100, 150).await;
    assert!(
        during.iter().all(|(v, _)| *v == Verdict::Permit),
        "{during:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = spool.stats();
    assert!(st.head_seq == 250 && st.shipped_seq < 250, "{st:?}");

    server.restart();
    assert!(
        spool.wait_shipped(Duration::from_secs(60)).await,
        "{:?}",
        spool.stats()
    );
    let s = js
        .get_stream(stream_name)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let info = s
        .get_info()
        .await
        .map(|i| i.state)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut v = ChainVerifier::new();
    for seq in info.first_sequence..=info.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            v.add_batch(&m.payload);
        }
    }
    let report = v.report();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.streams[0].entries, 250, "{report}");
    println!("jetstream: {report}{:?}", spool.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_topic_receives_the_chain() {
    let env = TestEnv::start().await;
    let kafka = elevate_testing::kafka::KafkaBinding::real().await;
    let topic = format!("elevate-decisions-{}", uuid::Uuid::new_v4().simple());
    kafka
        .create_topic(&topic, 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    let shipper = elevate_kafka::KafkaDecisionShipper::from_config(&kafka.config(), &topic)
        .unwrap_or_else(|e| panic!("{e}"));
    spool
        .start_shipping(Arc::new(shipper), fast())
        .unwrap_or_else(|e| panic!("{e}"));
    let guard = spooled_guard(&env, &spool);
    decide(&env, &guard, 0, 150).await;
    assert!(
        spool.wait_shipped(Duration::from_secs(30)).await,
        "{:?}",
        spool.stats()
    );
    let batches = spool.stats().batches_shipped as usize;
    let records = kafka
        .read_records(&topic, batches, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut v = ChainVerifier::new();
    for r in &records {
        assert_eq!(r.key.as_deref(), Some(spool.stream().as_bytes()));
        assert!(r.headers.get_str("Idempotency-Key").is_some());
        v.add_batch(&r.payload);
    }
    let report = v.report();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.streams[0].entries, 150, "{report}");
}

/// A workload whose `elevate.toml` names the spool and `ship_to`, and the
/// producer publishing for it, on the TTS binary with real key files.
async fn shipping_workloads(
    domain: &elevate_testing::domain::FileDomain,
    spool: &str,
    ship_to: &str,
) -> (elevate_config::Workload, elevate_config::Workload) {
    let producer = elevate_config::Workload::from_file(domain.workload_config(
        "orders-api",
        "orders",
        "test.process",
        "",
    ))
    .await
    .unwrap_or_else(|e| panic!("producer: {e}"));
    let extra = format!(
        "\n[decisions]\ntracing = false\nspool = \"{spool}\"\nship_to = \"{ship_to}\"\nship_interval_ms = 100\n"
    );
    let worker = elevate_config::Workload::from_file(domain.workload_config(
        "test-worker",
        "orders",
        "test.process",
        &extra,
    ))
    .await
    .unwrap_or_else(|e| panic!("worker shipping to {ship_to}: {e}"));
    (producer, worker)
}

fn shipping_domain() -> elevate_testing::domain::FileDomain {
    use elevate_testing::domain::{FileDomain, key};
    let (p, w) = (key("orders-api-1"), key("test-worker-1"));
    FileDomain::start(
        Path::new(env!("CARGO_BIN_EXE_elevate-tts")),
        elevate_testing::env::TRUST_DOMAIN,
        &["test.process"],
        &[("orders-api", &[&p]), ("test-worker", &[&w])],
    )
}

/// Makes `n` decisions at `worker` and waits until its spool shipped them.
async fn decide_and_ship(
    producer: &elevate_config::Workload,
    worker: &elevate_config::Workload,
    n: u64,
) -> Spool {
    for i in 0..n {
        let d = elevate_testing::domain::decide_for_alice(
            producer,
            worker,
            "orders",
            "test.process",
            i,
        )
        .await;
        assert!(matches!(d, elevate_core::GuardDecision::Permit(_)), "{d:?}");
    }
    let spool = worker
        .guard()
        .decision_log()
        .spool()
        .unwrap_or_else(|| panic!("a configured spool"));
    assert!(
        spool.wait_shipped(Duration::from_secs(30)).await,
        "{:?}",
        spool.stats()
    );
    spool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configuration_alone_ships_to_a_kafka_topic_and_a_jetstream_stream() {
    let domain = shipping_domain();

    // Kafka (tansu): `ship_to = "kafka://<bootstrap>/<topic>"`.
    let kafka = elevate_testing::kafka::KafkaBinding::real().await;
    let topic = format!("elevate-decisions-{}", uuid::Uuid::new_v4().simple());
    kafka
        .create_topic(&topic, 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (producer, worker) = shipping_workloads(
        &domain,
        "spool-kafka",
        &format!("kafka://{}/{topic}", kafka.bootstrap()),
    )
    .await;
    let spool = decide_and_ship(&producer, &worker, 40).await;
    let records = kafka
        .read_records(
            &topic,
            spool.stats().batches_shipped as usize,
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    intact(records.iter().map(|r| r.payload.as_slice()), 40);
    drop((producer, worker));

    // JetStream on the local server: `ship_to = "nats://host:port/<subject>"`.
    let nats = elevate_testing::nats::NatsBinding::jetstream().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let stream = format!("{}decisions_{id}", elevate_testing::nats::STREAM_PREFIX);
    let subject = format!("elvt.decisions.{id}");
    nats.create_stream(&stream, vec![subject.clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let server = nats.url().trim_start_matches("nats://").to_string();
    let (producer, worker) =
        shipping_workloads(&domain, "spool-nats", &format!("nats://{server}/{subject}")).await;
    let spool = decide_and_ship(&producer, &worker, 40).await;
    let msgs = nats
        .read_stream(
            &stream,
            spool.stats().batches_shipped as usize,
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    intact(msgs.iter().map(|m| m.payload.as_slice()), 40);
}

/// The shipped batches make one intact chain of `entries` entries.
fn intact<'a>(batches: impl Iterator<Item = &'a [u8]>, entries: u64) {
    let mut v = ChainVerifier::new();
    for b in batches {
        v.add_batch(b);
    }
    let report = v.report();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.streams[0].entries, entries, "{report}");
}
