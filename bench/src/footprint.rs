//! The `footprint` scenario: what quicmesh costs in memory. A node's RSS when idle with 10
//! peers (a tunnel open to each), the same node's and a peer's peak RSS after L4 load
//! through it (open-loop requests and a bulk transfer), and the coordinator's RSS with
//! 100 simulated nodes in session. Runs on loopback: no root needed.

use std::time::Duration;

use anyhow::Context;
use quicmesh_netns_tests::net::echo_server;
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};
use serde_json::{json, Value};

use crate::load::{open_loop, sink_server};
use crate::stat;

const PEERS: usize = 10;

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Runs the scenario and returns its JSON.
pub fn run() -> anyhow::Result<Value> {
    let mesh = Mesh::new("bench-footprint");
    let coord = CoordinatorProc::start(&mesh, "24h")?;
    let mut policy = String::new();
    for i in 0..PEERS {
        policy.push_str(&format!(
            "[[rule]]\nfrom = \"hub\"\nto = \"s{i}\"\naction = \"allow\"\n"
        ));
    }
    let out = coord.apply_policy(&mesh, &policy)?;
    anyhow::ensure!(
        out.status.success(),
        "policy apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo = echo_server()?;
    let sink_port = quicmesh_netns_tests::net::free_tcp_port();
    sink_server(&format!("127.0.0.1:{sink_port}"))?;
    let sink: std::net::SocketAddr = ([127, 0, 0, 1], sink_port).into();
    let mut peers = Vec::new();
    for i in 0..PEERS {
        let mut spec = NodeSpec::new(&format!("peer-{i}")).service(&format!("s{i}"), echo);
        if i == 0 {
            spec = spec.service("bulk", sink);
        }
        peers.push(NodeProc::start(&mesh, &coord, &spec)?);
    }
    let mut hub_spec = NodeSpec::new("hub").service("hub", echo).upstream("bulk");
    for i in 0..PEERS {
        hub_spec = hub_spec.upstream(&format!("s{i}"));
    }
    policy.push_str("[[rule]]\nfrom = \"hub\"\nto = \"bulk\"\naction = \"allow\"\n");
    coord.apply_policy(&mesh, &policy)?;
    let hub = NodeProc::start(&mesh, &coord, &hub_spec)?;
    coord.wait_all_acked(PEERS + 1, Duration::from_secs(30));
    // One request to each peer: a tunnel to each.
    for i in 0..PEERS {
        let addr = hub.upstream(&format!("s{i}"));
        let (h, n) = open_loop(addr, 100, 1, 1).with_context(|| format!("request to s{i}"))?;
        anyhow::ensure!(n > 0 && !h.is_empty(), "no reply from s{i}");
    }
    std::thread::sleep(Duration::from_secs(3));
    let hub_pid = hub.pid().context("hub pid")?;
    let peer_pid = peers[0].pid().context("peer pid")?;
    let (idle_rss, _, _) = stat::proc_usage_full(hub_pid);
    let mut peer_idle: Vec<f64> = peers
        .iter()
        .filter_map(|p| p.pid())
        .map(|p| mb(stat::proc_usage_full(p).0))
        .collect();
    peer_idle.sort_by(|a, b| a.total_cmp(b));

    // Load through hub -> peer-0: 10k requests/s over 4 connections for 5 s, then 256 MiB.
    let (h, n) = open_loop(hub.upstream("s0"), 10_000, 5, 4)?;
    let mbit = crate::l4::bulk(hub.upstream("bulk"), 256)?;
    let (hub_rss, hub_hwm, _) = stat::proc_usage_full(hub_pid);
    let (_, peer_hwm, _) = stat::proc_usage_full(peer_pid);

    // The coordinator with 100 nodes in session.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let c100 = rt.block_on(crate::control::one(
        100,
        Duration::from_secs(600),
        1,
        crate::control::StoreKind::Sqlite,
    ))?;
    let coord_100 = c100["coordinator_rss_mb"].as_f64().unwrap_or(0.0);

    let rows = [
        ("node idle, 10 peers (tunnel to each) RSS MB", mb(idle_rss)),
        (
            "peer node idle RSS MB (median)",
            peer_idle.get(peer_idle.len() / 2).copied().unwrap_or(0.0),
        ),
        ("node after L4 load RSS MB", mb(hub_rss)),
        ("node peak RSS under L4 load MB", mb(hub_hwm)),
        ("serving peer peak RSS under L4 load MB", mb(peer_hwm)),
        ("coordinator RSS, 100 nodes in session MB", coord_100),
    ];
    println!(
        "footprint (load: {n} requests at 10k/s, p99 {} us; 256 MiB bulk at {mbit:.0} Mbit/s)",
        h.value_at_quantile(0.99)
    );
    for (k, v) in rows {
        println!("  {k:<44} {v:>8.1}");
    }
    drop(hub);
    drop(peers);
    drop(coord);
    Ok(json!({
        "scenario": "footprint",
        "rows": rows.iter().map(|(k, v)| json!({"metric": k, "value": v})).collect::<Vec<_>>(),
        "load": {"requests": n, "p99_us": h.value_at_quantile(0.99), "bulk_mbit_s": mbit},
    }))
}
