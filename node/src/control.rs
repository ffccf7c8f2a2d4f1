//! The node's side of the control plane: enrollment with a join token, then a long-lived
//! session that receives snapshots (acked or nacked), reports status and renews the
//! certificate. Reconnects with capped exponential backoff and jitter; the node keeps
//! serving from its last snapshot while the coordinator is away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::delta;
use quicmesh_protocol::token::{renew_at, JoinToken};
use quicmesh_protocol::wire::{
    ControlDown, ControlUp, EnrollErrorCode, EnrollRequest, Hello, Snapshot, StatusReport,
    ALPN_CONTROL,
};
use rand::Rng;
use tokio::sync::mpsc;

use crate::config::NodeConfig;
use crate::frame::{read_frame, write_frame, FrameError};
use crate::state::Node;
use crate::store::StoredIdentity;
use crate::tls::{self, fingerprint, MeshServerVerifier, ServerExpect};

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("join token: {0}")]
    Token(#[from] quicmesh_protocol::token::TokenError),
    #[error("enrollment refused: {}{}", .code.as_str(), if .detail.is_empty() { String::new() } else { format!(" ({})", .detail) })]
    Refused {
        code: EnrollErrorCode,
        detail: String,
    },
    #[error("enrollment: cannot reach coordinator {addr}: {reason}")]
    Transport { addr: String, reason: String },
    #[error("enrollment: bad answer from coordinator: {0}")]
    BadAnswer(String),
}

/// Current Unix time in seconds.
pub use crate::clock::unix_now;

/// Makes a CSR for `key`. The coordinator decides the SANs; the CSR only proves the key.
pub fn csr(node: &str, key: &rcgen::KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node);
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// Enrolls with the join token: proves the token, gets a certificate for our key.
pub async fn enroll(
    endpoint: &quinn::Endpoint,
    cfg: &NodeConfig,
    key: &rcgen::KeyPair,
    token: &str,
) -> Result<StoredIdentity, EnrollError> {
    let token: JoinToken = token.parse()?;
    let addrs = resolve(&cfg.coordinator).await;
    let mut last = EnrollError::Transport {
        addr: cfg.coordinator.to_string(),
        reason: "no address resolved".into(),
    };
    // Replicas are tried in turn from a random one; a refusal is final (every replica
    // would say the same). With others to try, a silent one is given up on sooner.
    let handshake = if addrs.len() > 1 {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(15)
    };
    let start: usize = rand::thread_rng().gen();
    for i in 0..addrs.len() {
        let addr = addrs[(start + i) % addrs.len()];
        match enroll_at(endpoint, cfg, key, &token, addr, handshake).await {
            Err(e @ EnrollError::Transport { .. }) => {
                tracing::warn!(error = %e, "enrollment: trying the next coordinator");
                last = e;
            }
            other => return other,
        }
    }
    Err(last)
}

/// How long resolving one coordinator name may take.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(2);
/// Addresses taken from one coordinator name at most.
const MAX_ADDRS_PER_NAME: usize = 16;

