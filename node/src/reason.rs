//! Why the node refused, dropped or closed something: one enum per kind of decision, all
//! sharing the [`Label`] trait, so a metric label can only be a known reason and a metric
//! sized by reason takes its array length from the enum.
//!
//! A leaf module: it depends only on `protocol`.

use quicmesh_protocol::path::ProbeRefusal;
use quicmesh_protocol::wire::RejectCode;

/// A reason that is a metrics label: a fixed, known set of stable snake_case strings.
pub trait Label: Copy + Eq + std::fmt::Debug + 'static {
    /// Every value, in a fixed order ([`Label::index`] is the position here).
    const ALL: &'static [Self];
    /// The stable label.
    fn as_str(self) -> &'static str;
    /// Position in [`Label::ALL`], for arrays of counters indexed by reason.
    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Declares a reason enum with its labels, its `Label` impl and `COUNT`.
macro_rules! reasons {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v,)+ }

        impl $name {
            /// How many reasons there are (for arrays of counters).
            pub const COUNT: usize = [$($s),+].len();

            /// The stable label.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)+ }
            }
        }

        impl Label for $name {
            const ALL: &'static [Self] = &[$($name::$v),+];
            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
            fn index(self) -> usize {
                self as usize
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// The ingress's refusals of a stream are the wire's reject codes.
impl Label for RejectCode {
    const ALL: &'static [Self] = &[
        RejectCode::PolicyDenied,
        RejectCode::SourceNotInCertificate,
        RejectCode::UnknownService,
        RejectCode::ServiceUnavailable,
        RejectCode::Malformed,
        RejectCode::NotReady,
        RejectCode::PeerUnknown,
        RejectCode::PeerRevoked,
        RejectCode::PeerExpired,
    ];
    fn as_str(self) -> &'static str {
        RejectCode::as_str(&self)
    }
}

/// Path probes refused are the path protocol's refusals.
impl Label for ProbeRefusal {
    const ALL: &'static [Self] = &ProbeRefusal::ALL;
    fn as_str(self) -> &'static str {
        self.label()
    }
}

reasons! {
    /// Why the relay path dropped a datagram.
    pub enum RelayDrop {
        /// Relay framing arrived at a node that is not a relay.
        NotARelay => "not_a_relay",
        /// The sender has not registered with this relay (no authenticated ping).
        SenderNotRegistered => "sender_not_registered",
        /// The destination has not registered with this relay.
        DestinationNotRegistered => "destination_not_registered",
        /// Forwarding failed at the socket.
        SendFailed => "send_failed",
        /// Relayed datagrams from a relay this node does not know.
        UnknownRelay => "unknown_relay",
        /// Relayed datagrams from a node not in this node's view.
        UnknownPeer => "unknown_peer",
        /// A path packet that does not decode.
        Malformed => "malformed",
        /// A registration refused: another node holds the address and is alive (a
        /// forged source address).
        AddressTaken => "address_taken",
    }
}

reasons! {
    /// Why a peer's identity no longer (or not yet) stands, whatever it asks for.
    pub enum Standing {
        /// The node has no snapshot yet and cannot decide.
        NotReady => "not_ready",
        /// The peer is not in the applied view (removed, revoked, or not yet known).
        PeerUnknown => "peer_unknown",
        /// The peer's certificate serial is on the deny list.
        PeerRevoked => "peer_revoked",
        /// The peer's certificate has expired (or is not valid yet).
        PeerExpired => "peer_expired",
    }
}

reasons! {
    /// Why a WireGuard client's packets no longer (or never) pass.
    pub enum ClientStanding {
        /// Not among the clients the node knows: revoked, removed, or never enrolled.
        Unknown => "client_unknown",
        /// The client's enrollment has expired.
        Expired => "client_expired",
        /// The node that carried the packet is not one of the client's gateways.
        NotItsGateway => "client_not_via_its_gateway",
    }
}

