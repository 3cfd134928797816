//! The guest kernel: which one the agent boots, and what it asks of the
//! machine and the initrd.
//!
//! A kernel directory holds `vmlinux` (the PVH ELF), `kernel.release`, the
//! kernel's own `config`, and `modules/` with a `modules.order` when some
//! drivers the guest needs are modules. Two are installed by setup scripts:
//!
//! - [`TAILORED_DIR`], from `scripts/build-kernel.sh` (optional): vmlet's own
//!   config, everything built in, no ACPI or PCI.
//! - [`DEBIAN_DIR`], from `scripts/setup-guest.sh`: Debian's cloud kernel,
//!   whose virtio, vsock, overlay and erofs drivers are modules.
//!
//! The kernel's `config` is its descriptor: whether it has ACPI decides the
//! machine's (`CONFIG_ACPI`), and without modules every driver the guest
//! needs must be built in. Nothing is written beside it that could drift from
//! what the kernel really is.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where `scripts/build-kernel.sh` installs vmlet's tailored kernel (a
/// symlink to the build of the current inputs).
pub const TAILORED_DIR: &str = "/var/lib/vmlet/kernels/tailored";
/// Where `scripts/setup-guest.sh` installs Debian's cloud kernel and its
/// modules.
pub const DEBIAN_DIR: &str = "/var/lib/vmlet/guest";

/// Options a guest cannot work without: the disks, vsock, and the
/// filesystems the root is assembled from. A kernel without modules must
/// build each in.
const REQUIRED: [&str; 7] = [
    "CONFIG_VIRTIO_MMIO",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_VSOCKETS",
    "CONFIG_VIRTIO_VSOCKETS",
    "CONFIG_OVERLAY_FS",
    "CONFIG_EROFS_FS",
    "CONFIG_EXT4_FS",
];

/// Why a kernel directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No `vmlinux` in the directory.
    #[error("no guest kernel at {0}: run scripts/setup-guest.sh (or scripts/build-kernel.sh)")]
    NoKernel(PathBuf),
    /// A file of the directory could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel's config says it could not find or mount what a guest
    /// needs.
    #[error("the kernel in {dir} cannot run vmlet guests: {reason}")]
    Unusable {
        /// The kernel directory.
        dir: PathBuf,
        /// What is missing.
        reason: String,
    },
}

/// A guest kernel and what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    /// The kernel directory, as given.
    pub dir: PathBuf,
    /// The PVH ELF QEMU boots.
    pub vmlinux: PathBuf,
    /// `uname -r` of the guest (`unknown` when the directory does not say).
    pub release: String,
    /// Whether the kernel finds its devices through ACPI; if not, the
    /// machine runs without ACPI and lists them on the kernel command line.
    pub acpi: bool,
    /// `CONFIG_HZ` when the kernel accepts `lapic_timer_period=`
    /// (`CONFIG_VMLET_LAPIC_TIMER_PERIOD`, a patch of the tailored kernel's:
    /// docs/kernel.md), so a TCG guest is told its APIC timer's rate.
    pub apic_timer_hz: Option<u32>,
    /// The modules the tether loads (a directory with `modules.order`), or
    /// `None` when the kernel has every driver built in.
    pub modules: Option<PathBuf>,
}

