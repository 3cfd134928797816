//! One guest's life as the host sees it: hello, spec, root filesystem,
//! process, stdio, exit report, acknowledgement.

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use tokio::net::unix::pipe;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};
use vmlet_protocol::api::GuestBoot;
use vmlet_protocol::guest::{GuestMessage, HostMessage, GUEST_PROTOCOL_VERSION, TETHER_PORT};

use crate::console::{boottime_us, chain};
use crate::link::{self, Connector, Outbox, Policy};
use crate::pump::{self, Output};
use crate::{log, process, rootfs};

/// How long the first connection may take: the vsock transport comes up
/// with its modules, and the agent's listener is there before QEMU starts,
/// so a guest that cannot connect in this time never will.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);
/// Frames queued between the pumps and the link writer.
const OUTBOX_QUEUE: usize = 8;
/// Host messages queued between the link reader and the dispatcher.
const INBOUND_QUEUE: usize = 16;
/// Host stdin chunks queued for the stdin pipe.
const STDIN_QUEUE: usize = 16;
/// How long an output pipe may stay silent without reaching end of file
/// once every process is killed (only a process stuck in the kernel holds
/// it). Waiting for the host does not count.
const DRAIN_PATIENCE: Duration = Duration::from_secs(10);
/// How long the exit report may wait for a host to (re)connect. VMs outlive
/// the agent; a restarted agent re-adopts them within this time or loses
/// the report.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(120);
/// How long to wait for the host to acknowledge the exit report once it is
/// written on a connection, from when the host was last heard from (a host
/// that goes on sending its heartbeat is alive, and may be holding the
/// output back while its log's disk is full: it is waited for). Longer than
/// the link's stall patience, so a connection that died silently is
/// redialled (and the report written again) before the tether gives up.
const ACK_PATIENCE: Duration = Duration::from_secs(10);

/// Why the session could not go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("cannot reach the host (vsock port {TETHER_PORT}, or the vmlet serial port)")]
    Connect(#[source] io::Error),
    #[error("the host link ended before a spec arrived")]
    NoSpec,
    #[error("cannot watch for exiting children")]
    Sigchld(#[source] io::Error),
    #[error("cannot attach to the process's pipes")]
    Pipes(#[source] io::Error),
    #[error(transparent)]
    Closed(#[from] link::Closed),
}

/// Connects over AF_VSOCK: to the host (CID 2), or, for the rehearsal, to
/// a port of the guest's own (one type for both, so the rehearsal runs the
/// very machine code a start runs; see [`Role::Rehearsal`]).
#[derive(Debug)]
pub(crate) struct Vsock(pub(crate) VsockAddr);

impl Connector for Vsock {
    type Stream = VsockStream;
    fn connect(&mut self) -> impl Future<Output = io::Result<VsockStream>> + Send {
        VsockStream::connect(self.0)
    }
}

/// Whose session [`run_on`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The guest's one session with its host: the container's.
    Guest,
    /// A pool member's dress rehearsal of a start (rehearsal.rs): the host
    /// is the tether itself on a loopback connection, the spec comes
    /// without a Prepare and runs a process in the guest's own root (the
    /// container's is prepared but is not the rehearsal's to touch), and
    /// nothing is done for the whole guest: no kill of every process at
    /// the end, no reaper left behind to take the container's exit.
    Rehearsal,
}

/// What the role's console lines start with.
impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Guest => Ok(()),
            Role::Rehearsal => f.write_str("rehearsal: "),
        }
    }
}

/// Runs the session to its end. Returns once the host has the exit report
/// (or could not be told); the caller then powers off.
pub(crate) async fn run(
    link: crate::serial::LinkKind,
    kernel_us: u64,
    modules_us: u64,
) -> Result<(), Error> {
    match link {
        crate::serial::LinkKind::Vsock => {
            let host = Vsock(VsockAddr::new(VMADDR_CID_HOST, TETHER_PORT));
            run_on(host, Policy::default(), Role::Guest, kernel_us, modules_us).await
        }
        crate::serial::LinkKind::Serial => {
            let policy = Policy {
                // Connecting waits for the host itself (see serial.rs);
                // between tries the link takes output off the pumps.
                min_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(1),
                attempt_timeout: Duration::from_millis(200),
                // The port says when the host leaves: no stall check. A
                // template's tether waits here, for as long as it takes,
                // for the agent of the clone it becomes.
                stall_patience: Duration::from_secs(365 * 24 * 3600),
                silence_patience: Duration::from_secs(365 * 24 * 3600),
                ..Policy::default()
            };
            run_on(
                crate::serial::Serial::default(),
                policy,
                Role::Guest,
                kernel_us,
                modules_us,
            )
            .await
        }
    }
}

