//! The applied snapshot as the data plane reads it: an immutable, indexed [`View`].
//!
//! A leaf module: it depends only on `protocol`. One writer builds a new `View` from each
//! snapshot (`state`), every reader holds an `Arc<View>` for as long as one decision takes.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use quicmesh_protocol::cert::Serial;
use quicmesh_protocol::ident::{Labels, NodeName, ServiceName};
use quicmesh_protocol::overlay::Pools;
use quicmesh_protocol::policy::Policy;
use quicmesh_protocol::wg::WgClient;
use quicmesh_protocol::wire::{PeerInfo, Snapshot};
use std::sync::Arc;

/// What the data plane reads: the applied snapshot, indexed.
#[derive(Debug, Default, Clone)]
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
    /// The mesh's WireGuard clients (sent apart from snapshots; kept across them).
    pub wg: Arc<WgIndex>,
}

/// The WireGuard clients a node knows, indexed by name and by address.
#[derive(Debug, Default)]
pub struct WgIndex {
    pub by_name: HashMap<NodeName, Arc<WgClient>>,
    pub by_addr: HashMap<IpAddr, Arc<WgClient>>,
}

impl WgIndex {
    /// Indexes `clients`; a later client claiming an address or a name already taken is
    /// left out (the coordinator never sends such a list).
    pub fn new(clients: Vec<WgClient>) -> Self {
        let mut ix = Self::default();
        for c in clients {
            if ix.by_name.contains_key(&c.name)
                || c.addresses.iter().any(|a| ix.by_addr.contains_key(a))
            {
                tracing::warn!(client = %c.name, "WireGuard client repeats a name or an address: left out");
                continue;
            }
            let c = Arc::new(c);
            for a in &c.addresses {
                ix.by_addr.insert(*a, c.clone());
            }
            ix.by_name.insert(c.name.clone(), c);
        }
        ix
    }

    /// The client owning `addr`, when `gateway` is one of its gateways: the only way a
    /// packet whose source is not its sender's own is accepted.
    pub fn via(&self, addr: IpAddr, gateway: &NodeName) -> Option<&Arc<WgClient>> {
        self.by_addr
            .get(&addr)
            .filter(|c| c.gateways.contains(gateway))
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl View {
    pub fn from_snapshot(s: &Snapshot) -> Self {
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
            wg: Arc::default(),
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
}
