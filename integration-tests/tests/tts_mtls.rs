//! RFC 8705 `tls_client_auth` at the TTS binary, end to end: a CA, a server
//! certificate for 127.0.0.1/localhost and X.509-SVID-like client
//! certificates (one URI SAN, `spiffe://…`) are made here with rcgen and
//! written to real files; the TTS binary serves HTTPS on loopback with them
//! (`[tls]`), and real clients — `TtsClient` with `auth =
//! TlsClientAuth`, raw HTTPS requests, and an `elevate_config::Workload`
//! built from `[tts] auth = "mtls"` with an SVID file — exchange real
//! context references. Needs nothing but the TTS binary, which cargo builds.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use elevate_config::{Loaded, Workload};
use elevate_core::ctxref::{MintRequest, MintedRef, SubjectKind, VerifiedRef};
use elevate_core::keys::sha256_hex;
use elevate_core::scope::Scope;
use elevate_core::token::{TokenError, TokenRequest, TokenSource, TxnToken};
use elevate_core::{GuardDecision, InboundMessage};
use elevate_testing::domain::{FileDomain, key, write_public_keys};
use elevate_testing::env::{TRUST_DOMAIN, policy_dir};
use elevate_testing::tts::{TTS_TRUST_DOMAIN, TestWorkload};
use elevate_tts::{ServiceConfig, TlsConfig, WorkloadConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use txn_token_client::protocol::{
    ClientAuthMethod, TOKEN_TYPE_JWT, exchange_form, with_client_assertion, with_client_id,
};
use txn_token_client::{TtsClient, TtsClientConfig};

const BIN: &str = env!("CARGO_BIN_EXE_elevate-tts");

// ---------------------------------------------------------------- PKI

/// A certificate authority made for the test.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, as PEM.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Leaf {
    /// The X.509-SVID file spiffe-helper writes with its key: certificate, then key.
    fn svid_file(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("CA key: {e}"));
        let mut p = CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| panic!("CA params: {e}"));
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("CA cert: {e}"));
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    fn issue(&self, mut p: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("leaf key: {e}"));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("leaf cert: {e}"));
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// The TTS's server certificate: 127.0.0.1 and localhost.
    fn server(&self) -> Leaf {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap_or_else(|e| panic!("server params: {e}"));
        p.distinguished_name.push(DnType::CommonName, "tts");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(p)
    }

    /// An X.509-SVID-like client certificate: one URI SAN, the SPIFFE id.
    fn svid(&self, spiffe_id: &str) -> Leaf {
        let mut p = CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| panic!("SVID params: {e}"));
        p.subject_alt_names = vec![SanType::URI(
            spiffe_id
                .try_into()
                .unwrap_or_else(|e| panic!("URI SAN {spiffe_id}: {e}")),
        )];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(p)
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------- the TTS over TLS

