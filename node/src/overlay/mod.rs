//! Overlay mode: a TUN device carrying IP packets between nodes' overlay addresses as
//! QUIC datagrams (RFC 9221) on the peer tunnels the L4 path already uses.
//!
//! Send path: one task reads the TUN (with virtio-net offload, one read returns up to
//! 64 KB of TCP segments, split here into packets that fit), finds the peer owning each
//! destination address, records the flow (so its replies pass), and queues the packet as
//! a datagram; quinn batches datagrams into UDP GSO sends. A packet larger than the path
//! carries is answered with ICMP "too big" on the TUN, never fragmented.
//!
//! Receive path: one task per peer connection drains the datagrams that are ready, runs
//! each through the ingress firewall ([`firewall`]), and writes the survivors to the TUN
//! in one batch, coalesced (GRO) where they belong to one TCP flow.

mod buffers;
pub mod firewall;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::ident::NodeName;
use quicmesh_protocol::overlay::Pools;
use quicmesh_protocol::packet;
use serde::Serialize;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::config::OverlayConfig;
use crate::metrics::OverlayMetrics;
use crate::reason::Label;
use crate::registry::TunnelEvent;
use crate::state::{Node, View};
use buffers::{Arena, WritePool};
use firewall::{DropReason, Limits, LocalService, Tracker, Verdict};

/// Errors starting overlay mode.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("the node certificate has no overlay addresses (enrolled before overlay mode existed: re-enroll)")]
    NoAddresses,
    #[error("creating TUN device {device}: {reason}")]
    Device { device: String, reason: String },
}

/// Datagram counters of one peer.
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub dropped: [AtomicU64; DropReason::COUNT],
}

/// A peer's counters as `status` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub dropped: std::collections::BTreeMap<&'static str, u64>,
}

/// The running overlay.
pub struct Overlay {
    pub dev: Arc<AsyncDevice>,
    pub device: String,
    pub addrs: Vec<IpAddr>,
    pub pools: Pools,
    pub mtu: u16,
    pub offload: bool,
    pub tracker: Tracker,
    metrics: OverlayMetrics,
    peers: Mutex<HashMap<NodeName, Arc<PeerCounters>>>,
    /// Connections whose datagrams are being read (by stable id).
    reading: Mutex<HashSet<usize>>,
    /// Peers being dialled for the send path.
    dialling: Mutex<HashSet<NodeName>>,
    /// Buffers for the receive paths' TUN writes.
    write_pool: WritePool,
    /// This node's WireGuard clients' side, when it is a gateway.
    pub clients: std::sync::OnceLock<Arc<dyn ClientPath>>,
    /// Packets of WireGuard clients dropped here, by client and reason (bounded: the
    /// clients are the coordinator's list, and a client gone is forgotten on recheck).
    client_drops: ClientDrops,
}

/// Packets of WireGuard clients dropped, by client and reason (for `status`). Bounded by
/// the clients the coordinator lists: a client gone is forgotten ([`ClientDrops::retain`]).
#[derive(Debug, Default)]
pub struct ClientDrops(Mutex<HashMap<NodeName, std::collections::BTreeMap<&'static str, u64>>>);

impl ClientDrops {
    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<NodeName, std::collections::BTreeMap<&'static str, u64>>>
    {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one drop of `client`'s by `reason`: how many of that kind so far.
    pub fn count(&self, client: &NodeName, reason: DropReason) -> u64 {
        let mut m = self.map();
        if !m.contains_key(client) {
            m.insert(client.clone(), Default::default());
        }
        let Some(by_reason) = m.get_mut(client) else {
            return 0;
        };
        let n = by_reason.entry(reason.as_str()).or_default();
        *n += 1;
        *n
    }

    /// Forgets the clients no longer in `view`.
    pub fn retain(&self, view: &View) {
        self.map().retain(|c, _| view.wg.by_name.contains_key(c));
    }

    /// One client's drops by reason.
    pub fn of(&self, client: &str) -> std::collections::BTreeMap<&'static str, u64> {
        self.map()
            .iter()
            .find(|(c, _)| c.as_str() == client)
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    }

    /// Every client's drops by reason.
    pub fn all(&self) -> HashMap<NodeName, std::collections::BTreeMap<&'static str, u64>> {
        self.map().clone()
    }
}

