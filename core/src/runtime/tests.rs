//! The runtime's own rules, over the in-memory broker with a guard that
//! refuses everything (no reference): ordering per key, the panic policy,
//! start checks and shutdown.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::*;
use crate::ctxref::{ContextRefVerifier, VerifyPolicy};
use crate::deadletter::DeadLetter;
use crate::decision::MemorySink;
use crate::guard::{FixedAction, Guard};
use crate::keys::KeySet;
use crate::memory::{MemoryBroker, MemorySource};
use crate::message::Headers;
use crate::pdp::{AccessDecision, AccessRequest, PdpError, PolicyDecisionPoint};
use crate::settle::{DeadLetterPublisher, handler_fn};
use crate::token::{TokenError, TokenRequest, TokenSource, TxnToken};

struct NoTokens;
#[async_trait::async_trait]
impl TokenSource for NoTokens {
    async fn acquire(&self, _: &TokenRequest<'_>) -> Result<TxnToken, TokenError> {
        Err(TokenError::Invalid("unused".into()))
    }
}

struct NoPdp;
#[async_trait::async_trait]
impl PolicyDecisionPoint for NoPdp {
    async fn evaluate(&self, _: &AccessRequest) -> Result<AccessDecision, PdpError> {
        Err(PdpError::Unavailable("unused".into()))
    }
    fn policy_version(&self) -> String {
        "none".into()
    }
}

/// Records the order letters arrive in, optionally slowly.
#[derive(Default)]
struct Letters {
    seen: Mutex<Vec<String>>,
    durable: bool,
}

#[async_trait::async_trait]
impl DeadLetterPublisher for Letters {
    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let body = String::from_utf8_lossy(&letter.payload).to_string();
        if body == "panic" {
            panic!("a bug in a dead-letter publisher");
        }
        self.seen.lock().push(body);
        Ok(())
    }
    fn durable(&self) -> bool {
        self.durable
    }
}

fn processor(letters: Arc<Letters>) -> Arc<Processor> {
    let guard = Guard::new(
        "w",
        ContextRefVerifier::new(KeySet::new(), VerifyPolicy::new("w")),
        Arc::new(NoTokens),
        Arc::new(NoPdp),
        Arc::new(MemorySink::default()),
        Arc::new(FixedAction::new("a", "Queue")),
    );
    Arc::new(Processor::new(
        Arc::new(guard),
        Arc::new(handler_fn(|_, _| async { Ok(()) })),
        letters,
    ))
}

fn publish(broker: &MemoryBroker, key: &str, body: &str) {
    let h: Headers = [("k", key)].into_iter().collect();
    broker.publish("q", h, body.as_bytes().to_vec());
}

