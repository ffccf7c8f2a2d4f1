//! Real binaries as processes: build once, give each process a data dir and a log file,
//! start, SIGKILL, restart, and ask it things (CLI, admin socket, metrics).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::net::{free_tcp_port, free_udp_port, scrape};

/// Paths of the built binaries.
#[derive(Debug)]
pub struct Bins {
    pub coordinator: PathBuf,
    pub node: PathBuf,
}

impl Bins {
    /// Builds both binaries (once per test process) with the test's own profile and
    /// returns their paths, so tests never run a stale binary.
    pub fn get() -> &'static Bins {
        static BINS: OnceLock<Bins> = OnceLock::new();
        BINS.get_or_init(|| {
            let exe = std::env::current_exe().unwrap_or_default();
            // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (bench)
            let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            // Cargo gives a test process package-specific variables; passed on, they make
            // build scripts (ring's) look dirty and rebuild half the tree.
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy().to_string();
                let keep = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&k.as_str())
                    || k.starts_with("CARGO_BUILD_")
                    || k.starts_with("CARGO_PROFILE_")
                    || k.starts_with("CARGO_REGISTRIES_")
                    || k.starts_with("CARGO_NET_")
                    || k.starts_with("CARGO_HTTP_");
                if (k.starts_with("CARGO_") && !keep) || k == "OUT_DIR" || k.starts_with("__CARGO")
                {
                    cmd.env_remove(&k);
                }
            }
            cmd.args([
                "build",
                "--quiet",
                "-p",
                "quicmesh-coordinator",
                "-p",
                "quicmesh-node",
                "--bins",
            ]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let t = Instant::now();
            let status = cmd.status();
            eprintln!("harness: built the quicmesh binaries in {:?}", t.elapsed());
            assert!(
                status.as_ref().is_ok_and(|s| s.success()),
                "building the quicmesh binaries failed: {status:?}"
            );
            Bins {
                coordinator: dir.join("quicmesh-coordinator"),
                node: dir.join("quicmesh-node"),
            }
        })
    }
}

