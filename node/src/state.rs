//! The node's state: the applied snapshot as an immutable [`View`] published to readers,
//! and the one function that applies a new snapshot.
//!
//! One writer (the control session, or startup from disk) calls [`Node::apply_snapshot`];
//! the data plane only reads `view()`. Applying the same snapshot twice changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::health::ServiceCheck;
use quicmesh_protocol::ident::{NodeName, ServiceName};
use quicmesh_protocol::wire::Snapshot;
use tokio::sync::watch;

use crate::authz;
use crate::clock::unix_now;
use crate::config::NodeConfig;
use crate::flow::Flows;
use crate::metrics::Metrics;
use crate::reason::CloseReason;
use crate::registry::Tunnels;
use crate::store::DataDir;
use crate::tls::{CertSlot, Trust, TrustHandle};
pub use crate::view::View;

/// How long a tunnel whose peer is not in the applied view may stay up (its snapshot may
/// be on its way: the peer enrolled a moment ago).
const UNKNOWN_PEER_GRACE: Duration = Duration::from_secs(10);

/// A running subsystem that reports its part of `status` (the overlay).
pub trait Status: Send + Sync {
    fn status(&self) -> serde_json::Value;
}

/// A running WireGuard gateway, as the control session and `status` see it.
pub trait Gateway: Send + Sync {
    /// What the coordinator is told: the gateway's key, port and clients.
    fn report(&self) -> quicmesh_protocol::wire::GatewayReport;
    fn status(&self) -> serde_json::Value;
}

/// Control-session state shown by `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ControlState {
    pub connected: bool,
    /// The replica the session is with, while connected.
    pub coordinator: Option<SocketAddr>,
    pub last_error: Option<String>,
    pub revoked: bool,
    /// The session's negotiated key exchange group, while connected.
    pub key_exchange: Option<&'static str>,
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
    /// Every tunnel, and the one selected per peer (the only writer of those tables).
    pub tunnels: Arc<Tunnels>,
    pub control: Mutex<ControlState>,
    /// Where the listeners actually bound (a config port of 0 picks a free one).
    pub bound: Mutex<Bound>,
    /// Overlay mode's part of `status`, once its device is up.
    pub overlay: std::sync::OnceLock<Arc<dyn Status>>,
    /// The WireGuard gateway, once it runs.
    pub gateway: std::sync::OnceLock<Arc<dyn Gateway>>,
    /// The checked services' health (the health checker publishes it).
    pub health: watch::Receiver<Vec<ServiceCheck>>,
    /// Route tables under the tunnels (read by the socket, edited by the path manager).
    pub paths: Arc<crate::path::Paths>,
    /// Per peer, the route of the tunnel flows use (published by the path manager).
    path_status: Mutex<HashMap<NodeName, crate::path::PathStatus>>,
    view_tx: watch::Sender<Arc<View>>,
    /// Pooled connections to the local `http` services.
    pub l7: crate::local_http::Pools,
    /// Spans and the access log of HTTP requests.
    pub telemetry: crate::telemetry::Telemetry,
    /// Per peer, the turn to dial it: flows that find no tunnel wait for one dial instead
    /// of each dialling its own (which the peer's tunnel limit would then cut).
    dialing: Mutex<HashMap<NodeName, Arc<tokio::sync::Mutex<()>>>>,
}

