//! The mesh across real hosts: network namespaces for hosts, bridges for LANs, routers
//! (one of them NATing), and an impaired WAN link, all running the real binaries.
//!
//! Topology of every scenario (198.18.0.0/15 only):
//!
//! ```text
//!   dc1 198.18.1.0/24            WAN 198.18.100.0/30            dc2 198.18.2.0/24
//!   web-1 .11, web-2 .12 --- r1 ===== impair ===== r2 --- db-1 .21, payments-1 .22
//!                            |
//!   ctl 198.18.3.0/24 -------+  coordinator .10      (nat .50 -> home 198.18.10.0/24)
//! ```
//!
//! The scenarios run one at a time (they share the two cores); each builds and removes its
//! own namespaces.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use quicmesh_netns_tests::net::{
    echo_server, echo_transfer, metric, sink_server, sink_transfer, LiveFlow,
};
use quicmesh_netns_tests::rogue::{foreign_ca, leaf, mesh_ca, now, present, CertAndKey, Outcome};
use quicmesh_netns_tests::topo::{in_ns, Lan, Net, TwoDatacenters};
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec};
use quicmesh_protocol::wire::{RejectCode, StreamReply};

const IMPAIR: &str = env!("CARGO_BIN_EXE_quicmesh-impair");

const POLICY: &str = r#"
default = "deny"
[[rule]]
from = "web"
to = "db"
action = "allow"
[[rule]]
from = "web"
to = "cache"
action = "allow"
[[rule]]
from = "web"
to = "bulk"
action = "allow"
[[rule]]
from = "agent"
to = "db"
action = "allow"
[[rule]]
from = "db"
to = "agent"
action = "allow"
[[test]]
from = "web"
to = "payments"
expect = "deny"
"#;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The two-datacenter world. Field order is drop order: processes, then the network.
struct World {
    web1: NodeProc,
    web2: NodeProc,
    db: NodeProc,
    payments: NodeProc,
    coord: CoordinatorProc,
    net: Net,
    ctl: Lan,
    sink_port: u16,
    mesh: Mesh,
    _lock: MutexGuard<'static, ()>,
}

fn echo_in(ns: &str) -> SocketAddr {
    in_ns(ns, || echo_server().unwrap()).unwrap()
}

fn world(test: &str, cert_ttl: &str) -> World {
    let lock = serial();
    let mesh = Mesh::new(test);
    let mut net = Net::new(test, mesh.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let TwoDatacenters {
        dc1, dc2, ctl, r2, ..
    } = net.two_datacenters(IMPAIR.as_ref()).unwrap();
    net.route(&r2, "198.18.10.0/24", "198.18.100.1").ok();
    let ns_coord = net.host("coord", &ctl, 10, Some(1)).unwrap();
    let ns_web1 = net.host("web-1", &dc1, 11, Some(1)).unwrap();
    let ns_web2 = net.host("web-2", &dc1, 12, Some(1)).unwrap();
    let ns_db = net.host("db-1", &dc2, 21, Some(1)).unwrap();
    let ns_pay = net.host("payments-1", &dc2, 22, Some(1)).unwrap();
    // A host on the underlay that is not part of the mesh (scenario 2's rogue).
    net.host("rogue", &dc2, 99, Some(1)).unwrap();

    let coord =
        CoordinatorProc::start_in(&mesh, cert_ttl, &ns_coord, IpAddr::from([198, 18, 3, 10]))
            .unwrap();
    let out = coord.apply_policy(&mesh, POLICY).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sink = in_ns(&ns_db, || sink_server("0.0.0.0:9000").unwrap()).unwrap();
    let db = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("db-1")
            .on(&ns_db)
            .service("db", echo_in(&ns_db))
            .service("cache", echo_in(&ns_db))
            .service("bulk", sink)
            .upstream("agent")
            .upstream("agent-admin")
            .no_egress_check(),
    )
    .unwrap();
    let payments = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("payments-1")
            .on(&ns_pay)
            .service("payments", echo_in(&ns_pay)),
    )
    .unwrap();
    let web = |name: &str, ns: &str| {
        NodeSpec::new(name)
            .on(ns)
            .service("web", echo_in(ns))
            .upstream("db")
            .upstream("cache")
            .upstream("payments")
            .upstream("bulk")
            .no_egress_check()
    };
    let web1 = NodeProc::start(&mesh, &coord, &web("web-1", &ns_web1)).unwrap();
    let web2 = NodeProc::start(&mesh, &coord, &web("web-2", &ns_web2)).unwrap();
    let w = World {
        web1,
        web2,
        db,
        payments,
        coord,
        net,
        ctl,
        sink_port: sink.port(),
        mesh,
        _lock: lock,
    };
    wait_acked(&w.coord, 4, Duration::from_secs(15));
    w
}

