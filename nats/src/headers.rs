//! Header mapping between Elevate's multi-valued [`Headers`] and NATS [`HeaderMap`].
//!
//! NATS headers are text: names are ASCII without control characters or `:`,
//! values are UTF-8 without CR/LF. Duplicate names are kept in order (values
//! of one name keep their order; different names are emitted sorted by name,
//! since `HeaderMap` does not keep the order between names).
//!
//! Receivers trim whitespace around a value (async-nats, like the other NATS
//! clients, reads the block as MIME headers), so a value that starts or ends
//! with whitespace arrives trimmed. [`to_nats_headers`] still accepts it:
//! async-nats can hand a subscriber such a value (a folded continuation
//! line), and whatever was received must stay publishable, since the
//! dead-letter path republishes received headers (both found by the
//! `nats_headers` fuzz target).

use std::str::FromStr;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use elevate_core::Headers;

/// The JetStream de-duplication header.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// A header cannot be carried by NATS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The name is empty, non-ASCII, has control characters or `:`.
    #[error("header name {0:?} is not a valid NATS header name")]
    InvalidName(String),
    /// The value is not UTF-8 or contains CR/LF.
    #[error("value of header {0:?} is not valid in NATS (must be UTF-8 without CR/LF)")]
    InvalidValue(String),
}

/// Converts Elevate headers to a NATS header map (duplicates kept).
///
/// # Errors
///
/// Returns [`HeaderError::InvalidName`] if a header name is not a valid NATS header name, and
/// [`HeaderError::InvalidValue`] if a value is not UTF-8 or not a valid NATS header value.
pub fn to_nats_headers(headers: &Headers) -> Result<HeaderMap, HeaderError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers.iter() {
        let n = HeaderName::from_str(name).map_err(|_| HeaderError::InvalidName(name.into()))?;
        let v = std::str::from_utf8(value)
            .ok()
            .and_then(|v| HeaderValue::from_str(v).ok())
            .ok_or_else(|| HeaderError::InvalidValue(name.into()))?;
        map.append(n, v);
    }
    Ok(map)
}

/// Converts a NATS header map to Elevate headers (duplicates kept, names sorted).
pub fn from_nats_headers(map: Option<&HeaderMap>) -> Headers {
    let Some(map) = map else {
        return Headers::new();
    };
    let mut names: Vec<_> = map.iter().collect();
    names.sort_by_key(|(name, _)| name.to_string());
    let mut out = Headers::new();
    for (name, values) in names {
        let name = name.to_string();
        for v in values {
            out.append(name.clone(), v.as_str().as_bytes().to_vec());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_survive_both_ways() {
        let mut h = Headers::new();
        h.append("X-Trace", "a");
        h.append("Accept", "text/plain");
        h.append("X-Trace", "b");
        let map = to_nats_headers(&h).unwrap();
        let back = from_nats_headers(Some(&map));
        let traces: Vec<_> = back.get_all("x-trace").collect();
        assert_eq!(traces, vec![b"a".as_slice(), b"b".as_slice()]);
        assert_eq!(back.get_str("accept"), Some("text/plain"));
        assert_eq!(back.len(), 3);
    }

    #[test]
    fn invalid_names_and_values_are_errors_not_panics() {
        let mut h = Headers::new();
        h.append("bad:name", "v");
        assert!(matches!(
            to_nats_headers(&h),
            Err(HeaderError::InvalidName(_))
        ));
        let mut h = Headers::new();
        h.append("x", "a\r\nInjected: 1");
        assert!(matches!(
            to_nats_headers(&h),
            Err(HeaderError::InvalidValue(_))
        ));
        let mut h = Headers::new();
        h.append("x", vec![0xff, 0xfe]);
        assert!(matches!(
            to_nats_headers(&h),
            Err(HeaderError::InvalidValue(_))
        ));
    }

    /// Fuzz finding (nats_headers): a header line with an empty value and a
    /// folded continuation (`X:\n   :0DSF`) reaches a subscriber as the value
    /// `   :0DSF`; refusing surrounding whitespace on send would make such a
    /// message impossible to dead-letter. Received values stay publishable.
    #[test]
    fn received_values_with_surrounding_whitespace_stay_publishable() {
        let mut map = HeaderMap::new();
        let folded = HeaderValue::from_str("   :0DSFVw-RfcYJmXTH4I40190 eNdl0nan").unwrap();
        map.append(HeaderName::from_str("X").unwrap(), folded);
        map.append(
            HeaderName::from_str("").unwrap(),
            HeaderValue::from_str("v ").unwrap(),
        );
        let received = from_nats_headers(Some(&map));
        let resent = to_nats_headers(&received).unwrap();
        assert_eq!(from_nats_headers(Some(&resent)), received);
    }

    #[test]
    fn no_headers_is_empty() {
        assert!(from_nats_headers(None).is_empty());
    }
}
