//! A real Transaction Token Service over HTTP on loopback for tests, served
//! in this process so a test can stop it (an outage) and start it again on
//! the same port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use elevate_core::keys::SigningKey;
use elevate_core::scope::Scope;
use elevate_core::token::TokenSource;
use elevate_tts::{Issuer, IssuerSettings, RunningTts};
use txn_token_client::{TtsClient, TtsClientConfig};

use crate::env::TRUST_DOMAIN;

/// Scopes every test workload may be granted.
pub const TEST_SCOPES: &str =
    "test.process invoice.create order.process billing.charge notification.send";

/// The reference TTS on an ephemeral loopback port.
pub struct LoopbackTts {
    issuer: Arc<Issuer>,
    addr: SocketAddr,
    running: tokio::sync::Mutex<Option<RunningTts>>,
}

impl LoopbackTts {
    /// Starts a TTS with these workloads registered.
    pub async fn start(workloads: &[(&str, &SigningKey)]) -> LoopbackTts {
        let issuer = Issuer::generate(IssuerSettings::new(TRUST_DOMAIN))
            .unwrap_or_else(|e| panic!("TTS issuer: {e}"));
        let scopes = Scope::parse(TEST_SCOPES);
        for (id, key) in workloads {
            issuer
                .register_workload(id, key.public_jwk(), &scopes)
                .unwrap_or_else(|e| panic!("register {id}: {e}"));
        }
        let running =
            RunningTts::start(issuer.clone(), SocketAddr::from(([127, 0, 0, 1], 0)), false)
                .await
                .unwrap_or_else(|e| panic!("TTS listen on loopback: {e}"));
        LoopbackTts {
            issuer,
            addr: running.addr(),
            running: tokio::sync::Mutex::new(Some(running)),
        }
    }

    /// The issuer (register more workloads, rotate keys).
    pub fn issuer(&self) -> &Arc<Issuer> {
        &self.issuer
    }

    /// The token endpoint URL.
    pub fn token_endpoint(&self) -> String {
        format!("http://{}{}", self.addr, self.issuer.settings().token_path)
    }

    /// An HTTP client for `workload` authenticating with `key`.
    pub fn client(&self, workload: &str, key: &SigningKey) -> Arc<dyn TokenSource> {
        let mut cfg = TtsClientConfig::new(self.token_endpoint(), TRUST_DOMAIN, workload);
        cfg.request_timeout = Duration::from_secs(2);
        Arc::new(TtsClient::new(cfg, key.clone()).unwrap_or_else(|e| panic!("TTS client: {e}")))
    }

    /// Stops the HTTP service (connections are refused until `restart`).
    pub async fn stop(&self) {
        if let Some(r) = self.running.lock().await.take() {
            let _ = r.shutdown().await;
        }
    }

    /// Starts the HTTP service again on the same port.
    pub async fn restart(&self) {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return;
        }
        for _ in 0..50 {
            match RunningTts::start(self.issuer.clone(), self.addr, false).await {
                Ok(r) => {
                    *running = Some(r);
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        panic!("TTS could not listen on {} again", self.addr);
    }
}
