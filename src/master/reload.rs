//! The reload transaction (SIGHUP, `preforkd reload`): read the config
//! again, bind what it adds, boot a new generation beside the one in
//! force, and commit once every new worker is ready, or abort and keep the
//! old generation serving (nginx's `ngx_init_cycle`: a reload never makes
//! things worse).
//!
//! At most two generations are alive at once: a reload (or upgrade) asked
//! for while one runs, or while an old generation drains, waits in
//! `pending_reload`, and requests made meanwhile join it.
//!
//! Owns: the reload in progress ([`Reload`]), and how the last one ended
//! ([`Outcome`]).

use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill};
use serde_json::json;

use super::listeners::{self, Sources};
use super::pool::Pool;
use super::{FAST_STOP_GRACE, Master, Phase, counted, policy, round_ms};
use crate::config::Config;
use crate::control::{self, ClientId};
use crate::resolve::{self, Resolved};
use crate::systemd::{self, NotifyState};

/// A reload whose new generation is booting.
pub(super) struct Reload {
    /// Its generation number.
    pub(super) generation: u64,
    /// The configuration it applies.
    pub(super) config: Config,
    /// Its pools, filled by `spawn_missing` like the generation in force.
    pub(super) pools: Vec<Pool>,
    /// Listeners bound for it (keys): closed again if it fails.
    added: Vec<String>,
    started: Instant,
    /// Control clients waiting for the outcome.
    waiters: Vec<ClientId>,
}

/// How the last reload ended, for status.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    /// The generation it made (or would have).
    pub(super) generation: u64,
    /// Whether it was committed.
    pub(super) ok: bool,
    /// The whole log line.
    pub(super) message: String,
    /// Why it failed (empty when it did not).
    pub(super) reason: String,
    /// When it ended.
    pub(super) at: SystemTime,
}

impl Master {
    /// SIGHUP or `reload`: one reload runs at a time; requests made
    /// meanwhile collapse into one more.
    pub(super) fn request_reload(&mut self, client: Option<ClientId>, by: &str) {
        if let Some(why) = self.refuses_changes() {
            log::warn!("{by}: reload refused: {why}");
            if let Some(c) = client {
                self.reply(c, &control::error(&format!("reload refused: {why}")));
            }
            return;
        }
        let busy = self.reload.is_some() || self.upgrade.is_some() || self.draining();
        if join_pending(&mut self.pending_reload, client) {
            log::info!("{by}: a reload is already pending; this request joins it");
        } else if busy {
            log::info!("{by}: reload queued until the reload, upgrade or drain in progress ends");
        }
    }

    /// Whether workers of another generation than the current one are
    /// still alive (draining, or killed and not yet reaped).
    pub(super) fn draining(&self) -> bool {
        self.predecessor.is_some()
            || self.failed_successor.is_some()
            || self
                .children
                .values()
                .any(|c| c.generation != self.generation)
    }

    /// Starts the pending reload, or else the pending upgrade, once the
    /// master is settled: running, nothing booting, no old generation
    /// draining. So at most two generations are ever alive.
    pub(super) fn start_pending(&mut self) {
        if self.phase != Phase::Running
            || self.reload.is_some()
            || self.upgrade.is_some()
            || self.draining()
        {
            return;
        }
        if let Some(waiters) = self.pending_reload.take() {
            self.start_reload(waiters);
        } else if let Some(waiters) = self.pending_upgrade.take() {
            self.start_upgrade(waiters);
        }
    }

    /// Reads the config again, binds the listeners it adds, and creates the
    /// next generation's pools (forked right after by spawn_missing).
    fn start_reload(&mut self, waiters: Vec<ClientId>) {
        self.last_generation += 1;
        let generation = self.last_generation;
        // Before the config is read: an invalid one is a reload too, and
        // ends with READY=1 like any other (reload_failed).
        let status = self.status_line(Some(generation));
        let mut states = vec![NotifyState::Reloading];
        states.extend(systemd::monotonic_now());
        states.push(NotifyState::Status(&status));
        self.notifier.send(&states);
        self.last_status = status;
        let resolved = match resolve::load(self.config_path.as_deref(), &self.registry) {
            Ok(r) => r,
            Err(e) => {
                self.reload_failed(generation, waiters, &format!("invalid config: {e}"), None);
                return;
            }
        };
        let prefix = format!("reload (generation {generation}): ");
        let new = listeners::bind(&resolved, &self.listeners, &mut Sources::default(), &prefix);
        let added: Vec<String> = match new {
            Ok(new) => {
                let keys = new.iter().map(|l| l.key.clone()).collect();
                self.listeners.extend(new);
                keys
            }
            Err(e) => {
                let reason = listeners::reload_reason(&e, &self.listeners);
                self.reload_failed(generation, waiters, &reason, None);
                return;
            }
        };
        let Resolved { config, plugins } = resolved;
        if config.daemon.pid_file != self.config.daemon.pid_file
            || config.control.path() != self.config.control.path()
        {
            log::warn!(
                "{prefix}[daemon] pid_file and [control] socket changes take effect at the next restart or binary upgrade"
            );
        }
        let pools = Pool::all(&config, plugins, &mut self.stats);
        let total: usize = pools.iter().map(Pool::size).sum();
        log::info!(
            "{prefix}{} is valid; starting {}",
            config.source,
            counted(total, "worker")
        );
        self.reload = Some(Reload {
            generation,
            config,
            pools,
            added,
            started: Instant::now(),
            waiters,
        });
    }

