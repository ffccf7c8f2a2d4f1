//! The HTTP JSON API (`/api/v1`), behind the admin token (`Authorization: Bearer ...`).
//! The CLI and (later) the dashboard use exactly these routes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::mesh::{Mesh, MeshError};
use crate::web::{self, Web};
use quicmesh_node::admin::http::HttpRefusals;
use quicmesh_protocol::overlay::Prefix;

impl IntoResponse for MeshError {
    fn into_response(self) -> Response {
        let status = match &self {
            MeshError::Invalid { .. } => StatusCode::BAD_REQUEST,
            MeshError::NoSuchNode(_) | MeshError::NoSuchWgClient(_) => StatusCode::NOT_FOUND,
            MeshError::WgClientExists(_) => StatusCode::CONFLICT,
            MeshError::Policy(_) | MeshError::PolicyTests(_) => StatusCode::UNPROCESSABLE_ENTITY,
            MeshError::Fenced | MeshError::Store(crate::store::StoreError::Unavailable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let failures = match &self {
            MeshError::PolicyTests(f) => serde_json::to_value(f).unwrap_or_default(),
            _ => serde_json::Value::Null,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "api error");
        }
        (
            status,
            Json(json!({ "error": self.to_string(), "failures": failures })),
        )
            .into_response()
    }
}

/// The HTTP server's router: the API under `/api/v1` (every route behind
/// [`web::auth`] but sign-in), and the dashboard's pages. `trusted_proxies` are believed
/// about the client's address (`X-Forwarded-For`); `http_refused` is what the server
/// refused, shown in `status`.
pub fn router(
    mesh: Arc<Mesh>,
    trusted_proxies: Vec<Prefix>,
    http_refused: Arc<HttpRefusals>,
) -> Router {
    let web = Web::new(mesh.clone(), trusted_proxies, http_refused);
    // Metrics are served even by a fenced replica: that is how an operator sees it.
    let always = Router::new()
        .route("/metrics", get(metrics))
        .with_state(mesh.clone());
    let mesh_routes = Router::new()
        .route("/nodes", get(nodes))
        .route("/replicas", get(replicas))
        .route("/nodes/{name}/revoke", post(revoke))
        .route("/nodes/{name}/relay", post(relay))
        .route("/services", get(services))
        .route("/tokens", post(create_token))
        .route("/wg", get(wg_list).post(wg_add))
        .route("/wg/{name}/revoke", post(wg_revoke))
        .route("/policy", get(policy_show).post(policy_apply))
        .route("/policy/history", get(policy_history))
        .route("/policy/explain", get(policy_explain))
        .layer(middleware::from_fn_with_state(mesh.clone(), unless_fenced))
        .with_state(mesh)
        .merge(always);
    let web_routes = Router::new()
        .route("/status", get(status))
        .route(
            "/session",
            get(web::whoami).post(web::sign_in).delete(web::sign_out),
        )
        .route("/events", get(web::events))
        .route("/traffic", get(web::traffic))
        .route("/topology", get(web::topology))
        .route("/openapi.json", get(web::openapi))
        .with_state(web.clone());
    let api = mesh_routes
        .merge(web_routes)
        .layer(middleware::from_fn_with_state(web.clone(), web::auth));
    let pages = Router::new()
        .route("/", get(web::root))
        .route("/ui/login", get(web::login_page))
        .route("/ui/assets/{file}", get(web::asset))
        .route("/ui/{page}", get(web::page))
        .with_state(web);
    Router::new()
        .nest("/api/v1", api)
        .merge(pages)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "no such route"})),
            )
        })
}

/// A fenced replica (cut from its database) serves no view as current and takes no
/// change: every catalog and policy route answers 503 at once, naming why.
async fn unless_fenced(
    State(mesh): State<Arc<Mesh>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    if mesh.fenced.load(std::sync::atomic::Ordering::Relaxed) {
        return MeshError::Fenced.into_response();
    }
    next.run(req).await
}

async fn status(State(web): State<Arc<Web>>) -> Result<Json<serde_json::Value>, MeshError> {
    let mesh = &web.mesh;
    let nodes = mesh.nodes()?;
    Ok(Json(json!({
        "http_refused": web.http_refused.snapshot(),
        "sign_ins_limited": web.sign_ins_limited(),
        "trust_domain": mesh.ca.trust_domain,
        "ca_fingerprint": hex::encode(mesh.ca.fingerprint()),
        "mesh_version": mesh.version()?,
        "policy_version": mesh.policy().0,
        "nodes": nodes.len(),
        "nodes_online": nodes.iter().filter(|n| n.online).count(),
        "drops": {
            "control": mesh.drops.control.all(),
            "punch": mesh.drops.punch.all(),
            "relay": mesh.drops.relay.all(),
        },
        // The relay of last resort on the control listener (off with --no-relay).
        "relay": {
            "enabled": mesh.relay.enabled(),
            "forwarded_datagrams": mesh.relay.forwarded.load(std::sync::atomic::Ordering::Relaxed),
            "forwarded_bytes": mesh.relay.forwarded_bytes.load(std::sync::atomic::Ordering::Relaxed),
        },
    })))
}

