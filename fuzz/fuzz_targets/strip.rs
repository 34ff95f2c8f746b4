//! The credential scan and strip (`core/src/strip.rs`): `CredentialPolicy::scan`,
//! `strip_headers`, `strip_payload` and `apply`, on the default policy plus
//! whatever the input configures.
//!
//! Input (text-like, so that seeds stay readable): lines up to the first empty
//! line, then the payload bytes. A line is `#refuse` (refuse mode),
//! `#header NAME` (an extra credential header), `#path A.B` (replaces the JSON
//! paths; repeatable) or a header `name: value` (value bytes as they are).
//!
//! Checks: nothing panics; `apply` in Remove mode removes exactly what `scan`
//! finds, keeps everything else, and leaves nothing `scan` would find (it is
//! idempotent); Refuse mode changes nothing and refuses exactly when `scan` finds.

#![no_main]

use elevate_core::Headers;
use elevate_core::strip::{CredentialPolicy, Location, StripMode};
use libfuzzer_sys::fuzz_target;

struct Case {
    policy: CredentialPolicy,
    headers: Headers,
    payload: Vec<u8>,
}

fn parse(data: &[u8]) -> Case {
    let (head, payload) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let mut policy = CredentialPolicy::default();
    let mut paths: Vec<String> = Vec::new();
    let mut headers = Headers::new();
    for line in head.split(|b| *b == b'\n') {
        if line == b"#refuse" {
            policy = policy.with_mode(StripMode::Refuse);
        } else if let Some(name) = line.strip_prefix(b"#header ") {
            policy = policy.with_header(&String::from_utf8_lossy(name));
        } else if let Some(path) = line.strip_prefix(b"#path ") {
            paths.push(String::from_utf8_lossy(path).into_owned());
        } else {
            let (name, value) = match line.iter().position(|b| *b == b':') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => (line, &[][..]),
            };
            let value = value.strip_prefix(b" ").unwrap_or(value);
            headers.append(String::from_utf8_lossy(name).into_owned(), value.to_vec());
        }
    }
    if !paths.is_empty() {
        policy = policy.with_json_paths(&paths);
    }
    Case {
        policy,
        headers,
        payload: payload.to_vec(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Case {
        policy,
        headers,
        payload,
    } = parse(data);
    let _ = format!("{headers:?}");
    let scanned = policy.scan(&headers, &payload);

    // strip_headers removes exactly the header findings of scan.
    let mut h = headers.clone();
    let header_findings = policy.strip_headers(&mut h);
    let scanned_headers: Vec<_> = scanned
        .iter()
        .filter(|f| matches!(f.location, Location::Header(_)))
        .cloned()
        .collect();
    assert_eq!(header_findings, scanned_headers);
    assert_eq!(h.len() + header_findings.len(), headers.len());
    for (n, v) in headers.iter() {
        let kept = h.iter().any(|e| e == (n, v));
        assert_eq!(policy.flags_header(n, v), !kept, "{n:?}");
    }

    // strip_payload reports exactly the payload findings of scan: what it
    // removed from JSON, then what it cannot remove.
    let stripped = policy.strip_payload(&headers, &payload);
    let scanned_payload: Vec<_> = scanned
        .iter()
        .filter(|f| matches!(f.location, Location::Payload(_)))
        .cloned()
        .collect();
    let mut payload_findings = stripped.removed.clone();
    payload_findings.extend(stripped.unremovable.iter().cloned());
    assert_eq!(payload_findings, scanned_payload);
    if stripped.removed.is_empty() {
        assert!(
            stripped.rewritten.is_none(),
            "rewritten though nothing was removed"
        );
    }

    let mut h = headers.clone();
    let mut p = payload.clone();
    match policy.mode() {
        StripMode::Remove => {
            match policy.apply(&mut h, &mut p) {
                Err(refused) => {
                    // only what cannot be removed is refused, and nothing changed
                    assert_eq!(refused.findings, stripped.unremovable);
                    assert!(!stripped.unremovable.is_empty());
                    assert!(
                        h == headers && p == payload,
                        "a refusal changed the message"
                    );
                }
                Ok(found) => {
                    assert!(stripped.unremovable.is_empty());
                    let mut expected: Vec<_> = scanned.clone();
                    expected.sort_by_key(|f| format!("{f:?}"));
                    let mut got = found.clone();
                    got.sort_by_key(|f| format!("{f:?}"));
                    assert_eq!(got, expected);
                    if payload_findings.is_empty() {
                        assert_eq!(p, payload, "payload changed though nothing was found in it");
                    }
                    let left = policy.scan(&h, &p);
                    assert!(left.is_empty(), "credentials left after apply: {left:?}");
                    let (h2, p2) = (h.clone(), p.clone());
                    assert!(policy.apply(&mut h, &mut p).expect("remove").is_empty());
                    assert!(h == h2 && p == p2, "apply is not idempotent");
                }
            }
        }
        StripMode::Refuse => {
            match policy.apply(&mut h, &mut p) {
                Ok(found) => assert!(found.is_empty() && scanned.is_empty()),
                Err(refused) => {
                    assert_eq!(refused.findings, scanned);
                    let _ = refused.to_string();
                }
            }
            assert!(
                h == headers && p == payload,
                "refuse mode changed the message"
            );
        }
        other => panic!("a strip mode the fuzz target does not know: {other:?}"),
    }
});
