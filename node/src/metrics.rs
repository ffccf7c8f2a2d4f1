//! Counters of everything the node accepts, refuses and closes, with a reason label on
//! every refusal. Exposed as Prometheus text on a loopback port and in `status`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use quicmesh_protocol::wire::RejectCode;

use crate::reason::{
    CloseReason, DnsDrop, DropReason, HandshakeRefusal, HttpRefusal, Label, RelayDrop,
    RequestRefusal,
};
use quicmesh_protocol::path::ProbeRefusal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyExchangeLabels {
    /// "tunnel" or "control".
    session: &'static str,
    /// The negotiated group ("X25519MLKEM768", "X25519", ...; "unknown" if not read).
    group: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    src_service: String,
    dst_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    reason: String,
    src_service: String,
    dst_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: String,
    src_service: String,
    dst_service: String,
    route: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    direction: String,
    src_service: String,
    dst_service: String,
    route: String,
}

type LatencyFamily = Family<LatencyLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to ~26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// One HTTP request's outcome, for [`Metrics::http_request`].
#[derive(Debug, Clone, Copy)]
pub struct RequestOutcome<'a> {
    pub direction: crate::authz::Direction,
    pub src: &'a str,
    pub dst: &'a str,
    /// The route that carried it (`default` when no route matched).
    pub route: &'a str,
    pub status: u16,
    pub elapsed: std::time::Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EjectionLabels {
    service: String,
    kept: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    service: String,
    health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    direction: String,
}

/// The overlay's Prometheus counters.
#[derive(Debug, Clone)]
pub struct OverlayMetrics {
    pub tx_packets: Counter,
    pub rx_packets: Counter,
    pub tx_bytes: Counter,
    pub rx_bytes: Counter,
    /// Indexed by [`Label::index`] of [`DropReason`].
    pub dropped: [Counter; DropReason::COUNT],
}