/// The coordinator's drop counters in Prometheus text format.
async fn metrics(State(mesh): State<Arc<Mesh>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        {
            use std::sync::atomic::Ordering::Relaxed;
            let mut out = mesh.drops.prometheus();
            let flag = |b: bool| if b { 1 } else { 0 };
            out.push_str(&format!(
                "# HELP quicmesh_coordinator_fenced 1 while this replica cannot reach its database (it serves nothing as current).\n# TYPE quicmesh_coordinator_fenced gauge\nquicmesh_coordinator_fenced{{replica=\"{r}\"}} {}\n# HELP quicmesh_coordinator_leader 1 while this replica runs the singleton jobs.\n# TYPE quicmesh_coordinator_leader gauge\nquicmesh_coordinator_leader{{replica=\"{r}\"}} {}\n# HELP quicmesh_coordinator_sessions Control sessions this replica holds.\n# TYPE quicmesh_coordinator_sessions gauge\nquicmesh_coordinator_sessions{{replica=\"{r}\"}} {}\n",
                flag(mesh.fenced.load(Relaxed)),
                flag(mesh.leader.load(Relaxed)),
                mesh.session_count(),
                r = mesh.replica,
            ));
            out.push_str(&format!(
                "# HELP quicmesh_coordinator_relayed_datagrams_total Datagrams this replica forwarded between nodes as the relay of last resort.\n# TYPE quicmesh_coordinator_relayed_datagrams_total counter\nquicmesh_coordinator_relayed_datagrams_total{{replica=\"{r}\"}} {}\n# HELP quicmesh_coordinator_relayed_bytes_total Bytes this replica forwarded between nodes as the relay of last resort.\n# TYPE quicmesh_coordinator_relayed_bytes_total counter\nquicmesh_coordinator_relayed_bytes_total{{replica=\"{r}\"}} {}\n",
                mesh.relay.forwarded.load(Relaxed),
                mesh.relay.forwarded_bytes.load(Relaxed),
                r = mesh.replica,
            ));
            out
        },
    )
        .into_response()
}

async fn nodes(State(mesh): State<Arc<Mesh>>) -> Result<Json<serde_json::Value>, MeshError> {
    Ok(Json(
        json!({ "mesh_version": mesh.version()?, "nodes": mesh.nodes()? }),
    ))
}

async fn replicas(State(mesh): State<Arc<Mesh>>) -> Result<Json<serde_json::Value>, MeshError> {
    let now = crate::mesh::now_ms();
    let list: Vec<serde_json::Value> = mesh
        .replicas()?
        .into_iter()
        .map(|r| {
            let age = now - r.heartbeat_ms;
            json!({
                "id": r.id,
                "control": r.control,
                "http": r.http,
                "sessions": r.sessions,
                "started_at": r.started_at,
                "heartbeat_age_ms": age,
                "alive": age < crate::health::REPLICA_DEAD_AFTER_MS,
            })
        })
        .collect();
    let leading = mesh.leader.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Json(json!({
        "this": mesh.replica,
        "fenced": mesh.fenced.load(std::sync::atomic::Ordering::Relaxed),
        "leader": if leading { mesh.replica.clone() } else { "another replica".into() },
        "replicas": list,
    })))
}

