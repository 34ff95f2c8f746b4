//! The minting and validation code of the Transaction Token Service, shared by
//! the HTTP service and the in-process mode: authenticate the requesting
//! workload → validate the request → validate the subject token → decide the
//! scope → mint and log.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use elevate_core::ctxref::{ContextRefVerifier, MAX_LEEWAY, VerifyPolicy, unix_now};
use elevate_core::jws;
use elevate_core::keys::{KeyError, KeySet, SigningAlg, SigningKey, sha256_hex};
use elevate_core::scope::Scope;
use elevate_core::token::TXN_TOKEN_TYP;
use jsonwebtoken::jwk::Jwk;
use serde::{Deserialize, Serialize};

use super::admin::AdminApi;
use super::config::{ConfigError, ServiceConfig, resolve};
use super::fleet::Fleet;
use super::key_files::{jwks_from_value, read_key_file};
use super::keyring::{KeyRing, derived_kid, generate_key_of};
use super::metrics::Metrics;
use super::registry::{WorkloadEntry, WorkloadRegistry};
use super::tls::ClientCertificate;
use super::user_issuer::AccessTokenVerifier;
use txn_token_client::assertion::{ASSERTION_TYP, AssertionClaims, AssertionVerifier};
use txn_token_client::protocol::{
    CLIENT_ASSERTION_TYPE_JWT_BEARER, ClientAuthMethod, ErrorCode, ExchangeForm,
    GRANT_TYPE_TOKEN_EXCHANGE, MAX_CONTEXT_PARAM_BYTES, MAX_CONTEXT_PARAM_DEPTH, OAuthError,
    TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, TOKEN_TYPE_NA, TOKEN_TYPE_TXN_TOKEN, TokenResponse,
};
use txn_token_client::verify::JwksProvider;

/// Token endpoint URL used in process when no public URL is configured.
pub const IN_PROCESS_ENDPOINT: &str = "inproc://txn-token-service";

/// Issuer settings (the parts of [`ServiceConfig`] that shape tokens).
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// Trust domain: the accepted `audience` and the tokens' `aud`.
    pub trust_domain: String,
    /// Token endpoint path.
    pub token_path: String,
    /// Public base URL, when known; else the bound address (HTTP) or [`IN_PROCESS_ENDPOINT`].
    pub public_url: Option<String>,
    /// Txn-Token lifetime.
    pub token_lifetime: Duration,
    /// Clock leeway for subject tokens and client assertions (≤ 30 s).
    pub leeway: Duration,
    /// Longest accepted context-reference horizon (`exp - iat`).
    pub max_reference_horizon: Duration,
    /// Local cap on delegation chain depth.
    pub max_depth: u32,
    /// Previous signing keys kept in the JWKS after rotation, on top of those
    /// kept for [`IssuerSettings::key_retention`].
    pub keep_previous_keys: usize,
    /// `Cache-Control: max-age` of the workload key directory.
    pub workload_jwks_max_age: Duration,
    /// The algorithm of the keys [`Issuer::generate`] and fleet rotations
    /// generate (`signing_alg`; ES256 by default, EdDSA is cheaper to sign
    /// and verify). A ring rotates to its current key's algorithm.
    pub signing_alg: SigningAlg,
}

impl IssuerSettings {
    /// Defaults: `/token`, 60 s tokens, 30 s leeway, 24 h horizon, depth 4,
    /// one previous key, ES256 signing keys.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        IssuerSettings {
            trust_domain: trust_domain.into(),
            token_path: txn_token_client::protocol::DEFAULT_TOKEN_PATH.to_string(),
            public_url: None,
            token_lifetime: Duration::from_secs(60),
            leeway: Duration::from_secs(30),
            max_reference_horizon: Duration::from_secs(24 * 3600),
            max_depth: 4,
            keep_previous_keys: 1,
            workload_jwks_max_age: Duration::from_secs(30),
            signing_alg: SigningAlg::ES256,
        }
    }

    /// How long a retired signing key stays in the JWKS at least: the longest a
    /// Txn-Token it signed can be accepted, i.e. the token lifetime (as minted,
    /// at least 1 s) plus the most leeway any verifier grants ([`MAX_LEEWAY`]).
    pub fn key_retention(&self) -> Duration {
        self.token_lifetime.max(Duration::from_secs(1)) + MAX_LEEWAY
    }

    /// Sets the Txn-Token lifetime.
    pub fn with_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime.min(txn_token_client::verify::MAX_TOKEN_LIFETIME);
        self
    }
}

