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
                || name.eq_ignore_ascii_case(crate::ctxbind::CTX_BIND_HEADER)
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

/// Where a message was read from, in the binding's own terms: which broker
/// (`kafka`, `amqp`, `nats`, `memory`, or a third party's), a short location
/// for logs (`kafka:orders/3/1207`), and named fields (topic, partition,
/// offset...) that go into decision records, dead letters and the TTS's
/// `request_details`. Core reads none of the fields: a binding adds what its
/// operators need to find the message again.
///
/// Serialized as one JSON object: `{"broker": .., "at": <location>, <fields>}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Coordinates {
    broker: String,
    location: String,
    fields: Vec<(String, serde_json::Value)>,
}

impl Coordinates {
    /// Coordinates on `broker` at `location` (shown as `broker:location`).
    pub fn new(broker: impl Into<String>, location: impl Into<String>) -> Self {
        Coordinates {
            broker: broker.into(),
            location: location.into(),
            fields: Vec::new(),
        }
    }

    /// Adds a named field (replacing one of the same name).
    #[must_use]
    pub fn with(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        let name = name.into();
        self.fields.retain(|(n, _)| *n != name);
        self.fields.push((name, value.into()));
        self
    }

    /// The broker these coordinates are on.
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// The location within the broker (without the `broker:` prefix).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// A named field, if the binding set it.
    pub fn field(&self, name: &str) -> Option<&serde_json::Value> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// A named field as a string, if it is one.
    pub fn field_str(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(serde_json::Value::as_str)
    }

    /// A named field as an integer, if it is one.
    pub fn field_i64(&self, name: &str) -> Option<i64> {
        self.field(name).and_then(serde_json::Value::as_i64)
    }

    /// Every field, in the order the binding added them.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &serde_json::Value)> {
        self.fields.iter().map(|(n, v)| (n.as_str(), v))
    }
}

impl std::fmt::Display for Coordinates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.broker, self.location)
    }
}

impl Serialize for Coordinates {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.fields.len() + 2))?;
        map.serialize_entry("broker", &self.broker)?;
        map.serialize_entry("at", &self.location)?;
        for (n, v) in &self.fields {
            if n != "broker" && n != "at" {
                map.serialize_entry(n, v)?;
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Coordinates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let mut broker = None;
        let mut location = None;
        let mut fields = Vec::new();
        for (n, v) in map {
            match n.as_str() {
                "broker" => broker = v.as_str().map(str::to_string),
                "at" => location = v.as_str().map(str::to_string),
                _ => fields.push((n, v)),
            }
        }
        Ok(Coordinates {
            broker: broker.ok_or_else(|| D::Error::missing_field("broker"))?,
            location: location.ok_or_else(|| D::Error::missing_field("at"))?,
            fields,
        })
    }
}

/// A message as a guard sees it, whatever the broker. A binding fills in
/// everything settlement and dead-lettering need, so nothing travels beside
/// the message: its position (replay protection, outage clocks), its order
/// key, the broker's own delivery count, and what a dead letter must keep.
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
    /// Only the broker's own count (never a header a publisher can write):
    /// it decides when retries are exhausted.
    pub delivery_attempt: u32,
    /// Publish time in milliseconds since the epoch, when the broker reports it.
    pub published_at_ms: Option<i64>,
    /// Where the message sits, for the replay seen-set and outage clocks: a
    /// position the broker assigned (a producer cannot choose it) that a
    /// redelivery keeps and a copy does not, e.g. `kafka:t/0/17`. Defaults
    /// to the coordinates' display form.
    pub position: String,
    /// Messages with the same key are processed one at a time, in order
    /// (Kafka: the partition); `None` for no order.
    pub order_key: Option<String>,
    /// The broker's message key (Kafka), kept on the dead letter so per-key
    /// order carries over.
    pub key: Option<Bytes>,
    /// Broker properties a dead letter keeps (AMQP content-type,
    /// correlation-id, ...), by the binding's names.
    pub properties: Vec<(String, String)>,
}

impl InboundMessage {
    /// A first delivery of `payload` with `headers`, read at `coordinates`
    /// from `destination`; its position is the coordinates' display form.
    pub fn new(
        coordinates: Coordinates,
        destination: impl Into<String>,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Self {
        InboundMessage {
            position: coordinates.to_string(),
            headers,
            payload: payload.into(),
            coordinates,
            destination: destination.into(),
            message_id: None,
            delivery_attempt: 1,
            published_at_ms: None,
            order_key: None,
            key: None,
            properties: Vec::new(),
        }
    }

    /// The property `name` a binding recorded, if any.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
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
