//! Overlay mode across real hosts: TUN devices in network namespaces, nodes on either
//! side of a router, IP packets carried as QUIC datagrams and firewalled at ingress.
//!
//! ```text
//!   lan a 198.18.20.0/24                           lan b 198.18.21.0/24
//!   node-a .10, coordinator .20 --- r .1 | .1 --- node-b .10, node-c .11
//! ```
//!
//! Overlay addresses come from the coordinator (100.64.0.0/10 and a ULA /48). Runs one
//! scenario at a time (they share the two cores).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quicmesh_netns_tests::net::{metric, sink_server, sink_transfer};
use quicmesh_netns_tests::topo::{
    echo_round_trip, exec, in_ns, ping_until, tcp_echo_in, udp_echo_in, Net,
};
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

struct World {
    net: Net,
    mesh: Mesh,
    coord: CoordinatorProc,
    ns_a: String,
    ns_b: String,
    ns_c: String,
}

/// Two LANs joined by a router; the coordinator on lan a.
fn world(test: &str, b_mtu: Option<u32>) -> World {
    let mesh = Mesh::new(test);
    let mut net = Net::new(test, mesh.path()).unwrap();
    let a = net.lan("a", "198.18.20").unwrap();
    let b = net.lan("b", "198.18.21").unwrap();
    let r = net.router("r", &[(&a, 1), (&b, 1)]).unwrap();
    let ns_a = net.host("a", &a, 10, Some(1)).unwrap();
    let ns_ctl = net.host("ctl", &a, 20, Some(1)).unwrap();
    let ns_b = net.host("b", &b, 10, Some(1)).unwrap();
    let ns_c = net.host("c", &b, 11, Some(1)).unwrap();
    if let Some(mtu) = b_mtu {
        // The router's leg into lan b carries at most `mtu` bytes (and says so with ICMP).
        net.mtu(&r, "eth1", mtu).unwrap();
    }
    let coord = CoordinatorProc::start_in(&mesh, "1h", &ns_ctl, [198, 18, 20, 20].into()).unwrap();
    World {
        net,
        mesh,
        coord,
        ns_a,
        ns_b,
        ns_c,
    }
}

impl World {
    /// Starts a node (configured by `spec`) against this world's coordinator.
    fn node(&self, spec: NodeSpec) -> NodeProc {
        NodeProc::start(&self.mesh, &self.coord, &spec).unwrap()
    }
}

