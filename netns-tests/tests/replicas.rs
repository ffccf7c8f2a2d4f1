//! Coordinator replicas on one PostgreSQL database, as real processes on real hosts: three
//! replicas and the database on a coordinator LAN, nodes in two datacenters. Any replica
//! serves any node; a replica SIGKILLed in the middle of a policy change loses no node and
//! no change (a); a replica cut from its database by a firewall fences itself and its nodes
//! move (b); the replicas ride out a database restart, losing no change, while the data
//! plane carries traffic throughout (c); a revocation right after a replica restart takes
//! effect within 2 s (d).
//!
//! Topology (198.18.0.0/15 only):
//!
//! ```text
//!   dc1 198.18.1.0/24                WAN 198.18.100.0/30       dc2 198.18.2.0/24
//!   web-1 .11 web-2 .12 web-3 .13 -- r1 ======================= r2 -- db-1 .21
//!                                    |
//!   ctl 198.18.3.0/24 ---------------+  postgres .5, replicas .10 .11 .12 (:7700)
//! ```
//!
//! Each scenario builds its own network and its own PostgreSQL server (from `.ci/postgres`,
//! inside the `pg` namespace); a server that cannot start fails the test saying so. The
//! scenarios run one at a time: their timings share two cores.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use quicmesh_netns_tests::net::{echo_server, metric, LiveFlow};
use quicmesh_netns_tests::pg::PgServer;
use quicmesh_netns_tests::topo::{in_ns, Net, TwoDatacenters};
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec, Place};

const IMPAIR: &str = env!("CARGO_BIN_EXE_quicmesh-impair");
const POLICY: &str = "[[rule]]\nfrom = \"web\"\nto = \"db\"\naction = \"allow\"\n";
const POLICY2: &str = "[[rule]]\nfrom = \"web\"\nto = \"db\"\naction = \"allow\"\n\n[[rule]]\nfrom = \"db\"\nto = \"web\"\naction = \"allow\"\n";
const PG_IP: [u8; 4] = [198, 18, 3, 5];

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The world of every scenario. Field order is drop order: processes, the database, then
/// the network.
struct World {
    nodes: Vec<NodeProc>,
    reps: Vec<CoordinatorProc>,
    pg: PgServer,
    net: Net,
    dc1: quicmesh_netns_tests::topo::Lan,
    mesh: Mesh,
    _lock: MutexGuard<'static, ()>,
}

impl World {
    fn start(test: &str) -> Self {
        let lock = serial();
        let mesh = Mesh::new(test);
        let mut net = Net::new(test, mesh.path()).unwrap_or_else(|e| panic!("{e:#}"));
        let TwoDatacenters { dc1, dc2, ctl, .. } = net.two_datacenters(IMPAIR.as_ref()).unwrap();
        let ns_pg = net.host("pg", &ctl, 5, Some(1)).unwrap();
        let pg = PgServer::in_ns(&ns_pg, IpAddr::from(PG_IP)).unwrap_or_else(|e| panic!("{e:#}"));
        let places: Vec<Place> = (0..3u8)
            .map(|i| {
                let ns = net
                    .host(&format!("rep-{i}"), &ctl, 10 + i, Some(1))
                    .unwrap();
                Place::ns(&ns, IpAddr::from([198, 18, 3, 10 + i]))
            })
            .collect();
        let reps = CoordinatorProc::start_replicas(&mesh, "1h", &pg.url, &places, &[])
            .unwrap_or_else(|e| panic!("{e:#}"));
        let out = reps[1].apply_policy(&mesh, POLICY).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let addrs = addrs(&reps);
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let ns_db = net.host("db-1", &dc2, 21, Some(1)).unwrap();
        let mut nodes = vec![NodeProc::start(
            &mesh,
            &reps[0],
            &NodeSpec::new("db-1")
                .on(&ns_db)
                .service("db", in_ns(&ns_db, || echo_server().unwrap()).unwrap())
                .coordinators(&addrs),
        )
        .unwrap()];
        for i in 1..=3u8 {
            let name = format!("web-{i}");
            let ns = net.host(&name, &dc1, 10 + i, Some(1)).unwrap();
            nodes.push(
                NodeProc::start(
                    &mesh,
                    &reps[i as usize % 3],
                    &NodeSpec::new(&name)
                        .on(&ns)
                        .service("web", in_ns(&ns, || echo_server().unwrap()).unwrap())
                        .upstream("db")
                        .coordinators(&addrs),
                )
                .unwrap(),
            );
        }
        let took = reps[2].wait_all_acked(4, Duration::from_secs(30));
        eprintln!("4 nodes in two datacenters on 3 replicas acked in {took:?}");
        Self {
            nodes,
            reps,
            pg,
            net,
            dc1,
            mesh,
            _lock: lock,
        }
    }

