//! `exec`: runs a program per connection (inetd / DJB tcpserver style), with
//! the socket as its stdin and stdout, its stderr in the log, and the UCSPI
//! environment (`PROTO`, `TCPREMOTEIP`, …). On datagram sockets: one run per
//! datagram, the payload on stdin, stdout (at most [`MAX_REPLY`]) the reply.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use super::{
    Addr, Connection, Datagram, DatagramHandler, Handlers, IO_TICK, PluginContext, PluginInfo,
    Stream, StreamHandler,
};
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
    /// argv[0]: the command as written.
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
        |ctx| Ok(Handlers::both(parse(ctx)?)),
    )
    .serves(true, true)
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

    /// Waits for the program, logging its stderr, killing it at its timeout
    /// or `graceful_timeout` after the worker is asked to stop. Collects up to
    /// MAX_REPLY bytes of `stdout` if given. Logs a non-zero exit.
    fn wait(
        &self,
        pid: u32,
        stderr: OwnedFd,
        mut stdout: Option<(OwnedFd, &mut Vec<u8>)>,
    ) -> io::Result<bool> {
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // Cannot watch it: do not leave it behind.
                sys::kill_group(pid, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
                return Err(e);
            }
        };
        let stderr = Some(stderr);
        if let Some(e) = &stderr {
            nix::fcntl::fcntl(
                e,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )?;
        }
        if let Some((o, _)) = &stdout {
            nix::fcntl::fcntl(
                o,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )?;
        }
        let mut log = StderrLog::new(&self.service, pid);
        let started = Instant::now();
        let mut stop_at: Option<Instant> = None;
        let mut killed: Option<(Instant, &'static str)> = None;
        let mut dropped_out = 0usize;
        let mut err_open = stderr.is_some();
        let mut out_open = stdout.is_some();
        loop {
            let now = Instant::now();
            if stop_at.is_none() && sys::shutdown_requested() {
                stop_at = Some(now + self.graceful.saturating_sub(self.stop_margin()));
            }
            match killed {
                None => {
                    let why = if self.timeout.is_some_and(|t| now >= started + t) {
                        Some("after its timeout")
                    } else if stop_at.is_some_and(|s| now >= s) {
                        Some(
                            "at the end of its graceful_timeout after the worker was asked to stop",
                        )
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        sys::kill_group(pid, Signal::SIGTERM);
                        killed = Some((now, why));
                    }
                }
                Some((at, _)) if now >= at + self.kill_grace(stop_at.is_some()) => {
                    sys::kill_group(pid, Signal::SIGKILL);
                }
                _ => {}
            }
            let mut fds = vec![PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
            let ei = if err_open {
                fds.push(PollFd::new(
                    stderr.as_ref().unwrap().as_fd(),
                    PollFlags::POLLIN,
                ));
                Some(fds.len() - 1)
            } else {
                None
            };
            let oi = if out_open {
                fds.push(PollFd::new(
                    stdout.as_ref().unwrap().0.as_fd(),
                    PollFlags::POLLIN,
                ));
                Some(fds.len() - 1)
            } else {
                None
            };
            match nix::poll::poll(&mut fds, PollTimeout::from(IO_TICK.as_millis() as u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready = |i: Option<usize>| {
                i.is_some_and(|i| fds[i].revents().is_some_and(|r| !r.is_empty()))
            };
            let exited = fds[0].revents().is_some_and(|r| !r.is_empty());
            let (err_ready, out_ready) = (ready(ei), ready(oi));
            drop(fds);
            if err_ready {
                err_open = log.drain(stderr.as_ref().unwrap());
            }
            if out_ready {
                let (fd, buf) = stdout.as_mut().unwrap();
                out_open = collect(fd, buf, &mut dropped_out);
            }
            if exited {
                break;
            }
        }
        // Whatever it wrote before exiting is in the pipes now.
        if err_open {
            log.drain(stderr.as_ref().unwrap());
        }
        if out_open {
            let (fd, buf) = stdout.as_mut().unwrap();
            collect(fd, buf, &mut dropped_out);
        }
        log.finish();
        let status = loop {
            match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None) {
                Err(nix::errno::Errno::EINTR) => {}
                other => break other?,
            }
        };
        let (code, signal) = match status {
            nix::sys::wait::WaitStatus::Exited(_, c) => (Some(c), None),
            nix::sys::wait::WaitStatus::Signaled(_, s, _) => (None, Some(s.as_str())),
            _ => (None, None),
        };
        let tag = format!("exec {}[pid {pid}]", self.service);
        if let Some((_, why)) = killed {
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
        Ok(killed.is_some())
    }
}

/// Reads what is there into `buf`, up to MAX_REPLY; false at EOF.
fn collect(fd: &OwnedFd, buf: &mut Vec<u8>, dropped: &mut usize) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match nix::unistd::read(fd, &mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                let room = MAX_REPLY.saturating_sub(buf.len()).min(n);
                buf.extend_from_slice(&chunk[..room]);
                *dropped += n - room;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => return true,
            Err(_) => return false,
        }
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

    /// Reads what is there; false at EOF.
    fn drain(&mut self, fd: &OwnedFd) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match nix::unistd::read(fd, &mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.feed(&chunk[..n]),
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return true,
                Err(_) => return false,
            }
        }
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

impl StreamHandler for Exec {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let stream = &conn.stream;
        // The program shares the socket's options: it expects plain blocking
        // reads and writes, not the worker's IO_TICK timeouts.
        let sock = socket2::SockRef::from(stream);
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(None)?;
        sock.set_write_timeout(None)?;
        let mut cmd = self.command();
        match (conn.local_addr(), conn.peer_addr()) {
            (Addr::Inet(_), _) => {
                cmd.env("PROTO", "TCP");
                if let Some((ip, port)) = ip_port(conn.local_addr()) {
                    cmd.env("TCPLOCALIP", ip).env("TCPLOCALPORT", port);
                }
                if let Some((ip, port)) = ip_port(conn.peer_addr()) {
                    cmd.env("TCPREMOTEIP", ip).env("TCPREMOTEPORT", port);
                }
            }
            (Addr::Unix(local), _) => {
                cmd.env("PROTO", "UNIX");
                if let Some(p) = local {
                    cmd.env("UNIXLOCALPATH", p);
                }
                if let Stream::Unix(_) = stream {
                    let cred = nix::sys::socket::getsockopt(
                        &stream.as_fd(),
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
        }
        let (err_rd, err_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let sockfd = stream.as_fd().as_raw_fd();
        let spawned = self.spawn(cmd, [sockfd, sockfd, err_wr.as_raw_fd()]);
        drop(err_wr);
        let result = spawned.and_then(|pid| self.wait(pid, err_rd, None));
        // Back to the worker's ticks, so that the close that follows is
        // bounded by its linger.
        sock.set_read_timeout(Some(IO_TICK))?;
        sock.set_write_timeout(Some(IO_TICK))?;
        let killed = result.as_ref().is_ok_and(|k| *k);
        if killed || sys::shutdown_requested() {
            // Killed, or the worker is stopping: no lingering for the
            // client (the master's deadline is near). FIN now, drop what
            // has arrived so that the close is no reset, and close.
            let _ = conn.stream.shutdown_write();
            let _ = conn.discard_input();
            conn.eof = true;
        }
        // The program read and wrote the socket itself: TCP's own totals
        // count it all (a Unix socket keeps none: its bytes stay uncounted).
        if let Some((bytes_in, bytes_out)) = sys::tcp_bytes(conn.stream.as_fd()) {
            conn.set_bytes(bytes_in, bytes_out);
        }
        result.map(drop)
    }
}

impl DatagramHandler for Exec {
    fn handle(&self, datagram: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool> {
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
        nix::fcntl::fcntl(
            &wr,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
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
        let (out_rd, out_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_rd, err_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let pid = self.spawn(
            cmd,
            [rd.as_raw_fd(), out_wr.as_raw_fd(), err_wr.as_raw_fd()],
        );
        drop((rd, out_wr, err_wr));
        self.wait(pid?, err_rd, Some((out_rd, reply)))?;
        Ok(true)
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
    fn a_bare_name_is_found_in_path_and_a_missing_one_is_refused() {
        assert!(resolve(Path::new("sh")).unwrap().is_absolute());
        let e = resolve(Path::new("/nonexistent/prog")).unwrap_err();
        assert!(e.contains("/nonexistent/prog"), "{e}");
        let e = resolve(Path::new("/etc/passwd")).unwrap_err();
        assert!(e.contains("not executable"), "{e}");
    }
}
