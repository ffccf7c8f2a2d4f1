//! The coordinator's core: the mesh state one replica holds (trust, policy, the catalog
//! built last, live sessions) and the changes to it (policy, revocation, relay roles), each
//! committed to the store and then pushed. IO-free apart from the store; the control
//! listener and the HTTP API call into it. Enrollment and renewal are in [`enroll`],
//! sessions and liveness in [`sessions`], traffic reports in [`traffic`], and what each
//! node is sent in [`crate::catalog`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use quicmesh_node::tls::{Trust, TrustHandle};
#[cfg(test)]
use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::cert::Serial;
use quicmesh_protocol::ident::{LabelKey, Labels, NodeName, ServiceName, TrustDomain};
use quicmesh_protocol::overlay::{Pools, Prefix};
use quicmesh_protocol::policy::{
    Destination, Explanation, Policy, PolicyError, Request, Source, TestFailure, Traffic,
};
use quicmesh_protocol::wire::ControlDown;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::ca::{Ca, CaError};
pub use crate::catalog::Sent;
use crate::catalog::{self, Catalog, Catalogs, MeshFacts};
use crate::drops::{Drops, PunchDrop};
pub use crate::health::Reach;
use crate::health::{CheckView, HealthBook, DEFAULT_OFFLINE_AFTER};
use crate::punch::PunchLimiter;
use crate::store::{NodeRecord, PolicyRecord, ReplicaRecord, Store, StoreError};

mod enroll;
mod sessions;
mod traffic;
mod wg;

pub use wg::{WgAdded, WgClientView, WgRequest, MAX_WG_TTL_SECS};

/// How many versions before the last one read a replica reads liveness rows again from.
/// A change committed after a higher version was read is read by its own notification
/// (the feed delivers every commit, with its version: [`Mesh::note_change`]), and a
/// lost notification means a lost feed connection, after which everything is read: the
/// margin is only a second guard.
const RELOAD_MARGIN: u64 = 64;
/// Change-log rows kept (replicas need only the latest version; older rows are history).
const CHANGES_KEPT: u64 = 100_000;
/// Default leaf certificate lifetime.
pub const DEFAULT_CERT_TTL_SECS: i64 = 24 * 3600;
/// How long after a token was used the same node with the same key may enroll again
/// (its first answer was lost).
pub const ENROLL_RETRY_WINDOW_SECS: i64 = 600;
/// Longest join token lifetime accepted.
pub const MAX_TOKEN_TTL_SECS: i64 = 30 * 86400;

/// Errors of coordinator operations, each with an HTTP status in the API.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("node {0} not found")]
    NoSuchNode(String),
    #[error("WireGuard client {0} not found (or already revoked)")]
    NoSuchWgClient(String),
    #[error("a WireGuard client named {0} or with that public key exists (names and keys are never reused)")]
    WgClientExists(String),
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("policy tests failed: {}", .0.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; "))]
    PolicyTests(Vec<TestFailure>),
    #[error("data dir {path}: {reason}")]
    DataDir { path: String, reason: String },
    /// This replica cannot reach its database: it changes and issues nothing.
    #[error("this coordinator replica has lost its database; try another replica")]
    Fenced,
}

/// Current Unix time.
pub fn now() -> i64 {
    quicmesh_node::control::unix_now()
}

