//! The entry service of the deployment: an axum HTTP API with a test IdP.
//!
//! - `POST /login` `{"user": "alice"}` → a user access token from the test
//!   IdP (its key is a file the TTS was given the public half of).
//! - `POST /orders` with `Authorization: Bearer <user token>` and
//!   `{"order": "…"}` → the token is exchanged at the TTS for a Txn-Token
//!   (entry flow), and the order is published to the three workers'
//!   destinations with a context reference each — never the token.
//!
//! Everything about the workload comes from its `elevate.toml`: its id, its
//! rotating signing key, the TTS, the Cedar bundle.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use clap::Parser;
use elevate_config::Workload;
use elevate_core::keys::{SigningAlg, SigningKey};
use elevate_core::producer::PublishRequest;
use elevate_core::scope::Scope;
use elevate_core::{Headers, OutboundMessage};
use elevate_deploy::{
    AppResult, Broker, Brokers, IDP_ISSUER, ORIGIN_SCOPE, Placed, TRUST_DOMAIN, WORKERS,
    shutdown_signal,
};
use elevate_tts::TestIssuer;
use txn_token_client::subject_context;

/// The orders API.
#[derive(Parser, Debug)]
struct Args {
    /// Its `elevate.toml`.
    #[arg(long)]
    config: std::path::PathBuf,
    /// The test IdP's private key (PKCS#8 PEM; kid = file stem).
    #[arg(long)]
    idp_key: std::path::PathBuf,
    /// The run id naming the destinations.
    #[arg(long)]
    run: String,
    /// Where to listen (port 0: any).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    #[command(flatten)]
    brokers: Brokers,
}

struct Api {
    workload: Workload,
    idp: TestIssuer,
    run: String,
    kafka: elevate_kafka::KafkaProducer,
    nats: elevate_nats::NatsPublisher,
    amqp: elevate_amqp::AmqpPublisher,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("orders-api: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> AppResult<()> {
    let workload = Workload::from_file(&args.config).await?;
    let kid = args
        .idp_key
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or("the IdP key file name is its key id")?
        .to_string();
    let idp = TestIssuer::with_key(
        IDP_ISSUER,
        TRUST_DOMAIN,
        SigningKey::from_pem_file(SigningAlg::ES256, kid, &args.idp_key)?,
    );
    let guard = workload.producer().clone();

    let mut kafka = args.brokers.kafka_config();
    kafka
        .set("message.timeout.ms", "10000")
        // tansu 0.6 serves a fetch that starts inside a multi-record batch
        // wrongly (kafka/README.md): one record per batch.
        .set("batch.num.messages", "1");
    let kafka = elevate_kafka::KafkaProducer::new(kafka.create()?, guard.clone());
    let nats = elevate_nats::NatsPublisher::new(args.brokers.nats_client().await?, guard.clone());
    let conn = args.brokers.amqp_connection().await?;
    let amqp = elevate_amqp::AmqpPublisher::with_confirm_channel(
        elevate_amqp::ConfirmChannel::open(&conn).await?,
        guard,
    );

    let api = Arc::new(Api {
        workload,
        idp,
        run: args.run,
        kafka,
        nats,
        amqp,
    });
    let app = axum::Router::new()
        .route("/login", post(login))
        .route("/orders", post(place))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    drop(conn);
    Ok(())
}

#[derive(serde::Deserialize)]
struct Login {
    user: String,
}

/// The test IdP: any user name signs in (this is a demo IdP).
async fn login(State(api): State<Arc<Api>>, Json(l): Json<Login>) -> (StatusCode, String) {
    match api
        .idp
        .issue_access_token(&l.user, ORIGIN_SCOPE, Duration::from_secs(600))
    {
        Ok(t) => (StatusCode::OK, t),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct Order {
    order: String,
}

async fn place(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Json(order): Json<Order>,
) -> Result<Json<Placed>, (StatusCode, String)> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or((
            StatusCode::UNAUTHORIZED,
            "bearer token required".to_string(),
        ))?;
    let txn_token = api
        .workload
        .tts_client()
        .exchange_access_token(
            token.trim(),
            &Scope::parse(ORIGIN_SCOPE),
            &serde_json::json!({"http": "POST /orders"}),
        )
        .await
        .map_err(|e| {
            (
                StatusCode::FORBIDDEN,
                format!("token exchange refused: {e}"),
            )
        })?;
    let subject = subject_context(&txn_token.claims);
    let kid = api.workload.signing_key().get().kid().to_string();
    let payload = serde_json::json!({ "order": order.order }).to_string();
    let mut published = Vec::new();
    for w in WORKERS {
        let destination = w.destination(&api.run);
        let audience = [w.id()];
        let req = PublishRequest {
            subject: &subject,
            action: w.action,
            audience: &audience,
            destination: &destination,
            scope: None,
        };
        let msg = OutboundMessage {
            headers: Headers::new(),
            payload: payload.clone().into_bytes(),
        };
        let sent = match w.broker {
            Broker::Kafka => api.kafka.publish(&req, msg).await,
            Broker::Nats => api.nats.publish_jetstream(&req, msg).await,
            Broker::Amqp => api.amqp.publish(&req, msg).await,
        };
        sent.map_err(|e| (StatusCode::BAD_GATEWAY, format!("{destination}: {e}")))?;
        published.push(destination);
    }
    tracing::info!(order = %order.order, user = %subject.subject, txn = %subject.txn, %kid, "order published");
    Ok(Json(Placed {
        order: order.order,
        user: subject.subject.clone(),
        txn: subject.txn.clone(),
        kid,
        published,
    }))
}
