//! The spool on real files: group commit, the bound, shipping at least
//! once across failures and restarts, and damage found at open.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::decision::chain::{Batch, ChainVerifier};
use crate::decision::ship::{ShipConfig, ShipError, Shipper};
use crate::decision::spool::{Spool, SpoolConfig, SpoolError, verify_dir};
use crate::decision::{DecisionRecord, DecisionSink};
use crate::verdict::{Reason, Verdict};

fn rec(i: usize) -> DecisionRecord {
    DecisionRecord {
        decision_id: format!("d{i}"),
        time: "2026-01-01T00:00:00Z".into(),
        verdict: Verdict::Permit,
        reason: Reason::Permitted,
        detail: None,
        subject: Some("alice".into()),
        workload: "w".into(),
        producer: None,
        action: None,
        resource: None,
        txn: None,
        chain: vec![],
        source: crate::memory::coordinates("q", i as u64),
        attempt: 1,
        policy_version: "v".into(),
        bundle_revision: None,
        latency_us: 3,
        trace_id: "t".into(),
        ctx_ref_sha256: None,
        txn_token_sha256: None,
    }
}

/// Keeps every batch it acknowledges; fails while `down`, and acknowledges
/// but reports failure `lose_acks` times (a lost ack: a duplicate).
#[derive(Default)]
struct Collector {
    batches: Mutex<Vec<Vec<u8>>>,
    down: Mutex<bool>,
    lose_acks: Mutex<u32>,
}

#[async_trait::async_trait]
impl Shipper for Collector {
    fn target(&self) -> String {
        "memory".into()
    }
    async fn ship(&self, batch: &Batch) -> Result<(), ShipError> {
        let err = |r: &str| ShipError {
            target: "memory".into(),
            reason: r.into(),
        };
        if *self.down.lock() {
            return Err(err("down"));
        }
        self.batches.lock().push(batch.to_json());
        let mut lose = self.lose_acks.lock();
        if *lose > 0 {
            *lose -= 1;
            return Err(err("ack lost"));
        }
        Ok(())
    }
}

impl Collector {
    fn verify(&self) -> crate::decision::ChainReport {
        let mut v = ChainVerifier::new();
        for b in self.batches.lock().iter() {
            v.add_batch(b);
        }
        v.report()
    }
}

fn fast() -> ShipConfig {
    ShipConfig {
        max_records: 50,
        interval: Duration::from_millis(20),
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..ShipConfig::default()
    }
}

