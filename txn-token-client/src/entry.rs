//! The produce-side entry flow (step 1 of the ZTAuth* async example): a user's
//! access token is exchanged for a Txn-Token for the producing workload, and a
//! verified Txn-Token (the `Txn-Token` header of the producer's own request)
//! becomes the producer's [`SubjectContext`]. The small in-process OAuth
//! issuer of user tokens for the demo and tests (`TestIssuer`) is in the
//! `elevate-tts` crate, beside the service configuration it fills in.

use elevate_core::ctxref::SubjectKind;
use elevate_core::producer::SubjectContext;
use elevate_core::scope::Scope;
use elevate_core::token::TxnTokenClaims;

use crate::verify::{TxnTokenVerifier, VerifyError};

/// The producer's subject context from verified Txn-Token claims: subject,
/// kind (`tctx.sub_kind`, human when absent), origin `txn` and scope.
pub fn subject_context(claims: &TxnTokenClaims) -> SubjectContext {
    let sub_kind = match claims
        .tctx
        .as_ref()
        .and_then(|t| t.get("sub_kind"))
        .and_then(|k| k.as_str())
    {
        Some("workload") => SubjectKind::Workload,
        _ => SubjectKind::Human,
    };
    SubjectContext {
        subject: claims.sub.clone(),
        sub_kind,
        txn: claims.txn.clone(),
        scope: Scope::parse(&claims.scope),
    }
}

/// Verifies an inbound `Txn-Token` header value and returns the subject context.
///
/// # Errors
///
/// Returns the [`VerifyError`] of [`TxnTokenVerifier::verify`] if the token is not valid for the
/// verifier's trust domain.
pub async fn subject_context_from_header(
    verifier: &TxnTokenVerifier,
    header_value: &str,
) -> Result<SubjectContext, VerifyError> {
    let claims = verifier.verify(header_value.trim()).await?;
    Ok(subject_context(&claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_context_from_claims() {
        let claims = TxnTokenClaims {
            iat: 0,
            exp: 1,
            aud: vec!["d".into()],
            txn: "t".into(),
            sub: "alice".into(),
            scope: "orders.read orders.write".into(),
            req_wl: "w".into(),
            jti: None,
            tctx: None,
            rctx: None,
        };
        let s = subject_context(&claims);
        assert_eq!(s.sub_kind, SubjectKind::Human);
        assert!(s.scope.contains("orders.write"));
        let mut c = claims;
        c.tctx = Some(serde_json::json!({"sub_kind": "workload"}));
        assert_eq!(subject_context(&c).sub_kind, SubjectKind::Workload);
    }
}
