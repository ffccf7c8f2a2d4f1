//! The `l7` scenario: an HTTP service (HTTP/1.1 keep-alive) and a gRPC service (unary)
//! reached from another host four ways, side by side in one run:
//! - `direct`: the client to the service;
//! - `quicmesh`: an `http` upstream on the client's node, a stream per request through the
//!   tunnel, the destination node judging each request and forwarding it over pooled
//!   connections;
//! - `quicmesh-l4`: the same services through a plain L4 upstream (one tunnel stream per
//!   client connection; the destination still judges each request): what a stream per
//!   request costs or saves;
//! - `haproxy`: an HAProxy pair in HTTP mode with mTLS between them (`proto h2` end to end
//!   for gRPC), the classic sidecar shape, one thread each like the nodes.
//!
//! Open-loop rates (latency from each request's scheduled time, so a stall is charged to
//! every request it delays) and saturation (closed loop, fixed concurrency), with the
//! proxies' CPU seconds per 100k requests and resident memory. Two hosts (network
//! namespaces) on one LAN, 198.18.0.1 (client side) and 198.18.0.2 (service side); every
//! load is bounded in count and time.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use quicmesh_netns_tests::grpc;
use quicmesh_netns_tests::http::HttpService;
use quicmesh_netns_tests::topo::{in_ns, Net};
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};
use serde_json::{json, Value};

use crate::load::hist;
use crate::stat;

const HTTP_PORT: u16 = 7100;
const GRPC_PORT: u16 = 7200;
const HAPROXY_HTTP_TLS: u16 = 9443;
const HAPROXY_GRPC_TLS: u16 = 9444;
const HAPROXY_HTTP_LOCAL: u16 = 18100;
const HAPROXY_GRPC_LOCAL: u16 = 18200;
/// Requests in flight at most (open loop): beyond it a request counts as dropped.
const MAX_IN_FLIGHT: usize = 512;

/// Scenario knobs.
#[derive(Debug, Clone)]
pub struct L7Opts {
    pub rates: Vec<u64>,
    pub secs: u64,
    /// Concurrent requests at saturation.
    pub concurrency: usize,
    /// Systems to run (`direct`, `quicmesh`, `quicmesh-l4`, `haproxy`); empty: all.
    pub systems: Vec<String>,
    /// Protocols to run (`http1`, `grpc`); empty: both.
    pub protos: Vec<String>,
}

/// What the client talks: HTTP/1.1 keep-alive, or gRPC unary over HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Proto {
    Http1,
    Grpc,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Http1 => "http1",
            Proto::Grpc => "grpc",
        }
    }
}

/// One system under test: where the client sends each protocol, and the processes that
/// carry it (for CPU and memory).
struct System {
    name: &'static str,
    http: SocketAddr,
    grpc: SocketAddr,
    pids: Vec<u32>,
}

/// Results of one load: latency histogram (µs), answered, failed, dropped (open loop).
struct Outcome {
    h: Histogram<u64>,
    ok: u64,
    failed: u64,
    dropped: u64,
    secs: f64,
}

/// A client for one protocol at one address, on the current runtime.
#[derive(Clone)]
enum Client {
    Http(
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            http_body_util::Full<bytes::Bytes>,
        >,
        hyper::Uri,
    ),
    Grpc(grpc::AsyncClient),
}

impl Client {
    fn new(proto: Proto, addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(match proto {
            Proto::Http1 => {
                let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
                connector.set_nodelay(true);
                let c = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .pool_max_idle_per_host(MAX_IN_FLIGHT)
                .build(connector);
                Client::Http(c, format!("http://{addr}/bench").parse()?)
            }
            Proto::Grpc => Client::Grpc(grpc::AsyncClient::new(addr)?),
        })
    }

    /// One request; whether it was answered well.
    async fn call(&self) -> bool {
        match self {
            Client::Http(c, uri) => {
                let req = hyper::Request::get(uri.clone())
                    .body(http_body_util::Full::new(bytes::Bytes::new()));
                let Ok(req) = req else { return false };
                match c.request(req).await {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        ok && http_body_util::BodyExt::collect(r.into_body())
                            .await
                            .is_ok()
                    }
                    Err(_) => false,
                }
            }
            Client::Grpc(g) => g.say("bench").await.is_ok(),
        }
    }
}

