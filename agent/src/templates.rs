//! Guest templates: a start that restores a snapshot instead of booting.
//!
//! For each image named with `--template IMAGE`, the agent boots one guest
//! (the image's layer disks and a blank writable disk attached, as a start
//! would), waits for its tether's hello, and snapshots it: the guest's RAM
//! lives in a memfd of the agent's (QEMU maps it shared), so the snapshot
//! is only the devices' state, tens of KiB (QEMU's `x-ignore-shared`). The
//! template VM is then ended and its memory sealed. A start of that image
//! (at the template's memory and vCPUs) restores a clone: a new QEMU with
//! the same devices in the same order, the memfd mapped privately (copy on
//! write: clones share the template's pages until they write them) and the
//! saved state loaded. No guest kernel boots; the clone's tether, which was
//! waiting for its host when the snapshot was taken, says hello as soon as
//! the agent connects.
//!
//! What every clone of one snapshot would share, and must not:
//! - its connection: each clone has its own serial socket in its own VM
//!   directory; no state of the template's connection survives (the port
//!   reports the host gone, then the new host);
//! - its random state: the agent's first message ([`HostMessage::Renew`])
//!   carries 32 fresh bytes from the host's generator, which the tether
//!   mixes into the kernel's pool before forcing a reseed;
//! - its wall clock, frozen at the snapshot: `Renew` sets it;
//! - its vsock CID: clones have no vsock device (QEMU 7.2 cannot snapshot
//!   `vhost-user-vsock-device`, so templates link through a virtio-serial
//!   port instead) and each still gets a CID of its own in its record.
//!
//! A template is rebuilt when its image changes (re-tagged, removed: the
//! old snapshot is dropped, never restored) and after a restore fails (the
//! failing start boots cold instead). Snapshots are kept in memory only: a
//! restarted agent builds them again.
//!
//! [`HostMessage::Renew`]: vmlet_protocol::guest::HostMessage::Renew

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use vmlet_protocol::api::TemplateInfo;
use vmlet_protocol::{ApiError, ErrorCode};
use vmm_shim::{Disk, Link, Memory, MemoryFile, StagedFile, VmConfig, VmHandle};

use vmlet_protocol::aio::write_frame;
use vmlet_protocol::guest::{DiskSpec, GuestMessage, HostMessage};

use crate::agent::Agent;
use crate::start::{await_hello, GuestLink};

/// A snapshot ready to restore.
#[derive(Debug)]
pub struct Ready {
    /// The image id it was built from.
    pub image_id: String,
    /// Its directory's name under the templates directory.
    name: String,
    /// The template guest's writable disk, frozen: every clone's writable
    /// disk is an overlay of it.
    rw: PathBuf,
    memory: MemoryFile,
    state: StagedFile,
    /// Which build of its slot this is.
    generation: u64,
}

impl Ready {
    /// Its directory's name (recorded by clones, whose disks need it).
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// The frozen writable disk clones' writable disks are overlays of.
    pub fn writable_disk(&self) -> &Path {
        &self.rw
    }

    /// Turns a VM's config (its own id, directory, disks) into a restore
    /// of this snapshot.
    pub fn restore_into(&self, cfg: &mut VmConfig) {
        cfg.link = Link::Serial;
        cfg.memory = Memory::File {
            file: self.memory.clone(),
            shared: false,
        };
        cfg.incoming = Some(self.state.clone());
    }
}

#[derive(Debug, Default)]
struct SlotState {
    ready: Option<Arc<Ready>>,
    status: &'static str,
    build_ms: u64,
    last_error: Option<String>,
    /// Set when a restore failed, so the loop rebuilds.
    broken: bool,
}

#[derive(Debug)]
struct Slot {
    image: String,
    state: Mutex<SlotState>,
    builds: AtomicU64,
    clones: AtomicU64,
    failures: AtomicU64,
    wake: Notify,
}

/// Every template of the agent.
#[derive(Debug)]
pub struct Templates {
    slots: Vec<Arc<Slot>>,
    /// Directories of templates being built, which GC must not take.
    building: Mutex<HashSet<String>>,
    memory_mib: u32,
    vcpus: u32,
    /// The agent is stopping: no template VM may outlive it.
    closed: AtomicBool,
}

