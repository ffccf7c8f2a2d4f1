//! `quicmesh-coordinator`: init, serve, the dev mesh, and admin commands that talk to a
//! running coordinator's API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use quicmesh_coordinator::client::{ApiClient, ClientError};
use quicmesh_protocol::ident::TrustDomain;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "quicmesh-coordinator",
    version,
    about = "quicmesh coordinator: mesh CA, catalog, policy, API"
)]
struct Cli {
    #[command(flatten)]
    admin: AdminOpts,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct AdminOpts {
    /// Coordinator API URL for admin commands.
    #[arg(
        long,
        global = true,
        env = "QUICMESH_API",
        default_value = "http://127.0.0.1:7780"
    )]
    api: String,
    /// Data dir (for `init`/`serve`; admin commands read `admin.token` from it when
    /// QUICMESH_ADMIN_TOKEN is not set).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Print raw JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a data dir: CA key and root, trust domain, admin token (files 0600).
    Init {
        #[arg(long, default_value = "quicmesh.local")]
        trust_domain: String,
        /// IPv4 pool for nodes' overlay addresses (default 100.64.0.0/10).
        #[arg(long)]
        overlay_v4: Option<String>,
        /// IPv6 pool for nodes' overlay addresses (default: a ULA /48 derived from the CA).
        #[arg(long)]
        overlay_v6: Option<String>,
        /// Storage: postgres://... to keep the mesh in PostgreSQL (replicas); default: the
        /// embedded SQLite store in the data dir.
        #[arg(long, env = "QUICMESH_STORE", hide_env_values = true)]
        store: Option<String>,
    },
    /// Run the coordinator.
    Serve {
        /// UDP address of the QUIC control listener.
        #[arg(long, default_value = "0.0.0.0:7700")]
        listen: SocketAddr,
        /// TCP address of the HTTP API (keep it on loopback or a management network).
        #[arg(long, default_value = "127.0.0.1:7780")]
        http: SocketAddr,
        /// Lifetime of node certificates (e.g. 24h, 10m, 30s).
        #[arg(long, default_value = "24h")]
        cert_ttl: String,
        /// Storage: postgres://user@host/db for replicas sharing one database (the
        /// password is better given in QUICMESH_STORE or a ~/.pgpass than on the command
        /// line); default: the embedded SQLite store in the data dir.
        #[arg(long, env = "QUICMESH_STORE", hide_env_values = true)]
        store: Option<String>,
        /// How long a node may be without a control session before its instances are
        /// no longer routed to (e.g. 15s, 1m).
        #[arg(long, default_value = "15s")]
        offline_after: String,
        /// A reverse proxy (CIDR or address) whose X-Forwarded-For is believed for the
        /// client's address (sign-in limits); repeat for several.
        #[arg(long = "trusted-proxy", value_name = "CIDR")]
        trusted_proxies: Vec<String>,
        /// A name the HTTP API may be reached by (its Host header), besides IP addresses
        /// and localhost; repeat for several. Other names are refused (DNS rebinding).
        #[arg(long = "http-host", value_name = "NAME")]
        http_hosts: Vec<String>,
        /// An HTTP connection must send a whole request head within this.
        #[arg(long, default_value = "10s")]
        http_header_timeout: String,
        /// Open HTTP connections at most (beyond: 503 and closed).
        #[arg(long, default_value_t = quicmesh_node::admin::http::DEFAULT_MAX_CONNECTIONS)]
        http_max_connections: usize,
        /// Open HTTP connections at most from one client address (trusted proxies are
        /// held only to --http-max-connections).
        #[arg(long, default_value_t = quicmesh_node::admin::http::DEFAULT_MAX_PER_SOURCE)]
        http_max_connections_per_source: usize,
        /// Do not relay for nodes. By default the control listener is also the relay of
        /// last resort: two nodes that cannot reach each other directly, with no relay
        /// node answering, send their tunnel's (end-to-end encrypted) datagrams through it.
        #[arg(long)]
        no_relay: bool,
    },
    /// A whole mesh in one process, for trying quicmesh: no root, temporary data.
    Dev {
        #[arg(long, default_value = "127.0.0.1:7780")]
        http: SocketAddr,
    },
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The node catalog.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// The service catalog.
    #[command(subcommand)]
    Services(ServicesCmd),
    /// WireGuard clients: stock WireGuard clients that reach the mesh through gateway nodes.
    #[command(subcommand)]
    Wg(WgCmd),
    /// The coordinator replicas sharing this mesh's database.
    #[command(subcommand)]
    Replicas(ReplicasCmd),
}

