//! vmlet-bench: containerVM start latency, every mode side by side in one
//! run ([`Mode`]): (a) the start a user would script by hand, (b) a cold
//! start through a vmletd with pre-staging off, (c) a start through a
//! vmletd that pre-staged the image, (d) a hand-off from a warm pool,
//! (e) a template clone where the agent offers one (else the mode is
//! reported unavailable, with the reason).
//!
//! The harness starts one private vmletd per agent mode, so the agents
//! differ only in the mode's flags, then interleaves the modes batch by
//! batch at each concurrency, every mode with the same N and C. Every
//! start runs `echo ready`. "Ready" is the tether's hello, the guest's own
//! signal; "first output" is the first byte of `ready` reaching the
//! caller. Output: a markdown report (stdout or `--markdown`), `--json`
//! with every sample, `--svg` with the latency distributions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use vmlet_bench::agents::{self, AgentProc, AgentSpec};
use vmlet_bench::baseline::{self, Baseline};
use vmlet_bench::cache::{self, Evicted};
use vmlet_bench::mode::Mode;
use vmlet_bench::report::{self, MemoryResult, ModeResult, ModeStatus, Report, Sample};
use vmlet_bench::stats::summarize;
use vmlet_bench::sys::{self, Machine};
use vmlet_protocol::api::{AttachSpec, CreateSpec, Phase, Request, Response, VersionInfo};
use vmlet_protocol::client::Client;
use vmm_shim::Accel;

/// Measures containerVM start latency in every mode side by side: a
/// hand-written baseline, cold, pre-staged, pool (without and with a
/// warm-up) and template starts.
#[derive(Debug, Parser)]
struct Args {
    /// The vmletd to run (one per agent mode); default: the one beside
    /// this binary.
    #[arg(long)]
    vmletd: Option<PathBuf>,
    /// The tether the agents boot guests with; default: vmletd's own.
    #[arg(long, env = "VMLET_TETHER")]
    tether: Option<PathBuf>,
    /// Where the guest kernel (`vmlinux`) and its modules are; the run
    /// copies them into its work directory and boots every mode from the
    /// copy.
    #[arg(long, env = "VMLET_GUEST_DIR", default_value = "/var/lib/vmlet/guest")]
    guest_dir: PathBuf,
    /// One more argument for every agent (`--agent-arg=--accel=tcg`).
    /// Repeatable.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Modes to run side by side.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,cold,prestaged,pool,pool-warm,template"
    )]
    modes: Vec<Mode>,
    /// Measured starts per mode and concurrency.
    #[arg(short = 'n', long, default_value_t = 10)]
    runs: usize,
    /// Discarded warm-up batches per mode and concurrency.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Starts in flight at once; a list measures each in turn.
    #[arg(short, long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Image every start runs (a fresh agent has busybox).
    #[arg(long, default_value = "busybox")]
    image: String,
    /// An image archive (`docker save` tar or tarred OCI layout) every
    /// agent of the run imports before it is measured; `--image` names
    /// the image in it. `scripts/make-debian-image.sh` builds one.
    #[arg(long)]
    image_archive: Option<PathBuf>,
    /// `evict`: before every batch, drop the start's input files (kernel,
    /// initrd, image store) from the page cache, so "cold" means cold;
    /// `keep`: leave the page cache alone.
    #[arg(long, value_enum, default_value = "evict")]
    page_cache: PageCache,
    /// Seconds after the first output at which memory is sampled, in one
    /// extra start per mode whose command stays up.
    #[arg(long, default_value_t = 1.5)]
    memory_after: f64,
    /// Where the run's agents and the baseline keep their files (a fresh
    /// directory inside it, removed at the end). Page-cache eviction needs
    /// it on a disk filesystem, not tmpfs.
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
    /// How long a guest may take to boot, in seconds.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    /// Write the markdown report here instead of stdout.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write every sample and summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of the latency distributions here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PageCache {
    Evict,
    Keep,
}

const COMMAND: [&str; 2] = ["echo", "ready"];

/// An agent mode's running agent.
#[derive(Debug)]
struct Target {
    client: Client,
    pid: u32,
    /// Its state directory, which every process of its VMs names.
    state_dir: PathBuf,
    /// The pool's size, for a pool agent.
    pool: Option<u32>,
}

