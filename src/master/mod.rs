//! The master: binds every listener, forks each service's pool of workers,
//! reaps and replaces them, and stops them on signals. It runs no handler
//! code and never blocks anywhere but in one poll(2).
//!
//! The loop ([`Master::run`]; gunicorn's arbiter and nginx's master cycle,
//! in their fixed order): wait in one poll(2) (wake.rs) → drain the
//! signals → reap every exited child → read ready messages → answer
//! control requests → act on signals by priority (fast stop, graceful
//! stop, reload, upgrade, scaling) → commit a reload whose generation is
//! ready (reload.rs) → enforce deadlines → kill stuck workers (health.rs)
//! → exit when stopping and no child is left → start a pending reload or
//! upgrade (handover.rs) → apply the pool policy (policy.rs) → spawn what
//! the pools lack (pool.rs) and the `[metrics]` process
//! (metrics_child.rs) → tell the service manager (status.rs). Apart from
//! poll, the only wait is `std::process::Command::spawn` for the exec of a
//! binary upgrade.
//!
//! What happens to the daemon is decided here: the other files act on
//! their part of the state and return what they found (a worker's end is
//! a `Verdict` of pool.rs; a failed start becomes [`MasterError`], which the
//! CLI turns into the exit status).
//!
//! The files: `wake.rs` the one poll; `pool.rs` pools, slots, workers,
//! spawn and stop; `listeners.rs` where each socket comes from;
//! `reload.rs` the reload transaction; `handover.rs` binary upgrade and
//! the pid file; `status.rs` status, `STATUS=` and the watchdog;
//! `policy.rs` adaptive pools and recycling; `health.rs` stuck workers;
//! `metrics_child.rs` the metrics process.
//!
//! Owns: all master state, in [`Master`]; the listeners (until exit); the
//! read ends of the workers' ready pipes; the pid file.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::config::Config;
use crate::control::{self, ClientId, Request};
use crate::exit::{ChildExit, code};
use crate::handler::Registry;
use crate::listener::{ListenError, Listener};
use crate::resolve::Resolved;
use crate::scoreboard::Scoreboard;
use crate::signals::{Event, Signals};
use crate::stats::Stats;
use crate::sys;
use crate::systemd::{self, Notifier, NotifyState};
use crate::upgrade::{self, Exec, Inherited};

mod handover;
mod health;
mod leave;
mod listeners;
mod metrics_child;
mod policy;
mod pool;
mod reload;
mod status;
mod wake;

use listeners::Sources;
use pool::{Child, Pool, Verdict};

/// How long a fast stop (SIGINT, SIGQUIT) waits before SIGKILL.
pub const FAST_STOP_GRACE: Duration = Duration::from_secs(1);

/// Why the master could not run. The CLI maps each to its exit status.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// A listener could not be bound (exit 69), or a socket systemd should
    /// have passed is missing or of the wrong kind (exit 78).
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

fn sys_err(syscall: &'static str) -> impl FnOnce(io::Error) -> MasterError {
    move |source| MasterError::Sys { syscall, source }
}

/// Where the master is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The first generation is booting; a boot failure stops everything.
    Starting,
    /// Serving; dead workers are replaced; reloads and upgrades may run.
    Running,
    /// Stopping: nothing is respawned; exit once no child is left.
    Stopping {
        /// SIGINT/SIGQUIT (workers exit now) rather than SIGTERM (drain).
        fast: bool,
    },
    /// A binary upgrade handed everything to the next master: the workers
    /// drain, then this master exits, touching no listener or file.
    Retiring {
        /// The master that took over.
        successor: Pid,
    },
}

impl Phase {
    /// Why a reload or upgrade cannot start in this phase, if it cannot.
    pub fn refuses_changes(&self) -> Option<String> {
        match self {
            Phase::Stopping { .. } => Some("the master is stopping".into()),
            Phase::Retiring { successor } => Some(format!(
                "this master is retiring; master pid {successor} took over"
            )),
            Phase::Starting | Phase::Running => None,
        }
    }

    /// Whether the master is on its way out (nothing is respawned).
    pub fn is_leaving(&self) -> bool {
        matches!(self, Phase::Stopping { .. } | Phase::Retiring { .. })
    }
}

