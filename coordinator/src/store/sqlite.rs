//! The embedded store: SQLite in one file in the data dir (one coordinator, `dev`).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    json_map, json_vec, to_json, wg_overlay_name, LiveRecord, NodeRecord, PolicyRecord,
    ReplicaRecord, Store, StoreError, TokenProblem, TokenRecord, WgClientRecord,
};

/// SQLite, in one file in the data dir.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

/// Schema migrations, applied in order; `PRAGMA user_version` says how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY, node TEXT NOT NULL, services TEXT NOT NULL, labels TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, used_at INTEGER);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY, services TEXT NOT NULL, labels TEXT NOT NULL, endpoint TEXT,
    serial TEXT, cert_not_after INTEGER, enrolled_at INTEGER NOT NULL, last_seen INTEGER,
    acked_version INTEGER NOT NULL DEFAULT 0, agent_version TEXT, revoked_at INTEGER);
CREATE TABLE certs (
    serial TEXT PRIMARY KEY, node TEXT NOT NULL, not_after INTEGER NOT NULL, issued_at INTEGER NOT NULL);
CREATE TABLE revocations (
    serial TEXT PRIMARY KEY, node TEXT NOT NULL, not_after INTEGER NOT NULL, revoked_at INTEGER NOT NULL);
CREATE TABLE policies (
    version INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, applied_at INTEGER NOT NULL);
"#,
    r#"
CREATE TABLE overlay (idx INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE);
"#,
    r#"
ALTER TABLE tokens ADD COLUMN used_key TEXT;
"#,
    // The relay role comes from the token (older rows: not granted); a revocation voids
    // the tokens of the node's name.
    r#"
ALTER TABLE tokens ADD COLUMN relay INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tokens ADD COLUMN voided_at INTEGER;
ALTER TABLE nodes ADD COLUMN relay INTEGER NOT NULL DEFAULT 0;
"#,
    // Liveness and replicas (one, with SQLite) live in the store, as with PostgreSQL.
    r#"
CREATE TABLE live (
    name TEXT PRIMARY KEY, replica TEXT NOT NULL, connected INTEGER NOT NULL,
    changed_at INTEGER NOT NULL, offline INTEGER NOT NULL DEFAULT 0,
    reach TEXT NOT NULL DEFAULT '', checks TEXT NOT NULL DEFAULT '');
CREATE TABLE replicas (
    id TEXT PRIMARY KEY, control TEXT NOT NULL, http TEXT NOT NULL, sessions INTEGER NOT NULL,
    started_at INTEGER NOT NULL, heartbeat_ms INTEGER NOT NULL);
"#,
    // WireGuard clients (their public keys only).
    r#"
CREATE TABLE wg_clients (
    name TEXT PRIMARY KEY, service TEXT NOT NULL, labels TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE, gateways TEXT NOT NULL, created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, revoked_at INTEGER);
"#,
];

const WG_COLS: &str = "name, service, labels, public_key, gateways, created_at, expires_at, revoked_at, (SELECT idx FROM overlay WHERE overlay.name = 'wg:' || wg_clients.name)";

type RawWg = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
);

fn raw_wg(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawWg> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn wg_from(raw: RawWg) -> Result<WgClientRecord, StoreError> {
    Ok(WgClientRecord {
        name: raw.0,
        service: raw.1,
        labels: json_map(raw.2)?,
        public_key: raw.3,
        gateways: json_vec(raw.4)?,
        created_at: raw.5,
        expires_at: raw.6,
        revoked_at: raw.7,
        overlay_index: raw.8.map(|i| i.max(0) as u64),
    })
}

const NODE_COLS: &str = "name, services, labels, endpoint, serial, cert_not_after, enrolled_at, last_seen, acked_version, agent_version, revoked_at, (SELECT idx FROM overlay WHERE overlay.name = nodes.name), relay";

type RawNode = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    i64,
    Option<i64>,
    i64,
    Option<String>,
    Option<i64>,
    Option<i64>,
    bool,
);

fn raw_node(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawNode> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
    ))
}

fn policy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PolicyRecord> {
    Ok(PolicyRecord {
        version: r.get::<_, i64>(0)?.max(0) as u64,
        source: r.get(1)?,
        applied_at: r.get(2)?,
    })
}

