//! The produce-side pipeline: producer PDP check → credential stripping →
//! a context reference bound to destination and payload. Broker crates call
//! [`ProducerGuard::prepare`] and send what it returns; refusals never reach a broker.

use std::sync::Arc;

use crate::ctxbind::{BindingMode, CTX_BIND_HEADER, ContextBinder};
use crate::ctxref::{
    CTX_REF_HEADER, ContextRefClaims, ContextRefMinter, MintError, MintRequest, MintedRef,
    SubjectKind,
};
use crate::message::{Headers, OutboundMessage};
use crate::pdp::{
    ACT_FOR_ACTION, AccessRequest, EntityRef, PdpError, PolicyDecisionPoint, USER_TYPE,
    WORKLOAD_TYPE,
};
use crate::scope::Scope;
use crate::strip::{CredentialPolicy, Finding, Refused};

/// The identity a message is published for (from the producer's own Txn-Token or workload identity).
#[derive(Debug, Clone)]
pub struct SubjectContext {
    /// Target identity.
    pub subject: String,
    /// Human or workload.
    pub sub_kind: SubjectKind,
    /// Origin transaction id.
    pub txn: String,
    /// Scope ceiling for the async work.
    pub scope: Scope,
}

/// Per-message publish parameters.
#[derive(Debug, Clone)]
pub struct PublishRequest<'a> {
    /// Who the message acts for.
    pub subject: &'a SubjectContext,
    /// The action the consumer will perform (checked against scope and policy).
    pub action: &'a str,
    /// Consumer audiences (workload ids) allowed to act on it.
    pub audience: &'a [String],
    /// Destination as the consumer will see it (topic, exchange/routing key, subject).
    pub destination: &'a str,
    /// Narrower scope for this message; defaults to the subject's scope.
    pub scope: Option<&'a Scope>,
}

/// Where a handler publishes next, and with how much authority.
#[derive(Debug, Clone)]
pub struct DerivedPublish<'a> {
    /// The action the next consumer performs.
    pub action: &'a str,
    /// The next consumer's workload id(s).
    pub audience: &'a [String],
    /// The next destination.
    pub destination: &'a str,
    /// A narrower scope; defaults to the current one.
    pub scope: Option<&'a Scope>,
}

/// Why a message was not published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The message carries credentials and the policy is to refuse.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The producer's PDP check said no.
    #[error("producer {workload} may not publish {action:?} for {subject}")]
    Denied {
        /// This producer.
        workload: String,
        /// The action.
        action: String,
        /// The subject.
        subject: String,
    },
    /// The action is not within the subject's scope.
    #[error("action {action:?} is outside scope {scope:?}")]
    ScopeInsufficient {
        /// The action.
        action: String,
        /// The scope.
        scope: String,
    },
    /// The PDP could not answer.
    #[error(transparent)]
    Pdp(#[from] PdpError),
    /// Signing the reference failed.
    #[error(transparent)]
    Mint(#[from] MintError),
    /// The broker did not accept the message.
    #[error("broker rejected the publish: {0}")]
    Broker(String),
}

/// A message ready for the broker: credentials gone, reference attached.
#[derive(Debug, Clone)]
pub struct PreparedMessage {
    /// Headers to send (with `ztauth-ctx-ref`).
    pub headers: Headers,
    /// Payload to send (digest-bound).
    pub payload: Vec<u8>,
    /// The reference attached.
    pub reference: MintedRef,
    /// What was stripped (names and paths only).
    pub stripped: Vec<Finding>,
}

/// What the broker confirmed for one guarded publish: the same type on every
/// broker. The destination is the one the reference is bound to (the
/// request's), `at` where the broker stored the message when it says
/// (Kafka partition/offset, JetStream stream/sequence; AMQP confirms do not).
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// The destination the reference is bound to (topic, `exchange/routing key`, subject).
    pub destination: String,
    /// The reference id (`jti`).
    pub reference_id: String,
    /// The message id sent, where the broker has one (AMQP `message-id`,
    /// NATS `Nats-Msg-Id`: the application's own, else a fresh one).
    pub message_id: Option<String>,
    /// What was stripped (names and paths only, never values).
    pub stripped: Vec<Finding>,
    /// Where the broker stored it, when it says.
    pub at: Option<crate::message::Coordinates>,
    /// The broker reported the publish as a duplicate of one it already
    /// stored (JetStream de-duplication by message id).
    pub duplicate: bool,
}

