//! One configuration file per workload (`elevate.toml`) and the builder that
//! turns it into the workload's guards.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let workload = elevate_config::Workload::from_file("elevate.toml").await?;
//! let handler = std::sync::Arc::new(elevate_core::handler_fn(|_msg, _auth| async { Ok(()) }));
//! let processor = workload.processor(handler); // hand it to a broker binding
//! # let _ = processor; Ok(()) }
//! ```
//!
//! The file names the workload once; its signing keys (PEM files, rotating),
//! whose keys it trusts (the TTS's key directory by default, or a JWKS
//! file), the TTS, the Cedar bundle, decision sinks, the replay store (on by
//! default), retries, dead-letter naming and the action per destination.
//! Every key can be overridden from the environment (`ELEVATE_TTS__URL`).
//! A wrong file gets a [`ConfigError`] naming the file, the key and the
//! fix; `elevate-config check FILE` validates one. The reference is
//! `docs/CONFIGURATION.md`; `config/elevate.example.toml` teaches every key.

pub mod actions;
pub mod build;
pub mod builder;
pub mod error;
pub mod file;
pub mod keyfiles;
pub mod load;
mod trust_file;

pub use build::Workload;
pub use builder::WorkloadBuilder;
pub use error::{ConfigError, ErrorKind};
pub use file::FileConfig;
pub use load::Loaded;
