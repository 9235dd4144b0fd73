//! The stuck-worker check (a service's `timeout`, gunicorn's
//! `murder_workers`), and what the scoreboard adds to `preforkd status`.
//!
//! On its own timer (a quarter of the shortest `timeout`, at most a
//! second), the master reads each ready worker's slot: a connection (or
//! datagram) in progress for longer than `timeout`, or a heartbeat older
//! than `timeout`, and the worker is sent SIGABRT (a core dump, where they
//! are enabled, shows where it hung), then SIGKILL [`ABORT_GRACE`] later if
//! it is still there. The reaper logs its exit and the pool replaces it as
//! it does any dead worker. Workers being stopped are left to their stop
//! deadline (`graceful_timeout`), and starting ones to `ready_timeout`.
//!
//! What each signal detects: the connection's age catches a handler stuck
//! on one client (a deadlock, an endless loop, a blocking call with no
//! timeout), thread by thread; the heartbeat, written by the worker's
//! watchdog thread (src/worker/mod.rs), catches a worker that does not run
//! at all (stopped, frozen, starved). In an event-driven worker
//! (`mode = "async"`) a connection may rightly stay open for hours, so
//! only the heartbeat counts, and the loop writes it itself: a handler that
//! blocks the loop stops it, and the log names the connection the loop was
//! running (src/worker/event.rs records it before each poll).
//!
//! Owns: the list of workers sent SIGABRT, and the check's timer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::pool::Child;
use super::{Master, Phase};
use crate::config::{ServiceConfig, WorkerMode};
use crate::scoreboard::{Scoreboard, service_id};
use crate::sys;

/// How long a worker sent SIGABRT has to die before SIGKILL.
pub const ABORT_GRACE: Duration = Duration::from_secs(2);

/// The check's state.
#[derive(Debug, Default)]
pub struct Health {
    /// When the next check runs; None: no service has a `timeout`.
    next: Option<Instant>,
    /// Workers sent SIGABRT, and when they get SIGKILL (None: sent
    /// already; kept until reaped, so that the exit counts as `stuck`).
    aborted: HashMap<Pid, Option<Instant>>,
}

impl Health {
    /// Whether the worker was found stuck and is being killed.
    pub fn is_stuck(&self, pid: Pid) -> bool {
        self.aborted.contains_key(&pid)
    }
}

/// Claims a scoreboard slot for a worker of `config` about to be forked:
/// a connection entry per accept thread (an event-driven worker: a few,
/// for its oldest connections), and, with `max_connections_per_ip`, a
/// table of its connections per address. Says so when no room is left
/// (its connections are then not shown, or not counted).
pub(super) fn claim(
    board: &mut Scoreboard,
    config: &ServiceConfig,
    generation: u64,
    name: &str,
) -> Option<usize> {
    let entries = match config.mode() {
        WorkerMode::Threads => config.threads as usize,
        WorkerMode::Async => crate::worker::ASYNC_ENTRIES,
    };
    let per_ip = if config.max_connections_per_ip > 0 {
        config.connections_per_worker() as usize
    } else {
        0
    };
    let slot = board.claim_worker(
        service_id(config.name.get_ref().as_str()),
        generation,
        entries,
        per_ip,
    );
    match slot {
        None => log::warn!(
            "worker {name}: the scoreboard is full: it runs without a slot (no status counters, no timeout check)"
        ),
        Some(b) if board.entries(b) < entries => log::warn!(
            "worker {name}: no connection entries left in the scoreboard: its connections are not shown or checked against timeout"
        ),
        Some(b) if per_ip > 0 && !board.has_ip_table(b) => log::warn!(
            "worker {name}: no room left in the scoreboard for its per-address counts: its connections are not counted for max_connections_per_ip"
        ),
        Some(_) => {}
    }
    slot
}

/// Seconds with one decimal, for the log.
fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

impl Master {
    /// A child's service config, if its generation is the one in force or
    /// the one a reload is booting.
    fn config_of(&self, child: &Child) -> Option<&ServiceConfig> {
        self.pools_of(child.generation)
            .and_then(|p| p.get(child.pool))
            .map(|p| &p.config)
    }

