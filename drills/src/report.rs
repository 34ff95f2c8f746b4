//! Counting a drill and printing it: what the handled log, the decision log
//! and the dead letters read back say, and the table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::brokers::Letter;
use crate::{HandledLine, Job, is_permitted};

/// Reads the lines appended to a JSON Lines file since the last call
/// (a line still being written is left for the next call).
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    /// Follows `path` from its start.
    pub fn new(path: &Path) -> Self {
        Tail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The complete lines appended since the last call.
    pub fn read_lines(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(last_nl) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(last_nl + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        complete
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }
}

/// Everything seen of one drill so far.
#[derive(Debug, Default)]
pub struct Tally {
    /// Produced jobs: id → permitted by the bundle.
    pub jobs: HashMap<String, bool>,
    /// Handled lines in the order read.
    pub handled: Vec<HandledLine>,
    /// Distinct handled ids.
    pub handled_ids: HashSet<String>,
    /// Lines of the handled log that did not parse.
    pub bad_handled_lines: usize,
    /// Dead letters in the order read.
    pub letters: Vec<Letter>,
    /// Distinct dead-lettered ids.
    pub letter_ids: HashSet<String>,
}

impl Tally {
    /// A tally for these produced jobs.
    pub fn new(jobs: &[Job]) -> Self {
        Tally {
            jobs: jobs
                .iter()
                .map(|j| (j.id.clone(), is_permitted(&j.user)))
                .collect(),
            ..Tally::default()
        }
    }

    /// Adds handled-log lines.
    pub fn add_handled(&mut self, lines: Vec<String>) {
        for l in lines {
            match serde_json::from_str::<HandledLine>(&l) {
                Ok(h) => {
                    self.handled_ids.insert(h.id.clone());
                    self.handled.push(h);
                }
                Err(_) => self.bad_handled_lines += 1,
            }
        }
    }

    /// Adds dead letters.
    pub fn add_letters(&mut self, letters: Vec<Letter>) {
        for l in letters {
            if let Some(id) = &l.id {
                self.letter_ids.insert(id.clone());
            }
            self.letters.push(l);
        }
    }

    /// How many produced jobs are accounted for (handled or dead-lettered).
    pub fn covered(&self) -> usize {
        self.jobs
            .keys()
            .filter(|id| self.handled_ids.contains(*id) || self.letter_ids.contains(*id))
            .count()
    }

    /// Distinct permitted jobs handled.
    pub fn handled_count(&self) -> usize {
        self.handled_ids.len()
    }

    /// Permitted jobs among the produced.
    pub fn permitted(&self) -> usize {
        self.jobs.values().filter(|p| **p).count()
    }
}

/// The decision log: decision id → verdict.
pub fn read_decisions(path: &Path) -> (HashMap<String, String>, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = HashMap::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            bad += 1;
            continue;
        };
        match (
            v.get("decision_id").and_then(|d| d.as_str()),
            v.get("verdict").and_then(|d| d.as_str()),
        ) {
            (Some(id), Some(verdict)) => {
                out.insert(id.to_string(), verdict.to_string());
            }
            _ => bad += 1,
        }
    }
    (out, bad)
}

/// One row of the table: one broker, one scenario.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Broker.
    pub broker: String,
    /// Scenario (with variant).
    pub scenario: String,
    /// Messages produced (confirmed by the broker).
    pub produced: usize,
    /// Of which the bundle permits.
    pub permitted: usize,
    /// Handled-log lines.
    pub handled_lines: usize,
    /// Distinct messages handled.
    pub handled_distinct: usize,
    /// Dead letters read back.
    pub dl_raw: usize,
    /// Distinct dead letters (by `ztauth-idempotency-key`).
    pub dl_distinct: usize,
    /// Distinct dead letters by `ztauth-reason`.
    pub dl_by_reason: BTreeMap<String, usize>,
    /// Produced − distinct(handled ∪ dead-lettered).
    pub lost: usize,
    /// Handled lines whose decision id has no `permit` record.
    pub unauthorized: usize,
    /// Permitted messages that were dead-lettered.
    pub permitted_dead_lettered: usize,
    /// Messages of denied users that were handled.
    pub denied_handled: usize,
    /// From the worker's start to the last message accounted for.
    pub drain: Option<Duration>,
    /// The longest gap between two handled messages (an outage's cost in time).
    pub longest_pause: Option<Duration>,
    /// Consumer kill: from the restarted worker's start to its first handled message.
    pub first_after_restart: Option<Duration>,
    /// What happened, in order.
    pub notes: Vec<String>,
    /// Why the row could not run to the end.
    pub error: Option<String>,
    /// The row fails unless permitted messages are all handled.
    pub require_no_permitted_dl: bool,
}

impl Row {
    /// Handled lines beyond the first per message.
    pub fn duplicates(&self) -> usize {
        self.handled_lines.saturating_sub(self.handled_distinct)
    }

    /// Dead letters read beyond the first per message.
    pub fn dl_duplicates(&self) -> usize {
        self.dl_raw.saturating_sub(self.dl_distinct)
    }

