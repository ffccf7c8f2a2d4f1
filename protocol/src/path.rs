//! Path packets: what nodes send each other on the tunnel socket beside QUIC — relay
//! framing and path probes.
//!
//! Every QUIC packet has the fixed bit (0x40) set in its first byte (the mesh never
//! negotiates greasing it), so a datagram starting with a zero byte is never QUIC: path
//! packets start with [`MAGIC`] and a type byte.
//!
//! - `RelaySend { to }` + payload: a node asks a relay to forward an opaque QUIC packet to
//!   the node `to`; `RelayRecv { from }` + payload: what the relay delivers. Both headers
//!   have the same length, so a relay rewrites the header in place.
//! - `Ping` / `Pong`: path probes between the two ends of one tunnel, version
//!   [`PROBE_VERSION`]. `link` names the tunnel (both ends derive it, with the tag key,
//!   from the connection's TLS exporter); `dir` says which end sent it ([`Dir`]); `seq` is
//!   the sender's counter for the link, one up per probe, so a receiver refuses a probe it
//!   has seen ([`ReplayWindow`]); `tx` is random and echoed; the pong carries the address
//!   the ping came from, and the ping carries as many zero bytes in its place, so a pong is
//!   never larger than the ping that drew it. The tag is computed by the caller over
//!   [`signed`] (type, version, direction, link, counter, ...) with the link's key:
//!   nothing here holds keys. Version 1 probes (types 3 and 4: no counter, no direction)
//!   are told apart by their type and refused.
//! - `RelaySendAuth { to, token }` + payload: `RelaySend` to the coordinator's relay (of
//!   last resort), with the token the coordinator gave the node's control session
//!   ([`crate::wire::ControlDown::SessionInfo`]): the coordinator has no registration to
//!   tell a sender by, and a source address alone can be forged. It delivers a plain
//!   `RelayRecv` (8 bytes shorter: the header moves up over the token,
//!   [`relay_auth_rewrite`]).
//! - `Open` ([`OPENER`], 4 bytes): sent with a small TTL so that it opens the sender's own
//!   NAT toward a peer and dies before the peer's; it carries nothing and a node that
//!   receives one ignores it.
//!
//! Probe layout (69 bytes): magic (3), type (1), version (1), dir (1), link (8), seq (8),
//! tx (12), address or padding (19: family 4|6, 16 address bytes, port), tag (16).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::ident::NodeName;

/// First bytes of every path packet (the zero byte is never the start of a QUIC packet).
pub const MAGIC: [u8; 3] = [0x00, b'q', b'm'];
/// Length of a relay header (magic, type, peer id).
pub const RELAY_HEADER: usize = 12;
/// Length of a `RelaySendAuth` header (magic, type, peer id, token).
pub const RELAY_AUTH_HEADER: usize = RELAY_HEADER + 8;
/// Length of a probe's authentication tag.
pub const TAG_LEN: usize = 16;

/// Version of the probe format this code speaks.
pub const PROBE_VERSION: u8 = 2;

const T_RELAY_SEND: u8 = 1;
const T_RELAY_RECV: u8 = 2;
/// Version 1 probes (no counter, no direction): recognised only to be refused.
const T_PING_V1: u8 = 3;
const T_PONG_V1: u8 = 4;
const T_PING: u8 = 5;
const T_PONG: u8 = 6;
const T_OPEN: u8 = 7;
const T_RELAY_SEND_AUTH: u8 = 8;

/// An opener: the whole datagram.
pub const OPENER: [u8; 4] = [MAGIC[0], MAGIC[1], MAGIC[2], T_OPEN];

/// Offsets in a probe.
const O_VERSION: usize = 4;
const O_DIR: usize = 5;
const O_LINK: usize = 6;
const O_SEQ: usize = 14;
const O_TX: usize = 22;
const O_ADDR: usize = 34;
const ADDR_LEN: usize = 19;

/// Length of a probe (ping or pong) on the wire.
pub const PROBE_LEN: usize = O_ADDR + ADDR_LEN + TAG_LEN;
/// Length of a ping on the wire (padded to a pong's length).
pub const PING_LEN: usize = PROBE_LEN;
/// Length of a pong on the wire.
pub const PONG_LEN: usize = PROBE_LEN;

