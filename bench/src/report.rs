//! What a run found, and its markdown and SVG renderings.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use vmlet_protocol::api::Phase;

use crate::cache::Evicted;
use crate::mode::Mode;
use crate::stats::Summary;
use crate::svg::{self, Series};
use crate::sys::Machine;

/// One start's timings, in milliseconds since the start began (the
/// client's create, or the script's first step).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// To the tether's hello.
    pub ready_ms: f64,
    /// To the first byte of output reaching the caller.
    pub first_output_ms: f64,
    /// Each phase: for agent modes as the agent recorded them (since it
    /// accepted the start request), for the baseline since the script began.
    pub phases_ms: BTreeMap<&'static str, f64>,
    /// The guest's own boot timings from its hello (its clock, from kernel
    /// start): `kernel` to the tether, `modules` loading, `hello`. Empty for
    /// a start whose guest booted before it (pool, template).
    pub guest_ms: BTreeMap<&'static str, f64>,
    /// How long the guest took to assemble the container's root filesystem
    /// after the spec, step by step (its clock; see [`root_ms`]). Empty for
    /// a pool or template start, whose guest did it before the start.
    #[serde(default)]
    pub root_ms: BTreeMap<&'static str, f64>,
}

/// The steps of the root filesystem's assembly, in order, as
/// [`Sample::root_ms`] names them.
pub const ROOT_STEPS: [&str; 7] = [
    "disks", "layers", "writable", "dirs", "overlay", "inner", "total",
];

/// The tether's root timings as [`Sample::root_ms`], with their total.
pub fn root_ms(t: &vmlet_protocol::api::RootTimings) -> BTreeMap<&'static str, f64> {
    let steps = [
        t.disks_us,
        t.layers_us,
        t.writable_us,
        t.dirs_us,
        t.overlay_us,
        t.inner_us,
    ];
    let total = steps.iter().sum();
    ROOT_STEPS
        .into_iter()
        .zip(steps.into_iter().chain([total]))
        .map(|(k, us)| (k, us as f64 / 1000.0))
        .collect()
}

/// The guest's boot timings of a hello as [`Sample::guest_ms`].
pub fn guest_ms(b: &vmlet_protocol::api::GuestBoot) -> BTreeMap<&'static str, f64> {
    [
        ("kernel", b.kernel_us),
        ("modules", b.modules_us),
        ("hello", b.hello_us),
    ]
    .into_iter()
    .map(|(k, us)| (k, us as f64 / 1000.0))
    .collect()
}

/// Whether a mode ran, and how.
#[derive(Debug, Clone, Serialize)]
pub struct ModeStatus {
    /// The mode.
    pub mode: Mode,
    /// How it starts VMs: the script, or vmletd's flags.
    pub how: String,
    /// `None` when it ran; else why it could not.
    pub unavailable: Option<String>,
}

/// One mode at one concurrency.
#[derive(Debug, Serialize)]
pub struct ModeResult {
    /// The mode.
    pub mode: Mode,
    /// Starts in flight at once.
    pub concurrency: usize,
    /// Start to the tether's hello.
    pub ready: Summary,
    /// Start to the first output byte at the caller.
    pub first_output: Summary,
    /// Starts over the batches' wall time.
    pub starts_per_s: f64,
    /// Starts over the wall time including what the mode needs before the
    /// next batch can start as fast (a pool's refill); `None` when that is
    /// nothing.
    pub sustained_starts_per_s: Option<f64>,
    /// The agent's CPU time per start (for a pool, the refill included).
    pub agent_cpu_ms_per_start: Option<f64>,
    /// Each phase's distribution.
    pub phases: BTreeMap<&'static str, Summary>,
    /// Each of the guest's own boot timings' distribution.
    pub guest: BTreeMap<&'static str, Summary>,
    /// Each root filesystem step's distribution (guest clock).
    pub root: BTreeMap<&'static str, Summary>,
    /// What stayed in the page cache of the start's input files after the
    /// eviction before the last batch.
    pub inputs_after_eviction: Option<Evicted>,
    /// Every sample.
    pub samples: Vec<Sample>,
}

