//! Settlement, defined once for every broker: what happens to a delivery
//! after the guard's verdict. A broker crate implements [`Delivery`] and
//! [`DeadLetterPublisher`]; [`Processor::process`] does the rest.
//!
//! Rules: nothing is dispatched without a Permit; a message is settled only
//! after its outcome is durable (handler succeeded, or the dead letter was
//! confirmed); Retry is bounded and ends in a `retries-exhausted` dead letter.
//! Settling consumes the delivery, so a double ack does not compile.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::admission::Admission;
use crate::auth::AuthContext;
use crate::deadletter::{DeadLetter, Excess, PayloadAt};
use crate::guard::{Guard, GuardDecision};
use crate::message::InboundMessage;
use crate::retry::RetryPolicy;
use crate::verdict::{Reason, Verdict};

/// What a broker or client said, kept as the error it was (its source chain
/// intact) or as a message where there was no error value.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// A broker operation failed (settle or dead-letter publish).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} failed{}: {cause}", if *permanent { " for good" } else { "" })]
pub struct TransportError {
    /// The operation (`ack`, `nack`, `dead-letter publish`...).
    pub op: &'static str,
    /// What the broker or client said: the client's own error where there
    /// is one (see [`std::error::Error::source`]).
    #[source]
    pub cause: Cause,
    /// The broker refused the operation itself (too large, invalid, not
    /// authorized): repeating it cannot succeed. Otherwise it may (a timeout,
    /// a lost connection).
    pub permanent: bool,
}

impl TransportError {
    /// A transient failure: the same operation may succeed later. `cause`
    /// is the client's error, or a message (`&str`, `String`).
    pub fn new(
        op: &'static str,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        TransportError {
            op,
            cause: Arc::from(cause.into()),
            permanent: false,
        }
    }

    /// A permanent refusal: the same operation will fail again.
    pub fn permanent(
        op: &'static str,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        TransportError {
            permanent: true,
            ..Self::new(op, cause)
        }
    }

    /// Whether repeating the operation cannot succeed.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

/// How a broker gives a message back for a later attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedeliveryMode {
    /// The broker redelivers (NATS nak with delay, AMQP retry queue, in-memory requeue).
    Broker,
    /// The consumer waits and re-evaluates in place, holding its position (Kafka partitions).
    InPlace,
}

/// One received message awaiting settlement. Settling consumes it.
#[async_trait::async_trait]
pub trait Delivery: Send + Sync + Sized {
    /// The message.
    fn message(&self) -> &InboundMessage;

    /// Settles the message as done (ack / store offset / JetStream ack).
    async fn ack(self) -> Result<(), TransportError>;

    /// Hands the message back to be delivered again after `delay`, attempt count + 1.
    /// Only called in [`RedeliveryMode::Broker`].
    async fn redeliver(self, delay: Duration) -> Result<(), TransportError>;

    /// Settles a message whose dead letter was confirmed; defaults to [`Delivery::ack`]
    /// (JetStream overrides it with `+TERM` so the server stops redelivering and emits its advisory).
    async fn ack_dead_lettered(self) -> Result<(), TransportError> {
        self.ack().await
    }

    /// Tells the broker the message is still being worked on (JetStream `+WPI`).
    async fn keep_alive(&self) -> Result<(), TransportError> {
        Ok(())
    }

    /// How this broker retries.
    fn redelivery_mode(&self) -> RedeliveryMode {
        RedeliveryMode::Broker
    }
}

/// Publishes dead letters; returns only once the broker has confirmed the publish.
#[async_trait::async_trait]
pub trait DeadLetterPublisher: Send + Sync {
    /// Publishes and waits for the broker's confirmation. A refusal that a
    /// retry cannot change (too large, invalid header, not authorized) must
    /// be a [`TransportError::permanent`]: core then publishes the minimal letter.
    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError>;

    /// How far `letter`, as this publisher would encode it, is over the
    /// broker's real limits (RabbitMQ `frame_max` for the header frame, NATS
    /// `max_payload`, Kafka `message.max.bytes`). Core shrinks the letter
    /// until this says it fits (see [`crate::deadletter::fit`]).
    fn measure(&self, _letter: &DeadLetter) -> Excess {
        Excess::default()
    }

