//! The path manager's decisions for one link, without IO: which routes to ping on a tick,
//! when a route is dead or stale, when the peer moved and its tunnel is lost, and which
//! answered route replaces the current one. The manager ([`super::manager`]) feeds it the
//! clock and what it observed, and carries out what comes back (sends, route edits,
//! closes); the tests below drive it with a chosen clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Route;

/// Ping interval on an active link's current route.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// An active route without a pong this long (three heartbeats) is dead. Short on
/// purpose: QUIC backs its retransmission timer off exponentially while a route is dead,
/// so a switch within ~2 s lets its next probe (at ~1.9 s or ~3.8 s into the outage) find
/// the new route.
pub const DEAD_AFTER: Duration = Duration::from_millis(1700);
/// The current route missed heartbeats this long while another answers: leave it.
pub const STALE_AFTER: Duration = Duration::from_millis(1200);
/// A relayed link pings the peer's direct candidates this often.
pub const UPGRADE_EVERY: Duration = Duration::from_secs(2);
/// A link searching for a route pings every option this often.
pub const SEARCH_EVERY: Duration = Duration::from_millis(500);
/// A peer that moved (restarted on a new address, say) and whose tunnel answers no probe
/// within this has lost it: the tunnel is closed so the next flow dials afresh.
pub const MOVED_GRACE: Duration = Duration::from_millis(1500);

/// The peer's endpoint and candidates as the view gives them.
pub type Reach = (Option<SocketAddr>, Vec<SocketAddr>);

/// One link's route and what is known of its routes.
#[derive(Debug, Clone)]
pub struct PathState {
    /// Where the link's datagrams go now.
    pub route: Route,
    /// Last pong per route.
    pub alive: HashMap<Route, Instant>,
    /// Round trip of the last pong on the current route.
    pub rtt: Option<Duration>,
    /// Route changes since the link came up.
    pub switches: u32,
    created: Instant,
    last_ping: Option<Instant>,
    last_upgrade: Option<Instant>,
    /// No pong on the current route this long: it is dead (longer for idle links, which
    /// ping less often).
    dead_after: Duration,
    reach: Option<Reach>,
    /// When the peer's addresses changed and nothing has answered since.
    moved: Option<Instant>,
    /// Last pong on any route.
    last_pong: Option<Instant>,
    /// The relay of last resort as the last tick said.
    last_resort: Option<SocketAddr>,
}

/// What the manager knows of a link at a tick.
#[derive(Debug, Clone)]
pub struct TickIn {
    /// The link carried datagrams lately, or leads to a relay: heartbeat it.
    pub busy: bool,
    /// The heartbeat of an idle link.
    pub idle_every: Duration,
    /// The peer's addresses in the current view (None: not in the view).
    pub reach: Option<Reach>,
    /// The relay of last resort (the coordinator's), when there is one: a link on it moves
    /// to any other relay that answers, as to a direct path.
    pub last_resort: Option<SocketAddr>,
}

/// What to do for a link after a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickOut {
    /// The peer moved and its tunnel answers nowhere: close it.
    Close,
    /// Ping these routes; keep (or stop keeping) QUIC's datagrams for replay.
    Probe { pings: Vec<Route>, suspect: bool },
}

impl PathState {
    /// A link that came up at `now` on `route`.
    pub fn new(route: Route, now: Instant) -> Self {
        Self {
            route,
            alive: HashMap::new(),
            rtt: None,
            switches: 0,
            created: now,
            last_ping: None,
            last_upgrade: Some(now),
            dead_after: DEAD_AFTER,
            reach: None,
            moved: None,
            last_pong: None,
            last_resort: None,
        }
    }

    /// The route goes through the relay of last resort.
    fn is_last_resort(&self, route: &Route) -> bool {
        matches!(route, Route::Relay { relay, .. } if Some(*relay) == self.last_resort)
    }

    /// `route` is better than the current route whatever their round trips: direct over
    /// any relay, another relay over the relay of last resort.
    fn outranks(&self, route: &Route) -> bool {
        self.route.is_relay()
            && (route.direct_addr().is_some()
                || (self.is_last_resort(&self.route) && !self.is_last_resort(route)))
    }

