//! A peer loses its tunnels the moment it loses its standing: every connection of a
//! revoked node closes (not only the one this node selected for its own flows), new
//! streams on a tunnel are checked against the current view, and a tunnel whose peer
//! certificate expires is closed. The attacker holds real certificates and keeps its
//! connections open.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::ensure;
use quicmesh_netns_tests::net::{echo_server, metric};
use quicmesh_netns_tests::rogue::{leaf, mesh_ca, now, stolen, Outcome, RoguePeer};
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec};
use quicmesh_protocol::wire::StreamReply;

const POLICY: &str = "[[rule]]\nfrom = \"web\"\nto = \"db\"\naction = \"allow\"\n";

struct Setup {
    coord: CoordinatorProc,
    db: NodeProc,
    web: NodeProc,
    target: SocketAddr,
    ca_der: Vec<u8>,
    _mesh: Mesh,
}

fn setup(name: &str) -> Setup {
    let mesh = Mesh::new(name);
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    assert!(coord.apply_policy(&mesh, POLICY).unwrap().status.success());
    let db = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("db-1").service("db", echo_server().unwrap()),
    )
    .unwrap();
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1").service("web", echo_server().unwrap()),
    )
    .unwrap();
    let target = db.tunnel_addr().unwrap();
    let ca_der = coord.ca_der().unwrap();
    // db-1 must know web-1 before the rogue asks.
    assert_eventually("db-1 sees web-1", Duration::from_secs(10), || {
        let st = db.status()?;
        let known = st["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["node"] == "web-1"));
        ensure!(known, "web-1 not in db-1's view yet");
        Ok(())
    });
    Setup {
        coord,
        db,
        web,
        target,
        ca_der,
        _mesh: mesh,
    }
}

fn closed_by(db: &NodeProc, reason: &str) -> f64 {
    db.metrics()
        .map(|m| metric(&m, "quicmesh_tunnels_closed_total", &[("reason", reason)]))
        .unwrap_or(0.0)
}

#[test]
fn a_revoked_node_loses_every_tunnel_and_every_new_stream() {
    let s = setup("revoke-tunnels");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The rogue's QUIC endpoint lives on this runtime.
    let _rt = rt.enter();
    // web-1's own certificate and key, used from two connections at once.
    let rogue = RoguePeer::new(s.target, "db-1", &s.ca_der, stolen(&s.web.data_dir));
    let (c1, c2) = rt.block_on(async { (rogue.connect().await, rogue.connect().await) });
    let (c1, c2) = (c1.unwrap(), c2.unwrap());
    for c in [&c1, &c2] {
        assert_eq!(
            rt.block_on(rogue.ask(c, "web", "db")),
            Outcome::Reply(StreamReply::Accept),
            "before the revocation, both tunnels carry allowed flows"
        );
    }
    let out = s.coord.cli(&["nodes", "revoke", "web-1"]).unwrap();
    assert!(out.status.success(), "revoke: {out:?}");

    // Both tunnels are closed by db-1, whichever one it had selected.
    assert_eventually(
        "every tunnel of the revoked node closed",
        Duration::from_secs(10),
        || {
            ensure!(
                c1.close_reason().is_some() && c2.close_reason().is_some(),
                "open: c1 {:?} c2 {:?}",
                c1.close_reason(),
                c2.close_reason()
            );
            Ok(())
        },
    );
    for c in [&c1, &c2] {
        assert_eq!(
            rt.block_on(rogue.ask(c, "web", "db")),
            Outcome::Refused,
            "no stream on a revoked node's tunnel"
        );
    }
    assert!(
        closed_by(&s.db, "peer_revoked") >= 2.0,
        "both tunnels counted as peer_revoked: {}",
        closed_by(&s.db, "peer_revoked")
    );
    // And a new tunnel with the revoked certificate is refused at the handshake (in TLS 1.3
    // the client may finish first: the server's refusal then closes it).
    if let Ok(c) = rt.block_on(rogue.connect()) {
        assert_eq!(rt.block_on(rogue.ask(&c, "web", "db")), Outcome::Refused);
    }
    let refused = metric(
        &s.db.metrics().unwrap(),
        "quicmesh_handshake_refused_total",
        &[("reason", "revoked")],
    );
    assert!(
        refused >= 1.0,
        "handshake_refused{{reason=revoked}} = {refused}"
    );
}

#[test]
fn a_tunnel_closes_when_its_peer_certificate_expires() {
    let s = setup("expire-tunnels");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The rogue's QUIC endpoint lives on this runtime.
    let _rt = rt.enter();
    let issuer = mesh_ca(&s.coord);
    let t = now();
    // A genuine mesh certificate for web-1 that runs out in a few seconds, and its twin
    // valid for an hour.
    let short = RoguePeer::new(
        s.target,
        "db-1",
        &s.ca_der,
        leaf(Some(&issuer), "web-1", &["web"], t - 60, t + 6),
    );
    let long = RoguePeer::new(
        s.target,
        "db-1",
        &s.ca_der,
        leaf(Some(&issuer), "web-1", &["web"], t - 60, t + 3600),
    );
    let (cs, cl) = rt.block_on(async { (short.connect().await, long.connect().await) });
    let (cs, cl) = (cs.unwrap(), cl.unwrap());
    for (p, c) in [(&short, &cs), (&long, &cl)] {
        assert_eq!(
            rt.block_on(p.ask(c, "web", "db")),
            Outcome::Reply(StreamReply::Accept)
        );
    }
    assert_eventually(
        "the expired certificate's tunnel is closed",
        Duration::from_secs(15),
        || {
            ensure!(cs.close_reason().is_some(), "still open");
            Ok(())
        },
    );
    assert_eq!(rt.block_on(short.ask(&cs, "web", "db")), Outcome::Refused);
    assert_eq!(closed_by(&s.db, "peer_expired"), 1.0);
    // The twin outlives it and still carries new flows.
    assert!(cl.close_reason().is_none());
    assert_eq!(
        rt.block_on(long.ask(&cl, "web", "db")),
        Outcome::Reply(StreamReply::Accept)
    );
}
