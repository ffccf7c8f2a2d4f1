//! Local admin: `status` over a unix socket in the data dir (mode 0600), and Prometheus
//! metrics on a loopback TCP port. Both are apart from the data plane. [`http`] is the
//! guarded accept loop of the metrics listener (and of the coordinator's API).

pub mod http;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::control::unix_now;
use crate::state::Node;
use crate::tls;

/// The status document `quicmesh-node status` prints.
pub fn status_json(node: &Node) -> serde_json::Value {
    let view = node.view();
    let id = node.identity.load();
    let conns = node.tunnels.selected();
    let tried = node.tunnels.tried();
    let mut peers: Vec<_> = view
        .peers
        .values()
        .map(|p| {
            json!({
                "node": p.node,
                "endpoint": p.endpoint.map(|e| e.to_string()),
                "overlay": p.overlay,
                "services": p.services,
                "online": p.online,
                // Advertised by the coordinator as a relay (its token granted the role).
                "relay": p.relay,
                "critical": p.critical,
                "connected": conns.get(&p.node).is_some_and(|c| c.close_reason().is_none()),
                // The tunnel's key exchange group, read from its handshake.
                "key_exchange": conns.get(&p.node).filter(|c| c.close_reason().is_none()).and_then(tls::negotiated),
                "candidates": p.candidates.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                "path": conns.get(&p.node).filter(|c| c.close_reason().is_none()).map(|c| {
                    match node.path_status(&p.node) {
                        Some(s) => json!({
                            "via": s.kind,
                            "remote": s.address.to_string(),
                            "relay": s.relay,
                            "rtt_ms": s.rtt_ms.unwrap_or(c.rtt().as_secs_f64() * 1e3),
                            "switches": s.switches,
                        }),
                        // The path manager has not looked at a brand-new tunnel yet.
                        None => {
                            let route = node.paths.route(c.remote_address());
                            let relay = match route {
                                crate::path::Route::Relay { relay, .. } => node
                                    .paths
                                    .live_relays()
                                    .iter()
                                    .find(|(_, a)| *a == relay)
                                    .map(|(n, _)| n.to_string()),
                                _ => None,
                            };
                            json!({
                            "via": if route.is_relay() { "relay" } else { "direct" },
                            "remote": match route {
                                crate::path::Route::Relay { relay, .. } => relay,
                                r => r.direct_addr().unwrap_or(c.remote_address()),
                            }.to_string(),
                            "relay": relay,
                            "rtt_ms": c.rtt().as_secs_f64() * 1e3,
                            "switches": 0,
                        })
                        }
                    }
                }),
                "tried": tried.get(&p.node).map(|t| t.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            })
        })
        .collect();
    peers.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    let control = node.control.lock().map(|c| c.clone()).unwrap_or_default();
    let bound = node.bound.lock().map(|b| b.clone()).unwrap_or_default();
    let health = node.health.borrow().clone();
    json!({
        "node": node.cfg.name,
        "trust_domain": id.trust_domain,
        "tunnel_listen": node.endpoint.local_addr().ok().map(|a| a.to_string()),
        "snapshot_version": view.version,
        // The labels policy sees: the coordinator's (exactly the join token's), not the
        // config's.
        "labels": view.labels,
        "relay_requested": node.cfg.relay,
        "policy_version": view.policy_version,
        "certificate": {
            "serial": id.serial.to_string(),
            "services": id.services,
            "not_after": id.not_after,
            "expires_in_secs": id.not_after - unix_now(),
        },
        "control": control,
        "services": node.cfg.services.iter().map(|s| {
            let check = health.iter().find(|c| c.service == s.name);
            json!({
                "name": s.name,
                "address": s.address.map(|a| a.to_string()),
                "ports": s.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                "protocol": s.protocol,
                "rate_limit": s.rate_limits.iter().map(|l| json!({"source": l.source.as_ref().map_or("*", |x| x.as_str()), "per_second": l.per_second})).collect::<Vec<_>>(),
                "health": check.map_or("passing (no check)", |c| c.health.as_str()),
                "check_output": check.map(|c| c.output.clone()),
            })
        }).collect::<Vec<_>>(),
        "upstreams": node.cfg.upstreams.iter().zip(bound.upstreams.iter()).map(|(u, (_, addr))| {
            let mut j = json!({"service": u.service, "bind": addr.to_string(), "source": u.source, "locality": u.locality, "protocol": u.protocol});
            if u.protocol == crate::config::Protocol::Http {
                j["routes"] = u.http.routes.iter().map(route_json).collect();
                j["retry_budget"] = json!(u.http.retry_budget);
                j["ejection"] = json!(u.http.ejection.map(|e| json!({"consecutive_failures": e.consecutive_failures, "base_ms": e.base.as_millis() as u64, "max_ms": e.max.as_millis() as u64})));
            }
            j
        }).collect::<Vec<_>>(),
        "dns": bound.dns.map(|a| a.to_string()),
        "metrics": bound.metrics.map(|a| a.to_string()),
        "peers": peers,
        "flows": node.flows.list(),
        "counters": node.metrics.reasons(),
        "overlay": node.overlay.get().map(|ov| ov.status()),
        "gateway": node.gateway.get().map(|g| g.status()),
        "wireguard_clients_known": view.wg.len(),
    })
}

/// An `http` upstream's route as `status` shows it.
fn route_json(r: &quicmesh_protocol::http_route::Route) -> serde_json::Value {
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    json!({
        "name": r.name,
        "path_prefix": r.matches.path_prefix,
        "headers": r.matches.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect::<Vec<_>>(),
        "split": r.split.iter().map(|s| json!({"labels": s.labels, "weight": s.weight})).collect::<Vec<_>>(),
        "timeout_ms": ms(r.timeout),
        "per_try_timeout_ms": r.per_try_timeout.map(ms),
        "retries": r.retries,
        "retry_on": r.retry_on,
        "retry_grpc": r.retry_grpc,
        "fault": r.fault.as_ref().map(|f| json!({
            "delay_ms": ms(f.delay),
            "delay_percent": f.delay_percent,
            "abort": f.abort_status,
            "abort_percent": f.abort_percent,
        })),
    })
}

/// Binds the admin socket (replacing a stale one) with mode 0600.
pub fn bind_admin(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        // A live node answers on it; a stale file from a crash does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: is another node running with this data_dir?",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves `status` requests: one line in (`status`), one JSON document out.
pub async fn serve_admin(node: Arc<Node>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r);
            if r.read_line(&mut line).await.is_err() {
                return;
            }
            let body = match line.trim() {
                "status" => status_json(&node).to_string(),
                "metrics" => node.metrics.encode(),
                other => {
                    json!({"error": format!("unknown command {other:?} (try: status, metrics)")})
                        .to_string()
                }
            };
            let _ = w.write_all(body.as_bytes()).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Asks a running node over its admin socket.
pub async fn query(path: &Path, command: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "{}: {e} (is quicmesh-node running with this data_dir?)",
                path.display()
            ),
        )
    })?;
    s.write_all(format!("{command}\n").as_bytes()).await?;
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out).await?;
    Ok(out)
}

