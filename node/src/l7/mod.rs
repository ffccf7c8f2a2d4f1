//! HTTP awareness for services that opt in (`protocol = "http"`), L4 untouched for the
//! rest.
//!
//! - [`ingress`]: the destination node serves every tunnel stream to an `http` service as
//!   an HTTP connection (HTTP/1.1 or HTTP/2, told apart by the first bytes), judges each
//!   request with the one authorization core ([`crate::authz::http_request`]), forwards
//!   the normalised request over a pooled connection to the local service, and answers a
//!   refusal itself (403 with the rule).
//! - [`egress`]: an `http` upstream's listener speaks HTTP to local clients and sends
//!   each request on its own tunnel stream to an instance chosen per request: requests of
//!   one client connection never wait on each other, and no request waits for a
//!   handshake (the stream header and the request leave together).
//!
//! Both sides are built on hyper; nothing here parses HTTP by hand.

pub mod egress;
pub mod framed;
pub mod ingress;
pub mod io;
pub mod replay;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};

use crate::reason::RequestRefusal;

pub use crate::local_http::{Body, BoxError};

/// The header that names the source service to the destination service. Whatever a
/// client sent under this name is removed first: only the mesh writes it.
pub const SOURCE_HEADER: &str = "x-quicmesh-source";
/// The header on a refusal the mesh answered itself, naming why.
pub const REASON_HEADER: &str = "x-quicmesh-reason";
/// The header on a policy refusal naming the deciding rule.
pub const RULE_HEADER: &str = "x-quicmesh-rule";

/// The stream error code of an exchange given up before its end (a body cut short).
pub const STREAM_ABORTED: u32 = 0x51;

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// What one exchange (request and response) leaves behind: its route, its span; ended
/// at the one exit point of each side ([`Exchange::done`]).
#[derive(Debug)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub route: String,
    pub hop: Option<crate::telemetry::Hop>,
    /// The other node, when known.
    pub peer: String,
}

impl Exchange {
    pub fn new<B>(req: &hyper::Request<B>) -> Self {
        Self::named(req.method().as_str(), req.uri().path())
    }

    /// An exchange of a request known by its method and path (as received).
    pub fn named(method: &str, path: &str) -> Self {
        Self {
            method: method.to_string(),
            path: path.to_string(),
            route: "default".into(),
            hop: None,
            peer: String::new(),
        }
    }

    /// Starts this hop's span for a request that came with `headers`.
    pub fn start_hop(
        &mut self,
        node: &crate::state::Node,
        headers: &HeaderMap,
        info: crate::telemetry::HopInfo<'_>,
    ) {
        let incoming = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
        self.hop = Some(node.telemetry.hop(incoming, info));
    }

    /// Sets the `traceparent` the next hop continues: this hop's, or the incoming one.
    pub fn forward_trace(&self, h: &mut HeaderMap) {
        if let Some(tp) = self.hop.as_ref().and_then(|hop| hop.traceparent) {
            if let Ok(v) = HeaderValue::from_str(&tp.to_header()) {
                h.insert(TRACEPARENT, v);
            }
        }
    }

    /// Counts the exchange, ends its span, writes its access log line.
    pub fn done(
        mut self,
        node: &crate::state::Node,
        direction: crate::authz::Direction,
        (src, dst): (&str, &str),
        resp: &Response<Body>,
        started: std::time::Instant,
    ) {
        let status = resp.status().as_u16();
        let elapsed = started.elapsed();
        let reason = resp
            .headers()
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok());
        node.metrics.http_request(crate::metrics::RequestOutcome {
            direction,
            src,
            dst,
            route: &self.route,
            status,
            elapsed,
        });
        let hop = self.hop.take();
        let trace = hop.as_ref().and_then(|h| h.trace_id());
        if node.telemetry.access_log {
            tracing::info!(
                target: "quicmesh::access",
                direction = ?direction,
                src,
                dst,
                method = %self.method,
                path = %self.path,
                route = %self.route,
                status,
                duration_us = elapsed.as_micros() as u64,
                reason = reason.unwrap_or("-"),
                peer = %self.peer,
                trace_id = trace.as_deref().unwrap_or("-"),
                "request"
            );
        }
        if let Some(h) = hop {
            h.finish(status, reason);
        }
    }
}

/// How the routes of the `http` upstreams are set, as the coordinator's dashboard shows
/// them (at most [`quicmesh_protocol::wire::MAX_ROUTE_REPORTS`]).
pub fn route_settings(
    upstreams: &[crate::config::UpstreamConfig],
) -> Vec<quicmesh_protocol::wire::RouteSettings> {
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    upstreams
        .iter()
        .filter(|u| u.protocol == crate::config::Protocol::Http)
        .flat_map(|u| {
            u.http
                .routes
                .iter()
                .map(move |r| quicmesh_protocol::wire::RouteSettings {
                    src: u.source.clone(),
                    dst: u.service.clone(),
                    route: r.name.clone(),
                    path_prefix: r.matches.path_prefix.clone(),
                    headers: r.matches.headers.clone(),
                    split: r
                        .split
                        .iter()
                        .map(|s| (s.labels.clone(), s.weight))
                        .collect(),
                    timeout_ms: ms(r.timeout),
                    per_try_timeout_ms: r.per_try_timeout.map(ms),
                    retries: r.retries,
                    fault: r.fault.as_ref().map(|f| {
                        format!(
                            "delay {}ms on {}%, abort {} on {}%",
                            ms(f.delay),
                            f.delay_percent,
                            f.abort_status,
                            f.abort_percent
                        )
                    }),
                })
        })
        .take(quicmesh_protocol::wire::MAX_ROUTE_REPORTS)
        .collect()
}

