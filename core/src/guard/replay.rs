//! Step 3: a reference is used once per message position; a copy of a
//! message elsewhere is a replay. Fails closed when the seen-set is down.

use super::rejection::{Rejection, Step};
use crate::ctxref::ContextRefClaims;
use crate::message::InboundMessage;
use crate::replay::{ReplayGuard, Seen};
use crate::verdict::Reason;

/// Refuses a reference already seen at another position (`replayed`), or
/// any message while the seen-set cannot answer (`replay-store-unavailable`).
pub(crate) async fn check(
    replay: Option<&dyn ReplayGuard>,
    msg: &InboundMessage,
    claims: &ContextRefClaims,
) -> Step<()> {
    let Some(replay) = replay else {
        return Ok(());
    };
    match replay.check(&claims.jti, &msg.position, claims.exp).await {
        Ok(Seen::New | Seen::Redelivery) => Ok(()),
        Ok(Seen::Replay { first_seen_at }) => Err(Rejection::new(
            Reason::Replayed,
            format!("reference {} first seen at {first_seen_at}", claims.jti),
        )),
        Err(e) => Err(Rejection::new(
            Reason::ReplayStoreUnavailable,
            e.to_string(),
        )),
    }
}
