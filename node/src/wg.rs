//! A WireGuard gateway's clients, without IO: which client a datagram belongs to, its
//! Noise session (boringtun's [`Tunn`]), and what comes out of each datagram: an answer
//! for the network, an inner packet for the mesh, or a counted drop.
//!
//! Handshake initiations are matched to a client by the static key inside them (the
//! gateway's private key opens it); every later message by the receiver index this
//! gateway gave the client's session (its top 24 bits). One count of handshakes a second
//! decides the load: under it, sources must prove their address with a cookie (boringtun's
//! [`RateLimiter`]) before any Diffie-Hellman is spent on them, and each proven source is
//! held to its own limit. A key or index that is not a client's is dropped and never
//! answered.
//!
//! The first checks ([`Gate`]: MAC1, the load and cookies, the per-source limit, the static
//! key inside an initiation, whether a client has that key or index) need no session, so a
//! gateway runs them on their own thread for the handshakes it reads apart: a flood of
//! them never takes the sessions' lock the data path takes for every packet.
//!
//! A leaf module: it depends on `protocol` and `reason` only. The socket, the timer tick
//! and the mesh side live in the gateway shell.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use quicmesh_protocol::wg::{WgClient, WgKey};

use crate::reason::WgDrop;

/// Clients one gateway serves at most: session indexes are 24 bits, and every client
/// holds a session's worth of memory.
pub const MAX_CLIENTS: usize = 65_536;

/// Handshakes per second (a valid MAC1), over all sources, before sources must answer a
/// cookie.
pub const HANDSHAKES_PER_SECOND: u64 = 400;

/// Handshake messages one source address may send per second, cookie or not (as Linux
/// WireGuard's per-address limit): a host that answers cookies from its real address
/// still cannot make the gateway spend a Diffie-Hellman on every datagram it sends.
pub const HANDSHAKES_PER_SOURCE: u32 = 20;

/// Cookie replies a second, over all clients, taken to a session. A client sends one only
/// to an initiation of this gateway's (when it has packets for a client with no session)
/// while the client is under load itself; they carry no MAC, so past this they are
/// dropped (as `under_load`) before any session is looked at.
pub const COOKIE_REPLIES_PER_SECOND: u32 = 64;

/// Source addresses tracked for [`HANDSHAKES_PER_SOURCE`] (an IPv6 source by its /64, as
/// Linux WireGuard: one host holds a whole /64); beyond, the count starts over (sources
/// that cannot receive are held off by cookies instead).
const MAX_SOURCES: usize = 16_384;

/// How far behind the counts' second a reading may be and still count as that second
/// (one thread's clock reading taken just before another's, see `SourceCounts::roll`).
const STALE_SECONDS: u64 = 2;

/// How often [`Gateway::tick`] must run (WireGuard's timers are in whole 250 ms steps).
pub const TICK: Duration = Duration::from_millis(250);

/// A buffer for [`Gateway`]'s answers: large enough for any datagram and its overhead.
pub const BUFFER: usize = 65_536 + 148;

const INDEX_SPACE: u32 = 1 << 24;