impl Templates {
    /// Whether the agent is stopping ([`shut_down`]).
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Templates for `images`, at the agent's default memory and vCPUs.
    pub fn new(images: &[String], memory_mib: u32, vcpus: u32) -> Self {
        let mut seen = std::collections::HashSet::new();
        Templates {
            slots: images
                .iter()
                .filter(|i| seen.insert(i.as_str()))
                .map(|image| {
                    Arc::new(Slot {
                        image: image.clone(),
                        state: Mutex::new(SlotState {
                            status: "waiting",
                            ..SlotState::default()
                        }),
                        builds: AtomicU64::new(0),
                        clones: AtomicU64::new(0),
                        failures: AtomicU64::new(0),
                        wake: Notify::new(),
                    })
                })
                .collect(),
            building: Mutex::new(HashSet::new()),
            memory_mib,
            vcpus,
            closed: Default::default(),
        }
    }

    /// The snapshot to restore for a VM of `image_id` with this memory and
    /// vCPU count, if one is ready.
    pub fn take(&self, image_id: &str, memory_mib: u32, vcpus: u32) -> Option<Arc<Ready>> {
        if memory_mib != self.memory_mib || vcpus != self.vcpus {
            return None;
        }
        for s in &self.slots {
            let st = s.state.lock();
            if let Some(r) = st.ready.as_ref().filter(|r| r.image_id == image_id) {
                if st.broken {
                    continue;
                }
                s.clones.fetch_add(1, Ordering::Relaxed);
                return Some(r.clone());
            }
        }
        None
    }

    /// A restore of `t` failed: it is never restored again; its slot
    /// builds a new one.
    pub fn failed(&self, t: &Ready, why: &str) {
        for s in &self.slots {
            let mut st = s.state.lock();
            if st
                .ready
                .as_ref()
                .is_some_and(|r| r.generation == t.generation && r.image_id == t.image_id)
            {
                st.broken = true;
                st.last_error = Some(format!("a restore failed: {why}"));
                s.failures.fetch_add(1, Ordering::Relaxed);
                s.wake.notify_one();
            }
        }
    }

    /// What `vmlet template` shows.
    pub fn info(&self) -> Vec<TemplateInfo> {
        self.slots
            .iter()
            .map(|s| {
                let st = s.state.lock();
                TemplateInfo {
                    image: s.image.clone(),
                    image_id: st.ready.as_ref().map(|r| r.image_id.clone()),
                    memory_mib: self.memory_mib,
                    vcpus: self.vcpus,
                    status: st.status.to_string(),
                    memory_bytes: st.ready.as_ref().map_or(0, |r| r.memory.resident_bytes()),
                    state_bytes: st.ready.as_ref().map_or(0, |r| r.state.len()),
                    build_ms: st.build_ms,
                    builds: s.builds.load(Ordering::Relaxed),
                    clones: s.clones.load(Ordering::Relaxed),
                    failures: s.failures.load(Ordering::Relaxed),
                    last_error: st.last_error.clone(),
                }
            })
            .collect()
    }
}

/// Fresh random bytes for a clone's [`Renew`](vmlet_protocol::guest::HostMessage::Renew),
/// from the host's generator.
pub fn fresh_seed() -> std::io::Result<Vec<u8>> {
    let mut seed = vec![0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
    Ok(seed)
}

/// The host's wall clock, ns since the epoch.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Starts one maintenance loop per template, after ending template VMs a
/// previous agent left half-built.
pub fn start(agent: &Arc<Agent>) {
    end_template_vms(agent);
    gc(agent);
    for s in &agent.templates.slots {
        tokio::spawn(maintain(agent.clone(), s.clone()));
    }
}

/// Kills every template VM still running: a previous agent's half-built
/// ones at startup, this agent's own at shutdown. A build's VMM is any
/// process whose command line names a template's directory (its console,
/// sockets and disk are there), whether or not its start had returned and
/// its pid was written to `vmm.pid`.
fn end_template_vms(agent: &Agent) {
    let dir = agent.config.templates_dir();
    crate::agent::kill_processes_naming(&dir);
    for ent in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(ent.path().join("vmm.pid"));
    }
}

/// A build's error once the agent is stopping.
fn stopping() -> ApiError {
    ApiError::new(ErrorCode::Unavailable, "the agent is stopping")
}

