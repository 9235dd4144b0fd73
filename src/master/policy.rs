//! The pool policy: what the master does on its maintenance tick and when
//! an ondemand service has a connection waiting. Adaptive pool sizes
//! (`pool = "dynamic" | "ondemand"`, PHP-FPM's `pm`), recycling by memory
//! and age with the replacement started first, and the counters of
//! src/stats.rs.
//!
//! Everything here runs in the master's loop (src/master/mod.rs), between the
//! signals and the spawns: a decision adds or vacates slots, and
//! `spawn_missing` forks what the slots lack. Nothing here blocks: the
//! samples are reads of the scoreboard, of /proc/PID/statm and getsockopt.
//!
//! Owns: the recycling state of each pool ([`Recycle`]).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::pool::{Child, Pool};
use super::{Master, Phase};
use crate::config::{Config, ListenAddr, PoolKind, ServiceConfig, WorkerMode};
use crate::exit::ChildExit;
use crate::handler::PluginInfo;
use crate::stats::{ExitCause, SpawnCause, Stats, WorkerState};
use crate::sys;

/// How often the maintenance tick runs: pool sizes, recycling, samples.
pub const MAINTENANCE_TICK: Duration = Duration::from_secs(1);
/// Most workers a dynamic pool starts in one step (Apache's prefork and
/// PHP-FPM's `pm.max_spawn_rate` default).
pub const MAX_SPAWN_RATE: u32 = 32;
/// An ondemand pool with an idle (or starting) worker while a connection
/// waits: how long before the master looks at its listeners again (the
/// worker is about to accept). Bounds the master's wake-ups.
const DEMAND_PAUSE: Duration = Duration::from_millis(50);

/// A recycling in progress: the replacement is started first, and the old
/// worker is asked to stop once it is ready.
#[derive(Debug)]
pub struct Recycle {
    /// The worker being recycled.
    pub old: Pid,
    /// The slot its replacement fills.
    pub slot: usize,
    /// `max_memory` or `max_age`.
    pub cause: ExitCause,
    /// Whether the old worker has been asked to stop.
    pub retired: bool,
}

/// Idle, busy and pending (slots with no ready worker) places of a pool.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    idle: usize,
    busy: usize,
    pending: usize,
}

impl Pool {
    /// The pools of a resolved config (`plugins[i]` for `services[i]`),
    /// each given its index in the counters, with its kind recorded.
    pub(super) fn all(config: &Config, plugins: Vec<PluginInfo>, stats: &mut Stats) -> Vec<Pool> {
        let mut pools: Vec<Pool> = config
            .services
            .iter()
            .zip(plugins)
            .map(|(svc, plugin)| Pool::new(svc, plugin, &config.daemon.credentials))
            .collect();
        register(stats, &mut pools);
        pools
    }
}

/// Gives each pool its index in the counters, and records its kind.
fn register(stats: &mut Stats, pools: &mut [Pool]) {
    for pool in pools {
        pool.stats = stats.service(pool.name());
        let kind = match pool.config.pool_kind() {
            PoolKind::Static => 0,
            PoolKind::Dynamic => 1,
            PoolKind::Ondemand => 2,
        };
        let max = pool.config.pool_bounds().2;
        stats.set_pool(pool.stats, kind, u64::from(max));
    }
}

/// Whether the config needs the maintenance tick at all (a static pool
/// without recycling limits and no metrics endpoint does not).
pub fn needs_tick(config: &Config) -> bool {
    config.metrics.listen.is_some()
        || config.services.iter().any(|s| {
            s.pool_kind() != PoolKind::Static
                || s.max_memory.bytes() > 0
                || !s.max_age.is_zero()
                || request_limit(s) > 0
        })
}

/// A new event-driven worker's `max_requests` plus a random 0..=jitter,
/// which the master enforces (0: none; threads-mode workers count their
/// own).
pub fn request_limit(config: &ServiceConfig) -> u64 {
    if config.mode() != WorkerMode::Async || config.max_requests == 0 {
        return 0;
    }
    config
        .max_requests
        .saturating_add(fastrand::u64(0..=config.max_requests_jitter))
}

