//! The master: binds every listener, forks each service's pool of workers,
//! reaps and replaces them, and stops them on signals. It runs no handler
//! code and never blocks anywhere but in one poll(2).
//!
//! The loop (gunicorn's arbiter and nginx's master cycle, in their fixed
//! order): wait in one poll(2) for a signal, a worker's ready message,
//! control socket traffic, the next master's message (upgrade), the
//! previous master's exit, or the next timer → drain the signals → reap
//! every exited child → read ready messages → answer control requests → act
//! on signals by priority (fast stop, graceful stop, reload, upgrade,
//! scaling) → commit a reload whose generation is ready → enforce deadlines
//! → exit when stopping and no child is left → start a pending reload or
//! upgrade → apply the pool policy (src/master/policy.rs: dynamic and
//! ondemand sizes, recycling by memory and age, on a 1 s maintenance tick
//! and when an ondemand service's listener is readable) → spawn what the
//! pools lack (and the `[metrics]` process). Apart from poll, the only wait is
//! `std::process::Command::spawn` for the exec of a binary upgrade.
//!
//! The service manager hears of every transition (src/systemd.rs): `READY=1`
//! when the first generation is ready, `RELOADING=1` … `READY=1` around a
//! reload, `STOPPING=1`, `MAINPID=` across a binary upgrade, a `STATUS=` line
//! whenever it changes, and `WATCHDOG=1` from a timer of the loop.
//!
//! Owns: all master state, in [`Master`]; the listeners (until exit); the
//! read ends of the workers' ready pipes; the pid file.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use serde_json::{Value, json};

use crate::config::{Config, Credentials, ListenAddr, PoolKind, ServiceConfig, SocketMode};
use crate::control::{self, ClientId, Request};
use crate::exit::{ChildExit, code};
use crate::handler::{PluginInfo, Registry};
use crate::listener::{ListenError, Listener};
use crate::scoreboard::Scoreboard;
use crate::signals::{Event, Signals};
use crate::stats::{ExitCause, SpawnCause, Stats, WorkerState};
use crate::sys::{self, Forked};
use crate::systemd::{self, Notifier, NotifyState};
use crate::upgrade::{self, Exec, Inherited};
use crate::worker::{self, WorkerSpec};

mod health;
mod policy;

use policy::{MetricsChild, Recycle};

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
/// Largest pool SIGTTIN or `scale` make.
pub const MAX_WORKERS: usize = 4096;
/// listen(2) backlog of the control socket.
const CONTROL_BACKLOG: i32 = 64;

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
            MasterError::Listen(ListenError::NotPassed { .. } | ListenError::WrongKind { .. }) => {
                code::CONFIG
            }
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
    /// Not part of the pool (a dynamic pool shrank, a recycled worker's
    /// place): never filled until the pool grows into it again. Indexes
    /// stay stable, so the slot numbers in worker names do.
    vacant: bool,
    /// Why the next worker of this slot is started (for the metrics).
    cause: SpawnCause,
}

/// One `[[service]]` of one generation: its config, listeners and slots.
struct Pool {
    /// The service's configuration (shared with workers through fork).
    config: ServiceConfig,
    /// The plugin the workers initialise (only its name is used here).
    plugin: PluginInfo,
    /// Keys into `Master::listeners`.
    listeners: Vec<String>,
    /// The pool's size is `slots.len()`.
    slots: Vec<Slot>,
    /// What its workers drop to (`[daemon] user`/`group` of its generation).
    credentials: Option<Credentials>,
    /// Its index in the master's counters (src/stats.rs).
    stats: Option<usize>,
    /// Dynamic pools: workers to start at the next growth step (1, 2, 4,
    /// … 32 while the shortage lasts), and when that step may run.
    rate: u32,
    grow_at: Option<Instant>,
    /// Whether the pool is at `max_workers` with no idle worker (counted
    /// once per such episode).
    at_max: bool,
    /// The recycling in progress (one at a time per service).
    recycle: Option<Recycle>,
    /// Ondemand pools: not watching the listeners until then.
    listen_pause: Option<Instant>,
}

