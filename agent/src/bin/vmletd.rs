//! vmletd: the per-host containerVM agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use vmlet_agent::kernel::GuestKernel;
use vmlet_agent::{server, Agent, Config};

/// The per-host containerVM agent: starts containers in their own VMs and
/// serves the engine over a Unix socket.
#[derive(Debug, Parser)]
#[command(version, after_help = CONFINEMENT_HELP)]
struct Args {
    /// Where VMs, images, logs and generated guest files are kept.
    #[arg(long, env = "VMLET_STATE_DIR", default_value = "/var/lib/vmlet/state")]
    state_dir: PathBuf,
    /// The API socket.
    #[arg(long, env = "VMLET_SOCKET", default_value = "/run/vmlet/vmlet.sock")]
    socket: PathBuf,
    /// Permission bits of the API socket, in octal.
    #[arg(long, default_value = "600")]
    socket_mode: String,
    /// The guest kernel's directory (vmlinux, kernel.release, config and,
    /// for a kernel with modular drivers, modules/). Default: the tailored
    /// kernel of scripts/build-kernel.sh when it is installed
    /// (/var/lib/vmlet/kernels/tailored), else Debian's from
    /// scripts/setup-guest.sh (/var/lib/vmlet/guest).
    #[arg(long, visible_alias = "kernel-dir", env = "VMLET_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// The static tether binary (the guest's init); defaults to the one
    /// beside this executable or in the workspace's musl build.
    #[arg(long, env = "VMLET_TETHER")]
    tether: Option<PathBuf>,
    /// Accelerator: auto (KVM where hardware virtualization works, else
    /// TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Default guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Default vCPUs per guest.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Seconds a guest may take to boot to its tether's hello.
    #[arg(long, default_value_t = 60.0)]
    boot_timeout: f64,
    /// Most VMs starting or running at once.
    #[arg(long, default_value_t = 32)]
    max_vms: usize,
    /// Extra kernel command line for every guest.
    #[arg(long, default_value = "")]
    kernel_cmdline: String,
    /// Most guest memory (MiB) of all VMs at once; default three quarters
    /// of the host's memory.
    #[arg(long)]
    max_total_memory: Option<u64>,
    /// Also admit this user id on the API socket (root and the agent's own
    /// user always are). Repeatable.
    #[arg(long = "allow-uid")]
    allow_uids: Vec<u32>,
    /// Also admit members of this group id on the API socket. Repeatable.
    #[arg(long = "allow-gid")]
    allow_gids: Vec<u32>,
    /// Keep COUNT guests of IMAGE booted ahead of demand (IMAGE=COUNT), so
    /// a start is a hand-off. Repeatable.
    #[arg(long = "pool")]
    pools: Vec<vmlet_agent::pool::PoolSpec>,
    /// Have each member of IMAGE's pool run COMMAND once, from the image,
    /// before it is ready (IMAGE=COMMAND; COMMAND split as a shell would,
    /// nothing expanded). Under emulation this spares the container's start
    /// the first run of the image's code; it runs the image's code before
    /// any start asked for it, in a scratch copy of the root whose writes
    /// are thrown away, and everything it started is killed before the
    /// member is handed out. Repeatable, once per pool.
    #[arg(long = "pool-warmup")]
    pool_warmups: Vec<vmlet_agent::pool::PoolWarmup>,
    /// Most pool members booting at once.
    #[arg(long, default_value_t = 1)]
    pool_refill: usize,
    /// Run every VM's QEMU and vsock backend as this user (a name or uid).
    /// Default: vmlet-vmm if it exists (scripts/setup.sh creates it), else
    /// the agent's own user, with a warning. `--vmm-user root` (the
    /// agent's own user) asks for no change of user.
    #[arg(long, env = "VMLET_VMM_USER")]
    vmm_user: Option<String>,
    /// Cgroups for VMs: auto (v2 where its memory controller is available,
    /// else v1, else none, with a warning), v2, v1 (either fails the start
    /// of vmletd when unusable) or off.
    #[arg(long, default_value = "auto")]
    cgroups: String,
    /// The cgroup each VM's cgroup is made in: relative to vmletd's own
    /// cgroup, or absolute from the hierarchy's root. Default: /vmlet on v2,
    /// vmlet on v1. It belongs to this vmletd alone: what is in it and not
    /// a VM of this agent is removed at startup.
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// Memory (MiB) each VM's cgroup allows beyond the guest's memory, for
    /// QEMU itself (its heap, TCG's translation cache, I/O) and the vsock
    /// backend.
    #[arg(long, default_value_t = vmm_shim::confine::DEFAULT_MEMORY_OVERHEAD_MIB)]
    vmm_memory_overhead: u64,
    /// Give each VM's QEMU and vsock backend a uid and gid of their own,
    /// BASE + the VM's vsock CID, instead of sharing --vmm-user's (they keep
    /// its supplementary groups, such as kvm), so VMMs are kept apart from
    /// each other too. Reserve a range no user or group uses (as
    /// /etc/subuid does), at least BASE..BASE+65535.
    #[arg(long, value_name = "BASE")]
    vmm_uid_base: Option<u32>,
    /// Most bytes of output each VM's log keeps (a number of bytes, or with
    /// a K, M or G suffix: binary units); 0 keeps everything. Beyond it the
    /// oldest part is deleted; a reader that had not read it yet is told how
    /// many bytes it missed.
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    log_max_size: String,
    /// How many files each VM's log is divided into: rotation deletes the
    /// oldest, 1/N of the cap, at a time.
    #[arg(long, default_value_t = 4, value_name = "N")]
    log_max_files: usize,
    /// Seconds an API connection may sit idle (no request in flight, no
    /// stream such as attach, logs -f, events or wait) before vmletd closes
    /// it with a timed-out error; 0 never closes one. A connection must
    /// say hello within 10 s (or this, if shorter) whatever this is.
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    idle_timeout: f64,
    /// Boot one guest of IMAGE once, snapshot it, and start every VM of
    /// IMAGE (at the default memory and vCPUs) as a copy-on-write clone of
    /// the snapshot instead of booting it. Repeatable.
    #[arg(long = "template", value_name = "IMAGE", value_parser = parse_template)]
    templates: Vec<String>,
    /// Do not pre-stage: QEMU reads the guest kernel and initrd from disk
    /// on every start, and `vmlet prestage` is refused. For measuring what
    /// pre-staging saves.
    #[arg(long)]
    no_prestage: bool,
}

