//! vmlet-bench: boot latency of containerVM starts, side by side.
//!
//! Modes, interleaved batch by batch in one run so both see the same
//! machine:
//!
//! - `baseline`: what a user would script by hand ([`vmlet_bench::baseline`]):
//!   copy the image disk, start vhost-device-vsock and QEMU with the agent's
//!   flags, wait for the tether's hello, send the spec.
//! - `cold`: a cold start through a running vmletd: create, attach
//!   (replaying from the first byte), start.
//! - `alt`: the same cold start through a second vmletd (`--alt-socket`),
//!   for an A/B comparison of two agent configurations in one run, e.g.
//!   two guest kernels (`scripts/bench-kernels.sh`).
//!
//! Both run `echo ready`. "Ready" is the tether's hello, the guest's own
//! signal; "first output" is the first byte of `ready` reaching the caller.
//! Output: a markdown table on stdout (or `--markdown`), `--json` with every
//! sample, `--svg` with the latency distributions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use vmlet_agent::kernel::GuestKernel;
use vmlet_bench::baseline::{self, Baseline};
use vmlet_bench::stats::{summarize, Summary};
use vmlet_bench::svg::{self, Series};
use vmlet_bench::sys::{self, Machine};
use vmlet_protocol::api::{AttachSpec, CreateSpec, Phase, Request, Response, VersionInfo};
use vmlet_protocol::client::Client;
use vmm_shim::Accel;

/// Measures containerVM start latency: a hand-written baseline and cold
/// starts through vmletd, side by side.
#[derive(Debug, Parser)]
struct Args {
    /// vmletd's API socket.
    #[arg(long, env = "VMLET_SOCKET", default_value = "/run/vmlet/vmlet.sock")]
    socket: PathBuf,
    /// vmletd's state directory: the baseline uses its generated initrd
    /// (`guest/initrd.cpio`) and its busybox image disk.
    #[arg(long, env = "VMLET_STATE_DIR", default_value = "/var/lib/vmlet/state")]
    state_dir: PathBuf,
    /// The guest kernel's directory, as vmletd's `--guest-dir` (the
    /// baseline boots it); the same default as vmletd's.
    #[arg(long, env = "VMLET_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// A second vmletd's API socket, which mode `alt` starts through.
    #[arg(long)]
    alt_socket: Option<PathBuf>,
    /// The image disk for the baseline; found under the state directory if
    /// not given.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// vmletd's pid, for its CPU time; read from the socket's peer
    /// credentials if not given.
    #[arg(long)]
    agent_pid: Option<u32>,
    /// Measured starts per mode and concurrency.
    #[arg(short = 'n', long, default_value_t = 10)]
    runs: usize,
    /// Discarded warm-up batches per mode and concurrency.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Starts in flight at once; a list measures each in turn.
    #[arg(short, long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Modes to run.
    #[arg(long, value_delimiter = ',', default_value = "baseline,cold")]
    modes: Vec<Mode>,
    /// Image the cold starts run.
    #[arg(long, default_value = "busybox")]
    image: String,
    /// Seconds after the first output at which memory is sampled, in one
    /// extra start per mode whose command stays up long enough.
    #[arg(long, default_value_t = 1.5)]
    memory_after: f64,
    /// Directory for the baseline's per-start files.
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
    /// How long a guest may take to boot, in seconds.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    /// Write the report here instead of stdout.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write every sample and summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of the latency distributions here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// The hand-written script.
    Baseline,
    /// A cold start through vmletd.
    Cold,
    /// A cold start through the second vmletd (`--alt-socket`).
    Alt,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Cold => "cold",
            Mode::Alt => "alt",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline (by hand)",
            Mode::Cold => "cold (vmletd)",
            Mode::Alt => "cold (alt vmletd)",
        }
    }
}

/// One start's timings, in milliseconds since the start began.
#[derive(Debug, Clone, Default, Serialize)]
struct Sample {
    ready_ms: f64,
    first_output_ms: f64,
    /// Each phase; for cold starts, as the agent recorded them (since it
    /// accepted the start request).
    phases_ms: BTreeMap<&'static str, f64>,
    /// The guest's own boot timings from its hello, on its own clock
    /// (since kernel start): cold and alt starts only.
    guest_ms: BTreeMap<&'static str, f64>,
}

