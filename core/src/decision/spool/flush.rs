//! Making written entries durable: the flusher thread (one `fdatasync` for
//! everything written since the previous one) and the callers waiting for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Shared;

/// How far the stream is durable, as the waiters see it.
#[derive(Debug, Clone)]
pub(super) struct Durable {
    /// Every entry up to this one is stored.
    pub(super) seq: u64,
    /// Why the entries after `seq` never will be (a failed `fdatasync`).
    pub(super) failed: Option<Arc<str>>,
}

impl Shared {
    /// The flusher: waits for written entries, flushes them with one
    /// `fdatasync` (writes go on meanwhile and join the next one), then
    /// tells the waiters and the shipper. Ends when the spool is dropped.
    pub(super) fn run_flusher(&self) {
        let interval = self.cfg.flush_interval;
        let mut last_start: Option<Instant> = None;
        loop {
            let (file, seq, hash, offset) = {
                let mut st = self.state.lock();
                // Entries already written are flushed even when the spool
                // was marked broken since (it refuses new ones): their
                // callers are waiting.
                while st.writer.seq <= st.head_seq {
                    if st.closed {
                        return;
                    }
                    st.flusher_idle = true;
                    self.written.wait(&mut st);
                    st.flusher_idle = false;
                }
                // Pace: the records written until the interval is over join
                // this flush (appends do not wake the flusher meanwhile,
                // unless FLUSH_GROUP_MAX of them wait).
                if let Some(next) = last_start.map(|t| t + interval) {
                    while Instant::now() < next
                        && st.writer.seq - st.head_seq < super::FLUSH_GROUP_MAX
                        && !st.closed
                    {
                        self.written.wait_until(&mut st, next);
                    }
                }
                last_start = Some(Instant::now());
                (
                    st.writer.file.clone(),
                    st.writer.seq,
                    st.writer.hash.clone(),
                    st.writer.offset,
                )
            };
            let flushed = file.sync_data();
            let mut st = self.state.lock();
            match flushed {
                // A segment change in between flushed these already (and
                // made a newer head durable): nothing to move.
                Ok(()) if seq <= st.head_seq => {}
                Ok(()) => {
                    st.head_seq = seq;
                    st.head_hash = hash;
                    if let Some(s) = st.segments.back_mut() {
                        s.bytes = offset;
                        s.last_seq = seq;
                    }
                    drop(st);
                    self.counters.commits.fetch_add(1, Ordering::Relaxed);
                    self.publish_durable(seq);
                }
                Err(e) => {
                    // After a failed fsync the page cache cannot be trusted
                    // (the kernel may have dropped the dirty pages): refuse
                    // everything until a reopen scans what really is on disk.
                    let reason = format!(
                        "fdatasync failed: {e}; the spool refuses records until it is reopened"
                    );
                    tracing::error!(target: "elevate::decision", dir = %self.cfg.dir.display(), error = %e, "decision spool: fdatasync failed; decisions turn into Retry until the spool is reopened");
                    st.broken.get_or_insert_with(|| reason.clone());
                    drop(st);
                    self.durable.send_modify(|d| d.failed = Some(reason.into()));
                    // Nothing written from here on is ever flushed: end.
                    return;
                }
            }
        }
    }

    /// Entries up to `seq` are durable: wake their waiters and the shipper.
    pub(super) fn publish_durable(&self, seq: u64) {
        self.durable.send_if_modified(|d| {
            let newer = seq > d.seq;
            if newer {
                d.seq = seq;
            }
            newer
        });
        if seq >= self.ship_wake_at.load(Ordering::SeqCst) {
            self.committed.notify_one();
        }
    }

    /// Waits until entry `seq` is durable.
    ///
    /// # Errors
    /// Why it never will be (a failed flush).
    pub(super) async fn wait_durable(&self, seq: u64) -> Result<(), String> {
        let mut rx = self.durable.subscribe();
        let d = rx
            .wait_for(|d| d.seq >= seq || d.failed.is_some())
            .await
            .map_err(|_| "the spool was closed".to_string())?;
        if d.seq >= seq {
            Ok(())
        } else {
            Err(d
                .failed
                .as_deref()
                .unwrap_or("the record was not flushed")
                .to_string())
        }
    }
}
