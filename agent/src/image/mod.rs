//! The image store: content-addressed layers, each converted once into a
//! read-only disk that every VM using it attaches, and images that list
//! their layers and carry their run config.
//!
//! ```text
//! images/
//!   layers/sha256/<diff id hex>/  layer.json + disk.erofs   one per layer, read-only, shared
//!   images/<config digest hex>.json                          one per image: names, layers, config
//!   tmp/                                                     uploads and staging, emptied at start
//!   rw-template.ext4                                         blank ext4 every writable disk is backed by
//! ```
//!
//! A layer directory appears by one `rename` once its disk and
//! `layer.json` are complete, so a crash leaves either nothing or a whole
//! layer. Reference counts are computed, never stored: a layer is live
//! while an image record or a VM record names it, so a crash cannot leave
//! a count out of step. [`ImageStore::gc`] deletes the rest.

pub mod archive;
pub mod convert;
mod overlay;
pub mod pull;
pub mod unpack;

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmlet_protocol::api::{ImageConfig, ImageInfo, LayerInfo};
use vmlet_protocol::{ApiError, ErrorCode};

use crate::ids;
use crate::state::write_atomic;
use convert::{hex, ConvertError, Converter, HashingReader, LayerFs};

/// Default cap on one upload or pulled blob: 8 GiB.
pub const DEFAULT_MAX_UPLOAD: u64 = 8 << 30;
/// Size of the blank writable disk every VM's copy-on-write disk is
/// backed by. Sparse: it costs what its metadata costs.
pub const RW_SIZE: &str = "4G";
/// Most layers an image may have.
pub const MAX_LAYERS: usize = 128;

/// Why the image store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file operation failed.
    #[error("image store i/o failed at {path}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An external tool failed.
    #[error("{tool} failed: {stderr}")]
    Tool {
        /// The tool.
        tool: String,
        /// What it printed.
        stderr: String,
    },
    /// The host lacks something the image needs.
    #[error("{0}")]
    Missing(String),
    /// The default image could not be stored.
    #[error("cannot store the busybox image: {0}")]
    Busybox(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn api(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    api(ErrorCode::Internal, format!("{what}: {e}"))
}

/// `layer.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// Digests of compressed blobs known to hold this layer.
    pub blob_digests: Vec<String>,
    /// Bytes of the uncompressed tar.
    pub size: u64,
    /// Bytes of the disk.
    pub disk_size: u64,
    /// Filesystem of the disk.
    pub fstype: String,
    /// Milliseconds the conversion took (unpack + mkfs).
    pub convert_ms: u64,
}

/// `images/<hex>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:` of the config blob.
    pub id: String,
    /// Names pointing at it.
    pub names: Vec<String>,
    /// Diff ids, lowest first.
    pub layers: Vec<String>,
    /// The run config.
    pub config: ImageConfig,
    /// When it was stored.
    pub created_ms: u64,
}

/// An image resolved for a VM.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its id.
    pub id: String,
    /// Its layers' diff ids, lowest first.
    pub layers: Vec<String>,
    /// Its run config.
    pub config: ImageConfig,
}

/// A layer disk to attach.
#[derive(Debug, Clone)]
pub struct LayerDisk {
    /// The disk file.
    pub path: PathBuf,
    /// Its filesystem.
    pub fstype: String,
}

/// The part of an OCI image config the store reads.
#[derive(Debug, Deserialize)]
struct OciConfig {
    #[serde(default)]
    config: Option<OciRunConfig>,
    rootfs: OciRootfs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct OciRunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OciRootfs {
    diff_ids: Vec<String>,
}

/// Where one layer's tar comes from: opened when (and if) it must be
/// converted.
pub struct LayerSource<'a> {
    /// Opens the (possibly compressed) tar.
    pub open: Box<dyn Fn() -> io::Result<Box<dyn Read + 'a>> + Send + Sync + 'a>,
    /// The digest of the compressed blob, checked while reading, if known.
    pub blob_digest: Option<String>,
}

impl std::fmt::Debug for LayerSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerSource")
            .field("blob_digest", &self.blob_digest)
            .finish()
    }
}

/// Checks a `sha256:<64 lowercase hex>` digest and returns the hex: the
/// only form of digest ever used in a path.
pub fn digest_hex(d: &str) -> Result<&str, ApiError> {
    d.strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        })
        .ok_or_else(|| {
            api(
                ErrorCode::InvalidArgument,
                format!(
                    "{:?} is not a sha256 digest",
                    d.chars().take(80).collect::<String>()
                ),
            )
        })
}

