//! Coordinator -> node control messages (snapshots included): decode -> encode -> decode
//! gives the same value, and a decoded snapshot's policy evaluates without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quicmesh_protocol::ident::Labels;
use quicmesh_protocol::policy::{Destination, Source};
use quicmesh_protocol::wire::{decode, encode, ControlDown};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode::<ControlDown>(data) {
        assert_eq!(decode::<ControlDown>(&encode(&m)).unwrap(), m);
        if let ControlDown::Snapshot(s) = &m {
            let none = Labels::default();
            for p in &s.peers {
                for svc in &p.services {
                    let d = s.policy.evaluate(Source { service: svc, labels: &p.labels }, Destination { service: svc, labels: &none });
                    let _ = d.rule_label();
                }
            }
        }
    }
});
