//! Wire names and messages of the Txn-Token exchange: the RFC 8693 profile of
//! draft-ietf-oauth-transaction-tokens, RFC 7523 client assertions and the
//! RFC 6749 §5.2 error codes.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// `grant_type` of an RFC 8693 token exchange.
pub const GRANT_TYPE_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// `requested_token_type` / `issued_token_type` of a Txn-Token.
pub const TOKEN_TYPE_TXN_TOKEN: &str = "urn:ietf:params:oauth:token-type:txn_token";
/// `subject_token_type` of a JWT subject token (the context reference).
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// `subject_token_type` of a user's OAuth access token (the entry flow).
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// `client_assertion_type` of an RFC 7523 JWT client assertion.
pub const CLIENT_ASSERTION_TYPE_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// `token_type` of a Txn-Token response: it is not an access token.
pub const TOKEN_TYPE_NA: &str = "N_A";
/// The HTTP header that carries a Txn-Token between workloads.
pub const TXN_TOKEN_HEADER: &str = "txn-token";
/// Path of the published key set.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// Path of the trust domain's workload key directory: every registered
/// workload's public keys, each with its owner
/// (`elevate_core::keys::directory`).
pub const WORKLOAD_JWKS_PATH: &str = "/.well-known/workload-jwks";
/// Default token endpoint path.
pub const DEFAULT_TOKEN_PATH: &str = "/token";

/// How a client authenticates at the token endpoint, by its name in the
/// OAuth Token Endpoint Authentication Methods registry. The TTS accepts
/// exactly one per request (RFC 6749 §2.3), and each workload only the
/// methods its registry entry allows (`private_key_jwt` unless it opts in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClientAuthMethod {
    /// RFC 7523 §2.2: a JWT client assertion signed with the workload's key,
    /// sent as `client_assertion` in the body.
    #[default]
    PrivateKeyJwt,
    /// RFC 8705 §2.1.2: the workload's X.509 certificate on the TLS
    /// connection (PKI: a certificate chain to a CA the TTS trusts, whose URI
    /// SAN is the workload id, as in a SPIFFE X.509-SVID); no assertion.
    TlsClientAuth,
}

impl ClientAuthMethod {
    /// The registry name (`private_key_jwt`, `tls_client_auth`).
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuthMethod::PrivateKeyJwt => "private_key_jwt",
            ClientAuthMethod::TlsClientAuth => "tls_client_auth",
        }
    }

    /// The method a registry name stands for (exact, lower case), if supported.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "private_key_jwt" => Some(ClientAuthMethod::PrivateKeyJwt),
            "tls_client_auth" => Some(ClientAuthMethod::TlsClientAuth),
            _ => None,
        }
    }
}

impl std::fmt::Display for ClientAuthMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// OAuth error codes the token endpoint returns (RFC 6749 §5.2, RFC 8693 §2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Missing, repeated or malformed parameter.
    InvalidRequest,
    /// Client authentication failed (HTTP 401).
    InvalidClient,
    /// The subject token is invalid, expired or not for this client.
    InvalidGrant,
    /// The client may not use this grant.
    UnauthorizedClient,
    /// Not a token exchange.
    UnsupportedGrantType,
    /// Unknown scope, or scope beyond what the subject or the registry allows.
    InvalidScope,
    /// The requested audience is not this trust domain.
    InvalidTarget,
    /// The service failed internally (HTTP 500).
    ServerError,
}

impl ErrorCode {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::UnauthorizedClient => "unauthorized_client",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::InvalidTarget => "invalid_target",
            ErrorCode::ServerError => "server_error",
        }
    }

    /// The HTTP status the token endpoint answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidClient => 401,
            ErrorCode::ServerError => 500,
            _ => 400,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest `error_description` the token endpoint sends, in characters; a
/// longer one is cut and ends with `...` (descriptions may quote request values).
pub const MAX_DESCRIPTION_LEN: usize = 256;

/// True for the characters RFC 6749 §5.2 allows in `error_description`:
/// `%x20-21 / %x23-5B / %x5D-7E` (printable ASCII without `"` and `\`).
pub fn is_description_char(c: char) -> bool {
    matches!(c, '\x20'..='\x21' | '\x23'..='\x5B' | '\x5D'..='\x7E')
}