/// `name` or `name:tag` → `name:tag` (`latest` by default), without a
/// `docker.io/library/` prefix.
pub fn normalize_name(n: &str) -> String {
    let n = n
        .strip_prefix("docker.io/library/")
        .or_else(|| n.strip_prefix("docker.io/"))
        .unwrap_or(n);
    let last = n.rsplit('/').next().unwrap_or(n);
    if last.contains(':') || last.contains('@') {
        n.to_string()
    } else {
        format!("{n}:latest")
    }
}

/// The shared blank writable template (`rw-template.ext4`) is a raw file;
/// every writable disk's qcow2 names it with this format.
const RW_TEMPLATE_FORMAT: &str = "raw";

/// The image store under the agent's state directory.
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    fs_kind: LayerFs,
    converter: Converter,
    /// Serialises changes to image records.
    records: Mutex<()>,
    /// Every image record as last read from `images/`; emptied by each
    /// change the store makes there, read again on the next lookup. So a
    /// create resolves its image without reading one file per image.
    cache: parking_lot::Mutex<Option<Arc<Vec<ImageRecord>>>>,
    /// Imports hold it shared; GC holds it exclusively, so a layer
    /// converted for an import whose record is not written yet is never
    /// collected.
    gc_lock: RwLock<()>,
    /// Cap on one upload or blob.
    pub max_upload: u64,
    /// Blank writable overlays, one per backing, cloned for each VM.
    blank_overlays: overlay::BlankOverlays,
}

impl ImageStore {
    /// Opens the store at `dir`, creating it, emptying `tmp/` and dropping
    /// half-made layers a crash left.
    pub fn open(dir: PathBuf) -> Result<Self, ImageError> {
        for d in ["layers/sha256", "images", "tmp"] {
            let p = dir.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let tmp = dir.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
        }
        let layers = dir.join("layers/sha256");
        for e in fs::read_dir(&layers).map_err(io_err(&layers))?.flatten() {
            if !e.path().join("layer.json").is_file() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        // The single-disk store that came before this one.
        let _ = fs::remove_dir_all(dir.join("busybox"));
        let parallel = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4);
        let store = ImageStore {
            dir,
            fs_kind: LayerFs::Erofs,
            converter: Converter::new(parallel),
            records: Mutex::new(()),
            cache: parking_lot::Mutex::new(None),
            gc_lock: RwLock::new(()),
            max_upload: DEFAULT_MAX_UPLOAD,
            blank_overlays: overlay::BlankOverlays::default(),
        };
        store.ensure_rw_template()?;
        // Every VM's writable disk is cloned from this; if it cannot be
        // made now, the first start says why.
        if let Err(e) = store.blank_overlays.blank_for(
            &store.rw_template(),
            RW_TEMPLATE_FORMAT,
            &store.tmp_dir(),
        ) {
            tracing::warn!(error = %e, "cannot make the blank writable overlay yet");
        }
        Ok(store)
    }

    /// The directory for uploads and staging.
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn layer_dir(&self, hexd: &str) -> PathBuf {
        self.dir.join("layers/sha256").join(hexd)
    }

    fn image_path(&self, hexd: &str) -> PathBuf {
        self.dir.join("images").join(format!("{hexd}.json"))
    }

