//! Paths under the tunnels: which underlay route each peer's packets take.
//!
//! QUIC sees one fixed address per tunnel for its whole life (its *visible* address: the
//! address the handshake went to, or a synthetic `0.x.y.z` address for a tunnel opened
//! through a relay — `0.0.0.0/8` is never a destination on the wire). Under it,
//! [`socket::MeshSocket`] sends each datagram on the tunnel's current [`Route`] — straight
//! to an address, or wrapped for a relay — and maps what arrives back to the visible
//! address. [`manager`] probes routes, upgrades relayed tunnels to direct ones, moves
//! tunnels off dead relays and follows peers whose address changed, by editing these
//! tables; QUIC never notices (its server-side migration is off, so nothing else moves a
//! tunnel).

pub mod decide;
pub mod manager;
pub mod probe;
pub mod punch;
mod relay_out;
pub mod socket;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use quicmesh_protocol::path::{self as pp, PeerId, RELAY_AUTH_HEADER, RELAY_HEADER};
use tokio::sync::mpsc;

use crate::metrics::PathMetrics;

/// Where a tunnel's packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Straight to this address.
    Direct(SocketAddr),
    /// Straight to this address from one of the extra sockets opened to get through a
    /// port-dependent NAT (see `manager`).
    Punched { addr: SocketAddr, socket: u16 },
    /// Wrapped for the relay at `relay`, which forwards to the node `to`.
    Relay { relay: SocketAddr, to: PeerId },
}

impl Route {
    pub fn is_relay(&self) -> bool {
        matches!(self, Route::Relay { .. })
    }

    /// The peer's address on a direct route.
    pub fn direct_addr(&self) -> Option<SocketAddr> {
        match *self {
            Route::Direct(a) | Route::Punched { addr: a, .. } => Some(a),
            Route::Relay { .. } => None,
        }
    }
}

/// Where a path packet (ping or pong) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Direct(SocketAddr),
    Punched { addr: SocketAddr, socket: u16 },
    Relay { relay: SocketAddr, from: PeerId },
}

impl Source {
    /// The peer's address, when it came straight from the peer.
    pub fn direct_addr(&self) -> Option<SocketAddr> {
        self.route().direct_addr()
    }

    /// The route that answers this source.
    pub fn route(&self) -> Route {
        match *self {
            Source::Direct(a) => Route::Direct(a),
            Source::Punched { addr, socket } => Route::Punched { addr, socket },
            Source::Relay { relay, from } => Route::Relay { relay, to: from },
        }
    }
}

/// A probe that arrived, for the manager.
#[derive(Debug)]
pub struct Incoming {
    pub source: Source,
    pub datagram: Vec<u8>,
    /// The local address it arrived at (main socket, when the kernel says).
    pub local: Option<std::net::IpAddr>,
}

/// Most relayed datagrams waiting for QUIC to read them; more are dropped (QUIC
/// retransmits).
const PENDING_MAX: usize = 4096;
/// Datagrams kept per suspect tunnel for replay.
const REPLAY_KEEP: usize = 8;
/// Most synthetic addresses (peers reached through relays).
const SYNTH_MAX: u32 = 1 << 20;
/// Most probes waiting for the manager.
const PROBES_MAX: usize = 1024;
/// Most addresses a tunnel's direct datagrams are taken from besides its route's (each
/// proven by a fresh ping); the oldest goes first.
pub const ACCEPT_MAX: usize = 4;

