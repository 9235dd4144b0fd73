//! The accept gate of an event-driven worker: one thread that waits on the
//! service's stream listeners and hands each accepted connection to the
//! worker's event loop.
//!
//! Why a thread of its own: every worker of a service waits on the same
//! accept queues (the master's sockets, rule 3), and a new connection
//! should wake one of them, not all (the thundering herd). Linux offers
//! that as EPOLLEXCLUSIVE, which only works for a thread that sleeps in
//! epoll_wait on the epoll set holding the listener: tokio's reactor (mio)
//! does not expose the flag, and an epoll set nested in the reactor's
//! loses the exclusivity (the kernel counts a wake-up as taken only when
//! the set has a sleeping waiter, which a nested set never has). Per-worker
//! SO_REUSEPORT sockets would each have a queue that dies with its worker.
//! So the gate sleeps in its own epoll_wait with the listeners registered
//! EPOLLEXCLUSIVE, and the loop never sees them.
//!
//! Spreading: an exclusive wake-up goes to the first sleeping waiter in the
//! listener's wait queue, so at light load one worker takes every new
//! connection (one busy loop beats several half-idle ones, as nginx's
//! workers behave with EPOLLEXCLUSIVE). Past `AHEAD_FLOOR` connections a
//! gate leaves the queues while its worker serves `AHEAD_SLACK` (or an
//! eighth) more connections than the least loaded live sibling of its
//! service, looking again every 5 ms, and comes back at the tail: nginx's
//! `ngx_accept_disabled`, measured against the siblings rather than the
//! limit. The least loaded worker is never held back, so the queue is
//! always served. (A first version took every gate out of the queues and
//! back in after each wake-up, so that the workers took turns: two
//! syscalls per wake-up, and on a busy machine the gate that happened to be
//! running still took whole bursts.)
//!
//! Capacity: at `worker_connections` the gate leaves the queues (the other
//! workers take what comes) and counts it in the scoreboard ("full");
//! the loop wakes it through an eventfd when a connection ends. A loop
//! that a handler blocks (no heartbeat for two beats) is treated as full:
//! what the gate handed it would wait with it, and be reset when the
//! master kills the worker (nginx, accepting from its loop, takes nothing
//! while blocked either).
//!
//! Owns: the worker's stream listeners (its copies), its epoll set, and the
//! sending half of the hand-off channel, dropped when the worker stops: the
//! loop's signal that no more connections come.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::handler::{Addr, Stream};
use crate::listener::{self, WorkerSocket};
use crate::scoreboard::Slot;
use crate::sys;

/// An accepted connection, on its way to the loop.
pub(super) struct Handoff {
    /// The socket, nonblocking and close-on-exec.
    pub stream: Stream,
    pub peer: Addr,
    /// Index of its listener in the worker's socket list.
    pub listener: usize,
}

/// What the gate sends the loop.
pub(super) enum Gated {
    /// A connection to serve.
    Conn(Handoff),
    /// The worker stops: connections close at their next request
    /// boundary. Sent before the gate hands over what is still queued, so
    /// that a connection holding the worker's last room at the stop frees
    /// it for them.
    Stopping,
}

/// What the gate and the loop share.
pub(super) struct Capacity {
    /// Connections handed to the loop and not yet ended.
    pub open: AtomicUsize,
    /// `worker_connections`.
    pub limit: usize,
    /// The gate has left the queues because the worker is full.
    paused: AtomicBool,
    /// Written by the loop when a connection ends while the gate is paused.
    resume: EventFd,
    /// When the loop last turned (its heartbeat, coarse clock ms; 0: not
    /// yet): a loop that has not turned for `stall_ms` is blocked by a
    /// handler, and what the gate handed it now would wait with it (and be
    /// reset when the master kills the worker), so the gate leaves the
    /// queues to the other workers until it turns again.
    turned_ms: std::sync::atomic::AtomicU64,
    /// Two heartbeats.
    stall_ms: u64,
}

impl Capacity {
    /// For `limit` connections, with the loop's heartbeat every `beat`.
    pub fn new(limit: usize, beat: Duration) -> io::Result<Arc<Capacity>> {
        Ok(Arc::new(Capacity {
            open: AtomicUsize::new(0),
            limit,
            paused: AtomicBool::new(false),
            resume: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
            turned_ms: std::sync::atomic::AtomicU64::new(0),
            stall_ms: 2 * beat.as_millis() as u64,
        }))
    }

    /// The loop turned at `now_ms` (its heartbeat task).
    pub fn turned(&self, now_ms: u64) {
        self.turned_ms.store(now_ms.max(1), Ordering::SeqCst);
    }

