//! Kafka record headers (`kafka/src/headers.rs`) from wire bytes.
//!
//! Input: the headers section of a Kafka v2 record (zigzag varint count, then
//! per header: key length, key bytes, value length or -1 for null, value
//! bytes). It is parsed the way librdkafka's `rd_kafka_msg_headers_parse`
//! does and each header added with `rd_kafka_header_add`, raw bytes and all,
//! exactly as a consumer receives it; `from_kafka` then maps it.
//!
//! Checks: nothing panics (a header key need not be UTF-8 on the wire);
//! every header arrives, in order, with its value (null as empty); what
//! `from_kafka` yields goes back through `to_kafka` unchanged; core headers
//! `to_kafka` sends arrive under the name that was scanned.

#![no_main]

use elevate_core::Headers;
use elevate_kafka::headers::{from_kafka, to_kafka};
use libfuzzer_sys::fuzz_target;
use rdkafka::message::{BorrowedHeaders, Headers as _, OwnedHeaders};

/// Zigzag varint as Kafka and librdkafka encode signed lengths.
fn varint(data: &mut &[u8]) -> Option<i64> {
    let mut raw: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = data.split_first()?;
        *data = rest;
        raw |= u64::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    None
}

type WireHeader<'a> = (&'a [u8], Option<&'a [u8]>);

/// `len` bytes off the front of `data`.
fn take<'a>(len: i64, data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(len).ok()?;
    let (head, rest) = (data.get(..len)?, data.get(len..)?);
    *data = rest;
    Some(head)
}

fn parse(mut data: &[u8]) -> Vec<WireHeader<'_>> {
    let mut out = Vec::new();
    let Some(count) = varint(&mut data) else {
        return out;
    };
    if !(1..=100_000).contains(&count) {
        return out;
    }
    for _ in 0..count {
        let Some(key) = varint(&mut data).and_then(|l| take(l, &mut data)) else {
            return Vec::new(); // librdkafka: a malformed section means no headers
        };
        let value = match varint(&mut data) {
            Some(-1) => None,
            Some(l) => match take(l, &mut data) {
                Some(v) => Some(v),
                None => return Vec::new(),
            },
            None => return Vec::new(),
        };
        out.push((key, value));
    }
    out
}

/// The headers as librdkafka holds them for a consumed message.
fn native(headers: &[WireHeader<'_>]) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(headers.len());
    // `BorrowedHeaders` is a view whose address is librdkafka's
    // `rd_kafka_headers_t *` (rdkafka's own `as_native_ptr` casts it so).
    let ptr =
        owned.as_borrowed() as *const BorrowedHeaders as *mut rdkafka::bindings::rd_kafka_headers_t;
    for (key, value) in headers {
        let (vp, vl) = match value {
            Some(v) => (v.as_ptr().cast(), v.len() as isize),
            None => (std::ptr::null(), -1),
        };
        // SAFETY: `ptr` is the live header list owned by `owned`; key and
        // value are valid for the lengths given and copied by librdkafka.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_header_add(
                ptr,
                key.as_ptr().cast(),
                key.len() as isize,
                vp,
                vl,
            )
        };
        assert_eq!(
            err,
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        );
    }
    owned
}

fuzz_target!(|data: &[u8]| {
    let wire = parse(data);
    let received = native(&wire);
    let headers = from_kafka(Some(&received));
    assert_eq!(headers.len(), wire.len(), "headers lost");
    for ((_, value), (_, got)) in wire.iter().zip(headers.iter()) {
        assert_eq!(value.unwrap_or_default(), got);
    }
    let back = from_kafka(Some(&to_kafka(&headers)));
    assert_eq!(back, headers, "received headers do not survive to_kafka");

    // Sending: every header to_kafka emits must arrive under the name the
    // producer's credential scan saw (librdkafka hands consumers the key up
    // to its first NUL).
    let sent: Headers = wire
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                v.unwrap_or_default(),
            )
        })
        .collect();
    let emitted = to_kafka(&sent);
    for i in 0..emitted.count() {
        let Some(h) = emitted.try_get(i) else {
            continue;
        };
        assert!(
            sent.iter().any(|(n, _)| n == h.key),
            "a header arrives as {:?}, a name the producer never scanned",
            h.key
        );
    }
});
