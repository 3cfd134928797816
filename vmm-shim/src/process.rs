//! A child process that outlives its handle: spawned in its own session, reaped by a task,
//! signalled only while it is known not to have been reaped (so a recycled pid is never hit).

use std::fs::File;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};

use crate::confine::Jail;

/// How a child ended, or why waiting for it failed.
pub(crate) type Exit = Result<ExitStatus, String>;

/// A supervised child process. Clones share the same child.
#[derive(Debug, Clone)]
pub(crate) struct Process {
    pid: u32,
    exit: watch::Receiver<Option<Exit>>,
    signals: mpsc::UnboundedSender<(Signal, oneshot::Sender<bool>)>,
}

impl Process {
    /// Spawns `program args` in a new session with stdin from /dev/null and stdout and stderr
    /// appended to `log`, inside `jail`'s cgroups and as its user. The child is not killed
    /// when this value drops.
    pub(crate) fn spawn(
        name: &'static str,
        program: &std::path::Path,
        args: &[String],
        log: &File,
        inherit: &[crate::staged::Inherit],
        jail: &Jail,
    ) -> io::Result<Self> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .kill_on_drop(false);
        if !jail.procs.is_empty() {
            use std::os::fd::AsRawFd;
            let procs: Vec<i32> = jail.procs.iter().map(|f| f.as_raw_fd()).collect();
            // SAFETY: the closure runs in the forked child before exec and only calls write(2),
            // which is async-signal-safe, on descriptors the parent opened and keeps open
            // across spawn (so they are open in the child), from a buffer that is a static
            // literal and a vector allocated before the fork. It runs first, before any other
            // closure can replace a descriptor and while the child may still write cgroup
            // files: the program's first instruction already runs in the VM's cgroup.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &procs {
                        // "0" moves the writing process.
                        if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
        // which is async-signal-safe and touches no memory of the parent. A new session keeps
        // the VMM away from the agent's terminal signals (^C, hangup): VMs outlive the agent.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
        }
        if !inherit.is_empty() {
            let inherit = inherit.to_vec();
            // SAFETY: the closure runs in the forked child before exec and only calls dup2(2),
            // which is async-signal-safe; the source descriptors are open in the parent (the
            // caller keeps them alive across spawn) and so in the child. dup2 clears
            // close-on-exec on the target, so the program inherits them at fixed numbers.
            unsafe {
                cmd.pre_exec(move || {
                    for i in &inherit {
                        if libc::dup2(i.from, i.to) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if let Some(c) = &jail.credentials {
            let (uid, gid) = (c.uid, c.gid);
            let groups: Vec<libc::gid_t> = c.groups.clone();
            // SAFETY: the closure runs in the forked child before exec and only calls
            // setgroups(2), setgid(2) and setuid(2), which are async-signal-safe; `groups` was
            // allocated before the fork and is only read. It is registered last, so it runs
            // after the cgroup writes and descriptor moves that still need the agent's
            // privileges; std applies its own uid/gid settings before any closure, which is
            // why they are not used. Groups first, uid last: each step needs the privilege the
            // next one drops.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().expect("a child that was just spawned has a pid");
        let (exit_tx, exit) = watch::channel(None);
        let (signals, mut rx) = mpsc::unbounded_channel::<(Signal, oneshot::Sender<bool>)>();
        tokio::spawn(async move {
            // Signals go through this task, the only one that reaps the child: while it handles
            // one, the child has not been reaped, so its pid cannot belong to anyone else.
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    Some((sig, done)) = rx.recv() => {
                        let sent = match child.id() {
                            Some(pid) => nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid as i32),
                                sig,
                            )
                            .is_ok(),
                            None => false,
                        };
                        let _ = done.send(sent);
                    }
                }
            };
            let exit = status.map_err(|e| format!("cannot wait for the process: {e}"));
            tracing::debug!(process = name, pid, exit = ?exit, "process exited");
            exit_tx.send_replace(Some(exit));
        });
        Ok(Process { pid, exit, signals })
    }

    /// Watches a process this agent did not start (a VM left running by an earlier agent),
    /// through a pidfd so a recycled pid is never signalled. `must_mention` must appear in its
    /// command line, so a pid reused by an unrelated process is refused. Its exit status cannot
    /// be known (only its parent may reap it), so it is reported as unknown.
    pub(crate) fn adopt(name: &'static str, pid: u32, must_mention: &str) -> io::Result<Self> {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1; it
        // reads and writes no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by pidfd_open, is valid and owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Checked after the pidfd is open: from here on the pid cannot be recycled under us.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        if !String::from_utf8_lossy(&cmdline).contains(must_mention) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} is not {name} of {must_mention}"),
            ));
        }
        // SAFETY: an OwnedFd's as_raw_fd is the same open descriptor for as long as the
        // AsyncFd owns it, which is all register requires.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        let (exit_tx, exit) = watch::channel(None);
        let (signals, mut rx) = mpsc::unbounded_channel::<(Signal, oneshot::Sender<bool>)>();
        tokio::spawn(async move {
            use std::os::fd::AsRawFd;
            loop {
                tokio::select! {
                    // A pidfd becomes readable when its process exits.
                    r = fd.readable() => {
                        if let Ok(mut g) = r {
                            g.retain_ready();
                        }
                        break;
                    }
                    Some((sig, done)) = rx.recv() => {
                        // SAFETY: pidfd_send_signal takes our valid pidfd, a signal number,
                        // a null siginfo (allowed) and zero flags; it writes no memory of ours.
                        let r = unsafe {
                            libc::syscall(
                                libc::SYS_pidfd_send_signal,
                                fd.as_raw_fd(),
                                sig as libc::c_int,
                                std::ptr::null::<libc::siginfo_t>(),
                                0,
                            )
                        };
                        let _ = done.send(r == 0);
                    }
                }
            }
            tracing::debug!(process = name, pid, "adopted process exited");
            exit_tx.send_replace(Some(Err(
                "exited; it was not started by this agent, so its status is unknown".into(),
            )));
        });
        Ok(Process { pid, exit, signals })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit, if the child has exited.
    pub(crate) fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Sends `sig`; false if the child had already exited.
    pub(crate) async fn signal(&self, sig: Signal) -> bool {
        if self.exited().is_some() {
            return false;
        }
        let (tx, rx) = oneshot::channel();
        if self.signals.send((sig, tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Asks the reaping task to SIGKILL the child, without waiting: usable from `Drop`.
    pub(crate) fn kill_now(&self) {
        if self.exited().is_none() {
            let (tx, _) = oneshot::channel();
            let _ = self.signals.send((Signal::SIGKILL, tx));
        }
    }

    /// Waits for the exit. Cancel safe.
    pub(crate) async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        let r = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match r {
            Ok(v) => v.expect("wait_for returned a value it was asked for"),
            // The reaper task is gone without a result: its runtime shut down.
            Err(_) => self.exited().unwrap_or_else(|| {
                Err("the task reaping the process stopped (runtime shut down)".into())
            }),
        }
    }

    /// Waits at most `timeout` for the exit.
    pub(crate) async fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        tokio::time::timeout(timeout, self.wait()).await.ok()
    }

    /// SIGKILLs the child and waits (bounded) for it to be reaped.
    pub(crate) async fn kill_and_reap(&self, timeout: Duration) -> Option<Exit> {
        self.signal(Signal::SIGKILL).await;
        self.wait_timeout(timeout).await
    }
}

