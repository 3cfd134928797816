//! Async frame I/O over tokio streams.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, FrameError, Header, HEADER_LEN};

/// Reads one frame whose payload is at most `max` bytes. Returns `Ok(None)`
/// on a clean end of stream at a frame boundary.
///
/// # Cancel safety
///
/// Not cancel safe: if the future is dropped part-way, the bytes already
/// read are lost and the stream is out of step. Read frames from one task
/// that owns the read half, and select on channels instead.
pub async fn read_frame<R, T>(r: &mut R, max: u32) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut hdr[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let h = Header::parse(&hdr, max)?;
    let mut payload = vec![0u8; h.len as usize];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
    frame::decode(&payload).map(Some)
}

/// Writes one frame and flushes it.
///
/// # Cancel safety
///
/// Not cancel safe: a dropped future may leave half a frame written.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let buf = frame::encode(msg)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestMessage;

    #[tokio::test]
    async fn roundtrip_over_duplex() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msgs: Vec<GuestMessage> = (0..100)
            .map(|i| GuestMessage::Stdout(vec![i as u8; i * 7]))
            .collect();
        let sent = msgs.clone();
        let w = tokio::spawn(async move {
            for m in &sent {
                write_frame(&mut a, m).await.unwrap();
            }
        });
        let mut got = Vec::new();
        while let Some(m) = read_frame::<_, GuestMessage>(&mut b, 1 << 20)
            .await
            .unwrap()
        {
            got.push(m);
        }
        w.await.unwrap();
        assert_eq!(got, msgs);
    }
}
