//! The worker: what a forked child runs. It sets itself up (signals, title,
//! master-death watch), initialises its service's handler plugin, tells the
//! master it is ready, then accepts and serves until it is asked to stop or
//! has served `max_requests`: with `threads` accept threads that serve a
//! connection each (here), or with one event loop for up to
//! `worker_connections` connections (`mode = "async"`: `event.rs`, fed by
//! the accept thread of `gate.rs`).
//!
//! Owns: its copies of its service's listening sockets (only the master's
//! copies keep an accept queue alive), the accepted connections, and the
//! handler objects.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::unistd::Pid;

use crate::acl::{self, Acl};
use crate::config::{Credentials, ListenAddr, ServiceConfig, WorkerMode};
use crate::exit::worker as code;
use crate::handler::{
    Addr, Connection, Datagram, DatagramHandler, Handlers, PluginContext, PluginInfo, Stream,
    StreamHandler,
};
use crate::listener::{self, WorkerSocket};
use crate::proxy::Proxy;
use crate::scoreboard::{IpCounter, Peer, Slot, State};
use crate::sys;

mod event;
mod gate;

/// Scoreboard entries an event-driven worker gets: its oldest connections,
/// for `preforkd status`.
pub const ASYNC_ENTRIES: usize = event::ENTRIES;

/// How long a closing connection waits for the client to finish sending
/// after our FIN, before the socket is closed anyway.
pub const LINGER: Duration = Duration::from_secs(2);

/// Everything a new worker needs, taken from the master's state after fork.
pub(crate) struct WorkerSpec<'a> {
    /// The service's configuration.
    pub service: &'a ServiceConfig,
    /// The slot number: the N of `worker SERVICE#N`.
    pub slot: usize,
    /// The generation (reload count) the worker belongs to.
    pub generation: u64,
    /// The master's pid, to notice its death.
    pub master: Pid,
    /// The handler plugin to initialise.
    pub plugin: &'a PluginInfo,
    /// The service's listeners: the bound address and a descriptor of our own.
    pub listeners: Vec<(ListenAddr, OwnedFd)>,
    /// Write end of the ready pipe: one line, `ready` or `error: REASON`.
    pub ready: OwnedFd,
    /// Its scoreboard slot, if it got one.
    pub board: Option<Slot>,
    /// `[daemon] user`/`group` of its generation: what it drops to.
    pub credentials: Option<&'a Credentials>,
}

