//! Handler plugins: the traits a handler implements (socketserver's
//! `BaseRequestHandler.handle()`), the connection and datagram types it is
//! given, and the [`Registry`], the one place that maps a `plugin = "…"` name
//! to code.
//!
//! A plugin is only *named* in the master (to validate the config); its
//! factory runs in each worker after fork, so no handler code ever runs in the
//! master.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sys;

mod chargen;
mod daytime;
mod discard;
pub mod dylib;
mod echo;
mod exec;

/// Handles one stream connection (socketserver's `StreamRequestHandler`):
/// a worker thread calls it once per accepted connection.
///
/// One object serves every connection of a worker, from all its accept
/// threads at once, so it takes `&self` and must be `Send + Sync`; state
/// per connection lives in `handle`'s locals. Nothing in the trait assumes
/// a thread per connection: everything a handler learns about its
/// connection comes through [`Connection`], so a later event-driven worker
/// mode (many connections per thread, as gevent's server has) can be added
/// as a new kind of handler in [`Handlers`] (non-exhaustive for that
/// reason) without changing this one.
///
/// ```no_run
/// use std::io::{self, Write};
/// use preforkd::handler::{Connection, Handlers, PluginInfo, Recv, Registry, StreamHandler};
///
/// /// Greets each line with the service's name and the caller's address.
/// struct Greeter;
///
/// impl StreamHandler for Greeter {
///     fn handle(&self, conn: &mut Connection) -> io::Result<()> {
///         let mut line = Vec::new();
///         loop {
///             line.clear();
///             match conn.recv_line(&mut line, 4096)? {
///                 Recv::Data(_) => {
///                     let hello = format!("{} says hello to {}\n", conn.service(), conn.peer_addr());
///                     conn.write_all(hello.as_bytes())?;
///                 }
///                 Recv::Eof | Recv::Shutdown => return Ok(()),
///             }
///         }
///     }
/// }
///
/// let mut registry = Registry::builtin();
/// registry.register(PluginInfo::new("greeter", "greets every line", |ctx| {
///     ctx.expect_options("greeter", &[])?;
///     Ok(Handlers::stream(Greeter))
/// }));
/// assert!(registry.get("greeter").is_some());
/// ```
pub trait StreamHandler: Send + Sync {
    /// Serves `conn` until the exchange is over. Return at a request boundary
    /// once [`Connection::shutting_down`] is true (or [`Connection::recv`]
    /// says [`Recv::Shutdown`]). The worker then closes the connection
    /// cleanly. An error closes the connection and is logged.
    fn handle(&self, conn: &mut Connection) -> io::Result<()>;
}

/// Answers datagrams (socketserver's DatagramRequestHandler).
///
/// ```
/// use std::io;
/// use preforkd::handler::{Datagram, DatagramHandler, Handlers, PluginInfo};
///
/// /// Answers every datagram with its length, in decimal.
/// struct Length;
///
/// impl DatagramHandler for Length {
///     fn handle(&self, datagram: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool> {
///         reply.extend_from_slice(datagram.data.len().to_string().as_bytes());
///         Ok(true)
///     }
/// }
///
/// let plugin = PluginInfo::new("length", "the length of each datagram", |_ctx| {
///     Ok(Handlers::datagram(Length))
/// })
/// .serves(false, true);
/// assert_eq!(plugin.kinds(), "datagram");
/// ```
pub trait DatagramHandler: Send + Sync {
    /// Handles one datagram; writes the answer into `reply` and returns true
    /// to send it back to the sender, false to send nothing.
    fn handle(&self, datagram: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool>;
}

/// What a plugin's factory returns: a handler for each kind of socket it
/// serves (as declared in its [`PluginInfo`]).
///
/// Non-exhaustive, so that a later worker mode (an event-driven worker that
/// multiplexes many connections per thread, as the tutorial's gevent
/// server does) can add a kind of handler without breaking plugins: build
/// it with [`Handlers::stream`], [`Handlers::datagram`] or
/// [`Handlers::both`].
#[derive(Default)]
#[non_exhaustive]
pub struct Handlers {
    /// For tcp and unix listeners.
    pub stream: Option<Arc<dyn StreamHandler>>,
    /// For udp and unixgram listeners.
    pub datagram: Option<Arc<dyn DatagramHandler>>,
}

impl Handlers {
    /// A plugin that serves stream sockets only.
    pub fn stream(h: impl StreamHandler + 'static) -> Handlers {
        Handlers {
            stream: Some(Arc::new(h)),
            datagram: None,
        }
    }

