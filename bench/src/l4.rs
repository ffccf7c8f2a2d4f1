//! The `l4` scenario: a TCP echo service reached three ways from another host —
//! directly, through quicmesh's L4 path (client -> upstream bind -> QUIC tunnel -> ingress
//! -> service), and through an mTLS stunnel pair (the classic sidecar shape) — measuring
//! open-loop request/response latency at fixed rates, bulk goodput, and new-connection
//! rate with first-byte latency.
//!
//! Two hosts (network namespaces) on one LAN, 198.18.0.1 (client side) and 198.18.0.2
//! (service side). Every load is bounded in count and time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use quicmesh_netns_tests::topo::{in_ns, Net};
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};
use serde_json::{json, Value};

use crate::load::{echo_server, hist, open_loop, sink_server};
use crate::stat;

const ECHO_PORT: u16 = 7000;
const SINK_PORT: u16 = 7001;
const STUNNEL_SERVER_PORT: u16 = 8443;
const STUNNEL_CLIENT_PORT: u16 = 17000;
const STUNNEL_SINK_SERVER_PORT: u16 = 8444;
const STUNNEL_SINK_CLIENT_PORT: u16 = 17001;

/// Scenario knobs.
#[derive(Debug, Clone)]
pub struct L4Opts {
    pub rates: Vec<u64>,
    pub secs: u64,
    pub conns: usize,
    pub bulk_mib: usize,
    pub rounds: usize,
}

/// Pushes `mib` MiB and waits for the sink's answer; returns Mbit/s.
pub fn bulk(addr: SocketAddr, mib: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let buf = vec![0x5au8; 256 * 1024];
    for _ in 0..mib * 4 {
        s.write_all(&buf)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut k = [0u8; 1];
    s.read_exact(&mut k)?;
    Ok((mib as f64 * 8.0 * 1024.0 * 1024.0) / start.elapsed().as_secs_f64() / 1e6)
}

/// New connections for `secs`: connect, 1-byte round trip, close. Returns (conn/s,
/// first-byte latency histogram in µs).
fn new_conns(addr: SocketAddr, secs: u64) -> anyhow::Result<(f64, Histogram<u64>)> {
    let mut h = hist();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) && n < 50_000 {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).context("first byte")?;
        h.record(t.elapsed().as_micros().max(1) as u64)?;
        n += 1;
    }
    Ok((n as f64 / start.elapsed().as_secs_f64(), h))
}

/// First flows measured, each from a freshly started node.
const FIRST_FLOW_SAMPLES: usize = 5;

/// Waits until a (re)started node holds a snapshot (the mesh's peers).
fn wait_snapshot(node: &NodeProc) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if node
            .status()
            .is_ok_and(|s| s["snapshot_version"].as_u64().unwrap_or(0) > 0)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{}: no snapshot within 15 s of its start", node.name)
}

fn first_byte(addr: SocketAddr) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

struct Stunnel {
    children: Vec<Child>,
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Makes a CA and two leaves for the stunnel pair; writes PEM files into `dir`.
pub(crate) fn stunnel_pki(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "bench CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    for name in ["server", "client"] {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec!["198.18.0.2".to_string()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(
            dir.join(format!("{name}.pem")),
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
    }
    Ok(())
}

