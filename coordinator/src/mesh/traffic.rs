//! What nodes report about their traffic, summed per service pair for the dashboard.

use super::*;

impl Mesh {
    /// Records a node's status report's traffic; wakes traffic watchers when it changed.
    pub fn report_traffic(&self, node: &str, traffic: Vec<quicmesh_protocol::wire::PairTraffic>) {
        self.store_report(&self.traffic, node, traffic);
    }

    /// Keeps `node`'s latest report in `reports`; wakes traffic watchers when it changed.
    fn store_report<T: PartialEq>(
        &self,
        reports: &Mutex<HashMap<String, T>>,
        node: &str,
        report: T,
    ) {
        let mut m = reports.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(node) == Some(&report) {
            return;
        }
        m.insert(node.to_string(), report);
        drop(m);
        self.traffic_tx.send_modify(|v| *v += 1);
    }

    /// Records a node's HTTP route report; wakes traffic watchers when it changed. Only
    /// what the node may have seen is kept: routes of its own services (the source at its
    /// egress, the destination at its ingress), whole latency arrays, at most
    /// [`quicmesh_protocol::wire::MAX_ROUTE_REPORTS`] of them.
    pub fn report_http_traffic(
        &self,
        node: &str,
        services: &[String],
        mut routes: Vec<quicmesh_protocol::wire::RouteTraffic>,
    ) {
        use quicmesh_protocol::wire::{LATENCY_BUCKETS, MAX_ROUTE_REPORTS};
        routes.truncate(MAX_ROUTE_REPORTS);
        routes.retain(|r| {
            let own = if r.egress { &r.src } else { &r.dst };
            r.latency.len() == LATENCY_BUCKETS && services.iter().any(|s| s == own.as_str())
        });
        self.store_report(&self.http_traffic, node, routes);
    }

    /// Records how a node's `http` upstreams route (sent once per session). Only routes
    /// whose source is one of the node's own services are kept, at most
    /// [`quicmesh_protocol::wire::MAX_ROUTE_REPORTS`].
    pub fn report_http_routes(
        &self,
        node: &str,
        services: &[String],
        mut routes: Vec<quicmesh_protocol::wire::RouteSettings>,
    ) {
        routes.truncate(quicmesh_protocol::wire::MAX_ROUTE_REPORTS);
        routes.retain(|r| services.iter().any(|s| s == r.src.as_str()));
        self.store_report(&self.http_routes, node, routes);
    }

    /// The routes every node reported, by node name.
    pub fn http_routes(&self) -> Vec<serde_json::Value> {
        let m = self.http_routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut nodes: Vec<&String> = m.keys().collect();
        nodes.sort();
        nodes
            .into_iter()
            .flat_map(|n| {
                m[n].iter().map(move |r| {
                    serde_json::json!({
                        "node": n,
                        "src": r.src.as_str(),
                        "dst": r.dst.as_str(),
                        "route": r.route,
                        "path_prefix": r.path_prefix,
                        "headers": r.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>(),
                        "split": r.split.iter().map(|(labels, weight)| serde_json::json!({"labels": labels, "weight": weight})).collect::<Vec<_>>(),
                        "timeout_ms": r.timeout_ms,
                        "per_try_timeout_ms": r.per_try_timeout_ms,
                        "retries": r.retries,
                        "fault": r.fault,
                    })
                })
            })
            .collect()
    }

    /// HTTP requests per (side, source, destination, route), summed over the nodes'
    /// reports, with latency quantiles from the merged buckets.
    pub fn http_traffic(&self) -> Vec<RouteView> {
        let m = self.http_traffic.lock().unwrap_or_else(|p| p.into_inner());
        type Key = (bool, String, String, String);
        let mut routes: BTreeMap<Key, (RouteView, Vec<u64>)> = BTreeMap::new();
        for (node, report) in m.iter() {
            for r in report {
                let key = (
                    r.egress,
                    r.src.to_string(),
                    r.dst.to_string(),
                    r.route.clone(),
                );
                let (v, buckets) = routes.entry(key).or_insert_with(|| {
                    (
                        RouteView {
                            side: if r.egress { "egress" } else { "ingress" },
                            src: r.src.to_string(),
                            dst: r.dst.to_string(),
                            route: r.route.clone(),
                            requests: 0,
                            classes: BTreeMap::new(),
                            p50_ms: None,
                            p99_ms: None,
                            reporters: Vec::new(),
                        },
                        vec![0; quicmesh_protocol::wire::LATENCY_BUCKETS],
                    )
                });
                for (i, n) in r.classes.iter().enumerate() {
                    if *n > 0 {
                        let c = v.classes.entry(format!("{}xx", i + 1)).or_default();
                        *c = c.saturating_add(*n);
                        v.requests = v.requests.saturating_add(*n);
                    }
                }
                for (b, n) in buckets.iter_mut().zip(&r.latency) {
                    *b = b.saturating_add(*n);
                }
                v.reporters.push(node.clone());
            }
        }
        routes
            .into_values()
            .map(|(mut v, buckets)| {
                v.p50_ms = quicmesh_protocol::wire::bucket_quantile_ms(&buckets, 0.5);
                v.p99_ms = quicmesh_protocol::wire::bucket_quantile_ms(&buckets, 0.99);
                v
            })
            .collect()
    }