async fn commit_many(spool: &Spool, from: usize, n: usize) -> Vec<Result<(), String>> {
    let futs = (from..from + n).map(|i| {
        let s = spool.clone();
        tokio::spawn(async move { s.commit(&rec(i)).await.map_err(|e| e.to_string()) })
    });
    futures::future::join_all(futs)
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| Err(e.to_string())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_share_commits_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap();
    let results = commit_many(&spool, 0, 300).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    spool.record(&rec(300)).unwrap();
    let st = spool.stats();
    assert_eq!((st.head_seq, st.records), (301, 301));
    assert!(st.commits < 301, "no group commit: {st:?}");
    drop(spool);
    assert_eq!(verify_dir(dir.path()).unwrap().head_seq, 301);
    let again = Spool::open(SpoolConfig::new(dir.path())).unwrap();
    again.record(&rec(301)).unwrap();
    assert_eq!(verify_dir(dir.path()).unwrap().head_seq, 302);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_then_shipping_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SpoolConfig::new(dir.path()).with_max_bytes(64 * 1024);
    cfg.segment_bytes = 8 * 1024;
    let spool = Spool::open(cfg).unwrap();
    let results = commit_many(&spool, 0, 400).await;
    let refused = results.iter().filter(|r| r.is_err()).count();
    assert!(refused > 0, "a 64 KiB spool took 400 records");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.contains("full")),
        "{results:?}"
    );
    let st = spool.stats();
    assert!(st.used_bytes <= 64 * 1024 && st.rejected_full == refused as u64);

    let shipper = Arc::new(Collector::default());
    spool.start_shipping(shipper.clone(), fast()).unwrap();
    assert!(spool.wait_shipped(Duration::from_secs(10)).await);
    let after = spool.stats();
    assert!(
        after.segments == 1 && after.used_bytes < st.used_bytes,
        "shipped segments stay: {after:?}"
    );
    assert!(commit_many(&spool, 400, 50).await.iter().all(Result::is_ok));
    assert!(spool.wait_shipped(Duration::from_secs(10)).await);
    let report = shipper.verify();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.streams[0].entries, st.head_seq + 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_lost_acks_and_restart_ship_everything_once_or_more() {
    let dir = tempfile::tempdir().unwrap();
    let shipper = Arc::new(Collector::default());
    *shipper.down.lock() = true;
    *shipper.lose_acks.lock() = 2;
    {
        let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap();
        spool.start_shipping(shipper.clone(), fast()).unwrap();
        assert!(commit_many(&spool, 0, 120).await.iter().all(Result::is_ok));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(spool.stats().shipped_seq, 0);
        assert!(spool.stats().ship_failures > 0);
        *shipper.down.lock() = false;
        assert!(spool.wait_shipped(Duration::from_secs(10)).await);
        assert!(commit_many(&spool, 120, 30).await.iter().all(Result::is_ok));
        // stop before these are shipped: the restart takes them
    }
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap();
    spool.start_shipping(shipper.clone(), fast()).unwrap();
    assert!(spool.wait_shipped(Duration::from_secs(10)).await);
    let report = shipper.verify();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.streams[0].entries, 150);
    assert!(report.duplicates() > 0, "two lost acks make duplicates");
}

fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".jsonl"))
        .collect();
    v.sort();
    v
}

async fn spool_with_segments(dir: &std::path::Path) {
    let mut cfg = SpoolConfig::new(dir);
    cfg.segment_bytes = 4 * 1024;
    let spool = Spool::open(cfg).unwrap();
    for i in 0..60 {
        spool.commit(&rec(i)).await.unwrap();
    }
    assert!(segment_files(dir).len() >= 3);
}

fn is_corrupt(r: Result<Spool, SpoolError>) -> String {
    match r {
        Err(SpoolError::Corrupt { what, .. }) => what,
        Err(e) => panic!("not Corrupt: {e}"),
        Ok(_) => panic!("a damaged spool opened"),
    }
}

#[tokio::test]
async fn an_edited_entry_is_found() {
    let dir = tempfile::tempdir().unwrap();
    spool_with_segments(dir.path()).await;
    let seg = &segment_files(dir.path())[1];
    let text = std::fs::read_to_string(seg).unwrap();
    std::fs::write(seg, text.replacen("\"permit\"", "\"deny\"", 1)).unwrap();
    let what = is_corrupt(Spool::open(SpoolConfig::new(dir.path())));
    assert!(what.contains("does not link"), "{what}");
    assert!(verify_dir(dir.path()).is_err());
}

#[tokio::test]
async fn a_removed_segment_or_entry_is_found() {
    let dir = tempfile::tempdir().unwrap();
    spool_with_segments(dir.path()).await;
    std::fs::remove_file(&segment_files(dir.path())[1]).unwrap();
    let what = is_corrupt(Spool::open(SpoolConfig::new(dir.path())));
    assert!(what.contains("segment is missing"), "{what}");

    let dir = tempfile::tempdir().unwrap();
    spool_with_segments(dir.path()).await;
    let seg = &segment_files(dir.path())[0];
    let text = std::fs::read_to_string(seg).unwrap();
    let without_third: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, l)| l)
        .collect();
    std::fs::write(seg, without_third.join("\n") + "\n").unwrap();
    let what = is_corrupt(Spool::open(SpoolConfig::new(dir.path())));
    assert!(what.contains("removed"), "{what}");
}

