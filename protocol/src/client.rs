//! The engine's client for vmletd.
//!
//! One [`Client`] is one connection. It negotiates the version on
//! [`Client::connect`], then multiplexes any number of requests and streams
//! over the connection: a reader task routes each reply to the request that
//! awaits it by id.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use crate::aio::{read_frame, write_frame};
use crate::api::{
    CapacityInfo, ClientMessage, CreateSpec, ExitInfo, ImageInfo, Request, RequestId, Response,
    ServerMessage, VersionInfo, VmInfo, VmSummary, API_VERSION, MIN_API_VERSION,
};
use crate::error::ApiError;
use crate::frame::{FrameError, MAX_FRAME_LEN};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the agent's socket.
    #[error("cannot connect to vmletd at {path}")]
    Connect {
        /// The socket path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("connection to vmletd failed")]
    Frame(#[from] FrameError),
    /// The agent closed the connection.
    #[error("vmletd closed the connection")]
    Closed,
    /// The agent refused the request.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Reading what was to be sent failed.
    #[error("cannot read the input")]
    Io(#[source] std::io::Error),
    /// The agent answered with something this request does not expect.
    #[error("unexpected reply from vmletd: {0}")]
    Unexpected(String),
    /// The request needs a newer API version than the connection speaks.
    #[error(
        "vmletd speaks API version {agent}; this request needs version {needs} (upgrade vmletd)"
    )]
    TooOld {
        /// The version the request needs.
        needs: u32,
        /// The connection's version.
        agent: u32,
    },
}

impl ClientError {
    /// Whether retrying later can help.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Api(e) => e.retryable(),
            ClientError::Connect { .. } | ClientError::Closed | ClientError::Frame(_) => true,
            ClientError::Io(_) => false,
            ClientError::Unexpected(_) | ClientError::TooOld { .. } => false,
        }
    }
}

type Routes = Arc<Mutex<HashMap<RequestId, mpsc::UnboundedSender<Response>>>>;

/// A connection to vmletd.
#[derive(Debug)]
pub struct Client {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    routes: Routes,
    /// Why the agent closed the connection, when it said so: the error
    /// with request id 0 it sent last before closing (an idle timeout).
    closed_because: Arc<Mutex<Option<ApiError>>>,
    /// Closed (its sender dropped) when the reader task has ended.
    reader_done: watch::Receiver<()>,
    next: AtomicU64,
    version: u32,
    agent: String,
}

/// The replies to one streaming request.
#[derive(Debug)]
pub struct ResponseStream {
    /// The request's id, for [`Client::stdin`] and [`Client::cancel`].
    pub id: RequestId,
    rx: mpsc::UnboundedReceiver<Response>,
}

impl ResponseStream {
    /// The next reply; `None` once the stream has ended (after
    /// [`Response::StreamEnd`] or an error) or the connection closed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call loses no reply.
    pub async fn next(&mut self) -> Option<Response> {
        self.rx.recv().await
    }
}

