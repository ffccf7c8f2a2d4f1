//! Property tests: the invariants the fuzz targets assert, run in the normal suite.
//!
//! - every decoder either refuses bytes with a typed error or returns a message that
//!   re-encodes to bytes decoding to the same message;
//! - encoding any well-formed message and decoding it gives it back;
//! - a snapshot delta applied to its base gives exactly the newer snapshot;
//! - a parsed policy's evaluation is total and deterministic, and `explain` agrees with it.

use std::collections::BTreeMap;

use proptest::prelude::*;
use quicmesh_protocol::cert::Serial;
use quicmesh_protocol::delta::{self, DeltaError};
use quicmesh_protocol::ident::{LabelKey, Labels, NodeName, ServiceName, TrustDomain};
use quicmesh_protocol::policy::{Destination, Policy, Source};
use quicmesh_protocol::token::JoinToken;
use quicmesh_protocol::wire::{
    self, ControlDown, ControlUp, Hello, Message, PeerInfo, RejectCode, Snapshot, StatusReport,
    StreamHeader, StreamReply,
};

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
}

fn service() -> impl Strategy<Value = ServiceName> {
    name().prop_map(|s| ServiceName::new(s).unwrap())
}

fn labels() -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map(name(), "[ -~]{0,12}", 0..4).prop_map(|m| {
        Labels::new(
            m.into_iter()
                .map(|(k, v)| (LabelKey::new(k).unwrap(), v))
                .collect::<BTreeMap<_, _>>(),
        )
        .unwrap()
    })
}

fn header() -> impl Strategy<Value = StreamHeader> {
    (service(), service(), any::<u64>()).prop_map(|(a, b, f)| StreamHeader {
        src_service: a,
        dst_service: b,
        flow_id: f,
    })
}

fn reply() -> impl Strategy<Value = StreamReply> {
    prop_oneof![
        Just(StreamReply::Accept),
        (0usize..6, proptest::option::of("[a-z\\[\\]0-9]{0,10}")).prop_map(|(c, rule)| {
            let code = [
                RejectCode::PolicyDenied,
                RejectCode::SourceNotInCertificate,
                RejectCode::UnknownService,
                RejectCode::ServiceUnavailable,
                RejectCode::Malformed,
                RejectCode::NotReady,
            ][c];
            StreamReply::Reject { code, rule }
        }),
    ]
}

fn up() -> impl Strategy<Value = ControlUp> {
    prop_oneof![
        any::<u64>().prop_map(|version| ControlUp::Ack { version }),
        (any::<u64>(), ".{0,20}").prop_map(|(version, reason)| ControlUp::Nack { version, reason }),
        (
            name(),
            any::<u16>(),
            proptest::collection::vec(service(), 0..3),
            labels(),
            any::<u64>()
        )
            .prop_map(|(n, p, s, l, v)| {
                ControlUp::Hello(Hello {
                    node: NodeName::new(n).unwrap(),
                    tunnel_port: p,
                    advertise: None,
                    local: vec![([198, 18, 0, 9], p).into()],
                    relay: p % 2 == 0,
                    services: s,
                    labels: l,
                    have_version: v,
                    agent_version: "0.1.0".into(),
                })
            }),
        (any::<u64>(), any::<i64>()).prop_map(|(v, t)| ControlUp::Status(StatusReport {
            snapshot_version: v,
            cert_not_after: t,
            ..Default::default()
        })),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|csr_der| ControlUp::Renew { csr_der }),
        name().prop_map(|n| ControlUp::Punch {
            peer: NodeName::new(n).unwrap()
        }),
    ]
}

fn peers() -> impl Strategy<Value = Vec<PeerInfo>> {
    proptest::collection::btree_map(
        name(),
        (
            proptest::option::of(any::<u16>()),
            proptest::collection::vec(service(), 0..3),
            labels(),
        ),
        0..12,
    )
    .prop_map(|m| {
        m.into_iter()
            .filter(|(n, _)| n != "self")
            .map(|(n, (port, services, labels))| PeerInfo {
                node: NodeName::new(n).unwrap(),
                endpoint: port.map(|p| ([198, 18, 0, 1], p).into()),
                services: services.clone(),
                labels,
                overlay: port
                    .map(|p| vec![std::net::IpAddr::from([100, 64, (p >> 8) as u8, p as u8])])
                    .unwrap_or_default(),
                // Offline and failing services vary with the port, so deltas carry them.
                online: port.is_none_or(|p| p % 3 != 0),
                relay: port.is_some_and(|p| p % 5 == 0),
                nat: false,
                critical: services
                    .iter()
                    .filter(|_| port.is_some_and(|p| p % 2 == 0))
                    .cloned()
                    .collect(),
                candidates: port
                    .map(|p| vec![([198, 18, 0, 1], p).into(), ([198, 19, 0, 1], p).into()])
                    .unwrap_or_default(),
            })
            .collect()
    })
}