/// What a datagram from the network comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Send these bytes back to where the datagram came from (a handshake's answer), then
    /// [`Gateway::flush`] the client's queued packets.
    Reply(WgKey, &'a [u8]),
    /// A cookie: the source must prove its address before its handshake is taken.
    Cookie(&'a [u8]),
    /// An inner packet from a client, its source checked to be the client's own.
    Packet(WgKey, &'a [u8]),
    /// Taken, nothing to send (a keepalive, a cookie or handshake answer we asked for).
    Nothing,
    Drop(WgDrop),
}

/// This second's handshakes: the one count that decides the load, and each proven
/// source's own. It starts over by itself once a second has passed.
#[derive(Debug)]
struct SourceCounts {
    counts: HashMap<IpAddr, u32>,
    /// Handshakes with a valid MAC1 this second. At or past [`HANDSHAKES_PER_SECOND`] the
    /// gateway is under load: sources must prove their address (MAC2) with a cookie.
    checks: u64,
    /// Cookie replies (to this gateway's own initiations) this second: they carry no MAC,
    /// so they get a budget of their own.
    cookie_replies: u32,
    /// The unix second these counts are for.
    second: u64,
}

/// What a packet for a client comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outbound<'a> {
    /// Send these bytes to the client's endpoint.
    Send(SocketAddr, &'a [u8]),
    /// Queued until the handshake these bytes start completes.
    Handshake(SocketAddr, &'a [u8]),
    /// Queued behind a handshake already under way.
    Queued,
    Drop(WgDrop),
}

/// One client's session and what the gateway knows of it.
struct Slot {
    client: WgClient,
    index: u32,
    tunn: Tunn,
    /// Where its last authenticated datagram came from (it roams).
    endpoint: Option<SocketAddr>,
}

/// A client's state for `status` and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientStats {
    pub name: String,
    pub public_key: WgKey,
    pub endpoint: Option<SocketAddr>,
    /// Time since the last completed handshake.
    pub since_handshake: Option<Duration>,
    /// Inner bytes sent to the client and received from it.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// Why the client list could not be taken whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientsError {
    #[error("{0} clients is more than a gateway serves ({MAX_CLIENTS})")]
    TooMany(usize),
    #[error("clients {0} and {1} claim the same address {2}")]
    SharedAddress(String, String, IpAddr),
    #[error("two clients share the public key {0}")]
    SharedKey(WgKey),
}

/// The checks every datagram passes before any session is looked at: a handshake's MAC1,
/// the load (a cookie under it), the per-source limit, and which session it is for (the
/// static key inside an initiation, the receiver index of anything else), refused early
/// when no client has it. Cheap to clone: the clones share the counts and the snapshot.
#[derive(Clone)]
pub struct Gate {
    secret: StaticSecret,
    public: PublicKey,
    /// Checks MAC1 and never asks for a cookie (its limit, u64::MAX, is reached only after
    /// 2^64 checks, so it is never reset): below the load, and in every session.
    mac1: Arc<RateLimiter>,
    /// Checks MAC1 and MAC2 and answers a cookie to any source that has not proven its
    /// address (a limit of 0): under the load.
    cookies: Arc<RateLimiter>,
    sources: Arc<Mutex<SourceCounts>>,
    /// The clients' keys and session indexes, replaced whole by [`Gateway::set_clients`].
    known: Arc<arc_swap::ArcSwap<Known>>,
}

/// What the sessions hold, as the [`Gate`] sees it (the session checks again).
#[derive(Debug, Default)]
struct Known {
    keys: std::collections::HashSet<WgKey>,
    indexes: std::collections::HashSet<u32>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("public", &WgKey(*self.public.as_bytes()))
            .finish_non_exhaustive()
    }
}

/// Which session a datagram that passed the [`Gate`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    to: Lookup,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// An initiation, by the static key inside it.
    Key(WgKey),
    /// Anything else, by the receiver index this gateway gave out (its top 24 bits).
    Index(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An initiation or a response.
    Handshake,
    CookieReply,
    /// A transport data message, the only kind that carries inner packets.
    Data,
}

impl Admitted {
    /// A transport data message (the only kind that carries inner packets).
    pub fn is_data(&self) -> bool {
        self.kind == Kind::Data
    }
}

/// What the [`Gate`] turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A cookie of this many bytes, written at the start of the buffer: the source must
    /// prove its address before its handshake is taken.
    Cookie(usize),
    Drop(WgDrop),
}

/// A gateway's WireGuard side.
pub struct Gateway {
    gate: Gate,
    clients: HashMap<WgKey, Slot>,
    by_index: HashMap<u32, WgKey>,
    by_address: HashMap<IpAddr, WgKey>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("public", &self.public_key())
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl Gateway {
    /// A gateway with the private key `secret` and no clients.
    pub fn new(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret);
        Self {
            gate: Gate {
                mac1: Arc::new(RateLimiter::new(&public, u64::MAX)),
                cookies: Arc::new(RateLimiter::new(&public, 0)),
                secret,
                public,
                sources: Arc::new(Mutex::new(SourceCounts {
                    counts: HashMap::new(),
                    checks: 0,
                    cookie_replies: 0,
                    second: 0,
                })),
                known: Arc::default(),
            },
            clients: HashMap::new(),
            by_index: HashMap::new(),
            by_address: HashMap::new(),
        }
    }

