//! A request body that can be sent again: a try streams it as it comes and keeps a copy
//! of up to [`REPLAY_LIMIT`] bytes; a later try sends the copy, then the rest of the body
//! from where the last try left it. A longer body, or one with trailers, is sent once.
//! Nothing waits for the body before the first try (a streaming client is never held
//! up), and a try that failed before reading the body leaves it whole for the next.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

use super::{boxed, Body, BoxError};

/// Request bodies up to this size are kept so the request can be sent again.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The body and what the tries have read of it.
#[derive(Debug)]
pub struct Shared {
    inner: Incoming,
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
pub struct Replay(Arc<Mutex<Shared>>);

impl Replay {
    pub fn new(inner: Incoming) -> Self {
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
struct Tee {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    prefix: Option<Bytes>,
}

impl hyper::body::Body for Tee {
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
        polled.map_err(Into::into)
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
