//! A real HTTP service for the L7 tests (hyper; HTTP/1.1 and HTTP/2 prior knowledge on
//! one port), and curl as the real client.
//!
//! The service answers every request with one line naming itself and what it was asked:
//! `<name> <method> <path?query> src=<x-quicmesh-source> version=<HTTP/1.1|HTTP/2.0>
//! tp=<traceparent>`,
//! and records every path it saw, so a test can assert a request never reached it.
//! `/status/<code>` answers with that status; `/sleep/<ms>` answers after that long; an
//! `Upgrade: echo` request is switched (101) and its bytes echoed. A flaky service
//! answers 503 to every fifth request for `/flaky` (20 %); a failing one answers 503 to
//! everything until told otherwise. `/trailers` reads the whole body and answers with the
//! names of the trailers it came with; `/sink/...` answers at once and goes on reading
//! the body, counting its bytes ([`HttpService::sunk`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    behaviour: Arc<Behaviour>,
}

#[derive(Debug, Default)]
struct Behaviour {
    flaky: bool,
    flaky_count: AtomicU64,
    failing: AtomicBool,
    /// Bytes read from `/sink/...` uploads, by path.
    sunk: Mutex<std::collections::HashMap<String, u64>>,
}

impl HttpService {
    /// Starts `name` on a free loopback port (its own thread and runtime; runs until the
    /// process exits).
    pub fn start(name: &str) -> std::io::Result<Self> {
        Self::start_with(name, false)
    }

    /// Starts `name`, answering 503 to every fifth `/flaky` request.
    pub fn start_flaky(name: &str) -> std::io::Result<Self> {
        Self::start_with(name, true)
    }

    /// Answers 503 to everything (`true`) or serves again.
    pub fn set_failing(&self, failing: bool) {
        self.behaviour.failing.store(failing, Ordering::SeqCst);
    }

    /// Starts `name` on `bind` (call inside a namespace to serve that host).
    pub fn start_on(bind: &str, name: &str) -> std::io::Result<Self> {
        Self::start_at(bind, name, false)
    }

    fn start_with(name: &str, flaky: bool) -> std::io::Result<Self> {
        Self::start_at("127.0.0.1:0", name, flaky)
    }

