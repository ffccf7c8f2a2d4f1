//! IP packets as overlay mode sees them: just enough of IPv4/IPv6 and their transport
//! headers to route a packet to a peer and to firewall it (addresses, protocol, ports,
//! ICMP echo identifiers), the port specs services declare (`tcp/5432`, `udp/53`,
//! `icmp`), and the ICMP "too big" answers sent when a packet does not fit the path.
//! Pure and allocation-free apart from building an ICMP answer.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// IP protocol numbers overlay mode knows by name.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

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
    },
    /// ICMP / ICMPv6: echo request or reply with its identifier, or another type.
    Icmp { echo: Option<Echo>, kind: u8 },
    /// Anything else (or a non-first fragment): only the protocol number is known.
    Other { proto: u8 },
}

/// An ICMP echo: request or reply, and its identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Echo {
    pub request: bool,
    pub id: u16,
}

/// What a packet says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    /// IPv4 "don't fragment" (always true for IPv6, where routers never fragment).
    pub dont_fragment: bool,
}

fn be16(b: &[u8], at: usize) -> Result<u16, PacketError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(PacketError::Truncated)
}

fn transport(proto: u8, l4: &[u8], first_fragment: bool) -> Transport {
    if !first_fragment {
        return Transport::Other { proto };
    }
    match proto {
        TCP | UDP => match (be16(l4, 0), be16(l4, 2)) {
            (Ok(src), Ok(dst)) => {
                let syn = proto == TCP && l4.get(13).is_some_and(|f| f & 0x12 == 0x02);
                Transport::Ports {
                    proto,
                    src,
                    dst,
                    syn,
                }
            }
            _ => Transport::Other { proto },
        },
        ICMP | ICMPV6 => {
            let Some(&kind) = l4.first() else {
                return Transport::Other { proto };
            };
            let (req, rep) = if proto == ICMP { (8, 0) } else { (128, 129) };
            let echo = if kind == req || kind == rep {
                be16(l4, 4).ok().map(|id| Echo {
                    request: kind == req,
                    id,
                })
            } else {
                None
            };
            Transport::Icmp { echo, kind }
        }
        _ => Transport::Other { proto },
    }
}

/// Parses the headers of an IPv4 or IPv6 packet.
pub fn parse(p: &[u8]) -> Result<PacketInfo, PacketError> {
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
            let first_fragment = flags_frag & 0x1fff == 0;
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            Ok(PacketInfo {
                src: src.into(),
                dst: dst.into(),
                transport: transport(p[9], &p[ihl..], first_fragment),
                dont_fragment: flags_frag & 0x4000 != 0,
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
            // Extension headers are not walked: hop-by-hop, routing, fragment and
            // destination options leave the transport as `Other`.
            Ok(PacketInfo {
                src: src.into(),
                dst: dst.into(),
                transport: transport(p[6], &p[40..], true),
                dont_fragment: true,
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
    if let Transport::Icmp { echo: None, .. } = info.transport {
        return None; // never answer an ICMP error with another
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
                syn: true
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
            Transport::Other { proto: TCP }
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
}
