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
mod exec;

pub(crate) use connection::Stream;
pub use connection::{Addr, Connection, IO_TICK, Recv, Sent};

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
}

impl<'a> PluginContext<'a> {
    /// The same with the master's uid, for [`PluginContext::trusted_uid`].
    pub fn with_trusted_uid(mut self, uid: nix::unistd::Uid) -> PluginContext<'a> {
        self.trusted_uid = uid;
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