/// Memory of one VM of a mode, sampled while it runs.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    /// The mode.
    pub mode: Mode,
    /// QEMU plus vhost-device-vsock of the VM, KiB.
    pub vm_pss_kib: u64,
    /// The agent's whole PSS, KiB.
    pub agent_pss_kib: Option<u64>,
    /// Guests the agent held then (the VM and any pool members).
    pub guests_held: Option<u32>,
    /// The agent's PSS divided among them, KiB.
    pub agent_share_kib: Option<u64>,
    /// QEMU plus backend of the pool members waiting meanwhile, KiB: the
    /// pool's standing price.
    pub pool_members_pss_kib: Option<u64>,
}

impl MemoryResult {
    /// The VM's processes plus its share of the agent, KiB.
    pub fn per_vm_kib(&self) -> u64 {
        self.vm_pss_kib + self.agent_share_kib.unwrap_or(0)
    }
}

/// A whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// When it ran (UTC).
    pub date: String,
    /// Where.
    pub machine: Machine,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The VMM and its version.
    pub vmm: String,
    /// The guest kernel.
    pub guest_kernel: String,
    /// vmletd's version.
    pub agent: String,
    /// The image every start runs.
    pub image: String,
    /// Bytes of each of its layers' read-only disks, lowest first.
    pub image_disks: Vec<u64>,
    /// The command every start runs.
    pub command: &'static str,
    /// Measured starts per mode and concurrency.
    pub runs: usize,
    /// Discarded warm-up batches per mode and concurrency.
    pub warmup: usize,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs per guest.
    pub vcpus: u32,
    /// `evict`: every batch began with the start's input files evicted
    /// from the page cache; `keep`: with whatever it held.
    pub page_cache: String,
    /// Every mode asked for, run or not.
    pub modes: Vec<ModeStatus>,
    /// Per mode and concurrency.
    pub results: Vec<ModeResult>,
    /// Per mode.
    pub memory: Vec<MemoryResult>,
    /// The 1-minute load average before and after the run.
    pub load_average: (Option<f64>, Option<f64>),
    /// The 1-minute load average at the start of each measured batch.
    pub load_during: Summary,
    /// QEMU processes on the host that were not this run's, at its start
    /// and end: other work sharing the cores.
    pub foreign_vmms: (usize, usize),
}

/// A paragraph `intro` and a table of steps by the guest's clock, p50 / p90
/// per `(column, key)` of `steps`, a row per mode that has any (none
/// without any).
fn step_table(
    o: &mut String,
    r: &Report,
    intro: &str,
    columns: &[(&str, &str)],
    steps: impl Fn(&ModeResult) -> &BTreeMap<&'static str, Summary>,
) {
    let rows: Vec<&ModeResult> = r.results.iter().filter(|x| !steps(x).is_empty()).collect();
    if rows.is_empty() {
        return;
    }
    let titles: Vec<&str> = columns.iter().map(|(t, _)| *t).collect();
    let _ = writeln!(o, "{intro}\n");
    let _ = writeln!(o, "| mode | C | {} |", titles.join(" | "));
    let _ = writeln!(o, "|---|---|{}", "---|".repeat(columns.len()));
    for x in rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|(_, k)| {
                steps(x).get(k).map_or("–".to_string(), |s| {
                    format!("{} / {}", ms(s.p50), ms(s.p90))
                })
            })
            .collect();
        let _ = writeln!(
            o,
            "| {} | {} | {} |",
            x.mode.title(),
            x.concurrency,
            cells.join(" | ")
        );
    }
    let _ = writeln!(o);
}

fn ms(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.0}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "–".into()
    } else if a / b < 0.1 {
        format!("{:.3}", a / b)
    } else {
        format!("{:.2}", a / b)
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The phases of a mode, in the order a start passes them.
fn phase_order(m: Mode) -> Vec<&'static str> {
    match m {
        Mode::Baseline => crate::baseline::PHASES.to_vec(),
        _ => Phase::ALL.iter().map(|p| p.name()).collect(),
    }
}

