//! The API server: one task per connection reading requests, one writer
//! task per connection, one task per request in flight.
//!
//! A malformed payload gets an error reply and the connection goes on; a
//! broken frame header (bad magic, unknown framing version, a length over
//! the limit) gets an error reply and the connection is closed, because the
//! byte stream can no longer be trusted to be in step. Neither affects any
//! other connection.
//!
//! A connection holds one of [`MAX_CONNECTIONS`] slots, so none may hold it
//! for nothing: one that says no hello within `HELLO_TIMEOUT`, or that
//! sits idle (no request in flight, no stream, no frame received) for the
//! configured idle timeout, is sent a `TimedOut` error and closed. A
//! connection with a request or stream in progress (a `wait`, `logs -f`,
//! an attach, `events`) is never idle, however long it is quiet.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;
use vmlet_protocol::aio::{read_frame, write_frame};
use vmlet_protocol::api::{
    negotiate, AttachSpec, ClientMessage, Request, RequestId, Response, ServerMessage, VersionInfo,
    VmState, API_VERSION, MIN_API_VERSION,
};
use vmlet_protocol::frame::{FrameError, MAX_CHUNK, MAX_FRAME_LEN};
use vmlet_protocol::guest::HostMessage;
use vmlet_protocol::{ApiError, ErrorCode};

use crate::agent::Agent;
use crate::logstore::Item;
use crate::vm::Vm;

/// Replies waiting for a slow client before its streams pause.
const REPLY_QUEUE: usize = 256;
/// Time a new connection has to say hello (or the idle timeout, if that
/// is shorter).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing an idle connection waits for its last replies to be
/// written: a client that reads nothing must not keep the slot.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Requests in flight on one connection.
const MAX_IN_FLIGHT: usize = 1024;
/// Client connections served at once. Each holds a descriptor, a task and
/// its reply queue; past this a newcomer is told to retry later and
/// closed, so a flood of connections cannot take the descriptors the VMs
/// need, and never leaves a client hanging in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long the agent backs off when accepting fails (out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Binds the API socket: removes a stale socket file (after checking
/// nobody answers on it) and sets its mode.
pub async fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another agent is serving {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Serves connections. Never returns: a failed accept (out of file
/// descriptors, a client gone before it was accepted) is logged and
/// retried, since ending here would end the agent.
pub async fn serve(agent: Arc<Agent>, listener: UnixListener) -> std::io::Result<()> {
    let refusals = crate::ratelimit::RateLimit::new(10, Duration::from_secs(1));
    let accept_errors = crate::ratelimit::RateLimit::new(1, Duration::from_secs(5));
    let busy = crate::ratelimit::RateLimit::new(1, Duration::from_secs(5));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(suppressed) = accept_errors.admit() {
                    tracing::warn!(error = %e, suppressed, "cannot accept a client connection; retrying");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Access is decided by the peer's kernel-verified credentials.
        let cred = stream.peer_cred();
        let allowed = cred
            .as_ref()
            .map(|c| agent.config.admits(c.uid(), c.gid()))
            .unwrap_or(false);
        if !allowed {
            if let Some(suppressed) = refusals.admit() {
                tracing::warn!(
                    uid = cred.as_ref().map(|c| c.uid()).ok(),
                    gid = cred.as_ref().map(|c| c.gid()).ok(),
                    pid = cred.as_ref().ok().and_then(|c| c.pid()),
                    suppressed,
                    "refused a connection from a user not allowed to use the API"
                );
            }
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(suppressed) = busy.admit() {
                tracing::warn!(
                    suppressed,
                    "refused a connection: {MAX_CONNECTIONS} connections are open"
                );
            }
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(agent, stream).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
}

/// Tells a client over the connection limit why it is turned away (an
/// error before its hello, which every client reads as the answer to it),
/// then closes. Bounded in time: a client that does not read is dropped.
///
/// # Cancel safety
///
/// Not meant to be cancelled; it runs as its own task.
async fn refuse_busy(mut stream: UnixStream) {
    let m = ServerMessage {
        id: 0,
        body: error_body(ApiError::new(
            ErrorCode::Unavailable,
            format!("vmletd already serves {MAX_CONNECTIONS} connections; try again later"),
        )),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if write_frame(&mut stream, &m).await.is_ok() {
            // Take the client's hello before closing: closing on unread
            // bytes would reset the connection under its read of the error.
            let mut b = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut b).await;
        }
    })
    .await;
}

type Tx = mpsc::Sender<ServerMessage>;

async fn reply(tx: &Tx, id: RequestId, body: Response) {
    let _ = tx.send(ServerMessage { id, body }).await;
}

fn error_body(e: ApiError) -> Response {
    Response::Error(e)
}

/// A connection's work in progress: requests being served and streams
/// running. The read loop's idle clock runs only while there is none.
#[derive(Debug)]
struct Activity {
    busy: AtomicUsize,
    /// When the count last fell to zero.
    idle_at: parking_lot::Mutex<Instant>,
    /// Woken when the count falls to zero.
    idle: Notify,
}

/// One piece of work in progress; dropping it (the task ended or was
/// aborted) ends it.
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            busy: AtomicUsize::new(0),
            idle_at: parking_lot::Mutex::new(Instant::now()),
            idle: Notify::new(),
        })
    }

    fn start(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    fn is_idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_at.lock() = Instant::now();
            self.0.idle.notify_one();
        }
    }
}