/// The route tables shared by the socket (every datagram) and the manager (edits).
/// Reads are lock-free snapshots; edits copy the small maps.
#[derive(Debug)]
pub struct Paths {
    /// Visible address -> route, for tunnels not (or no longer) on their visible address.
    send: ArcSwap<HashMap<SocketAddr, Route>>,
    /// Actual source address -> visible address (direct routes that replaced another).
    recv: ArcSwap<HashMap<SocketAddr, SocketAddr>>,
    /// Visible address -> the addresses [`Paths::accept_from`] added for it, oldest first
    /// (at most [`ACCEPT_MAX`]).
    accepted: Mutex<HashMap<SocketAddr, VecDeque<SocketAddr>>>,
    /// Peer id -> the synthetic address of tunnels through relays, and back.
    synth: ArcSwap<HashMap<PeerId, SocketAddr>>,
    synth_rev: ArcSwap<HashMap<SocketAddr, PeerId>>,
    /// Peer id -> the visible address of its tunnel, for relayed datagrams of a tunnel that
    /// came up direct (a route change moved it to a relay, on either side).
    relay_from: ArcSwap<HashMap<PeerId, SocketAddr>>,
    /// Relays whose relayed packets this node takes.
    relays: ArcSwap<HashSet<SocketAddr>>,
    /// Relays answering this node's pings, nearest first: (name, address).
    live_relays: ArcSwap<Vec<(RelayName, SocketAddr)>>,
    /// The peers of the view, by id: relayed datagrams from anyone else are dropped (a
    /// forged relay source cannot grow the synthetic address tables).
    known: ArcSwap<HashSet<PeerId>>,
    /// What the coordinator says of this node's NAT: 0 nothing yet (an older coordinator,
    /// or before the session), 1 none, 2 behind one. Openers are sent unless it said none.
    behind_nat: std::sync::atomic::AtomicU8,
    /// The coordinator's address while its session is up and it relays (last resort),
    /// and the session's token its relay requests carry.
    coordinator_relay: ArcSwap<Option<(SocketAddr, u64)>>,
    /// When this node is a relay: the nodes registered with it, by id and by address.
    registry: ArcSwap<Registry>,
    /// When each registered node last proved its address with a fresh ping.
    reg_seen: Mutex<HashMap<PeerId, std::time::Instant>>,
    pub is_relay: bool,
    edit: Mutex<()>,
    /// Relayed QUIC datagrams for QUIC's next read: (visible source, datagram).
    pending: Mutex<VecDeque<(SocketAddr, Vec<u8>)>>,
    probes: mpsc::Sender<Incoming>,
    /// The real socket (set once the endpoint is built).
    inner: OnceLock<Arc<dyn quinn::AsyncUdpSocket>>,
    /// The same socket (a duplicate descriptor), for openers.
    opener: OnceLock<std::net::UdpSocket>,
    /// Tunnels whose route stopped answering: their last datagrams are kept, to be sent
    /// again on the route that replaces it (see [`Paths::take_replay`]).
    suspect: ArcSwap<HashSet<SocketAddr>>,
    replay: Mutex<HashMap<SocketAddr, VecDeque<Vec<u8>>>>,
    /// Extra sockets that got through a port-dependent NAT, by id.
    extras: ArcSwap<HashMap<u16, Arc<Extra>>>,
    next_extra: std::sync::atomic::AtomicU16,
    pub metrics: PathMetrics,
}

/// An extra socket: QUIC's handle, and a plain one for sends the reactor is not ready
/// for yet (a new registration is not writable until the reactor's next turn).
#[derive(Debug)]
pub struct Extra {
    pub quic: Arc<dyn quinn::AsyncUdpSocket>,
    pub raw: std::net::UdpSocket,
}

impl Extra {
    /// Sends `t`, segment by segment on the plain socket when QUIC's would block.
    pub fn send(&self, t: &quinn::udp::Transmit) -> std::io::Result<()> {
        match self.quic.try_send(t) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
                for chunk in t.contents.chunks(seg) {
                    self.raw.send_to(chunk, t.destination)?;
                }
                Ok(())
            }
            r => r,
        }
    }
}

/// Nodes registered with this relay.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    pub by_id: HashMap<PeerId, SocketAddr>,
    pub by_addr: HashMap<SocketAddr, PeerId>,
    /// The local address each node's registering pings arrive at: what is forwarded to it
    /// leaves from there (a relay with several addresses on one network would otherwise
    /// send from the kernel's choice, which the node does not recognise).
    pub locals: HashMap<PeerId, std::net::IpAddr>,
}

/// A relay registration refreshed within this long holds its address: another node's
/// ping from that address (a forged source) cannot take it. Relay tunnels heartbeat every
/// 500 ms, so a live node refreshes well inside it.
pub const REGISTRATION_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

