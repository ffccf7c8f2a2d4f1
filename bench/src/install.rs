//! Installs the peers quicmesh is measured against, at pinned versions: Debian packages
//! (iperf3, ping, wireguard-go + wg, Nebula, stunnel, HAProxy) and crates (quincy, boringtun).
//! Needs root and the package registries; what is already installed is kept.

use std::process::Command;
use std::time::Instant;

use anyhow::bail;

/// Debian packages, installed without recommends (wireguard-go would pull a kernel).
pub const APT: &[&str] = &[
    "iperf3",
    "iputils-ping",
    "wireguard-go",
    "wireguard-tools",
    "nebula",
    "stunnel4",
    "haproxy",
];
/// Crates, pinned.
pub const CRATES: &[(&str, &str, &str)] = &[
    ("quincy-client", "3.1.1", "quincy-client"),
    ("quincy-server", "3.1.1", "quincy-server"),
    ("boringtun-cli", "0.7.1", "boringtun-cli"),
];

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// Installs what is missing; returns one line per peer saying what happened.
pub fn run() -> anyhow::Result<Vec<String>> {
    let mut report = Vec::new();
    let t = Instant::now();
    let missing: Vec<&str> = APT
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if !missing.is_empty() {
        println!("install: apt-get install {}", missing.join(" "));
        let update = Command::new("apt-get").args(["update", "-qq"]).status()?;
        if !update.success() {
            bail!("apt-get update failed");
        }
        let st = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        if !st.success() {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    report.push(format!(
        "apt: {} ({} installed now, {:.0} s)",
        APT.join(", "),
        missing.len(),
        t.elapsed().as_secs_f64()
    ));
    for (krate, version, bin) in CRATES {
        let t = Instant::now();
        if on_path(bin) {
            report.push(format!("{krate}: already installed"));
            continue;
        }
        println!("install: cargo install --locked {krate}@{version}");
        let st = Command::new("cargo")
            .args(["install", "--locked", &format!("{krate}@{version}")])
            .status()?;
        if !st.success() {
            report.push(format!("{krate}@{version}: cargo install failed"));
            continue;
        }
        report.push(format!(
            "{krate}@{version}: installed in {:.0} s",
            t.elapsed().as_secs_f64()
        ));
    }
    for line in &report {
        println!("install: {line}");
    }
    Ok(report)
}