impl Standing {
    /// The wire code that tells the peer why its stream was refused.
    pub fn reject_code(self) -> RejectCode {
        match self {
            Standing::NotReady => RejectCode::NotReady,
            Standing::PeerUnknown => RejectCode::PeerUnknown,
            Standing::PeerRevoked => RejectCode::PeerRevoked,
            Standing::PeerExpired => RejectCode::PeerExpired,
        }
    }

    /// Why a live flow or tunnel of a peer that lost its standing is closed; `None` when
    /// the node has no view yet (nothing is closed for that).
    pub fn close_reason(self) -> Option<CloseReason> {
        match self {
            Standing::NotReady => None,
            Standing::PeerUnknown => Some(CloseReason::PeerUnknown),
            Standing::PeerRevoked => Some(CloseReason::PeerRevoked),
            Standing::PeerExpired => Some(CloseReason::PeerExpired),
        }
    }
}

reasons! {
    /// Why the overlay dropped a packet.
    pub enum DropReason {
        /// Not an IP packet we can read.
        Malformed => "malformed",
        /// Inner source address not in the sending peer's certificate.
        Spoofed => "spoofed",
        /// Not addressed to one of this node's overlay addresses.
        NotForUs => "not_for_us",
        /// No local service owns the destination port and protocol.
        NoService => "no_service",
        /// Policy allows none of the sender's services to reach the owning service.
        PolicyDenied => "policy_denied",
        /// A packet of no tracked flow that cannot open one (a TCP segment without SYN,
        /// ICMP other than echo and errors).
        NotTracked => "not_tracked",
        /// Outbound: an answer on no tracked flow (sent from a local service's port, not a
        /// TCP SYN): the peer's flow was closed by a policy change or a revocation, or
        /// timed out. It does not re-open the flow.
        FlowClosed => "flow_closed",
        /// A peer's new flow judged under a view that was replaced meanwhile (its next
        /// packet is judged under the new one).
        ViewChanged => "view_changed",
        /// Outbound: no peer owns the destination address.
        NoRoute => "no_route",
        /// Outbound: the tunnel to the peer is not up (yet).
        NoTunnel => "no_tunnel",
        /// Outbound: larger than the path carries (answered with ICMP "too big").
        TooBig => "too_big",
        /// The node's snapshot is not loaded yet.
        NotReady => "not_ready",
        /// An IP packet whose transport cannot be found: extension headers truncated, too
        /// many or too long, not walked or out of place, a routing header with segments
        /// left, a transport header cut short (a tiny first fragment).
        Unclassifiable => "unclassifiable",
        /// A fragment other than the first, of no datagram whose first fragment passed (or
        /// starting inside the transport header the first one was judged by).
        FragmentUntracked => "fragment_untracked",
        /// An ICMP error quoting no packet this node sent to that peer in a tracked flow.
        IcmpUnmatched => "icmp_unmatched",
        /// The flow table (or the fragment table) is full of flows that may not be evicted.
        TableFull => "table_full",
        /// The peer already has its most flows open to this node.
        PeerFlowLimit => "peer_flow_limit",
        /// The sending peer no longer stands (revoked, left the mesh, certificate expired).
        PeerRevoked => "peer_revoked",
        /// The sending peer is not in the applied snapshot.
        PeerUnknown => "peer_unknown",
        /// The sending peer's certificate has expired.
        PeerExpired => "peer_expired",
        /// A WireGuard client's packet: the client is not (or no longer) known here.
        ClientUnknown => "client_unknown",
        /// A WireGuard client's packet: its enrollment has expired.
        ClientExpired => "client_expired",
        /// At a gateway: a packet for a WireGuard client this gateway does not serve or
        /// has no session with.
        NoClient => "no_client",
        /// Outbound at a gateway: a client's packet for a peer whose datagram queue is
        /// full (dropped rather than pushing out what others queued).
        QueueFull => "queue_full",
    }
}

reasons! {
    /// Why a local client's flow was refused before it reached a peer.
    pub enum EgressRefusal {
        /// No healthy instance of the service in the allowed localities.
        NoInstance => "no_instance",
        /// Local policy denies the flow (`check_egress`).
        PolicyDenied => "policy_denied",
        /// No instance could be reached.
        Unreachable => "unreachable",
    }
}

