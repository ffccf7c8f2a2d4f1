//! The dashboard's side of the HTTP server: sign-in sessions (an HttpOnly, SameSite=Strict
//! cookie plus a CSRF token for every change), the auth layer every `/api/v1` route sits
//! behind, live events (server-sent events), the traffic and topology views, the OpenAPI
//! document, and the pages, embedded in the binary (no CDN: closed networks).
//!
//! Credentials: the admin token (everything) or the read-only token `reader.token`
//! (reads everything, changes nothing), as `Authorization: Bearer` (the CLI) or traded for
//! a session cookie at `POST /api/v1/session` (the browser). Sign-in attempts are limited
//! per client source (an IPv4 address or an IPv6 /64), never globally: the table is
//! bounded and a full table forgets its oldest source, so a flood from one source (or
//! many) never locks out another. Behind a reverse proxy given as `--trusted-proxy`, the
//! client is the rightmost address in `X-Forwarded-For` that is not a trusted proxy; the
//! header is ignored from any other peer.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use quicmesh_node::admin::http::HttpRefusals;
use quicmesh_protocol::overlay::Prefix;

use crate::mesh::{Mesh, MeshError, Role};

/// The session cookie's name.
pub const COOKIE: &str = "qm_session";
/// The header carrying the CSRF token on changes made with a session cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Failed sign-ins allowed per client source per window.
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Sources whose failures are remembered at most (the oldest forgotten beyond).
const MAX_SOURCES: usize = 4096;
/// Most sessions at once (oldest dropped beyond).
const MAX_SESSIONS: usize = 10_000;

/// The pages (each at `/ui/<name>`).
pub const PAGES: [&str; 7] = [
    "overview", "nodes", "services", "policy", "traffic", "topology", "clients",
];

#[derive(Debug, Clone)]
struct Session {
    role: Role,
    csrf: String,
    expires: Instant,
}

#[derive(Debug)]
struct Attempts {
    since: Instant,
    failures: u32,
}

/// Sessions and sign-in limits, beside the mesh.
#[derive(Debug)]
pub struct Web {
    pub mesh: Arc<Mesh>,
    sessions: Mutex<HashMap<String, Session>>,
    attempts: Mutex<HashMap<IpAddr, Attempts>>,
    /// Peers whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<Prefix>,
    /// The HTTP server's refusals (connection caps, header deadline, Host), for `status`.
    pub http_refused: Arc<HttpRefusals>,
    /// Sign-ins refused because their source failed too often.
    sign_in_limited: AtomicU64,
}

/// The source sign-in failures are counted against: an IPv4 address, or an IPv6 /64 (one
/// host usually holds a whole /64).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & !(u64::MAX as u128))),
        v4 => v4,
    }
}

/// The client's address: `peer`, or when `peer` is a trusted proxy the rightmost address
/// in `X-Forwarded-For` that is not a trusted proxy (each proxy appends the address it
/// saw, so everything left of that is the client's to forge). When every hop is trusted,
/// or a hop is not an address, the last trusted one is the client.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Prefix]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|p| p.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(client) {
        return client;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        let Some(ip) = hop
            .parse::<IpAddr>()
            .ok()
            .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        else {
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(client) {
            break;
        }
    }
    client
}

/// Who is calling: set by [`auth`] for the handlers behind it.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub role: Role,
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

