//! The epoll engine: `--loops` client threads, each an event loop (mio's
//! registration over edge-triggered epoll, no runtime) multiplexing its
//! share of the connections over nonblocking sockets. The closed loop is
//! the threads engine's (a connection's next request waits for the echo of
//! its last), and so are the counts and the report; what differs is the
//! client's own cost: one `epoll_wait` returns every connection that is
//! ready, so a request costs a send and a recv instead of two thread
//! wake-ups, and ten thousand connections cost ten thousand sockets
//! instead of ten thousand threads. That matters against event-driven
//! servers, whose batching a thread per connection would break up (see
//! docs/BENCHMARKS.md, issue 12).
//!
//! Connection `k` runs on loop `k % loops`. A loop keeps at most
//! `CONNECT_WINDOW` connects in progress (a burst of thousands of SYNs
//! overflows the server's accept queue and costs one-second retransmits);
//! in hold mode a connection holds its place until its first echo, so the
//! ramp goes at the pace the server accepts and serves, and never fills an
//! accept queue of 1024 (tokio-echo's ramp to 10,000 took 2.2 to 4.5 s
//! with 400 to 1,200 listen overflows otherwise).
//! Timeouts are checked by a tick every `TICK` (a timeout fires at most
//! that late). No loop waits past the end of its run, so main always gets
//! its counts back.
//!
//! hold mode runs in phases on every loop: setup (connect each connection
//! and echo once on it), a barrier across loops, the idle time (the
//! connections silent, any close by the server an error), then one more
//! echo on each and close. The leader prints one line on stderr when the
//! idle time starts, for scripts that measure the server meanwhile.
//!
//! Owns: each loop's connections (socket, buffers, state) and counts,
//! handed to main when the loop returns.

use crate::cli::{Config, Mode, Target};
use crate::load::{self, Counts, GRACE, Kind, RETRY_PAUSE, Window};
use crate::payload::Payload;
use crate::report;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, SockAddr, Socket, Type};
use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// How often a loop checks deadlines and paused connections.
const TICK: Duration = Duration::from_millis(10);
/// Connects in progress at once on one loop (hold: connects and first
/// echoes).
const CONNECT_WINDOW: usize = 256;
/// hold mode: the longest the setup (every connect and first echo) may
/// take; connections not answered by then count as timeouts.
pub const SETUP_LIMIT: Duration = Duration::from_secs(60);
/// Events taken per `epoll_wait`.
const EVENTS: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// No socket; in the queue for a place in the connect window.
    Queued,
    /// No socket; after a failure, queued again at this time.
    Paused(Instant),
    Connecting,
    Sending,
    /// The request is sent; waiting for all of its echo.
    Receiving,
    /// hold mode: answered once, silent until the idle time ends.
    Idle,
    /// Nothing more to do in this run.
    Finished,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// rr, connect: requests, counted inside the measured window.
    Run,
    /// After the window: requests in flight finish, uncounted; none start.
    Drain,
    /// hold: connect every connection and echo once on each.
    Setup,
    /// hold: the idle time.
    Hold,
    /// hold: one more echo on each, then close.
    Final,
}

/// How a request ended (as the threads engine's).
enum Outcome {
    Done,
    /// The server closed a connection that had answered before, at a
    /// request boundary: reconnect and go on (rr), not an error.
    Idle {
        before_send: bool,
    },
    Failed(Kind),
}

/// What `drive` does next with a connection.
enum Step {
    /// Wait for its next event.
    Wait,
    /// Try the socket again now.
    Again,
    End(Outcome),
}

struct Conn {
    id: u64,
    sock: Option<Socket>,
    state: State,
    payload: Payload,
    /// The echo so far (as long as the request: nothing past it is read).
    back: Vec<u8>,
    sent: usize,
    got: usize,
    /// Start of the request in flight (connect mode: before the connect).
    started: Instant,
    /// When the connect or request in flight times out.
    deadline: Instant,
    /// This connection has answered before: a close before any byte of an
    /// answer is an idle close.
    reused: bool,
    /// Requests answered in the measured window.
    answered: u64,
    /// Connects made (for --src-ips).
    attempts: u64,
    /// Unix sockets: since when every try found the listener's backlog full.
    backlog_full_since: Option<Instant>,
    /// Holds a place in the connect window.
    in_window: bool,
    /// An event said the server has closed its side (EPOLLRDHUP). With
    /// edge-triggered epoll the FIN may have come in the same edge as the
    /// last answer, which was read to its end and no further: the next
    /// request then looks for it at once instead of waiting for an edge
    /// that will not come.
    read_closed: bool,
}

