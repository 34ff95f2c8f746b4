//! The Policy Decision Point contract (AuthZEN-shaped) and trust elevation.

use serde::{Deserialize, Serialize};

/// A typed entity: `{type, id}` as AuthZEN and Cedar name them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EntityRef {
    /// Entity type (Cedar type name: `User`, `Workload`, `Invoice`...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Entity id.
    pub id: String,
}

impl EntityRef {
    /// Builds an entity reference.
    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Self {
        EntityRef {
            kind: kind.into(),
            id: id.into(),
        }
    }
}

impl std::fmt::Display for EntityRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}::{:?}", self.kind, self.id)
    }
}

/// One access evaluation: may `subject` do `action` on `resource` in `context`?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessRequest {
    /// Who acts.
    pub subject: EntityRef,
    /// The action name.
    pub action: String,
    /// What is acted on.
    pub resource: EntityRef,
    /// Request context (a JSON object).
    pub context: serde_json::Value,
}

/// A PDP answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessDecision {
    /// True only when a policy permits and none forbids.
    pub allowed: bool,
    /// Ids of the policies that determined the answer.
    pub policies: Vec<String>,
    /// Evaluation errors (a request that errors is denied).
    pub errors: Vec<String>,
}

/// Why the PDP gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PdpError {
    /// The PDP cannot be reached: Retry.
    #[error("PDP unavailable: {0}")]
    Unavailable(String),
    /// The request does not fit the schema (unknown action, bad context): Deny.
    #[error("request rejected by the PDP: {0}")]
    InvalidRequest(String),
}

/// A Policy Decision Point: the embedded Cedar engine (the `elevate-cedar`
/// crate), or a remote AuthZEN PDP.
#[async_trait::async_trait]
pub trait PolicyDecisionPoint: Send + Sync {
    /// Evaluates one request.
    async fn evaluate(&self, req: &AccessRequest) -> Result<AccessDecision, PdpError>;

    /// Evaluates several requests (AuthZEN `evaluations`); the default runs them in turn.
    async fn evaluate_all(&self, reqs: &[AccessRequest]) -> Result<Vec<AccessDecision>, PdpError> {
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            out.push(self.evaluate(r).await?);
        }
        Ok(out)
    }

    /// The version of the policy in force (content hash of the bundle).
    fn policy_version(&self) -> String;

    /// The revision of the signed bundle in force, when the PDP has one
    /// (recorded with every decision next to the version).
    fn policy_revision(&self) -> Option<u64> {
        None
    }
}

/// The action name of the delegation half of trust elevation.
pub const ACT_FOR_ACTION: &str = "actFor";

/// Entity type of workloads in policies.
pub const WORKLOAD_TYPE: &str = "Workload";
/// Entity type of human subjects in policies.
pub const USER_TYPE: &str = "User";

/// Everything trust elevation decides on.
#[derive(Debug, Clone)]
pub struct ElevationRequest {
    /// The consuming workload that wants to act.
    pub workload: String,
    /// The target identity.
    pub subject: EntityRef,
    /// The action the handler performs.
    pub action: String,
    /// What it acts on.
    pub resource: EntityRef,
    /// Scope of the Txn-Token.
    pub scope: Vec<String>,
    /// Workloads in the chain, origin first, the reference's signer last.
    pub chain: Vec<String>,
    /// Number of prior hops.
    pub depth: u32,
    /// Origin transaction.
    pub txn: String,
}

impl ElevationRequest {
    /// The two evaluations: (a) may the workload act for the subject for this
    /// action, (b) may the subject do the action on the resource.
    pub fn requests(&self) -> [AccessRequest; 2] {
        let context = serde_json::json!({
            "action": self.action,
            "scope": self.scope,
            "chain": self.chain,
            "depth": self.depth as i64,
            "txn": self.txn,
            "workload": self.workload,
        });
        [
            AccessRequest {
                subject: EntityRef::new(WORKLOAD_TYPE, &self.workload),
                action: ACT_FOR_ACTION.to_string(),
                resource: self.subject.clone(),
                context: context.clone(),
            },
            AccessRequest {
                subject: self.subject.clone(),
                action: self.action.clone(),
                resource: self.resource.clone(),
                context,
            },
        ]
    }
}
