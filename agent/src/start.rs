//! The start path, phase by phase, and the guest session that carries the
//! running container's stdio.
//!
//! `accepted → admitted → config-cloned → disks-attached → vmm-spawned →
//! guest-booted → process-started → first-output → exited`: each phase is
//! recorded on the VM (shown by `inspect`) and traced as a span.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;
use vmlet_protocol::aio::{read_frame, write_frame};
use vmlet_protocol::api::{ExitInfo, GuestBoot, Phase, Stream, VmState};
use vmlet_protocol::frame::FrameError;
use vmlet_protocol::guest::{
    DiskSpec, GuestMessage, HostMessage, ProcessSpec, GUEST_PROTOCOL_VERSION, MAX_GUEST_FRAME,
    TETHER_PORT,
};
use vmlet_protocol::{ApiError, ErrorCode};
use vmm_shim::{Disk, VmExit, VmHandle};

use crate::agent::Agent;
use crate::logstore::LogWriter;
use crate::vm::{now_ms, Vm};

/// How long the tether may take between hello and reporting the process
/// started (mounting the root filesystem, exec).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the VMM may take to end after the guest reported its exit.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(10);
/// Default environment, as container runtimes set it.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

/// Starts a created VM; returns once its process runs (or the start
/// failed, in which case the VM is exited and its resources released).
pub async fn start(agent: &Arc<Agent>, vm: &Arc<Vm>) -> Result<(), ApiError> {
    vm.transition(&[VmState::Created], VmState::Starting)?;
    *vm.stdin_replay.lock() = crate::stdin::StdinReplay::fresh();
    vm.stdin_acked.send_replace(Some(0));
    vm.phase(Phase::Accepted);
    agent.emit(vm);
    let span = tracing::info_span!("start", vm = %vm.id);
    let res = boot(agent, vm).instrument(span.clone()).await;
    match res {
        Ok(conn) => {
            tokio::spawn(session(agent.clone(), vm.clone(), conn).instrument(span));
            // Running, on disk. The session may already be finishing the
            // VM; persists are serialised and snapshot under their lock, so
            // whichever is written last has the newest state. Not waiting
            // for the flush: the session carries the first output now.
            agent.persist_unsynced(vm);
            Ok(())
        }
        Err((e, handle)) => {
            tracing::error!(parent: &span, vm = %vm.id, error = %e, "start failed");
            if let Some(h) = handle {
                end_vmm(&*h).await;
            }
            finish(
                agent,
                vm,
                ExitInfo {
                    code: 255,
                    signal: None,
                    reason: format!("start failed: {}", e.message),
                    at_ms: now_ms(),
                },
            )
            .await;
            Err(e)
        }
    }
}

type BootError = (ApiError, Option<Arc<dyn VmHandle>>);

async fn boot(agent: &Arc<Agent>, vm: &Arc<Vm>) -> Result<Connected, BootError> {
    // A VM taken from the warm pool has booted already, its root
    // filesystem mounted: every phase up to guest-booted vanishes. Taken
    // here, before admission, so a refused start ends that guest too.
    let prebooted = vm.with(|i| i.prebooted.take());
    // admitted: a start over a limit fails fast rather than degrading
    // every VM on the host. Both counts include this VM (it is starting).
    // A stop or removal that came first ends the start here too.
    let refused = match admit(agent) {
        Err(e) => Some(e),
        Ok(()) => {
            vm.phase(Phase::Admitted);
            vm.with(|i| i.stopping).then(|| stopped_during_start(vm))
        }
    };
    if let Some(e) = refused {
        if let Some(p) = prebooted {
            p.discard().await;
        }
        return Err((e, None));
    }

    let rec = vm.record();
    let (handle, link, mut frames, writer) = match prebooted {
        Some(p) => {
            for ph in [
                Phase::ConfigCloned,
                Phase::DisksAttached,
                Phase::VmmSpawned,
                Phase::GuestBooted,
            ] {
                vm.phase(ph);
            }
            let spec = process_spec(vm, &rec, Vec::new(), None);
            if p.gate.send(HostMessage::Spec(spec)).is_err() {
                return Err((
                    err(ErrorCode::Unavailable, "the pooled guest went away"),
                    Some(p.handle),
                ));
            }
            (p.handle, p.link, p.frames, p.writer)
        }
        None => {
            // A template of this image restores instead of booting; if the
            // restore fails, the template is dropped (rebuilt in the
            // background) and this start boots cold.
            let template = rec
                .image_id
                .as_deref()
                .and_then(|id| agent.templates.take(id, rec.memory_mib, rec.vcpus));
            let cloned = match template {
                Some(t) => match launch_clone(agent, vm, &rec, &t).await {
                    Ok(l) => Some(l),
                    // Stopped: not the template's fault, and no cold boot.
                    Err((e, h)) if vm.with(|i| i.stopping) => return Err((e, h)),
                    Err((e, h)) => {
                        if let Some(h) = h {
                            end_vmm(&*h).await;
                        }
                        agent.templates.failed(&t, &e.message);
                        tracing::warn!(vm = %vm.id, error = %e, "restoring from the template failed; booting cold");
                        vm.with(|i| {
                            i.rec.from_template = false;
                            i.rec.template = None;
                            i.rec
                                .phases
                                .retain(|p| matches!(p.phase, Phase::Accepted | Phase::Admitted));
                        });
                        None
                    }
                },
                None => None,
            };
            match cloned {
                Some(l) => {
                    // The clone's fix-ups first, then its spec.
                    let seed = crate::templates::fresh_seed().map_err(|e| {
                        let m = format!("no random seed for the clone: {e}");
                        (err(ErrorCode::Internal, m), Some(l.handle.clone()))
                    })?;
                    let renew = HostMessage::Renew {
                        seed,
                        realtime_ns: crate::templates::realtime_ns(),
                    };
                    let (gate, gate_rx) = oneshot::channel();
                    let _ = gate.send(HostMessage::Spec(process_spec(
                        vm, &rec, l.layers, l.writable,
                    )));
                    let writer = spawn_writer(l.wr, renew, Some(gate_rx), None, vm.clone());
                    (l.handle, l.link, l.frames, writer)
                }
                None => {
                    let l = launch(agent, vm, &rec).await?;
                    let spec = HostMessage::Spec(process_spec(vm, &rec, l.layers, l.writable));
                    let writer = spawn_writer(l.wr, spec, None, None, vm.clone());
                    (l.handle, l.link, l.frames, writer)
                }
            }
        }
    };
    let fail = |e: ApiError| (e, Some(handle.clone()));

    // process-started
    let mut log = vm
        .with(|i| i.log_writer.take())
        .ok_or_else(|| fail(err(ErrorCode::Internal, "the VM's log is closed")))?;
    // Stdin may flow (and be acknowledged) before the process starts, and
    // the root's timings come just before Started.
    let next_not_stdin_ack = async {
        loop {
            match frames.recv().await {
                Some(Ok(GuestMessage::StdinAck { received })) => vm.stdin_taken(received),
                Some(Ok(GuestMessage::Root(t))) => vm.with(|i| i.rec.root = Some(t)),
                other => return other,
            }
        }
    };
    let started = tokio::time::timeout(SPAWN_TIMEOUT, next_not_stdin_ack)
        .instrument(tracing::info_span!("process-start"))
        .await;
    match started {
        Ok(Some(Ok(GuestMessage::Started { .. }))) => {}
        Ok(Some(Ok(GuestMessage::Failed { message, code }))) => {
            // Not a failure of the start: the container's command could
            // not run, so it exits with the tether's code, as a shell would.
            // The session acknowledges it and lets the guest power off.
            let exit = failed(code, &message);
            let _ = log.append(
                Stream::Stderr,
                format!("vmlet: {}\n", exit.reason).as_bytes(),
            );
            vm.with(|i| i.rec.exit = Some(exit));
        }
        other => {
            log.seal();
            writer.abort();
            let what = match other {
                Err(_) => "it did not answer in time".to_string(),
                Ok(None) => "it closed the connection".to_string(),
                Ok(Some(Ok(m))) => format!("it sent {} instead", kind(&m)),
                Ok(Some(Err(e))) => e.to_string(),
            };
            return Err(fail(err(
                ErrorCode::Internal,
                format!("the guest did not start the process: {what}"),
            )));
        }
    }
    vm.phase(Phase::ProcessStarted);
    vm.transition(&[VmState::Starting], VmState::Running)
        .map_err(fail)?;
    // Persisted by `start` once the session carries the output: the
    // record's fsyncs are not the first output's to wait for.
    agent.emit(vm);
    tracing::info!(vm = %vm.id, "running");
    Ok(Connected {
        handle,
        link,
        conn: Some(GuestConn { frames, writer }),
        log,
    })
}

