//! Layer conversion: a layer tar (plain, gzip or zstd) → a staging tree →
//! a read-only disk image, each layer once.
//!
//! The uncompressed stream is hashed while it is unpacked, so the layer's
//! diff id is checked against the image config without a second pass.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::unpack::{self, UnpackError};

/// The filesystem of the read-only layer disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFs {
    /// `mkfs.erofs`, uncompressed: sized to fit, fastest to build (see
    /// docs/images.md for the figures).
    Erofs,
    /// `mkfs.ext4 -d`, without a journal.
    Ext4,
}

impl LayerFs {
    /// The fstype the guest mounts.
    pub fn name(self) -> &'static str {
        match self {
            LayerFs::Erofs => "erofs",
            LayerFs::Ext4 => "ext4",
        }
    }
}

/// Why a layer could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The layer's tar was refused or malformed.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// The layer's content does not hash to what the image says.
    #[error("layer digest mismatch: expected {expected}, got {actual}")]
    Digest {
        /// What the manifest or config said.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// Decompressing failed.
    #[error("cannot decompress the layer")]
    Decompress(#[source] io::Error),
    /// The layer unpacks to more than it may.
    #[error("the layer is over {max} bytes uncompressed ({why})")]
    TooLarge {
        /// The limit.
        max: u64,
        /// Where the limit comes from.
        why: String,
    },
    /// The disk could not be built.
    #[error("{tool} failed: {stderr}")]
    Tool {
        /// Which tool.
        tool: &'static str,
        /// What it said.
        stderr: String,
    },
    /// A file operation failed.
    #[error("layer conversion i/o failed at {path}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another conversion of the same layer failed.
    #[error("converting layer {0} failed in a concurrent import: {1}")]
    Concurrent(String, String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Lowercase hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A reader that hashes what passes through it.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    /// Bytes read so far.
    pub count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads the rest, then returns `sha256:<hex>` of everything.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Wraps `r` in the decompressor its magic bytes call for (gzip, zstd, or
/// none).
pub fn decompress<'a, R: Read + 'a>(r: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(256 * 1024, r);
    let head = br.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(br)?))
    } else {
        Ok(Box::new(br))
    }
}

/// What converting one layer produced.
#[derive(Debug, Clone)]
pub struct Converted {
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// Bytes of the uncompressed tar.
    pub size: u64,
    /// Bytes of the disk.
    pub disk_size: u64,
    /// Milliseconds spent unpacking.
    pub unpack_ms: u64,
    /// Milliseconds spent building the disk.
    pub mkfs_ms: u64,
}

/// Unpacks the (possibly compressed) layer read from `src` into `stage`
/// (created here, mode 0700), checks its diff id if `expected` is given,
/// and builds `disk` from it. `stage` is removed afterwards, whatever
/// happens; `disk` exists only on success.
pub fn convert<R: Read>(
    src: R,
    expected: Option<&str>,
    stage: &Path,
    disk: &Path,
    fs_kind: LayerFs,
    limit: &Limit,
) -> Result<Converted, ConvertError> {
    let _ = fs::remove_dir_all(stage);
    fs::create_dir_all(stage).map_err(io_err(stage))?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(stage, fs::Permissions::from_mode(0o700)).map_err(io_err(stage))?;
    }
    let root = stage.join("root");
    fs::create_dir(&root).map_err(io_err(&root))?;
    let hit = std::cell::Cell::new(false);
    let r = (|| {
        let t0 = Instant::now();
        let plain = decompress(src).map_err(ConvertError::Decompress)?;
        let mut h = HashingReader::new(Capped {
            inner: plain,
            left: limit.max,
            hit: &hit,
        });
        unpack::unpack(&mut h, &root)?;
        let (diff_id, size) = h.finish().map_err(ConvertError::Decompress)?;
        if let Some(want) = expected {
            if want != diff_id {
                return Err(ConvertError::Digest {
                    expected: want.to_string(),
                    actual: diff_id,
                });
            }
        }
        // The staging root becomes the layer's "/": only the layer's own
        // "./" entry may make it other than 0755.
        let unpack_ms = t0.elapsed().as_millis() as u64;
        let t1 = Instant::now();
        build_disk(&root, disk, fs_kind)?;
        let disk_size = fs::metadata(disk).map_err(io_err(disk))?.len();
        Ok(Converted {
            diff_id,
            size,
            disk_size,
            unpack_ms,
            mkfs_ms: t1.elapsed().as_millis() as u64,
        })
    })();
    let r = match r {
        // Whatever the reading step that noticed it says, the cause is
        // the size.
        Err(_) if hit.get() => Err(ConvertError::TooLarge {
            max: limit.max,
            why: limit.why.clone(),
        }),
        r => r,
    };
    let _ = fs::remove_dir_all(stage);
    if r.is_err() {
        let _ = fs::remove_file(disk);
    }
    r
}

