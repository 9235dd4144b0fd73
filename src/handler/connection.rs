//! The connection a [`StreamHandler`](super::StreamHandler) is given: a
//! TCP or Unix stream socket behind [`Connection`], whose reads and writes
//! stop at request boundaries when the worker is asked to stop.
//!
//! Every socket of a worker is blocking with [`IO_TICK`] timeouts
//! (SO_RCVTIMEO / SO_SNDTIMEO): a blocked read or write wakes up once per
//! tick to look at the shutdown flag, and the same ticks count the
//! service's `idle_timeout`, so neither costs a clock read nor a second
//! system call per request.
//!
//! Owns: each connection's socket (closed when the [`Connection`] is
//! dropped), its read-ahead buffer, its byte counts for the scoreboard,
//! and its idle-tick count.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::sys;

/// The address of a peer or of a local socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// An IPv4 or IPv6 address and port.
    Inet(SocketAddr),
    /// A Unix socket; None when unnamed (the usual case for clients).
    Unix(Option<PathBuf>),
}

impl Addr {
    /// The IP address, for an IPv4 or IPv6 one.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Addr::Inet(a) => Some(a.ip()),
            Addr::Unix(_) => None,
        }
    }

    pub(crate) fn from_unix(a: std::os::unix::net::SocketAddr) -> Addr {
        Addr::Unix(a.as_pathname().map(Into::into))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Inet(a) => write!(f, "{a}"),
            Addr::Unix(Some(p)) => write!(f, "unix:{}", p.display()),
            Addr::Unix(None) => f.write_str("unix:(unnamed)"),
        }
    }
}

/// A connected stream socket of either family.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// The I/O tick of a worker's sockets: how often a blocked read or write
/// on a connection wakes up to look at the shutdown flag (the socket's
/// SO_RCVTIMEO / SO_SNDTIMEO, set on TCP listeners by
/// [`crate::listener::WorkerSocket::prepare_for_connections`] and on Unix
/// connections when accepted), and the unit `idle_timeout` is counted in.
/// The thread that receives SIGTERM is interrupted at once (EINTR); the
/// others notice within one tick. A blocking read costs one syscall per
/// request, where poll-then-read costs two. Not the master's maintenance
/// period, which is a separate constant of the master.
pub const IO_TICK: Duration = Duration::from_millis(200);

impl Stream {
    /// Makes the socket blocking with [`IO_TICK`] timeouts. TCP connections
    /// inherit these from their listener (set in the worker), Unix ones do not.
    pub(crate) fn prepare(&self) -> io::Result<()> {
        let s = socket2::SockRef::from(self);
        if let Stream::Unix(_) = self {
            s.set_read_timeout(Some(IO_TICK))?;
            s.set_write_timeout(Some(IO_TICK))?;
        }
        Ok(())
    }

    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&mut &*s).read(buf),
            Stream::Unix(s) => (&mut &*s).read(buf),
        }
    }

    /// Reads only what has already arrived: WouldBlock if nothing has.
    fn read_pending(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = self.as_fd().as_raw_fd();
        nix::sys::socket::recv(fd, buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
            .map_err(io::Error::from)
    }

    fn write_some(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&mut &*s).write(buf),
            Stream::Unix(s) => (&mut &*s).write(buf),
        }
    }

    /// Sends FIN: no more output.
    pub(super) fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// A tick passed (SO_RCVTIMEO/SO_SNDTIMEO) or a signal interrupted the call:
/// look at the shutdown flag and try again.
fn is_tick(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// What [`Connection::recv`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// This many bytes were read into the buffer.
    Data(usize),
    /// The client closed its side.
    Eof,
    /// The worker is stopping and no input is pending: nothing more is owed
    /// to this client, so the handler should return.
    Shutdown,
}

/// What [`Connection::send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// This many bytes were written.
    Bytes(usize),
    /// The worker is stopping; nothing was written.
    Shutdown,
}