/// The next frame from the client, or `None` once the connection has been
/// idle for `idle_timeout`: no work in `activity` and no frame since
/// `last_frame`.
///
/// # Cancel safety
///
/// Not cancel safe: a frame partly read is lost. The read loop never
/// cancels it; it ends the connection when this returns.
async fn next_frame<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    activity: &Activity,
    last_frame: Instant,
    idle_timeout: Duration,
) -> Option<Result<Option<ClientMessage>, FrameError>> {
    let read = read_frame::<_, ClientMessage>(rd, MAX_FRAME_LEN);
    tokio::pin!(read);
    loop {
        if activity.is_idle() {
            let since = last_frame.max(*activity.idle_at.lock());
            tokio::select! {
                r = &mut read => return Some(r),
                // Work only starts when a frame arrives, so the
                // connection is still idle when this fires.
                _ = sleep_until(since.checked_add(idle_timeout)) => return None,
            }
        } else {
            tokio::select! {
                r = &mut read => return Some(r),
                _ = activity.idle.notified() => {}
            }
        }
    }
}

/// Sleeps until `t`; forever if there is no such time (an idle timeout too
/// large to add, which is how "never" is configured).
async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Serves one client connection.
async fn connection(agent: Arc<Agent>, stream: UnixStream) -> Result<(), FrameError> {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<ServerMessage>(REPLY_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            match write_frame(&mut wr, &m).await {
                Ok(()) => {}
                // Too large to frame: nothing was written, so the
                // connection goes on and the request is told why.
                Err(FrameError::TooLarge { max, .. }) => {
                    let e = ServerMessage {
                        id: m.id,
                        body: error_body(ApiError::new(
                            ErrorCode::Internal,
                            format!(
                                "the reply is over the API's frame limit of {max} bytes; \
                                 ask for less (one VM or image rather than all)"
                            ),
                        )),
                    };
                    if write_frame(&mut wr, &e).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });

    // Version negotiation comes first, within a bounded time.
    let idle_timeout = agent.config.idle_timeout;
    let hello_timeout = HELLO_TIMEOUT.min(idle_timeout);
    let hello = tokio::time::timeout(
        hello_timeout,
        read_frame::<_, ClientMessage>(&mut rd, MAX_FRAME_LEN),
    )
    .await;
    // The API version the connection speaks, once negotiated.
    let version = match hello {
        Ok(Ok(Some(ClientMessage {
            id,
            body:
                Request::Hello {
                    min_version,
                    max_version,
                    client,
                },
        }))) => match negotiate(min_version, max_version) {
            Some(version) => {
                tracing::debug!(client = %client, version, "client connected");
                reply(
                    &tx,
                    id,
                    Response::Hello {
                        version,
                        agent: format!("vmletd {}", env!("CARGO_PKG_VERSION")),
                    },
                )
                .await;
                Some(version)
            }
            None => {
                reply(
                    &tx,
                    id,
                    error_body(ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "no common API version: the client speaks {min_version}..={max_version}, this agent {MIN_API_VERSION}..={API_VERSION}"
                        ),
                    )),
                )
                .await;
                None
            }
        },
        Ok(Ok(Some(m))) => {
            reply(
                &tx,
                m.id,
                error_body(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "the first request on a connection must be Hello",
                )),
            )
            .await;
            None
        }
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            reply(&tx, 0, error_body(frame_error(&e))).await;
            None
        }
        Err(_) => {
            reply(
                &tx,
                0,
                error_body(ApiError::new(
                    ErrorCode::TimedOut,
                    format!(
                        "no Hello within {}; closing the connection",
                        secs(hello_timeout)
                    ),
                )),
            )
            .await;
            None
        }
    };
    let Some(version) = version else {
        drop(tx);
        let _ = writer.await;
        return Ok(());
    };

    let mut uploads: HashMap<u64, Upload> = HashMap::new();
    let mut streams: HashMap<RequestId, AbortHandle> = HashMap::new();
    let mut attached: HashMap<RequestId, Arc<Vm>> = HashMap::new();
    let mut waits: Vec<AbortHandle> = Vec::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let activity = Activity::new();
    let mut last_frame = Instant::now();
    let mut timed_out = false;
    let result = loop {
        let Some(frame) = next_frame(&mut rd, &activity, last_frame, idle_timeout).await else {
            tracing::debug!("closing an idle connection");
            // Nothing is in flight, so the queue has room unless the
            // client stopped reading its replies; then it gets none.
            let _ = tx.try_send(ServerMessage {
                id: 0,
                body: error_body(ApiError::new(
                    ErrorCode::TimedOut,
                    format!(
                        "the connection was idle for {} (no request in flight, no stream); \
                         closing it: connect again to go on",
                        secs(idle_timeout)
                    ),
                )),
            });
            timed_out = true;
            break Ok(());
        };
        last_frame = Instant::now();
        let msg = match frame {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) if e.stream_usable() => {
                reply(&tx, 0, error_body(frame_error(&e))).await;
                continue;
            }
            Err(e) => {
                reply(&tx, 0, error_body(frame_error(&e))).await;
                break Err(e);
            }
        };
        streams.retain(|_, h| !h.is_finished());
        // An attach's stdin goes with its stream: once the stream has ended
        // (its end is already on its way to the client), stdin for it is
        // refused like stdin for any unknown attach.
        attached.retain(|id, _| streams.contains_key(id));
        let ClientMessage { id, body } = msg;
        match body {
            // Stdin is handled in the read loop so its chunks keep their
            // order; a full guest queue slows this client's reads.
            Request::Stdin { attach, data } => {
                if data.len() > MAX_CHUNK {
                    reply(
                        &tx,
                        attach,
                        error_body(ApiError::new(
                            ErrorCode::InvalidArgument,
                            format!("stdin chunks are at most {MAX_CHUNK} bytes"),
                        )),
                    )
                    .await;
                    continue;
                }
                match attached.get(&attach).cloned() {
                    Some(vm) => {
                        // Stdin that comes after the container exited goes
                        // nowhere; the attach ends with its exit. No error
                        // on the stream, for this chunk or any later one
                        // (the entry goes with the stream, above): it
                        // could reach the client before that end and hide
                        // the exit code.
                        let _ = to_guest(&vm, HostMessage::Stdin(data)).await;
                    }
                    None => {
                        reply(&tx, attach, error_body(no_stdin(attach))).await;
                    }
                }
            }
            // Uploads too: their chunks must be written in order.
            Request::ImageImportBegin { name } => {
                let r = begin_upload(&agent, &uploads, id, name);
                match r {
                    Ok(u) => {
                        uploads.insert(id, u);
                        reply(&tx, id, Response::Upload { upload: id }).await;
                    }
                    Err(e) => reply(&tx, id, error_body(e)).await,
                }
            }
            Request::ImageImportData { upload, data } => match uploads.get_mut(&upload) {
                Some(u) => u.write(data, agent.images.max_upload).await,
                None => reply(&tx, upload, error_body(no_upload(upload))).await,
            },
            Request::ImageImportEnd { upload } => match uploads.remove(&upload) {
                Some(u) => {
                    let agent = agent.clone();
                    let tx = tx.clone();
                    let busy = activity.start();
                    tokio::spawn(async move {
                        let r = finish_upload(&agent, u).await;
                        reply(&tx, id, r.unwrap_or_else(error_body)).await;
                        drop(busy);
                    });
                }
                None => reply(&tx, id, error_body(no_upload(upload))).await,
            },
            Request::CloseStdin { attach } => match attached.remove(&attach) {
                Some(vm) => {
                    // As for stdin: after the exit there is nothing to close.
                    let _ = to_guest(&vm, HostMessage::CloseStdin).await;
                }
                None => reply(&tx, attach, error_body(no_stdin(attach))).await,
            },
            Request::Cancel { request } => match streams.remove(&request) {
                Some(h) => {
                    h.abort();
                    attached.remove(&request);
                    reply(&tx, request, Response::StreamEnd { exit: None }).await;
                }
                // Answered on the id it names, as the stream would have
                // been; a stream that just ended had its end sent first.
                None => {
                    let e = ApiError::new(
                        ErrorCode::NotFound,
                        format!("request {request} is not a stream on this connection"),
                    );
                    reply(&tx, request, error_body(e)).await;
                }
            },
            Request::Hello { .. } => {
                reply(
                    &tx,
                    id,
                    error_body(ApiError::new(
                        ErrorCode::Conflict,
                        "the version was already negotiated",
                    )),
                )
                .await;
            }
            body => {
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    reply(
                        &tx,
                        id,
                        error_body(ApiError::new(
                            ErrorCode::Unavailable,
                            format!(
                                "more than {MAX_IN_FLIGHT} requests in flight on this connection"
                            ),
                        )),
                    )
                    .await;
                    continue;
                };
                if let Request::Attach(AttachSpec {
                    vm, stdin: true, ..
                }) = &body
                {
                    match agent.resolve(vm) {
                        Ok(v) if v.record().spec.stdin_open => {
                            attached.insert(id, v);
                        }
                        Ok(v) => {
                            reply(
                                &tx,
                                id,
                                error_body(ApiError::new(
                                    ErrorCode::Conflict,
                                    format!("VM {} was created without an open stdin", v.id),
                                )),
                            )
                            .await;
                            continue;
                        }
                        Err(e) => {
                            reply(&tx, id, error_body(e)).await;
                            continue;
                        }
                    }
                }
                let is_stream = matches!(
                    body,
                    Request::Attach(_) | Request::Logs { .. } | Request::Events
                );
                let is_wait = matches!(body, Request::Wait { .. });
                // An event stream subscribes here, before the next request
                // on this connection is read: a client that asks for events
                // and then creates a VM sees that VM's every event.
                let subscribed = matches!(body, Request::Events).then(|| agent.events());
                let agent = agent.clone();
                let tx = tx.clone();
                let busy = activity.start();
                let h = tokio::spawn(async move {
                    if is_stream {
                        stream_delay().await;
                    }
                    match subscribed {
                        Some(rx) => events(rx, id, &tx).await,
                        None => handle(agent, id, body, &tx, version).await,
                    }
                    drop((permit, busy));
                });
                if is_stream {
                    streams.insert(id, h.abort_handle());
                } else if is_wait {
                    waits.retain(|w| !w.is_finished());
                    waits.push(h.abort_handle());
                }
            }
        }
    };
    // Streams and waits end with the connection: nobody is left to hear
    // them, and a wait for a VM that never exits would hold the connection
    // (and its slot) forever. Single calls that act (a start, a stop) run
    // to completion so their VM is left in a defined state.
    for h in streams.values().chain(&waits) {
        h.abort();
    }
    // A half-sent upload's file goes now, not when the last call ends.
    drop(uploads);
    drop(tx);
    if timed_out {
        let mut writer = writer;
        if tokio::time::timeout(CLOSE_LINGER, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    } else {
        let _ = writer.await;
    }
    result
}

