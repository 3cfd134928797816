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

use super::convert::hex;

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

fn index(file: &mut File) -> Result<HashMap<String, Span>, ArchiveError> {
    let mut ar = tar::Archive::new(&mut *file);
    let mut out = HashMap::new();
    for e in ar.entries()? {
        let e = e?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = norm(&String::from_utf8_lossy(&e.path_bytes()));
        out.insert(
            path,
            Span {
                offset: e.raw_file_position(),
                size: e.size(),
            },
        );
        if out.len() > MAX_ENTRIES {
            return Err(format("the archive has too many entries"));
        }
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
