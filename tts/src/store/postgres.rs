//! The fleet store in PostgreSQL (tokio-postgres).
//!
//! Tables live in one schema per trust domain (`[store] schema`), created at
//! start if missing: `tts_workloads` (one row per workload; a revocation is a
//! tombstone, `revoked = true`, so the configuration seed cannot bring it
//! back), `tts_jti` (the client- and admin-assertion seen-set, primary key
//! `(ns, iss, jti)`: `INSERT … ON CONFLICT DO NOTHING` is the atomic
//! first-use test), `tts_signing_keys` and `tts_audit`. Every change is one
//! statement that also writes its audit row and calls `pg_notify` on the
//! schema's channel, so a change, its audit entry and its notification are
//! committed together or not at all.
//!
//! Two connections: one for changes and reads, one for `jti` claims with
//! `synchronous_commit = off` (a claim is on the hot path; what a crash of
//! the server could lose is the last few hundred milliseconds of claims, for
//! assertions that live at most 60 s). A third connection per replica
//! LISTENs. A broken connection is re-opened on the next call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures::StreamExt;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::{
    AuditEntry, AuditRecord, SharedStore, SigningKeyRecord, Snapshot, StoreError, WorkloadRecord,
    now_ms,
};

/// Longest any store call may take before it counts as a failure.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(3);

/// True for a schema name the store accepts: 1–48 of `[a-z0-9_]`, not
/// starting with a digit (it is put into SQL as an identifier).
pub fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 48
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[derive(Debug)]
struct Conn {
    slot: ArcSwapOption<Client>,
    lock: tokio::sync::Mutex<()>,
    fast_commit: bool,
}

/// The PostgreSQL fleet store.
pub struct PgStore {
    url: String,
    schema: String,
    channel: String,
    main: Conn,
    hot: Conn,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: not printed.
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

fn pg(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(STORE_TIMEOUT, f)
        .await
        .map_err(|_| StoreError(format!("no answer within {STORE_TIMEOUT:?}")))?
}

async fn open(url: &str, schema: &str, fast_commit: bool) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| StoreError(format!("cannot connect to PostgreSQL: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    let mut setup = format!("SET search_path TO \"{schema}\";");
    if fast_commit {
        setup.push_str("SET synchronous_commit TO off;");
    }
    client.batch_execute(&setup).await.map_err(pg)?;
    Ok(client)
}

impl PgStore {
    /// Connects to `url` (a libpq-style connection string or URL), creates
    /// `schema` and its tables when missing.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if `schema` is not a valid name, the server
    /// cannot be reached within [`STORE_TIMEOUT`], or the tables cannot be created.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, StoreError> {
        if !valid_schema(schema) {
            return Err(StoreError(format!(
                "schema {schema:?}: use 1-48 of a-z, 0-9 and _, not starting with a digit"
            )));
        }
        let store = PgStore {
            url: url.to_string(),
            schema: schema.to_string(),
            channel: format!("tts_changes_{schema}"),
            main: Conn {
                slot: ArcSwapOption::empty(),
                lock: tokio::sync::Mutex::new(()),
                fast_commit: false,
            },
            hot: Conn {
                slot: ArcSwapOption::empty(),
                lock: tokio::sync::Mutex::new(()),
                fast_commit: true,
            },
        };
        timed(store.init()).await?;
        Ok(store)
    }

