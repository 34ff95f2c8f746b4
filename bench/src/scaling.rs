//! How the cost grows with the work: guarded throughput and CPU per message
//! at concurrency 1 / 8 / 32 / 128 (100-byte payloads) and at payload sizes
//! 100 B / 10 KiB / 512 KiB (concurrency 32), repeated context, TTS in
//! process, embedded PDP — and the replay seen-set's memory per message,
//! in process and in Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use elevate_core::replay::{InMemoryReplayGuard, ReplayGuard};
use elevate_core::replay_redis::RedisReplayGuard;
use elevate_testing::binding::BrokerBinding;
use elevate_testing::fixture::{Service, address};

use crate::env::BenchEnv;
use crate::report::Progress;
use crate::row::{self, Plan, Row};
use crate::scenario::{Binding, Contexts, LogMode, PdpMode, Scenario, TtsMode};

/// The scenario of every scaling row.
pub const SCENARIO: Scenario = Scenario {
    contexts: Contexts::Repeated,
    tts: TtsMode::InProcess,
    pdp: PdpMode::Local,
    log: LogMode::File,
    binding: Binding::PerMessage,
};

/// One cell of the scaling table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// Messages in flight per consumer.
    pub concurrency: usize,
    /// Payload size in bytes.
    pub payload_bytes: usize,
}

/// The cells to run: in full mode concurrency 1, 8, 32, 128 at 100 B, then
/// 10 KiB and 512 KiB at concurrency 32; in quick mode one (8, 10 KiB).
pub fn cells(quick: bool) -> Vec<Cell> {
    let c = |concurrency, payload_bytes| Cell {
        concurrency,
        payload_bytes,
    };
    if quick {
        return vec![c(8, 10 * 1024)];
    }
    vec![
        c(1, 100),
        c(8, 100),
        c(32, 100),
        c(128, 100),
        c(32, 10 * 1024),
        c(32, 512 * 1024),
    ]
}

/// Most payload bytes one cell drains (the batch is held in memory twice
/// while it is published).
const CELL_BYTES: usize = 150 * 1024 * 1024;

/// Messages drained in a cell: `messages`, but at most [`CELL_BYTES`] of
/// payload (300 messages at 512 KiB), and at least 20.
pub fn messages_for(cell: Cell, messages: usize) -> usize {
    messages.min(CELL_BYTES / cell.payload_bytes.max(1)).max(20)
}

/// Runs every cell on `broker`.
pub async fn run(
    env: &BenchEnv,
    broker: &dyn BrokerBinding,
    name: &'static str,
    first_row_id: usize,
    base: &Plan,
    quick: bool,
    progress: &Progress,
) -> Vec<Row> {
    let mut out = Vec::new();
    for (i, cell) in cells(quick).into_iter().enumerate() {
        let plan = Plan {
            messages: messages_for(cell, base.messages),
            latency_messages: base.latency_messages.min(100),
            latency_interval: base.latency_interval,
            concurrency: cell.concurrency,
            payload_bytes: Some(cell.payload_bytes),
        };
        let r = row::run(
            env,
            broker,
            name,
            first_row_id + i,
            SCENARIO,
            &plan,
            progress,
        )
        .await;
        progress.clear();
        match &r.problem {
            None => println!(
                "{name:10} scaling: concurrency {:>3}, payload {:>7} B: guarded {:>6} msgs/s, {:.0} µs CPU/msg",
                cell.concurrency,
                r.payload_bytes,
                crate::report::fmt_rate(r.guarded_rate),
                r.guarded_cpu_us
            ),
            Some(p) => println!(
                "{name:10} scaling: concurrency {}, payload {} B: FAILED: {p}",
                cell.concurrency, cell.payload_bytes
            ),
        }
        out.push(r);
    }
    out
}

/// The replay seen-set's memory per entry (one entry per guarded message).
#[derive(Debug, Clone)]
pub struct SeenSetMemory {
    /// Where the seen-set lives: `in-memory` or `redis`.
    pub store: &'static str,
    /// Entries inserted.
    pub entries: usize,
    /// Bytes per entry, or why it could not be measured.
    pub bytes_per_entry: Result<f64, String>,
    /// How it was measured.
    pub method: &'static str,
}

/// A reference id and a message position as the guard records them: a
/// UUIDv7 `jti` (36 characters) and a JetStream-like position.
fn entry(i: usize) -> (String, String) {
    (
        uuid::Uuid::now_v7().to_string(),
        format!("jetstream:elevate-bench-replay:{}", 1_000_000 + i),
    )
}

/// Bytes the allocator has handed out and not taken back (glibc
/// `mallinfo2`: `uordblks` in the arenas + `hblkhd` in mmapped chunks).
#[allow(unsafe_code)] // mallinfo2(3): reads the allocator's counters, no arguments
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
    let m = unsafe { libc::mallinfo2() };
    m.uordblks + m.hblkhd
}

