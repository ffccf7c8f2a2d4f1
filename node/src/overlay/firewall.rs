//! The overlay's ingress firewall and connection tracker.
//!
//! Every packet a peer sends is checked in this order: (1) its inner source address must
//! be one of the sending peer's certificate addresses, else it is spoofed; (2) it must be
//! for one of this node's addresses; (3) a fragment other than the first passes only as
//! part of a datagram whose first fragment passed ([`fragments`]); an ICMP error passes
//! only when the packet it quotes is one this node sent to that peer in a tracked flow;
//! other non-echo ICMP never passes; (4) a packet of a tracked flow passes; (5) a packet
//! opening a new flow passes only if policy lets one of the sender's services reach the
//! local service that owns the destination port and protocol, and the table has room.
//! Packets whose transport cannot be found (see [`quicmesh_protocol::packet`]) never get
//! here: they are dropped as `unclassifiable`. Everything else is dropped, by reason.
//! Packets this node sends are tracked too, so the replies they draw pass. Policy and
//! revocation changes re-check tracked flows ([`Tracker::recheck`]).
//!
//! The table is bounded: at most [`Limits::max_flows`] flows, of which at most
//! [`Limits::max_flows_per_peer`] opened by any one peer. A flow that has seen no packet
//! in its reverse direction (a TCP SYN, one-way UDP) is forgotten after
//! [`UNREPLIED_IDLE`]; when the table is full a new flow evicts the oldest such
//! unreplied flow of its shard, never a replied one, and is dropped (`table_full`) when
//! there is none. A peer at its own limit has its new flows dropped (`peer_flow_limit`).
//!
//! The tracker is sharded; each shard is a short critical section per packet.

mod fragments;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::ident::{NodeName, ServiceName};
use quicmesh_protocol::packet::{self, Echo, PacketError, PacketInfo, PortSpec, Quoted, Transport};
use quicmesh_protocol::wg::WgClient;

use crate::authz::{self, FlowDenied};
use crate::reason::{ClientStanding, Standing};
use crate::view::View;
use fragments::Fragments;

pub use crate::reason::DropReason;

impl From<PacketError> for DropReason {
    fn from(e: PacketError) -> Self {
        if e.unclassifiable() {
            DropReason::Unclassifiable
        } else {
            DropReason::Malformed
        }
    }
}

/// A flow as this node sees it: local end first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

impl FlowKey {
    /// The key of a packet arriving from a peer (`src` is remote).
    pub fn inbound(p: &PacketInfo) -> Self {
        let (proto, sp, dp) = ports(&p.transport);
        FlowKey {
            proto,
            local: (p.dst, dp),
            remote: (p.src, sp),
        }
    }

    /// The key of a packet this node sends (`src` is local).
    pub fn outbound(p: &PacketInfo) -> Self {
        let (proto, sp, dp) = ports(&p.transport);
        FlowKey {
            proto,
            local: (p.src, sp),
            remote: (p.dst, dp),
        }
    }

    /// The key of the packet an ICMP error quotes, a packet this node sent.
    pub fn quoted(q: &Quoted) -> Self {
        let proto = if q.proto == packet::ICMPV6 {
            packet::ICMP
        } else {
            q.proto
        };
        FlowKey {
            proto,
            local: (q.src, q.src_port),
            remote: (q.dst, q.dst_port),
        }
    }
}

fn ports(t: &Transport) -> (u8, u16, u16) {
    match *t {
        Transport::Ports {
            proto, src, dst, ..
        } => (proto, src, dst),
        // An echo and its reply share the identifier; both ends key on it.
        Transport::Icmp { echo: Some(e), .. } => (packet::ICMP, e.id, e.id),
        // Never tracked (see `Tracker::outbound`); keyed apart from any echo.
        Transport::Icmp { kind, .. } | Transport::IcmpError { kind, .. } => {
            (packet::ICMP, u16::from(kind), 0)
        }
        Transport::Fragment { proto } | Transport::Other { proto } => (proto, 0, 0),
    }
}

