//! Builds test images: layer tars written entry by entry (hostile ones
//! included), packed as an OCI image layout or a `docker save` archive,
//! and the merged tree the OCI spec says a container must see.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// One entry of a layer tar.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory.
    Dir(&'static str, u32),
    /// A regular file.
    File(&'static str, u32, Vec<u8>),
    /// A symlink and its target.
    Symlink(&'static str, &'static str),
    /// A hard link to an earlier entry of the same layer.
    Hard(&'static str, &'static str),
    /// `.wh.<name>` deleting `path` of lower layers.
    Whiteout(&'static str),
    /// `.wh..wh..opq` in a directory: hides everything lower layers had in it.
    Opaque(&'static str),
}

/// `sha256:<hex>` of bytes.
pub fn sha256(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    format!(
        "sha256:{}",
        d.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// Appends an entry whose name and link bytes are written raw, as a
/// hostile archive would (the tar crate refuses `..` and absolute paths).
pub fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &[u8],
    link: &[u8],
    data: &[u8],
) {
    let mut h = header(kind, 0o644, data.len() as u64);
    {
        let g = h.as_old_mut();
        g.name[..name.len()].copy_from_slice(name);
        g.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_cksum();
    b.append(&h, data).expect("append");
}

/// A layer tar of `entries`, in order.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(p, mode) => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, format!("{p}/"), &[][..]).unwrap();
            }
            Entry::File(p, mode, data) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            Entry::Symlink(p, t) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, t).unwrap();
            }
            Entry::Hard(p, t) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, p, t).unwrap();
            }
            Entry::Whiteout(p) => {
                let (dir, name) = p.rsplit_once('/').unwrap_or(("", p));
                let wh = if dir.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{dir}/.wh.{name}")
                };
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, wh, &[][..]).unwrap();
            }
            Entry::Opaque(d) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, format!("{d}/.wh..wh..opq"), &[][..])
                    .unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// The host's static busybox as a base layer: `/bin/busybox`, its applets
/// as symlinks, `/etc/passwd` and `/etc/group`.
pub fn busybox_entries() -> Vec<Entry> {
    let bin = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox-static is installed");
    let data = std::fs::read(bin).unwrap();
    let list = std::process::Command::new(bin)
        .arg("--list")
        .output()
        .unwrap();
    let mut v = vec![
        Entry::Dir("bin", 0o755),
        Entry::Dir("etc", 0o755),
        Entry::Dir("tmp", 0o1777),
        Entry::File("bin/busybox", 0o755, data),
        Entry::File(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1001::/home/web:/bin/sh\n".to_vec(),
        ),
        Entry::File("etc/group", 0o644, b"root:x:0:\nweb:x:1001:\n".to_vec()),
    ];
    for a in String::from_utf8_lossy(&list.stdout).lines() {
        let a = a.trim();
        if !a.is_empty() && a != "busybox" && !a.contains('/') {
            let p: &'static str = Box::leak(format!("bin/{a}").into_boxed_str());
            v.push(Entry::Symlink(p, "busybox"));
        }
    }
    v
}

/// An image to pack.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// Uncompressed layer tars, lowest first.
    pub layers: Vec<Vec<u8>>,
    /// The config's `config` object.
    pub run_config: serde_json::Value,
}

impl TestImage {
    /// The config blob.
    pub fn config(&self) -> Vec<u8> {
        let diff_ids: Vec<String> = self.layers.iter().map(|l| sha256(l)).collect();
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": self.run_config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    /// Writes an OCI image layout at `dir`, gzip-compressing the layers
    /// whose index is in `gzip`.
    pub fn write_oci_layout(&self, dir: &Path, name: &str, gzip: &[usize]) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| -> String {
            let d = sha256(data);
            std::fs::write(blobs.join(&d[7..]), data).unwrap();
            d
        };
        let config = self.config();
        let config_d = put(&config);
        let layers: Vec<serde_json::Value> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (data, mt) = if gzip.contains(&i) {
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    e.write_all(l).unwrap();
                    (
                        e.finish().unwrap(),
                        "application/vnd.oci.image.layer.v1.tar+gzip",
                    )
                } else {
                    (l.clone(), "application/vnd.oci.image.layer.v1.tar")
                };
                let d = put(&data);
                serde_json::json!({"mediaType": mt, "digest": d, "size": data.len()})
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
            "layers": layers,
        }))
        .unwrap();
        let md = put(&manifest);
        std::fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": md, "size": manifest.len(),
                    "annotations": {"org.opencontainers.image.ref.name": name},
                }],
            }))
            .unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    }

    /// A `docker save` archive (legacy layout: `<id>/layer.tar`).
    pub fn docker_save(&self, repo_tag: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |p: &str, data: &[u8]| {
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append_data(&mut h, p, data).unwrap();
        };
        let config = self.config();
        let config_name = format!("{}.json", &sha256(&config)[7..]);
        add(&config_name, &config);
        let mut names = Vec::new();
        for l in &self.layers {
            let n = format!("{}/layer.tar", &sha256(l)[7..]);
            add(&n, l);
            names.push(n);
        }
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": config_name, "RepoTags": [repo_tag], "Layers": names,
        }]))
        .unwrap();
        add("manifest.json", &manifest);
        b.into_inner().unwrap()
    }
}

/// What a container must see under `under`, per the OCI layer rules:
/// path → `dir <mode>`, `file <mode> <content>` or `link <target>`, with
/// hard links sharing content.
pub fn merged_tree(layers: &[Vec<Entry>], under: &str) -> BTreeMap<String, String> {
    let mut t: BTreeMap<String, String> = BTreeMap::new();
    let remove_under = |t: &mut BTreeMap<String, String>, p: &str, keep_self: bool| {
        let prefix = format!("{p}/");
        t.retain(|k, _| !(k.starts_with(&prefix) || (!keep_self && k == p)));
    };
    for layer in layers {
        // Whiteouts apply to the lower layers only: first, whatever their
        // place in the tar.
        for e in layer {
            match e {
                Entry::Whiteout(p) => remove_under(&mut t, &format!("/{p}"), false),
                Entry::Opaque(d) => remove_under(&mut t, &format!("/{d}"), true),
                _ => {}
            }
        }
        for e in layer {
            match e {
                Entry::Dir(p, m) => {
                    t.insert(format!("/{p}"), format!("dir {m:o}"));
                }
                Entry::File(p, m, d) => {
                    t.insert(
                        format!("/{p}"),
                        format!(
                            "file {m:o} {}",
                            String::from_utf8_lossy(&d[..d.len().min(32)])
                        ),
                    );
                }
                Entry::Symlink(p, target) => {
                    t.insert(format!("/{p}"), format!("link {target}"));
                }
                Entry::Hard(p, target) => {
                    let v = t[&format!("/{target}")].clone();
                    t.insert(format!("/{p}"), v);
                }
                _ => {}
            }
        }
    }
    t.into_iter()
        .filter(|(k, _)| k == under || k.starts_with(&format!("{under}/")))
        .collect()
}

/// A shell script for busybox printing, for every path under `dir`, the
/// same line [`merged_tree`] computes.
pub fn listing_script(dir: &str) -> String {
    format!(
        r#"find {dir} | sort | while read f; do
  if [ -L "$f" ]; then echo "$f link $(readlink "$f")";
  elif [ -d "$f" ]; then echo "$f dir $(stat -c %a "$f")";
  else echo "$f file $(stat -c %a "$f") $(head -c 32 "$f")"; fi
done"#
    )
}