reasons! {
    /// Why the node closed a live flow or a tunnel.
    pub enum CloseReason {
        /// Policy no longer allows the flow.
        PolicyChanged => "policy_changed",
        /// The peer's certificate was revoked.
        PeerRevoked => "peer_revoked",
        /// The peer left the mesh (no longer in the applied view).
        PeerUnknown => "peer_unknown",
        /// The peer's certificate expired.
        PeerExpired => "peer_expired",
        /// No bytes either way for the idle timeout.
        Idle => "idle",
        /// The node is shutting down.
        NodeShutdown => "node_shutdown",
        /// A cached tunnel that failed and was replaced.
        Stale => "stale",
        /// A peer opened more tunnels than the registry keeps; its oldest was closed.
        TooManyTunnels => "too_many_tunnels",
        /// A WireGuard client's flow: the client was revoked, expired or removed.
        ClientGone => "client_gone",
    }
}

reasons! {
    /// Why a presented certificate, or the tunnel it came with, was refused at the handshake.
    pub enum HandshakeRefusal {
        BadCertificate => "bad_certificate",
        UnknownCa => "unknown_ca",
        Expired => "expired",
        NotYetValid => "not_yet_valid",
        Revoked => "revoked",
        NoIdentity => "no_identity",
        WrongPeer => "wrong_peer",
        /// Through a relay, the certificate is not the node the relay named.
        RelaySenderMismatch => "relay_sender_mismatch",
        /// The certificate is valid but its node is not in the applied view.
        PeerUnknown => "peer_unknown",
        /// A hybrid-only node (`[tls] key_exchange = "hybrid-only"`) was offered no
        /// post-quantum key exchange (X25519MLKEM768).
        ClassicalKeyExchange => "classical_key_exchange",
    }
}

reasons! {
    /// Why a local HTTP listener refused a connection or a request.
    pub enum HttpRefusal {
        /// The server already holds its most connections.
        ConnectionLimit => "connection_limit",
        /// This source address already holds its most connections.
        SourceLimit => "source_limit",
        /// No whole request head within the deadline: closed.
        HeaderTimeout => "header_timeout",
        /// The `Host` is not an IP literal, `localhost` or a configured name.
        Host => "host_not_allowed",
    }
}

reasons! {
    /// Why an HTTP request to a mesh service was refused or failed (the answer's status in
    /// brackets); every one is counted by this label.
    pub enum RequestRefusal {
        /// The policy denies the request (403, with the rule).
        PolicyDenied => "policy_denied",
        /// The peer no longer stands: revoked, unknown, expired, or no view yet (403).
        PeerNotStanding => "peer_not_standing",
        /// The peer's certificate does not carry the claimed source service (403).
        SourceNotInCertificate => "source_not_in_certificate",
        /// This node does not host the service (404).
        UnknownService => "unknown_service",
        /// The target is not a path this node judges the same way as any server would
        /// (`%2F`, `%5C`, `%00`, `;`, `%25`, bad escapes, not origin-form) (400).
        BadTarget => "bad_target",
        /// A header a rule matches on came more than once (400).
        RepeatedHeader => "repeated_header",
        /// An upgrade this node cannot judge the requests of (`h2c`), or CONNECT (400).
        Unjudgeable => "unjudgeable",
        /// The local service could not be reached (502; gRPC UNAVAILABLE, retryable).
        ServiceUnavailable => "service_unavailable",
        /// The local service failed after the request reached it (502; gRPC INTERNAL,
        /// not retried: it may have had its effect).
        ServiceFailed => "service_failed",
        /// The node holds its most requests in flight (503), or its most client
        /// connections (closed).
        Overloaded => "overloaded",
        /// The client's request body failed on the way (400).
        BadRequestBody => "bad_request_body",
        /// No healthy instance (in the route's subset and localities) (503).
        NoInstance => "no_instance",
        /// No instance could be reached, or the request failed on the way (502).
        Unreachable => "unreachable",
        /// No response head within the route's timeout or the last try's (504).
        Timeout => "timeout",
        /// The source service sent more than its rate limit allows (429).
        RateLimited => "rate_limited",
        /// The route's fault injection answered instead of the service.
        FaultInjected => "fault_injected",
    }
}

