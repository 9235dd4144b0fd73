//! Handler plugins: the traits a handler implements (socketserver's
//! `BaseRequestHandler.handle()`), what a plugin's factory returns and is
//! given, and the [`Registry`], the one place that maps a `plugin = "…"` name
//! to code.
//!
//! A plugin is only *named* in the master (to validate the config); its
//! factory runs in each worker after fork, so no handler code ever runs in the
//! master.
//!
//! The connection a stream handler is given, with its reads and writes that
//! wake every [`IO_TICK`] to look at the shutdown flag, is in `connection.rs`
//! (re-exported here: [`Connection`], [`Recv`], [`Sent`], [`Addr`]). The
//! built-in plugins, one file each, are `echo`, `discard`, `daytime` and
//! `chargen` (the classic inetd services), `exec` (a program per connection
//! or datagram) and [`dylib`] (a shared library with a C ABI).
//!
//! Owns: the registry's name → plugin map. Nothing here is process state: a
//! worker builds its handlers once, after fork, from the [`PluginInfo`].

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

mod chargen;
mod connection;
mod daytime;
mod discard;
pub mod dylib;
mod echo;
mod event;
mod exec;

pub use crate::config::WorkerMode;
pub(crate) use connection::Stream;
pub use connection::{Addr, Connection, IO_TICK, Recv, Sent};
pub use event::{AsyncConnection, CHUNK, Chunk, Input};
pub(crate) use event::{AsyncStream, Pool, Shared, Stop};

/// Handles one stream connection (socketserver's `StreamRequestHandler`):
/// a worker thread calls it once per accepted connection.
///
/// One object serves every connection of a worker, from all its accept
/// threads at once, so it takes `&self` and must be `Send + Sync`; state
/// per connection lives in `handle`'s locals. This is the handler of
/// `mode = "threads"` services; `mode = "async"` ones (many connections
/// per thread, as gevent's server has) use an [`AsyncStreamHandler`],
/// which a plugin adds beside it in [`Handlers`].
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

/// Handles one stream connection in a `mode = "async"` worker, where one
/// event loop serves up to `worker_connections` connections at once (the
/// tutorial's gevent server): `handle` is an `async fn`, and every wait
/// (for input, for the socket to take output) lets the loop serve the
/// other connections.
///
/// The loop is the worker's only thread for handlers, so the futures need
/// not be `Send`, and a handler must never block it: a blocking call holds
/// every connection of the worker, and one that holds it longer than the
/// service's `timeout` gets the worker killed and replaced (the log names
/// the connection). State per connection lives in `handle`'s locals; an
/// idle connection should hold no buffer (drop each [`Chunk`] once it is
/// answered).
///
/// ```no_run
/// use std::io;
/// use preforkd::handler::{AsyncConnection, AsyncStreamHandler, Handlers, Input, PluginInfo};
///
/// /// The tutorial's gevent echo server: echo each read; on EOF, shut
/// /// down the write side.
/// struct Echo;
///
/// impl AsyncStreamHandler for Echo {
///     async fn handle(&self, conn: &mut AsyncConnection) -> io::Result<()> {
///         loop {
///             match conn.recv().await? {
///                 Input::Data(bytes) => conn.write_all(&bytes).await?,
///                 Input::Eof => return conn.shutdown_write(),
///                 Input::Shutdown => return Ok(()),
///             }
///         }
///     }
/// }
///
/// let plugin = PluginInfo::new("gevent-echo", "echoes each read", |_ctx| {
///     Ok(Handlers::async_stream(Echo))
/// })
/// .modes(false, true);
/// assert_eq!(plugin.mode_names(), "async");
/// ```
// `async fn` in a public trait: the futures run on one worker's
// current-thread loop, so they are deliberately not required to be `Send`.
#[allow(async_fn_in_trait)]
pub trait AsyncStreamHandler {
    /// Serves `conn` until the exchange is over, returning at a request
    /// boundary once [`AsyncConnection::recv`] says [`Input::Shutdown`].
    /// The worker then closes the connection cleanly. An error closes the
    /// connection and is logged.
    async fn handle(&self, conn: &mut AsyncConnection) -> io::Result<()>;
}