impl Client {
    /// Connects to the agent at `path` and negotiates the API version.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Self::handshake(stream, "vmlet-client").await
    }

    /// Negotiates the API version on an open stream.
    pub async fn handshake(stream: UnixStream, name: &str) -> Result<Client, ClientError> {
        let (mut rd, mut wr) = stream.into_split();
        write_frame(
            &mut wr,
            &ClientMessage {
                id: 0,
                body: Request::Hello {
                    min_version: MIN_API_VERSION,
                    max_version: API_VERSION,
                    client: name.to_string(),
                },
            },
        )
        .await?;
        let reply: ServerMessage = read_frame(&mut rd, MAX_FRAME_LEN)
            .await?
            .ok_or(ClientError::Closed)?;
        let (version, agent) = match reply.body {
            Response::Hello { version, agent } => (version, agent),
            Response::Error(e) => return Err(e.into()),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        let routes: Routes = Arc::default();
        let r2 = routes.clone();
        let closed_because: Arc<Mutex<Option<ApiError>>> = Arc::default();
        let closed2 = closed_because.clone();
        let (done_tx, reader_done) = watch::channel(());
        tokio::spawn(async move {
            let _done = done_tx;
            // An error about the connection rather than a request.
            let mut last_conn_error = None;
            loop {
                match read_frame::<_, ServerMessage>(&mut rd, MAX_FRAME_LEN).await {
                    Ok(Some(msg)) => {
                        if let (0, Response::Error(e)) = (msg.id, &msg.body) {
                            last_conn_error = Some(e.clone());
                        }
                        let done = matches!(msg.body, Response::StreamEnd { .. });
                        let mut routes = r2.lock();
                        if let Some(tx) = routes.get(&msg.id) {
                            let _ = tx.send(msg.body);
                        }
                        if done {
                            routes.remove(&msg.id);
                        }
                    }
                    Ok(None) | Err(_) => {
                        *closed2.lock() = last_conn_error;
                        // Dropping every sender wakes every waiter with `None`.
                        r2.lock().clear();
                        return;
                    }
                }
            }
        });
        Ok(Client {
            writer: tokio::sync::Mutex::new(wr),
            routes,
            closed_because,
            reader_done,
            next: AtomicU64::new(1),
            version,
            agent,
        })
    }

    /// The negotiated API version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The agent's self-description from the handshake.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Why the agent closed the connection, if it said: an idle or hello
    /// timeout ([`crate::ErrorCode::TimedOut`], retryable on a new
    /// connection).
    pub fn closed_because(&self) -> Option<ApiError> {
        self.closed_because.lock().clone()
    }

    /// The error for a connection found closed: the agent's reason if it
    /// gave one. A write can fail before the reader task has taken the
    /// agent's last frames from the socket, so it is given a moment to.
    async fn closed(&self, otherwise: ClientError) -> ClientError {
        let mut done = self.reader_done.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while done.changed().await.is_ok() {}
        })
        .await;
        match self.closed_because() {
            Some(e) => ClientError::Api(e),
            None => otherwise,
        }
    }

    async fn send(&self, id: RequestId, body: Request) -> Result<(), ClientError> {
        let mut w = self.writer.lock().await;
        if let Err(e) = write_frame(&mut *w, &ClientMessage { id, body }).await {
            return Err(self.closed(e.into()).await);
        }
        Ok(())
    }

    /// Sends a request and returns the stream of its replies.
    pub async fn stream(&self, body: Request) -> Result<ResponseStream, ClientError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().insert(id, tx);
        if let Err(e) = self.send(id, body).await {
            self.routes.lock().remove(&id);
            return Err(e);
        }
        Ok(ResponseStream { id, rx })
    }

    /// Sends a request and waits for its single reply.
    pub async fn call(&self, body: Request) -> Result<Response, ClientError> {
        let mut s = self.stream(body).await?;
        let r = match s.next().await {
            Some(r) => r,
            None => return Err(self.closed(ClientError::Closed).await),
        };
        self.routes.lock().remove(&s.id);
        match r {
            Response::Error(e) => Err(e.into()),
            r => Ok(r),
        }
    }

    /// Sends stdin bytes for the attach request `attach`. Keep at most
    /// [`STDIN_WINDOW`](crate::api::STDIN_WINDOW) bytes sent beyond the
    /// last `StdinAck` of the attach: within it the agent never stops
    /// reading this connection for stdin, so the connection's other
    /// requests are not held up by a VM that does not read its stdin.
    pub async fn stdin(&self, attach: RequestId, data: Vec<u8>) -> Result<(), ClientError> {
        self.send(0, Request::Stdin { attach, data }).await
    }

    /// Closes stdin of the attach request `attach`.
    pub async fn close_stdin(&self, attach: RequestId) -> Result<(), ClientError> {
        self.send(0, Request::CloseStdin { attach }).await
    }

    /// Ends the stream `request`.
    pub async fn cancel(&self, request: RequestId) -> Result<(), ClientError> {
        self.send(0, Request::Cancel { request }).await
    }

    /// Creates a VM and returns its id.
    pub async fn create(&self, spec: CreateSpec) -> Result<String, ClientError> {
        expect_created(self.call(Request::Create(spec)).await?)
    }

    /// Creates and starts a VM, and returns its id.
    pub async fn run(&self, spec: CreateSpec) -> Result<String, ClientError> {
        expect_created(self.call(Request::Run(spec)).await?)
    }

    /// Starts a created VM.
    pub async fn start(&self, vm: &str) -> Result<(), ClientError> {
        expect_done(self.call(Request::Start { vm: vm.into() }).await?)
    }

    /// Waits for a VM to exit.
    pub async fn wait(&self, vm: &str) -> Result<ExitInfo, ClientError> {
        match self.call(Request::Wait { vm: vm.into() }).await? {
            Response::Exited(e) => Ok(e),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Stops a VM, killing it after `timeout_ms`.
    pub async fn stop(&self, vm: &str, timeout_ms: u64) -> Result<(), ClientError> {
        expect_done(
            self.call(Request::Stop {
                vm: vm.into(),
                timeout_ms,
            })
            .await?,
        )
    }

    /// Sends `signal` to a VM's process.
    pub async fn kill(&self, vm: &str, signal: i32) -> Result<(), ClientError> {
        expect_done(
            self.call(Request::Kill {
                vm: vm.into(),
                signal,
            })
            .await?,
        )
    }

    /// Removes a VM.
    pub async fn remove(&self, vm: &str, force: bool) -> Result<(), ClientError> {
        expect_done(
            self.call(Request::Remove {
                vm: vm.into(),
                force,
            })
            .await?,
        )
    }

    /// Lists VMs.
    pub async fn list(&self, all: bool) -> Result<Vec<VmSummary>, ClientError> {
        match self.call(Request::List { all }).await? {
            Response::List(v) => Ok(v),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Inspects a VM.
    pub async fn inspect(&self, vm: &str) -> Result<VmInfo, ClientError> {
        match self.call(Request::Inspect { vm: vm.into() }).await? {
            Response::Inspect(v) => Ok(*v),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Uploads an image archive (a `docker save` tar or a tarred OCI
    /// layout) read from `archive`, and waits for the agent to import it.
    pub async fn image_import<R>(
        &self,
        name: Option<String>,
        mut archive: R,
    ) -> Result<ImageInfo, ClientError>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt;
        let upload = match self.call(Request::ImageImportBegin { name }).await? {
            Response::Upload { upload } => upload,
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        // The agent answers nothing to data chunks: a chunk it refuses
        // (over the size cap, say) fails the upload, and the end request
        // reports why.
        let mut buf = vec![0u8; crate::frame::MAX_CHUNK];
        loop {
            let n = archive.read(&mut buf).await.map_err(ClientError::Io)?;
            if n == 0 {
                break;
            }
            self.send(
                0,
                Request::ImageImportData {
                    upload,
                    data: buf[..n].to_vec(),
                },
            )
            .await?;
        }
        expect_image(self.call(Request::ImageImportEnd { upload }).await?)
    }

    /// Pulls an image from a registry.
    pub async fn image_pull(&self, reference: &str) -> Result<ImageInfo, ClientError> {
        expect_image(
            self.call(Request::ImagePull {
                reference: reference.into(),
            })
            .await?,
        )
    }

    /// Every stored image.
    pub async fn image_list(&self) -> Result<Vec<ImageInfo>, ClientError> {
        match self.call(Request::ImageList).await? {
            Response::Images(v) => Ok(v),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// One stored image.
    pub async fn image_inspect(&self, image: &str) -> Result<ImageInfo, ClientError> {
        expect_image(
            self.call(Request::ImageInspect {
                image: image.into(),
            })
            .await?,
        )
    }

    /// Removes an image.
    pub async fn image_remove(&self, image: &str, force: bool) -> Result<(), ClientError> {
        expect_done(
            self.call(Request::ImageRemove {
                image: image.into(),
                force,
            })
            .await?,
        )
    }

    /// The host's limits, what counts against them, and how many pool
    /// members may boot at once (API version 3).
    pub async fn capacity(&self) -> Result<CapacityInfo, ClientError> {
        if self.version < 3 {
            return Err(ClientError::TooOld {
                needs: 3,
                agent: self.version,
            });
        }
        match self.call(Request::Capacity).await? {
            Response::Capacity(c) => Ok(c),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The agent's version.
    pub async fn agent_version(&self) -> Result<VersionInfo, ClientError> {
        match self.call(Request::Version).await? {
            Response::Version(v) => Ok(v),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

fn expect_created(r: Response) -> Result<String, ClientError> {
    match r {
        Response::Created { id } => Ok(id),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

fn expect_image(r: Response) -> Result<ImageInfo, ClientError> {
    match r {
        Response::Image(i) => Ok(*i),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

fn expect_done(r: Response) -> Result<(), ClientError> {
    match r {
        Response::Done => Ok(()),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}
