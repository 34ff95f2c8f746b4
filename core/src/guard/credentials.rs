//! Step 1: no credential may ride along, and what cannot be inspected is
//! treated as if it carried one (fail closed).

use super::rejection::{Rejection, Step};
use crate::message::InboundMessage;
use crate::strip::{CredentialKind, CredentialPolicy};
use crate::verdict::Reason;

/// Refuses a message carrying a credential (`credential-in-message`) or one
/// the scan cannot fully inspect (`uninspectable-payload`).
pub(crate) fn check(policy: &CredentialPolicy, msg: &InboundMessage) -> Step<()> {
    let findings = policy.scan(&msg.headers, &msg.payload);
    if findings.is_empty() {
        return Ok(());
    }
    if findings
        .iter()
        .any(|f| f.kind != CredentialKind::Uninspectable)
    {
        let at: Vec<String> = findings
            .iter()
            .map(|f| serde_json::to_string(&f.location).unwrap_or_default())
            .collect();
        return Err(Rejection::new(
            Reason::CredentialInMessage,
            format!("credential found at {}", at.join(", ")),
        ));
    }
    let why: Vec<&str> = findings
        .iter()
        .filter_map(|f| f.detail.as_deref())
        .collect();
    Err(Rejection::new(
        Reason::UninspectablePayload,
        format!(
            "payload cannot be inspected for credentials: {}",
            why.join("; ")
        ),
    ))
}
