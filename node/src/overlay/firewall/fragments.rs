//! The datagrams whose first fragment the firewall let in: what a later fragment must
//! belong to to pass.
//!
//! A fragment other than the first has no transport header, so it cannot be judged on
//! its own. The first fragment carries the ports and is judged like any packet; when it
//! passes, its datagram (source, destination, protocol, identification) is remembered
//! here for [`FRAGMENT_TTL`], and later fragments of that datagram pass. A later
//! fragment that starts inside the transport header the first was judged by (the
//! overlapping-fragment attack of RFC 1858) does not. The fragment carrying the end of
//! the datagram (M=0) closes the entry, so a stream of fragmented datagrams holds one
//! entry at a time; a fragment reordered behind it is dropped, and the sender's
//! retransmission resends the whole datagram. Fragments arriving before their first
//! fragment are dropped for the same reason.
//!
//! Bounded: [`MAX_DATAGRAMS`] in all, [`MAX_PER_SOURCE`] per source address (a peer's
//! addresses are its certificate's, so one peer cannot take the table); expired entries
//! are swept when a bound is reached and on every re-check.

use std::collections::HashMap;
use std::net::IpAddr;

use quicmesh_protocol::packet::Fragment;

use super::{DropReason, FxBuild};

/// How long a datagram's later fragments may follow its first (seconds).
pub const FRAGMENT_TTL: u64 = 10;
/// Most datagrams remembered.
pub const MAX_DATAGRAMS: usize = 4096;
/// Most datagrams remembered per source address.
pub const MAX_PER_SOURCE: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    id: u32,
}

#[derive(Debug, Clone, Copy)]
struct Datagram {
    expires: u64,
    header_units: u16,
}

#[derive(Debug, Default)]
pub struct Fragments {
    datagrams: HashMap<Key, Datagram, FxBuild>,
    per_source: HashMap<IpAddr, usize, FxBuild>,
}

impl Fragments {
    /// Remembers the datagram of a first fragment that passed.
    pub fn remember(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        f: Fragment,
        now: u64,
    ) -> Result<(), DropReason> {
        let k = Key {
            src,
            dst,
            proto: f.proto,
            id: f.id,
        };
        let d = Datagram {
            expires: now + FRAGMENT_TTL,
            header_units: f.header_units,
        };
        if let Some(old) = self.datagrams.get_mut(&k) {
            // A repeated first fragment: the larger header guards both.
            old.expires = d.expires;
            old.header_units = old.header_units.max(d.header_units);
            return Ok(());
        }
        let full = |s: &Self| {
            s.datagrams.len() >= MAX_DATAGRAMS
                || s.per_source.get(&src).copied().unwrap_or(0) >= MAX_PER_SOURCE
        };
        if full(self) {
            self.expire(now);
            if full(self) {
                return Err(DropReason::TableFull);
            }
        }
        self.datagrams.insert(k, d);
        *self.per_source.entry(src).or_default() += 1;
        Ok(())
    }

    /// Whether a later fragment belongs to a remembered datagram.
    pub fn admit(&mut self, src: IpAddr, dst: IpAddr, f: Fragment, now: u64) -> bool {
        let k = Key {
            src,
            dst,
            proto: f.proto,
            id: f.id,
        };
        let Some(d) = self.datagrams.get(&k).copied() else {
            return false;
        };
        if d.expires < now {
            self.forget(&k);
            return false;
        }
        if f.offset < d.header_units {
            return false;
        }
        if !f.more {
            self.forget(&k);
        }
        true
    }

    fn forget(&mut self, k: &Key) {
        if self.datagrams.remove(k).is_some() {
            Self::uncount(&mut self.per_source, k.src);
        }
    }

    fn uncount(per_source: &mut HashMap<IpAddr, usize, FxBuild>, src: IpAddr) {
        if let Some(n) = per_source.get_mut(&src) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_source.remove(&src);
            }
        }
    }

    /// Forgets datagrams whose time is up.
    pub fn expire(&mut self, now: u64) {
        let Self {
            datagrams,
            per_source,
        } = self;
        datagrams.retain(|k, d| {
            let keep = d.expires >= now;
            if !keep {
                Self::uncount(per_source, k.src);
            }
            keep
        });
    }

    pub fn len(&self) -> usize {
        self.datagrams.len()
    }
}
