//! Confinement of each VMM: the user its processes run as and the cgroup that holds them.
//!
//! QEMU parses what a guest sends it; a guest that breaks out of the emulator should find
//! itself an unprivileged user, in a cgroup that caps its memory, CPU and tasks, under a
//! seccomp filter (the last is QEMU's own `-sandbox`, see [`crate::qemu::argv`]).
//!
//! - **User**: the VMM's processes drop to [`Credentials`] in the forked child, before exec
//!   (`Process::spawn` in `process.rs`), so QEMU never holds root, not even briefly (QEMU's
//!   own `-runas` would parse its whole command line and open its files as root first).
//! - **Cgroup**: one per VM, with the VMM and its helpers in it. The child joins it, also
//!   before exec, by writing `0` to the cgroup's `cgroup.procs` (v2) or `tasks` (v1) through
//!   a descriptor the parent opened: the VMM's first instruction already runs under its
//!   limits, and no window exists in which it runs outside (writing its pid after spawn would
//!   leave one). cgroup v2 is the production path; v1 (memory, cpu and pids hierarchies) is
//!   used where the controllers are bound to v1, as on older hosts.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The period of the CPU quota: 100 ms, the kernel's default.
pub const CPU_PERIOD_US: u64 = 100_000;
/// CPU time beyond one CPU per vCPU, per period: a quarter of a CPU for QEMU's main loop
/// and I/O threads and the vsock backend, which run besides the vCPUs.
pub const CPU_HEADROOM_US: u64 = 25_000;
/// Most tasks (threads count) in one VM's cgroup. QEMU runs a thread per vCPU (at most 16
/// here), a main loop, an RCU thread and at most 64 I/O workers; vhost-device-vsock a few.
/// Four times that leaves room, and still stops a runaway thread or fork bomb.
pub const PIDS_MAX: u64 = 512;

/// Errors of confinement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user database has no such user.
    #[error("no user {0:?} on this host")]
    NoSuchUser(String),
    /// The user database could not be read.
    #[error("cannot look up the user {name:?}")]
    Lookup {
        /// The name or uid.
        name: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The cgroup version asked for cannot be used here.
    #[error("cgroup {version} is not usable here: {why}")]
    Unusable {
        /// The version.
        version: CgroupVersion,
        /// Why not.
        why: String,
    },
    /// `--cgroup-parent` is not a usable path.
    #[error("the cgroup parent {0:?} must be a path without `.` or `..` components")]
    BadParent(String),
    /// A cgroup file operation failed.
    #[error("cannot {what} {}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A VM's cgroup exists and still holds processes.
    #[error("the cgroup {} already holds processes", .0.display())]
    Busy(PathBuf),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A uid, a primary gid and supplementary groups: what one VM's processes run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary groups (such as `kvm`, for `/dev/kvm`).
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Whether these are the calling process's own effective ids (nothing to drop).
    pub fn are_own(&self) -> bool {
        self.uid == nix::unistd::geteuid().as_raw() && self.gid == nix::unistd::getegid().as_raw()
    }
}

/// A user from the user database, with its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    /// Its name.
    pub name: String,
    /// What its processes run as.
    pub credentials: Credentials,
}

impl VmmUser {
    /// The user named `spec` (or whose uid `spec` is), with its primary and supplementary
    /// groups, or `None` when there is no such user.
    pub fn lookup(spec: &str) -> Result<Option<VmmUser>, Error> {
        use nix::unistd::{Uid, User};
        let user = match spec.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(spec),
        }
        .map_err(|source| Error::Lookup {
            name: spec.to_owned(),
            source,
        })?;
        let Some(u) = user else { return Ok(None) };
        let mut groups: Vec<u32> = std::ffi::CString::new(u.name.clone())
            .ok()
            .and_then(|n| nix::unistd::getgrouplist(&n, u.gid).ok())
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        groups.sort_unstable();
        groups.dedup();
        Ok(Some(VmmUser {
            name: u.name,
            credentials: Credentials {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                groups,
            },
        }))
    }

    /// The agent's own effective user.
    pub fn agent() -> VmmUser {
        let uid = nix::unistd::geteuid();
        let gid = nix::unistd::getegid();
        let name = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        let groups = nix::unistd::getgroups()
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        VmmUser {
            name,
            credentials: Credentials {
                uid: uid.as_raw(),
                gid: gid.as_raw(),
                groups,
            },
        }
    }
}

