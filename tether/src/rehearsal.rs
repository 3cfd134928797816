//! A prepared guest's dress rehearsal: before a pooled guest (or a
//! template) says it is prepared, the tether starts one process through
//! the very path a container will take — `process::spawn`'s search of
//! PATH, fork, chroot, setsid and exec, the stdio pipes, the output read to
//! end of file, the exit reaped — with its own binary as the program, and
//! reads the image's executables into the guest's page cache.
//!
//! Under TCG the first run of any code costs its translation: measured in
//! pool guests, the first container process reached its first output
//! ~100 ms after the spec while a warm fork and exec took 7 ms. The
//! rehearsal pays for the kernel's and the tether's share of that before
//! the start; the container's own code is never run ahead of its start
//! (that would be the tenant's code running before it was asked for).
//! Nothing it does is visible to the container: the child runs in the
//! guest's own root, not the container's, and exits before the spec.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::signal::unix::{signal, SignalKind};
use vmlet_protocol::guest::ProcessSpec;

use crate::console::boottime_us;
use crate::{log, process};

/// Set in the rehearsal child's environment; a tether that finds it is the
/// rehearsal, not PID 1.
pub(crate) const ENV: &str = "VMLET_TETHER_REHEARSAL";
/// What the rehearsal child writes to stdout.
const LINE: &[u8] = b"rehearsed\n";
/// How long the whole rehearsal may take before it is abandoned (its
/// child killed): it is an optimisation, never a reason to fail a guest.
const PATIENCE: Duration = Duration::from_secs(10);
/// At most this many bytes of the image's executables are read ahead.
const READAHEAD_MAX: u64 = 16 << 20;
/// At most this many directory entries are looked at for them.
const WALK_MAX: usize = 20_000;
/// The read-ahead asks for a file this much at a time. The kernel reads at
/// most `max(read_ahead_kb, max_sectors_kb)` of a `POSIX_FADV_WILLNEED`
/// call (`force_page_cache_ra`) and drops the rest of the range without a
/// word: with one call for a whole 2 MB busybox, a pool start's `echo`
/// still read part of it through virtio-blk (the guest's block and erofs
/// read paths showed up among the code QEMU translated during the start).
/// 128 KiB is the kernel's default read-ahead window, the smallest either
/// limit normally is.
const READAHEAD_STEP: u64 = 128 << 10;

/// True in the rehearsal child (see [`ENV`]).
pub(crate) fn is_rehearsal() -> bool {
    std::env::var_os(ENV).is_some()
}

/// The rehearsal child's whole life: one line on stdout, exit 0.
pub(crate) fn act() -> ! {
    use std::io::Write;
    let ok = std::io::stdout().write_all(LINE).is_ok();
    std::process::exit(if ok { 0 } else { 1 })
}

/// Rehearses a start (see the module comment) and reads the executables
/// under `root` ahead. Logs what it did; failures are logged, not returned.
pub(crate) async fn rehearse(root: &Path) {
    let start = boottime_us();
    let (files, bytes) = read_ahead(root);
    let read_us = boottime_us() - start;
    match tokio::time::timeout(PATIENCE, run_once()).await {
        Ok(Ok(())) => log!(
            "rehearsed a start in {} us; {files} executables ({bytes} bytes) read ahead in {read_us} us",
            boottime_us() - start - read_us
        ),
        Ok(Err(e)) => log!("the rehearsal failed (starts are unaffected, only slower): {e}"),
        Err(_) => log!("the rehearsal took over {PATIENCE:?}; abandoned"),
    }
}

/// One spawn of the tether's own binary through `process::spawn`, its
/// output read to end of file and its exit reaped.
async fn run_once() -> io::Result<()> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let (Some(dir), Some(name)) = (exe.parent(), exe.file_name()) else {
        return Err(io::Error::other(format!(
            "{} has no file name",
            exe.display()
        )));
    };
    // Found by a search of PATH, as a container's `echo` is: the usual
    // directories first (probed and missed here), the tether's last. The
    // search must stay in the guest's own root: in the container's, it
    // would find and run the image's files (an experiment that searched an
    // overlay of the image's layers ran its busybox `init`).
    let spec = ProcessSpec {
        argv: vec![name.to_string_lossy().into_owned()],
        env: vec![
            format!("{ENV}=1"),
            format!("PATH={}:{}", process::DEFAULT_PATH, dir.display()),
        ],
        stdin: true,
        ..Default::default()
    };
    let mut sigchld = signal(SignalKind::child())?;
    let child = process::spawn(&spec, Path::new("/")).map_err(io::Error::other)?;
    let pid = child.pid;
    // Kill it if this future is dropped (the timeout) or fails early.
    let guard = KillOnDrop(pid);
    drop(child.stdin);
    let mut stdout = pipe::Receiver::from_owned_fd(child.stdout)?;
    let mut stderr = pipe::Receiver::from_owned_fd(child.stderr)?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    tokio::try_join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err))?;
    let status = loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
            Ok(s) => break s,
            Err(e) => return Err(e.into()),
        }
        sigchld.recv().await;
    };
    std::mem::forget(guard);
    if out != LINE || !err.is_empty() || status != WaitStatus::Exited(pid, 0) {
        return Err(io::Error::other(format!(
            "the child ended with {status:?}, stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )));
    }
    Ok(())
}

/// Kills (and reaps) a rehearsal child left behind.
struct KillOnDrop(nix::unistd::Pid);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(self.0, None);
    }
}

