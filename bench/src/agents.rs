//! Private vmletd processes, one per mode, each with its own state
//! directory and socket under the run's work directory.
//!
//! Modes that differ in how the agent runs (pre-staging off or on, a warm
//! pool) need agents that differ only in that; running them side by side
//! lets one run interleave every mode on the same machine. The harness owns
//! them: it starts them, reads their CPU and memory, and ends them and
//! every process that names their directory (VMs outlive their agent).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use vmlet_protocol::client::Client;

/// How to start one agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The `vmletd` binary.
    pub vmletd: PathBuf,
    /// Its directory: `state/`, `api.sock` and `vmletd.log` go here.
    pub dir: PathBuf,
    /// `--guest-dir`.
    pub guest_dir: PathBuf,
    /// `--tether`, if not vmletd's default.
    pub tether: Option<PathBuf>,
    /// `--boot-timeout`, seconds.
    pub boot_timeout: u64,
    /// The mode's own flags, then any the caller adds.
    pub args: Vec<String>,
}

/// A running vmletd the harness started.
#[derive(Debug)]
pub struct AgentProc {
    child: Child,
    /// Its pid, for CPU time and PSS.
    pub pid: u32,
    /// Its directory.
    pub dir: PathBuf,
    /// Its API socket.
    pub socket: PathBuf,
}

impl AgentSpec {
    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Starts the agent and waits until its socket answers; returns it and
    /// a connection to it.
    pub async fn start(&self) -> anyhow::Result<(AgentProc, Client)> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("mkdir {}", self.dir.display()))?;
        let socket = self.dir.join("api.sock");
        let log_path = self.dir.join("vmletd.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(&self.vmletd);
        cmd.arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(&socket)
            .arg("--guest-dir")
            .arg(&self.guest_dir)
            .arg("--boot-timeout")
            .arg(self.boot_timeout.to_string());
        if let Some(t) = &self.tether {
            cmd.arg("--tether").arg(t);
        }
        // An agent owns its cgroup parent (it removes what it did not make
        // there at startup): every agent of the run gets its own.
        if !self.args.iter().any(|a| a.starts_with("--cgroup-parent")) {
            cmd.arg("--cgroup-parent").arg(cgroup_parent(&self.dir));
        }
        let mut child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("running {}", self.vmletd.display()))?;
        let pid = child.id().context("vmletd exited at once")?;
        // Building the initrd and the busybox image takes a while the
        // first time.
        let deadline = Instant::now() + Duration::from_secs(300);
        let client = loop {
            if let Some(st) = child.try_wait()? {
                bail!(
                    "vmletd {} exited with {st} during startup: {}",
                    self.args.join(" "),
                    tail(&log_path, 5)
                );
            }
            if socket.exists() {
                if let Ok(c) = Client::connect(&socket).await {
                    break c;
                }
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                bail!("vmletd did not answer on {} in 300 s", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Ok((
            AgentProc {
                child,
                pid,
                dir: self.dir.clone(),
                socket,
            },
            client,
        ))
    }
}

impl AgentProc {
    /// Ends the agent (SIGTERM: it ends its pool members itself), then
    /// every process still naming its directory: the VMM and vsock backend
    /// of any VM left behind.
    pub async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        kill_naming(&self.dir);
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("vmletd.log"), lines)
    }
}

/// SIGKILLs every process whose command line names `dir` (which only this
/// run's processes do: the directory is the run's own).
pub fn kill_naming(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    for (pid, _) in crate::sys::pids_mentioning(&needle) {
        if pid == std::process::id() {
            continue;
        }
        if let Ok(p) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Copies the directory tree `from` to `to` (regular files and
/// directories; anything else is skipped).
/// A cgroup parent of this agent's own, named after its directory: below
/// the agent's cgroup on v1, from the root on v2 (only leaves hold
/// processes there).
fn cgroup_parent(dir: &Path) -> String {
    // Named after the run's work directory, so scripts/bench.sh can remove
    // the run's (then empty) parents when it ends.
    let part = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let run = dir.parent();
    let name = format!(
        "vmlet-bench-{}-{}-{}",
        part(run.and_then(Path::parent)),
        part(run),
        part(Some(dir))
    );
    let v2_memory = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
    if v2_memory {
        format!("/{name}")
    } else {
        name
    }
}

pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut bytes = 0;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let ft = e.file_type()?;
        let dst = to.join(e.file_name());
        if ft.is_dir() {
            bytes += copy_dir(&e.path(), &dst)?;
        } else if ft.is_file() {
            bytes += std::fs::copy(e.path(), dst)?;
        }
    }
    Ok(bytes)
}

/// The last `n` lines of a file, joined with " | ".
pub fn tail(p: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Whether this vmletd accepts `flag`, from its `--help`.
pub fn has_flag(vmletd: &Path, flag: &str) -> anyhow::Result<bool> {
    let o = std::process::Command::new(vmletd)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", vmletd.display()))?;
    if !o.status.success() {
        bail!("{} --help failed: {}", vmletd.display(), o.status);
    }
    let help = String::from_utf8_lossy(&o.stdout);
    Ok(help_lists(&help, flag))
}

/// Whether clap's help text lists `flag` as an option (not merely
/// mentions it in prose).
pub fn help_lists(help: &str, flag: &str) -> bool {
    // Option lines start with the option (`  -h, --help`, `      --pool <POOL>`).
    help.lines().map(str::trim_start).any(|l| {
        l.starts_with('-')
            && l.split(", ")
                .any(|part| part.split([' ', '=']).next() == Some(flag))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_a_tree() {
        let d = tempfile::tempdir().unwrap();
        let from = d.path().join("guest");
        std::fs::create_dir_all(from.join("modules")).unwrap();
        std::fs::write(from.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(from.join("modules/virtio.ko"), b"m").unwrap();
        let to = d.path().join("copy");
        assert_eq!(copy_dir(&from, &to).unwrap(), 7);
        assert_eq!(std::fs::read(to.join("vmlinux")).unwrap(), b"kernel");
        assert_eq!(std::fs::read(to.join("modules/virtio.ko")).unwrap(), b"m");
    }

    #[test]
    fn finds_listed_options_only() {
        let help = "Usage: vmletd [OPTIONS]\n\nOptions:\n      --pool <POOL>\n          Keep COUNT guests\n      --no-prestage\n          Do not pre-stage, unlike --template-ish prose\n  -h, --help\n          Print help\n";
        assert!(help_lists(help, "--pool"));
        assert!(help_lists(help, "--no-prestage"));
        assert!(help_lists(help, "--help"));
        assert!(!help_lists(help, "--template"));
        assert!(!help_lists(help, "--pool-refill"));
        assert!(!help_lists(help, "--no"));
    }
}
