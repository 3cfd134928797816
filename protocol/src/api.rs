//! The engine ⇄ agent API carried over vmletd's Unix socket.
//!
//! A connection starts with [`Request::Hello`], which negotiates the protocol
//! version; every other request carries a client-chosen [`RequestId`] that
//! the agent echoes in each reply, so one connection carries many requests
//! and streams at once. Single-shot requests get exactly one reply; streams
//! ([`Request::Attach`], [`Request::Logs`] with follow, [`Request::Events`])
//! get any number of replies and end with [`Response::StreamEnd`] or an
//! error, or when the client sends [`Request::Cancel`].
//!
//! The agent closes a connection that says no hello within 10 s, or that
//! stays idle (no request in flight, no stream, no frame from the client)
//! for its idle timeout, after an error with [`crate::ErrorCode::TimedOut`]
//! and request id 0.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The newest API version this crate speaks.
pub const API_VERSION: u32 = 3;
/// The oldest API version this crate still speaks.
pub const MIN_API_VERSION: u32 = 1;

/// Most stdin bytes a client keeps sent to one VM beyond the last
/// `StdinAck` it was told. Within it the agent takes every `Stdin` without
/// waiting, so stdin that one VM does not read never holds up other
/// requests on the same connection; beyond it the agent may stop reading
/// the connection until the guest takes some.
pub const STDIN_WINDOW: usize = 4 << 20;

/// Identifies one request on one connection.
pub type RequestId = u64;

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMessage {
    /// Chosen by the client, unique among its requests in flight.
    pub id: RequestId,
    /// The request.
    pub body: Request,
}

/// A frame sent by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerMessage {
    /// The request this answers.
    pub id: RequestId,
    /// The answer.
    pub body: Response,
}