impl Conn {
    fn new(cfg: &Config, id: u64, now: Instant) -> Conn {
        Conn {
            id,
            sock: None,
            state: State::Queued,
            payload: Payload::new(cfg.size, id),
            back: vec![0; cfg.size],
            sent: 0,
            got: 0,
            started: now,
            deadline: now,
            reused: false,
            answered: 0,
            attempts: 0,
            backlog_full_since: None,
            in_window: false,
            read_closed: false,
        }
    }

    /// The next request: a new stamp, nothing sent or received yet.
    fn start_request(&mut self, now: Instant) {
        self.payload.advance();
        self.sent = 0;
        self.got = 0;
        self.started = now;
    }
}

/// Start connecting without blocking. Ok(true): connected already (Unix
/// sockets connect at once or not at all); Ok(false): in progress.
fn start_connect(target: &Target, src: Option<std::net::Ipv4Addr>) -> io::Result<(Socket, bool)> {
    match target {
        Target::Tcp(a) => {
            let s = load::tcp_socket(*a, src, Type::STREAM.nonblocking())?;
            s.set_tcp_nodelay(true)?;
            match s.connect(&(*a).into()) {
                Ok(()) => Ok((s, true)),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok((s, false)),
                Err(e) => Err(e),
            }
        }
        Target::Unix(p) => {
            let s = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
            // EAGAIN (WouldBlock) here: the listener's backlog is full.
            s.connect(&SockAddr::unix(p)?)?;
            Ok((s, true))
        }
        Target::Udp(_) => Err(io::Error::new(
            ErrorKind::InvalidInput,
            "not a stream target",
        )),
    }
}

/// What the loops of a hold run share.
struct HoldSync {
    /// Every loop has finished its setup.
    setup_done: Barrier,
    /// Connections answered in setup, over all loops.
    held: AtomicUsize,
}

/// What a loop hands back to main.
struct LoopResult {
    counts: Counts,
    starved: usize,
    in_flight: usize,
    oldest: Duration,
    held: usize,
    served: usize,
    setup: Duration,
}

/// One client thread's event loop.
struct Loop {
    cfg: Arc<Config>,
    win: Arc<Window>,
    poll: Poll,
    conns: Vec<Conn>,
    /// Connections waiting for a place in the connect window.
    queue: VecDeque<usize>,
    /// Connections holding a place in the connect window.
    in_window: usize,
    /// Connections to drive now, without an event (a connect that
    /// completed at once, hold's last echo).
    ready: Vec<usize>,
    /// Connections not `Finished`.
    live: usize,
    phase: Phase,
    counts: Counts,
    in_flight: usize,
    oldest: Duration,
    /// hold: connections that answered in setup, and after the idle time.
    held: usize,
    served: usize,
}

impl Loop {
    /// Loop `index` of `cfg.loops`: connections index, index + loops, ...
    fn new(cfg: Arc<Config>, win: Arc<Window>, index: usize) -> io::Result<Loop> {
        let poll = Poll::new()?;
        let conns: Vec<Conn> = (index..cfg.connections)
            .step_by(cfg.loops)
            .map(|id| Conn::new(&cfg, id as u64, win.start))
            .collect();
        let live = conns.len();
        Ok(Loop {
            cfg,
            win,
            poll,
            conns,
            queue: VecDeque::new(),
            in_window: 0,
            ready: Vec::new(),
            live,
            phase: Phase::Run,
            counts: Counts::default(),
            in_flight: 0,
            oldest: Duration::ZERO,
            held: 0,
            served: 0,
        })
    }

    fn measured(&self, t: Instant) -> bool {
        self.win.measured(t)
    }

    /// `t`, or the end of the grace period if that comes first.
    fn cut(&self, t: Instant) -> Instant {
        t.min(self.win.grace_end)
    }

    /// Close connection `i`'s socket (closing it also removes it from the
    /// epoll set: nothing else holds the descriptor).
    fn close(&mut self, i: usize) {
        self.leave_window(i);
        self.conns[i].sock = None;
        self.conns[i].state = State::Queued;
    }

