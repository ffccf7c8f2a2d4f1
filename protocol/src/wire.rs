//! Every wire message and the one codec that carries them.
//!
//! A message on the wire is a frame: a 4-byte big-endian length, then the body. The body is
//! `[WIRE_VERSION, kind, postcard bytes...]`. Decoding checks the length limit of the
//! message type before anything is read, refuses unknown versions and kinds, and refuses
//! trailing bytes. Encoding cannot fail. Names inside messages are checked types, so a
//! decoded message needs no further validation.

use std::net::{IpAddr, SocketAddr};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cert::Serial;
use crate::health::ServiceCheck;
use crate::ident::{Labels, NodeName, ServiceName, TrustDomain};
use crate::overlay::Pools;
use crate::policy::Policy;

/// The wire format version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// Bytes of the length prefix in front of every frame.
pub const FRAME_HEADER_LEN: usize = 4;
/// ALPN of peer tunnels.
pub const ALPN_TUNNEL: &[u8] = b"quicmesh/1";
/// ALPN of the control session with the coordinator.
pub const ALPN_CONTROL: &[u8] = b"quicmesh-control/1";

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is empty")]
    Empty,
    #[error("message truncated")]
    Truncated,
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("unexpected message kind {got} (expected {expected})")]
    Kind { expected: u8, got: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
}

/// A message type with its kind byte and size limit.
pub trait Message: Serialize + DeserializeOwned {
    /// Distinguishes message families on the wire.
    const KIND: u8;
    /// Largest encoded body accepted.
    const MAX_LEN: usize;
}

/// Encodes a message body (without the length prefix).
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION, M::KIND];
    // Serializing our own types into a Vec cannot fail: no maps with non-string keys
    // that postcard refuses, no io errors.
    out.extend(postcard::to_stdvec(msg).unwrap_or_default());
    out
}

/// Encodes a message as a frame: length prefix then body.
pub fn encode_frame<M: Message>(msg: &M) -> Vec<u8> {
    let body = encode(msg);
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads a frame's body length from its prefix, refusing it before any body is read when
/// it exceeds `M::MAX_LEN`.
pub fn frame_len<M: Message>(prefix: [u8; FRAME_HEADER_LEN]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > M::MAX_LEN {
        return Err(DecodeError::TooLong {
            len,
            max: M::MAX_LEN,
        });
    }
    if len < 2 {
        return Err(DecodeError::Truncated);
    }
    Ok(len)
}

/// Decodes a message body (without the length prefix).
pub fn decode<M: Message>(buf: &[u8]) -> Result<M, DecodeError> {
    if buf.len() > M::MAX_LEN {
        return Err(DecodeError::TooLong {
            len: buf.len(),
            max: M::MAX_LEN,
        });
    }
    let (&version, rest) = buf.split_first().ok_or(DecodeError::Empty)?;
    if version != WIRE_VERSION {
        return Err(DecodeError::Version(version));
    }
    let (&kind, body) = rest.split_first().ok_or(DecodeError::Truncated)?;
    if kind != M::KIND {
        return Err(DecodeError::Kind {
            expected: M::KIND,
            got: kind,
        });
    }
    let (msg, trailing) = postcard::take_from_bytes::<M>(body).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
        other => DecodeError::Malformed(other.to_string()),
    })?;
    if !trailing.is_empty() {
        return Err(DecodeError::Trailing(trailing.len()));
    }
    Ok(msg)
}

// ---------------------------------------------------------------------------------------
// Control session: node -> coordinator

/// First message of an enrollment connection (no client certificate yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The join token's secret part.
    pub secret: String,
    pub node: NodeName,
    /// PKCS#10 CSR, DER.
    pub csr_der: Vec<u8>,
    pub services: Vec<ServiceName>,
    pub labels: Labels,
}

/// First message of an authenticated control session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node: NodeName,
    /// UDP port of the node's tunnel endpoint.
    pub tunnel_port: u16,
    /// Address peers should dial, when the node knows better than the coordinator.
    pub advertise: Option<SocketAddr>,
    /// The node's own addresses with its tunnel port (its interface address toward the
    /// coordinator): candidates for peers on the same network or behind the same NAT.
    pub local: Vec<SocketAddr>,
    /// The node asks to relay for others (`relay = true` in its config); it is
    /// advertised as a relay only when its join token granted the role.
    pub relay: bool,
    pub services: Vec<ServiceName>,
    pub labels: Labels,
    /// Snapshot version the node holds (0 = none).
    pub have_version: u64,
    pub agent_version: String,
}