/// The claims the service puts in a Txn-Token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MintedClaims {
    /// Issued at.
    pub iat: i64,
    /// When the Txn-Token expires (`exp`, seconds since the epoch): `iat` plus the token lifetime.
    pub exp: i64,
    /// The trust domain.
    pub aud: String,
    /// Transaction id.
    pub txn: String,
    /// The subject.
    pub sub: String,
    /// Granted scope.
    pub scope: String,
    /// The requesting workload.
    pub req_wl: String,
    /// Token id.
    pub jti: String,
    /// Transaction context: what the TTS asserts (`txn`, `producer`, `chain`,
    /// ...), plus the requester's `request_details` object under
    /// [`TCTX_REQUEST_DETAILS`] when it sent one.
    pub tctx: serde_json::Value,
    /// Requester context: `req_wl` (asserted by the TTS), plus the requester's
    /// `request_context` object under [`RCTX_REQUEST_CONTEXT`] when it sent one.
    pub rctx: serde_json::Value,
    /// Confirmation (RFC 7800): when the requester authenticated with its
    /// certificate (`tls_client_auth`), `{"x5t#S256": <base64url SHA-256 of
    /// the DER certificate>}` binds the token to it (RFC 8705 §3.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<serde_json::Value>,
}

/// A minted token: the response to send and the claims it carries.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The token response body.
    pub response: TokenResponse,
    /// The claims minted.
    pub claims: MintedClaims,
}

/// The authenticated requester and, for `tls_client_auth`, the token's `cnf`.
struct Requester {
    id: String,
    cnf: Option<serde_json::Value>,
    assertion: Option<AssertionUse>,
}

/// A verified client assertion's identity, for the fleet-wide single-use check.
#[derive(Debug, Clone)]
struct AssertionUse {
    iss: String,
    jti: String,
    until: i64,
}

/// An exchange checked and ready to mint (all but the fleet-wide `jti` claim).
struct Prepared {
    subject: Subject,
    granted: Scope,
    requester: String,
    rctx: serde_json::Value,
    cnf: Option<serde_json::Value>,
    assertion: Option<AssertionUse>,
}

/// Who and what the subject token says.
struct Subject {
    sub: String,
    txn: String,
    ceiling: Scope,
    tctx: serde_json::Value,
}

/// The Transaction Token Service's state and logic.
pub struct Issuer {
    settings: IssuerSettings,
    ring: KeyRing,
    registry: WorkloadRegistry,
    refs: ContextRefVerifier,
    assertions: AssertionVerifier,
    endpoints: ArcSwap<Vec<String>>,
    users: ArcSwapOption<AccessTokenVerifier>,
    tls_client_auth: AtomicBool,
    fleet: OnceLock<Arc<Fleet>>,
    admin: OnceLock<Arc<AdminApi>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("trust_domain", &self.settings.trust_domain)
            .field("endpoints", &self.endpoints.load())
            .field("workloads", &self.registry.len())
            .finish_non_exhaustive()
    }
}

fn invalid(code: ErrorCode, d: impl AsRef<str>) -> OAuthError {
    OAuthError::new(code, d)
}

impl Issuer {
    /// An issuer signing with `signing_key` (ES256 or EdDSA; the service
    /// generates keys of its `signing_alg`).
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if the public half of `signing_key` cannot be published in
    /// the key set.
    pub fn new(settings: IssuerSettings, signing_key: SigningKey) -> Result<Arc<Self>, KeyError> {
        let registry = WorkloadRegistry::new();
        let mut policy = VerifyPolicy::new("");
        policy.leeway = settings.leeway.min(Duration::from_secs(30));
        policy.max_horizon = settings.max_reference_horizon;
        policy.max_depth = settings.max_depth;
        let refs = ContextRefVerifier::with_shared_keys(registry.keys().clone(), policy);
        let primary = match &settings.public_url {
            Some(u) => format!("{}{}", u.trim_end_matches('/'), settings.token_path),
            None => format!("{IN_PROCESS_ENDPOINT}{}", settings.token_path),
        };
        Ok(Arc::new(Issuer {
            ring: KeyRing::new(
                signing_key,
                settings.keep_previous_keys,
                settings.key_retention(),
            )?,
            assertions: AssertionVerifier::new(settings.leeway, Duration::from_secs(300)),
            settings,
            registry,
            refs,
            endpoints: ArcSwap::from_pointee(vec![primary]),
            users: ArcSwapOption::empty(),
            tls_client_auth: AtomicBool::new(false),
            fleet: OnceLock::new(),
            admin: OnceLock::new(),
            metrics: Metrics::default(),
        }))
    }

