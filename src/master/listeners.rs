//! The master's listening sockets: one [`bind`] for what a configuration
//! names (the services' `listen` entries and the `[metrics]` endpoint),
//! at start and on reload; the control socket; and closing what no
//! generation names any more.
//!
//! A socket comes from one of three places, tried in this order: the
//! previous master (a binary upgrade hands every socket over by key),
//! systemd (socket activation, by `systemd:NAME` or by address), or a
//! fresh bind(2). Rule 3: a listener stays open from bind until the master
//! exits or hands it over; a reload only adds and, once no generation uses
//! it, removes.
//!
//! Owns: nothing beyond `Master::listeners`; the policy of where a socket
//! comes from.

use std::os::fd::AsFd;

use super::{Master, metrics_child};
use crate::config::{Config, Credentials, ListenAddr, SocketMode};
use crate::control;
use crate::handler::PluginInfo;
use crate::listener::{ListenError, Listener};
use crate::resolve::{self, Resolved};
use crate::systemd;
use crate::upgrade::{self, Inherited};

/// listen(2) backlog of the control socket.
const CONTROL_BACKLOG: i32 = 64;

/// Where a listener may come from besides a fresh bind: a previous
/// master's sockets and systemd's, each taken once.
#[derive(Default)]
pub(super) struct Sources<'a> {
    /// What the previous master handed over (binary upgrade).
    pub(super) inherited: Option<&'a mut Inherited>,
    /// What systemd passed and no listener has adopted yet.
    pub(super) activated: Vec<systemd::Activated>,
}

/// What a failed bind of a reload says: a `systemd:NAME` the master does
/// not hold cannot be had then (systemd passes its sockets once, when the
/// service starts), whatever the socket unit says; the message names the
/// sockets this master did adopt from systemd and how.
pub(super) fn reload_reason(e: &ListenError, open: &[Listener]) -> String {
    let ListenError::NotPassed { addr, name, .. } = e else {
        return e.to_string();
    };
    let adopted: Vec<String> = open
        .iter()
        .filter(|l| l.systemd)
        .map(|l| match &l.addr {
            ListenAddr::Systemd(_) => l.addr.to_string(),
            _ => format!("{} by its address", l.bound),
        })
        .collect();
    let held = if adopted.is_empty() {
        "this master adopted none".to_string()
    } else {
        format!("this master adopted {}", adopted.join(", "))
    };
    format!(
        "cannot listen on {addr}: systemd passes its sockets only when the service starts, so a reload cannot take a socket named {name:?} ({held}); keep the listen entries of those sockets as they were, or restart the service to use systemd:{name}"
    )
}

/// Finds the listener named `key`.
pub(super) fn find<'a>(listeners: &'a [Listener], key: &str) -> Option<&'a Listener> {
    listeners.iter().find(|l| l.key == key)
}

/// Binds (or adopts) every listener `resolved` names that `open` does not
/// hold yet, in the config's order: each service's, then the metrics
/// endpoint. A socket of `open` that the config names again is checked
/// against its service's plugin, as a new one is. Logs each new one
/// (`prefix` first). On error, the sockets made here are closed again and
/// their files removed: `open` is untouched either way.
pub(super) fn bind(
    resolved: &Resolved,
    open: &[Listener],
    sources: &mut Sources<'_>,
    prefix: &str,
) -> Result<Vec<Listener>, ListenError> {
    let mut added: Vec<Listener> = Vec::new();
    let result = bind_into(resolved, open, sources, prefix, &mut added);
    if result.is_err() {
        close(&mut added);
    }
    result.map(|()| added)
}

fn bind_into(
    resolved: &Resolved,
    open: &[Listener],
    sources: &mut Sources<'_>,
    prefix: &str,
    added: &mut Vec<Listener>,
) -> Result<(), ListenError> {
    let config = &resolved.config;
    for (svc, plugin) in config.services.iter().zip(&resolved.plugins) {
        for (key, addr) in svc.listen_keys() {
            if let Some(l) = find(open, &key).or_else(|| find(added, &key)) {
                check_kind(plugin, l)?;
                continue;
            }
            let owner = config.daemon.credentials.as_ref();
            let l = open_listener(&addr, svc.backlog, svc.socket_mode, sources, &key, owner)?;
            check_kind(plugin, &l)?;
            log::info!(
                "{prefix}listening on {} (service {})",
                l.bound,
                svc.name.get_ref()
            );
            added.push(l);
        }
    }
    if let (Some(addr), Some(key)) = (config.metrics.listen_addr(), config.metrics.listen_key())
        && find(open, &key).is_none()
    {
        let backlog = metrics_child::METRICS_BACKLOG;
        let l = open_listener(&addr, backlog, SocketMode::default(), sources, &key, None)?;
        log::info!(
            "{prefix}metrics: serving http://{}/metrics",
            metrics_child::bound_inet(&l)
        );
        added.push(l);
    }
    Ok(())
}

