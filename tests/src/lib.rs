//! Shared helpers for the end-to-end tests: a real vmletd on a temporary
//! state directory, the real `vmlet` CLI, and checks that nothing leaked.
//!
//! The binaries come from the workspace's build (`scripts/test.sh` builds
//! them, the tether for musl included); the guest kernel from
//! `scripts/setup-guest.sh`. A missing piece fails the test with a message
//! saying which command makes it, rather than skipping.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmlet_protocol::client::Client;

pub mod oci;

/// The directory holding the workspace's binaries (target/debug).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The path of a workspace binary, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Where the guest kernel lives.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("VMLET_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmlet/guest"))
}

/// Where `scripts/build-kernel.sh` installs vmlet's tailored guest kernel
/// (`VMLET_TAILORED_KERNEL_DIR` overrides).
pub fn tailored_kernel_dir() -> PathBuf {
    std::env::var_os("VMLET_TAILORED_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmlet/kernels/tailored"))
}

/// The tailored kernel's directory, if it is installed. The kernel is an
/// optional setup step, so a test of it is skipped without it, except
/// where `VMLET_REQUIRE_TAILORED_KERNEL=1` says it must be there
/// (`scripts/test.sh` builds it and sets that): then its absence fails.
pub fn tailored_kernel() -> Option<PathBuf> {
    let dir = tailored_kernel_dir();
    if dir.join("vmlinux").is_file() && dir.join("kernel.release").is_file() {
        return Some(dir);
    }
    let required = std::env::var("VMLET_REQUIRE_TAILORED_KERNEL").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "VMLET_REQUIRE_TAILORED_KERNEL=1 but no tailored kernel in {}: run scripts/build-kernel.sh",
        dir.display()
    );
    eprintln!(
        "skipping: no tailored kernel in {} (scripts/build-kernel.sh builds it)",
        dir.display()
    );
    None
}

/// The static tether from the musl build.
pub fn tether() -> PathBuf {
    let p = bin_dir()
        .parent()
        .expect("target")
        .join("x86_64-unknown-linux-musl/tether/tether");
    assert!(
        p.is_file(),
        "{} is missing: build it with scripts/build.sh",
        p.display()
    );
    p
}

/// The misbehaving tether (cargo feature `hostile`), which
/// `scripts/build.sh` builds into `target/hostile`.
pub fn hostile_tether() -> PathBuf {
    let p = bin_dir()
        .parent()
        .expect("target")
        .join("hostile/x86_64-unknown-linux-musl/tether/tether");
    assert!(
        p.is_file(),
        "{} is missing: build it with scripts/build.sh",
        p.display()
    );
    p
}

/// A vmletd running on a private state directory, stopped (and every
/// process it started killed) on drop.
#[derive(Debug)]
pub struct TestAgent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The API socket.
    pub socket: PathBuf,
    opts: AgentOptions,
    env: Vec<(String, String)>,
}

/// Options for [`TestAgent::start_with`].
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `--boot-timeout` in seconds.
    pub boot_timeout: f64,
    /// More arguments.
    pub extra: Vec<String>,
    /// Another guest directory than the installed one.
    pub guest_dir: Option<PathBuf>,
    /// The tether to boot guests with; the workspace's musl build if `None`.
    pub tether: Option<PathBuf>,
    /// Run vmletd with at most this many open file descriptors.
    pub nofile: Option<u64>,
    /// More environment for vmletd (fault-injection hooks).
    pub env: Vec<(String, String)>,
    /// Put the state directory on a tmpfs of this many MiB, for a test
    /// that fills it.
    pub state_tmpfs_mib: Option<u64>,
}

impl Default for AgentOptions {
    /// With `VMLET_TEST_POOL=N` in the environment, every agent keeps a
    /// warm pool of N busybox guests, so the same tests run against pool
    /// starts; with `VMLET_TEST_TEMPLATE=1`, every agent starts busybox VMs
    /// from a template snapshot (and the harness waits for it to be ready);
    /// with `VMLET_TEST_WARMUP=COMMAND` as well as a pool, every member runs
    /// that warm-up first. `scripts/test.sh` runs the lifecycle suites in
    /// all four modes.
    fn default() -> Self {
        let mut extra: Vec<String> = match std::env::var("VMLET_TEST_POOL") {
            Ok(n) if !n.is_empty() && n != "0" => vec!["--pool".into(), format!("busybox={n}")],
            _ => Vec::new(),
        };
        if let Ok(cmd) = std::env::var("VMLET_TEST_WARMUP") {
            if !extra.is_empty() && !cmd.is_empty() {
                extra.extend(["--pool-warmup".into(), format!("busybox={cmd}")]);
            }
        }
        if std::env::var("VMLET_TEST_TEMPLATE").is_ok_and(|v| !v.is_empty() && v != "0") {
            extra.extend(["--template".into(), "busybox".into()]);
        }
        AgentOptions {
            boot_timeout: 120.0,
            extra,
            guest_dir: None,
            tether: None,
            nofile: None,
            env: Vec::new(),
            state_tmpfs_mib: None,
        }
    }
}