/// How the agent reaches one guest's tether, connection after connection.
#[derive(Debug)]
pub enum GuestLink {
    /// Hybrid vsock: the tether dials the agent's listener.
    Vsock {
        listener: UnixListener,
        path: PathBuf,
    },
    /// A virtio-serial port (template clones): the agent dials QEMU's
    /// socket; the tether is told by the port that a host is there.
    Serial { path: PathBuf },
}

/// How often the agent dials a serial link that is not up.
const SERIAL_REDIAL: Duration = Duration::from_millis(10);

impl GuestLink {
    /// The link of a VM: `serial` for template clones.
    pub fn open(dir: &Path, vsock_uds: &Path, serial: bool) -> Result<Self, ApiError> {
        if serial {
            return Ok(GuestLink::Serial {
                path: vmm_shim::VmPaths::new(dir).serial,
            });
        }
        let path = tether_listen_path(vsock_uds);
        let listener = bind_tether_listener(&path)?;
        Ok(GuestLink::Vsock { listener, path })
    }

    /// The next connection to the tether. On vsock, connections from any
    /// process but this VM's own VMM are refused (every VMM may share one
    /// uid); the serial link's socket is the shim's, in the VM's directory.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn next(
        &self,
        handle: &dyn VmHandle,
    ) -> std::io::Result<tokio::net::UnixStream> {
        match self {
            GuestLink::Vsock { listener, .. } => loop {
                let (stream, _) = listener.accept().await?;
                if from_own_vmm(&stream, handle) {
                    return Ok(stream);
                }
                static NOISY: std::sync::OnceLock<crate::ratelimit::RateLimit> =
                    std::sync::OnceLock::new();
                let noisy = NOISY
                    .get_or_init(|| crate::ratelimit::RateLimit::new(5, Duration::from_secs(10)));
                if let Some(suppressed) = noisy.admit() {
                    tracing::warn!(listener = %listener.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string())).unwrap_or_default(), peer = ?stream.peer_cred().ok(), suppressed, "refused a connection to the tether listener from a process that is not this VM's VMM");
                }
            },
            GuestLink::Serial { path } => loop {
                // QEMU serves one client at a time and creates the socket
                // as it starts: dial until it answers.
                match tokio::net::UnixStream::connect(path).await {
                    Ok(s) => return Ok(s),
                    Err(_) => tokio::time::sleep(SERIAL_REDIAL).await,
                }
            },
        }
    }

    /// Removes the listener's socket file, if it has one.
    fn close(self) {
        if let GuestLink::Vsock { listener, path } = self {
            drop(listener);
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A guest booted (or restored) to its tether's hello; nothing sent to it yet.
pub(crate) struct Launched {
    handle: Arc<dyn VmHandle>,
    link: GuestLink,
    frames: Frames,
    wr: OwnedWriteHalf,
    layers: Vec<DiskSpec>,
    writable: Option<DiskSpec>,
}

/// Clones the config, attaches the disks, spawns the VMM and waits for the
/// tether's hello: the phases from config-cloned to guest-booted, shared
/// by cold starts and the warm pool.
pub(crate) async fn launch(
    agent: &Arc<Agent>,
    vm: &Arc<Vm>,
    rec: &crate::vm::VmRecord,
) -> Result<Launched, BootError> {
    // The image's layer disks, shared read-only by every VM using them,
    // and this VM's own writable disk: a copy-on-write overlay of a blank
    // template, created in O(1) whatever the image's size.
    let (disks, layers, writable) = vm_disks(agent, vm, rec, None)
        .instrument(tracing::info_span!("disks"))
        .await
        .map_err(|e| (e, None))?;

    // config-cloned
    let clone = tracing::info_span!("config-clone").entered();
    let cfg = agent.template.instantiate(vm, rec, disks);
    vm.phase(Phase::ConfigCloned);
    drop(clone);

    // disks-attached
    vm.phase(Phase::DisksAttached);
    let listen = tracing::info_span!("vsock-listen").entered();

    // The tether's listener must exist before the guest can dial it. It
    // stays open for the VM's life: the tether dials again if the
    // connection breaks (after an agent restart, say).
    let link = GuestLink::open(&vm.dir, &cfg.vsock_uds, false).map_err(|e| (e, None))?;
    drop(listen);

    // vmm-spawned
    let handle: Arc<dyn VmHandle> = agent
        .vmm
        .start(&cfg)
        .instrument(tracing::info_span!("vmm-spawn"))
        .await
        .map_err(|e| {
            (
                err(
                    ErrorCode::Unavailable,
                    format!("cannot start the VMM: {}", error_chain(&e)),
                ),
                None,
            )
        })?
        .into();
    let timeout = agent.config.boot_timeout;
    let hello = until_hello(agent, vm, handle, link, timeout, layers, writable);
    hello.instrument(tracing::info_span!("guest-boot")).await
}

/// vmm-spawned, then guest-booted: records the running VMM on the VM and
/// waits for the tether's hello; shared by boots and restores.
async fn until_hello(
    agent: &Arc<Agent>,
    vm: &Arc<Vm>,
    handle: Arc<dyn VmHandle>,
    link: GuestLink,
    timeout: Duration,
    layers: Vec<DiskSpec>,
    writable: DiskSpec,
) -> Result<Launched, BootError> {
    let stopping = vm.with(|i| {
        i.handle = Some(handle.clone());
        i.rec.vmm_pid = handle.pid();
        i.rec.helper_pids = handle.helper_pids();
        i.rec.confinement = handle.confinement().map(confinement_info);
        i.stopping
    });
    // A stop or removal that came while the VMM started found no handle
    // to kill: it is this start's to honour, now that there is one.
    if stopping {
        return Err((stopped_during_start(vm), Some(handle)));
    }
    agent.persist_unsynced(vm);
    vm.phase(Phase::VmmSpawned);
    let (frames, wr, boot) = await_hello(&handle, &link, timeout)
        .await
        .map_err(|e| (e, Some(handle.clone())))?;
    vm.with(|i| i.rec.guest_boot = Some(boot));
    vm.phase(Phase::GuestBooted);
    Ok(Launched {
        handle,
        link,
        frames,
        wr,
        layers,
        writable: Some(writable),
    })
}

/// Restores `vm` from a template snapshot instead of booting it: the same
/// disks in the same order (the image's layers, a fresh blank writable
/// disk), the template's memory mapped copy-on-write, its device state
/// loaded; the clone's tether, waiting on its serial port since the
/// snapshot, says hello as soon as the agent connects.
pub(crate) async fn launch_clone(
    agent: &Arc<Agent>,
    vm: &Arc<Vm>,
    rec: &crate::vm::VmRecord,
    t: &crate::templates::Ready,
) -> Result<Launched, BootError> {
    // Recorded first: the template's directory stays while a clone that
    // names it starts or runs.
    vm.with(|i| {
        i.rec.from_template = true;
        i.rec.template = Some(t.name());
    });
    let (disks, layers, writable) = vm_disks(agent, vm, rec, Some(t.writable_disk()))
        .instrument(tracing::info_span!("disks"))
        .await
        .map_err(|e| (e, None))?;
    let clone = tracing::info_span!("config-clone").entered();
    let mut cfg = agent.template.instantiate(vm, rec, disks);
    t.restore_into(&mut cfg);
    vm.phase(Phase::ConfigCloned);
    drop(clone);
    vm.phase(Phase::DisksAttached);

    let link = GuestLink::open(&vm.dir, &cfg.vsock_uds, true).map_err(|e| (e, None))?;
    let handle: Arc<dyn VmHandle> = agent
        .vmm
        .start(&cfg)
        .instrument(tracing::info_span!("vmm-restore"))
        .await
        .map_err(|e| {
            (
                err(
                    ErrorCode::Unavailable,
                    format!(
                        "cannot restore the VM from its template: {}",
                        error_chain(&e)
                    ),
                ),
                None,
            )
        })?
        .into();
    let hello = until_hello(agent, vm, handle, link, RESTORE_TIMEOUT, layers, writable);
    hello.instrument(tracing::info_span!("guest-wake")).await
}

/// How long a restored clone may take to say hello.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);

/// guest-booted: the tether connects (or is connected to) and says hello,
/// within `timeout`, and before the VMM dies.
pub(crate) async fn await_hello(
    handle: &Arc<dyn VmHandle>,
    link: &GuestLink,
    timeout: Duration,
) -> Result<(Frames, OwnedWriteHalf, GuestBoot), ApiError> {
    let accept = async {
        let stream = link.next(&**handle).await.map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("accepting the guest connection failed: {e}"),
            )
        })?;
        let (rd, wr) = stream.into_split();
        let mut frames = spawn_reader(rd);
        let boot = read_hello(&mut frames).await?;
        Ok((frames, wr, boot))
    };
    tokio::select! {
            r = tokio::time::timeout(timeout, accept) => match r {
                Ok(r) => r,
                Err(_) => Err(err(
                    ErrorCode::Unavailable,
                    format!("the guest did not say hello within {} s", timeout.as_secs_f64()),
                )),
            },
            exit = handle.wait() => Err(err(
                ErrorCode::Unavailable,
                format!("the VMM exited during boot ({})", exit.description),
            )),
    }
}

