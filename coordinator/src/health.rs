//! Liveness, shared by every replica: which replica holds each node's session, whether a
//! node is offline (no session for longer than the grace period), where it can be reached,
//! and its services' last checks.
//!
//! The rows live in the store ([`LiveRecord`]); each replica keeps them in a [`HealthBook`],
//! reloaded at every mesh version and written through on its own changes. Every function
//! here is pure: times are passed in (Unix milliseconds), and what must be written is
//! returned. A replica whose heartbeat is older than [`REPLICA_DEAD_AFTER_MS`] holds no
//! live session: its nodes count as gone since its last heartbeat.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use quicmesh_protocol::health::{self, Health, ServiceCheck};
use serde::{Deserialize, Serialize};

use crate::store::LiveRecord;

/// Default grace period before a node without a session is offline.
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(15);
/// A replica that has not beaten for this long is dead: its sessions are gone.
pub const REPLICA_DEAD_AFTER_MS: i64 = 5_000;

/// A service check as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    pub health: Health,
    pub output: String,
    /// Unix seconds of the last state change (or first report).
    pub since: i64,
}

/// Where a node's session says it can be reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reach {
    /// Best first: advertised, observed, its own addresses.
    pub candidates: Vec<SocketAddr>,
    /// It relays for other nodes.
    pub relay: bool,
    /// The address its control connection comes from (one of the candidates).
    pub observed: Option<SocketAddr>,
    /// A NAT is in front of it: `observed` is none of its own addresses and it advertises
    /// none (see `PeerInfo::nat`).
    #[serde(default)]
    pub nat: bool,
}

/// One node's row, parsed.
#[derive(Debug, Clone, Default)]
struct Live {
    replica: String,
    connected: bool,
    changed_at: i64,
    offline: bool,
    reach: Reach,
    checks: BTreeMap<String, CheckView>,
}

impl Live {
    fn record(&self, name: &str) -> LiveRecord {
        LiveRecord {
            name: name.to_string(),
            replica: self.replica.clone(),
            connected: self.connected,
            changed_at: self.changed_at,
            offline: self.offline,
            reach: serde_json::to_string(&self.reach).unwrap_or_default(),
            checks: serde_json::to_string(&self.checks).unwrap_or_default(),
        }
    }
}

/// The replica's copy of every node's liveness.
#[derive(Debug)]
pub struct HealthBook {
    /// This replica.
    me: String,
    grace_ms: i64,
    /// When this replica started: nobody is called offline sooner than a grace period
    /// after it (nodes reconnect after a restart).
    started_ms: i64,
    rows: HashMap<String, Live>,
    /// Last heartbeat of each replica (Unix ms).
    beats: HashMap<String, i64>,
}

impl HealthBook {
    pub fn new(me: &str, grace: Duration, started_ms: i64) -> Self {
        HealthBook {
            me: me.to_string(),
            grace_ms: grace.as_millis().min(i64::MAX as u128) as i64,
            started_ms,
            rows: HashMap::new(),
            beats: HashMap::new(),
        }
    }

    pub fn set_grace(&mut self, grace: Duration) {
        self.grace_ms = grace.as_millis().min(i64::MAX as u128) as i64;
    }

    /// Replaces the rows with the store's (a row that does not parse keeps its defaults).
    pub fn load(&mut self, records: Vec<LiveRecord>) {
        self.rows = records
            .into_iter()
            .map(|r| {
                let live = Live {
                    replica: r.replica,
                    connected: r.connected,
                    changed_at: r.changed_at,
                    offline: r.offline,
                    reach: serde_json::from_str(&r.reach).unwrap_or_default(),
                    checks: serde_json::from_str(&r.checks).unwrap_or_default(),
                };
                (r.name, live)
            })
            .collect();
    }

    /// Replaces the given rows (those that changed since the last read).
    pub fn merge(&mut self, records: Vec<LiveRecord>) {
        let mut fresh = HealthBook::new(&self.me, Duration::ZERO, 0);
        fresh.load(records);
        self.rows.extend(fresh.rows);
    }

    /// Records the replicas' last heartbeats (Unix ms).
    pub fn set_beats(&mut self, beats: impl IntoIterator<Item = (String, i64)>) {
        self.beats = beats.into_iter().collect();
    }

