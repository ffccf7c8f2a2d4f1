//! The `dns` scenario: query latency of a node's DNS server on loopback, against the floor
//! of a bare UDP round trip on the same machine. Three `api` instances (two in the
//! client's datacenter), a client with an upstream for `api` and the DNS server on.
//! Sequential queries (one in flight), each name measured separately. No root needed.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use quicmesh_netns_tests::net::{dns_query, echo_server};
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};
use serde_json::{json, Value};

use crate::load::hist;

/// Runs the scenario with `queries` per name and returns its JSON.
pub fn run(queries: u64) -> anyhow::Result<Value> {
    let mesh = Mesh::new("bench-dns");
    let coord = CoordinatorProc::start(&mesh, "24h")?;
    coord.apply_policy(
        &mesh,
        "[[rule]]\nfrom = \"client\"\nto = \"api\"\naction = \"allow\"\n",
    )?;
    let echo = echo_server()?;
    let mut apis = Vec::new();
    for (i, dc) in ["dc1", "dc1", "dc2"].iter().enumerate() {
        let spec = NodeSpec::new(&format!("api-{i}"))
            .label("datacenter", dc)
            .service("api", echo);
        apis.push(NodeProc::start(&mesh, &coord, &spec)?);
    }
    let client = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("client")
            .label("datacenter", "dc1")
            .service("client", echo)
            .upstream("api")
            .dns(),
    )?;
    coord.wait_all_acked(4, Duration::from_secs(30));
    let td = client.status()?["trust_domain"]
        .as_str()
        .unwrap_or("quicmesh.local")
        .to_string();
    let server = SocketAddr::from(([127, 0, 0, 1], client.dns_port));
    let names = [
        (
            "service (L4 upstream)",
            format!("api.svc.{td}"),
            RecordType::A,
        ),
        ("node", format!("api-0.node.{td}"), RecordType::A),
        ("service SRV", format!("api.svc.{td}"), RecordType::SRV),
        (
            "outside the mesh (refused)",
            "example.org".to_string(),
            RecordType::A,
        ),
    ];
    let mut rows = Vec::new();
    println!(
        "dns: {queries} sequential queries per name on loopback; latency in us\n{:<30} {:>8} {:>8} {:>8} {:>8}",
        "query", "p50", "p99", "p99.9", "max"
    );
    let floor = udp_floor(queries)?;
    print_row("bare UDP round trip (floor)", &floor);
    rows.push(row("bare UDP round trip (floor)", &floor));
    for (what, name, t) in &names {
        let mut h = hist();
        let deadline = Instant::now() + Duration::from_secs(60);
        for _ in 0..queries {
            let (rc, _, took) = dns_query(server, name, *t)?;
            anyhow::ensure!(
                rc == ResponseCode::NoError
                    || (rc == ResponseCode::Refused && !name.ends_with(&td)),
                "{name}: {rc}"
            );
            h.record(took.as_micros().max(1) as u64)?;
            if Instant::now() > deadline {
                break;
            }
        }
        print_row(what, &h);
        rows.push(row(what, &h));
    }
    let p50 = rows[1]["p50_us"].as_u64().unwrap_or(0);
    let fl = rows[0]["p50_us"].as_u64().unwrap_or(1).max(1);
    println!(
        "service query p50 over the bare UDP floor: {:.1}x",
        p50 as f64 / fl as f64
    );
    drop(client);
    drop(apis);
    Ok(json!({ "scenario": "dns", "queries": queries, "results": rows }))
}

fn row(what: &str, h: &hdrhistogram::Histogram<u64>) -> Value {
    json!({
        "query": what,
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

fn print_row(what: &str, h: &hdrhistogram::Histogram<u64>) {
    println!(
        "{what:<30} {:>8} {:>8} {:>8} {:>8}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}

/// A UDP echo on loopback in a thread, and the same number of sequential round trips.
fn udp_floor(n: u64) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let server = UdpSocket::bind("127.0.0.1:0")?;
    let addr = server.local_addr()?;
    server.set_read_timeout(Some(Duration::from_secs(2)))?;
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((len, from)) = server.recv_from(&mut buf) {
            if &buf[..len] == b"stop" {
                return;
            }
            let _ = server.send_to(&buf[..len], from);
        }
    });
    let c = UdpSocket::bind("127.0.0.1:0")?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut h = hist();
    let mut buf = [0u8; 512];
    let q = [0u8; 40];
    for _ in 0..n {
        let start = Instant::now();
        c.send_to(&q, addr)?;
        c.recv(&mut buf)?;
        h.record(start.elapsed().as_micros().max(1) as u64)?;
    }
    c.send_to(b"stop", addr)?;
    let _ = t.join();
    Ok(h)
}