fn wait_acked(coord: &CoordinatorProc, n: usize, within: Duration) -> Duration {
    coord.wait_all_acked(n, within)
}

fn m(node: &NodeProc, name: &str, labels: &[(&str, &str)]) -> f64 {
    node.metrics()
        .map(|t| metric(&t, name, labels))
        .unwrap_or(-1.0)
}

fn transfer_10mib(node: &NodeProc, service: &str) -> (String, String, usize) {
    let addr = node.upstream(service);
    node.on_host(move || echo_transfer(addr, 10 << 20))
        .unwrap()
        .unwrap()
}

fn open_flow(node: &NodeProc, service: &str) -> std::io::Result<LiveFlow> {
    let addr = node.upstream(service);
    node.on_host(move || LiveFlow::open(addr)).unwrap()
}

/// Pings a flow from inside its host (the socket is already connected, any thread works).
fn ping(f: &mut LiveFlow) -> std::io::Result<()> {
    f.ping()
}

#[test]
fn s1_two_datacenters_allow_web_to_db_and_deny_web_to_payments_at_its_ingress() {
    let w = world("s1", "1h");
    for web in [&w.web1, &w.web2] {
        let (sent, got, n) = transfer_10mib(web, "db");
        assert_eq!(
            (n, sent == got),
            (10 << 20, true),
            "{} -> db carried 10 MiB intact",
            web.name
        );
    }
    assert_eq!(
        m(
            &w.db,
            "quicmesh_ingress_accepted_total",
            &[("src_service", "web"), ("dst_service", "db")]
        ),
        2.0
    );
    // Denied twin: refused at payments-1's ingress, the reason counted there.
    assert!(
        open_flow(&w.web1, "payments").is_err(),
        "web -> payments must be refused"
    );
    assert_eventually(
        "payments-1 counts the denial",
        Duration::from_secs(5),
        || {
            let n = m(
                &w.payments,
                "quicmesh_ingress_rejected_total",
                &[
                    ("reason", "policy_denied"),
                    ("src_service", "web"),
                    ("dst_service", "payments"),
                ],
            );
            ensure!(n == 1.0, "policy_denied = {n}");
            Ok(())
        },
    );
    assert_eq!(m(&w.payments, "quicmesh_ingress_accepted_total", &[]), 0.0);
}

