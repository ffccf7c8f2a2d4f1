//! `quicmesh-coordinator dev`: a whole mesh in one process, no root. A coordinator with an
//! embedded store in a temporary dir, three nodes on loopback (web-1, db-1, payments-1),
//! demo services, the demo policy, and a request that crosses the mesh plus a denied one.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicmesh_node::config::NodeConfig;
use quicmesh_node::state::Node;
use quicmesh_protocol::ident::TrustDomain;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::mesh::init;
use crate::serve;

/// The demo policy: web may reach db; everything else is denied.
pub const DEMO_POLICY: &str = r#"# quicmesh demo policy: default deny, web -> db allowed.
default = "deny"

[[rule]]
from = "web"
to = "db"
action = "allow"

[[test]]
from = "web"
to = "db"
expect = "allow"

[[test]]
from = "web"
to = "payments"
expect = "deny"
"#;

/// A line-echo demo service that prefixes each answer with its name.
pub async fn demo_service(name: &'static str) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{name} answers: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Sends one line through `addr` and reads one line back.
pub async fn request(addr: SocketAddr, line: &str) -> anyhow::Result<Option<String>> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let (r, mut w) = s.into_split();
    match w.write_all(format!("{line}\n").as_bytes()).await {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            return Ok(None)
        }
        r => r?,
    }
    let mut reply = String::new();
    // A refused flow is closed by the mesh: end of stream or a reset, never a reply.
    match tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(r).read_line(&mut reply),
    )
    .await?
    {
        Ok(n) => Ok((n > 0).then(|| reply.trim_end().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn node_config(
    dir: &Path,
    name: &str,
    token: &str,
    coordinator: SocketAddr,
    service: &str,
    svc_addr: SocketAddr,
    upstreams: &[(&str, u16)],
    check_egress: bool,
) -> anyhow::Result<NodeConfig> {
    let mut t = format!(
        "name = \"{name}\"\ncoordinator = \"{coordinator}\"\njoin_token = \"{token}\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nmetrics = \"off\"\nlabels = {{ datacenter = \"dev\" }}\n\n[policy]\ncheck_egress = {check_egress}\n\n[[service]]\nname = \"{service}\"\naddress = \"{svc_addr}\"\n",
        dir.join(name).display()
    );
    for (svc, port) in upstreams {
        t.push_str(&format!(
            "\n[[upstream]]\nservice = \"{svc}\"\nbind = \"127.0.0.1:{port}\"\n"
        ));
    }
    Ok(NodeConfig::parse(&t, &format!("{name}.toml"), dir)?)
}

async fn wait_converged(mesh: &crate::mesh::Mesh, nodes: &[Arc<Node>]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = mesh.version()?;
        let ready = nodes.iter().all(|n| {
            let view = n.view();
            view.version >= v
                && view.peers.values().all(|p| p.endpoint.is_some())
                && view.peers.len() == nodes.len() - 1
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("nodes did not converge on mesh version {v} within 10s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the dev mesh until Ctrl-C.
pub async fn run(http: SocketAddr) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new().prefix("quicmesh-dev-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    let out = init(
        &dir.join("coordinator"),
        TrustDomain::new("quicmesh.local")?,
    )?;
    let running = serve::start(
        &dir.join("coordinator"),
        "127.0.0.1:0".parse()?,
        http,
        3600,
        serve::HttpOptions::default(),
        None,
        true,
    )
    .await?;
    let mesh = running.mesh.clone();
    mesh.apply_policy(DEMO_POLICY)?;
    println!(
        "quicmesh dev mesh (trust domain {}, data in {})",
        out.trust_domain,
        dir.display()
    );
    println!("  coordinator control  udp {}", running.control_addr);
    println!(
        "  coordinator api      http://{}/api/v1   (admin token: {})",
        running.http_addr, out.admin_token
    );
    println!(
        "  dashboard            http://{}/ui/overview   (sign in with the admin token)",
        running.http_addr
    );

    let web = demo_service("web").await?;
    let db = demo_service("db-1").await?;
    let payments = demo_service("payments-1").await?;
    let (db_port, pay_port) = (free_port()?, free_port()?);
    let labels: std::collections::BTreeMap<String, String> =
        [("datacenter".to_string(), "dev".to_string())].into();
    let mut nodes = Vec::new();
    for (name, svc, addr, ups, egress) in [
        ("db-1", "db", db, vec![], true),
        ("payments-1", "payments", payments, vec![], true),
        // web-1 leaves the policy decision to the peers' ingress, so the demo shows the
        // authoritative check (by default a sender also checks, to fail fast).
        (
            "web-1",
            "web",
            web,
            vec![("db", db_port), ("payments", pay_port)],
            false,
        ),
    ] {
        let (token, _) = mesh.create_token(name, &[svc.to_string()], &labels, false, 600)?;
        let cfg = node_config(
            &dir,
            name,
            &token,
            running.control_addr,
            svc,
            addr,
            &ups,
            egress,
        )?;
        let node = quicmesh_node::run::start(cfg).await?;
        println!(
            "  node {name:<11}        tunnel udp {}  serves {svc}",
            node.endpoint.local_addr()?
        );
        nodes.push(node);
    }
    wait_converged(&mesh, &nodes).await?;
    println!(
        "  policy v{}: web -> db allowed, everything else denied",
        mesh.policy().0
    );
    println!();

    let db_addr: SocketAddr = format!("127.0.0.1:{db_port}").parse()?;
    let t0 = Instant::now();
    match request(db_addr, "SELECT 1").await? {
        Some(reply) => println!(
            "ALLOWED  web-1 -> db: sent \"SELECT 1\" to 127.0.0.1:{db_port}, reply \"{reply}\" crossed the mesh in {:.1} ms (rule {})",
            t0.elapsed().as_secs_f64() * 1e3,
            mesh.explain("web", "db")?.decision.rule_label()
        ),
        None => anyhow::bail!("web -> db got no reply"),
    }
    let pay_addr: SocketAddr = format!("127.0.0.1:{pay_port}").parse()?;
    let reply = request(pay_addr, "charge 10").await?;
    let payments_node = nodes
        .iter()
        .find(|n| n.cfg.name.as_str() == "payments-1")
        .ok_or_else(|| anyhow::anyhow!("no payments node"))?;
    let denied = payments_node
        .metrics
        .reasons()
        .get("ingress_rejected/policy_denied")
        .copied()
        .unwrap_or(0);
    let e = mesh.explain("web", "payments")?;
    match reply {
        None if denied > 0 => println!(
            "DENIED   web-1 -> payments: refused at payments-1's tunnel ingress, reason policy_denied, rule {} ({}); payments-1 counted {denied} denial(s)",
            e.decision.rule_label(),
            e.text
        ),
        other => anyhow::bail!("web -> payments was not denied as expected: reply {other:?}, denials {denied}"),
    }
    println!();
    println!("ready in {:.1} s. Try:", started.elapsed().as_secs_f64());
    println!("  printf 'hello\\n' | nc 127.0.0.1 {db_port}        # web -> db through the mesh");
    println!("  QUICMESH_ADMIN_TOKEN={} cargo run -q -p quicmesh-coordinator -- --api http://{} nodes list", out.admin_token, running.http_addr);
    println!(
        "  quicmesh-node status --socket {}",
        dir.join("web-1").join("admin.sock").display()
    );
    println!("Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    for n in &nodes {
        n.endpoint
            .close(quinn::VarInt::from_u32(0), b"dev mesh stopping");
    }
    running
        .endpoint
        .close(quinn::VarInt::from_u32(0), b"dev mesh stopping");
    drop(tmp);
    Ok(())
}
