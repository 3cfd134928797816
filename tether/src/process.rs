//! Starting the container process: the program looked up inside the new
//! root, then chroot, working directory and a new session in the child.
//!
//! The tether starts it itself, with `clone(CLONE_VM | CLONE_VFORK)` (see
//! [`clone_and_exec`]), not with `std::process::Command`, whose chroot
//! needs a `pre_exec` and so a fork, nor with `tokio::process`: as PID 1 the
//! tether reaps every zombie itself with `waitpid(-1)`, which would steal
//! exit statuses from tokio's own reaper.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::{fstat, SFlag};
use nix::unistd::Pid;
use vmlet_protocol::guest::ProcessSpec;

/// The search path when the spec's environment has no `PATH` (Docker's).
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the process could not be started. [`SpawnError::code`] gives the exit
/// code the agent reports, following the shell's (and Docker's) convention.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    /// `argv` is empty.
    #[error("no command given")]
    EmptyArgv,
    /// A bare command name matched nothing on `PATH`.
    #[error("{0}: executable file not found in $PATH")]
    NotInPath(String),
    /// A command given as a path does not exist.
    #[error("{0}: no such file or directory")]
    NoSuchFile(String),
    /// The command exists but cannot be executed.
    #[error("{0}: permission denied")]
    NotExecutable(String),
    /// The command is a directory.
    #[error("{0}: is a directory")]
    IsDirectory(String),
    /// A string in the spec contains a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// The working directory could not be created in the new root.
    #[error("cannot create the working directory {0}")]
    Workdir(String, #[source] io::Error),
    /// The new root could not be opened.
    #[error("cannot open the root filesystem {0}")]
    Root(String, #[source] io::Error),
    /// The clone, the child's setup (chroot, chdir, ids) or the exec failed.
    #[error("cannot execute {0}")]
    Exec(String, #[source] io::Error),
    /// The user or group is not known in the container.
    #[error("unable to find user {0}: {1}")]
    User(String, &'static str),
}

impl SpawnError {
    /// 127: command not found; 126: found but not executable; 125: the
    /// tether itself failed.
    pub(crate) fn code(&self) -> i32 {
        match self {
            SpawnError::NotInPath(_) | SpawnError::NoSuchFile(_) => 127,
            SpawnError::NotExecutable(_) | SpawnError::IsDirectory(_) => 126,
            SpawnError::Exec(_, e) => match e.raw_os_error() {
                Some(libc::ENOENT) => 127,
                Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::EPERM | libc::ETXTBSY) => {
                    126
                }
                _ => 125,
            },
            SpawnError::EmptyArgv
            | SpawnError::Nul(_)
            | SpawnError::Workdir(..)
            | SpawnError::Root(..)
            | SpawnError::User(..) => 125,
        }
    }
}

/// The running process and the parent's ends of its stdio pipes.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: Pid,
    /// `None` when the spec asked for no stdin (the child has `/dev/null`).
    pub(crate) stdin: Option<OwnedFd>,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
}

/// Splits `KEY=value` entries; entries without `=` or with an empty key are
/// skipped (the host has no environment to inherit them from).
pub(crate) fn parse_env(env: &[String]) -> Vec<(&str, &str)> {
    env.iter()
        .filter_map(|e| e.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// Starts `spec.argv` chrooted into `root`. The caller must already be
/// reaping children (the SIGCHLD handler is installed) and must not wait
/// for this child through anything but `waitpid`.
pub(crate) fn spawn(spec: &ProcessSpec, root: &Path) -> Result<Spawned, SpawnError> {
    let argv0 = spec.argv.first().ok_or(SpawnError::EmptyArgv)?;
    let env = parse_env(&spec.env);
    let path_env = env
        .iter()
        .rev()
        .find(|(k, _)| *k == "PATH")
        .map(|(_, v)| *v)
        .unwrap_or(DEFAULT_PATH);
    let workdir = absolute_workdir(spec.workdir.as_deref());

    let in_root = root.join(workdir.trim_start_matches('/'));
    std::fs::create_dir_all(&in_root).map_err(|e| SpawnError::Workdir(workdir.clone(), e))?;
    let root_dir = File::open(root).map_err(|e| SpawnError::Root(root.display().to_string(), e))?;
    let program = resolve_program(root_dir.as_fd(), argv0, path_env, &workdir)?;
    drop(root_dir);

    let nul = |s: &str| CString::new(s).map_err(|_| SpawnError::Nul(s.to_owned()));
    let root_c = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| SpawnError::Nul(root.display().to_string()))?;
    let workdir_c = nul(&workdir)?;
    let argv_c = spec
        .argv
        .iter()
        .map(|a| nul(a))
        .collect::<Result<Vec<_>, _>>()?;
    // Every entry, those `parse_env` skips too.
    if let Some(e) = spec.env.iter().find(|e| e.contains('\0')) {
        return Err(SpawnError::Nul(e.clone()));
    }

    let ids = match spec.user.as_deref() {
        None | Some("") => None,
        Some(u) => {
            let read = |p: &str| {
                let mut v = Vec::new();
                use std::io::Read;
                let _ = File::open(root.join(p)).and_then(|f| f.take(1 << 20).read_to_end(&mut v));
                String::from_utf8_lossy(&v).into_owned()
            };
            Some(resolve_user(&read("etc/passwd"), &read("etc/group"), u)?)
        }
    };
    let home = match &ids {
        Some(i) if !env.iter().any(|(k, _)| *k == "HOME") => Some(i.home.clone()),
        _ => None,
    };

    // Everything the child needs, built here: between the clone and the
    // exec it only makes system calls on this memory.
    let program_c = nul(&program)?;
    // As `Command::env` did: sorted by name, a later entry replacing an
    // earlier one of the same name.
    let mut vars: std::collections::BTreeMap<&str, &str> = env.iter().copied().collect();
    if let Some(h) = &home {
        vars.insert("HOME", h);
    }
    let env_c = vars
        .iter()
        .map(|(k, v)| nul(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let argv_p = null_terminated(&argv_c);
    let env_p = null_terminated(&env_c);

    let exec_err = |e: io::Error| SpawnError::Exec(program.clone(), e);
    let (stdin_child, stdin) = if spec.stdin {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| exec_err(e.into()))?;
        (r, Some(w))
    } else {
        let null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(exec_err)?;
        (OwnedFd::from(null), None)
    };
    let (stdout, stdout_child) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| exec_err(e.into()))?;
    let (stderr, stderr_child) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| exec_err(e.into()))?;
    let (report_r, report_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| exec_err(e.into()))?;

    let plan = Plan {
        root: &root_c,
        workdir: &workdir_c,
        program: &program_c,
        argv: &argv_p,
        envp: &env_p,
        stdio: [
            stdin_child.as_raw_fd(),
            stdout_child.as_raw_fd(),
            stderr_child.as_raw_fd(),
        ],
        ids: ids.as_ref(),
        report: report_w.as_raw_fd(),
    };
    let pid = clone_and_exec(&plan).map_err(exec_err)?;
    // The child has exec'd or exited (CLONE_VFORK): the parent's copies of
    // its ends go, so the report pipe reads end of file on success.
    drop((stdin_child, stdout_child, stderr_child, report_w));
    let mut report = Vec::new();
    let _ = File::from(report_r).read_to_end(&mut report);
    if let Ok(errno) = <[u8; 4]>::try_from(report.as_slice()) {
        // It exited before the exec: reap it here, nobody else knows it.
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(exec_err(io::Error::from_raw_os_error(i32::from_ne_bytes(
            errno,
        ))));
    }
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
    })
}