/// What the master needs besides the config: where the config came from
/// (to read it again on reload), how to run the next master (binary
/// upgrade), and what a previous master handed over.
#[derive(Default)]
pub struct Startup {
    /// The config file (None: the embedded default).
    pub config_path: Option<PathBuf>,
    /// The next master's command line; None: upgrades are refused.
    pub exec: Option<Exec>,
    /// Sockets and the readiness pipe from the previous master.
    pub inherited: Option<Inherited>,
    /// Where to send sd_notify messages (the default: nowhere).
    pub notifier: Notifier,
    /// Sockets passed by systemd (socket activation).
    pub activated: Vec<systemd::Activated>,
}

/// The master process's whole state.
pub struct Master {
    phase: Phase,
    /// The plugins, to resolve the config again on reload (only their
    /// names and socket kinds are used here).
    registry: Registry,
    config: Config,
    config_path: Option<PathBuf>,
    exec: Option<Exec>,
    /// The generation in force, and its pools.
    generation: u64,
    pools: Vec<Pool>,
    /// The highest generation number handed out (failed reloads use one).
    last_generation: u64,
    reload: Option<reload::Reload>,
    /// A reload asked for while another is in progress or a generation
    /// still drains: the clients waiting for it (none for SIGHUP).
    pending_reload: Option<Vec<ClientId>>,
    last_reload: Option<reload::Outcome>,
    upgrade: Option<handover::Upgrade>,
    pending_upgrade: Option<Vec<ClientId>>,
    /// Control clients waiting for the stop to end.
    stop_waiters: Vec<ClientId>,
    /// Every listening socket, shared by the generations that name it.
    listeners: Vec<Listener>,
    control: Option<control::Server>,
    /// Set in a new master until the old one has been told we are ready.
    handover: Option<(OwnedFd, Option<i32>)>,
    /// In a new master: EOF once the old master (and so its workers) has
    /// exited. Until then its generation counts as draining.
    predecessor: Option<OwnedFd>,
    /// The next master of a failed upgrade, told to stop: draining until it
    /// is reaped, SIGKILLed at the deadline.
    failed_successor: Option<(Pid, Instant)>,
    /// Set while failing an upgrade whose new master has already exited.
    successor_gone: bool,
    /// The pid file this master wrote on taking over (binary upgrade, or a
    /// failed one), locked with flock as daemonize locks the first: while
    /// this master runs, a second `--daemon` on the same file is refused.
    pid_lock: Option<nix::fcntl::Flock<std::fs::File>>,
    /// In a new master: inherited Unix sockets the config no longer names,
    /// whose files are removed once the handover is done.
    orphans: Vec<Listener>,
    /// In an old master that handed over: the write end of the new master's
    /// `predecessor` pipe, closed by our exit.
    lifeline: Option<OwnedFd>,
    children: HashMap<Pid, Child>,
    board: Scoreboard,
    signals: Signals,
    pid: Pid,
    pid_file: Option<PathBuf>,
    started: Instant,
    /// Set when the first generation fails; the master exits with it.
    boot_failure: Option<MasterError>,
    /// sd_notify messages to the service manager.
    notifier: Notifier,
    /// The last `STATUS=` sent, so that only changes are sent.
    last_status: String,
    /// When to send the next `WATCHDOG=1`.
    watchdog_at: Option<Instant>,
    /// The master's counters, shared with the metrics child.
    stats: Stats,
    /// When the next maintenance tick runs (pool policy, recycling,
    /// sampling); None: no service or endpoint needs one.
    maintain_at: Option<Instant>,
    /// The `[metrics]` child.
    metrics: metrics_child::MetricsChild,
    /// The stuck-worker check (`timeout`).
    health: health::Health,
    /// SIGTERM came with a `shutdown_delay`: the graceful stop begins then.
    shutdown_at: Option<Instant>,
    /// A graceful stop waits for half-open handshakes until then, at most,
    /// before it seals the listeners and stops the workers (leave.rs).
    seal_by: Option<Instant>,
    /// A graceful stop's sealed TCP listeners, until the workers have
    /// emptied their queues (leave.rs).
    sealed: Vec<Listener>,
}

