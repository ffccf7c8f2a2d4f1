//! The destination node's side: a tunnel stream to an `http` service is served as an
//! HTTP connection. Each request, in order:
//! 1. its target is normalised ([`quicmesh_protocol::http::parse_request`]); what servers
//!    disagree about is refused (400, `bad_target`); CONNECT and `Upgrade: h2c` cannot be
//!    judged request by request and are refused (400, `unjudgeable`);
//! 2. it is judged by [`authz::http_request`] against the view applied now (403 with the
//!    rule, or the standing or certificate reason);
//! 3. the normalised request is forwarded, hop-by-hop headers removed and the source
//!    service named in [`super::SOURCE_HEADER`], over a pooled connection to the service;
//!    a service that cannot be reached is a 502.
//!
//! A WebSocket (or any `Upgrade` the service accepts with 101) is judged as the request
//! that asks for it; the bytes after are the service's protocol, carried as they come and
//! closed with the flow when a policy or revocation change closes it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::http::parse_request;
use quicmesh_protocol::ident::ServiceName;
use quicmesh_protocol::policy;
use tokio::sync::{oneshot, watch};

use super::{
    boxed, framed, io, is_grpc, refusal, strip_hop_by_hop, wants_h2c, wants_upgrade, Body,
};
use crate::authz::{self, Direction, JudgedRequest, StreamRequest};
use crate::clock;
use crate::flow::{FlowInfo, SharedKill};
use crate::local_http::RequestPermit;
use crate::reason::{CloseReason, RequestRefusal};
use crate::state::Node;
use quicmesh_protocol::wire::{encode_frame, StreamReply};

/// One admitted stream to a local `http` service.
#[derive(Debug)]
pub struct Conn {
    pub peer: Arc<PeerIdentity>,
    pub src: ServiceName,
    pub dst: ServiceName,
    /// The service's address.
    pub address: SocketAddr,
    /// The service is `protocol = "http"`: each request is judged. Otherwise (a request
    /// from an `http` upstream to an L4 service) the stream's verdict is the request's.
    pub http: bool,
    /// The rule that admitted the stream.
    pub rule: String,
}

/// Serves the stream's requests until the peer ends it or the flow is closed (then every
/// upgraded connection it carries closes too). Returns the reason when closed.
pub async fn serve(
    node: Arc<Node>,
    conn: Conn,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    kill: oneshot::Receiver<CloseReason>,
) -> Option<CloseReason> {
    // Upgraded connections hold a receiver each: they close when the flow is closed, and
    // the flow stays registered (re-checked) while any of them lives.
    let (closed_tx, closed) = watch::channel(None);
    let idle = node.cfg.flow_idle_timeout;
    let conn = Arc::new(conn);
    let svc = hyper::service::service_fn(move |req| {
        let (node, conn, closed) = (node.clone(), conn.clone(), closed.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(&node, &conn, req, closed).await) }
    });
    let (stream, activity) = io::Active::new(io::duplex(recv, send));
    let io = TokioIo::new(stream);
    let serving: Driven = Box::pin(async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
        tokio::select! {
            r = builder.serve_connection_with_upgrades(io, svc) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "http connection ended");
                }
            }
            _ = activity.idle_for(idle) => tracing::info!(?idle, "http connection idle: closed"),
        }
    });
    hold_until_closed(serving, closed_tx, kill).await
}

/// How long a request head may take to arrive (HTTP/1.1).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Requests one HTTP/2 connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// A connection's driver, boxed (the server's and the clients' are distinct types).
pub(super) type Driven = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Drives `serving` (an HTTP connection), then waits while upgraded connections it handed
/// off hold a receiver of `closed`; a kill on the way closes them all. The reason, when
/// killed.
pub(super) async fn hold_until_closed(
    serving: Driven,
    closed: watch::Sender<Option<CloseReason>>,
    mut kill: oneshot::Receiver<CloseReason>,
) -> Option<CloseReason> {
    let killed = tokio::select! {
        _ = serving => None,
        reason = &mut kill => Some(reason.unwrap_or(CloseReason::NodeShutdown)),
    };
    let killed = match killed {
        Some(r) => Some(r),
        None => tokio::select! {
            _ = closed.closed() => None,
            reason = kill => Some(reason.unwrap_or(CloseReason::NodeShutdown)),
        },
    };
    if let Some(reason) = killed {
        let _ = closed.send(Some(reason));
    }
    killed
}

