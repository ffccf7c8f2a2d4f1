//! One HTTP exchange on one tunnel stream, framed ([`quicmesh_protocol::http_wire`]):
//! heads as messages, bodies as chunks, no HTTP connection built on the stream. The
//! conversions between hyper's types and the wire's, the body read from a stream and the
//! body written to one.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use quicmesh_protocol::http_wire::{
    encode_trailers, Chunk, Field, RequestHead, ResponseHead, Trailers, Version, CHUNK_PREFIX_LEN,
    DATA_CHUNK,
};
use quicmesh_protocol::wire::{decode, DecodeError, StreamReply};

use super::io::Activity;
use super::{Body, BoxError};
use crate::frame::{read_frame, FrameError};
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt as _;

/// Where a body's chunks are read from: a tunnel stream's receiving half.
pub trait ChunkSource: Unpin + Send + Sync + 'static {
    /// Reads into `buf`; 0 at the end of the stream.
    fn poll_bytes(&mut self, cx: &mut Context<'_>, buf: &mut [u8])
        -> Poll<Result<usize, BoxError>>;
    /// Up to `max` bytes as they arrived, without a copy; `None` at the end of the stream.
    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<Option<Bytes>, BoxError>>;
}

impl ChunkSource for quinn::RecvStream {
    fn poll_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<Result<usize, BoxError>> {
        self.poll_read(cx, buf).map_err(Into::into)
    }

    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<Option<Bytes>, BoxError>> {
        // Cancel-safe: a fresh future per poll keeps its place in the stream.
        let read = std::pin::pin!(self.read_chunk(max, true));
        std::future::Future::poll(read, cx).map(|r| match r {
            Ok(c) => Ok(c.map(|c| c.bytes)),
            Err(e) => Err(e.into()),
        })
    }
}

/// A header map as wire fields.
pub fn fields(h: &HeaderMap) -> Vec<Field> {
    h.iter()
        .map(|(n, v)| Field {
            name: n.as_str().to_string(),
            value: v.as_bytes().to_vec(),
        })
        .collect()
}

/// Wire fields as a header map; the first name or value that is not valid HTTP refuses
/// them all.
pub fn header_map(fields: Vec<Field>) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| format!("header name {:?} is not a token", f.name))?;
        let value = HeaderValue::from_bytes(&f.value)
            .map_err(|_| format!("header {name} has a value HTTP does not allow"))?;
        h.append(name, value);
    }
    Ok(h)
}

/// The head of a request as it is sent on the stream.
pub fn request_head(parts: &hyper::http::request::Parts, upgrade: bool) -> RequestHead {
    RequestHead {
        method: parts.method.as_str().to_string(),
        target: parts.uri.to_string(),
        version: match parts.version {
            hyper::Version::HTTP_10 => Version::Http10,
            hyper::Version::HTTP_2 => Version::Http2,
            _ => Version::Http11,
        },
        headers: fields(&parts.headers),
        upgrade,
    }
}

/// A request from its head; what does not make a request names why. At most one valid
/// `content-length` (the service's client frames the body by it).
pub fn request(head: RequestHead, body: Body) -> Result<Request<Body>, String> {
    let method = Method::from_bytes(head.method.as_bytes())
        .map_err(|_| format!("method {:?} is not a token", head.method))?;
    let uri = Uri::try_from(head.target.as_str())
        .map_err(|_| format!("request target {:?} is not a URI", head.target))?;
    let headers = header_map(head.headers)?;
    // A request that switches protocols carries no body: a length would make the service
    // read the next request on its connection as this one's body.
    if head.upgrade {
        if !super::wants_upgrade(&headers) {
            return Err("an upgrade without `Connection: upgrade` and `Upgrade`".into());
        }
        if declares_body(&headers) {
            return Err("an upgrade request with a body length".into());
        }
    }
    let lengths = headers.get_all(hyper::header::CONTENT_LENGTH);
    let mut n = 0;
    for v in lengths {
        n += 1;
        if n > 1 || !v.as_bytes().iter().all(u8::is_ascii_digit) || v.is_empty() {
            return Err("content-length is repeated or not a number".into());
        }
    }
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = match head.version {
        Version::Http10 => hyper::Version::HTTP_10,
        Version::Http11 => hyper::Version::HTTP_11,
        Version::Http2 => hyper::Version::HTTP_2,
    };
    *req.headers_mut() = headers;
    Ok(req)
}

