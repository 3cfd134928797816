//! How the agent confines its VMMs: the user they run as and their cgroups
//! (`vmm_shim::confine` does the work), decided once at startup.
//!
//! The default user is [`DEFAULT_VMM_USER`], which `scripts/setup.sh`
//! creates; without it VMMs run as the agent's own user, and the agent says
//! so once. `--vmm-user root` (or the agent's own user) asks for that
//! explicitly.

use std::path::{Path, PathBuf};

use vmm_shim::confine::{check_access, Cgroups, Confinement, VmmUser};

use crate::config::Config;

/// The user VMMs run as when `--vmm-user` is not given, if it exists.
pub const DEFAULT_VMM_USER: &str = "vmlet-vmm";

/// Why confinement cannot be set up as asked.
#[derive(Debug, thiserror::Error)]
pub enum ConfinementError {
    /// `--vmm-user` names nobody.
    #[error("--vmm-user {0:?} is no user of this host")]
    NoSuchUser(String),
    /// The user database or the cgroup hierarchy failed us.
    #[error(transparent)]
    Confine(#[from] vmm_shim::confine::Error),
    /// The VMM's user cannot reach what its VMs need.
    #[error(
        "the VMM's user {user} cannot reach {what}: {why}; make the directories on the way \
         searchable by it (chmod o+x) or choose another --state-dir"
    )]
    Access {
        /// The user.
        user: String,
        /// What it cannot reach.
        what: String,
        /// Which directory or file stands in the way.
        why: String,
    },
}

/// Resolves the VMM user and detects the cgroups, as `config` asks.
/// Logs what was chosen, and warns when VMMs end up unconfined by uid or
/// without cgroups without being asked to.
pub fn resolve(config: &Config) -> Result<Confinement, ConfinementError> {
    let (user, user_note) = match &config.vmm_user {
        Some(name) => {
            let u =
                VmmUser::lookup(name)?.ok_or_else(|| ConfinementError::NoSuchUser(name.clone()))?;
            let note = u
                .credentials
                .are_own()
                .then(|| format!("--vmm-user {} is the agent's own user", u.name));
            (Some(u), note)
        }
        None => match VmmUser::lookup(DEFAULT_VMM_USER)? {
            Some(u) => (Some(u), None),
            None => (
                None,
                Some(format!(
                    "there is no user {DEFAULT_VMM_USER} (scripts/setup.sh creates it; \
                     --vmm-user names another)"
                )),
            ),
        },
    };
    let cgroups = Cgroups::detect(config.cgroups, config.cgroup_parent.as_deref())?;
    let c = Confinement {
        user,
        user_note,
        cgroups,
        memory_overhead_mib: config.vmm_memory_overhead_mib,
        uid_base: config.vmm_uid_base,
    };
    if c.credentials().is_none() {
        if config.vmm_user.is_some() {
            tracing::info!("VMMs run as the agent's own user, as --vmm-user asks");
        } else {
            tracing::warn!(
                "VMMs run as the agent's own user: {}",
                c.user_note.as_deref().unwrap_or_default()
            );
        }
    }
    if let Some(why) = c.cgroups.why_off() {
        if config.cgroups == vmm_shim::CgroupMode::Off {
            tracing::info!("VMs get no cgroups: {why}");
        } else {
            tracing::warn!("VMs get no cgroups: {why}");
        }
    }
    tracing::info!("VMM confinement: {}", c.describe());
    Ok(c)
}

/// Checks that the VMM's user can reach what every VM needs from the state
/// directory: the VMs' directory, the image store's layers and the blank
/// template every writable disk is backed by. Run after the agent made
/// them, before any VM starts: a start would fail on it later, less clearly.
pub fn check_state_access(config: &Config, c: &Confinement) -> Result<(), ConfinementError> {
    let Some(cred) = c.credentials() else {
        return Ok(());
    };
    let cred = &cred;
    let user = c.name_of(cred);
    let checks: [(PathBuf, u32); 3] = [
        (config.vms_dir(), 1),
        (config.images_dir().join("layers"), 1),
        (config.images_dir().join("rw-template.ext4"), 4),
    ];
    for (p, want) in checks {
        check_access(&p, cred, want).map_err(|why| ConfinementError::Access {
            user: user.clone(),
            what: display(&p),
            why,
        })?;
    }
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
