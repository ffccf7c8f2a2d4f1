//! Hostile peers at a node's tunnel port: certificates from another CA, self-signed,
//! expired, not yet valid, and a valid mesh certificate that lacks the service it claims.
//! Each is refused with its reason counted at the node, and the node keeps serving
//! legitimate flows.

use std::time::Duration;

use anyhow::ensure;
use quicmesh_netns_tests::net::{echo_server, echo_transfer, metric};
use quicmesh_netns_tests::rogue::{foreign_ca, leaf, mesh_ca, now, present, CertAndKey, Outcome};
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec};
use quicmesh_protocol::wire::{RejectCode, StreamReply};

const POLICY: &str = "[[rule]]\nfrom = \"web\"\nto = \"db\"\naction = \"allow\"\n";

#[test]
fn hostile_certificates_are_refused_with_counted_reasons() {
    let mesh = Mesh::new("bad-certs");
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
        &NodeSpec::new("web-1")
            .service("web", echo_server().unwrap())
            .upstream("db"),
    )
    .unwrap();
    let target = db.tunnel_addr().unwrap();
    let ca_der = coord.ca_der().unwrap();
    let mesh_issuer = mesh_ca(&coord);
    let foreign = foreign_ca();
    let t = now();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // A legitimate flow is open through db-1 the whole time.
    assert_eventually("web -> db works", Duration::from_secs(10), || {
        let (a, b, _) = echo_transfer(web.upstream("db"), 1 << 20)?;
        ensure!(a == b, "digest mismatch");
        Ok(())
    });

    let cases: Vec<(&str, CertAndKey, &str)> = vec![
        (
            "foreign ca",
            leaf(Some(&foreign), "web-1", &["web"], t - 60, t + 3600),
            "unknown_ca",
        ),
        (
            "self-signed",
            leaf(None, "web-1", &["web"], t - 60, t + 3600),
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
    ];
    let mut expected_unknown = 0.0;
    for (what, cert, reason) in cases {
        let out = rt.block_on(present(target, &ca_der, cert, "web"));
        assert_eq!(out, Outcome::Refused, "{what}: the handshake must fail");
        if reason == "unknown_ca" {
            expected_unknown += 1.0;
        }
        let want = if reason == "unknown_ca" {
            expected_unknown
        } else {
            1.0
        };
        assert_eventually(
            &format!("{what} counted as {reason}"),
            Duration::from_secs(5),
            || {
                let n = metric(
                    &db.metrics()?,
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
    }

    // A valid mesh certificate for a node of the mesh (web-1) that may speak only for
    // payments claims web.
    let rogue = leaf(Some(&mesh_issuer), "web-1", &["payments"], t - 60, t + 3600);
    let out = rt.block_on(present(target, &ca_der, rogue.clone(), "web"));
    assert_eq!(
        out,
        Outcome::Reply(StreamReply::Reject {
            code: RejectCode::SourceNotInCertificate,
            rule: None
        })
    );
    let m = db.metrics().unwrap();
    assert_eq!(
        metric(
            &m,
            "quicmesh_ingress_rejected_total",
            &[
                ("reason", "source_not_in_certificate"),
                ("src_service", "web")
            ]
        ),
        1.0
    );
    // Its honest twin (claiming payments) passes the identity check and meets the policy.
    let out = rt.block_on(present(target, &ca_der, rogue, "payments"));
    assert_eq!(
        out,
        Outcome::Reply(StreamReply::Reject {
            code: RejectCode::PolicyDenied,
            rule: Some("default".into())
        })
    );
    // A valid mesh certificate for a node the mesh does not hold (minted with the CA key,
    // never enrolled) is refused whatever it claims: the peer must be in the view.
    let ghost = leaf(Some(&mesh_issuer), "ghost-1", &["web"], t - 60, t + 3600);
    let out = rt.block_on(present(target, &ca_der, ghost, "web"));
    assert_eq!(
        out,
        Outcome::Reply(StreamReply::Reject {
            code: RejectCode::PeerUnknown,
            rule: None
        })
    );

    // The node kept serving: the legitimate path still carries data, and nothing was
    // accepted for the rogue peers.
    let (a, b, n) = echo_transfer(web.upstream("db"), 4 << 20).unwrap();
    assert_eq!((a == b, n), (true, 4 << 20));
    let m = db.metrics().unwrap();
    assert_eq!(
        metric(
            &m,
            "quicmesh_ingress_accepted_total",
            &[("src_service", "web")]
        ),
        2.0,
        "only web-1's two transfers were accepted"
    );
}