/// Whether request headers declare a body: a length other than 0, or a transfer coding.
pub fn declares_body(h: &HeaderMap) -> bool {
    h.get_all(hyper::header::CONTENT_LENGTH)
        .iter()
        .any(|v| v != "0")
        || h.contains_key(hyper::header::TRANSFER_ENCODING)
}

/// The head of a response as it is sent on the stream.
pub fn response_head<B>(resp: &Response<B>) -> ResponseHead {
    ResponseHead {
        status: resp.status().as_u16(),
        headers: fields(resp.headers()),
    }
}

/// A response from its head.
pub fn response(head: ResponseHead, body: Body) -> Result<Response<Body>, String> {
    let status = StatusCode::from_u16(head.status)
        .map_err(|_| format!("status {} is not an HTTP status", head.status))?;
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = header_map(head.headers)?;
    Ok(resp)
}

/// What the destination answered a framed request.
#[derive(Debug)]
pub enum Answer {
    Response(ResponseHead),
    Rejected(quicmesh_protocol::wire::RejectCode, Option<String>),
}

/// Reads the destination's answer: its stream reply, then (accepted) the response head.
pub async fn read_answer(recv: &mut quinn::RecvStream) -> Result<Answer, FrameError> {
    match read_frame::<StreamReply, _>(recv).await? {
        Some(StreamReply::Accept) => {}
        Some(StreamReply::Reject { code, rule }) => return Ok(Answer::Rejected(code, rule)),
        None => return Err(DecodeError::Truncated.into()),
    }
    match read_frame::<ResponseHead, _>(recv).await? {
        Some(h) => Ok(Answer::Response(h)),
        None => Err(DecodeError::Truncated.into()),
    }
}

/// Reads the one end chunk of a body that must be empty (a request that asks to switch
/// protocols), leaving the stream at the bytes after it.
pub async fn read_empty_body(recv: &mut quinn::RecvStream) -> Result<(), FrameError> {
    let mut prefix = [0u8; CHUNK_PREFIX_LEN];
    recv.read_exact(&mut prefix).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => FrameError::Decode(DecodeError::Truncated),
        quinn::ReadExactError::ReadError(e) => FrameError::Io(e.into()),
    })?;
    match Chunk::parse(prefix)? {
        Chunk::End => Ok(()),
        _ => Err(DecodeError::Malformed("a body where none may be".into()).into()),
    }
}

/// Why a body could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The body being sent failed (its own side's fault).
    #[error("body failed: {0}")]
    Body(BoxError),
    /// The stream failed.
    #[error("stream failed: {0}")]
    Stream(#[from] std::io::Error),
}