/// One request: judged and forwarded ([`judge_and_forward`]), then counted, its span
/// ended and its access log line written, whoever answered.
async fn handle(
    node: &Arc<Node>,
    conn: &Conn,
    mut req: Request<Incoming>,
    closed: watch::Receiver<Option<CloseReason>>,
) -> Response<Body> {
    let started = Instant::now();
    let mut ctx = super::Exchange::new(&req);
    ctx.peer = conn.peer.node.to_string();
    let client_side = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (resp, held) = judge_and_forward(node, conn, req.map(boxed), true, &mut ctx).await;
    let resp = match held {
        None => resp,
        Some(Held {
            kill,
            place,
            upgrade: Some(service),
        }) => {
            if let Some(client_side) = client_side {
                let idle = node.cfg.flow_idle_timeout;
                tokio::spawn(async move {
                    // The request's flow and place are held while the connection lives.
                    let _held = place;
                    let (a, b) = match tokio::try_join!(client_side, service) {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!(error = %e, "upgrade failed");
                            return;
                        }
                    };
                    splice(
                        TokioIo::new(a),
                        TokioIo::new(b),
                        Some(closed),
                        Some(kill),
                        idle,
                    )
                    .await
                });
            }
            resp
        }
        Some(Held { kill, place, .. }) => resp.map(|b| {
            boxed(Killable {
                inner: b,
                kill,
                _held: place,
            })
        }),
    };
    let pair = (conn.src.as_str(), conn.dst.as_str());
    ctx.done(node, Direction::Ingress, pair, &resp, started);
    resp
}