/// The turn to dial a peer (see [`Node::dial_turn`]); forgotten when nobody waits.
#[derive(Debug)]
pub struct DialTurn<'a> {
    node: &'a Node,
    peer: NodeName,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for DialTurn<'_> {
    fn drop(&mut self) {
        let Some(g) = self.guard.take() else { return };
        let gate = tokio::sync::OwnedMutexGuard::mutex(&g).clone();
        drop(g);
        if let Ok(mut m) = self.node.dialing.lock() {
            // The map's reference and this one: nobody else waits.
            if Arc::strong_count(&gate) <= 2 {
                m.remove(&self.peer);
            }
        }
    }
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
        health: watch::Receiver<Vec<ServiceCheck>>,
    ) -> Arc<Self> {
        metrics.set_cert_not_after(identity.not_after);
        let (view_tx, _) = watch::channel(Arc::new(View::default()));
        let telemetry = crate::telemetry::Telemetry::start(
            &cfg.telemetry,
            cfg.name.as_str(),
            metrics.spans_dropped.clone(),
        );
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
            tunnels: Arc::new(Tunnels::new()),
            control: Mutex::new(ControlState::default()),
            bound: Mutex::new(Bound::default()),
            overlay: std::sync::OnceLock::new(),
            gateway: std::sync::OnceLock::new(),
            health,
            paths,
            path_status: Mutex::new(HashMap::new()),
            view_tx,
            l7: Default::default(),
            telemetry,
            dialing: Mutex::new(HashMap::new()),
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
    pub fn set_overlay(&self, ov: Arc<dyn Status>) {
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
        let mut view = View::from_snapshot(snap);
        // WireGuard clients come apart from snapshots: the new view keeps them.
        view.wg = self.view().wg.clone();
        let view = Arc::new(view);
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

    /// Applies the mesh's WireGuard clients (the whole list): a new view with them, on
    /// disk when `persist`, then live flows re-checked (a client revoked or gone loses its
    /// flows; the gateway follows the view and cuts its session).
    pub fn apply_wg_clients(&self, clients: Vec<quicmesh_protocol::wg::WgClient>, persist: bool) {
        if persist {
            if let Err(e) = self.data.save_wg_clients(&clients) {
                tracing::warn!(error = %e, "could not store WireGuard clients; applying them anyway");
            }
        }
        let count = clients.len();
        let mut view = (*self.view()).clone();
        view.wg = Arc::new(crate::view::WgIndex::new(clients));
        let view = Arc::new(view);
        self.view_tx.send_replace(view.clone());
        self.recheck(&view);
        tracing::info!(clients = count, "WireGuard clients applied");
    }

    /// Closes flows and tunnels the new view no longer allows, by the same [`authz`]
    /// functions that let them in. Also run every second, so expiry closes them too.
    pub fn recheck(&self, view: &View) {
        let now = unix_now();
        let check_egress = self.cfg.check_egress;
        let closed = self.flows.recheck(|f| {
            if let Some(req) = &f.request {
                let conn = authz::StreamRequest {
                    peer: &f.peer_id,
                    src: &f.src,
                    dst: &f.dst,
                    hosted: true,
                    http: true,
                };
                return authz::recheck_request(view, conn, req, now);
            }
            authz::recheck_stream(
                view,
                f.direction,
                &f.peer_id,
                &f.src,
                &f.dst,
                f.http,
                check_egress,
                now,
            )
        });
        if closed > 0 {
            tracing::info!(closed, "closed flows no longer allowed");
        }
        self.close_tunnels(view, now);
        if view.revoked.contains(&self.identity.load().serial) {
            tracing::error!("this node's certificate is revoked");
        }
    }

    /// The time-driven half of [`Node::recheck`]: closes the tunnels and flows of peers
    /// whose certificates expired, and tunnels of peers still unknown after the grace.
    /// Touches no policy: cheap enough to run every second.
    pub fn expire(&self) {
        let now = unix_now();
        let view = self.view();
        let closed = self
            .flows
            .recheck(|f| (now >= f.peer_id.not_after).then_some(CloseReason::PeerExpired));
        if closed > 0 {
            tracing::info!(closed, "closed flows of expired peer certificates");
        }
        self.close_tunnels(&view, now);
    }

    fn close_tunnels(&self, view: &View, now: i64) {
        let tunnels = self.tunnels.close_where(|t| {
            match authz::recheck_tunnel(view, &t.peer, now) {
                // A peer this node's view does not hold yet (it enrolled a moment ago) is
                // given time for the snapshot to arrive; one that stays unknown is closed.
                Some(CloseReason::PeerUnknown) if t.since.elapsed() < UNKNOWN_PEER_GRACE => None,
                r => r,
            }
        });
        for (t, reason) in &tunnels {
            tracing::info!(peer = %t.peer.node, %reason, "tunnel closed");
            self.metrics.tunnel_closed(*reason);
        }
        if !tunnels.is_empty() {
            self.metrics.set_peers_connected(self.tunnels.connected());
        }
    }

    /// The open tunnel to `peer` new flows may use, if any.
    pub fn live_tunnel(&self, peer: &NodeName) -> Option<quinn::Connection> {
        self.tunnels.live(peer, unix_now())
    }

    /// Waits for the turn to dial `peer` (one dial per peer at a time).
    pub async fn dial_turn(&self, peer: &NodeName) -> DialTurn<'_> {
        let gate = {
            let mut m = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(peer.clone()).or_default().clone()
        };
        DialTurn {
            node: self,
            peer: peer.clone(),
            guard: Some(gate.lock_owned().await),
        }
    }

    /// Makes `conn` the tunnel used for `peer`: always when `replace`, else only when
    /// there is no open one. Returns whether it was selected.
    pub fn keep_tunnel(&self, peer: &NodeName, conn: &quinn::Connection, replace: bool) -> bool {
        let kept = self.tunnels.select(peer, conn, replace);
        self.metrics.set_peers_connected(self.tunnels.connected());
        kept
    }

    /// Every open tunnel and its peer.
    pub fn served_tunnels(&self) -> Vec<(NodeName, quinn::Connection)> {
        self.tunnels
            .all()
            .into_iter()
            .map(|t| (t.peer.node.clone(), t.conn))
            .collect()
    }

    /// Publishes the tunnels' routes (path manager).
    pub fn set_path_status(&self, s: HashMap<NodeName, crate::path::PathStatus>) {
        if let Ok(mut m) = self.path_status.lock() {
            *m = s;
        }
    }

    /// The route of the tunnel to `peer`, when there is one.
    pub fn path_status(&self, peer: &NodeName) -> Option<crate::path::PathStatus> {
        self.path_status
            .lock()
            .ok()
            .and_then(|m| m.get(peer).cloned())
    }

    /// Asks the control session to have `peer` dial back (hole punching).
    pub fn request_punch(&self, peer: &NodeName) {
        if !self.tunnels.request_punch(peer) {
            tracing::debug!(%peer, "punch queue full; request dropped");
        }
    }

    /// The address the coordinator should tell peers to dial.
    pub fn advertise(&self) -> Option<SocketAddr> {
        self.cfg.advertise
    }
}
