//! Starting a coordinator: the control listener and the HTTP API.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

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
    let m = mesh.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            if let Err(e) = m.flush_acks() {
                tracing::warn!(error = %e, "could not record snapshot acks");
            }
        }
    });
    let m = mesh.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = m.sweep_offline() {
                tracing::warn!(error = %e, "could not check node liveness");
            }
        }
    });
    let app = api::router(mesh.clone());
    tokio::spawn(async move {
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
