//! Pulling from an OCI distribution registry (Docker's registry, Harbor,
//! …) over HTTP or HTTPS: the manifest (an index or manifest list is
//! followed to its linux/amd64 image), the config, then the layer blobs
//! the store does not hold yet, each verified against its digest while it
//! streams to `tmp/`. The blobs then go through the same conversion as an
//! import ([`ImageStore::store_image`]).
//!
//! A blob downloads into `tmp/blob-<hex>.partial`; a pull that fails on
//! the network keeps it, and the next pull of that blob asks for the rest
//! (`Range: bytes=N-`) and hashes the part it has first. A blob whose
//! content does not match its digest, or that grows past its size, is
//! deleted, so nothing unverified stays in the store; so is one whose write
//! fails (a full disk). The first blob that fails for another reason than
//! the network or a busy registry stops the pull's other downloads, and
//! their partials are deleted too. (`tmp/` is emptied when
//! the agent starts, so partials last as long as the agent.)
//!
//! The client is blocking (ureq, rustls): run it on a blocking task.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use vmlet_protocol::api::Response;
use vmlet_protocol::{ApiError, ErrorCode};

use super::archive::{self, Manifest, Platform, MAX_JSON};
use super::convert::hex;
use super::{digest_hex, ImageRecord, ImageStore, LayerSource, MAX_LAYERS};
use crate::agent::Agent;
use crate::ids;