    /// The gateway's public key, as clients list it.
    pub fn public_key(&self) -> WgKey {
        WgKey(*self.gate.public.as_bytes())
    }

    /// The gateway's [`Gate`], to check datagrams without holding the gateway (its clones
    /// share the counts and the clients' snapshot with it).
    pub fn gate(&self) -> Gate {
        self.gate.clone()
    }

    /// How many clients it serves.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Serves exactly `clients` from now on. A client that is gone (revoked, expired, no
    /// longer served here) loses its session at once; one whose key is unchanged keeps
    /// its session and endpoint, with its name, service, labels and addresses updated.
    /// Nothing changes when the list is refused.
    pub fn set_clients(&mut self, clients: Vec<WgClient>) -> Result<(), ClientsError> {
        if clients.len() > MAX_CLIENTS {
            return Err(ClientsError::TooMany(clients.len()));
        }
        let mut keys: HashMap<WgKey, usize> = HashMap::new();
        let mut addresses: HashMap<IpAddr, usize> = HashMap::new();
        for (i, c) in clients.iter().enumerate() {
            if keys.insert(c.public_key, i).is_some() {
                return Err(ClientsError::SharedKey(c.public_key));
            }
            for a in &c.addresses {
                if let Some(j) = addresses.insert(*a, i) {
                    return Err(ClientsError::SharedAddress(
                        clients[j].name.to_string(),
                        c.name.to_string(),
                        *a,
                    ));
                }
            }
        }
        self.clients.retain(|k, _| keys.contains_key(k));
        self.by_index.retain(|_, k| keys.contains_key(k));
        self.by_address.clear();
        for client in clients {
            for a in &client.addresses {
                self.by_address.insert(*a, client.public_key);
            }
            match self.clients.get_mut(&client.public_key) {
                Some(slot) => slot.client = client,
                None => {
                    let index = self.free_index();
                    let tunn = Tunn::new(
                        self.gate.secret.clone(),
                        PublicKey::from(client.public_key.0),
                        None,
                        None,
                        index,
                        Some(self.gate.mac1.clone()),
                    );
                    self.by_index.insert(index, client.public_key);
                    self.clients.insert(
                        client.public_key,
                        Slot {
                            client,
                            index,
                            tunn,
                            endpoint: None,
                        },
                    );
                }
            }
        }
        self.gate.known.store(Arc::new(Known {
            keys: self.clients.keys().copied().collect(),
            indexes: self.by_index.keys().copied().collect(),
        }));
        Ok(())
    }

    /// A session index no client holds (never 0), chosen at random: a sender cannot aim
    /// at live sessions by counting. There are 2^24 and at most [`MAX_CLIENTS`] in use,
    /// so a free one is found at the first or second try, and the search ends.
    fn free_index(&mut self) -> u32 {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        loop {
            let i = rng.gen_range(1..INDEX_SPACE);
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// Takes one datagram that came from `from`; `now` is unix seconds, for expiry: the
    /// [`Gate`], then [`Gateway::take`].
    pub fn inbound<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: u64,
        out: &'a mut [u8],
    ) -> Inbound<'a> {
        match self.gate.check(from, datagram, now, out) {
            Ok(admitted) => self.take(admitted, from, datagram, now, out),
            Err(Refused::Cookie(n)) => Inbound::Cookie(&out[..n]),
            Err(Refused::Drop(r)) => Inbound::Drop(r),
        }
    }