#[test]
fn s2_rogue_host_certificates_are_refused_with_reasons_and_legit_flows_continue() {
    let w = world("s2", "1h");
    let target: SocketAddr = SocketAddr::new(IpAddr::from([198, 18, 2, 21]), w.db.listen_port);
    let ca_der = w.coord.ca_der().unwrap();
    let mesh_issuer = mesh_ca(&w.coord);
    let foreign = foreign_ca();
    let t = now();

    // A revoked node's certificate: enroll old-1, revoke it, keep its key and certificate.
    let ns_old = w.net.ns("payments-1");
    let old = NodeProc::start(
        &w.mesh,
        &w.coord,
        &NodeSpec::new("old-1")
            .on(&ns_old)
            .service("web", echo_in(&ns_old)),
    )
    .unwrap();
    let old_cert = pem::parse(std::fs::read_to_string(old.data_dir.join("node.crt")).unwrap())
        .unwrap()
        .into_contents();
    let old_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(old.data_dir.join("node.key")).unwrap())
            .unwrap()
            .serialize_der();
    drop(old);
    assert!(w
        .coord
        .cli(&["nodes", "revoke", "old-1"])
        .unwrap()
        .status
        .success());
    wait_acked(&w.coord, 4, Duration::from_secs(10));

    let mut flow = open_flow(&w.web1, "db").unwrap();
    let cases: Vec<(&str, CertAndKey, &str)> = vec![
        (
            "self-signed",
            leaf(None, "web-1", &["web"], t - 60, t + 3600),
            "unknown_ca",
        ),
        (
            "foreign ca",
            leaf(Some(&foreign), "web-1", &["web"], t - 60, t + 3600),
            "unknown_ca",
        ),
        (
            "expired",
            leaf(Some(&mesh_issuer), "web-1", &["web"], t - 7200, t - 3600),
            "expired",
        ),
        (
            "not yet valid",
            leaf(Some(&mesh_issuer), "web-1", &["web"], t + 3600, t + 7200),
            "not_yet_valid",
        ),
        ("revoked node", (old_cert, old_key), "revoked"),
    ];
    let rogue_host = w.net.ns("rogue");
    let mut want_unknown = 0.0;
    for (what, cert, reason) in cases {
        let ca = ca_der.clone();
        // The rogue presents from a host on the underlay (dc2's LAN, next to db-1).
        let out = in_ns(&rogue_host, move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(present(target, &ca, cert, "web"))
        })
        .unwrap();
        assert_eq!(out, Outcome::Refused, "{what}");
        if reason == "unknown_ca" {
            want_unknown += 1.0;
        }
        let want = if reason == "unknown_ca" {
            want_unknown
        } else {
            1.0
        };
        assert_eventually(
            &format!("{what} counted as {reason}"),
            Duration::from_secs(5),
            || {
                let n = m(
                    &w.db,
                    "quicmesh_handshake_refused_total",
                    &[("reason", reason)],
                );
                ensure!(
                    n == want,
                    "handshake_refused{{reason={reason}}} = {n}, want {want}"
                );
                Ok(())
            },
        );
        ping(&mut flow).unwrap();
    }
    // Valid mesh certificate for a node of the mesh (web-1), but it may speak only for
    // payments: claiming web is refused; its honest twin claiming payments passes the
    // identity check and meets the policy.
    let rogue = leaf(Some(&mesh_issuer), "web-1", &["payments"], t - 60, t + 3600);
    for (claim, expected) in [
        (
            "web",
            StreamReply::Reject {
                code: RejectCode::SourceNotInCertificate,
                rule: None,
            },
        ),
        (
            "payments",
            StreamReply::Reject {
                code: RejectCode::PolicyDenied,
                rule: Some("default".into()),
            },
        ),
    ] {
        let (ca, cert) = (ca_der.clone(), rogue.clone());
        let out = in_ns(&rogue_host, move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(present(target, &ca, cert, claim))
        })
        .unwrap();
        assert_eq!(out, Outcome::Reply(expected), "claim {claim}");
    }
    assert_eq!(
        m(
            &w.db,
            "quicmesh_ingress_rejected_total",
            &[("reason", "source_not_in_certificate")]
        ),
        1.0
    );
    ping(&mut flow).unwrap();
    let (a, b, n) = transfer_10mib(&w.web2, "db");
    assert_eq!(
        (a == b, n),
        (true, 10 << 20),
        "legitimate flows through db-1 are unaffected"
    );
}

