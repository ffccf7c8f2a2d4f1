//! The node's DNS server for mesh names, on a loopback address (UDP and TCP).
//!
//! - `<service>.svc.<trust domain>`: A/AAAA with the upstream's local bind address when
//!   this node has an `[[upstream]]` for the service (L4), else the overlay addresses of the
//!   service's healthy instances, nearest locality first (overlay mode); SRV with the
//!   upstream's port.
//! - `<node>.node.<trust domain>`: the node's overlay addresses.
//! - Other names under the trust domain: NXDOMAIN. Names outside it are forwarded to
//!   `[dns] forward`, or refused: the mesh never answers for them.
//!
//! Answers are built from the applied view on every query, so they follow health within
//! one snapshot push; the TTL is short (`[dns] ttl`, default 5 s).
//!
//! Forwarding is bounded: at most [`MAX_FORWARDS`] forwarded queries in flight (a query
//! beyond is answered SERVFAIL at once) and [`MAX_TCP_CONNECTIONS`] TCP clients; every
//! query not served as asked is counted with a [`DnsDrop`] reason.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use quicmesh_protocol::ident::{NodeName, ServiceName};
use quicmesh_protocol::routing::{self, Candidate, Locality};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::DnsConfig;
use crate::state::{Node, View};

/// How long a forwarded query may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// Forwarded queries in flight at most (UDP and TCP together).
pub const MAX_FORWARDS: usize = 256;
/// TCP clients at most.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// How long a TCP client may take to send one whole query (or stay idle between two).
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::reason::DnsDrop;

/// Forwards queries for names outside the mesh to one resolver, at most `limit` at once.
#[derive(Debug, Clone)]
pub struct Forwarder {
    to: SocketAddr,
    slots: Arc<Semaphore>,
}

impl Forwarder {
    pub fn new(to: SocketAddr, limit: usize) -> Self {
        Self {
            to,
            slots: Arc::new(Semaphore::new(limit)),
        }
    }

    /// A slot for one forwarded query, or `None` while all are taken.
    fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }
}

/// The SERVFAIL answer to `query` (same id and question), or `None` when it is not a query.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(ResponseCode::ServFail);
    r.add_queries(q.queries().iter().cloned());
    r.to_vec().ok()
}

/// What the server knows besides the view.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub trust_domain: &'a str,
    pub me: &'a NodeName,
    pub my_overlay: &'a [IpAddr],
    /// (service, bound address) per upstream.
    pub upstreams: &'a [(ServiceName, SocketAddr)],
    /// Overlay mode runs: service names resolve to instances' overlay addresses.
    pub overlay: bool,
    pub ttl: u32,
    pub forwarding: bool,
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Not a mesh name: forward the query as it came.
    Forward,
    /// Not a DNS query at all: say nothing.
    Drop,
}

/// Answers one query from the view (pure: no IO).
pub fn answer(view: &View, cx: &Context, query: &[u8]) -> Reply {
    let Ok(q) = Message::from_vec(query) else {
        return Reply::Drop;
    };
    if q.message_type() != MessageType::Query {
        return Reply::Drop;
    }
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(cx.forwarding);
    let [question] = q.queries() else {
        r.set_response_code(ResponseCode::FormErr);
        return encode(r);
    };
    r.add_query(question.clone());
    if q.op_code() != OpCode::Query {
        r.set_response_code(ResponseCode::NotImp);
        return encode(r);
    }
    let qname = question.name().to_lowercase();
    let text = qname.to_ascii();
    let text = text.trim_end_matches('.');
    let Some(local) = text
        .strip_suffix(cx.trust_domain)
        .and_then(|l| l.strip_suffix('.'))
    else {
        if text == cx.trust_domain {
            r.set_authoritative(true);
            return encode(r);
        }
        if cx.forwarding {
            return Reply::Forward;
        }
        r.set_response_code(ResponseCode::Refused);
        return encode(r);
    };
    r.set_authoritative(true);
    let qtype = question.query_type();
    let found = if let Some(svc) = local.strip_suffix(".svc") {
        service_records(view, cx, svc, &qname, qtype)
    } else if let Some(node) = local.strip_suffix(".node") {
        node_records(view, cx, node, &qname, qtype)
    } else {
        None
    };
    match found {
        None => {
            r.set_response_code(ResponseCode::NXDomain);
        }
        Some(records) => {
            r.add_answers(records);
        }
    }
    encode(r)
}

fn encode(m: Message) -> Reply {
    match m.to_vec() {
        Ok(b) => Reply::Answer(b),
        Err(_) => Reply::Drop,
    }
}

