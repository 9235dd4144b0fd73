//! The lifecycle of `mode = "async"` workers on the real binary: graceful
//! stop and reload end each connection at a request boundary with a FIN
//! (`graceful_timeout` bounds a stop that cannot finish); SIGINT and
//! SIGQUIT stop fast; a reload and a binary upgrade under 500 connections
//! of request/response load lose nothing, and so do reloads between
//! `mode = "threads"` and `"async"`; the heartbeat finds a handler that
//! blocks the loop, and a blocked loop takes no new connection;
//! `max_requests` and `max_age` recycle without shrinking capacity;
//! dynamic and ondemand pools count connections against
//! `worker_connections`; `status` shows the oldest few connections of each
//! worker.
//!
//! This file has its own `main` (`harness = false` in Cargo.toml). With
//! `PREFORKD_TEST_DAEMON=1` in its environment the test binary *is* a
//! preforkd daemon: the built-in plugins plus `blocker`, an async line
//! echo (registered for `mode = "async"` only) that blocks its worker's
//! event loop for ever on a line `block` (its factory ignores SIGABRT, so
//! the master has to escalate to SIGKILL) and panics on a line `panic`.
//! Otherwise `main` runs the tests one after another (lighter on a shared
//! 2-core machine than running them in parallel); each starts this same
//! binary as its daemon.
//!
//! `main` first raises the soft limit of open files to the hard one (the
//! 500-connection test needs about 1,000 descriptors here) and turns core
//! dumps off (RLIMIT_CORE 0, inherited by the daemon: the SIGABRT of the
//! blocked worker would otherwise write one).
//!
//! Which worker holds a connection is read from /proc: the inode of the
//! server side of the connection in /proc/net/tcp, among the descriptors
//! in /proc/PID/fd of each worker.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use preforkd::handler::{
    AsyncConnection, AsyncStreamHandler, Handlers, PluginInfo, Recv, Registry,
};

/// The environment variable that turns this binary into a daemon.
const DAEMON_ENV: &str = "PREFORKD_TEST_DAEMON";

// ---------------------------------------------------------------------------
// The test plugin.

/// Echoes lines; blocks the event loop for ever on `block`, panics on
/// `panic`.
struct Blocker;

impl AsyncStreamHandler for Blocker {
    async fn handle(&self, conn: &mut AsyncConnection) -> io::Result<()> {
        let mut line = Vec::new();
        loop {
            line.clear();
            match conn.recv_line(&mut line, 4096).await? {
                // A blocking call on the loop: every connection of the
                // worker waits, and the heartbeat stops.
                Recv::Data(_) if line.starts_with(b"block") => loop {
                    std::thread::sleep(Duration::from_secs(3600));
                },
                Recv::Data(_) if line.starts_with(b"panic") => {
                    panic!("the client asked for a panic (test)")
                }
                Recv::Data(_) => conn.write_all(&line).await?,
                Recv::Eof | Recv::Shutdown => return Ok(()),
            }
        }
    }
}

fn registry() -> Registry {
    let mut r = Registry::builtin();
    r.register(
        PluginInfo::new("blocker", "test plugin", |_ctx| {
            // SAFETY: setting a signal's disposition to SIG_IGN installs
            // no handler code; the factory runs before the worker starts
            // its threads.
            unsafe { libc::signal(libc::SIGABRT, libc::SIG_IGN) };
            Ok(Handlers::async_stream(Blocker))
        })
        .modes(false, true),
    );
    r
}

// ---------------------------------------------------------------------------
// Daemons and configs.

/// A pid file and a control socket (`status`, and the upgrade's pid).
const HEAD: &str =
    "[daemon]\npid_file = \"{dir}/preforkd.pid\"\n\n[control]\nsocket = \"{dir}/ctl.sock\"\n\n";

/// Starts this binary as a daemon with the test plugin.
fn start(config: &str) -> Daemon {
    let exe = std::env::current_exe().expect("current_exe");
    Daemon::start_bin(&exe, config, &[(DAEMON_ENV, "1")])
}

/// An async service of `plugin` on a TCP port, after [`HEAD`].
fn async_service(name: &str, plugin: &str, extra: &str) -> String {
    format!(
        "{HEAD}{}",
        service(
            name,
            &["tcp://127.0.0.1:0"],
            plugin,
            &format!("mode = \"async\"\n{extra}")
        )
    )
}

/// Waits until `pid` is gone (a zombie counts as gone).
fn wait_gone(d: &Daemon, pid: i32, what: &str) {
    wait_for(DEADLINE, || (!alive(pid)).then_some(())).unwrap_or_else(|| {
        panic!(
            "{what} (pid {pid}, {:?}) is still running; log:\n{}",
            title(pid),
            d.log_text()
        )
    });
}

/// The service's entry in a status document.
fn svc<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no service {name} in {v:#}"))
}

/// The master named in the pid file after a binary upgrade: not the
/// test's child. The daemon's guard kills its process group, which the new
/// master shares; were it ever in a group of its own, this kills that
/// group too. Declared after the [`Daemon`], so that it is dropped first.
struct UpgradedMaster {
    pid_file: std::path::PathBuf,
    /// The first master's pid (and process group).
    first: i32,
}

impl UpgradedMaster {
    fn of(d: &Daemon) -> UpgradedMaster {
        UpgradedMaster {
            pid_file: d.path("preforkd.pid"),
            first: d.pid(),
        }
    }
}

impl Drop for UpgradedMaster {
    fn drop(&mut self) {
        let Some(pid) = pid_file_pid(&self.pid_file) else {
            return;
        };
        // SAFETY: getpgid(2) and kill(2) have no memory effects.
        unsafe {
            let pgid = libc::getpgid(pid);
            if pgid > 1 && pgid != self.first {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Which worker holds a connection (/proc).

/// The socket inodes process `pid` holds open.
fn socket_inodes(pid: i32) -> HashSet<u64> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The inode of the server side of each TCP connection to port `port` of
/// 127.0.0.1, by the client's port (/proc/net/tcp).
fn server_sides(port: u16) -> HashMap<u16, u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let mut out = HashMap::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let port_of = |a: &str| {
            a.rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        };
        let (Some(local), Some(remote), Ok(inode)) =
            (port_of(f[1]), port_of(f[2]), f[9].parse::<u64>())
        else {
            continue;
        };
        if local == port && remote != 0 && inode != 0 {
            out.insert(remote, inode);
        }
    }
    out
}

/// Bytes the server side of the connection from client port `client` to
/// port `port` of 127.0.0.1 has received and not read yet (the rx_queue of
/// /proc/net/tcp); None if there is no such connection.
fn server_unread(port: u16, client: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port_of = |a: &str| {
            a.rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        };
        if f.len() < 5 || port_of(f[1])? != port || port_of(f[2])? != client {
            return None;
        }
        u64::from_str_radix(f[4].split_once(':')?.1, 16).ok()
    })
}

