//! How a payload is read for the credential scan, failing closed: a payload
//! is either decoded into something the scan can see all of (JSON, or text /
//! bytes searched for tokens), or it is [`View::Uninspectable`] and the
//! message is quarantined.
//!
//! Decoding: a gzip member (magic `1f 8b`) is inflated, bounded by
//! [`MAX_INFLATED`]; other compression magics (zstd, xz, bzip2) are
//! uninspectable. A UTF-8 byte-order mark is skipped; UTF-16 and UTF-32 (by
//! BOM, or by the NUL pattern of RFC 4627 §3 for JSON) are transcoded. A
//! payload whose first significant character is `{` or `[` must then parse
//! as one JSON document within serde_json's nesting limit (128): malformed,
//! trailing data, or deeper nesting is uninspectable, because a lenient
//! handler-side parser could still read a credential out of it.

use std::borrow::Cow;
use std::io::Read;

use serde_json::Value;

/// The most a gzip payload may inflate to before it is uninspectable (16 MiB).
pub const MAX_INFLATED: u64 = 16 * 1024 * 1024;

/// What the scan sees of a payload.
pub(crate) enum View<'a> {
    /// Empty.
    Empty,
    /// A JSON document.
    Json(Value),
    /// Anything else, as text (lossy for non-UTF-8 bytes: token characters are ASCII).
    Text(Cow<'a, str>),
    /// Could not be fully inspected, and why.
    Uninspectable(String),
}

/// Reads `payload` (and a `content-encoding`, if the message names one).
pub(crate) fn view<'a>(payload: &'a [u8], content_encoding: Option<&str>) -> View<'a> {
    match content_encoding.map(|e| e.trim().to_ascii_lowercase()) {
        None => {}
        Some(e) if e.is_empty() || e == "identity" => {}
        Some(e) if (e == "gzip" || e == "x-gzip") && !payload.starts_with(&GZIP) => {
            return View::Uninspectable(format!("content-encoding {e} but not a gzip stream"));
        }
        Some(e) if e == "gzip" || e == "x-gzip" => {}
        Some(e) => return View::Uninspectable(format!("content-encoding {e:?}")),
    }
    if payload.starts_with(&GZIP) {
        return match inflate(payload) {
            Ok(inner) if inner.starts_with(&GZIP) => View::Uninspectable("nested gzip".to_string()),
            Ok(inner) => match view_plain(&inner) {
                View::Empty => View::Empty,
                View::Json(v) => View::Json(v),
                View::Text(t) => View::Text(Cow::Owned(t.into_owned())),
                View::Uninspectable(why) => View::Uninspectable(format!("gzip: {why}")),
            },
            Err(why) => View::Uninspectable(why),
        };
    }
    if let Some(kind) = OTHER_COMPRESSION
        .iter()
        .find(|(magic, _)| payload.starts_with(magic))
        .map(|(_, kind)| kind)
    {
        return View::Uninspectable(format!("{kind}-compressed payload"));
    }
    view_plain(payload)
}

const GZIP: [u8; 2] = [0x1f, 0x8b];

const OTHER_COMPRESSION: [(&[u8], &str); 4] = [
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
    (b"BZh", "bzip2"),
    (&[0x04, 0x22, 0x4d, 0x18], "lz4"),
];

fn inflate(payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut reader = flate2::read::MultiGzDecoder::new(payload).take(MAX_INFLATED + 1);
    reader
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip stream does not inflate: {e}"))?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(format!("gzip payload inflates beyond {MAX_INFLATED} bytes"));
    }
    Ok(out)
}

fn view_plain(payload: &[u8]) -> View<'_> {
    let bom_utf8 = [0xef, 0xbb, 0xbf];
    let text: Cow<'_, str> = if let Some(rest) = payload.strip_prefix(&bom_utf8) {
        String::from_utf8_lossy(rest)
    } else if let Some((enc, by_bom)) = wide_encoding(payload) {
        match decode_wide(payload, enc) {
            // Text in a wide encoding may hide ASCII tokens in its raw bytes
            // too: the scan sees both readings (JSON has no such raw reading).
            Ok(wide) if starts_json(&wide) => Cow::Owned(wide),
            Ok(wide) => Cow::Owned(format!("{wide}\u{0}{}", String::from_utf8_lossy(payload))),
            Err(why) if !by_bom => return View::Uninspectable(why),
            Err(_) => String::from_utf8_lossy(payload),
        }
    } else {
        // Other bytes are read lossily: a token is ASCII, so invalid bytes
        // around one hide nothing.
        String::from_utf8_lossy(payload)
    };
    if !starts_json(&text) {
        return if payload.is_empty() {
            View::Empty
        } else {
            View::Text(text)
        };
    }
    let body = text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    match serde_json::from_str::<Value>(body) {
        Ok(v) => View::Json(v),
        Err(e) if e.to_string().contains("recursion limit") => {
            View::Uninspectable("JSON nested deeper than 128 levels".to_string())
        }
        Err(e) => View::Uninspectable(format!("JSON that does not parse: {e}")),
    }
}