/// The patience factor for timeouts (`QUICMESH_TEST_PATIENCE`, default 1).
pub fn patience() -> f64 {
    std::env::var("QUICMESH_TEST_PATIENCE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// Polls `f` until it returns `Ok`, for at most `within` (times the patience factor).
/// Returns how long it took; panics with the last error otherwise.
pub fn assert_eventually<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> (T, Duration) {
    let start = Instant::now();
    let deadline = within.mul_f64(patience());
    loop {
        match f() {
            Ok(v) => return (v, start.elapsed()),
            Err(e) if start.elapsed() > deadline => {
                panic!("{what}: not true within {deadline:?}: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A test's working dir: every process's data dir and log lives under it. Kept (and
/// printed) when the test fails.
#[derive(Debug)]
pub struct Mesh {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Mesh {
    /// A fresh working dir named after the test.
    pub fn new(test: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("quicmesh-{test}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().to_path_buf();
        Self {
            dir: Some(dir),
            path,
        }
    }

    /// The working dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the working dir after this value is dropped (a benchmark that failed says
    /// where its logs are).
    pub fn keep(&mut self) -> &Path {
        if let Some(d) = self.dir.take() {
            let _ = d.keep();
        }
        &self.path
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // QUICMESH_TEST_KEEP=1 keeps them after a pass too (to read a passing run's logs).
        if std::thread::panicking() || std::env::var_os("QUICMESH_TEST_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                let kept = d.keep();
                eprintln!("logs and data dirs kept in {}", kept.display());
            }
        }
    }
}

/// A command for `bin`, run inside namespace `netns` when given.
pub fn command(netns: Option<&str>, bin: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

fn spawn_logged(
    netns: Option<&str>,
    bin: &Path,
    args: &[&str],
    log: &Path,
    envs: &[(&str, &str)],
) -> anyhow::Result<Child> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| log.display().to_string())?;
    let err = out.try_clone()?;
    let mut cmd = command(netns, bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // QUICMESH_TEST_LOG overrides the processes' log filter (e.g. to debug a test).
        .env(
            "QUICMESH_LOG",
            std::env::var("QUICMESH_TEST_LOG").unwrap_or_else(|_| "info,quinn=warn".into()),
        );
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("spawn {}", bin.display()))
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // SIGKILL by PID of a process this harness started.
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Where a coordinator runs: a namespace (None: this host) and the IP it listens on there.
#[derive(Clone, Debug)]
pub struct Place {
    pub netns: Option<String>,
    pub ip: std::net::IpAddr,
}

impl Place {
    /// `n` places on this host's loopback.
    pub fn loopback(n: usize) -> Vec<Place> {
        vec![
            Place {
                netns: None,
                ip: [127, 0, 0, 1].into(),
            };
            n
        ]
    }

    /// Namespace `ns`, listening on `ip`.
    pub fn ns(ns: &str, ip: std::net::IpAddr) -> Self {
        Place {
            netns: Some(ns.to_string()),
            ip,
        }
    }
}

/// A `quicmesh-coordinator serve` process.
#[derive(Debug)]
pub struct CoordinatorProc {
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub control_port: u16,
    pub http_port: u16,
    pub admin_token: String,
    pub cert_ttl: String,
    /// The namespace it runs in (None: this host) and its control IP there.
    pub netns: Option<String>,
    pub ip: std::net::IpAddr,
    /// More `serve` flags.
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

impl CoordinatorProc {
    /// [`CoordinatorProc::start`] with more `serve` flags.
    pub fn start_with(mesh: &Mesh, cert_ttl: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_full(
            mesh,
            cert_ttl,
            None,
            [127, 0, 0, 1].into(),
            free_udp_port(),
            free_tcp_port(),
            args,
        )
    }

    /// Replicas serving one PostgreSQL database (`store_url`), one per place: the first
    /// runs `init --store`, the others get its CA and tokens (the files an operator copies
    /// to a new replica's data dir) and make their own reset key and replica id.
    pub fn start_replicas(
        mesh: &Mesh,
        cert_ttl: &str,
        store_url: &str,
        places: &[Place],
        args: &[&str],
    ) -> anyhow::Result<Vec<Self>> {
        let first_dir = mesh.path().join("coordinator-0");
        let first = places.first().context("no place for a replica")?;
        let out = command(first.netns.as_deref(), &Bins::get().coordinator)
            .args(["init", "--data-dir"])
            .arg(&first_dir)
            .args(["--store", store_url])
            .output()?;
        if !out.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut all: Vec<Self> = Vec::new();
        for (i, place) in places.iter().enumerate() {
            let data_dir = mesh.path().join(format!("coordinator-{i}"));
            if let Some(first) = all.first() {
                fs::create_dir_all(&data_dir)?;
                for f in ["ca.key", "ca.crt", "admin.token", "reader.token", "store"] {
                    fs::copy(first.data_dir.join(f), data_dir.join(f))?;
                }
            }
            all.push(Self::replica_at(
                mesh, &data_dir, i, place, cert_ttl, store_url, args,
            )?);
        }
        Ok(all)
    }

    fn replica_at(
        mesh: &Mesh,
        data_dir: &Path,
        i: usize,
        place: &Place,
        cert_ttl: &str,
        store_url: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let admin_token = fs::read_to_string(data_dir.join("admin.token"))?
            .trim()
            .to_string();
        let mut extra: Vec<String> = vec!["--store".into(), store_url.into()];
        extra.extend(args.iter().map(|a| a.to_string()));
        // In a namespace of its own a replica has the host's usual ports.
        let (control_port, http_port) = match place.netns {
            Some(_) => (7700, 7780),
            None => (free_udp_port(), free_tcp_port()),
        };
        let mut c = Self {
            data_dir: data_dir.to_path_buf(),
            log: mesh.path().join(format!("coordinator-{i}.log")),
            control_port,
            http_port,
            admin_token,
            cert_ttl: cert_ttl.to_string(),
            netns: place.netns.clone(),
            ip: place.ip,
            extra_args: extra,
            child: None,
        };
        c.restart()?;
        Ok(c)
    }

    /// Runs `init` in `<mesh>/coordinator` and starts `serve`.
    pub fn start(mesh: &Mesh, cert_ttl: &str) -> anyhow::Result<Self> {
        Self::start_at(
            mesh,
            cert_ttl,
            None,
            [127, 0, 0, 1].into(),
            free_udp_port(),
            free_tcp_port(),
        )
    }

    /// Runs `init` and `serve` inside namespace `ns`, control on `ip:7700`, API on its
    /// loopback.
    pub fn start_in(
        mesh: &Mesh,
        cert_ttl: &str,
        ns: &str,
        ip: std::net::IpAddr,
    ) -> anyhow::Result<Self> {
        Self::start_at(mesh, cert_ttl, Some(ns.to_string()), ip, 7700, 7780)
    }

    /// [`CoordinatorProc::start_in`] with extra `serve` arguments (e.g. `--no-relay`).
    pub fn start_in_with(
        mesh: &Mesh,
        cert_ttl: &str,
        ns: &str,
        ip: std::net::IpAddr,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_full(mesh, cert_ttl, Some(ns.to_string()), ip, 7700, 7780, args)
    }

    fn start_at(
        mesh: &Mesh,
        cert_ttl: &str,
        netns: Option<String>,
        ip: std::net::IpAddr,
        control_port: u16,
        http_port: u16,
    ) -> anyhow::Result<Self> {
        Self::start_full(mesh, cert_ttl, netns, ip, control_port, http_port, &[])
    }

    fn start_full(
        mesh: &Mesh,
        cert_ttl: &str,
        netns: Option<String>,
        ip: std::net::IpAddr,
        control_port: u16,
        http_port: u16,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let data_dir = mesh.path().join("coordinator");
        let log = mesh.path().join("coordinator.log");
        let bins = Bins::get();
        let out = Command::new(&bins.coordinator)
            .args(["init", "--data-dir"])
            .arg(&data_dir)
            .output()?;
        if !out.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let admin_token = fs::read_to_string(data_dir.join("admin.token"))?
            .trim()
            .to_string();
        let mut c = Self {
            data_dir,
            log,
            control_port,
            http_port,
            admin_token,
            cert_ttl: cert_ttl.to_string(),
            netns,
            ip,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        c.restart()?;
        Ok(c)
    }

    /// The control address nodes dial.
    pub fn control_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.control_port)
    }

    /// Starts `serve` again from the same data dir and ports; waits for the API.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        kill_child(&mut self.child);
        let listen = self.control_addr().to_string();
        let http = format!("127.0.0.1:{}", self.http_port);
        let dd = self.data_dir.display().to_string();
        let mut args = vec![
            "serve",
            "--data-dir",
            &dd,
            "--listen",
            &listen,
            "--http",
            &http,
            "--cert-ttl",
            &self.cert_ttl,
        ];
        args.extend(self.extra_args.iter().map(String::as_str));
        self.child = Some(spawn_logged(
            self.netns.as_deref(),
            &Bins::get().coordinator,
            &args,
            &self.log,
            &[],
        )?);
        assert_eventually("coordinator api up", Duration::from_secs(15), || {
            self.json(&["nodes", "list"]).map(|_| ())
        });
        Ok(())
    }

    /// The mesh CA certificate (DER), read from the data dir.
    pub fn ca_der(&self) -> anyhow::Result<Vec<u8>> {
        let pem = fs::read_to_string(self.data_dir.join("ca.crt"))?;
        Ok(pem::parse(pem)?.into_contents())
    }

    /// The coordinator process's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILLs the coordinator.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Runs an admin CLI command against this coordinator.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(command(self.netns.as_deref(), &Bins::get().coordinator)
            .args(["--api", &format!("http://127.0.0.1:{}", self.http_port)])
            .args(args)
            .env("QUICMESH_ADMIN_TOKEN", &self.admin_token)
            .output()?)
    }

    /// `GET /api/v1/<path>` with the admin token, parsed as JSON (from this host, or
    /// from inside the coordinator's namespace).
    pub fn api_get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.api_text(path)?)?)
    }

    /// `GET /api/v1/<path>` with the admin token: the body of a 200 answer.
    pub fn api_text(&self, path: &str) -> anyhow::Result<String> {
        let port = self.http_port;
        let token = self.admin_token.clone();
        let path = path.to_string();
        let get = move || -> anyhow::Result<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET /api/v1/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        };
        let out = match &self.netns {
            Some(ns) => crate::topo::in_ns(ns, get)??,
            None => get()?,
        };
        let (head, body) = out.split_once("\r\n\r\n").context("no http body")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET {}: {}", head.lines().next().unwrap_or(""), body);
        }
        Ok(body.to_string())
    }

    /// Runs an admin command with `--json` and parses its output.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.cli(&a)?;
        if !out.status.success() {
            bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until `n` unrevoked nodes are online and have acked the current mesh version;
    /// returns how long that took.
    pub fn wait_all_acked(&self, n: usize, within: Duration) -> Duration {
        assert_eventually(
            "every node online and acked the latest snapshot",
            within,
            || {
                let v = self.json(&["nodes", "list"])?;
                let version = v["mesh_version"].as_u64().unwrap_or(0);
                let nodes: Vec<_> = v["nodes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|n| n["revoked_at"].is_null())
                    .collect();
                if nodes.len() != n {
                    bail!("{} nodes, want {n}", nodes.len());
                }
                for node in &nodes {
                    if node["online"] != true {
                        bail!("{} offline", node["name"]);
                    }
                    if node["acked_version"].as_u64() != Some(version) {
                        bail!(
                            "{} acked {} of {version}",
                            node["name"],
                            node["acked_version"]
                        );
                    }
                }
                Ok(())
            },
        )
        .1
    }

    /// `token create` for a node and its services; returns the token line.
    pub fn token(&self, node: &str, services: &[&str], ttl: &str) -> anyhow::Result<String> {
        self.token_with(node, services, &[], ttl)
    }

    /// `token create` allowing `labels` (`key=value`) too.
    pub fn token_with(
        &self,
        node: &str,
        services: &[&str],
        labels: &[String],
        ttl: &str,
    ) -> anyhow::Result<String> {
        self.token_granting(node, services, labels, false, ttl)
    }

    /// `token create` with `labels`, granting the relay role when `relay`.
    pub fn token_granting(
        &self,
        node: &str,
        services: &[&str],
        labels: &[String],
        relay: bool,
        ttl: &str,
    ) -> anyhow::Result<String> {
        let mut a = vec!["token", "create", "--node", node, "--ttl", ttl];
        if relay {
            a.push("--relay");
        }
        for s in services {
            a.extend_from_slice(&["--service", s]);
        }
        for l in labels {
            a.extend_from_slice(&["--label", l]);
        }
        let out = self.cli(&a)?;
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// Applies a policy file given as text; returns the CLI output.
    pub fn apply_policy(&self, mesh: &Mesh, text: &str) -> anyhow::Result<Output> {
        let p = mesh
            .path()
            .join(format!("policy-{}.toml", rand::random::<u32>()));
        fs::write(&p, text)?;
        self.cli(&["policy", "apply", &p.display().to_string()])
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// What a node offers and consumes.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    pub name: String,
    /// (service, local address)
    pub services: Vec<(String, SocketAddr)>,
    /// Mesh services consumed: one upstream listener each, on a free loopback port.
    pub upstreams: Vec<String>,
    pub check_egress: bool,
    /// The namespace (test host) the node runs in; None: this host, on loopback.
    pub netns: Option<String>,
    /// Overlay-only services: (service, port specs like "tcp/5201").
    pub overlay_services: Vec<(String, Vec<String>)>,
    /// `[overlay] enabled = true` with this TUN device name.
    pub overlay: Option<String>,
    /// Extra top-level config lines (e.g. `worker_threads = 1`).
    pub extra: Vec<String>,
    /// Node labels (claimed with the join token too).
    pub labels: Vec<(String, String)>,
    /// (service, inline check table) e.g. `{ tcp = "127.0.0.1:80", interval = "1s" }`.
    pub checks: Vec<(String, String)>,
    /// Runs the DNS server on a free loopback port (address in `status`).
    pub dns: bool,
    /// `[dns] forward`: the resolver for names outside the mesh.
    pub dns_forward: Option<SocketAddr>,
    /// `relay = true`, with the join token granting the role.
    pub relay: bool,
    /// The `coordinator` list, when not just the coordinator the node is started with.
    pub coordinators: Option<Vec<String>>,
    /// Extra lines for a `[[service]]` (service, line), e.g. `protocol = "http"`.
    pub service_lines: Vec<(String, String)>,
    /// Extra lines for an `[[upstream]]` (index in `upstreams`, line).
    pub upstream_lines: Vec<(usize, String)>,
    /// Whole tables appended to the config (e.g. `[gateway.wireguard]` and its keys).
    pub sections: Vec<String>,
    /// The tunnel port (default: a free one the node picks).
    pub listen_port: Option<u16>,
    /// The node's log filter (`QUICMESH_LOG`), when not the default; `QUICMESH_TEST_LOG`
    /// still wins.
    pub log_filter: Option<String>,
}

impl NodeSpec {
    /// A node named `name` with egress checks on (the default).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            check_egress: true,
            ..Default::default()
        }
    }
    /// Appends a table (its header and keys) to the config.
    pub fn section(mut self, text: &str) -> Self {
        self.sections.push(text.into());
        self
    }
    /// Adds a hosted service.
    pub fn service(mut self, name: &str, addr: SocketAddr) -> Self {
        self.services.push((name.into(), addr));
        self
    }
    /// Adds an upstream.
    pub fn upstream(mut self, service: &str) -> Self {
        self.upstreams.push(service.into());
        self
    }
    /// Adds an upstream with extra lines (`protocol = "http"`, ...).
    pub fn upstream_with(mut self, service: &str, lines: &[&str]) -> Self {
        let i = self.upstreams.len();
        self.upstreams.push(service.into());
        self.upstream_lines
            .extend(lines.iter().map(|l| (i, l.to_string())));
        self
    }
    /// Adds a hosted service with extra lines (`protocol = "http"`, ...).
    pub fn service_with(mut self, name: &str, addr: SocketAddr, lines: &[&str]) -> Self {
        self.services.push((name.into(), addr));
        self.service_lines
            .extend(lines.iter().map(|l| (name.to_string(), l.to_string())));
        self
    }
    /// Lists these coordinator addresses (ip:port or host:port) instead of the one the
    /// node is started with.
    pub fn coordinators(mut self, addrs: &[&str]) -> Self {
        self.coordinators = Some(addrs.iter().map(|a| a.to_string()).collect());
        self
    }
    /// Runs the node inside namespace `ns`, its tunnel on all of that host's addresses.
    pub fn on(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }
    /// Adds a top-level config line.
    pub fn config_line(mut self, line: &str) -> Self {
        self.extra.push(line.into());
        self
    }
    /// Runs overlay mode with TUN device `device`.
    pub fn overlay(mut self, device: &str) -> Self {
        self.overlay = Some(device.into());
        self
    }
    /// Adds a service reached through the overlay on `ports` ("tcp/5201", "icmp", ...).
    pub fn overlay_service(mut self, name: &str, ports: &[&str]) -> Self {
        self.overlay_services
            .push((name.into(), ports.iter().map(|p| p.to_string()).collect()));
        self
    }
    /// Every service the node hosts (for its join token).
    pub fn all_services(&self) -> Vec<&str> {
        self.services
            .iter()
            .map(|(s, _)| s.as_str())
            .chain(self.overlay_services.iter().map(|(s, _)| s.as_str()))
            .collect()
    }
    /// Adds a label (the join token allows it).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }
    /// Health-checks `service` with `check`, an inline TOML table.
    pub fn check(mut self, service: &str, check: &str) -> Self {
        self.checks.push((service.into(), check.into()));
        self
    }
    /// Runs the node's DNS server.
    pub fn dns(mut self) -> Self {
        self.dns = true;
        self
    }
    /// Runs the node's DNS server, forwarding names outside the mesh to `resolver`.
    pub fn dns_forwarding_to(mut self, resolver: SocketAddr) -> Self {
        self.dns = true;
        self.dns_forward = Some(resolver);
        self
    }
    /// Listens for tunnels on `port` (e.g. to advertise it).
    pub fn listen_port(mut self, port: u16) -> Self {
        self.listen_port = Some(port);
        self
    }
    /// Logs with this filter (e.g. debug for the modules a test reads back on failure).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.into());
        self
    }
    /// Relays for other nodes: `relay = true`, and a join token granting the role.
    pub fn relay(mut self) -> Self {
        self.relay = true;
        self.extra.push("relay = true".into());
        self
    }
    /// Turns the sender-side policy check off (ingress stays authoritative).
    pub fn no_egress_check(mut self) -> Self {
        self.check_egress = false;
        self
    }
}

/// A `quicmesh-node run` process.
#[derive(Debug)]
pub struct NodeProc {
    pub name: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub metrics_port: u16,
    /// UDP port of the tunnel endpoint.
    pub listen_port: u16,
    /// service -> local upstream port
    pub upstreams: Vec<(String, u16)>,
    /// Port of the DNS server (0 until started).
    pub dns_port: u16,
    spec: NodeSpec,
    /// The `coordinator` value, as TOML.
    coordinator: String,
    token: String,
    child: Option<Child>,
}

impl NodeProc {
    /// Writes the node's config (with `token`) under the mesh dir; does not start it.
    pub fn configure(
        mesh: &Mesh,
        coord: &CoordinatorProc,
        spec: &NodeSpec,
        token: &str,
    ) -> anyhow::Result<Self> {
        let n = Self {
            name: spec.name.clone(),
            data_dir: mesh.path().join(&spec.name),
            config: mesh.path().join(format!("{}.toml", spec.name)),
            log: mesh.path().join(format!("{}.log", spec.name)),
            // Port 0 everywhere: the node picks free ports (no races between parallel
            // tests) and reports them in `status`; they are then pinned in the config so
            // a restart keeps them, as in production.
            metrics_port: 0,
            listen_port: spec.listen_port.unwrap_or(0),
            upstreams: spec.upstreams.iter().map(|s| (s.clone(), 0)).collect(),
            dns_port: 0,
            spec: spec.clone(),
            coordinator: match &spec.coordinators {
                None => format!("\"{}\"", coord.control_addr()),
                Some(list) => format!(
                    "[{}]",
                    list.iter()
                        .map(|a| format!("\"{a}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            token: token.to_string(),
            child: None,
        };
        n.write_config()?;
        Ok(n)
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let mut t = format!(
            "name = \"{}\"\ncoordinator = {}\njoin_token = \"{}\"\ndata_dir = \"{}\"\nlisten = \"{}:{}\"\nmetrics = \"127.0.0.1:{}\"\nstatus_interval = \"1s\"\n\n[policy]\ncheck_egress = {}\n",
            self.spec.name,
            self.coordinator,
            self.token,
            self.data_dir.display(),
            if self.spec.netns.is_some() { "0.0.0.0" } else { "127.0.0.1" },
            self.listen_port,
            self.metrics_port,
            self.spec.check_egress
        );
        // Top-level keys must come before the first table.
        for line in &self.spec.extra {
            t = format!("{line}\n{t}");
        }
        if !self.spec.labels.is_empty() {
            let l: Vec<String> = self
                .spec
                .labels
                .iter()
                .map(|(k, v)| format!("{k} = \"{v}\""))
                .collect();
            t = format!("labels = {{ {} }}\n{t}", l.join(", "));
        }
        for (s, a) in &self.spec.services {
            t.push_str(&format!(
                "\n[[service]]\nname = \"{s}\"\naddress = \"{a}\"\n"
            ));
            if let Some((_, c)) = self.spec.checks.iter().find(|(cs, _)| cs == s) {
                t.push_str(&format!("check = {c}\n"));
            }
            for (_, l) in self.spec.service_lines.iter().filter(|(n, _)| n == s) {
                t.push_str(&format!("{l}\n"));
            }
        }
        if self.spec.dns {
            t.push_str(&format!(
                "\n[dns]\nlisten = \"127.0.0.1:{}\"\n",
                self.dns_port
            ));
            if let Some(f) = self.spec.dns_forward {
                t.push_str(&format!("forward = \"{f}\"\n"));
            }
        }
        for (s, ports) in &self.spec.overlay_services {
            let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
            t.push_str(&format!(
                "\n[[service]]\nname = \"{s}\"\nports = [{}]\n",
                ports.join(", ")
            ));
        }
        for (i, (s, p)) in self.upstreams.iter().enumerate() {
            t.push_str(&format!(
                "\n[[upstream]]\nservice = \"{s}\"\nbind = \"127.0.0.1:{p}\"\n"
            ));
            for (_, l) in self.spec.upstream_lines.iter().filter(|(j, _)| *j == i) {
                t.push_str(&format!("{l}\n"));
            }
        }
        if let Some(dev) = &self.spec.overlay {
            t.push_str(&format!(
                "\n[overlay]\nenabled = true\ndevice = \"{dev}\"\n"
            ));
        }
        for section in &self.spec.sections {
            t.push_str(&format!("\n{section}\n"));
        }
        fs::write(&self.config, t)?;
        Ok(())
    }

    /// Reads the ports the node picked and pins them in its config.
    fn pin_ports(&mut self) -> anyhow::Result<()> {
        let st = self.status()?;
        let port = |v: &serde_json::Value| -> anyhow::Result<u16> {
            let a: SocketAddr = v.as_str().context("address missing in status")?.parse()?;
            Ok(a.port())
        };
        self.listen_port = port(&st["tunnel_listen"])?;
        self.metrics_port = port(&st["metrics"])?;
        if self.spec.dns {
            self.dns_port = port(&st["dns"])?;
        }
        for (i, u) in st["upstreams"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(slot) = self.upstreams.get_mut(i) {
                slot.1 = port(&u["bind"])?;
            }
        }
        self.write_config()
    }

    /// Configures and starts a node, waiting until it serves.
    pub fn start(mesh: &Mesh, coord: &CoordinatorProc, spec: &NodeSpec) -> anyhow::Result<Self> {
        let labels: Vec<String> = spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let token =
            coord.token_granting(&spec.name, &spec.all_services(), &labels, spec.relay, "10m")?;
        let mut n = Self::configure(mesh, coord, spec, &token)?;
        n.restart()?;
        Ok(n)
    }

    /// Runs the node to completion (for enrollment that must fail) and returns its output.
    pub fn run_to_exit(&self, within: Duration) -> anyhow::Result<Output> {
        let mut child = command(self.spec.netns.as_deref(), &Bins::get().node)
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let start = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                return Ok(child.wait_with_output()?);
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!(
                    "node kept running: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// (Re)starts the node from its data dir and waits until its admin socket answers.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        kill_child(&mut self.child);
        let cfg = self.config.display().to_string();
        let filter = match (&self.spec.log_filter, std::env::var("QUICMESH_TEST_LOG")) {
            (Some(f), Err(_)) => vec![("QUICMESH_LOG", f.as_str())],
            _ => vec![],
        };
        self.child = Some(spawn_logged(
            self.spec.netns.as_deref(),
            &Bins::get().node,
            &["run", "--config", &cfg],
            &self.log,
            &filter,
        )?);
        let child = &mut self.child;
        assert_eventually(
            &format!("node {} serving", self.name),
            Duration::from_secs(15),
            || {
                if let Some(c) = child.as_mut() {
                    if let Some(status) = c.try_wait()? {
                        bail!("node exited: {status}");
                    }
                }
                status_of(&self.config).map(|_| ())
            },
        );
        // First start (some port still 0, the tunnel's unless given): pin what it picked.
        if self.listen_port == 0 || self.metrics_port == 0 {
            self.pin_ports()?;
        }
        Ok(())
    }

    /// Restarts the node on a new tunnel port (same identity, same data dir).
    pub fn restart_on_new_port(&mut self) -> anyhow::Result<()> {
        self.kill();
        let old = self.listen_port;
        // Port 0: the kernel picks, and may hand back the port just freed (seen in CI);
        // the scenario needs another one, so it asks again.
        for _ in 0..5 {
            self.listen_port = 0;
            self.write_config()?;
            self.restart()?;
            if self.listen_port != old {
                return Ok(());
            }
            self.kill();
        }
        bail!("the node came back on its old port {old} five times")
    }

    /// Runs `f` inside this node's host (loopback there reaches its upstreams).
    pub fn on_host<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        match &self.spec.netns {
            Some(ns) => crate::topo::in_ns(ns, f),
            None => Ok(f()),
        }
    }

    /// The namespace the node runs in (None: this host).
    pub fn netns(&self) -> Option<&str> {
        self.spec.netns.as_deref()
    }

    /// The address of the node's tunnel endpoint (from its status).
    pub fn tunnel_addr(&self) -> anyhow::Result<SocketAddr> {
        let st = self.status()?;
        Ok(st["tunnel_listen"]
            .as_str()
            .context("tunnel_listen missing in status")?
            .parse()?)
    }

    /// The node process's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILLs the node.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// The node's `status --json`.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        status_of(&self.config)
    }

    /// The node's overlay addresses from `status`, once its device is up (IPv4 first),
    /// waiting at most `within`; the error names the node and where its log is.
    pub fn overlay_addrs(&self, within: Duration) -> anyhow::Result<Vec<std::net::IpAddr>> {
        let t = std::time::Instant::now();
        loop {
            let mut addrs: Vec<std::net::IpAddr> = self
                .status()
                .ok()
                .and_then(|st| st["overlay"]["addresses"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|v| v.as_str()?.parse().ok())
                .collect();
            if !addrs.is_empty() {
                addrs.sort_by_key(|a: &std::net::IpAddr| a.is_ipv6());
                return Ok(addrs);
            }
            if t.elapsed() > within {
                bail!(
                    "{}'s overlay did not come up within {within:?} (log {})",
                    self.name,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The path this node's status reports to `peer` (`{via, remote, relay, rtt_ms,
    /// switches}`), null while it has no tunnel to it.
    pub fn path_to(&self, peer: &str) -> anyhow::Result<serde_json::Value> {
        let st = self.status()?;
        Ok(st["peers"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["node"] == peer))
            .map(|p| p["path"].clone())
            .unwrap_or_default())
    }

    /// The node's Prometheus metrics.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let port = self.metrics_port;
        match &self.spec.netns {
            Some(ns) => Ok(crate::topo::in_ns(ns, move || scrape(port))??),
            None => Ok(scrape(port)?),
        }
    }

    /// The local address of the upstream for `service`.
    pub fn upstream(&self, service: &str) -> SocketAddr {
        let port = self
            .upstreams
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, p)| *p)
            .unwrap_or(0);
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The local address of the `i`-th upstream (in the order they were added).
    pub fn upstream_at(&self, i: usize) -> SocketAddr {
        let port = self.upstreams.get(i).map_or(0, |(_, p)| *p);
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// `quicmesh-node status --json` of the node configured by `config`.
fn status_of(config: &Path) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(&Bins::get().node)
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()?;
    if !out.status.success() {
        bail!("status: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}
