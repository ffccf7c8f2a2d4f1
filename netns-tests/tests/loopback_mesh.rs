//! The core mesh end to end on loopback: a real coordinator and real nodes as separate
//! processes, the demo policy (web -> db allowed, everything else denied).

use std::time::Duration;

use anyhow::{bail, ensure};
use quicmesh_netns_tests::net::{echo_server, echo_transfer, free_tcp_port, metric, LiveFlow};
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec};

use quicmesh_coordinator::dev::DEMO_POLICY;

const NO_WEB_DB: &str = r#"
default = "deny"
[[test]]
from = "web"
to = "db"
expect = "deny"
"#;

struct Demo {
    mesh: Mesh,
    coord: CoordinatorProc,
    web: NodeProc,
    db: NodeProc,
    payments: NodeProc,
}

/// Coordinator + web-1 (no egress check, so ingress decides), db-1, payments-1.
fn demo(test: &str) -> Demo {
    let mesh = Mesh::new(test);
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let out = coord.apply_policy(&mesh, DEMO_POLICY).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("db-1").service("db", echo_server().unwrap()),
    )
    .unwrap();
    let payments = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("payments-1").service("payments", echo_server().unwrap()),
    )
    .unwrap();
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .service("web", echo_server().unwrap())
            .upstream("db")
            .upstream("payments")
            .no_egress_check(),
    )
    .unwrap();
    let d = Demo {
        mesh,
        coord,
        web,
        db,
        payments,
    };
    wait_all_acked(&d.coord, 3);
    d
}

/// Waits until `n` nodes are online and have acked the current mesh version.
fn wait_all_acked(coord: &CoordinatorProc, n: usize) {
    coord.wait_all_acked(n, Duration::from_secs(15));
}

fn rejected(node: &NodeProc, reason: &str) -> f64 {
    node.metrics()
        .map(|m| metric(&m, "quicmesh_ingress_rejected_total", &[("reason", reason)]))
        .unwrap_or(-1.0)
}

fn refused(node: &NodeProc, reason: &str) -> f64 {
    node.metrics()
        .map(|m| {
            metric(
                &m,
                "quicmesh_handshake_refused_total",
                &[("reason", reason)],
            )
        })
        .unwrap_or(-1.0)
}

fn closed(node: &NodeProc, reason: &str) -> f64 {
    node.metrics()
        .map(|m| metric(&m, "quicmesh_flows_closed_total", &[("reason", reason)]))
        .unwrap_or(-1.0)
}

/// A refused flow: the upstream accepts, then closes without a byte of answer.
fn assert_refused(addr: std::net::SocketAddr) {
    match LiveFlow::open(addr) {
        Ok(_) => panic!("flow to {addr} was expected to be refused but answered"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ),
            "unexpected error kind for a refused flow: {e:?}"
        ),
    }
}

