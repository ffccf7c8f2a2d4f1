//! The node's one authorization core: every allow or deny the data plane makes is a call
//! into this module, with the same inputs, and the re-check of a live flow or tunnel is
//! built from the same functions as its first decision, so the two cannot drift.
//!
//! A leaf module: pure functions of the applied [`View`], the peer's certificate identity
//! and `now` (Unix seconds, passed in). No IO, no clock reads, no metrics: callers count
//! the typed reasons these functions return.
//!
//! Order of checks, the same everywhere:
//! 1. the node has a view (`NotReady` otherwise);
//! 2. the peer's *standing*: its serial is not revoked, its node is in the view, its
//!    certificate has not expired ([`standing`]);
//! 3. what the request claims is in the peer's certificate (source service, inner source
//!    address: checked by the callers that own those inputs, before any rule runs);
//! 4. the policy, evaluated for `(source service, source labels) -> (destination
//!    service, destination labels)` in exactly one place ([`decide`]).

use std::collections::BTreeSet;

use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::ident::{Labels, NodeName, ServiceName};
use quicmesh_protocol::policy::{Destination, Request, Source, Traffic};
use quicmesh_protocol::wg::WgClient;
use quicmesh_protocol::wire::RejectCode;
use serde::Serialize;

use crate::reason::{ClientStanding, CloseReason, RequestRefusal, Standing};
use crate::view::View;

/// Which side of the tunnel a flow was opened from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A local client's flow to a peer.
    Egress,
    /// A peer's flow to a local service.
    Ingress,
}

/// A refusal with the policy rule that decided it, when a rule did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied<R> {
    pub reason: R,
    /// The deciding rule label (`rule[3]`, `default`) when the policy denied.
    pub rule: Option<String>,
}

impl<R> Denied<R> {
    fn bare(reason: R) -> Self {
        Self { reason, rule: None }
    }
}

/// Whether `peer` still stands in `view` at `now`: not revoked, in the mesh, unexpired.
/// A certificate's start is checked at the handshake; time only moves forward after it.
pub fn standing(view: &View, peer: &PeerIdentity, now: i64) -> Result<(), Standing> {
    if view.version == 0 {
        return Err(Standing::NotReady);
    }
    if view.revoked.contains(&peer.serial) {
        return Err(Standing::PeerRevoked);
    }
    if !view.peers.contains_key(&peer.node) {
        return Err(Standing::PeerUnknown);
    }
    if now >= peer.not_after {
        return Err(Standing::PeerExpired);
    }
    Ok(())
}

/// The one evaluation of the policy: `src` on node `src_node` reaching `dst` on
/// `dst_node` (`None` is this node). The allowing rule's label, or the denying one's.
fn decide(
    view: &View,
    src: &ServiceName,
    src_node: Option<&NodeName>,
    dst: &ServiceName,
    dst_node: Option<&NodeName>,
    traffic: Traffic<'_>,
) -> Result<String, String> {
    static NONE: std::sync::LazyLock<Labels> = std::sync::LazyLock::new(Labels::default);
    let labels = |n: Option<&NodeName>| match n {
        None => &view.labels,
        Some(n) => view.peers.get(n).map_or(&*NONE, |p| &p.labels),
    };
    decide_labeled(
        view,
        (src, labels(src_node)),
        (dst, labels(dst_node)),
        traffic,
    )
}

/// [`decide`] with both ends' labels given: a WireGuard client's are its own, not a
/// node's.
fn decide_labeled(
    view: &View,
    (src, src_labels): (&ServiceName, &Labels),
    (dst, dst_labels): (&ServiceName, &Labels),
    traffic: Traffic<'_>,
) -> Result<String, String> {
    let d = view.policy.evaluate_traffic(
        Source {
            service: src,
            labels: src_labels,
        },
        Destination {
            service: dst,
            labels: dst_labels,
        },
        traffic,
    );
    if d.is_allow() {
        Ok(d.rule_label())
    } else {
        Err(d.rule_label())
    }
}