/// Maps any text onto the RFC 6749 §5.2 `error_description` character set:
/// `"` becomes `'`, `\` becomes `/`, whitespace controls become a space, any
/// other character outside the set becomes `?`; the result is at most
/// [`MAX_DESCRIPTION_LEN`] characters. Descriptions quote values taken from
/// the request (an audience, a scope, a parameter name), often through `{:?}`,
/// which adds quotes and backslash escapes: every description passes here.
pub fn sanitize_description(text: &str) -> String {
    let mapped = text.chars().map(|c| match c {
        '"' => '\'',
        '\\' => '/',
        '\t' | '\n' | '\r' => ' ',
        c if is_description_char(c) => c,
        _ => '?',
    });
    let mut out: String = mapped.clone().take(MAX_DESCRIPTION_LEN + 1).collect();
    if out.chars().count() > MAX_DESCRIPTION_LEN {
        out = mapped.take(MAX_DESCRIPTION_LEN - 3).collect();
        out.push_str("...");
    }
    out
}

/// A refusal by the token endpoint: code plus a human-readable description.
///
/// The only way to build one is [`OAuthError::new`], which passes the
/// description through [`sanitize_description`]: whatever a refusal quotes,
/// the `error_description` sent on the wire stays within RFC 6749 §5.2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {description}")]
pub struct OAuthError {
    /// The error code.
    pub code: ErrorCode,
    /// `error_description` (sanitized; never contains a token).
    description: String,
}

impl OAuthError {
    /// Builds an error; `description` is sanitized ([`sanitize_description`]).
    pub fn new(code: ErrorCode, description: impl AsRef<str>) -> Self {
        OAuthError {
            code,
            description: sanitize_description(description.as_ref()),
        }
    }

    /// The sanitized `error_description`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The RFC 6749 §5.2 JSON body.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.code.as_str().to_string(),
            error_description: Some(self.description.clone()),
        }
    }
}

/// RFC 6749 §5.2 error response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error code.
    pub error: String,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

/// Successful token exchange response (RFC 8693 §2.2.1 as the draft profiles it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The Txn-Token.
    pub access_token: String,
    /// Always the txn_token URN.
    pub issued_token_type: String,
    /// Always `N_A`.
    pub token_type: String,
    /// Lifetime in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
    /// Granted scope, when it differs from the request (it never does here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Must be absent: a Txn-Token is never refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field(
                "access_token_sha256",
                &elevate_core::keys::sha256_hex(self.access_token.as_bytes()),
            )
            .field("issued_token_type", &self.issued_token_type)
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// The parameters of a Txn-Token request, as sent or as received.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExchangeForm {
    params: HashMap<String, String>,
}

impl std::fmt::Debug for ExchangeForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.params.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("ExchangeForm")
            .field("params", &names)
            .finish_non_exhaustive()
    }
}

impl ExchangeForm {
    /// An empty form.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a form from decoded `application/x-www-form-urlencoded` pairs;
    /// a repeated parameter is `invalid_request` (RFC 6749 §3.2).
    ///
    /// # Errors
    ///
    /// Returns an [`OAuthError`] with [`ErrorCode::InvalidRequest`] if a parameter is repeated.
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Result<Self, OAuthError> {
        let mut params = HashMap::with_capacity(pairs.len());
        for (k, v) in pairs {
            if params.contains_key(&k) {
                return Err(OAuthError::new(
                    ErrorCode::InvalidRequest,
                    format!("parameter {k:?} repeated"),
                ));
            }
            params.insert(k, v);
        }
        Ok(ExchangeForm { params })
    }

    /// Builds a form from an `application/x-www-form-urlencoded` body
    /// (RFC 6749 Appendix B); a repeated parameter is `invalid_request`.
    ///
    /// # Errors
    ///
    /// Returns an [`OAuthError`] with [`ErrorCode::InvalidRequest`] if a parameter is repeated.
    pub fn from_urlencoded(body: &[u8]) -> Result<Self, OAuthError> {
        Self::from_pairs(form_urlencoded::parse(body).into_owned().collect())
    }

    /// Sets a parameter.
    pub fn set(mut self, name: &str, value: impl Into<String>) -> Self {
        self.params.insert(name.to_string(), value.into());
        self
    }

    /// A parameter; empty values count as absent (RFC 6749 §3.1).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A required parameter, or `invalid_request` naming it.
    ///
    /// # Errors
    ///
    /// Returns an [`OAuthError`] with [`ErrorCode::InvalidRequest`] naming `name` if the form does
    /// not have it.
    pub fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name).ok_or_else(|| {
            OAuthError::new(
                ErrorCode::InvalidRequest,
                format!("missing parameter {name}"),
            )
        })
    }

    /// The pairs, for sending.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Checks a token request's `Content-Type`: it must be
