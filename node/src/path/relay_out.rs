//! A node's sends through a relay, coalesced.
//!
//! quinn hands its socket at most 10 datagrams per send, and 20 per turn of a
//! connection's driver. Straight to a peer that is one GSO send each, and the peer's kernel
//! hands them over as one read. Through a relay each send is paid for four times (this
//! node's send, the relay's read and send, the peer's read), and on two vCPUs the relay's
//! share came out of the tunnel's throughput. So datagrams for one peer through one relay
//! that follow each other within a turn of the runtime are held and leave in one GSO send
//! (at most the socket's segment limit and 64 KiB): the first one wakes a flush task, which
//! lets the tasks already ready (a driver's next turn) run first, then sends what is held.
//!
//! Held datagrams are already counted as sent to QUIC; one that the kernel refuses is lost
//! like any UDP datagram (counted `send_failed` where the socket reports it), and QUIC's
//! loss recovery resends what it carried. A socket that
//! is full (`WouldBlock`) keeps what is held, and QUIC is told the socket is full when its
//! next datagram cannot join, so it waits for room as it does on a direct path.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use quicmesh_protocol::path::PeerId;
use quinn::udp::Transmit;
use quinn::AsyncUdpSocket;
use tokio::sync::Notify;

use crate::metrics::PathMetrics;
use crate::reason::RelayDrop;

/// The most payload one GSO send may carry: an IPv4 datagram's 65,535 bytes less its IP
/// and UDP headers (the kernel refuses more with EMSGSIZE, which quinn-udp reports as sent).
pub(super) const MAX_GSO_PAYLOAD: usize = 65_535 - 20 - 8;

/// Whether `add` more datagrams, `add_len` bytes, can follow `count` held ones of
/// `stride` (`held_len` bytes) in one GSO send of at most `max` segments: only the last
/// datagram of a send may be short, and the send stays within [`MAX_GSO_PAYLOAD`]. The
/// rule of this node's relayed sends and of a relay's forwarded ones.
pub(super) fn gso_can_follow(
    held_len: usize,
    count: usize,
    stride: usize,
    add: usize,
    add_len: usize,
    max: usize,
) -> bool {
    held_len == count * stride && count + add <= max && held_len + add_len <= MAX_GSO_PAYLOAD
}

/// What a send held for later: datagrams (each with its relay header) for one peer
/// through one relay, all `stride` bytes but the last.
#[derive(Debug, Default)]
struct Held {
    key: Option<(SocketAddr, PeerId)>,
    buf: Vec<u8>,
    stride: usize,
    count: usize,
}

impl Held {
    /// Whether `n` datagrams of `stride` (the last maybe shorter), `len` bytes with their
    /// headers, for `key`, can follow what is held in one GSO send of at most `max`
    /// segments.
    fn joins(
        &self,
        key: (SocketAddr, PeerId),
        stride: usize,
        n: usize,
        len: usize,
        max: usize,
    ) -> bool {
        self.count == 0
            || (self.key == Some(key)
                && self.stride == stride
                && gso_can_follow(self.buf.len(), self.count, stride, n, len, max))
    }

    fn clear(&mut self) {
        self.key = None;
        self.buf.clear();
        self.stride = 0;
        self.count = 0;
    }
}

/// How a flush went.
#[derive(Debug, PartialEq, Eq)]
enum Flushed {
    /// Sent, dropped on an error, or nothing was held.
    Done,
    /// The socket is full: still held.
    Blocked,
}

/// The coalescer of one tunnel socket (see the module doc).
#[derive(Debug)]
pub(super) struct RelayOut {
    inner: Arc<dyn AsyncUdpSocket>,
    metrics: PathMetrics,
    held: Mutex<Held>,
    wake: Arc<Notify>,
    /// Whether the flush task runs (started by the first send, inside the runtime).
    flusher: OnceLock<bool>,
    /// For the flush task's handle on this value (set by [`RelayOut::new`]).
    me: Weak<RelayOut>,
}