/// A stream a peer opened, as tunnel ingress sees it.
#[derive(Debug, Clone, Copy)]
pub struct StreamRequest<'a> {
    pub peer: &'a PeerIdentity,
    /// The source service the stream header claims.
    pub src: &'a ServiceName,
    /// The destination service the stream header names.
    pub dst: &'a ServiceName,
    /// Whether this node hosts `dst`.
    pub hosted: bool,
    /// `dst` speaks HTTP (`protocol = "http"`): the stream is an HTTP connection, admitted
    /// when some request on it could be allowed; each request is then judged by
    /// [`http_request`]. Otherwise the stream is opaque bytes.
    pub http: bool,
}

impl StreamRequest<'_> {
    fn traffic(&self) -> Traffic<'static> {
        if self.http {
            Traffic::HttpConnection
        } else {
            Traffic::Opaque
        }
    }
}

/// Tunnel ingress for a stream: the allowing rule, or the reject code to answer with.
pub fn stream_ingress(
    view: &View,
    req: StreamRequest<'_>,
    now: i64,
) -> Result<String, Denied<RejectCode>> {
    standing(view, req.peer, now).map_err(|s| Denied::bare(s.reject_code()))?;
    if !req.hosted {
        return Err(Denied::bare(RejectCode::UnknownService));
    }
    if !req.peer.may_speak_for(req.src) {
        return Err(Denied::bare(RejectCode::SourceNotInCertificate));
    }
    decide(
        view,
        req.src,
        Some(&req.peer.node),
        req.dst,
        None,
        req.traffic(),
    )
    .map_err(|rule| Denied {
        reason: RejectCode::PolicyDenied,
        rule: Some(rule),
    })
}

/// One HTTP request on an admitted stream (`conn.http` set), its target normalised: the
/// same checks as the stream's ([`stream_ingress`]: the peer's standing, the source in its
/// certificate), then a repeated header that a rule matches on is refused, then the
/// policy judges the request. The allowing rule, or why not.
pub fn http_request(
    view: &View,
    conn: StreamRequest<'_>,
    request: &Request<'_>,
    now: i64,
) -> Result<String, Denied<RequestRefusal>> {
    standing(view, conn.peer, now)
        .map_err(|s| Denied::bare(RequestRefusal::from_reject(s.reject_code())))?;
    if !conn.hosted {
        return Err(Denied::bare(RequestRefusal::UnknownService));
    }
    if !conn.peer.may_speak_for(conn.src) {
        return Err(Denied::bare(RequestRefusal::SourceNotInCertificate));
    }
    if view.policy.repeated_header(request).is_some() {
        return Err(Denied::bare(RequestRefusal::RepeatedHeader));
    }
    let traffic = Traffic::Http(*request);
    decide(
        view,
        conn.src,
        Some(&conn.peer.node),
        conn.dst,
        None,
        traffic,
    )
    .map_err(|rule| Denied {
        reason: RequestRefusal::PolicyDenied,
        rule: Some(rule),
    })
}

/// Egress: may local `src` reach `dst` on `peer` (the sending side's fast refusal; the
/// peer's ingress is authoritative). The allowing rule, or the denying one.
///
/// The sender does not know whether the destination reads requests (`protocol = "http"`
/// is the destination's setting), so it refuses only what no request could be allowed
/// ([`Traffic::HttpConnection`]); the destination judges an opaque flow as opaque and
/// each request of an HTTP one.
pub fn egress(
    view: &View,
    src: &ServiceName,
    dst: &ServiceName,
    peer: &NodeName,
) -> Result<String, String> {
    decide(view, src, None, dst, Some(peer), Traffic::HttpConnection)
}

