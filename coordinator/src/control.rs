//! The QUIC control listener. A connection without a client certificate may only enroll:
//! it holds one of a few slots (bounded per source address and in total; a short wait for
//! one, then refused) from its handshake to its answer, with short deadlines for each step,
//! so idle or slow
//! unauthenticated clients cannot starve enrollment. A connection with a verified node
//! certificate runs a session: snapshots down (each acked or nacked), status and renewals
//! up.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quicmesh_node::frame::{read_frame, write_frame};
use quicmesh_node::tls::{self, CertSlot, KeyExchange, MeshClientVerifier};
use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::wire::{ControlDown, ControlUp, Hello, ALPN_CONTROL};
use tokio::sync::mpsc;

use crate::drops::{ControlDrop, Reason};
use crate::mesh::{now, Mesh, Sent};

/// Lifetime of the coordinator's own server certificate (re-issued at every start).
const SERVER_CERT_TTL: i64 = 30 * 86400;
/// How long after its certificate expired a node may still connect to renew it (a node
/// that outlived its certificate during a coordinator outage). Revocation still applies.
const EXPIRED_RENEWAL_GRACE_SECS: u64 = 7 * 86400;
/// How long the publisher waits after a change for more of the same burst (an `apply`
/// of several rules, a batch of enrollments) before publishing.
const CATALOG_GATHER: Duration = Duration::from_millis(10);
/// How long one frame of a session may take to be written (a whole snapshot of a large
/// mesh over a slow link takes seconds; a node that stops reading takes forever).
const SESSION_WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// How long the publisher waits before trying again when the store failed it.
const CATALOG_RETRY: Duration = Duration::from_millis(500);
/// Certificate-less (enrollment) connections served at once from one source address
/// (many honest nodes may share a NAT's address: they wait their turn briefly).
pub const MAX_ENROLLING_PER_SOURCE: usize = 8;
/// Certificate-less connections served at once in total.
pub const MAX_ENROLLING: usize = 128;
/// How long a certificate-less connection may wait for a slot before it is refused.
const SLOT_WAIT: Duration = Duration::from_secs(5);
/// Connections waiting for a slot at once; more are refused without waiting.
const MAX_WAITING: usize = 1024;
/// Time from a connection's first packet to a completed handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Time a certificate-less connection has to open its stream and send a whole request.
const ENROLL_REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Time a node's session has to send its hello.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// How long an enrollment answer is given to be acknowledged before the connection is
/// closed (its slot is free already).
const ENROLL_LINGER: Duration = Duration::from_secs(5);

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
    // Hybrid: a node from before the hybrid (during an upgrade) still gets in, classically.
    let mut cfg = tls::server_config(slot, verifier, ALPN_CONTROL, KeyExchange::Hybrid)?;
    cfg.transport_config(tls::control_transport());
    // Unlike tunnels (whose routes the nodes' path layer manages), a control connection
    // follows its node to a new address or NAT mapping: that is how the coordinator
    // learns where the node went (`Mesh::sweep_offline`).
    cfg.migration(true);
    let reset = reset_key(&mesh.data_dir)?;
    let socket = std::net::UdpSocket::bind(addr)
        .map_err(|e| anyhow::anyhow!("bind control listener {addr}: {e}"))?;
    // One socket carries every session: with the kernel's default buffer (208 KiB) a join
    // storm overflowed it (millions of `UdpRcvbufErrors`), sessions timed out and were made
    // again, each with a whole snapshot. Best effort: capped at net.core.{r,w}mem_max.
    let s = socket2::SockRef::from(&socket);
    let _ = s.set_recv_buffer_size(CONTROL_SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(CONTROL_SOCKET_BUFFER);
    let mut ep_cfg = quinn::EndpointConfig::new(Arc::new(reset.hmac));
    // Connection IDs carry a keyed check the endpoint validates before it answers an
    // unknown one with a reset: the restarted process must recognise the old IDs too.
    let cid_key = reset.cid_key;
    ep_cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // The control socket is also the relay of last resort ([`crate::relay`]).
    use quinn::Runtime;
    let runtime = Arc::new(quinn::TokioRuntime);
    let inner = runtime
        .wrap_udp_socket(socket)
        .map_err(|e| anyhow::anyhow!("bind control listener {addr}: {e}"))?;
    let ep = quinn::Endpoint::new_with_abstract_socket(
        ep_cfg,
        Some(cfg),
        crate::relay::CoordSocket::new(inner, mesh.relay.clone()),
        runtime,
    )
    .map_err(|e| anyhow::anyhow!("bind control listener {addr}: {e}"))?;
    Ok(ep)
}

/// Socket buffer size asked for the control listener.
const CONTROL_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Length of the stateless-reset secret kept in the data dir.
const RESET_KEY_LEN: usize = 64;

