//! The `control` scenario: one coordinator on SQLite, or R replicas on one PostgreSQL
//! database (real processes on loopback), and N simulated nodes in this process, each
//! enrolling with its own token and key and holding a real control session over QUIC (its
//! own client certificate, one shared UDP endpoint per 100 nodes; node i talks to replica
//! i mod R). Measures the time from `policy apply` until every node received and acked the
//! new snapshot, the coordinators' RSS and CPU (in all and per 1,000 sessions), the
//! snapshot sizes, and this process's own CPU (the simulator's share of the two cores).
//!
//! A simulated node keeps only the version it holds (a delta must start from it) and the
//! size of its peer set, not the peers: 10,000 of them share this process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use quicmesh_coordinator::client::ApiClient;
use quicmesh_netns_tests::{CoordinatorProc, Mesh, Place};
use quicmesh_node::config::NodeConfig;
use quicmesh_node::frame::{read_frame_sized, write_frame};
use quicmesh_node::tls::{self, CertSlot, MeshServerVerifier, ServerExpect, Trust};
use quicmesh_protocol::ident::Labels;
use quicmesh_protocol::wire::{ControlDown, ControlUp, Hello, ALPN_CONTROL};
use serde_json::{json, Value};

use crate::stat;
use tokio::sync::mpsc;

/// Simulated nodes sharing one UDP socket.
const NODES_PER_SOCKET: usize = 100;

/// Enrollments and session connects retried after a transport error, over the run.
static ENROLL_RETRIES: AtomicUsize = AtomicUsize::new(0);
/// Established sessions that ended and were made again, over the run.
static SESSION_RETRIES: AtomicUsize = AtomicUsize::new(0);

/// One simulated node's view of a policy push: when its snapshot arrived.
struct Arrival {
    policy_version: u64,
    at: Instant,
    /// Encoded size of the message that brought it.
    bytes: usize,
    /// Sent whole (true) or as a delta.
    whole: bool,
    peers: usize,
}

