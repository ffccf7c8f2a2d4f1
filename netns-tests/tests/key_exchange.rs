//! Post-quantum key exchange (`[tls] key_exchange`), read from each node's status, never
//! assumed: the hybrid X25519MLKEM768 on tunnels and on the control session, the
//! classical fallback with a node from before the hybrid ("classical" plays it), and a
//! "hybrid-only" node refusing that node with the reason counted.

use std::time::Duration;

use anyhow::{ensure, Context};
use quicmesh_netns_tests::net::{echo_server, echo_transfer, metric};
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec};

const POLICY: &str = r#"
[[rule]]
from = "web"
to = "db"
action = "allow"

[[rule]]
from = "legacy"
to = "db"
action = "allow"

[[rule]]
from = "web"
to = "legacy"
action = "allow"
"#;

/// The key exchange group `node`'s status gives for its tunnel to `peer`.
fn tunnel_group(node: &NodeProc, peer: &str) -> anyhow::Result<String> {
    let st = node.status()?;
    let p = st["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["node"] == peer)
        .with_context(|| format!("{peer} not among the peers: {st}"))?;
    p["key_exchange"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("no key exchange for {peer}: {p}"))
}

fn control_group(node: &NodeProc) -> anyhow::Result<String> {
    let st = node.status()?;
    st["control"]["key_exchange"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("no control key exchange: {}", st["control"]))
}

fn tls_section(mode: &str) -> String {
    format!("[tls]\nkey_exchange = \"{mode}\"")
}

#[test]
fn tunnels_and_control_sessions_negotiate_the_hybrid_and_a_hybrid_only_node_refuses_a_classical_one(
) {
    let mesh = Mesh::new("key-exchange");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    assert!(coord.apply_policy(&mesh, POLICY).unwrap().status.success());
    // db-1 accepts only the hybrid; web-1 runs the default (hybrid, classical fallback);
    // legacy-1 offers only classical groups, as a node from before the hybrid.
    let db = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("db-1")
            .service("db", echo_server().unwrap())
            .section(&tls_section("hybrid-only")),
    )
    .unwrap();
    let legacy = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("legacy-1")
            .service("legacy", echo_server().unwrap())
            .upstream("db")
            .section(&tls_section("classical")),
    )
    .unwrap();
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .service("web", echo_server().unwrap())
            .upstream("db")
            .upstream("legacy"),
    )
    .unwrap();
    coord.wait_all_acked(3, Duration::from_secs(20));

    // Hybrid to hybrid-only: the tunnel negotiated X25519MLKEM768, as both ends read it.
    assert_eventually("web -> db works", Duration::from_secs(10), || {
        let (a, b, _) = echo_transfer(web.upstream("db"), 64 << 10)?;
        ensure!(a == b, "digest mismatch");
        Ok(())
    });
    assert_eq!(tunnel_group(&web, "db-1").unwrap(), "X25519MLKEM768");
    assert_eventually(
        "db-1 reads the tunnel's group",
        Duration::from_secs(5),
        || {
            let g = tunnel_group(&db, "web-1")?;
            ensure!(g == "X25519MLKEM768", "db-1 reads {g}");
            Ok(())
        },
    );
    let m = web.metrics().unwrap();
    assert!(
        metric(
            &m,
            "quicmesh_tls_handshakes_total",
            &[("session", "tunnel"), ("group", "X25519MLKEM768")]
        ) >= 1.0,
        "{m}"
    );

    // Control sessions: the coordinator prefers the hybrid and falls back for a classical
    // node; a hybrid-only node's session is hybrid.
    for (n, want) in [
        (&web, "X25519MLKEM768"),
        (&db, "X25519MLKEM768"),
        (&legacy, "X25519"),
    ] {
        assert_eventually(
            "control session key exchange",
            Duration::from_secs(10),
            || {
                let g = control_group(n)?;
                ensure!(g == want, "control session negotiated {g}, want {want}");
                Ok(())
            },
        );
    }
    assert_eq!(
        metric(
            &db.metrics().unwrap(),
            "quicmesh_tls_handshakes_total",
            &[("session", "control"), ("group", "X25519MLKEM768")]
        ),
        1.0
    );
    // The coordinator reads the same from its side of each session (the dashboard's
    // node list shows it).
    let nodes = coord.api_get("nodes").unwrap();
    for (name, want) in [
        ("web-1", "X25519MLKEM768"),
        ("db-1", "X25519MLKEM768"),
        ("legacy-1", "X25519"),
    ] {
        let n = nodes["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {nodes}"));
        assert_eq!(n["control_key_exchange"], want, "{n}");
    }

    // Mixed versions: the default node reaches the classical one, classically.
    assert_eventually("web -> legacy works", Duration::from_secs(10), || {
        let (a, b, _) = echo_transfer(web.upstream("legacy"), 64 << 10)?;
        ensure!(a == b, "digest mismatch");
        Ok(())
    });
    assert_eq!(tunnel_group(&web, "legacy-1").unwrap(), "X25519");
    assert_eq!(
        metric(
            &legacy.metrics().unwrap(),
            "quicmesh_tls_handshakes_total",
            &[("session", "tunnel"), ("group", "X25519")]
        ),
        1.0
    );
    // Each node reports its tunnels' groups with its status (the dashboard's node list):
    // web-1 holds a hybrid tunnel to db-1 and a classical one to legacy-1.
    assert_eventually("web-1's tunnels reported", Duration::from_secs(20), || {
        let nodes = coord.api_get("nodes")?;
        let web = nodes["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == "web-1")
            .context("web-1 listed")?;
        let group = |peer: &str| {
            web["tunnels"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["peer"] == peer)
                .map(|t| t["key_exchange"].clone())
        };
        ensure!(
            group("db-1") == Some("X25519MLKEM768".into())
                && group("legacy-1") == Some("X25519".into()),
            "web-1 reported {}",
            web["tunnels"]
        );
        Ok(())
    });

    // The classical node to the hybrid-only one: refused at the handshake, counted with
    // its reason at db-1, though policy allows legacy -> db (its twin, web -> db, passed).
    let refused = |n: &NodeProc| {
        metric(
            &n.metrics().unwrap(),
            "quicmesh_handshake_refused_total",
            &[("reason", "classical_key_exchange")],
        )
    };
    assert_eq!(refused(&db), 0.0);
    for _ in 0..3 {
        assert!(
            echo_transfer(legacy.upstream("db"), 1024).is_err(),
            "a classical node got through to a hybrid-only one"
        );
    }
    assert_eventually("the refusal is counted", Duration::from_secs(5), || {
        ensure!(refused(&db) >= 1.0, "refused {}", refused(&db));
        Ok(())
    });
    let st = db.status().unwrap();
    assert!(
        st["counters"]["handshake_refused/classical_key_exchange"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{}",
        st["counters"]
    );
    assert!(
        st["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["node"] == "legacy-1" && p["connected"] == false),
        "db-1 holds a tunnel to the classical node: {}",
        st["peers"]
    );
    // No classical handshake completed at db-1, on any session.
    let m = db.metrics().unwrap();
    for g in ["X25519", "secp256r1", "secp384r1", "unknown"] {
        for s in ["tunnel", "control"] {
            assert_eq!(
                metric(
                    &m,
                    "quicmesh_tls_handshakes_total",
                    &[("session", s), ("group", g)]
                ),
                0.0,
                "{s} {g}"
            );
        }
    }
}
