//! Pool starts against cold starts, side by side in one run, through one
//! vmletd running with a warm pool (`vmletd --pool busybox=N`).
//!
//! A pool start is a create that matches the pool (the agent's default
//! memory); a cold start is the same create with one MiB more memory, which
//! no pool member matches, so it boots. The two alternate; before each pool
//! start the run waits until a member is ready, so it measures the hand-off
//! and not the refill. Latency is from the client's start call to the first
//! output byte reaching the client, plus the agent's own phase timings.
//!
//!   pool_start --socket S [-n 10] [--memory 256] [--json out.json]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use vmlet_bench::stats::{summarize, Summary};
use vmlet_protocol::api::{AttachSpec, CreateSpec, Request, Response};
use vmlet_protocol::client::Client;

/// Pool starts against cold starts.
#[derive(Debug, Parser)]
struct Args {
    /// vmletd's API socket (an agent running with a pool of the image).
    #[arg(long, env = "VMLET_SOCKET")]
    socket: PathBuf,
    /// Measured starts per mode.
    #[arg(short = 'n', long, default_value_t = 10)]
    runs: usize,
    /// Discarded warm-up starts per mode.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// The pool's image.
    #[arg(long, default_value = "busybox")]
    image: String,
    /// The agent's default guest memory (what the pool's members have).
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Write the samples and summaries as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Sample {
    first_output_ms: f64,
    start_mode: String,
    phases: BTreeMap<String, f64>,
}

async fn wait_ready(c: &Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Response::Pools(p) = c.call(Request::Pools).await? {
            if p.iter().any(|p| p.ready > 0) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the pool had no ready member for 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn one(c: &Client, image: &str, memory: u32) -> anyhow::Result<Sample> {
    let id = c
        .create(CreateSpec {
            image: image.into(),
            argv: vec!["echo".into(), "ready".into()],
            memory_mib: Some(memory),
            ..Default::default()
        })
        .await?;
    let mut s = c
        .stream(Request::Attach(AttachSpec {
            vm: id.clone(),
            stdin: false,
            stdout: true,
            stderr: true,
            replay: true,
        }))
        .await?;
    let t0 = Instant::now();
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
    let first = first.context("no output")?;
    let info = c.inspect(&id).await?;
    c.remove(&id, true).await?;
    Ok(Sample {
        first_output_ms: first.as_secs_f64() * 1000.0,
        start_mode: info.start_mode,
        phases: info
            .phases
            .iter()
            .map(|p| (p.phase.name().to_string(), p.at_us as f64 / 1000.0))
            .collect(),
    })
}

fn row(name: &str, s: &Summary) {
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
        s.n, s.p50, s.p90, s.p99, s.max
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let c = Client::connect(&a.socket).await?;
    let v = c.agent_version().await?;
    let (mut pool, mut cold) = (Vec::new(), Vec::new());
    for i in 0..(a.warmup + a.runs) {
        wait_ready(&c).await?;
        let p = one(&c, &a.image, a.memory).await?;
        let k = one(&c, &a.image, a.memory + 1).await?;
        if p.start_mode != "pool" || k.start_mode != "cold" {
            bail!(
                "expected a pool then a cold start, got {} and {}",
                p.start_mode,
                k.start_mode
            );
        }
        if i >= a.warmup {
            pool.push(p);
            cold.push(k);
        }
    }
    let fo = |v: &[Sample]| summarize(&v.iter().map(|s| s.first_output_ms).collect::<Vec<_>>());
    let (sp, sc) = (fo(&pool), fo(&cold));
    println!(
        "machine: {} cores; accel {}; vmm {}; guest kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        v.accel,
        v.vmm,
        v.kernel
    );
    println!("\n| start → first output (ms) | n | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    row("pool", &sp);
    row("cold", &sc);
    println!(
        "\npool/cold: p50 {:.3}, p90 {:.3}\n",
        sp.p50 / sc.p50,
        sp.p90 / sc.p90
    );
    println!("| phase (p50 ms since accepted) | pool | cold |");
    println!("|---|---|---|");
    for ph in vmlet_protocol::api::Phase::ALL {
        let med = |v: &[Sample]| {
            summarize(
                &v.iter()
                    .filter_map(|s| s.phases.get(ph.name()).copied())
                    .collect::<Vec<_>>(),
            )
            .p50
        };
        println!("| {} | {:.1} | {:.1} |", ph.name(), med(&pool), med(&cold));
    }
    if let Some(path) = a.json {
        let dump = |v: &[Sample]| {
            v.iter()
                .map(|s| serde_json::json!({"first_output_ms": s.first_output_ms, "phases_ms": s.phases}))
                .collect::<Vec<_>>()
        };
        let j = serde_json::json!({
            "accel": v.accel, "kernel": v.kernel,
            "pool": {"summary": sp, "samples": dump(&pool)},
            "cold": {"summary": sc, "samples": dump(&cold)},
        });
        std::fs::write(path, serde_json::to_vec_pretty(&j)?)?;
    }
    Ok(())
}