    /// Give connection `i`'s place in the connect window to the next in
    /// the queue (opened by the next `fill`).
    fn leave_window(&mut self, i: usize) {
        if self.conns[i].in_window {
            self.conns[i].in_window = false;
            self.in_window -= 1;
        }
    }

    fn finish(&mut self, i: usize) {
        if self.conns[i].state != State::Finished {
            self.close(i);
            self.conns[i].state = State::Finished;
            self.live -= 1;
        }
    }

    /// Queue connection `i` for a connect and open what the window allows.
    fn requeue(&mut self, i: usize, now: Instant) {
        self.conns[i].state = State::Queued;
        self.queue.push_back(i);
        self.fill(now);
    }

    fn fill(&mut self, now: Instant) {
        while self.in_window < CONNECT_WINDOW {
            match self.queue.pop_front() {
                Some(i) => self.open(i, now),
                None => break,
            }
        }
    }

    fn open(&mut self, i: usize, now: Instant) {
        let (mode, timeout) = (self.cfg.mode, self.cfg.timeout);
        let c = &mut self.conns[i];
        let src = self.cfg.source(c.id + c.attempts);
        c.attempts += 1;
        match start_connect(&self.cfg.target, src) {
            Ok((sock, at_once)) => {
                let fd = sock.as_raw_fd();
                if let Err(e) = self.poll.registry().register(
                    &mut SourceFd(&fd),
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    eprintln!("loadgen: cannot add a socket to epoll: {e}");
                    return self.end(i, now, Outcome::Failed(Kind::Other));
                }
                let c = &mut self.conns[i];
                c.sock = Some(sock);
                c.state = State::Connecting;
                c.backlog_full_since = None;
                c.in_window = true;
                if mode == Mode::Connect {
                    c.start_request(now);
                }
                let deadline = now + timeout;
                self.conns[i].deadline = self.cut(deadline);
                self.in_window += 1;
                if at_once {
                    self.ready.push(i);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // A blocking connect would wait for room in the backlog,
                // for up to the timeout: try again shortly until then.
                let since = *c.backlog_full_since.get_or_insert(now);
                if now.duration_since(since) >= timeout {
                    c.backlog_full_since = None;
                    self.end(i, now, Outcome::Failed(Kind::ConnectOther));
                } else {
                    c.state = State::Paused(now + RETRY_PAUSE);
                }
            }
            Err(e) => self.end(i, now, Outcome::Failed(load::connect_kind(&e))),
        }
    }

    /// Connection `i`'s connect has completed (or failed: `check` asks
    /// SO_ERROR, for events that report an error or a hang-up).
    fn connected(&mut self, i: usize, check: bool) {
        let now = Instant::now();
        if check {
            let err = match self.conns[i].sock.as_ref().map(|s| s.take_error()) {
                Some(Ok(None)) => None,
                Some(Ok(Some(e))) | Some(Err(e)) => Some(load::connect_kind(&e)),
                None => Some(Kind::Other),
            };
            if let Some(kind) = err {
                return self.end(i, now, Outcome::Failed(kind));
            }
        }
        if self.phase != Phase::Setup {
            self.leave_window(i);
        }
        if self.measured(now) {
            self.counts.connects += 1;
        }
        let mode = self.cfg.mode;
        let timeout = self.cfg.timeout;
        let c = &mut self.conns[i];
        c.state = State::Sending;
        c.reused = false;
        c.read_closed = false;
        if mode != Mode::Connect {
            c.start_request(now);
            self.conns[i].deadline = self.cut(now + timeout);
        }
        self.fill(now);
    }

    fn on_event(&mut self, i: usize, ev: &mio::event::Event) {
        match self.conns.get(i).map(|c| c.state) {
            Some(State::Connecting) => {
                if ev.is_error() || ev.is_write_closed() || ev.is_read_closed() {
                    self.connected(i, true);
                } else if ev.is_writable() {
                    self.connected(i, false);
                } else {
                    return;
                }
            }
            Some(_) => {
                if ev.is_read_closed() {
                    self.conns[i].read_closed = true;
                }
            }
            None => return,
        }
        self.drive(i);
    }

    /// Move connection `i` on as far as its socket allows.
    fn drive(&mut self, i: usize) {
        loop {
            let step = match self.conns[i].state {
                State::Sending => self.send(i),
                State::Receiving => self.recv(i),
                State::Idle => self.idle_event(i),
                _ => return,
            };
            match step {
                Step::Wait => return,
                Step::Again => {}
                Step::End(o) => self.end(i, Instant::now(), o),
            }
        }
    }

    fn send(&mut self, i: usize) -> Step {
        let c = &mut self.conns[i];
        let Some(sock) = c.sock.as_ref() else {
            return Step::End(Outcome::Failed(Kind::Other));
        };
        match sock.send(&c.payload.buf[c.sent..]) {
            Ok(0) => Step::End(Outcome::Failed(Kind::Other)),
            Ok(n) => {
                c.sent += n;
                if c.sent < c.payload.buf.len() {
                    return Step::Again;
                }
                // The echo's arrival is a new edge: no read until then
                // (one system call fewer per request), unless the server
                // has closed already (its FIN's edge has passed).
                c.state = State::Receiving;
                if c.read_closed {
                    Step::Again
                } else {
                    Step::Wait
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Step::Wait,
            Err(e) if e.kind() == ErrorKind::Interrupted => Step::Again,
            Err(e) if load::is_reset(&e) && c.reused && c.sent == 0 => {
                Step::End(Outcome::Idle { before_send: true })
            }
            Err(e) if load::is_reset(&e) => Step::End(Outcome::Failed(Kind::Reset)),
            Err(_) => Step::End(Outcome::Failed(Kind::Other)),
        }
    }

    fn recv(&mut self, i: usize) -> Step {
        let c = &mut self.conns[i];
        let Some(mut sock) = c.sock.as_ref() else {
            return Step::End(Outcome::Failed(Kind::Other));
        };
        let want = c.payload.buf.len();
        match sock.read(&mut c.back[c.got..want]) {
            Ok(0) if c.got == 0 && c.reused => Step::End(Outcome::Idle { before_send: false }),
            Ok(0) => Step::End(Outcome::Failed(Kind::EofEarly)),
            Ok(n) => {
                c.got += n;
                if c.got < want {
                    Step::Again
                } else if c.back == c.payload.buf {
                    Step::End(Outcome::Done)
                } else {
                    Step::End(Outcome::Failed(Kind::Mismatch))
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Step::Wait,
            Err(e) if e.kind() == ErrorKind::Interrupted => Step::Again,
            Err(e) if load::is_reset(&e) && c.got == 0 && c.reused => {
                Step::End(Outcome::Idle { before_send: false })
            }
            Err(e) if load::is_reset(&e) => Step::End(Outcome::Failed(Kind::Reset)),
            Err(_) => Step::End(Outcome::Failed(Kind::Other)),
        }
    }

    /// hold: an event on a connection that should be silent. A close or
    /// an unasked byte fails it; anything else (a writable edge) is not
    /// news.
    fn idle_event(&mut self, i: usize) -> Step {
        let c = &mut self.conns[i];
        let Some(mut sock) = c.sock.as_ref() else {
            return Step::End(Outcome::Failed(Kind::Other));
        };
        let mut byte = [0u8; 1];
        match sock.read(&mut byte) {
            Ok(0) => Step::End(Outcome::Failed(Kind::EofEarly)),
            Ok(_) => Step::End(Outcome::Failed(Kind::Mismatch)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Step::Wait,
            Err(e) if e.kind() == ErrorKind::Interrupted => Step::Again,
            Err(e) if load::is_reset(&e) => Step::End(Outcome::Failed(Kind::Reset)),
            Err(_) => Step::End(Outcome::Failed(Kind::Other)),
        }
    }

    /// Count how connection `i`'s request ended, and start what follows.
    fn end(&mut self, i: usize, now: Instant, outcome: Outcome) {
        let measured = self.measured(now);
        let before_end = now < self.win.end;
        match outcome {
            Outcome::Done => {
                let c = &mut self.conns[i];
                if measured {
                    let ns = now.duration_since(c.started).as_nanos() as u64;
                    self.counts.hist.record(ns);
                    c.answered += 1;
                }
                c.reused = true;
                match (self.phase, self.cfg.mode) {
                    (Phase::Run, Mode::Rr) if before_end => {
                        c.start_request(now);
                        c.state = State::Sending;
                        let deadline = now + self.cfg.timeout;
                        self.conns[i].deadline = self.cut(deadline);
                    }
                    (Phase::Run, Mode::Connect) if before_end => {
                        self.close(i);
                        self.requeue(i, now);
                    }
                    (Phase::Setup, _) => {
                        c.state = State::Idle;
                        self.held += 1;
                        self.leave_window(i);
                        self.fill(now);
                    }
                    (Phase::Final, _) => {
                        self.served += 1;
                        self.finish(i);
                    }
                    _ => self.finish(i),
                }
            }
            Outcome::Idle { before_send } if self.phase == Phase::Run => {
                if measured {
                    if before_send {
                        self.counts.idle_before_send += 1;
                    } else {
                        self.counts.idle_after_send += 1;
                    }
                }
                self.close(i);
                if before_end {
                    self.requeue(i, now);
                } else {
                    self.finish(i);
                }
            }
            Outcome::Idle { before_send } => {
                // hold: the server closed a connection it should have kept.
                if self.phase != Phase::Drain && measured {
                    let kind = if before_send {
                        Kind::Reset
                    } else {
                        Kind::EofEarly
                    };
                    self.counts.errors.bump(kind);
                }
                self.finish(i);
            }
            Outcome::Failed(kind) => {
                if measured {
                    self.counts.errors.bump(kind);
                }
                self.close(i);
                if self.phase == Phase::Run && before_end {
                    let until = (now + RETRY_PAUSE).min(self.win.end);
                    self.conns[i].state = State::Paused(until);
                } else {
                    self.finish(i);
                }
            }
        }
    }

    /// Time out what is overdue, queue again what has paused long enough.
    fn tick(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            match self.conns[i].state {
                s @ (State::Connecting | State::Sending | State::Receiving)
                    if now >= self.conns[i].deadline =>
                {
                    // A connect that timed out counts as the threads
                    // engine's connect_timeout() does.
                    let kind = if s == State::Connecting {
                        Kind::ConnectOther
                    } else {
                        Kind::Timeout
                    };
                    self.end(i, now, Outcome::Failed(kind));
                }
                State::Paused(t) if t <= now => {
                    self.conns[i].state = State::Queued;
                    self.queue.push_back(i);
                }
                _ => {}
            }
        }
        self.fill(now);
    }

    fn drain_ready(&mut self) {
        while let Some(i) = self.ready.pop() {
            if self.conns[i].state == State::Connecting {
                self.connected(i, false);
            }
            self.drive(i);
        }
    }

    /// Serve events until `until`, or until `done` holds (checked each
    /// tick).
    fn turn_until(&mut self, events: &mut Events, until: Instant, done: impl Fn(&Loop) -> bool) {
        let mut next_tick = Instant::now() + TICK;
        loop {
            self.drain_ready();
            let now = Instant::now();
            if now >= until {
                return;
            }
            let wait = until.min(next_tick).saturating_duration_since(now);
            if let Err(e) = self.poll.poll(events, Some(wait))
                && e.kind() != ErrorKind::Interrupted
            {
                eprintln!("loadgen: epoll_wait failed: {e}; ending this loop's run");
                return;
            }
            for ev in events.iter() {
                self.on_event(ev.token().0, ev);
            }
            let now = Instant::now();
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
                if done(self) {
                    return;
                }
            }
        }
    }

    /// The window has closed: note what is in flight, close what is not.
    fn begin_drain(&mut self) {
        self.phase = Phase::Drain;
        self.queue.clear();
        let connect_mode = self.cfg.mode == Mode::Connect;
        for i in 0..self.conns.len() {
            match self.conns[i].state {
                State::Sending | State::Receiving => {}
                // A connect-mode request starts with its connect.
                State::Connecting if connect_mode => {}
                State::Finished => continue,
                _ => {
                    self.finish(i);
                    continue;
                }
            }
            self.in_flight += 1;
            let age = self
                .win
                .end
                .saturating_duration_since(self.conns[i].started);
            self.oldest = self.oldest.max(age);
        }
    }

    /// Fail every connection still short of `want` (hold: past a phase's
    /// limit) as a timeout.
    fn expire(&mut self, keep: State) {
        let now = Instant::now();
        for i in 0..self.conns.len() {
            let s = self.conns[i].state;
            if s != keep && s != State::Finished {
                self.end(i, now, Outcome::Failed(Kind::Timeout));
                self.finish(i);
            }
        }
    }

    fn run(mut self, sync: &HoldSync) -> LoopResult {
        let mut events = Events::with_capacity(EVENTS);
        let start = Instant::now();
        self.queue.extend(0..self.conns.len());
        let mut setup = Duration::ZERO;
        if self.cfg.mode == Mode::Hold {
            self.phase = Phase::Setup;
            self.fill(start);
            let settled = |l: &Loop| {
                l.conns
                    .iter()
                    .all(|c| matches!(c.state, State::Idle | State::Finished))
            };
            self.turn_until(&mut events, start + SETUP_LIMIT, settled);
            self.expire(State::Idle);
            setup = start.elapsed();

            sync.held.fetch_add(self.held, Ordering::SeqCst);
            if sync.setup_done.wait().is_leader() {
                eprintln!(
                    "loadgen hold: {} of {} connections open and answered; idle for {:.1} s",
                    sync.held.load(Ordering::SeqCst),
                    self.cfg.connections,
                    self.cfg.duration.as_secs_f64()
                );
            }
            self.phase = Phase::Hold;
            let hold_end = Instant::now() + self.cfg.duration;
            self.turn_until(&mut events, hold_end, |_| false);

            self.phase = Phase::Final;
            let now = Instant::now();
            for i in 0..self.conns.len() {
                if self.conns[i].state == State::Idle {
                    let c = &mut self.conns[i];
                    c.start_request(now);
                    c.state = State::Sending;
                    c.deadline = now + self.cfg.timeout;
                    self.ready.push(i);
                }
            }
            let last = now + self.cfg.timeout + 2 * TICK;
            self.turn_until(&mut events, last, |l| l.live == 0);
            self.expire(State::Finished);
        } else {
            self.fill(start);
            self.turn_until(&mut events, self.win.end, |_| false);
            self.begin_drain();
            let grace_end = self.win.grace_end;
            self.turn_until(&mut events, grace_end, |l| l.live == 0);
        }
        for i in 0..self.conns.len() {
            self.finish(i);
        }
        LoopResult {
            starved: self.conns.iter().filter(|c| c.answered == 0).count(),
            counts: self.counts,
            in_flight: self.in_flight,
            oldest: self.oldest,
            held: self.held,
            served: self.served,
            setup,
        }
    }
}

/// Run the load on `cfg.loops` event loops and collect what they counted.
/// Err: a loop could not be set up.
pub fn run(cfg: Config) -> Result<report::Run, String> {
    let cfg = Arc::new(cfg);
    let win = Arc::new(if cfg.mode == Mode::Hold {
        Window::whole(&cfg, SETUP_LIMIT)
    } else {
        Window::new(&cfg)
    });
    let sync = Arc::new(HoldSync {
        setup_done: Barrier::new(cfg.loops),
        held: AtomicUsize::new(0),
    });
    // Every loop is made before any starts, so that none waits at hold's
    // barrier for one that failed.
    let loops = (0..cfg.loops)
        .map(|k| Loop::new(cfg.clone(), win.clone(), k))
        .collect::<io::Result<Vec<Loop>>>()
        .map_err(|e| format!("cannot create an epoll instance: {e}"))?;
    let mut threads = Vec::with_capacity(cfg.loops);
    for (k, l) in loops.into_iter().enumerate() {
        let sync = sync.clone();
        let t = std::thread::Builder::new()
            .name(format!("loop-{k}"))
            .spawn(move || l.run(&sync))
            .map_err(|e| format!("cannot start client loop {k}: {e}; lower --loops"))?;
        threads.push(t);
    }

    // Every loop returns by grace_end; this is for one stuck anyway.
    let hard = win.grace_end + GRACE;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < hard {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut r = report::Run {
        counts: Counts::default(),
        elapsed: cfg.duration.as_secs_f64(),
        starved: 0,
        in_flight_at_end: 0,
        oldest_in_flight_ms: 0.0,
        unfinished: 0,
        hold: (cfg.mode == Mode::Hold).then(report::Hold::default),
    };
    let mut oldest = Duration::ZERO;
    for t in threads {
        if !t.is_finished() {
            r.unfinished += 1;
            continue;
        }
        let Ok(l) = t.join() else {
            r.unfinished += 1;
            continue;
        };
        r.counts.merge(&l.counts);
        r.starved += l.starved;
        r.in_flight_at_end += l.in_flight;
        oldest = oldest.max(l.oldest);
        if let Some(h) = r.hold.as_mut() {
            h.held += l.held;
            h.served += l.served;
            h.setup_ms = h.setup_ms.max(l.setup.as_secs_f64() * 1000.0);
        }
    }
    r.oldest_in_flight_ms = oldest.as_secs_f64() * 1000.0;
    Ok(r)
}
