//! The QEMU microvm backend.
//!
//! One VM is one `qemu-system-x86_64 -M microvm` process booting a PVH `vmlinux` with
//! virtio-mmio disks and a vhost-user vsock device served by its own `vhost-device-vsock`.
//! Both run in their own session and outlive the agent; QMP drives QEMU.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::confine::{Confinement, ConfinementInfo, Credentials, Jail, VmCgroup, VmmUser};
use crate::process::{self, Process};
use crate::qmp::{self, QmpClient};
use crate::staged::StagedFile;
use crate::vsock_backend::{self, VsockBackend};
use crate::{Accel, Capabilities, Error, Link, Memory, VmConfig, VmExit, VmHandle, Vmm};

/// Kernel arguments every guest gets, before [`VmConfig::cmdline`]. `panic=-1 reboot=t`:
/// a panicking or rebooting guest triple-faults, and `-no-reboot` turns that into QEMU's exit.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 reboot=t quiet";

/// Timer hints for TCG when the host's TSC rate is unknown: without them the kernel spends
/// seconds (or hangs) calibrating clocks against emulated hardware. Under KVM the host's real
/// TSC frequency comes from kvmclock, so no hints are given there.
pub const TCG_TIMER_HINTS: &str = "tsc_early_khz=2000000 lpj=4000000 no_timer_check";

/// The timer hints a TCG guest gets on this host (see `tsc_hints`); worked out once, on
/// first use (~60 ms of measuring). A caller that knows it will start TCG guests calls it
/// ahead, so no start pays for the measurement.
pub fn tcg_timer_hints() -> &'static str {
    static HINTS: OnceLock<String> = OnceLock::new();
    HINTS.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        tsc_hints(host_tsc_khz(), &cpuinfo)
    })
}

/// Under TCG a guest's `rdtsc` reads the host's own TSC, so the guest is told the host's
/// rate. A wrong rate (the old fixed 2 GHz on a 2.3 GHz host) makes the guest's clock
/// watchdog find the TSC skewed and mark it unstable, and the guest falls back to jiffies:
/// a clock and timers with 4 ms steps. When the host's TSC is constant and does not stop
/// (`constant_tsc`, `nonstop_tsc`), the guest's is too: `tsc=reliable` spares the watchdog,
/// whose jiffies reference lags under TCG when the host is busy. `lpj` is the same rate
/// per jiffy at the guest kernels' HZ of 250. Without a measured rate: the fixed hints.
fn tsc_hints(khz: Option<u64>, cpuinfo: &str) -> String {
    let Some(khz) = khz else {
        return TCG_TIMER_HINTS.to_string();
    };
    let mut s = format!(
        "tsc_early_khz={khz} lpj={} no_timer_check",
        khz * 1000 / 250
    );
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    if ["constant_tsc", "nonstop_tsc"]
        .iter()
        .all(|f| flags.contains(f))
    {
        s.push_str(" tsc=reliable");
    }
    s
}

/// The host's TSC rate in kHz, measured against the monotonic clock over 3 × 20 ms (the
/// median), or `None` off x86-64 or for an implausible result. Each end of a measurement is a
/// clock read with a TSC read just before and after it, kept only when the two are close, so a
/// preemption between them cannot skew the rate.
fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        /// A TSC value and the monotonic time at it, within 20,000 cycles (~10 µs).
        fn pair() -> Option<(u64, Instant)> {
            (0..100).find_map(|_| {
                // SAFETY: rdtsc has no preconditions on x86-64.
                let before = unsafe { std::arch::x86_64::_rdtsc() };
                let t = Instant::now();
                // SAFETY: as above.
                let after = unsafe { std::arch::x86_64::_rdtsc() };
                let spread = after.wrapping_sub(before);
                (spread < 20_000).then_some((before + spread / 2, t))
            })
        }
        let mut rates: Vec<u64> = (0..3)
            .filter_map(|_| {
                let (c0, t0) = pair()?;
                std::thread::sleep(Duration::from_millis(20));
                let (c1, t1) = pair()?;
                let ns = u64::try_from((t1 - t0).as_nanos()).ok()?;
                (ns > 0).then(|| (c1.wrapping_sub(c0) as u128 * 1_000_000 / ns as u128) as u64)
            })
            .collect();
        rates.sort_unstable();
        let khz = *rates.get(rates.len() / 2)?;
        (100_000..=10_000_000).contains(&khz).then_some(khz)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// The size of TCG's translation cache, MiB. QEMU's default is 1 GiB, filled as the guest
/// runs new code and never given back: a long-lived guest would grow its VMM towards it and
/// past any sensible cgroup memory limit. 128 MiB is over twice what a guest's boot and a
/// mixed busybox workload used here (55 MiB); a fuller cache is flushed and refilled.
pub const TCG_TB_MIB: u32 = 128;

/// Longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where the shim puts one VM's files, in [`VmConfig::dir`] (the vhost-user socket beside
/// [`VmConfig::vsock_uds`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// QEMU's QMP socket. The shim binds it and QEMU inherits the listening socket, so QEMU
    /// needs no right to create files in the VM's directory.
    pub qmp: PathBuf,
    /// The vhost-user socket between QEMU and vhost-device-vsock.
    pub vhost_vsock: PathBuf,
    /// The guest's serial console.
    pub console: PathBuf,
    /// stdout and stderr of QEMU and the vsock backend, appended.
    pub log: PathBuf,
    /// The host side of the guest's serial link ([`Link::Serial`]).
    pub serial: PathBuf,
    /// Where a snapshot's state stream arrives ([`VmHandle::snapshot`]).
    pub migrate: PathBuf,
}

impl VmPaths {
    /// The standard names in `dir`.
    pub fn new(dir: &Path) -> Self {
        VmPaths {
            qmp: dir.join("qmp.sock"),
            vhost_vsock: dir.join("vhost-vsock.sock"),
            console: dir.join("console.log"),
            log: dir.join("vmm.log"),
            serial: dir.join("serial.sock"),
            migrate: dir.join("migrate.sock"),
        }
    }

    /// The names for `cfg`: the vhost-user socket goes beside the hybrid-vsock socket, in
    /// the directory the vsock backend creates its sockets in.
    pub fn for_config(cfg: &VmConfig) -> Self {
        let mut p = Self::new(&cfg.dir);
        if let Some(d) = cfg.vsock_uds.parent().filter(|d| !d.as_os_str().is_empty()) {
            p.vhost_vsock = d.join("vhost-vsock.sock");
        }
        p
    }
}

