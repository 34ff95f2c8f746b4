//! Verdicts and reason codes: the one mapping every broker settles by.

use serde::{Deserialize, Serialize};

/// The outcome class of a guard decision (DESIGN.md, "Verdicts and settlement").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Verdict {
    /// Both trust-elevation checks passed: run the handler.
    Permit,
    /// Policy said no, context missing or expired: dead-letter, then settle.
    Deny,
    /// Forged, tampered, replayed or credential-carrying: dead-letter (class `invalid`).
    Quarantine,
    /// A dependency is unavailable: redeliver later, bounded, then dead-letter.
    Retry,
}

impl Verdict {
    /// The lowercase wire name (`permit`, `deny`, `quarantine`, `retry`).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Permit => "permit",
            Verdict::Deny => "deny",
            Verdict::Quarantine => "quarantine",
            Verdict::Retry => "retry",
        }
    }
}

/// Every reason a decision can carry, with its stable kebab-case code.
///
/// The code is what dead letters (`ztauth-reason`), decision records and
/// metrics carry; the verdict follows from the reason and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Reason {
    /// Both checks permitted.
    Permitted,
    /// No `ztauth-ctx-ref` header on the message.
    MissingContext,
    /// More than one `ztauth-ctx-ref` header.
    AmbiguousContext,
    /// The reference is not a well-formed compact JWS with the expected claims.
    MalformedReference,
    /// `alg` outside the allow-list (`none`, HS*, RSA...) or not matching the key.
    AlgorithmNotAllowed,
    /// No `kid` in the header.
    MissingKid,
    /// `kid` not in the trusted key set.
    UnknownKey,
    /// Signature does not verify.
    BadSignature,
    /// `typ` is not `ctx-ref+jwt`.
    WrongType,
    /// `aud` does not name this consumer.
    WrongAudience,
    /// `iss` is not the workload that owns the signing key.
    IssuerMismatch,
    /// `exp` passed (beyond leeway).
    Expired,
    /// `iat` in the future (beyond leeway).
    NotYetValid,
    /// `exp - iat` longer than the configured async horizon.
    HorizonTooLong,
    /// `dst` is not the destination the message was read from.
    WrongDestination,
    /// `dig` does not match the payload.
    DigestMismatch,
    /// A hop in the `act` chain widened the scope.
    ScopeWidened,
    /// `depth` above `max_depth` (or the local maximum), or inconsistent with the chain.
    DepthExceeded,
    /// The `act` chain is malformed.
    ChainInvalid,
    /// The reference id (or, per context, the message binding's id) was
    /// already used on another message.
    Replayed,
    /// A context reference (`cnf`) without a message binding
    /// (`ztauth-ctx-bind`), or a binding with a per-message reference.
    MissingBinding,
    /// The message binding is malformed, its MAC does not verify under the
    /// context's key, it names another context, or was bound outside the
    /// context's lifetime.
    BadBinding,
    /// The context's binding key cannot be unwrapped with this consumer's
    /// key-agreement keys (wrapped for another audience or key).
    BindingKeyUnavailable,
    /// A credential (bearer token, JWT, secret header or payload field) is still in the message.
    CredentialInMessage,
    /// The payload cannot be fully inspected for credentials (JSON that does
    /// not parse or nests too deep, an unknown content encoding): fail closed.
    UninspectablePayload,
    /// The broker delivered bytes the binding cannot map to a message
    /// (a header its client library refuses, missing broker metadata).
    MalformedMessage,
    /// The Transaction Token Service refused the exchange.
    TokenDenied,
    /// The Txn-Token returned did not verify or does not match the reference.
    TokenInvalid,
    /// The requested action is outside the reference's scope.
    ScopeInsufficient,
    /// PDP: the workload may not act for this subject.
    DelegationDenied,
    /// PDP: the subject may not do this action on this resource.
    SubjectDenied,
    /// The PDP could not evaluate the request (schema mismatch, bad entity): deny by default.
    PolicyError,
    /// The Transaction Token Service is unreachable, slow, 5xx or 429.
    TtsUnavailable,
    /// The PDP is unreachable.
    PdpUnavailable,
    /// The reference's `kid` is not in the trusted key set and the key
    /// source (the TTS key directory) could not be reached to look it up: a
    /// producer's freshly rotated key waits instead of being quarantined.
    KeysUnavailable,
    /// The decision could not be recorded.
    DecisionLogUnavailable,
    /// The replay seen-set (e.g. Redis) could not be consulted.
    ReplayStoreUnavailable,
    /// Retry verdicts ran out of attempts.
    RetriesExhausted,
    /// The handler failed permanently or ran out of attempts.
    HandlerFailed,
}