impl Master {
    /// Binds (or adopts) every listener and the control socket, and
    /// installs the signal handlers. Nothing is forked yet; a bind failure
    /// leaves no socket file behind. A new master of an upgrade that
    /// cannot start tells the old one why.
    pub fn new(
        resolved: Resolved,
        registry: Registry,
        startup: Startup,
    ) -> Result<Master, MasterError> {
        sys::assert_single_threaded().map_err(sys_err("assert_single_threaded"))?;
        let Startup {
            config_path,
            exec,
            mut inherited,
            mut notifier,
            activated,
        } = startup;
        let mut notify = inherited.as_mut().and_then(|i| i.notify.take());
        let (mut listeners, control) = open_sockets(&resolved, inherited.as_mut(), activated)
            .map_err(|e| report(notify.take(), e))?;
        let take = handover::take_over(inherited, notify, &mut notifier);
        let pid = nix::unistd::getpid();
        let Resolved { config, plugins } = resolved;
        let pid_file = config.daemon.pid_file.clone();
        // A new master of an upgrade writes the pid file once it is ready
        // (until then the old master is the one to signal); a daemon's is
        // written (and locked) by daemonize.
        let write_pid = take.handover.is_none() && !crate::daemon::is_daemon();
        let (signals, board, mut stats) = match setup(write_pid, pid_file.as_deref(), pid) {
            Ok(s) => s,
            Err(e) => {
                listeners::close(&mut listeners);
                return Err(report(take.handover.map(|(fd, _)| fd), e));
            }
        };
        let pools = Pool::all(&config, plugins, &mut stats);
        stats.set_generation(take.generation);
        Ok(Master {
            phase: Phase::Starting,
            registry,
            maintain_at: policy::needs_tick(&config).then(Instant::now),
            config,
            config_path,
            exec,
            generation: take.generation,
            pools,
            last_generation: take.generation,
            reload: None,
            pending_reload: None,
            last_reload: None,
            upgrade: None,
            pending_upgrade: None,
            stop_waiters: Vec::new(),
            listeners,
            control,
            handover: take.handover,
            predecessor: take.predecessor,
            failed_successor: None,
            pid_lock: None,
            successor_gone: false,
            orphans: take.orphans,
            lifeline: None,
            children: HashMap::new(),
            board,
            signals,
            pid,
            pid_file,
            started: Instant::now(),
            boot_failure: None,
            watchdog_at: notifier.watchdog_interval().map(|_| Instant::now()),
            notifier,
            last_status: String::new(),
            stats,
            metrics: metrics_child::MetricsChild::default(),
            health: health::Health::default(),
            shutdown_at: None,
            seal_by: None,
            sealed: Vec::new(),
        })
    }

    /// Runs until the daemon stops; returns the exit code (0 after a stop).
    pub fn run(mut self) -> Result<i32, MasterError> {
        sys::set_title("preforkd: master");
        let total: usize = self.pools.iter().map(Pool::size).sum();
        log::info!(
            "master pid {} starting {} in {} (generation {})",
            self.pid,
            counted(total, "worker"),
            counted(self.pools.len(), "service"),
            self.generation
        );
        self.spawn();
        // A config of ondemand pools only has no worker to wait for.
        self.check_start();
        loop {
            // Records a TCP syslog connection still holds (nonblocking).
            log::logger().flush();
            let woke = self.wait()?;
            self.tick_watchdog();
            let events = self.signals.drain();
            self.reap();
            for &pid in &woke.ready {
                self.read_ready(pid);
            }
            if woke.upgrade {
                self.read_upgrade();
            }
            if woke.predecessor_gone && self.predecessor.take().is_some() {
                log::info!("the previous master has exited with all its workers");
            }
            let requests = self.control.as_mut().map(|c| c.take_requests());
            for (client, request) in requests.unwrap_or_default() {
                self.on_request(client, request);
            }
            for (event, count) in events {
                self.on_signal(event, count);
            }
            self.check_start();
            self.check_reload();
            self.enforce_deadlines();
            self.check_health();
            self.check_leaving();
            self.publish_health();
            if let Some(c) = &mut self.control {
                c.expire(Instant::now());
            }
            if self.phase.is_leaving() {
                if self.children.is_empty() {
                    // Health checks read 503 until here.
                    self.stop_metrics();
                    return self.finish();
                }
                continue;
            }
            self.start_pending();
            self.close_unused_listeners();
            self.adapt(&woke.listeners);
            self.spawn();
            self.sync_states();
            self.update_status();
        }
    }

