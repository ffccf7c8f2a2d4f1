//! The WireGuard gateway shell: stock WireGuard clients (laptops, phones, routers) reach
//! the mesh through this node, each with its own identity and policy.
//!
//! - One UDP port (`[gateway.wireguard] listen`). Each datagram goes through the
//!   sans-IO [`crate::wg::Gateway`]: handshakes are answered (cookies under a flood),
//!   inner packets come out with their source checked to be the client's own. Data
//!   messages are read here; the kernel steers handshakes to a socket and thread of
//!   their own (`handshakes`), so a flood of them never slows the data path.
//! - A client's packet for a mesh node is sent into the overlay as that client: the
//!   destination judges it with the client's service and labels. Its flow is recorded in
//!   this gateway's clients tracker, so the answers pass back.
//! - A packet from the mesh for a client passes only on a flow the client opened, or when
//!   policy lets the sender's service reach the client's (this gateway is the client's
//!   ingress firewall); then it is encrypted to the client's last endpoint.
//! - Every [`crate::wg::TICK`]: WireGuard's timers run, and a change of the clients the
//!   coordinator sent is applied (a client revoked, expired or no longer served here loses
//!   its session at once; its flows go with the next re-check).
//! - DNS: when `[dns]` runs, the mesh's names are answered on this node's overlay IPv4
//!   address, port 53, for clients (the `DNS =` of their configuration).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::ident::{NodeName, ServiceName};
use quicmesh_protocol::packet::{self, PacketInfo, Transport};
use quicmesh_protocol::wg::{WgClient, WgKey};
use quicmesh_protocol::wire::GatewayReport;
use tokio::net::UdpSocket;

use crate::clock::unix_now;
use crate::config::WgGatewayConfig;
use crate::metrics::WgMetrics;
use crate::overlay::firewall::{DropReason, Limits, Tracker, Verdict};
use crate::overlay::{ClientDrops, ClientPath, Overlay, Sender};
use crate::reason::{Label, WgDrop};
use crate::state::{Node, View};
use crate::wg::{self, Inbound, Outbound};

mod handshakes;

/// Errors starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("[gateway.wireguard] key: {0}")]
    Key(String),
    #[error("[gateway.wireguard] listen {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
}

/// The gateway socket's kernel buffers.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// The sessions and the buffer answers are written into (one lock).
struct Core {
    gw: wg::Gateway,
    buf: Vec<u8>,
}