/// For each of `clients` (connected to `server`), the pid among `workers`
/// that holds its server side; None if none does (not accepted yet).
fn holders(server: SocketAddr, clients: &[&TcpStream], workers: &[i32]) -> Vec<Option<i32>> {
    let sides = server_sides(server.port());
    let held: Vec<(i32, HashSet<u64>)> = workers.iter().map(|&w| (w, socket_inodes(w))).collect();
    clients
        .iter()
        .map(|c| {
            let inode = sides.get(&c.local_addr().unwrap().port())?;
            held.iter()
                .find(|(_, inodes)| inodes.contains(inode))
                .map(|(w, _)| *w)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Request/response clients.

/// How a request failed. A clean EOF before any byte of the answer is not a
/// failure: the worker closed at a request boundary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Refused,
    Reset,
    /// Part of the answer, then EOF.
    PartialAnswer,
    Timeout,
    Mismatch,
    /// Closed at a boundary again and again: the request was never answered.
    NeverAnswered,
    Other(String),
}

fn classify(e: &io::Error) -> Failure {
    match e.kind() {
        ErrorKind::ConnectionRefused => Failure::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Failure::Reset
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Other(e.to_string()),
    }
}

/// What a client does with its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Request after request on one connection; closed at a boundary, it
    /// reconnects and resends (as an HTTP keep-alive client does).
    Persistent,
    /// Request after request on one connection until the server closes it
    /// at a boundary: then the client is done (a stop).
    UntilClosed,
    /// A new connection for every request.
    Connector,
}

/// What the clients counted.
#[derive(Default)]
struct Tally {
    /// Requests answered exactly.
    ok: AtomicUsize,
    /// Clients that have had at least one answer.
    warm: AtomicUsize,
    /// Clean closes at a request boundary after which the request was sent
    /// again on a new connection.
    reconnects: AtomicUsize,
    /// `UntilClosed` clients whose connection ended with a clean close at a
    /// boundary.
    closed_clean: AtomicUsize,
    /// Clients that are done (`UntilClosed`: closed, or failed).
    done: AtomicUsize,
    /// `Persistent` clients whose connection has not had an answer yet
    /// (not accepted, or not served yet): a connection still in the accept
    /// queue when a generation stops is the next one's to accept.
    unanswered: AtomicUsize,
    failures: Mutex<BTreeMap<Failure, usize>>,
    /// The first few failures, described.
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, f: Failure, what: String) {
        *self.failures.lock().unwrap().entry(f).or_default() += 1;
        let mut ex = self.examples.lock().unwrap();
        if ex.len() < 20 {
            ex.push(what);
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    fn failed(&self) -> usize {
        self.failures.lock().unwrap().values().sum()
    }

    fn summary(&self) -> String {
        format!(
            "{} requests ok, {} resent after a clean close, {} connections closed cleanly, failures {:?}, first failures {:#?}",
            self.ok(),
            self.reconnects.load(Ordering::SeqCst),
            self.closed_clean.load(Ordering::SeqCst),
            self.failures.lock().unwrap(),
            self.examples.lock().unwrap()
        )
    }
}

/// How long a request may wait for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most times one request is resent after clean closes before it counts as
/// never answered.
const MAX_RESENDS: usize = 50;

/// A request nobody else sends: the client, its sequence number, filler
/// that depends on both, a newline; 20 to about 120 bytes (one segment on
/// loopback, written in one call).
fn payload(client: usize, i: u64) -> Vec<u8> {
    let mut p = format!("c{client} r{i} ").into_bytes();
    let len = p.len() + 8 + ((client as u64 * 7919 + i * 104_729) % 100) as usize;
    while p.len() < len {
        p.push(b'a' + ((p.len() + client + i as usize) % 26) as u8);
    }
    p.push(b'\n');
    p
}

/// One client: its connection (nonblocking), the request in flight and
/// how far it got.
struct Client {
    id: usize,
    kind: Kind,
    stream: Option<TcpStream>,
    seq: u64,
    request: Vec<u8>,
    written: usize,
    got: Vec<u8>,
    deadline: Instant,
    resends: usize,
    warm: bool,
    done: bool,
    /// After a failure: not before this (no spinning on a dead daemon).
    retry_at: Option<Instant>,
    /// `Persistent`: its connection has not had an answer yet (counted in
    /// [`Tally::unanswered`]).
    unanswered: bool,
}

impl Client {
    fn new(id: usize, kind: Kind) -> Client {
        Client {
            id,
            kind,
            stream: None,
            seq: 0,
            request: payload(id, 0),
            written: 0,
            got: Vec::new(),
            deadline: Instant::now() + REQUEST_TIMEOUT,
            resends: 0,
            warm: false,
            done: false,
            retry_at: None,
            unanswered: false,
        }
    }

    fn what(&self, w: &str) -> String {
        format!(
            "client {} ({:?}) request {}: {w}",
            self.id, self.kind, self.seq
        )
    }

    /// Connects (blocking, bounded), for the request in flight.
    fn open(&mut self, addr: SocketAddr, tally: &Tally) {
        self.retry_at = None;
        match connect(addr).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(s) => {
                if self.kind == Kind::Persistent && !self.unanswered {
                    self.unanswered = true;
                    tally.unanswered.fetch_add(1, Ordering::SeqCst);
                }
                self.stream = Some(s);
                self.written = 0;
                self.got.clear();
                self.deadline = Instant::now() + REQUEST_TIMEOUT;
            }
            Err(e) => self.fail(tally, classify(&e), &format!("connect: {e}")),
        }
    }

    /// The next request.
    fn next_request(&mut self) {
        self.seq += 1;
        self.request = payload(self.id, self.seq);
        self.written = 0;
        self.got.clear();
        self.resends = 0;
        self.deadline = Instant::now() + REQUEST_TIMEOUT;
    }

    fn fail(&mut self, tally: &Tally, f: Failure, w: &str) {
        tally.fail(f, self.what(w));
        self.stream = None;
        self.retry_at = Some(Instant::now() + Duration::from_millis(10));
        self.next_request();
        if self.kind == Kind::UntilClosed {
            self.finish(tally);
        }
    }

    fn finish(&mut self, tally: &Tally) {
        if !self.done {
            self.done = true;
            self.stream = None;
            tally.done.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn answered(&mut self, tally: &Tally) {
        tally.ok.fetch_add(1, Ordering::SeqCst);
        if self.unanswered {
            self.unanswered = false;
            tally.unanswered.fetch_sub(1, Ordering::SeqCst);
        }
        if !self.warm {
            self.warm = true;
            tally.warm.fetch_add(1, Ordering::SeqCst);
        }
        self.next_request();
        if self.kind == Kind::Connector {
            self.stream = None;
        }
    }

    /// A clean EOF before any byte of the answer.
    fn closed_at_boundary(&mut self, tally: &Tally) {
        self.stream = None;
        if self.kind == Kind::UntilClosed {
            tally.closed_clean.fetch_add(1, Ordering::SeqCst);
            self.finish(tally);
            return;
        }
        tally.reconnects.fetch_add(1, Ordering::SeqCst);
        self.resends += 1;
        if self.resends > MAX_RESENDS {
            self.fail(tally, Failure::NeverAnswered, "closed every time");
        }
    }

    /// Writes or reads, as far as the socket lets it now.
    fn advance(&mut self, tally: &Tally) {
        let Some(s) = &mut self.stream else { return };
        if self.written < self.request.len() {
            match s.write(&self.request[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => self.fail(tally, classify(&e), &format!("write: {e}")),
            }
            return;
        }
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) if self.got.is_empty() => self.closed_at_boundary(tally),
            Ok(0) => {
                let w = format!(
                    "EOF after {} of {} bytes",
                    self.got.len(),
                    self.request.len()
                );
                self.fail(tally, Failure::PartialAnswer, &w);
            }
            Ok(n) => {
                self.got.extend_from_slice(&buf[..n]);
                if self.got.len() >= self.request.len() {
                    if self.got == self.request {
                        self.answered(tally);
                    } else {
                        let w = format!(
                            "sent {:?}, got {:?}",
                            String::from_utf8_lossy(&self.request),
                            String::from_utf8_lossy(&self.got)
                        );
                        self.fail(tally, Failure::Mismatch, &w);
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => {
                let w = format!("read after {} bytes: {e}", self.got.len());
                self.fail(tally, classify(&e), &w);
            }
        }
    }
}

/// One thread's clients, driven by poll(2) until `stop` or until all are
/// done.
fn drive(addr: SocketAddr, mut clients: Vec<Client>, stop: &AtomicBool, tally: &Tally) {
    for c in &mut clients {
        c.open(addr, tally);
    }
    while !stop.load(Ordering::SeqCst) && !clients.iter().all(|c| c.done) {
        let now = Instant::now();
        for c in clients.iter_mut().filter(|c| !c.done) {
            if c.stream.is_none() && c.retry_at.is_none_or(|at| now >= at) {
                c.open(addr, tally);
            } else if c.stream.is_some() && now >= c.deadline {
                let w = format!("no answer within {REQUEST_TIMEOUT:?}");
                c.fail(tally, Failure::Timeout, &w);
            }
        }
        let mut fds = Vec::new();
        let mut which = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            if let Some(s) = &c.stream {
                let events = if c.written < c.request.len() {
                    libc::POLLOUT
                } else {
                    libc::POLLIN
                };
                fds.push(libc::pollfd {
                    fd: s.as_raw_fd(),
                    events,
                    revents: 0,
                });
                which.push(i);
            }
        }
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // SAFETY: poll(2) reads and writes `fds.len()` pollfd structs, all
        // in `fds`, which outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
        if n <= 0 {
            continue;
        }
        for (k, fd) in fds.iter().enumerate() {
            if fd.revents != 0 {
                clients[which[k]].advance(tally);
            }
        }
    }
}

/// Clients on a few threads (each polls its share of the connections).
struct Load {
    clients: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// `groups`: how many clients of each kind; spread over `threads`.
    fn start(addr: SocketAddr, groups: &[(Kind, usize)], threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut all: Vec<Vec<Client>> = (0..threads).map(|_| Vec::new()).collect();
        let mut id = 0;
        for &(kind, n) in groups {
            for _ in 0..n {
                all[id % threads].push(Client::new(id, kind));
                id += 1;
            }
        }
        let threads = all
            .into_iter()
            .map(|clients| {
                let (stop, tally) = (stop.clone(), tally.clone());
                std::thread::spawn(move || drive(addr, clients, &stop, &tally))
            })
            .collect();
        Load {
            clients: id,
            stop,
            tally,
            threads,
        }
    }

    /// Waits until every client has had an answer (its connection was
    /// accepted by a worker and served).
    fn wait_warm(&self, d: &Daemon) {
        wait_for(DEADLINE, || {
            (self.tally.warm.load(Ordering::SeqCst) == self.clients).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "only {} of {} clients were answered: {}; log:\n{}",
                self.tally.warm.load(Ordering::SeqCst),
                self.clients,
                self.tally.summary(),
                d.log_text()
            )
        });
    }

    /// Waits until `n` more requests than now have been answered.
    fn wait_more(&self, n: usize, d: &Daemon) {
        let target = self.tally.ok() + n;
        wait_for(DEADLINE, || (self.tally.ok() >= target).then_some(())).unwrap_or_else(|| {
            panic!(
                "clients stuck below {target} answers: {}; log:\n{}",
                self.tally.summary(),
                d.log_text()
            )
        });
    }

    /// Waits until every `Persistent` client's connection has had an
    /// answer: each is held by a worker of the generation now serving, so
    /// that the next stop of a generation closes every one of them.
    fn wait_answered(&self, d: &Daemon) {
        wait_for(DEADLINE, || {
            (self.tally.unanswered.load(Ordering::SeqCst) == 0).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{} kept-alive connections had no answer: {}; log:\n{}",
                self.tally.unanswered.load(Ordering::SeqCst),
                self.tally.summary(),
                d.log_text()
            )
        });
    }

    /// Waits until every client is done by itself (`UntilClosed`).
    fn wait_done(&self, d: &Daemon) {
        wait_for(DEADLINE, || {
            (self.tally.done.load(Ordering::SeqCst) == self.clients).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "only {} of {} connections ended: {}; log:\n{}",
                self.tally.done.load(Ordering::SeqCst),
                self.clients,
                self.tally.summary(),
                d.log_text()
            )
        });
    }

    /// Stops the clients and returns what they counted.
    fn finish(mut self) -> Arc<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().expect("client thread panicked");
        }
        self.tally.clone()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A failed assertion must not leave client threads running.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Asserts the clients lost nothing, and returns their summary.
fn assert_nothing_lost(tally: &Tally, d: &Daemon) -> String {
    let summary = tally.summary();
    assert_eq!(
        tally.failed(),
        0,
        "requests failed: {summary}; log:\n{}",
        d.log_text()
    );
    assert!(tally.ok() > 0, "no request was answered: {summary}");
    summary
}

/// A connection on which one echo round trip was done: a worker has
/// accepted it and now waits, idle, for more.
fn idle_connection(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr).unwrap();
    s.write_all(b"hello\n").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello\n");
    s
}