fn address_records(name: &Name, ttl: u32, qtype: RecordType, ips: &[IpAddr]) -> Vec<Record> {
    ips.iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
                Some(Record::from_rdata(name.clone(), ttl, RData::A(A(*v4))))
            }
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(Record::from_rdata(
                name.clone(),
                ttl,
                RData::AAAA(AAAA(*v6)),
            )),
            _ => None,
        })
        .collect()
}

/// Records for `<svc>.svc.<td>`; `None` when the name does not exist.
fn service_records(
    view: &View,
    cx: &Context,
    svc: &str,
    qname: &Name,
    qtype: RecordType,
) -> Option<Vec<Record>> {
    let service = ServiceName::new(svc).ok()?;
    let bound = cx.upstreams.iter().find(|(s, _)| *s == service);
    let hosted_here = view.by_service.contains_key(&service);
    if bound.is_none() && !hosted_here {
        return None;
    }
    if let Some((_, addr)) = bound {
        // The local listener answers only while an instance can serve it.
        if view.healthy(&service).next().is_none() {
            return Some(Vec::new());
        }
        if qtype == RecordType::SRV {
            return Some(vec![Record::from_rdata(
                qname.clone(),
                cx.ttl,
                RData::SRV(SRV::new(1, 1, addr.port(), qname.clone())),
            )]);
        }
        return Some(address_records(qname, cx.ttl, qtype, &[addr.ip()]));
    }
    if !cx.overlay {
        return Some(Vec::new());
    }
    // Overlay: the healthy instances' addresses, nearest first, shuffled within a locality.
    let candidates: Vec<Candidate> = view
        .healthy(&service)
        .map(|p| Candidate {
            node: &p.node,
            labels: &p.labels,
            outstanding: 0,
        })
        .collect();
    let draw = rand::random::<u64>();
    let ips: Vec<IpAddr> = routing::order(
        &view.labels,
        &candidates,
        Locality::Prefer,
        (draw, draw >> 32),
    )
    .into_iter()
    .filter_map(|n| view.peers.get(n))
    .flat_map(|p| p.overlay.iter().copied())
    .collect();
    Some(address_records(qname, cx.ttl, qtype, &ips))
}

/// Records for `<node>.node.<td>`; `None` when no such node.
fn node_records(
    view: &View,
    cx: &Context,
    node: &str,
    qname: &Name,
    qtype: RecordType,
) -> Option<Vec<Record>> {
    let name = NodeName::new(node).ok()?;
    let ips: &[IpAddr] = if &name == cx.me {
        cx.my_overlay
    } else {
        &view.peers.get(&name)?.overlay
    };
    Some(address_records(qname, cx.ttl, qtype, ips))
}

/// Binds the DNS listeners (UDP and TCP on the same address).
pub async fn bind(cfg: &DnsConfig) -> std::io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(cfg.listen).await?;
    let tcp = TcpListener::bind(udp.local_addr()?).await?;
    Ok((udp, tcp))
}

/// `for_clients`: the asker is a WireGuard client, which reaches services only through
/// the overlay (never this node's local upstream listeners).
fn reply_for(node: &Node, query: &[u8], for_clients: bool) -> Reply {
    let Some(cfg) = node.cfg.dns.as_ref() else {
        return Reply::Drop;
    };
    let view = node.view();
    let td = node.trust.load().trust_domain.to_string();
    let upstreams = if for_clients {
        Vec::new()
    } else {
        node.bound
            .lock()
            .map(|b| b.upstreams.clone())
            .unwrap_or_default()
    };
    let id = node.identity.load();
    let cx = Context {
        trust_domain: &td,
        me: &node.cfg.name,
        my_overlay: &id.ips,
        upstreams: &upstreams,
        overlay: for_clients || node.overlay.get().is_some(),
        ttl: u32::try_from(cfg.ttl.as_secs()).unwrap_or(u32::MAX),
        forwarding: cfg.forward.is_some(),
    };
    answer(&view, &cx, query)
}

