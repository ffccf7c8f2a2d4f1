//! The table of live proxied flows, and the byte pump that carries one flow.
//!
//! Every flow is registered with who it belongs to, so a policy or revocation change can
//! find the flows no longer allowed and close them with a reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quicmesh_protocol::cert::PeerIdentity;
use quicmesh_protocol::ident::{NodeName, ServiceName};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::reason::CloseReason;

pub use crate::authz::{Direction, JudgedRequest};

/// What the table knows about a live flow.
#[derive(Debug, Clone, Serialize)]
pub struct FlowInfo {
    pub id: u64,
    pub direction: Direction,
    pub peer: NodeName,
    /// The peer's certificate identity, for the re-check of the flow.
    #[serde(skip)]
    pub peer_id: Arc<PeerIdentity>,
    pub src: ServiceName,
    pub dst: ServiceName,
    pub rule: String,
    /// The flow carries HTTP (an `http` service's connection, or one request of an `http`
    /// upstream): re-checked as such.
    pub http: bool,
    /// One request at an `http` service's ingress (its response or upgraded connection
    /// still going): re-judged as that request.
    #[serde(skip)]
    pub request: Option<Arc<JudgedRequest>>,
}

struct Entry {
    info: FlowInfo,
    kill: Option<oneshot::Sender<CloseReason>>,
}

/// Live flows.
#[derive(Default)]
pub struct Flows {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry>>,
}

impl std::fmt::Debug for Flows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flows").field("next", &self.next).finish()
    }
}

/// A flow's close signal that several parts of one request wait on (its answer, its
/// upload): the first to see it fire tells the others.
#[derive(Debug)]
pub struct SharedKill(Mutex<KillState>);

#[derive(Debug)]
struct KillState {
    rx: Option<oneshot::Receiver<CloseReason>>,
    reason: Option<CloseReason>,
    wakers: Vec<std::task::Waker>,
}

impl SharedKill {
    pub fn new(rx: oneshot::Receiver<CloseReason>) -> Arc<Self> {
        Arc::new(Self(Mutex::new(KillState {
            rx: Some(rx),
            reason: None,
            wakers: Vec::new(),
        })))
    }

    /// Ready with the reason once the flow is closed; never when its registration went
    /// away without one.
    pub fn poll_closed(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<CloseReason> {
        use std::future::Future;
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = st.reason {
            return std::task::Poll::Ready(r);
        }
        let polled = st.rx.as_mut().map(|rx| std::pin::Pin::new(rx).poll(cx));
        match polled {
            Some(std::task::Poll::Ready(Ok(r))) => {
                st.reason = Some(r);
                st.rx = None;
                for w in st.wakers.drain(..) {
                    w.wake();
                }
                std::task::Poll::Ready(r)
            }
            Some(std::task::Poll::Ready(Err(_))) => {
                st.rx = None;
                std::task::Poll::Pending
            }
            _ => {
                if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    st.wakers.push(cx.waker().clone());
                }
                std::task::Poll::Pending
            }
        }
    }

    /// Resolves with the reason once the flow is closed.
    pub async fn closed(&self) -> CloseReason {
        std::future::poll_fn(|cx| self.poll_closed(cx)).await
    }
}

/// Removes its flow from the table when dropped.
#[derive(Debug)]
pub struct FlowGuard {
    id: u64,
    flows: Arc<Flows>,
    metrics: Arc<Metrics>,
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.flows.map.lock() {
            m.remove(&self.id);
        }
        self.metrics.flows_active_add(-1);
    }
}

impl Flows {
    /// A fresh flow id (unique per node run).
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a flow; the receiver fires with a reason when the flow must close.
    pub fn register(
        self: &Arc<Self>,
        info: FlowInfo,
        metrics: &Arc<Metrics>,
    ) -> (FlowGuard, oneshot::Receiver<CloseReason>) {
        let (tx, rx) = oneshot::channel();
        let id = info.id;
        if let Ok(mut m) = self.map.lock() {
            m.insert(
                id,
                Entry {
                    info,
                    kill: Some(tx),
                },
            );
        }
        metrics.flows_active_add(1);
        (
            FlowGuard {
                id,
                flows: self.clone(),
                metrics: metrics.clone(),
            },
            rx,
        )
    }

    /// Closes every flow for which `verdict` returns a reason. Returns how many closed.
    pub fn recheck(&self, verdict: impl Fn(&FlowInfo) -> Option<CloseReason>) -> usize {
        let Ok(mut m) = self.map.lock() else { return 0 };
        let mut n = 0;
        for e in m.values_mut() {
            if let Some(reason) = verdict(&e.info) {
                if let Some(kill) = e.kill.take() {
                    let _ = kill.send(reason);
                    n += 1;
                }
            }
        }
        n
    }