/// One line echoed on an open connection.
fn echo_on(s: &mut TcpStream, line: &[u8]) -> Result<(), String> {
    s.write_all(line).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; line.len()];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    (got == line)
        .then_some(())
        .ok_or_else(|| format!("got {got:?}"))
}

/// Whether the connection was closed (EOF or reset) rather than answered.
fn closed(s: &mut impl Read) -> bool {
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        ),
    }
}

// ---------------------------------------------------------------------------
// 1. Graceful stop and reload under request/response load.

/// SIGTERM while 100 clients run request after request on their own
/// connections over 2 async workers: each connection gets the answer to
/// every request the worker read, then a clean EOF at a request boundary,
/// never a reset; the workers exit 0 long before graceful_timeout.
fn sigterm_under_load_ends_every_connection_with_fin() {
    let mut d = start(&async_service(
        "echo",
        "echo",
        "workers = 2\ngraceful_timeout = \"20s\"",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let workers = d.wait_workers(2);
    let load = Load::start(addr, &[(Kind::UntilClosed, 100)], 2);
    // Every connection accepted and served before the stop (one still in
    // the accept queue at the stop would be reset by the kernel).
    load.wait_warm(&d);
    load.wait_more(2000, &d);

    let stop = Instant::now();
    d.signal(libc::SIGTERM);
    load.wait_done(&d);
    let tally = load.finish();
    let summary = tally.summary();
    assert_eq!(tally.failed(), 0, "{summary}; log:\n{}", d.log_text());
    assert_eq!(
        tally.closed_clean.load(Ordering::SeqCst),
        100,
        "not every connection ended with a FIN at a boundary: {summary}"
    );

    let status = d.wait_exit(Duration::from_secs(15));
    let log = d.log_text();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(stop.elapsed() < Duration::from_secs(15), "log:\n{log}");
    assert!(log.contains("INFO: SIGTERM: graceful stop"), "log:\n{log}");
    for pid in workers {
        assert!(
            log.contains(&format!("(pid {pid}) exited with status 0")),
            "worker {pid} did not exit 0:\n{log}"
        );
        wait_gone(&d, pid, "a worker after the stop");
    }
    assert!(!log.contains("SIGKILL"), "log:\n{log}");
    eprintln!("sigterm_under_load_ends_every_connection_with_fin: {summary}");
}

/// Much more than the socket buffers hold is in flight when SIGTERM comes:
/// echo stops at a request boundary (everything it read has been written
/// back), sends FIN and drains the rest: the client gets back an exact
/// prefix of what it sent, then a clean EOF, never a reset.
fn sigterm_during_a_stream_ends_it_at_a_boundary() {
    let mut d = start(&async_service(
        "echo",
        "echo",
        "workers = 2\ngraceful_timeout = \"20s\"",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let c = connect(addr).unwrap();
    let total = 8 * 1024 * 1024;
    let writer = {
        let mut c = c.try_clone().unwrap();
        std::thread::spawn(move || -> io::Result<usize> {
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            let mut sent = 0;
            while sent < total {
                c.write_all(&chunk)?;
                sent += chunk.len();
            }
            c.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        })
    };
    wait_for(DEADLINE, || (pending(&c) > 16 * 1024).then_some(()))
        .unwrap_or_else(|| panic!("no echo came back; log:\n{}", d.log_text()));
    d.signal(libc::SIGTERM);
    let mut got = Vec::with_capacity(total);
    let mut reader = &c;
    reader
        .read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("a clean EOF, not {e}; log:\n{}", d.log_text()));
    assert!(
        !got.is_empty() && got.len() <= total,
        "got {} bytes",
        got.len()
    );
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, b)| *b == ((i % (64 * 1024)) % 251) as u8),
        "what came back is not a prefix of what was sent"
    );
    let _ = writer.join().unwrap();
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log_text());
    assert!(!d.log_text().contains("SIGKILL"), "log:\n{}", d.log_text());
}

