//! The firewall and WireGuard clients: a client's packets arrive through one of its
//! gateways and are judged as the client; at the gateway, the mesh reaches a client only
//! on the client's own flows or by policy.

use super::*;
use quicmesh_protocol::cert::Serial;
use quicmesh_protocol::ident::{Labels, TrustDomain};
use quicmesh_protocol::policy::Policy;
use quicmesh_protocol::wg::WgKey;
use quicmesh_protocol::wire::PeerInfo;

use super::tests::{svc, tcp, udp};
use crate::view::WgIndex;

const ME: [u8; 4] = [100, 64, 0, 2];
const PHONE: [u8; 4] = [100, 64, 0, 50];
const LAPTOP: [u8; 4] = [100, 64, 0, 51];

fn name(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}

/// A node `node` at `ip` with `services`.
fn node(node: &str, ip: [u8; 4], services: &[&str]) -> PeerIdentity {
    PeerIdentity {
        trust_domain: TrustDomain::new("t.test").unwrap(),
        node: name(node),
        services: services.iter().map(|s| svc(s)).collect(),
        ips: vec![IpAddr::from(ip)],
        serial: Serial::new(vec![ip[3]]).unwrap(),
        not_before: 0,
        not_after: i64::MAX,
    }
}

fn client(n: &str, ip: [u8; 4], owner: &str, gateways: &[&str]) -> WgClient {
    WgClient {
        name: name(n),
        service: svc("laptop"),
        labels: Labels::from_pairs([("owner", owner)].iter().copied()).unwrap(),
        addresses: vec![IpAddr::from(ip)],
        public_key: WgKey([ip[3]; 32]),
        expires_at: 0,
        gateways: gateways.iter().map(|g| name(g)).collect(),
    }
}

/// A view holding `nodes` and `clients`, with `policy`.
fn view(policy: &str, nodes: &[&PeerIdentity], clients: Vec<WgClient>) -> View {
    let mut v = View {
        version: 1,
        policy: Policy::parse(policy).unwrap(),
        ..Default::default()
    };
    for id in nodes {
        v.peers.insert(
            id.node.clone(),
            PeerInfo {
                node: id.node.clone(),
                endpoint: None,
                services: id.services.iter().cloned().collect(),
                labels: Labels::default(),
                overlay: id.ips.clone(),
                online: true,
                critical: Vec::new(),
                candidates: Vec::new(),
                relay: false,
                nat: false,
            },
        );
    }
    v.wg = Arc::new(WgIndex::new(clients));
    v
}

/// Two views of a mesh holding `node` and client `phone`: one where service `from` may
/// reach the client's service, and the next version, where no rule lets it.
fn before_and_after(from: &str, node: &PeerIdentity, phone: &WgClient) -> (View, View) {
    let allowed = view(
        &format!("[[rule]]\nfrom = \"{from}\"\nto = \"laptop\"\naction = \"allow\"\n"),
        &[node],
        vec![phone.clone()],
    );
    let mut closed = view("", &[node], vec![phone.clone()]);
    closed.version = 2;
    (allowed, closed)
}

/// A node hosting `db` (tcp/5432) and `admin` (tcp/22).
fn tracker() -> Tracker {
    Tracker::new(vec![
        LocalService {
            name: svc("db"),
            ports: vec!["tcp/5432".parse().unwrap()],
        },
        LocalService {
            name: svc("admin"),
            ports: vec!["tcp/22".parse().unwrap()],
        },
    ])
}

fn check(t: &Tracker, p: &PacketInfo, from: &PeerIdentity, v: &View) -> Verdict {
    t.inbound(
        p,
        from,
        &Arc::new(from.services.clone()),
        &[IpAddr::from(ME)],
        v,
    )
}

fn drop(reason: DropReason) -> Verdict {
    Verdict::Drop { reason, rule: None }
}

