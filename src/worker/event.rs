//! The event-driven worker (`mode = "async"`): one event loop, a tokio
//! current-thread runtime made here, after fork, serving up to
//! `worker_connections` connections at once (the tutorial's gevent server,
//! nginx's and gunicorn's async workers), fed by the accept gate
//! (`gate.rs`).
//!
//! Every promise of the threads mode holds: access rules and
//! `max_connections_per_ip` before the handler runs; `idle_timeout` per
//! connection (a timer on each wait for input); the stop closes each
//! connection at a request boundary ([`AsyncConnection::recv`]) with FIN
//! and drains it, never a reset. What changes is the meaning of `timeout`:
//! the loop writes the heartbeat itself, so a handler that blocks the loop
//! stops it, and the master (src/master/health.rs) kills the worker and
//! logs the connection that was running, which the loop records before
//! each poll of a connection.
//!
//! `preforkd status` shows the worker's connection count and its oldest
//! connections: the loop keeps its [`ENTRIES`] scoreboard entries for the
//! oldest connections still open.
//!
//! Owns: the runtime and everything on it: the connections, the datagram
//! sockets (received and answered on the loop, each datagram handled at
//! once: a datagram handler must not block), the handler objects, the
//! buffer pool and the stop.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::gate::{Capacity, Gate, Gated, Handoff};
use super::{LINGER, Refusals, datagram_peer, identify, is_client_gone};
use crate::acl;
use crate::config::ServiceConfig;
use crate::handler::{
    Addr, AsyncConnection, AsyncStream, Datagram, DatagramHandler, DynAsyncDatagram,
    DynAsyncStream, Handlers, Pool, Shared, Stop, Stream,
};
use crate::listener::WorkerSocket;
use crate::scoreboard::{IpCounter, Peer, Slot};
use crate::sys;

/// Scoreboard entries an event-driven worker claims: its oldest
/// connections, for `preforkd status` (not one per connection).
pub const ENTRIES: usize = 8;

/// What the loop is given.
pub(crate) struct Loop<'a> {
    pub name: &'a str,
    pub service: &'a ServiceConfig,
    pub sockets: Vec<(WorkerSocket, Addr)>,
    pub handlers: Handlers,
    pub board: Option<Slot>,
}

/// Serves until the worker stops; true when it stopped because something
/// failed (the gate's epoll, the runtime).
pub(crate) fn serve(spec: Loop<'_>) -> bool {
    let name = spec.name.to_string();
    let limit = spec.service.worker_connections as usize;
    let capacity = match Capacity::new(limit, super::heartbeat_interval(spec.service.timeout)) {
        Ok(c) => c,
        Err(e) => {
            log::error!("worker {name}: eventfd() failed: {e}");
            return true;
        }
    };
    let mut locals = Vec::new();
    let mut streams = Vec::new();
    let mut datagrams = Vec::new();
    for (i, (socket, local)) in spec.sockets.into_iter().enumerate() {
        locals.push(local.clone());
        match socket {
            WorkerSocket::Tcp(_) | WorkerSocket::Unix(_) => streams.push((i, socket)),
            WorkerSocket::Udp(_) | WorkerSocket::UnixGram(_) => datagrams.push((socket, local)),
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let gate = Gate {
        name: name.clone(),
        listeners: streams,
        tx,
        capacity: capacity.clone(),
        board: spec.board,
    };
    let gate = match std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || gate.run())
    {
        Ok(g) => g,
        Err(e) => {
            log::error!("worker {name}: cannot start the accept thread: {e}");
            return true;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            log::error!("worker {name}: cannot start the event loop: {e}");
            sys::request_shutdown();
            let _ = gate.join();
            return true;
        }
    };
    let svc = spec.service;
    let ip = (svc.max_connections_per_ip > 0)
        .then(|| spec.board.and_then(|b| b.ip_counter()))
        .flatten();
    let ctx = Rc::new(Ctx {
        shared: Rc::new(Shared {
            pool: Rc::new(Pool::default()),
            stop: Rc::new(Stop::default()),
            service: svc.name.get_ref().as_str().into(),
            idle_timeout: svc.idle_timeout,
            locals,
        }),
        name,
        stream: spec.handlers.async_stream,
        datagram: spec.handlers.datagram,
        async_datagram: spec.handlers.async_datagram,
        board: spec.board,
        acl: svc.acl.clone(),
        per_ip: svc.max_connections_per_ip,
        proxy: svc.proxy.clone(),
        ip,
        capacity,
        refusals: Refusals::default(),
        live: Cell::new(0),
        drained: RefCell::new(None),
        oldest: RefCell::new(Oldest::new(spec.board)),
        beat: super::heartbeat_interval(svc.timeout),
    });
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, run(ctx.clone(), rx, datagrams));
    drop(local);
    drop(runtime);
    match gate.join() {
        Ok(Ok(())) => false,
        Ok(Err(e)) => {
            log::error!("worker {}: accept thread failed: {e}; stopped", ctx.name);
            true
        }
        Err(_) => {
            log::error!("worker {}: accept thread panicked", ctx.name);
            true
        }
    }
}

