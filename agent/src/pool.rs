//! Warm pools: guests booted ahead of demand, so a start is a hand-off.
//!
//! A pool keeps `target` guests of one image (at the agent's default memory
//! and vCPUs) booted, with their layer disks and a fresh writable disk
//! attached and the root filesystem already mounted by the tether
//! (`HostMessage::Prepare`). A create that matches takes one: the VM keeps
//! the pooled guest's id, directory and CID, and its start only sends the
//! spec. A VM is never reused: a taken member is gone from the pool, which
//! refills in the background, at most `refill` boots at once. When the pool
//! is empty a start boots cold.
//!
//! Members whose image changed (re-tagged, removed) are discarded, never
//! handed out. Members count against the host's guest-memory budget.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};
use vmlet_protocol::api::PoolInfo;

use crate::agent::Agent;
use crate::start::Prebooted;
use crate::vm::Vm;
use vmm_shim::VmHandle;

/// `IMAGE=N`: keep N guests of IMAGE ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// The image name.
    pub image: String,
    /// How many guests to keep ready.
    pub size: u32,
    /// A command each member runs once, from the image, before it is
    /// ready (see `tether/src/warmup.rs`); `None` runs nothing.
    pub warmup: Option<Vec<String>>,
}

impl std::str::FromStr for PoolSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (image, n) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("pool {s:?} is not IMAGE=COUNT"))?;
        let size = n
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= 64)
            .ok_or_else(|| format!("pool size {n:?} is not a number from 0 to 64"))?;
        crate::ids::validate_image(image).map_err(|e| e.message)?;
        Ok(PoolSpec {
            image: image.to_string(),
            size,
            warmup: None,
        })
    }
}

/// `IMAGE=COMMAND`: the warm-up of IMAGE's pool (`vmletd --pool-warmup`).
/// COMMAND is split into words as a POSIX shell would, without running
/// one: quotes and backslashes group, nothing is expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolWarmup {
    /// The image name, as its `--pool` names it.
    pub image: String,
    /// The command and its arguments.
    pub argv: Vec<String>,
}

impl std::str::FromStr for PoolWarmup {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (image, command) = s
            .split_once('=')
            .ok_or_else(|| format!("pool warm-up {s:?} is not IMAGE=COMMAND"))?;
        crate::ids::validate_image(image).map_err(|e| e.message)?;
        let argv = shell_words::split(command)
            .map_err(|e| format!("pool warm-up command {command:?}: {e}"))?;
        if argv.is_empty() {
            return Err(format!("pool warm-up {s:?} has no command"));
        }
        Ok(PoolWarmup {
            image: image.to_string(),
            argv,
        })
    }
}

/// Gives each warm-up to the pool of its image. Refuses a warm-up for an
/// image without a pool, and two for one pool.
pub fn attach_warmups(pools: &mut [PoolSpec], warmups: Vec<PoolWarmup>) -> Result<(), String> {
    for w in warmups {
        let Some(pool) = pools.iter_mut().find(|p| p.image == w.image) else {
            return Err(format!(
                "--pool-warmup names {:?}, which has no --pool",
                w.image
            ));
        };
        if pool.warmup.is_some() {
            return Err(format!("--pool-warmup names {:?} twice", w.image));
        }
        pool.warmup = Some(w.argv);
    }
    Ok(())
}

/// One pool's members and counters.
#[derive(Debug)]
struct Pool {
    spec: PoolSpec,
    image_id: Mutex<Option<String>>,
    ready: Mutex<VecDeque<(Arc<Vm>, Prebooted)>>,
    filling: AtomicU64,
    /// Members taken whose refill waits for their start (see
    /// [`REFILL_HOLD`]); counted as present meanwhile.
    held: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    failures: AtomicU64,
    wake: Notify,
}

/// Every pool of the agent.
#[derive(Debug)]
pub struct Pools {
    pools: Vec<Arc<Pool>>,
    refill: Arc<Semaphore>,
    memory_mib: u32,
    vcpus: u32,
    /// Set by [`drain`]: no member is booted or handed out any more.
    closed: AtomicBool,
}

impl Pools {
    /// Pools for `specs`, booting at most `refill` members at once.
    pub fn new(specs: &[PoolSpec], refill: usize, memory_mib: u32, vcpus: u32) -> Self {
        Pools {
            pools: specs
                .iter()
                .filter(|s| s.size > 0)
                .map(|s| {
                    Arc::new(Pool {
                        spec: s.clone(),
                        image_id: Mutex::new(None),
                        ready: Mutex::new(VecDeque::new()),
                        filling: AtomicU64::new(0),
                        held: AtomicU64::new(0),
                        hits: AtomicU64::new(0),
                        misses: AtomicU64::new(0),
                        failures: AtomicU64::new(0),
                        wake: Notify::new(),
                    })
                })
                .collect(),
            refill: Arc::new(Semaphore::new(refill.max(1))),
            memory_mib,
            vcpus,
            closed: AtomicBool::new(false),
        }
    }

