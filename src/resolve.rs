//! From a parsed configuration to what the workers will run: each
//! service's plugin, looked up in the registry. As ripgrep's `hiargs`,
//! pure parsed data first (src/config.rs, which knows nothing of
//! plugins), resolved objects after.
//!
//! [`resolve`] finds every service's plugin and checks, once, that it
//! serves the service's sockets ([`serves`]). A socket passed by systemd
//! (`listen = ["systemd:NAME"]`) has a kind known only when the master
//! adopts it; src/master/listeners.rs asks the same [`serves`] then.
//! [`check_plugins`] runs the plugins' own checkers, for `preforkd check`
//! only: the master never runs plugin code. Errors point into the text the
//! config was parsed from, which the [`Config`] keeps, so nothing is read
//! twice.
//!
//! Owns: nothing; a [`Resolved`] owns its config and its plugins.

use std::path::Path;

use nix::unistd::{AccessFlags, access};

use crate::config::{Config, ConfigError, ListenAddr, LogTarget};
use crate::handler::{PluginContext, PluginInfo, Registry};

/// A configuration with each service's plugin found.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The parsed configuration.
    pub config: Config,
    /// `plugins[i]` is the plugin of `config.services[i]`.
    pub plugins: Vec<PluginInfo>,
}

/// Reads the file at `path` (None: the embedded default) and resolves it.
pub fn load(path: Option<&Path>, registry: &Registry) -> Result<Resolved, ConfigError> {
    let config = match path {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
    };
    resolve(config, registry)
}

/// Finds each service's plugin in `registry`, and checks that it serves
/// every socket of the service whose kind the config tells.
pub fn resolve(config: Config, registry: &Registry) -> Result<Resolved, ConfigError> {
    let mut plugins = Vec::with_capacity(config.services.len());
    for svc in &config.services {
        let plugin = &svc.handler.plugin;
        let Some(info) = registry.get(plugin.get_ref()) else {
            return Err(config.error_at(
                plugin.span().start,
                format!(
                    "unknown plugin {:?}: expected one of {}",
                    plugin.get_ref(),
                    registry.names().join(", ")
                ),
            ));
        };
        for (addr, written) in svc.addrs.iter().zip(svc.listen.get_ref()) {
            // A systemd socket's kind is checked when it is adopted.
            if addr.systemd_name().is_some() {
                continue;
            }
            let stream = addr.is_stream();
            if !serves(info, stream) {
                return Err(config.error_at(
                    written.span().start,
                    format!(
                        "plugin {:?} does not serve {} sockets, so it cannot listen on {addr}",
                        plugin.get_ref(),
                        kind(stream),
                    ),
                ));
            }
        }
        check_mode(&config, svc, info)?;
        check_fd_limit(&config, svc, info)?;
        plugins.push(info.clone());
    }
    Ok(Resolved { config, plugins })
}

/// Whether `plugin` serves the service's `mode`; the error points at
/// `mode` (or, when the default was not written, at the plugin).
fn check_mode(
    config: &Config,
    svc: &crate::config::ServiceConfig,
    plugin: &PluginInfo,
) -> Result<(), ConfigError> {
    let mode = svc.mode();
    if plugin.serves_mode(mode) {
        return Ok(());
    }
    let why = if plugin.name == "dylib" {
        ": the ABI v1 callbacks block, and would hold the event loop"
    } else {
        ""
    };
    let at = if svc.mode.span() == (0..0) {
        svc.handler.plugin.span().start
    } else {
        svc.mode.span().start
    };
    Err(config.error_at(
        at,
        format!(
            "service {:?}: plugin {:?} serves mode = \"{}\" only, not mode = \"{mode}\"{why}: set mode = \"{}\" or choose another plugin",
            svc.name.get_ref().as_str(),
            plugin.name,
            plugin.mode_names(),
            plugin.mode_names().split(',').next().unwrap_or("threads"),
        ),
    ))
}

/// File descriptors a worker holds besides its connections: its listeners,
/// log, pipes, the scoreboard, a syslog socket, with room to spare.
const WORKER_BASE_FDS: u64 = 64;

