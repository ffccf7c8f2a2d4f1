//! quicmesh-node: the per-host daemon. Config -> control session -> node state snapshot ->
//! data plane (tunnels, L4 proxy), with local admin and metrics apart.

pub mod admin;
pub mod config;
pub mod control;
pub mod dns;
pub mod flow;
pub mod frame;
pub mod health;
pub mod metrics;
pub mod overlay;
pub mod path;
pub mod proxy;
pub mod run;
pub mod state;
pub mod store;
pub mod tls;
pub mod traffic;
pub mod tunnel;