fn snapshot() -> impl Strategy<Value = Snapshot> {
    (
        1u64..1000,
        labels(),
        peers(),
        0u64..3,
        proptest::collection::vec(1u8..=255, 0..3),
    )
        .prop_map(|(version, labels, peers, pv, revoked)| Snapshot {
            version,
            node: NodeName::new("self").unwrap(),
            trust_domain: TrustDomain::new("mesh.test").unwrap(),
            labels,
            peers,
            policy_version: pv,
            policy: Policy::parse(&format!(
                "[[rule]]\nfrom = \"svc-{pv}\"\nto = \"db\"\naction = \"allow\"\n"
            ))
            .unwrap(),
            revoked: revoked
                .into_iter()
                .map(|b| Serial::new(vec![b]).unwrap())
                .collect(),
            ca_bundle: vec![vec![1, 2, 3]],
            pools: quicmesh_protocol::overlay::Pools::default_for(&[pv as u8; 32]),
        })
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = wire::encode(m);
    assert_eq!(&wire::decode::<M>(&bytes).unwrap(), m);
}

/// Decoding arbitrary bytes never panics, and what decodes re-encodes to the same value.
fn decode_invariant<M: Message + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(m) = wire::decode::<M>(bytes) {
        let again = wire::encode(&m);
        assert_eq!(wire::decode::<M>(&again).unwrap(), m);
    }
}

proptest! {
    #[test]
    fn headers_round_trip(h in header()) { round_trip(&h) }

    #[test]
    fn replies_round_trip(r in reply()) { round_trip(&r) }

    #[test]
    fn control_up_round_trips(m in up()) { round_trip(&m) }

    #[test]
    fn delta_applied_to_its_base_gives_the_newer_snapshot(old in snapshot(), new in snapshot(), step in 1u64..5) {
        let new = Snapshot { version: old.version + step, ..new };
        let d = delta::diff(&old, &new);
        prop_assert_eq!(&delta::apply(&old, &d).unwrap(), &new);
        // Only what changed travels.
        let unchanged = old.peers.iter().filter(|p| new.peers.contains(p)).count();
        prop_assert_eq!(d.upsert.len() + unchanged, new.peers.len());
        round_trip(&ControlDown::Delta(Box::new(d.clone())));
        // Applied to any other version, it is refused and nothing changes.
        let other = Snapshot { version: old.version + 1, ..old.clone() };
        prop_assert_eq!(delta::apply(&other, &d).unwrap_err(), DeltaError::BaseMismatch { base: old.version, have: old.version + 1 });
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        decode_invariant::<StreamHeader>(&bytes);
        decode_invariant::<StreamReply>(&bytes);
        decode_invariant::<ControlUp>(&bytes);
        decode_invariant::<ControlDown>(&bytes);
    }

    #[test]
    fn mutated_messages_decode_or_fail_cleanly(h in header(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = wire::encode(&h);
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        decode_invariant::<StreamHeader>(&bytes);
    }

    #[test]
    fn policy_evaluation_is_deterministic_and_explained(
        rules in proptest::collection::vec((prop_oneof![Just("*".to_string()), name(), name().prop_map(|n| format!("tag:{n}"))], name(), any::<bool>()), 0..8),
        from in service(),
        to in service(),
        l in labels(),
    ) {
        let mut text = String::from("default = \"deny\"\n");
        for (f, t, allow) in &rules {
            text.push_str(&format!("[[rule]]\nfrom = \"{f}\"\nto = \"{t}\"\naction = \"{}\"\n", if *allow { "allow" } else { "deny" }));
        }
        let p = Policy::parse(&text).unwrap();
        let none = Labels::default();
        let src = Source { service: &from, labels: &l };
        let dst = Destination { service: &to, labels: &none };
        let d = p.evaluate(src, dst);
        prop_assert_eq!(d, p.evaluate(src, dst));
        prop_assert_eq!(p.explain(src, dst).decision, d);
        // No rule names the destination: nothing can allow it.
        if !rules.iter().any(|(_, t, _)| t == to.as_str()) {
            prop_assert!(!d.is_allow());
        }
    }

    #[test]
    fn policy_parser_never_panics(text in "[ -~\\n]{0,200}") {
        let _ = Policy::parse(&text);
    }

    #[test]
    fn tokens_round_trip(fp in any::<[u8; 32]>(), secret in any::<[u8; 32]>()) {
        let t = JoinToken { ca_fingerprint: fp, secret };
        prop_assert_eq!(t.to_string().parse::<JoinToken>().unwrap(), t);
    }

    #[test]
    fn names_parse_iff_dns_labels(s in "[a-zA-Z0-9.-]{0,70}") {
        let ok = NodeName::new(s.clone()).is_ok();
        let valid = !s.is_empty() && s.len() <= 63
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.starts_with('-') && !s.ends_with('-');
        prop_assert_eq!(ok, valid);
        prop_assert_eq!(TrustDomain::new(s.clone()).is_ok(), !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.') && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric()));
    }
}
