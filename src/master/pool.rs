//! The pools: each `[[service]]` of a generation is a [`Pool`] of slots,
//! each slot filled by one forked worker ([`Child`]). Spawning, stopping,
//! resizing, the stop and ready deadlines, and the backoff of slots whose
//! workers keep failing.
//!
//! What a worker's exit (or a worker late to be ready) means for the
//! daemon is not decided here: [`Master::worker_exited`] and
//! [`Master::enforce_child_deadlines`] return a [`Verdict`], and
//! src/master/mod.rs acts on it (stop at start, abort a reload).
//!
//! Owns: nothing beyond what [`Master`] holds; the types of its pools and
//! children.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::reload::Reload;
use super::{
    FAST_STOP_GRACE, Master, MasterError, Phase, counted, health, policy, round_ms, sys_err,
};
use crate::config::{Credentials, MAX_WORKERS, PoolKind, ServiceConfig};
use crate::control;
use crate::exit::{ChildExit, worker as worker_code};
use crate::handler::PluginInfo;
use crate::stats::{ExitCause, SpawnCause, WorkerState};
use crate::sys::{self, Forked};
use crate::worker::{self, WorkerSpec};

/// A worker that fails (is killed, or exits non-zero) sooner than this after
/// it was spawned is a failed start: its slot backs off. A clean exit (status
/// 0: recycled after `max_requests`, or asked to stop) never is.
pub const MIN_HEALTHY_LIFETIME: Duration = Duration::from_secs(1);
/// First delay before restarting a slot whose workers keep failing.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest such delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One place in a pool: the worker `SERVICE#N` and its restart history.
#[derive(Debug, Default)]
pub(super) struct Slot {
    /// The worker filling the slot, if any.
    pub(super) pid: Option<Pid>,
    /// Consecutive failed starts (died before ready, or failed within
    /// MIN_HEALTHY_LIFETIME).
    pub(super) failures: u32,
    /// When to start the next worker; None: as soon as possible.
    pub(super) respawn_at: Option<Instant>,
    /// Not part of the pool (a dynamic pool shrank, a recycled worker's
    /// place): never filled until the pool grows into it again. Indexes
    /// stay stable, so the slot numbers in worker names do.
    pub(super) vacant: bool,
    /// Why the next worker of this slot is started (for the metrics).
    pub(super) cause: SpawnCause,
}

/// One `[[service]]` of one generation: its config, listeners and slots.
pub(super) struct Pool {
    /// The service's configuration (shared with workers through fork).
    pub(super) config: ServiceConfig,
    /// The plugin the workers initialise (the master uses only its name).
    pub(super) plugin: PluginInfo,
    /// Keys into `Master::listeners`.
    pub(super) listeners: Vec<String>,
    /// The pool's size is `slots.len()`.
    pub(super) slots: Vec<Slot>,
    /// What its workers drop to (`[daemon] user`/`group` of its generation).
    pub(super) credentials: Option<Credentials>,
    /// Its index in the master's counters (src/stats.rs).
    pub(super) stats: Option<usize>,
    /// Dynamic pools: workers to start at the next growth step (1, 2, 4,
    /// … 32 while the shortage lasts), and when that step may run.
    pub(super) rate: u32,
    pub(super) grow_at: Option<Instant>,
    /// Whether the pool is at `max_workers` with no idle worker (counted
    /// once per such episode).
    pub(super) at_max: bool,
    /// The recycling in progress (one at a time per service).
    pub(super) recycle: Option<policy::Recycle>,
    /// Ondemand pools: not watching the listeners until then.
    pub(super) listen_pause: Option<Instant>,
}

impl Pool {
    /// The pool of `config`, whose workers run `plugin` as `credentials`.
    pub(super) fn new(
        config: &ServiceConfig,
        plugin: PluginInfo,
        credentials: &Option<Credentials>,
    ) -> Pool {
        Pool {
            config: config.clone(),
            plugin,
            listeners: config.listen_keys().into_iter().map(|(k, _)| k).collect(),
            slots: (0..config.start_workers())
                .map(|_| Slot::default())
                .collect(),
            credentials: credentials.clone(),
            stats: None,
            rate: 1,
            grow_at: None,
            at_max: false,
            recycle: None,
            listen_pause: None,
        }
    }