/// Whether a worker of `svc` fits the file descriptor limit workers get:
/// the hard `RLIMIT_NOFILE`, to which the master raises its soft limit at
/// start (src/cli.rs). Each connection (an accept thread's, or one of
/// `worker_connections`) holds a socket, and an `exec` connection also the
/// program's stderr pipe and its pidfd. Found here, at the `threads` or
/// `worker_connections` line, rather than as a worker that reports ready
/// and then fails every accept.
fn check_fd_limit(
    config: &Config,
    svc: &crate::config::ServiceConfig,
    plugin: &PluginInfo,
) -> Result<(), ConfigError> {
    let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return Ok(());
    };
    let per_connection = if plugin.name == "exec" { 3 } else { 1 };
    let listeners = svc.addrs.len() as u64;
    let connections = u64::from(svc.connections_per_worker());
    let need = connections * per_connection + listeners + WORKER_BASE_FDS;
    if need <= hard {
        return Ok(());
    }
    let key = match svc.mode() {
        crate::config::WorkerMode::Threads => "threads",
        crate::config::WorkerMode::Async => "worker_connections",
    };
    Err(config.error_at(
        svc.connections_span().start,
        format!(
            "service {:?}: {key} = {connections} needs about {need} file descriptors in each worker, more than the open files limit of {hard} (the hard limit: ulimit -Hn; LimitNOFILE= under systemd): lower {key} or raise the limit",
            svc.name.get_ref().as_str(),
        ),
    ))
}

/// What `preforkd check` adds for paths, without creating anything: the
/// directory of every Unix socket to bind (services' and the control
/// socket) exists and is writable, and the log file can be opened for
/// appending. The run would fail on each of these.
pub fn check_paths(resolved: &Resolved) -> Result<(), ConfigError> {
    let config = &resolved.config;
    for svc in &config.services {
        for (addr, written) in svc.addrs.iter().zip(svc.listen.get_ref()) {
            if let ListenAddr::Unix(path) | ListenAddr::UnixGram(path) = addr
                && let Err(why) = dir_writable(path, RUN_HINT)
            {
                return Err(config.error_at(written.span().start, format!("{addr}: {why}")));
            }
        }
    }
    if let Some(socket) = &config.control.socket
        && let Err(why) = dir_writable(socket.get_ref(), RUN_HINT)
    {
        return Err(config.error_at(socket.span().start, format!("control socket: {why}")));
    }
    if let Some(file) = &config.log.file
        && config.log.target() == LogTarget::File
    {
        let path = file.get_ref();
        let fails = if path.exists() {
            access(path, AccessFlags::W_OK).err().map(|e| {
                format!(
                    "log file {}: cannot be opened for writing ({e}): fix its owner or mode, or name another file",
                    path.display()
                )
            })
        } else {
            dir_writable(path, "under systemd, LogsDirectory= makes one in /var/log")
                .err()
                .map(|why| format!("log file {}: {why}", path.display()))
        };
        if let Some(message) = fails {
            return Err(config.error_at(file.span().start, message));
        }
    }
    Ok(())
}

/// Where a missing socket directory comes from under systemd.
const RUN_HINT: &str = "under systemd, RuntimeDirectory= makes one in /run";

/// Whether a file can be created at `path`: its directory exists, is a
/// directory and is writable by this process. `hint` says how a missing
/// directory is usually made.
fn dir_writable(path: &Path, hint: &str) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Err(_) => Err(format!(
            "directory {} does not exist: create it ({hint})",
            dir.display()
        )),
        Ok(m) if !m.is_dir() => Err(format!("{} is not a directory", dir.display())),
        Ok(_) => access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
            format!(
                "directory {} is not writable by this user (uid {}): {e}; run as its owner, or choose another directory",
                dir.display(),
                nix::unistd::getuid()
            )
        }),
    }
}

/// Whether `plugin` serves stream sockets (`stream`) or datagram ones.
pub fn serves(plugin: &PluginInfo, stream: bool) -> bool {
    if stream {
        plugin.stream
    } else {
        plugin.datagram
    }
}

/// A socket kind, as messages name it.
pub fn kind(stream: bool) -> &'static str {
    if stream { "stream" } else { "datagram" }
}