/// The loop's state, shared by its tasks.
struct Ctx {
    name: String,
    shared: Rc<Shared>,
    stream: Option<Rc<dyn DynAsyncStream>>,
    datagram: Option<Arc<dyn DatagramHandler>>,
    async_datagram: Option<Rc<dyn DynAsyncDatagram>>,
    board: Option<Slot>,
    acl: acl::Acl,
    per_ip: u32,
    /// `proxy_protocol` and `proxy_from`, if the service takes headers.
    proxy: Option<crate::proxy::Proxy>,
    /// This worker's per-address counts (with `max_connections_per_ip`).
    ip: Option<IpCounter>,
    capacity: Arc<Capacity>,
    refusals: Refusals,
    /// Connection tasks running, and who waits for them to end.
    live: Cell<usize>,
    drained: RefCell<Option<Waker>>,
    oldest: RefCell<Oldest>,
    /// How often the heartbeat is written.
    beat: Duration,
}

/// The loop: the heartbeat, the datagram sockets, a task per handed-over
/// connection until the gate stops (the stop is set when the gate says so,
/// before it hands over what was still queued), then the wait for the
/// connections to finish.
async fn run(
    ctx: Rc<Ctx>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Gated>,
    datagrams: Vec<(WorkerSocket, Addr)>,
) {
    tokio::task::spawn_local(heartbeat(ctx.board, ctx.capacity.clone(), ctx.beat));
    let mut receivers = Vec::new();
    for (socket, _) in datagrams {
        match DatagramSocket::new(socket) {
            Ok(s) => receivers.push(tokio::task::spawn_local(datagram_loop(ctx.clone(), s))),
            Err(e) => log::error!("worker {}: cannot watch a datagram socket: {e}", ctx.name),
        }
    }
    while let Some(gated) = rx.recv().await {
        match gated {
            Gated::Conn(handoff) => {
                let ended = Ended::new(&ctx, true);
                tokio::task::spawn_local(connection(ended, handoff));
            }
            Gated::Stopping => ctx.shared.stop.set(),
        }
    }
    ctx.shared.stop.set();
    std::future::poll_fn(|cx| {
        if ctx.live.get() == 0 {
            return Poll::Ready(());
        }
        *ctx.drained.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    })
    .await;
    for r in receivers {
        let _ = r.await;
    }
}

/// Writes the heartbeat every `beat` while the loop turns: in the
/// scoreboard (for the master's `timeout` check) and for the accept gate,
/// which leaves the queues to the other workers while the loop is blocked.
async fn heartbeat(board: Option<Slot>, capacity: Arc<Capacity>, beat: Duration) {
    let mut every = tokio::time::interval(beat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        let now = sys::coarse_ms();
        capacity.turned(now);
        if let Some(b) = board {
            b.heartbeat(now);
        }
    }
}

