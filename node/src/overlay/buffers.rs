//! Packet buffers of the two paths.
//!
//! Send path: a datagram handed to quinn lives until quinn has written it into a QUIC packet, so
//! buffers cannot simply be reused after `send_datagram`. Each packet is instead copied
//! into the current chunk and split off as a [`Bytes`] sharing the chunk; when the chunk is
//! full the oldest chunk of the ring is reclaimed in place once every packet carved from it
//! has been dropped. In steady state nothing is allocated: allocating and freeing a chunk
//! per few hundred packets made glibc grow and trim its heap (brk, page faults, page
//! clearing) and cost a quarter of the overlay's throughput.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Mutex;
use tun_rs::VIRTIO_NET_HDR_LEN;

pub struct Arena {
    current: BytesMut,
    ring: VecDeque<BytesMut>,
    chunk: usize,
    ring_len: usize,
}

impl Arena {
    /// `chunk` bytes per chunk; at most `ring_len` chunks are kept for reuse.
    pub fn new(chunk: usize, ring_len: usize) -> Arena {
        Arena {
            current: BytesMut::with_capacity(chunk),
            ring: VecDeque::with_capacity(ring_len),
            chunk,
            ring_len,
        }
    }

    /// A copy of `data` that shares a chunk with its neighbours.
    pub fn carve(&mut self, data: &[u8]) -> Bytes {
        if self.current.capacity() - self.current.len() < data.len() {
            self.rotate(data.len());
        }
        self.current.extend_from_slice(data);
        self.current.split().freeze()
    }

    fn rotate(&mut self, need: usize) {
        let full = std::mem::take(&mut self.current);
        let size = self.chunk.max(need);
        // Chunks are released in the order they were filled: only the oldest can be free.
        if let Some(mut oldest) = self.ring.pop_front() {
            if oldest.try_reclaim(size) {
                self.current = oldest;
                self.ring.push_back(full);
                return;
            }
            self.ring.push_front(oldest);
        }
        if self.ring.len() < self.ring_len {
            self.ring.push_back(full);
        }
        self.current = BytesMut::with_capacity(size);
    }
}

/// Receive path: buffers for one TUN write. GRO appends the following segments of a TCP
/// flow into the first segment's buffer, and tun-rs coalesces only into a buffer that has
/// the capacity for the result: each buffer can hold a whole 64 KiB segment plus headroom.
/// Written with tight buffers, every packet reached the kernel alone (one write and one
/// pass through the TCP stack per 1400 bytes).
pub const WRITE_BUF: usize = 2 * VIRTIO_NET_HDR_LEN + 65535;

/// Sets of write buffers shared by every peer's receive path: one set is in use per
/// receive path writing at that moment, not one per peer.
pub struct WritePool {
    sets: Mutex<Vec<Vec<BytesMut>>>,
    keep: usize,
}

impl WritePool {
    /// Keeps at most `keep` idle sets.
    pub fn new(keep: usize) -> WritePool {
        WritePool {
            sets: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// An empty set (its buffers keep their capacity).
    pub fn take(&self) -> Vec<BytesMut> {
        self.sets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    pub fn give(&self, set: Vec<BytesMut>) {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if sets.len() < self.keep {
            sets.push(set);
        }
    }
}

/// Puts `packet` after the virtio-net headroom into buffer `i` of `set`, creating the
/// buffer on first use.
pub fn fill(set: &mut Vec<BytesMut>, i: usize, packet: &[u8]) {
    if set.len() <= i {
        set.push(BytesMut::with_capacity(WRITE_BUF));
    }
    let b = &mut set[i];
    b.clear();
    if b.capacity() < WRITE_BUF {
        b.reserve(WRITE_BUF);
    }
    b.extend_from_slice(&[0u8; VIRTIO_NET_HDR_LEN]);
    b.extend_from_slice(packet);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_reused_once_its_packets_are_dropped_and_not_before() {
        let mut a = Arena::new(4096, 2);
        let first = a.carve(&[1u8; 3000]);
        let base = first.as_ptr();
        // Does not fit: a second chunk while `first` is alive.
        let second = a.carve(&[2u8; 3000]);
        assert_ne!(second.as_ptr(), base, "a chunk in use must not be reused");
        assert_eq!(&first[..], &[1u8; 3000][..], "the held packet is intact");
        drop(first);
        // Does not fit again: the first chunk is free now and is reused in place.
        let third = a.carve(&[3u8; 3000]);
        assert_eq!(third.as_ptr(), base, "the freed chunk is reused");
        assert_eq!(&second[..], &[2u8; 3000][..]);
        assert_eq!(&third[..], &[3u8; 3000][..]);
    }

    #[test]
    fn write_buffers_have_room_for_a_coalesced_segment_and_are_reused() {
        let pool = WritePool::new(1);
        let mut set = pool.take();
        fill(&mut set, 0, &[1u8; 1400]);
        fill(&mut set, 1, &[2u8; 1400]);
        assert_eq!(
            &set[1][..VIRTIO_NET_HDR_LEN],
            &[0u8; VIRTIO_NET_HDR_LEN][..]
        );
        assert_eq!(&set[1][VIRTIO_NET_HDR_LEN..], &[2u8; 1400][..]);
        assert!(set.iter().all(|b| b.capacity() >= WRITE_BUF));
        let base = set[0].as_ptr();
        pool.give(set);
        let mut again = pool.take();
        fill(&mut again, 0, &[3u8; 100]);
        assert_eq!(
            again[0].as_ptr(),
            base,
            "the set is reused, not reallocated"
        );
        assert_eq!(again[0].len(), VIRTIO_NET_HDR_LEN + 100);
    }

    #[test]
    fn packets_larger_than_a_chunk_get_their_own() {
        let mut a = Arena::new(1024, 2);
        let big = a.carve(&[7u8; 5000]);
        assert_eq!(big.len(), 5000);
        assert!(big.iter().all(|b| *b == 7));
    }
}