    /// The pool's size: its slots that are not vacant.
    pub(super) fn size(&self) -> usize {
        self.slots.iter().filter(|s| !s.vacant).count()
    }

    /// Adds a place to the pool (the first vacant slot, or a new one), to
    /// be filled by spawn_missing; returns its index.
    pub(super) fn add_slot(&mut self, cause: SpawnCause) -> usize {
        let fresh = Slot {
            cause,
            ..Slot::default()
        };
        match self.slots.iter().position(|s| s.vacant) {
            Some(i) => {
                self.slots[i] = fresh;
                i
            }
            None => {
                self.slots.push(fresh);
                self.slots.len() - 1
            }
        }
    }

    /// Takes slot `s` out of the pool (its worker, if any, is the caller's
    /// to stop); trailing vacant slots are dropped.
    pub(super) fn vacate(&mut self, s: usize) {
        if let Some(slot) = self.slots.get_mut(s) {
            *slot = Slot {
                vacant: true,
                ..Slot::default()
            };
        }
        while self.slots.last().is_some_and(|s| s.vacant) {
            self.slots.pop();
        }
    }

    /// The service's name.
    pub(super) fn name(&self) -> &str {
        self.config.name.get_ref().as_str()
    }

    /// Whether every slot has a worker that said `ready`.
    pub(super) fn all_ready(&self, children: &HashMap<Pid, Child>) -> bool {
        self.slots.iter().filter(|s| !s.vacant).all(|s| {
            s.pid
                .and_then(|pid| children.get(&pid))
                .is_some_and(|c| c.ready)
        })
    }

    /// `SERVICE N workers` lines of a log summary.
    pub(super) fn summary(pools: &[Pool]) -> String {
        let parts: Vec<String> = pools
            .iter()
            .map(|p| format!("{} ({})", p.name(), counted(p.size(), "worker")))
            .collect();
        parts.join(", ")
    }
}

/// A forked worker, as the master tracks it.
pub(super) struct Child {
    /// The generation it belongs to.
    pub(super) generation: u64,
    /// Index into its generation's pools.
    pub(super) pool: usize,
    /// The slot it fills; None once retired (scaled down, old generation,
    /// stopping).
    pub(super) slot: Option<usize>,
    /// `SERVICE#N`, for logs.
    pub(super) name: String,
    /// The service name, for status.
    pub(super) service: String,
    pub(super) started: Instant,
    /// Killed if not ready by then.
    pub(super) ready_deadline: Instant,
    /// Its service's `graceful_timeout`.
    pub(super) graceful: Duration,
    /// Read end of the ready pipe until the worker's message arrives.
    pub(super) ready_pipe: Option<OwnedFd>,
    /// Whether it said `ready`.
    pub(super) ready: bool,
    /// The reason it sent with `error: …`.
    pub(super) boot_error: Option<String>,
    /// When to SIGKILL it: set when it is asked to stop.
    pub(super) kill_at: Option<Instant>,
    /// Its scoreboard slot.
    pub(super) board: Option<usize>,
    /// Its service's index in the master's counters.
    pub(super) svc: Option<usize>,
    /// Recycled past this resident memory (`max_memory` + jitter); 0: never.
    pub(super) rss_limit: u64,
    /// Recycled at this age (`max_age` + jitter).
    pub(super) age_limit: Option<Duration>,
    /// Recycled once it has served this many (`max_requests` + jitter) by
    /// the master, a replacement first: event-driven workers only (a
    /// threads-mode worker leaves by itself); 0: never.
    pub(super) request_limit: u64,
    /// Since when it has been seen idle (sampled by the maintenance tick).
    pub(super) idle_since: Option<Instant>,
    /// Its `served` count at the last sample.
    pub(super) last_served: u64,
    /// Why the master retired it (recycling, idleness), for the metrics.
    pub(super) retire_cause: Option<ExitCause>,
    /// Whether the master sent it SIGKILL.
    pub(super) killed: bool,
    /// The state last written to the master's counters.
    pub(super) reported: Option<WorkerState>,
}