    /// True while the current route answered within its dead time.
    pub fn current_alive(&self, now: Instant) -> bool {
        let since = self.alive.get(&self.route).copied().unwrap_or(self.created);
        now.duration_since(since) < self.dead_after
    }

    /// One tick: `options` lists every route the peer may be reached on (asked only when
    /// something is due).
    pub fn tick(
        &mut self,
        now: Instant,
        input: TickIn,
        options: impl FnOnce() -> Vec<Route>,
    ) -> TickOut {
        let every = if input.busy {
            HEARTBEAT
        } else {
            input.idle_every
        };
        self.dead_after = if every == HEARTBEAT {
            DEAD_AFTER
        } else {
            every * 2 + Duration::from_millis(1200)
        };
        if self.reach.is_some() && input.reach.is_some() && self.reach != input.reach {
            // The peer moved: probe everything now; no answer soon means the tunnel is gone.
            self.moved = Some(now);
            self.last_ping = None;
        }
        if input.reach.is_some() {
            self.reach = input.reach;
        }
        self.last_resort = input.last_resort;
        if let Some(at) = self.moved {
            if self.last_pong.is_some_and(|p| p > at) {
                self.moved = None;
            } else if now.duration_since(at) >= MOVED_GRACE {
                return TickOut::Close;
            }
        }
        let alive = self.current_alive(now) && self.moved.is_none();
        // A route silent past a missed heartbeat or two: keep what QUIC sends on it, to
        // replay on whatever replaces it.
        let suspect = self
            .alive
            .get(&self.route)
            .is_some_and(|t| now.duration_since(*t) > STALE_AFTER);
        let due = |t: Option<Instant>, d: Duration| t.is_none_or(|t| now.duration_since(t) >= d);
        let heartbeat = due(self.last_ping, if alive { every } else { SEARCH_EVERY });
        let upgrade = self.route.is_relay() && due(self.last_upgrade, UPGRADE_EVERY);
        let mut pings = Vec::new();
        if !heartbeat && !upgrade {
            return TickOut::Probe { pings, suspect };
        }
        if heartbeat {
            self.last_ping = Some(now);
        }
        if upgrade {
            self.last_upgrade = Some(now);
        }
        let options = options();
        let route = self.route;
        if heartbeat {
            pings.push(route);
            if !alive {
                // Dead route: ask every option; the best that answers wins.
                pings.extend(options.iter().filter(|r| **r != route));
            }
        }
        if upgrade && alive {
            pings.extend(options.iter().filter(|r| *r != &route && self.outranks(r)));
        }
        TickOut::Probe { pings, suspect }
    }

