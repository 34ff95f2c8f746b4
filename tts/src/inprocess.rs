//! The in-process mode (the draft allows a local interface): a [`TokenSource`]
//! that calls the [`Issuer`] directly — same client authentication, same
//! validation, same minting — then verifies the token as the HTTP client does.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::keys::SigningKey;
use elevate_core::scope::Scope;
use elevate_core::token::{SecretToken, TokenError, TokenRequest, TokenSource, TxnToken};

use super::issuer::Issuer;
use txn_token_client::assertion::sign_assertion;
use txn_token_client::protocol::{
    ErrorCode, OAuthError, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, exchange_form,
    with_client_assertion,
};
use txn_token_client::verify::TxnTokenVerifier;

/// An in-process Txn-Token source for one workload.
#[derive(Debug, Clone)]
pub struct InProcessTts {
    issuer: Arc<Issuer>,
    workload: String,
    key: SigningKey,
    verifier: TxnTokenVerifier,
    request_context: serde_json::Value,
}

/// Maps a service refusal to the pipeline's error classes.
pub fn oauth_to_token_error(e: OAuthError) -> TokenError {
    match e.code {
        ErrorCode::ServerError => TokenError::Unavailable {
            reason: e.description().to_string(),
            retry_after: None,
        },
        code => TokenError::Denied {
            code: code.as_str().to_string(),
            description: Some(e.description().to_string()),
        },
    }
}

impl InProcessTts {
    /// A token source for `workload` (registered in `issuer`), authenticating with `key`.
    pub fn new(issuer: Arc<Issuer>, workload: impl Into<String>, key: SigningKey) -> Self {
        let verifier = TxnTokenVerifier::with_provider(issuer.trust_domain(), issuer.clone())
            .with_min_refresh_interval(Duration::ZERO);
        InProcessTts {
            issuer,
            workload: workload.into(),
            key,
            verifier,
            request_context: serde_json::json!({ "mode": "in-process" }),
        }
    }

    /// The service behind this source.
    pub fn issuer(&self) -> &Arc<Issuer> {
        &self.issuer
    }

    /// The verifier tokens are checked with (use it for inbound `Txn-Token` headers too).
    pub fn verifier(&self) -> &TxnTokenVerifier {
        &self.verifier
    }

    /// Entry flow: a user's access token in, a Txn-Token for this workload out.
    ///
    /// # Errors
    ///
    /// The same as [`exchange`](Self::exchange).
    pub async fn exchange_access_token(
        &self,
        access_token: &str,
        scope: &Scope,
        request_details: &serde_json::Value,
    ) -> Result<TxnToken, TokenError> {
        self.exchange(
            access_token,
            TOKEN_TYPE_ACCESS_TOKEN,
            scope,
            request_details,
        )
        .await
    }

    /// One token exchange through the shared issuer code; the token is verified.
    ///
    /// # Errors
    ///
    /// Returns [`TokenError::Denied`] with the OAuth error code if the issuer refuses the request
    /// (unknown client, bad subject token, scope not allowed...), [`TokenError::Unavailable`] if it
    /// fails to sign (`server_error`), and [`TokenError::Invalid`] if the assertion cannot be
    /// signed, the response breaks the protocol, or the token fails verification or is not issued
    /// for this workload.
    pub async fn exchange(
        &self,
        subject_token: &str,
        subject_token_type: &str,
        scope: &Scope,
        request_details: &serde_json::Value,
    ) -> Result<TxnToken, TokenError> {
        let assertion = sign_assertion(
            &self.key,
            &self.workload,
            &self.issuer.token_endpoint(),
            Duration::from_secs(30),
        )
        .map_err(|e| TokenError::Invalid(format!("signing: {e}")))?;
        let form = with_client_assertion(
            exchange_form(
                self.issuer.trust_domain(),
                scope,
                subject_token,
                subject_token_type,
                &self.request_context,
                request_details,
            ),
            &assertion,
        );
        let issued = self.issuer.exchange(&form).map_err(oauth_to_token_error)?;
        let token = txn_token_client::client::check_token_response(issued.response)?;
        let claims = self.verifier.verify(&token).await?;
        if claims.req_wl != self.workload {
            return Err(TokenError::Invalid(format!(
                "req_wl {:?} is not this workload",
                claims.req_wl
            )));
        }
        Ok(TxnToken {
            token: SecretToken::new(token),
            claims: claims.into(),
        })
    }
}

#[async_trait::async_trait]
impl TokenSource for InProcessTts {
    async fn acquire(&self, req: &TokenRequest<'_>) -> Result<TxnToken, TokenError> {
        self.exchange(
            &req.reference.token,
            TOKEN_TYPE_JWT,
            req.scope,
            &req.request_details.to_value(),
        )
        .await
    }
}
