//! What a wrong configuration gets: an error that names the file (or the
//! environment variable), the key, what is wrong and what to do.

use std::fmt;

/// What kind of mistake a [`ConfigError`] reports (tests and tools match on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file cannot be read or is not TOML.
    Syntax,
    /// A key the schema does not know (often a typo).
    UnknownKey,
    /// A required key is absent.
    Missing,
    /// A value of the wrong type or out of range.
    Invalid,
    /// A file the configuration names cannot be read.
    File,
    /// A key file holds no usable key.
    Key,
    /// A signing key belongs to another workload.
    KeyOwner,
    /// A JWKS that does not parse or holds an unusable key.
    Jwks,
    /// No producer is trusted: every reference would be denied.
    NoTrust,
    /// The policy bundle does not load.
    Policy,
    /// A dependency the configuration names cannot be used (Redis, the TTS client).
    Dependency,
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// What kind of mistake.
    pub kind: ErrorKind,
    /// The configuration file, or the environment variable, the value came from.
    pub origin: String,
    /// The key, dotted (`tts.url`, `keys.files`); empty for the whole file.
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

impl ConfigError {
    /// An error of `kind` at `key` in `origin`.
    pub fn new(
        kind: ErrorKind,
        origin: impl Into<String>,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        ConfigError {
            kind,
            origin: origin.into(),
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.problem)?;
        } else {
            write!(f, "{}: `{}`: {}", self.origin, self.key, self.problem)?;
        }
        if !self.fix.is_empty() {
            write!(f, " ({})", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// Maps figment's error (which knows the source and the key path).
    pub(crate) fn from_figment(e: figment::Error, file: &str) -> Self {
        use figment::error::Kind;
        let origin = e
            .metadata
            .as_ref()
            .map(|m| match &m.source {
                Some(figment::Source::File(p)) => p.display().to_string(),
                Some(other) => format!("{} {other}", m.name),
                None => m.name.to_string(),
            })
            .unwrap_or_else(|| file.to_string());
        let key = e.path.join(".");
        let (kind, problem, fix) = match &e.kind {
            Kind::UnknownField(field, expected) => (
                ErrorKind::UnknownKey,
                format!("unknown key `{field}`"),
                format!(
                    "remove it or use one of: {}",
                    expected
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Kind::MissingField(field) => (
                ErrorKind::Missing,
                format!("`{field}` is required"),
                "add it (see config/elevate.example.toml)".to_string(),
            ),
            Kind::InvalidType(actual, expected) => (
                ErrorKind::Invalid,
                format!("found {actual}, expected {expected}"),
                "fix the value's type".to_string(),
            ),
            Kind::Message(m) if m.contains("TOML") || m.contains("parse") => (
                ErrorKind::Syntax,
                m.clone(),
                "fix the TOML syntax".to_string(),
            ),
            other => (
                ErrorKind::Invalid,
                other.to_string(),
                "see config/elevate.example.toml".to_string(),
            ),
        };
        // figment's path ends with the offending field when it knows it.
        let key = match (&e.kind, key.is_empty()) {
            (Kind::UnknownField(field, _), true) => field.clone(),
            (Kind::MissingField(field), true) => field.to_string(),
            _ => key,
        };
        ConfigError::new(kind, origin, key, problem, fix)
    }
}