impl Paths {
    /// New tables; the receiver gets every probe the socket reads.
    pub fn new(is_relay: bool, metrics: PathMetrics) -> (Arc<Self>, mpsc::Receiver<Incoming>) {
        let (tx, rx) = mpsc::channel(PROBES_MAX);
        (
            Arc::new(Self {
                send: ArcSwap::from_pointee(HashMap::new()),
                recv: ArcSwap::from_pointee(HashMap::new()),
                accepted: Mutex::new(HashMap::new()),
                synth: ArcSwap::from_pointee(HashMap::new()),
                synth_rev: ArcSwap::from_pointee(HashMap::new()),
                relay_from: ArcSwap::from_pointee(HashMap::new()),
                relays: ArcSwap::from_pointee(HashSet::new()),
                live_relays: ArcSwap::from_pointee(Vec::new()),
                coordinator_relay: ArcSwap::from_pointee(None),
                behind_nat: std::sync::atomic::AtomicU8::new(0),
                known: ArcSwap::from_pointee(HashSet::new()),
                registry: ArcSwap::from_pointee(Registry::default()),
                reg_seen: Mutex::new(HashMap::new()),
                is_relay,
                edit: Mutex::new(()),
                pending: Mutex::new(VecDeque::new()),
                probes: tx,
                inner: OnceLock::new(),
                opener: OnceLock::new(),
                suspect: ArcSwap::from_pointee(HashSet::new()),
                replay: Mutex::new(HashMap::new()),
                extras: ArcSwap::from_pointee(HashMap::new()),
                next_extra: std::sync::atomic::AtomicU16::new(1),
                metrics,
            }),
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.edit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The synthetic visible address for tunnels to `peer` through relays.
    pub fn synth_for(&self, peer: PeerId) -> SocketAddr {
        if let Some(a) = self.synth.load().get(&peer) {
            return *a;
        }
        let _g = self.lock();
        if let Some(a) = self.synth.load().get(&peer) {
            return *a;
        }
        // Bounded: a relay could name any number of ids (their datagrams then go nowhere).
        let n = self.synth.load().len() as u32 + 1;
        if n > SYNTH_MAX {
            return SocketAddr::new(Ipv4Addr::new(0, 0, 0, 0).into(), 1);
        }
        let [_, b, c, d] = n.to_be_bytes();
        let addr = SocketAddr::new(Ipv4Addr::new(0, b, c, d).into(), 1);
        let mut m = HashMap::clone(&self.synth.load());
        m.insert(peer, addr);
        self.synth.store(Arc::new(m));
        let mut r = HashMap::clone(&self.synth_rev.load());
        r.insert(addr, peer);
        self.synth_rev.store(Arc::new(r));
        addr
    }

    /// Sets, for each peer with a tunnel, the visible address its relayed datagrams are
    /// delivered from.
    pub fn set_relay_from(&self, m: HashMap<PeerId, SocketAddr>) {
        if **self.relay_from.load() != m {
            self.relay_from.store(Arc::new(m));
        }
    }

    /// The visible address relayed datagrams from `peer` are delivered from.
    pub fn relayed_visible(&self, peer: PeerId) -> SocketAddr {
        match self.relay_from.load().get(&peer) {
            Some(v) => *v,
            None => self.synth_for(peer),
        }
    }

    /// The peer a synthetic address stands for.
    pub fn synth_peer(&self, addr: &SocketAddr) -> Option<PeerId> {
        self.synth_rev.load().get(addr).copied()
    }

    /// True for a synthetic (relay-tunnel) visible address.
    pub fn is_synth(addr: &SocketAddr) -> bool {
        matches!(addr, SocketAddr::V4(v) if v.ip().octets()[0] == 0)
    }

    /// The route datagrams to `visible` take now.
    pub fn route(&self, visible: SocketAddr) -> Route {
        self.send
            .load()
            .get(&visible)
            .copied()
            .unwrap_or(Route::Direct(visible))
    }

    /// Sends datagrams to `visible` on `route` from now on; direct datagrams from the
    /// route's address are taken as coming from `visible`.
    pub fn set_route(&self, visible: SocketAddr, route: Route) {
        let _g = self.lock();
        let mut send = HashMap::clone(&self.send.load());
        let mut recv = HashMap::clone(&self.recv.load());
        if let Some(old) = send.get(&visible).and_then(Route::direct_addr) {
            if recv.get(&old) == Some(&visible) {
                recv.remove(&old);
            }
        }
        if route == Route::Direct(visible) {
            send.remove(&visible);
        } else {
            send.insert(visible, route);
        }
        if let Some(a) = route.direct_addr() {
            if a != visible {
                recv.insert(a, visible);
            }
        }
        self.send.store(Arc::new(send));
        self.recv.store(Arc::new(recv));
    }

    /// Takes direct datagrams from `actual` as coming from `visible` (the peer proved, with
    /// an authenticated ping, that it sends from there) without changing where ours go.
    /// At most [`ACCEPT_MAX`] such addresses per tunnel: the oldest is dropped (unless our
    /// datagrams go there).
    pub fn accept_from(&self, actual: SocketAddr, visible: SocketAddr) {
        if actual == visible || self.recv.load().get(&actual) == Some(&visible) {
            return;
        }
        let _g = self.lock();
        let mut recv = HashMap::clone(&self.recv.load());
        recv.insert(actual, visible);
        let routed = self.route(visible).direct_addr();
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        let q = accepted.entry(visible).or_default();
        q.retain(|a| *a != actual && recv.get(a) == Some(&visible));
        q.push_back(actual);
        while q.len() > ACCEPT_MAX {
            let Some(old) = q.pop_front() else {
                break;
            };
            if Some(old) != routed {
                recv.remove(&old);
            }
        }
        self.recv.store(Arc::new(recv));
    }

    /// Forgets every route of a tunnel that closed.
    pub fn forget(&self, visible: SocketAddr) {
        let _g = self.lock();
        let mut send = HashMap::clone(&self.send.load());
        send.remove(&visible);
        let mut recv = HashMap::clone(&self.recv.load());
        recv.retain(|_, v| *v != visible);
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&visible);
        self.send.store(Arc::new(send));
        self.recv.store(Arc::new(recv));
    }

    /// The relays relayed datagrams are taken from.
    pub fn set_relays(&self, relays: HashSet<SocketAddr>) {
        if **self.relays.load() != relays {
            self.relays.store(Arc::new(relays));
        }
    }

    /// Records the relays answering pings, nearest first.
    pub fn set_behind_nat(&self, nat: bool) {
        self.behind_nat.store(
            if nat { 2 } else { 1 },
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// This node may be behind a NAT: the coordinator did not say it is not.
    pub fn behind_nat(&self) -> bool {
        self.behind_nat.load(std::sync::atomic::Ordering::Relaxed) != 1
    }

    /// The peers of the current view (relayed datagrams are taken from them only).
    pub fn set_known_peers(&self, ids: HashSet<PeerId>) {
        self.known.store(Arc::new(ids));
    }

    /// `peer` is in the current view.
    pub fn is_known(&self, peer: PeerId) -> bool {
        self.known.load().contains(&peer)
    }

    /// The coordinator relays for this node at `addr` (its session's address) for
    /// datagrams carrying `token`, or no longer (`None`: its session ended, or it does
    /// not relay).
    pub fn set_coordinator_relay(&self, relay: Option<(SocketAddr, u64)>) {
        self.coordinator_relay.store(Arc::new(relay));
    }

    pub fn coordinator_relay(&self) -> Option<SocketAddr> {
        self.coordinator_relay.load().map(|(a, _)| a)
    }

    /// The header of a datagram for `to` through `relay`, and its length: the
    /// coordinator's relay takes its session's token (`RelaySendAuth`), a relay node a
    /// plain `RelaySend`.
    pub fn relay_header(&self, relay: SocketAddr, to: PeerId) -> ([u8; RELAY_AUTH_HEADER], usize) {
        let mut h = [0u8; RELAY_AUTH_HEADER];
        match **self.coordinator_relay.load() {
            Some((c, token)) if c == relay => {
                h = pp::relay_send_auth_header(to, token);
                (h, RELAY_AUTH_HEADER)
            }
            _ => {
                h[..RELAY_HEADER].copy_from_slice(&pp::relay_send_header(to));
                (h, RELAY_HEADER)
            }
        }
    }

    pub fn set_live_relays(&self, relays: Vec<(RelayName, SocketAddr)>) {
        if **self.live_relays.load() != relays {
            self.live_relays.store(Arc::new(relays));
        }
    }

    /// The relays answering pings, nearest first.
    pub fn live_relays(&self) -> Arc<Vec<(RelayName, SocketAddr)>> {
        self.live_relays.load_full()
    }

    /// (Relay role) `peer` sent a fresh authenticated ping from `addr` at `now`: forward
    /// to it there, and take its relay requests from there. Refused (false, counted as
    /// `address_taken`) when another node registered from `addr` within
    /// [`REGISTRATION_HOLD`]: a node's own valid ping sent with a forged source address
    /// must not take over another node's registration.
    pub fn register(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        local: Option<std::net::IpAddr>,
        now: std::time::Instant,
    ) -> bool {
        let _g = self.lock();
        let mut seen = self.reg_seen.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.registry.load();
        let holder = cur.by_addr.get(&addr).copied();
        if holder == Some(peer)
            && cur.by_id.get(&peer) == Some(&addr)
            && cur.locals.get(&peer).copied() == local
        {
            seen.insert(peer, now);
            return true;
        }
        if let Some(other) = holder.filter(|o| *o != peer) {
            let live = seen
                .get(&other)
                .is_some_and(|t| now.saturating_duration_since(*t) < REGISTRATION_HOLD);
            if live {
                self.metrics
                    .relay_dropped(crate::reason::RelayDrop::AddressTaken);
                return false;
            }
        }
        let mut r = Registry::clone(&cur);
        if let Some(other) = holder.filter(|o| *o != peer) {
            // A stale holder loses the address (and its registration with it).
            r.by_id.remove(&other);
            r.locals.remove(&other);
            seen.remove(&other);
        }
        if let Some(old) = r.by_id.insert(peer, addr) {
            if r.by_addr.get(&old) == Some(&peer) {
                r.by_addr.remove(&old);
            }
        }
        r.by_addr.insert(addr, peer);
        match local {
            Some(ip) => r.locals.insert(peer, ip),
            None => r.locals.remove(&peer),
        };
        seen.insert(peer, now);
        self.registry.store(Arc::new(r));
        true
    }

    /// (Relay role) drops registrations not in `keep`.
    pub fn retain_registered(&self, keep: impl Fn(&PeerId) -> bool) {
        let _g = self.lock();
        let mut r = Registry::clone(&self.registry.load());
        r.by_id.retain(|id, _| keep(id));
        let ids: HashSet<PeerId> = r.by_id.keys().copied().collect();
        r.by_addr.retain(|_, id| ids.contains(id));
        r.locals.retain(|id, _| ids.contains(id));
        self.reg_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| ids.contains(id));
        self.registry.store(Arc::new(r));
    }

    /// How many nodes are registered with this relay.
    pub fn registered(&self) -> usize {
        self.registry.load().by_id.len()
    }

    /// Starts (or stops) keeping the datagrams QUIC sends to `visible`: while its route
    /// is silent, they are its retransmission probes.
    pub fn set_suspect(&self, visible: SocketAddr, suspect: bool) {
        if self.suspect.load().contains(&visible) == suspect {
            return;
        }
        let _g = self.lock();
        let mut m = HashSet::clone(&self.suspect.load());
        if suspect {
            m.insert(visible);
        } else {
            m.remove(&visible);
            self.replay
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&visible);
        }
        self.suspect.store(Arc::new(m));
    }

    /// Keeps a copy of datagrams sent to a suspect tunnel (the last [`REPLAY_KEEP`]).
    fn keep_for_replay(&self, visible: SocketAddr, t: &quinn::udp::Transmit) {
        if self.suspect.load().is_empty() || !self.suspect.load().contains(&visible) {
            return;
        }
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        let mut m = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        let q = m.entry(visible).or_default();
        for chunk in t.contents.chunks(seg) {
            if q.len() >= REPLAY_KEEP {
                q.pop_front();
            }
            q.push_back(chunk.to_vec());
        }
    }

    /// The datagrams kept for `visible` (and it is no longer suspect). Sent again on the
    /// new route, they reach the peer's QUIC, whose acknowledgement makes ours declare
    /// what was lost on the dead route lost now, not after its backed-off timer.
    pub fn take_replay(&self, visible: SocketAddr) -> Vec<Vec<u8>> {
        let out = self
            .replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&visible)
            .map(Vec::from)
            .unwrap_or_default();
        self.set_suspect(visible, false);
        out
    }

