//! `quicmesh-bench`: measurements, never pass/fail. Each scenario prints a table of
//! hdrhistogram percentiles and writes JSON under the results dir.
//!
//! Scenarios so far:
//! - `micro`: the per-flow CPU work of the protocol crate — stream header encode+decode and
//!   policy evaluation over a policy of N rules — in nanoseconds per operation.
//!
//! - `l4`: a TCP echo service directly, through quicmesh's L4 path, and through an mTLS
//!   stunnel pair, between two network namespaces (root): open-loop latency at fixed rates,
//!   bulk goodput, new-connection rate; medians over rounds and quicmesh's added latency.
//!
//! - `control`: one coordinator and N simulated nodes with real control sessions: time from
//!   `policy apply` until every node has the new snapshot, coordinator RSS and CPU,
//!   snapshot size per node.
//!
//! - `l3`: the overlay against raw veth, wireguard-go, boringtun, Nebula and quincy between
//!   two namespaces, and the overlay through a relay: iperf3 throughput, RTT, CPU seconds
//!   per GB, RSS.
//!
//! - `l7`: HTTP/1.1 keep-alive and gRPC unary directly, through quicmesh (a stream per
//!   request, and an L4 upstream beside it) and through an mTLS HAProxy pair: added
//!   latency at fixed rates, requests/s at saturation, CPU per 100k requests, RSS.
//!
//! - `footprint`: node and coordinator memory, idle and under load.
//!
//! - `dns`: a node's DNS server's query latency, against a bare UDP round trip.

mod all;
mod control;
mod dns;
mod footprint;
mod install;
mod l3;
mod l4;
mod l7;
mod load;
mod plot;
mod stat;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use quicmesh_protocol::ident::{Labels, ServiceName};
use quicmesh_protocol::policy::{Destination, Policy, Source};
use quicmesh_protocol::wire::{decode, encode, StreamHeader};
use serde_json::json;