/// The agent is stopping: ends the template builds in progress. A ready
/// template is only files; a build's guest would otherwise outlive the
/// agent (its task is dropped with the runtime, its QEMU not). No build
/// starts a VMM once this has begun; one that was starting is caught by a
/// second look.
pub async fn shut_down(agent: &Agent) {
    agent.templates.closed.store(true, Ordering::SeqCst);
    end_template_vms(agent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    end_template_vms(agent);
}

/// Removes template directories nothing needs: not a ready template's, not
/// being built, and not backing the disk of a clone that is starting or
/// running (an exited clone's disk is never opened again).
fn gc(agent: &Agent) {
    let mut keep = agent.template_refs();
    keep.extend(agent.templates.building.lock().iter().cloned());
    for s in &agent.templates.slots {
        if let Some(r) = &s.state.lock().ready {
            keep.insert(r.name.clone());
        }
    }
    for ent in std::fs::read_dir(agent.config.templates_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = ent.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            tracing::info!(template = %name, "removing a template directory nothing uses");
            let _ = std::fs::remove_dir_all(ent.path());
        }
    }
}

async fn maintain(agent: Arc<Agent>, slot: Arc<Slot>) {
    let mut backoff = Duration::from_secs(1);
    let mut generation = 0;
    loop {
        gc(&agent);
        let current = agent.images.resolve(&slot.image).ok().map(|i| i.id);
        let rebuild = {
            let mut st = slot.state.lock();
            let stale = st
                .ready
                .as_ref()
                .is_some_and(|r| Some(&r.image_id) != current.as_ref());
            if stale || st.broken {
                if stale {
                    tracing::info!(image = %slot.image, "dropping the template of an image that changed");
                }
                st.ready = None;
                st.broken = false;
            }
            if current.is_none() {
                st.status = "waiting";
            }
            st.ready.is_none() && current.is_some()
        };
        if !rebuild {
            let _ = tokio::time::timeout(Duration::from_secs(2), slot.wake.notified()).await;
            continue;
        }
        slot.state.lock().status = "building";
        generation += 1;
        let t0 = Instant::now();
        match build(&agent, &slot.image, generation).await {
            Ok(ready) => {
                let ms = t0.elapsed().as_millis() as u64;
                tracing::info!(
                    image = %slot.image,
                    build_ms = ms,
                    state_bytes = ready.state.len(),
                    memory_bytes = ready.memory.resident_bytes(),
                    "template ready"
                );
                slot.builds.fetch_add(1, Ordering::Relaxed);
                let mut st = slot.state.lock();
                st.ready = Some(Arc::new(ready));
                st.status = "ready";
                st.build_ms = ms;
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                tracing::warn!(image = %slot.image, error = %e, "cannot build a template");
                slot.failures.fetch_add(1, Ordering::Relaxed);
                {
                    let mut st = slot.state.lock();
                    st.status = "failed";
                    st.last_error = Some(e.message.clone());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// How long the template's tether gets to notice its host left before the
/// snapshot, so clones wake already waiting for their own host.
const SETTLE: Duration = Duration::from_millis(300);

/// Test builds of the restore's failure path: with
/// `VMLET_TEST_CORRUPT_TEMPLATE=N` in its environment, the agent damages the
/// first N snapshots it takes (inert unless set; never set it on a
/// production host). A restore of a damaged snapshot fails in QEMU.
fn corrupt_point(state: &mut [u8]) {
    static LEFT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    let left = LEFT.get_or_init(|| {
        AtomicU64::new(
            std::env::var("VMLET_TEST_CORRUPT_TEMPLATE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    });
    if left
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        tracing::warn!("VMLET_TEST_CORRUPT_TEMPLATE: damaging this snapshot");
        // Past QEMU's file header: the device sections.
        for b in state.iter_mut().skip(64).step_by(97) {
            *b ^= 0x5a;
        }
    }
}

/// Boots a template guest of `image` and snapshots it.
async fn build(agent: &Arc<Agent>, image: &str, generation: u64) -> Result<Ready, ApiError> {
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        ApiError::new(ErrorCode::Internal, format!("{what}: {e}"))
    };
    let img = agent.images.resolve(image)?;
    let id = crate::ids::new_id();
    let dir = agent.config.templates_dir().join(&id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| internal("cannot create the template directory", &e))?;
    agent.templates.building.lock().insert(id.clone());
    let cid = agent.alloc_cid();
    let r = async {
        let mut disks = Vec::with_capacity(img.layers.len() + 1);
        let mut layers = Vec::with_capacity(img.layers.len());
        for (i, diff_id) in img.layers.iter().enumerate() {
            let d = agent.images.layer_disk(diff_id)?;
            disks.push(Disk {
                path: d.path,
                serial: format!("l{i}"),
                read_only: true,
            });
            layers.push(DiskSpec {
                serial: format!("l{i}"),
                fstype: d.fstype,
            });
        }
        let (agent2, dir2) = (agent.clone(), dir.clone());
        let rw = tokio::task::spawn_blocking(move || agent2.images.create_writable(&dir2))
            .await
            .map_err(|e| internal("writable disk task", &e))??;
        disks.push(Disk {
            path: rw.clone(),
            serial: "rw".into(),
            read_only: false,
        });
        let memory_mib = agent.config.memory_mib;
        let memory = MemoryFile::create(u64::from(memory_mib) << 20, "template-memory")
            .map_err(|e| internal("cannot create the template's memory", &e))?;
        let mut cfg =
            agent
                .template
                .clone_for(&id, &dir, cid, memory_mib, agent.config.vcpus, disks);
        cfg.link = Link::Serial;
        cfg.memory = Memory::File {
            file: memory.clone(),
            shared: true,
        };
        if agent.templates.is_closed() {
            return Err(stopping());
        }
        let handle: Arc<dyn VmHandle> = agent
            .vmm
            .start(&cfg)
            .await
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "cannot start the template VM: {}",
                        crate::start::error_chain(&e)
                    ),
                )
            })?
            .into();
        if let Some(pid) = handle.pid() {
            let _ = std::fs::write(dir.join("vmm.pid"), pid.to_string());
        }
        // A shutdown that began while this VMM started: its scans may
        // have run before the VMM existed.
        if agent.templates.is_closed() {
            let _ = handle.kill().await;
            handle.cleanup().await;
            return Err(stopping());
        }
        let snap = async {
            let link = GuestLink::open(&dir, &cfg.vsock_uds, true)?;
            let (mut frames, mut wr, _boot) =
                await_hello(&handle, &link, agent.config.boot_timeout).await?;
            // The root filesystem is mounted in the template, so clones
            // only run their process: their writable disks are overlays of
            // this one, frozen once the template is gone.
            let prepare = HostMessage::Prepare {
                layers,
                writable: Some(DiskSpec {
                    serial: "rw".into(),
                    fstype: "ext4".into(),
                }),
                // A clone is a new QEMU: translations do not carry over.
                warmup: None,
            };
            write_frame(&mut wr, &prepare)
                .await
                .map_err(|e| internal("cannot send the template its disks", &e))?;
            match tokio::time::timeout(PREPARE_TIMEOUT, frames.recv()).await {
                Ok(Some(Ok(GuestMessage::Prepared))) => {}
                other => {
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "the template guest did not prepare its root filesystem: {other:?}"
                        ),
                    ))
                }
            }
            // Hang up: the tether goes back to waiting for a host, which
            // is where every clone wakes.
            drop((frames, wr));
            tokio::time::sleep(SETTLE).await;
            handle.snapshot().await.map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "cannot snapshot the template VM: {}",
                        crate::start::error_chain(&e)
                    ),
                )
            })
        }
        .await;
        // "quit": QEMU has flushed the disks when the migration completed;
        // quitting (not killing) makes sure of it.
        if handle.stop(Duration::from_secs(10)).await.is_err() {
            let _ = handle.kill().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), handle.wait()).await;
        handle.cleanup().await;
        let _ = std::fs::remove_file(dir.join("vmm.pid"));
        let mut state = snap?;
        corrupt_point(&mut state);
        // QEMU is gone, so no shared writable mapping is left: seal it, so
        // nothing can change the memory under a clone.
        memory
            .seal()
            .map_err(|e| internal("cannot seal the template's memory", &e))?;
        let state = StagedFile::from_bytes(&state, "template-state")
            .map_err(|e| internal("cannot stage the template's state", &e))?;
        // Frozen: a clone's disk reads through to it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&rw, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| internal("cannot freeze the template's disk", &e))?;
        let (agent2, rw2) = (agent.clone(), rw.clone());
        tokio::task::spawn_blocking(move || agent2.images.prepare_writable_over(&rw2))
            .await
            .map_err(|e| internal("writable disk task", &e))??;
        Ok(Ready {
            image_id: img.id.clone(),
            name: id.clone(),
            rw,
            memory,
            state,
            generation,
        })
    }
    .await;
    agent.free_cid(cid);
    agent.templates.building.lock().remove(&id);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

/// How long the template guest may take to mount its root filesystem.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);
