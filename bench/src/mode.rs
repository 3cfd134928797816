//! The ways of starting a containerVM that the harness compares.

use serde::Serialize;

/// What [`Mode::PoolWarm`]'s members run before they are ready: another
/// program of the image than the measured command (`echo`), so the
/// warm-up shares with it what any busybox applet runs (the C library's
/// start-up, busybox's dispatch, the exit), not the applet itself.
pub const WARMUP: &str = "true";

/// One way of starting a containerVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// (a) What a user would script by hand: copy the image disk, start
    /// the vsock backend and QEMU, wait for the guest ([`crate::baseline`]).
    Baseline,
    /// (b) Through a vmletd with pre-staging off (`--no-prestage`): QEMU
    /// reads the kernel and initrd by path, nothing is held in memory.
    Cold,
    /// (c) Through a vmletd that pre-stages: the kernel and initrd in
    /// sealed memfds, and the image's layers mapped (`vmlet prestage`
    /// before the timed starts).
    Prestaged,
    /// (d) A hand-off to a booted guest of a warm pool (`--pool`).
    Pool,
    /// (d) A pool whose members ran [`WARMUP`] from the image before they
    /// were ready (`--pool-warmup`).
    #[value(name = "pool-warm")]
    #[serde(rename = "pool-warm")]
    PoolWarm,
    /// (e) A clone of a booted template VM (`--template`), where the agent
    /// offers it.
    Template,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 6] = [
        Mode::Baseline,
        Mode::Cold,
        Mode::Prestaged,
        Mode::Pool,
        Mode::PoolWarm,
        Mode::Template,
    ];

    /// Its name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Cold => "cold",
            Mode::Prestaged => "prestaged",
            Mode::Pool => "pool",
            Mode::PoolWarm => "pool-warm",
            Mode::Template => "template",
        }
    }

    /// Its name in the report.
    pub fn title(self) -> &'static str {
        match self {
            Mode::Baseline => "(a) baseline, by hand",
            Mode::Cold => "(b) cold",
            Mode::Prestaged => "(c) pre-staged",
            Mode::Pool => "(d) pool",
            Mode::PoolWarm => "(d) pool, warmed up",
            Mode::Template => "(e) template",
        }
    }

    /// Whether it starts through an agent of its own.
    pub fn uses_agent(self) -> bool {
        self != Mode::Baseline
    }

    /// The vmletd flags that make an agent of this mode. `pool_size` is
    /// the pool (and refill) size: the largest concurrency, so a batch
    /// never finds the pool empty.
    pub fn agent_args(self, image: &str, pool_size: usize) -> Vec<String> {
        match self {
            Mode::Baseline => Vec::new(),
            Mode::Cold => vec!["--no-prestage".into()],
            Mode::Prestaged => Vec::new(),
            Mode::Pool => vec![
                "--pool".into(),
                format!("{image}={pool_size}"),
                "--pool-refill".into(),
                pool_size.to_string(),
            ],
            Mode::PoolWarm => {
                let mut a = Mode::Pool.agent_args(image, pool_size);
                a.extend(["--pool-warmup".into(), format!("{image}={WARMUP}")]);
                a
            }
            Mode::Template => vec!["--template".into(), image.into()],
        }
    }

    /// Whether its starts are hand-offs to a warm pool's members.
    pub fn is_pool(self) -> bool {
        matches!(self, Mode::Pool | Mode::PoolWarm)
    }

    /// The vmletd option the mode needs, if any: a vmletd whose `--help`
    /// does not list it cannot run the mode.
    pub fn required_flag(self) -> Option<&'static str> {
        match self {
            Mode::Baseline | Mode::Prestaged => None,
            Mode::Cold => Some("--no-prestage"),
            Mode::Pool => Some("--pool"),
            Mode::PoolWarm => Some("--pool-warmup"),
            Mode::Template => Some("--template"),
        }
    }

    /// What `vmlet inspect` must say (`StartMode`) of a start in this mode,
    /// so a start that silently fell back (an empty pool booting cold) is
    /// caught rather than counted.
    pub fn start_mode(self) -> Option<&'static str> {
        match self {
            Mode::Baseline => None,
            Mode::Cold | Mode::Prestaged => Some("cold"),
            Mode::Pool | Mode::PoolWarm => Some("pool"),
            Mode::Template => Some("template"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_flags_per_mode() {
        assert_eq!(Mode::Cold.agent_args("busybox", 2), ["--no-prestage"]);
        assert!(Mode::Prestaged.agent_args("busybox", 2).is_empty());
        assert_eq!(
            Mode::Pool.agent_args("busybox", 2),
            ["--pool", "busybox=2", "--pool-refill", "2"]
        );
        assert_eq!(
            Mode::PoolWarm.agent_args("busybox", 2),
            [
                "--pool",
                "busybox=2",
                "--pool-refill",
                "2",
                "--pool-warmup",
                "busybox=true"
            ]
        );
        for m in Mode::ALL {
            assert_eq!(m.uses_agent(), m.start_mode().is_some());
            if let Some(f) = m.required_flag() {
                assert!(m.agent_args("busybox", 1).iter().any(|a| a == f), "{m:?}");
            }
        }
        let mut sorted = Mode::ALL;
        sorted.sort();
        assert_eq!(sorted, Mode::ALL, "report order is the enum's order");
    }
}
