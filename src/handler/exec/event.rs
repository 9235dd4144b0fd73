//! `exec` in a `mode = "async"` worker: one loop runs up to
//! `worker_connections` programs at once with no thread each (tcpserver's
//! `-c` limit, without threads). Each program's pidfd (readable when it
//! exits) and pipes are registered with the loop ([`AsyncFd`]); the loop
//! sleeps until one of them is readable, a deadline of the run
//! ([`Deadlines`]) falls, or the worker is asked to stop. Once the pidfd is
//! readable the program is reaped with waitpid(WNOHANG), which then cannot
//! block.
//!
//! The program owns the socket as in threads mode: its open file is
//! switched to blocking for the program (which expects plain reads and
//! writes), and the loop does no I/O on it until the program has exited
//! and the socket is nonblocking again.
//!
//! Starting a program (clone with CLONE_VFORK) holds the loop only until
//! its execve.
//!
//! Owns: nothing beyond a handler call: the run it started, its pidfd and
//! its pipes, reaped and closed before it returns.

use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{DRAIN_READS, Deadlines, Exec, Pipe, Reply, Run, StderrLog, TURN_READS};
use crate::handler::{
    AsyncConnection, AsyncDatagramHandler, AsyncStreamHandler, Datagram, IO_TICK,
};
use crate::sys;

/// `exec` on an async worker's loop (one object for streams, one for
/// datagrams, sharing the options).
pub(super) struct ExecAsync(pub Rc<Exec>);

/// What woke the wait for a program.
enum Woke {
    Exited,
    Stopping,
    Deadline,
}

impl Exec {
    /// [`Exec::wait`](super::threads)'s twin on the loop: waits for the
    /// program without blocking the loop, logging its stderr, killing it at
    /// its timeout or `graceful_timeout` after `stop` completes (the
    /// worker is asked to stop). Collects up to MAX_REPLY bytes of its
    /// stdout into `reply`, if given. Logs a non-zero exit. True if it was
    /// killed.
    async fn wait_async(
        &self,
        run: Run,
        reply: Option<&mut Vec<u8>>,
        stop: impl Future<Output = ()>,
    ) -> io::Result<bool> {
        let pid = run.pid;
        let mut watched = match Watched::new(run) {
            Ok(w) => w,
            Err(e) => {
                // Cannot watch it: do not leave it behind.
                sys::kill_group(pid, Signal::SIGKILL);
                let _ = reap(pid).await;
                return Err(e);
            }
        };
        let mut log = StderrLog::new(&self.service, pid);
        let mut deadlines = Deadlines::new(self, pid);
        let mut reply = reply.map(|buf| Reply { buf, dropped: 0 });
        let mut stop = pin!(stop);
        let mut stopping = false;
        let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
        let mut err_open = true;
        let mut out_open = watched.stdout.is_some() && reply.is_some();
        loop {
            let next = deadlines.step(Instant::now());
            if let Some(at) = next {
                timer.as_mut().reset(tokio::time::Instant::from_std(at));
            }
            let woke = poll_fn(|cx| {
                // The pipes are read whenever they are readable, without
                // ending the wait; a pipe with more than a turn's reads
                // asks for another turn, so that the loop serves the others
                // meanwhile.
                let mut again = false;
                if err_open {
                    match poll_pipe(&watched.stderr, cx, |fd| log.drain(fd, TURN_READS)) {
                        Pipe::Closed => err_open = false,
                        Pipe::More => again = true,
                        Pipe::Empty => {}
                    }
                }
                if out_open && let (Some(out), Some(r)) = (&watched.stdout, &mut reply) {
                    match poll_pipe(out, cx, |fd| r.collect(fd, TURN_READS)) {
                        Pipe::Closed => out_open = false,
                        Pipe::More => again = true,
                        Pipe::Empty => {}
                    }
                }
                if again {
                    cx.waker().wake_by_ref();
                }
                if let Poll::Ready(r) = watched.pidfd.poll_read_ready(cx) {
                    return Poll::Ready(r.map(|_| Woke::Exited));
                }
                if !stopping && stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Woke::Stopping));
                }
                if next.is_some() && timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Woke::Deadline));
                }
                Poll::Pending
            })
            .await;
            match woke {
                Ok(Woke::Exited) => break,
                Ok(Woke::Stopping) => {
                    stopping = true;
                    deadlines.stopping(Instant::now());
                }
                Ok(Woke::Deadline) => {}
                Err(e) => {
                    sys::kill_group(pid, Signal::SIGKILL);
                    let _ = reap(pid).await;
                    watched.gone = true;
                    return Err(e);
                }
            }
        }
        // Whatever it wrote before exiting is in the pipes now.
        if err_open {
            log.drain(watched.stderr.get_ref(), DRAIN_READS);
        }
        if out_open && let (Some(out), Some(r)) = (&watched.stdout, &mut reply) {
            r.collect(out.get_ref(), DRAIN_READS);
        }
        log.finish();
        let status = reap(pid).await;
        watched.gone = true;
        let status = status?;
        let dropped = reply.map_or(0, |r| r.dropped);
        self.report(pid, status, deadlines.killed(), dropped);
        Ok(deadlines.killed().is_some())
    }
}

/// A run's descriptors, registered with the loop, and its program until
/// reaped: a run dropped before (the handler's future dropped, a panic
/// caught by the loop) kills the program's process group, so that nothing
/// of it runs on unwatched.
struct Watched {
    pid: u32,
    /// Readable once the program has exited.
    pidfd: AsyncFd<OwnedFd>,
    stderr: AsyncFd<OwnedFd>,
    stdout: Option<AsyncFd<OwnedFd>>,
    /// Reaped, or no longer ours to signal (waitpid failed): either way
    /// its pid may be another's now.
    gone: bool,
}

