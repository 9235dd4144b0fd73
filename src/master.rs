//! The master: binds every listener, forks each service's pool of workers,
//! reaps and replaces them, and stops them on signals. It runs no handler
//! code and never blocks anywhere but in one poll(2).
//!
//! The loop (gunicorn's arbiter and nginx's master cycle, in their fixed
//! order): wait for a signal, a worker's ready message or the next timer →
//! drain the signals → reap every exited child → read ready messages → act
//! on signals by priority (fast stop, graceful stop, scaling) → enforce
//! deadlines → exit when stopping and no child is left → spawn what the pools
//! lack.
//!
//! Owns: all master state, in [`Master`]; the listeners (until exit); the
//! read ends of the workers' ready pipes; the pid file.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use crate::config::{Config, ServiceConfig};
use crate::exit::{ChildExit, code};
use crate::handler::{PluginInfo, Registry};
use crate::listener::{ListenError, Listener};
use crate::signals::{Event, Signals};
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
/// How long a fast stop (SIGINT, SIGQUIT) waits before SIGKILL.
pub const FAST_STOP_GRACE: Duration = Duration::from_secs(1);

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// A listener could not be bound (exit 69).
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The first generation of a service could not start (exit 78).
    #[error("service {service}: workers failed to boot: {reason}")]
    Boot {
        /// The service whose workers failed.
        service: String,
        /// The worker's reason.
        reason: String,
    },
    /// The pid file could not be written (exit 73).
    #[error("cannot write pid file {}: {source}", path.display())]
    PidFile {
        /// `[daemon] pid_file`.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A system call the master depends on failed (exit 70).
    #[error("{syscall}() failed: {source}")]
    Sys {
        /// The call.
        syscall: &'static str,
        /// What the OS said.
        source: io::Error,
    },
}

impl MasterError {
    /// The process exit code for this error (see [`crate::exit::code`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            MasterError::Listen(_) => code::UNAVAILABLE,
            MasterError::Boot { .. } => code::CONFIG,
            MasterError::PidFile { .. } => code::CANTCREAT,
            MasterError::Sys { .. } => code::SOFTWARE,
        }
    }
}

fn sys_err(syscall: &'static str) -> impl FnOnce(io::Error) -> MasterError {
    move |source| MasterError::Sys { syscall, source }
}

/// Where the master is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The first generation is booting; a boot failure stops everything.
    Starting,
    /// Serving; dead workers are replaced.
    Running,
    /// Stopping: nothing is respawned; exit once no child is left.
    Stopping {
        /// SIGINT/SIGQUIT (workers exit now) rather than SIGTERM (drain).
        fast: bool,
    },
}

/// One place in a pool: the worker `SERVICE#N` and its restart history.
#[derive(Debug, Default)]
struct Slot {
    /// The worker filling the slot, if any.
    pid: Option<Pid>,
    /// Consecutive failed starts (died before ready, or failed within
    /// MIN_HEALTHY_LIFETIME).
    failures: u32,
    /// When to start the next worker; None: as soon as possible.
    respawn_at: Option<Instant>,
}

/// One `[[service]]`: its config, listeners and slots.
struct Pool {
    /// The service's configuration (owned by the pool, shared with workers
    /// through fork).
    config: ServiceConfig,
    /// The plugin the workers initialise (only its name is used here).
    plugin: PluginInfo,
    /// Bound in the master; closed only when the master stops.
    listeners: Vec<Listener>,
    /// The pool's size is `slots.len()`.
    slots: Vec<Slot>,
}

impl Pool {
    fn name(&self) -> &str {
        self.config.name.get_ref().as_str()
    }
}

/// A forked worker, as the master tracks it.
struct Child {
    /// Index into `Master::pools`.
    pool: usize,
    /// The slot it fills; None once retired (scaled down, stopping).
    slot: Option<usize>,
    /// `SERVICE#N`, for logs.
    name: String,
    started: Instant,
    /// Read end of the ready pipe until the worker's message arrives.
    ready_pipe: Option<OwnedFd>,
    /// Whether it said `ready`.
    ready: bool,
    /// The reason it sent with `error: …`.
    boot_error: Option<String>,
    /// When to SIGKILL it: set when it is asked to stop.
    kill_at: Option<Instant>,
}

