//! Path packet decoder (relay framing, probes): never panics; a decoded probe re-encodes
//! to the same bytes, and a relay header rewrite keeps the payload.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quicmesh_protocol::path::{self as pp, PathPacket, PeerId};

fuzz_target!(|data: &[u8]| {
    match pp::decode(data) {
        Ok(Some(PathPacket::Ping(p))) => {
            assert_eq!(pp::ping(p.link, p.tx, |_| p.tag), data);
        }
        Ok(Some(PathPacket::Pong { probe, observed })) => {
            // Addresses of the other family's padding are not kept: compare decoded values.
            let again = pp::pong(probe.link, probe.tx, observed, |_| probe.tag);
            assert_eq!(
                pp::decode(&again).unwrap(),
                Some(PathPacket::Pong { probe, observed })
            );
        }
        Ok(Some(PathPacket::RelaySend { payload, .. })) => {
            let mut d = data.to_vec();
            pp::relay_rewrite(&mut d, PeerId(7));
            assert_eq!(
                pp::decode(&d).unwrap(),
                Some(PathPacket::RelayRecv { from: PeerId(7), payload })
            );
        }
        _ => {}
    }
});
