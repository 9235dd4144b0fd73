//! The connection an [`AsyncStreamHandler`](super::AsyncStreamHandler) is
//! given in a `mode = "async"` worker: [`AsyncConnection`], whose reads
//! stop at request boundaries once the worker is asked to stop, as
//! [`Connection`](super::Connection)'s do, on a worker's one event loop.
//!
//! An idle connection holds no buffer: [`AsyncConnection::recv`] waits for
//! the socket to be readable, then reads into a buffer lent by the worker
//! ([`Chunk`], from the loop's [`Pool`]) that goes back when the handler
//! drops it, as nginx reads into a buffer only once an event says there is
//! something to read. Only the few bytes that follow a line read by
//! [`AsyncConnection::recv_line`] stay with the connection.
//!
//! Owns: each connection's socket (closed when it is dropped), its
//! read-ahead of a partial line, its byte counts and its place in the
//! worker's list of connections to wake when the stop comes. The loop's
//! shared parts ([`Pool`], [`Stop`]) belong to the worker that made them.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use super::{Addr, IO_TICK, Recv, Sent};

/// Bytes in one buffer of the worker's pool: the most one read takes.
pub const CHUNK: usize = 16 * 1024;
/// Buffers a pool keeps for reuse; more in use at once are freed when
/// given back.
const POOL_KEEP: usize = 8;

/// The buffers a worker's connections read into, lent one read at a time.
#[derive(Default)]
pub struct Pool {
    free: RefCell<Vec<Box<[u8]>>>,
}

impl Pool {
    fn take(self: &Rc<Pool>) -> Chunk {
        let buf = self
            .free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; CHUNK].into_boxed_slice());
        Chunk {
            buf: Some(buf),
            len: 0,
            pool: self.clone(),
        }
    }
}

/// What one read brought: bytes in a buffer lent by the worker, given
/// back when this is dropped (keep it no longer than the answer takes).
pub struct Chunk {
    buf: Option<Box<[u8]>>,
    len: usize,
    pool: Rc<Pool>,
}

impl Chunk {
    fn space(&mut self) -> &mut [u8] {
        self.buf
            .as_deref_mut()
            .expect("a chunk has its buffer until dropped")
    }
}

impl std::ops::Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self
            .buf
            .as_deref()
            .expect("a chunk has its buffer until dropped")[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut free = self.pool.free.borrow_mut();
            if free.len() < POOL_KEEP {
                free.push(buf);
            }
        }
    }
}

/// The worker's stop, as its connections wait for it: a flag, and the
/// wakers of the connections waiting for input, woken once when the flag
/// is set. One per worker; single-threaded (the loop's thread).
#[derive(Default)]
pub struct Stop {
    stopped: Cell<bool>,
    /// Waker of each connection that has waited for input (by key; None:
    /// a free key).
    waiting: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl Stop {
    /// Whether the worker has been asked to stop.
    pub fn is_set(&self) -> bool {
        self.stopped.get()
    }

    /// Sets the flag and wakes every connection that waits for input.
    pub fn set(&self) {
        self.stopped.set(true);
        let wakers: Vec<Waker> = self
            .waiting
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Keeps `waker` under `key` (taking a key the first time).
    pub fn register(&self, key: &mut Option<usize>, waker: &Waker) {
        let mut waiting = self.waiting.borrow_mut();
        let k = match *key {
            Some(k) => k,
            None => {
                let k = self.free.borrow_mut().pop().unwrap_or_else(|| {
                    waiting.push(None);
                    waiting.len() - 1
                });
                *key = Some(k);
                k
            }
        };
        match &mut waiting[k] {
            Some(w) if w.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
    }

    fn forget(&self, key: usize) {
        if let Some(slot) = self.waiting.borrow_mut().get_mut(key) {
            *slot = None;
            self.free.borrow_mut().push(key);
        }
    }
}

/// What a worker's connections share: the buffers, the stop, the service.
pub struct Shared {
    /// The buffers reads are lent.
    pub pool: Rc<Pool>,
    /// The worker's stop.
    pub stop: Rc<Stop>,
    /// The service's name.
    pub service: Rc<str>,
    /// `idle_timeout` (zero: none).
    pub idle_timeout: Duration,
    /// The address of each listener, by index (a connection keeps its
    /// listener's index, not a copy).
    pub locals: Vec<Addr>,
}

/// A connected stream socket on the loop.
pub(crate) enum AsyncStream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsyncStream {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            AsyncStream::Tcp(s) => s.try_read(buf),
            AsyncStream::Unix(s) => s.try_read(buf),
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            AsyncStream::Tcp(s) => s.try_write(buf),
            AsyncStream::Unix(s) => s.try_write(buf),
        }
    }

    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        match self {
            AsyncStream::Tcp(s) => s.poll_read_ready(cx),
            AsyncStream::Unix(s) => s.poll_read_ready(cx),
        }
    }