#[derive(Parser)]
#[command(name = "quicmesh-bench", about = "quicmesh benchmarks")]
struct Cli {
    /// Where JSON results are written.
    #[arg(long, default_value = "bench-results")]
    results: PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Per-flow protocol work: header codec and policy evaluation.
    Micro {
        /// Operations measured per case.
        #[arg(long, default_value_t = 200_000)]
        ops: u64,
    },
    /// One coordinator, N simulated nodes: policy push latency and coordinator cost.
    Control {
        /// Node counts, run in order until one does not complete.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
        nodes: Vec<usize>,
        /// Longest wait for all sessions to come up at one size.
        #[arg(long, default_value_t = 600)]
        deadline_secs: u64,
        /// Coordinator replicas (more than one needs --store postgres).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// The coordinators' store: sqlite (one coordinator) or postgres (a fresh database
        /// on the test server, `bash .ci/postgres start`, or QUICMESH_TEST_POSTGRES).
        #[arg(long, value_enum, default_value = "sqlite")]
        store: control::StoreKind,
    },
    /// Installs the peers (apt-get and cargo install, pinned versions; needs root).
    Install,
    /// Installs the peers, runs every scenario, writes summary.md and the plots.
    All {
        /// Replace the <!-- bench:begin/end --> section of this README with the summary.
        #[arg(long)]
        readme: Option<PathBuf>,
        /// Seconds per iperf3 test in l3.
        #[arg(long, default_value_t = 10)]
        l3_secs: u64,
        /// Rounds for l3 and l4.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// IP tunnels: raw veth, quicmesh overlay (direct and relayed), wireguard-go, boringtun,
    /// Nebula, quincy (needs root: network namespaces and TUN devices).
    L3 {
        /// Seconds per iperf3 test.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Rounds (the order of systems rotates each round).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Systems to run.
        #[arg(long, value_delimiter = ',', default_values_t = l3::SYSTEMS.iter().map(|s| s.to_string()))]
        systems: Vec<String>,
    },
    /// Memory: a node idle with 10 peers and under L4 load, the coordinator with 100 nodes.
    Footprint,
    /// A node's DNS server: query latency by name kind, against a bare UDP round trip.
    Dns {
        /// Queries per name.
        #[arg(long, default_value_t = 20_000)]
        queries: u64,
    },
    /// HTTP and gRPC: direct, quicmesh, quicmesh's L4 path, an HAProxy pair (needs root).
    L7 {
        /// Open-loop request rates (requests per second).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        rates: Vec<u64>,
        /// Seconds per rate (and at saturation).
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Requests in flight at saturation.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Systems to run (direct, quicmesh, quicmesh-l4, haproxy); default all.
        #[arg(long, value_delimiter = ',')]
        systems: Vec<String>,
        /// Protocols to run (http1, grpc); default both.
        #[arg(long, value_delimiter = ',')]
        protos: Vec<String>,
    },
    /// L4 path vs direct TCP vs stunnel (needs root: network namespaces).
    L4 {
        /// Open-loop request rates (requests per second, all connections together).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        rates: Vec<u64>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Connections the requests are spread over.
        #[arg(long, default_value_t = 4)]
        conns: usize,
        /// MiB pushed in the bulk test.
        #[arg(long, default_value_t = 256)]
        bulk_mib: usize,
        /// Rounds (the order of systems rotates each round).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

/// Times `f` `ops` times in batches of 64 (so timer overhead stays small) and records
/// nanoseconds per operation.
fn measure(ops: u64, mut f: impl FnMut()) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let batch = 64;
    for _ in 0..ops / batch {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        h.record(((t.elapsed().as_nanos() as u64) / batch).max(1))?;
    }
    Ok(h)
}

fn row(name: &str, h: &Histogram<u64>) -> serde_json::Value {
    println!(
        "{name:<42} {:>8} {:>8} {:>8} {:>8}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
    json!({
        "case": name,
        "unit": "ns/op",
        "p50": h.value_at_quantile(0.5),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "samples": h.len(),
    })
}

fn policy_of(n: usize) -> anyhow::Result<Policy> {
    let mut text = String::from("default = \"deny\"\n");
    for i in 0..n {
        text.push_str(&format!(
            "[[rule]]\nfrom = \"svc-{i}\"\nto = \"db\"\naction = \"allow\"\n"
        ));
    }
    text.push_str("[[rule]]\nfrom = \"web\"\nto = \"db\"\naction = \"allow\"\n");
    Ok(Policy::parse(&text)?)
}

fn micro(ops: u64) -> anyhow::Result<Vec<serde_json::Value>> {
    println!(
        "{:<42} {:>8} {:>8} {:>8} {:>8}   (ns per op)",
        "case", "p50", "p99", "p99.9", "max"
    );
    let mut rows = Vec::new();
    let header = StreamHeader {
        src_service: ServiceName::new("web")?,
        dst_service: ServiceName::new("db")?,
        flow_id: 42,
    };
    let h = measure(ops, || {
        let b = encode(&header);
        let d: StreamHeader = decode(&b).unwrap_or_else(|_| header.clone());
        std::hint::black_box(d);
    })?;
    rows.push(row("stream header encode+decode", &h));
    let (web, db) = (ServiceName::new("web")?, ServiceName::new("db")?);
    let none = Labels::default();
    for n in [1usize, 100, 1000] {
        let p = policy_of(n)?;
        let h = measure(ops, || {
            std::hint::black_box(p.evaluate(
                Source {
                    service: &web,
                    labels: &none,
                },
                Destination {
                    service: &db,
                    labels: &none,
                },
            ));
        })?;
        rows.push(row(&format!("policy evaluate ({} rules)", n + 1), &h));
    }
    // The tunnel's packet cipher (AES-GCM, one full QUIC datagram) in aws-lc-rs and in
    // ring: the provider takes its cipher suites from the faster one here (node::tls).
    let mut pkt = vec![0x5au8; 1350];
    let aad = [0u8; 20];
    for bits in [128usize, 256] {
        let key_bytes = vec![7u8; bits / 8];
        let alg = if bits == 128 {
            &aws_lc_rs::aead::AES_128_GCM
        } else {
            &aws_lc_rs::aead::AES_256_GCM
        };
        let key =
            aws_lc_rs::aead::LessSafeKey::new(aws_lc_rs::aead::UnboundKey::new(alg, &key_bytes)?);
        let h = measure(ops, || {
            let tag = key.seal_in_place_separate_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key([1u8; 12]),
                aws_lc_rs::aead::Aad::from(&aad),
                &mut pkt,
            );
            std::hint::black_box(tag.ok());
        })?;
        rows.push(row(&format!("AES-{bits}-GCM seal 1350 B (aws-lc-rs)"), &h));
        let alg = if bits == 128 {
            &ring::aead::AES_128_GCM
        } else {
            &ring::aead::AES_256_GCM
        };
        let key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(alg, &key_bytes)
                .map_err(|_| anyhow::anyhow!("ring key"))?,
        );
        let h = measure(ops, || {
            let tag = key.seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key([1u8; 12]),
                ring::aead::Aad::from(&aad),
                &mut pkt,
            );
            std::hint::black_box(tag.ok());
        })?;
        rows.push(row(&format!("AES-{bits}-GCM seal 1350 B (ring)"), &h));
    }
    // A whole key exchange, both sides (client share, server's answer, client's secret):
    // what each tunnel handshake computes.
    use rustls::crypto::aws_lc_rs::kx_group::{X25519, X25519MLKEM768};
    for (name, g) in [("X25519MLKEM768", X25519MLKEM768), ("X25519", X25519)] {
        let h = measure((ops / 100).max(64), || {
            let done = g.start().and_then(|client| {
                let server = g.start_and_complete(client.pub_key())?;
                client.complete(&server.pub_key)
            });
            std::hint::black_box(done.is_ok());
        })?;
        rows.push(row(&format!("key exchange {name} (both sides)"), &h));
    }
    Ok(rows)
}

