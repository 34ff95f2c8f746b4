//! Credential stripping (producer) and credential detection (consumer).
//!
//! A message must never carry a credential through a broker. The producer
//! removes (or refuses) credential headers, header values that carry a
//! bearer token or a JWT, configured JSON payload fields and any JSON string
//! that carries a token; the consumer runs the same scan and quarantines
//! anything that still carries one.
//!
//! The scan fails closed: a payload it cannot fully inspect (JSON that does
//! not parse or nests too deep, an unknown content encoding, an oversized
//! gzip stream) is a finding of kind [`CredentialKind::Uninspectable`], never
//! a pass (see [`payload`] for how payloads are read).

mod payload;
mod text;

use serde::Serialize;
use serde_json::Value;

use crate::ctxref::CTX_REF_HEADER;
use crate::keys::sha256_hex;
use crate::message::Headers;

pub use payload::MAX_INFLATED;

/// What the producer does when it finds a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StripMode {
    /// Remove it and publish the rest.
    #[default]
    Remove,
    /// Refuse to publish the message.
    Refuse,
}

/// Where a credential was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "in", content = "name", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Location {
    /// A header (name as it appeared).
    Header(String),
    /// A JSON payload path (dotted), or `$` for the payload as a whole.
    Payload(String),
}

/// Why a value counts as a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum CredentialKind {
    /// A header whose name is a credential header (`authorization`, `cookie`...).
    CredentialHeader,
    /// A value with an HTTP auth scheme and credentials (`Bearer`, `Basic`, `DPoP`, ...).
    AuthScheme,
    /// A compact JWS/JWT anywhere in the value.
    Jwt,
    /// A configured JSON payload field.
    PayloadField,
    /// The payload could not be fully inspected, so it may hide one.
    Uninspectable,
}

/// One credential found in a message (never the value itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Where in the message it was found (which header, or the payload).
    pub location: Location,
    /// What kind of credential it looks like, which says why it was flagged.
    pub kind: CredentialKind,
    /// SHA-256 (hex) of the value found (of the whole payload when uninspectable),
    /// so an operator can match it against a known token without seeing it.
    pub sha256: String,
    /// Why the payload could not be inspected ([`CredentialKind::Uninspectable`] only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Finding {
    fn new(location: Location, kind: CredentialKind, value: &[u8]) -> Self {
        Finding {
            location,
            kind,
            sha256: sha256_hex(value),
            detail: None,
        }
    }
}

/// The producer refused to publish because the message carries credentials
/// (or, in [`StripMode::Remove`], credentials it cannot remove: a token in a
/// non-JSON payload, or a payload the scan cannot inspect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message carries {} credential(s) or uninspectable content; refusing to publish", findings.len())]
pub struct Refused {
    /// What was found.
    pub findings: Vec<Finding>,
}

/// The payload after stripping: what was removed, the rewritten payload (if
/// anything was removed from a JSON document), and what was found but cannot
/// be removed (a token in text or binary data, an uninspectable payload).
#[derive(Debug, Clone, Default)]
pub struct PayloadStrip {
    /// Removed from a JSON document.
    pub removed: Vec<Finding>,
    /// The JSON document without them, when anything was removed.
    pub rewritten: Option<Vec<u8>>,
    /// Found but not removable: the payload as a whole carries it.
    pub unremovable: Vec<Finding>,
}

/// Which headers and payload paths count as credentials, and what to do with them.
#[derive(Debug, Clone)]
pub struct CredentialPolicy {
    header_names: Vec<String>,
    json_paths: Vec<Vec<String>>,
    mode: StripMode,
}

/// Header names that are credentials whatever their value.
pub const CREDENTIAL_HEADERS: [&str; 12] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "txn-token",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-access-token",
    "x-id-token",
    "x-refresh-token",
    "x-amz-security-token",
];

impl Default for CredentialPolicy {
    fn default() -> Self {
        CredentialPolicy {
            header_names: CREDENTIAL_HEADERS.map(String::from).to_vec(),
            json_paths: ["access_token", "id_token", "refresh_token"]
                .iter()
                .map(|p| parse_path(p))
                .collect(),
            mode: StripMode::Remove,
        }
    }
}

/// The default policy, built once (for `Debug` redaction and other read-only uses).
pub fn default_policy() -> &'static CredentialPolicy {
    static DEFAULT: std::sync::LazyLock<CredentialPolicy> =
        std::sync::LazyLock::new(CredentialPolicy::default);
    &DEFAULT
}