/// What a manifest request accepts: OCI index and manifest, Docker v2
/// manifest list and manifest. (Schema 1 is not asked for, and refused.)
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";
/// Largest token response read into memory.
const MAX_TOKEN: u64 = 1 << 20;
/// Largest error body quoted in a message.
const MAX_ERROR_BODY: u64 = 4 << 10;
/// Blobs downloaded at once by one pull.
const PARALLEL: usize = 3;
/// Time to connect, and to get a response's headers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Budget for a body: this, plus its size at [`MIN_RATE`]. ureq has no
/// idle timeout, so a stalled transfer ends here (and resumes next time).
const BODY_TIMEOUT: Duration = Duration::from_secs(120);
const MIN_RATE: u64 = 256 << 10;
/// Most index levels followed.
const MAX_NESTING: usize = 4;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, &'static str),
    /// The registry could not be reached or the transfer broke.
    #[error("request to {url} failed")]
    Http {
        /// What was asked.
        url: String,
        /// The cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The registry answered with an error status.
    #[error("{url} answered {status}: {body}")]
    Status {
        /// What was asked.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body the registry sent.
        body: String,
    },
    /// The registry sent something that is not what the API says.
    #[error("{0}")]
    Protocol(String),
    /// A blob or manifest does not hash to its digest.
    #[error("blob {expected} failed verification: its content hashes to {actual}")]
    Digest {
        /// The digest it was asked for by.
        expected: String,
        /// What its bytes hash to.
        actual: String,
    },
    /// Something is larger than the cap for it.
    #[error("{what} is larger than {limit} bytes")]
    TooLarge {
        /// What.
        what: String,
        /// The cap.
        limit: u64,
    },
    /// The download stopped because another blob of the same pull failed
    /// (that failure is the one reported).
    #[error("stopped: another blob of the image failed")]
    Stopped,
    /// A file operation failed.
    #[error("pull i/o failed at {path}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl PullError {
    fn code(&self) -> ErrorCode {
        match self {
            PullError::Http { .. } => ErrorCode::Unavailable,
            PullError::Status { status, .. } => match status {
                404 => ErrorCode::NotFound,
                408 | 429 | 500..=599 => ErrorCode::Unavailable,
                _ => ErrorCode::InvalidArgument,
            },
            PullError::Io { .. } | PullError::Stopped => ErrorCode::Internal,
            PullError::Reference(..)
            | PullError::Protocol(_)
            | PullError::Digest { .. }
            | PullError::TooLarge { .. } => ErrorCode::InvalidArgument,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PullError + '_ {
    move |source| PullError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn protocol(msg: impl Into<String>) -> PullError {
    PullError::Protocol(msg.into())
}

/// A parsed `[http://|https://]host[:port]/repo[:tag|@sha256:…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `https://host[:port]` the API is at.
    pub base: String,
    /// The host as it appears in the image's name (`docker.io` for Docker
    /// Hub, whose API is at `registry-1.docker.io`).
    pub host: String,
    /// `library/busybox`, `test/img`…
    pub repo: String,
    /// The tag, if any.
    pub tag: Option<String>,
    /// The manifest digest, if any (it wins over the tag).
    pub digest: Option<String>,
}

impl Reference {
    /// Parses a reference. Without a scheme, HTTPS; without a registry
    /// host (no `.` or `:` in the first component and not `localhost`),
    /// Docker Hub, as `docker pull` reads it.
    pub fn parse(s: &str) -> Result<Reference, PullError> {
        let bad = |why| PullError::Reference(s.chars().take(120).collect(), why);
        if s.len() > 512 {
            return Err(bad("it is too long"));
        }
        let (scheme, rest) = if let Some(r) = s.strip_prefix("http://") {
            ("http", r)
        } else if let Some(r) = s.strip_prefix("https://") {
            ("https", r)
        } else if s.contains("://") {
            return Err(bad("only http:// and https:// registries are supported"));
        } else {
            ("https", s)
        };
        let (first, after) = rest.split_once('/').unwrap_or(("", rest));
        let explicit_host = !first.is_empty()
            && (first.contains('.') || first.contains(':') || first == "localhost");
        let (host, path) = if explicit_host {
            (first.to_ascii_lowercase(), after.to_string())
        } else {
            ("docker.io".to_string(), rest.to_string())
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':'))
        {
            return Err(bad("the registry host is not a host[:port]"));
        }
        let (name, digest) = match path.split_once('@') {
            Some((n, d)) => {
                digest_hex(d).map_err(|_| bad("the digest is not sha256:<64 hex digits>"))?;
                (n.to_string(), Some(d.to_string()))
            }
            None => (path, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (name[..i].to_string(), Some(name[i + 1..].to_string()))
            }
            None => (name, None),
        };
        let repo = if host == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if repo.len() > 255 || !repo.split('/').all(component_ok) {
            return Err(bad(
                "the repository must be lowercase letters, digits and ._- separated by /",
            ));
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return Err(bad("the tag must be [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
            }
        }
        let api_host = if host == "docker.io" {
            "registry-1.docker.io"
        } else {
            &host
        };
        let r = Reference {
            base: format!("{scheme}://{api_host}"),
            host,
            repo,
            tag,
            digest,
        };
        ids::validate_image(&r.name()).map_err(|_| bad("the image name it makes is not valid"))?;
        Ok(r)
    }

    /// What the manifest is asked for by: the digest, else the tag, else
    /// `latest`.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The name the image is stored under: `host/repo:tag`, or
    /// `host/repo@sha256:…` when pulled by digest alone.
    pub fn name(&self) -> String {
        match (&self.tag, &self.digest) {
            (None, Some(d)) => format!("{}/{}@{d}", self.host, self.repo),
            (t, _) => format!(
                "{}/{}:{}",
                self.host,
                self.repo,
                t.as_deref().unwrap_or("latest")
            ),
        }
    }
}

/// Pulls `reference` into the store.
pub async fn pull(agent: &Arc<Agent>, reference: &str) -> Result<Response, ApiError> {
    let r = Reference::parse(reference).map_err(|e| ApiError::new(e.code(), e.to_string()))?;
    let agent2 = agent.clone();
    let rec = tokio::task::spawn_blocking(move || pull_blocking(&agent2.images, &r))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("pull task failed: {e}")))?
        .inspect_err(|e| tracing::warn!(error = %e.message, "pull failed"))?;
    let users = agent.image_users(&rec.id);
    Ok(Response::Image(Box::new(agent.images.info(&rec, users))))
}

