//! The `l3` scenario: IP tunnels between two network namespaces joined by one veth pair
//! (198.18.0.1 and 198.18.0.2), each system carrying the same loads in turn: iperf3 TCP
//! (one stream, four streams, reverse), ping, and a 1-byte TCP echo at a fixed rate
//! through the tunnel; the tunnel daemons' CPU seconds per GB moved and peak RSS.
//!
//! Systems: raw veth (the limit), quicmesh's overlay, wireguard-go, boringtun, Nebula and
//! quincy, each configured with its defaults and a sane MTU, each on its own overlay
//! /24 in 100.64.0.0/10. A system that cannot run says exactly why.
//!
//! `quicmesh-relayed` is quicmesh's overlay between the same two hosts when they cannot
//! reach each other and go through a relay node: a third namespace `r` joined to `a`
//! (198.18.1.0/24) and `b` (198.18.2.0/24) that does not forward IP, with one address
//! (198.18.3.1) both reach it at, running the coordinator and a node with `relay = true`.
//! Its CPU figure counts the relay too.
//!
//! The WireGuard gateway's rows put a stock client (`wireguard-go`, configured from the
//! text `quicmesh-coordinator wg add` prints) on a third namespace `c`, joined to `a` by
//! 198.18.4.0/24, reaching the same services on `b`:
//! - `quicmesh-gateway`: client -> quicmesh gateway node on `a` -> overlay -> node on `b`;
//! - `wg-server-boringtun` and `wg-server-wireguard-go`: the same client -> a plain
//!   WireGuard server (boringtun-cli, wireguard-go) on `a`, which forwards to `b`.
//!
//! Their CPU figures count every daemon on the path (the client's too).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use quicmesh_netns_tests::topo::{in_ns, Net};
use quicmesh_netns_tests::Mesh;
use serde_json::{json, Value};

use crate::load::{echo_server, hist, open_loop};
use crate::stat;

/// Every system the scenario knows, in its default order.
pub const SYSTEMS: &[&str] = &[
    "veth",
    "quicmesh",
    "quicmesh-relayed",
    "wireguard-go",
    "boringtun",
    "nebula",
    "quincy",
    "quicmesh-gateway",
    "wg-server-boringtun",
    "wg-server-wireguard-go",
];

/// Systems measured from the client namespace `c` (module doc).
fn from_client_ns(sys: &str) -> bool {
    sys == "quicmesh-gateway" || sys.starts_with("wg-server-")
}
const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
/// Runs with more CPU steal than this are left out of the "low steal" medians.
pub const LOW_STEAL_PCT: f64 = 10.0;

/// Scenario knobs.
#[derive(Debug, Clone)]
pub struct L3Opts {
    pub secs: u64,
    pub rounds: usize,
    pub systems: Vec<String>,
}

/// A running tunnel: its daemons (both ends) and the far end's overlay address.
struct Tunnel {
    target: Ipv4Addr,
    daemons: Vec<Child>,
    /// Left behind by daemons that are killed (control sockets); removed on drop.
    files: Vec<std::path::PathBuf>,
    /// Data-path daemons not owned as `Child` here (quicmesh nodes), and what keeps
    /// them running (dropped with the tunnel).
    other_pids: Vec<u32>,
    keep: Option<Box<dyn std::any::Any>>,
}

impl Tunnel {
    fn pids(&self) -> Vec<u32> {
        self.daemons
            .iter()
            .map(|c| c.id())
            .chain(self.other_pids.iter().copied())
            .collect()
    }

    /// (CPU ticks, peak RSS kB) summed over both ends.
    fn usage(&self) -> (u64, u64) {
        self.pids().iter().fold((0, 0), |(c, m), p| {
            let (_, hwm, cpu) = stat::proc_usage_full(*p);
            (c + cpu, m + hwm)
        })
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for c in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        drop(self.keep.take());
    }
}