/// Most bytes a layer may unpack to (its tar, and anything after the
/// tar's end that its digest covers), and why.
#[derive(Debug, Clone)]
pub struct Limit {
    /// The limit.
    pub max: u64,
    /// Where it comes from, for the error.
    pub why: String,
}

/// Layers unpack to at most this many bytes.
pub const MAX_LAYER_BYTES: u64 = 64 << 30;

impl Limit {
    /// For a layer unpacked under `dir`: half the free space of its
    /// filesystem (layers that convert at once then cannot fill it
    /// between them), and at most [`MAX_LAYER_BYTES`]. A compressed layer
    /// can expand without bound; this is where it stops.
    pub fn for_dir(dir: &Path) -> Limit {
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(u64::MAX);
        let half = free / 2;
        if half < MAX_LAYER_BYTES {
            Limit {
                max: half,
                why: format!("half of the {free} bytes free where the agent unpacks layers"),
            }
        } else {
            Limit {
                max: MAX_LAYER_BYTES,
                why: "the agent's limit per layer".into(),
            }
        }
    }
}

/// A reader that fails once more than `left` bytes would come through it,
/// and says so in `hit`.
struct Capped<'a, R> {
    inner: R,
    left: u64,
    hit: &'a std::cell::Cell<bool>,
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // One byte more tells a stream that ends at the limit from a
            // longer one.
            let mut one = [0u8; 1];
            if self.inner.read(&mut one)? == 0 {
                return Ok(0);
            }
            self.hit.set(true);
            return Err(io::Error::other("the layer is over its size limit"));
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got as u64;
        Ok(got)
    }
}

