//! The path manager: one task that keeps every tunnel on the best route that works.
//!
//! Each tunnel (a *link*) gets a key and an id from its TLS exporter, known only to its
//! two ends. Probes carry the link id, the sender's direction and counter, a random
//! transaction id and a tag over all of it; a pong echoes the transaction id and says
//! where the ping came from. Each end refuses a probe sent its own way (reflected) or
//! whose counter it has seen (replayed), and counts it. So a route is only ever chosen on
//! the word of the peer itself, an address is only mapped to a tunnel after a fresh
//! authenticated ping came from it, and a relay moves a node's registration only on a
//! ping newer than every one before it.
//!
//! Per link, every [`HEARTBEAT`] (while active; every keepalive interval when idle): a
//! ping on the current route. A relayed link also pings the peer's direct candidates
//! every [`UPGRADE_EVERY`] and moves to the first that answers (path upgrade). A route
//! without a pong for [`DEAD_AFTER`] is dead: every candidate and every live relay is
//! pinged and the link moves to the best one that answers (relay failover, and a peer
//! whose address changed). A ping from an address the link does not use yet is answered
//! with a ping back at once (both sides punching). These decisions are pure
//! ([`PathState`]); this task feeds them the clock and carries them out.
//!
//! [`HEARTBEAT`]: super::decide::HEARTBEAT
//! [`UPGRADE_EVERY`]: super::decide::UPGRADE_EVERY
//! [`DEAD_AFTER`]: super::decide::DEAD_AFTER
//!
//! Relays: every node keeps a tunnel to each relay of the mesh and heartbeats it; the
//! relay takes the source of the newest ping as where to forward that node's relayed
//! packets.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use quicmesh_protocol::ident::NodeName;
use quicmesh_protocol::path::{self as pp, Fresh, PathPacket, PeerId, ProbeGuard, ProbeRefusal};
use tokio::sync::mpsc;

use super::decide::{PathState, TickIn, TickOut, SEARCH_EVERY};
use super::probe::Prober;
use super::{punch, Incoming, Paths, RelayName, Route, Source};
use crate::state::{Node, View};

/// A link is active when it carried datagrams within this.
const ACTIVE_FOR: Duration = Duration::from_secs(10);
/// Pings not answered within this are forgotten.
const PONG_WAIT: Duration = Duration::from_secs(5);
/// How often the manager looks at its links.
const TICK: Duration = Duration::from_millis(250);
/// A relayed link still without a direct path this long tries the port-dependent NAT
/// technique ([`punch`]); again after the backoff, doubling up to [`BIRTHDAY_BACKOFF_MAX`].
const BIRTHDAY_AFTER: Duration = Duration::from_secs(3);
const BIRTHDAY_BACKOFF: Duration = Duration::from_secs(10);
const BIRTHDAY_BACKOFF_MAX: Duration = Duration::from_secs(600);
/// Spray probes sent per tick.
const SPRAY_PER_TICK: usize = 256;
/// Gap between tunnel attempts to one relay.
const RELAY_REDIAL: Duration = Duration::from_secs(3);
/// A probe for an unknown link makes the manager look for new tunnels at most this often
/// (probes with made-up link ids must not make it scan on every datagram).
const RESYNC_EVERY: Duration = Duration::from_millis(100);

pub use super::PathStatus;

struct Link {
    peer: NodeName,
    conn: quinn::Connection,
    /// Signs and numbers our probes.
    prober: Prober,
    /// Checks the peer's: direction, tag, replay window.
    guard: ProbeGuard,
    visible: SocketAddr,
    /// The route and what is known of the routes (the decisions: [`super::decide`]).
    path: PathState,
    last_rx: (u64, Instant),
    /// Direct addresses pinged in reaction to the peer's pings (rate limit).
    reacted: HashMap<SocketAddr, Instant>,
    /// Next port-dependent NAT attempt, and the wait after it.
    next_birthday: Instant,
    birthday_backoff: Duration,
    /// Spray left to send: (peer's public address, probes left, not before).
    spray: Option<(std::net::IpAddr, usize, Instant)>,
}

impl Link {
    /// Admits a probe of this link: the peer's direction, a right tag, a counter not seen.
    fn admit(&mut self, datagram: &[u8], probe: &pp::Probe) -> Result<Fresh, ProbeRefusal> {
        let tag_ok = self.prober.verify(datagram, probe);
        self.guard.admit(probe, tag_ok)
    }

