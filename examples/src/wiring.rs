//! The trust domain the examples run in: one policy bundle, one Transaction
//! Token Service with a key and a registration per workload, a small user-token
//! issuer, and helpers that build a producer's [`ProducerGuard`] or a
//! consumer's [`Guard`] for a given workload and action. Each example keeps
//! only what is specific to its broker and its story.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use elevate_cedar::CedarPdp;
use elevate_core::ctxref::{ContextRefMinter, ContextRefVerifier, MintRequest, VerifyPolicy};
use elevate_core::decision::DecisionSink;
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::producer::{ProducerGuard, SubjectContext};
use elevate_core::scope::Scope;
use elevate_core::{CTX_REF_HEADER, FixedAction, Guard, Headers, SubjectKind};
use elevate_tts::{InProcessTts, Issuer, IssuerSettings, TestIssuer};
use txn_token_client::subject_context;

/// The examples' trust domain.
pub const TRUST_DOMAIN: &str = "elevate.example";
/// The issuer of the examples' user access tokens.
pub const USER_ISSUER: &str = "https://idp.elevate.example";
/// The producer service every example publishes from.
pub const ORDERS_API: &str = "spiffe://elevate.example/orders-api";

/// The users the broker examples publish for, taking turns.
pub const USERS: [&str; 4] = ["alice", "bob", "carol", "mallory"];

/// How long a producer's context references stay valid.
const REFERENCE_LIFETIME: Duration = Duration::from_secs(3600);
/// How long a user access token stays valid.
const USER_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// What the wiring helpers fail with (converts into the binaries' error types with `?`).
pub type WiringError = Box<dyn std::error::Error + Send + Sync>;

/// Installs the examples' tracing subscriber (`RUST_LOG`, default: warnings, no decision records).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,elevate::decision=off".into()),
        )
        .init();
}

/// The example Cedar policy bundle (`examples/policies`).
pub fn policy_bundle() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// The last path segment of a workload id (`orders-api` for `spiffe://…/orders-api`).
pub fn short(workload: &str) -> &str {
    workload.rsplit('/').next().unwrap_or(workload)
}

/// Keys per workload, the TTS that registers them, the user-token issuer and the PDP.
pub struct TrustDomain {
    /// The Cedar PDP loaded from [`policy_bundle`].
    pub pdp: Arc<CedarPdp>,
    /// The in-process Transaction Token Service.
    pub tts: Arc<Issuer>,
    /// The issuer of user access tokens the TTS accepts in the entry flow.
    pub idp: TestIssuer,
    keys: BTreeMap<String, SigningKey>,
}

impl TrustDomain {
    /// Loads the example policy bundle and starts a TTS that trusts a fresh user-token issuer.
    pub fn new() -> Result<Self, WiringError> {
        let pdp = Arc::new(CedarPdp::load_dir(policy_bundle())?);
        let tts = Issuer::generate(IssuerSettings::new(TRUST_DOMAIN))?;
        let idp = TestIssuer::new(USER_ISSUER, TRUST_DOMAIN)?;
        tts.set_user_issuer(idp.verifier());
        Ok(TrustDomain {
            pdp,
            tts,
            idp,
            keys: BTreeMap::new(),
        })
    }

    /// Generates a key (id `<short name>-1`) for `workload` and registers it with the TTS for `scopes`.
    pub fn register(
        &mut self,
        workload: &str,
        alg: SigningAlg,
        scopes: &str,
    ) -> Result<&mut Self, WiringError> {
        let key = SigningKey::generate(alg, format!("{}-1", short(workload)))?;
        self.tts
            .register_workload(workload, key.public_jwk(), &Scope::parse(scopes))?;
        self.keys.insert(workload.to_string(), key);
        Ok(self)
    }

    /// The signing key of a registered workload.
    pub fn key(&self, workload: &str) -> Result<&SigningKey, WiringError> {
        self.keys
            .get(workload)
            .ok_or_else(|| format!("unknown workload {workload}").into())
    }

    /// The public keys of `workloads`, as a consumer trusts them for context references.
    pub fn keyset(&self, workloads: &[&str]) -> Result<KeySet, WiringError> {
        let mut keys = KeySet::new();
        for w in workloads {
            keys.insert_workload_key(w, self.key(w)?)?;
        }
        Ok(keys)
    }

    /// The TTS as `workload` reaches it (signing its requests with its key).
    pub fn tts_for(&self, workload: &str) -> Result<InProcessTts, WiringError> {
        Ok(InProcessTts::new(
            self.tts.clone(),
            workload,
            self.key(workload)?.clone(),
        ))
    }

    /// A context-reference minter for `workload` (references valid for an hour).
    pub fn minter(&self, workload: &str) -> Result<ContextRefMinter, WiringError> {
        Ok(ContextRefMinter::new(
            workload,
            self.key(workload)?.clone(),
            REFERENCE_LIFETIME,
        ))
    }

    /// The producer-side guard of `workload`: its minter and the PDP.
    pub fn producer(&self, workload: &str) -> Result<ProducerGuard, WiringError> {
        Ok(ProducerGuard::new(self.minter(workload)?, self.pdp.clone()))
    }

    /// The guard of consuming `workload`: it accepts references signed by `trusted`,
    /// exchanges them at the TTS, asks the PDP about `action` and records to `log`.
    pub fn guard(
        &self,
        workload: &str,
        trusted: &[&str],
        action: &str,
        log: Arc<dyn DecisionSink>,
    ) -> Result<Guard, WiringError> {
        Ok(Guard::new(
            workload,
            ContextRefVerifier::new(self.keyset(trusted)?, VerifyPolicy::new(workload)),
            Arc::new(self.tts_for(workload)?),
            self.pdp.clone(),
            log,
            Arc::new(FixedAction::new(action, "Destination")),
        ))
    }

    /// The entry flow: `user` signs in (a fresh access token for `scope`) and the
    /// producer service exchanges it at `tts` for a Txn-Token, described by `http`.
    /// Returns the user's token (to show it never reaches the wire) and the subject.
    pub async fn sign_in(
        &self,
        tts: &InProcessTts,
        user: &str,
        scope: &str,
        http: &str,
    ) -> Result<(String, SubjectContext), WiringError> {
        let user_token = self
            .idp
            .issue_access_token(user, scope, USER_TOKEN_LIFETIME)?;
        let txn_token = tts
            .exchange_access_token(
                &user_token,
                &Scope::parse(scope),
                &serde_json::json!({ "http": http }),
            )
            .await?;
        Ok((user_token, subject_context(&txn_token.claims)))
    }
}

/// Headers a careless service sends along: the user's bearer token, which the
/// credential-stripping publisher must remove before the message leaves.
pub fn forwarded_token(user_token: &str) -> Headers {
    let mut headers = Headers::new();
    headers.append("Authorization", format!("Bearer {user_token}"));
    headers
}

/// Headers carrying a reference for `alice` that an attacker signed with their own key,
/// claiming to be `producer`: what an unguarded publisher would send to `consumer`.
pub fn forged_reference(
    producer: &str,
    consumer: &str,
    action: &str,
    destination: &str,
    payload: &[u8],
) -> Result<Headers, WiringError> {
    let forger = SigningKey::generate(SigningAlg::ES256, format!("{}-1", short(producer)))?;
    let forged =
        ContextRefMinter::new(producer, forger, Duration::from_secs(60)).mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[consumer.to_string()],
            scope: &Scope::parse(action),
            txn: "forged",
            destination,
            payload,
        })?;
    Ok([(CTX_REF_HEADER, forged.token)].into_iter().collect())
}
