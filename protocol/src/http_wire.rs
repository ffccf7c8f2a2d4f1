//! One HTTP exchange on one tunnel stream, framed: no HTTP/1.1 or HTTP/2 connection is
//! built on the stream at either end. Pure: the messages and the body's chunk codec.
//!
//! The sending node (an `http` upstream) opens the stream with a [`RequestOpen`] frame in
//! place of the [`StreamHeader`]: the stream header and the request head in one frame.
//! Then the request body as chunks ([`Chunk`]): data, at most one trailers chunk, and an
//! end chunk. The receiving node answers with the usual [`crate::wire::StreamReply`]
//! frame, then a [`ResponseHead`] frame and the response body as chunks.
//!
//! The end of a body is its end chunk, never the end of the stream: a stream that ends
//! (or is reset) before the end chunk is a truncated body, whatever the transport says.
//! After both end chunks the stream ends, except when the request asked to switch
//! protocols ([`RequestHead::upgrade`]) and the answer is 101: then the stream carries
//! the new protocol's bytes both ways, raw.

use serde::{Deserialize, Serialize};

use crate::wire::{decode, DecodeError, Message, StreamHeader, FRAME_HEADER_LEN, WIRE_VERSION};

/// The largest request or response head (and trailers) carried: 64 KiB of names and
/// values, as much as common servers accept in a request head.
pub const MAX_HEAD: usize = 64 * 1024;

/// A header field as it came: the name (lower-case, as the HTTP libraries keep it) and
/// the value's bytes (not always UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    pub value: Vec<u8>,
}

/// The HTTP version the client spoke: the destination speaks the same to its service
/// (gRPC needs HTTP/2 end to end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    Http10,
    Http11,
    Http2,
}

/// A request as the sending node forwards it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    pub method: String,
    /// The request target: origin-form (`/path?query`), or absolute-form for HTTP/2
    /// (`scheme://authority/path`, the authority being `:authority`).
    pub target: String,
    pub version: Version,
    pub headers: Vec<Field>,
    /// The request asks to switch protocols (`Connection: upgrade`); when the answer is
    /// 101 the stream carries the new protocol after the bodies.
    pub upgrade: bool,
}

/// Opens a stream that carries one HTTP request: the stream header and the request head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestOpen {
    pub stream: StreamHeader,
    pub head: RequestHead,
}

impl Message for RequestOpen {
    const KIND: u8 = 5;
    const MAX_LEN: usize = MAX_HEAD + 1024;
}

/// The response head, after an accepting [`crate::wire::StreamReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<Field>,
}

impl Message for ResponseHead {
    const KIND: u8 = 6;
    const MAX_LEN: usize = MAX_HEAD + 64;
}

/// A body's trailers (gRPC's status rides here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailers {
    pub headers: Vec<Field>,
}

impl Message for Trailers {
    const KIND: u8 = 7;
    const MAX_LEN: usize = MAX_HEAD + 64;
}

/// What opens a tunnel stream: a byte stream's header, or an HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    Stream(StreamHeader),
    Request(Box<RequestOpen>),
}

impl Opening {
    /// The largest opening frame body.
    pub const MAX_LEN: usize = RequestOpen::MAX_LEN;

    /// The stream header, whichever opening it is.
    pub fn header(&self) -> &StreamHeader {
        match self {
            Opening::Stream(h) => h,
            Opening::Request(r) => &r.stream,
        }
    }

    /// Reads a frame's body length from its prefix (refused before the body is read when
    /// it is longer than any opening).
    pub fn frame_len(prefix: [u8; FRAME_HEADER_LEN]) -> Result<usize, DecodeError> {
        crate::wire::frame_len::<RequestOpen>(prefix)
    }

    /// Decodes an opening frame's body by its kind (each kind keeps its own length limit).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        match body {
            [WIRE_VERSION, kind, ..] if *kind == RequestOpen::KIND => {
                Ok(Opening::Request(Box::new(decode(body)?)))
            }
            _ => Ok(Opening::Stream(decode(body)?)),
        }
    }
}

/// Bytes of a chunk's prefix.
pub const CHUNK_PREFIX_LEN: usize = 4;
/// The largest data chunk a sender writes (a receiver takes any length up to
/// [`MAX_CHUNK`], delivered as it arrives).
pub const DATA_CHUNK: usize = 64 * 1024;
/// The largest chunk length a prefix may name.
pub const MAX_CHUNK: usize = (1 << 30) - 1;

const DATA: u32 = 0;
const TRAILERS: u32 = 1;
const END: u32 = 2;

/// A body chunk's prefix: 4 bytes big-endian, the top two bits its kind, the rest its
/// length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// `len` bytes of body (never zero).
    Data(usize),
    /// A [`Trailers`] frame body of `len` bytes; the end chunk follows.
    Trailers(usize),
    /// The body is complete.
    End,
}

impl Chunk {
    /// The prefix of this chunk.
    pub fn prefix(self) -> [u8; CHUNK_PREFIX_LEN] {
        let (kind, len) = match self {
            Chunk::Data(n) => (DATA, n),
            Chunk::Trailers(n) => (TRAILERS, n),
            Chunk::End => (END, 0),
        };
        ((kind << 30) | (len.min(MAX_CHUNK) as u32)).to_be_bytes()
    }