/// Whether `cred` may reach `path` (search every directory above it) and has the access
/// `want` on it (a mask of 4 = read, 2 = write, 1 = search/execute). Judged from mode bits,
/// as the kernel does without ACLs; uid 0 may do anything. The error says which directory or
/// file stands in the way, so an operator can fix it.
pub fn check_access(path: &Path, cred: &Credentials, want: u32) -> Result<(), String> {
    if cred.uid == 0 {
        return Ok(());
    }
    let allowed = |m: &fs::Metadata, want: u32| {
        let mode = m.mode();
        let bits = if m.uid() == cred.uid {
            mode >> 6
        } else if m.gid() == cred.gid || cred.groups.contains(&m.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    };
    let denied = |p: &Path, m: &fs::Metadata, what: &str| {
        format!(
            "uid {} cannot {what} {} (mode {:04o}, owner {}:{})",
            cred.uid,
            p.display(),
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        )
    };
    let mut dir = PathBuf::new();
    for c in path.parent().unwrap_or(Path::new("/")).components() {
        dir.push(c);
        let m = fs::metadata(&dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
        if !allowed(&m, 1) {
            return Err(denied(&dir, &m, "enter"));
        }
    }
    let m = fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !allowed(&m, want) {
        let what = match want {
            1 => "enter",
            4 => "read",
            _ => "read and write",
        };
        return Err(denied(path, &m, what));
    }
    Ok(())
}

/// A cgroup version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// The legacy hierarchies: one per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// Which cgroups to use: `--cgroups`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// v2 if its controllers are available, else v1, else none (and say so).
    Auto,
    /// v2 or fail.
    V2,
    /// v1 or fail.
    V1,
    /// None.
    Off,
}

impl std::str::FromStr for CgroupMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CgroupMode::Auto),
            "v2" => Ok(CgroupMode::V2),
            "v1" => Ok(CgroupMode::V1),
            "off" => Ok(CgroupMode::Off),
            _ => Err(format!("{s:?} is not auto, v2, v1 or off")),
        }
    }
}

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Memory, in bytes: guest memory plus the VMM's overhead. No swap beyond it.
    pub memory_bytes: u64,
    /// CPU time per period, in microseconds; `None` where the CPU controller lacks quotas.
    pub cpu_quota_us: Option<u64>,
    /// The period of the quota, in microseconds.
    pub cpu_period_us: u64,
    /// Most tasks; `None` where the pids controller is missing.
    pub pids_max: Option<u64>,
}

impl Limits {
    /// Limits for a VM of `memory_mib` guest memory and `vcpus` vCPUs, whose VMM may use
    /// `overhead_mib` beyond the guest's memory.
    pub fn for_vm(memory_mib: u32, vcpus: u32, overhead_mib: u64) -> Limits {
        Limits {
            memory_bytes: (u64::from(memory_mib) + overhead_mib) << 20,
            cpu_quota_us: Some(u64::from(vcpus) * CPU_PERIOD_US + CPU_HEADROOM_US),
            cpu_period_us: CPU_PERIOD_US,
            pids_max: Some(PIDS_MAX),
        }
    }
}

/// What one VM's cgroup is, for `vmlet inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupInfo {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// Its directories: one on v2; on v1 one per hierarchy, memory first.
    pub paths: Vec<PathBuf>,
    /// The limits written.
    pub limits: Limits,
}

/// The cgroups the agent's VMs go into: detected once at startup.
#[derive(Debug, Clone)]
pub struct Cgroups {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    V2 {
        parent: PathBuf,
        cpu: bool,
        pids: bool,
    },
    V1 {
        memory: PathBuf,
        cpu: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
    Off {
        why: String,
    },
}

/// One mount of a cgroup filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// The hierarchy's path that is mounted (`/` unless bind-mounted or namespaced).
    root: String,
    /// Where.
    point: PathBuf,
    /// v1 controllers (empty for v2).
    controllers: Vec<String>,
    v2: bool,
}

/// Undoes `\ooo` escapes of /proc/self/mountinfo (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut v = Vec::new();
    for line in text.lines() {
        // id parent maj:min root point options [optional fields...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let (root, point, fstype, opts) = (l[3], l[4], r[0], r[2]);
        match fstype {
            "cgroup2" => v.push(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                controllers: Vec::new(),
                v2: true,
            }),
            "cgroup" => v.push(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                controllers: opts
                    .split(',')
                    .filter(|o| ["memory", "cpu", "pids"].contains(o))
                    .map(str::to_owned)
                    .collect(),
                v2: false,
            }),
            _ => {}
        }
    }
    v
}

/// The calling process's cgroup per hierarchy, from /proc/self/cgroup: `(controllers, path)`;
/// the v2 line has no controllers.
fn parse_self_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrls = it.next()?;
            let path = it.next()?;
            Some((
                ctrls
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path.to_owned(),
            ))
        })
        .collect()
}

/// Checks a `--cgroup-parent`: absolute (from the hierarchy's root) or relative (below the
/// agent's own cgroup), never `.` or `..`.
fn check_parent(parent: &str) -> Result<(), Error> {
    let mut parts = parent.split('/').filter(|p| !p.is_empty()).peekable();
    let ok = parts.peek().is_some() && parts.all(|p| p != "." && p != ".." && !p.contains('\0'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadParent(parent.to_owned()))
    }
}

/// The directory of `parent` in the hierarchy mounted at `m`, for a process whose cgroup in
/// it is `own`.
fn parent_dir(m: &Mount, own: &str, parent: &str) -> PathBuf {
    let rel = |p: &str| p.trim_start_matches('/').to_owned();
    if parent.starts_with('/') {
        return m.point.join(rel(parent));
    }
    // Seen through a bind mount or cgroup namespace, the mount shows the hierarchy from
    // `m.root` down; the process's path is relative to the hierarchy's real root.
    let own = own
        .strip_prefix(m.root.trim_end_matches('/'))
        .unwrap_or(own);
    m.point.join(rel(own)).join(parent)
}

