//! The log store: every byte a guest writes, with its stream and arrival
//! time, appended to one file per VM.
//!
//! The file is the single source of truth for output. Attached clients and
//! `logs -f` readers do not receive pushed copies; each reads the file from
//! its own offset and waits on a watch channel for more. So a slow reader
//! slows only itself, no reader can make the agent buffer, and nothing a
//! guest wrote is lost whether or not anyone is attached.
//!
//! Record format, little endian: `stream: u8` (1 = stdout, 2 = stderr),
//! `timestamp_ns: u64`, `len: u32`, then `len` bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tokio::sync::watch;
use vmlet_protocol::api::Stream;

const REC_HDR: usize = 13;
/// Largest record the store writes; larger chunks are split.
const MAX_REC: usize = 256 * 1024;
/// How much a reader reads from the file at once.
const READ_CHUNK: usize = 256 * 1024;

/// How far the log has been written, and whether it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPos {
    /// Bytes in the file that readers may read.
    pub len: u64,
    /// No more records will be appended.
    pub sealed: bool,
}

/// One stored chunk of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Which stream.
    pub stream: Stream,
    /// Arrival time, nanoseconds since the epoch.
    pub timestamp_ns: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// The writing end of a VM's log; one per VM.
#[derive(Debug)]
pub struct LogWriter {
    file: File,
    len: u64,
    /// Payload bytes stored per stream (stdout, stderr): the offsets the
    /// tether resumes from after a broken connection.
    streams: (u64, u64),
    tx: watch::Sender<LogPos>,
}

/// A VM's log: the writer (while the VM may still produce output) and the
/// means to open readers.
#[derive(Debug)]
pub struct Log {
    path: PathBuf,
    rx: watch::Receiver<LogPos>,
}

/// Nanoseconds since the epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Log {
    /// Creates (or reopens for appending) the log at `path`.
    pub fn open(path: &Path) -> io::Result<(Log, LogWriter)> {
        // The container's output is the agent's to serve: not readable by
        // other users, a VMM's included.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let (len, streams) = scan(path)?;
        // A torn tail from a crash mid-write is cut off so the next record
        // starts on a boundary.
        file.set_len(len)?;
        let (tx, rx) = watch::channel(LogPos { len, sealed: false });
        Ok((
            Log {
                path: path.to_path_buf(),
                rx,
            },
            LogWriter {
                file,
                len,
                streams,
                tx,
            },
        ))
    }

    /// Opens a finished log read-only (a VM that exited before this agent
    /// started).
    pub fn open_sealed(path: &Path) -> io::Result<Log> {
        let len = if path.exists() { scan(path)?.0 } else { 0 };
        let (_tx, rx) = watch::channel(LogPos { len, sealed: true });
        Ok(Log {
            path: path.to_path_buf(),
            rx,
        })
    }

    /// Where the log is written so far.
    pub fn pos(&self) -> LogPos {
        *self.rx.borrow()
    }

    /// A reader starting at the first record, or at the current end.
    pub fn reader(&self, from_start: bool) -> io::Result<LogReader> {
        let file = match File::open(&self.path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let offset = if from_start { 0 } else { self.pos().len };
        Ok(LogReader {
            file,
            rx: self.rx.clone(),
            offset,
            buf: Vec::new(),
            buf_at: offset,
        })
    }
}

/// Walks the records to find the end of the last complete one, and the
/// payload bytes of each stream up to there.
fn scan(path: &Path) -> io::Result<(u64, (u64, u64))> {
    let f = File::open(path)?;
    let total = f.metadata()?.len();
    let mut off = 0u64;
    let mut streams = (0u64, 0u64);
    let mut hdr = [0u8; REC_HDR];
    while off + REC_HDR as u64 <= total {
        f.read_exact_at(&mut hdr, off)?;
        let len = u32::from_le_bytes(hdr[9..13].try_into().expect("4 bytes")) as u64;
        if !matches!(hdr[0], 1 | 2) || off + REC_HDR as u64 + len > total {
            break;
        }
        if hdr[0] == 1 {
            streams.0 += len;
        } else {
            streams.1 += len;
        }
        off += REC_HDR as u64 + len;
    }
    Ok((off, streams))
}

impl LogWriter {
    /// Appends a chunk of output and wakes readers. Returns the chunk's
    /// timestamp.
    pub fn append(&mut self, stream: Stream, data: &[u8]) -> io::Result<u64> {
        let ts = now_ns();
        for part in data.chunks(MAX_REC) {
            let mut rec = Vec::with_capacity(REC_HDR + part.len());
            rec.push(match stream {
                Stream::Stdout => 1,
                Stream::Stderr => 2,
            });
            rec.extend_from_slice(&ts.to_le_bytes());
            rec.extend_from_slice(&(part.len() as u32).to_le_bytes());
            rec.extend_from_slice(part);
            self.file.write_all(&rec)?;
            self.len += rec.len() as u64;
            match stream {
                Stream::Stdout => self.streams.0 += part.len() as u64,
                Stream::Stderr => self.streams.1 += part.len() as u64,
            }
        }
        self.tx.send_replace(LogPos {
            len: self.len,
            sealed: false,
        });
        Ok(ts)
    }