/// What allowed a peer's flows: interned per peer, shared by the flows it allowed, so a
/// re-check judges each grant once however many flows hold it.
#[derive(Debug)]
struct Grant {
    /// The certificate identity the peer had when the grant was made (standing is
    /// re-checked against it: revocation by serial, expiry).
    peer: Arc<PeerIdentity>,
    services: Arc<BTreeSet<ServiceName>>,
    service: ServiceName,
    rule: String,
    /// The peer's flows in the table (one counter per peer, shared by its grants).
    flows: Arc<AtomicUsize>,
    /// The WireGuard client the grant is about: on a node's tracker, the client that
    /// opened the flow through gateway `peer`; on a gateway's clients tracker, the client
    /// `peer`'s flow goes to.
    client: Option<Arc<WgClient>>,
}

/// Who opened flows to this node, each with a limit of its own: a node, or a WireGuard
/// client (whichever gateway carried it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Opener {
    Node(NodeName),
    Client(NodeName),
}

#[derive(Debug)]
struct Entry {
    /// `None`: this node sent the first packet.
    grant: Option<Arc<Grant>>,
    /// Seconds on the tracker's clock when a packet last passed.
    last: u64,
    /// The flow completed: for a flow this node opened, a packet came back; for a
    /// peer's UDP flow, this node answered; for a peer's TCP flow, this node answered
    /// (not with a reset) and the peer then sent a segment without SYN (the handshake's
    /// last ACK). Until then the flow is short-lived and evictable.
    replied: bool,
    /// (A peer's TCP flow) this node answered without a reset.
    answered: bool,
    /// (A WireGuard client's own flow, at its gateway) the client's flow count.
    counter: Option<Arc<AtomicUsize>>,
}

/// A local service's overlay ports.
#[derive(Debug, Clone)]
pub struct LocalService {
    pub name: ServiceName,
    pub ports: Vec<PortSpec>,
}

/// At a gateway, how long a flow of the mesh's toward a client that a re-check closed is
/// kept from re-opening as the client's own (and for as long as the client keeps sending
/// into it).
pub const CLOSED_MEMORY: Duration = Duration::from_secs(120);

/// Idle time after which an unreplied flow (TCP SYN only, one-way UDP) is forgotten.
pub const UNREPLIED_IDLE: Duration = Duration::from_secs(30);

/// Idle time after which a tracked flow is forgotten.
pub fn idle_limit(proto: u8, replied: bool) -> Duration {
    if !replied {
        return UNREPLIED_IDLE;
    }
    match proto {
        packet::TCP => Duration::from_secs(3600),
        packet::UDP => Duration::from_secs(120),
        _ => Duration::from_secs(30),
    }
}

/// The flow table's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tracked flows in all.
    pub max_flows: usize,
    /// Most flows any one peer may have opened to this node.
    pub max_flows_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_flows: crate::config::DEFAULT_OVERLAY_MAX_FLOWS,
            max_flows_per_peer: crate::config::DEFAULT_OVERLAY_MAX_FLOWS_PER_PEER,
        }
    }
}

const SHARDS: usize = 16;

/// A fast, non-keyed hasher for flow keys (FxHash's multiply-rotate): flows are chosen by
/// hosts the node already authenticated, and the table is per node and bounded, so hash
/// flooding buys an attacker little; SipHash cost ~2x on this hot path.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxBuild = std::hash::BuildHasherDefault<FxHasher>;

/// One shard of the flow table.
#[derive(Debug, Default)]
struct Shard {
    flows: HashMap<FlowKey, Entry, FxBuild>,
    /// Flows inserted unreplied, oldest first: eviction candidates. Checked lazily (a
    /// key may since be replied or gone); compacted when it outgrows the table.
    unreplied: VecDeque<FlowKey>,
}

/// A peer's flows and grants.
#[derive(Debug, Default)]
struct PeerFlows {
    flows: Arc<AtomicUsize>,
    grants: Vec<Arc<Grant>>,
}