impl Child {
    /// Reads its ready message (`ready` or `error: REASON`), once it is
    /// there; the pipe closes after it.
    pub(super) fn read_message(&mut self) {
        let Some(line) = read_pipe_line(&mut self.ready_pipe) else {
            return;
        };
        if line == "ready" {
            self.ready = true;
        } else if let Some(reason) = line.strip_prefix("error: ") {
            self.boot_error = Some(reason.to_string());
        }
        // Either way the message is complete (workers write one line, then close).
    }
}

#[cfg(test)]
impl Child {
    /// A ready worker of slot `slot` of pool `pool`, for unit tests.
    pub(super) fn for_test(generation: u64, pool: usize, slot: Option<usize>) -> Child {
        let now = Instant::now();
        Child {
            generation,
            pool,
            slot,
            name: format!("t#{}", slot.unwrap_or(0)),
            service: "t".into(),
            started: now,
            ready_deadline: now,
            graceful: Duration::from_secs(1),
            ready_pipe: None,
            ready: true,
            boot_error: None,
            kill_at: None,
            board: None,
            svc: None,
            rss_limit: 0,
            age_limit: None,
            request_limit: 0,
            idle_since: None,
            last_served: 0,
            retire_cause: None,
            killed: false,
            reported: None,
        }
    }
}

/// What a worker's end means beyond its own slot, for src/master/mod.rs to
/// act on.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// A worker of the first generation never became ready: the daemon
    /// cannot start.
    BootFailed {
        /// Its pool in the first generation.
        pool: usize,
        /// `SERVICE#N`.
        worker: String,
        /// Why, for the log and the exit.
        reason: String,
    },
    /// A worker of the generation a reload is booting failed: the reload
    /// fails.
    ReloadFailed(String),
}

impl Master {
    /// The pools of `generation`: the generation in force, or the one a
    /// reload is booting.
    pub(super) fn pools_of(&self, generation: u64) -> Option<&[Pool]> {
        pools_of(
            &self.pools,
            self.generation,
            self.reload.as_ref(),
            generation,
        )
    }

    /// [`Master::pools_of`], to change.
    pub(super) fn pools_mut(&mut self, generation: u64) -> Option<&mut Vec<Pool>> {
        if generation == self.generation {
            Some(&mut self.pools)
        } else {
            self.reload
                .as_mut()
                .filter(|r| r.generation == generation)
                .map(|r| &mut r.pools)
        }
    }

    /// The generations that have pools: the one in force, and the one a
    /// reload is booting.
    pub(super) fn live_generations(&self) -> Vec<u64> {
        let mut generations = vec![self.generation];
        generations.extend(self.reload.as_ref().map(|r| r.generation));
        generations
    }

