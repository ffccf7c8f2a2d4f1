//! Persistent coordinator state behind one interface ([`Store`]): the embedded SQLite
//! implementation (one coordinator, `dev`) and PostgreSQL (replicas sharing one database).
//! Everything a restart must keep lives here: settings, join tokens (hashed), nodes, issued
//! certificates, revocations, every policy version and the change log (the mesh version).

use serde::Serialize;

mod postgres;
mod sqlite;
pub mod testdb;

pub use postgres::{
    feed, FeedEvent, PgStore, CHANNEL as CHANGES_CHANNEL, PUNCH_CHANNEL, QUERY_DEADLINE,
};
pub use sqlite::SqliteStore;

/// Which store a data dir was initialized with, kept in `<data dir>/store` (`postgres`);
/// absent: the embedded SQLite store.
const KIND_FILE: &str = "store";

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Opens the store a coordinator runs on: the embedded SQLite database in `dir` (no URL, or
/// `sqlite:`), or the PostgreSQL database `url` names. A data dir initialized for one is
/// refused with the other, naming both.
pub fn open(
    dir: &std::path::Path,
    url: Option<&str>,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    let marked_pg = std::fs::read_to_string(dir.join(KIND_FILE))
        .map(|k| k.trim() == "postgres")
        .unwrap_or(false);
    match url {
        Some(u) if is_postgres(u) => {
            if dir.join("quicmesh.db").exists() && !marked_pg {
                return Err(StoreError::Config(format!(
                    "{} holds an embedded SQLite store: it cannot serve a PostgreSQL one",
                    dir.display()
                )));
            }
            Ok(std::sync::Arc::new(PgStore::open(u)?))
        }
        // Never echoed: the value may hold a password.
        Some(u) if !u.starts_with("sqlite:") => Err(StoreError::Config(
            "--store: the value is neither a postgres://... (or postgresql://...) URL nor sqlite:"
                .into(),
        )),
        _ if marked_pg => Err(StoreError::Config(format!(
            "{} was initialized for a PostgreSQL store: pass --store postgres://... (or QUICMESH_STORE)",
            dir.display()
        ))),
        _ => Ok(std::sync::Arc::new(SqliteStore::open(&dir.join("quicmesh.db"))?)),
    }
}

/// Marks `dir` as served from PostgreSQL (written by `init --store postgres://...`).
pub fn mark_postgres(dir: &std::path::Path) -> std::io::Result<()> {
    quicmesh_node::store::write_private(&dir.join(KIND_FILE), b"postgres\n")
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("database: stored value for {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    /// The database did not answer in time, or the connection to it broke.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// PostgreSQL refused a statement.
    #[error("database: {0}")]
    Postgres(String),
    /// The store could not be set up as asked.
    #[error("{0}")]
    Config(String),
    /// The node was revoked (a certificate for it is not recorded, so not handed out).
    #[error("node {0} is revoked")]
    NodeRevoked(String),
}

/// A join token as stored (the secret only as its hash).
#[derive(Debug, Clone, Serialize)]
pub struct TokenRecord {
    pub hash: String,
    pub node: String,
    pub services: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    /// SHA-256 (hex) of the public key the token enrolled, once used.
    pub used_key: Option<String>,
    /// The token grants the relay role (`token create --relay`).
    pub relay: bool,
    /// When a revocation of the token's node voided it: no enrollment, first or retried,
    /// is granted with it after that.
    pub voided_at: Option<i64>,
}

/// A node in the catalog.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeRecord {
    pub name: String,
    pub services: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub endpoint: Option<String>,
    pub serial: Option<String>,
    pub cert_not_after: Option<i64>,
    pub enrolled_at: i64,
    pub last_seen: Option<i64>,
    pub acked_version: u64,
    pub agent_version: Option<String>,
    pub revoked_at: Option<i64>,
    /// Overlay address allocation (addresses = pools + index); never reused.
    pub overlay_index: Option<u64>,
    /// The join token granted the relay role: only then is the node advertised as a relay.
    pub relay: bool,
}

/// A WireGuard client: a stock WireGuard client that reaches the mesh through gateway
/// nodes, with an identity policy sees as it sees a node's. Its private key is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WgClientRecord {
    pub name: String,
    pub service: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The client's public key, as `wg` writes it.
    pub public_key: String,
    /// The gateway nodes that serve it.
    pub gateways: Vec<String>,
    pub created_at: i64,
    /// Unix seconds it is refused from; 0: never expires.
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    /// Overlay address allocation (addresses = pools + index), shared with nodes' and
    /// never reused.
    pub overlay_index: Option<u64>,
}

