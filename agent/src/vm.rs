//! One containerVM: its identity, its state machine and what it owns.
//!
//! ```text
//! created ──start──▶ starting ──tether started the process──▶ running
//!    │                  │                                        │
//!    │                  └──────── start failed ──────┐           │ process exited,
//!    │                                               ▼           │ VMM died, stop, kill
//!    └──────────────────── remove ─────────────▶ exited ◀────────┘
//!                                                   │
//!                                                remove ──▶ removed
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use vmlet_protocol::api::{
    CreateSpec, ExitInfo, GuestBoot, Phase, PhaseTiming, RootTimings, VmInfo, VmState, VmSummary,
};
use vmlet_protocol::guest::HostMessage;
use vmlet_protocol::{ApiError, ErrorCode};
use vmm_shim::VmHandle;

use crate::logstore::{Log, LogWriter};

/// Messages to the guest that wait while the guest is slow to take them;
/// senders (stdin writers) are slowed down rather than buffered without end.
pub const TO_GUEST_QUEUE: usize = 64;

/// What is persisted of a VM in `vms/<id>/vm.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// Id.
    pub id: String,
    /// Name.
    pub name: Option<String>,
    /// The create spec.
    pub spec: CreateSpec,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// State.
    pub state: VmState,
    /// How it ended.
    pub exit: Option<ExitInfo>,
    /// Start timings.
    pub phases: Vec<PhaseTiming>,
    /// Guest boot timings.
    pub guest_boot: Option<GuestBoot>,
    /// vsock CID.
    pub cid: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// VMM pid while it runs.
    pub vmm_pid: Option<u32>,
    /// Pids of the VMM's helpers (the vsock backend) while it runs, so a
    /// restarted agent can adopt them.
    #[serde(default)]
    pub helper_pids: Vec<u32>,
    /// A warm-pool member not yet taken by a create: not a container, so
    /// a restarted agent ends it rather than adopting it.
    #[serde(default)]
    pub pooled: bool,
    /// The VM was booted ahead of demand by a warm pool.
    #[serde(default)]
    pub from_pool: bool,
    /// The VM was restored from a template snapshot (its tether link is a
    /// serial port, not vsock).
    #[serde(default)]
    pub from_template: bool,
    /// The template (its directory's name) whose frozen writable disk
    /// backs this clone's: kept while the clone runs.
    #[serde(default)]
    pub template: Option<String>,
    /// The image's id, resolved at create.
    #[serde(default)]
    pub image_id: Option<String>,
    /// The image's layers (diff ids, lowest first), resolved at create:
    /// they stay in the store while this record exists, even if the image
    /// is removed.
    #[serde(default)]
    pub layers: Vec<String>,
    /// What confines its VMM (user, cgroup, limits), from its start; kept
    /// after the VM ends so `inspect` still shows what it had.
    #[serde(default)]
    pub confinement: Option<vmlet_protocol::api::Confinement>,
    /// Where its files are: 0 for records of agents older than VMM
    /// confinement ([`VmRecord::vsock_uds`]), else [`VmRecord::LAYOUT`].
    #[serde(default)]
    pub layout: u32,
    /// How the guest assembled the root filesystem, when it did so during
    /// the start.
    #[serde(default)]
    pub root: Option<RootTimings>,
}

impl VmRecord {
    /// The layout of VMs this agent creates.
    pub const LAYOUT: u32 = 1;

    /// The VM's hybrid-vsock socket. Its directory belongs to the VMM's
    /// user (the vsock backend creates its sockets there), so it is not the
    /// VM's directory, where the agent keeps its files. VMs created by an
    /// agent older than confinement had it in the VM's directory, and keep
    /// it there, so an upgraded agent still adopts them.
    pub fn vsock_uds(&self, dir: &std::path::Path) -> PathBuf {
        if self.layout == 0 {
            dir.join("vsock.sock")
        } else {
            dir.join("vsock").join("vsock.sock")
        }
    }
}

/// Mutable state of a VM, behind one lock.
#[derive(Debug)]
pub struct Inner {
    /// The persisted part.
    pub rec: VmRecord,
    /// When the start was accepted.
    pub accepted_at: Option<Instant>,
    /// The running VMM.
    pub handle: Option<Arc<dyn VmHandle>>,
    /// The log writer until the guest session takes it.
    pub log_writer: Option<LogWriter>,
    /// A stop was requested: a VMM kill that follows is the stop's doing.
    pub stopping: bool,
    /// The booted guest of a VM taken from the warm pool, until its start.
    pub prebooted: Option<crate::start::Prebooted>,
}

