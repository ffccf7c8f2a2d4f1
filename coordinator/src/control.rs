//! The QUIC control listener. A connection without a client certificate may only enroll;
//! a connection with a verified node certificate runs a session: snapshots down (each
//! acked or nacked), status and renewals up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quicmesh_node::frame::{read_frame, write_frame};
use quicmesh_node::tls::{self, CertSlot, MeshClientVerifier};
use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::wire::{ControlDown, ControlUp, Hello, ALPN_CONTROL};
use tokio::sync::mpsc;

use crate::mesh::{now, Mesh, Sent};

/// Lifetime of the coordinator's own server certificate (re-issued at every start).
const SERVER_CERT_TTL: i64 = 30 * 86400;
/// How long after its certificate expired a node may still connect to renew it (a node
/// that outlived its certificate during a coordinator outage). Revocation still applies.
const EXPIRED_RENEWAL_GRACE_SECS: u64 = 7 * 86400;
/// How long a session waits after a change before building its snapshot.
const SNAPSHOT_COALESCE: Duration = Duration::from_millis(50);
/// The longest a session holds a snapshot back while changes keep coming.
const SNAPSHOT_MAX_WAIT: Duration = Duration::from_secs(2);
/// Most enrollments handled at once; more wait.
const MAX_CONCURRENT_ENROLLMENTS: usize = 16;

/// Binds the control listener.
pub fn bind(mesh: &Arc<Mesh>, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let (leaf, key) = mesh.ca.coordinator_leaf(now(), SERVER_CERT_TTL)?;
    let slot = CertSlot::with(
        vec![leaf.der, mesh.ca.cert_der.clone()],
        &key.serialize_der(),
    )?;
    let verifier = MeshClientVerifier::with_expired_grace(
        mesh.trust.clone(),
        false,
        Arc::new(|r| tracing::info!(reason = r.as_str(), "control client certificate refused")),
        EXPIRED_RENEWAL_GRACE_SECS,
    );
    let mut cfg = tls::server_config(slot, verifier, ALPN_CONTROL)?;
    cfg.transport_config(tls::control_transport());
    // Unlike tunnels (whose routes the nodes' path layer manages), a control connection
    // follows its node to a new address or NAT mapping: that is how the coordinator
    // learns where the node went (`Mesh::sweep_offline`).
    cfg.migration(true);
    let ep = quinn::Endpoint::server(cfg, addr)
        .map_err(|e| anyhow::anyhow!("bind control listener {addr}: {e}"))?;
    Ok(ep)
}

/// Serves control connections until the endpoint closes.
pub async fn serve(mesh: Arc<Mesh>, endpoint: quinn::Endpoint) {
    let enroll_slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_ENROLLMENTS));
    while let Some(incoming) = endpoint.accept().await {
        let mesh = mesh.clone();
        let slots = enroll_slots.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    if let Err(e) = handle(mesh, conn, slots).await {
                        tracing::info!(%remote, error = %e, "control connection ended");
                    }
                }
                Err(e) => tracing::info!(%remote, error = %e, "control handshake failed"),
            }
        });
    }
}

async fn handle(
    mesh: Arc<Mesh>,
    conn: quinn::Connection,
    slots: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let id = tls::peer_leaf(&conn)
        .map(|d| PeerIdentity::from_der(&d, &mesh.ca.trust_domain))
        .transpose()?;
    let (mut send, mut recv) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await??;
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame::<ControlUp, _>(&mut recv),
    )
    .await??
    .ok_or_else(|| anyhow::anyhow!("closed before the first message"))?;
    match (id, first) {
        (None, ControlUp::Enroll(req)) => {
            let _permit = slots.acquire().await?;
            let reply = mesh.enroll(&req);
            write_frame(&mut send, &reply).await?;
            send.finish()?;
            // The node closes the connection once it has the answer; dropping it here
            // first could discard an answer still in flight on a busy coordinator.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn.closed()).await;
            Ok(())
        }
        (Some(id), ControlUp::Hello(hello)) => {
            if hello.node != id.node {
                anyhow::bail!(
                    "hello names {} but the certificate is {}",
                    hello.node,
                    id.node
                );
            }
            session(mesh, conn, id, hello, send, recv).await
        }
        (None, _) => {
            conn.close(quinn::VarInt::from_u32(1), b"enroll first");
            anyhow::bail!("unauthenticated connection did not enroll")
        }
        (Some(_), _) => {
            conn.close(quinn::VarInt::from_u32(1), b"expected hello");
            anyhow::bail!("session did not start with hello")
        }
    }
}