/// A body the proxy wrote.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A body received from hyper, boxed.
pub fn boxed<B>(b: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

/// Whether a request or response is gRPC (its refusals are gRPC statuses).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// An answer the mesh gives itself: `status` with the reason (and rule) in headers and
/// the body. To a gRPC client, a gRPC status with the same words (HTTP 200, trailers
/// only), which is what its library reports.
pub fn refusal(status: StatusCode, reason: &str, rule: Option<&str>, grpc: bool) -> Response<Body> {
    let text = match rule {
        Some(r) => format!("quicmesh: {reason} by {r}"),
        None => format!("quicmesh: {reason}"),
    };
    let mut resp = if grpc {
        let code = match status {
            // Failed after the service had the request: not a status clients retry.
            _ if reason == "service_failed" => "13", // INTERNAL
            StatusCode::FORBIDDEN => "7",            // PERMISSION_DENIED
            StatusCode::NOT_FOUND => "12",           // UNIMPLEMENTED
            StatusCode::TOO_MANY_REQUESTS => "8",    // RESOURCE_EXHAUSTED
            StatusCode::GATEWAY_TIMEOUT => "4",      // DEADLINE_EXCEEDED
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => "14", // UNAVAILABLE
            StatusCode::BAD_REQUEST => "3",          // INVALID_ARGUMENT
            _ => "2",                                // UNKNOWN
        };
        let mut r = Response::new(full(Bytes::new()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(code));
        if let Ok(v) = HeaderValue::from_str(&text) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(format!("{text}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert(REASON_HEADER, v);
    }
    if let Some(v) = rule.and_then(|r| HeaderValue::from_str(r).ok()) {
        h.insert(RULE_HEADER, v);
    }
    resp
}

/// Removes every header that names `name` as servers read names (any case, `_` as `-`):
/// what only the mesh may write.
pub fn remove_folded(h: &mut HeaderMap, name: &str) {
    let found: Vec<HeaderName> = h
        .keys()
        .filter(|k| quicmesh_protocol::policy::same_header(k.as_str(), name))
        .cloned()
        .collect();
    for k in found {
        h.remove(k);
    }
}

/// The status of a request the authorization core (here or at the peer) refused.
pub fn denial_status(reason: RequestRefusal) -> StatusCode {
    match reason {
        RequestRefusal::UnknownService => StatusCode::NOT_FOUND,
        RequestRefusal::RepeatedHeader | RequestRefusal::BadTarget => StatusCode::BAD_REQUEST,
        RequestRefusal::ServiceUnavailable => StatusCode::BAD_GATEWAY,
        _ => StatusCode::FORBIDDEN,
    }
}

/// A request's headers as policy and routes read them: names, and values (not UTF-8
/// ones in lossy form, which no rule's value can equal).
pub fn header_values(h: &HeaderMap) -> Vec<(&str, std::borrow::Cow<'_, str>)> {
    h.iter()
        .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

/// [`header_values`] as the pairs policy takes.
pub fn header_pairs<'a>(
    values: &'a [(&'a str, std::borrow::Cow<'a, str>)],
) -> Vec<(&'a str, &'a str)> {
    values.iter().map(|(n, v)| (*n, v.as_ref())).collect()
}

/// Headers that belong to one hop: never forwarded.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "te",
];

/// Removes the hop-by-hop headers (and those `Connection` names). `upgrade` keeps
/// `Connection: upgrade` and `Upgrade` for a request or answer that switches protocols;
/// `TE: trailers` stays (gRPC needs it).
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let upgrade_value = h.get(header::UPGRADE).cloned();
    let te_trailers = h.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        if let Some(u) = upgrade_value {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, u);
        }
    }
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Connection: upgrade`).
pub fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Whether a request asks to switch to HTTP/2 in clear (`Upgrade: h2c`): the requests
/// after it would not be judged one by one, so it is refused.
pub fn wants_h2c(h: &HeaderMap) -> bool {
    h.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str().map_or(true, |s| {
            s.split(',')
                .any(|t| t.trim().to_ascii_lowercase().starts_with("h2c"))
        })
    }) || h.contains_key("http2-settings")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers, deflate"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none(), "named by Connection");
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers", "gRPC's TE stays");
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn every_spelling_of_a_mesh_header_is_removed() {
        let mut h = map(&[
            ("x-quicmesh-source", "admin"),
            ("x_quicmesh_source", "admin"),
            ("X_QuicMesh-Source", "admin"),
            ("x-quicmesh-sources", "kept"),
        ]);
        remove_folded(&mut h, SOURCE_HEADER);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-quicmesh-sources"));
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_headers_only_when_asked() {
        let src = [("connection", "Upgrade"), ("upgrade", "websocket")];
        let mut h = map(&src);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        let mut h = map(&src);
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("upgrade").is_none());
        assert!(
            !wants_upgrade(&map(&[("upgrade", "websocket")])),
            "no Connection: upgrade"
        );
    }

    #[test]
    fn h2c_is_spotted_in_any_spelling() {
        assert!(wants_h2c(&map(&[("upgrade", "H2C")])));
        assert!(wants_h2c(&map(&[("upgrade", "websocket, h2c")])));
        assert!(wants_h2c(&map(&[(
            "http2-settings",
            "AAMAAABkAAQAoAAAAAIAAAAA"
        )])));
        assert!(!wants_h2c(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn a_grpc_refusal_is_a_grpc_status() {
        let r = refusal(
            StatusCode::FORBIDDEN,
            "policy_denied",
            Some("rule[2]"),
            true,
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()[RULE_HEADER], "rule[2]");
        let r = refusal(
            StatusCode::FORBIDDEN,
            "policy_denied",
            Some("rule[2]"),
            false,
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.headers().get("grpc-status").is_none());
    }
}
