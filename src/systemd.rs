//! systemd integration: the master's sd_notify(3) messages to the service
//! manager (`READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=`, `MAINPID=`,
//! `WATCHDOG=1`).
//!
//! The message vocabulary comes from the `sd-notify` crate
//! ([`NotifyState`]); the sending is ours, in [`Notifier`], because the
//! crate's `notify()` does not fit the master:
//!
//! - it reads `NOTIFY_SOCKET` at every call, but the master removes the
//!   variable from its environment before its first fork, so that workers
//!   (and whatever they run) never see it; the master keeps the value here,
//!   and passes it explicitly to the next master of a binary upgrade;
//! - it sends on a blocking socket, so a service manager that is slow to
//!   read would block the master's loop; ours is nonblocking, and a full
//!   queue drops the message (logged at debug);
//! - it takes `@name` for a file name, where sd_notify(3) means the
//!   abstract socket `name`.
//!
//! Failing to send is never fatal: it is logged at debug level.
//!
//! Owns: the `NOTIFY_SOCKET` address and the watchdog interval, read once
//! from the environment by [`Notifier::from_env`].

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub use sd_notify::NotifyState;

/// Where the service manager listens: a path, or `@name` (abstract).
pub const ENV_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog timeout, in microseconds.
pub const ENV_WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The process the watchdog timeout is meant for (unset: whoever reads it).
pub const ENV_WATCHDOG_PID: &str = "WATCHDOG_PID";

/// The longest `STATUS=` text sent; longer ones are cut (a reload error
/// can quote a long config line).
const MAX_STATUS: usize = 400;

/// Sends sd_notify(3) messages, if the service manager asked for them.
/// The default sends nothing.
#[derive(Debug, Default)]
pub struct Notifier {
    /// `NOTIFY_SOCKET` as found (passed on to the next master as is).
    socket: Option<OsString>,
    /// Its parsed address; None if unset or unusable.
    addr: Option<SocketAddr>,
    /// `WATCHDOG_USEC`, when it is meant for this process.
    watchdog: Option<Duration>,
    /// Set in a new master of a binary upgrade until it has taken over:
    /// until then the old master is the service's main process, and a
    /// message from the new one (`STOPPING=1` when it fails to boot) would
    /// mislead the service manager.
    held: bool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and
    /// removes them from the environment so that no worker inherits them.
    /// Call once, while single-threaded and before the first fork.
    pub fn from_env() -> io::Result<Notifier> {
        let socket = std::env::var_os(ENV_SOCKET).filter(|s| !s.is_empty());
        // WATCHDOG_PID, when set, must be ours (sd_watchdog_enabled(3)).
        let watchdog = sd_notify::watchdog_enabled();
        crate::sys::remove_env(&[ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID])?;
        Ok(Notifier::new(socket, watchdog))
    }

    /// A notifier for `socket` (a `NOTIFY_SOCKET` value) with an optional
    /// watchdog timeout. An unusable address is logged and disables it.
    pub fn new(socket: Option<OsString>, watchdog: Option<Duration>) -> Notifier {
        let addr = socket.as_deref().and_then(|s| match address(s) {
            Ok(a) => Some(a),
            Err(e) => {
                log::warn!(
                    "{ENV_SOCKET}={}: {e}; not notifying the service manager",
                    s.to_string_lossy()
                );
                None
            }
        });
        Notifier {
            socket,
            addr,
            watchdog: watchdog.filter(|d| !d.is_zero()),
            held: false,
        }
    }

    /// Whether messages go anywhere.
    pub fn enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the watchdog timeout, as
    /// sd_watchdog_enabled(3) advises. None without a watchdog.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled()).map(|d| d / 2)
    }

    /// Holds every message back until [`Notifier::release`].
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// Ends [`Notifier::hold`].
    pub fn release(&mut self) {
        self.held = false;
    }

    /// Whether messages are held back.
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// The variables the next master of a binary upgrade needs to go on
    /// notifying: the socket and the watchdog timeout (without
    /// `WATCHDOG_PID`, so that it applies to the new process).
    pub fn successor_env(&self) -> Vec<(&'static str, OsString)> {
        let mut env = Vec::new();
        if let Some(s) = &self.socket {
            env.push((ENV_SOCKET, s.clone()));
        }
        if let Some(w) = self.watchdog {
            env.push((ENV_WATCHDOG_USEC, w.as_micros().to_string().into()));
        }
        env
    }

    /// Sends `states` in one datagram; does nothing when disabled or held.
    /// Never blocks; a failure is logged at debug level.
    pub fn send(&self, states: &[NotifyState<'_>]) {
        let Some(addr) = self.addr.as_ref().filter(|_| !self.held) else {
            return;
        };
        let msg = message(states);
        let sent = UnixDatagram::unbound().and_then(|sock| {
            sock.set_nonblocking(true)?;
            sock.send_to_addr(msg.as_bytes(), addr)
        });
        match sent {
            Ok(n) if n == msg.len() => {}
            Ok(n) => log::debug!("sd_notify: sent {n} of {} bytes", msg.len()),
            Err(e) => log::debug!("sd_notify: cannot send {:?}: {e}", msg.trim_end()),
        }
    }
}

/// The address `NOTIFY_SOCKET` names: an absolute path, or `@name` for
/// the abstract socket `name` (sd_notify(3)).
pub fn address(socket: &OsStr) -> io::Result<SocketAddr> {
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected an absolute path or @abstract-name",
        )),
    }
}

