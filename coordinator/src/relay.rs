//! The coordinator as the relay of last resort. Every node reaches its coordinator; when
//! two nodes cannot reach each other directly and the mesh has no relay node (or none
//! answers), their tunnel's datagrams go through the coordinator, forwarded exactly as a
//! relay node forwards them: `RelaySend { to }` in, `RelayRecv { from }` out, the QUIC
//! payload opaque (the tunnel is end to end: the coordinator sees no plaintext and holds
//! no tunnel key).
//!
//! A node is known here by its control session: the session gave it a random token
//! ([`quicmesh_protocol::wire::ControlDown::SessionInfo`], inside TLS) that its datagrams
//! to the relay carry (`RelaySendAuth`), and they must come from the address the session
//! runs from. A source address alone can be forged by anyone; the token cannot be guessed
//! off the path. Datagrams are delivered to the session's address, from the address this
//! replica answers it on (a multi-homed coordinator answers from the address the node
//! sends to). No registration, so nothing an outsider can grow: the tables hold the
//! sessions of this replica and are rebuilt from them. Datagrams whose sender or
//! destination has no session here are dropped and counted; so a pair relayed through
//! the coordinator must share a replica.
//!
//! What this does not stop: a node can point its own session's address elsewhere for a
//! moment (QUIC reports a migrated address before validating it), so datagrams relayed
//! to it may go to a third address. Those are its peers' QUIC packets to it, which stop
//! at a congestion window when nothing acknowledges them: a reflection of what others
//! send to that node, bounded, never amplified, never chosen by the attacker.
//!
//! [`CoordSocket`] sits under the control endpoint: path packets (first byte zero, never
//! QUIC) are taken out before quinn reads, the rest is QUIC as before.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use quicmesh_protocol::ident::NodeName;
use quicmesh_protocol::path::{self as pp, PathPacket, PeerId};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::drops::{Counters, RelayDrop};

/// Pairs whose use is remembered for the topology; a new pair past this is not recorded
/// (its datagrams are still forwarded).
pub const PAIRS_MAX: usize = 4096;
/// A pair not relayed for this long is no longer shown as relayed.
pub const PAIR_IDLE: Duration = Duration::from_secs(30);
/// What one node may send through the coordinator, bytes per second (100 Mbit/s), and in
/// a burst: the relay of last resort shares the control listener with every session, so
/// no node may take it whole (relay nodes carry bulk traffic).
pub const SENDER_RATE: f64 = 12.5e6;
pub const SENDER_BURST: f64 = 1024.0 * 1024.0;

/// A node in session, as the relay needs it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: NodeName,
    /// The address its session runs from.
    pub addr: SocketAddr,
    /// The local address its session is served on (relayed datagrams leave from it).
    pub local: Option<IpAddr>,
    /// What its datagrams carry ([`PathPacket::RelaySendAuth`]).
    pub token: u64,
}

#[derive(Debug, Default)]
struct Table {
    /// Senders, by token.
    by_token: HashMap<u64, PeerId>,
    by_id: HashMap<PeerId, Member>,
}

/// How much one pair used the relay.
#[derive(Debug, Clone, Copy)]
struct PairUse {
    datagrams: u64,
    bytes: u64,
    last: Instant,
}

/// A pair relayed lately, for the topology.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayedPair {
    pub from: String,
    pub to: String,
    pub datagrams: u64,
    pub bytes: u64,
    /// Seconds since its last datagram.
    pub idle_secs: u64,
}

/// What the relay keeps of its senders and pairs.
#[derive(Debug, Default)]
struct Usage {
    pairs: HashMap<(PeerId, PeerId), PairUse>,
    /// Each sender's byte bucket: (bytes left, when filled); senders in session only.
    buckets: HashMap<PeerId, (f64, Instant)>,
}