/// Writes `body` as chunks, then its end chunk (the stream stays open). `first`: bytes
/// that go out in front of the first chunk, in the same write (a head).
pub async fn send_body<W: AsyncWrite + Unpin>(
    body: &mut Body,
    send: &mut W,
    mut first: Vec<u8>,
    activity: Option<&Activity>,
) -> Result<(), SendError> {
    loop {
        // Polled to its end even when it says it is complete: a pooled connection goes
        // back to its pool only once its answer was read to the end.
        match body.frame().await {
            None => {
                first.extend_from_slice(&Chunk::End.prefix());
                send.write_all(&first).await?;
                return Ok(());
            }
            Some(Err(e)) => return Err(SendError::Body(e)),
            Some(Ok(frame)) => {
                if let Some(a) = activity {
                    a.touch();
                }
                match frame.into_data() {
                    Ok(mut data) => {
                        while !data.is_empty() {
                            let piece = data.split_to(data.len().min(DATA_CHUNK));
                            first.extend_from_slice(&Chunk::Data(piece.len()).prefix());
                            send.write_all(&first).await?;
                            send.write_all(&piece).await?;
                            first.clear();
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            let t = Trailers {
                                headers: fields(&t),
                            };
                            first.extend_from_slice(&encode_trailers(&t));
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// Reading a chunk prefix: the bytes so far.
    Prefix([u8; CHUNK_PREFIX_LEN], usize),
    /// Within a data chunk: bytes left.
    Data(usize),
    /// Reading a trailers chunk: what came, of how much.
    Trailers(Vec<u8>, usize),
    /// After the end chunk: the stream's own end, when it is already there.
    Fin,
    Done,
}

/// A body read from a stream's chunks, up to its end chunk. The stream ending or being
/// reset before it is an error: a truncated body is never taken for a whole one.
#[derive(Debug)]
pub struct ChunkBody<R: ChunkSource = quinn::RecvStream> {
    recv: R,
    phase: Phase,
    trailers_seen: bool,
    activity: Option<Arc<Activity>>,
}

impl<R: ChunkSource> ChunkBody<R> {
    pub fn new(recv: R, activity: Option<Arc<Activity>>) -> Self {
        Self {
            recv,
            phase: Phase::Prefix([0; CHUNK_PREFIX_LEN], 0),
            trailers_seen: false,
            activity,
        }
    }

    fn truncated() -> BoxError {
        "the stream ended before the body's end".into()
    }

    /// Ends the body with `e`: nothing more is read.
    fn fail(&mut self, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.phase = Phase::Done;
        Poll::Ready(Some(Err(e)))
    }

    /// Reads what is already there of the end chunk and the stream's end, without
    /// waiting. HTTP clients and servers stop reading a body once they have the length
    /// its head declared (or when a GET declares none); the stream would then be dropped
    /// unread and stopped: a STOP_SENDING the peer acknowledges, two packets per request,
    /// each waking the other node.
    fn finish_now(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..4 {
            match &mut self.phase {
                Phase::Prefix(buf, got) => match self.recv.poll_bytes(&mut cx, &mut buf[*got..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        *got += n;
                        if *got == CHUNK_PREFIX_LEN {
                            if Chunk::parse(*buf) != Ok(Chunk::End) {
                                return;
                            }
                            self.phase = Phase::Fin;
                        }
                    }
                    _ => return,
                },
                Phase::Fin => {
                    let mut one = [0u8; 1];
                    let _ = self.recv.poll_bytes(&mut cx, &mut one);
                    self.phase = Phase::Done;
                    return;
                }
                _ => return,
            }
        }
    }
}

impl<R: ChunkSource> Drop for ChunkBody<R> {
    fn drop(&mut self) {
        self.finish_now();
    }
}

impl<R: ChunkSource> hyper::body::Body for ChunkBody<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = &mut *self;
        loop {
            match &mut me.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Fin => {
                    // The stream's end normally comes with the end chunk: read it, so the
                    // stream closes quietly. Dropped unread, it would be stopped (a
                    // STOP_SENDING the peer must acknowledge: two more packets per request,
                    // each waking the other node). Not there yet: the body ends anyway.
                    let mut one = [0u8; 1];
                    let extra = match me.recv.poll_bytes(cx, &mut one) {
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(_)) | Poll::Pending => 0,
                    };
                    if extra > 0 {
                        return me.fail("bytes after the body's end".into());
                    }
                    me.phase = Phase::Done;
                    return Poll::Ready(None);
                }
                Phase::Prefix(buf, got) => {
                    let n = match ready!(me.recv.poll_bytes(cx, &mut buf[*got..])) {
                        Ok(0) => return me.fail(Self::truncated()),
                        Ok(n) => n,
                        Err(e) => return me.fail(e),
                    };
                    *got += n;
                    if *got < CHUNK_PREFIX_LEN {
                        continue;
                    }
                    me.phase = match Chunk::parse(*buf) {
                        Ok(Chunk::Data(_) | Chunk::Trailers(_)) if me.trailers_seen => {
                            return me.fail("a chunk after the trailers".into());
                        }
                        Ok(Chunk::Data(len)) => Phase::Data(len),
                        Ok(Chunk::Trailers(len)) => Phase::Trailers(Vec::with_capacity(len), len),
                        Ok(Chunk::End) => Phase::Fin,
                        Err(e) => return me.fail(e.into()),
                    };
                }
                Phase::Data(left) => {
                    let max = (*left).min(DATA_CHUNK);
                    let chunk = match ready!(me.recv.poll_piece(cx, max)) {
                        Ok(Some(c)) => c,
                        Ok(None) => return me.fail(Self::truncated()),
                        Err(e) => return me.fail(e),
                    };
                    *left -= chunk.len();
                    if *left == 0 {
                        me.phase = Phase::Prefix([0; CHUNK_PREFIX_LEN], 0);
                    }
                    if let Some(a) = &me.activity {
                        a.touch();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Phase::Trailers(buf, want) => {
                    let mut tmp = [0u8; 4096];
                    let room = (*want - buf.len()).min(tmp.len());
                    let n = match ready!(me.recv.poll_bytes(cx, &mut tmp[..room])) {
                        Ok(0) => return me.fail(Self::truncated()),
                        Ok(n) => n,
                        Err(e) => return me.fail(e),
                    };
                    buf.extend_from_slice(&tmp[..n]);
                    if buf.len() < *want {
                        continue;
                    }
                    let trailers = decode::<Trailers>(buf)
                        .map_err(|e| e.to_string())
                        .and_then(|t| header_map(t.headers));
                    me.trailers_seen = true;
                    me.phase = Phase::Prefix([0; CHUNK_PREFIX_LEN], 0);
                    return Poll::Ready(Some(match trailers {
                        Ok(t) => Ok(Frame::trailers(t)),
                        Err(e) => Err(e.into()),
                    }));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes as a stream delivers them, a few at a time, then its end or a reset.
    struct Wire {
        bytes: Bytes,
        reset: bool,
        /// Reads that found the stream's end.
        ends_read: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl ChunkSource for Wire {
        fn poll_bytes(
            &mut self,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<Result<usize, BoxError>> {
            if self.bytes.is_empty() && self.reset {
                return Poll::Ready(Err("reset by peer".into()));
            }
            let n = buf.len().min(self.bytes.len()).min(3);
            buf[..n].copy_from_slice(&self.bytes.split_to(n));
            if n == 0 {
                self.ends_read
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Poll::Ready(Ok(n))
        }

        fn poll_piece(
            &mut self,
            _: &mut Context<'_>,
            max: usize,
        ) -> Poll<Result<Option<Bytes>, BoxError>> {
            if self.bytes.is_empty() {
                return Poll::Ready(if self.reset {
                    Err("reset by peer".into())
                } else {
                    Ok(None)
                });
            }
            let n = max.min(self.bytes.len()).min(5);
            Poll::Ready(Ok(Some(self.bytes.split_to(n))))
        }
    }

    fn frames(parts: Vec<Frame<Bytes>>) -> Body {
        let items: Vec<Result<Frame<Bytes>, BoxError>> = parts.into_iter().map(Ok).collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(items)).boxed()
    }

    /// What `send_body` writes for `body`.
    async fn written(mut body: Body) -> Vec<u8> {
        let mut out = Vec::new();
        send_body(&mut body, &mut out, Vec::new(), None)
            .await
            .unwrap();
        out
    }

    async fn read_back(
        bytes: Vec<u8>,
        reset: bool,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        read_counting(bytes, reset).await.0
    }

    type Read = Result<(Vec<u8>, Option<HeaderMap>), BoxError>;

    /// What the body read, and how many reads found the stream's end.
    async fn read_counting(bytes: Vec<u8>, reset: bool) -> (Read, usize) {
        let ends = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let wire = Wire {
            bytes: bytes.into(),
            reset,
            ends_read: ends.clone(),
        };
        let read = match ChunkBody::new(wire, None).collect().await {
            Ok(got) => {
                let trailers = got.trailers().cloned();
                Ok((got.to_bytes().to_vec(), trailers))
            }
            Err(e) => Err(e),
        };
        (read, ends.load(std::sync::atomic::Ordering::Relaxed))
    }

    #[tokio::test]
    async fn the_stream_s_end_after_the_body_is_read_and_nothing_may_follow() {
        // Read to the stream's end: a stream dropped before it is stopped, which costs a
        // round of packets per request.
        let whole = written(frames(vec![Frame::data(Bytes::from_static(b"ok"))])).await;
        let (read, ends) = read_counting(whole.clone(), false).await;
        assert_eq!(read.unwrap().0, b"ok");
        assert_eq!(ends, 1, "the stream's end was read");
        // A reader that stops at the length it expected, or never reads an empty body:
        // dropped, the body still reads its end chunk and the stream's end.
        for (taken, bytes) in [(1, whole.clone()), (0, written(frames(vec![])).await)] {
            let ends = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let wire = Wire {
                bytes: bytes.into(),
                reset: false,
                ends_read: ends.clone(),
            };
            let mut body = ChunkBody::new(wire, None);
            for _ in 0..taken {
                assert!(body.frame().await.unwrap().unwrap().is_data());
            }
            drop(body);
            assert_eq!(
                ends.load(std::sync::atomic::Ordering::Relaxed),
                1,
                "taken {taken}"
            );
        }
        let mut more = whole;
        more.push(b'x');
        assert!(
            read_back(more, false).await.is_err(),
            "a byte after the end chunk"
        );
    }

    #[tokio::test]
    async fn a_body_and_its_trailers_cross_whole() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let big = vec![b'x'; DATA_CHUNK + 10];
        let body = frames(vec![
            Frame::data(Bytes::from_static(b"hello ")),
            Frame::data(Bytes::from(big.clone())),
            Frame::trailers(t.clone()),
        ]);
        let (data, trailers) = read_back(written(body).await, false).await.unwrap();
        assert_eq!(data.len(), 6 + big.len());
        assert_eq!(trailers, Some(t));
        let (data, trailers) = read_back(written(frames(vec![])).await, false)
            .await
            .unwrap();
        assert!(
            data.is_empty() && trailers.is_none(),
            "an empty body is its end chunk"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_never_a_shorter_body() {
        let whole = written(frames(vec![Frame::data(Bytes::from_static(
            b"transfer 100",
        ))]))
        .await;
        assert!(read_back(whole.clone(), false).await.is_ok());
        // Every cut before the end chunk: the stream ended (or was reset) early.
        for cut in 0..whole.len() {
            for reset in [false, true] {
                let r = read_back(whole[..cut].to_vec(), reset).await;
                assert!(
                    r.is_err(),
                    "cut at {cut} (reset {reset}) read as whole: {r:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn chunks_out_of_order_or_unknown_are_refused() {
        let data = Chunk::Data(1).prefix();
        let trailers = encode_trailers(&Trailers { headers: vec![] });
        let end = Chunk::End.prefix();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "data after trailers",
                [&trailers[..], &data, b"x", &end].concat(),
            ),
            ("two trailers", [&trailers[..], &trailers, &end].concat()),
            ("unknown kind", [&[0xc0, 0, 0, 1][..], b"x", &end].concat()),
            ("empty data", [&Chunk::Data(0).prefix()[..], &end].concat()),
            (
                "bad trailer name",
                encode_trailers(&Trailers {
                    headers: vec![Field {
                        name: "a b".into(),
                        value: b"1".to_vec(),
                    }],
                }),
            ),
        ];
        for (what, bytes) in cases {
            assert!(read_back(bytes, false).await.is_err(), "{what}");
        }
    }

    #[test]
    fn a_head_with_a_bad_header_or_two_lengths_is_refused() {
        let head = |headers: Vec<(&str, &[u8])>| RequestHead {
            method: "POST".into(),
            target: "/x".into(),
            version: Version::Http11,
            headers: headers
                .into_iter()
                .map(|(n, v)| Field {
                    name: n.into(),
                    value: v.to_vec(),
                })
                .collect(),
            upgrade: false,
        };
        let empty = || super::super::full(Bytes::new());
        assert!(request(head(vec![("content-length", b"3")]), empty()).is_ok());
        for bad in [
            vec![("content-length", &b"3"[..]), ("content-length", b"3")],
            vec![("content-length", b"-1")],
            vec![("content-length", b"")],
            vec![("bad name", b"1")],
            vec![("x", b"a\r\nb")],
        ] {
            assert!(request(head(bad.clone()), empty()).is_err(), "{bad:?}");
        }
        let mut h = head(vec![]);
        h.method = "GE T".into();
        assert!(request(h, empty()).is_err());
        // An upgrade must ask for it, and declare no body (a length would make the
        // service take the next request on its connection for this one's body).
        let upgrade = |extra: Vec<(&str, &[u8])>| {
            let mut h = head(
                [
                    vec![("connection", &b"upgrade"[..]), ("upgrade", b"websocket")],
                    extra,
                ]
                .concat(),
            );
            h.upgrade = true;
            request(h, empty())
        };
        assert!(upgrade(vec![]).is_ok());
        assert!(upgrade(vec![("content-length", b"0")]).is_ok());
        assert!(
            upgrade(vec![("content-length", b"40")]).is_err(),
            "smuggling length"
        );
        assert!(upgrade(vec![("transfer-encoding", b"chunked")]).is_err());
        let mut h = head(vec![]);
        h.upgrade = true;
        assert!(request(h, empty()).is_err(), "the flag without the headers");
    }

    #[test]
    fn heads_round_trip() {
        let req = Request::builder()
            .method("PUT")
            .uri("http://api.internal/a?b=1")
            .version(hyper::Version::HTTP_2)
            .header("x-a", "1")
            .header("x-a", "2")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let back = request(
            request_head(&parts, false),
            super::super::full(Bytes::new()),
        )
        .unwrap();
        assert_eq!(back.method(), Method::PUT);
        assert_eq!(back.uri(), &parts.uri);
        assert_eq!(back.version(), hyper::Version::HTTP_2);
        let a: Vec<_> = back.headers().get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"], "repeated values kept in order");
    }
}
