//! What the node keeps for its local HTTP services:
//! - connections, reused across requests and across peers: one HTTP/1.1 pool and one
//!   HTTP/2 (prior knowledge) client per service address. Every connection goes to the
//!   service's configured address whatever the request's authority says, so a request
//!   cannot steer the node elsewhere;
//! - the token buckets of their rate limits, one per (service, source service).
//!
//! A leaf module: it knows hyper, not the node.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use quicmesh_protocol::http_route::Bucket;
use quicmesh_protocol::ident::{NodeName, ServiceName};
use tokio::net::TcpStream;

use crate::config::RateLimit;

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

/// Most (service, source) buckets kept; past it, unnamed sources share one bucket.
const MAX_BUCKETS: usize = 4096;

/// Most requests the node's local services have in flight from the mesh at once; more
/// are answered 503 (`overloaded`) at once rather than queued.
pub const MAX_IN_FLIGHT: usize = 4096;

/// Most requests one peer has in flight at this node's services at once: no peer takes
/// every place of the node's [`MAX_IN_FLIGHT`].
pub const MAX_IN_FLIGHT_PER_PEER: usize = MAX_IN_FLIGHT / 4;

/// Requests in flight per peer (entries leave at zero: bounded by the peers).
type PeerCounts = Arc<Mutex<HashMap<NodeName, usize>>>;

/// Every local service's clients (made on first use), rate limit buckets, and the bounds
/// on requests in flight.
#[derive(Debug)]
pub struct Pools {
    clients: Mutex<HashMap<SocketAddr, Clients>>,
    buckets: Mutex<HashMap<(ServiceName, Option<ServiceName>), Bucket>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    per_peer: PeerCounts,
}

impl Default for Pools {
    fn default() -> Self {
        Self {
            clients: Mutex::default(),
            buckets: Mutex::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            per_peer: PeerCounts::default(),
        }
    }
}

/// A request's place among those in flight: the node's and its peer's, given back when
/// dropped.
#[derive(Debug)]
pub struct RequestPermit {
    _node: tokio::sync::OwnedSemaphorePermit,
    peer: NodeName,
    counts: PeerCounts,
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

impl Pools {
    /// A place for one more request from `peer`, or `None` when the node's or the
    /// peer's are all taken.
    pub fn try_request(&self, peer: &NodeName) -> Option<RequestPermit> {
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.get(peer).copied().unwrap_or(0);
        if n >= MAX_IN_FLIGHT_PER_PEER {
            return None;
        }
        let node = self.in_flight.clone().try_acquire_owned().ok()?;
        m.insert(peer.clone(), n + 1);
        Some(RequestPermit {
            _node: node,
            peer: peer.clone(),
            counts: self.per_peer.clone(),
        })
    }

    /// The clients for `addr`.
    pub fn get(&self, addr: SocketAddr) -> Clients {
        let mut m = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(addr).or_insert_with(|| Clients::new(addr)).clone()
    }

    /// Takes a request from `src` to `service` out of its limit (`limits`: the service's);
    /// `Err` with how long until the next one may come.
    pub fn admit(
        &self,
        service: &ServiceName,
        src: &ServiceName,
        limits: &[RateLimit],
        now: Instant,
    ) -> Result<(), Duration> {
        let Some(limit) = limits
            .iter()
            .find(|l| l.source.as_ref() == Some(src))
            .or_else(|| limits.iter().find(|l| l.source.is_none()))
        else {
            return Ok(());
        };
        let mut m = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        // Named sources and unnamed ones alike get their own bucket while there is room.
        let mut key = (service.clone(), Some(src.clone()));
        if !m.contains_key(&key) && m.len() >= MAX_BUCKETS && limit.source.is_none() {
            key = (service.clone(), None);
        }
        let rate = limit.per_second;
        m.entry(key)
            .or_insert_with(|| Bucket::new(rate, rate.max(1.0)))
            .take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_cannot_take_every_place_and_places_come_back() {
        let p = Pools::default();
        let (a, b) = (NodeName::new("a").unwrap(), NodeName::new("b").unwrap());
        let held: Vec<RequestPermit> = (0..MAX_IN_FLIGHT_PER_PEER)
            .map(|_| p.try_request(&a).unwrap())
            .collect();
        assert!(p.try_request(&a).is_none(), "a's share is taken");
        assert!(p.try_request(&b).is_some(), "b still gets in");
        drop(held);
        assert!(p.try_request(&a).is_some(), "given back");
        assert!(
            p.per_peer.lock().unwrap().is_empty(),
            "no entry left at zero"
        );
    }

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    #[test]
    fn each_source_has_its_bucket_and_the_table_is_bounded() {
        let p = Pools::default();
        let limits = [
            RateLimit {
                source: Some(svc("web")),
                per_second: 2.0,
            },
            RateLimit {
                source: None,
                per_second: 1.0,
            },
        ];
        let (api, now) = (svc("api"), Instant::now());
        assert!(p.admit(&api, &svc("web"), &limits, now).is_ok());
        assert!(p.admit(&api, &svc("web"), &limits, now).is_ok());
        assert!(
            p.admit(&api, &svc("web"), &limits, now).is_err(),
            "web's 2/s"
        );
        assert!(
            p.admit(&api, &svc("batch"), &limits, now).is_ok(),
            "its own bucket"
        );
        assert!(
            p.admit(&api, &svc("batch"), &limits, now).is_err(),
            "the '*' 1/s"
        );
        assert!(
            p.admit(&api, &svc("batch"), &[], now).is_ok(),
            "no limit: no bucket"
        );
        for i in 0..MAX_BUCKETS + 100 {
            let _ = p.admit(&api, &svc(&format!("s{i}")), &limits, now);
        }
        let n = p.buckets.lock().unwrap().len();
        assert!(n <= MAX_BUCKETS + 1, "bounded: {n}");
        // Past the bound, unnamed sources share one bucket (drained by the sources past
        // the bound in the loop above): still limited, never free.
        let r: Vec<bool> = (0..3)
            .map(|i| {
                p.admit(&api, &svc(&format!("late{i}")), &limits, now)
                    .is_ok()
            })
            .collect();
        assert_eq!(r, [false, false, false], "{r:?}");
        // Named sources keep their own buckets whatever the table holds.
        assert!(p
            .admit(&api, &svc("web"), &limits, now + Duration::from_secs(1))
            .is_ok());
    }
}