    /// Adds an extra socket (QUIC reads it too); returns its id.
    pub fn add_extra(&self, sock: std::net::UdpSocket) -> std::io::Result<u16> {
        use quinn::Runtime;
        sock.set_nonblocking(true)?;
        let raw = sock.try_clone()?;
        let s = Arc::new(Extra {
            quic: quinn::TokioRuntime.wrap_udp_socket(sock)?,
            raw,
        });
        let id = self
            .next_extra
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _g = self.lock();
        let mut m = HashMap::clone(&self.extras.load());
        m.insert(id, s);
        self.extras.store(Arc::new(m));
        Ok(id)
    }

    /// Closes extra sockets no route uses any more.
    pub fn retain_extras(&self, keep: impl Fn(u16) -> bool) {
        if self.extras.load().keys().all(|k| keep(*k)) {
            return;
        }
        let _g = self.lock();
        let mut m = HashMap::clone(&self.extras.load());
        m.retain(|k, _| keep(*k));
        self.extras.store(Arc::new(m));
    }

    /// The extra sockets, by id.
    pub fn extras(&self) -> Arc<HashMap<u16, Arc<Extra>>> {
        self.extras.load_full()
    }

    /// Gives the tunnel socket (a duplicate of its descriptor) for openers.
    pub fn set_opener_socket(&self, sock: std::net::UdpSocket) {
        let _ = self.opener.set(sock);
    }

