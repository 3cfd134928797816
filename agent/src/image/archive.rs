//! Reading an uploaded image archive: a `docker save` tar
//! (`manifest.json`) or a tarred OCI image layout (`oci-layout` +
//! `index.json`). The archive is never unpacked: its entries are indexed
//! by offset and the blobs read in place.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tar::EntryType;

use super::convert::hex;
use super::unpack::{parse_pax, pax_num, read_small, UnpackError, MAX_PATH, MAX_PAX};

/// Most entries an archive may have (an image has a few per layer).
const MAX_ENTRIES: usize = 100_000;
/// Largest JSON document (manifest, index, config) read into memory.
pub const MAX_JSON: u64 = 4 << 20;

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Not a format this agent reads.
    #[error("{0}")]
    Format(String),
    /// A blob does not hash to its name.
    #[error("blob {expected} in the archive hashes to {actual}")]
    Digest {
        /// Its name.
        expected: String,
        /// What it hashes to.
        actual: String,
    },
    /// Reading failed.
    #[error("reading the archive failed")]
    Io(#[from] io::Error),
}

fn format(msg: impl Into<String>) -> ArchiveError {
    ArchiveError::Format(msg.into())
}

/// Where an entry's bytes are in the archive file.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    /// Byte offset of the data.
    pub offset: u64,
    /// Its length.
    pub size: u64,
}

/// One layer to import.
#[derive(Debug, Clone)]
pub struct LayerRef {
    /// Where its (possibly compressed) tar is.
    pub span: Span,
    /// The digest the manifest gives its blob, checked while reading.
    pub blob_digest: Option<String>,
}

/// An image found in an archive.
#[derive(Debug)]
pub struct Found {
    /// Names the archive gives it (`RepoTags`, `org.opencontainers.image.ref.name`).
    pub names: Vec<String>,
    /// The config blob.
    pub config: Vec<u8>,
    /// Its layers, lowest first.
    pub layers: Vec<LayerRef>,
}

/// Indexes the archive and finds its image.
pub fn read(path: &Path) -> Result<Found, ArchiveError> {
    let mut file = File::open(path)?;
    let index = index(&mut file)?;
    if index.contains_key("index.json") && index.contains_key("oci-layout") {
        oci(&mut file, &index)
    } else if index.contains_key("manifest.json") {
        docker(&mut file, &index)
    } else {
        Err(format(
            "the archive is neither a docker save tar (manifest.json) nor an OCI image layout (oci-layout and index.json)",
        ))
    }
}

fn norm(p: &str) -> String {
    p.trim_start_matches("./").to_string()
}

/// Every regular file of the archive by its path. Iterated raw: GNU long
/// names and PAX headers are read here, each within a size limit (the tar
/// crate's own handling reads one of any declared size into memory), and
/// the entries' data is seeked over, not read.
fn index(file: &mut File) -> Result<HashMap<String, Span>, ArchiveError> {
    let bad = |e: UnpackError| format(e.to_string());
    let mut ar = tar::Archive::new(&mut *file);
    let mut out = HashMap::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut pax: Option<HashMap<String, Vec<u8>>> = None;
    for (n, e) in ar.entries_with_seek()?.raw(true).enumerate() {
        if n >= MAX_ENTRIES {
            return Err(format("the archive has too many entries"));
        }
        let mut e = e?;
        match e.header().entry_type() {
            EntryType::GNULongName => {
                let mut v = read_small(&mut e, MAX_PATH as u64 + 1).map_err(bad)?;
                if v.last() == Some(&0) {
                    v.pop();
                }
                long_name = Some(v);
                continue;
            }
            EntryType::GNULongLink => {
                read_small(&mut e, MAX_PATH as u64 + 1).map_err(bad)?;
                continue;
            }
            EntryType::XHeader => {
                pax = Some(parse_pax(&read_small(&mut e, MAX_PAX).map_err(bad)?).map_err(bad)?);
                continue;
            }
            EntryType::XGlobalHeader => {
                read_small(&mut e, MAX_PAX).map_err(bad)?;
                continue;
            }
            _ => {}
        }
        // A long name or PAX header belongs to the entry after it.
        let pax_now = pax.take().unwrap_or_default();
        let long_now = long_name.take();
        if e.header().entry_type() != EntryType::Regular {
            continue;
        }
        let size = e.header().entry_size()?;
        if pax_num(&pax_now, "size").is_some_and(|s| s != size) {
            return Err(format(
                "the archive has a PAX size beyond its header's, which this agent does not read",
            ));
        }
        let path = match (pax_now.get("path"), long_now) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) => p,
            (None, None) => e.header().path_bytes().into_owned(),
        };
        out.insert(
            norm(&String::from_utf8_lossy(&path)),
            Span {
                offset: e.raw_file_position(),
                size,
            },
        );
    }
    Ok(out)
}