/// One service pair's traffic as a node saw it (cumulative since the node started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairTraffic {
    pub src: ServiceName,
    pub dst: ServiceName,
    /// Flows this node started that were accepted.
    pub flows: u64,
    /// Bytes those flows carried, both directions.
    pub bytes: u64,
    /// Flows this node started that were refused, by reason (whichever side refused).
    pub denials: Vec<(String, u64)>,
    /// Flows refused at this node's ingress, by reason.
    pub ingress_denials: Vec<(String, u64)>,
    /// Flow setup latency histogram: (microseconds, count) per recorded bucket.
    pub setup_us: Vec<(u64, u64)>,
}

/// Periodic report of a node's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub snapshot_version: u64,
    pub cert_not_after: i64,
    pub flows_active: u64,
    pub flows_accepted: u64,
    pub flows_rejected: u64,
    pub peers_connected: u32,
    /// Per service pair traffic (flows this node started, refusals at its ingress).
    pub traffic: Vec<PairTraffic>,
}

/// Node -> coordinator messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlUp {
    Enroll(EnrollRequest),
    Hello(Hello),
    /// The snapshot of this version was applied.
    Ack {
        version: u64,
    },
    /// The snapshot of this version was refused; the node keeps its previous one.
    Nack {
        version: u64,
        reason: String,
    },
    Status(StatusReport),
    /// A new CSR for the same node; answered with `Renewed` or `RenewRefused`.
    Renew {
        csr_der: Vec<u8>,
    },
    /// Health of the node's checked services: all of them at session start, then on each
    /// transition.
    Health(Vec<ServiceCheck>),
    /// The node is dialling `peer`: ask it to dial back at the same time, so packets leave
    /// both NATs and each side's mapping lets the other's in (hole punching).
    Punch {
        peer: NodeName,
    },
    /// HTTP requests per route as this node saw them (cumulative since it started); sent
    /// only to a coordinator that asked for them ([`ControlDown::Features`]).
    HttpTraffic(Vec<RouteTraffic>),
    /// How the routes of this node's `http` upstreams are set (its TOML); sent once per
    /// session to a coordinator that asked for HTTP traffic ([`ControlDown::Features`]),
    /// at most [`MAX_ROUTE_REPORTS`] of them.
    HttpRoutes(Vec<RouteSettings>),
    /// This node serves WireGuard clients: its gateway's public key and the UDP port it
    /// listens on (the coordinator prints both in the clients' configurations), and each
    /// client's state. Sent only to a coordinator that announced [`WG_CLIENTS`] support
    /// (it answers a node's [`WG_CLIENTS`] announcement with [`ControlDown::WgClients`]).
    Gateway(GatewayReport),
    /// This node's open tunnels and the key exchange group each negotiated, at most
    /// [`MAX_TUNNEL_REPORTS`]; sent with status reports only to a coordinator that asked
    /// ([`ControlDown::ReportTunnels`]).
    Tunnels(Vec<TunnelReport>),
}

/// One of a node's open tunnels, as the node read it from the tunnel's handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelReport {
    pub peer: NodeName,
    /// The key exchange group ("X25519MLKEM768", "X25519", ...); empty when not read.
    pub key_exchange: String,
}

/// Most tunnels one [`ControlUp::Tunnels`] carries (the report fits a control frame).
pub const MAX_TUNNEL_REPORTS: usize = 512;

/// A node's `Hello` agent version carries this when it reports its tunnels
/// ([`ControlUp::Tunnels`]) to a coordinator that asks ([`ControlDown::ReportTunnels`]).
pub const TUNNEL_REPORT: &str = "tunnels=1";

/// A WireGuard gateway as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayReport {
    pub public_key: crate::wg::WgKey,
    pub port: u16,
    /// Per client: name, seconds since its last handshake, bytes to and from it.
    pub clients: Vec<(String, Option<u64>, u64, u64)>,
    /// The gateway answers DNS for its clients on its overlay IPv4 address.
    pub dns: bool,
}

