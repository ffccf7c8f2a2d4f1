//! Health checks of the node's services: one task per checked service probes it every
//! interval (TCP connect, HTTP GET, or a command), feeds the rise/fall state machine, and
//! publishes the services' health; the control session reports it to the coordinator,
//! which pushes it to every node in the catalog.

use std::sync::Arc;
use std::time::Duration;

use quicmesh_protocol::health::{self, Checker, Health, ServiceCheck};
use quicmesh_protocol::ident::ServiceName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{CheckConfig, CheckKind, ServiceConfig};
use crate::metrics::Metrics;

/// The node's checked services and their latest health, in config order.
pub type Reports = watch::Receiver<Vec<ServiceCheck>>;

/// Starts a check task per checked service; the receiver follows their health (starting
/// with every checked service critical until its first result).
pub fn start(services: &[ServiceConfig], metrics: Arc<Metrics>) -> Reports {
    let checked: Vec<(ServiceName, CheckConfig)> = services
        .iter()
        .filter_map(|s| s.check.clone().map(|c| (s.name.clone(), c)))
        .collect();
    let initial = checked
        .iter()
        .map(|(name, _)| ServiceCheck {
            service: name.clone(),
            health: Health::Critical,
            output: "not checked yet".into(),
        })
        .collect();
    let (tx, rx) = watch::channel(initial);
    let tx = Arc::new(tx);
    for (i, (name, cfg)) in checked.into_iter().enumerate() {
        metrics.service_health(name.as_str(), false, false);
        tokio::spawn(run(tx.clone(), metrics.clone(), i, name, cfg));
    }
    rx
}

async fn run(
    tx: Arc<watch::Sender<Vec<ServiceCheck>>>,
    metrics: Arc<Metrics>,
    index: usize,
    service: ServiceName,
    cfg: CheckConfig,
) {
    let mut checker = Checker::new(cfg.rise, cfg.fall);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (passed, output) = probe(&cfg.kind, cfg.timeout).await;
        let output = health::truncate(&output, health::MAX_OUTPUT);
        let changed = checker.observe(passed);
        if let Some(h) = changed {
            tracing::info!(%service, health = h.as_str(), %output, "health changed");
        } else {
            tracing::debug!(%service, passed, %output, "health check");
        }
        let state = checker.state();
        metrics.service_health(
            service.as_str(),
            state == Health::Passing,
            changed.is_some(),
        );
        // Publish transitions; a new output alone is kept for `status` without waking the
        // control session.
        tx.send_if_modified(|all| {
            let Some(entry) = all.get_mut(index) else {
                return false;
            };
            entry.output = output;
            let moved = entry.health != state;
            entry.health = state;
            moved
        });
    }
}

/// One probe: passed, and what it said.
pub async fn probe(kind: &CheckKind, timeout: Duration) -> (bool, String) {
    let attempt = async {
        match kind {
            CheckKind::Tcp(addr) => match TcpStream::connect(addr).await {
                Ok(_) => (true, format!("tcp {addr}: connected")),
                Err(e) => (false, format!("tcp {addr}: {e}")),
            },
            CheckKind::Http { addr, path, status } => http(*addr, path, *status).await,
            CheckKind::Command(argv) => command(argv).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => (false, format!("timed out after {timeout:?}")),
    }
}

async fn http(addr: std::net::SocketAddr, path: &str, want: Option<u16>) -> (bool, String) {
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return (false, format!("GET http://{addr}{path}: {e}")),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: quicmesh-health\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return (false, format!("GET http://{addr}{path}: {e}"));
    }
    // The status line is all we need: read until it is complete (or 1 KiB).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return (false, format!("GET http://{addr}{path}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("").trim().to_string();
    let code = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        None => (
            false,
            format!("GET http://{addr}{path}: not an HTTP answer: {line:?}"),
        ),
        Some(c) => {
            let ok = match want {
                Some(w) => c == w,
                None => (200..300).contains(&c),
            };
            (ok, format!("GET http://{addr}{path}: {line}"))
        }
    }
}

async fn command(argv: &[String]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match cmd.output().await {
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let text = text.trim();
            let status = out.status.code().map_or("killed".into(), |c| c.to_string());
            (out.status.success(), format!("exit {status}: {text}"))
        }
        Err(e) => (false, format!("{}: {e}", argv[0])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_and_http_probes_pass_only_when_the_service_answers_right() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut b = [0u8; 512];
                    let n = s.read(&mut b).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&b[..n]).into_owned();
                    let answer = if req.starts_with("GET /ok ") {
                        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                    } else {
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                    };
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        let t = Duration::from_secs(2);
        assert!(probe(&CheckKind::Tcp(addr), t).await.0);
        let http = |path: &str, status| CheckKind::Http {
            addr,
            path: path.into(),
            status,
        };
        let (ok, out) = probe(&http("/ok", None), t).await;
        assert!(ok, "{out}");
        let (ok, out) = probe(&http("/down", None), t).await;
        assert!(!ok && out.contains("503"), "{out}");
        let (ok, out) = probe(&http("/down", Some(503)), t).await;
        assert!(ok, "expected status 503 passes: {out}");
        // Nothing listening: both fail, saying why.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (ok, out) = probe(&CheckKind::Tcp(closed), t).await;
        assert!(!ok && out.contains("tcp"), "{out}");
    }

    #[tokio::test]
    async fn command_probe_uses_the_exit_status_and_times_out() {
        let run = |argv: &[&str]| CheckKind::Command(argv.iter().map(|s| s.to_string()).collect());
        let t = Duration::from_secs(5);
        let (ok, out) = probe(&run(&["sh", "-c", "echo fine"]), t).await;
        assert!(ok && out.contains("fine"), "{out}");
        let (ok, out) = probe(&run(&["sh", "-c", "echo broken; exit 3"]), t).await;
        assert!(!ok && out.contains("exit 3"), "{out}");
        let (ok, out) = probe(&run(&["sleep", "5"]), Duration::from_millis(200)).await;
        assert!(!ok && out.contains("timed out"), "{out}");
        let (ok, _) = probe(&run(&["/nonexistent/check"]), t).await;
        assert!(!ok);
    }
}