/// What a task of the loop (a connection, a datagram's answer) gives back
/// when it ends, whatever the way out.
struct Ended {
    ctx: Rc<Ctx>,
    /// Its address in this worker's per-address counts.
    counted: Option<std::net::IpAddr>,
    /// Whether it holds one of `worker_connections` (a connection the
    /// gate counted).
    capacity: bool,
}

impl Ended {
    /// A task begins: the loop waits for it before the worker exits.
    fn new(ctx: &Rc<Ctx>, capacity: bool) -> Ended {
        ctx.live.set(ctx.live.get() + 1);
        Ended {
            ctx: ctx.clone(),
            counted: None,
            capacity,
        }
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        if let (Some(ip), Some(counter)) = (self.counted, &self.ctx.ip) {
            counter.leave(ip);
        }
        if self.capacity {
            self.ctx.capacity.release();
        }
        let live = self.ctx.live.get() - 1;
        self.ctx.live.set(live);
        if live == 0
            && let Some(w) = self.ctx.drained.borrow_mut().take()
        {
            w.wake();
        }
    }
}

/// One connection: the access rules, the handler, the clean close. What
/// lives across the handler's wait is kept small (the setup is a plain
/// function, the close boxed): it is what an idle connection costs.
async fn connection(mut ended: Ended, mut handoff: Handoff) {
    // The PROXY header first: from then on its client is the peer.
    let mut proxied = None;
    if let Some(p) = &ended.ctx.proxy {
        let ctx = &ended.ctx;
        let read = match p.trusts(handoff.peer.ip()) {
            // Boxed: only connections of such services carry it.
            Ok(()) => Box::pin(p.read_async(handoff.stream.as_fd())).await,
            Err(cut) => Err(cut),
        };
        match read {
            Ok(Some(h)) => {
                let (client, front) = super::proxied_addrs(h);
                proxied = Some((front, std::mem::replace(&mut handoff.peer, client)));
            }
            Ok(None) => {}
            Err(cut) => {
                ctx.refusals
                    .refuse(&ctx.name, ctx.board, &handoff.peer, &cut);
                return;
            }
        }
    }
    let Some((mut conn, handler, running, seq)) = admit(&mut ended, handoff) else {
        return;
    };
    if let Some((local, proxy)) = proxied {
        conn.set_proxied(local, proxy);
    }
    let outcome = Guarded {
        future: handler.handle_boxed(&mut conn),
        board: &ended.ctx.board,
        running,
    }
    .await;
    let ctx = &ended.ctx;
    let peer = conn.peer_addr();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) if conn.idle_expired() => {
            log::debug!("worker {}: {peer}: closed: {e}", ctx.name);
        }
        Ok(Err(e)) if is_client_gone(&e) => {
            log::debug!("worker {}: {peer}: client went away: {e}", ctx.name);
        }
        Ok(Err(e)) => log::warn!("worker {}: {peer}: handler error: {e}", ctx.name),
        Err(()) => log::error!(
            "worker {}: {peer}: handler panicked; connection closed",
            ctx.name
        ),
    }
    let (bytes_in, bytes_out) = conn.bytes();
    Box::pin(conn.close_gracefully(LINGER)).await;
    ctx.oldest.borrow_mut().close(seq);
    if let Some(b) = ctx.board {
        b.add_bytes(bytes_in, bytes_out);
        b.end();
    }
}

/// An admitted connection: the connection, its handler, what the
/// scoreboard shows while it runs (start, peer), and its place among the
/// oldest.
type Admitted = (AsyncConnection, Rc<dyn DynAsyncStream>, (u64, Peer), u64);