/// The start's error when the VM was stopped or removed before its VMM
/// was up.
fn stopped_during_start(vm: &Vm) -> ApiError {
    err(
        ErrorCode::Conflict,
        format!("VM {} was stopped or removed while it was starting", vm.id),
    )
}

/// Whether the host has room for one more starting VM (counted already,
/// by [`Agent::live_usage`]) within its VM and guest-memory limits.
fn admit(agent: &Agent) -> Result<(), ApiError> {
    let _span = tracing::info_span!("admit").entered();
    let (live, memory) = agent.live_usage();
    if live > agent.config.max_vms {
        return Err(err(
            ErrorCode::Unavailable,
            format!(
                "this host already runs its limit of {} VMs",
                agent.config.max_vms
            ),
        ));
    }
    if memory > agent.config.max_total_memory_mib {
        return Err(err(
            ErrorCode::Unavailable,
            format!(
                "starting this VM would put {memory} MiB of guest memory on a host whose limit is {} MiB",
                agent.config.max_total_memory_mib
            ),
        ));
    }
    Ok(())
}

/// A warm-pool guest: booted, its root filesystem prepared, waiting for
/// its spec. Dropping it kills nothing by itself; [`Prebooted::discard`]
/// does.
#[derive(Debug)]
pub struct Prebooted {
    handle: Arc<dyn VmHandle>,
    link: GuestLink,
    frames: Frames,
    writer: JoinHandle<()>,
    gate: oneshot::Sender<HostMessage>,
}

