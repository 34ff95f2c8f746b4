//! Runnable Elevate programs (see `src/bin`) and what they share: the remote
//! AuthZEN PDP the benchmark uses as its status-quo baseline.

pub mod remote_pdp;