const POLICY_NO_WEB_DB: &str = r#"
default = "deny"
[[rule]]
from = "web"
to = "cache"
action = "allow"
[[rule]]
from = "web"
to = "bulk"
action = "allow"
[[rule]]
from = "agent"
to = "db"
action = "allow"
[[rule]]
from = "db"
to = "agent"
action = "allow"
[[test]]
from = "web"
to = "db"
expect = "deny"
"#;

#[test]
fn s3_policy_revoked_mid_flow_closes_only_that_service_and_readding_restores() {
    let w = world("s3", "1h");
    let mut db_flow = open_flow(&w.web1, "db").unwrap();
    let mut cache_flow = open_flow(&w.web1, "cache").unwrap();
    let applied = Instant::now();
    assert!(w
        .coord
        .apply_policy(&w.mesh, POLICY_NO_WEB_DB)
        .unwrap()
        .status
        .success());
    let (_, took) = assert_eventually(
        "the web -> db flow is closed",
        Duration::from_secs(5),
        || match ping(&mut db_flow) {
            Ok(()) => bail!("still flowing"),
            Err(_) => Ok(()),
        },
    );
    eprintln!(
        "RESULT s3 flow closed {:?} after the apply ({took:?} after the first check)",
        applied.elapsed()
    );
    // The other service on the same tunnel keeps flowing.
    for _ in 0..10 {
        ping(&mut cache_flow).unwrap();
    }
    assert_eq!(
        m(
            &w.db,
            "quicmesh_flows_closed_total",
            &[("reason", "policy_changed")]
        ),
        1.0
    );
    assert!(
        open_flow(&w.web1, "db").is_err(),
        "new web -> db flows are refused"
    );
    assert!(w
        .coord
        .apply_policy(&w.mesh, POLICY)
        .unwrap()
        .status
        .success());
    assert_eventually("web -> db flows again", Duration::from_secs(5), || {
        Ok(open_flow(&w.web1, "db")?)
    });
    ping(&mut cache_flow).unwrap();
}

#[test]
fn s4_coordinator_outage_across_several_renewal_periods() {
    // Certificates are enforced on live tunnels (issue 15): through an outage, traffic
    // flows on the certificates in hand until they expire, then their tunnels close
    // (`peer_expired`); when the coordinator returns the nodes renew by themselves and
    // traffic resumes, without a restart.
    let mut w = world("s4", "12s");
    let pids: Vec<u32> = [&w.web1, &w.web2, &w.db, &w.payments]
        .iter()
        .map(|n| n.pid().unwrap())
        .collect();
    let mut f1 = open_flow(&w.web1, "db").unwrap();
    let mut f2 = open_flow(&w.web2, "cache").unwrap();
    w.coord.kill();
    let down = Instant::now();
    ping(&mut f1).unwrap();
    ping(&mut f2).unwrap();
    let (_, took) = assert_eventually(
        "flows stop once the certificates in hand expire",
        Duration::from_secs(30),
        || match ping(&mut f1) {
            Ok(()) => bail!("still flowing"),
            Err(_) => Ok(()),
        },
    );
    eprintln!(
        "RESULT s4 flows stopped {:?} into the outage ({took:?} after the first check)",
        down.elapsed()
    );
    // Both ends' certificates expire within milliseconds of each other: whichever end's
    // sweep sees the other's expiry first closes the tunnel and counts it (the other logs
    // "closed by peer: peer_expired"). Counted on either end, then.
    assert_eventually("the expiry is counted", Duration::from_secs(5), || {
        let n: f64 = [&w.db, &w.web1]
            .iter()
            .map(|n| {
                m(
                    n,
                    "quicmesh_tunnels_closed_total",
                    &[("reason", "peer_expired")],
                )
                .max(0.0)
            })
            .sum();
        ensure!(
            n >= 1.0,
            "tunnels_closed{{reason=peer_expired}} on db-1 and web-1 = {n}"
        );
        Ok(())
    });
    // Down for ~3 renewal periods (renewal at ~2/3 of 12 s).
    while down.elapsed() < Duration::from_secs(25) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let back = Instant::now();
    w.coord.restart().unwrap();
    let took = wait_acked(&w.coord, 4, Duration::from_secs(10));
    eprintln!("RESULT s4 every node acked the latest snapshot {:?} after the coordinator returned ({took:?} after its API answered)", back.elapsed());
    // Everyone renewed after the outage, and no node restarted.
    assert_eventually(
        "certificates renewed after the outage",
        Duration::from_secs(10),
        || {
            for n in [&w.web1, &w.web2, &w.db, &w.payments] {
                let left = n.status()?["certificate"]["expires_in_secs"]
                    .as_i64()
                    .unwrap_or(0);
                ensure!(left > 0, "{} still holds an expired certificate", n.name);
            }
            Ok(())
        },
    );
    // New tunnels carry the renewed certificates: traffic resumes; the denied twin stays
    // denied.
    assert_eventually("web -> db flows again", Duration::from_secs(10), || {
        let mut f = open_flow(&w.web1, "db")?;
        ping(&mut f)?;
        Ok(())
    });
    let (a, b, n) = transfer_10mib(&w.web1, "db");
    assert_eq!((a == b, n), (true, 10 << 20));
    assert!(open_flow(&w.web1, "payments").is_err());
    let after: Vec<u32> = [&w.web1, &w.web2, &w.db, &w.payments]
        .iter()
        .map(|n| n.pid().unwrap())
        .collect();
    assert_eq!(pids, after, "no node restarted");
}