    async fn init(&self) -> Result<(), StoreError> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .map_err(|e| StoreError(format!("cannot connect to PostgreSQL: {e}")))?;
        let task = tokio::spawn(connection);
        let s = &self.schema;
        // Replicas start together: the advisory lock serializes the DDL.
        let ddl = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('elevate-tts-schema'));
             CREATE SCHEMA IF NOT EXISTS \"{s}\";
             CREATE TABLE IF NOT EXISTS \"{s}\".tts_workloads (
               id text PRIMARY KEY,
               jwks jsonb NOT NULL,
               allowed_scopes text[] NOT NULL,
               auth_methods jsonb,
               suspended boolean NOT NULL DEFAULT false,
               revoked boolean NOT NULL DEFAULT false,
               updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS \"{s}\".tts_jti (
               ns text NOT NULL, iss text NOT NULL, jti text NOT NULL,
               expires_at bigint NOT NULL,
               PRIMARY KEY (ns, iss, jti));
             CREATE TABLE IF NOT EXISTS \"{s}\".tts_signing_keys (
               kid text PRIMARY KEY,
               pem text NOT NULL,
               not_before_ms bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS \"{s}\".tts_audit (
               seq bigserial PRIMARY KEY,
               at_ms bigint NOT NULL,
               operator text NOT NULL,
               replica text NOT NULL,
               action text NOT NULL,
               target text NOT NULL,
               detail jsonb NOT NULL);
             COMMIT;"
        );
        let result = client.batch_execute(&ddl).await.map_err(pg);
        drop(client);
        let _ = task.await;
        result
    }

    async fn client(&self, conn: &Conn) -> Result<Arc<Client>, StoreError> {
        if let Some(c) = conn.slot.load_full().filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        let _g = conn.lock.lock().await;
        if let Some(c) = conn.slot.load_full().filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        let c = Arc::new(open(&self.url, &self.schema, conn.fast_commit).await?);
        conn.slot.store(Some(c.clone()));
        Ok(c)
    }

    /// Deletes `jti` entries that expired (the fleet task calls it now and then).
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if the store cannot be written.
    pub async fn prune_jti(&self) -> Result<u64, StoreError> {
        timed(async {
            let c = self.client(&self.hot).await?;
            c.execute(
                "DELETE FROM tts_jti WHERE expires_at < $1",
                &[&(now_ms() / 1000)],
            )
            .await
            .map_err(pg)
        })
        .await
    }

    /// Drops `schema` and everything in it (tests clean up with it).
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] if `schema` is not a valid name or the server
    /// cannot be reached or refuses.
    pub async fn drop_schema(url: &str, schema: &str) -> Result<(), StoreError> {
        if !valid_schema(schema) {
            return Err(StoreError(format!("schema {schema:?} is not a valid name")));
        }
        timed(async {
            let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(pg)?;
            let task = tokio::spawn(connection);
            let r = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .await
                .map_err(pg);
            drop(client);
            let _ = task.await;
            r
        })
        .await
    }

    fn audit_params(a: &AuditRecord) -> (String, String, String, String, serde_json::Value) {
        (
            a.operator.clone(),
            a.replica.clone(),
            a.action.clone(),
            a.target.clone(),
            a.detail.clone(),
        )
    }
}

fn record_from_row(row: &tokio_postgres::Row) -> Result<WorkloadRecord, StoreError> {
    let jwks: serde_json::Value = row.try_get("jwks").map_err(pg)?;
    let auth: Option<serde_json::Value> = row.try_get("auth_methods").map_err(pg)?;
    let id: String = row.try_get("id").map_err(pg)?;
    let jwks = match jwks {
        serde_json::Value::Array(a) => a,
        _ => return Err(StoreError(format!("workload {id}: jwks is not an array"))),
    };
    let auth_methods = match auth {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<Vec<String>>(v)
                .map_err(|e| StoreError(format!("workload {id}: auth_methods: {e}")))?,
        ),
    };
    Ok(WorkloadRecord {
        jwks,
        allowed_scopes: row.try_get("allowed_scopes").map_err(pg)?,
        auth_methods,
        suspended: row.try_get("suspended").map_err(pg)?,
        id,
    })
}

