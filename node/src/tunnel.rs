//! Peer tunnels: one QUIC endpoint for both directions, one connection per peer (opened on
//! first use, reused by every flow), and tunnel ingress — identity and policy checked on
//! every stream before the local service is dialled.

use std::sync::Arc;
use std::time::Duration;

use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::http_wire::Opening;
use quicmesh_protocol::ident::NodeName;
use quicmesh_protocol::path::PeerId;
use quicmesh_protocol::wire::{PeerInfo, RejectCode, StreamReply};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::config::Protocol;
use crate::flow::{pump, Direction, FlowEnd, FlowInfo};
use crate::frame::{read_opening, write_frame};
use crate::reason::{CloseReason, HandshakeRefusal};
use crate::state::{Node, View};
use crate::tls::{self, MeshServerVerifier, ServerExpect};
use crate::{authz, clock, l7};

/// How long a peer has to send a stream header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the ingress waits for the local service to accept.
const SERVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors opening a tunnel to a peer.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("peer {0} has no known endpoint")]
    NoEndpoint(NodeName),
    #[error("connecting to {peer}: {reason}")]
    Connect { peer: NodeName, reason: String },
}

/// The client config used to dial peers (our certificate, peers checked against the mesh).
pub fn peer_client_config(node: &Arc<Node>) -> Result<quinn::ClientConfig, tls::TlsError> {
    let metrics = node.metrics.clone();
    let verifier = MeshServerVerifier::new(
        Some(node.trust.clone()),
        ServerExpect::Node,
        Arc::new(move |r| metrics.handshake_refused(r)),
    );
    tls::client_config(
        Some(node.cert.clone()),
        verifier,
        quicmesh_protocol::wire::ALPN_TUNNEL,
        node.cfg.key_exchange,
    )
}

/// Returns the live tunnel to `peer`, dialling it if there is none.
pub async fn connection(
    node: &Arc<Node>,
    peer: &PeerInfo,
) -> Result<(quinn::Connection, bool), DialError> {
    if let Some(c) = node.live_tunnel(&peer.node) {
        return Ok((c, false));
    }
    // One dial per peer: the flows that arrive meanwhile use the tunnel it brings up.
    let _turn = node.dial_turn(&peer.node).await;
    if let Some(c) = node.live_tunnel(&peer.node) {
        return Ok((c, false));
    }
    let targets = targets(peer);
    if targets.is_empty() {
        return Err(DialError::NoEndpoint(peer.node.clone()));
    }
    // When the handshake is not done quickly, ask the peer (through the coordinator) to
    // dial back: behind NATs, each side's outgoing packets open the mapping the other
    // side's packets come in by. Reachable peers answer first and are not asked.
    // A peer behind a NAT is asked at once, and its dial-back goes first: this side's
    // packets reaching the peer's NAT before the peer's own left would, at a NAT that
    // takes unsolicited packets for itself (Linux's default), hold the very tuple the
    // peer's mapping needs (and Linux then maps the peer's socket to another port for
    // every destination after). Small-TTL openers open this side's NAT, when there is
    // one, for the dial-back without reaching the peer's; a dialer with no NAT sends
    // none (its opener would reach a NAT one router away).
    let dial = async {
        if peer.nat {
            if node.paths.behind_nat() {
                let sent = node.paths.send_openers(&targets);
                node.paths.metrics.openers_sent.inc_by(sent as u64);
            }
            node.request_punch(&peer.node);
            if let Some(c) = wait_tunnel(node, &peer.node, DIAL_BACK_LEAD).await {
                tracing::debug!(peer = %peer.node, addr = %c.remote_address(), "the peer's dial-back came through");
                return Ok((c, false));
            }
            return dial_any(node, &peer.node, &targets).await;
        }
        let dial = dial_any(node, &peer.node, &targets);
        tokio::pin!(dial);
        tokio::select! {
            r = &mut dial => r,
            _ = tokio::time::sleep(PUNCH_AFTER) => {
                node.request_punch(&peer.node);
                dial.await
            }
        }
    };
    // Traffic starts on whatever path works first: a relay joins the race after
    // RELAY_AFTER; the path manager moves the tunnel to a direct path when one answers.
    let relayed = dial_relay(node, peer);
    tokio::pin!(dial, relayed);
    let (conn, dialled) = tokio::select! {
        r = &mut dial => match r {
            Ok(c) => c,
            Err(direct) => relayed.await.map_err(|e| DialError::Connect {
                peer: peer.node.clone(),
                reason: format!("{direct}; {e}"),
            })?,
        },
        r = &mut relayed => match r {
            Ok(c) => c,
            Err(_) => dial.await?,
        },
    };
    if !dialled {
        return Ok((conn, true));
    }
    let addr = conn.remote_address();
    tracing::info!(peer = %peer.node, %addr, "tunnel up (dialled)");
    let Some(id) = admit(node, &conn) else {
        return Err(DialError::Connect {
            peer: peer.node.clone(),
            reason: "the peer's certificate does not stand".into(),
        });
    };
    node.keep_tunnel(&peer.node, &conn, true);
    // Streams the peer opens on a connection we dialled are served like any other.
    let n = node.clone();
    let c = conn.clone();
    tokio::spawn(async move { serve_connection(n, c, id).await });
    Ok((conn, true))
}