/// What a client can ask of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Must be the first request; the agent answers with the version it
    /// picked from the range, or an error if none overlaps.
    Hello {
        /// Oldest version the client speaks.
        min_version: u32,
        /// Newest version the client speaks.
        max_version: u32,
        /// Free-form client name, for the agent's logs.
        client: String,
    },
    /// The agent's version and capabilities.
    Version,
    /// Creates a VM without starting it. Answer: [`Response::Created`].
    Create(CreateSpec),
    /// Starts a created VM; answers once the container process runs.
    Start {
        /// VM id or name.
        vm: String,
    },
    /// Create and start in one call. Answer: [`Response::Created`].
    Run(CreateSpec),
    /// Streams the VM's output; with `stdin`, the client may then send
    /// [`Request::Stdin`] referring to this request's id.
    Attach(AttachSpec),
    /// Bytes for the stdin of the VM attached by request `attach`. No
    /// reply; stdin for an attach that is not open on this connection (or
    /// whose stream has ended) gets a [`crate::ErrorCode::NotFound`] error
    /// on the id `attach`.
    Stdin {
        /// Id of the attach request.
        attach: RequestId,
        /// The bytes, at most [`crate::frame::MAX_CHUNK`].
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Closes the container's stdin (end of input).
    CloseStdin {
        /// Id of the attach request.
        attach: RequestId,
    },
    /// Waits until the VM has exited. Answer: [`Response::Exited`].
    Wait {
        /// VM id or name.
        vm: String,
    },
    /// Asks the container to stop (SIGTERM), then kills the VM once
    /// `timeout_ms` has passed.
    Stop {
        /// VM id or name.
        vm: String,
        /// Grace period before the VM is killed.
        timeout_ms: u64,
    },
    /// Sends a signal to the container process. The signal shares the
    /// guest's queue with stdin: when the container does not read stdin
    /// and the queue is full, the agent waits at most 10 s for room, then
    /// answers [`crate::ErrorCode::Unavailable`] ([`Request::Stop`] or a
    /// forced [`Request::Remove`] still end the VM).
    Kill {
        /// VM id or name.
        vm: String,
        /// Signal number (9 for SIGKILL).
        signal: i32,
    },
    /// Removes a VM and everything it owns. A running VM needs `force`.
    Remove {
        /// VM id or name.
        vm: String,
        /// Kill it first if it is still running.
        force: bool,
    },
    /// Lists VMs; exited ones only with `all`.
    List {
        /// Include VMs that are not running.
        all: bool,
    },
    /// Everything the agent knows of one VM.
    Inspect {
        /// VM id or name.
        vm: String,
    },
    /// The VM's stored output; with `follow`, a stream that goes on until
    /// the VM exits.
    Logs {
        /// VM id or name.
        vm: String,
        /// Keep streaming new output until the VM exits.
        follow: bool,
    },
    /// A stream of every VM's state changes.
    Events,
    /// Ends the stream started by request `request`: its reply is
    /// [`Response::StreamEnd`] on that id, or a
    /// [`crate::ErrorCode::NotFound`] error on that id when it names no
    /// stream on this connection (it ended already, or never was one).
    Cancel {
        /// Id of the stream request.
        request: RequestId,
    },
    // Image requests. Appended after the VM requests: bincode encodes a
    // variant by its index, so new variants only ever go at the end.
    /// Starts uploading an image archive (a `docker save` tar or a tarred
    /// OCI image layout). Answer: [`Response::Upload`] whose `upload` the
    /// data and end requests name. The upload belongs to this connection:
    /// it is discarded if the connection ends before
    /// [`Request::ImageImportEnd`].
    ImageImportBegin {
        /// Name to give the image (`repo:tag`); else the archive's own.
        name: Option<String>,
    },
    /// The next bytes of upload `upload`, at most
    /// [`crate::frame::MAX_CHUNK`]. Sent in order on the connection that
    /// began the upload. No reply: a chunk that fails (over the size cap,
    /// say) fails the upload, and [`Request::ImageImportEnd`]'s reply says
    /// why. A chunk for an upload this connection does not have gets a
    /// [`crate::ErrorCode::NotFound`] error on the id `upload`.
    ImageImportData {
        /// The upload's id.
        upload: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The upload is complete: import it. Answer: [`Response::Image`].
    ImageImportEnd {
        /// The upload's id.
        upload: u64,
    },
    /// Every stored image. Answer: [`Response::Images`].
    ImageList,
    /// One image. Answer: [`Response::Image`].
    ImageInspect {
        /// Name, `sha256:` id or unique id prefix.
        image: String,
    },
    /// Removes an image; refused while a VM uses it unless `force`.
    /// Layers nothing references any more are deleted. Answer:
    /// [`Response::Done`].
    ImageRemove {
        /// Name, `sha256:` id or unique id prefix.
        image: String,
        /// Remove it even though VMs use it (they keep their layers).
        force: bool,
    },
    /// Pulls an image from an OCI distribution registry. Answer:
    /// [`Response::Image`].
    ImagePull {
        /// `[http://|https://]host[:port]/repo[:tag|@sha256:…]`.
        reference: String,
    },
    /// The warm pools: their targets and what is ready. Answer:
    /// [`Response::Pools`].
    Pools,
    /// Loads an image's layer disks into memory and keeps them there, so
    /// the first start of the image waits on no disk. Answer:
    /// [`Response::Done`].
    Prestage {
        /// Image name or id.
        image: String,
    },
    /// The guest templates: snapshots of booted guests that starts restore
    /// instead of booting. Answer: [`Response::Templates`].
    Templates,
    /// API version 3 on: the host's limits and how much of them is in use,
    /// and how many pool members may boot at once. Answer:
    /// [`Response::Capacity`].
    Capacity,
}

/// What a container VM should run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSpec {
    /// Optional unique name (`[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}`).
    pub name: Option<String>,
    /// Image name or digest.
    pub image: String,
    /// The command and its arguments; empty means the image's default.
    pub argv: Vec<String>,
    /// `KEY=value` pairs added to the environment.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub workdir: Option<String>,
    /// Keep stdin open so attached clients can write to it.
    pub stdin_open: bool,
    /// Remove the VM as soon as it has exited and its output was delivered.
    pub auto_remove: bool,
    /// Guest memory in MiB; the agent's default if `None`.
    pub memory_mib: Option<u32>,
    /// Virtual CPUs; the agent's default if `None`.
    pub vcpus: Option<u32>,
    /// Replaces the image's `Entrypoint` (and drops its `Cmd`, as
    /// `docker run --entrypoint` does); `Some(vec![])` clears it.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// User to run as, overriding the image's `User`.
    #[serde(default)]
    pub user: Option<String>,
}