/// Serves `/metrics` on a loopback listener: header deadline, connection caps and the
/// `Host` guard of [`http`], refusals counted as `http_refused{reason}`.
pub async fn serve_metrics(node: Arc<Node>, listener: tokio::net::TcpListener) {
    let m = node.metrics.clone();
    let on_refusal: http::OnRefusal = Arc::new(move |r| m.http_refused(r));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let node = node.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    node.metrics.encode(),
                )
            }
        }),
    );
    let app = http::guard_hosts(app, http::AllowedHosts::local(), on_refusal.clone());
    http::serve(listener, app, http::HttpLimits::default(), on_refusal).await;
}

/// Human-readable status.
pub fn render_status(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let s = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    let _ = writeln!(
        o,
        "node       {} ({})",
        s(&v["node"]),
        s(&v["trust_domain"])
    );
    let _ = writeln!(o, "tunnel     {}", s(&v["tunnel_listen"]));
    let _ = writeln!(
        o,
        "snapshot   v{} (policy v{})",
        v["snapshot_version"], v["policy_version"]
    );
    let c = &v["certificate"];
    let _ = writeln!(
        o,
        "cert       serial {} expires in {}s",
        s(&c["serial"]),
        c["expires_in_secs"]
    );
    let ctl = &v["control"];
    let _ = writeln!(
        o,
        "control    {}{}{}",
        if ctl["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "disconnected"
        },
        ctl["key_exchange"]
            .as_str()
            .map(|k| format!(" (key exchange {k})"))
            .unwrap_or_default(),
        ctl["last_error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    let _ = writeln!(o, "peers:");
    for p in v["peers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<20} {:<24} {:<10} {:<15} {}",
            s(&p["node"]),
            s(&p["endpoint"]),
            if p["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "idle"
            },
            p["key_exchange"].as_str().unwrap_or("-"),
            p["services"]
        );
    }
    let _ = writeln!(o, "upstreams:");
    for u in v["upstreams"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<20} {:<22} {}",
            s(&u["service"]),
            s(&u["bind"]),
            s(&u["protocol"])
        );
        for r in u["routes"].as_array().into_iter().flatten() {
            let split: Vec<String> = r["split"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{}={}", x["labels"], x["weight"]))
                .collect();
            let _ = writeln!(
                o,
                "    route {:<14} prefix {:<12} headers {} split [{}] timeout {}ms retries {}",
                s(&r["name"]),
                r["path_prefix"].as_str().unwrap_or("-"),
                r["headers"],
                split.join(", "),
                r["timeout_ms"],
                r["retries"]
            );
        }
    }
    let _ = writeln!(o, "flows:");
    for f in v["flows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  #{} {} {} -> {} peer {} {}",
            f["id"],
            s(&f["direction"]),
            s(&f["src"]),
            s(&f["dst"]),
            s(&f["peer"]),
            s(&f["rule"])
        );
    }
    let _ = writeln!(o, "counters:");
    for (k, n) in v["counters"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "  {k:<40} {n}");
    }
    o
}