    /// Whether the loop has not turned for two heartbeats.
    fn is_stalled(&self) -> bool {
        let t = self.turned_ms.load(Ordering::SeqCst);
        t != 0 && sys::coarse_ms().saturating_sub(t) > self.stall_ms
    }

    /// A connection has ended (called by the loop).
    pub fn release(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        // SeqCst on both sides: either the gate sees the lower count after
        // it paused, or we see that it paused.
        if self.paused.load(Ordering::SeqCst) {
            let _ = self.resume.write(1);
        }
    }

    fn is_full(&self) -> bool {
        self.open.load(Ordering::SeqCst) >= self.limit
    }
}

/// Epoll tokens.
const WAKE: u64 = u64::MAX;
const RESUME: u64 = u64::MAX - 1;
/// Most connections taken from one listener per wake-up before the gate
/// goes to the back of the queue: the others' turn.
const BATCH: usize = 8;
/// Connections a worker may serve beyond its least loaded sibling before
/// it leaves the queue to the others (at least; an eighth of the
/// sibling's count above that).
const AHEAD_SLACK: u64 = 4;
/// Below this many connections a worker is never ahead: at light load the
/// first waiting worker takes every new connection (one busy loop beats
/// several half-idle ones for cache and wake-ups), as nginx's workers do
/// with EPOLLEXCLUSIVE.
const AHEAD_FLOOR: u64 = 16;
/// How often a gate that is ahead looks again (ms).
const AHEAD_RECHECK_MS: u16 = 5;
/// A sibling whose heartbeat is older than this is not waited for (ms).
const SIBLING_FRESH_MS: u64 = 3000;
/// Most connections a stopping gate takes from one listener (a wake-up
/// meant for it may have come just before the stop; see
/// src/worker/mod.rs, `take_signalled`).
const STOP_PICKUP: usize = 4;

/// The gate thread: accepts until the worker stops, then drops `tx`.
pub(super) struct Gate {
    pub name: String,
    /// The stream listeners, with their index in the worker's list.
    pub listeners: Vec<(usize, WorkerSocket)>,
    pub tx: tokio::sync::mpsc::UnboundedSender<Gated>,
    pub capacity: Arc<Capacity>,
    pub board: Option<Slot>,
}

impl Gate {
    /// Runs the gate; an error (epoll) stops the worker, not cleanly.
    pub fn run(self) -> io::Result<()> {
        let result = self.accept_loop();
        if result.is_err() {
            sys::request_shutdown();
        }
        result
    }

    fn register(&self, ep: &Epoll, on: bool) -> io::Result<()> {
        for (k, (_, l)) in self.listeners.iter().enumerate() {
            if on {
                let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
                ep.add(l.as_fd(), EpollEvent::new(flags, k as u64))?;
            } else {
                ep.delete(l.as_fd())?;
            }
        }
        Ok(())
    }