/// A running WireGuard gateway.
pub struct WgGateway {
    me: NodeName,
    core: Mutex<Core>,
    socket: Arc<UdpSocket>,
    port: u16,
    public_key: WgKey,
    /// Flows of the clients: theirs recorded as they leave, the mesh's judged on entry.
    tracker: Tracker,
    metrics: WgMetrics,
    /// Drops by reason (gateway-wide), for `status`.
    drops: [AtomicU64; WgDrop::COUNT],
    /// A client's packets dropped on the mesh side, by client and reason.
    client_drops: ClientDrops,
    /// Whether clients get DNS answers on this node's overlay address.
    dns: bool,
    /// The first checks, run without `core`.
    gate: wg::Gate,
    /// Whether the kernel steers handshakes to a socket and thread of their own (and that
    /// thread runs).
    handshakes_apart: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for WgGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgGateway")
            .field("port", &self.port)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The clients of the view this gateway serves.
fn served(view: &View, me: &NodeName) -> Vec<WgClient> {
    let mut v: Vec<WgClient> = view
        .wg
        .by_name
        .values()
        .filter(|c| c.gateways.contains(me))
        .map(|c| (**c).clone())
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Starts the gateway on a node whose overlay runs: its key (made once, in the data
/// directory), its socket, its loops; then the overlay hands it clients' packets.
pub async fn start(
    node: Arc<Node>,
    ov: Arc<Overlay>,
    cfg: WgGatewayConfig,
) -> Result<Arc<WgGateway>, GatewayError> {
    let key = node
        .data
        .wg_key()
        .map_err(|e| GatewayError::Key(e.to_string()))?;
    let bind_err = |e: std::io::Error| GatewayError::Bind {
        addr: cfg.listen,
        reason: e.to_string(),
    };
    let (std_socket, handshakes) = handshakes::bind(cfg.listen).map_err(bind_err)?;
    // Room for a burst: best effort, the kernel caps it at net.core.rmem_max.
    for sock in std::iter::once(&std_socket).chain(handshakes.as_ref()) {
        let s = socket2::SockRef::from(sock);
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
    std_socket.set_nonblocking(true).map_err(bind_err)?;
    let socket = UdpSocket::from_std(std_socket).map_err(bind_err)?;
    let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    let gw = wg::Gateway::new(key.0);
    let public_key = gw.public_key();
    let gate = gw.gate();
    let overlay_cfg = node.cfg.overlay.clone();
    let limits = overlay_cfg
        .map(|o| Limits {
            max_flows: o.max_flows,
            max_flows_per_peer: o.max_flows_per_peer,
        })
        .unwrap_or_default();
    let dns_v4 = ov.addrs.iter().find(|a| a.is_ipv4()).copied();
    let mut dns = false;
    if let (Some(_), Some(a)) = (node.cfg.dns.as_ref(), dns_v4) {
        match UdpSocket::bind(SocketAddr::new(a, 53)).await {
            Ok(udp) => {
                dns = true;
                tokio::spawn(crate::dns::serve_udp_for_clients(node.clone(), udp));
            }
            Err(e) => {
                tracing::warn!(addr = %a, error = %e, "WireGuard clients get no DNS: cannot bind port 53 on the overlay address")
            }
        }
    }
    let g = Arc::new(WgGateway {
        me: node.cfg.name.clone(),
        core: Mutex::new(Core {
            gw,
            buf: vec![0u8; wg::BUFFER],
        }),
        socket: Arc::new(socket),
        port,
        public_key,
        tracker: Tracker::for_clients(limits),
        metrics: node.metrics.wg(),
        drops: std::array::from_fn(|_| AtomicU64::new(0)),
        client_drops: ClientDrops::default(),
        dns,
        gate,
        handshakes_apart: false.into(),
    });
    g.apply_clients(&node.view());
    let _ = ov.clients.set(g.clone());
    let _ = node.gateway.set(g.clone());
    if let Some(sock) = handshakes {
        handshakes::start(node.clone(), ov.clone(), g.clone(), sock);
    }
    tokio::spawn(receive_loop(node.clone(), ov, g.clone()));
    tokio::spawn(timer_loop(node, g.clone()));
    tracing::info!(listen = %cfg.listen, key = %public_key, dns, "WireGuard gateway up");
    Ok(g)
}

impl WgGateway {
    fn count(&self, r: WgDrop) {
        self.drops[r.index()].fetch_add(1, Ordering::Relaxed);
        self.metrics.dropped(r);
    }

    /// Serves the clients of `view` that name this gateway.
    fn apply_clients(&self, view: &View) {
        let list = served(view, &self.me);
        let n = list.len();
        match lock(&self.core).gw.set_clients(list) {
            Ok(()) => {
                self.metrics.clients.set(n as i64);
                tracing::debug!(clients = n, "WireGuard clients served");
            }
            // Never keep serving a list the coordinator has moved on from: none at all.
            Err(e) => {
                tracing::error!(error = %e, "WireGuard client list refused; serving no client until a good one comes");
                let _ = lock(&self.core).gw.set_clients(Vec::new());
                self.metrics.clients.set(0);
            }
        }
        self.client_drops.retain(view);
    }

    /// What the gate turned away: a cookie sent, a drop counted.
    fn refused(
        &self,
        from: SocketAddr,
        r: wg::Refused,
        out: &[u8],
        send: impl Fn(SocketAddr, &[u8]),
    ) {
        match r {
            wg::Refused::Cookie(n) => {
                self.metrics.cookies.inc();
                send(from, out.get(..n).unwrap_or_default());
            }
            wg::Refused::Drop(r) => self.count(r),
        }
    }

    /// What a datagram came to, other than an inner packet: answered, counted.
    fn answer(
        &self,
        gw: &mut wg::Gateway,
        buf: &mut [u8],
        from: SocketAddr,
        what: Inbound<'_>,
        send: impl Fn(SocketAddr, &[u8]),
    ) {
        match what {
            Inbound::Reply(key, b) => {
                self.metrics.handshakes.inc();
                send(from, b);
                while let Some((to, b)) = gw.flush(&key, buf) {
                    send(to, b);
                }
            }
            Inbound::Cookie(b) => {
                self.metrics.cookies.inc();
                send(from, b);
            }
            Inbound::Nothing => {}
            Inbound::Drop(r) => self.count(r),
            // Only a data message carries one, and those are the data path's.
            Inbound::Packet(..) => self.count(WgDrop::Malformed),
        }
    }

    fn send(&self, to: SocketAddr, b: &[u8]) {
        if let Err(e) = self.socket.try_send_to(b, to) {
            tracing::debug!(%to, error = %e, "WireGuard datagram not sent");
        }
    }
}

impl ClientPath for WgGateway {
    fn deliver(
        &self,
        info: &PacketInfo,
        pkt: &[u8],
        from: &PeerIdentity,
        services: &Arc<BTreeSet<ServiceName>>,
        view: &View,
    ) -> Result<(), DropReason> {
        if let Verdict::Drop { reason, rule } =
            self.tracker
                .inbound(info, from, services, &[info.dst], view)
        {
            if let Some(c) = view.wg.by_addr.get(&info.dst) {
                tracing::debug!(client = %c.name, from = %from.node, reason = reason.as_str(), rule = rule.as_deref().unwrap_or("-"), "packet for a WireGuard client refused");
                self.client_drops.count(&c.name, reason);
            }
            return Err(reason);
        }
        let mut core = lock(&self.core);
        let Core { gw, buf } = &mut *core;
        match gw.outbound(info.dst, pkt, unix_now().max(0) as u64, buf) {
            Outbound::Send(to, b) => {
                self.send(to, b);
                Ok(())
            }
            Outbound::Handshake(to, b) => {
                self.send(to, b);
                Ok(())
            }
            Outbound::Queued => Ok(()),
            Outbound::Drop(r) => {
                self.count(r);
                Err(DropReason::NoClient)
            }
        }
    }
}

impl crate::state::Gateway for WgGateway {
    fn report(&self) -> GatewayReport {
        let mut stats = lock(&self.core).gw.stats();
        // The most recent handshakes first, as many as a report carries.
        stats.sort_by_key(|c| c.since_handshake.unwrap_or(std::time::Duration::MAX));
        stats.truncate(quicmesh_protocol::wire::MAX_GATEWAY_REPORT_CLIENTS);
        GatewayReport {
            public_key: self.public_key,
            port: self.port,
            clients: stats
                .into_iter()
                .map(|c| {
                    (
                        c.name,
                        c.since_handshake.map(|d| d.as_secs()),
                        c.tx_bytes,
                        c.rx_bytes,
                    )
                })
                .collect(),
            dns: self.dns,
        }
    }

    fn status(&self) -> serde_json::Value {
        let stats = lock(&self.core).gw.stats();
        let clients: Vec<serde_json::Value> = stats
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.name,
                    "public_key": c.public_key.to_string(),
                    "endpoint": c.endpoint.map(|e| e.to_string()),
                    "last_handshake_secs": c.since_handshake.map(|d| d.as_secs()),
                    "tx_bytes": c.tx_bytes,
                    "rx_bytes": c.rx_bytes,
                                        "dropped": self.client_drops.of(&c.name),
                })
            })
            .collect();
        let dropped: BTreeMap<&str, u64> = WgDrop::ALL
            .iter()
            .map(|r| (r.as_str(), self.drops[r.index()].load(Ordering::Relaxed)))
            .filter(|(_, v)| *v > 0)
            .collect();
        serde_json::json!({
            "port": self.port,
            "public_key": self.public_key.to_string(),
            "dns": self.dns,
            "handshakes_apart": self.handshakes_apart.load(Ordering::Relaxed),
            "tracked_flows": self.tracker.len(),
            "cookies_sent": self.metrics.cookies.get(),
            "handshakes": self.metrics.handshakes.get(),
            "dropped": dropped,
            "clients": clients,
        })
    }
}

