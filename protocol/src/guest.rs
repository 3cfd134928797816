//! The agent ⇄ tether protocol, carried over one vsock stream per guest.
//!
//! The tether connects to the host (CID 2) on [`TETHER_PORT`] once its
//! devices are up and sends [`GuestMessage::Hello`]. The agent answers with
//! [`HostMessage::Spec`]; the tether assembles the root filesystem, starts
//! the process and reports [`GuestMessage::Started`], then both sides stream
//! stdio until [`GuestMessage::Exited`], which the agent acknowledges with
//! [`HostMessage::ExitAck`] once the output is safely stored. Then the
//! tether powers the VM off.
//!
//! The connection may break while the process runs (the agent restarts; VMs
//! outlive it). The tether keeps every output byte the agent has not
//! acknowledged ([`HostMessage::Ack`]), dials again, says hello again, and
//! on [`HostMessage::Resume`] resends from the offsets the agent stored, so
//! no output is lost or duplicated. An `Exited` or `Failed` that was not
//! acknowledged is sent again too.
//!
//! Everything a guest sends is untrusted: the agent decodes guest frames
//! with [`MAX_GUEST_FRAME`] as the limit.

use serde::{Deserialize, Serialize};

use crate::api::{GuestBoot, RootTimings};

/// The guest protocol version, sent in the hello.
pub const GUEST_PROTOCOL_VERSION: u32 = 2;
/// How long a [`HostMessage::Prepare`]'s warm-up may run before the
/// tether kills it.
pub const WARMUP_PATIENCE_MS: u64 = 10_000;
/// The vsock port the host listens on for tethers.
pub const TETHER_PORT: u32 = 1024;
/// The largest frame the agent accepts from a guest: one stdio chunk plus
/// framing, with headroom. A guest cannot make the agent buffer more per
/// frame than this.
pub const MAX_GUEST_FRAME: u32 = 128 * 1024;

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// The tether is up.
    Hello {
        /// [`GUEST_PROTOCOL_VERSION`] of the tether.
        version: u32,
        /// Boot timings.
        boot: GuestBoot,
    },
    /// The container process runs.
    Started {
        /// Its pid inside the guest.
        pid: i32,
    },
    /// Bytes the process wrote to stdout.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes the process wrote to stderr.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The process could not be started or the root filesystem not set up.
    Failed {
        /// What went wrong.
        message: String,
        /// Exit code to report (127: command not found, 126: not
        /// executable, 125: the tether itself failed).
        code: i32,
    },
    /// The process has exited and all its output was sent.
    Exited {
        /// Its exit code, if it exited.
        code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
    },
    /// Answer to [`HostMessage::Prepare`]: the root filesystem is mounted
    /// and the tether waits for the spec. (A failure is reported with
    /// [`GuestMessage::Failed`], code 125.)
    Prepared,
    /// How many stdin bytes the tether has taken from the host since the
    /// process started. Taken bytes reach the process even if the host
    /// goes away; after a reconnection the host learns from this where a
    /// client must resume sending. Sent as stdin arrives and first on
    /// every resumed connection.
    StdinAck {
        /// Stdin bytes received.
        received: u64,
    },
    /// Sent just before [`GuestMessage::Started`] when the tether assembled
    /// the root filesystem after the spec: how long each step took.
    Root(RootTimings),
}

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// What to run.
    Spec(ProcessSpec),
    /// Bytes for the process's stdin.
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// End of stdin.
    CloseStdin,
    /// Deliver a signal to the process.
    Signal(i32),
    /// The agent has stored everything; the tether may power off.
    ExitAck,
    /// Sent instead of [`HostMessage::Spec`] when a tether whose process
    /// already runs connects again (the agent restarted, or the connection
    /// broke): how many bytes of each stream the agent has stored. The
    /// tether resends every byte after these offsets, then goes on.
    Resume {
        /// Stdout bytes stored.
        stdout: u64,
        /// Stderr bytes stored.
        stderr: u64,
    },
    /// The agent has stored this many bytes of each stream (counted from
    /// the process start); the tether may forget them.
    Ack {
        /// Stdout bytes stored.
        stdout: u64,
        /// Stderr bytes stored.
        stderr: u64,
    },
    /// Sent instead of a spec to a VM booted ahead of demand (a warm-pool
    /// VM): mount these disks as the root filesystem now. The tether
    /// answers [`GuestMessage::Prepared`] and then waits, without a time
    /// limit, for [`HostMessage::Spec`]; that spec's `layers` and
    /// `writable` are ignored (the prepared root is used), the rest applies.
    Prepare {
        /// Read-only layers, lowest first.
        layers: Vec<DiskSpec>,
        /// The writable upper layer; a tmpfs when `None`.
        writable: Option<DiskSpec>,
        /// A process to run once, before answering, in a scratch copy of
        /// the root (the same layers over a throwaway tmpfs), so that the
        /// guest has run the image's code once before its container does
        /// (under emulation, a first run pays for its translation). Its
        /// `layers`, `writable`, `stdin` and `hostname` are ignored; its
        /// output is discarded; it and every process it left are killed
        /// before the answer, at the latest after [`WARMUP_PATIENCE_MS`].
        warmup: Option<ProcessSpec>,
    },
    /// Sent first to a guest restored from a template snapshot, before
    /// its spec or `Prepare`: every clone of one snapshot wakes with the
    /// same memory, so it must forget what it shares with its siblings.
    /// The tether mixes `seed` into the kernel's random pool and reseeds
    /// it, and sets the wall clock (the snapshot's is stale). Ignored once
    /// a spec arrived.
    Renew {
        /// Fresh random bytes (32 or more) for this clone only.
        #[serde(with = "serde_bytes")]
        seed: Vec<u8>,
        /// The host's wall clock, nanoseconds since the Unix epoch.
        realtime_ns: u64,
    },
}

/// A disk holding one read-only image layer, or the writable disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The disk's virtio-blk serial number, which the tether uses to find
    /// its device (device names depend on probe order; serials do not).
    pub serial: String,
    /// Filesystem type (`ext4`, `erofs`).
    pub fstype: String,
}

/// The container process and its root filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// Read-only layers, lowest first. Merged with overlayfs.
    pub layers: Vec<DiskSpec>,
    /// The writable upper layer; a tmpfs when `None`.
    pub writable: Option<DiskSpec>,
    /// Command and arguments.
    pub argv: Vec<String>,
    /// Full environment as `KEY=value`.
    pub env: Vec<String>,
    /// Working directory; `/` when `None`.
    pub workdir: Option<String>,
    /// Whether stdin stays open for [`HostMessage::Stdin`]; when false the
    /// process's stdin is `/dev/null`.
    pub stdin: bool,
    /// Hostname of the guest.
    pub hostname: String,
    /// User to run as: `name`, `uid`, `uid:gid`, `name:group`, resolved
    /// against the container's `/etc/passwd` and `/etc/group`; root when
    /// `None`.
    pub user: Option<String>,
}
