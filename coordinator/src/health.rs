//! What the coordinator knows of instance health: each node's last reported checks, and
//! which nodes are offline (no control session for longer than the grace period).
//!
//! Held in memory only: a node reports all its checks again at every session start, and
//! after a coordinator restart every node gets the grace period to reconnect before it is
//! called offline. Time is passed in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use quicmesh_protocol::health::{self, Health, ServiceCheck};
use serde::Serialize;

/// Default grace period before a node without a session is offline.
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(15);

/// A service check as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckView {
    pub health: Health,
    pub output: String,
    /// Unix seconds of the last state change (or first report).
    pub since: i64,
}

#[derive(Debug)]
pub struct HealthBook {
    grace: Duration,
    /// Nodes without a live session, since when.
    gone_since: HashMap<String, Instant>,
    /// Nodes with a live session.
    live: HashSet<String>,
    offline: HashSet<String>,
    checks: HashMap<String, BTreeMap<String, CheckView>>,
}

impl HealthBook {
    pub fn new(grace: Duration) -> Self {
        HealthBook {
            grace,
            gone_since: HashMap::new(),
            live: HashSet::new(),
            offline: HashSet::new(),
            checks: HashMap::new(),
        }
    }

    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// A session started; true when the node was offline (the catalog changes).
    pub fn session_started(&mut self, node: &str) -> bool {
        self.live.insert(node.to_string());
        self.gone_since.remove(node);
        self.offline.remove(node)
    }

    /// The node's session ended.
    pub fn session_ended(&mut self, node: &str, now: Instant) {
        self.live.remove(node);
        self.gone_since.insert(node.to_string(), now);
    }

    /// Marks offline every node in `known` gone longer than the grace period (a node never
    /// seen since this coordinator started counts from the first sweep); true when any
    /// changed.
    pub fn sweep<'a>(&mut self, known: impl IntoIterator<Item = &'a str>, now: Instant) -> bool {
        let mut changed = false;
        for node in known {
            if self.live.contains(node) || self.offline.contains(node) {
                continue;
            }
            let since = *self.gone_since.entry(node.to_string()).or_insert(now);
            if now.duration_since(since) >= self.grace {
                tracing::info!(node, grace = ?self.grace, "node offline: no control session");
                self.offline.insert(node.to_string());
                changed = true;
            }
        }
        changed
    }

    pub fn is_offline(&self, node: &str) -> bool {
        self.offline.contains(node)
    }

    /// Records a node's report (restricted to `services`, the ones it hosts); true when a
    /// service's health changed (the catalog changes). New output alone changes nothing
    /// routable.
    pub fn report(
        &mut self,
        node: &str,
        services: &[String],
        checks: &[ServiceCheck],
        unix_now: i64,
    ) -> bool {
        let book = self.checks.entry(node.to_string()).or_default();
        let mut changed = false;
        for c in checks {
            let name = c.service.as_str();
            if !services.iter().any(|s| s == name) {
                continue;
            }
            let output = health::truncate(&c.output, health::MAX_OUTPUT);
            match book.get_mut(name) {
                Some(v) if v.health == c.health => v.output = output,
                _ => {
                    tracing::info!(node, service = name, health = c.health.as_str(), %output, "instance health");
                    book.insert(
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
        changed
    }

    /// The node's services reported critical.
    pub fn critical(&self, node: &str) -> Vec<String> {
        self.checks
            .get(node)
            .map(|b| {
                b.iter()
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
                .checks
                .get(node)
                .and_then(|b| b.get(service))
                .is_none_or(|c| c.health == Health::Passing)
    }

    pub fn check(&self, node: &str, service: &str) -> Option<CheckView> {
        self.checks.get(node).and_then(|b| b.get(service)).cloned()
    }

    /// Forgets a node (revoked).
    pub fn forget(&mut self, node: &str) {
        self.checks.remove(node);
        self.gone_since.remove(node);
        self.offline.remove(node);
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

    #[test]
    fn offline_only_after_the_grace_period_and_back_on_a_session() {
        let t0 = Instant::now();
        let mut b = HealthBook::new(Duration::from_secs(10));
        assert!(!b.session_started("a"));
        b.session_ended("a", t0);
        assert!(!b.sweep(["a"], t0 + Duration::from_secs(9)), "within grace");
        assert!(!b.is_offline("a"));
        assert!(b.sweep(["a"], t0 + Duration::from_secs(10)));
        assert!(b.is_offline("a"));
        assert!(
            !b.sweep(["a"], t0 + Duration::from_secs(11)),
            "reported once"
        );
        assert!(b.session_started("a"), "back online changes the catalog");
        // A node never seen since start counts from the first sweep; a live one never goes.
        b.session_started("live");
        assert!(!b.sweep(["new", "live"], t0));
        assert!(b.sweep(["new", "live"], t0 + Duration::from_secs(10)));
        assert!(b.is_offline("new") && !b.is_offline("live"));
    }

    #[test]
    fn reports_change_the_catalog_only_on_transitions_of_hosted_services() {
        let mut b = HealthBook::new(DEFAULT_OFFLINE_AFTER);
        let hosted = vec!["api".to_string()];
        assert!(b.report("a", &hosted, &[check("api", Health::Passing)], 1));
        assert!(
            !b.report("a", &hosted, &[check("api", Health::Passing)], 2),
            "same state"
        );
        assert!(b.critical("a").is_empty());
        // A service the node does not host is ignored (denied twin).
        assert!(!b.report("a", &hosted, &[check("db", Health::Critical)], 3));
        assert!(b.critical("a").is_empty());
        assert!(b.routable("a", "api"));
        assert!(b.report("a", &hosted, &[check("api", Health::Critical)], 4));
        assert_eq!(b.critical("a"), vec!["api".to_string()]);
        assert!(!b.routable("a", "api"), "critical is not routed to");
        assert!(b.routable("a", "web"), "an unchecked service is");
        assert_eq!(b.check("a", "api").unwrap().since, 4);
    }
}