#[derive(Subcommand)]
enum ReplicasCmd {
    /// List replicas: heartbeat age, sessions held, which one answered and which leads.
    List,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a single-use join token; prints the token line on stdout.
    Create {
        #[arg(long)]
        node: String,
        /// A service the node may host (repeat).
        #[arg(long = "service")]
        services: Vec<String>,
        /// A label the node carries, key=value (repeat). The node gets every one of them;
        /// it may not claim others.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Grants the relay role: `relay = true` in the node's config works only with it.
        #[arg(long)]
        relay: bool,
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Run the file's tests and apply it whole, or reject it naming the failing test.
    Apply {
        file: PathBuf,
        /// Check only; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the current policy.
    Show,
    /// Every applied version.
    History,
    /// Which rule decides from -> to, and why.
    Explain {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Judge an HTTP request with this method (with --path; default GET).
        #[arg(long)]
        method: Option<String>,
        /// Judge an HTTP request for this path (normalised as requests are).
        #[arg(long)]
        path: Option<String>,
    },
}

#[derive(Subcommand)]
enum NodesCmd {
    /// List nodes.
    List,
    /// Revoke a node: its certificates go on every node's deny list.
    Revoke { name: String },
    /// Grant a node the relay role (a relay enrolled without `token create --relay`);
    /// `--withdraw` takes it away.
    Relay {
        name: String,
        #[arg(long)]
        withdraw: bool,
    },
}

#[derive(Subcommand)]
enum WgCmd {
    /// Enroll a client; prints its wg-quick configuration (with a private key made here,
    /// shown only this once, unless --public-key brings the device's own).
    Add {
        #[arg(long)]
        name: String,
        /// The service policy sees the client as.
        #[arg(long)]
        service: String,
        /// A label the client carries, key=value (repeat).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// How long it stays enrolled (e.g. 30d); default: until revoked.
        #[arg(long)]
        ttl: Option<String>,
        /// The device's own public key (its private key never leaves it).
        #[arg(long)]
        public_key: Option<String>,
        /// A gateway node that serves the client (repeat; the first is the one used).
        #[arg(long = "gateway", required = true)]
        gateways: Vec<String>,
    },
    /// List clients.
    List,
    /// Revoke a client (its name and key are never used again).
    Revoke { name: String },
}

#[derive(Subcommand)]
enum ServicesCmd {
    /// List services and their instances.
    List,
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

fn duration_secs(s: &str, what: &str) -> Result<i64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs() as i64)
        .map_err(|e| format!("--{what} {s:?}: {e}"))
}

/// Checks the HTTP server's flags.
fn http_options(
    trusted_proxies: &[String],
    hosts: Vec<String>,
    header_timeout: &str,
    max_connections: usize,
    max_per_source: usize,
) -> Result<quicmesh_coordinator::serve::HttpOptions, String> {
    use quicmesh_protocol::overlay::Prefix;
    let mut trusted = Vec::new();
    for t in trusted_proxies {
        // A bare address is a one-address prefix.
        let p = match t.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(Prefix {
                addr: ip,
                len: if ip.is_ipv4() { 32 } else { 128 },
            }),
            Err(_) => t.parse::<Prefix>(),
        };
        trusted.push(p.map_err(|e| format!("--trusted-proxy: {e}"))?);
    }
    for h in &hosts {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.trim_end_matches('.').split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !ok {
            return Err(format!("--http-host {h:?}: not a DNS name"));
        }
    }
    let header_read_timeout = humantime::parse_duration(header_timeout)
        .map_err(|e| format!("--http-header-timeout {header_timeout:?}: {e}"))?;
    if header_read_timeout < std::time::Duration::from_millis(100) {
        return Err("--http-header-timeout must be at least 100ms".into());
    }
    if max_connections == 0 || max_per_source == 0 {
        return Err(
            "--http-max-connections and --http-max-connections-per-source must be at least 1"
                .into(),
        );
    }
    Ok(quicmesh_coordinator::serve::HttpOptions {
        limits: quicmesh_node::admin::http::HttpLimits {
            header_read_timeout,
            max_connections,
            max_per_source,
            unlimited_sources: Vec::new(),
        },
        hosts,
        trusted_proxies: trusted,
    })
}

