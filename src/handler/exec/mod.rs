//! `exec`: runs a program per connection (inetd / DJB tcpserver style), with
//! the socket as its stdin and stdout, its stderr in the log, and the UCSPI
//! environment (`PROTO`, `TCPREMOTEIP`, …). On datagram sockets: one run per
//! datagram, the payload on stdin, stdout (at most [`MAX_REPLY`]) the reply.
//!
//! It serves both worker modes. This file holds what they share: the
//! options, a run's environment, starting the program, when to stop it
//! ([`Deadlines`]), its stderr in the log and what the log says of its
//! end. A `mode = "threads"` worker waits for each program on the thread
//! that serves the connection (`threads.rs`, poll(2)); a `mode = "async"`
//! worker waits for all of them on its one loop, each program's pidfd and
//! pipes registered with the loop, no thread per program (`event.rs`).
//!
//! Owns: nothing beyond a run: its pipes, pidfd and process group belong
//! to the handler call that started it, which reaps the program before it
//! returns.

mod event;
mod threads;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

use super::{Addr, Datagram, Handlers, IO_TICK, PluginContext, PluginInfo, WorkerMode};
use crate::sys;

const OPTIONS: &[&str] = &["command", "env", "clear_env", "cwd", "timeout"];
/// Longest stderr line logged; the rest of the line is dropped.
const MAX_LINE: usize = 1024;
/// stderr logged per run; the rest is counted and dropped.
const MAX_STDERR: usize = 64 * 1024;
/// Largest datagram reply; the rest of stdout is dropped.
pub const MAX_REPLY: usize = 64 * 1024;
/// Between TERM and KILL (at most; see [`Exec::stop_margin`]).
const KILL_GRACE: Duration = Duration::from_millis(500);

struct Exec {
    service: String,
    program: PathBuf,
    /// `argv[0]`: the command as written.
    argv0: OsString,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    clear_env: bool,
    cwd: Option<PathBuf>,
    timeout: Option<Duration>,
    graceful: Duration,
}

fn parse(ctx: &PluginContext<'_>) -> Result<Exec, String> {
    ctx.expect_options("exec", OPTIONS)?;
    let o = ctx.options;
    let command = match o.get("command") {
        Some(toml::Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(OsString::from(s)),
                _ => Err(
                    "plugin \"exec\": option \"command\" must be an array of strings".to_string(),
                ),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(
                "plugin \"exec\": option \"command\" must be a non-empty array of strings, e.g. [\"/bin/cat\"]"
                    .into(),
            );
        }
        None => {
            return Err(
                "plugin \"exec\" needs option \"command\", e.g. command = [\"/bin/cat\"]".into(),
            );
        }
    };
    let mut env = Vec::new();
    match o.get("env") {
        None => {}
        Some(toml::Value::Table(t)) => {
            for (k, v) in t {
                let v = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    _ => {
                        return Err(format!(
                            "plugin \"exec\": env.{k} must be a string, integer or boolean"
                        ));
                    }
                };
                if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                    return Err(format!(
                        "plugin \"exec\": env has an invalid variable {k:?}"
                    ));
                }
                env.push((k.clone(), v));
            }
        }
        Some(_) => return Err("plugin \"exec\": option \"env\" must be a table".into()),
    }
    let clear_env = match o.get("clear_env") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => {
            return Err("plugin \"exec\": option \"clear_env\" must be true or false".into());
        }
    };
    let cwd = match o.get("cwd") {
        None => None,
        Some(toml::Value::String(s)) => {
            let p = PathBuf::from(s);
            if !p.is_dir() {
                return Err(format!("plugin \"exec\": cwd {s:?} is not a directory"));
            }
            Some(p)
        }
        Some(_) => return Err("plugin \"exec\": option \"cwd\" must be a string".into()),
    };
    let timeout = match o.get("timeout") {
        None => None,
        Some(toml::Value::String(s)) => match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => None,
            Err(e) => {
                return Err(format!(
                    "plugin \"exec\": timeout {s:?} is not a duration ({e}); write e.g. \"30s\""
                ));
            }
        },
        Some(_) => {
            return Err(
                "plugin \"exec\": option \"timeout\" must be a duration string like \"30s\"".into(),
            );
        }
    };
    let program = resolve(Path::new(&command[0]))?;
    Ok(Exec {
        service: ctx.service.to_string(),
        program,
        argv0: command[0].clone(),
        args: command[1..].to_vec(),
        env,
        clear_env,
        cwd,
        timeout,
        graceful: ctx.graceful_timeout,
    })
}

