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

/// Two Linux NATs with the default INPUT policy, a router between them, no relay:
///
/// ```text
///   home-a 198.18.80/24 -- nat-a .2 (edge-a 198.18.81/24) --+
///   home-b 198.18.82/24 -- nat-b .2 (edge-b 198.18.83/24) --+-- core .1 -- dc 198.18.84/24: coordinator .10
/// ```
///
/// A first packet from one side reaching the other's NAT before that side's own packet
/// left is taken by the NAT for itself, and its conntrack entry holds the tuple the other
/// side's mapping needs: the dialer's openers (TTL 2) open its own NAT and die at `core`,
/// and the peer's dial-back crosses first.
#[test]
fn n3_linux_nats_that_accept_packets_for_themselves_connect_directly() {
    let mesh = Mesh::new("n3");
    let mut net = Net::new("n3", mesh.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let home_a = net.lan("home-a", "198.18.80").unwrap();
    let edge_a = net.lan("edge-a", "198.18.81").unwrap();
    let home_b = net.lan("home-b", "198.18.82").unwrap();
    let edge_b = net.lan("edge-b", "198.18.83").unwrap();
    let dc = net.lan("dc", "198.18.84").unwrap();
    net.router("core", &[(&dc, 1), (&edge_a, 1), (&edge_b, 1)])
        .unwrap();
    let mut nats = Vec::new();
    for (name, home, edge) in [("nat-a", &home_a, &edge_a), ("nat-b", &home_b, &edge_b)] {
        let nat = net.router(name, &[(home, 1), (edge, 2)]).unwrap();
        net.linux_nat(&nat).unwrap();
        net.route(&nat, "default", &edge.addr(1)).unwrap();
        nats.push(nat);
    }
    let ns_coord = net.host("coord", &dc, 10, Some(1)).unwrap();
    let ns_a = net.host("a", &home_a, 11, Some(1)).unwrap();
    let ns_b = net.host("b", &home_b, 11, Some(1)).unwrap();
    let coord =
        CoordinatorProc::start_in(&mesh, "1h", &ns_coord, IpAddr::from([198, 18, 84, 10])).unwrap();
    assert!(coord.apply_policy(&mesh, POLICY).unwrap().status.success());
    let node = |name: &str, ns: &str, other: &str| {
        let echo = in_ns(ns, || echo_server().unwrap()).unwrap();
        let spec = NodeSpec::new(name)
            .on(ns)
            .service(&format!("svc-{name}"), echo)
            .upstream(&format!("svc-{other}"));
        NodeProc::start(&mesh, &coord, &spec).unwrap()
    };
    let a = node("a", &ns_a, "b");
    let b = node("b", &ns_b, "a");
    coord.wait_all_acked(2, Duration::from_secs(20));
    let before: Vec<u64> = nats.iter().map(|n| net.nat_input_udp(n)).collect();

    // Both ways, each the first flow of its direction; no relay exists, so a flow that
    // opens crossed the NATs directly.
    let t_ab = first_byte(&a, "svc-b");
    let p_ab = path(&a, "b");
    let t_ba = first_byte(&b, "svc-a");
    let p_ba = path(&b, "a");
    let taken: Vec<u64> = nats
        .iter()
        .zip(&before)
        .map(|(n, b)| net.nat_input_udp(n) - b)
        .collect();
    let metric = |n: &NodeProc, name: &str| {
        quicmesh_netns_tests::net::metric(&n.metrics().unwrap(), name, &[])
    };
    println!(
        "a -> b first byte {:.1} ms path {p_ab}; b -> a first byte {:.1} ms path {p_ba}; \
         UDP packets the NATs took for themselves meanwhile: nat-a {}, nat-b {}; \
         openers sent a {} b {}, received a {} b {}",
        t_ab.as_secs_f64() * 1e3,
        t_ba.as_secs_f64() * 1e3,
        taken[0],
        taken[1],
        metric(&a, "quicmesh_path_openers_sent_total"),
        metric(&b, "quicmesh_path_openers_sent_total"),
        metric(&a, "quicmesh_path_openers_received_total"),
        metric(&b, "quicmesh_path_openers_received_total"),
    );
    for (p, nat_public) in [(&p_ab, "198.18.83.2:"), (&p_ba, "198.18.81.2:")] {
        assert_eq!(p["via"], "direct", "{p}");
        assert!(
            p["remote"].as_str().unwrap().starts_with(nat_public),
            "the peer at its NAT's address: {p}"
        );
    }
    assert!(
        metric(&a, "quicmesh_path_openers_sent_total") >= 1.0,
        "a opened its NAT before dialling"
    );
    // Why it worked: no first packet reached the other side's NAT before that side's own
    // left (with the openers and the lead off, the NATs took 1 and 4 and the pair ended
    // relayed through the coordinator).
    assert_eq!(taken, vec![0, 0], "packets the NATs took for themselves");
    drop((a, b, coord, net));
}

/// The race n3's openers and lead win, lost: a's first packet reached nat-b before any of
/// b's toward a left, nat-b took it for itself, and its conntrack entry (UNREPLIED,
/// refreshed by a's every ping) holds the tuple b's mapping toward a needs, so nat-b maps b
/// to another port for a and each side's packets are dropped at the other's NAT. Both
/// NATs are endpoint-independent (each node learns so from two open peers), so nothing
/// about their mappings tells the nodes to do more than ping. The pair must still settle
/// direct: still relayed at the port-dependent technique's time, both nodes open spare
/// sockets (fresh ports) as well as spray. b's meet a's spray; a's never hear b's, since
/// nat-b maps b's socket to the other port for every new destination after the held
/// tuple. (With none opened, or only a's, the pair stayed relayed through the
/// coordinator: seen.)
///
/// ```text
///   home-a 198.18.90/24 -- nat-a (Linux, accepts for itself) -- edge-a 198.18.91 --+
///   home-b 198.18.92/24 -- nat-b (Linux, accepts for itself) -- edge-b 198.18.93 --+- core
///   dc 198.18.94/24: coordinator .10, open nodes o1 .20, o2 .21 -------------------+
/// ```
#[test]
fn n7_a_nat_holding_the_tuple_its_mapping_needs_is_got_around_with_fresh_ports() {
    let mesh = Mesh::new("n7");
    let mut net = Net::new("n7", mesh.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let home_a = net.lan("home-a", "198.18.90").unwrap();
    let edge_a = net.lan("edge-a", "198.18.91").unwrap();
    let home_b = net.lan("home-b", "198.18.92").unwrap();
    let edge_b = net.lan("edge-b", "198.18.93").unwrap();
    let dc = net.lan("dc", "198.18.94").unwrap();
    net.router("core", &[(&dc, 1), (&edge_a, 1), (&edge_b, 1)])
        .unwrap();
    for (name, home, edge) in [("nat-a", &home_a, &edge_a), ("nat-b", &home_b, &edge_b)] {
        let nat = net.router(name, &[(home, 1), (edge, 2)]).unwrap();
        net.linux_nat(&nat).unwrap();
        net.route(&nat, "default", &edge.addr(1)).unwrap();
    }
    let ns_coord = net.host("coord", &dc, 10, Some(1)).unwrap();
    let ns_o1 = net.host("o1", &dc, 20, Some(1)).unwrap();
    let ns_o2 = net.host("o2", &dc, 21, Some(1)).unwrap();
    let ns_a = net.host("a", &home_a, 11, Some(1)).unwrap();
    let ns_b = net.host("b", &home_b, 11, Some(1)).unwrap();
    const PORT: u16 = 7800;
    let nat_b_public = std::net::SocketAddr::from(([198, 18, 93, 2], PORT));

    // The lost race, staged: a's socket's first datagram reaches nat-b, which takes it.
    let taken_before = net.nat_input_udp(&net.ns("nat-b"));
    in_ns(&ns_a, move || {
        let s = std::net::UdpSocket::bind(("0.0.0.0", PORT))?;
        s.send_to(b"first", nat_b_public)
    })
    .unwrap()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        net.nat_input_udp(&net.ns("nat-b")) - taken_before,
        1,
        "nat-b took a's datagram for itself"
    );

    let coord =
        CoordinatorProc::start_in(&mesh, "1h", &ns_coord, IpAddr::from([198, 18, 94, 10])).unwrap();
    assert!(coord.apply_policy(&mesh, POLICY).unwrap().status.success());
    let node = |name: &str, ns: &str, upstreams: &[&str], port: Option<u16>| {
        let echo = in_ns(ns, || echo_server().unwrap()).unwrap();
        let mut spec = NodeSpec::new(name)
            .on(ns)
            .service(&format!("svc-{name}"), echo);
        for u in upstreams {
            spec = spec.upstream(&format!("svc-{u}"));
        }
        if let Some(p) = port {
            spec = spec.listen_port(p);
        }
        NodeProc::start(&mesh, &coord, &spec).unwrap()
    };
    let _o1 = node("o1", &ns_o1, &[], None);
    let _o2 = node("o2", &ns_o2, &[], None);
    let a = node("a", &ns_a, &["o1", "o2", "b"], Some(PORT));
    let b = node("b", &ns_b, &["o1", "o2"], Some(PORT));
    coord.wait_all_acked(4, Duration::from_secs(20));
    // Two open peers each: both nodes see their NAT keep one port for every destination.
    for n in [&a, &b] {
        for o in ["svc-o1", "svc-o2"] {
            first_byte(n, o);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    // The staged entry still stands (UDP entries live 30 s unanswered).
    let conntrack = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns("nat-b"),
            "cat",
            "/proc/net/nf_conntrack",
        ])
        .output()
        .unwrap();
    let held = format!("src=198.18.91.2 dst=198.18.93.2 sport={PORT} dport={PORT} [UNREPLIED]");
    assert!(
        String::from_utf8_lossy(&conntrack.stdout).contains(&held),
        "nat-b holds {held}"
    );

    let t = first_byte(&a, "svc-b");
    let start = Instant::now();
    let (mut p, mut q) = (path(&a, "b"), path(&b, "a"));
    while (p["via"] != "direct" || q["via"] != "direct")
        && start.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(200));
        (p, q) = (path(&a, "b"), path(&b, "a"));
    }
    let metric = |n: &NodeProc, name: &str| {
        quicmesh_netns_tests::net::metric(&n.metrics().unwrap(), name, &[])
    };
    println!(
        "a -> b first byte {:.1} ms; a sees b {p} after {:.1} s, b sees a {q}; spare-socket \
         attempts a {} b {}, won a {} b {}",
        t.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64(),
        metric(&a, "quicmesh_path_spare_socket_attempts_total"),
        metric(&b, "quicmesh_path_spare_socket_attempts_total"),
        metric(&a, "quicmesh_path_spare_sockets_won_total"),
        metric(&b, "quicmesh_path_spare_sockets_won_total"),
    );
    if p["via"] != "direct" {
        // What the NATs hold between the two public addresses (the mappings and the
        // entries they took for themselves).
        for nat in ["nat-a", "nat-b"] {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &net.ns(nat),
                    "cat",
                    "/proc/net/nf_conntrack",
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.contains("udp") && l.contains("198.18.91.2") && l.contains("198.18.93.2")
                })
                .collect();
            println!("{nat}: {} udp entries between the two", lines.len());
            let mut shown: Vec<&&str> = lines.iter().filter(|l| l.contains("=7800 ")).collect();
            shown.extend(lines.iter().filter(|l| !l.contains("=7800 ")).take(6));
            for l in shown {
                println!("  {l}");
            }
        }
    }
    assert_eq!(p["via"], "direct", "a -> b settled direct: {p}");
    assert_eq!(q["via"], "direct", "b -> a settled direct: {q}");
    // How: a spare socket (a port other than the node's own) carries one end.
    let won = metric(&a, "quicmesh_path_spare_sockets_won_total")
        + metric(&b, "quicmesh_path_spare_sockets_won_total");
    assert!(won >= 1.0, "a spare socket got through");
    let fresh_port = |v: &serde_json::Value| {
        v["remote"]
            .as_str()
            .and_then(|r| r.parse::<std::net::SocketAddr>().ok())
            .is_some_and(|r| r.port() != PORT)
    };
    assert!(
        fresh_port(&p) || fresh_port(&q),
        "one end is seen at a fresh port: {p} {q}"
    );
    drop((a, b, coord, net));
}