/// The node's overlay addresses (IPv4, IPv6), waiting for the device.
fn overlay_addrs(n: &NodeProc) -> (IpAddr, IpAddr) {
    let addrs = n
        .overlay_addrs(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v4 = addrs.iter().find(|a| a.is_ipv4()).copied();
    let v6 = addrs.iter().find(|a| a.is_ipv6()).copied();
    match (v4, v6) {
        (Some(v4), Some(v6)) => (v4, v6),
        _ => panic!("{}: overlay addresses {addrs:?}", n.name),
    }
}

fn drops(n: &NodeProc, reason: &str) -> f64 {
    metric(
        &n.metrics().unwrap_or_default(),
        "quicmesh_overlay_dropped_total",
        &[("reason", reason)],
    )
}

const BOTH_WAYS: &str = r#"
default = "deny"
[[rule]]
from = "a-svc"
to = "b-svc"
action = "allow"
[[rule]]
from = "b-svc"
to = "a-svc"
action = "allow"
"#;

#[test]
fn overlay_ping_tcp_and_udp_across_a_router_ipv4_and_ipv6() {
    let _s = serial();
    let w = world("ov1", None);
    w.coord.apply_policy(&w.mesh, BOTH_WAYS).unwrap();
    let ports = ["icmp", "tcp/5201", "udp/5353"];
    let a = w.node(
        NodeSpec::new("node-a")
            .on(&w.ns_a)
            .overlay("qm0")
            .overlay_service("a-svc", &ports),
    );
    let b = w.node(
        NodeSpec::new("node-b")
            .on(&w.ns_b)
            .overlay("qm0")
            .overlay_service("b-svc", &ports),
    );
    w.coord.wait_all_acked(2, Duration::from_secs(20));
    let (a4, a6) = overlay_addrs(&a);
    let (b4, b6) = overlay_addrs(&b);
    assert!(a4.to_string().starts_with("100.") && b4.to_string().starts_with("100."));
    // Ping both ways, IPv4 and IPv6.
    for (ns, to) in [(&w.ns_a, b4), (&w.ns_a, b6), (&w.ns_b, a4), (&w.ns_b, a6)] {
        assert!(
            ping_until(ns, to, Duration::from_secs(10)),
            "no ping reply from {to}"
        );
    }
    // 100 MiB over TCP, intact.
    let bind = SocketAddr::new(b4, 5201);
    in_ns(&w.ns_b, move || sink_server(&bind.to_string()).unwrap()).unwrap();
    let t = Instant::now();
    let (sent, got, secs) = in_ns(&w.ns_a, move || {
        sink_transfer(bind, 100 * 1024 * 1024).unwrap()
    })
    .unwrap();
    assert_eq!(sent, got, "100 MiB through the overlay arrived altered");
    eprintln!(
        "overlay: 100 MiB in {secs:.2} s ({:.0} Mbit/s), {:?} with setup",
        800.0 * 1.048_576 / secs,
        t.elapsed()
    );
    // A UDP exchange: 100 datagrams, each answered.
    let ubind = SocketAddr::new(b4, 5353);
    udp_echo_in(&w.ns_b, ubind);
    let answered = in_ns(&w.ns_a, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut ok = 0;
        for i in 0..100u32 {
            let msg = i.to_be_bytes();
            s.send_to(&msg, ubind).unwrap();
            let mut b = [0u8; 16];
            if let Ok((n, _)) = s.recv_from(&mut b) {
                if b[..n] == msg {
                    ok += 1;
                }
            }
        }
        ok
    })
    .unwrap();
    assert!(
        answered >= 98,
        "only {answered} of 100 UDP datagrams answered"
    );
    // The status shows the datagram counters per peer.
    let st = a.status().unwrap();
    let peer = &st["overlay"]["peers"]["node-b"];
    assert!(peer["tx_packets"].as_u64().unwrap_or(0) > 1000, "{st}");
    assert!(peer["rx_packets"].as_u64().unwrap_or(0) > 100, "{st}");
}

