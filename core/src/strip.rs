//! Credential stripping (producer) and credential detection (consumer).
//!
//! A message must never carry a credential through a broker. The producer
//! removes (or refuses) credential headers, header values that are bearer
//! tokens or JWTs, and configured JSON payload fields; the consumer runs the
//! same scan and quarantines anything that still carries one.

use serde::Serialize;
use serde_json::Value;

use crate::ctxref::CTX_REF_HEADER;
use crate::jws::looks_like_jwt;
use crate::message::Headers;

/// What the producer does when it finds a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
pub enum Location {
    /// A header (name as it appeared).
    Header(String),
    /// A JSON payload path (dotted).
    Payload(String),
}

/// Why a value counts as a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// A header whose name is a credential header (`authorization`, `cookie`...).
    CredentialHeader,
    /// A value with an HTTP auth scheme prefix (`Bearer`, `Basic`, `DPoP`).
    AuthScheme,
    /// A compact JWS/JWT anywhere in the value.
    Jwt,
    /// A configured JSON payload field.
    PayloadField,
}

/// One credential found in a message (never the value itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Where.
    pub location: Location,
    /// Why.
    pub kind: CredentialKind,
}

/// The producer refused to publish because the message carries credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message carries {} credential(s); refusing to publish", findings.len())]
pub struct Refused {
    /// What was found.
    pub findings: Vec<Finding>,
}

/// Which headers and payload paths count as credentials, and what to do with them.
#[derive(Debug, Clone)]
pub struct CredentialPolicy {
    header_names: Vec<String>,
    json_paths: Vec<Vec<String>>,
    mode: StripMode,
}

impl Default for CredentialPolicy {
    fn default() -> Self {
        CredentialPolicy {
            header_names: [
                "authorization",
                "proxy-authorization",
                "cookie",
                "set-cookie",
                "txn-token",
                "x-api-key",
            ]
            .map(String::from)
            .to_vec(),
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

const AUTH_SCHEMES: [&str; 3] = ["bearer ", "basic ", "dpop "];

/// ASCII case-insensitive prefix test on bytes: never slices a `str` inside a
/// multi-byte character, whatever the header value holds.
fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.as_bytes()
        .get(..prefix.len())
        .is_some_and(|b| b.eq_ignore_ascii_case(prefix.as_bytes()))
}

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
        if self
            .header_names
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
        {
            return Some(CredentialKind::CredentialHeader);
        }
        let text = String::from_utf8_lossy(value);
        let trimmed = text.trim_start();
        if AUTH_SCHEMES
            .iter()
            .any(|s| starts_with_ignore_case(trimmed, s) && trimmed.len() > s.len())
        {
            return Some(CredentialKind::AuthScheme);
        }
        // A JWT hides behind any prefix or wrapper (`jwt:…`, `(…)`, `cb#…`):
        // test every run of the JWS alphabet, not only whitespace-separated words.
        if text
            .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .any(looks_like_jwt)
        {
            return Some(CredentialKind::Jwt);
        }
        None
    }

    /// Scans headers and payload; returns every credential found (consumer side).
    pub fn scan(&self, headers: &Headers, payload: &[u8]) -> Vec<Finding> {
        let mut out: Vec<Finding> = headers
            .iter()
            .filter_map(|(n, v)| {
                self.header_finding(n, v).map(|kind| Finding {
                    location: Location::Header(n.to_string()),
                    kind,
                })
            })
            .collect();
        if let Some(mut json) = parse_json(payload) {
            self.strip_json(&mut json, &mut out);
        }
        out
    }

    /// Removes credential headers in place (every duplicate); returns what was removed.
    pub fn strip_headers(&self, headers: &mut Headers) -> Vec<Finding> {
        let mut out = Vec::new();
        headers.retain(|n, v| match self.header_finding(n, v) {
            Some(kind) => {
                out.push(Finding {
                    location: Location::Header(n.to_string()),
                    kind,
                });
                false
            }
            None => true,
        });
        out
    }

    /// Removes configured JSON fields; returns the new payload if anything was removed.
    pub fn strip_payload(&self, payload: &[u8], findings: &mut Vec<Finding>) -> Option<Vec<u8>> {
        let mut json = parse_json(payload)?;
        let before = findings.len();
        self.strip_json(&mut json, findings);
        if findings.len() == before {
            return None;
        }
        serde_json::to_vec(&json).ok()
    }

    /// Producer side: strips headers and payload per the mode.
    /// `Remove` returns what was removed; `Refuse` errors if anything was found.
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
        let mut findings = self.strip_headers(headers);
        if let Some(p) = self.strip_payload(payload, &mut findings) {
            *payload = p;
        }
        Ok(findings)
    }

    fn strip_json(&self, json: &mut Value, out: &mut Vec<Finding>) {
        for path in &self.json_paths {
            if path.len() == 1 {
                remove_key_anywhere(json, &path[0], &mut String::new(), out);
            } else {
                remove_path(json, path, out);
            }
        }
    }
}

fn parse_json(payload: &[u8]) -> Option<Value> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' && *first != b'[' {
        return None;
    }
    serde_json::from_slice(payload).ok()
}

fn remove_key_anywhere(v: &mut Value, key: &str, prefix: &mut String, out: &mut Vec<Finding>) {
    match v {
        Value::Object(map) => {
            if map.remove(key).is_some() {
                out.push(Finding {
                    location: Location::Payload(join(prefix, key)),
                    kind: CredentialKind::PayloadField,
                });
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
        && map.remove(last.as_str()).is_some()
    {
        out.push(Finding {
            location: Location::Payload(path.join(".")),
            kind: CredentialKind::PayloadField,
        });
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
        let mut f = vec![];
        let out = policy
            .strip_payload(
                br#"{"auth":{"secret":"s"},"x":{"auth":{"secret":"kept"}}}"#,
                &mut f,
            )
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            serde_json::json!({"auth":{},"x":{"auth":{"secret":"kept"}}})
        );
        assert_eq!(f[0].location, Location::Payload("auth.secret".into()));
    }

    #[test]
    fn non_json_payload_untouched() {
        let policy = CredentialPolicy::default();
        let mut f = vec![];
        assert!(policy.strip_payload(b"access_token=abc", &mut f).is_none());
    }
}