/// A containerVM.
#[derive(Debug)]
pub struct Vm {
    /// Its id (16 hex digits), the only thing used in paths.
    pub id: String,
    /// Its state directory.
    pub dir: PathBuf,
    /// Its log.
    pub log: Log,
    /// Messages for the guest but stdin: signals, acks. Kept apart from
    /// stdin so that stdin the process does not read holds none of them
    /// back.
    pub to_guest: mpsc::Sender<HostMessage>,
    /// The receiving end, taken by the writer of each guest connection in
    /// turn (its lock also keeps two writers from taking stdin at once).
    pub to_guest_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<HostMessage>>>,
    /// Stdin for the guest and its close, written only while the tether
    /// keeps up.
    pub stdin: crate::stdin::StdinQueue,
    /// Stdin bytes the guest has taken since its process started; `None`
    /// while unknown (a VM adopted after an agent restart, until its
    /// tether reconnects and says).
    pub stdin_acked: watch::Sender<Option<u64>>,
    /// Stdin written towards the guest and not yet taken, for a new
    /// connection to carry again.
    pub stdin_replay: Mutex<crate::stdin::StdinReplay>,
    inner: Mutex<Inner>,
    state_tx: watch::Sender<VmState>,
    /// Held while the record is snapshot and written ([`Vm::persist`]);
    /// true once the VM's directory is being deleted: no more writes.
    persisting: Mutex<bool>,
    /// Set once a client has been told the exit (a stream's end or a
    /// wait): what an auto-remove of a VM that outlived an agent waits for.
    exit_told: watch::Sender<bool>,
    /// Set when the first output is stored ([`Vm::first_output_or_end`]).
    first_output: watch::Sender<bool>,
    /// The VM was running when this agent started (it outlived the one
    /// that started it): a client of that agent may be reconnecting.
    outlived_agent: std::sync::atomic::AtomicBool,
}

impl Vm {
    /// Creates the in-memory VM around its record.
    pub fn new(rec: VmRecord, dir: PathBuf, log: Log, writer: Option<LogWriter>) -> Arc<Vm> {
        let (to_guest, rx) = mpsc::channel(TO_GUEST_QUEUE);
        let (state_tx, _) = watch::channel(rec.state);
        Arc::new(Vm {
            id: rec.id.clone(),
            dir,
            log,
            to_guest,
            to_guest_rx: Arc::new(tokio::sync::Mutex::new(rx)),
            stdin: Default::default(),
            stdin_acked: watch::channel(None).0,
            stdin_replay: Mutex::default(),
            state_tx,
            persisting: Mutex::new(false),
            exit_told: watch::channel(false).0,
            first_output: watch::channel(false).0,
            outlived_agent: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(Inner {
                rec,
                accepted_at: None,
                handle: None,
                log_writer: writer,
                stopping: false,
                prebooted: None,
            }),
        })
    }

    /// The tether took `received` stdin bytes in all.
    pub fn stdin_taken(&self, received: u64) {
        self.stdin_replay.lock().taken(received);
        self.stdin_acked.send_replace(Some(received));
    }

