//! Binary upgrade (SIGUSR2, `preforkd upgrade`), on both sides, and the
//! pid file that names whichever master is in charge.
//!
//! The old master runs the binary on disk again with every listening
//! socket (and the control socket) inherited, a readiness pipe and a
//! lifeline; the new master adopts the sockets by key, boots its workers,
//! writes the pid file, tells the old one `ready PID`, and the old master
//! retires its workers and exits (nginx's USR2 then QUIT, in one step). If
//! the new master fails or is late, the old one stops it and carries on.
//! The lifeline (a pipe the old master holds) reaches EOF in the new one
//! when the old master and its workers are gone.
//!
//! Owns: the upgrade in progress ([`Upgrade`]) in the old master; what a
//! new master takes over ([`TakeOver`]); the pid file's writes and lock.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use super::pool::read_pipe_line;
use super::{FAST_STOP_GRACE, Master, MasterError, Phase, round_ms};
use crate::config::ListenAddr;
use crate::control::{self, ClientId};
use crate::exit::ChildExit;
use crate::listener::Listener;
use crate::sys;
use crate::systemd::{Notifier, NotifyState};
use crate::upgrade::{self, Inherited};

/// A binary upgrade whose new master is booting.
pub(super) struct Upgrade {
    /// The new master.
    pub(super) pid: Pid,
    /// Write end of its lifeline: held until this master exits.
    lifeline: OwnedFd,
    /// Its readiness pipe (read end).
    pub(super) pipe: Option<OwnedFd>,
    started: Instant,
    /// Failed if it is not ready by then (`upgrade_timeout`).
    pub(super) deadline: Instant,
    /// Control clients waiting for the outcome.
    pub(super) waiters: Vec<ClientId>,
}

/// What a new master of an upgrade takes from the previous one, besides
/// the sockets the config names (src/master/listeners.rs).
#[derive(Default)]
pub(super) struct TakeOver {
    /// The pipe to tell the old master we are ready, and its pid.
    pub(super) handover: Option<(OwnedFd, Option<i32>)>,
    /// EOF once the old master has exited.
    pub(super) predecessor: Option<OwnedFd>,
    /// Its sockets that the config no longer names.
    pub(super) orphans: Vec<Listener>,
    /// Our first generation's number.
    pub(super) generation: u64,
}

/// In a new master: what is left of the previous master's hand-over once
/// the config's sockets are taken (None when this master was not started
/// by an upgrade). The sockets the config no longer names are closed once
/// the upgrade is done (their files removed then: until the handover the
/// old master still serves on them).
pub(super) fn take_over(
    inherited: Option<Inherited>,
    notify: Option<OwnedFd>,
    notifier: &mut Notifier,
) -> TakeOver {
    let Some(inh) = inherited else {
        return TakeOver {
            generation: 1,
            ..TakeOver::default()
        };
    };
    let mut orphans = Vec::new();
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
    let handover = notify.map(|notify| {
        // The old master speaks for the service until we take over.
        notifier.hold();
        (notify, inh.from)
    });
    TakeOver {
        handover,
        predecessor: inh.lifeline,
        orphans,
        generation: inh.generation + 1,
    }
}

impl Master {
    /// In a new master of a binary upgrade: take the pid file and the
    /// listeners over, and tell the old master.
    pub(super) fn complete_handover(&mut self) {
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

    /// SIGUSR2 or `upgrade`.
    pub(super) fn request_upgrade(&mut self, client: Option<ClientId>, by: &str) {
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

    /// Runs the next master with the listeners (and control socket)
    /// inherited; it reports on a pipe.
    pub(super) fn start_upgrade(&mut self, waiters: Vec<ClientId>) {
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
                // With the open files limit this master started with, so
                // that the next one knows it (and gives it to exec's
                // programs) when it raises its own.
                .and_then(|()| sys::with_original_nofile(|| cmd.spawn()));
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
    pub(super) fn read_upgrade(&mut self) {
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

    /// The next master exited before we retired: the upgrade failed,
    /// even if it managed to say `ready` first (a dead successor must not
    /// take over).
    pub(super) fn upgrade_exited(&mut self, exit: ChildExit) {
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

    /// Kills a failed upgrade's new master past its deadline, and fails an
    /// upgrade whose new master is late.
    pub(super) fn enforce_upgrade_deadlines(&mut self, now: Instant) {
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

    /// The upgrade failed: the new master is told to stop, we keep serving.
    pub(super) fn fail_upgrade(&mut self, reason: &str) {
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
}

/// Writes the pid file, if one is configured.
pub(super) fn write_pid_file(path: Option<&std::path::Path>, pid: Pid) -> Result<(), MasterError> {
    let Some(path) = path else { return Ok(()) };
    // Written whole to a temporary name, then renamed: a reader never sees
    // it empty or half-written, which matters when a new master takes it
    // over.
    // The temporary file is created new (O_EXCL, which never follows a
    // symlink, and O_NOFOLLOW): a link planted under that name by whoever
    // can write the directory fails the write instead of making root write
    // through it. rename(2) replaces the entry itself, never a link's target.
    let tmp = path.with_extension(format!("tmp.{pid}"));
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        // A leftover of a master that died with this pid: an entry, removed
        // (unlink does not follow a link either).
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(format!("{pid}\n").as_bytes())?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|source| {
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
pub(super) fn lock_pid_file(
    path: Option<&std::path::Path>,
) -> Option<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = path?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| log::warn!("cannot open pid file {} to lock it: {e}", path.display()))
        .ok()?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| log::warn!("cannot lock pid file {}: {e}", path.display()))
        .ok()
}