    fn active(&mut self, now: Instant) -> bool {
        let rx = self.conn.stats().udp_rx.datagrams;
        if rx != self.last_rx.0 {
            self.last_rx = (rx, now);
        }
        now.duration_since(self.last_rx.1) < ACTIVE_FOR
    }
}

/// Key and id of a tunnel's probes, from its TLS exporter (both ends derive the same).
fn link_keys(conn: &quinn::Connection) -> Option<(hmac::Key, u64)> {
    let mut out = [0u8; 40];
    conn.export_keying_material(&mut out, b"EXPORTER-quicmesh-path-probe", b"")
        .ok()?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&out[32..]);
    Some((
        hmac::Key::new(hmac::HMAC_SHA256, &out[..32]),
        u64::from_be_bytes(id),
    ))
}

struct Sent {
    link: u64,
    route: Route,
    at: Instant,
}

/// A relay as this node sees it.
#[derive(Debug, Clone)]
struct RelayState {
    /// Where its tunnel's datagrams go (its address on our current route).
    addr: Option<SocketAddr>,
    last_dial: Option<Instant>,
}

struct Manager {
    node: Arc<Node>,
    paths: Arc<Paths>,
    links: HashMap<u64, Link>,
    sent: HashMap<[u8; 12], Sent>,
    relays: HashMap<NodeName, RelayState>,
    /// Our address as peers saw it, by the peer's IP (from pongs on the main socket).
    observed: HashMap<std::net::IpAddr, SocketAddr>,
    /// Spare sockets that got through, reported by their attempts.
    won_tx: mpsc::Sender<punch::Won>,
    /// Extra sockets adopted lately (kept a moment before a route uses them).
    adopted: HashMap<u16, Instant>,
    /// When a probe for an unknown link last made us look for new tunnels.
    resynced: Option<Instant>,
    /// The view version the socket's known peers were taken from.
    known_version: Option<u64>,
}

/// What this node's NAT does to its mappings, from the addresses peers saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mapping {
    Unknown,
    /// One public port for every destination (or no NAT).
    EndpointIndependent,
    /// A new public port per destination.
    PortDependent,
}

/// Classifies observations (peer IP -> our address as that peer saw it).
pub fn mapping(observed: &HashMap<std::net::IpAddr, SocketAddr>) -> Mapping {
    let mut by_ip: HashMap<std::net::IpAddr, HashSet<u16>> = HashMap::new();
    for a in observed.values() {
        by_ip.entry(a.ip()).or_default().insert(a.port());
    }
    if by_ip.values().any(|ports| ports.len() > 1) {
        Mapping::PortDependent
    } else if observed.len() >= 2
        && by_ip
            .keys()
            .any(|ip| observed.values().filter(|a| a.ip() == *ip).count() >= 2)
    {
        Mapping::EndpointIndependent
    } else {
        Mapping::Unknown
    }
}

/// Runs the path manager until the node stops.
pub async fn run(node: Arc<Node>, mut incoming: mpsc::Receiver<Incoming>) {
    let (won_tx, mut won) = mpsc::channel(16);
    let mut m = Manager {
        paths: node.paths.clone(),
        node,
        links: HashMap::new(),
        sent: HashMap::new(),
        relays: HashMap::new(),
        known_version: None,
        observed: HashMap::new(),
        won_tx,
        adopted: HashMap::new(),
        resynced: None,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => m.tick(Instant::now()),
            p = incoming.recv() => match p {
                Some(p) => m.incoming(p, Instant::now()),
                None => return,
            },
            Some(w) = won.recv() => m.adopt(w, Instant::now()),
        }
    }
}