    /// Whether the socket can take output (the waker kept in the
    /// registration itself: no waiter node in the future, which keeps an
    /// idle connection's future small).
    fn poll_write_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        match self {
            AsyncStream::Tcp(s) => s.poll_write_ready(cx),
            AsyncStream::Unix(s) => s.poll_write_ready(cx),
        }
    }

    async fn writable(&self) -> io::Result<()> {
        poll_fn(|cx| self.poll_write_ready(cx)).await
    }

    fn shutdown_write(&self) -> io::Result<()> {
        socket2::SockRef::from(self).shutdown(std::net::Shutdown::Write)
    }
}

impl AsFd for AsyncStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            AsyncStream::Tcp(s) => s.as_fd(),
            AsyncStream::Unix(s) => s.as_fd(),
        }
    }
}

/// What woke a wait for input.
enum Woke {
    Readable,
    Stopped,
}

/// One accepted stream connection of an event-driven worker, as a handler
/// sees it: the async twin of [`Connection`](super::Connection), with the
/// same request-boundary rule.
pub struct AsyncConnection {
    pub(crate) stream: AsyncStream,
    peer: Addr,
    /// Its listener, in `shared.locals`.
    local: u32,
    shared: Rc<Shared>,
    /// Key in the stop's list of waiting connections, once it has waited.
    stop_key: Option<usize>,
    /// The client closed its side.
    pub(crate) eof: bool,
    /// The client has sent something.
    received: bool,
    /// Bytes that followed a line `recv_line` returned, for the next read
    /// (empty, and not allocated, for most connections).
    inbuf: Vec<u8>,
    bytes_in: u64,
    bytes_out: u64,
    idle_expired: bool,
    /// With a PROXY protocol header: (its destination, the socket's own
    /// peer). Boxed: most connections have none, and an idle one costs
    /// what this struct weighs.
    proxied: Option<Box<(Addr, Addr)>>,
}

impl AsyncConnection {
    /// A PROXY protocol header's destination and the proxy that sent it
    /// (the peer is already the header's client).
    pub(crate) fn set_proxied(&mut self, local: Addr, proxy: Addr) {
        self.proxied = Some(Box::new((local, proxy)));
    }

    pub(crate) fn new(stream: AsyncStream, peer: Addr, local: u32, shared: Rc<Shared>) -> Self {
        AsyncConnection {
            stream,
            peer,
            local,
            shared,
            stop_key: None,
            eof: false,
            received: false,
            inbuf: Vec::new(),
            bytes_in: 0,
            bytes_out: 0,
            idle_expired: false,
            proxied: None,
        }
    }

    /// The client's address: with `proxy_protocol`, the one its proxy's
    /// header gave.
    pub fn peer_addr(&self) -> &Addr {
        &self.peer
    }

    /// With `proxy_protocol`, the address of the proxy that sent the
    /// header (the socket's own peer); None without a header, or when it
    /// kept the socket's addresses (a balancer's `LOCAL` health check).
    pub fn proxy_addr(&self) -> Option<&Addr> {
        self.proxied.as_ref().map(|p| &p.1)
    }

    /// The address the client connected to: with `proxy_protocol`, the
    /// header's destination (the load balancer's front).
    pub fn local_addr(&self) -> &Addr {
        static UNKNOWN: Addr = Addr::Unix(None);
        if let Some(p) = &self.proxied {
            return &p.0;
        }
        self.shared
            .locals
            .get(self.local as usize)
            .unwrap_or(&UNKNOWN)
    }

    /// The service this connection belongs to.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// True once the worker has been asked to stop.
    pub fn shutting_down(&self) -> bool {
        self.shared.stop.is_set()
    }