/// Egress for one HTTP request of an `http` upstream (its target normalised): the sending
/// side's fast refusal, judged as the peer's ingress will judge it.
pub fn egress_request(
    view: &View,
    src: &ServiceName,
    dst: &ServiceName,
    peer: &NodeName,
    request: &Request<'_>,
) -> Result<String, String> {
    decide(view, src, None, dst, Some(peer), Traffic::Http(*request))
}

/// Why a packet may not open a new overlay flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowDenied {
    /// The peer does not stand (revoked, unknown, expired, no view).
    Standing(Standing),
    /// No service of the sender may reach the local service; the last denying rule.
    Policy(String),
    /// The WireGuard client at either end does not stand.
    Client(ClientStanding),
}

/// A new overlay flow from `peer` (whose certificate carries `peer_services`) to local
/// `service`: allowed when the peer stands and any of its services may reach `service`.
pub fn packet_flow(
    view: &View,
    peer: &PeerIdentity,
    peer_services: &BTreeSet<ServiceName>,
    service: &ServiceName,
    now: i64,
) -> Result<String, FlowDenied> {
    standing(view, peer, now).map_err(FlowDenied::Standing)?;
    packet_policy(view, &peer.node, peer_services, service).map_err(FlowDenied::Policy)
}

/// The policy half of [`packet_flow`]: may any of `services` on `node` reach local
/// `service`? The allowing rule, or the last denying one.
pub fn packet_policy(
    view: &View,
    node: &NodeName,
    services: &BTreeSet<ServiceName>,
    service: &ServiceName,
) -> Result<String, String> {
    if view.version == 0 {
        return Err("no snapshot".into());
    }
    let mut denied = String::from("default");
    for src in services {
        match decide(view, src, Some(node), service, None, Traffic::Opaque) {
            Ok(rule) => return Ok(rule),
            Err(rule) => denied = rule,
        }
    }
    Err(denied)
}

/// Whether WireGuard client `client`, its packets carried by gateway node `gateway`,
/// still stands: it is in the view (not revoked), unexpired, served by `gateway` as the
/// view has it; and the gateway stands itself. The client as the view has it now (its
/// service and labels are what policy judges, not those of an older view).
pub fn client_standing<'v>(
    view: &'v View,
    gateway: &PeerIdentity,
    client: &WgClient,
    now: i64,
) -> Result<&'v WgClient, FlowDenied> {
    standing(view, gateway, now).map_err(FlowDenied::Standing)?;
    let known = known_client(view, client)?;
    if !known.gateways.contains(&gateway.node) {
        return Err(FlowDenied::Client(ClientStanding::NotItsGateway));
    }
    live_client(known, now)?;
    Ok(known)
}

/// `client` as the view has it now: the same name, key and addresses (a client's record
/// held from an older view is judged by the current one's service and labels).
fn known_client<'v>(view: &'v View, client: &WgClient) -> Result<&'v WgClient, FlowDenied> {
    view.wg
        .by_name
        .get(&client.name)
        .filter(|c| c.public_key == client.public_key && c.addresses == client.addresses)
        .map(|c| &**c)
        .ok_or(FlowDenied::Client(ClientStanding::Unknown))
}

/// Whether `client`'s enrollment still runs at `now`.
fn live_client(client: &WgClient, now: i64) -> Result<(), FlowDenied> {
    if client.live_at(now.max(0) as u64) {
        Ok(())
    } else {
        Err(FlowDenied::Client(ClientStanding::Expired))
    }
}

/// May any of `services` (with `labels`) reach `client`'s service and labels? The
/// allowing rule, or the last denying one.
fn policy_to_client(
    view: &View,
    services: &BTreeSet<ServiceName>,
    labels: &Labels,
    client: &WgClient,
) -> Result<String, FlowDenied> {
    let mut denied = String::from("default");
    for src in services {
        match decide_labeled(
            view,
            (src, labels),
            (&client.service, &client.labels),
            Traffic::Opaque,
        ) {
            Ok(rule) => return Ok(rule),
            Err(rule) => denied = rule,
        }
    }
    Err(FlowDenied::Policy(denied))
}

