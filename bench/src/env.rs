//! The benchmark's environment: the test kit's ([`TestEnv`]: keys, the
//! example Cedar bundle, the TTS on loopback, the producer guard, the
//! consumer's guard and processor) plus what only the benchmark has: the
//! remote-PDP baseline, a decision log on disk, for the spool rows a
//! fresh decision spool per row shipping to an HTTP receiver on loopback,
//! and for the fleet rows two TTS replicas on PostgreSQL ([`crate::fleet`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use elevate_core::decision::{DecisionSink, FileSink, ShipConfig, Spool, SpoolConfig};
use elevate_core::pdp::PolicyDecisionPoint;
use elevate_core::pdp_cache::CachingPdp;
use elevate_core::settle::Processor;
use elevate_core::token::TokenSource;
use elevate_core::token_cache::CachingTokenSource;
use elevate_core::{AuthContext, Headers, InboundMessage, OutboundMessage, handler_fn};
use elevate_testing::env::TestEnv;

use crate::fleet::BenchFleet;
use crate::remote_pdp::{self, RemotePdp};
use crate::scenario::{Contexts, LogMode, PER_CONTEXT, PdpMode, Scenario, TtsMode};
use crate::tally::{H_SEQ, Tally};

/// The user every benchmark message is sent for.
const SUBJECT: &str = "carol";

/// Message `seq`'s payload: a small JSON order (about 95 bytes), padded
/// with a `pad` string to exactly `payload_bytes` when that is larger.
pub fn order_payload(seq: usize, payload_bytes: Option<usize>) -> Result<Vec<u8>, String> {
    let mut order = serde_json::json!({
        "order": seq, "amount": 120 + (seq % 50), "currency": "EUR",
        "lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}]
    });
    let mut payload = serde_json::to_vec(&order).map_err(|e| e.to_string())?;
    // `,"pad":""` adds 9 bytes before the padding itself.
    if let Some(want) = payload_bytes
        && want >= payload.len() + 9
    {
        order["pad"] = "x".repeat(want - payload.len() - 9).into();
        payload = serde_json::to_vec(&order).map_err(|e| e.to_string())?;
    }
    Ok(payload)
}

/// The test kit's environment, the remote PDP and the decision log.
pub struct BenchEnv {
    test: TestEnv,
    remote_pdp_url: String,
    log: Arc<FileSink>,
    log_path: PathBuf,
    receiver_url: String,
    spools: parking_lot::Mutex<Vec<Spool>>,
    /// The TTS replicas, once [`BenchEnv::start_fleet`] ran (or why they did not start).
    fleet: Option<Result<BenchFleet, String>>,
}

/// A decision receiver on loopback that acknowledges every batch.
async fn serve_receiver() -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| format!("decision receiver on loopback: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = axum::Router::new().route(
        "/decisions",
        axum::routing::post(|_body: axum::body::Bytes| async { axum::http::StatusCode::OK }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "decision receiver ended");
        }
    });
    Ok(format!("http://{addr}/decisions"))
}