    /// Every pool of [`Master::live_generations`].
    pub(super) fn live_pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools
            .iter()
            .chain(self.reload.iter().flat_map(|r| r.pools.iter()))
    }

    /// A worker's ready pipe is readable: reads its message.
    pub(super) fn read_ready(&mut self, pid: Pid) {
        let Some(child) = self.children.get_mut(&pid) else {
            return;
        };
        child.read_message();
        if child.ready {
            log::info!("worker {} (pid {pid}) ready", child.name);
        }
        self.sync_states();
    }

    /// A worker was reaped: counts it, frees its scoreboard slot, logs,
    /// and sets its slot's backoff. Returns what else its end means.
    pub(super) fn worker_exited(
        &mut self,
        pid: Pid,
        mut child: Child,
        exit: ChildExit,
    ) -> Option<Verdict> {
        if child.ready_pipe.is_some() {
            child.read_message();
        }
        let cause = if self.health.is_stuck(pid) {
            ExitCause::Stuck
        } else {
            policy::exit_cause(&child, exit)
        };
        self.stats
            .exited(child.svc, cause, child.board, &self.board);
        if let Some(b) = child.board {
            self.board.release(b);
        }
        let recycled_early = self.recycle_exited(pid, &child);
        let reason = child
            .boot_error
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        let stopping = !matches!(self.phase, Phase::Starting | Phase::Running)
            || child.slot.is_none()
            || recycled_early;
        if exit.is_clean() {
            let why = if stopping { "" } else { " (recycled)" };
            log::info!("worker {} (pid {pid}) {exit}{why}", child.name);
        } else {
            log::warn!("worker {} (pid {pid}) {exit}{reason}", child.name);
        }
        let slot_idx = child.slot.filter(|_| !stopping)?;
        if self.phase == Phase::Starting && !child.ready && child.generation == self.generation {
            let reason = child
                .boot_error
                .clone()
                .unwrap_or_else(|| format!("worker {} {exit} before it was ready", child.name));
            return Some(Verdict::BootFailed {
                pool: child.pool,
                worker: child.name,
                reason,
            });
        }
        if self
            .reload
            .as_ref()
            .is_some_and(|r| r.generation == child.generation)
            && (!child.ready || !exit.is_clean())
        {
            let reason = match &child.boot_error {
                Some(r) => format!("worker {} failed to boot: {r}", child.name),
                None if !child.ready => format!("worker {} {exit} before it was ready", child.name),
                None => format!("worker {} {exit}", child.name),
            };
            return Some(Verdict::ReloadFailed(reason));
        }
        let slot = self
            .pools_mut(child.generation)?
            .get_mut(child.pool)?
            .slots
            .get_mut(slot_idx)?;
        slot.pid = None;
        if !child.ready || (!exit.is_clean() && child.started.elapsed() < MIN_HEALTHY_LIFETIME) {
            slot.failures += 1;
            let delay = backoff(slot.failures);
            slot.respawn_at = Some(Instant::now() + delay);
            log::warn!(
                "worker {} failed to start {} time(s) in a row; next start in {}",
                child.name,
                slot.failures,
                humantime::format_duration(round_ms(delay))
            );
        } else {
            slot.failures = 0;
            slot.respawn_at = None;
        }
        None
    }

    /// SIGTTIN: one worker more in every static pool, `count` times.
    pub(super) fn handle_ttin(&mut self, count: usize) {
        self.step_static_pools("SIGTTIN", count, true);
    }

    /// SIGTTOU: one worker fewer in every static pool (each keeps its
    /// last), `count` times.
    pub(super) fn handle_ttou(&mut self, count: usize) {
        self.step_static_pools("SIGTTOU", count, false);
    }

    fn step_static_pools(&mut self, signal: &str, count: usize, up: bool) {
        if self.phase != Phase::Running && self.phase != Phase::Starting {
            return;
        }
        for _ in 0..count {
            for p in 0..self.pools.len() {
                let n = self.pools[p].size();
                let name = self.pools[p].name().to_string();
                let kind = self.pools[p].config.pool_kind();
                if kind != PoolKind::Static {
                    log::warn!(
                        "{signal}: service {name} has pool = \"{kind}\", whose size follows the load; left alone"
                    );
                } else if up && n >= MAX_WORKERS as usize {
                    log::warn!("{signal}: service {name} is at {MAX_WORKERS} workers already");
                } else if !up && n <= 1 {
                    log::warn!("{signal}: service {name} keeps its last worker");
                } else {
                    let n = if up { n + 1 } else { n - 1 };
                    self.resize(p, n);
                    log::info!("{signal}: service {name} now has {}", counted(n, "worker"));
                }
            }
        }
    }

    /// `scale SERVICE N`: until the next reload, which applies the config.
    pub(super) fn scale(&mut self, service: &str, n: usize) -> Value {
        if self.phase != Phase::Running {
            return control::error("the master is not running (starting, stopping or retiring)");
        }
        if self.reload.is_some() {
            return control::error("a reload is in progress; scale after it");
        }
        let Some(p) = self.pools.iter().position(|p| p.name() == service) else {
            let names: Vec<&str> = self.pools.iter().map(Pool::name).collect();
            return control::error(&format!(
                "no service {service:?}: expected one of {}",
                names.join(", ")
            ));
        };
        let kind = self.pools[p].config.pool_kind();
        if kind != PoolKind::Static {
            return control::error(&format!(
                "service {service} has pool = \"{kind}\", whose size follows the load: change min_spare, max_spare or max_workers in the config and reload"
            ));
        }
        let was = self.pools[p].size();
        let n = n.min(MAX_WORKERS as usize);
        self.resize(p, n);
        log::info!(
            "control: service {service} scaled from {was} to {}",
            counted(n, "worker")
        );
        json!({"ok": true, "service": service, "workers": n, "was": was})
    }

    /// Sets pool `p`'s size: new slots are filled by spawn_missing; the
    /// workers of removed slots leave gracefully.
    pub(super) fn resize(&mut self, p: usize, n: usize) {
        let pool = &mut self.pools[p];
        while pool.size() < n {
            pool.add_slot(SpawnCause::Grow);
        }
        let mut removed = Vec::new();
        while pool.size() > n {
            let Some(s) = pool.slots.iter().rposition(|s| !s.vacant) else {
                break;
            };
            removed.extend(pool.slots[s].pid);
            pool.vacate(s);
        }
        for pid in removed {
            if let Some(child) = self.children.get_mut(&pid) {
                child.slot = None;
            }
            self.stop_child(pid, Signal::SIGTERM);
        }
    }

    /// Asks a worker to stop (SIGTERM: drain; SIGQUIT: now) and sets the
    /// time at which it is killed.
    pub(super) fn stop_child(&mut self, pid: Pid, sig: Signal) {
        let Some(child) = self.children.get_mut(&pid) else {
            return;
        };
        let grace = if sig == Signal::SIGTERM {
            child.graceful
        } else {
            FAST_STOP_GRACE
        };
        let at = Instant::now() + grace;
        child.kill_at = Some(child.kill_at.map_or(at, |k| k.min(at)));
        if let Err(e) = kill(pid, sig) {
            log::debug!("kill({pid}, {}) failed: {e}", sig.as_str());
        }
    }

    /// Stops every worker of `generation` (None: every worker).
    pub(super) fn stop_generation(&mut self, generation: Option<u64>, sig: Signal) {
        let pids: Vec<Pid> = self
            .children
            .iter_mut()
            .filter(|(_, c)| generation.is_none_or(|g| c.generation == g))
            .map(|(pid, c)| {
                c.slot = None;
                *pid
            })
            .collect();
        for pid in pids {
            self.stop_child(pid, sig);
        }
    }

    /// Kills workers past their stop deadline, and workers that did not
    /// become ready within `ready_timeout` (a verdict each: such a worker
    /// fails the start or the reload it belongs to).
    pub(super) fn enforce_child_deadlines(&mut self) -> Vec<Verdict> {
        let now = Instant::now();
        let mut late = Vec::new();
        for (pid, child) in &mut self.children {
            if let Some(at) = child.kill_at {
                if now >= at {
                    log::warn!(
                        "worker {} (pid {pid}) still running at its stop deadline; sending SIGKILL",
                        child.name
                    );
                    let _ = kill(*pid, Signal::SIGKILL);
                    child.kill_at = None;
                    child.killed = true;
                }
            } else if !child.ready && now >= child.ready_deadline {
                let waited = child.ready_deadline - child.started;
                log::warn!(
                    "worker {} (pid {pid}) not ready after ready_timeout ({}); sending SIGKILL",
                    child.name,
                    humantime::format_duration(waited)
                );
                let _ = kill(*pid, Signal::SIGKILL);
                child.killed = true;
                // Killed again if somehow still there; the reap counts
                // it as a failed start.
                child.kill_at = Some(now + FAST_STOP_GRACE);
                late.push((child.generation, child.pool, child.name.clone(), waited));
            }
        }
        let mut verdicts = Vec::new();
        for (generation, pool, worker, waited) in late {
            let reason = format!(
                "worker {worker} not ready within ready_timeout ({})",
                humantime::format_duration(waited)
            );
            if self.phase == Phase::Starting && generation == self.generation {
                verdicts.push(Verdict::BootFailed {
                    pool,
                    worker,
                    reason,
                });
            } else if self
                .reload
                .as_ref()
                .is_some_and(|r| r.generation == generation)
            {
                verdicts.push(Verdict::ReloadFailed(reason));
            }
        }
        verdicts
    }

    /// Forks a worker for every empty slot whose backoff has passed, in the
    /// generation in force and in the one a reload is booting.
    /// A failure to fork (process limit, memory) is logged and retried with
    /// the slot's backoff: the workers that exist keep serving. In a
    /// reload, it fails the reload (the verdict returned).
    pub(super) fn spawn_missing(&mut self) -> Option<Verdict> {
        for generation in self.live_generations() {
            let now = Instant::now();
            let Some(pools) = self.pools_of(generation) else {
                continue;
            };
            let todo: Vec<(usize, usize)> = pools
                .iter()
                .enumerate()
                .flat_map(|(p, pool)| {
                    pool.slots
                        .iter()
                        .enumerate()
                        .filter(|(_, slot)| {
                            !slot.vacant
                                && slot.pid.is_none()
                                && slot.respawn_at.is_none_or(|at| now >= at)
                        })
                        .map(move |(s, _)| (p, s))
                })
                .collect();
            for (p, s) in todo {
                let Err(e) = self.spawn_worker(generation, p, s) else {
                    continue;
                };
                if generation != self.generation {
                    return Some(Verdict::ReloadFailed(format!("cannot start a worker: {e}")));
                }
                let slot = &mut self.pools[p].slots[s];
                slot.failures += 1;
                let delay = backoff(slot.failures);
                slot.respawn_at = Some(Instant::now() + delay);
                log::error!(
                    "cannot start worker {}#{s}: {e}; retrying in {}",
                    self.pools[p].name(),
                    humantime::format_duration(round_ms(delay))
                );
            }
        }
        None
    }

    /// Forks the worker for slot `s` of pool `p` of `generation`.
    fn spawn_worker(&mut self, generation: u64, p: usize, s: usize) -> Result<(), MasterError> {
        let pools = pools_of(
            &self.pools,
            self.generation,
            self.reload.as_ref(),
            generation,
        );
        let pool = &pools.expect("a live generation")[p];
        let name = format!("{}#{s}", pool.name());
        let (ready_read, ready_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| sys_err("pipe2")(e.into()))?;
        let mut listeners = Vec::with_capacity(pool.listeners.len());
        for key in &pool.listeners {
            let l = self.listener(key).expect("every pool's listeners are open");
            listeners.push((l.bound.clone(), l.try_clone_fd().map_err(sys_err("dup"))?));
        }
        let board = health::claim(&mut self.board, &pool.config, generation, &name);
        match sys::fork().map_err(sys_err("fork")) {
            Err(e) => {
                if let Some(b) = board {
                    self.board.release(b);
                }
                Err(e)
            }
            Ok(Forked::Child) => {
                drop(ready_read);
                let spec = WorkerSpec {
                    service: &pool.config,
                    slot: s,
                    generation,
                    master: self.pid,
                    plugin: &pool.plugin,
                    listeners,
                    ready: ready_write,
                    board: board.map(|b| self.board.slot(b)),
                    credentials: pool.credentials.as_ref(),
                };
                // Never return into the master's loop: exit here, without
                // running the master's destructors (its descriptors are not
                // ours to close twice).
                let code =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker::run(spec)))
                        .unwrap_or(worker_code::PANICKED);
                std::process::exit(code);
            }
            Ok(Forked::Parent(pid)) => {
                drop(ready_write);
                drop(listeners);
                log::info!("worker {name} (pid {pid}) spawned");
                let now = Instant::now();
                let (rss_limit, age_limit) = policy::limits(&pool.config);
                let request_limit = policy::request_limit(&pool.config);
                let svc = pool.stats;
                let cause = pool.slots[s].cause;
                let child = Child {
                    svc,
                    rss_limit,
                    age_limit,
                    request_limit,
                    idle_since: None,
                    last_served: 0,
                    retire_cause: None,
                    killed: false,
                    reported: Some(WorkerState::Starting),
                    generation,
                    pool: p,
                    slot: Some(s),
                    name,
                    service: pool.name().to_string(),
                    started: now,
                    ready_deadline: now + pool.config.ready_timeout,
                    graceful: pool.config.graceful_timeout,
                    ready_pipe: Some(ready_read),
                    ready: false,
                    boot_error: None,
                    kill_at: None,
                    board,
                };
                self.children.insert(pid, child);
                self.stats.spawned(svc, cause, board);
                let pools = self.pools_mut(generation).expect("spawned from it");
                pools[p].slots[s].pid = Some(pid);
                pools[p].slots[s].cause = SpawnCause::Replace;
                Ok(())
            }
        }
    }
}