impl TestAgent {
    /// Starts vmletd with defaults.
    pub fn start() -> TestAgent {
        Self::start_with(AgentOptions::default())
    }

    /// Starts vmletd and waits until its socket answers.
    pub fn start_with(opts: AgentOptions) -> TestAgent {
        let kernel = opts
            .guest_dir
            .clone()
            .unwrap_or_else(guest_dir)
            .join("vmlinux");
        assert!(
            kernel.is_file(),
            "{} is missing: run scripts/setup-guest.sh",
            kernel.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("vmlet-e2e-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        // The VMM's unprivileged user must be able to enter the state
        // directory (not list it).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod the temp dir");
        let socket = dir.path().join("api.sock");
        if let Some(mib) = opts.state_tmpfs_mib {
            let state = dir.path().join("state");
            std::fs::create_dir(&state).expect("mkdir the state directory");
            let o = Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={mib}m,mode=0711"))
                .arg("vmlet-test-state")
                .arg(&state)
                .output()
                .expect("run mount");
            assert!(o.status.success(), "mount a tmpfs: {}", stderr(&o));
        }
        let mut a = TestAgent {
            child: None,
            dir,
            socket,
            env: opts.env.clone(),
            opts,
        };
        a.spawn_daemon();
        if a.opts.extra.iter().any(|x| x == "--template") {
            a.wait_templates_ready();
        }
        // The suites rerun with a pool: their first starts must be pool
        // starts, not misses on a pool still booting.
        if std::env::var("VMLET_TEST_POOL").is_ok_and(|v| !v.is_empty() && v != "0")
            && a.opts.extra.iter().any(|x| x == "--pool")
        {
            a.wait_pools_full();
        }
        a
    }

    /// Waits until every pool of the agent has as many members ready as it
    /// keeps.
    pub fn wait_pools_full(&self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let out = stdout(&self.run(&["pool"]));
            let rows: Vec<Vec<&str>> = out
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().collect())
                .collect();
            // IMAGE TARGET READY ...
            if !rows.is_empty() && rows.iter().all(|r| r.len() > 2 && r[1] == r[2]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pools not full in 180 s:\n{out}\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vmletd.log"))
            .expect("log file");
        // prlimit execs vmletd, so the child's pid is vmletd's.
        let mut cmd = match self.opts.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(bin("vmletd"));
                c
            }
            None => Command::new(bin("vmletd")),
        };
        let child = cmd
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--guest-dir")
            .arg(self.opts.guest_dir.clone().unwrap_or_else(guest_dir))
            .arg("--tether")
            .arg(self.opts.tether.clone().unwrap_or_else(tether))
            .arg("--boot-timeout")
            .arg(self.opts.boot_timeout.to_string())
            .args(self.cgroup_parent_args())
            .args(&self.opts.extra)
            .env("VMLET_LOG", "info,vmlet_agent=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn vmletd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "vmletd exited with {st} during startup:\n{}",
                    self.daemon_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "vmletd did not answer on its socket in 60 s:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every template of the agent has a snapshot ready, so
    /// the starts that follow are restores.
    pub fn wait_templates_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let o = self.run(&["template", "--json"]);
            let t: serde_json::Value =
                serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
            let all_ready = t
                .as_array()
                .is_some_and(|a| a.iter().all(|t| t["status"] == "ready"));
            if all_ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "templates not ready in 180 s: {t}\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `--cgroup-parent` for this agent alone (an agent removes what it
    /// does not own from its parent at startup, and tests run at once),
    /// unless the test gave one.
    fn cgroup_parent_args(&self) -> Vec<String> {
        if self.opts.extra.iter().any(|a| a == "--cgroup-parent") {
            return Vec::new();
        }
        vec!["--cgroup-parent".into(), self.cgroup_parent()]
    }

    /// The cgroup parent the agent was given by [`TestAgent::start`]:
    /// below the test's own cgroup on v1 (so VMs stay inside whatever
    /// limits the test runs under), from the root on v2 (where only leaves
    /// hold processes).
    pub fn cgroup_parent(&self) -> String {
        let name = self
            .dir
            .path()
            .file_name()
            .expect("temp dir name")
            .to_string_lossy()
            .into_owned();
        if cgroup_v2_has_memory() {
            format!("/{name}")
        } else {
            name
        }
    }

    /// Kills vmletd with SIGKILL, as a crash would; its VMs keep running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops vmletd with SIGTERM and waits (bounded) for it to exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() {
                assert!(Instant::now() < deadline, "vmletd ignored SIGTERM for 30 s");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts a new vmletd on the same state directory and socket, with
    /// `env` added to its environment.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn_daemon();
    }

    /// Starts a new vmletd on the same state directory and socket.
    pub fn restart(&mut self) {
        self.restart_with_env(&[]);
    }

    /// The pid of the running vmletd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM:")
    }