fn read_trim(p: &Path) -> io::Result<String> {
    fs::read_to_string(p).map(|s| s.trim().to_owned())
}

fn write_file(p: &Path, value: &str) -> Result<(), Error> {
    // Cgroup files take one value per write(2): write it whole, unbuffered. Opened as a
    // shell's `echo value > file` opens it (cgroupfs ignores the create and truncate flags;
    // a file the kernel does not offer cannot be created there).
    let mut f = File::create(p).map_err(io_err("open", p))?;
    f.write_all(value.as_bytes()).map_err(io_err("write", p))
}

impl Cgroups {
    /// No cgroups, for the reason given.
    pub fn off(why: impl Into<String>) -> Cgroups {
        Cgroups {
            kind: Kind::Off { why: why.into() },
        }
    }

    /// Finds the cgroup hierarchies of this host, picks one as `mode` says and prepares the
    /// parent cgroup of every VM's cgroup: `parent`, or by default `/vmlet` on v2 (cgroup v2
    /// lets only leaves hold processes, so the VMs cannot go below the cgroup the agent runs
    /// in) and `vmlet` below the agent's own cgroup on v1 (so they stay inside whatever limit
    /// the agent's cgroup has). A relative `parent` is below the agent's own cgroup; an
    /// absolute one starts at the hierarchy's root. On v2 the memory, cpu and pids
    /// controllers are enabled from the root down to the parent.
    ///
    /// With [`CgroupMode::Auto`] an unusable hierarchy is not an error: the result says why
    /// there are no cgroups ([`Cgroups::describe`]).
    pub fn detect(mode: CgroupMode, parent: Option<&str>) -> Result<Cgroups, Error> {
        let read = |p: &str| fs::read_to_string(p).map_err(io_err("read", Path::new(p)));
        let mountinfo = read("/proc/self/mountinfo")?;
        let own = read("/proc/self/cgroup")?;
        Self::detect_with(&mountinfo, &own, mode, parent)
    }

    fn detect_with(
        mountinfo: &str,
        own: &str,
        mode: CgroupMode,
        parent: Option<&str>,
    ) -> Result<Cgroups, Error> {
        if let Some(p) = parent {
            check_parent(p)?;
        }
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_self_cgroup(own);
        let v2 = || setup_v2(&mounts, &own, parent.unwrap_or("/vmlet"));
        let v1 = || setup_v1(&mounts, &own, parent.unwrap_or("vmlet"));
        let unusable = |version, why| Error::Unusable { version, why };
        match mode {
            CgroupMode::Off => Ok(Cgroups::off("turned off (--cgroups off)")),
            CgroupMode::V2 => v2().map_err(|w| unusable(CgroupVersion::V2, w)),
            CgroupMode::V1 => v1().map_err(|w| unusable(CgroupVersion::V1, w)),
            CgroupMode::Auto => match v2() {
                Ok(c) => Ok(c),
                Err(w2) => match v1() {
                    Ok(c) => Ok(c),
                    Err(w1) => Ok(Cgroups::off(format!(
                        "no usable cgroup hierarchy (v2: {w2}; v1: {w1})"
                    ))),
                },
            },
        }
    }

    /// The version in use, if any.
    pub fn version(&self) -> Option<CgroupVersion> {
        match self.kind {
            Kind::V2 { .. } => Some(CgroupVersion::V2),
            Kind::V1 { .. } => Some(CgroupVersion::V1),
            Kind::Off { .. } => None,
        }
    }

    /// The parent directories, one per hierarchy.
    pub fn parents(&self) -> Vec<PathBuf> {
        match &self.kind {
            Kind::V2 { parent, .. } => vec![parent.clone()],
            Kind::V1 { memory, cpu, pids } => std::iter::once(memory.clone())
                .chain(cpu.clone())
                .chain(pids.clone())
                .collect(),
            Kind::Off { .. } => Vec::new(),
        }
    }