    /// A plugin that serves datagram sockets only.
    pub fn datagram(h: impl DatagramHandler + 'static) -> Handlers {
        Handlers {
            stream: None,
            datagram: Some(Arc::new(h)),
        }
    }

    /// One object serving both kinds.
    pub fn both<H: StreamHandler + DatagramHandler + 'static>(h: H) -> Handlers {
        let h = Arc::new(h);
        Handlers {
            stream: Some(h.clone()),
            datagram: Some(h),
        }
    }
}

/// What a plugin's factory (in the worker, after fork) and its check (in
/// `preforkd check`) are given.
#[non_exhaustive]
pub struct PluginContext<'a> {
    /// The service's name.
    pub service: &'a str,
    /// `[service.handler.options]`.
    pub options: &'a toml::Table,
    /// The service's `graceful_timeout`: how long a stopping worker's
    /// connections may take before the master kills it.
    pub graceful_timeout: Duration,
}

impl<'a> PluginContext<'a> {
    /// A context for `service` with these options.
    pub fn new(
        service: &'a str,
        options: &'a toml::Table,
        graceful_timeout: Duration,
    ) -> PluginContext<'a> {
        PluginContext {
            service,
            options,
            graceful_timeout,
        }
    }
}

impl PluginContext<'_> {
    /// Fails, with a message that names the plugin and the option, unless
    /// every key of `options` is in `known`.
    pub fn expect_options(&self, plugin: &str, known: &[&str]) -> Result<(), String> {
        for key in self.options.keys() {
            if !known.contains(&key.as_str()) {
                return Err(if known.is_empty() {
                    format!("plugin {plugin:?} takes no options, got {key:?}")
                } else {
                    format!(
                        "plugin {plugin:?} has no option {key:?}: expected one of {}",
                        known.join(", ")
                    )
                });
            }
        }
        Ok(())
    }
}

/// Builds a plugin's handlers in a worker; an `Err` is a boot failure whose
/// message the master reports.
pub type Factory = Arc<dyn Fn(&PluginContext<'_>) -> Result<Handlers, String> + Send + Sync>;

/// Validates a plugin's options without running the plugin, for `preforkd
/// check` (a program exists and is executable, a library's permissions and
/// ABI version). Never called in the master.
pub type Checker = Arc<dyn Fn(&PluginContext<'_>) -> Result<(), String> + Send + Sync>;

/// A named plugin. Build it with [`PluginInfo::new`] (it is
/// non-exhaustive, so that fields can be added without breaking plugins).
#[derive(Clone)]
#[non_exhaustive]
pub struct PluginInfo {
    /// The name used in `plugin = "…"`.
    pub name: String,
    /// One line for `preforkd plugins`.
    pub description: String,
    /// Whether it serves stream sockets (tcp, unix).
    pub stream: bool,
    /// Whether it serves datagram sockets (udp, unixgram).
    pub datagram: bool,
    /// Runs in the worker to build the handlers.
    pub factory: Factory,
    /// Validates the options for `preforkd check`, if the plugin can.
    pub check: Option<Checker>,
}

impl PluginInfo {
    /// A plugin named `name` that serves stream sockets (call
    /// [`PluginInfo::serves`] to change that), built in each worker by
    /// `factory`.
    pub fn new<F>(name: impl Into<String>, description: impl Into<String>, factory: F) -> PluginInfo
    where
        F: Fn(&PluginContext<'_>) -> Result<Handlers, String> + Send + Sync + 'static,
    {
        PluginInfo {
            name: name.into(),
            description: description.into(),
            stream: true,
            datagram: false,
            factory: Arc::new(factory),
            check: None,
        }
    }

    /// Which kinds of socket it serves.
    pub fn serves(mut self, stream: bool, datagram: bool) -> PluginInfo {
        self.stream = stream;
        self.datagram = datagram;
        self
    }

    /// Adds a check of its options for `preforkd check`.
    pub fn with_check<C>(mut self, check: C) -> PluginInfo
    where
        C: Fn(&PluginContext<'_>) -> Result<(), String> + Send + Sync + 'static,
    {
        self.check = Some(Arc::new(check));
        self
    }

    /// What `preforkd plugins` says the plugin serves.
    pub fn kinds(&self) -> &'static str {
        match (self.stream, self.datagram) {
            (true, true) => "stream, datagram",
            (true, false) => "stream",
            (false, true) => "datagram",
            (false, false) => "nothing",
        }
    }
}

impl fmt::Debug for PluginInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginInfo")
            .field("name", &self.name)
            .field("stream", &self.stream)
            .field("datagram", &self.datagram)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// A built-in plugin: no options, and one object that serves both streams
/// and datagrams, made by `make` in each worker.
fn builtin<T>(name: &'static str, description: &'static str, make: fn() -> T) -> PluginInfo
where
    T: StreamHandler + DatagramHandler + 'static,
{
    PluginInfo::new(name, description, move |ctx| {
        ctx.expect_options(name, &[])?;
        Ok(Handlers::both(make()))
    })
    .serves(true, true)
    .with_check(move |ctx| ctx.expect_options(name, &[]))
}

/// The plugins a binary knows, by name.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    plugins: BTreeMap<String, PluginInfo>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The built-in plugins: `echo`, `discard`, `daytime`, `chargen`.
    pub fn builtin() -> Registry {
        let mut r = Registry::new();
        r.register(echo::plugin());
        r.register(discard::plugin());
        r.register(daytime::plugin());
        r.register(chargen::plugin());
        r.register(exec::plugin());
        r.register(dylib::plugin());
        r
    }

    /// Adds (or replaces) a plugin.
    pub fn register(&mut self, plugin: PluginInfo) -> &mut Registry {
        self.plugins.insert(plugin.name.clone(), plugin);
        self
    }

    /// Looks a plugin up by name.
    pub fn get(&self, name: &str) -> Option<&PluginInfo> {
        self.plugins.get(name)
    }

    /// All names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.plugins.keys().map(String::as_str).collect()
    }

    /// All plugins, sorted by name.
    pub fn plugins(&self) -> impl Iterator<Item = &PluginInfo> {
        self.plugins.values()
    }
}

/// The address of a peer or of a local socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// An IPv4 or IPv6 address and port.
    Inet(SocketAddr),
    /// A Unix socket; None when unnamed (the usual case for clients).
    Unix(Option<PathBuf>),
}