/// Checks a new connection against `allow`/`deny` and
/// `max_connections_per_ip` (a refused one is closed at once), registers
/// it with the loop and publishes it: the connection, its handler, what
/// the scoreboard shows while it runs, and its place among the oldest.
fn admit(ended: &mut Ended, handoff: Handoff) -> Option<Admitted> {
    let ctx = &ended.ctx;
    let Handoff {
        stream,
        peer,
        listener,
    } = handoff;
    let handler = ctx.stream.clone()?;
    let (who, seen) = identify(&ctx.acl, &ctx.name, stream.as_fd(), &peer);
    if let Err(why) = ctx.acl.check(&who) {
        ctx.refusals.refuse(&ctx.name, ctx.board, &peer, &why);
        return None;
    }
    if let (acl::Peer::Ip(ip), Some(counter)) = (who, &ctx.ip) {
        ended.counted = Some(ip);
        let n = counter.enter(ip);
        if n > ctx.per_ip as usize {
            ctx.refusals.refuse(
                &ctx.name,
                ctx.board,
                &peer,
                &format_args!(
                    "{n} connections from {ip} (max_connections_per_ip = {})",
                    ctx.per_ip
                ),
            );
            return None;
        }
    }
    let stream = match to_async(stream) {
        Ok(s) => s,
        Err(e) => {
            log::warn!(
                "worker {}: {peer}: cannot watch the connection: {e}",
                ctx.name
            );
            return None;
        }
    };
    if let Some(b) = ctx.board {
        b.begin();
    }
    let start = sys::coarse_ms();
    let seq = ctx.oldest.borrow_mut().open(start, seen);
    let conn = AsyncConnection::new(stream, peer, listener as u32, ctx.shared.clone());
    Some((conn, handler, (start, seen), seq))
}

/// A connection's socket, registered with the loop.
fn to_async(stream: Stream) -> io::Result<AsyncStream> {
    Ok(match stream {
        Stream::Tcp(s) => AsyncStream::Tcp(tokio::net::TcpStream::from_std(s)?),
        Stream::Unix(s) => AsyncStream::Unix(tokio::net::UnixStream::from_std(s)?),
    })
}

/// A handler's future, polled with its connection marked as running in
/// the scoreboard (what the heartbeat check names when the loop stops
/// turning), and with a panic turned into `Err(())` (the connection is
/// closed; the loop goes on).
struct Guarded<'a, T> {
    future: Pin<Box<dyn Future<Output = io::Result<T>> + 'a>>,
    board: &'a Option<Slot>,
    running: (u64, Peer),
}

/// The same for a datagram's answer.
type GuardedDatagram<'a> = Guarded<'a, bool>;

impl<T> Future for Guarded<'_, T> {
    type Output = Result<io::Result<T>, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(b) = this.board {
            b.set_running(Some((this.running.0, &this.running.1)));
        }
        let polled = catch_unwind(AssertUnwindSafe(|| this.future.as_mut().poll(cx)));
        if let Some(b) = this.board {
            b.set_running(None);
        }
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(r)) => Poll::Ready(Ok(r)),
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

/// The scoreboard entries of the oldest connections still open: each
/// connection that ends gives its entry to the oldest one without.
struct Oldest {
    board: Option<Slot>,
    /// Entries free to publish into.
    free: Vec<usize>,
    /// Open connections by arrival, with the entry each holds (only kept
    /// when the worker has entries).
    open: BTreeMap<u64, (u64, Peer, Option<usize>)>,
    next: u64,
}

impl Oldest {
    fn new(board: Option<Slot>) -> Oldest {
        let free: Vec<usize> = board
            .map(|b| {
                (0..ENTRIES)
                    .rev()
                    .filter(|&k| b.entry(k).is_some())
                    .collect()
            })
            .unwrap_or_default();
        Oldest {
            board,
            free,
            open: BTreeMap::new(),
            next: 0,
        }
    }

    fn publish(&self, k: usize, start: u64, peer: &Peer) {
        if let Some(e) = self.board.and_then(|b| b.entry(k)) {
            e.publish(start, peer);
        }
    }