async fn session(
    mesh: Arc<Mesh>,
    conn: quinn::Connection,
    id: PeerIdentity,
    hello: Hello,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let name = id.node.to_string();
    let record = mesh.store.node(&name)?;
    if record.as_ref().is_none_or(|r| r.revoked_at.is_some()) {
        write_frame(
            &mut send,
            &ControlDown::Goodbye {
                revoked: true,
                detail: "node is revoked or unknown".into(),
            },
        )
        .await?;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        anyhow::bail!("revoked node {name} tried to connect");
    }
    let endpoint = hello
        .advertise
        .unwrap_or_else(|| SocketAddr::new(conn.remote_address().ip(), hello.tunnel_port));
    // Candidates, best first: advertised, then the address this connection comes from
    // (the node's control session shares its tunnel socket, so through an
    // endpoint-independent NAT this is where peers reach it), then its own addresses.
    let mut candidates: Vec<SocketAddr> = Vec::new();
    for c in hello
        .advertise
        .into_iter()
        .chain([conn.remote_address(), endpoint])
        .chain(hello.local.iter().copied().take(8))
    {
        let c = SocketAddr::new(c.ip().to_canonical(), c.port());
        if c.port() != 0 && !c.ip().is_unspecified() && !candidates.contains(&c) {
            candidates.push(c);
        }
    }
    let moved = mesh.set_candidates(
        &name,
        crate::mesh::Reach {
            candidates,
            relay: hello.relay,
            observed: Some(SocketAddr::new(
                conn.remote_address().ip().to_canonical(),
                conn.remote_address().port(),
            )),
        },
    );
    let (kick_tx, mut kick_rx) = mpsc::channel::<ControlDown>(4);
    let sid = mesh.register_session(&name, conn.clone(), kick_tx);
    tracing::info!(node = %name, %endpoint, agent = %hello.agent_version, have = hello.have_version, "node session up");
    if mesh
        .store
        .node_hello(&name, &endpoint.to_string(), &hello.agent_version, now())?
        || moved
    {
        mesh.changed()?;
    }
    let result = run_session(&mesh, &id, &mut send, recv, &mut kick_rx).await;
    mesh.end_session(&name, sid);
    let _ = mesh.store.node_seen(&name, now());
    tracing::info!(node = %name, "node session down");
    result
}

async fn run_session(
    mesh: &Arc<Mesh>,
    id: &PeerIdentity,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    kick_rx: &mut mpsc::Receiver<ControlDown>,
) -> anyhow::Result<()> {
    let name = id.node.to_string();
    let mut versions = mesh.subscribe();
    // What the node was last sent; `None` sends a whole snapshot (session start, or the
    // node refused a delta), otherwise a delta from it.
    let mut last: Option<Sent> = None;
    // The version last sent whole: a node refusing that is not sent it again and again.
    let mut whole_version = 0u64;
    // Frames are read in their own task: reading is not cancel-safe inside select!.
    let (tx, mut rx) = mpsc::channel(8);
    let reader = tokio::spawn(async move {
        loop {
            let r = read_frame::<ControlUp, _>(&mut recv).await;
            let stop = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    let _abort = Abort(reader);
    loop {
        let current = *versions.borrow_and_update();
        if last.as_ref().is_none_or(|l| current > l.version()) {
            let (msg, sent) = mesh.update_for(&id.node, last.as_ref())?;
            if matches!(msg, ControlDown::Snapshot(_)) {
                whole_version = sent.version();
            }
            write_frame(send, &msg).await?;
            last = Some(sent);
        }
        tokio::select! {
            r = versions.changed() => {
                r?;
                // Coalesce bursts (a join storm bumps the version once per node): wait
                // until changes pause (or at most SNAPSHOT_MAX_WAIT), then send one snapshot
                // for the whole burst instead of one per change.
                let burst = tokio::time::Instant::now();
                loop {
                    versions.borrow_and_update();
                    tokio::time::sleep(SNAPSHOT_COALESCE).await;
                    if !versions.has_changed()? || burst.elapsed() >= SNAPSHOT_MAX_WAIT {
                        break;
                    }
                }
            }
            kick = kick_rx.recv() => {
                if let Some(msg) = kick {
                    write_frame(send, &msg).await?;
                    if !matches!(msg, ControlDown::Goodbye { .. }) {
                        continue;
                    }
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                    anyhow::bail!("session ended by coordinator");
                }
            }
            msg = rx.recv() => {
                let msg = match msg {
                    Some(Ok(Some(m))) => m,
                    Some(Ok(None)) | None => return Ok(()),
                    Some(Err(e)) => anyhow::bail!("control stream: {e}"),
                };
                match msg {
                    ControlUp::Ack { version } => {
                        mesh.record_ack(&name, version);
                        tracing::debug!(node = %name, version, "snapshot acked");
                    }
                    ControlUp::Nack { version, reason } => {
                        tracing::warn!(node = %name, version, %reason, "snapshot nacked");
                        if version != whole_version {
                            // A refused delta: the node holds another base; send it whole.
                            last = None;
                        }
                    }
                    ControlUp::Status(s) => {
                        mesh.store.node_seen(&name, now())?;
                        mesh.report_traffic(&name, s.traffic.clone());
                        tracing::debug!(node = %name, ?s, "status");
                    }
                    ControlUp::Health(checks) => {
                        mesh.report_health(&name, &checks)?;
                    }
                    ControlUp::Punch { peer } => {
                        let told = mesh.punch(&id.node, peer.as_str());
                        tracing::debug!(node = %name, %peer, told, "punch request");
                    }
                    ControlUp::Renew { csr_der } => {
                        let reply = match mesh.renew(&id.node, &csr_der) {
                            Ok(cert_der) => ControlDown::Renewed { cert_der },
                            Err(e) => ControlDown::RenewRefused { detail: e.to_string() },
                        };
                        write_frame(send, &reply).await?;
                    }
                    ControlUp::Hello(_) | ControlUp::Enroll(_) => anyhow::bail!("unexpected message in session"),
                }
            }
        }
    }
}

struct Abort(tokio::task::JoinHandle<()>);
impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}
