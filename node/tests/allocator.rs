//! The node's allocator is built the way the benchmarks measured it.
//!
//! mimalloc commits each arena up front by default on Linux, which held 40-60 MB per node
//! under load; `.cargo/config.toml` compiles in `MI_DEFAULT_ARENA_EAGER_COMMIT=0`. A build
//! that misses it (CFLAGS set by the environment, a stale build script) still works, only
//! heavier; this test is what notices.

use std::process::Command;

#[test]
fn the_node_s_allocator_commits_arena_memory_as_it_is_used() {
    let out = Command::new(env!("CARGO_BIN_EXE_quicmesh-node"))
        .arg("--version")
        .env("MIMALLOC_VERBOSE", "1")
        .env_remove("MIMALLOC_ARENA_EAGER_COMMIT")
        .output()
        .expect("run quicmesh-node");
    assert!(out.status.success(), "{out:?}");
    let verbose = String::from_utf8_lossy(&out.stderr);
    let option = verbose
        .lines()
        .find(|l| l.contains("option 'arena_eager_commit'"))
        .unwrap_or_else(|| panic!("mimalloc printed no options: {verbose}"));
    assert_eq!(
        option.trim(),
        "option 'arena_eager_commit': 0",
        "built without MI_DEFAULT_ARENA_EAGER_COMMIT=0 (see .cargo/config.toml)"
    );
}