#[test]
fn allowed_flow_carries_10mib_both_ways_and_denied_flow_is_refused_at_ingress() {
    let t = std::time::Instant::now();
    let d = demo("allow-deny");
    eprintln!("mesh up in {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let (sent, got, n) = echo_transfer(d.web.upstream("db"), 10 << 20).unwrap();
    eprintln!("10 MiB echoed in {:?}", t.elapsed());
    assert_eq!(n, 10 << 20, "all bytes came back");
    assert_eq!(sent, got, "sha256 of what came back equals what was sent");
    let m = d.db.metrics().unwrap();
    assert_eq!(
        metric(
            &m,
            "quicmesh_ingress_accepted_total",
            &[("src_service", "web"), ("dst_service", "db")]
        ),
        1.0
    );

    // Denied twin: web -> payments, decided at payments-1's ingress by the default rule.
    let before = rejected(&d.payments, "policy_denied");
    assert_eq!(before, 0.0);
    assert_refused(d.web.upstream("payments"));
    assert_eventually(
        "payments-1 counts the policy denial",
        Duration::from_secs(5),
        || {
            let m = d.payments.metrics()?;
            let n = metric(
                &m,
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
    let m = d.web.metrics().unwrap();
    assert_eq!(
        metric(
            &m,
            "quicmesh_egress_rejected_total",
            &[("reason", "policy_denied")]
        ),
        1.0,
        "web-1 saw the peer's reject"
    );
    let status = d.payments.status().unwrap();
    assert_eq!(status["counters"]["ingress_rejected/policy_denied"], 1);
}

#[test]
fn sender_side_check_fails_fast_without_reaching_the_peer() {
    let d = demo("egress-check");
    // web-2 checks policy before dialling (the default): the denial never reaches payments.
    let web2 = NodeProc::start(
        &d.mesh,
        &d.coord,
        &NodeSpec::new("web-2")
            .service("web", echo_server().unwrap())
            .upstream("payments")
            .upstream("db"),
    )
    .unwrap();
    wait_all_acked(&d.coord, 4);
    assert_refused(web2.upstream("payments"));
    let m = web2.metrics().unwrap();
    assert_eq!(
        metric(
            &m,
            "quicmesh_egress_rejected_total",
            &[("reason", "policy_denied"), ("dst_service", "payments")]
        ),
        1.0
    );
    assert_eq!(
        rejected(&d.payments, "policy_denied"),
        0.0,
        "payments-1 never saw the flow"
    );
    // Allowed twin through the same node.
    LiveFlow::open(web2.upstream("db")).unwrap();
}

#[test]
fn enrollment_refuses_reused_expired_and_foreign_name_tokens() {
    let d = demo("enroll");
    let spec = NodeSpec::new("web-9").service("web", echo_server().unwrap());

    // Reused: web-7 enrolls with its token; a second enrollment with it is refused.
    let reuse2 = {
        let mesh2 = &d.mesh;
        let t = d.coord.token("web-7", &["web"], "10m").unwrap();
        let first = NodeProc::configure(
            mesh2,
            &d.coord,
            &NodeSpec {
                name: "web-7".into(),
                ..spec.clone()
            },
            &t,
        )
        .unwrap();
        let mut first = first;
        first.restart().unwrap();
        first.kill();
        // A second node with a new data dir presents the same token again.
        let again = NodeProc::configure(
            mesh2,
            &d.coord,
            &NodeSpec {
                name: "web-7".into(),
                ..spec.clone()
            },
            &t,
        )
        .unwrap();
        std::fs::remove_dir_all(&again.data_dir).unwrap();
        again.run_to_exit(Duration::from_secs(20)).unwrap()
    };
    let err = String::from_utf8_lossy(&reuse2.stderr);
    assert_eq!(reuse2.status.code(), Some(77), "{err}");
    assert!(
        err.contains("enrollment refused: token already used"),
        "{err}"
    );

    // Expired.
    let t = d.coord.token("web-8", &["web"], "1s").unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let n = NodeProc::configure(
        &d.mesh,
        &d.coord,
        &NodeSpec {
            name: "web-8".into(),
            ..spec.clone()
        },
        &t,
    )
    .unwrap();
    let out = n.run_to_exit(Duration::from_secs(20)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("enrollment refused: token expired"), "{err}");

    // Another node's name.
    let t = d.coord.token("db-9", &["web"], "10m").unwrap();
    let n = NodeProc::configure(&d.mesh, &d.coord, &spec, &t).unwrap();
    let out = n.run_to_exit(Duration::from_secs(20)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(
        err.contains("enrollment refused: token is for another node name"),
        "{err}"
    );

    // A service the token does not cover.
    let t = d.coord.token("web-9", &["db"], "10m").unwrap();
    let n = NodeProc::configure(&d.mesh, &d.coord, &spec, &t).unwrap();
    let out = n.run_to_exit(Duration::from_secs(20)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("token does not allow a claimed service (service web)"),
        "{err}"
    );

    // Allowed twin: a fresh token for the right name and services enrolls.
    let t = d.coord.token("web-9", &["web"], "10m").unwrap();
    let mut n = NodeProc::configure(&d.mesh, &d.coord, &spec, &t).unwrap();
    std::fs::remove_dir_all(&n.data_dir).ok();
    n.restart().unwrap();
    assert_eventually("web-9 online", Duration::from_secs(10), || {
        let v = d.coord.json(&["nodes", "list"])?;
        ensure!(
            v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == "web-9" && n["online"] == true),
            "web-9 not online"
        );
        Ok(())
    });
    // The foreign-name token did not enroll anything.
    let nodes = d.coord.json(&["nodes", "list"]).unwrap();
    assert!(!nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["name"] == "db-9" || n["name"] == "web-8"));
}

/// A coordinator SIGKILLed and started again on the same address: the nodes' control
/// connections to the dead process must end at once (the new process answers their next
/// packet with a stateless reset they recognise, its reset key being kept in the data
/// dir), so a revocation issued right after the restart reaches them within 2 s rather
/// than after their idle timeout.
#[test]
fn a_revocation_right_after_a_coordinator_restart_takes_effect_within_2s() {
    let mut d = demo("restart-revoke");
    wait_all_acked(&d.coord, 3);
    let mut flow = LiveFlow::open(d.web.upstream("db")).unwrap();
    flow.ping().unwrap();
    d.coord.restart().unwrap();
    let start = std::time::Instant::now();
    let out = d.coord.cli(&["nodes", "revoke", "web-1"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, _) = assert_eventually(
        "the revoked node's live flow is closed",
        Duration::from_secs(30),
        || match flow.ping() {
            Ok(()) => bail!("flow still carries bytes"),
            Err(_) => Ok(()),
        },
    );
    let took = start.elapsed();
    eprintln!("revocation effective {took:?} after `nodes revoke` following a restart");
    assert!(
        took < Duration::from_secs(2),
        "revocation after a coordinator restart took {took:?} (limit 2 s)"
    );
}

/// A node listing several coordinator addresses (an IP that never answers, a DNS name)
/// enrolls and keeps its session with the one that answers, and says which in `status`.
#[test]
fn a_node_listing_a_silent_replica_and_a_name_reaches_the_live_one() {
    let mesh = Mesh::new("replica-list");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    // Bound and never read: packets to it vanish, as to a dead host.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent = silent.local_addr().unwrap().to_string();
    let live = format!("localhost:{}", coord.control_addr().port());
    let mut nodes = Vec::new();
    for round in 0..2 {
        let name = format!("web-{round}");
        let node = NodeProc::start(
            &mesh,
            &coord,
            &NodeSpec::new(&name)
                .service("web", echo_server().unwrap())
                .coordinators(&[&silent, &live]),
        )
        .unwrap();
        assert_eventually(
            "session up with the live replica",
            Duration::from_secs(15),
            || {
                let st = node.status()?;
                ensure!(
                    st["control"]["connected"] == true,
                    "not connected: {}",
                    st["control"]
                );
                ensure!(
                    st["control"]["coordinator"] == coord.control_addr().to_string(),
                    "connected to {}",
                    st["control"]["coordinator"]
                );
                Ok(())
            },
        );
        nodes.push(node);
    }
    wait_all_acked(&coord, 2);
}

#[test]
fn revoking_a_node_closes_its_flows_and_refuses_new_ones() {
    let d = demo("revoke");
    let mut flow = LiveFlow::open(d.web.upstream("db")).unwrap();
    let out = d.coord.cli(&["nodes", "revoke", "web-1"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, took) = assert_eventually(
        "the revoked node's live flow is closed",
        Duration::from_secs(5),
        || match flow.ping() {
            Ok(()) => bail!("flow still carries bytes"),
            Err(_) => Ok(()),
        },
    );
    eprintln!("live flow closed {took:?} after revocation");
    // New flows from the revoked node are refused at db-1's handshake, reason revoked.
    assert_eventually(
        "db-1 refuses the revoked certificate",
        Duration::from_secs(5),
        || {
            ensure!(
                LiveFlow::open(d.web.upstream("db")).is_err(),
                "new flow got through"
            );
            let n = refused(&d.db, "revoked");
            ensure!(n >= 1.0, "handshake_refused{{reason=revoked}} = {n}");
            Ok(())
        },
    );
    // payments-1 and db-1 still talk to the rest of the mesh: the coordinator lists web-1
    // as revoked and the others acked the snapshot carrying the deny list.
    let nodes = d.coord.json(&["nodes", "list"]).unwrap();
    let web = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "web-1")
        .unwrap()
        .clone();
    assert!(!web["revoked_at"].is_null());
    wait_all_acked(&d.coord, 2);
}

#[test]
fn policy_change_closes_live_flows_and_readding_lets_new_flows_through() {
    let d = demo("policy-change");
    let mut flow = LiveFlow::open(d.web.upstream("db")).unwrap();
    let out = d.coord.apply_policy(&d.mesh, NO_WEB_DB).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, took) = assert_eventually(
        "the live web -> db flow is closed",
        Duration::from_secs(5),
        || match flow.ping() {
            Ok(()) => bail!("flow still carries bytes"),
            Err(_) => Ok(()),
        },
    );
    eprintln!("live flow closed {took:?} after the policy change");
    assert_eq!(
        closed(&d.db, "policy_changed"),
        1.0,
        "db-1 closed it for the policy change"
    );
    assert_refused(d.web.upstream("db"));
    // Re-adding the rule lets new flows through.
    let out = d.coord.apply_policy(&d.mesh, DEMO_POLICY).unwrap();
    assert!(out.status.success());
    assert_eventually("web -> db flows again", Duration::from_secs(5), || {
        Ok(LiveFlow::open(d.web.upstream("db"))?)
    });

    // A policy whose test fails is rejected whole, naming the test; nothing changes.
    let bad = DEMO_POLICY.replace(
        "to = \"payments\"\nexpect = \"deny\"",
        "to = \"payments\"\nexpect = \"allow\"",
    );
    let before = d.coord.json(&["policy", "show"]).unwrap()["version"].clone();
    let out = d.coord.apply_policy(&d.mesh, &bad).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("test[1]"), "{err}");
    assert_eq!(
        d.coord.json(&["policy", "show"]).unwrap()["version"],
        before
    );
}

#[test]
fn mesh_works_through_a_coordinator_outage_and_restart_keeps_state() {
    let mut d = demo("outage");
    let before = d.coord.json(&["nodes", "list"]).unwrap();
    let policy_before = d.coord.json(&["policy", "show"]).unwrap();
    let ca_before = std::fs::read(d.coord.data_dir.join("ca.crt")).unwrap();
    let mut flow = LiveFlow::open(d.web.upstream("db")).unwrap();

    d.coord.kill();
    // Existing and new flows keep working.
    for _ in 0..5 {
        flow.ping().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let (a, b, _) = echo_transfer(d.web.upstream("db"), 1 << 20).unwrap();
    assert_eq!(a, b);
    // A node restarted during the outage serves again from its stored state.
    d.db.kill();
    d.db.restart().unwrap();
    let status = d.db.status().unwrap();
    assert!(
        status["snapshot_version"].as_u64().unwrap() > 0,
        "db-1 restored its snapshot"
    );
    assert_eq!(status["control"]["connected"], false);
    assert_eventually(
        "web -> db works again through the restarted db-1",
        Duration::from_secs(10),
        || {
            let (a, b, n) = echo_transfer(d.web.upstream("db"), 64 << 10)?;
            ensure!(a == b && n == 64 << 10, "transfer mismatch");
            Ok(())
        },
    );
    // The denied twin still holds during the outage.
    assert_refused(d.web.upstream("payments"));

    d.coord.restart().unwrap();
    wait_all_acked(&d.coord, 3);
    let after = d.coord.json(&["nodes", "list"]).unwrap();
    let names = |v: &serde_json::Value| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&before), names(&after));
    assert_eq!(
        d.coord.json(&["policy", "show"]).unwrap()["version"],
        policy_before["version"]
    );
    assert_eq!(
        std::fs::read(d.coord.data_dir.join("ca.crt")).unwrap(),
        ca_before
    );
    // The flow opened before the outage to the db-1 that was restarted ended with it; the
    // mesh serves new flows after the coordinator is back.
    LiveFlow::open(d.web.upstream("db")).unwrap();
}

#[test]
fn certificates_renew_before_expiry_and_the_mesh_keeps_working_past_the_first_expiry() {
    let mesh = Mesh::new("renewal");
    let coord = CoordinatorProc::start(&mesh, "8s").unwrap();
    assert!(coord
        .apply_policy(&mesh, DEMO_POLICY)
        .unwrap()
        .status
        .success());
    let db = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("db-1").service("db", echo_server().unwrap()),
    )
    .unwrap();
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .service("web", echo_server().unwrap())
            .upstream("db"),
    )
    .unwrap();
    let first = web.status().unwrap()["certificate"].clone();
    let first_serial = first["serial"].as_str().unwrap().to_string();
    let first_expiry = first["not_after"].as_i64().unwrap();
    // Renewed at about 2/3 of the lifetime: a new serial, a later expiry.
    let (renewed, took) = assert_eventually(
        "web-1 renews its certificate",
        Duration::from_secs(10),
        || {
            let c = web.status()?["certificate"].clone();
            ensure!(
                c["serial"].as_str() != Some(first_serial.as_str()),
                "still the first certificate"
            );
            Ok(c)
        },
    );
    eprintln!("renewed {took:?} into the run");
    assert!(renewed["not_after"].as_i64().unwrap() > first_expiry);
    // Wait past the first certificate's expiry, then open a new tunnel: db-1 must accept the
    // renewed certificate (a restart of db-1 forces a fresh handshake).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    std::thread::sleep(Duration::from_secs((first_expiry - now + 1).max(0) as u64));
    let mut db = db;
    db.restart().unwrap();
    assert_eventually(
        "web -> db over a tunnel made with the renewed certificate",
        Duration::from_secs(10),
        || {
            let (a, b, n) = echo_transfer(web.upstream("db"), 256 << 10)?;
            ensure!(a == b && n == 256 << 10, "transfer mismatch");
            Ok(())
        },
    );
    assert_eq!(refused(&db, "expired"), 0.0);
}

