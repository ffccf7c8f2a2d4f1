//! quicmesh protocol: identities, the certificate profile, every wire message with its
//! codec, and the policy model. Pure: no async runtime, no sockets, no clock reads —
//! callers pass `now` in where time matters.

pub mod cert;
pub mod delta;
pub mod health;
pub mod http;
pub mod http_route;
pub mod http_wire;
pub mod ident;
pub mod overlay;
pub mod packet;
pub mod path;
pub mod policy;
pub mod routing;
pub mod token;
pub mod wg;
pub mod wire;

pub use cert::{PeerIdentity, Serial};
pub use ident::{Labels, NodeName, ServiceName, SpiffeId, TrustDomain};
pub use policy::{Decision, DenyReason, Policy};
