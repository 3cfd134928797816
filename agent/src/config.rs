//! The agent's validated configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_shim::{Accel, CgroupMode};

/// Everything vmletd needs to run, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the agent keeps VMs, images, logs and its generated initrd.
    pub state_dir: PathBuf,
    /// The API socket.
    pub socket: PathBuf,
    /// Permission bits of the API socket.
    pub socket_mode: u32,
    /// The guest kernel's directory (see [`crate::kernel`]).
    pub guest_dir: PathBuf,
    /// The static tether binary packed as the guest's `/init`.
    pub tether: PathBuf,
    /// Accelerator for every VM.
    pub accel: Accel,
    /// Default guest memory in MiB.
    pub memory_mib: u32,
    /// Default virtual CPUs.
    pub vcpus: u32,
    /// How long a guest may take from VMM spawn to the tether's hello.
    pub boot_timeout: Duration,
    /// Most VMs running or starting at once.
    pub max_vms: usize,
    /// Extra kernel command line for every guest.
    pub extra_cmdline: String,
    /// Users allowed on the API socket (root and the agent's own user are
    /// always allowed).
    pub allowed_uids: Vec<u32>,
    /// Groups whose members are allowed on the API socket.
    pub allowed_gids: Vec<u32>,
    /// Most guest memory, in MiB, of all VMs starting or running at once
    /// (warm-pool members included).
    pub max_total_memory_mib: u64,
    /// Warm pools: guests booted ahead of demand, per image.
    pub pools: Vec<crate::pool::PoolSpec>,
    /// Most pool members booting at once.
    pub pool_refill: usize,
    /// Images whose starts restore a snapshot of a booted guest (a
    /// template) instead of booting one.
    pub templates: Vec<String>,
    /// How much output each VM's log keeps (rotation deletes the oldest
    /// beyond it).
    pub log_limits: crate::logstore::LogLimits,
    /// How long an API connection may sit idle (no request in flight, no
    /// stream, no frame received) before the agent closes it.
    pub idle_timeout: Duration,
    /// The user (name or uid) VMMs run as; `None`: `vmlet-vmm` if it
    /// exists, else the agent's own user.
    pub vmm_user: Option<String>,
    /// Which cgroups VMs go into.
    pub cgroups: CgroupMode,
    /// The cgroup VM cgroups are made in (see `vmm_shim::Cgroups::detect`).
    pub cgroup_parent: Option<String>,
    /// Memory (MiB) a VM's cgroup allows beyond its guest memory.
    pub vmm_memory_overhead_mib: u64,
    /// Each VM's VMM runs as uid and gid this + its vsock CID, when set.
    pub vmm_uid_base: Option<u32>,
    /// Pre-staging: the guest kernel and initrd are copied into sealed
    /// memory at startup and `prestage` keeps an image's layer disks
    /// mapped. Off, QEMU reads the kernel and initrd by path on every start
    /// and the layers stay wherever the page cache leaves them (what the
    /// benchmark's cold mode measures).
    pub prestage: bool,
}

impl Config {
    /// A configuration with defaults for everything but the paths.
    pub fn new(state_dir: PathBuf, socket: PathBuf, guest_dir: PathBuf, tether: PathBuf) -> Self {
        Config {
            state_dir,
            socket,
            socket_mode: 0o600,
            guest_dir,
            tether,
            accel: vmm_shim::detect_accel(),
            memory_mib: 256,
            vcpus: 1,
            boot_timeout: Duration::from_secs(60),
            max_vms: 32,
            extra_cmdline: String::new(),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_total_memory_mib: default_memory_budget(),
            pools: Vec::new(),
            pool_refill: 1,
            templates: Vec::new(),
            log_limits: crate::logstore::LogLimits::DEFAULT,
            idle_timeout: Duration::from_secs(300),
            vmm_user: None,
            cgroups: CgroupMode::Auto,
            cgroup_parent: None,
            vmm_memory_overhead_mib: vmm_shim::confine::DEFAULT_MEMORY_OVERHEAD_MIB,
            vmm_uid_base: None,
            prestage: true,
        }
    }

    /// Whether a client with these credentials may use the API.
    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == nix::unistd::geteuid().as_raw()
            || self.allowed_uids.contains(&uid)
            || self.allowed_gids.contains(&gid)
    }

    /// The VMs' directory.
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    /// Where template VMs live while they are built.
    pub fn templates_dir(&self) -> PathBuf {
        self.state_dir.join("templates")
    }

    /// The image store's directory.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// The directory of generated guest artifacts (the initrd).
    pub fn guest_state_dir(&self) -> PathBuf {
        self.state_dir.join("guest")
    }

    /// The default place of the tether binary: the workspace's musl build
    /// output when vmletd runs from the workspace, else beside vmletd (an
    /// installed agent). A host build of the tether in the same target
    /// directory is not static and is never picked.
    pub fn default_tether() -> PathBuf {
        let exe = std::env::current_exe().unwrap_or_default();
        let dir = exe.parent().unwrap_or(Path::new("."));
        // target/{debug,release}/vmletd → target/x86_64-unknown-linux-musl/tether/tether
        let built = dir
            .parent()
            .unwrap_or(Path::new("."))
            .join("x86_64-unknown-linux-musl/tether/tether");
        if built.is_file() {
            built
        } else {
            dir.join("tether")
        }
    }
}

/// Parses a size: a number of bytes, or a number with a `K`, `M` or `G`
/// suffix (binary units; `KiB`, `MiB`, `GiB` and `KB`... are read the same).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// Three quarters of the host's memory: guests beyond that would push the
/// host into swapping or the OOM killer, which degrades every VM.
fn default_memory_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024 * 3 / 4)
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        for bad in [
            "",
            "M",
            "1.5M",
            "-1",
            "1T",
            "1 M x",
            "99999999999999999999G",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