/// A new overlay flow from WireGuard client `client` (through gateway node `gateway`) to
/// local `service`: allowed when both stand and the client's service, with the client's
/// labels, may reach `service` (exactly as a node's would be judged).
pub fn client_packet_flow(
    view: &View,
    gateway: &PeerIdentity,
    client: &WgClient,
    service: &ServiceName,
    now: i64,
) -> Result<String, FlowDenied> {
    let client = client_standing(view, gateway, client, now)?;
    decide_labeled(
        view,
        (&client.service, &client.labels),
        (service, &view.labels),
        Traffic::Opaque,
    )
    .map_err(FlowDenied::Policy)
}

/// A new overlay flow from a node (`peer`, with `peer_services`) to WireGuard client
/// `client`, judged at the client's gateway (the client's ingress): allowed only when
/// policy lets one of the peer's services reach the client's service and labels. Flows
/// the client opened pass as tracked flows without this.
pub fn packet_flow_to_client(
    view: &View,
    peer: &PeerIdentity,
    peer_services: &BTreeSet<ServiceName>,
    client: &WgClient,
    now: i64,
) -> Result<String, FlowDenied> {
    standing(view, peer, now).map_err(FlowDenied::Standing)?;
    let client = known_client(view, client)?;
    live_client(client, now)?;
    policy_to_client(view, peer_services, &view.peer_labels(&peer.node), client)
}

/// A new overlay flow this node opens to WireGuard client `client`, this node's
/// `services` its sources: allowed when the client stands (known, unexpired) and policy
/// lets one of them reach the client's service and labels. Judged here as well as at the
/// client's gateway, so a flow the gateway refused (or later closed) is never this node's
/// to keep open: the client's answer on it would otherwise pass here as established.
pub fn own_flow_to_client(
    view: &View,
    services: &BTreeSet<ServiceName>,
    client: &WgClient,
    now: i64,
) -> Result<String, FlowDenied> {
    if view.version == 0 {
        return Err(FlowDenied::Standing(Standing::NotReady));
    }
    let client = known_client(view, client)?;
    live_client(client, now)?;
    policy_to_client(view, services, &view.labels, client)
}

/// A live L4 flow, re-checked against a new view or a later `now`: why it must close.
/// The same checks as when it opened (ingress: [`stream_ingress`]; egress: standing and,
/// when the node checks egress, [`egress`]).
#[allow(clippy::too_many_arguments)]
pub fn recheck_stream(
    view: &View,
    direction: Direction,
    peer: &PeerIdentity,
    src: &ServiceName,
    dst: &ServiceName,
    http: bool,
    check_egress: bool,
    now: i64,
) -> Option<CloseReason> {
    // A peer that no longer stands closes the flow whatever it is; a view not loaded
    // yet closes nothing.
    if let Err(s) = standing(view, peer, now) {
        return s.close_reason();
    }
    let allowed = match direction {
        Direction::Ingress => {
            let req = StreamRequest {
                peer,
                src,
                dst,
                hosted: true,
                http,
            };
            stream_ingress(view, req, now).is_ok()
        }
        // An HTTP upstream's streams carry one request each, judged when it was sent.
        Direction::Egress => http || !check_egress || egress(view, src, dst, &peer.node).is_ok(),
    };
    (!allowed).then_some(CloseReason::PolicyChanged)
}

/// A request as it was judged, kept to judge it again while its answer lasts.
#[derive(Debug, Clone)]
pub struct JudgedRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// False when the headers were too many to keep: then a policy with header conditions
    /// closes the request on re-check (it cannot be judged again).
    pub all_headers: bool,
}

/// Most header bytes kept per judged request.
pub const MAX_KEPT_HEADER_BYTES: usize = 16 * 1024;