/// The keys a restarted coordinator needs to end its predecessor's connections.
struct ResetKeys {
    /// Stateless-reset tokens are derived with it.
    hmac: aws_lc_rs::hmac::Key,
    /// Connection IDs are checked with it.
    cid_key: u64,
}

/// The secret stateless resets and connection IDs are derived from, kept in `reset.key`
/// (0600) so that a coordinator restarted on the same address answers its nodes' packets
/// for the dead process's connections with resets they recognise: their sessions end at
/// their next keepalive and they reconnect, instead of waiting out the idle timeout.
fn reset_key(dir: &std::path::Path) -> anyhow::Result<ResetKeys> {
    let path = dir.join("reset.key");
    let bytes = match std::fs::read(&path) {
        Ok(b) if b.len() == RESET_KEY_LEN => b,
        Ok(b) => anyhow::bail!(
            "{}: stateless-reset key is {} bytes, expected {RESET_KEY_LEN}; delete it to make a new one",
            path.display(),
            b.len()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = vec![0u8; RESET_KEY_LEN];
            rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
            quicmesh_node::store::write_private(&path, &b)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            b
        }
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    let (hmac, cid) = bytes.split_at(RESET_KEY_LEN / 2);
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid[..8]);
    Ok(ResetKeys {
        hmac: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, hmac),
        cid_key: u64::from_le_bytes(cid_key),
    })
}

/// Slots of certificate-less connections: bounded per source address and in total. A
/// slot is held from the handshake to the enrollment answer, no longer.
#[derive(Debug, Default)]
pub struct EnrollSlots {
    held: Mutex<(HashMap<IpAddr, usize>, usize)>,
    /// Woken when a slot is freed.
    freed: tokio::sync::Notify,
    waiting: std::sync::atomic::AtomicUsize,
}

/// A held slot; dropping it frees it.
#[derive(Debug)]
pub struct EnrollSlot {
    slots: Arc<EnrollSlots>,
    ip: IpAddr,
}

impl EnrollSlots {
    /// Takes a slot for a connection from `ip`, or says why there is none.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Result<EnrollSlot, ControlDrop> {
        // One source is an IPv4 address or an IPv6 /64 (a host holds a whole /64).
        let ip = match ip.to_canonical() {
            IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(a) & !(u64::MAX as u128),
            )),
            v4 => v4,
        };
        let mut g = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (per, total) = &mut *g;
        if per.get(&ip).copied().unwrap_or(0) >= MAX_ENROLLING_PER_SOURCE {
            return Err(ControlDrop::SourceBusy);
        }
        if *total >= MAX_ENROLLING {
            return Err(ControlDrop::ListenerBusy);
        }
        *per.entry(ip).or_default() += 1;
        *total += 1;
        Ok(EnrollSlot {
            slots: self.clone(),
            ip,
        })
    }

    /// Takes a slot for a connection from `ip`, waiting up to `wait` for one to be freed
    /// (while fewer than [`MAX_WAITING`] connections wait); says why there is none.
    pub async fn take(
        self: &Arc<Self>,
        ip: IpAddr,
        wait: Duration,
    ) -> Result<EnrollSlot, ControlDrop> {
        use std::sync::atomic::Ordering;
        let deadline = tokio::time::Instant::now() + wait;
        let mut waiting = None;
        loop {
            // Registered before trying, so a slot freed in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let reason = match self.try_take(ip) {
                Ok(slot) => return Ok(slot),
                Err(r) => r,
            };
            if waiting.is_none() {
                if self.waiting.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING {
                    self.waiting.fetch_sub(1, Ordering::Relaxed);
                    return Err(reason);
                }
                waiting = Some(Waiting(self));
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(reason);
            }
        }
    }

    /// Slots held now (in total).
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

impl Drop for EnrollSlot {
    fn drop(&mut self) {
        {
            let mut g = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
            let (per, total) = &mut *g;
            if let Some(n) = per.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&self.ip);
                }
            }
            *total = total.saturating_sub(1);
        }
        self.slots.freed.notify_waiters();
    }
}

/// Counts a connection waiting for a slot while it lives.
struct Waiting<'a>(&'a EnrollSlots);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Serves control connections until the endpoint closes.
pub async fn serve(mesh: Arc<Mesh>, endpoint: quinn::Endpoint) {
    let _publisher = Abort(tokio::spawn(publish_catalogs(
        mesh.clone(),
        crate::catalog::interval,
    )));
    // A session's address moves with its node (NAT rebinding, a new network).
    let m = mesh.clone();
    let _relay_table = Abort(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            m.refresh_relay();
        }
    }));
    let slots = Arc::new(EnrollSlots::default());
    while let Some(incoming) = endpoint.accept().await {
        let mesh = mesh.clone();
        let slots = slots.clone();
        if mesh.fenced.load(std::sync::atomic::Ordering::Relaxed) {
            // No session and no certificate from a replica that cannot reach its
            // database: refused at once, so the node tries another replica.
            mesh.drops.control.count(ControlDrop::Fenced);
            incoming.refuse();
            continue;
        }
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(HANDSHAKE_DEADLINE, incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    mesh.drops.control.count(ControlDrop::HandshakeFailed);
                    tracing::info!(%remote, error = %e, "control handshake failed");
                    return;
                }
                Err(_) => {
                    // Dropping the handshake in progress abandons the connection.
                    mesh.drops.control.count(ControlDrop::HandshakeTimeout);
                    tracing::info!(%remote, "control handshake timed out");
                    return;
                }
            };
            if let Err(e) = handle(&mesh, conn, &slots).await {
                tracing::info!(%remote, error = %e, "control connection ended");
            }
        });
    }
}