#[test]
fn s5_peer_restart_on_a_new_port_resumes_flows_and_counters_return_to_baseline() {
    let mut w = world("s5", "1h");
    let (a, b, _) = transfer_10mib(&w.web1, "db");
    assert_eq!(a, b);
    // Baseline: the transfer's flow has ended, the tunnel to db-1 stays.
    let (peers, active) = (1.0, 0.0);
    assert_eventually("web-1 at its baseline", Duration::from_secs(5), || {
        let p = m(&w.web1, "quicmesh_peers_connected", &[]);
        let f = m(&w.web1, "quicmesh_flows_active", &[]);
        ensure!(p == peers && f == active, "peers {p}, flows {f}");
        Ok(())
    });
    let old_port = w.db.listen_port;
    w.db.kill();
    assert!(open_flow(&w.web1, "db").is_err(), "db-1 is down");
    w.db.restart_on_new_port().unwrap();
    let back = Instant::now();
    assert_ne!(w.db.listen_port, old_port);
    let (_, took) = assert_eventually("web -> db resumes", Duration::from_secs(5), || {
        let mut f = open_flow(&w.web1, "db")?;
        ping(&mut f)?;
        Ok(())
    });
    eprintln!(
        "RESULT s5 web -> db resumed {:?} after db-1 returned on a new port ({took:?} of polling)",
        back.elapsed()
    );
    assert_eventually(
        "web-1's peer and flow counters return to baseline",
        Duration::from_secs(10),
        || {
            let p = m(&w.web1, "quicmesh_peers_connected", &[]);
            let f = m(&w.web1, "quicmesh_flows_active", &[]);
            ensure!(
                p == peers && f == active,
                "peers {p} (baseline {peers}), flows {f} (baseline {active})"
            );
            Ok(())
        },
    );
}