    /// Marks the log complete: readers drain it and end.
    pub fn seal(self) {
        let _ = self.file.sync_data();
        self.tx.send_replace(LogPos {
            len: self.len,
            sealed: true,
        });
    }

    /// Payload bytes stored per stream: (stdout, stderr).
    pub fn stream_bytes(&self) -> (u64, u64) {
        self.streams
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Reads a VM's log from an offset, optionally following new output.
#[derive(Debug)]
pub struct LogReader {
    file: Option<File>,
    rx: watch::Receiver<LogPos>,
    offset: u64,
    buf: Vec<u8>,
    buf_at: u64,
}

impl LogReader {
    /// The next record; with `follow`, waits for one until the log is
    /// sealed. `Ok(None)` at the end.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the offset only advances when a record is returned.
    pub async fn next(&mut self, follow: bool) -> io::Result<Option<Record>> {
        loop {
            if let Some(r) = self.parse_buffered() {
                return Ok(Some(r));
            }
            let pos = *self.rx.borrow_and_update();
            let end = self.buf_at + self.buf.len() as u64;
            if end < pos.len {
                self.fill(pos.len)?;
                continue;
            }
            if pos.sealed || !follow {
                return Ok(None);
            }
            if self.rx.changed().await.is_err() {
                // The writer is gone without sealing (the VM was removed):
                // whatever is in the file is all there will be.
                let pos = *self.rx.borrow();
                if self.buf_at + self.buf.len() as u64 >= pos.len {
                    return Ok(None);
                }
            }
        }
    }

    fn fill(&mut self, limit: u64) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let end = self.buf_at + self.buf.len() as u64;
        let want = ((limit - end) as usize).min(READ_CHUNK);
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        file.read_exact_at(&mut self.buf[old..], end)?;
        Ok(())
    }

    fn parse_buffered(&mut self) -> Option<Record> {
        let start = (self.offset - self.buf_at) as usize;
        let avail = &self.buf[start..];
        if avail.len() < REC_HDR {
            self.compact();
            return None;
        }
        let len = u32::from_le_bytes(avail[9..13].try_into().expect("4 bytes")) as usize;
        if avail.len() < REC_HDR + len {
            self.compact();
            return None;
        }
        let stream = if avail[0] == 2 {
            Stream::Stderr
        } else {
            Stream::Stdout
        };
        let timestamp_ns = u64::from_le_bytes(avail[1..9].try_into().expect("8 bytes"));
        let data = avail[REC_HDR..REC_HDR + len].to_vec();
        self.offset += (REC_HDR + len) as u64;
        Some(Record {
            stream,
            timestamp_ns,
            data,
        })
    }

    fn compact(&mut self) {
        let start = (self.offset - self.buf_at) as usize;
        self.buf.drain(..start);
        self.buf_at = self.offset;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follow_sees_every_record_in_order_then_ends() {
        let d = tempfile::tempdir().unwrap();
        let (log, mut w) = Log::open(&d.path().join("log")).unwrap();
        let mut r1 = log.reader(true).unwrap();
        let mut r2 = log.reader(true).unwrap();
        let writer = tokio::spawn(async move {
            for i in 0..2000u32 {
                let s = if i % 3 == 0 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                w.append(s, format!("line {i}\n").as_bytes()).unwrap();
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            w.seal();
        });
        let mut got = Vec::new();
        while let Some(rec) = r1.next(true).await.unwrap() {
            got.push(rec);
        }
        writer.await.unwrap();
        assert_eq!(got.len(), 2000);
        for (i, rec) in got.iter().enumerate() {
            assert_eq!(rec.data, format!("line {i}\n").as_bytes());
            assert_eq!(rec.stream == Stream::Stderr, i % 3 == 0);
        }
        // A second, slower reader gets the same.
        let mut n = 0;
        while let Some(rec) = r2.next(true).await.unwrap() {
            assert_eq!(rec.data, format!("line {n}\n").as_bytes());
            n += 1;
        }
        assert_eq!(n, 2000);
    }

    #[tokio::test]
    async fn big_chunks_split_and_torn_tail_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let (_, mut w) = Log::open(&p).unwrap();
        let big = vec![7u8; MAX_REC * 2 + 5];
        w.append(Stream::Stdout, &big).unwrap();
        drop(w);
        // Simulate a crash in the middle of a record.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[1, 0, 0]).unwrap();
        let (log, w) = Log::open(&p).unwrap();
        // The torn record is not counted: the tether resends from here.
        assert_eq!(w.stream_bytes(), (big.len() as u64, 0));
        w.seal();
        let mut r = log.reader(true).unwrap();
        let mut total = Vec::new();
        while let Some(rec) = r.next(false).await.unwrap() {
            assert!(rec.data.len() <= MAX_REC);
            total.extend(rec.data);
        }
        assert_eq!(total, big);
    }
}