    /// Takes a datagram the [`Gate`] admitted: its session decrypts it (a handshake is
    /// answered, a data message gives its inner packet, checked to be from the client's
    /// own address).
    pub fn take<'a>(
        &mut self,
        admitted: Admitted,
        from: SocketAddr,
        datagram: &[u8],
        now: u64,
        out: &'a mut [u8],
    ) -> Inbound<'a> {
        if out.len() < datagram.len().max(148) {
            return Inbound::Drop(WgDrop::Malformed);
        }
        let key = match admitted.to {
            Lookup::Key(key) => {
                if !self.clients.contains_key(&key) {
                    return Inbound::Drop(WgDrop::UnknownKey);
                }
                key
            }
            Lookup::Index(i) => match self.by_index.get(&i) {
                Some(k) => *k,
                None => return Inbound::Drop(WgDrop::UnknownIndex),
            },
        };
        let Some(slot) = self.clients.get_mut(&key) else {
            return Inbound::Drop(WgDrop::UnknownIndex);
        };
        if !slot.client.live_at(now) {
            return Inbound::Drop(WgDrop::Expired);
        }
        match slot.tunn.decapsulate(Some(from.ip()), datagram, out) {
            // A session's own check never asks for a cookie (it checks MAC1 only); were
            // one to come out, it would prove nothing and must not move the endpoint.
            TunnResult::WriteToNetwork(b) if b.starts_with(&[3, 0, 0, 0]) => Inbound::Cookie(b),
            // A handshake answer (or what it released): the datagram was authenticated.
            TunnResult::WriteToNetwork(b) => {
                slot.endpoint = Some(from);
                Inbound::Reply(key, b)
            }
            TunnResult::WriteToTunnelV4(p, src) => accept(slot, from, key, p, src.into()),
            TunnResult::WriteToTunnelV6(p, src) => accept(slot, from, key, p, src.into()),
            TunnResult::Done => Inbound::Nothing,
            TunnResult::Err(WireGuardError::UnderLoad) => Inbound::Drop(WgDrop::UnderLoad),
            TunnResult::Err(_) => Inbound::Drop(WgDrop::Crypto),
        }
    }

    /// After [`Inbound::Reply`]: the client's next queued packet, ready for its endpoint,
    /// until `None`.
    pub fn flush<'a>(&mut self, key: &WgKey, out: &'a mut [u8]) -> Option<(SocketAddr, &'a [u8])> {
        let slot = self.clients.get_mut(key)?;
        let to = slot.endpoint?;
        if out.len() < BUFFER {
            return None;
        }
        match slot.tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(b) => Some((to, b)),
            _ => None,
        }
    }

    /// Takes one packet from the mesh for the client that owns `dst`.
    pub fn outbound<'a>(
        &mut self,
        dst: IpAddr,
        packet: &[u8],
        now: u64,
        out: &'a mut [u8],
    ) -> Outbound<'a> {
        let Some(key) = self.by_address.get(&dst) else {
            return Outbound::Drop(WgDrop::NotAClient);
        };
        let Some(slot) = self.clients.get_mut(key) else {
            return Outbound::Drop(WgDrop::NotAClient);
        };
        if !slot.client.live_at(now) {
            return Outbound::Drop(WgDrop::Expired);
        }
        let Some(to) = slot.endpoint else {
            return Outbound::Drop(WgDrop::NoEndpoint);
        };
        if out.len() < packet.len() + 32 || out.len() < 148 {
            return Outbound::Drop(WgDrop::Malformed);
        }
        match slot.tunn.encapsulate(packet, out) {
            // Without a session the packet is queued and a handshake initiation (message
            // type 1) goes out instead.
            TunnResult::WriteToNetwork(b) if b.starts_with(&[1, 0, 0, 0]) => {
                Outbound::Handshake(to, b)
            }
            TunnResult::WriteToNetwork(b) => Outbound::Send(to, b),
            TunnResult::Done => Outbound::Queued,
            _ => Outbound::Drop(WgDrop::Crypto),
        }
    }

    /// Runs every live client's timers (keepalives, rekeys, expiring sessions); `send`
    /// gets what must go out. Call every [`TICK`]; `now` is unix seconds.
    pub fn tick(&mut self, now: u64, out: &mut [u8], mut send: impl FnMut(SocketAddr, &[u8])) {
        for slot in self.clients.values_mut() {
            if !slot.client.live_at(now) {
                continue;
            }
            if let TunnResult::WriteToNetwork(b) = slot.tunn.update_timers(out) {
                if let Some(to) = slot.endpoint {
                    send(to, b);
                }
            }
        }
    }

    /// Every client's state, by name.
    pub fn stats(&self) -> Vec<ClientStats> {
        let mut v: Vec<ClientStats> = self
            .clients
            .iter()
            .map(|(k, s)| {
                let (since, tx, rx, _, _) = s.tunn.stats();
                ClientStats {
                    name: s.client.name.to_string(),
                    public_key: *k,
                    endpoint: s.endpoint,
                    since_handshake: since,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The client that owns `addr`, if it is one of this gateway's.
    pub fn client_at(&self, addr: IpAddr) -> Option<&WgClient> {
        self.clients
            .get(self.by_address.get(&addr)?)
            .map(|s| &s.client)
    }

    /// The session index a client was given (for tests and `status`).
    pub fn index_of(&self, key: &WgKey) -> Option<u32> {
        self.clients.get(key).map(|s| s.index)
    }
}

impl Gate {
    /// The first checks of a datagram that came from `from`. A cookie is written at the
    /// start of `out`. Only handshakes touch the counts (a data message is only parsed,
    /// and its index looked up).
    pub fn check(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        now: u64,
        out: &mut [u8],
    ) -> Result<Admitted, Refused> {
        // boringtun writes into `out` up to the datagram's length (and 148 bytes for a
        // handshake answer): a short buffer is the caller's bug, never a panic here.
        if out.len() < datagram.len().max(148) {
            return Err(Refused::Drop(WgDrop::Malformed));
        }
        let mut cookie = [0u8; 64];
        let packet = match self
            .mac1
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(p) => p,
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                return Err(Refused::Drop(WgDrop::BadMac))
            }
            Err(_) => return Err(Refused::Drop(WgDrop::Malformed)),
        };
        let (to, kind) = match &packet {
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_) => {
                self.check_handshake(from, datagram, &packet, now, out)?
            }
            Packet::PacketCookieReply(p) => {
                if !self.counts().cookie_reply(now) {
                    return Err(Refused::Drop(WgDrop::UnderLoad));
                }
                (Lookup::Index(p.receiver_idx >> 8), Kind::CookieReply)
            }
            Packet::PacketData(p) => (Lookup::Index(p.receiver_idx >> 8), Kind::Data),
        };
        let known = self.known.load();
        let ours = match to {
            Lookup::Key(k) => known.keys.contains(&k),
            Lookup::Index(i) => known.indexes.contains(&i),
        };
        match (ours, to) {
            (true, _) => Ok(Admitted { to, kind }),
            (false, Lookup::Key(_)) => Err(Refused::Drop(WgDrop::UnknownKey)),
            (false, Lookup::Index(_)) => Err(Refused::Drop(WgDrop::UnknownIndex)),
        }
    }

    /// A handshake whose MAC1 is valid: counted; under the load, its source must have
    /// proven its address (MAC2, else a cookie) and be within its own limit.
    fn check_handshake(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        packet: &Packet<'_>,
        now: u64,
        out: &mut [u8],
    ) -> Result<(Lookup, Kind), Refused> {
        let under_load = self.counts().count(now);
        if under_load {
            let mut cookie = [0u8; 64];
            match self
                .cookies
                .verify_packet(Some(from.ip()), datagram, &mut cookie)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(c)) => {
                    let n = c.len();
                    out[..n].copy_from_slice(c);
                    return Err(Refused::Cookie(n));
                }
                Err(_) => return Err(Refused::Drop(WgDrop::Malformed)),
            }
            // A source is held to its own limit only once it has proven its address, as
            // WireGuard does: below the load, anyone could spoof a client's address and
            // spend its allowance, locking it out; what gets through then is bounded by
            // the shared count.
            if !self.counts().admit(from.ip(), now) {
                return Err(Refused::Drop(WgDrop::SourceLimit));
            }
        }
        let to = match packet {
            Packet::HandshakeInit(init) => {
                match parse_handshake_anon(&self.secret, &self.public, init) {
                    Ok(half) => Lookup::Key(WgKey(half.peer_static_public)),
                    Err(_) => return Err(Refused::Drop(WgDrop::Crypto)),
                }
            }
            Packet::HandshakeResponse(p) => Lookup::Index(p.receiver_idx >> 8),
            Packet::PacketCookieReply(_) | Packet::PacketData(_) => {
                return Err(Refused::Drop(WgDrop::Malformed))
            }
        };
        Ok((to, Kind::Handshake))
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, SourceCounts> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SourceCounts {
    /// Starts over when the second (unix) is a later one. The handshake thread and the data
    /// path each read the clock, and the lower-priority thread may carry a second that has
    /// just passed: a second up to [`STALE_SECONDS`] behind counts as the current one, so
    /// going back and forth across a boundary does not start the counts over each time
    /// (found by review). A clock stepped back further starts them over once.
    fn roll(&mut self, now: u64) {
        if now > self.second || now.saturating_add(STALE_SECONDS) < self.second {
            self.second = now;
            self.counts.clear();
            self.checks = 0;
            self.cookie_replies = 0;
        }
    }

    /// Counts a handshake with a valid MAC1; whether the gateway was under load before it.
    fn count(&mut self, now: u64) -> bool {
        self.roll(now);
        let loaded = self.checks >= HANDSHAKES_PER_SECOND;
        self.checks = self.checks.saturating_add(1);
        loaded
    }

    /// Counts a proven handshake from `ip`; false past [`HANDSHAKES_PER_SOURCE`] this
    /// second.
    fn admit(&mut self, ip: IpAddr, now: u64) -> bool {
        self.roll(now);
        let ip = source_key(ip);
        if self.counts.len() >= MAX_SOURCES && !self.counts.contains_key(&ip) {
            self.counts.clear();
        }
        let n = self.counts.entry(ip).or_default();
        *n = n.saturating_add(1);
        *n <= HANDSHAKES_PER_SOURCE
    }

    /// Counts a cookie reply; false past [`COOKIE_REPLIES_PER_SECOND`] this second.
    fn cookie_reply(&mut self, now: u64) -> bool {
        self.roll(now);
        self.cookie_replies = self.cookie_replies.saturating_add(1);
        self.cookie_replies <= COOKIE_REPLIES_PER_SECOND
    }
}