    /// Reads a prefix: a kind this build knows, a length within bounds (data chunks are
    /// never empty, trailers never longer than [`Trailers::MAX_LEN`], the end carries
    /// nothing).
    pub fn parse(prefix: [u8; CHUNK_PREFIX_LEN]) -> Result<Self, DecodeError> {
        let word = u32::from_be_bytes(prefix);
        let len = (word & MAX_CHUNK as u32) as usize;
        match word >> 30 {
            DATA if len > 0 => Ok(Chunk::Data(len)),
            DATA => Err(DecodeError::Malformed("an empty data chunk".into())),
            TRAILERS if len > Trailers::MAX_LEN => Err(DecodeError::TooLong {
                len,
                max: Trailers::MAX_LEN,
            }),
            TRAILERS => Ok(Chunk::Trailers(len)),
            END if len == 0 => Ok(Chunk::End),
            END => Err(DecodeError::Malformed("an end chunk with a length".into())),
            other => Err(DecodeError::Malformed(format!(
                "unknown chunk kind {other}"
            ))),
        }
    }
}

/// A trailers chunk: its prefix, then the encoded [`Trailers`].
pub fn encode_trailers(t: &Trailers) -> Vec<u8> {
    let body = crate::wire::encode(t);
    let mut out = Vec::with_capacity(CHUNK_PREFIX_LEN + body.len());
    out.extend_from_slice(&Chunk::Trailers(body.len()).prefix());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::ServiceName;
    use crate::wire::encode_frame;

    fn open() -> RequestOpen {
        RequestOpen {
            stream: StreamHeader {
                src_service: ServiceName::new("web").unwrap(),
                dst_service: ServiceName::new("api").unwrap(),
                flow_id: 7,
            },
            head: RequestHead {
                method: "GET".into(),
                target: "/v1/items?x=1".into(),
                version: Version::Http11,
                headers: vec![Field {
                    name: "x-tenant".into(),
                    value: vec![0xff, b'a'],
                }],
                upgrade: false,
            },
        }
    }

    fn body_of(frame: &[u8]) -> &[u8] {
        &frame[FRAME_HEADER_LEN..]
    }

    #[test]
    fn an_opening_is_told_apart_by_its_kind() {
        let o = open();
        let f = encode_frame(&o);
        let len = Opening::frame_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, f.len() - 4);
        assert_eq!(
            Opening::decode(body_of(&f)).unwrap(),
            Opening::Request(Box::new(o.clone()))
        );
        let f = encode_frame(&o.stream);
        assert_eq!(
            Opening::decode(body_of(&f)).unwrap(),
            Opening::Stream(o.stream)
        );
    }

    #[test]
    fn an_opening_keeps_each_kinds_limit() {
        // A stream header padded past its own 512-byte limit is refused even though an
        // opening frame may be longer.
        let mut body = crate::wire::encode(&open().stream);
        body.resize(StreamHeader::MAX_LEN + 1, 0);
        assert!(matches!(
            Opening::decode(&body),
            Err(DecodeError::TooLong { .. })
        ));
        let too_long = ((Opening::MAX_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            Opening::frame_len(too_long),
            Err(DecodeError::TooLong { .. })
        ));
        // Another kind (a reply) is not an opening.
        let reply = crate::wire::encode(&crate::wire::StreamReply::Accept);
        assert!(matches!(
            Opening::decode(&reply),
            Err(DecodeError::Kind { .. })
        ));
        // Truncated and trailing bytes are refused.
        let f = encode_frame(&open());
        let b = body_of(&f);
        assert_eq!(
            Opening::decode(&b[..b.len() - 1]),
            Err(DecodeError::Truncated)
        );
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(Opening::decode(&long), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn chunk_prefixes_round_trip_and_bad_ones_are_refused() {
        for c in [
            Chunk::Data(1),
            Chunk::Data(DATA_CHUNK),
            Chunk::Trailers(9),
            Chunk::End,
        ] {
            assert_eq!(Chunk::parse(c.prefix()), Ok(c));
        }
        assert!(Chunk::parse(Chunk::Data(0).prefix()).is_err(), "empty data");
        assert!(Chunk::parse([0xc0, 0, 0, 0]).is_err(), "unknown kind");
        assert!(Chunk::parse([0x80, 0, 0, 1]).is_err(), "end with a length");
        assert!(matches!(
            Chunk::parse(Chunk::Trailers(Trailers::MAX_LEN + 1).prefix()),
            Err(DecodeError::TooLong { .. })
        ));
        let t = Trailers {
            headers: vec![Field {
                name: "grpc-status".into(),
                value: b"0".to_vec(),
            }],
        };
        let enc = encode_trailers(&t);
        let Chunk::Trailers(n) = Chunk::parse(enc[..4].try_into().unwrap()).unwrap() else {
            panic!("not trailers")
        };
        assert_eq!(decode::<Trailers>(&enc[4..4 + n]).unwrap(), t);
    }
}