/// A duration as a person reads it: "300 s", "1.5 s".
fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// Most uploads in progress on one connection.
const MAX_UPLOADS: usize = 4;

/// An image archive being uploaded into `images/tmp/`; the file is
/// deleted when this is dropped (the connection ended, the import
/// finished or failed).
#[derive(Debug)]
struct Upload {
    file: Option<std::fs::File>,
    path: std::path::PathBuf,
    size: u64,
    name: Option<String>,
    failed: Option<ApiError>,
}

impl Upload {
    /// Stores the next chunk. The write runs off the executor: a slow or
    /// stalled disk holds up this connection's reads (and so its client),
    /// nobody else's.
    async fn write(&mut self, data: Vec<u8>, cap: u64) {
        use std::io::Write;
        if self.failed.is_some() {
            return;
        }
        let len = data.len() as u64;
        let fail = if data.len() > MAX_CHUNK {
            Some(format!("upload chunks are at most {MAX_CHUNK} bytes"))
        } else if self.size + len > cap {
            Some(format!(
                "the upload is larger than this agent's limit of {cap} bytes"
            ))
        } else if let Some(mut f) = self.file.take() {
            let written = tokio::task::spawn_blocking(move || {
                let r = f.write_all(&data);
                r.map(|()| f)
            })
            .await;
            match written {
                Ok(Ok(f)) => {
                    self.file = Some(f);
                    None
                }
                Ok(Err(e)) => Some(format!("cannot store the upload: {e}")),
                Err(e) => Some(format!("cannot store the upload: {e}")),
            }
        } else {
            Some("the upload is closed".into())
        };
        self.size += len;
        if let Some(msg) = fail {
            let code = if msg.starts_with("cannot") {
                ErrorCode::Internal
            } else {
                ErrorCode::InvalidArgument
            };
            self.failed = Some(ApiError::new(code, msg));
            // Nothing more is kept of a failed upload.
            self.file = None;
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn begin_upload(
    agent: &Agent,
    uploads: &HashMap<u64, Upload>,
    id: RequestId,
    name: Option<String>,
) -> Result<Upload, ApiError> {
    if let Some(n) = &name {
        crate::ids::validate_image(n)?;
    }
    if uploads.len() >= MAX_UPLOADS {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("at most {MAX_UPLOADS} uploads at once on one connection"),
        ));
    }
    if uploads.contains_key(&id) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("request id {id} already names an upload"),
        ));
    }
    let path = agent
        .images
        .tmp_dir()
        .join(format!("upload-{}.tar", crate::ids::new_id()));
    let file = std::fs::File::create(&path).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("cannot create the upload file: {e}"),
        )
    })?;
    Ok(Upload {
        file: Some(file),
        path,
        size: 0,
        name,
        failed: None,
    })
}