/// Runs the worker to its end; returns the process exit code.
pub(crate) fn run(spec: WorkerSpec<'_>) -> i32 {
    let name = format!("{}#{}", spec.service.name.get_ref(), spec.slot);
    if let Err(e) = crate::signals::install_worker() {
        log::error!("worker {name}: cannot set up signals: {e}");
        return code::SETUP_ERROR;
    }
    let mut keep: Vec<i32> = spec
        .listeners
        .iter()
        .map(|(_, fd)| fd.as_raw_fd())
        .collect();
    keep.push(spec.ready.as_raw_fd());
    // The log target's file or socket, inherited from the master.
    crate::log::after_fork();
    keep.extend(crate::log::fds());
    if let Err(e) = sys::close_fds_except(&keep) {
        log::error!("worker {name}: close_range() failed: {e}");
        return code::SETUP_ERROR;
    }
    // The master's uid, which may own a plugin's library besides root.
    let master_uid = nix::unistd::Uid::current();
    // Before the parent-death signal is set: changing credentials clears it.
    // Before the plugin: it must never run with the master's privileges.
    if let Some(creds) = spec.credentials
        && let Err(reason) = sys::drop_privileges(&creds.user, creds.uid, creds.gid, &creds.groups)
    {
        return boot_failed(spec.ready, &reason);
    }
    match sys::exit_with_parent(spec.master) {
        Ok(true) => {}
        Ok(false) => return code::ORPHANED,
        Err(e) => {
            log::error!("worker {name}: prctl(PR_SET_PDEATHSIG) failed: {e}");
            return code::SETUP_ERROR;
        }
    }
    sys::set_title(&format!("preforkd: worker {name} gen {}", spec.generation));
    if let Some(b) = &spec.board {
        b.attach(std::process::id());
    }
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log::error!("handler panicked{at}: {msg}");
    }));

    let mode = spec.service.mode();
    let ctx = PluginContext::new(
        spec.service.name.get_ref().as_str(),
        &spec.service.handler.options,
        spec.service.graceful_timeout,
    )
    .with_trusted_uid(master_uid)
    .with_mode(mode);
    let handlers = match catch_unwind(AssertUnwindSafe(|| (spec.plugin.factory)(&ctx))) {
        Ok(Ok(h)) => h,
        Ok(Err(reason)) => return boot_failed(spec.ready, &reason),
        Err(_) => return boot_failed(spec.ready, "the plugin panicked while initialising"),
    };
    let mut sockets = Vec::new();
    for (addr, fd) in spec.listeners {
        let local = match &addr {
            ListenAddr::Tcp(a) | ListenAddr::Udp(a) => Addr::Inet(*a),
            ListenAddr::Unix(p) | ListenAddr::UnixGram(p) => Addr::Unix(Some(p.clone())),
            ListenAddr::Systemd(_) => unreachable!("workers get the bound address"),
        };
        sockets.push((WorkerSocket::new(&addr, fd), local));
    }
    if let Err(reason) = check_handlers(&handlers, &sockets, &spec.plugin.name, mode) {
        return boot_failed(spec.ready, &reason);
    }
    for (socket, _) in &sockets {
        if let Err(e) = socket.prepare_for_connections() {
            return boot_failed(spec.ready, &format!("cannot set socket options: {e}"));
        }
    }
    // Started before the worker reports ready: a worker whose stop could not
    // be bounded must not serve at all.
    let watchdog = Watchdog {
        name: name.clone(),
        master: spec.master,
        graceful: spec.service.graceful_timeout,
        board: spec.board,
        beat: heartbeat_interval(spec.service.timeout),
        // An event loop writes its own heartbeat: one that stops says the
        // loop is blocked, which a thread of its own would hide.
        beats: mode == WorkerMode::Threads,
    };
    if let Err(e) = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || watchdog.run())
    {
        return boot_failed(
            spec.ready,
            &format!("cannot start the watchdog thread: {e}"),
        );
    }
    // Tell the master we are ready; closing the pipe ends the message.
    let mut ready = std::fs::File::from(spec.ready);
    if ready.write_all(b"ready\n").is_err() {
        return code::ORPHANED;
    }
    drop(ready);
    if let Some(b) = &spec.board {
        b.set_state(State::Ready);
    }

    if mode == WorkerMode::Async {
        let failed = event::serve(event::Loop {
            name: &name,
            service: spec.service,
            sockets,
            handlers,
            board: spec.board,
        });
        return if failed {
            code::ACCEPT_FAILED
        } else {
            code::OK
        };
    }
    let budget = match spec.service.max_requests {
        0 => u64::MAX,
        n => n.saturating_add(fastrand::u64(0..=spec.service.max_requests_jitter)),
    };
    let worker = Worker {
        name: &name,
        service: spec.service.name.get_ref().as_str(),
        sockets,
        stream: handlers.stream,
        datagram: handlers.datagram,
        served: AtomicU64::new(0),
        board: spec.board,
        budget,
        failed: AtomicBool::new(false),
        acl: &spec.service.acl,
        per_ip: spec.service.max_connections_per_ip,
        proxy: spec.service.proxy.as_ref(),
        ip: (spec.service.max_connections_per_ip > 0)
            .then(|| spec.board.and_then(|b| b.ip_counter()))
            .flatten(),
        idle_timeout: spec.service.idle_timeout,
        refusals: Refusals::default(),
    };
    worker.serve(spec.service.threads);
    if worker.failed.load(Ordering::SeqCst) {
        // Not a clean exit: the master backs off instead of respawning at once.
        return code::ACCEPT_FAILED;
    }
    code::OK
}

