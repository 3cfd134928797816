//! A prepared guest's dress rehearsal: before a pooled guest (or a
//! template) says it is prepared, the tether runs one whole start through
//! the code a container's start runs. A session ([`session::run_on`], in
//! [`Role::Rehearsal`]) dials a vsock port of the guest's own (loopback,
//! CID 1) where [`host`] plays the agent: the hello, the spec decoded, the
//! hostname set (to what it is), `process::spawn`'s search of PATH, clone,
//! chroot, setsid and exec, the stdio pumps, the output framed and
//! acknowledged, the exit reaped, reported and acknowledged. The program
//! is the tether's own binary. The rehearsal also reads the image's
//! executables into the guest's page cache, and reads one of them the way
//! an exec will (see [`read_as_exec_would`]).
//!
//! Under TCG the first run of any code costs its translation, and QEMU
//! keeps a translation per guest address: the session runs with the very
//! connector type a start uses ([`session::Vsock`]), so its code is the
//! same machine code, not another instantiation of the generic link. In
//! QEMU's `in_asm` log of one pool start (`scripts/tcg-blocks.sh`), the
//! blocks translated from the start until power-off went from 5173 (1745
//! of them the tether's) with a rehearsal that only spawned a process, to
//! 3473 (501) with this one. The container's own code is never run ahead
//! of its start (that would be the tenant's code running before it was
//! asked for).
//!
//! Nothing it does is visible to the container: the child runs in the
//! guest's own root, not the container's, and is gone before the spec; the
//! listener is closed once the session has connected. A template's
//! rehearsal helps its clones only through the page cache: a clone is a
//! new QEMU, with no translations, and talks over the serial link.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};
use vmlet_protocol::aio::{read_frame, write_frame};
use vmlet_protocol::frame::MAX_FRAME_LEN;
use vmlet_protocol::guest::{GuestMessage, HostMessage, ProcessSpec};

use crate::console::boottime_us;
use crate::link::Policy;
use crate::session::{self, Role};
use crate::{boot, log, process};

/// Set in the rehearsal child's environment; a tether that finds it is the
/// rehearsal, not PID 1.
pub(crate) const ENV: &str = "VMLET_TETHER_REHEARSAL";
/// The guest's own vsock port the rehearsal's host listens on (loopback,
/// CID 1: nothing outside the guest can reach it).
const PORT: u32 = 1025;
/// What the rehearsal child writes to stdout.
const LINE: &[u8] = b"rehearsed\n";
/// How long the whole rehearsal may take before it is abandoned (its
/// child, if any, killed): it is an optimisation, never a reason to fail a
/// guest.
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
/// under `root` ahead. `prepared` is the Prepare the root was assembled
/// from: the rehearsal's spec names the same disks. Logs what it did;
/// failures are logged, not returned.
pub(crate) async fn rehearse(root: &Path, prepared: &ProcessSpec) {
    let start = boottime_us();
    let (files, bytes) = read_ahead(root);
    let read_us = boottime_us() - start;
    match tokio::time::timeout(PATIENCE, run_once(prepared)).await {
        Ok(Ok(())) => log!(
            "rehearsed a start in {} us; {files} executables ({bytes} bytes) read ahead in {read_us} us",
            boottime_us() - start - read_us
        ),
        Ok(Err(e)) => log!("the rehearsal failed (starts are unaffected, only slower): {e}"),
        Err(_) => log!("the rehearsal took over {PATIENCE:?}; abandoned"),
    }
}

/// One whole session, [`session::run_on`] in [`Role::Rehearsal`], over a
/// vsock loopback connection to [`host`]: the tether's own binary is
/// spawned through `process::spawn`, its output pumped and framed, its
/// exit reported and acknowledged.
async fn run_once(prepared: &ProcessSpec) -> io::Result<()> {
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
        layers: prepared.layers.clone(),
        writable: prepared.writable.clone(),
        argv: vec![name.to_string_lossy().into_owned()],
        env: vec![
            format!("{ENV}=1"),
            format!("PATH={}:{}", process::DEFAULT_PATH, dir.display()),
        ],
        stdin: true,
        // Set to what it is: the same system call as a start's.
        hostname: nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        ..Default::default()
    };
    load_loopback();
    let listener = VsockListener::bind(VsockAddr::new(libc::VMADDR_CID_LOCAL, PORT)).map_err(|e| {
        io::Error::other(format!(
            "cannot listen on vsock loopback port {PORT} (a kernel without CONFIG_VSOCKETS_LOOPBACK?): {e}"
        ))
    })?;
    let guest = session::Vsock(VsockAddr::new(libc::VMADDR_CID_LOCAL, PORT));
    let session = Box::pin(session::run_on(
        guest,
        Policy::default(),
        Role::Rehearsal,
        0,
        0,
    ));
    let (host, session) = tokio::join!(host(listener, spec), session);
    // The host's end stays open until the session is over: a connection
    // the host closes first is one the link would dial again.
    let _connection = host?;
    session.map_err(|e| io::Error::other(crate::console::chain(&e)))
}

