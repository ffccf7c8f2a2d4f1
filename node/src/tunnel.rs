//! Peer tunnels: one QUIC endpoint for both directions, one connection per peer (opened on
//! first use, reused by every flow), and tunnel ingress — identity and policy checked on
//! every stream before the local service is dialled.

use std::sync::Arc;
use std::time::Duration;

use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::ident::NodeName;
use quicmesh_protocol::path::PeerId;
use quicmesh_protocol::wire::{PeerInfo, RejectCode, StreamHeader, StreamReply};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::flow::{pump, Direction, FlowEnd, FlowInfo};
use crate::frame::{read_frame, write_frame};
use crate::state::Node;
use crate::tls::{self, MeshServerVerifier, ServerExpect};

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
        Arc::new(move |r| metrics.handshake_refused(r.as_str())),
    );
    tls::client_config(
        Some(node.cert.clone()),
        verifier,
        quicmesh_protocol::wire::ALPN_TUNNEL,
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
    let targets = targets(peer);
    if targets.is_empty() {
        return Err(DialError::NoEndpoint(peer.node.clone()));
    }
    // When the handshake is not done quickly, ask the peer (through the coordinator) to
    // dial back: behind NATs, each side's outgoing packets open the mapping the other
    // side's packets come in by. Reachable peers answer first and are not asked.
    let dial = async {
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
    node.keep_tunnel(&peer.node, &conn, true);
    // Streams the peer opens on a connection we dialled are served like any other.
    let n = node.clone();
    let c = conn.clone();
    let name = peer.node.clone();
    tokio::spawn(async move { serve_connection(n, c, name).await });
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
        if let Some(r) = live.iter().find(|(n, _)| n != &peer.node) {
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
        let connecting = node
            .endpoint
            .connect_with(cfg.clone(), addr, peer.as_str())
            .map_err(|e| err(format!("{addr}: {e}")));
        attempts.spawn(async move {
            tokio::time::sleep(CANDIDATE_STAGGER * i as u32).await;
            let r = match connecting {
                Ok(c) => c.await.map_err(|e| format!("{addr}: {e}")),
                Err(e) => Err(e.to_string()),
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
                if let Ok(mut t) = node.tried.lock() {
                    t.insert(peer.clone(), addrs.to_vec());
                }
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
            node.keep_tunnel(&peer, &conn, false);
            serve_connection(node, conn, peer).await;
        }
        Err(e) => tracing::debug!(%peer, error = %e, "dial back failed"),
    }
}

/// Drops a cached tunnel that turned out dead (e.g. the peer restarted), so the next
/// flow dials afresh instead of waiting for the idle timeout.
pub fn forget(node: &Node, peer: &NodeName, conn: &quinn::Connection) {
    conn.close(quinn::VarInt::from_u32(3), b"stale");
    if let Ok(mut m) = node.conns.lock() {
        if m.get(peer)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            m.remove(peer);
        }
        node.metrics.set_peers_connected(m.len());
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
            let td = node.trust.load().trust_domain.clone();
            let Some(id) = tls::peer_leaf(&conn).and_then(|d| PeerIdentity::from_der(&d, &td).ok())
            else {
                node.metrics.handshake_refused("no_identity");
                conn.close(quinn::VarInt::from_u32(1), b"no identity");
                return;
            };
            // Through a relay, the relay named the sender: the certificate must agree.
            if crate::path::Paths::is_synth(&remote)
                && node.paths.synth_peer(&remote) != Some(PeerId::of(&id.node))
            {
                node.metrics.handshake_refused("relay_sender_mismatch");
                conn.close(quinn::VarInt::from_u32(1), b"relay sender mismatch");
                return;
            }
            tracing::info!(peer = %id.node, %remote, "tunnel up (accepted)");
            node.keep_tunnel(&id.node, &conn, false);
            serve_connection(node, conn, id.node).await;
        });
    }
}