fn boot_failed(ready: OwnedFd, reason: &str) -> i32 {
    let mut ready = std::fs::File::from(ready);
    let line = format!("error: {}\n", reason.replace('\n', " "));
    let _ = ready.write_all(line.as_bytes());
    code::BOOT_ERROR
}

/// A plugin must have built a handler for every kind of socket it listens on.
fn check_handlers(
    h: &Handlers,
    sockets: &[(WorkerSocket, Addr)],
    plugin: &str,
    mode: WorkerMode,
) -> Result<(), String> {
    for (s, _) in sockets {
        let stream = matches!(s, WorkerSocket::Tcp(_) | WorkerSocket::Unix(_));
        let has_stream = match mode {
            WorkerMode::Threads => h.stream.is_some(),
            WorkerMode::Async => h.has_async_stream(),
        };
        if stream && !has_stream {
            return Err(format!(
                "plugin {plugin:?} built no stream handler for mode = \"{mode}\""
            ));
        }
        let has_datagram = match mode {
            WorkerMode::Threads => h.datagram.is_some(),
            WorkerMode::Async => h.datagram.is_some() || h.async_datagram.is_some(),
        };
        if !stream && !has_datagram {
            return Err(format!("plugin {plugin:?} built no datagram handler"));
        }
    }
    Ok(())
}

/// Bounds a worker's stop, whoever asked for it (the master's SIGTERM, the
/// master's death, `max_requests`): a handler blocked on a client that
/// neither reads nor stops sending must not keep the process, and its copy
/// of the listeners, alive for ever.
struct Watchdog {
    name: String,
    master: Pid,
    graceful: Duration,
    /// The slot whose heartbeat it keeps.
    board: Option<Slot>,
    /// How often.
    beat: Duration,
    /// Whether this thread writes the heartbeat (threads mode; an event
    /// loop writes its own).
    beats: bool,
}

