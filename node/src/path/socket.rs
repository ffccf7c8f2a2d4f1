//! The tunnel socket QUIC runs on: sends each datagram on its tunnel's route, relays for
//! other nodes when this node is a relay, and hands probes to the path manager.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use quicmesh_protocol::path::{self as pp, PathPacket, RELAY_HEADER};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use super::relay_out::{gso_can_follow, RelayOut, MAX_GSO_PAYLOAD};
use super::{Extra, Incoming, Paths, Route, Source, PENDING_MAX};
use crate::reason::RelayDrop;

/// QUIC's socket: the real UDP socket under the route tables.
#[derive(Debug)]
pub struct MeshSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    paths: Arc<Paths>,
    /// Which of main and extra sockets is read first (alternates).
    turn: AtomicBool,
    /// Sends through relays, coalesced.
    out: Arc<RelayOut>,
}

impl MeshSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, paths: Arc<Paths>) -> Arc<Self> {
        let _ = paths.inner.set(inner.clone());
        let out = RelayOut::new(inner.clone(), paths.metrics.clone());
        Arc::new(Self {
            inner,
            paths,
            turn: AtomicBool::new(false),
            out,
        })
    }

    /// Sends `t` wrapped for a relay (coalesced with what follows it, see [`RelayOut`]).
    fn send_relayed(&self, t: &Transmit, relay: SocketAddr, to: pp::PeerId) -> io::Result<()> {
        let (header, hlen) = self.paths.relay_header(relay, to);
        self.out.send(t, relay, to, &header[..hlen])
    }

    /// Handles one path packet found in a received datagram; QUIC datagrams unwrapped
    /// from a relay go to the pending queue.
    fn take_path_packet(
        &self,
        from: SocketAddr,
        socket: u16,
        local: Option<std::net::IpAddr>,
        seg: &mut [u8],
        batch: &mut RelayBatch,
    ) {
        let m = &self.paths.metrics;
        match pp::decode(seg) {
            Ok(Some(PathPacket::RelaySend { to, .. })) => {
                if !self.paths.is_relay {
                    m.relay_dropped(RelayDrop::NotARelay);
                    return;
                }
                let reg = self.paths.registry.load();
                let Some(src) = reg.by_addr.get(&from).copied() else {
                    m.relay_dropped(RelayDrop::SenderNotRegistered);
                    return;
                };
                let Some(dst) = reg.by_id.get(&to).copied() else {
                    m.relay_dropped(RelayDrop::DestinationNotRegistered);
                    return;
                };
                pp::relay_rewrite(seg, src);
                // From the address the destination sends to (a relay with several); with
                // the datagrams of this read going the same way, in one send.
                let to = (dst, reg.locals.get(&to).copied());
                if !batch.append(to, seg) {
                    self.flush(batch);
                    batch.append(to, seg);
                }
            }
            Ok(Some(PathPacket::RelayRecv {
                from: peer,
                payload,
            })) => {
                if !self.paths.relays.load().contains(&from) {
                    m.relay_dropped(RelayDrop::UnknownRelay);
                    return;
                }
                if !self.paths.is_known(peer) {
                    m.relay_dropped(RelayDrop::UnknownPeer);
                    return;
                }
                if pp::is_path_packet(payload) {
                    self.to_manager(
                        Source::Relay {
                            relay: from,
                            from: peer,
                        },
                        payload,
                        None,
                    );
                    return;
                }
                let visible = self.relayed_quic(from, peer, 1);
                let mut q = self.paths.pending.lock().unwrap_or_else(|p| p.into_inner());
                if q.len() < PENDING_MAX {
                    q.push_back((visible, payload.to_vec()));
                }
            }
            Ok(Some(PathPacket::Ping(_) | PathPacket::Pong { .. })) => {
                let source = match socket {
                    0 => Source::Direct(from),
                    s => Source::Punched {
                        addr: from,
                        socket: s,
                    },
                };
                self.to_manager(source, seg, local);
            }
            Ok(Some(PathPacket::Open)) => {
                m.openers_received.inc();
            }
            // Meant for the coordinator's relay: a node never takes one.
            Ok(Some(PathPacket::RelaySendAuth { .. })) => m.relay_dropped(RelayDrop::Malformed),
            Ok(None) => {}
            Err(e @ (pp::PathError::OldProbe(_) | pp::PathError::Version(_))) => {
                m.probe_refused(e.refusal())
            }
            Err(_) => m.relay_dropped(RelayDrop::Malformed),
        }
    }

    /// The visible address QUIC datagrams `peer` sent through `relay` are delivered from
    /// (`count` of them, counted).
    fn relayed_quic(&self, relay: SocketAddr, peer: pp::PeerId, count: usize) -> SocketAddr {
        let visible = self.paths.relayed_visible(peer);
        // A tunnel the peer opens through a relay is answered through that relay until the
        // manager knows better.
        if Paths::is_synth(&visible) && !self.paths.send.load().contains_key(&visible) {
            self.paths
                .set_route(visible, Route::Relay { relay, to: peer });
        }
        self.paths.metrics.relayed_rx.inc_by(count as u64);
        visible
    }

    /// A read of QUIC datagrams that one peer sent through a relay this node uses (the
    /// kernel coalesced them): unwrapped where they lie and handed to QUIC as one entry
    /// from the tunnel's visible address, rather than copied one by one to the pending
    /// queue. False, nothing changed, for anything else (the general path takes it).
    fn unwrap_relayed(&self, buf: &mut [u8], meta: &mut RecvMeta) -> bool {
        let stride = meta.stride.max(1);
        let len = meta.len.min(buf.len());
        if stride <= RELAY_HEADER || len == 0 {
            return false;
        }
        let mut peer = None;
        for seg in buf[..len].chunks(stride) {
            match pp::decode(seg) {
                Ok(Some(PathPacket::RelayRecv { from, payload }))
                    if !pp::is_path_packet(payload) && peer.is_none_or(|p| p == from) =>
                {
                    peer = Some(from)
                }
                _ => return false,
            }
        }
        let Some(peer) = peer else {
            return false;
        };
        if !self.paths.relays.load().contains(&meta.addr) || !self.paths.is_known(peer) {
            return false;
        }
        let n = len.div_ceil(stride);
        let mut out = 0;
        for i in 0..n {
            let (start, end) = (i * stride + RELAY_HEADER, ((i + 1) * stride).min(len));
            buf.copy_within(start..end, out);
            out += end - start;
        }
        meta.len = out;
        meta.stride = stride - RELAY_HEADER;
        meta.addr = self.relayed_quic(meta.addr, peer, n);
        meta.dst_ip = None;
        true
    }

    /// At a relay: a read of datagrams one registered node sent to one other (the kernel
    /// coalesced them) is rewritten where it lies and sent on as it came, in one GSO send,
    /// with no copy. False, nothing changed, for anything else (the general path takes
    /// it, datagram by datagram).
    fn forward_in_place(&self, buf: &mut [u8], meta: &mut RecvMeta) -> bool {
        if !self.paths.is_relay {
            return false;
        }
        let stride = meta.stride.max(1);
        let len = meta.len.min(buf.len());
        if stride <= RELAY_HEADER || len == 0 {
            return false;
        }
        let mut to = None;
        for seg in buf[..len].chunks(stride) {
            match pp::decode(seg) {
                Ok(Some(PathPacket::RelaySend { to: t, .. })) if to.is_none_or(|x| x == t) => {
                    to = Some(t)
                }
                _ => return false,
            }
        }
        let n = len.div_ceil(stride);
        // One send carries at most MAX_GSO_PAYLOAD (the general path splits a larger read).
        let fits = n <= self.inner.max_transmit_segments() && len <= MAX_GSO_PAYLOAD;
        let Some(to) = to.filter(|_| fits) else {
            return false;
        };
        let reg = self.paths.registry.load();
        let (Some(src), Some(dst)) = (reg.by_addr.get(&meta.addr), reg.by_id.get(&to)) else {
            return false;
        };
        for seg in buf[..len].chunks_mut(stride) {
            pp::relay_rewrite(seg, *src);
        }
        let m = &self.paths.metrics;
        let sent = self.inner.try_send(&Transmit {
            destination: *dst,
            src_ip: reg.locals.get(&to).copied(),
            ecn: None,
            contents: &buf[..len],
            segment_size: (n > 1).then_some(stride),
        });
        match sent {
            Ok(()) => {
                m.relay_forwarded.inc_by(n as u64);
                m.relay_forwarded_bytes.inc_by(len as u64);
            }
            Err(_) => {
                for _ in 0..n {
                    m.relay_dropped(RelayDrop::SendFailed);
                }
            }
        }
        meta.len = 0;
        true
    }

    /// Sends what `batch` holds (one GSO send) and empties it.
    fn flush(&self, batch: &mut RelayBatch) {
        let Some((destination, src_ip)) = batch.to else {
            return;
        };
        if batch.count > 0 {
            let m = &self.paths.metrics;
            let r = self.inner.try_send(&Transmit {
                destination,
                src_ip,
                ecn: None,
                contents: &batch.buf,
                segment_size: (batch.count > 1).then_some(batch.seg),
            });
            match r {
                Ok(()) => {
                    m.relay_forwarded.inc_by(batch.count as u64);
                    m.relay_forwarded_bytes.inc_by(batch.buf.len() as u64);
                }
                Err(_) => {
                    for _ in 0..batch.count {
                        m.relay_dropped(RelayDrop::SendFailed);
                    }
                }
            }
        }
        batch.reset(self.inner.max_transmit_segments());
    }

    fn to_manager(&self, source: Source, datagram: &[u8], local: Option<std::net::IpAddr>) {
        let _ = self.paths.probes.try_send(Incoming {
            source,
            datagram: datagram.to_vec(),
            local,
        });
    }

    /// Rewrites one received entry: path packets out, the rest mapped to its tunnel's
    /// visible address.
    fn filter(&self, socket: u16, buf: &mut [u8], meta: &mut RecvMeta) {
        if socket == 0
            && buf.first() == Some(&0)
            && (self.forward_in_place(buf, meta) || self.unwrap_relayed(buf, meta))
        {
            return;
        }
        let stride = meta.stride.max(1);
        let len = meta.len.min(buf.len());
        let any_path = buf[..len].chunks(stride).any(|s| s.first() == Some(&0));
        if any_path {
            let from = meta.addr;
            // Extra sockets are bound to the wildcard and answer from one address.
            let local = (socket == 0).then_some(meta.dst_ip).flatten();
            let mut batch = RelayBatch::new(self.inner.max_transmit_segments());
            meta.len = pp::take_path_segments(buf, len, stride, |seg| {
                self.take_path_packet(from, socket, local, seg, &mut batch)
            });
            self.flush(&mut batch);
        }
        if let Some(v) = self.paths.recv.load().get(&meta.addr) {
            meta.addr = *v;
            // Replies leave from whatever address the kernel picks: the path changed.
            meta.dst_ip = None;
        }
    }
}