/// SIGTERM while a client sends and never reads: the echo owed to it
/// cannot be written, so the worker cannot finish; `graceful_timeout`
/// bounds the stop (the master kills the worker at its deadline) and the
/// master exits 0.
fn sigterm_with_a_client_that_never_reads_ends_at_graceful_timeout() {
    let mut d = start(&async_service(
        "echo",
        "echo",
        "workers = 1\ngraceful_timeout = \"1s\"",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let mut idle = idle_connection(addr);
    let stuck = connect(addr).unwrap();
    let writer = {
        let mut s = stuck.try_clone().unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..1024 {
                if s.write_all(&chunk).is_err() {
                    break; // our buffers are full, or the worker is gone
                }
            }
        })
    };
    // Both directions full: the writer's last write timed out.
    writer.join().unwrap();
    assert!(pending(&stuck) > 0, "the writer was not accepted");

    let sent = Instant::now();
    d.signal(libc::SIGTERM);
    // The idle connection is closed at its boundary, at once.
    let rest = read_to_eof(&mut idle)
        .unwrap_or_else(|e| panic!("idle connection: {e}; log:\n{}", d.log_text()));
    assert!(rest.is_empty(), "{rest:?}");
    let status = d.wait_exit(DEADLINE);
    let waited = sent.elapsed();
    let log = d.log_text();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(10),
        "stopped {waited:?} after SIGTERM, graceful_timeout 1s:\n{log}"
    );
    assert!(
        log.contains("still running at its stop deadline; sending SIGKILL"),
        "log:\n{log}"
    );
}

/// SIGHUP with a changed config while 100 kept-alive clients run: the old
/// generation's workers close every connection at a request boundary with
/// a FIN (each client resends on a new connection, served by the new
/// generation) and exit 0; not one request fails.
fn sighup_under_load_ends_old_connections_with_fin() {
    let config = |wc: u32| {
        async_service(
            "echo",
            "echo",
            &format!("workers = 2\nworker_connections = {wc}\ngraceful_timeout = \"10s\""),
        )
    };
    let d = start(&config(1024));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let old = d.wait_workers(2);
    let load = Load::start(addr, &[(Kind::Persistent, 100)], 2);
    load.wait_warm(&d);
    load.wait_more(2000, &d);

    d.write_config(&config(512));
    d.signal(libc::SIGHUP);
    d.wait_log("reload (generation 2) succeeded in ");
    for &pid in &old {
        wait_gone(&d, pid, "an old worker after the reload");
    }
    load.wait_more(2000, &d);
    let v = wait_settled(&d);
    assert_eq!(v["generation"], 2, "{v:#}");
    let tally = load.finish();
    let summary = assert_nothing_lost(&tally, &d);
    assert!(
        tally.reconnects.load(Ordering::SeqCst) >= 100,
        "fewer clean closes than old connections: {summary}"
    );
    let log = d.log_text();
    for pid in old {
        assert!(
            log.contains(&format!("(pid {pid}) exited with status 0")),
            "old worker {pid} did not exit 0:\n{log}"
        );
    }
    assert!(!log.contains("SIGKILL"), "log:\n{log}");
    eprintln!("sighup_under_load_ends_old_connections_with_fin: {summary}");
}

/// SIGTERM while half a line has arrived (the `blocker` plugin echoes
/// lines): the request is not over, so the worker waits for the rest,
/// answers it, and only then closes with a FIN.
fn sigterm_mid_line_waits_for_the_rest() {
    let mut d = start(&async_service(
        "line",
        "blocker",
        "workers = 1\ngraceful_timeout = \"20s\"",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "line");
    let mut c = idle_connection(addr);
    c.write_all(b"half a ").unwrap();
    // The handler has read the first half and waits mid-line for the
    // rest: nothing is left unread on the server's side.
    let port = c.local_addr().unwrap().port();
    wait_for(DEADLINE, || {
        (server_unread(addr.port(), port) == Some(0)).then_some(())
    })
    .unwrap_or_else(|| panic!("the half line was not read; log:\n{}", d.log_text()));
    let mut other = idle_connection(addr);
    d.signal(libc::SIGTERM);
    // The other, idle, connection is closed at its boundary.
    let rest = read_to_eof(&mut other)
        .unwrap_or_else(|e| panic!("idle connection: {e}; log:\n{}", d.log_text()));
    assert!(rest.is_empty(), "{rest:?}");
    c.write_all(b"line\n").unwrap();
    let got = read_to_eof(&mut c)
        .unwrap_or_else(|e| panic!("mid-line connection: {e}; log:\n{}", d.log_text()));
    assert_eq!(
        String::from_utf8_lossy(&got),
        "half a line\n",
        "log:\n{}",
        d.log_text()
    );
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log_text());
}

