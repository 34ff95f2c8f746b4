//! `elevate-bundle`: build, sign, verify, inspect and publish signed Cedar
//! policy bundles. Exit codes: 0 ok, 1 usage or I/O problem, 2 a bundle
//! refused (unsigned, bad signature, tampered, invalid).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use elevate_bundle::{archive, signers_from_jwks_file};
use elevate_cedar::Bundle;
use elevate_core::keys::{SigningAlg, SigningKey};

/// Signed Cedar policy bundles for Elevate.
#[derive(Parser)]
#[command(name = "elevate-bundle", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validates a bundle directory and writes it as a signed archive.
    Build {
        /// The bundle directory (`*.cedar`, one `*.cedarschema`, `entities.json`).
        dir: PathBuf,
        /// The revision (must grow with every published bundle).
        #[arg(long)]
        revision: u64,
        /// The bundle-signing key (PKCS#8 PEM; kid = file name without `.pem`).
        #[arg(long)]
        key: PathBuf,
        /// `ES256` or `EdDSA`.
        #[arg(long, default_value = "ES256")]
        alg: String,
        /// A name for operators (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// The archive to write.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Verifies an archive against trusted bundle-signing keys and validates it.
    Verify {
        /// The archive.
        archive: PathBuf,
        /// The trusted signers (a JWKS file).
        #[arg(long)]
        keys: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prints an archive's manifest without verifying it.
    Inspect {
        /// The archive.
        archive: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Publishes an archive: to a file path (atomically; what a static HTTP
    /// server serves) or to `nats://host:port/<bucket>/<object>` (JetStream
    /// Object Store, bucket created if missing).
    Publish {
        /// The archive.
        archive: PathBuf,
        /// Where.
        #[arg(long)]
        to: String,
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
    match run(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(e)) => {
            eprintln!("refused: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Refused(String),
    Other(String),
}

fn other(e: impl std::fmt::Display) -> Failure {
    Failure::Other(e.to_string())
}

fn refused(e: impl std::fmt::Display) -> Failure {
    Failure::Refused(e.to_string())
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| other(format!("{}: {e}", path.display())))
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Build {
            dir,
            revision,
            key,
            alg,
            name,
            out,
        } => {
            let alg =
                SigningAlg::parse(&alg).ok_or_else(|| other(format!("unknown algorithm {alg}")))?;
            let kid = key
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| other("the key file's name is its key id"))?;
            let key = SigningKey::from_pem_file(alg, kid, &key).map_err(other)?;
            let files = elevate_cedar::read_bundle_files(&dir).map_err(refused)?;
            let bundle = Bundle::from_files(&dir.display().to_string(), &files).map_err(refused)?;
            let name = name.unwrap_or_else(|| {
                dir.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("bundle")
                    .to_string()
            });
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let bytes = archive::build(&name, revision, created, &files, &key).map_err(refused)?;
            let (manifest, hash, _) = archive::peek(&bytes).map_err(refused)?;
            write_atomically(&out, &bytes)?;
            println!(
                "{}: bundle {name} revision {revision}, version {}, {} files, {} policies, signed by {}",
                out.display(),
                &hash[..16],
                manifest.files.len(),
                bundle.policy_ids().count(),
                key.kid()
            );
            Ok(())
        }
        Command::Verify {
            archive: path,
            keys,
            json,
        } => {
            let signers = signers_from_jwks_file(&keys).map_err(other)?;
            let bytes = read(&path)?;
            let opened = archive::open(&bytes, &signers).map_err(refused)?;
            let bundle =
                Bundle::from_files(&path.display().to_string(), &opened.files).map_err(refused)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true,
                        "revision": opened.manifest.revision,
                        "version": &opened.manifest_sha256[..16],
                        "manifest_sha256": opened.manifest_sha256,
                        "signed_by": opened.signed_by,
                        "files": opened.manifest.files,
                        "policies": bundle.policy_ids().map(|(id, f)| serde_json::json!({"id": id, "file": f})).collect::<Vec<_>>(),
                    })
                );
            } else {
                println!(
                    "{}: ok — revision {}, version {}, signed by {}, {} files, {} policies",
                    path.display(),
                    opened.manifest.revision,
                    &opened.manifest_sha256[..16],
                    opened.signed_by,
                    opened.files.len(),
                    bundle.policy_ids().count()
                );
            }
            Ok(())
        }
        Command::Inspect {
            archive: path,
            json,
        } => {
            let (manifest, hash, kid) = archive::peek(&read(&path)?).map_err(refused)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"manifest": manifest, "manifest_sha256": hash, "kid": kid})
                );
            } else {
                println!(
                    "bundle {} revision {} created {} version {} (signature not verified; kid {})",
                    manifest.bundle,
                    manifest.revision,
                    manifest.created,
                    &hash[..16],
                    kid.as_deref().unwrap_or("none")
                );
                for f in &manifest.files {
                    println!("  {:<32} {:>8} bytes  sha256 {}", f.name, f.size, f.sha256);
                }
            }
            Ok(())
        }
        Command::Publish { archive: path, to } => {
            let bytes = read(&path)?;
            // Never publish what a PDP would refuse to read.
            archive::peek(&bytes).map_err(refused)?;
            if let Some(rest) = to.strip_prefix("nats://") {
                let (server, target) = rest
                    .split_once('/')
                    .ok_or_else(|| other("expected nats://host:port/<bucket>/<object>"))?;
                let (bucket, object) = target
                    .split_once('/')
                    .ok_or_else(|| other("expected nats://host:port/<bucket>/<object>"))?;
                let js = async_nats::jetstream::new(
                    async_nats::connect(format!("nats://{server}"))
                        .await
                        .map_err(|e| other(format!("NATS at {server}: {e}")))?,
                );
                let store = match js.get_object_store(bucket).await {
                    Ok(s) => s,
                    Err(_) => js
                        .create_object_store(async_nats::jetstream::object_store::Config {
                            bucket: bucket.to_string(),
                            description: Some("Elevate signed policy bundles".into()),
                            ..Default::default()
                        })
                        .await
                        .map_err(other)?,
                };
                let mut data = bytes.as_slice();
                let info = store.put(object, &mut data).await.map_err(other)?;
                println!(
                    "published to {to} ({} bytes, digest {})",
                    info.size,
                    info.digest.unwrap_or_default()
                );
            } else {
                write_atomically(&PathBuf::from(&to), &bytes)?;
                println!("published to {to} ({} bytes)", bytes.len());
            }
            Ok(())
        }
    }
}

fn write_atomically(path: &PathBuf, bytes: &[u8]) -> Result<(), Failure> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| other(format!("{}: {e}", path.display())))
}