fn admin_token(opts: &AdminOpts) -> Result<String, String> {
    if let Ok(t) = std::env::var("QUICMESH_ADMIN_TOKEN") {
        return Ok(t);
    }
    match &opts.data_dir {
        Some(d) => std::fs::read_to_string(d.join("admin.token"))
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("{}: {e}", d.join("admin.token").display())),
        None => Err("no admin token: set QUICMESH_ADMIN_TOKEN or pass --data-dir".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = if matches!(cli.cmd, Cmd::Dev { .. }) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUICMESH_LOG")
                .unwrap_or_else(|_| default_log.into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("tokio runtime: {e}")),
    };
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let opts = &cli.admin;
    match cli.cmd {
        Cmd::Init {
            trust_domain,
            overlay_v4,
            overlay_v6,
            store,
        } => {
            let Some(dir) = &opts.data_dir else {
                return fail(64, "init needs --data-dir");
            };
            let td = match TrustDomain::new(trust_domain) {
                Ok(t) => t,
                Err(e) => return fail(64, format!("--trust-domain: {e}")),
            };
            let prefix = |flag: &str, v: Option<String>| {
                v.map(|v| v.parse::<quicmesh_protocol::overlay::Prefix>())
                    .transpose()
                    .map_err(|e| format!("{flag}: {e}"))
            };
            let (v4, v6) = match (
                prefix("--overlay-v4", overlay_v4),
                prefix("--overlay-v6", overlay_v6),
            ) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => return fail(64, e),
            };
            match quicmesh_coordinator::mesh::init_with(dir, td, v4, v6, store.as_deref()) {
                Ok(out) => {
                    println!("initialized {}", dir.display());
                    println!("trust domain    {}", out.trust_domain);
                    println!("ca fingerprint  sha256:{}", out.ca_fingerprint);
                    println!(
                        "admin token     in {} (mode 0600)",
                        dir.join("admin.token").display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, e),
            }
        }
        Cmd::Serve {
            listen,
            http,
            cert_ttl,
            store,
            offline_after,
            trusted_proxies,
            http_hosts,
            http_header_timeout,
            http_max_connections,
            http_max_connections_per_source,
            no_relay,
        } => {
            let Some(dir) = &opts.data_dir else {
                return fail(64, "serve needs --data-dir");
            };
            let http_opts = match http_options(
                &trusted_proxies,
                http_hosts,
                &http_header_timeout,
                http_max_connections,
                http_max_connections_per_source,
            ) {
                Ok(o) => o,
                Err(e) => return fail(64, e),
            };
            let ttl = match duration_secs(&cert_ttl, "cert-ttl") {
                Ok(t) if t >= 1 => t,
                Ok(_) => return fail(64, "--cert-ttl must be at least 1s"),
                Err(e) => return fail(64, e),
            };
            let grace = match duration_secs(&offline_after, "offline-after") {
                Ok(t) if t >= 1 => std::time::Duration::from_secs(t as u64),
                Ok(_) => return fail(64, "--offline-after must be at least 1s"),
                Err(e) => return fail(64, e),
            };
            let running = match quicmesh_coordinator::serve::start(
                dir,
                listen,
                http,
                ttl,
                http_opts,
                store.as_deref(),
                !no_relay,
            )
            .await
            {
                Ok(r) => r,
                Err(e) => return fail(1, e),
            };
            running.mesh.set_offline_after(grace);
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => return fail(1, e),
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            running
                .endpoint
                .close(quinn::VarInt::from_u32(0), b"coordinator stopping");
            ExitCode::SUCCESS
        }
        Cmd::Dev { http } => match quicmesh_coordinator::dev::run(http).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, e),
        },
        cmd => {
            let token = match admin_token(opts) {
                Ok(t) => t,
                Err(e) => return fail(64, e),
            };
            let client = match ApiClient::new(&opts.api, &token) {
                Ok(c) => c,
                Err(e) => return fail(64, e),
            };
            match admin(&client, cmd, opts.json).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(AdminError::Usage(e)) => fail(64, e),
                Err(AdminError::Api(ClientError::Status {
                    status,
                    message,
                    body,
                })) => {
                    eprintln!("error: {message} (http {status})");
                    for f in body["failures"].as_array().into_iter().flatten() {
                        eprintln!(
                            "  test[{}]: {} -> {} expected {}, got {}",
                            f["index"],
                            s(&f["from"]),
                            s(&f["to"]),
                            s(&f["expect"]).to_lowercase(),
                            s(&f["got"]["text"])
                        );
                    }
                    ExitCode::from(if status == 422 { 65 } else { 1 })
                }
                Err(AdminError::Api(e)) => fail(1, e),
            }
        }
    }
}

