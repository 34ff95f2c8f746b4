//! An in-memory broker for unit tests and the embedded demo, with broker
//! semantics: at-least-once delivery, ack, delayed redelivery with a delivery
//! count, and redelivery of anything dropped unsettled (as on a lost channel).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::deadletter::DeadLetter;
use crate::message::{Coordinates, Headers, InboundMessage};
use crate::runtime::Source;
use crate::settle::{DeadLetterPublisher, Delivery, TransportError};

/// The coordinates of message `seq` of in-memory queue `queue`
/// (`memory:<queue>/<seq>`, fields `queue` and `seq`).
pub fn coordinates(queue: &str, seq: u64) -> Coordinates {
    Coordinates::new("memory", format!("{queue}/{seq}"))
        .with("queue", queue)
        .with("seq", seq)
}

/// A message stored in a queue.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Sequence number in its queue.
    pub seq: u64,
    /// The message headers, as the publisher sent them.
    pub headers: Headers,
    /// The message body, as published.
    pub payload: Bytes,
    /// Deliveries so far.
    pub deliveries: u32,
}

#[derive(Default)]
struct Queue {
    ready: Mutex<VecDeque<StoredMessage>>,
    unacked: Mutex<HashMap<u64, StoredMessage>>,
    notify: Notify,
    next_seq: AtomicU64,
}

/// An in-process broker of named queues.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    queues: Arc<Mutex<HashMap<String, Arc<Queue>>>>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        self.queues
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Publishes to a queue; returns the message's sequence number.
    pub fn publish(&self, queue: &str, headers: Headers, payload: impl Into<Bytes>) -> u64 {
        let q = self.queue(queue);
        let seq = q.next_seq.fetch_add(1, Ordering::SeqCst) + 1;
        q.ready.lock().push_back(StoredMessage {
            seq,
            headers,
            payload: payload.into(),
            deliveries: 0,
        });
        q.notify.notify_one();
        seq
    }

    /// Receives the next message, waiting up to `timeout`.
    pub async fn receive(&self, queue: &str, timeout: Duration) -> Option<MemoryDelivery> {
        let q = self.queue(queue);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = q.notify.notified();
            // Never hold `ready` and `unacked` at once (requeue takes them in the
            // other order): take the message out first, then record it.
            let next = q.ready.lock().pop_front();
            if let Some(mut m) = next {
                m.deliveries += 1;
                q.unacked.lock().insert(m.seq, m.clone());
                let mut msg = InboundMessage::new(
                    coordinates(queue, m.seq),
                    queue,
                    m.headers.clone(),
                    m.payload.clone(),
                );
                msg.delivery_attempt = m.deliveries;
                return Some(MemoryDelivery {
                    queue: q.clone(),
                    seq: m.seq,
                    msg,
                    settled: false,
                });
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Messages waiting (not delivered) in a queue.
    pub fn ready_len(&self, queue: &str) -> usize {
        self.queue(queue).ready.lock().len()
    }

    /// Messages delivered but not settled.
    pub fn unacked_len(&self, queue: &str) -> usize {
        self.queue(queue).unacked.lock().len()
    }

    /// Removes and returns every ready message (tests read dead-letter queues this way).
    pub fn drain(&self, queue: &str) -> Vec<StoredMessage> {
        self.queue(queue).ready.lock().drain(..).collect()
    }

    /// A dead-letter publisher that writes to `queue`.
    pub fn dead_letter_queue(&self, queue: &str) -> MemoryDeadLetters {
        MemoryDeadLetters {
            broker: self.clone(),
            queue: queue.to_string(),
        }
    }
}

/// A delivery from the in-memory broker.
pub struct MemoryDelivery {
    queue: Arc<Queue>,
    seq: u64,
    msg: InboundMessage,
    settled: bool,
}

impl MemoryDelivery {
    fn requeue(queue: &Arc<Queue>, seq: u64, front: bool) {
        let taken = queue.unacked.lock().remove(&seq);
        if let Some(m) = taken {
            if front {
                queue.ready.lock().push_front(m);
            } else {
                queue.ready.lock().push_back(m);
            }
            queue.notify.notify_one();
        }
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        if !self.settled {
            // Like a broker whose consumer went away: the message is delivered again.
            Self::requeue(&self.queue, self.seq, true);
        }
    }
}

#[async_trait::async_trait]
impl Delivery for MemoryDelivery {
    fn message(&self) -> &InboundMessage {
        &self.msg
    }

    async fn ack(mut self) -> Result<(), TransportError> {
        self.settled = true;
        self.queue.unacked.lock().remove(&self.seq);
        Ok(())
    }

    async fn redeliver(mut self, delay: Duration) -> Result<(), TransportError> {
        self.settled = true;
        let queue = self.queue.clone();
        let seq = self.seq;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            MemoryDelivery::requeue(&queue, seq, false);
        });
        Ok(())
    }
}