    fn accept_loop(&self) -> io::Result<()> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        ep.add(
            sys::shutdown_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE),
        )?;
        ep.add(
            self.capacity.resume.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, RESUME),
        )?;
        let mut registered = false;
        let mut events = [EpollEvent::empty(); 8];
        while !sys::shutdown_requested() {
            let stalled = !registered && self.capacity.is_stalled();
            let ahead = !registered && !stalled && self.ahead();
            if !registered && !stalled && !ahead && !self.pause_if_full() {
                self.register(&ep, true)?;
                registered = true;
            }
            // Out of the queues: look again soon.
            let timeout = if stalled {
                EpollTimeout::try_from(Duration::from_millis(self.capacity.stall_ms / 2))
                    .unwrap_or(EpollTimeout::NONE)
            } else if ahead {
                EpollTimeout::from(AHEAD_RECHECK_MS)
            } else {
                EpollTimeout::NONE
            };
            let n = match ep.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if sys::shutdown_requested() {
                break;
            }
            for ev in &events[..n] {
                match ev.data() {
                    WAKE => {}
                    RESUME => {
                        let _ = self.capacity.resume.read();
                    }
                    k if registered && !self.take(k as usize, BATCH)? => {
                        return Ok(()); // the loop is gone
                    }
                    _ => {}
                }
            }
            // Out of the queues when full, blocked or ahead of a sibling;
            // otherwise it stays where it is.
            if registered && (self.capacity.is_full() || self.capacity.is_stalled() || self.ahead())
            {
                self.register(&ep, false)?;
                registered = false;
            }
        }
        if registered {
            self.register(&ep, false)?;
        }
        if self.tx.send(Gated::Stopping).is_err() {
            return Ok(()); // the loop is gone
        }
        for k in 0..self.listeners.len() {
            // A daemon stop sealed it: every queued connection is ours.
            let more = if listener::is_sealed(&self.listeners[k].1) {
                self.drain(k)?
            } else if readable_now(self.listeners[k].1.as_fd()) {
                self.take(k, STOP_PICKUP)?
            } else {
                true
            };
            if !more {
                break;
            }
        }
        Ok(())
    }

    /// Hands over every connection queued on sealed listener `k` (its
    /// queue empties for good, see [`listener::is_sealed`]), waiting for
    /// room when the worker is full; false once the loop is gone.
    fn drain(&self, k: usize) -> io::Result<bool> {
        let (index, listener) = &self.listeners[k];
        loop {
            if self.capacity.is_full() {
                self.pause_if_full();
                let mut fds = [nix::poll::PollFd::new(
                    self.capacity.resume.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
                let _ = self.capacity.resume.read();
                continue;
            }
            match accept(listener) {
                Ok((stream, peer)) => {
                    if !self.hand_over(*index, stream, peer) {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(true),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR)) => {}
                Err(e) => {
                    super::note_accept_failure(&self.name, &e);
                    return Ok(true);
                }
            }
        }
    }

    /// Counts an accepted connection against the worker's room and hands
    /// it to the loop; false once the loop is gone.
    fn hand_over(&self, listener: usize, stream: Stream, peer: Addr) -> bool {
        self.capacity.open.fetch_add(1, Ordering::SeqCst);
        let handoff = Handoff {
            stream,
            peer,
            listener,
        };
        self.tx.send(Gated::Conn(handoff)).is_ok()
    }

    /// Whether this worker serves enough more connections than its least
    /// loaded live sibling to leave the next ones to it (nginx's
    /// `ngx_accept_disabled`, against the siblings instead of the limit).
    /// The least loaded worker is never ahead, so the queue is always
    /// served; a sibling whose loop has stopped (stale heartbeat) does not
    /// count.
    /// Below [`AHEAD_FLOOR`] it costs one load (no scan of the siblings).
    fn ahead(&self) -> bool {
        let mine = self.capacity.open.load(Ordering::SeqCst) as u64;
        if mine < AHEAD_FLOOR {
            return false;
        }
        let Some(b) = &self.board else { return false };
        let Some(least) = b.least_loaded_sibling(sys::coarse_ms(), SIBLING_FRESH_MS) else {
            return false;
        };
        mine >= least + (least / 8).max(AHEAD_SLACK)
    }

    /// Marks the gate paused when the worker is full; false when it is not
    /// (any more).
    fn pause_if_full(&self) -> bool {
        if !self.capacity.is_full() {
            self.capacity.paused.store(false, Ordering::SeqCst);
            return false;
        }
        let was = self.capacity.paused.swap(true, Ordering::SeqCst);
        // Seen full after saying so: a release from now on writes `resume`.
        if !self.capacity.is_full() {
            self.capacity.paused.store(false, Ordering::SeqCst);
            return false;
        }
        if !was && let Some(b) = &self.board {
            b.full();
        }
        true
    }

    /// Accepts up to `most` connections from listener `k` while the worker
    /// has room and hands them over; false once the loop is gone.
    fn take(&self, k: usize, most: usize) -> io::Result<bool> {
        let (index, listener) = &self.listeners[k];
        for taken in 0..most {
            if self.capacity.is_full() || self.capacity.is_stalled() || (taken > 0 && self.ahead())
            {
                break;
            }
            match accept(listener) {
                Ok((stream, peer)) => {
                    if !self.hand_over(*index, stream, peer) {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break, // shut down by the master
                Err(e) => {
                    super::note_accept_failure(&self.name, &e);
                    if super::is_resource_limit(&e) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    break;
                }
            }
        }
        Ok(true)
    }
}

/// Accepts one connection, nonblocking and close-on-exec (accept4: no
/// extra fcntl).
fn accept(listener: &WorkerSocket) -> io::Result<(Stream, Addr)> {
    let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    let (socket, addr) = socket2::SockRef::from(listener).accept4(flags)?;
    let fd: std::os::fd::OwnedFd = socket.into();
    match listener {
        WorkerSocket::Tcp(_) => {
            let peer = addr
                .as_socket()
                .ok_or_else(|| io::Error::other("accept4() gave a TCP peer without an address"))?;
            Ok((Stream::Tcp(fd.into()), Addr::Inet(peer)))
        }
        WorkerSocket::Unix(_) => {
            let peer = addr.as_pathname().map(std::path::Path::to_path_buf);
            Ok((Stream::Unix(fd.into()), Addr::Unix(peer)))
        }
        _ => Err(io::Error::other("a datagram socket is not accepted")),
    }
}

/// Whether a listener has a connection waiting.
fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}