/// The value of cookie `name` in `headers`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Web {
    pub fn new(
        mesh: Arc<Mesh>,
        trusted_proxies: Vec<Prefix>,
        http_refused: Arc<HttpRefusals>,
    ) -> Arc<Self> {
        Arc::new(Self {
            mesh,
            sessions: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
            trusted_proxies,
            http_refused,
            sign_in_limited: AtomicU64::new(0),
        })
    }

    /// Sign-ins refused for too many failures, so far.
    pub fn sign_ins_limited(&self) -> u64 {
        self.sign_in_limited.load(Ordering::Relaxed)
    }

    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                m.remove(id);
                None
            }
            None => None,
        }
    }

    /// The caller's role, and the CSRF token its changes must carry (sessions only).
    fn caller(&self, headers: &HeaderMap) -> Option<(Role, Option<String>)> {
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            // A bearer credential is judged alone: a wrong one is not rescued by a cookie.
            let t = auth.to_str().ok()?.strip_prefix("Bearer ")?;
            return self.mesh.role_of(t).map(|r| (r, None));
        }
        self.session(headers).map(|s| (s.role, Some(s.csrf)))
    }

    /// True while the client at `ip` may try to sign in.
    fn may_try(&self, ip: IpAddr, now: Instant) -> bool {
        let mut m = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, a| now.duration_since(a.since) < FAILURE_WINDOW);
        m.get(&source_of(ip))
            .is_none_or(|a| a.failures < MAX_FAILURES)
    }

    fn failed(&self, ip: IpAddr, now: Instant) {
        let mut m = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let key = source_of(ip);
        if !m.contains_key(&key) && m.len() >= MAX_SOURCES {
            // Full: forget the oldest source (it gets fresh tries; nobody is locked out).
            if let Some(oldest) = m.iter().min_by_key(|(_, a)| a.since).map(|(k, _)| *k) {
                m.remove(&oldest);
            }
        }
        let a = m.entry(key).or_insert(Attempts {
            since: now,
            failures: 0,
        });
        a.failures += 1;
    }

    fn open_session(&self, role: Role) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, s| s.expires > now);
        if m.len() >= MAX_SESSIONS {
            if let Some(oldest) = m
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                m.remove(&oldest);
            }
        }
        m.insert(
            id.clone(),
            Session {
                role,
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }
}

/// The auth layer of every `/api/v1` route but sign-in: a credential (bearer token or
/// session cookie) is required; a change (any method but GET/HEAD) needs an admin, and
/// with a session cookie the CSRF token in `X-CSRF-Token`.
pub async fn auth(State(web): State<Arc<Web>>, mut req: Request, next: Next) -> Response {
    if req.method() == Method::POST && req.uri().path().ends_with("/session") {
        // Sign-in: the one route that takes no credential (it checks the token itself).
        return next.run(req).await;
    }
    let Some((role, csrf)) = web.caller(req.headers()) else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "missing or invalid credential (admin or read-only token, or a signed-in session)"})),
        )
            .into_response();
    };
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD);
    if changes {
        if let Some(want) = csrf {
            let got = req
                .headers()
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !same(got, &want) {
                return error(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
            }
        }
        // Signing out is not a change to the mesh.
        let sign_out = req.method() == Method::DELETE && req.uri().path().ends_with("/session");
        if role == Role::Reader && !sign_out {
            return error(
                StatusCode::FORBIDDEN,
                "read-only credential: changes are refused",
            );
        }
    }
    req.extensions_mut().insert(Caller { role });
    next.run(req).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

/// `POST /api/v1/session {"token": "..."}`: a session cookie for a valid token.
pub async fn sign_in(State(web): State<Arc<Web>>, req: Request) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let ip = client_ip(peer, req.headers(), &web.trusted_proxies);
    if !web.may_try(ip, Instant::now()) {
        web.sign_in_limited.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%ip, %peer, "dashboard sign-in refused: too many failures from this source");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, FAILURE_WINDOW.as_secs().to_string())],
            Json(json!({"error": "too many failed sign-ins from this address; wait a minute"})),
        )
            .into_response();
    }
    let body = match axum::body::to_bytes(req.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(_) => return error(StatusCode::BAD_REQUEST, "request body too large"),
    };
    let Ok(s) = serde_json::from_slice::<SignIn>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"token\": \"...\"}",
        );
    };
    let Some(role) = web.mesh.role_of(s.token.trim()) else {
        web.failed(ip, Instant::now());
        tracing::info!(%ip, %peer, "dashboard sign-in refused");
        return error(StatusCode::UNAUTHORIZED, "that token is not valid here");
    };
    let (id, csrf) = web.open_session(role);
    tracing::info!(%ip, ?role, "dashboard sign-in");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    (
        [(header::SET_COOKIE, cookie)],
        Json(json!({ "role": role, "csrf": csrf })),
    )
        .into_response()
}

/// `GET /api/v1/session`: the caller's role, and for a session its CSRF token (a page
/// that reloads gets it back; other origins cannot read this answer).
pub async fn whoami(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    match web.caller(&headers) {
        Some((role, csrf)) => Json(json!({ "role": role, "csrf": csrf })).into_response(),
        None => error(StatusCode::UNAUTHORIZED, "not signed in"),
    }
}