/// The report as markdown.
pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# vmlet start latency, {}\n", r.date);
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
        "- load average (1 min): {} before the run, {} after, {:.2} median / {:.2} max at the batches' starts; QEMU processes of others on the host: {} at the start, {} at the end (a load above this run's own 1–2 is other work sharing the cores: read the figures with it)",
        la(r.load_average.0),
        la(r.load_average.1),
        r.load_during.p50,
        r.load_during.max,
        r.foreign_vmms.0,
        r.foreign_vmms.1
    );
    let _ = writeln!(
        o,
        "- accel: {}; VMM: {}; guest kernel: {}; vmletd {}",
        r.accel, r.vmm, r.guest_kernel, r.agent
    );
    let _ = writeln!(
        o,
        "- each VM: {} MiB, {} vCPU; image `{}` ({}); command `{}`",
        r.memory_mib,
        r.vcpus,
        r.image,
        image_disks(&r.image_disks),
        r.command
    );
    let _ = writeln!(
        o,
        "- {} measured starts per mode and concurrency after {} warm-up batch(es); modes interleaved batch by batch, the order reversed every other batch",
        r.runs, r.warmup
    );
    let cache = if r.page_cache == "evict" {
        "every batch of every mode began with the start's input files (the run's own copy of the guest kernel, each agent's initrd and image store) evicted from the host page cache; pages an agent holds mapped stay (that is pre-staging)"
    } else {
        "left as it was (inputs mostly cached from earlier starts)"
    };
    let _ = writeln!(o, "- page cache: {cache}");
    let _ = writeln!(
        o,
        "- ready = the tether's hello (the guest's own signal; a pool member said it before the start, so a pool's ready is its create and attach); first output = `ready` reaching the caller; both from the script's first step (baseline) or the client's create (agent modes)\n"
    );

    let _ = writeln!(o, "## Modes\n");
    let _ = writeln!(o, "| mode | how | status |");
    let _ = writeln!(o, "|---|---|---|");
    for m in &r.modes {
        let _ = writeln!(
            o,
            "| {} | {} | {} |",
            m.mode.title(),
            m.how,
            m.unavailable
                .as_ref()
                .map_or("measured".into(), |w| format!("unavailable: {w}"))
        );
    }

    let _ = writeln!(o, "\n## Latency (ms)\n");
    let _ = writeln!(
        o,
        "| mode | C | ready p50 | p90 | p99 | max | first output p50 | p90 | p99 | max | starts/s | agent CPU/start |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for x in &r.results {
        let sps = match x.sustained_starts_per_s {
            Some(s) => format!("{:.2} ({s:.2} with refill)", x.starts_per_s),
            None => format!("{:.2}", x.starts_per_s),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {sps} | {} |",
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
            x.agent_cpu_ms_per_start
                .map_or("–".into(), |c| format!("{c:.0} ms")),
        );
    }
    for m in &r.modes {
        if let Some(why) = &m.unavailable {
            let _ = writeln!(
                o,
                "| {} | – | unavailable: {} | – | – | – | – | – | – | – | – | – |",
                m.mode.title(),
                why.replace('|', "\\|")
            );
        }
    }
    let _ = writeln!(
        o,
        "\nPercentiles by nearest rank (with fewer than 100 samples p99 is the maximum). A pool's agent CPU includes refilling the pool."
    );

    let concurrencies: Vec<usize> = {
        let mut c: Vec<usize> = r.results.iter().map(|x| x.concurrency).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let get = |m: Mode, c: usize| r.results.iter().find(|x| x.mode == m && x.concurrency == c);
    if r.results.iter().any(|x| x.mode == Mode::Baseline)
        && r.results.iter().any(|x| x.mode != Mode::Baseline)
    {
        let _ = writeln!(o, "\n## Ratios to the baseline (lower is faster)\n");
        let _ = writeln!(
            o,
            "| mode | C | ready p50 | p90 | p99 | first output p50 | p90 | p99 | starts/s |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
        for &c in &concurrencies {
            let Some(b) = get(Mode::Baseline, c) else {
                continue;
            };
            for x in r
                .results
                .iter()
                .filter(|x| x.concurrency == c && x.mode != Mode::Baseline)
            {
                let _ = writeln!(
                    o,
                    "| {} | {c} | {} | {} | {} | {} | {} | {} | {} |",
                    x.mode.title(),
                    ratio(x.ready.p50, b.ready.p50),
                    ratio(x.ready.p90, b.ready.p90),
                    ratio(x.ready.p99, b.ready.p99),
                    ratio(x.first_output.p50, b.first_output.p50),
                    ratio(x.first_output.p90, b.first_output.p90),
                    ratio(x.first_output.p99, b.first_output.p99),
                    ratio(x.starts_per_s, b.starts_per_s),
                );
            }
        }
    }

    let _ = writeln!(o, "\n## Phases (p50 / p90, ms)\n");
    let _ = writeln!(
        o,
        "Baseline phases count from the script's first step; agent phases are the agent's own (`vmlet inspect`), from the moment it accepted the start request.\n"
    );
    for x in &r.results {
        let parts: Vec<String> = phase_order(x.mode)
            .iter()
            .filter_map(|p| {
                x.phases
                    .get(p)
                    .map(|s| format!("{p} {} / {}", ms(s.p50), ms(s.p90)))
            })
            .collect();
        let _ = writeln!(
            o,
            "**{} at C={}**: {}\n",
            x.mode.title(),
            x.concurrency,
            parts.join(" → ")
        );
    }
    // Where a boot's time goes by the guest's own clock: a mode whose
    // guests boot slower here ran slower inside the guest, not in the host
    // steps around it.
    step_table(
        &mut o,
        r,
        "By the guest's own clock (from its hello; p50 / p90, ms from kernel start): kernel → tether, module loading, hello.",
        &[("kernel → tether", "kernel"), ("modules", "modules"), ("hello", "hello")],
        |x| &x.guest,
    );
    // After the spec, the guest assembles the container's root: the
    // baseline over a tmpfs, an agent start over the VM's writable disk.
    step_table(
        &mut o,
        r,
        "The container's root filesystem, assembled by the guest after the spec (its clock; p50 / p90, ms): disks found by serial, layers mounted, writable disk (the baseline: tmpfs) mounted, `upper` and `work` made, overlay mounted, proc/sys/dev.",
        &ROOT_STEPS.map(|k| (k, k)),
        |x| &x.root,
    );
    if r.page_cache == "evict" {
        let _ = writeln!(o, "## Page cache after each eviction\n");
        let _ = writeln!(o, "| mode | C | input files | still in memory |");
        let _ = writeln!(o, "|---|---|---|---|");
        for x in &r.results {
            if let Some(e) = x.inputs_after_eviction {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} MiB | {} MiB |",
                    x.mode.title(),
                    x.concurrency,
                    mib(e.total_bytes / 1024),
                    mib(e.resident_bytes / 1024)
                );
            }
        }
        let _ = writeln!(o);
    }

    let _ = writeln!(o, "## Memory per VM (PSS, MiB)\n");
    let _ = writeln!(
        o,
        "One more start per mode whose command stays up, sampled while it runs. The agent's share is its PSS divided by the guests it held then (the VM and any pool members); a pool's members also hold their own QEMU and backend while they wait.\n"
    );
    let _ = writeln!(
        o,
        "| mode | QEMU + vhost-device-vsock | agent PSS | guests held | agent's share | per VM | pool members waiting |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    for m in &r.memory {
        let opt = |x: Option<u64>| x.map_or("–".into(), mib);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} |",
            m.mode.title(),
            mib(m.vm_pss_kib),
            opt(m.agent_pss_kib),
            m.guests_held.map_or("–".into(), |g| g.to_string()),
            opt(m.agent_share_kib),
            mib(m.per_vm_kib()),
            opt(m.pool_members_pss_kib),
        );
    }
    o
}

