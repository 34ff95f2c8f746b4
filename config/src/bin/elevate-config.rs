//! `elevate-config check FILE`: reads a workload configuration, builds
//! everything it names (keys, trust, TTS client, policy bundle, replay
//! store) and says what is wrong, naming the file, the key and the fix.
//! `elevate-config key new|public`: makes a workload signing key file and
//! the public key file the TTS registers (what a rotation needs).
//! `elevate-config decisions verify PATH…`: checks a local decision spool
//! directory, or walks the hash chain of shipped decision batches (files
//! of batches or entries, one per line, or gzipped HTTP bodies) and reports
//! gaps, duplicates, broken links and conflicts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use elevate_core::ctxbind::keys::KEY_WRAP_ALG;
use elevate_core::ctxbind::{KeyAgreementKey, audience_jwks};
use elevate_core::keys::{SigningAlg, SigningKey};

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
    /// Signing keys: make one, or print the public keys the TTS registers.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Decision logs: check a spool or a shipped chain.
    Decisions {
        #[command(subcommand)]
        command: DecisionsCommand,
    },
}

#[derive(Subcommand)]
enum DecisionsCommand {
    /// Exits 0 when every chain is intact, 1 when not, 2 on an unreadable path.
    Verify {
        /// Spool directories (checked on their own), or files of shipped
        /// batches / entries (walked together, per stream).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Writes a fresh private key (PKCS#8 PEM, mode 0600) to FILE; its
    /// `kid` is the file name without `.pem`. Refuses to overwrite.
    New {
        /// The key file, e.g. `keys/orders-api-2.pem`.
        file: PathBuf,
        /// `ES256` or `EdDSA` (signing keys), or `ECDH-ES+A256KW` (a
        /// consumer's key-agreement key, `[keys] agreement_keys`).
        #[arg(long, default_value = "ES256")]
        alg: String,
    },
    /// Prints the public keys of these private key files as a JWKS (the
    /// TTS's `jwk_file` for the workload; write it atomically). With
    /// `--alg ECDH-ES+A256KW`, the consumer's key-agreement keys for
    /// producers' `[producer] audience_keys` (each names `--workload` in `elevate_owner`).
    Public {
        /// The private key files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// `ES256`, `EdDSA` or `ECDH-ES+A256KW`.
        #[arg(long, default_value = "ES256")]
        alg: String,
        /// The workload the key-agreement keys belong to (with `--alg ECDH-ES+A256KW`).
        #[arg(long)]
        workload: Option<String>,
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
    match Cli::parse().command {
        Command::Check { file, no_env } => check(file, no_env).await,
        Command::Decisions {
            command: DecisionsCommand::Verify { paths },
        } => verify_decisions(&paths),
        Command::Key { command } => match key(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn key(command: KeyCommand) -> Result<(), String> {
    let parse = |alg: &str| {
        SigningAlg::parse(alg).ok_or_else(|| format!("unknown algorithm {alg}: use ES256 or EdDSA"))
    };
    let kid = |file: &Path| {
        file.file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
            .ok_or_else(|| format!("{}: the file name is the key id; give one", file.display()))
    };
    match command {
        KeyCommand::New { file, alg } if alg == KEY_WRAP_ALG => {
            let key = KeyAgreementKey::generate(kid(&file)?).map_err(|e| e.to_string())?;
            write_new(&file, key.to_pkcs8_pem())?;
            println!("{}: new {alg} key `{}`", file.display(), key.kid());
            Ok(())
        }
        KeyCommand::Public {
            files,
            alg,
            workload,
        } if alg == KEY_WRAP_ALG => {
            let workload = workload.ok_or("--workload: whose key-agreement keys these are")?;
            let mut keys = Vec::new();
            for file in &files {
                keys.push(
                    KeyAgreementKey::from_pem_file(kid(file)?, file)
                        .map_err(|e| format!("{}: {e}", file.display()))?,
                );
            }
            let entries: Vec<(&str, &KeyAgreementKey)> =
                keys.iter().map(|k| (workload.as_str(), k)).collect();
            println!("{}", audience_jwks(&entries));
            Ok(())
        }
        KeyCommand::New { file, alg } => {
            let key = SigningKey::generate(parse(&alg)?, kid(&file)?).map_err(|e| e.to_string())?;
            write_new(&file, key.to_pkcs8_pem().as_bytes())?;
            println!("{}: new {alg} key `{}`", file.display(), key.kid());
            Ok(())
        }
        KeyCommand::Public { files, alg, .. } => {
            let alg = parse(&alg)?;
            let mut keys = Vec::new();
            for file in &files {
                let key = SigningKey::from_pem_file(alg, kid(file)?, file)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                keys.push(serde_json::to_value(key.public_jwk()).map_err(|e| e.to_string())?);
            }
            println!("{}", serde_json::json!({ "keys": keys }));
            Ok(())
        }
    }
}

async fn check(file: PathBuf, no_env: bool) -> ExitCode {
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

fn verify_decisions(paths: &[PathBuf]) -> ExitCode {
    use elevate_core::decision::ChainVerifier;
    use elevate_core::decision::spool::verify_dir;
    let mut intact = true;
    let mut shipped = ChainVerifier::new();
    let mut any_file = false;
    for p in paths {
        if p.is_dir() {
            match verify_dir(p) {
                Ok(s) => println!(
                    "spool {}: stream {}, entries up to seq {} intact, shipped up to {}, {} segment(s), {} bytes",
                    p.display(),
                    s.stream,
                    s.head_seq,
                    s.shipped_seq,
                    s.segments,
                    s.used_bytes
                ),
                Err(e) => {
                    println!("{e}");
                    intact = false;
                }
            }
            continue;
        }
        match std::fs::read(p) {
            Ok(bytes) => {
                any_file = true;
                shipped.add_stored(&bytes);
            }
            Err(e) => {
                eprintln!("error: {}: {e}", p.display());
                return ExitCode::from(2);
            }
        }
    }
    if any_file {
        let report = shipped.report();
        print!("{report}");
        intact &= report.is_intact();
    }
    if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Writes a new private key file (mode 0600); refuses to overwrite one.
fn write_new(file: &Path, pem: &[u8]) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(file)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    std::io::Write::write_all(&mut f, pem).map_err(|e| format!("{}: {e}", file.display()))
}
