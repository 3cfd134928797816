//! vmlet: the command-line client of vmletd.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::io::AsyncReadExt;
use vmlet_protocol::api::{AttachSpec, CreateSpec, Request, Response, Stream, VmSummary};
use vmlet_protocol::client::{Client, ClientError};
use vmlet_protocol::frame::MAX_CHUNK;

/// Run containers in their own lightweight VMs through the local vmletd.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// vmletd's API socket.
    #[arg(
        long,
        global = true,
        env = "VMLET_SOCKET",
        default_value = "/run/vmlet/vmlet.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Assign a name to the container.
    #[arg(long)]
    name: Option<String>,
    /// Keep stdin open and pass this terminal's stdin to the container.
    #[arg(short, long)]
    interactive: bool,
    /// Set an environment variable (KEY=value).
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    workdir: Option<String>,
    /// Guest memory in MiB.
    #[arg(short, long)]
    memory: Option<u32>,
    /// Virtual CPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// Override the image's entrypoint (an empty string clears it); the
    /// image's Cmd is dropped, as with docker run.
    #[arg(long)]
    entrypoint: Option<String>,
    /// User to run as: name, uid, uid:gid or name:group.
    #[arg(short, long)]
    user: Option<String>,
    /// The image: a name, a sha256: id or a unique id prefix.
    image: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a command in a new containerVM. The container's exit code
    /// becomes vmlet's; 125 means vmlet itself failed.
    Run {
        /// Remove the container when it exits.
        #[arg(long)]
        rm: bool,
        /// Run in the background and print the container id.
        #[arg(short, long)]
        detach: bool,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// Create a containerVM without starting it; prints its id.
    Create {
        #[command(flatten)]
        create: CreateArgs,
    },
    /// Start a created containerVM.
    Start {
        /// Container id or name.
        vm: String,
    },
    /// Attach to a running containerVM's output (and stdin with -i).
    Attach {
        /// Pass this terminal's stdin to the container.
        #[arg(short, long)]
        interactive: bool,
        /// Container id or name.
        vm: String,
    },
    /// List containerVMs.
    Ps {
        /// Show all, not just running ones.
        #[arg(short, long)]
        all: bool,
        /// Print only ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print a containerVM's output.
    Logs {
        /// Keep printing new output until the container exits.
        #[arg(short, long)]
        follow: bool,
        /// Prefix each chunk with its arrival time.
        #[arg(short, long)]
        timestamps: bool,
        /// Container id or name.
        vm: String,
    },
    /// Wait for containerVMs to exit and print their exit codes.
    Wait {
        /// Container ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Stop containerVMs: SIGTERM, then kill after the timeout.
    Stop {
        /// Seconds to wait before killing.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
        /// Container ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Send a signal to containerVMs' processes.
    Kill {
        /// Signal name or number.
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        /// Container ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Remove containerVMs.
    Rm {
        /// Kill running ones first.
        #[arg(short, long)]
        force: bool,
        /// Container ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Show everything about a containerVM as JSON, with the start's
    /// phase timings.
    Inspect {
        /// Container id or name.
        vm: String,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Show the versions of vmlet and vmletd.
    Version,
    /// Stream state changes of every containerVM.
    Events,
    /// Show the warm pools: guests booted ahead of demand.
    Pool,
    /// Show the host's limits (VMs, guest memory), what counts against
    /// them now, and how many pool members may boot at once.
    Info,
    /// Show the guest templates (snapshots starts restore instead of booting).
    Template {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load an image's layer disks into the agent's memory ahead of its
    /// first start.
    Prestage {
        /// Image name or id.
        image: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Import an image from a `docker save` tar or an OCI image layout
    /// (a directory, or a tar of one). Prints the image id.
    Import {
        /// Name to give it (repo:tag); by default the archive's own.
        #[arg(long)]
        name: Option<String>,
        /// The archive or layout directory.
        path: PathBuf,
    },
    /// Pull an image from a registry. Prints the image id.
    Pull {
        #[arg(help = "[http://]host[:port]/repo[:tag|@sha256:…]")]
        reference: String,
    },
    /// List images.
    Ls {
        /// Print only ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show an image as JSON.
    Inspect {
        /// Name, id or id prefix.
        image: String,
    },
    /// Remove images; refused while a VM uses one unless forced.
    Rm {
        /// Remove even if VMs use it (they keep their layers).
        #[arg(short, long)]
        force: bool,
        /// Names, ids or id prefixes.
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("i/o failed")]
    Io(#[from] std::io::Error),
}

/// What vmlet exits with when its stdout was closed early (`vmlet ps |
/// head`): what a shell reports for a tool that SIGPIPE ended.
const CLOSED_STDOUT: u8 = 128 + libc::SIGPIPE as u8;

/// Like std's `println!`, except that a closed stdout ends vmlet quietly
/// instead of panicking.
macro_rules! println {
    ($($t:tt)*) => {{
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            stdout_failed(e)
        }
    }};
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        eprintln!("vmlet: cannot write to stdout: {e}");
        std::process::exit(125);
    }
    std::process::exit(CLOSED_STDOUT.into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(CliError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::from(CLOSED_STDOUT)
        }
        Err(e) => {
            let mut s = format!("vmlet: {e}");
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                s.push_str(&format!(": {c}"));
                cur = c.source();
            }
            eprintln!("{s}");
            ExitCode::from(125)
        }
    }
}

fn spec(c: CreateArgs, auto_remove: bool) -> CreateSpec {
    CreateSpec {
        name: c.name,
        image: c.image,
        argv: c.command,
        env: c.env,
        workdir: c.workdir,
        stdin_open: c.interactive,
        auto_remove,
        memory_mib: c.memory,
        vcpus: c.cpus,
        entrypoint: c
            .entrypoint
            .map(|e| if e.is_empty() { Vec::new() } else { vec![e] }),
        user: c.user,
    }
}

async fn run(cli: Cli) -> Result<u8, CliError> {
    let client = Client::connect(&cli.socket).await?;
    match cli.cmd {
        Cmd::Run { rm, detach, create } => {
            let interactive = create.interactive;
            let id = client.create(spec(create, rm)).await?;
            if detach {
                client.start(&id).await?;
                println!("{id}");
                return Ok(0);
            }
            // Attach before starting, replaying from the first byte, so no
            // output is missed however fast the container is.
            let stream = client
                .stream(attach_request(&id, interactive, true))
                .await?;
            if let Err(e) = client.start(&id).await {
                if rm {
                    let _ = client.remove(&id, true).await;
                }
                return Err(e.into());
            }
            follow_run(&cli.socket, client, id, stream, interactive).await
        }
        Cmd::Create { create } => {
            println!("{}", client.create(spec(create, false)).await?);
            Ok(0)
        }
        Cmd::Start { vm } => {
            client.start(&vm).await?;
            println!("{vm}");
            Ok(0)
        }
        Cmd::Attach {
            interactive: false,
            vm,
        } => follow_attach(&cli.socket, client, vm).await,
        Cmd::Attach {
            interactive: true,
            vm,
        } => {
            let stream = client.stream(attach_request(&vm, true, false)).await?;
            attach_interactive(&client, stream).await
        }
        Cmd::Ps { all, quiet } => {
            let list = client.list(all).await?;
            if quiet {
                for v in &list {
                    println!("{}", v.id);
                }
            } else {
                print_ps(&list);
            }
            Ok(0)
        }
        Cmd::Logs {
            follow,
            timestamps,
            vm,
        } => logs(&cli.socket, client, vm, follow, timestamps).await,
        Cmd::Wait { vms } => {
            let mut last = 0;
            for vm in vms {
                let e = client.wait(&vm).await?;
                println!("{}", e.code);
                last = e.code;
            }
            Ok(last.clamp(0, 255) as u8)
        }
        Cmd::Stop { time, vms } => {
            for vm in vms {
                client.stop(&vm, time * 1000).await?;
                println!("{vm}");
            }
            Ok(0)
        }
        Cmd::Kill { signal, vms } => {
            let sig = parse_signal(&signal)?;
            for vm in vms {
                client.kill(&vm, sig).await?;
                println!("{vm}");
            }
            Ok(0)
        }
        Cmd::Rm { force, vms } => {
            for vm in vms {
                client.remove(&vm, force).await?;
                println!("{vm}");
            }
            Ok(0)
        }
        Cmd::Inspect { vm } => {
            let info = client.inspect(&vm).await?;
            let mut phases = serde_json::Map::new();
            for p in &info.phases {
                phases.insert(
                    p.phase.name().into(),
                    serde_json::json!(p.at_us as f64 / 1000.0),
                );
            }
            let v = serde_json::json!({
                "Id": info.summary.id,
                "Name": info.summary.name,
                "Image": info.summary.image,
                "Command": info.summary.argv,
                "State": info.summary.state.to_string(),
                "Created": info.summary.created_ms,
                "Exit": info.summary.exit.as_ref().map(|e| serde_json::json!({
                    "Code": e.code, "Signal": e.signal, "Reason": e.reason, "At": e.at_ms,
                })),
                "PhasesMs": phases,
                "GuestBoot": info.guest_boot.as_ref().map(|b| serde_json::json!({
                    "KernelMs": b.kernel_us as f64 / 1000.0,
                    "ModulesMs": b.modules_us as f64 / 1000.0,
                    "HelloMs": b.hello_us as f64 / 1000.0,
                })),
                "RootMs": info.root.as_ref().map(|r| serde_json::json!({
                    "Disks": r.disks_us as f64 / 1000.0,
                    "Layers": r.layers_us as f64 / 1000.0,
                    "Writable": r.writable_us as f64 / 1000.0,
                    "Dirs": r.dirs_us as f64 / 1000.0,
                    "Overlay": r.overlay_us as f64 / 1000.0,
                    "Inner": r.inner_us as f64 / 1000.0,
                })),
                "Cid": info.cid,
                "VmmPid": info.vmm_pid,
                "Accel": info.accel,
                "MemoryMiB": info.memory_mib,
                "Vcpus": info.vcpus,
                "LogBytes": info.log_bytes,
                "LogDroppedBytes": info.log_dropped_bytes,
                "StartMode": info.start_mode,
                "Confinement": info.confinement.as_ref().map(|c| serde_json::json!({
                    "User": c.user,
                    "Uid": c.uid,
                    "Gid": c.gid,
                    "Cgroup": c.cgroup.as_ref().map(|g| serde_json::json!({
                        "Version": g.version,
                        "Paths": g.paths,
                        "MemoryMaxBytes": g.memory_max_bytes,
                        "CpuQuotaUs": g.cpu_quota_us,
                        "CpuPeriodUs": g.cpu_period_us,
                        "PidsMax": g.pids_max,
                    })),
                    "Note": c.note,
                })),
                "Env": info.spec.env,
                "WorkingDir": info.spec.workdir,
                "OpenStdin": info.spec.stdin_open,
                "AutoRemove": info.spec.auto_remove,
            });
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            Ok(0)
        }
        Cmd::Image(cmd) => image(&client, cmd).await,
        Cmd::Version => {
            let v = client.agent_version().await?;
            println!("vmlet:   {}", env!("CARGO_PKG_VERSION"));
            println!("vmletd:  {} (API {})", v.agent, v.api_version);
            println!("vmm:     {}", v.vmm);
            println!("accel:   {}", v.accel);
            println!("kernel:  {}", v.kernel);
            Ok(0)
        }
        Cmd::Prestage { image } => {
            client
                .call(Request::Prestage {
                    image: image.clone(),
                })
                .await?;
            println!("{image}");
            Ok(0)
        }
        Cmd::Pool => {
            let Response::Pools(pools) = client.call(Request::Pools).await? else {
                return Err(CliError::Usage("unexpected reply to Pools".into()));
            };
            println!(
                "{:<20}  {:>6}  {:>5}  {:>7}  {:>9}  {:>6}  {:>6}  {:>8}  WARMUP",
                "IMAGE", "TARGET", "READY", "FILLING", "MEMORY", "HITS", "MISSES", "FAILURES"
            );
            for p in pools {
                println!(
                    "{:<20}  {:>6}  {:>5}  {:>7}  {:>6}MiB  {:>6}  {:>6}  {:>8}  {}",
                    p.image,
                    p.target,
                    p.ready,
                    p.filling,
                    p.memory_held_mib,
                    p.hits,
                    p.misses,
                    p.failures,
                    p.warmup
                        .map(|w| shell_words::join(&w))
                        .unwrap_or_else(|| "-".into())
                );
            }
            Ok(0)
        }
        Cmd::Info => {
            let c = client.capacity().await?;
            println!(
                "VMs: {} of at most {} (starting, running, or holding a pool member's guest)",
                c.vms, c.max_vms
            );
            println!(
                "guest memory: {} of at most {} MiB (pool members included)",
                c.memory_mib, c.max_memory_mib
            );
            println!(
                "pool refills: {} booting, at most {} at once",
                c.pool_filling, c.pool_refill
            );
            Ok(0)
        }
        Cmd::Template { json } => {
            let Response::Templates(ts) = client.call(Request::Templates).await? else {
                return Err(CliError::Usage("unexpected reply to Templates".into()));
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&ts).unwrap_or_default());
                return Ok(0);
            }
            println!(
                "{:<20}  {:<8}  {:>9}  {:>8}  {:>8}  {:>6}  {:>6}  {:>8}",
                "IMAGE", "STATUS", "MEMORY", "STATE", "BUILD", "BUILDS", "CLONES", "FAILURES"
            );
            for t in ts {
                println!(
                    "{:<20}  {:<8}  {:>6}MiB  {:>5}KiB  {:>6}ms  {:>6}  {:>6}  {:>8}",
                    t.image,
                    t.status,
                    t.memory_bytes >> 20,
                    t.state_bytes >> 10,
                    t.build_ms,
                    t.builds,
                    t.clones,
                    t.failures
                );
                if let Some(e) = t.last_error {
                    println!("  last error: {e}");
                }
            }
            Ok(0)
        }
        Cmd::Events => {
            let mut s = client.stream(Request::Events).await?;
            while let Some(r) = s.next().await {
                match r {
                    Response::Event(e) => {
                        println!("{} {} {}", e.at_ms, e.vm, e.state);
                    }
                    Response::Error(e) => return Err(ClientError::Api(e).into()),
                    _ => {}
                }
            }
            Ok(0)
        }
    }
}

async fn image(client: &Client, cmd: ImageCmd) -> Result<u8, CliError> {
    match cmd {
        ImageCmd::Import { name, path } => {
            let info = if path.is_dir() {
                // An OCI layout directory goes up as a tar, made on the
                // fly by a thread writing into a pipe the upload reads.
                let (rd, wr) = tokio::io::duplex(1 << 20);
                let handle = tokio::runtime::Handle::current();
                let dir = path.clone();
                let t = std::thread::spawn(move || -> std::io::Result<()> {
                    let mut b = tar::Builder::new(BridgeWriter { handle, w: wr });
                    b.follow_symlinks(false);
                    b.append_dir_all(".", &dir)?;
                    b.into_inner()?;
                    Ok(())
                });
                let r = client.image_import(name, rd).await;
                match t.join() {
                    Ok(Err(e)) if r.is_err() => return Err(e.into()),
                    _ => {}
                }
                r?
            } else {
                let f = tokio::fs::File::open(&path).await?;
                client.image_import(name, f).await?
            };
            println!("{}", info.id);
            Ok(0)
        }
        ImageCmd::Pull { reference } => {
            let info = client.image_pull(&reference).await?;
            println!("{}", info.id);
            Ok(0)
        }
        ImageCmd::Ls { quiet } => {
            let list = client.image_list().await?;
            if quiet {
                for i in &list {
                    println!("{}", i.id);
                }
                return Ok(0);
            }
            println!(
                "{:<40}  {:<19}  {:>6}  {:>10}  USED BY",
                "NAME", "ID", "LAYERS", "SIZE"
            );
            for i in &list {
                let size: u64 = i.layers.iter().map(|l| l.disk_size).sum();
                let names = if i.names.is_empty() {
                    vec!["<none>".to_string()]
                } else {
                    i.names.clone()
                };
                for n in names {
                    println!(
                        "{:<40}  {:<19}  {:>6}  {:>10}  {}",
                        n,
                        &i.id[..i.id.len().min(19)],
                        i.layers.len(),
                        format_size(size),
                        i.used_by.len()
                    );
                }
            }
            Ok(0)
        }
        ImageCmd::Inspect { image } => {
            let i = client.image_inspect(&image).await?;
            let v = serde_json::json!({
                "Id": i.id,
                "RepoTags": i.names,
                "Created": i.created_ms,
                "Config": {
                    "Entrypoint": i.config.entrypoint,
                    "Cmd": i.config.cmd,
                    "Env": i.config.env,
                    "WorkingDir": i.config.working_dir,
                    "User": i.config.user,
                },
                "Layers": i.layers.iter().map(|l| serde_json::json!({
                    "DiffId": l.diff_id, "Size": l.size, "DiskSize": l.disk_size, "FsType": l.fstype,
                })).collect::<Vec<_>>(),
                "UsedBy": i.used_by,
            });
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            Ok(0)
        }
        ImageCmd::Rm { force, images } => {
            for i in images {
                client.image_remove(&i, force).await?;
                println!("{i}");
            }
            Ok(0)
        }
    }
}

/// A blocking writer into an async pipe, for a thread that makes a tar.
struct BridgeWriter {
    handle: tokio::runtime::Handle,
    w: tokio::io::DuplexStream,
}

impl std::fmt::Debug for BridgeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BridgeWriter")
    }
}

impl Write for BridgeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use tokio::io::AsyncWriteExt;
        self.handle.block_on(self.w.write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn format_size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

/// Copies the attach stream to stdout/stderr and stdin to the VM until
/// the VM exits; returns its exit code.
async fn attach_interactive(
    client: &Client,
    mut stream: vmlet_protocol::client::ResponseStream,
) -> Result<u8, CliError> {
    let attach_id = stream.id;
    let stdin_task = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                client.close_stdin(attach_id).await?;
                return std::future::pending::<Result<(), CliError>>().await;
            }
            client.stdin(attach_id, buf[..n].to_vec()).await?;
        }
    };
    let output = async {
        let mut out = std::io::stdout().lock();
        let mut err = std::io::stderr().lock();
        // One connection: every byte it brings is new.
        let mut printed = Resume::default();
        while let Some(r) = stream.next().await {
            if let Some(code) = printed.attach_reply(r, &mut out, &mut err)? {
                return Ok(code);
            }
        }
        Err(ClientError::Closed.into())
    };
    tokio::select! {
        r = output => r,
        r = stdin_task => r.map(|_| 0),
    }
}

/// Streams a running container's output from now on, without stdin, and
/// returns its exit code, across restarts of vmletd: an agent of API
/// version 2 or later says first where the stream begins
/// (`Response::Attached`), so when the connection breaks the CLI attaches
/// again replaying the log, and skips up to there and what it printed
/// since: every byte from the attach on is printed once. An older agent
/// says nothing, and a broken connection ends the attach with an error.
/// (`vmlet attach -i` does not resume: stdin may have other writers, so
/// the guest's count is not this client's to resend from.)
async fn follow_attach(
    socket: &std::path::Path,
    mut client: Client,
    vm: String,
) -> Result<u8, CliError> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let mut printed = Resume::default();
    let mut resumable = false;
    let mut s = client.stream(attach_request(&vm, false, false)).await?;
    loop {
        while let Some(r) = s.next().await {
            match r {
                Response::Attached { stdout, stderr } if !resumable => {
                    printed.starts_at(stdout, stderr);
                    resumable = true;
                }
                r => {
                    if let Some(code) = printed.attach_reply(r, &mut out, &mut err)? {
                        return Ok(code);
                    }
                }
            }
        }
        if !resumable {
            return Err(ClientError::Closed.into());
        }
        writeln!(
            err,
            "vmlet: the connection to vmletd broke; reconnecting to attach to {vm} again"
        )?;
        client = reconnect(socket).await?;
        printed.reconnected();
        s = client.stream(attach_request(&vm, false, true)).await?;
    }
}

