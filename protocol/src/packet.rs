//! IP packets as overlay mode sees them: just enough of IPv4/IPv6 and their transport
//! headers to route a packet to a peer and to firewall it (addresses, protocol, ports,
//! ICMP echo identifiers, the flow an ICMP error quotes, fragments), the port specs
//! services declare (`tcp/5432`, `udp/53`, `icmp`), and the ICMP "too big" answers sent
//! when a packet does not fit the path. Pure and allocation-free apart from building an
//! ICMP answer.
//!
//! IPv6 extension headers (hop-by-hop, routing, fragment, destination options) and AH,
//! in IPv4 too, are walked to the transport header, at most [`MAX_EXT_HEADERS`] of them
//! in at most [`MAX_EXT_BYTES`] bytes. What cannot be classified is an error the
//! firewall drops, never a packet with a guessed transport: a truncated chain or
//! transport header (a "tiny" first fragment included), a chain too long, a header this
//! parser does not walk (mobility, HIP, shim6, experimental), hop-by-hop anywhere but
//! first, a second fragment header, and a routing header with segments left (its real
//! destination is not the packet's). ESP is opaque: `Other { proto: 50 }`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// IP protocol numbers overlay mode knows by name.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
/// IPv6 extension headers and IPsec.
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const ESP: u8 = 50;
pub const AH: u8 = 51;
pub const NO_NEXT_HEADER: u8 = 59;
pub const DEST_OPTIONS: u8 = 60;

/// Most extension headers walked before the transport.
pub const MAX_EXT_HEADERS: usize = 8;
/// Most bytes of extension headers walked before the transport.
pub const MAX_EXT_BYTES: usize = 512;

/// Why bytes are not a packet overlay mode can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is not 4 or 6")]
    Version(u8),
    #[error("packet shorter than its headers")]
    Truncated,
    #[error("IPv4 header length {0} is invalid")]
    HeaderLength(usize),
    #[error("extension headers truncated")]
    ChainTruncated,
    #[error("transport header truncated")]
    TransportTruncated,
    #[error("more than {MAX_EXT_HEADERS} extension headers")]
    TooManyHeaders,
    #[error("extension headers longer than {MAX_EXT_BYTES} bytes")]
    ChainTooLong,
    #[error("extension header {0} is not walked")]
    UnknownHeader(u8),
    #[error("extension header {0} out of place")]
    MisplacedHeader(u8),
    #[error("routing header with segments left")]
    SegmentsLeft,
}

impl PacketError {
    /// Whether the packet's IP header was read but its transport could not be found:
    /// the firewall's "unclassifiable", as opposed to bytes that are not a packet.
    pub fn unclassifiable(&self) -> bool {
        !matches!(
            self,
            PacketError::Empty
                | PacketError::Version(_)
                | PacketError::Truncated
                | PacketError::HeaderLength(_)
        )
    }
}

/// The transport-level identity of a packet: what the connection tracker keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP or UDP with ports. `syn` is set on a TCP SYN without ACK (a new connection).
    Ports {
        proto: u8,
        src: u16,
        dst: u16,
        syn: bool,
        /// A TCP segment with RST: the end of a connection, never a sign it completed.
        rst: bool,
    },
    /// ICMP / ICMPv6 other than an error: echo request or reply with its identifier, or
    /// another informational type.
    Icmp { echo: Option<Echo>, kind: u8 },
    /// An ICMP / ICMPv6 error (destination unreachable, packet too big, time exceeded,
    /// parameter problem) and the flow of the packet it quotes, when that is readable.
    IcmpError { kind: u8, quoted: Option<Quoted> },
    /// A fragment other than the first: no transport header ([`PacketInfo::fragment`]
    /// says which datagram).
    Fragment { proto: u8 },
    /// Any other protocol: only its number is known.
    Other { proto: u8 },
}

/// An ICMP echo: request or reply, and its identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Echo {
    pub request: bool,
    pub id: u16,
}

