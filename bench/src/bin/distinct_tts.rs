//! Cheaper distinct contexts (issue 16 item 3): what one Txn-Token exchange
//! per message costs the guarded consumer, A/B on the same machine in one
//! run, by how the guard reaches the TTS and how the TTS signs.
//!
//! Every message is its own origin transaction (the main benchmark's
//! "distinct ctx" scenario), so every message costs an exchange: the
//! client's authentication (a fresh `private_key_jwt` assertion, Ed25519
//! with the test consumer's key, or nothing with `tls_client_auth`), the
//! TTS's checks (assertion signature, the context reference's ES256
//! signature) and its Txn-Token signature, and the client's verification of
//! that token; on top the guard verifies the reference (ES256) as for every
//! message. Variants: the TTS in process or over HTTP on loopback (plain,
//! TLS with an assertion, mTLS without one), signing ES256 or EdDSA. Each
//! variant has its own TTS (an `elevate_tts::Issuer` with the producer and
//! consumer of the test kit registered) and a fresh token cache; the rest of
//! the guard (embedded Cedar behind its answer cache, the decision log
//! written and flushed to a file) is the main benchmark's.
//!
//! Columns: guarded msgs/s (drain of a backlog of N, first to last handler
//! call) and process CPU µs per message (getrusage, TTS included: it runs in
//! this process), each round separately and the median, with the 1-minute
//! load average before and after each row. Rounds run the variants in
//! alternating order so that a load drift does not favour one.
//!
//! ```sh
//! cargo run --release -p elevate-bench --bin distinct_tts -- [--messages N] [--rounds R] \
//!     [--brokers memory,nats] [--only TEXT] [--concurrency C]
//! ```

#[path = "../tally.rs"]
#[allow(dead_code)]
mod tally;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use elevate_core::decision::{DecisionSink, FileSink};
use elevate_core::jws;
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::pdp::PolicyDecisionPoint;
use elevate_core::pdp_cache::CachingPdp;
use elevate_core::scope::Scope;
use elevate_core::settle::Processor;
use elevate_core::token::{TXN_TOKEN_TYP, TokenSource};
use elevate_core::token_cache::CachingTokenSource;
use elevate_core::{AuthContext, Headers, InboundMessage, OutboundMessage, handler_fn};
use elevate_testing::binding::{BrokerBinding, ConsumerOptions};
use elevate_testing::env::{CONSUMER, TRUST_DOMAIN, TestEnv};
use elevate_testing::memory::MemoryBinding;
use elevate_testing::nats::{NatsBinding, NatsMode};
use elevate_testing::tts_env::TEST_SCOPES;
use elevate_tts::{InProcessTts, Issuer, IssuerSettings, RunningTts, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use txn_token_client::protocol::ClientAuthMethod;
use txn_token_client::{TtsClient, TtsClientConfig};

use tally::{H_SEQ, Tally, cpu_time, stamp};

/// A/B of the ways a distinct context gets its Txn-Token.
#[derive(Debug, Parser)]
#[command(name = "distinct_tts")]
struct Args {
    /// Messages per row (each its own context).
    #[arg(long, default_value_t = 3000)]
    messages: usize,
    /// Rounds of every variant (each printed, then the median).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Brokers: memory, nats.
    #[arg(long, value_delimiter = ',', default_value = "memory")]
    brokers: Vec<String>,
    /// Only the variants whose label contains this text.
    #[arg(long)]
    only: Option<String>,
    /// Messages in flight per consumer.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// NATS URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
}

/// How the guard reaches the TTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// The issuer called in process (still with a client assertion).
    InProcess,
    /// HTTP on loopback, `private_key_jwt`.
    Http,
    /// HTTPS on loopback (server certificate only), `private_key_jwt`.
    Https,
    /// HTTPS on loopback with the consumer's certificate (`tls_client_auth`): no assertion.
    Mtls,
}

/// One variant: transport and the TTS's signing algorithm.
#[derive(Debug, Clone, Copy)]
struct Variant {
    transport: Transport,
    alg: SigningAlg,
}

impl Variant {
    fn label(&self) -> String {
        let t = match self.transport {
            Transport::InProcess => "TTS in-process, assertion",
            Transport::Http => "TTS HTTP, assertion",
            Transport::Https => "TTS HTTPS, assertion",
            Transport::Mtls => "TTS HTTPS, mTLS (no assertion)",
        };
        format!("{t}, TTS signs {}", self.alg.as_str())
    }
}

