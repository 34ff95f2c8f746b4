//! The logic of `elevate inspect`: decode a reference without trusting it,
//! then verify it (and its message binding) when keys are given.
//!
//! Nothing here keeps a token for printing: references, bindings and the
//! `cnf` JWE appear in the report only by their SHA-256.

use std::io::Read;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use elevate_core::ctxbind::{BindingParts, CTX_BIND_HEADER, ContextOpener, KeyAgreementKey};
use elevate_core::ctxref::{
    CTX_REF_HEADER, CTX_REF_TYP, ContextRefClaims, ContextRefVerifier, VerifyPolicy, unix_now,
};
use elevate_core::jws;
use elevate_core::keys::{KeySet, sha256_b64url, sha256_hex};
use serde::Serialize;

use crate::InspectArgs;

/// Everything `inspect` found, printed as a table or as JSON.
#[derive(Serialize)]
pub struct Report {
    /// `per-message` or `context` (a `cnf` is present).
    pub kind: &'static str,
    /// SHA-256 (hex) of the compact JWS: how logs name it.
    pub reference_sha256: String,
    /// The protected header.
    pub header: HeaderView,
    /// The claims, decoded without trusting them.
    pub claims: ClaimsView,
    /// Workload ids of the chain, origin first, current signer last.
    pub chain: Vec<String>,
    /// Prior hops (`act`), most recent first.
    pub hops: Vec<HopView>,
    /// The `cnf` JWE header of a context reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<JweView>,
    /// The message binding, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<BindingView>,
    /// The payload digest check, when a payload was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadView>,
    /// The verification outcome, when `--jwks` was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

impl Report {
    /// Whether a check that was asked for failed (exit code 1).
    pub fn failed(&self) -> bool {
        self.verification.as_ref().is_some_and(|v| !v.verified)
            || self.payload.as_ref().is_some_and(|p| !p.matches)
    }
}

/// The protected header of the reference.
#[derive(Serialize)]
pub struct HeaderView {
    /// Algorithm.
    pub alg: String,
    /// Key id.
    pub kid: Option<String>,
    /// Media type.
    pub typ: Option<String>,
}

/// The reference's claims, times as RFC 3339.
#[derive(Serialize)]
pub struct ClaimsView {
    /// Signer (workload id).
    pub iss: String,
    /// Subject.
    pub sub: String,
    /// `human` or `workload`.
    pub sub_kind: &'static str,
    /// Audiences.
    pub aud: Vec<String>,
    /// Scope (space-delimited).
    pub scope: String,
    /// Origin transaction id.
    pub txn: String,
    /// Unique id.
    pub jti: String,
    /// Issued at (RFC 3339).
    pub iat: String,
    /// Expiry (RFC 3339).
    pub exp: String,
    /// Whether `exp` has passed now.
    pub expired: bool,
    /// Not before (RFC 3339), when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<String>,
    /// Bound destination (empty in a context reference).
    pub dst: String,
    /// base64url SHA-256 of the payload (empty in a context reference).
    pub dig: String,
    /// Number of prior hops.
    pub depth: u32,
    /// Maximum hops the origin allows.
    pub max_depth: u32,
}

/// One prior hop of the delegation chain (most recent first).
#[derive(Serialize)]
pub struct HopView {
    /// Subject.
    pub sub: String,
    /// Scope (space-delimited).
    pub scope: String,
    /// SHA-256 (hex) of this hop's own reference, when carried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_sha256: Option<String>,
    /// `kid` of this hop's reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_kid: Option<String>,
    /// `iss` of this hop's reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_iss: Option<String>,
    /// Why this hop's reference could not be decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_error: Option<String>,
}

/// The header of the `cnf` JWE (never its ciphertext).
#[derive(Serialize)]
pub struct JweView {
    /// SHA-256 (hex) of the value (never the value itself).
    pub sha256: String,
    /// Algorithm.
    pub alg: Option<String>,
    /// Content encryption.
    pub enc: Option<String>,
    /// Key id.
    pub kid: Option<String>,
}

/// A message binding's claims, decoded (the MAC checked only when verified).
#[derive(Serialize)]
pub struct BindingView {
    /// SHA-256 (hex) of the value (never the value itself).
    pub sha256: String,
    /// base64url SHA-256 of the context reference it binds to.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Whether `ref` names the reference inspected.
    pub ref_matches: bool,
    /// Destination the message was published to.
    pub dst: String,
    /// base64url SHA-256 of the payload.
    pub dig: String,
    /// Unique id of the message (the replay key).
    pub jti: String,
    /// When the message was bound (RFC 3339).
    pub iat: String,
    /// Whether the MAC was part of verification (`--agreement-key`).
    pub mac_checked: bool,
}

/// Whether SHA-256 of the payload file matches the digest.
#[derive(Serialize)]
pub struct PayloadView {
    /// base64url SHA-256 of the payload file.
    pub sha256_b64url: String,
    /// `dig` or `binding dig`.
    pub against: &'static str,
    /// The digest it was compared with.
    pub expected: String,
    /// Whether they are equal.
    pub matches: bool,
}

/// The outcome of verifying with the given keys.
#[derive(Serialize)]
pub struct Verification {
    /// Whether every check made passed.
    pub verified: bool,
    /// The audience verified for.
    pub audience: String,
    /// Reason code of the rejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// What the rejection says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Checks not made for want of input (and which option supplies it).
    pub not_checked: Vec<&'static str>,
}

/// The reference and binding read from the argument or stdin.
struct Input {
    reference: String,
    binding: Option<String>,
}

/// Runs `inspect`.
///
/// # Errors
///
/// A message saying what to do, for usage errors and unreadable input (exit 2).
pub fn run(args: &InspectArgs) -> Result<Report, String> {
    let input = read_input(args)?;
    let token = input.reference.as_str();
    let parsed = jws::parse(token, CTX_REF_TYP).map_err(|e| {
        format!(
            "not a context reference ({e}); pass the value of the {CTX_REF_HEADER} header, \
             or a dead letter's headers as a JSON object on stdin"
        )
    })?;
    let claims: ContextRefClaims = parsed
        .claims()
        .map_err(|e| format!("the reference's claims cannot be read ({e})"))?;
    let payload = match &args.payload {
        Some(p) => Some(std::fs::read(p).map_err(|e| {
            format!(
                "cannot read payload file {}: {e}; pass the message body as a file",
                p.display()
            )
        })?),
        None => None,
    };
    let binding = match &input.binding {
        Some(b) => Some(decode_binding(b, token)?),
        None => None,
    };
    let now = unix_now();
    let mut report = Report {
        kind: if claims.cnf.is_some() {
            "context"
        } else {
            "per-message"
        },
        reference_sha256: sha256_hex(token.as_bytes()),
        header: HeaderView {
            alg: parsed.header.alg.clone(),
            kid: parsed.header.kid.clone(),
            typ: parsed.header.typ.clone(),
        },
        claims: claims_view(&claims, now),
        chain: claims.chain(),
        hops: hops(&claims),
        cnf: claims.cnf.as_ref().map(|c| jwe_view(&c.jwe)),
        binding,
        payload: None,
        verification: None,
    };
    if let Some(body) = &payload {
        let (against, expected) = match &report.binding {
            Some(b) => ("binding dig", b.dig.clone()),
            None => ("dig", claims.dig.clone()),
        };
        let actual = sha256_b64url(body);
        report.payload = Some(PayloadView {
            matches: actual == expected,
            sha256_b64url: actual,
            against,
            expected,
        });
    }
    if let Some(jwks) = &args.jwks {
        let (verification, binding_checked) =
            verify(args, jwks, &input, &claims, payload.as_deref(), now)?;
        if let Some(b) = report.binding.as_mut() {
            b.mac_checked = binding_checked;
        }
        report.verification = Some(verification);
    } else if args.audience.is_some() {
        return Err("--audience needs --jwks FILE (the workload key directory)".into());
    }
    Ok(report)
}

fn read_input(args: &InspectArgs) -> Result<Input, String> {
    let raw = match args.reference.as_deref() {
        Some(r) if r != "-" => r.to_string(),
        _ => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| {
                format!("cannot read stdin ({e}); pass the reference as an argument")
            })?;
            s
        }
    };
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(format!(
            "no reference given; pass the {CTX_REF_HEADER} value as an argument or on stdin"
        ));
    }
    let mut input = if raw.starts_with('{') {
        let doc: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw)
            .map_err(|e| format!("stdin is not a JSON object of headers ({e})"))?;
        let header = |name: &str| -> Result<Option<String>, String> {
            match doc.get(name) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.trim().to_string())),
                Some(_) => Err(format!("header {name} is not a string")),
            }
        };
        Input {
            reference: header(CTX_REF_HEADER)?.ok_or_else(|| {
                format!("the headers have no {CTX_REF_HEADER}: nothing to inspect")
            })?,
            binding: header(CTX_BIND_HEADER)?,
        }
    } else {
        Input {
            reference: raw.to_string(),
            binding: None,
        }
    };
    if let Some(b) = &args.binding {
        input.binding = Some(b.trim().to_string());
    }
    Ok(input)
}