    fn replica_alive(&self, id: &str, now_ms: i64) -> bool {
        id == self.me
            || self
                .beats
                .get(id)
                .is_some_and(|b| now_ms - b < REPLICA_DEAD_AFTER_MS)
    }

    /// This replica took the node's session; returns the row to write and whether the node
    /// was offline (the catalog changes).
    pub fn session_started(&mut self, node: &str, now_ms: i64) -> (LiveRecord, bool) {
        let me = self.me.clone();
        let row = self.rows.entry(node.to_string()).or_default();
        let back = row.offline;
        row.replica = me;
        row.connected = true;
        row.changed_at = now_ms;
        row.offline = false;
        (row.record(node), back)
    }

    /// This replica's session with the node ended (the store is told separately: only if
    /// no other replica took the node since).
    pub fn session_ended(&mut self, node: &str, now_ms: i64) {
        if let Some(row) = self.rows.get_mut(node).filter(|r| r.replica == self.me) {
            row.connected = false;
            row.changed_at = now_ms;
        }
    }

    /// Where the node says it can be reached; the row to write when that changed.
    pub fn set_reach(&mut self, node: &str, reach: Reach) -> Option<LiveRecord> {
        let me = self.me.clone();
        let row = self.rows.entry(node.to_string()).or_insert_with(|| Live {
            replica: me,
            ..Default::default()
        });
        if row.reach == reach {
            return None;
        }
        row.reach = reach;
        Some(row.record(node))
    }

    /// The node's observed address moved (its control connection migrated); the row to
    /// write when it did.
    pub fn follow(&mut self, node: &str, addr: SocketAddr) -> Option<LiveRecord> {
        let row = self.rows.get_mut(node)?;
        let old = row.reach.observed.filter(|o| *o != addr)?;
        tracing::info!(%node, %old, new = %addr, "node's control connection moved");
        let r = &mut row.reach;
        r.candidates.retain(|c| *c != addr);
        match r.candidates.iter().position(|c| *c == old) {
            Some(i) => r.candidates[i] = addr,
            None => r.candidates.insert(0, addr),
        }
        r.observed = Some(addr);
        Some(row.record(node))
    }

    /// Records a node's report (restricted to `services`, the ones it hosts). Returns the
    /// row to write, and whether a service's health changed (the catalog changes): new
    /// output alone changes nothing routable.
    pub fn report(
        &mut self,
        node: &str,
        services: &[String],
        checks: &[ServiceCheck],
        unix_now: i64,
    ) -> (LiveRecord, bool) {
        let me = self.me.clone();
        let row = self.rows.entry(node.to_string()).or_insert_with(|| Live {
            replica: me,
            ..Default::default()
        });
        let mut changed = false;
        for c in checks {
            let name = c.service.as_str();
            if !services.iter().any(|s| s == name) {
                continue;
            }
            let output = health::truncate(&c.output, health::MAX_OUTPUT);
            match row.checks.get_mut(name) {
                Some(v) if v.health == c.health => v.output = output,
                _ => {
                    tracing::info!(node, service = name, health = c.health.as_str(), %output, "instance health");
                    row.checks.insert(
                        name.to_string(),
                        CheckView {
                            health: c.health,
                            output,
                            since: unix_now,
                        },
                    );
                    changed = true;
                }
            }
        }
        (row.record(node), changed)
    }

