//! NATS header maps (`nats/src/headers.rs`): `from_nats_headers` on what a
//! subscriber receives, `to_nats_headers` on what a publisher (or the
//! dead-letter path, which republishes received headers) sends.
//!
//! async-nats keeps its wire parser and serializer private, so this target
//! mirrors them (async-nats 0.51 `connection.rs` HMSG header block,
//! `HeaderMap::to_bytes`): the input is a header block
//! `NATS/1.0\r\nName: value\r\n...`.
//!
//! Checks: nothing panics; received headers can always be sent again (the
//! dead-letter path does) and survive the wire; headers `to_nats_headers`
//! accepts arrive as they were sent (order kept per name, names sorted),
//! except for whitespace around a value, which every receiver trims.

#![no_main]

use std::str::FromStr;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use elevate_core::Headers;
use elevate_nats::{from_nats_headers, to_nats_headers};
use libfuzzer_sys::fuzz_target;

/// The header block parser of async-nats 0.51 (`Connection::try_read_op`,
/// HMSG), except that a value it would panic on is an error here.
fn parse_block(block: &[u8]) -> Option<HeaderMap> {
    let text = std::str::from_utf8(block).ok()?;
    let mut lines = text.lines().peekable();
    lines.next()?.strip_prefix("NATS/1.0")?;
    let mut map = HeaderMap::new();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':')?;
        let name = HeaderName::from_str(name).ok()?;
        let mut value = value.trim_start().to_owned();
        while let Some(v) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(v);
        }
        value.truncate(value.trim_end().len());
        // async-nats calls `value.into_header_value()`, which asserts that the
        // value has no '\r' (a lone CR survives `lines()`): it panics there.
        map.append(name, HeaderValue::from_str(&value).ok()?);
    }
    Some(map)
}

/// `HeaderMap::to_bytes` of async-nats 0.51.
fn to_block(map: &HeaderMap) -> Vec<u8> {
    let mut buf = b"NATS/1.0\r\n".to_vec();
    for (k, vs) in map.iter() {
        for v in vs {
            buf.extend_from_slice(k.as_ref());
            buf.extend_from_slice(b": ");
            buf.extend_from_slice(v.as_str().as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
    }
    buf.extend_from_slice(b"\r\n");
    buf
}

/// Core headers from raw `name:value` lines (no trimming), as an application sets them.
fn raw_headers(data: &[u8]) -> Headers {
    let mut h = Headers::new();
    for line in data.split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(i) = line.iter().position(|b| *b == b':') {
            h.append(
                String::from_utf8_lossy(&line[..i]).into_owned(),
                &line[i + 1..],
            );
        }
    }
    h
}

/// What a receiver gets for `h`: names sorted (stable), values in order and
/// trimmed as a MIME header parser trims them.
fn received_as(h: &Headers) -> Headers {
    let mut v: Vec<(&str, &[u8])> = h.iter().collect();
    v.sort_by_key(|(n, _)| *n);
    v.into_iter()
        .map(|(n, v)| (n, String::from_utf8_lossy(v).trim().to_string()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // Received: wire -> HeaderMap -> core headers.
    if let Some(map) = parse_block(data) {
        let received = from_nats_headers(Some(&map));
        let resent = to_nats_headers(&received).expect("received headers can be sent again");
        assert_eq!(from_nats_headers(Some(&resent)), received);
        let over_wire = parse_block(&to_block(&resent)).expect("serialized block parses");
        assert_eq!(
            from_nats_headers(Some(&over_wire)),
            received_as(&received),
            "wire round trip"
        );
    }

    // Sent: core headers -> HeaderMap -> wire -> core headers.
    let sent = raw_headers(data);
    if let Ok(map) = to_nats_headers(&sent) {
        let block = to_block(&map);
        let map = parse_block(&block).expect("a block built from accepted headers parses");
        assert_eq!(
            from_nats_headers(Some(&map)),
            received_as(&sent),
            "accepted headers changed on the wire"
        );
    }
});