fn rfc3339(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => {
            humantime::format_rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
                .to_string()
        }
        Err(_) => format!("{secs} (before the epoch)"),
    }
}

fn claims_view(c: &ContextRefClaims, now: i64) -> ClaimsView {
    ClaimsView {
        iss: c.iss.clone(),
        sub: c.sub.clone(),
        sub_kind: c.sub_kind.as_str(),
        aud: c.aud.clone(),
        scope: c.scope.clone(),
        txn: c.txn.clone(),
        jti: c.jti.clone(),
        iat: rfc3339(c.iat),
        exp: rfc3339(c.exp),
        expired: c.exp <= now,
        nbf: c.nbf.map(rfc3339),
        dst: c.dst.clone(),
        dig: c.dig.clone(),
        depth: c.depth,
        max_depth: c.max_depth,
    }
}

fn hops(c: &ContextRefClaims) -> Vec<HopView> {
    let Some(act) = &c.act else { return Vec::new() };
    act.iter()
        .map(|a| {
            let mut hop = HopView {
                sub: a.sub.clone(),
                scope: a.scope.clone(),
                ref_sha256: None,
                ref_kid: None,
                ref_iss: None,
                ref_error: None,
            };
            if let Some(r) = &a.reference {
                hop.ref_sha256 = Some(sha256_hex(r.as_bytes()));
                match jws::parse(r, CTX_REF_TYP) {
                    Ok(p) => {
                        hop.ref_kid = p.header.kid.clone();
                        match p.claims::<ContextRefClaims>() {
                            Ok(rc) => hop.ref_iss = Some(rc.iss),
                            Err(e) => hop.ref_error = Some(e.to_string()),
                        }
                    }
                    Err(e) => hop.ref_error = Some(e.to_string()),
                }
            }
            hop
        })
        .collect()
}