impl Receipt {
    /// The receipt for `prepared`, published to `destination`.
    pub fn new(destination: impl Into<String>, prepared: &PreparedMessage) -> Self {
        Receipt {
            destination: destination.into(),
            reference_id: prepared.reference.claims.jti.clone(),
            message_id: None,
            stripped: prepared.stripped.clone(),
            at: None,
            duplicate: false,
        }
    }
}

/// The produce-side guard for one producing workload.
#[derive(Clone)]
pub struct ProducerGuard {
    minter: ContextRefMinter,
    pdp: Arc<dyn PolicyDecisionPoint>,
    credentials: CredentialPolicy,
    binder: Option<ContextBinder>,
}

impl ProducerGuard {
    /// A producer guard signing as the minter's workload.
    pub fn new(minter: ContextRefMinter, pdp: Arc<dyn PolicyDecisionPoint>) -> Self {
        ProducerGuard {
            minter,
            pdp,
            credentials: CredentialPolicy::default(),
            binder: None,
        }
    }

    /// Publishes in the per-context mode ([`crate::ctxbind`]): one signed
    /// context reference per (origin context, audience), a MAC per message.
    /// A message for several audiences, or for one without a key-agreement
    /// key in `binder`, still gets a per-message reference.
    pub fn with_context_binding(mut self, binder: ContextBinder) -> Self {
        self.binder = Some(binder);
        self
    }

    /// The binding mode this guard publishes with (for audiences with a key).
    pub fn binding_mode(&self) -> BindingMode {
        match self.binder {
            Some(_) => BindingMode::PerContext,
            None => BindingMode::PerMessage,
        }
    }

    /// Signs `claims` per message, or seals them per context when this guard
    /// binds that way and the audience has a key; attaches the result.
    fn attach(
        &self,
        headers: &mut Headers,
        claims: ContextRefClaims,
    ) -> Result<MintedRef, MintError> {
        headers.remove(CTX_REF_HEADER);
        headers.remove(CTX_BIND_HEADER);
        if let Some(binder) = &self.binder
            && let Some(sealed) = binder.seal(&self.minter, &claims)?
        {
            headers.append(CTX_REF_HEADER, sealed.reference.token.as_str());
            headers.append(CTX_BIND_HEADER, sealed.binding);
            return Ok(sealed.reference);
        }
        let reference = self.minter.sign(claims)?;
        headers.append(CTX_REF_HEADER, reference.token.as_str());
        Ok(reference)
    }

    /// Uses a non-default credential policy (extra headers, payload paths, refuse mode).
    pub fn with_credentials(mut self, credentials: CredentialPolicy) -> Self {
        self.credentials = credentials;
        self
    }

    /// The producing workload id.
    pub fn workload(&self) -> &str {
        self.minter.issuer()
    }

    /// The minter (handlers use it to derive downstream references).
    pub fn minter(&self) -> &ContextRefMinter {
        &self.minter
    }

