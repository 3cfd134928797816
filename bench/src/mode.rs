//! The ways of starting a containerVM that the harness compares.

use serde::Serialize;

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
    /// (e) A clone of a booted template VM (`--template`), where the agent
    /// offers it.
    Template,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 5] = [
        Mode::Baseline,
        Mode::Cold,
        Mode::Prestaged,
        Mode::Pool,
        Mode::Template,
    ];

    /// Its name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Cold => "cold",
            Mode::Prestaged => "prestaged",
            Mode::Pool => "pool",
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
            Mode::Template => vec!["--template".into(), image.into()],
        }
    }

    /// The vmletd option the mode needs, if any: a vmletd whose `--help`
    /// does not list it cannot run the mode.
    pub fn required_flag(self) -> Option<&'static str> {
        match self {
            Mode::Baseline | Mode::Prestaged => None,
            Mode::Cold => Some("--no-prestage"),
            Mode::Pool => Some("--pool"),
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
            Mode::Pool => Some("pool"),
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