/// Kills a VM's VMM, waits (bounded) for it to go and releases what the
/// backend holds for it.
pub(crate) async fn end_vmm(h: &dyn VmHandle) {
    let _ = h.kill().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), h.wait()).await;
    h.cleanup().await;
}

/// How long a pooled guest may take to mount its root filesystem, rehearse
/// a start and run its warm-up: the warm-up's own limit, which the tether
/// enforces, plus 50 s for the rest (at most 5 s waiting for its disks,
/// 10 s rehearsing and 5 s reaping what the warm-up left, with room to
/// spare for a slow, emulated guest).
const PREPARE_TIMEOUT: Duration =
    Duration::from_millis(vmlet_protocol::guest::WARMUP_PATIENCE_MS + 50_000);

/// Boots `vm` (a pool member, not in the registry) and has its tether
/// prepare the root filesystem, so a later start only sends the spec.
pub async fn preboot(
    agent: &Arc<Agent>,
    vm: &Arc<Vm>,
    warmup: Option<ProcessSpec>,
) -> Result<Prebooted, ApiError> {
    let rec = vm.record();
    vm.phase(Phase::Accepted);
    let l = match launch(agent, vm, &rec).await {
        Ok(l) => l,
        Err((e, h)) => {
            if let Some(h) = h {
                end_vmm(&*h).await;
            }
            return Err(e);
        }
    };
    let (gate, gate_rx) = oneshot::channel();
    let writer = spawn_writer(
        l.wr,
        HostMessage::Prepare {
            layers: l.layers,
            writable: l.writable,
            warmup,
        },
        Some(gate_rx),
        None,
        vm.clone(),
    );
    let mut p = Prebooted {
        handle: l.handle,
        link: l.link,
        frames: l.frames,
        writer,
        gate,
    };
    match tokio::time::timeout(PREPARE_TIMEOUT, p.frames.recv()).await {
        Ok(Some(Ok(GuestMessage::Prepared))) => Ok(p),
        other => {
            let what = match other {
                Err(_) => "it did not answer in time".to_string(),
                Ok(None) => "it closed the connection".to_string(),
                Ok(Some(Ok(GuestMessage::Failed { message, .. }))) => message,
                Ok(Some(Ok(m))) => format!("it sent {} instead", kind(&m)),
                Ok(Some(Err(e))) => e.to_string(),
            };
            p.discard().await;
            Err(err(
                ErrorCode::Unavailable,
                format!("the pooled guest did not prepare its root filesystem: {what}"),
            ))
        }
    }
}

impl Prebooted {
    /// The guest's VMM.
    pub fn handle(&self) -> Arc<dyn VmHandle> {
        self.handle.clone()
    }

    /// Kills the guest and releases its processes and sockets.
    pub async fn discard(self) {
        self.writer.abort();
        end_vmm(&*self.handle).await;
        self.link.close();
    }
}

/// A pool's warm-up process from its create spec (the image's config
/// applied): argv, environment (the default PATH, overridden by the
/// image's), user, working directory; no stdin.
pub fn warmup_spec(spec: vmlet_protocol::api::CreateSpec) -> ProcessSpec {
    ProcessSpec {
        argv: spec.argv,
        env: with_defaults(vec![DEFAULT_PATH.to_string()], &spec.env),
        workdir: spec.workdir,
        user: spec.user,
        ..ProcessSpec::default()
    }
}

/// `defaults`, each overridden by an entry of `env` with its key, then the
/// rest of `env`.
fn with_defaults(mut defaults: Vec<String>, env: &[String]) -> Vec<String> {
    for e in env {
        let key = e.split('=').next().unwrap_or_default();
        defaults.retain(|x| x.split('=').next() != Some(key));
        defaults.push(e.clone());
    }
    defaults
}

/// The process part of the spec: argv, environment (the default PATH and
/// HOSTNAME, overridden by the VM's), user, working directory.
fn process_spec(
    vm: &Vm,
    rec: &crate::vm::VmRecord,
    layers: Vec<DiskSpec>,
    writable: Option<DiskSpec>,
) -> ProcessSpec {
    let env = with_defaults(
        vec![
            DEFAULT_PATH.to_string(),
            format!("HOSTNAME={}", &vm.id[..12]),
        ],
        &rec.spec.env,
    );
    ProcessSpec {
        layers,
        writable,
        user: rec.spec.user.clone(),
        argv: rec.spec.argv.clone(),
        env,
        workdir: rec.spec.workdir.clone(),
        stdin: rec.spec.stdin_open,
        hostname: vm.id[..12].to_string(),
    }
}

/// The Unix socket path where the guest's dial to the host's tether port
/// arrives (hybrid vsock: `<uds>_<port>`).
pub fn tether_listen_path(vsock_uds: &Path) -> PathBuf {
    let mut p = vsock_uds.as_os_str().to_owned();
    p.push(format!("_{TETHER_PORT}"));
    PathBuf::from(p)
}

/// Whether a connection to a VM's tether listener comes from that VM's own
/// VMM processes: with hybrid vsock, the guest's dial arrives from the
/// process serving its vsock device (QEMU's vsock backend, or the VMM
/// itself). Every VMM may share one uid, and the listener's directory is
/// that uid's, so a process of another VM could connect too; it must not
/// pose as this guest's tether (and be handed its spec and stdin). The
/// kernel's SO_PEERCRED pid decides.
fn from_own_vmm(stream: &tokio::net::UnixStream, handle: &dyn VmHandle) -> bool {
    let Some(pid) = stream.peer_cred().ok().and_then(|c| c.pid()) else {
        return false;
    };
    let pid = pid as u32;
    handle.pid() == Some(pid) || handle.helper_pids().contains(&pid)
}