    /// A sentence for the log: what is used, where, or why nothing is.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Off { why } => format!("no cgroups: {why}"),
            _ => {
                let parents: Vec<String> = self
                    .parents()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                let missing = match &self.kind {
                    Kind::V2 { cpu, pids, .. } => !(*cpu && *pids),
                    Kind::V1 { cpu, pids, .. } => cpu.is_none() || pids.is_none(),
                    Kind::Off { .. } => false,
                };
                format!(
                    "cgroup {} under {}{}",
                    self.version().expect("not off"),
                    parents.join(", "),
                    if missing {
                        " (without cpu quota or pids controller)"
                    } else {
                        ""
                    }
                )
            }
        }
    }

    /// The reason there are no cgroups, when there are none.
    pub fn why_off(&self) -> Option<&str> {
        match &self.kind {
            Kind::Off { why } => Some(why),
            _ => None,
        }
    }

    fn dirs_for(&self, id: &str) -> Vec<PathBuf> {
        self.parents().iter().map(|p| p.join(id)).collect()
    }

    /// Creates VM `id`'s cgroup with `limits` (`None` without cgroups). A leftover empty
    /// cgroup of the same name is replaced; one that still holds processes is an error.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<Option<VmCgroup>, Error> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(Error::BadParent(id.to_owned()));
        }
        let (version, applied) = match &self.kind {
            Kind::Off { .. } => return Ok(None),
            Kind::V2 { cpu, pids, .. } => (
                CgroupVersion::V2,
                Limits {
                    cpu_quota_us: limits.cpu_quota_us.filter(|_| *cpu),
                    pids_max: limits.pids_max.filter(|_| *pids),
                    ..limits.clone()
                },
            ),
            Kind::V1 { cpu, pids, .. } => (
                CgroupVersion::V1,
                Limits {
                    cpu_quota_us: limits.cpu_quota_us.filter(|_| cpu.is_some()),
                    pids_max: limits.pids_max.filter(|_| pids.is_some()),
                    ..limits.clone()
                },
            ),
        };
        let cg = VmCgroup {
            version,
            dirs: self.dirs_for(id),
            limits: applied,
        };
        let made = (|| {
            for d in &cg.dirs {
                make_fresh(d)?;
            }
            cg.write_limits()
        })();
        match made {
            Ok(()) => Ok(Some(cg)),
            Err(e) => {
                for d in &cg.dirs {
                    let _ = fs::remove_dir(d);
                }
                Err(e)
            }
        }
    }

    /// VM `id`'s cgroup if it exists (a VM adopted after an agent restart), with the limits
    /// it has.
    pub fn find(&self, id: &str) -> Option<VmCgroup> {
        let version = self.version()?;
        let dirs = self.dirs_for(id);
        if !dirs.iter().all(|d| d.is_dir()) {
            return None;
        }
        let mem = &dirs[0];
        let num = |p: PathBuf| read_trim(&p).ok().and_then(|s| s.parse::<u64>().ok());
        let limits = match &self.kind {
            Kind::V2 { .. } => {
                let cpu = read_trim(&mem.join("cpu.max")).unwrap_or_default();
                let mut it = cpu.split_whitespace();
                let quota = it.next().and_then(|q| q.parse().ok());
                let period = it.next().and_then(|p| p.parse().ok());
                Limits {
                    memory_bytes: num(mem.join("memory.max")).unwrap_or(0),
                    cpu_quota_us: quota,
                    cpu_period_us: period.unwrap_or(CPU_PERIOD_US),
                    pids_max: num(mem.join("pids.max")),
                }
            }
            Kind::V1 { cpu, pids, .. } => Limits {
                memory_bytes: num(mem.join("memory.limit_in_bytes")).unwrap_or(0),
                cpu_quota_us: cpu
                    .as_ref()
                    .and_then(|c| num(c.join(id).join("cpu.cfs_quota_us"))),
                cpu_period_us: cpu
                    .as_ref()
                    .and_then(|c| num(c.join(id).join("cpu.cfs_period_us")))
                    .unwrap_or(CPU_PERIOD_US),
                pids_max: pids.as_ref().and_then(|p| num(p.join(id).join("pids.max"))),
            },
            Kind::Off { .. } => return None,
        };
        Some(VmCgroup {
            version,
            dirs,
            limits,
        })
    }

    /// Removes the cgroups below the parent that belong to no VM in `live` (left by an agent
    /// that crashed, or by a VM whose cleanup failed), killing any process still in them:
    /// the parent belongs to this agent alone, so whatever is in it is a VMM it started.
    /// Returns the names removed.
    pub async fn reclaim(&self, live: &HashSet<String>) -> Vec<String> {
        let mut names: Vec<String> = self
            .parents()
            .iter()
            .flat_map(|p| fs::read_dir(p).into_iter().flatten().flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !live.contains(n))
            .collect();
        names.sort();
        names.dedup();
        let mut removed = Vec::new();
        for n in names {
            let cg = VmCgroup {
                version: self.version().expect("parents exist only with cgroups"),
                dirs: self
                    .dirs_for(&n)
                    .into_iter()
                    .filter(|d| d.is_dir())
                    .collect(),
                limits: Limits::for_vm(0, 0, 0),
            };
            match cg.remove().await {
                Ok(()) => removed.push(n),
                Err(e) => {
                    tracing::warn!(cgroup = %n, error = %e, "cannot remove a leftover cgroup")
                }
            }
        }
        removed
    }
}

/// Makes `dir` as a new, empty cgroup: a leftover of the same name is removed first (it
/// could carry other limits), unless processes are still in it.
fn make_fresh(dir: &Path) -> Result<(), Error> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if !procs_of(dir).is_empty() {
                return Err(Error::Busy(dir.to_owned()));
            }
            fs::remove_dir(dir).map_err(io_err("remove the leftover cgroup", dir))?;
            fs::create_dir(dir).map_err(io_err("create the cgroup", dir))
        }
        Err(e) => Err(io_err("create the cgroup", dir)(e)),
    }
}