async fn finish_upload(agent: &Arc<Agent>, mut u: Upload) -> Result<Response, ApiError> {
    if let Some(e) = u.failed.take() {
        return Err(e);
    }
    drop(u.file.take());
    let agent2 = agent.clone();
    let rec = tokio::task::spawn_blocking(move || {
        let r = agent2.images.import_archive(&u.path, u.name.clone());
        drop(u);
        r
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Internal, format!("import task failed: {e}")))??;
    let users = agent.image_users(&rec.id);
    Ok(Response::Image(Box::new(agent.images.info(&rec, users))))
}

/// Sends `StdinAck` on attach `id` whenever the guest's stdin count is
/// known and changes; returns only if the connection is gone.
async fn stdin_acks(vm: &Vm, id: RequestId, tx: &mpsc::Sender<ServerMessage>) {
    let mut rx = vm.stdin_acked.subscribe();
    loop {
        let known = *rx.borrow_and_update();
        if let Some(received) = known {
            let body = Response::StdinAck { received };
            if tx.send(ServerMessage { id, body }).await.is_err() {
                return;
            }
        }
        if rx.changed().await.is_err() {
            // The VM is gone; the output stream ends by itself.
            std::future::pending::<()>().await;
        }
    }
}

fn no_upload(upload: u64) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no upload {upload} on this connection"),
    )
}