    /// A pong on `route` to a ping sent `rtt` ago. Returns the route left when the link
    /// moves to `route`.
    pub fn pong(&mut self, route: Route, now: Instant, rtt: Duration) -> Option<Route> {
        self.last_pong = Some(now);
        self.alive.insert(route, now);
        if route == self.route {
            self.rtt = Some(rtt);
            return None;
        }
        let current_dead = !self.current_alive(now);
        // The current route missed heartbeats while this one answers: move now rather
        // than wait for it to be declared dead (a NAT rebinding, a new address).
        let current_stale = self
            .alive
            .get(&self.route)
            .is_some_and(|t| now.duration_since(*t) > STALE_AFTER)
            && self.dead_after == DEAD_AFTER;
        let better = self.outranks(&route)
            || current_dead
            || (current_stale
                && route.direct_addr().is_some() == self.route.direct_addr().is_some());
        if !better {
            return None;
        }
        let from = self.route;
        self.route = route;
        self.rtt = Some(rtt);
        self.switches += 1;
        Some(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_protocol::path::PeerId;

    const MS: Duration = Duration::from_millis(1);

    fn relay(i: u8) -> Route {
        Route::Relay {
            relay: SocketAddr::from(([198, 18, 70, 30 + i], 4433)),
            to: PeerId(9),
        }
    }

    fn direct(i: u8) -> Route {
        Route::Direct(SocketAddr::from(([198, 18, 71, i], 4433)))
    }

    fn busy(reach: Option<Reach>) -> TickIn {
        TickIn {
            busy: true,
            idle_every: Duration::from_secs(15),
            reach,
            last_resort: None,
        }
    }

    fn pings(out: TickOut) -> Vec<Route> {
        match out {
            TickOut::Probe { pings, .. } => pings,
            TickOut::Close => panic!("closed"),
        }
    }

    /// A relayed link that has been answering on relay 0 up to `t0 + 1 s`.
    fn relayed(t0: Instant) -> PathState {
        let mut s = PathState::new(relay(0), t0);
        for i in 0..=2 {
            let now = t0 + HEARTBEAT * i;
            s.tick(now, busy(None), Vec::new);
            s.pong(relay(0), now, MS);
        }
        s
    }

    #[test]
    fn a_dead_relay_is_left_for_whichever_option_answers() {
        let t0 = Instant::now();
        let mut s = relayed(t0);
        let options = || vec![relay(0), relay(1)];
        // Silent past DEAD_AFTER: every option is asked.
        let now = t0 + Duration::from_secs(1) + DEAD_AFTER;
        let out = s.tick(now, busy(None), options);
        assert!(
            matches!(&out, TickOut::Probe { suspect: true, .. }),
            "{out:?}"
        );
        assert_eq!(pings(out), vec![relay(0), relay(1)]);
        assert_eq!(s.pong(relay(1), now + MS, MS), Some(relay(0)));
        assert_eq!((s.route, s.switches), (relay(1), 1));
    }

    #[test]
    fn a_live_relay_stays_when_another_relay_answers() {
        let t0 = Instant::now();
        let mut s = relayed(t0);
        let now = t0 + Duration::from_millis(1100);
        assert_eq!(s.pong(relay(1), now, MS), None);
        assert_eq!((s.route, s.switches), (relay(0), 0));
    }

    #[test]
    fn a_link_on_the_relay_of_last_resort_moves_to_a_relay_of_the_mesh_and_not_back() {
        let t0 = Instant::now();
        let mut s = relayed(t0);
        let coordinator = match relay(0) {
            Route::Relay { relay, .. } => relay,
            _ => unreachable!(),
        };
        let input = TickIn {
            last_resort: Some(coordinator),
            ..busy(None)
        };
        let options = || vec![relay(1), relay(0)];
        let now = t0 + UPGRADE_EVERY;
        s.pong(relay(0), now, MS);
        // Upgrade round: the mesh's relay is asked as a direct path would be...
        assert_eq!(
            pings(s.tick(now, input.clone(), options)),
            vec![relay(0), relay(1)]
        );
        // ... and taken once it answers, though the coordinator answers faster.
        assert_eq!(s.pong(relay(1), now + MS, 5 * MS), Some(relay(0)));
        assert_eq!(s.route, relay(1));
        // On the mesh's relay, the coordinator answering is no reason to go back.
        s.tick(now + MS, input, options);
        assert_eq!(s.pong(relay(0), now + 2 * MS, MS), None);
        assert_eq!(s.route, relay(1));
        // Without a relay of last resort, one relay does not outrank another (the twin).
        let mut plain = relayed(t0);
        plain.pong(relay(0), now, MS);
        assert_eq!(pings(plain.tick(now, busy(None), options)), vec![relay(0)]);
        assert_eq!(plain.pong(relay(1), now + MS, MS), None);
    }

    #[test]
    fn a_relayed_link_pings_direct_candidates_and_moves_to_the_first_that_answers() {
        let t0 = Instant::now();
        let mut s = relayed(t0);
        let options = || vec![direct(11), relay(0), relay(1)];
        let now = t0 + UPGRADE_EVERY;
        let p = pings(s.tick(now, busy(None), options));
        assert_eq!(
            p,
            vec![relay(0), direct(11)],
            "heartbeat, then upgrade probes"
        );
        // Not again before UPGRADE_EVERY.
        let p = pings(s.tick(now + HEARTBEAT, busy(None), options));
        assert_eq!(p, vec![relay(0)]);
        assert_eq!(s.pong(direct(11), now + 2 * MS, MS), Some(relay(0)));
        assert_eq!(s.route, direct(11));
        // A direct link does not look for upgrades.
        let p = pings(s.tick(now + 2 * HEARTBEAT, busy(None), options));
        assert_eq!(p, vec![direct(11)]);
    }

    #[test]
    fn a_stale_direct_route_gives_way_to_another_direct_one_not_to_a_relay() {
        let t0 = Instant::now();
        let mut s = PathState::new(direct(11), t0);
        s.tick(t0, busy(None), Vec::new);
        s.pong(direct(11), t0, MS);
        let now = t0 + STALE_AFTER + 100 * MS;
        assert_eq!(
            s.pong(relay(0), now, MS),
            None,
            "relay while direct is only stale"
        );
        assert_eq!(
            s.pong(direct(12), now, MS),
            Some(direct(11)),
            "NAT rebinding"
        );
    }

    #[test]
    fn a_peer_that_moved_and_answers_nowhere_loses_its_tunnel() {
        let t0 = Instant::now();
        let mut s = PathState::new(direct(11), t0);
        let old = Some((Some(SocketAddr::from(([198, 18, 71, 11], 4433))), vec![]));
        let new = Some((Some(SocketAddr::from(([198, 18, 71, 13], 4433))), vec![]));
        s.tick(t0, busy(old.clone()), Vec::new);
        s.pong(direct(11), t0, MS);
        let moved = t0 + 200 * MS;
        let options = || vec![direct(11), direct(13)];
        // The view says it moved: everything is pinged at once (not waiting a heartbeat).
        assert_eq!(
            pings(s.tick(moved, busy(new.clone()), options)),
            vec![direct(11), direct(13)]
        );
        let p = s.tick(moved + MOVED_GRACE - MS, busy(new.clone()), options);
        assert!(matches!(p, TickOut::Probe { .. }), "{p:?}");
        assert_eq!(
            s.tick(moved + MOVED_GRACE, busy(new.clone()), options),
            TickOut::Close
        );
    }

    #[test]
    fn a_peer_that_moved_and_answers_keeps_its_tunnel_on_the_new_address() {
        let t0 = Instant::now();
        let mut s = PathState::new(direct(11), t0);
        let old = Some((Some(SocketAddr::from(([198, 18, 71, 11], 4433))), vec![]));
        let new = Some((Some(SocketAddr::from(([198, 18, 71, 13], 4433))), vec![]));
        s.tick(t0, busy(old), Vec::new);
        s.pong(direct(11), t0, MS);
        let moved = t0 + 200 * MS;
        let options = || vec![direct(11), direct(13)];
        s.tick(moved, busy(new.clone()), options);
        // The new address answers; the old route is not dead yet, so the move waits for
        // it to be stale.
        assert_eq!(s.pong(direct(13), moved + 10 * MS, MS), None);
        let later = t0 + STALE_AFTER + 100 * MS;
        assert_eq!(s.pong(direct(13), later, MS), Some(direct(11)));
        assert!(matches!(
            s.tick(moved + MOVED_GRACE * 2, busy(new), options),
            TickOut::Probe { .. }
        ));
        assert_eq!(s.route, direct(13));
    }

    #[test]
    fn an_idle_link_heartbeats_slowly_and_is_dead_later() {
        let t0 = Instant::now();
        let mut s = PathState::new(direct(11), t0);
        let idle = TickIn {
            busy: false,
            idle_every: Duration::from_secs(15),
            reach: None,
            last_resort: None,
        };
        assert_eq!(pings(s.tick(t0, idle.clone(), Vec::new)), vec![direct(11)]);
        s.pong(direct(11), t0, MS);
        assert_eq!(
            pings(s.tick(t0 + Duration::from_secs(14), idle.clone(), Vec::new)),
            vec![]
        );
        assert!(s.current_alive(t0 + Duration::from_secs(31)));
        assert!(!s.current_alive(t0 + Duration::from_millis(31_200)));
    }
}
