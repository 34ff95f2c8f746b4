//! Writes the seed corpus of every fuzz target under `fuzz/corpus/<target>/`
//! from the project's own minter, signer and header encoders. Run it through
//! `scripts/fuzz --gen-corpus` (it reuses the instrumented build's
//! dependencies); it overwrites only the `seed-*` files it writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use elevate_core::ctxref::{ContextRefClaims, ContextRefMinter, MintRequest, SubjectKind};
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::scope::Scope;
use elevate_core::{CTX_REF_HEADER, Headers};
use elevate_fuzz as fx;
use lapin::types::generation::gen_field_table;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
// The instrumented dependencies call the coverage hooks libFuzzer defines.
use libfuzzer_sys as _;

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    std::fs::create_dir_all(dir).expect("corpus dir");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
}

/// Claims valid at [`fx::NOW`], as the minter makes them.
fn at_now(mut c: ContextRefClaims) -> ContextRefClaims {
    c.iat = fx::NOW - 10;
    c.exp = fx::NOW + 290;
    c
}

fn request<'a>(aud: &'a [String], scope: &'a Scope) -> MintRequest<'a> {
    MintRequest {
        subject: "alice",
        sub_kind: SubjectKind::Human,
        audience: aud,
        scope,
        txn: "txn-0190a1b2",
        destination: fx::DESTINATION,
        payload: fx::PAYLOAD,
    }
}

struct Refs {
    origin: String,
    derived: String,
    parent_claims: serde_json::Value,
    child_claims: serde_json::Value,
}

fn refs() -> Refs {
    let ttl = Duration::from_secs(300);
    let producer = ContextRefMinter::new(fx::PRODUCER, fx::producer_key(), ttl);
    let relay = ContextRefMinter::new(fx::RELAY, fx::relay_key(), ttl);
    let scope = Scope::parse("orders:read orders:write");
    let to_consumer = [fx::CONSUMER.to_string()];
    let to_relay = [fx::RELAY.to_string()];
    let origin = producer.mint(&request(&to_consumer, &scope)).expect("mint");
    let origin = producer.sign(at_now(origin.claims)).expect("sign");
    let parent = producer.mint(&request(&to_relay, &scope)).expect("mint");
    let parent = producer.sign(at_now(parent.claims)).expect("sign");
    let child = relay
        .derive(
            &parent.claims,
            &parent.token,
            Some(&Scope::parse("orders:read")),
            &to_consumer,
            fx::DESTINATION,
            fx::PAYLOAD,
        )
        .expect("derive");
    let child = relay.sign(at_now(child.claims)).expect("sign");
    let mut child_claims = serde_json::to_value(&child.claims).expect("claims");
    child_claims["act"]["ref"] = "@PREV@".into();
    child_claims["dig"] = "@DIG@".into();
    let mut parent_claims = serde_json::to_value(&parent.claims).expect("claims");
    parent_claims["dig"] = "@DIG@".into();
    let fixed = verifier_check(&origin.token) && verifier_check(&child.token);
    assert!(fixed, "seed references must verify at fx::NOW");
    Refs {
        origin: origin.token,
        derived: child.token,
        parent_claims,
        child_claims,
    }
}

fn verifier_check(token: &str) -> bool {
    fx::verifier()
        .verify_at(token, fx::DESTINATION, fx::PAYLOAD, fx::NOW)
        .is_ok()
}

