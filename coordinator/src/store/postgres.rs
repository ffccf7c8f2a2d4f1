//! The PostgreSQL store: one database shared by any number of coordinator replicas.
//!
//! Plain SQL over tokio-postgres. The [`Store`] boundary is synchronous (as SQLite is), so
//! the connections live on a small runtime of their own and each call waits for its answer,
//! with a deadline: a database that does not answer is an error within
//! [`QUERY_DEADLINE`], never a hang. A connection that broke is made again on next use.
//!
//! Every change to the mesh commits with a row in `changes` (its serial is the mesh
//! version) and a `NOTIFY quicmesh_changes` carrying only that version, in the change's
//! own transaction ([`log_change`]): replicas learn of changes from the notification and read what changed
//! from the tables, so a lost notification costs nothing once the next one (or a re-read
//! after a reconnect) comes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls, Row};

use super::{
    json_map, json_vec, to_json, LiveRecord, NodeRecord, PolicyRecord, ReplicaRecord, Store,
    StoreError,
};
use super::{wg_overlay_name, TokenProblem, TokenRecord, WgClientRecord};

/// The longest a store call waits for the database.
pub const QUERY_DEADLINE: Duration = Duration::from_secs(3);
/// Connections per replica (calls are short; a change is one transaction).
const POOL: usize = 4;
/// The channel change notifications are sent on.
pub const CHANNEL: &str = "quicmesh_changes";
/// The channel punch requests pass between replicas on.
pub const PUNCH_CHANNEL: &str = "quicmesh_punch";
/// Advisory lock key under which migrations run (one replica migrates, others wait).
const MIGRATION_LOCK: i64 = 0x7175_6963_6d65_7368; // "quicmesh"

/// Schema migrations, applied in order under an advisory lock; `schema_migrations` says how
/// many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY, node TEXT NOT NULL, services TEXT NOT NULL, labels TEXT NOT NULL,
    created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, used_at BIGINT, used_key TEXT,
    relay BOOLEAN NOT NULL DEFAULT FALSE, voided_at BIGINT);
CREATE INDEX tokens_by_node ON tokens (node);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY, services TEXT NOT NULL, labels TEXT NOT NULL, endpoint TEXT,
    serial TEXT, cert_not_after BIGINT, enrolled_at BIGINT NOT NULL, last_seen BIGINT,
    acked_version BIGINT NOT NULL DEFAULT 0, agent_version TEXT, revoked_at BIGINT,
    relay BOOLEAN NOT NULL DEFAULT FALSE);
CREATE TABLE certs (
    serial TEXT PRIMARY KEY, node TEXT NOT NULL, not_after BIGINT NOT NULL, issued_at BIGINT NOT NULL);
CREATE INDEX certs_by_node ON certs (node);
CREATE TABLE revocations (
    serial TEXT PRIMARY KEY, node TEXT NOT NULL, not_after BIGINT NOT NULL, revoked_at BIGINT NOT NULL);
CREATE TABLE policies (
    version BIGSERIAL PRIMARY KEY, source TEXT NOT NULL, applied_at BIGINT NOT NULL);
CREATE TABLE overlay (idx BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE changes (version BIGSERIAL PRIMARY KEY, at BIGINT NOT NULL);
CREATE TABLE live (
    name TEXT PRIMARY KEY, replica TEXT NOT NULL, connected BOOLEAN NOT NULL,
    changed_at BIGINT NOT NULL, offline BOOLEAN NOT NULL DEFAULT FALSE,
    reach TEXT NOT NULL DEFAULT '', checks TEXT NOT NULL DEFAULT '');
CREATE INDEX live_by_replica ON live (replica);
CREATE TABLE replicas (
    id TEXT PRIMARY KEY, control TEXT NOT NULL, http TEXT NOT NULL, sessions BIGINT NOT NULL,
    started_at BIGINT NOT NULL, heartbeat_ms BIGINT NOT NULL);
"#,
    // Each liveness row says at which version it last changed: replicas re-read only
    // what changed.
    r#"
ALTER TABLE live ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
CREATE INDEX live_by_version ON live (version);
CREATE INDEX nodes_revoked ON nodes (name) WHERE revoked_at IS NOT NULL;
"#,
    // WireGuard clients (their public keys only).
    r#"
CREATE TABLE wg_clients (
    name TEXT PRIMARY KEY, service TEXT NOT NULL, labels TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE, gateways TEXT NOT NULL, created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL, revoked_at BIGINT);
"#,
];