/// How a child ended: its exit code, or the signal that killed it.
pub(crate) type ExitStatus = (Option<i32>, Option<i32>);

/// What one pass of [`reap`] found.
#[derive(Debug, Default)]
pub(crate) struct Reaped {
    /// Children reaped.
    pub(crate) count: usize,
    /// How `main` ended, if it was one of them.
    pub(crate) main: Option<ExitStatus>,
    /// No child is left at all.
    pub(crate) none_left: bool,
}

/// Reaps every child that has ended, without waiting (PID 1 inherits every
/// orphan), and says how `main` ended if it was among them.
pub(crate) fn reap(main: Option<Pid>) -> Reaped {
    use nix::errno::Errno;
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut r = Reaped::default();
    loop {
        let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return r,
            Ok(s) => s,
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => {
                r.none_left = true;
                return r;
            }
            Err(e) => {
                crate::log!("waitpid failed: {e}");
                r.none_left = true;
                return r;
            }
        };
        r.count += 1;
        match status {
            WaitStatus::Exited(p, code) if Some(p) == main => r.main = Some((Some(code), None)),
            WaitStatus::Signaled(p, sig, _) if Some(p) == main => {
                r.main = Some((None, Some(sig as i32)))
            }
            _ => {}
        }
    }
}

/// Waits until `pid` has ended, reaping every other child that ends
/// meanwhile; `sigchld` must have been watched since before `pid` existed.
pub(crate) async fn wait_for_exit(
    pid: Pid,
    sigchld: &mut tokio::signal::unix::Signal,
) -> ExitStatus {
    loop {
        if let Some(status) = reap(Some(pid)).main {
            return status;
        }
        if sigchld.recv().await.is_none() {
            // The signal driver is gone; poll instead.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// The pointers of `strings` and a null, as `execve` takes them.
fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// What the child does between the clone and the exec, prepared by the
/// parent (see [`spawn`]).
struct Plan<'a> {
    root: &'a CStr,
    workdir: &'a CStr,
    program: &'a CStr,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    /// The fds that become the child's 0, 1 and 2.
    stdio: [RawFd; 3],
    ids: Option<&'a Ids>,
    /// Where the child writes its errno if it cannot exec (close-on-exec).
    report: RawFd,
}

/// The child's stack, on the caller's (it only makes system calls): left
/// uninitialised, since zeroing it is work under TCG for nothing.
const CHILD_STACK: usize = 32 << 10;

/// Starts the child with `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn`
/// does, rather than fork: the child borrows the tether's memory until its
/// exec, so no page table is copied and neither side takes copy-on-write
/// faults. Two pool agents side by side under TCG (59 starts each, the
/// fork against this): process started median 14.6 → 12.1 ms, first output
/// 39.9 → 38.9 ms (docs/pools.md). The calling thread is suspended until
/// the child has exec'd or exited, which keeps `plan` alive and unchanged
/// for it.
fn clone_and_exec(plan: &Plan<'_>) -> io::Result<Pid> {
    let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); CHILD_STACK];
    // The stack grows down from its end, 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
    // Every signal blocked across the clone: no handler of the tether's may
    // run in the child while it shares the tether's memory. The child
    // unblocks them once their handlers are reset.
    // SAFETY: sigset_t is plain data, filled by sigfillset before use.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; filled by pthread_sigmask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are live locals.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `child` only makes system calls on `plan`, which outlives it
    // (CLONE_VFORK suspends this thread until the child execs or exits), on
    // its own stack `top`, which also outlives it.
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            plan as *const Plan<'_> as *mut libc::c_void,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: `old` is the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(err);
    }
    Ok(Pid::from_raw(pid))
}