/// The packet an ICMP error quotes, as its sender sent it: addresses, protocol and ports
/// (an echo's identifier as both ports, its protocol ICMP or ICMPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quoted {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// A fragment of a larger datagram (not an atomic fragment, which is a whole packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// The datagram's identification (16 bits in IPv4).
    pub id: u32,
    /// The protocol every fragment of the datagram carries: IPv4's protocol field, the
    /// next header of IPv6's fragment header (not the transport when AH or destination
    /// options come between).
    pub proto: u8,
    /// Offset in 8-byte units: 0 on the first fragment, which carries the transport.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    /// On the first fragment: the 8-byte units of the fragmentable part up to the end of
    /// the transport header it was classified by. A later fragment starting below this
    /// would overwrite that header on reassembly.
    pub header_units: u16,
}

/// What a packet says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    /// IPv4 "don't fragment" (always true for IPv6, where routers never fragment).
    pub dont_fragment: bool,
    /// Set when the packet is one fragment of several.
    pub fragment: Option<Fragment>,
}

fn be16(b: &[u8], at: usize) -> Result<u16, PacketError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(PacketError::Truncated)
}

/// The transport header bytes the classification reads (a whole header, so a first
/// fragment cannot split it).
fn header_len(proto: u8) -> usize {
    match proto {
        TCP => 20,
        UDP | ICMP | ICMPV6 => 8,
        _ => 0,
    }
}

/// ICMP error types: IPv4 destination unreachable, time exceeded, parameter problem;
/// ICMPv6 destination unreachable, packet too big, time exceeded, parameter problem.
fn icmp_error(v6: bool, kind: u8) -> bool {
    if v6 {
        matches!(kind, 1..=4)
    } else {
        matches!(kind, 3 | 11 | 12)
    }
}

/// Reads the transport header of protocol `proto` from `l4`. A quoted packet (inside an
/// ICMP error) needs only its ports, and is not itself searched for a quote.
#[inline(always)]
fn transport(proto: u8, l4: &[u8], v6: bool, quoted: bool) -> Result<Transport, PacketError> {
    let icmp = if v6 { ICMPV6 } else { ICMP };
    match proto {
        TCP | UDP => {
            let need = if quoted { 4 } else { header_len(proto) };
            if l4.len() < need {
                return Err(PacketError::TransportTruncated);
            }
            let flags = if proto == TCP {
                l4.get(13).copied().unwrap_or(0)
            } else {
                0
            };
            Ok(Transport::Ports {
                proto,
                src: u16::from_be_bytes([l4[0], l4[1]]),
                dst: u16::from_be_bytes([l4[2], l4[3]]),
                syn: flags & 0x12 == 0x02,
                rst: flags & 0x04 != 0,
            })
        }
        p if p == icmp => {
            if l4.len() < 8 {
                return Err(PacketError::TransportTruncated);
            }
            let kind = l4[0];
            if icmp_error(v6, kind) {
                if quoted {
                    // An error quoting an error: never sent, never matched.
                    return Ok(Transport::Icmp { echo: None, kind });
                }
                return Ok(Transport::IcmpError {
                    kind,
                    quoted: quote(&l4[8..], v6),
                });
            }
            let (req, rep) = if v6 { (128, 129) } else { (8, 0) };
            let echo = (kind == req || kind == rep).then(|| Echo {
                request: kind == req,
                id: u16::from_be_bytes([l4[4], l4[5]]),
            });
            Ok(Transport::Icmp { echo, kind })
        }
        _ => Ok(Transport::Other { proto }),
    }
}

/// The flow of the packet an ICMP error quotes: the same IP version, its transport's
/// ports or echo identifier readable. Never inlined: it closes the recursion (an error's
/// quote is parsed by the same code), which would otherwise keep the per-packet path
/// from being inlined into one function.
#[cold]
#[inline(never)]
fn quote(q: &[u8], v6: bool) -> Option<Quoted> {
    let i = headers(q, true).ok()?;
    if i.src.is_ipv6() != v6 {
        return None;
    }
    let (proto, src_port, dst_port) = match i.transport {
        Transport::Ports {
            proto, src, dst, ..
        } => (proto, src, dst),
        Transport::Icmp { echo: Some(e), .. } => (if v6 { ICMPV6 } else { ICMP }, e.id, e.id),
        _ => return None,
    };
    Some(Quoted {
        src: i.src,
        dst: i.dst,
        proto,
        src_port,
        dst_port,
    })
}