/// Where to dial a peer: its candidates, else its endpoint.
fn targets(peer: &PeerInfo) -> Vec<std::net::SocketAddr> {
    let mut t = peer.candidates.clone();
    if let Some(e) = peer.endpoint {
        if !t.contains(&e) {
            t.push(e);
        }
    }
    t
}

/// A direct dial still without a handshake after this is raced by a relayed one.
const RELAY_AFTER: Duration = Duration::from_secs(1);
/// How long a relayed dial waits for a relay to answer pings.
const RELAY_WAIT: Duration = Duration::from_secs(5);

/// Dials `peer` through the nearest live relay (after [`RELAY_AFTER`]).
async fn dial_relay(
    node: &Arc<Node>,
    peer: &PeerInfo,
) -> Result<(quinn::Connection, bool), DialError> {
    let err = |reason: String| DialError::Connect {
        peer: peer.node.clone(),
        reason,
    };
    if peer.relay {
        // Relays are reached directly (they are reachable by definition).
        return Err(err("a relay is not reached through a relay".into()));
    }
    tokio::time::sleep(RELAY_AFTER).await;
    let deadline = tokio::time::Instant::now() + RELAY_WAIT;
    let (name, relay) = loop {
        let live = node.paths.live_relays();
        if let Some(r) = live.iter().find(|(n, _)| !n.is(&peer.node)) {
            break r.clone();
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(err("no relay answers".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let to = PeerId::of(&peer.node);
    let visible = node.paths.synth_for(to);
    node.paths
        .set_route(visible, crate::path::Route::Relay { relay, to });
    tracing::debug!(peer = %peer.node, relay = %name, "dialling through a relay");
    let cfg = peer_client_config(node).map_err(|e| err(e.to_string()))?;
    let conn = node
        .endpoint
        .connect_with(cfg, visible, peer.node.as_str())
        .map_err(|e| err(format!("via relay {name}: {e}")))?;
    match tokio::time::timeout(DIAL_TIMEOUT, conn).await {
        Ok(Ok(c)) => Ok((c, true)),
        Ok(Err(e)) => Err(err(format!("via relay {name}: {e}"))),
        Err(_) => Err(err(format!(
            "via relay {name}: no handshake within {DIAL_TIMEOUT:?}"
        ))),
    }
}

/// A dial still without a handshake after this asks the peer to dial back.
const PUNCH_AFTER: Duration = Duration::from_millis(250);
/// How long a dialer gives a peer behind a NAT to dial back before it sends its own
/// handshake at full TTL.
const DIAL_BACK_LEAD: Duration = Duration::from_secs(1);

/// The tunnel to `peer` once one is up (its dial-back), or `None` after `within`.
async fn wait_tunnel(node: &Node, peer: &NodeName, within: Duration) -> Option<quinn::Connection> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(c) = node.live_tunnel(peer) {
            return Some(c);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
/// Gap between starting handshakes to successive candidates.
const CANDIDATE_STAGGER: Duration = Duration::from_millis(150);
/// How long a dial to all candidates may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Dials every address (the first at once, the next ones staggered) and returns the first
/// connection whose handshake completes, the others abandoned; `false` with it when the
/// peer's own dial to us came through first (that connection is already served).
async fn dial_any(
    node: &Arc<Node>,
    peer: &NodeName,
    addrs: &[std::net::SocketAddr],
) -> Result<(quinn::Connection, bool), DialError> {
    let err = |reason: String| DialError::Connect {
        peer: peer.clone(),
        reason,
    };
    let cfg = peer_client_config(node).map_err(|e| err(e.to_string()))?;
    let mut attempts = tokio::task::JoinSet::new();
    for (i, addr) in addrs.iter().copied().enumerate() {
        let (endpoint, cfg, name) = (node.endpoint.clone(), cfg.clone(), peer.to_string());
        // The handshake starts after the sleep: quinn sends a connection's Initial as soon
        // as it is created.
        attempts.spawn(async move {
            // Not even a zero sleep for the first: tokio rounds a timer up to its next
            // millisecond tick, which was a third of a first flow's time on a LAN.
            if i > 0 {
                tokio::time::sleep(CANDIDATE_STAGGER * i as u32).await;
            }
            let r = match endpoint.connect_with(cfg, addr, &name) {
                Ok(c) => c.await.map_err(|e| format!("{addr}: {e}")),
                Err(e) => Err(format!("{addr}: {e}")),
            };
            (addr, r)
        });
    }
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + DIAL_TIMEOUT;
    let mut look = tokio::time::interval(Duration::from_millis(50));
    loop {
        // The peer dialling us back (hole punching) may come through before our own
        // handshake does: that tunnel is as good.
        let next = tokio::select! {
            n = tokio::time::timeout_at(deadline, attempts.join_next()) => n,
            _ = look.tick() => {
                if let Some(c) = node.live_tunnel(peer) {
                    tracing::debug!(%peer, addr = %c.remote_address(), "peer's dial came through first");
                    return Ok((c, false));
                }
                continue;
            }
        };
        match next {
            Ok(Some(Ok((addr, Ok(conn))))) => {
                tracing::debug!(%peer, %addr, tried = addrs.len(), "candidate won");
                node.tunnels.set_tried(peer, addrs.to_vec());
                return Ok((conn, true));
            }
            Ok(Some(Ok((_, Err(e))))) => errors.push(e),
            Ok(Some(Err(e))) => errors.push(e.to_string()),
            Ok(None) => return Err(err(errors.join("; "))),
            Err(_) => {
                errors.push(format!("no handshake within {DIAL_TIMEOUT:?}"));
                return Err(err(errors.join("; ")));
            }
        }
    }
}

/// Dials `peer` back at `candidates` (it asked through the coordinator, hole punching);
/// a tunnel that comes up is kept like any other.
pub async fn dial_back(node: Arc<Node>, peer: NodeName, candidates: Vec<std::net::SocketAddr>) {
    if node.live_tunnel(&peer).is_some() || candidates.is_empty() {
        return;
    }
    match dial_any(&node, &peer, &candidates).await {
        Ok((_, false)) => {}
        Ok((conn, true)) => {
            tracing::info!(%peer, addr = %conn.remote_address(), "tunnel up (dialled back)");
            // When the peer's own dial came through meanwhile, that tunnel stays the one
            // this node uses; this one is still served, because the peer may have picked it
            // (closing it could break a flow the peer just opened on it).
            let Some(id) = admit(&node, &conn) else {
                return;
            };
            node.keep_tunnel(&peer, &conn, false);
            serve_connection(node, conn, id).await;
        }
        Err(e) => tracing::debug!(%peer, error = %e, "dial back failed"),
    }
}

/// Drops a cached tunnel that turned out dead (e.g. the peer restarted), so the next
/// flow dials afresh instead of waiting for the idle timeout.
pub fn forget(node: &Node, peer: &NodeName, conn: &quinn::Connection) {
    node.tunnels.forget(peer, conn);
    node.metrics.set_peers_connected(node.tunnels.connected());
}

/// The identity of a tunnel whose handshake completed, registered with the tunnel
/// registry and checked against the current view; `None` (the tunnel closed, the reason
/// counted) when it carries no identity or its peer does not stand. Registering first and
/// checking after closes the race with a revocation applied meanwhile: either this check
/// sees the new view, or the re-check that follows it sees this tunnel.
fn admit(node: &Arc<Node>, conn: &quinn::Connection) -> Option<Arc<PeerIdentity>> {
    let td = node.trust.load().trust_domain.clone();
    let Some(id) = tls::peer_leaf(conn).and_then(|d| PeerIdentity::from_der(&d, &td).ok()) else {
        node.metrics.handshake_refused(HandshakeRefusal::NoIdentity);
        conn.close(quinn::VarInt::from_u32(1), b"no identity");
        return None;
    };
    let id = Arc::new(id);
    node.metrics
        .handshake_completed("tunnel", tls::negotiated(conn));
    if let Some(old) = node.tunnels.register(id.clone(), conn) {
        tracing::info!(peer = %old.peer.node, "too many tunnels from one peer: closed the oldest");
        node.metrics.tunnel_closed(CloseReason::TooManyTunnels);
    }
    match authz::recheck_tunnel(&node.view(), &id, clock::unix_now()) {
        // Not in the view yet: the peer may have enrolled a moment ago (the registry's
        // re-check closes it if it stays unknown).
        None | Some(CloseReason::PeerUnknown) => Some(id),
        Some(reason) => {
            node.tunnels
                .close_where(|t| (t.conn.stable_id() == conn.stable_id()).then_some(reason));
            node.metrics.tunnel_closed(reason);
            tracing::info!(peer = %id.node, %reason, "tunnel refused");
            None
        }
    }
}

/// Accepts peer tunnels until the endpoint closes.
pub async fn accept_loop(node: Arc<Node>) {
    while let Some(incoming) = node.endpoint.accept().await {
        let node = node.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    // Certificate refusals were counted by the verifier with their reason.
                    tracing::info!(%remote, error = %e, "tunnel handshake refused");
                    return;
                }
            };
            // Through a relay, the relay named the sender: the certificate must agree.
            if crate::path::Paths::is_synth(&remote) {
                let td = node.trust.load().trust_domain.clone();
                let named = tls::peer_leaf(&conn)
                    .and_then(|d| PeerIdentity::from_der(&d, &td).ok())
                    .map(|id| PeerId::of(&id.node));
                if named.is_none() || node.paths.synth_peer(&remote) != named {
                    node.metrics
                        .handshake_refused(HandshakeRefusal::RelaySenderMismatch);
                    conn.close(quinn::VarInt::from_u32(1), b"relay sender mismatch");
                    return;
                }
            }
            let Some(id) = admit(&node, &conn) else {
                return;
            };
            tracing::info!(peer = %id.node, %remote, "tunnel up (accepted)");
            node.keep_tunnel(&id.node, &conn, false);
            serve_connection(node, conn, id).await;
        });
    }
}

/// Serves the streams a peer opens on `conn` (registered by [`admit`]) until it closes.
/// Its datagrams are the overlay's (which follows the registry's tunnel-up events), or,
/// without an overlay, only the path layer's nudges, read and dropped here.
async fn serve_connection(node: Arc<Node>, conn: quinn::Connection, id: Arc<PeerIdentity>) {
    if node.cfg.overlay.is_none() {
        let c = conn.clone();
        tokio::spawn(async move { while c.read_datagram().await.is_ok() {} });
    }
    let span = tracing::info_span!("tunnel", peer = %id.node);
    // The peer's streams in use, and the limit it was given (raised as they are used).
    let streams = Arc::new(StreamCount::default());
    let mut limit = tls::STREAMS_INITIAL;
    async {
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let in_use = streams.opened(conn.rtt());
                    let raised = tls::stream_limit(limit, in_use);
                    if raised != limit {
                        limit = raised;
                        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(limit));
                        tracing::debug!(in_use, limit, "stream limit raised");
                    }
                    let node = node.clone();
                    let id = id.clone();
                    let done = OpenStream(streams.clone());
                    tokio::spawn(async move {
                        ingress_stream(node, id, send, recv).await;
                        drop(done);
                    });
                }
                Err(e) => {
                    tracing::info!(reason = %e, "tunnel closed");
                    break;
                }
            }
        }
    }
    .instrument(span)
    .await;
    node.tunnels.unregister(&conn);
    node.metrics.set_peers_connected(node.tunnels.connected());
}

