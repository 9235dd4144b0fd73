//! Binary upgrade (SIGUSR2, `preforkd upgrade`): what passes from the old
//! master to the new one, nginx's way.
//!
//! The old master runs the binary at the path it was started from (not
//! /proc/self/exe, which after a package upgrade is the deleted old file),
//! with the listening sockets inherited: close-on-exec is cleared on just
//! those descriptors for the moment of the exec. The environment says which
//! descriptor is which, and where to report:
//!
//! - `PREFORKD_INHERIT_FDS`: `FD=ADDR` entries, one per line, ADDR as
//!   written in the config (`tcp://127.0.0.1:8009`, `unix:/run/x.sock`), or
//!   `control:PATH` for the control socket;
//! - `PREFORKD_UPGRADE_FD`: a pipe on which the new master writes
//!   `ready PID` once its first generation is ready, or `error: REASON`;
//! - `PREFORKD_UPGRADE_LIFELINE`: the read end of a pipe whose write end
//!   the old master holds until it exits (after its last worker): at EOF the
//!   old generation is gone, and the new master may start a reload (at most
//!   two generations alive, across masters too);
//! - `PREFORKD_UPGRADE_FROM`: the old master's pid;
//! - `PREFORKD_GENERATION`: the last generation number the old master used
//!   (it reserves the next one for the new master's first generation);
//! - `PREFORKD_INHERIT_SYSTEMD`: the keys, one a line, of the sockets that
//!   systemd passed (socket activation), which stay systemd's: never shut
//!   down nor unlinked.
//!
//! The new master reads them once at start and removes them from its
//! environment, so that neither workers nor programs they run see them.
//!
//! Owns: the encoding of that environment, and the inherited descriptors
//! until the new master adopts them.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Descriptor table of the inherited sockets.
pub const ENV_FDS: &str = "PREFORKD_INHERIT_FDS";
/// The readiness pipe to the old master.
pub const ENV_NOTIFY: &str = "PREFORKD_UPGRADE_FD";
/// The old master's pid.
pub const ENV_FROM: &str = "PREFORKD_UPGRADE_FROM";
/// The pipe that reaches EOF when the old master has exited.
pub const ENV_LIFELINE: &str = "PREFORKD_UPGRADE_LIFELINE";
/// The last generation number the old master used.
pub const ENV_GENERATION: &str = "PREFORKD_GENERATION";
/// Keys (one a line) of the inherited sockets that systemd passed to a
/// master before (socket activation): systemd owns them and their files.
pub const ENV_SYSTEMD: &str = "PREFORKD_INHERIT_SYSTEMD";

/// The key of the control socket in [`ENV_FDS`].
pub fn control_key(path: &Path) -> String {
    format!("control:{}", path.display())
}

