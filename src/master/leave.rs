//! Leaving a load balancer's pool without losing a client: the shutdown
//! delay, the two-step sealing of the listeners on a graceful stop, and
//! what `/ready` and `/live` read (the master's readiness and heartbeat in
//! the shared counters, src/stats.rs).
//!
//! A graceful stop (SIGTERM, `preforkd stop`):
//!
//! 1. With `shutdown_delay`, the master first reports not ready (`/ready`
//!    503, status "shutdown delay", sd_notify `STATUS=`) and serves on for
//!    that long: the balancer's health checks see it and send no more
//!    clients (Kubernetes removes the endpoint while the pod is already
//!    stopping).
//! 2. No new client gets in ([`Listener::refuse_new_clients`]): a TCP
//!    listener drops new SYNs (the client's SYN goes unanswered, then is
//!    refused once the socket closes); a Unix listener's file goes and
//!    connect() is refused. Workers go on serving and accepting.
//! 3. Once no handshake is half open on our TCP ports (at most
//!    [`SEAL_WAIT`]), each TCP listener drops every segment
//!    ([`Listener::seal`]): its queue can only shrink. Then the workers
//!    are told to stop; each one accepts until the queue is empty
//!    ([`crate::listener::is_sealed`]) and serves all of it.
//! 4. Once a TCP listener's queue is empty (for good), it is shut down:
//!    a client arriving from then on is refused at once.
//!
//! The `[metrics]` listener is left open, so that health checks read 503
//! until the end; the metrics process stops when the last worker is gone.
//!
//! Owns: the sealed TCP listeners until their queues are empty, and the
//! two deadlines on [`Master`].

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{Master, Phase};
use crate::listener;
use crate::stats::Readiness;
use crate::sys;
use crate::systemd::NotifyState;

/// The longest a stop waits for half-open handshakes to complete before it
/// seals the listeners: a client whose final ACK is lost retransmits it
/// after about a second (the SYN-ACK timer), past which waiting helps
/// little.
pub const SEAL_WAIT: Duration = Duration::from_secs(1);
/// How often the master looks again meanwhile.
const SEAL_POLL: Duration = Duration::from_millis(10);
/// The master's loop turns at least this often, for `/live`.
pub const BEAT: Duration = Duration::from_secs(1);

impl Master {
    /// SIGTERM or `preforkd stop`: the shutdown delay first, if the
    /// daemon is serving and has one; the graceful stop otherwise.
    pub(super) fn stop_gracefully(&mut self, by: &str) {
        let delay = self.config.daemon.shutdown_delay;
        if self.phase != Phase::Running || delay.is_zero() {
            log::info!("{by}: graceful stop");
            self.begin_stop(false);
            return;
        }
        if self.shutdown_at.is_some() {
            log::info!("{by}: already in the shutdown delay (SIGINT or SIGQUIT stops now)");
            return;
        }
        log::info!(
            "{by}: not ready; serving on for shutdown_delay ({}), then a graceful stop",
            humantime::format_duration(delay)
        );
        self.shutdown_at = Some(Instant::now() + delay);
        if self.reload.is_some() {
            self.abort_reload("the master is stopping");
        }
        let status = self.leaving_status().unwrap_or_default();
        self.notifier.send(&[NotifyState::Status(&status)]);
        self.last_status = status;
    }

    /// Why a reload or an upgrade cannot start now, if it cannot.
    pub(super) fn refuses_changes(&self) -> Option<String> {
        self.phase.refuses_changes().or_else(|| {
            self.shutdown_at
                .map(|_| "the master is stopping (shutdown delay)".to_string())
        })
    }

    /// The `STATUS=` text while the shutdown delay runs.
    pub(super) fn leaving_status(&self) -> Option<String> {
        let at = self.shutdown_at?;
        let left = at.saturating_duration_since(Instant::now());
        Some(format!(
            "shutdown delay: not ready, stopping in {}s",
            left.as_millis().div_ceil(1000)
        ))
    }

    /// Each turn of the loop: the end of the shutdown delay, and the seal
    /// of a graceful stop.
    pub(super) fn check_leaving(&mut self) {
        if self.shutdown_at.is_some_and(|at| Instant::now() >= at) {
            self.shutdown_at = None;
            log::info!("shutdown delay over: graceful stop");
            self.begin_stop(false);
        }
        self.check_seal();
        self.check_drained();
    }