/// What `inspect` shows of a VM's confinement.
pub fn confinement_info(c: vmm_shim::ConfinementInfo) -> vmlet_protocol::api::Confinement {
    vmlet_protocol::api::Confinement {
        user: c.user,
        uid: c.uid,
        gid: c.gid,
        cgroup: c.cgroup.map(|g| vmlet_protocol::api::CgroupLimits {
            version: g.version.to_string(),
            paths: g.paths.iter().map(|p| p.display().to_string()).collect(),
            memory_max_bytes: g.limits.memory_bytes,
            cpu_quota_us: g.limits.cpu_quota_us,
            cpu_period_us: g.limits.cpu_period_us,
            pids_max: g.limits.pids_max,
        }),
        note: c.note,
    }
}

/// Binds the tether listener, replacing a stale socket file; makes its
/// directory if needed (the VMM backend gives it to the VMM's user).
pub fn bind_tether_listener(path: &Path) -> Result<UnixListener, ApiError> {
    if let Some(d) = path.parent() {
        if let Err(e) = std::fs::create_dir_all(d) {
            return Err(err(
                ErrorCode::Internal,
                format!("cannot create {}: {e}", d.display()),
            ));
        }
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| {
        err(
            ErrorCode::Internal,
            format!("cannot listen for the guest at {}: {e}", path.display()),
        )
    })
}

type Frames = mpsc::Receiver<Result<GuestMessage, FrameError>>;

/// Reads guest frames into a channel: `read_frame` is not cancel safe, so
/// one task owns the read half and the session selects on the channel.
/// The channel is small: a session that stops taking frames stops the
/// reads, and the guest's writes block (backpressure, nothing dropped).
fn spawn_reader(mut rd: OwnedReadHalf) -> Frames {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let r = read_frame::<_, GuestMessage>(&mut rd, MAX_GUEST_FRAME).await;
            let end = !matches!(r, Ok(Some(_)));
            let item = match r {
                Ok(Some(m)) => Ok(m),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            if tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    rx
}

/// Owns the write half of one guest connection: `opening` first (the spec
/// on a cold boot, `Prepare` for a pooled VM, `Resume` on a reconnect),
/// then, if `gate` is set, the message it delivers (a pooled VM's spec at
/// hand-off), then signals and acks from the VM's control queue, and stdin
/// from its stdin queue while the tether has taken all but
/// [`REPLAY_CAP`](crate::stdin::REPLAY_CAP) of what was written; each queue
/// in order, the control queue first. A later connection's writer waits
/// for this one to end (the queues' lock), so messages never interleave.
fn spawn_writer(
    mut wr: OwnedWriteHalf,
    opening: HostMessage,
    gate: Option<oneshot::Receiver<HostMessage>>,
    resume: Option<oneshot::Receiver<u64>>,
    vm: Arc<Vm>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let queue = vm.to_guest_rx.clone();
        let mut control = queue.lock().await;
        if write_frame(&mut wr, &opening).await.is_err() {
            return;
        }
        if let Some(gate) = gate {
            let Ok(m) = gate.await else { return };
            if write_frame(&mut wr, &m).await.is_err() {
                return;
            }
        }
        if let Some(resume) = resume {
            let Ok(from) = resume.await else { return };
            let (again, close) = vm.stdin_replay.lock().resume_from(from);
            if !again.is_empty() || close {
                let bytes: usize = again.iter().map(Vec::len).sum();
                tracing::info!(vm = %vm.id, from, bytes, close, "writing the stdin the tether did not take again");
            }
            for data in again {
                if write_frame(&mut wr, &HostMessage::Stdin(data))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if close
                && write_frame(&mut wr, &HostMessage::CloseStdin)
                    .await
                    .is_err()
            {
                return;
            }
        }
        let mut taken = vm.stdin_acked.subscribe();
        loop {
            // The tether buffers what it has not taken: bounded by this.
            let window = vm.stdin_replay.lock().held() < crate::stdin::REPLAY_CAP;
            let m = tokio::select! {
                biased;
                m = control.recv() => m,
                r = taken.changed(), if !window => match r {
                    Ok(()) => continue,
                    Err(_) => return,
                },
                m = vm.stdin.next(), if window => Some(m),
            };
            let Some(m) = m else { return };
            let Ok(frame) = vmlet_protocol::frame::encode(&m) else {
                return;
            };
            let ack = matches!(m, HostMessage::ExitAck);
            // Kept before the write: a write cut off half way is written
            // again on the next connection. The chunk moves, uncopied.
            match m {
                HostMessage::Stdin(data) => vm.stdin_replay.lock().wrote(data),
                HostMessage::CloseStdin => vm.stdin_replay.lock().wrote_close(),
                _ => {}
            }
            if wr.write_all(&frame).await.is_err() || wr.flush().await.is_err() || ack {
                return;
            }
        }
    })
}

async fn read_hello(frames: &mut Frames) -> Result<GuestBoot, ApiError> {
    match frames.recv().await {
        Some(Ok(GuestMessage::Hello { version, boot })) if version == GUEST_PROTOCOL_VERSION => {
            Ok(boot)
        }
        Some(Ok(GuestMessage::Hello { version, .. })) => Err(err(
            ErrorCode::Internal,
            format!(
                "the guest speaks protocol version {version}, the agent {GUEST_PROTOCOL_VERSION}"
            ),
        )),
        Some(Ok(other)) => Err(err(
            ErrorCode::Internal,
            format!("the guest sent {} instead of hello", kind(&other)),
        )),
        Some(Err(e)) => Err(err(
            ErrorCode::Internal,
            format!("the guest's hello was unreadable: {e}"),
        )),
        None => Err(err(
            ErrorCode::Internal,
            "the guest closed the connection before saying hello",
        )),
    }
}