/// Builds a read-only disk image of the tree at `root`.
pub fn build_disk(root: &Path, disk: &Path, fs_kind: LayerFs) -> Result<(), ConvertError> {
    let _ = fs::remove_file(disk);
    let out = match fs_kind {
        LayerFs::Erofs => Command::new("mkfs.erofs")
            // -x1: keep every xattr (the opaque markers among them);
            // fixed UUID and timestamp: the same tree makes the same disk.
            .args([
                "--quiet",
                "-x1",
                "-T0",
                "-U",
                "00000000-0000-0000-0000-000000000000",
            ])
            .arg(disk)
            .arg(root)
            .output(),
        LayerFs::Ext4 => {
            let bytes = tree_bytes(root);
            // Room for metadata: inodes, directories, block rounding.
            let size_kib = (bytes / 1024) * 13 / 10 + 16 * 1024;
            Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-O",
                    "^has_journal",
                    "-E",
                    "root_owner=0:0",
                    "-d",
                ])
                .arg(root)
                .arg(disk)
                .arg(format!("{size_kib}K"))
                .output()
        }
    };
    let tool = match fs_kind {
        LayerFs::Erofs => "mkfs.erofs",
        LayerFs::Ext4 => "mkfs.ext4",
    };
    let out = out.map_err(|e| ConvertError::Tool {
        tool,
        stderr: format!("cannot run it (install erofs-utils / e2fsprogs): {e}"),
    })?;
    if !out.status.success() {
        let _ = fs::remove_file(disk);
        return Err(ConvertError::Tool {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Bytes a tree takes, counting each block-rounded file and directory.
fn tree_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += m.len().div_ceil(4096) * 4096 + 256;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

type Outcome = Option<Result<(), String>>;
/// The outcome of one conversion in flight, and the condvar its waiters
/// sleep on.
type Cell = Arc<(Mutex<Outcome>, Condvar)>;

/// Makes sure each layer is converted once however many imports ask for
/// it at the same time, and bounds how many conversions run at once.
#[derive(Debug)]
pub struct Converter {
    inflight: Mutex<HashMap<String, Cell>>,
    slots: (Mutex<usize>, Condvar),
}

impl Converter {
    /// At most `parallel` conversions at once.
    pub fn new(parallel: usize) -> Self {
        Converter {
            inflight: Mutex::new(HashMap::new()),
            slots: (Mutex::new(parallel.max(1)), Condvar::new()),
        }
    }

    /// Runs `work` for `key` unless `done()` says it is already stored or
    /// another thread is running it, in which case this waits for that
    /// one. If that one succeeds, so does this; if it fails, this tries its
    /// own `work` (its source may be sound where the other's was not: one
    /// client's bad layer must not fail another's good one). Blocking: call
    /// from a blocking thread.
    pub fn once<F>(&self, key: &str, done: impl Fn() -> bool, work: F) -> Result<(), ConvertError>
    where
        F: FnOnce() -> Result<(), ConvertError>,
    {
        let cell = loop {
            let (cell, leader) = {
                let mut m = self.inflight.lock().expect("inflight lock");
                if done() {
                    return Ok(());
                }
                match m.get(key) {
                    Some(c) => (c.clone(), false),
                    None => {
                        let c = Arc::new((Mutex::new(None), Condvar::new()));
                        m.insert(key.to_string(), c.clone());
                        (c, true)
                    }
                }
            };
            if leader {
                break cell;
            }
            let mut g = cell.0.lock().expect("cell lock");
            while g.is_none() {
                g = cell.1.wait(g).expect("cell wait");
            }
            if g.as_ref().expect("set").is_ok() {
                return Ok(());
            }
        };
        // The slot is released and waiters woken whatever `work` does.
        let r = {
            let _slot = self.slot();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|_| {
                Err(ConvertError::Concurrent(key.to_string(), "panicked".into()))
            })
        };
        // Out of the map before the waiters wake: one that tries again
        // after a failure finds no finished cell to wait on.
        self.inflight.lock().expect("inflight lock").remove(key);
        *cell.0.lock().expect("cell lock") = Some(
            r.as_ref()
                .map(|_| ())
                .map_err(|e| crate::start::error_chain(e)),
        );
        cell.1.notify_all();
        r
    }

    fn slot(&self) -> SlotGuard<'_> {
        let mut n = self.slots.0.lock().expect("slots lock");
        while *n == 0 {
            n = self.slots.1.wait(n).expect("slots wait");
        }
        *n -= 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Converter);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.slots.0.lock().expect("slots lock") += 1;
        self.0.slots.1.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn same_key_converted_once_concurrently() {
        let c = Arc::new(Converter::new(2));
        let runs = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (c, runs, done) = (c.clone(), runs.clone(), done.clone());
                std::thread::spawn(move || {
                    c.once(
                        "sha256:aa",
                        || done.load(Ordering::SeqCst),
                        || {
                            runs.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            done.store(true, Ordering::SeqCst);
                            Ok(())
                        },
                    )
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap().unwrap();
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// A conversion that fails does not fail another thread's conversion
    /// of the same key that was waiting for it: that one runs its own.
    #[test]
    fn a_failed_conversion_leaves_a_waiter_to_try_its_own() {
        let c = Arc::new(Converter::new(2));
        let started = Arc::new(std::sync::Barrier::new(2));
        let (c2, s2) = (c.clone(), started.clone());
        let bad = std::thread::spawn(move || {
            c2.once(
                "sha256:bb",
                || false,
                || {
                    s2.wait();
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    Err(ConvertError::Concurrent("x".into(), "bad source".into()))
                },
            )
        });
        started.wait();
        let done = std::sync::atomic::AtomicBool::new(false);
        let good = c.once(
            "sha256:bb",
            || done.load(Ordering::SeqCst),
            || {
                done.store(true, Ordering::SeqCst);
                Ok(())
            },
        );
        assert!(bad.join().unwrap().is_err());
        good.unwrap();
        assert!(done.load(Ordering::SeqCst), "the waiter never ran its own");
    }

    /// A gzip'd tar of one `size`-byte file of zeros, then `trailing`
    /// zero bytes after the tar's end (which its digest would cover).
    fn zeros_layer(size: usize, trailing: usize) -> Vec<u8> {
        use std::io::Write;
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(size as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "zeros", &vec![0u8; size][..])
            .unwrap();
        let mut t = b.into_inner().unwrap();
        t.extend(std::iter::repeat_n(0u8, trailing));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&t).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn a_layer_that_unpacks_past_its_limit_is_refused() {
        let limit = Limit {
            max: 256 << 10,
            why: "the test's".into(),
        };
        // File data past the limit, and (the tar itself small) bytes past
        // the limit after its end.
        for (what, layer) in [
            ("file data", zeros_layer(4 << 20, 0)),
            ("trailing bytes", zeros_layer(1024, 4 << 20)),
        ] {
            assert!(layer.len() < 64 << 10, "{what}: the bomb compresses");
            let d = tempfile::tempdir().unwrap();
            let disk = d.path().join("disk");
            let r = convert(
                &layer[..],
                None,
                &d.path().join("stage"),
                &disk,
                LayerFs::Erofs,
                &limit,
            );
            assert!(
                matches!(&r, Err(ConvertError::TooLarge { max, .. }) if *max == 256 << 10),
                "{what}: {r:?}"
            );
            assert!(!disk.exists() && !d.path().join("stage").exists(), "{what}");
        }
    }

    #[test]
    fn a_reader_at_its_limit_ends_cleanly() {
        let hit = std::cell::Cell::new(false);
        let data = vec![7u8; 1000];
        let mut out = Vec::new();
        Capped {
            inner: &data[..],
            left: 1000,
            hit: &hit,
        }
        .read_to_end(&mut out)
        .unwrap();
        assert_eq!(out.len(), 1000);
        assert!(!hit.get());
        let r = Capped {
            inner: &data[..],
            left: 999,
            hit: &hit,
        }
        .read_to_end(&mut Vec::new());
        assert!(r.is_err() && hit.get());
    }

    #[test]
    fn gzip_and_zstd_are_detected() {
        use std::io::Write;
        let data = b"hello layer".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&data[..], 1).unwrap();
        for src in [gz, zs, data.clone()] {
            let mut out = Vec::new();
            decompress(&src[..]).unwrap().read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
        }
    }
}