/// Reloads that switch the service between `mode = "threads"` and
/// `mode = "async"` under kept-alive and connecting clients: every
/// generation serves, nothing is lost.
fn reload_between_modes_loses_nothing() {
    let config = |mode: &str| {
        let keys = match mode {
            "async" => "mode = \"async\"\nworker_connections = 256",
            _ => "threads = 24",
        };
        format!(
            "{HEAD}{}",
            service(
                "echo",
                &["tcp://127.0.0.1:0"],
                "echo",
                &format!("workers = 2\n{keys}\ngraceful_timeout = \"10s\"")
            )
        )
    };
    let d = start(&config("threads"));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let load = Load::start(addr, &[(Kind::Persistent, 16), (Kind::Connector, 4)], 2);
    load.wait_warm(&d);
    load.wait_more(500, &d);
    for (generation, mode) in [(2, "async"), (3, "threads"), (4, "async")] {
        let before = d.workers();
        d.write_config(&config(mode));
        d.signal(libc::SIGHUP);
        d.wait_log(&format!("reload (generation {generation}) succeeded in "));
        for pid in before {
            wait_gone(&d, pid, "a worker of the previous mode");
        }
        let v = wait_settled(&d);
        assert_eq!(v["generation"], generation, "{v:#}");
        load.wait_more(500, &d);
    }
    let tally = load.finish();
    let summary = assert_nothing_lost(&tally, &d);
    assert!(!d.log_text().contains("SIGKILL"), "log:\n{}", d.log_text());
    eprintln!("reload_between_modes_loses_nothing: {summary}");
}

// ---------------------------------------------------------------------------
// 2. Fast stop.

/// SIGINT or SIGQUIT: the master exits 0 within seconds although one async
/// worker holds an idle connection and the other a client that never reads
/// (its echo waits for room in the socket), which a graceful stop would
/// wait `graceful_timeout` for; the workers are gone.
fn fast_stop(sig: i32, logged: &str) {
    let mut d = start(&async_service(
        "echo",
        "echo",
        "workers = 2\ngraceful_timeout = \"30s\"",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let workers = d.wait_workers(2);
    let mut idle = idle_connection(addr);

    let stuck = connect(addr).unwrap();
    let writer = {
        let mut s = stuck.try_clone().unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..1024 {
                if s.write_all(&chunk).is_err() {
                    break; // our buffers are full, or the worker is gone
                }
            }
        })
    };
    wait_for(DEADLINE, || (pending(&stuck) > 0).then_some(()))
        .unwrap_or_else(|| panic!("the writer was not accepted; log:\n{}", d.log_text()));

    let stop = Instant::now();
    d.signal(sig);
    let status = d.wait_exit(DEADLINE);
    let took = stop.elapsed();
    let log = d.log_text();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(took < Duration::from_secs(10), "took {took:?}; log:\n{log}");
    assert!(log.contains(logged), "log:\n{log}");
    assert!(!log.contains("graceful stop"), "log:\n{log}");
    for pid in workers {
        wait_gone(&d, pid, "a worker after the fast stop");
    }
    let mut buf = [0u8; 16];
    match idle.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("idle connection after a fast stop: {other:?}"),
    }
    match connect(addr) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("connect after the stop: {other:?}"),
    }
    writer.join().unwrap();
}

fn sigint_is_a_fast_stop() {
    fast_stop(libc::SIGINT, "INFO: SIGINT: fast stop");
}

fn sigquit_is_a_fast_stop() {
    fast_stop(libc::SIGQUIT, "INFO: SIGQUIT: fast stop");
}

// ---------------------------------------------------------------------------
// 3. Reload and upgrade under 500 connections.

/// 500 client connections of request/response load on 2 async workers
/// (450 kept alive, 50 connecting for every request), across a SIGHUP
/// reload with a changed config and a SIGUSR2 binary upgrade: not one
/// request is refused, reset, cut short, late or answered wrongly, and
/// every kept-alive connection was closed at a boundary by each old
/// generation (at least twice per client).
fn reload_and_upgrade_under_500_connections_lose_nothing() {
    let (soft, _) = nofile();
    if soft < 2000 {
        println!(
            "SKIPPED: reload_and_upgrade_under_500_connections_lose_nothing: the open files limit is {soft}, this test needs 2000"
        );
        return;
    }
    let config = |wc: u32| {
        async_service(
            "echo",
            "echo",
            &format!("workers = 2\nworker_connections = {wc}\ngraceful_timeout = \"10s\""),
        )
    };
    let mut d = start(&config(1024));
    let _upgraded = UpgradedMaster::of(&d);
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let first = d.wait_workers(2);
    let load = Load::start(addr, &[(Kind::Persistent, 450), (Kind::Connector, 50)], 4);
    load.wait_warm(&d);
    load.wait_more(5000, &d);

    // The reload: new workers (worker_connections changed), the old ones
    // close at a boundary.
    d.write_config(&config(1000));
    d.signal(libc::SIGHUP);
    d.wait_log("reload (generation 2) succeeded in ");
    for &pid in &first {
        wait_gone(&d, pid, "a first-generation worker after the reload");
    }
    load.wait_more(5000, &d);
    // Every kept-alive client reconnected and was served by the second
    // generation (on a slow machine some may still wait in the queue,
    // which the upgrade's new workers would take).
    load.wait_answered(&d);

    // The upgrade: a new master (this binary again) takes the listeners.
    let second = wait_settled(&d);
    let second: Vec<i32> = status_workers(&second, "echo")
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    let old_master = d.pid();
    d.signal(libc::SIGUSR2);
    d.wait_log(&format!("upgrade: took over from master pid {old_master}"));
    let status = d.wait_exit(DEADLINE);
    assert!(
        status.success(),
        "the old master: {status:?}; log:\n{}",
        d.log_text()
    );
    let new_master = pid_file_pid(&d.path("preforkd.pid")).expect("pid file");
    assert_ne!(new_master, old_master);
    for &pid in &second {
        wait_gone(&d, pid, "a worker of the old master after the upgrade");
    }
    let v = wait_settled(&d);
    assert_eq!(v["pid"], new_master, "{v:#}");
    load.wait_more(5000, &d);

    let tally = load.finish();
    let summary = assert_nothing_lost(&tally, &d);
    assert!(
        tally.reconnects.load(Ordering::SeqCst) >= 2 * 450,
        "the old generations did not close every kept-alive connection: {summary}"
    );
    let log = d.log_text();
    for pid in first.iter().chain(&second) {
        assert!(
            log.contains(&format!("(pid {pid}) exited with status 0")),
            "worker {pid} did not exit 0:\n{log}"
        );
    }
    assert!(!log.contains("SIGKILL"), "log:\n{log}");
    eprintln!("reload_and_upgrade_under_500_connections_lose_nothing: {summary}");
}

