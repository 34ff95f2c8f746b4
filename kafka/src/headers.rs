//! Header mapping between Kafka record headers and [`elevate_core::Headers`]:
//! order and duplicate keys kept, values binary-safe (a null value maps to empty bytes).
//!
//! Two things Kafka's wire format allows need care (both found by the
//! `kafka_headers` fuzz target):
//!
//! - A header key need not be UTF-8 on the wire, and librdkafka does not check;
//!   rdkafka's `Headers::iter`/`try_get` unwrap the UTF-8 conversion and panic,
//!   so a single record from any producer would crash the consumer. Keys are
//!   read here as raw bytes and decoded lossily (U+FFFD), so that the header
//!   and its value still reach the credential scan.
//! - librdkafka hands consumers a key only up to its first NUL byte, while the
//!   producer sends every byte: a name like `cookie\0x` passes the producer's
//!   scan as an unknown header and arrives as `cookie`. [`to_kafka`] drops
//!   such headers instead of sending a name other than the one that was scanned.

use std::ffi::CStr;

use elevate_core::Headers;
use rdkafka::bindings::{rd_kafka_header_get_all, rd_kafka_headers_t, rd_kafka_resp_err_t};
use rdkafka::message::{BorrowedHeaders, Header, Headers as _, OwnedHeaders};

/// Converts core headers into Kafka record headers (duplicates kept, in order).
///
/// A header whose name contains a NUL byte is dropped (and logged): consumers
/// would read it under the name before the NUL.
pub fn to_kafka(headers: &Headers) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |h, (k, v)| {
            if k.contains('\0') {
                tracing::warn!(
                    name = %k.escape_debug(),
                    "header name with a NUL byte dropped: consumers would read a different name"
                );
                return h;
            }
            h.insert(Header {
                key: k,
                value: Some(v),
            })
        },
    )
}

/// Kafka header lists [`from_kafka`] reads: a consumed message's
/// [`BorrowedHeaders`], or an [`OwnedHeaders`] copy.
pub trait KafkaHeaders {
    /// The list as librdkafka holds it.
    fn borrowed(&self) -> &BorrowedHeaders;
}

impl KafkaHeaders for BorrowedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self
    }
}

impl KafkaHeaders for OwnedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self.as_borrowed()
    }
}

/// Converts Kafka record headers (owned or borrowed) into core headers; a key
/// that is not UTF-8 is decoded lossily rather than panicking.
// rdkafka's safe accessor panics on a key that is not UTF-8 (any producer
// can send one): the keys are read through librdkafka itself.
#[allow(unsafe_code)]
pub fn from_kafka<H: KafkaHeaders + ?Sized>(headers: Option<&H>) -> Headers {
    let mut out = Headers::new();
    let Some(h) = headers else {
        return out;
    };
    let h = h.borrowed();
    // `BorrowedHeaders` is rdkafka's view of librdkafka's `rd_kafka_headers_t`:
    // its address is the native pointer (rdkafka's own accessors cast it so).
    let native = h as *const BorrowedHeaders as *const rd_kafka_headers_t;
    for idx in 0..h.count() {
        let mut name = std::ptr::null();
        let mut value = std::ptr::null();
        let mut size = 0;
        // SAFETY: `native` is a live header list borrowed for this call; on
        // success librdkafka points `name` at a NUL-terminated key and `value`
        // (when not null) at `size` bytes, both owned by the list.
        let err = unsafe { rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
        if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: as above; both borrows end before the list can change.
        let (key, value) = unsafe {
            let key = CStr::from_ptr(name).to_bytes();
            let value: &[u8] = if value.is_null() {
                &[]
            } else {
                std::slice::from_raw_parts(value.cast::<u8>(), size)
            };
            (key, value)
        };
        out.append(String::from_utf8_lossy(key).into_owned(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Headers as librdkafka builds them from a fetched record: raw key bytes.
    #[allow(unsafe_code)]
    fn wire_headers(headers: &[(&[u8], Option<&[u8]>)]) -> OwnedHeaders {
        let owned = OwnedHeaders::new_with_capacity(headers.len());
        let native = owned.as_borrowed() as *const BorrowedHeaders as *mut rd_kafka_headers_t;
        for (key, value) in headers {
            let (vp, vl) = match value {
                Some(v) => (v.as_ptr().cast(), v.len() as isize),
                None => (std::ptr::null(), -1),
            };
            // SAFETY: `native` is `owned`'s live list; librdkafka copies the bytes.
            let err = unsafe {
                rdkafka::bindings::rd_kafka_header_add(
                    native,
                    key.as_ptr().cast(),
                    key.len() as isize,
                    vp,
                    vl,
                )
            };
            assert_eq!(err, rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        }
        owned
    }

    /// Fuzz finding (kafka_headers): a record whose header key is not UTF-8
    /// (seed `binary-key`; minimal form `02 02 ff 00`: one header, key `ff`,
    /// empty value) made rdkafka's `try_get` panic inside `from_kafka`.
    #[test]
    fn non_utf8_keys_decode_lossily_instead_of_panicking() {
        let wire = wire_headers(&[
            (b"\xff", Some(b"")),
            (b"x-\xff\xfe", Some(b"v")),
            (b"ok", None),
        ]);
        let h = from_kafka(Some(&wire));
        let got: Vec<(&str, &[u8])> = h.iter().collect();
        assert_eq!(
            got,
            vec![
                ("\u{FFFD}", &b""[..]),
                ("x-\u{FFFD}\u{FFFD}", &b"v"[..]),
                ("ok", &b""[..]),
            ]
        );
    }

    /// Fuzz finding (kafka_headers): librdkafka hands consumers a key up to
    /// its first NUL, so `cookie\0x` (not a credential name to the producer's
    /// scan) would arrive as `cookie`. Such a header is not sent at all.
    #[test]
    fn names_with_nul_are_not_sent() {
        let mut h = Headers::new();
        h.append("cookie\0x", "session=abc");
        h.append("x-keep", "1");
        let k = to_kafka(&h);
        assert_eq!(k.count(), 1);
        let back = from_kafka(Some(&k));
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![("x-keep", &b"1"[..])]);
    }
}