impl Pool {
    fn new(config: &ServiceConfig, registry: &Registry, credentials: &Option<Credentials>) -> Pool {
        let plugin = registry
            .get(config.handler.plugin.get_ref())
            .expect("config validation checked the plugin name")
            .clone();
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
    fn size(&self) -> usize {
        self.slots.iter().filter(|s| !s.vacant).count()
    }

    /// Adds a place to the pool (the first vacant slot, or a new one), to
    /// be filled by spawn_missing; returns its index.
    fn add_slot(&mut self, cause: SpawnCause) -> usize {
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
    fn vacate(&mut self, s: usize) {
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

    fn name(&self) -> &str {
        self.config.name.get_ref().as_str()
    }

    fn all_ready(&self, children: &HashMap<Pid, Child>) -> bool {
        self.slots.iter().filter(|s| !s.vacant).all(|s| {
            s.pid
                .and_then(|pid| children.get(&pid))
                .is_some_and(|c| c.ready)
        })
    }
}

/// A forked worker, as the master tracks it.
struct Child {
    /// The generation it belongs to.
    generation: u64,
    /// Index into its generation's pools.
    pool: usize,
    /// The slot it fills; None once retired (scaled down, old generation,
    /// stopping).
    slot: Option<usize>,
    /// `SERVICE#N`, for logs.
    name: String,
    /// The service name, for status.
    service: String,
    started: Instant,
    /// Killed if not ready by then.
    ready_deadline: Instant,
    /// Its service's `graceful_timeout`.
    graceful: Duration,
    /// Read end of the ready pipe until the worker's message arrives.
    ready_pipe: Option<OwnedFd>,
    /// Whether it said `ready`.
    ready: bool,
    /// The reason it sent with `error: …`.
    boot_error: Option<String>,
    /// When to SIGKILL it: set when it is asked to stop.
    kill_at: Option<Instant>,
    /// Its scoreboard slot.
    board: Option<usize>,
    /// Its service's index in the master's counters.
    svc: Option<usize>,
    /// Recycled past this resident memory (`max_memory` + jitter); 0: never.
    rss_limit: u64,
    /// Recycled at this age (`max_age` + jitter).
    age_limit: Option<Duration>,
    /// Since when it has been seen idle (sampled by the maintenance tick).
    idle_since: Option<Instant>,
    /// Its `served` count at the last sample.
    last_served: u64,
    /// Why the master retired it (recycling, idleness), for the metrics.
    retire_cause: Option<ExitCause>,
    /// Whether the master sent it SIGKILL.
    killed: bool,
    /// The state last written to the master's counters.
    reported: Option<WorkerState>,
}

/// A reload whose new generation is booting.
struct Reload {
    generation: u64,
    config: Config,
    pools: Vec<Pool>,
    /// Listeners bound for it (keys): closed again if it fails.
    added: Vec<String>,
    started: Instant,
    /// Control clients waiting for the outcome.
    waiters: Vec<ClientId>,
}

/// A binary upgrade whose new master is booting.
struct Upgrade {
    pid: Pid,
    /// Write end of its lifeline: held until this master exits.
    lifeline: OwnedFd,
    /// Its readiness pipe (read end).
    pipe: Option<OwnedFd>,
    started: Instant,
    deadline: Instant,
    waiters: Vec<ClientId>,
}

/// How the last reload ended, for status.
#[derive(Debug, Clone)]
struct Outcome {
    generation: u64,
    ok: bool,
    message: String,
    at: SystemTime,
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
    registry: Registry,
    config: Config,
    config_path: Option<PathBuf>,
    exec: Option<Exec>,
    /// The generation in force, and its pools.
    generation: u64,
    pools: Vec<Pool>,
    /// The highest generation number handed out (failed reloads use one).
    last_generation: u64,
    reload: Option<Reload>,
    /// A reload asked for while another is in progress or a generation
    /// still drains: the clients waiting for it (none for SIGHUP).
    pending_reload: Option<Vec<ClientId>>,
    last_reload: Option<Outcome>,
    upgrade: Option<Upgrade>,
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
    metrics: MetricsChild,
    /// The stuck-worker check (`timeout`): src/master/health.rs.
    health: health::Health,
}

/// Finds the listener named `key`.
fn find<'a>(listeners: &'a [Listener], key: &str) -> Option<&'a Listener> {
    listeners.iter().find(|l| l.key == key)
}

/// Binds `addr`, or adopts the socket the previous master handed over for
/// it, or one that systemd passed (named by `systemd:NAME`, or bound to
/// `addr`).
fn open_listener(
    addr: &ListenAddr,
    backlog: i32,
    mode: SocketMode,
    inherited: Option<&mut Inherited>,
    activated: &mut Vec<systemd::Activated>,
    key: &str,
    owner: Option<&Credentials>,
) -> Result<Listener, ListenError> {
    let mut l = if let Some((fd, owned)) = inherited.and_then(|i| {
        i.fds
            .remove(key)
            .map(|fd| (fd, i.systemd.contains(&key.to_string())))
    }) {
        let mut l = Listener::adopt(addr, fd)?;
        if owned {
            l.forget_file();
            l.systemd = true;
        }
        log::info!("adopted {} from the previous master", l.bound);
        l
    } else if let Some(i) = activated.iter().position(|a| match addr {
        ListenAddr::Systemd(name) => a.name == *name,
        _ => Listener::fd_matches(a.fd.as_fd(), addr),
    }) {
        let a = activated.remove(i);
        let l = Listener::adopt_systemd(addr, a.fd)?;
        log::info!(
            "adopted {} from systemd (socket activation, FileDescriptorName={}) for {addr}, not bound",
            l.bound,
            a.name
        );
        l
    } else if let ListenAddr::Systemd(name) = addr {
        let passed: Vec<&str> = activated.iter().map(|a| a.name.as_str()).collect();
        return Err(ListenError::NotPassed {
            addr: addr.clone(),
            name: name.clone(),
            passed: if passed.is_empty() {
                "none left".into()
            } else {
                passed.join(":")
            },
        });
    } else {
        // Only sockets we create are ours to chown (systemd's follow the
        // unit's SocketUser=/SocketGroup=).
        let mut l = Listener::bind(addr, backlog, mode)?;
        if let Err(e) = l.chown(owner) {
            l.remove_file();
            return Err(e);
        }
        l
    };
    l.key = key.to_string();
    Ok(l)
}

/// A `systemd:NAME` socket's kind is known only once adopted: checks that
/// the service's plugin serves it.
fn check_kind(svc: &ServiceConfig, registry: &Registry, l: &Listener) -> Result<(), ListenError> {
    if l.addr.systemd_name().is_none() {
        return Ok(());
    }
    let plugin = svc.handler.plugin.get_ref();
    let stream = l.bound.is_stream();
    match registry.get(plugin) {
        Some(info) if (stream && !info.stream) || (!stream && !info.datagram) => {
            Err(ListenError::WrongKind {
                addr: l.addr.clone(),
                bound: l.bound.clone(),
                plugin: plugin.clone(),
                kind: if stream { "stream" } else { "datagram" },
            })
        }
        _ => Ok(()),
    }
}

impl Master {
    /// Binds (or adopts) every listener and the control socket, and
    /// installs the signal handlers. Nothing is forked yet; a bind failure
    /// leaves no socket file behind.
    pub fn new(
        config: Config,
        registry: Registry,
        startup: Startup,
    ) -> Result<Master, MasterError> {
        sys::assert_single_threaded().map_err(sys_err("assert_single_threaded"))?;
        let Startup {
            config_path,
            exec,
            mut inherited,
            mut notifier,
            mut activated,
        } = startup;
        // A new master of an upgrade that cannot start tells the old one why.
        let mut notify = inherited.as_mut().and_then(|i| i.notify.take());
        fn report(notify: &mut Option<OwnedFd>, e: MasterError) -> MasterError {
            if let Some(fd) = notify.take() {
                upgrade::report_error(fd, &e.to_string());
            }
            e
        }
        let mut listeners: Vec<Listener> = Vec::new();
        let cleanup = |listeners: &mut Vec<Listener>| {
            for l in listeners.iter_mut().filter(|l| !l.shared) {
                l.remove_file();
            }
        };
        for svc in &config.services {
            for (key, addr) in svc.listen_keys() {
                if find(&listeners, &key).is_some() {
                    continue;
                }
                match open_listener(
                    &addr,
                    svc.backlog,
                    svc.socket_mode,
                    inherited.as_mut(),
                    &mut activated,
                    &key,
                    config.daemon.credentials.as_ref(),
                )
                .and_then(|l| check_kind(svc, &registry, &l).map(|()| l))
                {
                    Ok(l) => {
                        log::info!("listening on {} (service {})", l.bound, svc.name.get_ref());
                        listeners.push(l);
                    }
                    Err(e) => {
                        cleanup(&mut listeners);
                        return Err(report(&mut notify, e.into()));
                    }
                }
            }
        }
        if let (Some(addr), Some(key)) = (config.metrics.listen_addr(), config.metrics.listen_key())
        {
            match open_listener(
                &addr,
                policy::METRICS_BACKLOG,
                SocketMode::default(),
                inherited.as_mut(),
                &mut activated,
                &key,
                None,
            ) {
                Ok(l) => {
                    log::info!("metrics: serving http://{}/metrics", policy::bound_inet(&l));
                    listeners.push(l);
                }
                Err(e) => {
                    cleanup(&mut listeners);
                    return Err(report(&mut notify, e.into()));
                }
            }
        }
        let control = match config.control.path() {
            None => None,
            Some(path) => {
                match open_listener(
                    &ListenAddr::Unix(path.to_owned()),
                    CONTROL_BACKLOG,
                    SocketMode(0o600),
                    inherited.as_mut(),
                    &mut Vec::new(),
                    &upgrade::control_key(path),
                    None,
                ) {
                    Ok(l) => {
                        log::info!("control socket {}", path.display());
                        Some(control::Server::new(l))
                    }
                    Err(e) => {
                        cleanup(&mut listeners);
                        return Err(report(&mut notify, e.into()));
                    }
                }
            }
        };
        for a in activated {
            log::warn!(
                "systemd passed a socket named {:?} that no service uses; closing it (name it in a listen entry as \"systemd:{}\")",
                a.name,
                a.name
            );
        }
        let mut handover = None;
        let mut predecessor = None;
        let mut orphans = Vec::new();
        let mut generation = 1;
        if let Some(inh) = inherited {
            predecessor = inh.lifeline;
            for (key, fd) in inh.fds {
                if inh.systemd.contains(&key) {
                    log::warn!(
                        "the previous master handed over {key} (systemd's), which the config no longer names; closing it"
                    );
                    continue;
                }
                log::warn!(
                    "the previous master handed over {key}, which the config no longer names; closing it once the upgrade is done"
                );
                // A Unix socket's file is removed then (until the handover
                // the old master still serves on it).
                let unix = key
                    .strip_prefix("control:")
                    .map(|p| ListenAddr::Unix(p.into()))
                    .or_else(|| key.parse::<ListenAddr>().ok())
                    .filter(|a| matches!(a, ListenAddr::Unix(_) | ListenAddr::UnixGram(_)));
                if let Some(addr) = unix
                    && let Ok(l) = Listener::adopt(&addr, fd)
                {
                    orphans.push(l);
                }
            }
            generation = inh.generation + 1;
            if let Some(notify) = notify.take() {
                handover = Some((notify, inh.from));
                // The old master speaks for the service until we take over.
                notifier.hold();
            }
        }
        let pid = nix::unistd::getpid();
        let pid_file = config.daemon.pid_file.clone();
        let setup = || -> Result<(Signals, Scoreboard, Stats), MasterError> {
            // A new master of an upgrade writes the pid file once it is
            // ready: until then the old master is the one to signal.
            // A daemon's pid file is written (and locked) by daemonize.
            if handover.is_none() && !crate::daemon::is_daemon() {
                write_pid_file(pid_file.as_deref(), pid)?;
            }
            let board = Scoreboard::new().map_err(sys_err("mmap"))?;
            let signals = Signals::install().map_err(sys_err("sigaction"))?;
            let stats = Stats::new().map_err(sys_err("mmap"))?;
            Ok((signals, board, stats))
        };
        let (signals, board, mut stats) = match setup() {
            Ok(s) => s,
            Err(e) => {
                cleanup(&mut listeners);
                return Err(report(&mut notify, e));
            }
        };
        let mut pools: Vec<Pool> = config
            .services
            .iter()
            .map(|svc| Pool::new(svc, &registry, &config.daemon.credentials))
            .collect();
        policy::register(&mut stats, &mut pools);
        stats.set_generation(generation);
        let maintain_at = policy::needs_tick(&config).then(Instant::now);
        Ok(Master {
            phase: Phase::Starting,
            registry,
            config,
            config_path,
            exec,
            generation,
            pools,
            last_generation: generation,
            reload: None,
            pending_reload: None,
            last_reload: None,
            upgrade: None,
            pending_upgrade: None,
            stop_waiters: Vec::new(),
            listeners,
            control,
            handover,
            predecessor,
            failed_successor: None,
            pid_lock: None,
            successor_gone: false,
            orphans,
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
            maintain_at,
            metrics: MetricsChild::default(),
            health: health::Health::default(),
        })
    }