/// The control socket, if the config has one (a previous master's, or
/// bound now; never systemd's).
pub(super) fn open_control(
    config: &Config,
    inherited: Option<&mut Inherited>,
) -> Result<Option<control::Server>, ListenError> {
    let Some(path) = config.control.path() else {
        return Ok(None);
    };
    let mut sources = Sources {
        inherited,
        activated: Vec::new(),
    };
    let l = open_listener(
        &ListenAddr::Unix(path.to_owned()),
        CONTROL_BACKLOG,
        SocketMode(0o600),
        &mut sources,
        &upgrade::control_key(path),
        None,
    )?;
    log::info!("control socket {}", path.display());
    Ok(Some(control::Server::new(l)))
}

/// Closes `listeners` and removes the files of those that are ours (not
/// still shared with a previous master).
pub(super) fn close(listeners: &mut Vec<Listener>) {
    for l in listeners.iter_mut().filter(|l| !l.shared) {
        l.remove_file();
    }
    listeners.clear();
}

/// Binds `addr`, or adopts the socket the previous master handed over for
/// it, or one that systemd passed (named by `systemd:NAME`, or bound to
/// `addr`).
fn open_listener(
    addr: &ListenAddr,
    backlog: i32,
    mode: SocketMode,
    sources: &mut Sources<'_>,
    key: &str,
    owner: Option<&Credentials>,
) -> Result<Listener, ListenError> {
    let handed = sources.inherited.as_mut().and_then(|i| {
        i.fds
            .remove(key)
            .map(|fd| (fd, i.systemd.iter().any(|k| k == key)))
    });
    let activated = &mut sources.activated;
    let mut l = if let Some((fd, owned)) = handed {
        let mut l = Listener::adopt(addr, fd)?;
        if owned {
            l.forget_file();
            l.systemd = true;
        }
        log::info!("adopted {} from the previous master", l.bound);
        l
    } else if let Some(i) = activated.iter().position(|a| match addr {
        ListenAddr::Systemd(name) => a.name == *name,
        _ => Listener::fd_matches(a.fd.as_fd(), addr),
    }) {
        let a = activated.remove(i);
        let l = Listener::adopt_systemd(addr, a.fd)?;
        log::info!(
            "adopted {} from systemd (socket activation, FileDescriptorName={}) for {addr}, not bound",
            l.bound,
            a.name
        );
        l
    } else if let ListenAddr::Systemd(name) = addr {
        let passed: Vec<&str> = activated.iter().map(|a| a.name.as_str()).collect();
        return Err(ListenError::NotPassed {
            addr: addr.clone(),
            name: name.clone(),
            passed: if passed.is_empty() {
                "none left".into()
            } else {
                passed.join(":")
            },
        });
    } else {
        // Only sockets we create are ours to chown (systemd's follow the
        // unit's SocketUser=/SocketGroup=).
        let mut l = Listener::bind(addr, backlog, mode)?;
        if let Err(e) = l.chown(owner) {
            l.remove_file();
            return Err(e);
        }
        l
    };
    l.key = key.to_string();
    Ok(l)
}

/// A `systemd:NAME` socket's kind is known only once adopted: checks that
/// the service's plugin serves it (the config's other addresses were
/// checked by [`resolve::resolve`]).
fn check_kind(plugin: &PluginInfo, l: &Listener) -> Result<(), ListenError> {
    if l.addr.systemd_name().is_none() {
        return Ok(());
    }
    let stream = l.bound.is_stream();
    if resolve::serves(plugin, stream) {
        return Ok(());
    }
    Err(ListenError::WrongKind {
        addr: l.addr.clone(),
        bound: l.bound.clone(),
        plugin: plugin.name.clone(),
        kind: resolve::kind(stream),
    })
}

impl Master {
    /// The listener named `key`.
    pub(super) fn listener(&self, key: &str) -> Option<&Listener> {
        find(&self.listeners, key)
    }

    /// Closes the listeners named `keys` (bound by a reload that failed).
    pub(super) fn close_listeners(&mut self, keys: &[String]) {
        self.listeners.retain_mut(|l| {
            if keys.contains(&l.key) {
                l.remove_file();
                false
            } else {
                true
            }
        });
    }

    /// Closes listeners that no generation names any more, once the
    /// generations that did have left (their workers hold copies, and may
    /// still be finishing connections accepted on them).
    pub(super) fn close_unused_listeners(&mut self) {
        if self.reload.is_some() || self.draining() || self.handover.is_some() {
            return;
        }
        let used: Vec<String> = self
            .pools
            .iter()
            .flat_map(|p| p.listeners.iter().cloned())
            .chain(self.config.metrics.listen_key())
            .collect();
        self.listeners.retain_mut(|l| {
            if used.contains(&l.key) {
                return true;
            }
            log::info!("no longer listening on {}", l.bound);
            l.remove_file();
            false
        });
    }
}
