//! quicmesh-coordinator: the mesh CA, enrollment, catalog, policy store, snapshot push,
//! JSON API and admin CLI. Never on the data path.

pub mod api;
pub mod ca;
pub mod catalog;
pub mod client;
pub mod control;
pub mod dev;
pub mod drops;
pub mod health;
pub mod mesh;
pub mod punch;
pub mod relay;
pub mod replica;
pub mod serve;
pub mod store;
pub mod web;
