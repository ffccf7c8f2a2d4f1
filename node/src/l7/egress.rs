//! An `http` upstream: the local listener speaks HTTP (HTTP/1.1 or HTTP/2, told apart by
//! the first bytes), and every request rides its own tunnel stream to an instance chosen
//! for that request. The stream header and the request leave together; the ingress's
//! answer is read before the response ([`super::io::AfterAnswer`]), so a request costs no
//! round trip of its own, and requests of one client connection never wait on each other.
//!
//! Per request, in order: the route (the first of the upstream's routes that takes it;
//! the upstream's own `default` route otherwise), faults the route injects, the subset
//! its split draws, the instances of that subset (ejected outliers left out unless none
//! would be left), then tries ([`Upstream::tries`]) under the route's timeout. Every
//! answer the mesh gives itself names its reason ([`RequestRefusal`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use quicmesh_protocol::http::parse_request;
use quicmesh_protocol::http_route::{
    idempotent, in_subset, select, Budget, Ejected, Outlier, Route, Split,
};
use quicmesh_protocol::http_wire::{Chunk, RequestOpen};
use quicmesh_protocol::ident::NodeName;
use quicmesh_protocol::policy;
use quicmesh_protocol::wire::{encode_frame, PeerInfo, RejectCode, StreamHeader};
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::Instrument;

use super::replay::Replay;
use super::{boxed, is_grpc, refusal, strip_hop_by_hop, wants_h2c, wants_upgrade, Body};
use super::{framed, io};
use crate::authz::{self, Direction};
use crate::config::UpstreamConfig;
use crate::flow::FlowInfo;
use crate::proxy::{instances, Load};
use crate::reason::{CloseReason, EgressRefusal, RequestRefusal};
use crate::state::Node;
use crate::tunnel;

/// How long the HTTP/1.1 request head may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Client connections one upstream listener holds at once; more are closed at once.
const MAX_CLIENT_CONNECTIONS: usize = 4096;
/// Retries allowed a window regardless of traffic (a quiet upstream can still retry).
const RETRY_FLOOR: u32 = 10;
/// The retry budget's window.
const RETRY_WINDOW: Duration = Duration::from_secs(10);

/// Serves one `http` upstream listener forever.
pub async fn serve(node: Arc<Node>, up: UpstreamConfig, listener: TcpListener) {
    let shared = Arc::new(Upstream {
        state: Mutex::new(State {
            budget: Budget::new(up.http.retry_budget, RETRY_FLOOR, RETRY_WINDOW),
            outliers: HashMap::new(),
        }),
        node,
        up,
        load: Arc::new(Load::default()),
    });
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENT_CONNECTIONS));
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "upstream accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            // Closed at once: a client over the limit gets a reset, not a queue.
            shared.node.metrics.request_refused(
                RequestRefusal::Overloaded,
                shared.up.source.as_str(),
                shared.up.service.as_str(),
            );
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let span =
            tracing::info_span!("http", %client, src = %shared.up.source, dst = %shared.up.service);
        tokio::spawn(
            async move {
                let _slot = slot;
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
    state: Mutex<State>,
}

/// What the upstream learns from its requests.
struct State {
    budget: Budget,
    /// Per instance; bounded by the instances of the service (pruned to the view).
    outliers: HashMap<NodeName, Outlier>,
}

/// How one try ended.
enum Try {
    /// With the stream of a request switched to another protocol.
    Answered(Response<Body>, Option<Box<Upgraded>>),
    /// Refused by the peer's ingress.
    Rejected(RejectCode, Option<String>),
    /// The instance could not be reached: nothing was sent.
    Unreached(String),
    /// The stream failed after the request was sent (it may have had its effect).
    Failed(String),
    /// No response head within the per-try timeout.
    TimedOut,
}

/// What a request is, for the choices made about it.
struct Judged<'a> {
    method: &'a str,
    route: &'a Route,
    /// It asks to switch protocols.
    upgrade: bool,
}

