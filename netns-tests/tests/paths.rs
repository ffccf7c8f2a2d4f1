//! Reaching every pair of nodes: the NAT matrix (direct where the NATs allow, relayed
//! where both sides are port-dependent), relayed flows moving to direct paths, relay
//! failover, a node's address changing under a live flow, and a captured relay ping
//! replayed from elsewhere.
//!
//! ```text
//!   wan 198.18.70.0/24: coordinator .10, relays r1 .30 and r2 .31, node a .20 (no NAT)
//!   nat-b  .2 MASQUERADE            -- home-b 198.18.71.0/24: b1 .11, b2 .12 (same NAT)
//!   nat-c1 .3 MASQUERADE --random-fully -- home-c1 198.18.72.0/24: c1 .11
//!   nat-c2 .4 MASQUERADE --random-fully -- home-c2 198.18.73.0/24: c2 .11
//!   nat-d2 .5 MASQUERADE -- mid 198.18.74.0/24 -- nat-d1 MASQUERADE -- home-d 198.18.75.0/24: d .11
//!   core-e .6 (a router) -- edge-e 198.18.76.0/24 -- nat-e .2 MASQUERADE, INPUT accepting
//!       (a Linux NAT by the book) -- home-e 198.18.77.0/24: e .11
//!   attacker m .40 (p5)
//! ```

use std::net::IpAddr;
use std::time::{Duration, Instant};

use quicmesh_netns_tests::net::{echo_server, metric, paced_echo, LiveFlow};
use quicmesh_netns_tests::rogue;
use quicmesh_netns_tests::topo::{in_ns, Lan, Net};
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};
use quicmesh_protocol::path::{self as pp, PathPacket};

const POLICY: &str = r#"
default = "deny"
[[rule]]
from = "*"
to = "*"
action = "allow"
"#;

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

