//! The firewall's tests: decisions, the attacks of issue 15, the table's bounds.

use super::*;
use quicmesh_protocol::cert::Serial;
use quicmesh_protocol::ident::{Labels, TrustDomain};
use quicmesh_protocol::packet::{Echo, PacketInfo};
use quicmesh_protocol::policy::Policy;
use quicmesh_protocol::wire::PeerInfo;

const ME: [u8; 4] = [100, 64, 0, 2];
const PEER: [u8; 4] = [100, 64, 0, 1];

pub(super) fn svc(s: &str) -> ServiceName {
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
            nat: false,
        },
    );
    v
}

pub(super) fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> PacketInfo {
    PacketInfo {
        src: src.into(),
        dst: dst.into(),
        transport: Transport::Ports {
            proto: packet::TCP,
            src: sport,
            dst: dport,
            syn,
            rst: false,
        },
        dont_fragment: true,
        fragment: None,
    }
}

pub(super) fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> PacketInfo {
    PacketInfo {
        transport: Transport::Ports {
            proto: packet::UDP,
            src: sport,
            dst: dport,
            syn: false,
            rst: false,
        },
        ..tcp(src, dst, sport, dport, false)
    }
}

/// An echo request or reply with identifier `id`.
fn echo(src: [u8; 4], dst: [u8; 4], request: bool, id: u16) -> PacketInfo {
    PacketInfo {
        transport: Transport::Icmp {
            echo: Some(Echo { request, id }),
            kind: if request { 8 } else { 0 },
        },
        dont_fragment: false,
        ..tcp(src, dst, 0, 0, false)
    }
}