fn have(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn need(bin: &str, install: &str) -> anyhow::Result<()> {
    if !have(bin) {
        bail!("{bin} is not installed ({install}; `quicmesh-bench install` does it)");
    }
    Ok(())
}

fn run_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .with_context(|| format!("run {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn_in(ns: &str, args: &[&str], log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log)?;
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("spawn {args:?}"))
}

/// Waits until `target` answers ping from `ns`.
fn wait_reachable(ns: &str, target: Ipv4Addr, within: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < within {
        if run_in(ns, &["ping", "-c", "1", "-W", "1", &target.to_string()]).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{target} not reachable through the tunnel within {within:?}")
}

fn addr_up(ns: &str, dev: &str, cidr: &str, mtu: u32) -> anyhow::Result<()> {
    run_in(ns, &["ip", "addr", "add", cidr, "dev", dev])?;
    run_in(
        ns,
        &["ip", "link", "set", dev, "mtu", &mtu.to_string(), "up"],
    )?;
    Ok(())
}

/// A userspace WireGuard pair (wireguard-go or boringtun) configured with `wg`.
fn wireguard(
    ns: (&str, &str),
    dir: &Path,
    daemon: &[&str],
    names: (&str, &str),
    net: u8,
) -> anyhow::Result<Tunnel> {
    need("wg", "apt-get install wireguard-tools")?;
    let key = |name: &str| -> anyhow::Result<(String, String)> {
        let private = Command::new("wg").arg("genkey").output()?.stdout;
        let path = dir.join(format!("{name}.key"));
        std::fs::write(&path, &private)?;
        let mut p = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        p.stdin.take().context("stdin")?.write_all(&private)?;
        let public = String::from_utf8(p.wait_with_output()?.stdout)?
            .trim()
            .to_string();
        Ok((path.display().to_string(), public))
    };
    let sock = |dev: &str| Path::new("/var/run/wireguard").join(format!("{dev}.sock"));
    let (ka, pa) = key(names.0)?;
    let (kb, pb) = key(names.1)?;
    let mut daemons = Vec::new();
    for (n, dev) in [(ns.0, names.0), (ns.1, names.1)] {
        let _ = std::fs::remove_file(sock(dev));
        let mut args = daemon.to_vec();
        args.push(dev);
        daemons.push(spawn_in(n, &args, &dir.join(format!("{dev}.log")))?);
    }
    let tunnel = Tunnel {
        target: Ipv4Addr::new(100, 64, net, 2),
        daemons,
        files: vec![sock(names.0), sock(names.1)],
        other_pids: vec![],
        keep: None,
    };
    let t = Instant::now();
    while !(sock(names.0).exists() && sock(names.1).exists()) {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{} did not create its control socket", daemon[0]);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (n, dev, key, peer, host, peer_host) in [
        (ns.0, names.0, &ka, &pb, 1, 2),
        (ns.1, names.1, &kb, &pa, 2, 1),
    ] {
        run_in(
            n,
            &[
                "wg",
                "set",
                dev,
                "private-key",
                key,
                "listen-port",
                "51820",
                "peer",
                peer,
                "allowed-ips",
                &format!("100.64.{net}.{peer_host}/32"),
                "endpoint",
                &format!("198.18.0.{peer_host}:51820"),
            ],
        )?;
        addr_up(n, dev, &format!("100.64.{net}.{host}/24"), 1420)?;
    }
    Ok(tunnel)
}

/// A plain WireGuard server (`daemon`) on `ns.0` for a `wireguard-go` client on `c`: the
/// client reaches `b` (198.18.0.2) through it, forwarded in clear from `a`.
fn wg_server(ns: (&str, &str), c: &str, dir: &Path, daemon: &[&str]) -> anyhow::Result<Tunnel> {
    need("wg", "apt-get install wireguard-tools")?;
    need("wireguard-go", "apt-get install wireguard-go")?;
    let genkey = || -> anyhow::Result<(String, String)> {
        let private = String::from_utf8(Command::new("wg").arg("genkey").output()?.stdout)?;
        let public = quicmesh_protocol::wg::WgKey(
            quicmesh_node::wg::public_of(private.trim().parse::<quicmesh_protocol::wg::WgKey>()?.0)
                .0,
        )
        .to_string();
        Ok((private.trim().to_string(), public))
    };
    let (server_key, server_pub) = genkey()?;
    let (client_key, client_pub) = genkey()?;
    let sock = Path::new("/var/run/wireguard").join("wgsrv.sock");
    let _ = std::fs::remove_file(&sock);
    let mut args = daemon.to_vec();
    args.push("wgsrv");
    let server = spawn_in(ns.0, &args, &dir.join("wgsrv.log"))?;
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{} did not create its control socket", daemon[0]);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let key_file = dir.join("wgsrv.key");
    std::fs::write(&key_file, &server_key)?;
    run_in(
        ns.0,
        &[
            "wg",
            "set",
            "wgsrv",
            "private-key",
            &key_file.display().to_string(),
            "listen-port",
            "51820",
            "peer",
            &client_pub,
            "allowed-ips",
            "100.64.5.2/32",
        ],
    )?;
    addr_up(ns.0, "wgsrv", "100.64.5.1/24", 1420)?;
    let config = format!(
        "[Interface]\nPrivateKey = {client_key}\nAddress = 100.64.5.2/24\nMTU = 1280\n\n[Peer]\nPublicKey = {server_pub}\nEndpoint = 198.18.4.1:51820\nAllowedIPs = 198.18.0.2/32\nPersistentKeepalive = 25\n"
    );
    let client = quicmesh_netns_tests::wg::stock_client(c, dir, "wgcli", &config)?;
    Ok(Tunnel {
        target: Ipv4Addr::new(198, 18, 0, 2),
        daemons: vec![server],
        files: vec![sock, Path::new("/var/run/wireguard").join("wgcli.sock")],
        other_pids: vec![client.pid()],
        keep: Some(Box::new(client)),
    })
}

/// The quicmesh WireGuard gateway on `ns.0` for a `wireguard-go` client on `c`, reaching
/// a node on `ns.1` through the overlay.
fn quicmesh_gateway(ns: (&str, &str), c: &str, dir: &Path) -> anyhow::Result<Tunnel> {
    use quicmesh_netns_tests::{CoordinatorProc, NodeProc, NodeSpec};
    need("wg", "apt-get install wireguard-tools")?;
    need("wireguard-go", "apt-get install wireguard-go")?;
    let mesh = Mesh::new("bench-l3-quicmesh-gateway");
    let coord = CoordinatorProc::start_in(&mesh, "24h", ns.0, [198, 18, 0, 1].into())?;
    let policy = "[[rule]]\nfrom = \"laptop\"\nto = \"side-b\"\naction = \"allow\"\n";
    let out = coord.apply_policy(&mesh, policy)?;
    if !out.status.success() {
        bail!("policy apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    let threads = threads_line();
    let gw = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("gw")
            .on(ns.0)
            .overlay("qm0")
            .overlay_service("gateway", &["udp/9"])
            .config_line(&threads)
            .section("[gateway.wireguard]\nlisten = \"0.0.0.0:51820\""),
    )?;
    let b = side_b(&mesh, &coord, ns.1)?;
    let t = Instant::now();
    let config = loop {
        let out = coord.cli(&[
            "wg",
            "add",
            "--name",
            "bench",
            "--service",
            "laptop",
            "--gateway",
            "gw",
        ])?;
        if out.status.success() {
            break String::from_utf8(out.stdout)?;
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!(
                "wg add: {} (logs in {})",
                String::from_utf8_lossy(&out.stderr),
                mesh.path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let target = overlay_v4(&b)?;
    let client = quicmesh_netns_tests::wg::stock_client(c, dir, "wgcli", &config)?;
    let other_pids = [gw.pid(), b.pid(), Some(client.pid())]
        .into_iter()
        .flatten()
        .collect();
    Ok(Tunnel {
        target,
        daemons: vec![],
        files: vec![Path::new("/var/run/wireguard").join("wgcli.sock")],
        other_pids,
        keep: Some(Box::new((client, b, gw, coord, mesh))),
    })
}

fn nebula(ns: (&str, &str), dir: &Path) -> anyhow::Result<Tunnel> {
    need("nebula", "apt-get install nebula")?;
    need("nebula-cert", "apt-get install nebula")?;
    let d = dir.join("nebula");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    let p = |f: &str| d.join(f).display().to_string();
    let ok = |out: std::process::Output| -> anyhow::Result<()> {
        if !out.status.success() {
            bail!("nebula-cert: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    ok(Command::new("nebula-cert")
        .args([
            "ca",
            "-name",
            "bench",
            "-out-crt",
            &p("ca.crt"),
            "-out-key",
            &p("ca.key"),
        ])
        .output()?)?;
    let mut daemons = Vec::new();
    for (n, host, peer) in [(ns.0, 1, 2), (ns.1, 2, 1)] {
        let name = format!("h{host}");
        ok(Command::new("nebula-cert")
            .args([
                "sign",
                "-ca-crt",
                &p("ca.crt"),
                "-ca-key",
                &p("ca.key"),
                "-name",
                &name,
                "-ip",
                &format!("100.64.3.{host}/24"),
                "-out-crt",
                &p(&format!("{name}.crt")),
                "-out-key",
                &p(&format!("{name}.key")),
            ])
            .output()?)?;
        let cfg = format!(
            "pki:\n  ca: {ca}\n  cert: {crt}\n  key: {key}\nstatic_host_map:\n  \"100.64.3.{peer}\": [\"198.18.0.{peer}:4242\"]\nlighthouse:\n  am_lighthouse: false\n  hosts: []\nlisten:\n  host: 0.0.0.0\n  port: 4242\npunchy:\n  punch: false\ntun:\n  disabled: false\n  dev: neb{host}\n  mtu: 1300\nlogging:\n  level: info\nfirewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n  inbound:\n    - port: any\n      proto: any\n      host: any\n",
            ca = p("ca.crt"),
            crt = p(&format!("{name}.crt")),
            key = p(&format!("{name}.key")),
        );
        let path = d.join(format!("{name}.yml"));
        std::fs::write(&path, cfg)?;
        daemons.push(spawn_in(
            n,
            &["nebula", "-config", &path.display().to_string()],
            &d.join(format!("{name}.log")),
        )?);
    }
    Ok(Tunnel {
        target: Ipv4Addr::new(100, 64, 3, 2),
        daemons,
        files: vec![],
        other_pids: vec![],
        keep: None,
    })
}

fn quincy(ns: (&str, &str), dir: &Path) -> anyhow::Result<Tunnel> {
    need(
        "quincy-server",
        "cargo install --locked quincy-server@3.1.1",
    )?;
    need(
        "quincy-client",
        "cargo install --locked quincy-client@3.1.1",
    )?;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let d = dir.join("quincy");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    let ca_key = KeyPair::generate()?;
    let mut cp = CertificateParams::default();
    cp.distinguished_name.push(DnType::CommonName, "bench CA");
    cp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = cp.self_signed(&ca_key)?;
    std::fs::write(d.join("ca.pem"), ca.pem())?;
    let mut fingerprint = String::new();
    for name in ["server", "client"] {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec!["198.18.0.2".to_string()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(d.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(d.join(format!("{name}.key")), key.serialize_pem())?;
        if name == "client" {
            use sha2::Digest;
            fingerprint = format!("sha256:{}", hex::encode(sha2::Sha256::digest(cert.der())));
        }
    }
    let p = |f: &str| d.join(f).display().to_string();
    std::fs::write(
        d.join("users.toml"),
        format!("[users.bench]\nauthorized_keys = []\nauthorized_certs = [\"{fingerprint}\"]\n"),
    )?;
    std::fs::write(
        d.join("server.toml"),
        format!(
            "name = \"bench\"\ninterface_name = \"qserv\"\nbind_address = \"198.18.0.2\"\nbind_port = 55555\ntunnel_network = \"100.64.4.1/24\"\nusers_file = \"{}\"\n[protocol]\nmode = \"tls\"\ncertificate_file = \"{}\"\ncertificate_key_file = \"{}\"\n[log]\nlevel = \"info\"\n",
            p("users.toml"),
            p("server.pem"),
            p("server.key")
        ),
    )?;
    std::fs::write(
        d.join("client.toml"),
        format!(
            "connection_string = \"198.18.0.2:55555\"\n[protocol]\nmode = \"tls\"\ntrusted_certificate_paths = [\"{}\"]\nclient_certificate_file = \"{}\"\nclient_certificate_key_file = \"{}\"\n[network]\ninterface_name = \"qcli\"\n[log]\nlevel = \"info\"\n",
            p("ca.pem"),
            p("client.pem"),
            p("client.key")
        ),
    )?;
    let server = spawn_in(
        ns.1,
        &["quincy-server", "--config-path", &p("server.toml")],
        &d.join("server.log"),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let client = spawn_in(
        ns.0,
        &["quincy-client", "--config-path", &p("client.toml")],
        &d.join("client.log"),
    )?;
    // The server side takes the network's first address; the client gets one assigned.
    Ok(Tunnel {
        target: Ipv4Addr::new(100, 64, 4, 1),
        daemons: vec![client, server],
        files: vec![],
        other_pids: vec![],
        keep: None,
    })
}

/// quicmesh's overlay: a coordinator on host a, a node on each host with overlay mode
/// (default MTU 1400), a service on each taking any TCP/UDP port and ping, and a policy
/// letting each reach the other. With `relay` (the relay host's namespace, see the module
/// doc), the coordinator and a relay node run there and the tunnel must be relayed.
/// A quicmesh node's overlay IPv4 address, once its device is up.
fn overlay_v4(n: &quicmesh_netns_tests::NodeProc) -> anyhow::Result<Ipv4Addr> {
    n.overlay_addrs(Duration::from_secs(20))?
        .into_iter()
        .find_map(|a| match a {
            std::net::IpAddr::V4(v4) => Some(v4),
            _ => None,
        })
        .with_context(|| format!("{} has no overlay IPv4 address", n.name))
}

/// The node on host `b` that the overlay rows reach: service `side-b`, every port.
fn side_b(
    mesh: &Mesh,
    coord: &quicmesh_netns_tests::CoordinatorProc,
    ns: &str,
) -> anyhow::Result<quicmesh_netns_tests::NodeProc> {
    quicmesh_netns_tests::NodeProc::start(
        mesh,
        coord,
        &quicmesh_netns_tests::NodeSpec::new("node-b")
            .on(ns)
            .overlay("qm0")
            .overlay_service("side-b", &["icmp", "tcp/1-65535", "udp/1-65535"])
            .config_line(&threads_line()),
    )
}

/// The nodes' `worker_threads` line (`QUICMESH_BENCH_THREADS`, else automatic).
fn threads_line() -> String {
    format!(
        "worker_threads = {}",
        std::env::var("QUICMESH_BENCH_THREADS").unwrap_or_else(|_| "0".into())
    )
}

fn quicmesh(ns: (&str, &str), relay: Option<&str>) -> anyhow::Result<Tunnel> {
    use quicmesh_netns_tests::{CoordinatorProc, NodeProc, NodeSpec};
    let mut mesh = Mesh::new(if relay.is_some() {
        "bench-l3-quicmesh-relayed"
    } else {
        "bench-l3-quicmesh"
    });
    let coord = match relay {
        Some(r) => CoordinatorProc::start_in(&mesh, "24h", r, [198, 18, 3, 1].into())?,
        None => CoordinatorProc::start_in(&mesh, "24h", ns.0, [198, 18, 0, 1].into())?,
    };
    let policy = "[[rule]]\nfrom = \"side-a\"\nto = \"side-b\"\naction = \"allow\"\n[[rule]]\nfrom = \"side-b\"\nto = \"side-a\"\naction = \"allow\"\n";
    let out = coord.apply_policy(&mesh, policy)?;
    if !out.status.success() {
        bail!("policy apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    let relay_node = match relay {
        Some(r) => Some(NodeProc::start(
            &mesh,
            &coord,
            &NodeSpec::new("relay-r").on(r).relay(),
        )?),
        None => None,
    };
    let ports = ["icmp", "tcp/1-65535", "udp/1-65535"];
    let threads = threads_line();
    let a = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("node-a")
            .on(ns.0)
            .overlay("qm0")
            .overlay_service("side-a", &ports)
            .config_line(&threads),
    )?;
    let b = side_b(&mesh, &coord, ns.1)?;
    let target = overlay_v4(&b)?;
    if relay.is_some() {
        let up = wait_reachable(ns.0, target, Duration::from_secs(20));
        let path = a.path_to("node-b")?;
        let wrong = match up {
            Err(e) => Some(format!("{e:#}; node-a's path to node-b: {path}")),
            Ok(()) if path["via"] != "relay" || path["relay"] != "relay-r" => Some(format!(
                "node-a's tunnel to node-b is not relayed by relay-r: path {path}"
            )),
            Ok(()) => None,
        };
        if let Some(why) = wrong {
            drop((b, a, relay_node, coord));
            bail!("{why} (logs kept in {})", mesh.keep().display());
        }
    }
    let other_pids = [a.pid(), b.pid()]
        .into_iter()
        .chain(relay_node.as_ref().map(|r| r.pid()))
        .flatten()
        .collect();
    Ok(Tunnel {
        target,
        daemons: vec![],
        files: vec![],
        other_pids,
        keep: Some(Box::new((b, a, relay_node, coord, mesh))),
    })
}

/// The client host `c` of the WireGuard rows (module doc): joined to `a` by
/// 198.18.4.0/24, its default route through `a`, which forwards (for the plain servers)
/// and `b` routing their tunnel's addresses back through `a`.
fn client_host(net: &mut Net, ns: (&str, &str)) -> anyhow::Result<String> {
    let c = net.bare("c")?;
    net.link((ns.0, "eth2"), (&c, "eth0"), "198.18.4")?;
    run_in(&c, &["ip", "route", "add", "default", "via", "198.18.4.1"])?;
    run_in(ns.0, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    run_in(
        ns.1,
        &["ip", "route", "add", "100.64.5.0/24", "via", "198.18.0.1"],
    )?;
    Ok(c)
}

/// The relay host of `quicmesh-relayed` (module doc): `r` wired to `a` and `b`, not
/// forwarding, and routes from `a` and `b` to the other side's subnet through it (which
/// `r` drops, so only the relay joins them).
fn relay_host(net: &mut Net, ns: (&str, &str)) -> anyhow::Result<String> {
    let r = net.bare("r")?;
    net.link((ns.0, "eth1"), (&r, "eth0"), "198.18.1")?;
    net.link((ns.1, "eth1"), (&r, "eth1"), "198.18.2")?;
    run_in(&r, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])?;
    // One public address, as a relay has: 198.18.3.1, the source of all it sends.
    run_in(&r, &["ip", "addr", "add", "198.18.3.1/32", "dev", "lo"])?;
    for (dev, subnet) in [("eth0", "198.18.1.0/24"), ("eth1", "198.18.2.0/24")] {
        run_in(
            &r,
            &[
                "ip",
                "route",
                "replace",
                subnet,
                "dev",
                dev,
                "src",
                "198.18.3.1",
            ],
        )?;
    }
    for (side, via, other_side) in [
        (ns.0, "198.18.1.2", "198.18.2.0/24"),
        (ns.1, "198.18.2.2", "198.18.1.0/24"),
    ] {
        for dst in ["198.18.3.1/32", other_side] {
            run_in(side, &["ip", "route", "add", dst, "via", via])?;
        }
    }
    Ok(r)
}

fn start(
    sys: &str,
    ns: (&str, &str),
    relay: Option<&str>,
    client: Option<&str>,
    dir: &Path,
) -> anyhow::Result<Option<Tunnel>> {
    let c = || client.context("the client host was not set up (internal error)");
    let t = match sys {
        "quicmesh-gateway" => quicmesh_gateway(ns, c()?, dir)?,
        "wg-server-boringtun" => {
            need(
                "boringtun-cli",
                "cargo install --locked boringtun-cli@0.7.1",
            )?;
            wg_server(
                ns,
                c()?,
                dir,
                &["boringtun-cli", "--foreground", "--disable-drop-privileges"],
            )?
        }
        "wg-server-wireguard-go" => wg_server(ns, c()?, dir, &["wireguard-go", "-f"])?,
        "veth" => return Ok(None),
        "quicmesh" => quicmesh(ns, None)?,
        "quicmesh-relayed" => quicmesh(
            ns,
            Some(relay.context("the relay host was not set up (internal error)")?),
        )?,
        "wireguard-go" => {
            need("wireguard-go", "apt-get install wireguard-go")?;
            wireguard(ns, dir, &["wireguard-go", "-f"], ("wga", "wgb"), 1)?
        }
        "boringtun" => {
            need(
                "boringtun-cli",
                "cargo install --locked boringtun-cli@0.7.1",
            )?;
            wireguard(
                ns,
                dir,
                &["boringtun-cli", "--foreground", "--disable-drop-privileges"],
                ("bta", "btb"),
                2,
            )?
        }
        "nebula" => nebula(ns, dir)?,
        "quincy" => quincy(ns, dir)?,
        other => bail!("unknown system {other} (known: {})", SYSTEMS.join(", ")),
    };
    let from = if from_client_ns(sys) { c()? } else { ns.0 };
    wait_reachable(from, t.target, Duration::from_secs(20)).with_context(|| {
        format!(
            "{sys} started but the tunnel did not come up (logs in {})",
            dir.display()
        )
    })?;
    Ok(Some(t))
}

/// One iperf3 run: (Mbit/s, bytes received, retransmits).
fn iperf(ns: &str, target: Ipv4Addr, secs: u64, extra: &[&str]) -> anyhow::Result<(f64, f64, u64)> {
    let t = (secs + 20).to_string();
    let s = secs.to_string();
    let port = IPERF_PORT.to_string();
    let target = target.to_string();
    let mut args = vec![
        "timeout",
        &t,
        "iperf3",
        "-c",
        &target,
        "-p",
        &port,
        "-t",
        &s,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    args.extend_from_slice(extra);
    // The server takes one test at a time and may still be closing the last one: "busy"
    // is retried for a few seconds.
    let mut tries = 0;
    let v = loop {
        let out = run_in(ns, &args)?;
        let v: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        match v["error"].as_str() {
            Some(e) if e.contains("busy") && tries < 10 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Some(e) => bail!("iperf3: {e}"),
            None => break v,
        }
    };
    let end = &v["end"];
    Ok((
        end["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6,
        end["sum_received"]["bytes"].as_f64().unwrap_or(0.0),
        end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    ))
}

/// Ping round trips in µs.
fn ping(ns: &str, target: Ipv4Addr) -> anyhow::Result<Histogram<u64>> {
    let out = run_in(
        ns,
        &[
            "ping",
            "-c",
            "200",
            "-i",
            "0.01",
            "-W",
            "1",
            &target.to_string(),
        ],
    )?;
    let mut h = hist();
    for t in out.split("time=").skip(1) {
        if let Some(ms) = t
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            h.record(((ms * 1000.0) as u64).max(1))?;
        }
    }
    if h.is_empty() {
        bail!("no ping replies");
    }
    Ok(h)
}

type Samples = std::collections::BTreeMap<(String, String), Vec<(f64, f64)>>;

fn push(samples: &mut Samples, sys: &str, metric: &str, v: f64, steal: f64) {
    samples
        .entry((sys.to_string(), metric.to_string()))
        .or_default()
        .push((v, steal));
}

/// Measures one system once; records into `samples`.
fn measure(
    sys: &str,
    t: Option<&Tunnel>,
    client: &str,
    secs: u64,
    samples: &mut Samples,
    runs: &mut Vec<Value>,
    round: usize,
) -> anyhow::Result<()> {
    let target = t.map(|t| t.target).unwrap_or(Ipv4Addr::new(198, 18, 0, 2));
    let (cpu0, _) = t.map(|t| t.usage()).unwrap_or_default();
    let mut bytes = 0.0;
    for (name, extra) in [
        ("tcp 1 stream Mbit/s", &[][..]),
        ("tcp 4 streams Mbit/s", &["-P", "4"][..]),
        ("tcp reverse Mbit/s", &["-R"][..]),
    ] {
        let s0 = stat::cpu_jiffies();
        let (mbit, b, retr) = iperf(client, target, secs, extra)?;
        let steal = stat::steal_pct(s0, stat::cpu_jiffies());
        bytes += b;
        push(samples, sys, name, mbit, steal);
        push(
            samples,
            sys,
            &name.replace("Mbit/s", "retransmits"),
            retr as f64,
            steal,
        );
        runs.push(json!({"round": round, "system": sys, "test": name, "mbit_s": mbit, "bytes": b, "retransmits": retr, "steal_pct": steal}));
    }
    if let Some(t) = t {
        let (cpu1, hwm) = t.usage();
        let cpu_s = (cpu1 - cpu0) as f64 / stat::TICKS_PER_SEC;
        push(samples, sys, "daemon CPU s/GB", cpu_s / (bytes / 1e9), 0.0);
        push(
            samples,
            sys,
            "daemons peak RSS MB",
            hwm as f64 / 1024.0,
            0.0,
        );
    }
    let h = ping(client, target)?;
    push(
        samples,
        sys,
        "ping p50 us",
        h.value_at_quantile(0.5) as f64,
        0.0,
    );
    push(
        samples,
        sys,
        "ping p99 us",
        h.value_at_quantile(0.99) as f64,
        0.0,
    );
    let addr = (target, ECHO_PORT).into();
    let (h, _) = in_ns(client, move || open_loop(addr, 1000, 3, 1))??;
    for (q, n) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p999")] {
        push(
            samples,
            sys,
            &format!("echo 1k/s {n} us"),
            h.value_at_quantile(q) as f64,
            0.0,
        );
    }
    Ok(())
}

/// Runs the scenario and returns its JSON.
pub fn run(opts: &L3Opts) -> anyhow::Result<Value> {
    for bin in ["iperf3", "ping"] {
        need(bin, "apt-get install iperf3 iputils-ping")?;
    }
    let mesh = Mesh::new("bench-l3");
    let dir = mesh.path().to_path_buf();
    let mut net = Net::new("l3", &dir)?;
    let (na, nb) = net.pair("a", "b", "198.18.0")?;
    in_ns(&nb, || echo_server(&format!("0.0.0.0:{ECHO_PORT}")))??;
    let mut iperf_server = spawn_in(
        &nb,
        &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
        &dir.join("iperf3-server.log"),
    )?;
    std::thread::sleep(Duration::from_millis(300));

    let systems: Vec<String> = opts.systems.clone();
    let relay = if systems.iter().any(|s| s == "quicmesh-relayed") {
        Some(relay_host(&mut net, (&na, &nb))?)
    } else {
        None
    };
    let client_host = if systems.iter().any(|s| from_client_ns(s)) {
        Some(client_host(&mut net, (&na, &nb))?)
    } else {
        None
    };
    let mut samples = Samples::new();
    let mut runs = Vec::new();
    let mut reasons: std::collections::BTreeMap<String, String> = Default::default();
    for round in 0..opts.rounds {
        for i in 0..systems.len() {
            let sys = &systems[(i + round) % systems.len()];
            if reasons.contains_key(sys) {
                continue;
            }
            let client = match (&client_host, from_client_ns(sys)) {
                (Some(c), true) => c.as_str(),
                _ => na.as_str(),
            };
            let r = start(
                sys,
                (&na, &nb),
                relay.as_deref(),
                client_host.as_deref(),
                &dir,
            )
            .and_then(|t| {
                measure(
                    sys,
                    t.as_ref(),
                    client,
                    opts.secs,
                    &mut samples,
                    &mut runs,
                    round,
                )
            });
            if let Err(e) = r {
                eprintln!("l3: {sys}: {e:#}");
                reasons.insert(sys.clone(), format!("{e:#}"));
            }
        }
    }
    let _ = iperf_server.kill();
    let _ = iperf_server.wait();

    println!(
        "l3: two namespaces over one veth pair; iperf3 {} s per test, {} rounds (order rotating); median [min-max]",
        opts.secs, opts.rounds
    );
    let metrics = [
        "tcp 1 stream Mbit/s",
        "tcp 4 streams Mbit/s",
        "tcp reverse Mbit/s",
        "tcp 1 stream retransmits",
        "daemon CPU s/GB",
        "daemons peak RSS MB",
        "ping p50 us",
        "ping p99 us",
        "echo 1k/s p50 us",
        "echo 1k/s p99 us",
        "echo 1k/s p999 us",
    ];
    print!("{:<26}", "metric");
    for s in &systems {
        print!(" {s:>20}");
    }
    println!();
    let mut table = Vec::new();
    for m in metrics {
        print!("{m:<26}");
        let mut row = json!({"metric": m});
        for s in &systems {
            let v: Vec<f64> = samples
                .get(&(s.clone(), m.to_string()))
                .map(|v| v.iter().map(|x| x.0).collect())
                .unwrap_or_default();
            if v.is_empty() {
                print!(
                    " {:>20}",
                    if reasons.contains_key(s) {
                        "not run"
                    } else {
                        "-"
                    }
                );
                continue;
            }
            let (md, lo, hi) = stat::median_spread(&v);
            let cell = if md >= 100.0 {
                format!("{md:.0} [{lo:.0}-{hi:.0}]")
            } else {
                format!("{md:.1} [{lo:.1}-{hi:.1}]")
            };
            print!(" {cell:>20}");
            row[s.as_str()] = json!({"median": md, "min": lo, "max": hi});
        }
        println!();
        table.push(row);
    }
    // Throughput over low-steal runs only, beside the overall medians above.
    println!("throughput medians over runs with CPU steal < {LOW_STEAL_PCT}% (runs kept/all):");
    let mut low = Vec::new();
    for m in &metrics[..3] {
        print!("{m:<26}");
        let mut row = json!({"metric": m});
        for s in &systems {
            let all = samples
                .get(&(s.clone(), m.to_string()))
                .cloned()
                .unwrap_or_default();
            let kept: Vec<f64> = all
                .iter()
                .filter(|x| x.1 < LOW_STEAL_PCT)
                .map(|x| x.0)
                .collect();
            if kept.is_empty() {
                print!(" {:>20}", format!("- (0/{})", all.len()));
                continue;
            }
            let (md, _, _) = stat::median_spread(&kept);
            print!(" {:>20}", format!("{md:.0} ({}/{})", kept.len(), all.len()));
            row[s.as_str()] = json!({"median": md, "kept": kept.len(), "runs": all.len()});
        }
        println!();
        low.push(row);
    }
    // quicmesh / peer, pair by pair within each round (absolute numbers drift).
    let mut ratios = Vec::new();
    if samples.keys().any(|(s, _)| s == "quicmesh") {
        println!("quicmesh / peer (median of per-round ratios):");
        for m in [
            "tcp 1 stream Mbit/s",
            "tcp 4 streams Mbit/s",
            "daemon CPU s/GB",
        ] {
            let q = samples
                .get(&("quicmesh".into(), m.into()))
                .cloned()
                .unwrap_or_default();
            let mut line = format!("  {m:<24}");
            for s in systems
                .iter()
                .filter(|s| !s.starts_with("quicmesh") && *s != "veth" && !from_client_ns(s))
            {
                let p = samples
                    .get(&(s.clone(), m.into()))
                    .cloned()
                    .unwrap_or_default();
                let r: Vec<f64> = q.iter().zip(&p).map(|(a, b)| a.0 / b.0).collect();
                if !r.is_empty() {
                    let (md, _, _) = stat::median_spread(&r);
                    line.push_str(&format!(" {s} {md:.2}x"));
                    ratios.push(json!({"metric": m, "peer": s, "ratio": md}));
                }
            }
            println!("{line}");
        }
    }
    // What the relay costs: quicmesh relayed against quicmesh direct, round by round.
    let has = |s: &str| samples.keys().any(|(k, _)| k == s);
    if has("quicmesh") && has("quicmesh-relayed") {
        let mut line = String::from("quicmesh relayed / direct (median of per-round ratios):");
        for m in ["tcp 1 stream Mbit/s", "tcp 4 streams Mbit/s", "ping p50 us"] {
            let get = |s: &str| {
                samples
                    .get(&(s.to_string(), m.to_string()))
                    .cloned()
                    .unwrap_or_default()
            };
            let r: Vec<f64> = get("quicmesh-relayed")
                .iter()
                .zip(&get("quicmesh"))
                .map(|(a, b)| a.0 / b.0)
                .collect();
            if !r.is_empty() {
                let (md, _, _) = stat::median_spread(&r);
                line.push_str(&format!("\n  {m:<24} {md:.2}x"));
                ratios.push(json!({"metric": m, "relayed_over_direct": md}));
            }
        }
        println!("{line}");
    }
    // The gateway against the plain WireGuard servers, round by round: throughput and
    // CPU as ratios, latency as the difference of medians.
    for peer in ["wg-server-boringtun", "wg-server-wireguard-go"] {
        if !(has("quicmesh-gateway") && has(peer)) {
            continue;
        }
        let mut line = format!("quicmesh-gateway / {peer} (median of per-round ratios):");
        for m in [
            "tcp 1 stream Mbit/s",
            "tcp 4 streams Mbit/s",
            "daemon CPU s/GB",
        ] {
            let get = |s: &str| {
                samples
                    .get(&(s.to_string(), m.to_string()))
                    .cloned()
                    .unwrap_or_default()
            };
            let r: Vec<f64> = get("quicmesh-gateway")
                .iter()
                .zip(&get(peer))
                .map(|(a, b)| a.0 / b.0)
                .collect();
            if !r.is_empty() {
                let (md, _, _) = stat::median_spread(&r);
                line.push_str(&format!("\n  {m:<24} {md:.2}x"));
                ratios.push(json!({"metric": m, "peer": peer, "gateway_over_peer": md}));
            }
        }
        for m in ["ping p50 us", "echo 1k/s p50 us"] {
            let med = |s: &str| {
                let v: Vec<f64> = samples
                    .get(&(s.to_string(), m.to_string()))
                    .map(|v| v.iter().map(|x| x.0).collect())
                    .unwrap_or_default();
                (!v.is_empty()).then(|| stat::median_spread(&v).0)
            };
            if let (Some(g), Some(p)) = (med("quicmesh-gateway"), med(peer)) {
                line.push_str(&format!("\n  {m:<24} {:+.0} us", g - p));
                ratios.push(json!({"metric": m, "peer": peer, "gateway_minus_peer_us": g - p}));
            }
        }
        println!("{line}");
    }
    for (s, why) in &reasons {
        println!("{s}: not run: {why}");
    }
    Ok(json!({
        "scenario": "l3",
        "opts": {"secs": opts.secs, "rounds": opts.rounds, "systems": systems},
        "table": table,
        "low_steal": low,
        "ratios": ratios,
        "not_run": reasons,
        "runs": runs,
    }))
}