/// Where packets for the WireGuard clients a gateway serves go (the gateway shell).
pub trait ClientPath: Send + Sync {
    /// A packet for one of this gateway's clients, from peer node `from` (this node
    /// itself for its own packets): judged at the client's ingress, then sent to it.
    fn deliver(
        &self,
        info: &packet::PacketInfo,
        pkt: &[u8],
        from: &PeerIdentity,
        services: &Arc<BTreeSet<quicmesh_protocol::ident::ServiceName>>,
        view: &View,
    ) -> Result<(), DropReason>;
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("device", &self.device)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// Polls a future once: its output if it is ready now.
fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

impl Overlay {
    /// Opens the TUN device with the node's overlay addresses and the mesh's prefixes.
    pub fn open(
        cfg: &OverlayConfig,
        addrs: Vec<IpAddr>,
        pools: Pools,
        services: Vec<LocalService>,
        own_services: BTreeSet<quicmesh_protocol::ident::ServiceName>,
        metrics: OverlayMetrics,
    ) -> Result<Self, OverlayError> {
        let v4 = addrs.iter().find(|a| a.is_ipv4()).copied();
        let v6 = addrs.iter().find(|a| a.is_ipv6()).copied();
        if v4.is_none() && v6.is_none() {
            return Err(OverlayError::NoAddresses);
        }
        let build = |offload: bool| {
            tracing::debug!(offload, "creating TUN device");
            let mut b = DeviceBuilder::new().name(cfg.device.clone()).mtu(cfg.mtu);
            if let Some(IpAddr::V4(a)) = v4 {
                b = b.ipv4(a, pools.v4.len, None);
            }
            if let Some(IpAddr::V6(a)) = v6 {
                b = b.ipv6(a, pools.v6.len);
            }
            b.offload(offload).build_async()
        };
        // Offload (virtio-net header, TSO/GRO) where the kernel has it; plain otherwise.
        let (dev, offload) = match build(true) {
            Ok(d) => (d, true),
            Err(e) => {
                tracing::warn!(error = %e, "TUN offload unavailable; using plain reads");
                let d = build(false).map_err(|e| OverlayError::Device {
                    device: cfg.device.clone(),
                    reason: e.to_string(),
                })?;
                (d, false)
            }
        };
        tracing::info!(device = %cfg.device, ?addrs, mtu = cfg.mtu, offload, "overlay device up");
        Ok(Self {
            dev: Arc::new(dev),
            device: cfg.device.clone(),
            addrs,
            pools,
            mtu: cfg.mtu,
            offload,
            tracker: Tracker::with_limits(
                services,
                Limits {
                    max_flows: cfg.max_flows,
                    max_flows_per_peer: cfg.max_flows_per_peer,
                },
            )
            .with_own_services(own_services),
            metrics,
            peers: Mutex::new(HashMap::new()),
            reading: Mutex::new(HashSet::new()),
            dialling: Mutex::new(HashSet::new()),
            write_pool: WritePool::new(4),
            clients: std::sync::OnceLock::new(),
            client_drops: ClientDrops::default(),
        })
    }

    fn counters(&self, peer: &NodeName) -> Arc<PeerCounters> {
        let mut m = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(peer.clone()).or_default().clone()
    }