    fn open(&mut self, start: u64, peer: Peer) -> u64 {
        let seq = self.next;
        self.next += 1;
        if self.board.is_none() {
            return seq; // nothing to show
        }
        let entry = self.free.pop();
        if let Some(k) = entry {
            self.publish(k, start, &peer);
        }
        self.open.insert(seq, (start, peer, entry));
        seq
    }

    fn close(&mut self, seq: u64) {
        let Some((_, _, entry)) = self.open.remove(&seq) else {
            return;
        };
        let Some(k) = entry else { return };
        let next =
            self.open
                .iter_mut()
                .find(|(_, (_, _, e))| e.is_none())
                .map(|(_, (start, peer, e))| {
                    *e = Some(k);
                    (*start, *peer)
                });
        match next {
            Some((start, peer)) => self.publish(k, start, &peer),
            None => {
                if let Some(e) = self.board.and_then(|b| b.entry(k)) {
                    e.clear();
                }
                self.free.push(k);
            }
        }
    }
}

/// A datagram socket, registered with the loop.
enum DatagramSocket {
    Udp(tokio::net::UdpSocket),
    Unix(tokio::net::UnixDatagram),
}

impl DatagramSocket {
    fn new(socket: WorkerSocket) -> io::Result<DatagramSocket> {
        Ok(match socket {
            WorkerSocket::Udp(s) => DatagramSocket::Udp(tokio::net::UdpSocket::from_std(s)?),
            WorkerSocket::UnixGram(s) => {
                DatagramSocket::Unix(tokio::net::UnixDatagram::from_std(s)?)
            }
            _ => {
                return Err(io::Error::other(
                    "a stream listener is not a datagram socket",
                ));
            }
        })
    }

    fn poll_recv_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            DatagramSocket::Udp(s) => s.poll_recv_ready(cx),
            DatagramSocket::Unix(s) => s.poll_recv_ready(cx),
        }
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, Addr)> {
        match self {
            DatagramSocket::Udp(s) => s.try_recv_from(buf).map(|(n, a)| (n, Addr::Inet(a))),
            DatagramSocket::Unix(s) => s
                .try_recv_from(buf)
                .map(|(n, a)| (n, Addr::Unix(a.as_pathname().map(Into::into)))),
        }
    }

    fn try_send_to(&self, buf: &[u8], peer: &Addr) -> io::Result<Option<usize>> {
        match (self, peer) {
            (DatagramSocket::Udp(s), Addr::Inet(a)) => s.try_send_to(buf, *a).map(Some),
            (DatagramSocket::Unix(s), Addr::Unix(Some(p))) => s.try_send_to(buf, p).map(Some),
            _ => Ok(None),
        }
    }
}

/// Most datagrams answered in one turn before the loop serves others.
const DATAGRAM_BATCH: usize = 64;

/// Receives and answers datagrams on one socket until the worker stops:
/// each on the loop at once, or, with an async datagram handler, each in
/// a task of its own, at most `worker_connections` at once.
async fn datagram_loop(ctx: Rc<Ctx>, socket: DatagramSocket) {
    let socket = Rc::new(socket);
    let slots = Arc::new(tokio::sync::Semaphore::new(ctx.capacity.limit.max(1)));
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::new();
    let mut key = None;
    loop {
        let stop = &ctx.shared.stop;
        let ready = std::future::poll_fn(|cx| {
            if stop.is_set() {
                return Poll::Ready(false);
            }
            match socket.poll_recv_ready(cx) {
                Poll::Ready(_) => Poll::Ready(true),
                Poll::Pending => {
                    stop.register(&mut key, cx.waker());
                    Poll::Pending
                }
            }
        })
        .await;
        if !ready {
            return;
        }
        for _ in 0..DATAGRAM_BATCH {
            // A free task slot before the datagram is taken off the socket.
            let permit = match &ctx.async_datagram {
                Some(_) => match slots.clone().acquire_owned().await {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
                None => None,
            };
            let (n, peer) = match socket.try_recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("worker {}: recvfrom() failed: {e}", ctx.name);
                    break;
                }
            };
            match (&ctx.async_datagram, &ctx.datagram) {
                (Some(h), _) => {
                    let task = answer_later(
                        Ended::new(&ctx, false),
                        h.clone(),
                        socket.clone(),
                        buf[..n].to_vec(),
                        peer,
                        permit,
                    );
                    tokio::task::spawn_local(task);
                }
                (None, Some(h)) => answer(&ctx, &**h, &socket, &buf[..n], &peer, &mut reply),
                (None, None) => {}
            }
        }
        tokio::task::yield_now().await;
    }
}

