//! Persistent coordinator state behind one interface ([`Store`]), with the embedded SQLite
//! implementation. Everything a restart must keep lives here: settings, join tokens
//! (hashed), nodes, issued certificates, revocations and every policy version.

use serde::Serialize;

mod sqlite;

pub use sqlite::SqliteStore;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("database: stored value for {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
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
#[derive(Debug, Clone, Serialize)]
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

/// A stored policy version.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRecord {
    pub version: u64,
    pub source: String,
    pub applied_at: i64,
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
    fn insert_policy(&self, source: &str, now: i64) -> Result<u64, StoreError>;
    fn latest_policy(&self) -> Result<Option<PolicyRecord>, StoreError>;
    fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError>;
    /// Bumps and returns the mesh version (every snapshot carries it).
    fn bump_version(&self) -> Result<u64, StoreError>;
    fn version(&self) -> Result<u64, StoreError>;
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