enum AdminError {
    Usage(String),
    Api(ClientError),
}

impl From<ClientError> for AdminError {
    fn from(e: ClientError) -> Self {
        AdminError::Api(e)
    }
}

/// `--label key=value` arguments as a map.
fn label_map(labels: &[String]) -> Result<BTreeMap<String, String>, AdminError> {
    let mut lm = BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| AdminError::Usage(format!("--label {l:?}: expected key=value")))?;
        lm.insert(k.to_string(), v.to_string());
    }
    Ok(lm)
}

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

async fn admin(client: &ApiClient, cmd: Cmd, raw: bool) -> Result<(), AdminError> {
    let print = |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match cmd {
        Cmd::Token(TokenCmd::Create {
            node,
            services,
            labels,
            relay,
            ttl,
        }) => {
            let ttl = duration_secs(&ttl, "ttl").map_err(AdminError::Usage)?;
            let lm = label_map(&labels)?;
            let v = client
                .post(
                    "/tokens",
                    json!({"node": node, "services": services, "labels": lm, "relay": relay, "ttl_secs": ttl}),
                )
                .await?;
            if raw {
                print(&v)
            } else {
                println!("{}", s(&v["token"]))
            }
        }
        Cmd::Policy(PolicyCmd::Apply { file, dry_run }) => {
            let source = std::fs::read_to_string(&file)
                .map_err(|e| AdminError::Usage(format!("{}: {e}", file.display())))?;
            let v = client
                .post("/policy", json!({"source": source, "dry_run": dry_run}))
                .await?;
            if raw {
                print(&v)
            } else if dry_run {
                println!(
                    "policy ok: {} rules, {} tests pass (dry run, nothing applied)",
                    v["rules"], v["tests"]
                );
            } else {
                println!(
                    "policy v{} applied: {} rules, {} tests pass",
                    v["version"], v["rules"], v["tests"]
                );
            }
        }
        Cmd::Policy(PolicyCmd::Show) => {
            let v = client.get("/policy").await?;
            if raw {
                print(&v)
            } else {
                println!("# policy v{}", v["version"]);
                println!(
                    "{}",
                    v["source"]
                        .as_str()
                        .unwrap_or("# no policy applied: default deny")
                );
            }
        }
        Cmd::Policy(PolicyCmd::History) => {
            let v = client.get("/policy/history").await?;
            if raw {
                print(&v)
            } else {
                for p in v["versions"].as_array().into_iter().flatten() {
                    println!(
                        "v{}  applied_at {}  {} bytes",
                        p["version"],
                        p["applied_at"],
                        s(&p["source"]).len()
                    );
                }
            }
        }
        Cmd::Policy(PolicyCmd::Explain {
            from,
            to,
            method,
            path,
        }) => {
            let mut q = format!("/policy/explain?from={}&to={}", enc(&from), enc(&to));
            if let Some(m) = &method {
                q.push_str(&format!("&method={}", enc(m)));
            }
            if let Some(p) = &path {
                q.push_str(&format!("&path={}", enc(p)));
            }
            let v = client.get(&q).await?;
            if raw {
                print(&v)
            } else {
                let what = match v["request"].as_object() {
                    Some(r) => format!(" {} {}", s(&r["method"]), s(&r["path"])),
                    None => String::new(),
                };
                println!(
                    "{from} -> {to}{what}: {} by {}",
                    s(&v["decision"]),
                    s(&v["rule"])
                );
                println!("  {}", s(&v["explanation"]["text"]));
                for c in v["explanation"]["candidates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    println!("  matching rule[{}]: {}", c["index"], s(&c["rule"]));
                }
            }
        }
        Cmd::Replicas(ReplicasCmd::List) => {
            let v = client.get("/replicas").await?;
            if raw {
                print(&v)
            } else {
                println!(
                    "{:<16} {:<8} {:<24} {:<24} {:>8} {:>10}",
                    "REPLICA", "STATE", "CONTROL", "API", "SESSIONS", "HEARTBEAT"
                );
                for r in v["replicas"].as_array().into_iter().flatten() {
                    let mut id = s(&r["id"]);
                    if r["id"] == v["this"] {
                        id.push('*');
                    }
                    println!(
                        "{:<16} {:<8} {:<24} {:<24} {:>8} {:>10}",
                        id,
                        if r["alive"] == true { "alive" } else { "dead" },
                        s(&r["control"]),
                        s(&r["http"]),
                        r["sessions"],
                        format!("{}ms ago", r["heartbeat_age_ms"])
                    );
                }
                println!(
                    "* the replica that answered; leader (singleton jobs): {}",
                    s(&v["leader"])
                );
            }
        }
        Cmd::Nodes(NodesCmd::List) => {
            let v = client.get("/nodes").await?;
            if raw {
                print(&v)
            } else {
                println!(
                    "{:<20} {:<8} {:<22} {:<20} {:>6} {:<12}",
                    "NODE", "STATE", "ENDPOINT", "SERVICES", "ACKED", "CERT EXPIRES"
                );
                let now = quicmesh_coordinator::mesh::now();
                for n in v["nodes"].as_array().into_iter().flatten() {
                    let state = if !n["revoked_at"].is_null() {
                        "revoked"
                    } else if n["online"] == true {
                        "online"
                    } else {
                        "offline"
                    };
                    let exp = n["cert_not_after"]
                        .as_i64()
                        .map(|t| format!("in {}s", t - now))
                        .unwrap_or_default();
                    let svcs = n["services"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    println!(
                        "{:<20} {:<8} {:<22} {:<20} {:>6} {:<12}",
                        s(&n["name"]),
                        state,
                        n["endpoint"].as_str().unwrap_or("-"),
                        svcs,
                        n["acked_version"],
                        exp
                    );
                }
                println!("mesh version {}", v["mesh_version"]);
            }
        }
        Cmd::Nodes(NodesCmd::Revoke { name }) => {
            let v = client
                .post(&format!("/nodes/{}/revoke", enc(&name)), json!({}))
                .await?;
            if raw {
                print(&v)
            } else {
                println!(
                    "revoked {name} ({} certificate serials on the deny list)",
                    v["revoked_serials"].as_array().map(Vec::len).unwrap_or(0)
                )
            }
        }
        Cmd::Nodes(NodesCmd::Relay { name, withdraw }) => {
            let v = client
                .post(
                    &format!("/nodes/{}/relay", enc(&name)),
                    json!({ "grant": !withdraw }),
                )
                .await?;
            if raw {
                print(&v)
            } else if withdraw {
                println!("{name} is no longer a relay")
            } else {
                println!("{name} may relay (advertised while its config says relay = true)")
            }
        }
        Cmd::Wg(WgCmd::Add {
            name,
            service,
            labels,
            ttl,
            public_key,
            gateways,
        }) => {
            let ttl_secs = match ttl {
                Some(t) => Some(duration_secs(&t, "ttl").map_err(AdminError::Usage)?),
                None => None,
            };
            let v = client
                .post(
                    "/wg",
                    json!({
                        "name": name,
                        "service": service,
                        "labels": label_map(&labels)?,
                        "ttl_secs": ttl_secs,
                        "public_key": public_key,
                        "gateways": gateways,
                    }),
                )
                .await?;
            if raw {
                print(&v)
            } else {
                print!("{}", v["config"].as_str().unwrap_or_default());
                if !v["private_key"].is_null() {
                    eprintln!(
                        "the private key above is shown only this once: it is stored nowhere"
                    );
                }
            }
        }
        Cmd::Wg(WgCmd::List) => {
            let v = client.get("/wg").await?;
            if raw {
                print(&v)
            } else {
                println!(
                    "{:<20} {:<8} {:<14} {:<18} {:<16} KEY",
                    "CLIENT", "STATE", "SERVICE", "ADDRESS", "GATEWAYS"
                );
                let now = quicmesh_coordinator::mesh::now();
                for c in v["clients"].as_array().into_iter().flatten() {
                    let expires = c["expires_at"].as_i64().unwrap_or(0);
                    let state = if !c["revoked_at"].is_null() {
                        "revoked"
                    } else if expires != 0 && now >= expires {
                        "expired"
                    } else {
                        "active"
                    };
                    let first = |k: &str| {
                        c[k].as_array()
                            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                            .unwrap_or_default()
                    };
                    println!(
                        "{:<20} {:<8} {:<14} {:<18} {:<16} {}",
                        s(&c["name"]),
                        state,
                        s(&c["service"]),
                        c["addresses"].get(0).map(s).unwrap_or_default(),
                        first("gateways"),
                        s(&c["public_key"])
                    );
                }
            }
        }
        Cmd::Wg(WgCmd::Revoke { name }) => {
            let v = client
                .post(&format!("/wg/{}/revoke", enc(&name)), json!({}))
                .await?;
            if raw {
                print(&v)
            } else {
                println!("revoked WireGuard client {name}")
            }
        }
        Cmd::Services(ServicesCmd::List) => {
            let v = client.get("/services").await?;
            if raw {
                print(&v)
            } else {
                for (name, inst) in v["services"].as_object().into_iter().flatten() {
                    println!("{name}");
                    for i in inst.as_array().into_iter().flatten() {
                        let health = if i["online"] != true && i["routable"] != true {
                            "offline".to_string()
                        } else {
                            i["check"]["health"]
                                .as_str()
                                .map_or("passing (no check)".to_string(), |h| h.to_lowercase())
                        };
                        let locality = [
                            i["labels"]["datacenter"].as_str(),
                            i["labels"]["cloud"].as_str(),
                        ]
                        .iter()
                        .flatten()
                        .copied()
                        .collect::<Vec<_>>()
                        .join("/");
                        println!(
                            "  {:<20} {:<22} {:<18} {:<12} {}",
                            s(&i["node"]),
                            i["endpoint"].as_str().unwrap_or("-"),
                            health,
                            if locality.is_empty() { "-" } else { &locality },
                            i["check"]["output"].as_str().unwrap_or(""),
                        );
                    }
                }
            }
        }
        Cmd::Init { .. } | Cmd::Serve { .. } | Cmd::Dev { .. } => {}
    }
    Ok(())
}

/// Percent-encodes a query or path component.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
