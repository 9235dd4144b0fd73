//! The master's signals: handlers only record (a counter per signal and a
//! byte in a self-pipe); the master loop polls the pipe's read end and turns
//! what was recorded into [`Event`]s.
//!
//! Owns: the self-pipe's read end, and (through signal-hook's registry) its
//! write end.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};

use signal_hook::consts::signal::*;
use signal_hook::low_level::pipe;

/// A signal the master acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGCHLD: reap children.
    Child,
    /// SIGTERM: graceful stop.
    Terminate,
    /// SIGINT: fast stop.
    Interrupt,
    /// SIGQUIT: fast stop.
    Quit,
    /// SIGHUP: reload.
    Hangup,
    /// SIGUSR1: reopen logs.
    User1,
    /// SIGUSR2: binary upgrade.
    User2,
    /// SIGTTIN: one worker more in every service.
    TtyIn,
    /// SIGTTOU: one worker fewer in every service.
    TtyOut,
}

/// Every handled signal, in the order the master acts on them.
const TABLE: [(libc::c_int, Event); 9] = [
    (SIGCHLD, Event::Child),
    (SIGINT, Event::Interrupt),
    (SIGQUIT, Event::Quit),
    (SIGTERM, Event::Terminate),
    (SIGHUP, Event::Hangup),
    (SIGUSR1, Event::User1),
    (SIGUSR2, Event::User2),
    (SIGTTIN, Event::TtyIn),
    (SIGTTOU, Event::TtyOut),
];

/// How many times each signal of [`TABLE`] arrived since the last drain.
static COUNTS: [AtomicUsize; 9] = [const { AtomicUsize::new(0) }; 9];

/// The master's signal self-pipe.
pub struct Signals {
    read: UnixStream,
}

impl Signals {
    /// Installs the handlers. Call once, in the master.
    pub fn install() -> io::Result<Signals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        for (i, &(sig, _)) in TABLE.iter().enumerate() {
            // The counter first, then the wake-up byte: after draining the
            // pipe the loop is sure to see the count (signal-hook's order).
            crate::sys::count_signal(sig, &COUNTS[i])?;
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
        TABLE
            .iter()
            .enumerate()
            .filter_map(|(i, &(_, ev))| match COUNTS[i].swap(0, Ordering::SeqCst) {
                0 => None,
                n => Some((ev, n)),
            })
            .collect()
    }
}