    /// How often to check: a quarter of the shortest `timeout` (between
    /// 50 ms and 1 s); None when no service has one.
    fn health_interval(&self) -> Option<Duration> {
        self.live_pools()
            .map(|p| p.config.timeout)
            .filter(|t| !t.is_zero())
            .min()
            .map(|t| (t / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)))
    }

    /// The check's timers: the next check, and the SIGKILLs due.
    pub(super) fn health_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        self.health
            .next
            .into_iter()
            .chain(self.health.aborted.values().flatten().copied())
    }

    /// Kills what is stuck: SIGKILL for workers sent SIGABRT more than
    /// [`ABORT_GRACE`] ago, and, when the check is due, SIGABRT for ready
    /// workers stuck on a connection or whose heartbeat stopped.
    pub(super) fn check_health(&mut self) {
        let now = Instant::now();
        self.health
            .aborted
            .retain(|pid, _| self.children.contains_key(pid));
        let due: Vec<Pid> = self
            .health
            .aborted
            .iter()
            .filter(|(_, at)| at.is_some_and(|at| now >= at))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in due {
            // Kept (with no further deadline) until it is reaped, so that its
            // exit is counted as `stuck`.
            self.health.aborted.insert(pid, None);
            if let Some(child) = self.children.get(&pid) {
                log::warn!(
                    "worker {} (pid {pid}) still running {} after SIGABRT; sending SIGKILL",
                    child.name,
                    humantime::format_duration(ABORT_GRACE)
                );
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        let Some(interval) = self.health_interval() else {
            self.health.next = None;
            return;
        };
        if self.health.next.is_some_and(|at| now < at) {
            return;
        }
        self.health.next = Some(now + interval);
        if !matches!(self.phase, Phase::Starting | Phase::Running) {
            return;
        }
        let now_ms = sys::coarse_ms();
        let mut stuck = Vec::new();
        for (pid, child) in &self.children {
            if !child.ready
                || child.kill_at.is_some()
                || child.slot.is_none()
                || self.health.aborted.contains_key(pid)
            {
                continue;
            }
            let (Some(b), Some(config)) = (child.board, self.config_of(child)) else {
                continue;
            };
            let limit = config.timeout.as_millis() as u64;
            if limit == 0 {
                continue;
            }
            let timeout = humantime::format_duration(config.timeout);
            let service = config.name.get_ref().as_str();
            let event_loop = config.mode() == WorkerMode::Async;
            let late: Vec<_> = if event_loop {
                Vec::new() // its connections may rightly be old
            } else {
                self.board
                    .connections(b)
                    .into_iter()
                    .filter(|c| now_ms.saturating_sub(c.start_ms) > limit)
                    .collect()
            };
            let heartbeat = self.board.read(b).heartbeat_ms;
            let why = if event_loop && heartbeat != 0 && now_ms.saturating_sub(heartbeat) > limit {
                let running = match self.board.running(b) {
                    Some(c) => format!(
                        " while running the connection of {} (open {})",
                        c.peer,
                        secs(now_ms.saturating_sub(c.start_ms))
                    ),
                    None => String::new(),
                };
                format!(
                    "event loop blocked: heartbeat stopped {} ago{running} (timeout {timeout})",
                    secs(now_ms.saturating_sub(heartbeat))
                )
            } else if let Some(oldest) = late.first() {
                let more = match late.len() {
                    1 => String::new(),
                    n => format!(" (and {} more connections)", n - 1),
                };
                format!(
                    "stuck for {} on {}{more} (timeout {timeout})",
                    secs(now_ms.saturating_sub(oldest.start_ms)),
                    oldest.peer
                )
            } else if heartbeat != 0 && now_ms.saturating_sub(heartbeat) > limit {
                format!(
                    "heartbeat stopped {} ago (timeout {timeout})",
                    secs(now_ms.saturating_sub(heartbeat))
                )
            } else {
                continue;
            };
            stuck.push((
                *pid,
                format!(
                    "service {service}: worker {} (pid {pid}) {why}; sending SIGABRT",
                    child.name
                ),
            ));
        }
        for (pid, line) in stuck {
            log::warn!("{line}");
            if let Err(e) = kill(pid, Signal::SIGABRT) {
                log::debug!("kill({pid}, SIGABRT) failed: {e}");
            }
            if let Some(child) = self.children.get_mut(&pid) {
                child.killed = true;
            }
            self.health.aborted.insert(pid, Some(now + ABORT_GRACE));
        }
    }

    /// Adds the scoreboard's view of a worker to its status entry: heartbeat
    /// age, bytes, refusals, and the connections in progress.
    pub(super) fn board_status(&self, child: &Child, w: &mut Value) {
        let Some(b) = child.board else { return };
        let c = self.board.read(b);
        let now_ms = sys::coarse_ms();
        let connections: Vec<Value> = self
            .board
            .connections(b)
            .into_iter()
            .map(|conn| {
                json!({
                    "peer": conn.peer.to_string(),
                    "age_ms": now_ms.saturating_sub(conn.start_ms),
                })
            })
            .collect();
        let extra = json!({
            "heartbeat_age_ms": (c.heartbeat_ms != 0).then(|| now_ms.saturating_sub(c.heartbeat_ms)),
            "full": c.full,
            "bytes_in": c.bytes_in,
            "bytes_out": c.bytes_out,
            "refused": c.refused,
            "connections": connections,
        });
        if let (Some(w), Value::Object(extra)) = (w.as_object_mut(), extra) {
            w.extend(extra);
        }
    }
}