/// Most clients one [`GatewayReport`] carries (the most recent handshakes first): the
/// report fits a control frame whatever the names.
pub const MAX_GATEWAY_REPORT_CLIENTS: usize = 512;

/// A node's `Hello` agent version carries this when it takes [`ControlDown::WgClients`]
/// (every node that judges overlay packets must know the clients, not only gateways).
pub const WG_CLIENTS: &str = "wg=1";

/// One route of a node's `http` upstream as configured, for the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSettings {
    /// The upstream's source service (one of the node's own).
    pub src: ServiceName,
    pub dst: ServiceName,
    pub route: String,
    pub path_prefix: Option<String>,
    /// Header names with the value each must have.
    pub headers: Vec<(String, String)>,
    /// Weighted subsets: the labels an instance must carry, and the weight.
    pub split: Vec<(std::collections::BTreeMap<String, String>, u32)>,
    pub timeout_ms: u64,
    pub per_try_timeout_ms: Option<u64>,
    pub retries: u32,
    /// Faults injected, in words (`delay 100ms on 10%, abort 503 on 5%`).
    pub fault: Option<String>,
}

/// A node's `Hello` agent version carries this when the node reports HTTP traffic; the
/// coordinator then answers [`ControlDown::Features`]. Neither side sends the other a
/// message it does not know.
pub const HTTP_TRAFFIC: &str = "http-traffic=1";

/// A node's `Hello` agent version carries this when it takes [`ControlDown::SessionInfo`]
/// (and relays through the coordinator when told so).
pub const SESSION_INFO: &str = "session-info=1";

/// Whether `agent_version` announces `feature` (`"0.1.0; policy=2; http-traffic=1"`).
pub fn announces(agent_version: &str, feature: &str) -> bool {
    agent_version.split(';').any(|p| p.trim() == feature)
}

/// Most routes one report carries (the busiest first).
pub const MAX_ROUTE_REPORTS: usize = 128;
/// Latency buckets of a route report: bucket `i` holds requests that took up to
/// `64 µs x 2^((i+1)/2)` (about 90 µs to 67 s); the last takes the rest.
pub const LATENCY_BUCKETS: usize = 40;

/// The bucket of a request that took `us` microseconds.
pub fn latency_bucket(us: u64) -> usize {
    (0..LATENCY_BUCKETS)
        .find(|i| us <= bucket_upper_us(*i))
        .unwrap_or(LATENCY_BUCKETS - 1)
}

/// The upper bound of bucket `i`, microseconds.
pub fn bucket_upper_us(i: usize) -> u64 {
    let half = (i + 1) as f64 / 2.0;
    (64.0 * 2f64.powf(half)) as u64
}

/// The `q` quantile of bucket counts (the upper bound of its bucket), milliseconds.
pub fn bucket_quantile_ms(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().fold(0u64, |a, c| a.saturating_add(*c));
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen = c.saturating_add(seen);
        if seen >= want {
            return Some(bucket_upper_us(i) as f64 / 1e3);
        }
    }
    None
}

/// One route's requests as a node saw them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTraffic {
    /// `true`: at the sending node (its `http` upstream); `false`: at the destination.
    pub egress: bool,
    pub src: ServiceName,
    pub dst: ServiceName,
    pub route: String,
    /// Requests answered, by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub classes: [u64; 5],
    /// Latency to the response head, [`LATENCY_BUCKETS`] counts.
    pub latency: Vec<u64>,
}

impl Message for ControlUp {
    const KIND: u8 = 1;
    const MAX_LEN: usize = 64 * 1024;
}

// ---------------------------------------------------------------------------------------
// Control session: coordinator -> node

/// A successful enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub trust_domain: TrustDomain,
    /// The node's leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// The mesh CA certificate(s), DER.
    pub ca_bundle: Vec<Vec<u8>>,
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollErrorCode {
    TokenUnknown,
    TokenUsed,
    TokenExpired,
    NodeMismatch,
    ServiceNotAllowed,
    LabelNotAllowed,
    BadCsr,
    NodeRevoked,
    Internal,
}