    pub(crate) fn dropped(&self, reason: DropReason, peer: Option<&PeerCounters>) {
        self.metrics.dropped[reason.index()].inc();
        if let Some(p) = peer {
            p.dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Per-peer counters for `status`.
    pub fn peer_status(&self) -> std::collections::BTreeMap<String, PeerStatus> {
        let m = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|(n, c)| {
                let dropped = DropReason::ALL
                    .iter()
                    .map(|r| (r.as_str(), c.dropped[r.index()].load(Ordering::Relaxed)))
                    .filter(|(_, v)| *v > 0)
                    .collect();
                (
                    n.to_string(),
                    PeerStatus {
                        tx_packets: c.tx_packets.load(Ordering::Relaxed),
                        tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
                        rx_packets: c.rx_packets.load(Ordering::Relaxed),
                        rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
                        dropped,
                    },
                )
            })
            .collect()
    }

    /// Drops by reason over all peers (and packets with no peer).
    pub fn drop_totals(&self) -> std::collections::BTreeMap<&'static str, u64> {
        DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), self.metrics.dropped[r.index()].get()))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Writes packets to the TUN (buffers hold `VIRTIO_NET_HDR_LEN` bytes of headroom).
    pub(crate) async fn write(&self, gro: &mut GROTable, bufs: &mut [BytesMut]) {
        if bufs.is_empty() {
            return;
        }
        if let Err(e) = self.dev.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN).await {
            tracing::debug!(error = %e, "TUN write failed");
        }
    }
}

/// Starts overlay mode once the node has a snapshot (the prefixes come with it); returns
/// when the device is up and both paths run.
pub async fn start(node: Arc<Node>, cfg: OverlayConfig) -> Result<Arc<Overlay>, OverlayError> {
    let mut views = node.watch_view();
    let pools = loop {
        if let Some(p) = views.borrow_and_update().pools {
            break p;
        }
        if views.changed().await.is_err() {
            return Err(OverlayError::Device {
                device: cfg.device.clone(),
                reason: "node stopped before its first snapshot".into(),
            });
        }
    };
    let addrs = node.identity.load().ips.clone();
    tracing::info!(?addrs, v4 = %pools.v4, v6 = %pools.v6, device = %cfg.device, "starting overlay");
    let services = node
        .cfg
        .services
        .iter()
        .filter(|s| !s.ports.is_empty())
        .map(|s| LocalService {
            name: s.name.clone(),
            ports: s.ports.clone(),
        })
        .collect();
    let ov = Arc::new(Overlay::open(
        &cfg,
        addrs,
        pools,
        services,
        node.identity.load().services.clone(),
        node.metrics.overlay(),
    )?);
    node.set_overlay(ov.clone());
    // Every tunnel's datagrams: those that come up from now on (subscribed first), and
    // those that came up before the overlay did (`read_datagrams` reads each once).
    let mut events = node.tunnels.subscribe();
    for t in node.tunnels.all() {
        read_datagrams(&node, &ov, t.conn, t.peer);
    }
    let (n, o) = (node.clone(), ov.clone());
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match events.recv().await {
                Ok(TunnelEvent::Up(t)) => read_datagrams(&n, &o, t.conn, t.peer),
                Ok(TunnelEvent::Down { .. }) => {}
                Err(RecvError::Lagged(_)) => {
                    for t in n.tunnels.all() {
                        read_datagrams(&n, &o, t.conn, t.peer);
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    let (n, o) = (node.clone(), ov.clone());
    tokio::spawn(async move { send_path(n, o).await });
    // Tracked flows are re-checked on every snapshot, and idle ones forgotten.
    let (n, o) = (node.clone(), ov.clone());
    tokio::spawn(async move {
        let mut views = n.watch_view();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
        loop {
            tokio::select! {
                r = views.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
            let view = n.view();
            let removed = o.tracker.recheck(&view);
            o.client_drops.retain(&view);
            if removed > 0 {
                tracing::info!(
                    removed,
                    version = view.version,
                    "overlay flows no longer allowed or idle were forgotten"
                );
            }
        }
    });
    Ok(ov)
}

impl crate::state::Status for Overlay {
    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "device": self.device,
            "addresses": self.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "prefixes": [self.pools.v4.to_string(), self.pools.v6.to_string()],
            "mtu": self.mtu,
            "offload": self.offload,
            "tracked_flows": self.tracker.len(),
            "dropped": self.drop_totals(),
            "peers": self.peer_status(),
            "wireguard_clients_dropped": self.client_drops.all(),
        })
    }
}

/// Reads `conn`'s datagrams into the TUN (once per connection).
pub fn read_datagrams(
    node: &Arc<Node>,
    ov: &Arc<Overlay>,
    conn: quinn::Connection,
    id: Arc<PeerIdentity>,
) {
    {
        let mut r = ov.reading.lock().unwrap_or_else(|e| e.into_inner());
        if !r.insert(conn.stable_id()) {
            return;
        }
    }
    let (node, ov) = (node.clone(), ov.clone());
    tokio::spawn(async move {
        let stable = conn.stable_id();
        receive_path(&node, &ov, &conn, id).await;
        ov.reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&stable);
    });
}