    /// Stores the payload of a letter too large for the broker (a claim
    /// check) and says where; [`DeadLetter::claim_payload`] is the payload,
    /// [`DeadLetter::idempotency_key`] a stable name for it. The default has
    /// no store: the payload is then withheld (length and SHA-256 kept).
    async fn store_claim(&self, _letter: &DeadLetter) -> Result<PayloadAt, TransportError> {
        Err(TransportError::permanent(
            "claim check",
            "this dead-letter publisher has no claim-check store",
        ))
    }

    /// Whether a confirmed publish is stored by the broker (a stream, a
    /// durable queue, a topic), not merely received. An at-least-once guard
    /// refuses to settle messages on a publisher that says no.
    fn durable(&self) -> bool {
        true
    }

    /// Checked when a consumer starts, for messages read from `source`:
    /// that their letters can be stored (the dead-letter destination and
    /// claim-check store exist and keep what they confirm). An error stops
    /// the consumer before it takes a message; a weaker setting it can
    /// only warn about is logged.
    async fn preflight(&self, _source: &str) -> Result<(), TransportError> {
        Ok(())
    }

    /// Whether this publisher sends letters anywhere. Only the placeholder
    /// [`UnboundDeadLetters`] says no: a broker binding then binds its
    /// default (`<destination>` + [`Processor::dead_letter_suffix`]).
    fn is_bound(&self) -> bool {
        true
    }
}

/// The default dead-letter naming: letters of `<destination>` go to
/// `<destination>.dlq`.
pub const DEFAULT_DEAD_LETTER_SUFFIX: &str = ".dlq";

/// A dead-letter publisher that refuses every publish: the safe placeholder
/// until a broker binding supplies its own. A broker binding's consumer
/// replaces it with the broker's default publisher; core's runtime refuses
/// to start a consumer on it (no message could ever be dead-lettered).
#[derive(Debug, Clone, Copy, Default)]
pub struct UnboundDeadLetters;

#[async_trait::async_trait]
impl DeadLetterPublisher for UnboundDeadLetters {
    async fn publish(&self, _: &DeadLetter) -> Result<(), TransportError> {
        Err(TransportError::new(
            "dead-letter publish",
            "no dead-letter destination bound",
        ))
    }

    async fn preflight(&self, source: &str) -> Result<(), TransportError> {
        Err(TransportError::permanent(
            "dead-letter preflight",
            format!(
                "no dead-letter destination is bound for {source}: build the consumer with the \
                 binding's constructor (it binds `<destination>.dlq`) or give the processor a \
                 publisher with Processor::with_dead_letters"
            ),
        ))
    }

    fn is_bound(&self) -> bool {
        false
    }
}

/// A handler failure: transient errors are retried, permanent ones dead-lettered.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// Try again later (bounded by the handler retry policy).
    #[error("transient handler error: {0}")]
    Transient(String),
    /// Do not retry: dead-letter `handler-failed`.
    #[error("permanent handler error: {0}")]
    Permanent(String),
}

/// The user's message handler, run only on Permit.
#[async_trait::async_trait]
pub trait Handler: Send + Sync {
    /// Handles a permitted message.
    async fn handle(&self, msg: &InboundMessage, auth: &AuthContext) -> Result<(), HandlerError>;
}

/// A handler from an async closure taking owned values.
pub struct FnHandler<F>(F);

/// Wraps `Fn(InboundMessage, AuthContext) -> impl Future<Output = Result<(), HandlerError>>`.
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(InboundMessage, AuthContext) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    FnHandler(f)
}

#[async_trait::async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(InboundMessage, AuthContext) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    async fn handle(&self, msg: &InboundMessage, auth: &AuthContext) -> Result<(), HandlerError> {
        (self.0)(msg.clone(), auth.clone()).await
    }
}