fn parse_path(p: &str) -> Vec<String> {
    p.split('.').map(str::to_string).collect()
}

/// The header a message names its payload's content coding with.
const CONTENT_ENCODING: &str = "content-encoding";

impl CredentialPolicy {
    /// Adds a header name (any case) that always counts as a credential.
    pub fn with_header(mut self, name: &str) -> Self {
        self.header_names.push(name.to_ascii_lowercase());
        self
    }

    /// Replaces the JSON payload paths. A single name (`access_token`) matches that
    /// key at any depth; a dotted path (`auth.token`) matches from the root.
    pub fn with_json_paths<S: AsRef<str>>(mut self, paths: &[S]) -> Self {
        self.json_paths = paths.iter().map(|p| parse_path(p.as_ref())).collect();
        self
    }

    /// Sets remove or refuse.
    pub fn with_mode(mut self, mode: StripMode) -> Self {
        self.mode = mode;
        self
    }

    /// The configured mode.
    pub fn mode(&self) -> StripMode {
        self.mode
    }

    /// Whether this header (name and value) counts as a credential.
    pub fn flags_header(&self, name: &str, value: &[u8]) -> bool {
        self.header_finding(name, value).is_some()
    }

    fn header_finding(&self, name: &str, value: &[u8]) -> Option<CredentialKind> {
        if name.eq_ignore_ascii_case(CTX_REF_HEADER) {
            return None;
        }
        if name.eq_ignore_ascii_case(crate::ctxbind::CTX_BIND_HEADER)
            && crate::ctxbind::looks_like_binding(value)
        {
            return None;
        }
        if self
            .header_names
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
        {
            return Some(CredentialKind::CredentialHeader);
        }
        // A token is ASCII: invalid bytes around one (read as U+FFFD) hide
        // nothing. A header name can carry one too.
        text::finding(&String::from_utf8_lossy(value)).or_else(|| text::finding(name))
    }

    /// Scans headers and payload; returns every credential found, and a
    /// [`CredentialKind::Uninspectable`] finding for a payload it cannot read
    /// (consumer side: any finding quarantines the message).
    pub fn scan(&self, headers: &Headers, payload: &[u8]) -> Vec<Finding> {
        let mut out: Vec<Finding> = headers
            .iter()
            .filter_map(|(n, v)| {
                self.header_finding(n, v)
                    .map(|kind| Finding::new(Location::Header(n.to_string()), kind, v))
            })
            .collect();
        let stripped = self.inspect_payload(payload, headers.get_str(CONTENT_ENCODING));
        out.extend(stripped.removed);
        out.extend(stripped.unremovable);
        out
    }

    /// Removes credential headers in place (every duplicate); returns what was removed.
    pub fn strip_headers(&self, headers: &mut Headers) -> Vec<Finding> {
        let mut out = Vec::new();
        headers.retain(|n, v| match self.header_finding(n, v) {
            Some(kind) => {
                out.push(Finding::new(Location::Header(n.to_string()), kind, v));
                false
            }
            None => true,
        });
        out
    }

    /// Strips the payload of a message with `headers` (for its content coding):
    /// JSON credentials are removed; tokens in other payloads, and payloads
    /// the scan cannot inspect, are reported as unremovable.
    pub fn strip_payload(&self, headers: &Headers, payload: &[u8]) -> PayloadStrip {
        self.inspect_payload(payload, headers.get_str(CONTENT_ENCODING))
    }

    /// Producer side: strips headers and payload per the mode.
    /// `Remove` returns what was removed and refuses only what it cannot
    /// remove; `Refuse` errors if anything was found.
    ///
    /// # Errors
    ///
    /// Returns [`Refused`] with the findings if the mode is `Refuse` and any credential was found,
    /// or if the mode is `Remove` and a credential cannot be removed (a token in a non-JSON
    /// payload, or a payload the scan cannot inspect).
    pub fn apply(
        &self,
        headers: &mut Headers,
        payload: &mut Vec<u8>,
    ) -> Result<Vec<Finding>, Refused> {
        if self.mode == StripMode::Refuse {
            let findings = self.scan(headers, payload);
            return if findings.is_empty() {
                Ok(findings)
            } else {
                Err(Refused { findings })
            };
        }
        let stripped = self.strip_payload(headers, payload);
        if !stripped.unremovable.is_empty() {
            return Err(Refused {
                findings: stripped.unremovable,
            });
        }
        let mut findings = self.strip_headers(headers);
        if let Some(p) = stripped.rewritten {
            *payload = p;
        }
        findings.extend(stripped.removed);
        Ok(findings)
    }

