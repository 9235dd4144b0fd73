//! What the master tells about itself: the `preforkd status` document,
//! the one-line `STATUS=` for the service manager, `READY=1` at the end
//! of a reload, and the watchdog's `WATCHDOG=1`.
//!
//! Owns: nothing beyond `Master::last_status` and `Master::watchdog_at`.

use std::time::Instant;

use nix::unistd::Pid;
use serde_json::{Value, json};

use super::pool::{Child, Pool};
use super::reload::Outcome;
use super::{Master, Phase};
use crate::systemd::{self, NotifyState};

impl Master {
    /// `READY=1` with the status: the end of a reload, success or not.
    pub(super) fn notify_ready(&mut self) {
        let status = self.status_line(None);
        self.notifier
            .send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.last_status = status;
    }

    /// Sends `STATUS=` when it changed (a worker died or became ready)
    /// while running; transitions send theirs with their message.
    pub(super) fn update_status(&mut self) {
        if self.phase != Phase::Running || !self.notifier.enabled() {
            return;
        }
        let status = self.status_line(self.reload.as_ref().map(|r| r.generation));
        if status != self.last_status {
            self.notifier.send(&[NotifyState::Status(&status)]);
            self.last_status = status;
        }
    }

    /// Sends `WATCHDOG=1` when its timer is due: from the loop, so a master
    /// stuck anywhere stops feeding it. A retiring master leaves that to
    /// its successor.
    pub(super) fn tick_watchdog(&mut self) {
        let (Some(at), Some(every)) = (self.watchdog_at, self.notifier.watchdog_interval()) else {
            return;
        };
        let now = Instant::now();
        if now < at {
            return;
        }
        if matches!(self.phase, Phase::Retiring { .. }) {
            self.watchdog_at = None;
            return;
        }
        self.notifier.send(&[NotifyState::Watchdog]);
        self.watchdog_at = Some(now + every);
    }

    /// How many of the pool's workers are ready.
    pub(super) fn ready_workers(&self, p: &super::pool::Pool) -> usize {
        p.slots
            .iter()
            .filter_map(|s| s.pid)
            .filter(|pid| self.children.get(pid).is_some_and(|c| c.ready))
            .count()
    }

    /// The one-line state for `STATUS=`: `generation 3; echo 4/4 workers;
    /// last reload ok (generation 3)`. `reloading`: the generation a reload
    /// is starting.
    pub(super) fn status_line(&self, reloading: Option<u64>) -> String {
        if let Some(leaving) = self.leaving_status() {
            return systemd::status_text(&leaving);
        }
        let mut parts = vec![format!("generation {}", self.generation)];
        for p in &self.pools {
            let ready = self.ready_workers(p);
            parts.push(format!("{} {ready}/{} workers", p.name(), p.size()));
        }
        parts.extend(reload_part(reloading, self.last_reload.as_ref()));
        systemd::status_text(&parts.join("; "))
    }