/// What an attach streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachSpec {
    /// VM id or name.
    pub vm: String,
    /// The client will send stdin.
    pub stdin: bool,
    /// Stream stdout.
    pub stdout: bool,
    /// Stream stderr.
    pub stderr: bool,
    /// Start from the first byte the VM ever wrote rather than from now.
    /// `vmlet run` attaches this way so nothing written before the attach
    /// reached the agent is missed.
    pub replay: bool,
}

/// The agent's answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello {
        /// The version picked.
        version: u32,
        /// The agent's name and build.
        agent: String,
    },
    /// Answer to [`Request::Version`].
    Version(VersionInfo),
    /// A VM was created.
    Created {
        /// Its id.
        id: String,
    },
    /// The request succeeded and has nothing to return.
    Done,
    /// The VM has exited.
    Exited(ExitInfo),
    /// Answer to [`Request::List`].
    List(Vec<VmSummary>),
    /// Answer to [`Request::Inspect`].
    Inspect(Box<VmInfo>),
    /// A chunk of container output.
    Output {
        /// Which stream it was written to.
        stream: Stream,
        /// When the agent received it, in nanoseconds since the epoch.
        timestamp_ns: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A state change, on an [`Request::Events`] stream.
    Event(Event),
    /// The stream is over; `exit` is set when it ended because the VM
    /// exited.
    StreamEnd {
        /// The VM's exit, if that ended the stream.
        exit: Option<ExitInfo>,
    },
    /// The request failed.
    Error(ApiError),
    /// Answer to [`Request::ImageImportBegin`].
    Upload {
        /// Names the upload in the data and end requests.
        upload: u64,
    },
    /// Answer to image import, inspect and pull.
    Image(Box<ImageInfo>),
    /// Answer to [`Request::ImageList`].
    Images(Vec<ImageInfo>),
    /// Answer to [`Request::Pools`].
    Pools(Vec<PoolInfo>),
    /// Answer to [`Request::Templates`].
    Templates(Vec<TemplateInfo>),
    /// On an attach stream with stdin: the guest has taken this many bytes
    /// of the container's stdin (counted from its start, across every
    /// client and agent restart), so they reach the process whatever
    /// happens to the agent. Sent once the count is known (after an agent
    /// restart, once the guest reconnected) and whenever it grows. A client
    /// that lost its connection resends, on its new attach, from here:
    /// stdin is then delivered exactly once.
    StdinAck {
        /// Stdin bytes the guest has taken.
        received: u64,
    },
    /// On an output stream ([`Request::Attach`], [`Request::Logs`]): the
    /// VM's log rotation deleted output before this stream read it (the
    /// reader fell more than the agent's log cap behind, or started from
    /// the first byte after some was deleted). The stream goes on with the
    /// oldest output still kept. Sent once per gap, in order with the
    /// [`Response::Output`] around it; the counts are of both streams,
    /// whichever the request asked for.
    Dropped {
        /// Bytes of stdout skipped.
        stdout: u64,
        /// Bytes of stderr skipped.
        stderr: u64,
    },
    /// API version 2 on: the first reply on an attach stream that does not
    /// replay the log: how many bytes of each stream the VM had written
    /// when the stream began (where its output starts). A client that
    /// loses its connection attaches again with `replay` and skips the log
    /// up to these counts plus what it printed since.
    Attached {
        /// Bytes of stdout before the stream's first.
        stdout: u64,
        /// Bytes of stderr before the stream's first.
        stderr: u64,
    },
    /// Answer to [`Request::Capacity`].
    Capacity(CapacityInfo),
}

