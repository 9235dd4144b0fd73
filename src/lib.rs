//! preforkd: a pre-fork daemon for any socket service, Python's
//! `socketserver` carried into production.
//!
//! A single-threaded master binds the sockets named in a TOML config, forks
//! a pool of workers per `[[service]]`, reaps and replaces them, and stops
//! them gracefully on signals. Workers load the service's handler plugin
//! after fork and accept, verify and serve connections (or datagrams).
//!
//! # Layout
//!
//! The processes, from the top: [`cli`] parses the command line and starts
//! the [`master`], which binds sockets and forks [`worker`]s (and one
//! [`metrics`] process); workers run [`handler`] plugins.
//!
//! - [`cli`]: the command line, and the one place errors become exit codes.
//! - [`config`]: the TOML schema, defaults and validation with
//!   file:line:col; pure data.
//! - [`resolve`]: a parsed config plus the plugin registry gives each
//!   service its plugin; socket kinds checked; `check`'s plugin checkers.
//! - [`master`]: the master process, a folder with one file per job (its
//!   module doc lists them): the loop and its dispatch, pools, listeners,
//!   reload, binary upgrade, status, pool policy, stuck workers, the
//!   metrics child.
//! - [`listener`]: binding and adopting TCP, UDP and Unix sockets.
//! - [`upgrade`]: what one master hands the next across a binary upgrade.
//! - [`control`]: the control socket (`status`, `reload`, `upgrade`,
//!   `stop`, `scale`), both sides.
//! - [`daemon`]: `--daemon`, detaching and the launcher's wait.
//! - [`systemd`]: sd_notify messages, socket activation (`LISTEN_FDS`).
//! - [`worker`]: what a forked worker runs: accept, verify, handle; with
//!   `mode = "async"`, an event loop (`worker/event.rs`) fed by an accept
//!   thread (`worker/gate.rs`).
//! - [`acl`]: a service's `allow` and `deny` lists.
//! - [`proxy`]: the PROXY protocol: `proxy_from`, and reading exactly a
//!   header's bytes; a leaf beside [`acl`].
//! - [`handler`]: the plugin API (handler traits, `Handlers`, `PluginInfo`,
//!   `PluginContext`, the `Registry`) and the built-in plugins (echo,
//!   discard, daytime, chargen, exec, dylib); `handler/connection.rs` is the
//!   connection a stream handler is given, reads and writes on an `IO_TICK`;
//!   `handler/event.rs` the one an async handler is given.
//! - [`scoreboard`]: the workers' shared-memory slots.
//! - [`stats`]: the master's counters, shared with the metrics process.
//! - [`metrics`]: the `[metrics]` process, Prometheus text over HTTP.
//! - [`signals`]: the one signal table (each signal's intent, what the
//!   master does, what a worker does), the master's self-pipe, the workers'
//!   handlers, and what a program run by `exec` gets back at its default.
//! - [`exit`]: the exit codes, and a child's wait status classified.
//! - [`log`]: the logger: stderr, journald, a file or syslog; reopening.
//! - [`sys`]: the `unsafe` operating-system wrappers, each with its
//!   `SAFETY:`; a leaf that imports nothing from the crate.
//!
//! # Embedding
//!
//! A binary with your own plugin and the full `preforkd` CLI:
//!
//! ```no_run
//! use std::io::{self, Write};
//! use preforkd::handler::{Connection, Handlers, PluginInfo, Recv, Registry, StreamHandler};
//!
//! struct Upper;
//! impl StreamHandler for Upper {
//!     fn handle(&self, conn: &mut Connection) -> io::Result<()> {
//!         let mut buf = [0u8; 4096];
//!         while let Recv::Data(n) = conn.recv(&mut buf)? {
//!             conn.write_all(&buf[..n].to_ascii_uppercase())?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! fn main() {
//!     let mut registry = Registry::builtin();
//!     registry.register(PluginInfo::new("upper", "echo, in capitals", |_ctx| {
//!         Ok(Handlers::stream(Upper))
//!     }));
//!     preforkd::cli::main_with(registry)
//! }
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod acl;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod exit;
pub mod handler;
pub mod listener;
pub mod log;
pub mod master;
pub mod metrics;
pub mod proxy;
pub mod resolve;
pub mod scoreboard;
pub mod signals;
pub mod stats;
pub mod sys;
pub mod systemd;
pub mod upgrade;
pub mod worker;