fn variants() -> Vec<Variant> {
    use SigningAlg::*;
    use Transport::*;
    [
        (InProcess, ES256),
        (InProcess, EdDSA),
        (Http, ES256),
        (Http, EdDSA),
        (Https, ES256),
        (Mtls, ES256),
        (Mtls, EdDSA),
    ]
    .into_iter()
    .map(|(transport, alg)| Variant { transport, alg })
    .collect()
}

/// The test PKI: a CA, the TTS's server certificate (127.0.0.1) and the
/// consumer's X.509-SVID-like client certificate (its SPIFFE id as URI SAN).
struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    /// Client certificate then key, as spiffe-helper writes an SVID.
    consumer_svid: String,
}

impl Pki {
    fn new() -> Result<Pki, String> {
        let e = |what: &'static str| move |err: rcgen::Error| format!("{what}: {err}");
        let ca_key = KeyPair::generate().map_err(e("CA key"))?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e("CA"))?;
        p.distinguished_name.push(DnType::CommonName, "bench CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = p.self_signed(&ca_key).map_err(e("CA cert"))?;
        let ca = rcgen::Issuer::new(p, ca_key);
        let leaf = |mut p: CertificateParams| -> Result<(String, String), String> {
            let key = KeyPair::generate().map_err(e("leaf key"))?;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = p.signed_by(&key, &ca).map_err(e("leaf cert"))?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_string()]).map_err(e("server"))?;
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (server_cert, server_key) = leaf(server)?;
        let mut client = CertificateParams::new(Vec::<String>::new()).map_err(e("client"))?;
        client.subject_alt_names = vec![SanType::URI(
            CONSUMER.try_into().map_err(e("client URI SAN"))?,
        )];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (cert, key) = leaf(client)?;
        Ok(Pki {
            ca_pem: ca_cert.pem(),
            server_cert,
            server_key,
            consumer_svid: format!("{cert}{key}"),
        })
    }
}

/// A TTS for one variant and the token source the guard uses with it.
struct VariantTts {
    tokens: Arc<dyn TokenSource>,
    _running: Option<RunningTts>,
}

async fn start_tts(test: &TestEnv, pki: &Pki, v: Variant) -> Result<VariantTts, String> {
    let mut settings = IssuerSettings::new(TRUST_DOMAIN);
    settings.signing_alg = v.alg;
    let issuer = Issuer::generate(settings).map_err(|e| format!("issuer: {e}"))?;
    let scopes = Scope::parse(TEST_SCOPES);
    let workloads = test.workloads();
    for w in &workloads {
        issuer
            .register_workload(&w.id, w.key.public_jwk(), &scopes)
            .map_err(|e| format!("register {}: {e}", w.id))?;
    }
    let consumer_key: SigningKey = workloads
        .iter()
        .find(|w| w.id == CONSUMER)
        .map(|w| w.key.clone())
        .ok_or("the test kit has no consumer workload")?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    if v.transport == Transport::InProcess {
        return Ok(VariantTts {
            tokens: Arc::new(InProcessTts::new(issuer, CONSUMER, consumer_key)),
            _running: None,
        });
    }
    let running = match v.transport {
        Transport::Http => RunningTts::start(issuer.clone(), loopback, false).await,
        _ => {
            let client_ca = (v.transport == Transport::Mtls).then_some(pki.ca_pem.as_bytes());
            if client_ca.is_some()
                && !issuer.set_workload_auth_methods(CONSUMER, &[ClientAuthMethod::TlsClientAuth])
            {
                return Err("the consumer is not registered".into());
            }
            let tls = ServerTls::from_pem(
                pki.server_cert.as_bytes(),
                pki.server_key.as_bytes(),
                client_ca,
            )
            .map_err(|e| format!("TLS: {e}"))?;
            RunningTts::start_tls(issuer.clone(), loopback, false, tls).await
        }
    }
    .map_err(|e| format!("TTS on loopback: {e}"))?;
    let mut cfg = TtsClientConfig::new(running.token_endpoint(), TRUST_DOMAIN, CONSUMER);
    cfg.request_timeout = Duration::from_secs(5);
    if v.transport != Transport::Http {
        cfg.root_ca_pem = Some(pki.ca_pem.clone().into_bytes());
    }
    if v.transport == Transport::Mtls {
        cfg.auth = ClientAuthMethod::TlsClientAuth;
        cfg.mtls_identity_pem = Some(pki.consumer_svid.clone().into_bytes());
    }
    let client = TtsClient::new(cfg, consumer_key).map_err(|e| format!("TTS client: {e}"))?;
    Ok(VariantTts {
        tokens: Arc::new(client),
        _running: Some(running),
    })
}

