//! The bundle archive: one `tar.gz` holding the Cedar bundle files (every
//! `*.cedar`, one `*.cedarschema`, `entities.json`) and `.manifest.jws`, a
//! compact JWS (`typ: bundle-manifest+jwt`) whose payload is the
//! [`Manifest`]: every file with its SHA-256 and size, the revision and the
//! creation time. The bundle's version is the SHA-256 of that payload, so a
//! version names exactly one signed set of files.
//!
//! Opening an archive ([`open`]) fails closed on anything it cannot vouch
//! for: sizes and entry counts are bounded before anything is decompressed
//! further, only flat regular files are read (no directories, links or
//! `..`), the manifest must verify against a trusted bundle-signing key, and
//! the archive must hold exactly the manifest's files with their digests.

use std::io::Read;

use elevate_core::jws::{self, JwsError};
use elevate_core::keys::{KeySet, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of the signed manifest inside an archive.
pub const MANIFEST_NAME: &str = ".manifest.jws";
/// The manifest JWS's `typ`.
pub const MANIFEST_TYP: &str = "bundle-manifest+jwt";
/// Largest compressed archive accepted.
pub const MAX_ARCHIVE_BYTES: usize = 8 * 1024 * 1024;
/// Largest total of uncompressed entry bytes accepted (a gzip bomb stops here).
pub const MAX_UNPACKED_BYTES: u64 = 32 * 1024 * 1024;
/// Most files a bundle may hold (besides the manifest).
pub const MAX_FILES: usize = 64;

/// One file of a bundle as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Its name (flat: no directories).
    pub name: String,
    /// SHA-256 of its bytes (hex).
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What a bundle-signing key vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The bundle's name (for operators; not checked).
    #[serde(default)]
    pub bundle: String,
    /// Monotonic revision: a PDP refuses a lower one than it runs.
    pub revision: u64,
    /// Creation time (Unix seconds).
    pub created: i64,
    /// Every file of the bundle, sorted by name.
    pub files: Vec<ManifestFile>,
}

/// A verified archive: its manifest, version and files.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The manifest.
    pub manifest: Manifest,
    /// SHA-256 (hex) of the manifest payload: the bundle's version.
    pub manifest_sha256: String,
    /// `kid` of the key that signed it.
    pub signed_by: String,
    /// The bundle files (name, bytes), sorted by name.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Why an archive was refused (the PDP keeps the bundle in force).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// Larger than [`MAX_ARCHIVE_BYTES`] or [`MAX_UNPACKED_BYTES`].
    #[error("bundle archive too large: {0}")]
    TooLarge(String),
    /// Not a readable gzip'd tar.
    #[error("not a bundle archive (tar.gz): {0}")]
    Unreadable(String),
    /// An entry that is not a flat regular file, or a name given twice.
    #[error("bundle archive entry {name:?} refused: {why}")]
    Entry {
        /// The entry's name as stored.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// More than [`MAX_FILES`] files.
    #[error("bundle archive holds more than {MAX_FILES} files")]
    TooManyFiles,
    /// No `.manifest.jws`: an unsigned archive.
    #[error("unsigned bundle: no {MANIFEST_NAME} in the archive")]
    Unsigned,
    /// The manifest's signature does not verify (unknown key, bad signature, wrong typ...).
    #[error("bundle manifest signature: {0}")]
    Signature(#[from] JwsError),
    /// The manifest's payload is not a manifest.
    #[error("bundle manifest: {0}")]
    Manifest(String),
    /// A file the manifest lists is not in the archive.
    #[error("bundle file {0} listed in the manifest is missing")]
    Missing(String),
    /// A file in the archive the manifest does not list.
    #[error("bundle file {0} is not in the manifest")]
    Unlisted(String),
    /// A file whose bytes do not match the manifest.
    #[error("bundle file {name} does not match the manifest ({what})")]
    Digest {
        /// The file.
        name: String,
        /// `sha256` or `size`.
        what: &'static str,
    },
}

/// SHA-256 (hex) of `bytes`.
fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A flat, printable file name: no directory part, no `.`/`..`, no control characters.
fn flat_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

/// Builds a signed archive of `files` (name, bytes) at `revision`, signed by `key`.
///
/// # Errors
/// [`ArchiveError::Entry`] for a name that is not flat or is given twice,
/// [`ArchiveError::TooManyFiles`], and [`ArchiveError::Signature`] if the
/// manifest cannot be signed.
pub fn build(
    bundle: &str,
    revision: u64,
    created: i64,
    files: &[(String, Vec<u8>)],
    key: &SigningKey,
) -> Result<Vec<u8>, ArchiveError> {
    if files.len() > MAX_FILES {
        return Err(ArchiveError::TooManyFiles);
    }
    let mut sorted: Vec<&(String, Vec<u8>)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for w in sorted.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(ArchiveError::Entry {
                name: w[0].0.clone(),
                why: "given twice",
            });
        }
    }
    for (name, _) in &sorted {
        if !flat_name(name) || name == MANIFEST_NAME {
            return Err(ArchiveError::Entry {
                name: name.clone(),
                why: "not a flat file name",
            });
        }
    }
    let manifest = Manifest {
        bundle: bundle.to_string(),
        revision,
        created,
        files: sorted
            .iter()
            .map(|(name, bytes)| ManifestFile {
                name: name.clone(),
                sha256: sha256(bytes),
                size: bytes.len() as u64,
            })
            .collect(),
    };
    let jws = jws::sign(key, MANIFEST_TYP, &manifest)?;
    let mut out = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mut entries: Vec<(&str, &[u8])> = vec![(MANIFEST_NAME, jws.as_bytes())];
        entries.extend(sorted.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
        for (name, bytes) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, bytes)
                .map_err(|e| ArchiveError::Unreadable(e.to_string()))?;
        }
        tar.into_inner()
            .and_then(flate2::write::GzEncoder::finish)
            .map_err(|e| ArchiveError::Unreadable(e.to_string()))?;
    }
    Ok(out)
}

