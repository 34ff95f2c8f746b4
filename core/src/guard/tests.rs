//! A negative test for every reason a step of the guard can return, through
//! [`Guard::decide`] with real references and signatures; dependencies (TTS,
//! PDP, seen-set, decision log) are test doubles that answer as told.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::*;
use crate::ctxref::{ContextRefMinter, KeyRefreshed, MintRequest, SubjectKind, VerifyPolicy};
use crate::decision::{DecisionRecord, MemorySink};
use crate::keys::{KeySet, SigningAlg, SigningKey};
use crate::message::Headers;
use crate::pdp::{AccessDecision, AccessRequest, EntityRef, PdpError};
use crate::replay::{InMemoryReplayGuard, ReplayStoreError, Seen};
use crate::scope::Scope;
use crate::token::{SecretToken, TokenError, TokenRequest, TxnToken, TxnTokenClaims};

const PRODUCER: &str = "spiffe://t/producer";
const WORKER: &str = "spiffe://t/worker";
const DST: &str = "jobs";

/// Edits a token's claims after issue.
type Edit = fn(&mut TxnTokenClaims);

/// How the token double answers.
#[derive(Clone, Default)]
enum Tokens {
    #[default]
    Matching,
    Unavailable,
    Denied,
    Invalid,
    /// A token whose claims are edited after issue.
    Edited(fn(&mut TxnTokenClaims)),
}

struct FakeTokens(Mutex<Tokens>);

#[async_trait::async_trait]
impl TokenSource for FakeTokens {
    async fn acquire(&self, req: &TokenRequest<'_>) -> Result<TxnToken, TokenError> {
        let c = &req.reference.claims;
        let mut claims = TxnTokenClaims {
            iat: c.iat,
            exp: c.iat + 60,
            aud: vec!["t".into()],
            txn: c.txn.clone(),
            sub: c.sub.clone(),
            scope: req.scope.to_string(),
            req_wl: WORKER.into(),
            jti: None,
            tctx: None,
            rctx: None,
        };
        match self.0.lock().clone() {
            Tokens::Matching => {}
            Tokens::Unavailable => {
                return Err(TokenError::Unavailable {
                    reason: "connection refused".into(),
                    retry_after: Some(Duration::from_secs(2)),
                });
            }
            Tokens::Denied => {
                return Err(TokenError::Denied {
                    code: "invalid_grant".into(),
                    description: None,
                });
            }
            Tokens::Invalid => return Err(TokenError::Invalid("bad signature".into())),
            Tokens::Edited(edit) => edit(&mut claims),
        }
        Ok(TxnToken {
            token: SecretToken::new("tok"),
            claims: claims.into(),
        })
    }
}

/// How the PDP double answers.
#[derive(Clone, Copy, Default)]
enum Pdp {
    #[default]
    Permit,
    DenyDelegation,
    DenySubject,
    Unavailable,
    Invalid,
    OneDecision,
}

struct FakePdp(Mutex<Pdp>);

#[async_trait::async_trait]
impl PolicyDecisionPoint for FakePdp {
    async fn evaluate(&self, req: &AccessRequest) -> Result<AccessDecision, PdpError> {
        let mode = *self.0.lock();
        let delegation = req.subject.id == WORKER;
        let allowed = match mode {
            Pdp::Permit | Pdp::OneDecision => true,
            Pdp::DenyDelegation => !delegation,
            Pdp::DenySubject => delegation,
            Pdp::Unavailable => return Err(PdpError::Unavailable("bundle not loaded".into())),
            Pdp::Invalid => return Err(PdpError::InvalidRequest("no such entity type".into())),
        };
        Ok(AccessDecision {
            allowed,
            policies: vec![],
            errors: vec![],
        })
    }

    async fn evaluate_all(&self, reqs: &[AccessRequest]) -> Result<Vec<AccessDecision>, PdpError> {
        let mut out = Vec::new();
        for r in reqs {
            out.push(self.evaluate(r).await?);
        }
        if matches!(*self.0.lock(), Pdp::OneDecision) {
            out.truncate(1);
        }
        Ok(out)
    }

    fn policy_version(&self) -> String {
        "test".into()
    }
}

struct DownReplay;

#[async_trait::async_trait]
impl ReplayGuard for DownReplay {
    async fn check(&self, _: &str, _: &str, _: i64) -> Result<Seen, ReplayStoreError> {
        Err(ReplayStoreError("redis: connection refused".into()))
    }
}

