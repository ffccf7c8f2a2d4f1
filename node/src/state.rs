//! The node's state: the applied snapshot as an immutable [`View`] published to readers,
//! and the one function that applies a new snapshot.
//!
//! One writer (the control session, or startup from disk) calls [`Node::apply_snapshot`];
//! the data plane only reads `view()`. Applying the same snapshot twice changes nothing.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use quicmesh_protocol::cert::{PeerIdentity, Serial};
use quicmesh_protocol::ident::{Labels, NodeName, ServiceName};
use quicmesh_protocol::overlay::Pools;
use quicmesh_protocol::policy::{Decision, Destination, Policy, Source};
use quicmesh_protocol::wire::{PeerInfo, Snapshot};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::flow::{Direction, Flows};
use crate::metrics::Metrics;
use crate::store::DataDir;
use crate::tls::{CertSlot, Trust, TrustHandle};

/// What the data plane reads: the applied snapshot, indexed.
#[derive(Debug, Default)]
pub struct View {
    pub version: u64,
    pub policy_version: u64,
    pub policy: Policy,
    pub labels: Labels,
    pub peers: HashMap<NodeName, PeerInfo>,
    /// Nodes hosting each service, in name order.
    pub by_service: HashMap<ServiceName, Vec<NodeName>>,
    pub revoked: HashSet<Serial>,
    /// Overlay address -> the peer owning it.
    pub routes: HashMap<IpAddr, NodeName>,
    /// The mesh's overlay prefixes (`None` before the first snapshot).
    pub pools: Option<Pools>,
}

impl View {
    fn from_snapshot(s: &Snapshot) -> Self {
        let mut by_service: HashMap<ServiceName, Vec<NodeName>> = HashMap::new();
        for p in &s.peers {
            for svc in &p.services {
                by_service
                    .entry(svc.clone())
                    .or_default()
                    .push(p.node.clone());
            }
        }
        for v in by_service.values_mut() {
            v.sort();
        }
        let routes = s
            .peers
            .iter()
            .flat_map(|p| p.overlay.iter().map(move |ip| (*ip, p.node.clone())))
            .collect();
        Self {
            version: s.version,
            policy_version: s.policy_version,
            policy: s.policy.clone(),
            labels: s.labels.clone(),
            peers: s
                .peers
                .iter()
                .map(|p| (p.node.clone(), p.clone()))
                .collect(),
            by_service,
            revoked: s.revoked.iter().cloned().collect(),
            routes,
            pools: Some(s.pools),
        }
    }

    /// The peers that may be routed to for `service`: hosting it, online, not failing its
    /// check (in name order).
    pub fn healthy<'a>(
        &'a self,
        service: &'a ServiceName,
    ) -> impl Iterator<Item = &'a PeerInfo> + 'a {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|n| self.peers.get(n))
            .filter(move |p| p.serves(service))
    }

    /// Labels of a peer node (empty when unknown).
    pub fn peer_labels(&self, node: &NodeName) -> Labels {
        self.peers
            .get(node)
            .map(|p| p.labels.clone())
            .unwrap_or_default()
    }

    /// Evaluates `src (on node src_node) -> dst (on node dst_node)`.
    pub fn decide(
        &self,
        src: &ServiceName,
        src_labels: &Labels,
        dst: &ServiceName,
        dst_labels: &Labels,
    ) -> Decision {
        self.policy.evaluate(
            Source {
                service: src,
                labels: src_labels,
            },
            Destination {
                service: dst,
                labels: dst_labels,
            },
        )
    }
}

/// Control-session state shown by `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ControlState {
    pub connected: bool,
    pub last_error: Option<String>,
    pub revoked: bool,
}

/// Addresses the node's listeners bound to.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Bound {
    /// (service, address) per upstream listener.
    pub upstreams: Vec<(ServiceName, SocketAddr)>,
    pub metrics: Option<SocketAddr>,
    /// The DNS server's address, when it runs.
    pub dns: Option<SocketAddr>,
}

