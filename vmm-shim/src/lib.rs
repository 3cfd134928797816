//! The VMM abstraction vmletd drives, and its QEMU microvm backend.
//!
//! The trait is shaped by its one consumer, the agent: it hands a fully cloned [`VmConfig`]
//! to [`Vmm::start`] and gets back a [`VmHandle`] it can wait on from several tasks, stop,
//! kill, pause and clean up after. Nothing QEMU-specific appears here: Firecracker and Cloud
//! Hypervisor fit the same shape (their hybrid vsock is the convention [`VmConfig::vsock_uds`]
//! describes). What only some VMMs can do has a default body returning
//! [`Error::Unsupported`], and [`Vmm::capabilities`] says which of those a backend has.
//!
//! VMM processes outlive the agent: they run in their own session, dropping a handle does
//! not kill them, and a handle's background task only reaps them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

pub mod accel;
pub mod confine;
mod process;
pub mod qemu;
pub mod qmp;
pub mod staged;
#[cfg(test)]
mod testutil;
pub mod vsock_backend;

pub use accel::{detect_accel, Accel, ParseAccelError};
pub use confine::{
    CgroupInfo, CgroupMode, CgroupVersion, Cgroups, Confinement, ConfinementInfo, VmmUser,
};
pub use qemu::{Qemu, VmPaths};
pub use staged::{MemoryFile, StagedFile};

/// A block device given to the guest as a virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image on the host: raw, or qcow2 when its name ends in `.qcow2`
    /// (see [`Disk::format`]).
    pub path: PathBuf,
    /// The serial the guest sees (`/sys/block/vdX/serial`): how the tether tells disks apart.
    /// At most 20 bytes of `[A-Za-z0-9._-]` (virtio-blk's limit).
    pub serial: String,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

impl Disk {
    /// The image format, from the file name: `qcow2` for `*.qcow2` (a
    /// per-VM copy-on-write overlay), else `raw`. Never probed from the
    /// content: a guest that wrote a qcow2 header into a raw disk must not
    /// make the host open it as qcow2.
    pub fn format(&self) -> &'static str {
        if self.path.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        }
    }
}

/// Everything one start needs. The agent clones it from a compiled template, so it holds
/// no handles, only values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The VM's id, for logs and the process name.
    pub id: String,
    /// The per-VM runtime directory the agent created; the shim puts `qmp.sock`,
    /// `vhost-vsock.sock`, `console.log` and `vmm.log` there.
    pub dir: PathBuf,
    /// The guest kernel: an uncompressed PVH ELF `vmlinux`.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel and initrd staged in sealed memory: when set, the VMM
    /// loads them from these (inherited descriptors) and never reads
    /// `kernel` or `initrd` from disk.
    pub staged: Option<(StagedFile, StagedFile)>,
    /// Extra kernel arguments, appended to the backend's base arguments.
    pub cmdline: String,
    /// Whether the guest kernel finds its devices through ACPI. When it does not (a kernel
    /// built without ACPI), the machine has none and the backend lists the virtio-mmio devices
    /// on the kernel command line instead (`virtio_mmio.device=`), which the kernel must accept
    /// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`). A property of the kernel, so it travels with it.
    pub acpi: bool,
    /// The guest kernel's tick rate (`CONFIG_HZ`) when it accepts `lapic_timer_period=` (vmlet's
    /// tailored kernel, `CONFIG_VMLET_LAPIC_TIMER_PERIOD`), else `None`. Under TCG the backend
    /// then tells it the emulated APIC timer's rate, so it does not spend ~0.2 s of every boot
    /// measuring it. A property of the kernel, like [`VmConfig::acpi`].
    pub apic_timer_hz: Option<u32>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// The guest's vsock context id (3 or more).
    pub cid: u32,
    /// Disks, in the order the guest enumerates them.
    pub disks: Vec<Disk>,
    /// The accelerator.
    pub accel: Accel,
    /// The hybrid-vsock host socket: the host reaches guest port P by connecting here and
    /// writing `CONNECT P\n`; a guest connecting to CID 2 port P reaches a listener the agent
    /// bound at `"<vsock_uds>_P"`. When the VMM runs as another user its directory must be
    /// its own below [`VmConfig::dir`] (the shim gives it to that user, and the agent's
    /// listeners in it), since the backend creates its sockets there.
    pub vsock_uds: PathBuf,
    /// How the guest's tether reaches the agent.
    pub link: Link,
    /// Where the guest's memory lives.
    pub memory: Memory,
    /// Restore the VM from this saved state (see [`VmHandle::snapshot`])
    /// instead of booting it: the guest continues where its template
    /// stopped. Needs the template's devices, in its order, and its memory
    /// as [`Memory::File`].
    pub incoming: Option<StagedFile>,
}