    /// Runs `f` with the state locked.
    pub fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock())
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        *self.state_tx.borrow()
    }

    /// A receiver of state changes.
    pub fn subscribe(&self) -> watch::Receiver<VmState> {
        self.state_tx.subscribe()
    }

    /// Moves to `to` if the VM is in one of `from`; a conflict error
    /// otherwise.
    pub fn transition(&self, from: &[VmState], to: VmState) -> Result<(), ApiError> {
        let mut g = self.inner.lock();
        let cur = g.rec.state;
        if !from.contains(&cur) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("VM {} is {cur}, so it cannot become {to}", self.id),
            ));
        }
        g.rec.state = to;
        drop(g);
        self.state_tx.send_replace(to);
        Ok(())
    }

    /// Sets the state unconditionally (used for `exited`, which any live
    /// state can reach).
    pub fn set_state(&self, to: VmState) {
        self.inner.lock().rec.state = to;
        self.state_tx.send_replace(to);
    }

    /// Records that the start reached `phase`; returns microseconds since
    /// accepted. Only the first time counts.
    pub fn phase(&self, phase: Phase) -> u64 {
        let mut g = self.inner.lock();
        let now = Instant::now();
        let at_us = match phase {
            Phase::Accepted => {
                g.accepted_at = Some(now);
                g.rec.phases.clear();
                0
            }
            _ => g
                .accepted_at
                .map(|t| now.duration_since(t).as_micros() as u64)
                .unwrap_or(0),
        };
        if !g.rec.phases.iter().any(|p| p.phase == phase) {
            g.rec.phases.push(PhaseTiming { phase, at_us });
            tracing::debug!(vm = %self.id, phase = phase.name(), at_us, "phase reached");
        }
        drop(g);
        if phase == Phase::FirstOutput {
            self.first_output.send_replace(true);
        }
        crash_point(phase);
        at_us
    }

    /// Returns once the VM's process has output something or the VM has
    /// ended, whichever comes first.
    pub async fn first_output_or_end(&self) {
        let mut out = self.first_output.subscribe();
        let mut state = self.subscribe();
        tokio::select! {
            _ = out.wait_for(|o| *o) => {}
            _ = state.wait_for(|s| matches!(s, VmState::Exited | VmState::Removed)) => {}
        }
    }

    /// Writes the record to `vm.json` in the VM's directory, atomically.
    /// Persists from different tasks (a start, the session that ends the
    /// VM, a stop) are serialised, and each takes its snapshot under the
    /// lock, so whichever is written last holds a record at least as new
    /// as every earlier one's.
    pub fn persist(&self) -> std::io::Result<()> {
        self.write_record(|path, data| crate::state::write_atomic_mode(path, data, 0o600))
            .map(|_| ())
    }

    /// [`Vm::persist`] without waiting for the disk: the record is in
    /// place (a restarted agent reads it) when this returns, and durable
    /// once the returned [`Unsynced`](crate::state::Unsynced) is synced.
    /// `None` once the VM's directory is being deleted.
    pub fn persist_unsynced(&self) -> std::io::Result<Option<crate::state::Unsynced>> {
        self.write_record(|path, data| crate::state::write_atomic_unsynced(path, data, 0o600))
    }

    /// Snapshots the record and has `write` store it at `vm.json`, under
    /// the persist lock; `None` once the directory is being deleted. The
    /// spec (environment included) is the agent's: writers use 0600.
    fn write_record<T>(
        &self,
        write: impl FnOnce(&std::path::Path, &[u8]) -> std::io::Result<T>,
    ) -> std::io::Result<Option<T>> {
        let removed = self.persisting.lock();
        if *removed {
            return Ok(None);
        }
        let data = serde_json::to_vec_pretty(&self.record()).expect("record serialises");
        write(&self.dir.join("vm.json"), &data).map(Some)
    }

    /// Ends the VM's persists, for the deletion of its directory: a persist
    /// racing the deletion (a start's, as its VM exits and is auto-removed)
    /// would leave a file in it, and the deletion would fail. Hold the
    /// guard while deleting.
    pub fn stop_persisting(&self) -> parking_lot::MutexGuard<'_, bool> {
        let mut g = self.persisting.lock();
        *g = true;
        g
    }

    /// Notes that a client has been told how the VM ended.
    pub fn exit_told(&self) {
        self.exit_told.send_replace(true);
    }

    /// Waits until a client has been told how the VM ended, or `patience`
    /// passed; returns whether one was.
    pub async fn wait_exit_told(&self, patience: std::time::Duration) -> bool {
        let mut told = self.exit_told.subscribe();
        let waited = tokio::time::timeout(patience, told.wait_for(|t| *t)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// Marks the VM as one that outlived the agent that started it.
    pub fn set_outlived_agent(&self) {
        self.outlived_agent
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the VM outlived the agent that started it.
    pub fn outlived_agent(&self) -> bool {
        self.outlived_agent
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A copy of the persisted record.
    pub fn record(&self) -> VmRecord {
        self.inner.lock().rec.clone()
    }

    /// The summary `ps` shows.
    pub fn summary(&self) -> VmSummary {
        let g = self.inner.lock();
        summary_of(&g.rec)
    }

    /// Everything `inspect` shows.
    pub fn info(&self, accel: &str) -> VmInfo {
        let log = self.log.stats();
        let g = self.inner.lock();
        VmInfo {
            summary: summary_of(&g.rec),
            spec: g.rec.spec.clone(),
            phases: g.rec.phases.clone(),
            guest_boot: g.rec.guest_boot.clone(),
            root: g.rec.root.clone(),
            cid: g.rec.cid,
            vmm_pid: g.handle.as_ref().and_then(|h| h.pid()),
            accel: accel.to_string(),
            memory_mib: g.rec.memory_mib,
            vcpus: g.rec.vcpus,
            log_bytes: log.retained_bytes,
            log_dropped_bytes: log.dropped_stdout + log.dropped_stderr,
            start_mode: if g.rec.from_pool {
                "pool"
            } else if g.rec.from_template {
                "template"
            } else {
                "cold"
            }
            .into(),
            confinement: g.rec.confinement.clone(),
        }
    }

    /// How the VM ended, once it has.
    pub fn exit(&self) -> Option<ExitInfo> {
        self.inner.lock().rec.exit.clone()
    }

    /// The running VMM, if any.
    pub fn handle(&self) -> Option<Arc<dyn VmHandle>> {
        self.inner.lock().handle.clone()
    }

    /// The name, if any.
    pub fn name(&self) -> Option<String> {
        self.inner.lock().rec.spec.name.clone()
    }

    /// Waits until the VM has exited (or was removed) and returns how.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait_exit(&self) -> Option<ExitInfo> {
        let mut rx = self.subscribe();
        loop {
            let s = *rx.borrow_and_update();
            if matches!(s, VmState::Exited | VmState::Removed) {
                return self.exit();
            }
            if rx.changed().await.is_err() {
                return self.exit();
            }
        }
    }
}

/// Most bytes of a VM's command, and of its exit reason, a listing
/// carries: a listing of every VM must fit one reply (`inspect` has them
/// whole).
pub const SUMMARY_TEXT: usize = 1024;

fn summary_of(rec: &VmRecord) -> VmSummary {
    let mut room = SUMMARY_TEXT;
    let mut argv = Vec::new();
    for a in &rec.spec.argv {
        if a.len() <= room {
            room -= a.len();
            argv.push(a.clone());
        } else {
            argv.push(cut(a, room));
            break;
        }
    }
    VmSummary {
        id: rec.id.clone(),
        name: rec.name.clone(),
        image: rec.spec.image.clone(),
        argv,
        state: rec.state,
        created_ms: rec.created_ms,
        exit: rec.exit.clone().map(|mut e| {
            e.reason = cut(&e.reason, SUMMARY_TEXT);
            e
        }),
    }
}

/// `s` cut to at most `max` bytes on a character boundary, ending in `…`
/// when cut.
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Fault injection for the crash-safety tests: with
/// `VMLET_TEST_CRASH_AT=<phase name>` in its environment, the agent aborts
/// (no cleanup, like `kill -9`) the moment a start reaches that phase.
/// Inert unless set; never set it on a production host.
fn crash_point(phase: Phase) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("VMLET_TEST_CRASH_AT").ok());
    if at.as_deref() == Some(phase.name()) {
        eprintln!("vmletd: VMLET_TEST_CRASH_AT={}: aborting", phase.name());
        std::process::abort();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::logstore::LogLimits;

    /// A VM in `dir` (made if missing), as created.
    pub(crate) fn test_vm(dir: &std::path::Path) -> Arc<Vm> {
        std::fs::create_dir_all(dir).unwrap();
        let (log, writer) = Log::open(&dir.join("log"), LogLimits::DEFAULT).unwrap();
        Vm::new(
            record("0123456789abcdef"),
            dir.to_owned(),
            log,
            Some(writer),
        )
    }

    fn record(id: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: None,
            spec: Default::default(),
            created_ms: 0,
            state: VmState::Created,
            exit: None,
            phases: Vec::new(),
            guest_boot: None,
            cid: 3,
            memory_mib: 256,
            vcpus: 1,
            vmm_pid: None,
            helper_pids: Vec::new(),
            pooled: false,
            from_pool: false,
            from_template: false,
            template: None,
            image_id: None,
            layers: Vec::new(),
            confinement: None,
            layout: VmRecord::LAYOUT,
            root: None,
        }
    }

    /// Tasks that change the record and persist it at the same time (a
    /// start's persist racing the session that ends the VM) leave the
    /// newest record on disk, and no persist fails on another's temporary
    /// file.
    #[test]
    fn concurrent_persists_leave_the_newest_record() {
        let d = tempfile::tempdir().unwrap();
        let (log, writer) = Log::open(&d.path().join("log"), LogLimits::DEFAULT).unwrap();
        let vm = Vm::new(
            record("0123456789abcdef"),
            d.path().to_owned(),
            log,
            Some(writer),
        );
        const THREADS: u32 = 4;
        const ROUNDS: u32 = 200;
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    for _ in 0..ROUNDS {
                        vm.with(|i| i.rec.memory_mib += 1);
                        vm.persist().expect("persist");
                    }
                });
            }
        });
        let on_disk: VmRecord =
            serde_json::from_slice(&std::fs::read(d.path().join("vm.json")).unwrap()).unwrap();
        assert_eq!(on_disk.memory_mib, 256 + THREADS * ROUNDS);
        assert_eq!(vm.record().memory_mib, on_disk.memory_mib);
    }

    /// Once the directory is being deleted, a persist writes nothing into
    /// it (the deletion would fail on the new file, or leave it behind).
    #[test]
    fn no_persist_after_the_directory_is_deleted() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        let (log, writer) = Log::open(&dir.join("log"), LogLimits::DEFAULT).unwrap();
        let vm = Vm::new(record("0123456789abcdef"), dir.clone(), log, Some(writer));
        vm.persist().unwrap();
        {
            let _deleting = vm.stop_persisting();
            std::fs::remove_dir_all(&dir).unwrap();
        }
        std::fs::create_dir(&dir).unwrap();
        vm.persist().unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }
}
