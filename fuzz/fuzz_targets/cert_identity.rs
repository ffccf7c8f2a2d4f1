//! Reading a peer identity from certificate bytes: never panics; what parses keeps its
//! node identity through a SPIFFE URI round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::ident::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("quicmesh.local").unwrap();
    if let Ok(id) = PeerIdentity::from_der(data, &td) {
        let uri = SpiffeId::Node(id.trust_domain.clone(), id.node.clone()).to_string();
        assert_eq!(uri.parse::<SpiffeId>().unwrap(), SpiffeId::Node(td, id.node));
    }
});
