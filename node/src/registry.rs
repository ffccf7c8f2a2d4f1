//! The tunnel registry: the only writer of the node's tunnel tables.
//!
//! It owns every tunnel from the moment its handshake completes until it closes (the one
//! flows use per peer and any second one, e.g. both ends dialled at once), which tunnel
//! is *selected* for each peer, the addresses the last dial tried, and the queue of punch
//! requests for the control session. It publishes tunnel-up and tunnel-down events that
//! the overlay subscribes to. It never decides who may connect: the shell asks
//! [`crate::authz`] and tells the registry what to close.
//!
//! Depends on `protocol`, `reason` and quinn only; nothing here imports the node's wiring.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::ident::NodeName;
use tokio::sync::{broadcast, mpsc};

use crate::reason::CloseReason;

/// A tunnel the registry holds.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// The identity in the peer's certificate (checked at the handshake).
    pub peer: Arc<PeerIdentity>,
    pub conn: quinn::Connection,
    /// When the registry learned of it.
    pub since: Instant,
}

/// What subscribers hear about tunnels.
#[derive(Debug, Clone)]
pub enum TunnelEvent {
    Up(Tunnel),
    /// The tunnel with this `stable_id` is gone.
    Down {
        peer: NodeName,
        id: usize,
    },
}

/// Most punch requests waiting for the control session; more are dropped (the dial
/// that asked keeps going and asks again on its next attempt).
const PUNCH_QUEUE: usize = 256;

/// Tunnels per peer the registry accepts; a peer opening more has its oldest closed.
/// Two is normal (both ends dialled at once); a few more cover a peer restarting.
pub const MAX_TUNNELS_PER_PEER: usize = 4;

#[derive(Debug, Default)]
struct Tables {
    /// Every open tunnel, by `stable_id`.
    all: HashMap<usize, Tunnel>,
    /// The tunnel flows use, per peer.
    selected: HashMap<NodeName, quinn::Connection>,
    /// Per peer, the addresses the last successful dial tried.
    tried: HashMap<NodeName, Vec<SocketAddr>>,
    /// Peers whose tunnel went silent under a flow (nothing came back within a bound
    /// derived from its RTT): new flows try them last until they answer again.
    silent: HashMap<NodeName, Silent>,
}

/// A silent peer: the tunnel that fell silent, and what it had received by then.
#[derive(Debug, Clone, Copy)]
struct Silent {
    conn: usize,
    rx: u64,
}

/// Most seconds before a peer certificate's expiry that its tunnel stops taking new flows.
const DRAIN_MAX: i64 = 300;

/// Whether a tunnel with `peer`'s certificate should take no new flows at `now`: within a
/// tenth of the certificate's lifetime (at most [`DRAIN_MAX`]) of its expiry. Peers renew
/// at about two thirds of the lifetime, so a fresh dial then meets the renewed one.
pub fn draining(peer: &PeerIdentity, now: i64) -> bool {
    let life = peer.not_after.saturating_sub(peer.not_before).max(0);
    now >= peer.not_after.saturating_sub((life / 10).min(DRAIN_MAX))
}

/// The registry.
#[derive(Debug)]
pub struct Tunnels {
    tables: Mutex<Tables>,
    events: broadcast::Sender<TunnelEvent>,
    punch_tx: mpsc::Sender<NodeName>,
    punch_rx: tokio::sync::Mutex<mpsc::Receiver<NodeName>>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Self::new()
    }
}

