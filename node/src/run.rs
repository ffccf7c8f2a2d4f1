//! Node startup: check, enroll if needed, bind everything, then start the tasks.

use std::sync::Arc;

use quicmesh_protocol::cert::PeerIdentity;

use crate::config::NodeConfig;
use crate::control::{self, unix_now, EnrollError};
use crate::metrics::Metrics;
use crate::state::Node;
use crate::store::{DataDir, StoreError};
use crate::tls::{self, CertSlot, MeshClientVerifier, Trust};
use crate::{admin, proxy, tunnel};

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Enroll(#[from] EnrollError),
    #[error("not enrolled: no certificate in {0} and no join_token in the config")]
    NoToken(String),
    #[error("stored certificate: {0}")]
    BadCert(String),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
}

impl StartError {
    /// Process exit code: 77 (no permission) for refused enrollment, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Enroll(EnrollError::Refused { .. })
            | StartError::Enroll(EnrollError::Token(_)) => 77,
            StartError::NoToken(_) => 78,
            _ => 1,
        }
    }
}

/// Enrolls, retrying with capped backoff while the coordinator cannot be reached (a node
/// may well start before its coordinator). A refusal is final.
async fn enroll_retrying(
    endpoint: &quinn::Endpoint,
    cfg: &NodeConfig,
    key: &rcgen::KeyPair,
    token: &str,
) -> Result<crate::store::StoredIdentity, EnrollError> {
    let mut backoff = std::time::Duration::from_millis(500);
    loop {
        match control::enroll(endpoint, cfg, key, token).await {
            Err(e @ EnrollError::Transport { .. }) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "coordinator unreachable; will retry enrollment");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
            }
            other => return other,
        }
    }
}

/// UDP socket buffer the node asks for: bursts of overlay datagrams (GSO batches from a
/// 64 KB TUN read) must not overflow the kernel's default ~200 KB receive buffer.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// The node's one QUIC endpoint (dials peers and the coordinator; serves peers once the
/// server config is set), on a socket with large buffers.
/// QUIC runs on [`crate::path::socket::MeshSocket`], so tunnels can change route (relay,
/// direct, a peer's new address) under it.
fn tunnel_endpoint(
    listen: std::net::SocketAddr,
    paths: Arc<crate::path::Paths>,
) -> std::io::Result<quinn::Endpoint> {
    use quinn::Runtime;
    let sock = std::net::UdpSocket::bind(listen)?;
    let s = socket2::SockRef::from(&sock);
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    paths.set_opener_socket(sock.try_clone()?);
    let runtime = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(sock)?;
    let mut ep = quinn::EndpointConfig::default();
    // Path packets are told apart from QUIC by its fixed bit: peers must never clear it.
    ep.grease_quic_bit(false);
    quinn::Endpoint::new_with_abstract_socket(
        ep,
        None,
        crate::path::socket::MeshSocket::new(inner, paths),
        runtime,
    )
}