/// Open loop at `rate` for `secs`.
async fn open_loop(client: Client, rate: u64, secs: u64) -> Outcome {
    let h = Arc::new(Mutex::new(hist()));
    let n = rate * secs;
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut dropped = 0u64;
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u64;
    while i < n {
        let now = Instant::now();
        // Everything due by now leaves now; then sleep until the next one.
        while i < n && start + every.mul_f64(i as f64) <= now {
            i += 1;
            let Ok(permit) = sem.clone().try_acquire_owned() else {
                dropped += 1;
                continue;
            };
            let (client, h, ok, failed) = (client.clone(), h.clone(), ok.clone(), failed.clone());
            tasks.spawn(async move {
                let _permit = permit;
                // From when the request leaves, not from when it was due: the client's
                // timer wakes up to a millisecond late (tokio's resolution), which would
                // add the same jitter to every system and hide their differences. Requests
                // are never held back by earlier ones (each has its own task), so no delay
                // of the system under test is omitted; those over the in-flight bound
                // are counted as dropped.
                let sent = Instant::now();
                let good = tokio::time::timeout(Duration::from_secs(10), client.call())
                    .await
                    .unwrap_or(false);
                let us = sent.elapsed().as_micros().max(1) as u64;
                if good {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut h) = h.lock() {
                        let _ = h.record(us.min(60_000_000));
                    }
                } else {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        while tasks.try_join_next().is_some() {}
        if i < n {
            let next = start + every.mul_f64(i as f64);
            tokio::time::sleep_until(next.into()).await;
        }
    }
    while tasks.join_next().await.is_some() {}
    let h = h.lock().map(|h| h.clone()).unwrap_or_else(|_| hist());
    Outcome {
        h,
        ok: ok.load(std::sync::atomic::Ordering::Relaxed),
        failed: failed.load(std::sync::atomic::Ordering::Relaxed),
        dropped,
        secs: start.elapsed().as_secs_f64(),
    }
}

/// Closed loop: `conc` requests in flight for `secs`.
async fn saturate(client: Client, conc: usize, secs: u64) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conc {
        let client = client.clone();
        tasks.spawn(async move {
            let mut h = hist();
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let good = tokio::time::timeout(Duration::from_secs(10), client.call())
                    .await
                    .unwrap_or(false);
                if good {
                    ok += 1;
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                } else {
                    failed += 1;
                    if failed > 1000 {
                        break;
                    }
                }
            }
            (h, ok, failed)
        });
    }
    let mut out = Outcome {
        h: hist(),
        ok: 0,
        failed: 0,
        dropped: 0,
        secs: 0.0,
    };
    while let Some(Ok((h, ok, failed))) = tasks.join_next().await {
        let _ = out.h.add(&h);
        out.ok += ok;
        out.failed += failed;
    }
    out.secs = start.elapsed().as_secs_f64();
    out
}

/// Runs `f` on a one-thread runtime inside the client host (the load generator takes one
/// core at most, like each proxy).
fn in_client<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> anyhow::Result<T> {
    in_ns(ns, move || -> anyhow::Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(f()))
    })?
}

