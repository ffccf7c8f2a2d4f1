//! Connections from the node to its local HTTP services, reused across requests and
//! across peers: one HTTP/1.1 pool and one HTTP/2 (prior knowledge) client per service
//! address. Every connection goes to the service's configured address whatever the
//! request's authority says, so a request cannot steer the node elsewhere.
//!
//! A leaf module: it knows hyper, not the node.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the HTTP proxy handles: the peer's or the service's, boxed, or one it wrote.
pub type Body = BoxBody<Bytes, BoxError>;

/// How long a pooled connection to a local service may sit idle.
const IDLE: Duration = Duration::from_secs(60);
/// Most idle HTTP/1.1 connections kept per service.
const MAX_IDLE: usize = 64;
/// How long connecting to a local service may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to one fixed address, whatever the URI names.
#[derive(Debug, Clone, Copy)]
pub struct Fixed(pub SocketAddr);

impl tower_service::Service<Uri> for Fixed {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(tcp))
        })
    }
}

/// A pooled client to one local address.
pub type LocalClient = Client<Fixed, Body>;

/// The clients of one service address.
#[derive(Debug, Clone)]
pub struct Clients {
    pub http1: LocalClient,
    pub http2: LocalClient,
}

impl Clients {
    fn new(addr: SocketAddr) -> Self {
        let build = |h2: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(IDLE)
                .pool_max_idle_per_host(MAX_IDLE)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(h2)
                .build(Fixed(addr))
        };
        Self {
            http1: build(false),
            http2: build(true),
        }
    }
}

/// Every local service's clients, made on first use.
#[derive(Debug, Default)]
pub struct Pools(Mutex<HashMap<SocketAddr, Clients>>);

impl Pools {
    /// The clients for `addr`.
    pub fn get(&self, addr: SocketAddr) -> Clients {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(addr).or_insert_with(|| Clients::new(addr)).clone()
    }
}
