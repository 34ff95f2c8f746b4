//! The conformance binding for AMQP 0-9-1 on a real RabbitMQ at `AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Each scenario gets a direct exchange and a work queue bound to it, so
//! references are bound to `<exchange>/<routing key>` (retries then exercise
//! the destination carried across the retry queue); the queue's retry and
//! dead-letter queues come from `elevate_amqp::declare_queues_with`, and a
//! "tap" queue bound with the same key lets `read_raw` see exactly what was
//! published (and the plain consumer of [`BrokerBinding::start_raw_consumer`]
//! reads). Scenario queues expire 10 minutes after their last use.

use std::sync::Arc;
use std::time::Duration;

use elevate_amqp::{AmqpDeadLetters, AmqpPublisher, ConfirmChannel, GuardedConsumer, headers};
use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_core::settle::Processor;
use elevate_core::{Headers, OutboundMessage};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::binding::{
    BindResult, BrokerBinding, ConsumerHandle, ConsumerOptions, Endpoint, InboundLimits,
    RawHandler, RawMessage,
};

/// Prefetch and concurrency of the binding's guarded consumers by default.
pub const PREFETCH: u16 = 32;

/// The most messages a tap queue keeps (the oldest go first): a bound for
/// taps nobody reads, far above what a scenario or a benchmark row publishes.
pub const TAP_MAX_LENGTH: i32 = 1_000_000;

/// The broker address: `AMQP_URL`, else the local RabbitMQ, else a container
/// where Docker runs (see [`crate::fixture`]).
pub fn amqp_url() -> String {
    crate::fixture::address(crate::fixture::Service::RabbitMq)
}

fn err(e: impl std::fmt::Display) -> String {
    format!("amqp: {e}")
}

/// Connects to the broker under a connection name (visible in `rabbitmqctl list_connections`);
/// panics with how to start RabbitMQ when it cannot be reached.
pub async fn connect(name: &str) -> Connection {
    try_connect(&amqp_url(), name)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Connects to the broker at `url` under a connection name.
///
/// # Errors
///
/// Returns how to start RabbitMQ if the connection fails or takes over 10 s.
pub async fn try_connect(url: &str, name: &str) -> BindResult<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!(
            "cannot connect to RabbitMQ at {url} (AMQP_URL): {e}. Start it with `rabbitmq-server -detached` \
             (guest/guest on 127.0.0.1:5672), or point AMQP_URL at a broker"
        )),
        Err(_) => Err(format!(
            "timed out connecting to RabbitMQ at {url} (AMQP_URL): start it with `rabbitmq-server -detached`"
        )),
    }
}

/// Arguments every scenario queue gets: expire 10 minutes after last use.
pub fn scenario_queue_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    t
}

/// The properties of a plain publish: `headers` as the header table,
/// persistent, a fresh message id.
fn plain_properties(headers: &Headers) -> BindResult<BasicProperties> {
    Ok(BasicProperties::default()
        .with_headers(headers::encode(headers).map_err(err)?)
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(uuid::Uuid::new_v4().to_string().into()))
}

/// The tap queue that records what was published to an endpoint.
pub fn tap_queue(queue: &str) -> String {
    format!("{queue}.tap")
}

