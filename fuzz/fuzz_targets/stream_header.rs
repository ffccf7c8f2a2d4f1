//! Tunnel stream header and reply decoders: decode -> encode -> decode gives the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quicmesh_protocol::wire::{decode, encode, StreamHeader, StreamReply};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = decode::<StreamHeader>(data) {
        assert_eq!(decode::<StreamHeader>(&encode(&h)).unwrap(), h);
    }
    if let Ok(r) = decode::<StreamReply>(data) {
        assert_eq!(decode::<StreamReply>(&encode(&r)).unwrap(), r);
    }
});
