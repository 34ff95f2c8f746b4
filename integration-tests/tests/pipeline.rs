//! The three-broker pipeline on the real brokers: orders-api → Kafka (tansu,
//! `KAFKA_BOOTSTRAP`) → order-worker → NATS JetStream (`NATS_URL`) →
//! billing-worker → RabbitMQ (`AMQP_URL`) → notify-worker, each hop guarded,
//! each downstream publish a derived context reference; a real TTS over HTTP
//! on loopback and the example Cedar bundle.
//!
//! Permitted work arrives at the last hop with the origin subject, the full
//! chain and the narrowed scope; a widened scope, a depth over the maximum, a
//! forged hop and a revoked middle workload are each denied at the hop that
//! sees them and dead-lettered there. And: two instances of one JetStream
//! consumer group share the Redis seen-set — a replay is quarantined by
//! whichever instance sees it, a redelivery after a crash is processed.
//!
//! Every run uses fresh topic, stream, subject and queue names.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use elevate_amqp::AmqpPublisher;
use elevate_cedar::CedarPdp;
use elevate_core::ctxbind::{
    AudienceKeys, BindingMode, ContextBinder, ContextOpener, KeyAgreementKey,
};
use elevate_core::ctxref::{ContextRefClaims, ContextRefMinter, ContextRefVerifier, VerifyPolicy};
use elevate_core::deadletter::H_REASON;
use elevate_core::decision::{DecisionRecord, MemorySink};
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use elevate_core::producer::{DerivedPublish, ProducerGuard, PublishRequest, SubjectContext};
use elevate_core::scope::Scope;
use elevate_core::settle::{HandlerError, Processor, UnboundDeadLetters};
use elevate_core::{
    AuthContext, CTX_REF_HEADER, FixedAction, Guard, Headers, InboundMessage, OutboundMessage,
    SubjectKind, handler_fn,
};
use elevate_testing::amqp::AmqpBinding;
use elevate_testing::binding::{BrokerBinding, ConsumerHandle, Endpoint, RawMessage};
use elevate_testing::env::{Recorder, TestEnv, policy_dir};
use elevate_testing::kafka::KafkaBinding;
use elevate_testing::nats::{NatsBinding, WorkerConfig};
use elevate_testing::tts_env::LoopbackTts;
use elevate_testing::wait::{poll_until, redis_seen_set};
use parking_lot::Mutex;

const ORDERS_API: &str = "spiffe://elevate.example/orders-api";
const ORDER_WORKER: &str = "spiffe://elevate.example/order-worker";
const BILLING_WORKER: &str = "spiffe://elevate.example/billing-worker";
const NOTIFY_WORKER: &str = "spiffe://elevate.example/notify-worker";

const ORIGIN_SCOPE: &str = "order.process billing.charge notification.send";
const BILLING_SCOPE: &str = "billing.charge notification.send";
const NOTIFY_SCOPE: &str = "notification.send";

/// Bounds every wait in this file.
const WAIT: Duration = Duration::from_secs(60);

fn key(alg: SigningAlg, name: &str) -> SigningKey {
    SigningKey::generate(alg, format!("{name}-{}", uuid::Uuid::new_v4().simple()))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// What the notify-worker's handler saw for one message.
#[derive(Debug, Clone)]
struct Arrived {
    order: String,
    subject: String,
    workload: String,
    chain: Vec<String>,
    scope: String,
    txn: String,
    tctx: serde_json::Value,
    /// The message arrived with a per-context binding (`ztauth-ctx-bind`).
    bound: bool,
}

/// How the (possibly compromised) billing-worker treats one message, from its payload.
fn attack_of(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("attack").and_then(|a| a.as_str()).map(str::to_string))
        .unwrap_or_default()
}

fn order_of(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("order").and_then(|a| a.as_str()).map(str::to_string))
        .unwrap_or_default()
}

