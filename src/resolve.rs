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

use crate::config::{Config, ConfigError};
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
        plugins.push(info.clone());
    }
    Ok(Resolved { config, plugins })
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
        );
        if let Err(message) = check(&ctx) {
            return Err(config.error_at(
                svc.handler.plugin.span().start,
                format!(
                    "service {:?}: plugin {:?}: {}",
                    svc.name.get_ref(),
                    svc.handler.plugin.get_ref(),
                    message.replace('\n', " ")
                ),
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
