//! The overlay's ingress firewall and connection tracker.
//!
//! Every packet a peer sends is checked in this order: (1) its inner source address must
//! be one of the sending peer's certificate addresses, else it is spoofed; (2) a packet of
//! a tracked flow passes; (3) a packet opening a new flow passes only if policy lets one
//! of the sender's services reach the local service that owns the destination port and
//! protocol. Everything else is dropped, by reason. Packets this node sends are tracked
//! too, so the replies they draw pass. Policy and revocation changes re-check tracked
//! flows ([`Tracker::recheck`]).
//!
//! The tracker is sharded; each shard is a short critical section per packet.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::ident::{NodeName, ServiceName};
use quicmesh_protocol::packet::{self, PacketInfo, PortSpec, Transport};

use crate::view::View;

pub use crate::reason::DropReason;

/// A flow as this node sees it: local end first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

impl FlowKey {
    /// The key of a packet arriving from a peer (`src` is remote).
    pub fn inbound(p: &PacketInfo) -> Self {
        let (proto, sp, dp) = ports(&p.transport);
        FlowKey {
            proto,
            local: (p.dst, dp),
            remote: (p.src, sp),
        }
    }

    /// The key of a packet this node sends (`src` is local).
    pub fn outbound(p: &PacketInfo) -> Self {
        let (proto, sp, dp) = ports(&p.transport);
        FlowKey {
            proto,
            local: (p.src, sp),
            remote: (p.dst, dp),
        }
    }
}

fn ports(t: &Transport) -> (u8, u16, u16) {
    match *t {
        Transport::Ports {
            proto, src, dst, ..
        } => (proto, src, dst),
        // An echo and its reply share the identifier; both ends key on it.
        Transport::Icmp { echo: Some(e), .. } => (packet::ICMP, e.id, e.id),
        Transport::Icmp { kind, .. } => (packet::ICMP, u16::from(kind), 0),
        Transport::Other { proto } => (proto, 0, 0),
    }
}

/// Who opened a tracked flow.
#[derive(Debug, Clone)]
pub enum Origin {
    /// This node sent the first packet.
    Local,
    /// A peer opened it to a local service, allowed by `rule`.
    Peer {
        node: NodeName,
        services: Arc<BTreeSet<ServiceName>>,
        service: ServiceName,
        rule: String,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    origin: Origin,
    /// Seconds on the tracker's clock when a packet last passed.
    last: u64,
}

/// A local service's overlay ports.
#[derive(Debug, Clone)]
pub struct LocalService {
    pub name: ServiceName,
    pub ports: Vec<PortSpec>,
}

/// Idle time after which a tracked flow is forgotten.
pub fn idle_limit(proto: u8) -> Duration {
    match proto {
        packet::TCP => Duration::from_secs(3600),
        packet::UDP => Duration::from_secs(120),
        _ => Duration::from_secs(30),
    }
}

const SHARDS: usize = 16;

/// A fast, non-keyed hasher for flow keys (FxHash's multiply-rotate): flows are chosen by
/// hosts the node already authenticated, and the table is per node and bounded by idle
/// expiry, so hash flooding buys an attacker little; SipHash cost ~2x on this hot path.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxBuild = std::hash::BuildHasherDefault<FxHasher>;
type FlowTable = HashMap<FlowKey, Entry, FxBuild>;

/// The connection tracker and the ingress decision.
pub struct Tracker {
    shards: Vec<Mutex<FlowTable>>,
    services: Vec<LocalService>,
    start: std::time::Instant,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("flows", &self.len())
            .finish()
    }
}

/// What the firewall decided about an inbound packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Part of a tracked flow.
    Established,
    /// Opens a new flow, allowed by this rule.
    New { service: ServiceName, rule: String },
    Drop {
        reason: DropReason,
        rule: Option<String>,
    },
}