    /// Forks what the pools lack, and the metrics process.
    fn spawn(&mut self) {
        if let Some(verdict) = self.spawn_missing() {
            self.act(verdict);
        }
        self.spawn_metrics();
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

    /// A child exited: the next master of an upgrade, the metrics process,
    /// or a worker.
    fn on_exit(&mut self, pid: Pid, exit: ChildExit) {
        if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
            self.upgrade_exited(exit);
            return;
        }
        if self.failed_successor.is_some_and(|(p, _)| p == pid) {
            log::info!("the new master of the failed upgrade (pid {pid}) {exit}");
            self.failed_successor = None;
            return;
        }
        if self.metrics_exited(pid, exit) {
            return;
        }
        let Some(child) = self.children.remove(&pid) else {
            match self.phase {
                Phase::Retiring { successor } if successor == pid => {
                    log::warn!("the new master (pid {pid}) {exit}");
                }
                _ => log::debug!("reaped pid {pid}, not a worker: {exit}"),
            }
            return;
        };
        if let Some(verdict) = self.worker_exited(pid, child, exit) {
            self.act(verdict);
        }
    }

    /// Acts on what a worker's end means for the daemon.
    fn act(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::BootFailed {
                pool,
                worker,
                reason,
            } => self.fail_start(pool, &worker, reason),
            Verdict::ReloadFailed(reason) => self.abort_reload(&reason),
        }
    }

    /// Kills workers past their stop or ready deadline, and a next master
    /// late for its upgrade.
    fn enforce_deadlines(&mut self) {
        for verdict in self.enforce_child_deadlines() {
            self.act(verdict);
        }
        self.enforce_upgrade_deadlines(Instant::now());
    }

    /// The first generation failed: report why, stop what did start, and
    /// exit non-zero once it is gone (no crash loop at start).
    fn fail_start(&mut self, pool: usize, worker: &str, reason: String) {
        if self.boot_failure.is_some() {
            return;
        }
        let service = self.pools[pool].name().to_string();
        log::error!("service {service}: worker {worker} failed to boot: {reason}; stopping");
        if let Some((notify, _)) = self.handover.take() {
            upgrade::report_error(notify, &format!("service {service}: {reason}"));
        }
        self.boot_failure = Some(MasterError::Boot { service, reason });
        self.begin_stop(false);
    }

    /// Starting → Running once every slot has a ready worker.
    fn check_start(&mut self) {
        if self.phase != Phase::Starting || !self.pools.iter().all(|p| p.all_ready(&self.children))
        {
            return;
        }
        self.phase = Phase::Running;
        log::info!("ready: {}", Pool::summary(&self.pools));
        // `--daemon`: the launcher may exit 0 now.
        crate::daemon::ready();
        let upgraded = self.handover.is_some();
        self.complete_handover();
        if self.phase != Phase::Running {
            return; // the handover failed: we are stopping
        }
        let status = self.status_line(None);
        let mut states = vec![NotifyState::Ready, NotifyState::Status(&status)];
        if upgraded {
            // We are the service's main process now. The old master says
            // so too (announce_successor); whichever message the service
            // manager reads first, the outcome is the same.
            states.insert(0, NotifyState::MainPid(self.pid.as_raw() as u32));
        }
        self.notifier.send(&states);
        self.last_status = status;
    }

    /// One signal (that arrived `count` times since the last wake-up).
    fn on_signal(&mut self, event: Event, count: usize) {
        match event {
            Event::Reap => {} // reaped on every wake-up anyway
            Event::FastStop(signal) => self.handle_fast_stop(signal.as_str()),
            Event::GracefulStop => self.handle_term(),
            Event::Reload => self.request_reload(None, "SIGHUP"),
            Event::Reopen => self.reopen_logs(),
            Event::Upgrade => self.request_upgrade(None, "SIGUSR2"),
            Event::MoreWorkers => self.handle_ttin(count),
            Event::FewerWorkers => self.handle_ttou(count),
        }
    }

    /// SIGINT, SIGQUIT: workers exit now, then the master.
    fn handle_fast_stop(&mut self, signal: &str) {
        log::info!("{signal}: fast stop");
        self.begin_stop(true);
    }

    /// SIGTERM: graceful stop, after the shutdown delay.
    fn handle_term(&mut self) {
        match self.phase {
            Phase::Stopping { .. } => log::info!("SIGTERM: already stopping"),
            Phase::Retiring { successor } => {
                log::info!("SIGTERM: already retiring (master pid {successor} took over)")
            }
            _ => self.stop_gracefully("SIGTERM"),
        }
    }

    /// SIGUSR1: reopen the log target here and in every worker.
    fn reopen_logs(&mut self) {
        crate::log::reopen();
        // Children may run as another user: they take the new file from
        // us instead of opening it (log.rs).
        let children = self.children.len() + usize::from(self.metrics.pid.is_some());
        let missed = crate::log::hand_out_reopened(children);
        if missed > 0 {
            log::warn!("SIGUSR1: the new log file could not be handed to {missed} workers");
        }
        // Signalled before the line is written: whoever reads it knows
        // every worker has the request pending.
        for pid in self.children.keys().chain(&self.metrics.pid) {
            let _ = kill(*pid, Signal::SIGUSR1);
        }
        log::info!(
            "SIGUSR1: log files reopened; told {}",
            counted(self.children.len(), "worker")
        );
    }

    /// Stops the daemon: every worker is told to stop, listeners stop
    /// accepting and are closed, socket files removed. SIGINT during a
    /// graceful stop turns it into a fast one. The control socket stays
    /// open until the exit, so that `status` works while workers drain.
    fn begin_stop(&mut self, fast: bool) {
        let sig = if fast {
            Signal::SIGQUIT
        } else {
            Signal::SIGTERM
        };
        match self.phase {
            Phase::Stopping { fast: true } => return,
            Phase::Stopping { fast: false } if !fast => return,
            Phase::Retiring { .. } => {
                // The listeners and files belong to the next master now.
                if fast {
                    self.stop_generation(None, sig);
                }
                return;
            }
            _ => {}
        }
        // Stopping before the reload is aborted: a reload that ends in a
        // stop does not tell the service manager READY=1.
        self.phase = Phase::Stopping { fast };
        self.shutdown_at = None;
        let status = match &self.boot_failure {
            Some(e) => systemd::status_text(&format!("stopping: {e}")),
            None if fast => "stopping (fast)".to_string(),
            None => "stopping (graceful)".to_string(),
        };
        self.notifier
            .send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
        self.last_status = status;
        if self.reload.is_some() {
            self.abort_reload("the master is stopping");
        }
        if let Some(up) = self.upgrade.take() {
            // Its own stop is graceful, and never touches the listeners it
            // shares with us until its handover.
            let _ = kill(up.pid, Signal::SIGTERM);
            self.reply_all(up.waiters, &control::error("the master is stopping"));
        }
        for waiters in [self.pending_reload.take(), self.pending_upgrade.take()]
            .into_iter()
            .flatten()
        {
            self.reply_all(waiters, &control::error("the master is stopping"));
        }
        if !fast {
            // Nothing queued is lost: the workers are told to stop once no
            // new client can join the queues (leave.rs).
            self.refuse_new_clients();
            return;
        }
        self.seal_by = None;
        for l in self.sealed.drain(..) {
            l.stop_accepting();
        }
        self.stop_generation(None, sig);
        self.stop_metrics();
        for mut l in self.listeners.drain(..) {
            // A listener still shared with the previous master (an upgrade
            // that failed to boot) is its, not ours, to shut.
            if !l.shared {
                l.stop_accepting();
                l.remove_file();
            }
        }
    }

    /// Last step of a stop: answer `stop`, remove the pid file, report the
    /// outcome.
    fn finish(mut self) -> Result<i32, MasterError> {
        let answer = match &self.boot_failure {
            Some(e) => control::error(&e.to_string()),
            None => json!({"ok": true, "stopped": true, "pid": self.pid.as_raw()}),
        };
        // Files first, answer last: whoever waits for `stop` finds them gone.
        if let Some(c) = &mut self.control {
            c.close_listener(matches!(self.phase, Phase::Retiring { .. }));
        }
        if let Some(path) = self.pid_file.take() {
            // Only our own: after an upgrade that failed late, it may name
            // another master.
            let ours =
                std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == self.pid.to_string());
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
        let waiters = std::mem::take(&mut self.stop_waiters);
        self.reply_all(waiters, &answer);
        if let Some(mut c) = self.control.take() {
            c.finish();
            // The clients' connections close with the process itself, so
            // a `preforkd stop` that waits for EOF after its answer returns
            // once the master has really exited.
            std::mem::forget(c);
        }
        match self.boot_failure.take() {
            Some(e) => Err(e),
            None => {
                match self.phase {
                    Phase::Retiring { successor } => log::info!(
                        "master pid {} exiting; master pid {successor} carries on",
                        self.pid
                    ),
                    _ => log::info!("master pid {} exiting", self.pid),
                }
                Ok(code::OK)
            }
        }
    }

    fn reply(&mut self, client: ClientId, answer: &Value) {
        if let Some(c) = &mut self.control {
            c.reply(client, answer);
        }
    }

    fn reply_all(&mut self, clients: Vec<ClientId>, answer: &Value) {
        for client in clients {
            self.reply(client, answer);
        }
    }

    /// A control request.
    fn on_request(&mut self, client: ClientId, request: Request) {
        if request != Request::Status
            && let Some((_, from)) = &self.handover
        {
            // Until the handover, the old master is in charge: a stop here
            // would leave it serving, a reload would not be its.
            let from = from.map_or_else(|| "?".to_string(), |p| p.to_string());
            let answer = control::error(&format!(
                "this master is still taking over from master pid {from} (binary upgrade); ask again when the upgrade is done"
            ));
            self.reply(client, &answer);
            return;
        }
        match request {
            Request::Status => {
                let status = self.status();
                self.reply(client, &status);
            }
            Request::Reload => self.request_reload(Some(client), "control"),
            Request::Upgrade => self.request_upgrade(Some(client), "control"),
            Request::Stop => {
                self.stop_waiters.push(client);
                if !self.phase.is_leaving() {
                    self.stop_gracefully("control");
                }
            }
            Request::Scale { service, workers } => {
                let answer = self.scale(&service, workers as usize);
                self.reply(client, &answer);
            }
        }
    }
}

