//! Every signal preforkd handles, in one table ([`SIGNALS`], nginx's
//! `signals[]` in `ngx_process.c`): one row per signal, named by its intent,
//! with what the master does with it and what a worker does with it. The
//! rest of this module carries the table out:
//!
//! - **in the master**, handlers only record (a counter per signal and a
//!   byte in a self-pipe); the master loop polls the pipe's read end and
//!   [`Signals::drain`] turns what was recorded into [`Event`]s, in the
//!   table's order, which is the order the master acts on them;
//! - **in a worker** (and the metrics child), [`install_worker`] gives every
//!   row its worker disposition, with the three handlers defined here;
//! - **in a program a worker runs** (the `exec` plugin), every signal of
//!   the table is reset to its default ([`EXEC_DEFAULT`]).
//!
//! The unsafe part (sigaction, the shutdown flag and its wake pipe) is in
//! [`crate::sys`]; this module decides, sys carries out.
//!
//! Owns: the master's self-pipe read end, (through signal-hook's registry)
//! its write end, and the master's per-signal counters.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::signal::Signal;
use signal_hook::low_level::pipe;

use crate::sys::{self, Disposition};

/// A signal the master acts on, named by what it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGCHLD: reap children.
    Reap,
    /// SIGINT or SIGQUIT (which one, for the log): stop now, killing the
    /// workers.
    FastStop(Signal),
    /// SIGTERM: stop gracefully, letting connections finish.
    GracefulStop,
    /// SIGHUP: reload the config.
    Reload,
    /// SIGUSR1: reopen the log target, here and in every worker.
    Reopen,
    /// SIGUSR2: binary upgrade (start a new master that takes over).
    Upgrade,
    /// SIGTTIN: one worker more in every static service.
    MoreWorkers,
    /// SIGTTOU: one worker fewer in every static service.
    FewerWorkers,
}

/// What a worker (or the metrics child) does when a signal arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerAction {
    /// Stop at the next request boundary ([`sys::request_shutdown`]).
    GracefulStop,
    /// Exit at once, without unwinding or flushing anything.
    FastStop,
    /// Reopen the log target before the next record ([`crate::log::request_reopen`]).
    Reopen,
    /// Ignore it: a master-only signal sent to the whole process group
    /// must not kill workers, and a client that goes away (SIGPIPE) is an
    /// error return, not death.
    Ignore,
    /// The default action (SIGCHLD: the worker reaps its own programs).
    Default,
}

/// One signal, what it is for, and what each process does with it.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// The signal.
    pub signal: Signal,
    /// What it asks for, in a few words (nginx's "reload", "reopen").
    pub intent: &'static str,
    /// What the master makes of it; None: the master leaves it alone
    /// (SIGPIPE stays ignored, as Rust's runtime sets it before `main`).
    pub master: Option<Event>,
    /// What a worker does with it.
    pub worker: WorkerAction,
}

/// Every signal preforkd handles or ignores. Master rows come in the order
/// the master acts on them: reap first (so that a stop sees who is still
/// alive), stops before reload and the rest (a reload is pointless once
/// stopping).
pub const SIGNALS: &[Row] = &[
    Row {
        signal: Signal::SIGCHLD,
        intent: "reap",
        master: Some(Event::Reap),
        worker: WorkerAction::Default,
    },
    Row {
        signal: Signal::SIGINT,
        intent: "fast stop",
        master: Some(Event::FastStop(Signal::SIGINT)),
        worker: WorkerAction::FastStop,
    },
    Row {
        signal: Signal::SIGQUIT,
        intent: "fast stop",
        master: Some(Event::FastStop(Signal::SIGQUIT)),
        worker: WorkerAction::FastStop,
    },
    Row {
        signal: Signal::SIGTERM,
        intent: "graceful stop",
        master: Some(Event::GracefulStop),
        worker: WorkerAction::GracefulStop,
    },
    Row {
        signal: Signal::SIGHUP,
        intent: "reload",
        master: Some(Event::Reload),
        worker: WorkerAction::Ignore,
    },
    Row {
        signal: Signal::SIGUSR1,
        intent: "reopen",
        master: Some(Event::Reopen),
        worker: WorkerAction::Reopen,
    },
    Row {
        signal: Signal::SIGUSR2,
        intent: "upgrade",
        master: Some(Event::Upgrade),
        worker: WorkerAction::Ignore,
    },
    Row {
        signal: Signal::SIGTTIN,
        intent: "more workers",
        master: Some(Event::MoreWorkers),
        worker: WorkerAction::Ignore,
    },
    Row {
        signal: Signal::SIGTTOU,
        intent: "fewer workers",
        master: Some(Event::FewerWorkers),
        worker: WorkerAction::Ignore,
    },
    Row {
        signal: Signal::SIGPIPE,
        intent: "peer gone",
        master: None,
        worker: WorkerAction::Ignore,
    },
];