/// Waits up to `within` for `from`'s path to `peer` to be `via` (a relayed one naming its
/// relay); returns the last path and how long it took.
fn wait_path(
    from: &NodeProc,
    peer: &str,
    via: &str,
    within: Duration,
) -> (serde_json::Value, Duration) {
    let start = Instant::now();
    loop {
        let p = path(from, peer);
        let done = p["via"] == via && (via != "relay" || p["relay"].is_string());
        if done || start.elapsed() >= within {
            return (p, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A mesh on the WAN of the module doc: coordinator, relays, and what each test adds.
struct World {
    mesh: Mesh,
    net: Net,
    wan: Lan,
    coord: CoordinatorProc,
    relays: Vec<NodeProc>,
}

impl World {
    fn new(test: &str, relays: &[&str]) -> Self {
        let mesh = Mesh::new(test);
        let mut net = Net::new(test, mesh.path()).unwrap_or_else(|e| panic!("{e:#}"));
        let wan = net.lan("wan", "198.18.70").unwrap();
        let ns_coord = net.host("coord", &wan, 10, None).unwrap();
        let coord =
            CoordinatorProc::start_in(&mesh, "1h", &ns_coord, IpAddr::from([198, 18, 70, 10]))
                .unwrap();
        let out = coord.apply_policy(&mesh, POLICY).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut w = Self {
            mesh,
            net,
            wan,
            coord,
            relays: Vec::new(),
        };
        for (i, r) in relays.iter().enumerate() {
            let ns = w.net.host(r, &w.wan, 30 + i as u8, None).unwrap();
            let spec = NodeSpec::new(r).on(&ns).relay();
            w.relays
                .push(NodeProc::start(&w.mesh, &w.coord, &spec).unwrap());
        }
        w
    }

    /// A NAT gateway at WAN `.wan_host` in front of `home` (its `.1`).
    fn nat(&mut self, name: &str, home: &Lan, wan_host: u8, random_fully: bool) -> String {
        let nat = self
            .net
            .router(name, &[(home, 1), (&self.wan, wan_host)])
            .unwrap();
        self.net.nat_gateway(&nat, random_fully).unwrap();
        nat
    }

    /// A node in `ns` serving `svc-<name>` (echo) with upstreams to `svc-<other>`.
    fn node(&self, name: &str, ns: &str, others: &[&str]) -> NodeProc {
        let echo = in_ns(ns, || echo_server().unwrap()).unwrap();
        // Path decisions at debug: a failing matrix prints them (see `explain`).
        let mut spec = NodeSpec::new(name)
            .on(ns)
            .log_filter("info,quinn=warn,quicmesh_node::path=debug,quicmesh_node::tunnel=debug")
            .service(&format!("svc-{name}"), echo);
        for o in others {
            spec = spec.upstream(&format!("svc-{o}"));
        }
        NodeProc::start(&self.mesh, &self.coord, &spec).unwrap()
    }
}

#[test]
fn p1_nat_matrix_every_pair_connects_direct_unless_both_sides_are_port_dependent() {
    let mut w = World::new("p1", &["r1"]);
    let home_b = w.net.lan("home-b", "198.18.71").unwrap();
    let home_c1 = w.net.lan("home-c1", "198.18.72").unwrap();
    let home_c2 = w.net.lan("home-c2", "198.18.73").unwrap();
    let mid = w.net.lan("mid", "198.18.74").unwrap();
    let home_d = w.net.lan("home-d", "198.18.75").unwrap();
    w.nat("nat-b", &home_b, 2, false);
    w.nat("nat-c1", &home_c1, 3, true);
    w.nat("nat-c2", &home_c2, 4, true);
    // Two NATs in a row: nat-d1 (home-d -> mid), nat-d2 (mid -> wan).
    let nat_d2 = w.net.router("nat-d2", &[(&mid, 1), (&w.wan, 5)]).unwrap();
    w.net.nat_gateway(&nat_d2, false).unwrap();
    let nat_d1 = w.net.router("nat-d1", &[(&home_d, 1), (&mid, 2)]).unwrap();
    w.net.nat_gateway(&nat_d1, false).unwrap();
    w.net.route(&nat_d1, "default", "198.18.74.1").unwrap();
    // A Linux NAT that takes unsolicited packets for itself, one router off the WAN (a NAT
    // straight on the WAN would see the others' openers, which expire one router on).
    let edge_e = w.net.lan("edge-e", "198.18.76").unwrap();
    let home_e = w.net.lan("home-e", "198.18.77").unwrap();
    w.net
        .router("core-e", &[(&w.wan, 6), (&edge_e, 1)])
        .unwrap();
    let nat_e = w
        .net
        .router("nat-e", &[(&home_e, 1), (&edge_e, 2)])
        .unwrap();
    w.net.linux_nat(&nat_e).unwrap();
    w.net.route(&nat_e, "default", "198.18.76.1").unwrap();

    // (name, kind, namespace): a none, b endpoint-independent, c port-dependent, d double,
    // e a Linux NAT accepting packets for itself.
    let hosts = [
        ("a", 'a', w.net.host("a", &w.wan, 20, None).unwrap()),
        ("b1", 'b', w.net.host("b1", &home_b, 11, Some(1)).unwrap()),
        ("b2", 'b', w.net.host("b2", &home_b, 12, Some(1)).unwrap()),
        ("c1", 'c', w.net.host("c1", &home_c1, 11, Some(1)).unwrap()),
        ("c2", 'c', w.net.host("c2", &home_c2, 11, Some(1)).unwrap()),
        ("d", 'd', w.net.host("d", &home_d, 11, Some(1)).unwrap()),
        ("e", 'e', w.net.host("e", &home_e, 11, Some(1)).unwrap()),
    ];
    // The WAN reaches nat-e through core-e.
    for ns in ["coord", "r1", "a", "nat-b", "nat-c1", "nat-c2", "nat-d2"] {
        w.net
            .route(&w.net.ns(ns), "198.18.76.0/24", "198.18.70.6")
            .unwrap();
    }
    let names: Vec<&str> = hosts.iter().map(|h| h.0).collect();
    let nodes: Vec<NodeProc> = hosts
        .iter()
        .enumerate()
        .map(|(i, (name, _, ns))| w.node(name, ns, &names[i + 1..]))
        .collect();
    w.coord
        .wait_all_acked(nodes.len() + w.relays.len(), Duration::from_secs(30));

    struct Cell {
        pair: String,
        expect: &'static str,
        first_byte: Duration,
        at_first: serde_json::Value,
        settled: serde_json::Value,
        settled_after: Duration,
        ends: (usize, usize),
    }
    let mut grid = Vec::new();
    for i in 0..hosts.len() {
        for j in i + 1..hosts.len() {
            let (from, to) = (&nodes[i], &nodes[j]);
            let (ki, kj) = (hosts[i].1, hosts[j].1);
            let expect = if ki == 'c' && kj == 'c' {
                "relay"
            } else {
                "direct"
            };
            let t = first_byte(from, &format!("svc-{}", to.name));
            let at_first = path(from, &to.name);
            // Traffic starts on whatever works first; a direct path the punching finds
            // later takes over (within a few upgrade rounds).
            let (settled, settled_after) =
                wait_path(from, &to.name, expect, Duration::from_secs(12));
            grid.push(Cell {
                pair: format!("{} ({ki}) -> {} ({kj})", from.name, to.name),
                expect,
                first_byte: t,
                at_first,
                settled,
                settled_after: t + settled_after,
                ends: (i, j),
            });
        }
    }
    println!(
        "{:<20} {:>12}  {:<28} {:<28} expected",
        "pair", "first byte", "path at first byte", "path settled"
    );
    for c in &grid {
        let show = |p: &serde_json::Value| {
            format!(
                "{} {}",
                p["via"].as_str().unwrap_or("-"),
                p["relay"]
                    .as_str()
                    .map(|r| format!("via {r}"))
                    .unwrap_or_else(|| p["remote"].as_str().unwrap_or("").to_string())
            )
        };
        println!(
            "{:<20} {:>9.1} ms  {:<28} {:<28} {:>6.1} s  {}",
            c.pair,
            c.first_byte.as_secs_f64() * 1e3,
            show(&c.at_first),
            show(&c.settled),
            c.settled_after.as_secs_f64(),
            c.expect
        );
    }
    // A pair that did not settle as expected: what both ends decided and what the NATs
    // hold for the two (read now, while their probes keep the entries alive).
    let nats = ["nat-b", "nat-c1", "nat-c2", "nat-d1", "nat-d2", "nat-e"];
    for c in grid.iter().filter(|c| c.settled["via"] != c.expect) {
        let (from, to) = (&nodes[c.ends.0], &nodes[c.ends.1]);
        println!("\n{} did not settle {}: {}", c.pair, c.expect, c.settled);
        explain(from, &to.name);
        explain(to, &from.name);
        // Both ends' public addresses, as `a` (no NAT) reached them.
        let publics: Vec<(String, String)> = [&from.name, &to.name]
            .iter()
            .filter_map(|n| {
                grid.iter()
                    .find(|g| g.pair.starts_with(&format!("a (a) -> {n} ")))
            })
            .filter_map(|g| g.settled["remote"].as_str())
            .filter_map(|r| r.rsplit_once(':'))
            .map(|(ip, port)| (format!("={ip} "), format!("={port} ")))
            .collect();
        for nat in nats {
            let Ok(out) = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &w.net.ns(nat),
                    "cat",
                    "/proc/net/nf_conntrack",
                ])
                .output()
            else {
                continue;
            };
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("udp") && publics.iter().all(|(ip, _)| l.contains(ip)))
                .collect();
            // Entries on a public mapping's own port first (a stale one there is the
            // Linux NAT failure of the module doc).
            lines.sort_by_key(|l| !publics.iter().any(|(_, port)| l.contains(port)));
            println!("  {nat}: {} udp entries between the two", lines.len());
            for l in lines.iter().take(12) {
                println!("    {l}");
            }
        }
    }
    for c in &grid {
        assert_eq!(c.settled["via"], c.expect, "{}: {}", c.pair, c.settled);
    }
    // Same NAT: straight across the home LAN.
    let same = grid
        .iter()
        .find(|c| c.pair.starts_with("b1 (b) -> b2"))
        .unwrap();
    assert!(
        same.settled["remote"]
            .as_str()
            .unwrap()
            .starts_with("198.18.71.12:"),
        "b1 reaches b2 on their LAN: {}",
        same.settled
    );
    drop((nodes, w));
}

/// Prints what `node` logged about `peer`'s tunnel and its own NAT (the last 30 lines).
fn explain(node: &NodeProc, peer: &str) {
    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
    let needle = format!("peer={peer} ");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&needle) || l.contains("spare socket"))
        .collect();
    println!("  {} about {peer}:", node.name);
    for l in &lines[lines.len().saturating_sub(30)..] {
        println!("    {l}");
    }
}