/// Binds or adopts every socket of the config, and the control socket;
/// warns of systemd's sockets that no service names. On error nothing is
/// left bound.
fn open_sockets(
    resolved: &Resolved,
    inherited: Option<&mut Inherited>,
    activated: Vec<systemd::Activated>,
) -> Result<(Vec<Listener>, Option<control::Server>), MasterError> {
    let mut sources = Sources {
        inherited,
        activated,
    };
    let mut bound = listeners::bind(resolved, &[], &mut sources, "")?;
    let Sources {
        inherited,
        activated,
    } = sources;
    let control = match listeners::open_control(&resolved.config, inherited) {
        Ok(c) => c,
        Err(e) => {
            listeners::close(&mut bound);
            return Err(e.into());
        }
    };
    for a in activated {
        log::warn!(
            "systemd passed a socket named {:?} that no service uses; closing it (name it in a listen entry as \"systemd:{}\")",
            a.name,
            a.name
        );
    }
    Ok((bound, control))
}

/// The pid file, the scoreboard, the signal handlers and the counters.
fn setup(
    write_pid: bool,
    pid_file: Option<&std::path::Path>,
    pid: Pid,
) -> Result<(Signals, Scoreboard, Stats), MasterError> {
    if write_pid {
        handover::write_pid_file(pid_file, pid)?;
    }
    let board = Scoreboard::new().map_err(sys_err("mmap"))?;
    let signals = Signals::install().map_err(sys_err("sigaction"))?;
    let stats = Stats::new().map_err(sys_err("mmap"))?;
    Ok((signals, board, stats))
}

/// In a new master of an upgrade: tells the old master why we cannot
/// start (it keeps serving).
fn report(notify: Option<OwnedFd>, e: MasterError) -> MasterError {
    if let Some(fd) = notify {
        upgrade::report_error(fd, &e.to_string());
    }
    e
}

/// `1 worker`, `2 workers`: a count and its noun, for messages.
pub fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A duration to the millisecond, for the log.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_and_upgrades_are_refused_once_leaving() {
        assert_eq!(Phase::Starting.refuses_changes(), None);
        assert_eq!(Phase::Running.refuses_changes(), None);
        assert_eq!(
            Phase::Stopping { fast: false }.refuses_changes().as_deref(),
            Some("the master is stopping")
        );
        let successor = Pid::from_raw(42);
        assert_eq!(
            Phase::Retiring { successor }.refuses_changes().as_deref(),
            Some("this master is retiring; master pid 42 took over")
        );
        assert!(Phase::Retiring { successor }.is_leaving());
        assert!(Phase::Stopping { fast: true }.is_leaving());
        assert!(!Phase::Running.is_leaving());
    }
}