#[async_trait::async_trait]
impl SharedStore for PgStore {
    async fn claim_jti(
        &self,
        namespace: &str,
        iss: &str,
        jti: &str,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        timed(async {
            let c = self.client(&self.hot).await?;
            let n = c
                .execute(
                    "INSERT INTO tts_jti (ns, iss, jti, expires_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                    &[&namespace, &iss, &jti, &expires_at],
                )
                .await
                .map_err(pg)?;
            Ok(n == 1)
        })
        .await
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        timed(async {
            let c = self.client(&self.main).await?;
            let rows = c
                .query(
                    "SELECT id, jwks, allowed_scopes, auth_methods, suspended FROM tts_workloads \
                     WHERE NOT revoked ORDER BY id",
                    &[],
                )
                .await
                .map_err(pg)?;
            let workloads = rows
                .iter()
                .map(record_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let rows = c
                .query(
                    "SELECT kid, pem, not_before_ms FROM tts_signing_keys \
                     ORDER BY not_before_ms, kid",
                    &[],
                )
                .await
                .map_err(pg)?;
            let signing_keys = rows
                .iter()
                .map(|r| {
                    Ok(SigningKeyRecord {
                        kid: r.try_get("kid").map_err(pg)?,
                        pem: r.try_get("pem").map_err(pg)?,
                        not_before_ms: r.try_get("not_before_ms").map_err(pg)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Snapshot {
                workloads,
                signing_keys,
            })
        })
        .await
    }

    async fn seed_workload(&self, w: &WorkloadRecord) -> Result<bool, StoreError> {
        timed(async {
            let c = self.client(&self.main).await?;
            let jwks = serde_json::Value::Array(w.jwks.clone());
            let auth = w.auth_methods.as_ref().map(|m| serde_json::json!(m));
            let rows = c
                .query(
                    "WITH s AS (INSERT INTO tts_workloads (id, jwks, allowed_scopes, auth_methods) \
                       VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING RETURNING id) \
                     SELECT s.id FROM s, pg_notify($5, 'seed')",
                    &[&w.id, &jwks, &w.allowed_scopes, &auth, &self.channel],
                )
                .await
                .map_err(pg)?;
            Ok(!rows.is_empty())
        })
        .await
    }

    async fn put_workload(&self, w: &WorkloadRecord, a: &AuditRecord) -> Result<(), StoreError> {
        timed(async {
            let c = self.client(&self.main).await?;
            let jwks = serde_json::Value::Array(w.jwks.clone());
            let auth = w.auth_methods.as_ref().map(|m| serde_json::json!(m));
            let (op, rep, act, tgt, det) = Self::audit_params(a);
            let rows = c
                .query(
                    "WITH u AS (INSERT INTO tts_workloads (id, jwks, allowed_scopes, auth_methods, suspended, revoked) \
                       VALUES ($1, $2, $3, $4, $5, false) \
                       ON CONFLICT (id) DO UPDATE SET jwks = EXCLUDED.jwks, \
                         allowed_scopes = EXCLUDED.allowed_scopes, auth_methods = EXCLUDED.auth_methods, \
                         suspended = EXCLUDED.suspended, revoked = false, updated_at = now() \
                       RETURNING id), \
                     au AS (INSERT INTO tts_audit (at_ms, operator, replica, action, target, detail) \
                       SELECT $6, $7, $8, $9, $10, $11 FROM u RETURNING seq) \
                     SELECT au.seq FROM au, pg_notify($12, 'change')",
                    &[
                        &w.id, &jwks, &w.allowed_scopes, &auth, &w.suspended, &now_ms(), &op,
                        &rep, &act, &tgt, &det, &self.channel,
                    ],
                )
                .await
                .map_err(pg)?;
            if rows.is_empty() {
                return Err(StoreError(format!("workload {} was not written", w.id)));
            }
            Ok(())
        })
        .await
    }

    async fn revoke_workload(&self, id: &str, a: &AuditRecord) -> Result<bool, StoreError> {
        timed(async {
            let c = self.client(&self.main).await?;
            let (op, rep, act, tgt, det) = Self::audit_params(a);
            let rows = c
                .query(
                    "WITH r AS (UPDATE tts_workloads SET revoked = true, suspended = false, \
                       updated_at = now() WHERE id = $1 AND NOT revoked RETURNING id), \
                     au AS (INSERT INTO tts_audit (at_ms, operator, replica, action, target, detail) \
                       SELECT $2, $3, $4, $5, $6, $7 FROM r RETURNING seq) \
                     SELECT au.seq FROM au, pg_notify($8, 'change')",
                    &[&id, &now_ms(), &op, &rep, &act, &tgt, &det, &self.channel],
                )
                .await
                .map_err(pg)?;
            Ok(!rows.is_empty())
        })
        .await
    }

    async fn set_suspended(
        &self,
        id: &str,
        suspended: bool,
        a: &AuditRecord,
    ) -> Result<bool, StoreError> {
        timed(async {
            let c = self.client(&self.main).await?;
            let (op, rep, act, tgt, det) = Self::audit_params(a);
            let rows = c
                .query(
                    "WITH r AS (UPDATE tts_workloads SET suspended = $2, updated_at = now() \
                       WHERE id = $1 AND NOT revoked AND suspended <> $2 RETURNING id), \
                     au AS (INSERT INTO tts_audit (at_ms, operator, replica, action, target, detail) \
                       SELECT $3, $4, $5, $6, $7, $8 FROM r RETURNING seq) \
                     SELECT au.seq FROM au, pg_notify($9, 'change')",
                    &[
                        &id, &suspended, &now_ms(), &op, &rep, &act, &tgt, &det, &self.channel,
                    ],
                )
                .await
                .map_err(pg)?;
            Ok(!rows.is_empty())
        })
        .await
    }

    async fn seed_signing_key(&self, key: &SigningKeyRecord) -> Result<bool, StoreError> {
        timed(async {
            let c = self.client(&self.main).await?;
            // Inserted only into an empty table; the advisory lock makes
            // "empty" mean the same to replicas starting together.
            let rows = c
                .query(
                    "WITH l AS (SELECT pg_advisory_xact_lock(hashtext('elevate-tts-signing'))), \
                     s AS (INSERT INTO tts_signing_keys (kid, pem, not_before_ms) \
                       SELECT $1, $2, $3 FROM l \
                       WHERE NOT EXISTS (SELECT 1 FROM tts_signing_keys) RETURNING kid) \
                     SELECT s.kid FROM s, pg_notify($4, 'keys')",
                    &[&key.kid, &key.pem, &key.not_before_ms, &self.channel],
                )
                .await
                .map_err(pg)?;
            Ok(!rows.is_empty())
        })
        .await
    }

    async fn add_signing_key(
        &self,
        key: &SigningKeyRecord,
        prune_before_ms: i64,
        a: &AuditRecord,
    ) -> Result<(), StoreError> {
        timed(async {
            let c = self.client(&self.main).await?;
            let (op, rep, act, tgt, det) = Self::audit_params(a);
            // A key is retired when the next one starts signing; those
            // retired before `prune_before_ms` are deleted.
            let rows = c
                .query(
                    "WITH p AS (DELETE FROM tts_signing_keys k WHERE EXISTS ( \
                         SELECT 1 FROM tts_signing_keys n WHERE n.not_before_ms > k.not_before_ms \
                         AND n.not_before_ms < $4) RETURNING kid), \
                     i AS (INSERT INTO tts_signing_keys (kid, pem, not_before_ms) \
                       VALUES ($1, $2, $3) RETURNING kid), \
                     au AS (INSERT INTO tts_audit (at_ms, operator, replica, action, target, detail) \
                       SELECT $5, $6, $7, $8, $9, \
                         $10::jsonb || jsonb_build_object('pruned', (SELECT coalesce(jsonb_agg(kid), '[]'::jsonb) FROM p)) \
                       FROM i RETURNING seq) \
                     SELECT au.seq FROM au, pg_notify($11, 'keys')",
                    &[
                        &key.kid, &key.pem, &key.not_before_ms, &prune_before_ms, &now_ms(), &op,
                        &rep, &act, &tgt, &det, &self.channel,
                    ],
                )
                .await
                .map_err(pg)?;
            if rows.is_empty() {
                return Err(StoreError(format!("signing key {} was not written", key.kid)));
            }
            Ok(())
        })
        .await
    }

    async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        timed(async {
            let c = self.client(&self.main).await?;
            let rows = c
                .query(
                    "SELECT * FROM (SELECT seq, at_ms, operator, replica, action, target, detail \
                     FROM tts_audit ORDER BY seq DESC LIMIT $1) t ORDER BY seq",
                    &[&limit],
                )
                .await
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    Ok(AuditEntry {
                        seq: r.try_get("seq").map_err(pg)?,
                        at_ms: r.try_get("at_ms").map_err(pg)?,
                        operator: r.try_get("operator").map_err(pg)?,
                        replica: r.try_get("replica").map_err(pg)?,
                        action: r.try_get("action").map_err(pg)?,
                        target: r.try_get("target").map_err(pg)?,
                        detail: r.try_get("detail").map_err(pg)?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn prune(&self) -> Result<u64, StoreError> {
        self.prune_jti().await
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        timed(async {
            let start = Instant::now();
            let c = self.client(&self.main).await?;
            c.simple_query("SELECT 1").await.map_err(pg)?;
            Ok(start.elapsed())
        })
        .await
    }

    async fn subscribe(&self) -> Result<tokio::sync::mpsc::Receiver<()>, StoreError> {
        timed(async {
            let (client, mut connection) = tokio_postgres::connect(&self.url, NoTls)
                .await
                .map_err(|e| StoreError(format!("cannot connect to PostgreSQL: {e}")))?;
            let (tx, rx) = tokio::sync::mpsc::channel::<()>(16);
            let poller = tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(m) = messages.next().await {
                    match m {
                        Ok(AsyncMessage::Notification(_)) => {
                            if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) =
                                tx.try_send(())
                            {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "PostgreSQL LISTEN connection ended");
                            break;
                        }
                    }
                }
            });
            client
                .batch_execute(&format!("LISTEN \"{}\"", self.channel))
                .await
                .map_err(pg)?;
            // The client must live as long as the connection is listened on.
            tokio::spawn(async move {
                let _client = client;
                let _ = poller.await;
            });
            Ok(rx)
        })
        .await
    }
}