/// Loads the vsock loopback transport if the guest has it as a module (see
/// [`boot::LOOPBACK_MODULE`]); built in, or missing, there is nothing to do
/// here (a missing one fails the bind, with a clearer error).
fn load_loopback() {
    let path = Path::new(boot::MODULES_DIR).join(boot::LOOPBACK_MODULE);
    match boot::load_module(&path) {
        Ok(()) | Err(Errno::EEXIST | Errno::ENOENT | Errno::ENOSYS) => {}
        Err(e) => log!("cannot load {}: {e}", path.display()),
    }
}

/// The rehearsal's host: what the agent does for a start. Sends the spec
/// after the hello, acknowledges output and the exit, and checks that the
/// process wrote [`LINE`] and exited 0. Returns the connection, still open.
async fn host(listener: VsockListener, spec: ProcessSpec) -> io::Result<VsockStream> {
    let (mut conn, _) = listener.accept().await?;
    drop(listener);
    let mut spec = Some(spec);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        let msg = read_frame::<_, GuestMessage>(&mut conn, MAX_FRAME_LEN)
            .await
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::other("the session closed the connection"))?;
        let reply = match msg {
            GuestMessage::Hello { .. } => spec.take().map(HostMessage::Spec),
            GuestMessage::Stdout(b) => {
                out.extend_from_slice(&b);
                Some(ack(&out, &err))
            }
            GuestMessage::Stderr(b) => {
                err.extend_from_slice(&b);
                Some(ack(&out, &err))
            }
            GuestMessage::Exited { code, signal } => {
                write_frame(&mut conn, &HostMessage::ExitAck)
                    .await
                    .map_err(io::Error::other)?;
                if out != LINE || !err.is_empty() || code != Some(0) {
                    return Err(io::Error::other(format!(
                        "the child ended with code {code:?}, signal {signal:?}, stdout {:?}, stderr {:?}",
                        String::from_utf8_lossy(&out),
                        String::from_utf8_lossy(&err)
                    )));
                }
                return Ok(conn);
            }
            GuestMessage::Failed { message, .. } => {
                write_frame(&mut conn, &HostMessage::ExitAck)
                    .await
                    .map_err(io::Error::other)?;
                return Err(io::Error::other(format!("the spawn failed: {message}")));
            }
            _ => None,
        };
        if let Some(m) = reply {
            write_frame(&mut conn, &m).await.map_err(io::Error::other)?;
        }
    }
}

/// The host's acknowledgement of all output so far.
fn ack(out: &[u8], err: &[u8]) -> HostMessage {
    HostMessage::Ack {
        stdout: out.len() as u64,
        stderr: err.len() as u64,
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
                    if files == 0 {
                        read_as_exec_would(&f, m.len());
                    }
                    files += 1;
                    bytes += m.len();
                }
            }
        }
    }
    (files, bytes)
}

/// Reads the first page at most of `f` the ways the kernel's exec of it
/// will: its header read, a look for file capabilities, a private mapping
/// faulted in. The image's files live on overlayfs over erofs, a path the
/// rehearsal's own exec (from the initramfs) does not take: in QEMU's
/// `in_asm` log of a pool start, the exec's reads through overlayfs and
/// erofs were 222 blocks translated during the start without this, none
/// with it (3587 → 3473 blocks in all). Nothing of the file is run.
fn read_as_exec_would(f: &File, len: u64) {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 256];
    let _ = f.read_at(&mut buf, 0);
    // SAFETY: `buf` is live and its length is passed alongside; the name is
    // a NUL-terminated literal.
    let _ = unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            c"security.capability".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if len == 0 {
        return;
    }
    let map_len = len.min(4096) as usize;
    // SAFETY: a private read-only mapping of an open file, read once within
    // its length and unmapped before returning.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        if addr != libc::MAP_FAILED {
            std::ptr::read_volatile(addr.cast::<u8>());
            libc::munmap(addr, map_len);
        }
    }
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

    #[test]
    fn reading_as_exec_would_changes_nothing() {
        let t = crate::testutil::TempDir::new();
        for (name, len) in [("empty", 0usize), ("small", 100), ("large", 3 * 4096 + 5)] {
            let path = t.path().join(name);
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            let before = std::fs::metadata(&path).unwrap();
            read_as_exec_would(&File::open(&path).unwrap(), len as u64);
            let after = std::fs::metadata(&path).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name}");
            assert_eq!(
                (after.len(), after.mtime(), after.mtime_nsec(), after.mode()),
                (
                    before.len(),
                    before.mtime(),
                    before.mtime_nsec(),
                    before.mode()
                ),
                "{name}"
            );
        }
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