/// The TTS binary serving HTTPS (its first stdout line is `listening on https://ADDR`).
struct HttpsTts {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl HttpsTts {
    fn spawn(config: &Path) -> Self {
        let log = config.with_file_name("tts.log");
        let log_file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("tts.log: {e}"));
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,elevate_tts=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap_or_else(|e| panic!("the TTS binary {BIN} does not start: {e}"));
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("no stdout of the TTS"));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {}
        });
        let first = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the TTS did not report its address within 30 s; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let addr = first
            .strip_prefix("listening on https://")
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("the TTS should serve https, its first line is {first:?}"));
        HttpsTts { child, addr, log }
    }

    fn token_endpoint(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HttpsTts {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A trust domain served over TLS: the files, the workloads, the process.
struct Domain {
    dir: tempfile::TempDir,
    ca: Ca,
    producer: TestWorkload,
    /// Registered and opted into tls_client_auth (certificate only).
    mtls: TestWorkload,
    /// Registered, private_key_jwt only (the default).
    jwt: TestWorkload,
    tts: HttpsTts,
}

fn domain() -> Domain {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let ca = Ca::new("workload CA");
    let server = ca.server();
    write(&dir.path().join("tts-cert.pem"), &server.cert_pem);
    write(&dir.path().join("tts-key.pem"), &server.key_pem);
    write(&dir.path().join("ca.pem"), &ca.pem);
    let producer = TestWorkload::generate("orders", &["orders.read"]);
    let mtls = TestWorkload::generate("billing", &["orders.read"]);
    let jwt = TestWorkload::generate("shipping", &["orders.read"]);
    let mut config = ServiceConfig::new(TTS_TRUST_DOMAIN);
    config.listen = "127.0.0.1:0".into();
    config.tls = Some(TlsConfig {
        cert: "tts-cert.pem".into(),
        key: "tts-key.pem".into(),
        client_ca: Some("ca.pem".into()),
    });
    config.workloads = [&producer, &mtls, &jwt]
        .iter()
        .map(|w| w.config())
        .collect();
    config
        .token_endpoint_auth_methods
        .insert(mtls.id.clone(), vec![ClientAuthMethod::TlsClientAuth]);
    let path = dir.path().join("tts.toml");
    write(
        &path,
        &config.to_toml().unwrap_or_else(|e| panic!("config: {e}")),
    );
    let tts = HttpsTts::spawn(&path);
    Domain {
        dir,
        ca,
        producer,
        mtls,
        jwt,
        tts,
    }
}

impl Domain {
    fn reference(&self, audience: &str) -> VerifiedRef {
        let m: MintedRef = self
            .producer
            .minter(Duration::from_secs(300))
            .mint(&MintRequest {
                subject: "alice",
                sub_kind: SubjectKind::Human,
                audience: &[audience.to_string()],
                scope: &Scope::parse("orders.read"),
                txn: "txn-mtls-1",
                destination: "orders",
                payload: b"{\"order\":1}",
            })
            .unwrap_or_else(|e| panic!("mint: {e}"));
        VerifiedRef {
            token_sha256: sha256_hex(m.token.as_bytes()),
            claims: m.claims,
            token: m.token,
        }
    }

    /// A client for `w` trusting the test CA, authenticating with `auth`.
    fn client(
        &self,
        w: &TestWorkload,
        auth: ClientAuthMethod,
        identity: Option<&Leaf>,
    ) -> TtsClient {
        let mut cfg = TtsClientConfig::new(self.tts.token_endpoint(), TTS_TRUST_DOMAIN, &w.id);
        cfg.auth = auth;
        cfg.mtls_identity_pem = identity.map(|l| l.svid_file().into_bytes());
        cfg.root_ca_pem = Some(self.ca.pem.clone().into_bytes());
        cfg.max_attempts = 1;
        TtsClient::new(cfg, w.key.clone()).unwrap_or_else(|e| panic!("TTS client: {e}"))
    }

    /// A raw HTTPS client trusting the test CA, presenting `identity`.
    fn raw(&self, identity: Option<&Leaf>) -> reqwest::Client {
        txn_token_client::install_crypto_provider();
        let ca = reqwest::Certificate::from_pem(self.ca.pem.as_bytes())
            .unwrap_or_else(|e| panic!("CA: {e}"));
        let mut b = reqwest::Client::builder().add_root_certificate(ca);
        if let Some(l) = identity {
            b = b.identity(
                reqwest::Identity::from_pem(l.svid_file().as_bytes())
                    .unwrap_or_else(|e| panic!("identity: {e}")),
            );
        }
        b.build().unwrap_or_else(|e| panic!("client: {e}"))
    }
}

async fn acquire(c: &TtsClient, r: &VerifiedRef) -> Result<TxnToken, TokenError> {
    c.acquire(&TokenRequest {
        reference: r,
        scope: &Scope::parse("orders.read"),
        request_details: serde_json::json!({"source": "mtls-test"}).into(),
    })
    .await
}

fn denied(r: Result<TxnToken, TokenError>) -> (String, String) {
    match r {
        Err(TokenError::Denied { code, description }) => (code, description.unwrap_or_default()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The JSON payload of a compact JWS.
fn payload(jwt: &str) -> serde_json::Value {
    let part = jwt.split('.').nth(1).unwrap_or_else(|| panic!("not a JWS"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap_or_else(|e| panic!("payload: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("payload: {e}"))
}

fn x5t_s256(der: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(der))
}

/// The form of a token request for `r` with no client authentication.
fn bare_form(r: &VerifiedRef) -> Vec<(String, String)> {
    exchange_form(
        TTS_TRUST_DOMAIN,
        &Scope::parse("orders.read"),
        &r.token,
        TOKEN_TYPE_JWT,
        &serde_json::json!({"mode": "async"}),
        &serde_json::Value::Null,
    )
    .pairs()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// POSTs `form`; status, `WWW-Authenticate` values and JSON body.
async fn post(
    http: &reqwest::Client,
    url: &str,
    form: &[(String, String)],
) -> Result<(u16, Vec<String>, serde_json::Value), reqwest::Error> {
    let resp = http.post(url).form(form).send().await?;
    let status = resp.status().as_u16();
    let challenges = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, challenges, body))
}

fn challenges() -> Vec<String> {
    ["private_key_jwt", "tls_client_auth"]
        .iter()
        .map(|s| format!("{s} realm=\"{TTS_TRUST_DOMAIN}\", error=\"invalid_client\""))
        .collect()
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opted_in_svid_gets_a_txn_token_bound_to_it_without_any_assertion() {
    let d = domain();
    let svid = d.ca.svid(&d.mtls.id);
    let r = d.reference(&d.mtls.id);

    // The client: tls_client_auth, verified token, bound to the certificate.
    let client = d.client(&d.mtls, ClientAuthMethod::TlsClientAuth, Some(&svid));
    let t = acquire(&client, &r)
        .await
        .unwrap_or_else(|e| panic!("mTLS exchange: {e}; log:\n{}", d.tts.log()));
    assert_eq!(t.claims.req_wl, d.mtls.id);
    assert_eq!(t.claims.sub, "alice");
    let claims = payload(t.token.expose());
    assert_eq!(
        claims["cnf"]["x5t#S256"],
        x5t_s256(&svid.der),
        "RFC 8705 §3.1 binding: {claims}"
    );

    // On the wire: a form with no client_assertion at all (client_id only) is enough.
    let form = bare_form(&r);
    assert!(!form.iter().any(|(k, _)| k.starts_with("client_assertion")));
    let (status, _, body) = post(
        &d.raw(Some(&svid)),
        &d.tts.token_endpoint(),
        &[form.clone(), vec![("client_id".into(), d.mtls.id.clone())]].concat(),
    )
    .await
    .unwrap_or_else(|e| panic!("POST: {e}"));
    assert_eq!(status, 200, "{body}");
    // and so is one without client_id: the SAN names the workload
    let (status, _, body) = post(&d.raw(Some(&svid)), &d.tts.token_endpoint(), &form)
        .await
        .unwrap_or_else(|e| panic!("POST: {e}"));
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // The log names the certificate by fingerprint, never by content, and never the token.
    let log = d.tts.log();
    assert!(
        log.contains(&x5t_s256(&svid.der)),
        "fingerprint logged:\n{log}"
    );
    let body_line = svid.cert_pem.lines().nth(1).unwrap_or_default();
    assert!(!log.contains(body_line), "certificate bytes logged:\n{log}");
    assert!(!log.contains(&token), "token logged");
    assert!(!log.contains("BEGIN"), "PEM logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_name_nobody_allowed_are_refused_invalid_client() {
    let d = domain();
    let url = d.tts.token_endpoint();

    // A certificate for a SPIFFE id that is not registered.
    let stranger = TestWorkload::generate("stranger", &["orders.read"]);
    let svid = d.ca.svid(&stranger.id);
    let c = d.client(&stranger, ClientAuthMethod::TlsClientAuth, Some(&svid));
    let (code, why) = denied(acquire(&c, &d.reference(&stranger.id)).await);
    assert_eq!(code, "invalid_client");
    assert!(why.contains("no registered workload"), "{why}");
    let (status, ch, _) = post(
        &d.raw(Some(&svid)),
        &url,
        &bare_form(&d.reference(&d.mtls.id)),
    )
    .await
    .unwrap_or_else(|e| panic!("POST: {e}"));
    assert_eq!((status, ch), (401, challenges()));

    // A registered workload that did not opt into tls_client_auth.
    let svid = d.ca.svid(&d.jwt.id);
    let c = d.client(&d.jwt, ClientAuthMethod::TlsClientAuth, Some(&svid));
    let (code, why) = denied(acquire(&c, &d.reference(&d.jwt.id)).await);
    assert_eq!(code, "invalid_client");
    assert!(
        why.contains("may not authenticate with tls_client_auth"),
        "{why}"
    );

    // The certificate of one workload and the client_id of another.
    let svid = d.ca.svid(&d.mtls.id);
    let form = [
        bare_form(&d.reference(&d.mtls.id)),
        vec![("client_id".into(), d.jwt.id.clone())],
    ]
    .concat();
    let (status, _, body) = post(&d.raw(Some(&svid)), &url, &form)
        .await
        .unwrap_or_else(|e| panic!("POST: {e}"));
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );

    // A certificate and an assertion at once: one method per request.
    let r = d.reference(&d.mtls.id);
    let assertion = txn_token_client::assertion::sign_assertion(
        &d.mtls.key,
        &d.mtls.id,
        &url,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let both: Vec<(String, String)> = with_client_assertion(
        with_client_id(
            exchange_form(
                TTS_TRUST_DOMAIN,
                &Scope::parse("orders.read"),
                &r.token,
                TOKEN_TYPE_JWT,
                &serde_json::Value::Null,
                &serde_json::Value::Null,
            ),
            &d.mtls.id,
        ),
        &assertion,
    )
    .pairs()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (status, _, body) = post(&d.raw(Some(&svid)), &url, &both)
        .await
        .unwrap_or_else(|e| panic!("POST: {e}"));
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|s| s.contains("one method")),
        "{body}"
    );

    // No certificate and no assertion.
    let (status, ch, body) = post(&d.raw(None), &url, &bare_form(&r))
        .await
        .unwrap_or_else(|e| panic!("POST: {e}"));
    assert_eq!((status, ch), (401, challenges()), "{body}");

    // The certificate-only workload's assertion, without a certificate.
    let c = d.client(&d.mtls, ClientAuthMethod::PrivateKeyJwt, None);
    let (code, why) = denied(acquire(&c, &r).await);
    assert_eq!(code, "invalid_client");
    assert!(
        why.contains("may not authenticate with private_key_jwt"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let d = domain();
    let rogue = Ca::new("rogue CA").svid(&d.mtls.id);
    let r = d.reference(&d.mtls.id);
    let sent = post(
        &d.raw(Some(&rogue)),
        &d.tts.token_endpoint(),
        &[bare_form(&r), vec![("client_id".into(), d.mtls.id.clone())]].concat(),
    )
    .await;
    assert!(
        sent.is_err(),
        "a certificate that does not chain to client_ca must not get an answer: {sent:?}"
    );
    let c = d.client(&d.mtls, ClientAuthMethod::TlsClientAuth, Some(&rogue));
    match acquire(&c, &r).await {
        Err(TokenError::Unavailable { .. }) => {}
        other => panic!("expected a transport failure, got {other:?}"),
    }
    let log = d.tts.log();
    assert!(log.contains("TLS handshake refused"), "log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_still_works_over_tls_without_a_certificate() {
    let d = domain();
    let c = d.client(&d.jwt, ClientAuthMethod::PrivateKeyJwt, None);
    let t = acquire(&c, &d.reference(&d.jwt.id))
        .await
        .unwrap_or_else(|e| panic!("private_key_jwt over TLS: {e}; log:\n{}", d.tts.log()));
    assert_eq!(t.claims.req_wl, d.jwt.id);
    assert!(
        payload(t.token.expose()).get("cnf").is_none(),
        "no certificate, no binding"
    );
    // plain HTTP on the TLS port gets no token
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", d.tts.addr))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.map(|r| r.status().is_success()).ok() != Some(true),
        "plain HTTP must not be served on the TLS port"
    );
    let _ = &d.dir;
}

/// A reference for the mTLS workload in origin transaction `txn` (a distinct context).
fn reference_in(d: &Domain, txn: &str) -> VerifiedRef {
    let m: MintedRef = d
        .producer
        .minter(Duration::from_secs(300))
        .mint(&MintRequest {
            subject: "alice",
            sub_kind: SubjectKind::Human,
            audience: std::slice::from_ref(&d.mtls.id),
            scope: &Scope::parse("orders.read"),
            txn,
            destination: "orders",
            payload: b"{\"order\":1}",
        })
        .unwrap_or_else(|e| panic!("mint: {e}"));
    VerifiedRef {
        token_sha256: sha256_hex(m.token.as_bytes()),
        claims: m.claims,
        token: m.token,
    }
}

/// What makes a distinct context cheaper (issue 16 item 3): with
/// `tls_client_auth`, one handshake authenticates every exchange on a
/// kept-alive connection, and no request carries a signed assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_mtls_client_exchanges_many_contexts_on_one_handshake_without_signing() {
    let d = domain();
    let svid = d.ca.svid(&d.mtls.id);
    // The client holds a key the TTS has never seen: an assertion signed
    // with it could not authenticate anybody (and the workload is
    // certificate-only, so any assertion is refused), so every token below
    // was obtained with the certificate alone.
    let stranger_key = elevate_core::keys::SigningKey::generate(
        elevate_core::keys::SigningAlg::EdDSA,
        "never-registered",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = TtsClientConfig::new(d.tts.token_endpoint(), TTS_TRUST_DOMAIN, &d.mtls.id);
    cfg.auth = ClientAuthMethod::TlsClientAuth;
    cfg.mtls_identity_pem = Some(svid.svid_file().into_bytes());
    cfg.root_ca_pem = Some(d.ca.pem.clone().into_bytes());
    cfg.max_attempts = 1;
    let client = std::sync::Arc::new(
        TtsClient::new(cfg, stranger_key).unwrap_or_else(|e| panic!("TTS client: {e}")),
    );
    let thumbprint = x5t_s256(&svid.der);
    // One exchange opens the connection; then 24 distinct contexts, 8 at a time.
    let first = acquire(&client, &reference_in(&d, "txn-keepalive-0"))
        .await
        .unwrap_or_else(|e| panic!("first exchange: {e}; log:\n{}", d.tts.log()));
    let mut tokens = vec![first];
    for wave in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (c, r) = (
                client.clone(),
                reference_in(&d, &format!("txn-keepalive-{wave}-{i}")),
            );
            tasks.push(tokio::spawn(async move { acquire(&c, &r).await }));
        }
        for t in tasks {
            tokens.push(
                t.await
                    .unwrap_or_else(|e| panic!("task: {e}"))
                    .unwrap_or_else(|e| panic!("exchange: {e}; log:\n{}", d.tts.log())),
            );
        }
    }
    let mut txns = std::collections::HashSet::new();
    for t in &tokens {
        assert_eq!(t.claims.req_wl, d.mtls.id);
        assert_eq!(payload(t.token.expose())["cnf"]["x5t#S256"], thumbprint);
        txns.insert(t.claims.txn.clone());
    }
    assert_eq!(txns.len(), 25, "one Txn-Token per distinct context");
    // The TTS verified the client certificate once: one TLS connection, kept alive.
    let log = d.tts.log();
    let handshakes = log.matches("TLS client certificate verified").count();
    assert_eq!(handshakes, 1, "handshakes with a certificate:\n{log}");
}

// ---------------------------------------------------------------- elevate.toml

/// Publishes one message through `producer` for `consumer`, as the consumer reads it.
async fn publish(producer: &Workload, consumer: &Workload) -> InboundMessage {
    elevate_testing::domain::message_for_alice(producer, consumer, "orders", "test.process", 1)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_with_auth_mtls_in_elevate_toml_exchanges_a_real_reference() {
    // The layout of a FileDomain, served over TLS.
    let d = FileDomain::empty(TRUST_DOMAIN);
    let dir = d.path();
    let ca = Ca::new("elevate.example CA");
    let server = ca.server();
    write(&dir.join("tts-cert.pem"), &server.cert_pem);
    write(&dir.join("tts-key.pem"), &server.key_pem);
    write(&dir.join("ca.pem"), &ca.pem);
    let (pk, ck) = (key("orders-api-1"), key("test-worker-1"));
    let mut config = ServiceConfig::new(TRUST_DOMAIN);
    config.listen = "127.0.0.1:0".into();
    config.key_reload_secs = 1;
    config.tls = Some(TlsConfig {
        cert: "tts-cert.pem".into(),
        key: "tts-key.pem".into(),
        client_ca: Some("ca.pem".into()),
    });
    config.workloads = [("orders-api", &pk), ("test-worker", &ck)]
        .iter()
        .map(|(name, k)| {
            let file = format!("{name}.jwks.json");
            write_public_keys(&dir.join(&file), &[k]);
            d.write_private_key(name, k);
            WorkloadConfig {
                id: d.workload_id(name),
                public_jwk: None,
                jwk_file: Some(PathBuf::from(file)),
                allowed_scopes: vec!["test.process".into()],
            }
        })
        .collect();
    let consumer_id = d.workload_id("test-worker");
    config
        .token_endpoint_auth_methods
        .insert(consumer_id.clone(), vec![ClientAuthMethod::TlsClientAuth]);
    let tts_toml = dir.join("tts.toml");
    write(
        &tts_toml,
        &config.to_toml().unwrap_or_else(|e| panic!("config: {e}")),
    );
    let tts = HttpsTts::spawn(&tts_toml);

    // The consumer's SVID, cert and key in one file, as spiffe-helper writes it.
    let svid = ca.svid(&consumer_id);
    write(&dir.join("test-worker-svid.pem"), &svid.svid_file());
    let workload_toml = |name: &str, tts_extra: &str| {
        let path = dir.join(format!("{name}.toml"));
        write(
            &path,
            &format!(
                "workload = \"{}\"\n\n[keys]\ndir = \"{name}\"\n\n[tts]\nurl = \"{}\"\nroot_ca = \"ca.pem\"\n{tts_extra}\n[pdp]\ncedar_bundle = \"{}\"\nallow_unsigned = true\n\n[trust]\nmin_refresh_secs = 1\n\n[[actions]]\ndestination = \"orders\"\naction = \"test.process\"\n",
                d.workload_id(name),
                tts.token_endpoint(),
                policy_dir().display(),
            ),
        );
        path
    };
    let build = |path: PathBuf| async move {
        let loaded = Loaded::read_file_only(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Workload::build(&loaded)
            .await
            .unwrap_or_else(|e| panic!("workload from {}: {e}", path.display()))
    };
    let producer = build(workload_toml("orders-api", "")).await;
    let consumer = build(workload_toml(
        "test-worker",
        "auth = \"mtls\"\nmtls_identity = \"test-worker-svid.pem\"\n",
    ))
    .await;
    assert!(
        consumer.trusted_keys().load().len() >= 2,
        "the key directory was read over https with root_ca"
    );

    let msg = publish(&producer, &consumer).await;
    let decided = consumer.guard().decide(&msg, 1).await;
    assert!(
        matches!(decided, GuardDecision::Permit(_)),
        "the mTLS consumer's exchange: {decided:?}; TTS log:\n{}",
        tts.log()
    );
    let log = tts.log();
    assert!(
        log.contains(&format!("req_wl={consumer_id}")) && log.contains(&x5t_s256(&svid.der)),
        "issued to the consumer, bound to its SVID:\n{log}"
    );
    let _ = d.tts();
}