/// No relay node in the mesh: the coordinator, which every node reaches, relays a pair
/// whose NATs cannot be punched, and a pair relayed through it only while their NATs block
/// each other moves direct once they do not.
///
/// ```text
///   wan 198.18.85/24: coordinator .10
///   nat-c1 .3, nat-c2 .4 MASQUERADE --random-fully (port-dependent) -- c1, c2 (.11 of 198.18.86, .87)
///   nat-b1 .5, nat-b2 .6 MASQUERADE (endpoint-independent)          -- b1, b2 (.11 of 198.18.88, .89)
/// ```
#[test]
fn n4_without_a_relay_node_the_coordinator_relays_and_steps_aside_for_a_direct_path() {
    let (mesh, net, coord, nodes) = relay_world("n4", &[]);
    let [c1, _c2, b1, b2] = &nodes[..] else {
        unreachable!()
    };
    // Both port-dependent: no direct path exists; the coordinator relays.
    let t = first_byte(c1, "svc-c2");
    let p = path(c1, "c2");
    println!(
        "c1 -> c2 first byte {:.1} ms, path {p}",
        t.as_secs_f64() * 1e3
    );
    assert_eq!(
        (p["via"].as_str(), p["relay"].as_str()),
        (Some("relay"), Some("coordinator")),
        "{p}"
    );

    // b1 and b2 could punch, but nat-b1 drops what goes to nat-b2: relayed at first...
    net.drop_forward_to(&net.ns("nat-b1"), "198.18.85.6", true);
    let t = first_byte(b1, "svc-b2");
    let p = path(b1, "b2");
    println!(
        "b1 -> b2 (blocked) first byte {:.1} ms, path {p}",
        t.as_secs_f64() * 1e3
    );
    assert_eq!(p["relay"].as_str(), Some("coordinator"), "{p}");
    // ... and direct once the block is lifted, the flow going on.
    net.drop_forward_to(&net.ns("nat-b1"), "198.18.85.6", false);
    let start = Instant::now();
    let mut flow = b1
        .on_host({
            let addr = b1.upstream("svc-b2");
            move || LiveFlow::open(addr)
        })
        .unwrap()
        .unwrap();
    let settled = loop {
        let p = path(b1, "b2");
        if p["via"] == "direct" || start.elapsed() > Duration::from_secs(20) {
            break p;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "b1 -> b2 after the block is lifted: {settled} after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(settled["via"], "direct", "{settled}");
    b1.on_host(move || flow.ping())
        .unwrap()
        .expect("the flow goes on");
    assert_eq!(path(b2, "b1")["via"], "direct");

    // The coordinator says whom it relays.
    let topo = coord.api_get("topology").unwrap();
    let relayed = topo["relayed"].as_array().unwrap();
    assert!(
        relayed
            .iter()
            .any(|r| r["from"] == "c1" && r["to"] == "c2" && r["by"] == "coordinator"),
        "{topo}"
    );
    let st = coord.api_get("status").unwrap();
    println!(
        "coordinator relay: {} drops {}",
        st["relay"], st["drops"]["relay"]
    );
    assert!(st["relay"]["forwarded_datagrams"].as_u64().unwrap() > 0);
    drop((nodes, coord, net, mesh));
}

/// The twin: a coordinator started with `--no-relay` relays nothing, and a pair whose
/// NATs cannot be punched does not connect.
#[test]
fn n5_a_coordinator_with_no_relay_leaves_an_unpunchable_pair_unconnected() {
    let (mesh, net, coord, nodes) = relay_world("n5", &["--no-relay"]);
    let c1 = &nodes[0];
    let addr = c1.upstream("svc-c2");
    let r = c1
        .on_host(move || LiveFlow::open(addr).and_then(|mut f| f.ping()))
        .unwrap();
    assert!(r.is_err(), "c1 reached c2 with no relay anywhere");
    assert_ne!(path(c1, "c2")["relay"], "coordinator");
    let st = coord.api_get("status").unwrap();
    assert_eq!(st["relay"]["enabled"], false, "{st}");
    assert_eq!(st["relay"]["forwarded_datagrams"], 0, "{st}");
    drop((nodes, coord, net, mesh));
}

/// A relay with two addresses on one network, peers told the second (`advertise`): it
/// answers and forwards from the address each node sends to, not the kernel's choice
/// (the first), and two nodes whose NATs cannot be punched talk through it. The
/// coordinator does not relay here, so the relay is the only way.
#[test]
fn n6_a_relay_with_two_addresses_relays_from_the_one_its_nodes_send_to() {
    let mesh = Mesh::new("n6");
    let mut net = Net::new("n6", mesh.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let wan = net.lan("wan", "198.18.93").unwrap();
    let ns_coord = net.host("coord", &wan, 10, None).unwrap();
    let coord = CoordinatorProc::start_in_with(
        &mesh,
        "1h",
        &ns_coord,
        IpAddr::from([198, 18, 93, 10]),
        &["--no-relay"],
    )
    .unwrap();
    assert!(coord.apply_policy(&mesh, POLICY).unwrap().status.success());
    let ns_r = net.host("r1", &wan, 30, None).unwrap();
    exec(
        &ns_r,
        &["ip", "addr", "add", "198.18.93.31/24", "dev", "eth0"],
    )
    .unwrap();
    let r1 = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("r1")
            .on(&ns_r)
            .relay()
            .listen_port(7900)
            .config_line("advertise = \"198.18.93.31:7900\""),
    )
    .unwrap();
    let mut nodes = Vec::new();
    for (i, (name, other)) in [("c1", "c2"), ("c2", "c1")].into_iter().enumerate() {
        let home = net
            .lan(&format!("home-{name}"), &format!("198.18.{}", 94 + i))
            .unwrap();
        let nat = net
            .router(&format!("nat-{name}"), &[(&home, 1), (&wan, 3 + i as u8)])
            .unwrap();
        net.nat_gateway(&nat, true).unwrap();
        let ns = net.host(name, &home, 11, Some(1)).unwrap();
        let echo = in_ns(&ns, || echo_server().unwrap()).unwrap();
        let spec = NodeSpec::new(name)
            .on(&ns)
            .service(&format!("svc-{name}"), echo)
            .upstream(&format!("svc-{other}"));
        nodes.push(NodeProc::start(&mesh, &coord, &spec).unwrap());
    }
    coord.wait_all_acked(3, Duration::from_secs(20));
    let c1 = &nodes[0];
    let t = first_byte(c1, "svc-c2");
    let p = path(c1, "c2");
    let to_relay = path(c1, "r1");
    println!(
        "c1 -> c2 first byte {:.1} ms, path {p}; c1's tunnel to r1 {to_relay}",
        t.as_secs_f64() * 1e3
    );
    assert_eq!(p["relay"], "r1", "{p}");
    assert_eq!(p["remote"], "198.18.93.31:7900", "{p}");
    let m = r1.metrics().unwrap();
    let forwarded =
        quicmesh_netns_tests::net::metric(&m, "quicmesh_relay_forwarded_datagrams_total", &[]);
    assert!(forwarded > 0.0, "r1 forwarded {forwarded}");
    drop((nodes, r1, coord, net, mesh));
}

/// The WAN and four NATed nodes of `n4`, the coordinator started with `args`.
fn relay_world(test: &str, args: &[&str]) -> (Mesh, Net, CoordinatorProc, Vec<NodeProc>) {
    let mesh = Mesh::new(test);
    let mut net = Net::new(test, mesh.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let wan = net.lan("wan", "198.18.85").unwrap();
    let ns_coord = net.host("coord", &wan, 10, None).unwrap();
    let coord = CoordinatorProc::start_in_with(
        &mesh,
        "1h",
        &ns_coord,
        IpAddr::from([198, 18, 85, 10]),
        args,
    )
    .unwrap();
    assert!(coord.apply_policy(&mesh, POLICY).unwrap().status.success());
    let mut hosts = Vec::new();
    for (i, (name, random_fully)) in [("c1", true), ("c2", true), ("b1", false), ("b2", false)]
        .into_iter()
        .enumerate()
    {
        let home = net
            .lan(&format!("home-{name}"), &format!("198.18.{}", 86 + i))
            .unwrap();
        let nat = net
            .router(&format!("nat-{name}"), &[(&home, 1), (&wan, 3 + i as u8)])
            .unwrap();
        net.nat_gateway(&nat, random_fully).unwrap();
        hosts.push((name, net.host(name, &home, 11, Some(1)).unwrap()));
    }
    let peer = |n: &str| match n {
        "c1" => "c2",
        "c2" => "c1",
        "b1" => "b2",
        _ => "b1",
    };
    let nodes: Vec<NodeProc> = hosts
        .iter()
        .map(|(name, ns)| {
            let echo = in_ns(ns, || echo_server().unwrap()).unwrap();
            let spec = NodeSpec::new(name)
                .on(ns)
                .service(&format!("svc-{name}"), echo)
                .upstream(&format!("svc-{}", peer(name)));
            NodeProc::start(&mesh, &coord, &spec).unwrap()
        })
        .collect();
    coord.wait_all_acked(nodes.len(), Duration::from_secs(20));
    (mesh, net, coord, nodes)
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