/// The overlay allocation name of a WireGuard client (a node's name cannot hold `:`).
pub fn wg_overlay_name(client: &str) -> String {
    format!("wg:{client}")
}

/// A stored policy version.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRecord {
    pub version: u64,
    pub source: String,
    pub applied_at: i64,
}

/// A node's liveness, shared by every replica: which replica holds its session, whether
/// it is connected, whether it has been called offline, where it can be reached and its
/// services' last checks (both as JSON, as the node reported them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveRecord {
    pub name: String,
    pub replica: String,
    pub connected: bool,
    /// Unix seconds of the last connect or disconnect.
    pub changed_at: i64,
    pub offline: bool,
    pub reach: String,
    pub checks: String,
}

/// A coordinator replica as it last reported itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaRecord {
    pub id: String,
    pub control: String,
    pub http: String,
    pub sessions: u64,
    pub started_at: i64,
    /// Unix milliseconds of the last heartbeat.
    pub heartbeat_ms: i64,
}

/// Why a token could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    Unknown,
    Used,
    Expired,
    /// A revocation of the node voided it.
    Voided,
}

/// The coordinator's storage interface. A PostgreSQL backend implements the same.
pub trait Store: Send + Sync {
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;
    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;
    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError>;
    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Marks the token used and records the enrolled node and its certificate, atomically.
    /// Fails with the token's problem if it is unknown, used or expired at `now`.
    fn enroll(
        &self,
        hash: &str,
        node: &NodeRecord,
        not_after: i64,
        now: i64,
        key_id: &str,
    ) -> Result<Result<(), TokenProblem>, StoreError>;
    fn record_cert(
        &self,
        serial: &str,
        node: &str,
        not_after: i64,
        now: i64,
    ) -> Result<(), StoreError>;
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Records what a node said at session start; returns true if peers must learn of it.
    fn node_hello(
        &self,
        name: &str,
        endpoint: &str,
        agent: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    fn node_seen(&self, name: &str, now: i64) -> Result<(), StoreError>;
    /// The node's overlay allocation index, allocated on first use and never reused.
    fn overlay_index(&self, name: &str) -> Result<u64, StoreError>;
    /// Records the snapshot versions nodes acked, all in one transaction.
    fn nodes_acked(&self, acks: &[(String, u64)]) -> Result<(), StoreError>;
    /// Revokes a node and every certificate issued to it, and voids every join token
    /// issued for its name so far (used or not): no earlier grant survives a revocation.
    /// Returns the serials.
    fn revoke_node(&self, name: &str, now: i64) -> Result<Option<Vec<String>>, StoreError>;
    /// Grants or withdraws the relay role of an enrolled, unrevoked node. False when
    /// there is no such node.
    fn set_relay(&self, name: &str, relay: bool) -> Result<bool, StoreError>;
    /// Serials revoked and not yet expired at `now`.
    fn revoked_serials(&self, now: i64) -> Result<Vec<String>, StoreError>;
    /// Records a new WireGuard client and allocates its overlay index, atomically.
    /// `Ok(false)` when its name or its key is taken (revoked clients' included: neither
    /// is ever reused).
    fn insert_wg_client(&self, c: &WgClientRecord) -> Result<bool, StoreError>;
    /// Every WireGuard client, revoked ones included, by name.
    fn wg_clients(&self) -> Result<Vec<WgClientRecord>, StoreError>;
    /// Revokes a WireGuard client; false when there is no such unrevoked client.
    fn revoke_wg_client(&self, name: &str, now: i64) -> Result<bool, StoreError>;
    fn insert_policy(&self, source: &str, now: i64) -> Result<u64, StoreError>;
    fn latest_policy(&self) -> Result<Option<PolicyRecord>, StoreError>;
    fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError>;
    /// Bumps and returns the mesh version (every snapshot carries it).
    fn bump_version(&self) -> Result<u64, StoreError>;
    fn version(&self) -> Result<u64, StoreError>;

    /// Every node's liveness row (nodes never in session have none).
    fn live(&self) -> Result<Vec<LiveRecord>, StoreError>;
    /// The liveness rows changed at versions after `version` (a shared store; the
    /// embedded one gives every row).
    fn live_since(&self, _version: u64) -> Result<Vec<LiveRecord>, StoreError> {
        self.live()
    }
    /// The names of revoked nodes.
    fn revoked_nodes(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .nodes()?
            .into_iter()
            .filter(|n| n.revoked_at.is_some())
            .map(|n| n.name)
            .collect())
    }
    /// Writes a node's liveness row whole.
    fn put_live(&self, rec: &LiveRecord) -> Result<(), StoreError>;
    /// `replica`'s session with `node` ended (unless another replica took the node since).
    fn live_ended(&self, node: &str, replica: &str, now: i64) -> Result<(), StoreError>;
    /// A replica starting: none of its sessions survived, each ends now.
    fn replica_restarted(&self, replica: &str, now: i64) -> Result<(), StoreError>;
    /// Sets `offline` on the named nodes.
    fn set_offline(&self, nodes: &[String], offline: bool) -> Result<(), StoreError>;
    /// A replica's heartbeat: what it serves, how many sessions it holds.
    fn heartbeat(&self, r: &ReplicaRecord) -> Result<(), StoreError>;
    /// Every replica that ever beat, latest heartbeat first.
    fn replicas(&self) -> Result<Vec<ReplicaRecord>, StoreError>;
    /// Passes a punch request to the other replicas (PostgreSQL: a notification).
    fn publish_punch(&self, _payload: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Drops change-log rows older than the last `keep` (only versions matter).
    fn prune_changes(&self, _keep: u64) -> Result<(), StoreError> {
        Ok(())
    }
    /// Several coordinators share this store (PostgreSQL): changes come from others too.
    fn shared(&self) -> bool {
        false
    }
    /// Where the change feed is (PostgreSQL: the connection string to LISTEN on).
    fn feed_url(&self) -> Option<&str> {
        None
    }
}

pub(crate) fn json_vec(s: String) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(&s).map_err(|e| StoreError::Corrupt {
        what: "list".into(),
        reason: e.to_string(),
    })
}

