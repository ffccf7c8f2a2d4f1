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
//! - `Ping` / `Pong`: path probes between the two ends of one tunnel. `link` names the
//!   tunnel (both ends derive it, with the tag key, from the connection's TLS exporter);
//!   `tx` is random and echoed; the pong carries the address the ping came from. The tag is
//!   computed by the caller over [`signed`] with the link's key: nothing here holds keys.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::ident::NodeName;

/// First bytes of every path packet (the zero byte is never the start of a QUIC packet).
pub const MAGIC: [u8; 3] = [0x00, b'q', b'm'];
/// Length of a relay header (magic, type, peer id).
pub const RELAY_HEADER: usize = 12;
/// Length of a probe's authentication tag.
pub const TAG_LEN: usize = 16;

const T_RELAY_SEND: u8 = 1;
const T_RELAY_RECV: u8 = 2;
const T_PING: u8 = 3;
const T_PONG: u8 = 4;

/// Length of a ping on the wire.
pub const PING_LEN: usize = 4 + 8 + 12 + TAG_LEN;
/// Length of a pong on the wire.
pub const PONG_LEN: usize = 4 + 8 + 12 + 19 + TAG_LEN;

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

/// A path probe (ping or pong).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Which tunnel the probe belongs to.
    pub link: u64,
    /// Random, echoed by the pong.
    pub tx: [u8; 12],
    pub tag: [u8; TAG_LEN],
}

/// A decoded path packet (borrowing the datagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathPacket<'a> {
    RelaySend { to: PeerId, payload: &'a [u8] },
    RelayRecv { from: PeerId, payload: &'a [u8] },
    Ping(Probe),
    Pong { probe: Probe, observed: SocketAddr },
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
        T_PING | T_PONG => {
            let want = if ty == T_PING { PING_LEN } else { PONG_LEN };
            if d.len() != want {
                return Err(PathError::Length {
                    ty,
                    len: d.len(),
                    want,
                });
            }
            let mut tx = [0u8; 12];
            tx.copy_from_slice(&d[12..24]);
            let mut tag = [0u8; TAG_LEN];
            tag.copy_from_slice(&d[want - TAG_LEN..]);
            let probe = Probe {
                link: id(d).0,
                tx,
                tag,
            };
            if ty == T_PING {
                return Ok(Some(PathPacket::Ping(probe)));
            }
            let a = &d[24..43];
            let port = u16::from_be_bytes([a[17], a[18]]);
            let ip = match a[0] {
                4 => IpAddr::V4(Ipv4Addr::new(a[1], a[2], a[3], a[4])),
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

/// The bytes a probe's tag covers (everything before the tag).
pub fn signed(datagram: &[u8]) -> &[u8] {
    &datagram[..datagram.len().saturating_sub(TAG_LEN)]
}

fn header(ty: u8, id: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(ty);
    out.extend_from_slice(&id.to_be_bytes());
}

/// Writes a relay header in front of a payload: `RelaySend { to }`.
pub fn relay_send_header(to: PeerId) -> [u8; RELAY_HEADER] {
    let mut h = [0u8; RELAY_HEADER];
    h[..3].copy_from_slice(&MAGIC);
    h[3] = T_RELAY_SEND;
    h[4..].copy_from_slice(&to.0.to_be_bytes());
    h
}

/// Turns a `RelaySend` datagram into the `RelayRecv` the relay delivers, in place.
pub fn relay_rewrite(datagram: &mut [u8], from: PeerId) {
    if datagram.len() >= RELAY_HEADER {
        datagram[3] = T_RELAY_RECV;
        datagram[4..RELAY_HEADER].copy_from_slice(&from.0.to_be_bytes());
    }
}

/// Encodes a ping; `tag` computes the tag over the signed bytes.
pub fn ping(link: u64, tx: [u8; 12], tag: impl FnOnce(&[u8]) -> [u8; TAG_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PING_LEN);
    header(T_PING, link, &mut out);
    out.extend_from_slice(&tx);
    let t = tag(&out);
    out.extend_from_slice(&t);
    out
}

/// Encodes a pong to a ping that came from `observed`.
pub fn pong(
    link: u64,
    tx: [u8; 12],
    observed: SocketAddr,
    tag: impl FnOnce(&[u8]) -> [u8; TAG_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(PONG_LEN);
    header(T_PONG, link, &mut out);
    out.extend_from_slice(&tx);
    let mut a = [0u8; 19];
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
        let mut t = [0u8; TAG_LEN];
        for (i, x) in b.iter().enumerate() {
            t[i % TAG_LEN] ^= x;
        }
        t
    }

    #[test]
    fn probes_round_trip_and_the_tag_covers_everything_before_it() {
        let p = ping(7, [1; 12], tag);
        assert_eq!(p.len(), PING_LEN);
        let Some(PathPacket::Ping(probe)) = decode(&p).unwrap() else {
            panic!("not a ping")
        };
        assert_eq!(
            (probe.link, probe.tx, probe.tag),
            (7, [1; 12], tag(signed(&p)))
        );
        for observed in ["198.18.0.1:4433", "[fd00::1]:9"] {
            let observed: SocketAddr = observed.parse().unwrap();
            let q = pong(9, [2; 12], observed, tag);
            let Some(PathPacket::Pong { probe, observed: o }) = decode(&q).unwrap() else {
                panic!("not a pong")
            };
            assert_eq!((probe.link, o, probe.tag), (9, observed, tag(signed(&q))));
        }
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
    fn quic_is_not_a_path_packet_and_garbage_is_an_error() {
        assert_eq!(decode(&[0x40, 0, 0, 0, 1]).unwrap(), None);
        assert_eq!(decode(&[0xc0, 0, 0, 0, 1]).unwrap(), None);
        assert_eq!(decode(&[0, 1, 2, 3]).unwrap(), None);
        assert_eq!(decode(&[0]), Err(PathError::Short(1)));
        assert_eq!(
            decode(&[0, b'q', b'm', 99]),
            Err(PathError::UnknownType(99))
        );
        assert_eq!(
            decode(&relay_send_header(PeerId(1))),
            Err(PathError::Short(12))
        );
        let mut p = ping(1, [0; 12], tag);
        p.push(0);
        assert!(matches!(decode(&p), Err(PathError::Length { .. })));
        let mut q = pong(1, [0; 12], "198.18.0.1:1".parse().unwrap(), tag);
        q[24] = 5;
        assert_eq!(decode(&q), Err(PathError::Family(5)));
    }
}
