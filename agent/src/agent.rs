//! The agent: configuration, registry of VMs, image store, VMM backend and
//! the event bus, shared by every connection.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::broadcast;
use vmlet_protocol::api::{CreateSpec, Event, ExitInfo, VmState, VmSummary};
use vmlet_protocol::{ApiError, ErrorCode};
use vmm_shim::{Disk, VmConfig, Vmm};

use crate::config::Config;
use crate::ids;
use crate::image::{ImageError, ImageStore};
use crate::initrd::{self, InitrdError};
use crate::logstore::Log;
use crate::state::write_atomic;
use crate::vm::{now_ms, Vm, VmRecord};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A directory or file could not be made.
    #[error("cannot prepare {path}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest kernel is missing.
    #[error("no guest kernel at {0}: run scripts/setup-guest.sh")]
    NoKernel(PathBuf),
    /// The tether is missing.
    #[error("no tether binary at {0}: build it with scripts/build.sh")]
    NoTether(PathBuf),
    /// The initrd could not be built.
    #[error("cannot build the guest initrd")]
    Initrd(#[from] InitrdError),
    /// The image store could not be set up.
    #[error("cannot set up the image store")]
    Image(#[from] ImageError),
    /// The VMM backend is unusable.
    #[error("cannot use the VMM backend")]
    Vmm(#[from] vmm_shim::Error),
}

/// Everything a start needs that does not depend on the VM, compiled once.
/// Each start clones it and fills in only the per-VM fields.
#[derive(Debug, Clone)]
pub struct VmTemplate {
    base: VmConfig,
}

impl VmTemplate {
    /// A per-VM config from the template.
    pub fn instantiate(&self, vm: &Vm, rec: &VmRecord, disks: Vec<Disk>) -> VmConfig {
        let mut c = self.base.clone();
        c.id.clone_from(&vm.id);
        c.dir.clone_from(&vm.dir);
        c.vsock_uds = vm.dir.join("vsock.sock");
        c.cid = rec.cid;
        c.memory_mib = rec.memory_mib;
        c.vcpus = rec.vcpus;
        c.disks = disks;
        c
    }
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    /// Its configuration.
    pub config: Config,
    /// The VMM backend.
    pub vmm: Arc<dyn Vmm>,
    /// The image store.
    pub images: ImageStore,
    /// The compiled VM template.
    pub template: VmTemplate,
    /// The guest kernel's release.
    pub kernel_release: String,
    vms: RwLock<HashMap<String, Arc<Vm>>>,
    events: broadcast::Sender<Event>,
}

impl Agent {
    /// Prepares the state directory, the guest initrd and the default
    /// image, and loads the VMs a previous agent left.
    pub fn new(config: Config, vmm: Arc<dyn Vmm>) -> Result<Arc<Agent>, SetupError> {
        let mkdir = |p: PathBuf| {
            fs::create_dir_all(&p).map_err(|source| SetupError::Io { path: p, source })
        };
        mkdir(config.state_dir.clone())?;
        mkdir(config.vms_dir())?;
        mkdir(config.guest_state_dir())?;
        let kernel = config.guest_dir.join("vmlinux");
        if !kernel.is_file() {
            return Err(SetupError::NoKernel(kernel));
        }
        if !config.tether.is_file() {
            return Err(SetupError::NoTether(config.tether.clone()));
        }
        let initrd = config.guest_state_dir().join("initrd.cpio");
        let size = initrd::build_to(&config.tether, &config.guest_dir.join("modules"), &initrd)?;
        tracing::info!(path = %initrd.display(), size, "built guest initrd");
        let images = ImageStore::open(config.images_dir())?;
        images.ensure_busybox()?;
        let kernel_release = fs::read_to_string(config.guest_dir.join("kernel.release"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let mut cmdline = format!("vmlet.port={}", vmlet_protocol::guest::TETHER_PORT);
        if !config.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&config.extra_cmdline);
        }
        let template = VmTemplate {
            base: VmConfig {
                id: String::new(),
                dir: PathBuf::new(),
                kernel,
                initrd,
                cmdline,
                memory_mib: config.memory_mib,
                vcpus: config.vcpus,
                cid: 0,
                disks: Vec::new(),
                accel: config.accel,
                vsock_uds: PathBuf::new(),
            },
        };
        let (events, _) = broadcast::channel(1024);
        let agent = Arc::new(Agent {
            config,
            vmm,
            images,
            template,
            kernel_release,
            vms: RwLock::default(),
            events,
        });
        agent.load_existing();
        Ok(agent)
    }

    /// Loads VMs from the state directory. VMs that were live when the
    /// previous agent stopped are marked exited: re-adopting running
    /// guests is not implemented yet, so their processes are ended rather
    /// than leaked.
    fn load_existing(&self) {
        let Ok(rd) = fs::read_dir(self.config.vms_dir()) else {
            return;
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if !ids::is_id(&name) {
                continue;
            }
            let dir = ent.path();
            let rec: VmRecord = match fs::read(dir.join("vm.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => r,
                None => {
                    tracing::warn!(vm = %name, "removing a VM directory without a readable record (half-created)");
                    let _ = fs::remove_dir_all(&dir);
                    continue;
                }
            };
            let mut rec = rec;
            if rec.id != name {
                continue;
            }
            if matches!(rec.state, VmState::Starting | VmState::Running) {
                if let Some(pid) = rec.vmm_pid {
                    // Best effort: end the orphaned VMM so it holds nothing.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                rec.state = VmState::Exited;
                rec.exit = Some(ExitInfo {
                    code: 255,
                    signal: None,
                    reason: "the agent restarted while the VM ran; it was not re-adopted".into(),
                    at_ms: now_ms(),
                });
                rec.vmm_pid = None;
            }
            // A VM that never started can still be started: its log stays
            // writable. Every other log is complete.
            let opened = if rec.state == VmState::Created {
                Log::open(&dir.join("log")).map(|(l, w)| (l, Some(w)))
            } else {
                Log::open_sealed(&dir.join("log")).map(|l| (l, None))
            };
            let (log, writer) = match opened {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "cannot open log");
                    continue;
                }
            };
            let vm = Vm::new(rec, dir, log, writer);
            self.persist(&vm);
            self.vms.write().insert(name, vm);
        }
    }

    /// Writes the VM's record to disk.
    pub fn persist(&self, vm: &Vm) {
        let rec = vm.record();
        let data = serde_json::to_vec_pretty(&rec).expect("record serialises");
        if let Err(e) = write_atomic(&vm.dir.join("vm.json"), &data) {
            tracing::error!(vm = %vm.id, error = %e, "cannot persist VM state");
        }
    }

    /// Publishes a state change.
    pub fn emit(&self, vm: &Vm) {
        let _ = self.events.send(Event {
            vm: vm.id.clone(),
            state: vm.state(),
            at_ms: now_ms(),
            exit: vm.exit(),
        });
    }

    /// A receiver of every state change.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Creates a VM (state `created`).
    pub fn create(&self, mut spec: CreateSpec) -> Result<Arc<Vm>, ApiError> {
        if let Some(n) = &spec.name {
            ids::validate_name(n)?;
        }
        // Fail fast on an unknown image rather than at start.
        self.images.resolve(&spec.image)?;
        if spec.argv.is_empty() {
            spec.argv = vec!["/bin/sh".into()];
        }
        if spec.argv.len() > 4096 || spec.env.len() > 4096 {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "too many arguments or environment variables (at most 4096 each)",
            ));
        }
        for e in &spec.env {
            if !e.contains('=') || e.starts_with('=') {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("environment entry {e:?} is not KEY=value"),
                ));
            }
        }
        let memory_mib = spec.memory_mib.unwrap_or(self.config.memory_mib);
        let vcpus = spec.vcpus.unwrap_or(self.config.vcpus);
        if !(64..=16384).contains(&memory_mib) || !(1..=16).contains(&vcpus) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "memory must be 64..16384 MiB and vCPUs 1..16",
            ));
        }
        let id = ids::new_id();
        let dir = self.config.vms_dir().join(&id);
        let mut vms = self.vms.write();
        if let Some(n) = &spec.name {
            if vms.values().any(|v| v.name().as_deref() == Some(n)) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("the name {n:?} is already in use"),
                ));
            }
        }
        let cid = (3u32..)
            .find(|c| !vms.values().any(|v| v.with(|i| i.rec.cid) == *c))
            .expect("a free CID");
        fs::create_dir(&dir).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("cannot create the VM directory: {e}"),
            )
        })?;
        let (log, writer) = Log::open(&dir.join("log")).map_err(|e| {
            let _ = fs::remove_dir_all(&dir);
            ApiError::new(
                ErrorCode::Internal,
                format!("cannot create the VM log: {e}"),
            )
        })?;
        let rec = VmRecord {
            id: id.clone(),
            name: spec.name.clone(),
            spec,
            created_ms: now_ms(),
            state: VmState::Created,
            exit: None,
            phases: Vec::new(),
            guest_boot: None,
            cid,
            memory_mib,
            vcpus,
            vmm_pid: None,
        };
        let vm = Vm::new(rec, dir, log, Some(writer));
        self.persist(&vm);
        vms.insert(id, vm.clone());
        drop(vms);
        self.emit(&vm);
        tracing::info!(vm = %vm.id, image = %vm.record().spec.image, "created");
        Ok(vm)
    }

    /// Finds a VM by id, unique id prefix, or name.
    pub fn resolve(&self, r: &str) -> Result<Arc<Vm>, ApiError> {
        ids::validate_ref(r)?;
        let vms = self.vms.read();
        if let Some(vm) = vms.get(r) {
            return Ok(vm.clone());
        }
        if let Some(vm) = vms.values().find(|v| v.name().as_deref() == Some(r)) {
            return Ok(vm.clone());
        }
        let mut it = vms.iter().filter(|(id, _)| id.starts_with(r));
        match (it.next(), it.next()) {
            (Some((_, vm)), None) if r.len() >= 4 => Ok(vm.clone()),
            (Some(_), Some(_)) => Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("{r:?} matches more than one VM; use more of the id"),
            )),
            _ => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no VM with id or name {r:?}"),
            )),
        }
    }

    /// VMs, running ones only unless `all`.
    pub fn list(&self, all: bool) -> Vec<VmSummary> {
        let mut v: Vec<VmSummary> = self
            .vms
            .read()
            .values()
            .map(|vm| vm.summary())
            .filter(|s| all || matches!(s.state, VmState::Starting | VmState::Running))
            .collect();
        v.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
        v
    }

    /// VMs starting or running.
    pub fn live_count(&self) -> usize {
        self.vms
            .read()
            .values()
            .filter(|v| matches!(v.state(), VmState::Starting | VmState::Running))
            .count()
    }

    /// Removes a VM and everything it owns. A live VM needs `force`.
    pub async fn remove(&self, vm: &Arc<Vm>, force: bool) -> Result<(), ApiError> {
        match vm.state() {
            VmState::Starting | VmState::Running if !force => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "VM {} is {}: stop it first or force the removal",
                        vm.id,
                        vm.state()
                    ),
                ))
            }
            VmState::Starting | VmState::Running => {
                vm.with(|i| i.stopping = true);
                if let Some(h) = vm.handle() {
                    let _ = h.kill().await;
                }
                // The session notices the VMM's death and finishes the VM.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(15), vm.wait_exit()).await;
            }
            VmState::Removed => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("VM {} was already removed", vm.id),
                ))
            }
            VmState::Created | VmState::Exited => {}
        }
        if self.vms.write().remove(&vm.id).is_none() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("VM {} was already removed", vm.id),
            ));
        }
        // A VM that never started still holds its log writer: seal it so
        // followers end.
        if let Some(w) = vm.with(|i| i.log_writer.take()) {
            w.seal();
        }
        if let Some(h) = vm.handle() {
            h.cleanup().await;
        }
        if let Err(e) = fs::remove_dir_all(&vm.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(vm = %vm.id, error = %e, "cannot delete the VM directory");
            }
        }
        vm.set_state(VmState::Removed);
        self.emit(vm);
        tracing::info!(vm = %vm.id, "removed");
        Ok(())
    }
}