/// What an allowed request holds while any part of it lives (its answer, its upload, a
/// connection it switched to): its flow, re-judged as this request on every policy or
/// revocation change (`kill` fires when it would no longer be allowed), and its place
/// among the requests in flight.
pub(super) struct Held {
    kill: Arc<SharedKill>,
    /// Shared with the upload (which may outlive the answer).
    place: Arc<(crate::flow::FlowGuard, RequestPermit)>,
    /// The service switched protocols (101): its side of the new protocol.
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Resolves when `held`'s request is closed; never for a request that holds nothing
/// (refused) or whose flow went away without a verdict.
async fn closed_by_node(held: &Option<Held>) -> CloseReason {
    match held {
        Some(h) => h.kill.closed().await,
        None => std::future::pending().await,
    }
}

/// A framed request's body on its way to the service: its end (or drop) told to the
/// stream's task, and cut off when that task lets go of it (the stream was closed).
struct Upload<B> {
    inner: B,
    done: Option<oneshot::Sender<()>>,
    abort: oneshot::Receiver<()>,
    aborted: bool,
    /// [`UPLOAD_IDLE`], [`UPLOAD_STARTED`] or [`UPLOAD_DONE`], for the stream's task.
    state: Arc<std::sync::atomic::AtomicU8>,
}

/// The service's client has not read the body (a GET's never is).
const UPLOAD_IDLE: u8 = 0;
/// The body is being read.
const UPLOAD_STARTED: u8 = 1;
/// The body was read to its end, or failed.
const UPLOAD_DONE: u8 = 2;

impl<B> hyper::body::Body for Upload<B>
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = super::BoxError> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, super::BoxError>>> {
        use std::task::Poll;
        if !self.aborted && std::pin::Pin::new(&mut self.abort).poll(cx).is_ready() {
            self.aborted = true;
        }
        use std::sync::atomic::Ordering;
        if self.aborted {
            self.state.store(UPLOAD_DONE, Ordering::Relaxed);
            self.done.take();
            return Poll::Ready(Some(Err("the request's stream was closed".into())));
        }
        let _ = self.state.compare_exchange(
            UPLOAD_IDLE,
            UPLOAD_STARTED,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.state.store(UPLOAD_DONE, Ordering::Relaxed);
            if let Some(d) = self.done.take() {
                let _ = d.send(());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// The node's answer when the stream is given up: reset (the peer sees a failed answer).
fn abort(send: &mut quinn::SendStream) {
    let _ = send.reset(quinn::VarInt::from_u32(super::STREAM_ABORTED));
}

/// One request carried framed on its own stream ([`super::framed`]), from an `http`
/// upstream: judged and forwarded as a request of an HTTP connection is; the answer goes
/// back on the stream, and a 101 turns the stream into the new protocol's bytes. Every
/// wait is bounded by the flow idle timeout and ends when the stream's or the request's
/// flow is closed; the request's flow and place stay held until its answer is sent and
/// its upload is done. The reason, when closed by the node.
pub async fn serve_request(
    node: Arc<Node>,
    conn: Conn,
    head: quicmesh_protocol::http_wire::RequestHead,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut kill: oneshot::Receiver<CloseReason>,
) -> Option<CloseReason> {
    let started = Instant::now();
    let idle = node.cfg.flow_idle_timeout;
    let activity = io::Activity::new();
    let upgrade = head.upgrade;
    // A request that asks to switch protocols has no body: the stream goes on with the
    // new protocol's bytes, so it is kept here.
    let upload = Arc::new(std::sync::atomic::AtomicU8::new(UPLOAD_IDLE));
    let (body, mut kept, uploaded, _abort) = if upgrade {
        match tokio::time::timeout(HEADER_TIMEOUT, framed::read_empty_body(&mut recv)).await {
            Ok(Ok(())) => (super::full(bytes::Bytes::new()), Some(recv), None, None),
            other => {
                tracing::info!(result = ?other.map(|r| r.map_err(|e| e.to_string())), "upgrade request with a body: refused");
                abort(&mut send);
                return None;
            }
        }
    } else {
        let (done, uploaded) = oneshot::channel();
        let (abort_tx, abort) = oneshot::channel();
        let body = Upload {
            inner: boxed(framed::ChunkBody::new(recv, Some(activity.clone()))),
            done: Some(done),
            abort,
            aborted: false,
            state: upload.clone(),
        };
        (boxed(body), None, Some(uploaded), Some(abort_tx))
    };
    let judged = async {
        match framed::request(head, body) {
            Ok(req) => {
                let mut ctx = super::Exchange::new(&req);
                ctx.peer = conn.peer.node.to_string();
                let (resp, held) = judge_and_forward(&node, &conn, req, upgrade, &mut ctx).await;
                (resp, held, ctx)
            }
            Err(why) => {
                node.metrics.request_refused(
                    RequestRefusal::BadTarget,
                    conn.src.as_str(),
                    conn.dst.as_str(),
                );
                tracing::info!(why, "request head refused");
                let r = refusal(
                    StatusCode::BAD_REQUEST,
                    RequestRefusal::BadTarget.as_str(),
                    None,
                    false,
                );
                let mut ctx = super::Exchange::named("-", "-");
                ctx.peer = conn.peer.node.to_string();
                (r, None, ctx)
            }
        }
    };
    let (resp, mut held, ctx) = tokio::select! {
        r = judged => r,
        reason = &mut kill => return Some(reason.unwrap_or(CloseReason::NodeShutdown)),
        _ = activity.idle_for(idle) => {
            tracing::info!(?idle, "request idle while waiting for its answer: closed");
            abort(&mut send);
            return None;
        }
    };
    let pair = (conn.src.as_str(), conn.dst.as_str());
    let mut first = encode_frame(&StreamReply::Accept);
    first.extend_from_slice(&encode_frame(&framed::response_head(&resp)));
    ctx.done(&node, Direction::Ingress, pair, &resp, started);
    let service = held.as_mut().and_then(|h| h.upgrade.take());
    if let (Some(service), Some(recv)) = (service, kept.take()) {
        let switched = async {
            send.write_all(&first).await.ok()?;
            service.await.ok()
        };
        let service = tokio::select! {
            s = switched => s,
            _ = tokio::time::sleep(HEADER_TIMEOUT) => None,
        };
        let Some(service) = service else {
            tracing::debug!("upgrade failed");
            return None;
        };
        let h = held?;
        let _held = h.place;
        let stream = io::duplex(recv, send);
        tokio::select! {
            _ = splice(stream, TokioIo::new(service), None, Some(h.kill), idle) => return None,
            reason = kill => return Some(reason.unwrap_or(CloseReason::NodeShutdown)),
        }
    }
    let (_, mut body) = resp.into_parts();
    let sent = tokio::select! {
        r = framed::send_body(&mut body, &mut send, first, Some(&activity)) => r,
        reason = closed_by_node(&held) => {
            tracing::info!(%reason, "answer closed with its request's flow");
            abort(&mut send);
            return Some(reason);
        }
        reason = &mut kill => {
            abort(&mut send);
            return Some(reason.unwrap_or(CloseReason::NodeShutdown));
        }
        _ = activity.idle_for(idle) => {
            tracing::info!(?idle, "request idle: closed");
            abort(&mut send);
            return None;
        }
    };
    match sent {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => {
            tracing::debug!(error = %e, "answer not sent whole");
            abort(&mut send);
        }
    }
    // A service may answer before it has read the whole upload: an upload under way goes
    // on under the request's flow and place until it ends. One not started (a GET's, or
    // one the service never read) is cut off from here on (`_abort` is let go of).
    let under_way = upload.load(std::sync::atomic::Ordering::Relaxed) == UPLOAD_STARTED;
    if let Some(uploaded) = uploaded.filter(|_| under_way) {
        tokio::select! {
            _ = uploaded => {}
            reason = closed_by_node(&held) => {
                tracing::info!(%reason, "upload closed with its request's flow");
                return Some(reason);
            }
            reason = &mut kill => return Some(reason.unwrap_or(CloseReason::NodeShutdown)),
            _ = activity.idle_for(idle) => tracing::info!(?idle, "upload idle: closed"),
        }
    }
    None
}

/// Judges one request and forwards it to the service: the answer (the service's, or the
/// mesh's refusal), and the service's side when it switched protocols (`may_upgrade`:
/// the request asked to, and the client side can follow).
async fn judge_and_forward(
    node: &Arc<Node>,
    conn: &Conn,
    mut req: Request<Body>,
    may_upgrade: bool,
    ctx: &mut super::Exchange,
) -> (Response<Body>, Option<Held>) {
    let grpc = is_grpc(req.headers());
    let (src, dst) = (conn.src.as_str(), conn.dst.as_str());
    let method = req.method().clone();
    let refuse = |reason: RequestRefusal, status: StatusCode, rule: Option<&str>, why: &str| {
        node.metrics.request_refused(reason, src, dst);
        tracing::info!(reason = reason.as_str(), rule = rule.unwrap_or("-"), why, %method, "request refused");
        (refusal(status, reason.as_str(), rule, grpc), None)
    };
    if method == Method::CONNECT || wants_h2c(req.headers()) {
        return refuse(
            RequestRefusal::Unjudgeable,
            StatusCode::BAD_REQUEST,
            None,
            "CONNECT or h2c: the requests inside could not be judged",
        );
    }
    let target = req.uri().path_and_query().map_or("", |p| p.as_str());
    let (method, target) = match parse_request(method.as_str(), target) {
        Ok(x) => x,
        Err(e) => {
            return refuse(
                RequestRefusal::BadTarget,
                StatusCode::BAD_REQUEST,
                None,
                e.as_str(),
            )
        }
    };
    ctx.path = target.path.clone();
    // What is judged is what is forwarded: the headers of this hop go first (a
    // `Connection: x-tenant` would otherwise remove a judged header after the judging).
    let upgrade = may_upgrade && wants_upgrade(req.headers());
    if upgrade && framed::declares_body(req.headers()) {
        // A service that refuses the switch would read the body as the next request on
        // its (pooled, shared) connection.
        return refuse(
            RequestRefusal::BadTarget,
            StatusCode::BAD_REQUEST,
            None,
            "an upgrade request with a body",
        );
    }
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let hop = crate::telemetry::HopInfo {
        egress: false,
        method: &method,
        path: &target.path,
        src,
        dst,
        route: "default",
        peer: conn.peer.node.as_str(),
    };
    ctx.start_hop(node, req.headers(), hop);
    // Over HTTP/2 the authority is `:authority`; a service reads it as `Host`. It is
    // judged as the `host` header the service will see, and two that differ are refused.
    if req.version() == Version::HTTP_2 {
        if let Some(a) = req.uri().authority().map(|a| a.as_str().to_string()) {
            match req
                .headers()
                .get(header::HOST)
                .map(|h| h.as_bytes().to_vec())
            {
                Some(h) if !h.eq_ignore_ascii_case(a.as_bytes()) => {
                    return refuse(
                        RequestRefusal::BadTarget,
                        StatusCode::BAD_REQUEST,
                        None,
                        "host and :authority differ",
                    )
                }
                Some(_) => {}
                None => {
                    if let Ok(v) = HeaderValue::from_str(&a) {
                        req.headers_mut().insert(header::HOST, v);
                    }
                }
            }
        }
    }
    let (verdict, judged) = {
        let values = super::header_values(req.headers());
        let pairs = super::header_pairs(&values);
        let judged = JudgedRequest::new(&method, &target.path, &pairs);
        let request = policy::Request {
            method: &method,
            path: &target.path,
            headers: &pairs,
        };
        let stream = StreamRequest {
            peer: &conn.peer,
            src: &conn.src,
            dst: &conn.dst,
            hosted: true,
            http: true,
        };
        let verdict = if conn.http {
            authz::http_request(&node.view(), stream, &request, clock::unix_now())
        } else {
            // An L4 service: the stream's verdict (judged as opaque bytes) is the request's.
            Ok(conn.rule.clone())
        };
        (verdict, judged)
    };
    let rule = match verdict {
        Ok(rule) => rule,
        Err(authz::Denied { reason, rule }) => {
            let status = super::denial_status(reason);
            return refuse(reason, status, rule.as_deref(), "denied");
        }
    };
    let limits = node
        .cfg
        .service(&conn.dst)
        .map_or(&[][..], |s| &s.rate_limits[..]);
    if let Err(wait) = node.l7.admit(&conn.dst, &conn.src, limits, Instant::now()) {
        let (mut r, _) = refuse(
            RequestRefusal::RateLimited,
            StatusCode::TOO_MANY_REQUESTS,
            None,
            "rate limit",
        );
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return (r, None);
    }
    let Some(permit) = node.l7.try_request(&conn.peer.node) else {
        return refuse(
            RequestRefusal::Overloaded,
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "requests in flight",
        );
    };
    let (mut parts, body) = req.into_parts();
    let path = match &target.query {
        Some(q) => format!("{}?{q}", target.path),
        None => target.path.clone(),
    };
    parts.uri = match local_uri(conn.address, &path) {
        Some(u) => u,
        None => {
            return refuse(
                RequestRefusal::BadTarget,
                StatusCode::BAD_REQUEST,
                None,
                "target",
            )
        }
    };
    ctx.forward_trace(&mut parts.headers);
    super::remove_folded(&mut parts.headers, super::SOURCE_HEADER);
    if let Ok(v) = HeaderValue::from_str(src) {
        parts.headers.insert(super::SOURCE_HEADER, v);
    }
    let clients = node.l7.get(conn.address);
    let client = if parts.version == Version::HTTP_2 {
        clients.http2
    } else {
        clients.http1
    };
    tracing::debug!(%rule, path = %target.path, "request allowed");
    // From here the request is a flow of its own, re-judged as this request on every
    // policy or revocation change: while it waits for its answer, while the answer
    // streams, and as an upgraded connection; closed when it would no longer be allowed.
    let (guard, kill) = node.flows.register(
        FlowInfo {
            id: node.flows.next_id(),
            direction: Direction::Ingress,
            peer: conn.peer.node.clone(),
            peer_id: conn.peer.clone(),
            src: conn.src.clone(),
            dst: conn.dst.clone(),
            rule,
            http: conn.http,
            request: conn.http.then(|| Arc::new(judged)),
        },
        &node.metrics,
    );
    let kill = SharedKill::new(kill);
    let place = Arc::new((guard, permit));
    // The upload holds the request's flow and place too, and ends when the flow is
    // closed: a service may answer before it has read it all. Its trailers are left out:
    // headers the policy never judged (and the mesh's own names) could ride in them.
    let body = boxed(Killable {
        inner: NoTrailers(body),
        kill: kill.clone(),
        _held: place.clone(),
    });
    let sent = tokio::select! {
        r = client.request(Request::from_parts(parts, body)) => r,
        reason = kill.closed() => {
            tracing::info!(%reason, "request closed while waiting for its answer");
            return refuse(RequestRefusal::PolicyDenied, StatusCode::FORBIDDEN, None, "closed while waiting");
        }
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(address = %conn.address, error = %e, "local service failed");
            // Not reached: safe to try elsewhere. Reached: it may have had its effect.
            let reason = if e.is_connect() {
                RequestRefusal::ServiceUnavailable
            } else {
                RequestRefusal::ServiceFailed
            };
            return refuse(reason, StatusCode::BAD_GATEWAY, None, "local service");
        }
    };
    // Only the mesh names its own refusals.
    super::remove_folded(resp.headers_mut(), super::REASON_HEADER);
    super::remove_folded(resp.headers_mut(), super::RULE_HEADER);
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), switched);
    let upgrade = (switched && upgrade).then(|| hyper::upgrade::on(&mut resp));
    let held = Held {
        kill,
        place,
        upgrade,
    };
    (resp.map(boxed), Some(held))
}

/// A request body without its trailers.
struct NoTrailers<B>(B);

impl<B> hyper::body::Body for NoTrailers<B>
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = super::BoxError> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, super::BoxError>>> {
        loop {
            match std::task::ready!(std::pin::Pin::new(&mut self.0).poll_frame(cx)) {
                Some(Ok(f)) if f.is_trailers() => {
                    tracing::debug!("request trailers left out");
                }
                other => return std::task::Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}

/// A response body that ends with an error when its request's flow is closed; it holds
/// the request's flow and its place among the requests in flight until it is done.
pub(super) struct Killable<B, H> {
    pub(super) inner: B,
    pub(super) kill: Arc<SharedKill>,
    pub(super) _held: H,
}

impl<B, H: Unpin> hyper::body::Body for Killable<B, H>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<super::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, super::BoxError>>> {
        if let std::task::Poll::Ready(reason) = self.kill.poll_closed(cx) {
            tracing::info!(%reason, "response closed with its request's flow");
            return std::task::Poll::Ready(Some(Err(format!("closed: {reason}").into())));
        }
        std::pin::Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The URI a request to the local service is sent with: the service's address (the
/// connection goes there whatever it says) and the normalised path.
fn local_uri(address: SocketAddr, path_and_query: &str) -> Option<Uri> {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(Authority::try_from(address.to_string()).ok()?)
        .path_and_query(path_and_query)
        .build()
        .ok()
}

/// Carries an upgraded connection's bytes both ways until either side ends, nothing
/// moves for `idle`, or the flow is closed.
pub(super) async fn splice<A, B>(
    a: A,
    mut b: B,
    closed: Option<watch::Receiver<Option<CloseReason>>>,
    kill: Option<Arc<SharedKill>>,
    idle: std::time::Duration,
) where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let killed = async {
        match kill {
            Some(k) => {
                k.closed().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let (mut a, activity) = io::Active::new(a);
    tokio::select! {
        _ = activity.idle_for(idle) => {
            tracing::info!(?idle, "upgraded connection idle: closed");
        }
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            tracing::debug!(result = ?r, "upgraded connection ended");
        }
        _ = async {
            match closed {
                Some(mut c) => {
                    let _ = c.wait_for(|c| c.is_some()).await;
                }
                None => std::future::pending().await,
            }
        } => {
            tracing::info!("upgraded connection closed with its flow");
        }
        _ = killed => {
            tracing::info!("upgraded connection closed: its request is no longer allowed");
        }
    }
}