    fn start_at(bind: &str, name: &str, flaky: bool) -> std::io::Result<Self> {
        let l = std::net::TcpListener::bind(bind)?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Behaviour {
            flaky,
            ..Behaviour::default()
        });
        let (name, log, b) = (name.to_string(), seen.clone(), behaviour.clone());
        serve_in_thread(l, move |tcp| {
            let (name, log, b) = (name.clone(), log.clone(), b.clone());
            async move {
                let svc = hyper::service::service_fn(move |req| {
                    answer(name.clone(), log.clone(), b.clone(), req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            }
        });
        Ok(Self {
            addr,
            seen,
            behaviour,
        })
    }

    /// Every path (with query) the service was asked for, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Bytes of the upload to `path` (`/sink/...`) read so far.
    pub fn sunk(&self, path: &str) -> u64 {
        self.behaviour
            .sunk
            .lock()
            .map_or(0, |m| m.get(path).copied().unwrap_or(0))
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::BodyExt::boxed(Full::new(b.into()))
}

async fn answer(
    name: String,
    log: Arc<Mutex<Vec<String>>>,
    b: Arc<Behaviour>,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
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
    let tp = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/trailers" => {
            let body = http_body_util::BodyExt::collect(req.into_body()).await;
            let line = match body {
                Ok(b) => {
                    let names: Vec<String> = b
                        .trailers()
                        .map(|t| t.keys().map(|k| k.to_string()).collect())
                        .unwrap_or_default();
                    format!(
                        "{name} body={} trailers={}\n",
                        b.to_bytes().len(),
                        names.join(",")
                    )
                }
                Err(e) => format!("{name} body error: {e}\n"),
            };
            return Ok(Response::new(full(line)));
        }
        p if p.starts_with("/sink/") => {
            let mut body = req.into_body();
            let p = p.to_string();
            tokio::spawn(async move {
                while let Some(Ok(f)) = http_body_util::BodyExt::frame(&mut body).await {
                    if let (Some(d), Ok(mut m)) = (f.data_ref(), b.sunk.lock()) {
                        *m.entry(p.clone()).or_default() += d.len() as u64;
                    }
                }
            });
            return Ok(Response::new(full(format!("{name} sinking\n"))));
        }
        _ => {}
    }
    let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
    let line = format!(
        "{name} {} {pq} src={src} version={:?} tp={tp} hdrs={}\n",
        req.method(),
        req.version(),
        names.join(",")
    );
    let websocket_key = req
        .headers()
        .get("upgrade")
        .filter(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        .and(req.headers().get("sec-websocket-key"))
        .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()));
    if let Some(accept) = websocket_key {
        // A real WebSocket: every message echoed.
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            use futures_util::{SinkExt, StreamExt};
            let Ok(io) = up.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(io),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(m)) = ws.next().await {
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(
            "upgrade",
            hyper::header::HeaderValue::from_static("websocket"),
        );
        h.insert(
            "connection",
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        if let Ok(v) = hyper::header::HeaderValue::from_str(&accept) {
            h.insert("sec-websocket-accept", v);
        }
        return Ok(resp);
    }
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
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("upgrade", hyper::header::HeaderValue::from_static("echo"));
        resp.headers_mut().insert(
            "connection",
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        return Ok(resp);
    }
    let mut status = StatusCode::OK;
    let fail = b.failing.load(Ordering::SeqCst)
        || (b.flaky && path == "/flaky" && b.flaky_count.fetch_add(1, Ordering::SeqCst) % 5 == 4);
    if fail {
        status = StatusCode::SERVICE_UNAVAILABLE;
    }
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
    if let Some(n) = path
        .strip_prefix("/drip/")
        .and_then(|n| n.parse::<u32>().ok())
    {
        // n chunks, 100 ms apart: a long streaming answer.
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, Infallible>>(1);
        tokio::spawn(async move {
            for i in 0..n {
                if tx
                    .send(Ok(hyper::body::Frame::data(Bytes::from(format!(
                        "drip {i}\n"
                    )))))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let stream = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
        let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream));
        return Ok(Response::new(body));
    }
    let mut resp = Response::new(full(line));
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

/// A real HTTP/1.1 client (hyper's pooled client, keep-alive) sending requests through
/// the mesh from its own runtime.
#[derive(Debug)]
pub struct Load {
    rt: tokio::runtime::Runtime,
}

/// One response: status, body, and the mesh's reason header when it answered itself.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub reason: Option<String>,
    pub retry_after: Option<String>,
    pub elapsed: Duration,
}

impl Load {
    pub fn new() -> Self {
        Self {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
        }
    }

    /// Sends `n` requests (`method` to `url`, with `headers`), `concurrency` at a time;
    /// the answers in the order they were sent. Each request is bounded by 30 s.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        n: usize,
        concurrency: usize,
    ) -> Vec<anyhow::Result<Answer>> {
        let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
        let method: hyper::Method = method.parse().expect("method");
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let url = url.to_string();
        self.rt.block_on(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
            let mut tasks = Vec::with_capacity(n);
            for _ in 0..n {
                let permit = sem.clone().acquire_owned().await.expect("semaphore");
                let (client, method, headers, url) =
                    (client.clone(), method.clone(), headers.clone(), url.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = permit;
                    let started = std::time::Instant::now();
                    let mut b = Request::builder().method(method).uri(&url);
                    for (k, v) in &headers {
                        b = b.header(k.as_str(), v.as_str());
                    }
                    let req = b.body(Full::new(Bytes::from_static(b"{}")))?;
                    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
                        .await??;
                    let status = resp.status().as_u16();
                    let h = |n: &str| {
                        resp.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(String::from)
                    };
                    let (reason, retry_after) = (h("x-quicmesh-reason"), h("retry-after"));
                    let body = http_body_util::BodyExt::collect(resp.into_body())
                        .await?
                        .to_bytes();
                    Ok(Answer {
                        status,
                        body: String::from_utf8_lossy(&body).into_owned(),
                        reason,
                        retry_after,
                        elapsed: started.elapsed(),
                    })
                }));
            }
            let mut out = Vec::with_capacity(n);
            for t in tasks {
                out.push(t.await.map_err(anyhow::Error::from).and_then(|r| r));
            }
            out
        })
    }
}

