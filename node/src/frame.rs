//! Length-prefixed frames of [`quicmesh_protocol::wire`] messages over async streams.

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
    let mut prefix = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = r.read(&mut prefix[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(DecodeError::Truncated.into());
        }
        got += n;
    }
    let len = wire::frame_len::<M>(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Decode(DecodeError::Truncated)
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(Some((wire::decode(&body)?, len)))
}

/// Writes one frame.
pub async fn write_frame<M: Message, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &M,
) -> Result<(), FrameError> {
    w.write_all(&wire::encode_frame(msg)).await?;
    Ok(())
}