impl Reason {
    /// The verdict this reason produces.
    pub fn verdict(self) -> Verdict {
        use Reason::*;
        match self {
            Permitted => Verdict::Permit,
            MissingContext | Expired | NotYetValid | HorizonTooLong | DepthExceeded
            | TokenDenied | TokenInvalid | ScopeInsufficient | DelegationDenied | SubjectDenied
            | PolicyError | RetriesExhausted | HandlerFailed => Verdict::Deny,
            AmbiguousContext
            | MalformedReference
            | AlgorithmNotAllowed
            | MissingKid
            | UnknownKey
            | BadSignature
            | WrongType
            | WrongAudience
            | IssuerMismatch
            | WrongDestination
            | DigestMismatch
            | ScopeWidened
            | ChainInvalid
            | Replayed
            | MissingBinding
            | BadBinding
            | BindingKeyUnavailable
            | CredentialInMessage
            | UninspectablePayload
            | MalformedMessage => Verdict::Quarantine,
            TtsUnavailable
            | PdpUnavailable
            | KeysUnavailable
            | DecisionLogUnavailable
            | ReplayStoreUnavailable => Verdict::Retry,
        }
    }

    /// The reason class carried in dead letters: `denied`, `invalid`, `exhausted` or `ok`.
    pub fn class(self) -> &'static str {
        match self {
            Reason::RetriesExhausted | Reason::HandlerFailed => "exhausted",
            r => match r.verdict() {
                Verdict::Permit => "ok",
                Verdict::Deny => "denied",
                Verdict::Quarantine => "invalid",
                Verdict::Retry => "unavailable",
            },
        }
    }

    /// The stable kebab-case code.
    pub fn code(self) -> &'static str {
        use Reason::*;
        match self {
            Permitted => "permitted",
            MissingContext => "missing-context",
            AmbiguousContext => "ambiguous-context",
            MalformedReference => "malformed-reference",
            AlgorithmNotAllowed => "algorithm-not-allowed",
            MissingKid => "missing-kid",
            UnknownKey => "unknown-key",
            BadSignature => "bad-signature",
            WrongType => "wrong-type",
            WrongAudience => "wrong-audience",
            IssuerMismatch => "issuer-mismatch",
            Expired => "expired",
            NotYetValid => "not-yet-valid",
            HorizonTooLong => "horizon-too-long",
            WrongDestination => "wrong-destination",
            DigestMismatch => "digest-mismatch",
            ScopeWidened => "scope-widened",
            DepthExceeded => "depth-exceeded",
            ChainInvalid => "chain-invalid",
            Replayed => "replayed",
            MissingBinding => "missing-binding",
            BadBinding => "bad-binding",
            BindingKeyUnavailable => "binding-key-unavailable",
            CredentialInMessage => "credential-in-message",
            UninspectablePayload => "uninspectable-payload",
            MalformedMessage => "malformed-message",
            TokenDenied => "token-denied",
            TokenInvalid => "token-invalid",
            ScopeInsufficient => "scope-insufficient",
            DelegationDenied => "delegation-denied",
            SubjectDenied => "subject-denied",
            PolicyError => "policy-error",
            TtsUnavailable => "tts-unavailable",
            PdpUnavailable => "pdp-unavailable",
            KeysUnavailable => "keys-unavailable",
            DecisionLogUnavailable => "decision-log-unavailable",
            ReplayStoreUnavailable => "replay-store-unavailable",
            RetriesExhausted => "retries-exhausted",
            HandlerFailed => "handler-failed",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_code_matches_code() {
        for r in [
            Reason::MissingContext,
            Reason::RetriesExhausted,
            Reason::CredentialInMessage,
            Reason::KeysUnavailable,
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.code());
        }
    }
}