/// The guest's channel to the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Link {
    /// Hybrid vsock ([`VmConfig::vsock_uds`]), served by a vsock backend.
    #[default]
    Vsock,
    /// A virtio-serial port named `vmlet`, whose host side is the Unix
    /// socket [`VmPaths::serial`] (the VMM listens; the agent connects).
    /// What template VMs use: QEMU 7.2 cannot snapshot a vhost-user vsock
    /// device. The guest learns of it from `vmlet.link=serial` on its
    /// kernel command line.
    Serial,
}

/// Where guest memory lives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Memory {
    /// A memfd of the VMM's own, shared (vhost-user backends map it).
    #[default]
    Private,
    /// A [`MemoryFile`] of the agent's: `shared` for a template (its RAM
    /// is the file), private (copy-on-write) for a clone.
    File {
        /// The memory.
        file: MemoryFile,
        /// Map it shared (writes reach the file) or private.
        shared: bool,
    },
}

/// How the VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// The exit status, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The kernel killed it for reaching its cgroup's memory limit.
    pub oom_killed: bool,
    /// A sentence for people.
    pub description: String,
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

/// What a backend can do beyond start, wait, stop and kill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// [`VmHandle::pause`] and [`VmHandle::resume`] work.
    pub pause: bool,
    /// [`VmHandle::snapshot`] works.
    pub snapshot: bool,
    /// The guest's vsock is reached through [`VmConfig::vsock_uds`] (hybrid vsock), not
    /// `AF_VSOCK`.
    pub hybrid_vsock: bool,
}

