//! Step 5: a fresh Txn-Token for this workload, which must match the
//! reference it was exchanged for and cover the action.

use super::rejection::{Rejection, Step};
use crate::ctxref::VerifiedRef;
use crate::message::InboundMessage;
use crate::scope::Scope;
use crate::token::{TokenError, TokenRequest, TokenSource, TxnToken};
use crate::verdict::Reason;

/// Exchanges the reference for a Txn-Token for this workload.
pub(crate) async fn acquire(
    tokens: &dyn TokenSource,
    verified: &VerifiedRef,
    ref_scope: &Scope,
    msg: &InboundMessage,
) -> Step<TxnToken> {
    let request = TokenRequest::for_message(verified, ref_scope, msg);
    tokens.acquire(&request).await.map_err(refused)
}

/// Checks the token against the reference it was exchanged for: same `sub`
/// and `txn`, `req_wl` = `workload`, scope no wider than the reference's
/// (else `token-invalid`) and covering `action` (else `scope-insufficient`).
/// Returns the token's scope.
pub(crate) fn check(
    token: &TxnToken,
    workload: &str,
    verified: &VerifiedRef,
    ref_scope: &Scope,
    action: &str,
) -> Step<Scope> {
    let claims = &verified.claims;
    let tc = &token.claims;
    let token_scope = Scope::parse(&tc.scope);
    let mismatch = if tc.sub != claims.sub {
        Some("sub")
    } else if tc.txn != claims.txn {
        Some("txn")
    } else if tc.req_wl != workload {
        Some("req_wl")
    } else if !token_scope.is_subset(ref_scope) {
        Some("scope wider than the reference")
    } else {
        None
    };
    if let Some(what) = mismatch {
        return Err(Rejection::new(
            Reason::TokenInvalid,
            format!("Txn-Token does not match the reference: {what}"),
        ));
    }
    if !token_scope.contains(action) {
        return Err(Rejection::new(
            Reason::ScopeInsufficient,
            format!(
                "action {action:?} is outside the Txn-Token scope {:?}",
                tc.scope
            ),
        ));
    }
    Ok(token_scope)
}

/// The reason for a token source's error: unavailable is Retry (with the
/// server's wait), refused and invalid are terminal.
fn refused(e: TokenError) -> Rejection {
    match e {
        TokenError::Unavailable { retry_after, .. } => Rejection {
            reason: Reason::TtsUnavailable,
            detail: Some(e.to_string()),
            retry_after,
        },
        TokenError::Denied { .. } => Rejection::new(Reason::TokenDenied, e.to_string()),
        TokenError::Invalid(_) => Rejection::new(Reason::TokenInvalid, e.to_string()),
    }
}
