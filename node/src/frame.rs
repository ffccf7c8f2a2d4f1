//! Length-prefixed frames of [`quicmesh_protocol::wire`] messages over async streams.

use quicmesh_protocol::http_wire::Opening;
use quicmesh_protocol::wire::{self, DecodeError, Message, FRAME_HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_frame<M: Message, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<M>, FrameError> {
    Ok(read_frame_sized(r).await?.map(|(m, _)| m))
}

/// [`read_frame`], with the size of the frame's body.
pub async fn read_frame_sized<M: Message, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(M, usize)>, FrameError> {
    match read_body(r, wire::frame_len::<M>).await? {
        Some(body) => Ok(Some((wire::decode(&body)?, body.len()))),
        None => Ok(None),
    }
}

/// Reads the frame that opens a tunnel stream ([`Opening`]); `Ok(None)` on a clean end of
/// stream before it starts.
pub async fn read_opening<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Opening>, FrameError> {
    match read_body(r, Opening::frame_len).await? {
        Some(body) => Ok(Some(Opening::decode(&body)?)),
        None => Ok(None),
    }
}

/// Reads one frame's body, its length checked by `frame_len` before it is read.
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    frame_len: fn([u8; FRAME_HEADER_LEN]) -> Result<usize, DecodeError>,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut body = Vec::new();
    Ok(read_body_into(r, frame_len, &mut body)
        .await?
        .then_some(body))
}

/// [`read_body`] into `body`; `false` on a clean end of stream before the frame starts.
async fn read_body_into<R: AsyncRead + Unpin>(
    r: &mut R,
    frame_len: fn([u8; FRAME_HEADER_LEN]) -> Result<usize, DecodeError>,
    body: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    let mut prefix = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = r.read(&mut prefix[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(DecodeError::Truncated.into());
        }
        got += n;
    }
    let len = frame_len(prefix)?;
    // Grown as the bytes come, not sized by the prefix: a peer that names a long frame
    // and sends nothing holds little.
    body.clear();
    body.reserve(len.min(1024));
    (&mut *r).take(len as u64).read_to_end(body).await?;
    if body.len() < len {
        return Err(DecodeError::Truncated.into());
    }
    Ok(true)
}

/// Writes one frame.
pub async fn write_frame<M: Message, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &M,
) -> Result<(), FrameError> {
    w.write_all(&wire::encode_frame(msg)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_protocol::http_wire::RequestOpen;
    use quicmesh_protocol::wire::StreamHeader;

    fn header() -> StreamHeader {
        StreamHeader {
            src_service: quicmesh_protocol::ident::ServiceName::new("web").unwrap(),
            dst_service: quicmesh_protocol::ident::ServiceName::new("api").unwrap(),
            flow_id: 1,
        }
    }

    #[tokio::test]
    async fn an_opening_is_read_whole_or_refused() {
        let f = wire::encode_frame(&header());
        let got = read_opening(&mut &f[..]).await.unwrap().unwrap();
        assert_eq!(got.header(), &header());
        assert!(
            read_opening(&mut &[][..]).await.unwrap().is_none(),
            "a clean end"
        );
        // A prefix naming a long frame, then too few bytes: truncated, however long
        // the prefix said it would be.
        let mut short = (RequestOpen::MAX_LEN as u32).to_be_bytes().to_vec();
        short.extend_from_slice(&[1, 5, 0]);
        assert!(matches!(
            read_opening(&mut &short[..]).await,
            Err(FrameError::Decode(DecodeError::Truncated))
        ));
        let long = ((RequestOpen::MAX_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_opening(&mut &long[..]).await,
            Err(FrameError::Decode(DecodeError::TooLong { .. }))
        ));
    }

    /// Every tunnel stream may open with a prefix naming the longest frame and then send
    /// nothing: memory held must follow the bytes received, not the length claimed (a
    /// tunnel has thousands of streams).
    #[tokio::test]
    async fn a_frame_s_buffer_grows_with_the_bytes_received_not_the_length_claimed() {
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        let mut claim = (RequestOpen::MAX_LEN as u32).to_be_bytes().to_vec();
        claim.extend_from_slice(&[1, 5, 0]);
        tx.write_all(&claim).await.unwrap();
        let mut body = Vec::new();
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            read_body_into(&mut rx, Opening::frame_len, &mut body),
        )
        .await;
        assert!(waited.is_err(), "still waiting for the rest: {waited:?}");
        assert_eq!(body, [1, 5, 0]);
        assert!(
            body.capacity() <= 4096,
            "{} bytes held for 3 received (claimed {})",
            body.capacity(),
            RequestOpen::MAX_LEN
        );
        // Allowed twin: a whole long frame is read whole.
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        let mut whole = (60_000u32).to_be_bytes().to_vec();
        whole.extend_from_slice(&[7u8; 60_000]);
        tx.write_all(&whole).await.unwrap();
        let mut body = Vec::new();
        assert!(read_body_into(&mut rx, Opening::frame_len, &mut body)
            .await
            .unwrap());
        assert_eq!(body.len(), 60_000);
    }
}
