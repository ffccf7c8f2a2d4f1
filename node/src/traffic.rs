//! Per service pair traffic, as this node saw it, for the coordinator's traffic page:
//! flows, bytes and denials counted where the flow starts (the client's node: every
//! attempt is seen there exactly once, whichever side refused it), flow setup latency in
//! an hdrhistogram, and refusals at this node's ingress beside them. Reported, cumulative,
//! with every status report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use quicmesh_protocol::ident::ServiceName;
use quicmesh_protocol::wire::{
    latency_bucket, PairTraffic, RouteTraffic, LATENCY_BUCKETS, MAX_ROUTE_REPORTS,
};

/// Most service pairs tracked (a peer may name any source service at ingress).
const MAX_PAIRS: usize = 1024;

#[derive(Default)]
struct Pair {
    flows: u64,
    /// Added to by the flows' pumps as they go.
    bytes: Arc<AtomicU64>,
    denials: BTreeMap<String, u64>,
    ingress_denials: BTreeMap<String, u64>,
    /// Flow setup (stream open to the ingress's answer), microseconds.
    setup: Option<Histogram<u64>>,
}

/// One route's requests: by status class, and latency buckets.
struct RouteStat {
    classes: [u64; 5],
    latency: [u64; LATENCY_BUCKETS],
}

/// The most a route report may take on the wire (the control frame's limit is 64 KiB).
const REPORT_BYTES: usize = 48 * 1024;

/// Most routes tracked (direction, source, destination, route).
const MAX_ROUTES: usize = 512;

/// The node's per pair counters.
#[derive(Default)]
pub struct Traffic {
    pairs: Mutex<BTreeMap<(String, String), Pair>>,
    routes: Mutex<BTreeMap<(bool, String, String, String), RouteStat>>,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic").finish_non_exhaustive()
    }
}

impl Traffic {
    fn with(&self, src: &str, dst: &str, f: impl FnOnce(&mut Pair)) {
        let Ok(mut m) = self.pairs.lock() else {
            return;
        };
        let key = (src.to_string(), dst.to_string());
        if !m.contains_key(&key) && m.len() >= MAX_PAIRS {
            return;
        }
        f(m.entry(key).or_default());
    }

    /// A flow this node started was accepted after `setup`.
    pub fn flow(&self, src: &str, dst: &str, setup: Duration) {
        self.with(src, dst, |p| {
            p.flows += 1;
            let h = p.setup.get_or_insert_with(|| {
                Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds")
            });
            let _ = h.record((setup.as_micros() as u64).clamp(1, 60_000_000));
        });
    }

    /// The byte counter of a pair (both directions), for a flow's pump.
    pub fn bytes(&self, src: &str, dst: &str) -> Option<Arc<AtomicU64>> {
        let mut out = None;
        self.with(src, dst, |p| out = Some(p.bytes.clone()));
        out
    }

    /// A flow refused: at this node's egress (`ingress = false`: every refusal of a flow
    /// this node started, whichever side refused) or at its ingress.
    pub fn denied(&self, src: &str, dst: &str, reason: &str, ingress: bool) {
        self.with(src, dst, |p| {
            let m = if ingress {
                &mut p.ingress_denials
            } else {
                &mut p.denials
            };
            *m.entry(reason.to_string()).or_default() += 1;
        });
    }

    /// An HTTP request answered with `status` after `elapsed`, at this node's egress or
    /// ingress.
    pub fn request(
        &self,
        egress: bool,
        src: &str,
        dst: &str,
        route: &str,
        status: u16,
        elapsed: Duration,
    ) {
        let Ok(mut m) = self.routes.lock() else {
            return;
        };
        let key = (egress, src.to_string(), dst.to_string(), route.to_string());
        if !m.contains_key(&key) && m.len() >= MAX_ROUTES {
            return;
        }
        let r = m.entry(key).or_insert_with(|| RouteStat {
            classes: [0; 5],
            latency: [0; LATENCY_BUCKETS],
        });
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        r.classes[class] += 1;
        r.latency[latency_bucket(elapsed.as_micros() as u64)] += 1;
    }

