//! Hostile peers at a node's tunnel port: certificates from another CA, self-signed,
//! expired, not yet valid, and a valid mesh certificate that lacks the service it claims.
//! Each is refused with its reason counted at the node, and the node keeps serving
//! legitimate flows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;
use quicmesh_netns_tests::net::{echo_server, echo_transfer, metric};
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec};
use quicmesh_node::frame::{read_frame, write_frame};
use quicmesh_node::tls::{self, CertSlot, MeshServerVerifier, ServerExpect, Trust};
use quicmesh_protocol::ident::{ServiceName, TrustDomain};
use quicmesh_protocol::wire::{RejectCode, StreamHeader, StreamReply, ALPN_TUNNEL};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};

const POLICY: &str = "[[rule]]\nfrom = \"web\"\nto = \"db\"\naction = \"allow\"\n";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ts(t: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t).unwrap()
}

/// A certificate (DER) and its private key (PKCS#8 DER).
type CertAndKey = (Vec<u8>, Vec<u8>);

struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn foreign_ca() -> Issuer {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "quicmesh CA quicmesh.local");
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    Issuer { cert, key }
}

fn mesh_ca(coord: &CoordinatorProc) -> Issuer {
    let cert_pem = std::fs::read_to_string(coord.data_dir.join("ca.crt")).unwrap();
    let key = KeyPair::from_pem(&std::fs::read_to_string(coord.data_dir.join("ca.key")).unwrap())
        .unwrap();
    let cert = CertificateParams::from_ca_cert_pem(&cert_pem)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    Issuer { cert, key }
}

/// A leaf for `node` speaking for `services`, valid over [from, to]; self-signed when
/// `issuer` is None.
fn leaf(
    issuer: Option<&Issuer>,
    node: &str,
    services: &[&str],
    from: i64,
    to: i64,
) -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, node);
    let mut sans = vec![SanType::URI(
        format!("spiffe://quicmesh.local/node/{node}")
            .try_into()
            .unwrap(),
    )];
    for s in services {
        sans.push(SanType::URI(
            format!("spiffe://quicmesh.local/svc/{s}")
                .try_into()
                .unwrap(),
        ));
    }
    p.subject_alt_names = sans;
    p.not_before = ts(from);
    p.not_after = ts(to);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = match issuer {
        Some(i) => p.signed_by(&key, &i.cert, &i.key).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    (cert.der().to_vec(), key.serialize_der())
}

/// What a rogue client observed.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The connection failed (handshake refused).
    Refused,
    /// A stream was answered.
    Reply(StreamReply),
}

/// Presents `(cert, key)` at `target` (node `db-1`) and asks for web -> db.
async fn present(
    target: SocketAddr,
    ca_der: &[u8],
    cert: (Vec<u8>, Vec<u8>),
    claim: &str,
) -> Outcome {
    let trust = Arc::new(arc_swap_shim(
        Trust::new(
            TrustDomain::new("quicmesh.local").unwrap(),
            &[ca_der.to_vec()],
            [],
        )
        .unwrap(),
    ));
    let verifier = MeshServerVerifier::new(Some(trust), ServerExpect::Node, Arc::new(|_| {}));
    let slot = CertSlot::with(vec![cert.0], &cert.1).unwrap();
    let cfg = tls::client_config(Some(slot), verifier, ALPN_TUNNEL).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let attempt = async {
        let conn = ep
            .connect_with(cfg, target, "db-1")
            .map_err(|_| ())?
            .await
            .map_err(|_| ())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|_| ())?;
        let h = StreamHeader {
            src_service: ServiceName::new(claim).unwrap(),
            dst_service: ServiceName::new("db").unwrap(),
            flow_id: 1,
        };
        write_frame(&mut send, &h).await.map_err(|_| ())?;
        match read_frame::<StreamReply, _>(&mut recv).await {
            Ok(Some(r)) => Ok(r),
            _ => Err(()),
        }
    };
    let out = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(r)) => Outcome::Reply(r),
        _ => Outcome::Refused,
    };
    ep.close(0u32.into(), b"done");
    out
}

fn arc_swap_shim(t: Trust) -> arc_swap::ArcSwap<Trust> {
    arc_swap::ArcSwap::from_pointee(t)
}

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
    let target: SocketAddr = db.status().unwrap()["tunnel_listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ca_der = pem::parse(std::fs::read_to_string(coord.data_dir.join("ca.crt")).unwrap())
        .unwrap()
        .into_contents();
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

    // A valid mesh certificate for a node that may speak only for payments claims web.
    let rogue = leaf(
        Some(&mesh_issuer),
        "rogue-1",
        &["payments"],
        t - 60,
        t + 3600,
    );
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