fn procs_of(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn setup_v2(
    mounts: &[Mount],
    own: &[(Vec<String>, String)],
    parent: &str,
) -> Result<Cgroups, String> {
    let m = mounts
        .iter()
        .find(|m| m.v2)
        .ok_or("no cgroup2 filesystem is mounted")?;
    let own_path = own
        .iter()
        .find(|(c, _)| c.is_empty())
        .map(|(_, p)| p.as_str())
        .unwrap_or("/");
    let root = &m.point;
    let available = read_trim(&root.join("cgroup.controllers"))
        .map_err(|e| format!("cannot read {}/cgroup.controllers: {e}", root.display()))?;
    let has = |c: &str| available.split_whitespace().any(|x| x == c);
    if !has("memory") {
        return Err(format!(
            "its memory controller is not available at {} (bound to cgroup v1?)",
            root.display()
        ));
    }
    let (cpu, pids) = (has("cpu"), has("pids"));
    let dir = parent_dir(m, own_path, parent);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Every cgroup from the root down to the parent hands the controllers on to its children.
    let want: Vec<&str> = ["memory", "cpu", "pids"]
        .into_iter()
        .filter(|c| *c == "memory" || (*c == "cpu" && cpu) || (*c == "pids" && pids))
        .collect();
    let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
    let mut at = root.clone();
    let mut chain = vec![at.clone()];
    for c in rel.components() {
        at.push(c);
        chain.push(at.clone());
    }
    for d in &chain {
        let f = d.join("cgroup.subtree_control");
        let enabled = read_trim(&f).unwrap_or_default();
        for c in &want {
            if enabled.split_whitespace().any(|x| x == *c) {
                continue;
            }
            if let Err(Error::Io { source, .. }) = write_file(&f, &format!("+{c}")) {
                return Err(if source.raw_os_error() == Some(libc::EBUSY) {
                    format!(
                        "cannot enable the {c} controller in {}: it holds processes itself, and \
                         cgroup v2 lets only leaves hold processes; give --cgroup-parent a \
                         path outside the agent's own cgroup (such as /vmlet)",
                        d.display()
                    )
                } else {
                    format!(
                        "cannot enable the {c} controller in {}: {source}",
                        d.display()
                    )
                });
            }
        }
    }
    Ok(Cgroups {
        kind: Kind::V2 {
            parent: dir,
            cpu,
            pids,
        },
    })
}

fn setup_v1(
    mounts: &[Mount],
    own: &[(Vec<String>, String)],
    parent: &str,
) -> Result<Cgroups, String> {
    let hierarchy = |ctrl: &str| -> Option<PathBuf> {
        let m = mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctrl))?;
        let own_path = own
            .iter()
            .find(|(c, _)| c.iter().any(|c| c == ctrl))
            .map(|(_, p)| p.as_str())
            .unwrap_or("/");
        Some(parent_dir(m, own_path, parent))
    };
    let make =
        |d: &Path| fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()));
    let memory = hierarchy("memory").ok_or("no cgroup v1 memory hierarchy is mounted")?;
    make(&memory)?;
    if !memory.join("memory.limit_in_bytes").exists() {
        return Err(format!("{} has no memory.limit_in_bytes", memory.display()));
    }
    // Without CFS bandwidth control (CONFIG_CFS_BANDWIDTH) there is no quota to set.
    let cpu = match hierarchy("cpu") {
        Some(d) => {
            make(&d)?;
            d.join("cpu.cfs_quota_us").exists().then_some(d)
        }
        None => None,
    };
    let pids = match hierarchy("pids") {
        Some(d) => {
            make(&d)?;
            Some(d)
        }
        None => None,
    };
    Ok(Cgroups {
        kind: Kind::V1 { memory, cpu, pids },
    })
}

/// One VM's cgroup.
#[derive(Debug, Clone)]
pub struct VmCgroup {
    version: CgroupVersion,
    /// One directory on v2; on v1 one per hierarchy, memory first.
    dirs: Vec<PathBuf>,
    limits: Limits,
}

impl VmCgroup {
    /// What it is, for `vmlet inspect`.
    pub fn info(&self) -> CgroupInfo {
        CgroupInfo {
            version: self.version,
            paths: self.dirs.clone(),
            limits: self.limits.clone(),
        }
    }