impl EnrollErrorCode {
    /// Stable short text for users and tests.
    pub fn as_str(&self) -> &'static str {
        match self {
            EnrollErrorCode::TokenUnknown => "token unknown",
            EnrollErrorCode::TokenUsed => "token already used",
            EnrollErrorCode::TokenExpired => "token expired",
            EnrollErrorCode::NodeMismatch => "token is for another node name",
            EnrollErrorCode::ServiceNotAllowed => "token does not allow a claimed service",
            EnrollErrorCode::LabelNotAllowed => "token does not allow a claimed label",
            EnrollErrorCode::BadCsr => "certificate signing request is invalid",
            EnrollErrorCode::NodeRevoked => "node is revoked",
            EnrollErrorCode::Internal => "coordinator internal error",
        }
    }
}

/// A peer node as a snapshot describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub node: NodeName,
    /// Where the peer's tunnel endpoint can be dialled; `None` until it reported one.
    pub endpoint: Option<SocketAddr>,
    pub services: Vec<ServiceName>,
    pub labels: Labels,
    /// The peer's overlay addresses (also in its certificate).
    pub overlay: Vec<IpAddr>,
    /// False once the peer's control session has been gone longer than the grace period:
    /// none of its instances are routed to.
    pub online: bool,
    /// The peer's services whose health check is failing (not routed to).
    pub critical: Vec<ServiceName>,
    /// Every address the peer may be reached at, best first: the address it advertises,
    /// the one the coordinator sees its packets come from (through any NAT), its own
    /// interface addresses. Dialled together; the first handshake wins.
    pub candidates: Vec<SocketAddr>,
    /// The peer relays packets between nodes that cannot reach each other directly.
    pub relay: bool,
    /// The coordinator sees the peer's packets come from an address that is not one of its
    /// own, and it advertises none: a NAT is in front of it. A dialer then opens its own
    /// NAT toward the peer with small-TTL openers and lets the peer's dial-back cross first
    /// (a NAT that takes unsolicited packets for itself would otherwise keep the tuple).
    pub nat: bool,
}

impl PeerInfo {
    /// True when the peer hosts `service` and may be routed to for it.
    pub fn serves(&self, service: &ServiceName) -> bool {
        self.online && self.services.contains(service) && !self.critical.contains(service)
    }
}

/// The whole desired state for one node. Applying the same snapshot twice changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Monotonic across the mesh; a node ignores versions older than the one it holds.
    pub version: u64,
    pub node: NodeName,
    pub trust_domain: TrustDomain,
    /// This node's own labels as the coordinator knows them (policy `to = "tag:..."`).
    pub labels: Labels,
    pub peers: Vec<PeerInfo>,
    pub policy_version: u64,
    pub policy: Policy,
    /// Revoked certificate serials.
    pub revoked: Vec<Serial>,
    pub ca_bundle: Vec<Vec<u8>>,
    /// The overlay address pools (routed to the TUN device in overlay mode).
    pub pools: Pools,
}

/// What changed between two snapshots of one node. Peers are whole entries: an upserted
/// peer replaces the old entry of that name. Fields that did not change are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDelta {
    pub base_version: u64,
    pub version: u64,
    pub node: NodeName,
    pub upsert: Vec<PeerInfo>,
    pub remove: Vec<NodeName>,
    pub labels: Option<Labels>,
    pub policy_version: u64,
    pub policy: Option<Policy>,
    pub revoked: Option<Vec<Serial>>,
    pub ca_bundle: Option<Vec<Vec<u8>>>,
    pub pools: Option<Pools>,
}

