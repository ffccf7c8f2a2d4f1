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
//! Still to come: l3 (overlay vs WireGuard, Nebula, quincy), footprint.

mod control;
mod l3;
mod l4;
mod load;
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
    },
    /// IP tunnels: raw veth, quicmesh overlay, wireguard-go, boringtun, Nebula, quincy
    /// (needs root: network namespaces and TUN devices).
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
        "{name:<34} {:>8} {:>8} {:>8} {:>8}",
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
        "{:<34} {:>8} {:>8} {:>8} {:>8}   (ns per op)",
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
    Ok(rows)
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
        Scenario::Control { nodes } => {
            let v = control::run(&nodes)?;
            let path = cli.results.join("control.json");
            std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
            println!("wrote {}", path.display());
        }
        Scenario::L3 {
            secs,
            rounds,
            systems,
        } => {
            let v = l3::run(&l3::L3Opts {
                secs,
                rounds,
                systems,
            })?;
            let path = cli.results.join("l3.json");
            std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
            println!("wrote {}", path.display());
        }
        Scenario::L4 {
            rates,
            secs,
            conns,
            bulk_mib,
            rounds,
        } => {
            let v = l4::run(&l4::L4Opts {
                rates,
                secs,
                conns,
                bulk_mib,
                rounds,
            })?;
            let path = cli.results.join("l4.json");
            std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
