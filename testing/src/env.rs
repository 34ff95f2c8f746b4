//! The test environment every conformance scenario and broker test shares:
//! real keys, the example Cedar bundle, a real Transaction Token Service over
//! HTTP on loopback (stoppable, to simulate an outage), a producer guard for
//! `orders-api` and processors for the `test-worker` consumer. The benchmark
//! (`elevate-bench`) runs on it too, wiring its guards with
//! [`TestEnv::guard_with`] (the TTS in process or over HTTP, a PDP and a
//! decision log of its choice).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use elevate_cedar::CedarPdp;
use elevate_core::ctxbind::{
    AudienceKeys, BindingMode, ContextBinder, ContextOpener, KeyAgreementKey,
};
use elevate_core::ctxref::{
    ContextRefMinter, ContextRefVerifier, MintRequest, VerifyPolicy, unix_now,
};
use elevate_core::decision::{DecisionRecord, DecisionSink, MemorySink};
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::pdp::PolicyDecisionPoint;
use elevate_core::producer::{ProducerGuard, PublishRequest, SubjectContext};
use elevate_core::retry::RetryPolicy;
use elevate_core::scope::Scope;
use elevate_core::settle::{Handler, Processor, UnboundDeadLetters};
use elevate_core::strip::CredentialPolicy;
use elevate_core::token::TokenSource;
use elevate_core::{
    AuthContext, CTX_REF_HEADER, FixedAction, Guard, Headers, InboundMessage, SubjectKind,
    handler_fn,
};
use parking_lot::Mutex;

use txn_token_client::{TtsClient, TtsClientConfig};

use crate::tts::TestWorkload;
use crate::tts_env::{LoopbackTts, TEST_SCOPES};

/// The trust domain of the example bundle.
pub const TRUST_DOMAIN: &str = "elevate.example";
/// The producing workload in tests.
pub const PRODUCER: &str = "spiffe://elevate.example/orders-api";
/// The consuming workload in tests.
pub const CONSUMER: &str = "spiffe://elevate.example/test-worker";
/// The action test consumers perform.
pub const ACTION: &str = "test.process";

/// Path of the example policy bundle.
pub fn policy_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
}

tokio::task_local! {
    /// The binding mode [`TestEnv::start`] wires its producer with, for the
    /// scenarios run inside [`with_binding`].
    static BINDING: BindingMode;
}

/// Runs `f` with every [`TestEnv`] it starts publishing in `mode` (the
/// conformance suite runs each scenario in both modes this way).
pub async fn with_binding<F: std::future::Future>(mode: BindingMode, f: F) -> F::Output {
    BINDING.scope(mode, f).await
}

/// Everything a scenario needs, wired with real parts.
pub struct TestEnv {
    /// The producer guard (`orders-api`).
    pub producer: ProducerGuard,
    /// The embedded Cedar PDP with the example bundle.
    pub pdp: Arc<CedarPdp>,
    /// The TTS over HTTP on loopback.
    pub tts: LoopbackTts,
    producer_key: SigningKey,
    consumer_key: SigningKey,
    producer_keys: KeySet,
    agreement_key: KeyAgreementKey,
    binding: BindingMode,
    /// The same producer in the other mode's form: per message and per context.
    producers: [ProducerGuard; 2],
    sink: MemorySink,
}