/// Fetches and stores an image. Blocking.
fn pull_blocking(store: &ImageStore, r: &Reference) -> Result<ImageRecord, ApiError> {
    let t0 = Instant::now();
    let wrap = |e: PullError| {
        ApiError::new(
            e.code(),
            format!(
                "cannot pull {}: {}",
                r.name(),
                crate::start::error_chain(&e)
            ),
        )
    };
    let mut client = Client::new(r);
    let (manifest, manifest_bytes) = client.resolve_manifest(r.manifest_ref()).map_err(wrap)?;
    if manifest.layers.len() > MAX_LAYERS {
        return Err(wrap(protocol(format!(
            "the image has {} layers; at most {MAX_LAYERS} are supported",
            manifest.layers.len()
        ))));
    }
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        digest_hex(&d.digest).map_err(|e| wrap(protocol(e.message)))?;
    }
    let name = r.name();

    // Already here, whole: only the name is new. Nothing but the manifest
    // was downloaded.
    let here = store.records().into_iter().find(|rec| {
        rec.id == manifest.config.digest
            && rec.layers.len() == manifest.layers.len()
            && rec.layers.iter().all(|d| store.layer(d).is_some())
    });
    if here.is_some() {
        match store.add_names(&manifest.config.digest, std::slice::from_ref(&name)) {
            Ok(rec) => {
                tracing::info!(
                    reference = %name, image = %rec.id, manifest_bytes,
                    layers = rec.layers.len(), layers_downloaded = 0, bytes_downloaded = 0,
                    ms = t0.elapsed().as_millis() as u64, "image pulled"
                );
                return Ok(rec);
            }
            // Removed meanwhile: pull it as new.
            Err(e) if e.code == ErrorCode::NotFound => {}
            Err(e) => return Err(e),
        }
    }

    let config = client
        .small_blob(&manifest.config.digest, "the image config")
        .map_err(wrap)?;
    let mut bytes_downloaded = config.len() as u64;
    #[derive(Deserialize)]
    struct ConfigProbe {
        rootfs: RootfsProbe,
    }
    #[derive(Deserialize)]
    struct RootfsProbe {
        diff_ids: Vec<String>,
    }
    let probe: ConfigProbe = serde_json::from_slice(&config)
        .map_err(|e| wrap(protocol(format!("the image config is not valid: {e}"))))?;
    let diff_ids = probe.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        return Err(wrap(protocol(format!(
            "the manifest lists {} layers but the config {} diff ids",
            manifest.layers.len(),
            diff_ids.len()
        ))));
    }

    // Layers whose diff id is stored are not downloaded again; a blob
    // listed twice is downloaded once.
    let mut wanted: Vec<(String, u64)> = Vec::new();
    for (d, blob) in diff_ids.iter().zip(&manifest.layers) {
        if store.layer(d).is_none() && !wanted.iter().any(|(w, _)| *w == blob.digest) {
            wanted.push((blob.digest.clone(), blob.size));
        }
    }
    let files = Downloads::default();
    let next = AtomicUsize::new(0);
    // The first blob that fails for good (not the network's or a busy
    // registry's failure) stops the others: the pull has failed, and the
    // rest would only spend the network and the disk before saying so.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let tmp = store.tmp_dir();
    let results: Vec<Result<(), PullError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..PARALLEL.min(wanted.len()))
            .map(|_| {
                let mut c = client.clone();
                let (wanted, files, next, tmp, stop) = (&wanted, &files, &next, &tmp, &stop);
                s.spawn(move || -> Result<(), PullError> {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((digest, size)) = wanted.get(i) else {
                            return Ok(());
                        };
                        match c.blob_to_file(tmp, digest, *size, store.max_upload, stop) {
                            Ok((path, n)) => files.add(digest, path, n),
                            Err(e) => {
                                // A network failure or a busy registry
                                // leaves the others to finish their
                                // downloads, kept for the next pull to
                                // resume; any other failure is final.
                                if e.code() != ErrorCode::Unavailable {
                                    stop.store(true, Ordering::Relaxed);
                                }
                                return Err(e);
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(protocol("a download thread panicked")))
            })
            .collect()
    });
    // The failure that stopped the others, not theirs.
    let mut errors: Vec<PullError> = results.into_iter().filter_map(Result::err).collect();
    if let Some(i) = errors.iter().position(|e| !matches!(e, PullError::Stopped)) {
        return Err(wrap(errors.swap_remove(i)));
    }
    if let Some(e) = errors.pop() {
        return Err(wrap(e));
    }
    let got = files.paths();
    bytes_downloaded += files.bytes();

    let sources = diff_ids
        .iter()
        .zip(&manifest.layers)
        .map(|(_, blob)| match got.get(&blob.digest) {
            Some(p) => {
                let p = p.clone();
                LayerSource {
                    open: Box::new(move || Ok(Box::new(File::open(&p)?) as Box<dyn Read>)),
                    blob_digest: Some(blob.digest.clone()),
                }
            }
            None => LayerSource {
                open: Box::new(|| {
                    Err(io::Error::other(
                        "the stored layer was deleted while the pull ran: pull again",
                    ))
                }),
                blob_digest: None,
            },
        })
        .collect();
    let rec = store.store_image(&config, vec![name.clone()], sources)?;
    tracing::info!(
        reference = %name, image = %rec.id, manifest_bytes, layers = diff_ids.len(),
        layers_downloaded = wanted.len(), bytes_downloaded,
        ms = t0.elapsed().as_millis() as u64, "image pulled"
    );
    Ok(rec)
}

/// The verified blobs one pull downloaded, deleted when it ends.
#[derive(Debug, Default)]
struct Downloads(Mutex<Vec<(String, PathBuf, u64)>>);

impl Downloads {
    fn add(&self, digest: &str, path: PathBuf, n: u64) {
        self.0
            .lock()
            .expect("downloads")
            .push((digest.to_string(), path, n));
    }