// ---------------------------------------------------------------------------
// 4. The heartbeat, and a handler that panics.

/// Two connections of `blocker`, each on another of its 2 workers: A first.
/// At light load the first waiting worker takes every connection (below 16
/// it is never "ahead" of its sibling: src/worker/gate.rs), so the others
/// are held open, not closed, until one lands on the other worker.
fn one_on_each_worker(d: &Daemon, addr: SocketAddr) -> ((TcpStream, i32), (TcpStream, i32)) {
    let workers = d.wait_workers(2);
    let mut kept: Vec<(TcpStream, i32)> = Vec::new();
    let mut held = Vec::new();
    for _ in 0..40 {
        let s = idle_connection(addr);
        let on = holders(addr, &[&s], &workers)[0]
            .unwrap_or_else(|| panic!("no worker of {workers:?} holds {s:?}"));
        if kept.iter().all(|(_, w)| *w != on) {
            kept.push((s, on));
        } else {
            held.push(s);
        }
        if kept.len() == 2 {
            let b = kept.pop().unwrap();
            let a = kept.pop().unwrap();
            return (a, b);
        }
    }
    panic!(
        "40 connections, all on worker {:?}; log:\n{}",
        kept[0].1,
        d.log_text()
    );
}

/// A handler that blocks the loop (a `sleep` on the line `block`) longer
/// than `timeout`: the master sees the heartbeat stop, logs the blocked
/// connection's peer, sends SIGABRT, then SIGKILL (the plugin ignores
/// SIGABRT), and a new worker replaces it. The other worker serves its
/// connection meanwhile; connections older than `timeout` on a live loop
/// are no reason to kill anything.
fn blocked_loop_is_found_by_the_heartbeat() {
    let d = start(&async_service(
        "block",
        "blocker",
        "workers = 2\ntimeout = \"1s\"",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "block");
    let ((mut a, blocked), (mut b, other)) = one_on_each_worker(&d, addr);
    let peer = a.local_addr().unwrap();

    // Open connections older than `timeout` on live loops: time must pass
    // here, it is what is observed.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(d.count_log("SIGABRT"), 0, "log:\n{}", d.log_text());
    echo_on(&mut a, b"still here\n").unwrap();
    echo_on(&mut b, b"still here\n").unwrap();

    a.write_all(b"block\n").unwrap();
    let blocked_at = Instant::now();
    // The other worker serves B all along, until the blocked one is gone.
    let mut served_while_blocked = 0;
    let killed = format!("(pid {blocked}) killed by signal SIGKILL");
    wait_for(DEADLINE, || {
        echo_on(&mut b, b"meanwhile\n")
            .unwrap_or_else(|e| panic!("B on worker {other}: {e}; log:\n{}", d.log_text()));
        served_while_blocked += 1;
        (d.count_log(&killed) > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("worker {blocked} was not killed; log:\n{}", d.log_text()));
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("event loop blocked"))
        .unwrap_or_else(|| panic!("no heartbeat line:\n{log}"));
    assert!(
        line.contains("WARN: service block: worker block#")
            && line.contains(&format!(
                "(pid {blocked}) event loop blocked: heartbeat stopped "
            ))
            && line.contains(&format!(" while running the connection of {peer} (open "))
            && line.ends_with(" (timeout 1s); sending SIGABRT"),
        "{line}"
    );
    assert!(
        blocked_at.elapsed() >= Duration::from_secs(1),
        "killed {:?} after the block, timeout 1s",
        blocked_at.elapsed()
    );
    assert!(
        log.contains(&format!(
            "(pid {blocked}) still running 2s after SIGABRT; sending SIGKILL"
        )),
        "no escalation to SIGKILL:\n{log}"
    );
    assert!(
        served_while_blocked >= 2,
        "B served {served_while_blocked} times"
    );
    assert!(closed(&mut a), "the blocked connection is still open");

    // Replaced; the other worker (and B) untouched.
    let now = d.wait_workers(2);
    assert!(!now.contains(&blocked) && now.contains(&other), "{now:?}");
    echo_on(&mut b, b"after\n").unwrap();
    for _ in 0..4 {
        echo_once(addr, b"new\n").unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log_text()));
    }
    assert!(alive(d.pid()));
}

/// New connections that come while one worker's loop is blocked (its
/// heartbeat late by more than half of `timeout`) go to the worker whose
/// loop turns: a blocked loop takes no new connection (as a blocked nginx
/// worker, which accepts from its loop, takes none), so none is lost when
/// the blocked worker is killed.
///
/// Fails on main (the accept thread goes on handing connections to a loop
/// that cannot run them; they are reset with the worker).
fn blocked_loop_takes_no_new_connections() {
    let d = start(&async_service(
        "block",
        "blocker",
        "workers = 2\ntimeout = \"4s\"",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "block");
    let ((mut a, blocked), _) = one_on_each_worker(&d, addr);
    a.write_all(b"block\n").unwrap();
    // Its heartbeat late by more than half of `timeout` (status shows
    // it): the loop is blocked, as the worker itself can tell.
    let config = d.path("preforkd.toml");
    wait_status_at(&config, &d, "the blocked loop's heartbeat 2.5 s old", |v| {
        status_workers(v, "block").iter().any(|w| {
            w["pid"] == blocked && w["heartbeat_age_ms"].as_u64().is_some_and(|a| a >= 2500)
        })
    });
    // New connections, each with a request, until the blocked worker is
    // killed: each must be answered.
    let killed = format!("(pid {blocked}) killed by signal");
    let (mut answered, mut lost) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.count_log(&killed) == 0 {
        let mut s = connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let port = s.local_addr().unwrap().port();
        match echo_on(&mut s, b"new\n") {
            Ok(()) => answered += 1,
            Err(e) => lost.push(format!("client port {port}: {e}")),
        }
        assert!(
            Instant::now() < deadline,
            "the blocked worker was not killed within 60 s ({answered} answered meanwhile); log:\n{}",
            d.log_text()
        );
    }
    assert!(
        lost.is_empty(),
        "{} of {} new connections lost while a loop was blocked: {lost:?}; log:\n{}",
        lost.len(),
        answered + lost.len(),
        d.log_text()
    );
    assert!(answered > 0, "no new connection was answered");
}

/// An async handler that panics loses its connection, not its worker: the
/// other connections of the same loop are served on.
fn panicking_handler_loses_only_its_connection() {
    let d = start(&async_service("panic", "blocker", "workers = 1"));
    d.wait_ready();
    let addr = d.addr("tcp", "panic");
    let worker = d.wait_workers(1);
    let mut kept = idle_connection(addr);

    let mut p = connect(addr).unwrap();
    p.write_all(b"panic please\n").unwrap();
    assert!(closed(&mut p), "the panicking connection was not closed");
    d.wait_log("handler panicked");

    echo_on(&mut kept, b"still here\n").unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log_text()));
    echo_once(addr, b"new\n").unwrap();
    assert_eq!(d.workers(), worker, "the worker was replaced");
    assert_eq!(d.count_log(" spawned"), 1, "log:\n{}", d.log_text());
}