/// Reads an archive's entries within the bounds: (name, bytes) of each flat regular file.
fn entries(archive: &[u8]) -> Result<Vec<(String, Vec<u8>)>, ArchiveError> {
    if archive.len() > MAX_ARCHIVE_BYTES {
        return Err(ArchiveError::TooLarge(format!(
            "{} bytes compressed (at most {MAX_ARCHIVE_BYTES})",
            archive.len()
        )));
    }
    let gz = flate2::read::GzDecoder::new(archive);
    // One byte over the bound tells a bomb from an archive that fits.
    let mut tar = tar::Archive::new(gz.take(MAX_UNPACKED_BYTES + 1));
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut total: u64 = 0;
    let unreadable = |e: std::io::Error| ArchiveError::Unreadable(e.to_string());
    for entry in tar.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(ArchiveError::Entry {
                name,
                why: "not a regular file (directories, links and devices are refused)",
            });
        }
        if !flat_name(&name) {
            return Err(ArchiveError::Entry {
                name,
                why: "not a flat file name",
            });
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(ArchiveError::Entry {
                name,
                why: "given twice",
            });
        }
        if out.len() > MAX_FILES {
            return Err(ArchiveError::TooManyFiles);
        }
        let size = entry.header().size().map_err(unreadable)?;
        total = total.saturating_add(size);
        if total > MAX_UNPACKED_BYTES {
            return Err(ArchiveError::TooLarge(format!(
                "more than {MAX_UNPACKED_BYTES} bytes unpacked"
            )));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 20));
        entry.read_to_end(&mut bytes).map_err(unreadable)?;
        if bytes.len() as u64 != size {
            return Err(ArchiveError::Unreadable(format!("{name}: truncated entry")));
        }
        out.push((name, bytes));
    }
    Ok(out)
}