#[test]
fn s6_impaired_wan_profiles_deliver_10mib_intact() {
    let w = world("s6", "1h");
    let wan = &w.net.impairments[0];
    let r1 = w.net.ns("r1");
    let r2 = w.net.ns("r2");
    let plain: SocketAddr = SocketAddr::new(IpAddr::from([198, 18, 2, 21]), w.sink_port);
    let mesh_addr = w.web1.upstream("bulk");
    let ns_web = w.net.ns("web-1");
    let profiles = [
        ("200ms-rtt", "delay_ms = 100\n", None),
        ("2%-loss", "loss = 0.02\n", None),
        ("1%-corruption", "corrupt = 0.01\n", None),
        ("25%-reordering", "reorder = 0.25\nreorder_ms = 5\n", None),
        ("mtu-1280", "", Some(1280)),
    ];
    for (name, config, mtu) in profiles {
        wan.set(config).unwrap();
        if let Some(mtu) = mtu {
            w.net.mtu(&r1, "wan", mtu).unwrap();
            w.net.mtu(&r2, "wan", mtu).unwrap();
        }
        let len = 10usize << 20;
        let through = {
            let a = mesh_addr;
            in_ns(&ns_web, move || sink_transfer(a, len))
                .unwrap()
                .unwrap_or_else(|e| panic!("{name}: mesh transfer: {e}"))
        };
        assert_eq!(
            through.0, through.1,
            "{name}: 10 MiB arrived intact through the mesh"
        );
        let direct = in_ns(&ns_web, move || sink_transfer(plain, len))
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: plain transfer: {e}"));
        assert_eq!(direct.0, direct.1, "{name}: plain TCP arrived intact");
        let mbit = |secs: f64| len as f64 * 8.0 / secs / 1e6;
        eprintln!(
            "RESULT s6 {name:<15} mesh {:>7.1} Mbit/s ({:.2} s)   plain tcp {:>7.1} Mbit/s ({:.2} s)",
            mbit(through.2),
            through.2,
            mbit(direct.2),
            direct.2
        );
        if mtu.is_some() {
            w.net.mtu(&r1, "wan", 1500).unwrap();
            w.net.mtu(&r2, "wan", 1500).unwrap();
        }
    }
    wan.set("").unwrap();
}

#[test]
fn s7_node_behind_nat_enrolls_reaches_out_and_is_reached_back() {
    let mut w = world("s7", "1h");
    let ctl = w.ctl.clone();
    let home = w.net.lan("home", "198.18.10").unwrap();
    let nat = w.net.router("nat", &[(&home, 1), (&ctl, 50)]).unwrap();
    w.net.route(&nat, "default", "198.18.3.1").unwrap();
    w.net.masquerade(&nat, "eth1", false).unwrap();
    let ns_edge = w.net.host("edge-1", &home, 11, Some(1)).unwrap();
    let edge = NodeProc::start(
        &w.mesh,
        &w.coord,
        &NodeSpec::new("edge-1")
            .on(&ns_edge)
            .service("agent", echo_in(&ns_edge))
            .service("agent-admin", echo_in(&ns_edge))
            .upstream("db"),
    )
    .unwrap();
    wait_acked(&w.coord, 5, Duration::from_secs(15));
    // The coordinator sees edge-1 at the NAT's public address.
    let nodes = w.coord.json(&["nodes", "list"]).unwrap();
    let e = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "edge-1")
        .unwrap()
        .clone();
    assert!(
        e["endpoint"].as_str().unwrap().starts_with("198.18.3.50:"),
        "edge-1 is seen behind the NAT: {e}"
    );
    // Out: edge-1 -> db (the tunnel edge-1 opens through the NAT).
    let mut out = open_flow(&edge, "db").unwrap();
    ping(&mut out).unwrap();
    // Back: db-1 -> agent over that same tunnel; its denied twin agent-admin is refused at
    // edge-1's ingress with the reason counted there.
    let mut back = open_flow(&w.db, "agent").unwrap();
    ping(&mut back).unwrap();
    assert!(open_flow(&w.db, "agent-admin").is_err());
    assert_eventually("edge-1 counts the denial", Duration::from_secs(5), || {
        let n = m(
            &edge,
            "quicmesh_ingress_rejected_total",
            &[("reason", "policy_denied"), ("dst_service", "agent-admin")],
        );
        ensure!(n == 1.0, "policy_denied = {n}");
        Ok(())
    });
    assert_eq!(
        m(
            &edge,
            "quicmesh_ingress_accepted_total",
            &[("src_service", "db"), ("dst_service", "agent")]
        ),
        1.0
    );
    drop(edge);
}
