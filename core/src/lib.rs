//! Elevate core: zero-trust authorization for asynchronous workloads.
//!
//! A producer strips credentials and attaches a signed, message-bound
//! context reference ([`producer`]); a consumer verifies it, obtains a fresh
//! Transaction Token, runs trust elevation at a local PDP, records the
//! decision ([`guard`]) and only then dispatches; denied and broken messages
//! are dead-lettered ([`settle`]). One consumer runtime ([`runtime`]) owns
//! concurrency, ordering, backpressure, panics, shutdown and the start
//! checks for every broker. Broker crates implement three small traits,
//! [`runtime::Source`], [`settle::Delivery`] and
//! [`settle::DeadLetterPublisher`], and nothing else.

pub mod admission;
pub mod auth;
pub mod ctxbind;
pub mod ctxref;
pub mod deadletter;
pub mod decision;
pub mod guard;
pub mod jws;
pub mod keys;
pub mod memory;
pub mod message;
pub mod pdp;
pub mod pdp_cache;
pub mod producer;
pub mod replay;
#[cfg(feature = "redis")]
pub mod replay_redis;
pub mod retry;
pub mod runtime;
pub mod scope;
pub mod settle;
pub mod strip;
pub mod supervise;
pub mod token;
pub mod token_cache;
pub mod verdict;

pub use auth::AuthContext;
pub use ctxref::{
    CTX_REF_HEADER, ContextRefClaims, ContextRefMinter, ContextRefVerifier, SubjectKind,
    VerifyPolicy,
};
pub use guard::{FixedAction, Guard, GuardDecision, Refusal};
pub use message::{Coordinates, Headers, InboundMessage, OutboundMessage};
pub use runtime::{Runtime, Source};
pub use settle::{
    DeadLetterPublisher, Delivery, Handler, HandlerError, Outcome, Processor, handler_fn,
};
pub use verdict::{Reason, Verdict};

/// The current time as RFC 3339 with milliseconds (UTC).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
