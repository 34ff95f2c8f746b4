//! The reference Transaction Token Service: `txn-token-service --config FILE`.

fn main() -> std::process::ExitCode {
    elevate_tts::cli::main_with_args(std::env::args_os())
}