pub(crate) fn json_map(
    s: String,
) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
    serde_json::from_str(&s).map_err(|e| StoreError::Corrupt {
        what: "labels".into(),
        reason: e.to_string(),
    })
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `test` against each store; `open` opens (again) the same database.
    fn each_store(test: impl Fn(&dyn Fn() -> Box<dyn Store>)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        test(&|| Box::new(SqliteStore::open(&path).unwrap()));
        let db = testdb::TestDb::new();
        test(&|| Box::new(PgStore::open(&db.url).unwrap()));
    }

    /// An unused token for `node`, valid until t=100.
    fn token(hash: &str, node: &str) -> TokenRecord {
        TokenRecord {
            hash: hash.into(),
            node: node.into(),
            services: vec![],
            labels: Default::default(),
            created_at: 0,
            expires_at: 100,
            used_at: None,
            used_key: None,
            relay: false,
            voided_at: None,
        }
    }

    pub(super) fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            services: vec!["web".into()],
            labels: Default::default(),
            endpoint: None,
            serial: Some("01".into()),
            cert_not_after: None,
            enrolled_at: 0,
            last_seen: None,
            acked_version: 0,
            agent_version: None,
            revoked_at: None,
            overlay_index: None,
            relay: false,
        }
    }

    #[test]
    fn wireguard_clients_never_share_a_name_or_a_key_and_revocation_is_kept() {
        each_store(|open| {
            let s = open();
            let alice = WgClientRecord {
                name: "alice-laptop".into(),
                service: "laptop".into(),
                labels: [("team".to_string(), "ops".to_string())].into(),
                public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
                gateways: vec!["gw-1".into()],
                created_at: 10,
                expires_at: 0,
                revoked_at: None,
                overlay_index: None,
            };
            assert!(s.insert_wg_client(&alice).unwrap());
            // Denied twins: the same name with another key, another name with the same key.
            assert!(!s
                .insert_wg_client(&WgClientRecord {
                    public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
                    ..alice.clone()
                })
                .unwrap());
            assert!(!s
                .insert_wg_client(&WgClientRecord {
                    name: "mallory".into(),
                    ..alice.clone()
                })
                .unwrap());
            // Its overlay allocation is its own, never a node's.
            let node_idx = s.overlay_index("alice-laptop").unwrap();
            let got = s.wg_clients().unwrap();
            assert_eq!(got.len(), 1);
            let idx = got[0].overlay_index.expect("allocated with the client");
            assert_ne!(idx, node_idx);
            assert_eq!(
                s.overlay_index(&wg_overlay_name("alice-laptop")).unwrap(),
                idx
            );
            assert_eq!(
                WgClientRecord {
                    overlay_index: None,
                    ..got[0].clone()
                },
                alice
            );
            assert!(s.revoke_wg_client("alice-laptop", 20).unwrap());
            assert!(!s.revoke_wg_client("alice-laptop", 21).unwrap(), "once");
            assert!(!s.revoke_wg_client("nobody", 21).unwrap());
            // Reopened: the revocation stands, and the name stays taken.
            let s = open();
            assert_eq!(s.wg_clients().unwrap()[0].revoked_at, Some(20));
            assert!(!s
                .insert_wg_client(&WgClientRecord {
                    public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
                    ..alice.clone()
                })
                .unwrap());
        });
    }

    #[test]
    fn tokens_are_single_use_and_expire() {
        each_store(|open| {
            let s = open();
            let t = token("h", "a");
            s.insert_token(&t).unwrap();
            s.insert_token(&TokenRecord {
                hash: "old".into(),
                expires_at: 10,
                ..t.clone()
            })
            .unwrap();
            assert_eq!(
                s.enroll("nope", &node("a"), 500, 50, "k").unwrap(),
                Err(TokenProblem::Unknown)
            );
            assert_eq!(
                s.enroll("old", &node("a"), 500, 50, "k").unwrap(),
                Err(TokenProblem::Expired)
            );
            assert_eq!(s.enroll("h", &node("a"), 500, 50, "k").unwrap(), Ok(()));
            assert_eq!(
                s.enroll("h", &node("a"), 500, 51, "k").unwrap(),
                Err(TokenProblem::Used)
            );
            assert_eq!(s.nodes().unwrap().len(), 1);
        });
    }

    #[test]
    fn state_survives_reopen_and_revocation_lists_serials() {
        each_store(|open| {
            {
                let s = open();
                s.insert_token(&token("h", "a")).unwrap();
                s.enroll("h", &node("a"), 500, 1, "k").unwrap().unwrap();
                s.insert_policy("default = \"deny\"", 1).unwrap();
                let v = s.bump_version().unwrap();
                assert!(v >= 1);
                assert_eq!(s.revoke_node("a", 2).unwrap(), Some(vec!["01".to_string()]));
                assert_eq!(s.revoke_node("zz", 2).unwrap(), None);
            }
            let s = open();
            // SQLite counts explicit bumps; PostgreSQL also logs each change with its data.
            assert!(s.version().unwrap() >= 1);
            assert_eq!(s.latest_policy().unwrap().unwrap().version, 1);
            assert_eq!(s.revoked_serials(3).unwrap(), vec!["01".to_string()]);
            assert!(s.revoked_serials(600).unwrap().is_empty());
            assert!(s.node("a").unwrap().unwrap().revoked_at.is_some());
        });
    }

    #[test]
    fn acks_only_move_forward_and_overlay_indexes_are_never_reused() {
        each_store(|open| {
            let s = open();
            for (i, n) in ["a", "b"].iter().enumerate() {
                s.insert_token(&token(&format!("h{i}"), n)).unwrap();
                let mut rec = node(n);
                rec.serial = Some(format!("0{i}"));
                s.enroll(&format!("h{i}"), &rec, 500, 1, "k")
                    .unwrap()
                    .unwrap();
            }
            s.nodes_acked(&[("a".into(), 5), ("b".into(), 3)]).unwrap();
            s.nodes_acked(&[("a".into(), 4), ("b".into(), 7), ("zz".into(), 9)])
                .unwrap();
            assert_eq!(s.node("a").unwrap().unwrap().acked_version, 5);
            assert_eq!(s.node("b").unwrap().unwrap().acked_version, 7);
            assert_eq!(s.overlay_index("a").unwrap(), 1);
            assert_eq!(s.overlay_index("b").unwrap(), 2);
            assert_eq!(s.overlay_index("a").unwrap(), 1);
            assert!(s.node_hello("a", "198.18.0.1:7800", "v", 2).unwrap());
            assert!(!s.node_hello("a", "198.18.0.1:7800", "v", 3).unwrap());
            assert!(s.node_hello("a", "198.18.0.2:7800", "v", 4).unwrap());
            assert_eq!(s.node("a").unwrap().unwrap().last_seen, Some(4));
            assert!(s.set_relay("a", true).unwrap());
            assert!(!s.set_relay("zz", true).unwrap());
            // A certificate is never recorded for a revoked node (renewal racing a
            // revocation); a shared store logs every change with its data.
            let before = s.version().unwrap();
            s.revoke_node("b", 9).unwrap();
            if s.shared() {
                assert!(
                    s.version().unwrap() > before,
                    "the revocation is a logged change"
                );
            }
            assert!(matches!(
                s.record_cert("77", "b", 900, 10),
                Err(StoreError::NodeRevoked(_))
            ));
            assert!(!s.revoked_serials(10).unwrap().is_empty());
            assert_eq!(s.node("b").unwrap().unwrap().serial.as_deref(), Some("01"));
            s.record_cert("78", "a", 900, 10).unwrap();
            assert_eq!(s.node("a").unwrap().unwrap().serial.as_deref(), Some("78"));
            // Versions only grow, and each store call sees the last one.
            let v1 = s.bump_version().unwrap();
            let v2 = s.bump_version().unwrap();
            assert!(v2 > v1);
            assert_eq!(s.version().unwrap(), v2);
        });
    }
}
