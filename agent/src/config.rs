//! The agent's validated configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_shim::Accel;

/// Everything vmletd needs to run, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the agent keeps VMs, images, logs and its generated initrd.
    pub state_dir: PathBuf,
    /// The API socket.
    pub socket: PathBuf,
    /// Permission bits of the API socket.
    pub socket_mode: u32,
    /// Where the guest kernel (`vmlinux`) and its `modules/` live.
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
        }
    }

    /// The VMs' directory.
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
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