/// A new worker's recycling limits: `max_memory` and `max_age`, each plus
/// a random 0..=jitter.
pub fn limits(config: &ServiceConfig) -> (u64, Option<Duration>) {
    let rss = match config.max_memory.bytes() {
        0 => 0,
        m => m.saturating_add(fastrand::u64(0..=config.max_memory_jitter.bytes())),
    };
    let age = (!config.max_age.is_zero()).then(|| {
        let jitter = config.max_age_jitter.as_millis() as u64;
        config.max_age + Duration::from_millis(fastrand::u64(0..=jitter))
    });
    (rss, age)
}

/// Why a worker exited, for the metrics.
pub(super) fn exit_cause(child: &Child, exit: ChildExit) -> ExitCause {
    if child.killed {
        return ExitCause::Killed;
    }
    if exit.is_clean() {
        return match child.retire_cause {
            Some(c) => c,
            None if child.kill_at.is_some() || child.slot.is_none() => ExitCause::Stopped,
            None => ExitCause::MaxRequests,
        };
    }
    if !child.ready {
        return ExitCause::BootFailed;
    }
    match exit {
        ChildExit::Exited(_) => ExitCause::Error,
        ChildExit::Signaled(..) => ExitCause::Signal,
    }
}

/// How many workers a dynamic pool starts now: none without a shortage,
/// else the step's rate (as Apache's prefork: 1, 2, 4, … while the
/// shortage lasts, whatever its size), bounded by `max_workers`.
pub fn dynamic_growth(
    spare: usize,
    min_spare: usize,
    total: usize,
    top: usize,
    rate: u32,
) -> usize {
    if spare >= min_spare || total >= top {
        return 0;
    }
    (rate as usize).min(top - total)
}

