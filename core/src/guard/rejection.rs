//! Why a step of the pipeline stopped a message, before it is recorded.

use std::time::Duration;

use crate::verdict::Reason;

/// A step's refusal: the reason (which decides the verdict), operator
/// detail (never a token), and a server-suggested wait for a Retry.
#[derive(Debug)]
pub(crate) struct Rejection {
    pub(crate) reason: Reason,
    pub(crate) detail: Option<String>,
    pub(crate) retry_after: Option<Duration>,
}

impl Rejection {
    pub(crate) fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: Some(detail.into()),
            retry_after: None,
        }
    }
}

/// The outcome of one step.
pub(crate) type Step<T> = Result<T, Rejection>;