/// How long `vmlet logs` keeps trying to reach a vmletd that went away
/// (a restart or an upgrade takes about a second).
const RECONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Prints a VM's log (and with `follow` what it gets next), across
/// restarts of vmletd: a connection that breaks before the log's end is
/// made again and the log read again, skipping what was already printed,
/// so every byte is printed once.
async fn logs(
    socket: &std::path::Path,
    mut client: Client,
    vm: String,
    follow: bool,
    timestamps: bool,
) -> Result<u8, CliError> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let mut printed = Resume::default();
    loop {
        let request = Request::Logs {
            vm: vm.clone(),
            follow,
        };
        let mut s = client.stream(request).await?;
        printed.reconnected();
        while let Some(r) = s.next().await {
            match r {
                Response::Output { .. } | Response::Dropped { .. } => {
                    printed.print(&r, &mut out, &mut err, timestamps)?
                }
                Response::StreamEnd { .. } => return Ok(0),
                Response::Error(e) => return Err(ClientError::Api(e).into()),
                _ => {}
            }
        }
        // The connection broke before the log's end.
        writeln!(
            err,
            "vmlet: the connection to vmletd broke; reconnecting to read the log on"
        )?;
        client = reconnect(socket).await?;
    }
}

/// Streams a container `vmlet run` started, and with `interactive` its
/// stdin, and returns its exit code, across restarts of vmletd. The attach
/// replays the log from its first byte, so when the connection breaks the
/// CLI attaches again, again from the first byte, and skips what it has
/// printed: every byte is printed once and the exit code is the
/// container's. Stdin is kept from the last byte the guest acknowledged
/// (`StdinAck`) up to what was sent, at most [`MAX_UNACKED_STDIN`] (reading
/// waits beyond that), and on a new connection is sent again from the
/// guest's count, the close after it: every byte reaches the container
/// once. This client created the VM, so it is its only stdin writer and
/// the guest's count is its own.
async fn follow_run(
    socket: &std::path::Path,
    mut client: Client,
    vm: String,
    first: vmlet_protocol::client::ResponseStream,
    interactive: bool,
) -> Result<u8, CliError> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let mut printed = Resume::default();
    let mut unacked = Unacked::default();
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut next = Some(first);
    loop {
        let (mut s, mut resent) = match next.take() {
            Some(s) => (s, true),
            None => {
                let s = client
                    .stream(attach_request(&vm, interactive, true))
                    .await?;
                // Stdin waits for the guest's count on this connection.
                (s, !interactive)
            }
        };
        printed.reconnected();
        // Whether this connection still works for sending; its stream
        // ending says the same.
        let mut sending = true;
        while sending {
            let reading = interactive && resent && !unacked.closed && unacked.has_room();
            tokio::select! {
                r = s.next() => match r {
                    None => break,
                    Some(r @ (Response::Output { .. } | Response::Dropped { .. })) => {
                        printed.print(&r, &mut out, &mut err, false)?
                    }
                    Some(Response::StdinAck { received }) => {
                        unacked.acknowledged(received);
                        if !resent {
                            resent = true;
                            sending = unacked.resend(&client, s.id).await;
                        }
                    }
                    Some(Response::StreamEnd { exit: Some(e) }) => return Ok(e.code.clamp(0, 255) as u8),
                    Some(Response::StreamEnd { exit: None }) => return Ok(0),
                    Some(Response::Error(e)) => return Err(ClientError::Api(e).into()),
                    Some(_) => {}
                },
                n = stdin.read(&mut buf), if reading => {
                    let n = n?;
                    if n == 0 {
                        unacked.closed = true;
                        sending = client.close_stdin(s.id).await.is_ok();
                    } else {
                        unacked.sent(&buf[..n]);
                        sending = client.stdin(s.id, buf[..n].to_vec()).await.is_ok();
                    }
                }
            }
        }
        writeln!(
            err,
            "vmlet: the connection to vmletd broke; reconnecting to attach to {vm} again"
        )?;
        client = reconnect(socket).await?;
    }
}