/// One accepted stream connection, as a handler sees it.
pub struct Connection<'a> {
    /// The socket. Visible to the plugins of this module's parent: `exec`
    /// and `dylib` hand its descriptor to a program or a library.
    pub(super) stream: Stream,
    peer: Addr,
    local: Addr,
    service: &'a str,
    /// The client has closed its side (a read returned 0). `exec` sets it
    /// too, when it has closed the connection's input itself.
    pub(super) eof: bool,
    /// The client has sent something: it has had its first exchange.
    received: bool,
    /// Input read ahead by [`Connection::recv_line`] or [`BufRead`], not yet
    /// handed out: `inbuf[inpos..]`. Empty (and never allocated) for
    /// handlers that only use `recv` and `Read`.
    inbuf: Vec<u8>,
    inpos: usize,
    /// Bytes read from and written to the client, for the scoreboard.
    bytes_in: u64,
    bytes_out: u64,
    /// `idle_timeout` in [`IO_TICK`]s (rounded up); 0: none.
    idle_ticks: u32,
    /// The client sent nothing for `idle_timeout` while the handler waited.
    idle_expired: bool,
    /// The socket's own peer, when a PROXY protocol header named the
    /// client.
    proxy: Option<Addr>,
}

impl<'a> Connection<'a> {
    pub(crate) fn new(stream: Stream, peer: Addr, local: Addr, service: &'a str) -> Self {
        Connection {
            stream,
            peer,
            local,
            service,
            eof: false,
            received: false,
            inbuf: Vec::new(),
            inpos: 0,
            bytes_in: 0,
            bytes_out: 0,
            idle_ticks: 0,
            idle_expired: false,
            proxy: None,
        }
    }

    /// The proxy that sent the connection's PROXY protocol header.
    pub(crate) fn set_proxy_addr(&mut self, proxy: Option<Addr>) {
        self.proxy = proxy;
    }

    /// Closes the connection when a read waits `timeout` (rounded up to
    /// [`IO_TICK`]s) without input; zero: never. The waits are counted in the
    /// read timeouts the socket already has, so this costs no clock read.
    pub(crate) fn set_idle_timeout(&mut self, timeout: Duration) {
        let ticks = timeout.as_nanos().div_ceil(IO_TICK.as_nanos());
        self.idle_ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
    }