/// Walks the headers after the fixed IP header (`at`, `next`) to the transport: AH in
/// IPv4; hop-by-hop (first only), routing (no segments left), fragment (once),
/// destination options and AH in IPv6. `fragment` is IPv4's (from its header), or set
/// here from IPv6's fragment header.
#[inline(always)]
fn walk(
    p: &[u8],
    mut at: usize,
    mut next: u8,
    v6: bool,
    quoted: bool,
    mut fragment: Option<Fragment>,
) -> Result<(Transport, Option<Fragment>), PacketError> {
    let start = at;
    // Where the fragmentable part begins (after IPv6's fragment header).
    let mut frag_start = at;
    let mut seen_fragment_header = false;
    for count in 0.. {
        let len = match next {
            AH => {
                let h = p.get(at..at + 2).ok_or(PacketError::ChainTruncated)?;
                (usize::from(h[1]) + 2) * 4
            }
            HOP_BY_HOP | ROUTING | DEST_OPTIONS | FRAGMENT if v6 => {
                let h = p.get(at..at + 2).ok_or(PacketError::ChainTruncated)?;
                if next == FRAGMENT {
                    8
                } else {
                    (usize::from(h[1]) + 1) * 8
                }
            }
            // Mobility, HIP, shim6, experimental: extension headers not walked here.
            135 | 139 | 140 | 253 | 254 if v6 => return Err(PacketError::UnknownHeader(next)),
            _ => break,
        };
        if count >= MAX_EXT_HEADERS {
            return Err(PacketError::TooManyHeaders);
        }
        if at + len - start > MAX_EXT_BYTES {
            return Err(PacketError::ChainTooLong);
        }
        let h = p.get(at..at + len).ok_or(PacketError::ChainTruncated)?;
        match next {
            HOP_BY_HOP if at != start => return Err(PacketError::MisplacedHeader(next)),
            ROUTING if h[3] != 0 => return Err(PacketError::SegmentsLeft),
            FRAGMENT => {
                if seen_fragment_header {
                    return Err(PacketError::MisplacedHeader(next));
                }
                seen_fragment_header = true;
                let off = u16::from_be_bytes([h[2], h[3]]);
                let (offset, more) = (off >> 3, off & 1 != 0);
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                if offset != 0 {
                    let f = Fragment {
                        id,
                        proto: h[0],
                        offset,
                        more,
                        header_units: 0,
                    };
                    return Ok((Transport::Fragment { proto: h[0] }, Some(f)));
                }
                frag_start = at + len;
                // An atomic fragment (offset 0, no more) is a whole packet.
                fragment = more.then_some(Fragment {
                    id,
                    proto: h[0],
                    offset: 0,
                    more,
                    header_units: 0,
                });
            }
            _ => {}
        }
        next = h[0];
        at += len;
    }
    let l4 = p.get(at..).unwrap_or_default();
    let t = transport(next, l4, v6, quoted)?;
    if let Some(f) = fragment.as_mut() {
        let end = at - frag_start + header_len(next);
        f.header_units = u16::try_from(end.div_ceil(8)).unwrap_or(u16::MAX);
    }
    Ok((t, fragment))
}

/// Parses the headers of an IPv4 or IPv6 packet.
#[inline]
pub fn parse(p: &[u8]) -> Result<PacketInfo, PacketError> {
    headers(p, false)
}

