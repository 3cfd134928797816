//! The log store: every byte a guest writes, with its stream and arrival
//! time, appended to its VM's log, which rotation keeps within a size cap.
//!
//! The log is the single source of truth for output. Attached clients and
//! `logs -f` readers do not receive pushed copies; each reads the files
//! from its own offset and waits on a watch channel for more. So a slow
//! reader slows only itself, no reader can make the agent buffer, and
//! nothing a guest wrote is lost whether or not anyone is attached, as long
//! as the reader keeps within the cap.
//!
//! Record format, little endian: `stream: u8` (1 = stdout, 2 = stderr),
//! `timestamp_ns: u64`, `len: u32`, then `len` bytes.
//!
//! # Segments and rotation
//!
//! A log is a run of segment files side by side. Offsets are absolute: a
//! record's offset counts every log byte written before it since the VM was
//! created, whatever rotation deleted since, so they only ever grow and the
//! per-stream byte counts the tether resumes from stay right. The first
//! segment is the file `<base>` (offset 0; a log that never rotated is that
//! one file, as before rotation existed); every later one is
//! `<base>.<start>.<stdout>.<stderr>`: its first record's offset (20 digits,
//! so names sort) and the payload bytes of each stream written before it,
//! so a restarted agent knows where everything stands from the names and
//! the newest segment alone.
//!
//! With a cap ([`LogLimits`]), a segment holds at most `max_size /
//! max_files` bytes (chunks larger than that are split). When the next
//! record would not fit, a new segment is started and the oldest are
//! deleted until `max_files` remain, so the files never hold more than
//! `max_size` bytes. A reader whose offset
//! falls into a deleted segment gets an [`Item::Dropped`] saying how many
//! bytes of each stream it missed, and goes on from the oldest byte kept.
//! Readers never hold a segment open between reads, so a deleted segment's
//! space is freed at once, however slow a reader is.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use vmlet_protocol::api::Stream;

const REC_HDR: usize = 13;
/// Largest record the store writes; larger chunks are split.
const MAX_REC: usize = 256 * 1024;
/// How much a reader reads from a segment at once.
const READ_CHUNK: usize = 256 * 1024;
/// How much the scan of a segment reads at once.
const SCAN_CHUNK: usize = 1024 * 1024;

/// How much of its output a VM's log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Most bytes the log's files hold (records with their headers); 0 for
    /// no cap.
    pub max_size: u64,
    /// How many segment files the cap is divided into: rotation deletes
    /// the oldest `1 / max_files` of the log at a time.
    pub max_files: usize,
}

impl LogLimits {
    /// The default cap: 64 MiB in 4 segments. A guest that floods at
    /// several MB/s fills it in seconds; one that logs a line a second
    /// keeps weeks of output.
    pub const DEFAULT: LogLimits = LogLimits {
        max_size: 64 << 20,
        max_files: 4,
    };

    /// No cap: every byte is kept in one file.
    pub const UNLIMITED: LogLimits = LogLimits {
        max_size: 0,
        max_files: 1,
    };

    /// Fewest segments a capped log is divided into: with one, rotation
    /// would delete everything at once.
    pub const MIN_FILES: usize = 2;
    /// Most segments: each is a file a restarted agent scans.
    pub const MAX_FILES: usize = 1024;
    /// Smallest segment: smaller ones would mean a file per few records.
    pub const MIN_SEGMENT: u64 = 64 << 10;

    /// Checked limits; the error says what is wrong, as a sentence.
    pub fn new(max_size: u64, max_files: usize) -> Result<LogLimits, String> {
        if max_size == 0 {
            return Ok(LogLimits {
                max_size: 0,
                max_files,
            });
        }
        if !(Self::MIN_FILES..=Self::MAX_FILES).contains(&max_files) {
            return Err(format!(
                "the log's file count must be {}..={}, not {max_files}",
                Self::MIN_FILES,
                Self::MAX_FILES
            ));
        }
        if max_size / max_files as u64 >= Self::MIN_SEGMENT {
            Ok(LogLimits {
                max_size,
                max_files,
            })
        } else {
            Err(format!(
                "a log cap of {max_size} bytes in {max_files} files makes segments smaller \
                 than {} bytes; raise the cap or lower the file count",
                Self::MIN_SEGMENT
            ))
        }
    }

    /// Most bytes in one segment, if there is a cap.
    pub fn segment_size(&self) -> Option<u64> {
        (self.max_size > 0).then(|| self.max_size / self.max_files.max(1) as u64)
    }
}

impl Default for LogLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How far the log has been written, and whether it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPos {
    /// The absolute offset of the log's end: every byte ever written to
    /// it, rotated away or not.
    pub len: u64,
    /// Payload bytes of stdout written up to `len`.
    pub stdout: u64,
    /// Payload bytes of stderr written up to `len`.
    pub stderr: u64,
    /// No more records will be appended.
    pub sealed: bool,
}