/// Asks the kernel to read every executable regular file under `root` into
/// the page cache (asynchronously, `POSIX_FADV_WILLNEED`), at most
/// [`READAHEAD_MAX`] bytes in all. Does not follow symbolic links or cross
/// into other filesystems (`/proc`, `/dev` inside the root). Returns the
/// files and bytes asked for.
fn read_ahead(root: &Path) -> (usize, u64) {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return (0, 0);
    };
    let dev = meta.dev();
    let (mut files, mut bytes, mut seen) = (0, 0u64, 0);
    let mut dirs: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > WALK_MAX {
                return (files, bytes);
            }
            let Ok(m) = entry.metadata() else { continue };
            // Only directories: an overlay reports a file's own layer's
            // device, a directory the overlay's.
            if m.is_dir() {
                if m.dev() == dev {
                    dirs.push(entry.path());
                }
            } else if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                if bytes + m.len() > READAHEAD_MAX {
                    continue;
                }
                let Ok(f) = File::open(entry.path()) else {
                    continue;
                };
                if will_need(&f, m.len()) {
                    files += 1;
                    bytes += m.len();
                }
            }
        }
    }
    (files, bytes)
}

/// Asks the kernel to read all `len` bytes of `f` into the page cache, one
/// [`READAHEAD_STEP`] at a time (see there why not in one call). True if
/// every call was accepted.
fn will_need(f: &File, len: u64) -> bool {
    let mut offset = 0;
    while offset < len {
        // SAFETY: a plain syscall on an fd the caller owns.
        let rc = unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                offset as libc::off_t,
                READAHEAD_STEP as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc != 0 {
            return false;
        }
        offset += READAHEAD_STEP;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn file(path: &Path, len: usize, mode: u32) {
        std::fs::write(path, vec![0u8; len]).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn only_executables_are_read_ahead_within_the_cap() {
        let t = crate::testutil::TempDir::new();
        let bin = t.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        file(&bin.join("tool"), 3000, 0o755);
        file(&t.path().join("usr/data"), 5000, 0o644);
        file(&t.path().join("big"), READAHEAD_MAX as usize + 1, 0o700);
        symlink("/proc/self/exe", bin.join("link")).unwrap();
        // `tool` (3000 bytes) is read; `big` alone passes the cap and is left;
        // the data file and the symbolic link are not executables.
        assert_eq!(read_ahead(t.path()), (1, 3000));
        assert_eq!(read_ahead(&t.path().join("missing")), (0, 0));
    }

    /// Pages of `path` in the page cache, and its pages in all.
    fn resident(path: &Path) -> (usize, usize) {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        let page = 4096;
        let pages = len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: a private read-only mapping of a file this function holds
        // open, unmapped before it returns; mincore writes `pages` bytes.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len);
        }
        (vec.iter().filter(|b| *b & 1 == 1).count(), pages)
    }

    #[test]
    fn the_whole_of_a_file_is_read_ahead_not_one_window() {
        // Larger than one WILLNEED call reads here: this host's disk has
        // read_ahead_kb 8192, so one call for the whole file read 2023 of
        // its 3840 pages.
        let t = crate::testutil::TempDir::new();
        let exe = t.path().join("tool");
        let len = 15 << 20;
        file(&exe, len, 0o755);
        let f = File::open(&exe).unwrap();
        f.sync_all().unwrap();
        // SAFETY: a plain syscall on an fd this test owns.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        let (before, pages) = resident(&exe);
        assert!(
            before < pages / 2,
            "{before} of {pages} pages still cached: the test needs its temp dir on a disk, not tmpfs"
        );

        assert_eq!(read_ahead(t.path()), (1, len as u64));
        // The reads are asynchronous: wait for them.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut now = resident(&exe).0;
        while now < pages && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = resident(&exe).0;
        }
        assert_eq!(now, pages, "only {now} of {pages} pages were read ahead");
    }
}