/// A TCP reset (what the kernel answers a SYN to a closed port with).
fn rst(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> PacketInfo {
    let mut p = tcp(src, dst, sport, dport, false);
    if let Transport::Ports { rst, .. } = &mut p.transport {
        *rst = true;
    }
    p
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
    t.outbound(&tcp(ME, PEER, 50000, 443, true)).unwrap();
    assert_eq!(check(&t, &reply, &peer(&["web"]), &v), Verdict::Established);
    // Echo replies match the request's identifier.
    let echo = |src, dst, request| echo(src, dst, request, 7);
    t.outbound(&echo(ME, PEER, true)).unwrap();
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
    t.outbound(&tcp(ME, PEER, 50000, 443, true)).unwrap();
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

/// The race a policy change meets: a peer's segment arrives, the policy that allowed its
/// flow is removed, then this node's delayed ACK (or answer) goes out. The answer must not
/// re-open the flow as one of this node's own, or the peer's next packets pass again.
#[test]
fn an_answer_sent_after_a_policy_removal_does_not_reopen_the_peer_s_flow() {
    let t = Tracker::new(vec![LocalService {
        name: svc("db"),
        ports: vec![
            "tcp/5432".parse().unwrap(),
            "udp/5353".parse().unwrap(),
            "icmp".parse().unwrap(),
        ],
    }]);
    let (allowed, denied) = (view(WEB_TO_DB), view("default = \"deny\"\n"));
    let id = peer(&["web"]);
    let echo = |src, dst, request| echo(src, dst, request, 9);
    // Three flows of the peer's, allowed and answered.
    assert!(matches!(
        check(&t, &tcp(PEER, ME, 40000, 5432, true), &id, &allowed),
        Verdict::New { .. }
    ));
    t.outbound(&tcp(ME, PEER, 5432, 40000, false)).unwrap();
    assert!(matches!(
        check(&t, &udp(PEER, ME, 40001, 5353), &id, &allowed),
        Verdict::New { .. }
    ));
    t.outbound(&udp(ME, PEER, 5353, 40001)).unwrap();
    assert!(matches!(
        check(&t, &echo(PEER, ME, true), &id, &allowed),
        Verdict::New { .. }
    ));
    t.outbound(&echo(ME, PEER, false)).unwrap();
    let segment = tcp(PEER, ME, 40000, 5432, false);
    assert_eq!(check(&t, &segment, &id, &allowed), Verdict::Established);
    // The policy goes: the three flows are closed.
    assert_eq!(t.recheck(&denied), 3);
    // The answers already on their way out are refused, each with its reason...
    assert_eq!(
        t.outbound(&tcp(ME, PEER, 5432, 40000, false)),
        Err(DropReason::FlowClosed),
        "a delayed ACK opens nothing"
    );
    assert_eq!(
        t.outbound(&udp(ME, PEER, 5353, 40001)),
        Err(DropReason::FlowClosed),
        "a datagram answering the closed flow opens nothing"
    );
    assert_eq!(
        t.outbound(&echo(ME, PEER, false)),
        Err(DropReason::NotTracked),
        "an echo reply opens nothing"
    );
    // ...so the peer's next packets are judged afresh and denied.
    assert_eq!(
        check(&t, &segment, &id, &denied),
        dropped(DropReason::NotTracked)
    );
    assert!(matches!(
        check(&t, &udp(PEER, ME, 40001, 5353), &id, &denied),
        Verdict::Drop {
            reason: DropReason::PolicyDenied,
            ..
        }
    ));
    assert!(matches!(
        check(&t, &echo(PEER, ME, true), &id, &denied),
        Verdict::Drop {
            reason: DropReason::PolicyDenied,
            ..
        }
    ));
    assert_eq!(t.len(), 0);
    // However long after: the rule is the port, not a memory of the close.
    t.advance(Duration::from_secs(3 * 3600));
    t.recheck(&denied);
    assert_eq!(
        t.outbound(&udp(ME, PEER, 5353, 40001)),
        Err(DropReason::FlowClosed)
    );
    // The allowed twins: this node still opens its own flows (a SYN, a first datagram, an
    // echo request), and their answers pass.
    t.outbound(&tcp(ME, PEER, 50000, 443, true)).unwrap();
    t.outbound(&udp(ME, PEER, 40002, 53)).unwrap();
    t.outbound(&echo(ME, PEER, true)).unwrap();
    assert_eq!(
        check(&t, &tcp(PEER, ME, 443, 50000, false), &id, &denied),
        Verdict::Established
    );
    assert_eq!(
        check(&t, &udp(PEER, ME, 53, 40002), &id, &denied),
        Verdict::Established
    );
    assert_eq!(
        check(&t, &echo(PEER, ME, false), &id, &denied),
        Verdict::Established
    );
    // A connection of this node's own that idled out of the table is picked up again by
    // its next segment (it comes from no service's port: it answers no peer's flow).
    t.advance(Duration::from_secs(3601));
    t.recheck(&denied);
    assert!(!t.tracks(&tcp(ME, PEER, 50000, 443, false)));
    t.outbound(&tcp(ME, PEER, 50000, 443, false)).unwrap();
    assert_eq!(
        check(&t, &tcp(PEER, ME, 443, 50000, false), &id, &denied),
        Verdict::Established
    );
    // The policy allows the peer again: its new flow opens, and the answers pass.
    let again = View {
        version: 2,
        ..view(WEB_TO_DB)
    };
    t.recheck(&again);
    assert!(matches!(
        check(&t, &udp(PEER, ME, 40001, 5353), &id, &again),
        Verdict::New { .. }
    ));
    assert!(t.outbound(&udp(ME, PEER, 5353, 40001)).is_ok());
}

/// A flow judged under a view that a recheck replaced before the flow was inserted (the
/// receive path holds the view it loaded for a batch) is refused: the recheck may have
/// passed its shard already, and nothing would judge it again until the next one.
#[test]
fn a_flow_judged_under_a_replaced_view_is_refused() {
    let t = tracker();
    let old = view(WEB_TO_DB);
    let new = View {
        version: 2,
        ..view("default = \"deny\"\n")
    };
    t.recheck(&new);
    let id = peer(&["web"]);
    assert_eq!(
        check(&t, &tcp(PEER, ME, 40000, 5432, true), &id, &old),
        dropped(DropReason::ViewChanged)
    );
    assert_eq!(t.len(), 0);
    assert_eq!(t.peer_flows(&id.node), 0, "the refused flow is not counted");
    // Its twin: judged under the view in force, allowed by it.
    let allowing = View {
        version: 2,
        ..view(WEB_TO_DB)
    };
    assert!(matches!(
        check(&t, &tcp(PEER, ME, 40000, 5432, true), &id, &allowing),
        Verdict::New { .. }
    ));
}

// Raw packets, parsed as the receive path parses them: the attacks are bytes.

const ME6: &str = "fd00::2";
const PEER6: &str = "fd00::1";

fn a6(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The peer with an IPv6 address too.
fn peer46(services: &[&str]) -> PeerIdentity {
    let mut id = peer(services);
    id.ips.push(a6(PEER6));
    id
}

fn raw_v4(src: [u8; 4], dst: [u8; 4], proto: u8, flags_frag: u16, id: u16, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags_frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    p
}

fn raw_v6(src: &str, dst: &str, next: u8, chain: &[u8], l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    for a in [src, dst] {
        let IpAddr::V6(a) = a6(a) else { unreachable!() };
        p.extend_from_slice(&a.octets());
    }
    p.extend_from_slice(chain);
    p.extend_from_slice(l4);
    p
}

fn raw_tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

fn raw_udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut u = vec![0u8; 8 + payload];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    u
}

fn frag_hdr(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

fn send(t: &Tracker, p: &[u8]) {
    t.outbound(&packet::parse(p).unwrap()).unwrap();
}

/// The receive path's decision about bytes from `id`.
fn judge(t: &Tracker, p: &[u8], id: &PeerIdentity, v: &View) -> Verdict {
    match packet::parse(p) {
        Ok(info) => t.inbound(
            &info,
            id,
            &Arc::new(id.services.clone()),
            &[IpAddr::from(ME), a6(ME6)],
            v,
        ),
        Err(e) => Verdict::Drop {
            reason: DropReason::from(e),
            rule: None,
        },
    }
}

#[test]
fn an_atomic_fragment_is_judged_by_the_segment_it_wraps() {
    let (t, v) = (tracker(), view(WEB_TO_DB));
    let id = peer46(&["web"]);
    // This node sends a fragmented UDP datagram to the peer.
    let udp = raw_udp(5000, 6000, 1192);
    send(
        &t,
        &raw_v6(
            ME6,
            PEER6,
            packet::FRAGMENT,
            &frag_hdr(packet::UDP, 0, true, 1),
            &udp,
        ),
    );
    send(
        &t,
        &raw_v6(
            ME6,
            PEER6,
            packet::FRAGMENT,
            &frag_hdr(packet::UDP, 150, false, 1),
            &[0; 64],
        ),
    );
    // The attack: an atomic fragment (offset 0, M=0) wrapping a SYN to port 22,
    // which policy does not let this peer reach.
    let to_22 = raw_tcp(40000, 22, 0x02);
    let atomic = |seg: &[u8]| {
        raw_v6(
            PEER6,
            ME6,
            packet::FRAGMENT,
            &frag_hdr(packet::TCP, 0, false, 2),
            seg,
        )
    };
    let verdict = judge(&t, &atomic(&to_22), &id, &v);
    assert!(
        matches!(
            verdict,
            Verdict::Drop {
                reason: DropReason::PolicyDenied,
                ..
            }
        ),
        "an atomic fragment wrapping a SYN to an unallowed port: {verdict:?}"
    );
    // Its allowed twin: the same wrapping of a SYN to db's port opens a flow.
    assert_eq!(
        judge(&t, &atomic(&raw_tcp(40000, 5432, 0x02)), &id, &v),
        Verdict::New {
            service: svc("db"),
            rule: "rule[0]".into()
        }
    );
    // Behind destination options, the same.
    let dst_opts = [packet::TCP, 0, 1, 4, 0, 0, 0, 0];
    let verdict = judge(
        &t,
        &raw_v6(PEER6, ME6, packet::DEST_OPTIONS, &dst_opts, &to_22),
        &id,
        &v,
    );
    assert!(
        matches!(
            verdict,
            Verdict::Drop {
                reason: DropReason::PolicyDenied,
                ..
            }
        ),
        "{verdict:?}"
    );
}

#[test]
fn a_tiny_first_fragment_does_not_ride_a_tracked_fragment() {
    let (t, v) = (tracker(), view(WEB_TO_DB));
    let id = peer(&["web"]);
    // This node sends a fragmented UDP datagram to the peer (first and later part).
    send(
        &t,
        &raw_v4(ME, PEER, packet::UDP, 0x2000, 7, &raw_udp(5000, 6000, 1192)),
    );
    send(&t, &raw_v4(ME, PEER, packet::UDP, 150, 7, &[0; 64]));
    // The attack: a first fragment too short to hold the UDP ports, and the rest of
    // a datagram to any port in a later fragment.
    let tiny = raw_v4(PEER, ME, packet::UDP, 0x2000, 9, &[0x9c, 0x40]);
    let verdict = judge(&t, &tiny, &id, &v);
    assert!(
        matches!(
            verdict,
            Verdict::Drop {
                reason: DropReason::Unclassifiable,
                ..
            }
        ),
        "a tiny first fragment: {verdict:?}"
    );
    let rest = raw_v4(PEER, ME, packet::UDP, 1, 9, &[0; 64]);
    let verdict = judge(&t, &rest, &id, &v);
    assert!(
        matches!(
            verdict,
            Verdict::Drop {
                reason: DropReason::FragmentUntracked,
                ..
            }
        ),
        "a later fragment of no datagram that passed: {verdict:?}"
    );
}

#[test]
fn a_forged_icmp_error_quoting_no_flow_is_dropped() {
    let (t, v) = (tracker(), view(WEB_TO_DB));
    let id = peer(&["web"]);
    let unreachable = |quoted: &[u8]| {
        raw_v4(
            PEER,
            ME,
            packet::ICMP,
            0,
            4,
            &[&[3, 3, 0, 0, 0, 0, 0, 0][..], quoted].concat(),
        )
    };
    // This node answered something of the peer's with a port unreachable once.
    send(
        &t,
        &raw_v4(
            ME,
            PEER,
            packet::ICMP,
            0,
            2,
            &[
                &[3, 3, 0, 0, 0, 0, 0, 0][..],
                &raw_v4(PEER, ME, packet::UDP, 0, 1, &raw_udp(1111, 2222, 0)),
            ]
            .concat(),
        ),
    );
    // The attack: an error about a connection this node never opened.
    let syn = raw_v4(ME, PEER, packet::TCP, 0x4000, 3, &raw_tcp(50000, 443, 0x02));
    let forged = unreachable(&syn[..28]);
    let verdict = judge(&t, &forged, &id, &v);
    assert!(
        matches!(
            verdict,
            Verdict::Drop {
                reason: DropReason::IcmpUnmatched,
                ..
            }
        ),
        "an ICMP error quoting no flow: {verdict:?}"
    );
    // Its allowed twin: once this node opened that connection, the error about it
    // passes.
    send(&t, &syn);
    assert_eq!(judge(&t, &forged, &id, &v), Verdict::Established);
}

fn dropped(reason: DropReason) -> Verdict {
    Verdict::Drop { reason, rule: None }
}

#[test]
fn icmp_errors_must_quote_this_node_s_packet_to_that_peer() {
    let (t, v) = (tracker(), view(WEB_TO_DB));
    let id = peer46(&["web"]);
    let syn = raw_v4(ME, PEER, packet::TCP, 0x4000, 3, &raw_tcp(50000, 443, 0x02));
    send(&t, &syn);
    let error = |kind: u8, quoted: &[u8]| {
        raw_v4(
            PEER,
            ME,
            packet::ICMP,
            0,
            4,
            &[&[kind, 0, 0, 0, 0, 0, 0, 0][..], quoted].concat(),
        )
    };
    // Time exceeded and parameter problem are judged the same way.
    assert_eq!(
        judge(&t, &error(11, &syn[..28]), &id, &v),
        Verdict::Established
    );
    assert_eq!(
        judge(&t, &error(12, &syn[..28]), &id, &v),
        Verdict::Established
    );
    // Wrong direction: quoting a packet the peer sent in that flow.
    let theirs = raw_v4(PEER, ME, packet::TCP, 0x4000, 5, &raw_tcp(443, 50000, 0x12));
    assert_eq!(
        judge(&t, &error(3, &theirs[..28]), &id, &v),
        dropped(DropReason::IcmpUnmatched)
    );
    // A packet this node sent to a third node: not this peer's to report on.
    let third = raw_v4(
        ME,
        [100, 64, 0, 9],
        packet::TCP,
        0x4000,
        6,
        &raw_tcp(50000, 443, 0x02),
    );
    send(&t, &third);
    assert_eq!(
        judge(&t, &error(3, &third[..28]), &id, &v),
        dropped(DropReason::IcmpUnmatched)
    );
    // A quote too short for the ports, and a redirect (never passes, whatever it quotes).
    assert_eq!(
        judge(&t, &error(3, &syn[..22]), &id, &v),
        dropped(DropReason::IcmpUnmatched)
    );
    assert_eq!(
        judge(&t, &error(5, &syn[..28]), &id, &v),
        dropped(DropReason::NotTracked)
    );
    // ICMPv6 packet too big for an IPv6 flow this node opened, the quote behind a
    // destination options header; and its twin for a flow never opened.
    let seg6 = raw_v6(
        ME6,
        PEER6,
        packet::DEST_OPTIONS,
        &[packet::TCP, 0, 1, 4, 0, 0, 0, 0],
        &raw_tcp(50001, 443, 0x02),
    );
    let ptb = |q: &[u8]| {
        raw_v6(
            PEER6,
            ME6,
            packet::ICMPV6,
            &[],
            &[&[2, 0, 0, 0, 0, 0, 5, 0][..], q].concat(),
        )
    };
    assert_eq!(
        judge(&t, &ptb(&seg6), &id, &v),
        dropped(DropReason::IcmpUnmatched)
    );
    send(&t, &seg6);
    assert_eq!(judge(&t, &ptb(&seg6), &id, &v), Verdict::Established);
    // An error about an echo this node sent.
    let ping = raw_v4(ME, PEER, packet::ICMP, 0, 8, &[8, 0, 0, 0, 0, 42, 0, 1]);
    assert_eq!(
        judge(&t, &error(3, &ping), &id, &v),
        dropped(DropReason::IcmpUnmatched)
    );
    send(&t, &ping);
    assert_eq!(judge(&t, &error(3, &ping), &id, &v), Verdict::Established);
    // Errors this node sends open nothing.
    let before = t.len();
    send(
        &t,
        &raw_v4(
            ME,
            PEER,
            packet::ICMP,
            0,
            9,
            &[&[3, 3, 0, 0, 0, 0, 0, 0][..], &theirs[..28]].concat(),
        ),
    );
    assert_eq!(t.len(), before);
}

#[test]
fn later_fragments_pass_only_behind_a_first_fragment_that_passed() {
    let (t, v) = (tracker(), view(WEB_TO_DB));
    let id = peer46(&["web"]);
    let syn = raw_tcp(40000, 5432, 0x02);
    let frag =
        |flags_frag: u16, fid: u16, l4: &[u8]| raw_v4(PEER, ME, packet::TCP, flags_frag, fid, l4);
    // A later fragment before any first one: no datagram to belong to.
    assert_eq!(
        judge(&t, &frag(185, 5, &[0; 64]), &id, &v),
        dropped(DropReason::FragmentUntracked)
    );
    // The first fragment opens the flow; its datagram's later fragments follow.
    assert!(matches!(
        judge(&t, &frag(0x2000, 5, &syn), &id, &v),
        Verdict::New { .. }
    ));
    assert_eq!(t.datagrams(), 1);
    assert_eq!(
        judge(&t, &frag(0x2000 | 185, 5, &[0; 64]), &id, &v),
        Verdict::Established
    );
    // Another datagram's id, and a fragment starting inside the TCP header the first
    // was judged by (RFC 1858's overlap): dropped.
    assert_eq!(
        judge(&t, &frag(0x2000 | 185, 6, &[0; 64]), &id, &v),
        dropped(DropReason::FragmentUntracked)
    );
    assert_eq!(
        judge(&t, &frag(0x2000 | 1, 5, &[0; 64]), &id, &v),
        dropped(DropReason::FragmentUntracked)
    );
    // The last fragment closes the datagram.
    assert_eq!(
        judge(&t, &frag(370, 5, &[0; 64]), &id, &v),
        Verdict::Established
    );
    assert_eq!(
        judge(&t, &frag(370, 5, &[0; 64]), &id, &v),
        dropped(DropReason::FragmentUntracked)
    );
    assert_eq!(t.datagrams(), 0);
    // A denied first fragment (to port 22) lets none of its datagram through.
    let to_22 = frag(0x2000, 7, &raw_tcp(40000, 22, 0x02));
    assert!(matches!(
        judge(&t, &to_22, &id, &v),
        Verdict::Drop {
            reason: DropReason::PolicyDenied,
            ..
        }
    ));
    assert_eq!(
        judge(&t, &frag(185, 7, &[0; 64]), &id, &v),
        dropped(DropReason::FragmentUntracked)
    );
    // IPv6: a first fragment of a tracked flow, then its rest; the datagram expires.
    let first6 = raw_v6(
        PEER6,
        ME6,
        packet::FRAGMENT,
        &frag_hdr(packet::TCP, 0, true, 77),
        &syn,
    );
    let rest6 = raw_v6(
        PEER6,
        ME6,
        packet::FRAGMENT,
        &frag_hdr(packet::TCP, 185, true, 77),
        &[0; 64],
    );
    assert!(matches!(judge(&t, &first6, &id, &v), Verdict::New { .. }));
    assert_eq!(judge(&t, &rest6, &id, &v), Verdict::Established);
    // An ICMPv6 echo request in fragments, destination options between the fragment
    // header and the ICMPv6 header: the later fragments carry the fragment header's next
    // header, not the transport's.
    let ping = [128, 0, 0, 0, 0, 9, 0, 1];
    let first = raw_v6(
        PEER6,
        ME6,
        packet::FRAGMENT,
        &[
            frag_hdr(packet::DEST_OPTIONS, 0, true, 78),
            vec![packet::ICMPV6, 0, 1, 4, 0, 0, 0, 0],
        ]
        .concat(),
        &ping,
    );
    let rest = raw_v6(
        PEER6,
        ME6,
        packet::FRAGMENT,
        &frag_hdr(packet::DEST_OPTIONS, 185, false, 78),
        &[0; 64],
    );
    assert!(matches!(judge(&t, &first, &id, &v), Verdict::New { .. }));
    assert_eq!(judge(&t, &rest, &id, &v), Verdict::Established);
    t.advance(Duration::from_secs(fragments::FRAGMENT_TTL + 1));
    assert_eq!(
        judge(&t, &rest6, &id, &v),
        dropped(DropReason::FragmentUntracked)
    );
}

#[test]
fn unclassifiable_packets_are_dropped_with_their_reason() {
    let (t, v) = (tracker(), view(WEB_TO_DB));
    let id = peer46(&["web"]);
    let syn = raw_tcp(40000, 5432, 0x02);
    let opts = |next: u8| vec![next, 0, 1, 4, 0, 0, 0, 0];
    for bad in [
        // Nine destination options headers, then the SYN.
        raw_v6(
            PEER6,
            ME6,
            packet::DEST_OPTIONS,
            &vec![opts(packet::DEST_OPTIONS); 8].concat(),
            &[opts(packet::TCP), syn.clone()].concat(),
        ),
        // A chain ending inside a header.
        raw_v6(
            PEER6,
            ME6,
            packet::DEST_OPTIONS,
            &[packet::TCP, 1, 0, 0],
            &[],
        ),
        // Mobility: not walked.
        raw_v6(PEER6, ME6, 135, &opts(packet::TCP), &syn),
        // A routing header with a segment left: its real destination is elsewhere.
        raw_v6(
            PEER6,
            ME6,
            packet::ROUTING,
            &[&[packet::TCP, 2, 4, 1, 0, 0, 0, 0][..], &[0; 16]].concat(),
            &syn,
        ),
        // A TCP header cut short.
        raw_v4(PEER, ME, packet::TCP, 0x4000, 1, &syn[..10]),
    ] {
        assert_eq!(
            judge(&t, &bad, &id, &v),
            dropped(DropReason::Unclassifiable),
            "{bad:02x?}"
        );
    }
    assert_eq!(
        judge(&t, &[0x45, 0, 0], &id, &v),
        dropped(DropReason::Malformed)
    );
    assert!(t.is_empty());
}

/// A tracker whose `batch` service takes a port range, with small limits.
fn bounded(max_flows: usize, max_flows_per_peer: usize) -> Tracker {
    Tracker::with_limits(
        vec![LocalService {
            name: svc("batch"),
            ports: vec!["tcp/1000-60000".parse().unwrap()],
        }],
        Limits {
            max_flows,
            max_flows_per_peer,
        },
    )
}

const WEB_TO_BATCH: &str = "[[rule]]\nfrom = \"web\"\nto = \"batch\"\naction = \"allow\"\n";

/// A second peer, `other` at 100.64.0.3, in the view too.
fn other_peer(v: &mut View) -> PeerIdentity {
    extra_peer(v, "other", [100, 64, 0, 3])
}

/// Another peer `name` at `ip`, in the view, speaking for web.
fn extra_peer(v: &mut View, name: &str, ip: [u8; 4]) -> PeerIdentity {
    let mut id = peer(&["web"]);
    id.node = NodeName::new(name).unwrap();
    id.ips = vec![IpAddr::from(ip)];
    let mut info = v.peers[&NodeName::new("peer").unwrap()].clone();
    info.node = id.node.clone();
    info.overlay = id.ips.clone();
    v.peers.insert(id.node.clone(), info);
    id
}

#[test]
fn the_flow_table_is_bounded_and_keeps_replied_flows() {
    let (cap, per_peer) = (256, 200);
    let t = bounded(cap, per_peer);
    let mut v = view(WEB_TO_BATCH);
    let (a, b) = (peer(&["web"]), other_peer(&mut v));
    let b_addr = [100, 64, 0, 3];
    let mut reasons: HashMap<DropReason, usize> = HashMap::new();
    let open = |id: &PeerIdentity, src: [u8; 4], sport: u16, dport: u16| match check(
        &t,
        &tcp(src, ME, sport, dport, true),
        id,
        &v,
    ) {
        Verdict::New { .. } => None,
        Verdict::Drop { reason, .. } => Some(reason),
        Verdict::Established => panic!("a new SYN is not established"),
    };
    // Peer A opens 50 connections this node answers and A completes: established.
    for port in 1000..1050 {
        assert_eq!(open(&a, PEER, 40000, port), None);
        t.outbound(&tcp(ME, PEER, port, 40000, false)).unwrap();
        assert_eq!(
            check(&t, &tcp(PEER, ME, 40000, port, false), &a, &v),
            Verdict::Established
        );
    }
    // Then A sprays SYNs over its allowed range: it stops at its own limit.
    for port in 2000..3000 {
        if let Some(r) = open(&a, PEER, 40000, port) {
            *reasons.entry(r).or_default() += 1;
        }
    }
    assert_eq!(t.len(), per_peer);
    assert_eq!(reasons.remove(&DropReason::PeerFlowLimit), Some(1000 - 150));
    assert!(reasons.is_empty(), "{reasons:?}");
    // B sprays too: the table stays at its cap, new flows evicting unreplied ones (A's
    // and B's own, which lets B open more than its limit in all, never at once).
    for port in 1000..3000 {
        if let Some(r) = open(&b, b_addr, 40001, port) {
            *reasons.entry(r).or_default() += 1;
        }
        assert!(t.len() <= cap);
        assert!(t.peer_flows(&b.node) <= per_peer);
    }
    // Peers' flows fill seven eighths of the table; the rest is this node's own. B's new
    // flows took the place of unreplied ones (its own limit or a shard without an
    // unreplied peer flow stops the rest).
    assert_eq!(t.len(), cap - cap / 8);
    reasons.remove(&DropReason::PeerFlowLimit);
    reasons.remove(&DropReason::TableFull);
    assert!(reasons.is_empty(), "{reasons:?}");
    assert!(t.evictions() > 0, "unreplied flows were evicted");
    // A's established connections all survived, their segments pass.
    for port in 1000..1050 {
        assert_eq!(
            check(&t, &tcp(PEER, ME, 40000, port, false), &a, &v),
            Verdict::Established,
            "port {port}"
        );
    }
    // A shard holding only replied flows refuses a new one, counted: fill a small table
    // with completed flows (peers get seven eighths of it: 28).
    let small = bounded(32, 64);
    let mut full = 0;
    for port in 1000..1100 {
        match check(&small, &tcp(PEER, ME, 40000, port, true), &a, &v) {
            Verdict::New { .. } => {
                small.outbound(&tcp(ME, PEER, port, 40000, false)).unwrap();
                let ack = check(&small, &tcp(PEER, ME, 40000, port, false), &a, &v);
                assert_eq!(ack, Verdict::Established);
            }
            Verdict::Drop {
                reason: DropReason::TableFull,
                ..
            } => full += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((small.len(), full), (28, 72));
    // This node's own flows take the eighth kept for them, then are refused too when
    // nothing may be evicted.
    for port in 0..4 {
        small.outbound(&tcp(ME, PEER, port, 7, true)).unwrap();
        assert_eq!(
            check(&small, &tcp(PEER, ME, 7, port, false), &a, &v),
            Verdict::Established
        );
    }
    assert_eq!(
        small.outbound(&tcp(ME, PEER, 7, 7, true)),
        Err(DropReason::TableFull)
    );
}

#[test]
fn unreplied_flows_time_out_soon_and_replied_ones_stay() {
    let t = bounded(1024, 1024);
    let v = view(WEB_TO_BATCH);
    let a = peer(&["web"]);
    for port in 1000..1010 {
        assert!(matches!(
            check(&t, &tcp(PEER, ME, 40000, port, true), &a, &v),
            Verdict::New { .. }
        ));
    }
    for port in 1000..1005 {
        t.outbound(&tcp(ME, PEER, port, 40000, false)).unwrap();
        assert_eq!(
            check(&t, &tcp(PEER, ME, 40000, port, false), &a, &v),
            Verdict::Established
        );
    }
    // One-way UDP this node sends, and a TCP connection it opens that is answered.
    t.outbound(&udp(ME, PEER, 5000, 514)).unwrap();
    t.outbound(&tcp(ME, PEER, 50000, 443, true)).unwrap();
    assert_eq!(
        check(&t, &tcp(PEER, ME, 443, 50000, false), &a, &v),
        Verdict::Established
    );
    assert_eq!(t.len(), 12);
    t.advance(UNREPLIED_IDLE + Duration::from_secs(1));
    assert_eq!(t.recheck(&v), 6, "five SYN-only flows and the one-way UDP");
    assert_eq!(t.len(), 6);
    assert_eq!(
        check(&t, &tcp(PEER, ME, 40000, 1007, false), &a, &v),
        dropped(DropReason::NotTracked)
    );
    // The peer's flow count went down with them: it may open as many again.
    assert_eq!(t.peer_flows(&a.node), 5);
}

#[test]
fn a_recheck_of_a_full_table_is_cheap() {
    // At the default cap, from 16 peers at their default limit each.
    let limits = Limits::default();
    let t = Tracker::with_limits(
        vec![LocalService {
            name: svc("batch"),
            ports: vec!["tcp/1-65535".parse().unwrap()],
        }],
        limits,
    );
    let mut v = view(WEB_TO_BATCH);
    let mut ids = vec![];
    for i in 0..16u8 {
        let mut id = peer(&["web"]);
        id.node = NodeName::new(format!("p{i}")).unwrap();
        id.ips = vec![IpAddr::from([100, 64, 1, i])];
        let mut info = v.peers[&NodeName::new("peer").unwrap()].clone();
        info.node = id.node.clone();
        v.peers.insert(id.node.clone(), info);
        ids.push(id);
    }
    let started = std::time::Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let src = [100, 64, 1, i as u8];
        let services = Arc::new(id.services.clone());
        for port in 0..limits.max_flows_per_peer as u16 {
            let p = tcp(src, ME, 30000 + port, 1 + port, true);
            let verdict = t.inbound(&p, id, &services, &[IpAddr::from(ME)], &v);
            assert!(matches!(verdict, Verdict::New { .. }), "{verdict:?}");
        }
    }
    let fill = started.elapsed();
    // Peers fill seven eighths; the last flows evicted older unreplied ones.
    let peers_cap = limits.max_flows - limits.max_flows / 8;
    assert_eq!(t.len(), peers_cap);
    let started = std::time::Instant::now();
    assert_eq!(t.recheck(&v), 0);
    let kept = started.elapsed();
    let started = std::time::Instant::now();
    assert_eq!(t.recheck(&view("default = \"deny\"\n")), peers_cap);
    let dropped = started.elapsed();
    println!(
        "full table ({} flows, 16 peers): fill {:?} ({:?}/new flow), recheck keeping all {:?}, recheck removing all {:?} (debug build)",
        peers_cap,
        fill,
        fill / peers_cap as u32,
        kept,
        dropped
    );
    assert!(t.is_empty());
    assert!(ids.iter().all(|id| t.peer_flows(&id.node) == 0));
}

/// Issue 15, hole 1 for the overlay: a new flow from a peer that no longer stands is
/// dropped whatever the policy says, and a re-check forgets the flows of a revoked peer.
#[test]
fn a_new_flow_needs_a_peer_that_still_stands() {
    let t = tracker();
    let syn = |sport| tcp(PEER, ME, sport, 5432, true);
    let v = view(WEB_TO_DB);
    let id = peer(&["web"]);
    // The twin: the standing peer opens a flow.
    assert!(matches!(
        check(&t, &syn(40000), &id, &v),
        Verdict::New { .. }
    ));
    let dropped = |reason| Verdict::Drop { reason, rule: None };
    // Revoked: its serial on the deny list.
    let mut revoked = view(WEB_TO_DB);
    revoked.revoked.insert(id.serial.clone());
    assert_eq!(
        check(&t, &syn(40001), &id, &revoked),
        dropped(DropReason::PeerRevoked)
    );
    // Expired: a certificate that ran out (the tunnel is closed within a second; until
    // then no new flow).
    let mut old = peer(&["web"]);
    old.not_after = 1;
    assert_eq!(
        check(&t, &syn(40002), &old, &v),
        dropped(DropReason::PeerExpired)
    );
    // Unknown: not in the applied view.
    let mut gone = view(WEB_TO_DB);
    gone.peers.clear();
    assert_eq!(
        check(&t, &syn(40003), &id, &gone),
        dropped(DropReason::PeerUnknown)
    );
    // The standing peer's live flow goes at the re-check after its revocation.
    assert_eq!(t.recheck(&v), 0);
    assert_eq!(t.recheck(&revoked), 1);
    assert_eq!(
        check(&t, &tcp(PEER, ME, 40000, 5432, false), &id, &revoked),
        dropped(DropReason::NotTracked)
    );
}

/// Review finding: a flow counted as replied when this node's kernel answered a SYN with
/// a reset (or a SYN-ACK the peer never completed), so SYNs alone held one-hour entries
/// that could not be evicted, and peers' new flows evicted this node's own.
#[test]
fn a_flow_completes_only_with_the_handshake_and_peers_cannot_starve_this_node() {
    let (cap, per_peer) = (1024, 256);
    let t = bounded(cap, per_peer);
    let v = view(WEB_TO_BATCH);
    let a = peer(&["web"]);
    // SYNs to closed ports, reset by the kernel; SYNs answered but never completed.
    for port in 1000..1010 {
        assert!(matches!(
            check(&t, &tcp(PEER, ME, 40000, port, true), &a, &v),
            Verdict::New { .. }
        ));
        t.outbound(&rst(ME, PEER, port, 40000)).unwrap();
    }
    for port in 2000..2010 {
        assert!(matches!(
            check(&t, &tcp(PEER, ME, 40000, port, true), &a, &v),
            Verdict::New { .. }
        ));
        t.outbound(&tcp(ME, PEER, port, 40000, false)).unwrap();
    }
    // Its twin: a handshake the peer completes.
    assert!(matches!(
        check(&t, &tcp(PEER, ME, 40000, 3000, true), &a, &v),
        Verdict::New { .. }
    ));
    t.outbound(&tcp(ME, PEER, 3000, 40000, false)).unwrap();
    assert_eq!(
        check(&t, &tcp(PEER, ME, 40000, 3000, false), &a, &v),
        Verdict::Established
    );
    t.advance(UNREPLIED_IDLE + Duration::from_secs(1));
    assert_eq!(
        t.recheck(&v),
        20,
        "reset and half-open flows are short-lived"
    );
    assert_eq!(t.len(), 1, "the completed one stays");

    // This node's own unanswered flows (a DNS query waiting, a SYN out) survive a flood
    // from peers: peers' flows evict only peers' flows, and leave an eighth free.
    let t = bounded(cap, per_peer);
    let mut v = view(WEB_TO_BATCH);
    let peers: Vec<(PeerIdentity, [u8; 4])> = (0..6)
        .map(|i| {
            let ip = [100, 64, 1, i as u8];
            (extra_peer(&mut v, &format!("p{i}"), ip), ip)
        })
        .collect();
    for port in 0..100u16 {
        t.outbound(&tcp(ME, PEER, 50000 + port, 443, true)).unwrap();
    }
    let mut full = 0;
    for (id, ip) in &peers {
        for port in 1000..1300 {
            if let Verdict::Drop { reason, .. } =
                check(&t, &tcp(*ip, ME, 40000, port, true), id, &v)
            {
                assert!(
                    matches!(reason, DropReason::PeerFlowLimit | DropReason::TableFull),
                    "{reason:?}"
                );
                full += 1;
            }
        }
    }
    assert!(full > 0, "the peers hit the caps");
    assert!(t.len() <= cap);
    for port in 0..100u16 {
        assert_eq!(
            check(&t, &tcp(PEER, ME, 443, 50000 + port, false), &a, &v),
            Verdict::Established,
            "this node's own flow {port} survived the flood"
        );
    }
    // And it can still open new ones.
    assert!(t.outbound(&tcp(ME, PEER, 60000, 443, true)).is_ok());
}