/// Most datagrams handled per TUN write.
const RX_BATCH: usize = 64;

async fn receive_path(
    node: &Arc<Node>,
    ov: &Arc<Overlay>,
    conn: &quinn::Connection,
    id: Arc<PeerIdentity>,
) {
    let services: Arc<BTreeSet<_>> = Arc::new(id.services.clone());
    let counters = ov.counters(&id.node);
    let mut gro = GROTable::default();
    let mut batch: Vec<Bytes> = Vec::with_capacity(RX_BATCH);
    loop {
        match conn.read_datagram().await {
            // Empty: the path layer's nudge after a route change.
            Ok(d) if d.is_empty() => continue,
            Ok(d) => batch.push(d),
            Err(_) => return,
        }
        while batch.len() < RX_BATCH {
            match now_or_never(conn.read_datagram()) {
                Some(Ok(d)) if d.is_empty() => {}
                Some(Ok(d)) => batch.push(d),
                _ => break,
            }
        }
        let view = node.view();
        let mut out = ov.write_pool.take();
        let mut used = 0;
        let (mut packets, mut bytes) = (0u64, 0u64);
        for d in batch.drain(..) {
            let info = match packet::parse(&d) {
                Ok(i) => i,
                Err(e) => {
                    ov.dropped(DropReason::from(e), Some(&counters));
                    continue;
                }
            };
            // For a WireGuard client this gateway serves: judged at the client's ingress.
            if let Some(g) = ov.clients.get() {
                if !ov.addrs.contains(&info.dst) && view.wg.via(info.dst, &node.cfg.name).is_some()
                {
                    match g.deliver(&info, &d, &id, &services, &view) {
                        Ok(()) => {
                            packets += 1;
                            bytes += d.len() as u64;
                        }
                        Err(reason) => {
                            tracing::debug!(peer = %id.node, reason = reason.as_str(), src = %info.src, dst = %info.dst, "packet for a WireGuard client dropped");
                            ov.dropped(reason, Some(&counters));
                        }
                    }
                    continue;
                }
            }
            match ov.tracker.inbound(&info, &id, &services, &ov.addrs, &view) {
                Verdict::Established => {}
                Verdict::New { service, rule } => {
                    tracing::debug!(peer = %id.node, %service, %rule, src = %info.src, dst = %info.dst, "overlay flow accepted");
                }
                Verdict::Drop { reason, rule } => {
                    // A WireGuard client's packet is counted with the client's name too.
                    let client = (!id.owns_address(info.src))
                        .then(|| view.wg.via(info.src, &id.node))
                        .flatten();
                    match client {
                        Some(c) => {
                            // Logged at the 1st, 2nd, 4th, 8th... drop of its kind: a
                            // client sending what is refused cannot flood the log.
                            let n = ov.client_drops.count(&c.name, reason);
                            if n.is_power_of_two() {
                                tracing::info!(peer = %id.node, client = %c.name, service = %c.service, reason = reason.as_str(), rule = rule.as_deref().unwrap_or("-"), src = %info.src, dst = %info.dst, drops = n, "WireGuard client's packet dropped");
                            }
                        }
                        None => {
                            tracing::debug!(peer = %id.node, reason = reason.as_str(), rule = rule.as_deref().unwrap_or("-"), src = %info.src, dst = %info.dst, "overlay packet dropped")
                        }
                    }
                    ov.dropped(reason, Some(&counters));
                    continue;
                }
            }
            packets += 1;
            bytes += d.len() as u64;
            buffers::fill(&mut out, used, &d);
            used += 1;
        }
        counters.rx_packets.fetch_add(packets, Ordering::Relaxed);
        counters.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        ov.metrics.rx_packets.inc_by(packets);
        ov.metrics.rx_bytes.inc_by(bytes);
        ov.write(&mut gro, &mut out[..used]).await;
        ov.write_pool.give(out);
    }
}

