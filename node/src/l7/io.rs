//! A tunnel stream as the byte stream hyper drives, and the egress's version of it that
//! reads the ingress's answer before the HTTP response: the stream header and the request
//! leave together, and the answer (accept, or a reject code) is read when hyper first
//! reads, so a request costs no round trip of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use quicmesh_protocol::wire::{RejectCode, StreamReply};
use tokio::io::{AsyncRead, ReadBuf};

use crate::frame::read_frame;

/// A tunnel stream's two halves as one duplex byte stream.
pub type StreamIo<R> = tokio::io::Join<R, quinn::SendStream>;

/// Joins a stream's halves.
pub fn duplex<R: AsyncRead>(recv: R, send: quinn::SendStream) -> StreamIo<R> {
    tokio::io::join(recv, send)
}

/// What the ingress answered, once it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Accepted,
    Rejected(RejectCode, Option<String>),
    /// The stream ended or failed before an answer.
    Failed(String),
}

type Pending = Pin<Box<dyn Future<Output = (quinn::RecvStream, Answer)> + Send>>;

enum State {
    Waiting(Pending),
    Open(quinn::RecvStream),
    Done,
}

/// The receiving half of an egress stream: yields the HTTP bytes after the ingress's
/// answer, and records the answer where the sender can read it.
pub struct AfterAnswer {
    state: State,
    answer: Arc<OnceLock<Answer>>,
}

impl std::fmt::Debug for AfterAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfterAnswer")
            .field("answer", &self.answer.get())
            .finish_non_exhaustive()
    }
}

impl AfterAnswer {
    /// Wraps `recv`; the returned cell holds the answer once it came.
    pub fn new(mut recv: quinn::RecvStream) -> (Self, Arc<OnceLock<Answer>>) {
        let answer = Arc::new(OnceLock::new());
        let pending: Pending = Box::pin(async move {
            let a = match read_frame::<StreamReply, _>(&mut recv).await {
                Ok(Some(StreamReply::Accept)) => Answer::Accepted,
                Ok(Some(StreamReply::Reject { code, rule })) => Answer::Rejected(code, rule),
                Ok(None) => Answer::Failed("stream closed before an answer".into()),
                Err(e) => Answer::Failed(e.to_string()),
            };
            (recv, a)
        });
        let me = Self {
            state: State::Waiting(pending),
            answer: answer.clone(),
        };
        (me, answer)
    }
}

impl AsyncRead for AfterAnswer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            match &mut self.state {
                State::Waiting(f) => {
                    let (recv, answer) = ready!(f.as_mut().poll(cx));
                    let accepted = answer == Answer::Accepted;
                    let _ = self.answer.set(answer);
                    self.state = if accepted {
                        State::Open(recv)
                    } else {
                        State::Done
                    };
                }
                State::Open(r) => return Pin::new(r).poll_read(cx, buf),
                State::Done => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "the ingress refused the stream",
                    )))
                }
            }
        }
    }
}

/// Counts a byte stream's activity: when it last moved a byte.
#[derive(Debug)]
pub struct Active<T> {
    inner: T,
    clock: Arc<Activity>,
}

/// When a stream last moved a byte, in milliseconds from its start.
#[derive(Debug)]
pub struct Activity {
    start: std::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since a byte moved.
    pub fn idle(&self) -> std::time::Duration {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.start
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(last))
    }

    /// Resolves once nothing moved for `limit`.
    pub async fn idle_for(&self, limit: std::time::Duration) {
        loop {
            let idle = self.idle();
            if idle >= limit {
                return;
            }
            tokio::time::sleep((limit - idle).max(std::time::Duration::from_millis(100))).await;
        }
    }
}

impl<T> Active<T> {
    pub fn new(inner: T) -> (Self, Arc<Activity>) {
        let clock = Arc::new(Activity {
            start: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        });
        (
            Self {
                inner,
                clock: clock.clone(),
            },
            clock,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