/// `DELETE /api/v1/session`: signs out.
pub async fn sign_out(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        web.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Json(json!({ "signed_out": true })),
    )
        .into_response()
}

/// `GET /api/v1/events`: server-sent events, `mesh` (catalog, policy, health changed)
/// and `traffic` (a node's traffic report changed), each with a counter.
pub async fn events(State(web): State<Arc<Web>>) -> Response {
    let mesh_rx = web.mesh.subscribe();
    let traffic_rx = web.mesh.subscribe_traffic();
    let stream = futures_util::stream::unfold(
        (mesh_rx, traffic_rx, true),
        |(mut m, mut t, first)| async move {
            if first {
                return Some((
                    Ok::<_, std::convert::Infallible>(
                        ": quicmesh events\nretry: 2000\n\n".to_string(),
                    ),
                    (m, t, false),
                ));
            }
            let ev = tokio::select! {
                r = m.changed() => r.ok().map(|_| format!("event: mesh\ndata: {}\n\n", *m.borrow_and_update())),
                r = t.changed() => r.ok().map(|_| format!("event: traffic\ndata: {}\n\n", *t.borrow_and_update())),
                _ = tokio::time::sleep(Duration::from_secs(15)) => Some(": keepalive\n\n".to_string()),
            }?;
            Some((Ok(ev), (m, t, false)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `GET /api/v1/traffic`: per service pair flows, bytes, denials and setup latency; per
/// HTTP route requests by status class and latency.
pub async fn traffic(State(web): State<Arc<Web>>) -> Json<serde_json::Value> {
    Json(json!({
        "pairs": web.mesh.traffic(),
        "http": web.mesh.http_traffic(),
        "http_routes": web.mesh.http_routes(),
    }))
}

/// `GET /api/v1/topology`: services and, per ordered pair, whether policy allows it,
/// whether traffic used it and whether requests were denied.
pub async fn topology(State(web): State<Arc<Web>>) -> Result<Json<serde_json::Value>, MeshError> {
    let services: Vec<String> = web.mesh.services()?.into_keys().collect();
    let traffic = web.mesh.traffic();
    let mut edges = Vec::new();
    for from in &services {
        for to in &services {
            if from == to {
                continue;
            }
            let e = web.mesh.explain(from, to)?;
            let t = traffic.iter().find(|p| &p.src == from && &p.dst == to);
            let allowed = e.decision.is_allow();
            let (flows, denied) = t.map_or((0, 0), |t| (t.flows, t.denied));
            if allowed || flows > 0 || denied > 0 {
                edges.push(json!({
                    "from": from, "to": to, "allowed": allowed,
                    "rule": e.decision.rule_label(), "flows": flows, "denied": denied,
                }));
            }
        }
    }
    // Node pairs this replica relays as the relay of last resort (pairs on relay nodes
    // show in those nodes' `status`).
    let relayed: Vec<serde_json::Value> = web
        .mesh
        .relay
        .relayed_pairs(std::time::Instant::now())
        .into_iter()
        .map(|p| {
            json!({
                "from": p.from, "to": p.to, "by": "coordinator", "replica": web.mesh.replica,
                "datagrams": p.datagrams, "bytes": p.bytes, "idle_secs": p.idle_secs,
            })
        })
        .collect();
    Ok(Json(
        json!({ "services": services, "edges": edges, "relayed": relayed }),
    ))
}

/// `GET /api/v1/openapi.json`: the API's description.
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../ui/openapi.json"),
    )
        .into_response()
}

/// Headers every page and asset carries: nothing but our own scripts, styles and API.
fn page_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn html(page: &str) -> Response {
    let body = include_str!("../ui/index.html").replace("{{page}}", page);
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    page_headers(&mut r);
    r
}

/// `GET /ui/login`: the sign-in page (the only page without a session).
pub async fn login_page() -> Response {
    html("login")
}

/// `GET /ui/{page}`: a page, for a signed-in browser; others go to the sign-in page.
pub async fn page(
    State(web): State<Arc<Web>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !PAGES.contains(&name.as_str()) {
        return error(StatusCode::NOT_FOUND, "no such page");
    }
    if web.session(&headers).is_none() {
        return (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, "/ui/login")],
            "sign in first",
        )
            .into_response();
    }
    html(&name)
}

/// `GET /`: the overview.
pub async fn root() -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/ui/overview")]).into_response()
}

