//! An `http` upstream: the local listener speaks HTTP (HTTP/1.1 or HTTP/2, told apart by
//! the first bytes), and every request rides its own tunnel stream to an instance chosen
//! for that request. The stream header and the request leave together; the ingress's
//! answer is read before the response ([`super::io::AfterAnswer`]), so a request costs no
//! round trip of its own, and requests of one client connection never wait on each other.
//!
//! A request whose body is small and known (at most [`REPLAY_LIMIT`] bytes by its
//! length, or none) is tried on the next instance when an instance cannot be reached or
//! its service is down; others are tried once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use quicmesh_protocol::http::parse_request;
use quicmesh_protocol::policy;
use quicmesh_protocol::wire::{PeerInfo, RejectCode, StreamHeader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use super::ingress::Driven;
use super::io::{self, AfterAnswer, Answer};
use super::{boxed, full, is_grpc, refusal, strip_hop_by_hop, wants_h2c, wants_upgrade, Body};
use crate::authz::{self, Direction};
use crate::config::UpstreamConfig;
use crate::flow::FlowInfo;
use crate::frame::write_frame;
use crate::metrics::RequestOutcome;
use crate::proxy::{instances, Load};
use crate::reason::{CloseReason, EgressRefusal, RequestRefusal};
use crate::state::Node;
use crate::tunnel;

/// Request bodies up to this size are kept so the request can be sent again.
pub const REPLAY_LIMIT: u64 = 64 * 1024;
/// How long the HTTP/1.1 request head may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one `http` upstream listener forever.
pub async fn serve(node: Arc<Node>, up: UpstreamConfig, listener: TcpListener) {
    let shared = Arc::new(Upstream {
        node,
        up,
        load: Arc::new(Load::default()),
    });
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "upstream accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let span =
            tracing::info_span!("http", %client, src = %shared.up.source, dst = %shared.up.service);
        tokio::spawn(
            async move {
                let svc = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, std::convert::Infallible>(shared.handle(req).await) }
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                if let Err(e) = builder
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await
                {
                    tracing::debug!(error = %e, "client connection ended");
                }
            }
            .instrument(span),
        );
    }
}

struct Upstream {
    node: Arc<Node>,
    up: UpstreamConfig,
    load: Arc<Load>,
}

/// A request body, kept whole when small enough to send again.
enum Outgoing {
    Replayable(Bytes),
    Once(Option<Incoming>),
}

impl Outgoing {
    async fn new(body: Incoming) -> Result<Self, hyper::Error> {
        let small = hyper::body::Body::size_hint(&body)
            .exact()
            .is_some_and(|n| n <= REPLAY_LIMIT);
        if small {
            Ok(Self::Replayable(body.collect().await?.to_bytes()))
        } else {
            Ok(Self::Once(Some(body)))
        }
    }

    /// The body for the next try; `None` when it was sent already.
    fn take(&mut self) -> Option<Body> {
        match self {
            Self::Replayable(b) => Some(full(b.clone())),
            Self::Once(b) => b.take().map(boxed),
        }
    }
}

/// How one try ended.
enum Try {
    /// With the receiver an upgraded connection holds (closed with the flow).
    Answered(Response<Incoming>, watch::Receiver<Option<CloseReason>>),
    /// Refused by the peer's ingress: whether another instance may be tried.
    Rejected(RejectCode, Option<String>),
    /// The tunnel or stream failed.
    Failed(String),
}