/// A [`Source`] reading one in-memory queue, for the consumer runtime
/// ([`crate::runtime::Runtime::run`]).
#[derive(Debug, Clone)]
pub struct MemorySource {
    broker: MemoryBroker,
    queue: String,
    wait: Duration,
    order_by: Option<String>,
}

impl MemorySource {
    /// Reads `queue` of `broker`.
    pub fn new(broker: &MemoryBroker, queue: impl Into<String>) -> Self {
        MemorySource {
            broker: broker.clone(),
            queue: queue.into(),
            wait: Duration::from_millis(200),
            order_by: None,
        }
    }

    /// Orders deliveries by the value of header `name` (like Kafka keys
    /// ordering a partition): one at a time per value, in order.
    #[must_use]
    pub fn ordered_by_header(mut self, name: impl Into<String>) -> Self {
        self.order_by = Some(name.into());
        self
    }
}

#[async_trait::async_trait]
impl Source for MemorySource {
    type Delivery = MemoryDelivery;
    type Error = std::convert::Infallible;

    fn names(&self) -> Vec<String> {
        vec![self.queue.clone()]
    }

    fn ordered(&self) -> bool {
        self.order_by.is_some()
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<MemoryDelivery>, Self::Error> {
        let mut out = Vec::new();
        let mut wait = self.wait;
        while out.len() < max.max(1) {
            let Some(mut d) = self.broker.receive(&self.queue, wait).await else {
                break;
            };
            if let Some(h) = &self.order_by {
                d.msg.order_key = Some(d.msg.headers.get_str(h).unwrap_or_default().to_string());
            }
            out.push(d);
            wait = Duration::ZERO;
        }
        Ok(out)
    }
}

/// Publishes dead letters to an in-memory queue.
#[derive(Debug, Clone)]
pub struct MemoryDeadLetters {
    broker: MemoryBroker,
    queue: String,
}

#[async_trait::async_trait]
impl DeadLetterPublisher for MemoryDeadLetters {
    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError> {
        self.broker
            .publish(&self.queue, letter.headers.clone(), letter.payload.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives racing delayed redeliveries must not deadlock (they take the
    /// queue's two locks; they must never hold both at once). Runs on its own
    /// thread so a deadlock fails the test instead of hanging it.
    #[test]
    fn receive_and_redeliver_race_without_deadlock() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let broker = MemoryBroker::new();
                for i in 0..64u32 {
                    broker.publish("q", Headers::new(), i.to_be_bytes().to_vec());
                }
                let mut acked = 0;
                while acked < 64 {
                    let Some(d) = broker.receive("q", Duration::from_secs(5)).await else {
                        panic!("message lost");
                    };
                    if d.message().delivery_attempt < 4 {
                        d.redeliver(Duration::ZERO).await.unwrap();
                    } else {
                        d.ack().await.unwrap();
                        acked += 1;
                    }
                }
                assert_eq!(broker.unacked_len("q"), 0);
                assert_eq!(broker.ready_len("q"), 0);
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("receive and redeliver deadlocked (or the worker panicked)");
    }
}
