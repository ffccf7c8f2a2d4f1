//! Abuse of enrollment and of the roles a join token grants, with the real binaries on
//! loopback: unauthenticated clients holding control connections while nodes enroll, a
//! node leaving a label out of its config to escape a `tag:` deny rule, and a node calling
//! itself a relay without the grant.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use quicmesh_netns_tests::net::{echo_server, echo_transfer};
use quicmesh_netns_tests::rogue::{hostile_enrollers, HostileStats};
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec};
use sha2::{Digest, Sha256};

fn ca_fingerprint(coord: &CoordinatorProc) -> [u8; 32] {
    Sha256::digest(coord.ca_der().unwrap()).into()
}

/// Starts `name` (enrolling with a fresh token) and returns how long until it served.
fn enroll(mesh: &Mesh, coord: &CoordinatorProc, name: &str) -> (NodeProc, Duration) {
    let spec = NodeSpec::new(name).service("web", echo_server().unwrap());
    let t = Instant::now();
    let node = NodeProc::start(mesh, coord, &spec).unwrap();
    (node, t.elapsed())
}

#[test]
fn nodes_enroll_promptly_while_200_hostile_clients_hold_control_connections() {
    let mesh = Mesh::new("enroll-flood");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let (_n, baseline) = enroll(&mesh, &coord, "base-1");

    // 200 clients from 8 loopback addresses (the nodes dial from 127.0.0.1): a third idle
    // after the handshake, a third with a silent stream, a third sending an enrollment
    // request and never reading the answer nor closing.
    let sources: Vec<IpAddr> = (2..10).map(|i| IpAddr::from([127, 0, 0, i])).collect();
    let stats = Arc::new(HostileStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let target = SocketAddr::new([127, 0, 0, 1].into(), coord.control_port);
    let flood = rt.spawn(hostile_enrollers(
        target,
        ca_fingerprint(&coord),
        sources,
        25,
        stats.clone(),
        stop_rx,
    ));
    assert_eventually("200 hostile handshakes", Duration::from_secs(30), || {
        let n = stats.handshakes.load(Ordering::Relaxed);
        ensure!(n >= 200, "{n} handshakes");
        Ok(())
    });

    let mut took = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..5 {
        let (node, t) = enroll(&mesh, &coord, &format!("web-{i}"));
        assert!(
            t < Duration::from_secs(30),
            "enrollment of web-{i} took {t:?} under the flood"
        );
        took.push(t);
        nodes.push(node);
    }
    let mut sorted = took.clone();
    sorted.sort();
    eprintln!(
        "enrollment with 200 hostile control connections: p50 {:?}, max {:?} (each {:?}); without: {:?}; hostile handshakes {}, failed {}",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
        took,
        baseline,
        stats.handshakes.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
    );

    // The flood was met by the bounds, and counted: sources over their share were refused,
    // silent clients cut at the request deadline.
    let (drops, _) =
        assert_eventually("the flood's drops counted", Duration::from_secs(15), || {
            let st = coord.api_get("status")?;
            let d = st["drops"]["control"].clone();
            ensure!(
                d["source_busy"].as_u64().unwrap_or(0) > 0,
                "no source_busy: {d}"
            );
            ensure!(
                d["request_timeout"].as_u64().unwrap_or(0) > 0,
                "no request_timeout: {d}"
            );
            Ok(d)
        });
    assert_eq!(
        drops["listener_busy"], 0,
        "8 sources x 8 slots fit the listener: {drops}"
    );
    stop_tx.send(true).unwrap();
    let _ = rt.block_on(flood);
}

const LABEL_POLICY: &str = r#"
[[rule]]
from = "*"
to = "db"
action = "allow"

[[rule]]
from = "tag:env=dev"
to = "db"
action = "deny"
"#;

#[test]
fn a_node_leaving_a_label_out_of_its_config_still_meets_the_tag_deny_rule() {
    let mesh = Mesh::new("label-omit");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    assert!(coord
        .apply_policy(&mesh, LABEL_POLICY)
        .unwrap()
        .status
        .success());
    let _db = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("db-1").service("db", echo_server().unwrap()),
    )
    .unwrap();
    // dev-1's token carries env=dev; its config claims no label at all.
    let spec = NodeSpec::new("dev-1")
        .service("web", echo_server().unwrap())
        .upstream("db");
    let token = coord
        .token_with("dev-1", &["web"], &["env=dev".to_string()], "10m")
        .unwrap();
    let mut dev = NodeProc::configure(&mesh, &coord, &spec, &token).unwrap();
    dev.restart().unwrap();
    // Its allowed twin: prod-1's token carries no env label.
    let prod = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("prod-1")
            .service("web", echo_server().unwrap())
            .upstream("db"),
    )
    .unwrap();
    coord.wait_all_acked(3, Duration::from_secs(15));

    let (_, _) = assert_eventually("prod-1 -> db allowed", Duration::from_secs(10), || {
        let (a, b, _) = echo_transfer(prod.upstream("db"), 4096)?;
        ensure!(a == b, "digest mismatch");
        Ok(())
    });
    let r = echo_transfer(dev.upstream("db"), 4096);
    match r {
        Ok((a, b, n)) if a == b && n == 4096 => {
            panic!("dev-1 escaped the tag:env=dev deny rule by omitting the label")
        }
        _ => {}
    }
    let st = dev.status().unwrap();
    assert_eq!(
        st["labels"]["env"], "dev",
        "status shows the token's labels: {}",
        st["labels"]
    );
    assert_eventually("dev-1's denial counted", Duration::from_secs(5), || {
        let n = quicmesh_netns_tests::net::metric(
            &dev.metrics()?,
            "quicmesh_egress_rejected_total",
            &[("reason", "policy_denied")],
        );
        ensure!(n >= 1.0, "egress_rejected{{reason=policy_denied}} = {n}");
        Ok(())
    });
}