    /// A copy of the table.
    pub fn list(&self) -> Vec<FlowInfo> {
        let Ok(m) = self.map.lock() else {
            return Vec::new();
        };
        let mut v: Vec<FlowInfo> = m.values().map(|e| e.info.clone()).collect();
        v.sort_by_key(|f| f.id);
        v
    }
}

/// How a pumped flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEnd {
    /// Both directions finished.
    Done,
    /// One side failed (reset, connection lost).
    Error,
    /// No bytes either way for the idle timeout.
    Idle,
    /// Closed by the node, with the reason.
    Killed(CloseReason),
}

/// Carries bytes both ways between a TCP connection and a tunnel stream, with half-close,
/// an idle timeout and a kill switch. `first` is what was already read from the TCP side
/// and goes to the tunnel before anything more is read.
#[allow(clippy::too_many_arguments)]
pub async fn pump(
    tcp: TcpStream,
    first: Vec<u8>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut kill: oneshot::Receiver<CloseReason>,
    idle: Duration,
    metrics: &Metrics,
    pair_bytes: Option<std::sync::Arc<AtomicU64>>,
) -> FlowEnd {
    let count = |n: usize| {
        if let Some(b) = &pair_bytes {
            b.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (mut tr, mut tw) = tcp.into_split();
    let end = {
        let to_tunnel = async {
            if !first.is_empty() {
                touch();
                send.write_all(&first).await.map_err(|_| ())?;
                metrics.bytes_to_tunnel(first.len() as u64);
                count(first.len());
            }
            drop(first);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = tr.read(&mut buf).await.map_err(|_| ())?;
                if n == 0 {
                    let _ = send.finish();
                    return Ok::<(), ()>(());
                }
                touch();
                send.write_all(&buf[..n]).await.map_err(|_| ())?;
                metrics.bytes_to_tunnel(n as u64);
                count(n);
            }
        };
        let from_tunnel = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => {
                        touch();
                        tw.write_all(&buf[..n]).await.map_err(|_| ())?;
                        metrics.bytes_from_tunnel(n as u64);
                        count(n);
                    }
                    Ok(None) => {
                        let _ = tw.shutdown().await;
                        return Ok::<(), ()>(());
                    }
                    Err(_) => return Err(()),
                }
            }
        };
        tokio::pin!(to_tunnel, from_tunnel);
        let (mut up_done, mut down_done) = (false, false);
        let mut tick = tokio::time::interval(Duration::from_millis(500).min(idle));
        let end = loop {
            tokio::select! {
                r = &mut to_tunnel, if !up_done => {
                    if r.is_err() { break FlowEnd::Error; }
                    up_done = true;
                }
                r = &mut from_tunnel, if !down_done => {
                    if r.is_err() { break FlowEnd::Error; }
                    down_done = true;
                }
                reason = &mut kill => {
                    break FlowEnd::Killed(reason.unwrap_or(CloseReason::NodeShutdown));
                }
                _ = tick.tick() => {
                    let idle_for = start.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
                    if idle_for >= idle.as_millis() as u64 {
                        break FlowEnd::Idle;
                    }
                }
            }
            if up_done && down_done {
                break FlowEnd::Done;
            }
        };
        end
    };
    if end != FlowEnd::Done {
        let code = quinn::VarInt::from_u32(match end {
            FlowEnd::Killed(_) => 1,
            FlowEnd::Idle => 2,
            _ => 3,
        });
        let _ = send.reset(code);
        let _ = recv.stop(code);
    }
    end
}

#[cfg(test)]
mod shared_kill_tests {
    use super::*;

    #[tokio::test]
    async fn every_waiter_hears_the_close_and_a_dropped_sender_is_no_close() {
        let (tx, rx) = oneshot::channel();
        let kill = SharedKill::new(rx);
        let (a, b) = (kill.clone(), kill.clone());
        let first = tokio::spawn(async move { a.closed().await });
        let second = tokio::spawn(async move { b.closed().await });
        tokio::task::yield_now().await;
        tx.send(CloseReason::PolicyChanged).unwrap();
        assert_eq!(first.await.unwrap(), CloseReason::PolicyChanged);
        assert_eq!(second.await.unwrap(), CloseReason::PolicyChanged);
        assert_eq!(
            kill.closed().await,
            CloseReason::PolicyChanged,
            "and later ones"
        );
        let (tx, rx) = oneshot::channel::<CloseReason>();
        let kill = SharedKill::new(rx);
        drop(tx);
        let waited = tokio::time::timeout(Duration::from_millis(50), kill.closed()).await;
        assert!(
            waited.is_err(),
            "a registration gone without a reason closes nothing"
        );
    }
}
