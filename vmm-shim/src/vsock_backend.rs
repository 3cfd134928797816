//! One `vhost-device-vsock` per VM: the vhost-user backend that gives the guest a virtio-vsock
//! device and the host a hybrid-vsock Unix socket, with no `AF_VSOCK` on the host.
//!
//! The backend keeps serving after QEMU disconnects and leaves its sockets behind when
//! killed, so whoever spawned it must kill it and remove them (`VsockBackend::shutdown`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::{self, Process};

/// Errors of the vsock backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be run.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited before its socket appeared.
    #[error("vhost-device-vsock ended before listening on {socket}: {exit}")]
    Exited {
        /// The socket it should have created.
        socket: PathBuf,
        /// How it ended.
        exit: String,
    },
    /// Its socket did not appear in time.
    #[error("vhost-device-vsock did not listen on {socket} within {timeout:?}")]
    Timeout {
        /// The socket.
        socket: PathBuf,
        /// How long it was given.
        timeout: Duration,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running vhost-device-vsock serving one VM.
#[derive(Debug)]
pub(crate) struct VsockBackend {
    process: Process,
    /// The vhost-user socket QEMU connects to.
    socket: PathBuf,
    /// The hybrid-vsock host socket.
    uds: PathBuf,
}

/// The arguments for one VM's backend.
pub fn args(cid: u32, socket: &Path, uds: &Path) -> Vec<String> {
    vec![
        "--guest-cid".into(),
        cid.to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--uds-path".into(),
        uds.display().to_string(),
    ]
}

impl VsockBackend {
    /// Removes stale sockets, spawns the backend and waits up to `timeout` for its vhost-user
    /// socket to listen ([`ListenWatch`]). On error nothing is left running.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped spawn SIGKILLs the backend (its task reaps it).
    pub(crate) async fn spawn(
        program: &Path,
        cid: u32,
        socket: &Path,
        uds: &Path,
        log: &File,
        timeout: Duration,
        jail: &crate::confine::Jail,
    ) -> Result<Self, Error> {
        // A socket left by an earlier run would end the wait below before the backend binds.
        for p in [socket, uds] {
            remove_socket(p).map_err(|source| Error::RemoveStale {
                path: p.to_owned(),
                source,
            })?;
        }
        let listening = ListenWatch::new(socket);
        let process = Process::spawn(
            "vhost-device-vsock",
            program,
            &args(cid, socket, uds),
            log,
            &[],
            jail,
        )
        .map_err(|source| Error::Spawn {
            program: program.to_owned(),
            source,
        })?;
        let backend = VsockBackend {
            process,
            socket: socket.to_owned(),
            uds: uds.to_owned(),
        };
        // If this future is dropped during the wait, the backend must not outlive it.
        let mut undo = process::Undo::default();
        undo.process(&backend.process);
        undo.socket(socket);
        undo.socket(uds);
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        loop {
            if listening.ready() {
                undo.disarm();
                return Ok(backend);
            }
            if let Some(exit) = backend.process.exited() {
                backend.shutdown().await;
                return Err(Error::Exited {
                    socket: socket.to_owned(),
                    exit: process::describe("vhost-device-vsock", &exit),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                backend.shutdown().await;
                return Err(Error::Timeout {
                    socket: socket.to_owned(),
                    timeout,
                });
            }
            // The backend binds within a few milliseconds, and QEMU (and so
            // the guest's boot) waits for it: look every millisecond (a
            // stat) rather than back off past the moment it is there; a
            // backend that is slow to come is looked for every 10 ms.
            let delay = if started.elapsed() < Duration::from_millis(200) {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(10)
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// Takes over a backend an earlier agent started.
    pub(crate) fn adopt(pid: u32, socket: &Path, uds: &Path) -> std::io::Result<Self> {
        let process = Process::adopt("vhost-device-vsock", pid, &socket.display().to_string())?;
        Ok(VsockBackend {
            process,
            socket: socket.to_owned(),
            uds: uds.to_owned(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Kills the backend, waits (bounded) for it to be reaped, and removes its sockets.
    /// Idempotent.
    pub(crate) async fn shutdown(&self) {
        if self
            .process
            .kill_and_reap(Duration::from_secs(5))
            .await
            .is_none()
        {
            tracing::warn!(
                pid = self.process.pid(),
                "vhost-device-vsock did not exit within 5 s of SIGKILL"
            );
        }
        for p in [&self.socket, &self.uds] {
            if let Err(e) = remove_socket(p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove a vsock socket");
            }
        }
    }

    pub(crate) fn process(&self) -> &Process {
        &self.process
    }
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Waits for a Unix socket to listen at a path. Its file appears at `bind()`, and a connect
/// before the `listen()` that follows is refused: QEMU, started on seeing the file, failed
/// with "Failed to connect to …/vhost-vsock.sock: Connection refused" in one of the e2e tests
/// when the backend was preempted between the two. The kernel's table of Unix sockets
/// (`/proc/net/unix`, this network namespace's) has the listening flag; connecting to find
/// out is no option, since the backend takes its first connection as its one frontend.
///
/// The table keeps a socket's path after its file is removed, so a listener still open from
/// before (a stale socket the caller removed) would look ready: sockets listed for the path
/// when the watch begins are not counted. Without the table (no procfs) the file is taken as
/// enough, as before.
#[derive(Debug)]
pub struct ListenWatch {
    path: PathBuf,
    /// The sockets (their sockfs inodes) listed for `path` at the start; `None` without the
    /// table.
    before: Option<Vec<u64>>,
}

impl ListenWatch {
    /// Begins watching `path`: call before starting what will listen there.
    pub fn new(path: &Path) -> Self {
        ListenWatch {
            path: path.to_owned(),
            before: unix_table().map(|t| listeners(&t, path)),
        }
    }

    /// Whether a socket file is at the path and a socket that was not there at the start
    /// listens on it.
    pub fn ready(&self) -> bool {
        if !is_socket(&self.path) {
            return false;
        }
        match (&self.before, unix_table()) {
            (Some(before), Some(t)) => listeners(&t, &self.path)
                .iter()
                .any(|i| !before.contains(i)),
            _ => true,
        }
    }
}

fn unix_table() -> Option<String> {
    std::fs::read_to_string("/proc/net/unix").ok()
}

/// The sockfs inodes of the sockets listening at `p`, from the text of `/proc/net/unix`:
/// `Num RefCount Protocol Flags Type St Inode Path`, the flags in hex with `__SO_ACCEPTCON`
/// (0x10000) set by `listen()`.
fn listeners(table: &str, p: &Path) -> Vec<u64> {
    const ACCEPTCON: u32 = 0x1_0000;
    let suffix = format!(" {}", p.display());
    table
        .lines()
        .skip(1)
        .filter(|l| l.ends_with(&suffix))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().take(7).collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            (flags & ACCEPTCON != 0).then(|| f.get(6)?.parse().ok())?
        })
        .collect()
}

/// Removes `p` if it is a socket; a missing file is fine, anything else there is left alone
/// and reported, since the shim only ever deletes what it would have created.
pub(crate) fn remove_socket(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                ));
            }
            match std::fs::remove_file(p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(dir: &Path) -> File {
        File::options()
            .create(true)
            .append(true)
            .open(dir.join("vmm.log"))
            .unwrap()
    }

    #[test]
    fn builds_args() {
        assert_eq!(
            args(
                7,
                Path::new("/r/vhost-vsock.sock"),
                Path::new("/r/vsock.sock")
            ),
            [
                "--guest-cid",
                "7",
                "--socket",
                "/r/vhost-vsock.sock",
                "--uds-path",
                "/r/vsock.sock"
            ]
        );
    }

    #[test]
    fn a_socket_listens_only_after_listen() {
        use nix::sys::socket::{bind, listen, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A stale listener whose file was removed: still in the table under the path.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let watch = ListenWatch::new(&path);
        assert!(!watch.ready(), "no file");
        // Bound but not listening: what a connect in the backend's window was refused by.
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &UnixAddr::new(&path).unwrap(),
        )
        .unwrap();
        assert!(is_socket(&path));
        assert!(
            !watch.ready(),
            "bound, not listening; only the stale one listens"
        );
        listen(&fd, nix::sys::socket::Backlog::new(1).unwrap()).unwrap();
        assert!(watch.ready());
        drop(stale);
        // A path that only ends another's is not it.
        let table = format!(
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 12345 /x{}\n",
            path.display()
        );
        assert_eq!(listeners(&table, &path), Vec::<u64>::new());
        assert_eq!(
            listeners(&table, Path::new(&format!("/x{}", path.display()))),
            [12345]
        );
    }

    #[test]
    fn removes_only_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&s).unwrap();
        remove_socket(&s).unwrap();
        assert!(!s.exists());
        remove_socket(&s).unwrap();
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(remove_socket(&f).is_err());
        assert!(f.exists());
    }

    /// A stand-in backend: a shell script that binds nothing reports its exit.
    #[tokio::test]
    async fn reports_an_early_exit_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-backend");
        crate::testutil::install_script(&fake, "#!/bin/sh\necho 'no such option' >&2\nexit 2\n");
        let r = VsockBackend::spawn(
            &fake,
            3,
            &dir.path().join("v.sock"),
            &dir.path().join("u.sock"),
            &log(dir.path()),
            Duration::from_secs(10),
            &Default::default(),
        )
        .await;
        match r {
            Err(Error::Exited { exit, .. }) => assert!(exit.contains("status 2"), "{exit}"),
            other => panic!("expected an early exit, got {other:?}"),
        }
        let logged = std::fs::read_to_string(dir.path().join("vmm.log")).unwrap();
        assert!(logged.contains("no such option"));
    }

    #[tokio::test]
    async fn times_out_and_kills_a_silent_backend() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-backend");
        crate::testutil::install_script(&fake, "#!/bin/sh\nexec sleep 30\n");
        let r = VsockBackend::spawn(
            &fake,
            3,
            &dir.path().join("v.sock"),
            &dir.path().join("u.sock"),
            &log(dir.path()),
            Duration::from_millis(200),
            &Default::default(),
        )
        .await;
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    }

    /// The real backend, when installed: its socket appears, and shutdown removes both.
    #[tokio::test]
    async fn real_backend_starts_and_shuts_down() {
        let Some(program) = crate::qemu::find_program("vhost-device-vsock") else {
            eprintln!("skipping: vhost-device-vsock is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost-vsock.sock");
        let uds = dir.path().join("vsock.sock");
        // A stale socket from an earlier run must not fool the wait.
        let _stale = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let b = tokio::time::timeout(
            Duration::from_secs(20),
            VsockBackend::spawn(
                &program,
                3,
                &socket,
                &uds,
                &log(dir.path()),
                Duration::from_secs(10),
                &Default::default(),
            ),
        )
        .await
        .unwrap()
        .unwrap();
        // A failed assertion must not leave the backend running: after spawn, dropping it
        // does not kill it (an agent's backends outlive the agent).
        struct Kill(u32);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.0 as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let kill = Kill(b.pid());
        assert!(is_socket(&socket));
        assert!(b.process().exited().is_none());
        tokio::time::timeout(Duration::from_secs(10), b.shutdown())
            .await
            .unwrap();
        assert!(b.process().exited().is_some());
        assert!(!socket.exists() && !uds.exists());
        b.shutdown().await; // idempotent
                            // Reaped: its pid may be another's by now.
        std::mem::forget(kill);
    }
}