    fn inspect_payload(&self, payload: &[u8], content_encoding: Option<&str>) -> PayloadStrip {
        let mut out = PayloadStrip::default();
        match payload::view(payload, content_encoding) {
            payload::View::Empty => {}
            payload::View::Json(mut json) => {
                self.strip_json(&mut json, &mut out.removed);
                if !out.removed.is_empty() {
                    match serde_json::to_vec(&json) {
                        Ok(p) => out.rewritten = Some(p),
                        // Cannot happen for a parsed Value; fail closed if it does.
                        Err(e) => out.unremovable.push(uninspectable(payload, e.to_string())),
                    }
                }
                // A gzip payload cannot be rewritten in place: what was found in it stays.
                if payload.starts_with(&[0x1f, 0x8b]) && !out.removed.is_empty() {
                    out.unremovable.append(&mut out.removed);
                    out.rewritten = None;
                }
            }
            payload::View::Text(t) => {
                if let Some(kind) = text::finding(&t) {
                    out.unremovable.push(Finding::new(
                        Location::Payload("$".into()),
                        kind,
                        payload,
                    ));
                }
            }
            payload::View::Uninspectable(why) => out.unremovable.push(uninspectable(payload, why)),
        }
        out
    }

    fn strip_json(&self, json: &mut Value, out: &mut Vec<Finding>) {
        for path in &self.json_paths {
            if path.len() == 1 {
                remove_key_anywhere(json, &path[0], &mut String::new(), out);
            } else {
                remove_path(json, path, out);
            }
        }
        remove_token_values(json, &mut String::new(), out);
    }
}

fn uninspectable(payload: &[u8], why: String) -> Finding {
    Finding {
        detail: Some(why),
        ..Finding::new(
            Location::Payload("$".into()),
            CredentialKind::Uninspectable,
            payload,
        )
    }
}

fn value_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        other => other.to_string().into_bytes(),
    }
}

fn remove_key_anywhere(v: &mut Value, key: &str, prefix: &mut String, out: &mut Vec<Finding>) {
    match v {
        Value::Object(map) => {
            if let Some(removed) = map.remove(key) {
                out.push(Finding::new(
                    Location::Payload(join(prefix, key)),
                    CredentialKind::PayloadField,
                    &value_bytes(&removed),
                ));
            }
            for (k, child) in map.iter_mut() {
                let len = prefix.len();
                let p = join(prefix, k);
                prefix.clear();
                prefix.push_str(&p);
                remove_key_anywhere(child, key, prefix, out);
                prefix.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                let len = prefix.len();
                let p = join(prefix, &i.to_string());
                prefix.clear();
                prefix.push_str(&p);
                remove_key_anywhere(child, key, prefix, out);
                prefix.truncate(len);
            }
        }
        _ => {}
    }
}