struct HaProxy {
    children: Vec<Child>,
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An HAProxy pair: the client side takes plain HTTP/1.1 and h2 (gRPC) on loopback and
/// speaks TLS with a client certificate to the service side, which verifies it and
/// forwards to the services.
fn start_haproxy(net: &Net, dir: &Path) -> anyhow::Result<HaProxy> {
    if Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        bail!("haproxy is not installed (quicmesh-bench install)");
    }
    crate::l4::stunnel_pki(dir)?;
    let d = dir.display();
    let common = "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n";
    let server = format!(
        "{common}frontend http_tls\n  bind 198.18.0.2:{HAPROXY_HTTP_TLS} ssl crt {d}/server.pem ca-file {d}/ca.pem verify required alpn http/1.1\n  default_backend http_svc\nbackend http_svc\n  http-reuse always\n  server s 127.0.0.1:{HTTP_PORT}\nfrontend grpc_tls\n  bind 198.18.0.2:{HAPROXY_GRPC_TLS} ssl crt {d}/server.pem ca-file {d}/ca.pem verify required alpn h2\n  default_backend grpc_svc\nbackend grpc_svc\n  server s 127.0.0.1:{GRPC_PORT} proto h2\n"
    );
    let client = format!(
        "{common}frontend http_in\n  bind 127.0.0.1:{HAPROXY_HTTP_LOCAL}\n  default_backend http_out\nbackend http_out\n  http-reuse always\n  server s 198.18.0.2:{HAPROXY_HTTP_TLS} ssl crt {d}/client.pem ca-file {d}/ca.pem verify required alpn http/1.1\nfrontend grpc_in\n  bind 127.0.0.1:{HAPROXY_GRPC_LOCAL} proto h2\n  default_backend grpc_out\nbackend grpc_out\n  server s 198.18.0.2:{HAPROXY_GRPC_TLS} ssl crt {d}/client.pem ca-file {d}/ca.pem verify required alpn h2\n"
    );
    std::fs::write(dir.join("haproxy-server.cfg"), server)?;
    std::fs::write(dir.join("haproxy-client.cfg"), client)?;
    let mut children = Vec::new();
    for (host, conf) in [
        ("svc", "haproxy-server.cfg"),
        ("client", "haproxy-client.cfg"),
    ] {
        let log = std::fs::File::create(dir.join(format!("{conf}.log")))?;
        children.push(
            Command::new("ip")
                .args(["netns", "exec", &net.ns(host), "haproxy", "-db", "-f"])
                .arg(dir.join(conf))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
    }
    std::thread::sleep(Duration::from_millis(800));
    for c in &mut children {
        if let Some(st) = c.try_wait()? {
            bail!(
                "haproxy exited: {st} (see {}/haproxy-*.cfg.log)",
                dir.display()
            );
        }
    }
    Ok(HaProxy { children })
}

/// CPU ticks of `pids`, summed.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter().map(|p| stat::proc_usage_full(*p).2).sum()
}

/// Starts a new peak-memory window for `pids`: each one's peak resident size (VmHWM)
/// goes back to its resident size now, so a row's peak is its own, not an earlier
/// system's on the same nodes.
fn reset_peaks(pids: &[u32]) {
    for p in pids {
        let _ = std::fs::write(format!("/proc/{p}/clear_refs"), "5");
    }
}

/// Peak resident kB of each of `pids` since its window started.
fn peaks(pids: &[u32]) -> Vec<u64> {
    pids.iter().map(|p| stat::proc_usage_full(*p).1).collect()
}