/// How often the watchdog thread writes the heartbeat: every second, or
/// four times per `timeout` when that is shorter, so that a live worker's
/// heartbeat is never `timeout` old.
fn heartbeat_interval(timeout: Duration) -> Duration {
    if timeout.is_zero() {
        return Duration::from_secs(1);
    }
    (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// How long a worker whose master is gone may finish its connections.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(1);
/// Past `graceful_timeout`, how long the worker leaves the master to kill it
/// (and log it) before it exits by itself.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(1);

impl Watchdog {
    /// The heartbeat: the thread runs as long as the process does, so a
    /// heartbeat that stops means the whole worker is not running (stopped,
    /// frozen, starved); a handler stuck on one connection shows in that
    /// connection's age instead (see src/master/health.rs).
    fn beat(&self) {
        if !self.beats {
            return;
        }
        if let Some(b) = &self.board {
            b.heartbeat(sys::coarse_ms());
        }
    }

    fn run(self) {
        let mut fds = [nix::poll::PollFd::new(
            sys::shutdown_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let every = nix::poll::PollTimeout::try_from(self.beat.as_millis() as i32)
            .unwrap_or(nix::poll::PollTimeout::MAX);
        while !sys::shutdown_requested() {
            self.beat();
            let _ = nix::poll::poll(&mut fds, every);
        }
        if let Some(b) = &self.board {
            b.set_state(State::Stopping);
        }
        let asked = Instant::now();
        let mut beaten = Instant::now();
        loop {
            if beaten.elapsed() >= self.beat {
                self.beat();
                beaten = Instant::now();
            }
            let orphan = nix::unistd::getppid() != self.master;
            let limit = if orphan {
                ORPHAN_GRACE
            } else {
                self.graceful + WATCHDOG_MARGIN
            };
            if asked.elapsed() >= limit {
                log::warn!(
                    "worker {}: connections still open {} after it was asked to stop{}; exiting",
                    self.name,
                    humantime::format_duration(Duration::from_millis(limit.as_millis() as u64)),
                    if orphan { " (master gone)" } else { "" }
                );
                sys::exit_now(code::STOP_TIMEOUT);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// State shared by a worker's accept threads.
struct Worker<'a> {
    name: &'a str,
    service: &'a str,
    sockets: Vec<(WorkerSocket, Addr)>,
    stream: Option<std::sync::Arc<dyn StreamHandler>>,
    datagram: Option<std::sync::Arc<dyn DatagramHandler>>,
    /// Connections and datagrams served, across threads.
    served: AtomicU64,
    /// Where `preforkd status` reads our counters.
    board: Option<Slot>,
    /// Stop after this many (`max_requests` + jitter); u64::MAX: never.
    budget: u64,
    /// An accept loop failed (epoll): the worker stops, and not cleanly.
    failed: AtomicBool,
    /// The service's `allow` and `deny`.
    acl: &'a Acl,
    /// `max_connections_per_ip` (0: no limit).
    per_ip: u32,
    /// `proxy_protocol` and `proxy_from`, if the service takes headers.
    proxy: Option<&'a Proxy>,
    /// This worker's per-address counts (with `max_connections_per_ip`).
    ip: Option<IpCounter>,
    /// `idle_timeout` (zero: none).
    idle_timeout: Duration,
    /// Refusals, logged at most once a second.
    refusals: Refusals,
}

/// Epoll token of the shutdown pipe.
const WAKE: u64 = u64::MAX;

impl Worker<'_> {
    /// Runs `threads` accept loops (this thread is one of them) until the
    /// worker is asked to stop, then waits for the connections in progress,
    /// at most `graceful` (the master kills us then anyway; this bound holds
    /// when the master is gone).
    fn serve(&self, threads: u32) {
        std::thread::scope(|scope| {
            for n in 1..threads {
                let spawned = std::thread::Builder::new()
                    .name(format!("accept-{n}"))
                    .spawn_scoped(scope, move || self.accept_loop(n as usize));
                if let Err(e) = spawned {
                    // Serving with fewer threads beats not serving; the
                    // log says so, and the next worker may do better.
                    log::error!(
                        "worker {}: cannot start accept thread {n} of {threads}: {e}",
                        self.name
                    );
                    break;
                }
            }
            self.accept_loop(0);
            // The scope joins the other accept threads; the watchdog bounds
            // how long that may take.
        });
    }

    /// One thread's loop: wait for a connection or datagram on any listener,
    /// serve it, repeat. The listeners are in this thread's epoll set only
    /// while it is idle, with EPOLLEXCLUSIVE: a new connection wakes one idle
    /// thread, never a busy one, and never every idle one.
    /// `thread` numbers the loop (0..threads): its connection entry in
    /// the scoreboard.
    fn accept_loop(&self, thread: usize) {
        if let Err(e) = self.try_accept_loop(thread) {
            log::error!("worker {}: accept loop failed: {e}; stopping", self.name);
            self.failed.store(true, Ordering::SeqCst);
            sys::request_shutdown();
        }
    }

    fn try_accept_loop(&self, thread: usize) -> io::Result<()> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        ep.add(
            sys::shutdown_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE),
        )?;
        let mut open: Vec<bool> = vec![true; self.sockets.len()];
        let mut registered = false;
        let mut events = [EpollEvent::empty(); 4];
        let mut buf = vec![0u8; 65536];
        let mut reply = Vec::new();
        while !sys::shutdown_requested() {
            if !registered {
                for (i, (s, _)) in self.sockets.iter().enumerate() {
                    if open[i] {
                        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
                        ep.add(s.as_fd(), EpollEvent::new(flags, i as u64))?;
                    }
                }
                registered = true;
            }
            let n = match ep.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            // Asked to stop (the wake-up may share this batch with a new
            // connection): leave the listeners to other workers.
            if sys::shutdown_requested() {
                break;
            }
            // One event per wake-up: after serving a connection the other
            // events are stale (and their listeners may be deregistered).
            let Some(ev) = events[..n].iter().find(|e| e.data() != WAKE) else {
                continue;
            };
            let i = ev.data() as usize;
            let (socket, local) = &self.sockets[i];
            match socket {
                WorkerSocket::Tcp(_) | WorkerSocket::Unix(_) => match accept(socket) {
                    Ok((stream, peer)) => {
                        // Busy from here on: leave the listeners to idle threads.
                        for (j, (s, _)) in self.sockets.iter().enumerate() {
                            if open[j] {
                                ep.delete(s.as_fd())?;
                            }
                        }
                        registered = false;
                        self.serve_stream(stream, peer, local.clone(), thread);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if is_listener_gone(&e) => {
                        // The master shut the listener down (daemon stop).
                        open[i] = false;
                        ep.delete(socket.as_fd())?;
                    }
                    Err(e) => {
                        note_accept_failure(self.name, &e);
                        if is_resource_limit(&e) {
                            // EMFILE, ENOBUFS: do not spin on a listener we
                            // cannot serve; other workers may.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                },
                WorkerSocket::Udp(_) | WorkerSocket::UnixGram(_) => {
                    self.serve_datagram(socket, &mut buf, &mut reply, thread);
                }
            }
        }
        if registered {
            for (i, (s, _)) in self.sockets.iter().enumerate() {
                if open[i] {
                    ep.delete(s.as_fd())?;
                }
            }
        }
        // A daemon stop sealed the stream listeners: what is queued is ours
        // to serve, every connection of it (idle or busy at the stop, every
        // thread takes its share).
        let mut sealed = vec![false; self.sockets.len()];
        for (i, (socket, local)) in self.sockets.iter().enumerate() {
            if open[i] && listener::is_sealed(socket) {
                sealed[i] = true;
                while let Some((stream, peer)) = accept_queued(self.name, socket) {
                    self.serve_stream(stream, peer, local.clone(), thread);
                }
            }
        }
        if registered {
            let open: Vec<bool> = (0..open.len()).map(|i| open[i] && !sealed[i]).collect();
            self.take_signalled(&open, &mut buf, &mut reply, thread);
        }
        Ok(())
    }

    /// Called by a thread that was idle when the stop came. With
    /// EPOLLEXCLUSIVE, a connection that arrived just before may have woken
    /// only this thread: no other waiter hears of it until the next
    /// arrival, so on a quiet service it would wait unanswered. So, once
    /// out of the wait queues, this thread serves what is pending right
    /// now (at most [`STOP_PICKUP`] per listener; a connection gets one
    /// request answered, see [`Connection::recv`]).
    fn take_signalled(&self, open: &[bool], buf: &mut [u8], reply: &mut Vec<u8>, thread: usize) {
        for (i, (socket, local)) in self.sockets.iter().enumerate() {
            for _ in 0..STOP_PICKUP {
                if !open[i] || !readable_now(socket) {
                    break;
                }
                match socket {
                    WorkerSocket::Tcp(_) | WorkerSocket::Unix(_) => match accept(socket) {
                        Ok((stream, peer)) => {
                            self.serve_stream(stream, peer, local.clone(), thread)
                        }
                        Err(_) => break, // taken by another worker, or gone
                    },
                    WorkerSocket::Udp(_) | WorkerSocket::UnixGram(_) => {
                        self.serve_datagram(socket, buf, reply, thread);
                    }
                }
            }
        }
    }

    /// Counts one request; asks the worker to stop when the budget is spent.
    fn count(&self) {
        if let Some(b) = &self.board {
            b.end();
        }
        if self.served.fetch_add(1, Ordering::Relaxed) + 1 >= self.budget {
            log::info!(
                "worker {}: served {} requests (max_requests); recycling",
                self.name,
                self.budget
            );
            sys::request_shutdown();
        }
    }

    /// Serves one accepted connection on accept thread `thread`: checks
    /// `allow`/`deny` and `max_connections_per_ip` (a refused connection is
    /// closed at once), publishes it in the scoreboard, runs the handler,
    /// closes.
    fn serve_stream(&self, stream: Stream, peer: Addr, local: Addr, thread: usize) {
        let Some(handler) = &self.stream else { return };
        // The PROXY header first: from then on its client is the peer.
        let (peer, local, proxy) = match self.proxy {
            None => (peer, local, None),
            Some(p) => match p
                .trusts(peer.ip())
                .and_then(|()| p.read_blocking(stream.as_fd()))
            {
                Ok(Some(h)) => {
                    let (client, front) = proxied_addrs(h);
                    (client, front, Some(peer))
                }
                Ok(None) => (peer, local, None),
                Err(cut) => {
                    self.refusals.refuse(self.name, self.board, &peer, &cut);
                    return;
                }
            },
        };
        let (who, seen) = identify(self.acl, self.name, stream.as_fd(), &peer);
        if let Err(why) = self.acl.check(&who) {
            self.refusals.refuse(self.name, self.board, &peer, &why);
            return;
        }
        let entry = self.board.and_then(|b| b.entry(thread));
        if let Some(e) = &entry {
            e.publish(sys::coarse_ms(), &seen);
        }
        let counted = match (who, &self.ip) {
            (acl::Peer::Ip(ip), Some(counter)) => Some((counter, ip)),
            _ => None,
        };
        if let Some((counter, ip)) = counted {
            let n = counter.enter(ip);
            if n > self.per_ip as usize {
                counter.leave(ip);
                if let Some(e) = &entry {
                    e.clear();
                }
                self.refusals.refuse(
                    self.name,
                    self.board,
                    &peer,
                    &format_args!(
                        "{n} connections from {ip} (max_connections_per_ip = {})",
                        self.per_ip
                    ),
                );
                return;
            }
        }
        if let Some(b) = &self.board {
            b.begin();
        }
        let peer_text = peer.to_string();
        let mut conn = Connection::new(stream, peer, local, self.service);
        conn.set_proxy_addr(proxy);
        conn.set_idle_timeout(self.idle_timeout);
        match catch_unwind(AssertUnwindSafe(|| handler.handle(&mut conn))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) if conn.idle_expired() => {
                log::debug!("worker {}: {peer_text}: closed: {e}", self.name);
            }
            Ok(Err(e)) if is_client_gone(&e) => {
                log::debug!("worker {}: {peer_text}: client went away: {e}", self.name);
            }
            Ok(Err(e)) => log::warn!("worker {}: {peer_text}: handler error: {e}", self.name),
            Err(_) => log::error!(
                "worker {}: {peer_text}: handler panicked; connection closed",
                self.name
            ),
        }
        let (bytes_in, bytes_out) = conn.bytes();
        conn.close_gracefully(LINGER);
        if let Some(e) = &entry {
            e.clear();
        }
        if let Some((counter, ip)) = counted {
            counter.leave(ip);
        }
        if let Some(b) = &self.board {
            b.add_bytes(bytes_in, bytes_out);
        }
        self.count();
    }

    fn serve_datagram(
        &self,
        socket: &WorkerSocket,
        buf: &mut [u8],
        reply: &mut Vec<u8>,
        thread: usize,
    ) {
        let Some(handler) = &self.datagram else {
            return;
        };
        let received = match socket {
            WorkerSocket::Udp(s) => s.recv_from(buf).map(|(n, a)| (n, Addr::Inet(a))),
            WorkerSocket::UnixGram(s) => s.recv_from(buf).map(|(n, a)| (n, Addr::from_unix(a))),
            _ => unreachable!("stream sockets are accepted, not read"),
        };
        let (n, peer) = match received {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log::warn!("worker {}: recvfrom() failed: {e}", self.name);
                return;
            }
        };
        let (who, seen) = datagram_peer(&peer);
        if !self.acl.is_empty()
            && let Err(why) = self.acl.check(&who)
        {
            self.refusals.refuse(self.name, self.board, &peer, &why);
            return;
        }
        let entry = self.board.and_then(|b| b.entry(thread));
        if let Some(e) = &entry {
            e.publish(sys::coarse_ms(), &seen);
        }
        reply.clear();
        if let Some(b) = &self.board {
            b.begin();
        }
        let mut bytes_out = 0;
        let datagram = Datagram {
            data: &buf[..n],
            peer: &peer,
            service: self.service,
        };
        match catch_unwind(AssertUnwindSafe(|| handler.handle(&datagram, reply))) {
            Ok(Ok(true)) => {
                let sent = match (socket, &peer) {
                    (WorkerSocket::Udp(s), Addr::Inet(a)) => s.send_to(reply, a).map(Some),
                    (WorkerSocket::UnixGram(s), Addr::Unix(Some(p))) => {
                        s.send_to(reply, p).map(Some)
                    }
                    _ => {
                        log::debug!("worker {}: {peer}: unnamed sender, no reply", self.name);
                        Ok(None)
                    }
                };
                match sent {
                    Ok(n) => bytes_out = n.unwrap_or(0) as u64,
                    Err(e) => log::debug!("worker {}: {peer}: sendto() failed: {e}", self.name),
                }
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => log::warn!("worker {}: {peer}: handler error: {e}", self.name),
            Err(_) => log::error!("worker {}: {peer}: handler panicked", self.name),
        }
        if let Some(e) = &entry {
            e.clear();
        }
        if let Some(b) = &self.board {
            b.add_bytes(n as u64, bytes_out);
        }
        self.count();
    }
}

/// Who a stream peer is, for the rules and for the scoreboard. A Unix
/// peer's credentials cost a getsockopt: read only when a rule needs them.
fn identify(acl: &Acl, name: &str, fd: BorrowedFd<'_>, peer: &Addr) -> (acl::Peer, Peer) {
    match peer {
        Addr::Inet(a) => (acl::Peer::Ip(a.ip().to_canonical()), Peer::inet(*a)),
        Addr::Unix(_) => {
            let cred = if acl.needs_credentials() {
                match nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)
                {
                    Ok(c) => Some(c),
                    Err(e) => {
                        log::warn!("worker {name}: getsockopt(SO_PEERCRED) failed: {e}");
                        None
                    }
                }
            } else {
                None
            };
            match cred {
                Some(c) => (
                    acl::Peer::Unix(Some((c.uid(), c.gid()))),
                    Peer::UnixCred {
                        pid: c.pid() as u32,
                        uid: c.uid(),
                        gid: c.gid(),
                    },
                ),
                None => (acl::Peer::Unix(None), Peer::Unix),
            }
        }
    }
}

/// Who a datagram's sender is, for the rules: a datagram carries no
/// credentials, so only "unix" and "all" can match a Unix sender.
fn datagram_peer(peer: &Addr) -> (acl::Peer, Peer) {
    match peer {
        Addr::Inet(a) => (acl::Peer::Ip(a.ip().to_canonical()), Peer::inet(*a)),
        Addr::Unix(_) => (acl::Peer::Unix(None), Peer::Unix),
    }
}

/// A worker's refused connections and datagrams: counted in the
/// scoreboard, logged at most once a second with the number left unlogged
/// since.
#[derive(Default)]
struct Refusals {
    /// When a refusal was last logged (coarse clock, ms).
    logged_ms: AtomicU64,
    /// Refusals not logged since.
    unlogged: AtomicU64,
}

impl Refusals {
    fn refuse(
        &self,
        name: &str,
        board: Option<Slot>,
        peer: &dyn std::fmt::Display,
        why: &dyn std::fmt::Display,
    ) {
        if let Some(b) = board {
            b.refused();
        }
        let now = sys::coarse_ms();
        let last = self.logged_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= 1000;
        if !due
            || self
                .logged_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let more = self.unlogged.swap(0, Ordering::Relaxed);
        let more = if more > 0 {
            format!(" ({more} more refused since the last such line)")
        } else {
            String::new()
        };
        log::warn!("worker {name}: refused {peer}: {why}{more}");
    }
}

/// Logs an accept() failure, at most one line a second for the whole
/// worker (every idle thread sees the same failure on the same listener).
fn note_accept_failure(name: &str, e: &io::Error) {
    if let Some(more) = ACCEPT_FAILURES.note(sys::coarse_ms()) {
        let since = if more > 0 {
            format!("; {more} more since the last report")
        } else {
            String::new()
        };
        log::warn!("worker {name}: accept() failed: {e}{since}");
    }
}

/// Most connections (datagrams) a stopping thread takes from one listener.
const STOP_PICKUP: usize = 4;

/// Whether a listener has a connection or datagram waiting.
fn readable_now(socket: &WorkerSocket) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        socket.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Accepts one connection, nonblocking and close-on-exec.
fn accept(socket: &WorkerSocket) -> io::Result<(Stream, Addr)> {
    match socket {
        WorkerSocket::Tcp(l) => {
            let (s, peer) = l.accept()?;
            let s = Stream::Tcp(s);
            s.prepare()?;
            Ok((s, Addr::Inet(peer)))
        }
        WorkerSocket::Unix(l) => {
            let (s, peer) = l.accept()?;
            let s = Stream::Unix(s);
            s.prepare()?;
            Ok((s, Addr::from_unix(peer)))
        }
        _ => unreachable!("datagram sockets are not accepted"),
    }
}

/// A PROXY protocol header's client and front, as the handler's
/// addresses.
pub(crate) fn proxied_addrs(h: crate::proxy::Proxied) -> (Addr, Addr) {
    match h {
        crate::proxy::Proxied::Inet { peer, local } => (Addr::Inet(peer), Addr::Inet(local)),
        crate::proxy::Proxied::Unix { peer, local } => (Addr::Unix(peer), Addr::Unix(local)),
    }
}

/// The next connection queued on a sealed stream listener, None once the
/// queue is empty (for good: nothing joins a sealed queue; a Unix listener
/// shut down for reading says EINVAL then). A failure that is not the
/// client's is logged and ends this thread's share of the drain.
pub(crate) fn accept_queued(name: &str, socket: &WorkerSocket) -> Option<(Stream, Addr)> {
    loop {
        match accept(socket) {
            Ok(conn) => return Some(conn),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || is_listener_gone(&e) => return None,
            // The client gave up while queued: the next one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR)) => {}
            Err(e) => {
                note_accept_failure(name, &e);
                return None;
            }
        }
    }
}

/// accept() failures of this worker, all threads together, for
/// [`RateLimit`].
static ACCEPT_FAILURES: RateLimit = RateLimit::new(1000);

/// A log line at most every `every_ms`, standing for the events since the
/// last one: out of descriptors, every idle thread fails in accept every
/// 100 ms, and a line each (220 a second) drowned the log.
struct RateLimit {
    every_ms: u64,
    /// When the last line was let through (coarse ms; 0: never).
    last: std::sync::atomic::AtomicU64,
    /// Events not reported since.
    suppressed: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    const fn new(every_ms: u64) -> RateLimit {
        RateLimit {
            every_ms,
            last: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Counts one event at `now_ms`; Some(events suppressed since the last
    /// line) when this one should be logged.
    fn note(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        let last = self.last.load(SeqCst);
        let due = last == 0 || now_ms.saturating_sub(last) >= self.every_ms;
        // One thread wins the turn; the others count.
        if due
            && self
                .last
                .compare_exchange(last, now_ms.max(1), SeqCst, SeqCst)
                .is_ok()
        {
            Some(self.suppressed.swap(0, SeqCst))
        } else {
            self.suppressed.fetch_add(1, SeqCst);
            None
        }
    }
}

/// EINVAL from accept(): the listener is no longer listening.
fn is_listener_gone(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

pub(super) fn is_resource_limit(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Resets and broken pipes are the client's doing, not a handler fault.
pub(super) fn is_client_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn a_rate_limit_lets_one_line_a_second_through_with_the_count() {
        let r = RateLimit::new(1000);
        assert_eq!(r.note(5_000), Some(0));
        assert_eq!(r.note(5_100), None);
        assert_eq!(r.note(5_900), None);
        assert_eq!(r.note(6_000), Some(2));
        assert_eq!(r.note(6_001), None);
        assert_eq!(r.note(9_000), Some(1));
    }
}