    /// Sends an opener ([`pp::OPENER`]) to each of `targets` from the tunnel socket with
    /// a TTL (hop limit) of [`OPENER_TTL`]: it opens this node's NAT toward each target
    /// and expires before a NAT further along. Returns how many left.
    pub fn send_openers(&self, targets: &[SocketAddr]) -> usize {
        self.opener.get().map_or(0, |s| {
            targets
                .iter()
                .filter(|t| send_opener(s, **t).is_ok())
                .count()
        })
    }

    /// Sends one path packet (a probe) on `route`.
    pub fn send_probe(&self, route: Route, datagram: &[u8]) -> std::io::Result<()> {
        self.send_probe_from(route, datagram, None)
    }

    /// [`Paths::send_probe`] from local address `src` (a pong leaves from where its ping
    /// arrived), or the kernel's choice.
    pub fn send_probe_from(
        &self,
        route: Route,
        datagram: &[u8],
        src: Option<std::net::IpAddr>,
    ) -> std::io::Result<()> {
        let Some(inner) = self.inner.get() else {
            return Ok(());
        };
        let (destination, contents) = match route {
            Route::Direct(a) => (a, std::borrow::Cow::Borrowed(datagram)),
            Route::Punched { addr, socket } => {
                return match self.extras.load().get(&socket) {
                    Some(s) => s.raw.send_to(datagram, addr).map(|_| ()),
                    None => Ok(()),
                };
            }
            Route::Relay { relay, to } => {
                let (h, n) = self.relay_header(relay, to);
                let mut v = Vec::with_capacity(n + datagram.len());
                v.extend_from_slice(&h[..n]);
                v.extend_from_slice(datagram);
                (relay, std::borrow::Cow::Owned(v))
            }
        };
        inner.try_send(&quinn::udp::Transmit {
            destination,
            ecn: None,
            contents: &contents,
            segment_size: None,
            src_ip: src,
        })
    }
}

