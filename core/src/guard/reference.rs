//! Step 2: exactly one context reference, verified (signature, type,
//! audience, issuer, lifetime, destination, payload digest, chain); in the
//! per-context mode with at most one message binding (`ztauth-ctx-bind`),
//! whose MAC carries the destination and digest. A key
//! the verifier does not know is asked for once through its
//! [`KeyRefresh`](crate::ctxref::KeyRefresh), when it has one (a producer
//! that just rotated its key); a refresh that fails changes nothing.

use super::rejection::{Rejection, Step};
use crate::ctxbind::CTX_BIND_HEADER;
use crate::ctxref::{CTX_REF_HEADER, ContextRefVerifier, VerifiedRef};
use crate::message::InboundMessage;
use crate::verdict::Reason;

/// The message's one reference, verified for its destination and payload.
pub(crate) async fn verify(
    verifier: &ContextRefVerifier,
    msg: &InboundMessage,
) -> Step<VerifiedRef> {
    let mut refs = msg.headers.get_all(CTX_REF_HEADER);
    let raw = match (refs.next(), refs.next()) {
        (None, _) => {
            return Err(Rejection::new(
                Reason::MissingContext,
                "no ztauth-ctx-ref header",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(Rejection::new(
                Reason::AmbiguousContext,
                "more than one ztauth-ctx-ref header",
            ));
        }
        (Some(r), None) => std::str::from_utf8(r)
            .map_err(|_| Rejection::new(Reason::MalformedReference, "reference is not UTF-8"))?,
    };
    let mut bindings = msg.headers.get_all(CTX_BIND_HEADER);
    let binding = match (bindings.next(), bindings.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => {
            return Err(Rejection::new(
                Reason::AmbiguousContext,
                "more than one ztauth-ctx-bind header",
            ));
        }
        (Some(b), None) => Some(
            std::str::from_utf8(b)
                .map_err(|_| Rejection::new(Reason::BadBinding, "binding is not UTF-8"))?
                .trim(),
        ),
    };
    verifier
        .verify_message(raw.trim(), binding, &msg.destination, &msg.payload)
        .await
        .map_err(|e| Rejection::new(e.reason(), e.to_string()))
}
