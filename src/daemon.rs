//! `--daemon`: detach from the terminal with the `daemonize` crate (fork,
//! setsid, fork, stdio to /dev/null, umask 027, chdir /, the pid file
//! created and locked with `flock`), and make the launching process wait
//! until the daemon is ready (or report why it is not).
//!
//! The crate's own parent returns as soon as the intermediate child has
//! forked, long before the sockets are bound; so the launcher keeps the
//! read end of a pipe whose write end the daemon holds, and the daemon
//! writes one line into it: `ready`, or `error CODE REASON`. EOF without a
//! line means the daemon died before it could say.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::OFlag;

use crate::exit::code;

/// The daemon's end of the readiness pipe, until it has said something.
static READY: Mutex<Option<std::fs::File>> = Mutex::new(None);
/// Whether this process is the daemon (the pid file is already written).
static DAEMON: AtomicBool = AtomicBool::new(false);
/// The daemon's pid file, removed if it fails to start.
static PID_FILE: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

/// Which side of [`daemonize()`] returned.
pub enum Side {
    /// The launching process: exit with this code.
    Launcher(i32),
    /// The daemon: carry on serving.
    Daemon,
}

/// Whether this process was daemonized (and so the pid file is written
/// and locked already).
pub fn is_daemon() -> bool {
    DAEMON.load(Ordering::SeqCst)
}

/// Detaches. In the launcher, waits for the daemon's readiness line and
/// returns the exit code; in the daemon, returns [`Side::Daemon`].
pub fn daemonize(pid_file: &Path) -> Side {
    let (read, write) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            log::error!("--daemon: cannot create the readiness pipe: {e}");
            return Side::Launcher(code::SOFTWARE);
        }
    };
    match daemonize::Daemonize::new()
        .pid_file(pid_file)
        .working_directory("/")
        .umask(0o027)
        .execute()
    {
        daemonize::Outcome::Parent(Err(e)) => {
            log::error!("--daemon: cannot detach: {e}");
            Side::Launcher(code::SOFTWARE)
        }
        daemonize::Outcome::Parent(Ok(_)) => {
            drop(write);
            Side::Launcher(wait(read))
        }
        daemonize::Outcome::Child(Err(e)) => {
            drop(read);
            let (status, reason) = if e.to_string().starts_with("unable to lock pid file") {
                let holder = std::fs::read_to_string(pid_file).unwrap_or_default();
                (
                    code::CANTCREAT,
                    format!(
                        "{}: pid file is locked: another preforkd (pid {}) runs on it",
                        pid_file.display(),
                        holder.trim()
                    ),
                )
            } else {
                (
                    code::SOFTWARE,
                    format!("cannot daemonize (pid file {}): {e}", pid_file.display()),
                )
            };
            let mut f = std::fs::File::from(write);
            let _ = writeln!(f, "error {status} {reason}");
            std::process::exit(status);
        }
        daemonize::Outcome::Child(Ok(_)) => {
            drop(read);
            DAEMON.store(true, Ordering::SeqCst);
            *PID_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid_file.to_owned());
            *lock() = Some(std::fs::File::from(write));
            Side::Daemon
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<std::fs::File>> {
    READY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The launcher: reads the daemon's line and turns it into an exit code,
/// printing the reason of a failure.
fn wait(read: OwnedFd) -> i32 {
    let mut text = String::new();
    let _ = std::fs::File::from(read).read_to_string(&mut text);
    let line = text.lines().next().unwrap_or("");
    if line == "ready" {
        return code::OK;
    }
    if let Some(rest) = line.strip_prefix("error ") {
        let (status, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        eprintln!("preforkd: the daemon failed to start: {reason}");
        return status.parse().unwrap_or(code::SOFTWARE);
    }
    eprintln!("preforkd: the daemon exited before it was ready, without a reason");
    code::SOFTWARE
}

/// The daemon's first generation is ready: lets the launcher exit 0. Later
/// calls do nothing.
pub fn ready() {
    if let Some(mut f) = lock().take() {
        let _ = f.write_all(b"ready\n");
    }
}

/// The daemon stops before it was ready: tells the launcher `status` and
/// why. Does nothing once [`ready`] was called.
pub fn failed(status: i32, reason: &str) {
    if let Some(mut f) = lock().take() {
        // Still ours (locked, naming us): no stale pid file is left behind.
        if let Some(path) = PID_FILE.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = std::fs::remove_file(path);
        }
        let status = if status == code::OK {
            code::SOFTWARE
        } else {
            status
        };
        let _ = writeln!(f, "error {status} {}", reason.replace('\n', " "));
    }
}
