//! Runnable Elevate programs (see `src/bin`) and what they share: the trust
//! domain they run in ([`wiring`]) and the guarded worker's printing handler
//! and end-of-run report ([`worker`]). The benchmark is its own crate,
//! `elevate-bench` (`bench/`).

pub mod wiring;
pub mod worker;
