//! Node -> coordinator control messages (enrollment requests included): decode -> encode
//! -> decode gives the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quicmesh_protocol::wire::{decode, encode, ControlUp};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode::<ControlUp>(data) {
        assert_eq!(decode::<ControlUp>(&encode(&m)).unwrap(), m);
    }
});