/// The datagram for `states`: one `KEY=VALUE` line each.
pub fn message(states: &[NotifyState<'_>]) -> String {
    states.iter().map(|s| format!("{s}\n")).collect()
}

/// `text` made fit for `STATUS=`: one line, at most a few hundred bytes.
pub fn status_text(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MAX_STATUS {
        let mut end = MAX_STATUS;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str("...");
    }
    line
}

/// `MONOTONIC_USEC=` now (CLOCK_MONOTONIC), for `RELOADING=1`; None if
/// the clock cannot be read.
pub fn monotonic_now() -> Option<NotifyState<'static>> {
    NotifyState::monotonic_usec_now()
        .map_err(|e| log::debug!("clock_gettime(CLOCK_MONOTONIC) failed: {e}"))
        .ok()
}

/// The number of sockets systemd passed (socket activation).
pub const ENV_LISTEN_FDS: &str = "LISTEN_FDS";
/// The process they are meant for.
pub const ENV_LISTEN_PID: &str = "LISTEN_PID";
/// Their `FileDescriptorName=`s, colon-separated.
pub const ENV_LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// One socket passed by systemd: its `FileDescriptorName=` (systemd's
/// default is the socket unit's name, or `unknown` without names) and the
/// descriptor, close-on-exec.
#[derive(Debug)]
pub struct Activated {
    /// `FileDescriptorName=`.
    pub name: String,
    /// The socket (not yet checked to be one).
    pub fd: OwnedFd,
}

/// Reads `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` (sd_listen_fds(3))
/// and removes them from the environment, whatever they say, so that no
/// worker (nor what it runs) sees them. The descriptors are taken only when
/// `LISTEN_PID` is this process and `take` is set (false in the new master
/// of a binary upgrade, whose descriptors come from the old master). Call
/// once, first thing, while single-threaded.
pub fn take_listen_fds(take: bool) -> Result<Vec<Activated>, String> {
    let fds = std::env::var(ENV_LISTEN_FDS).ok();
    let pid = std::env::var(ENV_LISTEN_PID).ok();
    let names = std::env::var(ENV_LISTEN_FDNAMES).ok();
    crate::sys::remove_env(&[ENV_LISTEN_FDS, ENV_LISTEN_PID, ENV_LISTEN_FDNAMES])
        .map_err(|e| format!("cannot clear the socket activation environment: {e}"))?;
    let Some(fds) = fds else {
        return Ok(Vec::new());
    };
    let ours = pid
        .as_deref()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !ours {
        log::warn!(
            "ignoring {ENV_LISTEN_FDS}={fds}: {ENV_LISTEN_PID}={} is not this process ({})",
            pid.as_deref().unwrap_or("(unset)"),
            std::process::id()
        );
        return Ok(Vec::new());
    }
    if !take {
        log::warn!("ignoring {ENV_LISTEN_FDS}={fds} in the new master of a binary upgrade");
        return Ok(Vec::new());
    }
    let n: RawFd = fds
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| format!("{ENV_LISTEN_FDS}={fds:?} is not a count of descriptors"))?;
    let names: Vec<String> = match names {
        Some(names) => names.split(':').map(str::to_string).collect(),
        None => Vec::new(),
    };
    if !names.is_empty() && names.len() != n as usize {
        log::warn!(
            "{ENV_LISTEN_FDNAMES} has {} names for {n} descriptors; the others are named \"unknown\"",
            names.len()
        );
    }
    (0..n)
        .map(|i| {
            let fd = LISTEN_FDS_START + i;
            let fd = crate::sys::take_inherited_fd(fd)
                .map_err(|e| format!("descriptor {fd} passed by systemd: {e}"))?;
            let name = names
                .get(i as usize)
                .filter(|n| !n.is_empty())
                .cloned()
                .unwrap_or_else(|| "unknown".to_string());
            Ok(Activated { name, fd })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_per_state() {
        assert_eq!(
            message(&[NotifyState::Ready, NotifyState::Status("generation 1")]),
            "READY=1\nSTATUS=generation 1\n"
        );
        assert_eq!(
            message(&[NotifyState::Reloading, NotifyState::MonotonicUsec(42)]),
            "RELOADING=1\nMONOTONIC_USEC=42\n"
        );
        assert_eq!(message(&[NotifyState::MainPid(7)]), "MAINPID=7\n");
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let a = address(OsStr::new("@sd/notify")).unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"sd/notify"[..]));
        let p = address(OsStr::new("/run/systemd/notify")).unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(address(OsStr::new("relative/notify")).is_err());
        assert!(address(OsStr::new("")).is_err());
    }

    #[test]
    fn status_text_is_one_bounded_line() {
        assert_eq!(status_text("a\nb\tc"), "a b c");
        let long = "é".repeat(MAX_STATUS);
        let cut = status_text(&long);
        assert!(cut.len() <= MAX_STATUS + 3 && cut.ends_with("..."), "{cut}");
    }

    #[test]
    fn watchdog_is_half_the_timeout_and_needs_a_socket() {
        let n = Notifier::new(Some("@x".into()), Some(Duration::from_micros(200_000)));
        assert_eq!(n.watchdog_interval(), Some(Duration::from_millis(100)));
        assert_eq!(
            n.successor_env(),
            vec![
                (ENV_SOCKET, OsString::from("@x")),
                (ENV_WATCHDOG_USEC, OsString::from("200000"))
            ]
        );
        let none = Notifier::new(None, Some(Duration::from_secs(1)));
        assert_eq!(none.watchdog_interval(), None);
        let zero = Notifier::new(Some("@x".into()), Some(Duration::ZERO));
        assert_eq!(zero.watchdog_interval(), None);
    }

    #[test]
    fn a_held_notifier_sends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut n = Notifier::new(Some(path.clone().into()), None);
        n.hold();
        n.send(&[NotifyState::Ready]);
        let mut buf = [0u8; 64];
        assert!(rx.recv(&mut buf).is_err(), "a held notifier sent");
        n.release();
        n.send(&[NotifyState::Ready]);
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1\n");
    }
}
