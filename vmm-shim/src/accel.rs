//! Choosing the accelerator: KVM where the host really has hardware virtualization, else TCG.
//!
//! `/dev/kvm` opening is not enough: a nested KVM without vmx/svm exposed to this host opens
//! fine but runs an ordinary kernel far slower than TCG does.

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::str::FromStr;

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no accelerator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {0:?} (expected \"kvm\" or \"tcg\")")]
pub struct ParseAccelError(pub String);

impl FromStr for Accel {
    type Err = ParseAccelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(ParseAccelError(s.to_owned())),
        }
    }
}

/// The KVM API version every kernel since 2.6.22 reports; anything else is not a usable KVM.
const KVM_API_VERSION: libc::c_int = 12;
/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

/// KVM if `/dev/kvm` opens, the CPU flags show vmx or svm, and `KVM_GET_API_VERSION`
/// answers 12; TCG otherwise.
pub fn detect_accel() -> Accel {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpu_has_hw_virt(&cpuinfo) {
        tracing::debug!("no vmx or svm in /proc/cpuinfo: using TCG");
        return Accel::Tcg;
    }
    match kvm_api_version() {
        Ok(KVM_API_VERSION) => Accel::Kvm,
        Ok(v) => {
            tracing::debug!(version = v, "unexpected KVM API version: using TCG");
            Accel::Tcg
        }
        Err(e) => {
            tracing::debug!(error = %e, "/dev/kvm is not usable: using TCG");
            Accel::Tcg
        }
    }
}

fn kvm_api_version() -> std::io::Result<libc::c_int> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")?;
    // SAFETY: the fd is open for the duration of the call (`kvm` lives until the end of this
    // function), and KVM_GET_API_VERSION takes no argument and writes no memory.
    let v = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if v < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// Whether any `flags` line of `/proc/cpuinfo` text holds `vmx` (Intel) or `svm` (AMD).
fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "flags")
        .any(|(_, v)| v.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        assert_eq!("kvm".parse::<Accel>(), Ok(Accel::Kvm));
        assert_eq!("TCG".parse::<Accel>(), Ok(Accel::Tcg));
        assert_eq!(" tcg\n".parse::<Accel>(), Ok(Accel::Tcg));
        assert_eq!(
            "hvf".parse::<Accel>(),
            Err(ParseAccelError("hvf".to_owned()))
        );
        assert!("".parse::<Accel>().is_err());
        for a in [Accel::Kvm, Accel::Tcg] {
            assert_eq!(a.to_string().parse::<Accel>(), Ok(a));
        }
        assert_eq!(Accel::Kvm.to_string(), "kvm");
        assert_eq!(Accel::Tcg.to_string(), "tcg");
    }

    #[test]
    fn serde_uses_lowercase_names() {
        assert_eq!(serde_json::to_string(&Accel::Kvm).unwrap(), "\"kvm\"");
        assert_eq!(
            serde_json::from_str::<Accel>("\"tcg\"").unwrap(),
            Accel::Tcg
        );
    }

    #[test]
    fn finds_hw_virt_flags() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme de vmx sse\nbugs\t\t: spectre\n";
        let amd = "flags\t\t: fpu svm\n";
        let none = "flags\t\t: fpu vme hypervisor\nvmx flags\t: vnmi\n";
        assert!(cpu_has_hw_virt(intel));
        assert!(cpu_has_hw_virt(amd));
        // "vmx flags" is a separate line that some kernels print even when vmx is not usable.
        assert!(!cpu_has_hw_virt(none));
        assert!(!cpu_has_hw_virt(""));
        assert!(!cpu_has_hw_virt("flags\t: vmxe svmx\n"));
    }

    #[test]
    fn detects_something() {
        // On this project's machines there is no vmx/svm: TCG. Elsewhere either is fine.
        let a = detect_accel();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpu_has_hw_virt(&cpuinfo) {
            assert_eq!(a, Accel::Tcg);
        }
    }
}
