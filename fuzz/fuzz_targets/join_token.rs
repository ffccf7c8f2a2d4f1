//! Join token parsing: what parses prints back to a string that parses to the same token.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quicmesh_protocol::token::JoinToken;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(t) = s.parse::<JoinToken>() {
        assert_eq!(t.to_string().parse::<JoinToken>().unwrap(), t);
    }
});