/// The master process's whole state.
pub struct Master {
    phase: Phase,
    pools: Vec<Pool>,
    children: HashMap<Pid, Child>,
    signals: Signals,
    pid: Pid,
    pid_file: Option<PathBuf>,
    /// Set when the first generation fails; the master exits with it.
    boot_failure: Option<MasterError>,
}

impl Master {
    /// Binds every listener and installs the signal handlers. Nothing is
    /// forked yet; a bind failure leaves no socket file behind.
    pub fn new(config: &Config, registry: &Registry) -> Result<Master, MasterError> {
        sys::assert_single_threaded().map_err(sys_err("assert_single_threaded"))?;
        let mut pools: Vec<Pool> = Vec::new();
        for svc in &config.services {
            let mut listeners = Vec::new();
            for addr in &svc.addrs {
                match Listener::bind(addr, svc.backlog, svc.socket_mode) {
                    Ok(l) => listeners.push(l),
                    Err(e) => {
                        remove_files(pools.iter_mut().flat_map(|p| &mut p.listeners));
                        remove_files(&mut listeners);
                        return Err(e.into());
                    }
                }
            }
            for l in &listeners {
                log::info!("listening on {} (service {})", l.bound, svc.name.get_ref());
            }
            let plugin = registry
                .get(svc.handler.plugin.get_ref())
                .expect("config validation checked the plugin name")
                .clone();
            let n = svc.workers.resolve() as usize;
            pools.push(Pool {
                config: svc.clone(),
                plugin,
                listeners,
                slots: (0..n).map(|_| Slot::default()).collect(),
            });
        }
        let pid = nix::unistd::getpid();
        let pid_file = config.daemon.pid_file.clone();
        let setup = || -> Result<Signals, MasterError> {
            if let Some(path) = &pid_file {
                std::fs::write(path, format!("{pid}\n")).map_err(|source| {
                    MasterError::PidFile {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            Signals::install().map_err(sys_err("sigaction"))
        };
        let signals = match setup() {
            Ok(s) => s,
            Err(e) => {
                remove_files(pools.iter_mut().flat_map(|p| &mut p.listeners));
                return Err(e);
            }
        };
        Ok(Master {
            phase: Phase::Starting,
            pools,
            children: HashMap::new(),
            signals,
            pid,
            pid_file,
            boot_failure: None,
        })
    }

    /// Runs until the daemon stops; returns the exit code (0 after a stop).
    pub fn run(mut self) -> Result<i32, MasterError> {
        sys::set_title("preforkd: master");
        let total: usize = self.pools.iter().map(|p| p.slots.len()).sum();
        log::info!(
            "master pid {} starting {total} workers in {} services",
            self.pid,
            self.pools.len()
        );
        self.spawn_missing();
        loop {
            let readable = self.wait()?;
            let events = self.signals.drain();
            self.reap();
            for pid in readable {
                self.read_ready(pid);
            }
            for (event, count) in events {
                self.on_signal(event, count);
            }
            self.check_start();
            self.enforce_deadlines();
            if matches!(self.phase, Phase::Stopping { .. }) {
                if self.children.is_empty() {
                    return self.finish();
                }
            } else {
                self.spawn_missing();
            }
        }
    }

    /// Sleeps in poll(2) until a signal, a ready message or the next timer.
    /// Returns the workers whose ready pipe is readable.
    fn wait(&self) -> Result<Vec<Pid>, MasterError> {
        let mut fds = vec![PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
        let mut pids = Vec::new();
        for (pid, child) in &self.children {
            if let Some(pipe) = &child.ready_pipe {
                fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLIN));
                pids.push(*pid);
            }
        }
        let timeout = match self.next_deadline() {
            None => PollTimeout::NONE,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                // Round up so that we do not wake just before the deadline.
                let ms = left.as_nanos().div_ceil(1_000_000).min(60_000) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(sys_err("poll")(e.into())),
        }
        Ok(fds[1..]
            .iter()
            .zip(pids)
            .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, pid)| pid)
            .collect())
    }

    /// The earliest timer: a slot's respawn, a kill, a ready deadline.
    fn next_deadline(&self) -> Option<Instant> {
        let respawns = self
            .pools
            .iter()
            .flat_map(|p| p.slots.iter())
            .filter(|s| s.pid.is_none())
            .filter_map(|s| s.respawn_at);
        // A worker being stopped has only its kill deadline; its ready
        // deadline, long past perhaps, would make poll() return at once.
        let children = self.children.values().filter_map(|c| {
            c.kill_at
                .or_else(|| (!c.ready).then(|| c.started + self.pools[c.pool].config.ready_timeout))
        });
        respawns.chain(children).min()
    }

    /// Reaps every child that has exited: signals coalesce, so one SIGCHLD
    /// may stand for many exits.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(status) => match ChildExit::from_wait(status) {
                    Some((pid, exit)) => self.on_exit(pid, exit),
                    None => break, // StillAlive: nothing more to reap now
                },
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => break,
                Err(e) => {
                    log::error!("waitpid() failed: {e}");
                    break;
                }
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, exit: ChildExit) {
        let Some(mut child) = self.children.remove(&pid) else {
            log::debug!("reaped pid {pid}, not a worker: {exit}");
            return;
        };
        if child.ready_pipe.is_some() {
            read_message(&mut child);
        }
        let reason = child
            .boot_error
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        let stopping = matches!(self.phase, Phase::Stopping { .. }) || child.slot.is_none();
        if exit.is_clean() {
            let why = if stopping { "" } else { " (recycled)" };
            log::info!("worker {} (pid {pid}) {exit}{why}", child.name);
        } else {
            log::warn!("worker {} (pid {pid}) {exit}{reason}", child.name);
        }

        if self.phase == Phase::Starting && !child.ready {
            let reason = child
                .boot_error
                .clone()
                .unwrap_or_else(|| format!("worker {} {exit} before it was ready", child.name));
            self.fail_start(child.pool, &child.name, reason);
            return;
        }
        let Some(slot_idx) = child.slot.filter(|_| !stopping) else {
            return;
        };
        let pool = &mut self.pools[child.pool];
        let slot = &mut pool.slots[slot_idx];
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
    }

    /// Reads a worker's ready message (`ready` or `error: REASON`).
    fn read_ready(&mut self, pid: Pid) {
        let Some(child) = self.children.get_mut(&pid) else {
            return;
        };
        read_message(child);
        if child.ready {
            log::info!("worker {} (pid {pid}) ready", child.name);
        }
    }

    /// The first generation failed: report why, stop what did start, and
    /// exit non-zero once it is gone (no crash loop at start).
    fn fail_start(&mut self, pool: usize, worker: &str, reason: String) {
        if self.boot_failure.is_some() {
            return;
        }
        let service = self.pools[pool].name().to_string();
        log::error!("service {service}: worker {worker} failed to boot: {reason}; stopping");
        self.boot_failure = Some(MasterError::Boot { service, reason });
        self.begin_stop(false);
    }

    /// Starting → Running once every slot has a ready worker.
    fn check_start(&mut self) {
        if self.phase != Phase::Starting {
            return;
        }
        let all_ready = self.pools.iter().flat_map(|p| &p.slots).all(|s| {
            s.pid
                .and_then(|pid| self.children.get(&pid))
                .is_some_and(|c| c.ready)
        });
        if all_ready {
            self.phase = Phase::Running;
            let summary: Vec<String> = self
                .pools
                .iter()
                .map(|p| format!("{} ({} workers)", p.name(), p.slots.len()))
                .collect();
            log::info!("ready: {}", summary.join(", "));
        }
    }

    fn on_signal(&mut self, event: Event, count: usize) {
        match event {
            Event::Child => {} // reaped on every wake-up anyway
            Event::Interrupt | Event::Quit => {
                let name = if event == Event::Quit {
                    "SIGQUIT"
                } else {
                    "SIGINT"
                };
                log::info!("{name}: fast stop");
                self.begin_stop(true);
            }
            Event::Terminate => {
                if matches!(self.phase, Phase::Stopping { .. }) {
                    log::info!("SIGTERM: already stopping");
                } else {
                    log::info!("SIGTERM: graceful stop");
                    self.begin_stop(false);
                }
            }
            Event::Hangup => log::warn!("SIGHUP: reload is not supported yet; ignored"),
            Event::User1 => log::warn!("SIGUSR1: log reopening is not supported yet; ignored"),
            Event::User2 => log::warn!("SIGUSR2: binary upgrade is not supported yet; ignored"),
            Event::TtyIn | Event::TtyOut => {
                if matches!(self.phase, Phase::Stopping { .. }) {
                    return;
                }
                for _ in 0..count {
                    for p in 0..self.pools.len() {
                        if event == Event::TtyIn {
                            self.grow(p);
                        } else {
                            self.shrink(p);
                        }
                    }
                }
            }
        }
    }

    /// SIGTTIN: one more slot (filled right after by spawn_missing).
    fn grow(&mut self, p: usize) {
        let pool = &mut self.pools[p];
        if pool.slots.len() >= 4096 {
            log::warn!(
                "SIGTTIN: service {} is at 4096 workers already",
                pool.name()
            );
            return;
        }
        pool.slots.push(Slot::default());
        log::info!(
            "SIGTTIN: service {} now has {} workers",
            pool.name(),
            pool.slots.len()
        );
    }

    /// SIGTTOU: one slot fewer; its worker leaves gracefully.
    fn shrink(&mut self, p: usize) {
        let pool = &mut self.pools[p];
        if pool.slots.len() <= 1 {
            log::warn!("SIGTTOU: service {} keeps its last worker", pool.name());
            return;
        }
        let slot = pool.slots.pop().expect("more than one slot");
        log::info!(
            "SIGTTOU: service {} now has {} workers",
            pool.name(),
            pool.slots.len()
        );
        if let Some(pid) = slot.pid {
            if let Some(child) = self.children.get_mut(&pid) {
                child.slot = None;
            }
            self.stop_child(pid, Signal::SIGTERM);
        }
    }

    /// Asks a worker to stop (SIGTERM: drain; SIGQUIT: now) and sets the
    /// time at which it is killed.
    fn stop_child(&mut self, pid: Pid, sig: Signal) {
        let Some(child) = self.children.get_mut(&pid) else {
            return;
        };
        let grace = if sig == Signal::SIGTERM {
            self.pools[child.pool].config.graceful_timeout
        } else {
            FAST_STOP_GRACE
        };
        let at = Instant::now() + grace;
        child.kill_at = Some(child.kill_at.map_or(at, |k| k.min(at)));
        if let Err(e) = kill(pid, sig) {
            log::debug!("kill({pid}, {}) failed: {e}", sig.as_str());
        }
    }

    /// Stops the daemon: every worker is told to stop, listeners stop
    /// accepting and are closed, socket files removed. SIGINT during a
    /// graceful stop turns it into a fast one.
    fn begin_stop(&mut self, fast: bool) {
        match self.phase {
            Phase::Stopping { fast: true } => return,
            Phase::Stopping { fast: false } if !fast => return,
            _ => {}
        }
        self.phase = Phase::Stopping { fast };
        let sig = if fast {
            Signal::SIGQUIT
        } else {
            Signal::SIGTERM
        };
        let pids: Vec<Pid> = self.children.keys().copied().collect();
        for pid in pids {
            self.stop_child(pid, sig);
        }
        for pool in &mut self.pools {
            for l in &pool.listeners {
                l.stop_accepting();
            }
            remove_files(&mut pool.listeners);
            pool.listeners.clear();
        }
    }

    /// Kills workers past their stop deadline, and workers that did not
    /// become ready within `ready_timeout`.
    fn enforce_deadlines(&mut self) {
        let now = Instant::now();
        let mut late_start = None;
        for (pid, child) in &mut self.children {
            let ready_timeout = self.pools[child.pool].config.ready_timeout;
            if let Some(at) = child.kill_at {
                if now >= at {
                    log::warn!(
                        "worker {} (pid {pid}) still running at its stop deadline; sending SIGKILL",
                        child.name
                    );
                    let _ = kill(*pid, Signal::SIGKILL);
                    child.kill_at = None;
                }
            } else if !child.ready && now >= child.started + ready_timeout {
                log::warn!(
                    "worker {} (pid {pid}) not ready after ready_timeout ({}); sending SIGKILL",
                    child.name,
                    humantime::format_duration(ready_timeout)
                );
                let _ = kill(*pid, Signal::SIGKILL);
                // Killed again if somehow still there; the reap counts
                // it as a failed start.
                child.kill_at = Some(now + FAST_STOP_GRACE);
                if self.phase == Phase::Starting {
                    late_start = Some((
                        child.pool,
                        child.name.clone(),
                        format!(
                            "not ready within ready_timeout ({})",
                            humantime::format_duration(ready_timeout)
                        ),
                    ));
                }
            }
        }
        if let Some((pool, name, reason)) = late_start {
            self.fail_start(pool, &name, reason);
        }
    }

    /// Forks a worker for every empty slot whose backoff has passed.
    /// A failure to fork (process limit, memory) is logged and retried with
    /// the slot's backoff: the workers that exist keep serving.
    fn spawn_missing(&mut self) {
        let now = Instant::now();
        for p in 0..self.pools.len() {
            for s in 0..self.pools[p].slots.len() {
                let slot = &self.pools[p].slots[s];
                if slot.pid.is_none()
                    && slot.respawn_at.is_none_or(|at| now >= at)
                    && let Err(e) = self.spawn(p, s)
                {
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
        }
    }

    /// Forks the worker for slot `s` of pool `p`.
    fn spawn(&mut self, p: usize, s: usize) -> Result<(), MasterError> {
        let pool = &self.pools[p];
        let name = format!("{}#{s}", pool.name());
        let (ready_read, ready_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| sys_err("pipe2")(e.into()))?;
        let mut listeners = Vec::with_capacity(pool.listeners.len());
        for l in &pool.listeners {
            listeners.push((l.bound.clone(), l.try_clone_fd().map_err(sys_err("dup"))?));
        }
        match sys::fork().map_err(sys_err("fork"))? {
            Forked::Child => {
                drop(ready_read);
                let spec = WorkerSpec {
                    service: &pool.config,
                    slot: s,
                    master: self.pid,
                    plugin: &pool.plugin,
                    listeners,
                    ready: ready_write,
                };
                // Never return into the master's loop: exit here, without
                // running the master's destructors (its descriptors are not
                // ours to close twice).
                let code =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker::run(spec)))
                        .unwrap_or(code::SOFTWARE);
                std::process::exit(code);
            }
            Forked::Parent(pid) => {
                drop(ready_write);
                drop(listeners);
                log::info!("worker {name} (pid {pid}) spawned");
                self.pools[p].slots[s].pid = Some(pid);
                self.children.insert(
                    pid,
                    Child {
                        pool: p,
                        slot: Some(s),
                        name,
                        started: Instant::now(),
                        ready_pipe: Some(ready_read),
                        ready: false,
                        boot_error: None,
                        kill_at: None,
                    },
                );
                Ok(())
            }
        }
    }

    /// Last step of a stop: remove the pid file, report the outcome.
    fn finish(mut self) -> Result<i32, MasterError> {
        if let Some(path) = self.pid_file.take() {
            let _ = std::fs::remove_file(path);
        }
        match self.boot_failure.take() {
            Some(e) => Err(e),
            None => {
                log::info!("master pid {} exiting", self.pid);
                Ok(code::OK)
            }
        }
    }
}

/// Removes the Unix socket files of `listeners` (those this master created).
fn remove_files<'a>(listeners: impl IntoIterator<Item = &'a mut Listener>) {
    for l in listeners {
        l.remove_file();
    }
}

/// Reads what a worker wrote to its ready pipe; closes the pipe at EOF.
fn read_message(child: &mut Child) {
    let Some(pipe) = child.ready_pipe.take() else {
        return;
    };
    let mut file = std::fs::File::from(pipe);
    let mut buf = [0u8; 4096];
    let n = match file.read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            child.ready_pipe = Some(file.into());
            return;
        }
        Err(_) => 0,
    };
    let text = String::from_utf8_lossy(&buf[..n]);
    let line = text.lines().next().unwrap_or("");
    if line == "ready" {
        child.ready = true;
    } else if let Some(reason) = line.strip_prefix("error: ") {
        child.boot_error = Some(reason.to_string());
    }
    // Either way the message is complete (workers write one line, then close).
}

/// Delay before the n-th consecutive failed start: 0.1 s doubling to 30 s.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (BACKOFF_MIN * 2u32.pow(exp)).min(BACKOFF_MAX)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(9), Duration::from_millis(25_600));
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(1000), BACKOFF_MAX);
    }
}
