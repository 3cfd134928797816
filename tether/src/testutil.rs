//! Helpers shared by the unit tests.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::unix::pipe;
use tokio::net::UnixStream;

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmlet-tether-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A [`Connector`](crate::link::Connector) that hands out the client ends
/// of socket pairs a test queued; refuses while none is queued.
#[derive(Debug, Default, Clone)]
pub(crate) struct Pairs(pub(crate) Arc<Mutex<VecDeque<UnixStream>>>);

impl Pairs {
    /// Queues a new pair; returns the host's end.
    pub(crate) fn next(&self) -> UnixStream {
        let (guest, host) = UnixStream::pair().expect("socketpair");
        self.0.lock().expect("lock").push_back(guest);
        host
    }
}

impl crate::link::Connector for Pairs {
    type Stream = UnixStream;
    fn connect(&mut self) -> impl Future<Output = io::Result<UnixStream>> + Send {
        let next = self.0.lock().expect("lock").pop_front();
        async move { next.ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused)) }
    }
}

/// A small deterministic generator (xorshift64*), so a failing seed can be
/// replayed.
#[derive(Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `len` pseudo-random bytes.
    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| (self.next() >> 32) as u8).collect()
    }
}

/// A pipe with both ends registered with tokio.
pub(crate) fn os_pipe() -> (pipe::Sender, pipe::Receiver) {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    (
        pipe::Sender::from_owned_fd(w).expect("pipe sender"),
        pipe::Receiver::from_owned_fd(r).expect("pipe receiver"),
    )
}

/// A `draining` flag for [`crate::pump::output`] that never turns true.
pub(crate) fn not_draining() -> tokio::sync::watch::Receiver<bool> {
    tokio::sync::watch::channel(false).1
}

/// Writes `contents` to `path` as an executable (mode 0755) that this
/// process may exec at once.
///
/// Writing it ourselves would race with other tests: a child forked by a
/// concurrent test inherits our write descriptor until it execs, and exec
/// of a file open for writing anywhere fails with ETXTBSY. So a `cat` child
/// writes it, and the only descriptor to the file is in a process that has
/// exited before this returns.
pub(crate) fn install_program(path: &Path, contents: &[u8]) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut cat = Command::new("/bin/sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn sh to write a program");
    cat.stdin
        .take()
        .expect("piped stdin")
        .write_all(contents)
        .expect("write the program");
    let status = cat.wait().expect("wait for sh");
    assert!(
        status.success(),
        "writing {} failed: {status}",
        path.display()
    );
}