/// The whole pipeline: identities, TTS, PDP, the three brokers and one endpoint on each.
struct Pipeline {
    tts: LoopbackTts,
    pdp: Arc<CedarPdp>,
    keys: HashMap<&'static str, SigningKey>,
    keyset: KeySet,
    kafka: KafkaBinding,
    nats: NatsBinding,
    amqp: AmqpBinding,
    orders: Endpoint,
    billing: Endpoint,
    notifications: Endpoint,
    sinks: HashMap<&'static str, MemorySink>,
    arrived: Arc<Mutex<Vec<Arrived>>>,
    /// How every hop publishes.
    mode: BindingMode,
    /// The workers' key-agreement keys (per-context producers wrap to them).
    agreement: HashMap<&'static str, KeyAgreementKey>,
}

impl Pipeline {
    async fn start(tag: &str) -> Pipeline {
        Self::start_in(tag, BindingMode::PerMessage).await
    }

    async fn start_in(tag: &str, mode: BindingMode) -> Pipeline {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let pdp =
            Arc::new(CedarPdp::load_dir(policy_dir()).unwrap_or_else(|e| panic!("bundle: {e}")));
        let keys: HashMap<&'static str, SigningKey> = HashMap::from([
            (ORDERS_API, key(SigningAlg::ES256, "orders-api")),
            (ORDER_WORKER, key(SigningAlg::EdDSA, "order-worker")),
            (BILLING_WORKER, key(SigningAlg::ES256, "billing-worker")),
            (NOTIFY_WORKER, key(SigningAlg::EdDSA, "notify-worker")),
        ]);
        let mut keyset = KeySet::new();
        for (id, k) in &keys {
            keyset
                .insert_workload_key(id, k)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let registered: Vec<(&str, &SigningKey)> = keys.iter().map(|(id, k)| (*id, k)).collect();
        let tts = LoopbackTts::start(&registered).await;
        let kafka = KafkaBinding::real().await;
        let nats = NatsBinding::jetstream().await;
        let amqp = AmqpBinding::real().await;
        let orders = kafka
            .setup(&format!("pipeline-orders-{tag}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let billing = nats
            .setup(&format!("pipeline_billing_{tag}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let notifications = amqp
            .setup(&format!("pipeline-notifications-{tag}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Pipeline {
            tts,
            pdp,
            keys,
            keyset,
            kafka,
            nats,
            amqp,
            orders,
            billing,
            notifications,
            sinks: [ORDER_WORKER, BILLING_WORKER, NOTIFY_WORKER]
                .into_iter()
                .map(|w| (w, MemorySink::new()))
                .collect(),
            arrived: Arc::new(Mutex::new(Vec::new())),
            mode,
            agreement: [ORDER_WORKER, BILLING_WORKER, NOTIFY_WORKER]
                .into_iter()
                .map(|w| {
                    let k = KeyAgreementKey::generate(format!("{w}#enc-1"))
                        .unwrap_or_else(|e| panic!("{e}"));
                    (w, k)
                })
                .collect(),
        }
    }

    fn key(&self, id: &str) -> &SigningKey {
        self.keys
            .get(id)
            .unwrap_or_else(|| panic!("no key for {id}"))
    }

    fn minter(&self, id: &str, max_depth: u32) -> ContextRefMinter {
        ContextRefMinter::new(id, self.key(id).clone(), Duration::from_secs(600))
            .with_max_depth(max_depth)
    }

    fn producer(&self, id: &str, max_depth: u32) -> ProducerGuard {
        let producer = ProducerGuard::new(self.minter(id, max_depth), self.pdp.clone());
        if self.mode != BindingMode::PerContext {
            return producer;
        }
        let mut audiences = AudienceKeys::new();
        for (w, k) in &self.agreement {
            audiences
                .insert(*w, k.public_jwk())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        producer.with_context_binding(
            ContextBinder::new(audiences, Duration::from_secs(600)).with_open_after(1),
        )
    }

    fn processor(
        &self,
        workload: &'static str,
        action: &str,
        handler: Arc<dyn elevate_core::Handler>,
    ) -> Arc<Processor> {
        let sink = self.sinks.get(workload).cloned().unwrap_or_default();
        let guard = Guard::new(
            workload,
            ContextRefVerifier::new(self.keyset.clone(), VerifyPolicy::new(workload))
                .with_context_opener(ContextOpener::new(self.agreement.get(workload).cloned())),
            self.tts.client(workload, self.key(workload)),
            self.pdp.clone(),
            Arc::new(sink),
            Arc::new(FixedAction::new(action, "Destination")),
        );
        Arc::new(
            Processor::new(Arc::new(guard), handler, Arc::new(UnboundDeadLetters))
                .with_retry(TestEnv::short_retry()),
        )
    }

    /// order-worker: processes the order, publishes a billing command to NATS
    /// with a derived reference (scope narrowed to billing + notification).
    async fn start_order_worker(&self) -> ConsumerHandle {
        let publisher = self.nats.publisher(&self.producer(ORDER_WORKER, 3));
        let subject = self.billing.destination.clone();
        let handler = handler_fn(move |msg: InboundMessage, auth: AuthContext| {
            let publisher = publisher.clone();
            let subject = subject.clone();
            async move {
                let audience = [BILLING_WORKER.to_string()];
                let scope = Scope::parse(BILLING_SCOPE);
                let next = DerivedPublish {
                    action: "billing.charge",
                    audience: &audience,
                    destination: &subject,
                    scope: Some(&scope),
                };
                let out = OutboundMessage {
                    headers: Headers::new(),
                    payload: msg.payload.to_vec(),
                };
                publisher
                    .publish_derived_jetstream(&auth, &next, out)
                    .await
                    .map(|_| ())
                    .map_err(|e| HandlerError::Permanent(e.to_string()))
            }
        });
        let p = self.processor(ORDER_WORKER, "order.process", Arc::new(handler));
        self.kafka
            .start_consumer(&self.orders, p)
            .await
            .unwrap_or_else(|e| panic!("order-worker: {e}"))
    }

    /// billing-worker: charges, publishes a notification to RabbitMQ with a
    /// derived reference (scope narrowed to notification). When the payload
    /// says so it behaves as a compromised workload and signs what its guard
    /// would refuse to (`widen`, `depth`, `forge`), publishing it raw.
    async fn start_billing_worker(&self) -> ConsumerHandle {
        let publisher = AmqpPublisher::with_confirm_channel(
            self.amqp.confirms().clone(),
            self.producer(BILLING_WORKER, 3),
        );
        let minter = self.minter(BILLING_WORKER, 3);
        let ep = self.notifications.clone();
        let raw = Arc::new(AmqpBinding::real().await);
        let handler = handler_fn(move |msg: InboundMessage, auth: AuthContext| {
            let publisher = publisher.clone();
            let minter = minter.clone();
            let ep = ep.clone();
            let raw = raw.clone();
            async move {
                let audience = [NOTIFY_WORKER.to_string()];
                let scope = Scope::parse(NOTIFY_SCOPE);
                let payload = msg.payload.to_vec();
                let attack = attack_of(&payload);
                let perm = |e: String| HandlerError::Permanent(e);
                if attack.is_empty() {
                    let next = DerivedPublish {
                        action: "notification.send",
                        audience: &audience,
                        destination: &ep.destination,
                        scope: Some(&scope),
                    };
                    let out = OutboundMessage {
                        headers: Headers::new(),
                        payload,
                    };
                    return publisher
                        .publish_derived(&auth, &next, out, lapin::BasicProperties::default())
                        .await
                        .map(|_| ())
                        .map_err(|e| perm(e.to_string()));
                }
                let token = compromised_reference(
                    &attack,
                    &minter,
                    &auth,
                    &audience,
                    &ep.destination,
                    &payload,
                )
                .map_err(perm)?;
                let headers: Headers = [(CTX_REF_HEADER, token)].into_iter().collect();
                raw.publish_raw(&ep, headers, payload).await.map_err(perm)
            }
        });
        let p = self.processor(BILLING_WORKER, "billing.charge", Arc::new(handler));
        self.nats
            .start_consumer(&self.billing, p)
            .await
            .unwrap_or_else(|e| panic!("billing-worker: {e}"))
    }

    /// notify-worker: the last hop; records what it was given.
    async fn start_notify_worker(&self) -> ConsumerHandle {
        let arrived = self.arrived.clone();
        let handler = handler_fn(move |msg: InboundMessage, auth: AuthContext| {
            let arrived = arrived.clone();
            async move {
                arrived.lock().push(Arrived {
                    order: order_of(&msg.payload),
                    subject: auth.subject().to_string(),
                    workload: auth.workload().to_string(),
                    chain: auth.chain().to_vec(),
                    scope: auth.scope().to_string(),
                    txn: auth.txn().to_string(),
                    tctx: auth.txn_token().claims.tctx.clone().unwrap_or_default(),
                    bound: msg
                        .headers
                        .get(elevate_core::ctxbind::CTX_BIND_HEADER)
                        .is_some(),
                });
                Ok(())
            }
        });
        let p = self.processor(NOTIFY_WORKER, "notification.send", Arc::new(handler));
        self.amqp
            .start_consumer(&self.notifications, p)
            .await
            .unwrap_or_else(|e| panic!("notify-worker: {e}"))
    }

    /// orders-api publishes an order for `user` to Kafka (origin reference, depth 0).
    async fn order(&self, user: &str, order: &str, attack: &str, max_depth: u32) -> String {
        let subject = SubjectContext {
            subject: user.to_string(),
            sub_kind: SubjectKind::Human,
            txn: uuid::Uuid::now_v7().to_string(),
            scope: Scope::parse(ORIGIN_SCOPE),
        };
        let audience = [ORDER_WORKER.to_string()];
        let req = PublishRequest {
            subject: &subject,
            action: "order.process",
            audience: &audience,
            destination: &self.orders.destination,
            scope: None,
        };
        let payload = serde_json::to_vec(
            &serde_json::json!({"order": order, "attack": attack, "amount": 42}),
        )
        .unwrap_or_default();
        self.kafka
            .guarded_producer(&self.producer(ORDERS_API, max_depth))
            .publish(
                &req,
                OutboundMessage {
                    headers: Headers::new(),
                    payload,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("publish order {order}: {e}"));
        subject.txn
    }

    fn decisions(&self, workload: &str) -> Vec<DecisionRecord> {
        self.sinks
            .get(workload)
            .map(|s| s.records())
            .unwrap_or_default()
    }

    async fn wait_arrived(&self, n: usize) {
        poll_until(WAIT, Duration::from_millis(50), || {
            self.arrived.lock().len() >= n
        })
        .await;
    }
}

/// What a compromised billing-worker signs instead of an honest derivation.
fn compromised_reference(
    attack: &str,
    minter: &ContextRefMinter,
    auth: &AuthContext,
    audience: &[String],
    destination: &str,
    payload: &[u8],
) -> Result<String, String> {
    let err = |e: elevate_core::ctxref::MintError| e.to_string();
    let claims: ContextRefClaims = match attack {
        // sign a reference with a scope its parent never had
        "widen" => {
            let mut c = auth
                .derive_reference(
                    minter,
                    Some(&Scope::parse(NOTIFY_SCOPE)),
                    audience,
                    destination,
                    payload,
                )
                .map_err(err)?
                .claims;
            c.scope = "notification.send order.process".into();
            c
        }
        // the origin allowed one hop; derive past it anyway
        "depth" => {
            let mut parent = auth.reference().clone();
            parent.max_depth = 9;
            let mut c = minter
                .derive(
                    &parent,
                    auth.reference_token(),
                    Some(&Scope::parse(NOTIFY_SCOPE)),
                    audience,
                    destination,
                    payload,
                )
                .map_err(err)?
                .claims;
            c.max_depth = auth.reference().max_depth;
            c
        }
        // fabricate the order-worker hop (for another user), signed with its own key
        "forge" => {
            let mut c = auth
                .derive_reference(
                    minter,
                    Some(&Scope::parse(NOTIFY_SCOPE)),
                    audience,
                    destination,
                    payload,
                )
                .map_err(err)?
                .claims;
            let fake_parent = ContextRefClaims {
                sub: "carol".into(),
                ..auth.reference().clone()
            };
            let fake = minter.sign(fake_parent).map_err(err)?.token;
            c.sub = "carol".into();
            if let Some(a) = c.act.as_mut() {
                a.reference = Some(fake);
            }
            c
        }
        other => return Err(format!("unknown attack {other:?}")),
    };
    minter.sign(claims).map(|m| m.token).map_err(err)
}

fn reasons(letters: &[RawMessage]) -> HashMap<String, String> {
    letters
        .iter()
        .map(|m| {
            (
                order_of(&m.payload),
                m.headers.get_str(H_REASON).unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_brokers_carry_the_chain_and_deny_at_the_right_hop() {
    carry_the_chain(Pipeline::start("main").await).await;
}

/// The same pipeline with every hop publishing per context: each hop's
/// derived publish is a context of its own, signed by that hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_brokers_carry_the_chain_per_context() {
    let p = Pipeline::start_in("ctx", BindingMode::PerContext).await;
    carry_the_chain(p).await;
}

async fn carry_the_chain(p: Pipeline) {
    let order = p.start_order_worker().await;
    let billing = p.start_billing_worker().await;
    let notify = p.start_notify_worker().await;

    let txn_ok1 = p.order("alice", "ok-1", "", 3).await;
    let txn_ok2 = p.order("alice", "ok-2", "", 3).await;
    p.order("alice", "widen", "widen", 3).await;
    p.order("alice", "forge", "forge", 3).await;
    p.order("alice", "depth", "depth", 1).await;
    // a suspended user is stopped at the first hop
    p.order("mallory", "mallory", "", 3).await;
    // an outsider injects a billing command "from order-worker" with a key it made up
    let forger = SigningKey::generate(SigningAlg::EdDSA, p.key(ORDER_WORKER).kid())
        .unwrap_or_else(|e| panic!("{e}"));
    let fake = ContextRefMinter::new(ORDER_WORKER, forger, Duration::from_secs(600));
    let body = serde_json::to_vec(&serde_json::json!({"order": "injected", "attack": ""}))
        .unwrap_or_default();
    let injected = fake
        .mint(&elevate_core::ctxref::MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: &[BILLING_WORKER.to_string()],
            scope: &Scope::parse(BILLING_SCOPE),
            txn: "txn-injected",
            destination: &p.billing.destination,
            payload: &body,
        })
        .unwrap_or_else(|e| panic!("{e}"));
    p.nats
        .publish_raw(
            &p.billing,
            [(CTX_REF_HEADER, injected.token)].into_iter().collect(),
            body,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // permitted work reaches the last hop with subject, chain and narrowed scope
    p.wait_arrived(2).await;
    let order_dl = p
        .kafka
        .dead_letters(&p.orders, 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let billing_dl = p
        .nats
        .dead_letters(&p.billing, 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let notify_dl = p
        .amqp
        .dead_letters(&p.notifications, 3, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let arrived = p.arrived.lock().clone();
    for h in [order, billing, notify] {
        h.stop().await;
    }

    assert_eq!(
        arrived.len(),
        2,
        "exactly the two honest orders arrive: {arrived:?}"
    );
    for a in &arrived {
        assert!(a.order == "ok-1" || a.order == "ok-2", "{a:?}");
        assert_eq!(a.subject, "alice");
        assert_eq!(a.workload, NOTIFY_WORKER);
        assert_eq!(a.chain, vec![ORDERS_API, ORDER_WORKER, BILLING_WORKER]);
        assert_eq!(a.scope, NOTIFY_SCOPE);
        assert!(
            a.txn == txn_ok1 || a.txn == txn_ok2,
            "origin txn kept: {a:?}"
        );
        // the Txn-Token carries the verified chain, each hop with the scope it held
        assert_eq!(
            a.tctx["chain"],
            serde_json::json!([ORDERS_API, ORDER_WORKER, BILLING_WORKER])
        );
        assert_eq!(a.tctx["depth"], 2);
        assert_eq!(
            a.tctx["hops"],
            serde_json::json!([
                {"wl": ORDERS_API, "scope": Scope::parse(ORIGIN_SCOPE).to_string()},
                {"wl": ORDER_WORKER, "scope": BILLING_SCOPE},
                {"wl": BILLING_WORKER, "scope": NOTIFY_SCOPE},
            ])
        );
    }

    // each denial at the hop that saw it, dead-lettered there, with its reason
    assert_eq!(
        reasons(&order_dl),
        HashMap::from([("mallory".to_string(), "subject-denied".to_string())]),
        "Kafka orders DLQ"
    );
    assert_eq!(
        reasons(&billing_dl),
        HashMap::from([("injected".to_string(), "bad-signature".to_string())]),
        "NATS billing DLQ"
    );
    assert_eq!(
        reasons(&notify_dl),
        HashMap::from([
            ("widen".to_string(), "scope-widened".to_string()),
            ("forge".to_string(), "chain-invalid".to_string()),
            ("depth".to_string(), "depth-exceeded".to_string()),
        ]),
        "RabbitMQ notifications DLQ"
    );

    // every hop's decision records show the chain as that hop saw it
    let chain_at = |w: &str, order: &str| -> Vec<Vec<String>> {
        p.decisions(w)
            .into_iter()
            .filter(|r| {
                r.reason == elevate_core::Reason::Permitted && r.txn.as_deref() == Some(order)
            })
            .map(|r| r.chain)
            .collect()
    };
    assert_eq!(
        chain_at(ORDER_WORKER, &txn_ok1),
        vec![vec![ORDERS_API.to_string()]]
    );
    assert_eq!(
        chain_at(BILLING_WORKER, &txn_ok1),
        vec![vec![ORDERS_API.to_string(), ORDER_WORKER.to_string()]]
    );
    assert_eq!(
        chain_at(NOTIFY_WORKER, &txn_ok1),
        vec![vec![
            ORDERS_API.to_string(),
            ORDER_WORKER.to_string(),
            BILLING_WORKER.to_string()
        ]]
    );
    let widened = p
        .decisions(NOTIFY_WORKER)
        .into_iter()
        .find(|r| r.reason == elevate_core::Reason::ScopeWidened);
    assert!(widened.is_some_and(|r| r.verdict == elevate_core::Verdict::Quarantine));
    // the third hop's messages came in the pipeline's binding mode
    let arrived = p.arrived.lock().clone();
    assert!(!arrived.is_empty());
    assert!(
        arrived
            .iter()
            .all(|a| a.bound == (p.mode == BindingMode::PerContext)),
        "{:?}: {arrived:?}",
        p.mode
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_middle_workload_denies_messages_in_flight() {
    let p = Pipeline::start("revoke").await;
    let order = p.start_order_worker().await;
    let billing = p.start_billing_worker().await;

    // "parked-notify" gets through order-worker and billing-worker and waits on
    // RabbitMQ (no notify-worker yet)
    p.order("alice", "parked-notify", "", 3).await;
    let tapped = p
        .amqp
        .read_raw(&p.notifications, 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tapped.len(), 1, "the notification is in flight");
    // billing-worker goes away; "parked-billing" gets through order-worker and waits on NATS
    billing.stop().await;
    p.order("alice", "parked-billing", "", 3).await;
    let on_billing = p
        .nats
        .read_raw(&p.billing, 2, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(on_billing.len(), 2, "the billing command is in flight");

    // order-worker is removed from the registry while both are in flight
    assert!(p.tts.issuer().revoke_workload(ORDER_WORKER));

    let billing = p.start_billing_worker().await;
    let notify = p.start_notify_worker().await;
    let billing_dl = p
        .nats
        .dead_letters(&p.billing, 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let notify_dl = p
        .amqp
        .dead_letters(&p.notifications, 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for h in [order, billing, notify] {
        h.stop().await;
    }
    assert!(
        p.arrived.lock().is_empty(),
        "nothing that passed through order-worker is acted on"
    );
    assert_eq!(
        reasons(&billing_dl),
        HashMap::from([("parked-billing".to_string(), "token-denied".to_string())])
    );
    assert_eq!(
        reasons(&notify_dl),
        HashMap::from([("parked-notify".to_string(), "token-denied".to_string())])
    );
    for w in [BILLING_WORKER, NOTIFY_WORKER] {
        let denied = p
            .decisions(w)
            .into_iter()
            .filter(|r| r.reason == elevate_core::Reason::TokenDenied)
            .collect::<Vec<_>>();
        assert_eq!(denied.len(), 1, "{w}");
        let detail = denied[0].detail.clone().unwrap_or_default();
        assert!(detail.contains("invalid_grant"), "{w}: {detail}");
        assert!(denied[0].chain.iter().any(|c| c == ORDER_WORKER));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_group_shares_the_redis_seen_set() {
    let env = TestEnv::start().await;
    let nats = NatsBinding::jetstream().await;
    let ep = nats
        .setup("replay_group")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = redis_seen_set().await;
    let cfg = WorkerConfig {
        concurrency: 4,
        ack_wait: Duration::from_secs(2),
        max_deliver: -1,
    };
    const GROUP: &str = "workers";

    // instance A takes the message and crashes mid-handler
    let started = Arc::new(AtomicBool::new(false));
    let hang = {
        let started = started.clone();
        handler_fn(move |_: InboundMessage, _: AuthContext| {
            let started = started.clone();
            async move {
                started.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        })
    };
    let a = nats
        .spawn_jetstream(
            &ep.name,
            GROUP,
            &ep.dead_letter,
            env.processor_with(Arc::new(hang), TestEnv::patient_retry(), Some(seen.clone())),
            &cfg,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let subject = env.subject("alice");
    let audience = env.audience();
    nats.publish_guarded(
        &ep,
        &env.producer,
        &env.publish_request(&subject, &audience, &ep.destination),
        OutboundMessage {
            headers: Headers::new(),
            payload: b"{\"job\":\"once\"}".to_vec(),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    poll_until(WAIT, Duration::from_millis(20), || {
        started.load(Ordering::SeqCst)
    })
    .await;
    assert!(started.load(Ordering::SeqCst), "instance A got the message");
    a.kill();

    // instances B and C of the same group; the server redelivers after ack_wait
    let rec = Recorder::new();
    let b = nats
        .spawn_jetstream(
            &ep.name,
            GROUP,
            &ep.dead_letter,
            env.processor_with(rec.handler(), TestEnv::patient_retry(), Some(seen.clone())),
            &cfg,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let c = nats
        .spawn_jetstream(
            &ep.name,
            GROUP,
            &ep.dead_letter,
            env.processor_with(rec.handler(), TestEnv::patient_retry(), Some(seen.clone())),
            &cfg,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rec.wait_for(1, WAIT).await;
    assert_eq!(
        rec.count(),
        1,
        "the redelivery after the crash is processed, not quarantined"
    );

    // an attacker re-publishes the captured message (same reference, same payload)
    // under fresh message ids, so each lands at a new stream sequence
    let original = nats
        .read_raw(&ep, 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let captured = original
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("nothing on the stream"));
    const REPLAYS: usize = 6;
    for _ in 0..REPLAYS {
        let mut h = captured.headers.clone();
        h.remove("Nats-Msg-Id");
        nats.publish_plain(&ep.destination, &h, captured.payload.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let dl = nats
        .dead_letters(&ep, REPLAYS, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let handled = rec.count();
    b.stop().await;
    c.stop().await;
    assert_eq!(handled, 1, "handled exactly once");
    assert_eq!(dl.len(), REPLAYS, "every replay is dead-lettered");
    assert!(
        dl.iter()
            .all(|m| m.headers.get_str(H_REASON) == Some("replayed")),
        "{:?}",
        reasons(&dl)
    );
    let replayed = env
        .decisions()
        .into_iter()
        .filter(|r| r.reason == elevate_core::Reason::Replayed)
        .count();
    assert_eq!(replayed, REPLAYS);
}