/// A peer's tunnel as the send path caches it.
struct Route {
    conn: quinn::Connection,
    counters: Arc<PeerCounters>,
}

/// Sends packets to peers as datagrams: the tunnels in use, and buffers to send from.
pub struct Sender {
    routes: HashMap<NodeName, Route>,
    arena: Arena,
}

impl Default for Sender {
    fn default() -> Self {
        Self {
            routes: HashMap::new(),
            // 16 x 256 KiB: more than the datagram send queue (1 MiB) holds in flight.
            arena: Arena::new(256 * 1024, 16),
        }
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

/// Why [`Sender::send`] did not send a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// Dropped and counted.
    Dropped,
    /// Larger than the path carries: the largest that fits.
    TooBig(u16),
}

impl Sender {
    /// Sends `pkt` (already routed to `peer`) on its tunnel, recording its flow with
    /// `record` first (so its replies pass); dials the peer when no tunnel is up. `wait`:
    /// wait for room in the tunnel's datagram queue (this node's own packets: TCP then
    /// slows down), else the queue drops its oldest (a gateway's loop serving every client
    /// must never wait on one slow peer).
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &mut self,
        node: &Arc<Node>,
        ov: &Arc<Overlay>,
        view: &View,
        peer: &NodeName,
        info: &packet::PacketInfo,
        pkt: &[u8],
        record: &(dyn Fn(&packet::PacketInfo) -> Result<(), DropReason> + Sync),
        wait: bool,
    ) -> Result<(), NotSent> {
        // A cached route is used until a send on it fails (checking the connection's
        // state per packet would take its lock twice).
        if !self.routes.contains_key(peer) {
            let Some(conn) = node.live_tunnel(peer) else {
                dial(node, ov, view, peer);
                ov.dropped(DropReason::NoTunnel, Some(&ov.counters(peer)));
                return Err(NotSent::Dropped);
            };
            self.routes.insert(
                peer.clone(),
                Route {
                    conn,
                    counters: ov.counters(peer),
                },
            );
        }
        let Some(route) = self.routes.get(peer) else {
            return Err(NotSent::Dropped);
        };
        if let Err(reason) = record(info) {
            ov.dropped(reason, Some(&route.counters));
            return Err(NotSent::Dropped);
        }
        if !wait && route.conn.datagram_send_buffer_space() < pkt.len() {
            ov.dropped(DropReason::QueueFull, Some(&route.counters));
            return Err(NotSent::Dropped);
        }
        let data = self.arena.carve(pkt);
        let sent = if wait {
            route.conn.send_datagram_wait(data).await
        } else {
            route.conn.send_datagram(data)
        };
        match sent {
            Ok(()) => {
                route.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                route
                    .counters
                    .tx_bytes
                    .fetch_add(pkt.len() as u64, Ordering::Relaxed);
                ov.metrics.tx_packets.inc();
                ov.metrics.tx_bytes.inc_by(pkt.len() as u64);
                Ok(())
            }
            Err(quinn::SendDatagramError::TooLarge) => {
                let fits = route.conn.max_datagram_size().unwrap_or(1200);
                ov.dropped(DropReason::TooBig, Some(&route.counters));
                Err(NotSent::TooBig(u16::try_from(fits).unwrap_or(u16::MAX)))
            }
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "datagram not sent");
                ov.dropped(DropReason::NoTunnel, Some(&route.counters));
                self.routes.remove(peer);
                Err(NotSent::Dropped)
            }
        }
    }
}