async fn handle(
    mesh: &Arc<Mesh>,
    conn: quinn::Connection,
    slots: &Arc<EnrollSlots>,
) -> anyhow::Result<()> {
    let id = tls::peer_leaf(&conn)
        .map(|d| PeerIdentity::from_der(&d, &mesh.ca.trust_domain))
        .transpose()?;
    match id {
        None => enrollment(mesh, conn, slots).await,
        Some(id) => {
            let first = async {
                let (send, mut recv) = conn.accept_bi().await?;
                let first = read_frame::<ControlUp, _>(&mut recv).await?;
                anyhow::Ok((send, recv, first))
            };
            let (send, recv, first) =
                tokio::time::timeout(HELLO_DEADLINE, first)
                    .await
                    .map_err(|_| {
                        mesh.drops.control.count(ControlDrop::RequestTimeout);
                        anyhow::anyhow!("no hello in time")
                    })??;
            match first {
                Some(ControlUp::Hello(hello)) => {
                    if hello.node != id.node {
                        anyhow::bail!(
                            "hello names {} but the certificate is {}",
                            hello.node,
                            id.node
                        );
                    }
                    session(mesh.clone(), conn, id, hello, send, recv).await
                }
                Some(_) => {
                    conn.close(quinn::VarInt::from_u32(1), b"expected hello");
                    anyhow::bail!("session did not start with hello")
                }
                None => anyhow::bail!("closed before the first message"),
            }
        }
    }
}

