//! Header mapping between Kafka record headers and [`elevate_core::Headers`]:
//! order and duplicate keys kept, values binary-safe (a null value maps to empty bytes).

use elevate_core::Headers;
use rdkafka::message::{Header, OwnedHeaders};

/// Converts core headers into Kafka record headers (duplicates kept, in order).
pub fn to_kafka(headers: &Headers) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v),
            })
        },
    )
}

/// Converts Kafka record headers (owned or borrowed) into core headers.
pub fn from_kafka<H: rdkafka::message::Headers>(headers: Option<&H>) -> Headers {
    let mut out = Headers::new();
    if let Some(h) = headers {
        for header in h.iter() {
            out.append(header.key, header.value.unwrap_or_default());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;

    #[test]
    fn round_trip_keeps_duplicates_order_and_bytes() {
        let mut h = Headers::new();
        h.append("a", b"1".to_vec());
        h.append("A", vec![0u8, 255, 10]);
        h.append("b", Vec::new());
        h.append("a", b"3".to_vec());
        let k = to_kafka(&h);
        assert_eq!(k.count(), 4);
        let back = from_kafka(Some(&k));
        assert_eq!(back, h);
        assert_eq!(from_kafka::<OwnedHeaders>(None), Headers::new());
    }
}
