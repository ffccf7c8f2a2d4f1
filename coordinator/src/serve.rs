//! Starting a coordinator: the control listener and the HTTP API.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::mesh::Mesh;
use crate::{api, control};

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
) -> anyhow::Result<Running> {
    let mesh = Mesh::open(data_dir, cert_ttl_secs)?;
    let endpoint = control::bind(&mesh, listen)?;
    let http_l = tokio::net::TcpListener::bind(http)
        .await
        .map_err(|e| anyhow::anyhow!("bind http api {http}: {e}"))?;
    let http_addr = http_l.local_addr()?;
    let control_addr = endpoint.local_addr()?;
    tokio::spawn(control::serve(mesh.clone(), endpoint.clone()));
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
    let app = api::router(mesh.clone());
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(http_l, app).await {
            tracing::error!(error = %e, "http api stopped");
        }
    });
    tracing::info!(%control_addr, %http_addr, trust_domain = %mesh.ca.trust_domain, "coordinator serving");
    Ok(Running {
        mesh,
        control_addr,
        http_addr,
        endpoint,
    })
}
