//! The `Delivery` contract: what core's runtime relies on from a binding's
//! [`Source`] and its deliveries, checked on a real broker with no runtime
//! and no guard in between, so that a third-party binding can prove itself.
//!
//! - [`ack_consumes`]: an acknowledged delivery is gone for good; a source
//!   reopened on the same queue / group / durable consumer does not see it
//!   again (while it does see what was published after).
//! - [`redeliver_counts`]: a delivery handed back with `redeliver` comes back
//!   at the same position with the broker's delivery count one higher. A
//!   source that retries in place ([`RedeliveryMode::InPlace`], Kafka) must
//!   instead refuse `redeliver` and leave the message unsettled: it comes
//!   back to the next consumer.
//! - [`unsettled_drop_redelivered`]: a delivery dropped without settling
//!   (a crashed task, an aborted consumer) comes back, at the same position.
//!
//! A binding implements [`DeliveryBinding`] (one method on top of
//! [`BrokerBinding`]) and instantiates the tests with
//! [`delivery_contract!`](crate::delivery_contract). Core NATS is not an
//! at-least-once source (the server keeps nothing) and is not held to it.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::Headers;
use elevate_core::runtime::Source;
use elevate_core::settle::{Delivery, Processor, RedeliveryMode};

use crate::binding::{BindResult, BrokerBinding, Endpoint};
use crate::env::{Recorder, TestEnv};

/// How long a check waits for one message to arrive (a Kafka group join on
/// tansu takes seconds).
pub const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(60);

/// A binding whose source can be opened and driven by hand.
#[async_trait::async_trait]
pub trait DeliveryBinding: BrokerBinding {
    /// The binding's source, as its consumer hands it to core's runtime.
    type Source: Source + 'static;

    /// Opens a source on `ep` as a (re)started consumer does: the same
    /// queue, consumer group or durable consumer every time, so that what
    /// one source left unsettled the next one receives. `processor` is what
    /// the binding's consumer would run (some sources keep it for their own
    /// start checks); the contract never calls it.
    async fn open_source(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
    ) -> BindResult<Self::Source>;