#[inline(always)]
fn headers(p: &[u8], quoted: bool) -> Result<PacketInfo, PacketError> {
    let first = *p.first().ok_or(PacketError::Empty)?;
    match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 {
                return Err(PacketError::HeaderLength(ihl));
            }
            if p.len() < ihl {
                return Err(PacketError::Truncated);
            }
            let flags_frag = be16(p, 6)?;
            let (offset, more) = (flags_frag & 0x1fff, flags_frag & 0x2000 != 0);
            let src = IpAddr::from(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            let dst = IpAddr::from(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
            let fragment = (offset != 0 || more).then(|| Fragment {
                id: u32::from(u16::from_be_bytes([p[4], p[5]])),
                proto: p[9],
                offset,
                more,
                header_units: 0,
            });
            let (transport, fragment) = if offset != 0 {
                (Transport::Fragment { proto: p[9] }, fragment)
            } else {
                walk(p, ihl, p[9], false, quoted, fragment)?
            };
            Ok(PacketInfo {
                src,
                dst,
                transport,
                dont_fragment: flags_frag & 0x4000 != 0,
                fragment,
            })
        }
        6 => {
            if p.len() < 40 {
                return Err(PacketError::Truncated);
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&p[8..24]);
            let src = Ipv6Addr::from(a);
            a.copy_from_slice(&p[24..40]);
            let dst = Ipv6Addr::from(a);
            let (transport, fragment) = walk(p, 40, p[6], true, quoted, None)?;
            Ok(PacketInfo {
                src: src.into(),
                dst: dst.into(),
                transport,
                dont_fragment: true,
                fragment,
            })
        }
        v => Err(PacketError::Version(v)),
    }
}

/// What a service accepts in overlay mode: `tcp/5432`, `udp/53`, `tcp/8000-8099`, `icmp`
/// (echo requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum PortSpec {
    Tcp { from: u16, to: u16 },
    Udp { from: u16, to: u16 },
    Icmp,
}

/// A port spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("port spec {spec:?}: {reason} (expected tcp/PORT, udp/PORT, tcp/FROM-TO or icmp)")]
pub struct PortSpecError {
    pub spec: String,
    pub reason: &'static str,
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| PortSpecError {
            spec: s.to_string(),
            reason,
        };
        if s == "icmp" {
            return Ok(PortSpec::Icmp);
        }
        let (proto, ports) = s.split_once('/').ok_or_else(|| err("no protocol"))?;
        let port = |p: &str| -> Result<u16, PortSpecError> {
            match p.parse::<u16>() {
                Ok(0) => Err(err("port 0")),
                Ok(v) => Ok(v),
                Err(_) => Err(err("port is not a number from 1 to 65535")),
            }
        };
        let (from, to) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(ports)?;
                (p, p)
            }
        };
        if from > to {
            return Err(err("range runs backwards"));
        }
        match proto {
            "tcp" => Ok(PortSpec::Tcp { from, to }),
            "udp" => Ok(PortSpec::Udp { from, to }),
            _ => Err(err("protocol is not tcp, udp or icmp")),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (p, from, to) = match self {
            PortSpec::Icmp => return f.write_str("icmp"),
            PortSpec::Tcp { from, to } => ("tcp", from, to),
            PortSpec::Udp { from, to } => ("udp", from, to),
        };
        if from == to {
            write!(f, "{p}/{from}")
        } else {
            write!(f, "{p}/{from}-{to}")
        }
    }
}