/// Every direct address the peer may be reached at, plus every live relay.
fn options(paths: &Paths, visible: SocketAddr, peer: &NodeName, view: &View) -> Vec<Route> {
    let mut out = Vec::new();
    if !Paths::is_synth(&visible) {
        out.push(Route::Direct(visible));
    }
    if let Some(p) = view.peers.get(peer) {
        for a in p.candidates.iter().chain(p.endpoint.iter()) {
            let r = Route::Direct(*a);
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    if !view.peers.get(peer).is_some_and(|p| p.relay) {
        let to = PeerId::of(peer);
        for (name, relay) in paths.live_relays().iter() {
            if !name.is(peer) {
                out.push(Route::Relay { relay: *relay, to });
            }
        }
    }
    out
}

impl Manager {
    fn tick(&mut self, now: Instant) {
        let view = self.node.view();
        if self.known_version != Some(view.version) {
            self.known_version = Some(view.version);
            self.paths
                .set_known_peers(view.peers.keys().map(PeerId::of).collect());
        }
        self.sync_links(now);
        self.sync_relays(&view, now);
        self.sent
            .retain(|_, s| now.duration_since(s.at) < PONG_WAIT);
        let ids: Vec<u64> = self.links.keys().copied().collect();
        for id in ids {
            self.drive(id, &view, now);
            self.birthday(id, &view, now);
        }
        // Extra sockets live while a route uses them (or just after they got through).
        self.adopted
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(10));
        let used: HashSet<u16> = self
            .links
            .values()
            .filter_map(|l| match l.path.route {
                Route::Punched { socket, .. } => Some(socket),
                _ => None,
            })
            .chain(self.adopted.keys().copied())
            .collect();
        self.paths.retain_extras(|id| used.contains(&id));
        self.publish(&view);
    }

    /// The port-dependent NAT technique for relayed links ([`punch`]): both sides open
    /// spare sockets, and the side whose NAT is not port-dependent sprays.
    fn birthday(&mut self, id: u64, view: &View, now: Instant) {
        let mine = mapping(&self.observed);
        let Some(l) = self.links.get_mut(&id) else {
            return;
        };
        if let Some((ip, left, at)) = l.spray {
            if now >= at {
                let n = left.min(SPRAY_PER_TICK);
                l.spray = (left > n).then_some((ip, left - n, at));
                for _ in 0..n {
                    let port = rand::Rng::gen_range(&mut rand::thread_rng(), 1024..=65535u16);
                    self.ping(id, Route::Direct(SocketAddr::new(ip, port)), now);
                }
            }
            return;
        }
        if !l.path.route.is_relay() || now < l.next_birthday {
            return;
        }
        l.next_birthday = now + l.birthday_backoff;
        l.birthday_backoff = (l.birthday_backoff * 2).min(BIRTHDAY_BACKOFF_MAX);
        let Some(peer) = view.peers.get(&l.peer) else {
            return;
        };
        let targets: Vec<SocketAddr> = peer.candidates.iter().take(4).copied().collect();
        let Some(public) = targets.first().map(|a| a.ip()) else {
            return;
        };
        // Every side opens spare sockets, an endpoint-independent one too: still relayed,
        // a NAT on the way most likely took the peer's first packet for itself and holds
        // the tuple its own side's mapping needs (a Linux NAT accepting packets for
        // itself, reached before its side's packets left; the peer's pings keep it
        // alive). Linux then maps that side's socket to another port for every new
        // destination, so neither side can tell whose NAT it is; the held side's spare
        // sockets (fresh ports) meet the other side's spray.
        tracing::debug!(peer = %l.peer, ?mine, "trying the port-dependent NAT technique");
        self.paths.metrics.spare_attempts.inc();
        let (prober, tx) = (l.prober.clone(), self.won_tx.clone());
        tokio::spawn(async move {
            if let Some(w) = punch::spare_sockets(prober, targets).await {
                let _ = tx.send(w).await;
            }
        });
        if mine != Mapping::PortDependent {
            // Give the peer's spare sockets a moment to open their mappings first.
            l.spray = Some((public, punch::SPRAY, now + Duration::from_millis(500)));
        }
    }

    /// A spare socket got through: it joins the tunnel socket, and its probe is handled.
    fn adopt(&mut self, w: punch::Won, now: Instant) {
        if !self.links.contains_key(&w.link) {
            return;
        }
        match self.paths.add_extra(w.socket) {
            Ok(socket) => {
                tracing::info!(from = %w.from, socket, "a spare socket got through a port-dependent NAT");
                self.paths.metrics.spare_won.inc();
                self.adopted.insert(socket, now);
                self.incoming(
                    Incoming {
                        source: Source::Punched {
                            addr: w.from,
                            socket,
                        },
                        datagram: w.datagram,
                        local: None,
                    },
                    now,
                );
            }
            Err(e) => tracing::warn!(error = %e, "could not adopt a spare socket"),
        }
    }

    /// Links for every served tunnel; gone tunnels' routes forgotten.
    fn sync_links(&mut self, now: Instant) {
        let served = self.node.served_tunnels();
        let live: HashSet<usize> = served.iter().map(|(_, c)| c.stable_id()).collect();
        let paths = self.paths.clone();
        self.links.retain(|_, l| {
            let keep = live.contains(&l.conn.stable_id()) && l.conn.close_reason().is_none();
            if !keep {
                paths.forget(l.visible);
            }
            keep
        });
        let known: HashSet<usize> = self.links.values().map(|l| l.conn.stable_id()).collect();
        for (peer, conn) in served {
            if known.contains(&conn.stable_id()) || conn.close_reason().is_some() {
                continue;
            }
            let Some((key, id)) = link_keys(&conn) else {
                continue;
            };
            let visible = conn.remote_address();
            let route = self.paths.route(visible);
            tracing::debug!(%peer, %visible, ?route, link = id, "path link up");
            let prober = Prober::new(key, id, &self.node.cfg.name, &peer);
            let guard = ProbeGuard::new(prober.expect());
            self.links.insert(
                id,
                Link {
                    peer,
                    conn,
                    prober,
                    guard,
                    visible,
                    path: PathState::new(route, now),
                    last_rx: (0, now),
                    reacted: HashMap::new(),
                    next_birthday: now + BIRTHDAY_AFTER,
                    birthday_backoff: BIRTHDAY_BACKOFF,
                    spray: None,
                },
            );
        }
        // Relayed datagrams from a peer belong to the tunnel flows use (its visible address).
        let relay_from: HashMap<PeerId, SocketAddr> = self
            .links
            .values()
            .filter(|l| {
                self.node
                    .live_tunnel(&l.peer)
                    .is_none_or(|c| c.stable_id() == l.conn.stable_id())
            })
            .map(|l| (PeerId::of(&l.peer), l.visible))
            .collect();
        self.paths.set_relay_from(relay_from);
        if self.paths.is_relay {
            let ids: HashSet<PeerId> = self.links.values().map(|l| PeerId::of(&l.peer)).collect();
            self.paths.retain_registered(|id| ids.contains(id));
        }
    }

    /// Keeps a tunnel to every relay; tells the socket which relays it may take relayed
    /// datagrams from.
    fn sync_relays(&mut self, view: &View, now: Instant) {
        let me = &self.node.cfg.name;
        let known: Vec<(&NodeName, &quicmesh_protocol::ident::Labels)> = view
            .peers
            .values()
            .filter(|p| p.relay && p.online && &p.node != me)
            .map(|p| (&p.node, &p.labels))
            .collect();
        let relays: Vec<&quicmesh_protocol::wire::PeerInfo> =
            quicmesh_protocol::routing::relay_order(&view.labels, &known)
                .into_iter()
                .filter_map(|n| view.peers.get(n))
                .collect();
        self.relays
            .retain(|n, _| relays.iter().any(|p| &p.node == n));
        let mut addrs = HashSet::new();
        let mut order = Vec::new();
        for p in relays {
            let link = self
                .links
                .values()
                .find(|l| l.peer == p.node && !Paths::is_synth(&l.visible));
            let st = self.relays.entry(p.node.clone()).or_insert(RelayState {
                addr: None,
                last_dial: None,
            });
            match link {
                Some(l) => {
                    let addr = l.path.route.direct_addr().unwrap_or(l.visible);
                    st.addr = Some(addr);
                    addrs.insert(addr);
                    if l.path.current_alive(now) && l.path.alive.contains_key(&l.path.route) {
                        order.push((RelayName::Node(p.node.clone()), addr));
                    }
                }
                None => {
                    st.addr = None;
                    if st
                        .last_dial
                        .is_none_or(|t| now.duration_since(t) >= RELAY_REDIAL)
                    {
                        st.last_dial = Some(now);
                        let node = self.node.clone();
                        let peer = p.clone();
                        tokio::spawn(async move {
                            if let Err(e) = crate::tunnel::connection(&node, &peer).await {
                                tracing::debug!(relay = %peer.node, error = %e, "relay unreachable");
                            }
                        });
                    }
                }
            }
        }
        // The coordinator last: a relay of the mesh is preferred whenever one answers.
        if let Some(c) = self.paths.coordinator_relay() {
            addrs.insert(c);
            order.push((RelayName::Coordinator, c));
        }
        self.paths.set_relays(addrs);
        self.paths.set_live_relays(order);
    }

    fn ping(&mut self, id: u64, route: Route, now: Instant) {
        let Some(l) = self.links.get(&id) else {
            return;
        };
        let tx: [u8; 12] = rand::random();
        let d = l.prober.ping(tx);
        if self.paths.send_probe(route, &d).is_ok() {
            self.sent.insert(
                tx,
                Sent {
                    link: id,
                    route,
                    at: now,
                },
            );
        }
    }

    fn drive(&mut self, id: u64, view: &View, now: Instant) {
        let Some(l) = self.links.get_mut(&id) else {
            return;
        };
        // Links to relays stay active: nodes' registrations and relay liveness ride on them.
        let to_relay = view.peers.get(&l.peer).is_some_and(|p| p.relay);
        let input = TickIn {
            busy: l.active(now) || to_relay,
            idle_every: crate::tls::keepalive(),
            reach: view
                .peers
                .get(&l.peer)
                .map(|p| (p.endpoint, p.candidates.clone())),
            last_resort: self.paths.coordinator_relay(),
        };
        let paths = &self.paths;
        let (visible, peer) = (l.visible, &l.peer);
        let out = l
            .path
            .tick(now, input, || options(paths, visible, peer, view));
        match out {
            TickOut::Close => {
                tracing::info!(peer = %l.peer, "peer moved and its tunnel answers nowhere; closing it");
                l.conn.close(quinn::VarInt::from_u32(4), b"peer moved");
            }
            TickOut::Probe { pings, suspect } => {
                self.paths.set_suspect(l.visible, suspect);
                for r in pings {
                    self.ping(id, r, now);
                }
            }
        }
    }

    fn incoming(&mut self, p: Incoming, now: Instant) {
        let pkt = match pp::decode(&p.datagram) {
            Ok(Some(pkt)) => pkt,
            Ok(None) => return,
            Err(e) => return self.refuse(e.refusal(), &p),
        };
        match pkt {
            PathPacket::Ping(probe) => self.on_ping(probe, &p, now),
            PathPacket::Pong { probe, observed } => self.on_pong(probe, observed, &p, now),
            _ => {}
        }
    }

    fn refuse(&self, why: ProbeRefusal, p: &Incoming) {
        tracing::trace!(source = ?p.source, reason = why.label(), "probe refused");
        self.paths.metrics.probe_refused(why);
    }

    fn on_ping(&mut self, probe: pp::Probe, p: &Incoming, now: Instant) {
        if !self.links.contains_key(&probe.link)
            && self
                .resynced
                .is_none_or(|t| now.duration_since(t) >= RESYNC_EVERY)
        {
            // A tunnel that just came up may not be a link yet.
            self.resynced = Some(now);
            self.sync_links(now);
        }
        let Some(l) = self.links.get_mut(&probe.link) else {
            return self.refuse(ProbeRefusal::UnknownLink, p);
        };
        let fresh = match l.admit(&p.datagram, &probe) {
            Ok(f) => f,
            Err(why) => return self.refuse(why, p),
        };
        let observed = match p.source {
            Source::Direct(a) | Source::Punched { addr: a, .. } => a,
            Source::Relay { relay, .. } => relay,
        };
        if let Some(from) = p.source.direct_addr() {
            // The peer proved it sends from here: its datagrams from here are this tunnel's.
            self.paths.accept_from(from, l.visible);
            // A relay forwards to one address per node: only the newest ping moves it (an
            // older one, reordered on another route, must not move it back).
            if self.paths.is_relay && fresh == Fresh::Newest {
                self.paths.register(PeerId::of(&l.peer), from, p.local, now);
            }
        }
        let d = l.prober.pong(probe.tx, observed);
        // From the address the ping arrived at (a host with several answers from the one
        // the peer knows).
        let r = self.paths.send_probe_from(p.source.route(), &d, p.local);
        tracing::trace!(peer = %l.peer, source = ?p.source, sent = ?r, "ping answered");
        // Punching: a ping from an address we do not send to is answered by one of ours.
        if let Some(from) = p.source.direct_addr() {
            let back = p.source.route();
            let fresh = l
                .reacted
                .get(&from)
                .is_none_or(|t| now.duration_since(*t) >= SEARCH_EVERY);
            if l.path.route != back && fresh {
                l.reacted.insert(from, now);
                l.reacted.retain(|_, t| now.duration_since(*t) < PONG_WAIT);
                self.ping(probe.link, back, now);
            }
        }
    }

    fn on_pong(&mut self, probe: pp::Probe, observed: SocketAddr, p: &Incoming, now: Instant) {
        let Some(l) = self.links.get_mut(&probe.link) else {
            return self.refuse(ProbeRefusal::UnknownLink, p);
        };
        if let Err(why) = l.admit(&p.datagram, &probe) {
            return self.refuse(why, p);
        }
        let sent = match self.sent.get(&probe.tx) {
            Some(s) if s.link == probe.link => self.sent.remove(&probe.tx),
            _ => None,
        };
        let Some(sent) = sent else {
            // Late (past PONG_WAIT), or a second answer to one ping.
            return self.refuse(ProbeRefusal::Unsolicited, p);
        };
        let route = sent.route;
        let rtt = now.duration_since(sent.at);
        tracing::trace!(peer = %l.peer, ?route, ?rtt, "pong");
        if let Route::Direct(a) = route {
            // Our address as this peer saw it (main socket): tells our NAT's mapping.
            if !Paths::is_synth(&observed) {
                self.observed.insert(a.ip(), observed);
                if self.observed.len() > 64 {
                    let k = *self.observed.keys().next().unwrap_or(&a.ip());
                    self.observed.remove(&k);
                }
            }
        }
        let Some(from) = l.path.pong(route, now, rtt) else {
            return;
        };
        tracing::info!(peer = %l.peer, ?from, to = ?route, rtt = ?rtt, "tunnel path changed");
        self.paths
            .metrics
            .path_switch(if route.is_relay() { "relay" } else { "direct" });
        self.paths.set_route(l.visible, route);
        // Datagrams lost on the old route wait for QUIC's backed-off retransmission
        // timer: QUIC's last datagrams (its probes) are sent again on the new route, and
        // an ack-eliciting datagram follows (empty: receivers ignore it); the peer's
        // acknowledgements get the losses declared and resent at once.
        for d in self.paths.take_replay(l.visible) {
            let _ = self.paths.send_probe(route, &d);
        }
        let _ = l.conn.send_datagram(bytes::Bytes::new());
    }

    fn publish(&self, view: &View) {
        let mut relay_names: HashMap<SocketAddr, RelayName> = self
            .relays
            .iter()
            .filter_map(|(n, s)| s.addr.map(|a| (a, RelayName::Node(n.clone()))))
            .collect();
        if let Some(c) = self.paths.coordinator_relay() {
            relay_names.insert(c, RelayName::Coordinator);
        }
        let mut out = HashMap::new();
        for l in self.links.values() {
            // The tunnel `status` shows is the one flows use.
            if self
                .node
                .live_tunnel(&l.peer)
                .is_some_and(|c| c.stable_id() != l.conn.stable_id())
            {
                continue;
            }
            let (kind, address, relay) = match l.path.route {
                Route::Direct(a) | Route::Punched { addr: a, .. } => ("direct", a, None),
                Route::Relay { relay, .. } => (
                    "relay",
                    relay,
                    relay_names.get(&relay).map(|n| n.to_string()),
                ),
            };
            out.insert(
                l.peer.clone(),
                PathStatus {
                    kind,
                    address,
                    relay,
                    rtt_ms: l.path.rtt.map(|r| r.as_secs_f64() * 1e3),
                    switches: l.path.switches,
                },
            );
        }
        let _ = view;
        self.node.set_path_status(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(pairs: &[(&str, &str)]) -> HashMap<std::net::IpAddr, SocketAddr> {
        pairs
            .iter()
            .map(|(peer, seen)| (peer.parse().unwrap(), seen.parse().unwrap()))
            .collect()
    }

    #[test]
    fn mapping_is_port_dependent_when_two_peers_saw_two_ports() {
        let m = obs(&[
            ("198.18.70.30", "198.18.70.3:40001"),
            ("198.18.70.20", "198.18.70.3:51234"),
        ]);
        assert_eq!(mapping(&m), Mapping::PortDependent);
        // Its twin: the same port for both peers is endpoint-independent.
        let m = obs(&[
            ("198.18.70.30", "198.18.70.3:40001"),
            ("198.18.70.20", "198.18.70.3:40001"),
        ]);
        assert_eq!(mapping(&m), Mapping::EndpointIndependent);
    }

    #[test]
    fn one_observation_tells_nothing() {
        assert_eq!(mapping(&obs(&[])), Mapping::Unknown);
        let m = obs(&[("198.18.70.30", "198.18.70.3:40001")]);
        assert_eq!(mapping(&m), Mapping::Unknown);
        // Seen at two different addresses (a peer on our LAN sees our own): still unknown.
        let m = obs(&[
            ("198.18.70.30", "198.18.70.3:40001"),
            ("198.18.71.12", "198.18.71.11:7800"),
        ]);
        assert_eq!(mapping(&m), Mapping::Unknown);
    }
}
