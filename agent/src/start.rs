//! The start path, phase by phase, and the guest session that carries the
//! running container's stdio.
//!
//! `accepted → admitted → config-cloned → disks-attached → vmm-spawned →
//! guest-booted → process-started → first-output → exited`: each phase is
//! recorded on the VM (shown by `inspect`) and traced as a span.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tracing::Instrument;
use vmlet_protocol::aio::{read_frame, write_frame};
use vmlet_protocol::api::{ExitInfo, Phase, Stream, VmState};
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
    vm.phase(Phase::Accepted);
    agent.emit(vm);
    let span = tracing::info_span!("start", vm = %vm.id);
    let res = boot(agent, vm).instrument(span.clone()).await;
    match res {
        Ok(conn) => {
            tokio::spawn(session(agent.clone(), vm.clone(), conn).instrument(span));
            Ok(())
        }
        Err((e, handle)) => {
            tracing::error!(parent: &span, vm = %vm.id, error = %e, "start failed");
            if let Some(h) = handle {
                let _ = h.kill().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), h.wait()).await;
                h.cleanup().await;
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

/// A guest connected, past hello, with its process started.
struct Connected {
    handle: Arc<dyn VmHandle>,
    rd: OwnedReadHalf,
    log: LogWriter,
    to_guest: mpsc::Sender<HostMessage>,
}

type BootError = (ApiError, Option<Arc<dyn VmHandle>>);

async fn boot(agent: &Arc<Agent>, vm: &Arc<Vm>) -> Result<Connected, BootError> {
    // admitted
    let admit = tracing::info_span!("admit").entered();
    if agent.live_count() > agent.config.max_vms {
        return Err((
            err(
                ErrorCode::Unavailable,
                format!(
                    "this host already runs its limit of {} VMs",
                    agent.config.max_vms
                ),
            ),
            None,
        ));
    }
    vm.phase(Phase::Admitted);
    drop(admit);

    // config-cloned
    let clone = tracing::info_span!("config-clone").entered();
    let rec = vm.record();
    let image = agent
        .images
        .resolve(&rec.spec.image)
        .map_err(|e| (e, None))?;
    let disks = vec![Disk {
        path: image.rootfs.clone(),
        serial: "layer0".into(),
        read_only: true,
    }];
    let cfg = agent.template.instantiate(vm, &rec, disks);
    vm.phase(Phase::ConfigCloned);
    drop(clone);

    // disks-attached: the image's disk is shared read-only; the writable
    // layer is a tmpfs in the guest for now.
    let layers = vec![DiskSpec {
        serial: "layer0".into(),
        fstype: image.fstype.into(),
    }];
    vm.phase(Phase::DisksAttached);
    let listen = tracing::info_span!("vsock-listen").entered();

    // The tether's listener must exist before the guest can dial it.
    let listen_path = {
        let mut p = cfg.vsock_uds.clone().into_os_string();
        p.push(format!("_{TETHER_PORT}"));
        std::path::PathBuf::from(p)
    };
    let _ = std::fs::remove_file(&listen_path);
    let listener = UnixListener::bind(&listen_path).map_err(|e| {
        (
            err(
                ErrorCode::Internal,
                format!(
                    "cannot listen for the guest at {}: {e}",
                    listen_path.display()
                ),
            ),
            None,
        )
    })?;

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
    vm.with(|i| {
        i.handle = Some(handle.clone());
        i.rec.vmm_pid = handle.pid();
    });
    agent.persist(vm);
    vm.phase(Phase::VmmSpawned);

    // guest-booted: the tether dials in and says hello, within the boot
    // timeout, and before the VMM dies.
    let fail = |e: ApiError| (e, Some(handle.clone()));
    let timeout = agent.config.boot_timeout;
    let accept = async {
        let (stream, _) = listener.accept().await.map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("accepting the guest connection failed: {e}"),
            )
        })?;
        let (mut rd, wr) = stream.into_split();
        match read_frame::<_, GuestMessage>(&mut rd, MAX_GUEST_FRAME).await {
            Ok(Some(GuestMessage::Hello { version, boot })) if version == GUEST_PROTOCOL_VERSION => {
                Ok((rd, wr, boot))
            }
            Ok(Some(GuestMessage::Hello { version, .. })) => Err(err(
                ErrorCode::Internal,
                format!("the guest speaks protocol version {version}, the agent {GUEST_PROTOCOL_VERSION}"),
            )),
            Ok(other) => Err(err(
                ErrorCode::Internal,
                format!("the guest sent {:?} instead of hello", other.map(|m| kind(&m))),
            )),
            Err(e) => Err(err(
                ErrorCode::Internal,
                format!("the guest's hello was unreadable: {e}"),
            )),
        }
    };
    let booted = async {
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
    .instrument(tracing::info_span!("guest-boot"))
    .await;
    let (mut rd, wr, boot) = booted.map_err(fail)?;
    drop(listener);
    let _ = std::fs::remove_file(&listen_path);
    vm.with(|i| i.rec.guest_boot = Some(boot));
    vm.phase(Phase::GuestBooted);

    // process-started
    let mut env = vec![
        DEFAULT_PATH.to_string(),
        format!("HOSTNAME={}", &vm.id[..12]),
    ];
    for e in &rec.spec.env {
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let spec = ProcessSpec {
        layers,
        writable: None,
        argv: rec.spec.argv.clone(),
        env,
        workdir: rec.spec.workdir.clone(),
        stdin: rec.spec.stdin_open,
        hostname: vm.id[..12].to_string(),
    };
    let to_guest_rx = vm
        .with(|i| i.to_guest_rx.take())
        .ok_or_else(|| fail(err(ErrorCode::Internal, "the VM was already started once")))?;
    tokio::spawn(guest_writer(wr, spec, to_guest_rx));
    let log = vm
        .with(|i| i.log_writer.take())
        .ok_or_else(|| fail(err(ErrorCode::Internal, "the VM's log is closed")))?;
    let started = tokio::time::timeout(
        SPAWN_TIMEOUT,
        read_frame::<_, GuestMessage>(&mut rd, MAX_GUEST_FRAME),
    )
    .instrument(tracing::info_span!("process-start"))
    .await;
    let mut log = log;
    match started {
        Ok(Ok(Some(GuestMessage::Started { .. }))) => {}
        Ok(Ok(Some(GuestMessage::Failed { message, code }))) => {
            // Not a failure of the start: the container's command could
            // not run, so it exits with the tether's code, as a shell would.
            // The session acknowledges it and lets the guest power off.
            let _ = log.append(Stream::Stderr, format!("vmlet: {message}\n").as_bytes());
            vm.with(|i| {
                i.rec.exit = Some(ExitInfo {
                    code,
                    signal: None,
                    reason: message,
                    at_ms: now_ms(),
                })
            });
        }
        other => {
            log.seal();
            return Err(fail(err(
                ErrorCode::Internal,
                format!("the guest did not start the process: {other:?}"),
            )));
        }
    }
    vm.phase(Phase::ProcessStarted);
    vm.transition(&[VmState::Starting], VmState::Running)
        .map_err(fail)?;
    agent.persist(vm);
    agent.emit(vm);
    tracing::info!(vm = %vm.id, "running");
    Ok(Connected {
        handle,
        rd,
        log,
        to_guest: vm.to_guest.clone(),
    })
}

fn kind(m: &GuestMessage) -> &'static str {
    match m {
        GuestMessage::Hello { .. } => "hello",
        GuestMessage::Started { .. } => "started",
        GuestMessage::Stdout(_) => "stdout",
        GuestMessage::Stderr(_) => "stderr",
        GuestMessage::Failed { .. } => "failed",
        GuestMessage::Exited { .. } => "exited",
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

/// Owns the write half of the guest connection: the spec first, then
/// stdin, signals and the exit acknowledgement, in order.
async fn guest_writer(
    mut wr: OwnedWriteHalf,
    spec: ProcessSpec,
    mut rx: mpsc::Receiver<HostMessage>,
) {
    if write_frame(&mut wr, &HostMessage::Spec(spec))
        .await
        .is_err()
    {
        return;
    }
    while let Some(m) = rx.recv().await {
        let ack = matches!(m, HostMessage::ExitAck);
        if write_frame(&mut wr, &m).await.is_err() || ack {
            return;
        }
    }
}

/// Carries the guest's output to the log until the process exits or the
/// VMM dies, then finishes the VM.
async fn session(agent: Arc<Agent>, vm: Arc<Vm>, c: Connected) {
    let Connected {
        handle,
        mut rd,
        mut log,
        to_guest,
    } = c;
    let mut exit: Option<ExitInfo> = vm.exit();
    let mut vmm_exit: Option<VmExit> = None;
    if exit.is_none() {
        loop {
            // read_frame is not cancel safe, but it is only cancelled when
            // the VMM has died, and then the connection is abandoned.
            tokio::select! {
                m = read_frame::<_, GuestMessage>(&mut rd, MAX_GUEST_FRAME) => match m {
                    Ok(Some(GuestMessage::Stdout(d))) => store(&vm, &mut log, Stream::Stdout, &d),
                    Ok(Some(GuestMessage::Stderr(d))) => store(&vm, &mut log, Stream::Stderr, &d),
                    Ok(Some(GuestMessage::Exited { code, signal })) => {
                        let code = code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
                        let reason = match signal {
                            Some(s) => format!("the process was killed by signal {s}"),
                            None => format!("the process exited with code {code}"),
                        };
                        exit = Some(ExitInfo { code, signal, reason, at_ms: now_ms() });
                        break;
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(vm = %vm.id, message = kind(&other), "guest sent an unexpected message; ignored");
                    }
                    Ok(None) => {
                        tracing::warn!(vm = %vm.id, "guest closed its connection before reporting an exit");
                        break;
                    }
                    Err(e) => {
                        // A guest that breaks the framing is confined to its
                        // own VM: the VM is ended, nobody else notices.
                        tracing::warn!(vm = %vm.id, error = %e, "guest broke the protocol; ending its VM");
                        let _ = handle.kill().await;
                        exit = Some(ExitInfo {
                            code: 255,
                            signal: None,
                            reason: format!("the guest broke the protocol: {e}"),
                            at_ms: now_ms(),
                        });
                        break;
                    }
                },
                e = handle.wait() => {
                    vmm_exit = Some(e);
                    break;
                }
            }
        }
    }
    // Everything the guest sent is stored: the tether may power off.
    if exit.is_some() && vmm_exit.is_none() {
        let _ = to_guest.send(HostMessage::ExitAck).await;
    }
    drop(to_guest);
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
    let exit = exit.unwrap_or_else(|| {
        if vm.with(|i| i.stopping) {
            ExitInfo {
                code: 137,
                signal: Some(9),
                reason: "stopped: the VM was killed".into(),
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

fn store(vm: &Vm, log: &mut LogWriter, stream: Stream, data: &[u8]) {
    if log.is_empty() {
        vm.phase(Phase::FirstOutput);
    }
    if let Err(e) = log.append(stream, data) {
        tracing::error!(vm = %vm.id, error = %e, "cannot write the VM's log");
    }
}

/// Marks the VM exited, persists it, and removes it if it asked for that.
async fn finish(agent: &Arc<Agent>, vm: &Arc<Vm>, exit: ExitInfo) {
    if let Some(w) = vm.with(|i| i.log_writer.take()) {
        w.seal();
    }
    vm.phase(Phase::Exited);
    tracing::info!(vm = %vm.id, code = exit.code, reason = %exit.reason, "exited");
    vm.with(|i| {
        i.rec.exit = Some(exit);
        i.rec.vmm_pid = None;
    });
    vm.set_state(VmState::Exited);
    agent.persist(vm);
    agent.emit(vm);
    if vm.record().spec.auto_remove {
        if let Err(e) = agent.remove(vm, false).await {
            tracing::warn!(vm = %vm.id, error = %e, "auto-remove failed");
        }
    }
}