/// Finds the program (a PATH lookup for a bare name) and checks that it is
/// an executable file.
fn resolve(name: &Path) -> Result<PathBuf, String> {
    let found = if name.as_os_str().as_encoded_bytes().contains(&b'/') {
        name.to_path_buf()
    } else {
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "plugin \"exec\": program {:?} not found in PATH; give its absolute path",
                    name.display().to_string()
                )
            })?
    };
    let meta = std::fs::metadata(&found)
        .map_err(|e| format!("plugin \"exec\": program {}: {e}", found.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "plugin \"exec\": program {} is not a file",
            found.display()
        ));
    }
    if nix::unistd::access(&found, nix::unistd::AccessFlags::X_OK).is_err() {
        return Err(format!(
            "plugin \"exec\": program {} is not executable (chmod +x it)",
            found.display()
        ));
    }
    Ok(found)
}

pub(super) fn plugin() -> PluginInfo {
    PluginInfo::new(
        "exec",
        "runs a program per connection (inetd/tcpserver style, UCSPI environment)",
        |ctx| {
            let exec = parse(ctx)?;
            Ok(match ctx.mode {
                WorkerMode::Threads => Handlers::both(exec),
                WorkerMode::Async => {
                    let exec = Rc::new(exec);
                    Handlers::default()
                        .with_async(event::ExecAsync(exec.clone()))
                        .with_async_datagram(event::ExecAsync(exec))
                }
            })
        },
    )
    .serves(true, true)
    .modes(true, true)
    .with_check(|ctx| parse(ctx).map(drop))
}

/// A run's environment, by name.
struct Env(BTreeMap<OsString, OsString>);

impl Env {
    fn env(&mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> &mut Env {
        self.0.insert(k.into(), v.into());
        self
    }
}

fn ip_port(a: &Addr) -> Option<(String, String)> {
    match a {
        Addr::Inet(s) => Some((s.ip().to_string(), s.port().to_string())),
        Addr::Unix(_) => None,
    }
}

/// A started program: its pid (also its process group's) and the read
/// ends of its pipes, nonblocking.
struct Run {
    pid: u32,
    stderr: OwnedFd,
    /// A datagram run's stdout: the reply.
    stdout: Option<OwnedFd>,
}

impl Exec {
    /// The environment of one run, before the UCSPI variables.
    fn command(&self) -> Env {
        let mut env = Env(BTreeMap::new());
        if !self.clear_env {
            env.0.extend(std::env::vars_os());
        }
        env.env("PREFORKD_SERVICE", &self.service);
        env
    }

    /// The environment of a connection's run: UCSPI's TCP or UNIX
    /// variables, the client's credentials read from `socket` for a Unix
    /// socket.
    fn stream_env(&self, local: &Addr, peer: &Addr, socket: BorrowedFd<'_>) -> Env {
        let mut cmd = self.command();
        match local {
            Addr::Inet(_) => {
                cmd.env("PROTO", "TCP");
                if let Some((ip, port)) = ip_port(local) {
                    cmd.env("TCPLOCALIP", ip).env("TCPLOCALPORT", port);
                }
                if let Some((ip, port)) = ip_port(peer) {
                    cmd.env("TCPREMOTEIP", ip).env("TCPREMOTEPORT", port);
                }
            }
            Addr::Unix(path) => {
                cmd.env("PROTO", "UNIX");
                if let Some(p) = path {
                    cmd.env("UNIXLOCALPATH", p);
                }
                let cred = nix::sys::socket::getsockopt(
                    &socket,
                    nix::sys::socket::sockopt::PeerCredentials,
                );
                if let Ok(c) = cred {
                    cmd.env("UNIXREMOTEPID", c.pid().to_string())
                        .env("UNIXREMOTEEUID", c.uid().to_string())
                        .env("UNIXREMOTEEGID", c.gid().to_string())
                        .env("UNIXREMOTEUID", c.uid().to_string())
                        .env("UNIXREMOTEGID", c.gid().to_string());
                }
            }
        }
        cmd
    }

    /// Starts a connection's program: `socket` as its stdin and stdout, a
    /// pipe as its stderr.
    fn start_stream(&self, env: Env, socket: RawFd) -> io::Result<Run> {
        let (err_rd, err_wr) = pipe()?;
        let pid = self.spawn(env, [socket, socket, err_wr.as_raw_fd()])?;
        Ok(Run {
            pid,
            stderr: err_rd,
            stdout: None,
        })
    }

