//! vmlet-bench: measures containerVM starts through a running vmletd.
//!
//! Each iteration creates a VM running `echo`, attaches (replaying from the
//! first byte), starts it and times start-to-first-output as the client
//! sees it; the agent's own phase timings come from `inspect`. Warm-up runs
//! are discarded. Output: a markdown table on stdout and, with `--json`, the
//! raw samples.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use vmlet_protocol::api::{AttachSpec, CreateSpec, Phase, Request, Response};
use vmlet_protocol::client::Client;

/// Measures containerVM start latency through vmletd.
#[derive(Debug, Parser)]
struct Args {
    /// vmletd's API socket.
    #[arg(long, env = "VMLET_SOCKET", default_value = "/run/vmlet/vmlet.sock")]
    socket: PathBuf,
    /// Measured starts.
    #[arg(short = 'n', long, default_value_t = 10)]
    runs: usize,
    /// Discarded warm-up starts.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Starts in flight at once.
    #[arg(short, long, default_value_t = 1)]
    concurrency: usize,
    /// Image to run.
    #[arg(long, default_value = "busybox")]
    image: String,
    /// Write raw samples as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Default, Clone)]
struct Sample {
    first_output_ms: f64,
    phases_ms: BTreeMap<&'static str, f64>,
}

async fn one(client: &Client, image: &str) -> anyhow::Result<Sample> {
    let id = client
        .create(CreateSpec {
            image: image.into(),
            argv: vec!["echo".into(), "ready".into()],
            auto_remove: false,
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
    let t0 = Instant::now();
    client.start(&id).await?;
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
    client.wait(&id).await?;
    let info = client.inspect(&id).await?;
    client.remove(&id, true).await?;
    let phases_ms = info
        .phases
        .iter()
        .map(|p| (p.phase.name(), p.at_us as f64 / 1000.0))
        .collect();
    Ok(Sample {
        first_output_ms: first.as_secs_f64() * 1000.0,
        phases_ms,
    })
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let client = Arc::new(Client::connect(&a.socket).await?);
    let v = client.agent_version().await?;
    for _ in 0..a.warmup {
        one(&client, &a.image).await?;
    }
    let mut samples = Vec::new();
    let mut left = a.runs;
    let wall = Instant::now();
    while left > 0 {
        let batch = left.min(a.concurrency.max(1));
        let mut hs = Vec::new();
        for _ in 0..batch {
            let c = client.clone();
            let img = a.image.clone();
            hs.push(tokio::spawn(async move { one(&c, &img).await }));
        }
        for h in hs {
            samples.push(h.await??);
        }
        left -= batch;
    }
    let wall = wall.elapsed().as_secs_f64();

    println!(
        "machine: {}; vmm: {}; accel: {}; kernel: {}",
        machine(),
        v.vmm,
        v.accel,
        v.kernel
    );
    println!(
        "{} starts, concurrency {}, {:.2} starts/s\n",
        samples.len(),
        a.concurrency,
        samples.len() as f64 / wall
    );
    println!("| metric (ms) | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            pct(&xs, 50.0),
            pct(&xs, 90.0),
            pct(&xs, 99.0),
            xs.last().copied().unwrap_or(f64::NAN)
        );
    };
    row(
        "start → first output (client)",
        samples.iter().map(|s| s.first_output_ms).collect(),
    );
    for p in Phase::ALL {
        let xs: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.phases_ms.get(p.name()).copied())
            .collect();
        if !xs.is_empty() {
            row(&format!("phase {}", p.name()), xs);
        }
    }
    if let Some(path) = a.json {
        let j = serde_json::json!({
            "machine": machine(),
            "accel": v.accel,
            "kernel": v.kernel,
            "concurrency": a.concurrency,
            "samples": samples.iter().map(|s| serde_json::json!({
                "first_output_ms": s.first_output_ms,
                "phases_ms": s.phases_ms,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&j)?)?;
    }
    Ok(())
}
