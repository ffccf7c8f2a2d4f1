//! Network topologies made of Linux network namespaces, for tests that must cross real
//! hosts, routers and NATs.
//!
//! - a **host** is a namespace with one interface on a LAN and a default route;
//! - a **LAN** is a bridge inside a namespace of its own;
//! - a **router** is a namespace with an interface on each of its LANs and forwarding on,
//!   optionally NATing (MASQUERADE, or MASQUERADE `--random-fully` for port-dependent
//!   mapping) and with firewall rules;
//! - an **impaired link** joins two routers through a middle namespace where
//!   `quicmesh-impair` forwards frames in userspace with delay, jitter, loss, corruption,
//!   reordering and a rate limit, changeable mid-test (this kernel has no `sch_netem`).
//!
//! Every namespace is named `qmt<pid>-<test>-<name>`, deleted in `Drop`; namespaces left by
//! earlier runs (their pid no longer alive) are swept when a new [`Net`] starts. Addresses
//! are from 198.18.0.0/15 only.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use anyhow::{bail, Context};

/// How to run the suite when privileges are missing.
pub const PRIVILEGE_HELP: &str = "the netns tests need to create network namespaces: run them as root \
(e.g. `sudo -E cargo test -p quicmesh-netns-tests`), or in a user namespace with a private /run: \
`unshare --user --map-root-user --net --mount sh -c 'mount -t tmpfs none /run && cargo test -p quicmesh-netns-tests'`";