/// The latency distributions of every mode as one SVG.
pub fn plot(r: &Report) -> String {
    let mut series = Vec::new();
    for x in &r.results {
        for (metric, get) in [
            ("ready", (|s: &Sample| s.ready_ms) as fn(&Sample) -> f64),
            ("first output", |s: &Sample| s.first_output_ms),
        ] {
            series.push(Series {
                label: format!("{} C={} · {metric}", x.mode.title(), x.concurrency),
                group: x.mode as usize,
                samples: x.samples.iter().map(get).collect(),
            });
        }
    }
    for m in &r.modes {
        if m.unavailable.is_some() {
            series.push(Series {
                label: format!("{} · unavailable", m.mode.title()),
                group: m.mode as usize,
                samples: Vec::new(),
            });
        }
    }
    svg::plot(
        &format!(
            "vmlet start latency · {} · {} cores · {} · page cache: {} · N={}",
            r.machine.cpu, r.machine.cores, r.accel, r.page_cache, r.runs
        ),
        "milliseconds from start",
        &series,
    )
}

/// "1 layer: a 1.9 MiB disk", "2 layers: disks of 1.0 + 3.0 MiB".
fn image_disks(sizes: &[u64]) -> String {
    let mib = |b: &u64| format!("{:.1}", *b as f64 / 1048576.0);
    match sizes {
        [] => "no layers".into(),
        [one] => format!("1 layer: a {} MiB disk", mib(one)),
        many => format!(
            "{} layers: disks of {} MiB",
            many.len(),
            many.iter().map(mib).collect::<Vec<_>>().join(" + ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::summarize;

    /// A booting mode's guest clock: the kernel took half the start.
    fn guest(mode: Mode, first: f64) -> BTreeMap<&'static str, f64> {
        match mode {
            Mode::Pool | Mode::PoolWarm | Mode::Template => BTreeMap::new(),
            _ => [("kernel", first * 0.5)].into_iter().collect(),
        }
    }

    /// The root's assembly after the spec: none for a pool start; the
    /// baseline's writable layer is a tmpfs, fast to mount.
    fn root(mode: Mode) -> BTreeMap<&'static str, f64> {
        let writable_us = match mode {
            Mode::Pool | Mode::PoolWarm | Mode::Template => return BTreeMap::new(),
            Mode::Baseline => 1_000,
            _ => 25_000,
        };
        root_ms(&vmlet_protocol::api::RootTimings {
            disks_us: 10_000,
            layers_us: 6_000,
            writable_us,
            dirs_us: 20_000,
            overlay_us: 24_000,
            inner_us: 8_000,
        })
    }

    fn result(mode: Mode, c: usize, first: &[f64]) -> ModeResult {
        let samples: Vec<Sample> = first
            .iter()
            .map(|&f| Sample {
                ready_ms: f * 0.9,
                first_output_ms: f,
                phases_ms: [("guest-booted", f * 0.9)].into_iter().collect(),
                guest_ms: guest(mode, f),
                root_ms: root(mode),
            })
            .collect();
        let root = root(mode)
            .into_iter()
            .map(|(k, v)| (k, summarize(&vec![v; first.len()])))
            .collect();
        ModeResult {
            mode,
            concurrency: c,
            ready: summarize(&samples.iter().map(|s| s.ready_ms).collect::<Vec<_>>()),
            first_output: summarize(first),
            starts_per_s: 1.0,
            sustained_starts_per_s: mode.is_pool().then_some(0.5),
            agent_cpu_ms_per_start: mode.uses_agent().then_some(8.0),
            phases: [("guest-booted", summarize(first))].into_iter().collect(),
            guest: samples
                .first()
                .filter(|s| !s.guest_ms.is_empty())
                .map(|_| {
                    let k: Vec<f64> = first.iter().map(|f| f * 0.5).collect();
                    [("kernel", summarize(&k))].into_iter().collect()
                })
                .unwrap_or_default(),
            root,
            inputs_after_eviction: Some(Evicted {
                total_bytes: 64 << 20,
                resident_bytes: 0,
            }),
            samples,
        }
    }

    fn report() -> Report {
        Report {
            date: "2026-11-28T00:00:00Z".into(),
            machine: Machine::probe(),
            accel: "tcg".into(),
            vmm: "qemu 7.2".into(),
            guest_kernel: "6.1".into(),
            agent: "0.1.0".into(),
            image: "busybox".into(),
            image_disks: vec![2_007_040],
            command: "echo ready",
            runs: 3,
            warmup: 1,
            memory_mib: 256,
            vcpus: 1,
            page_cache: "evict".into(),
            modes: vec![
                ModeStatus {
                    mode: Mode::Baseline,
                    how: "script".into(),
                    unavailable: None,
                },
                ModeStatus {
                    mode: Mode::Cold,
                    how: "`vmletd --no-prestage`".into(),
                    unavailable: None,
                },
                ModeStatus {
                    mode: Mode::Pool,
                    how: "`vmletd --pool busybox=1`".into(),
                    unavailable: None,
                },
                ModeStatus {
                    mode: Mode::Template,
                    how: "`vmletd --template busybox`".into(),
                    unavailable: Some("vmletd has no --template | option".into()),
                },
            ],
            results: vec![
                result(Mode::Baseline, 1, &[2000.0, 3000.0, 4000.0]),
                result(Mode::Cold, 1, &[2000.0, 3300.0, 4000.0]),
                result(Mode::Pool, 1, &[100.0, 120.0, 160.0]),
            ],
            memory: vec![MemoryResult {
                mode: Mode::Pool,
                vm_pss_kib: 200 * 1024,
                agent_pss_kib: Some(8 * 1024),
                guests_held: Some(2),
                agent_share_kib: Some(4 * 1024),
                pool_members_pss_kib: Some(190 * 1024),
            }],
            load_average: (Some(0.5), Some(1.5)),
            load_during: summarize(&[0.5, 1.0, 1.5]),
            foreign_vmms: (0, 1),
        }
    }

    /// The table of the markdown's paragraph that starts with `intro`.
    fn table_after<'a>(md: &'a str, intro: &str) -> &'a str {
        md.split(intro)
            .nth(1)
            .and_then(|t| t.split("\n\n").nth(1))
            .unwrap_or_else(|| panic!("no table after {intro:?}"))
    }

    #[test]
    fn markdown_shows_every_mode_ratios_and_unavailable_ones() {
        let md = markdown(&report());
        assert!(
            md.contains("image `busybox` (1 layer: a 1.9 MiB disk); command `echo ready`"),
            "{md}"
        );
        assert_eq!(
            image_disks(&[1 << 20, 3 << 20]),
            "2 layers: disks of 1.0 + 3.0 MiB"
        );
        assert!(md.contains("| (b) cold | 1 | 2970 | 3600 | 3600 | 3600 | 3300 | 4000 | 4000 | 4000 | 1.00 | 8 ms |"), "{md}");
        // The pool's throughput with and without its refill.
        assert!(md.contains("1.00 (0.50 with refill)"), "{md}");
        // The guest's own boot clock, for the modes that boot in the start.
        let guest = table_after(&md, "By the guest's own clock");
        assert!(
            guest.contains("| (b) cold | 1 | 1650 / 2000 | – | – |"),
            "{guest}"
        );
        assert!(!guest.contains("(d) pool"), "{guest}");
        // The root's steps by the guest's clock, with their total, for
        // every mode that assembled it in the start.
        let root = table_after(&md, "The container's root filesystem, assembled");
        assert!(
            root.contains("| (b) cold | 1 | 10 / 10 | 6 / 6 | 25 / 25 | 20 / 20 | 24 / 24 | 8 / 8 | 93 / 93 |"),
            "{root}"
        );
        assert!(
            root.contains("| (a) baseline, by hand | 1 | 10 / 10 | 6 / 6 | 1 / 1 |"),
            "{root}"
        );
        assert!(!root.contains("(d) pool"), "{root}");
        // Ratios to the baseline, three decimals when small.
        assert!(
            md.contains("| (d) pool | 1 | 0.040 | 0.040 | 0.040 | 0.040 | 0.040 | 0.040 | 1.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| (b) cold | 1 | 1.10 | 1.00 | 1.00 | 1.10 | 1.00 | 1.00 | 1.00 |"),
            "{md}"
        );
        // An unavailable mode is named with its reason, never given figures;
        // a `|` in the reason cannot break the table.
        assert!(
            md.contains("| (e) template | – | unavailable: vmletd has no --template \\| option |"),
            "{md}"
        );
        assert!(!md.contains("(e) template at C="));
        // Memory: the VM plus its share of the agent.
        assert!(
            md.contains("| (d) pool | 200.0 | 8.0 | 2 | 4.0 | 204.0 | 190.0 |"),
            "{md}"
        );
        assert!(md.contains("1.00 median / 1.50 max at the batches' starts; QEMU processes of others on the host: 0 at the start, 1 at the end"), "{md}");
    }

    #[test]
    fn plot_has_a_row_per_mode_and_metric() {
        let svg = plot(&report());
        for label in [
            "(a) baseline, by hand C=1 · ready",
            "(b) cold C=1 · first output",
            "(d) pool C=1 · first output",
            "(e) template · unavailable",
        ] {
            assert!(svg.contains(label), "{label}");
        }
        // 3 results × 2 metrics × 3 samples.
        assert_eq!(svg.matches("<circle").count(), 18);
    }

    #[test]
    fn json_names_modes_and_why_one_is_missing() {
        let j = serde_json::to_value(report()).unwrap();
        assert_eq!(j["modes"][3]["mode"], "template");
        assert_eq!(
            j["modes"][3]["unavailable"],
            "vmletd has no --template | option"
        );
        assert_eq!(j["modes"][0]["unavailable"], serde_json::Value::Null);
        assert_eq!(j["results"][2]["mode"], "pool");
        assert_eq!(j["results"][2]["samples"].as_array().unwrap().len(), 3);
    }
}
