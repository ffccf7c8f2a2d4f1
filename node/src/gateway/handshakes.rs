//! The WireGuard gateway's port, and its handshakes read apart from the data.
//!
//! The port is one SO_REUSEPORT group of two sockets, and a classic BPF program steers
//! each datagram by its WireGuard message type: data messages to the socket the runtime
//! reads (the data path), everything else (handshakes, cookies, whatever a flood sends)
//! to a socket read by a thread of its own, at a lower priority. There the [`wg::Gate`]
//! answers a flood with cookies or drops it, taking no lock the data path holds; what it
//! admits is queued for its session on the runtime.
//!
//! The group admits only sockets of the same user (the kernel's rule for SO_REUSEPORT),
//! and the port is taken once without it first, so another gateway on it is refused. A
//! process running as the node's own user could still join the group and take part of
//! the port's traffic: that user already holds the node's keys, and is trusted as the node.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::WgGateway;
use crate::clock::unix_now;
use crate::overlay::{Overlay, Sender};
use crate::reason::WgDrop;
use crate::state::Node;
use crate::wg;

/// The index a [`STEER`] program returns for the data socket; anything else goes to the
/// socket bound after it.
const DATA_SOCKET: u32 = 0;

/// Classic BPF for the port's SO_REUSEPORT group, run on each datagram's UDP payload: a
/// transport data message (type 4) to the data socket, everything else (handshakes,
/// cookies, whatever a flood sends) to the handshake socket. A datagram too short to have
/// a type fails the load, which returns 0: the data socket, where it is dropped.
const STEER: [(u16, u8, u8, u32); 4] = [
    // ld b[0]
    (0x30, 0, 0, 0),
    // jeq #4, next, skip one
    (0x15, 0, 1, 4),
    // ret #DATA_SOCKET
    (0x06, 0, 0, DATA_SOCKET),
    // ret #1
    (0x06, 0, 0, 1),
];

/// Binds the gateway's port: a socket for data messages, read by the runtime, and when
/// the kernel steers by message type (SO_REUSEPORT with [`STEER`]), a second socket on the
/// same port for the rest, read by a thread of its own. A handshake flood then costs the
/// data path nothing: no slot in its batched reads, no turn of its loop, no wait on the
/// sessions' lock while cookies are made. Where steering is refused, one socket takes
/// everything (as before). A port in use is refused as ever: it is taken once without
/// SO_REUSEPORT first, so a second gateway on it fails instead of sharing its traffic.
pub(super) fn bind(
    listen: SocketAddr,
) -> std::io::Result<(std::net::UdpSocket, Option<std::net::UdpSocket>)> {
    let probe = std::net::UdpSocket::bind(listen)?;
    let addr = probe.local_addr()?;
    drop(probe);
    let steered = || -> std::io::Result<(std::net::UdpSocket, std::net::UdpSocket)> {
        let data = reuse_port_socket(addr)?;
        let filter: Vec<nix::libc::sock_filter> = STEER
            .iter()
            .map(|&(code, jt, jf, k)| nix::libc::sock_filter { code, jt, jf, k })
            .collect();
        let prog = nix::libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        nix::sys::socket::setsockopt(&data, nix::sys::socket::sockopt::AttachReusePortCbpf, &prog)?;
        let handshakes = reuse_port_socket(addr)?;
        Ok((data, handshakes))
    };
    match steered() {
        Ok((data, handshakes)) => Ok((data, Some(handshakes))),
        Err(e) => {
            tracing::warn!(%addr, error = %e, "WireGuard handshakes cannot be steered to a socket of their own; one socket takes everything");
            Ok((std::net::UdpSocket::bind(addr)?, None))
        }
    }
}

/// A UDP socket bound to `addr` in the port's SO_REUSEPORT group.
fn reuse_port_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::ReusePort, &true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// How much the handshake thread yields to the data path when the CPU is short (a nice
/// value, on this thread alone): its weight is a tenth of the data path's, so a flood
/// cannot take a core's worth from the clients' traffic. It takes no lock the data path
/// waits on for long (the gate's counts only, never the sessions'), so its lower priority
/// never holds the data path up.
const HANDSHAKE_NICE: i32 = 10;

/// Datagrams the handshake thread admitted, queued for their sessions on the runtime: a
/// flood gets at most [`wg::HANDSHAKES_PER_SECOND`] a second past the gate (more only from
/// sources that proved their address, each within its own limit).
const SESSIONS_QUEUE: usize = 1024;

/// A datagram the gate admitted on the handshake thread.
struct Admitted {
    from: SocketAddr,
    admitted: wg::Admitted,
    datagram: Vec<u8>,
}

/// Starts the handshake thread on `socket` and the task that takes what it admits to the
/// sessions. Where the thread cannot start, its socket closes with it and the kernel
/// steers everything to the data socket again, where handshakes are taken as well.
pub(super) fn start(
    node: Arc<Node>,
    ov: Arc<Overlay>,
    g: Arc<WgGateway>,
    socket: std::net::UdpSocket,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(SESSIONS_QUEUE);
    let gw = g.clone();
    match std::thread::Builder::new()
        .name("wg-handshakes".into())
        .spawn(move || handshake_loop(gw, socket, tx))
    {
        Ok(_) => {
            tokio::spawn(sessions_loop(node, ov, g, rx));
        }
        Err(e) => {
            tracing::warn!(error = %e, "WireGuard handshakes: no thread of their own; taken with the data")
        }
    }
}

