//! The accept loop of the local HTTP listeners (the node's metrics; the coordinator's API
//! and dashboard, which import it from here): what `axum::serve` lacks.
//!
//! - A header-read deadline: a connection that has not sent a whole request head within
//!   [`HttpLimits::header_read_timeout`] (slowloris, or an idle keep-alive) is closed.
//! - A cap on open connections, in total and per source address: a connection beyond
//!   either is answered `503` and closed at once, so one source cannot fill the server.
//!   Sources in [`HttpLimits::unlimited_sources`] (a trusted reverse proxy carrying every
//!   user) count only against the total.
//! - A `Host` check against DNS rebinding: a browser page on another site that rebinds its
//!   name to this address sends its own name as `Host`; only IP literals, `localhost` and
//!   the names configured in [`AllowedHosts`] are served, others get `421`.
//!
//! Every refusal is counted with a [`HttpRefusal`] reason.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use quicmesh_protocol::overlay::Prefix;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use crate::reason::HttpRefusal;
use crate::reason::Label;

/// Refusals counted by reason (lock-free; cheap to share).
#[derive(Debug, Default)]
pub struct HttpRefusals([AtomicU64; HttpRefusal::COUNT]);

impl HttpRefusals {
    pub fn count(&self, r: HttpRefusal) {
        self.0[r.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, r: HttpRefusal) -> u64 {
        self.0[r.index()].load(Ordering::Relaxed)
    }

    /// label -> count, every reason present.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        HttpRefusal::ALL
            .iter()
            .map(|r| (r.as_str(), self.get(*r)))
            .collect()
    }
}

/// What a refusal is reported to (a metrics family, a counter array, a test).
pub type OnRefusal = Arc<dyn Fn(HttpRefusal) + Send + Sync>;

/// The listener's limits.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// A request head (request line and headers) must arrive whole within this, counted
    /// from when the server starts waiting for it (so an idle keep-alive ends too).
    pub header_read_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections at most from one source address.
    pub max_per_source: usize,
    /// Sources that count only against the total (a trusted reverse proxy).
    pub unlimited_sources: Vec<Prefix>,
}

/// Default header-read deadline.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default connection cap.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default per-source connection cap.
pub const DEFAULT_MAX_PER_SOURCE: usize = 32;

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_source: DEFAULT_MAX_PER_SOURCE,
            unlimited_sources: Vec::new(),
        }
    }
}

/// The names a request's `Host` may carry besides IP literals and `localhost`.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    names: Vec<String>,
}

impl AllowedHosts {
    /// IP literals and `localhost` only.
    pub fn local() -> Self {
        Self::default()
    }

    /// Also these DNS names (case-insensitive, a trailing dot ignored).
    pub fn with_names<I: IntoIterator<Item = S>, S: AsRef<str>>(names: I) -> Self {
        Self {
            names: names
                .into_iter()
                .map(|n| normalize(n.as_ref()))
                .filter(|n| !n.is_empty())
                .collect(),
        }
    }

    /// Whether a request whose authority (the `Host` header, or the request target's
    /// authority) is `host` is served. A request with neither is not a browser's (every
    /// browser sends `Host`): it cannot be a rebinding attack and is served.
    pub fn permits(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            return true;
        };
        let Some(name) = host_name(host) else {
            return false;
        };
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        let name = normalize(name);
        name == "localhost" || self.names.contains(&name)
    }
}

fn normalize(n: &str) -> String {
    n.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The host part of an authority (`name`, `name:port`, `1.2.3.4:80`, `[::1]:80`).
fn host_name(authority: &str) -> Option<&str> {
    let a = authority.trim();
    if let Some(rest) = a.strip_prefix('[') {
        let (v6, tail) = rest.split_once(']')?;
        if !(tail.is_empty() || tail.starts_with(':')) {
            return None;
        }
        return Some(v6);
    }
    let name = match a.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        Some(_) => return None,
        None => a,
    };
    (!name.is_empty() && !name.contains(':')).then_some(name)
}

