//! A rogue peer for tests: certificates minted to order (foreign CA, self-signed, expired,
//! not yet valid, valid but for other services) and a QUIC client that presents one at a
//! node's tunnel port and asks for a flow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quicmesh_node::frame::{read_frame, write_frame};
use quicmesh_node::tls::{self, CertSlot, MeshServerVerifier, ServerExpect, Trust};
use quicmesh_protocol::ident::{ServiceName, TrustDomain};
use quicmesh_protocol::wire::{StreamHeader, StreamReply, ALPN_TUNNEL};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};

use crate::harness::CoordinatorProc;

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ts(t: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t).unwrap()
}

/// A certificate (DER) and its private key (PKCS#8 DER).
pub type CertAndKey = (Vec<u8>, Vec<u8>);

/// A CA that can sign leaves (the mesh's, read from the coordinator's data dir, or a foreign one).
#[allow(missing_debug_implementations)]
pub struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
}

pub fn foreign_ca() -> Issuer {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "quicmesh CA quicmesh.local");
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    Issuer { cert, key }
}

pub fn mesh_ca(coord: &CoordinatorProc) -> Issuer {
    let cert_pem = std::fs::read_to_string(coord.data_dir.join("ca.crt")).unwrap();
    let key = KeyPair::from_pem(&std::fs::read_to_string(coord.data_dir.join("ca.key")).unwrap())
        .unwrap();
    let cert = CertificateParams::from_ca_cert_pem(&cert_pem)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    Issuer { cert, key }
}

/// A leaf for `node` speaking for `services`, valid over [from, to]; self-signed when
/// `issuer` is None.
pub fn leaf(
    issuer: Option<&Issuer>,
    node: &str,
    services: &[&str],
    from: i64,
    to: i64,
) -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, node);
    let mut sans = vec![SanType::URI(
        format!("spiffe://quicmesh.local/node/{node}")
            .try_into()
            .unwrap(),
    )];
    for s in services {
        sans.push(SanType::URI(
            format!("spiffe://quicmesh.local/svc/{s}")
                .try_into()
                .unwrap(),
        ));
    }
    p.subject_alt_names = sans;
    p.not_before = ts(from);
    p.not_after = ts(to);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = match issuer {
        Some(i) => p.signed_by(&key, &i.cert, &i.key).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    (cert.der().to_vec(), key.serialize_der())
}

/// What a rogue client observed.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The connection failed (handshake refused).
    Refused,
    /// A stream was answered.
    Reply(StreamReply),
}

/// Presents `(cert, key)` at `target` (node `db-1`) and asks for web -> db.
pub async fn present(
    target: SocketAddr,
    ca_der: &[u8],
    cert: (Vec<u8>, Vec<u8>),
    claim: &str,
) -> Outcome {
    let trust = Arc::new(arc_swap_shim(
        Trust::new(
            TrustDomain::new("quicmesh.local").unwrap(),
            &[ca_der.to_vec()],
            [],
        )
        .unwrap(),
    ));
    let verifier = MeshServerVerifier::new(Some(trust), ServerExpect::Node, Arc::new(|_| {}));
    let slot = CertSlot::with(vec![cert.0], &cert.1).unwrap();
    let cfg = tls::client_config(Some(slot), verifier, ALPN_TUNNEL).unwrap();
    let ep = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
    let attempt = async {
        let conn = ep
            .connect_with(cfg, target, "db-1")
            .map_err(|_| ())?
            .await
            .map_err(|_| ())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|_| ())?;
        let h = StreamHeader {
            src_service: ServiceName::new(claim).unwrap(),
            dst_service: ServiceName::new("db").unwrap(),
            flow_id: 1,
        };
        write_frame(&mut send, &h).await.map_err(|_| ())?;
        match read_frame::<StreamReply, _>(&mut recv).await {
            Ok(Some(r)) => Ok(r),
            _ => Err(()),
        }
    };
    let out = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(r)) => Outcome::Reply(r),
        _ => Outcome::Refused,
    };
    ep.close(0u32.into(), b"done");
    out
}

fn arc_swap_shim(t: Trust) -> arc_swap::ArcSwap<Trust> {
    arc_swap::ArcSwap::from_pointee(t)
}

/// Crafted overlay packets a rogue host writes past its own stack: IPv6 with extension
/// headers, sent through a raw socket (`IPPROTO_RAW`: the header is ours) so they leave
/// by the route to `dst`, the node's TUN device.
pub mod crafted {
    use std::io::Read;
    use std::net::{Ipv6Addr, SocketAddrV6};
    use std::time::{Duration, Instant};

    use socket2::{Domain, Protocol, SockAddr, Socket, Type};

    fn checksum(parts: &[&[u8]]) -> u16 {
        let mut sum: u32 = 0;
        for part in parts {
            for c in part.chunks(2) {
                sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A TCP SYN from `src:sport` to `dst:dport` wrapped in an atomic fragment (a
    /// fragment header with offset 0 and M=0): a whole packet, which a firewall that does
    /// not walk extension headers sees as protocol 44 with no ports.
    pub fn atomic_fragment_syn(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&0x5eed_0001u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02;
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
        let pseudo = [
            &src.octets()[..],
            &dst.octets()[..],
            &(tcp.len() as u32).to_be_bytes()[..],
            &[0, 0, 0, 6][..],
        ]
        .concat();
        let c = checksum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        let frag = [6u8, 0, 0, 0, 0, 0, 0x51, 0x7e];
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((frag.len() + tcp.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[44, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&frag);
        p.extend_from_slice(&tcp);
        p
    }

    /// Sends `packet` (a whole IPv6 packet) towards `dst`, then counts the TCP SYN-ACKs
    /// from port `from_port` that arrive within `wait`. Run it in the sender's namespace.
    pub fn send_and_count_syn_acks(
        packet: &[u8],
        dst: Ipv6Addr,
        from_port: u16,
        wait: Duration,
    ) -> std::io::Result<usize> {
        let listen = Socket::new(
            Domain::IPV6,
            Type::from(libc::SOCK_RAW),
            Some(Protocol::TCP),
        )?;
        listen.set_read_timeout(Some(Duration::from_millis(100)))?;
        let raw = Socket::new(
            Domain::IPV6,
            Type::from(libc::SOCK_RAW),
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        raw.send_to(packet, &SockAddr::from(SocketAddrV6::new(dst, 0, 0, 0)))?;
        let (mut n, t, mut buf) = (0, Instant::now(), [0u8; 2048]);
        while t.elapsed() < wait {
            // IPv6 raw sockets deliver from the transport header on.
            if let Ok(len) = (&listen).read(&mut buf) {
                let sport = u16::from_be_bytes([buf[0], buf[1]]);
                if len >= 20 && sport == from_port && buf[13] & 0x12 == 0x12 {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}
