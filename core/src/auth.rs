//! The `AuthContext` a permitted handler receives, and downstream derivation.

use crate::ctxref::{ContextRefClaims, ContextRefMinter, MintError, MintedRef, SubjectKind};
use crate::pdp::EntityRef;
use crate::scope::Scope;
use crate::token::{Redacted, TxnToken};

/// Who the handler acts for and with what authority; built only on Permit.
///
/// Its `Debug` shows the tokens it holds as SHA-256 prefixes only.
#[derive(Clone)]
pub struct AuthContext {
    /// The decision that permitted this dispatch.
    pub decision_id: String,
    /// The target identity.
    pub subject: String,
    /// Human or workload.
    pub sub_kind: SubjectKind,
    /// This consuming workload.
    pub workload: String,
    /// The workload that signed the reference.
    pub producer: String,
    /// Origin transaction id.
    pub txn: String,
    /// Scope granted in the Txn-Token.
    pub scope: Scope,
    /// Delegation chain, origin first, the reference's signer last.
    pub chain: Vec<String>,
    /// The action that was permitted.
    pub action: String,
    /// The resource it was permitted on.
    pub resource: EntityRef,
    /// The Txn-Token, for downstream calls (its `Debug` prints only a hash).
    pub txn_token: TxnToken,
    /// The verified reference's claims (basis for downstream derivation).
    pub reference: ContextRefClaims,
    /// The verified reference itself (carried as proof in derived references).
    pub reference_token: String,
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
    /// Derives the reference for a message this handler publishes downstream:
    /// appends the reference's signer to the chain, may only narrow scope.
    pub fn derive_reference(
        &self,
        minter: &ContextRefMinter,
        scope: Option<&Scope>,
        audience: &[String],
        destination: &str,
        payload: &[u8],
    ) -> Result<MintedRef, MintError> {
        let ceiling = self.scope.intersection(&self.reference.scope_set());
        let scope = scope.cloned().unwrap_or_else(|| ceiling.clone());
        if !scope.is_subset(&ceiling) {
            return Err(MintError::ScopeWidened {
                requested: scope.to_string(),
                parent: ceiling.to_string(),
            });
        }
        minter.derive(
            &self.reference,
            &self.reference_token,
            Some(&scope),
            audience,
            destination,
            payload,
        )
    }
}