impl Tracker {
    pub fn new(services: Vec<LocalService>) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(FlowTable::default()))
                .collect(),
            services,
            start: std::time::Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    fn shard(&self, k: &FlowKey) -> &Mutex<FlowTable> {
        use std::hash::{Hash, Hasher};
        let mut d = FxHasher::default();
        k.hash(&mut d);
        // The high bits: the table inside the shard uses the low ones.
        &self.shards[(d.finish() >> 58) as usize % SHARDS]
    }

    /// Number of tracked flows.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a packet this node sends (so its replies pass).
    pub fn outbound(&self, p: &PacketInfo) {
        let k = FlowKey::outbound(p);
        let now = self.now();
        let mut m = self.shard(&k).lock().unwrap_or_else(|e| e.into_inner());
        m.entry(k).and_modify(|e| e.last = now).or_insert(Entry {
            origin: Origin::Local,
            last: now,
        });
    }

    /// Decides about a packet from `peer`, tracking the flow it opens when allowed.
    /// `local` are this node's overlay addresses.
    pub fn inbound(
        &self,
        p: &PacketInfo,
        peer: &PeerIdentity,
        peer_services: &Arc<BTreeSet<ServiceName>>,
        local: &[IpAddr],
        view: &View,
    ) -> Verdict {
        let drop = |reason| Verdict::Drop { reason, rule: None };
        if view.version == 0 {
            return drop(DropReason::NotReady);
        }
        if !peer.owns_address(p.src) {
            return drop(DropReason::Spoofed);
        }
        if !local.contains(&p.dst) {
            return drop(DropReason::NotForUs);
        }
        let k = FlowKey::inbound(p);
        let now = self.now();
        {
            let mut m = self.shard(&k).lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = m.get_mut(&k) {
                e.last = now;
                return Verdict::Established;
            }
        }
        // ICMP other than echo (errors, redirects) cannot open a flow. Both tunnel ends
        // are hosts, not routers: path MTU problems are answered locally.
        if let Transport::Icmp { echo: None, .. } = p.transport {
            return drop(DropReason::NotTracked);
        }
        if let Transport::Ports {
            proto: packet::TCP,
            syn: false,
            ..
        } = p.transport
        {
            return drop(DropReason::NotTracked);
        }
        let Some(svc) = self
            .services
            .iter()
            .find(|s| s.ports.iter().any(|ps| ps.matches(&p.transport)))
        else {
            return drop(DropReason::NoService);
        };
        match allowed(view, peer_services, &peer.node, &svc.name) {
            Ok(rule) => {
                let mut m = self.shard(&k).lock().unwrap_or_else(|e| e.into_inner());
                m.insert(
                    k,
                    Entry {
                        origin: Origin::Peer {
                            node: peer.node.clone(),
                            services: peer_services.clone(),
                            service: svc.name.clone(),
                            rule: rule.clone(),
                        },
                        last: now,
                    },
                );
                Verdict::New {
                    service: svc.name.clone(),
                    rule,
                }
            }
            Err(rule) => Verdict::Drop {
                reason: DropReason::PolicyDenied,
                rule: Some(rule),
            },
        }
    }

    /// Re-checks tracked flows against a new view: flows from peers no longer in the
    /// mesh, or no longer allowed by policy, are forgotten (their next packet is judged
    /// afresh, and a TCP segment without SYN is then dropped). Also forgets idle flows.
    /// Returns how many were removed.
    pub fn recheck(&self, view: &View) -> usize {
        let now = self.now();
        let mut removed = 0;
        for s in &self.shards {
            let mut m = s.lock().unwrap_or_else(|e| e.into_inner());
            let before = m.len();
            m.retain(|k, e| {
                if now.saturating_sub(e.last) > idle_limit(k.proto).as_secs() {
                    return false;
                }
                match &e.origin {
                    Origin::Local => true,
                    Origin::Peer {
                        node,
                        services,
                        service,
                        ..
                    } => {
                        view.peers.contains_key(node)
                            && allowed(view, services, node, service).is_ok()
                    }
                }
            });
            removed += before - m.len();
        }
        removed
    }
}