/// Errors of the VMM abstraction.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend cannot do this.
    #[error("this VMM does not support the operation")]
    Unsupported,
    /// The configuration cannot be started as it is.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// A program the backend drives is not installed.
    #[error("cannot find {name} (looked in PATH, ~/.cargo/bin and /usr/local/cargo/bin)")]
    BinaryNotFound {
        /// The program's name.
        name: &'static str,
    },
    /// Starting failed part-way; whatever had been spawned was killed.
    #[error("starting VM {id} failed while {stage}{}", log_suffix(.log_tail))]
    Start {
        /// The VM's id.
        id: String,
        /// What the start was doing.
        stage: &'static str,
        /// The last lines of `vmm.log`, where QEMU and the vsock backend write their errors.
        log_tail: String,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
    /// The VMM process has already exited.
    #[error("the VMM process has exited ({0})")]
    Exited(VmExit),
    /// The VMM did not exit in time even after SIGKILL.
    #[error("the VMM process did not exit within {0:?}")]
    Timeout(Duration),
    /// Talking to QEMU's monitor failed.
    #[error("the QMP conversation failed")]
    Qmp(#[from] qmp::Error),
    /// The vsock backend failed.
    #[error("the vsock backend failed")]
    VsockBackend(#[from] vsock_backend::Error),
    /// Confining the VMM failed.
    #[error("confining the VMM failed")]
    Confine(#[from] confine::Error),
    /// A file or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn log_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; vmm.log ends with:\n{}", tail.trim_end())
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// A virtual machine monitor: starts VMs.
#[async_trait]
pub trait Vmm: Send + Sync + fmt::Debug {
    /// A short name, such as `qemu`.
    fn name(&self) -> &str;
    /// The VMM's version, for `vmlet info`.
    fn version(&self) -> String;
    /// What the backend can do beyond the lifecycle every backend has.
    fn capabilities(&self) -> Capabilities;
    /// Starts a VM and returns once the VMM answers on its control channel (for QEMU, QMP).
    /// The guest is still booting then. On error nothing that was spawned is left running.
    ///
    /// # Cancel safety
    /// Cancel safe: a start dropped part-way SIGKILLs what it had spawned (reaped in the
    /// background) and removes its sockets.
    async fn start(&self, cfg: &VmConfig) -> Result<Box<dyn VmHandle>, Error>;

    /// Takes over a VM an earlier agent started with the same `cfg` and left running (VMs
    /// outlive the agent): `vmm_pid` and `helper_pids` are what that agent's handle reported.
    /// Fails if the processes are gone or are not this VM's.
    async fn adopt(
        &self,
        _cfg: &VmConfig,
        _vmm_pid: u32,
        _helper_pids: &[u32],
    ) -> Result<Box<dyn VmHandle>, Error> {
        Err(Error::Unsupported)
    }

    /// Releases what the backend still holds for VMs that are not in `live` (such as the
    /// cgroups of VMs whose agent crashed), killing any process left there. The agent calls
    /// it once at startup, after adopting its running VMs.
    async fn reclaim(&self, _live: &std::collections::HashSet<String>) {}
}

/// A started VM. Dropping the handle leaves the VM running.
#[async_trait]
pub trait VmHandle: Send + Sync + fmt::Debug {
    /// The VMM process's pid.
    fn pid(&self) -> Option<u32>;

    /// Pids of helper processes the backend runs for this VM (for QEMU, its
    /// vhost-device-vsock), so the agent can record everything the VM owns.
    fn helper_pids(&self) -> Vec<u32> {
        Vec::new()
    }

    /// What confines the VM's processes (user, cgroup and limits), if the backend says.
    fn confinement(&self) -> Option<ConfinementInfo> {
        None
    }

    /// Resolves once the VMM process has exited; any number of tasks may wait at once, and
    /// later calls return the same result at once.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn wait(&self) -> VmExit;

    /// Asks the VMM to quit (the guest gets no notice: a graceful guest shutdown goes through
    /// the guest agent first), then SIGKILLs it if it has not exited within `timeout`.
    /// Returns once it has exited. Ok if it had already exited.
    async fn stop(&self, timeout: Duration) -> Result<(), Error>;

    /// SIGKILLs the VMM process. Ok if it had already exited. Does not wait for the exit.
    async fn kill(&self) -> Result<(), Error>;

    /// The VMM's view of the guest, such as `running` or `paused` (QMP `query-status`).
    async fn status(&self) -> Result<String, Error>;

    /// Stops the guest's vCPUs.
    async fn pause(&self) -> Result<(), Error> {
        Err(Error::Unsupported)
    }

    /// Resumes paused vCPUs.
    async fn resume(&self) -> Result<(), Error> {
        Err(Error::Unsupported)
    }

    /// Saves the VM (which ends up paused) and returns its device state, from
    /// which [`VmConfig::incoming`] restores copies. Guest memory is not in
    /// it: it stays in the VM's [`Memory::File`], which must be shared. The
    /// VM stays paused; stop it afterwards.
    async fn snapshot(&self) -> Result<Vec<u8>, Error> {
        Err(Error::Unsupported)
    }

    /// Releases what the backend owns for this VM once it has exited: kills helper processes
    /// and removes the sockets the backend created (logs stay). Kills the VMM too if it is
    /// still running, since without its sockets nothing could reach it. Idempotent.
    async fn cleanup(&self);
}