#[tokio::test]
async fn a_truncated_segment_is_found_and_a_torn_tail_is_cut() {
    // truncating a closed segment
    let dir = tempfile::tempdir().unwrap();
    spool_with_segments(dir.path()).await;
    let seg = &segment_files(dir.path())[0];
    let len = std::fs::metadata(seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(seg)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let what = is_corrupt(Spool::open(SpoolConfig::new(dir.path())));
    assert!(what.contains("truncated"), "{what}");

    // the live tail loses the end of its last entry: what a crash during
    // a write into the preallocated segment leaves
    let dir = tempfile::tempdir().unwrap();
    spool_with_segments(dir.path()).await;
    let files = segment_files(dir.path());
    let last = files.last().unwrap();
    let end = entries_end(last);
    zero(last, end - 10, end);
    assert!(
        verify_dir(dir.path()).is_err(),
        "verify reports a torn tail"
    );
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap();
    let st = spool.stats();
    assert!(st.torn_tail_bytes > 0 && st.head_seq == 59, "{st:?}");
    spool.commit(&rec(99)).await.unwrap();
    drop(spool);
    assert_eq!(verify_dir(dir.path()).unwrap().head_seq, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_below_the_cursor_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let shipper = Arc::new(Collector::default());
    {
        let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap();
        spool.start_shipping(shipper.clone(), fast()).unwrap();
        for i in 0..10 {
            spool.commit(&rec(i)).await.unwrap();
        }
        assert!(spool.wait_shipped(Duration::from_secs(10)).await);
    }
    let seg = &segment_files(dir.path())[0];
    let text = std::fs::read_to_string(seg).unwrap();
    let first_five: Vec<&str> = text.lines().take(5).collect();
    std::fs::write(seg, first_five.join("\n") + "\n").unwrap();
    let what = is_corrupt(Spool::open(SpoolConfig::new(dir.path())));
    assert!(what.contains("truncated"), "{what}");
}

/// Where a segment's entries end (its first NUL byte, or its length).
fn entries_end(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len()) as u64
}

fn zero(path: &std::path::Path, from: u64, to: u64) {
    overwrite(path, from, &vec![0u8; usize::try_from(to - from).unwrap()]);
}

fn overwrite(path: &std::path::Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn small_segments(dir: &std::path::Path) -> SpoolConfig {
    let mut cfg = SpoolConfig::new(dir);
    cfg.segment_bytes = 4 * 1024;
    cfg
}

#[tokio::test]
async fn segments_are_preallocated_and_closed_ones_cut_to_their_entries() {
    let dir = tempfile::tempdir().unwrap();
    spool_with_segments(dir.path()).await;
    let files = segment_files(dir.path());
    let (last, closed) = files.split_last().unwrap();
    assert_eq!(
        std::fs::metadata(last).unwrap().len(),
        4 * 1024,
        "active segment not preallocated"
    );
    assert!(entries_end(last) < 4 * 1024);
    for f in closed {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.contains(&0) && bytes.ends_with(b"\n"),
            "{f:?} keeps a zero tail"
        );
    }
    // the spare is made in the background: wait for it
    let spare = dir.path().join("spare");
    for _ in 0..100 {
        if spare.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bytes = std::fs::read(&spare).unwrap();
    assert!(bytes.len() == 4 * 1024 && bytes.iter().all(|b| *b == 0));
    assert_eq!(verify_dir(dir.path()).unwrap().head_seq, 60);
}

#[tokio::test]
async fn a_later_page_without_the_earlier_one_is_a_torn_tail_in_the_live_segment_only() {
    // live segment: entries, zeros, then bytes of an entry whose start never
    // reached the disk
    let dir = tempfile::tempdir().unwrap();
    spool_with_segments(dir.path()).await;
    let files = segment_files(dir.path());
    let last = files.last().unwrap();
    let end = entries_end(last);
    overwrite(last, end + 100, b"\"seq\":61,\"record\":{}}\n");
    assert!(
        verify_dir(dir.path()).is_err(),
        "verify reports the stray bytes"
    );
    let spool = Spool::open(small_segments(dir.path())).unwrap();
    let st = spool.stats();
    assert!(st.torn_tail_bytes > 100 && st.head_seq == 60, "{st:?}");
    spool.commit(&rec(60)).await.unwrap();
    drop(spool);
    assert_eq!(verify_dir(dir.path()).unwrap().head_seq, 61);

    // the same in a closed segment is an edit
    let dir = tempfile::tempdir().unwrap();
    spool_with_segments(dir.path()).await;
    let first = &segment_files(dir.path())[0];
    let end = entries_end(first);
    overwrite(first, end, b"\0\0x");
    let what = is_corrupt(Spool::open(small_segments(dir.path())));
    assert!(what.contains("after the segment's end"), "{what}");
}

#[tokio::test]
async fn a_spool_without_preallocation_opens_and_goes_on() {
    // what a spool written before segments were preallocated looks like:
    // every segment ends at its last entry
    let dir = tempfile::tempdir().unwrap();
    spool_with_segments(dir.path()).await;
    let last = segment_files(dir.path()).pop().unwrap();
    let end = entries_end(&last);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(end)
        .unwrap();
    let spool = Spool::open(small_segments(dir.path())).unwrap();
    assert_eq!(spool.stats().torn_tail_bytes, 0);
    assert_eq!(std::fs::metadata(&last).unwrap().len(), 4 * 1024);
    for i in 60..70 {
        spool.commit(&rec(i)).await.unwrap();
    }
    drop(spool);
    assert_eq!(verify_dir(dir.path()).unwrap().head_seq, 70);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fsync_a_record_is_stored_when_written_and_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_segments(dir.path());
    cfg.fsync = false;
    let spool = Spool::open(cfg).unwrap();
    let shipper = Arc::new(Collector::default());
    spool.start_shipping(shipper.clone(), fast()).unwrap();
    assert!(commit_many(&spool, 0, 200).await.iter().all(Result::is_ok));
    let st = spool.stats();
    assert_eq!((st.head_seq, st.records, st.commits), (200, 200, 200));
    assert!(spool.wait_shipped(Duration::from_secs(10)).await);
    let report = shipper.verify();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.streams[0].entries, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_are_paced_under_load_and_immediate_when_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SpoolConfig::new(dir.path());
    cfg.flush_interval = Duration::from_millis(500);
    let spool = Spool::open(cfg).unwrap();
    // quiet: the first record is flushed at once, not after the interval
    let t = std::time::Instant::now();
    spool.commit(&rec(0)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    // under load: every record written within one interval joins one flush
    let t = std::time::Instant::now();
    assert!(commit_many(&spool, 1, 300).await.iter().all(Result::is_ok));
    let st = spool.stats();
    assert_eq!(st.head_seq, 301);
    assert!(st.commits <= 4, "flushes not paced: {st:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_waiting_for_its_flush_is_flushed_when_the_spool_breaks_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SpoolConfig::new(dir.path());
    cfg.flush_interval = Duration::from_millis(300);
    let spool = Spool::open(cfg).unwrap();
    spool.commit(&rec(0)).await.unwrap();
    // the next flush is paced: this record waits for it
    let waiting = {
        let s = spool.clone();
        tokio::spawn(async move { s.commit(&rec(1)).await.map_err(|e| e.to_string()) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    spool
        .shared()
        .mark_broken("damaged chain found while shipping".into());
    let answered = tokio::time::timeout(Duration::from_secs(5), waiting).await;
    assert!(
        matches!(answered, Ok(Ok(Ok(())))),
        "a written record was left waiting: {answered:?}"
    );
    assert!(
        spool.commit(&rec(2)).await.is_err(),
        "a broken spool took a record"
    );
    assert_eq!(spool.stats().head_seq, 2);
}