/// A node's short name on relay paths: the first 8 bytes of SHA-256 over its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl PeerId {
    pub fn of(node: &NodeName) -> Self {
        use sha2::Digest;
        let d = sha2::Sha256::new()
            .chain_update(b"quicmesh peer id\0")
            .chain_update(node.as_str().as_bytes())
            .finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        PeerId(u64::from_be_bytes(b))
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Which end of a tunnel sent a probe: the end whose node name sorts first (`Low`) or
/// the other. Both ends know both names, so each knows which value the other must send;
/// a probe sent back at its sender (reflected) carries the wrong one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    Low,
    High,
}

impl Dir {
    /// The direction of probes `from` sends to `to`.
    pub fn of(from: &NodeName, to: &NodeName) -> Self {
        if from.as_str() < to.as_str() {
            Dir::Low
        } else {
            Dir::High
        }
    }

    /// The direction of probes coming the other way.
    pub fn reverse(self) -> Self {
        match self {
            Dir::Low => Dir::High,
            Dir::High => Dir::Low,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Dir::Low => 0,
            Dir::High => 1,
        }
    }
}

/// A path probe (ping or pong).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Which tunnel the probe belongs to.
    pub link: u64,
    /// Which end sent it.
    pub dir: Dir,
    /// The sender's counter for this link (from 1, one up per probe sent).
    pub seq: u64,
    /// Random, echoed by the pong.
    pub tx: [u8; 12],
    pub tag: [u8; TAG_LEN],
}

/// A decoded path packet (borrowing the datagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathPacket<'a> {
    RelaySend {
        to: PeerId,
        payload: &'a [u8],
    },
    RelayRecv {
        from: PeerId,
        payload: &'a [u8],
    },
    RelaySendAuth {
        to: PeerId,
        token: u64,
        payload: &'a [u8],
    },
    Ping(Probe),
    Pong {
        probe: Probe,
        observed: SocketAddr,
    },
    /// An opener ([`OPENER`]): nothing to do.
    Open,
}

/// Why a path packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path packet of {0} bytes is too short")]
    Short(usize),
    #[error("unknown path packet type {0}")]
    UnknownType(u8),
    #[error("path packet of type {ty} has {len} bytes, expected {want}")]
    Length { ty: u8, len: usize, want: usize },
    #[error("pong carries an address of unknown family {0}")]
    Family(u8),
    #[error("probe of version 1 (type {0}): this node speaks version 2")]
    OldProbe(u8),
    #[error("probe of unknown version {0}")]
    Version(u8),
    #[error("probe of unknown direction {0}")]
    Direction(u8),
    #[error("ping padding is not zero")]
    Padding,
}

impl PathError {
    /// The reason a refused probe is counted under.
    pub fn refusal(&self) -> ProbeRefusal {
        match self {
            PathError::OldProbe(_) | PathError::Version(_) => ProbeRefusal::Version,
            _ => ProbeRefusal::Malformed,
        }
    }
}

/// Why a probe was refused (a metric label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ProbeRefusal {
    #[error("probe does not decode")]
    Malformed,
    #[error("probe of another version")]
    Version,
    #[error("probe for no tunnel of this node")]
    UnknownLink,
    #[error("probe tag does not verify")]
    BadTag,
    #[error("probe sent the wrong way (reflected)")]
    WrongDirection,
    #[error("probe seen before")]
    Replayed,
    #[error("probe older than the replay window")]
    TooOld,
    #[error("pong to no ping of ours")]
    Unsolicited,
}

impl ProbeRefusal {
    /// Every reason, for metrics that list them.
    pub const ALL: [ProbeRefusal; 8] = [
        ProbeRefusal::Malformed,
        ProbeRefusal::Version,
        ProbeRefusal::UnknownLink,
        ProbeRefusal::BadTag,
        ProbeRefusal::WrongDirection,
        ProbeRefusal::Replayed,
        ProbeRefusal::TooOld,
        ProbeRefusal::Unsolicited,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ProbeRefusal::Malformed => "malformed",
            ProbeRefusal::Version => "version",
            ProbeRefusal::UnknownLink => "unknown_link",
            ProbeRefusal::BadTag => "bad_tag",
            ProbeRefusal::WrongDirection => "wrong_direction",
            ProbeRefusal::Replayed => "replayed",
            ProbeRefusal::TooOld => "too_old",
            ProbeRefusal::Unsolicited => "unsolicited",
        }
    }
}