/// What a log holds and what rotation deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Bytes the log's files hold now (records with their headers).
    pub retained_bytes: u64,
    /// Payload bytes of stdout rotation deleted.
    pub dropped_stdout: u64,
    /// Payload bytes of stderr rotation deleted.
    pub dropped_stderr: u64,
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

/// Output a reader skipped because it was no longer stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Payload bytes of stdout skipped.
    pub stdout: u64,
    /// Payload bytes of stderr skipped.
    pub stderr: u64,
    /// Log bytes skipped (records with their headers).
    pub log_bytes: u64,
}

/// What a reader yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The next record.
    Record(Record),
    /// The reader's position had been deleted by rotation (or was
    /// unreadable); it goes on from the next byte kept.
    Dropped(Dropped),
}

/// One segment file.
#[derive(Debug, Clone)]
struct Seg {
    /// Offset of its first record.
    start: u64,
    /// End of its last whole record; `None` for the newest segment, which
    /// grows and ends at [`LogPos::len`].
    end: Option<u64>,
    /// Payload bytes of (stdout, stderr) written before `start`.
    before: (u64, u64),
    path: PathBuf,
}

/// What writer and readers share: the segments kept, oldest first.
#[derive(Debug)]
struct Shared {
    segs: Mutex<Vec<Seg>>,
}

/// Where a reader goes next.
#[derive(Debug)]
enum Next {
    /// Read `[buffer end, limit)` of the segment at `path` starting at
    /// `start`.
    Read {
        path: PathBuf,
        start: u64,
        limit: u64,
    },
    /// The offset is not stored: go on at `to`, where `before` payload
    /// bytes had been written.
    Skip { to: u64, before: (u64, u64) },
    /// Nothing more is stored yet.
    Wait,
}

impl Shared {
    fn new(segs: Vec<Seg>) -> Arc<Shared> {
        Arc::new(Shared {
            segs: Mutex::new(segs),
        })
    }

    /// The segments. A panic elsewhere while the lock was held cannot
    /// leave the list half-changed (every change is one push or drain), so
    /// a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, Vec<Seg>> {
        self.segs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a reader at `offset`, with its buffer filled up to `buf_end`,
    /// goes next, given that the newest segment ends at `live_len`.
    fn locate(&self, offset: u64, buf_end: u64, live_len: u64) -> Next {
        let segs = self.lock();
        for (i, s) in segs.iter().enumerate() {
            if offset < s.start {
                return Next::Skip {
                    to: s.start,
                    before: s.before,
                };
            }
            let end = s.end.unwrap_or(live_len.max(s.start));
            if offset >= end {
                continue;
            }
            if buf_end < end {
                return Next::Read {
                    path: s.path.clone(),
                    start: s.start,
                    limit: end,
                };
            }
            // The buffer holds the rest of this segment and it is not a
            // whole record: a segment cut short (a torn write found at
            // startup). Its remains are skipped.
            return match (s.end, segs.get(i + 1)) {
                (Some(_), Some(n)) => Next::Skip {
                    to: n.start,
                    before: n.before,
                },
                _ => Next::Wait,
            };
        }
        Next::Wait
    }

    /// Whether the segment starting at `start` is still kept.
    fn holds(&self, start: u64) -> bool {
        self.lock().iter().any(|s| s.start == start)
    }
}

/// The writing end of a VM's log; one per VM.
#[derive(Debug)]
pub struct LogWriter {
    shared: Arc<Shared>,
    base: PathBuf,
    limits: LogLimits,
    /// The newest segment, appended to.
    file: File,
    /// Offset of the newest segment's first record.
    seg_start: u64,
    len: u64,
    /// Payload bytes stored per stream (stdout, stderr): the offsets the
    /// tether resumes from after a broken connection.
    streams: (u64, u64),
    tx: watch::Sender<LogPos>,
    /// Why the last rotation failed, until someone asks.
    rotate_error: Option<io::Error>,
}

/// A VM's log: the means to open readers.
#[derive(Debug)]
pub struct Log {
    shared: Arc<Shared>,
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
    /// Creates the log whose first segment is `base`, or reopens it for
    /// appending: the newest segment's torn tail (a crash mid-write) is cut
    /// so the next record starts on a boundary, and segments beyond
    /// `limits` (a previous agent's larger count) are deleted.
    pub fn open(base: &Path, limits: LogLimits) -> io::Result<(Log, LogWriter)> {
        let mut segs = list_segments(base)?;
        if segs.is_empty() {
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(base)?;
            segs.push((
                Seg {
                    start: 0,
                    end: Some(0),
                    before: (0, 0),
                    path: base.to_path_buf(),
                },
                (0, 0),
            ));
        }
        let doomed: Vec<_> = if limits.segment_size().is_some() && segs.len() > limits.max_files {
            segs.drain(..segs.len() - limits.max_files).collect()
        } else {
            Vec::new()
        };
        let (mut last, payload) = segs.pop().expect("at least one segment");
        let len = last.end.take().unwrap_or(last.start);
        let file = OpenOptions::new().append(true).open(&last.path)?;
        file.set_len(len - last.start)?;
        let streams = (last.before.0 + payload.0, last.before.1 + payload.1);
        let seg_start = last.start;
        let mut kept: Vec<Seg> = segs.into_iter().map(|(s, _)| s).collect();
        kept.push(last);
        for (d, _) in doomed {
            let _ = fs::remove_file(&d.path);
        }
        let shared = Shared::new(kept);
        let (tx, rx) = watch::channel(LogPos {
            len,
            stdout: streams.0,
            stderr: streams.1,
            sealed: false,
        });
        Ok((
            Log {
                shared: shared.clone(),
                rx,
            },
            LogWriter {
                shared,
                base: base.to_path_buf(),
                limits,
                file,
                seg_start,
                len,
                streams,
                tx,
                rotate_error: None,
            },
        ))
    }

