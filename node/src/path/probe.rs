//! The sending half of a link's probes: its key, id, direction and counter. The manager
//! holds one per link and hands clones to the spare-socket tasks ([`super::punch`]), so
//! every probe of a link, from whichever socket, takes the next counter value.
//!
//! The receiving half (direction, tag, replay window) is
//! [`quicmesh_protocol::path::ProbeGuard`], fed by the manager.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_lc_rs::hmac;
use quicmesh_protocol::ident::NodeName;
use quicmesh_protocol::path::{self as pp, Dir, Probe, ProbeHead, TAG_LEN};

/// Signs and numbers one link's probes.
#[derive(Debug, Clone)]
pub struct Prober {
    key: hmac::Key,
    link: u64,
    /// The direction of the probes this end sends.
    dir: Dir,
    /// The last counter value used.
    seq: Arc<AtomicU64>,
}

impl Prober {
    /// The prober of `me`'s end of link `link` to `peer`.
    pub fn new(key: hmac::Key, link: u64, me: &NodeName, peer: &NodeName) -> Self {
        Self {
            key,
            link,
            dir: Dir::of(me, peer),
            seq: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn link(&self) -> u64 {
        self.link
    }

    /// The direction the peer's probes carry.
    pub fn expect(&self) -> Dir {
        self.dir.reverse()
    }

    fn head(&self, tx: [u8; 12]) -> ProbeHead {
        ProbeHead {
            link: self.link,
            dir: self.dir,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            tx,
        }
    }

    /// A ping with the next counter value.
    pub fn ping(&self, tx: [u8; 12]) -> Vec<u8> {
        pp::ping(&self.head(tx), |b| tag(&self.key, b))
    }

    /// A pong to the ping `tx` that came from `observed`, with the next counter value.
    pub fn pong(&self, tx: [u8; 12], observed: SocketAddr) -> Vec<u8> {
        pp::pong(&self.head(tx), observed, |b| tag(&self.key, b))
    }

    /// True when `datagram` (decoded as `probe`) has a right tag under this link's key.
    pub fn verify(&self, datagram: &[u8], probe: &Probe) -> bool {
        verify(&self.key, datagram, &probe.tag)
    }

    /// True when `probe` is the peer's, of this link, with a right tag (no replay check:
    /// the manager's guard does that).
    pub fn is_peers(&self, datagram: &[u8], probe: &Probe) -> bool {
        probe.link == self.link && probe.dir == self.expect() && self.verify(datagram, probe)
    }
}

/// A probe's tag under `key`.
pub fn tag(key: &hmac::Key, bytes: &[u8]) -> [u8; TAG_LEN] {
    let t = hmac::sign(key, bytes);
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&t.as_ref()[..TAG_LEN]);
    out
}

/// True when `datagram`'s tag is right under `key` (constant time).
pub fn verify(key: &hmac::Key, datagram: &[u8], got: &[u8; TAG_LEN]) -> bool {
    let want = tag(key, pp::signed(datagram));
    want.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_protocol::path::{Fresh, PathPacket, ProbeGuard, ProbeRefusal};

    fn name(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    fn pair(key: u8) -> (Prober, Prober) {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &[key; 32]);
        (
            Prober::new(k.clone(), 5, &name("a"), &name("b")),
            Prober::new(k, 5, &name("b"), &name("a")),
        )
    }

    fn decoded(d: &[u8]) -> Probe {
        match pp::decode(d) {
            Ok(Some(PathPacket::Ping(p) | PathPacket::Pong { probe: p, .. })) => p,
            other => panic!("not a probe: {other:?}"),
        }
    }

    #[test]
    fn probes_verify_only_under_their_link_key_and_count_up() {
        let (a, b) = pair(1);
        let (other, _) = pair(2);
        let d = a.ping([9; 12]);
        let p = decoded(&d);
        assert_eq!(p.seq, 1);
        assert!(b.is_peers(&d, &p));
        assert!(!other.verify(&d, &p), "another tunnel's key");
        assert!(!a.is_peers(&d, &p), "its own probe, reflected");
        let mut forged = d.clone();
        forged[25] ^= 1;
        assert!(!b.is_peers(&forged, &decoded(&forged)), "altered tx");
        // Pings and pongs share the counter; clones (spare sockets) too.
        let q = a.clone().pong([1; 12], "198.18.0.1:1".parse().unwrap());
        assert_eq!(decoded(&q).seq, 2);
        assert_eq!(decoded(&a.ping([0; 12])).seq, 3);
    }

    #[test]
    fn the_peer_admits_each_probe_once() {
        let (a, b) = pair(1);
        let mut at_b = ProbeGuard::new(b.expect());
        let d = a.ping([3; 12]);
        let p = decoded(&d);
        assert_eq!(at_b.admit(&p, b.verify(&d, &p)), Ok(Fresh::Newest));
        assert_eq!(
            at_b.admit(&p, b.verify(&d, &p)),
            Err(ProbeRefusal::Replayed)
        );
        // B's own ping reflected to B.
        let e = b.ping([4; 12]);
        let pe = decoded(&e);
        assert_eq!(
            at_b.admit(&pe, b.verify(&e, &pe)),
            Err(ProbeRefusal::WrongDirection)
        );
    }
}