#[test]
fn bad_node_config_exits_64_naming_the_key_before_binding() {
    let mesh = Mesh::new("bad-config");
    let cfg = mesh.path().join("node.toml");
    let node = &quicmesh_netns_tests::Bins::get().node;
    for (text, key) in [
        ("name = \"Web\"\ncoordinator = \"198.18.0.1:7700\"\ndata_dir = \"d\"\n", "name"),
        ("name = \"web-1\"\ncoordinator = \"nowhere\"\ndata_dir = \"d\"\n", "coordinator"),
        ("name = \"web-1\"\ncoordinator = \"198.18.0.1:7700\"\ndata_dir = \"d\"\nmetrics = \"0.0.0.0:9\"\n", "metrics"),
        ("name = \"web-1\"\ncoordinator = \"198.18.0.1:7700\"\ndata_dir = \"d\"\nbogus = 1\n", "bogus"),
        // An upstream open to other hosts without `expose = true`.
        ("name = \"web-1\"\ncoordinator = \"198.18.0.1:7700\"\ndata_dir = \"d\"\n[[service]]\nname = \"web\"\naddress = \"127.0.0.1:8080\"\n[[upstream]]\nservice = \"db\"\nbind = \"0.0.0.0:15432\"\n", "upstream[0].bind"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        for cmd in ["check", "run"] {
            let out = std::process::Command::new(node).args([cmd, "--config"]).arg(&cfg).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{cmd}: {err}");
            assert!(err.contains(&format!(": {key}: ")), "{cmd} names {key}: {err}");
        }
        assert!(!mesh.path().join("d").exists(), "nothing was created for a bad config");
    }
    // The good twin passes the check.
    std::fs::write(
        &cfg,
        "name = \"web-1\"\ncoordinator = \"198.18.0.1:7700\"\ndata_dir = \"d\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(node)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the exposed upstream's twin: the same bind with `expose = true` passes.
    std::fs::write(
        &cfg,
        "name = \"web-1\"\ncoordinator = \"198.18.0.1:7700\"\ndata_dir = \"d\"\n[[service]]\nname = \"web\"\naddress = \"127.0.0.1:8080\"\n[[upstream]]\nservice = \"db\"\nbind = \"0.0.0.0:15432\"\nexpose = true\n",
    )
    .unwrap();
    let out = std::process::Command::new(node)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "expose = true: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn api_refuses_requests_without_the_admin_token() {
    use std::io::{Read, Write};
    let mesh = Mesh::new("api-auth");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let call = |method: &str, path: &str, auth: Option<&str>| -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", coord.http_port)).unwrap();
        let auth = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines().next().unwrap_or_default().to_string()
    };
    for (m, p) in [
        ("GET", "/api/v1/nodes"),
        ("GET", "/api/v1/status"),
        ("POST", "/api/v1/tokens"),
        ("POST", "/api/v1/nodes/x/revoke"),
        ("GET", "/api/v1/policy"),
        ("POST", "/api/v1/policy"),
        ("GET", "/api/v1/services"),
    ] {
        assert!(
            call(m, p, None).contains(" 401 "),
            "{m} {p} without a token"
        );
        assert!(
            call(m, p, Some("qma_wrong")).contains(" 401 "),
            "{m} {p} with a wrong token"
        );
    }
    assert!(
        call("GET", "/api/v1/nodes", Some(&coord.admin_token)).contains(" 200 "),
        "the admin token is accepted"
    );
}

#[test]
fn a_node_started_before_its_coordinator_enrolls_once_it_is_up() {
    let mesh = Mesh::new("enroll-retry");
    let mut coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let spec = NodeSpec::new("db-1").service("db", echo_server().unwrap());
    let token = coord.token("db-1", &["db"], "10m").unwrap();
    let mut node = NodeProc::configure(&mesh, &coord, &spec, &token).unwrap();
    coord.kill();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            coord.restart().unwrap();
        });
        // Waits (up to 15 s) until the node serves. A short outage is bridged by QUIC
        // retransmitting its first packets; a longer one by the node retrying enrollment
        // with backoff (both instead of exiting).
        node.restart().unwrap();
    });
    assert!(node.status().unwrap()["certificate"]["serial"].is_string());
    let nodes = coord.json(&["nodes", "list"]).unwrap();
    assert_eq!(nodes["nodes"][0]["name"], "db-1");
}