    /// The routes so far (the busiest first, at most [`MAX_ROUTE_REPORTS`]).
    pub fn http_report(&self) -> Vec<RouteTraffic> {
        let Ok(m) = self.routes.lock() else {
            return Vec::new();
        };
        let mut v: Vec<RouteTraffic> = m
            .iter()
            .filter_map(|((egress, src, dst, route), r)| {
                Some(RouteTraffic {
                    egress: *egress,
                    src: ServiceName::new(src.as_str()).ok()?,
                    dst: ServiceName::new(dst.as_str()).ok()?,
                    route: route.clone(),
                    classes: r.classes,
                    latency: r.latency.to_vec(),
                })
            })
            .collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.classes.iter().sum::<u64>()));
        v.truncate(MAX_ROUTE_REPORTS);
        // Within a control frame whatever the names and counts: the quietest go first.
        while !v.is_empty()
            && quicmesh_protocol::wire::encode(&quicmesh_protocol::wire::ControlUp::HttpTraffic(
                v.clone(),
            ))
            .len()
                > REPORT_BYTES
        {
            let keep = v.len() * 3 / 4;
            v.truncate(keep);
        }
        v
    }

    /// Everything so far, for the status report.
    pub fn report(&self) -> Vec<PairTraffic> {
        let Ok(m) = self.pairs.lock() else {
            return Vec::new();
        };
        m.iter()
            .filter_map(|((src, dst), p)| {
                Some(PairTraffic {
                    src: ServiceName::new(src.as_str()).ok()?,
                    dst: ServiceName::new(dst.as_str()).ok()?,
                    flows: p.flows,
                    bytes: p.bytes.load(Ordering::Relaxed),
                    denials: p.denials.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    ingress_denials: p
                        .ingress_denials
                        .iter()
                        .map(|(k, v)| (k.clone(), *v))
                        .collect(),
                    setup_us: p
                        .setup
                        .as_ref()
                        .map(|h| {
                            h.iter_recorded()
                                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_count_flows_bytes_and_denials_by_side() {
        let t = Traffic::default();
        t.flow("web", "db", Duration::from_micros(800));
        t.flow("web", "db", Duration::from_micros(1200));
        t.bytes("web", "db")
            .unwrap()
            .fetch_add(4096, Ordering::Relaxed);
        t.denied("web", "db", "policy_denied", false);
        t.denied("batch", "db", "policy_denied", true);
        let r = t.report();
        let web = r.iter().find(|p| p.src.as_str() == "web").unwrap();
        assert_eq!((web.flows, web.bytes), (2, 4096));
        assert_eq!(web.denials, vec![("policy_denied".to_string(), 1)]);
        assert!(web.ingress_denials.is_empty());
        assert_eq!(web.setup_us.iter().map(|(_, c)| c).sum::<u64>(), 2);
        let batch = r.iter().find(|p| p.src.as_str() == "batch").unwrap();
        assert_eq!(
            batch.ingress_denials,
            vec![("policy_denied".to_string(), 1)]
        );
        assert_eq!(batch.flows, 0);
    }

    #[test]
    fn routes_count_requests_by_class_and_latency_and_stay_bounded() {
        let t = Traffic::default();
        t.request(
            true,
            "web",
            "api",
            "canary",
            200,
            Duration::from_micros(500),
        );
        t.request(true, "web", "api", "canary", 503, Duration::from_millis(20));
        t.request(
            false,
            "web",
            "api",
            "default",
            403,
            Duration::from_micros(80),
        );
        let r = t.http_report();
        let canary = r.iter().find(|x| x.route == "canary").unwrap();
        assert_eq!(canary.classes, [0, 1, 0, 0, 1]);
        assert!(canary.egress);
        assert_eq!(canary.latency.iter().sum::<u64>(), 2);
        for i in 0..MAX_ROUTES + 10 {
            t.request(
                false,
                "web",
                "api",
                &format!("r{i}"),
                200,
                Duration::from_micros(1),
            );
        }
        assert_eq!(t.routes.lock().unwrap().len(), MAX_ROUTES);
        assert_eq!(
            t.http_report().len(),
            MAX_ROUTE_REPORTS,
            "a report stays within its size"
        );
        let bytes = quicmesh_protocol::wire::encode(
            &quicmesh_protocol::wire::ControlUp::HttpTraffic(t.http_report()),
        );
        assert!(
            bytes.len() < 64 * 1024,
            "within a control frame: {}",
            bytes.len()
        );
    }

    #[test]
    fn the_pair_table_is_bounded() {
        let t = Traffic::default();
        for i in 0..MAX_PAIRS + 10 {
            t.denied(&format!("s{i}"), "db", "policy_denied", true);
        }
        assert_eq!(t.report().len(), MAX_PAIRS);
    }
}