// ---------------------------------------------------------------------------
// 5. Recycling without shrinking capacity.

/// Recycles `service` (async, 2 workers, `limit` in its config) under
/// connect loops and kept-alive clients until `until` recycles are logged:
/// each replacement is ready before its worker stops, status never shows
/// fewer than 2 ready workers, no client request fails. Returns the log.
fn recycles_without_shrinking(limit: &str, until: usize) -> String {
    let d = start(&async_service(
        "rec",
        "echo",
        &format!("workers = 2\ngraceful_timeout = \"10s\"\n{limit}"),
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "rec");
    wait_settled(&d);
    let sampler = ReadySampler::start(&d, "rec");
    let load = Load::start(addr, &[(Kind::Connector, 4), (Kind::Persistent, 4)], 2);
    wait_for(Duration::from_secs(30), || {
        (d.count_log("): replaced by ") >= until).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "fewer than {until} recycles: {}; log:\n{}",
            load.tally.summary(),
            d.log_text()
        )
    });
    // The last recycled worker leaves; the pool settles at its size.
    wait_settled(&d);
    load.wait_more(100, &d);
    let tally = load.finish();
    let (min, samples) = sampler.finish();
    let summary = assert_nothing_lost(&tally, &d);
    let log = d.log_text();
    assert!(replaced_first(&log) >= until, "log:\n{log}");
    assert!(samples >= 3, "only {samples} status samples");
    assert!(min >= 2, "only {min} ready workers while recycling:\n{log}");
    assert!(!log.contains("SIGKILL"), "log:\n{log}");
    // One at a time: never two replacements started before a stop.
    let mut open = 0;
    for l in log.lines() {
        if l.contains("; recycling (a replacement starts first)") {
            open += 1;
            assert!(open <= 1, "two recycles at once:\n{log}");
        }
        if l.contains("): replaced by ") {
            open -= 1;
        }
    }
    eprintln!("recycling with {limit:?}: {summary}");
    log
}

/// `max_requests = 50` on an async service (enforced by the master): a
/// worker past 50 connections is replaced, the replacement ready first.
fn max_requests_recycles_without_shrinking() {
    let log = recycles_without_shrinking("max_requests = 50\nmax_requests_jitter = 0", 3);
    let served: Vec<u64> = log
        .lines()
        .filter(|l| l.contains(" (max_requests 50 + jitter); recycling"))
        .map(|l| {
            let rest = &l[l.find("): served ").unwrap() + "): served ".len()..];
            rest[..rest.find(' ').unwrap()].parse().unwrap()
        })
        .collect();
    assert!(served.len() >= 3, "log:\n{log}");
    assert!(served.iter().all(|&n| n >= 50), "{served:?}:\n{log}");
}

/// `max_age = "2s"` on an async service: the same.
fn max_age_recycles_without_shrinking() {
    let log = recycles_without_shrinking("max_age = \"2s\"\nmax_age_jitter = \"500ms\"", 3);
    assert!(log.contains("> max_age 2s"), "{log}");
}

// ---------------------------------------------------------------------------
// 6. Pools.

/// Opens a connection and has a line echoed on it: a worker holds it.
fn hold(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr).unwrap();
    echo_on(&mut s, b"hold\n").unwrap_or_else(|e| panic!("hold: {e}"));
    s
}