fn parse_template(s: &str) -> Result<String, String> {
    vmlet_agent::ids::validate_image(s).map_err(|e| e.message)?;
    Ok(s.to_string())
}

const CONFINEMENT_HELP: &str = "\
Confinement: every VM's QEMU and vsock backend run under QEMU's seccomp
sandbox, as the --vmm-user (or, with --vmm-uid-base, a uid of their own per
VM; dropped before exec: QEMU never holds root), in a cgroup of their own
limited to the guest's memory + --vmm-memory-overhead (no swap), its vCPUs +
25 % of a CPU and 512 tasks. An OOM kill ends the VM with exit code 137 and
says so in `vmlet inspect`, which also shows the user, the cgroup and its
limits. See docs/confinement.md.";

#[derive(Debug, thiserror::Error)]
enum ArgsError {
    #[error("--socket-mode {0:?} is not an octal permission mode")]
    Mode(String),
    #[error("--accel must be auto, kvm or tcg, not {0:?}")]
    Accel(String),
    #[error("--boot-timeout must be a positive number of seconds")]
    BootTimeout,
    #[error("--log-max-size {0:?} is not a size (bytes, or a number with K, M or G)")]
    LogSize(String),
    #[error("invalid log limits: {0}")]
    LogLimits(String),
    #[error("--idle-timeout must be a number of seconds, 0 for never")]
    IdleTimeout,
    #[error("{0}")]
    PoolWarmup(String),
    #[error("--cgroups {0}")]
    Cgroups(String),
    #[error("--vmm-uid-base must be from 1000 to {max}, so that BASE + any CID is an ordinary id")]
    UidBase { max: u32 },
}

impl TryFrom<Args> for Config {
    type Error = ArgsError;

