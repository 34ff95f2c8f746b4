//! Step 4: what the handler would do (action and resource), which must be
//! inside the reference's scope.

use super::rejection::{Rejection, Step};
use crate::ctxref::ContextRefClaims;
use crate::message::InboundMessage;
use crate::pdp::EntityRef;
use crate::scope::Scope;
use crate::verdict::Reason;

/// Maps a message to the action its handler performs and the resource it acts on.
pub trait ActionMapper: Send + Sync {
    /// The (action, resource) pair for trust elevation.
    ///
    /// # Errors
    /// The message maps to no action: the guard denies it (`policy-error`).
    fn map(
        &self,
        msg: &InboundMessage,
        claims: &ContextRefClaims,
    ) -> Result<(String, EntityRef), String>;
}

/// One fixed action per consumer; the resource is the destination, typed `resource_type`.
#[derive(Debug, Clone)]
pub struct FixedAction {
    /// Action name (e.g. `invoice.create`).
    pub action: String,
    /// Cedar type of the resource (e.g. `Queue`).
    pub resource_type: String,
}

impl FixedAction {
    /// A fixed action on the message's destination.
    pub fn new(action: impl Into<String>, resource_type: impl Into<String>) -> Self {
        FixedAction {
            action: action.into(),
            resource_type: resource_type.into(),
        }
    }
}

impl ActionMapper for FixedAction {
    fn map(
        &self,
        msg: &InboundMessage,
        _: &ContextRefClaims,
    ) -> Result<(String, EntityRef), String> {
        Ok((
            self.action.clone(),
            EntityRef::new(&self.resource_type, &msg.destination),
        ))
    }
}

impl<F> ActionMapper for F
where
    F: Fn(&InboundMessage, &ContextRefClaims) -> Result<(String, EntityRef), String> + Send + Sync,
{
    fn map(
        &self,
        msg: &InboundMessage,
        claims: &ContextRefClaims,
    ) -> Result<(String, EntityRef), String> {
        self(msg, claims)
    }
}

/// The action and resource, refused as `policy-error` when the mapper has
/// none and `scope-insufficient` when the action is outside `ref_scope`.
pub(crate) fn map(
    mapper: &dyn ActionMapper,
    msg: &InboundMessage,
    claims: &ContextRefClaims,
    ref_scope: &Scope,
) -> Step<(String, EntityRef)> {
    let (action, resource) = mapper.map(msg, claims).map_err(|e| {
        Rejection::new(
            Reason::PolicyError,
            format!("cannot map message to an action: {e}"),
        )
    })?;
    if !ref_scope.contains(&action) {
        return Err(Rejection::new(
            Reason::ScopeInsufficient,
            format!(
                "action {action:?} is outside the reference scope {:?}",
                claims.scope
            ),
        ));
    }
    Ok((action, resource))
}
