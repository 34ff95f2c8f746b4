//! Load measurement of the reference TTS: issuance rate over HTTP on loopback
//! with a few concurrent clients, and client round-trip latency (request,
//! client assertion, response checks and token verification) p50/p99.
//!
//! `cargo run --release -p elevate-tts --example tts_load [-- --requests 2000]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use elevate_core::ctxref::{ContextRefMinter, MintRequest, SubjectKind, VerifiedRef};
use elevate_core::keys::{SigningAlg, SigningKey, sha256_hex};
use elevate_core::scope::Scope;
use elevate_core::token::{TokenRequest, TokenSource};
use elevate_tts::{InProcessTts, Issuer, IssuerSettings, RunningTts};
use txn_token_client::{TtsClient, TtsClientConfig};

#[derive(Parser)]
struct Args {
    /// Requests per row.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrency levels (one client workload per concurrent task).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
}

const TD: &str = "load.example";

struct Row {
    mode: &'static str,
    concurrency: usize,
    ok: usize,
    failed: usize,
    elapsed: Duration,
    lat: Vec<Duration>,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

async fn run(
    mode: &'static str,
    sources: Vec<(Arc<dyn TokenSource>, VerifiedRef)>,
    total: usize,
) -> Row {
    let concurrency = sources.len();
    let per = total.div_ceil(concurrency);
    let start = Instant::now();
    let tasks: Vec<_> = sources
        .into_iter()
        .map(|(src, r)| {
            tokio::spawn(async move {
                let scope = Scope::parse("orders.read");
                let mut lat = Vec::with_capacity(per);
                let mut failed = 0;
                for _ in 0..per {
                    let t0 = Instant::now();
                    let req = TokenRequest {
                        reference: &r,
                        scope: &scope,
                        request_details: serde_json::json!({"source": {"topic": "orders"}}).into(),
                    };
                    match src.acquire(&req).await {
                        Ok(_) => lat.push(t0.elapsed()),
                        Err(e) => {
                            failed += 1;
                            eprintln!("request failed: {e}");
                        }
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut failed = 0;
    for t in tasks {
        if let Ok((l, f)) = t.await {
            lat.extend(l);
            failed += f;
        }
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    Row {
        mode,
        concurrency,
        ok: lat.len(),
        failed,
        elapsed,
        lat,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let issuer = Issuer::generate(IssuerSettings::new(TD))?;
    let producer_key = SigningKey::generate(SigningAlg::ES256, "producer")?;
    let producer = "spiffe://load.example/producer";
    issuer.register_workload(
        producer,
        producer_key.public_jwk(),
        &Scope::parse("orders.read"),
    )?;
    let minter = ContextRefMinter::new(producer, producer_key, Duration::from_secs(3600));
    let max_c = args.concurrency.iter().copied().max().unwrap_or(1);
    let mut consumers = Vec::new();
    for i in 0..max_c {
        let id = format!("spiffe://load.example/consumer-{i}");
        let key = SigningKey::generate(SigningAlg::ES256, format!("consumer-{i}"))?;
        issuer.register_workload(&id, key.public_jwk(), &Scope::parse("orders.read"))?;
        let minted = minter.mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: std::slice::from_ref(&id),
            scope: &Scope::parse("orders.read"),
            txn: &format!("txn-{i}"),
            destination: "orders",
            payload: b"{}",
        })?;
        let r = VerifiedRef {
            token_sha256: sha256_hex(minted.token.as_bytes()),
            token: minted.token,
            claims: minted.claims,
        };
        consumers.push((id, key, r));
    }
    let running =
        RunningTts::start(issuer.clone(), SocketAddr::from(([127, 0, 0, 1], 0)), false).await?;
    let endpoint = running.token_endpoint();

    let mut rows = Vec::new();
    for &c in &args.concurrency {
        let mut http_sources: Vec<(Arc<dyn TokenSource>, VerifiedRef)> = Vec::new();
        let mut local_sources: Vec<(Arc<dyn TokenSource>, VerifiedRef)> = Vec::new();
        for (id, key, r) in consumers.iter().take(c) {
            let cfg = TtsClientConfig::new(&endpoint, TD, id);
            let client = TtsClient::new(cfg, key.clone())?;
            // warm up: connection and JWKS
            let scope = Scope::parse("orders.read");
            let _ = client
                .acquire(&TokenRequest {
                    reference: r,
                    scope: &scope,
                    request_details: serde_json::json!({}).into(),
                })
                .await;
            http_sources.push((Arc::new(client), r.clone()));
            local_sources.push((
                Arc::new(InProcessTts::new(issuer.clone(), id, key.clone())),
                r.clone(),
            ));
        }
        rows.push(run("http", http_sources, args.requests).await);
        rows.push(run("in-process", local_sources, args.requests).await);
    }
    running.shutdown().await?;

    println!(
        "cores: {}  requests/row: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        args.requests
    );
    println!(
        "{:<11} {:>5} {:>7} {:>6} {:>10} {:>9} {:>9} {:>9}",
        "mode", "conc", "ok", "failed", "tokens/s", "p50 ms", "p99 ms", "max ms"
    );
    for r in &rows {
        println!(
            "{:<11} {:>5} {:>7} {:>6} {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
            r.mode,
            r.concurrency,
            r.ok,
            r.failed,
            r.ok as f64 / r.elapsed.as_secs_f64(),
            pct(&r.lat, 0.50),
            pct(&r.lat, 0.99),
            pct(&r.lat, 1.0),
        );
    }
    Ok(())
}