    /// Commits the reload once every worker of the new generation is ready.
    pub(super) fn check_reload(&mut self) {
        let done = self
            .reload
            .as_ref()
            .is_some_and(|r| r.pools.iter().all(|p| p.all_ready(&self.children)));
        if !done {
            return;
        }
        let reload = self.reload.take().expect("checked");
        for svc in &reload.config.services {
            for (key, _) in svc.listen_keys() {
                if reload.added.contains(&key) {
                    continue;
                }
                if let Some(l) = self.listener(&key)
                    && let Err(e) = l.update(
                        svc.backlog,
                        svc.socket_mode,
                        reload.config.daemon.credentials.as_ref(),
                    )
                {
                    log::warn!(
                        "reload: cannot update backlog, mode or owner of {}: {e}",
                        l.bound
                    );
                }
            }
        }
        let old = self.generation;
        self.stop_generation(Some(old), Signal::SIGTERM);
        self.generation = reload.generation;
        self.pools = reload.pools;
        let (pid_file, control) = (
            self.config.daemon.pid_file.clone(),
            self.config.control.clone(),
        );
        let log = self.config.log.clone();
        self.config = reload.config;
        // In force until a restart or upgrade (see start_reload).
        self.config.daemon.pid_file = pid_file;
        self.config.control = control;
        // The level applies at once; the target stays until a restart or
        // binary upgrade (the workers of both generations share it).
        if !self.config.log.same_target(&log) {
            log::warn!(
                "reload: [log] target changes take effect at the next restart or binary upgrade; still logging as before"
            );
            let level = self.config.log.level;
            self.config.log = log;
            self.config.log.level = level;
        }
        crate::log::init(self.config.log.level.filter());
        self.stats.set_generation(self.generation);
        self.stats.reloaded(true);
        self.maintain_at = policy::needs_tick(&self.config).then(Instant::now);
        self.restart_metrics();
        let took = reload.started.elapsed();
        let message = format!(
            "reload (generation {}) succeeded in {}: {}; generation {old} retires",
            self.generation,
            humantime::format_duration(round_ms(took)),
            Pool::summary(&self.pools)
        );
        log::info!("{message}");
        self.last_reload = Some(Outcome {
            generation: self.generation,
            ok: true,
            message,
            reason: String::new(),
            at: SystemTime::now(),
        });
        self.notify_ready();
        let answer = json!({
            "ok": true,
            "generation": self.generation,
            "retiring": old,
            "elapsed_ms": took.as_secs_f64() * 1e3,
        });
        self.reply_all(reload.waiters, &answer);
    }

    /// The reload's new generation failed: stop it, close what it bound,
    /// keep the generation in force, report.
    pub(super) fn abort_reload(&mut self, reason: &str) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        // A worker's "ready" may be in its pipe, unread, in this very
        // wake-up: read it first, or a worker that already accepts would be
        // killed (and its connections reset).
        for c in self.children.values_mut() {
            if c.generation == reload.generation && c.ready_pipe.is_some() {
                c.read_message();
            }
        }
        let pids: Vec<_> = self
            .children
            .iter()
            .filter(|(_, c)| c.generation == reload.generation)
            .map(|(pid, c)| (*pid, c.ready))
            .collect();
        for (pid, ready) in pids {
            if let Some(c) = self.children.get_mut(&pid) {
                c.slot = None;
            }
            if ready {
                // It may have accepted connections: let it finish them.
                self.stop_child(pid, Signal::SIGTERM);
            } else {
                let _ = kill(pid, Signal::SIGKILL);
                if let Some(c) = self.children.get_mut(&pid) {
                    c.kill_at = Some(Instant::now() + FAST_STOP_GRACE);
                    c.killed = true;
                }
            }
        }
        self.close_listeners(&reload.added);
        self.reload_failed(
            reload.generation,
            reload.waiters,
            reason,
            Some(reload.started.elapsed()),
        );
    }

    /// Reports a failed reload: the log, status, the service manager and
    /// the waiting clients.
    fn reload_failed(
        &mut self,
        generation: u64,
        waiters: Vec<ClientId>,
        reason: &str,
        took: Option<Duration>,
    ) {
        let took = took
            .map(|t| format!(" after {}", humantime::format_duration(round_ms(t))))
            .unwrap_or_default();
        let message = format!(
            "reload (generation {generation}) failed{took}: {reason}; generation {} keeps serving",
            self.generation
        );
        log::error!("{message}");
        self.stats.reloaded(false);
        self.last_reload = Some(Outcome {
            generation,
            ok: false,
            message,
            reason: reason.to_string(),
            at: SystemTime::now(),
        });
        if self.phase == Phase::Running {
            self.notify_ready();
        }
        let answer = json!({
            "ok": false,
            "generation": generation,
            "serving": self.generation,
            "error": reason,
        });
        self.reply_all(waiters, &answer);
    }
}

/// A reload request joins the one pending, or becomes it: however many
/// arrive while a reload runs, one more follows it, and every client
/// asking hears its outcome. True if it joined one.
fn join_pending(pending: &mut Option<Vec<ClientId>>, client: Option<ClientId>) -> bool {
    match pending {
        Some(waiters) => {
            waiters.extend(client);
            true
        }
        None => {
            *pending = Some(client.into_iter().collect());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_requests_collapse_into_one_pending() {
        let mut pending = None;
        assert!(!join_pending(&mut pending, None), "SIGHUP starts one");
        assert_eq!(pending, Some(vec![]));
        assert!(join_pending(&mut pending, Some(7)));
        assert!(
            join_pending(&mut pending, None),
            "another SIGHUP adds nothing"
        );
        assert!(join_pending(&mut pending, Some(9)));
        assert_eq!(pending, Some(vec![7, 9]), "one reload, two clients waiting");
    }
}