impl BenchEnv {
    /// Starts the test environment, the remote PDP on loopback (the same
    /// Cedar bundle) and a fresh decision log in the temporary directory.
    pub async fn start() -> Result<BenchEnv, String> {
        let test = TestEnv::start().await;
        let (pdp_addr, _task) =
            remote_pdp::serve(test.pdp.clone(), SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| format!("remote PDP on loopback: {e}"))?;
        let log_path = std::env::temp_dir().join(format!(
            "elevate-bench-decisions-{}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&log_path);
        let log = Arc::new(FileSink::open(&log_path).map_err(|e| e.to_string())?);
        Ok(BenchEnv {
            test,
            remote_pdp_url: format!("http://{pdp_addr}"),
            log,
            log_path,
            receiver_url: serve_receiver().await?,
            spools: parking_lot::Mutex::new(Vec::new()),
            fleet: None,
        })
    }

    /// Starts the TTS replicas for the fleet rows; when they cannot start,
    /// those rows fail with the reason.
    pub async fn start_fleet(&mut self) {
        self.fleet = Some(BenchFleet::start(&self.test).await);
    }

    /// The TTS replicas, when they run.
    pub fn fleet(&self) -> Option<&BenchFleet> {
        self.fleet.as_ref().and_then(|f| f.as_ref().ok())
    }

    /// Removes the decision log and the spools.
    pub fn remove_log(&self) {
        let _ = std::fs::remove_file(&self.log_path);
        for s in self.spools.lock().drain(..) {
            s.stop_shipping();
            let st = s.stats();
            println!(
                "spool {}: {} records in {} group commits ({:.1} per fsync), {} batches shipped",
                s.dir().display(),
                st.records,
                st.commits,
                st.records as f64 / st.commits.max(1) as f64,
                st.batches_shipped
            );
            let _ = std::fs::remove_dir_all(s.dir());
        }
    }

    /// A fresh spool for one row, shipping to the receiver on loopback.
    fn spool(&self, fsync: bool) -> Result<Arc<dyn DecisionSink>, String> {
        let n = self.spools.lock().len();
        let dir =
            std::env::temp_dir().join(format!("elevate-bench-spool-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = SpoolConfig::new(&dir);
        cfg.fsync = fsync;
        let spool = Spool::open(cfg).map_err(|e| e.to_string())?;
        let shipper = txn_token_client::HttpDecisionShipper::new(
            &self.receiver_url,
            None,
            Duration::from_secs(10),
        )
        .map_err(|e| e.to_string())?;
        spool
            .start_shipping(Arc::new(shipper), ShipConfig::default())
            .map_err(|e| e.to_string())?;
        self.spools.lock().push(spool.clone());
        Ok(Arc::new(spool))
    }

    /// The guarded side of one row: a fresh token cache, the TTS and PDP the
    /// scenario names, the decision log on disk, and a handler that tallies.
    pub fn processor(&self, sc: Scenario, tally: &Arc<Tally>) -> Result<Arc<Processor>, String> {
        let inner = match sc.tts {
            TtsMode::InProcess => self.test.in_process_tokens(),
            TtsMode::Http => self.test.http_tokens(),
            TtsMode::Fleet { replicas } => match &self.fleet {
                Some(Ok(f)) => f.tokens(&self.test, replicas)?,
                Some(Err(e)) => return Err(format!("TTS fleet: {e}")),
                None => return Err("the TTS fleet was not started".into()),
            },
        };
        let tokens: Arc<dyn TokenSource> = Arc::new(CachingTokenSource::new(
            inner,
            10_000,
            Duration::from_secs(30),
        ));
        let pdp: Arc<dyn PolicyDecisionPoint> = match sc.pdp {
            // The embedded Cedar PDP behind its per-version answer cache
            // (elevate_core::pdp_cache): one context's messages ask the same two questions.
            PdpMode::Local => Arc::new(CachingPdp::new(self.test.pdp.clone(), 10_000)),
            PdpMode::Remote => Arc::new(
                RemotePdp::new(&self.remote_pdp_url, self.test.pdp.version())
                    .map_err(|e| e.to_string())?,
            ),
        };
        let log: Arc<dyn DecisionSink> = match sc.log {
            LogMode::File => self.log.clone(),
            LogMode::Spool => self.spool(true)?,
            LogMode::SpoolNoFsync => self.spool(false)?,
        };
        let guard = self.test.guard_with(tokens, pdp, log);
        let t = tally.clone();
        let handler = handler_fn(move |msg: InboundMessage, _auth: AuthContext| {
            let t = t.clone();
            async move {
                t.mark(&msg.headers, false);
                Ok(())
            }
        });
        Ok(self.test.processor_on(guard, Arc::new(handler)))
    }

    /// The embedded Cedar PDP the guard asks, without the answer cache.
    pub fn cedar(&self) -> Arc<dyn PolicyDecisionPoint> {
        self.test.pdp.clone()
    }

    /// Prepares `n` messages (producer PDP check, stripping, a signed
    /// reference) for `destination`, numbered from `seq0`; with
    /// `payload_bytes`, each payload is padded (a `pad` string in the JSON)
    /// to exactly that size when it is larger than the order itself.
    pub async fn prepare(
        &self,
        sc: Scenario,
        destination: &str,
        seq0: usize,
        n: usize,
        payload_bytes: Option<usize>,
    ) -> Result<Vec<(Headers, Vec<u8>)>, String> {
        let audience = self.test.audience();
        let mut subject = self.test.subject(SUBJECT);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let seq = seq0 + i;
            let new_context = match sc.contexts {
                Contexts::Repeated => i % PER_CONTEXT == 0,
                Contexts::Distinct => true,
            };
            if new_context && i > 0 {
                subject = self.test.subject(SUBJECT);
            }
            let mut headers = Headers::new();
            headers.append(H_SEQ, seq.to_string());
            headers.append("content-type", "application/json");
            headers.append(
                "traceparent",
                format!("00-{}-00f067aa0ba902b7-01", uuid::Uuid::new_v4().simple()),
            );
            let payload = order_payload(seq, payload_bytes)?;
            let prepared = self
                .test
                .producer_in(sc.binding.mode())
                .prepare(
                    &self.test.publish_request(&subject, &audience, destination),
                    OutboundMessage { headers, payload },
                )
                .await
                .map_err(|e| format!("prepare: {e}"))?;
            out.push((prepared.headers, prepared.payload));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::order_payload;

    #[test]
    fn payloads_are_padded_to_the_exact_size_and_stay_json() {
        for want in [200, 10 * 1024, 512 * 1024] {
            for seq in [0, 7, 123_456] {
                let p = order_payload(seq, Some(want)).unwrap();
                assert_eq!(p.len(), want, "seq {seq}");
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
                assert_eq!(v["order"], seq);
            }
        }
        // smaller than the order itself: the order as it is
        let plain = order_payload(5, None).unwrap();
        assert_eq!(order_payload(5, Some(10)).unwrap(), plain);
        assert!(plain.len() < 100);
    }
}
