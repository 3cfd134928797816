//! vmletd: the per-host containerVM agent.
//!
//! The agent keeps a registry of VMs ([`vm`]), starts each in its own VMM
//! through `vmm-shim` ([`start`]), carries every guest's stdio through the
//! log store ([`logstore`]) to whoever is attached, and serves the engine
//! over a Unix socket ([`server`]).
//!
//! Log levels: `error` = a requested action failed; `warn` = something went
//! wrong that the agent recovered from; `info` = rare state changes (a VM
//! started or exited, the agent started); `debug` = per-request detail.

pub mod agent;
pub mod config;
pub mod confinement;
pub mod ids;
pub mod image;
pub mod initrd;
pub mod kernel;
pub mod logstore;
pub mod pool;
pub mod ratelimit;
pub mod server;
pub mod start;
pub mod state;
pub mod stdin;
pub mod templates;
pub mod vm;

pub use agent::Agent;
pub use config::Config;