/// The child: [`prepare_child`], then exec; on failure its errno goes to
/// the report pipe and the child exits 127.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Plan` `clone_and_exec` passed, alive while the
    // parent is suspended.
    let plan = unsafe { &*(arg as *const Plan<'_>) };
    let errno = match prepare_child(plan) {
        // SAFETY: NUL-terminated strings and null-terminated pointer arrays
        // built by the parent.
        Ok(()) => unsafe {
            libc::execve(
                plan.program.as_ptr(),
                plan.argv.as_ptr(),
                plan.envp.as_ptr(),
            );
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL)
        },
        Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
    };
    let bytes = errno.to_ne_bytes();
    // SAFETY: writes from a live local; `_exit` runs no destructors or
    // atexit handlers of the tether's.
    unsafe {
        libc::write(plan.report, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// The child's half of the spawn: signals back to their defaults, its stdio,
/// chroot into the new root, the working directory, a new session, the
/// tether's fds closed on exec, the user's ids. Runs between the clone and
/// the exec on the tether's memory, so it only makes async-signal-safe
/// system calls on data built before the clone, and allocates nothing
/// (`last_os_error` builds an `Os` error without allocating).
fn prepare_child(plan: &Plan<'_>) -> io::Result<()> {
    // SAFETY: plain system calls on integers, on live locals and on the
    // parent's C strings.
    unsafe {
        // Caught signals to their defaults before they are unblocked (a
        // handler would run on the tether's memory), and SIGPIPE, which
        // Rust's runtime ignores and a container expects at its default.
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut act) != 0 {
                continue;
            }
            let default = act.sa_sigaction == libc::SIG_DFL;
            let ignored = act.sa_sigaction == libc::SIG_IGN;
            if !default && (!ignored || sig == libc::SIGPIPE) {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());

        for (target, &fd) in plan.stdio.iter().enumerate() {
            let target = target as RawFd;
            let ok = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            };
            if !ok {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::chroot(plan.root.as_ptr()) != 0 || libc::chdir(plan.workdir.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Fails only for a process group leader, which a fresh child is not.
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        // Nothing of the tether's (the vsock socket above all) may leak
        // into the container: every fd above stdio is marked close-on-exec
        // (the report pipe must stay open until the exec). A kernel before
        // 5.11 answers ENOSYS, which is ignored: the tether opens its fds
        // CLOEXEC.
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
    if let Some(i) = plan.ids {
        drop_privileges(i)?;
    }
    Ok(())
}

/// Who the process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ids {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Supplementary groups (the primary one included).
    pub(crate) groups: Vec<u32>,
    /// The user's home directory, `/` when unknown.
    pub(crate) home: String,
}

/// Resolves Docker's `user[:group]` (each a name or a number) against the
/// container's `/etc/passwd` and `/etc/group` texts. A numeric user need
/// not exist (its group is then 0); a name must.
pub(crate) fn resolve_user(passwd: &str, group: &str, spec: &str) -> Result<Ids, SpawnError> {
    let err = |why| SpawnError::User(spec.to_owned(), why);
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // name:password:uid:gid:gecos:home:shell
    let pw: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let entry = match user.parse::<u32>() {
        Ok(uid) => pw.iter().find(|f| f[2].parse() == Ok(uid)),
        Err(_) => Some(
            pw.iter()
                .find(|f| f[0] == user)
                .ok_or_else(|| err("no matching entries in passwd file"))?,
        ),
    };
    let uid = match (user.parse::<u32>(), entry) {
        (Ok(u), _) => u,
        (Err(_), Some(f)) => f[2].parse().map_err(|_| err("bad uid in passwd file"))?,
        (Err(_), None) => return Err(err("no matching entries in passwd file")),
    };
    let name = entry.map(|f| f[0]);
    let home = entry
        .and_then(|f| f.get(5))
        .filter(|h| !h.is_empty())
        .map_or_else(|| "/".to_owned(), |h| (*h).to_owned());
    // name:password:gid:members
    let gr: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();
    let gid = match grp {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| err("no matching entries in group file"))?,
        },
        None => entry.and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let mut groups = vec![gid];
    if let Some(n) = name {
        for f in &gr {
            let members = f.get(3).copied().unwrap_or("");
            if members.split(',').any(|m| m == n) {
                if let Ok(g) = f[2].parse::<u32>() {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    Ok(Ids {
        uid,
        gid,
        groups,
        home,
    })
}

/// Switches to `ids` in the child: groups first, then gid, then uid (after
/// setuid nothing else could be changed). Async-signal-safe: plain system
/// calls on memory allocated before the clone.
fn drop_privileges(ids: &Ids) -> io::Result<()> {
    // SAFETY: `groups` is a live slice of gid_t-sized values whose length
    // is passed alongside.
    if unsafe { libc::setgroups(ids.groups.len(), ids.groups.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain system calls with integer arguments.
    if unsafe { libc::setgid(ids.gid) } != 0 || unsafe { libc::setuid(ids.uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The working directory as an absolute path inside the root.
fn absolute_workdir(workdir: Option<&str>) -> String {
    match workdir {
        None | Some("") => "/".to_owned(),
        Some(w) if w.starts_with('/') => w.to_owned(),
        Some(w) => format!("/{w}"),
    }
}

/// What a path inside the new root is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Missing,
    Executable,
    NotExecutable,
    Directory,
}

/// Finds the program `argv0` names, the way `execvp` would inside the new
/// root: a name with a slash is taken as a path (relative to `workdir`),
/// any other is searched on `path_env`. Returns the path to hand to exec
/// after chroot and chdir. A match that is not executable is remembered
/// and reported only if nothing later on `PATH` is (`execvp`'s `EACCES`).
pub(crate) fn resolve_program(
    root: BorrowedFd<'_>,
    argv0: &str,
    path_env: &str,
    workdir: &str,
) -> Result<String, SpawnError> {
    if argv0.is_empty() {
        return Err(SpawnError::NoSuchFile(argv0.to_owned()));
    }
    if argv0.contains('/') {
        return match probe(root, &in_workdir(workdir, argv0)) {
            Kind::Executable => Ok(argv0.to_owned()),
            Kind::Missing => Err(SpawnError::NoSuchFile(argv0.to_owned())),
            Kind::NotExecutable => Err(SpawnError::NotExecutable(argv0.to_owned())),
            Kind::Directory => Err(SpawnError::IsDirectory(argv0.to_owned())),
        };
    }
    let mut denied = None;
    for dir in path_env.split(':') {
        // An empty entry means the current directory, as in POSIX.
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = format!("{}/{argv0}", dir.trim_end_matches('/'));
        match probe(root, &in_workdir(workdir, &candidate)) {
            Kind::Executable => return Ok(candidate),
            Kind::NotExecutable | Kind::Directory => {
                denied.get_or_insert(candidate);
            }
            Kind::Missing => {}
        }
    }
    Err(match denied {
        Some(p) => SpawnError::NotExecutable(p),
        None => SpawnError::NotInPath(argv0.to_owned()),
    })
}

fn in_workdir(workdir: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{path}", workdir.trim_end_matches('/'))
    }
}

/// Classifies `path` as seen from inside `root`: symlinks (absolute ones
/// too) and `..` resolve within the root, as they will after chroot.
fn probe(root: BorrowedFd<'_>, path: &str) -> Kind {
    let Ok(fd) = open_in_root(root, path) else {
        return Kind::Missing;
    };
    let Ok(st) = fstat(fd.as_raw_fd()) else {
        return Kind::Missing;
    };
    let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if fmt == SFlag::S_IFDIR {
        Kind::Directory
    } else if fmt == SFlag::S_IFREG && st.st_mode & 0o111 != 0 {
        Kind::Executable
    } else {
        Kind::NotExecutable
    }
}

/// `struct open_how` (libc's is non-exhaustive, so it cannot be built).
#[repr(C)]
#[derive(Debug)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(root, path, O_PATH, RESOLVE_IN_ROOT)`, falling back to a plain
/// open under the root's path on kernels without openat2 (before 5.6),
/// where absolute symlinks inside the image may then resolve wrongly.
fn open_in_root(root: BorrowedFd<'_>, path: &str) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT,
    };
    // SAFETY: `c` is a valid NUL-terminated string and `how` a valid
    // open_how whose size is passed alongside; both outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if r >= 0 {
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    let rel = CString::new(path.trim_start_matches('/'))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let rel = if rel.as_bytes().is_empty() {
        CString::from(c".")
    } else {
        rel
    };
    // SAFETY: as above, a valid C string and a directory fd.
    let r = unsafe {
        libc::openat(
            root.as_raw_fd(),
            rel.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// A root with: /bin/tool (0755), /bin/data (0644), /usr/bin/link →
    /// /bin/tool (absolute, meaningful only inside the root), /opt/dir/,
    /// /other/data (0644) and /other/tool2 (0755).
    fn fake_root() -> TempDir {
        let t = TempDir::new();
        let p = t.path();
        for d in ["bin", "usr/bin", "opt/dir", "other", "work"] {
            fs::create_dir_all(p.join(d)).unwrap();
        }
        let exe = |rel: &str, mode: u32| {
            fs::write(p.join(rel), b"#!/bin/sh\n").unwrap();
            fs::set_permissions(p.join(rel), fs::Permissions::from_mode(mode)).unwrap();
        };
        exe("bin/tool", 0o755);
        exe("bin/data", 0o644);
        exe("other/data", 0o644);
        exe("other/tool2", 0o700);
        exe("work/local", 0o755);
        symlink("/bin/tool", p.join("usr/bin/vmlet-test-link")).unwrap();
        symlink("/bin/missing", p.join("usr/bin/dangling")).unwrap();
        t
    }

    /// A NUL byte in an argument or in any environment entry (one without
    /// `=`, which the environment skips, too) is refused before any child
    /// exists, with code 125.
    #[test]
    fn nul_bytes_are_refused_before_the_clone() {
        let t = fake_root();
        let spec = |argv: &[&str], env: &[&str]| ProcessSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            ..ProcessSpec::default()
        };
        for (s, bad) in [
            (spec(&["tool", "a\0b"], &["PATH=/bin"]), "a\0b"),
            (spec(&["tool"], &["PATH=/bin", "K=v\0"]), "K=v\0"),
            (
                spec(&["tool"], &["PATH=/bin", "no-equals\0"]),
                "no-equals\0",
            ),
        ] {
            let e = spawn(&s, t.path()).unwrap_err();
            assert!(matches!(&e, SpawnError::Nul(x) if x == bad), "{e:?}");
            assert_eq!(e.code(), 125);
        }
    }

    fn resolve(t: &TempDir, argv0: &str, path: &str, workdir: &str) -> Result<String, SpawnError> {
        let root = File::open(t.path()).unwrap();
        resolve_program(root.as_fd(), argv0, path, workdir)
    }

    #[test]
    fn bare_names_search_path_in_order() {
        let t = fake_root();
        assert_eq!(
            resolve(&t, "tool", "/usr/bin:/bin", "/").unwrap(),
            "/bin/tool"
        );
        assert_eq!(
            resolve(&t, "tool2", "/bin:/other/", "/").unwrap(),
            "/other/tool2"
        );
        assert_eq!(resolve(&t, "tool", DEFAULT_PATH, "/").unwrap(), "/bin/tool");
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let t = fake_root();
        assert_eq!(
            resolve(&t, "vmlet-test-link", "/usr/bin", "/").unwrap(),
            "/usr/bin/vmlet-test-link"
        );
        assert_eq!(
            resolve(&t, "dangling", "/usr/bin", "/").unwrap_err().code(),
            127
        );
        // `..` cannot climb out of the root either.
        assert_eq!(
            resolve(&t, "../../../bin/tool", "", "/work").unwrap(),
            "../../../bin/tool"
        );
    }

    #[test]
    fn missing_is_127_and_not_executable_is_126() {
        let t = fake_root();
        let e = resolve(&t, "nope", "/bin:/usr/bin", "/").unwrap_err();
        assert!(matches!(e, SpawnError::NotInPath(_)));
        assert_eq!(e.code(), 127);
        let e = resolve(&t, "data", "/bin:/usr/bin", "/").unwrap_err();
        assert!(matches!(&e, SpawnError::NotExecutable(p) if p == "/bin/data"));
        assert_eq!(e.code(), 126);
        // A later executable match wins over an earlier non-executable one.
        let e = resolve(&t, "data", "/other:/bin", "/").unwrap_err();
        assert!(matches!(&e, SpawnError::NotExecutable(p) if p == "/other/data"));
        assert_eq!(resolve(&t, "dir", "/opt", "/").unwrap_err().code(), 126);
    }

    #[test]
    fn paths_with_a_slash_are_not_searched() {
        let t = fake_root();
        assert_eq!(resolve(&t, "/bin/tool", "", "/").unwrap(), "/bin/tool");
        assert_eq!(resolve(&t, "./local", "/bin", "/work").unwrap(), "./local");
        assert_eq!(resolve(&t, "./tool", "/bin", "/").unwrap_err().code(), 127);
        assert_eq!(resolve(&t, "/bin/data", "", "/").unwrap_err().code(), 126);
        assert_eq!(resolve(&t, "/opt/dir", "", "/").unwrap_err().code(), 126);
        assert_eq!(resolve(&t, "", "/bin", "/").unwrap_err().code(), 127);
    }

    #[test]
    fn empty_path_entry_is_the_working_directory() {
        let t = fake_root();
        assert_eq!(resolve(&t, "local", "/bin:", "/work").unwrap(), "./local");
    }

    #[test]
    fn env_entries_split_on_the_first_equals() {
        let env: Vec<String> = ["A=1", "B=x=y", "NOVALUE", "=bad", "E="]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(parse_env(&env), vec![("A", "1"), ("B", "x=y"), ("E", "")]);
    }

    #[test]
    fn users_resolve_as_docker_does() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1001::/home/web:/bin/sh\n";
        let group = "root:x:0:\nweb:x:1001:\nstaff:x:50:web,other\n";
        let r = |s| resolve_user(passwd, group, s);
        let web = r("web").unwrap();
        assert_eq!(
            (web.uid, web.gid, web.groups.clone()),
            (1000, 1001, vec![1001, 50])
        );
        assert_eq!(web.home, "/home/web");
        assert_eq!(r("1000").unwrap().gid, 1001);
        let n = r("4242").unwrap();
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 0, "/"));
        assert_eq!(r("web:staff").unwrap().gid, 50);
        assert_eq!(r("web:7").unwrap().gid, 7);
        assert_eq!(r("0:0").unwrap().uid, 0);
        assert_eq!(r("nobody").unwrap_err().code(), 125);
        assert!(r("web:nogroup").is_err());
    }

    #[test]
    fn workdir_is_absolute() {
        assert_eq!(absolute_workdir(None), "/");
        assert_eq!(absolute_workdir(Some("")), "/");
        assert_eq!(absolute_workdir(Some("srv")), "/srv");
        assert_eq!(absolute_workdir(Some("/srv/app")), "/srv/app");
    }

    /// The real spawn path (chroot needs root): a static busybox in a
    /// scratch root runs with the spec's env, workdir and stdio pipes.
    #[test]
    fn spawn_runs_in_the_new_root() {
        use std::io::Read;
        let Some(t) = busybox_root() else { return };
        let spec = ProcessSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo \"$GREETING $(pwd)\"; ls /; echo err >&2; exit 3".into(),
            ],
            env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
            workdir: Some("/srv/app".into()),
            ..ProcessSpec::default()
        };
        let s = spawn(&spec, t.path()).unwrap();
        assert!(s.stdin.is_none());
        let mut out = String::new();
        File::from(s.stdout).read_to_string(&mut out).unwrap();
        let mut err = String::new();
        File::from(s.stderr).read_to_string(&mut err).unwrap();
        let status = nix::sys::wait::waitpid(s.pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(s.pid, 3));
        assert_eq!(out, "hi /srv/app\nbin\nsrv\n");
        assert_eq!(err, "err\n");

        let missing = ProcessSpec {
            argv: vec!["nope".into()],
            ..ProcessSpec::default()
        };
        assert_eq!(spawn(&missing, t.path()).unwrap_err().code(), 127);
    }

    /// A scratch root with a static busybox as `/bin/sh`, or `None` (the
    /// test is skipped) without root or a static `/bin/busybox`.
    fn busybox_root() -> Option<TempDir> {
        if !nix::unistd::geteuid().is_root() || !Path::new("/bin/busybox").exists() {
            eprintln!("skipped: needs root and a static /bin/busybox");
            return None;
        }
        let t = TempDir::new();
        fs::create_dir_all(t.path().join("bin")).unwrap();
        crate::testutil::install_program(
            &t.path().join("bin/busybox"),
            &fs::read("/bin/busybox").unwrap(),
        );
        symlink("busybox", t.path().join("bin/sh")).unwrap();
        Some(t)
    }

    /// Runs `sh -c script` in `root` with `stdin` written to it; returns
    /// its stdout, stderr and wait status.
    fn run_sh(
        root: &Path,
        script: &str,
        stdin: Option<&[u8]>,
        user: Option<&str>,
    ) -> (String, String, nix::sys::wait::WaitStatus) {
        use std::io::{Read, Write};
        let spec = ProcessSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into()],
            stdin: stdin.is_some(),
            user: user.map(str::to_owned),
            ..ProcessSpec::default()
        };
        let s = spawn(&spec, root).unwrap();
        if let (Some(fd), Some(bytes)) = (s.stdin, stdin) {
            File::from(fd).write_all(bytes).unwrap();
        }
        let (mut out, mut err) = (String::new(), String::new());
        File::from(s.stdout).read_to_string(&mut out).unwrap();
        File::from(s.stderr).read_to_string(&mut err).unwrap();
        (out, err, nix::sys::wait::waitpid(s.pid, None).unwrap())
    }

    /// The child starts as a fresh process would: every signal at its
    /// default (SIGPIPE included, which this test process ignores like the
    /// tether) and none blocked, only its stdio open, in a session of its
    /// own, stdin piped through.
    #[test]
    fn the_child_starts_clean() {
        let Some(t) = busybox_root() else { return };
        fs::create_dir_all(t.path().join("proc")).unwrap();
        // Something to leak if fds were inherited: an fd of ours, not CLOEXEC.
        let leak =
            nix::fcntl::open("/dev/null", OFlag::O_RDONLY, nix::sys::stat::Mode::empty()).unwrap();
        let script = "b=/bin/busybox; $b mount -t proc proc /proc; \
                      $b grep -E '^Sig(Blk|Ign|Cgt)' /proc/self/status; \
                      $b ls /proc/self/fd; $b cat; \
                      [ \"$($b cut -d' ' -f6 /proc/self/stat)\" = \"$$\" ] && echo own-session; \
                      $b umount /proc";
        let (out, err, status) = run_sh(t.path(), script, Some(b"piped\n"), None);
        nix::unistd::close(leak).unwrap();
        assert_eq!(err, "");
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{status:?}"
        );
        let lines: Vec<&str> = out.lines().collect();
        // Ignored stays ignored across an exec, except SIGPIPE, which this
        // process ignores (Rust's runtime) and the child must not: what
        // this process inherited ignored (signal 32, say) the child may too.
        let ours = fs::read_to_string("/proc/self/status").unwrap();
        let ignored = ours
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .map(|h| u64::from_str_radix(h, 16).unwrap())
            .unwrap();
        let sigpipe = 1u64 << (libc::SIGPIPE - 1);
        assert_ne!(ignored & sigpipe, 0, "this test needs SIGPIPE ignored");
        assert_eq!(
            lines[..3],
            [
                "SigBlk:\t0000000000000000".to_owned(),
                format!("SigIgn:\t{:016x}", ignored & !sigpipe),
                "SigCgt:\t0000000000000000".to_owned()
            ],
            "{out}"
        );
        // ls's own fds: 0, 1, 2 and the directory it reads (3).
        assert_eq!(lines[3..7], ["0", "1", "2", "3"], "{out}");
        assert_eq!(lines[7..], ["piped", "own-session"], "{out}");
    }

    /// A numeric user need not exist: the child runs with that uid, group 0.
    #[test]
    fn the_child_runs_as_the_user() {
        let Some(t) = busybox_root() else { return };
        let (out, _, status) = run_sh(
            t.path(),
            "echo $(busybox id -u):$(busybox id -g)",
            None,
            Some("1234"),
        );
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{status:?}"
        );
        assert_eq!(out, "1234:0\n");
    }

    /// An exec the kernel refuses is reported with its errno (and the
    /// shell's exit code for it), and the child that could not exec is
    /// reaped, not left a zombie.
    #[test]
    fn a_failed_exec_is_reported_and_reaped() {
        // The check below sees every child of the process, other tests'
        // too: so the test runs again, alone, in a process of its own.
        const ALONE: &str = "VMLET_TETHER_TEST_ALONE";
        if std::env::var_os(ALONE).is_none() {
            let name = "process::tests::a_failed_exec_is_reported_and_reaped";
            let o = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--test-threads=1"])
                .env(ALONE, "1")
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "{out}{}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                out.contains("1 passed"),
                "the test did not run alone: {out}"
            );
            return;
        }
        let Some(t) = busybox_root() else { return };
        let bogus = t.path().join("bin/bogus");
        crate::testutil::install_program(&bogus, b"\x7fELF not really");
        let spec = ProcessSpec {
            argv: vec!["/bin/bogus".into()],
            ..ProcessSpec::default()
        };
        let e = spawn(&spec, t.path()).unwrap_err();
        assert_eq!(e.code(), 126, "{e:?}");
        assert!(
            matches!(&e, SpawnError::Exec(_, io) if io.raw_os_error() == Some(libc::ENOEXEC)),
            "{e:?}"
        );
        // No child of ours is left, exited or not.
        assert_eq!(
            nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
            Err(nix::errno::Errno::ECHILD)
        );
    }
}