/// `n` messages for `destination`, each its own origin transaction.
async fn prepare(
    test: &TestEnv,
    destination: &str,
    n: usize,
) -> Result<Vec<(Headers, Vec<u8>)>, String> {
    let audience = test.audience();
    let mut out = Vec::with_capacity(n);
    for seq in 0..n {
        let subject = test.subject("carol");
        let mut headers = Headers::new();
        headers.append(H_SEQ, seq.to_string());
        headers.append("content-type", "application/json");
        let payload = serde_json::to_vec(&serde_json::json!({
            "order": seq, "amount": 120 + (seq % 50), "currency": "EUR",
            "lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}]
        }))
        .map_err(|e| e.to_string())?;
        let prepared = test
            .producer
            .prepare(
                &test.publish_request(&subject, &audience, destination),
                OutboundMessage { headers, payload },
            )
            .await
            .map_err(|e| format!("prepare: {e}"))?;
        out.push((prepared.headers, prepared.payload));
    }
    Ok(out)
}

/// One measured drain.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rate: f64,
    cpu_us: f64,
    load_before: f64,
    load_after: f64,
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

#[allow(clippy::too_many_arguments)]
async fn drain(
    test: &TestEnv,
    pki: &Pki,
    broker: &dyn BrokerBinding,
    log: &Arc<FileSink>,
    v: Variant,
    row: usize,
    n: usize,
    concurrency: usize,
) -> Result<Sample, String> {
    let ep = broker.setup(&format!("distinct-tts-{row}")).await?;
    let msgs = prepare(test, &ep.destination, n).await?;
    broker
        .publish_batch(
            &ep,
            msgs.iter().map(|(h, p)| (stamp(h), p.clone())).collect(),
        )
        .await?;
    let tts = start_tts(test, pki, v).await?;
    let load_before = load1();
    let tally = Tally::new(n);
    let cpu0 = cpu_time();
    let tokens: Arc<dyn TokenSource> = Arc::new(CachingTokenSource::new(
        tts.tokens.clone(),
        10_000,
        Duration::from_secs(30),
    ));
    let pdp: Arc<dyn PolicyDecisionPoint> = Arc::new(CachingPdp::new(test.pdp.clone(), 10_000));
    let sink: Arc<dyn DecisionSink> = log.clone();
    let guard = test.guard_with(tokens, pdp, sink);
    let t = tally.clone();
    let handler = handler_fn(move |msg: InboundMessage, _auth: AuthContext| {
        let t = t.clone();
        async move {
            t.mark(&msg.headers, false);
            Ok(())
        }
    });
    let processor: Arc<Processor> = test.processor_on(guard, Arc::new(handler));
    let t = tally.clone();
    let opts = ConsumerOptions {
        concurrency: Some(concurrency),
        redeliver_after: Some(Duration::from_secs(30)),
        dead_letter_tap: Some(Arc::new(move |letter| t.mark(&letter.headers, true))),
    };
    let run = broker.start_consumer_with(&ep, processor, &opts).await?;
    let ok = tally
        .wait_for(
            n,
            Duration::from_secs(30) + Duration::from_millis(n as u64 * 5),
        )
        .await;
    let cpu_us = (cpu_time() - cpu0).as_secs_f64() * 1e6 / n as f64;
    let rate = tally.throughput().unwrap_or(f64::NAN);
    let load_after = load1();
    run.stop().await;
    broker.teardown(&ep).await;
    if !ok || tally.handled() != n || tally.dead() > 0 {
        return Err(format!(
            "handled {} + dead-lettered {} of {n}",
            tally.handled(),
            tally.dead()
        ));
    }
    Ok(Sample {
        rate,
        cpu_us,
        load_before,
        load_after,
    })
}

/// Median µs of one call of `f`, over 5 batches of ~60 ms.
fn time_us(mut f: impl FnMut()) -> f64 {
    let mut per = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut calls = 0u32;
        while t.elapsed() < Duration::from_millis(60) {
            f();
            calls += 1;
        }
        per.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(calls));
    }
    per.sort_by(f64::total_cmp);
    per[2]
}

