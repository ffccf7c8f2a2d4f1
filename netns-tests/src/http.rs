//! A real HTTP service for the L7 tests (hyper; HTTP/1.1 and HTTP/2 prior knowledge on
//! one port), and curl as the real client.
//!
//! The service answers every request with one line naming itself and what it was asked:
//! `<name> <method> <path?query> src=<x-quicmesh-source> version=<HTTP/1.1|HTTP/2.0>`,
//! and records every path it saw, so a test can assert a request never reached it.
//! `/status/<code>` answers with that status; `/sleep/<ms>` answers after that long; an
//! `Upgrade: echo` request is switched (101) and its bytes echoed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A running HTTP service.
#[derive(Debug, Clone)]
pub struct HttpService {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl HttpService {
    /// Starts `name` on a free loopback port (its own thread and runtime; runs until the
    /// process exits).
    pub fn start(name: &str) -> std::io::Result<Self> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (name, log) = (name.to_string(), seen.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).expect("listener");
                loop {
                    let Ok((tcp, _)) = l.accept().await else {
                        continue;
                    };
                    let (name, log) = (name.clone(), log.clone());
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            answer(name.clone(), log.clone(), req)
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            });
        });
        Ok(Self { addr, seen })
    }

    /// Every path (with query) the service was asked for, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

async fn answer(
    name: String,
    log: Arc<Mutex<Vec<String>>>,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let pq = req
        .uri()
        .path_and_query()
        .map_or(String::new(), |p| p.to_string());
    if let Ok(mut l) = log.lock() {
        l.push(pq.clone());
    }
    let src = req
        .headers()
        .get("x-quicmesh-source")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let line = format!(
        "{name} {} {pq} src={src} version={:?}\n",
        req.method(),
        req.version()
    );
    if req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"echo"))
    {
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = up.await {
                let mut io = TokioIo::new(io);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("upgrade", hyper::header::HeaderValue::from_static("echo"));
        resp.headers_mut().insert(
            "connection",
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        return Ok(resp);
    }
    let path = req.uri().path().to_string();
    let mut status = StatusCode::OK;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK);
    }
    if let Some(ms) = path
        .strip_prefix("/sleep/")
        .and_then(|m| m.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut resp = Response::new(Full::new(Bytes::from(line)));
    *resp.status_mut() = status;
    Ok(resp)
}

/// What curl got.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header lines of the final response, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Runs curl (the real client) with `args` then `url`, the path sent exactly as written
/// (`--path-as-is`), and parses the response.
pub fn curl(url: &str, args: &[&str]) -> anyhow::Result<Reply> {
    let out = Command::new("curl")
        .args(["-s", "-S", "-i", "--path-as-is", "--max-time", "20"])
        .args(args)
        .arg(url)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_reply(&String::from_utf8_lossy(&out.stdout))
}

fn parse_reply(text: &str) -> anyhow::Result<Reply> {
    // With -i, every response head is printed (a 101 or 100 before the final one).
    let mut rest = text;
    loop {
        let (head, body) = rest
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("no response head in {text:?}"))?;
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no status line in {text:?}"))?;
        if status == 100 && body.starts_with("HTTP/") {
            rest = body;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        return Ok(Reply {
            status,
            headers,
            body: body.to_string(),
        });
    }
}
