//! A rogue peer for tests: certificates minted to order (foreign CA, self-signed, expired,
//! not yet valid, valid but for other services) and a QUIC client that presents one at a
//! node's tunnel port and asks for a flow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quicmesh_node::frame::{read_frame, write_frame};
use quicmesh_node::tls::{self, CertSlot, MeshServerVerifier, ServerExpect, Trust};
use quicmesh_protocol::ident::{ServiceName, TrustDomain};
use quicmesh_protocol::path::PathPacket;
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

/// Presents `(cert, key)` at `target` (node `db-1`) on a fresh connection and asks for
/// `claim` -> db.
pub async fn present(
    target: SocketAddr,
    ca_der: &[u8],
    cert: (Vec<u8>, Vec<u8>),
    claim: &str,
) -> Outcome {
    let rogue = RoguePeer::new(target, "db-1", ca_der, cert);
    match rogue.connect().await {
        Ok(conn) => rogue.ask(&conn, claim, "db").await,
        Err(_) => Outcome::Refused,
    }
}

fn arc_swap_shim(t: Trust) -> arc_swap::ArcSwap<Trust> {
    arc_swap::ArcSwap::from_pointee(t)
}

/// A node's own certificate and key (DER), read from its data dir: a rogue that stole
/// them, or the node itself misbehaving.
pub fn stolen(data_dir: &std::path::Path) -> CertAndKey {
    let cert = pem::parse(std::fs::read_to_string(data_dir.join("node.crt")).unwrap())
        .unwrap()
        .into_contents();
    let key = pem::parse(std::fs::read_to_string(data_dir.join("node.key")).unwrap())
        .unwrap()
        .into_contents();
    (cert, key)
}

/// A peer that keeps its tunnels: holds several QUIC connections to one node with the
/// same certificate and opens streams on each whenever the test asks.
#[allow(missing_debug_implementations)]
pub struct RoguePeer {
    ep: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    target: SocketAddr,
    server_name: String,
}

impl RoguePeer {
    /// A client endpoint presenting `cert` to node `server_name` at `target` (call inside
    /// a tokio runtime: the endpoint lives on it).
    pub fn new(target: SocketAddr, server_name: &str, ca_der: &[u8], cert: CertAndKey) -> Self {
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
        // Unlike a node, the rogue resumes TLS sessions when the server lets it: a resumed
        // handshake would skip the server's client-certificate (and deny list) check.
        let tls =
            tls::rustls_client_config(Some(slot), verifier, ALPN_TUNNEL, tls::KeyExchange::Hybrid)
                .unwrap();
        let cfg = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let ep = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
        Self {
            ep,
            cfg,
            target,
            server_name: server_name.into(),
        }
    }

    /// Opens one more tunnel (a full handshake).
    pub async fn connect(&self) -> anyhow::Result<quinn::Connection> {
        let c = self
            .ep
            .connect_with(self.cfg.clone(), self.target, &self.server_name)?;
        Ok(tokio::time::timeout(Duration::from_secs(10), c).await??)
    }

    /// Asks for `claim -> dst` on `conn`: the node's answer, or `Refused` when the tunnel
    /// is closed or nothing answers.
    pub async fn ask(&self, conn: &quinn::Connection, claim: &str, dst: &str) -> Outcome {
        let attempt = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|_| ())?;
            let h = StreamHeader {
                src_service: ServiceName::new(claim).unwrap(),
                dst_service: ServiceName::new(dst).unwrap(),
                flow_id: 1,
            };
            write_frame(&mut send, &h).await.map_err(|_| ())?;
            match read_frame::<StreamReply, _>(&mut recv).await {
                Ok(Some(r)) => Ok(r),
                _ => Err(()),
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(r)) => Outcome::Reply(r),
            _ => Outcome::Refused,
        }
    }
}

impl Drop for RoguePeer {
    fn drop(&mut self) {
        self.ep.close(0u32.into(), b"done");
    }
}

