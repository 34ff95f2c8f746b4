//! Output of `elevate inspect`: aligned text for people, JSON for scripts.
//! Both show the same facts, from the same [`Report`].

use std::fmt::Write;

use crate::inspect::Report;

/// The report as a pretty-printed JSON object.
pub fn json(report: &Report) -> String {
    serde_json::to_string_pretty(report)
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot serialize the report: {e}\"}}"))
}

/// The report as aligned `name  value` lines, grouped in sections.
pub fn table(r: &Report) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let c = &r.claims;
    row("kind", format!("{} reference", r.kind));
    row("reference sha256", r.reference_sha256.clone());
    row("alg", r.header.alg.clone());
    row("kid", opt(&r.header.kid));
    row("typ", opt(&r.header.typ));
    row("iss", c.iss.clone());
    row("sub", format!("{} ({})", c.sub, c.sub_kind));
    row("aud", c.aud.join(", "));
    row("scope", c.scope.clone());
    row("txn", c.txn.clone());
    row("jti", c.jti.clone());
    row("iat", c.iat.clone());
    let state = if c.expired { "EXPIRED" } else { "not expired" };
    row("exp", format!("{} ({state})", c.exp));
    if let Some(nbf) = &c.nbf {
        row("nbf", nbf.clone());
    }
    row("dst", dash(&c.dst));
    row("dig", dash(&c.dig));
    row("depth", format!("{} of max {}", c.depth, c.max_depth));
    row("chain", r.chain.join(" -> "));
    for (i, h) in r.hops.iter().enumerate() {
        let mut v = format!("{} scope={:?}", h.sub, h.scope);
        if let Some(s) = &h.ref_sha256 {
            let _ = write!(
                v,
                " ref sha256={s} kid={} iss={}",
                opt(&h.ref_kid),
                opt(&h.ref_iss)
            );
        }
        if let Some(e) = &h.ref_error {
            let _ = write!(v, " (ref unreadable: {e})");
        }
        row(&format!("hop {}", i + 1), v);
    }
    if let Some(j) = &r.cnf {
        row("cnf.jwe sha256", j.sha256.clone());
        row(
            "cnf.jwe header",
            format!(
                "alg={} enc={} kid={}",
                opt(&j.alg),
                opt(&j.enc),
                opt(&j.kid)
            ),
        );
    }
    if let Some(b) = &r.binding {
        row("binding sha256", b.sha256.clone());
        let m = if b.ref_matches {
            "matches this reference"
        } else {
            "NOT this reference"
        };
        row("binding ref", format!("{} ({m})", b.reference));
        row("binding dst", b.dst.clone());
        row("binding dig", b.dig.clone());
        row("binding jti", b.jti.clone());
        row("binding iat", b.iat.clone());
        let mac = if b.mac_checked {
            "checked"
        } else {
            "not checked (pass --jwks, --agreement-key and --payload)"
        };
        row("binding MAC", mac.into());
    }
    if let Some(p) = &r.payload {
        let m = if p.matches {
            "matches"
        } else {
            "DOES NOT match"
        };
        row(
            "payload sha256",
            format!("{} ({m} {})", p.sha256_b64url, p.against),
        );
    }
    if let Some(v) = &r.verification {
        row("audience", v.audience.clone());
        let outcome = if v.verified {
            "verified".to_string()
        } else {
            format!(
                "FAILED {}: {}",
                v.reason.unwrap_or("?"),
                v.message.as_deref().unwrap_or("")
            )
        };
        row("verification", outcome);
        if !v.not_checked.is_empty() {
            row("not checked", v.not_checked.join("; "));
        }
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    out.trim_end().to_string()
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}