/// Everything the node's tasks share.
pub struct Node {
    pub cfg: NodeConfig,
    pub data: DataDir,
    pub metrics: Arc<Metrics>,
    pub trust: TrustHandle,
    pub cert: Arc<CertSlot>,
    /// The node's private key, PEM (for renewal CSRs).
    pub key_pem: String,
    /// The current leaf (DER) and its identity.
    pub identity: ArcSwap<PeerIdentity>,
    pub leaf_der: ArcSwap<Vec<u8>>,
    pub endpoint: quinn::Endpoint,
    pub flows: Arc<Flows>,
    pub conns: Mutex<HashMap<NodeName, quinn::Connection>>,
    pub control: Mutex<ControlState>,
    /// Where the listeners actually bound (a config port of 0 picks a free one).
    pub bound: Mutex<Bound>,
    /// Overlay mode, once its device is up.
    pub overlay: std::sync::OnceLock<Arc<crate::overlay::Overlay>>,
    /// The checked services' health.
    pub health: crate::health::Reports,
    /// Per peer, the addresses the last successful dial tried (for `status`).
    pub tried: Mutex<HashMap<NodeName, Vec<SocketAddr>>>,
    /// Route tables under the tunnels (read by the socket, edited by the path manager).
    pub paths: Arc<crate::path::Paths>,
    /// Every tunnel being served (the one in `conns` and any second one), by stable id.
    served: Mutex<HashMap<usize, (NodeName, quinn::Connection)>>,
    /// Per peer, the route of the tunnel flows use (published by the path manager).
    path_status: Mutex<HashMap<NodeName, crate::path::manager::PathStatus>>,
    /// Peers being dialled that should dial back (sent by the control session).
    punches: Mutex<Vec<NodeName>>,
    punch_ready: tokio::sync::Notify,
    view_tx: watch::Sender<Arc<View>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.cfg.name)
            .finish_non_exhaustive()
    }
}

/// Why a snapshot was refused (sent back as a nack).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is for node {0}")]
    WrongNode(String),
    #[error("snapshot is for trust domain {0}")]
    WrongTrustDomain(String),
    #[error("snapshot version {got} is older than the applied {have}")]
    Stale { got: u64, have: u64 },
    #[error("snapshot ca bundle: {0}")]
    Ca(String),
}