impl Usage {
    /// Takes `bytes` from `src`'s bucket ([`SENDER_RATE`], [`SENDER_BURST`]); false when
    /// it has not that many.
    fn charge(&mut self, src: PeerId, bytes: usize, now: Instant) -> bool {
        let (left, at) = self.buckets.entry(src).or_insert((SENDER_BURST, now));
        let dt = now.saturating_duration_since(*at).as_secs_f64();
        *left = (*left + dt * SENDER_RATE).min(SENDER_BURST);
        *at = now;
        if *left < bytes as f64 {
            return false;
        }
        *left -= bytes as f64;
        true
    }

    /// Counts a datagram of `bytes` relayed for `pair` (a new pair past [`PAIRS_MAX`] is
    /// not recorded).
    fn record(&mut self, pair: (PeerId, PeerId), bytes: usize, now: Instant) {
        if self.pairs.len() >= PAIRS_MAX && !self.pairs.contains_key(&pair) {
            return;
        }
        let u = self.pairs.entry(pair).or_insert(PairUse {
            datagrams: 0,
            bytes: 0,
            last: now,
        });
        u.datagrams += 1;
        u.bytes += bytes as u64;
        u.last = now;
    }
}

/// The coordinator's relay: its tables, switch and counters.
#[derive(Debug)]
pub struct Relay {
    enabled: AtomicBool,
    table: ArcSwap<Table>,
    /// Per-sender buckets and per-pair use, under one lock (one per datagram).
    usage: Mutex<Usage>,
    pub forwarded: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    pub drops: Counters<RelayDrop>,
}

impl Default for Relay {
    fn default() -> Self {
        Self {
            enabled: AtomicBool::new(true),
            table: ArcSwap::from_pointee(Table::default()),
            usage: Mutex::new(Usage::default()),
            forwarded: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            drops: Counters::default(),
        }
    }
}

impl Relay {
    /// Whether this coordinator relays (`--no-relay` turns it off).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Rebuilds the tables from this replica's sessions.
    pub fn set_members(&self, members: impl IntoIterator<Item = Member>) {
        let mut t = Table::default();
        for m in members {
            let id = PeerId::of(&m.name);
            t.by_token.insert(m.token, id);
            t.by_id.insert(id, m);
        }
        // Buckets of senders gone and idle pairs are forgotten here, off the datagram path.
        let now = Instant::now();
        {
            let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            u.buckets.retain(|id, _| t.by_id.contains_key(id));
            u.pairs
                .retain(|_, p| now.saturating_duration_since(p.last) < PAIR_IDLE);
        }
        self.table.store(Arc::new(t));
    }

    /// Forwards one path packet received from `from`, or counts why not.
    fn take(&self, from: SocketAddr, seg: &mut [u8], out: &dyn AsyncUdpSocket, now: Instant) {
        let (to, token) = match pp::decode(seg) {
            Ok(Some(PathPacket::RelaySendAuth { to, token, .. })) => (to, token),
            // An opener that outlived its way here: nothing to do.
            Ok(Some(PathPacket::Open)) => return,
            _ => return self.drops.count(RelayDrop::NotRelaySend),
        };
        if !self.enabled() {
            return self.drops.count(RelayDrop::Disabled);
        }
        let t = self.table.load();
        // The token names the sender; the session's address must be where it came from
        // (a token seen on the wire is no use from elsewhere).
        let Some(src) = t
            .by_token
            .get(&token)
            .copied()
            .filter(|id| t.by_id.get(id).is_some_and(|m| m.addr == from))
        else {
            return self.drops.count(RelayDrop::SenderNotInSession);
        };
        let Some(dst) = t.by_id.get(&to) else {
            return self.drops.count(RelayDrop::DestinationNotInSession);
        };
        if src == to {
            return self.drops.count(RelayDrop::ToItself);
        }
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        if !usage.charge(src, seg.len(), now) {
            return self.drops.count(RelayDrop::SenderOverRate);
        }
        let out_seg = pp::relay_auth_rewrite(seg, src);
        let sent = out.try_send(&Transmit {
            destination: dst.addr,
            ecn: None,
            contents: out_seg,
            segment_size: None,
            src_ip: dst.local,
        });
        if sent.is_err() {
            return self.drops.count(RelayDrop::SendFailed);
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        self.forwarded_bytes
            .fetch_add(out_seg.len() as u64, Ordering::Relaxed);
        usage.record((src, to), out_seg.len(), now);
    }

    /// The pairs relayed within [`PAIR_IDLE`], by node name, busiest first.
    pub fn relayed_pairs(&self, now: Instant) -> Vec<RelayedPair> {
        let t = self.table.load();
        let name = |id: &PeerId| {
            t.by_id
                .get(id)
                .map_or_else(|| format!("{:016x}", id.0), |m| m.name.to_string())
        };
        let usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<RelayedPair> = usage
            .pairs
            .iter()
            .filter(|(_, u)| now.saturating_duration_since(u.last) < PAIR_IDLE)
            .map(|((a, b), u)| RelayedPair {
                from: name(a),
                to: name(b),
                datagrams: u.datagrams,
                bytes: u.bytes,
                idle_secs: now.saturating_duration_since(u.last).as_secs(),
            })
            .collect();
        v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.from.cmp(&b.from)));
        v
    }
}