/// The axum layer that refuses requests for a `Host` not in `hosts` (421).
pub async fn host_guard(
    hosts: Arc<AllowedHosts>,
    on_refusal: OnRefusal,
    req: Request,
    next: Next,
) -> Response {
    let host = match req.uri().authority() {
        Some(a) => Some(a.as_str().to_string()),
        // A value that is not text cannot name an allowed host.
        None => req
            .headers()
            .get(header::HOST)
            .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string()),
    };
    if hosts.permits(host.as_deref()) {
        return next.run(req).await;
    }
    on_refusal(HttpRefusal::Host);
    tracing::info!(
        host = host.as_deref().unwrap_or(""),
        "http request for a foreign Host refused"
    );
    (
        StatusCode::MISDIRECTED_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({
            "error": format!(
                "Host {:?} is not served here: use an IP address or localhost, or configure this name (DNS rebinding guard)",
                host.unwrap_or_default()
            )
        })
        .to_string(),
    )
        .into_response()
}

/// Adds [`host_guard`] to `router`.
pub fn guard_hosts(
    router: axum::Router,
    hosts: AllowedHosts,
    on_refusal: OnRefusal,
) -> axum::Router {
    let hosts = Arc::new(hosts);
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| host_guard(hosts.clone(), on_refusal.clone(), req, next),
    ))
}

/// Open connections per source; an entry lives while its source holds one.
#[derive(Debug, Default)]
struct PerSource(Mutex<HashMap<IpAddr, usize>>);

/// A held per-source slot, released on drop.
struct SourceSlot {
    table: Arc<PerSource>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl PerSource {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            table: self.clone(),
            ip,
        })
    }
}

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 34\r\n\r\n{\"error\":\"too many connections\"}\r\n";
/// Refused connections being told so at once; beyond, they are just closed.
const MAX_REFUSING: usize = 64;
/// How long a refused connection is kept to be told so.
const REFUSE_LINGER: Duration = Duration::from_millis(500);

/// Answers `503` on a connection refused for a cap and closes it. Its request is read
/// (and thrown away) for a moment first: closing over unread bytes would reset the
/// connection and lose the answer. Without a free `refusing` slot it is closed at once.
fn refuse(mut stream: tokio::net::TcpStream, refusing: &Arc<Semaphore>) {
    let _ = stream.try_write(BUSY);
    let Ok(slot) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(REFUSE_LINGER, async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        drop(slot);
    });
}