/// The disks of a VM: its image's layers (serials `l0`, `l1`, … lowest
/// first) and its writable disk (`rw`), blank or over `backing` (a
/// template's).
pub(crate) async fn vm_disks(
    agent: &Arc<Agent>,
    vm: &Arc<Vm>,
    rec: &crate::vm::VmRecord,
    backing: Option<&Path>,
) -> Result<(Vec<Disk>, Vec<DiskSpec>, DiskSpec), ApiError> {
    let mut disks = Vec::with_capacity(rec.layers.len() + 1);
    let mut layers = Vec::with_capacity(rec.layers.len());
    for (i, diff_id) in rec.layers.iter().enumerate() {
        let d = agent.images.layer_disk(diff_id)?;
        let serial = format!("l{i}");
        disks.push(Disk {
            path: d.path,
            serial: serial.clone(),
            read_only: true,
        });
        layers.push(DiskSpec {
            serial,
            fstype: d.fstype,
        });
    }
    let agent2 = agent.clone();
    let dir = vm.dir.clone();
    let backing = backing.map(Path::to_path_buf);
    let rw = tokio::task::spawn_blocking(move || match backing {
        Some(b) => agent2.images.create_writable_over(&b, &dir),
        None => agent2.images.create_writable(&dir),
    })
    .await
    .map_err(|e| err(ErrorCode::Internal, format!("writable disk task: {e}")))??;
    disks.push(Disk {
        path: rw,
        serial: "rw".into(),
        read_only: false,
    });
    let writable = DiskSpec {
        serial: "rw".into(),
        fstype: "ext4".into(),
    };
    Ok((disks, layers, writable))
}

/// Longest exit reason kept from a guest (bytes): it is stored in the VM's
/// record and sent in every listing of the VM.
const MAX_GUEST_REASON: usize = 4096;

/// The exit a guest reported (`Exited`). The guest is untrusted: a code
/// outside 0–255 or a signal outside 1–64 is no process's, so the exit is
/// 255 and its reason says what the guest claimed.
fn exited(code: Option<i32>, signal: Option<i32>) -> ExitInfo {
    let at_ms = now_ms();
    let impossible = |what: String| ExitInfo {
        code: 255,
        signal: None,
        reason: format!("the guest reported an impossible exit: {what}"),
        at_ms,
    };
    match (code, signal) {
        (_, Some(s)) if !(1..=64).contains(&s) => impossible(format!("signal {s}")),
        (Some(c), _) if !(0..=255).contains(&c) => impossible(format!("code {c}")),
        (code, Some(s)) => ExitInfo {
            code: code.unwrap_or(128 + s),
            signal: Some(s),
            reason: format!("the process was killed by signal {s}"),
            at_ms,
        },
        (Some(code), None) => ExitInfo {
            code,
            signal: None,
            reason: format!("the process exited with code {code}"),
            at_ms,
        },
        (None, None) => impossible("neither a code nor a signal".into()),
    }
}

/// The exit of a container whose command could not run (`Failed`): the
/// guest's code if a process could have it (else 255) and its message, cut
/// to [`MAX_GUEST_REASON`] bytes.
fn failed(code: i32, message: &str) -> ExitInfo {
    ExitInfo {
        code: if (0..=255).contains(&code) { code } else { 255 },
        signal: None,
        reason: crate::vm::cut(message, MAX_GUEST_REASON),
        at_ms: now_ms(),
    }
}

fn kind(m: &GuestMessage) -> &'static str {
    match m {
        GuestMessage::Hello { .. } => "hello",
        GuestMessage::Started { .. } => "started",
        GuestMessage::Stdout(_) => "stdout",
        GuestMessage::Stderr(_) => "stderr",
        GuestMessage::Failed { .. } => "failed",
        GuestMessage::Exited { .. } => "exited",
        GuestMessage::Prepared => "prepared",
        GuestMessage::StdinAck { .. } => "stdin-ack",
        GuestMessage::Root(_) => "root",
    }
}

/// Prints an error with its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One live connection to the tether.
#[derive(Debug)]
struct GuestConn {
    frames: Frames,
    writer: JoinHandle<()>,
}