    /// Starts a datagram's program: the payload on its stdin, pipes as its
    /// stdout and stderr.
    fn start_datagram(&self, datagram: &Datagram<'_>) -> io::Result<Run> {
        let mut cmd = self.command();
        match datagram.peer {
            Addr::Inet(a) => {
                cmd.env("PROTO", "UDP")
                    .env("UDPREMOTEIP", a.ip().to_string())
                    .env("UDPREMOTEPORT", a.port().to_string());
            }
            Addr::Unix(p) => {
                cmd.env("PROTO", "UNIX");
                if let Some(p) = p {
                    cmd.env("UNIXREMOTEPATH", p);
                }
            }
        }
        // The payload (at most 64 KiB, a pipe's capacity) is written before
        // the program starts, so nothing can block on it.
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut wr = std::fs::File::from(wr);
        set_nonblocking(&wr)?;
        let mut written = 0;
        while written < datagram.data.len() {
            match io::Write::write(&mut wr, &datagram.data[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("exec {}: payload cut at {written} bytes: {e}", self.service);
                    break;
                }
            }
        }
        drop(wr);
        let (out_rd, out_wr) = pipe()?;
        let (err_rd, err_wr) = pipe()?;
        let pid = self.spawn(
            cmd,
            [rd.as_raw_fd(), out_wr.as_raw_fd(), err_wr.as_raw_fd()],
        )?;
        Ok(Run {
            pid,
            stderr: err_rd,
            stdout: Some(out_rd),
        })
    }

    /// Starts the program with `env` (plus the `env` option) and `stdio`.
    fn spawn(&self, mut env: Env, stdio: [RawFd; 3]) -> io::Result<u32> {
        self.finish_env(&mut env);
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
        };
        let mut argv = Vec::with_capacity(self.args.len() + 1);
        argv.push(cstr(self.argv0.as_bytes())?);
        for a in &self.args {
            argv.push(cstr(a.as_bytes())?);
        }
        let mut envp = Vec::with_capacity(env.0.len());
        for (k, v) in env.0 {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(cstr(&kv)?);
        }
        let spec = sys::ProgramSpawn {
            path: cstr(self.program.as_os_str().as_bytes())?,
            argv,
            envp,
            cwd: match &self.cwd {
                Some(d) => Some(cstr(d.as_os_str().as_bytes())?),
                None => None,
            },
            stdio,
            default_signals: &crate::signals::EXEC_DEFAULT,
        };
        sys::spawn_program(&spec).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run {}: {e}", self.program.display()),
            )
        })
    }

    /// How long before `graceful_timeout` (when the master kills the
    /// worker) a program still running at a stop gets its TERM: half a
    /// second for the KILL, half a second for the worker to exit and the
    /// master to reap it; less for a short `graceful_timeout`.
    fn stop_margin(&self) -> Duration {
        (self.graceful / 2).min(2 * KILL_GRACE)
    }

    fn kill_grace(&self, stopping: bool) -> Duration {
        if stopping {
            (self.stop_margin() / 2).min(KILL_GRACE)
        } else {
            KILL_GRACE
        }
    }

    fn finish_env(&self, cmd: &mut Env) {
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
    }

    /// Logs how a run ended: killed (and why), by a signal, a non-zero
    /// exit status, a reply cut short.
    fn report(&self, pid: u32, status: WaitStatus, killed: Option<&str>, dropped_out: usize) {
        let (code, signal) = match status {
            WaitStatus::Exited(_, c) => (Some(c), None),
            WaitStatus::Signaled(_, s, _) => (None, Some(s.as_str())),
            _ => (None, None),
        };
        let tag = format!("exec {}[pid {pid}]", self.service);
        if let Some(why) = killed {
            log::warn!(
                "{tag}: killed {why} ({})",
                match signal {
                    Some(s) => format!("died of signal {s}"),
                    None => format!("exit status {}", code.unwrap_or(-1)),
                }
            );
        } else if let Some(s) = signal {
            log::warn!("{tag}: killed by signal {s}");
        } else if let Some(c) = code.filter(|&c| c != 0) {
            log::warn!("{tag}: exit status {c}");
        }
        if dropped_out > 0 {
            log::warn!("{tag}: reply cut at {MAX_REPLY} bytes ({dropped_out} bytes dropped)");
        }
    }
}