/// The first flow on a tunnel it brings up sends the client's first bytes with its header
/// (a round trip saved); an instance whose service refuses the connection (nothing reached
/// it) has them sent to the next instance, once: on a tunnel that was up already, after its
/// accept. The policy-denied twin: with the local check off, the flow still goes to the
/// ingress, but its bytes stay until a decision (this node's view denies it) and reach no
/// service.
#[test]
fn a_first_flow_sends_the_clients_bytes_with_its_header_and_only_a_refusal_moves_them() {
    use std::io::{Read, Write};
    let mesh = Mesh::new("early-bytes");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let out = coord.apply_policy(&mesh, DEMO_POLICY).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // db-1, in the client's datacenter, is tried first: its service is down.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let db1 = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("db-1")
            .label("datacenter", "dc1")
            .service("db", dead),
    )
    .unwrap();
    let db2 = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("db-2")
            .label("datacenter", "dc2")
            .service("db", echo_server().unwrap())
            .upstream("web")
            .no_egress_check(),
    )
    .unwrap();
    // payments' service: a listener that must never see a connection.
    let secret = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    secret.set_nonblocking(true).unwrap();
    let payments = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("payments-1").service("payments", secret.local_addr().unwrap()),
    )
    .unwrap();
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .label("datacenter", "dc1")
            .service("web", echo_server().unwrap())
            .upstream("db")
            .upstream("payments")
            .no_egress_check(),
    )
    .unwrap();
    wait_all_acked(&coord, 4);
    let with_header = || {
        web.metrics()
            .map(|m| metric(&m, "quicmesh_egress_data_with_header_total", &[]))
            .unwrap_or(-1.0)
    };
    assert_eq!(with_header(), 0.0);
    // db-2 brings up a tunnel to web-1 (its flow is denied, the tunnel stays): web-1's
    // flow to db-2 below goes on a tunnel that was up already.
    let mut warm = std::net::TcpStream::connect(db2.upstream("web")).unwrap();
    warm.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = warm.write_all(b"x");
    let _ = warm.read_to_end(&mut Vec::new());
    assert_eq!(
        db2.metrics()
            .map(|m| metric(&m, "quicmesh_egress_data_with_header_total", &[]))
            .unwrap_or(-1.0),
        0.0,
        "db-2's view denies db -> web: its bytes did not go with the header"
    );

    // The client writes at once; the tunnel handshake takes longer, so its bytes are
    // there when the tunnel comes up.
    let mut s = std::net::TcpStream::connect(web.upstream("db")).unwrap();
    s.write_all(b"hello\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = [0u8; 6];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello\n", "db-2 echoed the bytes db-1 refused");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes delivered twice: {rest:?}");
    let m = db1.metrics().unwrap();
    assert_eq!(
        metric(
            &m,
            "quicmesh_ingress_rejected_total",
            &[("reason", "service_unavailable"), ("dst_service", "db")]
        ),
        1.0,
        "db-1 refused: its service is down"
    );
    let m = db2.metrics().unwrap();
    assert_eq!(
        metric(
            &m,
            "quicmesh_ingress_accepted_total",
            &[("src_service", "web"), ("dst_service", "db")]
        ),
        1.0
    );
    assert_eq!(
        with_header(),
        1.0,
        "the bytes went with the header to db-1; refused there, after db-2's accept on the tunnel that was up"
    );

    // Denied twin: the flow goes on (no local check) but its bytes wait for the answer.
    let mut s = std::net::TcpStream::connect(web.upstream("payments")).unwrap();
    s.write_all(b"secret\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "a denied flow got an answer: {rest:?} ({end:?})"
    );
    assert_eventually(
        "payments-1 counts the denial",
        Duration::from_secs(5),
        || {
            let n = rejected(&payments, "policy_denied");
            ensure!(n == 1.0, "policy_denied = {n}");
            Ok(())
        },
    );
    assert_eq!(
        with_header(),
        1.0,
        "no byte of a flow this node's view denies goes before the ingress decides"
    );
    match secret.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("payments' service saw a connection: {other:?}"),
    }
}