    /// Holds off garbage collection while the guard lives.
    pub fn gc_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.gc_lock.read().expect("gc lock")
    }

    /// The stored layer, if it is complete.
    pub fn layer(&self, diff_id: &str) -> Option<LayerRecord> {
        let h = digest_hex(diff_id).ok()?;
        let b = fs::read(self.layer_dir(h).join("layer.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The disk of a stored layer.
    pub fn layer_disk(&self, diff_id: &str) -> Result<LayerDisk, ApiError> {
        let rec = self.layer(diff_id).ok_or_else(|| {
            api(
                ErrorCode::NotFound,
                format!("layer {diff_id} is not in the image store"),
            )
        })?;
        let h = digest_hex(diff_id)?;
        Ok(LayerDisk {
            path: self.layer_dir(h).join(format!("disk.{}", rec.fstype)),
            fstype: rec.fstype,
        })
    }

    /// Every image record, newest first.
    pub fn records(&self) -> Vec<ImageRecord> {
        self.cached_records().as_ref().clone()
    }

    /// [`ImageStore::records`], shared: read from `images/` only after a
    /// change. Read under the cache's lock, so a change made during the
    /// read empties the cache after it, not before.
    fn cached_records(&self) -> Arc<Vec<ImageRecord>> {
        let mut cache = self.cache.lock();
        if let Some(v) = &*cache {
            return v.clone();
        }
        let v = Arc::new(self.read_records());
        *cache = Some(v.clone());
        v
    }

    /// Empties the cache of records: call after every change to `images/`.
    fn records_changed(&self) {
        *self.cache.lock() = None;
    }

    fn read_records(&self) -> Vec<ImageRecord> {
        let mut v: Vec<ImageRecord> = fs::read_dir(self.dir.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        v.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
        v
    }

    /// Finds an image by name (`busybox`, `repo:tag`), `sha256:` id, or a
    /// unique id prefix of at least 4 hex digits.
    pub fn find(&self, reference: &str) -> Result<ImageRecord, ApiError> {
        ids::validate_image(reference)?;
        let recs = self.cached_records();
        if reference.starts_with("sha256:") {
            if let Some(r) = recs.iter().find(|r| r.id == reference) {
                return Ok(r.clone());
            }
        }
        let norm = normalize_name(reference);
        if let Some(r) = recs.iter().find(|r| r.names.contains(&norm)) {
            return Ok(r.clone());
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if prefix.len() >= 4 && prefix.bytes().all(|c| c.is_ascii_hexdigit()) {
            let mut it = recs.iter().filter(|r| r.id[7..].starts_with(prefix));
            match (it.next(), it.next()) {
                (Some(r), None) => return Ok(r.clone()),
                (Some(_), Some(_)) => {
                    return Err(api(
                        ErrorCode::InvalidArgument,
                        format!("{reference:?} matches more than one image"),
                    ))
                }
                _ => {}
            }
        }
        Err(api(
            ErrorCode::NotFound,
            format!("no image {reference:?} in this agent's image store"),
        ))
    }

    /// Finds an image for a VM.
    pub fn resolve(&self, reference: &str) -> Result<Image, ApiError> {
        let r = self.find(reference)?;
        Ok(Image {
            id: r.id,
            layers: r.layers,
            config: r.config,
        })
    }

    /// The API view of a record.
    pub fn info(&self, r: &ImageRecord, used_by: Vec<String>) -> ImageInfo {
        ImageInfo {
            id: r.id.clone(),
            names: r.names.clone(),
            layers: r
                .layers
                .iter()
                .map(|d| {
                    let l = self.layer(d);
                    LayerInfo {
                        diff_id: d.clone(),
                        size: l.as_ref().map_or(0, |l| l.size),
                        disk_size: l.as_ref().map_or(0, |l| l.disk_size),
                        fstype: l.map(|l| l.fstype).unwrap_or_default(),
                    }
                })
                .collect(),
            config: r.config.clone(),
            created_ms: r.created_ms,
            used_by,
        }
    }

    /// Imports an uploaded archive (blocking: call from a blocking task).
    pub fn import_archive(
        &self,
        path: &Path,
        name: Option<String>,
    ) -> Result<ImageRecord, ApiError> {
        let found = archive::read(path).map_err(|e| {
            api(
                ErrorCode::InvalidArgument,
                format!("cannot import: {}", crate::start::error_chain(&e)),
            )
        })?;
        let names = match name {
            Some(n) => vec![n],
            None => found.names.clone(),
        };
        let sources = found
            .layers
            .iter()
            .map(|l| {
                let span = l.span;
                LayerSource {
                    open: Box::new(move || {
                        Ok(Box::new(archive::open_span(path, span)?) as Box<dyn Read>)
                    }),
                    blob_digest: l.blob_digest.clone(),
                }
            })
            .collect();
        self.store_image(&found.config, names, sources)
    }

    /// Converts whatever layers are missing (in parallel, each once) and
    /// writes the image record. Blocking.
    pub fn store_image(
        &self,
        config: &[u8],
        names: Vec<String>,
        layers: Vec<LayerSource<'_>>,
    ) -> Result<ImageRecord, ApiError> {
        let bad = |m: String| api(ErrorCode::InvalidArgument, m);
        let parsed: OciConfig = serde_json::from_slice(config)
            .map_err(|e| bad(format!("the image config is not valid: {e}")))?;
        let diff_ids = parsed.rootfs.diff_ids;
        if diff_ids.len() != layers.len() {
            return Err(bad(format!(
                "the manifest lists {} layers but the config {} diff ids",
                layers.len(),
                diff_ids.len()
            )));
        }
        if diff_ids.len() > MAX_LAYERS {
            return Err(bad(format!("images may have at most {MAX_LAYERS} layers")));
        }
        for d in &diff_ids {
            digest_hex(d)?;
        }
        let mut norm_names = Vec::new();
        for n in &names {
            ids::validate_image(n)?;
            let n = normalize_name(n);
            if !norm_names.contains(&n) {
                norm_names.push(n);
            }
        }
        let id = format!("sha256:{}", hex(&Sha256::digest(config)));
        let run = parsed.config.unwrap_or_default();
        let cfg = ImageConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            user: run.user.filter(|u| !u.is_empty()),
        };
        // What every container of it would send its guest: refused now
        // rather than at each create (and kept out of every reply that
        // lists images).
        let run_bytes = crate::agent::spec_bytes(
            cfg.entrypoint
                .iter()
                .chain(&cfg.cmd)
                .chain(&cfg.env)
                .chain(&cfg.working_dir)
                .chain(&cfg.user),
        );
        if run_bytes > crate::agent::MAX_SPEC_BYTES {
            return Err(bad(format!(
                "the image's config gives its containers {run_bytes} bytes of command, \
                 environment, working directory and user; at most {} reach a guest",
                crate::agent::MAX_SPEC_BYTES
            )));
        }

        let _gc = self.gc_guard();
        // Different layers convert in parallel (bounded by the
        // converter's slots); the same layer twice waits for the first.
        let results: Vec<Result<(), ConvertError>> = std::thread::scope(|s| {
            let hs: Vec<_> = diff_ids
                .iter()
                .zip(layers.iter())
                .map(|(d, src)| s.spawn(move || self.ensure_layer(d, src)))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ConvertError::Concurrent("?".into(), "panicked".into()))
                    })
                })
                .collect()
        });
        for (d, r) in diff_ids.iter().zip(results) {
            if let Err(e) = r {
                let code = match e {
                    ConvertError::Unpack(_)
                    | ConvertError::Digest { .. }
                    | ConvertError::TooLarge { .. } => ErrorCode::InvalidArgument,
                    _ => ErrorCode::Internal,
                };
                return Err(api(
                    code,
                    format!("cannot import layer {d}: {}", crate::start::error_chain(&e)),
                ));
            }
        }

        let _g = self.records.lock().expect("records lock");
        let hexd = &id[7..];
        let rec = ImageRecord {
            id: id.clone(),
            names: norm_names.clone(),
            layers: diff_ids,
            config: cfg,
            created_ms: crate::vm::now_ms(),
        };
        let rec = self.claim_names(rec, &norm_names)?;
        let p = self.image_path(hexd);
        tracing::info!(image = %id, names = ?rec.names, path = %p.display(), "image stored");
        Ok(rec)
    }

    /// Points `names` at the stored image `id`, taking them from any
    /// other: a pull of an image that is here already, layers and all.
    pub fn add_names(&self, id: &str, names: &[String]) -> Result<ImageRecord, ApiError> {
        let mut norm_names = Vec::new();
        for n in names {
            ids::validate_image(n)?;
            norm_names.push(normalize_name(n));
        }
        let _g = self.records.lock().expect("records lock");
        let rec = self
            .records()
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| api(ErrorCode::NotFound, format!("no image {id} in the store")))?;
        let rec = self.claim_names(rec, &norm_names)?;
        tracing::info!(image = %id, names = ?rec.names, "image names added");
        Ok(rec)
    }

    /// Writes `rec` with `names` added, keeping the names and creation
    /// time a stored record of the same id has, and takes `names` from
    /// every other image (a name points at one image). Call with
    /// `records` held.
    fn claim_names(
        &self,
        mut rec: ImageRecord,
        norm_names: &[String],
    ) -> Result<ImageRecord, ApiError> {
        for n in norm_names {
            if !rec.names.contains(n) {
                rec.names.push(n.clone());
            }
        }
        for mut other in self.records() {
            if other.id == rec.id {
                for n in other.names {
                    if !rec.names.contains(&n) {
                        rec.names.push(n);
                    }
                }
                rec.created_ms = other.created_ms;
                continue;
            }
            let before = other.names.len();
            other.names.retain(|n| !norm_names.contains(n));
            if other.names.len() != before {
                self.write_record(&other)?;
            }
        }
        self.write_record(&rec)?;
        Ok(rec)
    }

    fn write_record(&self, r: &ImageRecord) -> Result<(), ApiError> {
        let p = self.image_path(&r.id[7..]);
        let data = serde_json::to_vec_pretty(r).expect("record serialises");
        let written = write_atomic(&p, &data);
        // Even a failed write may have replaced the file.
        self.records_changed();
        written.map_err(|e| internal("cannot write the image record", e))
    }

    /// Converts a layer unless it is stored already.
    fn ensure_layer(&self, diff_id: &str, src: &LayerSource<'_>) -> Result<(), ConvertError> {
        self.converter.once(
            diff_id,
            || self.layer(diff_id).is_some(),
            || self.convert_layer(diff_id, src),
        )
    }

    fn convert_layer(&self, diff_id: &str, src: &LayerSource<'_>) -> Result<(), ConvertError> {
        let hexd = diff_id.strip_prefix("sha256:").unwrap_or(diff_id);
        let work = self
            .tmp_dir()
            .join(format!("layer-{hexd}-{}", ids::new_id()));
        fs::create_dir_all(&work).map_err(convert::io_err(&work))?;
        let r = (|| {
            let disk = work.join(format!("disk.{}", self.fs_kind.name()));
            let raw = (src.open)().map_err(convert::io_err(&work))?;
            let mut hr = HashingReader::new(raw);
            let t0 = std::time::Instant::now();
            let c = convert::convert(
                &mut hr,
                Some(diff_id),
                &work.join("stage"),
                &disk,
                self.fs_kind,
                &convert::Limit::for_dir(&work),
            )?;
            let (blob, _) = hr.finish().map_err(ConvertError::Decompress)?;
            if let Some(want) = &src.blob_digest {
                if *want != blob {
                    return Err(ConvertError::Digest {
                        expected: want.clone(),
                        actual: blob,
                    });
                }
            }
            let rec = LayerRecord {
                diff_id: diff_id.to_string(),
                blob_digests: vec![blob],
                size: c.size,
                disk_size: c.disk_size,
                fstype: self.fs_kind.name().into(),
                convert_ms: t0.elapsed().as_millis() as u64,
            };
            let data = serde_json::to_vec_pretty(&rec).expect("layer serialises");
            let lj = work.join("layer.json");
            write_atomic(&lj, &data).map_err(convert::io_err(&lj))?;
            // Disks are only ever read: make that so on the host too.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&disk, fs::Permissions::from_mode(0o444))
                .map_err(convert::io_err(&disk))?;
            let dest = self.layer_dir(hexd);
            let _ = fs::remove_dir_all(&dest);
            fs::rename(&work, &dest).map_err(convert::io_err(&dest))?;
            tracing::info!(
                layer = %diff_id, size = c.size, disk_size = c.disk_size,
                unpack_ms = c.unpack_ms, mkfs_ms = c.mkfs_ms, "layer converted"
            );
            Ok(())
        })();
        if r.is_err() {
            let _ = fs::remove_dir_all(&work);
        }
        r
    }

    /// Removes an image record (names and all). `used_by` lists the VMs
    /// using it; unless `force`, any refuses the removal.
    pub fn remove(
        &self,
        reference: &str,
        used_by: &dyn Fn(&str) -> Vec<String>,
        force: bool,
    ) -> Result<ImageRecord, ApiError> {
        // The GC lock's write side first: a create that resolved this image
        // holds its read side until its VM is registered, so `used_by` sees
        // that VM. (The lock order is the create's: GC lock, then records.)
        let _gc = self.gc_lock.write().expect("gc lock");
        let _g = self.records.lock().expect("records lock");
        let r = self.find(reference)?;
        let users = used_by(&r.id);
        if !users.is_empty() && !force {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "image {} is used by VM(s) {}: remove them first or force the removal",
                    r.id,
                    users.join(", ")
                ),
            ));
        }
        let p = self.image_path(&r.id[7..]);
        let removed = fs::remove_file(&p);
        self.records_changed();
        removed.map_err(|e| internal("cannot remove the image record", e))?;
        tracing::info!(image = %r.id, "image removed");
        Ok(r)
    }

    /// Deletes every layer that no image record and no VM (`vm_layers`,
    /// asked once the GC lock is held, so a VM being created is in it)
    /// names. Returns the diff ids deleted.
    pub fn gc(&self, vm_layers: &dyn Fn() -> HashSet<String>) -> Vec<String> {
        let _g = self.gc_lock.write().expect("gc lock");
        let mut live: HashSet<String> = vm_layers();
        for r in self.records() {
            live.extend(r.layers);
        }
        let mut gone = Vec::new();
        let dir = self.dir.join("layers/sha256");
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let d = format!("sha256:{}", e.file_name().to_string_lossy());
            if !live.contains(&d) {
                match fs::remove_dir_all(e.path()) {
                    Ok(()) => gone.push(d),
                    Err(err) => {
                        tracing::warn!(layer = %d, error = %err, "cannot delete an unused layer")
                    }
                }
            }
        }
        if !gone.is_empty() {
            tracing::info!(layers = ?gone, "deleted unused layers");
        }
        gone
    }

    fn rw_template(&self) -> PathBuf {
        self.dir.join("rw-template.ext4")
    }

    /// Formats the blank ext4 that backs every VM's writable disk, once.
    /// Inode tables are zeroed here rather than lazily, so no guest spends
    /// its first minute writing them into its own copy-on-write disk.
    fn ensure_rw_template(&self) -> Result<(), ImageError> {
        let t = self.rw_template();
        if t.is_file() {
            return Ok(());
        }
        let tmp = self.tmp_dir().join("rw-template.ext4");
        let _ = fs::remove_file(&tmp);
        let out = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                "vmlet-rw",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            ])
            .arg(&tmp)
            .arg(RW_SIZE)
            .output()
            .map_err(|e| {
                ImageError::Missing(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"))
            })?;
        if !out.status.success() {
            return Err(ImageError::Tool {
                tool: "mkfs.ext4".into(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &t).map_err(io_err(&t))
    }

    /// Creates a VM's writable disk at `<vm_dir>/rw.qcow2`: a qcow2
    /// overlay on the shared blank template, so it costs the same however
    /// large the image is. The overlay is cloned from one made once and
    /// kept in memory (`overlay.rs`), not made by `qemu-img` per VM.
    pub fn create_writable(&self, vm_dir: &Path) -> Result<PathBuf, ApiError> {
        let dest = vm_dir.join("rw.qcow2");
        self.blank_overlays
            .create(
                &self.rw_template(),
                RW_TEMPLATE_FORMAT,
                &dest,
                &self.tmp_dir(),
            )
            .map_err(|e| internal("cannot create the writable disk", e))?;
        Ok(dest)
    }

    /// Makes, ahead of the first clone, the blank overlay every clone's
    /// writable disk over `backing` (a frozen qcow2) is cloned from.
    pub fn prepare_writable_over(&self, backing: &Path) -> Result<(), ApiError> {
        self.blank_overlays
            .blank_for(backing, "qcow2", &self.tmp_dir())
            .map(drop)
            .map_err(|e| internal("cannot make the clones' blank writable overlay", e))
    }

    /// A VM's writable disk over a template's frozen writable disk (a
    /// qcow2), so the clone's disk holds exactly what the template guest,
    /// whose memory the clone continues, had written.
    pub fn create_writable_over(&self, backing: &Path, vm_dir: &Path) -> Result<PathBuf, ApiError> {
        let dest = vm_dir.join("rw.qcow2");
        self.blank_overlays
            .create(backing, "qcow2", &dest, &self.tmp_dir())
            .map_err(|e| internal("cannot create the writable disk", e))?;
        Ok(dest)
    }

    /// Stores the default `busybox` image from the host's static busybox,
    /// if no image has that name yet: an ordinary one-layer image.
    pub fn ensure_busybox(&self) -> Result<(), ImageError> {
        if self.find("busybox").is_ok() {
            return Ok(());
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ImageError::Missing(
                    "no busybox on this host: install Debian's busybox-static".into(),
                )
            })?;
        let list = Command::new(busybox)
            .arg("--list")
            .output()
            .map_err(io_err(busybox))?;
        let tar_path = self
            .tmp_dir()
            .join(format!("busybox-{}.tar", ids::new_id()));
        let r = (|| -> Result<(), ImageError> {
            let f = fs::File::create(&tar_path).map_err(io_err(&tar_path))?;
            let mut b = tar::Builder::new(io::BufWriter::new(f));
            type B = tar::Builder<io::BufWriter<fs::File>>;
            fn add(
                b: &mut B,
                path: &str,
                kind: tar::EntryType,
                mode: u32,
                data: &[u8],
                link: Option<&str>,
            ) -> io::Result<()> {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_mode(mode);
                h.set_size(data.len() as u64);
                h.set_mtime(0);
                if let Some(l) = link {
                    h.set_link_name(l)?;
                }
                b.append_data(&mut h, path, data)
            }
            let res = (|| -> io::Result<()> {
                for d in [
                    "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var",
                ] {
                    let mode = if d == "tmp" { 0o1777 } else { 0o755 };
                    add(
                        &mut b,
                        &format!("{d}/"),
                        tar::EntryType::Directory,
                        mode,
                        &[],
                        None,
                    )?;
                }
                let bin = fs::read(busybox)?;
                add(
                    &mut b,
                    "bin/busybox",
                    tar::EntryType::Regular,
                    0o755,
                    &bin,
                    None,
                )?;
                for applet in String::from_utf8_lossy(&list.stdout).lines() {
                    let applet = applet.trim();
                    if applet.is_empty() || applet.contains('/') || applet == "busybox" {
                        continue;
                    }
                    add(
                        &mut b,
                        &format!("bin/{applet}"),
                        tar::EntryType::Symlink,
                        0o777,
                        &[],
                        Some("busybox"),
                    )?;
                }
                let files = [
                    (
                        "etc/passwd",
                        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
                    ),
                    ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
                    ("etc/hosts", "127.0.0.1 localhost\n"),
                ];
                for (name, text) in files {
                    add(
                        &mut b,
                        name,
                        tar::EntryType::Regular,
                        0o644,
                        text.as_bytes(),
                        None,
                    )?;
                }
                b.into_inner()?
                    .into_inner()
                    .map_err(|e| e.into_error())?
                    .sync_all()
            })();
            res.map_err(io_err(&tar_path))?;
            let diff_id = {
                let f = fs::File::open(&tar_path).map_err(io_err(&tar_path))?;
                HashingReader::new(f).finish().map_err(io_err(&tar_path))?.0
            };
            let config = serde_json::json!({
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Cmd": ["/bin/sh"],
                    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                },
                "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            });
            let config = serde_json::to_vec(&config).expect("json");
            let tp = tar_path.clone();
            let src = LayerSource {
                open: Box::new(move || Ok(Box::new(fs::File::open(&tp)?) as Box<dyn Read>)),
                blob_digest: None,
            };
            self.store_image(&config, vec!["busybox:latest".into()], vec![src])
                .map_err(|e| ImageError::Busybox(e.message))?;
            Ok(())
        })();
        let _ = fs::remove_file(&tar_path);
        r
    }
}

/// Applies an image's config to a create spec as `docker run` does: the
/// command replaces `Cmd`; `--entrypoint` replaces `Entrypoint` and drops
/// `Cmd`; the image's `Env` comes first and the spec's entries override it
/// by key; the spec's working directory and user win over the image's.
/// Afterwards `argv` is the full command line and `entrypoint` is `None`.
pub fn apply_config(
    spec: &mut vmlet_protocol::api::CreateSpec,
    cfg: &ImageConfig,
) -> Result<(), ApiError> {
    let (entrypoint, cmd) = match spec.entrypoint.take() {
        Some(ep) => (ep, std::mem::take(&mut spec.argv)),
        None if spec.argv.is_empty() => (cfg.entrypoint.clone(), cfg.cmd.clone()),
        None => (cfg.entrypoint.clone(), std::mem::take(&mut spec.argv)),
    };
    spec.argv = entrypoint.into_iter().chain(cmd).collect();
    if spec.argv.is_empty() {
        return Err(api(
            ErrorCode::InvalidArgument,
            "no command: the image has neither Entrypoint nor Cmd and none was given",
        ));
    }
    let key = |e: &str| e.split('=').next().unwrap_or_default().to_string();
    let mut env: Vec<String> = cfg.env.clone();
    for e in std::mem::take(&mut spec.env) {
        let k = key(&e);
        env.retain(|x| key(x) != k);
        env.push(e);
    }
    spec.env = env;
    if spec.workdir.is_none() {
        spec.workdir.clone_from(&cfg.working_dir);
    }
    if spec.user.is_none() {
        spec.user.clone_from(&cfg.user);
    }
    Ok(())
}

/// `qemu-img create -f qcow2 -F raw -b <backing> <dest>`: what a writable
/// disk costs made by hand, one process per disk (the agent clones a blank
/// overlay instead; see `overlay.rs`).
pub fn create_qcow2_overlay(backing: &Path, dest: &Path) -> io::Result<()> {
    overlay::create_with_qemu_img(backing, "raw", dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A create resolves its image and registers its VM under the GC
    /// lock's read side. A removal of that image in between waits for the
    /// VM to be registered, and so refuses (the image is in use) rather
    /// than leaving a VM whose layers the GC deletes.
    #[test]
    fn a_removal_waits_for_a_create_that_resolved_the_image() {
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(ImageStore::open(d.path().to_path_buf()).unwrap());
        store.ensure_busybox().unwrap();
        let users: Arc<Mutex<Vec<String>>> = Arc::default();
        // A create, between resolving the image and registering its VM.
        let creating = store.gc_guard();
        store.resolve("busybox").unwrap();
        let (s2, u2) = (store.clone(), users.clone());
        let rm = std::thread::spawn(move || {
            s2.remove("busybox", &|_| u2.lock().unwrap().clone(), false)
                .map(|_| ())
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        users.lock().unwrap().push("vm1".into());
        drop(creating);
        let e = rm.join().unwrap().unwrap_err();
        assert_eq!(e.code, ErrorCode::Conflict, "{e}");
        assert!(store.find("busybox").is_ok());
    }

    /// Lookups read the records from a cache; every change the store
    /// makes to them is seen by the next lookup.
    #[test]
    fn lookups_see_every_change_to_the_records() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::open(d.path().to_path_buf()).unwrap();
        store.ensure_busybox().unwrap();
        let id = store.find("busybox").unwrap().id;
        assert_eq!(store.find("other:1").unwrap_err().code, ErrorCode::NotFound);
        store.add_names(&id, &["other:1".into()]).unwrap();
        assert_eq!(store.find("other:1").unwrap().id, id);
        assert_eq!(store.records().len(), 1);
        store.remove("other:1", &|_| Vec::new(), false).unwrap();
        assert_eq!(store.find("busybox").unwrap_err().code, ErrorCode::NotFound);
        assert!(store.records().is_empty());
    }

    #[test]
    fn config_applies_as_docker_run_does() {
        use vmlet_protocol::api::CreateSpec;
        let cfg = ImageConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["a".into()],
            env: vec!["A=1".into(), "B=2".into()],
            working_dir: Some("/w".into()),
            user: Some("nobody".into()),
        };
        let mut s = CreateSpec::default();
        apply_config(&mut s, &cfg).unwrap();
        assert_eq!(s.argv, ["/ep", "a"]);
        assert_eq!(s.env, ["A=1", "B=2"]);
        assert_eq!(s.workdir.as_deref(), Some("/w"));
        assert_eq!(s.user.as_deref(), Some("nobody"));

        let mut s = CreateSpec {
            argv: vec!["x".into()],
            env: vec!["B=3".into(), "C=4".into()],
            user: Some("0".into()),
            ..Default::default()
        };
        apply_config(&mut s, &cfg).unwrap();
        assert_eq!(s.argv, ["/ep", "x"]);
        assert_eq!(s.env, ["A=1", "B=3", "C=4"]);
        assert_eq!(s.user.as_deref(), Some("0"));

        let mut s = CreateSpec {
            entrypoint: Some(vec!["/bin/sh".into()]),
            ..Default::default()
        };
        apply_config(&mut s, &cfg).unwrap();
        assert_eq!(s.argv, ["/bin/sh"], "--entrypoint drops the image's Cmd");
        assert!(s.entrypoint.is_none());

        let mut s = CreateSpec {
            entrypoint: Some(vec![]),
            ..Default::default()
        };
        assert!(apply_config(&mut s, &cfg).is_err());
    }

    #[test]
    fn names_normalise() {
        assert_eq!(normalize_name("busybox"), "busybox:latest");
        assert_eq!(normalize_name("busybox:1"), "busybox:1");
        assert_eq!(normalize_name("docker.io/library/debian"), "debian:latest");
        assert_eq!(
            normalize_name("localhost:5000/x/y"),
            "localhost:5000/x/y:latest"
        );
        assert_eq!(
            normalize_name("localhost:5000/x/y:v1"),
            "localhost:5000/x/y:v1"
        );
    }

    #[test]
    fn digests_are_checked_before_any_path_use() {
        assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
        for bad in [
            "sha256:../../etc",
            "sha256:",
            "md5:abc",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}/", "a".repeat(63)),
        ] {
            assert!(digest_hex(bad).is_err(), "{bad}");
        }
    }
}