impl RelayOut {
    pub(super) fn new(inner: Arc<dyn AsyncUdpSocket>, metrics: PathMetrics) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            inner,
            metrics,
            held: Mutex::new(Held::default()),
            wake: Arc::new(Notify::new()),
            flusher: OnceLock::new(),
            me: me.clone(),
        })
    }

    /// Sends `t` to `relay` for `to`, each datagram behind `header`: held to leave with
    /// what follows it, or sent at once where there is no runtime to flush it later.
    pub(super) fn send(
        &self,
        t: &Transmit,
        relay: SocketAddr,
        to: PeerId,
        header: &[u8],
    ) -> io::Result<()> {
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        let n = t.contents.len().div_ceil(seg).max(1);
        let stride = seg + header.len();
        let len = t.contents.len() + n * header.len();
        let max = self.inner.max_transmit_segments().max(1);
        let key = (relay, to);
        let deferred = *self.flusher.get_or_init(|| self.start_flusher());
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !held.joins(key, stride, n, len, max) && self.flush_held(&mut held) == Flushed::Blocked {
            // QUIC waits for room and comes back with this transmit.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let was_empty = held.count == 0;
        held.key = Some(key);
        held.stride = stride;
        for chunk in t.contents.chunks(seg) {
            held.buf.extend_from_slice(header);
            held.buf.extend_from_slice(chunk);
        }
        held.count += n;
        let full = held.count >= max
            || held.buf.len() + stride > MAX_GSO_PAYLOAD
            || held.buf.len() != held.count * held.stride;
        if !deferred || full {
            // Nothing more can join: out now. Blocked, it stays held for the flush task
            // (woken below); with no flush task, QUIC comes back with it.
            match self.flush_held(&mut held) {
                Flushed::Done => {
                    self.metrics.relayed_tx.inc_by(n as u64);
                    return Ok(());
                }
                Flushed::Blocked if !deferred => {
                    held.clear();
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Flushed::Blocked => {}
            }
        }
        drop(held);
        self.metrics.relayed_tx.inc_by(n as u64);
        // Whatever is held was held from empty by a send that woke the flush task.
        if was_empty {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Sends what is held, in one GSO send.
    fn flush_held(&self, held: &mut Held) -> Flushed {
        let Some((relay, _)) = held.key else {
            return Flushed::Done;
        };
        if held.count == 0 {
            return Flushed::Done;
        }
        let r = self.inner.try_send(&Transmit {
            destination: relay,
            ecn: None,
            contents: &held.buf,
            segment_size: (held.count > 1).then_some(held.stride),
            src_ip: None,
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Blocked,
            Err(e) => {
                tracing::debug!(%relay, error = %e, datagrams = held.count, "relayed send failed");
                for _ in 0..held.count {
                    self.metrics.relay_dropped(RelayDrop::SendFailed);
                }
            }
            Ok(()) => {}
        }
        held.clear();
        Flushed::Done
    }

    /// Starts the flush task; false (send at once) outside a runtime.
    fn start_flusher(&self) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let (me, wake) = (self.me.clone(), self.wake.clone());
        rt.spawn(async move {
            let mut poller = None;
            loop {
                wake.notified().await;
                // The tasks already ready run first (a connection's driver, its next 20
                // datagrams): what they send joins this send.
                tokio::task::yield_now().await;
                loop {
                    let Some(out) = me.upgrade() else {
                        return;
                    };
                    let flushed = {
                        let mut held = out.held.lock().unwrap_or_else(|p| p.into_inner());
                        out.flush_held(&mut held)
                    };
                    if flushed == Flushed::Done {
                        break;
                    }
                    let p = poller.get_or_insert_with(|| out.inner.clone().create_io_poller());
                    drop(out);
                    if std::future::poll_fn(|cx| p.as_mut().poll_writable(cx))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        true
    }

    /// Whether nothing is held (tests wait for the flush task with it).
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).count == 0
    }
}

impl Drop for RelayOut {
    /// Ends the flush task: woken, it finds this value gone. (From here, not from the
    /// socket's drop: the task may hold the last reference for a moment, and whichever
    /// drops last leaves the wake-up.)
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A send may not pass what the kernel takes in one GSO send (65,507 bytes over IPv4):
    /// 40 held datagrams of 1,464 bytes and a transmit of 6,958 more make 65,518, under
    /// 65,535 but refused by the kernel (and reported as sent), so they leave apart.
    #[test]
    fn a_held_send_stays_within_what_one_gso_send_carries() {
        let key = ("198.18.0.1:7800".parse().unwrap(), PeerId(1));
        let held = Held {
            key: Some(key),
            buf: vec![0; 40 * 1464],
            stride: 1464,
            count: 40,
        };
        assert!(
            !held.joins(key, 1464, 5, 4 * 1464 + 1102, 64),
            "65,518 bytes"
        );
        assert!(held.joins(key, 1464, 4, 4 * 1464, 64), "64,416 bytes");
        assert!(!held.joins(key, 1464, 25, 25 * 1464, 64), "65 segments");
        assert!(
            !held.joins((key.0, PeerId(2)), 1464, 1, 1464, 64),
            "another peer"
        );
        assert!(!held.joins(key, 1400, 1, 1400, 64), "another size");
    }
}
