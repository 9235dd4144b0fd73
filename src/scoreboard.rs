//! The scoreboard: one slot of counters per worker, in memory the master
//! maps (shared, anonymous) before it forks anything. A worker writes only
//! its own slot, with atomic stores; the master reads every slot for
//! `preforkd status`. Nothing touches the disk.
//!
//! Owns: the mapping (for the life of the process) and, in the master, the
//! list of free slots.

use std::sync::atomic::{AtomicU64, Ordering};

/// Words per slot: see the `W_*` offsets.
const WORDS: usize = 3;
/// The worker's pid, once it has attached (0: not yet, or slot free).
const W_PID: usize = 0;
/// Connections (or datagrams) served so far.
const W_SERVED: usize = 1;
/// Connections being served right now.
const W_ACTIVE: usize = 2;

/// Slots in one master's scoreboard: twice the largest pool the config
/// allows (4096) with room for a reload's second generation of several
/// services. A worker started when every slot is taken runs without one
/// (status then shows no counters for it).
pub const CAPACITY: usize = 16384;

/// The whole table, as the master holds it.
pub struct Scoreboard {
    words: &'static [AtomicU64],
    free: Vec<usize>,
}

/// A worker's view of its own slot.
#[derive(Clone, Copy)]
pub struct Slot {
    words: &'static [AtomicU64],
}

/// What the master reads from a slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// The pid that attached to the slot (0: not yet).
    pub pid: u64,
    /// Connections (or datagrams) served.
    pub served: u64,
    /// Connections in progress.
    pub active: u64,
}

impl Scoreboard {
    /// Maps the table. Call in the master before the first fork.
    pub fn new() -> std::io::Result<Scoreboard> {
        let words = crate::sys::shared_atomics(CAPACITY * WORDS)?;
        Ok(Scoreboard {
            words,
            free: (0..CAPACITY).rev().collect(),
        })
    }

    /// Takes a free slot for a worker about to be forked and clears it.
    pub fn claim(&mut self) -> Option<usize> {
        let i = self.free.pop()?;
        let s = self.slot(i);
        s.words[W_PID].store(0, Ordering::Relaxed);
        s.words[W_SERVED].store(0, Ordering::Relaxed);
        s.words[W_ACTIVE].store(0, Ordering::Relaxed);
        Some(i)
    }

    /// Gives a dead worker's slot back.
    pub fn release(&mut self, i: usize) {
        self.slot(i).words[W_PID].store(0, Ordering::Relaxed);
        self.free.push(i);
    }

    /// Slot `i`, to hand to the worker forked for it.
    pub fn slot(&self, i: usize) -> Slot {
        Slot {
            words: &self.words[i * WORDS..(i + 1) * WORDS],
        }
    }

    /// What slot `i`'s worker has written.
    pub fn read(&self, i: usize) -> Counters {
        let w = self.slot(i).words;
        Counters {
            pid: w[W_PID].load(Ordering::Relaxed),
            served: w[W_SERVED].load(Ordering::Relaxed),
            active: w[W_ACTIVE].load(Ordering::Relaxed),
        }
    }
}

impl Slot {
    /// Marks the slot as this worker's (called once, after fork).
    pub fn attach(&self, pid: u32) {
        self.words[W_PID].store(u64::from(pid), Ordering::Relaxed);
    }

    /// A connection or datagram begins.
    pub fn begin(&self) {
        self.words[W_ACTIVE].fetch_add(1, Ordering::Relaxed);
    }

    /// It has been served.
    pub fn end(&self) {
        self.words[W_ACTIVE].fetch_sub(1, Ordering::Relaxed);
        self.words[W_SERVED].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_cleared_claimed_and_released() {
        let mut board = Scoreboard::new().unwrap();
        let a = board.claim().unwrap();
        let b = board.claim().unwrap();
        assert_ne!(a, b);
        let s = board.slot(a);
        s.attach(42);
        s.begin();
        assert_eq!(
            board.read(a),
            Counters {
                pid: 42,
                served: 0,
                active: 1
            }
        );
        s.end();
        s.begin();
        s.end();
        assert_eq!(
            board.read(a),
            Counters {
                pid: 42,
                served: 2,
                active: 0
            }
        );
        assert_eq!(board.read(b), Counters::default());
        board.release(a);
        let c = board.claim().unwrap();
        assert_eq!(c, a, "a released slot is reused");
        assert_eq!(board.read(c), Counters::default());
    }

    #[test]
    fn a_forked_child_writes_what_the_parent_reads() {
        let mut board = Scoreboard::new().unwrap();
        let i = board.claim().unwrap();
        let slot = board.slot(i);
        // A plain fork in a test thread: the child only touches atomics and
        // _exits.
        match crate::sys::fork().unwrap() {
            crate::sys::Forked::Child => {
                slot.begin();
                slot.end();
                crate::sys::exit_now(0);
            }
            crate::sys::Forked::Parent(pid) => {
                nix::sys::wait::waitpid(pid, None).unwrap();
            }
        }
        assert_eq!(board.read(i).served, 1);
    }
}