    /// How long the broker may take to hand back a message whose delivery
    /// was dropped unsettled (JetStream: the consumer's `ack_wait`).
    fn unsettled_window(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// Receives from `source` until a delivery whose payload is `payload`
/// arrives (returned, unsettled) or `timeout` passes (`None`). Every other
/// delivery received meanwhile is acknowledged and its payload pushed onto
/// `others`.
///
/// # Errors
/// The source failed.
pub async fn receive_payload<S: Source>(
    source: &mut S,
    payload: &[u8],
    timeout: Duration,
    others: &mut Vec<Vec<u8>>,
) -> BindResult<Option<S::Delivery>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut found = None;
    while found.is_none() && tokio::time::Instant::now() < deadline {
        let batch = source.receive(8).await.map_err(|e| e.to_string())?;
        for d in batch {
            if found.is_none() && d.message().payload.as_ref() == payload {
                found = Some(d);
            } else {
                others.push(d.message().payload.to_vec());
                d.ack().await.map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(found)
}

/// A fresh endpoint and environment for one check.
async fn start<B: DeliveryBinding>(b: &B, scenario: &str) -> (Endpoint, Arc<Processor>, TestEnv) {
    let env = TestEnv::start().await;
    let ep = b
        .setup(scenario)
        .await
        .unwrap_or_else(|e| panic!("[{}] setup: {e}", b.name()));
    let processor = env.processor(Recorder::new().handler());
    (ep, processor, env)
}

async fn open<B: DeliveryBinding>(b: &B, ep: &Endpoint, processor: &Arc<Processor>) -> B::Source {
    b.open_source(ep, processor.clone())
        .await
        .unwrap_or_else(|e| panic!("[{}] open source: {e}", b.name()))
}

async fn publish<B: DeliveryBinding>(b: &B, ep: &Endpoint, payload: &[u8]) {
    b.publish_raw(ep, Headers::new(), payload.to_vec())
        .await
        .unwrap_or_else(|e| panic!("[{}] publish: {e}", b.name()));
}

async fn expect<B: DeliveryBinding>(
    b: &B,
    source: &mut B::Source,
    payload: &[u8],
    timeout: Duration,
    what: &str,
) -> <B::Source as Source>::Delivery {
    let mut others = Vec::new();
    match receive_payload(source, payload, timeout, &mut others).await {
        Ok(Some(d)) => d,
        Ok(None) => panic!(
            "[{}] {what}: {:?} did not arrive within {timeout:?} (received instead: {others:?})",
            b.name(),
            String::from_utf8_lossy(payload)
        ),
        Err(e) => panic!("[{}] {what}: the source failed: {e}", b.name()),
    }
}

/// Ends a source as a stopping consumer does: close (hand back the buffer,
/// commit), then drop it.
async fn end<S: Source>(mut source: S) {
    source.close().await;
    drop(source);
}

/// An acknowledged delivery is not delivered again, to this source or to
/// the next one opened on the same endpoint.
pub async fn ack_consumes<B: DeliveryBinding>(b: &B) {
    let (ep, processor, _env) = start(b, "contract-ack").await;
    publish(b, &ep, b"acked").await;
    let mut source = open(b, &ep, &processor).await;
    let d = expect(b, &mut source, b"acked", ARRIVAL_TIMEOUT, "first delivery").await;
    d.ack()
        .await
        .unwrap_or_else(|e| panic!("[{}] ack: {e}", b.name()));
    end(source).await;

    // The reopened source sees a message published after the ack, and
    // never the acknowledged one, within the broker's redelivery window.
    let mut source = open(b, &ep, &processor).await;
    tokio::time::sleep(b.unsettled_window()).await;
    publish(b, &ep, b"after").await;
    let mut others = Vec::new();
    let after = receive_payload(&mut source, b"after", ARRIVAL_TIMEOUT, &mut others)
        .await
        .unwrap_or_else(|e| panic!("[{}] reopened source failed: {e}", b.name()));
    assert!(
        after.is_some(),
        "[{}] the reopened source did not receive the message published after the ack",
        b.name()
    );
    assert!(
        !others.iter().any(|p| p == b"acked"),
        "[{}] an acknowledged delivery came back: {others:?}",
        b.name()
    );
    if let Some(d) = after {
        d.ack()
            .await
            .unwrap_or_else(|e| panic!("[{}] ack: {e}", b.name()));
    }
    end(source).await;
}

/// `redeliver` hands the message back with the broker's count one higher,
/// at the same position; an in-place source refuses it and the message
/// stays unsettled for the next consumer.
pub async fn redeliver_counts<B: DeliveryBinding>(b: &B) {
    let (ep, processor, _env) = start(b, "contract-redeliver").await;
    publish(b, &ep, b"again").await;
    let mut source = open(b, &ep, &processor).await;
    let d = expect(b, &mut source, b"again", ARRIVAL_TIMEOUT, "first delivery").await;
    let (attempt, position) = (d.message().delivery_attempt, d.message().position.clone());
    assert_eq!(
        attempt,
        1,
        "[{}] a first delivery counts 1, got {attempt}",
        b.name()
    );
    match d.redelivery_mode() {
        RedeliveryMode::Broker => {
            d.redeliver(Duration::from_millis(200))
                .await
                .unwrap_or_else(|e| panic!("[{}] redeliver: {e}", b.name()));
            let again = expect(b, &mut source, b"again", ARRIVAL_TIMEOUT, "redelivery").await;
            assert_eq!(
                again.message().delivery_attempt,
                attempt + 1,
                "[{}] a redelivery counts one more",
                b.name()
            );
            assert_eq!(
                again.message().position,
                position,
                "[{}] a redelivery keeps its position (replay protection keys on it)",
                b.name()
            );
            again
                .ack()
                .await
                .unwrap_or_else(|e| panic!("[{}] ack: {e}", b.name()));
            end(source).await;
        }
        RedeliveryMode::InPlace => {
            assert!(
                d.redeliver(Duration::ZERO).await.is_err(),
                "[{}] an in-place source must refuse redeliver (it would settle the message)",
                b.name()
            );
            end(source).await;
            let mut source = open(b, &ep, &processor).await;
            let again = expect(
                b,
                &mut source,
                b"again",
                ARRIVAL_TIMEOUT + b.unsettled_window(),
                "after a refused redeliver",
            )
            .await;
            assert_eq!(
                again.message().position,
                position,
                "[{}] the message came back at the same position",
                b.name()
            );
            again
                .ack()
                .await
                .unwrap_or_else(|e| panic!("[{}] ack: {e}", b.name()));
            end(source).await;
        }
        other => panic!("[{}] unknown redelivery mode {other:?}", b.name()),
    }
}

/// A delivery dropped unsettled (its task crashed, its consumer went away)
/// is delivered again, at the same position.
pub async fn unsettled_drop_redelivered<B: DeliveryBinding>(b: &B) {
    let (ep, processor, _env) = start(b, "contract-drop").await;
    publish(b, &ep, b"dropped").await;
    let mut source = open(b, &ep, &processor).await;
    let d = expect(
        b,
        &mut source,
        b"dropped",
        ARRIVAL_TIMEOUT,
        "first delivery",
    )
    .await;
    let position = d.message().position.clone();
    drop(d);
    end(source).await;

    let mut source = open(b, &ep, &processor).await;
    let again = expect(
        b,
        &mut source,
        b"dropped",
        ARRIVAL_TIMEOUT + b.unsettled_window(),
        "after an unsettled drop",
    )
    .await;
    assert_eq!(
        again.message().position,
        position,
        "[{}] the message came back at the same position",
        b.name()
    );
    again
        .ack()
        .await
        .unwrap_or_else(|e| panic!("[{}] ack: {e}", b.name()));
    end(source).await;
}

/// Instantiates the Delivery contract as `#[tokio::test]`s for one binding:
/// `elevate_testing::delivery_contract!(MyBinding::new());` (the expression
/// is awaited and must implement [`DeliveryBinding`]).
#[macro_export]
macro_rules! delivery_contract {
    ($make:expr) => {
        mod delivery_contract {
            #[allow(unused_imports)]
            use super::*;
            $crate::delivery_contract!(@test $make, ack_consumes, redeliver_counts, unsettled_drop_redelivered);
        }
    };
    (@test $make:expr, $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let binding = $make.await;
                $crate::delivery::$name(&binding).await;
            }
        )*
    };
}