/// Who relays: a relay node of the mesh, or the coordinator (the relay of last resort).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayName {
    Node(quicmesh_protocol::ident::NodeName),
    Coordinator,
}

impl RelayName {
    /// The relay is node `n` (a tunnel is never relayed through its own peer).
    pub fn is(&self, n: &quicmesh_protocol::ident::NodeName) -> bool {
        matches!(self, Self::Node(m) if m == n)
    }
}

impl std::fmt::Display for RelayName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(n) => n.fmt(f),
            Self::Coordinator => f.write_str("coordinator"),
        }
    }
}

/// TTL of openers: one hop to this node's NAT, where it is forwarded (and its mapping
/// made) with one left; the next router drops it. A NAT further than one router away
/// never sees it.
pub const OPENER_TTL: u8 = 2;

/// Sends [`pp::OPENER`] to `to` from `sock` with [`OPENER_TTL`], the socket's own TTL
/// untouched (the TTL rides with this one datagram, as a control message).
fn send_opener(sock: &std::net::UdpSocket, to: SocketAddr) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let ttl = i32::from(OPENER_TTL);
    let local_v6 = sock.local_addr()?.is_ipv6();
    let (to, cmsg) = match (to, local_v6) {
        (SocketAddr::V4(a), false) => (SocketAddr::V4(a), ControlMessage::Ipv4Ttl(&ttl)),
        // An IPv4 datagram from a dual-stack socket takes IPv4's TTL control message
        // (the kernel ignores IPv6's hop limit for it).
        (SocketAddr::V4(a), true) => (
            SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
            ControlMessage::Ipv4Ttl(&ttl),
        ),
        (SocketAddr::V6(a), true) => (SocketAddr::V6(a), ControlMessage::Ipv6HopLimit(&ttl)),
        (SocketAddr::V6(_), false) => {
            return Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
        }
    };
    let iov = [std::io::IoSlice::new(&pp::OPENER)];
    let addr = SockaddrStorage::from(to);
    sendmsg(
        sock.as_raw_fd(),
        &iov,
        &[cmsg],
        MsgFlags::MSG_DONTWAIT,
        Some(&addr),
    )
    .map(|_| ())
    .map_err(std::io::Error::from)
}