    /// The agent's resident memory now (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS:")
    }

    /// The agent's anonymous resident memory now (`RssAnon`, without the
    /// staged kernel and files it maps), in KiB.
    pub fn anon_rss_kib(&self) -> u64 {
        self.proc_status_kib("RssAnon:")
    }

    fn proc_status_kib(&self, key: &str) -> u64 {
        let pid = self.pid().expect("vmletd runs");
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    }

    /// How many file descriptors the agent holds open.
    pub fn fd_count(&self) -> usize {
        let pid = self.pid().expect("vmletd runs");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("proc fd")
            .count()
    }

    /// A raw connection to the API socket, reads bounded by 20 s, before
    /// any hello.
    pub fn raw_connection(&self) -> std::os::unix::net::UnixStream {
        let s = std::os::unix::net::UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s
    }

    /// A raw connection that has negotiated the API version.
    pub fn raw_client(&self) -> std::os::unix::net::UnixStream {
        let mut s = self.raw_connection();
        raw_hello(&mut s);
        s
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// What vmletd printed so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vmletd.log")).unwrap_or_default()
    }

    /// A `vmlet` command aimed at this agent.
    pub fn vmlet(&self) -> Command {
        let mut c = Command::new(bin("vmlet"));
        c.env("VMLET_SOCKET", &self.socket);
        c
    }

    /// Runs `vmlet args…` to completion, bounded in time.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_input(args, None)
    }

    /// Runs `vmlet args…` with `input` on stdin, bounded in time.
    pub fn run_with_input(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let mut c = self.vmlet();
        c.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = c.spawn().expect("spawn vmlet");
        if let Some(data) = input {
            // Written from a thread, so a child that answers before it has
            // read everything cannot deadlock against this writer.
            let mut stdin = child.stdin.take().expect("stdin");
            let data = data.to_vec();
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&data);
            });
        }
        wait_output(child, Duration::from_secs(240), &format!("vmlet {args:?}"))
    }

    /// `vmlet run --rm busybox`: echo reaches stdout, stdout and stderr
    /// stay apart, and the container's exit code is vmlet's.
    pub fn assert_echo_and_exit_codes(&self) {
        let o = self.run(&["run", "--rm", "busybox", "--", "echo", "hello"]);
        assert_eq!(stdout(&o), "hello\n", "stderr: {}", stderr(&o));
        assert_eq!(o.status.code(), Some(0));
        let script = "echo out; echo err >&2; exit 7";
        let o = self.run(&["run", "--rm", "busybox", "--", "sh", "-c", script]);
        assert_eq!(stdout(&o), "out\n");
        assert_eq!(stderr(&o), "err\n");
        assert_eq!(o.status.code(), Some(7));
    }

    /// `vmlet run -i --rm busybox`: `input` reaches the container's stdin
    /// to its end (then "done" is printed), and it exits 0.
    pub fn assert_stdin_reaches_the_container(&self, input: &[u8]) {
        let args = [
            "run",
            "-i",
            "--rm",
            "busybox",
            "--",
            "sh",
            "-c",
            "cat; echo done",
        ];
        let o = self.run_with_input(&args, Some(input));
        let mut want = input.to_vec();
        want.extend_from_slice(b"done\n");
        assert!(o.stdout == want, "stdout differs; stderr: {}", stderr(&o));
        assert_eq!(o.status.code(), Some(0));
    }

    /// `vmlet run -d ARGS…`: starts a detached containerVM, checks that
    /// worked, and returns its id.
    pub fn detach(&self, args: &[&str]) -> String {
        let mut all = vec!["run", "-d"];
        all.extend_from_slice(args);
        let o = self.run(&all);
        assert_eq!(o.status.code(), Some(0), "vmlet {all:?}: {}", stderr(&o));
        let id = stdout(&o).trim().to_string();
        assert_eq!(id.len(), 16, "not an id: {id:?}");
        id
    }

    /// Waits (bounded) until `vmlet logs ID` prints exactly `want`; output
    /// reaches the log a moment after a detached start returns.
    pub fn wait_logs(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = stdout(&self.run(&["logs", id]));
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline && want.starts_with(&got),
                "logs of {id}: {got:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) until `vmlet logs ID` holds `needle`, and returns
    /// the log then: for output whose whole text the test cannot predict.
    pub fn wait_logs_containing(&self, id: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let got = stdout(&self.run(&["logs", id]));
            if got.contains(needle) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log of {id}: {got:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `vmlet inspect ID` as JSON.
    pub fn inspect(&self, id: &str) -> serde_json::Value {
        let o = self.run(&["inspect", id]);
        assert_eq!(o.status.code(), Some(0), "inspect {id}: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).expect("inspect prints JSON")
    }

    /// An API client.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.expect("connect")
    }

    /// Pids of processes whose command line mentions `path` (QEMU and the
    /// vsock backend name their VM's directory in their arguments).
    pub fn processes_mentioning(path: &Path) -> Vec<i32> {
        let needle = path.to_string_lossy().into_owned();
        let mut pids = Vec::new();
        let me = std::process::id() as i32;
        for ent in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(cmd) = std::fs::read(ent.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) && !cmd.contains("vmletd") {
                pids.push(pid);
            }
        }
        pids
    }

    /// Directories of VMs that are containers (warm-pool members, which
    /// belong to the agent until a create takes them, are left out).
    pub fn container_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state_dir().join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|d| {
                let rec = std::fs::read(d.join("vm.json")).unwrap_or_default();
                let rec: serde_json::Value = serde_json::from_slice(&rec).unwrap_or_default();
                rec["pooled"] != serde_json::Value::Bool(true)
            })
            .collect()
    }

    /// Waits (bounded) until no process belongs to a container VM.
    pub fn assert_no_container_processes(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pids: Vec<i32> = self
                .container_dirs()
                .iter()
                .flat_map(|d| Self::processes_mentioning(d))
                .collect();
            if pids.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "container processes still alive: {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Socket files left in VM `id`'s directory and its vsock directory.
    pub fn sockets_left(&self, id: &str) -> Vec<std::ffi::OsString> {
        let dir = self.vm_dir(id);
        [dir.clone(), dir.join("vsock")]
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().contains(".sock"))
            .map(|e| e.file_name())
            .collect()
    }

    /// The directory of VM `id`.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.state_dir().join("vms").join(id)
    }

    /// Waits (bounded) until no process mentions VM `id`'s directory.
    pub fn assert_no_processes(&self, id: &str) {
        let log = || self.daemon_log();
        assert_no_processes_under(&self.vm_dir(id), &format!("VM {id}"), &log);
    }
}

