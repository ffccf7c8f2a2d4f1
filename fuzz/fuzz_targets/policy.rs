//! The policy file parser: a parsed policy renders to a file that parses back to the same
//! policy, and its tests run.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quicmesh_protocol::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = Policy::parse(text) {
        let again = Policy::parse(&p.to_toml()).expect("rendered policy parses");
        assert_eq!(again, p);
        let _ = p.run_tests();
    }
});