/// The source a per-source limit counts: an IPv4 address, or an IPv6 address's /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// A new key pair: the private key (clamped, as `wg genkey` writes it) and its public key.
pub fn generate_key_pair() -> ([u8; 32], WgKey) {
    use rand::RngCore;
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    secret[0] &= 248;
    secret[31] = (secret[31] & 127) | 64;
    (secret, public_of(secret))
}

/// The public key of a private key.
pub fn public_of(secret: [u8; 32]) -> WgKey {
    WgKey(*PublicKey::from(&StaticSecret::from(secret)).as_bytes())
}

/// An authenticated inner packet: accepted only from the client's own address (WireGuard's
/// cryptokey routing), and it moves the client's endpoint to where it came from.
fn accept<'a>(
    slot: &mut Slot,
    from: SocketAddr,
    key: WgKey,
    packet: &'a [u8],
    src: IpAddr,
) -> Inbound<'a> {
    if !slot.client.owns(src) {
        return Inbound::Drop(WgDrop::Spoofed);
    }
    // A malformed packet changes nothing, not even where the client is.
    if !packet.is_empty() && !whole_header(packet) {
        return Inbound::Drop(WgDrop::Malformed);
    }
    slot.endpoint = Some(from);
    if packet.is_empty() {
        return Inbound::Nothing;
    }
    Inbound::Packet(key, packet)
}

/// Whether `packet` holds at least its own IP header. boringtun cuts the inner packet to
/// the length its header declares and reads the source from where the header would be,
/// so a client could seal a header declaring 11 bytes: its source checked, 11 bytes out
/// (found by fuzzing `wg_gateway`). Only the header's length: the gateway's caller parses
/// the packet in full (`packet::parse`) right after, and parsing twice per packet buys
/// nothing.
fn whole_header(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let header = usize::from(packet[0] & 0x0f) * 4;
            header >= 20 && packet.len() >= header
        }
        Some(6) => packet.len() >= 40,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