    /// Its directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn write_limits(&self) -> Result<(), Error> {
        let l = &self.limits;
        match self.version {
            CgroupVersion::V2 => {
                let d = &self.dirs[0];
                write_file(&d.join("memory.max"), &l.memory_bytes.to_string())?;
                // No swap: a guest's memory counts in full against the limit.
                if d.join("memory.swap.max").exists() {
                    write_file(&d.join("memory.swap.max"), "0")?;
                }
                // An OOM kill takes the VMM and its helpers together: half a VM is no VM.
                if d.join("memory.oom.group").exists() {
                    write_file(&d.join("memory.oom.group"), "1")?;
                }
                if let Some(q) = l.cpu_quota_us {
                    write_file(&d.join("cpu.max"), &format!("{q} {}", l.cpu_period_us))?;
                }
                if let Some(p) = l.pids_max {
                    write_file(&d.join("pids.max"), &p.to_string())?;
                }
            }
            CgroupVersion::V1 => {
                for d in &self.dirs {
                    if d.join("memory.limit_in_bytes").exists() {
                        write_file(
                            &d.join("memory.limit_in_bytes"),
                            &l.memory_bytes.to_string(),
                        )?;
                        // Memory plus swap, written after memory (it may not be lower).
                        if d.join("memory.memsw.limit_in_bytes").exists() {
                            write_file(
                                &d.join("memory.memsw.limit_in_bytes"),
                                &l.memory_bytes.to_string(),
                            )?;
                        }
                    }
                    if let Some(q) = l
                        .cpu_quota_us
                        .filter(|_| d.join("cpu.cfs_quota_us").exists())
                    {
                        write_file(&d.join("cpu.cfs_period_us"), &l.cpu_period_us.to_string())?;
                        write_file(&d.join("cpu.cfs_quota_us"), &q.to_string())?;
                    }
                    if let Some(p) = l.pids_max.filter(|_| d.join("pids.max").exists()) {
                        write_file(&d.join("pids.max"), &p.to_string())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens, for writing, the file of each hierarchy through which a forked child joins
    /// with one write(2) of `0` before exec (no allocation, no path lookup in the child).
    ///
    /// On v1 that is `tasks`, not `cgroup.procs`: the child, just forked, has one thread, so
    /// moving that thread moves the whole process, and the kernel moves the writer's own
    /// thread without its global thread-group lock, whose write side waits for an RCU grace
    /// period: 5 ms or more per spawn on the test host, on the way to every cold boot. v2
    /// moves a process only through `cgroup.procs`.
    pub(crate) fn open_procs(&self) -> Result<Vec<File>, Error> {
        let file = match self.version {
            CgroupVersion::V2 => "cgroup.procs",
            CgroupVersion::V1 => "tasks",
        };
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join(file);
                File::options()
                    .write(true)
                    .open(&p)
                    .map_err(io_err("open", &p))
            })
            .collect()
    }

    /// Whether `pid` is in this cgroup.
    pub fn holds(&self, pid: u32) -> bool {
        procs_of(&self.dirs[0]).contains(&pid)
    }

    /// How many times the kernel's OOM killer killed a process of this cgroup because it
    /// reached its memory limit.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            CgroupVersion::V2 => "memory.events",
            CgroupVersion::V1 => "memory.oom_control",
        };
        fs::read_to_string(self.dirs[0].join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Kills what is still in the cgroup and removes it, retrying while the kernel finishes
    /// with exiting tasks (bounded: a few seconds). Idempotent.
    pub async fn remove(&self) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut last = None;
            for d in &self.dirs {
                for pid in procs_of(d) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                match fs::remove_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => last = Some(e),
                }
            }
            match last {
                None => return Ok(()),
                Some(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// What a VM's processes are confined by, for `vmlet inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfinementInfo {
    /// The user they run as (a name, or the uid when it has none).
    pub user: String,
    /// Their uid.
    pub uid: u32,
    /// Their primary gid.
    pub gid: u32,
    /// Their cgroup, if any.
    pub cgroup: Option<CgroupInfo>,
    /// What is not confined and why, if anything.
    pub note: Option<String>,
}

/// The host's confinement policy for VMMs, decided once at startup.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// The user VMMs run as; `None`: as the agent itself (not dropped).
    pub user: Option<VmmUser>,
    /// Why VMMs run as the agent's user, when they do.
    pub user_note: Option<String>,
    /// The cgroups VMs go into.
    pub cgroups: Cgroups,
    /// Memory a VMM may use beyond its guest's, MiB (QEMU's own heap, TCG's translation
    /// cache, I/O buffers, the vsock backend).
    pub memory_overhead_mib: u64,
    /// When set, each VM's processes get a uid and gid of their own, this base plus the
    /// VM's vsock CID (unique among the host's live guests), instead of sharing `user`'s;
    /// they keep `user`'s supplementary groups (such as `kvm`). VMMs are then kept apart
    /// from each other by uid too, not only from the host.
    pub uid_base: Option<u32>,
}

/// The lowest vsock CID a guest gets (0 to 2 are reserved).
const FIRST_CID: u32 = 3;

impl Default for Confinement {
    /// Nothing: VMMs run as the agent's user, without cgroups.
    fn default() -> Self {
        Confinement {
            user: None,
            user_note: Some("not configured".into()),
            cgroups: Cgroups::off("not configured"),
            memory_overhead_mib: DEFAULT_MEMORY_OVERHEAD_MIB,
            uid_base: None,
        }
    }
}

/// The default of [`Confinement::memory_overhead_mib`]. Measured on the TCG test host
/// (docs/confinement.md): a 256 MiB guest that filled its memory and ran a mixed workload
/// peaked at 83 MiB of QEMU's own memory (its TCG translation cache, capped at
/// [`crate::qemu::TCG_TB_MIB`], was 55 MiB of it) plus page cache of disk writes, which
/// the kernel reclaims under the limit. 256 MiB leaves room for bursts of that.
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u64 = 256;

impl Confinement {
    /// The credentials the processes of the VM with vsock CID `cid` get, or `None` when
    /// they run as the agent.
    pub fn credentials_for(&self, cid: u32) -> Option<Credentials> {
        match self.uid_base {
            Some(base) => {
                let id = base.saturating_add(cid);
                let groups = self
                    .user
                    .as_ref()
                    .map(|u| {
                        let c = &u.credentials;
                        c.groups.iter().copied().filter(|g| *g != c.gid).collect()
                    })
                    .unwrap_or_default();
                Some(Credentials {
                    uid: id,
                    gid: id,
                    groups,
                })
            }
            None => self
                .user
                .as_ref()
                .map(|u| u.credentials.clone())
                .filter(|c| !c.are_own()),
        }
    }

    /// The credentials VM processes get (the first VM's, when each gets its own: what
    /// access checks of shared files use), or `None` when they run as the agent.
    pub fn credentials(&self) -> Option<Credentials> {
        self.credentials_for(FIRST_CID)
    }

    /// A name for `cred`: the user's, or the uid when it has none (per-VM uids).
    pub fn name_of(&self, cred: &Credentials) -> String {
        match &self.user {
            Some(u) if u.credentials.uid == cred.uid => u.name.clone(),
            _ => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(cred.uid))
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| cred.uid.to_string()),
        }
    }

