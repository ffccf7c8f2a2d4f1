//! Reaching nodes behind NATs: candidates (the address the coordinator sees, the node's
//! own address) and hole punching through the coordinator.
//!
//! ```text
//!   home-a 198.18.60.0/24 -- nat-a .1 (MASQUERADE) --+
//!   home-b 198.18.61.0/24 -- nat-b .2 (MASQUERADE) --+-- wan 198.18.50.0/24: coordinator .10, open .20
//!   home-a also holds a2 (.12): two nodes behind the same NAT
//! ```

use std::net::IpAddr;
use std::time::{Duration, Instant};

use quicmesh_netns_tests::net::{echo_server, LiveFlow};
use quicmesh_netns_tests::topo::{exec, in_ns, Lan, Net};
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};

const POLICY: &str = r#"
default = "deny"
[[rule]]
from = "*"
to = "*"
action = "allow"
"#;

fn nat_gateway(net: &Net, nat: &str) {
    net.nat_gateway(nat, false).unwrap();
}

/// Opens a flow from `from` to `service` and pings it once: time to first answer.
fn first_byte(from: &NodeProc, service: &str) -> Duration {
    let addr = from.upstream(service);
    let start = Instant::now();
    from.on_host(move || {
        let mut f = LiveFlow::open(addr)?;
        f.ping()
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("{} -> {service}: {e}", from.name));
    start.elapsed()
}

/// The path `from` uses to `peer`, as its status says.
fn path(from: &NodeProc, peer: &str) -> serde_json::Value {
    from.path_to(peer)
        .unwrap_or_else(|e| panic!("{}'s status: {e:#}", from.name))
}

#[test]
fn n1_nodes_behind_nats_reach_each_other_directly_by_punching() {
    let mesh = Mesh::new("n1");
    let mut net = Net::new("n1", mesh.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let wan = net.lan("wan", "198.18.50").unwrap();
    let home_a = net.lan("home-a", "198.18.60").unwrap();
    let home_b = net.lan("home-b", "198.18.61").unwrap();
    let nat_a = net.router("nat-a", &[(&home_a, 1), (&wan, 1)]).unwrap();
    let nat_b = net.router("nat-b", &[(&home_b, 1), (&wan, 2)]).unwrap();
    for nat in [&nat_a, &nat_b] {
        nat_gateway(&net, nat);
    }
    let ns_coord = net.host("coord", &wan, 10, None).unwrap();
    let ns_open = net.host("open", &wan, 20, None).unwrap();
    let ns_a = net.host("a", &home_a, 11, Some(1)).unwrap();
    let ns_a2 = net.host("a2", &home_a, 12, Some(1)).unwrap();
    let ns_b = net.host("b", &home_b, 11, Some(1)).unwrap();
    let coord =
        CoordinatorProc::start_in(&mesh, "1h", &ns_coord, IpAddr::from([198, 18, 50, 10])).unwrap();
    let out = coord.apply_policy(&mesh, POLICY).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node = |name: &str, ns: &str, others: &[&str]| {
        let echo = in_ns(ns, || echo_server().unwrap()).unwrap();
        let mut spec = NodeSpec::new(name)
            .on(ns)
            .service(&format!("svc-{name}"), echo);
        for o in others {
            spec = spec.upstream(&format!("svc-{o}"));
        }
        NodeProc::start(&mesh, &coord, &spec).unwrap()
    };
    let a = node("a", &ns_a, &["b", "open", "a2"]);
    let a2 = node("a2", &ns_a2, &["a"]);
    let b = node("b", &ns_b, &["a"]);
    let open = node("open", &ns_open, &["a", "b"]);
    coord.wait_all_acked(4, Duration::from_secs(20));

    // The coordinator gives each NATed node's candidates: its NAT's public address first,
    // then its own address.
    let st = open.status().unwrap();
    let peer = |n: &str| {
        st["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == n)
            .unwrap()
            .clone()
    };
    let cands = peer("b")["candidates"].clone();
    println!(
        "candidates: a {} b {}; a listens on {}, b on {}",
        peer("a")["candidates"],
        cands,
        a.listen_port,
        b.listen_port
    );
    assert!(
        cands[0].as_str().unwrap().starts_with("198.18.50.2:"),
        "b seen at its NAT: {cands}"
    );
    assert!(
        cands
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c.as_str().unwrap().starts_with("198.18.61.11:")),
        "b's own address is a candidate: {cands}"
    );

    // Each pair, first flow (handshake included) and the path it took, in order:
    // open -> a: a never talked to open; open's dial alone is dropped by nat-a, a dials back.
    // b -> a: both behind NATs, both dial (punching); a -> b: the same tunnel back.
    // a2 -> a: behind the same NAT, by a's own address.
    let pairs: [(&str, &NodeProc, &str, &str); 4] = [
        ("open -> a (public to NAT)", &open, "svc-a", "a"),
        ("b -> a (NAT to NAT)", &b, "svc-a", "a"),
        ("a -> b (same tunnel back)", &a, "svc-b", "b"),
        ("a2 -> a (same NAT)", &a2, "svc-a", "a"),
    ];
    let grid: Vec<_> = pairs
        .iter()
        .map(|(pair, from, svc, to)| (*pair, first_byte(from, svc), path(from, to)))
        .collect();
    for (pair, t, p) in &grid {
        println!(
            "{pair:<28} first byte {:>7.1} ms  path {}",
            t.as_secs_f64() * 1e3,
            p
        );
    }
    for (pair, _, p) in &grid {
        assert_eq!(p["via"], "direct", "{pair}: {p}");
    }
    // Same NAT: straight across the home LAN, not hairpinned through the NAT.
    assert!(
        grid[3].2["remote"]
            .as_str()
            .unwrap()
            .starts_with("198.18.60.11:"),
        "a2 reaches a on the home LAN: {}",
        grid[3].2
    );
    // NAT to NAT: at b's NAT public address.
    assert!(
        grid[2].2["remote"]
            .as_str()
            .unwrap()
            .starts_with("198.18.50.2:")
            || grid[1].2["remote"]
                .as_str()
                .unwrap()
                .starts_with("198.18.50.1:"),
        "direct between the NATs: {grid:?}"
    );
    drop((a, a2, b, open, coord, net));
}

/// How many tunnels a node's log says came up.
fn tunnels_up(n: &NodeProc) -> usize {
    std::fs::read_to_string(&n.log)
        .unwrap_or_default()
        .matches("tunnel up")
        .count()
}

#[test]
fn n2_keepalives_hold_a_30s_nat_mapping_through_90s_of_idle() {
    let mesh = Mesh::new("n2");
    let mut net = Net::new("n2", mesh.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let wan: Lan = net.lan("wan", "198.18.52").unwrap();
    let home = net.lan("home", "198.18.62").unwrap();
    let nat = net.router("nat", &[(&home, 1), (&wan, 1)]).unwrap();
    nat_gateway(&net, &nat);
    // UDP mappings expire after 30 s without traffic, like many NATs and cloud firewalls.
    exec(
        &nat,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.netfilter.nf_conntrack_udp_timeout=30",
            "net.netfilter.nf_conntrack_udp_timeout_stream=30",
        ],
    )
    .unwrap();
    let ns_coord = net.host("coord", &wan, 10, None).unwrap();
    let ns_open = net.host("open", &wan, 20, None).unwrap();
    let ns_a = net.host("a", &home, 11, Some(1)).unwrap();
    let coord =
        CoordinatorProc::start_in(&mesh, "1h", &ns_coord, IpAddr::from([198, 18, 52, 10])).unwrap();
    assert!(coord.apply_policy(&mesh, POLICY).unwrap().status.success());
    let echo_a = in_ns(&ns_a, || echo_server().unwrap()).unwrap();
    let echo_open = in_ns(&ns_open, || echo_server().unwrap()).unwrap();
    let a = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("a")
            .on(&ns_a)
            .service("svc-a", echo_a)
            .upstream("svc-open"),
    )
    .unwrap();
    let open = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("open")
            .on(&ns_open)
            .service("svc-open", echo_open)
            .upstream("svc-a"),
    )
    .unwrap();
    coord.wait_all_acked(2, Duration::from_secs(20));
    first_byte(&a, "svc-open");
    let before = (tunnels_up(&a), tunnels_up(&open), path(&open, "a"));
    std::thread::sleep(Duration::from_secs(90));
    // The public node's request travels the tunnel a opened 90 s ago: the NAT still maps it.
    let t = first_byte(&open, "svc-a");
    let after = (tunnels_up(&a), tunnels_up(&open), path(&open, "a"));
    println!(
        "after 90 s idle behind a 30 s NAT timeout: request in {:.1} ms, tunnels up a {} -> {}, open {} -> {}, path {}",
        t.as_secs_f64() * 1e3,
        before.0,
        after.0,
        before.1,
        after.1,
        after.2
    );
    assert_eq!((before.0, before.1), (after.0, after.1), "no new handshake");
    assert_eq!(before.2["remote"], after.2["remote"], "same path");
    drop((a, open, coord, net));
}