/// Whether the first significant character opens a JSON object or array.
fn starts_json(text: &str) -> bool {
    text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}')
        .starts_with(['{', '['])
}

#[derive(Clone, Copy, Debug)]
enum Wide {
    Utf16Le,
    Utf16Be,
    Utf32Le,
    Utf32Be,
}

/// UTF-16/32 by BOM (`true`), or without one by the NUL pattern of the
/// first four bytes that RFC 4627 §3 gives for JSON text (`false`; only when
/// the ASCII character it shows opens JSON, so binary data with NULs is not
/// mistaken for wide text).
fn wide_encoding(p: &[u8]) -> Option<(Wide, bool)> {
    let json = |b: u8| matches!(b, b'{' | b'[' | b' ' | b'\t' | b'\r' | b'\n');
    match p {
        [0xff, 0xfe, 0, 0, ..] => Some((Wide::Utf32Le, true)),
        [0, 0, 0xfe, 0xff, ..] => Some((Wide::Utf32Be, true)),
        [0xff, 0xfe, ..] => Some((Wide::Utf16Le, true)),
        [0xfe, 0xff, ..] => Some((Wide::Utf16Be, true)),
        [0, 0, 0, a, ..] if json(*a) => Some((Wide::Utf32Be, false)),
        [a, 0, 0, 0, ..] if json(*a) => Some((Wide::Utf32Le, false)),
        [0, a, 0, b, ..] if json(*a) && *b != 0 => Some((Wide::Utf16Be, false)),
        [a, 0, b, 0, ..] if json(*a) && *b != 0 => Some((Wide::Utf16Le, false)),
        _ => None,
    }
}

fn decode_wide(p: &[u8], enc: Wide) -> Result<String, String> {
    let bad = || format!("invalid {enc:?} text");
    match enc {
        Wide::Utf16Le | Wide::Utf16Be => {
            if !p.len().is_multiple_of(2) {
                return Err(bad());
            }
            let units = p.chunks_exact(2).map(|c| match enc {
                Wide::Utf16Le => u16::from_le_bytes([c[0], c[1]]),
                _ => u16::from_be_bytes([c[0], c[1]]),
            });
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .map(|s| s.trim_start_matches('\u{feff}').to_string())
                .map_err(|_| bad())
        }
        Wide::Utf32Le | Wide::Utf32Be => {
            if !p.len().is_multiple_of(4) {
                return Err(bad());
            }
            p.chunks_exact(4)
                .map(|c| {
                    let b = [c[0], c[1], c[2], c[3]];
                    let u = match enc {
                        Wide::Utf32Le => u32::from_le_bytes(b),
                        _ => u32::from_be_bytes(b),
                    };
                    char::from_u32(u).ok_or_else(bad)
                })
                .collect::<Result<String, _>>()
                .map(|s| s.trim_start_matches('\u{feff}').to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uninspectable(p: &[u8]) -> bool {
        matches!(view(p, None), View::Uninspectable(_))
    }

    #[test]
    fn bom_and_wide_json_are_read() {
        let mut p = vec![0xef, 0xbb, 0xbf];
        p.extend_from_slice(br#"{"access_token":"x"}"#);
        assert!(matches!(view(&p, None), View::Json(_)));
        let utf16: Vec<u8> = "\u{feff}{\"a\":1}"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert!(matches!(view(&utf16, None), View::Json(_)));
        let utf16be_nobom: Vec<u8> = "{\"a\":1}"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        assert!(matches!(view(&utf16be_nobom, None), View::Json(_)));
        let utf32: Vec<u8> = "[1]"
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        assert!(matches!(view(&utf32, None), View::Json(_)));
    }

    #[test]
    fn what_cannot_be_read_is_uninspectable() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(uninspectable(deep.as_bytes()));
        assert!(uninspectable(br#"{"a": "#));
        assert!(uninspectable(br#"{"a":1} trailing"#));
        assert!(uninspectable(b"{\xff\xfe}"));
        assert!(uninspectable(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2]));
        assert!(uninspectable(&[0x1f, 0x8b, 0, 0]));
        assert!(matches!(view(b"{}", Some("br")), View::Uninspectable(_)));
        assert!(matches!(view(b"plain text", None), View::Text(_)));
        assert!(matches!(view(b"", None), View::Empty));
    }

    #[test]
    fn gzip_is_inflated_and_bounded() {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(br#"{"access_token":"x"}"#).unwrap();
        let gz = e.finish().unwrap();
        assert!(matches!(view(&gz, Some("gzip")), View::Json(_)));
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![b' '; (MAX_INFLATED + 10) as usize];
        e.write_all(&zeros).unwrap();
        let bomb = e.finish().unwrap();
        assert!(uninspectable(&bomb));
    }
}
