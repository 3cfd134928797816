//! The host page cache, file by file: what makes a start "cold".
//!
//! A cold start is one whose inputs are not in memory. The inputs are the
//! files a start reads: the guest kernel, the initrd, the image's layer
//! disks and the blank disk every writable disk is backed by. Before each
//! batch the harness evicts exactly those (`POSIX_FADV_DONTNEED`) rather
//! than dropping the whole page cache: a global drop would also evict
//! QEMU's own binary and libraries (which no mode stages, and which a host
//! that runs VMs always has in memory) and slow every other process on a
//! shared machine. Eviction leaves pages that a process has mapped, which
//! is the point of pre-staging: the layers an agent holds mapped, and its
//! kernel and initrd in sealed memfds, stay in memory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

/// Drops the clean, unmapped pages of `path` from the page cache.
pub fn evict(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    posix_fadvise(f.as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(io::Error::from)
}

/// How many bytes of `path` are in the page cache now.
pub fn resident_bytes(path: &Path) -> io::Result<u64> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: the mapping is private and read-only, is never read through
    // (mincore only asks the kernel about it), and lives until the end of
    // this function; a file changing under it cannot make mincore unsound.
    let map = unsafe { memmap2::MmapOptions::new().map(&f)? };
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| usize::try_from(p).ok())
        .unwrap_or(4096);
    let pages = map.len().div_ceil(page);
    let mut v = vec![0u8; pages];
    // SAFETY: `map` is a live mapping of `map.len()` bytes starting at a
    // page boundary, and `v` has one byte per page of it, as mincore(2)
    // requires.
    let r = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, map.len(), v.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let resident = v.iter().filter(|b| *b & 1 != 0).count() as u64;
    Ok((resident * page as u64).min(len))
}

/// The files a start of an agent with this state directory reads: its
/// generated initrd and everything in its image store (layer disks, the
/// writable disks' blank backing file, image metadata), plus the guest
/// kernel.
pub fn start_inputs(kernel: &Path, state_dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![kernel.to_path_buf(), state_dir.join("guest/initrd.cpio")];
    files_under(&state_dir.join("images"), 0, &mut out);
    out.retain(|p| p.is_file());
    out
}

fn files_under(d: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    if depth > 8 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(d) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            files_under(&e.path(), depth + 1, out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

/// What one eviction left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Evicted {
    /// Bytes the files take on disk (allocated: a sparse file counts
    /// only what it holds), in all.
    pub total_bytes: u64,
    /// Bytes still in memory afterwards: pages some process has mapped.
    pub resident_bytes: u64,
}

/// Evicts every file in `files`, then measures what stayed resident.
pub fn evict_all(files: &[PathBuf]) -> io::Result<Evicted> {
    let mut e = Evicted::default();
    for f in files {
        evict(f).map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", f.display())))?;
    }
    for f in files {
        e.total_bytes += std::fs::metadata(f).map_or(0, |m| m.blocks() * 512);
        e.resident_bytes += resident_bytes(f).unwrap_or(0);
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A temporary directory on a disk-backed filesystem: tmpfs pages are
    /// not page cache and cannot be evicted.
    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    #[test]
    fn evicts_a_files_pages_and_sees_them_come_back() {
        let d = disk_dir();
        let p = d.path().join("blob");
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![7u8; 4 << 20]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        // Read it: resident.
        let _ = std::fs::read(&p).unwrap();
        assert_eq!(resident_bytes(&p).unwrap(), 4 << 20);
        evict(&p).unwrap();
        assert_eq!(resident_bytes(&p).unwrap(), 0);
        let _ = std::fs::read(&p).unwrap();
        assert_eq!(resident_bytes(&p).unwrap(), 4 << 20);
    }

    #[test]
    fn eviction_leaves_mapped_pages_in_memory() {
        let d = disk_dir();
        let p = d.path().join("mapped");
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        File::open(&p).unwrap().sync_all().unwrap();
        let f = File::open(&p).unwrap();
        // SAFETY: the file is private to this test and not changed while mapped.
        let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
        let sum: u64 = map.iter().step_by(4096).map(|b| u64::from(*b)).sum();
        assert_eq!(sum, 256);
        let e = evict_all(std::slice::from_ref(&p)).unwrap();
        assert_eq!(e.total_bytes, 1 << 20);
        assert_eq!(e.resident_bytes, 1 << 20, "mapped pages stay");
        drop(map);
        assert_eq!(evict_all(&[p]).unwrap().resident_bytes, 0);
    }

    #[test]
    fn start_inputs_are_the_kernel_initrd_and_image_store() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let state = d.path().join("state");
        std::fs::create_dir_all(state.join("guest")).unwrap();
        std::fs::write(state.join("guest/initrd.cpio"), b"i").unwrap();
        let layer = state.join("images/layers/sha256/ab");
        std::fs::create_dir_all(&layer).unwrap();
        std::fs::write(layer.join("disk.erofs"), b"l").unwrap();
        std::fs::write(state.join("images/rw-template.ext4"), b"t").unwrap();
        std::fs::create_dir_all(state.join("vms/x")).unwrap();
        std::fs::write(state.join("vms/x/rw.qcow2"), b"v").unwrap();
        let mut got = start_inputs(&kernel, &state);
        got.sort();
        let mut want = vec![
            kernel,
            state.join("guest/initrd.cpio"),
            layer.join("disk.erofs"),
            state.join("images/rw-template.ext4"),
        ];
        want.sort();
        assert_eq!(got, want);
    }
}