/// Undoes work abandoned part-way (a start that failed, or whose future was dropped): when
/// run, or dropped still armed, SIGKILLs the processes, removes the sockets, and removes the
/// cgroup once the processes are gone.
#[derive(Debug, Default)]
pub(crate) struct Undo {
    processes: Vec<Process>,
    sockets: Vec<std::path::PathBuf>,
    cgroup: Option<crate::confine::VmCgroup>,
}

impl Undo {
    pub(crate) fn process(&mut self, p: &Process) {
        self.processes.push(p.clone());
    }

    pub(crate) fn socket(&mut self, p: &std::path::Path) {
        self.sockets.push(p.to_owned());
    }

    pub(crate) fn cgroup(&mut self, c: &crate::confine::VmCgroup) {
        self.cgroup = Some(c.clone());
    }

    /// The work finished: undo nothing.
    pub(crate) fn disarm(mut self) {
        self.processes.clear();
        self.sockets.clear();
        self.cgroup = None;
    }

    /// Undoes now, and waits (bounded) until the processes are reaped and the cgroup gone.
    pub(crate) async fn run(mut self) {
        for p in std::mem::take(&mut self.processes) {
            if p.kill_and_reap(Duration::from_secs(5)).await.is_none() {
                tracing::warn!(pid = p.pid(), "a process survived SIGKILL for 5 s");
            }
        }
        for s in std::mem::take(&mut self.sockets) {
            let _ = crate::vsock_backend::remove_socket(&s);
        }
        if let Some(c) = self.cgroup.take() {
            if let Err(e) = c.remove().await {
                tracing::warn!(error = %e, "cannot remove a cgroup");
            }
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        for p in &self.processes {
            p.kill_now();
        }
        for s in &self.sockets {
            let _ = crate::vsock_backend::remove_socket(s);
        }
        // The cgroup can only go after its processes: their reapers run on the runtime.
        if let Some(c) = self.cgroup.take() {
            let processes = std::mem::take(&mut self.processes);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    for p in processes {
                        let _ = p.wait_timeout(Duration::from_secs(10)).await;
                    }
                    if let Err(e) = c.remove().await {
                        tracing::warn!(error = %e, "cannot remove the cgroup of an abandoned start");
                    }
                });
            }
        }
    }
}