/// The control endpoint's socket: relays path packets, passes QUIC on.
#[derive(Debug)]
pub struct CoordSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    relay: Arc<Relay>,
}

impl CoordSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, relay: Arc<Relay>) -> Arc<Self> {
        Arc::new(Self { inner, relay })
    }
}

impl AsyncUdpSocket for CoordSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        self.inner.try_send(t)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        let now = Instant::now();
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()).take(n) {
            let stride = m.stride.max(1);
            let len = m.len.min(buf.len());
            if buf[..len].chunks(stride).any(|s| s.first() == Some(&0)) {
                let from = m.addr;
                m.len = pp::take_path_segments(buf, len, stride, |seg| {
                    self.relay.take(from, seg, &*self.inner, now)
                });
            }
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::Runtime;

    fn udp() -> std::net::UdpSocket {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    }

    fn name(n: &str) -> NodeName {
        NodeName::new(n).unwrap()
    }

    /// What `to` reads within its timeout.
    fn read(to: &std::net::UdpSocket) -> Option<Vec<u8>> {
        let mut buf = [0u8; 2048];
        to.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
    }

    fn member(n: &str, addr: SocketAddr, token: u64) -> Member {
        Member {
            name: name(n),
            addr,
            local: None,
            token,
        }
    }

    /// `RelaySendAuth` to node `to` with `token`.
    fn datagram(to: &str, token: u64) -> Vec<u8> {
        let mut d = pp::relay_send_auth_header(PeerId::of(&name(to)), token).to_vec();
        d.extend_from_slice(b"\x40opaque quic");
        d
    }

    #[tokio::test]
    async fn forwards_only_between_nodes_in_session_and_says_who_sent() {
        let relay = Relay::default();
        let out = quinn::TokioRuntime.wrap_udp_socket(udp()).unwrap();
        // A new registration is writable once the reactor has turned.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (a, b) = (udp(), udp());
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        relay.set_members([member("a", a_addr, 11), member("b", b_addr, 22)]);
        let now = Instant::now();

        relay.take(a_addr, &mut datagram("b", 11), &*out, now);
        let got = read(&b).unwrap_or_else(|| panic!("not forwarded: {:?}", relay.drops.all()));
        assert_eq!(
            pp::decode(&got).unwrap(),
            Some(PathPacket::RelayRecv {
                from: PeerId::of(&name("a")),
                payload: b"\x40opaque quic"
            })
        );
        assert_eq!(relay.forwarded.load(Ordering::Relaxed), 1);
        let pairs = relay.relayed_pairs(now);
        assert_eq!((pairs[0].from.as_str(), pairs[0].to.as_str()), ("a", "b"));

        // The denied twins: an outsider's source, a destination not in session, a node
        // to itself, and the relay switched off. Nothing reaches b; each has its reason.
        let outsider: SocketAddr = "127.0.0.1:9".parse().unwrap();
        relay.take(outsider, &mut datagram("b", 11), &*out, now);
        relay.take(a_addr, &mut datagram("c", 11), &*out, now);
        relay.take(b_addr, &mut datagram("b", 22), &*out, now);
        relay.set_enabled(false);
        relay.take(a_addr, &mut datagram("b", 11), &*out, now);
        assert_eq!(read(&b), None, "nothing else reached b");
        for reason in [
            RelayDrop::SenderNotInSession,
            RelayDrop::DestinationNotInSession,
            RelayDrop::ToItself,
            RelayDrop::Disabled,
        ] {
            assert_eq!(relay.drops.get(reason), 1, "{reason:?}");
        }
        assert_eq!(relay.forwarded.load(Ordering::Relaxed), 1);
    }

    /// Attack (review finding): the sender was known by its source address alone, so
    /// anyone who knew (or guessed) a node's address could forge it and have the
    /// coordinator send their bytes to that node's peers, spending the node's share. Now
    /// the session's token is needed too: a forged source without it, with a wrong one, or
    /// a token seen on the wire sent from another address, is dropped; a node's own
    /// token from its own address goes through.
    #[tokio::test]
    async fn a_forged_source_without_the_sessions_token_is_not_relayed() {
        let relay = Relay::default();
        let out = quinn::TokioRuntime.wrap_udp_socket(udp()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (a, b) = (udp(), udp());
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        relay.set_members([member("a", a_addr, 11), member("b", b_addr, 22)]);
        let now = Instant::now();
        // a's address as source: a plain relay request (no token), a wrong token, and
        // b's token (b is in session, but not at a's address).
        let mut plain = pp::relay_send_header(PeerId::of(&name("b"))).to_vec();
        plain.extend_from_slice(b"\x40forged");
        relay.take(a_addr, &mut plain, &*out, now);
        relay.take(a_addr, &mut datagram("b", 12), &*out, now);
        relay.take(a_addr, &mut datagram("a", 22), &*out, now);
        // a's token from elsewhere.
        relay.take(b_addr, &mut datagram("b", 11), &*out, now);
        assert_eq!(read(&b), None, "nothing forged reached b");
        assert_eq!(read(&a), None, "nothing forged reached a");
        assert_eq!(relay.drops.get(RelayDrop::NotRelaySend), 1);
        assert_eq!(relay.drops.get(RelayDrop::SenderNotInSession), 3);
        assert_eq!(relay.forwarded.load(Ordering::Relaxed), 0);
        // The twin: a's token from a's address.
        relay.take(a_addr, &mut datagram("b", 11), &*out, now);
        assert!(read(&b).is_some(), "{:?}", relay.drops.all());
    }

    #[test]
    fn a_sender_past_its_rate_is_dropped_and_refilled_with_time() {
        let mut usage = Usage::default();
        let t0 = Instant::now();
        let a = PeerId(1);
        let burst = SENDER_BURST as usize;
        assert!(usage.charge(a, burst, t0));
        assert!(!usage.charge(a, 1200, t0), "the burst is spent");
        assert!(
            usage.charge(PeerId(2), 1200, t0),
            "another sender has its own"
        );
        // 1200 bytes at 12.5 MB/s come back within 0.1 ms.
        assert!(usage.charge(a, 1200, t0 + Duration::from_millis(1)));
    }

    #[test]
    fn the_pairs_shown_are_bounded_and_forget_idle_ones() {
        let relay = Relay::default();
        let t0 = Instant::now();
        {
            let mut usage = relay.usage.lock().unwrap();
            for i in 0..PAIRS_MAX as u64 {
                usage.pairs.insert(
                    (PeerId(i), PeerId(i + 1)),
                    PairUse {
                        datagrams: 1,
                        bytes: 1,
                        last: t0,
                    },
                );
            }
        }
        assert_eq!(relay.relayed_pairs(t0).len(), PAIRS_MAX);
        assert!(relay.relayed_pairs(t0 + PAIR_IDLE).is_empty());
    }
}