/// Runs one session over `connector` (see [`Role`] for how a rehearsal's
/// differs).
pub(crate) async fn run_on<C: Connector>(
    mut connector: C,
    policy: Policy,
    role: Role,
    kernel_us: u64,
    modules_us: u64,
) -> Result<(), Error> {
    let first = link::connect_within(&mut connector, &policy, CONNECT_PATIENCE)
        .await
        .map_err(Error::Connect)?;
    let hello_us = boottime_us();
    if role == Role::Guest {
        log!("connected; hello after kernel {kernel_us} us, modules {modules_us} us, hello {hello_us} us");
    }
    let hello = GuestMessage::Hello {
        version: GUEST_PROTOCOL_VERSION,
        boot: GuestBoot {
            kernel_us,
            modules_us,
            hello_us,
        },
    };
    let (in_tx, mut inbound) = mpsc::channel(INBOUND_QUEUE);
    // Stdin bypasses `inbound`: a process that does not read it must not
    // hold back the messages that are not stdin (signals, ExitAck).
    let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
    let (out, link) = link::start(
        connector,
        first,
        &hello,
        in_tx,
        stdin_tx,
        policy,
        OUTBOX_QUEUE,
    );
    // Ends the link with the session: nobody is left to talk to (and a
    // rehearsal's host is gone).
    let _link = AbortOnDrop(link);

    // A pooled VM is told to prepare its root filesystem first, then waits
    // here, as long as it takes, until it is handed a container. A
    // rehearsal's root is the guest's own, there already.
    let mut prepared = role == Role::Rehearsal;
    let root_dir = match role {
        Role::Guest => Path::new(rootfs::ROOT),
        Role::Rehearsal => Path::new("/"),
    };
    let spec = loop {
        match inbound.recv().await {
            Some(HostMessage::Spec(s)) => break s,
            Some(HostMessage::Prepare {
                layers,
                writable,
                warmup,
            }) if !prepared => {
                let root = vmlet_protocol::guest::ProcessSpec {
                    layers,
                    writable,
                    ..Default::default()
                };
                let start = boottime_us();
                let steps = match rootfs::assemble(&root) {
                    Ok(s) => s,
                    Err(e) => return fail(role, &out, inbound, chain(&e), 125).await,
                };
                log!(
                    "root filesystem prepared in {} us ({})",
                    boottime_us() - start,
                    rootfs::describe(&steps)
                );
                crate::rehearsal::rehearse(Path::new(rootfs::ROOT), &root).await;
                if let Some(w) = warmup {
                    crate::warmup::warm_up(root.layers.len(), &w).await;
                }
                out.send(&GuestMessage::Prepared).await?;
                prepared = true;
            }
            // A clone of a template: forget what every clone shares.
            Some(HostMessage::Renew { seed, realtime_ns }) => {
                if let Err(e) = crate::serial::renew(&seed, realtime_ns) {
                    // Running with its siblings' random state is worse
                    // than not running.
                    let msg = format!("cannot renew the clone's random seed and clock: {e}");
                    return fail(role, &out, inbound, msg, 125).await;
                }
                log!("renewed: random pool reseeded, clock set");
            }
            Some(other) => log!("ignoring {other:?} before the spec"),
            None => return Err(Error::NoSpec),
        }
    };
    // Test builds only: misbehave as the spec asks (see hostile.rs).
    #[cfg(feature = "hostile")]
    crate::hostile::act(&spec).await;

    // Blocking (it polls for the disks), but nothing else needs the
    // runtime until the process runs: host messages wait in their queue.
    let start = boottime_us();
    let root = if prepared {
        // Only the hostname is the spec's to set; the root is mounted.
        rootfs::set_hostname(&spec.hostname).map(|()| None)
    } else {
        rootfs::assemble(&spec).map(Some)
    };
    let steps = match root {
        Ok(s) => s,
        Err(e) => {
            log!("spec: argv {:?}", spec.argv);
            return fail(role, &out, inbound, chain(&e), 125).await;
        }
    };
    let root_us = boottime_us() - start;
    // Watch SIGCHLD before the child exists, so no exit can be missed.
    let mut sigchld = signal(SignalKind::child()).map_err(Error::Sigchld)?;
    let child = match process::spawn(&spec, root_dir) {
        Ok(c) => c,
        Err(e) => {
            log!("spec: argv {:?}", spec.argv);
            let code = e.code();
            return fail(role, &out, inbound, chain(&e), code).await;
        }
    };
    let pid = child.pid;
    // A rehearsal abandoned (dropped) must not leave its process behind
    // for the container to find; a guest's session ends with the guest.
    let abandon = match role {
        Role::Rehearsal => Some(KillOnDrop(pid)),
        Role::Guest => None,
    };
    // The root's steps are the host's to show (`vmlet inspect`, the
    // bench): the console is an emulated UART, slow to write to.
    if let Some(steps) = steps {
        out.send(&GuestMessage::Root(steps)).await?;
    }
    out.send(&GuestMessage::Started { pid: pid.as_raw() })
        .await?;

    let stdout = pipe::Receiver::from_owned_fd(child.stdout).map_err(Error::Pipes)?;
    let stderr = pipe::Receiver::from_owned_fd(child.stderr).map_err(Error::Pipes)?;
    let stdin = child
        .stdin
        .map(pipe::Sender::from_owned_fd)
        .transpose()
        .map_err(Error::Pipes)?;
    let (draining, draining_rx) = watch::channel(false);
    let pumps = [
        tokio::spawn(pump::output(
            stdout,
            Output::Stdout,
            out.clone(),
            draining_rx.clone(),
            DRAIN_PATIENCE,
        )),
        tokio::spawn(pump::output(
            stderr,
            Output::Stderr,
            out.clone(),
            draining_rx,
            DRAIN_PATIENCE,
        )),
    ];
    tokio::spawn(pump::stdin(stdin, stdin_rx));
    let exited = Arc::new(AtomicBool::new(false));
    let (ack_tx, mut ack_rx) = mpsc::channel(1);
    tokio::spawn(dispatch(inbound, pid, exited.clone(), ack_tx));
    // The console is an emulated UART: every byte written costs the guest
    // a trap into the VMM. So the start's one line waits until the process
    // runs and its output is being pumped (failures above log the argv).
    log!(
        "{role}process {pid} started: argv {:?}, root filesystem ready in {root_us} us",
        spec.argv
    );

    let (code, sig) = process::wait_for_exit(pid, &mut sigchld).await;
    // Reaped: the pid is no longer the child's to kill.
    std::mem::forget(abandon);
    exited.store(true, Ordering::Relaxed);
    log!("{role}process exited: code {code:?}, signal {sig:?}");

    if role == Role::Guest {
        // End whatever the container left behind, as the end of its PID
        // namespace would, so the output pipes reach end of file.
        match kill(Pid::from_raw(-1), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => log!("cannot kill the remaining processes: {e}"),
        }
        tokio::spawn(async move {
            loop {
                process::reap(None);
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
    }
    // The pumps give up on a silent pipe by themselves; what they may still
    // wait for is a host to take their output (it may be restarting), as
    // long as the exit report would wait for one. Both end before the exit
    // report, so no output can follow it.
    draining.send_replace(true);
    let drained = Instant::now() + DELIVERY_PATIENCE;
    for p in pumps {
        let abort = p.abort_handle();
        if timeout_at(drained, p).await.is_err() {
            abort.abort();
            log!("no host took the remaining output within {DELIVERY_PATIENCE:?}; reporting the exit anyway");
        }
    }

    let Some(delivery) =
        queue_report(role, &out, &GuestMessage::Exited { code, signal: sig }).await?
    else {
        return Ok(());
    };
    finish(role, delivery, async move {
        ack_rx.recv().await;
    })
    .await;
    Ok(())
}

/// Reports a process that could not start, then waits for the host's
/// acknowledgement like a normal exit.
async fn fail(
    role: Role,
    out: &Outbox,
    mut inbound: mpsc::Receiver<HostMessage>,
    message: String,
    code: i32,
) -> Result<(), Error> {
    log!("{role}cannot start the process (exit code {code}): {message}");
    let Some(delivery) = queue_report(role, out, &GuestMessage::Failed { message, code }).await?
    else {
        return Ok(());
    };
    finish(role, delivery, async move {
        while let Some(m) = inbound.recv().await {
            if m == HostMessage::ExitAck {
                return;
            }
        }
    })
    .await;
    Ok(())
}

/// Queues the final report, waiting at most [`DELIVERY_PATIENCE`]: the
/// outbox has no room while the link holds as much unacknowledged output as
/// it may and no host comes to take it. `None` if that long passed (the
/// report is lost, as it would be in [`finish`]).
async fn queue_report(
    role: Role,
    out: &Outbox,
    report: &GuestMessage,
) -> Result<Option<link::Delivery>, Error> {
    match tokio::time::timeout(DELIVERY_PATIENCE, out.report(report)).await {
        Ok(r) => Ok(Some(r?)),
        Err(_) => {
            log!("{role}no host took the output before the exit report within {DELIVERY_PATIENCE:?}; the report is lost");
            Ok(None)
        }
    }
}

/// Waits for the host's acknowledgement of the final report. The link
/// writes the report again on every new connection until then, so a host
/// that went away (the agent restarting) has up to [`DELIVERY_PATIENCE`]
/// to come back for it; once the report is written on a connection, the
/// host has [`ACK_PATIENCE`] from when it was last heard to acknowledge
/// it, unless that connection breaks first.
async fn finish(role: Role, mut delivery: link::Delivery, ack: impl Future<Output = ()>) {
    let deadline = Instant::now() + DELIVERY_PATIENCE;
    tokio::pin!(ack);
    loop {
        let written = *delivery.borrow_and_update();
        let wake = written.map_or(deadline, |at| at + ACK_PATIENCE);
        tokio::select! {
            () = &mut ack => {
                log!("{role}exit acknowledged");
                return;
            }
            changed = delivery.changed() => if changed.is_err() {
                log!("{role}the host link ended before the exit was acknowledged");
                return;
            },
            () = sleep_until(wake) => {
                match written {
                    Some(_) => log!("{role}no exit acknowledgement within {ACK_PATIENCE:?}"),
                    None => log!(
                        "{role}the exit report could not be delivered within {DELIVERY_PATIENCE:?}"
                    ),
                }
                return;
            }
        }
    }
}

/// Routes host messages while the process runs. Never waits on the
/// process: stdin has its own queue (the link's), so a signal overtakes
/// stdin the process has not read, as it would a full pipe.
async fn dispatch(
    mut inbound: mpsc::Receiver<HostMessage>,
    pid: Pid,
    exited: Arc<AtomicBool>,
    ack: mpsc::Sender<()>,
) {
    while let Some(m) = inbound.recv().await {
        match m {
            // The link sends stdin to the stdin queue, never here.
            HostMessage::Stdin(_) | HostMessage::CloseStdin => {}
            HostMessage::Signal(n) => {
                if exited.load(Ordering::Relaxed) {
                    continue;
                }
                if let Err(e) = send_signal(pid, n) {
                    log!("cannot send signal {n} to {pid}: {e}");
                }
            }
            // Only an exit can be acknowledged: one taken before it would
            // end the session as soon as the report is queued, perhaps
            // before any host read it.
            HostMessage::ExitAck if !exited.load(Ordering::Relaxed) => {
                log!("ignoring an exit acknowledgement: the process has not exited");
            }
            HostMessage::ExitAck => {
                let _ = ack.try_send(());
            }
            // The link drops a second spec and handles its own messages.
            HostMessage::Spec(_) => log!("ignoring a second spec"),
            HostMessage::Prepare { .. } => log!("ignoring Prepare: the process already runs"),
            HostMessage::Renew { .. } => log!("ignoring Renew: the process already runs"),
            HostMessage::Resume { .. } | HostMessage::Ack { .. } => {}
        }
    }
}

/// Kills a child when dropped (and reaps it: it is this process's child).
struct KillOnDrop(Pid);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
        let _ = waitpid(self.0, None);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `kill(pid, n)` for any signal number, real-time ones included (nix's
/// `Signal` names only the standard ones).
fn send_signal(pid: Pid, n: i32) -> Result<(), Errno> {
    if !(1..=64).contains(&n) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: kill takes plain integers; `pid` is the container's main
    // process (positive), never 0 or -1, and `n` is a valid signal number.
    Errno::result(unsafe { libc::kill(pid.as_raw(), n) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `ExitAck` before the exit is dropped; one after it is taken.
    #[tokio::test]
    async fn only_an_exit_is_acknowledged() {
        let (in_tx, in_rx) = mpsc::channel(4);
        let exited = Arc::new(AtomicBool::new(false));
        let (ack_tx, mut ack_rx) = mpsc::channel(1);
        // No signal is sent: the pid is never used.
        tokio::spawn(dispatch(
            in_rx,
            Pid::from_raw(i32::MAX),
            exited.clone(),
            ack_tx,
        ));
        in_tx.send(HostMessage::ExitAck).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(ack_rx.try_recv().is_err(), "acknowledged before the exit");
        exited.store(true, Ordering::Relaxed);
        in_tx.send(HostMessage::ExitAck).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), ack_rx.recv()).await;
        assert_eq!(got.unwrap(), Some(()));
    }
}