#[derive(Default)]
struct Sink {
    inner: MemorySink,
    failing: AtomicBool,
}

impl DecisionSink for Sink {
    fn record(&self, rec: &DecisionRecord) -> Result<(), SinkError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(SinkError {
                sink: "test".into(),
                reason: "disk full".into(),
            });
        }
        self.inner.record(rec)
    }
}

struct World {
    minter: ContextRefMinter,
    tokens: Arc<FakeTokens>,
    pdp: Arc<FakePdp>,
    sink: Arc<Sink>,
    keys: KeySet,
}

impl World {
    fn new() -> Self {
        let key = SigningKey::generate(SigningAlg::ES256, "p1").unwrap();
        let mut keys = KeySet::new();
        keys.insert_workload_key(PRODUCER, &key).unwrap();
        World {
            minter: ContextRefMinter::new(PRODUCER, key, Duration::from_secs(300)),
            tokens: Arc::new(FakeTokens(Mutex::new(Tokens::Matching))),
            pdp: Arc::new(FakePdp(Mutex::new(Pdp::Permit))),
            sink: Arc::new(Sink::default()),
            keys,
        }
    }

    fn guard(&self, actions: Arc<dyn ActionMapper>) -> Guard {
        Guard::new(
            WORKER,
            ContextRefVerifier::new(self.keys.clone(), VerifyPolicy::new(WORKER)),
            self.tokens.clone(),
            self.pdp.clone(),
            self.sink.clone(),
            actions,
        )
    }

    fn reference(&self, scope: &str, payload: &[u8]) -> String {
        self.minter
            .mint(&MintRequest {
                subject: "alice",
                sub_kind: SubjectKind::Human,
                audience: &[WORKER.to_string()],
                scope: &Scope::parse(scope),
                txn: "txn-1",
                destination: DST,
                payload,
            })
            .unwrap()
            .token
    }

    fn message(&self, headers: Headers, payload: &[u8]) -> InboundMessage {
        InboundMessage::new(
            crate::memory::coordinates(DST, 1),
            DST,
            headers,
            payload.to_vec(),
        )
    }

    fn good(&self) -> InboundMessage {
        let h: Headers = [(crate::CTX_REF_HEADER, self.reference("job.run", b"{}"))]
            .into_iter()
            .collect();
        self.message(h, b"{}")
    }
}

fn fixed() -> Arc<dyn ActionMapper> {
    Arc::new(FixedAction::new("job.run", "Queue"))
}

async fn decide(guard: &Guard, msg: &InboundMessage) -> GuardDecision {
    guard.decide(msg, 1).await
}

fn reason(d: &GuardDecision) -> Reason {
    d.reason()
}

#[tokio::test]
async fn a_good_message_is_permitted_with_its_context() {
    let w = World::new();
    let d = decide(&w.guard(fixed()), &w.good()).await;
    let auth = d.auth().expect("permit");
    assert_eq!(auth.subject(), "alice");
    assert_eq!(auth.workload(), WORKER);
    assert_eq!(auth.action(), "job.run");
    assert_eq!(auth.decision_id(), d.decision_id());
    assert_eq!(w.sink.inner.records().len(), 1);
}

#[tokio::test]
async fn credentials_step() {
    let w = World::new();
    let g = w.guard(fixed());
    let mut m = w.good();
    m.headers
        .append("authorization", "Bearer\tabcdefghijklmnop");
    let d = decide(&g, &m).await;
    assert_eq!(reason(&d), Reason::CredentialInMessage);
    assert_eq!(d.verdict(), Verdict::Quarantine);
    let mut m = w.good();
    m.headers.insert("content-encoding", "zstd");
    assert_eq!(reason(&decide(&g, &m).await), Reason::UninspectablePayload);
}

#[tokio::test]
async fn reference_step() {
    let w = World::new();
    let g = w.guard(fixed());
    let none = w.message(Headers::new(), b"{}");
    assert_eq!(reason(&decide(&g, &none).await), Reason::MissingContext);
    let mut two = w.good();
    two.headers
        .append(crate::CTX_REF_HEADER, w.reference("job.run", b"{}"));
    assert_eq!(reason(&decide(&g, &two).await), Reason::AmbiguousContext);
    let bad: Headers = [(crate::CTX_REF_HEADER, vec![0xff, 0xfe])]
        .into_iter()
        .collect();
    assert_eq!(
        reason(&decide(&g, &w.message(bad, b"{}")).await),
        Reason::MalformedReference
    );
    // bound to another payload
    let h: Headers = [(crate::CTX_REF_HEADER, w.reference("job.run", b"{}"))]
        .into_iter()
        .collect();
    assert_eq!(
        reason(&decide(&g, &w.message(h, b"{\"x\":1}")).await),
        Reason::DigestMismatch
    );
    // signed by another key under the trusted key id
    let stranger = World::new();
    assert_eq!(
        reason(&decide(&g, &stranger.good()).await),
        Reason::BadSignature
    );
}