    /// Completes once the worker has been asked to stop (at once if it
    /// has been), woken by the stop itself: for a handler that waits on
    /// something other than its client, such as exec's program. Takes
    /// `&self`, so that the handler can hold its socket meanwhile.
    pub async fn stopped(&self) {
        /// Its own place in the stop's list, given back when done.
        struct Waiting<'a>(&'a Stop, Option<usize>);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if let Some(k) = self.1.take() {
                    self.0.forget(k);
                }
            }
        }
        let mut waiting = Waiting(&self.shared.stop, None);
        poll_fn(|cx| {
            if waiting.0.is_set() {
                return Poll::Ready(());
            }
            waiting.0.register(&mut waiting.1, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Bytes read from and written to the client so far.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.bytes_in, self.bytes_out)
    }

    /// Replaces the byte counts (exec's program moved the bytes itself).
    pub(crate) fn set_bytes(&mut self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in = bytes_in;
        self.bytes_out = bytes_out;
    }

    /// Whether a read gave up after `idle_timeout` without input.
    pub(crate) fn idle_expired(&self) -> bool {
        self.idle_expired
    }

    fn idle_error(&mut self) -> io::Error {
        self.idle_expired = true;
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no input for {} (idle_timeout)",
                humantime::format_duration(self.shared.idle_timeout)
            ),
        )
    }

    /// Waits until the socket is readable, or (when `stop_aware`) the
    /// worker stops; at most `idle_timeout`, or, for a connection's first
    /// request after the stop (`first_tick`), one [`IO_TICK`] (then it
    /// counts as stopped).
    async fn wait_input(&mut self, stop_aware: bool, first_tick: bool) -> io::Result<Woke> {
        let stop = self.shared.stop.clone();
        let stream = &self.stream;
        let key = &mut self.stop_key;
        let wait = poll_fn(|cx| {
            if stop_aware && stop.is_set() {
                return Poll::Ready(Ok(Woke::Stopped));
            }
            match stream.poll_read_ready(cx) {
                Poll::Ready(r) => Poll::Ready(r.map(|()| Woke::Readable)),
                Poll::Pending => {
                    if stop_aware {
                        stop.register(key, cx.waker());
                    }
                    Poll::Pending
                }
            }
        });
        // The timers boxed: an idle connection's future holds no room for
        // them unless it has one.
        if first_tick {
            return Box::pin(tokio::time::timeout(IO_TICK, wait))
                .await
                .unwrap_or(Ok(Woke::Stopped));
        }
        let idle = self.shared.idle_timeout;
        if idle.is_zero() {
            return wait.await;
        }
        let waited = Box::pin(tokio::time::timeout(idle, wait)).await;
        waited.unwrap_or_else(|_| Err(self.idle_error()))
    }

    /// One read into a lent buffer: Some(bytes read, 0 = EOF), or None
    /// when nothing was there after all.
    fn read_into(&mut self, chunk: &mut Chunk) -> io::Result<Option<usize>> {
        match self.stream.try_read(chunk.space()) {
            Ok(n) => {
                chunk.len = n;
                self.bytes_in += n as u64;
                if n == 0 {
                    self.eof = true;
                } else {
                    self.received = true;
                }
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads what the client sent, waiting for input, for the client to
    /// close, or for the worker to be asked to stop: the rule of
    /// [`Connection::recv`](super::Connection::recv). While stopping,
    /// [`Input::Shutdown`] comes when the handler asks for more input and
    /// none has arrived (a request boundary for a handler that answers
    /// every read before it reads again); a connection that has sent
    /// nothing yet gets one [`IO_TICK`] to send its first request. With
    /// `idle_timeout`, fails with [`io::ErrorKind::TimedOut`] once it has
    /// waited that long without input.
    ///
    /// The bytes come in a buffer lent by the worker: drop the [`Chunk`]
    /// once answered, so that an idle connection holds none.
    pub async fn recv(&mut self) -> io::Result<Input> {
        if !self.inbuf.is_empty() {
            let mut chunk = self.shared.pool.take();
            let n = self.inbuf.len().min(CHUNK);
            chunk.space()[..n].copy_from_slice(&self.inbuf[..n]);
            chunk.len = n;
            self.inbuf.drain(..n);
            if self.inbuf.is_empty() {
                self.inbuf = Vec::new();
            }
            return Ok(Input::Data(chunk));
        }
        let mut chunk = self.shared.pool.take();
        loop {
            let stopping = self.shared.stop.is_set();
            if let Some(n) = self.read_into(&mut chunk)? {
                return Ok(if n == 0 {
                    Input::Eof
                } else {
                    Input::Data(chunk)
                });
            }
            if stopping {
                // The loop's readiness may lag the socket (an event not
                // polled yet): ask the socket itself before saying that
                // nothing more has come.
                if let Some(n) = self.read_direct(&mut chunk)? {
                    return Ok(if n == 0 {
                        Input::Eof
                    } else {
                        Input::Data(chunk)
                    });
                }
                if self.received {
                    return Ok(Input::Shutdown);
                }
                // Accepted just before the stop: one tick for its first
                // request.
                self.received = true;
                drop(chunk);
                if let Woke::Stopped = self.wait_input(false, true).await? {
                    return Ok(Input::Shutdown);
                }
                chunk = self.shared.pool.take();
                continue;
            }
            // No buffer held while waiting.
            drop(chunk);
            self.wait_input(true, false).await?;
            chunk = self.shared.pool.take();
        }
    }

    /// One read straight from the socket, past the loop's idea of its
    /// readiness: Some(bytes, 0 = EOF), or None when nothing has arrived.
    fn read_direct(&mut self, chunk: &mut Chunk) -> io::Result<Option<usize>> {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd;
        let fd = self.stream.as_fd().as_raw_fd();
        match recv(fd, chunk.space(), MsgFlags::MSG_DONTWAIT) {
            Ok(n) => {
                chunk.len = n;
                self.bytes_in += n as u64;
                if n == 0 {
                    self.eof = true;
                } else {
                    self.received = true;
                }
                Ok(Some(n))
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads into the handler's own `buf`, with [`AsyncConnection::recv`]'s
    /// rule (for handlers that keep their own buffers).
    pub async fn recv_into(&mut self, buf: &mut [u8]) -> io::Result<Recv> {
        Ok(match self.recv().await? {
            Input::Data(chunk) => {
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.inbuf.splice(0..0, chunk[n..].iter().copied());
                }
                Recv::Data(n)
            }
            Input::Eof => Recv::Eof,
            Input::Shutdown => Recv::Shutdown,
        })
    }

    /// Reads one line (up to and including `\n`, or `max` bytes without
    /// one) and appends it to `line`, with the rule of
    /// [`Connection::recv_line`](super::Connection::recv_line): Shutdown
    /// only when no part of a next line has arrived; once part has, it
    /// waits for the rest whatever the stop. An unfinished last line
    /// before EOF is dropped. Bytes beyond the line are kept for the next
    /// read.
    pub async fn recv_line(&mut self, line: &mut Vec<u8>, max: usize) -> io::Result<Recv> {
        let max = max.max(1);
        loop {
            let limit = self.inbuf.len().min(max);
            if let Some(i) = self.inbuf[..limit].iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&self.inbuf[..=i]);
                self.inbuf.drain(..=i);
                if self.inbuf.is_empty() {
                    self.inbuf = Vec::new();
                }
                return Ok(Recv::Data(i + 1));
            }
            if self.inbuf.len() >= max {
                line.extend_from_slice(&self.inbuf[..max]);
                self.inbuf.drain(..max);
                return Ok(Recv::Data(max));
            }
            let chunk = if self.inbuf.is_empty() {
                match self.recv().await? {
                    Input::Data(c) => c,
                    Input::Eof => return Ok(Recv::Eof),
                    Input::Shutdown => return Ok(Recv::Shutdown),
                }
            } else {
                // Mid-line: the rest is owed, whatever the stop.
                match self.read_owed().await? {
                    Some(c) => c,
                    None => {
                        self.inbuf = Vec::new();
                        return Ok(Recv::Eof);
                    }
                }
            };
            // The common case, a whole line in one read: straight to `line`.
            let limit = chunk.len().min(max.saturating_sub(self.inbuf.len()));
            match chunk[..limit].iter().position(|&b| b == b'\n') {
                Some(i) if self.inbuf.is_empty() => {
                    line.extend_from_slice(&chunk[..=i]);
                    self.inbuf.extend_from_slice(&chunk[i + 1..]);
                    return Ok(Recv::Data(i + 1));
                }
                _ => self.inbuf.extend_from_slice(&chunk),
            }
        }
    }

    /// Waits for input whatever the stop (bytes owed mid-request):
    /// None at EOF.
    async fn read_owed(&mut self) -> io::Result<Option<Chunk>> {
        loop {
            let mut chunk = self.shared.pool.take();
            match self.read_into(&mut chunk)? {
                Some(0) => return Ok(None),
                Some(_) => return Ok(Some(chunk)),
                None => {}
            }
            drop(chunk);
            self.wait_input(false, false).await?;
        }
    }

    /// Reads exactly `buf.len()` bytes whatever the stop (the rest of a
    /// request); [`io::ErrorKind::UnexpectedEof`] if the client closes first.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        let from_inbuf = self.inbuf.len().min(buf.len());
        buf[..from_inbuf].copy_from_slice(&self.inbuf[..from_inbuf]);
        self.inbuf.drain(..from_inbuf);
        at += from_inbuf;
        while at < buf.len() {
            let Some(chunk) = self.read_owed().await? else {
                return Err(io::ErrorKind::UnexpectedEof.into());
            };
            let n = chunk.len().min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&chunk[..n]);
            self.inbuf.extend_from_slice(&chunk[n..]);
            at += n;
        }
        Ok(())
    }

    /// Writes all of `buf`, waiting for the socket as long as it takes:
    /// everything written is owed to the client, so this waits even while
    /// the worker is stopping (`graceful_timeout` bounds it).
    pub async fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.stream.try_write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.bytes_out += n as u64;
                    buf = &buf[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stream.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes some of `buf` once the socket can take it, unless the worker
    /// is asked to stop first (for endless senders such as chargen).
    pub async fn send(&mut self, buf: &[u8]) -> io::Result<Sent> {
        loop {
            if self.shared.stop.is_set() {
                return Ok(Sent::Shutdown);
            }
            match self.stream.try_write(buf) {
                Ok(n) => {
                    self.bytes_out += n as u64;
                    return Ok(Sent::Bytes(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let stop = self.shared.stop.clone();
                    let stream = &self.stream;
                    let key = &mut self.stop_key;
                    poll_fn(|cx| {
                        if stop.is_set() {
                            return Poll::Ready(Ok(()));
                        }
                        match stream.poll_write_ready(cx) {
                            Poll::Ready(r) => Poll::Ready(r),
                            Poll::Pending => {
                                stop.register(key, cx.waker());
                                Poll::Pending
                            }
                        }
                    })
                    .await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads and throws away whatever input has already arrived, without
    /// waiting (for handlers such as chargen that ignore their input).
    pub fn discard_input(&mut self) -> io::Result<()> {
        self.inbuf = Vec::new();
        let mut chunk = self.shared.pool.take();
        // Straight from the socket: the loop's readiness may not have seen
        // the last bytes yet, and unread input turns a close into a reset.
        loop {
            match self.read_direct(&mut chunk)? {
                Some(0) | None => return Ok(()),
                Some(_) => {}
            }
        }
    }

    /// Sends FIN: no more output (the tutorial's gevent echo server, on
    /// EOF). Reads still work.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.stream.shutdown_write()
    }

    /// Closes the connection cleanly, as the threads mode does: FIN first,
    /// then read and discard what the client still sends until it closes
    /// or `linger` passes, so that unread input never turns the close into
    /// a reset.
    pub(crate) async fn close_gracefully(mut self, linger: Duration) {
        if self.eof || self.idle_expired {
            return;
        }
        if self.stream.shutdown_write().is_err() {
            return;
        }
        let drain = async {
            loop {
                match self.read_owed().await {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(linger, drain).await;
    }
}

impl Drop for AsyncConnection {
    fn drop(&mut self) {
        if let Some(k) = self.stop_key.take() {
            self.shared.stop.forget(k);
        }
    }
}

/// What [`AsyncConnection::recv`] found.
pub enum Input {
    /// Bytes the client sent, in a buffer lent by the worker.
    Data(Chunk),
    /// The client closed its side.
    Eof,
    /// The worker is stopping and no input is pending: nothing more is
    /// owed, so the handler should return.
    Shutdown,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Data(c) => write!(f, "Data({} bytes)", c.len()),
            Input::Eof => f.write_str("Eof"),
            Input::Shutdown => f.write_str("Shutdown"),
        }
    }
}