    /// The limits of a VM of this memory and vCPU count.
    pub fn limits(&self, memory_mib: u32, vcpus: u32) -> Limits {
        Limits::for_vm(memory_mib, vcpus, self.memory_overhead_mib)
    }

    /// A sentence for the agent's log.
    pub fn describe(&self) -> String {
        let user = match (self.credentials(), &self.user, self.uid_base) {
            (Some(_), _, Some(base)) => {
                format!("a uid and gid of their own per VM ({base} + the VM's vsock CID)")
            }
            (Some(c), Some(u), None) => {
                format!("user {} (uid {}, gid {})", u.name, c.uid, c.gid)
            }
            _ => {
                let me = VmmUser::agent();
                format!(
                    "the agent's own user {} (uid {}): {}",
                    me.name,
                    me.credentials.uid,
                    self.user_note.as_deref().unwrap_or("asked for")
                )
            }
        };
        format!(
            "VMMs run as {user}; {}; memory limit = guest + {} MiB, CPU = vCPUs + {} %, {} tasks",
            self.cgroups.describe(),
            self.memory_overhead_mib,
            CPU_HEADROOM_US * 100 / CPU_PERIOD_US,
            PIDS_MAX
        )
    }
}

/// What a spawned child does between fork and exec: join cgroups, then drop privileges.
#[derive(Debug, Default)]
pub(crate) struct Jail {
    /// Each hierarchy's file to join through (`cgroup.procs` or, on v1, `tasks`), open for
    /// writing.
    pub(crate) procs: Vec<File>,
    /// Who to become.
    pub(crate) credentials: Option<Credentials>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:14 - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/pids rw,nosuid shared:16 - cgroup cgroup rw,pids
37 30 0:33 /sub /sys/fs/cgroup/my\\040dir rw - cgroup cgroup rw,freezer
";