fn no_stdin(attach: RequestId) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("request {attach} is not an attach with stdin on this connection"),
    )
}

fn frame_error(e: &FrameError) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, format!("bad frame: {e}"))
}

/// Test builds' fault injection, inert unless set: with
/// `VMLET_TEST_STREAM_DELAY_MS=N` in its environment the agent starts
/// serving every stream request N ms late, so a test can show that what a
/// stream must see from the moment it was asked (events) does not depend
/// on when its task first runs.
async fn stream_delay() {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        std::env::var("VMLET_TEST_STREAM_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    });
    if let Some(d) = delay {
        tokio::time::sleep(*d).await;
    }
}

/// Streams every state change from `rx` to the client until it goes away
/// or falls too far behind.
async fn events(
    mut rx: tokio::sync::broadcast::Receiver<vmlet_protocol::api::Event>,
    id: RequestId,
    tx: &Tx,
) {
    loop {
        match rx.recv().await {
            Ok(ev) => {
                if tx
                    .send(ServerMessage {
                        id,
                        body: Response::Event(ev),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                reply(
                    tx,
                    id,
                    error_body(ApiError::new(
                        ErrorCode::Unavailable,
                        format!("the client fell {n} events behind; the stream was ended"),
                    )),
                )
                .await;
                return;
            }
            Err(_) => return,
        }
    }
}

/// Handles one request to completion, on a connection that negotiated API
/// `version`.
async fn handle(agent: Arc<Agent>, id: RequestId, body: Request, tx: &Tx, version: u32) {
    let r = match body {
        Request::Version => Ok(Response::Version(VersionInfo {
            agent: env!("CARGO_PKG_VERSION").into(),
            api_version: API_VERSION,
            vmm: format!("{} {}", agent.vmm.name(), agent.vmm.version()),
            accel: agent.config.accel.to_string(),
            kernel: agent.kernel.describe(),
        })),
        Request::Create(spec) => agent
            .create(spec)
            .map(|vm| Response::Created { id: vm.id.clone() }),
        Request::Run(spec) => match agent.create(spec) {
            Ok(vm) => crate::start::start(&agent, &vm)
                .await
                .map(|_| Response::Created { id: vm.id.clone() }),
            Err(e) => Err(e),
        },
        Request::Start { vm } => match agent.resolve(&vm) {
            Ok(vm) => crate::start::start(&agent, &vm)
                .await
                .map(|_| Response::Done),
            Err(e) => Err(e),
        },
        Request::Wait { vm } => match agent.resolve(&vm) {
            Ok(vm) => match vm.wait_exit().await {
                Some(e) => {
                    vm.exit_told();
                    Ok(Response::Exited(e))
                }
                None => Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("VM {} was removed before it ran", vm.id),
                )),
            },
            Err(e) => Err(e),
        },
        Request::Stop { vm, timeout_ms } => match agent.resolve(&vm) {
            Ok(vm) => stop(&vm, Duration::from_millis(timeout_ms.min(3_600_000))).await,
            Err(e) => Err(e),
        },
        Request::Kill { vm, signal } => match agent.resolve(&vm) {
            Ok(vm) => kill(&vm, signal).await,
            Err(e) => Err(e),
        },
        Request::Remove { vm, force } => match agent.resolve(&vm) {
            Ok(vm) => agent.remove(&vm, force).await.map(|_| Response::Done),
            Err(e) => Err(e),
        },
        Request::Pools => Ok(Response::Pools(agent.pools.info())),
        Request::Templates => Ok(Response::Templates(agent.templates.info())),
        Request::Capacity => Ok(Response::Capacity(agent.capacity())),
        Request::Prestage { image } => agent.prestage(&image).await.map(|_| Response::Done),
        Request::List { all } => Ok(Response::List(agent.list(all))),
        Request::Inspect { vm } => agent
            .resolve(&vm)
            .map(|vm| Response::Inspect(Box::new(vm.info(&agent.config.accel.to_string())))),
        Request::Attach(a) => {
            return match agent.resolve(&a.vm) {
                Ok(vm) => {
                    let start = if a.replay {
                        StreamStart::FirstByte
                    } else if version >= 2 {
                        // From version 2 a non-replaying attach says where
                        // it starts, so its client can resume after a lost
                        // connection.
                        StreamStart::NowAnnounced
                    } else {
                        StreamStart::Now
                    };
                    let out = output_stream(&vm, id, tx, a.stdout, a.stderr, start, true);
                    if !a.stdin {
                        return out.await;
                    }
                    // The guest's stdin count goes along, so a client can
                    // resume sending exactly where the guest is.
                    tokio::pin!(out);
                    tokio::select! {
                        () = &mut out => {}
                        () = stdin_acks(&vm, id, tx) => out.await,
                    }
                }
                Err(e) => reply(tx, id, error_body(e)).await,
            };
        }
        Request::Logs { vm, follow } => {
            return match agent.resolve(&vm) {
                Ok(vm) => {
                    output_stream(&vm, id, tx, true, true, StreamStart::FirstByte, follow).await
                }
                Err(e) => reply(tx, id, error_body(e)).await,
            }
        }
        Request::Events => return events(agent.events(), id, tx).await,
        Request::ImageList => Ok(Response::Images(
            agent
                .images
                .records()
                .iter()
                .map(|r| agent.images.info(r, agent.image_users(&r.id)))
                .collect(),
        )),
        Request::ImageInspect { image } => agent
            .images
            .find(&image)
            .map(|r| Response::Image(Box::new(agent.images.info(&r, agent.image_users(&r.id))))),
        Request::ImageRemove { image, force } => {
            let a = agent.clone();
            tokio::task::spawn_blocking(move || {
                let r = a.images.remove(&image, &|id| a.image_users(id), force);
                if r.is_ok() {
                    a.gc_images();
                }
                r.map(|_| Response::Done)
            })
            .await
            .unwrap_or_else(|e| {
                Err(ApiError::new(
                    ErrorCode::Internal,
                    format!("image removal task failed: {e}"),
                ))
            })
        }
        Request::ImagePull { reference } => crate::image::pull::pull(&agent, &reference).await,
        Request::Hello { .. }
        | Request::ImageImportBegin { .. }
        | Request::ImageImportData { .. }
        | Request::ImageImportEnd { .. }
        | Request::Stdin { .. }
        | Request::CloseStdin { .. }
        | Request::Cancel { .. } => unreachable!("handled in the read loop"),
    };
    reply(tx, id, r.unwrap_or_else(error_body)).await;
}

/// Where an output stream begins in the VM's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamStart {
    /// At the first byte still kept (a replay, `logs`).
    FirstByte,
    /// At the end, with what comes next.
    Now,
    /// At the end, saying first where that is ([`Response::Attached`]).
    NowAnnounced,
}

