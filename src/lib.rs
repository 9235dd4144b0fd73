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
//! - [`cli`]: the command line, and exit codes for every error.
//! - [`config`]: the TOML schema, defaults, validation with file:line:col.
//! - [`listener`]: binding TCP, UDP and Unix sockets in the master.
//! - [`master`]: the master loop and its phases.
//! - [`worker`]: what a forked worker runs.
//! - [`acl`]: a service's `allow` and `deny` lists.
//! - [`scoreboard`]: the workers' shared-memory slots.
//! - [`handler`]: the handler traits, the connection type, the plugin
//!   registry and the built-in plugins (echo, discard, daytime, chargen).
//! - [`signals`]: the master's signal self-pipe.
//! - [`exit`]: exit codes, and classification of a child's wait status.
//! - [`systemd`]: sd_notify messages to the service manager.
//! - [`sys`]: the few `unsafe` operating-system calls.
//! - [`log`]: the stderr logger.
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
pub mod resolve;
pub mod scoreboard;
pub mod signals;
pub mod stats;
pub mod sys;
pub mod systemd;
pub mod upgrade;
pub mod worker;