impl Upstream {
    /// One request: routed and sent ([`Self::route_request`]), then counted, its span
    /// ended and its access log line written, whoever answered.
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let mut ctx = super::Exchange::new(&req);
        let resp = self.route_request(req, &mut ctx).await;
        ctx.done(
            &self.node,
            Direction::Egress,
            (self.up.source.as_str(), self.up.service.as_str()),
            &resp,
            started,
        );
        resp
    }

    async fn route_request(
        &self,
        mut req: Request<Incoming>,
        ctx: &mut super::Exchange,
    ) -> Response<Body> {
        let node = &self.node;
        let (src, dst) = (self.up.source.as_str(), self.up.service.as_str());
        let grpc = is_grpc(req.headers());
        let mut route_name = "default";
        let answer =
            |route: &str, reason: RequestRefusal, status: StatusCode, rule: Option<&str>| {
                node.metrics.request_refused(reason, src, dst);
                tracing::info!(
                    reason = reason.as_str(),
                    rule = rule.unwrap_or("-"),
                    route,
                    "request answered by the mesh"
                );
                refusal(status, reason.as_str(), rule, grpc)
            };
        if req.method() == Method::CONNECT || wants_h2c(req.headers()) {
            return answer(
                route_name,
                RequestRefusal::Unjudgeable,
                StatusCode::BAD_REQUEST,
                None,
            );
        }
        // This hop's headers go first: routes and the egress check see what is sent.
        let upgrade = wants_upgrade(req.headers());
        if upgrade && framed::declares_body(req.headers()) {
            // Refused here as at the destination (where an L4 upstream's requests meet the
            // same check): a service that refuses the switch would read the body as the
            // next request on its connection.
            return answer(
                route_name,
                RequestRefusal::BadTarget,
                StatusCode::BAD_REQUEST,
                None,
            );
        }
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let target = req.uri().path_and_query().map_or("", |p| p.as_str());
        let (method, target) = match parse_request(req.method().as_str(), target) {
            Ok(x) => x,
            Err(e) => {
                tracing::info!(refusal = e.as_str(), "bad request target");
                return answer(
                    route_name,
                    RequestRefusal::BadTarget,
                    StatusCode::BAD_REQUEST,
                    None,
                );
            }
        };
        ctx.path = target.path.clone();
        let values = super::header_values(req.headers());
        let pairs = super::header_pairs(&values);
        let routes = &self.up.http.routes;
        let route =
            select(routes, &target.path, &pairs).unwrap_or_else(|| &routes[routes.len() - 1]);
        route_name = &route.name;
        ctx.route = route.name.clone();
        let hop = crate::telemetry::HopInfo {
            egress: true,
            method: &method,
            path: &target.path,
            src,
            dst,
            route: &route.name,
            peer: "",
        };
        ctx.start_hop(node, req.headers(), hop);
        let view = node.view();
        if node.cfg.check_egress {
            let request = policy::Request {
                method: &method,
                path: &target.path,
                headers: &pairs,
            };
            // Judged against every instance's labels at the ingress; here, the first one.
            if let Some(first) = view.healthy(&self.up.service).next() {
                if let Err(rule) = authz::egress_request(
                    &view,
                    &self.up.source,
                    &self.up.service,
                    &first.node,
                    &request,
                ) {
                    node.metrics
                        .egress_rejected(EgressRefusal::PolicyDenied, src, dst);
                    return answer(
                        route_name,
                        RequestRefusal::PolicyDenied,
                        StatusCode::FORBIDDEN,
                        Some(&rule),
                    );
                }
            }
        }
        let (roll_abort, roll_delay, roll_split): (f64, f64, u32) = {
            let mut rng = rand::thread_rng();
            (
                rng.gen_range(0.0..100.0),
                rng.gen_range(0.0..100.0),
                rng.gen(),
            )
        };
        if let Some(f) = &route.fault {
            if roll_delay < f.delay_percent && !f.delay.is_zero() {
                tokio::time::sleep(f.delay).await;
            }
            if roll_abort < f.abort_percent {
                let status =
                    StatusCode::from_u16(f.abort_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return answer(route_name, RequestRefusal::FaultInjected, status, None);
            }
        }
        let order = self.candidates(&view, route.subset(roll_split));
        if order.is_empty() {
            node.metrics
                .egress_rejected(EgressRefusal::NoInstance, src, dst);
            return answer(
                route_name,
                RequestRefusal::NoInstance,
                StatusCode::SERVICE_UNAVAILABLE,
                None,
            );
        }
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        parts.uri = match local_target(&parts.uri, &target) {
            Some(u) => u,
            None => {
                return answer(
                    route_name,
                    RequestRefusal::BadTarget,
                    StatusCode::BAD_REQUEST,
                    None,
                )
            }
        };
        ctx.forward_trace(&mut parts.headers);
        let judged = Judged {
            method: &method,
            route,
            upgrade,
        };
        let mut body = Replay::new(body);
        let tries = self.tries(&view, &order, &parts, &mut body, &judged);
        let (resp, upgraded) = match tokio::time::timeout(route.timeout, tries).await {
            Ok(Ok(x)) => x,
            Ok(Err((reason, status, rule))) => {
                return answer(route_name, reason, status, rule.as_deref())
            }
            Err(_) => {
                return answer(
                    route_name,
                    RequestRefusal::Timeout,
                    StatusCode::GATEWAY_TIMEOUT,
                    None,
                );
            }
        };
        let mut resp = resp;
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (Some(up), Some(client_side)) = (upgraded, client_side) {
            let idle = node.cfg.flow_idle_timeout;
            tokio::spawn(async move {
                let _held = up.held;
                match client_side.await {
                    Ok(client) => {
                        let client = TokioIo::new(client);
                        super::ingress::splice(
                            client,
                            up.stream,
                            None,
                            Some(crate::flow::SharedKill::new(up.kill)),
                            idle,
                        )
                        .await
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        }
        strip_hop_by_hop(resp.headers_mut(), switched);
        resp
    }

    /// The instances for a request: healthy, in the subset when the route split names
    /// one, ejected ones left out unless that leaves none; nearest and least loaded first.
    fn candidates(&self, view: &crate::state::View, subset: Option<&Split>) -> Vec<NodeName> {
        let all = instances(view, &self.up, &self.load, |n| {
            self.node.tunnels.is_silent(n)
        });
        let labelled: Vec<NodeName> = all
            .into_iter()
            .filter(|n| {
                subset.is_none_or(|s| {
                    view.peers.get(n).is_some_and(|p| {
                        in_subset(&s.labels, |k| p.labels.get(k).map(String::from))
                    })
                })
            })
            .collect();
        let now = Instant::now();
        let Ok(mut st) = self.state.lock() else {
            return labelled;
        };
        // Forget instances that left the service.
        if st.outliers.len() > labelled.len() * 2 + 16 {
            st.outliers.retain(|n, _| view.peers.contains_key(n));
        }
        let live: Vec<NodeName> = labelled
            .iter()
            .filter(|n| !st.outliers.get(*n).is_some_and(|o| o.ejected(now)))
            .cloned()
            .collect();
        if live.is_empty() {
            labelled
        } else {
            live
        }
    }

    /// Records a try's result on `peer`'s outlier state; `instances` are the request's
    /// candidates, of which those not ejected now are in service (the last one in service
    /// is never ejected, counted now: an earlier try of the same request may have ejected
    /// another).
    fn record(&self, peer: &NodeName, ok: bool, instances: &[NodeName]) {
        let Some(policy) = &self.up.http.ejection else {
            return;
        };
        let now = Instant::now();
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let others = instances
            .iter()
            .filter(|n| *n != peer && !st.outliers.get(*n).is_some_and(|o| o.ejected(now)))
            .count();
        let o = st.outliers.entry(peer.clone()).or_default();
        match o.record(ok, policy, others, now) {
            Ejected::No => {}
            Ejected::For(span) => {
                tracing::warn!(%peer, ?span, "instance ejected after consecutive failures");
                self.node
                    .metrics
                    .instance_ejected(self.up.service.as_str(), false);
            }
            Ejected::KeptAsLast => {
                tracing::warn!(%peer, "instance failing but kept: it is the last one in service");
                self.node
                    .metrics
                    .instance_ejected(self.up.service.as_str(), true);
            }
        }
    }

    /// Whether the retry budget allows one more try.
    fn may_retry(&self) -> bool {
        self.state
            .lock()
            .is_ok_and(|mut s| s.budget.withdraw(Instant::now()))
    }

    /// Tries instances in `order` until one answers in a way that is not retried. An
    /// instance that cannot be reached, or whose service is down, passes the request to
    /// the next (nothing was delivered); a failure after delivery is retried only when
    /// the route allows it, the request is safe to repeat, its body was kept and the
    /// budget allows.
    async fn tries(
        &self,
        view: &crate::state::View,
        order: &[NodeName],
        parts: &hyper::http::request::Parts,
        body: &mut Replay,
        judged: &Judged<'_>,
    ) -> Result<(Response<Body>, Option<Box<Upgraded>>), (RequestRefusal, StatusCode, Option<String>)>
    {
        let (src, dst) = (self.up.source.as_str(), self.up.service.as_str());
        let node = &self.node;
        let route = judged.route;
        if let Ok(mut s) = self.state.lock() {
            s.budget.request(Instant::now());
        }
        let mut retries_left = route.retries;
        // Passing on undelivered requests is bounded by the instances; retries by the route.
        let mut moves_left = order.len();
        let mut last: (RequestRefusal, StatusCode) =
            (RequestRefusal::Unreachable, StatusCode::BAD_GATEWAY);
        let mut i = 0usize;
        loop {
            let Some(name) = order.get(i % order.len()) else {
                return Err((last.0, last.1, None));
            };
            i += 1;
            let Some(peer) = view.peers.get(name) else {
                continue;
            };
            if !body.available() {
                return Err((last.0, last.1, None));
            }
            let attempt = self.attempt(peer, parts, body, judged.upgrade);
            let result = match route.per_try_timeout {
                Some(t) => tokio::time::timeout(t, attempt)
                    .await
                    .unwrap_or(Try::TimedOut),
                None => attempt.await,
            };
            let retry = |this: &Self, retries_left: &mut u32| {
                if *retries_left > 0 && body.available() && this.may_retry() {
                    *retries_left -= 1;
                    node.metrics.request_retried(src, dst);
                    true
                } else {
                    false
                }
            };
            match result {
                Try::Answered(resp, upgraded) => {
                    let status = resp.status().as_u16();
                    let grpc_status = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    let failed =
                        status >= 500 || grpc_status.is_some_and(|g| route.retry_grpc.contains(&g));
                    self.record(name, !failed, order);
                    if route.retryable(judged.method, status, grpc_status)
                        && retry(self, &mut retries_left)
                    {
                        tracing::info!(peer = %name, status, ?grpc_status, "retrying");
                        continue;
                    }
                    return Ok((resp, upgraded));
                }
                Try::Rejected(code, rule) => {
                    node.metrics.egress_rejected(code, src, dst);
                    tracing::info!(peer = %name, reason = code.as_str(), rule = rule.as_deref().unwrap_or("-"), "rejected by peer ingress");
                    if code == RejectCode::ServiceUnavailable {
                        self.record(name, false, order);
                        last = (RequestRefusal::ServiceUnavailable, StatusCode::BAD_GATEWAY);
                        if moves_left > 1 {
                            moves_left -= 1;
                            continue;
                        }
                        return Err((last.0, last.1, None));
                    }
                    let reason = RequestRefusal::from_reject(code);
                    return Err((reason, super::denial_status(reason), rule));
                }
                Try::Unreached(e) => {
                    tracing::warn!(peer = %name, error = %e, "instance unreachable, trying the next");
                    self.record(name, false, order);
                    last = (RequestRefusal::Unreachable, StatusCode::BAD_GATEWAY);
                    if moves_left > 1 {
                        moves_left -= 1;
                        continue;
                    }
                    return Err((last.0, last.1, None));
                }
                Try::Failed(e) => {
                    tracing::warn!(peer = %name, error = %e, "request failed after it was sent");
                    if body.client_failed() {
                        // The client's own body broke: not the instance's fault.
                        return Err((
                            RequestRefusal::BadRequestBody,
                            StatusCode::BAD_REQUEST,
                            None,
                        ));
                    }
                    if body.whole() {
                        self.record(name, false, order);
                    }
                    last = (RequestRefusal::Unreachable, StatusCode::BAD_GATEWAY);
                    if idempotent(judged.method) && retry(self, &mut retries_left) {
                        continue;
                    }
                    return Err((last.0, last.1, None));
                }
                Try::TimedOut => {
                    tracing::warn!(peer = %name, "no response within the per-try timeout");
                    // A client still sending its body holds the try up, not the instance.
                    if body.whole() {
                        self.record(name, false, order);
                    }
                    last = (RequestRefusal::Timeout, StatusCode::GATEWAY_TIMEOUT);
                    if idempotent(judged.method) && retry(self, &mut retries_left) {
                        continue;
                    }
                    return Err((last.0, last.1, None));
                }
            }
        }
    }

    /// Sends the request to `peer` on a fresh stream of its tunnel, framed
    /// ([`super::framed`]): the stream header and the request head in one frame, the body
    /// taken only once the stream is open and sent while the answer is awaited (a service
    /// may answer before the whole body).
    async fn attempt(
        &self,
        peer: &PeerInfo,
        parts: &hyper::http::request::Parts,
        body: &mut Replay,
        upgrade: bool,
    ) -> Try {
        let node = &self.node;
        let id = node.flows.next_id();
        let (conn, _) = match tunnel::connection(node, peer).await {
            Ok(c) => c,
            Err(e) => return Try::Unreached(e.to_string()),
        };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                tunnel::forget(node, &peer.node, &conn);
                return Try::Unreached(e.to_string());
            }
        };
        let Some(peer_id) = node.tunnels.identity(&conn) else {
            return Try::Unreached("tunnel gone".into());
        };
        let Some(mut body) = body.take() else {
            return Try::Failed("the body cannot be sent again".into());
        };
        // Only a request without a body switches protocols: the stream goes on with the
        // new protocol's bytes.
        let empty = body.is_end_stream();
        let upgrade = upgrade && empty;
        let open = RequestOpen {
            stream: StreamHeader {
                src_service: self.up.source.clone(),
                dst_service: self.up.service.clone(),
                flow_id: id,
            },
            head: framed::request_head(parts, upgrade),
        };
        let mut first = encode_frame(&open);
        if empty {
            first.extend_from_slice(&Chunk::End.prefix());
        }
        if let Err(e) = send.write_all(&first).await {
            tunnel::forget(node, &peer.node, &conn);
            return Try::Unreached(e.to_string());
        }
        if empty && !upgrade {
            let _ = send.finish();
        }
        let (guard, mut kill) = node.flows.register(
            FlowInfo {
                id,
                direction: Direction::Egress,
                peer: peer.node.clone(),
                peer_id,
                src: self.up.source.clone(),
                dst: self.up.service.clone(),
                rule: String::new(),
                http: true,
                request: None,
            },
            &node.metrics,
        );
        let load = self.load.start(&peer.node);
        let (mut kept, mut sending) = if empty {
            (Some(send), None)
        } else {
            let rest = async move {
                framed::send_body(&mut body, &mut send, Vec::new(), None).await?;
                let _ = send.finish();
                Ok::<_, framed::SendError>(())
            };
            (None, Some(Box::pin(rest)))
        };
        let answer = {
            let answered = framed::read_answer(&mut recv);
            tokio::pin!(answered);
            loop {
                tokio::select! {
                    a = &mut answered => break a,
                    r = async { sending.as_mut().expect("guarded").await }, if sending.is_some() => {
                        sending = None;
                        match r {
                            Ok(()) => {}
                            Err(framed::SendError::Body(e)) => {
                                return Try::Failed(format!("the client's body failed: {e}"))
                            }
                            // Stopped by the destination (it may have answered without
                            // reading it all): its answer says how the request ended.
                            Err(e) => tracing::debug!(error = %e, "request body not sent whole"),
                        }
                    }
                    reason = &mut kill => {
                        let reason = reason.unwrap_or(CloseReason::NodeShutdown);
                        return Try::Failed(format!("closed: {reason}"));
                    }
                }
            }
        };
        if let Some(rest) = sending {
            // Answered while the body still streams (a bidirectional stream): the rest
            // goes on beside the answer.
            tokio::spawn(async move {
                if let Err(e) = rest.await {
                    tracing::debug!(error = %e, "request body not sent whole");
                }
            });
        }
        let head = match answer {
            Ok(framed::Answer::Response(head)) => head,
            Ok(framed::Answer::Rejected(code, rule)) => return Try::Rejected(code, rule),
            Err(e) => return Try::Failed(e.to_string()),
        };
        node.metrics
            .egress_accepted(self.up.source.as_str(), self.up.service.as_str());
        let switched = head.status == StatusCode::SWITCHING_PROTOCOLS.as_u16();
        if let (true, true, Some(send)) = (switched, upgrade, kept.take()) {
            return match framed::response(head, super::full(bytes::Bytes::new())) {
                Ok(resp) => Try::Answered(
                    resp,
                    Some(Box::new(Upgraded {
                        stream: io::duplex(recv, send),
                        kill,
                        held: (guard, load),
                    })),
                ),
                Err(e) => Try::Failed(e),
            };
        }
        let body = super::ingress::Killable {
            inner: framed::ChunkBody::new(recv, None),
            kill: crate::flow::SharedKill::new(kill),
            _held: (guard, load),
        };
        match framed::response(head, boxed(body)) {
            Ok(resp) => Try::Answered(resp, None),
            Err(e) => Try::Failed(e),
        }
    }
}

/// A request the destination switched to another protocol (101): the stream, carrying
/// the new protocol's bytes, and what the request holds while it lives.
struct Upgraded {
    stream: io::StreamIo<quinn::RecvStream>,
    kill: oneshot::Receiver<CloseReason>,
    held: (crate::flow::FlowGuard, crate::proxy::LoadGuard),
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