impl Watched {
    fn new(run: Run) -> io::Result<Watched> {
        Ok(Watched {
            pid: run.pid,
            pidfd: watch(sys::pidfd_open(run.pid)?)?,
            stderr: watch(run.stderr)?,
            stdout: run.stdout.map(watch).transpose()?,
            gone: false,
        })
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if !self.gone {
            // Not reaped: its pid (the group's id) cannot have been reused.
            sys::kill_group(self.pid, Signal::SIGKILL);
        }
    }
}

/// Registers `fd` with the loop, for readability.
fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, which keeps the descriptor open
    // and refers to the same open file until the AsyncFd drops it (nothing
    // here calls get_mut or into_inner), and an OwnedFd's as_raw_fd always
    // returns that one descriptor: what register_with_interest requires.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// Reads `pipe` with `read` while the loop says it is readable; Empty once
/// the read came to EAGAIN (the readiness cleared: the loop wakes this task
/// when more comes).
fn poll_pipe(
    pipe: &AsyncFd<OwnedFd>,
    cx: &mut std::task::Context<'_>,
    mut read: impl FnMut(&OwnedFd) -> Pipe,
) -> Pipe {
    loop {
        let mut guard = match pipe.poll_read_ready(cx) {
            Poll::Pending => return Pipe::Empty,
            Poll::Ready(Ok(g)) => g,
            Poll::Ready(Err(_)) => return Pipe::Closed,
        };
        match read(guard.get_inner()) {
            Pipe::Empty => guard.clear_ready(),
            other => return other,
        }
    }
}

/// Reaps an exited program (its pidfd readable, or just sent SIGKILL)
/// without blocking the loop: waitpid(WNOHANG), and while it is not yet
/// gone a short sleep on the loop between tries.
async fn reap(pid: u32) -> io::Result<WaitStatus> {
    loop {
        match nix::sys::wait::waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(nix::errno::Errno::EINTR) => {}
            other => return Ok(other?),
        }
    }
}

/// Completes once the worker is asked to stop (for a datagram's run, which
/// has no connection to say so): the worker's flag, looked at every
/// [`IO_TICK`].
async fn worker_stop() {
    while !sys::shutdown_requested() {
        tokio::time::sleep(IO_TICK).await;
    }
}

impl AsyncStreamHandler for ExecAsync {
    async fn handle(&self, conn: &mut AsyncConnection) -> io::Result<()> {
        let exec = &*self.0;
        let env = exec.stream_env(conn.local_addr(), conn.peer_addr(), conn.stream.as_fd());
        let result = {
            let socket = ForProgram::new(&conn.stream)?;
            let result = match exec.start_stream(env, conn.stream.as_fd().as_raw_fd()) {
                Ok(run) => exec.wait_async(run, None, conn.stopped()).await,
                Err(e) => Err(e),
            };
            if let Err(e) = socket.back_to_the_loop() {
                // Still blocking: a read of the loop's would hold the loop,
                // so the connection is closed without one.
                conn.eof = true;
                return Err(e);
            }
            result
        };
        let killed = result.as_ref().is_ok_and(|k| *k);
        if killed || conn.shutting_down() {
            // Killed, or the worker is stopping: no lingering for the
            // client (the master's deadline is near). FIN now, drop what
            // has arrived so that the close is no reset, and close.
            let _ = conn.shutdown_write();
            let _ = conn.discard_input();
            conn.eof = true;
        }
        // The program read and wrote the socket itself: TCP's own totals
        // count it all (a Unix socket keeps none: its bytes stay uncounted).
        if let Some((bytes_in, bytes_out)) = sys::tcp_bytes(conn.stream.as_fd()) {
            conn.set_bytes(bytes_in, bytes_out);
        }
        result.map(drop)
    }
}

/// A connection's socket made the program's: blocking, as a program
/// expects plain reads and writes, and without the IO_TICK timeouts a TCP
/// connection inherits from its listener (for the threads mode's blocking
/// reads; the loop's nonblocking I/O has no use for them). O_NONBLOCK
/// belongs to the open file, which the program shares, so the loop does no
/// I/O on the socket until it is nonblocking again: at
/// [`ForProgram::back_to_the_loop`], or when this is dropped (the handler's
/// future dropped, or a panic caught by the loop), so that the loop never
/// reads a blocking socket.
struct ForProgram<'a> {
    socket: socket2::SockRef<'a>,
    blocking: bool,
}

impl<'a> ForProgram<'a> {
    fn new(stream: &'a impl AsFd) -> io::Result<ForProgram<'a>> {
        let socket = socket2::SockRef::from(stream);
        socket.set_read_timeout(None)?;
        socket.set_write_timeout(None)?;
        // Last: an error before it leaves the socket nonblocking.
        socket.set_nonblocking(false)?;
        Ok(ForProgram {
            socket,
            blocking: true,
        })
    }

    fn back_to_the_loop(mut self) -> io::Result<()> {
        self.socket.set_nonblocking(true)?;
        self.blocking = false;
        Ok(())
    }
}

impl Drop for ForProgram<'_> {
    fn drop(&mut self) {
        if self.blocking {
            let _ = self.socket.set_nonblocking(true);
        }
    }
}

impl AsyncDatagramHandler for ExecAsync {
    async fn handle(&self, datagram: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool> {
        let run = self.0.start_datagram(datagram)?;
        self.0.wait_async(run, Some(reply), worker_stop()).await?;
        Ok(true)
    }
}
