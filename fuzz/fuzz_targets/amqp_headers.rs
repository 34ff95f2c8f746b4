//! AMQP header tables from wire bytes (`amqp/src/headers.rs`).
//!
//! Input: the body of an AMQP 0-9-1 field table (its 32-bit length is
//! prepended here), parsed by amq-protocol's own parser as lapin does for a
//! delivery's `headers` property, then mapped by `elevate_amqp::headers::decode`.
//!
//! Checks: nothing panics; what `decode` yields re-encodes (`encode`), goes
//! through the wire format and decodes back to the same headers; a JWT
//! anywhere in the table (nested tables and arrays included) is still seen
//! by the consumer's credential scan after decoding.

#![no_main]

use elevate_amqp::headers::{decode, encode};
use elevate_core::strip::{CredentialKind, default_policy};
use elevate_core::{CTX_REF_HEADER, Headers};
use lapin::types::generation::gen_field_table;
use lapin::types::parsing::parse_field_table;
use lapin::types::{AMQPValue, FieldTable};
use libfuzzer_sys::fuzz_target;

fn wire(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn parse(bytes: &[u8]) -> Option<FieldTable> {
    parse_field_table(bytes).ok().map(|(_, t)| t)
}

/// True when the scan, shown `text` as a plain header value, finds a JWT in it.
fn is_jwt_text(text: &[u8]) -> bool {
    let h: Headers = [("x-probe", text)].into_iter().collect();
    default_policy()
        .scan(&h, b"")
        .iter()
        .any(|f| f.kind == CredentialKind::Jwt)
}

/// Whether any string leaf of `v` holds a JWT.
fn holds_jwt(v: &AMQPValue) -> bool {
    match v {
        AMQPValue::LongString(s) => is_jwt_text(s.as_bytes()),
        AMQPValue::ShortString(s) => is_jwt_text(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => is_jwt_text(b.as_slice()),
        AMQPValue::FieldArray(a) => a.as_slice().iter().any(holds_jwt),
        AMQPValue::FieldTable(t) => t
            .into_iter()
            .any(|(k, v)| is_jwt_text(k.as_str().as_bytes()) || holds_jwt(v)),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(table) = parse(&wire(data)) else {
        return;
    };
    let headers = decode(Some(&table));
    let _ = format!("{headers:?}");

    let again = encode(&headers).expect("decoded names are AMQP short strings");
    assert_eq!(decode(Some(&again)), headers, "encode/decode round trip");
    let bytes = cookie_factory::gen_simple(gen_field_table(&again), Vec::new())
        .expect("generating a field table into a Vec");
    let reparsed = parse(&bytes).expect("generated table parses");
    assert_eq!(decode(Some(&reparsed)), headers, "wire round trip");

    // The context reference is a JWT the scan skips by design (the guard then
    // accepts exactly one): leave that header out.
    let scanned = |k: &lapin::types::ShortString| !k.as_str().eq_ignore_ascii_case(CTX_REF_HEADER);
    if table.into_iter().any(|(k, v)| scanned(k) && holds_jwt(v)) {
        let found = default_policy().scan(&headers, b"");
        assert!(
            !found.is_empty(),
            "a JWT in the table is invisible to the scan after decode: {headers:?}"
        );
    }
});