/// When a run is stopped: at its `timeout`, or at `graceful_timeout` less
/// [`Exec::stop_margin`] after the worker is asked to stop. TERM goes to
/// the program's process group first (what it started, double-forked or
/// not, is in it), KILL [`Exec::kill_grace`] later and again every
/// [`IO_TICK`] until the program is gone. Both modes' waits drive it.
struct Deadlines<'a> {
    exec: &'a Exec,
    pid: u32,
    started: Instant,
    stop_at: Option<Instant>,
    /// When TERM was sent, and why (for the log).
    killed: Option<(Instant, &'static str)>,
}

impl<'a> Deadlines<'a> {
    fn new(exec: &'a Exec, pid: u32) -> Deadlines<'a> {
        Deadlines {
            exec,
            pid,
            started: Instant::now(),
            stop_at: None,
            killed: None,
        }
    }

    /// The worker has been asked to stop (noted once).
    fn stopping(&mut self, now: Instant) {
        if self.stop_at.is_none() {
            let e = self.exec;
            self.stop_at = Some(now + e.graceful.saturating_sub(e.stop_margin()));
        }
    }

    /// Sends what is due at `now`; returns when something is due next.
    fn step(&mut self, now: Instant) -> Option<Instant> {
        let timeout_at = self.exec.timeout.map(|t| self.started + t);
        match self.killed {
            None => {
                let why = if timeout_at.is_some_and(|t| now >= t) {
                    Some("after its timeout")
                } else if self.stop_at.is_some_and(|s| now >= s) {
                    Some("at the end of its graceful_timeout after the worker was asked to stop")
                } else {
                    None
                };
                match why {
                    Some(why) => {
                        sys::kill_group(self.pid, Signal::SIGTERM);
                        self.killed = Some((now, why));
                        Some(now + self.exec.kill_grace(self.stop_at.is_some()))
                    }
                    None => timeout_at.into_iter().chain(self.stop_at).min(),
                }
            }
            Some((at, _)) => {
                let kill_at = at + self.exec.kill_grace(self.stop_at.is_some());
                if now >= kill_at {
                    sys::kill_group(self.pid, Signal::SIGKILL);
                    Some(now + IO_TICK)
                } else {
                    Some(kill_at)
                }
            }
        }
    }

    /// Why the program was sent TERM, if it was.
    fn killed(&self) -> Option<&'static str> {
        self.killed.map(|(_, why)| why)
    }
}

/// A pipe, close-on-exec, its read end (ours) nonblocking.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    set_nonblocking(&rd)?;
    Ok((rd, wr))
}

fn set_nonblocking(fd: &impl std::os::fd::AsFd) -> io::Result<()> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

/// What reading a pipe found.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pipe {
    /// Nothing more for now (EAGAIN): wait until it is readable.
    Empty,
    /// The reads allowed were used; there may be more at once.
    More,
    /// EOF (or an error): no one writes to it any more.
    Closed,
}

/// Reads for a program's whole stdout while it runs (a loop turn of the
/// async worker reads at most this many times from one pipe before it
/// serves the others; [`DRAIN_READS`] at the program's end).
const TURN_READS: usize = 16;
/// Reads of a pipe after the program has exited: more than a pipe holds.
const DRAIN_READS: usize = 64;

/// The reply of a datagram run, collected from its stdout.
struct Reply<'r> {
    buf: &'r mut Vec<u8>,
    /// Bytes beyond MAX_REPLY, read and dropped.
    dropped: usize,
}

impl Reply<'_> {
    /// Reads what is there into the reply, up to MAX_REPLY (the rest read
    /// and dropped), at most `reads` reads of 16 KiB.
    fn collect(&mut self, fd: &OwnedFd, reads: usize) -> Pipe {
        let mut chunk = [0u8; 16 * 1024];
        for _ in 0..reads {
            match nix::unistd::read(fd, &mut chunk) {
                Ok(0) => return Pipe::Closed,
                Ok(n) => {
                    let room = MAX_REPLY.saturating_sub(self.buf.len()).min(n);
                    self.buf.extend_from_slice(&chunk[..room]);
                    self.dropped += n - room;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return Pipe::Empty,
                Err(_) => return Pipe::Closed,
            }
        }
        Pipe::More
    }
}