impl Drop for GuestConn {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// A running VM's session state: its VMM, the tether listener, the current
/// connection (none while the guest is redialling) and its log.
#[derive(Debug)]
pub struct Connected {
    handle: Arc<dyn VmHandle>,
    link: GuestLink,
    conn: Option<GuestConn>,
    log: LogWriter,
}

impl Connected {
    /// The session of a VM adopted from an earlier agent, on the tether
    /// listener bound again for it: no connection yet; the tether dials
    /// again and is told where to resume.
    pub fn adopted(handle: Arc<dyn VmHandle>, link: GuestLink, log: LogWriter) -> Self {
        Connected {
            handle,
            link,
            conn: None,
            log,
        }
    }
}

/// How long a reconnecting tether may take to say hello again.
const REHELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Acknowledge stored output at least this often while it flows...
const ACK_INTERVAL: Duration = Duration::from_millis(100);
/// ...and whenever this much is unacknowledged, so the tether's replay
/// buffer stays small.
const ACK_BYTES: u64 = 256 * 1024;
/// An unchanged Ack goes out this often while the connection is up.
const ACK_HEARTBEAT: Duration = Duration::from_secs(1);
/// Output the log could not take (its disk is full or failing) is tried
/// again after this, doubling up to [`LOG_RETRY_MAX`].
const LOG_RETRY_MIN: Duration = Duration::from_millis(50);
const LOG_RETRY_MAX: Duration = Duration::from_secs(1);

async fn next_frame(conn: &mut Option<GuestConn>) -> Option<Result<GuestMessage, FrameError>> {
    match conn {
        Some(c) => c.frames.recv().await,
        None => std::future::pending().await,
    }
}

/// Carries the guest's output to the log until the process exits or the
/// VMM dies, surviving broken connections, then finishes the VM.
pub async fn session(agent: Arc<Agent>, vm: Arc<Vm>, c: Connected) {
    let Connected {
        handle,
        link,
        mut conn,
        mut log,
    } = c;
    let mut exit: Option<ExitInfo> = vm.exit();
    let mut vmm_exit: Option<VmExit> = None;
    let mut acked = log.stream_bytes();
    let mut tick = tokio::time::interval(ACK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Warnings this guest can trigger at will (a guest is untrusted) are
    // rate-limited, so it cannot flood the agent's log.
    let noisy = crate::ratelimit::RateLimit::new(5, Duration::from_secs(10));
    // Acks also go out unchanged once a second as a heartbeat: the tether
    // takes a connection whose host stays silent for seconds for dead,
    // once it heard the first, which goes out at once (the first tick).
    let now = std::time::Instant::now();
    let mut last_ack = now.checked_sub(ACK_HEARTBEAT).unwrap_or(now);
    // Until the first StdinAck on a resumed connection: where its writer
    // resumes stdin.
    let mut first_stdin_ack: Option<oneshot::Sender<u64>> = None;
    // Output the log could not store yet. Nothing more is read from the
    // guest until it is stored, so output is never lost or reordered: the
    // guest's writes block (as on a full pipe), and the acks, which count
    // only stored bytes, tell a resuming tether where to go on from.
    let mut unstored: Option<(Stream, Vec<u8>)> = None;
    let mut retry_in = LOG_RETRY_MIN;
    // A deadline, not a fresh sleep per turn: the other branches (the ack
    // tick) would restart a sleep before it ever ended.
    let mut retry_at = tokio::time::Instant::now();
    let mut ack = |log: &LogWriter, acked: &mut (u64, u64)| {
        let now = log.stream_bytes();
        if (now != *acked || last_ack.elapsed() >= ACK_HEARTBEAT)
            && vm
                .to_guest
                .try_send(HostMessage::Ack {
                    stdout: now.0,
                    stderr: now.1,
                })
                .is_ok()
        {
            *acked = now;
            last_ack = std::time::Instant::now();
        }
    };
    while exit.is_none() {
        tokio::select! {
            m = next_frame(&mut conn), if unstored.is_none() => match m {
                Some(Ok(GuestMessage::Stdout(d))) => {
                    unstored = store(&vm, &mut log, Stream::Stdout, &d, &noisy);
                    if unstored.is_some() {
                        retry_at = tokio::time::Instant::now() + retry_in;
                    }
                    if log.stream_bytes().0 - acked.0 + log.stream_bytes().1 - acked.1 >= ACK_BYTES {
                        ack(&log, &mut acked);
                    }
                }
                Some(Ok(GuestMessage::Stderr(d))) => {
                    unstored = store(&vm, &mut log, Stream::Stderr, &d, &noisy);
                    if unstored.is_some() {
                        retry_at = tokio::time::Instant::now() + retry_in;
                    }
                    if log.stream_bytes().0 - acked.0 + log.stream_bytes().1 - acked.1 >= ACK_BYTES {
                        ack(&log, &mut acked);
                    }
                }
                Some(Ok(GuestMessage::Exited { code, signal })) => {
                    exit = Some(exited(code, signal));
                }
                Some(Ok(GuestMessage::Failed { message, code })) => {
                    exit = Some(failed(code, &message));
                }
                Some(Ok(GuestMessage::StdinAck { received })) => {
                    vm.stdin_taken(received);
                    if let Some(first) = first_stdin_ack.take() {
                        let _ = first.send(received);
                    }
                }
                Some(Ok(other)) => {
                    if let Some(suppressed) = noisy.admit() {
                        tracing::warn!(vm = %vm.id, message = kind(&other), suppressed, "guest sent an unexpected message; ignored");
                    }
                }
                Some(Err(e)) if !matches!(e, FrameError::Io(_) | FrameError::Truncated) => {
                    // A guest that breaks the framing is confined to its own
                    // VM: the VM is ended, nobody else notices.
                    tracing::warn!(vm = %vm.id, error = %e, "guest broke the protocol; ending its VM");
                    let _ = handle.kill().await;
                    exit = Some(ExitInfo {
                        code: 255,
                        signal: None,
                        reason: format!("the guest broke the protocol: {e}"),
                        at_ms: now_ms(),
                    });
                }
                Some(Err(_)) | None => {
                    if let Some(suppressed) = noisy.admit() {
                        tracing::warn!(vm = %vm.id, suppressed, "the guest connection broke; waiting for the tether to dial again");
                    }
                    conn = None;
                }
            },
            a = link.next(&*handle), if conn.is_none() => {
                let Ok(stream) = a else { continue };
                let (rd, wr) = stream.into_split();
                let mut frames = spawn_reader(rd);
                match tokio::time::timeout(REHELLO_TIMEOUT, read_hello(&mut frames)).await {
                    Ok(Ok(_)) => {
                        let (stdout, stderr) = log.stream_bytes();
                        acked = (stdout, stderr);
                        tracing::info!(vm = %vm.id, stdout, stderr, "the tether is back; resuming its output");
                        // The tether tells its stdin count first: the
                        // writer carries again what it did not take.
                        let (first, resume) = oneshot::channel();
                        first_stdin_ack = Some(first);
                        let writer = spawn_writer(wr, HostMessage::Resume { stdout, stderr }, None, Some(resume), vm.clone());
                        conn = Some(GuestConn { frames, writer });
                    }
                    Ok(Err(e)) => if let Some(suppressed) = noisy.admit() {
                        tracing::warn!(vm = %vm.id, error = %e, suppressed, "a reconnecting guest did not say hello");
                    },
                    Err(_) => if let Some(suppressed) = noisy.admit() {
                        tracing::warn!(vm = %vm.id, suppressed, "a reconnecting guest did not say hello in time");
                    },
                }
            }
            e = handle.wait() => {
                vmm_exit = Some(e);
                break;
            }
            () = tokio::time::sleep_until(retry_at), if unstored.is_some() => {
                let (stream, data) = unstored.take().expect("checked");
                unstored = store(&vm, &mut log, stream, &data, &noisy);
                if unstored.is_some() {
                    retry_in = (retry_in * 2).min(LOG_RETRY_MAX);
                    retry_at = tokio::time::Instant::now() + retry_in;
                } else {
                    retry_in = LOG_RETRY_MIN;
                    tracing::info!(vm = %vm.id, "the VM's log takes output again; reading the guest's output");
                }
            }
            _ = tick.tick(), if conn.is_some() => ack(&log, &mut acked),
        }
    }
    // Everything the guest sent is stored: the tether may power off.
    if exit.is_some() && vmm_exit.is_none() && conn.is_some() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            vm.to_guest.send(HostMessage::ExitAck),
        )
        .await;
    }
    log.seal();
    let vmm_exit = match vmm_exit {
        Some(e) => e,
        None => match tokio::time::timeout(POWEROFF_TIMEOUT, handle.wait()).await {
            Ok(e) => e,
            Err(_) => {
                tracing::warn!(vm = %vm.id, "the guest did not power off; killing its VMM");
                let _ = handle.kill().await;
                handle.wait().await
            }
        },
    };
    drop(conn);
    link.close();
    let exit = exit.unwrap_or_else(|| {
        if vm.with(|i| i.stopping) {
            ExitInfo {
                code: 137,
                signal: Some(9),
                reason: "stopped: the VM was killed".into(),
                at_ms: now_ms(),
            }
        } else if vmm_exit.oom_killed {
            // As a container runtime reports an OOM kill: 128 + SIGKILL.
            ExitInfo {
                code: 137,
                signal: Some(9),
                reason: format!("out of memory: {}", vmm_exit.description),
                at_ms: now_ms(),
            }
        } else {
            ExitInfo {
                code: 255,
                signal: None,
                reason: format!(
                    "the VMM exited ({}) before the guest reported an exit status",
                    vmm_exit.description
                ),
                at_ms: now_ms(),
            }
        }
    });
    handle.cleanup().await;
    finish(&agent, &vm, exit).await;
}