    /// Runs until the daemon stops; returns the exit code (0 after a stop).
    pub fn run(mut self) -> Result<i32, MasterError> {
        sys::set_title("preforkd: master");
        let total: usize = self.pools.iter().map(Pool::size).sum();
        log::info!(
            "master pid {} starting {total} workers in {} services (generation {})",
            self.pid,
            self.pools.len(),
            self.generation
        );
        self.spawn_missing();
        self.spawn_metrics();
        // A config of ondemand pools only has no worker to wait for.
        self.check_start();
        loop {
            // Records a TCP syslog connection still holds (nonblocking).
            log::logger().flush();
            let woke = self.wait()?;
            let waiting = woke.listeners.clone();
            self.tick_watchdog();
            let events = self.signals.drain();
            self.reap();
            for pid in woke.ready {
                self.read_ready(pid);
            }
            if woke.upgrade {
                self.read_upgrade();
            }
            if woke.predecessor_gone && self.predecessor.take().is_some() {
                log::info!("the previous master has exited with all its workers");
            }
            let requests = match &mut self.control {
                Some(c) => c.take_requests(),
                None => Vec::new(),
            };
            for (client, request) in requests {
                self.on_request(client, request);
            }
            for (event, count) in events {
                self.on_signal(event, count);
            }
            self.check_start();
            self.check_reload();
            self.enforce_deadlines();
            self.check_health();
            if let Some(c) = &mut self.control {
                c.expire(Instant::now());
            }
            match self.phase {
                Phase::Stopping { .. } | Phase::Retiring { .. } => {
                    if self.children.is_empty() {
                        return self.finish();
                    }
                }
                Phase::Starting | Phase::Running => {
                    self.start_pending();
                    self.close_unused_listeners();
                    self.adapt(&waiting);
                    self.spawn_missing();
                    self.spawn_metrics();
                    self.sync_states();
                    self.update_status();
                }
            }
        }
    }