/// The limits a start is admitted against (`vmletd --max-vms`,
/// `--max-total-memory`), what counts against them now, and how many
/// pool members may boot at once (`--pool-refill`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityInfo {
    /// VMs starting or running, and created VMs holding a pool member's
    /// booted guest.
    pub vms: u32,
    /// Most such VMs at once.
    pub max_vms: u32,
    /// Guest memory those VMs and every pool member (ready or booting)
    /// hold, MiB.
    pub memory_mib: u64,
    /// Most guest memory at once, MiB: a start that would pass it is
    /// refused, and a pool does not refill past it.
    pub max_memory_mib: u64,
    /// Most pool members booting at once, over all pools.
    pub pool_refill: u32,
    /// Pool members booting now.
    pub pool_filling: u32,
}

/// One guest template: a guest of one image booted once, its tether ready,
/// then snapshotted; every start of the image (at the template's memory
/// and vCPUs) restores a clone of it with copy-on-write memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// The image as configured.
    pub image: String,
    /// The image id of the snapshot, once one is ready.
    pub image_id: Option<String>,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// `ready`, `building`, `waiting` (no such image yet) or `failed`.
    pub status: String,
    /// Bytes of guest memory the snapshot holds (shared by every clone).
    pub memory_bytes: u64,
    /// Bytes of saved device state.
    pub state_bytes: u64,
    /// How long the last build took (boot, snapshot), ms.
    pub build_ms: u64,
    /// Snapshots taken (rebuilt after an image change or a failure).
    pub builds: u64,
    /// Starts served by a clone.
    pub clones: u64,
    /// Builds or restores that failed.
    pub failures: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// One warm pool: guests booted ahead of demand for one image, memory size
/// and vCPU count, each waiting with its root filesystem mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// The image as configured.
    pub image: String,
    /// The image id the members were booted from.
    pub image_id: Option<String>,
    /// Guest memory of each member, MiB.
    pub memory_mib: u32,
    /// vCPUs of each member.
    pub vcpus: u32,
    /// How many members the pool keeps ready.
    pub target: u32,
    /// Members ready now.
    pub ready: u32,
    /// Members booting now.
    pub filling: u32,
    /// Guest memory the pool holds (ready and booting), MiB.
    pub memory_held_mib: u64,
    /// Starts served by a pool member.
    pub hits: u64,
    /// Matching creates that found the pool empty and booted cold.
    pub misses: u64,
    /// Members that failed to boot or prepare.
    pub failures: u64,
    /// The command each member runs once from the image before it is
    /// ready (`vmletd --pool-warmup`), if any.
    pub warmup: Option<Vec<String>>,
}

/// A stored image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// `sha256:<hex>` of its config blob (Docker's image id).
    pub id: String,
    /// Names (`repo:tag`) pointing at it.
    pub names: Vec<String>,
    /// Its layers, lowest first.
    pub layers: Vec<LayerInfo>,
    /// What a container of it runs by default.
    pub config: ImageConfig,
    /// When it was stored, milliseconds since the epoch.
    pub created_ms: u64,
    /// Ids of the VMs using it.
    pub used_by: Vec<String>,
}

/// One layer of an image, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// `sha256:<hex>` of the uncompressed tar (the OCI diff id): the
    /// store's key.
    pub diff_id: String,
    /// Bytes of the uncompressed tar.
    pub size: u64,
    /// Bytes of its read-only disk.
    pub disk_size: u64,
    /// The disk's filesystem (`erofs`, `ext4`).
    pub fstype: String,
}