/// Everything the batches need, shared by their tasks.
#[derive(Debug)]
struct Runner {
    image: String,
    targets: BTreeMap<Mode, Target>,
    baseline: Option<Baseline>,
    /// Every file any mode's start reads; evicted before each batch.
    evict: Option<Vec<PathBuf>>,
    /// Each mode's own input files, to see what stayed in memory.
    inputs: BTreeMap<Mode, Vec<PathBuf>>,
    /// The 1-minute load average at each measured batch's start.
    load: std::sync::Mutex<Vec<f64>>,
}

/// One batch's outcome.
struct Batch {
    samples: Vec<Sample>,
    wall: Duration,
    /// The pool's refill after the batch.
    refill: Option<Duration>,
    agent_cpu_s: Option<f64>,
    evicted: Option<Evicted>,
}

impl Runner {
    fn target(&self, m: Mode) -> anyhow::Result<&Target> {
        self.targets
            .get(&m)
            .with_context(|| format!("no agent for {}", m.name()))
    }

    /// One start through `mode`'s agent: create, attach (replaying from
    /// the first byte), start, read to the end, inspect, remove.
    async fn agent_start(&self, mode: Mode) -> anyhow::Result<Sample> {
        let c = &self.target(mode)?.client;
        let t0 = Instant::now();
        let id = c
            .create(CreateSpec {
                image: self.image.clone(),
                argv: COMMAND.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await?;
        let mut s = c.stream(attach(&id)).await?;
        let before_start = t0.elapsed();
        c.start(&id).await?;
        let mut first = None;
        while let Some(r) = s.next().await {
            match r {
                Response::Output { .. } if first.is_none() => first = Some(t0.elapsed()),
                Response::StreamEnd { .. } => break,
                Response::Error(e) => bail!("attach failed: {e}"),
                _ => {}
            }
        }
        let first = first.context("the container wrote nothing")?;
        c.wait(&id).await?;
        let info = c.inspect(&id).await?;
        c.remove(&id, true).await?;
        if let Some(want) = mode.start_mode() {
            if info.start_mode != want {
                bail!(
                    "a {} start was a {:?} start, not {want:?}",
                    mode.name(),
                    info.start_mode
                );
            }
        }
        let phases_ms: BTreeMap<_, _> = info
            .phases
            .iter()
            .map(|p| (p.phase.name(), p.at_us as f64 / 1000.0))
            .collect();
        let booted = phases_ms
            .get(Phase::GuestBooted.name())
            .copied()
            .context("the agent recorded no guest-booted phase")?;
        Ok(Sample {
            // The agent's clock starts at the start request; the client
            // had spent `before_start` creating and attaching.
            ready_ms: before_start.as_secs_f64() * 1000.0 + booted,
            first_output_ms: first.as_secs_f64() * 1000.0,
            phases_ms,
            // A pool member or a template booted before the start.
            guest_ms: match mode {
                Mode::Pool | Mode::PoolWarm | Mode::Template => BTreeMap::new(),
                _ => info
                    .guest_boot
                    .as_ref()
                    .map(report::guest_ms)
                    .unwrap_or_default(),
            },
            root_ms: info.root.as_ref().map(report::root_ms).unwrap_or_default(),
        })
    }

    async fn baseline_start(&self, slot: usize) -> anyhow::Result<Sample> {
        let b = self.baseline.as_ref().context("no baseline configured")?;
        let r = b.run(slot, &COMMAND, None).await?;
        Ok(Sample {
            ready_ms: r.phases_ms["guest-booted"],
            first_output_ms: r.phases_ms["first-output"],
            phases_ms: r.phases_ms,
            guest_ms: r.guest.as_ref().map(report::guest_ms).unwrap_or_default(),
            root_ms: r.root.as_ref().map(report::root_ms).unwrap_or_default(),
        })
    }

    /// Waits until `mode`'s pool is full again; returns how long that took.
    async fn pool_full(&self, mode: Mode) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let target = self.target(mode)?;
        let Some(size) = target.pool else {
            return Ok(Duration::ZERO);
        };
        let deadline = t + Duration::from_secs(600);
        loop {
            if let Response::Pools(p) = target.client.call(Request::Pools).await? {
                if let Some(p) = p.first() {
                    if p.ready >= size {
                        return Ok(t.elapsed());
                    }
                    if p.failures > 0 {
                        bail!("{} pool member(s) failed to boot", p.failures);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("the pool did not fill in 600 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One batch of `n` concurrent starts in `mode`.
    async fn batch(self: &Arc<Self>, mode: Mode, n: usize) -> anyhow::Result<Batch> {
        let pool = self.targets.get(&mode).is_some_and(|t| t.pool.is_some());
        if pool {
            self.pool_full(mode).await?;
        }
        let evicted = match &self.evict {
            Some(files) => {
                cache::evict_all(files).context("evicting the start's files")?;
                let own = self.inputs.get(&mode).map_or(&[][..], |v| &v[..]);
                Some(cache::evict_all(own)?)
            }
            None => None,
        };
        let pid = self.targets.get(&mode).map(|t| t.pid);
        let cpu0 = pid.and_then(|p| sys::cpu_seconds(p).ok());
        let t = Instant::now();
        let mut hs = Vec::new();
        for slot in 0..n {
            let me = self.clone();
            hs.push(tokio::spawn(async move {
                match mode {
                    Mode::Baseline => me.baseline_start(slot).await,
                    m => me.agent_start(m).await,
                }
            }));
        }
        let mut samples = Vec::new();
        for h in hs {
            samples.push(
                h.await?
                    .with_context(|| format!("a {} start failed", mode.name()))?,
            );
        }
        let wall = t.elapsed();
        // The pool's refill is the price of its next hand-offs: wait for it
        // here, outside the batch's time but inside the agent's CPU, and
        // before the next mode's batch, so it never runs under another
        // mode's starts.
        let refill = if pool {
            Some(self.pool_full(mode).await?)
        } else {
            None
        };
        let agent_cpu_s = match (cpu0, pid.and_then(|p| sys::cpu_seconds(p).ok())) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        Ok(Batch {
            samples,
            wall,
            refill,
            agent_cpu_s,
            evicted,
        })
    }

    /// Memory of one VM of `mode`: one more start whose command stays up,
    /// sampled `after` its first output (and, for a pool, once the pool is
    /// full again, so its members are booted, not half-way).
    async fn memory(&self, mode: Mode, after: Duration) -> anyhow::Result<MemoryResult> {
        if mode == Mode::Baseline {
            let b = self.baseline.as_ref().context("no baseline configured")?;
            let hold = format!("echo ready; sleep {}", after.as_secs_f64() + 1.5);
            let r = b.run(0, &["sh", "-c", hold.as_str()], Some(after)).await?;
            return Ok(MemoryResult {
                mode,
                vm_pss_kib: r.pss_kib.context("the baseline sampled no memory")?,
                agent_pss_kib: None,
                guests_held: None,
                agent_share_kib: None,
                pool_members_pss_kib: None,
            });
        }
        let target = self.target(mode)?;
        if target.pool.is_some() {
            self.pool_full(mode).await?;
        }
        let c = &target.client;
        let id = c
            .create(CreateSpec {
                image: self.image.clone(),
                argv: ["sh", "-c", "echo ready; exec sleep 3600"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                ..Default::default()
            })
            .await?;
        let mut s = c.stream(attach(&id)).await?;
        c.start(&id).await?;
        let r = async {
            loop {
                match s.next().await {
                    Some(Response::Output { .. }) => break,
                    Some(Response::Error(e)) => bail!("attach failed: {e}"),
                    None | Some(Response::StreamEnd { .. }) => {
                        bail!("the container ended before writing")
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(after).await;
            if target.pool.is_some() {
                self.pool_full(mode).await?;
            }
            let info = c.inspect(&id).await?;
            let qemu = info.vmm_pid.context("the VM has no VMM pid")?;
            let mut own = vec![qemu];
            // The backend's command line names the VM's directory, which
            // holds its id.
            for (pid, comm) in sys::pids_mentioning(&id) {
                if comm.starts_with("vhost-device") {
                    own.push(pid);
                }
            }
            let mut vm_pss = 0;
            for &p in &own {
                vm_pss += sys::pss_kib(p).with_context(|| format!("the PSS of {p}"))?;
            }
            let agent_pss = sys::pss_kib(target.pid).context("vmletd's PSS")?;
            let mut members = None;
            let mut guests = 1u32;
            if target.pool.is_some() {
                if let Response::Pools(p) = c.call(Request::Pools).await? {
                    guests += p.iter().map(|p| p.ready + p.filling).sum::<u32>();
                }
                // The members' VMMs and backends name the agent's directory.
                let mut sum = 0;
                for (pid, comm) in sys::pids_mentioning(&target.state_dir.to_string_lossy()) {
                    if !own.contains(&pid)
                        && (comm.starts_with("qemu") || comm.starts_with("vhost-device"))
                    {
                        sum += sys::pss_kib(pid).unwrap_or(0);
                    }
                }
                members = Some(sum);
            }
            Ok(MemoryResult {
                mode,
                vm_pss_kib: vm_pss,
                agent_pss_kib: Some(agent_pss),
                guests_held: Some(guests),
                agent_share_kib: Some(agent_pss / u64::from(guests)),
                pool_members_pss_kib: members,
            })
        }
        .await;
        let _ = c.remove(&id, true).await;
        r
    }
}

fn attach(id: &str) -> Request {
    Request::Attach(AttachSpec {
        vm: id.to_string(),
        stdin: false,
        stdout: true,
        stderr: true,
        replay: true,
    })
}

fn date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn find(name: &'static str) -> anyhow::Result<PathBuf> {
    vmm_shim::qemu::find_program(name).with_context(|| format!("{name} is not installed"))
}

/// QEMU processes on the host that are not this run's.
fn foreign_vmms(work: &Path) -> usize {
    let ours = sys::pids_mentioning(&work.to_string_lossy());
    sys::pids_mentioning("qemu-system")
        .into_iter()
        .filter(|(pid, comm)| comm.starts_with("qemu") && !ours.iter().any(|(p, _)| p == pid))
        .count()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.runs == 0 || a.concurrency.contains(&0) {
        bail!("--runs and --concurrency must be at least 1");
    }
    let vmletd = match &a.vmletd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of this binary")?
            .join("vmletd"),
    };
    if !vmletd.is_file() {
        bail!("no vmletd at {}: pass --vmletd", vmletd.display());
    }
    let work = a.work_dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("mkdir {}", work.display()))?;
    let mut procs = Vec::new();
    let r = run(&a, &vmletd, &work, &mut procs).await;
    for p in procs {
        p.stop().await;
    }
    agents::kill_naming(&work);
    let _ = std::fs::remove_dir_all(&work);
    let report = r?;

    let md = report::markdown(&report);
    match &a.markdown {
        Some(p) => std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{md}"),
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.svg {
        std::fs::write(p, report::plot(&report))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

async fn run(
    a: &Args,
    vmletd: &Path,
    work: &Path,
    procs: &mut Vec<AgentProc>,
) -> anyhow::Result<Report> {
    let load_before = sys::load_average();
    let foreign_before = foreign_vmms(work);
    let mut modes = a.modes.clone();
    modes.sort();
    modes.dedup();
    let pool_size = a.concurrency.iter().copied().max().unwrap_or(1);
    // The run's own copy of the guest kernel and modules: on a shared host
    // other agents read the installed kernel, which would put it back in
    // the page cache between an eviction and a cold start; and the copy
    // cannot change under the run.
    let guest_dir = work.join("guest");
    let copied = agents::copy_dir(&a.guest_dir, &guest_dir)
        .with_context(|| format!("copying {}", a.guest_dir.display()))?;
    eprintln!(
        "vmlet-bench: copied {} ({} MiB) for this run",
        a.guest_dir.display(),
        copied >> 20
    );
    let kernel = guest_dir.join("vmlinux");
    let spec = |m: &str, args: Vec<String>| AgentSpec {
        vmletd: vmletd.to_path_buf(),
        dir: work.join(m),
        guest_dir: guest_dir.clone(),
        tether: a.tether.clone(),
        boot_timeout: a.boot_timeout,
        args: args
            .into_iter()
            .chain(a.agent_args.iter().cloned())
            .collect(),
    };

    // One agent per agent mode; a mode whose agent cannot run is reported,
    // not faked.
    let mut statuses = Vec::new();
    let mut targets = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    let mut files_dir = None;
    for &m in &modes {
        let args = m.agent_args(&a.image, pool_size);
        let how = if m.uses_agent() {
            let mut h = format!(
                "`{}`",
                // As the agent runs: the mode's flags, then --agent-arg's.
                ["vmletd"]
                    .into_iter()
                    .chain(args.iter().chain(&a.agent_args).map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            if m == Mode::Prestaged {
                h.push_str(&format!(", then `vmlet prestage {}`", a.image));
            }
            h
        } else {
            "script: cp the image disk, vhost-device-vsock, qemu with the agent's flags, wait for the hello (an agent's initrd and image disk)".into()
        };
        let mut status = ModeStatus {
            mode: m,
            how,
            unavailable: None,
        };
        if m.uses_agent() {
            eprintln!("vmlet-bench: {}: starting its agent", m.name());
            let archive = a.image_archive.as_deref();
            let sp = spec(m.name(), args);
            match start_agent(m, &sp, vmletd, &a.image, archive, pool_size, procs).await {
                Ok(t) => {
                    inputs.insert(m, cache::start_inputs(&kernel, &t.state_dir));
                    files_dir.get_or_insert(t.state_dir.clone());
                    targets.insert(m, t);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!("vmlet-bench: {} unavailable: {why}", m.name());
                    status.unavailable = Some(why);
                }
            }
        }
        statuses.push(status);
    }

    // The VM shape every mode must share, from a create through an agent.
    let mut helper = None;
    if targets.is_empty() {
        // Only the baseline: an agent just for its initrd and image disk.
        let sp = spec("files", Mode::Cold.agent_args(&a.image, 1));
        let (p, c) = sp.start().await?;
        procs.push(p);
        if let Some(archive) = &a.image_archive {
            import(&c, archive, &a.image).await?;
        }
        files_dir = Some(sp.state_dir());
        helper = Some(c);
    }
    let probe_client = match (targets.values().next(), &helper) {
        (Some(t), _) => &t.client,
        (None, Some(c)) => c,
        (None, None) => unreachable!("an agent was started above"),
    };
    let v: VersionInfo = probe_client.agent_version().await?;
    let probe = probe_client
        .create(CreateSpec {
            image: a.image.clone(),
            argv: vec!["true".into()],
            ..Default::default()
        })
        .await?;
    let shape = probe_client.inspect(&probe).await?;
    probe_client.remove(&probe, true).await?;
    let accel: Accel = v
        .accel
        .parse()
        .map_err(|e| anyhow::anyhow!("the agent's accelerator {:?}: {e}", v.accel))?;

    let image = probe_client.image_inspect(&a.image).await?;
    let files_dir = files_dir.context("no agent ran")?;
    let mut baseline = None;
    if modes.contains(&Mode::Baseline) {
        let (rootfs, fstype) = baseline::image_disk(&files_dir, &image)
            .with_context(|| format!("the baseline's disk of {}", a.image))?;
        let initrd = files_dir.join("guest/initrd.cpio");
        inputs.insert(
            Mode::Baseline,
            vec![kernel.clone(), initrd.clone(), rootfs.clone()],
        );
        let dir = work.join("baseline");
        std::fs::create_dir_all(&dir)?;
        // The script's QEMU flags include the host's measured TSC rate, as
        // the agent's do: measure it now, not inside the first start.
        vmm_shim::qemu::tcg_timer_hints();
        // As the agent decides them: from the kernel's config.
        let guest_kernel = vmlet_agent::kernel::GuestKernel::open(&guest_dir).ok();
        baseline = Some(Baseline {
            qemu: find("qemu-system-x86_64")?,
            backend: find("vhost-device-vsock")?,
            kernel: kernel.clone(),
            acpi: guest_kernel.as_ref().is_none_or(|k| k.acpi),
            apic_timer_hz: guest_kernel.and_then(|k| k.apic_timer_hz),
            initrd,
            rootfs,
            fstype,
            accel,
            memory_mib: shape.memory_mib,
            vcpus: shape.vcpus,
            work_dir: dir,
            boot_timeout: Duration::from_secs(a.boot_timeout),
        });
    }
    let evict = (a.page_cache == PageCache::Evict).then(|| {
        let mut all: Vec<PathBuf> = inputs.values().flatten().cloned().collect();
        all.sort();
        all.dedup();
        all
    });
    let runner = Arc::new(Runner {
        image: a.image.clone(),
        targets,
        baseline,
        evict,
        inputs,
        load: Default::default(),
    });
    let measured: Vec<Mode> = modes
        .iter()
        .copied()
        .filter(|m| {
            statuses
                .iter()
                .any(|s| s.mode == *m && s.unavailable.is_none())
        })
        .collect();
    for &m in &measured {
        if runner.targets.get(&m).is_some_and(|t| t.pool.is_some()) {
            eprintln!("vmlet-bench: waiting for the {} pool to fill", m.name());
            runner.pool_full(m).await?;
        }
    }

    let mut results = Vec::new();
    for &c in &a.concurrency {
        eprintln!(
            "vmlet-bench: concurrency {c}: {} warm-up batch(es) per mode",
            a.warmup
        );
        for _ in 0..a.warmup {
            for &m in &measured {
                runner.batch(m, c).await?;
            }
        }
        let mut batches: BTreeMap<Mode, Vec<Batch>> = BTreeMap::new();
        let rounds = a.runs.div_ceil(c);
        for b in 0..rounds {
            let n = c.min(a.runs - b * c);
            // Reverse the order every other round so no mode always runs on
            // a machine another just warmed (or dirtied).
            let order: Vec<Mode> = if b % 2 == 0 {
                measured.clone()
            } else {
                measured.iter().rev().copied().collect()
            };
            for m in order {
                if let Some(l) = sys::load_average() {
                    runner.load.lock().expect("not poisoned").push(l);
                }
                let x = runner.batch(m, n).await?;
                eprintln!(
                    "vmlet-bench: C={c} round {}/{rounds} {}: first output {}",
                    b + 1,
                    m.name(),
                    x.samples
                        .iter()
                        .map(|s| format!("{:.0} ms", s.first_output_ms))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                batches.entry(m).or_default().push(x);
            }
        }
        for (m, bs) in batches {
            results.push(summarize_mode(m, c, bs));
        }
    }

    let after = Duration::from_secs_f64(a.memory_after);
    eprintln!(
        "vmlet-bench: sampling memory {:.1} s after first output",
        a.memory_after
    );
    let mut memory = Vec::new();
    for &m in &measured {
        memory.push(
            runner
                .memory(m, after)
                .await
                .with_context(|| format!("sampling the memory of a {} VM", m.name()))?,
        );
    }

    let load_during = summarize(&runner.load.lock().expect("not poisoned"));
    Ok(Report {
        date: date(),
        machine: Machine::probe(),
        accel: v.accel.clone(),
        vmm: v.vmm.clone(),
        guest_kernel: v.kernel.clone(),
        agent: v.agent.clone(),
        image: a.image.clone(),
        image_disks: image.layers.iter().map(|l| l.disk_size).collect(),
        command: "echo ready",
        runs: a.runs,
        warmup: a.warmup,
        memory_mib: shape.memory_mib,
        vcpus: shape.vcpus,
        page_cache: match a.page_cache {
            PageCache::Evict => "evict",
            PageCache::Keep => "keep",
        }
        .into(),
        modes: statuses,
        results,
        memory,
        load_average: (load_before, sys::load_average()),
        load_during,
        foreign_vmms: (foreign_before, foreign_vmms(work)),
    })
}

/// Starts `mode`'s agent and readies it: checks that vmletd offers the
/// mode, imports the archive, pre-stages the image, fills the pool.
async fn start_agent(
    mode: Mode,
    spec: &AgentSpec,
    vmletd: &Path,
    image: &str,
    archive: Option<&Path>,
    pool_size: usize,
    procs: &mut Vec<AgentProc>,
) -> anyhow::Result<Target> {
    if let Some(flag) = mode.required_flag() {
        if !agents::has_flag(vmletd, flag)? {
            bail!(
                "{} has no {flag} option: this agent does not offer {} starts",
                vmletd.display(),
                mode.name()
            );
        }
    }
    let (p, client) = spec.start().await?;
    let pid = p.pid;
    procs.push(p);
    if let Some(archive) = archive {
        import(&client, archive, image).await?;
    }
    // A pool pre-stages its image as its agent starts; an image imported
    // after that is pre-staged here instead, as it would have been. (A
    // template waits for its image and is built once it is imported.)
    if mode == Mode::Prestaged || (archive.is_some() && mode.is_pool()) {
        match client
            .call(Request::Prestage {
                image: image.into(),
            })
            .await?
        {
            Response::Done => {}
            Response::Error(e) => bail!("vmlet prestage {image}: {e}"),
            other => bail!("vmlet prestage {image}: unexpected answer {other:?}"),
        }
    }
    if mode == Mode::Template {
        // Timed starts begin once the snapshot exists (its build is one
        // cold boot, paid once, like a pool's first fill).
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Response::Templates(ts) = client.call(Request::Templates).await? {
                if !ts.is_empty() && ts.iter().all(|t| t.status == "ready") {
                    break;
                }
                if let Some(e) = ts.iter().find_map(|t| t.last_error.clone()) {
                    bail!("the template failed: {e}");
                }
            }
            if Instant::now() > deadline {
                bail!("the template was not ready in 300 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let pool = mode
        .is_pool()
        .then(|| u32::try_from(pool_size).unwrap_or(u32::MAX));
    Ok(Target {
        client,
        pid,
        state_dir: spec.state_dir(),
        pool,
    })
}

/// The distribution of each named timing that `get` finds in the samples.
fn distributions(
    s: &[Sample],
    get: fn(&Sample) -> &BTreeMap<&'static str, f64>,
) -> BTreeMap<&'static str, vmlet_bench::stats::Summary> {
    let mut by_name: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for x in s {
        for (k, v) in get(x) {
            by_name.entry(k).or_default().push(*v);
        }
    }
    by_name
        .into_iter()
        .map(|(k, xs)| (k, summarize(&xs)))
        .collect()
}

fn summarize_mode(mode: Mode, c: usize, bs: Vec<Batch>) -> ModeResult {
    let wall: Duration = bs.iter().map(|b| b.wall).sum();
    let refill: Option<Duration> = bs
        .iter()
        .map(|b| b.refill)
        .sum::<Option<Duration>>()
        .filter(|_| mode.is_pool());
    let cpu: Option<f64> = bs.iter().map(|b| b.agent_cpu_s).sum();
    let evicted = bs.last().and_then(|b| b.evicted);
    let s: Vec<Sample> = bs.into_iter().flat_map(|b| b.samples).collect();
    let n = s.len() as f64;
    let phases = distributions(&s, |x| &x.phases_ms);
    let guest = distributions(&s, |x| &x.guest_ms);
    let root = distributions(&s, |x| &x.root_ms);
    ModeResult {
        mode,
        concurrency: c,
        guest,
        root,
        ready: summarize(&s.iter().map(|x| x.ready_ms).collect::<Vec<_>>()),
        first_output: summarize(&s.iter().map(|x| x.first_output_ms).collect::<Vec<_>>()),
        starts_per_s: n / wall.as_secs_f64(),
        sustained_starts_per_s: refill.map(|r| n / (wall + r).as_secs_f64()),
        agent_cpu_ms_per_start: cpu.filter(|_| mode.uses_agent()).map(|c| c * 1000.0 / n),
        phases,
        inputs_after_eviction: evicted,
        samples: s,
    }
}

/// Imports `archive` into an agent and checks that it holds `image` then.
async fn import(client: &Client, archive: &Path, image: &str) -> anyhow::Result<()> {
    let f = tokio::fs::File::open(archive)
        .await
        .with_context(|| format!("opening {}", archive.display()))?;
    let info = client
        .image_import(None, f)
        .await
        .with_context(|| format!("importing {}", archive.display()))?;
    client.image_inspect(image).await.with_context(|| {
        format!(
            "{} holds {:?} ({}), not --image {image}",
            archive.display(),
            info.names,
            info.id
        )
    })?;
    Ok(())
}