/// Streams a VM's output from its log.
async fn output_stream(
    vm: &Arc<Vm>,
    id: RequestId,
    tx: &Tx,
    stdout: bool,
    stderr: bool,
    start: StreamStart,
    follow: bool,
) {
    let copied = async {
        let mut r = vm.log.reader(start == StreamStart::FirstByte);
        if start == StreamStart::NowAnnounced {
            let (stdout, stderr) = r.streams();
            let m = ServerMessage {
                id,
                body: Response::Attached { stdout, stderr },
            };
            if tx.send(m).await.is_err() {
                return Ok(false);
            }
        }
        while let Some(item) = r.next(follow).await? {
            let rec = match item {
                Item::Record(rec) => rec,
                Item::Dropped(d) => {
                    // Told whichever streams were asked for: the gap is in
                    // the log, and the counts say which streams it hit.
                    let m = ServerMessage {
                        id,
                        body: Response::Dropped {
                            stdout: d.stdout,
                            stderr: d.stderr,
                        },
                    };
                    if tx.send(m).await.is_err() {
                        return Ok(false);
                    }
                    continue;
                }
            };
            let wanted = match rec.stream {
                vmlet_protocol::api::Stream::Stdout => stdout,
                vmlet_protocol::api::Stream::Stderr => stderr,
            };
            if !wanted {
                continue;
            }
            for chunk in rec.data.chunks(MAX_CHUNK) {
                let m = ServerMessage {
                    id,
                    body: Response::Output {
                        stream: rec.stream,
                        timestamp_ns: rec.timestamp_ns,
                        data: chunk.to_vec(),
                    },
                };
                if tx.send(m).await.is_err() {
                    // The client is gone: nobody to end the stream for.
                    return Ok(false);
                }
            }
        }
        Ok::<_, std::io::Error>(true)
    };
    match copied.await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            let e = if e.kind() == std::io::ErrorKind::NotFound {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("VM {} was removed while its log was read", vm.id),
                )
            } else {
                ApiError::new(ErrorCode::Internal, format!("cannot read the log: {e}"))
            };
            return reply(tx, id, error_body(e)).await;
        }
    }
    // The log is sealed just before the VM is marked exited; a follower
    // waits the moment in between so it can report the exit.
    let exit = if follow && vm.state() != VmState::Created {
        vm.wait_exit().await
    } else {
        vm.exit()
    };
    // A stream that followed the VM to its end (an attach, `logs -f`) is
    // a client learning the exit; a look at the log is not.
    let told = follow && exit.is_some();
    reply(tx, id, Response::StreamEnd { exit }).await;
    if told {
        vm.exit_told();
    }
}