/// Stores a chunk of the guest's output in the VM's log. Returns what the
/// log could not take (a full or failing disk): the caller stores that
/// before anything else.
fn store(
    vm: &Vm,
    log: &mut LogWriter,
    stream: Stream,
    data: &[u8],
    noisy: &crate::ratelimit::RateLimit,
) -> Option<(Stream, Vec<u8>)> {
    if log.is_empty() {
        vm.phase(Phase::FirstOutput);
    }
    let count = |log: &LogWriter| match stream {
        Stream::Stdout => log.stream_bytes().0,
        Stream::Stderr => log.stream_bytes().1,
    };
    let before = count(log);
    let mut unstored = None;
    if let Err(e) = log.append(stream, data) {
        // The log keeps every part of a chunk it wrote, and nothing of the
        // part that failed.
        let stored = usize::try_from(count(log) - before).unwrap_or(usize::MAX);
        unstored = Some((stream, data.get(stored..).unwrap_or_default().to_vec()));
        if let Some(suppressed) = noisy.admit() {
            tracing::error!(vm = %vm.id, error = %e, suppressed, "cannot write the VM's log; holding the guest's output back until it can");
        }
    }
    if let Some(e) = log.take_rotate_error() {
        // The output is kept (over the cap) in the current segment; the
        // next append tries again, so the warning is rate-limited.
        if let Some(suppressed) = noisy.admit() {
            tracing::warn!(vm = %vm.id, error = %e, suppressed, "cannot rotate the VM's log");
        }
    }
    unstored
}

/// Marks the VM exited, persists it, and removes it if it asked for that.
pub async fn finish(agent: &Arc<Agent>, vm: &Arc<Vm>, exit: ExitInfo) {
    if let Some(w) = vm.with(|i| i.log_writer.take()) {
        // The seal flushes the log: on a blocking thread, as the record's
        // flush below. Lost only to a runtime shutting down, which ends
        // the log's readers all the same.
        let _ = tokio::task::spawn_blocking(move || w.seal()).await;
    }
    vm.phase(Phase::Exited);
    tracing::info!(vm = %vm.id, code = exit.code, reason = %exit.reason, "exited");
    vm.with(|i| {
        i.rec.exit = Some(exit);
        i.rec.vmm_pid = None;
        i.rec.helper_pids.clear();
        i.rec.state = VmState::Exited;
    });
    // On disk before anyone hears of it: a waiting `rm` deletes the VM's
    // directory the moment it sees `exited`, and a record written into a
    // directory being deleted would make the deletion fail.
    agent.persist_durably(vm).await;
    vm.set_state(VmState::Exited);
    agent.emit(vm);
    if vm.record().spec.auto_remove {
        auto_remove(agent, vm).await;
    }
}

/// How long an auto-remove VM that outlived its agent is kept after its
/// exit for a client to learn the exit.
pub const AUTO_REMOVE_GRACE: Duration = Duration::from_secs(60);

/// Removes a VM that asked for it once it exited. A VM that outlived the
/// agent that started it is kept until a client has been told its exit
/// (the `vmlet run --rm` that started it reconnects, reads the rest of the
/// output and the exit code), or for [`AUTO_REMOVE_GRACE`]: removing it at
/// once would answer that client "no such VM" and lose the exit code.
pub async fn auto_remove(agent: &Arc<Agent>, vm: &Arc<Vm>) {
    if vm.outlived_agent() {
        let (agent, vm) = (agent.clone(), vm.clone());
        tokio::spawn(async move {
            let told = vm.wait_exit_told(AUTO_REMOVE_GRACE).await;
            tracing::debug!(vm = %vm.id, told, "auto-removing a VM that outlived its agent");
            remove_exited(&agent, &vm).await;
        });
    } else {
        remove_exited(agent, vm).await;
    }
}

async fn remove_exited(agent: &Arc<Agent>, vm: &Arc<Vm>) {
    // Someone may have removed it meanwhile.
    if agent.resolve(&vm.id).is_err() {
        return;
    }
    if let Err(e) = agent.remove(vm, false).await {
        tracing::warn!(vm = %vm.id, error = %e, "auto-remove failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guests_exit_is_kept_within_what_a_process_can_have() {
        let e = exited(Some(3), None);
        assert_eq!((e.code, e.signal), (3, None));
        assert_eq!(e.reason, "the process exited with code 3");
        let e = exited(None, Some(9));
        assert_eq!((e.code, e.signal), (137, Some(9)));
        // What no process can have: no overflow, no panic, 255 and a reason.
        for (code, signal) in [
            (None, Some(i32::MAX)),
            (None, Some(0)),
            (None, Some(-5)),
            (Some(256), None),
            (Some(-1), None),
            (Some(i32::MIN), Some(i32::MAX)),
            (None, None),
        ] {
            let e = exited(code, signal);
            assert_eq!((e.code, e.signal), (255, None), "{code:?} {signal:?}");
            assert!(e.reason.contains("impossible"), "{}", e.reason);
        }
    }

    #[test]
    fn a_failed_commands_message_is_bounded() {
        let e = failed(127, "not found");
        assert_eq!((e.code, e.reason.as_str()), (127, "not found"));
        assert_eq!(failed(i32::MAX, "x").code, 255);
        assert_eq!(failed(-3, "x").code, 255);
        // Cut on a character boundary, and said to be cut.
        let long = "é".repeat(MAX_GUEST_REASON);
        let e = failed(1, &long);
        assert!(e.reason.len() <= MAX_GUEST_REASON + "…".len());
        assert!(e.reason.ends_with('…'));
    }
}
