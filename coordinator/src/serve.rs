//! Starting a coordinator: the control listener and the HTTP API.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quicmesh_node::admin::http::{self, AllowedHosts, HttpLimits, HttpRefusals};
use quicmesh_protocol::overlay::Prefix;

use crate::mesh::Mesh;
use crate::{api, control};

/// How the HTTP server (API and dashboard) guards itself.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// Header deadline and connection caps (trusted proxies are exempt from the per-source
    /// cap: they carry every user).
    pub limits: HttpLimits,
    /// Names a request's `Host` may carry besides IP literals and `localhost`.
    pub hosts: Vec<String>,
    /// Reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Prefix>,
}

/// A running coordinator.
#[derive(Debug)]
pub struct Running {
    pub mesh: Arc<Mesh>,
    pub control_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub endpoint: quinn::Endpoint,
}

/// Runs `job` every `period` for as long as the process lives, logging its failures.
fn every(
    mesh: &Arc<Mesh>,
    period: Duration,
    what: &'static str,
    job: fn(&Mesh) -> Result<(), crate::mesh::MeshError>,
) {
    let m = mesh.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if let Err(e) = job(&m) {
                tracing::warn!(error = %e, "could not {what}");
            }
        }
    });
}

/// Opens the data dir, binds both listeners (before serving either) and serves.
pub async fn start(
    data_dir: &Path,
    listen: SocketAddr,
    http: SocketAddr,
    cert_ttl_secs: i64,
    opts: HttpOptions,
    store_url: Option<&str>,
    relay: bool,
) -> anyhow::Result<Running> {
    let mesh = Mesh::open_store(data_dir, store_url, cert_ttl_secs)?;
    mesh.relay.set_enabled(relay);
    let endpoint = control::bind(&mesh, listen)?;
    let http_l = tokio::net::TcpListener::bind(http)
        .await
        .map_err(|e| anyhow::anyhow!("bind http api {http}: {e}"))?;
    let http_addr = http_l.local_addr()?;
    let control_addr = endpoint.local_addr()?;
    crate::replica::check_unique(&mesh, &control_addr.to_string())?;
    tokio::spawn(control::serve(mesh.clone(), endpoint.clone()));
    crate::replica::start(&mesh, control_addr.to_string(), http_addr.to_string());
    every(
        &mesh,
        Duration::from_millis(250),
        "record snapshot acks",
        Mesh::flush_acks,
    );
    every(
        &mesh,
        Duration::from_secs(1),
        "check node liveness",
        Mesh::sweep_offline,
    );
    let refused = Arc::new(HttpRefusals::default());
    let r = refused.clone();
    let on_refusal: http::OnRefusal = Arc::new(move |why| r.count(why));
    let app = api::router(mesh.clone(), opts.trusted_proxies.clone(), refused);
    let app = http::guard_hosts(
        app,
        AllowedHosts::with_names(&opts.hosts),
        on_refusal.clone(),
    );
    let mut limits = opts.limits;
    limits.unlimited_sources = opts.trusted_proxies;
    tokio::spawn(http::serve(http_l, app, limits, on_refusal));
    tracing::info!(%control_addr, %http_addr, trust_domain = %mesh.ca.trust_domain, "coordinator serving");
    Ok(Running {
        mesh,
        control_addr,
        http_addr,
        endpoint,
    })
}