    /// Sleeps in poll(2) until a signal, a ready message, control socket
    /// traffic, the next master's message or the next timer.
    fn wait(&mut self) -> Result<Woke, MasterError> {
        enum Token {
            Signals,
            Ready(Pid),
            Upgrade,
            Predecessor,
            Control,
            Listener(usize),
        }
        let mut fds = vec![PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
        let mut tokens = vec![Token::Signals];
        for (pid, child) in &self.children {
            if let Some(pipe) = &child.ready_pipe {
                fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLIN));
                tokens.push(Token::Ready(*pid));
            }
        }
        if let Some(pipe) = self.upgrade.as_ref().and_then(|u| u.pipe.as_ref()) {
            fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLIN));
            tokens.push(Token::Upgrade);
        }
        if let Some(pipe) = &self.predecessor {
            fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLIN));
            tokens.push(Token::Predecessor);
        }
        let mut control_set = None;
        if let Some(c) = &self.control {
            let (cfds, set) = c.poll_fds();
            for (fd, ev) in cfds {
                fds.push(PollFd::new(fd, ev));
                tokens.push(Token::Control);
            }
            control_set = Some(set);
        }
        for (p, fd) in self.demand_fds() {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
            tokens.push(Token::Listener(p));
        }
        let busy = self.control.as_ref().is_some_and(|c| c.has_requests());
        let timeout = match self.next_deadline() {
            _ if busy => PollTimeout::ZERO,
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
        let revents: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(fds);
        let mut woke = Woke::default();
        let mut control_revents = Vec::new();
        for (token, rev) in tokens.into_iter().zip(revents) {
            match token {
                Token::Signals => {}
                Token::Ready(pid) if !rev.is_empty() => woke.ready.push(pid),
                Token::Ready(_) => {}
                Token::Upgrade => woke.upgrade = !rev.is_empty(),
                Token::Predecessor => woke.predecessor_gone = !rev.is_empty(),
                Token::Control => control_revents.push(rev),
                Token::Listener(p) if !rev.is_empty() && !woke.listeners.contains(&p) => {
                    woke.listeners.push(p)
                }
                Token::Listener(_) => {}
            }
        }
        if let (Some(c), Some(set)) = (&mut self.control, control_set) {
            c.on_poll(set, &control_revents);
        }
        Ok(woke)
    }

    /// The earliest timer: a slot's respawn, a kill, a ready deadline, the
    /// upgrade's deadline, an idle control client, the watchdog.
    fn next_deadline(&self) -> Option<Instant> {
        let respawns = self
            .pools
            .iter()
            .chain(self.reload.iter().flat_map(|r| r.pools.iter()))
            .flat_map(|p| p.slots.iter())
            .filter(|s| s.pid.is_none())
            .filter_map(|s| s.respawn_at);
        // A worker being stopped has only its kill deadline; its ready
        // deadline, long past perhaps, would make poll() return at once.
        let children = self
            .children
            .values()
            .filter_map(|c| c.kill_at.or_else(|| (!c.ready).then_some(c.ready_deadline)));
        let upgrade = self
            .upgrade
            .as_ref()
            .map(|u| u.deadline)
            .into_iter()
            .chain(self.failed_successor.map(|(_, at)| at));
        let control = self.control.as_ref().and_then(|c| c.deadline());
        respawns
            .chain(children)
            .chain(upgrade)
            .chain(control)
            .chain(self.watchdog_at)
            .chain(self.policy_deadlines())
            .chain(self.health_deadlines())
            .min()
    }

    /// The pools of generation `generation`, if it is the current one or
    /// the one a reload is booting.
    fn pools_mut(&mut self, generation: u64) -> Option<&mut Vec<Pool>> {
        if generation == self.generation {
            Some(&mut self.pools)
        } else {
            self.reload
                .as_mut()
                .filter(|r| r.generation == generation)
                .map(|r| &mut r.pools)
        }
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
        let Some(mut child) = self.children.remove(&pid) else {
            match self.phase {
                Phase::Retiring { successor } if successor == pid => {
                    log::warn!("the new master (pid {pid}) {exit}");
                }
                _ => log::debug!("reaped pid {pid}, not a worker: {exit}"),
            }
            return;
        };
        if child.ready_pipe.is_some() {
            read_message(&mut child);
        }
        let cause = if self.health.is_stuck(pid) {
            crate::stats::ExitCause::Stuck
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
        let Some(slot_idx) = child.slot.filter(|_| !stopping) else {
            return;
        };

        if self.phase == Phase::Starting && !child.ready && child.generation == self.generation {
            let reason = child
                .boot_error
                .clone()
                .unwrap_or_else(|| format!("worker {} {exit} before it was ready", child.name));
            self.fail_start(child.pool, &child.name, reason);
            return;
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
            self.abort_reload(&reason);
            return;
        }
        let Some(pools) = self.pools_mut(child.generation) else {
            return;
        };
        let Some(slot) = pools
            .get_mut(child.pool)
            .and_then(|p| p.slots.get_mut(slot_idx))
        else {
            return;
        };
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
        self.sync_states();
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
        if self.phase != Phase::Starting {
            return;
        }
        if self.pools.iter().all(|p| p.all_ready(&self.children)) {
            self.phase = Phase::Running;
            let summary: Vec<String> = self
                .pools
                .iter()
                .map(|p| format!("{} ({} workers)", p.name(), p.size()))
                .collect();
            log::info!("ready: {}", summary.join(", "));
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
                // We are the service's main process now. The old master
                // says so too (announce_successor); whichever message the
                // service manager reads first, the outcome is the same.
                states.insert(0, NotifyState::MainPid(self.pid.as_raw() as u32));
            }
            self.notifier.send(&states);
            self.last_status = status;
        }
    }

    /// In a new master of a binary upgrade: take the pid file and the
    /// listeners over, and tell the old master.
    fn complete_handover(&mut self) {
        let Some((notify, from)) = self.handover.take() else {
            return;
        };
        let written = write_pid_file(self.pid_file.as_deref(), self.pid);
        if written.is_ok() {
            self.pid_lock = lock_pid_file(self.pid_file.as_deref());
        }
        if let Err(e) = written {
            log::error!("{e}; giving up the upgrade");
            upgrade::report_error(notify, &e.to_string());
            self.boot_failure = Some(e);
            self.begin_stop(false);
            return;
        }
        for l in &mut self.listeners {
            l.shared = false;
        }
        if let Some(c) = &mut self.control {
            c.take_ownership();
        }
        for mut l in self.orphans.drain(..) {
            log::info!("closing {}, which the config no longer names", l.bound);
            l.remove_file();
        }
        let from = from.map_or_else(|| "?".to_string(), |p| p.to_string());
        self.notifier.release();
        match upgrade::report_ready(notify, self.pid.as_raw() as u32) {
            Ok(()) => log::info!("upgrade: took over from master pid {from}"),
            Err(e) => log::warn!(
                "upgrade: cannot tell the old master (pid {from}) that we are ready: {e}; serving anyway"
            ),
        }
    }

    fn on_signal(&mut self, event: Event, count: usize) {
        match event {
            Event::Reap => {} // reaped on every wake-up anyway
            Event::FastStop(signal) => {
                let name = signal.as_str();
                log::info!("{name}: fast stop");
                self.begin_stop(true);
            }
            Event::GracefulStop => match self.phase {
                Phase::Stopping { .. } => log::info!("SIGTERM: already stopping"),
                Phase::Retiring { successor } => {
                    log::info!("SIGTERM: already retiring (master pid {successor} took over)")
                }
                _ => {
                    log::info!("SIGTERM: graceful stop");
                    self.begin_stop(false);
                }
            },
            Event::Reload => self.request_reload(None, "SIGHUP"),
            Event::Reopen => self.reopen_logs(),
            Event::Upgrade => self.request_upgrade(None, "SIGUSR2"),
            Event::MoreWorkers | Event::FewerWorkers => {
                if self.phase != Phase::Running && self.phase != Phase::Starting {
                    return;
                }
                for _ in 0..count {
                    for p in 0..self.pools.len() {
                        let n = self.pools[p].size();
                        let name = if event == Event::MoreWorkers {
                            "SIGTTIN"
                        } else {
                            "SIGTTOU"
                        };
                        let kind = self.pools[p].config.pool_kind();
                        if kind != PoolKind::Static {
                            log::warn!(
                                "{name}: service {} has pool = \"{kind}\", whose size follows the load; left alone",
                                self.pools[p].name()
                            );
                        } else if event == Event::MoreWorkers && n >= MAX_WORKERS {
                            log::warn!(
                                "{name}: service {} is at {MAX_WORKERS} workers already",
                                self.pools[p].name()
                            );
                        } else if event == Event::FewerWorkers && n <= 1 {
                            log::warn!(
                                "{name}: service {} keeps its last worker",
                                self.pools[p].name()
                            );
                        } else {
                            let n = if event == Event::MoreWorkers {
                                n + 1
                            } else {
                                n - 1
                            };
                            self.resize(p, n);
                            log::info!(
                                "{name}: service {} now has {n} workers",
                                self.pools[p].name()
                            );
                        }
                    }
                }
            }
        }
    }

    /// SIGUSR1: reopen the log target here and in every worker.
    fn reopen_logs(&mut self) {
        crate::log::reopen();
        // Signalled before the line is written: whoever reads it knows
        // every worker has the request pending.
        for pid in self.children.keys().chain(&self.metrics.pid) {
            let _ = kill(*pid, Signal::SIGUSR1);
        }
        log::info!(
            "SIGUSR1: log files reopened; told {} workers",
            self.children.len()
        );
    }

    /// Sets pool `p`'s size: new slots are filled by spawn_missing; the
    /// workers of removed slots leave gracefully.
    fn resize(&mut self, p: usize, n: usize) {
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
    fn stop_child(&mut self, pid: Pid, sig: Signal) {
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
    fn stop_generation(&mut self, generation: Option<u64>, sig: Signal) {
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

    /// Kills workers past their stop deadline, workers that did not become
    /// ready within `ready_timeout`, and a next master late for its upgrade.
    fn enforce_deadlines(&mut self) {
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
                late.push((
                    child.generation,
                    child.pool,
                    child.name.clone(),
                    format!(
                        "worker {} not ready within ready_timeout ({})",
                        child.name,
                        humantime::format_duration(waited)
                    ),
                ));
            }
        }
        for (generation, pool, name, reason) in late {
            if self.phase == Phase::Starting && generation == self.generation {
                self.fail_start(pool, &name, reason);
            } else if self
                .reload
                .as_ref()
                .is_some_and(|r| r.generation == generation)
            {
                self.abort_reload(&reason);
            }
        }
        if let Some((pid, at)) = self.failed_successor
            && now >= at
        {
            log::warn!(
                "the new master of the failed upgrade (pid {pid}) is still running; sending SIGKILL"
            );
            let _ = kill(pid, Signal::SIGKILL);
            self.failed_successor = Some((pid, now + FAST_STOP_GRACE));
        }
        if let Some(up) = &self.upgrade
            && now >= up.deadline
        {
            let reason = format!(
                "new master pid {} not ready within upgrade_timeout ({})",
                up.pid,
                humantime::format_duration(self.config.daemon.upgrade_timeout)
            );
            self.fail_upgrade(&reason);
        }
    }

    /// Forks a worker for every empty slot whose backoff has passed, in the
    /// generation in force and in the one a reload is booting.
    /// A failure to fork (process limit, memory) is logged and retried with
    /// the slot's backoff: the workers that exist keep serving. In a
    /// reload, it fails the reload.
    fn spawn_missing(&mut self) {
        let mut generations = vec![self.generation];
        generations.extend(self.reload.as_ref().map(|r| r.generation));
        for generation in generations {
            let now = Instant::now();
            let Some(pools) = self.pools_mut(generation) else {
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
                let Err(e) = self.spawn(generation, p, s) else {
                    continue;
                };
                if generation != self.generation {
                    self.abort_reload(&format!("cannot start a worker: {e}"));
                    break;
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
    }

    /// Forks the worker for slot `s` of pool `p` of `generation`.
    fn spawn(&mut self, generation: u64, p: usize, s: usize) -> Result<(), MasterError> {
        let pools = match self.reload.as_ref() {
            Some(r) if r.generation == generation => &r.pools,
            _ => &self.pools,
        };
        let pool = &pools[p];
        let name = format!("{}#{s}", pool.name());
        let (ready_read, ready_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| sys_err("pipe2")(e.into()))?;
        let mut listeners = Vec::with_capacity(pool.listeners.len());
        for key in &pool.listeners {
            let l = find(&self.listeners, key).expect("every pool's listeners are open");
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
                        .unwrap_or(code::SOFTWARE);
                std::process::exit(code);
            }
            Ok(Forked::Parent(pid)) => {
                drop(ready_write);
                drop(listeners);
                log::info!("worker {name} (pid {pid}) spawned");
                let now = Instant::now();
                let (rss_limit, age_limit) = policy::limits(&pool.config);
                let svc = pool.stats;
                let cause = pool.slots[s].cause;
                let child = Child {
                    svc,
                    rss_limit,
                    age_limit,
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
                match self.phase {
                    Phase::Stopping { .. } | Phase::Retiring { .. } => {}
                    _ => {
                        log::info!("control: graceful stop");
                        self.begin_stop(false);
                    }
                }
            }
            Request::Scale { service, workers } => {
                let answer = self.scale(&service, workers as usize);
                self.reply(client, &answer);
            }
        }
    }

    /// `scale SERVICE N`: until the next reload, which applies the config.
    fn scale(&mut self, service: &str, n: usize) -> Value {
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
        self.resize(p, n.min(MAX_WORKERS));
        log::info!("control: service {service} scaled from {was} to {n} workers");
        json!({"ok": true, "service": service, "workers": n, "was": was})
    }

    /// SIGHUP or `reload`: one reload runs at a time; requests made
    /// meanwhile collapse into one more.
    fn request_reload(&mut self, client: Option<ClientId>, by: &str) {
        if let Some(why) = self.refuses_changes() {
            log::warn!("{by}: reload refused: {why}");
            if let Some(c) = client {
                self.reply(c, &control::error(&format!("reload refused: {why}")));
            }
            return;
        }
        let busy = self.reload.is_some() || self.upgrade.is_some() || self.draining();
        match &mut self.pending_reload {
            Some(waiters) => {
                waiters.extend(client);
                log::info!("{by}: a reload is already pending; this request joins it");
            }
            None => {
                self.pending_reload = Some(client.into_iter().collect());
                if busy {
                    log::info!(
                        "{by}: reload queued until the reload, upgrade or drain in progress ends"
                    );
                }
            }
        }
    }

    /// SIGUSR2 or `upgrade`.
    fn request_upgrade(&mut self, client: Option<ClientId>, by: &str) {
        let why = self.refuses_changes().or_else(|| {
            self.exec
                .is_none()
                .then(|| "this master was started without a binary path to run".to_string())
        });
        if let Some(why) = why {
            log::warn!("{by}: binary upgrade refused: {why}");
            if let Some(c) = client {
                self.reply(c, &control::error(&format!("upgrade refused: {why}")));
            }
            return;
        }
        let waiters = self.pending_upgrade.get_or_insert_with(Vec::new);
        waiters.extend(client);
        log::info!("{by}: binary upgrade requested");
    }

    fn refuses_changes(&self) -> Option<String> {
        match self.phase {
            Phase::Stopping { .. } => Some("the master is stopping".into()),
            Phase::Retiring { successor } => Some(format!(
                "this master is retiring; master pid {successor} took over"
            )),
            _ => None,
        }
    }

    /// Whether workers of another generation than the current one are
    /// still alive (draining, or killed and not yet reaped).
    fn draining(&self) -> bool {
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
    fn start_pending(&mut self) {
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
        let loaded = match &self.config_path {
            Some(path) => Config::load(path, &self.registry),
            None => Config::embedded(&self.registry),
        };
        let config = match loaded {
            Ok(c) => c,
            Err(e) => {
                self.reload_failed(generation, waiters, &format!("invalid config: {e}"), None);
                return;
            }
        };
        let mut added = Vec::new();
        for svc in &config.services {
            for (key, addr) in svc.listen_keys() {
                if let Some(l) = find(&self.listeners, &key) {
                    if let Err(e) = check_kind(svc, &self.registry, l) {
                        self.close_listeners(&added);
                        self.reload_failed(generation, waiters, &e.to_string(), None);
                        return;
                    }
                    continue;
                }
                match open_listener(
                    &addr,
                    svc.backlog,
                    svc.socket_mode,
                    None,
                    &mut Vec::new(),
                    &key,
                    config.daemon.credentials.as_ref(),
                ) {
                    Ok(l) => {
                        log::info!(
                            "reload (generation {generation}): listening on {} (service {})",
                            l.bound,
                            svc.name.get_ref()
                        );
                        added.push(key);
                        self.listeners.push(l);
                    }
                    Err(e) => {
                        self.close_listeners(&added);
                        self.reload_failed(generation, waiters, &e.to_string(), None);
                        return;
                    }
                }
            }
        }
        if let (Some(addr), Some(key)) = (config.metrics.listen_addr(), config.metrics.listen_key())
            && find(&self.listeners, &key).is_none()
        {
            match open_listener(
                &addr,
                policy::METRICS_BACKLOG,
                SocketMode::default(),
                None,
                &mut Vec::new(),
                &key,
                None,
            ) {
                Ok(l) => {
                    log::info!(
                        "reload (generation {generation}): metrics: serving http://{}/metrics",
                        policy::bound_inet(&l)
                    );
                    added.push(key);
                    self.listeners.push(l);
                }
                Err(e) => {
                    self.close_listeners(&added);
                    self.reload_failed(generation, waiters, &e.to_string(), None);
                    return;
                }
            }
        }
        if config.daemon.pid_file != self.config.daemon.pid_file
            || config.control.path() != self.config.control.path()
        {
            log::warn!(
                "reload (generation {generation}): [daemon] pid_file and [control] socket changes take effect at the next restart or binary upgrade"
            );
        }
        let mut pools: Vec<Pool> = config
            .services
            .iter()
            .map(|svc| Pool::new(svc, &self.registry, &config.daemon.credentials))
            .collect();
        policy::register(&mut self.stats, &mut pools);
        let total: usize = pools.iter().map(Pool::size).sum();
        log::info!(
            "reload (generation {generation}): {} is valid; starting {total} workers",
            config.source
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
    fn check_reload(&mut self) {
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
                if let Some(l) = find(&self.listeners, &key)
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
        let summary: Vec<String> = self
            .pools
            .iter()
            .map(|p| format!("{} ({} workers)", p.name(), p.size()))
            .collect();
        let message = format!(
            "reload (generation {}) succeeded in {}: {}; generation {old} retires",
            self.generation,
            humantime::format_duration(round_ms(took)),
            summary.join(", ")
        );
        log::info!("{message}");
        self.last_reload = Some(Outcome {
            generation: self.generation,
            ok: true,
            message,
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
    fn abort_reload(&mut self, reason: &str) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        // A worker's "ready" may be in its pipe, unread, in this very
        // wake-up: read it first, or a worker that already accepts would be
        // killed (and its connections reset).
        for c in self.children.values_mut() {
            if c.generation == reload.generation && c.ready_pipe.is_some() {
                read_message(c);
            }
        }
        let pids: Vec<(Pid, bool)> = self
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

    /// Closes the listeners named `keys` (bound by a reload that failed).
    fn close_listeners(&mut self, keys: &[String]) {
        self.listeners.retain_mut(|l| {
            if keys.contains(&l.key) {
                l.remove_file();
                false
            } else {
                true
            }
        });
    }

    /// Closes listeners that no generation names any more, once the
    /// generations that did have left (their workers hold copies, and may
    /// still be finishing connections accepted on them).
    fn close_unused_listeners(&mut self) {
        if self.reload.is_some() || self.draining() || self.handover.is_some() {
            return;
        }
        let used: Vec<String> = self
            .pools
            .iter()
            .flat_map(|p| p.listeners.iter().cloned())
            .chain(self.config.metrics.listen_key())
            .collect();
        self.listeners.retain_mut(|l| {
            if used.contains(&l.key) {
                return true;
            }
            log::info!("no longer listening on {}", l.bound);
            l.remove_file();
            false
        });
    }

    /// Runs the next master with the listeners (and control socket)
    /// inherited; it reports on a pipe.
    fn start_upgrade(&mut self, waiters: Vec<ClientId>) {
        let exec = self.exec.clone().expect("request_upgrade checked");
        self.last_generation += 1;
        let reserved = self.last_generation;
        let mut shared: Vec<(BorrowedFd<'_>, String)> = self
            .listeners
            .iter()
            .map(|l| (l.as_fd(), l.key.clone()))
            .collect();
        if let Some(l) = self.control.as_ref().and_then(|c| c.listener()) {
            let path = self.config.control.path().expect("a control socket");
            shared.push((l.as_fd(), upgrade::control_key(path)));
        }
        let spawned = (|| -> io::Result<(std::process::Child, OwnedFd, OwnedFd)> {
            if let Some((_, key)) = shared.iter().find(|(_, k)| k.contains('\n')) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot hand over {key:?}: a newline in its path"),
                ));
            }
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
            let (life_read, life_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            let table: Vec<(i32, String)> = shared
                .iter()
                .map(|(fd, key)| (fd.as_raw_fd(), key.clone()))
                .collect();
            let mut cmd = std::process::Command::new(&exec.program);
            cmd.args(&exec.args)
                .env(upgrade::ENV_FDS, upgrade::encode(&table))
                .env(upgrade::ENV_NOTIFY, write.as_raw_fd().to_string())
                .env(upgrade::ENV_LIFELINE, life_read.as_raw_fd().to_string())
                .env(upgrade::ENV_FROM, self.pid.to_string())
                // The new master's first generation is `reserved` (failed
                // reloads and upgrades use numbers too).
                .env(upgrade::ENV_GENERATION, (reserved - 1).to_string())
                .env(
                    upgrade::ENV_SYSTEMD,
                    self.listeners
                        .iter()
                        .filter(|l| l.systemd)
                        .map(|l| l.key.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            // Removed from our environment before the first fork (no
            // worker sees them), but the next master needs them.
            for (name, value) in self.notifier.successor_env() {
                cmd.env(name, value);
            }
            // Clear close-on-exec on exactly these descriptors for the
            // exec, then set it again whatever happened: the master is
            // single-threaded, so no other fork sees them meanwhile.
            let mut inheritable = shared.iter().map(|(fd, _)| *fd).collect::<Vec<_>>();
            inheritable.push(write.as_fd());
            inheritable.push(life_read.as_fd());
            let result = inheritable
                .iter()
                .try_for_each(|fd| sys::set_cloexec(*fd, false))
                .and_then(|()| cmd.spawn());
            for fd in &inheritable {
                if let Err(e) = sys::set_cloexec(*fd, true)
                    && result.is_ok()
                {
                    log::error!("upgrade: cannot restore close-on-exec: {e}");
                }
            }
            result.map(|child| (child, read, life_write))
        })();
        drop(shared);
        match spawned {
            Ok((child, pipe, lifeline)) => {
                let pid = Pid::from_raw(child.id() as i32);
                // Reaped by waitpid(-1) like any child; std's handle is not
                // used to wait.
                drop(child);
                let now = Instant::now();
                log::info!(
                    "upgrade: started {} as master pid {pid}, handing over {} sockets",
                    exec.program.display(),
                    self.listeners.len() + usize::from(self.control.is_some())
                );
                self.upgrade = Some(Upgrade {
                    pid,
                    lifeline,
                    pipe: Some(pipe),
                    started: now,
                    deadline: now + self.config.daemon.upgrade_timeout,
                    waiters,
                });
            }
            Err(e) => {
                let reason = format!("cannot run {}: {e}", exec.program.display());
                log::error!("upgrade failed: {reason}; this master keeps serving");
                self.reply_all(waiters, &control::error(&reason));
            }
        }
    }

    /// Reads the next master's message: `ready PID` or `error: REASON`.
    fn read_upgrade(&mut self) {
        let Some(up) = &mut self.upgrade else { return };
        let Some(line) = read_pipe_line(&mut up.pipe) else {
            return;
        };
        if line.starts_with("ready") {
            self.upgrade_done();
        } else if let Some(reason) = line.strip_prefix("error: ") {
            self.fail_upgrade(&format!("the new master failed: {reason}"));
        } else {
            self.fail_upgrade("the new master closed its pipe without reporting");
        }
    }

    /// The next master died before it was ready.
    /// The next master exited before we retired: the upgrade failed,
    /// even if it managed to say `ready` first (a dead successor must not
    /// take over).
    fn upgrade_exited(&mut self, exit: ChildExit) {
        let Some(up) = &mut self.upgrade else { return };
        // It has exited: whatever it wrote is there (or nothing is).
        let said = read_pipe_line(&mut up.pipe).unwrap_or_default();
        if said.starts_with("ready") && exit.is_clean() {
            // It took over (it owned the listeners and files from then on)
            // and was then stopped on purpose, before we read its message:
            // the daemon is stopping, and we retire too.
            log::info!(
                "upgrade: the new master (pid {}) took over and has already stopped ({exit}); retiring",
                up.pid
            );
            self.upgrade_done();
            return;
        }
        let reason = match said.strip_prefix("error: ") {
            Some(r) => format!("the new master failed: {r}"),
            None => format!("the new master (pid {}) {exit}", up.pid),
        };
        self.successor_gone = true;
        self.fail_upgrade(&reason);
    }

    fn fail_upgrade(&mut self, reason: &str) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        // Every listener is still ours and was never shut (a new master
        // never shuts or unlinks a shared socket). Its workers may already
        // serve: SIGTERM lets it stop them gracefully, and until it has been
        // reaped it counts as a draining generation.
        if !std::mem::take(&mut self.successor_gone) {
            let _ = kill(up.pid, Signal::SIGTERM);
            let grace = self
                .pools
                .iter()
                .map(|p| p.config.graceful_timeout)
                .max()
                .unwrap_or_default()
                + FAST_STOP_GRACE;
            self.failed_successor = Some((up.pid, Instant::now() + grace));
        }
        // It may have written the pid file before it failed.
        match write_pid_file(self.pid_file.as_deref(), self.pid) {
            Ok(()) => self.pid_lock = lock_pid_file(self.pid_file.as_deref()),
            Err(e) => log::warn!("cannot restore the pid file: {e}"),
        }
        log::error!(
            "upgrade failed after {}: {reason}; master pid {} keeps serving generation {}",
            humantime::format_duration(round_ms(up.started.elapsed())),
            self.pid,
            self.generation
        );
        self.reply_all(up.waiters, &control::error(reason));
    }

    /// The next master is ready: it owns the listeners, the sockets' files
    /// and the pid file now. Retire our workers and leave.
    fn upgrade_done(&mut self) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let successor = up.pid;
        self.lifeline = Some(up.lifeline);
        log::info!(
            "upgrade: master pid {successor} is ready (after {}); retiring generation {}",
            humantime::format_duration(round_ms(up.started.elapsed())),
            self.generation
        );
        self.announce_successor(successor);
        for l in &mut self.listeners {
            l.forget_file();
        }
        // Our copies go; the next master and our draining workers hold theirs.
        self.listeners.clear();
        if let Some(c) = &mut self.control {
            c.close_listener(true);
        }
        // The pid file is the new master's now; finish() removes it only if
        // it still names us (the new config may name another path).
        self.phase = Phase::Retiring { successor };
        sys::set_title(&format!(
            "preforkd: master (retiring, replaced by {successor})"
        ));
        self.stop_generation(None, Signal::SIGTERM);
        self.stop_metrics();
        let answer =
            json!({"ok": true, "new_pid": successor.as_raw(), "old_pid": self.pid.as_raw()});
        self.reply_all(up.waiters, &answer);
        // A reload asked for during the upgrade is the new master's to do:
        // it may have read the config before the change.
        if let Some(waiters) = self.pending_reload.take() {
            log::info!("upgrade: passing the pending reload on to master pid {successor} (SIGHUP)");
            let _ = kill(successor, Signal::SIGHUP);
            let moved = control::error(&format!(
                "this master was replaced by master pid {successor} during the upgrade; the reload was passed on to it as SIGHUP, so its outcome is in its log and status"
            ));
            self.reply_all(waiters, &moved);
        }
        if let Some(waiters) = self.pending_upgrade.take() {
            let moved = control::error(&format!(
                "this master was just replaced by master pid {successor}; ask it again"
            ));
            self.reply_all(waiters, &moved);
        }
    }

    /// Tells the service manager that `successor` is the main process now
    /// (`MAINPID=`, which needs `NotifyAccess=all` since it comes from the
    /// old main process about another); without one, the pid file (written
    /// by the successor) is how others find it. No `STATUS=` here: the
    /// successor sends its own, and ours could arrive after it.
    fn announce_successor(&self, successor: Pid) {
        log::info!("master pid {successor} is the main process now");
        self.notifier
            .send(&[NotifyState::MainPid(successor.as_raw() as u32)]);
    }

    /// `READY=1` with the status: the end of a reload, success or not.
    fn notify_ready(&mut self) {
        let status = self.status_line(None);
        self.notifier
            .send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.last_status = status;
    }

    /// Sends `STATUS=` when it changed (a worker died or became ready)
    /// while running; transitions send theirs with their message.
    fn update_status(&mut self) {
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
    fn tick_watchdog(&mut self) {
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

    /// The one-line state for `STATUS=`: `generation 3; echo 4/4 workers;
    /// last reload ok (generation 3)`. `reloading`: the generation a reload
    /// is starting.
    fn status_line(&self, reloading: Option<u64>) -> String {
        let mut parts = vec![format!("generation {}", self.generation)];
        for p in &self.pools {
            let ready = p
                .slots
                .iter()
                .filter_map(|s| s.pid)
                .filter(|pid| self.children.get(pid).is_some_and(|c| c.ready))
                .count();
            parts.push(format!("{} {ready}/{} workers", p.name(), p.size()));
        }
        match (reloading, &self.last_reload) {
            (Some(g), _) => parts.push(format!("reloading (generation {g})")),
            (None, Some(o)) if o.ok => {
                parts.push(format!("last reload ok (generation {})", o.generation))
            }
            (None, Some(o)) => parts.push(format!(
                "last reload failed (generation {}): {}",
                o.generation,
                reload_reason(&o.message)
            )),
            (None, None) => {}
        }
        systemd::status_text(&parts.join("; "))
    }

    /// The state as `preforkd status` shows it.
    fn status(&self) -> Value {
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
                let pool = self.pools.iter().find(|p| p.name() == name);
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
                            .filter_map(|k| find(&self.listeners, k))
                            .map(|l| l.bound.to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                let (idle, busy) = pool.map_or((0, 0), |p| self.idle_busy(p));
                json!({
                    "name": name,
                    "plugin": pool.map(|p| p.plugin.name.clone()),
                    "size": pool.map(Pool::size),
                    "pool": pool.map(|p| p.config.pool_kind().to_string()),
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

/// What woke the master.
#[derive(Default)]
struct Woke {
    /// Workers whose ready pipe is readable.
    ready: Vec<Pid>,
    /// The next master's pipe is readable.
    upgrade: bool,
    /// The previous master's lifeline reached EOF (it never writes).
    predecessor_gone: bool,
    /// Ondemand pools (indexes) with a connection waiting.
    listeners: Vec<usize>,
}

/// Writes the pid file, if one is configured.
fn write_pid_file(path: Option<&std::path::Path>, pid: Pid) -> Result<(), MasterError> {
    let Some(path) = path else { return Ok(()) };
    // Written whole to a temporary name, then renamed: a reader never sees
    // it empty or half-written, which matters when a new master takes it
    // over.
    let tmp = path.with_extension(format!("tmp.{pid}"));
    std::fs::write(&tmp, format!("{pid}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            MasterError::PidFile {
                path: path.to_owned(),
                source,
            }
        })
}

/// Locks the pid file just written (a new inode: the lock taken at start,
/// by daemonize, was on the file it replaced). Held until exit; a failure
/// is logged, not fatal.
fn lock_pid_file(path: Option<&std::path::Path>) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let path = path?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|e| log::warn!("cannot open pid file {} to lock it: {e}", path.display()))
        .ok()?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| log::warn!("cannot lock pid file {}: {e}", path.display()))
        .ok()
}

/// Reads the one line a child writes on its pipe (`ready`, `error: …`)
/// and closes the pipe. None, with the pipe kept, while nothing has come
/// yet; the empty string at EOF without a message or on a read error.
fn read_pipe_line(pipe: &mut Option<OwnedFd>) -> Option<String> {
    let mut file = std::fs::File::from(pipe.take()?);
    let mut buf = [0u8; 4096];
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

/// Reads a worker's ready message, once it is there.
fn read_message(child: &mut Child) {
    let Some(line) = read_pipe_line(&mut child.ready_pipe) else {
        return;
    };
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

/// The reason in a failed reload's log message (`reload (generation N)
/// failed[ after T]: REASON; generation M keeps serving`).
fn reload_reason(message: &str) -> &str {
    let reason = message.split_once(": ").map_or(message, |(_, r)| r);
    reason
        .rsplit_once("; generation ")
        .map_or(reason, |(r, _)| r)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_quotes_a_failed_reload_by_its_reason() {
        assert_eq!(
            reload_reason(
                "reload (generation 4) failed after 12ms: worker echo#0 failed to boot: no; generation 3 keeps serving"
            ),
            "worker echo#0 failed to boot: no"
        );
        assert_eq!(
            reload_reason(
                "reload (generation 2) failed: invalid config: /x.toml:3:1: bad; generation 1 keeps serving"
            ),
            "invalid config: /x.toml:3:1: bad"
        );
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
}