const LAPTOP_TO_DB: &str = r#"
[[rule]]
from = "laptop"
to = "db"
action = "allow"
[[rule]]
from = "gateway"
to = "admin"
action = "allow"
[[rule]]
from = "tag:owner=alice"
to = "admin"
action = "allow"
"#;

#[test]
fn a_client_s_packets_pass_only_through_its_gateways_and_are_judged_as_the_client() {
    let gw = node("gw", [100, 64, 0, 10], &["gateway"]);
    let other = node("other", [100, 64, 0, 11], &["gateway"]);
    let v = view(
        LAPTOP_TO_DB,
        &[&gw, &other],
        vec![
            client("phone", PHONE, "alice", &["gw"]),
            client("laptop", LAPTOP, "bob", &["gw"]),
        ],
    );
    let t = tracker();
    // The client's service may reach db: allowed by the rule naming `laptop`.
    assert_eq!(
        check(&t, &tcp(PHONE, ME, 40000, 5432, true), &gw, &v),
        Verdict::New {
            service: svc("db"),
            rule: "rule[0]".into()
        }
    );
    assert_eq!(t.client_flows(&name("phone")), 1);
    assert_eq!(t.peer_flows(&name("gw")), 0, "counted against the client");
    // Its denied twin: the same packet carried by a node that is not its gateway is a
    // spoofed source (a node cannot speak for a client it does not serve).
    assert_eq!(
        check(&t, &tcp(PHONE, ME, 40001, 5432, true), &other, &v),
        drop(DropReason::Spoofed)
    );
    // Nor for an address no client owns.
    assert_eq!(
        check(&t, &tcp([100, 64, 0, 99], ME, 40001, 5432, true), &gw, &v),
        drop(DropReason::Spoofed)
    );
    // The gateway's own service may reach admin; its client's packets are judged as the
    // client, never as the gateway: bob's laptop is refused by the last rule that looked.
    assert_eq!(
        check(&t, &tcp(LAPTOP, ME, 40002, 22, true), &gw, &v),
        Verdict::Drop {
            reason: DropReason::PolicyDenied,
            rule: Some("default".into())
        }
    );
    // Its allowed twin by label: alice's phone carries owner=alice.
    assert_eq!(
        check(&t, &tcp(PHONE, ME, 40003, 22, true), &gw, &v),
        Verdict::New {
            service: svc("admin"),
            rule: "rule[2]".into()
        }
    );
    // The gateway's own packet to admin is its own, allowed by its own rule.
    assert_eq!(
        check(&t, &tcp([100, 64, 0, 10], ME, 40004, 22, true), &gw, &v),
        Verdict::New {
            service: svc("admin"),
            rule: "rule[1]".into()
        }
    );
}

#[test]
fn a_revoked_or_expired_client_loses_its_flows_and_opens_no_new_one() {
    let gw = node("gw", [100, 64, 0, 10], &["gateway"]);
    let phone = client("phone", PHONE, "alice", &["gw"]);
    let v = view(LAPTOP_TO_DB, &[&gw], vec![phone.clone()]);
    let t = tracker();
    let syn = tcp(PHONE, ME, 40000, 5432, true);
    assert!(matches!(check(&t, &syn, &gw, &v), Verdict::New { .. }));
    let ack = tcp(PHONE, ME, 40000, 5432, false);
    assert_eq!(check(&t, &ack, &gw, &v), Verdict::Established);
    // Revoked: the coordinator's list no longer has it.
    let mut revoked = view(LAPTOP_TO_DB, &[&gw], vec![]);
    revoked.version = 2;
    assert_eq!(t.recheck(&revoked), 1, "its flow is forgotten");
    assert_eq!(check(&t, &ack, &gw, &revoked), drop(DropReason::Spoofed));
    // Expired: still listed, past its expiry.
    let expired = client("phone", PHONE, "alice", &["gw"]);
    let expired = WgClient {
        expires_at: 1,
        ..expired
    };
    let v2 = view(LAPTOP_TO_DB, &[&gw], vec![expired]);
    let t = tracker();
    assert_eq!(check(&t, &syn, &gw, &v2), drop(DropReason::ClientExpired));
    // A client whose gateway list changed loses the flows that gateway carried.
    let t = tracker();
    assert!(matches!(check(&t, &syn, &gw, &v), Verdict::New { .. }));
    let mut moved = view(
        LAPTOP_TO_DB,
        &[&gw],
        vec![client("phone", PHONE, "alice", &["elsewhere"])],
    );
    moved.version = 2;
    assert_eq!(t.recheck(&moved), 1);
    // And one whose labels changed is judged again by them (bob may not reach admin).
    let t = tracker();
    assert!(matches!(
        check(&t, &tcp(PHONE, ME, 40003, 22, true), &gw, &v),
        Verdict::New { .. }
    ));
    let mut relabelled = view(
        LAPTOP_TO_DB,
        &[&gw],
        vec![client("phone", PHONE, "bob", &["gw"])],
    );
    relabelled.version = 2;
    assert_eq!(t.recheck(&relabelled), 1);
}