/// A paced echo transfer of `mib` MiB from `from` to `svc` on its own thread (1.25 MiB/s).
fn start_transfer(
    from: &NodeProc,
    svc: &str,
    mib: usize,
) -> std::thread::JoinHandle<std::io::Result<quicmesh_netns_tests::net::Paced>> {
    let addr = from.upstream(svc);
    let ns = from.netns().map(str::to_string);
    std::thread::spawn(move || {
        let go = move || paced_echo(addr, mib << 20, 32 << 10, Duration::from_millis(25));
        match ns {
            Some(ns) => {
                in_ns(&ns, go).unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            }
            None => go(),
        }
    })
}

#[test]
fn p2_a_flow_on_a_relay_moves_to_the_direct_path_once_punching_works_losing_nothing() {
    let mut w = World::new("p2", &["r1"]);
    let home_x = w.net.lan("home-x", "198.18.71").unwrap();
    let home_y = w.net.lan("home-y", "198.18.72").unwrap();
    let nat_x = w.nat("nat-x", &home_x, 2, false);
    let nat_y = w.nat("nat-y", &home_y, 3, false);
    // The NATs cannot reach each other yet: only the relay path works.
    w.net.drop_forward_to(&nat_x, "198.18.70.3", true);
    w.net.drop_forward_to(&nat_y, "198.18.70.2", true);
    let ns_x = w.net.host("x", &home_x, 11, Some(1)).unwrap();
    let ns_y = w.net.host("y", &home_y, 11, Some(1)).unwrap();
    let x = w.node("x", &ns_x, &["y"]);
    let y = w.node("y", &ns_y, &[]);
    w.coord.wait_all_acked(3, Duration::from_secs(30));

    let transfer = start_transfer(&x, "svc-y", 12);
    let (p, _) = wait_path(&x, "y", "relay", Duration::from_secs(5));
    assert_eq!(p["via"], "relay", "only the relay works: {p}");
    assert_eq!(p["relay"], "r1", "{p}");
    std::thread::sleep(Duration::from_secs(3));
    w.net.drop_forward_to(&nat_x, "198.18.70.3", false);
    w.net.drop_forward_to(&nat_y, "198.18.70.2", false);
    let opened = Instant::now();
    let (p, took) = wait_path(&x, "y", "direct", Duration::from_secs(10));
    let r = transfer.join().unwrap().unwrap();
    println!(
        "relay -> direct {:.1} s after the NATs could reach each other; path {p}; transfer {} bytes in {:.1} s, longest stall {:.0} ms",
        took.as_secs_f64(),
        r.bytes,
        r.secs,
        r.max_stall.as_secs_f64() * 1e3
    );
    let _ = opened;
    assert_eq!(p["via"], "direct", "{p}");
    assert!(
        p["remote"].as_str().unwrap().starts_with("198.18.70.3:"),
        "{p}"
    );
    assert!(p["switches"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(r.bytes, 12 << 20);
    assert_eq!(r.sent, r.received, "the flow moved without losing a byte");
    drop((x, y, w));
}

#[test]
fn p3_when_the_relay_in_use_dies_flows_move_to_another_relay_within_5s() {
    let mut w = World::new("p3", &["r1", "r2"]);
    let home_x = w.net.lan("home-x", "198.18.71").unwrap();
    let home_y = w.net.lan("home-y", "198.18.72").unwrap();
    // Both port-dependent: relays are the only way.
    w.nat("nat-x", &home_x, 2, true);
    w.nat("nat-y", &home_y, 3, true);
    let ns_x = w.net.host("x", &home_x, 11, Some(1)).unwrap();
    let ns_y = w.net.host("y", &home_y, 11, Some(1)).unwrap();
    let x = w.node("x", &ns_x, &["y"]);
    let y = w.node("y", &ns_y, &[]);
    w.coord.wait_all_acked(4, Duration::from_secs(30));

    let transfer = start_transfer(&x, "svc-y", 12);
    let (p, _) = wait_path(&x, "y", "relay", Duration::from_secs(5));
    let used = p["relay"]
        .as_str()
        .unwrap_or_else(|| panic!("relayed: {p}"))
        .to_string();
    std::thread::sleep(Duration::from_secs(3));
    let i = w.relays.iter().position(|r| r.name == used).unwrap();
    w.relays[i].kill();
    let killed = Instant::now();
    let other = if used == "r1" { "r2" } else { "r1" };
    let moved = loop {
        let p = path(&x, "y");
        if p["relay"] == other || p["via"] == "direct" || killed.elapsed() > Duration::from_secs(15)
        {
            break (p, killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let r = transfer.join().unwrap().unwrap();
    println!(
        "relay {used} killed: x's tunnel to y on {} after {:.2} s; transfer {} bytes in {:.1} s, longest stall {:.2} s",
        moved.0,
        moved.1.as_secs_f64(),
        r.bytes,
        r.secs,
        r.max_stall.as_secs_f64()
    );
    assert!(
        moved.0["relay"] == other || moved.0["via"] == "direct",
        "{}",
        moved.0
    );
    assert!(moved.1 < Duration::from_secs(5), "moved within 5 s");
    assert_eq!(r.sent, r.received, "the flow survived the relay");
    assert!(
        r.max_stall < Duration::from_secs(5),
        "stall {:?}",
        r.max_stall
    );
    drop((x, y, w));
}

/// Waits until `from`'s direct path to `peer` is no longer at `old`; returns it and when.
fn wait_moved(
    from: &NodeProc,
    peer: &str,
    old: &serde_json::Value,
) -> (serde_json::Value, Duration) {
    let start = Instant::now();
    loop {
        let p = path(from, peer);
        if (p["remote"] != old["remote"] && p["via"] == "direct")
            || start.elapsed() > Duration::from_secs(15)
        {
            return (p, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn p4_nodes_whose_address_changes_mid_transfer_keep_their_flows() {
    let mut w = World::new("p4", &["r1"]);
    let home_x = w.net.lan("home-x", "198.18.71").unwrap();
    w.nat("nat-x", &home_x, 2, false);
    let ns_x = w.net.host("x", &home_x, 11, Some(1)).unwrap();
    let wan = w.wan.clone();
    let ns_y = w.net.host("y", &wan, 20, None).unwrap();
    let x = w.node("x", &ns_x, &["y"]);
    let y = w.node("y", &ns_y, &[]);
    w.coord.wait_all_acked(3, Duration::from_secs(30));

    // x (behind a NAT) sends to y (public) for ~13 s; at 3 s x gets a new address, at 7 s y.
    let transfer = start_transfer(&x, "svc-y", 16);
    let (y_to_x, _) = wait_path(&y, "x", "direct", Duration::from_secs(5));
    let (x_to_y, _) = wait_path(&x, "y", "direct", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    let renumber = |ns: &str, old: &str, new: &str, gw: Option<&str>| {
        let mut cmds = vec![
            vec!["-n", ns, "addr", "del", old, "dev", "eth0"],
            vec!["-n", ns, "addr", "add", new, "dev", "eth0"],
        ];
        if let Some(gw) = gw {
            cmds.push(vec!["-n", ns, "route", "add", "default", "via", gw]);
        }
        for c in cmds {
            quicmesh_netns_tests::topo::ip(&c).unwrap();
        }
    };
    // x renumbered (DHCP): its NAT maps the new address to a new public port.
    renumber(
        &ns_x,
        "198.18.71.11/24",
        "198.18.71.13/24",
        Some("198.18.71.1"),
    );
    let (y_to_x2, x_moved) = wait_moved(&y, "x", &y_to_x);
    std::thread::sleep(Duration::from_secs(3));
    // y renumbered: peers learn its new address from the coordinator (its control
    // connection moved) and from its probes.
    renumber(&ns_y, "198.18.70.20/24", "198.18.70.21/24", None);
    let (x_to_y2, y_moved) = wait_moved(&x, "y", &x_to_y);
    let r = transfer.join().unwrap().unwrap();
    println!(
        "x renumbered: y's path to x {} -> {} after {:.2} s",
        y_to_x["remote"],
        y_to_x2["remote"],
        x_moved.as_secs_f64()
    );
    println!(
        "y renumbered: x's path to y {} -> {} after {:.2} s",
        x_to_y["remote"],
        x_to_y2["remote"],
        y_moved.as_secs_f64()
    );
    println!(
        "transfer {} bytes in {:.1} s, longest stall {:.2} s",
        r.bytes,
        r.secs,
        r.max_stall.as_secs_f64()
    );
    assert_ne!(
        y_to_x["remote"], y_to_x2["remote"],
        "y follows x to its new mapping"
    );
    assert!(
        x_to_y2["remote"]
            .as_str()
            .unwrap()
            .starts_with("198.18.70.21:"),
        "x follows y to its new address: {x_to_y2}"
    );
    assert_eq!(r.bytes, 16 << 20);
    assert_eq!(r.sent, r.received, "the transfer completed intact");
    drop((x, y, w));
}

#[test]
fn p5_a_relay_ping_replayed_from_another_address_moves_nothing_and_draws_no_answer() {
    let mut w = World::new("p5", &["r1"]);
    let home_x = w.net.lan("home-x", "198.18.71").unwrap();
    let home_y = w.net.lan("home-y", "198.18.72").unwrap();
    // Both port-dependent: the flow has to go through r1.
    let nat_x = w.nat("nat-x", &home_x, 2, true);
    w.nat("nat-y", &home_y, 3, true);
    let ns_x = w.net.host("x", &home_x, 11, Some(1)).unwrap();
    let ns_y = w.net.host("y", &home_y, 11, Some(1)).unwrap();
    let wan = w.wan.clone();
    let ns_m = w.net.host("m", &wan, 40, None).unwrap();
    let x = w.node("x", &ns_x, &["y"]);
    let y = w.node("y", &ns_y, &[]);
    w.coord.wait_all_acked(3, Duration::from_secs(30));
    first_byte(&x, "svc-y");
    let (p, _) = wait_path(&x, "y", "relay", Duration::from_secs(10));
    assert_eq!(p["via"], "relay", "{p}");

    // An eavesdropper on x's NAT copies one of x's heartbeats to r1 as it leaves for the WAN.
    let captured = rogue::capture_udp(
        &nat_x,
        |c| {
            c.src.ip() == IpAddr::from([198, 18, 70, 2])
                && c.dst.ip() == IpAddr::from([198, 18, 70, 30])
                && matches!(pp::decode(&c.payload), Ok(Some(PathPacket::Ping(_))))
        },
        Duration::from_secs(10),
    )
    .unwrap()
    .expect("x pings r1 twice a second");
    println!(
        "captured a {}-byte ping {} -> {}",
        captured.payload.len(),
        captured.src,
        captured.dst
    );

    // ... and replays it from m every 20 ms while x sends to y through r1.
    let refused_before = metric(
        &w.relays[0].metrics().unwrap(),
        "quicmesh_path_probes_refused_total",
        &[("reason", "replayed")],
    );
    let transfer = start_transfer(&x, "svc-y", 4);
    let attacker = {
        let (ns, payload, dst) = (ns_m.clone(), captured.payload.clone(), captured.dst);
        std::thread::spawn(move || {
            rogue::replay(
                &ns,
                payload,
                dst,
                Duration::from_millis(20),
                Duration::from_secs(4),
            )
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    println!("x's path to y under attack: {}", path(&x, "y"));
    let got = attacker.join().unwrap().unwrap();
    let r = transfer.join().unwrap().unwrap();
    let metrics = w.relays[0].metrics().unwrap();
    let refused = metric(
        &metrics,
        "quicmesh_path_probes_refused_total",
        &[("reason", "replayed")],
    ) - refused_before;
    println!(
        "replayed {} pings ({} bytes) from m; m received {} datagrams ({} bytes: {} probes, {} of x's relayed datagrams); r1 refused {refused} as replayed; transfer {} bytes in {:.1} s, longest stall {:.0} ms",
        got.sent,
        got.sent_bytes,
        got.received,
        got.received_bytes,
        got.probes,
        got.relayed,
        r.bytes,
        r.secs,
        r.max_stall.as_secs_f64() * 1e3
    );
    assert_eq!(
        (got.received, got.received_bytes),
        (0, 0),
        "r1 sent the replaying address nothing: no answer, none of x's relayed datagrams"
    );
    assert!(
        refused >= (got.sent / 2) as f64,
        "r1 counted the replays: {refused} of {}",
        got.sent
    );
    assert_eq!(r.bytes, 4 << 20);
    assert_eq!(r.sent, r.received, "x's relayed flow kept going");
    assert!(
        r.max_stall < Duration::from_secs(1),
        "stall {:?}",
        r.max_stall
    );
    let (p, _) = wait_path(&x, "y", "relay", Duration::from_secs(1));
    assert_eq!(p["relay"], "r1", "{p}");
    drop((x, y, w));
}