/// Reads up to `expected` messages from `queue` with `basic.get` (acking them), waiting up to `timeout`.
///
/// # Errors
///
/// Returns the broker's error, as text, if a `basic.get` or an ack fails (channel closed, queue
/// missing). Fewer than `expected` messages by the deadline is not an error.
pub async fn drain(
    channel: &Channel,
    queue: &str,
    expected: usize,
    timeout: Duration,
) -> BindResult<Vec<RawMessage>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .map_err(err)?
        {
            Some(m) => {
                out.push(RawMessage {
                    headers: headers::decode(m.delivery.properties.headers().as_ref()),
                    payload: m.delivery.data.clone(),
                });
                m.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(err)?;
            }
            None => {
                if out.len() >= expected || tokio::time::Instant::now() >= deadline {
                    return Ok(out);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// AMQP binding over one connection to the real broker.
pub struct AmqpBinding {
    url: String,
    conn: Arc<Connection>,
    admin: Channel,
    confirms: ConfirmChannel,
}

impl AmqpBinding {
    /// Connects to the real broker (panics with how to start it if unreachable).
    pub async fn real() -> Self {
        Self::connect_to(&amqp_url())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Connects to the broker at `url`.
    ///
    /// # Errors
    ///
    /// Returns how to start RabbitMQ if it cannot be reached, and the broker's
    /// error if a channel cannot be opened on the connection.
    pub async fn connect_to(url: &str) -> BindResult<Self> {
        let name = format!("elevate-test-{}", uuid::Uuid::new_v4().simple());
        let conn = try_connect(url, &name).await?;
        let admin = conn.create_channel().await.map_err(err)?;
        let confirms = ConfirmChannel::open(&conn).await.map_err(err)?;
        Ok(AmqpBinding {
            url: url.to_string(),
            conn: Arc::new(conn),
            admin,
            confirms,
        })
    }

    /// The binding's connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// A channel in confirm mode on the binding's connection.
    pub fn confirms(&self) -> &ConfirmChannel {
        &self.confirms
    }
}

#[async_trait::async_trait]
impl BrokerBinding for AmqpBinding {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn limits(&self) -> InboundLimits {
        // The header frame is bounded by frame_max; bodies are split into frames.
        // An original this close to frame_max fits; its letter (+ the envelope) does not.
        InboundLimits {
            header_bytes: (self.confirms.frame_max() as usize).saturating_sub(400),
            payload_bytes: None,
            claim_check: false,
            enforced: true,
        }
    }

    async fn setup(&self, scenario: &str) -> BindResult<Endpoint> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let exchange = format!("elevate.{scenario}.{id}");
        let queue = format!("elevate-{scenario}-{id}");
        let rk = format!("{scenario}.job");
        self.admin
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(err)?;
        let q = elevate_amqp::declare_queue_set(
            &self.admin,
            &queue,
            scenario_queue_args(),
            scenario_queue_args(),
        )
        .await
        .map_err(err)?;
        let mut tap_args = scenario_queue_args();
        tap_args.insert("x-max-length".into(), AMQPValue::LongInt(TAP_MAX_LENGTH));
        self.admin
            .queue_declare(
                tap_queue(&queue).as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                tap_args,
            )
            .await
            .map_err(err)?;
        for qn in [q.work.clone(), tap_queue(&queue)] {
            self.admin
                .queue_bind(
                    qn.as_str().into(),
                    exchange.as_str().into(),
                    rk.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(err)?;
        }
        Ok(Endpoint {
            destination: elevate_amqp::destination(&exchange, &rk),
            dead_letter: q.dead_letter,
            name: q.work,
        })
    }

    async fn publish_guarded(
        &self,
        ep: &Endpoint,
        producer: &ProducerGuard,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> BindResult<()> {
        let req = PublishRequest {
            destination: &ep.destination,
            ..req.clone()
        };
        AmqpPublisher::with_confirm_channel(self.confirms.clone(), producer.clone())
            .publish(&req, msg)
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn publish_raw(
        &self,
        ep: &Endpoint,
        headers: Headers,
        payload: Vec<u8>,
    ) -> BindResult<()> {
        let (exchange, rk) = elevate_amqp::address(&ep.destination);
        let confirm = self
            .admin
            .basic_publish(
                exchange.into(),
                rk.into(),
                BasicPublishOptions::default(),
                &payload,
                plain_properties(&headers)?,
            )
            .await
            .map_err(err)?;
        drop(confirm); // the admin channel is not in confirm mode
        Ok(())
    }

    async fn publish_batch(
        &self,
        ep: &Endpoint,
        messages: Vec<(Headers, Vec<u8>)>,
    ) -> BindResult<()> {
        // On the confirming channel, up to 500 publishes in flight; each must
        // be routed (`mandatory`) and acknowledged.
        let (exchange, rk) = elevate_amqp::address(&ep.destination);
        let channel = self.confirms.channel();
        for chunk in messages.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (headers, payload) in chunk {
                confirms.push(
                    channel
                        .basic_publish(
                            exchange.into(),
                            rk.into(),
                            BasicPublishOptions {
                                mandatory: true,
                                immediate: false,
                            },
                            payload,
                            plain_properties(headers)?,
                        )
                        .await
                        .map_err(err)?,
                );
            }
            for c in confirms {
                match c.await.map_err(err)? {
                    lapin::Confirmation::Ack(None) => {}
                    other => return Err(format!("amqp: publish not confirmed: {other:?}")),
                }
            }
        }
        Ok(())
    }

    async fn start_consumer_with(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
        opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle> {
        let (worker, channel, confirms) = self.worker(ep, processor, opts).await?;
        Ok(ConsumerHandle::spawn(|stopped| async move {
            if let Err(e) = worker.run(stopped).await {
                tracing::warn!(error = %e, "amqp worker ended");
            }
            let _ = channel.close(200, "done".into()).await;
            let _ = confirms.channel().close(200, "done".into()).await;
        }))
    }

    async fn start_raw_consumer(
        &self,
        ep: &Endpoint,
        on_message: RawHandler,
        opts: &ConsumerOptions,
    ) -> BindResult<ConsumerHandle> {
        // The tap queue gets a copy of everything routed to the work queue.
        let concurrency = opts.concurrency_or(usize::from(PREFETCH));
        let channel = self.conn.create_channel().await.map_err(err)?;
        channel
            .basic_qos(
                u16::try_from(concurrency).unwrap_or(u16::MAX),
                BasicQosOptions::default(),
            )
            .await
            .map_err(err)?;
        let consumer = channel
            .basic_consume(
                tap_queue(&ep.name).as_str().into(),
                format!("plain-{}", uuid::Uuid::new_v4().simple()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err)?;
        let on_each = move |d: Result<lapin::message::Delivery, _>| {
            let on_message = on_message.clone();
            async move {
                if let Ok(d) = d {
                    on_message(&headers::decode(d.properties.headers().as_ref()), &d.data);
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                }
            }
        };
        let close = async move {
            let _ = channel.close(200, "done".into()).await;
        };
        Ok(ConsumerHandle::spawn_plain(
            consumer,
            concurrency,
            on_each,
            close,
        ))
    }

    async fn teardown(&self, ep: &Endpoint) {
        // (the exchange is auto-delete: it goes with its last binding)
        let q = elevate_amqp::Queues::named(&ep.name);
        for queue in [q.work, q.retry, q.dead_letter, tap_queue(&ep.name)] {
            let _ = self
                .admin
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }

    async fn dead_letters(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>> {
        drain(&self.admin, &ep.dead_letter, expected, timeout).await
    }

    async fn read_raw(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>> {
        drain(&self.admin, &tap_queue(&ep.name), expected, timeout).await
    }
}

impl AmqpBinding {
    /// The guarded worker the binding runs on `ep` (its own consuming and
    /// confirming channels, retry copies authenticated by the URI's user),
    /// with the channels to close after it.
    async fn worker(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
        opts: &ConsumerOptions,
    ) -> BindResult<(GuardedConsumer, Channel, ConfirmChannel)> {
        let prefetch =
            u16::try_from(opts.concurrency_or(usize::from(PREFETCH))).unwrap_or(u16::MAX);
        let channel = self.conn.create_channel().await.map_err(err)?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(err)?;
        let consumer = channel
            .basic_consume(
                ep.name.as_str().into(),
                format!("guarded-{}", uuid::Uuid::new_v4().simple()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err)?;
        let confirms = ConfirmChannel::open(&self.conn).await.map_err(err)?;
        let dead_letters =
            AmqpDeadLetters::with_confirm_channel(confirms.clone(), "", &ep.dead_letter);
        let processor =
            Arc::new(processor.with_dead_letters(opts.dead_letters(Arc::new(dead_letters))));
        let mut worker = GuardedConsumer::new(consumer, processor, confirms.clone())
            .concurrency(usize::from(prefetch));
        if let Some(user) = elevate_amqp::uri_user(&self.url) {
            worker = worker.retry_user(user);
        }
        Ok((worker, channel, confirms))
    }
}

#[async_trait::async_trait]
impl crate::delivery::DeliveryBinding for AmqpBinding {
    type Source = ClosingSource;

    async fn open_source(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
    ) -> BindResult<Self::Source> {
        let (worker, channel, confirms) = self
            .worker(ep, processor, &ConsumerOptions::default())
            .await?;
        Ok(ClosingSource {
            inner: worker.into_parts().1,
            channels: vec![channel, confirms.channel().clone()],
        })
    }

    fn unsettled_window(&self) -> Duration {
        Duration::from_secs(3)
    }
}

/// An [`elevate_amqp::AmqpSource`] that closes its channels when it closes,
/// as an application does after the worker's `run` returned: RabbitMQ then
/// stops pushing to the consumer and requeues what it held unacked.
pub struct ClosingSource {
    inner: elevate_amqp::AmqpSource,
    channels: Vec<Channel>,
}

#[async_trait::async_trait]
impl elevate_core::runtime::Source for ClosingSource {
    type Delivery = elevate_amqp::AmqpDelivery;
    type Error = elevate_amqp::Error;

    fn names(&self) -> Vec<String> {
        self.inner.names()
    }

    fn limits(&self) -> elevate_core::runtime::Limits {
        self.inner.limits()
    }

    async fn check(&mut self, processor: &Processor) -> Result<(), Self::Error> {
        self.inner.check(processor).await
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Self::Delivery>, Self::Error> {
        self.inner.receive(max).await
    }

    fn can_settle_after(&self, error: &Self::Error) -> bool {
        self.inner.can_settle_after(error)
    }

    async fn close(&mut self) {
        self.inner.close().await;
        for c in self.channels.drain(..) {
            let _ = c.close(200, "done".into()).await;
        }
    }
}
