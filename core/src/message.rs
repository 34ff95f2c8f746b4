//! The broker-neutral message: multi-valued headers, payload, coordinates.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Ordered, multi-valued message headers (Kafka, AMQP tables and NATS all allow duplicates).
///
/// Names compare case-insensitively; values are raw bytes. `Debug` shows
/// every value the default credential policy would flag (and the context
/// reference) as a SHA-256 prefix, so logging headers never leaks a token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let policy = crate::strip::default_policy();
        let mut list = f.debug_list();
        for (name, value) in &self.entries {
            let text = String::from_utf8_lossy(value);
            if name.eq_ignore_ascii_case(crate::ctxref::CTX_REF_HEADER)
                || policy.flags_header(name, value)
            {
                list.entry(&(name, crate::token::Redacted(&text)));
            } else {
                list.entry(&(name, text));
            }
        }
        list.finish()
    }
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a value (keeps existing values of the same name).
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.entries.push((name.into(), value.into()));
    }

    /// Replaces every value of `name` with one value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        let name = name.into();
        self.remove(&name);
        self.entries.push((name, value.into()));
    }

    /// Removes every value of `name` (any case); returns how many were removed.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        before - self.entries.len()
    }

    /// Keeps only the entries for which `keep` is true; returns how many were removed.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &[u8]) -> bool) -> usize {
        let before = self.entries.len();
        self.entries.retain(|(n, v)| keep(n, v));
        before - self.entries.len()
    }

    /// The first value of `name` (any case).
    pub fn get<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }

    /// The first value of `name` as UTF-8, if it is.
    pub fn get_str<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of `name` (any case), in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.entries
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// All entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// Number of entries (duplicates counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<N: Into<String>, V: Into<Vec<u8>>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        Headers {
            entries: iter
                .into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
        }
    }
}

/// Where a message was read from, per broker (goes into decision records and dead letters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "broker", rename_all = "lowercase")]
pub enum Coordinates {
    /// Kafka topic/partition/offset.
    Kafka {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
    },
    /// AMQP 0-9-1 queue and delivery.
    Amqp {
        /// Queue consumed from.
        queue: String,
        /// Exchange the message was published to.
        exchange: String,
        /// Routing key it was published with.
        routing_key: String,
        /// Channel-scoped delivery tag.
        delivery_tag: u64,
    },
    /// NATS subject, and JetStream stream/sequence when consumed from a stream.
    Nats {
        /// Subject.
        subject: String,
        /// Stream name (JetStream only).
        #[serde(skip_serializing_if = "Option::is_none")]
        stream: Option<String>,
        /// Stream sequence (JetStream only).
        #[serde(skip_serializing_if = "Option::is_none")]
        stream_seq: Option<u64>,
        /// Core NATS only: an id the subscriber gives each receipt, so that
        /// in-place retries of one receipt keep one replay position.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receipt: Option<String>,
    },
    /// The in-memory transport.
    Memory {
        /// Queue name.
        queue: String,
        /// Sequence number within the queue.
        seq: u64,
    },
}

impl std::fmt::Display for Coordinates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Coordinates::Kafka {
                topic,
                partition,
                offset,
            } => write!(f, "kafka:{topic}/{partition}/{offset}"),
            Coordinates::Amqp {
                queue,
                delivery_tag,
                ..
            } => write!(f, "amqp:{queue}/{delivery_tag}"),
            Coordinates::Nats {
                subject,
                stream,
                stream_seq,
                ..
            } => match (stream, stream_seq) {
                (Some(s), Some(q)) => write!(f, "nats:{s}/{q}/{subject}"),
                _ => write!(f, "nats:{subject}"),
            },
            Coordinates::Memory { queue, seq } => write!(f, "memory:{queue}/{seq}"),
        }
    }
}

/// A message as a guard sees it, whatever the broker.
#[derive(Debug, Clone)]
pub struct InboundMessage {
    /// Headers as received (duplicates kept).
    pub headers: Headers,
    /// Payload bytes.
    pub payload: Bytes,
    /// Where the message was read from.
    pub coordinates: Coordinates,
    /// The destination the producer published to, as the reference's `dst` names it.
    pub destination: String,
    /// Broker message id when the broker has one (AMQP message-id, NATS Nats-Msg-Id).
    pub message_id: Option<String>,
    /// Delivery count as the broker reports it, 1 for a first delivery.
    pub delivery_attempt: u32,
    /// Publish time in milliseconds since the epoch, when the broker reports it.
    pub published_at_ms: Option<i64>,
}

/// A message on its way out, before the producer guard processes it.
#[derive(Debug, Clone, Default)]
pub struct OutboundMessage {
    /// Headers the application set (credentials are removed by the guard).
    pub headers: Headers,
    /// Payload bytes (configured JSON credential paths are removed by the guard).
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_credential_or_the_reference() {
        let jwt = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz";
        let h: Headers = [
            ("Authorization", "Bearer secret-opaque-value"),
            ("x-custom", jwt),
            (crate::ctxref::CTX_REF_HEADER, jwt),
            ("content-type", "application/json"),
        ]
        .into_iter()
        .collect();
        let shown = format!("{h:?}");
        assert!(!shown.contains("secret-opaque-value"), "{shown}");
        assert!(!shown.contains("eyJ"), "{shown}");
        assert!(shown.contains("application/json"), "{shown}");
        assert_eq!(shown.matches("sha256:").count(), 3, "{shown}");
    }
}
