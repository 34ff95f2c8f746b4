//! The deployment's operator and user: creates and deletes a run's
//! destinations on the brokers, places orders through the orders API as a
//! signed-in user, and checks every worker's decision log against what the
//! example policy prescribes. Exits 2 when an outcome differs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use elevate_deploy::{AppResult, Broker, Brokers, Placed, WORKERS, bundle_bucket, nats_stream};

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Creates the run's destinations and dead-letter destinations.
    Setup {
        /// The run id.
        #[arg(long)]
        run: String,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// Deletes them.
    Teardown {
        /// The run id.
        #[arg(long)]
        run: String,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// Signs in as `user` and places `count` orders; appends each answer to `ledger`.
    Send {
        /// The orders API.
        #[arg(long)]
        api: String,
        /// Who signs in.
        #[arg(long)]
        user: String,
        /// How many orders.
        #[arg(long, default_value_t = 3)]
        count: usize,
        /// A label for this batch (`phase-1`, …), part of each order id.
        #[arg(long)]
        phase: String,
        /// The ledger of placed orders (JSON Lines).
        #[arg(long)]
        ledger: PathBuf,
    },
    /// The legacy pattern Elevate replaces: signs in as `user` and sends one
    /// order to every worker's destination with the user's bearer token in
    /// an `Authorization` header and no context reference (plain clients).
    Forward {
        /// The orders API (for the sign-in).
        #[arg(long)]
        api: String,
        /// Who signs in.
        #[arg(long)]
        user: String,
        /// The run id.
        #[arg(long)]
        run: String,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// Waits until every worker decided every order of the ledger, prints
    /// the decisions, and fails unless each matches the policy.
    Check {
        /// The ledger of placed orders.
        #[arg(long)]
        ledger: PathBuf,
        /// The run directory (`<dir>/<worker>/decisions.jsonl`).
        #[arg(long)]
        run_dir: PathBuf,
        /// `PHASE=KID`: the orders of PHASE must be signed with KID.
        #[arg(long = "expect-kid")]
        expect_kid: Vec<String>,
        /// `PHASE=REVISION`: the orders of PHASE must be decided under that bundle revision.
        #[arg(long = "expect-revision")]
        expect_revision: Vec<String>,
        /// How long to wait for the last decisions, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Messages sent by `forward`: each worker must quarantine them
        /// (`credential-in-message`) and keep them as dead letters.
        #[arg(long, default_value_t = 0)]
        forwarded: u64,
        /// The run id: its dead-letter destinations are counted too.
        #[arg(long)]
        run: String,
        #[command(flatten)]
        brokers: Brokers,
    },
}

#[tokio::main]
async fn main() {
    let code = match run(Cli::parse().command).await {
        Ok(true) => 0,
        Ok(false) => 2,
        Err(e) => {
            eprintln!("deploy-client: {e}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(command: Command) -> AppResult<bool> {
    match command {
        Command::Setup { run, brokers } => setup(&run, &brokers).await.map(|()| true),
        Command::Teardown { run, brokers } => teardown(&run, &brokers).await.map(|()| true),
        Command::Send {
            api,
            user,
            count,
            phase,
            ledger,
        } => send(&api, &user, count, &phase, &ledger)
            .await
            .map(|()| true),
        Command::Forward {
            api,
            user,
            run,
            brokers,
        } => forward(&api, &user, &run, &brokers).await.map(|()| true),
        Command::Check {
            ledger,
            run_dir,
            expect_kid,
            expect_revision,
            timeout,
            forwarded,
            run,
            brokers,
        } => {
            let timeout = Duration::from_secs(timeout);
            let decided = check(&ledger, &run_dir, &expect_kid, &expect_revision, timeout).await?;
            let quarantined = check_forwarded(&run_dir, forwarded, timeout).await;
            let lettered = check_dead_letters(&run_dir, &run, &brokers, timeout).await?;
            Ok(decided && quarantined && lettered)
        }
    }
}

fn kafka_admin(
    b: &Brokers,
) -> AppResult<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>> {
    Ok(b.kafka_config().create()?)
}

async fn setup(run: &str, b: &Brokers) -> AppResult<()> {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    for w in WORKERS {
        let dest = w.destination(run);
        match w.broker {
            Broker::Kafka => {
                let admin = kafka_admin(b)?;
                let dlq = format!("{dest}.dlq");
                let topics = [&dest, &dlq].map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)));
                for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
                    if let Err((t, code)) = r
                        && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
                    {
                        return Err(
                            format!("Kafka at {}: cannot create {t}: {code}", b.kafka).into()
                        );
                    }
                }
            }
            Broker::Nats => {
                use async_nats::jetstream::stream;
                let js = b.jetstream().await?;
                for (name, subject) in [
                    (nats_stream(run), dest.clone()),
                    (format!("{}_DLQ", nats_stream(run)), format!("{dest}.dlq")),
                ] {
                    js.get_or_create_stream(stream::Config {
                        name,
                        subjects: vec![subject],
                        storage: stream::StorageType::File,
                        max_age: Duration::from_secs(24 * 3600),
                        ..Default::default()
                    })
                    .await?;
                }
            }
            Broker::Amqp => {
                let conn = b.amqp_connection().await?;
                let ch = conn.create_channel().await?;
                elevate_amqp::declare_queues(&ch, &dest).await?;
            }
        }
        println!("{:?}: {dest} and {dest}.dlq", w.broker);
    }
    Ok(())
}

async fn teardown(run: &str, b: &Brokers) -> AppResult<()> {
    use lapin::options::QueueDeleteOptions;
    use rdkafka::admin::AdminOptions;
    for w in WORKERS {
        let dest = w.destination(run);
        // Best effort: what is not there is already gone.
        match w.broker {
            Broker::Kafka => {
                let admin = kafka_admin(b)?;
                let dlq = format!("{dest}.dlq");
                let _ = admin
                    .delete_topics(&[&dest, &dlq], &AdminOptions::new())
                    .await;
            }
            Broker::Nats => {
                let js = b.jetstream().await?;
                let _ = js.delete_stream(nats_stream(run)).await;
                let _ = js.delete_stream(format!("{}_DLQ", nats_stream(run))).await;
                let _ = js.delete_object_store(bundle_bucket(run)).await;
            }
            Broker::Amqp => {
                let conn = b.amqp_connection().await?;
                let ch = conn.create_channel().await?;
                for q in [dest.clone(), format!("{dest}.retry"), format!("{dest}.dlq")] {
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
            }
        }
    }
    Ok(())
}

async fn sign_in(http: &reqwest::Client, api: &str, user: &str) -> AppResult<String> {
    Ok(http
        .post(format!("{api}/login"))
        .json(&serde_json::json!({ "user": user }))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

async fn forward(api: &str, user: &str, run: &str, b: &Brokers) -> AppResult<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let token = sign_in(&reqwest::Client::new(), api, user).await?;
    let bearer = format!("Bearer {token}");
    let payload = format!("{{\"order\":\"forwarded-{user}\"}}");
    for w in WORKERS {
        let dest = w.destination(run);
        match w.broker {
            Broker::Kafka => {
                let mut c = b.kafka_config();
                c.set("batch.num.messages", "1");
                let producer: FutureProducer = c.create()?;
                let headers = OwnedHeaders::new().insert(Header {
                    key: "authorization",
                    value: Some(bearer.as_bytes()),
                });
                producer
                    .send(
                        FutureRecord::<(), _>::to(&dest)
                            .payload(payload.as_bytes())
                            .headers(headers),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)?;
            }
            Broker::Nats => {
                let js = b.jetstream().await?;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Authorization", bearer.as_str());
                js.publish_with_headers(dest.clone(), headers, payload.clone().into())
                    .await?
                    .await?;
            }
            Broker::Amqp => {
                use lapin::options::BasicPublishOptions;
                use lapin::types::{AMQPValue, FieldTable, LongString};
                let conn = b.amqp_connection().await?;
                let ch = conn.create_channel().await?;
                let mut headers = FieldTable::default();
                headers.insert(
                    "authorization".into(),
                    AMQPValue::LongString(LongString::from(bearer.clone())),
                );
                ch.basic_publish(
                    "".into(),
                    dest.as_str().into(),
                    BasicPublishOptions::default(),
                    payload.as_bytes(),
                    lapin::BasicProperties::default().with_headers(headers),
                )
                .await?
                .await?;
            }
        }
        println!("forwarded {user}'s bearer token to {dest} (the legacy pattern)");
    }
    Ok(())
}

async fn send(api: &str, user: &str, count: usize, phase: &str, ledger: &PathBuf) -> AppResult<()> {
    let http = reqwest::Client::new();
    let token = sign_in(&http, api, user).await?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ledger)?;
    for i in 1..=count {
        let order = format!("{phase}-{user}-{i}");
        let resp = http
            .post(format!("{api}/orders"))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "order": order }))
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("order {order}: {status} {}", resp.text().await?).into());
        }
        let placed: Placed = resp.json().await?;
        println!(
            "placed {} for {} (txn {}, signed with {})",
            placed.order, placed.user, placed.txn, placed.kid
        );
        writeln!(out, "{}", serde_json::to_string(&placed)?)?;
    }
    Ok(())
}

