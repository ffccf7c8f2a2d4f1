//! Getting through a port-dependent NAT (a new public port for every destination), where
//! the peer's NAT only lets in packets from addresses its side sent to first.
//!
//! The side behind the port-dependent NAT opens [`SPARE_SOCKETS`] sockets and pings the
//! peer from each: its NAT opens that many mappings toward the peer, on ports nobody can
//! predict. The other side sprays pings at [`SPRAY`] random ports of this side's public
//! address. With 256 open ports among ~64,000, 2,048 probes find one with probability
//! 1 - (1 - 256/64512)^2048 ≈ 99.97 % (the birthday paradox). A spray ping arriving on a
//! spare socket is answered from it; that socket joins the tunnel socket
//! ([`super::Paths::add_extra`]) and carries the tunnel from then on; the rest close.
//!
//! The spare sockets' pings leave with a TTL of [`super::OPENER_TTL`]: they need to open
//! this side's NAT only, and one that reached the peer's NAT, where that NAT takes
//! unsolicited packets for itself (Linux's default INPUT policy), would leave a conntrack
//! entry on the very tuple the peer's spray needs. For the second half of the attempt they
//! ping at the system's TTL (a NAT two hops away, behind another NAT, is opened then); the
//! socket that wins gets its TTL back.
//!
//! Every probe is authenticated with the tunnel's key and numbered from the link's counter
//! ([`super::probe::Prober`]): a stranger's packets arriving on a spare socket are
//! ignored, and the manager refuses a replayed one.

use std::net::SocketAddr;
use std::task::Poll;
use std::time::Duration;

use quicmesh_protocol::path::{self as pp, PathPacket};

use super::probe::Prober;

/// Sockets the port-dependent side opens per attempt.
pub const SPARE_SOCKETS: usize = 256;
/// Probes the other side sprays per attempt.
pub const SPRAY: usize = 2048;
/// How long the spare sockets wait for a probe.
pub const ATTEMPT_FOR: Duration = Duration::from_secs(8);
/// Spare sockets ping the peer this often (keeps their mappings open).
const RESEND: Duration = Duration::from_millis(500);

/// A spare socket an authenticated probe came in on.
#[derive(Debug)]
pub struct Won {
    pub link: u64,
    pub socket: std::net::UdpSocket,
    pub from: SocketAddr,
    pub datagram: Vec<u8>,
}

/// Opens the spare sockets, pings `targets` from each until [`ATTEMPT_FOR`] passes, and
/// returns the first socket an authenticated probe of the link arrives on.
pub async fn spare_sockets(prober: Prober, targets: Vec<SocketAddr>) -> Option<Won> {
    let link = prober.link();
    let mut socks = Vec::with_capacity(SPARE_SOCKETS);
    // A new socket's TTL (the system default), for the socket that wins.
    let mut own_ttl = 64;
    for _ in 0..SPARE_SOCKETS {
        match tokio::net::UdpSocket::bind(("0.0.0.0", 0)).await {
            Ok(s) => {
                own_ttl = s.ttl().unwrap_or(own_ttl);
                let _ = s.set_ttl(u32::from(super::OPENER_TTL));
                socks.push(s)
            }
            Err(e) => {
                tracing::debug!(error = %e, "spare socket");
                break;
            }
        }
    }
    if socks.is_empty() {
        return None;
    }
    let deadline = tokio::time::Instant::now() + ATTEMPT_FOR;
    let full_ttl_at = deadline - ATTEMPT_FOR / 2;
    let mut full_ttl = false;
    let mut resend = tokio::time::interval(RESEND);
    let mut buf = vec![0u8; 2048];
    loop {
        let got = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return None,
            _ = resend.tick() => {
                if !full_ttl && tokio::time::Instant::now() >= full_ttl_at {
                    full_ttl = true;
                    for s in &socks {
                        let _ = s.set_ttl(own_ttl);
                    }
                }
                for s in &socks {
                    for t in &targets {
                        let d = prober.ping(rand::random());
                        let _ = s.try_send_to(&d, *t);
                    }
                }
                continue;
            }
            got = std::future::poll_fn(|cx| {
                for (i, s) in socks.iter().enumerate() {
                    let mut rb = tokio::io::ReadBuf::new(&mut buf);
                    if let Poll::Ready(Ok(from)) = s.poll_recv_from(cx, &mut rb) {
                        return Poll::Ready((i, from, rb.filled().to_vec()));
                    }
                }
                Poll::Pending
            }) => got,
        };
        let (i, from, datagram) = got;
        let probe = match pp::decode(&datagram) {
            Ok(Some(PathPacket::Ping(p))) | Ok(Some(PathPacket::Pong { probe: p, .. })) => p,
            _ => continue,
        };
        if !prober.is_peers(&datagram, &probe) {
            continue;
        }
        let socket = socks.swap_remove(i).into_std().ok()?;
        // The tunnel's datagrams leave at the system's default TTL.
        socket.set_ttl(own_ttl).ok()?;
        return Some(Won {
            link,
            socket,
            from,
            datagram,
        });
    }
}