#[test]
fn a_client_s_flows_are_limited_per_client_whichever_gateway_carries_them() {
    let gw1 = node("gw1", [100, 64, 0, 10], &["gateway"]);
    let gw2 = node("gw2", [100, 64, 0, 11], &["gateway"]);
    let v = view(
        LAPTOP_TO_DB,
        &[&gw1, &gw2],
        vec![client("phone", PHONE, "alice", &["gw1", "gw2"])],
    );
    let t = Tracker::with_limits(
        vec![LocalService {
            name: svc("db"),
            ports: vec!["tcp/5432".parse().unwrap()],
        }],
        Limits {
            max_flows: 1024,
            max_flows_per_peer: 4,
        },
    );
    for i in 0..4u16 {
        let via = if i % 2 == 0 { &gw1 } else { &gw2 };
        assert!(matches!(
            check(&t, &tcp(PHONE, ME, 40000 + i, 5432, true), via, &v),
            Verdict::New { .. }
        ));
    }
    assert_eq!(
        check(&t, &tcp(PHONE, ME, 41000, 5432, true), &gw2, &v),
        drop(DropReason::PeerFlowLimit)
    );
    // Its gateways' own flows have their own limit.
    let mut v_gw = v;
    v_gw.policy =
        Policy::parse("[[rule]]\nfrom = \"gateway\"\nto = \"db\"\naction = \"allow\"\n").unwrap();
    assert!(matches!(
        check(
            &t,
            &tcp([100, 64, 0, 10], ME, 42000, 5432, true),
            &gw1,
            &v_gw
        ),
        Verdict::New { .. }
    ));
}

#[test]
fn replies_to_a_client_go_back_through_the_gateway_its_flow_came_in_by() {
    let gw1 = node("gw1", [100, 64, 0, 10], &["gateway"]);
    let gw2 = node("gw2", [100, 64, 0, 11], &["gateway"]);
    let v = view(
        LAPTOP_TO_DB,
        &[&gw1, &gw2],
        vec![client("phone", PHONE, "alice", &["gw1", "gw2"])],
    );
    let t = tracker();
    assert!(matches!(
        check(&t, &tcp(PHONE, ME, 40000, 5432, true), &gw2, &v),
        Verdict::New { .. }
    ));
    let reply = tcp(ME, PHONE, 5432, 40000, true);
    assert_eq!(t.reply_via(&reply), Some(name("gw2")));
    // A flow no client opened has no pinned gateway.
    assert_eq!(t.reply_via(&tcp(ME, PHONE, 5432, 40009, true)), None);
}

