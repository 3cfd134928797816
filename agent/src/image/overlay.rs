//! Writable disks cloned from a blank overlay kept in memory.
//!
//! Every VM's writable disk is a qcow2 overlay whose reads fall through to
//! a backing file: the blank ext4 every cold or pooled VM shares, or a
//! template's frozen disk. Before a VM has written anything, its overlay is
//! the same bytes for every VM over the same backing (qcow2 records the
//! backing's path, format and size, nothing per VM). So `qemu-img create`
//! runs once per backing; each VM's disk is those ~200 KB written out, its
//! all-zero blocks left as holes, as `qemu-img` leaves them. That takes a
//! start's disk preparation from a process spawn (~10–20 ms here) to well
//! under a millisecond.
//!
//! The bytes are keyed by the backing's identity (path, device, inode,
//! length, modification time): a backing replaced or rewritten gets a fresh
//! overlay, never one describing its predecessor.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::ids;

/// A qcow2 file starts with these four bytes.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// A blank overlay over a backing of any size is a few clusters; anything
/// larger is not one and is not kept.
const MAX_BLANK: usize = 4 << 20;
/// The unit in which all-zero runs are left as holes.
const BLOCK: usize = 4096;

/// Who a backing file is: if any of it changes, its blank overlay is made
/// again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    path: PathBuf,
    format: String,
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Key {
    fn of(backing: &Path, format: &str) -> io::Result<Key> {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", backing.display()));
        let path = fs::canonicalize(backing).map_err(named)?;
        let m = fs::metadata(&path).map_err(named)?;
        Ok(Key {
            path,
            format: format.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Blank qcow2 overlays, made once per backing and kept in memory.
#[derive(Debug, Default)]
pub(crate) struct BlankOverlays {
    made: Mutex<HashMap<Key, Arc<[u8]>>>,
}

impl BlankOverlays {
    /// Creates `dest`: a qcow2 whose reads fall through to `backing` (of
    /// `format`) until written. `scratch` is a directory for the one
    /// `qemu-img create` a new backing needs.
    pub(crate) fn create(
        &self,
        backing: &Path,
        format: &str,
        dest: &Path,
        scratch: &Path,
    ) -> io::Result<()> {
        let bytes = self.blank_for(backing, format, scratch)?;
        write_sparse(dest, &bytes).inspect_err(|_| {
            let _ = fs::remove_file(dest);
        })
    }

    /// The blank overlay over `backing`, made now if it is not in memory
    /// (so the first VM need not wait for `qemu-img`).
    pub(crate) fn blank_for(
        &self,
        backing: &Path,
        format: &str,
        scratch: &Path,
    ) -> io::Result<Arc<[u8]>> {
        let key = Key::of(backing, format)?;
        if let Some(b) = self.made.lock().get(&key) {
            return Ok(b.clone());
        }
        let b: Arc<[u8]> = make_blank(&key.path, format, scratch)?.into();
        let mut made = self.made.lock();
        // A backing rewritten in place leaves its old entries stale, and a
        // removed one (a template's disk, dropped with the template) leaves
        // entries nothing can use: neither is kept.
        made.retain(|k, _| k.path != key.path && k.path.exists());
        made.insert(key, b.clone());
        Ok(b)
    }

    /// How many backings have a blank overlay in memory.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.made.lock().len()
    }
}

/// Runs `qemu-img create` into `scratch` and returns the file's bytes.
fn make_blank(backing: &Path, format: &str, scratch: &Path) -> io::Result<Vec<u8>> {
    let tmp = scratch.join(format!("blank-{}.qcow2", ids::new_id()));
    let r = (|| {
        create_with_qemu_img(backing, format, &tmp)?;
        let bytes = fs::read(&tmp)?;
        if bytes.len() > MAX_BLANK || !bytes.starts_with(QCOW2_MAGIC) {
            return Err(io::Error::other(format!(
                "qemu-img made {} bytes that are not a blank qcow2 overlay",
                bytes.len()
            )));
        }
        Ok(bytes)
    })();
    let _ = fs::remove_file(&tmp);
    r
}

/// `qemu-img create -f qcow2 -F format -b backing dest`: the by-hand way,
/// one process per disk.
pub(crate) fn create_with_qemu_img(backing: &Path, format: &str, dest: &Path) -> io::Result<()> {
    let backing = fs::canonicalize(backing)?;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(&backing)
        .arg(dest)
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run qemu-img (install qemu-utils): {e}"),
            )
        })?;
    if !out.status.success() {
        let _ = fs::remove_file(dest);
        return Err(io::Error::other(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Writes `bytes` to a new `dest` (replacing any), leaving all-zero blocks
/// as holes.
fn write_sparse(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::File::create(dest)?;
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start((i * BLOCK) as u64))?;
            f.write_all(block)?;
        }
    }
    f.set_len(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backing(dir: &Path, name: &str, len: u64) -> PathBuf {
        let p = dir.join(name);
        let f = fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    fn info(p: &Path) -> serde_json::Value {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    #[test]
    fn a_clone_is_what_qemu_img_makes_and_is_sparse() {
        let t = tempfile::tempdir().unwrap();
        let b = backing(t.path(), "blank.raw", 64 << 20);
        let overlays = BlankOverlays::default();
        let (ours, theirs) = (t.path().join("ours.qcow2"), t.path().join("theirs.qcow2"));
        overlays.create(&b, "raw", &ours, t.path()).unwrap();
        create_with_qemu_img(&b, "raw", &theirs).unwrap();
        assert_eq!(fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
        let i = info(&ours);
        assert_eq!(i["format"], "qcow2");
        assert_eq!(i["virtual-size"], 64 << 20);
        assert_eq!(
            i["backing-filename"],
            fs::canonicalize(&b).unwrap().to_str().unwrap()
        );
        assert_eq!(i["backing-filename-format"], "raw");
        // Holes where qemu-img's file is zero: fewer blocks than bytes.
        let m = fs::metadata(&ours).unwrap();
        assert!(
            m.blocks() * 512 < m.len(),
            "{} blocks for {} bytes",
            m.blocks(),
            m.len()
        );
        // No scratch file is left behind.
        let left: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("blank-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_changed_backing_gets_a_fresh_overlay() {
        let t = tempfile::tempdir().unwrap();
        let b = backing(t.path(), "frozen.raw", 32 << 20);
        let overlays = BlankOverlays::default();
        let d = t.path().join("d.qcow2");
        overlays.create(&b, "raw", &d, t.path()).unwrap();
        assert_eq!(info(&d)["virtual-size"], 32 << 20);
        // Rebuilt in place, larger: the old bytes would describe 32 MiB.
        fs::remove_file(&b).unwrap();
        backing(t.path(), "frozen.raw", 48 << 20);
        overlays.create(&b, "raw", &d, t.path()).unwrap();
        assert_eq!(info(&d)["virtual-size"], 48 << 20);
        assert_eq!(overlays.len(), 1, "the stale entry is dropped");
        // A backing that is gone (a dropped template's disk) is forgotten
        // when the next one is made.
        fs::remove_file(&b).unwrap();
        let other = backing(t.path(), "other.raw", 16 << 20);
        overlays.create(&other, "raw", &d, t.path()).unwrap();
        assert_eq!(overlays.len(), 1, "the removed backing's entry is dropped");
    }

    #[test]
    fn a_missing_backing_is_an_error_and_leaves_no_disk() {
        let t = tempfile::tempdir().unwrap();
        let overlays = BlankOverlays::default();
        let d = t.path().join("d.qcow2");
        let e = overlays
            .create(&t.path().join("gone.raw"), "raw", &d, t.path())
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("gone.raw"), "{e}");
        assert!(!d.exists());
    }
}