async fn stop(vm: &Arc<Vm>, timeout: Duration) -> Result<Response, ApiError> {
    match vm.state() {
        VmState::Running | VmState::Starting => {}
        s => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("VM {} is {s}, not running", vm.id),
            ))
        }
    }
    vm.with(|i| i.stopping = true);
    let _ = vm.to_guest.try_send(HostMessage::Signal(libc::SIGTERM));
    if tokio::time::timeout(timeout, vm.wait_exit()).await.is_err() {
        if let Some(h) = vm.handle() {
            h.kill().await.map_err(|e| {
                ApiError::new(ErrorCode::Internal, format!("cannot kill the VMM: {e}"))
            })?;
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), vm.wait_exit()).await;
    }
    Ok(Response::Done)
}

async fn kill(vm: &Arc<Vm>, signal: i32) -> Result<Response, ApiError> {
    if !(1..=64).contains(&signal) {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("{signal} is not a signal number"),
        ));
    }
    if vm.state() != VmState::Running {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("VM {} is {}, not running", vm.id, vm.state()),
        ));
    }
    // Stdin has a queue of its own: the signals' fills only while no
    // connection to the guest takes it.
    match tokio::time::timeout(SIGNAL_PATIENCE, to_guest(vm, HostMessage::Signal(signal))).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "the signal could not be queued for VM {} within {}: its guest takes no \
                     messages (its connection is down); `vmlet stop` or `vmlet rm -f` ends it",
                    vm.id,
                    secs(SIGNAL_PATIENCE)
                ),
            ))
        }
    }
    Ok(Response::Done)
}