impl RequestRefusal {
    /// A stream refusal (the peer's ingress, or this node's standing check) as the
    /// refusal of the request it carried.
    pub fn from_reject(code: RejectCode) -> Self {
        match code {
            RejectCode::PolicyDenied => Self::PolicyDenied,
            RejectCode::UnknownService => Self::UnknownService,
            RejectCode::SourceNotInCertificate => Self::SourceNotInCertificate,
            RejectCode::ServiceUnavailable => Self::ServiceUnavailable,
            RejectCode::Malformed => Self::BadTarget,
            RejectCode::NotReady
            | RejectCode::PeerUnknown
            | RejectCode::PeerRevoked
            | RejectCode::PeerExpired => Self::PeerNotStanding,
        }
    }
}

reasons! {
    /// Why a DNS query was not served as asked.
    pub enum DnsDrop {
        /// Too many forwarded queries were in flight: answered SERVFAIL.
        ForwardBusy => "forward_busy",
        /// The forward resolver did not answer in time (or could not be reached).
        ForwardFailed => "forward_failed",
        /// Too many TCP clients were connected: the new one was closed.
        TcpLimit => "tcp_limit",
    }
}

reasons! {
    /// Why a WireGuard gateway dropped a datagram from the network or a packet for one of
    /// its clients. Nothing dropped is answered.
    pub enum WgDrop {
        /// Not a WireGuard message (type, length or reserved bytes wrong).
        Malformed => "malformed",
        /// A handshake whose mac1 is not for this gateway's key.
        BadMac => "bad_mac",
        /// A handshake from a key that is no client of this gateway (or no longer one).
        UnknownKey => "unknown_key",
        /// A message for a session index this gateway never gave out (or has forgotten).
        UnknownIndex => "unknown_index",
        /// The client's enrollment has expired.
        Expired => "expired",
        /// Failed to decrypt, replayed, or out of the handshake's order.
        Crypto => "crypto",
        /// An inner packet whose source is not the client's own address.
        Spoofed => "spoofed",
        /// A packet for a client that has never connected to this gateway.
        NoEndpoint => "no_endpoint",
        /// Handshakes over the rate limit from a source that has not proven its address,
        /// or cookie replies over theirs.
        UnderLoad => "under_load",
        /// A packet for an address that is no client of this gateway.
        NotAClient => "not_a_client",
        /// More handshakes from one source address in a second than it may send.
        SourceLimit => "source_limit",
        /// Admitted on the handshake thread, but the queue to the sessions was full.
        Backlog => "backlog",
        /// A data message on the handshake socket (a GRO batch led by a handshake): data
        /// is taken on the data path only.
        Misrouted => "misrouted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct<L: Label>() {
        let mut seen = std::collections::HashSet::new();
        for (i, r) in L::ALL.iter().enumerate() {
            assert!(seen.insert(r.as_str()), "duplicate label {}", r.as_str());
            assert_eq!(r.index(), i);
            assert!(r
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }

    #[test]
    fn labels_are_distinct_snake_case_and_indexed_in_order() {
        distinct::<RejectCode>();
        distinct::<Standing>();
        distinct::<EgressRefusal>();
        distinct::<CloseReason>();
        distinct::<HandshakeRefusal>();
        distinct::<DropReason>();
        distinct::<HttpRefusal>();
        distinct::<RequestRefusal>();
        distinct::<DnsDrop>();
        distinct::<WgDrop>();
        distinct::<RelayDrop>();
        distinct::<ProbeRefusal>();
        assert_eq!(CloseReason::COUNT, CloseReason::ALL.len());
    }

    #[test]
    fn every_standing_maps_to_its_own_wire_code() {
        let codes: std::collections::HashSet<_> =
            Standing::ALL.iter().map(|s| s.reject_code()).collect();
        assert_eq!(codes.len(), Standing::COUNT);
    }
}