/// Runs each service's plugin check (see [`PluginInfo::check`]): what
/// `preforkd check` adds to parsing. Never called in the master, which
/// leaves plugins to the workers. An error points at the service's
/// `plugin = "…"`.
pub fn check_plugins(resolved: &Resolved) -> Result<(), ConfigError> {
    let config = &resolved.config;
    for (svc, info) in config.services.iter().zip(&resolved.plugins) {
        let Some(check) = &info.check else {
            continue;
        };
        let ctx = PluginContext::new(
            svc.name.get_ref().as_str(),
            &svc.handler.options,
            svc.graceful_timeout,
        )
        .with_credentials(config.daemon.credentials.as_ref());
        if let Err(message) = check(&ctx) {
            let plugin = svc.handler.plugin.get_ref();
            let message = message.replace('\n', " ");
            // Checkers may name their plugin themselves; it is said once.
            let message = if message.starts_with(&format!("plugin {plugin:?}")) {
                message
            } else {
                format!("plugin {plugin:?}: {message}")
            };
            return Err(config.error_at(
                svc.handler.plugin.span().start,
                format!("service {:?}: {message}", svc.name.get_ref().as_str()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Source;

    fn resolve_text(text: &str, registry: &Registry) -> Result<Resolved, String> {
        Config::parse(text, Source::File("t.toml".into()))
            .and_then(|c| resolve(c, registry))
            .map_err(|e| e.to_string())
    }

    const ONE: &str = "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:1\"]\n[service.handler]\nplugin = \"ehco\"\n";

    #[test]
    fn unknown_plugin_lists_known_ones() {
        let e = resolve_text(ONE, &Registry::builtin()).unwrap_err();
        assert!(
            e.starts_with("t.toml:5:10: unknown plugin \"ehco\": expected one of"),
            "{e}"
        );
        assert!(e.contains("chargen, daytime, discard, dylib, echo"), "{e}");
    }

    #[test]
    fn each_service_gets_its_plugin() {
        let text = format!(
            "{}\n[[service]]\nname = \"b\"\nlisten = [\"udp://127.0.0.1:1\"]\n[service.handler]\nplugin = \"daytime\"\n",
            ONE.replace("ehco", "echo")
        );
        let r = resolve_text(&text, &Registry::builtin()).unwrap();
        let names: Vec<&str> = r.plugins.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["echo", "daytime"]);
    }

    #[test]
    fn a_plugin_must_serve_the_socket_kind() {
        let mut registry = Registry::new();
        registry.register(
            PluginInfo::new("streamonly", "", |_| {
                Err("never initialised in a unit test".into())
            })
            .serves(true, false),
        );
        let text = ONE
            .replace("ehco", "streamonly")
            .replace("tcp://127.0.0.1:1", "udp://127.0.0.1:1");
        let e = resolve_text(&text, &registry).unwrap_err();
        assert_eq!(
            e,
            "t.toml:3:11: plugin \"streamonly\" does not serve datagram sockets, so it cannot listen on udp://127.0.0.1:1"
        );
        // A systemd socket's kind is unknown until it is adopted.
        let text = text.replace("udp://127.0.0.1:1", "systemd:web");
        resolve_text(&text, &registry).unwrap();
    }

    #[test]
    fn checkers_report_at_the_plugin_line_from_the_parsed_text() {
        let mut registry = Registry::new();
        registry.register(
            PluginInfo::new("picky", "", |_| Err("unused".into())).with_check(|ctx| {
                match ctx.options.get("x") {
                    Some(_) => Ok(()),
                    None => Err("needs option x\nreally".into()),
                }
            }),
        );
        let text = ONE.replace("ehco", "picky");
        let r = resolve_text(&text, &registry).unwrap();
        let e = check_plugins(&r).unwrap_err().to_string();
        assert!(e.starts_with("t.toml:5:10: service "), "{e}");
        assert!(
            e.ends_with("plugin \"picky\": needs option x really"),
            "{e}"
        );
        let ok = resolve_text(
            &format!("{text}[service.handler.options]\nx = 1\n"),
            &registry,
        )
        .unwrap();
        check_plugins(&ok).unwrap();
    }
}
