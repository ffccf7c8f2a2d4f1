//! A stock WireGuard client for the gateway's tests and bench: `wireguard-go` with `wg`
//! and `ip` from the distribution, set up from a `wg-quick` configuration the way
//! wg-quick would, minus its resolvconf step.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A process started here, stopped (by its PID) when dropped.
#[derive(Debug)]
pub struct Daemon(Child);

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .with_context(|| format!("run {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The values of `key` in a wg-quick configuration's active lines (comma lists split).
pub fn config_values(config: &str, key: &str) -> Vec<String> {
    config
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .flat_map(|(_, v)| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Starts `wireguard-go` as `dev` in namespace `ns` and configures it from `config` (the
/// text `quicmesh-coordinator wg add` printed, or any wg-quick file): `wg-quick strip`,
/// `wg setconf`, its addresses, its MTU and a route per AllowedIPs prefix.
pub fn stock_client(ns: &str, dir: &Path, dev: &str, config: &str) -> anyhow::Result<Daemon> {
    let sock = Path::new("/var/run/wireguard").join(format!("{dev}.sock"));
    let _ = std::fs::remove_file(&sock);
    let log = std::fs::File::create(dir.join(format!("{dev}.log")))?;
    let daemon = Daemon(
        Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", dev])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("wireguard-go (apt-get install wireguard-go)")?,
    );
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("wireguard-go did not create {}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let conf = dir.join(format!("{dev}.conf"));
    std::fs::write(&conf, config)?;
    let stripped = run(ns, &["wg-quick", "strip", &conf.display().to_string()])?;
    let stripped_path = dir.join(format!("{dev}.stripped"));
    std::fs::write(&stripped_path, stripped)?;
    run(
        ns,
        &["wg", "setconf", dev, &stripped_path.display().to_string()],
    )?;
    for a in config_values(config, "Address") {
        run(ns, &["ip", "address", "add", &a, "dev", dev])?;
    }
    let mtu = config_values(config, "MTU")
        .first()
        .cloned()
        .unwrap_or("1420".into());
    run(ns, &["ip", "link", "set", dev, "mtu", &mtu, "up"])?;
    for p in config_values(config, "AllowedIPs") {
        run(ns, &["ip", "route", "add", &p, "dev", dev])?;
    }
    Ok(daemon)
}