/// Coordinator -> node messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlDown {
    Enrolled(EnrollResponse),
    EnrollRefused {
        code: EnrollErrorCode,
        detail: String,
    },
    Snapshot(Box<Snapshot>),
    /// The changes from the snapshot the node holds (`base_version`) to a newer one; a
    /// node holding another version nacks it and is sent a whole snapshot.
    Delta(Box<SnapshotDelta>),
    Renewed {
        cert_der: Vec<u8>,
    },
    RenewRefused {
        detail: String,
    },
    /// `peer` is dialling this node: dial it back at `candidates` now (hole punching).
    Punch {
        peer: NodeName,
        candidates: Vec<SocketAddr>,
    },
    /// The coordinator ends the session (revoked, shutting down); the node should not
    /// reconnect with the same certificate when `revoked` is true.
    Goodbye {
        revoked: bool,
        detail: String,
    },
    /// The node's hello asked to relay but its join token did not grant the relay role:
    /// peers are not told it relays. Sent once per session; the session goes on.
    RelayRefused {
        detail: String,
    },
    /// What this coordinator takes beyond the first layout; sent at session start only to
    /// a node that announced it understands it (`HTTP_TRAFFIC` in its agent version).
    Features {
        /// Send [`ControlUp::HttpTraffic`] with status reports.
        http_traffic: bool,
    },
    /// Every WireGuard client not revoked or expired, whole: sent at session start and on
    /// every change, only to a node that announced [`WG_CLIENTS`]. Policy sees a client's
    /// packets with its service and labels; gateways serve the clients that name them.
    WgClients(Vec<crate::wg::WgClient>),
    /// What the coordinator knows of the session, sent at its start only to a node that
    /// announced [`SESSION_INFO`]: whether it relays the node's tunnels (the relay of last
    /// resort, on the address the session runs to), and whether the node is behind a NAT
    /// (its packets come from an address that is none of its own: [`PeerInfo::nat`]).
    SessionInfo {
        relay: bool,
        nat: bool,
        /// What the node's datagrams to the coordinator's relay carry
        /// ([`crate::path::PathPacket::RelaySendAuth`]): random per session, known only to
        /// the two ends of this (TLS) session. Zero when `relay` is false.
        relay_token: u64,
    },
    /// Send [`ControlUp::Tunnels`] with status reports; sent at session start only to a
    /// node that announced [`TUNNEL_REPORT`].
    ReportTunnels,
}

impl Message for ControlDown {
    const KIND: u8 = 2;
    const MAX_LEN: usize = 16 * 1024 * 1024;
}

// ---------------------------------------------------------------------------------------
// Tunnel streams

/// Opens every proxied stream between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    pub src_service: ServiceName,
    pub dst_service: ServiceName,
    /// Chosen by the sender; unique per connection, used in logs on both ends.
    pub flow_id: u64,
}

impl Message for StreamHeader {
    const KIND: u8 = 3;
    const MAX_LEN: usize = 512;
}

/// Why the ingress refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectCode {
    /// The policy denies source -> destination.
    PolicyDenied,
    /// The peer's certificate does not carry the claimed source service.
    SourceNotInCertificate,
    /// This node does not host the destination service.
    UnknownService,
    /// The local service did not accept the connection.
    ServiceUnavailable,
    /// The header did not decode.
    Malformed,
    /// The node has no snapshot yet and cannot decide.
    NotReady,
    /// The sending node is not in the ingress node's applied view.
    PeerUnknown,
    /// The sending node's certificate is revoked.
    PeerRevoked,
    /// The sending node's certificate has expired.
    PeerExpired,
}

impl RejectCode {
    /// Stable label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectCode::PolicyDenied => "policy_denied",
            RejectCode::SourceNotInCertificate => "source_not_in_certificate",
            RejectCode::UnknownService => "unknown_service",
            RejectCode::ServiceUnavailable => "service_unavailable",
            RejectCode::Malformed => "malformed",
            RejectCode::NotReady => "not_ready",
            RejectCode::PeerUnknown => "peer_unknown",
            RejectCode::PeerRevoked => "peer_revoked",
            RejectCode::PeerExpired => "peer_expired",
        }
    }
}

/// The ingress's answer to a [`StreamHeader`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamReply {
    Accept,
    /// `rule` is the deciding rule label (`rule[3]`, `default`) when the policy denied.
    Reject {
        code: RejectCode,
        rule: Option<String>,
    },
}

impl Message for StreamReply {
    const KIND: u8 = 4;
    const MAX_LEN: usize = 256;
}

// ---------------------------------------------------------------------------------------
// Borrowed views of the coordinator's largest messages. A whole snapshot lists every node
// of the mesh; a coordinator sends one to each node that joins, so building it as owned
// values cloned every peer of the catalog for every session (at 10,000 nodes, most of a
// replica's time went to the allocator). These encode to exactly the bytes of the owned
// `ControlDown::Snapshot` / `ControlDown::Delta` (tested), from the shared catalog.

/// What names a node: a catalog's peer entry, or a node name.
pub trait Named {
    fn name(&self) -> &NodeName;
}

impl Named for PeerInfo {
    fn name(&self) -> &NodeName {
        &self.node
    }
}