/// Buffers for one batched receive (each holds one datagram, or several of one size
/// coalesced by GRO).
const RX_BUFFERS: usize = 8;
const RX_BUFFER: usize = 64 * 1024;

/// Datagrams from the network, read in batches (recvmmsg, GRO): answered, or their inner
/// packets sent on.
async fn receive_loop(node: Arc<Node>, ov: Arc<Overlay>, g: Arc<WgGateway>) {
    let state = match quinn_udp::UdpSocketState::new((&*g.socket).into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "WireGuard gateway socket: no receive path");
            return;
        }
    };
    // Room for as many coalesced datagrams as GRO may hand over at once, of any size a
    // client's path carries (quinn-udp's own rule).
    let size = (state.gro_segments() * 1500).max(RX_BUFFER);
    let mut bufs = vec![vec![0u8; size]; RX_BUFFERS];
    let mut meta = vec![quinn_udp::RecvMeta::default(); RX_BUFFERS];
    let mut out = vec![0u8; wg::BUFFER];
    let mut sender = Sender::default();
    let mut gro = tun_rs::GROTable::default();
    loop {
        let n = {
            let mut slices: Vec<std::io::IoSliceMut<'_>> = bufs
                .iter_mut()
                .map(|b| std::io::IoSliceMut::new(b))
                .collect();
            let got = g
                .socket
                .async_io(tokio::io::Interest::READABLE, || {
                    state.recv((&*g.socket).into(), &mut slices, &mut meta)
                })
                .await;
            match got {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "WireGuard receive");
                    continue;
                }
            }
        };
        let view = node.view();
        for (buf, m) in bufs.iter().zip(&meta).take(n) {
            let stride = m.stride.max(1);
            let data = buf.get(..m.len).unwrap_or_default();
            for dgram in data.chunks(stride) {
                one_datagram(
                    &node,
                    &ov,
                    &g,
                    &view,
                    m.addr,
                    dgram,
                    &mut out,
                    &mut sender,
                    &mut gro,
                )
                .await;
            }
        }
    }
}