    /// Opens a finished log read-only (a VM that exited before this agent
    /// started). Nothing is changed on disk.
    pub fn open_sealed(base: &Path) -> io::Result<Log> {
        let mut segs = list_segments(base)?;
        let mut pos = LogPos {
            len: 0,
            stdout: 0,
            stderr: 0,
            sealed: true,
        };
        if let Some((last, payload)) = segs.last_mut() {
            pos.len = last.end.take().unwrap_or(last.start);
            pos.stdout = last.before.0 + payload.0;
            pos.stderr = last.before.1 + payload.1;
        }
        let (_tx, rx) = watch::channel(pos);
        Ok(Log {
            shared: Shared::new(segs.into_iter().map(|(s, _)| s).collect()),
            rx,
        })
    }

    /// A complete log that holds nothing: for a VM whose log cannot be
    /// read, so the VM can still be listed, inspected and removed.
    pub fn empty() -> Log {
        let (_tx, rx) = watch::channel(LogPos {
            len: 0,
            stdout: 0,
            stderr: 0,
            sealed: true,
        });
        Log {
            shared: Shared::new(Vec::new()),
            rx,
        }
    }

    /// Where the log is written so far.
    pub fn pos(&self) -> LogPos {
        *self.rx.borrow()
    }

    /// What the log holds now and what rotation deleted.
    pub fn stats(&self) -> LogStats {
        let len = self.pos().len;
        let segs = self.shared.lock();
        let retained_bytes = segs
            .iter()
            .map(|s| s.end.unwrap_or(len.max(s.start)) - s.start)
            .sum();
        let (dropped_stdout, dropped_stderr) = segs.first().map(|s| s.before).unwrap_or((0, 0));
        LogStats {
            retained_bytes,
            dropped_stdout,
            dropped_stderr,
        }
    }

    /// A reader starting at the first byte ever written (it first learns
    /// what rotation deleted, if anything), or at the current end.
    pub fn reader(&self, from_start: bool) -> LogReader {
        let pos = self.pos();
        let (offset, streams) = if from_start {
            (0, (0, 0))
        } else {
            (pos.len, (pos.stdout, pos.stderr))
        };
        LogReader {
            shared: self.shared.clone(),
            rx: self.rx.clone(),
            offset,
            streams,
            buf: Vec::new(),
            buf_at: offset,
            writer_gone: false,
        }
    }
}

/// The name of the segment whose first record is at `start`.
fn segment_path(base: &Path, start: u64, before: (u64, u64)) -> PathBuf {
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{start:020}.{}.{}", before.0, before.1));
    base.with_file_name(name)
}

/// Parses `<start>.<stdout>.<stderr>`, decimal digits only.
fn parse_segment_suffix(s: &str) -> Option<(u64, (u64, u64))> {
    let mut it = s.split('.').map(|n| {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            n.parse::<u64>().ok()
        } else {
            None
        }
    });
    let start = it.next()??;
    let out = it.next()??;
    let err = it.next()??;
    it.next().is_none().then_some((start, (out, err)))
}

/// The segments of the log whose first segment is `base`, oldest first,
/// each with the end of its whole records and its payload bytes per
/// stream. A segment never reaches into the next one's range: a corrupted
/// or torn one is cut where the next begins.
fn list_segments(base: &Path) -> io::Result<Vec<(Seg, (u64, u64))>> {
    let dir = match base.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = base
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a log needs a file name"))?;
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut segs = Vec::new();
    for ent in rd {
        let ent = ent?;
        let file_name = ent.file_name();
        let Some(f) = file_name.to_str() else {
            continue;
        };
        let (start, before) = if f == name {
            (0, (0, 0))
        } else {
            match f
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('.'))
                .and_then(parse_segment_suffix)
            {
                Some(x) => x,
                None => continue,
            }
        };
        if !ent.file_type()?.is_file() {
            continue;
        }
        let path = ent.path();
        let (len, payload) = scan(&path)?;
        segs.push((
            Seg {
                start,
                end: Some(start.saturating_add(len)),
                before,
                path,
            },
            payload,
        ));
    }
    segs.sort_by_key(|(s, _)| s.start);
    for i in 1..segs.len() {
        let next = segs[i].0.start;
        let prev = &mut segs[i - 1].0;
        if let Some(end) = prev.end.as_mut() {
            *end = (*end).min(next).max(prev.start);
        }
    }
    Ok(segs)
}

