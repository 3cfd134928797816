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
#[command(version)]
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
    /// Most pool members booting at once.
    #[arg(long, default_value_t = 1)]
    pool_refill: usize,
}

#[derive(Debug, thiserror::Error)]
enum ArgsError {
    #[error("--socket-mode {0:?} is not an octal permission mode")]
    Mode(String),
    #[error("--accel must be auto, kvm or tcg, not {0:?}")]
    Accel(String),
    #[error("--boot-timeout must be a positive number of seconds")]
    BootTimeout,
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
        c.pool_refill = a.pool_refill;
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
    let vmm = Arc::new(vmm_shim::Qemu::new()?);
    let socket = config.socket.clone();
    let mode = config.socket_mode;
    let agent = tokio::task::block_in_place(|| Agent::new(config, vmm))?;
    agent.adopt_running().await;
    vmlet_agent::pool::start(&agent);
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
    // Pool members are not containers and no later agent adopts them.
    vmlet_agent::pool::drain(&pool_agent).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
