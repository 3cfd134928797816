//! Frame layout, limits and the (de)serialisation of payloads.
//!
//! ```text
//! 0      4        6        8                12
//! +------+--------+--------+----------------+----------------
//! | VMLT | version| flags  | payload length |  bincode payload
//! +------+--------+--------+----------------+----------------
//!          u16 LE   u16 LE     u32 LE
//! ```
//!
//! `version` is the framing version: a reader refuses frames of a version it
//! does not speak before reading their payload. The message-level protocol
//! version is negotiated separately by the `Hello` messages.

use std::io::{self, Read, Write};

use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"VMLT";
/// The framing version written into every header.
pub const FRAME_VERSION: u16 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;
/// The largest payload any frame may carry, in bytes.
///
/// The biggest legitimate messages are stdio chunks (at most
/// [`MAX_CHUNK`] bytes plus a few bytes of framing) and list/inspect replies
/// for a host's VMs; 1 MiB leaves ample room for both. Anything larger is a
/// bug or an attack, and is refused before a buffer is allocated for it.
pub const MAX_FRAME_LEN: u32 = 1 << 20;
/// The largest stdio chunk a peer sends in one message.
pub const MAX_CHUNK: usize = 64 * 1024;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Framing version of the frame.
    pub version: u16,
    /// Reserved; zero in version 1.
    pub flags: u16,
    /// Payload length in bytes.
    pub len: u32,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The underlying stream failed.
    #[error("frame i/o failed")]
    Io(#[from] io::Error),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The frame did not start with [`MAGIC`].
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The frame's framing version is not one this side speaks.
    #[error("unsupported frame version {0} (this side speaks {FRAME_VERSION})")]
    BadVersion(u16),
    /// The header announces a payload larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced payload length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// The payload is not a valid message.
    #[error("malformed payload: {0}")]
    Malformed(String),
}

impl FrameError {
    /// Whether the stream can still be used after this error. Only a
    /// malformed payload leaves the framing intact (the whole frame was
    /// consumed); every other error means the byte stream is out of step.
    pub fn stream_usable(&self) -> bool {
        matches!(self, FrameError::Malformed(_))
    }
}

fn options(limit: u32) -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_limit(u64::from(limit))
        .with_little_endian()
        .with_varint_encoding()
        .reject_trailing_bytes()
}

impl Header {
    /// Parses and validates a header: magic, version, and `len <= max`.
    pub fn parse(bytes: &[u8; HEADER_LEN], max: u32) -> Result<Header, FrameError> {
        let magic: [u8; 4] = bytes[0..4].try_into().expect("slice of 4");
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != FRAME_VERSION {
            return Err(FrameError::BadVersion(version));
        }
        let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
        let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(Header {
            version,
            flags,
            len,
        })
    }

    /// The header's wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// Encodes `msg` as one complete frame (header and payload).
///
/// Fails with [`FrameError::TooLarge`] if the payload would exceed
/// [`MAX_FRAME_LEN`]: a sender never produces a frame its peer must refuse.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let opts = options(MAX_FRAME_LEN);
    let len = opts.serialized_size(msg).map_err(|e| match *e {
        bincode::ErrorKind::SizeLimit => FrameError::TooLarge {
            len: u32::MAX,
            max: MAX_FRAME_LEN,
        },
        other => FrameError::Malformed(other.to_string()),
    })?;
    // serialized_size is bounded by the limit above, so this fits in u32.
    let len = len as u32;
    let mut buf = Vec::with_capacity(HEADER_LEN + len as usize);
    buf.extend_from_slice(
        &Header {
            version: FRAME_VERSION,
            flags: 0,
            len,
        }
        .to_bytes(),
    );
    opts.serialize_into(&mut buf, msg)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok(buf)
}

/// Decodes one payload (without its header), with a byte limit of
/// `payload.len()` so a lying length prefix inside the payload cannot make
/// bincode read, or keep, more than was actually received: the decode fails
/// at the lie.
///
/// Before it fails, serde may preallocate up to 1 MiB for a sequence whose
/// prefix lies (`serde::de::size_hint::cautious` caps the hint there; bincode
/// passes the claimed length through), freed at once. So one decode holds at
/// most about 1 MiB beyond what the payload explains; the fuzz targets in
/// `fuzz/` check that bound.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let limit = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    options(limit)
        .deserialize(payload)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads one frame from a blocking reader. Returns `Ok(None)` on a clean
/// end of stream before the first header byte.
pub fn read_frame<R: Read, T: DeserializeOwned>(
    r: &mut R,
    max: u32,
) -> Result<Option<T>, FrameError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let h = Header::parse(&hdr, max)?;
    let mut payload = vec![0u8; h.len as usize];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode(&payload).map(Some)
}

/// Writes one frame to a blocking writer.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    w.write_all(&buf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClientMessage, Request};

    #[test]
    fn roundtrip() {
        let msg = ClientMessage {
            id: 7,
            body: Request::Inspect { vm: "abc".into() },
        };
        let buf = encode(&msg).unwrap();
        let back: ClientMessage = read_frame(&mut &buf[..], MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn clean_eof_is_none_and_partial_is_truncated() {
        let none: Option<ClientMessage> = read_frame(&mut &[][..], MAX_FRAME_LEN).unwrap();
        assert!(none.is_none());
        let buf = encode(&ClientMessage {
            id: 1,
            body: Request::Version,
        })
        .unwrap();
        for cut in 1..buf.len() {
            let r: Result<Option<ClientMessage>, _> = read_frame(&mut &buf[..cut], MAX_FRAME_LEN);
            assert!(
                matches!(r, Err(FrameError::Truncated)),
                "cut at {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn oversized_header_refused_before_allocation() {
        let h = Header {
            version: FRAME_VERSION,
            flags: 0,
            len: u32::MAX,
        };
        let r: Result<Option<ClientMessage>, _> = read_frame(&mut &h.to_bytes()[..], MAX_FRAME_LEN);
        assert!(matches!(r, Err(FrameError::TooLarge { len: u32::MAX, .. })));
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = Header {
            version: FRAME_VERSION,
            flags: 0,
            len: 0,
        }
        .to_bytes();
        b[0] = b'X';
        assert!(matches!(
            Header::parse(&b, MAX_FRAME_LEN),
            Err(FrameError::BadMagic(_))
        ));
        let b = Header {
            version: 9,
            flags: 0,
            len: 0,
        }
        .to_bytes();
        assert!(matches!(
            Header::parse(&b, MAX_FRAME_LEN),
            Err(FrameError::BadVersion(9))
        ));
    }

    #[test]
    fn lying_inner_length_is_malformed_not_oom() {
        // A Vec<u8> whose varint length claims 2^60 bytes inside a tiny frame.
        let mut payload = vec![0x07]; // id = 7
        payload.push(0x0b); // some variant index
        payload.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        let r: Result<ClientMessage, _> = decode(&payload);
        assert!(matches!(r, Err(FrameError::Malformed(_))));
    }

    #[test]
    fn garbage_payloads_never_panic() {
        // A cheap deterministic fuzz: every prefix of pseudo-random bytes.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut bytes = Vec::new();
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
            let _ = decode::<ClientMessage>(&bytes);
            let _ = decode::<crate::guest::GuestMessage>(&bytes);
        }
    }
}