/// Inserts `n` entries into a fresh in-memory seen-set and divides the heap
/// growth by `n` (the same process's other tasks are idle between rows).
pub async fn in_memory(n: usize) -> SeenSetMemory {
    let entries: Vec<(String, String)> = (0..n).map(entry).collect();
    let exp = elevate_core::ctxref::unix_now() + 600;
    let before = heap_in_use();
    let guard = InMemoryReplayGuard::new();
    let mut failed = None;
    for (jti, pos) in &entries {
        if let Err(e) = guard.check(jti, pos, exp).await {
            failed = Some(e.to_string());
            break;
        }
    }
    let after = heap_in_use();
    let bytes_per_entry = match failed {
        Some(e) => Err(e),
        None if guard.len() != n => Err(format!("{} of {n} entries kept", guard.len())),
        None => Ok(after.saturating_sub(before) as f64 / n as f64),
    };
    drop(guard);
    SeenSetMemory {
        store: "in-memory",
        entries: n,
        bytes_per_entry,
        method: "glibc mallinfo2 heap in use before and after inserting into a fresh InMemoryReplayGuard (HashMap of jti → position, expiry); the jti and position strings are copied into it",
    }
}

/// Inserts `n` entries through [`RedisReplayGuard`] under a fresh prefix,
/// reads Redis's `used_memory` before and after, then deletes them.
pub async fn redis(n: usize) -> SeenSetMemory {
    let method = "Redis INFO memory used_memory before and after n SET NX EX through RedisReplayGuard (fresh key prefix, deleted afterwards); MEMORY USAGE of a sample key in the notes";
    SeenSetMemory {
        store: "redis",
        entries: n,
        bytes_per_entry: redis_inner(n).await,
        method,
    }
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> Result<usize, String> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .map_err(|e| format!("INFO memory: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "INFO memory without used_memory".to_string())
}

async fn redis_inner(n: usize) -> Result<f64, String> {
    let url = address(Service::Redis);
    let unreachable = |e: String| {
        format!(
            "Redis is not reachable at {url} ({e}); start it with: {}",
            Service::Redis.how_to_start()
        )
    };
    let prefix = format!("elevate-bench:{}:", uuid::Uuid::new_v4().simple());
    let guard = tokio::time::timeout(
        Duration::from_secs(5),
        RedisReplayGuard::connect(&url, prefix.clone()),
    )
    .await
    .map_err(|_| unreachable("no answer in 5 s".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let client = redis::Client::open(url.as_str()).map_err(|e| unreachable(e.to_string()))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let entries: Vec<(String, String)> = (0..n).map(entry).collect();
    let exp = elevate_core::ctxref::unix_now() + 600;
    let guard = Arc::new(guard);
    let before = used_memory(&mut conn).await?;
    let started = Instant::now();
    let mut result = Ok(());
    for chunk in entries.chunks(256) {
        let mut set = tokio::task::JoinSet::new();
        for (jti, pos) in chunk {
            let (jti, pos, g) = (jti.clone(), pos.clone(), guard.clone());
            set.spawn(async move { g.check(&jti, &pos, exp).await.map(|_| ()) });
        }
        while let Some(r) = set.join_next().await {
            if let Err(e) = r
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                result = Err(e);
            }
        }
    }
    tracing::debug!(elapsed = ?started.elapsed(), n, "redis seen-set filled");
    let after = used_memory(&mut conn).await;
    let sample: Option<usize> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!("{prefix}{}", entries[0].0))
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut conn)
        .await
        .ok()
        .flatten();
    if let Some(s) = sample {
        println!("redis seen-set: MEMORY USAGE of one entry's key: {s} bytes");
    }
    for chunk in entries.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|(j, _)| format!("{prefix}{j}")).collect();
        let _: Result<usize, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
    }
    result?;
    Ok(after?.saturating_sub(before) as f64 / n as f64)
}

/// Live seen-set entries at `rate` messages per second with references of
/// `horizon_s` seconds: each entry is kept until its reference expires plus
/// 60 s (both stores).
pub fn live_entries(rate: f64, horizon_s: f64) -> f64 {
    rate * (horizon_s + 60.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_cells_cover_every_concurrency_and_payload_size_and_quick_has_one() {
        let full = cells(false);
        for c in [1, 8, 32, 128] {
            assert!(full.contains(&Cell {
                concurrency: c,
                payload_bytes: 100
            }));
        }
        for p in [100, 10 * 1024, 512 * 1024] {
            assert!(full.contains(&Cell {
                concurrency: 32,
                payload_bytes: p
            }));
        }
        assert_eq!(cells(true).len(), 1);
    }

    #[test]
    fn big_payloads_drain_fewer_messages() {
        let cell = |payload_bytes| Cell {
            concurrency: 32,
            payload_bytes,
        };
        assert_eq!(messages_for(cell(100), 3000), 3000);
        assert_eq!(messages_for(cell(10 * 1024), 3000), 3000);
        assert_eq!(messages_for(cell(512 * 1024), 3000), 300);
        assert_eq!(messages_for(cell(512 * 1024), 5), 20);
    }

    #[tokio::test]
    async fn an_in_memory_seen_set_entry_costs_between_its_strings_and_a_kilobyte() {
        let m = in_memory(50_000).await;
        let b = m.bytes_per_entry.unwrap();
        // jti (36) + position (~40) are copied in, plus a HashMap entry; 50,000
        // entries, so that another test's few MiB at the same time cannot swing it.
        assert!(b > 76.0 && b < 1024.0, "{b} bytes per entry");
    }
}