    fn node(&self, name: &str) -> &NodeProc {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    /// A live connection through `node`'s upstream to db, opened on its host.
    fn flow(&self, node: &str) -> LiveFlow {
        let n = self.node(node);
        let addr = n.upstream("db");
        let mut f = n.on_host(move || LiveFlow::open(addr)).unwrap().unwrap();
        f.ping().unwrap();
        f
    }

    /// Sessions per replica, from each node's own status.
    fn holders(&self) -> Vec<usize> {
        let mut held = vec![0; self.reps.len()];
        for n in &self.nodes {
            let Ok(st) = n.status() else { continue };
            for (i, r) in self.reps.iter().enumerate() {
                if st["control"]["coordinator"] == r.control_addr().to_string() {
                    held[i] += 1;
                }
            }
        }
        held
    }

    /// The replica holding the most sessions (every node listed all three and started at a
    /// random one, so some replica holds at least two of the four).
    fn busiest(&self) -> usize {
        let held = self.holders();
        let i = (0..self.reps.len()).max_by_key(|i| held[*i]).unwrap();
        eprintln!("sessions per replica {held:?}: replica {i} holds the most");
        i
    }

    /// Every node is in session with a replica other than `victim`.
    fn all_moved_off(&self, victim: usize) -> anyhow::Result<()> {
        let gone = self.reps[victim].control_addr().to_string();
        for n in &self.nodes {
            let st = n.status()?;
            ensure!(
                st["control"]["connected"] == true,
                "{} not in session",
                n.name
            );
            ensure!(
                st["control"]["coordinator"] != gone.as_str(),
                "{} still on replica {victim}",
                n.name
            );
        }
        Ok(())
    }
}

fn addrs(reps: &[CoordinatorProc]) -> Vec<String> {
    reps.iter().map(|r| r.control_addr().to_string()).collect()
}

fn mesh_version(rep: &CoordinatorProc) -> anyhow::Result<u64> {
    let v = rep.json(&["nodes", "list"])?;
    v["mesh_version"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no version"))
}

/// Every node has applied at least `version` (read from the nodes themselves).
fn all_applied(nodes: &[NodeProc], version: u64) -> anyhow::Result<()> {
    for n in nodes {
        let st = n.status()?;
        let have = st["snapshot_version"].as_u64().unwrap_or(0);
        ensure!(have >= version, "{} has {have}, not {version}", n.name);
    }
    Ok(())
}

fn closed(flow: &mut LiveFlow) -> anyhow::Result<()> {
    match flow.ping() {
        Ok(()) => bail!("flow still carries bytes"),
        Err(_) => Ok(()),
    }
}

fn ok(out: std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_replica_killed_mid_policy_change_loses_no_node_and_no_change() {
    let mut w = World::start("rkill");
    let mut flow = w.flow("web-1");
    let victim = w.busiest();
    let other = (victim + 1) % 3;
    ok(w.reps[other].apply_policy(&w.mesh, POLICY2).unwrap());
    w.reps[victim].kill();
    let start = Instant::now();
    let version = mesh_version(&w.reps[other]).unwrap();
    assert_eventually(
        "every node applied the policy change made as its replica died",
        Duration::from_secs(20),
        || all_applied(&w.nodes, version),
    );
    let applied = start.elapsed();
    assert_eventually(
        "the killed replica's nodes moved to the others",
        Duration::from_secs(10),
        || w.all_moved_off(victim),
    );
    let moved = start.elapsed();
    eprintln!(
        "RESULT replica_kill every node on the new version {applied:?}, every node in session elsewhere {moved:?} after the SIGKILL"
    );
    // A replica's death moves its nodes within 5 s (4 s of silence, then the next replica).
    assert!(moved < Duration::from_secs(6), "moved after {moved:?}");
    // The policy in force on every node is the new one, and the data plane never stopped.
    flow.ping().unwrap();
    w.reps[(victim + 2) % 3].wait_all_acked(4, Duration::from_secs(15));
    // Listed dead once its heartbeat is REPLICA_DEAD_AFTER_MS old: its nodes may have moved
    // (4 s of silence) a few hundred ms before that (CI at cff26a3 saw 4,889 ms).
    let dead_count = || {
        let listed = w.reps[other].api_get("replicas").unwrap();
        let n = listed["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["alive"] == false)
            .count();
        (n, listed)
    };
    assert_eventually(
        "the killed replica is listed dead",
        Duration::from_secs(3),
        || {
            let (n, listed) = dead_count();
            anyhow::ensure!(n == 1, "{listed}");
            Ok(())
        },
    );
    let (n, listed) = dead_count();
    assert_eq!(n, 1, "only the killed replica is listed dead: {listed}");
}

#[test]
fn a_revocation_right_after_a_replica_restart_is_effective_within_2s() {
    let mut w = World::start("rrevoke");
    let mut flow = w.flow("web-2");
    let busiest = w.busiest();
    w.reps[busiest].restart().unwrap();
    let start = Instant::now();
    ok(w.reps[busiest].cli(&["nodes", "revoke", "web-2"]).unwrap());
    assert_eventually(
        "web-2's live flow closed on revocation",
        Duration::from_secs(10),
        || closed(&mut flow),
    );
    let took = start.elapsed();
    eprintln!("RESULT replica_restart_revoke effective {took:?} after `nodes revoke`");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // Denied twin: web-1's flow to db is untouched, on every node the revocation reached.
    let mut untouched = w.flow("web-1");
    untouched.ping().unwrap();
}

/// Drops every packet between a replica's host and the database's, both ways: a firewall
/// change or a partition, with nothing closed.
fn cut(net: &Net, rep: &CoordinatorProc, op: &str) {
    let ns = rep.netns.as_deref().unwrap();
    let pg = IpAddr::from(PG_IP).to_string();
    net.iptables(ns, &[op, "OUTPUT", "-d", &pg, "-j", "DROP"])
        .unwrap();
    net.iptables(ns, &[op, "INPUT", "-s", &pg, "-j", "DROP"])
        .unwrap();
}

#[test]
fn a_replica_cut_from_its_database_fences_itself_and_its_nodes_move() {
    let mut w = World::start("rfence");
    let mut flow = w.flow("web-1");
    let c = w.busiest();
    let live = (c + 1) % 3;
    cut(&w.net, &w.reps[c], "-A");
    let start = Instant::now();
    assert_eventually(
        "no node keeps a session with the replica cut from the database",
        Duration::from_secs(15),
        || w.all_moved_off(c),
    );
    eprintln!(
        "RESULT replica_fence nodes moved {:?} after the cut",
        start.elapsed()
    );
    // Because it fenced itself: it says so, and it refuses the nodes that try it.
    assert_eventually("the cut replica is fenced", Duration::from_secs(10), || {
        let m = w.reps[c].api_text("metrics")?;
        let fenced = metric(&m, "quicmesh_coordinator_fenced", &[]);
        ensure!(fenced == 1.0, "fenced = {fenced}");
        Ok(())
    });
    // Denied twin of the live replicas: the cut one serves no view as current (503).
    let err = w.reps[c].api_get("nodes").unwrap_err().to_string();
    assert!(err.contains("503"), "{err}");
    w.reps[live].api_get("nodes").unwrap();
    // A new node that knows only the cut replica cannot enroll through it: refused.
    let cut_addr = w.reps[c].control_addr().to_string();
    let token = w.reps[live].token("web-9", &["web"], "10m").unwrap();
    let ns9 = w.net.host("web-9", &w.dc1, 19, Some(1)).unwrap();
    let probe = NodeProc::configure(
        &w.mesh,
        &w.reps[live],
        &NodeSpec::new("web-9")
            .on(&ns9)
            .service("web", echo_server().unwrap())
            .coordinators(&[&cut_addr]),
        &token,
    )
    .unwrap();
    // It keeps retrying (and is stopped after 3 s): it never gets a certificate there.
    let kept = probe
        .run_to_exit(Duration::from_secs(3))
        .unwrap_err()
        .to_string();
    assert!(kept.contains("refused"), "{kept}");
    let m = w.reps[c].api_text("metrics").unwrap();
    let refused = metric(
        &m,
        "quicmesh_coordinator_control_dropped_total",
        &[("reason", "fenced")],
    );
    assert!(refused >= 1.0, "refused as fenced: {refused}");
    // A change made now reaches the nodes through the other replicas.
    ok(w.reps[live].cli(&["nodes", "revoke", "web-1"]).unwrap());
    assert_eventually("web-1's flow closed", Duration::from_secs(5), || {
        closed(&mut flow)
    });
    // Healed: the replica serves again, current (it has the revocation).
    cut(&w.net, &w.reps[c], "-D");
    assert_eventually(
        "the healed replica serves the current view",
        Duration::from_secs(15),
        || {
            let v = w.reps[c].json(&["nodes", "list"])?;
            let web1 = v["nodes"]
                .as_array()
                .and_then(|a| a.iter().find(|n| n["name"] == "web-1"))
                .cloned()
                .unwrap_or_default();
            ensure!(
                !web1["revoked_at"].is_null(),
                "web-1 on the healed replica: {web1}"
            );
            Ok(())
        },
    );
}

#[test]
fn replicas_ride_out_a_postgresql_restart_losing_no_change_and_no_packet() {
    let w = World::start("rpgrestart");
    let mut flow = w.flow("web-1");
    // A change committed just before the restart.
    ok(w.reps[1].apply_policy(&w.mesh, POLICY2).unwrap());
    let before = mesh_version(&w.reps[1]).unwrap();
    w.pg.stop().unwrap();
    // The data plane carries bytes all through the outage (a ping every 100 ms).
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(6) {
        flow.ping()
            .expect("the data plane stopped during the database outage");
        std::thread::sleep(Duration::from_millis(100));
    }
    // While the database is down no replica serves a view as current.
    for r in &w.reps {
        let e = r.api_get("nodes").unwrap_err().to_string();
        assert!(e.contains("503"), "{e}");
    }
    w.pg.restart().unwrap();
    let back = Instant::now();
    assert_eventually(
        "every node back in session and on the change made before the restart",
        Duration::from_secs(30),
        || {
            all_applied(&w.nodes, before)?;
            for n in &w.nodes {
                ensure!(
                    n.status()?["control"]["connected"] == true,
                    "{} not in session",
                    n.name
                );
            }
            Ok(())
        },
    );
    eprintln!(
        "RESULT pg_restart nodes back in session {:?} after the database",
        back.elapsed()
    );
    flow.ping().unwrap();
    // And a change made after it reaches everyone.
    ok(w.reps[2].cli(&["nodes", "revoke", "web-1"]).unwrap());
    assert_eventually("web-1's flow closed", Duration::from_secs(5), || {
        closed(&mut flow)
    });
}