/// A worker's final decision on one transaction.
#[derive(Debug, Clone)]
struct Final {
    verdict: String,
    reason: String,
    /// The signed bundle's revision it was made under.
    revision: u64,
}

/// A worker's final decisions by transaction.
type Decided = BTreeMap<String, Final>;

fn read_decisions(path: &std::path::Path) -> Decided {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Decided::new();
    for line in text.lines() {
        let Ok(r) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let field = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let verdict = field("verdict");
        if verdict == "retry" {
            continue;
        }
        let revision = r
            .get("bundle_revision")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        out.insert(
            field("txn"),
            Final {
                verdict,
                reason: field("reason"),
                revision,
            },
        );
    }
    out
}

async fn check(
    ledger: &std::path::Path,
    run_dir: &std::path::Path,
    expect_kid: &[String],
    expect_revision: &[String],
    timeout: Duration,
) -> AppResult<bool> {
    let placed: Vec<Placed> = std::fs::read_to_string(ledger)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let mut ok = true;
    for e in expect_kid {
        let (phase, kid) = e.split_once('=').ok_or("--expect-kid takes PHASE=KID")?;
        let orders: Vec<&Placed> = placed
            .iter()
            .filter(|p| p.order.starts_with(&format!("{phase}-")))
            .collect();
        let wrong: Vec<String> = orders
            .iter()
            .filter(|p| p.kid != kid)
            .map(|p| format!("{} ({})", p.order, p.kid))
            .collect();
        if orders.is_empty() || !wrong.is_empty() {
            println!(
                "KEY  {phase}: expected every order signed with {kid}; not so: {wrong:?} of {}",
                orders.len()
            );
            ok = false;
        } else {
            println!("KEY  {phase}: {} orders signed with {kid}", orders.len());
        }
    }
    for w in WORKERS {
        let path = run_dir.join(w.name).join("decisions.jsonl");
        let deadline = Instant::now() + timeout;
        let decided = loop {
            let d = read_decisions(&path);
            if placed.iter().all(|p| d.contains_key(&p.txn)) || Instant::now() > deadline {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        println!("{} ({:?}, {}):", w.name, w.broker, w.action);
        let mut counts: BTreeMap<(String, u64, String, String), usize> = BTreeMap::new();
        for p in &placed {
            match decided.get(&p.txn) {
                Some(f) => {
                    let expected = if w.permits(&p.user, f.revision) {
                        "permit"
                    } else {
                        "deny"
                    };
                    *counts
                        .entry((
                            p.user.clone(),
                            f.revision,
                            f.verdict.clone(),
                            f.reason.clone(),
                        ))
                        .or_default() += 1;
                    if f.verdict != expected {
                        println!(
                            "  WRONG {} for {}: {} ({}), policy revision {} says {expected}",
                            p.order, p.user, f.verdict, f.reason, f.revision
                        );
                        ok = false;
                    }
                    for e in expect_revision {
                        if let Some((phase, rev)) = e.split_once('=')
                            && p.order.starts_with(&format!("{phase}-"))
                            && rev.parse::<u64>().ok() != Some(f.revision)
                        {
                            println!(
                                "  WRONG {} decided under bundle revision {}, expected {rev}",
                                p.order, f.revision
                            );
                            ok = false;
                        }
                    }
                }
                None => {
                    println!(
                        "  MISSING {} for {}: no decision within {timeout:?}",
                        p.order, p.user
                    );
                    ok = false;
                }
            }
        }
        for ((user, revision, verdict, reason), n) in counts {
            println!("  {user:<8} rev {revision:<3} {verdict:<10} {reason:<28} {n}");
        }
    }
    println!(
        "{}",
        if ok {
            "deployment check: every outcome matches the policy"
        } else {
            "deployment check: FAILED"
        }
    );
    Ok(ok)
}

/// How many messages the dead-letter destination of `w` holds now.
async fn dead_letter_count(w: &elevate_deploy::Worker, run: &str, b: &Brokers) -> AppResult<u64> {
    let dlq = format!("{}.dlq", w.destination(run));
    match w.broker {
        Broker::Kafka => {
            let mut c = b.kafka_config();
            c.set("group.id", "deploy-client");
            let consumer: rdkafka::consumer::BaseConsumer = c.create()?;
            let (low, high) = tokio::task::spawn_blocking(move || {
                rdkafka::consumer::Consumer::fetch_watermarks(
                    &consumer,
                    &dlq,
                    0,
                    Duration::from_secs(10),
                )
            })
            .await??;
            Ok(u64::try_from(high - low).unwrap_or(0))
        }
        Broker::Nats => {
            let js = b.jetstream().await?;
            let mut stream = js.get_stream(format!("{}_DLQ", nats_stream(run))).await?;
            Ok(stream.info().await?.state.messages)
        }
        Broker::Amqp => {
            use lapin::options::QueueDeclareOptions;
            let conn = b.amqp_connection().await?;
            let ch = conn.create_channel().await?;
            let q = ch
                .queue_declare(
                    dlq.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            Ok(u64::from(q.message_count()))
        }
    }
}

/// Every worker quarantined each forwarded token (`credential-in-message`).
async fn check_forwarded(run_dir: &std::path::Path, forwarded: u64, timeout: Duration) -> bool {
    let mut ok = true;
    for w in WORKERS {
        let path = run_dir.join(w.name).join("decisions.jsonl");
        let deadline = Instant::now() + timeout;
        let count = || {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("\"reason\":\"credential-in-message\""))
                .count() as u64
        };
        let mut n = count();
        while n < forwarded && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            n = count();
        }
        let mark = if n == forwarded { "ok" } else { "WRONG" };
        println!(
            "TOKEN {mark:<5} {}: {n} forwarded bearer tokens quarantined (credential-in-message), {forwarded} sent",
            w.name
        );
        ok &= n == forwarded;
    }
    ok
}

/// Every denied or quarantined decision in a worker's log has its dead
/// letter at `<destination>.dlq`; none is lost, none lettered twice.
async fn check_dead_letters(
    run_dir: &std::path::Path,
    run: &str,
    b: &Brokers,
    timeout: Duration,
) -> AppResult<bool> {
    let mut ok = true;
    for w in WORKERS {
        // Every decision that is not a Permit has exactly one dead letter.
        let log = std::fs::read_to_string(run_dir.join(w.name).join("decisions.jsonl"))?;
        let expected = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| {
                matches!(
                    r.get("verdict").and_then(|v| v.as_str()),
                    Some("deny" | "quarantine")
                )
            })
            .count() as u64;
        let deadline = Instant::now() + timeout;
        let mut n = dead_letter_count(&w, run, b).await?;
        while n < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            n = dead_letter_count(&w, run, b).await?;
        }
        let mark = if n == expected { "ok" } else { "WRONG" };
        println!(
            "DLQ  {mark:<5} {}.dlq holds {n} dead letters, {expected} expected",
            w.destination(run)
        );
        ok &= n == expected;
    }
    Ok(ok)
}