/// What one Txn-Token signature and verification cost with each algorithm
/// (the project's `jws` over claims of a real token's size).
fn signature_floor() -> Result<Vec<(SigningAlg, f64, f64)>, String> {
    let claims = serde_json::json!({
        "iat": 1_700_000_000, "exp": 1_700_000_060, "aud": TRUST_DOMAIN,
        "txn": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "sub": "carol",
        "scope": "test.process", "req_wl": CONSUMER, "jti": "5f0c7a53-2d7e-4c4b-9d1e-3b8f6a0c2e71",
        "tctx": {"txn": "0193a1b2", "producer": "spiffe://elevate.example/orders-api",
                 "chain": ["spiffe://elevate.example/orders-api"]},
        "rctx": {"req_wl": CONSUMER}
    });
    let mut out = Vec::new();
    for alg in [SigningAlg::ES256, SigningAlg::EdDSA] {
        let key = SigningKey::generate(alg, "floor").map_err(|e| e.to_string())?;
        let mut keys = KeySet::new();
        keys.insert_signing_key(&key).map_err(|e| e.to_string())?;
        let token = jws::sign(&key, TXN_TOKEN_TYP, &claims).map_err(|e| e.to_string())?;
        let sign = time_us(|| {
            let _ = std::hint::black_box(jws::sign(&key, TXN_TOKEN_TYP, &claims));
        });
        let verify = time_us(|| {
            let ok = jws::parse(&token, TXN_TOKEN_TYP)
                .map(|p| p.verify(&keys).is_ok())
                .unwrap_or(false);
            std::hint::black_box(ok);
        });
        out.push((alg, sign, verify));
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,elevate::decision=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    txn_token_client::install_crypto_provider();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("distinct_tts: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let n = args.messages.max(2);
    let test = TestEnv::start().await;
    let pki = Pki::new()?;
    let log_path =
        std::env::temp_dir().join(format!("elevate-distinct-tts-{}.jsonl", std::process::id()));
    let log = Arc::new(FileSink::open(&log_path).map_err(|e| e.to_string())?);
    println!("load average at start: {:.2}", load1());
    println!("Txn-Token signature floor (in process, median of 5 batches):");
    for (alg, sign, verify) in signature_floor()? {
        println!(
            "  {:6} sign {sign:5.1} µs  verify {verify:5.1} µs",
            alg.as_str()
        );
    }
    let selected: Vec<Variant> = variants()
        .into_iter()
        .filter(|v| args.only.as_deref().is_none_or(|o| v.label().contains(o)))
        .collect();
    let mut row = 0;
    let mut table = Vec::new();
    for name in &args.brokers {
        let broker: Box<dyn BrokerBinding> = match name.as_str() {
            "memory" => Box::new(MemoryBinding::new().await),
            "nats" => Box::new(NatsBinding::connect_to(&args.nats_url, NatsMode::JetStream).await?),
            other => return Err(format!("unknown broker {other:?} (memory, nats)")),
        };
        // Untimed warm-up: the first row of a process runs on a fresh heap.
        if let Some(v) = selected.first() {
            row += 1;
            let w = drain(
                &test,
                &pki,
                broker.as_ref(),
                &log,
                *v,
                row,
                n,
                args.concurrency,
            )
            .await?;
            println!(
                "{name:6} warm-up ({}): {:.0} msgs/s, discarded",
                v.label(),
                w.rate
            );
        }
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); selected.len()];
        for round in 0..args.rounds {
            let mut order: Vec<usize> = (0..selected.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                row += 1;
                let v = selected[i];
                let s = drain(
                    &test,
                    &pki,
                    broker.as_ref(),
                    &log,
                    v,
                    row,
                    n,
                    args.concurrency,
                )
                .await
                .map_err(|e| format!("{name} {}: {e}", v.label()))?;
                println!(
                    "{name:6} round {} {:48} {:6.0} msgs/s {:5.0} µs CPU/msg  load {:.2} → {:.2}",
                    round + 1,
                    v.label(),
                    s.rate,
                    s.cpu_us,
                    s.load_before,
                    s.load_after
                );
                samples[i].push(s);
            }
        }
        for (v, s) in selected.iter().zip(samples) {
            table.push((name.clone(), *v, s));
        }
    }
    let _ = std::fs::remove_file(&log_path);
    println!(
        "\n| broker | distinct ctx, variant | msgs/s (rounds) | median msgs/s | CPU µs/msg (rounds) | median CPU µs/msg | load (1 min) |"
    );
    println!("|---|---|---|---:|---|---:|---|");
    for (broker, v, s) in &table {
        let rates: Vec<String> = s.iter().map(|x| format!("{:.0}", x.rate)).collect();
        let cpus: Vec<String> = s.iter().map(|x| format!("{:.0}", x.cpu_us)).collect();
        let loads = s.iter().flat_map(|x| [x.load_before, x.load_after]);
        let (lo, hi) = loads.fold((f64::MAX, f64::MIN), |(a, b), l| (a.min(l), b.max(l)));
        println!(
            "| {broker} | {} | {} | {:.0} | {} | {:.0} | {lo:.1}–{hi:.1} |",
            v.label(),
            rates.join(" / "),
            median(s.iter().map(|x| x.rate).collect()),
            cpus.join(" / "),
            median(s.iter().map(|x| x.cpu_us).collect()),
        );
    }
    println!("load average at the end: {:.2}", load1());
    Ok(())
}
