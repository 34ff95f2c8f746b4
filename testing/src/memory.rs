//! The conformance binding for the in-memory transport (the reference broker).
//!
//! Every message published to an endpoint's queue is also published to its
//! tap queue (`<queue>.tap`), which the plain consumer of
//! [`BrokerBinding::start_raw_consumer`] reads.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::memory::MemoryBroker;
use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_core::settle::Processor;
use elevate_core::{Headers, OutboundMessage};

use crate::binding::{
    BindResult, BrokerBinding, ConsumerHandle, ConsumerOptions, Endpoint, InboundLimits,
    RawHandler, RawMessage,
};

/// The queue that receives a copy of everything published to `queue`.
pub fn tap_queue(queue: &str) -> String {
    format!("{queue}.tap")
}

/// In-memory broker binding: a fresh broker per binding, one queue per scenario.
#[derive(Clone, Default)]
pub struct MemoryBinding {
    broker: MemoryBroker,
    wire: Arc<parking_lot::Mutex<Vec<(String, RawMessage)>>>,
}

impl MemoryBinding {
    /// A binding over a fresh in-memory broker.
    pub async fn new() -> Self {
        Self::default()
    }

    /// The broker (for tests that reach in).
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    fn send(&self, ep: &Endpoint, headers: Headers, payload: Vec<u8>) {
        self.wire.lock().push((
            ep.name.clone(),
            RawMessage {
                headers: headers.clone(),
                payload: payload.clone(),
            },
        ));
        self.broker
            .publish(&tap_queue(&ep.name), headers.clone(), payload.clone());
        self.broker.publish(&ep.name, headers, payload);
    }
}

#[async_trait::async_trait]
impl BrokerBinding for MemoryBinding {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn limits(&self) -> InboundLimits {
        // The in-memory transport bounds nothing: the letter fits as it is.
        InboundLimits {
            header_bytes: 200_000,
            payload_bytes: None,
            claim_check: false,
            enforced: false,
        }
    }

    async fn setup(&self, scenario: &str) -> BindResult<Endpoint> {
        let name = format!("{scenario}-{}", uuid::Uuid::new_v4().simple());
        Ok(Endpoint {
            destination: name.clone(),
            dead_letter: format!("{name}.dlq"),
            name,
        })
    }

    async fn publish_guarded(
        &self,
        ep: &Endpoint,
        producer: &ProducerGuard,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> BindResult<()> {
        let p = producer
            .prepare(req, msg)
            .await
            .map_err(|e| e.to_string())?;
        self.send(ep, p.headers, p.payload);
        Ok(())
    }

    async fn publish_raw(
        &self,
        ep: &Endpoint,
        headers: Headers,
        payload: Vec<u8>,
    ) -> BindResult<()> {
        self.send(ep, headers, payload);
        Ok(())
    }

    async fn start_consumer_with(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
        opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle> {
        let dead_letters =
            opts.dead_letters(Arc::new(self.broker.dead_letter_queue(&ep.dead_letter)));
        let processor = Arc::new(processor.with_dead_letters(dead_letters));
        let source = elevate_core::memory::MemorySource::new(&self.broker, ep.name.clone());
        let runtime = elevate_core::Runtime::new()
            .concurrency(opts.concurrency_or(elevate_core::runtime::DEFAULT_CONCURRENCY));
        Ok(ConsumerHandle::spawn(|stopped| async move {
            if let Err(e) = runtime.run(source, processor, stopped).await {
                tracing::error!(error = %e, "memory consumer ended");
            }
        }))
    }

    async fn start_raw_consumer(
        &self,
        ep: &Endpoint,
        on_message: RawHandler,
        _opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle> {
        use elevate_core::settle::Delivery;
        let broker = self.broker.clone();
        let queue = tap_queue(&ep.name);
        // One message at a time: receiving and acknowledging is all it does.
        Ok(ConsumerHandle::spawn(|mut stopped| async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    d = broker.receive(&queue, Duration::from_millis(100)) => {
                        if let Some(d) = d {
                            let m = d.message();
                            on_message(&m.headers, &m.payload);
                            let _ = d.ack().await;
                        }
                    }
                }
            }
        }))
    }

    async fn dead_letters(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            out.extend(
                self.broker
                    .drain(&ep.dead_letter)
                    .into_iter()
                    .map(|m| RawMessage {
                        headers: m.headers,
                        payload: m.payload.to_vec(),
                    }),
            );
            if out.len() >= expected || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn read_raw(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got: Vec<RawMessage> = self
                .wire
                .lock()
                .iter()
                .filter(|(q, _)| q == &ep.name)
                .map(|(_, m)| m.clone())
                .collect();
            if got.len() >= expected || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[async_trait::async_trait]
impl crate::delivery::DeliveryBinding for MemoryBinding {
    type Source = elevate_core::memory::MemorySource;

    async fn open_source(
        &self,
        ep: &Endpoint,
        _processor: Arc<Processor>,
    ) -> BindResult<Self::Source> {
        Ok(elevate_core::memory::MemorySource::new(
            &self.broker,
            ep.name.clone(),
        ))
    }

    fn unsettled_window(&self) -> Duration {
        // Dropped deliveries return at once.
        Duration::from_millis(100)
    }
}