#[test]
fn at_the_gateway_a_node_reaches_a_client_only_on_the_client_s_flows_or_by_policy() {
    let b = node("node-b", [100, 64, 0, 20], &["web"]);
    let phone = client("phone", PHONE, "alice", &["gw"]);
    let v = view(LAPTOP_TO_DB, &[&b], vec![phone.clone()]);
    let t = Tracker::for_clients(Limits::default());
    let to_client =
        |p: &PacketInfo, v: &View| t.inbound(p, &b, &Arc::new(b.services.clone()), &[p.dst], v);
    // node-b opening a flow to the phone: no rule lets web reach laptop.
    assert_eq!(
        to_client(&tcp([100, 64, 0, 20], PHONE, 5000, 7000, true), &v),
        Verdict::Drop {
            reason: DropReason::PolicyDenied,
            rule: Some("default".into())
        }
    );
    // The phone's own flow to node-b: its answers pass.
    t.outbound(&tcp(PHONE, [100, 64, 0, 20], 40000, 5432, true))
        .unwrap();
    assert_eq!(
        to_client(&tcp([100, 64, 0, 20], PHONE, 5432, 40000, true), &v),
        Verdict::Established
    );
    // By policy, the reverse: web may reach laptop clients of alice.
    let reverse = view(
        "[[rule]]\nfrom = \"web\"\nto = \"tag:owner=alice\"\naction = \"allow\"\n",
        &[&b],
        vec![phone.clone()],
    );
    assert_eq!(
        to_client(&tcp([100, 64, 0, 20], PHONE, 5001, 7000, true), &reverse),
        Verdict::New {
            service: svc("laptop"),
            rule: "rule[0]".into()
        }
    );
    // Not a client's address: dropped.
    assert_eq!(
        to_client(
            &tcp([100, 64, 0, 20], [100, 64, 0, 77], 5001, 7000, true),
            &v
        ),
        drop(DropReason::NoClient)
    );
    // The client revoked: its own flows end with it.
    let mut gone = view(LAPTOP_TO_DB, &[&b], vec![]);
    gone.version = 2;
    assert!(t.recheck(&gone) >= 2);
    assert_eq!(t.len(), 0);
}

/// Found by review: the gateway's client side let a client's next packet re-open, as the
/// client's own, a flow of the mesh's that a policy change had just closed, so the node
/// at the other end kept it alive for ever.
#[test]
fn a_flow_of_the_mesh_s_that_policy_closed_does_not_reopen_from_the_client_s_side() {
    let b = node("node-b", [100, 64, 0, 20], &["web"]);
    let phone = client("phone", PHONE, "alice", &["gw"]);
    let (reverse, closed) = before_and_after("web", &b, &phone);
    let t = Tracker::for_clients(Limits::default());
    let from_b =
        |p: &PacketInfo, v: &View| t.inbound(p, &b, &Arc::new(b.services.clone()), &[p.dst], v);
    let me = name("phone");
    // node-b opens a TCP and a UDP flow to the phone, allowed by the reverse rule; the
    // phone answers on both.
    let syn = tcp([100, 64, 0, 20], PHONE, 5000, 7000, true);
    assert!(matches!(from_b(&syn, &reverse), Verdict::New { .. }));
    let dgram = udp([100, 64, 0, 20], PHONE, 5001, 7001);
    assert!(matches!(from_b(&dgram, &reverse), Verdict::New { .. }));
    t.client_outbound(&tcp(PHONE, [100, 64, 0, 20], 7000, 5000, true), &me)
        .unwrap();
    t.client_outbound(&udp(PHONE, [100, 64, 0, 20], 7001, 5001), &me)
        .unwrap();
    // The rule goes: both flows are closed, and the phone's next packets on them do not
    // open them again.
    assert_eq!(t.recheck(&closed), 2);
    assert_eq!(
        t.client_outbound(&tcp(PHONE, [100, 64, 0, 20], 7000, 5000, false), &me),
        Err(DropReason::FlowClosed)
    );
    assert_eq!(
        t.client_outbound(&udp(PHONE, [100, 64, 0, 20], 7001, 5001), &me),
        Err(DropReason::FlowClosed)
    );
    assert_eq!(
        from_b(&udp([100, 64, 0, 20], PHONE, 5001, 7001), &closed),
        Verdict::Drop {
            reason: DropReason::PolicyDenied,
            rule: Some("default".into())
        }
    );
    // Their allowed twins: the phone's own new flows open as ever.
    t.client_outbound(&udp(PHONE, [100, 64, 0, 20], 7002, 5001), &me)
        .unwrap();
    t.client_outbound(&tcp(PHONE, [100, 64, 0, 20], 7003, 5000, true), &me)
        .unwrap();
    assert_eq!(
        from_b(&udp([100, 64, 0, 20], PHONE, 5001, 7002), &closed),
        Verdict::Established
    );
}