/// A tunnel's streams from its peer that count against the limit it was given: those
/// being served, and those served until a moment ago (quinn frees a stream only once the
/// peer has acknowledged its end, a round trip and an ACK delay after the serving ends).
#[derive(Default)]
struct StreamCount {
    open: std::sync::atomic::AtomicUsize,
    /// When recently served streams ended (at most [`tls::STREAMS_MAX`] kept).
    ended: std::sync::Mutex<std::collections::VecDeque<std::time::Instant>>,
}

impl StreamCount {
    /// Counts one more stream; returns how many are in use with it.
    fn opened(&self, rtt: Duration) -> usize {
        let open = self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let linger = rtt * 2 + Duration::from_millis(50);
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        while ended.front().is_some_and(|t| t.elapsed() > linger) {
            ended.pop_front();
        }
        open + ended.len()
    }
}

/// One of a peer's streams while it is served.
struct OpenStream(Arc<StreamCount>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut ended = self.0.ended.lock().unwrap_or_else(|e| e.into_inner());
        if ended.len() >= tls::STREAMS_MAX as usize {
            ended.pop_front();
        }
        ended.push_back(std::time::Instant::now());
    }
}

async fn reject(send: &mut quinn::SendStream, code: RejectCode, rule: Option<String>) {
    let _ = write_frame(send, &StreamReply::Reject { code, rule }).await;
    let _ = send.finish();
    // Give the reply a moment to leave before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

/// Tunnel ingress for one stream: decode the header, check identity and policy, dial the
/// local service, then pump bytes.
async fn ingress_stream(
    node: Arc<Node>,
    peer: Arc<PeerIdentity>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let opening = match tokio::time::timeout(HEADER_TIMEOUT, read_opening(&mut recv)).await {
        Ok(Ok(Some(o))) => o,
        other => {
            tracing::info!(peer = %peer.node, result = ?other.map(|r| r.map(|_| ())), "stream header refused");
            node.metrics.ingress_rejected(RejectCode::Malformed, "", "");
            reject(&mut send, RejectCode::Malformed, None).await;
            return;
        }
    };
    let header = opening.header();
    let (src, dst) = (header.src_service.clone(), header.dst_service.clone());
    let span = tracing::info_span!("flow", flow = header.flow_id, peer = %peer.node, src = %src, dst = %dst);
    // A request carried framed (from an `http` upstream) is an HTTP request whatever the
    // service speaks; bytes are HTTP only to an `http` service.
    let request = match opening {
        Opening::Request(r) => Some(r.head),
        Opening::Stream(_) => None,
    };
    async move {
        let view = node.view();
        let refuse = |code: RejectCode, rule: Option<String>| {
            node.metrics.ingress_rejected(code, src.as_str(), dst.as_str());
            tracing::info!(reason = code.as_str(), rule = rule.as_deref().unwrap_or("-"), "ingress rejected");
            (code, rule)
        };
        let service = node.cfg.service(&dst);
        let hosted = service.is_some();
        let http = service.is_some_and(|s| s.protocol == Protocol::Http);
        let decide = |view: &View| {
            let req = authz::StreamRequest { peer: &peer, src: &src, dst: &dst, hosted, http };
            authz::stream_ingress(view, req, clock::unix_now())
        };
        let mut verdict = decide(&view);
        if matches!(&verdict, Err(d) if d.reason == RejectCode::PeerUnknown) {
            // A peer that enrolled a moment ago may be ahead of this node's snapshot:
            // wait a little for the one that names it.
            verdict = wait_for_peer(&node, &peer.node).await.map_or(verdict, |v| decide(&v));
        }
        let rule = match verdict {
            Ok(rule) => rule,
            Err(authz::Denied { reason, rule }) => {
                let (code, rule) = refuse(reason, rule);
                reject(&mut send, code, rule).await;
                return;
            }
        };
        let Some(address) = service.and_then(|s| s.address) else {
            // An overlay-only service: reached by its overlay ports, not by L4 streams.
            let _ = refuse(RejectCode::ServiceUnavailable, None);
            reject(&mut send, RejectCode::ServiceUnavailable, None).await;
            return;
        };
        // An HTTP service's requests go over pooled connections, dialled per request.
        let tcp = if http || request.is_some() {
            None
        } else {
            match tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, TcpStream::connect(address)).await {
                Ok(Ok(t)) => Some(t),
                other => {
                    let _ = refuse(RejectCode::ServiceUnavailable, None);
                    tracing::warn!(%address, error = ?other.map(|r| r.err()), "local service unavailable");
                    reject(&mut send, RejectCode::ServiceUnavailable, None).await;
                    return;
                }
            }
        };
        // Registered before it is answered, then decided again: a snapshot applied while
        // the service was being dialled is either seen here or re-checks this flow.
        let (_guard, kill) = node.flows.register(
            FlowInfo {
                id: node.flows.next_id(),
                direction: Direction::Ingress,
                peer: peer.node.clone(),
                peer_id: peer.clone(),
                src: src.clone(),
                dst: dst.clone(),
                rule: rule.clone(),
                http,
                request: None,
            },
            &node.metrics,
        );
        if let Err(authz::Denied { reason, rule }) = decide(&node.view()) {
            let (code, rule) = refuse(reason, rule);
            reject(&mut send, code, rule).await;
            return;
        }
        // A framed request's acceptance goes out with its response head.
        if request.is_none() && write_frame(&mut send, &StreamReply::Accept).await.is_err() {
            return;
        }
        node.metrics.ingress_accepted(src.as_str(), dst.as_str());
        if http || request.is_some() {
            // A stream per request: the access log (`[telemetry] access_log`) is where
            // requests are logged, not one INFO line per stream.
            tracing::debug!(rule = %rule, "ingress accepted (http)");
        } else {
            tracing::info!(rule = %rule, "ingress accepted");
        }
        let end = match tcp {
            Some(tcp) => {
                let _ = tcp.set_nodelay(true);
                pump(tcp, Vec::new(), send, recv, kill, node.cfg.flow_idle_timeout, &node.metrics, None).await
            }
            None => {
                let conn = l7::ingress::Conn { peer: peer.clone(), src: src.clone(), dst: dst.clone(), address, http, rule };
                let closed = match request {
                    Some(head) => l7::ingress::serve_request(node.clone(), conn, head, send, recv, kill).await,
                    None => l7::ingress::serve(node.clone(), conn, send, recv, kill).await,
                };
                match closed {
                    Some(reason) => FlowEnd::Killed(reason),
                    None => FlowEnd::Done,
                }
            }
        };
        match end {
            FlowEnd::Killed(reason) => {
                node.metrics.flow_closed(reason);
                tracing::info!(%reason, "flow closed by node");
            }
            FlowEnd::Idle => node.metrics.flow_closed(CloseReason::Idle),
            FlowEnd::Done | FlowEnd::Error => tracing::debug!(?end, "flow ended"),
        }
    }
    .instrument(span)
    .await;
}