#[allow(clippy::too_many_arguments)]
async fn sim_node(
    i: usize,
    endpoint: quinn::Endpoint,
    coord: std::net::SocketAddr,
    api: ApiClient,
    dir: std::path::PathBuf,
    tx: mpsc::UnboundedSender<Arrival>,
    up: Arc<AtomicUsize>,
    mut joining: Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let name = format!("sim-{i}");
    let v = api
        .post(
            "/tokens",
            json!({"node": name, "services": [format!("svc-{}", i % 50)], "ttl_secs": 3600}),
        )
        .await?;
    let token = v["token"].as_str().context("token")?.to_string();
    let cfg_text = format!("name = \"{name}\"\ncoordinator = \"{coord}\"\ndata_dir = \"{}\"\nmetrics = \"off\"\n[[service]]\nname = \"svc-{}\"\naddress = \"127.0.0.1:9\"\n", dir.join(&name).display(), i % 50);
    let cfg = NodeConfig::parse(&cfg_text, &name, &dir)?;
    let key = rcgen::KeyPair::generate()?;
    // Retried on transport errors with backoff, as a real node does (counted: under a join
    // storm on two shared cores a handshake can miss its 15 s deadline).
    let mut backoff = Duration::from_millis(500);
    let id = loop {
        // As a real node: retried until it works (the run's deadline bounds it).
        match quicmesh_node::control::enroll(&endpoint, &cfg, &key, &token).await {
            Err(quicmesh_node::control::EnrollError::Transport { .. }) => {
                ENROLL_RETRIES.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
            other => break other?,
        }
    };
    let trust = Arc::new(arc_swap::ArcSwap::from_pointee(Trust::new(
        id.trust_domain.clone(),
        &id.ca_bundle,
        [],
    )?));
    let verifier =
        MeshServerVerifier::new(Some(trust), ServerExpect::Coordinator, Arc::new(|_| {}));
    let slot = CertSlot::with(vec![id.cert_der.clone()], &key.serialize_der())?;
    let client = tls::client_config(Some(slot), verifier, ALPN_CONTROL, tls::KeyExchange::Hybrid)?;
    // Sessions are made again when they end, as a real node's session loop does (a
    // coordinator under a join storm may give up a handshake the node saw complete);
    // each remake is counted.
    let mut first = true;
    loop {
        match session(
            i,
            &endpoint,
            &client,
            coord,
            &cfg,
            &tx,
            &up,
            &mut first,
            &mut joining,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(e) if !first => {
                SESSION_RETRIES.fetch_add(1, Ordering::Relaxed);
                note_session_remade(&e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Logged once per run: why the first simulated session had to be made again.
fn note_session_remade(e: &anyhow::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("bench: a simulated session ended and is made again ({e})"));
}

#[allow(clippy::too_many_arguments)]
async fn session(
    i: usize,
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    coord: std::net::SocketAddr,
    cfg: &NodeConfig,
    tx: &mpsc::UnboundedSender<Arrival>,
    up: &AtomicUsize,
    first: &mut bool,
    joining: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    let (_conn, (mut send, mut recv)) = loop {
        let attempt = async {
            let conn = endpoint
                .connect_with(client.clone(), coord, "coordinator")?
                .await?;
            let streams = conn.open_bi().await?;
            anyhow::Ok((conn, streams))
        };
        match attempt.await {
            Ok(s) => break s,
            Err(_) => {
                ENROLL_RETRIES.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
        }
    };
    let hello = Hello {
        node: cfg.name.clone(),
        tunnel_port: 7800,
        advertise: Some(format!("127.0.0.{}:7800", 1 + i % 200).parse()?),
        local: Vec::new(),
        relay: false,
        services: cfg.service_names(),
        labels: Labels::default(),
        have_version: 0,
        agent_version: format!("bench; {}", quicmesh_protocol::policy::POLICY_LAYOUT_2),
    };
    write_frame(&mut send, &ControlUp::Hello(hello)).await?;
    if std::mem::take(first) {
        up.fetch_add(1, Ordering::Relaxed);
    }
    // Like a real node: check each delta against the version held and ack it (or nack
    // it). Only the version and the peer count are kept (an upsert may be a new peer or a
    // changed one: the count is an upper bound between whole snapshots).
    let mut held: Option<(u64, usize)> = None;
    loop {
        let Some((msg, bytes)) = read_frame_sized::<ControlDown, _>(&mut recv).await? else {
            return Ok(());
        };
        let (version, policy_version, whole) = match msg {
            ControlDown::Snapshot(s) => {
                // Joined: the next node may start.
                joining.take();
                held = Some((s.version, s.peers.len()));
                (s.version, s.policy_version, true)
            }
            ControlDown::Delta(d) => match held.as_mut() {
                Some((v, peers)) if *v == d.base_version && d.version > d.base_version => {
                    *peers = peers.saturating_sub(d.remove.len());
                    *v = d.version;
                    (d.version, d.policy_version, false)
                }
                _ => {
                    let reason = format!("delta from {} does not apply", d.base_version);
                    write_frame(
                        &mut send,
                        &ControlUp::Nack {
                            version: d.version,
                            reason,
                        },
                    )
                    .await?;
                    continue;
                }
            },
            _ => continue,
        };
        let _ = tx.send(Arrival {
            policy_version,
            at: Instant::now(),
            bytes,
            whole,
            peers: held.as_ref().map(|h| h.1).unwrap_or(0),
        });
        write_frame(&mut send, &ControlUp::Ack { version }).await?;
    }
}

/// Which store the coordinators run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// Runs the scenario for each N; returns its JSON.
pub fn run(
    sizes: &[usize],
    deadline: Duration,
    replicas: usize,
    store: StoreKind,
) -> anyhow::Result<Value> {
    if store == StoreKind::Sqlite && replicas != 1 {
        bail!("--replicas {replicas} needs --store postgres (SQLite serves one coordinator)");
    }
    if replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    let label = format!(
        "{} x{replicas}",
        match store {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    );
    println!(
        "{:<12} {:>7} {:>8} {:>10} {:>10} {:>10} {:>9} {:>11} {:>9} {:>11} {:>9} {:>12} {:>12}",
        "store",
        "nodes",
        "setup s",
        "ack p50 ms",
        "ack p99 ms",
        "ack max ms",
        "coord MB",
        "MB/1k sess",
        "coord s",
        "cpu s/1k",
        "sim cpu s",
        "whole bytes",
        "push bytes"
    );
    for &n in sizes {
        match rt.block_on(one(n, deadline, replicas, store)) {
            Ok(mut row) => {
                row["store"] = json!(label);
                println!(
                    "{:<12} {:>7} {:>8.1} {:>10.1} {:>10.1} {:>10.1} {:>9.1} {:>11.1} {:>9.2} {:>11.2} {:>9.1} {:>12} {:>12}",
                    label,
                    n,
                    row["setup_s"].as_f64().unwrap_or(0.0),
                    row["ack_p50_ms"].as_f64().unwrap_or(0.0),
                    row["ack_p99_ms"].as_f64().unwrap_or(0.0),
                    row["ack_max_ms"].as_f64().unwrap_or(0.0),
                    row["coordinator_rss_mb"].as_f64().unwrap_or(0.0),
                    row["coordinator_rss_mb_per_1k_sessions"].as_f64().unwrap_or(0.0),
                    row["coordinator_cpu_s_for_apply"].as_f64().unwrap_or(0.0),
                    row["coordinator_cpu_s_setup_per_1k"].as_f64().unwrap_or(0.0),
                    row["simulator_cpu_s"].as_f64().unwrap_or(0.0),
                    row["whole_snapshot_bytes"],
                    row["push_bytes_per_node"]
                );
                if row["enroll_retries"].as_u64().unwrap_or(0) > 0
                    || row["session_retries"].as_u64().unwrap_or(0) > 0
                {
                    println!(
                        "        ({} enrollments or session connects retried after a transport timeout; {} sessions made again after they ended)",
                        row["enroll_retries"], row["session_retries"]
                    );
                }
                rows.push(row);
            }
            Err(e) => {
                println!("{label:<12} {n:>7} did not complete: {e:#}");
                rows.push(json!({"store": label, "nodes": n, "error": format!("{e:#}")}));
                break;
            }
        }
    }
    Ok(json!({"scenario": "control", "rows": rows}))
}

/// The coordinators' summed (RSS KiB, CPU ticks).
fn usage(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .map(|p| stat::proc_usage(*p))
        .fold((0, 0), |(r, c), (r2, c2)| (r + r2, c + c2))
}

pub async fn one(
    n: usize,
    limit: Duration,
    replicas: usize,
    store: StoreKind,
) -> anyhow::Result<Value> {
    let mesh = Mesh::new(&format!("bench-control-{n}"));
    let db = match store {
        StoreKind::Postgres => Some(tokio::task::block_in_place(
            quicmesh_coordinator::store::testdb::TestDb::new,
        )),
        StoreKind::Sqlite => None,
    };
    // Every simulated node asks for its token over the API from this one address.
    let http = [
        "--http-max-connections",
        "65536",
        "--http-max-connections-per-source",
        "65536",
    ];
    let reps = tokio::task::block_in_place(|| match &db {
        Some(db) => {
            CoordinatorProc::start_replicas(&mesh, "1h", &db.url, &Place::loopback(replicas), &http)
        }
        None => CoordinatorProc::start_with(&mesh, "1h", &http).map(|c| vec![c]),
    })?;
    let pids: Vec<u32> = reps
        .iter()
        .map(|c| c.pid().context("coordinator pid"))
        .collect::<anyhow::Result<_>>()?;
    let me = std::process::id();
    let (_, sim_cpu0) = stat::proc_usage(me);
    let (_, setup_cpu0) = usage(&pids);
    let coord = &reps[0];
    let api = ApiClient::new(
        &format!("http://127.0.0.1:{}", coord.http_port),
        &coord.admin_token,
    )?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let up = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut endpoints = Vec::new();
    // A real node has a socket of its own; here 100 share one, with large buffers (with
    // 500 per socket and the kernel's default buffer, the simulator's sockets dropped
    // packets by the million and its sessions timed out).
    for _ in 0..n.div_ceil(NODES_PER_SOCKET) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let s = socket2::SockRef::from(&sock);
        let _ = s.set_recv_buffer_size(8 << 20);
        let _ = s.set_send_buffer_size(8 << 20);
        endpoints.push(quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            sock,
            Arc::new(quinn::TokioRuntime),
        )?);
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (ep, api, tx, up, dir, sem) = (
            endpoints[i / NODES_PER_SOCKET].clone(),
            api.clone(),
            tx.clone(),
            up.clone(),
            mesh.path().to_path_buf(),
            sem.clone(),
        );
        let addr = reps[i % reps.len()].control_addr();
        tasks.push(tokio::spawn(async move {
            // Joins are paced: 64 nodes at a time from token to first snapshot (a fleet
            // rolling out); sessions stay open.
            let permit = sem.acquire_owned().await.ok();
            sim_node(i, ep, addr, api, dir, tx, up.clone(), permit).await
        }));
    }
    let deadline = Instant::now() + limit;
    while up.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} sessions up after {} s",
                up.load(Ordering::Relaxed),
                limit.as_secs()
            );
        }
        if let Some(pos) = tasks.iter().position(|t| t.is_finished()) {
            let r = tasks.swap_remove(pos).await;
            let log = std::fs::read_to_string(&coord.log).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("ended"))
                .take(5)
                .collect();
            let err = match r {
                Ok(Err(e)) => format!("{e:?}"),
                other => format!("{other:?}"),
            };
            let _ = std::fs::copy(
                &coord.log,
                std::env::temp_dir().join("quicmesh-bench-control-coordinator.log"),
            );
            bail!("a simulated node stopped during setup after {} sessions and {:.1} s: {err}; coordinator log: {tail:?}", up.load(Ordering::Relaxed), start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let setup = start.elapsed().as_secs_f64();
    // Let the join storm settle: wait until no snapshot arrived for a second.
    // The largest whole snapshot seen: the last nodes to join get every other node.
    let mut whole_bytes = 0;
    while let Ok(Some(a)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        if a.whole {
            whole_bytes = whole_bytes.max(a.bytes);
        }
    }
    let (_, cpu0) = usage(&pids);
    let setup_cpu_s = (cpu0 - setup_cpu0) as f64 / 100.0;
    let policy = "[[rule]]\nfrom = \"svc-1\"\nto = \"svc-2\"\naction = \"allow\"\n";
    let t0 = Instant::now();
    let v = api.post("/policy", json!({"source": policy})).await?;
    let version = v["version"].as_u64().context("policy version")?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
    let mut got = 0;
    let mut bytes = 0;
    let (mut wholes, mut peers) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(600);
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(a)) if a.policy_version == version => {
                h.record(a.at.duration_since(t0).as_millis().max(1) as u64)?;
                bytes = bytes.max(a.bytes);
                wholes += usize::from(a.whole);
                peers = peers.max(a.peers);
                got += 1;
            }
            Ok(Some(_)) => {}
            _ => bail!("only {got} of {n} nodes received policy v{version}"),
        }
    }
    // Every node acked: the coordinator's catalog agrees.
    let acked = loop {
        let nodes = api.get("/nodes").await?;
        let mv = nodes["mesh_version"].as_u64().unwrap_or(0);
        let k = nodes["nodes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["acked_version"].as_u64() == Some(mv))
                    .count()
            })
            .unwrap_or(0);
        if k == n || t0.elapsed() > Duration::from_secs(600) {
            break k;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let all_acked_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (rss, cpu1) = usage(&pids);
    let (_, sim_cpu1) = stat::proc_usage(me);
    for t in &tasks {
        t.abort();
    }
    // The coordinators' logs outlive the run's temp dir, for reading after it.
    for (i, c) in reps.iter().enumerate() {
        let _ = std::fs::copy(
            &c.log,
            std::env::temp_dir().join(format!("quicmesh-bench-control-{n}-replica-{i}.log")),
        );
    }
    drop(reps);
    drop(db);
    let per_k = 1000.0 / n as f64;
    Ok(json!({
        "nodes": n,
        "replicas": replicas,
        "coordinator_rss_mb_per_1k_sessions": rss as f64 / 1024.0 * per_k,
        "coordinator_cpu_s_setup": setup_cpu_s,
        "coordinator_cpu_s_setup_per_1k": setup_cpu_s * per_k,
        "simulator_cpu_s": (sim_cpu1 - sim_cpu0) as f64 / 100.0,
        "setup_s": setup,
        "ack_p50_ms": h.value_at_quantile(0.5) as f64,
        "ack_p99_ms": h.value_at_quantile(0.99) as f64,
        "ack_max_ms": h.max() as f64,
        "catalog_all_acked_ms": all_acked_ms,
        "catalog_acked_nodes": acked,
        "coordinator_rss_mb": rss as f64 / 1024.0,
        "coordinator_cpu_s_for_apply": (cpu1 - cpu0) as f64 / 100.0,
        "push_bytes_per_node": bytes,
        "enroll_retries": ENROLL_RETRIES.swap(0, Ordering::Relaxed),
        "session_retries": SESSION_RETRIES.swap(0, Ordering::Relaxed),
        "pushes_sent_whole": wholes,
        "peers_per_node": peers,
        "whole_snapshot_bytes": whole_bytes,
    }))
}