/// Found by review: one client's flows (DNS queries from every port) could fill the
/// gateway's table for every client.
#[test]
fn one_client_cannot_fill_the_gateway_s_table() {
    let t = Tracker::for_clients(Limits {
        max_flows: 1024,
        max_flows_per_peer: 4,
    });
    let (phone, laptop) = (name("phone"), name("laptop"));
    for port in 0..4 {
        t.client_outbound(&udp(PHONE, [100, 64, 0, 20], 10_000 + port, 53), &phone)
            .unwrap();
    }
    assert_eq!(
        t.client_outbound(&udp(PHONE, [100, 64, 0, 20], 20_000, 53), &phone),
        Err(DropReason::PeerFlowLimit)
    );
    assert_eq!(t.client_flows(&phone), 4);
    // Another client is not held back by it.
    t.client_outbound(&udp(LAPTOP, [100, 64, 0, 20], 20_000, 53), &laptop)
        .unwrap();
    // A flow forgotten gives its count back.
    let mut v = view("", &[], vec![client("laptop", LAPTOP, "bob", &["gw"])]);
    v.version = 2;
    t.recheck(&v);
    assert_eq!(t.client_flows(&phone), 0, "phone's flows ended with it");
    assert_eq!(t.client_flows(&laptop), 1);
}

/// Found by the second review: a flow this node opened to a client stayed in its table
/// after policy closed it at the gateway (or was never allowed there), so the client could
/// open it again from its side (a SYN on the same ports) and pass here as an answer.
#[test]
fn a_node_keeps_only_the_flows_to_a_client_that_policy_lets_it_open() {
    let gw = node("gw", [100, 64, 0, 10], &["gateway"]);
    let phone = client("phone", PHONE, "alice", &["gw"]);
    let (reverse, closed) = before_and_after("db", &gw, &phone);
    let own: std::collections::BTreeSet<ServiceName> = [svc("db")].into();
    let t = tracker().with_own_services(own.clone());
    // Allowed: this node's flow to the phone, and the phone's answer passes.
    t.outbound_to_client(&tcp(ME, PHONE, 40000, 7000, true), &reverse, &phone)
        .unwrap();
    assert_eq!(
        check(&t, &tcp(PHONE, ME, 7000, 40000, true), &gw, &reverse),
        Verdict::Established
    );
    // Policy closes it: the recheck forgets it here too, and the phone's next segment
    // is no answer to anything.
    assert_eq!(t.recheck(&closed), 1);
    assert_eq!(
        check(&t, &tcp(PHONE, ME, 7000, 40000, false), &gw, &closed),
        drop(DropReason::NotTracked)
    );
    // Its denied twin from the start: never recorded, so the phone's SYN on the same
    // ports is judged as a new flow of its own (to a port no service owns).
    let t = tracker().with_own_services(own);
    assert_eq!(
        t.outbound_to_client(&tcp(ME, PHONE, 40001, 7000, true), &closed, &phone),
        Err(DropReason::PolicyDenied)
    );
    assert_eq!(
        check(&t, &tcp(PHONE, ME, 7000, 40001, true), &gw, &closed),
        drop(DropReason::NoService)
    );
}