    /// Bytes read from and written to the client so far.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.bytes_in, self.bytes_out)
    }

    /// Replaces the byte counts with the socket's own totals, for a
    /// handler that hands the socket to someone else (exec's program).
    pub(crate) fn set_bytes(&mut self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in = bytes_in;
        self.bytes_out = bytes_out;
    }

    /// Whether a read gave up after `idle_timeout` without input.
    pub(crate) fn idle_expired(&self) -> bool {
        self.idle_expired
    }

    /// One more [`IO_TICK`] without input; the error that ends the read once
    /// they add up to `idle_timeout`.
    fn idle_tick(&mut self, waited: &mut u32) -> Option<io::Error> {
        *waited += 1;
        if self.idle_ticks == 0 || *waited < self.idle_ticks {
            return None;
        }
        self.idle_expired = true;
        Some(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no input for {} (idle_timeout)",
                humantime::format_duration(IO_TICK * self.idle_ticks)
            ),
        ))
    }

    /// A blocking read from the socket, bypassing the read-ahead: waits for
    /// input or EOF whatever the stop, at most `idle_timeout`.
    fn read_blocking(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut waited = 0;
        loop {
            match self.stream.read_some(buf) {
                Ok(n) => {
                    self.bytes_in += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_tick(&e) => {
                    if let Some(e) = self.idle_tick(&mut waited) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Input read ahead and not yet handed out.
    fn buffered(&self) -> &[u8] {
        &self.inbuf[self.inpos..]
    }

    /// Hands out up to `buf.len()` bytes of read-ahead input.
    fn take_buffered(&mut self, buf: &mut [u8]) -> usize {
        let n = self.buffered().len().min(buf.len());
        buf[..n].copy_from_slice(&self.inbuf[self.inpos..self.inpos + n]);
        self.consume_buffered(n);
        n
    }

    fn consume_buffered(&mut self, n: usize) {
        self.inpos += n;
        if self.inpos >= self.inbuf.len() {
            self.inbuf.clear();
            self.inpos = 0;
        }
    }

    /// The client's address: with `proxy_protocol`, the one its proxy's
    /// header gave.
    pub fn peer_addr(&self) -> &Addr {
        &self.peer
    }

    /// The address the client connected to: with `proxy_protocol`, the
    /// header's destination (the load balancer's front).
    pub fn local_addr(&self) -> &Addr {
        &self.local
    }

    /// With `proxy_protocol`, the address of the proxy that sent the
    /// header (the socket's own peer); None without a header, or when it
    /// kept the socket's addresses (a balancer's `LOCAL` health check).
    pub fn proxy_addr(&self) -> Option<&Addr> {
        self.proxy.as_ref()
    }

    /// The service this connection belongs to.
    pub fn service(&self) -> &str {
        self.service
    }

    /// True once the worker has been asked to stop (SIGTERM, recycling).
    pub fn shutting_down(&self) -> bool {
        sys::shutdown_requested()
    }

    /// Whether input (or the client's EOF) is there to read right now.
    fn readable_now(&self) -> bool {
        if !self.buffered().is_empty() {
            return true;
        }
        let mut fds = [nix::poll::PollFd::new(
            self.stream.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Reads what the client sent, waiting for input, for the client to close,
    /// or for the worker to be asked to stop.
    ///
    /// While stopping, [`Recv::Shutdown`] comes when the handler asks for
    /// more input and none has arrived: for a handler that answers every
    /// read before it reads again (echo and its kind) that is a request
    /// boundary. A handler that reads one request in several pieces must
    /// not take `Shutdown` in the middle of a request for a boundary: read
    /// those pieces with [`std::io::Read`] (which waits for input whatever
    /// the stop) and ask [`Connection::shutting_down`] between requests. A connection that has not
    /// sent anything yet gets one [`IO_TICK`] to send its first request, so a
    /// client accepted just before the stop is served once. The worker then
    /// sends FIN and drains whatever the client sends after it: a client
    /// that reconnects lands on a worker that is not stopping.
    ///
    /// With the service's `idle_timeout`, this (and every other read of
    /// the connection) fails with [`io::ErrorKind::TimedOut`] once it has
    /// waited that long without input; the worker then closes the
    /// connection at once. Time spent writing or computing does not count.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Recv> {
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "recv() needs a non-empty buffer",
            ));
        }
        if !self.buffered().is_empty() {
            return Ok(Recv::Data(self.take_buffered(buf)));
        }
        self.recv_socket(buf)
    }

    /// Reads one line (up to and including `\n`) into `line`, for line
    /// protocols: socketserver's `self.rfile.readline()`, with the request
    /// boundary rule of [`Connection::recv`].
    ///
    /// Returns [`Recv::Data`] with the bytes appended to `line` when a whole
    /// line has arrived, or when `max` bytes have arrived without a newline
    /// (the rest of that line comes with the next call). Returns
    /// [`Recv::Eof`] when the client closes (an unfinished last line is
    /// dropped), and [`Recv::Shutdown`] when the worker is stopping and no
    /// part of a next line has arrived. Once part of a line has arrived, it
    /// waits for the rest whatever the stop (the worker's `graceful_timeout`
    /// bounds that). Input beyond the line stays buffered for the next call,
    /// and for `recv` and `Read`.
    ///
    /// ```no_run
    /// # use preforkd::handler::{Connection, Recv};
    /// # use std::io::Write;
    /// # fn handle(conn: &mut Connection) -> std::io::Result<()> {
    /// let mut line = Vec::new();
    /// loop {
    ///     line.clear();
    ///     match conn.recv_line(&mut line, 1024)? {
    ///         Recv::Data(_) => conn.write_all(&line.to_ascii_uppercase())?,
    ///         Recv::Eof | Recv::Shutdown => return Ok(()),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn recv_line(&mut self, line: &mut Vec<u8>, max: usize) -> io::Result<Recv> {
        let max = max.max(1);
        let mut chunk = [0u8; 4096];
        loop {
            let pending = self.buffered();
            let limit = pending.len().min(max);
            if let Some(i) = pending[..limit].iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&pending[..=i]);
                self.consume_buffered(i + 1);
                return Ok(Recv::Data(i + 1));
            }
            if pending.len() >= max {
                line.extend_from_slice(&pending[..max]);
                self.consume_buffered(max);
                return Ok(Recv::Data(max));
            }
            let partial = !pending.is_empty();
            let got = if partial {
                // Mid-line: the rest is owed, whatever the stop.
                match self.read_blocking(&mut chunk)? {
                    0 => Recv::Eof,
                    n => Recv::Data(n),
                }
            } else {
                self.recv_socket(&mut chunk)?
            };
            match got {
                Recv::Data(n) => self.inbuf.extend_from_slice(&chunk[..n]),
                Recv::Eof => {
                    self.eof = true;
                    self.consume_buffered(self.buffered().len());
                    return Ok(Recv::Eof);
                }
                Recv::Shutdown => return Ok(Recv::Shutdown),
            }
        }
    }

    /// [`Connection::recv`] on the socket itself.
    fn recv_socket(&mut self, buf: &mut [u8]) -> io::Result<Recv> {
        let mut waited = 0;
        loop {
            let stopping = sys::shutdown_requested();
            if stopping && self.received && !self.readable_now() {
                return Ok(Recv::Shutdown);
            }
            match self.stream.read_some(buf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(Recv::Eof);
                }
                Ok(n) => {
                    self.received = true;
                    self.bytes_in += n as u64;
                    return Ok(Recv::Data(n));
                }
                // A whole tick without input while stopping: what the client
                // sent before the stop has all been read (including bytes
                // that TCP flow control held in its send buffer, and the
                // first request of a connection accepted just before), so
                // nothing more is owed.
                Err(e) if stopping && e.kind() != io::ErrorKind::Interrupted && is_tick(&e) => {
                    return Ok(Recv::Shutdown);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_tick(&e) => {
                    if let Some(e) = self.idle_tick(&mut waited) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes some of `buf`, waiting until the socket can take it, unless the
    /// worker is asked to stop first.
    pub fn send(&mut self, buf: &[u8]) -> io::Result<Sent> {
        loop {
            if sys::shutdown_requested() {
                return Ok(Sent::Shutdown);
            }
            match self.stream.write_some(buf) {
                Ok(n) => {
                    self.bytes_out += n as u64;
                    return Ok(Sent::Bytes(n));
                }
                Err(e) if is_tick(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads and throws away whatever input has already arrived, without
    /// waiting (for handlers such as chargen that ignore their input).
    pub fn discard_input(&mut self) -> io::Result<()> {
        self.consume_buffered(self.buffered().len());
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read_pending(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.bytes_in += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Closes the connection cleanly: FIN first, then read and discard what
    /// the client still sends until it closes or `linger` passes, so that
    /// unread input never turns the close into a reset.
    pub(crate) fn close_gracefully(self, linger: Duration) {
        if self.eof || self.idle_expired {
            // The client closed first and nothing of its input is unread:
            // close(2) sends our FIN, with nothing to drain. Or it has
            // sent nothing for idle_timeout: it gets no more time.
            return;
        }
        if self.stream.shutdown_write().is_err() {
            return; // already gone
        }
        let deadline = Instant::now() + linger;
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read_some(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if is_tick(&e) => {}
                Err(_) => return,
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }
}

/// Blocking reads: wait for input or end of stream, ignoring the shutdown
/// signal (use [`Connection::recv`] to stop at request boundaries).
impl Read for Connection<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.buffered().is_empty() {
            return Ok(self.take_buffered(buf));
        }
        let n = self.read_blocking(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }
}

/// Buffered blocking reads (`read_line`, `lines`, `read_until`), as
/// socketserver's `StreamRequestHandler.rfile`. They wait for input
/// whatever the stop; [`Connection::recv_line`] is the line reader that
/// stops at request boundaries.
impl io::BufRead for Connection<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.buffered().is_empty() {
            let mut chunk = [0u8; 4096];
            let n = self.read_blocking(&mut chunk)?;
            if n == 0 {
                self.eof = true;
            }
            self.inbuf.extend_from_slice(&chunk[..n]);
        }
        Ok(self.buffered())
    }

    fn consume(&mut self, amt: usize) {
        self.consume_buffered(amt.min(self.buffered().len()));
    }
}

/// Blocking writes: everything written is owed to the client, so these wait
/// for the socket even while the worker is stopping.
impl Write for Connection<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.stream.write_some(buf) {
                Ok(n) => {
                    self.bytes_out += n as u64;
                    return Ok(n);
                }
                Err(e) if is_tick(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection over one end of a socket pair, and the client's end.
    fn pair() -> (Connection<'static>, UnixStream) {
        let (server, client) = UnixStream::pair().unwrap();
        let stream = Stream::Unix(server);
        stream.prepare().unwrap();
        let conn = Connection::new(stream, Addr::Unix(None), Addr::Unix(None), "test");
        (conn, client)
    }

    #[test]
    fn recv_line_keeps_what_follows_the_line_for_the_next_read() {
        let (mut conn, mut client) = pair();
        client.write_all(b"one\ntwo").unwrap();
        drop(client);
        let mut line = Vec::new();
        assert_eq!(conn.recv_line(&mut line, 100).unwrap(), Recv::Data(4));
        assert_eq!(line, b"one\n");
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"two");
        assert_eq!(Connection::bytes(&conn), (7, 0));
    }

    #[test]
    fn recv_line_stops_at_max_without_a_newline() {
        let (mut conn, mut client) = pair();
        client.write_all(b"abcdef\n").unwrap();
        let mut line = Vec::new();
        assert_eq!(conn.recv_line(&mut line, 4).unwrap(), Recv::Data(4));
        assert_eq!(line, b"abcd");
        line.clear();
        assert_eq!(conn.recv_line(&mut line, 4).unwrap(), Recv::Data(3));
        assert_eq!(line, b"ef\n");
        drop(client);
        line.clear();
        assert_eq!(conn.recv_line(&mut line, 4).unwrap(), Recv::Eof);
    }

    #[test]
    fn idle_timeout_is_counted_in_whole_ticks() {
        let (mut conn, _client) = pair();
        conn.set_idle_timeout(IO_TICK + Duration::from_millis(1));
        assert_eq!(conn.idle_ticks, 2, "rounded up");
        conn.set_idle_timeout(Duration::ZERO);
        assert_eq!(conn.idle_ticks, 0, "none");
    }

    #[test]
    fn idle_timeout_ends_a_read_without_input() {
        let (mut conn, _client) = pair();
        conn.set_idle_timeout(IO_TICK);
        let mut buf = [0u8; 16];
        let e = conn.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(conn.idle_expired());
    }

    #[test]
    fn writes_are_counted() {
        let (mut conn, mut client) = pair();
        conn.write_all(b"hello").unwrap();
        assert_eq!(conn.send(b"!").unwrap(), Sent::Bytes(1));
        let mut buf = [0u8; 6];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello!");
        assert_eq!(Connection::bytes(&conn), (0, 6));
    }
}