async fn until(what: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !what() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_one_key_are_settled_in_order() {
    let broker = MemoryBroker::new();
    for i in 0..50 {
        publish(
            &broker,
            if i % 2 == 0 { "even" } else { "odd" },
            &format!("{i}"),
        );
    }
    let letters = Arc::new(Letters {
        durable: true,
        ..Default::default()
    });
    let p = processor(letters.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let source = MemorySource::new(&broker, "q").ordered_by_header("k");
    let run = tokio::spawn(async move {
        Runtime::new()
            .key_buffer(4)
            .run(source, p, async {
                let _ = stopped.await;
            })
            .await
    });
    until(|| letters.seen.lock().len() == 50).await;
    let _ = stop.send(());
    run.await.unwrap().unwrap();
    let seen: Vec<u32> = letters
        .seen
        .lock()
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    for parity in [0, 1] {
        let of_key: Vec<u32> = seen.iter().copied().filter(|n| n % 2 == parity).collect();
        let mut sorted = of_key.clone();
        sorted.sort_unstable();
        assert_eq!(of_key, sorted, "key {parity} out of order: {seen:?}");
    }
    assert_eq!(broker.unacked_len("q") + broker.ready_len("q"), 0);
}

#[tokio::test]
async fn a_panic_on_an_unordered_delivery_leaves_it_to_the_broker_and_goes_on() {
    let broker = MemoryBroker::new();
    publish(&broker, "a", "panic");
    publish(&broker, "a", "after");
    let letters = Arc::new(Letters {
        durable: true,
        ..Default::default()
    });
    let p = processor(letters.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let source = MemorySource::new(&broker, "q");
    let run = tokio::spawn(async move {
        Runtime::new()
            .run(source, p, async {
                let _ = stopped.await;
            })
            .await
    });
    until(|| letters.seen.lock().iter().any(|s| s == "after")).await;
    let _ = stop.send(());
    run.await.unwrap().unwrap();
    // the panicking delivery was never settled: the broker has it again
    assert_eq!(broker.drain("q").len(), 1);
}

#[tokio::test]
async fn a_panic_on_an_ordered_key_stops_the_run() {
    let broker = MemoryBroker::new();
    publish(&broker, "a", "panic");
    publish(&broker, "a", "after");
    let letters = Arc::new(Letters {
        durable: true,
        ..Default::default()
    });
    let source = MemorySource::new(&broker, "q").ordered_by_header("k");
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        Runtime::new().run(source, processor(letters.clone()), std::future::pending()),
    )
    .await
    .expect("the run did not stop");
    assert!(
        matches!(ended, Err(RunError::Panicked { ref key, .. }) if key == "a"),
        "{ended:?}"
    );
    assert!(
        letters.seen.lock().is_empty(),
        "nothing after the lost delivery may settle"
    );
}

#[tokio::test]
async fn an_at_least_once_source_needs_durable_dead_letters() {
    let broker = MemoryBroker::new();
    let letters = Arc::new(Letters::default());
    let ended = Runtime::new()
        .run(
            MemorySource::new(&broker, "q"),
            processor(letters),
            std::future::pending(),
        )
        .await;
    assert!(
        matches!(
            ended,
            Err(RunError::Start(StartError::DeadLettersNotDurable { .. }))
        ),
        "{ended:?}"
    );
}

#[tokio::test]
async fn a_consumer_without_a_dead_letter_destination_does_not_start() {
    let broker = MemoryBroker::new();
    let bound = processor(Arc::new(Letters::default()));
    let unbound = Arc::new(bound.with_dead_letters(Arc::new(crate::settle::UnboundDeadLetters)));
    assert!(!unbound.dead_letters_bound() && bound.dead_letters_bound());
    let ended = Runtime::new()
        .run(
            MemorySource::new(&broker, "q"),
            unbound.clone(),
            std::future::pending(),
        )
        .await;
    match ended {
        Err(RunError::Start(e @ StartError::DeadLetters { .. })) => {
            assert!(
                e.to_string()
                    .contains("no dead-letter destination is bound for q"),
                "{e}"
            )
        }
        other => panic!("started without dead letters: {other:?}"),
    }
    // A binding binds its default only where none is bound, with the suffix.
    let named = Arc::new((*unbound).clone().with_dead_letter_suffix(".dead"));
    let mut asked = None;
    let rebound = named
        .or_bind_dead_letters(|suffix| {
            asked = Some(suffix.to_string());
            Ok::<_, ()>(Arc::new(Letters::default()) as Arc<dyn DeadLetterPublisher>)
        })
        .expect("bind");
    assert!(rebound.dead_letters_bound());
    assert_eq!(asked.as_deref(), Some(".dead"));
    let kept = bound
        .clone()
        .or_bind_dead_letters(|_| Err::<Arc<dyn DeadLetterPublisher>, _>("must not be called"))
        .expect("kept");
    assert!(Arc::ptr_eq(&kept, &bound));
}

/// A source whose broker stops redelivering after 3 deliveries.
struct Limited(MemorySource);

#[async_trait::async_trait]
impl Source for Limited {
    type Delivery = crate::memory::MemoryDelivery;
    type Error = std::convert::Infallible;
    fn names(&self) -> Vec<String> {
        self.0.names()
    }
    fn limits(&self) -> Limits {
        Limits::at_least_once().with_max_deliveries(Some(3))
    }
    async fn receive(&mut self, max: usize) -> Result<Vec<Self::Delivery>, Self::Error> {
        self.0.receive(max).await
    }
}

#[tokio::test]
async fn a_redelivery_limit_below_the_retry_policy_is_refused_at_start() {
    let broker = MemoryBroker::new();
    let letters = Arc::new(Letters {
        durable: true,
        ..Default::default()
    });
    let ended = Runtime::new()
        .run(
            Limited(MemorySource::new(&broker, "q")),
            processor(letters),
            std::future::pending(),
        )
        .await;
    assert!(
        matches!(
            ended,
            Err(RunError::Start(StartError::MaxDeliveries { max: 3, .. }))
        ),
        "{ended:?}"
    );
}

#[tokio::test]
async fn shutdown_gives_in_flight_deliveries_one_grace_then_hands_them_back() {
    /// A handler-free world where the dead-letter publish never returns.
    struct Stuck;
    #[async_trait::async_trait]
    impl DeadLetterPublisher for Stuck {
        async fn publish(&self, _: &DeadLetter) -> Result<(), TransportError> {
            std::future::pending().await
        }
    }
    let broker = MemoryBroker::new();
    publish(&broker, "a", "x");
    let guard = processor(Arc::new(Letters::default())).guard().clone();
    let p = Arc::new(Processor::new(
        guard,
        Arc::new(handler_fn(|_, _| async { Ok(()) })),
        Arc::new(Stuck),
    ));
    let started = tokio::time::Instant::now();
    let b = broker.clone();
    let ended = Runtime::new()
        .shutdown_grace(Duration::from_millis(300))
        .run(MemorySource::new(&broker, "q"), p, async move {
            until(|| b.unacked_len("q") == 1).await;
        })
        .await;
    assert!(ended.is_ok(), "{ended:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        broker.ready_len("q"),
        1,
        "the abandoned delivery is back with the broker"
    );
}
