//! The threads engine: one thread per connection (or UDP socket), blocking
//! sockets with a timeout on every operation, a closed loop (the next
//! request waits for the echo of the last). Each thread publishes what it
//! counted in a record of its own that the main thread reads at the end, so
//! even a thread stuck in the kernel cannot hold the report back.
//!
//! Also what both engines share: the run's window, the kinds of failure
//! and the counts (the epoll engine is `event.rs`).

use crate::cli::{Config, Mode, Target};
use crate::hist::Hist;
use crate::payload::Payload;
use crate::report;
use socket2::{Domain, SockAddr, Socket, Type};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// After the measured window, requests in flight get this long to finish
/// (uncounted), so that servers see clean closes rather than resets.
pub const GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed connection before the next try: a refusing server
/// is not hammered in a tight loop.
pub const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// The phases of a run, fixed at its start.
pub struct Window {
    pub start: Instant,
    pub measure_from: Instant,
    pub end: Instant,
    /// No socket operation outlives this: every timeout is cut to it.
    pub grace_end: Instant,
}

impl Window {
    pub fn new(cfg: &Config) -> Window {
        let start = Instant::now();
        let measure_from = start + cfg.warmup;
        let end = measure_from + cfg.duration;
        Window {
            start,
            measure_from,
            end,
            grace_end: end + GRACE,
        }
    }

    /// hold mode: everything counts, and the run ends when its phases do;
    /// `end` is only the bound that main waits to (the longest setup, the
    /// idle time, the last echo).
    pub fn whole(cfg: &Config, setup_limit: Duration) -> Window {
        let start = Instant::now();
        let end = start + setup_limit + cfg.duration + cfg.timeout;
        Window {
            start,
            measure_from: start,
            end,
            grace_end: end + GRACE,
        }
    }

    pub fn measured(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.end
    }
}

/// Failures, by kind; the JSON keys are these names.
#[derive(Default, Clone, Copy)]
pub struct Errors {
    pub connect_refused: u64,
    pub connect_other: u64,
    pub reset: u64,
    pub eof_early: u64,
    pub timeout: u64,
    pub mismatch: u64,
    pub lost: u64,
    pub other: u64,
}

impl Errors {
    pub fn fields(&self) -> [(&'static str, u64); 8] {
        [
            ("connect_refused", self.connect_refused),
            ("connect_other", self.connect_other),
            ("reset", self.reset),
            ("eof_early", self.eof_early),
            ("timeout", self.timeout),
            ("mismatch", self.mismatch),
            ("lost", self.lost),
            ("other", self.other),
        ]
    }

    pub fn total(&self) -> u64 {
        self.fields().iter().map(|f| f.1).sum()
    }

    /// Count one failure of `kind`.
    pub fn bump(&mut self, kind: Kind) {
        *match kind {
            Kind::ConnectRefused => &mut self.connect_refused,
            Kind::ConnectOther => &mut self.connect_other,
            Kind::Reset => &mut self.reset,
            Kind::EofEarly => &mut self.eof_early,
            Kind::Timeout => &mut self.timeout,
            Kind::Mismatch => &mut self.mismatch,
            Kind::Lost => &mut self.lost,
            Kind::Other => &mut self.other,
        } += 1
    }

    fn add(&mut self, o: &Errors) {
        self.connect_refused += o.connect_refused;
        self.connect_other += o.connect_other;
        self.reset += o.reset;
        self.eof_early += o.eof_early;
        self.timeout += o.timeout;
        self.mismatch += o.mismatch;
        self.lost += o.lost;
        self.other += o.other;
    }
}

/// The ways a request fails (see `Errors`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ConnectRefused,
    ConnectOther,
    Reset,
    EofEarly,
    Timeout,
    Mismatch,
    Lost,
    Other,
}

/// What one connection counted in the measured window.
#[derive(Default, Clone)]
pub struct Counts {
    pub hist: Hist,
    pub errors: Errors,
    /// The server closed a connection that had served requests, at a
    /// request boundary: the send failed ...
    pub idle_before_send: u64,
    /// ... or the request went out and the close came before any byte of
    /// its answer (the keep-alive race). The request is sent again on a new
    /// connection; not an error.
    pub idle_after_send: u64,
    pub connects: u64,
    /// UDP: echoes of earlier requests that came after their timeout.
    pub late_replies: u64,
}

impl Counts {
    pub fn merge(&mut self, o: &Counts) {
        self.hist.merge(&o.hist);
        self.errors.add(&o.errors);
        self.idle_before_send += o.idle_before_send;
        self.idle_after_send += o.idle_after_send;
        self.connects += o.connects;
        self.late_replies += o.late_replies;
    }
}