/// Serves the streams a peer opens on `conn` (and its datagrams, in overlay mode).
async fn serve_connection(node: Arc<Node>, conn: quinn::Connection, peer: NodeName) {
    if let Some(ov) = node.overlay.get() {
        crate::overlay::read_datagrams(&node, ov, conn.clone());
    } else {
        // Without an overlay, datagrams are only the path layer's nudges: read and drop.
        let c = conn.clone();
        tokio::spawn(async move { while c.read_datagram().await.is_ok() {} });
    }
    let td = node.trust.load().trust_domain.clone();
    let id = match tls::peer_leaf(&conn).and_then(|d| PeerIdentity::from_der(&d, &td).ok()) {
        Some(id) => Arc::new(id),
        None => return,
    };
    node.serve_tunnel(&peer, &conn);
    let span = tracing::info_span!("tunnel", peer = %peer);
    async {
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let node = node.clone();
                    let id = id.clone();
                    tokio::spawn(async move { ingress_stream(node, id, send, recv).await });
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
    node.unserve(&conn);
    if let Ok(mut m) = node.conns.lock() {
        if m.get(&peer)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            m.remove(&peer);
        }
        node.metrics.set_peers_connected(m.len());
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
    let header = match tokio::time::timeout(
        HEADER_TIMEOUT,
        read_frame::<StreamHeader, _>(&mut recv),
    )
    .await
    {
        Ok(Ok(Some(h))) => h,
        other => {
            tracing::info!(peer = %peer.node, result = ?other.map(|r| r.map(|_| ())), "stream header refused");
            node.metrics
                .ingress_rejected(RejectCode::Malformed.as_str(), "", "");
            reject(&mut send, RejectCode::Malformed, None).await;
            return;
        }
    };
    let (src, dst) = (header.src_service.clone(), header.dst_service.clone());
    let span = tracing::info_span!("flow", flow = header.flow_id, peer = %peer.node, src = %src, dst = %dst);
    async move {
        let view = node.view();
        let refuse = |code: RejectCode, rule: Option<String>| {
            node.metrics.ingress_rejected(code.as_str(), src.as_str(), dst.as_str());
            tracing::info!(reason = code.as_str(), rule = rule.as_deref().unwrap_or("-"), "ingress rejected");
            (code, rule)
        };
        let verdict = if view.version == 0 {
            Err(refuse(RejectCode::NotReady, None))
        } else if node.cfg.service(&dst).is_none() {
            Err(refuse(RejectCode::UnknownService, None))
        } else if !peer.may_speak_for(&src) {
            Err(refuse(RejectCode::SourceNotInCertificate, None))
        } else {
            let d = view.decide(&src, &view.peer_labels(&peer.node), &dst, &view.labels);
            if d.is_allow() {
                Ok(d.rule_label())
            } else {
                Err(refuse(RejectCode::PolicyDenied, Some(d.rule_label())))
            }
        };
        let rule = match verdict {
            Ok(rule) => rule,
            Err((code, rule)) => {
                reject(&mut send, code, rule).await;
                return;
            }
        };
        let Some(address) = node.cfg.service(&dst).and_then(|s| s.address) else {
            // An overlay-only service: reached by its overlay ports, not by L4 streams.
            let _ = refuse(RejectCode::ServiceUnavailable, None);
            reject(&mut send, RejectCode::ServiceUnavailable, None).await;
            return;
        };
        let tcp = match tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(t)) => t,
            other => {
                let _ = refuse(RejectCode::ServiceUnavailable, None);
                tracing::warn!(%address, error = ?other.map(|r| r.err()), "local service unavailable");
                reject(&mut send, RejectCode::ServiceUnavailable, None).await;
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        if write_frame(&mut send, &StreamReply::Accept).await.is_err() {
            return;
        }
        node.metrics.ingress_accepted(src.as_str(), dst.as_str());
        tracing::info!(rule = %rule, "ingress accepted");
        let (_guard, kill) = node.flows.register(
            FlowInfo {
                id: node.flows.next_id(),
                direction: Direction::Ingress,
                peer: peer.node.clone(),
                peer_serial: Some(peer.serial.clone()),
                src: src.clone(),
                dst: dst.clone(),
                rule,
            },
            &node.metrics,
        );
        let end = pump(tcp, send, recv, kill, node.cfg.flow_idle_timeout, &node.metrics, None).await;
        match end {
            FlowEnd::Killed(reason) => {
                node.metrics.flow_closed(reason);
                tracing::info!(reason, "flow closed by node");
            }
            FlowEnd::Idle => node.metrics.flow_closed("idle"),
            FlowEnd::Done | FlowEnd::Error => tracing::debug!(?end, "flow ended"),
        }
    }
    .instrument(span)
    .await;
}