/// Handshakes, cookies and whatever else is no data message, on their own socket and
/// thread: the [`wg::Gate`] (a flood is answered with cookies or dropped here, without the
/// sessions' lock), then what it admitted is queued for its session on the runtime. The
/// socket takes GRO like the data socket (the kernel picks by hash which one decides
/// whether a flow is coalesced), so a batch is split here; a data message in one (a batch
/// led by a handshake) is dropped and counted, never queued.
fn handshake_loop(
    g: Arc<WgGateway>,
    socket: std::net::UdpSocket,
    tx: tokio::sync::mpsc::Sender<Admitted>,
) {
    // quinn-udp's state turns GRO on and the socket non-blocking; this thread waits in
    // its reads, so blocking again.
    let state = match quinn_udp::UdpSocketState::new((&socket).into())
        .and_then(|s| socket.set_nonblocking(false).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "WireGuard handshake socket: no receive path; handshakes taken with the data");
            return;
        }
    };
    if let Err(e) = rustix::process::nice(HANDSHAKE_NICE) {
        tracing::debug!(error = %e, "WireGuard handshake thread keeps its priority");
    }
    g.handshakes_apart.store(true, Ordering::Relaxed);
    tracing::info!("WireGuard handshakes read on a socket and thread of their own");
    // Sends never wait on a full socket: a reply lost is a handshake retried.
    let send = |to: SocketAddr, b: &[u8]| {
        let s = socket2::SockRef::from(&socket);
        if let Err(e) = s.send_to_with_flags(b, &to.into(), nix::libc::MSG_DONTWAIT) {
            tracing::debug!(%to, error = %e, "WireGuard handshake datagram not sent");
        }
    };
    let mut buf = vec![0u8; (state.gro_segments() * 1500).max(64 * 1024)];
    let mut meta = [quinn_udp::RecvMeta::default()];
    let mut out = vec![0u8; wg::BUFFER];
    loop {
        // One read at a time on a blocking socket (a batched read would wait for a full
        // batch); each may be a GRO batch of one source's datagrams.
        let got = {
            let mut slices = [std::io::IoSliceMut::new(&mut buf)];
            state.recv((&socket).into(), &mut slices, &mut meta)
        };
        match got {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::debug!(error = %e, "WireGuard handshake receive");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        }
        let m = meta[0];
        let data = buf.get(..m.len).unwrap_or_default();
        for dgram in data.chunks(m.stride.max(1)) {
            let admitted = match g
                .gate
                .check(m.addr, dgram, unix_now().max(0) as u64, &mut out)
            {
                Ok(a) => a,
                Err(r) => {
                    g.refused(m.addr, r, &out, send);
                    continue;
                }
            };
            // Only a GRO batch led by a handshake brings one here; queued, any number of
            // them would bypass every limit on the way to the sessions.
            if admitted.is_data() {
                g.count(WgDrop::Misrouted);
                continue;
            }
            let item = Admitted {
                from: m.addr,
                admitted,
                datagram: dgram.to_vec(),
            };
            match tx.try_send(item) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => g.count(WgDrop::Backlog),
                // The runtime is gone: so is the node.
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    g.handshakes_apart.store(false, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// What the handshake thread admitted, taken by its session under the sessions' lock
/// (answers leave from the data socket: the same port).
async fn sessions_loop(
    node: Arc<Node>,
    ov: Arc<Overlay>,
    g: Arc<WgGateway>,
    mut rx: tokio::sync::mpsc::Receiver<Admitted>,
) {
    let mut out = vec![0u8; wg::BUFFER];
    let mut sender = Sender::default();
    let mut gro = tun_rs::GROTable::default();
    while let Some(a) = rx.recv().await {
        let view = node.view();
        super::admitted_datagram(
            &node,
            &ov,
            &g,
            &view,
            unix_now().max(0) as u64,
            a.from,
            a.admitted,
            &a.datagram,
            &mut out,
            &mut sender,
            &mut gro,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What `sock` received until it has been quiet for 200 ms: each datagram's first byte.
    fn drain(sock: &std::net::UdpSocket) -> Vec<u8> {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 256];
        while let Ok(n) = sock.recv(&mut b) {
            got.push(if n == 0 { 0xff } else { b[0] });
        }
        got.sort();
        got
    }

    /// The kernel steers by message type, whatever the source: data messages (type 4) to
    /// the data socket, handshakes, cookies and junk to the handshake socket, an empty
    /// datagram (no type) to the data socket. Without the program, the group spreads
    /// datagrams by source and this fails.
    #[test]
    fn handshakes_and_data_reach_their_own_sockets_from_any_source() {
        let (data, handshakes) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let handshakes = handshakes.expect("steering is supported here");
        let to = data.local_addr().unwrap();
        assert_eq!(handshakes.local_addr().unwrap(), to, "one port");
        for _ in 0..16 {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            for first in [4u8, 1, 2, 3, b'G'] {
                s.send_to(&[first, 0, 0, 0, 9, 9], to).unwrap();
            }
            s.send_to(&[], to).unwrap();
        }
        let mut want_data = vec![4u8; 16];
        want_data.extend([0xff; 16]);
        let mut want_hs: Vec<u8> = [1u8, 2, 3, b'G'].repeat(16);
        want_hs.sort();
        assert_eq!(drain(&data), want_data, "the data socket");
        assert_eq!(drain(&handshakes), want_hs, "the handshake socket");
    }

    /// Denied twin: a second gateway on a port in use fails to bind, as it did with one
    /// socket, instead of joining the group and taking a share of the first one's traffic;
    /// so does any other program.
    #[test]
    fn a_second_gateway_on_the_same_port_is_refused() {
        let (data, _handshakes) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = bind(data.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        // Nor does any other program bind it (without SO_REUSEPORT, as most do).
        let err = std::net::UdpSocket::bind(data.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    }
}