/// A ready worker of pool `p` in generation `generation`, in its slot and
/// not being stopped: one the pool policy may count, retire or recycle.
fn serving(ch: &Child, generation: u64, p: usize) -> bool {
    ch.generation == generation
        && ch.pool == p
        && ch.slot.is_some()
        && ch.ready
        && ch.kill_at.is_none()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

impl Master {
    /// The pool policy for this wake-up: recycling steps, ondemand pools
    /// with connections waiting, and, when due, the maintenance tick.
    pub(super) fn adapt(&mut self, waiting: &[usize]) {
        if self.phase != Phase::Running {
            return;
        }
        self.advance_recycles();
        let now = Instant::now();
        for &p in waiting {
            self.on_demand(p, now);
        }
        if self.maintain_at.is_none_or(|at| now < at) {
            return;
        }
        self.maintain_at = Some(now + MAINTENANCE_TICK);
        self.sample_idle(now);
        for p in 0..self.pools.len() {
            self.check_recycle(p);
            match self.pools[p].config.pool_kind() {
                PoolKind::Static => {}
                PoolKind::Dynamic => self.dynamic_step(p, now),
                PoolKind::Ondemand => {
                    // Counted when a connection waits (on_demand); a free
                    // worker ends the episode.
                    let c = self.counts(p);
                    let top = self.pools[p].config.pool_bounds().2 as usize;
                    if self.pools[p].size() < top || c.idle > 0 {
                        self.pools[p].at_max = false;
                    }
                    self.retire_idle(p, now);
                }
            }
            if self.config.metrics.listen.is_some() {
                self.sample_queue(p);
            }
        }
        self.advance_recycles();
    }

    /// The timers of the policy: the next tick, ondemand pauses, the
    /// metrics child's restart.
    pub(super) fn policy_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        let now = Instant::now();
        let running = self.phase == Phase::Running;
        let tick = self.maintain_at.filter(|_| running);
        let pauses = self
            .pools
            .iter()
            .filter_map(|p| p.listen_pause)
            .filter(move |at| running && *at > now);
        let metrics = self
            .metrics
            .respawn_at
            .filter(|_| self.metrics.pid.is_none() && running);
        tick.into_iter().chain(pauses).chain(metrics)
    }

    fn counts(&self, p: usize) -> Counts {
        let mut c = Counts::default();
        for slot in self.pools[p].slots.iter().filter(|s| !s.vacant) {
            match slot.pid.and_then(|pid| self.children.get(&pid)) {
                Some(child) if child.ready && child.kill_at.is_none() => {
                    let active = child.board.map_or(0, |b| self.board.read(b).active);
                    // An event-driven worker with room takes the next
                    // connection as an idle one would.
                    let busy_at = match self.pools[p].config.mode() {
                        WorkerMode::Threads => 1,
                        WorkerMode::Async => u64::from(self.pools[p].config.worker_connections),
                    };
                    if active >= busy_at {
                        c.busy += 1;
                    } else {
                        c.idle += 1;
                    }
                }
                Some(child) if child.kill_at.is_some() => {}
                _ => c.pending += 1,
            }
        }
        c
    }

    /// Idle and busy workers of pool `p` (of the generation in force),
    /// for status.
    pub(super) fn idle_busy(&self, p: usize) -> (usize, usize) {
        let c = self.counts(p);
        (c.idle, c.busy)
    }

    /// Times the service's pool was at `max_workers` with none idle.
    pub(super) fn at_max_count(&self, pool: &Pool) -> u64 {
        self.stats.at_max_count(pool.stats)
    }

    /// The listeners of ondemand pools that may need a worker: nothing
    /// starting, not paused. A readable one means a connection waits.
    pub(super) fn demand_fds(&self) -> Vec<(usize, BorrowedFd<'_>)> {
        if self.phase != Phase::Running {
            return Vec::new();
        }
        let now = Instant::now();
        let mut out = Vec::new();
        for (p, pool) in self.pools.iter().enumerate() {
            if pool.config.pool_kind() != PoolKind::Ondemand
                || pool.listen_pause.is_some_and(|at| now < at)
                || self.counts(p).pending > 0
            {
                continue;
            }
            for key in &pool.listeners {
                if let Some(l) = self.listener(key) {
                    out.push((p, l.as_fd()));
                }
            }
        }
        out
    }

    /// An ondemand pool's listener is readable: start workers unless one is
    /// idle or starting (it will take the connection).
    fn on_demand(&mut self, p: usize, now: Instant) {
        if self.pools[p].config.pool_kind() != PoolKind::Ondemand {
            return;
        }
        let c = self.counts(p);
        let top = self.pools[p].config.pool_bounds().2 as usize;
        let total = self.pools[p].size();
        if c.idle > 0 || c.pending > 0 {
            self.pools[p].listen_pause = Some(now + DEMAND_PAUSE);
            return;
        }
        if total >= top {
            self.note_at_max(p, true);
            // Until a worker frees up or the next tick: no busy loop on a
            // listener that stays readable.
            self.pools[p].listen_pause = Some(now + MAINTENANCE_TICK / 4);
            return;
        }
        let queued = self.queue_len(p).map_or(1, |(q, _)| q.max(1) as usize);
        let n = queued.min(top - total).min(MAX_SPAWN_RATE as usize);
        for _ in 0..n {
            self.pools[p].add_slot(SpawnCause::Grow);
        }
        log::info!(
            "service {}: {} waiting and no idle worker; starting {n} (ondemand, {total} of max_workers {top} running)",
            self.pools[p].name(),
            if queued > 1 {
                format!("{queued} connections")
            } else {
                "a connection".to_string()
            }
        );
    }

    /// Records whether pool `p` is at `max_workers` with none idle; counts
    /// each such episode once.
    fn note_at_max(&mut self, p: usize, at_max: bool) {
        let pool = &mut self.pools[p];
        if at_max && !pool.at_max {
            log::warn!(
                "service {}: all {} workers (max_workers) are busy; connections wait in the listen queue",
                pool.name(),
                pool.size()
            );
            self.stats.at_max(pool.stats);
        }
        pool.at_max = at_max;
    }

    /// Dynamic pool: start workers while fewer than `min_spare` are idle
    /// (1, 2, 4, … 32 per tick while the shortage lasts), retire one per
    /// tick while more than `max_spare` are.
    fn dynamic_step(&mut self, p: usize, now: Instant) {
        let (min, max_spare, top) = self.pools[p].config.pool_bounds();
        let (min, max_spare, top) = (min as usize, max_spare as usize, top as usize);
        let c = self.counts(p);
        let total = self.pools[p].size();
        self.note_at_max(p, total >= top && c.idle == 0 && c.pending == 0);
        let spare = c.idle + c.pending;
        let pool = &mut self.pools[p];
        if spare < min {
            let n = dynamic_growth(spare, min, total, top, pool.rate);
            if n > 0 && pool.grow_at.is_none_or(|at| now >= at) {
                for _ in 0..n {
                    pool.add_slot(SpawnCause::Grow);
                }
                log::info!(
                    "service {}: {} idle workers, fewer than min_spare {min}; starting {n} ({} running, max_workers {top})",
                    pool.name(),
                    c.idle,
                    total
                );
                pool.rate = (pool.rate * 2).min(MAX_SPAWN_RATE);
                pool.grow_at = Some(now + MAINTENANCE_TICK);
            }
            return;
        }
        if c.idle < min {
            // Enough only counting the workers still starting: the
            // shortage is not over yet, the rate stays.
            return;
        }
        pool.rate = 1;
        pool.grow_at = None;
        if c.idle > max_spare && pool.recycle.is_none() {
            // The worker idle the longest goes.
            let victim = self
                .children
                .iter()
                .filter(|(_, ch)| serving(ch, self.generation, p) && ch.idle_since.is_some())
                .min_by_key(|(_, ch)| (ch.idle_since, std::cmp::Reverse(ch.slot)))
                .map(|(pid, _)| *pid);
            if let Some(pid) = victim {
                log::info!(
                    "service {}: {} idle workers, more than max_spare {max_spare}; retiring one",
                    self.pools[p].name(),
                    c.idle
                );
                self.retire(pid, ExitCause::Idle);
            }
        }
    }

    /// Ondemand pool: retire workers idle for `idle_worker_timeout`.
    fn retire_idle(&mut self, p: usize, now: Instant) {
        let timeout = self.pools[p].config.idle_worker_timeout;
        let idle: Vec<Pid> = self
            .children
            .iter()
            .filter(|(_, ch)| {
                serving(ch, self.generation, p)
                    && ch
                        .idle_since
                        .is_some_and(|t| now.duration_since(t) >= timeout)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in idle {
            if let Some(ch) = self.children.get(&pid) {
                log::info!(
                    "worker {} (pid {pid}) idle for idle_worker_timeout ({}); retiring it",
                    ch.name,
                    humantime::format_duration(timeout)
                );
            }
            self.retire(pid, ExitCause::Idle);
        }
    }

    /// Takes a worker out of its pool (its slot vacated) and asks it to stop.
    fn retire(&mut self, pid: Pid, cause: ExitCause) {
        let Some(child) = self.children.get_mut(&pid) else {
            return;
        };
        child.retire_cause = Some(cause);
        let (generation, p, slot) = (child.generation, child.pool, child.slot.take());
        if let (Some(s), Some(pools)) = (slot, self.pools_mut(generation))
            && let Some(pool) = pools.get_mut(p)
        {
            pool.vacate(s);
        }
        self.stop_child(pid, Signal::SIGTERM);
    }

    /// Samples each worker's activity: `idle_since` is reset by a
    /// connection in progress or served since the last sample.
    fn sample_idle(&mut self, now: Instant) {
        for child in self.children.values_mut() {
            let Some(b) = child.board else { continue };
            let c = self.board.read(b);
            if c.active > 0 || c.served != child.last_served {
                child.idle_since = None;
                child.last_served = c.served;
            }
            if c.active == 0 && child.ready && child.idle_since.is_none() {
                child.idle_since = Some(now);
            }
        }
    }

    /// Starts recycling a worker of pool `p` past `max_age` or
    /// `max_memory` (or, event-driven, `max_requests`): its replacement
    /// first (one recycling at a time).
    fn check_recycle(&mut self, p: usize) {
        let pool = &self.pools[p];
        let (max_memory, max_age) = (pool.config.max_memory, pool.config.max_age);
        let by_requests = request_limit(&pool.config) > 0;
        if pool.recycle.is_some() || (max_memory.bytes() == 0 && max_age.is_zero() && !by_requests)
        {
            return;
        }
        let mut found = None;
        let mut candidates: Vec<(&Pid, &Child)> = self
            .children
            .iter()
            .filter(|(_, ch)| serving(ch, self.generation, p))
            .collect();
        candidates.sort_by_key(|(_, ch)| ch.started);
        for (pid, ch) in candidates {
            let served = ch.board.map_or(0, |b| self.board.read(b).served);
            if ch.request_limit > 0 && served >= ch.request_limit {
                found = Some((
                    *pid,
                    ExitCause::MaxRequests,
                    format!(
                        "served {served} (max_requests {} + jitter)",
                        pool.config.max_requests
                    ),
                ));
                break;
            }
            if let Some(limit) = ch.age_limit
                && ch.started.elapsed() >= limit
            {
                found = Some((
                    *pid,
                    ExitCause::MaxAge,
                    format!(
                        "age {} > max_age {}",
                        humantime::format_duration(Duration::from_secs(
                            ch.started.elapsed().as_secs()
                        )),
                        humantime::format_duration(limit)
                    ),
                ));
                break;
            }
            if ch.rss_limit > 0
                && let Some(rss) = sys::resident_bytes(pid.as_raw())
                && rss > ch.rss_limit
            {
                let jitter = ch.rss_limit.saturating_sub(max_memory.bytes());
                let limit = if jitter > 0 {
                    format!(
                        "max_memory {} + jitter {}",
                        mib(max_memory.bytes()),
                        mib(jitter)
                    )
                } else {
                    format!("max_memory {}", mib(max_memory.bytes()))
                };
                found = Some((
                    *pid,
                    ExitCause::MaxMemory,
                    format!("resident memory {} > {limit}", mib(rss)),
                ));
                break;
            }
        }
        let Some((old, cause, why)) = found else {
            return;
        };
        let name = self
            .children
            .get(&old)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        log::info!("worker {name} (pid {old}): {why}; recycling (a replacement starts first)");
        let pool = &mut self.pools[p];
        let slot = pool.add_slot(SpawnCause::Recycle);
        pool.recycle = Some(Recycle {
            old,
            slot,
            cause,
            retired: false,
        });
    }

    /// Asks recycled workers to stop once their replacements are ready.
    pub(super) fn advance_recycles(&mut self) {
        for p in 0..self.pools.len() {
            let Some(r) = &self.pools[p].recycle else {
                continue;
            };
            if r.retired {
                continue;
            }
            let (old, cause) = (r.old, r.cause);
            let replacement = match self.pools[p].slots.get(r.slot) {
                Some(s) if !s.vacant => s.pid,
                _ => {
                    // The pool was scaled down meanwhile: nothing replaces.
                    self.pools[p].recycle = None;
                    continue;
                }
            };
            let Some((new_pid, new_name)) = replacement
                .and_then(|pid| self.children.get(&pid).map(|c| (pid, c)))
                .filter(|(_, c)| c.ready)
                .map(|(pid, c)| (pid, c.name.clone()))
            else {
                continue;
            };
            if let Some(ch) = self.children.get(&old) {
                log::info!(
                    "worker {} (pid {old}): replaced by {new_name} (pid {new_pid}); stopping it",
                    ch.name
                );
            }
            if let Some(r) = &mut self.pools[p].recycle {
                r.retired = true;
            }
            self.retire(old, cause);
        }
    }

    /// A worker exited: ends the recycling it was the subject of. True if
    /// it died before it was retired: its place is the replacement's, so
    /// it is not respawned.
    pub(super) fn recycle_exited(&mut self, pid: Pid, child: &Child) -> bool {
        if child.generation != self.generation {
            return false;
        }
        let Some(pool) = self.pools.get_mut(child.pool) else {
            return false;
        };
        if pool.recycle.as_ref().is_none_or(|r| r.old != pid) {
            return false;
        }
        pool.recycle = None;
        match child.slot {
            Some(s) => {
                pool.vacate(s);
                true
            }
            None => false,
        }
    }

    /// Samples pool `p`'s TCP accept queues for the metrics.
    fn sample_queue(&mut self, p: usize) {
        let q = self.queue_len(p);
        self.stats.set_queue(self.pools[p].stats, q);
    }

    /// The summed accept queue and backlog of pool `p`'s TCP listeners;
    /// None if it has none.
    fn queue_len(&self, p: usize) -> Option<(u64, u64)> {
        let mut sum: Option<(u64, u64)> = None;
        for key in &self.pools[p].listeners {
            if let Some(l) = self.listener(key)
                && matches!(l.bound, ListenAddr::Tcp(_))
                && let Some((q, b)) = sys::listen_queue(l.as_fd())
            {
                let s = sum.get_or_insert((0, 0));
                s.0 += q;
                s.1 += b;
            }
        }
        sum
    }

    /// Writes each worker's state to the counters when it changed.
    pub(super) fn sync_states(&mut self) {
        for child in self.children.values_mut() {
            let state = if child.kill_at.is_some() || child.slot.is_none() {
                WorkerState::Stopping
            } else if !child.ready {
                WorkerState::Starting
            } else {
                WorkerState::Ready
            };
            if child.reported != Some(state) {
                self.stats.set_state(child.svc, child.board, state);
                child.reported = Some(state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Source;
    use nix::sys::signal::Signal;

    fn config(extra: &str) -> Config {
        let text = format!(
            "{extra}\n[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:0\"]\n[service.handler]\nplugin = \"echo\"\n"
        );
        Config::parse(&text, Source::Embedded).unwrap()
    }

    fn service(keys: &str) -> ServiceConfig {
        let text = format!(
            "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:0\"]\n{keys}\n[service.handler]\nplugin = \"echo\"\n"
        );
        Config::parse(&text, Source::Embedded)
            .unwrap()
            .services
            .remove(0)
    }

    #[test]
    fn exit_causes_follow_who_ended_the_worker() {
        let clean = ChildExit::Exited(0);
        let mut c = Child::for_test(1, 0, Some(0));
        assert_eq!(
            exit_cause(&c, clean),
            ExitCause::MaxRequests,
            "in its slot: recycled itself"
        );
        assert_eq!(exit_cause(&c, ChildExit::Exited(1)), ExitCause::Error);
        assert_eq!(
            exit_cause(&c, ChildExit::Signaled(Signal::SIGSEGV, false)),
            ExitCause::Signal
        );
        c.slot = None;
        assert_eq!(
            exit_cause(&c, clean),
            ExitCause::Stopped,
            "taken out of its slot"
        );
        c.retire_cause = Some(ExitCause::MaxAge);
        assert_eq!(
            exit_cause(&c, clean),
            ExitCause::MaxAge,
            "retired by the policy"
        );
        c.ready = false;
        assert_eq!(exit_cause(&c, ChildExit::Exited(3)), ExitCause::BootFailed);
        c.killed = true;
        assert_eq!(exit_cause(&c, clean), ExitCause::Killed, "SIGKILL wins");
    }

    #[test]
    fn only_ready_workers_in_their_slot_are_serving() {
        let c = Child::for_test(2, 1, Some(0));
        assert!(serving(&c, 2, 1));
        assert!(!serving(&c, 1, 1), "another generation");
        assert!(!serving(&c, 2, 0), "another pool");
        let mut stopping = Child::for_test(2, 1, Some(0));
        stopping.kill_at = Some(Instant::now());
        assert!(!serving(&stopping, 2, 1));
        let mut booting = Child::for_test(2, 1, Some(0));
        booting.ready = false;
        assert!(!serving(&booting, 2, 1));
        assert!(!serving(&Child::for_test(2, 1, None), 2, 1), "retired");
    }

    #[test]
    fn recycling_limits_add_at_most_the_jitter() {
        assert_eq!(limits(&service("")), (0, None), "no limit: never recycled");
        let s = service(
            "max_memory = \"64MiB\"\nmax_memory_jitter = \"1MiB\"\nmax_age = \"1h\"\nmax_age_jitter = \"10m\"",
        );
        for _ in 0..100 {
            let (rss, age) = limits(&s);
            assert!((64 << 20..=65 << 20).contains(&rss), "{rss}");
            let age = age.unwrap();
            assert!(
                (Duration::from_secs(3600)..=Duration::from_secs(4200)).contains(&age),
                "{age:?}"
            );
        }
    }

    #[test]
    fn the_tick_runs_only_for_what_needs_it() {
        assert!(
            !needs_tick(&config("")),
            "a static pool, no limits, no metrics"
        );
        assert!(needs_tick(&config("[metrics]\nlisten = \"127.0.0.1:0\"")));
        let dynamic = service("pool = \"dynamic\"\nmin_spare = 1\nmax_spare = 2\nmax_workers = 4");
        let mut c = config("");
        c.services = vec![dynamic];
        assert!(needs_tick(&c));
        c.services = vec![service("max_age = \"1h\"")];
        assert!(needs_tick(&c));
    }

    #[test]
    fn dynamic_growth_doubles_within_the_bounds() {
        // No shortage: nothing.
        assert_eq!(dynamic_growth(2, 2, 4, 10, 8), 0);
        // A shortage, at rate 1, 2, 4: the rate, whatever the shortage.
        assert_eq!(dynamic_growth(0, 1, 2, 20, 1), 1);
        assert_eq!(dynamic_growth(0, 1, 3, 20, 2), 2);
        assert_eq!(dynamic_growth(1, 3, 5, 20, 4), 4);
        // Bounded by max_workers.
        assert_eq!(dynamic_growth(0, 8, 9, 10, 32), 1);
        assert_eq!(dynamic_growth(0, 8, 10, 10, 32), 0);
    }
}
