//! The TTS as a fleet for the distinct-context rows: the `txn-token-service`
//! binary as two replicas (separate processes) on one PostgreSQL schema,
//! started with the test kit's fleet helpers ([`FleetStore`],
//! [`write_fleet_config`], [`TtsProcess`]). The guard's token client spreads
//! its exchanges round-robin over the replicas it is given
//! (`TtsClientConfig::replica_endpoints`): the one-replica row gives it the
//! first, the two-replica row both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use elevate_core::token::TokenSource;
use elevate_testing::env::{TRUST_DOMAIN, TestEnv};
use elevate_testing::tts::{
    FleetStore, TestOperator, TtsConfigDir, TtsProcess, write_fleet_config,
};

/// Replica names (the audit log's `replica`, the configuration files' names).
const REPLICAS: [&str; 2] = ["bench-a", "bench-b"];

/// Two `txn-token-service` replicas on one PostgreSQL schema (dropped at the end).
pub struct BenchFleet {
    replicas: Vec<TtsProcess>,
    _config: TtsConfigDir,
    _store: FleetStore,
}

/// The `txn-token-service` binary: `ELEVATE_TTS_BIN` when set (as the fleet
/// tests take it), else the one beside this benchmark's binary, built first
/// with the benchmark's profile (a no-op when it is up to date). Building it
/// with the benchmark package selected keeps the features the benchmark
/// built its dependencies with, so nothing but the binary is compiled.
///
/// # Errors
///
/// Says what is missing: the file `ELEVATE_TTS_BIN` names, or cargo, or a
/// build that failed.
pub fn tts_binary() -> Result<PathBuf, String> {
    if let Ok(bin) = std::env::var("ELEVATE_TTS_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "ELEVATE_TTS_BIN={} is not a file: build it with \
                 `cargo build --release -p elevate-tts --bin txn-token-service`",
                bin.display()
            ))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("where is the bench binary: {e}"))?;
    let profile_dir = exe.parent().ok_or("the bench binary has no directory")?;
    let target_dir = profile_dir
        .parent()
        .ok_or("the bench binary is not in a cargo target directory")?;
    let bin = profile_dir.join("txn-token-service");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "build",
        "-p",
        "elevate-bench",
        "-p",
        "elevate-tts",
        "--bin",
        "txn-token-service",
    ])
    .arg("--target-dir")
    .arg(target_dir)
    .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd.status().map_err(|e| {
        format!("cannot run {cargo} to build txn-token-service (or set ELEVATE_TTS_BIN): {e}")
    })?;
    if !status.success() || !bin.is_file() {
        return Err(format!(
            "building txn-token-service failed ({status}) or did not produce {}",
            bin.display()
        ));
    }
    Ok(bin)
}

impl BenchFleet {
    /// Builds (if needed) and starts both replicas, registering `env`'s
    /// producer and consumer in a fresh schema; they log at `warn`, as the
    /// benchmark's in-process TTS does.
    ///
    /// # Errors
    ///
    /// Says how to start PostgreSQL when it is not reachable, or why the
    /// binary cannot be had or a replica does not start (with its log).
    pub async fn start(env: &TestEnv) -> Result<BenchFleet, String> {
        let store = FleetStore::try_new()?;
        let bin = tokio::task::spawn_blocking(tts_binary)
            .await
            .map_err(|e| format!("building txn-token-service: {e}"))??;
        let workloads = env.workloads();
        let refs: Vec<_> = workloads.iter().collect();
        // The admin API is not used here; [admin] wants an operator.
        let operator = TestOperator::generate("bench");
        let (config, paths) = write_fleet_config(&refs, &store, &[&operator], &REPLICAS, |c| {
            c.trust_domain = TRUST_DOMAIN.into();
        });
        let replicas = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .zip(REPLICAS)
                .map(|(p, name)| {
                    TtsProcess::spawn_logging(&bin, p, None, "warn")
                        .map_err(|e| format!("TTS replica {name} ({}): {e}", bin.display()))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| format!("starting the TTS replicas: {e}"))??;
        Ok(BenchFleet {
            replicas,
            _config: config,
            _store: store,
        })
    }

    /// The consumer's tokens from the first `n` replicas.
    ///
    /// # Errors
    ///
    /// Says why the client cannot be built.
    pub fn tokens(&self, env: &TestEnv, n: usize) -> Result<Arc<dyn TokenSource>, String> {
        let endpoints: Vec<String> = self
            .replicas
            .iter()
            .take(n)
            .map(TtsProcess::token_endpoint)
            .collect();
        if endpoints.len() < n {
            return Err(format!(
                "{n} replicas asked for, {} running",
                endpoints.len()
            ));
        }
        env.fleet_tokens(&endpoints)
    }

    /// Tokens each replica issued so far, e.g. `bench-a 6391, bench-b 3195`.
    pub async fn issued_per_replica(&self) -> String {
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        for (name, r) in REPLICAS.iter().zip(&self.replicas) {
            let issued = r
                .metric(&http, "tts_exchanges_total{outcome=\"issued\"")
                .await;
            out.push(format!("{name} {issued}"));
        }
        out.join(", ")
    }
}