/// Handles one datagram in a task of its own (an async datagram handler).
async fn answer_later(
    ended: Ended,
    handler: Rc<dyn DynAsyncDatagram>,
    socket: Rc<DatagramSocket>,
    data: Vec<u8>,
    peer: Addr,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let ctx = &ended.ctx;
    let (who, seen) = datagram_peer(&peer);
    if !ctx.acl.is_empty()
        && let Err(why) = ctx.acl.check(&who)
    {
        ctx.refusals.refuse(&ctx.name, ctx.board, &peer, &why);
        return;
    }
    if let Some(b) = ctx.board {
        b.begin();
    }
    let mut reply = Vec::new();
    let datagram = Datagram {
        data: &data,
        peer: &peer,
        service: &ctx.shared.service,
    };
    let outcome = GuardedDatagram {
        future: handler.handle_boxed(&datagram, &mut reply),
        board: &ctx.board,
        running: (sys::coarse_ms(), seen),
    }
    .await;
    let mut bytes_out = 0;
    match outcome {
        Ok(Ok(true)) => match socket.try_send_to(&reply, &peer) {
            Ok(Some(n)) => bytes_out = n as u64,
            Ok(None) => log::debug!("worker {}: {peer}: unnamed sender, no reply", ctx.name),
            Err(e) => log::debug!("worker {}: {peer}: sendto() failed: {e}", ctx.name),
        },
        Ok(Ok(false)) => {}
        Ok(Err(e)) => log::warn!("worker {}: {peer}: handler error: {e}", ctx.name),
        Err(()) => log::error!("worker {}: {peer}: handler panicked", ctx.name),
    }
    if let Some(b) = ctx.board {
        b.add_bytes(data.len() as u64, bytes_out);
        b.end();
    }
}

/// Handles one datagram on the loop, as the threads mode does.
fn answer(
    ctx: &Ctx,
    handler: &dyn DatagramHandler,
    socket: &DatagramSocket,
    data: &[u8],
    peer: &Addr,
    reply: &mut Vec<u8>,
) {
    let (who, seen) = datagram_peer(peer);
    if !ctx.acl.is_empty()
        && let Err(why) = ctx.acl.check(&who)
    {
        ctx.refusals.refuse(&ctx.name, ctx.board, peer, &why);
        return;
    }
    if let Some(b) = ctx.board {
        b.begin();
        b.set_running(Some((sys::coarse_ms(), &seen)));
    }
    reply.clear();
    let datagram = Datagram {
        data,
        peer,
        service: &ctx.shared.service,
    };
    let mut bytes_out = 0;
    match catch_unwind(AssertUnwindSafe(|| handler.handle(&datagram, reply))) {
        Ok(Ok(true)) => match socket.try_send_to(reply, peer) {
            Ok(Some(n)) => bytes_out = n as u64,
            Ok(None) => log::debug!("worker {}: {peer}: unnamed sender, no reply", ctx.name),
            Err(e) => log::debug!("worker {}: {peer}: sendto() failed: {e}", ctx.name),
        },
        Ok(Ok(false)) => {}
        Ok(Err(e)) => log::warn!("worker {}: {peer}: handler error: {e}", ctx.name),
        Err(_) => log::error!("worker {}: {peer}: handler panicked", ctx.name),
    }
    if let Some(b) = ctx.board {
        b.set_running(None);
        b.add_bytes(data.len() as u64, bytes_out);
        b.end();
    }
}