/// One datagram from `from`: the gate (without the sessions' lock), then its session.
#[allow(clippy::too_many_arguments)]
async fn one_datagram(
    node: &Arc<Node>,
    ov: &Arc<Overlay>,
    g: &WgGateway,
    view: &View,
    from: SocketAddr,
    dgram: &[u8],
    out: &mut [u8],
    sender: &mut Sender,
    gro: &mut tun_rs::GROTable,
) {
    let now = unix_now().max(0) as u64;
    match g.gate.check(from, dgram, now, out) {
        Ok(admitted) => {
            admitted_datagram(
                node, ov, g, view, now, from, admitted, dgram, out, sender, gro,
            )
            .await
        }
        Err(r) => g.refused(from, r, out, |to, b| g.send(to, b)),
    }
}

/// A datagram the gate admitted: answered by its session, or its inner packet sent on.
#[allow(clippy::too_many_arguments)]
async fn admitted_datagram(
    node: &Arc<Node>,
    ov: &Arc<Overlay>,
    g: &WgGateway,
    view: &View,
    now: u64,
    from: SocketAddr,
    admitted: wg::Admitted,
    dgram: &[u8],
    out: &mut [u8],
    sender: &mut Sender,
    gro: &mut tun_rs::GROTable,
) {
    let base = out.as_ptr() as usize;
    // Where the inner packet lies in `out`, when there is one.
    let inner = {
        let mut core = lock(&g.core);
        let Core { gw, buf } = &mut *core;
        match gw.take(admitted, from, dgram, now, out) {
            // The packet lies in `out` (boringtun writes it at the start); where exactly
            // is computed without any arithmetic that could overflow.
            Inbound::Packet(_, p) => (p.as_ptr() as usize)
                .checked_sub(base)
                .map(|start| start..start.saturating_add(p.len())),
            other => {
                g.answer(gw, buf, from, other, |to, b| g.send(to, b));
                None
            }
        }
    };
    let Some(pkt) = inner.and_then(|r| out.get(r)) else {
        return;
    };
    let info = match packet::parse(pkt) {
        Ok(i) => i,
        Err(e) => {
            ov.dropped(DropReason::from(e), None);
            return;
        }
    };
    from_client(node, ov, g, view, &info, pkt, sender, gro).await;
}

