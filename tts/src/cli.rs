//! The `txn-token-service` command line: load a TOML configuration, start the
//! HTTP service (HTTPS with `[tls]`), print `listening on http://ADDR` (or
//! `https://ADDR`) as the first stdout line,
//! reload workload key files when they change (every `key_reload_secs`),
//! run until Ctrl-C or SIGTERM.

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use elevate_core::keys::SigningAlg;

use crate::admin::AdminApi;
use crate::fleet::Fleet;
use crate::{Issuer, KeyFileWatcher, RunningTts, ServerTls, ServiceConfig};

/// Command line of the reference Transaction Token Service.
#[derive(Debug, Parser)]
#[command(
    name = "txn-token-service",
    about = "Elevate's reference OAuth Transaction Token Service (draft-ietf-oauth-transaction-tokens)"
)]
pub struct Args {
    /// The TOML configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Overrides the configured listen address (e.g. 127.0.0.1:0).
    #[arg(long)]
    pub listen: Option<String>,
    /// Overrides the configured `signing_alg`: `ES256` or `EdDSA`, the
    /// algorithm of the Txn-Token signing key (generated, or read from
    /// `signing_key_pem`, which must then hold a key of it).
    #[arg(long, value_parser = parse_signing_alg)]
    pub signing_alg: Option<SigningAlg>,
    /// Log filter when RUST_LOG is unset.
    #[arg(long, default_value = "info")]
    pub log: String,
}

/// `ES256` or `EdDSA` (the JOSE names, exactly); anything else is refused.
fn parse_signing_alg(s: &str) -> Result<SigningAlg, String> {
    SigningAlg::parse(s).ok_or_else(|| format!("{s:?}: use ES256 or EdDSA"))
}

/// Runs the service with these arguments (the binaries call this).
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("txn-token-service: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("txn-token-service: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut cfg = ServiceConfig::load(&args.config).map_err(|e| e.to_string())?;
    if let Some(alg) = args.signing_alg {
        cfg.signing_alg = alg;
    }
    let base = args
        .config
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let listen = args.listen.as_deref().unwrap_or(&cfg.listen);
    let listen: SocketAddr = listen
        .parse()
        .map_err(|e| format!("listen address {listen:?}: {e}"))?;
    let issuer = Issuer::from_config(&cfg, &base).map_err(|e| e.to_string())?;
    if let Some(a) = &cfg.admin {
        issuer.set_admin(AdminApi::from_config(a, &base).map_err(|e| e.to_string())?);
    }
    if cfg.store.is_some() {
        Fleet::attach(&issuer, &cfg, &base)
            .await
            .map_err(|e| e.to_string())?;
    }
    let started = match &cfg.tls {
        Some(t) => {
            txn_token_client::install_crypto_provider();
            let tls = ServerTls::load(t, &base).map_err(|e| e.to_string())?;
            RunningTts::start_tls(issuer, listen, cfg.admin_endpoints, tls).await
        }
        None => RunningTts::start(issuer, listen, cfg.admin_endpoints).await,
    };
    let mut running = started.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    if cfg.store.is_some() {
        // The store is the registry: workload keys change through the admin API.
        running.keep_fleet_current();
    } else {
        running.watch_key_files(KeyFileWatcher::from_config(&cfg, &base));
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", running.base_url());
        let _ = writeln!(out, "token endpoint {}", running.token_endpoint());
        let _ = writeln!(out, "jwks {}", running.jwks_url());
        let _ = writeln!(out, "workload jwks {}", running.workload_jwks_url());
        let _ = out.flush();
    }
    running
        .run_until(shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}
