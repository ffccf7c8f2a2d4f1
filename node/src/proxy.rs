//! L4 upstreams: a local TCP listener per `[[upstream]]`. Each accepted connection picks an
//! instance of the destination service (healthy ones only, nearest locality first, power
//! of two choices on flows in progress: `protocol::routing`), opens a stream with the
//! header, waits for the ingress's answer, then pumps bytes. An instance that cannot be
//! reached or whose service refuses the connection is skipped for the next one before any
//! of the client's bytes went to it, so the client sees no error while any instance works.
//!
//! On a tunnel the flow itself just brought up (the peer answered a handshake a moment
//! ago), to an instance this node's own view of policy allows, the bytes the client has
//! already sent go out with the header instead of a round trip later. They are kept: an
//! ingress refusal (which delivers nothing to its service) lets the next instance have
//! them, after its accept unless its tunnel is also new. Any other failure after they went
//! out ends the flow, because the instance may have delivered them: a request is never
//! sent twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quicmesh_protocol::ident::NodeName;
use quicmesh_protocol::routing::{self, Candidate};
use rand::Rng;

use quicmesh_protocol::wire::{RejectCode, StreamHeader, StreamReply};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::authz;
use crate::config::UpstreamConfig;
use crate::flow::{pump, Direction, FlowEnd, FlowInfo};
use crate::frame::read_frame;
use crate::reason::EgressRefusal;
use crate::state::Node;
use crate::tunnel;

/// How long to wait for the ingress's accept or reject.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The least a flow waits for a first sign of life from the peer before trying the next
/// instance: covers a lost packet or two and a busy host's scheduling on a LAN.
const SILENCE_FLOOR: Duration = Duration::from_millis(300);

/// How long a flow waits for any datagram back on the tunnel (an ACK of its header, the
/// answer) before it takes the peer for dead: three round trips and a margin, at least
/// [`SILENCE_FLOOR`], at most [`REPLY_TIMEOUT`]. A peer that answers anything but whose
/// service is slow gets the whole [`REPLY_TIMEOUT`].
pub fn silence_bound(rtt: Duration) -> Duration {
    (rtt * 3 + Duration::from_millis(50)).clamp(SILENCE_FLOOR, REPLY_TIMEOUT)
}

/// Binds every upstream listener (before any is served, so a bad bind fails startup whole).
pub async fn bind_all(node: &Arc<Node>) -> std::io::Result<Vec<(UpstreamConfig, TcpListener)>> {
    let mut out = Vec::new();
    for u in &node.cfg.upstreams {
        let l = TcpListener::bind(u.bind).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("upstream {} bind {}: {e}", u.service, u.bind),
            )
        })?;
        out.push((u.clone(), l));
    }
    Ok(out)
}

/// Serves one upstream listener forever.
pub async fn serve(node: Arc<Node>, up: UpstreamConfig, listener: TcpListener) {
    let load = Arc::new(Load::default());
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "upstream accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let node = node.clone();
        let up = up.clone();
        let load = load.clone();
        let id = node.flows.next_id();
        let span =
            tracing::info_span!("flow", flow = id, %client, src = %up.source, dst = %up.service);
        tokio::spawn(async move { egress(node, up, tcp, id, load).await }.instrument(span));
    }
}

/// Flows in progress per instance, for one upstream.
#[derive(Debug, Default)]
pub struct Load(Mutex<HashMap<NodeName, usize>>);

impl Load {
    fn get(&self, node: &NodeName) -> usize {
        self.0
            .lock()
            .map(|m| m.get(node).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Counts a flow to `node` until the guard drops.
    pub fn start(self: &Arc<Self>, node: &NodeName) -> LoadGuard {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(node.clone()).or_insert(0) += 1;
        }
        LoadGuard(self.clone(), node.clone())
    }
}

/// Counts one flow to an instance while it lives.
#[derive(Debug)]
pub struct LoadGuard(Arc<Load>, NodeName);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0 .0.lock() {
            if let Some(n) = m.get_mut(&self.1) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.1);
                }
            }
        }
    }
}

