//! `elevate-config check FILE`: reads a workload configuration, builds
//! everything it names (keys, trust, TTS client, policy bundle, replay
//! store) and says what is wrong, naming the file, the key and the fix.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Elevate workload configuration.
#[derive(Parser)]
#[command(name = "elevate-config", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validates a configuration file (and its `ELEVATE_…` overrides).
    Check {
        /// The `elevate.toml` to check.
        file: PathBuf,
        /// Ignore `ELEVATE_…` environment overrides.
        #[arg(long)]
        no_env: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Check { file, no_env } = Cli::parse().command;
    let loaded = if no_env {
        elevate_config::Loaded::read_file_only(&file)
    } else {
        elevate_config::Loaded::read(&file)
    };
    let result = match loaded {
        Ok(l) => elevate_config::Workload::build(&l).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(w) => {
            println!(
                "{}: ok — workload {}, signing key {}, {} trusted producer key(s), replay {}",
                file.display(),
                w.id(),
                w.signing_key().get().kid(),
                w.trusted_keys().load().len(),
                w.replay_store()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