/// The connection tracker and the ingress decision.
pub struct Tracker {
    shards: Vec<Mutex<Shard>>,
    services: Vec<LocalService>,
    limits: Limits,
    /// A gateway's tracker of its WireGuard clients' flows: "local" are the clients.
    for_clients: bool,
    /// This node's services (its certificate's): the sources of the flows it opens to
    /// WireGuard clients, judged by policy like any.
    own_services: BTreeSet<ServiceName>,
    /// Flows in all shards (reserved before an insert, so the cap is exact).
    total: AtomicUsize,
    peers: Mutex<HashMap<Opener, PeerFlows>>,
    fragments: Mutex<Fragments>,
    start: std::time::Instant,
    /// Unix seconds at `start` (certificate expiry is in Unix time).
    start_unix: i64,
    /// Seconds added to the clock ([`Tracker::advance`]).
    skew: AtomicU64,
    evictions: AtomicU64,
    /// The version of the view the last recheck enforced.
    enforced: AtomicU64,
    /// (At a gateway) flows of the mesh's toward clients that a re-check closed, until
    /// when they may not re-open as the client's own; at most `max_flows` of them.
    closed: Mutex<HashMap<FlowKey, u64, FxBuild>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("flows", &self.len())
            .field("limits", &self.limits)
            .finish()
    }
}