/// Walks a segment's records to find the end of the last complete one, and
/// the payload bytes of each stream up to there.
fn scan(path: &Path) -> io::Result<(u64, (u64, u64))> {
    let f = File::open(path)?;
    let total = f.metadata()?.len();
    let mut off = 0u64;
    let mut streams = (0u64, 0u64);
    // Headers are read through a window, so a segment of small records
    // costs a few large reads rather than one per record.
    let mut win = Vec::new();
    let mut win_at = 0u64;
    while off + REC_HDR as u64 <= total {
        if off + REC_HDR as u64 > win_at + win.len() as u64 {
            let n = ((total - off) as usize).min(SCAN_CHUNK);
            win.resize(n, 0);
            f.read_exact_at(&mut win, off)?;
            win_at = off;
        }
        let i = (off - win_at) as usize;
        let hdr = &win[i..i + REC_HDR];
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
    /// Appends a chunk of output and wakes readers, starting a new segment
    /// first when the cap asks for one (a chunk can be split across
    /// segments). Returns the chunk's timestamp.
    ///
    /// A failed rotation does not lose the chunk: it goes into the current
    /// segment, over the cap, and [`LogWriter::take_rotate_error`] says
    /// why. A failed write leaves the log as it was before the chunk.
    pub fn append(&mut self, stream: Stream, data: &[u8]) -> io::Result<u64> {
        let ts = now_ns();
        // With a cap, no record is larger than a segment, so no segment
        // outgrows its share of the cap.
        let max_part = self.limits.segment_size().map_or(MAX_REC, |seg| {
            usize::try_from(seg)
                .unwrap_or(usize::MAX)
                .saturating_sub(REC_HDR)
                .clamp(1, MAX_REC)
        });
        for part in data.chunks(max_part) {
            let rec_len = (REC_HDR + part.len()) as u64;
            if let Some(seg) = self.limits.segment_size() {
                let used = self.len - self.seg_start;
                if used > 0 && used + rec_len > seg {
                    if let Err(e) = self.rotate() {
                        self.rotate_error = Some(e);
                    }
                }
            }
            let mut rec = Vec::with_capacity(REC_HDR + part.len());
            rec.push(match stream {
                Stream::Stdout => 1,
                Stream::Stderr => 2,
            });
            rec.extend_from_slice(&ts.to_le_bytes());
            rec.extend_from_slice(&(part.len() as u32).to_le_bytes());
            rec.extend_from_slice(part);
            if let Err(e) = self.file.write_all(&rec) {
                // A partial record would put every later one out of step
                // with the offsets readers compute.
                let _ = self.file.set_len(self.len - self.seg_start);
                self.publish(false);
                return Err(e);
            }
            self.len += rec_len;
            match stream {
                Stream::Stdout => self.streams.0 += part.len() as u64,
                Stream::Stderr => self.streams.1 += part.len() as u64,
            }
        }
        self.publish(false);
        Ok(ts)
    }

    /// Starts a new segment at the current end and deletes the oldest
    /// beyond the file count. The new segment is listed before any old one
    /// is unlisted, and unlisted before it is deleted, so a reader always
    /// finds its offset stored or learns that it was dropped.
    fn rotate(&mut self) -> io::Result<()> {
        let path = segment_path(&self.base, self.len, self.streams);
        let open = || {
            OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
        };
        let file = match open() {
            // A leftover of a crash at this very offset holds nothing kept.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&path)?;
                open()?
            }
            r => r?,
        };
        let doomed: Vec<Seg> = {
            let mut segs = self.shared.lock();
            if let Some(last) = segs.last_mut() {
                last.end = Some(self.len);
            }
            segs.push(Seg {
                start: self.len,
                end: None,
                before: self.streams,
                path,
            });
            let excess = segs.len().saturating_sub(self.limits.max_files.max(1));
            segs.drain(..excess).collect()
        };
        self.file = file;
        self.seg_start = self.len;
        for d in doomed {
            // One that cannot be deleted is no longer listed; the next
            // agent's open finds and deletes it.
            let _ = fs::remove_file(&d.path);
        }
        Ok(())
    }

    fn publish(&self, sealed: bool) {
        self.tx.send_replace(LogPos {
            len: self.len,
            stdout: self.streams.0,
            stderr: self.streams.1,
            sealed,
        });
    }

    /// Why the last rotation failed, if one did since the last call.
    pub fn take_rotate_error(&mut self) -> Option<io::Error> {
        self.rotate_error.take()
    }

    /// Marks the log complete: readers drain it and end.
    pub fn seal(self) {
        let _ = self.file.sync_data();
        self.publish(true);
    }

    /// Payload bytes stored per stream since the VM was created: (stdout,
    /// stderr).
    pub fn stream_bytes(&self) -> (u64, u64) {
        self.streams
    }

    /// Bytes written so far (the absolute end offset).
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
    shared: Arc<Shared>,
    rx: watch::Receiver<LogPos>,
    /// Absolute offset of the next record.
    offset: u64,
    /// Payload bytes of (stdout, stderr) before `offset`.
    streams: (u64, u64),
    /// Bytes read ahead, all from the segment holding `buf_at`.
    buf: Vec<u8>,
    buf_at: u64,
    writer_gone: bool,
}

