//! A tunnel stream as one byte stream (what hyper drives, what an upgraded connection
//! carries), and the clock of its activity.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// A tunnel stream's two halves as one duplex byte stream.
pub type StreamIo<R> = tokio::io::Join<R, quinn::SendStream>;

/// Joins a stream's halves.
pub fn duplex<R: AsyncRead>(recv: R, send: quinn::SendStream) -> StreamIo<R> {
    tokio::io::join(recv, send)
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
    /// A clock started now, for a stream whose reads and writes touch it themselves.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Records that a byte moved now.
    pub fn touch(&self) {
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
        let clock = Activity::new();
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