/// The WireGuard gateway's counters.
#[derive(Debug, Clone, Default)]
pub struct WgMetrics {
    /// Datagrams from the network the gateway dropped, and packets for clients it could
    /// not send, by reason.
    dropped: Family<ReasonLabels, Counter>,
    /// Cookies sent (handshakes refused under load until their source proves itself).
    pub cookies: Counter,
    /// Handshakes completed (answered).
    pub handshakes: Counter,
    /// Inner bytes to and from each client (read from the sessions every tick).
    client_bytes: Family<ClientDirLabels, Gauge>,
    pub clients: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientDirLabels {
    client: String,
    direction: String,
}

impl WgMetrics {
    pub fn dropped(&self, reason: crate::reason::WgDrop) {
        self.dropped
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// Sets a client's byte gauges (to the client, from it).
    pub fn client_bytes(&self, client: &str, tx: u64, rx: u64) {
        for (d, v) in [("to_client", tx), ("from_client", rx)] {
            self.client_bytes
                .get_or_create(&ClientDirLabels {
                    client: client.into(),
                    direction: d.into(),
                })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }

    /// Forgets a client's gauges (it is no longer served).
    pub fn forget_client(&self, client: &str) {
        for d in ["to_client", "from_client"] {
            self.client_bytes.remove(&ClientDirLabels {
                client: client.into(),
                direction: d.into(),
            });
        }
    }
}

/// The path layer's counters (relaying, probes, route changes).
#[derive(Debug, Clone, Default)]
pub struct PathMetrics {
    /// QUIC datagrams this node sent / received through a relay.
    pub relayed_tx: Counter,
    pub relayed_rx: Counter,
    /// Datagrams this node forwarded as a relay, and their bytes.
    pub relay_forwarded: Counter,
    pub relay_forwarded_bytes: Counter,
    /// Openers sent (small-TTL datagrams that open this node's NAT toward a peer), and
    /// openers that reached this node (their TTL outlived the path: harmless, counted).
    pub openers_sent: Counter,
    pub openers_received: Counter,
    /// Port-dependent NAT attempts (the path layer's spare sockets) made, and the
    /// spare sockets that got through and carry a tunnel.
    pub spare_attempts: Counter,
    pub spare_won: Counter,
    relay_dropped: Family<ReasonLabels, Counter>,
    probes_refused: Family<ReasonLabels, Counter>,
    switches: Family<ReasonLabels, Counter>,
}

impl PathMetrics {
    /// A datagram the relay path dropped, by reason.
    pub fn relay_dropped(&self, reason: RelayDrop) {
        self.relay_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// A path probe refused, by reason.
    pub fn probe_refused(&self, reason: ProbeRefusal) {
        self.probes_refused
            .get_or_create(&ReasonLabels {
                reason: reason.label().into(),
            })
            .inc();
    }

    /// A tunnel moved to a route of this kind (`direct` or `relay`).
    pub fn path_switch(&self, kind: &str) {
        self.switches
            .get_or_create(&ReasonLabels {
                reason: kind.into(),
            })
            .inc();
    }
}

/// The node's metrics.
pub struct Metrics {
    paths: PathMetrics,
    /// Per service pair traffic for the coordinator (see [`crate::traffic`]).
    pub traffic: crate::traffic::Traffic,
    registry: Registry,
    ingress_accepted: Family<FlowLabels, Counter>,
    ingress_rejected: Family<RejectLabels, Counter>,
    egress_accepted: Family<FlowLabels, Counter>,
    egress_rejected: Family<RejectLabels, Counter>,
    handshake_refused: Family<ReasonLabels, Counter>,
    handshakes: Family<KeyExchangeLabels, Counter>,
    flows_closed: Family<ReasonLabels, Counter>,
    tunnels_closed: Family<ReasonLabels, Counter>,
    bytes: Family<DirLabels, Counter>,
    /// The two byte counters, resolved once: the pump adds to them on every read, so no
    /// label allocation or family lock on the data path.
    bytes_to_tunnel: Counter,
    bytes_from_tunnel: Counter,
    flows_active: Gauge,
    snapshot_version: Gauge,
    cert_not_after: Gauge,
    peers_connected: Gauge,
    peers_silent: Counter,
    data_with_header: Counter,
    overlay_packets: Family<DirLabels, Counter>,
    overlay_bytes: Family<DirLabels, Counter>,
    overlay_dropped: Family<ReasonLabels, Counter>,
    wg: WgMetrics,
    health_transitions: Family<HealthLabels, Counter>,
    http_refused: Family<ReasonLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: LatencyFamily,
    requests_refused: Family<RejectLabels, Counter>,
    retries: Family<FlowLabels, Counter>,
    /// Spans the OTLP export queue had no room for.
    pub spans_dropped: Counter,
    ejections: Family<EjectionLabels, Counter>,
    dns_dropped: Family<ReasonLabels, Counter>,
    service_passing: Family<ServiceLabels, Gauge>,
    accepted_total: AtomicU64,
    rejected_total: AtomicU64,
    /// `kind/reason` -> count, for `status`.
    reasons: Mutex<BTreeMap<String, u64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("quicmesh");
        let m = Self {
            registry: Registry::default(),
            paths: PathMetrics::default(),
            traffic: Default::default(),
            ingress_accepted: Family::default(),
            ingress_rejected: Family::default(),
            egress_accepted: Family::default(),
            egress_rejected: Family::default(),
            handshake_refused: Family::default(),
            handshakes: Family::default(),
            flows_closed: Family::default(),
            tunnels_closed: Family::default(),
            bytes: Family::default(),
            bytes_to_tunnel: Counter::default(),
            bytes_from_tunnel: Counter::default(),
            flows_active: Gauge::default(),
            snapshot_version: Gauge::default(),
            cert_not_after: Gauge::default(),
            peers_connected: Gauge::default(),
            peers_silent: Counter::default(),
            data_with_header: Counter::default(),
            overlay_packets: Family::default(),
            overlay_bytes: Family::default(),
            overlay_dropped: Family::default(),
            wg: WgMetrics::default(),
            health_transitions: Family::default(),
            http_refused: Family::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            requests_refused: Family::default(),
            retries: Family::default(),
            spans_dropped: Counter::default(),
            ejections: Family::default(),
            dns_dropped: Family::default(),
            service_passing: Family::default(),
            accepted_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            reasons: Mutex::new(BTreeMap::new()),
        };
        registry.register(
            "ingress_accepted",
            "Flows accepted at tunnel ingress",
            m.ingress_accepted.clone(),
        );
        registry.register(
            "ingress_rejected",
            "Flows rejected at tunnel ingress, by reason",
            m.ingress_rejected.clone(),
        );
        registry.register(
            "egress_accepted",
            "Flows the peer accepted for local clients",
            m.egress_accepted.clone(),
        );
        registry.register(
            "egress_rejected",
            "Flows of local clients refused, by reason",
            m.egress_rejected.clone(),
        );
        registry.register(
            "handshake_refused",
            "Peer certificates refused at the tunnel handshake, by reason",
            m.handshake_refused.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Completed handshakes (tunnels and the control session), by negotiated key exchange group",
            m.handshakes.clone(),
        );
        registry.register(
            "flows_closed",
            "Live flows closed by the node, by reason",
            m.flows_closed.clone(),
        );
        registry.register(
            "tunnels_closed",
            "Peer tunnels closed by the node, by reason",
            m.tunnels_closed.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes proxied through tunnels",
            m.bytes.clone(),
        );
        registry.register(
            "flows_active",
            "Proxied flows open now",
            m.flows_active.clone(),
        );
        registry.register(
            "health_transitions",
            "Health changes of this node's checked services, by service and new state",
            m.health_transitions.clone(),
        );
        registry.register(
            "service_passing",
            "1 while a checked service's health is passing",
            m.service_passing.clone(),
        );
        registry.register(
            "snapshot_version",
            "Version of the applied snapshot",
            m.snapshot_version.clone(),
        );
        registry.register(
            "cert_not_after_seconds",
            "Expiry of the node certificate (Unix time)",
            m.cert_not_after.clone(),
        );
        registry.register(
            "peers_connected",
            "Peer tunnels open now",
            m.peers_connected.clone(),
        );
        registry.register(
            "peer_silent",
            "Flows that found a peer's tunnel silent (nothing back within a bound from its RTT) and moved to the next instance",
            m.peers_silent.clone(),
        );
        registry.register(
            "egress_data_with_header",
            "Streams opened with the client's first bytes after the header (a tunnel the flow brought up; counted again when a refusal sends them to the next instance)",
            m.data_with_header.clone(),
        );
        registry.register(
            "overlay_packets",
            "IP packets carried by the overlay, by direction",
            m.overlay_packets.clone(),
        );
        registry.register(
            "overlay_bytes",
            "Bytes of IP packets carried by the overlay, by direction",
            m.overlay_bytes.clone(),
        );
        registry.register(
            "overlay_dropped",
            "Overlay packets dropped, by reason",
            m.overlay_dropped.clone(),
        );
        registry.register(
            "http_refused",
            "Connections and requests the metrics listener refused, by reason",
            m.http_refused.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests to mesh services, by direction, service pair, route and status class",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency to the response head, by direction, service pair and route",
            m.request_seconds.clone(),
        );
        registry.register(
            "http_requests_refused",
            "HTTP requests the mesh answered itself instead of the service, by reason",
            m.requests_refused.clone(),
        );
        registry.register(
            "http_retries",
            "HTTP requests tried again, by service pair",
            m.retries.clone(),
        );
        registry.register(
            "spans_dropped",
            "Spans dropped because the OTLP export queue was full",
            m.spans_dropped.clone(),
        );
        registry.register(
            "http_ejections",
            "Instances ejected after consecutive failures (kept = the last one, not ejected)",
            m.ejections.clone(),
        );
        registry.register(
            "dns_dropped",
            "DNS queries not served as asked, by reason",
            m.dns_dropped.clone(),
        );
        let p = &m.paths;
        registry.register(
            "relayed_datagrams_sent",
            "Tunnel datagrams this node sent through a relay",
            p.relayed_tx.clone(),
        );
        registry.register(
            "relayed_datagrams_received",
            "Tunnel datagrams this node received through a relay",
            p.relayed_rx.clone(),
        );
        registry.register(
            "relay_forwarded_datagrams",
            "Datagrams this node forwarded between two other nodes as a relay",
            p.relay_forwarded.clone(),
        );
        registry.register(
            "relay_forwarded_bytes",
            "Bytes this node forwarded between two other nodes as a relay",
            p.relay_forwarded_bytes.clone(),
        );
        registry.register(
            "path_openers_sent",
            "Small-TTL openers sent to open this node's NAT toward a peer before dialling it",
            p.openers_sent.clone(),
        );
        registry.register(
            "path_openers_received",
            "Openers that reached this node (their TTL outlived the way here; ignored)",
            p.openers_received.clone(),
        );
        registry.register(
            "path_spare_socket_attempts",
            "Attempts with spare sockets (a fresh port per socket) for a link still relayed",
            p.spare_attempts.clone(),
        );
        registry.register(
            "path_spare_sockets_won",
            "Spare sockets an authenticated probe came through, which then carried the tunnel",
            p.spare_won.clone(),
        );
        let w = &m.wg;
        registry.register(
            "wg_dropped",
            "WireGuard gateway: datagrams and packets for clients dropped, by reason",
            w.dropped.clone(),
        );
        registry.register(
            "wg_cookies_sent",
            "WireGuard gateway: cookies sent to handshakes under load",
            w.cookies.clone(),
        );
        registry.register(
            "wg_handshakes",
            "WireGuard gateway: handshakes answered",
            w.handshakes.clone(),
        );
        registry.register(
            "wg_client_bytes",
            "WireGuard gateway: inner bytes per client and direction",
            w.client_bytes.clone(),
        );
        registry.register(
            "wg_clients",
            "WireGuard gateway: clients served",
            w.clients.clone(),
        );
        registry.register(
            "relay_dropped",
            "Relay datagrams dropped, by reason",
            p.relay_dropped.clone(),
        );
        registry.register(
            "path_probes_refused",
            "Path probes refused, by reason",
            p.probes_refused.clone(),
        );
        registry.register(
            "path_switches",
            "Tunnels moved to another route, by the new route's kind",
            p.switches.clone(),
        );
        let dir = |d: &str| DirLabels {
            direction: d.into(),
        };
        let bytes_to_tunnel = m.bytes.get_or_create(&dir("to_tunnel")).clone();
        let bytes_from_tunnel = m.bytes.get_or_create(&dir("from_tunnel")).clone();
        Self {
            registry,
            bytes_to_tunnel,
            bytes_from_tunnel,
            ..m
        }
    }

    /// The WireGuard gateway's counters.
    pub fn wg(&self) -> WgMetrics {
        self.wg.clone()
    }

    /// The path layer's counters.
    pub fn paths(&self) -> PathMetrics {
        self.paths.clone()
    }

    /// The overlay's counters, resolved once (the data path adds to them per packet).
    pub fn overlay(&self) -> OverlayMetrics {
        // One statement per counter: a family's read guard lives to the end of its
        // statement, and creating the next label needs the write lock.
        let get = |f: &Family<DirLabels, Counter>, d: &str| -> Counter {
            let c = f
                .get_or_create(&DirLabels {
                    direction: d.into(),
                })
                .clone();
            c
        };
        let tx_packets = get(&self.overlay_packets, "to_tunnel");
        let rx_packets = get(&self.overlay_packets, "from_tunnel");
        let tx_bytes = get(&self.overlay_bytes, "to_tunnel");
        let rx_bytes = get(&self.overlay_bytes, "from_tunnel");
        let dropped: [Counter; DropReason::COUNT] = std::array::from_fn(|i| {
            let c = self
                .overlay_dropped
                .get_or_create(&ReasonLabels {
                    reason: DropReason::ALL[i].as_str().into(),
                })
                .clone();
            c
        });
        OverlayMetrics {
            tx_packets,
            rx_packets,
            tx_bytes,
            rx_bytes,
            dropped,
        }
    }

    fn reason(&self, kind: &str, reason: &str) {
        if let Ok(mut r) = self.reasons.lock() {
            *r.entry(format!("{kind}/{reason}")).or_default() += 1;
        }
    }

    /// A flow accepted at ingress.
    pub fn ingress_accepted(&self, src: &str, dst: &str) {
        self.accepted_total.fetch_add(1, Ordering::Relaxed);
        self.ingress_accepted
            .get_or_create(&FlowLabels {
                src_service: src.into(),
                dst_service: dst.into(),
            })
            .inc();
    }

    /// A flow rejected at ingress.
    pub fn ingress_rejected(&self, reason: RejectCode, src: &str, dst: &str) {
        let reason = reason.as_str();
        self.rejected_total.fetch_add(1, Ordering::Relaxed);
        self.reason("ingress_rejected", reason);
        if !src.is_empty() {
            self.traffic.denied(src, dst, reason, true);
        }
        self.ingress_rejected
            .get_or_create(&RejectLabels {
                reason: reason.into(),
                src_service: src.into(),
                dst_service: dst.into(),
            })
            .inc();
    }

    /// A local client's flow accepted by the peer.
    pub fn egress_accepted(&self, src: &str, dst: &str) {
        self.egress_accepted
            .get_or_create(&FlowLabels {
                src_service: src.into(),
                dst_service: dst.into(),
            })
            .inc();
    }

    /// A local client's flow refused (locally: an [`EgressRefusal`], or by the peer: its
    /// [`RejectCode`]).
    pub fn egress_rejected(&self, reason: impl Label, src: &str, dst: &str) {
        let reason = reason.as_str();
        self.reason("egress_rejected", reason);
        self.traffic.denied(src, dst, reason, false);
        self.egress_rejected
            .get_or_create(&RejectLabels {
                reason: reason.into(),
                src_service: src.into(),
                dst_service: dst.into(),
            })
            .inc();
    }

    /// A peer certificate refused at the handshake.
    pub fn handshake_refused(&self, reason: HandshakeRefusal) {
        let reason = reason.as_str();
        self.reason("handshake_refused", reason);
        self.handshake_refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// A handshake completed on a `session` ("tunnel" or "control") with key exchange
    /// `group` (None: not read from the handshake).
    pub fn handshake_completed(&self, session: &'static str, group: Option<&'static str>) {
        let group = group.unwrap_or("unknown");
        self.reason(&format!("{session}_key_exchange"), group);
        self.handshakes
            .get_or_create(&KeyExchangeLabels { session, group })
            .inc();
    }

    /// A connection or request refused by the metrics listener.
    pub fn http_refused(&self, reason: HttpRefusal) {
        let reason = reason.as_str();
        self.reason("http_refused", reason);
        self.http_refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// An HTTP request answered (by the service, or by the mesh for it).
    pub fn http_request(&self, o: RequestOutcome<'_>) {
        let egress = o.direction == crate::authz::Direction::Egress;
        self.traffic
            .request(egress, o.src, o.dst, o.route, o.status, o.elapsed);
        let direction = if egress { "egress" } else { "ingress" };
        let class = match o.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&RequestLabels {
                direction: direction.into(),
                src_service: o.src.into(),
                dst_service: o.dst.into(),
                route: o.route.into(),
                class: class.into(),
            })
            .inc();
        self.request_seconds
            .get_or_create(&LatencyLabels {
                direction: direction.into(),
                src_service: o.src.into(),
                dst_service: o.dst.into(),
                route: o.route.into(),
            })
            .observe(o.elapsed.as_secs_f64());
    }

    /// An HTTP request the mesh refused (or could not deliver) and answered itself.
    pub fn request_refused(&self, reason: RequestRefusal, src: &str, dst: &str) {
        let reason = reason.as_str();
        self.reason("http_request_refused", reason);
        self.requests_refused
            .get_or_create(&RejectLabels {
                reason: reason.into(),
                src_service: src.into(),
                dst_service: dst.into(),
            })
            .inc();
    }

    /// An HTTP request tried again.
    pub fn request_retried(&self, src: &str, dst: &str) {
        self.retries
            .get_or_create(&FlowLabels {
                src_service: src.into(),
                dst_service: dst.into(),
            })
            .inc();
    }

    /// An instance of `service` ejected (or kept, being the last one).
    pub fn instance_ejected(&self, service: &str, kept: bool) {
        self.ejections
            .get_or_create(&EjectionLabels {
                service: service.into(),
                kept: kept.to_string(),
            })
            .inc();
    }

    /// A DNS query not served as asked.
    pub fn dns_dropped(&self, reason: DnsDrop) {
        let reason = reason.as_str();
        self.reason("dns_dropped", reason);
        self.dns_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// A checked service's health now; `transition` when it changed.
    pub fn service_health(&self, service: &str, passing: bool, transition: bool) {
        self.service_passing
            .get_or_create(&ServiceLabels {
                service: service.into(),
            })
            .set(i64::from(passing));
        if transition {
            self.health_transitions
                .get_or_create(&HealthLabels {
                    service: service.into(),
                    health: if passing { "passing" } else { "critical" }.into(),
                })
                .inc();
        }
    }

    /// A live flow closed by the node.
    pub fn flow_closed(&self, reason: CloseReason) {
        self.reason("flow_closed", reason.as_str());
        self.flows_closed
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// A flow found a peer's tunnel silent and moved to the next instance.
    pub fn peer_silent(&self) {
        self.reason("egress_retried", "peer_silent");
        self.peers_silent.inc();
    }

    /// A stream opened with the client's first bytes after its header.
    pub fn data_with_header(&self) {
        self.data_with_header.inc();
    }

    /// A tunnel closed by the node (its peer no longer stands).
    pub fn tunnel_closed(&self, reason: CloseReason) {
        self.reason("tunnel_closed", reason.as_str());
        self.tunnels_closed
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// Bytes carried from a local socket into a tunnel.
    pub fn bytes_to_tunnel(&self, n: u64) {
        self.bytes_to_tunnel.inc_by(n);
    }

    /// Bytes carried from a tunnel to a local socket.
    pub fn bytes_from_tunnel(&self, n: u64) {
        self.bytes_from_tunnel.inc_by(n);
    }

    /// A flow opened (+1) or ended (-1).
    pub fn flows_active_add(&self, d: i64) {
        self.flows_active.inc_by(d);
    }

    /// Records the applied snapshot version.
    pub fn set_snapshot_version(&self, v: u64) {
        self.snapshot_version.set(v as i64);
    }

    /// Records the certificate expiry.
    pub fn set_cert_not_after(&self, t: i64) {
        self.cert_not_after.set(t);
    }

    /// Records how many peer tunnels are open.
    pub fn set_peers_connected(&self, n: usize) {
        self.peers_connected.set(n as i64);
    }

    /// Counters by `kind/reason` for `status`.
    pub fn reasons(&self) -> BTreeMap<String, u64> {
        self.reasons.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Flows accepted and rejected at ingress so far.
    pub fn totals(&self) -> (u64, u64, i64) {
        (
            self.accepted_total.load(Ordering::Relaxed),
            self.rejected_total.load(Ordering::Relaxed),
            self.flows_active.get(),
        )
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