/// Whether any of `services` (on `node`) may reach local `service`: the allowing rule, or
/// the denying one.
fn allowed(
    view: &View,
    services: &BTreeSet<ServiceName>,
    node: &NodeName,
    service: &ServiceName,
) -> Result<String, String> {
    crate::authz::packet_policy(view, node, services, service)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_protocol::cert::Serial;
    use quicmesh_protocol::ident::{Labels, TrustDomain};
    use quicmesh_protocol::packet::{Echo, PacketInfo};
    use quicmesh_protocol::policy::Policy;
    use quicmesh_protocol::wire::PeerInfo;

    const ME: [u8; 4] = [100, 64, 0, 2];
    const PEER: [u8; 4] = [100, 64, 0, 1];

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn peer(services: &[&str]) -> PeerIdentity {
        PeerIdentity {
            trust_domain: TrustDomain::new("t.test").unwrap(),
            node: NodeName::new("peer").unwrap(),
            services: services.iter().map(|s| svc(s)).collect(),
            ips: vec![IpAddr::from(PEER)],
            serial: Serial::new(vec![1]).unwrap(),
            not_before: 0,
            not_after: i64::MAX,
        }
    }

    fn view(policy: &str) -> View {
        let mut v = View {
            version: 1,
            policy: Policy::parse(policy).unwrap(),
            ..Default::default()
        };
        v.peers.insert(
            NodeName::new("peer").unwrap(),
            PeerInfo {
                node: NodeName::new("peer").unwrap(),
                endpoint: None,
                services: vec![],
                labels: Labels::default(),
                overlay: vec![IpAddr::from(PEER)],
                online: true,
                critical: Vec::new(),
                candidates: Vec::new(),
                relay: false,
            },
        );
        v
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> PacketInfo {
        PacketInfo {
            src: src.into(),
            dst: dst.into(),
            transport: Transport::Ports {
                proto: packet::TCP,
                src: sport,
                dst: dport,
                syn,
            },
            dont_fragment: true,
        }
    }

    fn tracker() -> Tracker {
        Tracker::new(vec![
            LocalService {
                name: svc("db"),
                ports: vec!["tcp/5432".parse().unwrap(), "icmp".parse().unwrap()],
            },
            LocalService {
                name: svc("admin"),
                ports: vec!["tcp/22".parse().unwrap()],
            },
        ])
    }

    const WEB_TO_DB: &str = "[[rule]]\nfrom = \"web\"\nto = \"db\"\naction = \"allow\"\n";

    fn check(t: &Tracker, p: &PacketInfo, id: &PeerIdentity, v: &View) -> Verdict {
        t.inbound(
            p,
            id,
            &Arc::new(id.services.clone()),
            &[IpAddr::from(ME)],
            v,
        )
    }

    #[test]
    fn a_new_flow_needs_a_rule_for_the_service_owning_the_port() {
        let (t, v) = (tracker(), view(WEB_TO_DB));
        let syn = tcp(PEER, ME, 40000, 5432, true);
        assert_eq!(
            check(&t, &syn, &peer(&["web"]), &v),
            Verdict::New {
                service: svc("db"),
                rule: "rule[0]".into()
            }
        );
        // Its denied twins: a sender whose services have no rule, and a port owned by a
        // service the rule does not name.
        let t = tracker();
        assert!(matches!(
            check(&t, &syn, &peer(&["batch"]), &v),
            Verdict::Drop {
                reason: DropReason::PolicyDenied,
                rule: Some(_)
            }
        ));
        assert!(matches!(
            check(&t, &tcp(PEER, ME, 40000, 22, true), &peer(&["web"]), &v),
            Verdict::Drop {
                reason: DropReason::PolicyDenied,
                ..
            }
        ));
        assert_eq!(
            check(&t, &tcp(PEER, ME, 40000, 8080, true), &peer(&["web"]), &v),
            Verdict::Drop {
                reason: DropReason::NoService,
                rule: None
            }
        );
    }

    #[test]
    fn sources_outside_the_sender_certificate_are_spoofed() {
        let (t, v) = (tracker(), view(WEB_TO_DB));
        let forged = tcp([100, 64, 0, 9], ME, 40000, 5432, true);
        assert_eq!(
            check(&t, &forged, &peer(&["web"]), &v),
            Verdict::Drop {
                reason: DropReason::Spoofed,
                rule: None
            }
        );
        let not_for_us = tcp(PEER, [100, 64, 0, 3], 40000, 5432, true);
        assert_eq!(
            check(&t, &not_for_us, &peer(&["web"]), &v),
            Verdict::Drop {
                reason: DropReason::NotForUs,
                rule: None
            }
        );
    }

    #[test]
    fn replies_to_what_this_node_sent_pass_and_other_segments_do_not() {
        let (t, v) = (tracker(), view("default = \"deny\"\n"));
        let reply = tcp(PEER, ME, 443, 50000, false);
        assert_eq!(
            check(&t, &reply, &peer(&["web"]), &v),
            Verdict::Drop {
                reason: DropReason::NotTracked,
                rule: None
            }
        );
        t.outbound(&tcp(ME, PEER, 50000, 443, true));
        assert_eq!(check(&t, &reply, &peer(&["web"]), &v), Verdict::Established);
        // Echo replies match the request's identifier.
        let echo = |src, dst, request| PacketInfo {
            src: IpAddr::from(src),
            dst: IpAddr::from(dst),
            transport: Transport::Icmp {
                echo: Some(Echo { request, id: 7 }),
                kind: if request { 8 } else { 0 },
            },
            dont_fragment: false,
        };
        t.outbound(&echo(ME, PEER, true));
        assert_eq!(
            check(&t, &echo(PEER, ME, false), &peer(&["web"]), &v),
            Verdict::Established
        );
    }

    #[test]
    fn a_policy_change_forgets_flows_it_no_longer_allows() {
        let t = tracker();
        let v = view(WEB_TO_DB);
        let id = peer(&["web"]);
        assert!(matches!(
            check(&t, &tcp(PEER, ME, 40000, 5432, true), &id, &v),
            Verdict::New { .. }
        ));
        t.outbound(&tcp(ME, PEER, 50000, 443, true));
        let mid = tcp(PEER, ME, 40000, 5432, false);
        assert_eq!(check(&t, &mid, &id, &v), Verdict::Established);
        assert_eq!(t.recheck(&v), 0, "nothing changed, nothing forgotten");
        let denied = view("default = \"deny\"\n");
        assert_eq!(
            t.recheck(&denied),
            1,
            "the peer's flow goes, this node's own stays"
        );
        assert_eq!(
            check(&t, &mid, &id, &denied),
            Verdict::Drop {
                reason: DropReason::NotTracked,
                rule: None
            }
        );
        assert_eq!(t.len(), 1);
    }
}