/// Probes this far behind the newest one seen on a link are refused as too old.
pub const REPLAY_WINDOW: u64 = 1024;

/// Which counters of a link's probes were seen: the newest, and a bitmap of the
/// [`REPLAY_WINDOW`] before it (RFC 6479's sliding window). Fixed size per link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    top: u64,
    bits: [u64; (REPLAY_WINDOW / 64) as usize],
}

/// A probe the window let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fresh {
    /// Newer than every probe before it: it may move state (a relay registration).
    Newest,
    /// Not seen before but behind the newest (reordered): answered, moves nothing.
    Reordered,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self {
            top: 0,
            bits: [0; (REPLAY_WINDOW / 64) as usize],
        }
    }

    /// The newest counter seen (0: none yet).
    pub fn newest(&self) -> u64 {
        self.top
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % REPLAY_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Records `seq` (of a probe whose tag verified) and says whether it is fresh.
    pub fn accept(&mut self, seq: u64) -> Result<Fresh, ProbeRefusal> {
        if seq == 0 {
            return Err(ProbeRefusal::Replayed);
        }
        if seq > self.top {
            if seq - self.top >= REPLAY_WINDOW {
                self.bits = [0; (REPLAY_WINDOW / 64) as usize];
            } else {
                for s in self.top + 1..seq {
                    let (w, b) = Self::bit(s);
                    self.bits[w] &= !b;
                }
            }
            self.top = seq;
            let (w, b) = Self::bit(seq);
            self.bits[w] |= b;
            return Ok(Fresh::Newest);
        }
        if self.top - seq >= REPLAY_WINDOW {
            return Err(ProbeRefusal::TooOld);
        }
        let (w, b) = Self::bit(seq);
        if self.bits[w] & b != 0 {
            return Err(ProbeRefusal::Replayed);
        }
        self.bits[w] |= b;
        Ok(Fresh::Reordered)
    }
}

/// The receiving end of one link's probes: the direction they must carry and the
/// counters seen. The checks run in the order a forger meets them: direction, tag, then
/// freshness, so only authenticated probes move the window.
#[derive(Debug, Clone)]
pub struct ProbeGuard {
    expect: Dir,
    window: ReplayWindow,
}

impl ProbeGuard {
    /// A guard for probes sent in direction `expect` (the peer's).
    pub fn new(expect: Dir) -> Self {
        Self {
            expect,
            window: ReplayWindow::new(),
        }
    }

    /// Admits `probe` (of this guard's link) whose tag verified when `tag_ok`.
    pub fn admit(&mut self, probe: &Probe, tag_ok: bool) -> Result<Fresh, ProbeRefusal> {
        if probe.dir != self.expect {
            return Err(ProbeRefusal::WrongDirection);
        }
        if !tag_ok {
            return Err(ProbeRefusal::BadTag);
        }
        self.window.accept(probe.seq)
    }

    /// The newest counter admitted.
    pub fn newest(&self) -> u64 {
        self.window.newest()
    }
}

/// True when `datagram` starts like a path packet (and is not QUIC).
pub fn is_path_packet(datagram: &[u8]) -> bool {
    datagram.len() >= 4 && datagram[..3] == MAGIC
}