/// Runs the scenario and returns its JSON.
pub fn run(opts: &L7Opts) -> anyhow::Result<Value> {
    let mesh = Mesh::new("bench-l7");
    let mut net = Net::new("l7", mesh.path())?;
    let lan = net.lan("l7", "198.18.0")?;
    let ns_client = net.host("client", &lan, 1, None)?;
    let ns_svc = net.host("svc", &lan, 2, None)?;
    in_ns(&ns_svc, || -> std::io::Result<()> {
        HttpService::start_on(&format!("0.0.0.0:{HTTP_PORT}"), "svc")?;
        grpc::serve_on(&format!("0.0.0.0:{GRPC_PORT}"), "svc")?;
        Ok(())
    })??;
    let coord = CoordinatorProc::start_in(&mesh, "24h", &ns_client, [198, 18, 0, 1].into())?;
    let policy = "[[rule]]\nfrom = \"web\"\nto = \"api\"\naction = \"allow\"\n[[rule]]\nfrom = \"web\"\nto = \"echo\"\naction = \"allow\"\n[[rule]]\nfrom = \"web\"\nto = \"api\"\naction = \"deny\"\npaths = [\"/admin/*\"]\n";
    let out = coord.apply_policy(&mesh, policy)?;
    if !out.status.success() {
        bail!("policy apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    let http_local: SocketAddr = ([127, 0, 0, 1], HTTP_PORT).into();
    let grpc_local: SocketAddr = ([127, 0, 0, 1], GRPC_PORT).into();
    let http = ["protocol = \"http\""];
    let threads = format!(
        "worker_threads = {}",
        std::env::var("QUICMESH_BENCH_THREADS").unwrap_or_else(|_| "0".into())
    );
    let svc = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("svc-1")
            .on(&ns_svc)
            .config_line(&threads)
            .service_with("api", http_local, &http)
            .service_with("echo", grpc_local, &http),
    )?;
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .on(&ns_client)
            .config_line(&threads)
            .service("web", http_local)
            .upstream_with("api", &http)
            .upstream_with("echo", &http)
            .upstream("api")
            .upstream("echo"),
    )?;
    coord.wait_all_acked(2, Duration::from_secs(15));
    let node_pids: Vec<u32> = [web.pid(), svc.pid()].into_iter().flatten().collect();
    let haproxy = start_haproxy(&net, mesh.path());
    let mut systems: Vec<System> = vec![
        System {
            name: "direct",
            http: ([198, 18, 0, 2], HTTP_PORT).into(),
            grpc: ([198, 18, 0, 2], GRPC_PORT).into(),
            pids: vec![],
        },
        System {
            name: "quicmesh",
            http: web.upstream_at(0),
            grpc: web.upstream_at(1),
            pids: node_pids.clone(),
        },
        System {
            name: "quicmesh-l4",
            http: web.upstream_at(2),
            grpc: web.upstream_at(3),
            pids: node_pids.clone(),
        },
    ];
    let haproxy_note = match &haproxy {
        Ok(h) => {
            systems.push(System {
                name: "haproxy",
                http: ([127, 0, 0, 1], HAPROXY_HTTP_LOCAL).into(),
                grpc: ([127, 0, 0, 1], HAPROXY_GRPC_LOCAL).into(),
                pids: h.children.iter().map(|c| c.id()).collect(),
            });
            None
        }
        Err(e) => Some(e.to_string()),
    };
    println!(
        "l7: open-loop {:?} req/s for {} s each, saturation at {} in flight for {} s",
        opts.rates, opts.secs, opts.concurrency, opts.secs
    );
    let mut runs = Vec::new();
    // (proto, test) -> system -> (p50, p99, req/s, cpu s per 100k)
    // Per system, each proxy's peak resident kB over its rows (web-1 / svc-1 for the
    // quicmesh systems, client / server side for HAProxy).
    let mut peak: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut table: std::collections::BTreeMap<(String, String), Vec<(String, Value)>> =
        Default::default();
    systems.retain(|s| opts.systems.is_empty() || opts.systems.iter().any(|x| x == s.name));
    let protos: Vec<Proto> = [Proto::Http1, Proto::Grpc]
        .into_iter()
        .filter(|p| opts.protos.is_empty() || opts.protos.iter().any(|x| x == p.name()))
        .collect();
    for proto in protos {
        for s in &systems {
            let addr = match proto {
                Proto::Http1 => s.http,
                Proto::Grpc => s.grpc,
            };
            // Warm: connections, tunnels and pools up before anything is measured.
            let ns = ns_client.clone();
            in_client(&ns, move || {
                Box::pin(async move {
                    if let Ok(c) = Client::new(proto, addr) {
                        for _ in 0..200 {
                            c.call().await;
                        }
                    }
                })
            })?;
            let mut tests: Vec<(String, Option<u64>)> = opts
                .rates
                .iter()
                .map(|r| (format!("{r}/s"), Some(*r)))
                .collect();
            tests.push(("saturation".into(), None));
            for (test, rate) in tests {
                let (secs, conc) = (opts.secs, opts.concurrency);
                let cpu0 = cpu_ticks(&s.pids);
                reset_peaks(&s.pids);
                let before = stat::cpu_jiffies();
                let o = in_client(&ns_client, move || {
                    Box::pin(async move {
                        let Ok(c) = Client::new(proto, addr) else {
                            return None;
                        };
                        Some(match rate {
                            Some(r) => open_loop(c, r, secs).await,
                            None => saturate(c, conc, secs).await,
                        })
                    })
                })?;
                let Some(o) = o else {
                    bail!("{}: no client for {addr}", s.name);
                };
                let steal = stat::steal_pct(before, stat::cpu_jiffies());
                let cpu1 = cpu_ticks(&s.pids);
                let rss_kb = peaks(&s.pids);
                let rss_mb: Vec<String> = rss_kb
                    .iter()
                    .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                    .collect();
                let top = peak
                    .entry(s.name.to_string())
                    .or_insert_with(|| vec![0; rss_kb.len()]);
                for (t, k) in top.iter_mut().zip(&rss_kb) {
                    *t = (*t).max(*k);
                }
                let cpu_s = (cpu1.saturating_sub(cpu0)) as f64 / stat::TICKS_PER_SEC;
                let per_100k = if o.ok > 0 && !s.pids.is_empty() {
                    cpu_s * 100_000.0 / o.ok as f64
                } else {
                    f64::NAN
                };
                let rps = o.ok as f64 / o.secs.max(1e-9);
                let (p50, p99) = (o.h.value_at_quantile(0.5), o.h.value_at_quantile(0.99));
                println!(
                    "  {:<6} {:<11} {:<10} p50 {:>7} us  p99 {:>7} us  {:>8.0} req/s  ok {} failed {} dropped {}  cpu {:.2} s/100k  peak rss per proxy {} MB  steal {:.1}%",
                    proto.name(), s.name, test, p50, p99, rps, o.ok, o.failed, o.dropped, per_100k, rss_mb.join(" / "), steal
                );
                let v = json!({"proto": proto.name(), "system": s.name, "test": test, "p50_us": p50, "p99_us": p99, "p999_us": o.h.value_at_quantile(0.999), "req_per_s": rps, "ok": o.ok, "failed": o.failed, "dropped": o.dropped, "cpu_s_per_100k": per_100k, "peak_rss_kb": rss_kb, "steal_pct": steal});
                table
                    .entry((proto.name().to_string(), test.clone()))
                    .or_default()
                    .push((s.name.to_string(), v.clone()));
                runs.push(v);
            }
        }
    }
    // Side by side: added latency over direct, saturation, CPU, memory.
    println!("added latency over direct (p50 / p99, µs), saturation req/s, proxy CPU s per 100k requests:");
    let mut summary = Vec::new();
    for ((proto, test), rows) in &table {
        let direct = rows
            .iter()
            .find(|(s, _)| s == "direct")
            .map(|(_, v)| v.clone());
        let mut line = format!("  {proto:<6} {test:<11}");
        let mut row = json!({"proto": proto, "test": test});
        for (s, v) in rows {
            if s == "direct" {
                continue;
            }
            if test == "saturation" {
                line.push_str(&format!(
                    "  {s} {:.0} req/s ({:.2} cpu s/100k)",
                    v["req_per_s"].as_f64().unwrap_or(0.0),
                    v["cpu_s_per_100k"].as_f64().unwrap_or(f64::NAN)
                ));
                row[s.as_str()] =
                    json!({"req_per_s": v["req_per_s"], "cpu_s_per_100k": v["cpu_s_per_100k"]});
            } else if let Some(d) = &direct {
                let add = |q: &str| v[q].as_i64().unwrap_or(0) - d[q].as_i64().unwrap_or(0);
                line.push_str(&format!("  {s} +{}/+{}", add("p50_us"), add("p99_us")));
                row[s.as_str()] = json!({"added_p50_us": add("p50_us"), "added_p99_us": add("p99_us"), "cpu_s_per_100k": v["cpu_s_per_100k"]});
            }
        }
        println!("{line}");
        summary.push(row);
    }
    // Memory of each proxy under load (the target is per node), each system's own rows.
    let mb = |k: &u64| format!("{:.1} MB", *k as f64 / 1024.0);
    for (name, kb) in &peak {
        if !kb.is_empty() {
            let each: Vec<String> = kb.iter().map(mb).collect();
            println!(
                "peak RSS per proxy under load, {name}: {}",
                each.join(" / ")
            );
        }
    }
    if let Some(why) = &haproxy_note {
        println!("haproxy: not run: {why}");
    }
    drop(haproxy);
    drop(web);
    drop(svc);
    drop(coord);
    Ok(json!({
        "scenario": "l7",
        "opts": {"rates": opts.rates, "secs": opts.secs, "concurrency": opts.concurrency},
        "summary": summary,
        "peak_rss_kb_per_proxy": peak,
        "haproxy": haproxy_note.unwrap_or_else(|| "ran".into()),
        "runs": runs,
    }))
}