/// A tunnel's path state, shown by `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathStatus {
    /// `direct` or `relay`.
    pub kind: &'static str,
    /// Where datagrams go: the peer's address, or the relay's.
    pub address: SocketAddr,
    /// The relay's node name, when relayed.
    pub relay: Option<String>,
    /// Round trip of the last answered ping on the current route.
    pub rtt_ms: Option<f64>,
    /// Route changes since the tunnel came up.
    pub switches: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Arc<Paths> {
        Paths::new(false, crate::metrics::Metrics::new().paths()).0
    }

    #[test]
    fn a_direct_route_maps_both_ways_and_moving_it_drops_the_old_reverse_entry() {
        let p = paths();
        let v: SocketAddr = "198.18.0.2:4433".parse().unwrap();
        let a: SocketAddr = "198.18.0.3:4433".parse().unwrap();
        let b: SocketAddr = "198.18.0.4:4433".parse().unwrap();
        assert_eq!(p.route(v), Route::Direct(v));
        p.set_route(v, Route::Direct(a));
        assert_eq!(p.route(v), Route::Direct(a));
        assert_eq!(p.recv.load().get(&a), Some(&v));
        p.set_route(v, Route::Direct(b));
        assert_eq!(p.recv.load().get(&a), None);
        assert_eq!(p.recv.load().get(&b), Some(&v));
        p.set_route(v, Route::Direct(v));
        assert!(p.send.load().is_empty() && p.recv.load().is_empty());
    }

    #[test]
    fn a_tunnel_takes_datagrams_from_at_most_accept_max_proven_addresses() {
        let p = paths();
        let v: SocketAddr = "198.18.0.2:4433".parse().unwrap();
        let route: SocketAddr = "198.18.0.9:4433".parse().unwrap();
        p.set_route(v, Route::Direct(route));
        p.accept_from(route, v);
        let addr = |i: u16| SocketAddr::from(([198, 18, 1, 1], 1000 + i));
        for i in 0..100 {
            p.accept_from(addr(i), v);
        }
        let recv = p.recv.load();
        let mine: Vec<_> = recv.iter().filter(|(_, x)| **x == v).collect();
        // The route's own address stays; of the rest, the newest ACCEPT_MAX.
        assert_eq!(mine.len(), ACCEPT_MAX + 1, "{mine:?}");
        assert_eq!(recv.get(&route), Some(&v));
        for i in 100 - ACCEPT_MAX as u16..100 {
            assert_eq!(recv.get(&addr(i)), Some(&v), "{i}");
        }
        assert_eq!(recv.get(&addr(0)), None);
        // Its twin: another tunnel's addresses are not counted against this one.
        let w: SocketAddr = "198.18.0.3:4433".parse().unwrap();
        p.accept_from(addr(500), w);
        assert_eq!(p.recv.load().get(&addr(500)), Some(&w));
        assert_eq!(p.recv.load().get(&addr(99)), Some(&v));
        p.forget(v);
        assert!(p.recv.load().values().all(|x| *x != v));
        assert!(!p.accepted.lock().unwrap().contains_key(&v));
    }

    #[test]
    fn synthetic_addresses_are_stable_per_peer_and_never_routable() {
        let p = paths();
        let a = p.synth_for(PeerId(1));
        let b = p.synth_for(PeerId(2));
        assert_ne!(a, b);
        assert_eq!(p.synth_for(PeerId(1)), a);
        assert!(Paths::is_synth(&a) && Paths::is_synth(&b));
        assert!(!Paths::is_synth(&"198.18.0.1:1".parse().unwrap()));
        assert_eq!(p.synth_rev.load().get(&a), Some(&PeerId(1)));
    }

    #[test]
    fn a_re_registration_moves_the_node() {
        let p = paths();
        let a: SocketAddr = "198.18.0.3:1".parse().unwrap();
        let b: SocketAddr = "198.18.0.3:2".parse().unwrap();
        let t = std::time::Instant::now();
        assert!(p.register(PeerId(7), a, None, t));
        assert!(p.register(PeerId(7), b, None, t));
        let r = p.registry.load();
        assert_eq!(r.by_id.get(&PeerId(7)), Some(&b));
        assert_eq!(r.by_addr.get(&a), None);
        assert_eq!(r.by_addr.get(&b), Some(&PeerId(7)));
    }

    /// Review finding: a node's own fresh ping sent with a forged source (another node's
    /// registered address) took that node's registration, and the victim's heartbeats
    /// never won it back.
    #[test]
    fn a_forged_source_cannot_take_a_live_registration() {
        let p = paths();
        let v: SocketAddr = "198.18.0.3:1".parse().unwrap();
        let x: SocketAddr = "198.18.0.4:1".parse().unwrap();
        let t = std::time::Instant::now();
        assert!(p.register(PeerId(1), v, None, t), "the victim registers");
        assert!(p.register(PeerId(2), x, None, t), "the attacker registers");
        // The attacker's ping, forged to come from the victim's address.
        assert!(!p.register(
            PeerId(2),
            v,
            None,
            t + std::time::Duration::from_millis(600)
        ));
        let r = p.registry.load();
        assert_eq!(r.by_addr.get(&v), Some(&PeerId(1)));
        assert_eq!(r.by_id.get(&PeerId(2)), Some(&x));
        // The victim's heartbeat keeps it; once it has been silent past the hold, the
        // address is free (the victim moved away or died).
        assert!(p.register(PeerId(1), v, None, t + std::time::Duration::from_secs(1)));
        let later = t + std::time::Duration::from_secs(1) + REGISTRATION_HOLD;
        assert!(p.register(PeerId(2), v, None, later));
        let r = p.registry.load();
        assert_eq!(r.by_addr.get(&v), Some(&PeerId(2)));
        assert_eq!(
            r.by_id.get(&PeerId(1)),
            None,
            "the stale holder lost its registration"
        );
        assert_eq!(r.by_addr.get(&x), None);
    }
}