/// POSTs `body` then `trailers` to `path` over HTTP/2 with prior knowledge (curl cannot
/// send request trailers); the status and the answer's body.
pub fn h2_post_with_trailers(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    trailers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let mut t = hyper::HeaderMap::new();
    for (k, v) in trailers {
        t.insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes())?,
            hyper::header::HeaderValue::from_str(v)?,
        );
    }
    let frames: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = vec![
        Ok(hyper::body::Frame::data(Bytes::copy_from_slice(body))),
        Ok(hyper::body::Frame::trailers(t)),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let path = path.to_string();
    rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(15), async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await?;
            tokio::spawn(conn);
            let req = Request::post(format!("http://api{path}")).body(
                http_body_util::StreamBody::new(futures_util::stream::iter(frames)),
            )?;
            let resp = send.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        })
        .await?
    })
}

impl Default for Load {
    fn default() -> Self {
        Self::new()
    }
}

/// One span a collector received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The `quicmesh.node` resource attribute of the node that sent it.
    pub node: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// 2 server, 3 client (OTLP's SpanKind).
    pub kind: i32,
    pub name: String,
}

/// A stand-in OTLP/HTTP collector: accepts `POST /v1/traces` (protobuf) and keeps the
/// spans, decoded with the OpenTelemetry proto types.
#[derive(Debug, Clone)]
pub struct Collector {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl Collector {
    pub fn start() -> std::io::Result<Self> {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let keep = spans.clone();
        serve_in_thread(l, move |tcp| {
            let keep = keep.clone();
            async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let keep = keep.clone();
                    async move {
                        let ok = req.uri().path() == "/v1/traces";
                        let body = http_body_util::BodyExt::collect(req.into_body())
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let status = match (ok, ExportTraceServiceRequest::decode(body)) {
                            (true, Ok(r)) => {
                                let mut k = keep.lock().expect("lock");
                                for rs in r.resource_spans {
                                    let node = rs
                                                .resource
                                                .iter()
                                                .flat_map(|r| r.attributes.iter())
                                                .find(|a| a.key == "quicmesh.node")
                                                .and_then(|a| a.value.as_ref())
                                                .and_then(|v| match &v.value {
                                                    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                                                    _ => None,
                                                })
                                                .unwrap_or_default();
                                    for ss in rs.scope_spans {
                                        for s in ss.spans {
                                            k.push(ReceivedSpan {
                                                node: node.clone(),
                                                trace_id: hex(&s.trace_id),
                                                span_id: hex(&s.span_id),
                                                parent_span_id: hex(&s.parent_span_id),
                                                kind: s.kind,
                                                name: s.name,
                                            });
                                        }
                                    }
                                }
                                StatusCode::OK
                            }
                            _ => StatusCode::BAD_REQUEST,
                        };
                        let mut r = Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = status;
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            }
        });
        Ok(Self { addr, spans })
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A WebSocket round trip through `addr` (a real client): sends `text` and 64 KiB of
/// binary on `path`, returns what came back; `Err` with the status when refused.
pub fn websocket_echo(addr: SocketAddr, path: &str, text: &str) -> anyhow::Result<(String, bool)> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::client_async(format!("ws://api{path}"), tcp),
        )
        .await??;
        ws.send(Message::text(text)).await?;
        let blob: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        ws.send(Message::binary(blob.clone())).await?;
        let mut got_text = String::new();
        let mut got_blob = false;
        for _ in 0..2 {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
                Some(Ok(Message::Text(t))) => got_text = t.to_string(),
                Some(Ok(Message::Binary(b))) => got_blob = b[..] == blob[..],
                other => anyhow::bail!("unexpected {other:?}"),
            }
        }
        let _ = ws.close(None).await;
        Ok((got_text, got_blob))
    })
}

/// Serves `l` from a thread and a runtime of its own (until the process exits): every
/// accepted connection goes to `conn`, on a task of its own.
pub fn serve_in_thread<F, Fut>(l: std::net::TcpListener, conn: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).expect("listener");
            loop {
                if let Ok((tcp, _)) = l.accept().await {
                    tokio::spawn(conn(tcp));
                }
            }
        });
    });
}