impl MeshSocket {
    fn poll_extras(
        &self,
        extras: &HashMap<u16, Arc<Extra>>,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Option<Poll<io::Result<usize>>> {
        for (id, s) in extras.iter() {
            if let Poll::Ready(Ok(n)) = s.quic.poll_recv(cx, bufs, meta) {
                for i in 0..n {
                    self.filter(*id, &mut bufs[i], &mut meta[i]);
                }
                return Some(Poll::Ready(Ok(n)));
            }
        }
        None
    }
}

/// Datagrams a relay forwards from one read (the kernel coalesces a sender's datagrams):
/// those bound for one destination, of one length (the last may be shorter), go out in
/// one GSO send rather than one send each.
#[derive(Debug)]
struct RelayBatch {
    to: Option<(SocketAddr, Option<std::net::IpAddr>)>,
    buf: Vec<u8>,
    seg: usize,
    count: usize,
    max: usize,
}

impl RelayBatch {
    fn new(max_segments: usize) -> Self {
        Self {
            to: None,
            buf: Vec::new(),
            seg: 0,
            count: 0,
            max: max_segments.max(1),
        }
    }

    fn reset(&mut self, max_segments: usize) {
        self.to = None;
        self.buf.clear();
        self.seg = 0;
        self.count = 0;
        self.max = max_segments.max(1);
    }