async fn forward(to: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = UdpSocket::bind(bind).await.ok()?;
    s.connect(to).await.ok()?;
    s.send(query).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(FORWARD_TIMEOUT, s.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Serves DNS over UDP and TCP until the node stops.
pub async fn serve(node: Arc<Node>, udp: UdpSocket, tcp: TcpListener) {
    let forwarder = forwarder(&node, MAX_FORWARDS);
    let dropped = counted(&node);
    let n = node.clone();
    tokio::spawn(serve_tcp_listener(
        tcp,
        forwarder.clone(),
        Arc::new(move |q: &[u8]| reply_for(&n, q, false)),
        dropped.clone(),
        MAX_TCP_CONNECTIONS,
    ));
    serve_udp(
        Arc::new(udp),
        forwarder,
        move |q: &[u8]| reply_for(&node, q, false),
        dropped,
    )
    .await
}

/// The forwarder to `[dns] forward`, at most `limit` queries in flight; none without it.
fn forwarder(node: &Node, limit: usize) -> Option<Forwarder> {
    node.cfg
        .dns
        .as_ref()
        .and_then(|d| d.forward)
        .map(|to| Forwarder::new(to, limit))
}

/// Counts a query not served as asked in the node's metrics.
fn counted(node: &Node) -> Arc<dyn Fn(DnsDrop) + Send + Sync> {
    let m = node.metrics.clone();
    Arc::new(move |d: DnsDrop| m.dns_dropped(d))
}

/// Forwarded queries in flight for a WireGuard gateway's clients, on their own bound (the
/// node's own apps keep [`MAX_FORWARDS`] whatever the clients ask).
pub const MAX_CLIENT_FORWARDS: usize = 64;

/// Serves DNS over UDP on one more socket (a WireGuard gateway's overlay address, for
/// its clients), with the same answers as the node's own server and forwarding on a
/// bound of its own ([`MAX_CLIENT_FORWARDS`]).
pub async fn serve_udp_for_clients(node: Arc<Node>, udp: UdpSocket) {
    let forwarder = forwarder(&node, MAX_CLIENT_FORWARDS);
    let dropped = counted(&node);
    serve_udp(
        Arc::new(udp),
        forwarder,
        move |q: &[u8]| reply_for(&node, q, true),
        dropped,
    )
    .await
}

/// Answers what the mesh knows, forwards the rest within the forwarder's bound.
async fn serve_udp(
    udp: Arc<UdpSocket>,
    forwarder: Option<Forwarder>,
    reply: impl Fn(&[u8]) -> Reply,
    dropped: Arc<dyn Fn(DnsDrop) + Send + Sync>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, from) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "dns receive");
                continue;
            }
        };
        let query = &buf[..len];
        match reply(query) {
            Reply::Answer(b) => {
                let _ = udp.send_to(&b, from).await;
            }
            Reply::Forward => {
                let Some(f) = forwarder.as_ref() else {
                    continue;
                };
                let Some(slot) = f.slot() else {
                    dropped(DnsDrop::ForwardBusy);
                    if let Some(b) = servfail(query) {
                        let _ = udp.send_to(&b, from).await;
                    }
                    continue;
                };
                let (udp, query, to, dropped) =
                    (udp.clone(), query.to_vec(), f.to, dropped.clone());
                tokio::spawn(async move {
                    match forward(to, &query).await {
                        Some(b) => {
                            let _ = udp.send_to(&b, from).await;
                        }
                        None => dropped(DnsDrop::ForwardFailed),
                    }
                    drop(slot);
                });
            }
            Reply::Drop => {}
        }
    }
}

type ReplyFn = Arc<dyn Fn(&[u8]) -> Reply + Send + Sync>;

/// Accepts TCP clients, at most `max` at once (a client beyond is closed and counted).
async fn serve_tcp_listener(
    tcp: TcpListener,
    forwarder: Option<Forwarder>,
    reply: ReplyFn,
    dropped: Arc<dyn Fn(DnsDrop) + Send + Sync>,
    max: usize,
) {
    let clients = Arc::new(Semaphore::new(max));
    loop {
        let Ok((s, _)) = tcp.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            dropped(DnsDrop::TcpLimit);
            continue;
        };
        let (f, r, d) = (forwarder.clone(), reply.clone(), dropped.clone());
        tokio::spawn(async move {
            serve_tcp(s, f, r, d).await;
            drop(permit);
        });
    }
}

