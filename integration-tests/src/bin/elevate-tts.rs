//! The reference Transaction Token Service, built with this crate so its
//! tests can start it as a real process (`CARGO_BIN_EXE_elevate-tts`).

fn main() -> std::process::ExitCode {
    elevate_tts::cli::main_with_args(std::env::args_os())
}