impl TestEnv {
    /// Starts a fresh environment (new keys, a TTS on an ephemeral loopback port).
    pub async fn start() -> TestEnv {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let pdp = Arc::new(
            CedarPdp::load_dir(policy_dir()).unwrap_or_else(|e| panic!("example bundle: {e}")),
        );
        let producer_key = SigningKey::generate(
            SigningAlg::ES256,
            format!("orders-api-{}", uuid::Uuid::new_v4().simple()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let consumer_key = SigningKey::generate(
            SigningAlg::EdDSA,
            format!("test-worker-{}", uuid::Uuid::new_v4().simple()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut producer_keys = KeySet::new();
        producer_keys
            .insert_workload_key(PRODUCER, &producer_key)
            .unwrap_or_else(|e| panic!("{e}"));
        let tts = LoopbackTts::start(&[(PRODUCER, &producer_key), (CONSUMER, &consumer_key)]).await;
        let agreement_key =
            KeyAgreementKey::generate(format!("test-worker-enc-{}", uuid::Uuid::new_v4().simple()))
                .unwrap_or_else(|e| panic!("{e}"));
        let binding = BINDING.try_with(|m| *m).unwrap_or_default();
        let horizon = Duration::from_secs(600);
        let per_message = ProducerGuard::new(
            ContextRefMinter::new(PRODUCER, producer_key.clone(), horizon),
            pdp.clone(),
        );
        let mut audiences = AudienceKeys::new();
        audiences
            .insert(CONSUMER, agreement_key.public_jwk())
            .unwrap_or_else(|e| panic!("{e}"));
        let per_context = per_message
            .clone()
            .with_context_binding(ContextBinder::new(audiences.clone(), horizon));
        // The scenarios' producer binds every message (a context is opened on
        // its first one), so that each scenario exercises the binding; the
        // benchmark's (`producer_in`) opens on the second, as by default.
        let producer = match binding {
            BindingMode::PerContext => per_message
                .clone()
                .with_context_binding(ContextBinder::new(audiences, horizon).with_open_after(1)),
            _ => per_message.clone(),
        };
        let producers = [per_message, per_context];
        TestEnv {
            producers,
            producer,
            pdp,
            tts,
            producer_key,
            consumer_key,
            producer_keys,
            agreement_key,
            binding,
            sink: MemorySink::new(),
        }
    }

    /// The test producer publishing in `mode`, whatever mode
    /// [`TestEnv::producer`] has (the benchmark runs rows of both); per
    /// context, it opens a context on its second message, as by default.
    pub fn producer_in(&self, mode: BindingMode) -> &ProducerGuard {
        match mode {
            BindingMode::PerContext => &self.producers[1],
            _ => &self.producers[0],
        }
    }

    /// The mode this environment's producer publishes in.
    pub fn binding(&self) -> BindingMode {
        self.binding
    }

    /// The test consumer's key-agreement key (what per-context producers wrap to).
    pub fn agreement_key(&self) -> &KeyAgreementKey {
        &self.agreement_key
    }

    /// The test consumer's verifier: the producer's keys, both binding modes.
    pub fn verifier(&self) -> ContextRefVerifier {
        ContextRefVerifier::new(self.producer_keys.clone(), VerifyPolicy::new(CONSUMER))
            .with_context_opener(ContextOpener::new([self.agreement_key.clone()]))
    }

    /// A subject context for a user of the example bundle (scope: every test action).
    pub fn subject(&self, user: &str) -> SubjectContext {
        SubjectContext {
            subject: user.to_string(),
            sub_kind: SubjectKind::Human,
            txn: uuid::Uuid::now_v7().to_string(),
            scope: Scope::parse("test.process invoice.create order.process notification.send"),
        }
    }

    /// The audience of test references: the test consumer.
    pub fn audience(&self) -> Vec<String> {
        vec![CONSUMER.to_string()]
    }

    /// A publish request for the test action.
    pub fn publish_request<'a>(
        &self,
        subject: &'a SubjectContext,
        audience: &'a [String],
        destination: &'a str,
    ) -> PublishRequest<'a> {
        PublishRequest {
            subject,
            action: ACTION,
            audience,
            destination,
            scope: None,
        }
    }

    /// The guard for the test consumer (real TTS client, real Cedar, memory decision sink).
    pub fn guard(&self) -> Guard {
        self.guard_with(
            self.http_tokens(),
            self.pdp.clone(),
            Arc::new(self.sink.clone()),
        )
    }

    /// The test consumer's guard (verifying the producer's references, the
    /// test action) on these Txn-Tokens, this PDP and this decision log.
    pub fn guard_with(
        &self,
        tokens: Arc<dyn TokenSource>,
        pdp: Arc<dyn PolicyDecisionPoint>,
        decisions: Arc<dyn DecisionSink>,
    ) -> Guard {
        Guard::new(
            CONSUMER,
            self.verifier(),
            tokens,
            pdp,
            decisions,
            Arc::new(FixedAction::new(ACTION, "Destination")),
        )
    }

    /// The test consumer's Txn-Tokens from the TTS over HTTP on loopback
    /// (stopped by [`TestEnv::stop_tts`]).
    pub fn http_tokens(&self) -> Arc<dyn TokenSource> {
        self.tts.client(CONSUMER, &self.consumer_key)
    }

    /// The test consumer's Txn-Tokens from a TTS fleet: one client spreading
    /// its exchanges round-robin over `endpoints` (the replicas' token
    /// endpoints, no load balancer), failing over on connection errors
    /// ([`TtsClientConfig::replica_endpoints`]).
    ///
    /// # Errors
    ///
    /// Says why the client cannot be built (no endpoint, a URL that does not parse).
    pub fn fleet_tokens(&self, endpoints: &[String]) -> Result<Arc<dyn TokenSource>, String> {
        let (first, rest) = endpoints
            .split_first()
            .ok_or("a fleet client needs at least one token endpoint")?;
        let mut cfg = TtsClientConfig::new(first, TRUST_DOMAIN, CONSUMER);
        cfg.replica_endpoints = rest.to_vec();
        cfg.request_timeout = Duration::from_secs(2);
        let client = TtsClient::new(cfg, self.consumer_key.clone())
            .map_err(|e| format!("TTS fleet client: {e}"))?;
        Ok(Arc::new(client))
    }

    /// The test producer and consumer as workloads to register at a TTS
    /// process (e.g. with [`crate::tts::write_fleet_config`], trust domain
    /// [`TRUST_DOMAIN`]): their ids, keys and [`crate::tts_env::TEST_SCOPES`].
    pub fn workloads(&self) -> Vec<TestWorkload> {
        let scopes: Vec<String> = TEST_SCOPES.split(' ').map(str::to_string).collect();
        [
            (PRODUCER, &self.producer_key),
            (CONSUMER, &self.consumer_key),
        ]
        .into_iter()
        .map(|(id, key)| TestWorkload {
            id: id.to_string(),
            key: key.clone(),
            allowed_scopes: scopes.clone(),
        })
        .collect()
    }

    /// The test consumer's Txn-Tokens from the same TTS's issuer called in
    /// process (no HTTP, no outage).
    pub fn in_process_tokens(&self) -> Arc<dyn TokenSource> {
        Arc::new(elevate_tts::InProcessTts::new(
            self.tts.issuer().clone(),
            CONSUMER,
            self.consumer_key.clone(),
        ))
    }

    /// A processor with a retry budget long enough to ride out a short TTS outage.
    pub fn processor(&self, handler: Arc<dyn Handler>) -> Arc<Processor> {
        self.processor_with_retry(handler, Self::patient_retry())
    }

    /// A processor running `guard` (e.g. from [`TestEnv::guard_with`]) with
    /// the retry budget of [`TestEnv::processor`].
    pub fn processor_on(&self, guard: Guard, handler: Arc<dyn Handler>) -> Arc<Processor> {
        Self::processor_around(guard, handler, Self::patient_retry())
    }

    /// A processor with an explicit retry budget.
    pub fn processor_with_retry(
        &self,
        handler: Arc<dyn Handler>,
        retry: RetryPolicy,
    ) -> Arc<Processor> {
        self.processor_with(handler, retry, None)
    }

    /// A processor with an explicit retry budget and an optional replay seen-set.
    pub fn processor_with(
        &self,
        handler: Arc<dyn Handler>,
        retry: RetryPolicy,
        replay: Option<Arc<dyn elevate_core::replay::ReplayGuard>>,
    ) -> Arc<Processor> {
        let guard = match replay {
            Some(r) => self.guard().with_replay_guard(r),
            None => self.guard(),
        };
        Self::processor_around(guard, handler, retry)
    }

    fn processor_around(
        guard: Guard,
        handler: Arc<dyn Handler>,
        retry: RetryPolicy,
    ) -> Arc<Processor> {
        Arc::new(
            Processor::new(Arc::new(guard), handler, Arc::new(UnboundDeadLetters))
                .with_retry(retry)
                .with_keep_alive_every(Duration::from_secs(1)),
        )
    }

    /// The default retry budget of [`TestEnv::processor`].
    pub fn patient_retry() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 40,
            max_elapsed: None,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            factor: 2.0,
            jitter: true,
        }
    }