/// The parts of an OCI image config that decide what a container runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `KEY=value`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`, `name:group`).
    pub user: Option<String>,
}

/// A container output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// The agent's version and what its host can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The agent's crate version.
    pub agent: String,
    /// API version of this connection.
    pub api_version: u32,
    /// The VMM backend and its version.
    pub vmm: String,
    /// The accelerator VMs use (`kvm` or `tcg`).
    pub accel: String,
    /// The guest kernel in use.
    pub kernel: String,
}

/// A VM's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// Created, not started.
    Created,
    /// Booting its VM.
    Starting,
    /// Its container process runs.
    Running,
    /// Its process or VM has ended; output is kept until removal.
    Exited,
    /// Removed; only seen in events.
    Removed,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Exited => "exited",
            VmState::Removed => "removed",
        })
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The exit code in shell convention: the process's exit code, or 128
    /// plus the signal that killed it; 255 when the VM ended without the
    /// guest reporting a status.
    pub code: i32,
    /// The signal that killed the process, if one did.
    pub signal: Option<i32>,
    /// Why it ended, as a sentence.
    pub reason: String,
    /// When, in milliseconds since the epoch.
    pub at_ms: u64,
}

/// The phases of a start, in order. Every start records when it reached
/// each, so a slow start explains itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    /// The agent received the start.
    Accepted,
    /// Admission control let it through.
    Admitted,
    /// The VM config was cloned from its template.
    ConfigCloned,
    /// The image's disks were attached.
    DisksAttached,
    /// The VMM process runs.
    VmmSpawned,
    /// The guest's tether said hello.
    GuestBooted,
    /// The container process runs.
    ProcessStarted,
    /// The first output byte arrived.
    FirstOutput,
    /// The container has exited.
    Exited,
}

impl Phase {
    /// All phases, in order.
    pub const ALL: [Phase; 9] = [
        Phase::Accepted,
        Phase::Admitted,
        Phase::ConfigCloned,
        Phase::DisksAttached,
        Phase::VmmSpawned,
        Phase::GuestBooted,
        Phase::ProcessStarted,
        Phase::FirstOutput,
        Phase::Exited,
    ];

    /// The phase's name in traces, `inspect` and the benchmark.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Accepted => "accepted",
            Phase::Admitted => "admitted",
            Phase::ConfigCloned => "config-cloned",
            Phase::DisksAttached => "disks-attached",
            Phase::VmmSpawned => "vmm-spawned",
            Phase::GuestBooted => "guest-booted",
            Phase::ProcessStarted => "process-started",
            Phase::FirstOutput => "first-output",
            Phase::Exited => "exited",
        }
    }
}

/// When a start reached a phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTiming {
    /// The phase.
    pub phase: Phase,
    /// Microseconds since [`Phase::Accepted`].
    pub at_us: u64,
}

/// One line of `vmlet ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// The VM's id.
    pub id: String,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// The image it runs.
    pub image: String,
    /// The command it runs, cut to 1 KiB in all (inspect has it whole).
    pub argv: Vec<String>,
    /// Its state.
    pub state: VmState,
    /// Creation time, milliseconds since the epoch.
    pub created_ms: u64,
    /// How it ended, once it has (the reason cut to 1 KiB).
    pub exit: Option<ExitInfo>,
}

/// Boot timings the guest reports in its hello.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestBoot {
    /// Microseconds from kernel start to the tether's first instruction.
    pub kernel_us: u64,
    /// Microseconds the tether spent loading kernel modules.
    pub modules_us: u64,
    /// Microseconds from kernel start to the hello.
    pub hello_us: u64,
}