    /// An issuer with a freshly generated signing key of
    /// [`IssuerSettings::signing_alg`].
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::Generation`] if no key can be generated, and the errors of
    /// [`new`](Self::new).
    pub fn generate(settings: IssuerSettings) -> Result<Arc<Self>, KeyError> {
        let key = generate_key_of(settings.signing_alg)?;
        Self::new(settings, key)
    }

    /// Builds the issuer from a configuration file's contents (`base` resolves relative paths).
    ///
    /// # Errors
    ///
    /// Returns [`ConfigError::Key`] if the signing key file cannot be read or loaded, or a
    /// workload's key is refused; [`ConfigError::Invalid`] if a workload has both or neither of
    /// `public_jwk` and `jwk_file`, or `token_endpoint_auth_methods` names a workload not in
    /// `[[workloads]]`; [`ConfigError::Io`] or [`ConfigError::Parse`] if a JWK or JWKS
    /// file cannot be read or parsed, or holds no key (see [`read_key_file`]); and the errors of
    /// [`AccessTokenVerifier::from_config`] for the `[user_issuer]` section.
    pub fn from_config(cfg: &ServiceConfig, base: &Path) -> Result<Arc<Self>, ConfigError> {
        let mut settings = IssuerSettings::new(&cfg.trust_domain);
        settings.token_path = cfg.token_endpoint_path.clone();
        settings.public_url = cfg.public_url.clone();
        settings.token_lifetime = Duration::from_secs(cfg.token_lifetime_secs);
        settings.keep_previous_keys = cfg.keep_previous_keys;
        settings.workload_jwks_max_age = Duration::from_secs(cfg.workload_jwks_max_age_secs);
        settings.signing_alg = cfg.signing_alg;
        let key_err = |what: &str| {
            let what = what.to_string();
            move |source| ConfigError::Key { what, source }
        };
        let alg = cfg.signing_alg;
        let what = format!("signing key (signing_alg = {})", alg.as_str());
        let key = match &cfg.signing_key_pem {
            Some(p) => {
                let path = resolve(base, p);
                let k = SigningKey::from_pem_file(alg, "pending", &path).map_err(key_err(&what))?;
                let kid = cfg
                    .signing_key_kid
                    .clone()
                    .unwrap_or_else(|| derived_kid(&k));
                SigningKey::from_pkcs8_pem(alg, kid, &k.to_pkcs8_pem()).map_err(key_err(&what))?
            }
            None => generate_key_of(alg).map_err(key_err(&what))?,
        };
        tracing::info!(kid = %key.kid(), alg = alg.as_str(), "Txn-Token signing key");
        let issuer = Self::new(settings, key).map_err(key_err(&what))?;
        for w in &cfg.workloads {
            let jwks = match (&w.public_jwk, &w.jwk_file) {
                (Some(v), None) => {
                    jwks_from_value(v.clone()).map_err(|reason| ConfigError::Parse {
                        path: format!("workload {}", w.id),
                        reason,
                    })?
                }
                (None, Some(p)) => read_key_file(&resolve(base, p))?,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "workload {} needs exactly one of public_jwk or jwk_file (jwks_file)",
                        w.id
                    )));
                }
            };
            let what = format!("workload {}", w.id);
            let (first, rest) = jwks.split_first().ok_or_else(|| {
                ConfigError::Invalid(format!("workload {} has no public key", w.id))
            })?;
            issuer
                .register_workload(&w.id, first, &w.allowed_scopes.iter().collect())
                .map_err(key_err(&what))?;
            for jwk in rest {
                issuer
                    .add_workload_key(&w.id, jwk)
                    .map_err(key_err(&what))?;
            }
        }
        for (id, methods) in &cfg.token_endpoint_auth_methods {
            if !issuer.set_workload_auth_methods(id, methods) {
                return Err(ConfigError::Invalid(format!(
                    "token_endpoint_auth_methods names {id:?}, which is not among [[workloads]]"
                )));
            }
        }
        issuer
            .registry
            .add_known_scopes(&cfg.scopes.iter().collect());
        if let Some(u) = &cfg.user_issuer {
            issuer.set_user_issuer(AccessTokenVerifier::from_config(u, base)?);
        }
        Ok(issuer)
    }

    /// Registers a workload's public key and the scopes it may be granted.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if the JWK is not a usable public key, or its `kid` is
    /// already registered to another workload.
    pub fn register_workload(
        &self,
        id: &str,
        public_jwk: &Jwk,
        allowed_scopes: &Scope,
    ) -> Result<(), KeyError> {
        self.registry.register(id, public_jwk, allowed_scopes)
    }

    /// Adds a public key to a registered workload, keeping its other keys
    /// (a rollover: both verify until the old one is removed).
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if the workload is not registered, the JWK is not a usable
    /// public key, or its `kid` is registered to another workload.
    pub fn add_workload_key(&self, id: &str, public_jwk: &Jwk) -> Result<(), KeyError> {
        self.registry.add_key(id, public_jwk)?;
        tracing::info!(workload = %id, kid = ?public_jwk.common.key_id, "workload key added");
        Ok(())
    }

    /// Removes one key of a workload (the end of a rollover). Returns false
    /// when the workload does not own that `kid`.
    pub fn remove_workload_key(&self, id: &str, kid: &str) -> bool {
        let removed = self.registry.remove_key(id, kid);
        tracing::info!(workload = %id, %kid, removed, "workload key removed");
        removed
    }

    /// Makes `jwks` the whole key set of a registered workload, at once (what
    /// a reloaded key file does); on an error its keys stay as they were.
    ///
    /// # Errors
    ///
    /// The errors of [`WorkloadRegistry::replace_keys`].
    pub fn replace_workload_keys(&self, id: &str, jwks: &[Jwk]) -> Result<(), KeyError> {
        self.registry.replace_keys(id, jwks)
    }

    /// The `kid`s a workload owns, sorted.
    pub fn workload_kids(&self, id: &str) -> Vec<String> {
        self.registry.kids_of(id)
    }

    /// The trust domain's key directory (`GET /.well-known/workload-jwks`):
    /// every key of every registered, non-suspended workload with its owner
    /// (see [`elevate_core::keys::directory`]).
    pub fn workload_jwks(&self) -> serde_json::Value {
        self.registry.workload_jwks()
    }

    /// Removes a workload from the registry (its keys and allowance): it gets no
    /// Txn-Token, and every exchange of a reference whose chain passes through
    /// it is refused `invalid_grant` — messages already in flight included.
    /// Returns false when it was not registered.
    pub fn revoke_workload(&self, id: &str) -> bool {
        let removed = self.registry.remove(id);
        tracing::warn!(workload = %id, removed, "workload removed from the registry");
        removed
    }

    /// Withdraws trust from a workload (keys kept, e.g. while investigating):
    /// same effect on exchanges as [`Issuer::revoke_workload`] until
    /// [`Issuer::reinstate_workload`]. Returns false when it is not registered.
    pub fn suspend_workload(&self, id: &str) -> bool {
        let suspended = self.registry.suspend(id);
        tracing::warn!(workload = %id, suspended, "workload suspended");
        suspended
    }

    /// Restores trust in a suspended workload. Returns false when it was not suspended.
    pub fn reinstate_workload(&self, id: &str) -> bool {
        let reinstated = self.registry.reinstate(id);
        tracing::info!(workload = %id, reinstated, "workload reinstated");
        reinstated
    }

    /// Sets the client authentication methods a registered workload may use
    /// at the token endpoint (by default `private_key_jwt` only). Returns
    /// false when it is not registered.
    pub fn set_workload_auth_methods(&self, id: &str, methods: &[ClientAuthMethod]) -> bool {
        let set = self.registry.set_auth_methods(id, methods);
        let names: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
        tracing::info!(workload = %id, methods = ?names, set, "workload client authentication methods");
        set
    }

    /// The client authentication methods a workload may use (none when it is
    /// not registered).
    pub fn workload_auth_methods(&self, id: &str) -> Vec<ClientAuthMethod> {
        self.registry.auth_methods(id)
    }

    /// True when a listener asks clients for certificates, so
    /// `tls_client_auth` can be used (the 401 challenge then names it).
    pub fn offers_tls_client_auth(&self) -> bool {
        self.tls_client_auth.load(Ordering::Relaxed)
    }

    /// Marks `tls_client_auth` as offered (a TLS listener with a client CA).
    pub(crate) fn offer_tls_client_auth(&self) {
        self.tls_client_auth.store(true, Ordering::Relaxed);
    }

    /// True when `id` is registered and not suspended.
    pub fn is_trusted_workload(&self, id: &str) -> bool {
        self.registry.is_trusted(id)
    }

    /// Every registered workload (keys, scopes, methods, suspension), sorted by id.
    pub fn workload_entries(&self) -> Vec<WorkloadEntry> {
        self.registry.entries()
    }

    /// Makes the registry exactly `entries` (a fleet replica's reload); the
    /// workloads left out for refused keys are returned with the reason.
    pub fn replace_registry(&self, entries: &[WorkloadEntry]) -> Vec<(String, String)> {
        self.registry.replace_all(entries)
    }

    /// The key now signing (with its private half: the fleet seeds the store with it).
    pub fn signing_key(&self) -> SigningKey {
        self.ring.current()
    }

    /// Installs the fleet's signing keys: `current` signs, `others` are published.
    /// Returns false when nothing changed.
    ///
    /// # Errors
    ///
    /// Returns [`KeyError::InvalidJwk`] if a key cannot be published.
    pub fn install_signing_keys(
        &self,
        current: SigningKey,
        others: Vec<SigningKey>,
    ) -> Result<bool, KeyError> {
        self.ring.install(current, others)
    }

    /// The published signing `kid`s, current first.
    pub fn published_kids(&self) -> Vec<String> {
        self.ring.kids()
    }

    /// Connects this issuer to a fleet (set once; see [`Fleet::attach`]).
    pub fn attach_fleet(&self, fleet: Arc<Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// The fleet this issuer belongs to, if any.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.get()
    }

    /// Enables the authenticated admin API (set once).
    pub fn set_admin(&self, admin: AdminApi) {
        let _ = self.admin.set(Arc::new(admin));
    }

    /// The admin API, when configured.
    pub fn admin(&self) -> Option<&Arc<AdminApi>> {
        self.admin.get()
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The accepted `aud` values of admin assertions: `BASE/admin` for every
    /// base URL the token endpoint is reachable under.
    pub fn admin_audiences(&self) -> Vec<String> {
        let path = &self.settings.token_path;
        self.endpoints
            .load()
            .iter()
            .filter_map(|e| e.strip_suffix(path.as_str()))
            .map(|base| format!("{base}/admin"))
            .collect()
    }

    /// Accepts user access tokens from this issuer (entry flow).
    pub fn set_user_issuer(&self, verifier: AccessTokenVerifier) {
        self.users.store(Some(Arc::new(verifier)));
    }

    /// Adds a URL under which the token endpoint is reachable (client assertion `aud`).
    pub fn add_token_endpoint(&self, url: String) {
        self.endpoints.rcu(|cur| {
            let mut v = (**cur).clone();
            if !v.contains(&url) {
                v.push(url.clone());
            }
            v
        });
    }

    /// The primary token endpoint URL (what an in-process client addresses its assertion to).
    pub fn token_endpoint(&self) -> String {
        self.endpoints.load().first().cloned().unwrap_or_default()
    }

    /// The settings in force.
    pub fn settings(&self) -> &IssuerSettings {
        &self.settings
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.settings.trust_domain
    }

    /// The published JWKS (current and previous signing keys).
    pub fn jwks(&self) -> serde_json::Value {
        self.ring.jwks()
    }

    /// The published keys as a key set.
    pub fn public_keys(&self) -> KeySet {
        self.ring.keyset()
    }

    /// The `kid` now signing.
    pub fn current_kid(&self) -> String {
        self.ring.current().kid().to_string()
    }

    /// Rotates to a fresh key of the current key's algorithm; the old key stays published for at least
    /// [`IssuerSettings::key_retention`], however often keys rotate. Returns the new `kid`.
    ///
    /// # Errors
    ///
    /// Returns a [`KeyError`] if a fresh key cannot be generated or published; the current key then
    /// stays in use.
    pub fn rotate_keys(&self) -> Result<String, KeyError> {
        let kid = self.ring.rotate()?;
        tracing::info!(kid = %kid, "signing key rotated");
        Ok(kid)
    }

    /// Handles one token request end to end (no TLS client certificate: the
    /// in-process mode, plain HTTP, or a TLS client that presented none).
    ///
    /// # Errors
    ///
    /// The errors of [`exchange_with_certificate`](Self::exchange_with_certificate).
    pub fn exchange(&self, form: &ExchangeForm) -> Result<Issued, OAuthError> {
        self.exchange_with_certificate(form, None)
    }

    /// Handles one token request end to end, `certificate` being the client
    /// certificate verified on the request's TLS connection, if any. The
    /// client authenticates with exactly one method: a `private_key_jwt`
    /// assertion (no certificate), or `tls_client_auth` (a certificate whose
    /// URI SAN is a registered workload that allows it, and no assertion).
    ///
    /// # Errors
    ///
    /// Returns an [`OAuthError`] whose code the token endpoint answers with: `invalid_request` for
    /// a missing, repeated or malformed parameter; `unsupported_grant_type`; `invalid_client` if
    /// the client sent both a certificate and an assertion, or neither, the assertion fails, the
    /// certificate names no registered workload (or several), or the workload does not allow the
    /// method used; `unauthorized_client` if the requesting workload is suspended;
    /// `invalid_target` if `audience` is not this trust domain; `invalid_grant` if the subject
    /// token does not verify; `invalid_scope` if the scope is not allowed; and `server_error` if
    /// signing fails.
    pub fn exchange_with_certificate(
        &self,
        form: &ExchangeForm,
        certificate: Option<&ClientCertificate>,
    ) -> Result<Issued, OAuthError> {
        let start = Instant::now();
        let result = self
            .exchange_inner(form, certificate)
            .and_then(|p| self.finish(p));
        self.account(result, start)
    }

    /// As [`exchange_with_certificate`](Self::exchange_with_certificate), and
    /// in fleet mode the client assertion's `jti` is claimed in the shared
    /// store before the token is minted, so an assertion is accepted once by
    /// the whole fleet (what the HTTP service calls).
    ///
    /// # Errors
    ///
    /// The errors of [`exchange_with_certificate`](Self::exchange_with_certificate);
    /// also `invalid_client` when another replica saw the assertion's `jti`,
    /// and `server_error` when the shared store cannot be reached (deny by default).
    pub async fn exchange_shared(
        &self,
        form: &ExchangeForm,
        certificate: Option<&ClientCertificate>,
    ) -> Result<Issued, OAuthError> {
        let start = Instant::now();
        let result = match self.exchange_inner(form, certificate) {
            Ok(p) => match self.claim_assertion(p.assertion.as_ref()).await {
                Ok(()) => self.finish(p),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        self.account(result, start)
    }

    async fn claim_assertion(&self, a: Option<&AssertionUse>) -> Result<(), OAuthError> {
        let (Some(fleet), Some(a)) = (self.fleet.get(), a) else {
            return Ok(());
        };
        let t = Instant::now();
        let claimed = fleet
            .store()
            .claim_jti("client", &a.iss, &a.jti, a.until)
            .await;
        self.metrics.store_call(t.elapsed(), claimed.is_ok());
        match claimed {
            Ok(true) => Ok(()),
            Ok(false) => Err(invalid(
                ErrorCode::InvalidClient,
                "assertion jti replayed (seen by the fleet)",
            )),
            Err(e) => {
                tracing::error!(error = %e, "jti claim failed: refusing");
                Err(invalid(
                    ErrorCode::ServerError,
                    "shared state unavailable; retry",
                ))
            }
        }
    }

    fn account(
        &self,
        result: Result<Issued, OAuthError>,
        start: Instant,
    ) -> Result<Issued, OAuthError> {
        match &result {
            Ok(_) => self.metrics.exchange(None, start.elapsed()),
            Err(e) => {
                self.metrics
                    .exchange(Some(e.code.as_str()), start.elapsed());
                tracing::info!(code = %e.code, reason = %e.description(), "txn-token request refused");
            }
        }
        result
    }

    fn finish(&self, p: Prepared) -> Result<Issued, OAuthError> {
        self.mint(p.subject, p.granted, p.requester, p.rctx, p.cnf)
    }

    fn exchange_inner(
        &self,
        form: &ExchangeForm,
        certificate: Option<&ClientCertificate>,
    ) -> Result<Prepared, OAuthError> {
        // 1. grant
        let grant = form.require("grant_type")?;
        if grant != GRANT_TYPE_TOKEN_EXCHANGE {
            return Err(invalid(
                ErrorCode::UnsupportedGrantType,
                "only token exchange is supported",
            ));
        }
        // 2. client authentication (a suspended workload authenticates but gets nothing)
        let Requester {
            id: requester,
            cnf,
            assertion,
        } = self.authenticate(form, certificate)?;
        if !self.registry.is_trusted(&requester) {
            return Err(invalid(
                ErrorCode::UnauthorizedClient,
                format!("workload {requester} is suspended"),
            ));
        }
        // 3. request shape
        let requested = form.require("requested_token_type")?;
        if requested != TOKEN_TYPE_TXN_TOKEN {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                "requested_token_type must be the txn_token URN",
            ));
        }
        let audience = form.require("audience")?;
        if audience != self.settings.trust_domain {
            return Err(invalid(
                ErrorCode::InvalidTarget,
                format!("audience {audience:?} is not this trust domain"),
            ));
        }
        let subject_token = form.require("subject_token")?;
        let subject_token_type = form.require("subject_token_type")?;
        let scope_param = form.require("scope")?;
        let request_context = json_object_param(form, "request_context")?;
        let request_details = json_object_param(form, "request_details")?;
        // 4. subject token
        let mut subject = match subject_token_type {
            TOKEN_TYPE_JWT => self.context_reference(subject_token, &requester)?,
            TOKEN_TYPE_ACCESS_TOKEN => self.user_token(subject_token)?,
            other => {
                return Err(invalid(
                    ErrorCode::InvalidRequest,
                    format!("unsupported subject_token_type {other:?}"),
                ));
            }
        };
        // 5. scope: requested ⊆ subject ceiling ∩ registry allowance, all known
        let requested_scope = Scope::parse(scope_param);
        let granted = self.decide_scope(&requested_scope, &subject.ceiling, &requester)?;
        // 6. mint: the requester's objects each go under one member of their
        // own, beside what the TTS asserts, so they can never stand in for it.
        if let (Some(details), Some(tctx)) = (request_details, subject.tctx.as_object_mut()) {
            tctx.insert(TCTX_REQUEST_DETAILS.to_string(), details);
        }
        let mut rctx = serde_json::json!({ "req_wl": requester });
        if let (Some(context), Some(r)) = (request_context, rctx.as_object_mut()) {
            r.insert(RCTX_REQUEST_CONTEXT.to_string(), context);
        }
        Ok(Prepared {
            subject,
            granted,
            requester,
            rctx,
            cnf,
            assertion,
        })
    }

    /// Client authentication: exactly one method per request (RFC 6749
    /// §2.3), and only one the workload allows.
    fn authenticate(
        &self,
        form: &ExchangeForm,
        certificate: Option<&ClientCertificate>,
    ) -> Result<Requester, OAuthError> {
        let asserted =
            form.get("client_assertion").is_some() || form.get("client_assertion_type").is_some();
        match (asserted, certificate) {
            (true, Some(cert)) => {
                tracing::info!(cert_sha256 = %cert.sha256_hex(), "client sent a certificate and an assertion");
                Err(invalid(
                    ErrorCode::InvalidClient,
                    "a client certificate and a client assertion: authenticate with one method \
                     (tls_client_auth: no client_assertion; private_key_jwt: no certificate)",
                ))
            }
            (false, Some(cert)) => self.certificate_client(form, cert),
            (true, None) => {
                let (id, used) = self.assertion_client(form)?;
                if !self
                    .registry
                    .allows_auth(&id, ClientAuthMethod::PrivateKeyJwt)
                {
                    return Err(invalid(
                        ErrorCode::InvalidClient,
                        format!("workload {id} may not authenticate with private_key_jwt"),
                    ));
                }
                Ok(Requester {
                    id,
                    cnf: None,
                    assertion: Some(used),
                })
            }
            (false, None) => Err(invalid(
                ErrorCode::InvalidClient,
                if self.offers_tls_client_auth() {
                    "client authentication required: a private_key_jwt client assertion, \
                     or a tls_client_auth client certificate"
                } else {
                    "client authentication (private_key_jwt client assertion) required"
                },
            )),
        }
    }

    /// RFC 8705 §2.1.2 `tls_client_auth`: the verified certificate's URI SAN
    /// names the workload (the one `client_id` names, when sent), which must
    /// be registered and allow the method. The token is bound to the
    /// certificate (`cnf.x5t#S256`).
    fn certificate_client(
        &self,
        form: &ExchangeForm,
        cert: &ClientCertificate,
    ) -> Result<Requester, OAuthError> {
        let fp = cert.sha256_hex();
        let client_id = form.get("client_id");
        let refuse = |why: String| {
            tracing::info!(cert_sha256 = %fp, uri_sans = ?cert.uri_sans(), client_id = ?client_id, reason = %why, "tls_client_auth refused");
            invalid(ErrorCode::InvalidClient, why)
        };
        if let Some(c) = client_id
            && !cert.uri_sans().iter().any(|u| u == c)
        {
            return Err(refuse(format!(
                "client_id {c:?} is not a URI SAN of the client certificate"
            )));
        }
        let named: Vec<&String> = cert
            .uri_sans()
            .iter()
            .filter(|u| client_id.is_none_or(|c| c == u.as_str()))
            .filter(|u| self.registry.is_registered(u))
            .collect();
        let id = match named.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(refuse(format!(
                    "the client certificate names no registered workload (URI SANs: {})",
                    cert.uri_sans().join(" ")
                )));
            }
            _ => {
                return Err(refuse(
                    "the client certificate names several registered workloads: send client_id"
                        .to_string(),
                ));
            }
        };
        if !self
            .registry
            .allows_auth(&id, ClientAuthMethod::TlsClientAuth)
        {
            return Err(refuse(format!(
                "workload {id} may not authenticate with tls_client_auth"
            )));
        }
        tracing::debug!(workload = %id, cert_sha256 = %fp, "tls_client_auth");
        Ok(Requester {
            id,
            cnf: Some(serde_json::json!({ "x5t#S256": cert.x5t_s256() })),
            assertion: None,
        })
    }

    /// RFC 7523 `private_key_jwt`: the assertion's signer is the workload.
    fn assertion_client(&self, form: &ExchangeForm) -> Result<(String, AssertionUse), OAuthError> {
        let (Some(kind), Some(assertion)) = (
            form.get("client_assertion_type"),
            form.get("client_assertion"),
        ) else {
            return Err(invalid(
                ErrorCode::InvalidClient,
                "client authentication (private_key_jwt client assertion) required",
            ));
        };
        if kind != CLIENT_ASSERTION_TYPE_JWT_BEARER {
            return Err(invalid(
                ErrorCode::InvalidClient,
                "unsupported client_assertion_type",
            ));
        }
        let keys = self.registry.keys().load();
        let endpoints = self.endpoints.load();
        let who = self
            .assertions
            .verify(assertion, form.get("client_id"), &keys, &endpoints)
            .map_err(|e| invalid(ErrorCode::InvalidClient, e.to_string()))?;
        // Verified above; read again for the fleet-wide single-use claim.
        let claims: AssertionClaims = jws::parse(assertion, ASSERTION_TYP)
            .and_then(|p| p.claims())
            .map_err(|e| invalid(ErrorCode::InvalidClient, e.to_string()))?;
        let until = claims.exp.saturating_add(MAX_LEEWAY.as_secs() as i64);
        Ok((
            who,
            AssertionUse {
                iss: claims.iss,
                jti: claims.jti,
                until,
            },
        ))
    }

    fn context_reference(&self, token: &str, requester: &str) -> Result<Subject, OAuthError> {
        let verified = self
            .refs
            .verify_unbound(token, requester)
            .map_err(|e| invalid(ErrorCode::InvalidGrant, format!("context reference: {e}")))?;
        let c = &verified.claims;
        // Signatures were checked hop by hop against the registry's keys (a
        // removed workload's hop no longer verifies); trust is checked here: a
        // suspended workload anywhere in the chain poisons every later hop.
        let chain = c.chain();
        if let Some(w) = chain.iter().find(|w| !self.registry.is_trusted(w)) {
            let why = if self.registry.is_suspended(w) {
                "is suspended"
            } else {
                "is not registered"
            };
            return Err(invalid(
                ErrorCode::InvalidGrant,
                format!("context reference: workload {w} in the delegation chain {why}"),
            ));
        }
        // The chain as the Txn-Token carries it: origin first, each hop with the
        // scope it held (the current signer's is the reference's own scope).
        let mut hops: Vec<serde_json::Value> = c
            .act
            .iter()
            .flat_map(|a| a.iter())
            .map(|a| serde_json::json!({"wl": a.sub, "scope": a.scope}))
            .collect();
        hops.reverse();
        hops.push(serde_json::json!({"wl": c.iss, "scope": c.scope}));
        Ok(Subject {
            sub: c.sub.clone(),
            txn: c.txn.clone(),
            ceiling: c.scope_set(),
            tctx: serde_json::json!({
                "txn": c.txn,
                "sub_kind": c.sub_kind.as_str(),
                "producer": c.iss,
                // A context reference (per-context binding) serves many
                // messages and names no destination: null, not "".
                "destination": (!c.dst.is_empty()).then_some(&c.dst),
                "chain": chain,
                "hops": hops,
                "depth": c.depth,
                "max_depth": c.max_depth,
                "ref_sha256": verified.token_sha256,
            }),
        })
    }

    fn user_token(&self, token: &str) -> Result<Subject, OAuthError> {
        let users = self.users.load();
        let Some(users) = users.as_ref() else {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                "access-token subject tokens are not accepted: no user issuer configured",
            ));
        };
        let claims = users
            .verify(token)
            .map_err(|e| invalid(ErrorCode::InvalidGrant, format!("access token: {e}")))?;
        let txn = uuid::Uuid::now_v7().to_string();
        Ok(Subject {
            ceiling: claims.scope_set(),
            tctx: serde_json::json!({
                "txn": txn,
                "sub_kind": "human",
                "entry": "access_token",
                "user_iss": claims.iss,
                "at_sha256": sha256_hex(token.as_bytes()),
            }),
            sub: claims.sub,
            txn,
        })
    }

    fn decide_scope(
        &self,
        requested: &Scope,
        ceiling: &Scope,
        requester: &str,
    ) -> Result<Scope, OAuthError> {
        if requested.is_empty() {
            return Err(invalid(ErrorCode::InvalidScope, "empty scope"));
        }
        if let Some(unknown) = requested.iter().find(|s| !self.registry.is_known_scope(s)) {
            return Err(invalid(
                ErrorCode::InvalidScope,
                format!("unknown scope {unknown:?}"),
            ));
        }
        let allowed = self.registry.allowed(requester).unwrap_or_default();
        if !requested.is_subset(&allowed) {
            return Err(invalid(
                ErrorCode::InvalidScope,
                format!("scope {requested} exceeds what {requester} may be granted"),
            ));
        }
        if !requested.is_subset(ceiling) {
            return Err(invalid(
                ErrorCode::InvalidScope,
                format!("scope {requested} exceeds the subject token's scope {ceiling}"),
            ));
        }
        Ok(requested.clone())
    }

    fn mint(
        &self,
        subject: Subject,
        scope: Scope,
        req_wl: String,
        rctx: serde_json::Value,
        cnf: Option<serde_json::Value>,
    ) -> Result<Issued, OAuthError> {
        let now = unix_now();
        let lifetime = self.settings.token_lifetime.as_secs().max(1);
        let claims = MintedClaims {
            iat: now,
            exp: now + lifetime as i64,
            aud: self.settings.trust_domain.clone(),
            txn: subject.txn,
            sub: subject.sub,
            scope: scope.to_string(),
            req_wl,
            jti: uuid::Uuid::now_v7().to_string(),
            tctx: subject.tctx,
            rctx,
            cnf,
        };
        let key = self.ring.current();
        let token = jws::sign(&key, TXN_TOKEN_TYP, &claims)
            .map_err(|e| invalid(ErrorCode::ServerError, format!("signing failed: {e}")))?;
        tracing::info!(
            txn = %claims.txn,
            sub = %claims.sub,
            req_wl = %claims.req_wl,
            scope = %claims.scope,
            jti = %claims.jti,
            kid = %key.kid(),
            cnf_x5t_s256 = ?claims.cnf.as_ref().and_then(|c| c["x5t#S256"].as_str()),
            token_sha256 = %sha256_hex(token.as_bytes()),
            "txn-token issued"
        );
        Ok(Issued {
            response: TokenResponse {
                access_token: token,
                issued_token_type: TOKEN_TYPE_TXN_TOKEN.to_string(),
                token_type: TOKEN_TYPE_NA.to_string(),
                expires_in: Some(lifetime),
                scope: None,
                refresh_token: None,
            },
            claims,
        })
    }
}