    /// Follows traffic report changes.
    pub fn subscribe_traffic(&self) -> watch::Receiver<u64> {
        self.traffic_tx.subscribe()
    }

    /// Traffic per service pair, summed over the nodes' reports (revoked nodes' too:
    /// what happened, happened).
    pub fn traffic(&self) -> Vec<PairView> {
        let m = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        type Merged = (PairView, Option<hdrhistogram::Histogram<u64>>);
        let mut pairs: BTreeMap<(String, String), Merged> = BTreeMap::new();
        for (node, report) in m.iter() {
            for t in report {
                let (v, h) = pairs
                    .entry((t.src.to_string(), t.dst.to_string()))
                    .or_insert_with(|| {
                        (
                            PairView {
                                src: t.src.to_string(),
                                dst: t.dst.to_string(),
                                flows: 0,
                                bytes: 0,
                                denials: BTreeMap::new(),
                                denied: 0,
                                ingress_denials: BTreeMap::new(),
                                setup_p50_ms: None,
                                setup_p99_ms: None,
                                setup_samples: 0,
                                reporters: Vec::new(),
                            },
                            None,
                        )
                    });
                v.flows += t.flows;
                v.bytes += t.bytes;
                for (r, n) in &t.denials {
                    *v.denials.entry(r.clone()).or_default() += n;
                    v.denied += n;
                }
                for (r, n) in &t.ingress_denials {
                    *v.ingress_denials.entry(r.clone()).or_default() += n;
                }
                if !t.setup_us.is_empty() {
                    let h = h.get_or_insert_with(|| {
                        hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2)
                            .expect("valid bounds")
                    });
                    for (value, count) in &t.setup_us {
                        let _ = h.record_n((*value).clamp(1, 60_000_000), *count);
                    }
                }
                v.reporters.push(node.clone());
            }
        }
        pairs
            .into_values()
            .map(|(mut v, h)| {
                if let Some(h) = h {
                    v.setup_p50_ms = Some(h.value_at_quantile(0.5) as f64 / 1e3);
                    v.setup_p99_ms = Some(h.value_at_quantile(0.99) as f64 / 1e3);
                    v.setup_samples = h.len();
                }
                v
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_protocol::wire::{RouteSettings, RouteTraffic, LATENCY_BUCKETS};

    fn mesh() -> (tempfile::TempDir, Arc<Mesh>) {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), TrustDomain::new("t.test").unwrap()).unwrap();
        let mesh = Mesh::open(dir.path(), 3600).unwrap();
        (dir, mesh)
    }

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn settings(src: &str, route: &str) -> RouteSettings {
        RouteSettings {
            src: svc(src),
            dst: svc("api"),
            route: route.into(),
            path_prefix: Some("/".into()),
            headers: vec![],
            split: vec![],
            timeout_ms: 1000,
            per_try_timeout_ms: None,
            retries: 0,
            fault: None,
        }
    }

    /// A node names the services it hosts at enrollment; a report about another node's
    /// upstreams would let it paint routes the operator never configured on the dashboard.
    #[test]
    fn a_node_s_route_report_keeps_only_its_own_services_routes() {
        let (_d, m) = mesh();
        let own = ["web".to_string()];
        m.report_http_routes(
            "web-1",
            &own,
            vec![settings("web", "canary"), settings("billing", "forged")],
        );
        let routes = m.http_routes();
        let names: Vec<&str> = routes.iter().filter_map(|r| r["route"].as_str()).collect();
        assert_eq!(names, ["canary"], "{routes:?}");
        assert_eq!(routes[0]["node"], "web-1");
        // No more than MAX_ROUTE_REPORTS are kept, however many are sent.
        let many = (0..1000)
            .map(|i| settings("web", &format!("r{i}")))
            .collect();
        m.report_http_routes("web-1", &own, many);
        assert_eq!(
            m.http_routes().len(),
            quicmesh_protocol::wire::MAX_ROUTE_REPORTS
        );
    }

    #[test]
    fn a_node_s_http_traffic_keeps_only_what_its_own_side_saw() {
        let (_d, m) = mesh();
        let route = |egress, src: &str, dst: &str, buckets| RouteTraffic {
            egress,
            src: svc(src),
            dst: svc(dst),
            route: "default".into(),
            classes: [0, 5, 0, 0, 0],
            latency: vec![0; buckets],
        };
        m.report_http_traffic(
            "web-1",
            &["web".to_string()],
            vec![
                // Its own egress (source web) and its own ingress (destination web).
                route(true, "web", "api", LATENCY_BUCKETS),
                route(false, "api", "web", LATENCY_BUCKETS),
                // Another node's egress, another node's ingress, a malformed histogram.
                route(true, "billing", "api", LATENCY_BUCKETS),
                route(false, "web", "api", LATENCY_BUCKETS),
                route(true, "web", "db", 3),
            ],
        );
        let seen: Vec<(&str, String, String)> = m
            .http_traffic()
            .into_iter()
            .map(|r| (r.side, r.src, r.dst))
            .collect();
        assert_eq!(
            seen,
            [
                ("ingress", "api".to_string(), "web".to_string()),
                ("egress", "web".to_string(), "api".to_string()),
            ]
        );
    }
}