/// Fails (never skips) when this process cannot make namespaces, saying how to run.
pub fn require_privileges() -> anyhow::Result<()> {
    // Unique per call: tests of one binary run in parallel threads of one process.
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let probe = format!(
        "qmtprobe{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    let out = Command::new("ip").args(["netns", "add", &probe]).output();
    match out {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            for tool in ["iptables", "ethtool"] {
                if Command::new(tool).arg("--version").output().is_err() {
                    bail!(
                        "{tool} is not installed (`.ci/run` installs it: apt-get install {tool})"
                    );
                }
            }
            Ok(())
        }
        Ok(o) => bail!(
            "{PRIVILEGE_HELP}\n(ip netns add said: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => bail!("`ip` (iproute2) is not available: {e}; {PRIVILEGE_HELP}"),
    }
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("{cmd} {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command inside namespace `ns`.
pub fn exec(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    run("ip", &a)
}

/// A LAN: a bridge in a namespace of its own.
#[derive(Debug, Clone)]
pub struct Lan {
    pub ns: String,
    pub name: String,
    /// e.g. "198.18.1" for 198.18.1.0/24
    pub prefix: String,
    ports: std::sync::Arc<AtomicU32>,
}

impl Lan {
    /// The address `.host` on this LAN.
    pub fn addr(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }
}

/// The two-datacenter underlay most scenarios share (198.18.0.0/15 only):
///
/// ```text
///   dc1 198.18.1.0/24 --- r1 ===== impair (wan) ===== r2 --- dc2 198.18.2.0/24
///                         |
///   ctl 198.18.3.0/24 ----+          (routers at .1 on each LAN; WAN 198.18.100.0/30)
/// ```
#[derive(Debug)]
pub struct TwoDatacenters {
    pub dc1: Lan,
    pub dc2: Lan,
    pub ctl: Lan,
    pub r1: String,
    pub r2: String,
    /// The WAN impairment (see [`Net::impairment`]).
    pub wan: usize,
}

/// A running `quicmesh-impair` between two routers.
#[derive(Debug)]
pub struct Impairment {
    pub ns: String,
    config: PathBuf,
    child: Option<Child>,
}

impl Impairment {
    /// Changes the link now (the process re-reads its config within ~100 ms).
    pub fn set(&self, config: &str) -> anyhow::Result<()> {
        let tmp = self.config.with_extension("tmp");
        fs::write(&tmp, config)?;
        fs::rename(&tmp, &self.config)?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(())
    }
}

impl Drop for Impairment {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A test's network: the namespaces it made, removed when dropped.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    namespaces: Vec<String>,
    dir: PathBuf,
    pub impairments: Vec<Impairment>,
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces of earlier runs whose process is gone.
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("qmt") else {
            continue;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if pid.is_some_and(|p| !pid_alive(p) || p == 0) {
            kill_in_ns(name);
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// SIGKILLs every process left in namespace `ns` (only our own test namespaces).
fn kill_in_ns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(p) = pid.parse::<i32>() {
                let _ = Command::new("kill").args(["-9", &p.to_string()]).output();
            }
        }
    }
}

/// Test underlays use 198.18.0.0/15 and nothing else.
fn check_underlay(prefix: &str) -> anyhow::Result<()> {
    if !prefix.starts_with("198.18.") && !prefix.starts_with("198.19.") {
        bail!("test underlays use 198.18.0.0/15 only, not {prefix}");
    }
    Ok(())
}

impl Net {
    /// A new network for `test` (short, unique per test in the process); `dir` keeps
    /// impairment configs.
    pub fn new(test: &str, dir: &Path) -> anyhow::Result<Self> {
        require_privileges()?;
        sweep_stale();
        Ok(Self {
            prefix: format!("qmt{}-{test}", std::process::id()),
            namespaces: Vec::new(),
            dir: dir.to_path_buf(),
            impairments: Vec::new(),
        })
    }

    /// Full name of this network's namespace `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<String> {
        let ns = self.ns(name);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A LAN `prefix.0/24` (prefix like "198.18.1").
    pub fn lan(&mut self, name: &str, prefix: &str) -> anyhow::Result<Lan> {
        check_underlay(prefix)?;
        let ns = self.add_ns(&format!("lan-{name}"))?;
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        Ok(Lan {
            ns,
            name: name.into(),
            prefix: prefix.into(),
            ports: Default::default(),
        })
    }

    /// Plugs namespace `ns` into `lan` as interface `ifname` with address `.host`.
    fn plug(&self, ns: &str, ifname: &str, lan: &Lan, host: u8) -> anyhow::Result<()> {
        let port = format!("p{}", lan.ports.fetch_add(1, Ordering::Relaxed));
        ip(&[
            "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", &port, "netns",
            &lan.ns,
        ])?;
        ip(&["-n", &lan.ns, "link", "set", &port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", lan.addr(host)),
            "dev",
            ifname,
        ])?;
        ip(&["-n", ns, "link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Two hosts joined by one veth pair (no bridge): `a` at `prefix.1/24`, `b` at
    /// `prefix.2/24`, each on its `eth0`. The shortest path two namespaces can have.
    pub fn pair(&mut self, a: &str, b: &str, prefix: &str) -> anyhow::Result<(String, String)> {
        check_underlay(prefix)?;
        let na = self.add_ns(a)?;
        let nb = self.add_ns(b)?;
        self.link((&na, "eth0"), (&nb, "eth0"), prefix)?;
        Ok((na, nb))
    }

    /// A namespace with nothing but `lo`, for [`Net::link`] to wire.
    pub fn bare(&mut self, name: &str) -> anyhow::Result<String> {
        self.add_ns(name)
    }

    /// Joins two existing namespaces by a veth pair: `(ns, interface)` of `a` at
    /// `prefix.1/24`, of `b` at `prefix.2/24`.
    pub fn link(&self, a: (&str, &str), b: (&str, &str), prefix: &str) -> anyhow::Result<()> {
        check_underlay(prefix)?;
        ip(&[
            "link", "add", a.1, "netns", a.0, "type", "veth", "peer", "name", b.1, "netns", b.0,
        ])?;
        for ((ns, ifname), host) in [(a, 1), (b, 2)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{prefix}.{host}/24"),
                "dev",
                ifname,
            ])?;
            ip(&["-n", ns, "link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// A host on `lan` at `.host`, default route via `.gw` when given.
    pub fn host(
        &mut self,
        name: &str,
        lan: &Lan,
        host: u8,
        gw: Option<u8>,
    ) -> anyhow::Result<String> {
        let ns = self.add_ns(name)?;
        self.plug(&ns, "eth0", lan, host)?;
        if let Some(g) = gw {
            ip(&["-n", &ns, "route", "add", "default", "via", &lan.addr(g)])?;
        }
        Ok(ns)
    }

    /// A router with one leg `(lan, .host)` per LAN, interfaces eth0, eth1, ...
    pub fn router(&mut self, name: &str, legs: &[(&Lan, u8)]) -> anyhow::Result<String> {
        let ns = self.add_ns(name)?;
        exec(&ns, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        for (i, (lan, host)) in legs.iter().enumerate() {
            self.plug(&ns, &format!("eth{i}"), lan, *host)?;
        }
        Ok(ns)
    }

    /// Adds a route in `ns`.
    pub fn route(&self, ns: &str, dst: &str, via: &str) -> anyhow::Result<()> {
        ip(&["-n", ns, "route", "add", dst, "via", via])
    }

    /// NATs everything leaving `ns` through `out_if` (MASQUERADE; `--random-fully` for a
    /// port-dependent mapping).
    pub fn masquerade(&self, ns: &str, out_if: &str, random_fully: bool) -> anyhow::Result<()> {
        let mut a = vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            out_if,
            "-j",
            "MASQUERADE",
        ];
        if random_fully {
            a.push("--random-fully");
        }
        exec(ns, &a)
    }

    /// Makes router `nat` (legs: eth0 inside, eth1 outside) a NAT gateway: MASQUERADE out of
    /// eth1 (`random_fully`: a new random port per destination, a port-dependent mapping),
    /// and unsolicited packets from outside dropped, as home and cloud NAT gateways do.
    /// (Without that, a peer's first packet, arriving before this side's own packet left, is
    /// delivered to the router itself, and its conntrack entry takes the tuple this side's
    /// mapping needs: Linux then maps to another port and punching fails.)
    pub fn nat_gateway(&self, nat: &str, random_fully: bool) -> anyhow::Result<()> {
        self.masquerade(nat, "eth1", random_fully)?;
        self.iptables(
            nat,
            &[
                "-A",
                "INPUT",
                "-i",
                "eth1",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "DROP",
            ],
        )
    }

    /// Makes router `nat` a Linux NAT with the default INPUT policy, as a Linux box or a
    /// cloud NAT instance set up by the book is: MASQUERADE out of eth1, unsolicited
    /// packets from outside not forwarded, but those addressed to the router itself
    /// accepted (and their conntrack entries kept). INPUT counts what it takes from eth1.
    pub fn linux_nat(&self, nat: &str) -> anyhow::Result<()> {
        self.masquerade(nat, "eth1", false)?;
        self.iptables(
            nat,
            &[
                "-A",
                "FORWARD",
                "-i",
                "eth1",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW,INVALID",
                "-j",
                "DROP",
            ],
        )?;
        self.iptables(
            nat,
            &["-A", "INPUT", "-i", "eth1", "-p", "udp", "-j", "ACCEPT"],
        )
    }

    /// UDP packets router `nat` took for itself from outside (see [`Net::linux_nat`]).
    pub fn nat_input_udp(&self, nat: &str) -> u64 {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", nat, "iptables", "-n", "-v", "-x", "-L", "INPUT",
            ])
            .output();
        out.ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    // The protocol shows as `udp` or `17`, by iptables version.
                    .find(|l| l.contains("ACCEPT") && l.contains("eth1"))
                    .and_then(|l| l.split_whitespace().next().map(str::to_string))
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Router `nat` stops (`add`) or resumes forwarding packets to `dst`.
    pub fn drop_forward_to(&self, nat: &str, dst: &str, add: bool) {
        let op = if add { "-I" } else { "-D" };
        self.iptables(nat, &[op, "FORWARD", "-d", dst, "-j", "DROP"])
            .unwrap_or_else(|e| panic!("{nat}: {e:#}"));
    }

    /// Runs `iptables ARGS` in `ns` (e.g. a firewall rule).
    pub fn iptables(&self, ns: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut a = vec!["iptables"];
        a.extend_from_slice(args);
        exec(ns, &a)
    }

    /// Sets the MTU of `ifname` in `ns`.
    pub fn mtu(&self, ns: &str, ifname: &str, mtu: u32) -> anyhow::Result<()> {
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "dev",
            ifname,
            "mtu",
            &mtu.to_string(),
        ])
    }

    /// Builds [`TwoDatacenters`], the WAN impaired by `impair_bin` (no impairment yet).
    pub fn two_datacenters(&mut self, impair_bin: &Path) -> anyhow::Result<TwoDatacenters> {
        let dc1 = self.lan("dc1", "198.18.1")?;
        let dc2 = self.lan("dc2", "198.18.2")?;
        let ctl = self.lan("ctl", "198.18.3")?;
        let r1 = self.router("r1", &[(&dc1, 1), (&ctl, 1)])?;
        let r2 = self.router("r2", &[(&dc2, 1)])?;
        let wan = self.impaired_link("wan", &r1, &r2, "198.18.100", impair_bin)?;
        self.route(&r1, "198.18.2.0/24", "198.18.100.2")?;
        self.route(&r2, "198.18.1.0/24", "198.18.100.1")?;
        self.route(&r2, "198.18.3.0/24", "198.18.100.1")?;
        Ok(TwoDatacenters {
            dc1,
            dc2,
            ctl,
            r1,
            r2,
            wan,
        })
    }

    /// The impairment `impaired_link` returned index `i` for.
    pub fn impairment(&self, i: usize) -> &Impairment {
        &self.impairments[i]
    }

    /// Joins routers `a` and `b` with a point-to-point /30 `prefix.1`/`prefix.2` through an
    /// impairment namespace running `impair_bin`. The routers' interface is `wan`.
    pub fn impaired_link(
        &mut self,
        name: &str,
        a: &str,
        b: &str,
        prefix: &str,
        impair_bin: &Path,
    ) -> anyhow::Result<usize> {
        let mid = self.add_ns(&format!("imp-{name}"))?;
        for (router, local, host) in [(a, "l0", 1), (b, "l1", 2)] {
            ip(&[
                "link", "add", "wan", "netns", router, "type", "veth", "peer", "name", local,
                "netns", &mid,
            ])?;
            ip(&[
                "-n",
                router,
                "addr",
                "add",
                &format!("{prefix}.{host}/30"),
                "dev",
                "wan",
            ])?;
            for (ns, dev) in [(router, "wan"), (mid.as_str(), local)] {
                // Userspace forwarding sees whole frames with real checksums only when
                // segmentation and checksum offloads are off on both ends.
                exec(
                    ns,
                    &[
                        "ethtool", "-K", dev, "tx", "off", "rx", "off", "gso", "off", "tso", "off",
                        "gro", "off",
                    ],
                )?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
            }
            ip(&["-n", &mid, "link", "set", local, "promisc", "on"])?;
        }
        let config = self.dir.join(format!("impair-{name}.conf"));
        fs::write(&config, "")?;
        let log = fs::File::create(self.dir.join(format!("impair-{name}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &mid])
            .arg(impair_bin)
            .args(["l0", "l1"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.impairments.push(Impairment {
            ns: mid,
            config,
            child: Some(child),
        });
        Ok(self.impairments.len() - 1)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.impairments.clear();
        for ns in self.namespaces.iter().rev() {
            kill_in_ns(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Pings `to` from `ns` until one answer arrives (the first packets may dial a tunnel) or
/// `within` passes.
pub fn ping_until(ns: &str, to: std::net::IpAddr, within: std::time::Duration) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < within {
        if exec(ns, &["ping", "-c", "1", "-W", "1", &to.to_string()]).is_ok() {
            return true;
        }
    }
    false
}

/// A TCP echo service on `bind` in namespace `ns`.
pub fn tcp_echo_in(ns: &str, bind: std::net::SocketAddr) {
    in_ns(ns, move || {
        crate::net::echo_server_on(&bind.to_string()).unwrap()
    })
    .unwrap();
}

/// A UDP echo service on `bind` in namespace `ns`.
pub fn udp_echo_in(ns: &str, bind: std::net::SocketAddr) {
    in_ns(ns, move || {
        let s = std::net::UdpSocket::bind(bind).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        });
    })
    .unwrap();
}

/// One TCP round trip to an echo service at `addr` from namespace `ns` (3 s deadline).
pub fn echo_round_trip(ns: &str, addr: std::net::SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    in_ns(ns, move || -> std::io::Result<()> {
        let timeout = std::time::Duration::from_secs(3);
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"round trip")?;
        let mut b = [0u8; 10];
        s.read_exact(&mut b)?;
        Ok(())
    })
    .map_err(std::io::Error::other)?
}

/// Runs `f` on a thread inside namespace `ns`: sockets it creates belong to that host.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = PathBuf::from("/run/netns").join(ns);
    let handle = std::thread::spawn(move || -> anyhow::Result<T> {
        setns::enter(&path)?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", path_display(ns)))?
}

fn path_display(ns: &str) -> String {
    format!("netns {ns}")
}

#[allow(unsafe_code)]
mod setns {
    //! The one syscall that moves a thread into a network namespace.
    use std::os::fd::AsRawFd;
    use std::path::Path;

    pub fn enter(path: &Path) -> anyhow::Result<()> {
        let f =
            std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // SAFETY: setns on a valid fd; affects only the calling thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            anyhow::bail!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}
