//! Early boot: the pseudo-filesystems, the console, and the kernel modules.

use std::ffi::CStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::MsFlags;
use nix::sys::stat::Mode;

use crate::log;

/// Where the agent packs the modules, with `modules.order` beside them.
pub(crate) const MODULES_DIR: &str = "/lib/modules";
/// The vsock loopback transport, when the kernel has it as a module: only
/// the pool's rehearsal (rehearsal.rs) uses it, so it is loaded there, not
/// in every boot.
pub(crate) const LOOPBACK_MODULE: &str = "vsock_loopback.ko";

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module itself
/// (Linux 5.17+, `CONFIG_MODULE_DECOMPRESS`). nix does not name it yet.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Why early boot failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A pseudo-filesystem could not be mounted.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: Errno,
    },
}

/// Mounts what the tether itself needs: `/proc`, `/sys`, `/dev` and a
/// `/run` tmpfs for the container's mount points. A filesystem already
/// mounted there (`EBUSY`, e.g. a kernel that automounts devtmpfs) is fine.
pub(crate) fn mount_early() -> Result<(), Error> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&'static str, &'static str, MsFlags, Option<&str>); 4] = [
        ("proc", "/proc", nosuid, None),
        ("sysfs", "/sys", nosuid, None),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "tmpfs",
            "/run",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (fstype, target, flags, data) in mounts {
        let _ = fs::create_dir_all(target);
        match nix::mount::mount(Some(fstype), target, Some(fstype), flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => {
                return Err(Error::Mount {
                    fstype,
                    target,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Makes sure fds 0, 1 and 2 are open. The kernel opens `/dev/console` for
/// init only if the initramfs has that node; without it the tether's
/// diagnostics would vanish, so reopen it from devtmpfs.
pub(crate) fn ensure_console() {
    let all_open = (0..=2).all(|fd| fcntl(fd, FcntlArg::F_GETFD).is_ok());
    if all_open {
        return;
    }
    let Ok(fd) = nix::fcntl::open(
        "/dev/console",
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        Mode::empty(),
    ) else {
        return;
    };
    for target in 0..=2 {
        if fcntl(target, FcntlArg::F_GETFD).is_err() {
            let _ = nix::unistd::dup2(fd, target);
        }
    }
    if fd > 2 {
        let _ = nix::unistd::close(fd);
    }
}

/// The module files named by a `modules.order`, in load order: one file
/// name (or path relative to the modules directory) per line; blank lines
/// and `#` comments are skipped.
pub(crate) fn parse_modules_order(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// What loading the modules did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ModulesReport {
    /// Modules the kernel accepted.
    pub(crate) loaded: usize,
    /// Modules that were already there (built in or loaded before).
    pub(crate) present: usize,
    /// Modules that failed; the rest are still tried.
    pub(crate) failed: usize,
}

/// Loads every module listed in `<dir>/modules.order`, in order, but those
/// named in `skip` (file names, such as a transport this guest does not
/// use). No list means a kernel with its drivers built in (the agent packs
/// none for it): nothing to do. A module that fails is logged and skipped:
/// a later step (no vsock, no disk) reports what is really missing.
pub(crate) fn load_modules(dir: &Path, skip: &[&str]) -> ModulesReport {
    load_modules_with(dir, skip, load_module)
}

fn load_modules_with(
    dir: &Path,
    skip: &[&str],
    mut load: impl FnMut(&Path) -> Result<(), Errno>,
) -> ModulesReport {
    let mut report = ModulesReport::default();
    let order = dir.join("modules.order");
    let text = match fs::read_to_string(&order) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return report,
        Err(e) => {
            log!("cannot read {}: {e}; loading no modules", order.display());
            return report;
        }
    };
    let start = Instant::now();
    let names = parse_modules_order(&text);
    for (i, name) in names.iter().enumerate() {
        if skip.contains(name) {
            continue;
        }
        let path: PathBuf = dir.join(name);
        match load(&path) {
            Ok(()) => report.loaded += 1,
            Err(Errno::EEXIST) => report.present += 1,
            // A kernel built without module support has no finit_module: whatever
            // it can do is built in, and trying the rest would only repeat this.
            Err(Errno::ENOSYS) => {
                log!("the kernel cannot load modules; taking its drivers as built in");
                report.present += names.len() - i;
                break;
            }
            Err(e) => {
                report.failed += 1;
                log!("cannot load module {}: {e}", path.display());
            }
        }
    }
    log!(
        "modules: {} loaded, {} present, {} failed in {} ms",
        report.loaded,
        report.present,
        report.failed,
        start.elapsed().as_millis()
    );
    report
}

pub(crate) fn load_module(path: &Path) -> Result<(), Errno> {
    let file = File::open(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    let compressed = [".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .any(|ext| path.to_string_lossy().ends_with(ext));
    let flags = if compressed {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    };
    finit_module(&file, c"" as &CStr, flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_order_skips_blanks_and_comments() {
        let text = "virtio.ko\n\n  virtio_ring.ko  \n# built in\nkernel/fs/overlayfs/overlay.ko\n";
        assert_eq!(
            parse_modules_order(text),
            vec![
                "virtio.ko",
                "virtio_ring.ko",
                "kernel/fs/overlayfs/overlay.ko"
            ]
        );
    }

    #[test]
    fn modules_order_of_nothing_is_empty() {
        assert!(parse_modules_order("").is_empty());
        assert!(parse_modules_order("\n \n#x\n").is_empty());
    }

    #[test]
    fn missing_order_file_loads_nothing() {
        let r = load_modules(Path::new("/nonexistent-vmlet-test"), &[]);
        assert_eq!(r, ModulesReport::default());
    }

    #[test]
    fn built_in_and_unsupported_modules_are_not_failures() {
        let dir = crate::testutil::TempDir::new();
        fs::write(dir.path().join("modules.order"), "a.ko\nb.ko\nc.ko\nd.ko\n").unwrap();
        let mut tried = Vec::new();
        // a loads, b is built in already, then the kernel turns out to lack
        // module support: c and d are not tried.
        let r = load_modules_with(dir.path(), &[], |p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            tried.push(name.clone());
            match name.as_str() {
                "a.ko" => Ok(()),
                "b.ko" => Err(Errno::EEXIST),
                _ => Err(Errno::ENOSYS),
            }
        });
        assert_eq!(tried, ["a.ko", "b.ko", "c.ko"]);
        assert_eq!(
            r,
            ModulesReport {
                loaded: 1,
                present: 3,
                failed: 0
            }
        );
    }
}