/// A tunnel starts with room for 256 of its peer's streams (quinn allocates each allowed
/// stream up front) and raises the limit as they are used: 300 flows at once through one
/// tunnel all answer. The twin: a flow policy denies is still refused among them.
#[test]
fn a_tunnel_carries_more_flows_at_once_than_its_first_stream_limit() {
    use std::io::{Read, Write};
    let d = demo("stream-limit");
    const FLOWS: usize = 300;
    let started = std::time::Instant::now();
    let mut held = Vec::with_capacity(FLOWS);
    for i in 0..FLOWS {
        let mut s = std::net::TcpStream::connect(d.web.upstream("db")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        if let Err(e) = s.read_exact(&mut b) {
            panic!(
                "flow {i} of {FLOWS} (all open at once) got no echo after {:?}: {e}",
                started.elapsed()
            );
        }
        held.push(s);
    }
    let m = d.db.metrics().unwrap();
    assert_eq!(
        metric(&m, "quicmesh_flows_active", &[]),
        FLOWS as f64,
        "db-1 serves every flow at once"
    );
    // Denied twin: the raised limit opens no way around policy.
    let mut s = std::net::TcpStream::connect(d.web.upstream("payments")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"x");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a denied flow got an answer: {rest:?}");
    assert_eventually(
        "payments-1 counts the denial",
        Duration::from_secs(5),
        || {
            let n = rejected(&d.payments, "policy_denied");
            ensure!(n == 1.0, "policy_denied = {n}");
            Ok(())
        },
    );
    drop(held);
}
