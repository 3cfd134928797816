//! The agent: configuration, registry of VMs, image store, VMM backend and
//! the event bus, shared by every connection.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::broadcast;
use vmlet_protocol::api::{CreateSpec, Event, ExitInfo, VmState, VmSummary};
use vmlet_protocol::guest::ProcessSpec;
use vmlet_protocol::{ApiError, ErrorCode};
use vmm_shim::{Disk, StagedFile, VmConfig, Vmm};

use crate::config::Config;
use crate::ids;
use crate::image::{ImageError, ImageStore};
use crate::initrd::{self, InitrdError};
use crate::kernel::{GuestKernel, KernelError};
use crate::logstore::Log;
use crate::vm::{now_ms, Vm, VmRecord};

/// Most bytes of command, environment, working directory and user one VM
/// may have: what its spec carries to the guest, whose frames are at most
/// [`vmlet_protocol::guest::MAX_GUEST_FRAME`] bytes, with room left for the
/// spec's disks and hostname.
pub const MAX_SPEC_BYTES: usize = vmlet_protocol::guest::MAX_GUEST_FRAME as usize - 16 * 1024;

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
    /// The guest kernel is missing or cannot run guests.
    #[error("cannot use the guest kernel")]
    Kernel(#[from] KernelError),
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
    /// A template compiled from a base config (its per-VM fields are
    /// ignored).
    pub fn new(base: VmConfig) -> Self {
        VmTemplate { base }
    }

    /// A per-VM config from the template.
    pub fn instantiate(&self, vm: &Vm, rec: &VmRecord, disks: Vec<Disk>) -> VmConfig {
        let mut c = self.clone_for(&vm.id, &vm.dir, rec.cid, rec.memory_mib, rec.vcpus, disks);
        c.vsock_uds = rec.vsock_uds(&vm.dir);
        c
    }

    /// Clones the template and fills in only what is per-VM.
    pub fn clone_for(
        &self,
        id: &str,
        dir: &std::path::Path,
        cid: u32,
        memory_mib: u32,
        vcpus: u32,
        disks: Vec<Disk>,
    ) -> VmConfig {
        let mut c = self.base.clone();
        id.clone_into(&mut c.id);
        dir.clone_into(&mut c.dir);
        c.vsock_uds = dir.join("vsock").join("vsock.sock");
        c.cid = cid;
        c.memory_mib = memory_mib;
        c.vcpus = vcpus;
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
    /// The guest kernel every VM boots.
    pub kernel: GuestKernel,
    /// Warm pools.
    pub pools: crate::pool::Pools,
    /// Guest templates.
    pub templates: crate::templates::Templates,
    vms: RwLock<HashMap<String, Arc<Vm>>>,
    /// Layer disks kept in memory (pre-staged images), by path.
    warm: parking_lot::Mutex<HashMap<PathBuf, memmap2::Mmap>>,
    /// vsock CIDs in use, by VMs and pool members alike: no two guests of
    /// this host ever share one.
    cids: parking_lot::Mutex<std::collections::BTreeSet<u32>>,
    events: broadcast::Sender<Event>,
    /// Syncs the records written by [`Agent::persist_unsynced`].
    syncer: crate::state::Syncer,
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
        let guest_kernel = GuestKernel::open(&config.guest_dir)?;
        tracing::info!(
            release = %guest_kernel.release,
            dir = %guest_kernel.dir.display(),
            acpi = guest_kernel.acpi,
            modules = guest_kernel.modules.is_some(),
            "guest kernel"
        );
        let kernel = guest_kernel.vmlinux.clone();
        if !config.tether.is_file() {
            return Err(SetupError::NoTether(config.tether.clone()));
        }
        let initrd = config.guest_state_dir().join("initrd.cpio");
        let size = initrd::build_to(&config.tether, guest_kernel.modules.as_deref(), &initrd)?;
        tracing::info!(path = %initrd.display(), size, "built guest initrd");
        let images = ImageStore::open(config.images_dir())?;
        images.ensure_busybox()?;
        let mut cmdline = format!("vmlet.port={}", vmlet_protocol::guest::TETHER_PORT);
        if !config.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&config.extra_cmdline);
        }
        // Pre-staging: the kernel and initrd go into sealed memory once,
        // so no start reads them from disk or sees them change.
        let staged = if config.prestage {
            let staged = (
                StagedFile::stage(&kernel, "kernel").map_err(|source| SetupError::Io {
                    path: kernel.clone(),
                    source,
                })?,
                StagedFile::stage(&initrd, "initrd").map_err(|source| SetupError::Io {
                    path: initrd.clone(),
                    source,
                })?,
            );
            tracing::info!(
                kernel_bytes = staged.0.len(),
                initrd_bytes = staged.1.len(),
                "staged the guest kernel and initrd in sealed memory"
            );
            Some(staged)
        } else {
            tracing::info!("pre-staging off: every start reads the kernel and initrd from disk");
            None
        };
        let template = VmTemplate::new(VmConfig {
            id: String::new(),
            dir: PathBuf::new(),
            kernel,
            initrd,
            cmdline,
            acpi: guest_kernel.acpi,
            apic_timer_hz: guest_kernel.apic_timer_hz,
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            cid: 0,
            disks: Vec::new(),
            accel: config.accel,
            vsock_uds: PathBuf::new(),
            link: Default::default(),
            memory: Default::default(),
            incoming: None,
            staged,
        });
        let (events, _) = broadcast::channel(1024);
        let pools = crate::pool::Pools::new(
            &config.pools,
            config.pool_refill,
            config.memory_mib,
            config.vcpus,
        );
        let templates =
            crate::templates::Templates::new(&config.templates, config.memory_mib, config.vcpus);
        let agent = Arc::new(Agent {
            templates,
            config,
            vmm,
            images,
            template,
            kernel: guest_kernel,
            pools,
            vms: RwLock::default(),
            cids: Default::default(),
            warm: Default::default(),
            events,
            syncer: crate::state::Syncer::start(),
        });
        agent.load_existing();
        Ok(agent)
    }

    /// Loads VMs from the state directory. Running VMs are adopted later by
    /// [`Agent::adopt_running`]; VMs caught half-started are ended and
    /// cleaned up; a directory without a readable record (a create cut
    /// short) is removed.
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
            if rec.pooled {
                // A warm-pool member of the previous agent: not a container,
                // so it is ended, not adopted.
                end_pool_member(&rec, &dir);
                continue;
            }
            // Created with a VMM: it held a warm-pool guest, which may
            // already have been handed its spec (the record says running
            // only once the process runs). Ended like a half-started VM,
            // so its command never runs twice.
            let held_guest = rec.state == VmState::Created && rec.vmm_pid.is_some();
            if rec.state == VmState::Starting || held_guest {
                // Half-started when the previous agent died: the start's
                // caller got no answer, so the VM is ended, not completed.
                let reason = if held_guest {
                    "the agent restarted while the VM held a warm-pool guest"
                } else {
                    "the agent restarted while the VM was starting"
                };
                end_loaded(&mut rec, &dir, reason.into());
            }
            // A VM that never started can still be started, and a running
            // one is adopted by `adopt_running`: their logs stay writable.
            // Every other log is complete.
            let opened = if matches!(rec.state, VmState::Created | VmState::Running) {
                Log::open(&dir.join("log"), self.config.log_limits).map(|(l, w)| (l, Some(w)))
            } else {
                Log::open_sealed(&dir.join("log")).map(|l| (l, None))
            };
            let (log, writer) = match opened {
                Ok(l) => l,
                Err(e) => {
                    // Neither left running unaccounted for nor forgotten: a
                    // VM whose log cannot be reopened is ended and listed
                    // with the reason (and its log as far as it can still
                    // be read), so it can be inspected and removed.
                    tracing::warn!(vm = %name, error = %e, "cannot reopen the VM's log; ending the VM");
                    if matches!(rec.state, VmState::Created | VmState::Running) {
                        let reason = format!("the agent could not reopen the VM's log: {e}");
                        end_loaded(&mut rec, &dir, reason);
                    }
                    let log = Log::open_sealed(&dir.join("log")).unwrap_or_else(|_| Log::empty());
                    (log, None)
                }
            };
            self.cids.lock().insert(rec.cid);
            let vm = Vm::new(rec, dir, log, writer);
            self.persist(&vm);
            self.vms.write().insert(name, vm);
        }
    }

    /// Takes over every VM that was running when the previous agent
    /// stopped: finds its VMM and vsock backend again, listens for its
    /// tether (which dials again by itself) and resumes its output where
    /// the log ends. A VM whose processes are gone is marked exited with
    /// the reason and cleaned up.
    pub async fn adopt_running(self: &Arc<Self>) {
        // An auto-remove VM that exited without being removed (the agent
        // ended in between, or during its grace): removed once a client
        // learns the exit, or after the grace.
        let leftovers: Vec<Arc<Vm>> = self
            .vms
            .read()
            .values()
            .filter(|v| v.state() == VmState::Exited && v.record().spec.auto_remove)
            .cloned()
            .collect();
        for vm in leftovers {
            vm.set_outlived_agent();
            crate::start::auto_remove(self, &vm).await;
        }
        let running: Vec<Arc<Vm>> = self
            .vms
            .read()
            .values()
            .filter(|v| v.state() == VmState::Running)
            .cloned()
            .collect();
        for vm in running {
            vm.set_outlived_agent();
            let rec = vm.record();
            let mut cfg = self.template.instantiate(&vm, &rec, Vec::new());
            if rec.from_template {
                cfg.link = vmm_shim::Link::Serial;
            }
            // The tether's link is set up again first: adopting opens a
            // vsock listener to the VMM's user, whose backend connects to it.
            let link = crate::start::GuestLink::open(&vm.dir, &cfg.vsock_uds, rec.from_template)
                .map_err(|e| e.message);
            let adopted = match (link, rec.vmm_pid) {
                (Ok(l), Some(pid)) => self
                    .vmm
                    .adopt(&cfg, pid, &rec.helper_pids)
                    .await
                    .map(|h| (h, l))
                    .map_err(|e| crate::start::error_chain(&e)),
                (Err(e), _) => Err(e),
                (_, None) => Err("no VMM pid was recorded".to_string()),
            };
            let writer = vm.with(|i| i.log_writer.take());
            let session = adopted.and_then(|(h, listener)| {
                let h: Arc<dyn vmm_shim::VmHandle> = h.into();
                let log = writer.ok_or_else(|| "its log is not writable".to_string())?;
                vm.with(|i| i.handle = Some(h.clone()));
                Ok(crate::start::Connected::adopted(h, listener, log))
            });
            match session {
                Ok(c) => {
                    tracing::info!(vm = %vm.id, "adopted a VM left running by the previous agent");
                    tokio::spawn(crate::start::session(self.clone(), vm.clone(), c));
                }
                Err(why) => {
                    tracing::warn!(vm = %vm.id, reason = %why, "cannot adopt a VM; marking it exited");
                    for pid in rec.vmm_pid.iter().chain(&rec.helper_pids) {
                        kill_if_ours(*pid, &vm.dir);
                    }
                    remove_sockets(&vm.dir);
                    if let Some(h) = vm.handle() {
                        h.cleanup().await;
                    }
                    crate::start::finish(
                        self,
                        &vm,
                        ExitInfo {
                            code: 255,
                            signal: None,
                            reason: format!("the VM ended while the agent was not running ({why})"),
                            at_ms: now_ms(),
                        },
                    )
                    .await;
                }
            }
        }
    }

    /// Ids of the VMs that are running (after adoption: whose VMM this agent
    /// holds).
    pub fn running_ids(&self) -> std::collections::HashSet<String> {
        self.vms
            .read()
            .values()
            .filter(|v| matches!(v.state(), VmState::Starting | VmState::Running))
            .map(|v| v.id.clone())
            .collect()
    }

    /// Loads `image`'s layer disks into memory and keeps them mapped, so
    /// starts of it wait on no disk. Returns the bytes staged.
    /// Refused when the agent runs with pre-staging off.
    pub async fn prestage(self: &Arc<Self>, image: &str) -> Result<u64, ApiError> {
        if !self.config.prestage {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "pre-staging is off in this agent (vmletd --no-prestage)",
            ));
        }
        let img = self.images.resolve(image)?;
        let mut total = 0;
        for diff_id in &img.layers {
            let path = self.images.layer_disk(diff_id)?.path;
            if self.warm.lock().contains_key(&path) {
                continue;
            }
            let p = path.clone();
            let map = tokio::task::spawn_blocking(move || -> std::io::Result<memmap2::Mmap> {
                let f = fs::File::open(&p)?;
                // SAFETY: layer disks are immutable once converted (content
                // addressed, written once, renamed into place); the mapping
                // is only read.
                let map = unsafe { memmap2::Mmap::map(&f)? };
                let _ = map.advise(memmap2::Advice::WillNeed);
                // Touch every page so it is resident now, not at first use.
                let mut sum = 0u8;
                for b in map.iter().step_by(4096) {
                    sum = sum.wrapping_add(*b);
                }
                std::hint::black_box(sum);
                Ok(map)
            })
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("prestage task: {e}")))?
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!("cannot load {} into memory: {e}", path.display()),
                )
            })?;
            total += map.len() as u64;
            self.warm.lock().insert(path, map);
        }
        tracing::info!(image, bytes = total, "pre-staged image layers in memory");
        Ok(total)
    }

    /// Writes the VM's record to disk (a failure is logged: the VM goes
    /// on, and the next persist tries again).
    pub fn persist(&self, vm: &Vm) {
        if let Err(e) = vm.persist() {
            tracing::error!(vm = %vm.id, error = %e, "cannot persist VM state");
        }
    }

    /// [`Agent::persist`] on a blocking thread, so that the disk's flush
    /// holds up no runtime thread; returns once the record is on disk.
    pub async fn persist_durably(self: &Arc<Self>, vm: &Arc<Vm>) {
        let (agent, v) = (self.clone(), vm.clone());
        if tokio::task::spawn_blocking(move || agent.persist(&v))
            .await
            .is_err()
        {
            // The runtime is shutting down: write it here.
            self.persist(vm);
        }
    }

    /// Writes the VM's record without waiting for the disk: it is in place
    /// (what a restarted agent reads) when this returns, and the agent's
    /// sync thread flushes it right after. For the records of a create and
    /// of a start, whose callers then wait for the record to be in place,
    /// not for its flush (~1.5 ms here; 33 ms in one trace while a pool
    /// member's QEMU wrote), and do not hold a runtime thread in the
    /// meantime. A power loss before the flush may lose that change (a
    /// creation; a start, which then reads as cut short), but no VM on the
    /// host outlives a power loss anyway. What one would lose, the exit and
    /// its code, is written with [`Agent::persist_durably`].
    pub fn persist_unsynced(&self, vm: &Vm) {
        match vm.persist_unsynced() {
            Ok(Some(pending)) => self.syncer.submit(pending),
            Ok(None) => {}
            Err(e) => tracing::error!(vm = %vm.id, error = %e, "cannot persist VM state"),
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
        // Resolve the image now: the VM keeps its layers whatever happens
        // to the image's name later. The GC guard keeps them until the
        // VM's record is in the registry.
        let _gc = self.images.gc_guard();
        let image = self.images.resolve(&spec.image)?;
        crate::image::apply_config(&mut spec, &image.config)?;
        if spec.argv.len() > 4096 || spec.env.len() > 4096 {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "too many arguments or environment variables (at most 4096 each)",
            ));
        }
        // All of it goes to the guest in one spec, whose frame the tether
        // bounds: refuse here what could never be sent.
        let spec_bytes = spec_bytes(
            spec.argv
                .iter()
                .chain(&spec.env)
                .chain(&spec.workdir)
                .chain(&spec.user),
        );
        if spec_bytes > MAX_SPEC_BYTES {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "the command, environment, working directory and user take {spec_bytes} bytes \
                     (the image's included); at most {MAX_SPEC_BYTES} reach a guest"
                ),
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
        let mut vms = self.vms.write();
        if let Some(n) = &spec.name {
            if vms.values().any(|v| v.name().as_deref() == Some(n)) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("the name {n:?} is already in use"),
                ));
            }
        }
        // A warm-pool member of this image, memory and vCPUs is a guest
        // that already booted: it becomes this VM, keeping its id.
        let vm = match self.pools.take(&image.id, memory_mib, vcpus) {
            Some((vm, pre)) => {
                vm.with(|i| {
                    i.rec.name.clone_from(&spec.name);
                    i.rec.spec = spec;
                    i.rec.created_ms = now_ms();
                    i.rec.pooled = false;
                    i.rec.from_pool = true;
                    i.prebooted = Some(pre);
                });
                self.persist_unsynced(&vm);
                vm
            }
            None => self.new_vm(spec, image.id, image.layers, memory_mib, vcpus, false)?,
        };
        let id = vm.id.clone();
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

    /// Ids of the VMs (not removed) created from image `image_id`.
    pub fn image_users(&self, image_id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .vms
            .read()
            .values()
            .filter(|vm| vm.with(|i| i.rec.image_id.as_deref() == Some(image_id)))
            .map(|vm| vm.id.clone())
            .collect();
        v.sort();
        v
    }

    /// Deletes image layers that neither an image nor a VM references.
    pub fn gc_images(&self) {
        self.images.gc(&|| {
            self.vms
                .read()
                .values()
                .flat_map(|vm| vm.with(|i| i.rec.layers.clone()))
                .collect()
        });
        // Pre-staged layers that were just deleted: let their memory go.
        // (Pool members and running VMs keep their layer files open, so a
        // deletion never pulls a disk from under a guest.)
        self.warm.lock().retain(|path, _| path.exists());
    }

    /// VMs starting or running (or created from a warm-pool member, whose
    /// guest runs already), and the guest memory in MiB they and the warm
    /// pools' members hold.
    pub fn live_usage(&self) -> (usize, u64) {
        let (n, m) = self
            .vms
            .read()
            .values()
            .filter(|v| {
                matches!(v.state(), VmState::Starting | VmState::Running)
                    || v.with(|i| i.prebooted.is_some())
            })
            .fold((0, 0), |(n, m), v| {
                (n + 1, m + u64::from(v.with(|i| i.rec.memory_mib)))
            });
        (n, m + self.pools.memory_held_mib())
    }

    /// The limits a start is admitted against and what counts against
    /// them now ([`Agent::live_usage`]), with the pools' refill bound.
    pub fn capacity(&self) -> vmlet_protocol::api::CapacityInfo {
        let (vms, memory_mib) = self.live_usage();
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        vmlet_protocol::api::CapacityInfo {
            vms: clamp(vms),
            max_vms: clamp(self.config.max_vms),
            memory_mib,
            max_memory_mib: self.config.max_total_memory_mib,
            pool_refill: clamp(self.config.pool_refill.max(1)),
            pool_filling: clamp(self.pools.filling()),
        }
    }

    /// The lowest vsock CID no guest of this host uses.
    /// Templates whose disks back a clone that is starting or running.
    pub fn template_refs(&self) -> std::collections::HashSet<String> {
        self.vms
            .read()
            .values()
            .filter(|v| matches!(v.state(), VmState::Starting | VmState::Running))
            .filter_map(|v| v.with(|i| i.rec.template.clone()))
            .collect()
    }

    /// Gives back a CID taken by [`Agent::alloc_cid`] for something that is
    /// not a VM (a template being built).
    pub(crate) fn free_cid(&self, cid: u32) {
        self.cids.lock().remove(&cid);
    }

    pub(crate) fn alloc_cid(&self) -> u32 {
        let mut cids = self.cids.lock();
        let cid = (3u32..).find(|c| !cids.contains(c)).expect("a free CID");
        cids.insert(cid);
        cid
    }

    /// Creates a warm-pool member of `image` (not in the registry: it
    /// becomes a VM only when a create takes it).
    ///
    /// With `warmup`, also returns the process the member runs once before
    /// it is ready: that command as given (the image's entrypoint is not
    /// put before it), with the image's environment, user and working
    /// directory.
    pub fn create_pool_member(
        &self,
        image: &str,
        warmup: Option<&[String]>,
    ) -> Result<(Arc<Vm>, Option<ProcessSpec>), ApiError> {
        let _gc = self.images.gc_guard();
        let img = self.images.resolve(image)?;
        let mut spec = CreateSpec {
            image: image.to_string(),
            ..Default::default()
        };
        crate::image::apply_config(&mut spec, &img.config)?;
        let warmup = match warmup {
            Some(argv) => {
                let mut w = CreateSpec {
                    image: image.to_string(),
                    argv: argv.to_vec(),
                    entrypoint: Some(Vec::new()),
                    ..Default::default()
                };
                crate::image::apply_config(&mut w, &img.config)?;
                Some(crate::start::warmup_spec(w))
            }
            None => None,
        };
        let (memory, vcpus) = (self.config.memory_mib, self.config.vcpus);
        let vm = self.new_vm(spec, img.id, img.layers, memory, vcpus, true)?;
        Ok((vm, warmup))
    }

    /// Forgets a pool member that was discarded or failed: its directory
    /// and CID.
    pub fn drop_pool_member(&self, vm: &Vm) {
        if let Some(w) = vm.with(|i| i.log_writer.take()) {
            w.seal();
        }
        let _ = fs::remove_dir_all(&vm.dir);
        self.cids.lock().remove(&vm.with(|i| i.rec.cid));
    }

    /// Makes a VM's directory, log and record.
    fn new_vm(
        &self,
        spec: CreateSpec,
        image_id: String,
        layers: Vec<String>,
        memory_mib: u32,
        vcpus: u32,
        pooled: bool,
    ) -> Result<Arc<Vm>, ApiError> {
        let id = ids::new_id();
        let dir = self.config.vms_dir().join(&id);
        // Searchable, not listable, by others: the VMM's user reaches its
        // writable disk, console and vsock directory here, and nothing else
        // (the record and the log are 0600).
        std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o711)
            .create(&dir)
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!("cannot create the VM directory: {e}"),
                )
            })?;
        let (log, writer) = Log::open(&dir.join("log"), self.config.log_limits).map_err(|e| {
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
            cid: self.alloc_cid(),
            memory_mib,
            vcpus,
            vmm_pid: None,
            helper_pids: Vec::new(),
            pooled,
            from_pool: false,
            from_template: false,
            template: None,
            image_id: Some(image_id),
            layers,
            confinement: None,
            layout: VmRecord::LAYOUT,
            root: None,
        };
        let vm = Vm::new(rec, dir, log, Some(writer));
        self.persist_unsynced(&vm);
        Ok(vm)
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
        // One created from a warm-pool member still holds that guest.
        let prebooted = vm.with(|i| i.prebooted.take());
        if let Some(p) = prebooted {
            p.discard().await;
        }
        if let Some(h) = vm.handle() {
            h.cleanup().await;
        }
        {
            let _no_more_persists = vm.stop_persisting();
            if let Err(e) = fs::remove_dir_all(&vm.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::error!(vm = %vm.id, error = %e, "cannot delete the VM directory");
                }
            }
        }
        self.cids.lock().remove(&vm.with(|i| i.rec.cid));
        vm.set_state(VmState::Removed);
        self.emit(vm);
        tracing::info!(vm = %vm.id, "removed");
        // Its layers may have been kept only for it (a force-removed image).
        self.gc_images();
        Ok(())
    }
}

