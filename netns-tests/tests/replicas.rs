//! Coordinator replicas on one PostgreSQL database, as real processes: any replica serves
//! any node; changes made on one reach the nodes of all; a replica SIGKILLed in the middle
//! of a policy change loses no node and no change; a replica cut from its database fences
//! itself and its nodes move; a revocation right after a replica restart takes effect at
//! once; and the data plane carries traffic throughout.
//!
//! The database is a fresh one on the test server (`bash .ci/postgres start`); a missing
//! server fails the test saying so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use quicmesh_coordinator::store::testdb::TestDb;
use quicmesh_netns_tests::net::{echo_server, metric, LiveFlow};
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec};

const POLICY: &str = "[[rule]]\nfrom = \"web\"\nto = \"db\"\naction = \"allow\"\n";
const POLICY2: &str = "[[rule]]\nfrom = \"web\"\nto = \"db\"\naction = \"allow\"\n\n[[rule]]\nfrom = \"db\"\nto = \"web\"\naction = \"allow\"\n";

struct Replicas {
    reps: Vec<CoordinatorProc>,
    nodes: Vec<NodeProc>,
    mesh: Mesh,
    _db: TestDb,
}

impl Replicas {
    /// Three replicas, db-1 and web-1..web-3 listing all three.
    fn start(name: &str) -> Self {
        let mesh = Mesh::new(name);
        let db = TestDb::new();
        let url = db.url.clone();
        let reps = CoordinatorProc::start_replicas(&mesh, "1h", &url, 3, &[]).unwrap();
        let out = reps[1].apply_policy(&mesh, POLICY).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let addrs: Vec<String> = reps.iter().map(|r| r.control_addr().to_string()).collect();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let mut nodes = vec![NodeProc::start(
            &mesh,
            &reps[0],
            &NodeSpec::new("db-1")
                .service("db", echo_server().unwrap())
                .coordinators(&addrs),
        )
        .unwrap()];
        for i in 1..=3 {
            nodes.push(
                NodeProc::start(
                    &mesh,
                    &reps[i % 3],
                    &NodeSpec::new(&format!("web-{i}"))
                        .service("web", echo_server().unwrap())
                        .upstream("db")
                        .coordinators(&addrs),
                )
                .unwrap(),
            );
        }
        let took = reps[2].wait_all_acked(4, Duration::from_secs(30));
        eprintln!("4 nodes on 3 replicas acked in {took:?}");
        Self {
            reps,
            nodes,
            mesh,
            _db: db,
        }
    }

