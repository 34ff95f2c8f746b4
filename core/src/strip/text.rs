//! Credential detection in one text value (a header value, a JSON string, a
//! text payload): an HTTP authentication scheme followed by credentials, or a
//! compact JWS/JWE anywhere in the value, behind any prefix or wrapper.

use crate::jws::looks_like_jwt;

use super::CredentialKind;

/// Schemes that make a value a credential whenever they open it followed by
/// whitespace and anything (`Bearer x`, `Basic\tdXNl…`, `DPoP …`).
const STRICT_SCHEMES: [&str; 3] = ["bearer", "basic", "dpop"];

/// Further schemes, and the strict ones inside a value, count only when
/// followed by whitespace and a credential-looking word of at least
/// [`MIN_CREDENTIAL_LEN`] token68 characters (RFC 9110 §11.2), so that prose
/// such as "the bearer of" is not a finding.
const LOOSE_SCHEMES: [&str; 8] = [
    "bearer",
    "basic",
    "dpop",
    "digest",
    "negotiate",
    "ntlm",
    "token",
    "apikey",
];

/// Length of a word after a scheme inside a value that makes it a credential.
const MIN_CREDENTIAL_LEN: usize = 8;

/// Whether `c` separates a scheme from its credentials: any Unicode
/// whitespace or control character (tab, NBSP, ideographic space, NUL...),
/// zero-width characters, and an invalid byte (read as U+FFFD) — not only
/// the one space RFC 9110 writes.
fn is_gap(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '\u{feff}' | '\u{200b}' | '\u{200c}' | '\u{200d}' | '\u{fffd}'
        )
}

/// RFC 9110 token68 characters.
fn is_token68(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '+' | '/' | '=')
}

/// The credential kind `text` carries, if any.
pub(crate) fn finding(text: &str) -> Option<CredentialKind> {
    if has_auth_scheme(text) {
        return Some(CredentialKind::AuthScheme);
    }
    // A JWT hides behind any prefix or wrapper (`jwt:…`, `(…)`, `cb#…`):
    // test every run of the JWS alphabet, not only whitespace-separated words.
    if jws_runs(text).any(|(_, run)| looks_like_jwt(run)) {
        return Some(CredentialKind::Jwt);
    }
    None
}

/// Runs of the compact-JWS alphabet in `text`, with their byte offsets.
pub(crate) fn jws_runs(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut start = None;
    let mut out = Vec::new();
    for (i, c) in text.char_indices() {
        // `=` ends a run: `token=eyJ…` must yield the JWT, not one longer word.
        let jws = c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        match (jws, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s, &text[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &text[s..]));
    }
    out.into_iter()
}

/// Characters after which a value opens again: the start of a quoted
/// string, an assignment, a list item (`{"auth":"Bearer x"}`, `a=Bearer x`).
const OPENERS: [char; 10] = ['"', '\'', '`', ':', '=', ',', ';', '[', '{', '('];

/// Whether `text` holds a strict scheme with credentials where a value
/// opens (its start, or after a quote, `:`, `=`, `,`, `;`, a bracket), or any
/// scheme followed by a credential-looking word anywhere.
fn has_auth_scheme(text: &str) -> bool {
    let mut prev: Option<char> = None;
    for (i, c) in text.char_indices() {
        let opens = prev.is_none_or(|p| OPENERS.contains(&p));
        let boundary = prev.is_none_or(|p| !p.is_alphanumeric());
        prev = Some(c);
        if opens {
            let here = text[i..].trim_start_matches(is_gap);
            if STRICT_SCHEMES
                .iter()
                .any(|s| scheme_then(here, s).is_some_and(|rest| !rest.is_empty()))
            {
                return true;
            }
        }
        if !boundary || !c.is_ascii_alphabetic() {
            continue;
        }
        let here = &text[i..];
        for s in LOOSE_SCHEMES {
            if let Some(rest) = scheme_then(here, s) {
                let word = rest.chars().take_while(|c| is_token68(*c)).count();
                if word >= MIN_CREDENTIAL_LEN {
                    return true;
                }
            }
        }
    }
    false
}

/// If `text` starts with `scheme` (ASCII case-insensitive) followed by at
/// least one gap character, the text after the gap.
fn scheme_then<'a>(text: &'a str, scheme: &str) -> Option<&'a str> {
    let head = text.as_bytes().get(..scheme.len())?;
    if !head.eq_ignore_ascii_case(scheme.as_bytes()) {
        return None;
    }
    // `scheme` is ASCII, so its length is a char boundary of `text`.
    let after = text.get(scheme.len()..)?;
    let rest = after.trim_start_matches(is_gap);
    (rest.len() < after.len()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_with_any_whitespace() {
        for v in [
            "Bearer abc",
            "Bearer\tabc",
            "bearer\u{a0}abc",
            "BEARER\u{3000}abc",
            "  Basic\r\ndXNlcjpwYXNz",
            "DPoP\u{0}x",
            "\u{feff}Bearer abc",
            "prefix Token ghp_0123456789abcdef",
            "{\"auth\":\"Bearer abcdefgh12\"}",
            "{\"auth\":\"Bearer x\"}",
            "token=Basic\tdXNl",
            "[\"a\", \"DPoP y\"]",
            "x;negotiate YIIB2gYGKwYBBQUCoIIBzjCCAcqg",
        ] {
            assert_eq!(finding(v), Some(CredentialKind::AuthScheme), "{v:?}");
        }
        for v in [
            "Bearer",
            "Bearerabc",
            "the bearer of this",
            "token bucket",
            "Basic-plan",
            "abcdé-value",
            "日本語",
        ] {
            assert_eq!(finding(v), None, "{v:?}");
        }
    }
}