#[test]
fn a_node_calling_itself_a_relay_without_the_grant_is_not_used_as_one() {
    let mesh = Mesh::new("relay-grant");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let x = NodeProc::start(&mesh, &coord, &NodeSpec::new("x")).unwrap();
    let claims = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("r-claims").config_line("relay = true"),
    )
    .unwrap();
    let _granted = NodeProc::start(&mesh, &coord, &NodeSpec::new("r-granted").relay()).unwrap();
    coord.wait_all_acked(3, Duration::from_secs(15));
    let relay_flag = |peer: &str| -> anyhow::Result<serde_json::Value> {
        let st = x.status()?;
        let p = st["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["node"] == peer).cloned());
        match p {
            Some(p) => Ok(p["relay"].clone()),
            None => bail!("{peer} not in x's snapshot"),
        }
    };
    assert_eventually(
        "r-granted advertised as relay",
        Duration::from_secs(10),
        || {
            ensure!(relay_flag("r-granted")? == true, "not yet");
            Ok(())
        },
    );
    assert_eq!(
        relay_flag("r-claims").unwrap(),
        false,
        "relay = true without the grant must not be advertised"
    );
    let (err, _) = assert_eventually("r-claims told why", Duration::from_secs(10), || {
        let st = claims.status()?;
        let e = st["control"]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        ensure!(e.contains("relay refused"), "last_error {e:?}");
        Ok(e)
    });
    assert!(err.contains("--relay"), "{err}");
}

#[test]
fn a_stolen_token_and_key_get_nothing_once_the_name_was_revoked_and_enrolled_again() {
    use quicmesh_node::config::NodeConfig;
    use quicmesh_node::control::{enroll, EnrollError};
    use quicmesh_protocol::wire::EnrollErrorCode;
    let mesh = Mesh::new("revoke-retry");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let spec = NodeSpec::new("web-1").service("web", echo_server().unwrap());
    let mut old = NodeProc::start(&mesh, &coord, &spec).unwrap();
    // The thief copies the compromised host's config (with its join token) and key.
    let cfg = NodeConfig::load(&old.config).unwrap();
    let token = cfg.join_token.clone().unwrap();
    let key_pem = std::fs::read_to_string(old.data_dir.join("node.key")).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    old.kill();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = rt
        .block_on(async { quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()) })
        .unwrap();
    // Its allowed twin first: within the retry window, the same token and key get a
    // certificate again (a lost answer).
    assert!(
        rt.block_on(enroll(&ep, &cfg, &key, &token)).is_ok(),
        "the retry window works before any revocation"
    );

    // The admin revokes web-1 and enrolls a clean host under the same name.
    let out = coord.cli(&["nodes", "revoke", "web-1"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&old.data_dir).unwrap();
    let new = NodeProc::start(&mesh, &coord, &spec).unwrap();
    coord.wait_all_acked(1, Duration::from_secs(15));

    // The thief retries, still inside the 10-minute window.
    match rt.block_on(enroll(&ep, &cfg, &key, &token)) {
        Err(EnrollError::Refused {
            code: EnrollErrorCode::NodeRevoked,
            detail,
        }) => assert!(detail.contains("voided"), "{detail}"),
        Ok(_) => panic!("the stolen token and key got a fresh certificate after the revocation"),
        Err(other) => panic!("refused for another reason: {other}"),
    }
    // The clean host is unaffected.
    let st = new.status().unwrap();
    assert_eq!(st["control"]["connected"], true, "{}", st["control"]);
    ep.close(0u32.into(), b"done");
}