/// Waits (bounded, 20 s) until no process's command line mentions `dir`;
/// fails naming `what`, the processes left and `context()` (an agent's log,
/// say).
pub fn assert_no_processes_under(dir: &Path, what: &str, context: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids = TestAgent::processes_mentioning(dir);
        if pids.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes of {what} still alive: {}\n{}",
            pids.iter()
                .map(|p| {
                    let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    format!(
                        "{p} {}",
                        String::from_utf8_lossy(&c)
                            .replace('\0', " ")
                            .chars()
                            .take(160)
                            .collect::<String>()
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the unified (v2) hierarchy offers the memory controller, so
/// agents use cgroup v2.
pub fn cgroup_v2_has_memory() -> bool {
    cgroup_mounts().iter().any(|(point, v2, _)| {
        *v2 && std::fs::read_to_string(point.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
    })
}

/// Cgroup filesystems: mount point, whether it is v2, v1 controllers.
fn cgroup_mounts() -> Vec<(PathBuf, bool, Vec<String>)> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mi.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let opts = r.nth(1)?;
            let ctrls = opts.split(',').map(str::to_owned).collect();
            match fstype {
                "cgroup2" => Some((PathBuf::from(point), true, Vec::new())),
                "cgroup" => Some((PathBuf::from(point), false, ctrls)),
                _ => None,
            }
        })
        .collect()
}

/// Where a cgroup parent `parent` (as `--cgroup-parent` takes it) lies in
/// every mounted hierarchy, for this process.
pub fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own: Vec<(Vec<&str>, &str)> = own
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _ = it.next()?;
            let c = it.next()?;
            Some((c.split(',').filter(|x| !x.is_empty()).collect(), it.next()?))
        })
        .collect();
    cgroup_mounts()
        .into_iter()
        .map(|(point, v2, ctrls)| {
            if let Some(abs) = parent.strip_prefix('/') {
                return point.join(abs);
            }
            let mine = own
                .iter()
                .find(|(c, _)| {
                    if v2 {
                        c.is_empty()
                    } else {
                        c.iter().any(|x| ctrls.iter().any(|y| y == x))
                    }
                })
                .map(|(_, p)| *p)
                .unwrap_or("/");
            point.join(mine.trim_start_matches('/')).join(parent)
        })
        .collect()
}