impl PortSpec {
    /// Whether a packet opening a flow with `t` is for this spec.
    pub fn matches(&self, t: &Transport) -> bool {
        match (self, t) {
            (
                PortSpec::Tcp { from, to },
                Transport::Ports {
                    proto: TCP, dst, ..
                },
            )
            | (
                PortSpec::Udp { from, to },
                Transport::Ports {
                    proto: UDP, dst, ..
                },
            ) => (*from..=*to).contains(dst),
            (
                PortSpec::Icmp,
                Transport::Icmp {
                    echo: Some(Echo { request: true, .. }),
                    ..
                },
            ) => true,
            _ => false,
        }
    }
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ICMP answer to `packet` not fitting a path of `mtu` bytes: IPv4 "fragmentation
/// needed" (type 3 code 4) or ICMPv6 "packet too big" (type 2), from `from` (the address
/// the packet was for, so the sender's stack takes it as coming from the path) to the
/// packet's source, quoting as much of the packet as the rules allow. `None` for a packet
/// that must not be answered (not parseable, or itself an ICMP error).
pub fn too_big(packet: &[u8], mtu: u16) -> Option<Vec<u8>> {
    let info = parse(packet).ok()?;
    if let Transport::Icmp { echo: None, .. } | Transport::IcmpError { .. } = info.transport {
        return None; // never answer an ICMP error (or other non-echo ICMP) with another
    }
    match (info.src, info.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let quote = &packet[..packet.len().min(548)];
            let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
            icmp.extend_from_slice(&mtu.to_be_bytes());
            icmp.extend_from_slice(quote);
            let c = checksum(&[&icmp]);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            let total = (20 + icmp.len()) as u16;
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0, 0, 64, ICMP, 0, 0]);
            ip.extend_from_slice(&dst.octets());
            ip.extend_from_slice(&src.octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip.extend_from_slice(&icmp);
            Some(ip)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            // An IPv6 path is at least 1280 bytes: below that the answer would be ignored.
            let mtu = u32::from(mtu.max(1280));
            let quote = &packet[..packet.len().min(1280 - 40 - 8)];
            let mut icmp = vec![2u8, 0, 0, 0];
            icmp.extend_from_slice(&mtu.to_be_bytes());
            icmp.extend_from_slice(quote);
            let len = icmp.len() as u32;
            let pseudo: Vec<u8> = [
                &dst.octets()[..],
                &src.octets()[..],
                &len.to_be_bytes()[..],
                &[0, 0, 0, ICMPV6][..],
            ]
            .concat();
            let c = checksum(&[&pseudo, &icmp]);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[ICMPV6, 64]);
            ip.extend_from_slice(&dst.octets());
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&icmp);
            Some(ip)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(proto: u8, l4: &[u8], flags_frag: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        p.extend_from_slice(&flags_frag.to_be_bytes());
        p.extend_from_slice(&[64, proto, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2]);
        let c = checksum(&[&p]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    fn tcp(src: u16, dst: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&src.to_be_bytes());
        t[2..4].copy_from_slice(&dst.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    #[test]
    fn tcp_syn_and_ports_are_read() {
        let p = v4(TCP, &tcp(40000, 5432, 0x02), 0x4000);
        let i = parse(&p).unwrap();
        assert_eq!(i.src, IpAddr::from([100, 64, 0, 1]));
        assert_eq!(
            i.transport,
            Transport::Ports {
                proto: TCP,
                src: 40000,
                dst: 5432,
                syn: true,
                rst: false
            }
        );
        assert!(i.dont_fragment);
        // SYN+ACK is a reply, not a new connection.
        let p = v4(TCP, &tcp(5432, 40000, 0x12), 0);
        assert!(matches!(
            parse(&p).unwrap().transport,
            Transport::Ports { syn: false, .. }
        ));
        // A non-first fragment carries no ports.
        let p = v4(TCP, &tcp(1, 2, 2), 0x0010);
        assert_eq!(
            parse(&p).unwrap().transport,
            Transport::Fragment { proto: TCP }
        );
        assert_eq!(parse(&p).unwrap().dst, IpAddr::from([100, 64, 0, 2]));
    }

    #[test]
    fn bad_packets_get_typed_errors() {
        assert_eq!(parse(&[]), Err(PacketError::Empty));
        assert_eq!(parse(&[0x55]), Err(PacketError::Version(5)));
        assert_eq!(parse(&[0x41; 30]), Err(PacketError::HeaderLength(4)));
        assert_eq!(parse(&[0x45, 0, 0]), Err(PacketError::Truncated));
        assert_eq!(parse(&[0x60; 39]), Err(PacketError::Truncated));
        assert_eq!(parse(&[0x45; 10]), Err(PacketError::Truncated));
    }

    #[test]
    fn port_specs_parse_match_and_print() {
        let s: PortSpec = "tcp/5432".parse().unwrap();
        let t = |proto, dst| Transport::Ports {
            proto,
            src: 1000,
            dst,
            syn: true,
            rst: false,
        };
        assert!(s.matches(&t(TCP, 5432)));
        assert!(!s.matches(&t(UDP, 5432)), "udp is not tcp");
        assert!(!s.matches(&t(TCP, 5433)));
        let r: PortSpec = "udp/8000-8099".parse().unwrap();
        assert!(r.matches(&t(UDP, 8050)) && !r.matches(&t(UDP, 8100)));
        assert_eq!(r.to_string(), "udp/8000-8099");
        let i: PortSpec = "icmp".parse().unwrap();
        let echo = |request| Transport::Icmp {
            echo: Some(Echo { request, id: 7 }),
            kind: if request { 8 } else { 0 },
        };
        assert!(i.matches(&echo(true)) && !i.matches(&echo(false)));
        for bad in ["tcp", "tcp/0", "tcp/70000", "sctp/1", "tcp/9-1", "udp/x"] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn too_big_answers_quote_the_packet_with_valid_checksums() {
        let p = v4(TCP, &tcp(40000, 5432, 0x10), 0x4000);
        let a = too_big(&p, 1200).unwrap();
        let i = parse(&a).unwrap();
        // From the destination back to the sender, ICMP type 3 code 4, MTU 1200.
        assert_eq!(
            (i.src, i.dst),
            (IpAddr::from([100, 64, 0, 2]), IpAddr::from([100, 64, 0, 1]))
        );
        assert_eq!(&a[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([a[26], a[27]]), 1200);
        assert_eq!(checksum(&[&a[..20]]), 0, "IPv4 header checksum");
        assert_eq!(checksum(&[&a[20..]]), 0, "ICMP checksum");
        assert_eq!(&a[28..], &p[..]);
        // Never an ICMP error about an ICMP error.
        assert_eq!(too_big(&a, 1200), None);
    }

    #[test]
    fn too_big_v6_has_a_valid_pseudo_header_checksum() {
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::2".parse().unwrap();
        let l4 = tcp(40000, 80, 0x10);
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[TCP, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&l4);
        let a = too_big(&p, 1000).unwrap();
        let i = parse(&a).unwrap();
        assert_eq!((i.src, i.dst), (IpAddr::V6(dst), IpAddr::V6(src)));
        assert_eq!(a[40], 2);
        assert_eq!(
            u32::from_be_bytes([a[44], a[45], a[46], a[47]]),
            1280,
            "clamped to the IPv6 minimum"
        );
        let pseudo: Vec<u8> = [
            &dst.octets()[..],
            &src.octets()[..],
            &((a.len() - 40) as u32).to_be_bytes()[..],
            &[0, 0, 0, ICMPV6][..],
        ]
        .concat();
        assert_eq!(checksum(&[&pseudo, &a[40..]]), 0);
    }
    /// An IPv6 packet from fd00::1 to fd00::2 whose first next header is `next`, with
    /// `chain` (extension headers, their next-header bytes set by the caller) then `l4`.
    fn v6(next: u8, chain: &[u8], l4: &[u8]) -> Vec<u8> {
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::2".parse().unwrap();
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(chain);
        p.extend_from_slice(l4);
        p
    }

    /// An 8-byte option header (hop-by-hop, destination options) followed by `next`.
    fn opts(next: u8) -> [u8; 8] {
        [next, 0, 1, 4, 0, 0, 0, 0]
    }

    fn frag(next: u8, offset: u16, more: bool, id: u32) -> [u8; 8] {
        let o = (offset << 3) | u16::from(more);
        let [a, b] = o.to_be_bytes();
        let [c, d, e, f] = id.to_be_bytes();
        [next, 0, a, b, c, d, e, f]
    }

    #[test]
    fn ipv6_extension_headers_are_walked_to_the_transport() {
        let syn = tcp(40000, 22, 0x02);
        let want = Transport::Ports {
            proto: TCP,
            src: 40000,
            dst: 22,
            syn: true,
            rst: false,
        };
        // The attack of issue 15: an atomic fragment (offset 0, M=0) wrapping a SYN was
        // `Other { proto: 44 }`; it is the SYN it carries, and a whole packet.
        let atomic = v6(FRAGMENT, &frag(TCP, 0, false, 7), &syn);
        let i = parse(&atomic).unwrap();
        assert_eq!((i.transport, i.fragment), (want, None));
        // Hop-by-hop, routing (no segments left), destination options, AH, then TCP.
        let mut chain = opts(ROUTING).to_vec();
        chain.extend_from_slice(&[DEST_OPTIONS, 0, 0, 0, 0, 0, 0, 0]);
        chain.extend_from_slice(&opts(AH));
        chain.extend_from_slice(&[TCP, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(
            parse(&v6(HOP_BY_HOP, &chain, &syn)).unwrap().transport,
            want
        );
        // ESP hides the transport: only its number is known.
        assert_eq!(
            parse(&v6(ESP, &[0; 16], &[])).unwrap().transport,
            Transport::Other { proto: ESP }
        );
        assert_eq!(
            parse(&v6(NO_NEXT_HEADER, &[], &[])).unwrap().transport,
            Transport::Other {
                proto: NO_NEXT_HEADER
            }
        );
        // AH in IPv4 too.
        let mut ah = vec![TCP, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
        ah.extend_from_slice(&syn);
        assert_eq!(parse(&v4(AH, &ah, 0)).unwrap().transport, want);
    }

    #[test]
    fn what_cannot_be_classified_is_a_typed_error() {
        let syn = tcp(40000, 22, 0x02);
        let cases: Vec<(Vec<u8>, PacketError)> = vec![
            // The chain ends inside a header.
            (
                v6(DEST_OPTIONS, &[TCP, 1, 0, 0], &[]),
                PacketError::ChainTruncated,
            ),
            (v6(DEST_OPTIONS, &[], &[]), PacketError::ChainTruncated),
            // The transport header is cut: a TCP header of 12 bytes, a tiny first
            // fragment whose ports are in the second.
            (v6(TCP, &[], &syn[..12]), PacketError::TransportTruncated),
            (
                v6(FRAGMENT, &frag(TCP, 0, true, 1), &syn[..8]),
                PacketError::TransportTruncated,
            ),
            (v4(TCP, &syn[..12], 0x2000), PacketError::TransportTruncated),
            (v4(UDP, &[0, 53], 0), PacketError::TransportTruncated),
            // Nine headers.
            (
                v6(DEST_OPTIONS, &[opts(DEST_OPTIONS); 9].concat(), &syn),
                PacketError::TooManyHeaders,
            ),
            // One header of 520 bytes.
            (
                v6(DEST_OPTIONS, &[&[TCP, 64][..], &[0; 518]].concat(), &syn),
                PacketError::ChainTooLong,
            ),
            (v6(135, &opts(TCP), &syn), PacketError::UnknownHeader(135)),
            (
                v6(DEST_OPTIONS, &[opts(HOP_BY_HOP), opts(TCP)].concat(), &syn),
                PacketError::MisplacedHeader(HOP_BY_HOP),
            ),
            (
                v6(
                    FRAGMENT,
                    &[frag(FRAGMENT, 0, false, 1), frag(TCP, 0, false, 2)].concat(),
                    &syn,
                ),
                PacketError::MisplacedHeader(FRAGMENT),
            ),
            // Routing type 4 (segment routing) with one segment left: bound elsewhere.
            (
                v6(
                    ROUTING,
                    &[TCP, 2, 4, 1, 0, 0, 0, 0],
                    &[&[0; 16][..], &syn].concat(),
                ),
                PacketError::SegmentsLeft,
            ),
        ];
        for (p, want) in cases {
            assert_eq!(parse(&p), Err(want), "{p:02x?}");
            assert!(want.unclassifiable());
        }
        assert!(!PacketError::Truncated.unclassifiable());
    }

    #[test]
    fn fragments_say_which_datagram_and_where_its_header_ends() {
        let syn = tcp(40000, 5432, 0x02);
        // IPv6 first fragment: the ports are read; a destination options header after
        // the fragment header counts towards the header end (8 + 20 bytes = 4 units).
        let first = v6(
            FRAGMENT,
            &[frag(DEST_OPTIONS, 0, true, 9), opts(TCP)].concat(),
            &syn,
        );
        let i = parse(&first).unwrap();
        assert!(matches!(i.transport, Transport::Ports { dst: 5432, .. }));
        assert_eq!(
            i.fragment,
            Some(Fragment {
                id: 9,
                proto: DEST_OPTIONS,
                offset: 0,
                more: true,
                header_units: 4
            })
        );
        // A later fragment: no transport, the same id.
        let later = v6(FRAGMENT, &frag(TCP, 185, false, 9), &[0; 16]);
        let i = parse(&later).unwrap();
        assert_eq!(i.transport, Transport::Fragment { proto: TCP });
        assert_eq!(
            i.fragment,
            Some(Fragment {
                id: 9,
                proto: TCP,
                offset: 185,
                more: false,
                header_units: 0
            })
        );
        // IPv4: the first fragment (MF) and an unfragmented packet.
        let i = parse(&v4(UDP, &[0, 1, 0, 53, 0, 8, 0, 0], 0x2000)).unwrap();
        assert_eq!(i.fragment.map(|f| (f.id, f.header_units)), Some((1, 1)));
        assert_eq!(
            parse(&v4(UDP, &[0, 1, 0, 53, 0, 8, 0, 0], 0))
                .unwrap()
                .fragment,
            None
        );
    }

    #[test]
    fn icmp_errors_carry_the_flow_they_quote() {
        // IPv4 port unreachable quoting a UDP packet 100.64.0.2:5000 -> 100.64.0.1:53.
        let mut inner = v4(UDP, &[0x13, 0x88, 0, 53, 0, 8, 0, 0], 0);
        inner[12..20].copy_from_slice(&[100, 64, 0, 2, 100, 64, 0, 1]);
        let err = v4(
            ICMP,
            &[&[3, 3, 0, 0, 0, 0, 0, 0][..], &inner[..28]].concat(),
            0,
        );
        assert_eq!(
            parse(&err).unwrap().transport,
            Transport::IcmpError {
                kind: 3,
                quoted: Some(Quoted {
                    src: IpAddr::from([100, 64, 0, 2]),
                    dst: IpAddr::from([100, 64, 0, 1]),
                    proto: UDP,
                    src_port: 5000,
                    dst_port: 53,
                }),
            }
        );
        // ICMPv6 packet too big quoting a TCP segment behind a destination options
        // header, cut after the ports.
        let seg = v6(DEST_OPTIONS, &opts(TCP), &tcp(40000, 443, 0x10));
        let ptb = v6(
            ICMPV6,
            &[],
            &[&[2, 0, 0, 0, 0, 0, 5, 0][..], &seg[..52]].concat(),
        );
        let Transport::IcmpError {
            kind: 2,
            quoted: Some(q),
        } = parse(&ptb).unwrap().transport
        else {
            panic!("{:?}", parse(&ptb));
        };
        assert_eq!((q.proto, q.src_port, q.dst_port), (TCP, 40000, 443));
        // An echo request quoted: its identifier is both ports.
        let echo = v6(ICMPV6, &[], &[128, 0, 0, 0, 0, 7, 0, 1]);
        let te = v6(
            ICMPV6,
            &[],
            &[&[3, 0, 0, 0, 0, 0, 0, 0][..], &echo[..]].concat(),
        );
        assert!(matches!(
            parse(&te).unwrap().transport,
            Transport::IcmpError {
                quoted: Some(Quoted {
                    proto: ICMPV6,
                    src_port: 7,
                    dst_port: 7,
                    ..
                }),
                ..
            }
        ));
        // Unreadable quotes: too short, another IP version, an error quoting an error.
        for q in [&inner[..22], &seg[..], &err[..]] {
            let e = v4(ICMP, &[&[11, 0, 0, 0, 0, 0, 0, 0][..], q].concat(), 0);
            assert!(
                matches!(
                    parse(&e).unwrap().transport,
                    Transport::IcmpError { quoted: None, .. }
                ),
                "{q:02x?}"
            );
        }
        // Redirects and source quench are not errors that can pass: informational.
        let redirect = v4(
            ICMP,
            &[&[5, 0, 0, 0, 0, 0, 0, 0][..], &inner[..28]].concat(),
            0,
        );
        assert_eq!(
            parse(&redirect).unwrap().transport,
            Transport::Icmp {
                echo: None,
                kind: 5
            }
        );
    }
}
