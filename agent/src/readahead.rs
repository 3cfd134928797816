//! Host page-cache read-ahead of the files a booting guest reads first.
//!
//! QEMU opens disks with `cache=writeback`, so a guest's block reads go
//! through the host's page cache. When an image's layer disks or the blank
//! writable template are not in it (after a reboot, under memory pressure,
//! or evicted on purpose as the benchmark's cold mode does), each block the
//! guest reads while it probes its disks, mounts them and runs the
//! container's program is a separate synchronous disk read, with the vCPU
//! idle. A cold start therefore asks the kernel to read them in the
//! background (`POSIX_FADV_WILLNEED`) as soon as it knows its disks, while
//! QEMU starts. Nothing is pinned: the pages are ordinary page cache, and
//! pages already cached cost nothing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// What one start reads ahead at most, in all.
pub const BUDGET: u64 = 256 << 20;

/// Read first from every file, before the rest of any: the start of each
/// disk is what the guest reads while it boots (its partition table) and
/// mounts it (superblocks, group descriptors, the root directory).
pub const HEAD: u64 = 1 << 20;

/// One `POSIX_FADV_WILLNEED` asks for this much: the kernel reads at most
/// its read-ahead window of a single call (`force_page_cache_ra`), so a
/// larger range would be cut short.
const STEP: u64 = 128 << 10;

/// The byte ranges of `files` to read, in order: the first [`HEAD`] bytes of
/// each file's data, then the rest of each in turn, at most `budget` bytes
/// in all. Holes of sparse files are skipped (reading them costs memory and
/// no I/O). `extents` lists a file's data as `(offset, length)`.
pub fn plan(extents: &[Vec<(u64, u64)>], budget: u64) -> Vec<(usize, u64, u64)> {
    let mut out = Vec::new();
    let mut left = budget;
    let mut take = |out: &mut Vec<(usize, u64, u64)>, file: usize, off: u64, len: u64| {
        let len = len.min(left);
        if len > 0 {
            out.push((file, off, len));
            left -= len;
        }
    };
    for (i, ext) in extents.iter().enumerate() {
        let mut head = HEAD;
        for &(off, len) in ext {
            if head == 0 {
                break;
            }
            let n = len.min(head);
            take(&mut out, i, off, n);
            head -= n;
        }
    }
    for (i, ext) in extents.iter().enumerate() {
        let mut skip = HEAD;
        for &(off, len) in ext {
            let s = len.min(skip);
            skip -= s;
            take(&mut out, i, off + s, len - s);
        }
    }
    out
}

/// A file's data extents, found with `SEEK_DATA` / `SEEK_HOLE` (the whole
/// file where the file system cannot say).
fn extents(f: &File) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let Ok(meta) = f.metadata() else {
        return Vec::new();
    };
    let size = i64::try_from(meta.len()).unwrap_or(i64::MAX);
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0i64;
    while at < size {
        let start = match lseek(fd, at, Whence::SeekData) {
            Ok(s) => s,
            // No data after `at`.
            Err(nix::errno::Errno::ENXIO) => break,
            // No extent map: all of it.
            Err(_) if out.is_empty() => return vec![(0, size as u64)],
            Err(_) => break,
        };
        let end = lseek(fd, start, Whence::SeekHole).unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        out.push((start as u64, (end - start) as u64));
        at = end;
    }
    out
}

/// Asks the kernel to read `files` into the page cache in the background,
/// as [`plan`] orders them, at most `budget` bytes. Returns the bytes asked
/// for. Blocking only while the reads are queued; files that cannot be
/// opened are skipped.
pub fn read_ahead(files: &[PathBuf], budget: u64) -> u64 {
    let opened: Vec<Option<File>> = files.iter().map(|p| File::open(p).ok()).collect();
    let ext: Vec<Vec<(u64, u64)>> = opened
        .iter()
        .map(|f| f.as_ref().map(extents).unwrap_or_default())
        .collect();
    let mut asked = 0;
    for (i, off, len) in plan(&ext, budget) {
        let Some(f) = &opened[i] else { continue };
        let mut at = off;
        while at < off + len {
            let n = STEP.min(off + len - at);
            // SAFETY: an advisory call on an open descriptor; no memory is
            // passed.
            let r = unsafe {
                libc::posix_fadvise(
                    f.as_raw_fd(),
                    at as libc::off_t,
                    n as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
            if r != 0 {
                break;
            }
            asked += n;
            at += n;
        }
    }
    asked
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    const M: u64 = 1 << 20;

    #[test]
    fn heads_come_first_then_the_rest_in_file_order() {
        let files = vec![vec![(0, 3 * M)], vec![(0, 2 * M)]];
        assert_eq!(
            plan(&files, u64::MAX),
            vec![(0, 0, M), (1, 0, M), (0, M, 2 * M), (1, M, M)]
        );
    }

    #[test]
    fn the_budget_cuts_the_plan_where_it_runs_out() {
        let files = vec![vec![(0, 3 * M)], vec![(0, 2 * M)]];
        assert_eq!(
            plan(&files, 2 * M + 4096),
            vec![(0, 0, M), (1, 0, M), (0, M, 4096)]
        );
        assert!(plan(&files, 0).is_empty());
    }

    #[test]
    fn a_head_spans_extents_and_holes_are_never_read() {
        // 512 KiB of data, a hole, 4 MiB of data.
        let files = vec![vec![(0, M / 2), (8 * M, 4 * M)]];
        assert_eq!(
            plan(&files, u64::MAX),
            vec![
                (0, 0, M / 2),
                (0, 8 * M, M / 2),
                (0, 8 * M + M / 2, 4 * M - M / 2)
            ]
        );
    }

    #[test]
    fn a_sparse_file_is_read_where_it_has_data_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let mut f = File::create(&p).unwrap();
        f.write_all(&[1u8; 8192]).unwrap();
        f.seek(SeekFrom::Start(64 * M)).unwrap();
        f.write_all(&[2u8; 8192]).unwrap();
        f.set_len(128 * M).unwrap();
        drop(f);
        let ext = extents(&File::open(&p).unwrap());
        let data: u64 = ext.iter().map(|e| e.1).sum();
        // Where the file system keeps no extent map, the whole file (the
        // caller's budget still bounds it); otherwise two small extents.
        assert!(data == 128 * M || data < 2 * M, "extents {ext:?}");
        assert!(ext.iter().any(|&(o, l)| o <= 64 * M && 64 * M < o + l));
        assert_eq!(read_ahead(std::slice::from_ref(&p), 16384), 16384);
        let missing = dir.path().join("missing");
        assert_eq!(read_ahead(&[missing], u64::MAX), 0);
    }
}