fn node_from(raw: RawNode) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        name: raw.0,
        services: json_vec(raw.1)?,
        labels: json_map(raw.2)?,
        endpoint: raw.3,
        serial: raw.4,
        cert_not_after: raw.5,
        enrolled_at: raw.6,
        last_seen: raw.7,
        acked_version: raw.8.max(0) as u64,
        agent_version: raw.9,
        revoked_at: raw.10,
        overlay_index: raw.11.map(|i| i.max(0) as u64),
        relay: raw.12,
    })
}

impl SqliteStore {
    /// Opens (creating and migrating) the database at `path`, file mode 0600.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let have: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))?
            .max(0) as usize;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(have) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        // WAL mode adds -wal and -shm files next to the database: same mode as the database.
        {
            use std::os::unix::fs::PermissionsExt;
            for ext in ["-wal", "-shm"] {
                let mut side = path.as_os_str().to_owned();
                side.push(ext);
                let _ = std::fs::set_permissions(&side, std::fs::Permissions::from_mode(0o600));
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c)
    }
}

impl Store for SqliteStore {
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(
                c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                    .optional()?,
            )
        })
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, value])?;
            Ok(())
        })
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (hash, node, services, labels, created_at, expires_at, used_at, relay) VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7)",
                params![t.hash, t.node, to_json(&t.services), to_json(&t.labels), t.created_at, t.expires_at, t.relay],
            )?;
            Ok(())
        })
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let raw = self.with(|c| {
            Ok(c.query_row(
                "SELECT hash, node, services, labels, created_at, expires_at, used_at, used_key, relay, voided_at FROM tokens WHERE hash = ?1",
                [hash],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?)),
            )
            .optional()?)
        })?;
        raw.map(
            |(
                hash,
                node,
                services,
                labels,
                created_at,
                expires_at,
                used_at,
                used_key,
                relay,
                voided_at,
            )| {
                Ok(TokenRecord {
                    hash,
                    node,
                    services: json_vec(services)?,
                    labels: json_map(labels)?,
                    created_at,
                    expires_at,
                    used_at,
                    used_key,
                    relay,
                    voided_at,
                })
            },
        )
        .transpose()
    }

    fn enroll(
        &self,
        hash: &str,
        node: &NodeRecord,
        not_after: i64,
        now: i64,
        key_id: &str,
    ) -> Result<Result<(), TokenProblem>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let row: Option<(i64, Option<i64>, Option<i64>)> = tx
                .query_row("SELECT expires_at, used_at, voided_at FROM tokens WHERE hash = ?1", [hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            match row {
                None => return Ok(Err(TokenProblem::Unknown)),
                Some((_, _, Some(_))) => return Ok(Err(TokenProblem::Voided)),
                Some((_, Some(_), _)) => return Ok(Err(TokenProblem::Used)),
                Some((exp, None, _)) if exp <= now => return Ok(Err(TokenProblem::Expired)),
                Some(_) => {}
            }
            tx.execute(
                "UPDATE tokens SET used_at = ?1, used_key = ?3 WHERE hash = ?2",
                params![now, hash, key_id],
            )?;
            tx.execute(
                "INSERT INTO nodes (name, services, labels, endpoint, serial, cert_not_after, enrolled_at, last_seen, acked_version, agent_version, revoked_at, relay)
                 VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6, NULL, 0, NULL, NULL, ?7)
                 ON CONFLICT(name) DO UPDATE SET services = excluded.services, labels = excluded.labels, serial = excluded.serial,
                   cert_not_after = excluded.cert_not_after, enrolled_at = excluded.enrolled_at, revoked_at = NULL, acked_version = 0,
                   relay = excluded.relay",
                params![node.name, to_json(&node.services), to_json(&node.labels), node.serial, not_after, now, node.relay],
            )?;
            if let Some(serial) = &node.serial {
                tx.execute(
                    "INSERT OR REPLACE INTO certs (serial, node, not_after, issued_at) VALUES (?1, ?2, ?3, ?4)",
                    params![serial, node.name, not_after, now],
                )?;
            }
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    fn record_cert(
        &self,
        serial: &str,
        node: &str,
        not_after: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            // Refused for a revoked node: a certificate issued as it was being revoked is
            // never recorded, so never handed out.
            let n = tx.execute("UPDATE nodes SET serial = ?1, cert_not_after = ?2 WHERE name = ?3 AND revoked_at IS NULL", params![serial, not_after, node])?;
            if n == 0 {
                return Err(StoreError::NodeRevoked(node.to_string()));
            }
            tx.execute("INSERT OR REPLACE INTO certs (serial, node, not_after, issued_at) VALUES (?1, ?2, ?3, ?4)", params![serial, node, not_after, now])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let raws = self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY name"))?;
            let rows = st.query_map([], raw_node)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        raws.into_iter().map(node_from).collect()
    }

    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let raw = self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {NODE_COLS} FROM nodes WHERE name = ?1"),
                [name],
                raw_node,
            )
            .optional()?)
        })?;
        raw.map(node_from).transpose()
    }

    fn node_hello(
        &self,
        name: &str,
        endpoint: &str,
        agent: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let old: Option<Option<String>> = c.query_row("SELECT endpoint FROM nodes WHERE name = ?1", [name], |r| r.get(0)).optional()?;
            c.execute("UPDATE nodes SET endpoint = ?1, agent_version = ?2, last_seen = ?3 WHERE name = ?4", params![endpoint, agent, now, name])?;
            Ok(old.flatten().as_deref() != Some(endpoint))
        })
    }

    fn node_seen(&self, name: &str, now: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE nodes SET last_seen = ?1 WHERE name = ?2",
                params![now, name],
            )?;
            Ok(())
        })
    }

    fn overlay_index(&self, name: &str) -> Result<u64, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO overlay (name) VALUES (?1)",
                params![name],
            )?;
            let idx: i64 = tx.query_row(
                "SELECT idx FROM overlay WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )?;
            tx.commit()?;
            Ok(idx.max(0) as u64)
        })
    }

    fn nodes_acked(&self, acks: &[(String, u64)]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "UPDATE nodes SET acked_version = ?1 WHERE name = ?2 AND acked_version < ?1",
                )?;
                for (name, version) in acks {
                    st.execute(params![*version as i64, name])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn revoke_node(&self, name: &str, now: i64) -> Result<Option<Vec<String>>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            // Every token for the name, even before the node enrolled: a leaked token for
            // a name not yet in the mesh is voided by revoking the name.
            let voided = tx.execute(
                "UPDATE tokens SET voided_at = ?1 WHERE node = ?2 AND voided_at IS NULL",
                params![now, name],
            )?;
            let n = tx.execute("UPDATE nodes SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL", params![now, name])?;
            if n == 0 {
                let exists: Option<String> = tx.query_row("SELECT name FROM nodes WHERE name = ?1", [name], |r| r.get(0)).optional()?;
                // Revoked before: tokens issued since are voided all the same.
                tx.commit()?;
                return Ok((exists.is_some() || voided > 0).then(Vec::new));
            }
            let serials: Vec<(String, i64)> = {
                let mut st = tx.prepare("SELECT serial, not_after FROM certs WHERE node = ?1")?;
                let rows = st.query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
                rows
            };
            for (s, na) in &serials {
                tx.execute("INSERT OR IGNORE INTO revocations (serial, node, not_after, revoked_at) VALUES (?1, ?2, ?3, ?4)", params![s, name, na, now])?;
            }
            tx.commit()?;
            Ok(Some(serials.into_iter().map(|(s, _)| s).collect()))
        })
    }

    fn insert_wg_client(&self, w: &WgClientRecord) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO wg_clients (name, service, labels, public_key, gateways, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    w.name,
                    w.service,
                    to_json(&w.labels),
                    w.public_key,
                    to_json(&w.gateways),
                    w.created_at,
                    w.expires_at
                ],
            )?;
            if n == 1 {
                tx.execute(
                    "INSERT OR IGNORE INTO overlay (name) VALUES (?1)",
                    params![wg_overlay_name(&w.name)],
                )?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
    }

    fn wg_clients(&self) -> Result<Vec<WgClientRecord>, StoreError> {
        let raws = self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {WG_COLS} FROM wg_clients ORDER BY name"))?;
            let rows = st.query_map([], raw_wg)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        raws.into_iter().map(wg_from).collect()
    }

    fn revoke_wg_client(&self, name: &str, now: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE wg_clients SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL",
                params![now, name],
            )?;
            Ok(n == 1)
        })
    }

    fn set_relay(&self, name: &str, relay: bool) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE nodes SET relay = ?1 WHERE name = ?2 AND revoked_at IS NULL",
                params![relay, name],
            )?;
            Ok(n == 1)
        })
    }

    fn revoked_serials(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT serial FROM revocations WHERE not_after > ?1 ORDER BY serial")?;
            let rows = st
                .query_map([now], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(rows)
        })
    }

    fn insert_policy(&self, source: &str, now: i64) -> Result<u64, StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO policies (source, applied_at) VALUES (?1, ?2)",
                params![source, now],
            )?;
            Ok(c.last_insert_rowid().max(0) as u64)
        })
    }

    fn latest_policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT version, source, applied_at FROM policies ORDER BY version DESC LIMIT 1",
                [],
                policy_row,
            )
            .optional()?)
        })
    }

    fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT version, source, applied_at FROM policies ORDER BY version")?;
            let rows = st
                .query_map([], policy_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn bump_version(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let v: Option<String> = tx.query_row("SELECT value FROM meta WHERE key = 'mesh_version'", [], |r| r.get(0)).optional()?;
            let next = v.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('mesh_version', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [next.to_string()],
            )?;
            tx.commit()?;
            Ok(next)
        })
    }

    fn version(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta("mesh_version")?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0))
    }

    fn live(&self) -> Result<Vec<LiveRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT name, replica, connected, changed_at, offline, reach, checks FROM live ORDER BY name",
            )?;
            let rows = st
                .query_map([], |r| {
                    Ok(LiveRecord {
                        name: r.get(0)?,
                        replica: r.get(1)?,
                        connected: r.get(2)?,
                        changed_at: r.get(3)?,
                        offline: r.get(4)?,
                        reach: r.get(5)?,
                        checks: r.get(6)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn put_live(&self, l: &LiveRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO live (name, replica, connected, changed_at, offline, reach, checks) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![l.name, l.replica, l.connected, l.changed_at, l.offline, l.reach, l.checks],
            )?;
            Ok(())
        })
    }

    fn live_ended(&self, node: &str, replica: &str, now: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE live SET connected = 0, changed_at = ?3 WHERE name = ?1 AND replica = ?2 AND connected = 1",
                params![node, replica, now],
            )?;
            Ok(())
        })
    }

    fn replica_restarted(&self, replica: &str, now: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE live SET connected = 0, changed_at = ?2 WHERE replica = ?1 AND connected = 1",
                params![replica, now],
            )?;
            Ok(())
        })
    }

    fn set_offline(&self, nodes: &[String], offline: bool) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached("UPDATE live SET offline = ?1 WHERE name = ?2")?;
                for n in nodes {
                    st.execute(params![offline, n])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn heartbeat(&self, r: &ReplicaRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO replicas (id, control, http, sessions, started_at, heartbeat_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.id, r.control, r.http, r.sessions as i64, r.started_at, r.heartbeat_ms],
            )?;
            Ok(())
        })
    }

    fn replicas(&self) -> Result<Vec<ReplicaRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, control, http, sessions, started_at, heartbeat_ms FROM replicas ORDER BY heartbeat_ms DESC",
            )?;
            let rows = st
                .query_map([], |r| {
                    Ok(ReplicaRecord {
                        id: r.get(0)?,
                        control: r.get(1)?,
                        http: r.get(2)?,
                        sessions: r.get::<_, i64>(3)?.max(0) as u64,
                        started_at: r.get(4)?,
                        heartbeat_ms: r.get(5)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::node;

    #[test]
    fn a_database_from_before_relay_grants_migrates_without_granting_anything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            // The schema as the previous release left it, with a token and a node.
            let c = Connection::open(&path).unwrap();
            for m in &MIGRATIONS[..3] {
                c.execute_batch(m).unwrap();
            }
            c.pragma_update(None, "user_version", 3).unwrap();
            c.execute_batch(
                "INSERT INTO tokens (hash, node, services, labels, created_at, expires_at, used_at, used_key) VALUES ('h', 'a', '[]', '{}', 0, 100, 5, 'k');
                 INSERT INTO nodes (name, services, labels, enrolled_at) VALUES ('a', '[]', '{}', 5);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let t = s.token("h").unwrap().unwrap();
        assert_eq!(
            (t.relay, t.voided_at, t.used_key.as_deref()),
            (false, None, Some("k"))
        );
        assert!(!s.node("a").unwrap().unwrap().relay);
        // A revocation voids the name's tokens, and only that name's.
        s.insert_token(&TokenRecord {
            hash: "other".into(),
            node: "b".into(),
            ..t.clone()
        })
        .unwrap();
        s.revoke_node("a", 7).unwrap();
        assert_eq!(s.token("h").unwrap().unwrap().voided_at, Some(7));
        assert_eq!(s.token("other").unwrap().unwrap().voided_at, None);
        assert_eq!(
            s.enroll("h", &node("a"), 500, 8, "k").unwrap(),
            Err(TokenProblem::Voided)
        );
    }
}