/// What a hostile enrollment client does once its handshake (without a client
/// certificate) is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// Nothing: an idle connection.
    Idle,
    /// Opens a stream and sends half a frame header, then nothing.
    SilentStream,
    /// Sends a whole enrollment request (an unknown token), never reads the answer and
    /// never closes.
    EnrollAndHold,
}

/// What the hostile clients achieved.
#[derive(Debug, Default)]
pub struct HostileStats {
    /// Handshakes completed.
    pub handshakes: std::sync::atomic::AtomicU64,
    /// Connections that failed before or during the handshake.
    pub failed: std::sync::atomic::AtomicU64,
}

/// Runs `per_source` hostile clients from each of `sources` (cycling through the
/// [`Hostile`] modes) against the coordinator's control listener at `target`, whose CA
/// has SHA-256 `ca_fingerprint`, until `stop` turns true. Each client holds its connection
/// as long as the coordinator lets it and reconnects 2 s after it ends (a bounded load).
pub async fn hostile_enrollers(
    target: SocketAddr,
    ca_fingerprint: [u8; 32],
    sources: Vec<std::net::IpAddr>,
    per_source: usize,
    stats: Arc<HostileStats>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use quicmesh_node::tls::ServerExpect;
    use quicmesh_protocol::ident::{Labels, NodeName};
    use quicmesh_protocol::wire::{ControlUp, EnrollRequest, ALPN_CONTROL};
    use std::sync::atomic::Ordering;
    let modes = [Hostile::Idle, Hostile::SilentStream, Hostile::EnrollAndHold];
    let mut tasks = tokio::task::JoinSet::new();
    for (s, ip) in sources.iter().enumerate() {
        let ep = quinn::Endpoint::client(SocketAddr::new(*ip, 0)).unwrap();
        for i in 0..per_source {
            let mode = modes[(s * per_source + i) % modes.len()];
            let ep = ep.clone();
            let stats = stats.clone();
            let mut stop = stop.clone();
            tasks.spawn(async move {
                let verifier = MeshServerVerifier::new(
                    None,
                    ServerExpect::PinnedCoordinator(ca_fingerprint),
                    Arc::new(|_| {}),
                );
                let cfg =
                    tls::client_config(None, verifier, ALPN_CONTROL, tls::KeyExchange::Hybrid)
                        .unwrap();
                while !*stop.borrow() {
                    let attempt = async {
                        let conn = ep
                            .connect_with(cfg.clone(), target, "coordinator")
                            .ok()?
                            .await
                            .ok()?;
                        stats.handshakes.fetch_add(1, Ordering::Relaxed);
                        // Held until the connection ends: dropping the stream would reset it.
                        let mut _held = None;
                        match mode {
                            Hostile::Idle => {}
                            Hostile::SilentStream => {
                                if let Ok((mut send, recv)) = conn.open_bi().await {
                                    let _ = send.write_all(&[0, 0]).await;
                                    _held = Some((send, recv));
                                }
                            }
                            Hostile::EnrollAndHold => {
                                if let Ok((mut send, recv)) = conn.open_bi().await {
                                    let req = ControlUp::Enroll(EnrollRequest {
                                        secret: format!("{:064x}", rand::random::<u128>()),
                                        node: NodeName::new("hostile").unwrap(),
                                        csr_der: vec![0; 64],
                                        services: vec![],
                                        labels: Labels::default(),
                                    });
                                    let _ = write_frame(&mut send, &req).await;
                                    _held = Some((send, recv));
                                }
                            }
                        }
                        conn.closed().await;
                        Some(())
                    };
                    tokio::select! {
                        r = attempt => {
                            if r.is_none() {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ = stop.changed() => return,
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// A UDP datagram seen on the wire.
#[derive(Debug, Clone)]
pub struct Captured {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// Watches every IPv4 packet crossing namespace `ns` (any interface, either direction)
/// for up to `within` and returns the first UDP datagram `want` accepts: an on-path
/// eavesdropper, for replay attacks.
pub fn capture_udp(
    ns: &str,
    want: impl Fn(&Captured) -> bool + Send + 'static,
    within: Duration,
) -> anyhow::Result<Option<Captured>> {
    crate::topo::in_ns(ns, move || -> anyhow::Result<Option<Captured>> {
        let sock = sniff::Socket::open()?;
        let deadline = std::time::Instant::now() + within;
        let mut buf = vec![0u8; 65536];
        while std::time::Instant::now() < deadline {
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(c) = parse_udp4(&buf[..n]) {
                if want(&c) {
                    return Ok(Some(c));
                }
            }
        }
        Ok(None)
    })?
}

/// An IPv4 packet's UDP datagram, if it is one (not a fragment).
fn parse_udp4(p: &[u8]) -> Option<Captured> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    let frag = u16::from_be_bytes([p[6], p[7]]) & 0x3fff;
    if frag != 0 || total < ihl + 8 {
        return None;
    }
    let ip = |o: usize| std::net::Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let u = &p[ihl..total];
    let port = |o: usize| u16::from_be_bytes([u[o], u[o + 1]]);
    Some(Captured {
        src: SocketAddr::new(ip(12).into(), port(0)),
        dst: SocketAddr::new(ip(16).into(), port(2)),
        payload: u[8..].to_vec(),
    })
}

/// What a replaying attacker got back.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayOutcome {
    /// Datagrams sent.
    pub sent: usize,
    pub sent_bytes: usize,
    /// Datagrams (and bytes) that came back to the attacker's address.
    pub received: usize,
    pub received_bytes: usize,
    /// Of those: path probes (answers to the replay), relayed datagrams (traffic meant
    /// for the node whose packet was replayed).
    pub probes: usize,
    pub relayed: usize,
}

/// From namespace `ns`, sends `payload` to `dst` every `every` for `for_`, counting
/// whatever arrives at the attacker's socket meanwhile (answers, or traffic meant for the
/// node whose packet was replayed).
pub fn replay(
    ns: &str,
    payload: Vec<u8>,
    dst: SocketAddr,
    every: Duration,
    for_: Duration,
) -> anyhow::Result<ReplayOutcome> {
    crate::topo::in_ns(ns, move || -> anyhow::Result<ReplayOutcome> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(5)))?;
        let mut out = ReplayOutcome::default();
        let start = std::time::Instant::now();
        let mut next = start;
        let mut buf = vec![0u8; 65536];
        while start.elapsed() < for_ {
            if std::time::Instant::now() >= next {
                s.send_to(&payload, dst)?;
                out.sent += 1;
                out.sent_bytes += payload.len();
                next += every;
            }
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                out.received += 1;
                out.received_bytes += n;
                match quicmesh_protocol::path::decode(&buf[..n]) {
                    Ok(Some(PathPacket::Ping(_) | PathPacket::Pong { .. })) => out.probes += 1,
                    Ok(Some(PathPacket::RelayRecv { .. })) => out.relayed += 1,
                    _ => {}
                }
            }
        }
        Ok(out)
    })?
}

#[allow(unsafe_code)]
mod sniff {
    //! An AF_PACKET socket seeing every IPv4 packet of its namespace. The only unsafe
    //! code: the syscalls.
    use std::io;

    /// Every protocol: only such sockets see outgoing packets too.
    const ETH_P_ALL: u16 = 0x0003;

    #[derive(Debug)]
    pub struct Socket {
        fd: i32,
    }

    impl Socket {
        pub fn open() -> io::Result<Self> {
            // SAFETY: plain syscalls with valid pointers to locals.
            unsafe {
                // SOCK_DGRAM: the link-layer header is removed; we read network packets
                // (the caller skips what is not IPv4).
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, ETH_P_ALL.to_be() as i32);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                Ok(Self { fd })
            }
        }

        pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        }
    }

    impl Drop for Socket {
        fn drop(&mut self) {
            // SAFETY: fd is ours and closed once.
            unsafe { libc::close(self.fd) };
        }
    }
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