/// Decodes a datagram: `Ok(None)` when it is not a path packet (QUIC goes to QUIC).
pub fn decode(d: &[u8]) -> Result<Option<PathPacket<'_>>, PathError> {
    if d.first() != Some(&0) {
        return Ok(None);
    }
    if d.len() < 4 {
        return Err(PathError::Short(d.len()));
    }
    if d[..3] != MAGIC {
        return Ok(None);
    }
    let ty = d[3];
    let id = |d: &[u8]| PeerId(u64::from_be_bytes(d[4..12].try_into().unwrap_or_default()));
    match ty {
        T_RELAY_SEND | T_RELAY_RECV => {
            if d.len() <= RELAY_HEADER {
                return Err(PathError::Short(d.len()));
            }
            let payload = &d[RELAY_HEADER..];
            Ok(Some(if ty == T_RELAY_SEND {
                PathPacket::RelaySend { to: id(d), payload }
            } else {
                PathPacket::RelayRecv {
                    from: id(d),
                    payload,
                }
            }))
        }
        T_RELAY_SEND_AUTH => {
            if d.len() <= RELAY_AUTH_HEADER {
                return Err(PathError::Short(d.len()));
            }
            let token = u64::from_be_bytes(
                d[RELAY_HEADER..RELAY_AUTH_HEADER]
                    .try_into()
                    .unwrap_or_default(),
            );
            Ok(Some(PathPacket::RelaySendAuth {
                to: id(d),
                token,
                payload: &d[RELAY_AUTH_HEADER..],
            }))
        }
        T_PING_V1 | T_PONG_V1 => Err(PathError::OldProbe(ty)),
        T_OPEN if d.len() == OPENER.len() => Ok(Some(PathPacket::Open)),
        T_OPEN => Err(PathError::Length {
            ty,
            len: d.len(),
            want: OPENER.len(),
        }),
        T_PING | T_PONG => {
            if d.len() <= O_VERSION {
                return Err(PathError::Short(d.len()));
            }
            if d[O_VERSION] != PROBE_VERSION {
                return Err(PathError::Version(d[O_VERSION]));
            }
            if d.len() != PROBE_LEN {
                return Err(PathError::Length {
                    ty,
                    len: d.len(),
                    want: PROBE_LEN,
                });
            }
            let dir = match d[O_DIR] {
                0 => Dir::Low,
                1 => Dir::High,
                x => return Err(PathError::Direction(x)),
            };
            let u64_at = |o: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&d[o..o + 8]);
                u64::from_be_bytes(b)
            };
            let mut tx = [0u8; 12];
            tx.copy_from_slice(&d[O_TX..O_ADDR]);
            let mut tag = [0u8; TAG_LEN];
            tag.copy_from_slice(&d[PROBE_LEN - TAG_LEN..]);
            let probe = Probe {
                link: u64_at(O_LINK),
                dir,
                seq: u64_at(O_SEQ),
                tx,
                tag,
            };
            let a = &d[O_ADDR..O_ADDR + ADDR_LEN];
            if ty == T_PING {
                if a.iter().any(|b| *b != 0) {
                    return Err(PathError::Padding);
                }
                return Ok(Some(PathPacket::Ping(probe)));
            }
            let port = u16::from_be_bytes([a[17], a[18]]);
            let ip = match a[0] {
                4 if a[5..17].iter().all(|b| *b == 0) => {
                    IpAddr::V4(Ipv4Addr::new(a[1], a[2], a[3], a[4]))
                }
                4 => return Err(PathError::Padding),
                6 => {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&a[1..17]);
                    IpAddr::V6(Ipv6Addr::from(b))
                }
                f => return Err(PathError::Family(f)),
            };
            Ok(Some(PathPacket::Pong {
                probe,
                observed: SocketAddr::new(ip, port),
            }))
        }
        t => Err(PathError::UnknownType(t)),
    }
}

/// Takes the path packets out of a received buffer: `len` bytes in segments of `stride`
/// (several when the kernel coalesced datagrams of one source). Each path packet goes to
/// `take` (in place: it may rewrite it); the QUIC segments are packed to the front, in
/// order. Returns the length kept.
pub fn take_path_segments(
    buf: &mut [u8],
    len: usize,
    stride: usize,
    mut take: impl FnMut(&mut [u8]),
) -> usize {
    let len = len.min(buf.len());
    let stride = stride.max(1);
    let mut kept = 0;
    let mut at = 0;
    while at < len {
        let end = (at + stride).min(len);
        if buf[at] == 0 {
            take(&mut buf[at..end]);
        } else {
            buf.copy_within(at..end, kept);
            kept += end - at;
        }
        at = end;
    }
    kept
}

/// The bytes a probe's tag covers (everything before the tag).
pub fn signed(datagram: &[u8]) -> &[u8] {
    &datagram[..datagram.len().saturating_sub(TAG_LEN)]
}

/// The fields a probe's sender chooses (the tag is computed over the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeHead {
    pub link: u64,
    pub dir: Dir,
    pub seq: u64,
    pub tx: [u8; 12],
}

