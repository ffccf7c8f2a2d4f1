//! A request body that can be sent again: a try streams it as it comes and keeps a copy
//! of up to [`REPLAY_LIMIT`] bytes; a later try sends the copy, then the rest of the body
//! from where the last try left it. A longer body, or one with trailers, is sent once.
//! Nothing waits for the body before the first try (a streaming client is never held
//! up), and a try that failed before reading the body leaves it whole for the next.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, Incoming, SizeHint};

use super::{boxed, Body, BoxError};

/// Request bodies up to this size are kept so the request can be sent again.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The body and what the tries have read of it.
#[derive(Debug)]
pub struct Shared<B = Incoming> {
    inner: B,
    /// Everything read so far, while it fits.
    copy: BytesMut,
    /// Too long, or trailers: what was read cannot be sent again.
    spoilt: bool,
    ended: bool,
    /// The client's body failed (reset, bad chunking): its fault, not an instance's.
    client_failed: bool,
    /// The try allowed to read: an older try's body reads nothing more.
    generation: u64,
}

/// A request's body across its tries.
#[derive(Debug)]
pub struct Replay<B = Incoming>(Arc<Mutex<Shared<B>>>);

impl<B> Replay<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub fn new(inner: B) -> Self {
        // An empty body is never polled: it is whole already.
        let ended = inner.is_end_stream();
        Self(Arc::new(Mutex::new(Shared {
            inner,
            copy: BytesMut::new(),
            spoilt: false,
            ended,
            client_failed: false,
            generation: 0,
        })))
    }

    /// Whether the body can be sent (again): nothing of it was lost.
    pub fn available(&self) -> bool {
        self.0.lock().is_ok_and(|s| !s.spoilt)
    }

    /// Whether the whole body was read (sent whole by the last try that read it).
    pub fn whole(&self) -> bool {
        self.0.lock().is_ok_and(|s| s.ended)
    }

    /// Whether the client's body failed while a try read it.
    pub fn client_failed(&self) -> bool {
        self.0.lock().is_ok_and(|s| s.client_failed)
    }

    /// The body for the next try (what earlier tries read, then the rest); `None` when it
    /// cannot be sent again.
    pub fn take(&mut self) -> Option<Body> {
        let mut s = self.0.lock().ok()?;
        if s.spoilt {
            return None;
        }
        s.generation += 1;
        let prefix = s.copy.clone().freeze();
        Some(boxed(Tee {
            shared: self.0.clone(),
            generation: s.generation,
            prefix: (!prefix.is_empty()).then_some(prefix),
        }))
    }
}

/// One try's view of the body.
struct Tee<B> {
    shared: Arc<Mutex<Shared<B>>>,
    generation: u64,
    prefix: Option<Bytes>,
}

impl<B> hyper::body::Body for Tee<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        let shared = self.shared.clone();
        let Ok(mut s) = shared.lock() else {
            return Poll::Ready(Some(Err("request body lock poisoned".into())));
        };
        if s.generation != self.generation {
            return Poll::Ready(Some(Err("a later try took the request body".into())));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut s.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(d) if !s.spoilt && s.copy.len() + d.len() <= REPLAY_LIMIT => {
                    s.copy.extend_from_slice(d)
                }
                Some(_) | None => {
                    s.spoilt = true;
                    s.copy = BytesMut::new();
                }
            },
            Poll::Ready(None) => s.ended = true,
            Poll::Ready(Some(Err(_))) => {
                s.spoilt = true;
                s.client_failed = true;
            }
            Poll::Pending => {}
        }
        // A body of known length is not polled past its last byte.
        if s.inner.is_end_stream() {
            s.ended = true;
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self
                .shared
                .lock()
                .map_or(true, |s| s.ended && s.generation == self.generation)
    }

    fn size_hint(&self) -> SizeHint {
        let Ok(s) = self.shared.lock() else {
            return SizeHint::default();
        };
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let rest = s.inner.size_hint();
        let mut h = SizeHint::new();
        h.set_lower(prefix + rest.lower());
        if let Some(u) = rest.upper() {
            h.set_upper(prefix + u);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::body::Frame;

    /// A body of `chunks`, then optional trailers.
    fn body(chunks: &[&[u8]], trailers: bool) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        if trailers {
            frames.push(Ok(Frame::trailers(hyper::HeaderMap::new())));
        }
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    async fn read(b: Body) -> Result<Vec<u8>, BoxError> {
        Ok(b.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_small_body_is_sent_again_whole_and_a_long_one_only_once() {
        let mut r = Replay::new(body(&[b"ab", b"cd"], false));
        assert!(r.available());
        assert_eq!(read(r.take().unwrap()).await.unwrap(), b"abcd");
        assert!(r.whole() && r.available(), "kept: it can go again");
        assert_eq!(
            read(r.take().unwrap()).await.unwrap(),
            b"abcd",
            "the retry sends the copy"
        );
        let big = vec![7u8; REPLAY_LIMIT];
        let mut r = Replay::new(body(&[&big, b"x"], false));
        assert_eq!(
            read(r.take().unwrap()).await.unwrap().len(),
            REPLAY_LIMIT + 1
        );
        assert!(!r.available(), "over the limit: not kept");
        assert!(r.take().is_none());
        let mut r = Replay::new(body(&[b"ab"], true));
        let _ = read(r.take().unwrap()).await;
        assert!(!r.available(), "trailers are not kept");
    }

    #[tokio::test]
    async fn a_try_that_read_half_leaves_the_rest_for_the_next_and_the_old_one_reads_nothing() {
        let mut r = Replay::new(body(&[b"one", b"two"], false));
        let mut first = r.take().unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"one"));
        // The try failed here; the next one gets what was read, then the rest.
        let second = r.take().unwrap();
        assert!(
            first.frame().await.unwrap().is_err(),
            "the old try reads no more"
        );
        assert_eq!(read(second).await.unwrap(), b"onetwo");
    }

    #[tokio::test]
    async fn a_broken_client_body_is_the_client_s_fault() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err("reset".into()),
        ];
        let mut r = Replay::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed(),
        );
        assert!(read(r.take().unwrap()).await.is_err());
        assert!(r.client_failed() && !r.available());
    }
}