/// A client's packet (its source already checked to be the client's): to this node, or
/// into the overlay to the node owning the destination.
#[allow(clippy::too_many_arguments)]
async fn from_client(
    node: &Arc<Node>,
    ov: &Arc<Overlay>,
    g: &WgGateway,
    view: &View,
    info: &PacketInfo,
    pkt: &[u8],
    sender: &mut Sender,
    gro: &mut tun_rs::GROTable,
) {
    // The core checked the source is the client's own: the client is in the view (a
    // client gone from it has no session either).
    let Some(client) = view.wg.by_addr.get(&info.src).map(|c| &c.name) else {
        ov.dropped(DropReason::ClientUnknown, None);
        return;
    };
    let dropped = |reason: DropReason| {
        ov.dropped(reason, None);
        g.client_drops.count(client, reason);
    };
    // Its flow recorded (and counted) as the client's: the answers pass back.
    let record = |i: &PacketInfo| g.tracker.client_outbound(i, client);
    if ov.addrs.contains(&info.dst) {
        // For this node: only the DNS the client was configured with. (This node's own
        // services are not offered to its clients: it stands in the view for no one but
        // itself, and a client is judged as a client.)
        let dns = g.dns
            && info.dst.is_ipv4()
            && matches!(
                info.transport,
                Transport::Ports {
                    proto: packet::UDP,
                    dst: 53,
                    ..
                }
            );
        if !dns {
            return dropped(DropReason::NoService);
        }
        // Its answers come back through `deliver`.
        if let Err(reason) = record(info) {
            return dropped(reason);
        }
        let mut b = BytesMut::with_capacity(tun_rs::VIRTIO_NET_HDR_LEN + pkt.len());
        b.resize(tun_rs::VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(pkt);
        ov.write(gro, &mut [b]).await;
        return;
    }
    let Some(peer) = view.routes.get(&info.dst) else {
        // Not a node's address (another client, or outside the mesh): not carried.
        return dropped(DropReason::NoRoute);
    };
    // The client's packets fit the path (its MTU is 1280); one that does not is dropped
    // and counted. Never waits on one peer's full queue (every client shares this loop).
    let _ = sender
        .send(node, ov, view, peer, info, pkt, &record, false)
        .await;
}

/// WireGuard's timers, the clients list, and the clients tracker's re-check.
async fn timer_loop(node: Arc<Node>, g: Arc<WgGateway>) {
    let mut views = node.watch_view();
    let mut tick = tokio::time::interval(wg::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut applied = node.view().wg.clone();
    let mut ticks = 0u32;
    let mut out = vec![0u8; wg::BUFFER];
    let mut served: HashMap<String, ()> = HashMap::new();
    loop {
        let changed = tokio::select! {
            r = views.changed() => {
                if r.is_err() {
                    return;
                }
                true
            }
            _ = tick.tick() => false,
        };
        let view = node.view();
        if !Arc::ptr_eq(&applied, &view.wg) {
            applied = view.wg.clone();
            g.apply_clients(&view);
        }
        if changed {
            g.tracker.recheck(&view);
            continue;
        }
        let now = unix_now().max(0) as u64;
        let stats = {
            let mut core = lock(&g.core);
            core.gw.tick(now, &mut out, |to, b| g.send(to, b));
            core.gw.stats()
        };
        ticks += 1;
        // Every 10 s: idle flows forgotten, and clients that expired meanwhile.
        if ticks.is_multiple_of(40) {
            g.tracker.recheck(&view);
        }
        // Every second: the per-client gauges.
        if ticks.is_multiple_of(4) {
            let mut now_served = HashMap::new();
            for c in &stats {
                g.metrics.client_bytes(&c.name, c.tx_bytes, c.rx_bytes);
                now_served.insert(c.name.clone(), ());
            }
            for gone in served.keys().filter(|k| !now_served.contains_key(*k)) {
                g.metrics.forget_client(gone);
            }
            served = now_served;
        }
    }
}