/// One connection's record, shared with the main thread.
#[derive(Default)]
pub struct Slot {
    pub counts: Mutex<Counts>,
    /// Start of the request in flight, in ns since the run's start plus 1;
    /// 0 when none is.
    pub in_flight: AtomicU64,
}

/// The ways one request can end.
enum Outcome {
    Done,
    /// An idle close (see Counts): reconnect and go on.
    Idle {
        before_send: bool,
    },
    Failed(Kind),
}

pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

pub fn connect_kind(e: &io::Error) -> Kind {
    if e.kind() == ErrorKind::ConnectionRefused {
        Kind::ConnectRefused
    } else {
        Kind::ConnectOther
    }
}

/// A TCP socket for `a`, bound to source address `src` if one is given
/// (the port still the kernel's choice, made at connect).
pub fn tcp_socket(a: SocketAddr, src: Option<Ipv4Addr>, ty: Type) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(a), ty, None)?;
    if let Some(ip) = src {
        // Without this, bind() picks the port before the destination is
        // known and runs out of ports sooner.
        let on: libc::c_int = 1;
        // SAFETY: a valid descriptor and a c_int option of the size given;
        // the result is checked.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        s.bind(&SocketAddr::new(ip.into(), 0).into())?;
    }
    Ok(s)
}

/// A stream socket to the target, with `timeout` on connect, reads and
/// writes.
pub fn connect(target: &Target, src: Option<Ipv4Addr>, timeout: Duration) -> io::Result<Socket> {
    match target {
        Target::Tcp(a) => {
            let s = tcp_socket(*a, src, Type::STREAM)?;
            s.connect_timeout(&(*a).into(), timeout)?;
            s.set_tcp_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            Ok(s)
        }
        Target::Unix(p) => {
            let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            // A Unix connect blocks while the listener's backlog is full,
            // for as long as the send timeout.
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.connect(&SockAddr::unix(p)?)?;
            Ok(s)
        }
        Target::Udp(_) => Err(io::Error::new(
            ErrorKind::InvalidInput,
            "not a stream target",
        )),
    }
}

/// One thread's run.
struct Conn<'a> {
    cfg: &'a Config,
    win: &'a Window,
    slot: &'a Slot,
    id: u64,
    payload: Payload,
    /// The timeout now set on the socket (see `fit_timeout`).
    timeout_set: Duration,
    /// Connects made by this thread (for --src-ips).
    attempts: u64,
}