fn start_stunnel(net: &Net, dir: &Path) -> anyhow::Result<Stunnel> {
    if Command::new("stunnel")
        .arg("-version")
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        bail!("stunnel is not installed (apt-get install stunnel4)");
    }
    stunnel_pki(dir)?;
    let d = dir.display();
    let common = |name: &str| {
        format!("foreground = yes\npid =\nsyslog = no\noutput = {d}/stunnel-{name}.log\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n")
    };
    let server = format!(
        "{}[echo]\naccept = 198.18.0.2:{STUNNEL_SERVER_PORT}\nconnect = 127.0.0.1:{ECHO_PORT}\ncert = {d}/server.pem\nCAfile = {d}/ca.pem\nverifyChain = yes\nrequireCert = yes\n[sink]\naccept = 198.18.0.2:{STUNNEL_SINK_SERVER_PORT}\nconnect = 127.0.0.1:{SINK_PORT}\ncert = {d}/server.pem\nCAfile = {d}/ca.pem\nverifyChain = yes\nrequireCert = yes\n",
        common("server")
    );
    let client = format!(
        "{}client = yes\n[echo]\naccept = 127.0.0.1:{STUNNEL_CLIENT_PORT}\nconnect = 198.18.0.2:{STUNNEL_SERVER_PORT}\ncert = {d}/client.pem\nCAfile = {d}/ca.pem\nverifyChain = yes\n[sink]\naccept = 127.0.0.1:{STUNNEL_SINK_CLIENT_PORT}\nconnect = 198.18.0.2:{STUNNEL_SINK_SERVER_PORT}\ncert = {d}/client.pem\nCAfile = {d}/ca.pem\nverifyChain = yes\n",
        common("client")
    );
    std::fs::write(dir.join("stunnel-server.conf"), server)?;
    std::fs::write(dir.join("stunnel-client.conf"), client)?;
    let mut children = Vec::new();
    for (host, conf) in [
        ("svc", "stunnel-server.conf"),
        ("client", "stunnel-client.conf"),
    ] {
        children.push(
            Command::new("ip")
                .args(["netns", "exec", &net.ns(host), "stunnel"])
                .arg(dir.join(conf))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok(Stunnel { children })
}

/// One system under test: where the client sends requests and bulk data.
struct Path3 {
    name: &'static str,
    echo: SocketAddr,
    sink: SocketAddr,
}

/// Runs the scenario and returns its JSON.
pub fn run(opts: &L4Opts) -> anyhow::Result<Value> {
    let mesh = Mesh::new("bench-l4");
    let mut net = Net::new("l4", mesh.path())?;
    let lan = net.lan("l4", "198.18.0")?;
    let ns_client = net.host("client", &lan, 1, None)?;
    let ns_svc = net.host("svc", &lan, 2, None)?;
    in_ns(&ns_svc, || -> std::io::Result<()> {
        echo_server(&format!("0.0.0.0:{ECHO_PORT}"))?;
        sink_server(&format!("0.0.0.0:{SINK_PORT}"))
    })??;

    let coord = CoordinatorProc::start_in(&mesh, "24h", &ns_client, [198, 18, 0, 1].into())?;
    let policy = "[[rule]]\nfrom = \"web\"\nto = \"echo\"\naction = \"allow\"\n[[rule]]\nfrom = \"web\"\nto = \"sink\"\naction = \"allow\"\n";
    let out = coord.apply_policy(&mesh, policy)?;
    if !out.status.success() {
        bail!("policy apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    let echo_local: SocketAddr = ([127, 0, 0, 1], ECHO_PORT).into();
    let sink_local: SocketAddr = ([127, 0, 0, 1], SINK_PORT).into();
    let svc = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("svc-1")
            .on(&ns_svc)
            .service("echo", echo_local)
            .service("sink", sink_local),
    )?;
    let web_spec = NodeSpec::new("web-1")
        .on(&ns_client)
        .service("web", echo_local)
        .upstream("echo")
        .upstream("sink");
    let mut web = NodeProc::start(&mesh, &coord, &web_spec)?;
    coord.wait_all_acked(2, Duration::from_secs(15));
    let mesh_echo = web.upstream("echo");
    // The first flow to a never-seen peer: tunnel handshake included. One sample per
    // process, so web-1 is restarted for each (a new process knows no tunnel).
    let mut first_flows = Vec::new();
    for i in 0..FIRST_FLOW_SAMPLES {
        if i > 0 {
            web.restart()?;
            wait_snapshot(&web)?;
            coord.wait_all_acked(2, Duration::from_secs(15));
        }
        first_flows.push(in_ns(&ns_client, move || first_byte(mesh_echo))??);
    }
    let (first_new_peer_us, first_min, first_max) = stat::median_spread(&first_flows);
    let stunnel = start_stunnel(&net, mesh.path());
    let mut paths = vec![
        Path3 {
            name: "direct",
            echo: ([198, 18, 0, 2], ECHO_PORT).into(),
            sink: ([198, 18, 0, 2], SINK_PORT).into(),
        },
        Path3 {
            name: "quicmesh",
            echo: mesh_echo,
            sink: web.upstream("sink"),
        },
    ];
    let stunnel_note = match &stunnel {
        Ok(_) => {
            paths.push(Path3 {
                name: "stunnel",
                echo: ([127, 0, 0, 1], STUNNEL_CLIENT_PORT).into(),
                sink: ([127, 0, 0, 1], STUNNEL_SINK_CLIENT_PORT).into(),
            });
            None
        }
        Err(e) => Some(e.to_string()),
    };

    // rows[(system, metric)] -> values over rounds
    let mut results: Vec<Value> = Vec::new();
    let mut samples: std::collections::BTreeMap<(String, String), Vec<f64>> = Default::default();
    for round in 0..opts.rounds {
        let order: Vec<&Path3> = (0..paths.len())
            .map(|i| &paths[(i + round) % paths.len()])
            .collect();
        for p in order {
            let (echo, sink, secs, conns, mib) =
                (p.echo, p.sink, opts.secs, opts.conns, opts.bulk_mib);
            for &rate in &opts.rates {
                let before = stat::cpu_jiffies();
                let (h, n) = in_ns(&ns_client, move || open_loop(echo, rate, secs, conns))??;
                let steal = stat::steal_pct(before, stat::cpu_jiffies());
                for (q, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p999")] {
                    samples
                        .entry((p.name.into(), format!("rr {rate}/s {name} us")))
                        .or_default()
                        .push(h.value_at_quantile(q) as f64);
                }
                results.push(json!({"round": round, "system": p.name, "test": "open-loop", "rate": rate, "requests": n, "p50_us": h.value_at_quantile(0.5), "p99_us": h.value_at_quantile(0.99), "p999_us": h.value_at_quantile(0.999), "max_us": h.max(), "steal_pct": steal}));
            }
            let before = stat::cpu_jiffies();
            let mbit = in_ns(&ns_client, move || bulk(sink, mib))??;
            let steal = stat::steal_pct(before, stat::cpu_jiffies());
            samples
                .entry((p.name.into(), "bulk Mbit/s".into()))
                .or_default()
                .push(mbit);
            results.push(json!({"round": round, "system": p.name, "test": "bulk", "mbit_s": mbit, "steal_pct": steal}));
            let (cps, h) = in_ns(&ns_client, move || new_conns(echo, 3))??;
            samples
                .entry((p.name.into(), "new conn/s".into()))
                .or_default()
                .push(cps);
            samples
                .entry((p.name.into(), "new conn first byte p50 us".into()))
                .or_default()
                .push(h.value_at_quantile(0.5) as f64);
            samples
                .entry((p.name.into(), "new conn first byte p99 us".into()))
                .or_default()
                .push(h.value_at_quantile(0.99) as f64);
            results.push(json!({"round": round, "system": p.name, "test": "new-connections", "conn_per_s": cps, "first_byte_p50_us": h.value_at_quantile(0.5), "first_byte_p99_us": h.value_at_quantile(0.99)}));
        }
    }
    drop(stunnel);

    // The table: median [min-max] per system, then quicmesh's added latency over direct
    // next to stunnel's, pair by pair within the run.
    let systems: Vec<&str> = paths.iter().map(|p| p.name).collect();
    let metrics: Vec<String> = {
        let mut m: Vec<String> = samples.keys().map(|(_, k)| k.clone()).collect();
        m.dedup();
        let mut seen = std::collections::BTreeSet::new();
        m.retain(|x| seen.insert(x.clone()));
        m
    };
    println!(
        "l4: {} rounds, open-loop {:?} req/s over {} connections for {} s each, bulk {} MiB",
        opts.rounds, opts.rates, opts.conns, opts.secs, opts.bulk_mib
    );
    print!("{:<30}", "metric (median [min-max])");
    for s in &systems {
        print!(" {s:>24}");
    }
    println!();
    let med = |s: &str, m: &str| {
        samples
            .get(&(s.to_string(), m.to_string()))
            .map(|v| stat::median_spread(v))
    };
    let mut table = Vec::new();
    for m in &metrics {
        print!("{m:<30}");
        let mut row = json!({"metric": m});
        for s in &systems {
            match med(s, m) {
                Some((md, lo, hi)) => {
                    print!(" {:>24}", format!("{md:.0} [{lo:.0}-{hi:.0}]"));
                    row[*s] = json!({"median": md, "min": lo, "max": hi});
                }
                None => print!(" {:>24}", "-"),
            }
        }
        println!();
        table.push(row);
    }
    println!("added latency over direct TCP (median of per-round differences):");
    let mut added = Vec::new();
    for rate in &opts.rates {
        for q in ["p50", "p99"] {
            let m = format!("rr {rate}/s {q} us");
            let d = samples
                .get(&("direct".to_string(), m.clone()))
                .cloned()
                .unwrap_or_default();
            let mut line = format!("  {rate:>6}/s {q}:");
            let mut row = json!({"rate": rate, "quantile": q});
            for s in ["quicmesh", "stunnel"] {
                if let Some(v) = samples.get(&(s.to_string(), m.clone())) {
                    let diffs: Vec<f64> = v.iter().zip(&d).map(|(a, b)| a - b).collect();
                    let (md, _, _) = stat::median_spread(&diffs);
                    line.push_str(&format!("  {s} +{md:.0} us"));
                    row[s] = json!(md);
                }
            }
            println!("{line}");
            added.push(row);
        }
    }
    println!("first flow to a never-seen peer (quicmesh, tunnel handshake included): {first_new_peer_us:.0} us [{first_min:.0}-{first_max:.0}] over {} node starts", first_flows.len());
    if let Some(why) = &stunnel_note {
        println!("stunnel: not run: {why}");
    }
    drop(web);
    drop(svc);
    drop(coord);
    Ok(json!({
        "scenario": "l4",
        "opts": {"rates": opts.rates, "secs": opts.secs, "conns": opts.conns, "bulk_mib": opts.bulk_mib, "rounds": opts.rounds},
        "table": table,
        "added_latency_us": added,
        "first_flow_new_peer_us": first_new_peer_us,
        "first_flow_new_peer_samples_us": first_flows,
        "stunnel": stunnel_note.unwrap_or_else(|| "ran".into()),
        "runs": results,
    }))
}