    /// The nodes whose offline mark must change: each node in `known` (with its
    /// enrollment time, Unix ms) gone longer than the grace period becomes offline, a
    /// connected one on a live replica is online. A node is gone when it has no row, its
    /// session ended, or its replica died (since that replica's last heartbeat); never
    /// sooner than this replica's start. Returns (node, offline) pairs; the caller writes
    /// them (and a row for nodes that had none).
    pub fn sweep(&self, known: &[(String, i64)], now_ms: i64) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        for (node, enrolled_ms) in known {
            let (gone_since, offline) = match self.rows.get(node) {
                None => (Some(*enrolled_ms), false),
                Some(r) if r.connected && self.replica_alive(&r.replica, now_ms) => {
                    (None, r.offline)
                }
                Some(r) if r.connected => (
                    Some(self.beats.get(&r.replica).copied().unwrap_or(r.changed_at)),
                    r.offline,
                ),
                Some(r) => (Some(r.changed_at), r.offline),
            };
            let should = match gone_since {
                None => false,
                Some(t) => now_ms - t.max(self.started_ms) >= self.grace_ms,
            };
            if should != offline {
                out.push((node.clone(), should));
            }
        }
        out
    }

    /// How long a node may be without a session before it is marked offline (ms).
    pub fn grace_ms(&self) -> i64 {
        self.grace_ms
    }

    /// Applies the sweep's marks; returns rows for nodes that had none (to insert).
    pub fn mark(&mut self, marks: &[(String, bool)], now_ms: i64) -> Vec<LiveRecord> {
        let mut new = Vec::new();
        for (node, offline) in marks {
            match self.rows.get_mut(node) {
                Some(r) => r.offline = *offline,
                None => {
                    let row = Live {
                        replica: self.me.clone(),
                        connected: false,
                        changed_at: now_ms,
                        offline: *offline,
                        ..Default::default()
                    };
                    new.push(row.record(node));
                    self.rows.insert(node.clone(), row);
                }
            }
        }
        new
    }

    pub fn is_offline(&self, node: &str) -> bool {
        self.rows.get(node).is_some_and(|r| r.offline)
    }

    /// The node has a session on a live replica.
    pub fn connected(&self, node: &str, now_ms: i64) -> bool {
        self.rows
            .get(node)
            .is_some_and(|r| r.connected && self.replica_alive(&r.replica, now_ms))
    }

    /// Which replica holds the node's session, when one does.
    pub fn replica_of(&self, node: &str, now_ms: i64) -> Option<&str> {
        self.rows
            .get(node)
            .filter(|r| r.connected && self.replica_alive(&r.replica, now_ms))
            .map(|r| r.replica.as_str())
    }

    pub fn reach(&self, node: &str) -> Option<&Reach> {
        self.rows.get(node).map(|r| &r.reach)
    }

    /// The node's services reported critical.
    pub fn critical(&self, node: &str) -> Vec<String> {
        self.rows
            .get(node)
            .map(|r| {
                r.checks
                    .iter()
                    .filter(|(_, v)| v.health == Health::Critical)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `service` on `node` is routed to: the node is not offline and the service's
    /// check (if it has one) passes. The catalog says the same per peer (`online`,
    /// `critical`).
    pub fn routable(&self, node: &str, service: &str) -> bool {
        !self.is_offline(node)
            && self
                .rows
                .get(node)
                .and_then(|r| r.checks.get(service))
                .is_none_or(|c| c.health == Health::Passing)
    }

    pub fn check(&self, node: &str, service: &str) -> Option<CheckView> {
        self.rows
            .get(node)
            .and_then(|r| r.checks.get(service))
            .cloned()
    }

    /// Forgets a node's checks (revoked).
    pub fn forget(&mut self, node: &str) -> Option<LiveRecord> {
        let row = self.rows.get_mut(node)?;
        row.checks.clear();
        Some(row.record(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_protocol::ServiceName;

    fn check(s: &str, h: Health) -> ServiceCheck {
        ServiceCheck {
            service: ServiceName::new(s).unwrap(),
            health: h,
            output: format!("{s} {}", h.as_str()),
        }
    }

    fn known(names: &[&str]) -> Vec<(String, i64)> {
        names.iter().map(|n| (n.to_string(), 0)).collect()
    }

    #[test]
    fn offline_only_after_the_grace_period_and_back_on_a_session() {
        let mut b = HealthBook::new("r1", Duration::from_secs(10), 0);
        let (_, back) = b.session_started("a", 1_000);
        assert!(!back);
        b.session_ended("a", 2_000);
        assert!(b.sweep(&known(&["a"]), 11_999).is_empty(), "within grace");
        let marks = b.sweep(&known(&["a"]), 12_000);
        assert_eq!(marks, vec![("a".to_string(), true)]);
        assert!(b.mark(&marks, 12_000).is_empty());
        assert!(b.is_offline("a"));
        assert!(b.sweep(&known(&["a"]), 13_000).is_empty(), "reported once");
        let (row, back) = b.session_started("a", 14_000);
        assert!(back, "back online changes the catalog");
        assert!(row.connected && !row.offline && row.replica == "r1");
        // A node never seen counts from its enrollment, and never from before this
        // replica started; a live one never goes.
        let mut b = HealthBook::new("r1", Duration::from_secs(10), 5_000);
        b.session_started("live", 5_000);
        assert!(b.sweep(&known(&["new", "live"]), 14_999).is_empty());
        let marks = b.sweep(&known(&["new", "live"]), 15_000);
        assert_eq!(marks, vec![("new".to_string(), true)]);
        let rows = b.mark(&marks, 15_000);
        assert_eq!(rows.len(), 1, "a row is made for a node that had none");
        assert!(b.is_offline("new") && !b.is_offline("live"));
    }

    #[test]
    fn a_dead_replicas_nodes_go_offline_a_grace_period_after_its_last_heartbeat() {
        let mut b = HealthBook::new("r1", Duration::from_secs(10), 0);
        b.load(vec![LiveRecord {
            name: "a".into(),
            replica: "r2".into(),
            connected: true,
            changed_at: 1_000,
            offline: false,
            reach: String::new(),
            checks: String::new(),
        }]);
        b.set_beats([("r2".to_string(), 3_000)]);
        // r2 beat at 3 s: alive until 8 s, its nodes gone from 3 s, offline at 13 s.
        assert!(b.connected("a", 7_999));
        assert_eq!(b.replica_of("a", 7_999), Some("r2"));
        assert!(!b.connected("a", 8_000), "dead replica holds no session");
        assert!(b.sweep(&known(&["a"]), 12_999).is_empty());
        assert_eq!(
            b.sweep(&known(&["a"]), 13_000),
            vec![("a".to_string(), true)]
        );
        // Denied twin: the same row with r2 still beating stays online.
        b.set_beats([("r2".to_string(), 12_000)]);
        assert!(b.sweep(&known(&["a"]), 13_000).is_empty());
        // A session ended on another replica is not ended again by this one.
        b.session_ended("a", 13_000);
        assert!(b.connected("a", 13_000));
    }

    #[test]
    fn reports_change_the_catalog_only_on_transitions_of_hosted_services() {
        let mut b = HealthBook::new("r1", DEFAULT_OFFLINE_AFTER, 0);
        let hosted = vec!["api".to_string()];
        assert!(
            b.report("a", &hosted, &[check("api", Health::Passing)], 1)
                .1
        );
        assert!(
            !b.report("a", &hosted, &[check("api", Health::Passing)], 2)
                .1,
            "same state"
        );
        assert!(b.critical("a").is_empty());
        // A service the node does not host is ignored (denied twin).
        assert!(
            !b.report("a", &hosted, &[check("db", Health::Critical)], 3)
                .1
        );
        assert!(b.critical("a").is_empty());
        assert!(b.routable("a", "api"));
        let (row, changed) = b.report("a", &hosted, &[check("api", Health::Critical)], 4);
        assert!(changed);
        assert_eq!(b.critical("a"), vec!["api".to_string()]);
        assert!(!b.routable("a", "api"), "critical is not routed to");
        assert!(b.routable("a", "web"), "an unchecked service is");
        assert_eq!(b.check("a", "api").unwrap().since, 4);
        // What another replica reads back is the same.
        let mut other = HealthBook::new("r2", DEFAULT_OFFLINE_AFTER, 0);
        other.load(vec![row]);
        assert_eq!(other.critical("a"), vec!["api".to_string()]);
        assert_eq!(other.check("a", "api").unwrap().since, 4);
    }

    #[test]
    fn a_moved_control_connection_moves_the_observed_candidate() {
        let mut b = HealthBook::new("r1", DEFAULT_OFFLINE_AFTER, 0);
        let old: SocketAddr = "198.18.0.1:7800".parse().unwrap();
        let new: SocketAddr = "198.18.0.9:4000".parse().unwrap();
        let lan: SocketAddr = "10.0.0.1:7800".parse().unwrap();
        assert!(b
            .set_reach(
                "a",
                Reach {
                    candidates: vec![old, lan],
                    relay: false,
                    observed: Some(old),
                    nat: false,
                },
            )
            .is_some());
        assert!(b.follow("a", old).is_none(), "not moved");
        let row = b.follow("a", new).unwrap();
        assert!(row.reach.contains("198.18.0.9:4000"));
        assert_eq!(b.reach("a").unwrap().candidates, vec![new, lan]);
    }
}