    /// The timers of [`check_leaving`](Self::check_leaving), and the
    /// heartbeat's.
    pub(super) fn leaving_deadlines(&self) -> impl Iterator<Item = Instant> + use<> {
        let seal = self.seal_by.map(|by| by.min(Instant::now() + SEAL_POLL));
        let drained = (!self.sealed.is_empty()).then(|| Instant::now() + SEAL_POLL);
        [self.shutdown_at, seal, drained, Some(Instant::now() + BEAT)]
            .into_iter()
            .flatten()
    }

    /// Step 2 of a graceful stop: no new client gets in, what is queued
    /// stays. The workers are told to stop once the listeners are sealed.
    pub(super) fn refuse_new_clients(&mut self) {
        let metrics = self.config.metrics.listen_key();
        for l in &mut self.listeners {
            // Shared: the previous master's still (a failed upgrade); the
            // metrics socket stays open for health checks.
            if l.shared || metrics.as_deref() == Some(l.key.as_str()) {
                continue;
            }
            if let Err(e) = l.refuse_new_clients() {
                log::warn!(
                    "cannot stop new clients on {} ({e}): new clients may be reset at the stop",
                    l.bound
                );
            }
        }
        self.seal_by = Some(Instant::now() + SEAL_WAIT);
        self.check_seal();
    }

    /// Step 3: once no handshake is half open (or at [`SEAL_WAIT`]), seals
    /// the listeners, tells every worker to stop, and lets go of them.
    fn check_seal(&mut self) {
        let Some(by) = self.seal_by else { return };
        let metrics = self.config.metrics.listen_key();
        let ours = |l: &&crate::listener::Listener| {
            !l.shared && metrics.as_deref() != Some(l.key.as_str())
        };
        let tcp: Vec<_> = self
            .listeners
            .iter()
            .filter(ours)
            .filter_map(|l| l.tcp_bound())
            .collect();
        let half_open = listener::half_open(&tcp);
        if half_open > 0 && Instant::now() < by {
            return;
        }
        if half_open > 0 {
            log::info!(
                "{half_open} handshakes still half open after {}: sealing the listeners anyway",
                humantime::format_duration(SEAL_WAIT)
            );
        }
        self.seal_by = None;
        for l in self.listeners.iter().filter(ours) {
            if let Err(e) = l.seal() {
                log::warn!(
                    "cannot seal {} ({e}): a client arriving now may be reset at the stop",
                    l.bound
                );
            }
        }
        self.stop_generation(None, Signal::SIGTERM);
        for mut l in self.listeners.drain(..) {
            if l.shared {
                continue;
            }
            l.remove_file();
            // Kept until the workers have emptied its queue (below).
            if l.tcp_bound().is_some() && metrics.as_deref() != Some(l.key.as_str()) {
                self.sealed.push(l);
            }
        }
        self.check_drained();
    }

    /// Step 4: a sealed TCP listener whose queue the workers have emptied
    /// (for good: nothing joins it) is shut down, in every process that
    /// has it, so that a client arriving now is refused at once instead of
    /// waiting for the last worker to exit with its SYNs unanswered.
    fn check_drained(&mut self) {
        self.sealed.retain(|l| {
            let left = sys::listen_queue(l.as_fd()).map_or(0, |(queued, _)| queued);
            if left > 0 {
                return true;
            }
            l.stop_accepting();
            false
        });
    }

    /// Publishes the master's heartbeat and readiness for `/live` and
    /// `/ready` (two stores; the metrics process reads them).
    pub(super) fn publish_health(&self) {
        self.stats.beat(sys::coarse_ms());
        self.stats.set_readiness(self.readiness());
    }

    fn readiness(&self) -> Readiness {
        match self.phase {
            Phase::Stopping { .. } => return Readiness::Stopping,
            Phase::Retiring { .. } => return Readiness::Retiring,
            Phase::Starting | Phase::Running => {}
        }
        if let Some(at) = self.shutdown_at {
            let left = at.saturating_duration_since(Instant::now());
            return Readiness::Delay {
                until_ms: sys::coarse_ms() + left.as_millis() as u64,
            };
        }
        // Every service can serve: a ready worker at least (an ondemand
        // pool with none watches its listeners and starts one).
        for p in &self.pools {
            let ready = self.ready_workers(p);
            let size = p.size();
            if ready == 0 && size > 0 {
                return Readiness::Short {
                    service: p.stats.unwrap_or(usize::MAX),
                    ready: ready as u64,
                    size: size as u64,
                };
            }
        }
        if self.phase == Phase::Starting {
            return Readiness::Starting;
        }
        Readiness::Ready
    }
}