/// A program's stderr, logged line by line.
struct StderrLog<'a> {
    service: &'a str,
    pid: u32,
    line: Vec<u8>,
    /// Bytes of the current line beyond MAX_LINE.
    cut: usize,
    logged: usize,
    dropped: usize,
}

impl<'a> StderrLog<'a> {
    fn new(service: &'a str, pid: u32) -> Self {
        StderrLog {
            service,
            pid,
            line: Vec::new(),
            cut: 0,
            logged: 0,
            dropped: 0,
        }
    }

    /// Reads what is there, at most `reads` reads of 4 KiB.
    fn drain(&mut self, fd: &OwnedFd, reads: usize) -> Pipe {
        let mut chunk = [0u8; 4096];
        for _ in 0..reads {
            match nix::unistd::read(fd, &mut chunk) {
                Ok(0) => return Pipe::Closed,
                Ok(n) => self.feed(&chunk[..n]),
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return Pipe::Empty,
                Err(_) => return Pipe::Closed,
            }
        }
        Pipe::More
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (part, rest, end) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &[][..], false),
            };
            let room = MAX_LINE.saturating_sub(self.line.len()).min(part.len());
            self.line.extend_from_slice(&part[..room]);
            self.cut += part.len() - room;
            if end {
                self.emit();
            }
            data = rest;
        }
    }

    fn emit(&mut self) {
        let len = self.line.len() + self.cut;
        if self.logged + len > MAX_STDERR {
            self.dropped += len + 1;
        } else {
            self.logged += len + 1;
            let text = String::from_utf8_lossy(&self.line);
            let text = text.trim_end_matches('\r');
            if self.cut > 0 {
                log::warn!(
                    "exec {}[pid {}]: {text} (line cut, {} bytes dropped)",
                    self.service,
                    self.pid,
                    self.cut
                );
            } else {
                log::warn!("exec {}[pid {}]: {text}", self.service, self.pid);
            }
        }
        self.line.clear();
        self.cut = 0;
    }

    fn finish(&mut self) {
        if !self.line.is_empty() || self.cut > 0 {
            self.emit();
        }
        if self.dropped > 0 {
            log::warn!(
                "exec {}[pid {}]: stderr over {MAX_STDERR} bytes ({} bytes dropped)",
                self.service,
                self.pid,
                self.dropped
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_lines_are_cut_and_capped() {
        let mut l = StderrLog::new("s", 1);
        l.feed(&vec![b'x'; MAX_LINE + 10]);
        l.feed(b"\n");
        assert_eq!(l.logged, MAX_LINE + 11);
        assert!(l.line.is_empty() && l.cut == 0);
        for _ in 0..100 {
            l.feed(&vec![b'y'; 1000]);
            l.feed(b"\n");
        }
        assert!(l.logged <= MAX_STDERR);
        assert!(l.dropped > 0);
    }

    #[test]
    fn a_pipe_is_read_a_turn_at_a_time() {
        let (rd, wr) = pipe().unwrap();
        let mut wr = std::fs::File::from(wr);
        io::Write::write_all(&mut wr, &[b'z'; 3 * 4096]).unwrap();
        let mut l = StderrLog::new("s", 1);
        assert_eq!(l.drain(&rd, 2), Pipe::More);
        assert_eq!(l.drain(&rd, 2), Pipe::Empty);
        drop(wr);
        assert_eq!(l.drain(&rd, 2), Pipe::Closed);
        let (rd, wr) = pipe().unwrap();
        let mut wr = std::fs::File::from(wr);
        io::Write::write_all(&mut wr, &[b'r'; 20 * 1024]).unwrap();
        drop(wr);
        let mut buf = Vec::new();
        let mut reply = Reply {
            buf: &mut buf,
            dropped: 0,
        };
        assert_eq!(reply.collect(&rd, 1), Pipe::More);
        assert_eq!(reply.collect(&rd, 8), Pipe::Closed);
        assert_eq!(buf.len(), 20 * 1024);
    }

    #[test]
    fn a_bare_name_is_found_in_path_and_a_missing_one_is_refused() {
        assert!(resolve(Path::new("sh")).unwrap().is_absolute());
        let e = resolve(Path::new("/nonexistent/prog")).unwrap_err();
        assert!(e.contains("/nonexistent/prog"), "{e}");
        let e = resolve(Path::new("/etc/passwd")).unwrap_err();
        assert!(e.contains("not executable"), "{e}");
    }
}