impl Named for NodeName {
    fn name(&self) -> &NodeName {
        self
    }
}

/// A catalog's entries less the receiving node's own, serialized as a sequence.
#[derive(Debug)]
pub struct Except<'a, T> {
    pub items: &'a [T],
    pub except: &'a NodeName,
}

// Copied as the references it holds, whatever `T` is (a derive would ask `T: Copy`).
impl<T> Clone for Except<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Except<'_, T> {}

/// Peers of a catalog, less the receiving node's own entry.
pub type PeersExcept<'a> = Except<'a, PeerInfo>;
/// Node names, less the receiving node's own.
pub type NamesExcept<'a> = Except<'a, NodeName>;

impl<T: Named + Serialize> Serialize for Except<'_, T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        // The length goes first (postcard): counted, as a filter's is not known.
        let keep = |t: &&T| t.name() != self.except;
        let mut seq = s.serialize_seq(Some(self.items.iter().filter(keep).count()))?;
        for t in self.items.iter().filter(keep) {
            seq.serialize_element(t)?;
        }
        seq.end()
    }
}

/// A [`Snapshot`] borrowing its parts: the fields in the same order, the same types.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SnapshotRef<'a> {
    pub version: u64,
    pub node: &'a NodeName,
    pub trust_domain: &'a TrustDomain,
    pub labels: &'a Labels,
    pub peers: PeersExcept<'a>,
    pub policy_version: u64,
    pub policy: crate::policy::PolicyWire<'a>,
    pub revoked: &'a [Serial],
    pub ca_bundle: &'a [&'a [u8]],
    pub pools: Pools,
}

/// A [`SnapshotDelta`] borrowing its parts: the fields in the same order, the same types.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DeltaRef<'a> {
    pub base_version: u64,
    pub version: u64,
    pub node: &'a NodeName,
    pub upsert: PeersExcept<'a>,
    pub remove: NamesExcept<'a>,
    pub labels: Option<&'a Labels>,
    pub policy_version: u64,
    pub policy: Option<crate::policy::PolicyWire<'a>>,
    pub revoked: Option<&'a [Serial]>,
    pub ca_bundle: Option<&'a [&'a [u8]]>,
    pub pools: Option<Pools>,
}

/// A `ControlDown` snapshot or delta, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum DownRef<'a> {
    Snapshot(SnapshotRef<'a>),
    Delta(DeltaRef<'a>),
}

impl Serialize for DownRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The variant indexes of `ControlDown::Snapshot` and `::Delta` (declaration order).
        match self {
            DownRef::Snapshot(v) => s.serialize_newtype_variant("ControlDown", 2, "Snapshot", v),
            DownRef::Delta(v) => s.serialize_newtype_variant("ControlDown", 3, "Delta", v),
        }
    }
}

impl DownRef<'_> {
    /// The frame of the `ControlDown` this is a view of.
    pub fn encode_frame(&self) -> Vec<u8> {
        // Cannot fail: every sequence gives its length first, as the owned types do.
        let body = postcard::to_stdvec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + 2 + body.len());
        out.extend_from_slice(&((body.len() + 2) as u32).to_be_bytes());
        out.extend_from_slice(&[WIRE_VERSION, ControlDown::KIND]);
        out.extend_from_slice(&body);
        out
    }
}

#[cfg(test)]
mod route_traffic_tests {
    use super::*;