/// How long each step of assembling the container's root filesystem took
/// in the guest (microseconds, by the guest's clock), as the tether
/// reports it when it assembles the root for the start itself (a cold
/// start; a pool member and a template's guest assembled theirs before).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootTimings {
    /// Finding the disks by serial.
    pub disks_us: u64,
    /// Mounting the read-only layers.
    pub layers_us: u64,
    /// Mounting the writable disk (or a tmpfs, without one).
    pub writable_us: u64,
    /// Creating overlayfs's `upper` and `work` on it.
    pub dirs_us: u64,
    /// Mounting the overlay.
    pub overlay_us: u64,
    /// proc, sys and dev inside the root, and the hostname.
    pub inner_us: u64,
}

/// Everything the agent knows of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The summary `ps` shows.
    pub summary: VmSummary,
    /// The full create spec.
    pub spec: CreateSpec,
    /// Timings of the start, phase by phase.
    pub phases: Vec<PhaseTiming>,
    /// What the guest reported of its boot.
    pub guest_boot: Option<GuestBoot>,
    /// The guest's vsock context id.
    pub cid: u32,
    /// Process id of the VMM, while it runs.
    pub vmm_pid: Option<u32>,
    /// The accelerator (`kvm` or `tcg`).
    pub accel: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Bytes the VM's log files hold now (stdout and stderr with a small
    /// header per chunk); at most the agent's log cap plus one chunk.
    pub log_bytes: u64,
    /// `pool` when the VM was booted ahead of demand by a warm pool,
    /// `cold` when its start booted it.
    pub start_mode: String,
    /// Bytes of stdout and stderr that log rotation deleted to keep the
    /// log within the agent's cap.
    pub log_dropped_bytes: u64,
    /// What confines the VM's VMM processes, once they were started.
    pub confinement: Option<Confinement>,
    /// How the guest assembled the container's root filesystem, when it
    /// did so during the start (a cold start).
    pub root: Option<RootTimings>,
}

/// What confines one VM's VMM processes (QEMU and its helpers): the user
/// they run as and their cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// The user they run as (a name, or the uid when it has none).
    pub user: String,
    /// Their uid.
    pub uid: u32,
    /// Their primary gid.
    pub gid: u32,
    /// Their cgroup, if they have one.
    pub cgroup: Option<CgroupLimits>,
    /// What is not confined and why, if anything.
    pub note: Option<String>,
}

/// One VM's cgroup and the limits written to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// `v1` or `v2`.
    pub version: String,
    /// Its directories: one on v2; on v1 one per hierarchy, memory first.
    pub paths: Vec<String>,
    /// Memory limit in bytes (guest memory plus the VMM's overhead).
    pub memory_max_bytes: u64,
    /// CPU time per period, microseconds (none without a CPU quota).
    pub cpu_quota_us: Option<u64>,
    /// The quota's period, microseconds.
    pub cpu_period_us: u64,
    /// Most tasks (none without the pids controller).
    pub pids_max: Option<u64>,
}

/// A VM state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The VM's id.
    pub vm: String,
    /// Its new state.
    pub state: VmState,
    /// When, in milliseconds since the epoch.
    pub at_ms: u64,
    /// How it ended, for [`VmState::Exited`].
    pub exit: Option<ExitInfo>,
}

/// Picks the newest version both sides speak.
pub fn negotiate(min: u32, max: u32) -> Option<u32> {
    let hi = max.min(API_VERSION);
    (hi >= min.max(MIN_API_VERSION)).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(API_VERSION));
        assert_eq!(negotiate(2, 9), Some(API_VERSION));
        assert_eq!(negotiate(1, 2), Some(2));
        assert_eq!(negotiate(API_VERSION + 1, 9), None);
        assert_eq!(negotiate(0, 0), None);
    }

    #[test]
    fn phase_names_are_distinct_and_ordered() {
        let names: std::collections::HashSet<_> = Phase::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names.len(), Phase::ALL.len());
        assert!(Phase::ALL.windows(2).all(|w| w[0] < w[1]));
    }
}