fn ctxref(dir: &Path, r: &Refs) {
    let raw = |t: &str| [b"\x00", t.as_bytes()].concat();
    write(dir, "origin", raw(&r.origin));
    write(dir, "derived", raw(&r.derived));
    let mut parts = r.origin.split('.');
    let (h, p) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    write(dir, "no-signature", raw(&format!("{h}.{p}.")));
    write(
        dir,
        "alg-none",
        raw("eyJhbGciOiJub25lIiwidHlwIjoiY3R4LXJlZitqd3QifQ.e30."),
    );
    write(
        dir,
        "hs256",
        raw(
            "eyJhbGciOiJIUzI1NiIsImtpZCI6ImZ1enotcHJvZHVjZXItMSIsInR5cCI6ImN0eC1yZWYrand0In0.e30.c2ln",
        ),
    );
    write(dir, "jwe", raw("eyJhbGciOiJkaXIifQ..aXY.Y2lwaGVy.dGFn"));
    // Signed segments: key byte, claims; `@PREV@` links a chain.
    let seg = |k: u8, v: &serde_json::Value| [vec![k], v.to_string().into_bytes()].concat();
    let mut origin_claims = r.parent_claims.clone();
    origin_claims["aud"] = fx::CONSUMER.into();
    write(
        dir,
        "signed-origin",
        [b"\x01".to_vec(), seg(0, &origin_claims)].concat(),
    );
    write(
        dir,
        "signed-chain",
        [
            b"\x01".to_vec(),
            seg(0, &r.parent_claims),
            vec![0x1E],
            seg(1, &r.child_claims),
        ]
        .concat(),
    );
    let header = serde_json::json!({
        "alg": "ES256", "typ": "application/ctx-ref+jwt", "kid": fx::PRODUCER_KID, "crit": []
    });
    write(
        dir,
        "signed-header",
        [
            b"\x01\x80".to_vec(),
            header.to_string().into_bytes(),
            b"\n".to_vec(),
            origin_claims.to_string().into_bytes(),
        ]
        .concat(),
    );
}

fn jwt() -> String {
    let k = SigningKey::from_pkcs8_pem(SigningAlg::ES256, "user-1", fx::CONSUMER_PEM).expect("key");
    elevate_core::jws::sign(
        &k,
        "JWT",
        &serde_json::json!({"sub": "alice", "scope": "orders:read", "exp": fx::NOW}),
    )
    .expect("jwt")
}

fn strip(dir: &Path, r: &Refs) {
    let t = jwt();
    write(
        dir,
        "headers",
        format!(
            "Authorization: Bearer {t}\nCookie: session=abc\nx-forwarded-token: {t}\nX-Custom: token={t}; path=/\n\
             content-type: application/json\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n\
             {CTX_REF_HEADER}: {}\n\n{{\"access_token\":\"top\",\"order\":{{\"id\":7,\"auth\":{{\"refresh_token\":\"n\"}}}},\"items\":[{{\"id_token\":\"a\"}}],\"note\":\"keep\"}}",
            r.origin
        ),
    );
    write(
        dir,
        "refuse",
        format!(
            "#refuse\nx-upstream-auth: dpop {t}\nx-note: caf\u{e9}\n\n[{{\"access_token\":1}}]"
        ),
    );
    write(
        dir,
        "paths",
        "#path auth.secret\n#path token\n#header x-secret\nX-Secret: s3cr3t\n\n  {\"auth\":{\"secret\":\"s\"},\"x\":{\"auth\":{\"secret\":\"k\"}},\"token\":[{\"token\":2}]}",
    );
    write(
        dir,
        "binary",
        b"x-raw: bear\xff\xfe token\nx-b: \xe6\x97\xa5\n\nnot json",
    );
}

fn amqp_table(h: &Headers) -> Vec<u8> {
    let t = elevate_amqp::headers::encode(h).expect("encode");
    table_body(&t)
}

fn table_body(t: &FieldTable) -> Vec<u8> {
    let bytes = cookie_factory::gen_simple(gen_field_table(t), Vec::new()).expect("gen");
    bytes[4..].to_vec() // the target prepends the length itself
}

fn amqp(dir: &Path, r: &Refs) {
    let mut h = Headers::new();
    h.append(CTX_REF_HEADER, r.origin.as_str());
    h.append(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    h.append("x-a", "1");
    h.append("x-a", b"\x00\xffbin".to_vec());
    write(dir, "published", amqp_table(&h));
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(2));
    death.insert("queue".into(), AMQPValue::LongString("orders".into()));
    death.insert("reason".into(), AMQPValue::LongString("rejected".into()));
    death.insert("time".into(), AMQPValue::Timestamp(1_767_225_600));
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
            "orders".into(),
        )])),
    );
    let mut nested = FieldTable::default();
    nested.insert(
        "tok".into(),
        AMQPValue::LongString(LongString::from(jwt().as_bytes())),
    );
    let mut t = FieldTable::default();
    t.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    t.insert("x-meta".into(), AMQPValue::FieldTable(nested));
    t.insert("b".into(), AMQPValue::Boolean(true));
    t.insert("f".into(), AMQPValue::Double(1.5));
    t.insert(
        "d".into(),
        AMQPValue::DecimalValue(lapin::types::DecimalValue {
            scale: 2,
            value: 999,
        }),
    );
    t.insert("s".into(), AMQPValue::ShortString("short".into()));
    t.insert("x".into(), AMQPValue::ByteArray(b"bytes".to_vec().into()));
    t.insert("v".into(), AMQPValue::Void);
    t.insert("i".into(), AMQPValue::ShortShortInt(-3));
    write(dir, "foreign", table_body(&t));
}