impl JudgedRequest {
    /// Keeps what a re-judging needs.
    pub fn new(method: &str, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut kept = Vec::new();
        let mut bytes = 0;
        let mut all_headers = true;
        for (n, v) in headers {
            bytes += n.len() + v.len();
            if bytes > MAX_KEPT_HEADER_BYTES {
                all_headers = false;
                break;
            }
            kept.push((n.to_string(), v.to_string()));
        }
        Self {
            method: method.into(),
            path: path.into(),
            headers: kept,
            all_headers,
        }
    }
}

/// A request still being answered (a streaming response, an upgraded connection),
/// re-judged as it was judged ([`http_request`]): why it must close.
pub fn recheck_request(
    view: &View,
    conn: StreamRequest<'_>,
    req: &JudgedRequest,
    now: i64,
) -> Option<CloseReason> {
    if let Err(s) = standing(view, conn.peer, now) {
        return s.close_reason();
    }
    // Headers that were too many to keep cannot be judged again by a header rule.
    let header_rules = view
        .policy
        .rules
        .iter()
        .any(|r| r.http.as_ref().is_some_and(|h| !h.headers.is_empty()));
    if !req.all_headers && header_rules {
        return Some(CloseReason::PolicyChanged);
    }
    let headers: Vec<(&str, &str)> = req
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let request = Request {
        method: &req.method,
        path: &req.path,
        headers: &headers,
    };
    http_request(view, conn, &request, now)
        .err()
        .map(|_| CloseReason::PolicyChanged)
}

/// Why a packet flow judged afresh (a live overlay flow re-checked with the same
/// function that let it in) must close, if it must.
pub fn flow_close_reason(r: Result<String, FlowDenied>) -> Option<CloseReason> {
    match r {
        Ok(_) => None,
        Err(FlowDenied::Standing(s)) => s.close_reason(),
        Err(FlowDenied::Policy(_)) => Some(CloseReason::PolicyChanged),
        Err(FlowDenied::Client(_)) => Some(CloseReason::ClientGone),
    }
}