    /// Takes a ready member booted from `image_id` with this memory and
    /// vCPU count, if there is one; counts a miss for a matching pool that
    /// is empty.
    pub fn take(
        &self,
        image_id: &str,
        memory_mib: u32,
        vcpus: u32,
    ) -> Option<(Arc<Vm>, Prebooted)> {
        if memory_mib != self.memory_mib || vcpus != self.vcpus {
            return None;
        }
        for p in &self.pools {
            if p.image_id.lock().as_deref() != Some(image_id) {
                continue;
            }
            let got = p.ready.lock().pop_front();
            match got {
                Some(m) => {
                    p.hits.fetch_add(1, Ordering::Relaxed);
                    hold_refill(p, m.0.clone());
                    return Some(m);
                }
                None => {
                    p.misses.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        None
    }

    /// Guest memory held by pool members (ready and booting), MiB.
    pub fn memory_held_mib(&self) -> u64 {
        self.pools
            .iter()
            .map(|p| {
                (p.ready.lock().len() as u64 + p.filling.load(Ordering::Relaxed))
                    * u64::from(self.memory_mib)
            })
            .sum()
    }

    /// Pool members booting now, over all pools.
    pub fn filling(&self) -> usize {
        self.pools
            .iter()
            .map(|p| p.filling.load(Ordering::Relaxed) as usize)
            .sum()
    }

    /// CIDs of pool members, so no VM is given one of them.
    pub fn cids(&self) -> Vec<u32> {
        self.pools
            .iter()
            .flat_map(|p| {
                p.ready
                    .lock()
                    .iter()
                    .map(|(vm, _)| vm.with(|i| i.rec.cid))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// What `vmlet pool` shows.
    pub fn info(&self) -> Vec<PoolInfo> {
        self.pools
            .iter()
            .map(|p| {
                let ready = p.ready.lock().len() as u32;
                let filling = p.filling.load(Ordering::Relaxed) as u32;
                PoolInfo {
                    image: p.spec.image.clone(),
                    image_id: p.image_id.lock().clone(),
                    memory_mib: self.memory_mib,
                    vcpus: self.vcpus,
                    target: p.spec.size,
                    ready,
                    filling,
                    memory_held_mib: u64::from(ready + filling) * u64::from(self.memory_mib),
                    hits: p.hits.load(Ordering::Relaxed),
                    misses: p.misses.load(Ordering::Relaxed),
                    failures: p.failures.load(Ordering::Relaxed),
                    warmup: p.spec.warmup.clone(),
                }
            })
            .collect()
    }
}

/// How long a taken member's refill may wait for the start it was taken
/// for. Under TCG a boot takes a core for about a second: one that begins
/// beside a hand-off slows the container's first output (both cores busy:
/// the guest's vCPU and the refill's QEMU, with the agent and the vsock
/// backends between them), while a refill that waits the ~20 ms until that
/// output delays the pool by as much.
const REFILL_HOLD: Duration = Duration::from_millis(250);

/// Wakes `pool`'s refill for the member `vm` once `vm`'s process has
/// output something or ended, at most [`REFILL_HOLD`] after the take.
fn hold_refill(pool: &Arc<Pool>, vm: Arc<Vm>) {
    pool.held.fetch_add(1, Ordering::Relaxed);
    let pool = pool.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFILL_HOLD, vm.first_output_or_end()).await;
        pool.held.fetch_sub(1, Ordering::Relaxed);
        pool.wake.notify_one();
    });
}

/// Starts one refill loop per pool.
pub fn start(agent: &Arc<Agent>) {
    for p in &agent.pools.pools {
        tokio::spawn(refill_loop(agent.clone(), p.clone()));
    }
}

async fn refill_loop(agent: Arc<Agent>, pool: Arc<Pool>) {
    // A pooled image is a hot image: keep its layers in memory (unless
    // pre-staging is off altogether).
    if agent.config.prestage {
        if let Err(e) = agent.prestage(&pool.spec.image).await {
            tracing::warn!(image = %pool.spec.image, error = %e, "cannot pre-stage the pool's image");
        }
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        if agent.pools.closed.load(Ordering::SeqCst) {
            return;
        }
        // The image may have been re-tagged or removed: members of another
        // image are discarded, never handed out.
        let current = agent.images.resolve(&pool.spec.image).ok().map(|i| i.id);
        let stale: Vec<_> = {
            let mut id = pool.image_id.lock();
            if *id != current {
                *id = current.clone();
                pool.ready.lock().drain(..).collect()
            } else {
                Vec::new()
            }
        };
        for (vm, pre) in stale {
            tracing::info!(vm = %vm.id, image = %pool.spec.image, "discarding a pool member of an image that changed");
            discard(&agent, vm, pre).await;
        }
        if current.is_none() {
            tracing::warn!(image = %pool.spec.image, "pool image is not in the store; not filling the pool");
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        let want = u64::from(pool.spec.size);
        let have = pool.ready.lock().len() as u64
            + pool.filling.load(Ordering::Relaxed)
            + pool.held.load(Ordering::Relaxed);
        let (_, memory) = agent.live_usage();
        let fits = memory + u64::from(agent.config.memory_mib) <= agent.config.max_total_memory_mib;
        if have < want && fits {
            let Ok(permit) = agent.pools.refill.clone().acquire_owned().await else {
                return;
            };
            pool.filling.fetch_add(1, Ordering::Relaxed);
            let (agent2, pool2) = (agent.clone(), pool.clone());
            let ok = tokio::spawn(async move {
                let r = fill_one(&agent2, &pool2).await;
                pool2.filling.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
                pool2.wake.notify_one();
                r
            });
            // One boot at a time per loop turn; failures back off.
            match ok.await {
                Ok(true) => backoff = Duration::from_secs(1),
                _ => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
            continue;
        }
        // Woken when a member is taken; re-checked now and then for image
        // changes and memory freed by exited VMs.
        let _ = tokio::time::timeout(Duration::from_secs(2), pool.wake.notified()).await;
    }
}

async fn fill_one(agent: &Arc<Agent>, pool: &Arc<Pool>) -> bool {
    let (vm, warmup) = match agent.create_pool_member(&pool.spec.image, pool.spec.warmup.as_deref())
    {
        Ok(m) => m,
        Err(e) => {
            pool.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(image = %pool.spec.image, error = %e, "cannot create a pool member");
            return false;
        }
    };
    match crate::start::preboot(agent, &vm, warmup).await {
        Ok(pre) => {
            let image_ok =
                pool.image_id.lock().as_deref() == vm.with(|i| i.rec.image_id.clone()).as_deref();
            // Checked under the ready lock, which drain takes after
            // closing: a member is either in the queue drain empties or
            // discarded here.
            let mut ready = pool.ready.lock();
            if image_ok && !agent.pools.closed.load(Ordering::SeqCst) {
                tracing::debug!(vm = %vm.id, image = %pool.spec.image, "pool member ready");
                watch_member(agent, pool, &vm, pre.handle());
                ready.push_back((vm, pre));
            } else {
                drop(ready);
                discard(agent, vm, pre).await;
            }
            true
        }
        Err(e) => {
            pool.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(vm = %vm.id, image = %pool.spec.image, error = %e, "a pool member failed to boot");
            agent.drop_pool_member(&vm);
            false
        }
    }
}

/// Takes the member `vm` out of the ready queue if its VMM exits while it
/// waits there (killed, crashed, out of memory), so no start is handed a
/// dead guest: it is discarded, counted as a failure, and the pool
/// refills. A member taken before that is its VM's to watch.
fn watch_member(agent: &Arc<Agent>, pool: &Arc<Pool>, vm: &Arc<Vm>, handle: Arc<dyn VmHandle>) {
    let (agent, pool, id) = (agent.clone(), pool.clone(), vm.id.clone());
    tokio::spawn(async move {
        let exit = handle.wait().await;
        let dead = {
            let mut ready = pool.ready.lock();
            let at = ready.iter().position(|(v, _)| v.id == id);
            at.and_then(|i| ready.remove(i))
        };
        if let Some((vm, pre)) = dead {
            pool.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(vm = %vm.id, image = %pool.spec.image, exit = %exit.description, "a ready pool member's VMM exited; discarding it");
            discard(&agent, vm, pre).await;
            pool.wake.notify_one();
        }
    });
}

async fn discard(agent: &Arc<Agent>, vm: Arc<Vm>, pre: Prebooted) {
    pre.discard().await;
    agent.drop_pool_member(&vm);
}

/// Ends every member, ready or still booting (the agent is shutting down:
/// pool members are not containers and nobody will adopt them).
///
/// Refills stop first. A member still booting is killed through its record
/// and its refill then ends by itself (a boot that outruns the kill is
/// discarded when it is prepared); drain waits for them, at most
/// `DRAIN_PATIENCE`, so no member outlives the agent.
pub async fn drain(agent: &Arc<Agent>) {
    agent.pools.closed.store(true, Ordering::SeqCst);
    for p in &agent.pools.pools {
        p.wake.notify_waiters();
        let members: Vec<_> = p.ready.lock().drain(..).collect();
        for (vm, pre) in members {
            discard(agent, vm, pre).await;
        }
    }
    let deadline = tokio::time::Instant::now() + DRAIN_PATIENCE;
    loop {
        // Members still booting are found by their records.
        agent.end_pool_members();
        let filling: u64 = agent
            .pools
            .pools
            .iter()
            .map(|p| p.filling.load(Ordering::SeqCst))
            .sum();
        if filling == 0 || tokio::time::Instant::now() >= deadline {
            if filling > 0 {
                tracing::warn!(
                    filling,
                    "pool members were still booting when the agent stopped"
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a stopping agent waits for pool members still booting.
const DRAIN_PATIENCE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use vmlet_protocol::api::{Phase, VmState};

    fn pool() -> Arc<Pool> {
        let spec = PoolSpec {
            image: "busybox".into(),
            size: 1,
            warmup: None,
        };
        Pools::new(&[spec], 1, 256, 1).pools[0].clone()
    }

    /// Whether the refill loop was woken (takes the wake-up).
    async fn woken(p: &Pool) -> bool {
        tokio::time::timeout(Duration::from_millis(1), p.wake.notified())
            .await
            .is_ok()
    }

    /// A taken member's refill waits for its first output, and counts the
    /// member as present until then.
    #[tokio::test(start_paused = true)]
    async fn a_refill_waits_for_the_taken_members_first_output() {
        let d = tempfile::tempdir().unwrap();
        let p = pool();
        let vm = crate::vm::tests::test_vm(d.path());
        hold_refill(&p, vm.clone());
        tokio::time::sleep(REFILL_HOLD / 2).await;
        assert_eq!(p.held.load(Ordering::Relaxed), 1);
        assert!(!woken(&p).await, "refilled before the first output");
        vm.phase(Phase::Accepted);
        vm.phase(Phase::FirstOutput);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(p.held.load(Ordering::Relaxed), 0);
        assert!(woken(&p).await, "no refill after the first output");
    }

    /// A member whose process is silent, or whose VM ends, holds its
    /// refill back no longer than `REFILL_HOLD`, or than its end.
    #[tokio::test(start_paused = true)]
    async fn a_refill_waits_no_longer_than_the_hold_or_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = pool();
        let silent = crate::vm::tests::test_vm(&d.path().join("a"));
        hold_refill(&p, silent);
        tokio::time::sleep(REFILL_HOLD - Duration::from_millis(10)).await;
        assert!(!woken(&p).await, "refilled before the hold ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(p.held.load(Ordering::Relaxed), 0);
        assert!(woken(&p).await, "no refill after the hold");

        let ended = crate::vm::tests::test_vm(&d.path().join("b"));
        hold_refill(&p, ended.clone());
        tokio::time::sleep(Duration::from_millis(10)).await;
        ended
            .transition(&[VmState::Created], VmState::Exited)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(p.held.load(Ordering::Relaxed), 0);
        assert!(woken(&p).await, "no refill after the VM ended");
    }

    #[test]
    fn warm_ups_are_split_as_a_shell_would_and_find_their_pool() {
        let w: PoolWarmup = "busybox=sh -c 'A=1 echo \"a b\"' x\\ y".parse().unwrap();
        assert_eq!(w.image, "busybox");
        assert_eq!(w.argv, ["sh", "-c", "A=1 echo \"a b\"", "x y"]);
        // Nothing is expanded.
        let w: PoolWarmup = "busybox=echo $HOME *".parse().unwrap();
        assert_eq!(w.argv, ["echo", "$HOME", "*"]);
        for bad in [
            "busybox",
            "busybox=",
            "busybox=  ",
            "busybox='x",
            "=true",
            "../x=true",
        ] {
            assert!(bad.parse::<PoolWarmup>().is_err(), "{bad}");
        }

        let mut pools: Vec<PoolSpec> =
            vec!["busybox=1".parse().unwrap(), "other=2".parse().unwrap()];
        let w = |s: &str| s.parse::<PoolWarmup>().unwrap();
        attach_warmups(&mut pools, vec![w("other=true")]).unwrap();
        assert_eq!(pools[0].warmup, None);
        assert_eq!(pools[1].warmup.as_deref(), Some(&["true".to_string()][..]));
        let e = attach_warmups(&mut pools, vec![w("other=false")]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = attach_warmups(&mut pools, vec![w("nopool=true")]).unwrap_err();
        assert!(e.contains("has no --pool"), "{e}");
    }
}