/// Serves `router` on `listener` under `limits` until the process ends. Each request
/// carries its peer address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    on_refusal: OnRefusal,
) {
    let total = Arc::new(Semaphore::new(limits.max_connections));
    let per_source = Arc::new(PerSource::default());
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let h1 = Arc::new(h1);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::warn!(error = %e, "http accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        let Ok(permit) = total.clone().try_acquire_owned() else {
            on_refusal(HttpRefusal::ConnectionLimit);
            refuse(stream, &refusing);
            continue;
        };
        let slot = if limits.unlimited_sources.iter().any(|p| p.contains(ip)) {
            None
        } else {
            match per_source.take(ip, limits.max_per_source) {
                Some(s) => Some(s),
                None => {
                    on_refusal(HttpRefusal::SourceLimit);
                    refuse(stream, &refusing);
                    continue;
                }
            }
        };
        let router = router.clone();
        let h1 = h1.clone();
        let on_refusal = on_refusal.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo::<SocketAddr>(peer));
                let mut r = router.clone();
                async move { tower_service::Service::call(&mut r, req).await }
            });
            if let Err(e) = h1.serve_connection(TokioIo::new(stream), svc).await {
                if e.is_timeout() {
                    on_refusal(HttpRefusal::HeaderTimeout);
                    tracing::debug!(%peer, "http connection closed: no request head in time");
                } else {
                    tracing::debug!(%peer, error = %e, "http connection");
                }
            }
            drop((permit, slot));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn hosts_are_ip_literals_localhost_or_configured() {
        let h = AllowedHosts::with_names(["Coord.Example.", ""]);
        for ok in [
            "127.0.0.1",
            "127.0.0.1:7780",
            "[::1]:7780",
            "[::1]",
            "localhost",
            "LOCALHOST:9790",
            "localhost.",
            "coord.example",
            "coord.example:443",
            "198.18.0.1:80",
        ] {
            assert!(h.permits(Some(ok)), "{ok} is served");
        }
        // Denied twins: another site's name (rebinding), look-alikes, malformed.
        for bad in [
            "evil.example",
            "evil.example:7780",
            "localhost.evil.example",
            "coord.example.evil",
            "127.0.0.1.nip.io",
            "2130706433x",
            "[::1",
            "[::1]x",
            "::1",
            "a:b:c",
            "",
            "host:port",
        ] {
            assert!(!h.permits(Some(bad)), "{bad} is refused");
        }
        assert!(!AllowedHosts::local().permits(Some("coord.example")));
        assert!(h.permits(None), "no Host at all: not a browser");
    }

    /// A server with `limits` on a loopback port, counting refusals.
    async fn start(limits: HttpLimits) -> (SocketAddr, Arc<HttpRefusals>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let counts = Arc::new(HttpRefusals::default());
        let c = counts.clone();
        let on: OnRefusal = Arc::new(move |r| c.count(r));
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
        let app = guard_hosts(app, AllowedHosts::local(), on.clone());
        tokio::spawn(serve(l, app, limits, on));
        (addr, counts)
    }

    async fn get(addr: SocketAddr, from: IpAddr, host: &str) -> std::io::Result<String> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddr::new(from, 0))?;
        let mut s = s.connect(addr).await?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .map_err(|_| std::io::Error::other("no answer"))??;
        Ok(out)
    }

    /// Reads until the peer closes; the time it took.
    async fn closed_after(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        let mut b = [0u8; 256];
        loop {
            match tokio::time::timeout(limit, s.read(&mut b)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn slowloris_connections_are_closed_after_the_header_deadline() {
        let (addr, counts) = start(HttpLimits {
            header_read_timeout: Duration::from_millis(500),
            ..HttpLimits::default()
        })
        .await;
        // Half a request line, then silence; and a connection that never says anything.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HT").await.unwrap();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let a = closed_after(&mut half, Duration::from_secs(5)).await;
        let b = closed_after(&mut silent, Duration::from_secs(5)).await;
        assert!(
            a.is_some_and(|d| d < Duration::from_secs(2)),
            "half request: {a:?}"
        );
        assert!(b.is_some(), "silent connection: {b:?}");
        assert!(
            counts.get(HttpRefusal::HeaderTimeout) >= 2,
            "{:?}",
            counts.snapshot()
        );
        // Its twin: a whole request is answered.
        let r = get(addr, [127, 0, 0, 1].into(), "127.0.0.1").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("hello"), "{r}");
    }

    #[tokio::test]
    async fn connections_beyond_the_caps_are_refused_and_others_still_get_in() {
        let (addr, counts) = start(HttpLimits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 6,
            max_per_source: 3,
            unlimited_sources: vec!["127.0.0.9/32".parse().unwrap()],
        })
        .await;
        let attacker: IpAddr = [127, 0, 0, 2].into();
        let admin: IpAddr = [127, 0, 0, 3].into();
        let mut held = Vec::new();
        for _ in 0..3 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(attacker, 0)).unwrap();
            held.push(s.connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The attacker's fourth: refused with 503 (its source is full)...
        let r = get(addr, attacker, "127.0.0.1").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert_eq!(counts.get(HttpRefusal::SourceLimit), 1);
        // ... while the admin, another source, gets in.
        let r = get(addr, admin, "127.0.0.1").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        // The trusted proxy is not held to the per-source cap, only to the total.
        let proxy: IpAddr = [127, 0, 0, 9].into();
        for _ in 0..3 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(proxy, 0)).unwrap();
            held.push(s.connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Six held: the seventh connection, from anyone, is refused.
        let r = get(addr, admin, "127.0.0.1").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert_eq!(counts.get(HttpRefusal::ConnectionLimit), 1);
        // Slots free: the admin gets in again.
        held.clear();
        let mut ok = false;
        for _ in 0..50 {
            if get(addr, admin, "127.0.0.1")
                .await
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "the admin gets in once slots free");
    }

    #[tokio::test]
    async fn a_foreign_host_is_refused_with_421() {
        let (addr, counts) = start(HttpLimits::default()).await;
        let r = get(addr, [127, 0, 0, 1].into(), "rebind.evil.example:7780")
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 421"), "{r}");
        assert!(r.contains("DNS rebinding"), "{r}");
        assert_eq!(counts.get(HttpRefusal::Host), 1);
        let r = get(addr, [127, 0, 0, 1].into(), "localhost:80")
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
}