    /// The state as `preforkd status` shows it.
    pub(super) fn status(&self) -> Value {
        let now = Instant::now();
        let worker = |pid: &Pid, c: &Child| {
            let counters = c.board.map(|b| self.board.read(b)).unwrap_or_default();
            let state = if self.health.is_stuck(*pid) {
                "stuck"
            } else if c.kill_at.is_some() || c.slot.is_none() {
                "stopping"
            } else if !c.ready {
                "starting"
            } else if counters.active > 0 {
                "busy"
            } else {
                "idle"
            };
            let mut w = json!({
                "pid": pid.as_raw(),
                "name": c.name,
                "generation": c.generation,
                "state": state,
                "served": counters.served,
                "active": counters.active,
                "age_ms": (now - c.started).as_millis() as u64,
            });
            self.board_status(c, &mut w);
            w
        };
        let mut names: Vec<String> = self.pools.iter().map(|p| p.name().to_string()).collect();
        for c in self.children.values() {
            if !names.contains(&c.service) {
                names.push(c.service.clone());
            }
        }
        let services: Vec<Value> = names
            .iter()
            .map(|name| {
                let index = self.pools.iter().position(|p| p.name() == name);
                let pool = index.map(|p| &self.pools[p]);
                let mut workers: Vec<(&Pid, &Child)> = self
                    .children
                    .iter()
                    .filter(|(_, c)| &c.service == name)
                    .collect();
                workers.sort_by_key(|(pid, c)| (c.generation, c.name.clone(), pid.as_raw()));
                let listeners: Vec<String> = pool
                    .map(|p| {
                        p.listeners
                            .iter()
                            .filter_map(|k| self.listener(k))
                            .map(|l| l.bound.to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                let (idle, busy) = index.map_or((0, 0), |p| self.idle_busy(p));
                json!({
                    "name": name,
                    "plugin": pool.map(|p| p.plugin.name.clone()),
                    "size": pool.map(Pool::size),
                    "pool": pool.map(|p| p.config.pool_kind().to_string()),
                    "mode": pool.map(|p| p.config.mode().to_string()),
                    "worker_connections": pool
                        .map(|p| p.config.worker_connections)
                        .filter(|&n| n > 0),
                    "idle": idle,
                    "busy": busy,
                    "max_workers": pool.and_then(|p| p.config.max_workers.as_ref().map(|m| *m.get_ref())),
                    "pool_at_max": pool.map_or(0, |p| self.at_max_count(p)),
                    "recycling": pool.and_then(|p| p.recycle.as_ref().map(|r| r.old.as_raw())),
                    "listeners": listeners,
                    "workers": workers.into_iter().map(|(p, c)| worker(p, c)).collect::<Vec<_>>(),
                })
            })
            .collect();
        let phase = match &self.phase {
            Phase::Starting => "starting".to_string(),
            Phase::Running if self.shutdown_at.is_some() => "shutdown delay".to_string(),
            Phase::Running => "running".to_string(),
            Phase::Stopping { fast: false } => "stopping".to_string(),
            Phase::Stopping { fast: true } => "stopping (fast)".to_string(),
            Phase::Retiring { successor } => format!("retiring (replaced by {successor})"),
        };
        let last = self.last_reload.as_ref().map(|o| {
            json!({
                "generation": o.generation,
                "ok": o.ok,
                "message": o.message,
                "at": humantime::format_rfc3339_seconds(o.at).to_string(),
            })
        });
        json!({
            "ok": true,
            "pid": self.pid.as_raw(),
            "state": phase,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "generation": self.generation,
            "config": self.config.source.to_string(),
            "reload": {
                "in_progress": self.reload.as_ref().map(|r| r.generation),
                "pending": self.pending_reload.is_some(),
                "last": last,
            },
            "upgrade": {
                "in_progress": self.upgrade.as_ref().map(|u| u.pid.as_raw()),
                "pending": self.pending_upgrade.is_some(),
                "previous_master_draining": self.predecessor.is_some(),
            },
            "services": services,
        })
    }
}

/// The reload part of `STATUS=`: the reload starting, or how the last one
/// ended (a failure by its reason, the whole message being too long).
fn reload_part(reloading: Option<u64>, last: Option<&Outcome>) -> Option<String> {
    match (reloading, last) {
        (Some(g), _) => Some(format!("reloading (generation {g})")),
        (None, Some(o)) if o.ok => Some(format!("last reload ok (generation {})", o.generation)),
        (None, Some(o)) => Some(format!(
            "last reload failed (generation {}): {}",
            o.generation, o.reason
        )),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn outcome(ok: bool, reason: &str) -> Outcome {
        Outcome {
            generation: 4,
            ok,
            message: format!(
                "reload (generation 4) failed after 12ms: {reason}; generation 3 keeps serving"
            ),
            reason: reason.into(),
            at: SystemTime::now(),
        }
    }

    #[test]
    fn the_status_quotes_a_failed_reload_by_its_reason() {
        let failed = outcome(false, "invalid config: /x.toml:3:1: bad; really");
        assert_eq!(
            reload_part(None, Some(&failed)).as_deref(),
            Some("last reload failed (generation 4): invalid config: /x.toml:3:1: bad; really"),
            "a reason with '; ' in it is kept whole"
        );
        assert_eq!(
            reload_part(None, Some(&outcome(true, ""))).as_deref(),
            Some("last reload ok (generation 4)")
        );
        assert_eq!(
            reload_part(Some(5), Some(&failed)).as_deref(),
            Some("reloading (generation 5)"),
            "a reload starting is what counts"
        );
        assert_eq!(reload_part(None, None), None);
    }
}