/// Opens and verifies an archive: bounded unpacking, the manifest signed by
/// one of `signers`, and exactly the manifest's files with their digests.
/// The files are not yet validated as a Cedar bundle (schema, policies):
/// that is [`elevate_cedar::Bundle::from_files`].
///
/// # Errors
/// An [`ArchiveError`] saying what could not be vouched for.
pub fn open(archive: &[u8], signers: &KeySet) -> Result<Opened, ArchiveError> {
    let mut files = entries(archive)?;
    let at = files
        .iter()
        .position(|(n, _)| n == MANIFEST_NAME)
        .ok_or(ArchiveError::Unsigned)?;
    let (_, jws_bytes) = files.remove(at);
    let token = std::str::from_utf8(&jws_bytes)
        .map_err(|_| ArchiveError::Manifest("the manifest is not UTF-8".into()))?
        .trim();
    let parsed = jws::parse(token, MANIFEST_TYP)?;
    parsed.verify(signers)?;
    let manifest: Manifest = serde_json::from_slice(&parsed.payload)
        .map_err(|e| ArchiveError::Manifest(e.to_string()))?;
    let manifest_sha256 = sha256(&parsed.payload);
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for listed in &manifest.files {
        let Some((_, bytes)) = files.iter().find(|(n, _)| *n == listed.name) else {
            return Err(ArchiveError::Missing(listed.name.clone()));
        };
        if bytes.len() as u64 != listed.size {
            return Err(ArchiveError::Digest {
                name: listed.name.clone(),
                what: "size",
            });
        }
        if sha256(bytes) != listed.sha256.to_ascii_lowercase() {
            return Err(ArchiveError::Digest {
                name: listed.name.clone(),
                what: "sha256",
            });
        }
    }
    if let Some((name, _)) = files
        .iter()
        .find(|(n, _)| !manifest.files.iter().any(|f| f.name == *n))
    {
        return Err(ArchiveError::Unlisted(name.clone()));
    }
    Ok(Opened {
        manifest,
        manifest_sha256,
        signed_by: parsed.header.kid.clone().unwrap_or_default(),
        files,
    })
}

/// Reads a signed archive's manifest without verifying anything (for
/// `elevate-bundle inspect` on an archive whose signer is not at hand).
///
/// # Errors
/// [`ArchiveError`] when the archive or its manifest cannot be read.
pub fn peek(archive: &[u8]) -> Result<(Manifest, String, Option<String>), ArchiveError> {
    let files = entries(archive)?;
    let (_, jws_bytes) = files
        .iter()
        .find(|(n, _)| n == MANIFEST_NAME)
        .ok_or(ArchiveError::Unsigned)?;
    let token = std::str::from_utf8(jws_bytes)
        .map_err(|_| ArchiveError::Manifest("the manifest is not UTF-8".into()))?
        .trim();
    let parsed = jws::parse(token, MANIFEST_TYP)?;
    let manifest: Manifest = serde_json::from_slice(&parsed.payload)
        .map_err(|e| ArchiveError::Manifest(e.to_string()))?;
    Ok((manifest, sha256(&parsed.payload), parsed.header.kid.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use elevate_core::keys::SigningAlg;

    fn files() -> Vec<(String, Vec<u8>)> {
        vec![
            (
                "b.cedar".into(),
                b"permit(principal, action, resource);".to_vec(),
            ),
            ("entities.json".into(), b"[]".to_vec()),
        ]
    }

    fn signer(kid: &str) -> (SigningKey, KeySet) {
        let key = SigningKey::generate(SigningAlg::ES256, kid).expect("key");
        let mut set = KeySet::new();
        set.insert_signing_key(&key).expect("insert");
        (key, set)
    }

    #[test]
    fn a_built_archive_opens_with_its_signer_only() {
        let (key, keys) = signer("bundles-1");
        let a = build("t", 3, 0, &files(), &key).expect("build");
        let o = open(&a, &keys).expect("open");
        assert_eq!(o.manifest.revision, 3);
        assert_eq!(o.files, files());
        assert_eq!(o.signed_by, "bundles-1");
        let (_, other) = signer("bundles-2");
        assert!(matches!(
            open(&a, &other),
            Err(ArchiveError::Signature(JwsError::UnknownKey(_)))
        ));
        // Another key under the same kid: the signature does not verify.
        let (_, impostor) = signer("bundles-1");
        assert!(matches!(
            open(&a, &impostor),
            Err(ArchiveError::Signature(JwsError::BadSignature))
        ));
        assert!(matches!(
            open(b"not gzip", &keys),
            Err(ArchiveError::Unreadable(_))
        ));
    }

    #[test]
    fn names_that_are_not_flat_are_refused() {
        let (key, _) = signer("bundles-1");
        for bad in ["../x.cedar", "a/b.cedar", ".", MANIFEST_NAME] {
            let f = vec![(bad.to_string(), b"x".to_vec())];
            assert!(
                matches!(build("t", 1, 0, &f, &key), Err(ArchiveError::Entry { .. })),
                "{bad}"
            );
        }
    }
}