/// [`AsyncStreamHandler`] behind a pointer: its future boxed, once per
/// connection.
pub(crate) trait DynAsyncStream {
    fn handle_boxed<'a>(
        &'a self,
        conn: &'a mut AsyncConnection,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>> + 'a>>;
}

impl<T: AsyncStreamHandler> DynAsyncStream for T {
    fn handle_boxed<'a>(
        &'a self,
        conn: &'a mut AsyncConnection,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>> + 'a>> {
        Box::pin(self.handle(conn))
    }
}

/// Answers datagrams in a `mode = "async"` worker without blocking its
/// loop: the async twin of [`DatagramHandler`], for handlers that wait
/// (exec's program). Each datagram gets a task of its own, at most
/// `worker_connections` at once; the reply goes back when it is done.
#[allow(async_fn_in_trait)]
pub trait AsyncDatagramHandler {
    /// Handles one datagram; writes the answer into `reply` and returns
    /// true to send it back to the sender, false to send nothing.
    async fn handle(&self, datagram: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool>;
}

/// [`AsyncDatagramHandler`] behind a pointer.
pub(crate) trait DynAsyncDatagram {
    fn handle_boxed<'a>(
        &'a self,
        datagram: &'a Datagram<'a>,
        reply: &'a mut Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<bool>> + 'a>>;
}

impl<T: AsyncDatagramHandler> DynAsyncDatagram for T {
    fn handle_boxed<'a>(
        &'a self,
        datagram: &'a Datagram<'a>,
        reply: &'a mut Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<bool>> + 'a>> {
        Box::pin(self.handle(datagram, reply))
    }
}

/// Answers datagrams (socketserver's DatagramRequestHandler). In a
/// `mode = "async"` worker the same handler runs on the event loop: it
/// must answer at once and never block.
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
/// Non-exhaustive, so that kinds of handler can be added without breaking
/// plugins: build it with [`Handlers::stream`], [`Handlers::datagram`],
/// [`Handlers::both`] or [`Handlers::async_stream`], and add an
/// event-driven stream handler to any of them with
/// [`Handlers::with_async`]. A worker uses the one its service's `mode`
/// needs ([`PluginContext::mode`] says which).
#[derive(Default)]
#[non_exhaustive]
pub struct Handlers {
    /// For tcp and unix listeners, in threads mode.
    pub stream: Option<Arc<dyn StreamHandler>>,
    /// For udp and unixgram listeners (both modes).
    pub datagram: Option<Arc<dyn DatagramHandler>>,
    /// For tcp and unix listeners, in async mode.
    pub(crate) async_stream: Option<std::rc::Rc<dyn DynAsyncStream>>,
    /// For udp and unixgram listeners, in async mode, when answering
    /// waits (else `datagram` answers on the loop).
    pub(crate) async_datagram: Option<std::rc::Rc<dyn DynAsyncDatagram>>,
}

impl Handlers {
    /// A plugin that serves stream sockets only.
    pub fn stream(h: impl StreamHandler + 'static) -> Handlers {
        Handlers {
            stream: Some(Arc::new(h)),
            ..Handlers::default()
        }
    }

    /// A plugin that serves datagram sockets only.
    pub fn datagram(h: impl DatagramHandler + 'static) -> Handlers {
        Handlers {
            datagram: Some(Arc::new(h)),
            ..Handlers::default()
        }
    }

    /// One object serving both kinds.
    pub fn both<H: StreamHandler + DatagramHandler + 'static>(h: H) -> Handlers {
        let h = Arc::new(h);
        Handlers {
            stream: Some(h.clone()),
            datagram: Some(h),
            ..Handlers::default()
        }
    }

    /// A plugin that serves stream sockets in async mode only.
    pub fn async_stream(h: impl AsyncStreamHandler + 'static) -> Handlers {
        Handlers::default().with_async(h)
    }

    /// The same, with `h` serving stream sockets in async mode.
    pub fn with_async(mut self, h: impl AsyncStreamHandler + 'static) -> Handlers {
        self.async_stream = Some(std::rc::Rc::new(h));
        self
    }

