//! Runnable Elevate programs (see `src/bin`) and what they share: the trust
//! domain they run in ([`wiring`]), the guarded worker's printing handler and
//! end-of-run report ([`worker`]), and the remote AuthZEN PDP the benchmark
//! uses as its status-quo baseline ([`remote_pdp`]).

pub mod remote_pdp;
pub mod wiring;
pub mod worker;