#[test]
fn overlay_ingress_drops_spoofed_unowned_and_denied_packets_and_policy_removal_stops_flows() {
    let _s = serial();
    let w = world("ov2", None);
    let policy =
        "default = \"deny\"\n[[rule]]\nfrom = \"a-svc\"\nto = \"b-svc\"\naction = \"allow\"\n";
    w.coord.apply_policy(&w.mesh, policy).unwrap();
    let a = w.node(
        NodeSpec::new("node-a")
            .on(&w.ns_a)
            .overlay("qm0")
            .overlay_service("a-svc", &["tcp/9"]),
    );
    let b = w.node(
        NodeSpec::new("node-b")
            .on(&w.ns_b)
            .overlay("qm0")
            .overlay_service("b-svc", &["tcp/5201", "udp/5353"])
            .overlay_service("b-admin", &["tcp/6000"]),
    );
    let c = w.node(
        NodeSpec::new("node-c")
            .on(&w.ns_c)
            .overlay("qm0")
            .overlay_service("c-svc", &["tcp/9"]),
    );
    w.coord.wait_all_acked(3, Duration::from_secs(20));
    let (_, _) = overlay_addrs(&a);
    let (b4, _) = overlay_addrs(&b);
    let (c4, _) = overlay_addrs(&c);
    for port in [5201, 6000, 7000] {
        tcp_echo_in(&w.ns_b, SocketAddr::new(b4, port));
    }
    udp_echo_in(&w.ns_b, SocketAddr::new(b4, 5353));

    // The allowed port passes (after the tunnel is dialled by the first SYN).
    let allowed = SocketAddr::new(b4, 5201);
    let t = Instant::now();
    while echo_round_trip(&w.ns_a, allowed).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "allowed port never passed"
        );
    }
    // Its denied twin: b-admin's port; policy allows a-svc to reach b-svc only.
    let before = drops(&b, "policy_denied");
    assert!(echo_round_trip(&w.ns_a, SocketAddr::new(b4, 6000)).is_err());
    assert!(
        drops(&b, "policy_denied") > before,
        "denied SYN not counted at node-b"
    );
    // A port no service owns.
    let before = drops(&b, "no_service");
    assert!(echo_round_trip(&w.ns_a, SocketAddr::new(b4, 7000)).is_err());
    assert!(drops(&b, "no_service") > before, "unowned port not counted");

    // Spoofing: node-a's host sends with node-c's overlay address as source (an extra
    // address on its TUN device): node-b drops it as spoofed, its allowed port or not.
    exec(
        &w.ns_a,
        &["ip", "addr", "add", &format!("{c4}/32"), "dev", "qm0"],
    )
    .unwrap();
    let before = drops(&b, "spoofed");
    let to = SocketAddr::new(b4, 5353);
    let got = in_ns(&w.ns_a, move || {
        let s = UdpSocket::bind(SocketAddr::new(c4, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut answered = 0;
        for _ in 0..5 {
            s.send_to(b"spoof", to).unwrap();
            let mut buf = [0u8; 16];
            if s.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
        answered
    })
    .unwrap();
    assert_eq!(got, 0, "a spoofed packet was answered");
    assert!(
        drops(&b, "spoofed") >= before + 5.0,
        "spoofed packets not counted"
    );
    let st = b.status().unwrap();
    assert!(
        st["overlay"]["peers"]["node-a"]["dropped"]["spoofed"]
            .as_u64()
            .unwrap_or(0)
            >= 5,
        "{st}"
    );

    // A tracked flow stops within 5 s of the rule's removal.
    let flow = in_ns(&w.ns_a, move || {
        let s = TcpStream::connect_timeout(&allowed, Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s
    })
    .unwrap();
    let mut f = flow;
    let round = |f: &mut TcpStream| -> bool {
        f.write_all(b"12345678").is_ok() && {
            let mut b = [0u8; 8];
            f.read_exact(&mut b).is_ok()
        }
    };
    assert!(
        round(&mut f),
        "tracked flow does not work before the change"
    );
    w.coord
        .apply_policy(&w.mesh, "default = \"deny\"\n")
        .unwrap();
    let t = Instant::now();
    let mut stopped = None;
    while t.elapsed() < Duration::from_secs(8) {
        if !round(&mut f) {
            stopped = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stopped = stopped.expect("flow still passes 8 s after its rule was removed");
    assert!(
        stopped < Duration::from_secs(5),
        "flow stopped only after {stopped:?}"
    );
    eprintln!("overlay: tracked flow stopped {stopped:?} after the rule was removed");
    assert!(
        drops(&b, "not_tracked") > 0.0,
        "the flow's next segments were not dropped as untracked"
    );
    drop(w.net);
}

#[test]
fn overlay_tcp_completes_over_a_1280_byte_underlay_path() {
    let _s = serial();
    let w = world("ov3", Some(1280));
    w.coord.apply_policy(&w.mesh, BOTH_WAYS).unwrap();
    let a = w.node(
        NodeSpec::new("node-a")
            .on(&w.ns_a)
            .overlay("qm0")
            .overlay_service("a-svc", &["icmp"]),
    );
    let b = w.node(
        NodeSpec::new("node-b")
            .on(&w.ns_b)
            .overlay("qm0")
            .overlay_service("b-svc", &["tcp/5201", "icmp"]),
    );
    w.coord.wait_all_acked(2, Duration::from_secs(20));
    let (_, _) = overlay_addrs(&a);
    let (b4, _) = overlay_addrs(&b);
    assert!(ping_until(&w.ns_a, b4, Duration::from_secs(10)));
    let bind = SocketAddr::new(b4, 5201);
    in_ns(&w.ns_b, move || sink_server(&bind.to_string()).unwrap()).unwrap();
    let (sent, got, secs) = in_ns(&w.ns_a, move || {
        sink_transfer(bind, 20 * 1024 * 1024).unwrap()
    })
    .unwrap();
    assert_eq!(sent, got, "20 MiB over a 1280-byte path arrived altered");
    let too_big = drops(&a, "too_big");
    eprintln!("overlay over a 1280-byte path: 20 MiB in {secs:.2} s; {too_big} packets answered with ICMP too big");
    assert!(too_big > 0.0, "no packet was answered with ICMP too big");
    drop(w.net);
}

/// Connections waiting in SYN-RECV on `port` in namespace `ns` (a SYN the stack took).
fn syn_recv(ns: &str, port: u16) -> usize {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htn", "state", "syn-recv"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("]:{port} ")))
        .count()
}

#[test]
fn overlay_ipv6_extension_headers_and_fragments_do_not_bypass_the_firewall() {
    use quicmesh_netns_tests::rogue::crafted;
    let _s = serial();
    let w = world("ov4", None);
    let policy =
        "default = \"deny\"\n[[rule]]\nfrom = \"a-svc\"\nto = \"b-svc\"\naction = \"allow\"\n";
    w.coord.apply_policy(&w.mesh, policy).unwrap();
    let a = w.node(
        NodeSpec::new("node-a")
            .on(&w.ns_a)
            .overlay("qm0")
            .overlay_service("a-svc", &["tcp/9"]),
    );
    let b = w.node(
        NodeSpec::new("node-b")
            .on(&w.ns_b)
            .overlay("qm0")
            .overlay_service("b-svc", &["tcp/5201", "udp/5353"])
            .overlay_service("b-admin", &["tcp/6000"]),
    );
    w.coord.wait_all_acked(2, Duration::from_secs(20));
    let (_, a6) = overlay_addrs(&a);
    let (_, b6) = overlay_addrs(&b);
    let (IpAddr::V6(a6), IpAddr::V6(b6)) = (a6, b6) else {
        unreachable!()
    };
    udp_echo_in(&w.ns_b, SocketAddr::new(b6.into(), 5353));
    for port in [5201, 6000] {
        tcp_echo_in(&w.ns_b, SocketAddr::new(b6.into(), port));
    }

    // node-b's host sends node-a a fragmented datagram (2000 bytes at the 1400-byte
    // overlay MTU): the old tracker keyed its fragments "protocol 44, no ports" and then
    // let in anything node-a sent with a fragment header first.
    // (Repeated: the first packets only dial the tunnel.)
    in_ns(&w.ns_b, move || {
        let s = UdpSocket::bind("[::]:0").unwrap();
        for _ in 0..6 {
            s.send_to(&[7u8; 2000], SocketAddr::new(a6.into(), 9999))
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
    })
    .unwrap();

    // The attack: an atomic fragment (fragment header, offset 0, M=0) wrapping a SYN to
    // b-admin's port, which policy does not let a-svc reach. Sent until node-b saw it
    // one way or the other (node-a's first packets may only dial the tunnel).
    let before = drops(&b, "policy_denied");
    let (mut answered, mut taken) = (0, 0);
    for _ in 0..5 {
        let syn = crafted::atomic_fragment_syn(a6, b6, 40000, 6000);
        answered += in_ns(&w.ns_a, move || {
            crafted::send_and_count_syn_acks(&syn, b6, 6000, Duration::from_secs(1)).unwrap()
        })
        .unwrap();
        taken = syn_recv(&w.ns_b, 6000);
        if taken > 0 || drops(&b, "policy_denied") > before {
            break;
        }
    }
    assert_eq!(
        (answered, taken),
        (0, 0),
        "b-admin took an atomic-fragment-wrapped SYN (SYN-ACKs seen at a, SYN-RECV at b)"
    );
    assert!(
        drops(&b, "policy_denied") > before,
        "the wrapped SYN was not dropped as policy_denied at node-b: {:?}",
        b.status().map(|s| s["overlay"].clone())
    );
    // Its allowed twin: the same wrapping of a SYN to b-svc's port is answered.
    let syn = crafted::atomic_fragment_syn(a6, b6, 40001, 5201);
    let answered = in_ns(&w.ns_a, move || {
        crafted::send_and_count_syn_acks(&syn, b6, 5201, Duration::from_secs(2)).unwrap()
    })
    .unwrap();
    assert!(answered > 0, "an allowed wrapped SYN drew no SYN-ACK");
    // Fragmented datagrams both ways pass (new with the fragment tracking: before, a
    // later fragment's "protocol 44" opened nothing): 2000 bytes to b-svc's UDP port
    // (the echo reads 2048) and back.
    let to = SocketAddr::new(b6.into(), 5353);
    let t = Instant::now();
    loop {
        let echoed = in_ns(&w.ns_a, move || {
            let s = UdpSocket::bind("[::]:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            s.send_to(&[7u8; 2000], to).unwrap();
            let mut buf = [0u8; 4000];
            s.recv_from(&mut buf).map(|(n, _)| n).unwrap_or(0)
        })
        .unwrap();
        if echoed == 2000 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "a fragmented datagram never made the round trip: a {:?}, b {:?}",
            a.status().map(|s| s["overlay"].clone()),
            b.status().map(|s| s["overlay"].clone())
        );
    }

    drop(w.net);
}