fn write(dir: &std::path::Path, name: &str, v: &serde_json::Value) -> anyhow::Result<()> {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(v)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn plot_or_warn(r: anyhow::Result<()>) {
    if let Err(e) = r {
        eprintln!("plot: {e:#}");
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.results)?;
    match cli.scenario {
        Scenario::Micro { ops } => {
            let rows = micro(ops)?;
            let path = cli.results.join("micro.json");
            std::fs::write(
                &path,
                serde_json::to_string_pretty(
                    &json!({ "scenario": "micro", "ops": ops, "results": rows }),
                )?,
            )?;
            println!("wrote {}", path.display());
        }
        Scenario::Control {
            nodes,
            deadline_secs,
            replicas,
            store,
        } => {
            let v = control::run(
                &nodes,
                std::time::Duration::from_secs(deadline_secs),
                replicas,
                store,
            )?;
            // One SQLite coordinator keeps the name `quicmesh-bench all` reads.
            let name = match store {
                control::StoreKind::Sqlite => "control".to_string(),
                control::StoreKind::Postgres => format!("control-postgres-{replicas}"),
            };
            write(&cli.results, &name, &v)?;
            let rows: Vec<&serde_json::Value> = v["rows"]
                .as_array()
                .map(|a| a.iter().filter(|r| r["ack_p50_ms"].is_number()).collect())
                .unwrap_or_default();
            let groups: Vec<String> = rows
                .iter()
                .map(|r| format!("{} nodes", r["nodes"]))
                .collect();
            let series: Vec<(String, Vec<Option<f64>>)> = [
                ("ack p50", "ack_p50_ms"),
                ("ack p99", "ack_p99_ms"),
                ("ack max", "ack_max_ms"),
            ]
            .iter()
            .map(|(l, k)| (l.to_string(), rows.iter().map(|r| r[*k].as_f64()).collect()))
            .collect();
            plot_or_warn(plot::bars(
                &cli.results.join(format!("{name}.svg")),
                "policy apply until every node has it",
                "ms",
                &groups,
                &series,
            ));
        }
        Scenario::Install => {
            install::run()?;
        }
        Scenario::All {
            readme,
            l3_secs,
            rounds,
        } => {
            all::run(&cli.results, readme.as_deref(), l3_secs, rounds)?;
        }
        Scenario::Footprint => {
            let v = footprint::run()?;
            write(&cli.results, "footprint", &v)?;
        }
        Scenario::Dns { queries } => {
            let v = dns::run(queries)?;
            write(&cli.results, "dns", &v)?;
        }
        Scenario::L3 {
            secs,
            rounds,
            systems,
        } => {
            let v = l3::run(&l3::L3Opts {
                secs,
                rounds,
                systems: systems.clone(),
            })?;
            write(&cli.results, "l3", &v)?;
            let tunnels: Vec<String> = systems.iter().filter(|s| *s != "veth").cloned().collect();
            plot_or_warn(plot::table(
                &cli.results.join("l3-throughput.svg"),
                "TCP through each tunnel (iperf3; raw veth left out of scale)",
                "Mbit/s",
                &v["table"],
                &[
                    ("tcp 1 stream Mbit/s", "1 stream"),
                    ("tcp 4 streams Mbit/s", "4 streams"),
                    ("tcp reverse Mbit/s", "reverse"),
                ],
                &tunnels,
            ));
            plot_or_warn(plot::table(
                &cli.results.join("l3-latency.svg"),
                "round trips through each tunnel",
                "us",
                &v["table"],
                &[
                    ("ping p50 us", "ping p50"),
                    ("ping p99 us", "ping p99"),
                    ("echo 1k/s p50 us", "1-byte echo p50"),
                    ("echo 1k/s p99 us", "1-byte echo p99"),
                ],
                &systems,
            ));
            plot_or_warn(plot::table(
                &cli.results.join("l3-cpu.svg"),
                "tunnel daemons' CPU per GB moved (lower is better)",
                "CPU s/GB",
                &v["table"],
                &[("daemon CPU s/GB", "CPU s/GB")],
                &tunnels,
            ));
        }
        Scenario::L7 {
            rates,
            secs,
            concurrency,
            systems,
            protos,
        } => {
            let v = l7::run(&l7::L7Opts {
                rates,
                secs,
                concurrency,
                systems,
                protos,
            })?;
            write(&cli.results, "l7", &v)?;
        }
        Scenario::L4 {
            rates,
            secs,
            conns,
            bulk_mib,
            rounds,
        } => {
            let v = l4::run(&l4::L4Opts {
                rates: rates.clone(),
                secs,
                conns,
                bulk_mib,
                rounds,
            })?;
            write(&cli.results, "l4", &v)?;
            let metrics: Vec<(String, String)> = rates
                .iter()
                .flat_map(|r| {
                    ["p50", "p99", "p999"]
                        .map(|q| (format!("rr {r}/s {q} us"), format!("{r}/s {q}")))
                })
                .collect();
            let m: Vec<(&str, &str)> = metrics
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            plot_or_warn(plot::table(
                &cli.results.join("l4-latency.svg"),
                "1-byte request/response, open loop",
                "us",
                &v["table"],
                &m,
                &[
                    "direct".to_string(),
                    "quicmesh".to_string(),
                    "stunnel".to_string(),
                ],
            ));
        }
    }
    Ok(())
}