async fn serve_tcp(
    mut s: tokio::net::TcpStream,
    forwarder: Option<Forwarder>,
    reply: ReplyFn,
    dropped: Arc<dyn Fn(DnsDrop) + Send + Sync>,
) {
    loop {
        let read = async {
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await?;
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut q).await?;
            Ok::<_, std::io::Error>(q)
        };
        let Ok(Ok(q)) = tokio::time::timeout(TCP_READ_TIMEOUT, read).await else {
            return;
        };
        let b = match reply(&q) {
            Reply::Answer(b) => b,
            Reply::Forward => {
                let Some(f) = forwarder.as_ref() else {
                    return;
                };
                match f.slot() {
                    Some(slot) => {
                        let a = forward(f.to, &q).await;
                        drop(slot);
                        match a {
                            Some(b) => b,
                            None => {
                                dropped(DnsDrop::ForwardFailed);
                                return;
                            }
                        }
                    }
                    None => {
                        dropped(DnsDrop::ForwardBusy);
                        match servfail(&q) {
                            Some(b) => b,
                            None => return,
                        }
                    }
                }
            }
            Reply::Drop => return,
        };
        let Ok(l) = u16::try_from(b.len()) else {
            return;
        };
        if s.write_all(&l.to_be_bytes()).await.is_err() || s.write_all(&b).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use quicmesh_protocol::wire::PeerInfo;
    use quicmesh_protocol::Labels;
    use std::collections::HashMap;

    fn peer(name: &str, dc: &str, ip: [u8; 4], critical: bool) -> PeerInfo {
        let api = ServiceName::new("api").unwrap();
        PeerInfo {
            node: NodeName::new(name).unwrap(),
            endpoint: None,
            services: vec![api.clone()],
            labels: Labels::from_pairs([("datacenter", dc)]).unwrap(),
            overlay: vec![IpAddr::from(ip)],
            online: true,
            critical: if critical { vec![api] } else { vec![] },
            candidates: vec![],
            relay: false,
            nat: false,
        }
    }

    fn view(peers: Vec<PeerInfo>) -> View {
        let mut by_service: HashMap<ServiceName, Vec<NodeName>> = HashMap::new();
        for p in &peers {
            for s in &p.services {
                by_service
                    .entry(s.clone())
                    .or_default()
                    .push(p.node.clone());
            }
        }
        View {
            labels: Labels::from_pairs([("datacenter", "dc1")]).unwrap(),
            peers: peers.into_iter().map(|p| (p.node.clone(), p)).collect(),
            by_service,
            ..View::default()
        }
    }

    fn ask(view: &View, cx: &Context, name: &str, t: RecordType) -> Option<Message> {
        let mut q = Message::new();
        q.set_id(7)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        match answer(view, cx, &q.to_vec().unwrap()) {
            Reply::Answer(b) => Some(Message::from_vec(&b).unwrap()),
            _ => None,
        }
    }

    fn ips(m: &Message) -> Vec<String> {
        m.answers().iter().map(|r| r.data().to_string()).collect()
    }

    #[test]
    fn services_answer_healthy_instances_nearest_first_and_nodes_their_addresses() {
        let me = NodeName::new("client").unwrap();
        let v = view(vec![
            peer("a", "dc2", [100, 64, 0, 2], false),
            peer("b", "dc1", [100, 64, 0, 3], false),
            peer("c", "dc1", [100, 64, 0, 4], true),
        ]);
        let mine = [IpAddr::from([100, 64, 0, 1])];
        let cx = Context {
            trust_domain: "mesh.test",
            me: &me,
            my_overlay: &mine,
            upstreams: &[],
            overlay: true,
            ttl: 5,
            forwarding: false,
        };
        let m = ask(&v, &cx, "api.svc.mesh.test.", RecordType::A).unwrap();
        assert_eq!(
            ips(&m),
            vec!["100.64.0.3", "100.64.0.2"],
            "dc1 first; c is critical"
        );
        assert!(m.authoritative());
        assert_eq!(m.answers()[0].ttl(), 5);
        let m = ask(&v, &cx, "A.Node.Mesh.Test", RecordType::A).unwrap();
        assert_eq!(ips(&m), vec!["100.64.0.2"], "case-insensitive");
        let m = ask(&v, &cx, "client.node.mesh.test", RecordType::A).unwrap();
        assert_eq!(ips(&m), vec!["100.64.0.1"], "the node itself");
        // Denied twins: unknown names in the mesh are NXDOMAIN; outside it REFUSED.
        let m = ask(&v, &cx, "nope.svc.mesh.test", RecordType::A).unwrap();
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        let m = ask(&v, &cx, "x.node.mesh.test", RecordType::A).unwrap();
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        let m = ask(&v, &cx, "example.org", RecordType::A).unwrap();
        assert_eq!(m.response_code(), ResponseCode::Refused);
        assert!(m.answers().is_empty());
        let fwd = Context {
            forwarding: true,
            ..cx
        };
        let mut q = Message::new();
        q.add_query(Query::query(
            Name::from_ascii("example.org.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(answer(&v, &fwd, &q.to_vec().unwrap()), Reply::Forward);
        assert_eq!(answer(&v, &fwd, b"\x01\x02garbage"), Reply::Drop);
    }

    #[test]
    fn l4_upstreams_answer_their_bind_address_and_port() {
        let me = NodeName::new("client").unwrap();
        let v = view(vec![peer("a", "dc2", [100, 64, 0, 2], false)]);
        let ups = [(
            ServiceName::new("api").unwrap(),
            "127.0.0.1:15000".parse().unwrap(),
        )];
        let cx = Context {
            trust_domain: "mesh.test",
            me: &me,
            my_overlay: &[],
            upstreams: &ups,
            overlay: false,
            ttl: 5,
            forwarding: false,
        };
        let m = ask(&v, &cx, "api.svc.mesh.test", RecordType::A).unwrap();
        assert_eq!(ips(&m), vec!["127.0.0.1"]);
        let m = ask(&v, &cx, "api.svc.mesh.test", RecordType::SRV).unwrap();
        match m.answers()[0].data() {
            RData::SRV(s) => assert_eq!(s.port(), 15000),
            other => panic!("not SRV: {other:?}"),
        }
        let m = ask(&v, &cx, "api.svc.mesh.test", RecordType::AAAA).unwrap();
        assert!(m.answers().is_empty() && m.response_code() == ResponseCode::NoError);
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = Message::new();
        q.set_id(id)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        q.to_vec().unwrap()
    }

    /// Forwarded queries in flight are bounded: beyond the bound a query is answered
    /// SERVFAIL at once and counted; once the resolver answers, slots free and queries
    /// are forwarded again.
    #[tokio::test]
    async fn forwarded_queries_in_flight_are_bounded() {
        use std::sync::atomic::{AtomicU64, Ordering};
        // A resolver that holds every query until told to answer.
        let resolver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let server_addr = server.local_addr().unwrap();
        let busy = Arc::new(AtomicU64::new(0));
        let b = busy.clone();
        let dropped: Arc<dyn Fn(DnsDrop) + Send + Sync> = Arc::new(move |d| {
            if d == DnsDrop::ForwardBusy {
                b.fetch_add(1, Ordering::Relaxed);
            }
        });
        let f = Forwarder::new(resolver.local_addr().unwrap(), 3);
        tokio::spawn(serve_udp(
            server,
            Some(f),
            |_: &[u8]| Reply::Forward,
            dropped,
        ));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        async fn recv(s: &UdpSocket) -> (Message, SocketAddr) {
            let mut buf = vec![0u8; 4096];
            let (n, from) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            (Message::from_vec(&buf[..n]).unwrap(), from)
        }
        let mut held = Vec::new();
        for id in 1..=3 {
            client
                .send_to(&query(id, "example.org."), server_addr)
                .await
                .unwrap();
            held.push(recv(&resolver).await);
        }
        // Three in flight: the next two are answered SERVFAIL without reaching the resolver.
        for id in 4..=5 {
            client
                .send_to(&query(id, "example.org."), server_addr)
                .await
                .unwrap();
            let (m, _) = recv(&client).await;
            assert_eq!((m.id(), m.response_code()), (id, ResponseCode::ServFail));
            assert_eq!(m.queries().len(), 1);
        }
        assert_eq!(busy.load(Ordering::Relaxed), 2);
        // The resolver answers the three: the client gets them, the slots free.
        for (q, from) in held {
            let mut r = q.clone();
            r.set_message_type(MessageType::Response);
            resolver.send_to(&r.to_vec().unwrap(), from).await.unwrap();
            let (m, _) = recv(&client).await;
            assert_eq!((m.id(), m.response_code()), (q.id(), ResponseCode::NoError));
        }
        // Its twin: with slots free a query is forwarded again.
        let mut forwarded = false;
        for id in 6..20 {
            client
                .send_to(&query(id, "example.org."), server_addr)
                .await
                .unwrap();
            let (mut buf, mut other) = ([0u8; 512], [0u8; 512]);
            tokio::select! {
                r = resolver.recv_from(&mut buf) => {
                    assert_eq!(Message::from_vec(&buf[..r.unwrap().0]).unwrap().id(), id);
                    forwarded = true;
                    break;
                }
                // A slot is released just after its answer is sent: retry.
                _ = client.recv_from(&mut other) => {}
            }
        }
        assert!(forwarded, "a query is forwarded once slots free");
        assert!(busy.load(Ordering::Relaxed) < 20);
    }

    #[test]
    fn servfail_keeps_the_id_and_question() {
        let m = Message::from_vec(&servfail(&query(42, "example.org.")).unwrap()).unwrap();
        assert_eq!(m.id(), 42);
        assert_eq!(m.response_code(), ResponseCode::ServFail);
        assert_eq!(m.message_type(), MessageType::Response);
        assert_eq!(m.queries()[0].name().to_ascii(), "example.org.");
        assert_eq!(servfail(b"junk"), None);
    }
}