#[tokio::test]
async fn replay_step() {
    let w = World::new();
    let g = w
        .guard(fixed())
        .with_replay_guard(Arc::new(InMemoryReplayGuard::new()));
    let first = w.good();
    assert!(decide(&g, &first).await.auth().is_some());
    // the same delivery again (a redelivery keeps its position) is not a replay
    assert!(decide(&g, &first).await.auth().is_some());
    let mut copy = first.clone();
    copy.position = "memory:jobs/2".into();
    assert_eq!(reason(&decide(&g, &copy).await), Reason::Replayed);
    let down = w.guard(fixed()).with_replay_guard(Arc::new(DownReplay));
    let d = decide(&down, &w.good()).await;
    assert_eq!(reason(&d), Reason::ReplayStoreUnavailable);
    assert_eq!(d.verdict(), Verdict::Retry, "fails closed, and retries");
}

#[tokio::test]
async fn action_step() {
    let w = World::new();
    let unmapped = w.guard(Arc::new(
        |_: &InboundMessage, _: &crate::ContextRefClaims| -> Result<(String, EntityRef), String> {
            Err("no route".into())
        },
    ));
    assert_eq!(
        reason(&decide(&unmapped, &w.good()).await),
        Reason::PolicyError
    );
    let other = w.guard(Arc::new(FixedAction::new("job.delete", "Queue")));
    assert_eq!(
        reason(&decide(&other, &w.good()).await),
        Reason::ScopeInsufficient
    );
}

#[tokio::test]
async fn token_step() {
    let w = World::new();
    let g = w.guard(fixed());
    let cases: [(Tokens, Reason); 3] = [
        (Tokens::Unavailable, Reason::TtsUnavailable),
        (Tokens::Denied, Reason::TokenDenied),
        (Tokens::Invalid, Reason::TokenInvalid),
    ];
    for (answer, expected) in cases {
        *w.tokens.0.lock() = answer;
        let d = decide(&g, &w.good()).await;
        assert_eq!(reason(&d), expected);
        if expected == Reason::TtsUnavailable {
            assert_eq!(
                d.refusal().and_then(Refusal::retry_after),
                Some(Duration::from_secs(2))
            );
        }
    }
    // a token that does not match the reference it was exchanged for
    let edits: [(Edit, &str); 4] = [
        (|c| c.sub = "mallory".into(), "sub"),
        (|c| c.txn = "txn-other".into(), "txn"),
        (|c| c.req_wl = "spiffe://t/other".into(), "req_wl"),
        (|c| c.scope = "job.run job.delete".into(), "scope wider"),
    ];
    for (edit, what) in edits {
        *w.tokens.0.lock() = Tokens::Edited(edit);
        let d = decide(&g, &w.good()).await;
        assert_eq!(reason(&d), Reason::TokenInvalid, "{what}");
        assert!(
            d.refusal()
                .and_then(Refusal::detail)
                .unwrap_or_default()
                .contains(what),
            "{what}: {d:?}"
        );
    }
    // a narrower token that no longer covers the action
    let wide = w.reference("job.run job.read", b"{}");
    *w.tokens.0.lock() = Tokens::Edited(|c| c.scope = "job.read".into());
    let h: Headers = [(crate::CTX_REF_HEADER, wide)].into_iter().collect();
    assert_eq!(
        reason(&decide(&g, &w.message(h, b"{}")).await),
        Reason::ScopeInsufficient
    );
}

#[tokio::test]
async fn elevation_step() {
    let w = World::new();
    let g = w.guard(fixed());
    let cases = [
        (Pdp::DenyDelegation, Reason::DelegationDenied),
        (Pdp::DenySubject, Reason::SubjectDenied),
        (Pdp::Unavailable, Reason::PdpUnavailable),
        (Pdp::Invalid, Reason::PolicyError),
        (Pdp::OneDecision, Reason::PolicyError),
    ];
    for (answer, expected) in cases {
        *w.pdp.0.lock() = answer;
        let d = decide(&g, &w.good()).await;
        assert_eq!(reason(&d), expected);
        assert!(d.auth().is_none());
    }
}