    /// Adds `d` for `to`; false when it cannot join what is held (send that first).
    fn append(&mut self, to: (SocketAddr, Option<std::net::IpAddr>), d: &[u8]) -> bool {
        if self.count == 0 {
            self.to = Some(to);
            self.seg = d.len();
        } else if self.to != Some(to)
            || d.len() > self.seg
            // A shorter datagram ends a batch: nothing may follow it.
            || !gso_can_follow(self.buf.len(), self.count, self.seg, 1, d.len(), self.max)
        {
            return false;
        }
        self.buf.extend_from_slice(d);
        self.count += 1;
        true
    }
}

impl AsyncUdpSocket for MeshSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        self.paths.keep_for_replay(t.destination, t);
        let send = self.paths.send.load();
        let r = match send.get(&t.destination) {
            None if Paths::is_synth(&t.destination) => {
                // A relay tunnel whose route is gone: nothing to send it on.
                return Ok(());
            }
            None => self.inner.try_send(t),
            Some(Route::Direct(a)) => self.inner.try_send(&Transmit {
                destination: *a,
                src_ip: None,
                ..*t
            }),
            Some(Route::Punched { addr, socket }) => match self.paths.extras.load().get(socket) {
                Some(s) => {
                    return s.send(&Transmit {
                        destination: *addr,
                        src_ip: None,
                        ..*t
                    })
                }
                None => return Ok(()),
            },
            Some(Route::Relay { relay, to }) => return self.send_relayed(t, *relay, *to),
        };
        match r {
            // The source address QUIC remembered is gone (our address changed): let the
            // kernel pick the new one.
            Err(e) if t.src_ip.is_some() && e.raw_os_error() == Some(99) => {
                self.inner.try_send(&Transmit { src_ip: None, ..*t })
            }
            r => r,
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        {
            let mut q = self.paths.pending.lock().unwrap_or_else(|p| p.into_inner());
            if !q.is_empty() {
                let mut n = 0;
                while n < bufs.len().min(meta.len()) {
                    let Some((addr, d)) = q.pop_front() else {
                        break;
                    };
                    if d.len() > bufs[n].len() {
                        continue;
                    }
                    bufs[n][..d.len()].copy_from_slice(&d);
                    meta[n] = RecvMeta {
                        addr,
                        len: d.len(),
                        stride: d.len(),
                        ecn: None,
                        dst_ip: None,
                    };
                    n += 1;
                }
                if n > 0 {
                    return Poll::Ready(Ok(n));
                }
            }
        }
        // The extra sockets (punched through port-dependent NATs) are read first every
        // other call, so a busy main socket cannot starve them.
        let extras = self.paths.extras.load();
        let extras_first = !extras.is_empty() && self.turn.fetch_xor(true, Ordering::Relaxed);
        if extras_first {
            if let Some(r) = self.poll_extras(&extras, cx, bufs, meta) {
                return r;
            }
        }
        match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => {
                for i in 0..n {
                    self.filter(0, &mut bufs[i], &mut meta[i]);
                }
                return Poll::Ready(Ok(n));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if !extras_first {
            if let Some(r) = self.poll_extras(&extras, cx, bufs, meta) {
                return r;
            }
        }
        Poll::Pending
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

    /// A current-thread runtime, as the node runs.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A mesh socket on a real loopback UDP socket, relaying through `relay`, whose view
    /// holds peer 1 only.
    fn socket(relay: SocketAddr) -> (Arc<MeshSocket>, Arc<Paths>, crate::metrics::Metrics) {
        let metrics = crate::metrics::Metrics::new();
        let (paths, _) = Paths::new(false, metrics.paths());
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, udp).unwrap();
        let s = MeshSocket::new(inner, paths.clone());
        paths.relays.store(Arc::new([relay].into_iter().collect()));
        paths.set_known_peers([pp::PeerId(1)].into_iter().collect());
        (s, paths, metrics)
    }

    /// `n` QUIC datagrams of 100 bytes that peer `from` sent through a relay, as the relay
    /// forwards them (coalesced, as the kernel hands them over).
    fn relayed(from: pp::PeerId, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n {
            let mut d = pp::relay_send_header(pp::PeerId(99)).to_vec();
            d.extend_from_slice(&[0x40; 100]);
            pp::relay_rewrite(&mut d, from);
            out.extend_from_slice(&d);
        }
        out
    }

    fn unknown_peer_drops(m: &crate::metrics::Metrics) -> u64 {
        m.encode()
            .lines()
            .find(|l| l.contains("relay_dropped") && l.contains("reason=\"unknown_peer\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Attack: a relay (or whoever can send from its address) hands over datagrams naming a
    /// peer that is not in this node's view, hoping they reach QUIC as a tunnel (a new
    /// route and a synthetic address per forged id). Dropped and counted, one datagram or
    /// a coalesced read alike; the twin from a peer in the view is delivered.
    #[test]
    fn relayed_datagrams_from_a_peer_not_in_the_view_are_dropped() {
        let rt = runtime();
        let _rt = rt.enter();
        let relay: SocketAddr = "198.18.0.30:7800".parse().unwrap();
        let (s, paths, metrics) = socket(relay);
        let entry = |buf: &[u8]| RecvMeta {
            addr: relay,
            len: buf.len(),
            stride: RELAY_HEADER + 100,
            ecn: None,
            dst_ip: None,
        };
        for n in [1, 3] {
            let mut buf = relayed(pp::PeerId(2), n);
            let mut meta = entry(&buf);
            let before = unknown_peer_drops(&metrics);
            s.filter(0, &mut buf, &mut meta);
            assert_eq!(
                meta.len, 0,
                "{n} datagram(s) from an unknown peer reached QUIC"
            );
            assert_eq!(unknown_peer_drops(&metrics), before + n as u64);
            assert!(
                !paths.synth_rev.load().values().any(|p| *p == pp::PeerId(2)),
                "no address (nor route) for the forged peer"
            );
            assert!(paths.pending.lock().unwrap().is_empty());

            let mut buf = relayed(pp::PeerId(1), n);
            let mut meta = entry(&buf);
            s.filter(0, &mut buf, &mut meta);
            assert_eq!(
                meta.len,
                100 * n,
                "the known peer's datagrams are delivered"
            );
            assert_eq!(meta.addr, paths.synth_for(pp::PeerId(1)));
            assert_eq!(unknown_peer_drops(&metrics), before + n as u64);
        }
    }

    /// A relay forwards a coalesced read from one registered node to another as it came
    /// (headers rewritten in place, one send, the short last datagram kept short); the
    /// twin from an address no node registered is dropped.
    #[test]
    fn a_relay_forwards_a_coalesced_read_in_place() {
        let rt = runtime();
        let _rt = rt.enter();
        let metrics = crate::metrics::Metrics::new();
        let (paths, _) = Paths::new(true, metrics.paths());
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, udp).unwrap();
        let s = MeshSocket::new(inner, paths.clone());
        let (a, b) = (
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        b.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let now = std::time::Instant::now();
        assert!(paths.register(pp::PeerId(1), a.local_addr().unwrap(), None, now));
        assert!(paths.register(pp::PeerId(2), b.local_addr().unwrap(), None, now));
        // Three datagrams from a to b: two of 112 bytes and a short one.
        let stride = RELAY_HEADER + 100;
        let mut buf = Vec::new();
        for (i, n) in [(1u8, 100), (2, 100), (3, 40)] {
            buf.extend_from_slice(&pp::relay_send_header(pp::PeerId(2)));
            buf.extend_from_slice(&vec![0x40 | i; n]);
        }
        let meta = |addr| RecvMeta {
            addr,
            len: RELAY_HEADER * 3 + 240,
            stride,
            ecn: None,
            dst_ip: None,
        };
        // The runtime's driver has to have seen the socket writable once for a send.
        rt.block_on(tokio::time::sleep(std::time::Duration::from_millis(5)));
        let mut m = meta(a.local_addr().unwrap());
        assert!(
            s.forward_in_place(&mut buf.clone(), &mut m),
            "taken whole, not datagram by datagram"
        );
        assert_eq!(m.len, 0, "nothing of it is QUIC for the relay");
        let mut got = Vec::new();
        let mut d = [0u8; 2048];
        while let Ok(n) = b.recv(&mut d) {
            got.push(d[..n].to_vec());
            if got.len() == 3 {
                break;
            }
        }
        assert_eq!(got.len(), 3, "{got:?}");
        for (d, (i, n)) in got.iter().zip([(1u8, 100usize), (2, 100), (3, 40)]) {
            assert_eq!(
                pp::decode(d).unwrap(),
                Some(PathPacket::RelayRecv {
                    from: pp::PeerId(1),
                    payload: &vec![0x40 | i; n][..]
                })
            );
        }
        // Not taken whole: datagrams for two destinations, or for a node not registered.
        for segments in [&[1][..], &[0, 1, 2]] {
            let mut mixed = buf.clone();
            for i in segments {
                mixed[i * stride..i * stride + RELAY_HEADER]
                    .copy_from_slice(&pp::relay_send_header(pp::PeerId(3)));
            }
            let mut m = meta(a.local_addr().unwrap());
            assert!(!s.forward_in_place(&mut mixed.clone(), &mut m));
            assert_eq!(m.len, RELAY_HEADER * 3 + 240, "left as it came");
        }
        // The twin: the same read from an address no node registered.
        let stranger: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut m = meta(stranger);
        assert!(!s.forward_in_place(&mut buf.clone(), &mut m));
        s.filter(0, &mut buf.clone(), &mut m);
        assert_eq!(m.len, 0);
        assert!(b.recv(&mut d).is_err(), "nothing forwarded for a stranger");
        assert!(metrics
            .encode()
            .lines()
            .any(|l| l.contains("reason=\"sender_not_registered\"") && l.ends_with(" 3")));
    }

    /// Datagrams for one peer through one relay that follow each other in a turn of the
    /// runtime leave in one GSO send (the relay reads them as one, each behind its
    /// header); the twins leave apart: for another peer, or after a short datagram.
    #[test]
    fn relayed_sends_that_follow_each_other_leave_as_one() {
        let rt = runtime();
        let _rt = rt.enter();
        let relay_sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay = relay_sock.local_addr().unwrap();
        let (s, _paths, _metrics) = socket(relay);
        let state = quinn::udp::UdpSocketState::new((&relay_sock).into()).unwrap();
        if s.max_transmit_segments() < 20 || state.gro_segments() < 20 {
            eprintln!("no UDP GSO/GRO of 20 segments here: nothing to coalesce, test skipped");
            return;
        }
        relay_sock
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        // Each read: (bytes, stride, the peers its headers name).
        let read = || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let mut meta = [RecvMeta::default()];
                let n = state.recv(
                    (&relay_sock).into(),
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut meta,
                );
                if n.is_err() {
                    return got;
                }
                let m = meta[0];
                let peers: std::collections::BTreeSet<u64> = buf[..m.len]
                    .chunks(m.stride)
                    .map(|d| match pp::decode(d) {
                        Ok(Some(PathPacket::RelaySend { to, .. })) => to.0,
                        other => panic!("not relay framing: {other:?}"),
                    })
                    .collect();
                got.push((m.len, m.stride, peers.into_iter().collect::<Vec<_>>()));
            }
        };
        let ten = vec![0x40u8; 1000];
        let short = vec![0x40u8; 950];
        let send = |sends: &[(&[u8], u64)]| {
            rt.block_on(async {
                // The runtime's driver has to have seen the socket writable once.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                for (contents, to) in sends {
                    let t = Transmit {
                        destination: relay,
                        ecn: None,
                        contents,
                        segment_size: Some(100),
                        src_ip: None,
                    };
                    s.send_relayed(&t, relay, pp::PeerId(*to)).unwrap();
                }
                // Until the flush task has sent what is held (a loaded machine may take
                // its time).
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while !s.out.is_empty() && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            })
        };
        let stride = RELAY_HEADER + 100;
        send(&[(&ten, 1), (&ten, 1)]);
        assert_eq!(
            read(),
            vec![(20 * stride, stride, vec![1])],
            "two sends of ten datagrams for one peer leave as one"
        );
        send(&[(&ten, 1), (&ten, 2)]);
        assert_eq!(
            read(),
            vec![
                (10 * stride, stride, vec![1]),
                (10 * stride, stride, vec![2])
            ],
            "for two peers: apart"
        );
        send(&[(&short, 1), (&ten, 1)]);
        assert_eq!(
            read(),
            vec![
                (10 * RELAY_HEADER + 950, stride, vec![1]),
                (10 * stride, stride, vec![1])
            ],
            "nothing follows a short datagram in one send"
        );
    }

    #[test]
    fn a_relay_batch_holds_one_destination_one_length_and_a_short_last() {
        let a = ("198.18.0.1:1".parse().unwrap(), None);
        let b = ("198.18.0.2:1".parse().unwrap(), None);
        let mut batch = RelayBatch::new(3);
        assert!(batch.append(a, &[1; 10]));
        assert!(batch.append(a, &[2; 10]));
        assert!(!batch.append(b, &[3; 10]), "another destination");
        assert!(!batch.append(a, &[3; 11]), "a longer datagram");
        assert!(batch.append(a, &[3; 4]), "a shorter one ends it");
        assert!(!batch.append(a, &[4; 4]), "nothing after a shorter one");
        assert_eq!((batch.count, batch.seg, batch.buf.len()), (3, 10, 24));
        batch.reset(2);
        assert!(batch.append(b, &[5; 8]));
        assert!(batch.append(b, &[6; 8]));
        assert!(!batch.append(b, &[7; 8]), "at most max segments");
    }
}