impl Tunnels {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(1024);
        let (punch_tx, punch_rx) = mpsc::channel(PUNCH_QUEUE);
        Self {
            tables: Mutex::new(Tables::default()),
            events,
            punch_tx,
            punch_rx: tokio::sync::Mutex::new(punch_rx),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows tunnels coming up and going down. Subscribe, then read [`Tunnels::all`]:
    /// a tunnel registered in between is seen twice, never missed.
    pub fn subscribe(&self) -> broadcast::Receiver<TunnelEvent> {
        self.events.subscribe()
    }

    /// Records a tunnel whose handshake completed. A peer already holding
    /// [`MAX_TUNNELS_PER_PEER`] tunnels has its oldest closed to make room (returned so
    /// the caller can count it).
    pub fn register(&self, peer: Arc<PeerIdentity>, conn: &quinn::Connection) -> Option<Tunnel> {
        let t = Tunnel {
            peer,
            conn: conn.clone(),
            since: Instant::now(),
        };
        let evicted = {
            let mut tb = self.tables();
            let mut mine: Vec<&Tunnel> = tb
                .all
                .values()
                .filter(|x| x.peer.node == t.peer.node)
                .collect();
            let evicted = if mine.len() >= MAX_TUNNELS_PER_PEER {
                mine.sort_by_key(|x| x.since);
                Some(mine[0].clone())
            } else {
                None
            };
            if let Some(e) = &evicted {
                tb.all.remove(&e.conn.stable_id());
            }
            tb.all.insert(conn.stable_id(), t.clone());
            // A handshake just completed: the peer answers.
            tb.silent.remove(&t.peer.node);
            evicted
        };
        if let Some(e) = &evicted {
            e.conn
                .close(quinn::VarInt::from_u32(4), b"too many tunnels");
            self.down(&e.peer.node, &e.conn);
        }
        let _ = self.events.send(TunnelEvent::Up(t));
        evicted
    }

    /// Records that `peer`, on tunnel `conn`, sent nothing back within the bound a flow
    /// waited: new flows try it last until it answers again ([`Tunnels::is_silent`]).
    pub fn mark_silent(&self, peer: &NodeName, conn: &quinn::Connection) {
        let rx = conn.stats().udp_rx.datagrams;
        self.tables().silent.insert(
            peer.clone(),
            Silent {
                conn: conn.stable_id(),
                rx,
            },
        );
    }

    /// Whether `peer` is silent: marked, and since then neither has a datagram arrived on
    /// the tunnel that fell silent, nor has another tunnel to it come up, nor has that
    /// tunnel closed.
    pub fn is_silent(&self, peer: &NodeName) -> bool {
        let mut tb = self.tables();
        let Some(mark) = tb.silent.get(peer).copied() else {
            return false;
        };
        let answered = match tb.all.get(&mark.conn) {
            Some(t) => t.conn.stats().udp_rx.datagrams > mark.rx,
            // That tunnel is gone (its idle timeout ran out long after the coordinator
            // took a dead peer offline): a peer still listed gets a fresh dial.
            None => true,
        };
        let replaced = tb
            .selected
            .get(peer)
            .is_some_and(|c| c.stable_id() != mark.conn && c.close_reason().is_none());
        if answered || replaced {
            tb.silent.remove(peer);
            return false;
        }
        true
    }

    /// A tunnel ended (its serving loop returned): forgets it everywhere.
    pub fn unregister(&self, conn: &quinn::Connection) {
        let gone = self.tables().all.remove(&conn.stable_id());
        if let Some(t) = gone {
            self.down(&t.peer.node, conn);
        }
    }

    fn down(&self, peer: &NodeName, conn: &quinn::Connection) {
        {
            let mut tb = self.tables();
            if tb
                .selected
                .get(peer)
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                tb.selected.remove(peer);
            }
        }
        let _ = self.events.send(TunnelEvent::Down {
            peer: peer.clone(),
            id: conn.stable_id(),
        });
    }

    /// Makes `conn` the tunnel flows use for `peer`: always when `replace`, else only when
    /// there is no open one. Returns whether it was selected.
    pub fn select(&self, peer: &NodeName, conn: &quinn::Connection, replace: bool) -> bool {
        let mut tb = self.tables();
        let store = replace
            || tb
                .selected
                .get(peer)
                .is_none_or(|c| c.close_reason().is_some());
        if store {
            tb.selected.insert(peer.clone(), conn.clone());
        }
        store
    }