    fn node(&self, name: &str) -> &NodeProc {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    /// Sessions per replica, from each node's own status.
    fn holders(&self) -> Vec<usize> {
        let mut held = vec![0; self.reps.len()];
        for n in &self.nodes {
            let st = n.status().unwrap();
            for (i, r) in self.reps.iter().enumerate() {
                if st["control"]["coordinator"] == r.control_addr().to_string() {
                    held[i] += 1;
                }
            }
        }
        held
    }
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

#[test]
fn a_replica_killed_mid_policy_change_loses_no_node_and_no_change() {
    let mut r = Replicas::start("replica-kill");
    let mut flow = LiveFlow::open(r.node("web-1").upstream("db")).unwrap();
    flow.ping().unwrap();
    // Spread: the nodes started at random replicas; kill the one holding the most.
    let held = r.holders();
    let victim = (0..3).max_by_key(|i| held[*i]).unwrap();
    let other = (victim + 1) % 3;
    eprintln!("sessions per replica {held:?}; killing replica {victim}");
    let out = r.reps[other].apply_policy(&r.mesh, POLICY2).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    r.reps[victim].kill();
    let start = Instant::now();
    let version = mesh_version(&r.reps[other]).unwrap();
    assert_eventually(
        "every node applied the policy change made as its replica died",
        Duration::from_secs(20),
        || all_applied(&r.nodes, version),
    );
    let took = start.elapsed();
    eprintln!("RESULT replica_kill every node on the new version {took:?} after the SIGKILL");
    assert_eventually(
        "the killed replica's nodes moved to the others",
        Duration::from_secs(10),
        || {
            let held = r.holders();
            ensure!(
                held[victim] == 0 && held.iter().sum::<usize>() == 4,
                "{held:?}"
            );
            Ok(())
        },
    );
    // The policy in force on every node is the new one, and the data plane never stopped.
    flow.ping().unwrap();
    r.reps[(victim + 2) % 3].wait_all_acked(4, Duration::from_secs(15));
    let listed = r.reps[other].api_get("replicas").unwrap();
    let dead: Vec<_> = listed["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["alive"] == false)
        .collect();
    assert_eq!(dead.len(), 1, "the killed replica is listed dead: {listed}");
}

#[test]
fn a_revocation_right_after_a_replica_restart_is_effective_within_2s() {
    let mut r = Replicas::start("replica-revoke");
    let mut flow = LiveFlow::open(r.node("web-2").upstream("db")).unwrap();
    flow.ping().unwrap();
    r.reps[0].restart().unwrap();
    let start = Instant::now();
    let out = r.reps[0].cli(&["nodes", "revoke", "web-2"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eventually(
        "web-2's live flow closed on revocation",
        Duration::from_secs(10),
        || match flow.ping() {
            Ok(()) => bail!("flow still carries bytes"),
            Err(_) => Ok(()),
        },
    );
    let took = start.elapsed();
    eprintln!("RESULT replica_restart_revoke effective {took:?} after `nodes revoke`");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // Denied twin: web-1's flow to db is untouched.
    let mut ok = LiveFlow::open(r.node("web-1").upstream("db")).unwrap();
    ok.ping().unwrap();
}

/// A TCP forwarder to the database that can be cut like a dropped link: bytes stop in both
/// directions and new connections hang, with nothing closed.
struct Link {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl Link {
    fn to(target: SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let Ok(up) = TcpStream::connect(target) else {
                    continue;
                };
                for (mut a, mut b) in [
                    (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, conn),
                ] {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match a.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            // Cut: what was read is dropped, and nothing more is read.
                            while c.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            if b.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self { addr, cut }
    }
}

#[test]
fn a_replica_cut_from_its_database_fences_itself_and_its_nodes_move() {
    let db = TestDb::new();
    let pg: SocketAddr = {
        let after = db.url.split('@').nth(1).unwrap();
        after.split('/').next().unwrap().parse().unwrap()
    };
    let link = Link::to(pg);
    let mesh = Mesh::new("replica-fence");
    let direct = db.url.clone();
    let via_link = direct.replacen(&pg.to_string(), &link.addr.to_string(), 1);
    let mut reps = CoordinatorProc::start_replicas(&mesh, "1h", &direct, 2, &[]).unwrap();
    // The third replica reaches the database through the link.
    let third = { CoordinatorProc::start_replica_like(&mesh, &reps[0], 2, &via_link).unwrap() };
    reps.push(third);
    let out = reps[0].apply_policy(&mesh, POLICY).unwrap();
    assert!(out.status.success());
    let cut_addr = reps[2].control_addr().to_string();
    // Every node lists the cut replica first... and the others after it.
    let addrs = [
        cut_addr.clone(),
        reps[0].control_addr().to_string(),
        reps[1].control_addr().to_string(),
    ];
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut nodes = Vec::new();
    for (name, svc) in [("db-1", "db"), ("web-1", "web")] {
        let mut spec = NodeSpec::new(name)
            .service(svc, echo_server().unwrap())
            .coordinators(&addrs);
        if svc == "web" {
            spec = spec.upstream("db");
        }
        nodes.push(NodeProc::start(&mesh, &reps[0], &spec).unwrap());
    }
    reps[0].wait_all_acked(2, Duration::from_secs(30));
    let mut flow = LiveFlow::open(nodes[1].upstream("db")).unwrap();
    // Make sure someone is on the replica to be cut: restart nodes until one is.
    let on_cut = |n: &NodeProc| {
        n.status()
            .map(|s| s["control"]["coordinator"] == cut_addr)
            .unwrap_or(false)
    };
    for n in nodes.iter_mut() {
        for _ in 0..10 {
            if on_cut(n) {
                break;
            }
            n.restart().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
        }
    }
    ensure_on_cut(&nodes, &on_cut);
    link.cut.store(true, Ordering::Relaxed);
    let start = Instant::now();
    assert_eventually(
        "no node keeps a session with the replica cut from the database",
        Duration::from_secs(15),
        || {
            for n in &nodes {
                let st = n.status()?;
                ensure!(
                    st["control"]["connected"] == true,
                    "{} not connected",
                    n.name
                );
                ensure!(!on_cut(n), "{} still on the cut replica", n.name);
            }
            Ok(())
        },
    );
    eprintln!(
        "RESULT replica_fence nodes moved {:?} after the cut",
        start.elapsed()
    );
    // Because it fenced itself: it says so, and it refuses the nodes that try it.
    assert_eventually(
        "the cut replica is fenced and refuses control connections",
        Duration::from_secs(10),
        || {
            let m = reps[2].api_text("metrics")?;
            let fenced = metric(&m, "quicmesh_coordinator_fenced", &[]);
            ensure!(fenced == 1.0, "fenced = {fenced}");
            Ok(())
        },
    );
    // A new node that knows only the cut replica cannot enroll through it: refused.
    let token = reps[0].token("web-9", &["web"], "10m").unwrap();
    let probe = NodeProc::configure(
        &mesh,
        &reps[0],
        &NodeSpec::new("web-9")
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
    assert_eventually(
        "a node dialling the cut replica is refused at once",
        Duration::from_secs(5),
        || {
            let m = reps[2].api_text("metrics")?;
            let refused = metric(
                &m,
                "quicmesh_coordinator_control_dropped_total",
                &[("reason", "fenced")],
            );
            ensure!(refused >= 1.0, "refused as fenced: {refused}");
            Ok(())
        },
    );
    // The cut replica serves no view as current: its API answers 503.
    let err = reps[2].api_get("nodes").unwrap_err().to_string();
    assert!(err.contains("503"), "{err}");
    // A change made now reaches the nodes through the other replicas.
    let out = reps[0].cli(&["nodes", "revoke", "web-1"]).unwrap();
    assert!(out.status.success());
    assert_eventually(
        "web-1's flow closed",
        Duration::from_secs(5),
        || match flow.ping() {
            Ok(()) => bail!("flow still open"),
            Err(_) => Ok(()),
        },
    );
    // Healed: the replica serves again.
    link.cut.store(false, Ordering::Relaxed);
    assert_eventually("the healed replica serves", Duration::from_secs(15), || {
        reps[2].api_get("nodes").map(|_| ())
    });
}

fn ensure_on_cut(nodes: &[NodeProc], on_cut: &dyn Fn(&NodeProc) -> bool) {
    assert!(
        nodes.iter().any(on_cut),
        "no node chose the replica to be cut in 10 restarts each"
    );
}

/// A PostgreSQL server of this test's own (restarted by it), from `.ci/postgres`.
struct OwnServer {
    dir: String,
    port: u16,
    url: String,
}

impl OwnServer {
    fn script(&self, verb: &str) -> anyhow::Result<String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/postgres");
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg(verb)
            .env("QUICMESH_PG_DIR", &self.dir)
            .env("QUICMESH_PG_PORT", self.port.to_string())
            .output()?;
        ensure!(
            out.status.success(),
            ".ci/postgres {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Self {
            dir: format!("/tmp/quicmesh-pg-{}-{port}", std::process::id()),
            port,
            url: String::new(),
        };
        s.url = s
            .script("start")
            .unwrap_or_else(|e| panic!("the PostgreSQL restart test needs its own server: {e}"));
        s
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.script("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(format!("{}.initdb.log", self.dir));
    }
}

#[test]
fn replicas_ride_out_a_postgresql_restart_losing_no_change_and_no_packet() {
    let pg = OwnServer::start();
    let mesh = Mesh::new("replica-pg-restart");
    let reps = CoordinatorProc::start_replicas(&mesh, "1h", &pg.url, 3, &[]).unwrap();
    assert!(reps[0]
        .apply_policy(&mesh, POLICY)
        .unwrap()
        .status
        .success());
    let addrs: Vec<String> = reps.iter().map(|r| r.control_addr().to_string()).collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let db = NodeProc::start(
        &mesh,
        &reps[0],
        &NodeSpec::new("db-1")
            .service("db", echo_server().unwrap())
            .coordinators(&addrs),
    )
    .unwrap();
    let web = NodeProc::start(
        &mesh,
        &reps[1],
        &NodeSpec::new("web-1")
            .service("web", echo_server().unwrap())
            .upstream("db")
            .coordinators(&addrs),
    )
    .unwrap();
    reps[2].wait_all_acked(2, Duration::from_secs(30));
    let nodes = [db, web];
    let mut flow = LiveFlow::open(nodes[1].upstream("db")).unwrap();
    // A change committed just before the restart.
    assert!(reps[1]
        .apply_policy(&mesh, POLICY2)
        .unwrap()
        .status
        .success());
    let before = mesh_version(&reps[1]).unwrap();
    pg.script("stop").unwrap();
    // The data plane carries bytes all through the outage (a ping every 100 ms).
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(6) {
        flow.ping()
            .expect("the data plane stopped during the database outage");
        std::thread::sleep(Duration::from_millis(100));
    }
    // While the database is down no replica serves a view as current.
    for r in &reps {
        let e = r.api_get("nodes").unwrap_err().to_string();
        assert!(e.contains("503"), "{e}");
    }
    pg.script("start").unwrap();
    let back = Instant::now();
    assert_eventually(
        "every node back in session and on the change made before the restart",
        Duration::from_secs(30),
        || {
            all_applied(&nodes, before)?;
            for n in &nodes {
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
    // And a change made after it reaches everyone; the flow never stopped.
    let out = reps[2].cli(&["nodes", "revoke", "web-1"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eventually(
        "web-1's flow closed",
        Duration::from_secs(5),
        || match flow.ping() {
            Ok(()) => bail!("flow still open"),
            Err(_) => Ok(()),
        },
    );
}