/// Removes cgroup directories and the cgroups below them, killing what
/// is still in them (bounded: a few seconds).
pub fn remove_cgroups(dirs: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for d in dirs.iter().filter(|d| d.is_dir()) {
        let children: Vec<PathBuf> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        for c in children.iter().chain(std::iter::once(d)) {
            loop {
                let procs = std::fs::read_to_string(c.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                if std::fs::remove_dir(c).is_ok() || !c.exists() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Says hello on a raw API connection and checks the answer.
pub fn raw_hello(s: &mut std::os::unix::net::UnixStream) {
    use vmlet_protocol::api::{ClientMessage, Request, Response, ServerMessage};
    use vmlet_protocol::frame::{self, MAX_FRAME_LEN};
    frame::write_frame(
        s,
        &ClientMessage {
            id: 1,
            body: Request::Hello {
                min_version: 1,
                max_version: 1,
                client: "test".into(),
            },
        },
    )
    .expect("write hello");
    let r: ServerMessage = frame::read_frame(s, MAX_FRAME_LEN)
        .expect("read hello")
        .expect("a hello reply");
    assert!(
        matches!(r.body, Response::Hello { version: 1, .. }),
        "{r:?}"
    );
}

/// Waits for a child with a deadline, killing it past the deadline.
pub fn wait_output(mut child: Child, limit: Duration, what: &str) -> Output {
    // The pipes are drained while waiting: a child with more output than
    // a pipe holds would otherwise block on write and never exit.
    fn drain(p: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{what} did not finish in {limit:?}; stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // VMs outlive the agent by design; a test must not leave them.
        for pid in Self::processes_mentioning(self.dir.path()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Nor their cgroups.
        if self.cgroup_parent_args().len() == 2 {
            remove_cgroups(&cgroup_dirs(&self.cgroup_parent()));
        }
        if std::thread::panicking() {
            eprintln!("---- vmletd log ----\n{}", self.daemon_log());
            let vms = self.state_dir().join("vms");
            for ent in std::fs::read_dir(vms).into_iter().flatten().flatten() {
                for f in ["console.log", "vmm.log"] {
                    if let Ok(s) = std::fs::read_to_string(ent.path().join(f)) {
                        let tail: String = s
                            .chars()
                            .rev()
                            .take(4000)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect();
                        eprintln!("---- {}/{f} ----\n{tail}", ent.path().display());
                    }
                }
            }
        }
        if self.opts.state_tmpfs_mib.is_some() {
            let _ = Command::new("umount")
                .arg("--lazy")
                .arg(self.state_dir())
                .status();
        }
    }
}

/// Stdout of an output as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stderr of an output as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Samples a process's resident memory (`VmRSS`) every 50 ms until
/// stopped, and keeps the highest figure: unlike `VmHWM`, it leaves out
/// what the process held before sampling began (vmletd stages the guest
/// kernel and initrd through memory at startup).
#[derive(Debug)]
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    /// Starts sampling the agent.
    pub fn start(a: &TestAgent) -> RssSampler {
        let pid = a.pid().expect("vmletd runs");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kib) = st
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                {
                    max = max.max(kib);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the highest `VmRSS` seen, in KiB.
    pub fn max_kib(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("sampler"))
            .unwrap_or(0)
    }
}