#[derive(Debug, Serialize)]
struct ModeResult {
    mode: Mode,
    concurrency: usize,
    ready: Summary,
    first_output: Summary,
    starts_per_s: f64,
    /// vmletd's CPU time per start (cold and alt modes).
    agent_cpu_ms_per_start: Option<f64>,
    phases: BTreeMap<&'static str, Summary>,
    guest: BTreeMap<&'static str, Summary>,
    samples: Vec<Sample>,
}

#[derive(Debug, Default, Serialize)]
struct Memory {
    /// QEMU plus vhost-device-vsock of one VM, KiB, per mode.
    vm_pss_kib: BTreeMap<&'static str, u64>,
    /// vmletd's whole PSS while one VM ran, KiB.
    agent_pss_kib: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    date: String,
    machine: Machine,
    accel: String,
    vmm: String,
    guest_kernel: String,
    /// The second vmletd's guest kernel, when mode `alt` ran.
    alt_guest_kernel: Option<String>,
    agent: String,
    image: String,
    command: &'static str,
    runs: usize,
    warmup: usize,
    memory_mib: u32,
    vcpus: u32,
    results: Vec<ModeResult>,
    memory: Memory,
    /// The 1-minute load average before and after the run.
    load_average: (Option<f64>, Option<f64>),
}

const COMMAND: [&str; 2] = ["echo", "ready"];

struct Bench {
    client: Client,
    /// The second vmletd, for mode `alt`.
    alt: Option<Client>,
    image: String,
    baseline: Option<Baseline>,
}

impl Bench {
    /// The agent a mode starts through.
    fn client(&self, mode: Mode) -> anyhow::Result<&Client> {
        match mode {
            Mode::Alt => self.alt.as_ref().context("mode alt needs --alt-socket"),
            _ => Ok(&self.client),
        }
    }