impl Upstream {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let node = &self.node;
        let (src, dst) = (self.up.source.as_str(), self.up.service.as_str());
        let grpc = is_grpc(req.headers());
        let outcome = |status: StatusCode| RequestOutcome {
            direction: Direction::Egress,
            src,
            dst,
            route: "default",
            status: status.as_u16(),
            elapsed: started.elapsed(),
        };
        let answer = |reason: RequestRefusal, status: StatusCode, rule: Option<&str>| {
            node.metrics.request_refused(reason, src, dst);
            node.metrics.http_request(outcome(status));
            tracing::info!(
                reason = reason.as_str(),
                rule = rule.unwrap_or("-"),
                "request refused"
            );
            refusal(status, reason.as_str(), rule, grpc)
        };
        if req.method() == Method::CONNECT || wants_h2c(req.headers()) {
            return answer(RequestRefusal::Unjudgeable, StatusCode::BAD_REQUEST, None);
        }
        let target = req.uri().path_and_query().map_or("", |p| p.as_str());
        let (method, target) = match parse_request(req.method().as_str(), target) {
            Ok(x) => x,
            Err(e) => {
                tracing::info!(refusal = e.as_str(), "bad request target");
                return answer(RequestRefusal::BadTarget, StatusCode::BAD_REQUEST, None);
            }
        };
        let view = node.view();
        let order = instances(&view, &self.up, &self.load);
        if order.is_empty() {
            node.metrics
                .egress_rejected(EgressRefusal::NoInstance, src, dst);
            return answer(
                RequestRefusal::ServiceUnavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                None,
            );
        }
        let upgrade = wants_upgrade(req.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        parts.uri = match local_target(&parts.uri, &target) {
            Some(u) => u,
            None => return answer(RequestRefusal::BadTarget, StatusCode::BAD_REQUEST, None),
        };
        strip_hop_by_hop(&mut parts.headers, upgrade);
        let mut outgoing = match Outgoing::new(body).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "client body failed");
                return answer(RequestRefusal::Unjudgeable, StatusCode::BAD_REQUEST, None);
            }
        };
        for name in &order {
            let Some(peer) = view.peers.get(name) else {
                continue;
            };
            if node.cfg.check_egress {
                let values: Vec<(&str, std::borrow::Cow<'_, str>)> = parts
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v.as_bytes())))
                    .collect();
                let pairs: Vec<(&str, &str)> =
                    values.iter().map(|(n, v)| (*n, v.as_ref())).collect();
                let request = policy::Request {
                    method: &method,
                    path: &target.path,
                    headers: &pairs,
                };
                if let Err(rule) =
                    authz::egress_request(&view, &self.up.source, &self.up.service, name, &request)
                {
                    node.metrics
                        .egress_rejected(EgressRefusal::PolicyDenied, src, dst);
                    return answer(
                        RequestRefusal::PolicyDenied,
                        StatusCode::FORBIDDEN,
                        Some(&rule),
                    );
                }
            }
            let Some(body) = outgoing.take() else {
                break;
            };
            let request = Request::from_parts(parts.clone(), body);
            match self.attempt(peer, request).await {
                Try::Answered(mut resp, closed) => {
                    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    if let (true, Some(client_side)) = (switched, client_side) {
                        let service_side = hyper::upgrade::on(&mut resp);
                        tokio::spawn(super::ingress::splice(client_side, service_side, closed));
                    }
                    strip_hop_by_hop(resp.headers_mut(), switched);
                    node.metrics.http_request(outcome(resp.status()));
                    return resp.map(boxed);
                }
                Try::Rejected(code, rule) => {
                    node.metrics.egress_rejected(code, src, dst);
                    tracing::info!(peer = %name, reason = code.as_str(), rule = rule.as_deref().unwrap_or("-"), "rejected by peer ingress");
                    if code == RejectCode::ServiceUnavailable {
                        continue;
                    }
                    let (reason, status) = match code {
                        RejectCode::PolicyDenied => {
                            (RequestRefusal::PolicyDenied, StatusCode::FORBIDDEN)
                        }
                        RejectCode::UnknownService => {
                            (RequestRefusal::UnknownService, StatusCode::NOT_FOUND)
                        }
                        RejectCode::SourceNotInCertificate => (
                            RequestRefusal::SourceNotInCertificate,
                            StatusCode::FORBIDDEN,
                        ),
                        _ => (RequestRefusal::PeerNotStanding, StatusCode::FORBIDDEN),
                    };
                    return answer(reason, status, rule.as_deref());
                }
                Try::Failed(e) => {
                    tracing::warn!(peer = %name, error = %e, "instance failed, trying the next");
                }
            }
        }
        node.metrics
            .egress_rejected(EgressRefusal::Unreachable, src, dst);
        answer(
            RequestRefusal::ServiceUnavailable,
            StatusCode::BAD_GATEWAY,
            None,
        )
    }

    /// Sends `req` to `peer` on a fresh stream of its tunnel.
    async fn attempt(&self, peer: &PeerInfo, req: Request<Body>) -> Try {
        let node = &self.node;
        let id = node.flows.next_id();
        let header = StreamHeader {
            src_service: self.up.source.clone(),
            dst_service: self.up.service.clone(),
            flow_id: id,
        };
        let (conn, _) = match tunnel::connection(node, peer).await {
            Ok(c) => c,
            Err(e) => return Try::Failed(e.to_string()),
        };
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                tunnel::forget(node, &peer.node, &conn);
                return Try::Failed(e.to_string());
            }
        };
        if let Err(e) = write_frame(&mut send, &header).await {
            return Try::Failed(e.to_string());
        }
        let Some(peer_id) = node.tunnels.identity(&conn) else {
            return Try::Failed("tunnel gone".into());
        };
        let (recv, answered) = AfterAnswer::new(recv);
        let stream = TokioIo::new(io::duplex(recv, send));
        let (guard, kill) = node.flows.register(
            FlowInfo {
                id,
                direction: Direction::Egress,
                peer: peer.node.clone(),
                peer_id,
                src: self.up.source.clone(),
                dst: self.up.service.clone(),
                rule: String::new(),
                http: true,
            },
            &node.metrics,
        );
        let load = self.load.start(&peer.node);
        // The connection (one request) is driven by its own task, which holds the flow's
        // registration and the instance's load until the response body and any upgraded
        // connection are done, or the flow is closed.
        let (closed_tx, closed) = watch::channel(None);
        let hold = move |c| async move {
            let _hold = (guard, load);
            if let Some(reason) = super::ingress::hold_until_closed(c, closed_tx, kill).await {
                tracing::info!(%reason, "request flow closed by node");
            }
        };
        let sent = if req.version() == Version::HTTP_2 {
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), stream).await {
                Ok((mut s, c)) => {
                    tokio::spawn(hold(Box::pin(async move {
                        let _ = c.await;
                    }) as Driven));
                    s.send_request(req).await
                }
                Err(e) => Err(e),
            }
        } else {
            match hyper::client::conn::http1::handshake(stream).await {
                Ok((mut s, c)) => {
                    tokio::spawn(hold(Box::pin(async move {
                        let _ = c.with_upgrades().await;
                    }) as Driven));
                    s.send_request(req).await
                }
                Err(e) => Err(e),
            }
        };
        match (sent, answered.get()) {
            (_, Some(Answer::Rejected(code, rule))) => Try::Rejected(*code, rule.clone()),
            (Ok(resp), _) => {
                node.metrics
                    .egress_accepted(self.up.source.as_str(), self.up.service.as_str());
                Try::Answered(resp, closed)
            }
            (Err(e), Some(Answer::Failed(why))) => Try::Failed(format!("{why} ({e})")),
            (Err(e), _) => Try::Failed(e.to_string()),
        }
    }
}

/// The URI sent through the tunnel: the normalised path and query, the authority kept
/// for HTTP/2 (where it is the `:authority`), origin-form for HTTP/1.1.
fn local_target(uri: &hyper::Uri, target: &quicmesh_protocol::http::Target) -> Option<hyper::Uri> {
    let pq = match &target.query {
        Some(q) => format!("{}?{q}", target.path),
        None => target.path.clone(),
    };
    let mut b = hyper::Uri::builder();
    if let (Some(s), Some(a)) = (uri.scheme(), uri.authority()) {
        b = b.scheme(s.clone()).authority(a.clone());
    }
    b.path_and_query(pq).build().ok()
}