fn jwe_view(jwe: &str) -> JweView {
    let header: Option<serde_json::Value> = jwe
        .split('.')
        .next()
        .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let field = |name: &str| {
        header
            .as_ref()
            .and_then(|h| h.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    JweView {
        sha256: sha256_hex(jwe.as_bytes()),
        alg: field("alg"),
        enc: field("enc"),
        kid: field("kid"),
    }
}

fn decode_binding(binding: &str, token: &str) -> Result<BindingView, String> {
    let bad = |why: String| {
        format!(
            "the {CTX_BIND_HEADER} value is not a message binding ({why}); pass the header's value"
        )
    };
    let claims = BindingParts::split(binding)
        .and_then(|p| p.claims_unverified())
        .map_err(|e| bad(e.to_string()))?;
    Ok(BindingView {
        sha256: sha256_hex(binding.as_bytes()),
        ref_matches: claims.reference == sha256_b64url(token.as_bytes()),
        reference: claims.reference,
        dst: claims.dst,
        dig: claims.dig,
        jti: claims.jti,
        iat: rfc3339(claims.iat),
        mac_checked: false,
    })
}

fn verify(
    args: &InspectArgs,
    jwks: &Path,
    input: &Input,
    claims: &ContextRefClaims,
    payload: Option<&[u8]>,
    now: i64,
) -> Result<(Verification, bool), String> {
    let audience = args
        .audience
        .clone()
        .ok_or("--jwks needs --audience ID (the consumer's workload id)")?;
    let text = std::fs::read_to_string(jwks)
        .map_err(|e| format!("cannot read JWKS file {}: {e}", jwks.display()))?;
    let keys = KeySet::from_workload_jwks_json(&text).map_err(|e| {
        format!(
            "{} is not a workload JWKS ({e}); use the key directory's document",
            jwks.display()
        )
    })?;
    let mut verifier = ContextRefVerifier::new(keys, VerifyPolicy::new(audience.clone()));
    let mut not_checked = Vec::new();
    let token = input.reference.as_str();
    let mut binding_checked = false;
    let result = if claims.cnf.is_some() {
        match (&input.binding, &args.agreement_key, payload) {
            (Some(binding), Some(pem), Some(body)) => {
                let kid = pem
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .ok_or("the agreement key's file name gives no kid (its stem)")?;
                let key = KeyAgreementKey::from_pem_file(kid, pem).map_err(|e| {
                    format!(
                        "cannot load agreement key {}: {e}; pass a PKCS#8 PEM",
                        pem.display()
                    )
                })?;
                verifier = verifier.with_context_opener(ContextOpener::new([key]));
                let dst = destination(args, &mut not_checked, || {
                    decode_binding(binding, token)
                        .map(|b| b.dst)
                        .unwrap_or_default()
                });
                binding_checked = true;
                verifier.verify_message_at(token, Some(binding), &dst, body, now)
            }
            (binding, key, body) => {
                if binding.is_none() {
                    not_checked.push("binding (pass --binding or the dead letter's headers)");
                } else if key.is_none() {
                    not_checked.push("binding MAC (pass --agreement-key PEM)");
                } else if body.is_none() {
                    not_checked.push("binding (pass --payload FILE)");
                }
                not_checked.push("destination");
                not_checked.push("payload digest");
                verifier.verify_unbound(token, &audience)
            }
        }
    } else if let Some(body) = payload {
        let dst = destination(args, &mut not_checked, || claims.dst.clone());
        verifier.verify_message_at(token, None, &dst, body, now)
    } else {
        not_checked.push("destination");
        not_checked.push("payload digest (pass --payload FILE)");
        verifier.verify_unbound(token, &audience)
    };
    let verification = match result {
        Ok(_) => Verification {
            verified: true,
            audience,
            reason: None,
            message: None,
            not_checked,
        },
        Err(e) => Verification {
            verified: false,
            audience,
            reason: Some(e.reason().code()),
            message: Some(e.to_string()),
            not_checked,
        },
    };
    Ok((verification, binding_checked))
}

/// The destination to verify against: `--destination`, else the claimed one (noted as unchecked).
fn destination(
    args: &InspectArgs,
    not_checked: &mut Vec<&'static str>,
    claimed: impl FnOnce() -> String,
) -> String {
    match &args.destination {
        Some(d) => d.clone(),
        None => {
            not_checked.push("destination (pass --destination D)");
            claimed()
        }
    }
}