    fn paths(&self) -> HashMap<String, PathBuf> {
        let v = self.0.lock().expect("downloads");
        v.iter().map(|(d, p, _)| (d.clone(), p.clone())).collect()
    }

    fn bytes(&self) -> u64 {
        self.0.lock().expect("downloads").iter().map(|x| x.2).sum()
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        for (_, p, _) in self.0.get_mut().expect("downloads").drain(..) {
            let _ = fs::remove_file(p);
        }
    }
}

/// A `Bearer` challenge from `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The token endpoint.
    pub realm: String,
    /// `service=`, passed back.
    pub service: Option<String>,
    /// `scope=`, passed back.
    pub scope: Option<String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (quoted or not; a
/// quoted value may hold commas, and `\` escapes).
pub fn parse_bearer(h: &str) -> Option<Challenge> {
    let h = h.trim_start();
    let (scheme, mut rest) = h.split_at(h.find(' ').unwrap_or(h.len()));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params: HashMap<String, String> = HashMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',', '\t']);
        if rest.is_empty() {
            break;
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value = if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut it = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = it.next() {
                match c {
                    '\\' => v.extend(it.next().map(|x| x.1)),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            rest = &q[end?..];
            v
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            let v = rest[..end].trim().to_string();
            rest = &rest[end..];
            v
        };
        params.insert(key, value);
    }
    Some(Challenge {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One lock per blob digest, so two pulls never write the same partial
/// file at once.
fn blob_lock(digest: &str) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut m = LOCKS
        .get_or_init(Default::default)
        .lock()
        .expect("blob locks");
    m.retain(|_, l| Arc::strong_count(l) > 1);
    m.entry(digest.to_string()).or_default().clone()
}

/// The registry API for one repository.
#[derive(Clone)]
struct Client {
    agent: ureq::Agent,
    base: String,
    repo: String,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("repo", &self.repo)
            .finish()
    }
}

type HttpResponse = ureq::http::Response<ureq::Body>;

fn body_budget(size: u64) -> Duration {
    BODY_TIMEOUT + Duration::from_secs(size / MIN_RATE)
}

impl Client {
    fn new(r: &Reference) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // Statuses are answers to read (401 carries the challenge).
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(RESPONSE_TIMEOUT))
            .max_redirects(5)
            .user_agent(concat!("vmlet/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client {
            agent,
            base: r.base.clone(),
            repo: r.repo.clone(),
            token: None,
        }
    }

    fn send(
        &self,
        url: &str,
        headers: &[(&str, String)],
        budget: Duration,
        auth: bool,
    ) -> Result<HttpResponse, PullError> {
        let mut req = self.agent.get(url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let (true, Some(t)) = (auth, &self.token) {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        req.config()
            .timeout_recv_body(Some(budget))
            .build()
            .call()
            .map_err(|e| PullError::Http {
                url: url.to_string(),
                source: Box::new(e),
            })
    }

    /// GETs `path` under the API; a 401 with a Bearer challenge fetches
    /// an anonymous token and asks once more.
    fn get(
        &mut self,
        path: &str,
        headers: &[(&str, String)],
        budget: Duration,
    ) -> Result<(String, HttpResponse), PullError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repo);
        let resp = self.send(&url, headers, budget, true)?;
        if resp.status().as_u16() != 401 {
            return Ok((url, resp));
        }
        let challenge = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_bearer);
        let Some(ch) = challenge else {
            return Err(status_error(&url, resp));
        };
        self.token = Some(self.fetch_token(&ch)?);
        let resp = self.send(&url, headers, budget, true)?;
        Ok((url, resp))
    }

    /// Asks the challenge's realm for an anonymous pull token.
    fn fetch_token(&self, ch: &Challenge) -> Result<String, PullError> {
        if !(ch.realm.starts_with("https://") || ch.realm.starts_with("http://")) {
            return Err(protocol(format!(
                "the registry's token realm {:?} is not an http(s) URL",
                ch.realm
            )));
        }
        let scope = ch
            .scope
            .clone()
            .unwrap_or_else(|| format!("repository:{}:pull", self.repo));
        let mut url = ch.realm.clone();
        url.push(if url.contains('?') { '&' } else { '?' });
        if let Some(s) = &ch.service {
            url.push_str(&format!("service={}&", encode(s)));
        }
        url.push_str(&format!("scope={}", encode(&scope)));
        let resp = self.send(&url, &[], BODY_TIMEOUT, false)?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp));
        }
        let body = read_limited(resp, MAX_TOKEN, "the token response", &url)?;
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| protocol(format!("the token response is not valid: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| protocol("the token response holds no usable token"))
    }

    /// Fetches a manifest, verified when asked for by digest (and against
    /// `Docker-Content-Digest` when the registry sends one). Returns its
    /// bytes and media type.
    fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, String), PullError> {
        let (url, resp) = self.get(
            &format!("manifests/{reference}"),
            &[("Accept", MANIFEST_TYPES.to_string())],
            body_budget(MAX_JSON),
        )?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp));
        }
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type").unwrap_or_default();
        let claimed = header("docker-content-digest");
        let body = read_limited(resp, MAX_JSON, "the manifest", &url)?;
        let actual = format!("sha256:{}", hex(&Sha256::digest(&body)));
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            claimed.filter(|c| c.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != actual {
                return Err(PullError::Digest { expected, actual });
            }
        }
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType", default)]
            media_type: String,
            #[serde(rename = "schemaVersion", default)]
            schema_version: u32,
            #[serde(default)]
            manifests: Option<serde_json::Value>,
        }
        let p: Probe = serde_json::from_slice(&body)
            .map_err(|e| protocol(format!("the manifest is not valid JSON: {e}")))?;
        if p.schema_version == 1 {
            return Err(protocol(
                "the registry sent a schema 1 manifest, which is not supported",
            ));
        }
        let mt = if !p.media_type.is_empty() {
            p.media_type
        } else if p.manifests.is_some() {
            "application/vnd.oci.image.index.v1+json".to_string()
        } else {
            content_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        Ok((body, mt))
    }

    /// Follows indexes / manifest lists to the linux/amd64 image manifest.
    /// Returns it and the manifest bytes downloaded.
    fn resolve_manifest(&mut self, reference: &str) -> Result<(Manifest, u64), PullError> {
        let mut reference = reference.to_string();
        let mut total = 0u64;
        for _ in 0..MAX_NESTING {
            let (body, mt) = self.manifest(&reference)?;
            total += body.len() as u64;
            if !archive::is_index(&mt) {
                let m: Manifest = serde_json::from_slice(&body)
                    .map_err(|e| protocol(format!("the image manifest is not valid: {e}")))?;
                return Ok((m, total));
            }
            #[derive(Deserialize)]
            struct Index {
                manifests: Vec<Entry>,
            }
            #[derive(Deserialize)]
            struct Entry {
                digest: String,
                #[serde(default)]
                platform: Option<Platform>,
            }
            let idx: Index = serde_json::from_slice(&body)
                .map_err(|e| protocol(format!("the image index is not valid: {e}")))?;
            let exact = idx.manifests.iter().find(
                |e| matches!(&e.platform, Some(p) if p.os == "linux" && p.architecture == "amd64"),
            );
            let any = || idx.manifests.iter().find(|e| e.platform.is_none());
            let pick = exact.or_else(any).ok_or_else(|| {
                let have: Vec<String> = idx
                    .manifests
                    .iter()
                    .filter_map(|e| e.platform.as_ref())
                    .map(|p| format!("{}/{}", p.os, p.architecture))
                    .collect();
                protocol(format!(
                    "the image has no linux/amd64 manifest (it has {})",
                    have.join(", ")
                ))
            })?;
            digest_hex(&pick.digest).map_err(|e| protocol(e.message))?;
            tracing::debug!(index = %reference, manifest = %pick.digest, "picked linux/amd64");
            reference = pick.digest.clone();
        }
        Err(protocol("image indexes nest too deeply"))
    }

    /// A small blob (the config) into memory, verified.
    fn small_blob(&mut self, digest: &str, what: &str) -> Result<Vec<u8>, PullError> {
        let (url, resp) = self.get(&format!("blobs/{digest}"), &[], body_budget(MAX_JSON))?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp));
        }
        let body = read_limited(resp, MAX_JSON, what, &url)?;
        let actual = format!("sha256:{}", hex(&Sha256::digest(&body)));
        if actual != digest {
            return Err(PullError::Digest {
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(body)
    }

    /// Downloads a blob into `tmp/`, resuming a partial one, verifying
    /// its digest as it streams. Returns a file only this pull uses and
    /// the bytes that came over the network.
    fn blob_to_file(
        &mut self,
        tmp: &Path,
        digest: &str,
        size: u64,
        cap: u64,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<(PathBuf, u64), PullError> {
        let hexd = digest_hex(digest)
            .map_err(|e| protocol(e.message))?
            .to_string();
        if size > cap {
            return Err(PullError::TooLarge {
                what: format!("blob {digest}"),
                limit: cap,
            });
        }
        // The manifest's size is the limit; without one, the cap.
        let limit = if size > 0 { size } else { cap };
        let lock = blob_lock(digest);
        let _held = lock.lock().expect("blob lock");
        let partial = tmp.join(format!("blob-{hexd}.partial"));
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(io_err(&partial))?;
        let mut have = f.metadata().map_err(io_err(&partial))?.len();
        let mut hasher = Sha256::new();
        if have > limit {
            have = 0;
        }
        if have > 0 {
            let mut r = (&mut f).take(have);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = r.read(&mut buf).map_err(io_err(&partial))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        let mut downloaded = 0u64;
        // A partial holding the whole blob needs no request.
        if !(size > 0 && have == size) {
            let mut headers = Vec::new();
            if have > 0 {
                headers.push(("Range", format!("bytes={have}-")));
            }
            let (url, resp) = self.get(
                &format!("blobs/{digest}"),
                &headers,
                body_budget(limit - have),
            )?;
            let status = resp.status().as_u16();
            let resumed = status == 206 && have > 0 && {
                let cr = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                cr.strip_prefix("bytes ")
                    .and_then(|r| r.split_once('-'))
                    .is_some_and(|(start, _)| start.trim() == have.to_string())
            };
            match status {
                _ if resumed => {
                    tracing::debug!(blob = %digest, from = have, "resuming a partial download");
                }
                200 => {
                    if have > 0 {
                        tracing::debug!(blob = %digest, "the registry ignored Range: starting over");
                    }
                    have = 0;
                    hasher = Sha256::new();
                    f.set_len(0).map_err(io_err(&partial))?;
                }
                206 => {
                    let _ = fs::remove_file(&partial);
                    return Err(protocol(format!(
                        "{url} answered a range other than bytes={have}-"
                    )));
                }
                _ => {
                    // 416 and the like: the partial is of no use.
                    if status == 416 {
                        let _ = fs::remove_file(&partial);
                    }
                    return Err(status_error(&url, resp));
                }
            }
            f.seek(SeekFrom::Start(have)).map_err(io_err(&partial))?;
            let mut body = resp.into_body().into_reader().take(limit - have + 1);
            let mut buf = vec![0u8; 256 << 10];
            loop {
                // A network error keeps the partial for the next pull.
                let n = body.read(&mut buf).map_err(|e| PullError::Http {
                    url: url.clone(),
                    source: Box::new(ureq::Error::Io(e)),
                })?;
                if n == 0 {
                    break;
                }
                // The pull has failed for another reason than the network:
                // nothing of it is kept.
                if stop.load(Ordering::Relaxed) {
                    drop(f);
                    let _ = fs::remove_file(&partial);
                    return Err(PullError::Stopped);
                }
                if have + downloaded + n as u64 > limit {
                    drop(f);
                    let _ = fs::remove_file(&partial);
                    return Err(PullError::TooLarge {
                        what: format!("blob {digest}"),
                        limit,
                    });
                }
                hasher.update(&buf[..n]);
                if let Err(e) = f.write_all(&buf[..n]) {
                    // The disk is full or failing: a partial kept would
                    // hold its space until the agent restarts.
                    drop(f);
                    let _ = fs::remove_file(&partial);
                    return Err(io_err(&partial)(e));
                }
                downloaded += n as u64;
            }
        }
        drop(f);
        let total = have + downloaded;
        let actual = format!("sha256:{}", hex(&hasher.finalize()));
        if actual != digest || (size > 0 && total != size) {
            let _ = fs::remove_file(&partial);
            if actual != digest {
                return Err(PullError::Digest {
                    expected: digest.to_string(),
                    actual,
                });
            }
            return Err(protocol(format!(
                "blob {digest} is {total} bytes, the manifest says {size}"
            )));
        }
        let done = tmp.join(format!("blob-{hexd}-{}", ids::new_id()));
        fs::rename(&partial, &done).map_err(io_err(&done))?;
        tracing::debug!(blob = %digest, bytes = downloaded, resumed_from = have, "blob downloaded");
        Ok((done, downloaded))
    }
}

/// Reads a body into memory, refusing more than `limit` bytes.
fn read_limited(
    resp: HttpResponse,
    limit: u64,
    what: &str,
    url: &str,
) -> Result<Vec<u8>, PullError> {
    let too_large = || PullError::TooLarge {
        what: what.to_string(),
        limit,
    };
    if resp.body().content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    resp.into_body()
        .into_with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => too_large(),
            e => PullError::Http {
                url: url.to_string(),
                source: Box::new(e),
            },
        })
}

/// An error status, with the start of the registry's explanation.
fn status_error(url: &str, resp: HttpResponse) -> PullError {
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .into_with_config()
        .limit(MAX_ERROR_BODY)
        .lossy_utf8(true)
        .read_to_string()
        .unwrap_or_default();
    let body: String = body
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect();
    PullError::Status {
        url: url.to_string(),
        status,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn references_parse() {
        let x = r("http://127.0.0.1:5000/test/img:v1");
        assert_eq!(x.base, "http://127.0.0.1:5000");
        assert_eq!(x.repo, "test/img");
        assert_eq!(x.manifest_ref(), "v1");
        assert_eq!(x.name(), "127.0.0.1:5000/test/img:v1");

        let x = r("registry.example.com/a/b/c");
        assert_eq!(x.base, "https://registry.example.com");
        assert_eq!(x.manifest_ref(), "latest");
        assert_eq!(x.name(), "registry.example.com/a/b/c:latest");

        let d = format!("sha256:{}", "a".repeat(64));
        let x = r(&format!("localhost/x@{d}"));
        assert_eq!(x.manifest_ref(), d);
        assert_eq!(x.name(), format!("localhost/x@{d}"));
        let x = r(&format!("localhost:5000/x:t@{d}"));
        assert_eq!(x.manifest_ref(), d, "the digest wins over the tag");
        assert_eq!(x.name(), "localhost:5000/x:t");

        let x = r("busybox");
        assert_eq!(x.base, "https://registry-1.docker.io");
        assert_eq!(x.repo, "library/busybox");
        assert_eq!(x.name(), "docker.io/library/busybox:latest");

        for bad in [
            "",
            "ftp://h/x",
            "http://h:5000/",
            "h.com/UPPER",
            "h.com/x:bad/tag",
            "h.com/x/../y",
            "h.com/x@sha256:abc",
            "h.com/x:",
            "h.com//x",
            "h\u{0}.com/x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// A registry on loopback that answers each request (one per
    /// connection) with `route(path, headers)`; it records what it saw.
    struct Fake {
        base: String,
        seen: Arc<Mutex<Vec<String>>>,
    }

    type Route = dyn Fn(&str, &str, &str) -> (u16, Vec<(String, String)>, Vec<u8>) + Send + Sync;

    impl Fake {
        fn start(route: Arc<Route>) -> Fake {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", l.local_addr().unwrap());
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (seen2, base2) = (seen.clone(), base.clone());
            std::thread::spawn(move || {
                for c in l.incoming() {
                    let Ok(mut c) = c else { return };
                    let mut req = Vec::new();
                    let mut b = [0u8; 1];
                    while !req.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                        req.push(b[0]);
                    }
                    let req = String::from_utf8_lossy(&req).to_string();
                    let path = req.split(' ').nth(1).unwrap_or_default().to_string();
                    let header = |n: &str| {
                        req.lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case(n).then(|| v.trim().to_string())
                            })
                            .unwrap_or_default()
                    };
                    let (auth, range) = (header("authorization"), header("range"));
                    seen2
                        .lock()
                        .unwrap()
                        .push(format!("{path} auth={auth} range={range}"));
                    let (status, headers, body) = route(&path, &auth, &range);
                    let mut out = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                        body.len()
                    );
                    for (k, v) in headers {
                        out.push_str(&format!("{k}: {}\r\n", v.replace("{base}", &base2)));
                    }
                    out.push_str("\r\n");
                    let _ = c.write_all(out.as_bytes());
                    let _ = c.write_all(&body);
                }
            });
            Fake { base, seen }
        }

        fn client(&self) -> Client {
            let host = self.base.strip_prefix("http://").unwrap();
            Client::new(&r(&format!("http://{host}/x/y:t")))
        }
    }

    fn digest(b: &[u8]) -> String {
        format!("sha256:{}", hex(&Sha256::digest(b)))
    }

    #[test]
    fn bearer_token_then_index_to_amd64_then_blobs() {
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let bd = digest(&blob);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"digest": bd, "size": blob.len()},
            "layers": [{"digest": bd, "size": blob.len()}],
        }))
        .unwrap();
        let md = digest(&manifest);
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests": [
                {"digest": format!("sha256:{}", "0".repeat(64)), "platform": {"architecture": "arm64", "os": "linux"}},
                {"digest": md, "platform": {"architecture": "amd64", "os": "linux"}},
            ],
        }))
        .unwrap();
        let (blob2, bd2, md2) = (blob.clone(), bd.clone(), md.clone());
        let fake = Fake::start(Arc::new(move |path: &str, auth: &str, _range: &str| {
            if path.starts_with("/token?") {
                assert_eq!(
                    path,
                    "/token?service=reg%20svc&scope=repository%3Ax%2Fy%3Apull"
                );
                return (200, vec![], br#"{"token":"t0k"}"#.to_vec());
            }
            if auth != "Bearer t0k" {
                let ch =
                    r#"Bearer realm="{base}/token",service="reg svc",scope="repository:x/y:pull""#;
                return (401, vec![("WWW-Authenticate".into(), ch.into())], vec![]);
            }
            if path == "/v2/x/y/manifests/t" {
                (200, vec![], index.clone())
            } else if path == format!("/v2/x/y/manifests/{md2}") {
                (
                    200,
                    vec![("Docker-Content-Digest".into(), md2.clone())],
                    manifest.clone(),
                )
            } else if path == format!("/v2/x/y/blobs/{bd2}") {
                // Range is ignored: a 200 makes the client start over.
                (200, vec![], blob2.clone())
            } else {
                (404, vec![], b"{\"errors\":[]}".to_vec())
            }
        }));
        let mut c = fake.client();
        let (m, n) = c.resolve_manifest("t").unwrap();
        assert!(n > 0);
        assert_eq!(m.layers[0].digest, bd);
        assert_eq!(c.small_blob(&bd, "config").unwrap(), blob);

        let tmp = tempfile::tempdir().unwrap();
        // A stale partial whose bytes are wrong: the 200 replaces it.
        std::fs::write(
            tmp.path().join(format!("blob-{}.partial", &bd[7..])),
            b"junk",
        )
        .unwrap();
        let (p, got) = c
            .blob_to_file(
                tmp.path(),
                &bd,
                blob.len() as u64,
                1 << 30,
                &Default::default(),
            )
            .unwrap();
        assert_eq!(got, blob.len() as u64);
        assert_eq!(std::fs::read(&p).unwrap(), blob);
        let seen = fake.seen.lock().unwrap().clone();
        assert!(
            seen[0].contains("auth= "),
            "first ask is anonymous: {seen:?}"
        );
        assert!(
            seen.iter().any(|s| s.contains("range=bytes=4-")),
            "{seen:?}"
        );

        // More bytes than the manifest says: refused, partial deleted.
        std::fs::remove_file(&p).unwrap();
        let e = c
            .blob_to_file(tmp.path(), &bd, 1000, 1 << 30, &Default::default())
            .unwrap_err();
        assert!(matches!(e, PullError::TooLarge { .. }), "{e}");
        let e = c.manifest("nosuch").unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    /// A blob whose write fails (a full disk: a 64 KiB tmpfs here) leaves
    /// no partial behind to hold the space, nor does one stopped because
    /// another blob of the pull failed.
    #[test]
    fn a_failed_write_or_a_stop_leaves_no_partial() {
        let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 249) as u8).collect();
        let bd = digest(&blob);
        let (b2, bd2) = (blob.clone(), bd.clone());
        let fake = Fake::start(Arc::new(move |path: &str, _: &str, _: &str| {
            if path == format!("/v2/x/y/blobs/{bd2}") {
                (200, vec![], b2.clone())
            } else {
                (404, vec![], vec![])
            }
        }));
        let mut c = fake.client();
        let size = blob.len() as u64;
        let small = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "vmlet-unit-full"])
            .arg(small.path())
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting a tmpfs needs root");
        let e = c.blob_to_file(small.path(), &bd, size, 1 << 30, &Default::default());
        let left = std::fs::read_dir(small.path()).unwrap().count();
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(small.path())
            .status();
        let e = e.unwrap_err();
        assert!(matches!(e, PullError::Io { .. }), "{e:?}");
        assert_eq!(left, 0, "the partial was kept");

        let tmp = tempfile::tempdir().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(true);
        let e = c
            .blob_to_file(tmp.path(), &bd, size, 1 << 30, &stop)
            .unwrap_err();
        assert!(matches!(e, PullError::Stopped), "{e}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn bearer_challenges_parse() {
        let c = parse_bearer(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.docker.io/token");
        assert_eq!(c.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(
            c.scope.as_deref(),
            Some("repository:library/busybox:pull,push")
        );
        let c = parse_bearer(r#"bearer realm=http://h/t, service="a\"b""#).unwrap();
        assert_eq!(c.realm, "http://h/t");
        assert_eq!(c.service.as_deref(), Some("a\"b"));
        assert!(parse_bearer(r#"Basic realm="x""#).is_none());
        assert!(parse_bearer(r#"Bearer service="x""#).is_none());
        assert!(parse_bearer(r#"Bearer realm="unterminated"#).is_none());
        assert_eq!(encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }
}