/// A certificate-less connection: one enrollment request, one answer, within deadlines
/// and holding a bounded slot, then closed.
async fn enrollment(
    mesh: &Arc<Mesh>,
    conn: quinn::Connection,
    slots: &Arc<EnrollSlots>,
) -> anyhow::Result<()> {
    let slot = match slots.take(conn.remote_address().ip(), SLOT_WAIT).await {
        Ok(s) => s,
        Err(reason) => {
            mesh.drops.control.count(reason);
            conn.close(quinn::VarInt::from_u32(2), b"busy: retry later");
            anyhow::bail!("enrollment refused: {}", reason.as_str());
        }
    };
    let request = async {
        let (send, mut recv) = conn.accept_bi().await?;
        let first = read_frame::<ControlUp, _>(&mut recv).await?;
        anyhow::Ok((send, first))
    };
    let (mut send, first) = match tokio::time::timeout(ENROLL_REQUEST_DEADLINE, request).await {
        Ok(r) => r?,
        Err(_) => {
            mesh.drops.control.count(ControlDrop::RequestTimeout);
            conn.close(quinn::VarInt::from_u32(1), b"too slow");
            anyhow::bail!("no enrollment request in time");
        }
    };
    let req = match first {
        Some(ControlUp::Enroll(req)) => req,
        Some(_) => {
            mesh.drops.control.count(ControlDrop::NotEnroll);
            conn.close(quinn::VarInt::from_u32(1), b"enroll first");
            anyhow::bail!("unauthenticated connection did not enroll")
        }
        None => anyhow::bail!("closed before the first message"),
    };
    let reply = crate::mesh::blocking(|| mesh.enroll(&req));
    // The answer fits the stream's initial window: writing it does not wait on the peer,
    // but a deadline keeps a peer that never grants credit from holding the slot.
    tokio::time::timeout(ENROLL_REQUEST_DEADLINE, async {
        write_frame(&mut send, &reply).await?;
        send.finish()?;
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("enrollment answer not written in time"))??;
    drop(slot);
    // The node closes the connection once it has read the answer; closing first could
    // discard an answer still in flight or not yet read, so give it until the linger ends
    // (without a slot) to acknowledge the answer and close.
    let _ = tokio::time::timeout(ENROLL_LINGER, async {
        let _ = send.stopped().await;
        conn.closed().await
    })
    .await;
    conn.close(quinn::VarInt::from_u32(0), b"answered");
    Ok(())
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
    let record = crate::mesh::blocking(|| mesh.node(&name))?;
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
    let record = record.as_ref();
    let relay = hello.relay && record.is_some_and(|r| r.relay);
    if hello.relay && !relay {
        tracing::warn!(node = %name, "node asks to relay but its join token did not grant the relay role; not advertised as a relay");
        write_frame(
            &mut send,
            &ControlDown::RelayRefused {
                detail: "relay = true needs a join token created with --relay; this node is not advertised as a relay".into(),
            },
        )
        .await?;
    }
    let observed = SocketAddr::new(
        conn.remote_address().ip().to_canonical(),
        conn.remote_address().port(),
    );
    let nat = behind_nat(&hello, observed);
    // Whether it moved or not, the session start below is recorded as one change.
    mesh.set_candidates(
        &name,
        crate::mesh::Reach {
            candidates,
            relay,
            observed: Some(observed),
            nat,
        },
    );
    let (kick_tx, mut kick_rx) = mpsc::channel::<ControlDown>(4);
    // A node that takes relayed datagrams from the coordinator gets a token its datagrams
    // to the relay carry (random, never zero: zero is "none").
    let relay_token = quicmesh_protocol::wire::announces(
        &hello.agent_version,
        quicmesh_protocol::wire::SESSION_INFO,
    )
    .then(|| rand::random::<u64>().max(1));
    let (sid, revoked_meanwhile) = crate::mesh::blocking(|| {
        let sid = mesh.register_session(&name, conn.clone(), kick_tx, relay_token);
        // Revoked (on any replica) between the check above and the registration: the
        // kick of that revocation may have missed this session, so look again now.
        let revoked = mesh
            .node(&name)
            .map(|r| r.is_none_or(|r| r.revoked_at.is_some()));
        (sid, revoked)
    });
    if revoked_meanwhile? {
        mesh.end_session(&name, sid);
        write_frame(
            &mut send,
            &ControlDown::Goodbye {
                revoked: true,
                detail: "node is revoked".into(),
            },
        )
        .await?;
        let _ = send.finish();
        anyhow::bail!("node {name} was revoked as its session started");
    }
    tracing::info!(node = %name, %endpoint, agent = %hello.agent_version, have = hello.have_version, "node session up");
    // A session start is a change of liveness (and maybe of where the node is): one
    // change for all of it.
    let started = crate::mesh::blocking(|| {
        mesh.session_started(&name, &endpoint.to_string(), &hello.agent_version)
    });
    let result = match started {
        Ok(_) => {
            // A node that reports HTTP route traffic is asked to (an older node is never
            // sent a message it does not know).
            // A failed write is the session's result: the registered session still ends
            // below (never `?` here).
            let features = if quicmesh_protocol::wire::announces(
                &hello.agent_version,
                quicmesh_protocol::wire::HTTP_TRAFFIC,
            ) {
                write_session(&mut send, &ControlDown::Features { http_traffic: true }).await
            } else {
                Ok(())
            };
            // Whether this replica relays for it (the relay of last resort), and whether
            // it is behind a NAT (a dialer behind none sends no openers).
            let features = match features {
                Ok(()) if relay_token.is_some() => {
                    let relay = mesh.relay.enabled();
                    let info = ControlDown::SessionInfo {
                        relay,
                        nat,
                        relay_token: if relay { relay_token.unwrap_or(0) } else { 0 },
                    };
                    write_session(&mut send, &info).await
                }
                other => other,
            };
            // A node that reports its tunnels (their key exchange groups, for the
            // dashboard) is asked to.
            let features = match features {
                Ok(())
                    if quicmesh_protocol::wire::announces(
                        &hello.agent_version,
                        quicmesh_protocol::wire::TUNNEL_REPORT,
                    ) =>
                {
                    write_session(&mut send, &ControlDown::ReportTunnels).await
                }
                other => other,
            };
            match features {
                Err(e) => Err(e),
                Ok(()) => {
                    run_session(
                        &mesh,
                        &id,
                        hello.have_version,
                        Speaks::from_agent(&hello.agent_version),
                        &mut send,
                        recv,
                        &mut kick_rx,
                    )
                    .await
                }
            }
        }
        // Fenced or the store failed: the registered session ends here, not later.
        Err(e) => Err(e.into()),
    };
    crate::mesh::blocking(|| {
        mesh.end_session(&name, sid);
        let _ = mesh.node_seen(&name);
    });
    tracing::info!(node = %name, "node session down");
    result
}

/// A NAT is in front of the node: its session comes from an address that is none of the
/// addresses it reports as its own, and it advertises none. A node that reports no
/// address of its own, or reaches the coordinator over loopback, is not judged.
fn behind_nat(hello: &Hello, observed: SocketAddr) -> bool {
    hello.advertise.is_none()
        && !observed.ip().is_loopback()
        && !hello.local.is_empty()
        && !hello
            .local
            .iter()
            .any(|l| l.ip().to_canonical() == observed.ip())
}

/// Publishes catalogs to the sessions: at once after a quiet spell, then at most once per
/// `interval(sessions, nodes)` ([`crate::catalog::interval`]) while changes keep coming, except a
/// revocation, published at once. Every change wakes this one task; the sessions wake
/// only for what it publishes.
async fn publish_catalogs(mesh: Arc<Mesh>, interval: fn(usize, usize) -> Duration) {
    let mut versions = mesh.subscribe();
    let mut built = tokio::time::Instant::now();
    let mut due = true;
    loop {
        if !due {
            if versions.changed().await.is_err() {
                return;
            }
            // A burst's changes arrive within milliseconds of each other.
            tokio::time::sleep(CATALOG_GATHER).await;
            let gap = interval(mesh.session_count(), mesh.catalog_size());
            tokio::select! {
                _ = tokio::time::sleep_until(built + gap) => {}
                // A revocation is published at once, whatever the churn.
                _ = mesh.catalog_urged() => {}
            }
        }
        versions.borrow_and_update();
        built = tokio::time::Instant::now();
        match crate::mesh::blocking(|| mesh.publish_catalog()) {
            Ok(_) => due = false,
            Err(e) => {
                // Fenced or the store failed: the change is still to publish.
                tracing::debug!(error = %e, "catalog not published; trying again");
                due = true;
                tokio::time::sleep(CATALOG_RETRY).await;
            }
        }
    }
}

/// What a node's agent version says it decodes beyond the first layouts.
#[derive(Debug, Clone, Copy)]
struct Speaks {
    /// Policy layout 2 (else it is sent layout 1).
    layout_2: bool,
    /// `ControlDown::WgClients`.
    wg: bool,
}

impl Speaks {
    fn from_agent(agent_version: &str) -> Self {
        Self {
            layout_2: quicmesh_protocol::policy::speaks_layout_2(agent_version),
            wg: quicmesh_protocol::wire::announces(
                agent_version,
                quicmesh_protocol::wire::WG_CLIENTS,
            ),
        }
    }
}

async fn run_session(
    mesh: &Arc<Mesh>,
    id: &PeerIdentity,
    have: u64,
    speaks: Speaks,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    kick_rx: &mut mpsc::Receiver<ControlDown>,
) -> anyhow::Result<()> {
    let name = id.node.to_string();
    let services: Vec<String> = id.services.iter().map(|s| s.to_string()).collect();
    let mut published = mesh.subscribe_catalog();
    // What the node was last sent; `None` sends a whole snapshot (session start, or the
    // node refused a delta), otherwise a delta from it.
    let mut last: Option<Sent> = None;
    // The version last sent whole: a node refusing that is not sent it again and again.
    let mut whole_version = 0u64;
    // The WireGuard clients last sent.
    let mut wg_sent: Option<Arc<Vec<quicmesh_protocol::wg::WgClient>>> = None;
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
        let mut current = *published.borrow_and_update();
        if last.is_none() {
            // A node that moved from another replica may hold a newer version than this
            // one published yet: it is sent one at least as new (never one it would
            // refuse), up to this replica's own version (what it claims is not trusted).
            current = current.max(have.min(mesh.version_now()));
        }
        if last.as_ref().is_none_or(|l| current > l.version()) {
            // The WireGuard clients as of this version, when they changed since last sent.
            if speaks.wg {
                let list = crate::mesh::blocking(|| mesh.wg_clients_at_version(current))?;
                if wg_sent.as_ref().is_none_or(|s| **s != *list) {
                    write_session(send, &ControlDown::WgClients((*list).clone())).await?;
                    wg_sent = Some(list);
                }
            }
            let (update, sent) = crate::mesh::blocking(|| {
                mesh.update_for(&id.node, last.as_ref(), current, speaks.layout_2)
            })?;
            if update.whole {
                whole_version = sent.version();
            }
            write_session_frame(send, &update.frame).await?;
            last = Some(sent);
        }
        tokio::select! {
            r = published.changed() => r?,
            kick = kick_rx.recv() => {
                if let Some(msg) = kick {
                    write_session(send, &msg).await?;
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
                        mesh.node_seen(&name)?;
                        mesh.report_traffic(&name, s.traffic.clone());
                        tracing::debug!(node = %name, ?s, "status");
                    }
                    ControlUp::Health(checks) => {
                        // Checked against the services its certificate names (what it
                        // enrolled for), never a catalog that may predate it.
                        mesh.report_health(&name, &services, &checks)?;
                    }
                    ControlUp::Punch { peer } => match mesh.punch(&id.node, peer.as_str()) {
                        Ok(()) => tracing::debug!(node = %name, %peer, "punch request passed on"),
                        Err(r) => tracing::debug!(node = %name, %peer, reason = r.as_str(), "punch request dropped"),
                    },
                    ControlUp::Renew { csr_der } => {
                        let reply = match mesh.renew(&id.node, &csr_der) {
                            Ok(cert_der) => ControlDown::Renewed { cert_der },
                            Err(e) => ControlDown::RenewRefused { detail: e.to_string() },
                        };
                        write_session(send, &reply).await?;
                    }
                    ControlUp::HttpTraffic(routes) => mesh.report_http_traffic(&name, &services, routes),
                    ControlUp::HttpRoutes(routes) => mesh.report_http_routes(&name, &services, routes),
                    ControlUp::Gateway(report) => crate::mesh::blocking(|| mesh.report_gateway(&name, report)),
                    ControlUp::Tunnels(report) => mesh.report_tunnels(&name, report),
                    ControlUp::Hello(_) | ControlUp::Enroll(_) => anyhow::bail!("unexpected message in session"),
                }
            }
        }
    }
}