/// QEMU's option syntax splits on commas; a literal comma in a value is written twice.
fn opt_value(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The rate of QEMU's emulated local APIC bus, which its APIC timer counts (before the
/// divider): 1 GHz. A TCG guest's own calibration measures ~3,999,850 bus clocks per jiffy at
/// HZ=250.
pub const TCG_APIC_BUS_HZ: u32 = 1_000_000_000;

/// The kernel command line for `cfg`: base arguments, TCG timer hints, then the caller's.
///
/// TCG's emulated CPU has no TSC-deadline timer, so a kernel measures its APIC timer's rate at
/// every boot (100 ms against the TSC, 100 ms verifying it; ~240 ms under emulation here). A
/// kernel that accepts `lapic_timer_period=` ([`VmConfig::apic_timer_hz`]) is given QEMU's
/// rate instead and skips the measurement. Under KVM the TSC-deadline timer needs none.
pub fn kernel_cmdline(cfg: &VmConfig) -> String {
    let mut s = String::from("console=ttyS0");
    if cfg.accel == Accel::Tcg {
        s.push(' ');
        s.push_str(tcg_timer_hints());
        if let Some(hz) = cfg.apic_timer_hz.filter(|hz| *hz > 0) {
            s.push_str(&format!(" lapic_timer_period={}", TCG_APIC_BUS_HZ / hz));
        }
    }
    s.push(' ');
    s.push_str(BASE_CMDLINE.trim_start_matches("console=ttyS0 "));
    if cfg.link == Link::Serial {
        s.push_str(" vmlet.link=serial");
    }
    let extra = cfg.cmdline.trim();
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// QEMU's arguments (without the program) for `cfg`. With `qmp_fd`, QEMU serves QMP on that
/// inherited listening socket; without, it creates `paths.qmp` itself.
///
/// [`VmConfig::acpi`] is whether the machine describes its devices with ACPI. Debian's cloud
/// kernel finds virtio-mmio devices only through ACPI (it lacks
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`), so it needs ACPI on. A kernel built without ACPI
/// needs `acpi=off` on the machine instead, which makes QEMU 7.2's microvm append a
/// `virtio_mmio.device=512@<base>:<irq>` kernel argument per device it attached (its
/// `auto-kernel-cmdline`, on by default); vmlet's tailored kernel boots that way. `acpi=off` on
/// the kernel command line is never wanted: with the machine's ACPI on, Debian's kernel then
/// hangs.
pub fn argv(cfg: &VmConfig, paths: &VmPaths, qmp_fd: Option<i32>) -> Vec<String> {
    let acpi = cfg.acpi;
    let mut a: Vec<String> = Vec::with_capacity(48 + 4 * cfg.disks.len());
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    let mem = format!("{}M", cfg.memory_mib);
    let machine = format!(
        "microvm,x-option-roms=off,rtc=on,pit=on,pic=on,memory-backend=mem{}",
        if acpi { "" } else { ",acpi=off" }
    );
    push(&["-name", &format!("vmlet-{}", cfg.id.replace(',', ",,"))]);
    push(&["-M", &machine]);
    match cfg.accel {
        Accel::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_TB_MIB}")]),
        Accel::Kvm => push(&["-accel", "kvm"]),
    }
    // TCG's "max" emulates every feature it can; under KVM "host" passes the real CPU through.
    push(&[
        "-cpu",
        match cfg.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        },
    ]);
    push(&["-smp", &cfg.vcpus.to_string()]);
    push(&["-m", &mem]);
    match &cfg.memory {
        // vhost-user needs guest memory the backend can map: a shared memfd.
        Memory::Private => push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ]),
        // The agent's memfd: a template's RAM (shared), or a clone's
        // copy-on-write view of it (private). Migration skips shared RAM
        // (x-ignore-shared): a snapshot is only the devices' state, and a
        // restore takes the memory from the file.
        Memory::File { shared, .. } => {
            push(&[
                "-object",
                &format!(
                    "memory-backend-file,id=mem,size={mem},mem-path=/proc/self/fd/{MEMORY_FD},share={}",
                    if *shared { "on" } else { "off" }
                ),
            ]);
        }
    }
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
    ]);
    // QEMU's seccomp sandbox: a guest that breaks out of the emulator still cannot exec,
    // raise privileges, change scheduling or use obsolete system calls.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    match &cfg.staged {
        // Inherited sealed memfds (see `inherited_fds`): no disk read.
        Some(_) => {
            push(&["-kernel", &format!("/proc/self/fd/{KERNEL_FD}")]);
            push(&["-initrd", &format!("/proc/self/fd/{INITRD_FD}")]);
        }
        None => {
            push(&["-kernel", &cfg.kernel.display().to_string()]);
            push(&["-initrd", &cfg.initrd.display().to_string()]);
        }
    }
    push(&["-append", &kernel_cmdline(cfg)]);
    // "file:" takes the rest of the argument as the path: no comma doubling here.
    push(&["-serial", &format!("file:{}", paths.console.display())]);
    for (i, d) in cfg.disks.iter().enumerate() {
        // A write that finds the host's file system full fails in the guest
        // (an I/O error on its disk) rather than stopping the whole VM, as
        // QEMU's default `werror=enospc` would: a stopped VM's vhost-user
        // vsock backend (vhost-device-vsock 0.3.0) takes no traffic again
        // after QEMU resumes it, so the container's output, exit and stop
        // would be lost with it. A container sees a full disk as an error,
        // as it would on any host.
        push(&[
            "-drive",
            &format!(
                "id=d{i},file={},format={},if=none,readonly={},cache=writeback{}",
                opt_value(&d.path),
                d.format(),
                if d.read_only { "on" } else { "off" },
                if d.read_only { "" } else { ",werror=report" }
            ),
        ]);
        push(&[
            "-device",
            &format!("virtio-blk-device,drive=d{i},serial={}", d.serial),
        ]);
    }
    match cfg.link {
        Link::Vsock => {
            push(&[
                "-chardev",
                &format!("socket,id=vs0,path={}", opt_value(&paths.vhost_vsock)),
            ]);
            push(&["-device", "vhost-user-vsock-device,chardev=vs0"]);
        }
        Link::Serial => {
            push(&["-device", "virtio-serial-device,max_ports=2"]);
            // Like QMP's, the listening socket is the shim's, inherited
            // (when QMP's is): QEMU creates nothing in the VM's directory.
            let chardev = match qmp_fd {
                Some(_) => format!("socket,id=link0,fd={SERIAL_FD},server=on,wait=off"),
                None => format!(
                    "socket,id=link0,path={},server=on,wait=off",
                    opt_value(&paths.serial)
                ),
            };
            push(&["-chardev", &chardev]);
            push(&["-device", "virtserialport,chardev=link0,name=vmlet"]);
        }
    }
    if cfg.incoming.is_some() {
        // The state comes once QMP has set x-ignore-shared (see `restore`).
        push(&["-incoming", "defer"]);
    }
    match qmp_fd {
        Some(fd) => {
            push(&[
                "-chardev",
                &format!("socket,id=qmp,fd={fd},server=on,wait=off"),
            ]);
            push(&["-mon", "chardev=qmp,mode=control"]);
        }
        None => push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", opt_value(&paths.qmp)),
        ]),
    }
    a
}

/// Where QEMU finds a staged kernel and initrd, and its QMP listening socket, among its
/// descriptors.
const KERNEL_FD: i32 = 100;
const INITRD_FD: i32 = 101;
const QMP_FD: i32 = 102;
/// Where QEMU finds a [`Memory::File`].
const MEMORY_FD: i32 = 103;
/// Where QEMU reads the state to restore ([`VmConfig::incoming`]).
const INCOMING_FD: i32 = 104;
/// The listening socket of a [`Link::Serial`].
const SERIAL_FD: i32 = 105;

/// The descriptors QEMU must inherit for `cfg`: the QMP listener, the
/// serial link's, and this start's own open description of
/// [`VmConfig::incoming`].
fn inherited_fds(
    cfg: &VmConfig,
    qmp: &std::os::unix::net::UnixListener,
    serial: Option<&std::os::unix::net::UnixListener>,
    incoming: Option<&File>,
) -> Vec<crate::staged::Inherit> {
    use std::os::fd::AsRawFd;
    let qmp = crate::staged::Inherit {
        from: qmp.as_raw_fd(),
        to: QMP_FD,
    };
    let mut extra = Vec::new();
    if let Memory::File { file, .. } = &cfg.memory {
        extra.push(crate::staged::Inherit {
            from: file.as_fd().as_raw_fd(),
            to: MEMORY_FD,
        });
    }
    if let Some(f) = incoming {
        extra.push(crate::staged::Inherit {
            from: f.as_raw_fd(),
            to: INCOMING_FD,
        });
    }
    if let Some(l) = serial {
        extra.push(crate::staged::Inherit {
            from: l.as_raw_fd(),
            to: SERIAL_FD,
        });
    }
    let mut v = match &cfg.staged {
        Some((k, i)) => vec![
            crate::staged::Inherit {
                from: k.as_fd().as_raw_fd(),
                to: KERNEL_FD,
            },
            crate::staged::Inherit {
                from: i.as_fd().as_raw_fd(),
                to: INITRD_FD,
            },
        ],
        None => Vec::new(),
    };
    v.push(qmp);
    v.extend(extra);
    v
}

/// Rejects what QEMU would reject later, or worse, misread.
pub fn validate(cfg: &VmConfig, paths: &VmPaths) -> Result<(), Error> {
    let bad = |m: String| Err(Error::InvalidConfig(m));
    if cfg.id.is_empty() {
        return bad("the VM id is empty".into());
    }
    if cfg.memory_mib < 32 {
        return bad(format!("{} MiB of memory is too little", cfg.memory_mib));
    }
    if cfg.vcpus == 0 || cfg.vcpus > 255 {
        return bad(format!("{} vCPUs is out of range 1..=255", cfg.vcpus));
    }
    // 0-2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
    if cfg.cid < 3 || cfg.cid == u32::MAX {
        return bad(format!("vsock CID {} is reserved", cfg.cid));
    }
    if !cfg.dir.is_dir() {
        return bad(format!(
            "the VM directory {} does not exist",
            cfg.dir.display()
        ));
    }
    for (what, p) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
        if cfg.staged.is_none() && !p.is_file() {
            return bad(format!("the {what} {} does not exist", p.display()));
        }
    }
    if cfg.incoming.is_some() && !matches!(cfg.memory, Memory::File { .. }) {
        return bad("a restore needs its template's memory file".into());
    }
    for p in [
        &paths.qmp,
        &paths.vhost_vsock,
        &cfg.vsock_uds,
        &paths.serial,
    ] {
        if p.as_os_str().len() > MAX_SOCKET_PATH {
            return bad(format!(
                "the socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                p.display()
            ));
        }
    }
    if cfg.cmdline.contains('\0') {
        return bad("the kernel command line holds a NUL byte".into());
    }
    for d in &cfg.disks {
        if d.serial.is_empty()
            || d.serial.len() > 20
            || !d
                .serial
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return bad(format!(
                "disk serial {:?} is not 1 to 20 characters of [A-Za-z0-9._-]",
                d.serial
            ));
        }
        if !d.path.exists() {
            return bad(format!("the disk {} does not exist", d.path.display()));
        }
    }
    Ok(())
}

/// Finds `name` in PATH, then in cargo's bin directories (where `cargo install` puts
/// vhost-device-vsock).
pub fn find_program(name: &str) -> Option<PathBuf> {
    find_program_for(name, None)
}

/// Like [`find_program`], but only a program `cred` may run: root's `~/.cargo/bin` is no
/// use to an unprivileged VMM user.
pub fn find_program_for(name: &str, cred: Option<&Credentials>) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(c) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(c).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.push("/usr/local/cargo/bin".into());
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        is_executable(p) && cred.is_none_or(|c| crate::confine::check_access(p, c, 1).is_ok())
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The QEMU microvm backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    vsock_backend: PathBuf,
    qmp_timeout: Duration,
    backend_timeout: Duration,
    version: String,
    confinement: Confinement,
}

impl Qemu {
    /// Finds `qemu-system-x86_64` and `vhost-device-vsock` ([`find_program`]); the
    /// environment variables `VMLET_QEMU` and `VMLET_VSOCK_BACKEND` name them instead.
    pub fn new() -> Result<Self, Error> {
        Self::confined(Confinement::default())
    }

    /// Like [`Qemu::new`], with VMMs confined as `confinement` says; the programs found are
    /// ones the VMM's user may run, and a named one it may not run is an error.
    pub fn confined(confinement: Confinement) -> Result<Self, Error> {
        let cred = confinement.credentials();
        let find = |var: &str, name: &'static str| -> Result<PathBuf, Error> {
            let p = std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| find_program_for(name, cred.as_ref()))
                .ok_or(Error::BinaryNotFound { name })?;
            if let Some(c) = &cred {
                crate::confine::check_access(&p, c, 1).map_err(|why| {
                    Error::InvalidConfig(format!("the VMM's user cannot run {name}: {why}"))
                })?;
            }
            Ok(p)
        };
        Ok(Self::with_binaries(
            find("VMLET_QEMU", "qemu-system-x86_64")?,
            find("VMLET_VSOCK_BACKEND", "vhost-device-vsock")?,
        )
        .with_confinement(confinement))
    }

    /// Confines VMMs as `c` says (by default they run as the agent, without cgroups).
    pub fn with_confinement(mut self, c: Confinement) -> Self {
        self.confinement = c;
        self
    }

    /// How VMMs are confined.
    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// Uses the given programs.
    pub fn with_binaries(binary: PathBuf, vsock_backend: PathBuf) -> Self {
        let version = probe_version(&binary).unwrap_or_else(|| "unknown".into());
        Qemu {
            binary,
            vsock_backend,
            qmp_timeout: Duration::from_secs(10),
            backend_timeout: Duration::from_secs(5),
            version,
            confinement: Confinement::default(),
        }
    }

    /// How long QEMU may take from spawn to answering on QMP (default 10 s).
    pub fn with_qmp_timeout(mut self, t: Duration) -> Self {
        self.qmp_timeout = t;
        self
    }

    /// How long vhost-device-vsock may take to create its socket (default 5 s).
    pub fn with_backend_timeout(mut self, t: Duration) -> Self {
        self.backend_timeout = t;
        self
    }

    /// The QEMU program.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The vsock backend program.
    pub fn vsock_backend(&self) -> &Path {
        &self.vsock_backend
    }
}

/// `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)` from `QEMU emulator version 7.2.22 (Debian ...)`.
/// Bounded in time: a program that hangs must not hang the agent's startup.
fn probe_version(binary: &Path) -> Option<String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    // At most 4 KiB: the first line is all that is wanted.
    child
        .stdout
        .take()?
        .take(4096)
        .read_to_string(&mut out)
        .ok()?;
    parse_version(&out)
}

fn parse_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let v = line.split_once("version ")?.1.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

/// The last `max_lines` lines of `path` written at or after byte `from` (at most 4 KiB).
fn log_tail(path: &Path, from: u64, max_lines: usize) -> String {
    const MAX: u64 = 4096;
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(MAX));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(MAX).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

#[async_trait]
impl Vmm for Qemu {
    fn name(&self) -> &str {
        "qemu"
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            snapshot: true,
            hybrid_vsock: true,
        }
    }

    async fn adopt(
        &self,
        cfg: &VmConfig,
        vmm_pid: u32,
        helper_pids: &[u32],
    ) -> Result<Box<dyn VmHandle>, Error> {
        self.adopt_inner(cfg, vmm_pid, helper_pids).await
    }

    async fn start(&self, cfg: &VmConfig) -> Result<Box<dyn VmHandle>, Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let paths = VmPaths::for_config(cfg);
        validate(cfg, &paths)?;
        let cred = self.confinement.credentials_for(cfg.cid);
        let log = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&paths.log)
            .map_err(|e| Error::io(format!("cannot open {}", paths.log.display()), e))?;
        // Only this start's lines explain its failure.
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let fail = |stage: &'static str, source: Error| Error::Start {
            id: cfg.id.clone(),
            stage,
            log_tail: log_tail(&paths.log, log_start, 20),
            source: Box::new(source),
        };
        let t0 = Instant::now();

        // Until the handle exists, a failed or dropped start must not leave processes,
        // sockets or a cgroup behind.
        let mut undo = process::Undo::default();
        vsock_backend::remove_socket(&paths.qmp).map_err(|e| {
            fail(
                "preparing its directory",
                Error::io(format!("cannot remove {}", paths.qmp.display()), e),
            )
        })?;
        let qmp_listener = std::os::unix::net::UnixListener::bind(&paths.qmp).map_err(|e| {
            fail(
                "preparing its directory",
                Error::io(format!("cannot listen on {}", paths.qmp.display()), e),
            )
        })?;
        undo.socket(&paths.qmp);
        // A serial link's listening socket is the shim's too (the agent,
        // root, connects to it; QEMU only inherits it).
        let serial_listener = match cfg.link {
            Link::Serial => {
                let _ = vsock_backend::remove_socket(&paths.serial);
                match std::os::unix::net::UnixListener::bind(&paths.serial) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        undo.run().await;
                        return Err(fail(
                            "preparing its directory",
                            Error::io(format!("cannot listen on {}", paths.serial.display()), e),
                        ));
                    }
                }
            }
            Link::Vsock => None,
        };
        undo.socket(&paths.serial);
        if let Some(c) = &cred {
            if let Err(e) = hand_over(cfg, &paths, c) {
                undo.run().await;
                return Err(fail("giving the VMM's user its files", e));
            }
        }
        let limits = self.confinement.limits(cfg.memory_mib, cfg.vcpus);
        let cgroup = match self.confinement.cgroups.create(&cfg.id, &limits) {
            Ok(c) => c,
            Err(e) => {
                undo.run().await;
                return Err(fail("creating its cgroup", e.into()));
            }
        };
        if let Some(cg) = &cgroup {
            undo.cgroup(cg);
        }
        let procs = match cgroup.as_ref().map(VmCgroup::open_procs).transpose() {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => {
                undo.run().await;
                return Err(fail("creating its cgroup", e.into()));
            }
        };
        let jail = Jail {
            procs,
            credentials: cred.clone(),
        };

        let backend = match cfg.link {
            Link::Vsock => match VsockBackend::spawn(
                &self.vsock_backend,
                cfg.cid,
                &paths.vhost_vsock,
                &cfg.vsock_uds,
                &log,
                self.backend_timeout,
                &jail,
            )
            .await
            {
                Ok(b) => Some(b),
                Err(e) => {
                    undo.run().await;
                    return Err(fail("starting the vsock backend", e.into()));
                }
            },
            Link::Serial => None,
        };
        let t_backend = t0.elapsed();
        if let Some(b) = &backend {
            undo.process(b.process());
            undo.socket(&paths.vhost_vsock);
            undo.socket(&cfg.vsock_uds);
        }

        let incoming = match cfg.incoming.as_ref().map(StagedFile::reopen).transpose() {
            Ok(f) => f,
            Err(e) => {
                undo.run().await;
                return Err(fail(
                    "opening the state to restore",
                    Error::io("cannot reopen the staged state", e),
                ));
            }
        };
        let args = argv(cfg, &paths, Some(QMP_FD));
        tracing::debug!(id = %cfg.id, binary = %self.binary.display(), ?args, "spawning QEMU");
        let spawned = Process::spawn(
            "qemu",
            &self.binary,
            &args,
            &log,
            &inherited_fds(
                cfg,
                &qmp_listener,
                serial_listener.as_ref(),
                incoming.as_ref(),
            ),
            &jail,
        );
        // QEMU holds the listening sockets now; without these copies, a QEMU that dies
        // before accepting makes connections fail at once rather than hang.
        drop(qmp_listener);
        drop(serial_listener);
        drop(jail);
        let qemu = match spawned {
            Ok(p) => p,
            Err(e) => {
                undo.run().await;
                return Err(fail(
                    "spawning QEMU",
                    Error::io(format!("cannot run {}", self.binary.display()), e),
                ));
            }
        };
        undo.process(&qemu);
        let t_spawned = Instant::now();

        let qmp =
            QmpClient::connect_retry(&paths.qmp, self.qmp_timeout, || qemu.exited().is_some())
                .await;
        let qmp = match qmp {
            Ok(c) if cfg.incoming.is_some() => restore(c).await,
            other => other,
        };
        let qmp = match qmp {
            Ok(c) => c,
            Err(e) => {
                // Exited by itself: its exit (and the log) is the story. Still running: the
                // QMP error is, and the SIGKILL is only tidying up. A QEMU that dies as it
                // starts breaks the connection before its reaper has seen the exit: give that
                // a moment.
                let exited = match qemu.exited() {
                    Some(x) => Some(x),
                    None => qemu.wait_timeout(Duration::from_millis(500)).await,
                };
                let source = match &exited {
                    Some(exit) => Error::Exited(vm_exit(exit, cgroup.as_ref())),
                    None => e.into(),
                };
                undo.run().await;
                return Err(fail("waiting for QEMU's QMP socket", source));
            }
        };
        tracing::debug!(
            id = %cfg.id,
            pid = qemu.pid(),
            backend_ms = t_backend.as_millis() as u64,
            qmp_ms = t_spawned.elapsed().as_millis() as u64,
            "QEMU answers on QMP"
        );
        drop(incoming);
        undo.disarm();
        let info = self.info(cred.as_ref(), cgroup.as_ref());
        Ok(Box::new(QemuHandle {
            id: cfg.id.clone(),
            qemu,
            backend,
            paths,
            qmp: Mutex::new(Some(qmp)),
            cgroup,
            info,
        }))
    }

    async fn reclaim(&self, live: &std::collections::HashSet<String>) {
        let removed = self.confinement.cgroups.reclaim(live).await;
        if !removed.is_empty() {
            tracing::info!(cgroups = ?removed, "removed cgroups no VM owns any more");
        }
    }
}

/// Gives the VMM's user what QEMU and the vsock backend open or create, and checks it can
/// reach the rest; the VM's own directory stays the agent's.
///
/// - writable disks become its own, mode 0600: other users (and, with per-VM users, other
///   VMs) cannot read or write them;
/// - `console.log` is created for it, since QEMU opens it by name;
/// - the directory of [`VmConfig::vsock_uds`] becomes its own, mode 0700: vhost-device-vsock
///   creates its sockets there, and the agent's hybrid-vsock listeners in it (`<uds>_<port>`)
///   become its own so the backend may connect to them. That directory must not be the VM's
///   directory, where the agent keeps files the VMM must not replace;
/// - read-only disks and an unstaged kernel and initrd must be readable by it as they are
///   (layer disks are shared by every VM and stay the agent's).
///
/// Nothing here follows a symbolic link: files are opened with `O_NOFOLLOW` and changed
/// through their descriptors, and socket owners are changed with lchown.
fn hand_over(cfg: &VmConfig, paths: &VmPaths, cred: &Credentials) -> Result<(), Error> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let owner = |f: &File, p: &Path| -> Result<(), Error> {
        std::os::unix::fs::fchown(f, Some(cred.uid), Some(cred.gid)).map_err(|e| {
            Error::io(
                format!("cannot give {} to uid {}", p.display(), cred.uid),
                e,
            )
        })?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("cannot set the mode of {}", p.display()), e))
    };
    let access = |p: &Path, want: u32| {
        crate::confine::check_access(p, cred, want).map_err(|why| {
            Error::InvalidConfig(format!("the VMM's user cannot reach its files: {why}"))
        })
    };
    access(&cfg.dir, 1)?;
    for d in cfg.disks.iter().filter(|d| !d.read_only) {
        let f = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&d.path)
            .map_err(|e| Error::io(format!("cannot open {}", d.path.display()), e))?;
        owner(&f, &d.path)?;
        access(&d.path, 6)?;
    }
    for d in cfg.disks.iter().filter(|d| d.read_only) {
        access(&d.path, 4)?;
    }
    if cfg.staged.is_none() {
        access(&cfg.kernel, 4)?;
        access(&cfg.initrd, 4)?;
    }
    let console = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&paths.console)
        .map_err(|e| Error::io(format!("cannot create {}", paths.console.display()), e))?;
    owner(&console, &paths.console)?;
    let uds_dir = cfg
        .vsock_uds
        .parent()
        .filter(|d| *d != cfg.dir && d.starts_with(&cfg.dir))
        .ok_or_else(|| {
            Error::InvalidConfig(format!(
                "the hybrid-vsock socket {} must be in a directory of its own below {}, \
                 which the VMM's user may write",
                cfg.vsock_uds.display(),
                cfg.dir.display()
            ))
        })?;
    std::fs::create_dir_all(uds_dir)
        .map_err(|e| Error::io(format!("cannot create {}", uds_dir.display()), e))?;
    let ids = (Some(cred.uid), Some(cred.gid));
    std::os::unix::fs::lchown(uds_dir, ids.0, ids.1).map_err(|e| {
        Error::io(
            format!("cannot give {} to uid {}", uds_dir.display(), cred.uid),
            e,
        )
    })?;
    // A directory below the VM's, which only the agent can change: its name cannot be
    // swapped for a link between the lchown above and this.
    std::fs::set_permissions(uds_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("cannot set the mode of {}", uds_dir.display()), e))?;
    grant_listeners(cfg, cred)
}

/// Makes the agent's hybrid-vsock listeners (`<uds>_<port>`) the VMM user's, so the vsock
/// backend may connect to them.
fn grant_listeners(cfg: &VmConfig, cred: &Credentials) -> Result<(), Error> {
    use std::os::unix::fs::FileTypeExt;
    let (Some(dir), Some(name)) = (cfg.vsock_uds.parent(), cfg.vsock_uds.file_name()) else {
        return Ok(());
    };
    let prefix = format!("{}_", name.to_string_lossy());
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
    for e in entries.flatten() {
        let is_listener = e.file_name().to_string_lossy().starts_with(&prefix)
            && e.file_type().is_ok_and(|t| t.is_socket());
        if is_listener {
            std::os::unix::fs::lchown(e.path(), Some(cred.uid), Some(cred.gid)).map_err(|err| {
                Error::io(
                    format!("cannot give {} to uid {}", e.path().display(), cred.uid),
                    err,
                )
            })?;
        }
    }
    Ok(())
}

impl Qemu {
    /// What a VM started now is confined by.
    fn info(&self, cred: Option<&Credentials>, cgroup: Option<&VmCgroup>) -> ConfinementInfo {
        let (user, ids) = match cred {
            Some(c) => (self.confinement.name_of(c), c.clone()),
            None => {
                let me = VmmUser::agent();
                (me.name, me.credentials)
            }
        };
        let mut notes = Vec::new();
        if cred.is_none() {
            notes.push(format!(
                "runs as the agent's user ({})",
                self.confinement.user_note.as_deref().unwrap_or("asked for")
            ));
        }
        if cgroup.is_none() {
            notes.push(self.confinement.cgroups.describe());
        }
        ConfinementInfo {
            user,
            uid: ids.uid,
            gid: ids.gid,
            cgroup: cgroup.map(VmCgroup::info),
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        }
    }

    async fn adopt_inner(
        &self,
        cfg: &VmConfig,
        vmm_pid: u32,
        helper_pids: &[u32],
    ) -> Result<Box<dyn VmHandle>, Error> {
        let paths = VmPaths::for_config(cfg);
        let adopt_err = |what: String, e: std::io::Error| Error::io(what, e);
        // QEMU names its console file, in the VM's directory, in its arguments: that ties
        // the pid to this VM.
        let console = format!("file:{}", paths.console.display());
        let qemu = Process::adopt("qemu", vmm_pid, &console)
            .map_err(|e| adopt_err(format!("cannot adopt QEMU (pid {vmm_pid})"), e))?;
        let backend = match (cfg.link, helper_pids) {
            (Link::Vsock, &[backend_pid]) => Some(
                VsockBackend::adopt(backend_pid, &paths.vhost_vsock, &cfg.vsock_uds).map_err(
                    |e| {
                        adopt_err(
                            format!("cannot adopt the vsock backend (pid {backend_pid})"),
                            e,
                        )
                    },
                )?,
            ),
            (Link::Serial, &[]) => None,
            _ => {
                return Err(Error::InvalidConfig(format!(
                    "a VM linked by {:?} cannot have the helper pids {helper_pids:?}",
                    cfg.link
                )))
            }
        };
        // The cgroup the earlier agent made, if QEMU is in it.
        let cgroup = self
            .confinement
            .cgroups
            .find(&cfg.id)
            .filter(|c| c.holds(vmm_pid));
        // Whoever it runs as, the listener the agent bound again must be open to it.
        let ids = proc_ids(vmm_pid);
        if let Some((uid, gid)) = ids.filter(|(u, _)| *u != nix::unistd::geteuid().as_raw()) {
            let cred = Credentials {
                uid,
                gid,
                groups: Vec::new(),
            };
            if let Err(e) = grant_listeners(cfg, &cred) {
                tracing::warn!(id = %cfg.id, error = %e, "cannot open the vsock listeners to the adopted VMM");
            }
        }
        let (uid, gid) = ids.unwrap_or((u32::MAX, u32::MAX));
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        let info = ConfinementInfo {
            user,
            uid,
            gid,
            cgroup: cgroup.as_ref().map(VmCgroup::info),
            note: cgroup
                .is_none()
                .then(|| "adopted from an earlier agent: not in a cgroup of this agent".into()),
        };
        tracing::info!(id = %cfg.id, pid = vmm_pid, backend_pid = ?backend.as_ref().map(VsockBackend::pid), cgroup = cgroup.is_some(), "adopted a running VM");
        Ok(Box::new(QemuHandle {
            id: cfg.id.clone(),
            qemu,
            backend,
            paths,
            // Connected on first use; QEMU accepts a new monitor client once the old one left.
            qmp: Mutex::new(None),
            cgroup,
            info,
        }))
    }
}

/// The real uid and gid of a process, from /proc.
fn proc_ids(pid: u32) -> Option<(u32, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| -> Option<u32> {
        s.lines()
            .find_map(|l| l.strip_prefix(k))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// How QEMU ended. A QEMU killed while its cgroup records an OOM kill was killed by the
/// kernel for reaching the VM's memory limit, and says so.
fn vm_exit(exit: &process::Exit, cgroup: Option<&VmCgroup>) -> VmExit {
    use std::os::unix::process::ExitStatusExt;
    let (code, signal) = match exit {
        Ok(st) => (st.code(), st.signal()),
        Err(_) => (None, None),
    };
    // An adopted QEMU's status is unknown (Err): the counter alone tells.
    let killed = signal == Some(libc::SIGKILL) || exit.is_err();
    let oom = killed && cgroup.is_some_and(|c| c.oom_kills() > 0);
    let description = match cgroup.filter(|_| oom) {
        Some(c) => format!(
            "QEMU was killed by the kernel's OOM killer: the VM reached its cgroup's memory \
             limit of {} MiB (guest memory plus the VMM's overhead)",
            c.info().limits.memory_bytes >> 20
        ),
        None => process::describe("QEMU", exit),
    };
    VmExit {
        code,
        signal,
        oom_killed: oom,
        description,
    }
}

/// A QEMU VM started by [`Qemu`].
#[derive(Debug)]
struct QemuHandle {
    id: String,
    qemu: Process,
    /// None for a VM linked by [`Link::Serial`].
    backend: Option<VsockBackend>,
    paths: VmPaths,
    /// One QMP session at a time (QEMU serves one); None after an error, reconnected lazily.
    qmp: Mutex<Option<QmpClient>>,
    /// The VM's cgroup, removed by cleanup.
    cgroup: Option<VmCgroup>,
    info: ConfinementInfo,
}

/// Migration skips shared RAM: a snapshot holds only the devices' state,
/// and a restore takes guest memory from the memory file.
fn ignore_shared() -> Value {
    serde_json::json!({
        "capabilities": [{ "capability": "x-ignore-shared", "state": true }]
    })
}

/// Starts loading the state QEMU inherited at [`INCOMING_FD`]; QEMU runs
/// the guest as soon as it is loaded.
async fn restore(mut c: QmpClient) -> Result<QmpClient, qmp::Error> {
    c.execute("migrate-set-capabilities", Some(ignore_shared()))
        .await?;
    c.execute(
        "migrate-incoming",
        Some(serde_json::json!({ "uri": format!("fd:{INCOMING_FD}") })),
    )
    .await?;
    Ok(c)
}

/// The most device state a snapshot may hold.
const MAX_STATE: u64 = 16 << 20;

/// How long one QMP command may take before the session is dropped.
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

impl QemuHandle {
    fn exited_error(&self) -> Option<Error> {
        self.qemu
            .exited()
            .map(|e| Error::Exited(vm_exit(&e, self.cgroup.as_ref())))
    }

    async fn qmp(&self, command: &str, args: Option<Value>) -> Result<Value, Error> {
        if let Some(e) = self.exited_error() {
            return Err(e);
        }
        let mut guard = self.qmp.lock().await;
        let r = tokio::time::timeout(QMP_COMMAND_TIMEOUT, async {
            let c = match guard.take() {
                Some(c) if !c.is_desynchronized() => guard.insert(c),
                _ => guard.insert(QmpClient::connect(&self.paths.qmp).await?),
            };
            c.execute(command, args).await
        })
        .await
        .unwrap_or(Err(qmp::Error::Io(std::io::ErrorKind::TimedOut.into())));
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                // The session may be mid-message: start afresh next time.
                *guard = None;
                drop(guard);
                if let qmp::Error::Command { .. } = e {
                    return Err(e.into());
                }
                // A broken connection usually means QEMU is exiting; say so if it has.
                if let Some(exit) = self.qemu.wait_timeout(Duration::from_millis(200)).await {
                    return Err(Error::Exited(vm_exit(&exit, self.cgroup.as_ref())));
                }
                Err(e.into())
            }
        }
    }
}

#[async_trait]
impl VmHandle for QemuHandle {
    fn pid(&self) -> Option<u32> {
        Some(self.qemu.pid())
    }

    fn helper_pids(&self) -> Vec<u32> {
        self.backend.iter().map(VsockBackend::pid).collect()
    }

    async fn wait(&self) -> VmExit {
        vm_exit(&self.qemu.wait().await, self.cgroup.as_ref())
    }

    fn confinement(&self) -> Option<ConfinementInfo> {
        Some(self.info.clone())
    }

    async fn stop(&self, timeout: Duration) -> Result<(), Error> {
        if self.qemu.exited().is_some() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        // "quit" makes QEMU flush its disks and exit; the reply may be lost as it goes. A hung
        // monitor gets no more than the caller's timeout; SIGTERM does the same as "quit".
        let quit = tokio::time::timeout_at(deadline, self.qmp("quit", None)).await;
        if !matches!(quit, Ok(Ok(_))) {
            tracing::debug!(id = %self.id, ?quit, "QMP quit failed: sending SIGTERM");
            self.qemu.signal(Signal::SIGTERM).await;
        }
        if tokio::time::timeout_at(deadline, self.qemu.wait())
            .await
            .is_ok()
        {
            return Ok(());
        }
        tracing::warn!(id = %self.id, ?timeout, "QEMU did not quit in time: SIGKILL");
        match self.qemu.kill_and_reap(Duration::from_secs(5)).await {
            Some(_) => Ok(()),
            None => Err(Error::Timeout(Duration::from_secs(5))),
        }
    }

    async fn kill(&self) -> Result<(), Error> {
        self.qemu.signal(Signal::SIGKILL).await;
        Ok(())
    }

    async fn status(&self) -> Result<String, Error> {
        let r = self.qmp("query-status", None).await?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::Qmp(qmp::Error::BadReply {
                    command: "query-status".into(),
                    reply: r.to_string(),
                })
            })
    }

    async fn pause(&self) -> Result<(), Error> {
        self.qmp("stop", None).await.map(drop)
    }

    async fn resume(&self) -> Result<(), Error> {
        self.qmp("cont", None).await.map(drop)
    }

    async fn snapshot(&self) -> Result<Vec<u8>, Error> {
        // Not paused first: the state records the run state, and a clone
        // of a paused VM would wake paused. Migration pauses the VM itself
        // when it completes; with the RAM skipped, that is at once.
        self.qmp("migrate-set-capabilities", Some(ignore_shared()))
            .await?;
        // QEMU's sandbox forbids "exec:" and an "fd:" needs descriptor
        // passing: QEMU connects to a socket of ours and streams the state.
        let path = &self.paths.migrate;
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)
            .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
        // QEMU may run as the VMM's user: it must be able to connect.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| Error::io(format!("cannot open {} to the VMM", path.display()), e))?;
        let uri = format!("unix:{}", path.display());
        let read = async {
            let (mut s, _) = listener.accept().await?;
            let mut state = Vec::new();
            // The devices' state is tens of KiB; memory is not in it.
            tokio::io::AsyncReadExt::read_to_end(
                &mut tokio::io::AsyncReadExt::take(&mut s, MAX_STATE),
                &mut state,
            )
            .await?;
            Ok::<_, std::io::Error>(state)
        };
        // QEMU connects while it starts the migration; the connection
        // waits in the listener's backlog until it is accepted.
        let started = self
            .qmp("migrate", Some(serde_json::json!({ "uri": uri })))
            .await;
        if let Err(e) = started {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        let state = tokio::time::timeout(QMP_COMMAND_TIMEOUT, read).await;
        let _ = std::fs::remove_file(path);
        let state = match state {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Error::io("reading the VM's state failed", e)),
            Err(_) => {
                return Err(Error::io(
                    "reading the VM's state failed",
                    std::io::ErrorKind::TimedOut.into(),
                ))
            }
        };
        let deadline = Instant::now() + QMP_COMMAND_TIMEOUT;
        loop {
            let r = self.qmp("query-migrate", None).await?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => break,
                Some("failed") | Some("cancelled") | None => {
                    return Err(Error::Qmp(qmp::Error::BadReply {
                        command: "migrate".into(),
                        reply: r.to_string(),
                    }))
                }
                _ if Instant::now() > deadline => {
                    return Err(Error::Timeout(QMP_COMMAND_TIMEOUT));
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        if state.len() as u64 >= MAX_STATE {
            return Err(Error::InvalidConfig(format!(
                "the VM's state is larger than {MAX_STATE} bytes: is its memory shared?"
            )));
        }
        Ok(state)
    }

    async fn cleanup(&self) {
        if self.qemu.exited().is_none() {
            tracing::debug!(id = %self.id, "cleanup of a running VM: killing QEMU");
            if self
                .qemu
                .kill_and_reap(Duration::from_secs(5))
                .await
                .is_none()
            {
                tracing::warn!(id = %self.id, pid = self.qemu.pid(), "QEMU survived SIGKILL for 5 s");
            }
        }
        *self.qmp.lock().await = None;
        if let Some(b) = &self.backend {
            b.shutdown().await;
        }
        for p in [&self.paths.qmp, &self.paths.serial, &self.paths.migrate] {
            if let Err(e) = vsock_backend::remove_socket(p) {
                tracing::warn!(id = %self.id, error = %e, path = %p.display(), "cannot remove a socket");
            }
        }
        // Last: the cgroup can go once nothing is left in it.
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.remove().await {
                tracing::warn!(id = %self.id, error = %e, "cannot remove the VM's cgroup");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Disk;

    fn cfg(accel: Accel) -> VmConfig {
        VmConfig {
            id: "vm1".into(),
            dir: "/run/vmlet/vm1".into(),
            kernel: "/g/vmlinux".into(),
            initrd: "/g/initrd".into(),
            cmdline: " vmlet.port=1024 ".into(),
            acpi: true,
            apic_timer_hz: None,
            memory_mib: 256,
            vcpus: 2,
            cid: 5,
            disks: vec![
                Disk {
                    path: "/img/layer,0.erofs".into(),
                    serial: "layer0".into(),
                    read_only: true,
                },
                Disk {
                    path: "/run/vmlet/vm1/rw.img".into(),
                    serial: "rw".into(),
                    read_only: false,
                },
            ],
            accel,
            vsock_uds: "/run/vmlet/vm1/vsock.sock".into(),
            link: Default::default(),
            memory: Default::default(),
            incoming: None,
            staged: None,
        }
    }

    /// The value after each occurrence of `flag`.
    fn values<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_guests_are_told_the_hosts_tsc_rate() {
        let steady = "processor\t: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc rdtscp\n";
        assert_eq!(
            tsc_hints(Some(2_300_000), steady),
            "tsc_early_khz=2300000 lpj=9200000 no_timer_check tsc=reliable"
        );
        // A TSC that may change rate or stop is told but left to the watchdog.
        let drifting = "flags\t\t: fpu tsc constant_tsc\n";
        assert_eq!(
            tsc_hints(Some(2_300_000), drifting),
            "tsc_early_khz=2300000 lpj=9200000 no_timer_check"
        );
        assert_eq!(tsc_hints(None, steady), TCG_TIMER_HINTS);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_hosts_tsc_rate_is_measured() {
        // Two measurements agree within 1 %, far inside the skew at which a guest's clock
        // watchdog gives up on its TSC (the old fixed rate was 15 % off here).
        let a = host_tsc_khz().expect("a plausible TSC rate") as f64;
        let b = host_tsc_khz().expect("a plausible TSC rate") as f64;
        assert!((a - b).abs() / a < 1e-2, "{a} kHz, then {b} kHz");
    }

    #[test]
    fn argv_for_tcg() {
        let c = cfg(Accel::Tcg);
        let a = argv(&c, &VmPaths::new(&c.dir), Some(102));
        assert_eq!(
            values(&a, "-M"),
            ["microvm,x-option-roms=off,rtc=on,pit=on,pic=on,memory-backend=mem"]
        );
        // A bounded translation cache keeps QEMU's own memory under its cgroup's limit.
        assert_eq!(values(&a, "-accel"), ["tcg,tb-size=128"]);
        assert!(values(&a, "-sandbox")[0].starts_with("on,"));
        assert_eq!(values(&a, "-cpu"), ["max"]);
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(values(&a, "-m"), ["256M"]);
        assert_eq!(
            values(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=256M,share=on"]
        );
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert_eq!(a.iter().filter(|x| *x == flag).count(), 1, "{flag}");
        }
        assert_eq!(values(&a, "-display"), ["none"]);
        assert_eq!(values(&a, "-kernel"), ["/g/vmlinux"]);
        assert_eq!(values(&a, "-initrd"), ["/g/initrd"]);
        assert_eq!(
            values(&a, "-append"),
            [format!(
                "console=ttyS0 {} panic=-1 reboot=t quiet vmlet.port=1024",
                tcg_timer_hints()
            )]
        );
        assert_eq!(values(&a, "-serial"), ["file:/run/vmlet/vm1/console.log"]);
        assert_eq!(
            values(&a, "-drive"),
            [
                // The comma in the path is doubled, as QEMU's option syntax wants.
                "id=d0,file=/img/layer,,0.erofs,format=raw,if=none,readonly=on,cache=writeback",
                "id=d1,file=/run/vmlet/vm1/rw.img,format=raw,if=none,readonly=off,cache=writeback,werror=report",
            ]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-blk-device,drive=d0,serial=layer0",
                "virtio-blk-device,drive=d1,serial=rw",
                "vhost-user-vsock-device,chardev=vs0",
            ]
        );
        assert_eq!(
            values(&a, "-chardev"),
            [
                "socket,id=vs0,path=/run/vmlet/vm1/vhost-vsock.sock",
                // QMP on the listening socket the shim bound and QEMU inherits.
                "socket,id=qmp,fd=102,server=on,wait=off",
            ]
        );
        assert_eq!(values(&a, "-mon"), ["chardev=qmp,mode=control"]);
        assert!(values(&a, "-qmp").is_empty());
        assert_eq!(values(&a, "-name"), ["vmlet-vm1"]);
        // Every flag is followed by its value: no value starts a new flag by accident.
        assert!(!a.iter().any(|x| x.is_empty()));
    }

    #[test]
    fn a_tcg_guest_is_told_its_apic_timer_rate_when_its_kernel_takes_it() {
        let mut c = cfg(Accel::Tcg);
        c.apic_timer_hz = Some(250);
        assert_eq!(
            kernel_cmdline(&c),
            format!(
                "console=ttyS0 {} lapic_timer_period=4000000 panic=-1 reboot=t quiet vmlet.port=1024",
                tcg_timer_hints()
            )
        );
        c.apic_timer_hz = Some(1000);
        assert!(kernel_cmdline(&c).contains(" lapic_timer_period=1000000 "));
        // Under KVM the TSC-deadline timer needs no calibration to skip.
        c.accel = Accel::Kvm;
        assert!(!kernel_cmdline(&c).contains("lapic_timer_period"));
    }

    #[test]
    fn argv_for_kvm_without_acpi() {
        let mut c = cfg(Accel::Kvm);
        c.cmdline.clear();
        c.disks.clear();
        c.acpi = false;
        let a = argv(&c, &VmPaths::new(&c.dir), None);
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host"]);
        assert!(values(&a, "-M")[0].ends_with(",acpi=off"));
        assert_eq!(
            values(&a, "-append"),
            ["console=ttyS0 panic=-1 reboot=t quiet"]
        );
        assert!(values(&a, "-drive").is_empty());
        // Without an inherited socket, QEMU creates the QMP socket itself.
        assert_eq!(
            values(&a, "-qmp"),
            ["unix:/run/vmlet/vm1/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(
            values(&a, "-device"),
            ["vhost-user-vsock-device,chardev=vs0"]
        );
    }

    #[test]
    fn paths_escape_commas_where_qemu_parses_options() {
        let mut c = cfg(Accel::Tcg);
        c.dir = "/r/a,b".into();
        let a = argv(&c, &VmPaths::new(&c.dir), None);
        assert_eq!(
            values(&a, "-qmp"),
            ["unix:/r/a,,b/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(
            values(&a, "-chardev"),
            ["socket,id=vs0,path=/r/a,,b/vhost-vsock.sock"]
        );
        // -serial file: takes the path raw (checked against QEMU 7.2).
        assert_eq!(values(&a, "-serial"), ["file:/r/a,b/console.log"]);
    }

    #[test]
    fn validates_configs() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"").unwrap();
        let good = VmConfig {
            dir: dir.path().to_owned(),
            kernel: f.clone(),
            initrd: f.clone(),
            disks: vec![Disk {
                path: f.clone(),
                serial: "layer-0.x".into(),
                read_only: true,
            }],
            vsock_uds: dir.path().join("vsock.sock"),
            link: Default::default(),
            memory: Default::default(),
            incoming: None,
            staged: None,
            ..cfg(Accel::Tcg)
        };
        let paths = VmPaths::new(&good.dir);
        validate(&good, &paths).unwrap();
        type Breakage = (&'static str, fn(&mut VmConfig));
        let bad: Vec<Breakage> = vec![
            ("id", |c| c.id.clear()),
            ("memory", |c| c.memory_mib = 1),
            ("vcpus", |c| c.vcpus = 0),
            ("cid", |c| c.cid = 2),
            ("cid any", |c| c.cid = u32::MAX),
            ("kernel", |c| c.kernel = "/nonexistent".into()),
            ("serial comma", |c| c.disks[0].serial = "a,b".into()),
            ("serial long", |c| c.disks[0].serial = "x".repeat(21)),
            ("disk", |c| c.disks[0].path = "/nonexistent".into()),
            ("uds", |c| {
                c.vsock_uds = PathBuf::from("/").join("x".repeat(120))
            }),
            ("nul", |c| c.cmdline = "a\0b".into()),
        ];
        for (what, f) in bad {
            let mut c = good.clone();
            f(&mut c);
            assert!(
                matches!(validate(&c, &paths), Err(Error::InvalidConfig(_))),
                "{what} should be rejected"
            );
        }
    }

    #[test]
    fn parses_qemu_version() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard\n").as_deref(),
            Some("7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)")
        );
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn tails_only_this_starts_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmm.log");
        std::fs::write(&p, "old failure\n").unwrap();
        let from = std::fs::metadata(&p).unwrap().len();
        let mut text = String::new();
        for i in 0..30 {
            text.push_str(&format!("line {i}\n"));
        }
        std::fs::write(&p, format!("old failure\n{text}")).unwrap();
        let t = log_tail(&p, from, 3);
        assert_eq!(t, "line 27\nline 28\nline 29");
        assert_eq!(log_tail(&p, from + text.len() as u64, 3), "");
        assert_eq!(log_tail(&dir.path().join("absent"), 0, 3), "");
    }

    #[test]
    fn start_error_shows_the_log_tail() {
        let e = Error::Start {
            id: "vm1".into(),
            stage: "spawning QEMU",
            log_tail: "qemu: bad option".into(),
            source: Box::new(Error::Unsupported),
        };
        assert_eq!(
            e.to_string(),
            "starting VM vm1 failed while spawning QEMU; vmm.log ends with:\nqemu: bad option"
        );
    }

    #[test]
    fn probes_the_version_in_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake");
        crate::testutil::install_script(&fake, "#!/bin/sh\necho 'QEMU emulator version 9.9.9'\n");
        assert_eq!(probe_version(&fake).as_deref(), Some("9.9.9"));
        assert_eq!(probe_version(Path::new("/nonexistent")), None);
        if let Some(qemu) = find_program("qemu-system-x86_64") {
            assert!(probe_version(&qemu).is_some());
        }
    }

    #[test]
    fn finds_programs_on_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-vmlet").is_none());
    }

    /// Start failures are explained and leave nothing behind: a "QEMU" that exits at once.
    #[tokio::test]
    async fn start_failure_cleans_up_and_explains() {
        let Some(backend) = find_program("vhost-device-vsock") else {
            eprintln!("skipping: vhost-device-vsock is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-qemu");
        crate::testutil::install_script(
            &fake,
            "#!/bin/sh\necho 'qemu: -M microvm: unsupported machine' >&2\nexit 1\n",
        );
        let f = dir.path().join("vmlinux");
        std::fs::write(&f, b"").unwrap();
        let c = VmConfig {
            dir: dir.path().to_owned(),
            kernel: f.clone(),
            initrd: f.clone(),
            disks: vec![],
            vsock_uds: dir.path().join("vsock.sock"),
            link: Default::default(),
            memory: Default::default(),
            incoming: None,
            staged: None,
            ..cfg(Accel::Tcg)
        };
        let q = Qemu::with_binaries(fake, backend);
        let e = tokio::time::timeout(Duration::from_secs(30), q.start(&c))
            .await
            .unwrap()
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("waiting for QEMU's QMP socket"), "{msg}");
        assert!(msg.contains("unsupported machine"), "{msg}");
        match &e {
            Error::Start { source, .. } => match &**source {
                Error::Exited(x) => assert_eq!(x.code, Some(1)),
                other => panic!("expected an exit, got {other:?}"),
            },
            other => panic!("expected a start error, got {other:?}"),
        }
        for s in ["vhost-vsock.sock", "vsock.sock", "qmp.sock"] {
            assert!(!dir.path().join(s).exists(), "{s} left behind");
        }
    }

    /// A start dropped while waiting for QMP kills QEMU and the backend and removes sockets.
    #[tokio::test]
    async fn a_dropped_start_leaves_nothing_running() {
        let Some(backend) = find_program("vhost-device-vsock") else {
            eprintln!("skipping: vhost-device-vsock is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-qemu");
        // Never opens a QMP socket; leaves its pid behind to be checked.
        crate::testutil::install_script(&fake, &format!(
                "#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho $$ > {}/qemu.pid\nexec sleep 30\n",
                dir.path().display()
            ));
        let f = dir.path().join("vmlinux");
        std::fs::write(&f, b"").unwrap();
        let c = VmConfig {
            dir: dir.path().to_owned(),
            kernel: f.clone(),
            initrd: f.clone(),
            disks: vec![],
            vsock_uds: dir.path().join("vsock.sock"),
            link: Default::default(),
            memory: Default::default(),
            incoming: None,
            staged: None,
            ..cfg(Accel::Tcg)
        };
        let q = Qemu::with_binaries(fake, backend);
        let pid_file = dir.path().join("qemu.pid");
        {
            let start = q.start(&c);
            tokio::pin!(start);
            let waited = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    tokio::select! {
                        r = &mut start => panic!("the start cannot finish: {r:?}"),
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                    if std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n')) {
                        break;
                    }
                }
            })
            .await;
            assert!(waited.is_ok(), "the fake QEMU never ran");
        } // the start future drops here
        let qemu_pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone(qemu_pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(qemu_pid), "the fake QEMU survived the dropped start");
        // The backend's command line names the directory: no live process may.
        let needle = dir.path().as_os_str().as_encoded_bytes().to_vec();
        let mentioning = || -> Vec<i32> {
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| !gone(pid))
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
                })
                .collect()
        };
        while !mentioning().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            mentioning(),
            Vec::<i32>::new(),
            "the vsock backend survived"
        );
        for s in ["vhost-vsock.sock", "vsock.sock", "qmp.sock"] {
            assert!(!dir.path().join(s).exists(), "{s} left behind");
        }
    }
}