/// [`Master::pools_of`], from the fields, for callers that hold another
/// field of the master mutably.
fn pools_of<'a>(
    current: &'a [Pool],
    current_generation: u64,
    reload: Option<&'a Reload>,
    generation: u64,
) -> Option<&'a [Pool]> {
    if generation == current_generation {
        Some(current)
    } else {
        reload
            .filter(|r| r.generation == generation)
            .map(|r| r.pools.as_slice())
    }
}

/// Reads the one line a child writes on its pipe (`ready`, `error: …`)
/// and closes the pipe. None, with the pipe kept, while nothing has come
/// yet; the empty string at EOF without a message or on a read error.
pub(super) fn read_pipe_line(pipe: &mut Option<OwnedFd>) -> Option<String> {
    let mut file = std::fs::File::from(pipe.take()?);
    // One line, well under a pipe's atomic write size (PIPE_BUF).
    let mut buf = [0u8; libc::PIPE_BUF];
    let n = match file.read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            *pipe = Some(file.into());
            return None;
        }
        Err(_) => 0,
    };
    let text = String::from_utf8_lossy(&buf[..n]);
    Some(text.lines().next().unwrap_or("").to_string())
}

/// Delay before the n-th consecutive failed start: 0.1 s doubling to 30 s.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (BACKOFF_MIN * 2u32.pow(exp)).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Source};
    use crate::handler::Registry;

    fn pool(extra: &str) -> Pool {
        let text = format!(
            "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:0\", \"unix:/tmp/a.sock\"]\n{extra}\n[service.handler]\nplugin = \"echo\"\n"
        );
        let config = Config::parse(&text, Source::Embedded).unwrap();
        let plugin = Registry::builtin().get("echo").unwrap().clone();
        Pool::new(&config.services[0], plugin, &None)
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(9), Duration::from_millis(25_600));
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(1000), BACKOFF_MAX);
    }

    #[test]
    fn a_pool_has_a_slot_per_worker_and_its_listener_keys() {
        let p = pool("workers = 3");
        assert_eq!(p.size(), 3);
        assert_eq!(p.slots.len(), 3);
        assert_eq!(p.listeners.len(), 2);
        assert!(p.listeners[1].contains("/tmp/a.sock"), "{:?}", p.listeners);
        assert_eq!(p.plugin.name, "echo");
        // Ondemand pools start with none.
        let p = pool("pool = \"ondemand\"\nmax_workers = 4");
        assert_eq!(p.size(), 0);
    }

    #[test]
    fn vacated_slots_keep_indexes_and_are_reused_first() {
        let mut p = pool("workers = 3");
        p.vacate(1);
        assert_eq!(
            (p.size(), p.slots.len()),
            (2, 3),
            "a middle slot stays, vacant"
        );
        assert_eq!(p.add_slot(SpawnCause::Grow), 1, "the vacant slot is reused");
        assert_eq!(p.slots[1].cause, SpawnCause::Grow);
        assert_eq!(p.add_slot(SpawnCause::Recycle), 3, "then a new one");
        p.vacate(3);
        p.vacate(2);
        assert_eq!(p.slots.len(), 2, "trailing vacant slots are dropped");
        assert_eq!(p.size(), 2);
    }

    #[test]
    fn a_pool_is_ready_when_every_filled_slot_said_so() {
        let mut p = pool("workers = 2");
        let children = HashMap::new();
        assert!(!p.all_ready(&children), "empty slots are not ready");
        p.vacate(1);
        p.vacate(0);
        assert!(p.all_ready(&children), "no slot: nothing to wait for");
        assert_eq!(Pool::summary(&[pool("workers = 2")]), "a (2 workers)");
    }

    #[test]
    fn a_ready_line_or_a_reason_is_read_once() {
        use std::io::Write;
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK).unwrap();
        let mut pipe = Some(r);
        assert_eq!(read_pipe_line(&mut pipe), None, "nothing yet");
        assert!(pipe.is_some(), "kept while nothing came");
        let mut w = std::fs::File::from(w);
        w.write_all(b"error: no such file\n").unwrap();
        assert_eq!(
            read_pipe_line(&mut pipe).as_deref(),
            Some("error: no such file")
        );
        assert!(pipe.is_none(), "closed once read");
    }
}
