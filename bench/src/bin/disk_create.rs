//! Per-VM disk preparation time for a small and a large image: what a
//! start pays before the VMM spawns (looking up the image's layer disks
//! and creating the VM's writable qcow2 overlay). It must not grow with the
//! image: nothing of the image is copied per VM. Beside it, in the same run, the
//! by-hand way: one `qemu-img create` of the same overlay per VM.
//!
//! `cargo run --release -p vmlet-bench --bin disk_create -- [--runs N] [--big-mb M]`
//! prints one JSON object. Needs root-free tools only: mkfs.erofs,
//! mkfs.ext4, qemu-img.

use std::io::{Read, Write};
use std::time::Instant;

use vmlet_agent::image::{ImageStore, LayerSource};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A one-layer image of `mb` MiB of random files, stored in `store`.
fn image(store: &ImageStore, name: &str, mb: u64) -> anyhow::Result<Vec<String>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut rnd = std::fs::File::open("/dev/urandom")?;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..mb {
        rnd.read_exact(&mut chunk)?;
        let mut h = tar::Header::new_gnu();
        h.set_size(chunk.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("data/f{i}"), &chunk[..])?;
    }
    let layer = b.into_inner()?;
    let diff_id = {
        let mut hr = vmlet_agent::image::convert::HashingReader::new(&layer[..]);
        std::io::copy(&mut hr, &mut std::io::sink())?;
        hr.finish()?.0
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))?;
    let layer = std::sync::Arc::new(layer);
    let src = LayerSource {
        open: Box::new(move || {
            Ok(Box::new(std::io::Cursor::new(layer.as_ref().clone())) as Box<dyn Read>)
        }),
        blob_digest: None,
    };
    let rec = store
        .store_image(&config, vec![name.into()], vec![src])
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    Ok(rec.layers)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let runs = arg("--runs", 30);
    let big = arg("--big-mb", 500);
    let dir = tempfile::tempdir()?;
    let store = ImageStore::open(dir.path().join("images"))?;
    let images: Vec<(&str, u64, Vec<String>)> = [("small", 5), ("big", big)]
        .into_iter()
        .map(|(name, mb)| Ok((name, mb, image(&store, name, mb)?)))
        .collect::<anyhow::Result<_>>()?;
    // Let the conversions' writeback settle, then interleave the two
    // images run by run so host noise hits both alike.
    std::process::Command::new("sync").status()?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); images.len()];
    let blank = dir.path().join("images/rw-template.ext4");
    let mut by_hand = Vec::new();
    for i in 0..runs {
        let dest = dir.path().join(format!("by-hand-{i}.qcow2"));
        let t = Instant::now();
        vmlet_agent::image::create_qcow2_overlay(&blank, &dest)?;
        by_hand.push(t.elapsed().as_secs_f64() * 1000.0);
        std::fs::remove_file(&dest)?;
        for (k, (name, _, layers)) in images.iter().enumerate() {
            let vm_dir = dir.path().join(format!("vm-{name}-{i}"));
            std::fs::create_dir(&vm_dir)?;
            let t = Instant::now();
            for l in layers {
                store
                    .layer_disk(l)
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            }
            store
                .create_writable(&vm_dir)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            times[k].push(t.elapsed().as_secs_f64() * 1000.0);
            std::fs::remove_dir_all(&vm_dir)?;
        }
    }
    let mut out = serde_json::Map::new();
    let by_hand_p50 = percentile(&mut by_hand, 0.5);
    out.insert(
        "qemu_img_create".into(),
        serde_json::json!({
            "runs": runs,
            "p50_ms": by_hand_p50,
            "p95_ms": percentile(&mut by_hand, 0.95),
            "max_ms": percentile(&mut by_hand, 1.0),
        }),
    );
    for ((name, mb, layers), mut ms) in images.into_iter().zip(times) {
        let p50 = percentile(&mut ms, 0.5);
        let disk: u64 = layers
            .iter()
            .map(|l| store.layer(l).map_or(0, |r| r.disk_size))
            .sum();
        out.insert(
            name.into(),
            serde_json::json!({
                "image_mib": mb,
                "layer_disk_bytes": disk,
                "runs": runs,
                "p50_ms": p50,
                "p50_ratio_to_qemu_img": p50 / by_hand_p50,
                "p95_ms": percentile(&mut ms, 0.95),
                "max_ms": percentile(&mut ms, 1.0),
            }),
        );
    }
    let mut so = std::io::stdout().lock();
    writeln!(so, "{}", serde_json::to_string_pretty(&out)?)?;
    Ok(())
}