impl Conn<'_> {
    /// The timeout for an operation starting now: the configured one, cut
    /// to what is left until the grace period ends.
    fn op_timeout(&self) -> Duration {
        let left = self.win.grace_end.saturating_duration_since(Instant::now());
        self.cfg.timeout.min(left).max(Duration::from_millis(1))
    }

    /// Lower the socket's timeouts when the end is nearer than they reach;
    /// halving each time keeps that to a few system calls per connection.
    fn fit_timeout(&mut self, s: &Socket) -> io::Result<()> {
        let want = self.op_timeout();
        if want * 2 <= self.timeout_set {
            s.set_read_timeout(Some(want))?;
            s.set_write_timeout(Some(want))?;
            self.timeout_set = want;
        }
        Ok(())
    }

    fn count(&self, t: Instant, f: impl FnOnce(&mut Counts)) {
        if self.win.measured(t) {
            // A thread that panicked while holding it would have poisoned
            // it; the counts themselves are still whole.
            let mut c = self.slot.counts.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut c);
        }
    }

    fn count_error(&self, kind: Kind) {
        self.count(Instant::now(), |c| c.errors.bump(kind));
    }

    fn pause(&self) {
        let left = self.win.end.saturating_duration_since(Instant::now());
        std::thread::sleep(RETRY_PAUSE.min(left));
    }

    fn begin(&self, t: Instant) {
        let ns = t.duration_since(self.win.start).as_nanos() as u64 + 1;
        self.slot.in_flight.store(ns, Ordering::Relaxed);
    }

    fn finish(&self, started: Instant) {
        self.slot.in_flight.store(0, Ordering::Relaxed);
        let now = Instant::now();
        let ns = now.duration_since(started).as_nanos() as u64;
        self.count(now, |c| c.hist.record(ns));
    }

    fn open(&mut self) -> Result<Socket, Kind> {
        let src = self.cfg.source(self.id + self.attempts);
        self.attempts += 1;
        let timeout = self.op_timeout();
        let s = connect(&self.cfg.target, src, timeout).map_err(|e| connect_kind(&e))?;
        self.timeout_set = timeout;
        self.count(Instant::now(), |c| c.connects += 1);
        Ok(s)
    }

    /// Send the payload on `s` and read its echo. `reused`: the connection
    /// has answered before, so a close before any answer is an idle close.
    fn exchange(&mut self, mut s: &Socket, reused: bool, started: Instant) -> Outcome {
        if let Err(e) = s.write_all(&self.payload.buf) {
            return match e {
                e if reused && is_reset(&e) => Outcome::Idle { before_send: true },
                e if is_reset(&e) => Outcome::Failed(Kind::Reset),
                e if is_timeout(&e) => Outcome::Failed(Kind::Timeout),
                _ => Outcome::Failed(Kind::Other),
            };
        }
        let want = self.payload.buf.len();
        // Reads land in a buffer of the same size: nothing past the echo is
        // read, so a server sending more shows up as a mismatch next time.
        let mut back = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match s.read(&mut back[got..]) {
                Ok(0) if got == 0 && reused => return Outcome::Idle { before_send: false },
                Ok(0) => return Outcome::Failed(Kind::EofEarly),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_reset(&e) && got == 0 && reused => {
                    return Outcome::Idle { before_send: false };
                }
                Err(e) if is_reset(&e) => return Outcome::Failed(Kind::Reset),
                Err(e) if is_timeout(&e) => return Outcome::Failed(Kind::Timeout),
                Err(_) => return Outcome::Failed(Kind::Other),
            }
            // A server trickling bytes does not stretch the limit.
            if got < want && started.elapsed() > self.cfg.timeout {
                return Outcome::Failed(Kind::Timeout);
            }
        }
        if back != self.payload.buf {
            return Outcome::Failed(Kind::Mismatch);
        }
        Outcome::Done
    }

    /// rr: persistent connections, reopened after an error or idle close.
    fn run_rr(&mut self) {
        let mut sock: Option<Socket> = None;
        let mut served = 0u64;
        while Instant::now() < self.win.end {
            let s = match sock.take() {
                Some(s) => s,
                None => match self.open() {
                    Ok(s) => {
                        served = 0;
                        s
                    }
                    Err(k) => {
                        self.count_error(k);
                        self.pause();
                        continue;
                    }
                },
            };
            if self.fit_timeout(&s).is_err() {
                self.count_error(Kind::Other);
                continue;
            }
            self.payload.advance();
            let started = Instant::now();
            self.begin(started);
            match self.exchange(&s, served > 0, started) {
                Outcome::Done => {
                    self.finish(started);
                    served += 1;
                    sock = Some(s);
                }
                Outcome::Idle { before_send } => {
                    self.slot.in_flight.store(0, Ordering::Relaxed);
                    self.count(Instant::now(), |c| {
                        if before_send {
                            c.idle_before_send += 1
                        } else {
                            c.idle_after_send += 1
                        }
                    });
                }
                Outcome::Failed(k) => {
                    self.slot.in_flight.store(0, Ordering::Relaxed);
                    self.count_error(k);
                    self.pause();
                }
            }
        }
    }

    /// connect: a new connection per request; latency from connect() to
    /// the echo's last byte.
    fn run_connect(&mut self) {
        while Instant::now() < self.win.end {
            self.payload.advance();
            let started = Instant::now();
            self.begin(started);
            let outcome = match self.open() {
                Ok(s) => self.exchange(&s, false, started),
                Err(k) => Outcome::Failed(k),
            };
            match outcome {
                Outcome::Done => self.finish(started),
                // exchange() says Idle only for reused connections.
                Outcome::Idle { .. } => unreachable!("idle close on a new connection"),
                Outcome::Failed(k) => {
                    self.slot.in_flight.store(0, Ordering::Relaxed);
                    self.count_error(k);
                    self.pause();
                }
            }
        }
    }

    /// udp: one connected socket; a reply missing after the timeout is
    /// lost, and the next datagram goes out.
    fn run_udp(&mut self, target: SocketAddr) {
        let local: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        let sock = match std::net::UdpSocket::bind(local).and_then(|s| s.connect(target).map(|_| s))
        {
            Ok(s) => s,
            Err(e) => {
                self.count_error(connect_kind(&e));
                return;
            }
        };
        let mut back = vec![0u8; self.payload.buf.len() + 1];
        // The receive timeout is set only when it must shrink (near the
        // end) or after it fired early: no extra system call per request.
        let mut timeout_set = Duration::MAX;
        while Instant::now() < self.win.end {
            self.payload.advance();
            let started = Instant::now();
            self.begin(started);
            let limit = self.op_timeout();
            if let Err(e) = sock.send(&self.payload.buf) {
                self.slot.in_flight.store(0, Ordering::Relaxed);
                // ICMP port unreachable from an earlier datagram.
                self.count_error(connect_kind(&e));
                self.pause();
                continue;
            }
            let outcome = loop {
                let left = limit.saturating_sub(started.elapsed());
                if left.is_zero() {
                    break Some(Kind::Lost);
                }
                if left * 2 <= timeout_set || left > timeout_set {
                    if sock.set_read_timeout(Some(left)).is_err() {
                        break Some(Kind::Other);
                    }
                    timeout_set = left;
                }
                match sock.recv(&mut back) {
                    Ok(n) if back[..n] == self.payload.buf[..] => break None,
                    Ok(n) if self.payload.is_earlier_echo(&back[..n]) => {
                        self.count(Instant::now(), |c| c.late_replies += 1)
                    }
                    Ok(_) => break Some(Kind::Mismatch),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // Fired early (set for an earlier request): the loop
                    // sets what is left and waits again.
                    Err(e) if is_timeout(&e) => timeout_set = Duration::ZERO,
                    Err(e) => break Some(connect_kind(&e)),
                }
            };
            match outcome {
                None => self.finish(started),
                Some(k) => {
                    self.slot.in_flight.store(0, Ordering::Relaxed);
                    self.count_error(k);
                    if !matches!(k, Kind::Lost) {
                        self.pause();
                    }
                }
            }
        }
    }
}