async fn revoke(
    State(mesh): State<Arc<Mesh>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, MeshError> {
    let serials = mesh.revoke(&name)?;
    Ok(Json(json!({ "node": name, "revoked_serials": serials })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayRequest {
    grant: bool,
}

async fn relay(
    State(mesh): State<Arc<Mesh>>,
    Path(name): Path<String>,
    Json(req): Json<RelayRequest>,
) -> Result<Json<serde_json::Value>, MeshError> {
    mesh.set_relay(&name, req.grant)?;
    Ok(Json(json!({ "node": name, "relay": req.grant })))
}

async fn services(State(mesh): State<Arc<Mesh>>) -> Result<Json<serde_json::Value>, MeshError> {
    Ok(Json(json!({ "services": mesh.services()? })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    node: String,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Grants the relay role.
    #[serde(default)]
    relay: bool,
    /// Seconds; default one hour.
    ttl_secs: Option<i64>,
}

async fn create_token(
    State(mesh): State<Arc<Mesh>>,
    Json(req): Json<TokenRequest>,
) -> Result<Json<serde_json::Value>, MeshError> {
    let (token, expires_at) = mesh.create_token(
        &req.node,
        &req.services,
        &req.labels,
        req.relay,
        req.ttl_secs.unwrap_or(3600),
    )?;
    Ok(Json(
        json!({ "token": token, "node": req.node, "relay": req.relay, "expires_at": expires_at }),
    ))
}

async fn wg_list(State(mesh): State<Arc<Mesh>>) -> Result<Json<serde_json::Value>, MeshError> {
    let stats = mesh.wg_client_stats();
    let clients: Vec<serde_json::Value> = mesh
        .wg_clients()?
        .into_iter()
        .map(|c| {
            let s = stats.get(&c.name).cloned().unwrap_or_default();
            let mut v = json!(c);
            v["last_handshake"] = json!(s.last_handshake);
            v["tx_bytes"] = json!(s.tx_bytes);
            v["rx_bytes"] = json!(s.rx_bytes);
            v
        })
        .collect();
    Ok(Json(json!({ "clients": clients })))
}

/// `text` as a QR code's modules, row by row (`1` dark), for the dashboard to draw.
fn qr_modules(text: &str) -> Option<serde_json::Value> {
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::L).ok()?;
    let modules: String = code
        .to_colors()
        .iter()
        .map(|c| if *c == qrcode::Color::Dark { '1' } else { '0' })
        .collect();
    Some(json!({ "width": code.width(), "modules": modules }))
}

/// Enrolls a WireGuard client; the answer carries its `wg-quick` configuration, with the
/// private key when the coordinator made it: shown this once, stored nowhere.
async fn wg_add(
    State(mesh): State<Arc<Mesh>>,
    Json(req): Json<crate::mesh::WgRequest>,
) -> Result<Json<serde_json::Value>, MeshError> {
    let added = mesh.wg_add(&req)?;
    let config = mesh.wg_config(&added.client, added.private_key.as_deref())?;
    Ok(Json(json!({
        "client": added.client,
        "private_key": added.private_key,
        "config_qr": qr_modules(&config),
        "config": config,
    })))
}

async fn wg_revoke(
    State(mesh): State<Arc<Mesh>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, MeshError> {
    mesh.wg_revoke(&name)?;
    Ok(Json(json!({ "client": name, "revoked": true })))
}

async fn policy_show(State(mesh): State<Arc<Mesh>>) -> Result<Json<serde_json::Value>, MeshError> {
    let latest = mesh.latest_policy()?;
    let p = mesh.policy();
    Ok(Json(json!({
        "version": p.0,
        "source": latest.map(|l| l.source),
        "policy": p.1,
    })))
}

async fn policy_history(
    State(mesh): State<Arc<Mesh>>,
) -> Result<Json<serde_json::Value>, MeshError> {
    Ok(Json(json!({ "versions": mesh.policy_history()? })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyApply {
    source: String,
    #[serde(default)]
    dry_run: bool,
}

async fn policy_apply(
    State(mesh): State<Arc<Mesh>>,
    Json(req): Json<PolicyApply>,
) -> Result<Json<serde_json::Value>, MeshError> {
    if req.dry_run {
        let p = Mesh::check_policy(&req.source)?;
        return Ok(Json(
            json!({ "ok": true, "dry_run": true, "rules": p.rules.len(), "tests": p.tests.len() }),
        ));
    }
    let version = mesh.apply_policy(&req.source)?;
    let p = mesh.policy();
    Ok(Json(
        json!({ "ok": true, "version": version, "rules": p.1.rules.len(), "tests": p.1.tests.len() }),
    ))
}

#[derive(Deserialize)]
struct ExplainQuery {
    from: String,
    to: String,
    /// With `method` or `path`: an HTTP request (method GET, path `/` by default);
    /// without: an L4 flow.
    method: Option<String>,
    path: Option<String>,
}

async fn policy_explain(
    State(mesh): State<Arc<Mesh>>,
    Query(q): Query<ExplainQuery>,
) -> Result<Json<serde_json::Value>, MeshError> {
    let request = match (q.method, q.path) {
        (None, None) => None,
        (m, p) => Some((
            m.unwrap_or_else(|| "GET".into()),
            p.unwrap_or_else(|| "/".into()),
        )),
    };
    let (e, request) = mesh.explain_request(&q.from, &q.to, request.as_ref())?;
    Ok(Json(json!({
        "from": q.from,
        "to": q.to,
        "request": request.map(|(method, path)| json!({ "method": method, "path": path })),
        "decision": e.decision.action().to_string(),
        "rule": e.decision.rule_label(),
        "explanation": e,
    })))
}