/// The instances of `up`'s service to try, in order: silent peers (their tunnel sent
/// nothing back to a recent flow) last, kept as a last resort.
pub fn instances(
    view: &crate::state::View,
    up: &UpstreamConfig,
    load: &Load,
    silent: impl Fn(&NodeName) -> bool,
) -> Vec<NodeName> {
    let candidates: Vec<Candidate> = view
        .healthy(&up.service)
        .map(|p| Candidate {
            node: &p.node,
            labels: &p.labels,
            outstanding: load.get(&p.node),
        })
        .collect();
    let mut rng = rand::thread_rng();
    let order = routing::order(
        &view.labels,
        &candidates,
        up.locality,
        (rng.gen(), rng.gen()),
    )
    .into_iter()
    .cloned()
    .collect::<Vec<_>>();
    let (mut answering, quiet): (Vec<_>, Vec<_>) = order.into_iter().partition(|n| !silent(n));
    answering.extend(quiet);
    answering
}

async fn egress(node: Arc<Node>, up: UpstreamConfig, tcp: TcpStream, id: u64, load: Arc<Load>) {
    let (src, dst) = (up.source.as_str(), up.service.as_str());
    let view = node.view();
    let order = instances(&view, &up, &load, |n| node.tunnels.is_silent(n));
    if order.is_empty() {
        node.metrics
            .egress_rejected(EgressRefusal::NoInstance, src, dst);
        let hosting = view.by_service.get(&up.service).map_or(0, |v| v.len());
        tracing::info!(
            hosting,
            locality = ?up.locality,
            "no healthy instance of the service (in the allowed localities)"
        );
        return;
    }
    // The client's first bytes once they have gone out with a header (see the module doc).
    let mut early = Vec::new();
    for (i, name) in order.iter().enumerate() {
        let Some(peer) = view.peers.get(name) else {
            continue;
        };
        // With no instance left to try, a silent tunnel is waited on as before (the
        // path layer closes it if the peer moved; it may only be slow).
        let last_resort = i + 1 == order.len();
        if node.cfg.check_egress {
            if let Err(rule) = authz::egress(&view, &up.source, &up.service, &peer.node) {
                node.metrics
                    .egress_rejected(EgressRefusal::PolicyDenied, src, dst);
                tracing::info!(%rule, peer = %peer.node, "egress denied by local policy");
                return;
            }
        }
        let header = StreamHeader {
            src_service: up.source.clone(),
            dst_service: up.service.clone(),
            flow_id: id,
        };
        let opening = std::time::Instant::now();
        // Counted from the first try: a dead instance's pending tries must not make it
        // look idle to the next flow's choice.
        let load_guard = load.start(&peer.node);
        let opened = open_stream(&node, peer, &header, last_resort, &tcp, &mut early).await;
        let Opened {
            conn,
            send,
            recv,
            early_sent,
        } = match opened {
            Ok(x) => x,
            Err(Attempt::Rejected(code, rule)) => {
                node.metrics.egress_rejected(code, src, dst);
                tracing::info!(peer = %peer.node, reason = code.as_str(), rule = rule.as_deref().unwrap_or("-"), "rejected by peer ingress");
                if code == RejectCode::ServiceUnavailable {
                    continue;
                }
                return;
            }
            Err(Attempt::Failed(e)) => {
                tracing::warn!(peer = %peer.node, error = %e, "instance unreachable, trying the next");
                continue;
            }
            Err(Attempt::Silent(waited)) => {
                node.metrics.peer_silent();
                tracing::warn!(peer = %peer.node, ?waited, "instance's tunnel silent, trying the next");
                continue;
            }
            Err(Attempt::Sent(e)) => {
                node.metrics
                    .egress_rejected(EgressRefusal::Unreachable, src, dst);
                tracing::warn!(peer = %peer.node, error = %e, bytes = early.len(), "instance failed after the client's first bytes went to it: not sent to another");
                return;
            }
            Err(Attempt::ClientGone(e)) => {
                tracing::debug!(error = %e, "the client went away before the flow opened");
                return;
            }
        };
        let Some(peer_id) = node.tunnels.identity(&conn) else {
            // The tunnel closed between the answer and here (revoked, expired). The
            // instance accepted: bytes that went with the header may be delivered.
            if early_sent {
                node.metrics
                    .egress_rejected(EgressRefusal::Unreachable, src, dst);
                tracing::warn!(peer = %peer.node, bytes = early.len(), "tunnel gone after the instance accepted the client's first bytes: not sent to another");
                return;
            }
            tracing::info!(peer = %peer.node, "tunnel gone before the flow started");
            continue;
        };
        let pair_bytes = node.metrics.traffic.bytes(src, dst);
        // Bytes that went with the header are counted here; bytes kept from a refusal, on
        // a tunnel that was up already, are the pump's first write (the flow registered:
        // a policy change or revocation closes it, as does the flow idle timeout).
        let first = if early_sent {
            node.metrics.bytes_to_tunnel(early.len() as u64);
            if let Some(b) = &pair_bytes {
                b.fetch_add(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Vec::new()
        } else {
            early
        };
        node.metrics.egress_accepted(src, dst);
        node.metrics.traffic.flow(src, dst, opening.elapsed());
        let _load = load_guard;
        tracing::debug!(peer = %peer.node, "instance chosen");
        let _ = tcp.set_nodelay(true);
        let (_guard, kill) = node.flows.register(
            FlowInfo {
                id,
                direction: Direction::Egress,
                peer: peer.node.clone(),
                peer_id,
                src: up.source.clone(),
                dst: up.service.clone(),
                rule: String::new(),
                http: false,
                request: None,
            },
            &node.metrics,
        );
        let end = pump(
            tcp,
            first,
            send,
            recv,
            kill,
            node.cfg.flow_idle_timeout,
            &node.metrics,
            pair_bytes,
        )
        .await;
        if let FlowEnd::Killed(reason) = end {
            node.metrics.flow_closed(reason);
        }
        tracing::debug!(?end, "flow ended");
        return;
    }
    node.metrics
        .egress_rejected(EgressRefusal::Unreachable, src, dst);
    tracing::warn!("no instance reachable");
}

/// A stream the instance accepted.
struct Opened {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The client's first bytes went with the header.
    early_sent: bool,
}

enum Attempt {
    Rejected(RejectCode, Option<String>),
    Failed(String),
    /// Nothing came back on the tunnel for this long: the peer is taken for dead (marked
    /// silent), its tunnel kept for it to answer again.
    Silent(Duration),
    /// Failed after the client's first bytes went out: the instance may have delivered
    /// them, so they go to no other.
    Sent(String),
    /// Reading what the client had sent failed (it reset the connection).
    ClientGone(String),
}

/// At most this much of what the client sent first goes out with the header.
const EARLY_MAX: usize = 16 * 1024;

/// What the client has sent so far (without waiting for more), at most [`EARLY_MAX`];
/// empty when it has sent nothing yet or has closed its side (the pump meets that end
/// again). A failed read (a reset) is the client gone: it is not turned into a clean end.
fn read_early(tcp: &TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; EARLY_MAX];
    match tcp.try_read(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            buf.shrink_to_fit();
            Ok(buf)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Opens a stream to `peer`, sends the header and waits for the ingress's answer. A cached
/// tunnel that fails is forgotten and the peer dialled afresh once. A tunnel that stays
/// silent past [`silence_bound`] gives up the peer for the next instance, unless this is
/// the `last_resort`: then it gets the whole reply timeout, as any tunnel.
///
/// `early` holds the client's first bytes once read. On a tunnel this call brings up, to
/// an instance this node's view of policy allows (the view as the tunnel comes up, whether
/// or not a local denial stops flows), what the client has sent is read into it and sent
/// after the header; then only a refusal lets the flow move on.
/// On a tunnel that was up already the header goes alone (after the accept, `early` is
/// the pump's first write), so a silent or failing cached tunnel is left as it was before
/// any byte.
async fn open_stream(
    node: &Arc<Node>,
    peer: &quicmesh_protocol::wire::PeerInfo,
    header: &StreamHeader,
    last_resort: bool,
    tcp: &TcpStream,
    early: &mut Vec<u8>,
) -> Result<Opened, Attempt> {
    let mut peer = peer.clone();
    for _ in 0..2 {
        let (conn, fresh) = tunnel::connection(node, &peer)
            .await
            .map_err(|e| Attempt::Failed(e.to_string()))?;
        let with_header = fresh
            && authz::egress(
                &node.view(),
                &header.src_service,
                &header.dst_service,
                &peer.node,
            )
            .is_ok();
        if with_header && early.is_empty() {
            *early = read_early(tcp).map_err(|e| Attempt::ClientGone(e.to_string()))?;
        }
        let early_now = with_header && !early.is_empty();
        let mut first = quicmesh_protocol::wire::encode_frame(header);
        if early_now {
            first.extend_from_slice(early);
        }
        let rx0 = conn.stats().udp_rx.datagrams;
        let bound = silence_bound(conn.rtt());
        let opened = conn.clone();
        let metrics = node.metrics.clone();
        // Whether the header (and the early bytes with it) may have gone out: a stream
        // that could not be opened sent nothing.
        let wrote = std::sync::atomic::AtomicBool::new(false);
        let answer = async {
            let (mut send, mut recv) =
                opened.open_bi().await.map_err(|e| (false, e.to_string()))?;
            wrote.store(true, std::sync::atomic::Ordering::Relaxed);
            send.write_all(&first)
                .await
                .map_err(|e| (true, e.to_string()))?;
            if early_now {
                metrics.data_with_header();
            }
            match read_frame::<StreamReply, _>(&mut recv).await {
                Ok(Some(reply)) => Ok((send, recv, reply)),
                Ok(None) => Err((true, "stream closed before an answer".to_string())),
                Err(e) => Err((true, e.to_string())),
            }
        };
        let mut answer = std::pin::pin!(answer);
        // First the bound for any sign of life; then, if the tunnel answered anything,
        // the rest of the reply timeout (the peer lives, its service may be slow).
        let result = match tokio::time::timeout(bound, &mut answer).await {
            Ok(r) => r,
            Err(_) if conn.stats().udp_rx.datagrams == rx0 && !last_resort && !early_now => {
                node.tunnels.mark_silent(&peer.node, &conn);
                return Err(Attempt::Silent(bound));
            }
            Err(_) => match tokio::time::timeout(REPLY_TIMEOUT.saturating_sub(bound), answer).await
            {
                Ok(r) => r,
                Err(_) => Err((
                    wrote.load(std::sync::atomic::Ordering::Relaxed),
                    "no answer in time".to_string(),
                )),
            },
        };
        match result {
            Ok((send, recv, StreamReply::Accept)) => {
                return Ok(Opened {
                    conn,
                    send,
                    recv,
                    early_sent: early_now,
                })
            }
            Ok((_, _, StreamReply::Reject { code, rule })) => {
                return Err(Attempt::Rejected(code, rule))
            }
            Err((true, e)) if early_now => return Err(Attempt::Sent(e)),
            // No stream came free on a tunnel that is alive (its peer has as many of our
            // flows open as it allows): this flow fails, the others on it go on.
            Err((false, e))
                if conn.close_reason().is_none() && conn.stats().udp_rx.datagrams != rx0 =>
            {
                return Err(Attempt::Failed(format!(
                    "no stream free on the tunnel: {e}"
                )))
            }
            Err((_, e)) if fresh => return Err(Attempt::Failed(e)),
            Err((_, e)) => {
                tracing::info!(peer = %peer.node, error = %e, "cached tunnel failed; dialling afresh");
                tunnel::forget(node, &peer.node, &conn);
                // The peer may have moved meanwhile: dial where the latest snapshot says.
                if let Some(p) = node.view().peers.get(&peer.node) {
                    peer = p.clone();
                }
            }
        }
    }
    Err(Attempt::Failed("tunnel failed twice".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_silence_bound_follows_the_rtt_between_a_floor_and_the_reply_timeout() {
        // A LAN: the floor (a lost packet or two, a busy host).
        assert_eq!(silence_bound(Duration::from_micros(200)), SILENCE_FLOOR);
        // A WAN: three round trips and a margin.
        assert_eq!(
            silence_bound(Duration::from_millis(150)),
            Duration::from_millis(500)
        );
        // Never longer than the reply timeout.
        assert_eq!(silence_bound(Duration::from_secs(30)), REPLY_TIMEOUT);
    }
}