    #[test]
    fn parses_mounts_and_own_cgroups() {
        let m = parse_mountinfo(MOUNTINFO_V1);
        assert_eq!(m.len(), 5);
        assert!(m[0].v2);
        assert_eq!(m[0].point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].controllers, ["cpu"]);
        assert_eq!(m[1].point, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m[2].controllers, ["memory"]);
        assert_eq!(m[4].point, Path::new("/sys/fs/cgroup/my dir"));
        assert_eq!(m[4].root, "/sub");
        let own = parse_self_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/\n0::/init.scope\n");
        assert_eq!(own[0], (vec!["memory".to_string()], "/a/b".to_string()));
        assert_eq!(own[1].0, ["cpu", "cpuacct"]);
        assert_eq!(own[2], (vec![], "/init.scope".to_string()));
    }

    #[test]
    fn resolves_parents_relative_to_the_agent_or_the_root() {
        let m = Mount {
            root: "/".into(),
            point: "/sys/fs/cgroup/memory".into(),
            controllers: vec!["memory".into()],
            v2: false,
        };
        assert_eq!(
            parent_dir(&m, "/svc/agent", "vmlet"),
            Path::new("/sys/fs/cgroup/memory/svc/agent/vmlet")
        );
        assert_eq!(
            parent_dir(&m, "/svc/agent", "/vmlet.slice/x"),
            Path::new("/sys/fs/cgroup/memory/vmlet.slice/x")
        );
        assert_eq!(
            parent_dir(&m, "/", "vmlet"),
            Path::new("/sys/fs/cgroup/memory/vmlet")
        );
        let ns = Mount {
            root: "/svc".into(),
            ..m
        };
        assert_eq!(
            parent_dir(&ns, "/svc/agent", "vmlet"),
            Path::new("/sys/fs/cgroup/memory/agent/vmlet")
        );
        for bad in ["", "/", "..", "a/../b", "./a", "/a/."] {
            assert!(check_parent(bad).is_err(), "{bad:?}");
        }
        for good in ["vmlet", "/vmlet", "a/b", "/vmlet.slice/vms"] {
            check_parent(good).unwrap();
        }
    }

    /// A fake cgroup v2 tree: plain files stand in for the kernel's, so what vmlet writes
    /// where can be read back.
    fn fake_v2(controllers: &str) -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::write(root.join("cgroup.controllers"), controllers).unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let mi = format!("31 30 0:27 / {} rw - cgroup2 cgroup2 rw\n", root.display());
        (d, mi)
    }

    #[test]
    fn v2_enables_controllers_down_to_the_parent_and_writes_limits() {
        let (d, mi) = fake_v2("cpuset cpu io memory pids");
        let root = d.path();
        let cg = Cgroups::detect_with(&mi, "0::/\n", CgroupMode::Auto, Some("/vmlet.slice/vms"))
            .unwrap();
        assert_eq!(cg.version(), Some(CgroupVersion::V2));
        assert_eq!(cg.parents(), [root.join("vmlet.slice/vms")]);
        assert!(
            cg.describe().starts_with("cgroup v2 under"),
            "{}",
            cg.describe()
        );
        // One write per controller, in every cgroup from the root down to the parent (a
        // plain file keeps only the last).
        for d in ["", "vmlet.slice", "vmlet.slice/vms"] {
            let f = root.join(d).join("cgroup.subtree_control");
            assert_eq!(fs::read_to_string(&f).unwrap(), "+pids", "{}", f.display());
        }
        let limits = Limits::for_vm(256, 2, 128);
        let vm = cg.create("vm1", &limits).unwrap().unwrap();
        let dir = root.join("vmlet.slice/vms/vm1");
        assert_eq!(vm.dirs(), std::slice::from_ref(&dir));
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (384u64 << 20).to_string());
        assert_eq!(read("cpu.max"), "225000 100000");
        assert_eq!(read("pids.max"), PIDS_MAX.to_string());
        let found = cg.find("vm1").unwrap();
        assert_eq!(found.info(), vm.info());
        assert!(cg.find("vm2").is_none());
        assert_eq!(vm.oom_kills(), 0);
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(vm.oom_kills(), 1);
        assert!(cg.create("a/b", &limits).is_err());
    }

    #[test]
    fn v2_without_cpu_and_pids_limits_memory_only() {
        let (d, mi) = fake_v2("memory");
        let cg = Cgroups::detect_with(&mi, "0::/\n", CgroupMode::V2, None).unwrap();
        assert_eq!(cg.parents(), [d.path().join("vmlet")]);
        assert!(
            cg.describe().contains("without cpu quota"),
            "{}",
            cg.describe()
        );
        let vm = cg
            .create("vm1", &Limits::for_vm(64, 1, 0))
            .unwrap()
            .unwrap();
        assert_eq!(vm.info().limits.cpu_quota_us, None);
        assert_eq!(vm.info().limits.pids_max, None);
        assert!(!d.path().join("vmlet/vm1/cpu.max").exists());
    }

    #[test]
    fn auto_falls_back_to_v1_then_to_nothing_and_says_why() {
        // v2 mounted without a memory controller (bound to v1), no v1 memory hierarchy.
        let (_d, mi) = fake_v2("cpu pids");
        let cg = Cgroups::detect_with(&mi, "0::/\n", CgroupMode::Auto, None).unwrap();
        assert_eq!(cg.version(), None);
        let why = cg.why_off().unwrap();
        assert!(why.contains("memory controller is not available"), "{why}");
        assert!(why.contains("no cgroup v1 memory hierarchy"), "{why}");
        assert!(matches!(
            Cgroups::detect_with(&mi, "0::/\n", CgroupMode::V2, None),
            Err(Error::Unusable {
                version: CgroupVersion::V2,
                ..
            })
        ));
        let off = Cgroups::detect_with(&mi, "", CgroupMode::Off, None).unwrap();
        assert!(off.why_off().unwrap().contains("--cgroups off"));
        assert!(off
            .create("vm1", &Limits::for_vm(256, 1, 64))
            .unwrap()
            .is_none());
    }

    #[test]
    fn limits_are_guest_plus_overhead_and_vcpus_plus_headroom() {
        let l = Limits::for_vm(256, 2, 192);
        assert_eq!(l.memory_bytes, 448 << 20);
        assert_eq!(l.cpu_quota_us, Some(225_000));
        assert_eq!(l.cpu_period_us, 100_000);
        assert_eq!(l.pids_max, Some(PIDS_MAX));
    }

    #[test]
    fn access_is_judged_like_the_kernel_does() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let set = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        set(d.path(), 0o755);
        let sub = d.path().join("sub");
        fs::create_dir(&sub).unwrap();
        let f = sub.join("f");
        fs::write(&f, b"x").unwrap();
        set(&f, 0o644);
        let other = Credentials {
            uid: 4_000_000,
            gid: 4_000_000,
            groups: vec![],
        };
        let owner_gid = fs::metadata(&f).unwrap().gid();
        check_access(&f, &other, 4).unwrap();
        assert!(check_access(&f, &other, 6).is_err());
        set(&sub, 0o700);
        let e = check_access(&f, &other, 4).unwrap_err();
        assert!(e.contains("cannot enter") && e.contains("sub"), "{e}");
        // A member of the directory's group gets the group's bits.
        set(&sub, 0o710);
        let member = Credentials {
            groups: vec![owner_gid],
            ..other.clone()
        };
        check_access(&f, &member, 4).unwrap();
        assert!(check_access(&f, &other, 4).is_err());
        check_access(
            &f,
            &Credentials {
                uid: 0,
                gid: 0,
                groups: vec![],
            },
            6,
        )
        .unwrap();
    }
}
