//! The overlay firewall's tracker under a deny-all policy: whatever packets this node
//! sends and a peer sends back, in any order, with the clock moving and re-checks in
//! between, no inbound packet is allowed unless an outbound packet of the same flow was
//! seen (for an ICMP error: of the flow it quotes; for a later fragment: of the flow of
//! the first fragment that let its datagram in), and the table never outgrows its cap.
//!
//! Input: records of [op, len, bytes...]. The packet's addresses are set to this node's
//! and the peer's (the receive path has already dropped anything else as spoofed or
//! not for us); everything after them is the fuzzer's.
#![no_main]
use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use quicmesh_node::overlay::firewall::{FlowKey, Limits, LocalService, Tracker, Verdict};
use quicmesh_node::state::View;
use quicmesh_protocol::cert::{PeerIdentity, Serial};
use quicmesh_protocol::ident::{Labels, NodeName, ServiceName, TrustDomain};
use quicmesh_protocol::packet::{self, Transport};
use quicmesh_protocol::policy::Policy;
use quicmesh_protocol::wire::PeerInfo;

const ME4: [u8; 4] = [100, 64, 0, 2];
const PEER4: [u8; 4] = [100, 64, 0, 1];
const ME6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const PEER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Sets the packet's addresses: `outbound` from this node to the peer, else back.
fn address(p: &mut [u8], outbound: bool) {
    let (v4, v6) = if outbound {
        ([ME4, PEER4], [ME6, PEER6])
    } else {
        ([PEER4, ME4], [PEER6, ME6])
    };
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => {
            p[12..16].copy_from_slice(&v4[0]);
            p[16..20].copy_from_slice(&v4[1]);
        }
        Some(6) if p.len() >= 40 => {
            p[8..24].copy_from_slice(&v6[0]);
            p[24..40].copy_from_slice(&v6[1]);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let svc = |s: &str| ServiceName::new(s).unwrap();
    let node = NodeName::new("peer").unwrap();
    let id = PeerIdentity {
        trust_domain: TrustDomain::new("t.test").unwrap(),
        node: node.clone(),
        services: [svc("web")].into_iter().collect(),
        ips: vec![IpAddr::from(PEER4), IpAddr::from(PEER6)],
        serial: Serial::new(vec![1]).unwrap(),
        not_before: 0,
        not_after: i64::MAX,
    };
    let services: Arc<BTreeSet<ServiceName>> = Arc::new(id.services.clone());
    let mut view = View {
        version: 1,
        policy: Policy::parse("default = \"deny\"\n").unwrap(),
        ..Default::default()
    };
    view.peers.insert(
        node.clone(),
        PeerInfo {
            node: node.clone(),
            endpoint: None,
            services: vec![svc("web")],
            labels: Labels::default(),
            overlay: id.ips.clone(),
            online: true,
            critical: Vec::new(),
            candidates: Vec::new(),
            relay: false,
            nat: false,
        },
    );
    let local = [IpAddr::from(ME4), IpAddr::from(ME6)];
    // Every port a local service: only policy (deny-all) stands in the way.
    let limits = Limits {
        max_flows: 64,
        max_flows_per_peer: 16,
    };
    let tracker = Tracker::with_limits(
        vec![LocalService {
            name: svc("all"),
            ports: ["tcp/1-65535", "udp/1-65535", "icmp"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
        }],
        limits,
    );
    // The model: flows this node sent a packet of, datagrams whose first fragment passed.
    let mut sent: HashSet<FlowKey> = HashSet::new();
    let mut datagrams: HashSet<(IpAddr, IpAddr, u8, u32)> = HashSet::new();
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let mut p = tail[..n].to_vec();
        rest = &tail[n..];
        match op % 8 {
            0..=2 => {
                address(&mut p, true);
                let Ok(info) = packet::parse(&p) else {
                    continue;
                };
                if tracker.outbound(&info).is_ok() && tracker.tracks(&info) {
                    sent.insert(FlowKey::outbound(&info));
                }
            }
            3..=5 => {
                address(&mut p, false);
                let Ok(info) = packet::parse(&p) else {
                    continue;
                };
                let v = tracker.inbound(&info, &id, &services, &local, &view);
                match v {
                    Verdict::New { .. } => panic!("deny-all opened a flow: {info:?}"),
                    Verdict::Drop { .. } => {}
                    Verdict::Established => {
                        let ok = match info.transport {
                            Transport::Fragment { .. } => info.fragment.is_some_and(|f| {
                                datagrams.contains(&(info.src, info.dst, f.proto, f.id))
                            }),
                            Transport::IcmpError {
                                quoted: Some(q), ..
                            } => sent.contains(&FlowKey::quoted(&q)),
                            Transport::IcmpError { quoted: None, .. } => false,
                            _ => sent.contains(&FlowKey::inbound(&info)),
                        };
                        assert!(
                            ok,
                            "passed without an outbound packet of its flow: {info:?}"
                        );
                        if let Some(f) = info.fragment.filter(|f| f.offset == 0) {
                            datagrams.insert((info.src, info.dst, f.proto, f.id));
                        }
                    }
                }
            }
            6 => tracker.advance(Duration::from_secs(u64::from(*len))),
            _ => {
                tracker.recheck(&view);
            }
        }
        assert!(tracker.len() <= limits.max_flows);
    }
});
