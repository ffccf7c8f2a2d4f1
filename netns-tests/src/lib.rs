//! Test support for quicmesh's end-to-end suites: the real `quicmesh-coordinator` and
//! `quicmesh-node` binaries as separate processes, each with its own data dir and log file,
//! plus the small tools the scenarios share (free ports, metrics scraping, echo services,
//! sha256 transfers, `assert_eventually`).
//!
//! Logs of a failed test are kept: the harness's temp dir is persisted when the test
//! thread panics, and the failure message says where.

pub mod browser;
pub mod grpc;
pub mod harness;
pub mod http;
pub mod net;
pub mod pg;
pub mod rogue;
pub mod topo;
pub mod wg;

pub use harness::{
    assert_eventually, patience, Bins, CoordinatorProc, Mesh, NodeProc, NodeSpec, Place,
};