/// The `tctx` member that carries the requester's `request_details` object.
pub const TCTX_REQUEST_DETAILS: &str = "request_details";
/// The `rctx` member that carries the requester's `request_context` object.
pub const RCTX_REQUEST_CONTEXT: &str = "request_context";

/// Nesting depth of a JSON value (a scalar is 0, `{}` is 1).
fn json_depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// An optional parameter that must be a JSON object when present, of at most
/// [`MAX_CONTEXT_PARAM_BYTES`] and [`MAX_CONTEXT_PARAM_DEPTH`] levels.
fn json_object_param(
    form: &ExchangeForm,
    name: &str,
) -> Result<Option<serde_json::Value>, OAuthError> {
    let Some(raw) = form.get(name) else {
        return Ok(None);
    };
    let refuse = |why: String| invalid(ErrorCode::InvalidRequest, format!("{name} {why}"));
    if raw.len() > MAX_CONTEXT_PARAM_BYTES {
        return Err(refuse(format!(
            "is {} bytes, more than the {MAX_CONTEXT_PARAM_BYTES} accepted",
            raw.len()
        )));
    }
    // serde_json refuses nesting past 128 levels itself, so the depth walk is bounded.
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(v) if !v.is_object() => Err(refuse("must be a JSON object".into())),
        Ok(v) if json_depth(&v) > MAX_CONTEXT_PARAM_DEPTH => Err(refuse(format!(
            "nests deeper than {MAX_CONTEXT_PARAM_DEPTH} levels"
        ))),
        Ok(v) => Ok(Some(v)),
        Err(e) => Err(refuse(format!("is not JSON: {e}"))),
    }
}

#[async_trait::async_trait]
impl JwksProvider for Issuer {
    async fn fetch(&self) -> Result<KeySet, String> {
        Ok(self.public_keys())
    }
}