    fn try_from(a: Args) -> Result<Config, ArgsError> {
        let tether = a.tether.unwrap_or_else(Config::default_tether);
        let guest_dir = a.guest_dir.unwrap_or_else(GuestKernel::default_dir);
        let mut c = Config::new(a.state_dir, a.socket, guest_dir, tether);
        c.socket_mode = u32::from_str_radix(&a.socket_mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or(ArgsError::Mode(a.socket_mode))?;
        if a.accel != "auto" {
            c.accel = a.accel.parse().map_err(|_| ArgsError::Accel(a.accel))?;
        }
        c.memory_mib = a.memory;
        c.vcpus = a.vcpus;
        if !(a.boot_timeout > 0.0 && a.boot_timeout.is_finite()) {
            return Err(ArgsError::BootTimeout);
        }
        c.boot_timeout = Duration::from_secs_f64(a.boot_timeout);
        c.max_vms = a.max_vms;
        c.extra_cmdline = a.kernel_cmdline;
        if let Some(m) = a.max_total_memory {
            c.max_total_memory_mib = m;
        }
        c.allowed_uids = a.allow_uids;
        c.allowed_gids = a.allow_gids;
        c.pools = a.pools;
        vmlet_agent::pool::attach_warmups(&mut c.pools, a.pool_warmups)
            .map_err(ArgsError::PoolWarmup)?;
        c.pool_refill = a.pool_refill;
        c.templates = a.templates;
        let size = vmlet_agent::config::parse_size(&a.log_max_size)
            .ok_or_else(|| ArgsError::LogSize(a.log_max_size.clone()))?;
        c.log_limits = vmlet_agent::logstore::LogLimits::new(size, a.log_max_files)
            .map_err(ArgsError::LogLimits)?;
        c.idle_timeout = if a.idle_timeout == 0.0 {
            Duration::MAX
        } else if a.idle_timeout > 0.0 {
            Duration::try_from_secs_f64(a.idle_timeout).map_err(|_| ArgsError::IdleTimeout)?
        } else {
            return Err(ArgsError::IdleTimeout);
        };
        c.vmm_user = a.vmm_user;
        c.cgroups = a.cgroups.parse().map_err(ArgsError::Cgroups)?;
        c.cgroup_parent = a.cgroup_parent;
        c.vmm_memory_overhead_mib = a.vmm_memory_overhead;
        if let Some(base) = a.vmm_uid_base {
            // Ids near 2^32 are the kernel's overflow and "no id" values.
            let max = u32::MAX - (1 << 20);
            if !(1000..=max).contains(&base) {
                return Err(ArgsError::UidBase { max });
            }
            c.vmm_uid_base = Some(base);
        }
        c.prestage = !a.no_prestage;
        Ok(c)
    }
}

fn print_chain(e: &dyn std::error::Error) {
    eprintln!("vmletd: {}", vmlet_agent::start::error_chain(e));
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMLET_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            print_chain(&e);
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            print_chain(&e);
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_chain(e.as_ref());
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let confinement = vmlet_agent::confinement::resolve(&config)?;
    let vmm = Arc::new(vmm_shim::Qemu::confined(confinement.clone())?);
    if config.accel == vmm_shim::Accel::Tcg {
        // The host's TSC rate, measured once now rather than inside the
        // first start (KVM guests are given no timer hints).
        vmm_shim::qemu::tcg_timer_hints();
    }
    let socket = config.socket.clone();
    let mode = config.socket_mode;
    let agent = tokio::task::block_in_place(|| Agent::new(config, vmm))?;
    vmlet_agent::confinement::check_state_access(&agent.config, &confinement)?;
    agent.adopt_running().await;
    // What an earlier agent left in the cgroups and no VM owns any more.
    agent.vmm.reclaim(&agent.running_ids()).await;
    vmlet_agent::pool::start(&agent);
    vmlet_agent::templates::start(&agent);
    let listener = server::bind(&socket, mode).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot bind {}: {e}", socket.display()))
    })?;
    tracing::info!(
        socket = %socket.display(),
        accel = %agent.config.accel,
        kernel = %agent.kernel.describe(),
        "vmletd ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let pool_agent = agent.clone();
    tokio::select! {
        r = server::serve(agent, listener) => r?,
        _ = term.recv() => tracing::info!("SIGTERM: shutting down; VMs keep running"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down; VMs keep running"),
    }
    // Pool members and template VMs are not containers and no later
    // agent adopts them.
    vmlet_agent::templates::shut_down(&pool_agent).await;
    vmlet_agent::pool::drain(&pool_agent).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