/// What became of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Permitted, handled, acked.
    Handled {
        /// Decision id.
        decision_id: String,
    },
    /// Dead letter confirmed, original acked.
    DeadLettered {
        /// Decision id.
        decision_id: String,
        /// Why the guard refused the message, as recorded on the dead letter.
        reason: Reason,
    },
    /// Handed back to the broker for a later attempt.
    Redelivering {
        /// Decision id.
        decision_id: String,
        /// Why the message is not settled yet (the guard's or the handler's reason).
        reason: Reason,
        /// After how long.
        delay: Duration,
    },
}

/// Settlement could not complete; the message was left unsettled for the broker to redeliver.
#[derive(Debug, Clone, thiserror::Error)]
#[error("message left unsettled ({reason}): {error}")]
pub struct ProcessError {
    /// What the guard had decided.
    pub reason: Reason,
    /// The broker failure.
    pub error: TransportError,
}

/// Drives one delivery from verdict to settlement.
#[derive(Clone)]
pub struct Processor {
    guard: Arc<Guard>,
    handler: Arc<dyn Handler>,
    dead_letters: Arc<dyn DeadLetterPublisher>,
    dead_letter_suffix: Arc<str>,
    retry: RetryPolicy,
    handler_retry: RetryPolicy,
    keep_alive_every: Duration,
    admission: Arc<Admission>,
    /// When each message handed back to the broker during an outage first
    /// failed, so its time budget survives redeliveries (per process; a
    /// redelivery to another instance starts its clock again, bounded by the
    /// reference's expiry).
    outages: moka::sync::Cache<String, std::time::Instant>,
}

/// Most messages whose outage clock is kept at once.
const MAX_OUTAGE_CLOCKS: u64 = 200_000;

fn outage_clocks(retry: &RetryPolicy) -> moka::sync::Cache<String, std::time::Instant> {
    let ttl = retry
        .max_elapsed
        .unwrap_or(crate::retry::DEFAULT_OUTAGE_BUDGET)
        .saturating_add(Duration::from_secs(60));
    moka::sync::Cache::builder()
        .max_capacity(MAX_OUTAGE_CLOCKS)
        .time_to_live(ttl)
        .build()
}

/// The key of a message's outage clock: its stable position (the binding
/// makes it unique per original message, see [`InboundMessage::position`]).
fn outage_key(msg: &InboundMessage) -> String {
    msg.position.clone()
}

impl Processor {
    /// A processor with default retry policies.
    pub fn new(
        guard: Arc<Guard>,
        handler: Arc<dyn Handler>,
        dead_letters: Arc<dyn DeadLetterPublisher>,
    ) -> Self {
        Processor {
            guard,
            handler,
            dead_letters,
            dead_letter_suffix: DEFAULT_DEAD_LETTER_SUFFIX.into(),
            retry: RetryPolicy::default(),
            handler_retry: RetryPolicy::handler_default(),
            keep_alive_every: Duration::from_secs(5),
            admission: Arc::new(Admission::new(RetryPolicy::default())),
            outages: outage_clocks(&RetryPolicy::default()),
        }
    }

    /// The same processor publishing dead letters through `dead_letters`
    /// (a broker binding binds its own dead-letter destination this way).
    pub fn with_dead_letters(&self, dead_letters: Arc<dyn DeadLetterPublisher>) -> Processor {
        Processor {
            dead_letters,
            ..self.clone()
        }
    }

