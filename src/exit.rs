//! Exit statuses: the codes preforkd exits with (a written contract, listed in
//! the README), the codes a worker exits with, and how the master reads a
//! child's wait status.

use std::fmt;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

/// Exit codes of the `preforkd` process, after sysexits(3).
pub mod code {
    /// Success: a clean stop, or a valid config for `check`.
    pub const OK: i32 = 0;
    /// `preforkd status` and friends: the operation failed (reason printed).
    pub const FAILED: i32 = 1;
    /// EX_USAGE: bad command line.
    pub const USAGE: i32 = 64;
    /// EX_UNAVAILABLE: a listener could not be bound (address in use,
    /// permission, a live Unix socket owned by someone else).
    pub const UNAVAILABLE: i32 = 69;
    /// EX_SOFTWARE: an internal error (a syscall that should not fail did).
    pub const SOFTWARE: i32 = 70;
    /// EX_CANTCREAT: the pid file could not be written (or, `--daemon`, is
    /// locked by a running instance).
    pub const CANTCREAT: i32 = 73;
    /// EX_CONFIG: the configuration is invalid, or the first generation of
    /// workers could not initialise its handler (bad plugin options, say).
    pub const CONFIG: i32 = 78;
}

/// Exit codes a worker uses to tell the master why it left.
pub mod worker {
    /// Finished normally: graceful stop, or recycled after `max_requests`.
    pub const OK: i32 = 0;
    /// The handler could not be initialised; the reason went through the
    /// ready pipe (gunicorn's WORKER_BOOT_ERROR).
    pub const BOOT_ERROR: i32 = 3;
    /// Setting up the worker process itself failed (signals, title, ...).
    pub const SETUP_ERROR: i32 = 4;
    /// The master was already gone when the worker started.
    pub const ORPHANED: i32 = 5;
    /// Connections were still open too long after the worker was asked to
    /// stop (`graceful_timeout`, or 1 s once the master is gone).
    pub const STOP_TIMEOUT: i32 = 6;
    /// The worker (or the metrics process) panicked outside a connection:
    /// a bug in preforkd or in a plugin's set-up, not the master's 70.
    pub const PANICKED: i32 = 7;
    /// An accept loop failed in a way that is not one connection's error
    /// (the listener itself broke): the master backs off and replaces it.
    pub const ACCEPT_FAILED: i32 = 8;
}

/// How a child process ended, classified from its wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// exit(2) with this code.
    Exited(i32),
    /// Killed by this signal; `true` if it dumped core.
    Signaled(Signal, bool),
}

impl ChildExit {
    /// Classifies a status from waitpid; None for statuses that are not an
    /// end (stopped, continued, still alive).
    pub fn from_wait(status: WaitStatus) -> Option<(nix::unistd::Pid, ChildExit)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid, ChildExit::Exited(code))),
            WaitStatus::Signaled(pid, sig, core) => Some((pid, ChildExit::Signaled(sig, core))),
            _ => None,
        }
    }

    /// A normal, expected end: exit code 0.
    pub fn is_clean(self) -> bool {
        self == ChildExit::Exited(worker::OK)
    }
}

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChildExit::Exited(worker::BOOT_ERROR) => {
                write!(f, "exited with status {} (boot error)", worker::BOOT_ERROR)
            }
            ChildExit::Exited(worker::SETUP_ERROR) => {
                write!(
                    f,
                    "exited with status {} (setup error)",
                    worker::SETUP_ERROR
                )
            }
            ChildExit::Exited(worker::ORPHANED) => {
                write!(f, "exited with status {} (master gone)", worker::ORPHANED)
            }
            ChildExit::Exited(worker::STOP_TIMEOUT) => write!(
                f,
                "exited with status {} (stop timed out)",
                worker::STOP_TIMEOUT
            ),
            ChildExit::Exited(worker::PANICKED) => {
                write!(f, "exited with status {} (panicked)", worker::PANICKED)
            }
            ChildExit::Exited(worker::ACCEPT_FAILED) => write!(
                f,
                "exited with status {} (accept failed)",
                worker::ACCEPT_FAILED
            ),
            ChildExit::Exited(c) => write!(f, "exited with status {c}"),
            ChildExit::Signaled(sig, core) => {
                write!(f, "killed by signal {}", sig.as_str())?;
                if core {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    #[test]
    fn classifies_wait_statuses() {
        let pid = Pid::from_raw(42);
        let (p, e) = ChildExit::from_wait(WaitStatus::Exited(pid, 3)).unwrap();
        assert_eq!(p, pid);
        assert_eq!(e.to_string(), "exited with status 3 (boot error)");
        let (_, e) =
            ChildExit::from_wait(WaitStatus::Signaled(pid, Signal::SIGKILL, false)).unwrap();
        assert_eq!(e.to_string(), "killed by signal SIGKILL");
        assert!(!e.is_clean());
        let (_, e) =
            ChildExit::from_wait(WaitStatus::Signaled(pid, Signal::SIGSEGV, true)).unwrap();
        assert_eq!(e.to_string(), "killed by signal SIGSEGV (core dumped)");
        assert!(ChildExit::from_wait(WaitStatus::StillAlive).is_none());
        assert!(ChildExit::Exited(0).is_clean());
    }
}
