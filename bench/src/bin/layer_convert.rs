//! Layer conversion throughput, erofs against ext4, on the same layer: the
//! host's busybox tree plus `--mb` MiB of random files of mixed sizes.
//! Reports MB/s of uncompressed layer tar for the unpack and for each
//! mkfs, as JSON. Run as root (the unpack sets owners).
//!
//! `cargo run --release -p vmlet-bench --bin layer_convert -- [--mb N]`

use std::io::{Read, Write};
use std::time::Instant;

use vmlet_agent::image::convert::{build_disk, LayerFs};
use vmlet_agent::image::unpack;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let mb = arg("--mb", 300);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: String, data: &[u8], mode: u32| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        b.append_data(&mut h, path, data)
    };
    let bb = std::fs::read("/bin/busybox")?;
    add("bin/busybox".into(), &bb, 0o755)?;
    let mut rnd = std::fs::File::open("/dev/urandom")?;
    // Mixed sizes: many small files (where metadata dominates) and big ones.
    let mut total = 0u64;
    let mut i = 0u64;
    while total < mb << 20 {
        let size = match i % 10 {
            0 => 4 << 20,
            1..=3 => 256 << 10,
            _ => 4 << 10,
        };
        let mut data = vec![0u8; size];
        rnd.read_exact(&mut data)?;
        add(format!("d{}/f{i}", i % 50), &data, 0o644)?;
        total += size as u64;
        i += 1;
    }
    let layer = b.into_inner()?;
    let mbytes = layer.len() as f64 / 1e6;
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    let t = Instant::now();
    unpack::unpack(&layer[..], &root)?;
    let unpack_s = t.elapsed().as_secs_f64();
    let mut out = serde_json::Map::new();
    out.insert("layer_mb".into(), serde_json::json!(mbytes));
    out.insert("files".into(), serde_json::json!(i + 1));
    out.insert("unpack_mb_s".into(), serde_json::json!(mbytes / unpack_s));
    for fs in [LayerFs::Erofs, LayerFs::Ext4] {
        let disk = dir.path().join(format!("disk.{}", fs.name()));
        // Warm the page cache equally for both: drop nothing, run once.
        let t = Instant::now();
        build_disk(&root, &disk, fs)?;
        let s = t.elapsed().as_secs_f64();
        let size = std::fs::metadata(&disk)?.len();
        let alloc = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&disk)?.blocks() * 512
        };
        out.insert(
            fs.name().into(),
            serde_json::json!({
                "mkfs_s": s,
                "mkfs_mb_s": mbytes / s,
                "convert_mb_s": mbytes / (s + unpack_s),
                "disk_bytes": size,
                "disk_allocated_bytes": alloc,
            }),
        );
    }
    writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&out)?)?;
    Ok(())
}