const WG_COLS: &str = "name, service, labels, public_key, gateways, created_at, expires_at, revoked_at, (SELECT idx FROM overlay WHERE overlay.name = 'wg:' || wg_clients.name)";

fn wg_row(r: &Row) -> Result<WgClientRecord, StoreError> {
    Ok(WgClientRecord {
        name: r.get(0),
        service: r.get(1),
        labels: json_map(r.get(2))?,
        public_key: r.get(3),
        gateways: json_vec(r.get(4))?,
        created_at: r.get(5),
        expires_at: r.get(6),
        revoked_at: r.get(7),
        overlay_index: r.get::<_, Option<i64>>(8).map(|i| i.max(0) as u64),
    })
}

/// A call's work on one connection.
type Work<T> = Box<
    dyn for<'a> FnOnce(
            &'a mut Client,
        ) -> Pin<
            Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'a>,
        > + Send,
>;

/// A pool of connections to one database, driven by a runtime of its own.
pub struct PgStore {
    /// The connection string, kept to reconnect (never printed: it may hold a password).
    url: Arc<str>,
    rt: Option<tokio::runtime::Runtime>,
    slots: Vec<Arc<tokio::sync::Mutex<Option<Client>>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropped from async code too: never block there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Error for a database that did not answer in time or went away.
fn unavailable(what: &str) -> StoreError {
    StoreError::Unavailable(what.to_string())
}

/// Connects once (on the store's runtime), spawning the connection's driver.
async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, conn) = tokio::time::timeout(QUERY_DEADLINE, tokio_postgres::connect(url, NoTls))
        .await
        .map_err(|_| unavailable("connecting timed out"))??;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`) and migrates the
    /// schema. Fails with the reason when the database cannot be reached.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        // Parsed first, so a malformed URL is named as such (and not as a network error).
        url.parse::<tokio_postgres::Config>()
            .map_err(|e| StoreError::Config(format!("store url: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("quicmesh-db")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config(format!("database runtime: {e}")))?;
        let store = Self {
            url: Arc::from(url),
            rt: Some(rt),
            slots: (0..POOL)
                .map(|_| Arc::new(tokio::sync::Mutex::new(None)))
                .collect(),
            next: AtomicUsize::new(0),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.run(Box::new(|c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER NOT NULL)",
                )
                .await?;
                let have: i64 = tx
                    .query_one("SELECT count(*) FROM schema_migrations", &[])
                    .await?
                    .get(0);
                for (i, m) in MIGRATIONS.iter().enumerate().skip(have.max(0) as usize) {
                    tx.batch_execute(m).await?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)",
                        &[&(i as i32 + 1)],
                    )
                    .await?;
                }
                tx.commit().await
            })
        }))
    }

    /// Runs `work` on a pooled connection (made again if it broke), within the deadline.
    /// Runs an `UPDATE` of at most one row; when it changed one, the change is logged in
    /// the same transaction (replicas follow it). Whether a row changed.
    fn update_one_logged(
        &self,
        sql: &'static str,
        params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
    ) -> Result<bool, StoreError> {
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                let tx = c.transaction().await?;
                let n = tx.execute(sql, &refs).await?;
                if n == 1 {
                    log_change(&tx).await?;
                }
                tx.commit().await?;
                Ok(n == 1)
            })
        }))
    }

    fn run<T: Send + 'static>(&self, work: Work<T>) -> Result<T, StoreError> {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| unavailable("store closed"))?;
        let slot = self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()].clone();
        let url = self.url.clone();
        let task = rt.spawn(async move {
            let fut = async {
                let mut guard = slot.lock().await;
                if guard.as_ref().is_none_or(Client::is_closed) {
                    *guard = Some(connect(&url).await?);
                }
                let client = guard.as_mut().ok_or_else(|| unavailable("no connection"))?;
                match work(client).await {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        // A connection that failed mid-call is not trusted again.
                        if e.is_closed() || client.is_closed() {
                            *guard = None;
                        }
                        Err(StoreError::from(e))
                    }
                }
            };
            match tokio::time::timeout(QUERY_DEADLINE, fut).await {
                Ok(r) => r,
                Err(_) => Err(unavailable("no answer within the deadline")),
            }
        });
        // Called from async code: on a multi-thread runtime the worker says it blocks, so
        // its other tasks (QUIC endpoints, sessions) move to another thread meanwhile.
        let wait = || futures_executor::block_on(task);
        let joined = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        joined.map_err(|e| unavailable(&e.to_string()))?
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.is_closed() || e.as_db_error().is_none() {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Postgres(e.to_string())
        }
    }
}

/// Writes the change-log row for a change, in the change's own transaction, and queues its
/// notification (sent at commit): a change is never committed without being announced,
/// nor announced without being committed.
async fn log_change(tx: &tokio_postgres::Transaction<'_>) -> Result<i64, tokio_postgres::Error> {
    let v: i64 = tx
        .query_one(
            "INSERT INTO changes (at) VALUES ($1) RETURNING version",
            &[&crate::mesh::now()],
        )
        .await?
        .get(0);
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &v.to_string()])
        .await?;
    Ok(v)
}

const NODE_COLS: &str = "name, services, labels, endpoint, serial, cert_not_after, enrolled_at, last_seen, acked_version, agent_version, revoked_at, (SELECT idx FROM overlay WHERE overlay.name = nodes.name), relay";

fn node_row(r: &Row) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        name: r.get(0),
        services: json_vec(r.get(1))?,
        labels: json_map(r.get(2))?,
        endpoint: r.get(3),
        serial: r.get(4),
        cert_not_after: r.get(5),
        enrolled_at: r.get(6),
        last_seen: r.get(7),
        acked_version: r.get::<_, i64>(8).max(0) as u64,
        agent_version: r.get(9),
        revoked_at: r.get(10),
        overlay_index: r.get::<_, Option<i64>>(11).map(|i| i.max(0) as u64),
        relay: r.get(12),
    })
}

fn policy_row(r: &Row) -> PolicyRecord {
    PolicyRecord {
        version: r.get::<_, i64>(0).max(0) as u64,
        source: r.get(1),
        applied_at: r.get(2),
    }
}

/// Columns: name, replica, connected, changed_at, offline, reach, checks.
fn live_row(r: &Row) -> LiveRecord {
    LiveRecord {
        name: r.get(0),
        replica: r.get(1),
        connected: r.get(2),
        changed_at: r.get(3),
        offline: r.get(4),
        reach: r.get(5),
        checks: r.get(6),
    }
}

fn token_row(r: &Row) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        hash: r.get(0),
        node: r.get(1),
        services: json_vec(r.get(2))?,
        labels: json_map(r.get(3))?,
        created_at: r.get(4),
        expires_at: r.get(5),
        used_at: r.get(6),
        used_key: r.get(7),
        relay: r.get(8),
        voided_at: r.get(9),
    })
}

impl Store for PgStore {
    fn shared(&self) -> bool {
        true
    }

    fn feed_url(&self) -> Option<&str> {
        Some(&self.url)
    }

    fn publish_punch(&self, payload: &str) -> Result<(), StoreError> {
        let payload = payload.to_string();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute("SELECT pg_notify($1, $2)", &[&PUNCH_CHANNEL, &payload])
                    .await?;
                Ok(())
            })
        }))
    }

    fn prune_changes(&self, keep: u64) -> Result<(), StoreError> {
        let keep = keep.min(i64::MAX as u64) as i64;
        self.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "DELETE FROM changes WHERE version < (SELECT max(version) FROM changes) - $1",
                    &[&keep],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_string();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                Ok(
                    c.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
                        .await?
                        .map(|r| r.get(0)),
                )
            })
        }))
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&key, &value],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO tokens (hash, node, services, labels, created_at, expires_at, used_at, relay) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
                    &[&t.hash, &t.node, &to_json(&t.services), &to_json(&t.labels), &t.created_at, &t.expires_at, &t.relay],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let hash = hash.to_string();
        let row = self.run(Box::new(move |c| {
            Box::pin(async move {
                c.query_opt(
                    "SELECT hash, node, services, labels, created_at, expires_at, used_at, used_key, relay, voided_at FROM tokens WHERE hash = $1",
                    &[&hash],
                )
                .await
            })
        }))?;
        row.as_ref().map(token_row).transpose()
    }

    fn enroll(
        &self,
        hash: &str,
        node: &NodeRecord,
        not_after: i64,
        now: i64,
        key_id: &str,
    ) -> Result<Result<(), TokenProblem>, StoreError> {
        let (hash, node, key_id) = (hash.to_string(), node.clone(), key_id.to_string());
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                // FOR UPDATE: two replicas given the same token serialize here; the second
                // sees it used.
                let row = tx
                    .query_opt(
                        "SELECT expires_at, used_at, voided_at FROM tokens WHERE hash = $1 FOR UPDATE",
                        &[&hash],
                    )
                    .await?;
                let problem = match row {
                    None => Some(TokenProblem::Unknown),
                    Some(r) => {
                        let (exp, used, voided): (i64, Option<i64>, Option<i64>) =
                            (r.get(0), r.get(1), r.get(2));
                        if voided.is_some() {
                            Some(TokenProblem::Voided)
                        } else if used.is_some() {
                            Some(TokenProblem::Used)
                        } else if exp <= now {
                            Some(TokenProblem::Expired)
                        } else {
                            None
                        }
                    }
                };
                if let Some(p) = problem {
                    return Ok(Err(p));
                }
                tx.execute(
                    "UPDATE tokens SET used_at = $1, used_key = $3 WHERE hash = $2",
                    &[&now, &hash, &key_id],
                )
                .await?;
                tx.execute(
                    "INSERT INTO nodes (name, services, labels, endpoint, serial, cert_not_after, enrolled_at, last_seen, acked_version, agent_version, revoked_at, relay)
                     VALUES ($1, $2, $3, NULL, $4, $5, $6, NULL, 0, NULL, NULL, $7)
                     ON CONFLICT (name) DO UPDATE SET services = excluded.services, labels = excluded.labels, serial = excluded.serial,
                       cert_not_after = excluded.cert_not_after, enrolled_at = excluded.enrolled_at, revoked_at = NULL, acked_version = 0,
                       relay = excluded.relay",
                    &[&node.name, &to_json(&node.services), &to_json(&node.labels), &node.serial, &not_after, &now, &node.relay],
                )
                .await?;
                if let Some(serial) = &node.serial {
                    tx.execute(
                        "INSERT INTO certs (serial, node, not_after, issued_at) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (serial) DO UPDATE SET node = excluded.node, not_after = excluded.not_after, issued_at = excluded.issued_at",
                        &[serial, &node.name, &not_after, &now],
                    )
                    .await?;
                }
                log_change(&tx).await?;
                tx.commit().await?;
                Ok(Ok(()))
            })
        }))
    }

    fn record_cert(
        &self,
        serial: &str,
        node: &str,
        not_after: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        let (serial, node) = (serial.to_string(), node.to_string());
        let node_name = node.clone();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                // The node's row first: it is locked until commit, so a revocation running
                // now either finished (and this refuses) or waits and then sees this
                // certificate among the node's (and revokes it too).
                let n = tx
                    .execute(
                        "UPDATE nodes SET serial = $1, cert_not_after = $2 WHERE name = $3 AND revoked_at IS NULL",
                        &[&serial, &not_after, &node],
                    )
                    .await?;
                if n == 0 {
                    return Ok(Err(()));
                }
                tx.execute(
                    "INSERT INTO certs (serial, node, not_after, issued_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (serial) DO UPDATE SET node = excluded.node, not_after = excluded.not_after, issued_at = excluded.issued_at",
                    &[&serial, &node, &not_after, &now],
                )
                .await?;
                log_change(&tx).await?;
                tx.commit().await?;
                Ok(Ok(()))
            })
        }))?
        .map_err(|()| StoreError::NodeRevoked(node_name))
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = self.run(Box::new(|c| {
            Box::pin(async move {
                c.query(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY name"), &[])
                    .await
            })
        }))?;
        rows.iter().map(node_row).collect()
    }

    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let name = name.to_string();
        let row = self.run(Box::new(move |c| {
            Box::pin(async move {
                c.query_opt(
                    &format!("SELECT {NODE_COLS} FROM nodes WHERE name = $1"),
                    &[&name],
                )
                .await
            })
        }))?;
        row.as_ref().map(node_row).transpose()
    }

    fn node_hello(
        &self,
        name: &str,
        endpoint: &str,
        agent: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (name, endpoint, agent) = (name.to_string(), endpoint.to_string(), agent.to_string());
        self.run(Box::new(move |c| {
            Box::pin(async move {
                // The old endpoint, read in the same statement that replaces it.
                let old = c
                    .query_opt(
                        "UPDATE nodes n SET endpoint = $1, agent_version = $2, last_seen = $3
                         FROM (SELECT name, endpoint FROM nodes WHERE name = $4 FOR UPDATE) o
                         WHERE n.name = o.name RETURNING o.endpoint",
                        &[&endpoint, &agent, &now, &name],
                    )
                    .await?
                    .and_then(|r| r.get::<_, Option<String>>(0));
                Ok(old.as_deref() != Some(endpoint.as_str()))
            })
        }))
    }

    fn node_seen(&self, name: &str, now: i64) -> Result<(), StoreError> {
        let name = name.to_string();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE nodes SET last_seen = $1 WHERE name = $2",
                    &[&now, &name],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn overlay_index(&self, name: &str) -> Result<u64, StoreError> {
        let name = name.to_string();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO overlay (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
                    &[&name],
                )
                .await?;
                let idx: i64 = c
                    .query_one("SELECT idx FROM overlay WHERE name = $1", &[&name])
                    .await?
                    .get(0);
                Ok(idx.max(0) as u64)
            })
        }))
    }

    fn nodes_acked(&self, acks: &[(String, u64)]) -> Result<(), StoreError> {
        if acks.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = acks.iter().map(|(n, _)| n.clone()).collect();
        let versions: Vec<i64> = acks.iter().map(|(_, v)| *v as i64).collect();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                // One statement for the whole batch (a policy change is one ack per node).
                c.execute(
                    "UPDATE nodes n SET acked_version = a.v
                     FROM UNNEST($1::text[], $2::bigint[]) AS a(name, v)
                     WHERE n.name = a.name AND n.acked_version < a.v",
                    &[&names, &versions],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn revoke_node(&self, name: &str, now: i64) -> Result<Option<Vec<String>>, StoreError> {
        let name = name.to_string();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                // Every token for the name, even before the node enrolled.
                let voided = tx
                    .execute(
                        "UPDATE tokens SET voided_at = $1 WHERE node = $2 AND voided_at IS NULL",
                        &[&now, &name],
                    )
                    .await?;
                let n = tx
                    .execute(
                        "UPDATE nodes SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
                        &[&now, &name],
                    )
                    .await?;
                if n == 0 {
                    let exists = tx
                        .query_opt("SELECT name FROM nodes WHERE name = $1", &[&name])
                        .await?
                        .is_some();
                    if voided > 0 {
                        log_change(&tx).await?;
                    }
                    tx.commit().await?;
                    return Ok((exists || voided > 0).then(Vec::new));
                }
                let serials: Vec<String> = tx
                    .query(
                        "INSERT INTO revocations (serial, node, not_after, revoked_at)
                         SELECT serial, node, not_after, $2 FROM certs WHERE node = $1
                         ON CONFLICT (serial) DO NOTHING RETURNING serial",
                        &[&name, &now],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                log_change(&tx).await?;
                tx.commit().await?;
                Ok(Some(serials))
            })
        }))
    }

    fn insert_wg_client(&self, w: &WgClientRecord) -> Result<bool, StoreError> {
        let w = w.clone();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let n = tx
                    .execute(
                        "INSERT INTO wg_clients (name, service, labels, public_key, gateways, created_at, expires_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                        &[
                            &w.name,
                            &w.service,
                            &to_json(&w.labels),
                            &w.public_key,
                            &to_json(&w.gateways),
                            &w.created_at,
                            &w.expires_at,
                        ],
                    )
                    .await?;
                if n == 1 {
                    tx.execute(
                        "INSERT INTO overlay (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
                        &[&wg_overlay_name(&w.name)],
                    )
                    .await?;
                    log_change(&tx).await?;
                }
                tx.commit().await?;
                Ok(n == 1)
            })
        }))
    }

    fn wg_clients(&self) -> Result<Vec<WgClientRecord>, StoreError> {
        let rows = self.run(Box::new(move |c| {
            Box::pin(async move {
                c.query(
                    &format!("SELECT {WG_COLS} FROM wg_clients ORDER BY name"),
                    &[],
                )
                .await
            })
        }))?;
        rows.iter().map(wg_row).collect()
    }

    fn revoke_wg_client(&self, name: &str, now: i64) -> Result<bool, StoreError> {
        self.update_one_logged(
            "UPDATE wg_clients SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
            vec![Box::new(now), Box::new(name.to_string())],
        )
    }

    fn set_relay(&self, name: &str, relay: bool) -> Result<bool, StoreError> {
        self.update_one_logged(
            "UPDATE nodes SET relay = $1 WHERE name = $2 AND revoked_at IS NULL",
            vec![Box::new(relay), Box::new(name.to_string())],
        )
    }

    fn revoked_serials(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.run(Box::new(move |c| {
            Box::pin(async move {
                Ok(c.query(
                    "SELECT serial FROM revocations WHERE not_after > $1 ORDER BY serial",
                    &[&now],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect())
            })
        }))
    }

    fn insert_policy(&self, source: &str, now: i64) -> Result<u64, StoreError> {
        let source = source.to_string();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let v: i64 = tx
                    .query_one(
                        "INSERT INTO policies (source, applied_at) VALUES ($1, $2) RETURNING version",
                        &[&source, &now],
                    )
                    .await?
                    .get(0);
                log_change(&tx).await?;
                tx.commit().await?;
                Ok(v.max(0) as u64)
            })
        }))
    }

    fn latest_policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        self.run(Box::new(|c| {
            Box::pin(async move {
                Ok(c.query_opt(
                    "SELECT version, source, applied_at FROM policies ORDER BY version DESC LIMIT 1",
                    &[],
                )
                .await?
                .as_ref()
                .map(policy_row))
            })
        }))
    }

    fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        self.run(Box::new(|c| {
            Box::pin(async move {
                Ok(c.query(
                    "SELECT version, source, applied_at FROM policies ORDER BY version",
                    &[],
                )
                .await?
                .iter()
                .map(policy_row)
                .collect())
            })
        }))
    }

    fn bump_version(&self) -> Result<u64, StoreError> {
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let v = log_change(&tx).await?;
                tx.commit().await?;
                Ok(v.max(0) as u64)
            })
        }))
    }

    fn version(&self) -> Result<u64, StoreError> {
        self.run(Box::new(|c| {
            Box::pin(async move {
                let v: i64 = c
                    .query_one("SELECT COALESCE(max(version), 0) FROM changes", &[])
                    .await?
                    .get(0);
                Ok(v.max(0) as u64)
            })
        }))
    }

    fn live(&self) -> Result<Vec<LiveRecord>, StoreError> {
        self.run(Box::new(|c| {
            Box::pin(async move {
                Ok(c.query(
                    "SELECT name, replica, connected, changed_at, offline, reach, checks FROM live ORDER BY name",
                    &[],
                )
                .await?
                .iter()
                .map(live_row)
                .collect())
            })
        }))
    }

    fn live_since(&self, version: u64) -> Result<Vec<LiveRecord>, StoreError> {
        let version = version.min(i64::MAX as u64) as i64;
        self.run(Box::new(move |c| {
            Box::pin(async move {
                Ok(c.query(
                    "SELECT name, replica, connected, changed_at, offline, reach, checks FROM live WHERE version > $1",
                    &[&version],
                )
                .await?
                .iter()
                .map(live_row)
                .collect())
            })
        }))
    }

    fn revoked_nodes(&self) -> Result<Vec<String>, StoreError> {
        self.run(Box::new(|c| {
            Box::pin(async move {
                Ok(
                    c.query("SELECT name FROM nodes WHERE revoked_at IS NOT NULL", &[])
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect(),
                )
            })
        }))
    }

    fn put_live(&self, l: &LiveRecord) -> Result<(), StoreError> {
        let l = l.clone();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let v = log_change(&tx).await?;
                tx.execute(
                    "INSERT INTO live (name, replica, connected, changed_at, offline, reach, checks, version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (name) DO UPDATE SET replica = excluded.replica, connected = excluded.connected,
                       changed_at = excluded.changed_at, offline = excluded.offline, reach = excluded.reach, checks = excluded.checks,
                       version = excluded.version",
                    &[&l.name, &l.replica, &l.connected, &l.changed_at, &l.offline, &l.reach, &l.checks, &v],
                )
                .await?;
                tx.commit().await
            })
        }))
    }

    fn live_ended(&self, node: &str, replica: &str, now: i64) -> Result<(), StoreError> {
        let (node, replica) = (node.to_string(), replica.to_string());
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let v = log_change(&tx).await?;
                let n = tx
                    .execute(
                        "UPDATE live SET connected = FALSE, changed_at = $3, version = $4 WHERE name = $1 AND replica = $2 AND connected",
                        &[&node, &replica, &now, &v],
                    )
                    .await?;
                if n == 0 {
                    // Nothing changed: no change logged either.
                    return tx.rollback().await;
                }
                tx.commit().await
            })
        }))
    }

    fn replica_restarted(&self, replica: &str, now: i64) -> Result<(), StoreError> {
        let replica = replica.to_string();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                // Logged as a change, as every liveness write is: the other replicas read
                // these rows by version, and their offline sweeps trust what they read.
                let tx = c.transaction().await?;
                let v = log_change(&tx).await?;
                let n = tx
                    .execute(
                        "UPDATE live SET connected = FALSE, changed_at = $2, version = $3 WHERE replica = $1 AND connected",
                        &[&replica, &now, &v],
                    )
                    .await?;
                if n == 0 {
                    return tx.rollback().await;
                }
                tx.commit().await
            })
        }))
    }

    fn set_offline(&self, nodes: &[String], offline: bool) -> Result<(), StoreError> {
        let nodes = nodes.to_vec();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                if nodes.is_empty() {
                    return Ok(());
                }
                let tx = c.transaction().await?;
                let v = log_change(&tx).await?;
                tx.execute(
                    "UPDATE live SET offline = $2, version = $3 WHERE name = ANY($1)",
                    &[&nodes, &offline, &v],
                )
                .await?;
                tx.commit().await
            })
        }))
    }

    fn heartbeat(&self, r: &ReplicaRecord) -> Result<(), StoreError> {
        let r = r.clone();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO replicas (id, control, http, sessions, started_at, heartbeat_ms) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (id) DO UPDATE SET control = excluded.control, http = excluded.http, sessions = excluded.sessions,
                       started_at = excluded.started_at, heartbeat_ms = excluded.heartbeat_ms",
                    &[&r.id, &r.control, &r.http, &(r.sessions as i64), &r.started_at, &r.heartbeat_ms],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn replicas(&self) -> Result<Vec<ReplicaRecord>, StoreError> {
        self.run(Box::new(|c| {
            Box::pin(async move {
                Ok(c.query(
                    "SELECT id, control, http, sessions, started_at, heartbeat_ms FROM replicas ORDER BY heartbeat_ms DESC",
                    &[],
                )
                .await?
                .iter()
                .map(|r| ReplicaRecord {
                    id: r.get(0),
                    control: r.get(1),
                    http: r.get(2),
                    sessions: r.get::<_, i64>(3).max(0) as u64,
                    started_at: r.get(4),
                    heartbeat_ms: r.get(5),
                })
                .collect())
            })
        }))
    }
}

/// Advisory lock key of the singleton jobs (the offline sweep).
const SINGLETON_LOCK: i64 = 0x7175_6963_6d65_7331; // "quicmes1"

/// What the change feed reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// A change committed at this mesh version.
    Changed(u64),
    /// The feed (re)connected: changes may have been missed, read the store again.
    Connected,
    /// This replica holds (true) or lost (false) the singleton lock.
    Leader(bool),
    /// A punch request another replica passed on (its JSON).
    Punch(String),
}

/// Listens for change notifications on `url` for the life of the process, reconnecting
/// after any failure; the same connection takes the singleton lock when free and holds it
/// until it ends.
pub async fn feed(
    url: Arc<str>,
    on: impl Fn(FeedEvent) + Send + Sync + 'static,
    fenced: impl Fn() -> bool + Send + Sync + 'static,
) {
    loop {
        if let Err(e) = feed_once(&url, &on, &fenced).await {
            tracing::warn!(error = %e, "change feed down; reconnecting");
        }
        on(FeedEvent::Leader(false));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn feed_once(
    url: &str,
    on: &(impl Fn(FeedEvent) + Send + Sync),
    fenced: &(impl Fn() -> bool + Send + Sync),
) -> Result<(), StoreError> {
    let (client, mut conn) =
        tokio::time::timeout(QUERY_DEADLINE, tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| unavailable("connecting timed out"))??;
    // Bounded: a flood of notifications is dropped here (a lost change notification is
    // made up by the periodic re-read; a lost punch by the node dialling again).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<FeedEvent>(4096);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    let ev = if n.channel() == PUNCH_CHANNEL {
                        FeedEvent::Punch(n.payload().to_string())
                    } else {
                        match n.payload().parse() {
                            Ok(v) => FeedEvent::Changed(v),
                            Err(_) => FeedEvent::Connected,
                        }
                    };
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = tx.try_send(ev)
                    {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "change feed connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _driver = Abort(driver);
    let deadline = |f| tokio::time::timeout(QUERY_DEADLINE, f);
    // The server notices this connection gone within seconds (not TCP's two hours), and
    // with it lets the singleton lock go: a leader cut off or crashed is replaced soon.
    deadline(client.batch_execute(&format!(
        "SET tcp_keepalives_idle = 2; SET tcp_keepalives_interval = 1; SET tcp_keepalives_count = 3; SET tcp_user_timeout = 5000; LISTEN {CHANNEL}; LISTEN {PUNCH_CHANNEL}"
    )))
        .await
        .map_err(|_| unavailable("LISTEN timed out"))??;
    on(FeedEvent::Connected);
    let mut leader = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            n = rx.recv() => match n {
                Some(ev) => on(ev),
                None => return Err(unavailable("change feed connection closed")),
            },
            _ = tick.tick() => {
                // A fenced replica leads nothing: the connection (and the lock) goes.
                if fenced() {
                    return Err(unavailable("replica fenced: singleton lock released"));
                }
                // Also proves the connection alive: a dead one ends the feed (and the lock).
                let ask = async {
                    if leader {
                        client.simple_query("SELECT 1").await.map(|_| true)
                    } else {
                        let r = client
                            .query_one("SELECT pg_try_advisory_lock($1)", &[&SINGLETON_LOCK])
                            .await?;
                        Ok(r.get::<_, bool>(0))
                    }
                };
                let held = tokio::time::timeout(QUERY_DEADLINE, ask)
                    .await
                    .map_err(|_| unavailable("change feed: no answer"))??;
                leader = held;
                // Said every tick: the replica's flag follows the lock, whatever set it.
                on(FeedEvent::Leader(held));
            }
        }
    }
}