/// A reader over one entry of the archive.
pub fn open_span(path: &Path, span: Span) -> io::Result<impl Read> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(span.offset))?;
    Ok(f.take(span.size))
}

fn read_json_at(file: &mut File, span: Span, what: &str) -> Result<Vec<u8>, ArchiveError> {
    if span.size > MAX_JSON {
        return Err(format(format!("{what} is larger than {MAX_JSON} bytes")));
    }
    file.seek(SeekFrom::Start(span.offset))?;
    let mut v = Vec::with_capacity(span.size as usize);
    file.take(span.size).read_to_end(&mut v)?;
    Ok(v)
}

fn entry<'a>(idx: &'a HashMap<String, Span>, p: &str) -> Result<&'a Span, ArchiveError> {
    idx.get(&norm(p))
        .ok_or_else(|| format(format!("the archive has no {p}")))
}

/// `blobs/<alg>/<hex>` of a digest, checked to be sha256 hex.
pub fn blob_path(digest: &str) -> Result<String, ArchiveError> {
    let hexpart = digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        })
        .ok_or_else(|| format(format!("{digest:?} is not a sha256 digest")))?;
    Ok(format!("blobs/sha256/{hexpart}"))
}

fn verified_blob(
    file: &mut File,
    idx: &HashMap<String, Span>,
    digest: &str,
    what: &str,
) -> Result<Vec<u8>, ArchiveError> {
    let data = read_json_at(file, *entry(idx, &blob_path(digest)?)?, what)?;
    let actual = format!("sha256:{}", hex(&Sha256::digest(&data)));
    if actual != digest {
        return Err(ArchiveError::Digest {
            expected: digest.into(),
            actual,
        });
    }
    Ok(data)
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// `platform` of a manifest list entry.
#[derive(Debug, Deserialize)]
pub struct Platform {
    /// `amd64`…
    pub architecture: String,
    /// `linux`…
    pub os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

/// An image manifest (OCI or Docker v2 schema 2).
#[derive(Debug, Deserialize)]
pub struct Manifest {
    /// The config blob.
    pub config: ManifestBlob,
    /// The layer blobs, lowest first.
    pub layers: Vec<ManifestBlob>,
}

/// A blob a manifest names.
#[derive(Debug, Deserialize)]
pub struct ManifestBlob {
    /// Its digest.
    pub digest: String,
    /// Its size.
    #[serde(default)]
    pub size: u64,
    /// Its media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
}

/// Whether a media type is an index / manifest list.
pub fn is_index(media_type: &str) -> bool {
    media_type.ends_with("image.index.v1+json") || media_type.ends_with("manifest.list.v2+json")
}

/// Whether a platform is the one this host runs.
pub fn is_host_platform(p: Option<&Platform>) -> bool {
    !matches!(p, Some(p) if p.os != "linux" || p.architecture != "amd64")
}

fn oci(file: &mut File, idx: &HashMap<String, Span>) -> Result<Found, ArchiveError> {
    let raw = read_json_at(file, *entry(idx, "index.json")?, "index.json")?;
    let mut index: Index =
        serde_json::from_slice(&raw).map_err(|e| format(format!("index.json: {e}")))?;
    let mut names = Vec::new();
    // Follow nested indexes (at most a few levels) to a linux/amd64 manifest.
    for _ in 0..4 {
        let d = index
            .manifests
            .iter()
            .find(|d| is_host_platform(d.platform.as_ref()))
            .ok_or_else(|| format("the image has no linux/amd64 manifest"))?;
        if let Some(n) = d.annotations.get("org.opencontainers.image.ref.name") {
            names.push(n.clone());
        }
        let body = verified_blob(file, idx, &d.digest, "a manifest")?;
        if is_index(&d.media_type) {
            index =
                serde_json::from_slice(&body).map_err(|e| format(format!("nested index: {e}")))?;
            continue;
        }
        let m: Manifest =
            serde_json::from_slice(&body).map_err(|e| format(format!("manifest: {e}")))?;
        let config = verified_blob(file, idx, &m.config.digest, "the config")?;
        let layers = m
            .layers
            .iter()
            .map(|l| {
                Ok(LayerRef {
                    span: *entry(idx, &blob_path(&l.digest)?)?,
                    blob_digest: Some(l.digest.clone()),
                })
            })
            .collect::<Result<Vec<_>, ArchiveError>>()?;
        return Ok(Found {
            names,
            config,
            layers,
        });
    }
    Err(format("image indexes nest too deeply"))
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn docker(file: &mut File, idx: &HashMap<String, Span>) -> Result<Found, ArchiveError> {
    let raw = read_json_at(file, *entry(idx, "manifest.json")?, "manifest.json")?;
    let list: Vec<DockerEntry> =
        serde_json::from_slice(&raw).map_err(|e| format(format!("manifest.json: {e}")))?;
    let m = list
        .into_iter()
        .next()
        .ok_or_else(|| format("manifest.json lists no image"))?;
    let config = read_json_at(file, *entry(idx, &m.config)?, "the config")?;
    let layers = m
        .layers
        .iter()
        .map(|l| {
            Ok(LayerRef {
                span: *entry(idx, l)?,
                // Newer docker names layers by their digest; older ones by
                // directory. The diff id in the config is checked anyway.
                blob_digest: l
                    .strip_prefix("blobs/sha256/")
                    .map(|h| format!("sha256:{h}")),
            })
        })
        .collect::<Result<Vec<_>, ArchiveError>>()?;
    Ok(Found {
        names: m.repo_tags.unwrap_or_default(),
        config,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gnu(kind: EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    fn archive_file(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.tar");
        std::fs::write(&p, bytes).unwrap();
        let f = File::open(&p).unwrap();
        (d, f)
    }

    #[test]
    fn long_names_and_pax_paths_are_indexed_by_the_names_they_give() {
        let long = format!("blobs/sha256/{}", "a".repeat(120));
        let mut b = tar::Builder::new(Vec::new());
        // The builder writes a GNU long-name record for a path this long.
        b.append_data(&mut gnu(EntryType::Regular, 3), &long, &b"one"[..])
            .unwrap();
        let mut pax = tar::Builder::new(Vec::new());
        pax.append_pax_extensions([("path", &b"from/pax"[..])])
            .unwrap();
        let mut h = gnu(EntryType::Regular, 2);
        h.set_path("short").unwrap();
        h.set_cksum();
        pax.append(&h, &b"xy"[..]).unwrap();
        let mut bytes = b.into_inner().unwrap();
        // Drop the first archive's end marker (two zero blocks).
        bytes.truncate(bytes.len() - 1024);
        bytes.extend(pax.into_inner().unwrap());
        let (_d, mut f) = archive_file(&bytes);
        let idx = index(&mut f).unwrap();
        let span = idx[&long];
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(span.offset)).unwrap();
        (&mut f).take(span.size).read_to_end(&mut v).unwrap();
        assert_eq!(v, b"one");
        assert_eq!(idx["from/pax"].size, 2);
        assert!(!idx.contains_key("short"), "{:?}", idx.keys());
    }

    #[test]
    fn refuses_an_oversized_long_name_without_reading_it() {
        // A long-name record declaring 8 GiB, and nothing after it: read
        // whole, it would be allocated before anything failed.
        for kind in [EntryType::GNULongName, EntryType::XHeader] {
            let mut h = gnu(kind, 8 << 30);
            h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
            h.set_cksum();
            let (_d, mut f) = archive_file(h.as_bytes());
            let r = index(&mut f);
            assert!(
                matches!(&r, Err(ArchiveError::Format(m)) if m.contains("size limit")),
                "{kind:?}: {r:?}"
            );
        }
    }
}