/// An attach to both output streams, with stdin or without. `vmlet run`
/// replays, the first time and after every reconnection: from the log's
/// first byte, so no output is missed however fast the container is, and
/// so a new connection knows where the last one was.
fn attach_request(vm: &str, stdin: bool, replay: bool) -> Request {
    Request::Attach(AttachSpec {
        vm: vm.to_owned(),
        stdin,
        stdout: true,
        stderr: true,
        replay,
    })
}

/// At most this much stdin is kept that the guest has not acknowledged: the
/// protocol's window, within which the agent takes stdin without waiting.
const MAX_UNACKED_STDIN: usize = vmlet_protocol::api::STDIN_WINDOW;

/// The stdin a client sent that the guest has not acknowledged yet, and
/// whether the client's stdin has ended.
#[derive(Debug, Default)]
struct Unacked {
    /// The stdin offset of `bytes[0]`.
    base: u64,
    bytes: std::collections::VecDeque<u8>,
    closed: bool,
}

impl Unacked {
    fn has_room(&self) -> bool {
        self.bytes.len() < MAX_UNACKED_STDIN
    }

    fn sent(&mut self, data: &[u8]) {
        self.bytes.extend(data);
    }

    /// The guest has taken `received` bytes of stdin in all.
    fn acknowledged(&mut self, received: u64) {
        let n = received
            .saturating_sub(self.base)
            .min(self.bytes.len() as u64);
        self.bytes.drain(..n as usize);
        // Past what this client sent, the count includes another writer's
        // bytes: this client's next byte is the guest's next.
        self.base = self.base.max(received);
    }