/// Ondemand with `worker_connections = 2`: no worker at first; a waiting
/// connection starts one, which takes a second connection too (it has
/// room); a third, waiting while that worker is full, starts another;
/// idle for `idle_worker_timeout`, each is retired.
fn ondemand_counts_connections_against_worker_connections() {
    let d = start(&async_service(
        "od",
        "echo",
        "pool = \"ondemand\"\nmax_workers = 3\nidle_worker_timeout = \"1s\"\nworker_connections = 2",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "od");
    assert!(
        d.workers().is_empty(),
        "workers at start: {:?}",
        d.workers()
    );

    echo_once(addr, b"first\n").unwrap();
    assert_eq!(
        d.count_log("a connection waiting and no idle worker; starting 1"),
        1,
        "{}",
        d.log_text()
    );
    d.wait_log("idle for idle_worker_timeout (1s); retiring it");
    d.wait_workers(0);

    let a = hold(addr);
    let b = hold(addr);
    let one = d.wait_workers(1);
    assert_eq!(
        d.count_log("no idle worker; starting"),
        2,
        "a worker with room counts as idle:\n{}",
        d.log_text()
    );
    assert_eq!(holders(addr, &[&a, &b], &one), vec![Some(one[0]); 2]);
    // Full: the next connection waits, and a second worker is started.
    let c = hold(addr);
    let two = d.wait_workers(2);
    assert_eq!(
        d.count_log("no idle worker; starting"),
        3,
        "{}",
        d.log_text()
    );
    let held = holders(addr, &[&c], &two)[0];
    assert!(held.is_some() && held != Some(one[0]), "{held:?} {two:?}");
    let v = wait_status(&d, "one full worker and one with room", |v| {
        let s = svc(v, "od");
        s["size"] == 2 && s["busy"] == 1 && s["idle"] == 1
    });
    assert_eq!(svc(&v, "od")["pool"], "ondemand");

    drop((a, b, c));
    wait_for(DEADLINE, || {
        (d.count_log("idle for idle_worker_timeout (1s); retiring it") >= 3).then_some(())
    })
    .unwrap_or_else(|| panic!("the idle workers were not retired; log:\n{}", d.log_text()));
    d.wait_workers(0);
}

/// Dynamic with `worker_connections = 4`, `min_spare = 1`: a worker with
/// room counts as able to take work (3 held connections start nothing); a
/// full one does not (the 4th starts another worker, which takes the 5th).
fn dynamic_counts_a_worker_with_room_as_spare() {
    let d = start(&async_service(
        "dyn",
        "echo",
        "pool = \"dynamic\"\nworkers = 1\nmin_spare = 1\nmax_spare = 2\nmax_workers = 3\nworker_connections = 4",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "dyn");
    let v = wait_settled(&d);
    assert_eq!(svc(&v, "dyn")["size"], 1, "{v:#}");
    let first = d.wait_workers(1);

    let mut conns: Vec<TcpStream> = (0..3).map(|_| hold(addr)).collect();
    // Three maintenance ticks with 3 of 4 connections in use: time must
    // pass here, it is what is observed.
    std::thread::sleep(Duration::from_millis(3500));
    let v = status(&d);
    let s = svc(&v, "dyn");
    assert!(
        s["size"] == 1 && s["idle"] == 1 && s["busy"] == 0,
        "a worker with room is not counted as spare: {v:#}"
    );
    assert_eq!(d.workers(), first);
    assert_eq!(d.count_log("fewer than min_spare"), 0, "{}", d.log_text());

    conns.push(hold(addr));
    let v = wait_status(&d, "a second worker for the full one", |v| {
        let s = svc(v, "dyn");
        s["size"] == 2 && s["busy"] == 1 && s["idle"] == 1
    });
    assert!(
        d.log_text()
            .contains("0 idle workers, fewer than min_spare 1; starting 1"),
        "{v:#}\n{}",
        d.log_text()
    );
    let workers = d.wait_workers(2);
    let fifth = hold(addr);
    let held = holders(addr, &[&fifth], &workers)[0];
    assert!(
        held.is_some() && held != Some(first[0]),
        "the 5th connection is on {held:?}, the full worker is {}",
        first[0]
    );
    let refs: Vec<&TcpStream> = conns.iter().collect();
    assert_eq!(holders(addr, &refs, &workers), vec![Some(first[0]); 4]);
}

// ---------------------------------------------------------------------------
// 7. Status.

/// The peers of a status worker's `connections`.
fn shown_peers(w: &serde_json::Value) -> Vec<String> {
    w["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("no connections in {w:#}"))
        .iter()
        .map(|c| c["peer"].as_str().unwrap().to_string())
        .collect()
}

/// 50 held connections on 2 async workers: each worker's status entry
/// counts its connections (`active`) and lists at most 8 of them, the
/// oldest; when the oldest close, the next oldest take their places.
fn status_shows_the_count_and_the_oldest_connections() {
    let d = start(&async_service("st", "echo", "workers = 2"));
    d.wait_ready();
    let addr = d.addr("tcp", "st");
    let workers = d.wait_workers(2);
    // Opened one after another, each served before the next: the order
    // of `conns` is the order of arrival at each worker.
    let mut conns: Vec<Option<TcpStream>> = (0..50).map(|_| Some(hold(addr))).collect();
    let refs: Vec<&TcpStream> = conns.iter().flatten().collect();
    let on = holders(addr, &refs, &workers);
    assert!(on.iter().all(Option::is_some), "{on:?}");
    let peer = |s: &TcpStream| s.local_addr().unwrap().to_string();
    let expected = |conns: &[Option<TcpStream>], w: i32| -> (usize, Vec<String>) {
        let mine: Vec<String> = conns
            .iter()
            .zip(&on)
            .filter(|(c, h)| c.is_some() && **h == Some(w))
            .map(|(c, _)| peer(c.as_ref().unwrap()))
            .collect();
        let shown = mine.iter().take(8).cloned().collect();
        (mine.len(), shown)
    };
    let check = |v: &serde_json::Value, conns: &[Option<TcpStream>]| -> Result<(), String> {
        let ws = status_workers(v, "st");
        if ws.len() != 2 {
            return Err(format!("{} workers", ws.len()));
        }
        for w in ws {
            let pid = w["pid"].as_i64().unwrap() as i32;
            let (n, oldest) = expected(conns, pid);
            if w["active"] != n {
                return Err(format!(
                    "worker {pid}: active {} for {n} connections",
                    w["active"]
                ));
            }
            let mut shown = shown_peers(w);
            let mut want = oldest.clone();
            shown.sort();
            want.sort();
            if shown != want {
                return Err(format!(
                    "worker {pid} ({n} connections) shows {shown:?}, its oldest are {want:?}"
                ));
            }
        }
        Ok(())
    };
    let mut last = String::new();
    wait_for(DEADLINE, || {
        let v = status(&d);
        check(&v, &conns)
            .map_err(|e| last = format!("{e}\n{v:#}"))
            .ok()
    })
    .unwrap_or_else(|| panic!("{last}"));
    let v = status(&d);
    let total: u64 = status_workers(&v, "st")
        .iter()
        .map(|w| w["active"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 50, "{v:#}");
    for w in status_workers(&v, "st") {
        assert!(shown_peers(w).len() <= 8, "{w:#}");
    }

    // The 3 oldest connections of the first worker end: the next oldest
    // are shown instead.
    let w0 = workers[0];
    let mut closed = 0;
    for (c, h) in conns.iter_mut().zip(&on) {
        if closed < 3 && *h == Some(w0) && c.is_some() {
            *c = None;
            closed += 1;
        }
    }
    assert_eq!(closed, 3, "worker {w0} held fewer than 3 of 50: {on:?}");
    wait_for(DEADLINE, || {
        let v = status(&d);
        check(&v, &conns)
            .map_err(|e| last = format!("{e}\n{v:#}"))
            .ok()
    })
    .unwrap_or_else(|| panic!("after 3 closed: {last}"));
}

// ---------------------------------------------------------------------------
// The runner.

/// The open files limit (soft, hard).
fn nofile() -> (libc::rlim_t, libc::rlim_t) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
    (l.rlim_cur, l.rlim_max)
}

fn main() {
    if std::env::var_os(DAEMON_ENV).is_some_and(|v| v == "1") {
        preforkd::cli::main_with(registry());
    }
    let (_, hard) = nofile();
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one struct we own; no other thread yet.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &raised);
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
    }
    let tests: [(&str, fn()); 17] = [
        (
            "sigterm_under_load_ends_every_connection_with_fin",
            sigterm_under_load_ends_every_connection_with_fin,
        ),
        (
            "sigterm_during_a_stream_ends_it_at_a_boundary",
            sigterm_during_a_stream_ends_it_at_a_boundary,
        ),
        (
            "sigterm_mid_line_waits_for_the_rest",
            sigterm_mid_line_waits_for_the_rest,
        ),
        (
            "sigterm_with_a_client_that_never_reads_ends_at_graceful_timeout",
            sigterm_with_a_client_that_never_reads_ends_at_graceful_timeout,
        ),
        (
            "sighup_under_load_ends_old_connections_with_fin",
            sighup_under_load_ends_old_connections_with_fin,
        ),
        (
            "reload_between_modes_loses_nothing",
            reload_between_modes_loses_nothing,
        ),
        ("sigint_is_a_fast_stop", sigint_is_a_fast_stop),
        ("sigquit_is_a_fast_stop", sigquit_is_a_fast_stop),
        (
            "reload_and_upgrade_under_500_connections_lose_nothing",
            reload_and_upgrade_under_500_connections_lose_nothing,
        ),
        (
            "blocked_loop_is_found_by_the_heartbeat",
            blocked_loop_is_found_by_the_heartbeat,
        ),
        (
            "blocked_loop_takes_no_new_connections",
            blocked_loop_takes_no_new_connections,
        ),
        (
            "panicking_handler_loses_only_its_connection",
            panicking_handler_loses_only_its_connection,
        ),
        (
            "max_requests_recycles_without_shrinking",
            max_requests_recycles_without_shrinking,
        ),
        (
            "max_age_recycles_without_shrinking",
            max_age_recycles_without_shrinking,
        ),
        (
            "ondemand_counts_connections_against_worker_connections",
            ondemand_counts_connections_against_worker_connections,
        ),
        (
            "dynamic_counts_a_worker_with_room_as_spare",
            dynamic_counts_a_worker_with_room_as_spare,
        ),
        (
            "status_shows_the_count_and_the_oldest_connections",
            status_shows_the_count_and_the_oldest_connections,
        ),
    ];
    run_tests(&tests);
}