/// Starts a node and returns once it is serving.
pub async fn start(cfg: NodeConfig) -> Result<Arc<Node>, StartError> {
    tls::set_keepalive(cfg.keepalive);
    let data = DataDir::open(&cfg.data_dir)?;
    let key = data.key()?;
    let metrics = Arc::new(Metrics::new());
    let (paths, probes) = crate::path::Paths::new(cfg.relay, metrics.paths());
    let endpoint =
        tunnel_endpoint(cfg.listen, paths.clone()).map_err(|source| StartError::Bind {
            what: "tunnel listener (udp)",
            addr: cfg.listen.to_string(),
            source,
        })?;
    let stored = match data.identity()? {
        Some(id) => {
            let peer = PeerIdentity::from_der(&id.cert_der, &id.trust_domain)
                .map_err(|e| StartError::BadCert(e.to_string()))?;
            if peer.node != cfg.name {
                return Err(StartError::BadCert(format!(
                    "data_dir holds the certificate of node {}, config says {}",
                    peer.node, cfg.name
                )));
            }
            if peer.not_after <= unix_now() {
                match cfg.join_token.as_deref() {
                    Some(t) if t.parse::<quicmesh_protocol::token::JoinToken>().is_ok() => {
                        match control::enroll(&endpoint, &cfg, &key, t).await {
                            Ok(id) => id,
                            Err(e) => {
                                tracing::warn!(error = %e, "certificate expired and re-enrollment failed; renewing over the control session instead");
                                id
                            }
                        }
                    }
                    _ => {
                        // The coordinator accepts an expired (unrevoked) certificate for a
                        // grace period so the node can renew it.
                        tracing::warn!(not_after = peer.not_after, "certificate expired; it will be renewed when the coordinator is reachable");
                        id
                    }
                }
            } else {
                id
            }
        }
        None => {
            let token = cfg
                .join_token
                .as_deref()
                .ok_or_else(|| StartError::NoToken(cfg.data_dir.display().to_string()))?;
            let id = enroll_retrying(&endpoint, &cfg, &key, token).await?;
            tracing::info!(node = %cfg.name, "enrolled");
            id
        }
    };
    data.save_identity(&stored)?;
    let identity = PeerIdentity::from_der(&stored.cert_der, &stored.trust_domain)
        .map_err(|e| StartError::BadCert(e.to_string()))?;
    let snapshot = match data.snapshot() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring unreadable stored snapshot");
            None
        }
    };
    let revoked = snapshot
        .as_ref()
        .map(|s| s.revoked.clone())
        .unwrap_or_default();
    let trust = Trust::new(stored.trust_domain.clone(), &stored.ca_bundle, revoked)?;
    let cert = CertSlot::with(vec![stored.cert_der.clone()], &key.serialize_der())?;
    let health = crate::health::start(&cfg.services, metrics.clone());
    let node = Node::new(
        cfg,
        data,
        metrics,
        trust,
        cert,
        key.serialize_pem(),
        identity,
        stored.cert_der,
        endpoint,
        paths,
        health,
    );
    if let Some(snap) = snapshot {
        match node.apply_snapshot(&snap, false) {
            Ok(_) => tracing::info!(version = snap.version, "serving from stored snapshot"),
            Err(e) => tracing::warn!(error = %e, "stored snapshot not applied"),
        }
    }
    match node.data.wg_clients() {
        Ok(c) if c.is_empty() => {}
        Ok(c) => node.apply_wg_clients(c, false),
        Err(e) => tracing::warn!(error = %e, "ignoring unreadable stored WireGuard clients"),
    }
    let m = node.metrics.clone();
    let verifier = MeshClientVerifier::new(
        node.trust.clone(),
        true,
        Arc::new(move |r| m.handshake_refused(r)),
    );
    node.endpoint.set_server_config(Some(tls::server_config(
        node.cert.clone(),
        verifier,
        quicmesh_protocol::wire::ALPN_TUNNEL,
        node.cfg.key_exchange,
    )?));

    // Bind every listener before serving any, so a bad address fails startup whole.
    let upstreams = proxy::bind_all(&node)
        .await
        .map_err(|source| StartError::Bind {
            what: "upstream",
            addr: String::new(),
            source,
        })?;
    let admin_path = node.data.admin_socket();
    let admin_l = admin::bind_admin(&admin_path).map_err(|source| StartError::Bind {
        what: "admin socket",
        addr: admin_path.display().to_string(),
        source,
    })?;
    let metrics_l = match node.cfg.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "metrics",
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };

    let dns_l = match node.cfg.dns.as_ref() {
        Some(d) => Some(
            crate::dns::bind(d)
                .await
                .map_err(|source| StartError::Bind {
                    what: "dns",
                    addr: d.listen.to_string(),
                    source,
                })?,
        ),
        None => None,
    };

    tokio::spawn(tunnel::accept_loop(node.clone()));
    tokio::spawn(crate::path::manager::run(node.clone(), probes));
    // Certificates expire between snapshots: tunnels and flows are re-checked every
    // second as well as on every snapshot.
    let n = node.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            n.expire();
        }
    });
    if let Ok(mut b) = node.bound.lock() {
        b.upstreams = upstreams
            .iter()
            .filter_map(|(u, l)| l.local_addr().ok().map(|a| (u.service.clone(), a)))
            .collect();
        b.metrics = metrics_l.as_ref().and_then(|l| l.local_addr().ok());
        b.dns = dns_l.as_ref().and_then(|(u, _)| u.local_addr().ok());
    }
    if let Some((udp, tcp)) = dns_l {
        tokio::spawn(crate::dns::serve(node.clone(), udp, tcp));
    }
    for (up, l) in upstreams {
        match up.protocol {
            crate::config::Protocol::Tcp => tokio::spawn(proxy::serve(node.clone(), up, l)),
            crate::config::Protocol::Http => {
                tokio::spawn(crate::l7::egress::serve(node.clone(), up, l))
            }
        };
    }
    tokio::spawn(admin::serve_admin(node.clone(), admin_l));
    if let Some(l) = metrics_l {
        tokio::spawn(admin::serve_metrics(node.clone(), l));
    }
    tokio::spawn(control::session_loop(node.clone()));
    if let Some(ov) = node.cfg.overlay.clone() {
        // The overlay needs the mesh's prefixes from a snapshot (on disk after the first
        // run); a node told to run it that cannot is useless, so it stops.
        let n = node.clone();
        tokio::spawn(async move {
            let overlay = match crate::overlay::start(n.clone(), ov).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "overlay mode could not start");
                    eprintln!("quicmesh-node: overlay: {e}");
                    std::process::exit(1);
                }
            };
            // A gateway asked for that cannot run stops the node, as the overlay does.
            if let Some(wg) = n.cfg.wireguard.clone() {
                if let Err(e) = crate::gateway::start(n, overlay, wg).await {
                    tracing::error!(error = %e, "WireGuard gateway could not start");
                    eprintln!("quicmesh-node: gateway: {e}");
                    std::process::exit(1);
                }
            }
        });
    }
    tracing::info!(
        node = %node.cfg.name,
        tunnel = %node.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "node serving"
    );
    Ok(node)
}