#[tokio::test]
async fn record_step_fails_closed() {
    let w = World::new();
    w.sink.failing.store(true, Ordering::SeqCst);
    let d = decide(&w.guard(fixed()), &w.good()).await;
    assert_eq!(reason(&d), Reason::DecisionLogUnavailable);
    assert_eq!(d.verdict(), Verdict::Retry);
    assert!(d.auth().is_none(), "an unrecorded decision never permits");
}

/// A key refresh double: on a call it adds `add` (if any) to the shared key
/// set under `owner`, and answers `answer`.
struct FakeRefresh {
    keys: Arc<arc_swap::ArcSwap<KeySet>>,
    add: Option<SigningKey>,
    owner: &'static str,
    answer: KeyRefreshed,
    calls: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl crate::ctxref::KeyRefresh for FakeRefresh {
    async fn refresh(&self, kid: &str) -> KeyRefreshed {
        self.calls.lock().push(kid.to_string());
        if let Some(key) = &self.add {
            let mut set = (**self.keys.load()).clone();
            set.insert_workload_key(self.owner, key).unwrap();
            self.keys.store(Arc::new(set));
        }
        self.answer
    }
}

impl World {
    /// A guard whose verifier asks `refresh` about unknown keys; the
    /// refresh shares the verifier's key set.
    fn refreshing_guard(
        &self,
        add: Option<SigningKey>,
        owner: &'static str,
        answer: KeyRefreshed,
    ) -> (Guard, Arc<FakeRefresh>) {
        let keys = Arc::new(arc_swap::ArcSwap::from_pointee(self.keys.clone()));
        let refresh = Arc::new(FakeRefresh {
            keys: keys.clone(),
            add,
            owner,
            answer,
            calls: Mutex::new(Vec::new()),
        });
        let verifier = ContextRefVerifier::with_shared_keys(keys, VerifyPolicy::new(WORKER))
            .with_refresh(refresh.clone());
        let guard = Guard::new(
            WORKER,
            verifier,
            self.tokens.clone(),
            self.pdp.clone(),
            self.sink.clone(),
            fixed(),
        );
        (guard, refresh)
    }
}

/// A message signed by the producer's rotated key `key` (not yet in the set).
fn rotated_message(w: &World, key: &SigningKey) -> InboundMessage {
    let minter = ContextRefMinter::new(PRODUCER, key.clone(), Duration::from_secs(300));
    let token = minter
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[WORKER.to_string()],
            scope: &Scope::parse("job.run"),
            txn: "txn-1",
            destination: DST,
            payload: b"{}",
        })
        .unwrap()
        .token;
    let h: Headers = [(crate::CTX_REF_HEADER, token)].into_iter().collect();
    w.message(h, b"{}")
}

#[tokio::test]
async fn reference_step_asks_for_an_unknown_key_once() {
    let w = World::new();
    let rotated = SigningKey::generate(SigningAlg::ES256, "p2").unwrap();
    // The refresh brings the producer's new key: permitted, one call for "p2".
    let (g, r) = w.refreshing_guard(Some(rotated.clone()), PRODUCER, KeyRefreshed::Updated);
    let d = decide(&g, &rotated_message(&w, &rotated)).await;
    assert!(d.auth().is_some(), "{d:?}");
    assert_eq!(*r.calls.lock(), ["p2"]);
    // Known now: no second call.
    assert!(
        decide(&g, &rotated_message(&w, &rotated))
            .await
            .auth()
            .is_some()
    );
    assert_eq!(r.calls.lock().len(), 1);
}

