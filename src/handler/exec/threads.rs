//! `exec` in a `mode = "threads"` worker: the thread that serves the
//! connection (or the datagram) waits for its program in poll(2), on the
//! program's pidfd and pipes, waking every [`IO_TICK`] to look at the
//! worker's stop.
//!
//! Owns: nothing beyond the call: the run it started, reaped before it
//! returns.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use super::{DRAIN_READS, Deadlines, Exec, Pipe, Reply, Run, StderrLog, TURN_READS};
use crate::handler::{Connection, Datagram, DatagramHandler, IO_TICK, StreamHandler};
use crate::sys;

impl Exec {
    /// Waits for the program, logging its stderr, killing it at its timeout
    /// or `graceful_timeout` after the worker is asked to stop. Collects up to
    /// MAX_REPLY bytes of its stdout into `reply`, if given. Logs a non-zero
    /// exit. True if it was killed.
    fn wait(&self, run: Run, reply: Option<&mut Vec<u8>>) -> io::Result<bool> {
        let Run {
            pid,
            stderr,
            stdout,
        } = run;
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // Cannot watch it: do not leave it behind.
                sys::kill_group(pid, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
                return Err(e);
            }
        };
        let mut log = StderrLog::new(&self.service, pid);
        let mut deadlines = Deadlines::new(self, pid);
        let mut reply = reply.map(|buf| Reply { buf, dropped: 0 });
        let mut err_open = true;
        let mut out_open = stdout.is_some() && reply.is_some();
        loop {
            let now = std::time::Instant::now();
            if sys::shutdown_requested() {
                deadlines.stopping(now);
            }
            deadlines.step(now);
            let mut fds = vec![PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
            let ei = err_open.then(|| {
                fds.push(PollFd::new(stderr.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let oi = match (&stdout, out_open) {
                (Some(o), true) => {
                    fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
                    Some(fds.len() - 1)
                }
                _ => None,
            };
            match nix::poll::poll(&mut fds, PollTimeout::from(IO_TICK.as_millis() as u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready = |i: Option<usize>| {
                i.is_some_and(|i| fds[i].revents().is_some_and(|r| !r.is_empty()))
            };
            let exited = fds[0].revents().is_some_and(|r| !r.is_empty());
            let (err_ready, out_ready) = (ready(ei), ready(oi));
            drop(fds);
            if err_ready {
                err_open = log.drain(&stderr, TURN_READS) != Pipe::Closed;
            }
            if out_ready && let (Some(fd), Some(r)) = (&stdout, &mut reply) {
                out_open = r.collect(fd, TURN_READS) != Pipe::Closed;
            }
            if exited {
                break;
            }
        }
        // Whatever it wrote before exiting is in the pipes now.
        if err_open {
            log.drain(&stderr, DRAIN_READS);
        }
        if out_open && let (Some(fd), Some(r)) = (&stdout, &mut reply) {
            r.collect(fd, DRAIN_READS);
        }
        log.finish();
        let status = loop {
            match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None) {
                Err(nix::errno::Errno::EINTR) => {}
                other => break other?,
            }
        };
        let dropped = reply.map_or(0, |r| r.dropped);
        self.report(pid, status, deadlines.killed(), dropped);
        Ok(deadlines.killed().is_some())
    }
}

impl StreamHandler for Exec {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let stream = &conn.stream;
        // The program shares the socket's options: it expects plain blocking
        // reads and writes, not the worker's IO_TICK timeouts.
        let sock = socket2::SockRef::from(stream);
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(None)?;
        sock.set_write_timeout(None)?;
        let env = self.stream_env(conn.local_addr(), conn.peer_addr(), stream.as_fd());
        let result = self
            .start_stream(env, stream.as_fd().as_raw_fd())
            .and_then(|run| self.wait(run, None));
        // Back to the worker's ticks, so that the close that follows is
        // bounded by its linger.
        sock.set_read_timeout(Some(IO_TICK))?;
        sock.set_write_timeout(Some(IO_TICK))?;
        let killed = result.as_ref().is_ok_and(|k| *k);
        if killed || sys::shutdown_requested() {
            // Killed, or the worker is stopping: no lingering for the
            // client (the master's deadline is near). FIN now, drop what
            // has arrived so that the close is no reset, and close.
            let _ = conn.stream.shutdown_write();
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

impl DatagramHandler for Exec {
    fn handle(&self, datagram: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool> {
        let run = self.start_datagram(datagram)?;
        self.wait(run, Some(reply))?;
        Ok(true)
    }
}
