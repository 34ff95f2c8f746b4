//! `elevate`: the operator command line of Elevate.
//!
//! Exit codes scripts can rely on: 0 decoded (and verified when asked),
//! 1 a check failed (the reason is printed), 2 usage error or unreadable
//! input (the error says what to do).

mod inspect;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The `elevate` command line.
#[derive(Parser)]
#[command(
    name = "elevate",
    version,
    about = "Operate Elevate: inspect context references"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode a context reference (or a dead letter's headers), optionally verify it.
    Inspect(InspectArgs),
}

/// Arguments of `elevate inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// The reference (compact JWS); `-` or nothing reads stdin, which may
    /// also hold a dead letter's headers as a JSON object.
    pub reference: Option<String>,
    /// Workload JWKS file (as the key directory serves it) to verify against.
    #[arg(long, value_name = "FILE")]
    pub jwks: Option<PathBuf>,
    /// This consumer's audience (workload id); required with --jwks.
    #[arg(long, value_name = "ID")]
    pub audience: Option<String>,
    /// The message's `ztauth-ctx-bind` value (per-context mode).
    #[arg(long, value_name = "BINDING")]
    pub binding: Option<String>,
    /// The message payload, to check against the digest.
    #[arg(long, value_name = "FILE")]
    pub payload: Option<PathBuf>,
    /// The destination the message was read from.
    #[arg(long, value_name = "D")]
    pub destination: Option<String>,
    /// The consumer's key-agreement key (PKCS#8 PEM; kid = file stem).
    #[arg(long, value_name = "PEM")]
    pub agreement_key: Option<PathBuf>,
    /// Print a JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect(args) => match inspect::run(&args) {
            Ok(report) => {
                let out = if args.json {
                    render::json(&report)
                } else {
                    render::table(&report)
                };
                println!("{out}");
                if report.failed() {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("elevate inspect: {e}");
                ExitCode::from(2)
            }
        },
    }
}