/// A tunnel, re-checked: why it must close (the peer no longer stands).
pub fn recheck_tunnel(view: &View, peer: &PeerIdentity, now: i64) -> Option<CloseReason> {
    standing(view, peer, now)
        .err()
        .and_then(Standing::close_reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_protocol::cert::Serial;
    use quicmesh_protocol::ident::TrustDomain;
    use quicmesh_protocol::policy::Policy;
    use quicmesh_protocol::wire::PeerInfo;

    const NOW: i64 = 1_000_000;

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn node(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    fn id(name: &str, services: &[&str], serial: &str) -> PeerIdentity {
        PeerIdentity {
            trust_domain: TrustDomain::new("quicmesh.local").unwrap(),
            node: node(name),
            services: services.iter().map(|s| svc(s)).collect(),
            ips: vec![],
            serial: Serial::new(serial.as_bytes().to_vec()).unwrap(),
            not_before: NOW - 100,
            not_after: NOW + 100,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_pairs(pairs.iter().copied()).unwrap()
    }

    /// A view with peers `web-1` (labelled `env=prod`) and `db-1`, this node `env=prod`.
    fn view(policy: &str) -> View {
        let peer = |n: &str, s: &str| PeerInfo {
            node: node(n),
            endpoint: None,
            services: vec![svc(s)],
            labels: labels(&[("env", "prod")]),
            overlay: vec![],
            online: true,
            critical: vec![],
            candidates: vec![],
            relay: false,
            nat: false,
        };
        let mut v = View {
            version: 3,
            policy: Policy::parse(policy).unwrap(),
            labels: labels(&[("env", "prod")]),
            ..View::default()
        };
        for p in [peer("web-1", "web"), peer("db-1", "db")] {
            v.peers.insert(p.node.clone(), p);
        }
        v
    }

    const WEB_TO_DB: &str = r#"
default = "deny"
[[rule]]
from = "web"
to = "db"
action = "allow"
"#;

    fn req<'a>(
        peer: &'a PeerIdentity,
        src: &'a ServiceName,
        dst: &'a ServiceName,
    ) -> StreamRequest<'a> {
        StreamRequest {
            peer,
            src,
            dst,
            hosted: true,
            http: false,
        }
    }

    #[test]
    fn a_stream_is_allowed_by_its_rule_and_denied_without_one() {
        let v = view(WEB_TO_DB);
        let web = id("web-1", &["web"], "01");
        let (w, d, p) = (svc("web"), svc("db"), svc("payments"));
        assert_eq!(
            stream_ingress(&v, req(&web, &w, &d), NOW),
            Ok("rule[0]".into())
        );
        let denied = stream_ingress(&v, req(&web, &w, &p), NOW).unwrap_err();
        assert_eq!(denied.reason, RejectCode::PolicyDenied);
        assert_eq!(denied.rule.as_deref(), Some("default"));
    }

    /// A node carries L4 streams and packets as opaque bytes: a rule about HTTP requests
    /// cannot be checked on them, so a deny with HTTP conditions denies the whole stream
    /// or flow, and an allow with them allows none (fail closed).
    #[test]
    fn rules_about_requests_fail_closed_on_streams_and_packets() {
        let deny_admin = view(
            r#"
[[rule]]
from = "web"
to = "db"
action = "allow"
[[rule]]
from = "web"
to = "db"
action = "deny"
paths = ["/admin/*"]
"#,
        );
        let web = id("web-1", &["web"], "01");
        let (w, d) = (svc("web"), svc("db"));
        let e = stream_ingress(&deny_admin, req(&web, &w, &d), NOW).unwrap_err();
        assert_eq!(
            (e.reason, e.rule.as_deref()),
            (RejectCode::PolicyDenied, Some("rule[1]"))
        );
        assert_eq!(
            packet_flow(&deny_admin, &web, &web.services, &d, NOW),
            Err(FlowDenied::Policy("rule[1]".into()))
        );
        let allow_get = view(
            r#"
[[rule]]
from = "web"
to = "db"
action = "allow"
methods = ["GET"]
"#,
        );
        let e = stream_ingress(&allow_get, req(&web, &w, &d), NOW).unwrap_err();
        assert_eq!(e.rule.as_deref(), Some("default"));
        // Its allowed twin: the same rule without HTTP conditions.
        assert!(stream_ingress(&view(WEB_TO_DB), req(&web, &w, &d), NOW).is_ok());
    }

    #[test]
    fn a_stream_claiming_a_service_outside_the_certificate_is_refused_before_policy() {
        let v = view(WEB_TO_DB);
        let other = id("web-1", &["batch"], "01");
        let (w, d) = (svc("web"), svc("db"));
        let denied = stream_ingress(&v, req(&other, &w, &d), NOW).unwrap_err();
        assert_eq!(denied.reason, RejectCode::SourceNotInCertificate);
        let mut r = req(&other, &w, &d);
        r.hosted = false;
        assert_eq!(
            stream_ingress(&v, r, NOW).unwrap_err().reason,
            RejectCode::UnknownService
        );
    }

    #[test]
    fn revoked_unknown_and_expired_peers_are_refused_whatever_the_policy() {
        let mut v = view("default = \"allow\"");
        let web = id("web-1", &["web"], "01");
        let (w, d) = (svc("web"), svc("db"));
        assert!(stream_ingress(&v, req(&web, &w, &d), NOW).is_ok());
        // Expired: the same certificate one second after its end.
        let late = stream_ingress(&v, req(&web, &w, &d), web.not_after).unwrap_err();
        assert_eq!(late.reason, RejectCode::PeerExpired);
        // Unknown: a valid certificate for a node the view does not hold.
        let ghost = id("ghost-1", &["web"], "02");
        let e = stream_ingress(&v, req(&ghost, &w, &d), NOW).unwrap_err();
        assert_eq!(e.reason, RejectCode::PeerUnknown);
        // Revoked: the serial on the deny list (the node may even still be listed).
        v.revoked.insert(Serial::new(b"01".to_vec()).unwrap());
        let e = stream_ingress(&v, req(&web, &w, &d), NOW).unwrap_err();
        assert_eq!(e.reason, RejectCode::PeerRevoked);
        // No view yet: nothing is decided.
        let empty = View::default();
        let e = stream_ingress(&empty, req(&web, &w, &d), NOW).unwrap_err();
        assert_eq!(e.reason, RejectCode::NotReady);
    }

    #[test]
    fn tag_rules_see_the_right_side_labels() {
        // Deny from prod-labelled peers, allow the rest: web-1 is prod, so denied.
        let v = view(
            r#"
default = "allow"
[[rule]]
from = "tag:env=prod"
to = "db"
action = "deny"
"#,
        );
        let web = id("web-1", &["web"], "01");
        let (w, d) = (svc("web"), svc("db"));
        let e = stream_ingress(&v, req(&web, &w, &d), NOW).unwrap_err();
        assert_eq!(e.rule.as_deref(), Some("rule[0]"));
        // Egress from this node (also prod) to db-1 is denied by the same rule.
        assert_eq!(egress(&v, &w, &d, &node("db-1")), Err("rule[0]".into()));
        // Its twin: to a service the rule does not name.
        assert!(egress(&v, &w, &svc("cache"), &node("db-1")).is_ok());
    }

    #[test]
    fn packet_flows_need_one_allowed_service_and_a_standing_peer() {
        let mut v = view(WEB_TO_DB);
        let web = id("web-1", &["batch", "web"], "01");
        let d = svc("db");
        assert_eq!(
            packet_flow(&v, &web, &web.services, &d, NOW),
            Ok("rule[0]".into())
        );
        let batch_only: BTreeSet<_> = [svc("batch")].into();
        assert_eq!(
            packet_flow(&v, &web, &batch_only, &d, NOW),
            Err(FlowDenied::Policy("default".into()))
        );
        v.revoked.insert(Serial::new(b"01".to_vec()).unwrap());
        assert_eq!(
            packet_flow(&v, &web, &web.services, &d, NOW),
            Err(FlowDenied::Standing(Standing::PeerRevoked))
        );
    }

    #[test]
    fn a_recheck_is_the_first_decision_made_again() {
        let v = view(WEB_TO_DB);
        let web = id("web-1", &["web"], "01");
        let (w, d) = (svc("web"), svc("db"));
        let again =
            |v: &View, now| recheck_stream(v, Direction::Ingress, &web, &w, &d, false, false, now);
        assert_eq!(again(&v, NOW), None);
        // Policy changed: the same flow is no longer allowed.
        let closed = view("default = \"deny\"");
        assert_eq!(again(&closed, NOW), Some(CloseReason::PolicyChanged));
        // The certificate ran out.
        assert_eq!(again(&v, web.not_after + 1), Some(CloseReason::PeerExpired));
        // Revoked.
        let mut r = view(WEB_TO_DB);
        r.revoked.insert(Serial::new(b"01".to_vec()).unwrap());
        assert_eq!(again(&r, NOW), Some(CloseReason::PeerRevoked));
        // The peer left the mesh.
        let mut gone = view(WEB_TO_DB);
        gone.peers.remove(&node("web-1"));
        assert_eq!(again(&gone, NOW), Some(CloseReason::PeerUnknown));
        assert_eq!(
            recheck_tunnel(&gone, &web, NOW),
            Some(CloseReason::PeerUnknown)
        );
        assert_eq!(recheck_tunnel(&v, &web, NOW), None);
        // Egress: standing always, policy only when the node checks egress.
        let db = id("db-1", &["db"], "03");
        let eg =
            |v: &View, check| recheck_stream(v, Direction::Egress, &db, &w, &d, false, check, NOW);
        assert_eq!(eg(&closed, false), None);
        assert_eq!(eg(&closed, true), Some(CloseReason::PolicyChanged));
        assert_eq!(eg(&v, true), None);
        // No view is never a reason to close.
        assert_eq!(again(&View::default(), NOW), None);
    }

    const API: &str = r#"
default = "deny"
[[rule]]
from = "web"
to = "db"
action = "allow"
methods = ["GET"]
[[rule]]
from = "web"
to = "db"
action = "deny"
paths = ["/admin/*"]
headers = { x-tenant = "root" }
"#;

    fn get<'a>(path: &'a str, headers: &'a [(&'a str, &'a str)]) -> Request<'a> {
        Request {
            method: "GET",
            path,
            headers,
        }
    }

    #[test]
    fn an_http_connection_is_admitted_when_some_request_could_be_allowed() {
        let v = view(API);
        let web = id("web-1", &["web"], "01");
        let (w, d) = (svc("web"), svc("db"));
        let http = StreamRequest {
            http: true,
            ..req(&web, &w, &d)
        };
        assert_eq!(stream_ingress(&v, http, NOW), Ok("rule[0]".into()));
        // The same stream as opaque bytes: the allow about GETs cannot be checked.
        assert_eq!(
            stream_ingress(&v, req(&web, &w, &d), NOW).map_err(|d| d.reason),
            Err(RejectCode::PolicyDenied)
        );
        // Re-checked as what it is.
        let again = |http| recheck_stream(&v, Direction::Ingress, &web, &w, &d, http, false, NOW);
        assert_eq!(again(true), None);
        assert_eq!(again(false), Some(CloseReason::PolicyChanged));
    }

    #[test]
    fn each_request_is_judged_with_its_rule_and_its_denied_twin() {
        let v = view(API);
        let web = id("web-1", &["web"], "01");
        let (w, d) = (svc("web"), svc("db"));
        let conn = StreamRequest {
            http: true,
            ..req(&web, &w, &d)
        };
        let judge = |r: Request<'_>| http_request(&v, conn, &r, NOW);
        assert_eq!(judge(get("/x", &[])), Ok("rule[0]".into()));
        let post = Request {
            method: "POST",
            ..get("/x", &[])
        };
        assert_eq!(
            judge(post),
            Err(Denied {
                reason: RequestRefusal::PolicyDenied,
                rule: Some("default".into())
            })
        );
        assert_eq!(
            judge(get("/admin/x", &[("x-tenant", "user")])),
            Ok("rule[0]".into())
        );
        assert_eq!(
            judge(get("/admin/x", &[("X-Tenant", "root")])),
            Err(Denied {
                reason: RequestRefusal::PolicyDenied,
                rule: Some("rule[1]".into())
            })
        );
        // A matched header twice: which one the service reads is anyone's guess.
        assert_eq!(
            judge(get(
                "/admin/x",
                &[("x-tenant", "user"), ("x_tenant", "root")]
            ))
            .map_err(|d| d.reason),
            Err(RequestRefusal::RepeatedHeader)
        );
        // The peer's standing and certificate come first, as for a stream.
        let mut r = view(API);
        r.revoked.insert(Serial::new(b"01".to_vec()).unwrap());
        assert_eq!(
            http_request(&r, conn, &get("/x", &[]), NOW).map_err(|d| d.reason),
            Err(RequestRefusal::PeerNotStanding)
        );
        let other = svc("payments");
        let spoof = StreamRequest {
            src: &other,
            ..conn
        };
        assert_eq!(
            http_request(&v, spoof, &get("/x", &[]), NOW).map_err(|d| d.reason),
            Err(RequestRefusal::SourceNotInCertificate)
        );
        assert_eq!(
            http_request(&v, conn, &get("/x", &[]), web.not_after).map_err(|d| d.reason),
            Err(RequestRefusal::PeerNotStanding)
        );
    }
}