    /// Checks, strips and signs one message.
    ///
    /// # Errors
    ///
    /// Returns [`PublishError::ScopeInsufficient`] if the requested scope is not within the
    /// subject's scope or does not contain the action, [`PublishError::Pdp`] if the PDP cannot
    /// answer, [`PublishError::Denied`] if it says no, [`PublishError::Refused`] if the message
    /// carries credentials that the strip policy refuses, and [`PublishError::Mint`] if signing the
    /// reference fails.
    pub async fn prepare(
        &self,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<PreparedMessage, PublishError> {
        let scope = req.scope.unwrap_or(&req.subject.scope);
        if !scope.is_subset(&req.subject.scope) || !scope.contains(req.action) {
            return Err(PublishError::ScopeInsufficient {
                action: req.action.to_string(),
                scope: scope.to_string(),
            });
        }
        self.check_publish(req, &[], 0).await?;
        let OutboundMessage {
            mut headers,
            mut payload,
        } = msg;
        let stripped = self.credentials.apply(&mut headers, &mut payload)?;
        let claims = self.minter.origin_claims(&MintRequest {
            subject: &req.subject.subject,
            sub_kind: req.subject.sub_kind,
            audience: req.audience,
            scope,
            txn: &req.subject.txn,
            destination: req.destination,
            payload: &payload,
        });
        let reference = self.attach(&mut headers, claims)?;
        if !stripped.is_empty() {
            tracing::info!(workload = %self.workload(), destination = req.destination, stripped = stripped.len(), "credentials stripped from outgoing message");
        }
        Ok(PreparedMessage {
            headers,
            payload,
            reference,
            stripped,
        })
    }

    /// Checks, strips and signs a message a handler publishes downstream: the
    /// reference is derived from the handler's `AuthContext` (this workload joins
    /// the `act` chain, scope may only narrow, `txn` and subject are kept).
    ///
    /// # Errors
    ///
    /// Returns [`PublishError::ScopeInsufficient`] if the scope does not contain the action,
    /// [`PublishError::Pdp`] if the PDP cannot answer, [`PublishError::Denied`] if it says no,
    /// [`PublishError::Refused`] if the message carries credentials that the strip policy refuses,
    /// and [`PublishError::Mint`] if the derived reference would widen scope, pass `max_depth` or
    /// cannot be signed.
    pub async fn prepare_derived(
        &self,
        auth: &crate::auth::AuthContext,
        next: &DerivedPublish<'_>,
        msg: OutboundMessage,
    ) -> Result<PreparedMessage, PublishError> {
        let subject = SubjectContext {
            subject: auth.subject().to_string(),
            sub_kind: auth.sub_kind(),
            txn: auth.txn().to_string(),
            scope: next.scope.cloned().unwrap_or_else(|| auth.scope().clone()),
        };
        if !subject.scope.contains(next.action) {
            return Err(PublishError::ScopeInsufficient {
                action: next.action.to_string(),
                scope: subject.scope.to_string(),
            });
        }
        // The PDP sees the chain this hop extends (every signer so far, origin
        // first) and the depth of the reference it is about to sign, so a
        // policy that caps hops or requires a route applies before publishing.
        self.check_publish(
            &PublishRequest {
                subject: &subject,
                action: next.action,
                audience: next.audience,
                destination: next.destination,
                scope: next.scope,
            },
            auth.chain(),
            auth.reference().depth.saturating_add(1),
        )
        .await?;
        let OutboundMessage {
            mut headers,
            mut payload,
        } = msg;
        let stripped = self.credentials.apply(&mut headers, &mut payload)?;
        let claims = auth.derived_claims(
            &self.minter,
            next.scope,
            next.audience,
            next.destination,
            &payload,
        )?;
        let reference = self.attach(&mut headers, claims)?;
        Ok(PreparedMessage {
            headers,
            payload,
            reference,
            stripped,
        })
    }

    /// May this producer publish `action` on behalf of the subject? (delegation half of elevation)
    /// `chain` lists the workloads that signed before this one (origin first; empty for an
    /// origin publish) and `depth` is the depth of the reference about to be signed.
    async fn check_publish(
        &self,
        req: &PublishRequest<'_>,
        chain: &[String],
        depth: u32,
    ) -> Result<(), PublishError> {
        let subject = EntityRef::new(
            match req.subject.sub_kind {
                SubjectKind::Human => USER_TYPE,
                SubjectKind::Workload => WORKLOAD_TYPE,
            },
            &req.subject.subject,
        );
        let decision = self
            .pdp
            .evaluate(&AccessRequest {
                subject: EntityRef::new(WORKLOAD_TYPE, self.workload()),
                action: ACT_FOR_ACTION.to_string(),
                resource: subject,
                context: serde_json::json!({
                    "action": req.action,
                    "scope": req.subject.scope.iter().collect::<Vec<_>>(),
                    "chain": chain,
                    "depth": i64::from(depth),
                    "txn": req.subject.txn,
                    "workload": self.workload(),
                }),
            })
            .await?;
        if decision.allowed {
            Ok(())
        } else {
            Err(PublishError::Denied {
                workload: self.workload().to_string(),
                action: req.action.to_string(),
                subject: req.subject.subject.clone(),
            })
        }
    }
}
