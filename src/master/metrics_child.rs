//! The `[metrics]` child's life: a process forked like a worker (after
//! fork it drops privileges and serves `/metrics` from the master's shared
//! counters, src/metrics.rs), started once the sockets are bound, replaced
//! with the workers' backoff when it dies, restarted by a reload, stopped
//! with the daemon. No HTTP is parsed in the master.
//!
//! Owns: the metrics child's state ([`MetricsChild`]).

use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::pool::{MIN_HEALTHY_LIFETIME, backoff};
use super::{Master, Phase};
use crate::config::ListenAddr;
use crate::exit::{ChildExit, worker as code};
use crate::listener::Listener;
use crate::sys::{self, Forked};

/// listen(2) backlog of the metrics socket.
pub const METRICS_BACKLOG: i32 = 64;

/// The `[metrics]` child process.
#[derive(Debug)]
pub struct MetricsChild {
    /// The running one.
    pub pid: Option<Pid>,
    /// When it was started.
    pub started: Instant,
    /// Consecutive failures (died within MIN_HEALTHY_LIFETIME, or not
    /// cleanly).
    pub failures: u32,
    /// When to start the next one; None: as soon as possible.
    pub respawn_at: Option<Instant>,
    /// Replaced ones (reload), not reaped yet.
    pub retiring: Vec<Pid>,
}

impl Default for MetricsChild {
    fn default() -> MetricsChild {
        MetricsChild {
            pid: None,
            started: Instant::now(),
            failures: 0,
            respawn_at: None,
            retiring: Vec::new(),
        }
    }
}

/// The bound address of an inet listener, for the log.
pub fn bound_inet(l: &Listener) -> String {
    match &l.bound {
        ListenAddr::Tcp(a) | ListenAddr::Udp(a) => a.to_string(),
        other => other.to_string(),
    }
}

impl Master {
    /// Starts the metrics child if the config has `[metrics]` and none runs.
    pub(super) fn spawn_metrics(&mut self) {
        if !matches!(self.phase, Phase::Starting | Phase::Running) || self.metrics.pid.is_some() {
            return;
        }
        // A new master of a binary upgrade starts its own after the
        // handover: until then the old master's answers, and `/ready` does
        // not read "starting" from the one that is not in charge yet.
        if self.handover.is_some() {
            return;
        }
        if self
            .metrics
            .respawn_at
            .is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        let Some(key) = self.config.metrics.listen_key() else {
            return;
        };
        let Some(l) = self.listener(&key) else {
            return;
        };
        let fd = match l.try_clone_fd() {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("metrics: dup() failed: {e}");
                self.metrics_failed();
                return;
            }
        };
        match sys::fork() {
            Err(e) => {
                log::error!("metrics: cannot start the metrics process: fork() failed: {e}");
                self.metrics_failed();
            }
            Ok(Forked::Child) => {
                let spec = crate::metrics::MetricsSpec {
                    listener: fd,
                    stats: &self.stats,
                    board: &self.board,
                    master: self.pid,
                    credentials: self.config.daemon.credentials.as_ref(),
                };
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::metrics::run(spec)
                }))
                .unwrap_or(code::PANICKED);
                std::process::exit(code);
            }
            Ok(Forked::Parent(pid)) => {
                drop(fd);
                log::info!("metrics process (pid {pid}) spawned");
                self.metrics.pid = Some(pid);
                self.metrics.started = Instant::now();
                self.metrics.respawn_at = None;
            }
        }
    }

    fn metrics_failed(&mut self) {
        self.metrics.failures += 1;
        let delay = backoff(self.metrics.failures);
        self.metrics.respawn_at = Some(Instant::now() + delay);
    }

    /// Reaps the metrics child (true if `pid` was one); a dead one is
    /// restarted, with the workers' backoff if it keeps failing.
    pub(super) fn metrics_exited(&mut self, pid: Pid, exit: ChildExit) -> bool {
        if let Some(i) = self.metrics.retiring.iter().position(|p| *p == pid) {
            self.metrics.retiring.swap_remove(i);
            log::info!("metrics process (pid {pid}) {exit}");
            return true;
        }
        if self.metrics.pid != Some(pid) {
            return false;
        }
        self.metrics.pid = None;
        let running = matches!(self.phase, Phase::Starting | Phase::Running);
        if !running {
            log::info!("metrics process (pid {pid}) {exit}");
            return true;
        }
        log::warn!("metrics process (pid {pid}) {exit}; starting another");
        if !exit.is_clean() && self.metrics.started.elapsed() < MIN_HEALTHY_LIFETIME {
            self.metrics_failed();
        } else {
            self.metrics.failures = 0;
        }
        true
    }

    /// Reload: the metrics child of the new config replaces the old one.
    pub(super) fn restart_metrics(&mut self) {
        self.stop_metrics();
        self.metrics.respawn_at = None;
        self.metrics.failures = 0;
    }

    /// Asks the metrics child to stop (stop, upgrade, reload).
    pub(super) fn stop_metrics(&mut self) {
        if let Some(pid) = self.metrics.pid.take() {
            let _ = kill(pid, Signal::SIGTERM);
            self.metrics.retiring.push(pid);
        }
    }
}