impl GuestKernel {
    /// Reads the kernel directory `dir` and checks that the kernel can run a
    /// guest: its drivers built in or shipped as modules, and a way to find
    /// its devices.
    pub fn open(dir: &Path) -> Result<GuestKernel, KernelError> {
        let vmlinux = dir.join("vmlinux");
        if !vmlinux.is_file() {
            return Err(KernelError::NoKernel(vmlinux));
        }
        let release = fs::read_to_string(dir.join("kernel.release"))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let modules_dir = dir.join("modules");
        let modules = modules_dir
            .join("modules.order")
            .is_file()
            .then_some(modules_dir);
        let config_path = dir.join("config");
        let text = match fs::read_to_string(&config_path) {
            Ok(text) => Some(text),
            // A directory from before configs were installed: what setup-guest.sh
            // made then was always Debian's kernel, with ACPI and modules.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(KernelError::Read {
                    path: config_path,
                    source,
                })
            }
        };
        let config = text.as_deref().map(parse_config);
        let k = GuestKernel {
            dir: dir.to_path_buf(),
            vmlinux,
            release,
            acpi: match &config {
                Some(c) => c.get("CONFIG_ACPI") == Some(&"y"),
                None => true,
            },
            apic_timer_hz: config.as_ref().and_then(|c| {
                (c.get("CONFIG_VMLET_LAPIC_TIMER_PERIOD") == Some(&"y"))
                    .then(|| c.get("CONFIG_HZ")?.parse().ok())
                    .flatten()
            }),
            modules,
        };
        if let Some(c) = &config {
            k.check(c)?;
        }
        Ok(k)
    }

    /// The kernel to use when none is named: the tailored one when it is
    /// installed completely (its `kernel.release` is written last), else
    /// Debian's.
    pub fn default_dir() -> PathBuf {
        Self::pick_default(Path::new(TAILORED_DIR), Path::new(DEBIAN_DIR))
    }

    fn pick_default(tailored: &Path, debian: &Path) -> PathBuf {
        if tailored.join("vmlinux").is_file() && tailored.join("kernel.release").is_file() {
            tailored.to_path_buf()
        } else {
            debian.to_path_buf()
        }
    }

    /// One line for people: release, directory, and how it boots.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}; {}, {})",
            self.release,
            self.dir.display(),
            if self.modules.is_some() {
                "drivers as modules"
            } else {
                "drivers built in"
            },
            if self.acpi { "ACPI" } else { "no ACPI" }
        )
    }

    fn check(&self, c: &HashMap<&str, &str>) -> Result<(), KernelError> {
        let unusable = |reason: String| KernelError::Unusable {
            dir: self.dir.clone(),
            reason,
        };
        if !self.acpi && c.get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") != Some(&"y") {
            return Err(unusable(
                "it has neither ACPI nor CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so it would find no disk or vsock device".into(),
            ));
        }
        if self.modules.is_some() && c.get("CONFIG_MODULES") != Some(&"y") {
            return Err(unusable(
                "it ships modules/ but cannot load modules (no CONFIG_MODULES)".into(),
            ));
        }
        if self.modules.is_none() {
            let missing: Vec<&str> = REQUIRED
                .iter()
                .copied()
                .filter(|o| c.get(o) != Some(&"y"))
                .collect();
            if !missing.is_empty() {
                return Err(unusable(format!(
                    "it has no modules/, and does not build in {}",
                    missing.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// `CONFIG_X=v` lines of a kernel `.config`; comments (`# CONFIG_X is not
/// set`) are left out, so an absent key means "not set".
fn parse_config(text: &str) -> HashMap<&str, &str> {
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_dir(config: Option<&str>, modules: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("vmlinux"), b"\x7fELF").unwrap();
        fs::write(d.path().join("kernel.release"), b"6.1.0-test\n").unwrap();
        if let Some(c) = config {
            fs::write(d.path().join("config"), c).unwrap();
        }
        if modules {
            fs::create_dir(d.path().join("modules")).unwrap();
            fs::write(d.path().join("modules/modules.order"), b"virtio.ko\n").unwrap();
        }
        d
    }

    const BUILT_IN: &str = "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n\
        CONFIG_VIRTIO_BLK=y\nCONFIG_VSOCKETS=y\nCONFIG_VIRTIO_VSOCKETS=y\n\
        CONFIG_OVERLAY_FS=y\nCONFIG_EROFS_FS=y\nCONFIG_EXT4_FS=y\n\
        # CONFIG_ACPI is not set\n# CONFIG_MODULES is not set\n";

    #[test]
    fn tailored_kernel_has_no_acpi_and_no_modules() {
        let d = kernel_dir(Some(BUILT_IN), false);
        let k = GuestKernel::open(d.path()).unwrap();
        assert!(!k.acpi);
        assert_eq!(k.modules, None);
        assert_eq!(k.release, "6.1.0-test");
        assert!(
            k.describe().contains("drivers built in, no ACPI"),
            "{}",
            k.describe()
        );
        // Without the patch's option the kernel measures its APIC timer itself.
        assert_eq!(k.apic_timer_hz, None);
        let patched = format!("{BUILT_IN}CONFIG_HZ=250\nCONFIG_VMLET_LAPIC_TIMER_PERIOD=y\n");
        let d = kernel_dir(Some(&patched), false);
        assert_eq!(
            GuestKernel::open(d.path()).unwrap().apic_timer_hz,
            Some(250)
        );
    }

    #[test]
    fn debian_kernel_has_acpi_and_modules() {
        let d = kernel_dir(
            Some("CONFIG_ACPI=y\nCONFIG_MODULES=y\nCONFIG_VIRTIO_MMIO=m\n"),
            true,
        );
        let k = GuestKernel::open(d.path()).unwrap();
        assert!(k.acpi);
        assert_eq!(k.modules, Some(d.path().join("modules")));
        assert_eq!(k.apic_timer_hz, None);
        // Without a config, a directory is taken as the Debian kernel it always was.
        let d = kernel_dir(None, true);
        let k = GuestKernel::open(d.path()).unwrap();
        assert!(k.acpi);
        assert!(k.modules.is_some());
    }

    #[test]
    fn kernels_that_cannot_boot_a_guest_are_refused() {
        // No ACPI and no command-line devices: no disks would appear.
        let no_devices = BUILT_IN.replace("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n", "");
        // A driver left as a module, with no modules to load.
        let missing_driver = BUILT_IN.replace("CONFIG_EROFS_FS=y", "CONFIG_EROFS_FS=m");
        for (config, modules, needle) in [
            (no_devices.as_str(), false, "CMDLINE_DEVICES"),
            (missing_driver.as_str(), false, "CONFIG_EROFS_FS"),
            (BUILT_IN, true, "CONFIG_MODULES"),
        ] {
            let d = kernel_dir(Some(config), modules);
            let e = GuestKernel::open(d.path()).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            GuestKernel::open(d.path()),
            Err(KernelError::NoKernel(_))
        ));
    }

    #[test]
    fn default_prefers_a_complete_tailored_kernel() {
        let t = tempfile::tempdir().unwrap();
        let debian = Path::new("/debian");
        assert_eq!(GuestKernel::pick_default(t.path(), debian), debian);
        fs::write(t.path().join("vmlinux"), b"").unwrap();
        // Half-installed: kernel.release is written last.
        assert_eq!(GuestKernel::pick_default(t.path(), debian), debian);
        fs::write(t.path().join("kernel.release"), b"6.1-vmlet\n").unwrap();
        assert_eq!(GuestKernel::pick_default(t.path(), debian), t.path());
    }
}
