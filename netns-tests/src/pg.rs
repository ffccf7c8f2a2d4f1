//! A PostgreSQL server of a test's own, from `.ci/postgres`: on this host's loopback, or
//! inside a test namespace listening on its underlay address. The test can stop and start it
//! (a database restart) and it is stopped and removed when dropped.

use std::net::{IpAddr, TcpListener};
use std::process::Command;

use anyhow::{ensure, Context};

/// A running server and the URL replicas use to reach it.
#[derive(Debug)]
pub struct PgServer {
    netns: Option<String>,
    listen: Option<IpAddr>,
    dir: String,
    port: u16,
    /// `postgres://postgres@<addr>:<port>/postgres`.
    pub url: String,
}

impl PgServer {
    /// A server on this host's loopback, on a free port.
    pub fn on_loopback() -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start(None, None, port)
    }

    /// A server inside namespace `ns`, listening on `ip` (an underlay address) and loopback.
    pub fn in_ns(ns: &str, ip: IpAddr) -> anyhow::Result<Self> {
        Self::start(Some(ns.to_string()), Some(ip), 5432)
    }

    fn start(netns: Option<String>, listen: Option<IpAddr>, port: u16) -> anyhow::Result<Self> {
        let mut s = Self {
            netns,
            listen,
            dir: format!(
                "/tmp/quicmesh-pg-{}-{port}-{}",
                std::process::id(),
                rand::random::<u32>()
            ),
            port,
            url: String::new(),
        };
        s.url = s
            .script("start")
            .context("this test needs a PostgreSQL server of its own (bash .ci/postgres start)")?;
        Ok(s)
    }

    /// Runs `.ci/postgres <verb>` for this server (in its namespace); returns its stdout.
    pub fn script(&self, verb: &str) -> anyhow::Result<String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/postgres");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "bash", script]);
                c
            }
            None => {
                let mut c = Command::new("bash");
                c.arg(script);
                c
            }
        };
        cmd.arg(verb)
            .env("QUICMESH_PG_DIR", &self.dir)
            .env("QUICMESH_PG_PORT", self.port.to_string());
        if let Some(ip) = self.listen {
            cmd.env("QUICMESH_PG_LISTEN", ip.to_string());
        }
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            ".ci/postgres {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops the server (a clean, fast shutdown: sessions are cut).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.script("stop").map(|_| ())
    }

    /// Starts it again on the same data and address.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.script("start").map(|_| ())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.script("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(format!("{}.initdb.log", self.dir));
    }
}