/// Encodes `FD=KEY` entries for [`ENV_FDS`].
pub fn encode(entries: &[(RawFd, String)]) -> String {
    entries
        .iter()
        .map(|(fd, key)| format!("{fd}={key}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Decodes [`ENV_FDS`]; a malformed entry is an error.
pub fn decode(text: &str) -> Result<Vec<(RawFd, String)>, String> {
    text.split('\n')
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (fd, key) = e
                .split_once('=')
                .ok_or_else(|| format!("{ENV_FDS}: malformed entry {e:?}"))?;
            let fd: RawFd = fd
                .parse()
                .ok()
                .filter(|fd| *fd > 2)
                .ok_or_else(|| format!("{ENV_FDS}: bad descriptor in {e:?}"))?;
            Ok((fd, key.to_string()))
        })
        .collect()
}

/// What the previous master handed over, as the new master finds it.
pub struct Inherited {
    /// Sockets by key (config address, or `control:PATH`).
    pub fds: HashMap<String, OwnedFd>,
    /// Where to report readiness.
    pub notify: Option<OwnedFd>,
    /// EOF once the old master has exited.
    pub lifeline: Option<OwnedFd>,
    /// The previous master.
    pub from: Option<i32>,
    /// The previous master's generation.
    pub generation: u64,
    /// Keys of the sockets that systemd owns ([`ENV_SYSTEMD`]).
    pub systemd: Vec<String>,
}

impl Inherited {
    /// Reads and removes the upgrade variables. None when this master was
    /// not started by an upgrade. Call once, before any thread or fork.
    pub fn from_env() -> Result<Option<Inherited>, String> {
        let Some(table) = std::env::var_os(ENV_FDS) else {
            return Ok(None);
        };
        let notify = std::env::var(ENV_NOTIFY).ok();
        let lifeline = std::env::var(ENV_LIFELINE).ok();
        let from = std::env::var(ENV_FROM).ok();
        let generation = std::env::var(ENV_GENERATION).ok();
        let systemd = std::env::var(ENV_SYSTEMD).unwrap_or_default();
        crate::sys::remove_env(&[
            ENV_FDS,
            ENV_NOTIFY,
            ENV_LIFELINE,
            ENV_FROM,
            ENV_GENERATION,
            ENV_SYSTEMD,
        ])
        .map_err(|e| format!("cannot clear the upgrade environment: {e}"))?;
        let table = table
            .into_string()
            .map_err(|_| format!("{ENV_FDS} is not UTF-8"))?;
        let mut fds = HashMap::new();
        for (fd, key) in decode(&table)? {
            fds.insert(key, take_fd(fd)?);
        }
        let fd_var = |name: &str, value: Option<String>| -> Result<Option<OwnedFd>, String> {
            value
                .map(|n| {
                    n.parse()
                        .map_err(|_| format!("{name}: bad descriptor {n:?}"))
                        .and_then(take_fd)
                })
                .transpose()
        };
        let notify = fd_var(ENV_NOTIFY, notify)?;
        let lifeline = fd_var(ENV_LIFELINE, lifeline)?;
        Ok(Some(Inherited {
            fds,
            notify,
            lifeline,
            from: from.and_then(|p| p.parse().ok()),
            generation: generation.and_then(|g| g.parse().ok()).unwrap_or(0),
            systemd: systemd
                .split('\n')
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect(),
        }))
    }

    /// Tells the old master we failed (best effort: it may be gone).
    pub fn report_error(&mut self, reason: &str) {
        if let Some(fd) = self.notify.take() {
            report_error(fd, reason);
        }
    }
}

/// Writes `error: REASON` to the old master's pipe.
pub fn report_error(fd: OwnedFd, reason: &str) {
    let mut f = std::fs::File::from(fd);
    let _ = f.write_all(format!("error: {}\n", reason.replace('\n', " ")).as_bytes());
}

/// Writes `ready PID` to the old master's pipe.
pub fn report_ready(fd: OwnedFd, pid: u32) -> io::Result<()> {
    let mut f = std::fs::File::from(fd);
    f.write_all(format!("ready {pid}\n").as_bytes())
}

fn take_fd(fd: RawFd) -> Result<OwnedFd, String> {
    crate::sys::take_inherited_fd(fd).map_err(|e| format!("inherited descriptor {fd}: {e}"))
}

/// The program and arguments that start the next master: the path this
/// binary was started from, made absolute at start (a later `chdir` does
/// not break it), and an explicit command line.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl Exec {
    /// The binary this process was started as (argv\[0\], resolved against
    /// the working directory or PATH now), to run again with `args`.
    pub fn current(args: Vec<OsString>) -> io::Result<Exec> {
        let argv0 = std::env::args_os()
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "argv[0] is empty"))?;
        let argv0 = PathBuf::from(argv0);
        let program = if argv0.components().count() > 1 || argv0.is_absolute() {
            std::path::absolute(&argv0)?
        } else {
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join(&argv0))
                .find(|p| p.is_file())
                .map(|p| std::path::absolute(&p))
                .transpose()?
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} is not in PATH", argv0.display()),
                    )
                })?
        };
        Ok(Exec { program, args })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_table_round_trips() {
        let entries = vec![
            (3, "tcp://127.0.0.1:0".to_string()),
            (7, "unix:/tmp/a;b=c.sock".to_string()),
            (9, "control:/run/p.sock".to_string()),
        ];
        assert_eq!(decode(&encode(&entries)).unwrap(), entries);
        assert!(decode("3").is_err());
        assert!(decode("x=tcp://1.2.3.4:5").is_err());
        assert!(
            decode("1=tcp://1.2.3.4:5").is_err(),
            "stdio is never inherited"
        );
        assert_eq!(decode("").unwrap(), vec![]);
    }
}