impl LogReader {
    /// Bytes of (stdout, stderr) before the reader's position.
    pub fn streams(&self) -> (u64, u64) {
        self.streams
    }

    /// The next record, or what was dropped before it; with `follow`,
    /// waits for one until the log is sealed. `Ok(None)` at the end.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the position only advances when an item is returned.
    pub async fn next(&mut self, follow: bool) -> io::Result<Option<Item>> {
        loop {
            if let Some(r) = self.parse_buffered() {
                return Ok(Some(Item::Record(r)));
            }
            let pos = *self.rx.borrow_and_update();
            let buf_end = self.buf_at + self.buf.len() as u64;
            match self.shared.locate(self.offset, buf_end, pos.len) {
                Next::Read { path, start, limit } => {
                    if !self.fill(&path, start, limit)? && self.shared.holds(start) {
                        // Deleted without rotation: the VM was removed.
                        return Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{} was deleted", path.display()),
                        ));
                    }
                    // Else rotation deleted it since: the next turn skips.
                }
                Next::Skip { to, before } => return Ok(Some(Item::Dropped(self.skip(to, before)))),
                Next::Wait => {
                    if pos.sealed || !follow || self.writer_gone {
                        return Ok(None);
                    }
                    if self.rx.changed().await.is_err() {
                        // The writer is gone without sealing (the VM was
                        // removed): whatever is stored is all there will
                        // be.
                        self.writer_gone = true;
                    }
                }
            }
        }
    }

    /// Moves to `to`, reporting what lay between.
    fn skip(&mut self, to: u64, before: (u64, u64)) -> Dropped {
        let d = Dropped {
            stdout: before.0.saturating_sub(self.streams.0),
            stderr: before.1.saturating_sub(self.streams.1),
            log_bytes: to - self.offset,
        };
        self.offset = to;
        self.streams = before;
        self.buf.clear();
        self.buf_at = to;
        d
    }

    /// Reads more of the segment at `path` (first record at `start`) into
    /// the buffer, up to `limit`. `Ok(false)` if the file is gone.
    fn fill(&mut self, path: &Path, start: u64, limit: u64) -> io::Result<bool> {
        // Opened for each read and closed at once: a reader that stalls
        // never keeps a deleted segment's space in use.
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let end = self.buf_at + self.buf.len() as u64;
        let want = ((limit - end) as usize).min(READ_CHUNK);
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        if let Err(e) = file.read_exact_at(&mut self.buf[old..], end - start) {
            self.buf.truncate(old);
            return Err(e);
        }
        Ok(true)
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
        match stream {
            Stream::Stdout => self.streams.0 += len as u64,
            Stream::Stderr => self.streams.1 += len as u64,
        }
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

    fn line(i: u32) -> Vec<u8> {
        format!("line {i}\n").into_bytes()
    }

    fn every_fourth_on_stderr(i: u32) -> Stream {
        match i % 4 {
            0 => Stream::Stderr,
            _ => Stream::Stdout,
        }
    }

    /// Reads to the end (not following): records and drops in order.
    async fn read_all(r: &mut LogReader) -> Vec<Item> {
        let mut v = Vec::new();
        while let Some(it) = r.next(false).await.unwrap() {
            v.push(it);
        }
        v
    }

    fn segment_files(dir: &Path) -> Vec<(String, u64)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .filter(|(n, _)| n.starts_with("log"))
            .collect();
        v.sort();
        v
    }

    /// Small limits: 4 segments of 1 KiB.
    const SMALL: LogLimits = LogLimits {
        max_size: 4096,
        max_files: 4,
    };

    /// Appends `line(0..n)`, every `stderr_every`-th to stderr, yielding
    /// to readers every `yield_every` lines, then seals the log.
    fn spawn_lines(
        mut w: LogWriter,
        n: u32,
        stderr_every: u32,
        yield_every: u32,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            for i in 0..n {
                let s = if i % stderr_every == 0 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                w.append(s, &line(i)).unwrap();
                if i % yield_every == 0 {
                    tokio::task::yield_now().await;
                }
            }
            w.seal();
        })
    }

    #[tokio::test]
    async fn follow_sees_every_record_in_order_then_ends() {
        let d = tempfile::tempdir().unwrap();
        let (log, w) = Log::open(&d.path().join("log"), LogLimits::DEFAULT).unwrap();
        let mut r1 = log.reader(true);
        let mut r2 = log.reader(true);
        let writer = spawn_lines(w, 2000, 3, 100);
        let mut got = Vec::new();
        while let Some(it) = r1.next(true).await.unwrap() {
            match it {
                Item::Record(rec) => got.push(rec),
                Item::Dropped(d) => panic!("dropped {d:?} under the cap"),
            }
        }
        writer.await.unwrap();
        assert_eq!(got.len(), 2000);
        for (i, rec) in got.iter().enumerate() {
            assert_eq!(rec.data, line(i as u32));
            assert_eq!(rec.stream == Stream::Stderr, i % 3 == 0);
        }
        // A second, slower reader gets the same.
        let mut n = 0;
        while let Some(Item::Record(rec)) = r2.next(true).await.unwrap() {
            assert_eq!(rec.data, line(n));
            n += 1;
        }
        assert_eq!(n, 2000);
    }

    #[tokio::test]
    async fn big_chunks_split_and_torn_tail_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let (_, mut w) = Log::open(&p, LogLimits::DEFAULT).unwrap();
        let big = vec![7u8; MAX_REC * 2 + 5];
        w.append(Stream::Stdout, &big).unwrap();
        drop(w);
        // Simulate a crash in the middle of a record.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[1, 0, 0]).unwrap();
        let (log, w) = Log::open(&p, LogLimits::DEFAULT).unwrap();
        // The torn record is not counted: the tether resends from here.
        assert_eq!(w.stream_bytes(), (big.len() as u64, 0));
        w.seal();
        let mut r = log.reader(true);
        let mut total = Vec::new();
        while let Some(Item::Record(rec)) = r.next(false).await.unwrap() {
            assert!(rec.data.len() <= MAX_REC);
            total.extend(rec.data);
        }
        assert_eq!(total, big);
    }

    #[test]
    fn limits_are_checked() {
        assert!(LogLimits::new(64 << 20, 4).is_ok());
        assert!(LogLimits::new(1 << 20, 4).is_ok());
        assert_eq!(LogLimits::new(0, 0).unwrap().segment_size(), None);
        assert!(LogLimits::new(1 << 20, 1).is_err());
        assert!(LogLimits::new(1 << 20, 5000).is_err());
        assert!(LogLimits::new(100 << 10, 4).is_err());
        assert_eq!(
            LogLimits::new(1 << 20, 4).unwrap().segment_size(),
            Some(256 << 10)
        );
    }

    #[tokio::test]
    async fn rotation_keeps_the_cap_and_offsets_stay_absolute() {
        let d = tempfile::tempdir().unwrap();
        let (log, mut w) = Log::open(&d.path().join("log"), SMALL).unwrap();
        let mut written = 0u64;
        let mut sizes = Vec::new();
        for i in 0..1000u32 {
            w.append(Stream::Stdout, &line(i)).unwrap();
            written += (REC_HDR + line(i).len()) as u64;
            let files = segment_files(d.path());
            let total: u64 = files.iter().map(|f| f.1).sum();
            sizes.push(total);
            assert!(files.len() <= SMALL.max_files, "{files:?}");
            assert!(total <= SMALL.max_size, "{total} bytes in {files:?}");
        }
        assert_eq!(w.len(), written);
        assert_eq!(log.pos().len, written);
        let all: u64 = (0..1000).map(|i| line(i).len() as u64).sum();
        assert_eq!(w.stream_bytes(), (all, 0));
        let st = log.stats();
        assert_eq!(st.retained_bytes, *sizes.last().unwrap());
        assert!(st.dropped_stdout > 0 && st.dropped_stderr == 0, "{st:?}");
        // The first segment is gone; the rest are named by their offsets.
        let files = segment_files(d.path());
        assert!(
            files.iter().all(|(n, _)| n.starts_with("log.")),
            "{files:?}"
        );
        // A reader from the start learns what was dropped, then reads the
        // rest contiguously: dropped + read = everything written.
        let mut r = log.reader(true);
        let items = read_all(&mut r).await;
        let Item::Dropped(dr) = items[0] else {
            panic!("{:?}", items[0]);
        };
        assert_eq!(dr.stdout, st.dropped_stdout);
        assert_eq!(dr.log_bytes, written - st.retained_bytes);
        let mut next = None;
        let mut read = 0u64;
        for it in &items[1..] {
            let Item::Record(rec) = it else {
                panic!("a second drop: {it:?}");
            };
            let s = String::from_utf8(rec.data.clone()).unwrap();
            let i: u32 = s.trim().strip_prefix("line ").unwrap().parse().unwrap();
            if let Some(n) = next {
                assert_eq!(i, n);
            }
            next = Some(i + 1);
            read += rec.data.len() as u64;
        }
        assert_eq!(next, Some(1000));
        assert_eq!(dr.stdout + read, all);
    }

    #[tokio::test]
    async fn a_chunk_larger_than_a_segment_is_split_so_no_file_outgrows_it() {
        let d = tempfile::tempdir().unwrap();
        let (log, mut w) = Log::open(&d.path().join("log"), SMALL).unwrap();
        let seg = SMALL.segment_size().unwrap();
        let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        w.append(Stream::Stderr, b"x").unwrap();
        w.append(Stream::Stdout, &big).unwrap();
        w.seal();
        let files = segment_files(d.path());
        assert!(files.iter().all(|f| f.1 <= seg), "{files:?}");
        let mut r = log.reader(true);
        let mut out = Vec::new();
        for it in read_all(&mut r).await {
            if let Item::Record(rec) = it {
                assert!(rec.data.len() as u64 + REC_HDR as u64 <= seg);
                if rec.stream == Stream::Stdout {
                    out.extend(rec.data);
                }
            }
        }
        assert_eq!(out, big);
    }

    #[tokio::test]
    async fn a_follower_that_keeps_up_loses_nothing_while_segments_rotate() {
        let d = tempfile::tempdir().unwrap();
        let (log, w) = Log::open(&d.path().join("log"), SMALL).unwrap();
        let mut r = log.reader(true);
        // Yielding often keeps the follower within a segment of it.
        let writer = spawn_lines(w, 5000, 2, 10);
        let mut n = 0;
        while let Some(it) = r.next(true).await.unwrap() {
            match it {
                Item::Record(rec) => {
                    assert_eq!(rec.data, line(n));
                    n += 1;
                }
                Item::Dropped(d) => panic!("a follower that keeps up lost {d:?}"),
            }
        }
        writer.await.unwrap();
        assert_eq!(n, 5000);
        assert!(log.stats().dropped_stdout > 0);
    }

    #[tokio::test]
    async fn a_reader_left_behind_is_told_and_goes_on_from_the_oldest_kept() {
        let d = tempfile::tempdir().unwrap();
        let (log, mut w) = Log::open(&d.path().join("log"), SMALL).unwrap();
        for i in 0..10u32 {
            w.append(Stream::Stdout, &line(i)).unwrap();
        }
        let mut r = log.reader(true);
        // It reads a little, then stalls while the log rotates past it.
        for i in 0..3u32 {
            match r.next(true).await.unwrap() {
                Some(Item::Record(rec)) => assert_eq!(rec.data, line(i)),
                other => panic!("{other:?}"),
            }
        }
        for i in 10..1000u32 {
            let s = if i % 2 == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            w.append(s, &line(i)).unwrap();
        }
        w.seal();
        // What it had read ahead before the deletion is still delivered,
        // in order; then it learns what it missed.
        let mut read = (0..3).map(|i| line(i).len() as u64).sum::<u64>();
        let mut n = 3;
        let dr = loop {
            match r.next(true).await.unwrap().unwrap() {
                Item::Record(rec) => {
                    assert_eq!(rec.data, line(n));
                    read += rec.data.len() as u64;
                    n += 1;
                }
                Item::Dropped(d) => break d,
            }
        };
        assert!(n <= 10, "read {n} records ahead");
        let first_kept = log.shared.lock()[0].clone();
        assert_eq!(
            (dr.stdout, dr.stderr),
            (first_kept.before.0 - read, first_kept.before.1)
        );
        assert!(dr.stderr > 0);
        // Then contiguous records to the end, each stream apart.
        let mut rest = Vec::new();
        while let Some(it) = r.next(true).await.unwrap() {
            match it {
                Item::Record(rec) => rest.push(rec.data),
                Item::Dropped(d) => panic!("dropped twice: {d:?}"),
            }
        }
        let first: u32 = String::from_utf8(rest[0].clone())
            .unwrap()
            .trim()
            .strip_prefix("line ")
            .unwrap()
            .parse()
            .unwrap();
        let want: Vec<Vec<u8>> = (first..1000).map(line).collect();
        assert_eq!(rest, want);
    }

    #[tokio::test]
    async fn an_attach_from_the_end_after_rotation_sees_only_new_output() {
        let d = tempfile::tempdir().unwrap();
        let (log, mut w) = Log::open(&d.path().join("log"), SMALL).unwrap();
        for i in 0..500u32 {
            w.append(Stream::Stdout, &line(i)).unwrap();
        }
        let mut r = log.reader(false);
        w.append(Stream::Stderr, b"new\n").unwrap();
        w.seal();
        let items = read_all(&mut r).await;
        assert_eq!(items.len(), 1);
        assert!(matches!(&items[0], Item::Record(rec) if rec.data == b"new\n"));
    }

    #[tokio::test]
    async fn a_rotated_log_reopens_where_it_stood() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("log");
        let (log, mut w) = Log::open(&base, SMALL).unwrap();
        for i in 0..700u32 {
            w.append(every_fourth_on_stderr(i), &line(i)).unwrap();
        }
        let (len, streams, stats) = (w.len(), w.stream_bytes(), log.stats());
        drop(w);
        // A crash mid-write: half a record after the last one.
        let newest = segment_files(d.path()).last().unwrap().0.clone();
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join(&newest))
            .unwrap();
        f.write_all(&[2, 9, 9, 9, 9]).unwrap();

        let sealed = Log::open_sealed(&base).unwrap();
        assert_eq!(sealed.pos().len, len);
        assert_eq!((sealed.pos().stdout, sealed.pos().stderr), streams);
        assert_eq!(sealed.stats(), stats);

        let (log, mut w) = Log::open(&base, SMALL).unwrap();
        assert_eq!(w.len(), len);
        assert_eq!(w.stream_bytes(), streams);
        assert_eq!(log.stats(), stats);
        // Appending goes on at the same absolute offsets, rotating as
        // before.
        for i in 700..1400u32 {
            w.append(every_fourth_on_stderr(i), &line(i)).unwrap();
        }
        w.seal();
        let files = segment_files(d.path());
        assert!(files.len() <= SMALL.max_files);
        assert!(files.iter().map(|f| f.1).sum::<u64>() <= SMALL.max_size);
        let mut r = log.reader(true);
        let items = read_all(&mut r).await;
        let Item::Dropped(dr) = items[0] else {
            panic!("{:?}", items[0]);
        };
        let (mut out, mut err) = (dr.stdout, dr.stderr);
        let mut prev = None;
        for it in &items[1..] {
            let Item::Record(rec) = it else {
                panic!("{it:?}")
            };
            let i: u32 = String::from_utf8(rec.data.clone())
                .unwrap()
                .trim()
                .strip_prefix("line ")
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(rec.stream, every_fourth_on_stderr(i));
            if let Some(p) = prev {
                assert_eq!(i, p + 1);
            }
            prev = Some(i);
            match rec.stream {
                Stream::Stdout => out += rec.data.len() as u64,
                Stream::Stderr => err += rec.data.len() as u64,
            }
        }
        assert_eq!(prev, Some(1399));
        let want = |stream: Stream| {
            (0..1400u32)
                .filter(|i| every_fourth_on_stderr(*i) == stream)
                .map(|i| line(i).len() as u64)
                .sum::<u64>()
        };
        assert_eq!((out, err), (want(Stream::Stdout), want(Stream::Stderr)));
    }

    #[tokio::test]
    async fn a_smaller_file_count_at_reopen_deletes_the_oldest() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("log");
        let (_, mut w) = Log::open(&base, SMALL).unwrap();
        for i in 0..1000u32 {
            w.append(Stream::Stdout, &line(i)).unwrap();
        }
        let streams = w.stream_bytes();
        drop(w);
        assert_eq!(segment_files(d.path()).len(), 4);
        let two = LogLimits {
            max_size: 2048,
            max_files: 2,
        };
        let (log, w) = Log::open(&base, two).unwrap();
        assert_eq!(segment_files(d.path()).len(), 2);
        assert_eq!(w.stream_bytes(), streams);
        assert!(log.stats().retained_bytes <= two.max_size);
        w.seal();
        let mut r = log.reader(true);
        let items = read_all(&mut r).await;
        let Item::Dropped(dr) = items[0] else {
            panic!("{:?}", items[0]);
        };
        let read: u64 = items[1..]
            .iter()
            .map(|it| match it {
                Item::Record(r) => r.data.len() as u64,
                Item::Dropped(d) => panic!("{d:?}"),
            })
            .sum();
        assert_eq!(dr.stdout + read, streams.0);
    }

    #[tokio::test]
    async fn a_torn_segment_in_the_middle_is_skipped_and_reported() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("log");
        let limits = LogLimits {
            max_size: 8192,
            max_files: 8,
        };
        let (_, mut w) = Log::open(&base, limits).unwrap();
        for i in 0..300u32 {
            w.append(Stream::Stdout, &line(i)).unwrap();
        }
        let total = w.stream_bytes().0;
        drop(w);
        // A lost write (power failure): the second segment lost its tail.
        let files = segment_files(d.path());
        assert!(files.len() >= 3, "{files:?}");
        let victim = d.path().join(&files[1].0);
        let l = fs::metadata(&victim).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap()
            .set_len(l - 7)
            .unwrap();
        let log = Log::open_sealed(&base).unwrap();
        let mut r = log.reader(true);
        let items = read_all(&mut r).await;
        let mut read = 0;
        let mut dropped = 0;
        let mut drops = 0;
        for it in items {
            match it {
                Item::Record(rec) => read += rec.data.len() as u64,
                Item::Dropped(d) => {
                    dropped += d.stdout;
                    drops += 1;
                }
            }
        }
        assert_eq!(drops, 1);
        assert_eq!(read + dropped, total);
    }

    #[tokio::test]
    async fn a_deleted_log_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("log");
        let (log, mut w) = Log::open(&base, LogLimits::DEFAULT).unwrap();
        w.append(Stream::Stdout, b"x\n").unwrap();
        w.seal();
        let mut r = log.reader(true);
        fs::remove_file(&base).unwrap();
        let e = r.next(false).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn segment_names_parse_strictly() {
        let base = Path::new("/x/log");
        let p = segment_path(base, 123, (4, 5));
        assert_eq!(p, Path::new("/x/log.00000000000000000123.4.5"));
        let suffix = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            parse_segment_suffix(suffix.strip_prefix("log.").unwrap()),
            Some((123, (4, 5)))
        );
        for bad in [
            "", "1", "1.2", "1.2.3.4", "1.+2.3", "a.b.c", "1..3", "1.2.3.",
        ] {
            assert_eq!(parse_segment_suffix(bad), None, "{bad:?}");
        }
    }
}