/// `application/x-www-form-urlencoded` (RFC 6749 §3.2), compared
/// case-insensitively as RFC 9110 §8.3.1 requires for type, subtype and
/// parameter names, with no `charset` or `charset=utf-8` (any case).
/// Anything else is `invalid_request`.
///
/// # Errors
///
/// Returns an [`OAuthError`] with [`ErrorCode::InvalidRequest`] if the header is missing, not
/// ASCII, does not parse, is another media type, or names a charset other than UTF-8.
pub fn check_form_content_type(value: Option<&[u8]>) -> Result<(), OAuthError> {
    let refuse = |why: &str| {
        OAuthError::new(
            ErrorCode::InvalidRequest,
            format!("body must be application/x-www-form-urlencoded: {why}"),
        )
    };
    let value = value.ok_or_else(|| refuse("no Content-Type"))?;
    let text = std::str::from_utf8(value).map_err(|_| refuse("Content-Type is not ASCII"))?;
    let parsed: mime::Mime = text
        .parse()
        .map_err(|_| refuse("Content-Type does not parse"))?;
    if parsed.type_() != mime::APPLICATION
        || parsed.subtype() != mime::WWW_FORM_URLENCODED
        || parsed.suffix().is_some()
    {
        return Err(refuse("another media type"));
    }
    match parsed.get_param(mime::CHARSET) {
        None => Ok(()),
        Some(cs) if cs == mime::UTF_8 => Ok(()),
        Some(_) => Err(refuse("the charset must be UTF-8")),
    }
}

/// Largest `request_context` or `request_details` value the service accepts,
/// in bytes of JSON text: both end up inside the Txn-Token (`rctx`, `tctx`),
/// which travels in a header.
pub const MAX_CONTEXT_PARAM_BYTES: usize = 2048;

/// Deepest nesting accepted in `request_context` or `request_details` (the
/// object itself is depth 1).
pub const MAX_CONTEXT_PARAM_DEPTH: usize = 8;

/// The Txn-Token request parameters (without client authentication), built
/// the same way by the HTTP client and the in-process mode.
///
/// `request_context` and `request_details` are sent when they are not JSON
/// `null` (the service expects a JSON object or nothing; `null` means "none").
pub fn exchange_form(
    trust_domain: &str,
    scope: &elevate_core::scope::Scope,
    subject_token: &str,
    subject_token_type: &str,
    request_context: &serde_json::Value,
    request_details: &serde_json::Value,
) -> ExchangeForm {
    let mut form = ExchangeForm::new()
        .set("grant_type", GRANT_TYPE_TOKEN_EXCHANGE)
        .set("requested_token_type", TOKEN_TYPE_TXN_TOKEN)
        .set("audience", trust_domain)
        .set("scope", scope.to_string())
        .set("subject_token", subject_token)
        .set("subject_token_type", subject_token_type);
    for (name, value) in [
        ("request_context", request_context),
        ("request_details", request_details),
    ] {
        if !value.is_null() {
            form = form.set(name, value.to_string());
        }
    }
    form
}

/// Names the client of an RFC 8705 `tls_client_auth` request: RFC 8705 §2
/// has the client send `client_id` when its certificate authenticates it.
pub fn with_client_id(form: ExchangeForm, client_id: &str) -> ExchangeForm {
    form.set("client_id", client_id)
}

/// Adds RFC 7523 client authentication to a request.
pub fn with_client_assertion(form: ExchangeForm, assertion: &str) -> ExchangeForm {
    form.set("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT_BEARER)
        .set("client_assertion", assertion)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_parameter_is_invalid_request() {
        let e = ExchangeForm::from_pairs(vec![
            ("scope".into(), "a".into()),
            ("scope".into(), "b".into()),
        ])
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert_eq!(ErrorCode::InvalidClient.http_status(), 401);
        assert_eq!(
            serde_json::to_value(e.body()).unwrap()["error"],
            "invalid_request"
        );
    }

    #[test]
    fn empty_values_are_absent() {
        let f = ExchangeForm::from_pairs(vec![("audience".into(), String::new())]).unwrap();
        assert!(f.get("audience").is_none());
        assert_eq!(
            f.require("audience").unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }
}
