//! Reaching every pair of nodes: the NAT matrix (direct where the NATs allow, relayed
//! where both sides are port-dependent), relayed flows moving to direct paths, relay
//! failover and a node's address changing under a live flow.
//!
//! ```text
//!   wan 198.18.70.0/24: coordinator .10, relays r1 .30 and r2 .31, node a .20 (no NAT)
//!   nat-b  .2 MASQUERADE            -- home-b 198.18.71.0/24: b1 .11, b2 .12 (same NAT)
//!   nat-c1 .3 MASQUERADE --random-fully -- home-c1 198.18.72.0/24: c1 .11
//!   nat-c2 .4 MASQUERADE --random-fully -- home-c2 198.18.73.0/24: c2 .11
//!   nat-d2 .5 MASQUERADE -- mid 198.18.74.0/24 -- nat-d1 MASQUERADE -- home-d 198.18.75.0/24: d .11
//! ```

use std::net::IpAddr;
use std::time::{Duration, Instant};

use quicmesh_netns_tests::net::{echo_server, paced_echo, LiveFlow};
use quicmesh_netns_tests::topo::{in_ns, Lan, Net};
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};

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
    let st = from.status().unwrap();
    st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == peer)
        .map(|p| p["path"].clone())
        .unwrap_or_default()
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
            let spec = NodeSpec::new(r).on(&ns).config_line("relay = true");
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
        let mut spec = NodeSpec::new(name)
            .on(ns)
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

    // (name, kind, namespace): a none, b endpoint-independent, c port-dependent, d double.
    let hosts = [
        ("a", 'a', w.net.host("a", &w.wan, 20, None).unwrap()),
        ("b1", 'b', w.net.host("b1", &home_b, 11, Some(1)).unwrap()),
        ("b2", 'b', w.net.host("b2", &home_b, 12, Some(1)).unwrap()),
        ("c1", 'c', w.net.host("c1", &home_c1, 11, Some(1)).unwrap()),
        ("c2", 'c', w.net.host("c2", &home_c2, 11, Some(1)).unwrap()),
        ("d", 'd', w.net.host("d", &home_d, 11, Some(1)).unwrap()),
    ];
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