fn probe_head(ty: u8, h: &ProbeHead, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(ty);
    out.push(PROBE_VERSION);
    out.push(h.dir.byte());
    out.extend_from_slice(&h.link.to_be_bytes());
    out.extend_from_slice(&h.seq.to_be_bytes());
    out.extend_from_slice(&h.tx);
}

/// Writes a relay header in front of a payload: `RelaySend { to }`.
pub fn relay_send_header(to: PeerId) -> [u8; RELAY_HEADER] {
    let mut h = [0u8; RELAY_HEADER];
    h[..3].copy_from_slice(&MAGIC);
    h[3] = T_RELAY_SEND;
    h[4..].copy_from_slice(&to.0.to_be_bytes());
    h
}

/// Writes a `RelaySendAuth { to, token }` header (for the coordinator's relay).
pub fn relay_send_auth_header(to: PeerId, token: u64) -> [u8; RELAY_AUTH_HEADER] {
    let mut h = [0u8; RELAY_AUTH_HEADER];
    h[..3].copy_from_slice(&MAGIC);
    h[3] = T_RELAY_SEND_AUTH;
    h[4..RELAY_HEADER].copy_from_slice(&to.0.to_be_bytes());
    h[RELAY_HEADER..].copy_from_slice(&token.to_be_bytes());
    h
}

/// Turns a `RelaySendAuth` datagram into the `RelayRecv` the relay delivers: the header,
/// rewritten, moves up over the token; returns the datagram to send (empty when
/// `datagram` is shorter than the header).
pub fn relay_auth_rewrite(datagram: &mut [u8], from: PeerId) -> &mut [u8] {
    if datagram.len() < RELAY_AUTH_HEADER {
        return &mut [];
    }
    let out = &mut datagram[RELAY_AUTH_HEADER - RELAY_HEADER..];
    out[..3].copy_from_slice(&MAGIC);
    out[3] = T_RELAY_RECV;
    out[4..RELAY_HEADER].copy_from_slice(&from.0.to_be_bytes());
    out
}

/// Turns a `RelaySend` datagram into the `RelayRecv` the relay delivers, in place.
pub fn relay_rewrite(datagram: &mut [u8], from: PeerId) {
    if datagram.len() >= RELAY_HEADER {
        datagram[3] = T_RELAY_RECV;
        datagram[4..RELAY_HEADER].copy_from_slice(&from.0.to_be_bytes());
    }
}

/// Encodes a ping (padded to a pong's length); `tag` computes the tag over the signed
/// bytes.
pub fn ping(h: &ProbeHead, tag: impl FnOnce(&[u8]) -> [u8; TAG_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PROBE_LEN);
    probe_head(T_PING, h, &mut out);
    out.extend_from_slice(&[0u8; ADDR_LEN]);
    let t = tag(&out);
    out.extend_from_slice(&t);
    out
}