    /// Names the default dead-letter destination of a broker binding:
    /// `<destination><suffix>` (default [`DEFAULT_DEAD_LETTER_SUFFIX`]).
    /// Used only while the dead letters are unbound.
    pub fn with_dead_letter_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.dead_letter_suffix = suffix.into().into();
        self
    }

    /// The suffix a binding appends to a destination to name its default
    /// dead-letter destination.
    pub fn dead_letter_suffix(&self) -> &str {
        &self.dead_letter_suffix
    }

    /// Whether a dead-letter publisher is bound (not [`UnboundDeadLetters`]).
    pub fn dead_letters_bound(&self) -> bool {
        self.dead_letters.is_bound()
    }

    /// This processor if its dead letters are bound, else the same
    /// processor publishing through `default(suffix)`: how a broker
    /// binding binds its default dead-letter destination.
    ///
    /// # Errors
    /// Whatever `default` returns.
    pub fn or_bind_dead_letters<E>(
        self: Arc<Self>,
        default: impl FnOnce(&str) -> Result<Arc<dyn DeadLetterPublisher>, E>,
    ) -> Result<Arc<Self>, E> {
        if self.dead_letters_bound() {
            return Ok(self);
        }
        let publisher = default(&self.dead_letter_suffix)?;
        Ok(Arc::new(self.with_dead_letters(publisher)))
    }

    /// Bounds Retry verdicts (TTS/PDP outages); its delays also pace the
    /// backpressure gate's probes.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self.admission = Arc::new(Admission::new(retry));
        self.outages = outage_clocks(&retry);
        self
    }

    /// The backpressure gate: a consumer loop awaits [`Admission::wait`]
    /// before taking each new delivery, so that during an outage it takes
    /// one probe at a time instead of spending every message's retries.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Bounds transient handler errors.
    pub fn with_handler_retry(mut self, retry: RetryPolicy) -> Self {
        self.handler_retry = retry;
        self
    }

    /// How often to tell the broker a slow message is still in progress.
    pub fn with_keep_alive_every(mut self, every: Duration) -> Self {
        self.keep_alive_every = every;
        self
    }

    /// The retry policy for Retry verdicts (brokers check their own redelivery limits against it).
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The retry policy for transient handler errors.
    pub fn handler_retry_policy(&self) -> &RetryPolicy {
        &self.handler_retry
    }

    /// How often a slow message is kept alive (brokers check it against their ack deadline).
    pub fn keep_alive_every(&self) -> Duration {
        self.keep_alive_every
    }

    /// Runs the dead-letter publisher's start-time checks for `source` (see
    /// [`DeadLetterPublisher::preflight`]).
    ///
    /// # Errors
    /// Dead letters of `source` could not be stored.
    pub async fn preflight(&self, source: &str) -> Result<(), TransportError> {
        self.dead_letters.preflight(source).await
    }

    /// Whether the dead-letter publisher stores what it confirms (see
    /// [`DeadLetterPublisher::durable`]).
    pub fn dead_letters_durable(&self) -> bool {
        self.dead_letters.durable()
    }

    /// The guard.
    pub fn guard(&self) -> &Arc<Guard> {
        &self.guard
    }

    /// Runs the handler; a panic is a permanent handler failure (dead letter
    /// `handler-failed`), never an unwind through the consumer loop that would
    /// leave the message, or a Kafka partition, unsettled.
    async fn run_handler(
        &self,
        msg: &InboundMessage,
        auth: &AuthContext,
    ) -> Result<(), HandlerError> {
        use futures::FutureExt;
        std::panic::AssertUnwindSafe(self.handler.handle(msg, auth))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                tracing::error!(decision_id = %auth.decision_id(), panic = %what, "handler panicked");
                Err(HandlerError::Permanent(format!("handler panicked: {what}")))
            })
    }

    /// Decides, dispatches or dead-letters, and settles one delivery.
    ///
    /// # Errors
    ///
    /// Returns a [`ProcessError`] (with the guard's reason) if the broker fails to ack, reject or
    /// dead-letter the delivery; the message is then left unsettled for the broker to redeliver.
    /// Denials, handler failures and dead-lettering are outcomes, not errors.
    pub async fn process<D: Delivery>(&self, delivery: D) -> Result<Outcome, ProcessError> {
        let mut attempt = delivery.message().delivery_attempt.max(1);
        let clock = outage_key(delivery.message());
        // When this message first met an outage (kept across broker redeliveries).
        let mut first_failure = self.outages.get(&clock);
        let mut delivery = delivery;
        loop {
            let decision = self
                .while_alive(&delivery, self.guard.decide(delivery.message(), attempt))
                .await;
            match &decision {
                GuardDecision::Retry(r) => self.admission.unavailable(r.reason(), r.retry_after()),
                _ => self.admission.available(),
            }
            let id = decision.decision_id().to_string();
            let decided = decision.reason();
            let step = match decision {
                GuardDecision::Permit(auth) => {
                    match self
                        .while_alive(&delivery, self.run_handler(delivery.message(), &auth))
                        .await
                    {
                        Ok(()) => {
                            self.forget_outage(&clock, first_failure);
                            return delivery
                                .ack()
                                .await
                                .map(|_| Outcome::Handled { decision_id: id })
                                .map_err(|error| ProcessError {
                                    reason: Reason::Permitted,
                                    error,
                                });
                        }
                        Err(HandlerError::Transient(e))
                            if !self.handler_retry.exhausted(attempt) =>
                        {
                            tracing::warn!(decision_id = %id, attempt, error = %e, "transient handler error: retrying");
                            Step::Retry {
                                reason: Reason::HandlerFailed,
                                delay: self.handler_retry.delay(attempt, None),
                            }
                        }
                        Err(e) => Step::DeadLetter {
                            reason: Reason::HandlerFailed,
                            verdict: Verdict::Deny,
                            detail: Some(e.to_string()),
                        },
                    }
                }
                GuardDecision::Retry(r) => {
                    let since = *first_failure.get_or_insert_with(std::time::Instant::now);
                    if self.retry.exhausted_after(attempt, since.elapsed()) {
                        Step::DeadLetter {
                            reason: Reason::RetriesExhausted,
                            verdict: Verdict::Deny,
                            detail: Some(format!(
                                "unavailable for {:?} over {attempt} attempt(s); last: {}{}",
                                since.elapsed(),
                                r.reason(),
                                r.detail().map(|d| format!(" ({d})")).unwrap_or_default()
                            )),
                        }
                    } else {
                        Step::Retry {
                            reason: r.reason(),
                            delay: self.retry.delay(attempt, r.retry_after()),
                        }
                    }
                }
                // Deny, Quarantine, and whatever a later guard adds: dead-letter.
                refused => Step::DeadLetter {
                    reason: refused.reason(),
                    verdict: refused.verdict(),
                    detail: None,
                },
            };
            // Either the message is settled (return) or it goes back for a later
            // attempt: to the broker, or in place (loop again on the same delivery).
            let (reason, delay) = match step {
                Step::DeadLetter {
                    reason,
                    verdict,
                    detail,
                } => match self
                    .dead_letter(&delivery, &id, decided, reason, verdict, detail, attempt)
                    .await
                {
                    Ok(()) => {
                        self.forget_outage(&clock, first_failure);
                        return delivery
                            .ack_dead_lettered()
                            .await
                            .map(|_| Outcome::DeadLettered {
                                decision_id: id,
                                reason,
                            })
                            .map_err(|error| ProcessError { reason, error });
                    }
                    Err(kept_because) => (kept_because, self.retry.delay(attempt, None)),
                },
                Step::Retry { reason, delay } => (reason, delay),
            };
            if let Some(since) = first_failure {
                self.outages.insert(clock.clone(), since);
            }
            match self
                .give_back(delivery, delay, &mut attempt, reason, &id)
                .await?
            {
                Some(d) => delivery = d,
                None => {
                    return Ok(Outcome::Redelivering {
                        decision_id: id,
                        reason,
                        delay,
                    });
                }
            }
        }
    }

    fn forget_outage(&self, clock: &str, first_failure: Option<std::time::Instant>) {
        if first_failure.is_some() {
            self.outages.invalidate(clock);
        }
    }

    /// Records a disposition distinct from the guard's decision, then publishes
    /// the dead letter — shrunk to fit the broker, and as the minimal letter
    /// after a permanent refusal — and waits for the broker's confirmation.
    /// On failure the message must be kept: returns the reason to redeliver it with.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter<D: Delivery>(
        &self,
        delivery: &D,
        id: &str,
        decided: Reason,
        reason: Reason,
        verdict: Verdict,
        detail: Option<String>,
        attempt: u32,
    ) -> Result<(), Reason> {
        if reason != decided
            && let Err(e) = self
                .guard
                .record_disposition(delivery.message(), id, reason, detail, attempt)
                .await
        {
            tracing::error!(decision_id = %id, error = %e, "cannot record disposition: message kept for redelivery");
            return Err(Reason::DecisionLogUnavailable);
        }
        let letter = DeadLetter::build(
            delivery.message(),
            id,
            verdict,
            reason,
            self.guard.credentials(),
        );
        self.publish_letter(letter).await.map_err(|e| {
            tracing::error!(decision_id = %id, error = %e, "dead-letter publish failed: message kept for redelivery");
            reason
        })
    }

    /// Publishes a letter shrunk to fit the broker, and the minimal letter
    /// after a permanent refusal; returns once the broker confirmed one.
    async fn publish_letter(&self, letter: DeadLetter) -> Result<(), TransportError> {
        let publisher = &*self.dead_letters;
        let letter = crate::deadletter::fit(letter, publisher).await?;
        match publisher.publish(&letter).await {
            Err(e) if e.is_permanent() => {
                tracing::warn!(decision_id = %letter.decision_id, error = %e, "dead letter refused for good: publishing the minimal letter");
                let minimal = crate::deadletter::minimal(letter, publisher).await?;
                publisher.publish(&minimal).await
            }
            other => other,
        }
    }

    /// Dead-letters a message that a binding read out of band because its
    /// client library cannot receive it (e.g. a header async-nats refuses):
    /// records a `malformed-message` decision with `detail`, publishes the
    /// letter (with `detail` in [`crate::deadletter::H_MALFORMED`]) and
    /// returns the decision id once the broker confirmed it. The binding
    /// settles the original only after `Ok`.
    ///
    /// # Errors
    /// The decision could not be recorded, or the letter was not confirmed.
    pub async fn dead_letter_malformed(
        &self,
        msg: &InboundMessage,
        detail: &str,
    ) -> Result<String, TransportError> {
        let id = uuid::Uuid::now_v7().to_string();
        let reason = Reason::MalformedMessage;
        self.guard
            .record_disposition(
                msg,
                &id,
                reason,
                Some(detail.to_string()),
                msg.delivery_attempt,
            )
            .await
            .map_err(|e| TransportError::new("decision log", e))?;
        let mut letter =
            DeadLetter::build(msg, &id, reason.verdict(), reason, self.guard.credentials());
        letter
            .headers
            .insert(crate::deadletter::H_MALFORMED, detail);
        self.publish_letter(letter).await.map(|()| id)
    }

    /// Gives the delivery back: to the broker (returns None), or waits in place
    /// (returns the delivery for another round, attempt incremented). In place,
    /// the next attempt also waits for the backpressure gate, so that during an
    /// outage one probe at a time goes out, whatever number of records wait.
    async fn give_back<D: Delivery>(
        &self,
        delivery: D,
        delay: Duration,
        attempt: &mut u32,
        reason: Reason,
        id: &str,
    ) -> Result<Option<D>, ProcessError> {
        match delivery.redelivery_mode() {
            RedeliveryMode::Broker => {
                delivery
                    .redeliver(delay)
                    .await
                    .map_err(|error| ProcessError { reason, error })?;
                Ok(None)
            }
            RedeliveryMode::InPlace => {
                tracing::debug!(decision_id = %id, ?delay, "waiting in place before the next attempt");
                self.while_alive(&delivery, async {
                    tokio::time::sleep(delay).await;
                    if reason.verdict() == Verdict::Retry {
                        self.admission.wait_retry().await;
                    }
                })
                .await;
                *attempt += 1;
                Ok(Some(delivery))
            }
        }
    }

    async fn while_alive<D: Delivery, F: Future>(&self, delivery: &D, fut: F) -> F::Output {
        tokio::pin!(fut);
        // First keep-alive one period from now. (Awaiting an interval's
        // "immediate" first tick is not free: the timer wheel rounds it up to
        // its next 1 ms tick, which added 1–2 ms to every message.)
        let every = self.keep_alive_every.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = tick.tick() => {
                    if let Err(e) = delivery.keep_alive().await {
                        tracing::warn!(error = %e, "keep-alive failed");
                    }
                }
            }
        }
    }
}

enum Step {
    DeadLetter {
        reason: Reason,
        verdict: Verdict,
        detail: Option<String>,
    },
    Retry {
        reason: Reason,
        delay: Duration,
    },
}
