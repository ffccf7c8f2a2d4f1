//! The WireGuard gateway's port, and its handshakes read apart from the data.
//!
//! The port is one SO_REUSEPORT group of two sockets, and a classic BPF program steers
//! each datagram by its WireGuard message type: data messages to the socket the runtime
//! reads (the data path), everything else (handshakes, cookies, whatever a flood sends)
//! to a socket read by a thread of its own, at a lower priority. There the [`wg::Gate`]
//! answers a flood with cookies or drops it without the sessions' lock; only what it
//! admits reaches a session, briefly under the lock.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{lock, Core, WgGateway};
use crate::clock::unix_now;
use crate::reason::WgDrop;
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
/// cannot take a core's worth from the clients' traffic, and handshakes still have more
/// than they need (one takes well under a millisecond).
const HANDSHAKE_NICE: i32 = 10;

/// Handshakes, cookies and whatever else is no data message, on their own socket and
/// thread: the [`wg::Gate`] without the sessions' lock (a flood is answered with cookies
/// or dropped here), then the session, briefly under the lock, for what it admitted.
pub(super) fn handshake_loop(g: Arc<WgGateway>, socket: std::net::UdpSocket) {
    if let Err(e) = rustix::process::nice(HANDSHAKE_NICE) {
        tracing::debug!(error = %e, "WireGuard handshake thread keeps its priority");
    }
    let gate = lock(&g.core).gw.gate();
    // Sends never wait on a full socket: a reply lost is a handshake retried.
    let send = |to: SocketAddr, b: &[u8]| {
        let s = socket2::SockRef::from(&socket);
        if let Err(e) = s.send_to_with_flags(b, &to.into(), nix::libc::MSG_DONTWAIT) {
            tracing::debug!(%to, error = %e, "WireGuard handshake datagram not sent");
        }
    };
    let mut dgram = vec![0u8; wg::BUFFER];
    let mut out = vec![0u8; wg::BUFFER];
    loop {
        let (n, from) = match socket.recv_from(&mut dgram) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "WireGuard handshake receive");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let dgram = &dgram[..n];
        let admitted = match gate.check(from, dgram, &mut out) {
            Ok(a) => a,
            Err(wg::Refused::Cookie(n)) => {
                g.metrics.cookies.inc();
                send(from, &out[..n]);
                continue;
            }
            Err(wg::Refused::Drop(r)) => {
                g.count(r);
                continue;
            }
        };
        if admitted.is_data() {
            // Steered to the data socket, never here.
            g.count(WgDrop::Malformed);
            continue;
        }
        let now = unix_now().max(0) as u64;
        let mut core = lock(&g.core);
        let Core { gw, buf } = &mut *core;
        let what = gw.take(admitted, from, dgram, now, &mut out);
        g.answer(gw, buf, from, what, send);
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
    /// socket, instead of joining the group and taking a share of the first one's traffic.
    #[test]
    fn a_second_gateway_on_the_same_port_is_refused() {
        let (data, _handshakes) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = bind(data.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    }
}