    /// Why this row fails (empty: it passes).
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if let Some(e) = &self.error {
            f.push(format!("did not complete: {e}"));
        }
        if self.lost > 0 {
            f.push(format!("{} lost", self.lost));
        }
        if self.unauthorized > 0 {
            f.push(format!("{} handled without a Permit", self.unauthorized));
        }
        if self.denied_handled > 0 {
            f.push(format!("{} of denied users handled", self.denied_handled));
        }
        if self.require_no_permitted_dl && self.permitted_dead_lettered > 0 {
            f.push(format!(
                "{} permitted messages dead-lettered",
                self.permitted_dead_lettered
            ));
        }
        f
    }

    /// Fills the counts from the tally and the decision log.
    pub fn count(&mut self, tally: &Tally, decisions: &HashMap<String, String>) {
        self.produced = tally.jobs.len();
        self.permitted = tally.permitted();
        self.handled_lines = tally.handled.len();
        self.handled_distinct = tally
            .handled_ids
            .iter()
            .filter(|id| tally.jobs.contains_key(*id))
            .count();
        self.dl_raw = tally.letters.len();
        let mut keys = HashSet::new();
        let mut by_reason = BTreeMap::new();
        for l in &tally.letters {
            let key = l
                .idempotency_key
                .clone()
                .unwrap_or_else(|| format!("no-key:{:?}:{}", l.id, l.reason));
            if keys.insert(key) {
                *by_reason.entry(l.reason.clone()).or_insert(0) += 1;
            }
        }
        self.dl_distinct = keys.len();
        self.dl_by_reason = by_reason;
        self.lost = tally.jobs.len().saturating_sub(tally.covered());
        self.unauthorized = tally
            .handled
            .iter()
            .filter(|h| decisions.get(&h.decision).map(String::as_str) != Some("permit"))
            .count();
        self.permitted_dead_lettered = tally
            .letter_ids
            .iter()
            .filter(|id| tally.jobs.get(*id) == Some(&true))
            .count();
        self.denied_handled = tally
            .handled_ids
            .iter()
            .filter(|id| tally.jobs.get(*id) == Some(&false))
            .count();
        let mut times: Vec<u64> = tally.handled.iter().map(|h| h.t_ms).collect();
        times.sort_unstable();
        self.longest_pause = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .map(Duration::from_millis);
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1}", d.as_secs_f64()))
        .unwrap_or_else(|| "–".into())
}

fn reasons(r: &BTreeMap<String, usize>) -> String {
    if r.is_empty() {
        return "–".into();
    }
    r.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The table (Markdown).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| broker | scenario | produced | handled (distinct) | duplicates | dead-lettered (distinct, by reason) | DL raw | lost | unauthorized | permitted → DL | drain s | longest pause s | restart → first handled s | result |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in rows {
        let failures = r.failures();
        let result = if failures.is_empty() {
            "ok".to_string()
        } else {
            format!("FAIL: {}", failures.join("; "))
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.broker,
            r.scenario,
            r.produced,
            r.handled_distinct,
            r.duplicates(),
            r.dl_distinct,
            reasons(&r.dl_by_reason),
            r.dl_raw,
            r.lost,
            r.unauthorized,
            r.permitted_dead_lettered,
            secs(r.drain),
            secs(r.longest_pause),
            secs(r.first_after_restart),
            result
        ));
    }
    out
}

/// Duplicate rates per broker over all its rows: handled lines beyond the
/// first per message, as a share of messages handled.
pub fn duplicate_rates(rows: &[Row]) -> String {
    let mut per: BTreeMap<&str, (usize, usize, usize, usize)> = BTreeMap::new();
    for r in rows {
        let e = per.entry(r.broker.as_str()).or_default();
        e.0 += r.duplicates();
        e.1 += r.handled_distinct;
        e.2 += r.dl_duplicates();
        e.3 += r.dl_distinct;
    }
    let mut out = String::from(
        "| broker | duplicate handler runs | of handled | rate | duplicate dead letters | of dead-lettered |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for (b, (d, h, dd, dl)) in per {
        let rate = if h == 0 {
            "–".to_string()
        } else {
            format!("{:.2} %", d as f64 * 100.0 / h as f64)
        };
        out.push_str(&format!("| {b} | {d} | {h} | {rate} | {dd} | {dl} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_complete_lines_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("log");
        let mut t = Tail::new(&p);
        assert!(t.read_lines().is_empty());
        std::fs::write(&p, "a\nb\npart").expect("write");
        assert_eq!(t.read_lines(), vec!["a", "b"]);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open");
        f.write_all(b"ial\nc\n").expect("append");
        assert_eq!(t.read_lines(), vec!["partial", "c"]);
        assert!(t.read_lines().is_empty());
    }

    #[test]
    fn counts() {
        let jobs: Vec<Job> = (0..10).map(Job::numbered).collect();
        let mut tally = Tally::new(&jobs);
        let line = |id: &str, d: &str, t| {
            serde_json::to_string(&HandledLine {
                id: id.into(),
                decision: d.into(),
                pid: 1,
                t_ms: t,
            })
            .expect("json")
        };
        // m000000..m000007 permitted; one handled twice; one handled without a permit record
        let mut lines: Vec<String> = (0..8)
            .map(|n| line(&format!("m{n:06}"), "p", n * 10))
            .collect();
        lines.push(line("m000003", "p", 500));
        lines.push(line("m000007", "unknown", 510));
        tally.add_handled(lines);
        tally.add_letters(vec![
            Letter {
                reason: "subject-denied".into(),
                idempotency_key: Some("k8".into()),
                id: Some("m000008".into()),
            },
            Letter {
                reason: "subject-denied".into(),
                idempotency_key: Some("k8".into()),
                id: Some("m000008".into()),
            },
        ]);
        let decisions: HashMap<String, String> = [("p".to_string(), "permit".to_string())].into();
        let mut row = Row::default();
        row.count(&tally, &decisions);
        assert_eq!(row.produced, 10);
        assert_eq!(row.handled_distinct, 8);
        assert_eq!(row.duplicates(), 2);
        assert_eq!(row.dl_raw, 2);
        assert_eq!(row.dl_distinct, 1);
        assert_eq!(row.lost, 1, "m000009 neither handled nor dead-lettered");
        assert_eq!(row.unauthorized, 1);
        assert_eq!(row.longest_pause, Some(Duration::from_millis(430)));
        assert_eq!(row.failures().len(), 2);
    }
}