    #[test]
    fn latency_buckets_cover_microseconds_to_minutes_and_quantiles_read_back() {
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        assert!(bucket_upper_us(LATENCY_BUCKETS - 1) > 60_000_000);
        let mut counts = vec![0u64; LATENCY_BUCKETS];
        for us in [500u64; 90].iter().chain([20_000u64; 10].iter()) {
            counts[latency_bucket(*us)] += 1;
        }
        let p50 = bucket_quantile_ms(&counts, 0.5).unwrap();
        let p99 = bucket_quantile_ms(&counts, 0.99).unwrap();
        assert!((0.5..=0.75).contains(&p50), "{p50}");
        assert!((20.0..=29.0).contains(&p99), "{p99}");
        assert_eq!(bucket_quantile_ms(&[0; LATENCY_BUCKETS], 0.5), None);
        assert!(announces("0.1.0; policy=2; http-traffic=1", HTTP_TRAFFIC));
        assert!(!announces("0.1.0; policy=2", HTTP_TRAFFIC));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> StreamHeader {
        StreamHeader {
            src_service: ServiceName::new("web").unwrap(),
            dst_service: ServiceName::new("db").unwrap(),
            flow_id: 7,
        }
    }

    fn peer(name: &str, i: u8) -> PeerInfo {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert(
            crate::ident::LabelKey::new("zone").unwrap(),
            format!("z{i}"),
        );
        PeerInfo {
            node: NodeName::new(name).unwrap(),
            endpoint: Some(SocketAddr::from(([198, 18, 0, i], 7800))),
            services: vec![ServiceName::new(format!("svc-{i}")).unwrap()],
            labels: Labels::new(labels).unwrap(),
            overlay: vec![IpAddr::from([100, 64, 0, i])],
            online: i.is_multiple_of(2),
            critical: Vec::new(),
            candidates: vec![SocketAddr::from(([198, 18, 1, i], 7800))],
            relay: i == 3,
            nat: false,
        }
    }

    /// The borrowed views encode to the owned messages' bytes, byte for byte: a node
    /// decodes them as the messages they stand for.
    #[test]
    fn borrowed_snapshots_and_deltas_encode_as_the_owned_ones() {
        let peers: Vec<PeerInfo> = (1..=4).map(|i| peer(&format!("n{i}"), i)).collect();
        let me = NodeName::new("n2").unwrap();
        let policy =
            Policy::parse("[[rule]]\nfrom = \"svc-1\"\nto = \"svc-2\"\naction = \"allow\"\n")
                .unwrap();
        let revoked = vec![Serial::new(vec![1, 2, 3]).unwrap()];
        let td = TrustDomain::new("t.test").unwrap();
        let pools = Pools::default_for(&[7; 32]);
        let ca: &[u8] = b"ca-der";
        let view = DownRef::Snapshot(SnapshotRef {
            version: 300,
            node: &me,
            trust_domain: &td,
            labels: &peers[1].labels,
            peers: Except {
                items: &peers,
                except: &me,
            },
            policy_version: 5,
            policy: crate::policy::PolicyWire {
                policy: &policy,
                layout_2: true,
            },
            revoked: &revoked,
            ca_bundle: &[ca],
            pools,
        });
        let owned = ControlDown::Snapshot(Box::new(Snapshot {
            version: 300,
            node: me.clone(),
            trust_domain: td.clone(),
            labels: peers[1].labels.clone(),
            peers: peers.iter().filter(|p| p.node != me).cloned().collect(),
            policy_version: 5,
            policy: policy.clone(),
            revoked: revoked.clone(),
            ca_bundle: vec![ca.to_vec()],
            pools,
        }));
        assert_eq!(view.encode_frame(), encode_frame(&owned));
        let names = [NodeName::new("n1").unwrap(), me.clone()];
        for (labels, pol, rev) in [
            (None, None, None),
            (Some(&peers[1].labels), Some(&policy), Some(&revoked[..])),
        ] {
            let view = DownRef::Delta(DeltaRef {
                base_version: 299,
                version: 300,
                node: &me,
                upsert: Except {
                    items: &peers,
                    except: &me,
                },
                remove: Except {
                    items: &names,
                    except: &me,
                },
                labels,
                policy_version: 5,
                policy: pol.map(|policy| crate::policy::PolicyWire {
                    policy,
                    layout_2: true,
                }),
                revoked: rev,
                ca_bundle: None,
                pools: None,
            });
            let owned = ControlDown::Delta(Box::new(SnapshotDelta {
                base_version: 299,
                version: 300,
                node: me.clone(),
                upsert: peers.iter().filter(|p| p.node != me).cloned().collect(),
                remove: vec![NodeName::new("n1").unwrap()],
                labels: labels.cloned(),
                policy_version: 5,
                policy: pol.cloned(),
                revoked: rev.map(<[Serial]>::to_vec),
                ca_bundle: None,
                pools: None,
            }));
            assert_eq!(view.encode_frame(), encode_frame(&owned));
        }
    }

    /// The WireGuard messages are the last of their enums: older peers decode every
    /// message they knew exactly as before, and are never sent the new ones.
    #[test]
    fn wireguard_messages_round_trip_and_an_invalid_client_does_not_decode() {
        use crate::wg::{WgClient, WgKey};
        let client = WgClient {
            name: NodeName::new("alice").unwrap(),
            service: ServiceName::new("laptop").unwrap(),
            labels: Labels::default(),
            addresses: vec!["100.64.0.9".parse().unwrap()],
            public_key: WgKey([7; 32]),
            expires_at: 0,
            gateways: vec![NodeName::new("gw-1").unwrap()],
        };
        let down = ControlDown::WgClients(vec![client.clone()]);
        assert_eq!(decode::<ControlDown>(&encode(&down)).unwrap(), down);
        let up = ControlUp::Gateway(GatewayReport {
            public_key: WgKey([9; 32]),
            port: 51820,
            clients: vec![("alice".into(), Some(3), 100, 200)],
            dns: true,
        });
        assert_eq!(decode::<ControlUp>(&encode(&up)).unwrap(), up);
        // A client whose service name is not a DNS label is refused at the seam.
        let mut bad = encode(&down);
        let at = bad
            .windows(6)
            .position(|w| w == b"laptop")
            .expect("service name in the frame");
        bad[at] = b'L';
        assert!(decode::<ControlDown>(&bad).is_err());
    }

    #[test]
    fn a_full_gateway_report_fits_a_control_frame() {
        let name = "x".repeat(63);
        let up = ControlUp::Gateway(GatewayReport {
            public_key: crate::wg::WgKey([9; 32]),
            port: 51820,
            clients: (0..MAX_GATEWAY_REPORT_CLIENTS)
                .map(|_| (name.clone(), Some(u64::MAX), u64::MAX, u64::MAX))
                .collect(),
            dns: true,
        });
        let len = encode(&up).len();
        assert!(len <= ControlUp::MAX_LEN, "{len} bytes");
    }

    #[test]
    fn a_full_tunnel_report_fits_a_control_frame() {
        let up = ControlUp::Tunnels(
            (0..MAX_TUNNEL_REPORTS)
                .map(|i| TunnelReport {
                    peer: NodeName::new(format!("{i:0>63}")).unwrap(),
                    key_exchange: "X25519MLKEM768".into(),
                })
                .collect(),
        );
        let len = encode(&up).len();
        assert!(len <= ControlUp::MAX_LEN, "{len} bytes");
        assert_eq!(decode::<ControlUp>(&encode(&up)).unwrap(), up);
    }

    #[test]
    fn round_trip_and_frame() {
        let h = header();
        let body = encode(&h);
        assert_eq!(decode::<StreamHeader>(&body).unwrap(), h);
        let frame = encode_frame(&h);
        let prefix: [u8; 4] = frame[..4].try_into().unwrap();
        assert_eq!(frame_len::<StreamHeader>(prefix).unwrap(), body.len());
    }

    #[test]
    fn typed_errors() {
        let mut body = encode(&header());
        assert_eq!(decode::<StreamHeader>(&[]), Err(DecodeError::Empty));
        assert_eq!(
            decode::<StreamHeader>(&[9, 3]),
            Err(DecodeError::Version(9))
        );
        assert_eq!(
            decode::<StreamReply>(&body),
            Err(DecodeError::Kind {
                expected: 4,
                got: 3
            })
        );
        assert_eq!(
            decode::<StreamHeader>(&body[..body.len() - 1]),
            Err(DecodeError::Truncated)
        );
        body.push(0);
        assert_eq!(decode::<StreamHeader>(&body), Err(DecodeError::Trailing(1)));
        assert!(matches!(
            frame_len::<StreamHeader>(1000u32.to_be_bytes()),
            Err(DecodeError::TooLong { len: 1000, .. })
        ));
    }

    #[test]
    fn invalid_names_do_not_decode() {
        // A header whose service name is upper case must be refused at the seam.
        #[derive(Serialize)]
        struct Raw {
            a: String,
            b: String,
            f: u64,
        }
        let mut body = vec![WIRE_VERSION, StreamHeader::KIND];
        body.extend(
            postcard::to_stdvec(&Raw {
                a: "WEB".into(),
                b: "db".into(),
                f: 1,
            })
            .unwrap(),
        );
        assert!(matches!(
            decode::<StreamHeader>(&body),
            Err(DecodeError::Malformed(_))
        ));
    }
}
