//! A pool's warm-up: a process the operator names (`vmletd --pool-warmup`)
//! that a prepared guest runs once from the image, before it says it is
//! prepared, so that the container's own start is not the first run of the
//! image's code in that guest.
//!
//! Under TCG a first run pays for QEMU's translation of every block it
//! executes, and QEMU keeps a translation per guest physical and virtual
//! address. The warm-up runs in a scratch copy of the container's root
//! ([`rootfs::mount_scratch`]): the same layer mounts, so the same
//! page-cache pages of the image's files, over a throwaway tmpfs. A
//! container whose program shares code with the warm-up (the same binary,
//! the same C library start-up) finds those blocks translated.
//!
//! It runs the image's code before any start asked for it, which is why
//! it is the operator's choice, per pool, and off by default. What it can
//! leave for the container is bounded: it writes only to the scratch root,
//! which is unmounted; its output is discarded; it and every process it
//! started are killed, and reaped, before the guest is handed out. State of
//! the guest's kernel outside the filesystem (a sysctl it set as root,
//! say) stays, as it would if the container had set it.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal as NixSignal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::signal::unix::{signal, Signal, SignalKind};
use vmlet_protocol::guest::{ProcessSpec, WARMUP_PATIENCE_MS};

use crate::console::{boottime_us, chain};
use crate::{log, process, rootfs};

/// How long the warm-up may run before it is killed.
const PATIENCE: Duration = Duration::from_millis(WARMUP_PATIENCE_MS);
/// How long the processes killed after it may take to be reaped.
const REAP_PATIENCE: Duration = Duration::from_secs(5);

/// How the warm-up's process ended.
#[derive(Debug)]
enum Outcome {
    Ended(process::ExitStatus),
    /// Still running after [`PATIENCE`] (then killed).
    Overran,
}

/// Runs `spec` once in a scratch root over the `layers` layers the
/// prepared root has (see the module comment), then kills every process
/// but this one and unmounts the scratch root. Logs what happened; a
/// warm-up that fails costs speed, never the guest.
pub(crate) async fn warm_up(layers: usize, spec: &ProcessSpec) {
    let start = boottime_us();
    let spec = ProcessSpec {
        stdin: false,
        ..spec.clone()
    };
    // Watch SIGCHLD before any child exists, so no exit can be missed.
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            log!("warm-up: cannot watch SIGCHLD: {e}");
            return;
        }
    };
    let scratch = match rootfs::mount_scratch(layers) {
        Ok(s) => s,
        Err(e) => {
            log!("warm-up: cannot mount its scratch root: {}", chain(&e));
            return;
        }
    };
    let ran = run(&spec, &scratch.root(), &mut sigchld).await;
    let reaped = end_the_rest(&mut sigchld).await;
    drop(scratch);
    match ran {
        Ok((outcome, drains)) => {
            // The pipes' last writers are gone: the drains are at their end.
            let mut bytes = 0;
            for d in drains {
                if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), d).await {
                    bytes += n;
                }
            }
            log!(
                "warm-up: argv {:?} {}; {bytes} bytes of output discarded, {reaped} processes reaped after it, in {} us",
                spec.argv,
                match outcome {
                    Outcome::Ended((Some(c), _)) => format!("exited with code {c}"),
                    Outcome::Ended((None, Some(s))) => format!("was killed by signal {s}"),
                    Outcome::Ended((None, None)) => "ended".to_string(),
                    Outcome::Overran => format!("ran over {PATIENCE:?} and was killed"),
                },
                boottime_us() - start
            )
        }
        Err(e) => log!(
            "warm-up: argv {:?} failed (starts are unaffected, only slower): {e}",
            spec.argv
        ),
    }
}

/// Output drains: each reads a pipe to its end and returns the bytes read.
type Drains = [tokio::task::JoinHandle<u64>; 2];

/// Spawns `spec` in `root`, discards its output and waits, at most
/// [`PATIENCE`], for it to end (killing it then).
async fn run(
    spec: &ProcessSpec,
    root: &std::path::Path,
    sigchld: &mut Signal,
) -> Result<(Outcome, Drains), String> {
    let child = process::spawn(spec, root).map_err(|e| chain(&e))?;
    let pid = child.pid;
    let drains = [child.stdout, child.stderr].map(|fd| tokio::spawn(discard(fd)));
    let outcome = match tokio::time::timeout(PATIENCE, process::wait_for_exit(pid, sigchld)).await {
        Ok(status) => Outcome::Ended(status),
        Err(_) => {
            let _ = kill(pid, NixSignal::SIGKILL);
            Outcome::Overran
        }
    };
    Ok((outcome, drains))
}

/// Reads `fd` to its end, keeping nothing; returns the bytes read.
async fn discard(fd: std::os::fd::OwnedFd) -> u64 {
    let Ok(mut r) = pipe::Receiver::from_owned_fd(fd) else {
        return 0;
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut n = 0;
    while let Ok(k @ 1..) = r.read(&mut buf).await {
        n += k as u64;
    }
    n
}

/// Kills every process but PID 1 (the warm-up if it overran, and whatever
/// it left running, reparented here) and reaps them all, waiting at most
/// [`REAP_PATIENCE`]. Returns how many it reaped.
async fn end_the_rest(sigchld: &mut Signal) -> usize {
    match kill(Pid::from_raw(-1), NixSignal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => log!("warm-up: cannot kill the remaining processes: {e}"),
    }
    let mut total = 0;
    let all = tokio::time::timeout(REAP_PATIENCE, async {
        loop {
            let r = process::reap(None);
            total += r.count;
            if r.none_left {
                return;
            }
            if sigchld.recv().await.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    })
    .await;
    if all.is_err() {
        log!("warm-up: processes it left did not end within {REAP_PATIENCE:?}");
    }
    total
}