fn nats(dir: &Path, r: &Refs) {
    write(
        dir,
        "published",
        format!(
            "NATS/1.0\r\n{CTX_REF_HEADER}: {}\r\nNats-Msg-Id: 0190a1b2-msg\r\nX-Trace: a\r\nX-Trace: b\r\n\r\n",
            r.origin
        ),
    );
    write(dir, "status", "NATS/1.0 503\r\n\r\n");
    write(
        dir,
        "folded",
        "NATS/1.0\r\nX-Long: first\r\n  continued\r\nAccept:text/plain\r\n\r\n",
    );
    write(
        dir,
        "whitespace",
        "NATS/1.0\r\nx-pad:  padded value  \r\n: empty name\r\n\r\n",
    );
}

fn kafka(dir: &Path, r: &Refs) {
    fn varint(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let b = (z & 0x7F) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn section(headers: &[(&[u8], Option<&[u8]>)]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, headers.len() as i64);
        for (k, v) in headers {
            varint(&mut out, k.len() as i64);
            out.extend_from_slice(k);
            match v {
                Some(v) => {
                    varint(&mut out, v.len() as i64);
                    out.extend_from_slice(v);
                }
                None => varint(&mut out, -1),
            }
        }
        out
    }
    write(
        dir,
        "published",
        section(&[
            (CTX_REF_HEADER.as_bytes(), Some(r.derived.as_bytes())),
            (
                b"traceparent",
                Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ),
            (b"a", Some(b"1")),
            (b"A", Some(b"\x00\xff\n")),
            (b"null", None),
            (b"empty", Some(b"")),
        ]),
    );
    write(
        dir,
        "binary-key",
        section(&[(b"x-\xff\xfe", Some(b"v")), (b"cookie\x00x", Some(b"s=1"))]),
    );
}

fn tts(dir: &Path) {
    use txn_token_client::protocol as p;
    let base = |subject_token: &str, subject_type: &str, scope: &str| {
        serde_urlencoded::to_string([
            ("grant_type", p::GRANT_TYPE_TOKEN_EXCHANGE),
            ("requested_token_type", p::TOKEN_TYPE_TXN_TOKEN),
            ("audience", "fuzz.example"),
            ("scope", scope),
            ("subject_token", subject_token),
            ("subject_token_type", subject_type),
            ("request_context", r#"{"ip":"10.0.0.1"}"#),
            (
                "request_details",
                r#"{"source":{"broker":"kafka","topic":"orders"}}"#,
            ),
            ("client_assertion_type", p::CLIENT_ASSERTION_TYPE_JWT_BEARER),
            ("client_assertion", "@ASSERTION@"),
        ])
        .expect("form")
    };
    write(
        dir,
        "reference",
        base("@REF@", p::TOKEN_TYPE_JWT, "orders:read"),
    );
    write(
        dir,
        "chain",
        base("@CHAIN@", p::TOKEN_TYPE_JWT, "orders:read"),
    );
    write(
        dir,
        "access-token",
        base("@AT@", p::TOKEN_TYPE_ACCESS_TOKEN, "orders:read"),
    );
    write(
        dir,
        "widened",
        base("@REF@", p::TOKEN_TYPE_JWT, "orders:read admin"),
    );
    write(
        dir,
        "repeated",
        format!(
            "{}&scope=orders:write&client_id=spiffe%3A%2F%2Ffuzz.example%2Fconsumer",
            base("@REF@", p::TOKEN_TYPE_JWT, "orders:read")
        ),
    );
    write(dir, "stale", base(&jwt(), p::TOKEN_TYPE_JWT, "orders:read"));
    write(
        dir,
        "bad-encoding",
        "grant_type=%ZZ&scope=%E2%82&audience=a+b",
    );
}

fn main() {
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let r = refs();
    ctxref(&root.join("ctxref"), &r);
    strip(&root.join("strip"), &r);
    amqp(&root.join("amqp_headers"), &r);
    nats(&root.join("nats_headers"), &r);
    kafka(&root.join("kafka_headers"), &r);
    tts(&root.join("tts_form"));
    println!("seed corpus written under {}", root.display());
}
