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

use super::{Extra, Incoming, Paths, Route, Source, PENDING_MAX};
use crate::reason::RelayDrop;

/// QUIC's socket: the real UDP socket under the route tables.
#[derive(Debug)]
pub struct MeshSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    paths: Arc<Paths>,
    /// Which of main and extra sockets is read first (alternates).
    turn: AtomicBool,
}

impl MeshSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, paths: Arc<Paths>) -> Arc<Self> {
        let _ = paths.inner.set(inner.clone());
        Arc::new(Self {
            inner,
            paths,
            turn: AtomicBool::new(false),
        })
    }

    /// Sends `t` wrapped for a relay, segment by segment.
    fn send_relayed(&self, t: &Transmit, relay: SocketAddr, to: pp::PeerId) -> io::Result<()> {
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        let header = pp::relay_send_header(to);
        let n = t.contents.len().div_ceil(seg);
        let mut buf = Vec::with_capacity(t.contents.len() + n * RELAY_HEADER);
        for chunk in t.contents.chunks(seg) {
            buf.extend_from_slice(&header);
            buf.extend_from_slice(chunk);
        }
        self.paths.metrics.relayed_tx.inc_by(n as u64);
        self.inner.try_send(&Transmit {
            destination: relay,
            ecn: None,
            contents: &buf,
            segment_size: (n > 1).then_some(seg + RELAY_HEADER),
            src_ip: None,
        })
    }

    /// Handles one path packet found in a received datagram; QUIC datagrams unwrapped
    /// from a relay go to the pending queue.
    fn take_path_packet(&self, from: SocketAddr, socket: u16, seg: &mut [u8]) {
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
                let r = self.inner.try_send(&Transmit {
                    destination: dst,
                    ecn: None,
                    contents: seg,
                    segment_size: None,
                    src_ip: None,
                });
                match r {
                    Ok(()) => {
                        m.relay_forwarded.inc();
                        m.relay_forwarded_bytes.inc_by(seg.len() as u64);
                    }
                    Err(_) => m.relay_dropped(RelayDrop::SendFailed),
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
                if pp::is_path_packet(payload) {
                    self.to_manager(
                        Source::Relay {
                            relay: from,
                            from: peer,
                        },
                        payload,
                    );
                    return;
                }
                let visible = self.paths.relayed_visible(peer);
                // A tunnel the peer opens through a relay is answered through that relay
                // until the manager knows better.
                if Paths::is_synth(&visible) && !self.paths.send.load().contains_key(&visible) {
                    self.paths.set_route(
                        visible,
                        Route::Relay {
                            relay: from,
                            to: peer,
                        },
                    );
                }
                m.relayed_rx.inc();
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
                self.to_manager(source, seg);
            }
            Ok(None) => {}
            Err(e @ (pp::PathError::OldProbe(_) | pp::PathError::Version(_))) => {
                m.probe_refused(e.refusal())
            }
            Err(_) => m.relay_dropped(RelayDrop::Malformed),
        }
    }

    fn to_manager(&self, source: Source, datagram: &[u8]) {
        let _ = self.paths.probes.try_send(Incoming {
            source,
            datagram: datagram.to_vec(),
        });
    }

    /// Rewrites one received entry: path packets out, the rest mapped to its tunnel's
    /// visible address.
    fn filter(&self, socket: u16, buf: &mut [u8], meta: &mut RecvMeta) {
        let stride = meta.stride.max(1);
        let len = meta.len.min(buf.len());
        let any_path = buf[..len].chunks(stride).any(|s| s.first() == Some(&0));
        if any_path {
            // Keep the QUIC segments, in order, packed to the front.
            let mut kept = 0;
            let mut at = 0;
            while at < len {
                let end = (at + stride).min(len);
                if buf[at] == 0 {
                    let mut seg = buf[at..end].to_vec();
                    self.take_path_packet(meta.addr, socket, &mut seg);
                } else {
                    buf.copy_within(at..end, kept);
                    kept += end - at;
                }
                at = end;
            }
            meta.len = kept;
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