    /// Sends again, on `attach`, what the guest has not taken, then the
    /// close if stdin had ended; false if the connection broke meanwhile.
    async fn resend(&self, client: &Client, attach: vmlet_protocol::api::RequestId) -> bool {
        let (a, b) = self.bytes.as_slices();
        for part in [a, b] {
            for chunk in part.chunks(MAX_CHUNK) {
                if client.stdin(attach, chunk.to_vec()).await.is_err() {
                    return false;
                }
            }
        }
        !self.closed || client.close_stdin(attach).await.is_ok()
    }
}

/// What a client that reads a VM's log from its first byte, again on
/// every connection, has printed: per stream (stdout, stderr), the log
/// offset printed up to, and where the current connection's stream is.
#[derive(Debug, Default)]
struct Resume {
    printed: [u64; 2],
    at: [u64; 2],
}

impl Resume {
    /// A stream that starts after `stdout` and `stderr` bytes of the log
    /// (an attach that does not replay): what is before counts as printed.
    fn starts_at(&mut self, stdout: u64, stderr: u64) {
        self.printed = [stdout, stderr];
        self.at = [stdout, stderr];
    }

    /// Takes one reply of an attach stream: prints output, and returns the
    /// exit code (0 without one) at the stream's end, or the agent's error.
    fn attach_reply(
        &mut self,
        r: Response,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Result<Option<u8>, CliError> {
        match r {
            Response::Output { .. } | Response::Dropped { .. } => {
                self.print(&r, out, err, false)?;
                Ok(None)
            }
            Response::StreamEnd { exit: Some(e) } => Ok(Some(e.code.clamp(0, 255) as u8)),
            Response::StreamEnd { exit: None } => Ok(Some(0)),
            Response::Error(e) => Err(ClientError::Api(e).into()),
            _ => Ok(None),
        }
    }

    /// A new connection's stream starts again at the log's first byte.
    fn reconnected(&mut self) {
        self.at = [0, 0];
    }

    /// The part of `data`, the stream's next bytes, not printed yet (it
    /// counts as printed from here on).
    fn output<'a>(&mut self, stream: Stream, data: &'a [u8]) -> &'a [u8] {
        let i = match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        };
        let from = self.at[i];
        self.at[i] += data.len() as u64;
        if self.at[i] <= self.printed[i] {
            return &[];
        }
        let skip = self.printed[i].saturating_sub(from) as usize;
        self.printed[i] = self.at[i];
        &data[skip..]
    }

    /// Prints an `Output`'s part not printed yet (with `timestamps`, its
    /// time first) to `out` or `err`, or a `Dropped`'s notice of what was
    /// never printed to `err`; other replies are not its.
    fn print(
        &mut self,
        r: &Response,
        out: &mut dyn Write,
        err: &mut dyn Write,
        timestamps: bool,
    ) -> std::io::Result<()> {
        match r {
            Response::Output {
                stream,
                timestamp_ns,
                data,
            } => {
                let new = self.output(*stream, data);
                if new.is_empty() {
                    return Ok(());
                }
                let w: &mut dyn Write = match stream {
                    Stream::Stdout => &mut *out,
                    Stream::Stderr => &mut *err,
                };
                if timestamps {
                    write!(w, "{} ", format_ts(*timestamp_ns))?;
                }
                w.write_all(new)?;
                w.flush()
            }
            Response::Dropped { stdout, stderr } => {
                let missed = self.dropped(*stdout, *stderr);
                if missed != [0, 0] {
                    dropped_notice(err, missed[0], missed[1])?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Log rotation deleted these bytes before this stream read them;
    /// returns how many of them were never printed either.
    fn dropped(&mut self, stdout: u64, stderr: u64) -> [u64; 2] {
        let mut missed = [0u64; 2];
        for (i, n) in [stdout, stderr].into_iter().enumerate() {
            let end = self.at[i] + n;
            missed[i] = end.saturating_sub(self.printed[i].max(self.at[i]));
            self.at[i] = end;
            self.printed[i] = self.printed[i].max(end);
        }
        missed
    }
}

/// Connects to vmletd again, retrying for [`RECONNECT_PATIENCE`].
async fn reconnect(socket: &std::path::Path) -> Result<Client, CliError> {
    let deadline = tokio::time::Instant::now() + RECONNECT_PATIENCE;
    loop {
        match Client::connect(socket).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}

/// Says on stderr, as vmlet's own message, that the stream skipped output
/// log rotation had deleted.
fn dropped_notice(w: &mut dyn Write, stdout: u64, stderr: u64) -> std::io::Result<()> {
    writeln!(
        w,
        "vmlet: {} bytes of output were dropped by log rotation before they were read \
         ({stdout} of stdout, {stderr} of stderr); continuing with the oldest output kept",
        stdout + stderr
    )?;
    w.flush()
}

fn parse_signal(s: &str) -> Result<i32, CliError> {
    if let Ok(n) = s.parse::<i32>() {
        return Ok(n);
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    let n = match name.as_str() {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        _ => return Err(CliError::Usage(format!("unknown signal {s:?}"))),
    };
    Ok(n)
}

fn format_ts(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    format!("{secs}.{:09}", ns % 1_000_000_000)
}

fn print_ps(list: &[VmSummary]) {
    println!(
        "{:<16}  {:<12}  {:<28}  {:<24}  NAME",
        "ID", "IMAGE", "COMMAND", "STATUS"
    );
    for v in list {
        let mut cmd = v.argv.join(" ");
        if cmd.len() > 28 {
            cmd.truncate(25);
            cmd.push_str("...");
        }
        let status = match &v.exit {
            Some(e) => format!("{} ({})", v.state, e.code),
            None => v.state.to_string(),
        };
        println!(
            "{:<16}  {:<12}  {:<28}  {:<24}  {}",
            v.id,
            v.image,
            cmd,
            status,
            v.name.as_deref().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_pass_over_the_log_prints_only_what_the_first_did_not() {
        let mut r = Resume::default();
        assert_eq!(r.output(Stream::Stdout, b"hello "), b"hello ");
        assert_eq!(r.output(Stream::Stderr, b"oops"), b"oops");
        assert_eq!(r.output(Stream::Stdout, b"wor"), b"wor");
        // The connection breaks; the next one replays from the first byte,
        // in other chunks.
        r.reconnected();
        assert_eq!(r.output(Stream::Stdout, b"hel"), b"");
        assert_eq!(r.output(Stream::Stdout, b"lo wo"), b"");
        assert_eq!(r.output(Stream::Stdout, b"rld\n"), b"ld\n");
        assert_eq!(r.output(Stream::Stderr, b"oops!"), b"!");
        assert_eq!(r.output(Stream::Stdout, b"more"), b"more");
    }

    #[test]
    fn stdin_is_kept_from_the_guests_count() {
        let mut u = Unacked::default();
        u.sent(b"abcdef");
        u.acknowledged(2);
        assert_eq!(
            (u.base, u.bytes.iter().copied().collect::<Vec<_>>()),
            (2, b"cdef".to_vec())
        );
        u.sent(b"gh");
        // A count seen again, or one behind, changes nothing.
        u.acknowledged(2);
        u.acknowledged(1);
        assert_eq!(u.bytes.len(), 6);
        // Past everything sent (another writer's bytes): nothing is left.
        u.acknowledged(100);
        assert_eq!((u.base, u.bytes.len()), (100, 0));
        u.sent(b"ij");
        u.acknowledged(101);
        assert_eq!(
            (u.base, u.bytes.iter().copied().collect::<Vec<_>>()),
            (101, b"j".to_vec())
        );
        assert!(u.has_room());
        u.sent(&vec![0; MAX_UNACKED_STDIN]);
        assert!(!u.has_room());
    }

    #[test]
    fn bytes_rotated_away_count_once_as_missed() {
        let mut r = Resume::default();
        assert_eq!(r.dropped(10, 0), [10, 0]);
        assert_eq!(r.output(Stream::Stdout, b"abc"), b"abc");
        r.reconnected();
        // The new stream finds more deleted: the 10 already reported and 2
        // of the 3 printed, then the rest.
        assert_eq!(r.dropped(12, 4), [0, 4]);
        assert_eq!(r.output(Stream::Stdout, b"cde"), b"de");
    }
}
