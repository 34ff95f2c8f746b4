//! The `AuthContext` a permitted handler receives, and downstream derivation.

use crate::ctxref::{
    ContextRefClaims, ContextRefMinter, MintError, MintedRef, SubjectKind, VerifiedRef,
};
use crate::pdp::EntityRef;
use crate::scope::Scope;
use crate::token::{Redacted, TxnToken};

/// Who the handler acts for and with what authority. Only the guard builds
/// one, on Permit, from what it verified: the fields are private, so no
/// other code can make a context that was never decided.
///
/// Its `Debug` shows the tokens it holds as SHA-256 prefixes only.
#[derive(Clone)]
pub struct AuthContext {
    decision_id: String,
    subject: String,
    sub_kind: SubjectKind,
    workload: String,
    producer: String,
    txn: String,
    scope: Scope,
    chain: Vec<String>,
    action: String,
    resource: EntityRef,
    txn_token: TxnToken,
    reference: ContextRefClaims,
    reference_token: String,
}

impl std::fmt::Debug for AuthContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthContext")
            .field("decision_id", &self.decision_id)
            .field("subject", &self.subject)
            .field("sub_kind", &self.sub_kind)
            .field("workload", &self.workload)
            .field("producer", &self.producer)
            .field("txn", &self.txn)
            .field("scope", &self.scope)
            .field("chain", &self.chain)
            .field("action", &self.action)
            .field("resource", &self.resource)
            .field("txn_token", &self.txn_token)
            .field("reference", &self.reference)
            .field("reference_token", &Redacted(&self.reference_token))
            .finish()
    }
}

impl AuthContext {
    /// The context the guard permitted: `decision_id` for `workload`, from
    /// the verified reference, with the Txn-Token's scope, the action and
    /// the resource it was checked for.
    pub(crate) fn new(
        decision_id: &str,
        workload: &str,
        verified: VerifiedRef,
        scope: Scope,
        action: String,
        resource: EntityRef,
        txn_token: TxnToken,
    ) -> Self {
        let claims = verified.claims;
        AuthContext {
            decision_id: decision_id.to_string(),
            subject: claims.sub.clone(),
            sub_kind: claims.sub_kind,
            workload: workload.to_string(),
            producer: claims.iss.clone(),
            txn: claims.txn.clone(),
            scope,
            chain: claims.chain(),
            action,
            resource,
            txn_token,
            reference: claims,
            reference_token: verified.token,
        }
    }

    /// The decision that permitted this dispatch.
    pub fn decision_id(&self) -> &str {
        &self.decision_id
    }

    /// The target identity (the reference's `sub`).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Whether the subject is a human or a workload.
    pub fn sub_kind(&self) -> SubjectKind {
        self.sub_kind
    }

    /// This consuming workload.
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// The workload that signed the reference.
    pub fn producer(&self) -> &str {
        &self.producer
    }

    /// The origin transaction id.
    pub fn txn(&self) -> &str {
        &self.txn
    }

    /// The scope granted in the Txn-Token (never wider than the reference's).
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The delegation chain, origin first, the reference's signer last.
    pub fn chain(&self) -> &[String] {
        &self.chain
    }

    /// The action that was permitted.
    pub fn action(&self) -> &str {
        &self.action
    }

    /// The resource it was permitted on.
    pub fn resource(&self) -> &EntityRef {
        &self.resource
    }

    /// The Txn-Token, for downstream calls (its `Debug` prints only a hash).
    pub fn txn_token(&self) -> &TxnToken {
        &self.txn_token
    }

    /// The verified reference's claims (the basis for downstream derivation).
    pub fn reference(&self) -> &ContextRefClaims {
        &self.reference
    }

    /// The verified reference itself (carried as proof in derived references).
    pub fn reference_token(&self) -> &str {
        &self.reference_token
    }

    /// Derives the reference for a message this handler publishes downstream:
    /// appends the reference's signer to the chain, may only narrow scope.
    ///
    /// # Errors
    ///
    /// Returns [`MintError::ScopeWidened`] if `scope` is not within this context's scope narrowed
    /// by the inbound reference's scope, [`MintError::DepthExceeded`] if one more hop would pass
    /// the chain's `max_depth`, and [`MintError::Signing`] if signing the new reference fails.
    pub fn derive_reference(
        &self,
        minter: &ContextRefMinter,
        scope: Option<&Scope>,
        audience: &[String],
        destination: &str,
        payload: &[u8],
    ) -> Result<MintedRef, MintError> {
        minter.sign(self.derived_claims(minter, scope, audience, destination, payload)?)
    }

    /// The claims [`derive_reference`](Self::derive_reference) signs (the
    /// producer guard seals them per context when it binds that way).
    ///
    /// # Errors
    ///
    /// As [`derive_reference`](Self::derive_reference), except signing.
    pub fn derived_claims(
        &self,
        minter: &ContextRefMinter,
        scope: Option<&Scope>,
        audience: &[String],
        destination: &str,
        payload: &[u8],
    ) -> Result<crate::ctxref::ContextRefClaims, MintError> {
        let ceiling = self.scope.intersection(&self.reference.scope_set());
        let scope = scope.cloned().unwrap_or_else(|| ceiling.clone());
        if !scope.is_subset(&ceiling) {
            return Err(MintError::ScopeWidened {
                requested: scope.to_string(),
                parent: ceiling.to_string(),
            });
        }
        minter.derived_claims(
            &self.reference,
            &self.reference_token,
            Some(&scope),
            audience,
            destination,
            payload,
        )
    }
}