    /// A cold start through the agent of `mode`. With `sample_after`, also
    /// returns the PSS of the VM's processes and of the agent, sampled that
    /// long after the first output.
    async fn cold(
        &self,
        mode: Mode,
        argv: &[&str],
        sample_after: Option<(Duration, u32)>,
    ) -> anyhow::Result<(Sample, Option<(u64, u64)>)> {
        let client = self.client(mode)?;
        let t0 = Instant::now();
        let id = client
            .create(CreateSpec {
                image: self.image.clone(),
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await?;
        let mut s = client
            .stream(Request::Attach(AttachSpec {
                vm: id.clone(),
                stdin: false,
                stdout: true,
                stderr: true,
                replay: true,
            }))
            .await?;
        let before_start = t0.elapsed();
        client.start(&id).await?;
        let mut first = None;
        let mut pss = None;
        while let Some(r) = s.next().await {
            match r {
                Response::Output { .. } if first.is_none() => {
                    first = Some(t0.elapsed());
                    if let Some((after, agent_pid)) = sample_after {
                        tokio::time::sleep(after).await;
                        pss = Some(self.sample_vm(client, &id, agent_pid).await?);
                    }
                }
                Response::StreamEnd { .. } => break,
                Response::Error(e) => bail!("attach failed: {e}"),
                _ => {}
            }
        }
        let first = first.context("the container wrote nothing")?;
        client.wait(&id).await?;
        let info = client.inspect(&id).await?;
        client.remove(&id, true).await?;
        let phases_ms: BTreeMap<_, _> = info
            .phases
            .iter()
            .map(|p| (p.phase.name(), p.at_us as f64 / 1000.0))
            .collect();
        let booted = phases_ms
            .get(Phase::GuestBooted.name())
            .copied()
            .context("the agent recorded no guest-booted phase")?;
        let guest_ms = info
            .guest_boot
            .map(|g| {
                BTreeMap::from([
                    ("kernel", g.kernel_us as f64 / 1000.0),
                    ("modules", g.modules_us as f64 / 1000.0),
                    ("hello", g.hello_us as f64 / 1000.0),
                ])
            })
            .unwrap_or_default();
        Ok((
            Sample {
                // The agent's clock starts at the start request; the client
                // had spent `before_start` creating and attaching.
                ready_ms: before_start.as_secs_f64() * 1000.0 + booted,
                first_output_ms: first.as_secs_f64() * 1000.0,
                phases_ms,
                guest_ms,
            },
            pss,
        ))
    }

    async fn sample_vm(
        &self,
        client: &Client,
        id: &str,
        agent_pid: u32,
    ) -> anyhow::Result<(u64, u64)> {
        let info = client.inspect(id).await?;
        let qemu = info.vmm_pid.context("the VM has no VMM pid")?;
        let mut total = sys::pss_kib(qemu).context("QEMU's PSS")?;
        // The backend's command line names the VM's directory, which holds its id.
        for (pid, comm) in sys::pids_mentioning(id) {
            if comm.starts_with("vhost-device") {
                total += sys::pss_kib(pid).context("the vsock backend's PSS")?;
            }
        }
        Ok((total, sys::pss_kib(agent_pid).context("vmletd's PSS")?))
    }

    async fn baseline(&self, slot: usize) -> anyhow::Result<Sample> {
        let b = self.baseline.as_ref().context("no baseline configured")?;
        let r = b.run(slot, &COMMAND, None).await?;
        Ok(Sample {
            ready_ms: r.phases_ms["guest-booted"],
            first_output_ms: r.phases_ms["first-output"],
            phases_ms: r.phases_ms,
            guest_ms: BTreeMap::new(),
        })
    }

    /// One batch of `c` concurrent starts in `mode`; returns the samples and
    /// the batch's wall time.
    async fn batch(
        self: &Arc<Self>,
        mode: Mode,
        c: usize,
    ) -> anyhow::Result<(Vec<Sample>, Duration)> {
        let t = Instant::now();
        let mut hs = Vec::new();
        for slot in 0..c {
            let me = self.clone();
            hs.push(tokio::spawn(async move {
                match mode {
                    Mode::Baseline => me.baseline(slot).await,
                    Mode::Cold | Mode::Alt => me.cold(mode, &COMMAND, None).await.map(|(s, _)| s),
                }
            }));
        }
        let mut out = Vec::new();
        for h in hs {
            out.push(
                h.await?
                    .with_context(|| format!("a {} start failed", mode.name()))?,
            );
        }
        Ok((out, t.elapsed()))
    }
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.runs == 0 || a.concurrency.contains(&0) {
        bail!("--runs and --concurrency must be at least 1");
    }
    let client = Client::connect(&a.socket)
        .await
        .with_context(|| format!("connecting to vmletd at {}", a.socket.display()))?;
    let v: VersionInfo = client.agent_version().await?;
    let agent_pid = match a.agent_pid {
        Some(p) => p,
        None => sys::socket_peer_pid(&a.socket).context("reading vmletd's pid from its socket")?,
    };
    let alt = match &a.alt_socket {
        Some(p) => {
            let c = Client::connect(p)
                .await
                .with_context(|| format!("connecting to the alt vmletd at {}", p.display()))?;
            let v = c.agent_version().await?;
            let pid = sys::socket_peer_pid(p).context("reading the alt vmletd's pid")?;
            Some((c, v, pid))
        }
        None if a.modes.contains(&Mode::Alt) => bail!("mode alt needs --alt-socket"),
        None => None,
    };
    let (alt, alt_info) = match alt {
        Some((c, v, pid)) => (Some(c), Some((v.kernel, pid))),
        None => (None, None),
    };
    let mut bench = Bench {
        client,
        alt,
        image: a.image.clone(),
        baseline: None,
    };

    // One start fixes what the baseline must match: the agent's memory and vCPUs.
    eprintln!("vmlet-bench: a first cold start to learn the agent's VM shape");
    let probe = bench
        .client
        .create(CreateSpec {
            image: a.image.clone(),
            argv: vec!["true".into()],
            ..Default::default()
        })
        .await?;
    let shape = bench.client.inspect(&probe).await?;
    bench.client.remove(&probe, true).await?;
    let accel: Accel = v
        .accel
        .parse()
        .map_err(|e| anyhow::anyhow!("the agent's accelerator {:?}: {e}", v.accel))?;

    if a.modes.contains(&Mode::Baseline) {
        let (rootfs, fstype) = match &a.rootfs {
            Some(p) => (
                p.clone(),
                p.extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or("ext4")
                    .to_string(),
            ),
            None => baseline::find_image_disk(&a.state_dir).with_context(|| {
                format!(
                    "no image disk under {}/images: pass --rootfs",
                    a.state_dir.display()
                )
            })?,
        };
        let initrd = a.state_dir.join("guest/initrd.cpio");
        if !initrd.is_file() {
            bail!(
                "no initrd at {}: is --state-dir vmletd's?",
                initrd.display()
            );
        }
        let guest_dir = a.guest_dir.clone().unwrap_or_else(GuestKernel::default_dir);
        let kernel = GuestKernel::open(&guest_dir)
            .with_context(|| format!("the guest kernel in {}", guest_dir.display()))?;
        let work_dir = a
            .work_dir
            .join(format!("vmlet-bench-{}", std::process::id()));
        std::fs::create_dir_all(&work_dir)?;
        bench.baseline = Some(Baseline {
            qemu: find("qemu-system-x86_64")?,
            backend: find("vhost-device-vsock")?,
            kernel: kernel.vmlinux,
            acpi: kernel.acpi,
            initrd,
            rootfs,
            fstype,
            accel,
            memory_mib: shape.memory_mib,
            vcpus: shape.vcpus,
            work_dir,
            boot_timeout: Duration::from_secs(a.boot_timeout),
        });
    }
    let bench = Arc::new(bench);
    let r = run(&a, &bench, &v, agent_pid, alt_info, &shape).await;
    if let Some(b) = &bench.baseline {
        let _ = std::fs::remove_dir_all(&b.work_dir);
    }
    let report = r?;

    let md = markdown(&report);
    match &a.markdown {
        Some(p) => std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{md}"),
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.svg {
        std::fs::write(p, plot(&report)).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

async fn run(
    a: &Args,
    bench: &Arc<Bench>,
    v: &VersionInfo,
    agent_pid: u32,
    alt: Option<(String, u32)>,
    shape: &vmlet_protocol::api::VmInfo,
) -> anyhow::Result<Report> {
    let pid_of = |m: Mode| match m {
        Mode::Cold => Some(agent_pid),
        Mode::Alt => alt.as_ref().map(|a| a.1),
        Mode::Baseline => None,
    };
    let load_before = sys::load_average();
    let mut results = Vec::new();
    let mut modes = a.modes.clone();
    modes.sort();
    modes.dedup();
    for &c in &a.concurrency {
        eprintln!(
            "vmlet-bench: concurrency {c}: {} warm-up batch(es) per mode",
            a.warmup
        );
        for _ in 0..a.warmup {
            for &m in &modes {
                bench.batch(m, c).await?;
            }
        }
        let mut samples: BTreeMap<Mode, Vec<Sample>> = BTreeMap::new();
        let mut wall: BTreeMap<Mode, Duration> = BTreeMap::new();
        let mut agent_cpu: BTreeMap<Mode, f64> = BTreeMap::new();
        let batches = a.runs.div_ceil(c);
        for b in 0..batches {
            let n = c.min(a.runs - b * c);
            // Alternate which mode goes first so neither always runs on a
            // machine the other just warmed (or dirtied).
            let order: Vec<Mode> = if b % 2 == 0 {
                modes.clone()
            } else {
                modes.iter().rev().copied().collect()
            };
            for m in order {
                let cpu0 = pid_of(m).and_then(|p| sys::cpu_seconds(p).ok());
                let (s, t) = bench.batch(m, n).await?;
                if let (Some(c0), Some(c1)) =
                    (cpu0, pid_of(m).and_then(|p| sys::cpu_seconds(p).ok()))
                {
                    *agent_cpu.entry(m).or_default() += c1 - c0;
                }
                eprintln!(
                    "vmlet-bench: C={c} batch {}/{batches} {}: first output {}",
                    b + 1,
                    m.name(),
                    s.iter()
                        .map(|x| format!("{:.0} ms", x.first_output_ms))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                samples.entry(m).or_default().extend(s);
                *wall.entry(m).or_default() += t;
            }
        }
        for (m, s) in samples {
            let mut phase_names: Vec<&'static str> = Vec::new();
            for x in &s {
                for k in x.phases_ms.keys() {
                    if !phase_names.contains(k) {
                        phase_names.push(k);
                    }
                }
            }
            let phases = phase_names
                .into_iter()
                .map(|p| {
                    let xs: Vec<f64> = s
                        .iter()
                        .filter_map(|x| x.phases_ms.get(p).copied())
                        .collect();
                    (p, summarize(&xs))
                })
                .collect();
            let guest = ["kernel", "modules", "hello"]
                .into_iter()
                .filter_map(|p| {
                    let xs: Vec<f64> = s
                        .iter()
                        .filter_map(|x| x.guest_ms.get(p).copied())
                        .collect();
                    (!xs.is_empty()).then(|| (p, summarize(&xs)))
                })
                .collect();
            results.push(ModeResult {
                mode: m,
                concurrency: c,
                ready: summarize(&s.iter().map(|x| x.ready_ms).collect::<Vec<_>>()),
                first_output: summarize(&s.iter().map(|x| x.first_output_ms).collect::<Vec<_>>()),
                starts_per_s: s.len() as f64 / wall[&m].as_secs_f64(),
                agent_cpu_ms_per_start: agent_cpu.get(&m).map(|c| c * 1000.0 / s.len() as f64),
                phases,
                guest,
                samples: s,
            });
        }
    }

    // Memory: one more start per mode, whose command outlives the sample.
    let mut memory = Memory::default();
    let hold = format!("echo ready; sleep {}", a.memory_after + 1.5);
    let argv = ["sh", "-c", hold.as_str()];
    let after = Duration::from_secs_f64(a.memory_after);
    eprintln!(
        "vmlet-bench: sampling memory {:.1} s after first output",
        a.memory_after
    );
    if let Some(b) = &bench.baseline {
        let r = b.run(0, &argv, Some(after)).await?;
        if let Some(p) = r.pss_kib {
            memory.vm_pss_kib.insert("baseline", p);
        }
    }
    if a.modes.contains(&Mode::Cold) {
        let (_, pss) = bench
            .cold(Mode::Cold, &argv, Some((after, agent_pid)))
            .await?;
        if let Some((vm, agent)) = pss {
            memory.vm_pss_kib.insert("cold", vm);
            memory.agent_pss_kib = Some(agent);
        }
    }
    if let (true, Some(pid)) = (a.modes.contains(&Mode::Alt), pid_of(Mode::Alt)) {
        let (_, pss) = bench.cold(Mode::Alt, &argv, Some((after, pid))).await?;
        if let Some((vm, _)) = pss {
            memory.vm_pss_kib.insert("alt", vm);
        }
    }

    Ok(Report {
        date: date(),
        machine: Machine::probe(),
        accel: v.accel.clone(),
        vmm: v.vmm.clone(),
        guest_kernel: v.kernel.clone(),
        alt_guest_kernel: alt.map(|a| a.0),
        agent: v.agent.clone(),
        image: a.image.clone(),
        command: "echo ready",
        runs: a.runs,
        warmup: a.warmup,
        memory_mib: shape.memory_mib,
        vcpus: shape.vcpus,
        results,
        memory,
        load_average: (load_before, sys::load_average()),
    })
}

fn ms(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.0}")
    }
}

fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# vmlet boot latency, {}\n", r.date);
    let _ = writeln!(
        o,
        "- machine: {} ({}), {} cores, {} MiB, host kernel {}",
        r.machine.hostname,
        r.machine.cpu,
        r.machine.cores,
        r.machine.memory_mib,
        r.machine.host_kernel
    );
    let la = |x: Option<f64>| x.map_or("?".into(), |v| format!("{v:.2}"));
    let _ = writeln!(
        o,
        "- load average (1 min): {} before the run, {} after (anything above 0 is other work sharing the cores)",
        la(r.load_average.0),
        la(r.load_average.1)
    );
    let _ = writeln!(
        o,
        "- accel: {}; VMM: {}; guest kernel: {}; agent {}",
        r.accel, r.vmm, r.guest_kernel, r.agent
    );
    if let Some(k) = &r.alt_guest_kernel {
        let _ = writeln!(o, "- alt vmletd's guest kernel: {k}");
    }
    let _ = writeln!(
        o,
        "- each VM: {} MiB, {} vCPU; image `{}`; command `{}`",
        r.memory_mib, r.vcpus, r.image, r.command
    );
    let _ = writeln!(
        o,
        "- {} measured starts per mode and concurrency after {} warm-up batch(es); modes interleaved batch by batch",
        r.runs, r.warmup
    );
    let _ = writeln!(
        o,
        "- ready = the tether's hello (the guest's own signal); first output = `ready` reaching the caller; both from the start of the script (baseline: before `cp`) or of the client's create (cold)\n"
    );
    let concurrencies: Vec<usize> = {
        let mut c: Vec<usize> = r.results.iter().map(|x| x.concurrency).collect();
        c.dedup();
        c
    };
    let _ = writeln!(
        o,
        "| mode | C | ready p50 | p90 | p99 | max | first output p50 | p90 | p99 | max | starts/s | agent CPU/start |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for x in &r.results {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            x.mode.title(),
            x.concurrency,
            ms(x.ready.p50),
            ms(x.ready.p90),
            ms(x.ready.p99),
            ms(x.ready.max),
            ms(x.first_output.p50),
            ms(x.first_output.p90),
            ms(x.first_output.p99),
            ms(x.first_output.max),
            x.starts_per_s,
            x.agent_cpu_ms_per_start
                .map_or("–".into(), |c| format!("{c:.0} ms")),
        );
    }
    let _ = writeln!(o, "\nAll latencies in ms.\n");
    for &c in &concurrencies {
        let get = |m: Mode| r.results.iter().find(|x| x.mode == m && x.concurrency == c);
        if let (Some(b), Some(k)) = (get(Mode::Baseline), get(Mode::Cold)) {
            let _ = writeln!(
                o,
                "- C={c}: cold/baseline ratio, ready p50 {:.2}, p90 {:.2}; first output p50 {:.2}, p90 {:.2}; starts/s {:.2}",
                k.ready.p50 / b.ready.p50,
                k.ready.p90 / b.ready.p90,
                k.first_output.p50 / b.first_output.p50,
                k.first_output.p90 / b.first_output.p90,
                k.starts_per_s / b.starts_per_s,
            );
        }
        if let (Some(k), Some(x)) = (get(Mode::Cold), get(Mode::Alt)) {
            let _ = writeln!(
                o,
                "- C={c}: alt/cold ratio, ready p50 {:.2}, p90 {:.2}; first output p50 {:.2}, p90 {:.2}; starts/s {:.2}",
                x.ready.p50 / k.ready.p50,
                x.ready.p90 / k.ready.p90,
                x.first_output.p50 / k.first_output.p50,
                x.first_output.p90 / k.first_output.p90,
                x.starts_per_s / k.starts_per_s,
            );
        }
    }
    let _ = writeln!(o, "\n## Phases (p50 / p90, ms)\n");
    let _ = writeln!(
        o,
        "Baseline phases count from the start of the script; cold phases are the agent's own (`vmlet inspect`), from the moment it accepted the start request.\n"
    );
    for x in &r.results {
        let _ = writeln!(o, "**{} at C={}**: ", x.mode.title(), x.concurrency);
        let order: Vec<&'static str> = match x.mode {
            Mode::Baseline => baseline::PHASES.to_vec(),
            Mode::Cold | Mode::Alt => Phase::ALL.iter().map(|p| p.name()).collect(),
        };
        let parts: Vec<String> = order
            .iter()
            .filter_map(|p| {
                x.phases
                    .get(p)
                    .map(|s| format!("{p} {} / {}", ms(s.p50), ms(s.p90)))
            })
            .collect();
        let _ = writeln!(o, "{}\n", parts.join(" → "));
        if !x.guest.is_empty() {
            let g = |k: &str| {
                x.guest
                    .get(k)
                    .map_or("–".into(), |s| format!("{} / {}", ms(s.p50), ms(s.p90)))
            };
            let _ = writeln!(
                o,
                "guest's own clock: kernel start → tether {}; loading modules {}; kernel start → hello {}\n",
                g("kernel"),
                g("modules"),
                g("hello")
            );
        }
    }
    let _ = writeln!(o, "## Memory per VM (PSS, KiB)\n");
    let _ = writeln!(o, "| mode | QEMU + vhost-device-vsock |");
    let _ = writeln!(o, "|---|---|");
    for (m, p) in &r.memory.vm_pss_kib {
        let _ = writeln!(o, "| {m} | {p} |");
    }
    if let Some(a) = r.memory.agent_pss_kib {
        let _ = writeln!(o, "\nvmletd's own PSS while that VM ran: {a} KiB.");
    }
    o
}

fn plot(r: &Report) -> String {
    let mut series = Vec::new();
    for (metric, get) in [
        ("ready", (|s: &Sample| s.ready_ms) as fn(&Sample) -> f64),
        ("first output", |s: &Sample| s.first_output_ms),
    ] {
        for x in &r.results {
            series.push(Series {
                label: format!("{} C={} · {metric}", x.mode.title(), x.concurrency),
                group: x.mode as usize,
                samples: x.samples.iter().map(get).collect(),
            });
        }
    }
    svg::plot(
        &format!(
            "vmlet start latency: {}, {} cores, {}",
            r.machine.cpu, r.machine.cores, r.accel
        ),
        "milliseconds from start",
        &series,
    )
}