/// Writes one message of a session ([`write_session_frame`]).
async fn write_session(send: &mut quinn::SendStream, msg: &ControlDown) -> anyhow::Result<()> {
    write_session_frame(send, &quicmesh_protocol::wire::encode_frame(msg)).await
}

/// Writes one frame of a session, within [`SESSION_WRITE_DEADLINE`]: a node that stops
/// reading its stream does not hold its session (and this task) forever.
async fn write_session_frame(send: &mut quinn::SendStream, frame: &[u8]) -> anyhow::Result<()> {
    match tokio::time::timeout(SESSION_WRITE_DEADLINE, send.write_all(frame)).await {
        Ok(r) => Ok(r?),
        Err(_) => anyhow::bail!("node did not read its session for {SESSION_WRITE_DEADLINE:?}"),
    }
}

struct Abort(tokio::task::JoinHandle<()>);
impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_behind_a_nat_when_its_session_comes_from_none_of_its_own_addresses() {
        let hello = |advertise: Option<&str>, local: &[&str]| Hello {
            node: quicmesh_protocol::ident::NodeName::new("a").unwrap(),
            tunnel_port: 7800,
            advertise: advertise.map(|a| a.parse().unwrap()),
            local: local.iter().map(|a| a.parse().unwrap()).collect(),
            relay: false,
            services: Vec::new(),
            labels: Default::default(),
            have_version: 0,
            agent_version: String::new(),
        };
        let seen: SocketAddr = "198.18.50.1:7800".parse().unwrap();
        assert!(behind_nat(&hello(None, &["198.18.60.11:7800"]), seen));
        // Its own address (any port: a NAT keeps ports when it can, so ports prove
        // nothing), an advertised address, nothing reported, loopback: not judged NATed.
        assert!(!behind_nat(&hello(None, &["198.18.50.1:7800"]), seen));
        assert!(!behind_nat(&hello(None, &["198.18.50.1:9000"]), seen));
        assert!(!behind_nat(
            &hello(Some("198.18.50.1:7800"), &["198.18.60.11:7800"]),
            seen
        ));
        assert!(!behind_nat(&hello(None, &[]), seen));
        assert!(!behind_nat(
            &hello(None, &["198.18.60.11:7800"]),
            "127.0.0.1:7800".parse().unwrap()
        ));
        // An IPv4-mapped IPv6 session address is the IPv4 address.
        assert!(!behind_nat(
            &hello(None, &["[::ffff:198.18.50.1]:7800"]),
            seen
        ));
    }

    #[test]
    fn enrollment_slots_are_bounded_per_source_and_in_total_and_freed_on_drop() {
        let slots = Arc::new(EnrollSlots::default());
        let a: IpAddr = [198, 18, 0, 1].into();
        let held: Vec<_> = (0..MAX_ENROLLING_PER_SOURCE)
            .map(|_| slots.try_take(a).unwrap())
            .collect();
        assert_eq!(slots.try_take(a).unwrap_err(), ControlDrop::SourceBusy);
        // Addresses of one IPv6 /64 are one source.
        let six: Vec<IpAddr> = (1..=9)
            .map(|i| format!("fd00:1:2:3::{i}").parse().unwrap())
            .collect();
        let held6: Vec<_> = six
            .iter()
            .filter_map(|ip| slots.try_take(*ip).ok())
            .collect();
        assert_eq!(held6.len(), MAX_ENROLLING_PER_SOURCE, "a /64 is one source");
        drop(held6);
        // The same address as IPv4-mapped IPv6 is the same source.
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert_eq!(slots.try_take(mapped).unwrap_err(), ControlDrop::SourceBusy);
        // Another source still gets one, until the listener is full.
        let mut others = Vec::new();
        for i in 0..(MAX_ENROLLING - MAX_ENROLLING_PER_SOURCE) {
            let ip: IpAddr = [198, 18, 1 + (i / 200) as u8, (i % 200) as u8].into();
            others.push(slots.try_take(ip).unwrap());
        }
        assert_eq!(slots.held(), MAX_ENROLLING);
        let b: IpAddr = [198, 18, 9, 9].into();
        assert_eq!(slots.try_take(b).unwrap_err(), ControlDrop::ListenerBusy);
        drop(held);
        assert_eq!(slots.held(), MAX_ENROLLING - MAX_ENROLLING_PER_SOURCE);
        assert!(slots.try_take(a).is_ok());
        drop(others);
        assert_eq!(slots.held(), 0);
    }

    #[tokio::test]
    async fn a_connection_waits_briefly_for_its_sources_slot_then_is_refused() {
        let slots = Arc::new(EnrollSlots::default());
        let a: IpAddr = [198, 18, 0, 1].into();
        let mut held: Vec<_> = (0..MAX_ENROLLING_PER_SOURCE)
            .map(|_| slots.try_take(a).unwrap())
            .collect();
        // Nothing is freed: refused when the wait ends.
        let wait = Duration::from_millis(200);
        let t = tokio::time::Instant::now();
        assert_eq!(
            slots.take(a, wait).await.unwrap_err(),
            ControlDrop::SourceBusy
        );
        assert!(t.elapsed() >= wait);
        // A slot freed during the wait goes to the waiter.
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take(a, SLOT_WAIT).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        held.pop();
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(slots.waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    /// A mesh in a temp dir (kept while the dir lives).
    fn test_mesh() -> (tempfile::TempDir, Arc<Mesh>) {
        let dir = tempfile::tempdir().unwrap();
        crate::mesh::init(
            dir.path(),
            quicmesh_protocol::ident::TrustDomain::new("t.test").unwrap(),
        )
        .unwrap();
        let mesh = Mesh::open(dir.path(), 3600).unwrap();
        (dir, mesh)
    }

    /// The real control listener for `mesh` on a loopback port; its address.
    fn serve_on_loopback(mesh: &Arc<Mesh>) -> SocketAddr {
        let ep = bind(mesh, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep.local_addr().unwrap();
        tokio::spawn(serve(mesh.clone(), ep));
        addr
    }

    /// Enrolls `name` through the real listener at `addr` and opens its control session
    /// (Hello sent); `window` bounds what its stream may be sent before it reads.
    async fn open_session(
        mesh: &Arc<Mesh>,
        dir: &std::path::Path,
        addr: SocketAddr,
        name: &str,
        window: u32,
    ) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
        use quicmesh_node::tls::{MeshServerVerifier, ServerExpect, Trust};
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let (token, _) = mesh
            .create_token(name, &[], &Default::default(), false, 600)
            .unwrap();
        let cfg = quicmesh_node::config::NodeConfig::parse(
            &format!(
                "name = \"{name}\"\ncoordinator = \"{addr}\"\ndata_dir = \"{}\"\nmetrics = \"off\"\n",
                dir.join(name).display()
            ),
            name,
            dir,
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let id = quicmesh_node::control::enroll(&ep, &cfg, &key, &token)
            .await
            .unwrap();
        let trust = Arc::new(arc_swap::ArcSwap::from_pointee(
            Trust::new(id.trust_domain.clone(), &id.ca_bundle, []).unwrap(),
        ));
        let verifier =
            MeshServerVerifier::new(Some(trust), ServerExpect::Coordinator, Arc::new(|_| {}));
        let slot = CertSlot::with(vec![id.cert_der.clone()], &key.serialize_der()).unwrap();
        let mut client =
            tls::client_config(Some(slot), verifier, ALPN_CONTROL, KeyExchange::Hybrid).unwrap();
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(quinn::VarInt::from_u32(window));
        client.transport_config(Arc::new(t));
        let conn = ep
            .connect_with(client, addr, "coordinator")
            .unwrap()
            .await
            .unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let hello = Hello {
            node: cfg.name.clone(),
            tunnel_port: 7800,
            advertise: None,
            local: Vec::new(),
            relay: false,
            services: Vec::new(),
            labels: Default::default(),
            have_version: 0,
            agent_version: format!("test; {}", quicmesh_protocol::policy::POLICY_LAYOUT_2),
        };
        write_frame(&mut send, &ControlUp::Hello(hello))
            .await
            .unwrap();
        (conn, send, recv)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoked_node_that_stops_reading_and_jams_its_queue_is_cut_off_anyway() {
        let (dir, mesh) = test_mesh();
        let addr = serve_on_loopback(&mesh);
        // The attacker's node reads nothing: its session stalls on its first snapshot.
        let (jammed, _s, _r) = open_session(&mesh, dir.path(), addr, "web-1", 64).await;
        // An honest node reading its stream, for the twin below.
        let (honest, _hs, mut hr) = open_session(&mesh, dir.path(), addr, "db-1", 1 << 20).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Nodes it controls fill its session's queue with punch requests.
        for i in 0..8 {
            let from = format!("p-{i}");
            mesh.set_candidates(
                &from,
                crate::health::Reach {
                    candidates: vec![SocketAddr::from(([127, 0, 0, 1], 7800 + i))],
                    relay: false,
                    observed: None,
                    nat: false,
                },
            );
            let _ = mesh.punch(
                &quicmesh_protocol::ident::NodeName::new(&from).unwrap(),
                "web-1",
            );
        }
        mesh.revoke("web-1").unwrap();
        let start = std::time::Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(4), jammed.closed()).await;
        assert!(
            closed.is_ok(),
            "the revoked node kept its session past its goodbye"
        );
        eprintln!("jammed session closed {:?} after revoke", start.elapsed());
        // Twin: a node that reads is told why, then its session ends.
        mesh.revoke("db-1").unwrap();
        let bye = tokio::time::timeout(Duration::from_secs(4), async {
            loop {
                match read_frame::<ControlDown, _>(&mut hr).await {
                    Ok(Some(ControlDown::Goodbye { revoked, .. })) => return revoked,
                    Ok(Some(_)) => continue,
                    other => panic!("no goodbye: {other:?}"),
                }
            }
        })
        .await
        .unwrap();
        assert!(bye, "the goodbye says revoked");
        let _ = tokio::time::timeout(Duration::from_secs(4), honest.closed()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_churn_a_revocation_is_published_at_once_and_other_changes_wait() {
        let (_dir, mesh) = test_mesh();
        let (token, _) = mesh
            .create_token("web-1", &[], &Default::default(), false, 600)
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let t: quicmesh_protocol::token::JoinToken = token.parse().unwrap();
        let req = quicmesh_protocol::wire::EnrollRequest {
            secret: t.secret_hex(),
            node: quicmesh_protocol::ident::NodeName::new("web-1").unwrap(),
            csr_der: quicmesh_node::control::csr("web-1", &key).unwrap(),
            services: vec![],
            labels: Default::default(),
        };
        assert!(matches!(mesh.enroll(&req), ControlDown::Enrolled(_)));
        let mut published = mesh.subscribe_catalog();
        // A mesh so busy that catalogs are published every 5 s.
        let _p = Abort(tokio::spawn(publish_catalogs(mesh.clone(), |_, _| {
            Duration::from_secs(5)
        })));
        let wait = |rx: &mut tokio::sync::watch::Receiver<u64>, within_ms| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(within_ms), rx.changed())
                    .await
                    .is_ok()
            }
        };
        assert!(
            wait(&mut published, 2_000).await,
            "the first catalog at once"
        );
        published.borrow_and_update();
        // Churn: a policy change right after waits out the interval...
        mesh.apply_policy("[[rule]]\nfrom = \"a\"\nto = \"b\"\naction = \"allow\"\n")
            .unwrap();
        assert!(
            !wait(&mut published, 1_000).await,
            "an ordinary change waits for the interval"
        );
        // ...but a revocation does not: every node's deny list gets it now.
        let start = std::time::Instant::now();
        mesh.revoke("web-1").unwrap();
        assert!(
            wait(&mut published, 1_000).await,
            "the revocation was held back with the churn"
        );
        let v = *published.borrow_and_update();
        let (update, _) = mesh
            .update_for(
                &quicmesh_protocol::ident::NodeName::new("db-1").unwrap(),
                None,
                v,
                true,
            )
            .unwrap();
        let ControlDown::Snapshot(snap) = crate::catalog::tests::decode_frame(&update.frame) else {
            panic!("a whole snapshot")
        };
        assert_eq!(
            snap.revoked.len(),
            1,
            "the published catalog denies web-1's serial"
        );
        eprintln!("revocation published {:?} after `revoke`", start.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_honest_enrollments_from_one_address_all_succeed() {
        // Its denied twin is the slot bound above: one address never holds more than its
        // share, but honest nodes behind one NAT wait their turn instead of failing.
        let (dir, mesh) = test_mesh();
        let addr = serve_on_loopback(&mesh);
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let n = 16 * MAX_ENROLLING_PER_SOURCE;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let name = format!("n-{i}");
            let (token, _) = mesh
                .create_token(&name, &[], &Default::default(), false, 600)
                .unwrap();
            let cfg = quicmesh_node::config::NodeConfig::parse(
                &format!(
                    "name = \"{name}\"\ncoordinator = \"{addr}\"\ndata_dir = \"{}\"\nmetrics = \"off\"\n",
                    dir.path().join(&name).display()
                ),
                &name,
                dir.path(),
            )
            .unwrap();
            let client = client.clone();
            tasks.spawn(async move {
                let key = rcgen::KeyPair::generate().unwrap();
                quicmesh_node::control::enroll(&client, &cfg, &key, &token).await
            });
        }
        let mut ok = 0;
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => panic!("an honest enrollment failed: {e}"),
            }
        }
        assert_eq!(ok, n);
        assert_eq!(mesh.drops.control.get(ControlDrop::SourceBusy), 0);
    }
}