/// The signals a program run by a worker gets back at their default: all
/// of [`SIGNALS`], which the worker handles or ignores (execve resets the
/// handled ones, but not the ignored ones, and a program must not inherit
/// an ignored SIGPIPE or SIGHUP). Given to [`sys::spawn_program`] as data.
pub static EXEC_DEFAULT: [libc::c_int; SIGNALS.len()] = {
    let mut out = [0; SIGNALS.len()];
    let mut i = 0;
    while i < SIGNALS.len() {
        out[i] = SIGNALS[i].signal as libc::c_int;
        i += 1;
    }
    out
};

impl Event {
    /// The row this event comes from.
    pub fn row(self) -> &'static Row {
        SIGNALS
            .iter()
            .find(|r| r.master == Some(self))
            .expect("every Event has a row in SIGNALS")
    }
}

/// How many times each signal of [`SIGNALS`] arrived since the last drain,
/// by row (rows without a master event keep 0).
static COUNTS: [AtomicUsize; SIGNALS.len()] = [const { AtomicUsize::new(0) }; SIGNALS.len()];

/// The master's signal self-pipe.
pub struct Signals {
    read: UnixStream,
}

impl Signals {
    /// Installs the master's handlers. Call once, in the master.
    pub fn install() -> io::Result<Signals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        for (i, row) in SIGNALS.iter().enumerate() {
            if row.master.is_none() {
                continue;
            }
            let sig = row.signal as libc::c_int;
            // The counter first, then the wake-up byte: after draining the
            // pipe the loop is sure to see the count (signal-hook's order).
            sys::count_signal(sig, &COUNTS[i])?;
            pipe::register(sig, write.try_clone()?)?;
        }
        Ok(Signals { read })
    }

    /// The read end, to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Empties the pipe, then returns what arrived, in priority order.
    pub fn drain(&mut self) -> Vec<(Event, usize)> {
        let mut buf = [0u8; 256];
        loop {
            match self.read.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break, // WouldBlock: empty
            }
        }
        SIGNALS
            .iter()
            .enumerate()
            .filter_map(|(i, row)| {
                let event = row.master?;
                match COUNTS[i].swap(0, Ordering::SeqCst) {
                    0 => None,
                    n => Some((event, n)),
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Workers.

/// SIGTERM in a worker: stop at the next request boundary.
/// Async-signal-safe: one atomic store and one write(2).
extern "C" fn on_graceful_stop(_: libc::c_int) {
    sys::request_shutdown();
}

/// SIGINT and SIGQUIT in a worker: a fast stop means "exit now", without
/// unwinding or flushing anything. Async-signal-safe: _exit(2).
extern "C" fn on_fast_stop(_: libc::c_int) {
    sys::exit_now(0);
}

/// SIGUSR1 in a worker: the next record written reopens the log target.
/// Async-signal-safe: one atomic store.
extern "C" fn on_reopen(_: libc::c_int) {
    crate::log::request_reopen();
}

impl WorkerAction {
    /// The disposition that carries this action out.
    fn disposition(self) -> Disposition {
        match self {
            WorkerAction::GracefulStop => Disposition::Handle(on_graceful_stop),
            WorkerAction::FastStop => Disposition::Handle(on_fast_stop),
            WorkerAction::Reopen => Disposition::Handle(on_reopen),
            WorkerAction::Ignore => Disposition::Ignore,
            WorkerAction::Default => Disposition::Default,
        }
    }
}

/// In a freshly forked worker (or metrics child), whose signals are all
/// blocked since [`sys::fork`]: creates the shutdown wake pipe, replaces the
/// master's signal handling with the worker column of [`SIGNALS`], and
/// unblocks every signal.
pub fn install_worker() -> io::Result<()> {
    // Before the handlers: on_graceful_stop writes to it.
    sys::init_shutdown_pipe()?;
    for row in SIGNALS {
        // SAFETY: the only handlers installed are the three above, which
        // call nothing but sys::request_shutdown (an atomic store and
        // write(2)), sys::exit_now (_exit(2)) and log::request_reopen (an
        // atomic store): all async-signal-safe.
        unsafe { sys::set_disposition(row.signal, row.worker.disposition()) }?;
    }
    sys::unblock_signals()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every master event comes from exactly one row, and no signal has
    /// two rows.
    #[test]
    fn one_row_per_signal_and_per_event() {
        for (i, a) in SIGNALS.iter().enumerate() {
            for b in &SIGNALS[i + 1..] {
                assert_ne!(a.signal, b.signal, "{:?} has two rows", a.signal);
                if a.master.is_some() {
                    assert_ne!(a.master, b.master, "{:?} comes from two rows", a.master);
                }
            }
        }
        let events = [
            Event::Reap,
            Event::FastStop(Signal::SIGINT),
            Event::FastStop(Signal::SIGQUIT),
            Event::GracefulStop,
            Event::Reload,
            Event::Reopen,
            Event::Upgrade,
            Event::MoreWorkers,
            Event::FewerWorkers,
        ];
        for e in events {
            assert_eq!(SIGNALS.iter().filter(|r| r.master == Some(e)).count(), 1);
            assert_eq!(e.row().master, Some(e));
        }
        assert_eq!(
            SIGNALS.iter().filter(|r| r.master.is_some()).count(),
            events.len()
        );
    }

    /// A fast stop names the signal it came from, for the master's log.
    #[test]
    fn fast_stop_carries_its_own_signal() {
        for row in SIGNALS {
            if let Some(Event::FastStop(sig)) = row.master {
                assert_eq!(sig, row.signal);
            }
        }
    }

    /// The master acts on reaping first, then stops, then the rest.
    #[test]
    fn master_order() {
        let order: Vec<Event> = SIGNALS.iter().filter_map(|r| r.master).collect();
        assert_eq!(order[0], Event::Reap);
        let graceful = order.iter().position(|e| *e == Event::GracefulStop);
        let reload = order.iter().position(|e| *e == Event::Reload);
        assert!(graceful < reload);
        for e in &order[1..3] {
            assert!(matches!(e, Event::FastStop(_)), "{order:?}");
        }
    }

    /// A program run by a worker gets back at their default every signal
    /// the worker handles or ignores, and SIGCHLD.
    #[test]
    fn exec_resets_every_worker_signal() {
        for row in SIGNALS {
            assert!(
                EXEC_DEFAULT.contains(&(row.signal as libc::c_int)),
                "{:?} is not reset for programs",
                row.signal
            );
        }
        for sig in [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGPIPE,
            libc::SIGCHLD,
        ] {
            assert!(EXEC_DEFAULT.contains(&sig), "{sig}");
        }
    }

    /// What the worker does with each signal, as it did before the table
    /// (the exec and workers tests depend on it).
    #[test]
    fn worker_column() {
        let action = |sig| SIGNALS.iter().find(|r| r.signal == sig).unwrap().worker;
        assert_eq!(action(Signal::SIGTERM), WorkerAction::GracefulStop);
        assert_eq!(action(Signal::SIGINT), WorkerAction::FastStop);
        assert_eq!(action(Signal::SIGQUIT), WorkerAction::FastStop);
        assert_eq!(action(Signal::SIGUSR1), WorkerAction::Reopen);
        assert_eq!(action(Signal::SIGCHLD), WorkerAction::Default);
        for sig in [
            Signal::SIGHUP,
            Signal::SIGUSR2,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
            Signal::SIGPIPE,
        ] {
            assert_eq!(action(sig), WorkerAction::Ignore, "{sig:?}");
        }
    }
}
