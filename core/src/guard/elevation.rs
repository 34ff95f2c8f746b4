//! Step 6: trust elevation at the PDP. Both halves must permit: may this
//! workload act for the subject, and may the subject do the action?

use super::rejection::{Rejection, Step};
use crate::ctxref::{ContextRefClaims, SubjectKind};
use crate::pdp::{
    ElevationRequest, EntityRef, PdpError, PolicyDecisionPoint, USER_TYPE, WORKLOAD_TYPE,
};
use crate::scope::Scope;
use crate::verdict::Reason;

/// Asks the PDP both questions; refuses `delegation-denied`,
/// `subject-denied`, `pdp-unavailable` (Retry) or `policy-error`.
pub(crate) async fn elevate(
    pdp: &dyn PolicyDecisionPoint,
    workload: &str,
    claims: &ContextRefClaims,
    action: &str,
    resource: &EntityRef,
    token_scope: &Scope,
) -> Step<()> {
    let subject = EntityRef::new(
        match claims.sub_kind {
            SubjectKind::Human => USER_TYPE,
            SubjectKind::Workload => WORKLOAD_TYPE,
        },
        &claims.sub,
    );
    let elevation = ElevationRequest {
        workload: workload.to_string(),
        subject,
        action: action.to_string(),
        resource: resource.clone(),
        scope: token_scope.iter().map(str::to_string).collect(),
        chain: claims.chain(),
        depth: claims.depth,
        txn: claims.txn.clone(),
    };
    let decisions = pdp
        .evaluate_all(&elevation.requests())
        .await
        .map_err(|e| match e {
            PdpError::Unavailable(_) => Rejection::new(Reason::PdpUnavailable, e.to_string()),
            PdpError::InvalidRequest(_) => Rejection::new(Reason::PolicyError, e.to_string()),
        })?;
    match decisions.as_slice() {
        [delegation, _] if !delegation.allowed => Err(Rejection::new(
            Reason::DelegationDenied,
            format!(
                "{workload} may not act for {} ({action}){}",
                claims.sub,
                errors_suffix(&delegation.errors)
            ),
        )),
        [_, direct] if !direct.allowed => Err(Rejection::new(
            Reason::SubjectDenied,
            format!(
                "{} may not {action} on {resource}{}",
                claims.sub,
                errors_suffix(&direct.errors)
            ),
        )),
        [_, _] => Ok(()),
        _ => Err(Rejection::new(
            Reason::PolicyError,
            "PDP returned the wrong number of decisions",
        )),
    }
}

fn errors_suffix(errors: &[String]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!(" [errors: {}]", errors.join("; "))
    }
}