/// Encodes a pong to a ping that came from `observed` (`h.tx` echoes the ping's).
pub fn pong(
    h: &ProbeHead,
    observed: SocketAddr,
    tag: impl FnOnce(&[u8]) -> [u8; TAG_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(PROBE_LEN);
    probe_head(T_PONG, h, &mut out);
    let mut a = [0u8; ADDR_LEN];
    match observed.ip() {
        IpAddr::V4(v4) => {
            a[0] = 4;
            a[1..5].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            a[0] = 6;
            a[1..17].copy_from_slice(&v6.octets());
        }
    }
    a[17..].copy_from_slice(&observed.port().to_be_bytes());
    out.extend_from_slice(&a);
    let t = tag(&out);
    out.extend_from_slice(&t);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(b: &[u8]) -> [u8; TAG_LEN] {
        // A keyed stand-in for HMAC: what matters here is that it covers every byte.
        use sha2::Digest;
        let d = sha2::Sha256::new()
            .chain_update(b"test key")
            .chain_update(b)
            .finalize();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&d[..TAG_LEN]);
        t
    }

    fn head(seq: u64, dir: Dir) -> ProbeHead {
        ProbeHead {
            link: 7,
            dir,
            seq,
            tx: [1; 12],
        }
    }

    fn verify(d: &[u8], p: &Probe) -> bool {
        tag(signed(d)) == p.tag
    }

    #[test]
    fn probes_round_trip_and_the_tag_covers_everything_before_it() {
        let h = head(42, Dir::High);
        let p = ping(&h, tag);
        assert_eq!(p.len(), PING_LEN);
        let Some(PathPacket::Ping(probe)) = decode(&p).unwrap() else {
            panic!("not a ping")
        };
        assert_eq!(
            (probe.link, probe.dir, probe.seq, probe.tx, probe.tag),
            (7, Dir::High, 42, [1; 12], tag(signed(&p)))
        );
        for observed in ["198.18.0.1:4433", "[fd00::1]:9"] {
            let observed: SocketAddr = observed.parse().unwrap();
            let q = pong(&head(3, Dir::Low), observed, tag);
            let Some(PathPacket::Pong { probe, observed: o }) = decode(&q).unwrap() else {
                panic!("not a pong")
            };
            assert_eq!(
                (probe.link, probe.dir, probe.seq, o, probe.tag),
                (7, Dir::Low, 3, observed, tag(signed(&q)))
            );
        }
        // Every byte before the tag is covered: flipping any one breaks it.
        for i in 0..PROBE_LEN - TAG_LEN {
            let mut f = p.clone();
            f[i] ^= 1;
            if let Ok(Some(PathPacket::Ping(x) | PathPacket::Pong { probe: x, .. })) = decode(&f) {
                assert!(!verify(&f, &x), "byte {i} is not covered");
            }
        }
    }

    #[test]
    fn a_pong_is_never_larger_than_the_ping_that_drew_it() {
        let p = ping(&head(1, Dir::Low), tag);
        for observed in ["198.18.0.1:1", "[fd00::1]:65535"] {
            let q = pong(&head(1, Dir::High), observed.parse().unwrap(), tag);
            assert!(q.len() <= p.len(), "{} > {}", q.len(), p.len());
        }
        // Relayed, both get the same relay header.
        assert_eq!(PING_LEN, PONG_LEN);
    }

    #[test]
    fn a_replayed_ping_is_refused_and_a_reordered_one_is_not() {
        let mut g = ProbeGuard::new(Dir::Low);
        let admit = |g: &mut ProbeGuard, seq: u64| {
            let d = ping(&head(seq, Dir::Low), tag);
            let Ok(Some(PathPacket::Ping(p))) = decode(&d) else {
                panic!("ping")
            };
            g.admit(&p, verify(&d, &p))
        };
        assert_eq!(admit(&mut g, 5), Ok(Fresh::Newest));
        assert_eq!(
            admit(&mut g, 5),
            Err(ProbeRefusal::Replayed),
            "the same bytes again"
        );
        // Its twin: an older counter never seen (reordered on another route) is answered,
        // but is not the newest.
        assert_eq!(admit(&mut g, 3), Ok(Fresh::Reordered));
        assert_eq!(admit(&mut g, 3), Err(ProbeRefusal::Replayed));
        assert_eq!(admit(&mut g, 6), Ok(Fresh::Newest));
        assert_eq!(g.newest(), 6);
    }

    #[test]
    fn a_forged_probe_does_not_move_the_window() {
        let mut g = ProbeGuard::new(Dir::Low);
        let d = ping(&head(9, Dir::Low), tag);
        let Ok(Some(PathPacket::Ping(p))) = decode(&d) else {
            panic!("ping")
        };
        assert_eq!(g.admit(&p, false), Err(ProbeRefusal::BadTag));
        assert_eq!(g.newest(), 0, "an unauthenticated counter is not recorded");
        assert_eq!(g.admit(&p, true), Ok(Fresh::Newest));
    }

    #[test]
    fn a_reflected_probe_is_refused() {
        // A's ping to B, sent back at A unchanged: A expects B's direction.
        let from_a = ping(&head(1, Dir::Low), tag);
        let Ok(Some(PathPacket::Ping(p))) = decode(&from_a) else {
            panic!("ping")
        };
        let mut at_a = ProbeGuard::new(Dir::High);
        assert_eq!(
            at_a.admit(&p, verify(&from_a, &p)),
            Err(ProbeRefusal::WrongDirection)
        );
        // The ping turned into a pong (type byte rewritten, the padding made an address):
        // the tag covers the type, so it no longer verifies.
        let mut as_pong = from_a.clone();
        as_pong[3] = T_PONG;
        assert_eq!(decode(&as_pong), Err(PathError::Family(0)));
        as_pong[O_ADDR] = 4;
        let Ok(Some(PathPacket::Pong { probe, .. })) = decode(&as_pong) else {
            panic!("pong")
        };
        let mut at_b = ProbeGuard::new(Dir::Low);
        assert_eq!(
            at_b.admit(&probe, verify(&as_pong, &probe)),
            Err(ProbeRefusal::BadTag)
        );
    }

    #[test]
    fn the_window_refuses_what_fell_behind_it_and_survives_jumps() {
        let mut w = ReplayWindow::new();
        assert_eq!(
            w.accept(0),
            Err(ProbeRefusal::Replayed),
            "counters start at 1"
        );
        assert_eq!(w.accept(1), Ok(Fresh::Newest));
        assert_eq!(w.accept(REPLAY_WINDOW), Ok(Fresh::Newest));
        // 1 is the oldest the window still holds: seen.
        assert_eq!(w.accept(1), Err(ProbeRefusal::Replayed));
        assert_eq!(w.accept(REPLAY_WINDOW + 1), Ok(Fresh::Newest));
        // Now 1 is a whole window behind: too old; 2 is inside and unseen.
        assert_eq!(w.accept(1), Err(ProbeRefusal::TooOld));
        assert_eq!(w.accept(2), Ok(Fresh::Reordered));
        // A jump past the whole window clears it; the slots it wraps onto are free.
        let top = 10 * REPLAY_WINDOW + 3;
        assert_eq!(w.accept(top), Ok(Fresh::Newest));
        assert_eq!(w.accept(top - 1), Ok(Fresh::Reordered));
        assert_eq!(w.accept(top - REPLAY_WINDOW + 1), Ok(Fresh::Reordered));
        assert_eq!(w.accept(top - REPLAY_WINDOW), Err(ProbeRefusal::TooOld));
        // Sliding forward one by one forgets the slot a counter reuses.
        let mut w = ReplayWindow::new();
        for s in 1..=3 * REPLAY_WINDOW {
            assert_eq!(w.accept(s), Ok(Fresh::Newest));
        }
        for s in 2 * REPLAY_WINDOW + 1..=3 * REPLAY_WINDOW {
            assert_eq!(w.accept(s), Err(ProbeRefusal::Replayed), "{s}");
        }
        assert_eq!(w.accept(u64::MAX), Ok(Fresh::Newest));
        assert_eq!(w.accept(u64::MAX), Err(ProbeRefusal::Replayed));
    }

    #[test]
    fn version_1_probes_and_unknown_versions_are_told_apart() {
        // A version 1 ping (40 bytes, type 3).
        let mut v1 = MAGIC.to_vec();
        v1.push(3);
        v1.extend_from_slice(&[0; 36]);
        assert_eq!(decode(&v1), Err(PathError::OldProbe(3)));
        assert_eq!(PathError::OldProbe(3).refusal(), ProbeRefusal::Version);
        let mut p = ping(&head(1, Dir::Low), tag);
        p[O_VERSION] = 3;
        assert_eq!(decode(&p), Err(PathError::Version(3)));
        let mut p = ping(&head(1, Dir::Low), tag);
        p[O_DIR] = 2;
        assert_eq!(decode(&p), Err(PathError::Direction(2)));
        let mut p = ping(&head(1, Dir::Low), tag);
        p[O_ADDR + 3] = 1;
        assert_eq!(decode(&p), Err(PathError::Padding));
        assert_eq!(PathError::Padding.refusal(), ProbeRefusal::Malformed);
    }

    #[test]
    fn relay_header_is_rewritten_in_place() {
        let to = PeerId::of(&NodeName::new("b").unwrap());
        let from = PeerId::of(&NodeName::new("a").unwrap());
        assert_ne!(to, from);
        let mut d = relay_send_header(to).to_vec();
        d.extend_from_slice(b"\x40quic");
        assert_eq!(
            decode(&d).unwrap(),
            Some(PathPacket::RelaySend {
                to,
                payload: b"\x40quic"
            })
        );
        relay_rewrite(&mut d, from);
        assert_eq!(
            decode(&d).unwrap(),
            Some(PathPacket::RelayRecv {
                from,
                payload: b"\x40quic"
            })
        );
    }

    #[test]
    fn an_authenticated_relay_header_carries_its_token_and_delivers_a_plain_one() {
        let (to, from) = (PeerId(2), PeerId(1));
        let mut d = relay_send_auth_header(to, 0xfeed_beef).to_vec();
        d.extend_from_slice(b"\x40quic");
        assert_eq!(
            decode(&d).unwrap(),
            Some(PathPacket::RelaySendAuth {
                to,
                token: 0xfeed_beef,
                payload: b"\x40quic"
            })
        );
        let out = relay_auth_rewrite(&mut d, from).to_vec();
        assert_eq!(out.len(), RELAY_HEADER + 5);
        assert_eq!(
            decode(&out).unwrap(),
            Some(PathPacket::RelayRecv {
                from,
                payload: b"\x40quic"
            })
        );
        // A header with nothing after it, or cut short, is refused; rewriting one gives
        // nothing to send.
        let bare = relay_send_auth_header(to, 1);
        assert_eq!(decode(&bare), Err(PathError::Short(RELAY_AUTH_HEADER)));
        assert_eq!(decode(&bare[..15]), Err(PathError::Short(15)));
        let mut cut = bare;
        assert!(relay_auth_rewrite(&mut cut[..15], from).is_empty());
    }

    #[test]
    fn directions_follow_the_names() {
        let a = NodeName::new("a").unwrap();
        let b = NodeName::new("b").unwrap();
        assert_eq!(Dir::of(&a, &b), Dir::Low);
        assert_eq!(Dir::of(&b, &a), Dir::High);
        assert_eq!(Dir::of(&a, &b).reverse(), Dir::of(&b, &a));
    }

    #[test]
    fn quic_is_not_a_path_packet_and_garbage_is_an_error() {
        assert_eq!(decode(&[0x40, 0, 0, 0, 1]).unwrap(), None);
        assert_eq!(decode(&[0xc0, 0, 0, 0, 1]).unwrap(), None);
        assert_eq!(decode(&[0, 1, 2, 3]).unwrap(), None);
        assert_eq!(decode(&[0]), Err(PathError::Short(1)));
        assert_eq!(
            decode(&[0, b'q', b'm', 99]),
            Err(PathError::UnknownType(99))
        );
        assert_eq!(decode(&[0, b'q', b'm', T_PING]), Err(PathError::Short(4)));
        assert_eq!(
            decode(&relay_send_header(PeerId(1))),
            Err(PathError::Short(12))
        );
        let mut p = ping(&head(1, Dir::Low), tag);
        p.push(0);
        assert!(matches!(decode(&p), Err(PathError::Length { .. })));
        let mut q = pong(&head(1, Dir::Low), "198.18.0.1:1".parse().unwrap(), tag);
        q[O_ADDR] = 5;
        assert_eq!(decode(&q), Err(PathError::Family(5)));
    }

    #[test]
    fn path_segments_are_taken_out_and_quic_segments_packed_in_order() {
        // Three segments of 4 bytes and a short last one: QUIC, path, QUIC, path.
        let mut buf = vec![
            0x41, 1, 1, 1, 0, b'q', b'm', 7, 0x42, 2, 2, 2, 0, b'q', 0, 0,
        ];
        let mut taken = Vec::new();
        let kept = take_path_segments(&mut buf, 15, 4, |s| taken.push(s.to_vec()));
        assert_eq!(kept, 8);
        assert_eq!(&buf[..8], &[0x41, 1, 1, 1, 0x42, 2, 2, 2]);
        assert_eq!(taken, vec![vec![0, b'q', b'm', 7], vec![0, b'q', 0]]);
        // A stride of 0 is one segment; a length past the buffer is cut to it.
        let mut one = vec![0x40, 9];
        assert_eq!(take_path_segments(&mut one, 99, 0, |_| panic!()), 2);
    }

    #[test]
    fn an_opener_is_exactly_four_bytes() {
        assert_eq!(decode(&OPENER).unwrap(), Some(PathPacket::Open));
        assert!(is_path_packet(&OPENER));
        let mut long = OPENER.to_vec();
        long.push(0);
        assert_eq!(
            decode(&long),
            Err(PathError::Length {
                ty: T_OPEN,
                len: 5,
                want: 4
            })
        );
    }
}