async fn send_path(node: Arc<Node>, ov: Arc<Overlay>) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; usize::from(ov.mtu) + 64]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut sender = Sender::default();
    let mut gro = GROTable::default();
    loop {
        let n = match ov
            .dev
            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "TUN read");
                continue;
            }
        };
        let view = node.view();
        for i in 0..n {
            let pkt = &bufs[i][..sizes[i]];
            send_one(&node, &ov, &view, pkt, &mut sender, &mut gro).await;
        }
    }
}

async fn send_one(
    node: &Arc<Node>,
    ov: &Arc<Overlay>,
    view: &View,
    pkt: &[u8],
    sender: &mut Sender,
    gro: &mut GROTable,
) {
    let info = match packet::parse(pkt) {
        Ok(i) => i,
        Err(e) => {
            ov.dropped(DropReason::from(e), None);
            return;
        }
    };
    let via;
    // Set when the destination is another node's WireGuard client.
    let mut to_client = None;
    let peer = match view.routes.get(&info.dst) {
        Some(p) => p,
        None => match view.wg.by_addr.get(&info.dst) {
            // One of this gateway's own clients: this node's packet to it (its answers to
            // the client's DNS queries), judged by the clients' tracker alone.
            Some(c) if c.gateways.contains(&node.cfg.name) && ov.clients.get().is_some() => {
                let id = node.identity.load();
                let services = Arc::new(id.services.clone());
                if let Some(g) = ov.clients.get() {
                    if let Err(reason) = g.deliver(&info, pkt, &id, &services, view) {
                        ov.dropped(reason, None);
                    }
                }
                return;
            }
            // Another node's client: through the gateway its flow came in by, else the
            // first of its gateways.
            Some(c) => match ov
                .tracker
                .reply_via(&info)
                .or_else(|| c.gateways.first().cloned())
            {
                Some(g) => {
                    to_client = Some(c);
                    via = g;
                    &via
                }
                None => {
                    ov.dropped(DropReason::NoRoute, None);
                    return;
                }
            },
            None => {
                ov.dropped(DropReason::NoRoute, None);
                return;
            }
        },
    };
    let record = |i: &packet::PacketInfo| match to_client {
        Some(c) => ov.tracker.outbound_to_client(i, view, c),
        None => ov.tracker.outbound(i),
    };
    if let Err(NotSent::TooBig(mtu)) = sender
        .send(node, ov, view, peer, &info, pkt, &record, true)
        .await
    {
        if let Some(icmp) = packet::too_big(pkt, mtu) {
            let mut b = BytesMut::with_capacity(VIRTIO_NET_HDR_LEN + icmp.len());
            b.resize(VIRTIO_NET_HDR_LEN, 0);
            b.extend_from_slice(&icmp);
            ov.write(gro, &mut [b]).await;
        }
    }
}

/// Dials `peer` in the background (once at a time); packets meanwhile are dropped and
/// retransmitted by their senders.
fn dial(node: &Arc<Node>, ov: &Arc<Overlay>, view: &View, peer: &NodeName) {
    let Some(info) = view.peers.get(peer).cloned() else {
        return;
    };
    if !ov
        .dialling
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(peer.clone())
    {
        return;
    }
    let (node, ov) = (node.clone(), ov.clone());
    tokio::spawn(async move {
        match crate::tunnel::connection(&node, &info).await {
            // Its datagrams are read from the registry's tunnel-up event.
            Ok(_) => {}
            Err(e) => {
                tracing::info!(peer = %info.node, error = %e, "overlay: tunnel to peer failed")
            }
        }
        ov.dialling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&info.node);
    });
}