/// Resolves the configured coordinator addresses now (DNS names may give several each),
/// in config order without duplicates. Names that do not resolve are logged and skipped.
pub async fn resolve(c: &crate::config::Coordinators) -> Vec<std::net::SocketAddr> {
    use crate::config::CoordinatorAddr;
    let mut out = Vec::new();
    for a in c.addrs() {
        match a {
            CoordinatorAddr::Ip(ip) => out.push(*ip),
            CoordinatorAddr::Name { host, port } => {
                let lookup = tokio::net::lookup_host((host.as_str(), *port));
                match tokio::time::timeout(RESOLVE_DEADLINE, lookup).await {
                    Ok(Ok(found)) => {
                        // Sorted, so a resolver that rotates its answers does not make the
                        // node try the same dead replica twice in a row; capped.
                        let mut found: Vec<_> = found.collect();
                        found.sort();
                        found.truncate(MAX_ADDRS_PER_NAME);
                        out.extend(found)
                    }
                    Ok(Err(e)) => tracing::warn!(coordinator = %a, error = %e, "cannot resolve"),
                    Err(_) => tracing::warn!(coordinator = %a, "resolving timed out"),
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|a| seen.insert(*a));
    out
}

async fn enroll_at(
    endpoint: &quinn::Endpoint,
    cfg: &NodeConfig,
    key: &rcgen::KeyPair,
    token: &JoinToken,
    addr: std::net::SocketAddr,
    handshake: Duration,
) -> Result<StoredIdentity, EnrollError> {
    let transport = |reason: String| EnrollError::Transport {
        addr: addr.to_string(),
        reason,
    };
    let verifier = MeshServerVerifier::new(
        None,
        ServerExpect::PinnedCoordinator(token.ca_fingerprint),
        Arc::new(|_| {}),
    );
    let client = tls::client_config(None, verifier, ALPN_CONTROL, cfg.key_exchange)
        .map_err(|e| transport(e.to_string()))?;
    let conn = tokio::time::timeout(
        handshake,
        endpoint
            .connect_with(client, addr, "coordinator")
            .map_err(|e| transport(e.to_string()))?,
    )
    .await
    .map_err(|_| transport("timed out".into()))?
    .map_err(|e| transport(e.to_string()))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(e.to_string()))?;
    let req = EnrollRequest {
        secret: token.secret_hex(),
        node: cfg.name.clone(),
        csr_der: csr(cfg.name.as_str(), key)
            .map_err(|e| EnrollError::BadAnswer(format!("csr: {e}")))?,
        services: cfg.service_names(),
        labels: cfg.labels.clone(),
    };
    write_frame(&mut send, &ControlUp::Enroll(req))
        .await
        .map_err(|e| transport(e.to_string()))?;
    let _ = send.finish();
    let answer = tokio::time::timeout(
        Duration::from_secs(15),
        read_frame::<ControlDown, _>(&mut recv),
    )
    .await
    .map_err(|_| transport("no answer".into()))?
    .map_err(|e| transport(e.to_string()))?;
    conn.close(quinn::VarInt::from_u32(0), b"enrolled");
    match answer {
        Some(ControlDown::Enrolled(r)) => {
            if !r
                .ca_bundle
                .iter()
                .any(|c| fingerprint(c) == token.ca_fingerprint)
            {
                return Err(EnrollError::BadAnswer(
                    "ca bundle does not contain the pinned ca".into(),
                ));
            }
            let id = PeerIdentity::from_der(&r.cert_der, &r.trust_domain)
                .map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
            if id.node != cfg.name {
                return Err(EnrollError::BadAnswer(format!(
                    "certificate is for {}",
                    id.node
                )));
            }
            Ok(StoredIdentity {
                trust_domain: r.trust_domain,
                cert_der: r.cert_der,
                ca_bundle: r.ca_bundle,
            })
        }
        Some(ControlDown::EnrollRefused { code, detail }) => {
            Err(EnrollError::Refused { code, detail })
        }
        Some(other) => Err(EnrollError::BadAnswer(format!("unexpected {other:?}"))),
        None => Err(EnrollError::BadAnswer(
            "coordinator closed the stream".into(),
        )),
    }
}

/// How a session ended.
enum SessionEnd {
    Revoked(String),
}

/// Keeps a control session up for the life of the node, with one replica at a time.
/// Addresses are resolved again at every attempt; a node starts at a random one (so nodes
/// spread over replicas) and moves to the next when a session ends or cannot start. The
/// backoff grows only once every address has failed in a row.
pub async fn session_loop(node: Arc<Node>) {
    const FIRST: Duration = Duration::from_millis(250);
    // Capped low: a node must be back on the latest snapshot soon after the coordinator is.
    const MAX: Duration = Duration::from_secs(4);
    let mut turn: usize = rand::thread_rng().gen();
    let mut failures: usize = 0;
    loop {
        let addrs = resolve(&node.cfg.coordinator).await;
        let started = Instant::now();
        let result = match addrs.get(turn % addrs.len().max(1)) {
            Some(&addr) => session(&node, addr, addrs.len()).await,
            None => Err(format!(
                "no coordinator address resolved from {}",
                node.cfg.coordinator
            )),
        };
        node.paths.set_coordinator_relay(None);
        if let Ok(mut c) = node.control.lock() {
            c.connected = false;
            c.coordinator = None;
            c.key_exchange = None;
        }
        match result {
            Ok(SessionEnd::Revoked(detail)) => {
                tracing::error!(%detail, "coordinator says this node is revoked; control session stopped");
                if let Ok(mut c) = node.control.lock() {
                    c.revoked = true;
                    c.last_error = Some(format!("revoked: {detail}"));
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control session down");
                if let Ok(mut c) = node.control.lock() {
                    c.last_error = Some(e);
                }
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            failures = 0;
        }
        failures += 1;
        turn = turn.wrapping_add(1);
        let jitter = rand::thread_rng().gen_range(0.5..1.0);
        tokio::time::sleep(retry_delay(failures, addrs.len(), FIRST, MAX).mul_f64(jitter)).await;
    }
}

/// The wait before the next attempt after `failures` failed in a row over `addrs`
/// addresses: short while untried replicas remain, then doubling per full round.
fn retry_delay(failures: usize, addrs: usize, first: Duration, max: Duration) -> Duration {
    let addrs = addrs.max(1);
    if failures < addrs {
        return first / 2;
    }
    let rounds = (failures / addrs - 1).min(16) as u32;
    first.saturating_mul(1 << rounds).min(max)
}

/// The open tunnels and their key exchange groups, for the coordinator's dashboard.
fn tunnel_report(node: &Node) -> Vec<quicmesh_protocol::wire::TunnelReport> {
    let mut v: Vec<_> = node
        .tunnels
        .selected()
        .into_iter()
        .filter(|(_, c)| c.close_reason().is_none())
        .map(|(peer, c)| quicmesh_protocol::wire::TunnelReport {
            peer,
            key_exchange: tls::negotiated(&c).unwrap_or_default().to_string(),
        })
        .collect();
    v.sort_by(|a, b| a.peer.cmp(&b.peer));
    v.truncate(quicmesh_protocol::wire::MAX_TUNNEL_REPORTS);
    v
}

fn status(node: &Node) -> StatusReport {
    let (accepted, rejected, active) = node.metrics.totals();
    StatusReport {
        snapshot_version: node.view().version,
        cert_not_after: node.identity.load().not_after,
        flows_active: active.max(0) as u64,
        flows_accepted: accepted,
        flows_rejected: rejected,
        peers_connected: node.tunnels.connected() as u32,
        traffic: node.metrics.traffic.report(),
    }
}

async fn session(
    node: &Arc<Node>,
    coordinator: std::net::SocketAddr,
    replicas: usize,
) -> Result<SessionEnd, String> {
    let verifier = MeshServerVerifier::new(
        Some(node.trust.clone()),
        ServerExpect::Coordinator,
        Arc::new(|_| {}),
    );
    let mut client = tls::client_config(
        Some(node.cert.clone()),
        verifier,
        ALPN_CONTROL,
        node.cfg.key_exchange,
    )
    .map_err(|e| e.to_string())?;
    client.transport_config(tls::control_client_transport());
    let connecting = node
        .endpoint
        .connect_with(client, coordinator, "coordinator")
        .map_err(|e| e.to_string())?;
    // With other replicas to try, a silent one is given up on sooner.
    let deadline = if replicas > 1 {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let conn = tokio::time::timeout(deadline, connecting)
        .await
        .map_err(|_| format!("connecting to {coordinator}: timed out"))?
        .map_err(|e| format!("connecting to {coordinator}: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = Hello {
        node: node.cfg.name.clone(),
        tunnel_port: node.endpoint.local_addr().map(|a| a.port()).unwrap_or(0),
        advertise: node.advertise(),
        local: local_candidates(node, coordinator),
        relay: node.cfg.relay,
        services: node.cfg.service_names(),
        labels: node.cfg.labels.clone(),
        have_version: node.view().version,
        // The version, and the wire layouts this node decodes beyond the first.
        agent_version: format!(
            "{}; {}; {}; {}; {}; {}",
            env!("CARGO_PKG_VERSION"),
            quicmesh_protocol::policy::POLICY_LAYOUT_2,
            quicmesh_protocol::wire::HTTP_TRAFFIC,
            quicmesh_protocol::wire::WG_CLIENTS,
            quicmesh_protocol::wire::SESSION_INFO,
            quicmesh_protocol::wire::TUNNEL_REPORT
        ),
    };
    write_frame(&mut send, &ControlUp::Hello(hello))
        .await
        .map_err(|e| e.to_string())?;
    // Health of every checked service now, then on each transition.
    let mut health = node.health.clone();
    let checks = health.borrow_and_update().clone();
    if !checks.is_empty() {
        write_frame(&mut send, &ControlUp::Health(checks))
            .await
            .map_err(|e| e.to_string())?;
    }
    let group = tls::negotiated(&conn);
    node.metrics.handshake_completed("control", group);
    if let Ok(mut c) = node.control.lock() {
        c.connected = true;
        c.coordinator = Some(coordinator);
        c.last_error = None;
        c.key_exchange = group;
    }
    tracing::info!(%coordinator, "control session up");

    // Frames are read in their own task: reading is not cancel-safe inside select!.
    let (tx, mut rx) = mpsc::channel::<Result<Option<ControlDown>, FrameError>>(4);
    let reader = tokio::spawn(async move {
        loop {
            let r = read_frame::<ControlDown, _>(&mut recv).await;
            let stop = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    let _abort = AbortOnDrop(reader);
    let mut status_tick = tokio::time::interval(node.cfg.status_interval);
    let mut renew_tick = tokio::time::interval(Duration::from_millis(500));
    let jitter: f64 = rand::thread_rng().gen_range(0.0..1.0);
    let mut renewing = false;
    // Whether the coordinator asked for HTTP route reports (a coordinator that does not
    // know them never asks, and is never sent one).
    let mut http_traffic_wanted = false;
    let mut tunnels_wanted = false;
    // Whether the coordinator knows WireGuard clients (it sent them), and whether this
    // session told it about this node's gateway yet.
    let mut wg_coordinator = false;
    let mut gateway_reported = false;
    // The snapshot this session last applied: the base of the next delta.
    let mut base: Option<Snapshot> = None;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let msg = match msg {
                    Some(Ok(Some(m))) => m,
                    Some(Ok(None)) | None => return Err("coordinator closed the session".into()),
                    Some(Err(e)) => return Err(format!("control stream: {e}")),
                };
                match msg {
                    ControlDown::Snapshot(snap) => {
                        let reply = apply(node, *snap, &mut base);
                        write_frame(&mut send, &reply).await.map_err(|e| e.to_string())?;
                    }
                    ControlDown::Delta(d) => {
                        let reply = match base.as_ref().map(|b| delta::apply(b, &d)) {
                            Some(Ok(snap)) => apply(node, snap, &mut base),
                            Some(Err(e)) => {
                                tracing::info!(version = d.version, error = %e, "delta refused; asking for the whole snapshot");
                                ControlUp::Nack { version: d.version, reason: e.to_string() }
                            }
                            None => ControlUp::Nack { version: d.version, reason: "no snapshot to apply a delta to".into() },
                        };
                        write_frame(&mut send, &reply).await.map_err(|e| e.to_string())?;
                    }
                    ControlDown::Renewed { cert_der } => {
                        renewing = false;
                        if let Err(e) = install_renewed(node, cert_der) {
                            tracing::warn!(error = %e, "renewed certificate refused");
                        }
                    }
                    ControlDown::RenewRefused { detail } => {
                        renewing = false;
                        tracing::warn!(%detail, "renewal refused");
                    }
                    ControlDown::Punch { peer, candidates } => {
                        tracing::debug!(%peer, ?candidates, "peer is dialling: dialling back");
                        tokio::spawn(crate::tunnel::dial_back(node.clone(), peer, candidates));
                    }
                    ControlDown::RelayRefused { detail } => {
                        // The session goes on; peers just do not use this node as a relay.
                        tracing::warn!(%detail, "relay role refused by the coordinator");
                        if let Ok(mut c) = node.control.lock() {
                            c.last_error = Some(format!("relay refused: {detail}"));
                        }
                    }
                    ControlDown::WgClients(clients) => {
                        // A coordinator that sends clients takes gateway reports.
                        wg_coordinator = true;
                        node.apply_wg_clients(clients, true);
                    }
                    ControlDown::SessionInfo {
                        relay,
                        nat,
                        relay_token,
                    } => {
                        // Relayed datagrams go to the address this session runs to: the
                        // one this node's NAT already maps for it.
                        tracing::debug!(relay, nat, %coordinator, "session info");
                        node.paths.set_coordinator_relay(
                            (relay && relay_token != 0).then_some((coordinator, relay_token)),
                        );
                        node.paths.set_behind_nat(nat);
                    }
                    ControlDown::Features { http_traffic } => {
                        http_traffic_wanted = http_traffic;
                        // Routes are set in this node's TOML and change with a restart
                        // (a new session): told once.
                        let routes = crate::l7::route_settings(&node.cfg.upstreams);
                        if http_traffic && !routes.is_empty() {
                            write_frame(&mut send, &ControlUp::HttpRoutes(routes)).await.map_err(|e| e.to_string())?;
                        }
                    }
                    ControlDown::ReportTunnels => tunnels_wanted = true,
                    ControlDown::Goodbye { revoked: true, detail } => return Ok(SessionEnd::Revoked(detail)),
                    ControlDown::Goodbye { revoked: false, detail } => return Err(format!("coordinator said goodbye: {detail}")),
                    other => return Err(format!("unexpected control message {other:?}")),
                }
            }
            peers = node.tunnels.next_punches() => {
                for peer in peers {
                    write_frame(&mut send, &ControlUp::Punch { peer }).await.map_err(|e| e.to_string())?;
                }
            }
            Ok(()) = health.changed() => {
                let checks = health.borrow_and_update().clone();
                write_frame(&mut send, &ControlUp::Health(checks)).await.map_err(|e| e.to_string())?;
            }
            _ = status_tick.tick() => {
                write_frame(&mut send, &ControlUp::Status(status(node))).await.map_err(|e| e.to_string())?;
                if let (true, Some(g)) = (wg_coordinator, node.gateway.get()) {
                    write_frame(&mut send, &ControlUp::Gateway(g.report())).await.map_err(|e| e.to_string())?;
                    gateway_reported = true;
                }
                if tunnels_wanted {
                    write_frame(&mut send, &ControlUp::Tunnels(tunnel_report(node))).await.map_err(|e| e.to_string())?;
                }
                if http_traffic_wanted {
                    let routes = node.metrics.traffic.http_report();
                    if !routes.is_empty() {
                        write_frame(&mut send, &ControlUp::HttpTraffic(routes)).await.map_err(|e| e.to_string())?;
                    }
                }
            }
            _ = renew_tick.tick() => {
                // A gateway that came up since the session did is told at once (clients
                // cannot be given a configuration before the coordinator knows its key).
                if let (true, false, Some(g)) = (wg_coordinator, gateway_reported, node.gateway.get()) {
                    write_frame(&mut send, &ControlUp::Gateway(g.report())).await.map_err(|e| e.to_string())?;
                    gateway_reported = true;
                }
                let id = node.identity.load();
                if !renewing && unix_now() >= renew_at(id.not_before, id.not_after, jitter) {
                    let key = rcgen::KeyPair::from_pem(&node.key_pem).map_err(|e| e.to_string())?;
                    let csr_der = csr(node.cfg.name.as_str(), &key).map_err(|e| e.to_string())?;
                    tracing::info!(not_after = id.not_after, "renewing certificate");
                    write_frame(&mut send, &ControlUp::Renew { csr_der }).await.map_err(|e| e.to_string())?;
                    renewing = true;
                }
            }
        }
    }
}

/// The node's own addresses with its tunnel port: the listen address when it names one,
/// else the interface address the kernel picks toward the coordinator (no packet is sent).
fn local_candidates(node: &Node, coordinator: std::net::SocketAddr) -> Vec<std::net::SocketAddr> {
    let Ok(local) = node.endpoint.local_addr() else {
        return Vec::new();
    };
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let any: std::net::SocketAddr = if coordinator.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| {
            s.connect(coordinator)?;
            s.local_addr()
        })
        .map(|a| vec![std::net::SocketAddr::new(a.ip(), local.port())])
        .unwrap_or_default()
}

/// Applies a whole snapshot (sent whole or rebuilt from a delta) and answers for it.
fn apply(node: &Node, snap: Snapshot, base: &mut Option<Snapshot>) -> ControlUp {
    let version = snap.version;
    match node.apply_snapshot(&snap, true) {
        Ok(_) => {
            *base = Some(snap);
            ControlUp::Ack { version }
        }
        Err(e) => {
            tracing::warn!(version, error = %e, "snapshot refused");
            ControlUp::Nack {
                version,
                reason: e.to_string(),
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn install_renewed(node: &Node, cert_der: Vec<u8>) -> Result<(), String> {
    let trust = node.trust.load();
    let id = PeerIdentity::from_der(&cert_der, &trust.trust_domain).map_err(|e| e.to_string())?;
    if id.node != node.cfg.name {
        return Err(format!("certificate is for {}", id.node));
    }
    let key = rcgen::KeyPair::from_pem(&node.key_pem).map_err(|e| e.to_string())?;
    node.cert
        .set(vec![cert_der.clone()], &key.serialize_der())
        .map_err(|e| e.to_string())?;
    let stored = StoredIdentity {
        trust_domain: trust.trust_domain.clone(),
        cert_der: cert_der.clone(),
        ca_bundle: node
            .data
            .identity()
            .ok()
            .flatten()
            .map(|i| i.ca_bundle)
            .unwrap_or_default(),
    };
    node.data
        .save_identity(&stored)
        .map_err(|e| e.to_string())?;
    node.metrics.set_cert_not_after(id.not_after);
    tracing::info!(not_after = id.not_after, serial = %id.serial, "certificate renewed");
    node.identity.store(Arc::new(id));
    node.leaf_der.store(Arc::new(cert_der));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_tried_in_turn_before_the_backoff_grows() {
        let first = Duration::from_millis(250);
        let max = Duration::from_secs(4);
        // Three replicas: the first two failures move on at once (125 ms), then each full
        // round of failures doubles the wait, up to the cap.
        let waits: Vec<u128> = (1..=12)
            .map(|f| retry_delay(f, 3, first, max).as_millis())
            .collect();
        assert_eq!(
            waits,
            [125, 125, 250, 250, 250, 500, 500, 500, 1000, 1000, 1000, 2000]
        );
        // One coordinator: the backoff of old, 250 ms doubling to 4 s.
        let one: Vec<u128> = (1..=7)
            .map(|f| retry_delay(f, 1, first, max).as_millis())
            .collect();
        assert_eq!(one, [250, 500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(retry_delay(usize::MAX, 1, first, max), max);
    }

    #[tokio::test]
    async fn resolving_keeps_config_order_and_drops_duplicates_and_failures() {
        let c = crate::config::Coordinators::parse(vec![
            "198.18.0.2:7700".into(),
            "localhost:7700".into(),
            "no-such-host.invalid:7700".into(),
            "127.0.0.1:7700".into(),
        ])
        .unwrap();
        let got = resolve(&c).await;
        assert_eq!(got[0], "198.18.0.2:7700".parse().unwrap());
        assert!(got.contains(&"127.0.0.1:7700".parse().unwrap()), "{got:?}");
        let mut dedup = got.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), got.len(), "{got:?}");
        assert_eq!(
            got.iter()
                .filter(|a| **a == "127.0.0.1:7700".parse().unwrap())
                .count(),
            1,
            "{got:?}"
        );
    }
}