    /// The selected tunnel to `peer` when it is open and not [`draining`] at `now` (then
    /// the next flow dials a fresh tunnel, which carries the peer's renewed certificate,
    /// and the old one serves its flows until it is closed at expiry).
    pub fn live(&self, peer: &NodeName, now: i64) -> Option<quinn::Connection> {
        let tb = self.tables();
        let c = tb.selected.get(peer)?;
        if c.close_reason().is_some() {
            return None;
        }
        if tb
            .all
            .get(&c.stable_id())
            .is_some_and(|t| draining(&t.peer, now))
        {
            return None;
        }
        Some(c.clone())
    }

    /// Drops `conn` as the selected tunnel for `peer` and closes it (a cached tunnel that
    /// turned out dead), so the next flow dials afresh.
    pub fn forget(&self, peer: &NodeName, conn: &quinn::Connection) {
        conn.close(
            quinn::VarInt::from_u32(3),
            CloseReason::Stale.as_str().as_bytes(),
        );
        let mut tb = self.tables();
        if tb
            .selected
            .get(peer)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            tb.selected.remove(peer);
        }
    }

    /// The identity of the peer at the other end of `conn`, while it is registered.
    pub fn identity(&self, conn: &quinn::Connection) -> Option<Arc<PeerIdentity>> {
        self.tables()
            .all
            .get(&conn.stable_id())
            .map(|t| t.peer.clone())
    }

    /// Every open tunnel.
    pub fn all(&self) -> Vec<Tunnel> {
        self.tables().all.values().cloned().collect()
    }

    /// The selected tunnel per peer (open or not).
    pub fn selected(&self) -> HashMap<NodeName, quinn::Connection> {
        self.tables().selected.clone()
    }

    /// Peers with a selected, open tunnel.
    pub fn connected(&self) -> usize {
        self.tables()
            .selected
            .values()
            .filter(|c| c.close_reason().is_none())
            .count()
    }

    /// Closes every tunnel for which `verdict` gives a reason; returns what it closed.
    pub fn close_where(
        &self,
        verdict: impl Fn(&Tunnel) -> Option<CloseReason>,
    ) -> Vec<(Tunnel, CloseReason)> {
        let closing: Vec<(Tunnel, CloseReason)> = {
            let mut tb = self.tables();
            let hits: Vec<(usize, CloseReason)> = tb
                .all
                .iter()
                .filter_map(|(id, t)| verdict(t).map(|r| (*id, r)))
                .collect();
            hits.into_iter()
                .filter_map(|(id, r)| tb.all.remove(&id).map(|t| (t, r)))
                .collect()
        };
        for (t, r) in &closing {
            t.conn
                .close(quinn::VarInt::from_u32(2), r.as_str().as_bytes());
            self.down(&t.peer.node, &t.conn);
        }
        closing
    }

    /// Records the addresses a successful dial to `peer` tried (for `status`).
    pub fn set_tried(&self, peer: &NodeName, addrs: Vec<SocketAddr>) {
        let mut tb = self.tables();
        if tb.tried.len() < 65_536 || tb.tried.contains_key(peer) {
            tb.tried.insert(peer.clone(), addrs);
        }
    }

    /// What the last successful dial to each peer tried.
    pub fn tried(&self) -> HashMap<NodeName, Vec<SocketAddr>> {
        self.tables().tried.clone()
    }

    /// Asks the control session to have `peer` dial back (hole punching). Returns false
    /// when the queue is full (the request is dropped).
    pub fn request_punch(&self, peer: &NodeName) -> bool {
        self.punch_tx.try_send(peer.clone()).is_ok()
    }

    /// Waits for punch requests and takes every one queued, each peer once (cancel-safe:
    /// the control session selects on it).
    pub async fn next_punches(&self) -> Vec<NodeName> {
        let mut rx = self.punch_rx.lock().await;
        let Some(first) = rx.recv().await else {
            return Vec::new();
        };
        let mut peers = vec![first];
        while let Ok(p) = rx.try_recv() {
            if !peers.contains(&p) {
                peers.push(p);
            }
        }
        peers
    }
}