#[tokio::test]
async fn reference_step_refresh_failures_change_nothing() {
    let w = World::new();
    let rotated = SigningKey::generate(SigningAlg::ES256, "p2").unwrap();
    let msg = rotated_message(&w, &rotated);
    // Without a refresh: unknown-key.
    let plain = decide(&w.guard(fixed()), &msg).await;
    assert_eq!(reason(&plain), Reason::UnknownKey);
    // A source that answered without the key (now or within its rate
    // limit): the same reason and verdict.
    let (g, r) = w.refreshing_guard(None, PRODUCER, KeyRefreshed::Unchanged);
    let d = decide(&g, &msg).await;
    assert_eq!(reason(&d), Reason::UnknownKey);
    assert_eq!(d.verdict(), plain.verdict());
    assert_eq!(*r.calls.lock(), ["p2"]);
    // A refresh that claims a change but brings nothing: still unknown-key,
    // and asked once only (no loop).
    let (g, r) = w.refreshing_guard(None, PRODUCER, KeyRefreshed::Updated);
    assert_eq!(reason(&decide(&g, &msg).await), Reason::UnknownKey);
    assert_eq!(r.calls.lock().len(), 1);
    // A source that cannot be reached: nobody knows the key is bad, so the
    // message waits (Retry) instead of being quarantined.
    let (g, r) = w.refreshing_guard(None, PRODUCER, KeyRefreshed::Unavailable);
    let d = decide(&g, &msg).await;
    assert_eq!(reason(&d), Reason::KeysUnavailable);
    assert_eq!(d.verdict(), Verdict::Retry);
    assert!(d.auth().is_none());
    assert_eq!(r.calls.lock().len(), 1);
    // The refresh brings the key, but owned by another workload: the owner
    // rule still holds.
    let (g, r) = w.refreshing_guard(
        Some(rotated.clone()),
        "spiffe://t/other",
        KeyRefreshed::Updated,
    );
    assert_eq!(reason(&decide(&g, &msg).await), Reason::IssuerMismatch);
    assert_eq!(r.calls.lock().len(), 1);
}

#[tokio::test]
async fn reference_step_refreshes_only_for_unknown_keys() {
    let w = World::new();
    let (g, r) = w.refreshing_guard(None, PRODUCER, KeyRefreshed::Updated);
    // A known key with a bad signature (another key under the trusted kid).
    let stranger = World::new();
    assert_eq!(
        reason(&decide(&g, &stranger.good()).await),
        Reason::BadSignature
    );
    // Bound to another payload.
    let h: Headers = [(crate::CTX_REF_HEADER, w.reference("job.run", b"{}"))]
        .into_iter()
        .collect();
    assert_eq!(
        reason(&decide(&g, &w.message(h, b"{\"x\":1}")).await),
        Reason::DigestMismatch
    );
    // No kid at all.
    let minted = w.minter.mint(&MintRequest {
        subject: "alice",
        sub_kind: SubjectKind::Human,
        audience: &[WORKER.to_string()],
        scope: &Scope::parse("job.run"),
        txn: "txn-1",
        destination: DST,
        payload: b"{}",
    });
    let key = SigningKey::generate(SigningAlg::ES256, "p1").unwrap();
    let no_kid = crate::jws::sign_with(
        key.encoding_key(),
        SigningAlg::ES256,
        None,
        crate::ctxref::CTX_REF_TYP,
        &minted.unwrap().claims,
    )
    .unwrap();
    let h: Headers = [(crate::CTX_REF_HEADER, no_kid)].into_iter().collect();
    assert_eq!(
        reason(&decide(&g, &w.message(h, b"{}")).await),
        Reason::MissingKid
    );
    assert!(r.calls.lock().is_empty(), "{:?}", r.calls.lock());
}

#[tokio::test]
async fn reference_step_asks_for_a_prior_hops_unknown_key() {
    // origin (key "o2", unknown to the worker) → middle (known) → worker
    const ORIGIN: &str = "spiffe://t/origin";
    let origin_key = SigningKey::generate(SigningAlg::ES256, "o2").unwrap();
    let origin = ContextRefMinter::new(ORIGIN, origin_key.clone(), Duration::from_secs(300));
    let parent = origin
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[PRODUCER.to_string()],
            scope: &Scope::parse("job.run"),
            txn: "txn-1",
            destination: "upstream",
            payload: b"{}",
        })
        .unwrap();
    let w = World::new();
    let derived = w
        .minter
        .derive(
            &parent.claims,
            &parent.token,
            None,
            &[WORKER.to_string()],
            DST,
            b"{}",
        )
        .unwrap();
    let h: Headers = [(crate::CTX_REF_HEADER, derived.token)]
        .into_iter()
        .collect();
    let msg = w.message(h, b"{}");
    let (g, r) = w.refreshing_guard(None, ORIGIN, KeyRefreshed::Unchanged);
    assert_eq!(reason(&decide(&g, &msg).await), Reason::ChainInvalid);
    assert_eq!(*r.calls.lock(), ["o2"]);
    let (g, r) = w.refreshing_guard(Some(origin_key), ORIGIN, KeyRefreshed::Updated);
    let d = decide(&g, &msg).await;
    assert!(d.auth().is_some(), "{d:?}");
    assert_eq!(*r.calls.lock(), ["o2"]);
}