/// Removes every object member whose key or string value carries a token,
/// and every such string in an array, at any depth.
fn remove_token_values(v: &mut Value, prefix: &mut String, out: &mut Vec<Finding>) {
    let flagged = |s: &str| text::finding(s);
    match v {
        Value::Object(map) => {
            let hits: Vec<(String, CredentialKind)> = map
                .iter()
                .filter_map(|(k, child)| {
                    let by_value = match child {
                        Value::String(s) => flagged(s),
                        _ => None,
                    };
                    by_value
                        .or_else(|| flagged(k))
                        .map(|kind| (k.clone(), kind))
                })
                .collect();
            for (k, kind) in hits {
                if let Some(removed) = map.remove(&k) {
                    out.push(Finding::new(
                        Location::Payload(join(prefix, &k)),
                        kind,
                        &value_bytes(&removed),
                    ));
                }
            }
            for (k, child) in map.iter_mut() {
                let len = prefix.len();
                let p = join(prefix, k);
                prefix.clear();
                prefix.push_str(&p);
                remove_token_values(child, prefix, out);
                prefix.truncate(len);
            }
        }
        Value::Array(items) => {
            let mut index = 0;
            items.retain(|item| {
                let hit = match item {
                    Value::String(s) => flagged(s),
                    _ => None,
                };
                let keep = match hit {
                    Some(kind) => {
                        out.push(Finding::new(
                            Location::Payload(join(prefix, &index.to_string())),
                            kind,
                            &value_bytes(item),
                        ));
                        false
                    }
                    None => true,
                };
                index += 1;
                keep
            });
            for (i, child) in items.iter_mut().enumerate() {
                let len = prefix.len();
                let p = join(prefix, &i.to_string());
                prefix.clear();
                prefix.push_str(&p);
                remove_token_values(child, prefix, out);
                prefix.truncate(len);
            }
        }
        _ => {}
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn remove_path(v: &mut Value, path: &[String], out: &mut Vec<Finding>) {
    let (last, parents) = match path.split_last() {
        Some(x) => x,
        None => return,
    };
    let mut cur = v;
    for p in parents {
        match cur.get_mut(p.as_str()) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(map) = cur.as_object_mut()
        && let Some(removed) = map.remove(last.as_str())
    {
        out.push(Finding::new(
            Location::Payload(path.join(".")),
            CredentialKind::PayloadField,
            &value_bytes(&removed),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{SigningAlg, SigningKey};

    fn jwt() -> String {
        let k = SigningKey::generate(SigningAlg::ES256, "k").unwrap();
        crate::jws::sign(&k, "JWT", &serde_json::json!({"sub":"alice","scope":"x"})).unwrap()
    }

    #[test]
    fn strips_mixed_case_duplicates_and_hidden_tokens() {
        let t = jwt();
        let mut h: Headers = [
            ("Authorization", format!("Bearer {t}")),
            ("AUTHORIZATION", "Basic dXNlcjpwYXNz".to_string()),
            ("Cookie", "session=abc".to_string()),
            ("X-Api-Key", "k-123".to_string()),
            ("x-forwarded-token", t.clone()),
            ("X-Custom", format!("token={t}; path=/")),
            ("x-upstream-auth", "bearer opaque-token-value".to_string()),
            ("content-type", "application/json".to_string()),
            ("x-trace", "00-abc-def-01".to_string()),
            (CTX_REF_HEADER, t.clone()),
        ]
        .into_iter()
        .collect();
        let mut payload = serde_json::to_vec(&serde_json::json!({
            "access_token": "top",
            "order": {"id": 7, "auth": {"refresh_token": "nested"}},
            "items": [{"id_token": "in-array"}],
            "note": "keep me"
        }))
        .unwrap();
        let policy = CredentialPolicy::default();
        let found = policy.apply(&mut h, &mut payload).unwrap();
        assert_eq!(found.len(), 10, "{found:?}");
        let names: Vec<&str> = h.iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["content-type", "x-trace", CTX_REF_HEADER]);
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"order": {"id": 7, "auth": {}}, "items": [{}], "note": "keep me"})
        );
        assert!(policy.scan(&h, &payload).is_empty());
    }

    #[test]
    fn multibyte_header_values_are_scanned_without_panicking() {
        let policy = CredentialPolicy::default();
        // A multi-byte character straddling the length of every auth-scheme prefix.
        for v in [
            "abcdé-value",
            "béarer x",
            "日本語のヘッダー",
            "\u{1F600}\u{1F600}",
        ] {
            let h: Headers = [("x-note", v)].into_iter().collect();
            assert!(policy.scan(&h, b"{}").is_empty(), "{v}");
        }
        let h: Headers = [("x-raw", &b"bear\xff\xfe token"[..])]
            .into_iter()
            .collect();
        assert!(policy.scan(&h, b"").is_empty());
    }

    #[test]
    fn jwts_behind_prefixes_and_wrappers_are_found() {
        let t = jwt();
        let policy = CredentialPolicy::default();
        for v in [
            format!("jwt:{t}"),
            format!("({t})"),
            format!("cb#{t}"),
            format!("[\"{t}\"]"),
        ] {
            let h: Headers = [("x-custom", v.as_str())].into_iter().collect();
            let found = policy.scan(&h, b"");
            assert_eq!(found.len(), 1, "{v}");
            assert_eq!(found[0].kind, CredentialKind::Jwt);
        }
    }

    #[test]
    fn refuse_mode_changes_nothing() {
        let policy = CredentialPolicy::default().with_mode(StripMode::Refuse);
        let mut h: Headers = [("authorization", "Bearer x")].into_iter().collect();
        let mut p = b"{}".to_vec();
        let err = policy.apply(&mut h, &mut p).unwrap_err();
        assert_eq!(err.findings.len(), 1);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn dotted_paths_match_from_root_only() {
        let policy = CredentialPolicy::default().with_json_paths(&["auth.secret"]);
        let out = policy
            .strip_payload(
                &Headers::new(),
                br#"{"auth":{"secret":"s"},"x":{"auth":{"secret":"kept"}}}"#,
            )
            .rewritten
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            serde_json::json!({"auth":{},"x":{"auth":{"secret":"kept"}}})
        );
    }

    #[test]
    fn non_json_payload_without_tokens_is_clean() {
        let policy = CredentialPolicy::default();
        let s = policy.strip_payload(&Headers::new(), b"access_token=abc");
        assert!(s.rewritten.is_none() && s.removed.is_empty() && s.unremovable.is_empty());
    }

    fn scan_payload(p: &[u8]) -> Vec<Finding> {
        CredentialPolicy::default().scan(&Headers::new(), p)
    }

    #[test]
    fn the_scan_fails_closed_on_payloads_it_cannot_read() {
        let deep = format!(
            "{}{{\"access_token\":\"secret\"}}{}",
            "[".repeat(150),
            "]".repeat(150)
        );
        let mut bom = vec![0xef, 0xbb, 0xbf];
        bom.extend_from_slice(br#"{"access_token":"secret"}"#);
        for (what, p) in [
            ("deep JSON", deep.into_bytes()),
            ("malformed JSON", br#"{"access_token":"secret""#.to_vec()),
            ("zstd", vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0]),
        ] {
            let f = scan_payload(&p);
            assert_eq!(f.len(), 1, "{what}: {f:?}");
            assert_eq!(f[0].kind, CredentialKind::Uninspectable, "{what}");
            assert_eq!(f[0].sha256, sha256_hex(&p));
        }
        let f = scan_payload(&bom);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].kind, CredentialKind::PayloadField);
        assert_eq!(f[0].sha256, sha256_hex(b"secret"));
    }

    #[test]
    fn tokens_in_any_payload_are_found() {
        let t = jwt();
        // a JWT value under any key, a JWT in an array, a bearer string, a raw JWT payload
        let json = serde_json::json!({"note": t, "list": ["ok", t], "h": "Bearer\tabcdefghij"});
        let f = scan_payload(&serde_json::to_vec(&json).unwrap());
        assert_eq!(f.len(), 3, "{f:?}");
        assert_eq!(scan_payload(t.as_bytes()).len(), 1);
        let mut binary = vec![0u8, 1, 2, 0xff];
        binary.extend_from_slice(t.as_bytes());
        binary.push(0);
        assert_eq!(scan_payload(&binary)[0].kind, CredentialKind::Jwt);
        // the producer removes JSON tokens and refuses those it cannot remove
        let policy = CredentialPolicy::default();
        let mut h = Headers::new();
        let mut p = serde_json::to_vec(&json).unwrap();
        let removed = policy.apply(&mut h, &mut p).unwrap();
        assert_eq!(removed.len(), 3);
        assert_eq!(
            serde_json::from_slice::<Value>(&p).unwrap(),
            serde_json::json!({"list": ["ok"]})
        );
        let mut raw = t.clone().into_bytes();
        assert!(policy.apply(&mut h, &mut raw).is_err());
    }

    #[test]
    fn header_values_with_any_whitespace_after_the_scheme_are_credentials() {
        let policy = CredentialPolicy::default();
        for v in [
            "Bearer\tsecret",
            "Bearer\u{a0}secret",
            "bearer\u{3000}s",
            "Basic\u{b}x",
        ] {
            let h: Headers = [("x-forwarded", v)].into_iter().collect();
            assert_eq!(policy.scan(&h, b"").len(), 1, "{v:?}");
        }
        let h: Headers = [("x-raw", &b"Bearer\xffsecret"[..])].into_iter().collect();
        assert_eq!(policy.scan(&h, b"").len(), 1);
    }

    #[test]
    fn a_token_as_a_header_name_is_found() {
        let h: Headers = [(jwt().as_str(), "x")].into_iter().collect();
        assert_eq!(CredentialPolicy::default().scan(&h, b"").len(), 1);
    }

    #[test]
    fn long_jwts_are_still_jwts() {
        let k = SigningKey::generate(SigningAlg::ES256, "k").unwrap();
        let big = "x".repeat(200 * 1024);
        let t = crate::jws::sign(&k, "JWT", &serde_json::json!({"pad": big})).unwrap();
        let h: Headers = [("x-custom", t.as_str())].into_iter().collect();
        assert_eq!(CredentialPolicy::default().scan(&h, b"").len(), 1);
    }
}