/// Runs `f`, which may wait on the store or on a lock held while the store is read, from
/// async code: on a multi-thread runtime the worker hands its other tasks (the QUIC
/// endpoint's driver among them) to another thread first, so a join storm's store work
/// never stalls handshakes. Elsewhere (tests' single-thread runtimes) it just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// This replica's id: made once, kept in `replica.id` in the data dir.
fn replica_id(dir: &Path) -> Result<String, MeshError> {
    let path = dir.join("replica.id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let mut b = [0u8; 6];
            rand::thread_rng().fill_bytes(&mut b);
            let id = format!("r-{}", hex::encode(b));
            write_private(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

/// SHA-256 hex of a secret: how tokens are stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn random_hex32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

/// A punch request passed between replicas (JSON in a notification).
#[derive(Debug, Serialize, serde::Deserialize)]
struct RelayedPunch {
    from: String,
    to: String,
    candidates: Vec<SocketAddr>,
}

/// Live control sessions, by node.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: u64,
    pub conn: quinn::Connection,
    pub kick: tokio::sync::mpsc::Sender<ControlDown>,
    /// The node takes relayed datagrams from the coordinator (it announced
    /// `SESSION_INFO`): only such nodes are in the relay's tables, known by this token
    /// (sent to the node over the session) and the session's address.
    pub relay_token: Option<u64>,
}

/// The coordinator.
pub struct Mesh {
    /// Private: everything else reaches the store through the mesh's operations.
    store: Arc<dyn Store>,
    pub ca: Ca,
    /// Overlay address pools.
    pub pools: Pools,
    pub data_dir: PathBuf,
    pub cert_ttl_secs: i64,
    pub trust: TrustHandle,
    admin_hash: String,
    reader_hash: String,
    /// The last traffic report of each node.
    traffic: Mutex<HashMap<String, Vec<quicmesh_protocol::wire::PairTraffic>>>,
    /// Each node's last HTTP route report.
    http_traffic: Mutex<HashMap<String, Vec<quicmesh_protocol::wire::RouteTraffic>>>,
    /// The route settings each node's `http` upstreams reported (its TOML).
    http_routes: Mutex<HashMap<String, Vec<quicmesh_protocol::wire::RouteSettings>>>,
    /// What each gateway node last reported of its WireGuard side (key, port, clients).
    /// Each gateway node's last report, and when it came (Unix seconds).
    gateways: Mutex<HashMap<String, (quicmesh_protocol::wire::GatewayReport, i64)>>,
    /// Each node's open tunnels and their key exchange groups, as its session with this
    /// replica last reported them (gone with the session).
    tunnels: Mutex<HashMap<String, Vec<TunnelView>>>,
    /// The WireGuard clients nodes were last told about, and the catalog version they
    /// were read at: read once per published version, not once per session.
    wg_published: Mutex<Option<(u64, Arc<Vec<quicmesh_protocol::wg::WgClient>>)>>,
    /// Bumped when a traffic report changed something.
    traffic_tx: watch::Sender<u64>,
    policy: ArcSwap<(u64, Policy)>,
    version_tx: watch::Sender<u64>,
    sessions: Mutex<HashMap<String, SessionHandle>>,
    /// The catalog built last, the steps sessions share, the version published.
    catalogs: Catalogs,
    /// The deny list changed since the catalog built last: publish the next one at once.
    revocation_pending: std::sync::atomic::AtomicBool,
    /// Acks not yet written to the store (written in batches: a policy change to N nodes
    /// is N acks within milliseconds).
    acks: Mutex<HashMap<String, u64>>,
    next_session: std::sync::atomic::AtomicU64,
    /// Instance health, node liveness and reach: the store's rows, replicated.
    health: Mutex<HealthBook>,
    /// This replica's id (kept in `replica.id` in the data dir).
    pub replica: String,
    /// When this replica started (Unix ms).
    pub started_ms: i64,
    /// The mesh version up to which policy, trust and liveness were read from the store.
    loaded: Mutex<u64>,
    /// The lowest version the change feed announced since the last refresh (`u64::MAX`:
    /// none): a change committed after a higher one was read is read from there.
    noted: std::sync::atomic::AtomicU64,
    /// Wakes the refresher: a change was announced, or this replica's own change found
    /// another replica's before it (read and published by the refresher, not inline).
    pub(crate) catch_up: tokio::sync::Notify,
    /// This replica runs the singleton jobs (offline sweep): the advisory lock is ours.
    pub leader: std::sync::atomic::AtomicBool,
    /// This replica lost its database: it holds no sessions and issues nothing.
    pub fenced: std::sync::atomic::AtomicBool,
    /// Which punch requests are passed on.
    punches: Mutex<PunchLimiter>,
    /// What the control listener refused or dropped, by reason.
    pub drops: Drops,
    /// The relay of last resort on the control socket ([`crate::relay`]).
    pub relay: Arc<crate::relay::Relay>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("trust_domain", &self.ca.trust_domain)
            .finish_non_exhaustive()
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), MeshError> {
    quicmesh_node::store::write_private(path, bytes).map_err(|e| MeshError::DataDir {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// What `init` made.
#[derive(Debug)]
pub struct InitOutput {
    pub trust_domain: TrustDomain,
    pub ca_fingerprint: String,
    pub admin_token: String,
}

/// Creates a data dir: CA, database, admin token, default overlay pools. Refuses an
/// initialized dir.
pub fn init(dir: &Path, trust_domain: TrustDomain) -> Result<InitOutput, MeshError> {
    init_with(dir, trust_domain, None, None, None)
}

/// [`init`] with chosen overlay pools (default: 100.64.0.0/10, and a ULA /48 derived
/// from the CA). Bad pools are refused before anything is written.
pub fn init_with(
    dir: &Path,
    trust_domain: TrustDomain,
    v4: Option<Prefix>,
    v6: Option<Prefix>,
    store_url: Option<&str>,
) -> Result<InitOutput, MeshError> {
    let placeholder = Pools::default_for(&[0; 32]);
    let bad = |e: quicmesh_protocol::overlay::PrefixError| MeshError::Invalid {
        field: "overlay pools",
        reason: e.to_string(),
    };
    Pools::new(v4.unwrap_or(placeholder.v4), v6.unwrap_or(placeholder.v6)).map_err(bad)?;
    let dd = |reason: String| MeshError::DataDir {
        path: dir.display().to_string(),
        reason,
    };
    if dir.join("ca.key").exists() {
        return Err(dd("already initialized (ca.key exists)".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| dd(e.to_string()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| dd(e.to_string()))?;
    }
    let store = crate::store::open(dir, store_url)?;
    if store.meta("trust_domain")?.is_some() {
        return Err(dd(
            "the database is initialized already (by another coordinator): this data dir cannot make a second CA for it".into(),
        ));
    }
    let (ca, key_pem) = Ca::generate(trust_domain.clone(), now())?;
    write_private(&dir.join("ca.key"), key_pem.as_bytes())?;
    write_private(&dir.join("ca.crt"), ca.cert_pem().as_bytes())?;
    if store_url.is_some_and(crate::store::is_postgres) {
        crate::store::mark_postgres(dir).map_err(|e| dd(e.to_string()))?;
    }
    store.set_meta("trust_domain", trust_domain.as_str())?;
    let defaults = Pools::default_for(&ca.fingerprint());
    let pools = Pools::new(v4.unwrap_or(defaults.v4), v6.unwrap_or(defaults.v6)).map_err(bad)?;
    store.set_meta("overlay_v4", &pools.v4.to_string())?;
    store.set_meta("overlay_v6", &pools.v6.to_string())?;
    let admin_token = format!("qma_{}", hex::encode(random_hex32()));
    store.set_meta("admin_token_sha256", &hash_secret(&admin_token))?;
    write_private(&dir.join("admin.token"), admin_token.as_bytes())?;
    ensure_reader_token(&*store, dir)?;
    Ok(InitOutput {
        trust_domain,
        ca_fingerprint: hex::encode(ca.fingerprint()),
        admin_token,
    })
}

/// The read-only API token (`reader.token`, 0600): sees everything, changes nothing.
/// Created on first need (data dirs from before it get one when opened).
fn ensure_reader_token(store: &dyn Store, dir: &Path) -> Result<String, MeshError> {
    if let Some(h) = store.meta("reader_token_sha256")? {
        return Ok(h);
    }
    let token = format!("qmr_{}", hex::encode(random_hex32()));
    write_private(&dir.join("reader.token"), token.as_bytes())?;
    let h = hash_secret(&token);
    store.set_meta("reader_token_sha256", &h)?;
    Ok(h)
}

/// Who an API credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads everything, changes nothing.
    Reader,
}

/// Constant-time comparison of two hex hashes.
fn same_hash(a: &str, b: &str) -> bool {
    !a.is_empty()
        && a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// One service pair's traffic across the mesh (what the traffic page shows).
#[derive(Debug, Clone, Serialize)]
pub struct PairView {
    pub src: String,
    pub dst: String,
    pub flows: u64,
    pub bytes: u64,
    pub denials: BTreeMap<String, u64>,
    pub denied: u64,
    pub ingress_denials: BTreeMap<String, u64>,
    /// Flow setup latency percentiles (ms) over every reporting node's histogram.
    pub setup_p50_ms: Option<f64>,
    pub setup_p99_ms: Option<f64>,
    pub setup_samples: u64,
    /// Nodes whose reports went in.
    pub reporters: Vec<String>,
}

/// One HTTP route's requests across the mesh (the traffic page's HTTP table).
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    /// `egress`: counted by the sending nodes' `http` upstreams; `ingress`: by the
    /// destination nodes (every request that reached them, from any kind of upstream).
    pub side: &'static str,
    pub src: String,
    pub dst: String,
    pub route: String,
    pub requests: u64,
    /// Requests by status class (`2xx`...).
    pub classes: BTreeMap<String, u64>,
    /// Latency to the response head (ms), from the merged buckets.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub reporters: Vec<String>,
}

/// Checks a label map from API input.
pub fn labels_from(map: &BTreeMap<String, String>) -> Result<Labels, MeshError> {
    let mut m = BTreeMap::new();
    for (k, v) in map {
        m.insert(
            LabelKey::new(k).map_err(|e| MeshError::Invalid {
                field: "labels",
                reason: e.to_string(),
            })?,
            v.clone(),
        );
    }
    Labels::new(m).map_err(|e| MeshError::Invalid {
        field: "labels",
        reason: e.to_string(),
    })
}

/// A snapshot or delta for one node, encoded: the frame its session writes.
#[derive(Debug)]
pub struct Update {
    pub frame: Vec<u8>,
    /// A whole snapshot (else a delta).
    pub whole: bool,
}

/// A node as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub record: NodeRecord,
    pub online: bool,
    /// Overlay addresses allocated to the node.
    pub overlay: Vec<IpAddr>,
    /// The key exchange group of the node's control session with this replica
    /// ("X25519MLKEM768" post-quantum, "X25519" classical), while it has one here.
    pub control_key_exchange: Option<&'static str>,
    /// The node's open tunnels and the key exchange group of each, as the node reported
    /// them to this replica (empty when its session is elsewhere or it reports none).
    pub tunnels: Vec<TunnelView>,
}

/// One of a node's open tunnels, as the node reported it.
#[derive(Debug, Clone, Serialize)]
pub struct TunnelView {
    pub peer: String,
    /// "X25519MLKEM768", "X25519", "secp256r1", "secp384r1", or "unknown".
    pub key_exchange: &'static str,
}

/// A service instance as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub node: String,
    pub endpoint: Option<String>,
    /// A live control session right now.
    pub online: bool,
    /// Routed to: not offline (session gone past the grace period) and check not failing.
    pub routable: bool,
    /// The last check result; `None` for a service without a check.
    pub check: Option<CheckView>,
    pub labels: BTreeMap<String, String>,
}

impl Mesh {
    /// Opens an initialized data dir.
    pub fn open(dir: &Path, cert_ttl_secs: i64) -> Result<Arc<Self>, MeshError> {
        Self::open_store(dir, None, cert_ttl_secs)
    }

    /// Opens an initialized data dir with the store `store_url` names (None: SQLite in
    /// the data dir).
    pub fn open_store(
        dir: &Path,
        store_url: Option<&str>,
        cert_ttl_secs: i64,
    ) -> Result<Arc<Self>, MeshError> {
        if !dir.join("ca.key").exists() {
            return Err(MeshError::DataDir {
                path: dir.display().to_string(),
                reason: "not initialized: run `quicmesh-coordinator init --data-dir DIR` first"
                    .into(),
            });
        }
        let store = crate::store::open(dir, store_url)?;
        let td = store
            .meta("trust_domain")?
            .ok_or_else(|| MeshError::DataDir {
                path: dir.display().to_string(),
                reason: "no trust domain in database".into(),
            })?;
        let td = TrustDomain::new(td).map_err(|e| MeshError::Invalid {
            field: "trust_domain",
            reason: e.to_string(),
        })?;
        let ca = Ca::load(dir, td.clone())?;
        let pools = match (store.meta("overlay_v4")?, store.meta("overlay_v6")?) {
            (Some(a), Some(b)) => {
                let bad = |e: quicmesh_protocol::overlay::PrefixError| MeshError::Invalid {
                    field: "overlay pools",
                    reason: e.to_string(),
                };
                Pools::new(a.parse().map_err(bad)?, b.parse().map_err(bad)?).map_err(bad)?
            }
            _ => {
                // A data dir from before overlay mode: give it the default pools.
                let p = Pools::default_for(&ca.fingerprint());
                store.set_meta("overlay_v4", &p.v4.to_string())?;
                store.set_meta("overlay_v6", &p.v6.to_string())?;
                p
            }
        };
        let admin_hash = store.meta("admin_token_sha256")?.unwrap_or_default();
        let reader_hash = ensure_reader_token(&*store, dir)?;
        let policy = match store.latest_policy()? {
            Some(p) => (p.version, Policy::parse(&p.source)?),
            None => (0, Policy::default()),
        };
        let revoked = Self::revoked_list(&*store)?;
        let trust = Trust::new(td, std::slice::from_ref(&ca.cert_der), revoked).map_err(|e| {
            MeshError::Invalid {
                field: "ca",
                reason: e.to_string(),
            }
        })?;
        let version = store.version()?;
        let (version_tx, _) = watch::channel(version);
        let replica = replica_id(dir)?;
        let shared = store.shared();
        let started_ms = now_ms();
        // None of this replica's sessions survived its restart.
        store.replica_restarted(&replica, started_ms)?;
        let mut book = HealthBook::new(&replica, DEFAULT_OFFLINE_AFTER, started_ms);
        book.load(store.live()?);
        Ok(Arc::new(Self {
            store,
            ca,
            pools,
            data_dir: dir.to_path_buf(),
            cert_ttl_secs,
            trust: Arc::new(ArcSwap::from_pointee(trust)),
            admin_hash,
            reader_hash,
            traffic: Mutex::new(HashMap::new()),
            http_traffic: Mutex::new(HashMap::new()),
            http_routes: Mutex::new(HashMap::new()),
            gateways: Mutex::new(HashMap::new()),
            tunnels: Mutex::new(HashMap::new()),
            wg_published: Mutex::new(None),
            traffic_tx: watch::channel(0).0,
            policy: ArcSwap::from_pointee(policy),
            version_tx,
            sessions: Mutex::new(HashMap::new()),
            catalogs: Catalogs::default(),
            revocation_pending: std::sync::atomic::AtomicBool::new(false),
            acks: Mutex::new(HashMap::new()),
            next_session: 1.into(),
            health: Mutex::new(book),
            replica,
            started_ms,
            loaded: Mutex::new(version),
            noted: std::sync::atomic::AtomicU64::new(u64::MAX),
            catch_up: tokio::sync::Notify::new(),
            leader: std::sync::atomic::AtomicBool::new(!shared),
            fenced: std::sync::atomic::AtomicBool::new(false),
            punches: Mutex::new(PunchLimiter::default()),
            drops: Drops::default(),
            relay: Arc::default(),
        }))
    }

    /// The trust the control listener verifies nodes with: the CA and the deny list as
    /// the store has it now.
    /// A deny list that grew (or shrank as serials expired) is published at once: it is
    /// marked here and the publisher urged once the version is raised ([`Mesh::raise`]).
    fn reload_trust(&self) -> Result<(), MeshError> {
        let revoked = Self::revoked_list(&*self.store)?;
        if self.catalogs.revoked_differs(&revoked) {
            self.revocation_pending
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let trust = Trust::new(
            self.ca.trust_domain.clone(),
            std::slice::from_ref(&self.ca.cert_der),
            revoked,
        )
        .map_err(|e| MeshError::Invalid {
            field: "ca",
            reason: e.to_string(),
        })?;
        self.trust.store(Arc::new(trust));
        Ok(())
    }

    fn revoked_list(store: &dyn Store) -> Result<Vec<Serial>, MeshError> {
        Ok(store
            .revoked_serials(now())?
            .into_iter()
            .filter_map(|s| hex::decode(s).ok().and_then(|b| Serial::new(b).ok()))
            .collect())
    }

    /// True when `token` is the admin token (compared by hash, in constant time).
    pub fn check_admin(&self, token: &str) -> bool {
        same_hash(&hash_secret(token), &self.admin_hash)
    }

    /// The role of an API token, if it is one.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let got = hash_secret(token);
        if same_hash(&got, &self.admin_hash) {
            Some(Role::Admin)
        } else if same_hash(&got, &self.reader_hash) {
            Some(Role::Reader)
        } else {
            None
        }
    }

    /// The mesh version this replica holds (what it has read or made).
    pub fn version_now(&self) -> u64 {
        *self.version_tx.borrow()
    }

    /// Subscribes to mesh version changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    /// Records a change: bumps the mesh version and wakes every session. When another
    /// replica changed something since this one last read the store, the version is not
    /// raised here: what this replica holds in memory must be as new as the version it
    /// publishes, so the refresher reads those changes first and raises it (one read for
    /// a burst of changes, where reading inline cost one per change: a 3-replica join
    /// storm read the liveness table thousands of times a second).
    pub fn changed(&self) -> Result<u64, MeshError> {
        self.changed_with(false)
    }

    /// [`Mesh::changed`], reading another replica's changes inline when `now`: a
    /// revocation is raised (and so published) before `revoke` returns, not a refresh
    /// later.
    fn changed_with(&self, now: bool) -> Result<u64, MeshError> {
        if self.fenced.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(MeshError::Fenced);
        }
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let v = self.store.bump_version()?;
        if now && v > *loaded + 1 {
            self.reload(Some(*loaded))?;
            *loaded = v;
            drop(loaded);
            self.raise(v);
        } else if v == *loaded + 1 {
            *loaded = v;
            drop(loaded);
            self.raise(v);
        } else {
            drop(loaded);
            self.catch_up.notify_one();
        }
        Ok(v)
    }

    /// The change feed announced version `v`: the next refresh reads from it if it is
    /// not newer than what was read (committed late, under a lower version).
    pub fn note_change(&self, v: u64) {
        self.noted
            .fetch_min(v, std::sync::atomic::Ordering::Relaxed);
        self.catch_up.notify_one();
    }

    /// Raises the mesh version to `v` (never backwards: a newer version may have been
    /// sent meanwhile), then urges the publisher when a revocation is waiting: it builds
    /// at this version or later, so the catalog it publishes has the revocation.
    fn raise(&self, v: u64) {
        self.version_tx.send_if_modified(|cur| {
            let newer = v > *cur;
            if newer {
                *cur = v;
            }
            newer
        });
        if self
            .revocation_pending
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.catalogs.urge();
        }
    }

    /// Catches up with changes other replicas made: when the store's version is ahead of
    /// this replica's, reads policy, revocations and liveness again, ends the local
    /// sessions of nodes revoked meanwhile, and wakes every session. Called on every
    /// change notification, after every reconnect of the change feed and periodically.
    pub fn refresh(&self) -> Result<u64, MeshError> {
        self.refresh_with(false)
    }

    /// [`Mesh::refresh`]; `force`: read again even when the store's latest version is one
    /// this replica has (a notification came for a change committed late, under a lower
    /// version than one already read).
    /// A forced refresh reads every liveness row, not only those changed lately.
    pub fn refresh_with(&self, force: bool) -> Result<u64, MeshError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let v = self.store.version()?;
        // Taken after the one read that may fail before `reload`; put back if that fails.
        let noted = self
            .noted
            .swap(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        if v <= *loaded && !force && noted > *loaded {
            return Ok(*loaded);
        }
        let since = if force {
            None
        } else {
            Some((*loaded).min(noted.saturating_sub(1)))
        };
        if let Err(e) = self.reload(since) {
            // Read again next time from where it was asked (without a wake-up of its own:
            // a store that fails is tried at the next notification or tick).
            self.noted
                .fetch_min(noted, std::sync::atomic::Ordering::Relaxed);
            return Err(e);
        }
        *loaded = (*loaded).max(v);
        drop(loaded);
        tracing::debug!(version = v, "caught up with the store");
        self.raise(v);
        Ok(v)
    }

    /// Reads trust (revocations), liveness and policy from the store; kicks local
    /// sessions of revoked nodes. Revocations come first and do not depend on the policy:
    /// a policy this replica cannot parse (a newer release's, during an upgrade) is
    /// logged and the one in force kept, never a reason to miss a revocation. A policy only
    /// moves forward.
    fn reload(&self, since: Option<u64>) -> Result<(), MeshError> {
        self.reload_trust()?;
        let revoked = self.store.revoked_nodes()?;
        let kicked: Vec<SessionHandle> = match self.sessions.lock() {
            Ok(mut m) => revoked.iter().filter_map(|n| m.remove(n)).collect(),
            Err(_) => Vec::new(),
        };
        for s in kicked {
            s.end_revoked();
        }
        // Rows changed since the last read or the earliest late commit announced (versions
        // are taken in one order and committed in another), with a margin; forced, all.
        match since {
            Some(since) => {
                let live = self.store.live_since(since.saturating_sub(RELOAD_MARGIN))?;
                self.book().merge(live);
            }
            None => {
                let live = self.store.live()?;
                self.book().merge(live);
            }
        }
        if let Some(p) = self.store.latest_policy()? {
            if p.version > self.policy.load().0 {
                match Policy::parse(&p.source) {
                    Ok(parsed) => self.policy.store(Arc::new((p.version, parsed))),
                    Err(e) => tracing::error!(
                        version = p.version,
                        error = %e,
                        "stored policy does not parse here (a newer release's?); keeping the one in force"
                    ),
                }
            }
        }
        Ok(())
    }

    /// The current policy and its version.
    pub fn policy(&self) -> Arc<(u64, Policy)> {
        self.policy.load_full()
    }

    /// Checks a policy file without applying it: parse errors or failing tests.
    pub fn check_policy(source: &str) -> Result<Policy, MeshError> {
        let p = Policy::parse(source)?;
        let failures = p.run_tests();
        if !failures.is_empty() {
            return Err(MeshError::PolicyTests(failures));
        }
        Ok(p)
    }

    /// Applies a policy file whole, or nothing of it.
    pub fn apply_policy(&self, source: &str) -> Result<u64, MeshError> {
        let p = Self::check_policy(source)?;
        let v = self.store.insert_policy(source, now())?;
        // Only forward: a newer policy read meanwhile from another replica stays.
        self.policy.rcu(|cur| {
            if cur.0 >= v {
                cur.clone()
            } else {
                Arc::new((v, p.clone()))
            }
        });
        self.changed()?;
        tracing::info!(version = v, "policy applied");
        Ok(v)
    }

    /// Explains `from -> to` under the current policy (services only), as an L4 flow.
    pub fn explain(&self, from: &str, to: &str) -> Result<Explanation, MeshError> {
        Ok(self.explain_request(from, to, None)?.0)
    }

    /// Explains `from -> to` under the current policy (services only): an L4 flow, or
    /// with `request` (method, path) an HTTP request, its path normalised as the node
    /// normalises it (returned with the method checked).
    #[allow(clippy::type_complexity)]
    pub fn explain_request(
        &self,
        from: &str,
        to: &str,
        request: Option<&(String, String)>,
    ) -> Result<(Explanation, Option<(String, String)>), MeshError> {
        let request = match request {
            None => None,
            Some((method, path)) => {
                // Parsed as a node parses a request: the query is not the path.
                let (method, target) = quicmesh_protocol::http::parse_request(method, path)
                    .map_err(|e| MeshError::Invalid {
                        field: if e == quicmesh_protocol::http::PathRefusal::BadMethod {
                            "method"
                        } else {
                            "path"
                        },
                        reason: e.to_string(),
                    })?;
                Some((method, target.path))
            }
        };
        let from = ServiceName::new(from).map_err(|e| MeshError::Invalid {
            field: "from",
            reason: e.to_string(),
        })?;
        let to = ServiceName::new(to).map_err(|e| MeshError::Invalid {
            field: "to",
            reason: e.to_string(),
        })?;
        let none = Labels::default();
        let traffic = match &request {
            Some((method, path)) => Traffic::Http(Request {
                method,
                path,
                headers: &[],
            }),
            None => Traffic::Opaque,
        };
        let e = self.policy().1.explain_traffic(
            Source {
                service: &from,
                labels: &none,
            },
            Destination {
                service: &to,
                labels: &none,
            },
            traffic,
        );
        Ok((e, request))
    }

    /// Revokes a node: its certificates go on the deny list every node receives, and its
    /// control session is ended.
    pub fn revoke(&self, name: &str) -> Result<Vec<String>, MeshError> {
        let serials = self
            .store
            .revoke_node(name, now())?
            .ok_or_else(|| MeshError::NoSuchNode(name.to_string()))?;
        self.reload_trust()?;
        if let Some(row) = self.book().forget(name) {
            self.store.put_live(&row)?;
        }
        self.changed_with(true)?;
        if let Some(s) = self.sessions.lock().ok().and_then(|mut m| {
            self.tunnels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            m.remove(name)
        }) {
            s.end_revoked();
        }
        // Its traffic stays (what happened, happened); its routes no longer route, and
        // it serves no WireGuard client.
        self.http_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        tracing::info!(node = name, serials = serials.len(), "node revoked");
        Ok(serials)
    }

    /// Grants (or, with `relay = false`, withdraws) the relay role of an enrolled node,
    /// e.g. one enrolled before roles were granted by tokens. The node is advertised as a
    /// relay only while it also asks to be one (`relay = true` in its config).
    pub fn set_relay(&self, name: &str, relay: bool) -> Result<(), MeshError> {
        if !self.store.set_relay(name, relay)? {
            return Err(MeshError::NoSuchNode(name.to_string()));
        }
        self.changed()?;
        tracing::info!(node = name, relay, "relay role changed by an administrator");
        Ok(())
    }

    /// What to send `node` next, from a catalog at least as new as `at_least`: a whole
    /// snapshot when nothing was sent yet, else the delta from what was last sent; and the
    /// new "last sent".
    pub fn update_for(
        &self,
        node: &NodeName,
        last: Option<&Sent>,
        at_least: u64,
        layout_2: bool,
    ) -> Result<(Update, Sent), MeshError> {
        let catalog = self.catalog_at_least(at_least)?;
        let policy = self.policy();
        Ok(match last {
            None => {
                let (frame, sent) = catalog::whole(node, catalog, &policy, self.facts(), layout_2);
                (Update { frame, whole: true }, sent)
            }
            Some(last) => {
                let step = self.catalogs.step_from(last, &catalog);
                let (frame, sent) =
                    catalog::delta_from(node, last, catalog, &step, &policy, layout_2);
                (
                    Update {
                        frame,
                        whole: false,
                    },
                    sent,
                )
            }
        })
    }

    fn facts(&self) -> MeshFacts<'_> {
        MeshFacts {
            trust_domain: &self.ca.trust_domain,
            ca_der: &self.ca.cert_der,
            pools: self.pools,
        }
    }

    fn pending_ack(&self, node: &str) -> u64 {
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        acks.get(node).copied().unwrap_or(0)
    }

    /// Notes that `node` acked snapshot `version` (written by [`Mesh::flush_acks`]).
    pub fn record_ack(&self, node: &str, version: u64) {
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let v = acks.entry(node.to_string()).or_default();
        *v = (*v).max(version);
    }

    /// Writes the acks noted since the last flush, in one transaction.
    pub fn flush_acks(&self) -> Result<(), MeshError> {
        let batch: Vec<(String, u64)> = {
            let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
            acks.drain().collect()
        };
        if !batch.is_empty() {
            self.store.nodes_acked(&batch)?;
        }
        Ok(())
    }

    /// Subscribes to published catalog versions: a session pushes when this moves.
    pub fn subscribe_catalog(&self) -> watch::Receiver<u64> {
        self.catalogs.subscribe()
    }

    /// Nodes in the catalog built last.
    pub fn catalog_size(&self) -> usize {
        self.catalogs.size()
    }

    /// Resolves when a revocation asks for the next catalog to be published at once.
    pub async fn catalog_urged(&self) {
        self.catalogs.urged().await
    }

    /// Builds the catalog at the current mesh version (unless built already) and publishes
    /// its version to the sessions. Called by one task per replica, at most once per
    /// [`catalog::interval`] under a stream of changes, so a join storm costs one catalog
    /// read per interval, not one per change, and sessions push one step per interval.
    pub fn publish_catalog(&self) -> Result<u64, MeshError> {
        if self.fenced.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(MeshError::Fenced);
        }
        let c = self.catalog()?;
        self.catalogs.publish(&c);
        Ok(c.version)
    }

    /// The catalog at the current mesh version.
    fn catalog(&self) -> Result<Arc<Catalog>, MeshError> {
        // The version is read in its own statement: a `borrow()` kept across the build
        // holds the watch's read lock, and a change queued for its write lock then blocks
        // the build's own read (found as a deadlock in a 3-replica join storm).
        let v = self.version_now();
        self.catalog_at_least(v)
    }

    /// The catalog built last if it is at least `version`, else one built now from the
    /// store at the current mesh version.
    fn catalog_at_least(&self, version: u64) -> Result<Arc<Catalog>, MeshError> {
        self.catalogs.at_least(version, || {
            let version = version.max(*self.version_tx.borrow());
            let nodes = self.store.nodes()?;
            let revoked = Self::revoked_list(&*self.store)?;
            let health = self.book();
            Catalog::build(version, nodes, &health, &self.pools, revoked)
        })
    }

    /// The mesh version as the store has it now.
    pub fn version(&self) -> Result<u64, MeshError> {
        Ok(self.store.version()?)
    }

    /// One node's record.
    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, MeshError> {
        Ok(self.store.node(name)?)
    }

    /// Notes that `node` was heard from (a status report, a session's end).
    pub fn node_seen(&self, node: &str) -> Result<(), MeshError> {
        Ok(self.store.node_seen(node, now())?)
    }

    /// A session started: where the node is and what it runs, then one change for all of
    /// it (liveness and maybe its endpoint).
    pub fn session_started(
        &self,
        node: &str,
        endpoint: &str,
        agent: &str,
    ) -> Result<u64, MeshError> {
        self.store.node_hello(node, endpoint, agent, now())?;
        self.changed()
    }

    /// The policy in force as stored, with its source.
    pub fn latest_policy(&self) -> Result<Option<PolicyRecord>, MeshError> {
        Ok(self.store.latest_policy()?)
    }

    /// Every policy ever applied.
    pub fn policy_history(&self) -> Result<Vec<PolicyRecord>, MeshError> {
        Ok(self.store.policies()?)
    }

    /// Every replica that ever beat, latest heartbeat first.
    pub fn replicas(&self) -> Result<Vec<ReplicaRecord>, MeshError> {
        Ok(self.store.replicas()?)
    }

    /// This replica's heartbeat; returns every replica's latest.
    pub fn heartbeat(&self, rec: &ReplicaRecord) -> Result<Vec<ReplicaRecord>, MeshError> {
        self.store.heartbeat(rec)?;
        self.replicas()
    }

    /// Where the change feed is (PostgreSQL), when the store is shared.
    pub fn feed_url(&self) -> Option<&str> {
        self.store.feed_url()
    }

    /// The catalog's nodes.
    pub fn nodes(&self) -> Result<Vec<NodeView>, MeshError> {
        Ok(self
            .store
            .nodes()?
            .into_iter()
            .map(|mut r| {
                r.acked_version = r.acked_version.max(self.pending_ack(&r.name));
                r
            })
            .map(|r| NodeView {
                online: self.online(&r.name),
                control_key_exchange: self.session_key_exchange(&r.name),
                tunnels: self.tunnels_of(&r.name),
                overlay: r
                    .overlay_index
                    .and_then(|i| self.pools.addresses(i))
                    .unwrap_or_default(),
                record: r,
            })
            .collect())
    }

    /// Services and their instances (revoked nodes excluded).
    pub fn services(&self) -> Result<BTreeMap<String, Vec<InstanceView>>, MeshError> {
        let mut out: BTreeMap<String, Vec<InstanceView>> = BTreeMap::new();
        for n in self.store.nodes()? {
            if n.revoked_at.is_some() {
                continue;
            }
            for s in &n.services {
                let (check, routable) = {
                    let book = self.book();
                    (book.check(&n.name, s), book.routable(&n.name, s))
                };
                out.entry(s.clone()).or_default().push(InstanceView {
                    node: n.name.clone(),
                    endpoint: n.endpoint.clone(),
                    online: self.online(&n.name),
                    routable,
                    check,
                    labels: n.labels.clone(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_protocol::token::JoinToken;
    use quicmesh_protocol::wire::{EnrollErrorCode, EnrollRequest, Snapshot};

    /// `node`'s whole snapshot from the current catalog.
    fn whole(mesh: &Mesh, node: &NodeName) -> (Snapshot, Sent) {
        let (frame, sent) = catalog::whole(
            node,
            mesh.catalog().unwrap(),
            &mesh.policy(),
            mesh.facts(),
            true,
        );
        let ControlDown::Snapshot(snap) = catalog::tests::decode_frame(&frame) else {
            panic!("a whole snapshot")
        };
        (*snap, sent)
    }

    fn request(mesh: &Mesh, token: &str, key: &rcgen::KeyPair) -> EnrollRequest {
        let _ = mesh;
        let t: JoinToken = token.parse().unwrap();
        EnrollRequest {
            secret: t.secret_hex(),
            node: NodeName::new("web-1").unwrap(),
            csr_der: quicmesh_node::control::csr("web-1", key).unwrap(),
            services: vec![ServiceName::new("web").unwrap()],
            labels: Labels::default(),
        }
    }

    /// One change, made by one replica.
    #[derive(Debug, Clone)]
    enum Op {
        Enroll(usize),
        Revoke(usize),
        Policy(u8),
        Reach(usize, u8),
        Health(usize, bool),
        Relay(usize, bool),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = (usize, Op)> {
        use proptest::prelude::*;
        let node = 0usize..5;
        let o = prop_oneof![
            node.clone().prop_map(Op::Enroll),
            node.clone().prop_map(Op::Revoke),
            (0u8..3).prop_map(Op::Policy),
            (node.clone(), 1u8..200).prop_map(|(n, a)| Op::Reach(n, a)),
            (node.clone(), any::<bool>()).prop_map(|(n, h)| Op::Health(n, h)),
            (node, any::<bool>()).prop_map(|(n, r)| Op::Relay(n, r)),
        ];
        (0usize..3, o)
    }

    fn apply(m: &Mesh, op: &Op) {
        let name = |i: &usize| format!("n-{i}");
        match op {
            Op::Enroll(i) => {
                let n = name(i);
                let (tok, _) = m
                    .create_token(&n, &["web".to_string()], &BTreeMap::new(), true, 600)
                    .unwrap();
                let key = rcgen::KeyPair::generate().unwrap();
                let t: JoinToken = tok.parse().unwrap();
                let _ = m.enroll(&EnrollRequest {
                    secret: t.secret_hex(),
                    node: NodeName::new(n.as_str()).unwrap(),
                    csr_der: quicmesh_node::control::csr(&n, &key).unwrap(),
                    services: vec![ServiceName::new("web").unwrap()],
                    labels: Labels::default(),
                });
            }
            Op::Revoke(i) => {
                let _ = m.revoke(&name(i));
            }
            Op::Policy(k) => {
                let src = format!("[[rule]]\nfrom = \"web\"\nto = \"db{k}\"\naction = \"allow\"\n");
                m.apply_policy(&src).unwrap();
            }
            Op::Reach(i, a) => {
                let addr: SocketAddr = format!("198.18.0.{a}:7800").parse().unwrap();
                if m.set_candidates(
                    &name(i),
                    Reach {
                        candidates: vec![addr],
                        relay: true,
                        observed: Some(addr),
                        nat: false,
                    },
                ) {
                    m.changed().unwrap();
                }
            }
            Op::Health(i, ok) => {
                let h = if *ok {
                    quicmesh_protocol::health::Health::Passing
                } else {
                    quicmesh_protocol::health::Health::Critical
                };
                let _ = m.report_health(
                    &name(i),
                    &["web".to_string()],
                    &[quicmesh_protocol::health::ServiceCheck {
                        service: ServiceName::new("web").unwrap(),
                        health: h,
                        output: String::new(),
                    }],
                );
            }
            Op::Relay(i, r) => {
                let _ = m.set_relay(&name(i), *r);
            }
        }
    }

    /// Whatever order three replicas make changes in, once each has caught up with the
    /// change log they hold the same catalog (peers with their reach, relay role, health),
    /// the same policy and the same deny list.
    #[test]
    fn any_interleaving_of_changes_leaves_every_replica_with_the_same_catalog() {
        use proptest::prelude::*;
        let db = crate::store::testdb::TestDb::new();
        let mut cfg = ProptestConfig::with_cases(12);
        cfg.failure_persistence = None;
        proptest!(cfg, |(ops in proptest::collection::vec(op(), 1..25))| {
            // A fresh mesh per case: drop and re-create the schema.
            crate::store::testdb::reset(&db.url);
            let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
            init_with(dirs[0].path(), TrustDomain::new("t.test").unwrap(), None, None, Some(&db.url)).unwrap();
            for d in &dirs[1..] {
                for f in ["ca.key", "ca.crt", "admin.token", "reader.token", "store"] {
                    std::fs::copy(dirs[0].path().join(f), d.path().join(f)).unwrap();
                }
            }
            let reps: Vec<Arc<Mesh>> = dirs
                .iter()
                .map(|d| Mesh::open_store(d.path(), Some(&db.url), 3600).unwrap())
                .collect();
            for (r, o) in &ops {
                apply(&reps[*r], o);
            }
            let views: Vec<_> = reps
                .iter()
                .map(|m| {
                    m.refresh().unwrap();
                    let c = m.catalog().unwrap();
                    (
                        c.peers.clone(),
                        c.revoked.clone(),
                        m.policy().0,
                        m.trust.load().revoked_serials(),
                    )
                })
                .collect();
            prop_assert_eq!(&views[0], &views[1], "ops {:?}", ops);
            prop_assert_eq!(&views[0], &views[2], "ops {:?}", ops);
        });
    }

    #[test]
    fn publishing_catalogs_while_changes_keep_coming_never_deadlocks() {
        // Builders (the publisher and sessions) and changes (enrollments, health) at once,
        // as in a join storm. A build once held the version's read lock while waiting for
        // the catalog lock; a change queued for the write lock then hung every replica.
        let (_d, mesh) = mesh();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..9 {
            let (m, stop) = (mesh.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if i % 3 != 0 {
                        m.publish_catalog().unwrap();
                    } else {
                        m.changed().unwrap();
                    }
                    n += 1;
                }
                n
            }));
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let done: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let _ = tx.send(done);
        });
        let done = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("builders and changes deadlocked");
        assert!(
            done.iter().all(|n| *n > 0),
            "every thread made progress: {done:?}"
        );
    }

    #[test]
    fn traffic_sums_nodes_reports_and_merges_their_latency_histograms() {
        use quicmesh_protocol::wire::PairTraffic;
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), TrustDomain::new("t.test").unwrap()).unwrap();
        let mesh = Mesh::open(dir.path(), 3600).unwrap();
        let pair = |flows, denied: u64, setup: Vec<(u64, u64)>| PairTraffic {
            src: ServiceName::new("web").unwrap(),
            dst: ServiceName::new("api").unwrap(),
            flows,
            bytes: flows * 100,
            denials: vec![("policy_denied".into(), denied)],
            ingress_denials: vec![],
            setup_us: setup,
        };
        let mut rx = mesh.subscribe_traffic();
        // web-1's flows all set up in ~1 ms, web-2's in ~10 ms.
        mesh.report_traffic("web-1", vec![pair(90, 1, vec![(1000, 90)])]);
        mesh.report_traffic("web-2", vec![pair(10, 2, vec![(10_000, 10)])]);
        assert!(rx.has_changed().unwrap(), "watchers are woken");
        let t = mesh.traffic();
        assert_eq!(t.len(), 1);
        let p = &t[0];
        assert_eq!((p.flows, p.bytes, p.denied), (100, 10_000, 3));
        assert_eq!(p.denials.get("policy_denied"), Some(&3));
        assert_eq!(p.setup_samples, 100);
        // The merged median is web-1's, the 99th percentile web-2's: a mean would be neither.
        assert!((p.setup_p50_ms.unwrap() - 1.0).abs() < 0.05, "{p:?}");
        assert!((p.setup_p99_ms.unwrap() - 10.0).abs() < 0.2, "{p:?}");
        // The same report again changes nothing and wakes nobody.
        rx.borrow_and_update();
        mesh.report_traffic("web-2", vec![pair(10, 2, vec![(10_000, 10)])]);
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn tokens_have_roles_and_a_wrong_one_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let out = init(dir.path(), TrustDomain::new("t.test").unwrap()).unwrap();
        let mesh = Mesh::open(dir.path(), 3600).unwrap();
        let reader = std::fs::read_to_string(dir.path().join("reader.token")).unwrap();
        assert_eq!(mesh.role_of(&out.admin_token), Some(Role::Admin));
        assert_eq!(mesh.role_of(reader.trim()), Some(Role::Reader));
        assert_eq!(mesh.role_of("qma_0000"), None);
        assert_eq!(mesh.role_of(""), None);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("reader.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the read-only token is a secret too");
    }

    #[test]
    fn a_lost_enrollment_answer_is_issued_again_only_to_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), TrustDomain::new("t.test").unwrap()).unwrap();
        let mesh = Mesh::open(dir.path(), 3600).unwrap();
        let (token, _) = mesh
            .create_token("web-1", &["web".to_string()], &BTreeMap::new(), false, 600)
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let serial = |m: ControlDown| match m {
            ControlDown::Enrolled(r) => {
                PeerIdentity::from_der(&r.cert_der, &mesh.ca.trust_domain)
                    .unwrap()
                    .serial
            }
            other => panic!("not enrolled: {other:?}"),
        };
        let first = serial(mesh.enroll(&request(&mesh, &token, &key)));
        // The answer was lost; the node asks again with the same token and key.
        let again = serial(mesh.enroll(&request(&mesh, &token, &key)));
        assert_ne!(first, again, "a fresh certificate, not a replay");
        // Its denied twin: the same token with another key is a reused token.
        let other = rcgen::KeyPair::generate().unwrap();
        assert!(matches!(
            mesh.enroll(&request(&mesh, &token, &other)),
            ControlDown::EnrollRefused {
                code: EnrollErrorCode::TokenUsed,
                ..
            }
        ));
    }

    fn mesh() -> (tempfile::TempDir, Arc<Mesh>) {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), TrustDomain::new("t.test").unwrap()).unwrap();
        let mesh = Mesh::open(dir.path(), 3600).unwrap();
        (dir, mesh)
    }

    /// `policy explain --method --path` judges the request the node would judge: the
    /// path normalised first, a path or method the node would refuse refused here too.
    #[test]
    fn explaining_a_request_judges_its_normalised_path() {
        let (_d, mesh) = mesh();
        mesh.apply_policy(
            "[[rule]]\nfrom = \"web\"\nto = \"api\"\naction = \"allow\"\n\
             [[rule]]\nfrom = \"web\"\nto = \"api\"\naction = \"deny\"\npaths = [\"/admin\", \"/admin/*\"]\n",
        )
        .unwrap();
        let ask = |method: &str, path: &str| {
            mesh.explain_request("web", "api", Some(&(method.into(), path.into())))
        };
        let (e, req) = ask("GET", "/x/..//admin").unwrap();
        assert_eq!(e.decision.rule_label(), "rule[1]");
        assert!(!e.decision.is_allow());
        assert_eq!(req, Some(("GET".into(), "/admin".into())));
        let (e, _) = ask("GET", "/public").unwrap();
        assert_eq!(e.decision.rule_label(), "rule[0]");
        assert!(e.decision.is_allow());
        // An L4 flow to the same service: the deny about requests denies it (fail closed).
        assert!(!mesh.explain("web", "api").unwrap().decision.is_allow());
        for (method, path, field) in [("GET", "/admin%2F", "path"), ("get", "/", "method")] {
            assert!(
                matches!(ask(method, path), Err(MeshError::Invalid { field: f, .. }) if f == field),
                "{method} {path}"
            );
        }
    }

    fn enrolled(m: ControlDown) -> bool {
        matches!(m, ControlDown::Enrolled(_))
    }

    #[test]
    fn a_revocation_voids_the_retry_window_of_earlier_grants() {
        let (_dir, mesh) = mesh();
        let svc = ["web".to_string()];
        let (stolen, _) = mesh
            .create_token("web-1", &svc, &BTreeMap::new(), false, 600)
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        assert!(enrolled(mesh.enroll(&request(&mesh, &stolen, &key))));
        // The admin revokes web-1 and enrolls it again with a new token and key.
        mesh.revoke("web-1").unwrap();
        let (fresh, _) = mesh
            .create_token("web-1", &svc, &BTreeMap::new(), false, 600)
            .unwrap();
        let new_key = rcgen::KeyPair::generate().unwrap();
        assert!(enrolled(mesh.enroll(&request(&mesh, &fresh, &new_key))));
        // The old token's holder retries within the window with the same key: refused.
        match mesh.enroll(&request(&mesh, &stolen, &key)) {
            ControlDown::EnrollRefused {
                code: EnrollErrorCode::NodeRevoked,
                detail,
            } => assert!(detail.contains("voided"), "{detail}"),
            ControlDown::Enrolled(_) => {
                panic!("the revoked grant was honoured: a certificate was issued")
            }
            other => panic!("refused for another reason: {other:?}"),
        }
        // Its allowed twin: the new grant's own retry still works.
        assert!(enrolled(mesh.enroll(&request(&mesh, &fresh, &new_key))));
        // A token made before a revocation and never used is void too.
        let (unused, _) = mesh
            .create_token("web-1", &svc, &BTreeMap::new(), false, 600)
            .unwrap();
        mesh.revoke("web-1").unwrap();
        let k3 = rcgen::KeyPair::generate().unwrap();
        assert!(matches!(
            mesh.enroll(&request(&mesh, &unused, &k3)),
            ControlDown::EnrollRefused {
                code: EnrollErrorCode::NodeRevoked,
                ..
            }
        ));
        // A token leaked before its node ever enrolled: revoking the name voids it.
        let (leaked, _) = mesh
            .create_token("cache-1", &svc, &BTreeMap::new(), false, 600)
            .unwrap();
        assert!(
            mesh.revoke("cache-1").is_ok(),
            "revoking a name with only tokens voids them"
        );
        let t: JoinToken = leaked.parse().unwrap();
        let as_cache = EnrollRequest {
            secret: t.secret_hex(),
            node: NodeName::new("cache-1").unwrap(),
            csr_der: quicmesh_node::control::csr("cache-1", &k3).unwrap(),
            services: vec![ServiceName::new("web").unwrap()],
            labels: Labels::default(),
        };
        assert!(matches!(
            mesh.enroll(&as_cache),
            ControlDown::EnrollRefused {
                code: EnrollErrorCode::NodeRevoked,
                ..
            }
        ));
        // A name with neither node nor token is still no such node.
        assert!(matches!(
            mesh.revoke("nobody-1"),
            Err(MeshError::NoSuchNode(_))
        ));
    }

    #[test]
    fn a_node_carries_exactly_its_tokens_labels_and_omitting_one_escapes_no_deny() {
        let (_dir, mesh) = mesh();
        mesh.apply_policy(
            "[[rule]]\nfrom = \"*\"\nto = \"db\"\naction = \"allow\"\n\n[[rule]]\nfrom = \"tag:env=dev\"\nto = \"db\"\naction = \"deny\"\n",
        )
        .unwrap();
        let labels = BTreeMap::from([
            ("env".to_string(), "dev".to_string()),
            ("team".to_string(), "a".to_string()),
        ]);
        let (token, _) = mesh
            .create_token("web-1", &["web".to_string()], &labels, false, 600)
            .unwrap();
        // The attack: the node claims no label at all (its config leaves them out).
        let key = rcgen::KeyPair::generate().unwrap();
        assert!(enrolled(mesh.enroll(&request(&mesh, &token, &key))));
        let (snap, _) = whole(&mesh, &NodeName::new("web-1").unwrap());
        assert_eq!(
            snap.labels,
            labels_from(&labels).unwrap(),
            "the node's own snapshot carries the token's labels"
        );
        // What a db node sees of web-1, and what its ingress decides.
        let db = NodeName::new("db-1").unwrap();
        let (db_snap, _) = whole(&mesh, &db);
        let web = db_snap
            .peers
            .iter()
            .find(|p| p.node.as_str() == "web-1")
            .unwrap();
        assert_eq!(web.labels.get("env"), Some("dev"));
        let decide = |src_labels: &Labels| {
            db_snap.policy.evaluate(
                Source {
                    service: &ServiceName::new("web").unwrap(),
                    labels: src_labels,
                },
                Destination {
                    service: &ServiceName::new("db").unwrap(),
                    labels: &Labels::default(),
                },
            )
        };
        assert!(
            !decide(&web.labels).is_allow(),
            "the tag: deny rule applies"
        );
        // Its allowed twin: a node whose token carries no env label is allowed.
        assert!(decide(&Labels::default()).is_allow());
        // A label the token does not carry is still refused.
        let (t2, _) = mesh
            .create_token("web-1", &["web".to_string()], &labels, false, 600)
            .unwrap();
        let mut req = request(&mesh, &t2, &rcgen::KeyPair::generate().unwrap());
        req.labels =
            labels_from(&BTreeMap::from([("env".to_string(), "prod".to_string())])).unwrap();
        match mesh.enroll(&req) {
            ControlDown::EnrollRefused {
                code: EnrollErrorCode::LabelNotAllowed,
                detail,
            } => assert!(detail.contains("env=prod"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_a_node_whose_token_grants_it_is_advertised_as_relay() {
        let (_dir, mesh) = mesh();
        for (name, grant) in [("r-granted", true), ("r-claims", false)] {
            let (token, _) = mesh
                .create_token(name, &[], &BTreeMap::new(), grant, 600)
                .unwrap();
            let t: JoinToken = token.parse().unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let req = EnrollRequest {
                secret: t.secret_hex(),
                node: NodeName::new(name).unwrap(),
                csr_der: quicmesh_node::control::csr(name, &key).unwrap(),
                services: vec![],
                labels: Labels::default(),
            };
            assert!(enrolled(mesh.enroll(&req)));
            assert_eq!(mesh.store.node(name).unwrap().unwrap().relay, grant);
            // Both nodes' hellos ask to relay.
            mesh.set_candidates(
                name,
                Reach {
                    candidates: vec!["198.18.0.9:7800".parse().unwrap()],
                    relay: true,
                    observed: None,
                    nat: false,
                },
            );
        }
        mesh.changed().unwrap();
        let (snap, _) = whole(&mesh, &NodeName::new("x").unwrap());
        let relay = |n: &str| {
            snap.peers
                .iter()
                .find(|p| p.node.as_str() == n)
                .unwrap()
                .relay
        };
        assert!(relay("r-granted"));
        assert!(
            !relay("r-claims"),
            "relay = true without the grant is not advertised"
        );
        // An administrator grants the role afterwards (a relay enrolled before grants
        // existed), and withdraws it again.
        mesh.set_relay("r-claims", true).unwrap();
        let (snap, _) = whole(&mesh, &NodeName::new("x").unwrap());
        let advertised = |s: &quicmesh_protocol::wire::Snapshot, n: &str| {
            s.peers.iter().find(|p| p.node.as_str() == n).unwrap().relay
        };
        assert!(advertised(&snap, "r-claims"));
        mesh.set_relay("r-claims", false).unwrap();
        let (snap, _) = whole(&mesh, &NodeName::new("x").unwrap());
        assert!(!advertised(&snap, "r-claims"));
        assert!(matches!(
            mesh.set_relay("nobody", true),
            Err(MeshError::NoSuchNode(_))
        ));
    }

    #[test]
    fn a_punch_request_not_passed_on_is_counted_with_its_reason() {
        let (_dir, mesh) = mesh();
        let from = NodeName::new("web-1").unwrap();
        assert_eq!(mesh.punch(&from, "db-1"), Err(PunchDrop::TargetOffline));
        assert_eq!(mesh.drops.punch.get(PunchDrop::TargetOffline), 1);
        assert_eq!(mesh.drops.punch.get(PunchDrop::Duplicate), 0);
    }

    /// A real loopback control connection to `mesh`'s listener: both endpoints (kept
    /// open by the caller) and the coordinator's side of the connection.
    async fn control_connection(
        mesh: &Arc<Mesh>,
    ) -> (quinn::Endpoint, quinn::Endpoint, quinn::Connection) {
        use quicmesh_node::tls::{self, MeshServerVerifier, ServerExpect};
        let ep = crate::control::bind(mesh, "127.0.0.1:0".parse().unwrap()).unwrap();
        let verifier = MeshServerVerifier::new(
            None,
            ServerExpect::PinnedCoordinator(mesh.ca.fingerprint()),
            Arc::new(|_| {}),
        );
        let cfg = tls::client_config(
            None,
            verifier,
            quicmesh_protocol::wire::ALPN_CONTROL,
            tls::KeyExchange::Hybrid,
        )
        .unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = client
            .connect_with(cfg, ep.local_addr().unwrap(), "coordinator")
            .unwrap();
        let (_c, server) = tokio::join!(connecting, async {
            ep.accept().await.unwrap().await.unwrap()
        });
        (ep, client, server)
    }

    #[tokio::test]
    async fn a_tunnel_report_is_kept_bounded_and_only_while_its_session_is() {
        use quicmesh_protocol::wire::{TunnelReport, MAX_TUNNEL_REPORTS};
        let (_dir, mesh) = mesh();
        let report = |n: usize| -> Vec<TunnelReport> {
            (0..n)
                .map(|i| TunnelReport {
                    peer: NodeName::new(format!("p{i}")).unwrap(),
                    key_exchange: if i == 0 { "X25519MLKEM768" } else { "bogus" }.into(),
                })
                .collect()
        };
        // No session here: nothing kept.
        mesh.report_tunnels("db-1", report(2));
        assert!(mesh.tunnels_of("db-1").is_empty());
        let (_ep, _client, server) = control_connection(&mesh).await;
        let (kick, _pushed) = tokio::sync::mpsc::channel(4);
        let sid = mesh.register_session("db-1", server, kick, Some(1));
        // Kept, cut to the most a node sends, unknown group names named so.
        mesh.report_tunnels("db-1", report(MAX_TUNNEL_REPORTS * 4));
        let t = mesh.tunnels_of("db-1");
        assert_eq!(t.len(), MAX_TUNNEL_REPORTS);
        assert_eq!(
            (t[0].key_exchange, t[1].key_exchange),
            ("X25519MLKEM768", "unknown")
        );
        // Gone with the session, and a late frame of it is not kept.
        mesh.end_session("db-1", sid);
        assert!(mesh.tunnels_of("db-1").is_empty());
        mesh.report_tunnels("db-1", report(2));
        assert!(mesh.tunnels_of("db-1").is_empty());
    }

    #[tokio::test]
    async fn a_punch_flood_from_one_node_is_passed_on_once_per_window_and_counted() {
        let (_dir, mesh) = mesh();
        // A live session for the target, over a real loopback connection.
        let (ep, _client, server) = control_connection(&mesh).await;
        let (kick, mut pushed) = tokio::sync::mpsc::channel(4);
        mesh.register_session("db-1", server, kick, Some(1));
        // The flooder points its candidates at a victim and asks again and again.
        mesh.set_candidates(
            "evil",
            Reach {
                candidates: vec!["198.18.7.7:443".parse().unwrap()],
                relay: false,
                observed: None,
                nat: false,
            },
        );
        let evil = NodeName::new("evil").unwrap();
        let mut pushes = 0;
        for _ in 0..1000 {
            let _ = mesh.punch(&evil, "db-1");
            // The session writes what is queued as fast as it comes.
            while pushed.try_recv().is_ok() {
                pushes += 1;
            }
        }
        assert_eq!(
            pushes, 1,
            "a flood at one target is passed on once per window"
        );
        assert_eq!(mesh.drops.punch.get(PunchDrop::Duplicate), 999);
        // Its allowed twin: another node's request for the same target is passed on.
        mesh.set_candidates(
            "web-1",
            Reach {
                candidates: vec!["198.18.0.5:7800".parse().unwrap()],
                relay: false,
                observed: None,
                nat: false,
            },
        );
        assert_eq!(mesh.punch(&NodeName::new("web-1").unwrap(), "db-1"), Ok(()));
        ep.close(0u32.into(), b"done");
    }
}