    /// A short retry budget (for the exhaustion scenario).
    pub fn short_retry() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            max_elapsed: None,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
            factor: 2.0,
            jitter: false,
        }
    }

    /// Every decision recorded so far.
    pub fn decisions(&self) -> Vec<DecisionRecord> {
        self.sink.records()
    }

    /// The credential policy consumers scan with.
    pub fn credentials(&self) -> CredentialPolicy {
        CredentialPolicy::default()
    }

    /// Simulates a TTS outage (the HTTP listener goes away).
    pub async fn stop_tts(&self) {
        self.tts.stop().await;
    }

    /// Ends the outage (same port).
    pub async fn start_tts(&self) {
        self.tts.restart().await;
    }

    fn origin_claims(&self, destination: &str, payload: &[u8]) -> elevate_core::ContextRefClaims {
        let minter = ContextRefMinter::new(
            PRODUCER,
            self.producer_key.clone(),
            Duration::from_secs(600),
        );
        let scope = Scope::parse(ACTION);
        minter
            .mint(&MintRequest {
                subject: "alice",
                sub_kind: SubjectKind::Human,
                audience: &[CONSUMER.to_string()],
                scope: &scope,
                txn: "txn-hostile",
                destination,
                payload,
            })
            .map(|m| m.claims)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A valid context reference from the producer for `payload` at `destination`.
    pub fn signed_ref(&self, destination: &str, payload: &[u8]) -> String {
        ContextRefMinter::new(
            PRODUCER,
            self.producer_key.clone(),
            Duration::from_secs(600),
        )
        .sign(self.origin_claims(destination, payload))
        .map(|m| m.token)
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Messages that try to slip a credential past the scan (the classes it
    /// once failed open on), each with a valid reference, the reason the
    /// guard must give it, and the secret that must reach neither the
    /// handler nor the dead letter.
    pub fn evasive_messages(&self, destination: &str) -> Vec<Evasive> {
        let mut out = Vec::new();
        let mut push =
            |reason: &'static str, secret: String, mut headers: Headers, payload: Vec<u8>| {
                headers.append(CTX_REF_HEADER, self.signed_ref(destination, &payload));
                out.push(Evasive {
                    reason,
                    secret,
                    headers,
                    payload,
                });
            };
        let body = br#"{"job":"evasive"}"#.to_vec();
        for (i, gap) in ["\t", "\u{a0}", "\u{3000}", "\u{b}"]
            .into_iter()
            .enumerate()
        {
            let secret = format!("opaque-bearer-{i}-{}", uuid::Uuid::new_v4().simple());
            let h: Headers = [("x-forwarded-auth", format!("Bearer{gap}{secret}"))]
                .into_iter()
                .collect();
            push("credential-in-message", secret, h, body.clone());
        }
        let secret = format!("bom-token-{}", uuid::Uuid::new_v4().simple());
        let mut bom = vec![0xef, 0xbb, 0xbf];
        bom.extend_from_slice(format!(r#"{{"access_token":"{secret}"}}"#).as_bytes());
        push("credential-in-message", secret, Headers::new(), bom);
        let secret = format!("deep-token-{}", uuid::Uuid::new_v4().simple());
        let deep = format!(
            "{}{{\"access_token\":\"{secret}\"}}{}",
            "[".repeat(200),
            "]".repeat(200)
        );
        push(
            "uninspectable-payload",
            secret,
            Headers::new(),
            deep.into_bytes(),
        );
        let jwt = elevate_core::jws::sign(
            &self.consumer_key,
            "JWT",
            &serde_json::json!({"sub": "alice", "scope": "everything"}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        push(
            "credential-in-message",
            jwt.clone(),
            Headers::new(),
            serde_json::to_vec(&serde_json::json!({"job": 1, "note": jwt})).unwrap_or_default(),
        );
        // a Txn-Token sent in place of the context reference: refused, and not kept
        let txn_token = elevate_core::jws::sign(
            &self.consumer_key,
            "txntoken+jwt",
            &serde_json::json!({"sub": "alice", "txn": "t", "scope": "test.process"}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        out.push(Evasive {
            reason: "wrong-type",
            secret: txn_token.clone(),
            headers: [(CTX_REF_HEADER, txn_token)].into_iter().collect(),
            payload: body.clone(),
        });
        out
    }

    /// Messages a plain (unguarded, possibly hostile) producer sends, each with
    /// the reason code the guard must give it.
    pub fn hostile_messages(&self, destination: &str) -> Vec<(&'static str, Headers, Vec<u8>)> {
        let minter = ContextRefMinter::new(
            PRODUCER,
            self.producer_key.clone(),
            Duration::from_secs(600),
        );
        let body = br#"{"job":"hostile"}"#.to_vec();
        let with_ref =
            |t: &str| -> Headers { [(CTX_REF_HEADER, t.to_string())].into_iter().collect() };
        let valid = minter
            .sign(self.origin_claims(destination, &body))
            .map(|m| m.token)
            .unwrap_or_default();
        // forged: same kid, another key
        let forger = SigningKey::generate(SigningAlg::ES256, self.producer_key.kid())
            .unwrap_or_else(|e| panic!("{e}"));
        let forged = elevate_core::jws::sign(
            &forger,
            "ctx-ref+jwt",
            &self.origin_claims(destination, &body),
        )
        .unwrap_or_default();
        // expired: the real producer key, a reference past its horizon
        let mut old = self.origin_claims(destination, &body);
        old.iat = unix_now() - 3600;
        old.exp = unix_now() - 600;
        let expired = minter.sign(old).map(|m| m.token).unwrap_or_default();
        // tampered: valid reference, payload changed after signing
        let mut tampered_body = body.clone();
        tampered_body[3] ^= 0x20;
        let mut carrying = with_ref(&valid);
        carrying.append("Authorization", "Bearer leaked-user-token");
        let mut out = vec![
            ("bad-signature", with_ref(&forged), body.clone()),
            ("digest-mismatch", with_ref(&valid), tampered_body.clone()),
            ("expired", with_ref(&expired), body.clone()),
            ("credential-in-message", carrying, body.clone()),
            ("missing-context", Headers::new(), body.clone()),
        ];
        if self.binding == BindingMode::PerContext {
            out.extend(self.hostile_bound_messages(&minter, destination, &body, &tampered_body));
        }
        out
    }

    /// The per-context mode's hostile messages: a context reference without
    /// its binding, a wrong MAC, a binding moved to another context, a
    /// payload changed under a valid binding, and a binding on a
    /// per-message reference.
    fn hostile_bound_messages(
        &self,
        minter: &ContextRefMinter,
        destination: &str,
        body: &[u8],
        tampered_body: &[u8],
    ) -> Vec<(&'static str, Headers, Vec<u8>)> {
        use elevate_core::ctxbind::CTX_BIND_HEADER;
        let mut audiences = AudienceKeys::new();
        audiences
            .insert(CONSUMER, self.agreement_key.public_jwk())
            .unwrap_or_else(|e| panic!("{e}"));
        let binder = ContextBinder::new(audiences, Duration::from_secs(600)).with_open_after(1);
        let seal = |txn: &str| {
            let mut claims = self.origin_claims(destination, body);
            claims.txn = txn.to_string();
            binder
                .seal(minter, &claims)
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("the test consumer has a key-agreement key"))
        };
        let a = seal("txn-hostile-a");
        let b = seal("txn-hostile-b");
        // a context past its horizon, and one whose key is wrapped to a key
        // the consumer does not hold (for another audience's key pair)
        let expired = {
            let mut claims = self.origin_claims(destination, body);
            claims.txn = "txn-hostile-expired".into();
            claims.iat = unix_now() - 3600;
            claims.exp = unix_now() - 600;
            binder
                .seal(minter, &claims)
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("the test consumer has a key-agreement key"))
        };
        let elsewhere = {
            let stranger =
                KeyAgreementKey::generate("someone-else-enc").unwrap_or_else(|e| panic!("{e}"));
            let mut audiences = AudienceKeys::new();
            audiences
                .insert(CONSUMER, stranger.public_jwk())
                .unwrap_or_else(|e| panic!("{e}"));
            ContextBinder::new(audiences, Duration::from_secs(600))
                .with_open_after(1)
                .seal(minter, &self.origin_claims(destination, body))
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("the stranger's key is an audience key"))
        };
        let headers = |reference: &str, binding: &str| -> Headers {
            [
                (CTX_REF_HEADER, reference.to_string()),
                (CTX_BIND_HEADER, binding.to_string()),
            ]
            .into_iter()
            .collect()
        };
        let mut wrong_mac = a.binding.clone();
        let flip = wrong_mac.len() - 2;
        let c = if wrong_mac.as_bytes()[flip] == b'A' {
            "B"
        } else {
            "A"
        };
        wrong_mac.replace_range(flip..=flip, c);
        let per_message = minter
            .sign(self.origin_claims(destination, body))
            .map(|m| m.token)
            .unwrap_or_default();
        vec![
            (
                "missing-binding",
                [(CTX_REF_HEADER, a.reference.token.clone())]
                    .into_iter()
                    .collect(),
                body.to_vec(),
            ),
            (
                "bad-binding",
                headers(&a.reference.token, &wrong_mac),
                body.to_vec(),
            ),
            (
                "bad-binding",
                headers(&b.reference.token, &a.binding),
                body.to_vec(),
            ),
            (
                "digest-mismatch",
                headers(&a.reference.token, &a.binding),
                tampered_body.to_vec(),
            ),
            (
                "missing-binding",
                headers(&per_message, &a.binding),
                body.to_vec(),
            ),
            (
                "expired",
                headers(&expired.reference.token, &expired.binding),
                body.to_vec(),
            ),
            (
                "binding-key-unavailable",
                headers(&elsewhere.reference.token, &elsewhere.binding),
                body.to_vec(),
            ),
        ]
    }

    /// A message full of credentials, and the secret strings that must not reach the wire.
    pub fn credential_laden_message(&self) -> (Headers, Vec<u8>, Vec<String>) {
        let jwt = elevate_core::jws::sign(
            &self.consumer_key,
            "JWT",
            &serde_json::json!({"sub": "alice", "scope": "everything"}),
        )
        .unwrap_or_default();
        let secrets = vec![
            "user-access-token-aaaa".to_string(),
            "session=cookie-secret-bbbb".to_string(),
            "api-key-cccc".to_string(),
            jwt.clone(),
            "refresh-dddd".to_string(),
            "id-token-eeee".to_string(),
        ];
        let headers: Headers = [
            ("Authorization", format!("Bearer {}", secrets[0])),
            ("COOKIE", secrets[1].clone()),
            ("x-api-key", secrets[2].clone()),
            ("x-upstream-identity", jwt),
            ("x-request-id", "req-123".to_string()),
        ]
        .into_iter()
        .collect();
        let payload = serde_json::to_vec(&serde_json::json!({
            "refresh_token": secrets[4],
            "user": {"id_token": secrets[5], "name": "alice"},
            "amount": 12
        }))
        .unwrap_or_default();
        (headers, payload, secrets)
    }
}

/// A message built to slip a credential past the consumer's scan.
#[derive(Debug, Clone)]
pub struct Evasive {
    /// The reason the guard must give it.
    pub reason: &'static str,
    /// The credential it carries: never in a handler call or a dead letter.
    pub secret: String,
    /// Headers (with a valid context reference, unless the case is about it).
    pub headers: Headers,
    /// The message body; in some cases it is where the credential hides.
    pub payload: Vec<u8>,
}

/// What a test handler saw for one message.
#[derive(Debug, Clone)]
pub struct Handled {
    /// Payload as text.
    pub payload: String,
    /// AuthContext subject.
    pub subject: String,
    /// AuthContext workload.
    pub workload: String,
    /// AuthContext producer.
    pub producer: String,
    /// AuthContext action.
    pub action: String,
    /// AuthContext scope.
    pub scope: String,
    /// AuthContext txn.
    pub txn: String,
    /// AuthContext chain.
    pub chain: Vec<String>,
}

/// A handler that records what it is given.
#[derive(Clone, Default)]
pub struct Recorder {
    seen: Arc<Mutex<Vec<Handled>>>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The handler to give a processor.
    pub fn handler(&self) -> Arc<dyn Handler> {
        self.slow_handler(Duration::ZERO)
    }

    /// A handler that takes `delay` per message and panics on a payload of
    /// `panic` (as a handler bug would), recording what it finished.
    pub fn slow_handler(&self, delay: Duration) -> Arc<dyn Handler> {
        let seen = self.seen.clone();
        Arc::new(handler_fn(move |msg: InboundMessage, auth: AuthContext| {
            let seen = seen.clone();
            async move {
                if msg.payload.as_ref() == b"panic" {
                    panic!("handler bug on a message for {}", auth.subject());
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                seen.lock().push(Handled {
                    payload: String::from_utf8_lossy(&msg.payload).into_owned(),
                    subject: auth.subject().to_string(),
                    workload: auth.workload().to_string(),
                    producer: auth.producer().to_string(),
                    action: auth.action().to_string(),
                    scope: auth.scope().to_string(),
                    txn: auth.txn().to_string(),
                    chain: auth.chain().to_vec(),
                });
                Ok(())
            }
        }))
    }

    /// Calls so far.
    pub fn count(&self) -> usize {
        self.seen.lock().len()
    }

    /// Distinct payloads handled.
    pub fn distinct_payloads(&self) -> usize {
        self.seen
            .lock()
            .iter()
            .map(|h| h.payload.clone())
            .collect::<HashSet<_>>()
            .len()
    }

    /// A copy of everything seen.
    pub fn snapshot(&self) -> Vec<Handled> {
        self.seen.lock().clone()
    }

    /// Waits until at least `n` calls, or the timeout.
    pub async fn wait_for(&self, n: usize, timeout: Duration) {
        crate::wait::poll_until(timeout, Duration::from_millis(25), || self.count() >= n).await;
    }
}