/// How long a `kill` waits for room in its guest's queue.
const SIGNAL_PATIENCE: Duration = Duration::from_secs(10);

/// Queues `m` for `vm`'s guest, waiting while the queue is full for as
/// long as the guest may still take it (a slow guest slows its sender).
/// Fails once the VM has exited: its session is over, and nothing will
/// take from the queue again.
async fn to_guest(vm: &Vm, m: HostMessage) -> Result<(), ApiError> {
    let over = |s: &VmState| matches!(s, VmState::Exited | VmState::Removed);
    let exited = || {
        ApiError::new(
            ErrorCode::Conflict,
            format!("VM {} has exited: nothing more reaches its guest", vm.id),
        )
    };
    let mut state = vm.subscribe();
    if over(&state.borrow_and_update()) {
        return Err(exited());
    }
    tokio::select! {
        r = async {
            // Stdin in its own queue: a signal overtakes stdin the process
            // has not read, as on one host it would not wait for a pipe.
            match m {
                HostMessage::Stdin(data) => vm.stdin.push(data).await,
                HostMessage::CloseStdin => vm.stdin.close(),
                m => return vm.to_guest.send(m).await.map_err(|_| exited()),
            }
            Ok(())
        } => r,
        _ = state.wait_for(over) => Err(exited()),
    }
}