/// What the firewall decided about an inbound packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Part of a tracked flow.
    Established,
    /// Opens a new flow, allowed by this rule.
    New { service: ServiceName, rule: String },
    Drop {
        reason: DropReason,
        rule: Option<String>,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tracker {
    /// A tracker with the default [`Limits`].
    pub fn new(services: Vec<LocalService>) -> Self {
        Self::with_limits(services, Limits::default())
    }

    pub fn with_limits(services: Vec<LocalService>, limits: Limits) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            services,
            limits,
            for_clients: false,
            own_services: BTreeSet::new(),
            total: AtomicUsize::new(0),
            peers: Mutex::new(HashMap::new()),
            fragments: Mutex::new(Fragments::default()),
            start: std::time::Instant::now(),
            start_unix: crate::clock::unix_now(),
            skew: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            enforced: AtomicU64::new(0),
            closed: Mutex::new(HashMap::default()),
        }
    }

    /// A gateway's tracker for the flows of its WireGuard clients: a client's own packets
    /// are recorded as outbound (their replies pass), a node's packets to a client are
    /// inbound, and a node's new flow to a client passes only when policy lets the node's
    /// service reach the client's.
    pub fn for_clients(limits: Limits) -> Self {
        Self {
            for_clients: true,
            ..Self::with_limits(Vec::new(), limits)
        }
    }

    /// This node's services (its certificate's), the sources of the flows it opens to
    /// WireGuard clients.
    pub fn with_own_services(self, own_services: BTreeSet<ServiceName>) -> Self {
        Self {
            own_services,
            ..self
        }
    }

    /// Records a packet this node sends to WireGuard client `client` (through one of its
    /// gateways): a new flow of this node's own is judged first
    /// ([`authz::own_flow_to_client`]), so that one policy does not allow is never kept
    /// here (the client could otherwise open it from its side and pass as an answer).
    pub fn outbound_to_client(
        &self,
        p: &PacketInfo,
        view: &View,
        client: &WgClient,
    ) -> Result<(), DropReason> {
        let judge =
            || match authz::own_flow_to_client(view, &self.own_services, client, self.unix_now()) {
                Ok(_) => Ok(()),
                Err(FlowDenied::Client(c)) => Err(client_drop(c)),
                Err(FlowDenied::Standing(s)) => Err(standing_drop(s)),
                Err(FlowDenied::Policy(_)) => Err(DropReason::PolicyDenied),
            };
        self.outbound_judged(p, None, &judge)
    }

    /// The gateway a packet this node sends to a WireGuard client's address goes through:
    /// the one the client's flow came in by, when the client opened it.
    pub fn reply_via(&self, p: &PacketInfo) -> Option<NodeName> {
        let k = FlowKey::outbound(p);
        let s = lock(self.shard(&k));
        let g = s.flows.get(&k)?.grant.as_ref()?;
        g.client.as_ref().map(|_| g.peer.node.clone())
    }

    /// Unix seconds now, on the tracker's clock.
    fn unix_now(&self) -> i64 {
        self.start_unix + self.now() as i64
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_secs() + self.skew.load(Ordering::Relaxed)
    }

    /// Moves the tracker's clock forward by `by` (whole seconds), as if that much time
    /// had passed: for tests and fuzzing of the timeouts.
    pub fn advance(&self, by: Duration) {
        self.skew.fetch_add(by.as_secs(), Ordering::Relaxed);
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn shard(&self, k: &FlowKey) -> &Mutex<Shard> {
        use std::hash::{Hash, Hasher};
        let mut d = FxHasher::default();
        k.hash(&mut d);
        // The high bits: the table inside the shard uses the low ones.
        &self.shards[(d.finish() >> 58) as usize % SHARDS]
    }

    /// Number of tracked flows.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).flows.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unreplied flows evicted to make room for new ones, since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Flows `node` has open to this node.
    pub fn peer_flows(&self, node: &NodeName) -> usize {
        lock(&self.peers)
            .get(&Opener::Node(node.clone()))
            .map_or(0, |p| p.flows.load(Ordering::Relaxed))
    }

    /// Flows WireGuard client `client` has open to this node (through any gateway).
    pub fn client_flows(&self, client: &NodeName) -> usize {
        lock(&self.peers)
            .get(&Opener::Client(client.clone()))
            .map_or(0, |p| p.flows.load(Ordering::Relaxed))
    }

    /// Fragmented datagrams whose later fragments may pass.
    pub fn datagrams(&self) -> usize {
        lock(&self.fragments).len()
    }

    /// Whether the flow of a packet this node would send is tracked.
    pub fn tracks(&self, p: &PacketInfo) -> bool {
        let k = FlowKey::outbound(p);
        lock(self.shard(&k)).flows.contains_key(&k)
    }

    /// Records a packet this node sends (so its replies pass). A new flow that finds the
    /// table full of flows it may not evict is refused (`table_full`): its replies could
    /// not pass. Non-first fragments, ICMP errors and other non-echo ICMP are not
    /// tracked: replies to them never pass.
    pub fn outbound(&self, p: &PacketInfo) -> Result<(), DropReason> {
        self.outbound_judged(p, None, &|| Ok(()))
    }

    /// At a gateway (a [`Tracker::for_clients`] tracker): records a packet WireGuard
    /// client `client` sends into the mesh, so the answers pass. A new flow counts against
    /// the client's limit ([`Limits::max_flows_per_peer`]); it opens only with a TCP SYN,
    /// or for other protocols when it is not a flow of the mesh's that a re-check closed
    /// in the last [`CLOSED_MEMORY`] (so a client cannot keep alive a flow toward it that
    /// policy no longer allows: its next segment would otherwise re-open it as its own).
    pub fn client_outbound(&self, p: &PacketInfo, client: &NodeName) -> Result<(), DropReason> {
        self.outbound_judged(p, Some(client), &|| Ok(()))
    }

    /// Records an outbound packet; `judge` decides about a new flow (after the rules
    /// every new flow follows), `client` is the WireGuard client sending it (at a gateway).
    fn outbound_judged(
        &self,
        p: &PacketInfo,
        client: Option<&NodeName>,
        judge: &dyn Fn() -> Result<(), DropReason>,
    ) -> Result<(), DropReason> {
        if let Transport::Fragment { .. }
        | Transport::IcmpError { .. }
        | Transport::Icmp { echo: None, .. } = p.transport
        {
            return Ok(());
        }
        let k = FlowKey::outbound(p);
        let now = self.now();
        {
            let mut s = lock(self.shard(&k));
            if let Some(e) = s.flows.get_mut(&k) {
                e.last = now;
                // A reset (the kernel refusing a SYN to a closed port) is no sign the
                // flow completed: it stays unreplied, short-lived and evictable.
                let reset = matches!(p.transport, Transport::Ports { rst: true, .. });
                let tcp = matches!(
                    p.transport,
                    Transport::Ports {
                        proto: packet::TCP,
                        ..
                    }
                );
                if e.grant.is_some() && !reset {
                    e.answered = true;
                    if !tcp {
                        e.replied = true;
                    }
                }
                return Ok(());
            }
        }
        // A packet with no entry opens a flow of this node's own, unless it can only be an
        // answer on a peer's flow that is gone (closed by a policy change or a revocation,
        // or timed out): an echo reply, or anything but a TCP SYN from a port a local
        // service owns (peers' flows always go to a service's port). Re-opening those as
        // this node's own would let the peer's packets pass again: a delayed ACK sent
        // just after the policy went kept a denied flow alive. Decided by rule, not by a
        // memory of closed flows, so no table can fill and no time can run out.
        match p.transport {
            Transport::Icmp {
                echo: Some(Echo { request: false, .. }),
                ..
            } => return Err(DropReason::NotTracked),
            Transport::Ports { syn: false, .. } if self.sent_from_service_port(p) => {
                return Err(DropReason::FlowClosed)
            }
            _ => {}
        }
        judge()?;
        let counter = match client {
            None => None,
            Some(c) => Some(self.client_flow(p, &k, c, now)?),
        };
        self.insert(
            k,
            Entry {
                grant: None,
                last: now,
                replied: false,
                answered: false,
                counter,
            },
            None,
        )
    }

    /// The rules for a client's new flow at its gateway ([`Tracker::client_outbound`]);
    /// the client's flow count, taken.
    fn client_flow(
        &self,
        p: &PacketInfo,
        k: &FlowKey,
        client: &NodeName,
        now: u64,
    ) -> Result<Arc<AtomicUsize>, DropReason> {
        if let Transport::Ports {
            proto: packet::TCP,
            syn: false,
            ..
        } = p.transport
        {
            return Err(DropReason::FlowClosed);
        }
        {
            let mut closed = lock(&self.closed);
            if let Some(until) = closed.get_mut(k) {
                if *until > now {
                    // Still sending into it: remembered for as long as it does.
                    *until = now + CLOSED_MEMORY.as_secs();
                    return Err(DropReason::FlowClosed);
                }
                closed.remove(k);
            }
        }
        let mut peers = lock(&self.peers);
        let pf = peers.entry(Opener::Client(client.clone())).or_default();
        if pf.flows.load(Ordering::Relaxed) >= self.limits.max_flows_per_peer {
            return Err(DropReason::PeerFlowLimit);
        }
        pf.flows.fetch_add(1, Ordering::Relaxed);
        Ok(pf.flows.clone())
    }

    /// Whether `p`, a TCP or UDP packet this node sends, comes from a port a local service
    /// owns: what a service sends from its port answers a peer's flow. (A node whose own
    /// clients send from such a port, as NTP does from 123 to 123, opens UDP flows from it
    /// only while a peer's flow to it is tracked; TCP always opens with a SYN.)
    fn sent_from_service_port(&self, p: &PacketInfo) -> bool {
        if self.for_clients {
            // A client's packets: it has no services here; every flow it sends opens.
            return false;
        }
        let Transport::Ports {
            proto, src, dst, ..
        } = p.transport
        else {
            return false;
        };
        // As the peer's packet to that port would look.
        let answered = Transport::Ports {
            proto,
            src: dst,
            dst: src,
            syn: true,
            rst: false,
        };
        self.services
            .iter()
            .any(|s| s.ports.iter().any(|ps| ps.matches(&answered)))
    }

    /// Decides about a packet from `peer`, tracking the flow it opens when allowed.
    /// `local` are this node's overlay addresses.
    pub fn inbound(
        &self,
        p: &PacketInfo,
        peer: &PeerIdentity,
        peer_services: &Arc<BTreeSet<ServiceName>>,
        local: &[IpAddr],
        view: &View,
    ) -> Verdict {
        let drop = |reason| Verdict::Drop { reason, rule: None };
        if view.version == 0 {
            return drop(DropReason::NotReady);
        }
        // A source that is not the peer's own is a WireGuard client's only when the peer
        // is one of that client's gateways.
        let client = if peer.owns_address(p.src) {
            None
        } else {
            match view.wg.via(p.src, &peer.node) {
                Some(c) => Some(c.clone()),
                None => return drop(DropReason::Spoofed),
            }
        };
        let sender_owns = |a: IpAddr| match &client {
            None => peer.owns_address(a),
            Some(c) => c.owns(a),
        };
        if !local.contains(&p.dst) {
            return drop(DropReason::NotForUs);
        }
        let now = self.now();
        match p.transport {
            Transport::Fragment { .. } => {
                let admitted = p
                    .fragment
                    .is_some_and(|f| lock(&self.fragments).admit(p.src, p.dst, f, now));
                return if admitted {
                    Verdict::Established
                } else {
                    drop(DropReason::FragmentUntracked)
                };
            }
            Transport::IcmpError { quoted, .. } => {
                // The quoted packet must be one this node sent (from the address the
                // error is for) to this peer, in a tracked flow. Errors do not keep a
                // flow alive.
                let matched = quoted.is_some_and(|q| {
                    let k = FlowKey::quoted(&q);
                    q.src == p.dst
                        && sender_owns(q.dst)
                        && lock(self.shard(&k)).flows.contains_key(&k)
                });
                return if matched {
                    Verdict::Established
                } else {
                    drop(DropReason::IcmpUnmatched)
                };
            }
            // Redirects, router adverts and the like: both tunnel ends are hosts.
            Transport::Icmp { echo: None, .. } => return drop(DropReason::NotTracked),
            _ => {}
        }
        let k = FlowKey::inbound(p);
        let verdict = self.inbound_flow(p, k, now, peer, peer_services, client, view);
        if matches!(verdict, Verdict::Drop { .. }) {
            return verdict;
        }
        // A first fragment lets the rest of its datagram follow.
        if let Some(f) = p.fragment {
            if let Err(reason) = lock(&self.fragments).remember(p.src, p.dst, f, now) {
                return drop(reason);
            }
        }
        verdict
    }

    #[allow(clippy::too_many_arguments)]
    fn inbound_flow(
        &self,
        p: &PacketInfo,
        k: FlowKey,
        now: u64,
        peer: &PeerIdentity,
        peer_services: &Arc<BTreeSet<ServiceName>>,
        client: Option<Arc<WgClient>>,
        view: &View,
    ) -> Verdict {
        let drop = |reason| Verdict::Drop { reason, rule: None };
        {
            let mut s = lock(self.shard(&k));
            if let Some(e) = s.flows.get_mut(&k) {
                e.last = now;
                let syn = matches!(p.transport, Transport::Ports { syn: true, .. });
                if e.grant.is_none() || (e.answered && !syn) {
                    e.replied = true;
                }
                return Verdict::Established;
            }
        }
        if let Transport::Ports {
            proto: packet::TCP,
            syn: false,
            ..
        } = p.transport
        {
            return drop(DropReason::NotTracked);
        }
        let unix_now = self.unix_now();
        // The local service the flow is for, the client the grant is about, the decision.
        let (service, client, decided) = if self.for_clients {
            // A node's new flow to one of this gateway's clients (a client's flow to
            // another client is not carried).
            let Some(to) = view.wg.by_addr.get(&p.dst).filter(|_| client.is_none()) else {
                return drop(DropReason::NoClient);
            };
            let decided = authz::packet_flow_to_client(view, peer, peer_services, to, unix_now);
            (to.service.clone(), Some(to.clone()), decided)
        } else {
            let Some(svc) = self
                .services
                .iter()
                .find(|s| s.ports.iter().any(|ps| ps.matches(&p.transport)))
            else {
                return drop(DropReason::NoService);
            };
            let decided = match &client {
                Some(c) => authz::client_packet_flow(view, peer, c, &svc.name, unix_now),
                None => authz::packet_flow(view, peer, peer_services, &svc.name, unix_now),
            };
            (svc.name.clone(), client, decided)
        };
        let rule = match decided {
            Ok(rule) => rule,
            Err(FlowDenied::Standing(s)) => return drop(standing_drop(s)),
            Err(FlowDenied::Client(c)) => return drop(client_drop(c)),
            Err(FlowDenied::Policy(rule)) => {
                return Verdict::Drop {
                    reason: DropReason::PolicyDenied,
                    rule: Some(rule),
                }
            }
        };
        let grant = match self.grant(peer, peer_services, &service, &rule, client) {
            Ok(g) => g,
            Err(reason) => return drop(reason),
        };
        let entry = Entry {
            grant: Some(grant),
            last: now,
            replied: false,
            answered: false,
            counter: None,
        };
        match self.insert(k, entry, Some(view.version)) {
            Ok(()) => Verdict::New { service, rule },
            Err(reason) => drop(reason),
        }
    }

    /// The grant for a new flow of `peer` to `service` by `rule`, counting the flow
    /// against the peer's limit.
    fn grant(
        &self,
        peer: &PeerIdentity,
        services: &Arc<BTreeSet<ServiceName>>,
        service: &ServiceName,
        rule: &str,
        client: Option<Arc<WgClient>>,
    ) -> Result<Arc<Grant>, DropReason> {
        // On a node's tracker a client's flows count against the client, whichever
        // gateway carries them; on a gateway's, against the node sending to clients.
        let opener = match &client {
            Some(c) if !self.for_clients => Opener::Client(c.name.clone()),
            _ => Opener::Node(peer.node.clone()),
        };
        let mut peers = lock(&self.peers);
        if !peers.contains_key(&opener) {
            peers.insert(opener.clone(), PeerFlows::default());
        }
        let Some(pf) = peers.get_mut(&opener) else {
            return Err(DropReason::TableFull);
        };
        if pf.flows.load(Ordering::Relaxed) >= self.limits.max_flows_per_peer {
            return Err(DropReason::PeerFlowLimit);
        }
        pf.flows.fetch_add(1, Ordering::Relaxed);
        let found = pf.grants.iter().find(|g| {
            g.service == *service
                && g.rule == rule
                && g.peer.serial == peer.serial
                && match (&g.client, &client) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
                && (Arc::ptr_eq(&g.services, services) || g.services == *services)
        });
        Ok(match found {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(Grant {
                    peer: Arc::new(peer.clone()),
                    services: services.clone(),
                    service: service.clone(),
                    rule: rule.to_string(),
                    flows: pf.flows.clone(),
                    client,
                });
                pf.grants.push(g.clone());
                g
            }
        })
    }

    /// Forgets a flow's share of the counters.
    fn release(&self, e: &Entry) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        Self::unclaim(e);
    }

    /// Gives back the flow count an entry took (its peer's, or its client's).
    fn unclaim(e: &Entry) {
        if let Some(g) = &e.grant {
            g.flows.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(c) = &e.counter {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Inserts a new flow, evicting the shard's oldest unreplied flow when the table is
    /// full; refused when there is none.
    /// A peer's flow comes with the version of the view that allowed it: one judged under
    /// a view older than the last [`Tracker::recheck`] enforced is refused (`view_changed`),
    /// as the recheck may have passed its shard already (its next packet is judged under
    /// the new view). Checked under the shard lock, after the recheck raised the version.
    fn insert(&self, k: FlowKey, e: Entry, view: Option<u64>) -> Result<(), DropReason> {
        let mut guard = lock(self.shard(&k));
        let s = &mut *guard;
        if view.is_some_and(|v| v < self.enforced.load(Ordering::SeqCst)) {
            Self::unclaim(&e);
            return Err(DropReason::ViewChanged);
        }
        if s.flows.contains_key(&k) {
            // Opened meanwhile by another path: that entry stands.
            Self::unclaim(&e);
            return Ok(());
        }
        // Peers' flows may fill seven eighths of the table: the rest is kept for flows
        // this node opens, so peers cannot starve its own traffic.
        let from_peer = e.grant.is_some();
        let cap = if from_peer {
            self.limits.max_flows - self.limits.max_flows / 8
        } else {
            self.limits.max_flows
        };
        if self.total.fetch_add(1, Ordering::Relaxed) >= cap {
            // Evict the shard's oldest unreplied flow; a peer's new flow evicts only
            // another peer's, never one this node opened.
            let victim = s.unreplied.iter().position(|old| {
                s.flows
                    .get(old)
                    .is_some_and(|o| !o.replied && (!from_peer || o.grant.is_some()))
            });
            let evicted = match victim.and_then(|i| s.unreplied.remove(i)) {
                Some(old) => match s.flows.remove(&old) {
                    Some(gone) => {
                        self.release(&gone);
                        self.evictions.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    None => false,
                },
                None => false,
            };
            if !evicted {
                self.total.fetch_sub(1, Ordering::Relaxed);
                Self::unclaim(&e);
                return Err(DropReason::TableFull);
            }
        }
        s.flows.insert(k, e);
        s.unreplied.push_back(k);
        if s.unreplied.len() > 2 * s.flows.len() + 64 {
            let Shard { flows, unreplied } = s;
            unreplied.retain(|k| flows.get(k).is_some_and(|e| !e.replied));
        }
        Ok(())
    }

    /// Re-checks tracked flows against a new view: flows from peers no longer in the
    /// mesh, or no longer allowed by policy, are forgotten (their next packet is judged
    /// afresh, and a TCP segment without SYN is then dropped). Also forgets idle flows
    /// and fragments. Each grant is judged once, so the cost at the cap is a pass over
    /// the table with a small lookup per flow. Returns how many flows were removed.
    pub fn recheck(&self, view: &View) -> usize {
        // First: a flow judged under an older view and not inserted yet is refused.
        self.enforced.fetch_max(view.version, Ordering::SeqCst);
        let now = self.now();
        let unix_now = self.unix_now();
        let judge = |g: &Grant| {
            let decided = match &g.client {
                None => authz::packet_flow(view, &g.peer, &g.services, &g.service, unix_now),
                Some(c) if self.for_clients => {
                    authz::packet_flow_to_client(view, &g.peer, &g.services, c, unix_now)
                }
                Some(c) => authz::client_packet_flow(view, &g.peer, c, &g.service, unix_now),
            };
            authz::flow_close_reason(decided).is_none()
        };
        let mut verdicts: HashMap<usize, bool, FxBuild> = HashMap::default();
        {
            let mut peers = lock(&self.peers);
            for pf in peers.values_mut() {
                // Grants no flow holds any more.
                pf.grants.retain(|g| Arc::strong_count(g) > 1);
            }
            peers.retain(|_, pf| !pf.grants.is_empty() || pf.flows.load(Ordering::Relaxed) > 0);
            for g in peers.values().flat_map(|pf| &pf.grants) {
                verdicts.insert(Arc::as_ptr(g) as usize, judge(g));
            }
        }
        let mut removed = 0;
        // (At a gateway) the mesh's flows toward clients closed by this re-check.
        let mut closed_now = Vec::new();
        for s in &self.shards {
            let mut guard = lock(s);
            let Shard { flows, unreplied } = &mut *guard;
            let before = flows.len();
            flows.retain(|k, e| {
                let fresh = now.saturating_sub(e.last) <= idle_limit(k.proto, e.replied).as_secs();
                let keep = fresh
                    && match &e.grant {
                        // A client's own flows at its gateway end with the client.
                        None if self.for_clients => client_stands(view, k.local.0, unix_now),
                        // This node's own flows to a client: while policy allows them.
                        None => view.wg.by_addr.get(&k.remote.0).is_none_or(|c| {
                            authz::own_flow_to_client(view, &self.own_services, c, unix_now).is_ok()
                        }),
                        Some(g) => *verdicts
                            .entry(Arc::as_ptr(g) as usize)
                            .or_insert_with(|| judge(g)),
                    };
                if !keep {
                    self.release(e);
                    if self.for_clients && fresh && e.grant.is_some() {
                        closed_now.push(*k);
                    }
                }
                keep
            });
            removed += before - flows.len();
            unreplied.retain(|k| flows.get(k).is_some_and(|e| !e.replied));
        }
        lock(&self.fragments).expire(now);
        if self.for_clients {
            let mut closed = lock(&self.closed);
            closed.retain(|_, until| *until > now);
            for k in closed_now {
                if closed.len() >= self.limits.max_flows {
                    break;
                }
                closed.insert(k, now + CLOSED_MEMORY.as_secs());
            }
        }
        removed
    }
}

/// Whether the WireGuard client owning `addr` is known and unexpired.
fn client_stands(view: &View, addr: IpAddr, now: i64) -> bool {
    view.wg
        .by_addr
        .get(&addr)
        .is_some_and(|c| c.live_at(now.max(0) as u64))
}

/// The drop reason of a packet from or to a WireGuard client that does not stand.
fn client_drop(c: ClientStanding) -> DropReason {
    match c {
        ClientStanding::Unknown => DropReason::ClientUnknown,
        ClientStanding::Expired => DropReason::ClientExpired,
        ClientStanding::NotItsGateway => DropReason::Spoofed,
    }
}

/// The drop reason of a new flow from a peer that does not stand.
fn standing_drop(s: Standing) -> DropReason {
    match s {
        Standing::NotReady => DropReason::NotReady,
        Standing::PeerUnknown => DropReason::PeerUnknown,
        Standing::PeerRevoked => DropReason::PeerRevoked,
        Standing::PeerExpired => DropReason::PeerExpired,
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod wg_tests;