/// SIGKILLs `pid` if its command line names the VM directory `dir` (so a
/// recycled pid of an unrelated process is never hit).
pub(crate) fn kill_if_ours(pid: u32, dir: &std::path::Path) {
    let mentions = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
        .unwrap_or(false);
    if mentions {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Ends a VM found in the state directory that cannot go on: kills its
/// VMM and helpers (only if their command lines name `dir`), removes its
/// sockets, and marks it exited with `reason`.
fn end_loaded(rec: &mut VmRecord, dir: &std::path::Path, reason: String) {
    for pid in rec.vmm_pid.iter().chain(&rec.helper_pids) {
        kill_if_ours(*pid, dir);
    }
    remove_sockets(dir);
    rec.state = VmState::Exited;
    rec.exit = Some(ExitInfo {
        code: 255,
        signal: None,
        reason,
        at_ms: now_ms(),
    });
    rec.vmm_pid = None;
    rec.helper_pids.clear();
}

/// What `strings` (a command, environment, working directory, user) take
/// in a guest's spec, bincode's length prefixes included, for
/// [`MAX_SPEC_BYTES`].
pub(crate) fn spec_bytes<'a>(strings: impl IntoIterator<Item = &'a String>) -> usize {
    strings.into_iter().map(|s| s.len() + 8).sum()
}

/// SIGKILLs every process whose command line names something in `dir`
/// (a VM's VMM and vsock backend name their VM's directory), whether or
/// not its pid was ever recorded.
pub(crate) fn kill_processes_naming(dir: &std::path::Path) {
    let needle = format!("{}/", dir.display());
    let me = std::process::id();
    for ent in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let names_it = fs::read(ent.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle));
        if pid != me && names_it {
            kill_if_ours(pid, dir);
        }
    }
}

/// Ends a warm-pool member from its record: kills its processes (if they
/// are still its own) and removes its directory.
fn end_pool_member(rec: &VmRecord, dir: &std::path::Path) {
    for pid in rec.vmm_pid.iter().chain(&rec.helper_pids) {
        kill_if_ours(*pid, dir);
    }
    let _ = fs::remove_dir_all(dir);
}

impl Agent {
    /// Ends every warm-pool member still on disk, ready or half-booted (the
    /// agent is stopping; members are not containers and no later agent
    /// adopts them).
    pub fn end_pool_members(&self) {
        for ent in fs::read_dir(self.config.vms_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let rec: Option<VmRecord> = fs::read(ent.path().join("vm.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(rec) = rec.filter(|r| r.pooled) {
                end_pool_member(&rec, &ent.path());
            }
        }
    }
}

/// Removes the sockets a VM's processes left in its directory and its
/// vsock directory.
fn remove_sockets(dir: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    for d in [dir.to_path_buf(), dir.join("vsock")] {
        for ent in fs::read_dir(d).into_iter().flatten().flatten() {
            if ent.file_type().map(|t| t.is_socket()).unwrap_or(false) {
                let _ = fs::remove_file(ent.path());
            }
        }
    }
}