/// `GET /ui/assets/{file}`: the script and style sheet (no data in them).
pub async fn asset(Path(file): Path<String>) -> Response {
    let (body, ty) = match file.as_str() {
        "app.js" => (
            include_str!("../ui/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "app.css" => (include_str!("../ui/app.css"), "text/css; charset=utf-8"),
        _ => return error(StatusCode::NOT_FOUND, "no such asset"),
    };
    let mut r = ([(header::CONTENT_TYPE, ty)], body).into_response();
    page_headers(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(v: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for x in v {
            h.append("x-forwarded-for", HeaderValue::from_str(x).unwrap());
        }
        h
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop_behind_trusted_proxies_only() {
        let trusted: Vec<Prefix> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.0.0.2");
        // Behind the proxy: the address it appended, not what the client wrote before it.
        let h = xff(&["1.1.1.1, 203.0.113.7"]);
        assert_eq!(client_ip(proxy, &h, &trusted), ip("203.0.113.7"));
        // Two trusted proxies in a row, one header line each.
        let h = xff(&["6.6.6.6, 203.0.113.7", "10.0.0.9"]);
        assert_eq!(client_ip(proxy, &h, &trusted), ip("203.0.113.7"));
        let h = xff(&["[2001:db8::1]:443"]);
        assert_eq!(client_ip(proxy, &h, &trusted), ip("2001:db8::1"));
        // No header, or garbage: the proxy itself (the last trusted hop).
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
        assert_eq!(client_ip(proxy, &xff(&["junk"]), &trusted), proxy);
        assert_eq!(
            client_ip(proxy, &xff(&["junk, 10.0.0.3"]), &trusted),
            ip("10.0.0.3")
        );
        // Denied twin: from an untrusted peer the header is ignored.
        let h = xff(&["203.0.113.7"]);
        assert_eq!(client_ip(ip("192.0.2.1"), &h, &trusted), ip("192.0.2.1"));
        assert_eq!(
            client_ip(proxy, &h, &[]),
            proxy,
            "no trusted proxy configured"
        );
        // IPv4-mapped peers are the IPv4 address.
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.2"), &h, &trusted),
            ip("203.0.113.7")
        );
    }

    fn web() -> (tempfile::TempDir, Arc<Web>) {
        let dir = tempfile::tempdir().unwrap();
        crate::mesh::init_with(
            dir.path(),
            quicmesh_protocol::ident::TrustDomain::new("mesh.test".to_string()).unwrap(),
            None,
            None,
            None,
        )
        .unwrap();
        let mesh = Mesh::open(dir.path(), 3600).unwrap();
        (dir, Web::new(mesh, vec![], Arc::default()))
    }

    #[test]
    fn sign_in_failures_lock_out_only_their_source_and_the_table_is_bounded() {
        let (_dir, w) = web();
        let now = Instant::now();
        let attacker: IpAddr = "192.0.2.1".parse().unwrap();
        let admin: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(w.may_try(attacker, now));
            w.failed(attacker, now);
        }
        assert!(!w.may_try(attacker, now), "the attacker is limited");
        assert!(w.may_try(admin, now), "another source is not");
        // An IPv6 host's /64 is one source.
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            w.failed(v6a, now);
        }
        assert!(!w.may_try(v6b, now));
        assert!(w.may_try("2001:db8:1:3::1".parse().unwrap(), now));
        // A flood from many sources fills the table, never beyond its bound, and locks
        // out no one else.
        for i in 0..(MAX_SOURCES as u32 * 2) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            w.failed(ip, now);
        }
        let n = w.attempts.lock().unwrap().len();
        assert!(n <= MAX_SOURCES, "{n}");
        assert!(w.may_try(admin, now));
        // The window passes: the attacker may try again.
        assert!(w.may_try(attacker, now + FAILURE_WINDOW));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; qm_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
