//! Header mapping between core's multi-valued [`Headers`] and AMQP field tables.
//!
//! AMQP 0-9-1 header tables are maps: a key appears at most once. Core headers
//! are multi-valued, so:
//!
//! - **Encoding** (publish): a name with one value becomes a `LongString`
//!   field (`S`, raw bytes, binary-safe); a name with several values becomes
//!   a field array (`A`) of `LongString`s, in order. Names are case-sensitive
//!   in AMQP, so `Foo` and `foo` stay two fields.
//! - **Decoding** (consume): a `LongString`, `ShortString` or byte array is
//!   its bytes; numbers, booleans and timestamps are their decimal text; a
//!   field array becomes one value per element (so an array written by
//!   [`encode`] decodes back into the duplicates it came from); a nested table
//!   becomes its JSON text (strings kept as strings, so the consumer's
//!   credential scan still sees any JWT inside).

use elevate_core::Headers;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

/// A header name longer than AMQP's 255-byte short-string limit.
#[derive(Debug, Clone, thiserror::Error)]
#[error("header name of {0} bytes exceeds AMQP's 255-byte limit")]
pub struct HeaderNameTooLong(pub usize);

/// Encodes core headers as an AMQP field table (duplicates as field arrays of `LongString`s).
///
/// # Errors
///
/// Returns [`HeaderNameTooLong`] if a header name is longer than AMQP's 255-byte short-string
/// limit.
pub fn encode(headers: &Headers) -> Result<FieldTable, HeaderNameTooLong> {
    let mut grouped: Vec<(&str, Vec<&[u8]>)> = Vec::new();
    for (name, value) in headers.iter() {
        match grouped.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => values.push(value),
            None => grouped.push((name, vec![value])),
        }
    }
    let mut table = FieldTable::default();
    for (name, values) in grouped {
        let key = ShortString::try_new(name).map_err(|_| HeaderNameTooLong(name.len()))?;
        let value = match values.as_slice() {
            [one] => AMQPValue::LongString(LongString::from(*one)),
            many => AMQPValue::FieldArray(FieldArray::from(
                many.iter()
                    .map(|v| AMQPValue::LongString(LongString::from(*v)))
                    .collect::<Vec<_>>(),
            )),
        };
        table.insert(key, value);
    }
    Ok(table)
}

/// Decodes an AMQP header table into core headers (arrays into repeated values).
pub fn decode(table: Option<&FieldTable>) -> Headers {
    let mut headers = Headers::new();
    if let Some(table) = table {
        for (name, value) in table {
            decode_value(name.as_str(), value, &mut headers);
        }
    }
    headers
}

fn decode_value(name: &str, value: &AMQPValue, out: &mut Headers) {
    match value {
        AMQPValue::FieldArray(items) => {
            for item in items.as_slice() {
                decode_value(name, item, out);
            }
        }
        other => out.append(name, scalar_bytes(other)),
    }
}

fn scalar_bytes(value: &AMQPValue) -> Vec<u8> {
    match value {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Void => Vec::new(),
        AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_) => {
            serde_json::to_vec(&to_json(value)).unwrap_or_default()
        }
        other => match to_json(other) {
            serde_json::Value::String(s) => s.into_bytes(),
            v => v.to_string().into_bytes(),
        },
    }
}

/// A JSON view of an AMQP value (strings as text, numbers as numbers).
pub fn to_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        AMQPValue::Boolean(b) => J::Bool(*b),
        AMQPValue::ShortShortInt(v) => J::from(*v),
        AMQPValue::ShortShortUInt(v) => J::from(*v),
        AMQPValue::ShortInt(v) => J::from(*v),
        AMQPValue::ShortUInt(v) => J::from(*v),
        AMQPValue::LongInt(v) => J::from(*v),
        AMQPValue::LongUInt(v) => J::from(*v),
        AMQPValue::LongLongInt(v) => J::from(*v),
        AMQPValue::Float(v) => J::from(*v),
        AMQPValue::Double(v) => J::from(*v),
        AMQPValue::DecimalValue(d) => J::String(format!("{}e-{}", d.value, d.scale)),
        AMQPValue::ShortString(s) => J::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => J::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => J::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::Timestamp(t) => J::from(*t),
        AMQPValue::FieldTable(t) => J::Object(
            t.into_iter()
                .map(|(k, v)| (k.as_str().to_string(), to_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => J::String(String::from_utf8_lossy(b.as_slice()).into_owned()),
        AMQPValue::Void => J::Null,
    }
}

/// An integer header value (any AMQP integer type, or decimal text).
pub(crate) fn as_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// A string header value (`LongString` or `ShortString`).
pub(crate) fn as_str(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_round_trip_as_arrays() {
        let mut h = Headers::new();
        h.append("x-a", "1");
        h.append("x-b", b"\x00\xffbin".to_vec());
        h.append("x-a", "2");
        h.append("X-A", "3");
        let table = encode(&h).unwrap();
        assert!(matches!(
            table.inner().get("x-a"),
            Some(AMQPValue::FieldArray(a)) if a.as_slice().len() == 2
        ));
        assert!(matches!(
            table.inner().get("x-b"),
            Some(AMQPValue::LongString(_))
        ));
        let back = decode(Some(&table));
        assert_eq!(back.get_all("x-a").count(), 3); // case-insensitive read
        assert_eq!(
            back.iter()
                .filter(|(n, _)| *n == "x-a")
                .map(|(_, v)| v.to_vec())
                .collect::<Vec<_>>(),
            vec![b"1".to_vec(), b"2".to_vec()]
        );
        assert_eq!(back.get("x-b"), Some(&b"\x00\xffbin"[..]));
        assert_eq!(back.len(), 4);
    }

    #[test]
    fn foreign_types_decode_to_text() {
        let mut inner = FieldTable::default();
        inner.insert("tok".into(), AMQPValue::LongString("a.b.c".into()));
        let mut t = FieldTable::default();
        t.insert("n".into(), AMQPValue::LongLongInt(-5));
        t.insert("b".into(), AMQPValue::Boolean(true));
        t.insert("t".into(), AMQPValue::FieldTable(inner));
        t.insert("s".into(), AMQPValue::ShortString("short".into()));
        let h = decode(Some(&t));
        assert_eq!(h.get_str("n"), Some("-5"));
        assert_eq!(h.get_str("b"), Some("true"));
        assert_eq!(h.get_str("s"), Some("short"));
        assert_eq!(h.get_str("t"), Some(r#"{"tok":"a.b.c"}"#));
    }

    #[test]
    fn long_names_are_refused() {
        let mut h = Headers::new();
        h.append("x".repeat(300), "v");
        assert!(encode(&h).is_err());
    }

    #[test]
    fn integers_parse() {
        assert_eq!(as_u64(&AMQPValue::LongLongInt(3)), Some(3));
        assert_eq!(as_u64(&AMQPValue::LongString("7".into())), Some(7));
        assert_eq!(as_u64(&AMQPValue::LongInt(-1)), None);
    }
}