impl Addr {
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

/// How often a blocked read or write on a connection wakes up to look at
/// the shutdown flag (the socket's SO_RCVTIMEO / SO_SNDTIMEO). The thread
/// that receives SIGTERM is interrupted at once (EINTR); the others notice
/// within one tick. A blocking read costs one syscall per request, where
/// poll-then-read costs two.
pub const TICK: Duration = Duration::from_millis(200);

impl Stream {
    /// Makes the socket blocking with [`TICK`] timeouts. TCP connections
    /// inherit these from their listener (set in the worker), Unix ones do not.
    pub(crate) fn prepare(&self) -> io::Result<()> {
        let s = socket2::SockRef::from(self);
        if let Stream::Unix(_) = self {
            s.set_read_timeout(Some(TICK))?;
            s.set_write_timeout(Some(TICK))?;
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

    fn shutdown_write(&self) -> io::Result<()> {
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
    stream: Stream,
    peer: Addr,
    local: Addr,
    service: &'a str,
    /// The client has closed its side (a read returned 0).
    eof: bool,
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
    /// `idle_timeout` in [`TICK`]s (rounded up); 0: none.
    idle_ticks: u32,
    /// The client sent nothing for `idle_timeout` while the handler waited.
    idle_expired: bool,
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
        }
    }

    /// Closes the connection when a read waits `timeout` (rounded up to
    /// [`TICK`]s) without input; zero: never. The waits are counted in the
    /// read timeouts the socket already has, so this costs no clock read.
    pub(crate) fn set_idle_timeout(&mut self, timeout: Duration) {
        let ticks = timeout.as_nanos().div_ceil(TICK.as_nanos());
        self.idle_ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
    }

    /// Bytes read from and written to the client so far.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.bytes_in, self.bytes_out)
    }

    /// Whether a read gave up after `idle_timeout` without input.
    pub(crate) fn idle_expired(&self) -> bool {
        self.idle_expired
    }

    /// One more [`TICK`] without input; the error that ends the read once
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
                humantime::format_duration(TICK * self.idle_ticks)
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

    /// The client's address.
    pub fn peer_addr(&self) -> &Addr {
        &self.peer
    }

    /// The address the client connected to.
    pub fn local_addr(&self) -> &Addr {
        &self.local
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
    /// sent anything yet gets one [`TICK`] to send its first request, so a
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

/// One received datagram.
pub struct Datagram<'a> {
    /// The payload.
    pub data: &'a [u8],
    /// The sender.
    pub peer: &'a Addr,
    /// The service it was sent to.
    pub service: &'a str,
}