impl Node {
    /// Builds the shared state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: NodeConfig,
        data: DataDir,
        metrics: Arc<Metrics>,
        trust: Trust,
        cert: Arc<CertSlot>,
        key_pem: String,
        identity: PeerIdentity,
        leaf_der: Vec<u8>,
        endpoint: quinn::Endpoint,
        paths: Arc<crate::path::Paths>,
        health: crate::health::Reports,
    ) -> Arc<Self> {
        metrics.set_cert_not_after(identity.not_after);
        let (view_tx, _) = watch::channel(Arc::new(View::default()));
        Arc::new(Self {
            cfg,
            data,
            metrics,
            trust: Arc::new(ArcSwap::from_pointee(trust)),
            cert,
            key_pem,
            identity: ArcSwap::from_pointee(identity),
            leaf_der: ArcSwap::from_pointee(leaf_der),
            endpoint,
            flows: Arc::new(Flows::default()),
            conns: Mutex::new(HashMap::new()),
            control: Mutex::new(ControlState::default()),
            bound: Mutex::new(Bound::default()),
            overlay: std::sync::OnceLock::new(),
            health,
            tried: Mutex::new(HashMap::new()),
            paths,
            served: Mutex::new(HashMap::new()),
            path_status: Mutex::new(HashMap::new()),
            punches: Mutex::new(Vec::new()),
            punch_ready: tokio::sync::Notify::new(),
            view_tx,
        })
    }

    /// The applied state.
    pub fn view(&self) -> Arc<View> {
        self.view_tx.borrow().clone()
    }

    /// Follows the applied state.
    pub fn watch_view(&self) -> watch::Receiver<Arc<View>> {
        self.view_tx.subscribe()
    }

    /// Records the running overlay (once).
    pub fn set_overlay(&self, ov: Arc<crate::overlay::Overlay>) {
        let _ = self.overlay.set(ov);
    }

    /// Applies a snapshot: trust, view, disk, then re-checks live flows and tunnels.
    /// `persist = false` when loading the snapshot from disk at startup.
    pub fn apply_snapshot(&self, snap: &Snapshot, persist: bool) -> Result<bool, SnapshotError> {
        if snap.node != self.cfg.name {
            return Err(SnapshotError::WrongNode(snap.node.to_string()));
        }
        let td = self.trust.load().trust_domain.clone();
        if snap.trust_domain != td {
            return Err(SnapshotError::WrongTrustDomain(
                snap.trust_domain.to_string(),
            ));
        }
        let have = self.view().version;
        if snap.version < have {
            return Err(SnapshotError::Stale {
                got: snap.version,
                have,
            });
        }
        if snap.version == have && have != 0 {
            return Ok(false);
        }
        let trust = Trust::new(td, &snap.ca_bundle, snap.revoked.iter().cloned())
            .map_err(|e| SnapshotError::Ca(e.to_string()))?;
        if persist {
            if let Err(e) = self.data.save_snapshot(snap) {
                tracing::warn!(error = %e, "could not store snapshot; applying it anyway");
            }
        }
        self.trust.store(Arc::new(trust));
        let view = Arc::new(View::from_snapshot(snap));
        // A peer that moved keeps its tunnel: the path manager follows it to its new
        // address, or closes the tunnel when nothing answers.
        self.view_tx.send_replace(view.clone());
        self.metrics.set_snapshot_version(snap.version);
        self.recheck(&view);
        tracing::info!(
            version = snap.version,
            policy_version = snap.policy_version,
            peers = snap.peers.len(),
            "snapshot applied"
        );
        Ok(true)
    }

    /// Closes flows and tunnels the new view no longer allows.
    fn recheck(&self, view: &View) {
        let my_labels = &view.labels;
        let closed = self.flows.recheck(|f| {
            if f.peer_serial
                .as_ref()
                .is_some_and(|s| view.revoked.contains(s))
            {
                return Some("peer_revoked");
            }
            let peer_labels = view.peer_labels(&f.peer);
            let decision = match f.direction {
                Direction::Ingress => view.decide(&f.src, &peer_labels, &f.dst, my_labels),
                Direction::Egress if self.cfg.check_egress => {
                    view.decide(&f.src, my_labels, &f.dst, &peer_labels)
                }
                Direction::Egress => return None,
            };
            (!decision.is_allow()).then_some("policy_changed")
        });
        if closed > 0 {
            tracing::info!(closed, "closed flows no longer allowed");
        }
        let td = self.trust.load().trust_domain.clone();
        if let Ok(mut conns) = self.conns.lock() {
            conns.retain(|name, conn| {
                let revoked = crate::tls::peer_leaf(conn)
                    .and_then(|der| PeerIdentity::from_der(&der, &td).ok())
                    .is_some_and(|id| view.revoked.contains(&id.serial));
                if revoked {
                    tracing::info!(peer = %name, "closing tunnel to revoked peer");
                    self.metrics.flow_closed("peer_revoked_tunnel");
                    conn.close(quinn::VarInt::from_u32(2), b"revoked");
                }
                !revoked
            });
        }
        if view.revoked.contains(&self.identity.load().serial) {
            tracing::error!("this node's certificate is revoked");
        }
    }

    /// The open tunnel to `peer`, if any.
    pub fn live_tunnel(&self, peer: &NodeName) -> Option<quinn::Connection> {
        self.conns
            .lock()
            .ok()
            .and_then(|m| m.get(peer).cloned())
            .filter(|c| c.close_reason().is_none())
    }

    /// Makes `conn` the tunnel used for `peer`: always when `replace`, else only when
    /// there is no open one. Returns whether it was stored.
    pub fn keep_tunnel(&self, peer: &NodeName, conn: &quinn::Connection, replace: bool) -> bool {
        let Ok(mut m) = self.conns.lock() else {
            return false;
        };
        let store = replace || m.get(peer).is_none_or(|c| c.close_reason().is_some());
        if store {
            m.insert(peer.clone(), conn.clone());
            self.metrics.set_peers_connected(m.len());
        }
        store
    }

    /// Records a tunnel being served (until [`Node::unserve`]).
    pub fn serve_tunnel(&self, peer: &NodeName, conn: &quinn::Connection) {
        if let Ok(mut m) = self.served.lock() {
            m.insert(conn.stable_id(), (peer.clone(), conn.clone()));
        }
    }

    /// A served tunnel ended.
    pub fn unserve(&self, conn: &quinn::Connection) {
        if let Ok(mut m) = self.served.lock() {
            m.remove(&conn.stable_id());
        }
    }

    /// Every tunnel being served.
    pub fn served_tunnels(&self) -> Vec<(NodeName, quinn::Connection)> {
        self.served
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Publishes the tunnels' routes (path manager).
    pub fn set_path_status(&self, s: HashMap<NodeName, crate::path::manager::PathStatus>) {
        if let Ok(mut m) = self.path_status.lock() {
            *m = s;
        }
    }

    /// The route of the tunnel to `peer`, when there is one.
    pub fn path_status(&self, peer: &NodeName) -> Option<crate::path::manager::PathStatus> {
        self.path_status
            .lock()
            .ok()
            .and_then(|m| m.get(peer).cloned())
    }

    /// Asks the control session to have `peer` dial back (hole punching).
    pub fn request_punch(&self, peer: &NodeName) {
        if let Ok(mut p) = self.punches.lock() {
            if !p.contains(peer) && p.len() < 1024 {
                p.push(peer.clone());
            }
        }
        self.punch_ready.notify_one();
    }

    /// Waits for punch requests and takes them.
    pub async fn take_punches(&self) -> Vec<NodeName> {
        loop {
            let taken = self
                .punches
                .lock()
                .map(|mut p| std::mem::take(&mut *p))
                .unwrap_or_default();
            if !taken.is_empty() {
                return taken;
            }
            self.punch_ready.notified().await;
        }
    }

    /// The address the coordinator should tell peers to dial.
    pub fn advertise(&self) -> Option<SocketAddr> {
        self.cfg.advertise
    }
}
