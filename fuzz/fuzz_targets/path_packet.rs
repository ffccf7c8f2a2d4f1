//! Path packet decoder (relay framing, probes): never panics; a decoded probe re-encodes
//! to the same bytes (every field, padding and the address's unused bytes are checked on
//! decode), a pong is never longer than a ping, and a relay header rewrite (plain or
//! authenticated) keeps the payload.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quicmesh_protocol::path::{self as pp, PathPacket, PeerId, ProbeHead};

fn head(p: &pp::Probe) -> ProbeHead {
    ProbeHead {
        link: p.link,
        dir: p.dir,
        seq: p.seq,
        tx: p.tx,
    }
}

fuzz_target!(|data: &[u8]| {
    match pp::decode(data) {
        Ok(Some(PathPacket::Ping(p))) => {
            assert_eq!(pp::ping(&head(&p), |_| p.tag), data);
        }
        Ok(Some(PathPacket::Pong { probe, observed })) => {
            let again = pp::pong(&head(&probe), observed, |_| probe.tag);
            assert_eq!(again, data);
            assert!(again.len() <= pp::PING_LEN);
        }
        Ok(Some(PathPacket::RelaySend { payload, .. })) => {
            let mut d = data.to_vec();
            pp::relay_rewrite(&mut d, PeerId(7));
            assert_eq!(
                pp::decode(&d).unwrap(),
                Some(PathPacket::RelayRecv { from: PeerId(7), payload })
            );
        }
        Ok(Some(PathPacket::RelaySendAuth { payload, .. })) => {
            let mut d = data.to_vec();
            let out = pp::relay_auth_rewrite(&mut d, PeerId(7)).to_vec();
            assert_eq!(
                pp::decode(&out).unwrap(),
                Some(PathPacket::RelayRecv { from: PeerId(7), payload })
            );
        }
        _ => {}
    }
});