    /// The same, with `h` answering datagrams in async mode, each in a
    /// task of its own (instead of `datagram`, on the loop).
    pub fn with_async_datagram(mut self, h: impl AsyncDatagramHandler + 'static) -> Handlers {
        self.async_datagram = Some(std::rc::Rc::new(h));
        self
    }

    /// Whether it has an event-driven stream handler.
    pub fn has_async_stream(&self) -> bool {
        self.async_stream.is_some()
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
    /// Who besides root may own a file whose code workers run (a `dylib`
    /// library): the master's uid (a worker has already dropped to the
    /// workers' user, so its own uid is not it). [`PluginContext::new`]:
    /// this process's uid.
    pub trusted_uid: nix::unistd::Uid,
    /// `[daemon] user` and `group`, resolved: what the workers drop to.
    /// Given to checks, which run as the `check` command's user (root as
    /// systemd's ExecStartPre), to run plugin code with these credentials
    /// in a child instead.
    pub credentials: Option<&'a crate::config::Credentials>,
    /// The service's `mode`: which of [`Handlers`]' stream handlers the
    /// worker will use ([`PluginContext::new`]: threads).
    pub mode: WorkerMode,
}

impl<'a> PluginContext<'a> {
    /// The same with the master's uid, for [`PluginContext::trusted_uid`].
    pub fn with_trusted_uid(mut self, uid: nix::unistd::Uid) -> PluginContext<'a> {
        self.trusted_uid = uid;
        self
    }

    /// The same for a service of `mode`.
    pub fn with_mode(mut self, mode: WorkerMode) -> PluginContext<'a> {
        self.mode = mode;
        self
    }

    /// The same with the workers' credentials.
    pub fn with_credentials(
        mut self,
        credentials: Option<&'a crate::config::Credentials>,
    ) -> PluginContext<'a> {
        self.credentials = credentials;
        self
    }

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
            trusted_uid: nix::unistd::Uid::current(),
            credentials: None,
            mode: WorkerMode::Threads,
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
    /// Whether it serves `mode = "threads"` services.
    pub threads_mode: bool,
    /// Whether it serves `mode = "async"` services (its stream handler an
    /// [`AsyncStreamHandler`]; its datagram handler never blocks).
    pub async_mode: bool,
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
            threads_mode: true,
            async_mode: false,
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

    /// Which worker modes it serves (new plugins: threads only).
    pub fn modes(mut self, threads: bool, r#async: bool) -> PluginInfo {
        self.threads_mode = threads;
        self.async_mode = r#async;
        self
    }

    /// Whether it serves services of `mode`.
    pub fn serves_mode(&self, mode: WorkerMode) -> bool {
        match mode {
            WorkerMode::Threads => self.threads_mode,
            WorkerMode::Async => self.async_mode,
        }
    }

    /// What `preforkd plugins` says about the modes it serves.
    pub fn mode_names(&self) -> &'static str {
        match (self.threads_mode, self.async_mode) {
            (true, true) => "threads, async",
            (true, false) => "threads",
            (false, true) => "async",
            (false, false) => "none",
        }
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
            .field("modes", &self.mode_names())
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// A built-in plugin: no options, and one object that serves both streams
/// and datagrams, made by `make` in each worker.
fn builtin<T>(name: &'static str, description: &'static str, make: fn() -> T) -> PluginInfo
where
    T: StreamHandler + DatagramHandler + AsyncStreamHandler + 'static,
{
    PluginInfo::new(name, description, move |ctx| {
        ctx.expect_options(name, &[])?;
        Ok(match ctx.mode {
            WorkerMode::Threads => Handlers::both(make()),
            WorkerMode::Async => Handlers::datagram(make()).with_async(make()),
        })
    })
    .serves(true, true)
    .modes(true, true)
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

    /// The built-in plugins: `echo`, `discard`, `daytime`, `chargen`,
    /// `exec` and `dylib`.
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

/// One received datagram.
pub struct Datagram<'a> {
    /// The payload.
    pub data: &'a [u8],
    /// The sender.
    pub peer: &'a Addr,
    /// The service it was sent to.
    pub service: &'a str,
}