/// The body of connection `id`'s thread.
pub fn run_one(cfg: &Config, win: &Window, slot: &Slot, id: u64) {
    let mut c = Conn {
        cfg,
        win,
        slot,
        id,
        payload: Payload::new(cfg.size, id),
        timeout_set: cfg.timeout,
        attempts: 0,
    };
    match (&cfg.mode, &cfg.target) {
        (Mode::Udp, Target::Udp(a)) => c.run_udp(*a),
        (Mode::Connect, _) => c.run_connect(),
        _ => c.run_rr(),
    }
}

/// Each connection's thread does little but block in the kernel.
const STACK: usize = 256 * 1024;

/// Run the load on a thread per connection and collect what every thread
/// counted. Err: a thread could not be started.
pub fn run(cfg: Config) -> Result<report::Run, String> {
    let cfg = Arc::new(cfg);
    let win = Arc::new(Window::new(&cfg));
    let slots: Arc<Vec<Slot>> = Arc::new((0..cfg.connections).map(|_| Slot::default()).collect());
    let mut threads = Vec::with_capacity(cfg.connections);
    let n = cfg.connections;
    for id in 0..n {
        let (cfg, win, slots) = (cfg.clone(), win.clone(), slots.clone());
        let t = std::thread::Builder::new()
            .name(format!("conn-{id}"))
            .stack_size(STACK)
            .spawn(move || run_one(&cfg, &win, &slots[id], id as u64))
            .map_err(|e| format!("cannot start thread {id} of {n}: {e}; lower -c"))?;
        threads.push(t);
    }

    std::thread::sleep(win.end.saturating_duration_since(Instant::now()));
    let (mut in_flight, mut oldest) = (0, Duration::ZERO);
    for s in slots.iter() {
        let v = s.in_flight.load(Ordering::Relaxed);
        if v > 0 {
            in_flight += 1;
            let started = win.start + Duration::from_nanos(v - 1);
            oldest = oldest.max(win.end.saturating_duration_since(started));
        }
    }

    // Every socket operation ends by grace_end; this deadline is for a
    // thread stuck anyway (a kernel that ignores a timeout): the report
    // goes out without it, and leaving main ends the process.
    let hard = win.grace_end + GRACE;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < hard {
        std::thread::sleep(Duration::from_millis(10));
    }
    let unfinished = threads.iter().filter(|t| !t.is_finished()).count();

    let mut counts = Counts::default();
    let mut starved = 0;
    for s in slots.iter() {
        let c = s.counts.lock().unwrap_or_else(|e| e.into_inner());
        starved += usize::from(c.hist.count() == 0);
        counts.merge(&c);
    }
    Ok(report::Run {
        counts,
        elapsed: cfg.duration.as_secs_f64(),
        starved,
        in_flight_at_end: in_flight,
        oldest_in_flight_ms: oldest.as_secs_f64() * 1000.0,
        unfinished,
        hold: None,
    })
}