/// A sentence for an exit.
pub(crate) fn describe(name: &str, exit: &Exit) -> String {
    match exit {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(c), _) => format!("{name} exited with status {c}"),
            (None, Some(s)) => {
                let sig = Signal::try_from(s)
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|_| format!("signal {s}"));
                format!("{name} was killed by {sig}")
            }
            (None, None) => format!("{name} ended ({st})"),
        },
        Err(e) => format!("{name}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .create(true)
            .append(true)
            .open(dir.path().join("log"))
            .unwrap();
        (dir, f)
    }

    /// `sleep 30`, unconfined, its output to `log`.
    fn sleeper(log: &File) -> Process {
        Process::spawn(
            "sleep",
            "/bin/sleep".as_ref(),
            &["30".into()],
            log,
            &[],
            &Jail::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn reaps_and_reports_the_status_to_every_waiter() {
        let (_d, log) = log();
        let p = Process::spawn(
            "sh",
            "/bin/sh".as_ref(),
            &["-c".into(), "exit 7".into()],
            &log,
            &[],
            &Jail::default(),
        )
        .unwrap();
        let (a, b) = tokio::join!(p.wait(), p.wait());
        assert_eq!(a.unwrap().code(), Some(7));
        assert_eq!(b.unwrap().code(), Some(7));
        assert_eq!(p.wait().await.unwrap().code(), Some(7));
        assert!(!p.signal(Signal::SIGKILL).await, "no signal after the exit");
        assert_eq!(
            describe("sh", &p.exited().unwrap()),
            "sh exited with status 7"
        );
    }

    #[tokio::test]
    async fn undo_kills_unless_disarmed() {
        let (_d, log) = log();
        let (a, b) = (sleeper(&log), sleeper(&log));
        let mut undo = Undo::default();
        undo.process(&a);
        drop(undo);
        let exit = tokio::time::timeout(Duration::from_secs(10), a.wait())
            .await
            .unwrap();
        assert_eq!(exit.unwrap().signal(), Some(libc::SIGKILL));
        let mut undo = Undo::default();
        undo.process(&b);
        undo.disarm();
        assert!(b.wait_timeout(Duration::from_millis(100)).await.is_none());
        assert!(b.kill_and_reap(Duration::from_secs(5)).await.is_some());
    }

    #[tokio::test]
    async fn adopts_a_process_it_did_not_start() {
        let (_d, log) = log();
        // Started by "someone else": a std child this test reaps itself afterwards.
        let mut other = std::process::Command::new("/bin/sleep")
            .arg("30")
            .stdout(log.try_clone().unwrap())
            .spawn()
            .unwrap();
        let pid = other.id();
        // Until the child has exec'd, its command line is still ours.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .starts_with("/bin/sleep")
        {
            assert!(std::time::Instant::now() < deadline, "sleep never exec'd");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(Process::adopt("sleep", pid, "no-such-word").is_err());
        let p = Process::adopt("sleep", pid, "sleep").unwrap();
        assert!(p.wait_timeout(Duration::from_millis(100)).await.is_none());
        assert!(p.signal(Signal::SIGKILL).await);
        let st = other.wait().unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        let exit = tokio::time::timeout(Duration::from_secs(10), p.wait())
            .await
            .unwrap();
        assert!(exit.unwrap_err().contains("unknown"));
    }

    #[tokio::test]
    async fn kills_and_runs_in_its_own_session() {
        let (_d, log) = log();
        let p = sleeper(&log);
        let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(p.pid() as i32))).unwrap();
        assert_eq!(
            sid.as_raw(),
            p.pid() as i32,
            "the child leads its own session"
        );
        let exit = tokio::time::timeout(
            Duration::from_secs(10),
            p.kill_and_reap(Duration::from_secs(5)),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(exit.as_ref().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(describe("sleep", &exit), "sleep was killed by SIGKILL");
    }
}
