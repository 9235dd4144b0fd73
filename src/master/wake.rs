//! The master's one wait: a poll(2) on the signal self-pipe, the workers'
//! ready pipes, the upgrade's pipes, the control socket and the listeners
//! of ondemand pools, with a timeout set by the earliest timer. Rule 1:
//! the master blocks nowhere else.
//!
//! Owns: nothing; [`Woke`] says what the wait found.

use std::os::fd::AsFd;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd::Pid;

use super::{Master, MasterError, sys_err};

/// What woke the master.
#[derive(Default)]
pub(super) struct Woke {
    /// Workers whose ready pipe is readable.
    pub(super) ready: Vec<Pid>,
    /// The next master's pipe is readable.
    pub(super) upgrade: bool,
    /// The previous master's lifeline reached EOF (it never writes).
    pub(super) predecessor_gone: bool,
    /// Ondemand pools (indexes) with a connection waiting.
    pub(super) listeners: Vec<usize>,
}

impl Master {
    /// Sleeps in poll(2) until a signal, a ready message, control socket
    /// traffic, the next master's message or the next timer.
    pub(super) fn wait(&mut self) -> Result<Woke, MasterError> {
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
    /// upgrade's deadline, an idle control client, the watchdog, the pool
    /// policy's and the stuck-worker check's.
    fn next_deadline(&self) -> Option<Instant> {
        let respawns = self
            .live_pools()
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
            .chain(self.leaving_deadlines())
            .min()
    }
}