/// How long a stream from a peer missing from the view waits for a snapshot naming it.
const UNKNOWN_PEER_WAIT: Duration = Duration::from_secs(2);

/// Waits up to [`UNKNOWN_PEER_WAIT`] for a view that holds `peer`; that view, or `None`.
async fn wait_for_peer(node: &Node, peer: &NodeName) -> Option<Arc<View>> {
    let mut views = node.watch_view();
    tokio::time::timeout(UNKNOWN_PEER_WAIT, async {
        loop {
            let v = views.borrow_and_update().clone();
            if v.peers.contains_key(peer) {
                return Some(v);
            }
            views.changed().await.ok()?;
        }
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod stream_count_tests {
    use super::*;

    #[test]
    fn a_stream_served_a_moment_ago_still_counts_until_quinn_has_freed_it() {
        let streams = Arc::new(StreamCount::default());
        let rtt = Duration::from_millis(20);
        assert_eq!(streams.opened(rtt), 1);
        drop(OpenStream(streams.clone()));
        // Served and ended, but its end is not acknowledged yet: still in use.
        assert_eq!(streams.opened(rtt), 2);
        std::thread::sleep(rtt * 2 + Duration::from_millis(60));
        // The first ended long enough ago; the second ends now.
        drop(OpenStream(streams.clone()));
        assert_eq!(
            streams.opened(Duration::ZERO),
            2,
            "the open one and the one just ended"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(streams.opened(Duration::ZERO), 2, "the two open ones only");
    }
}
