//! Logging through the `log` facade, to the target `[log]` names: standard
//! error, a syslog daemon, or a file.
//!
//! State owned here: the one logger the `log` crate allows per process, and
//! behind it a swappable `Sink` (the target), guarded by a mutex because
//! worker threads log concurrently. The master is single-threaded and never
//! forks while it holds the mutex, so a worker starts with it free.
//!
//! - **stderr**: `TIMESTAMP preforkd[PID]: LEVEL: message`, one write(2) per
//!   line. When standard error is the journal's stream (`JOURNAL_STREAM`
//!   names fd 2's device and inode), `<N>preforkd[PID]: message` instead:
//!   journald reads the priority from `<N>` and adds its own timestamp. The
//!   `preforkd[PID]` stays because journald attributes every line of a
//!   stream to the process that opened it (the master), so a worker's pid
//!   would otherwise be lost.
//! - **file**: the stderr format, in a file opened `O_APPEND | O_CLOEXEC`
//!   with mode 0640, one write(2) per line (so the master and the workers,
//!   which share the descriptor, never interleave within a line), reopened
//!   on SIGUSR1.
//! - **syslog**: RFC 3164 or RFC 5424 records to a local Unix datagram
//!   socket, or a remote UDP or TCP address.
//!
//! **Every process logs with its own pid**: each record is formatted with
//! `getpid()` at the moment it is written, in the master and in each worker
//! (the `syslog` crate's formatters carry a pid fixed at creation; ours is
//! set per record).
//!
//! **Logging never blocks or kills a process.** Sockets are nonblocking: a
//! syslog socket whose buffer is full drops the record. A TCP connection is
//! per process (a worker does not write into the master's stream, which
//! would break the framing) and is connected without blocking; records wait
//! in a 64 KiB buffer meanwhile and are dropped past it. Standard error,
//! when it is a socket (journald), is written with `MSG_DONTWAIT`. A write
//! that fails (ENOSPC) drops the record; the number of records dropped is
//! reported in a warning by the next record that gets through.
//!
//! Reopening (SIGUSR1, for logrotate): the signal handler only calls
//! [`request_reopen`]; the next record written, in whatever thread, reopens
//! the target first ([`reopen`] does it at once, for the master's loop).
//! A log file is opened by the master only (O_NOFOLLOW: a symlink in its
//! place is refused): on SIGUSR1 it opens the new file and queues its
//! descriptor for every child on a socket pair made at [`configure`]
//! ([`hand_out_reopened`]), then signals them; a worker's reopen takes the
//! descriptor from there. So workers that dropped to `[daemon] user` follow
//! the rotation of a `root:root 0640` file, and the file stays root's
//! (nginx's master opens the files for its workers in the same spirit;
//! chowning the file to the workers' user, as nginx also does, would let
//! them rewrite the log).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Facility, LogConfig, LogTarget, SyslogAddr, SyslogFormat};

/// The tag in every record: `preforkd[PID]`, the APP-NAME of RFC 5424.
const TAG: &str = "preforkd";

/// Set by SIGUSR1 (async-signal-safe), consumed by the next write.
static REOPEN: AtomicBool = AtomicBool::new(false);
/// Set by [`after_fork`]: this process is a worker (or the metrics child),
/// which takes reopened files from the master.
static IN_CHILD: AtomicBool = AtomicBool::new(false);

/// Records this process could not write since the last one that got through.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The current target; None until [`init`].
static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// How long a failed syslog connection waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The most a TCP syslog connection holds back while it connects or while
/// the peer is slow; records past it are dropped.
const TCP_PENDING_MAX: usize = 64 * 1024;

/// The log target could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `target = "file"` and the file cannot be opened.
    #[error("log file {path}: cannot open: {source}")]
    File {
        /// The configured path.
        path: PathBuf,
        /// What open(2) said.
        source: io::Error,
    },
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let mut sink = lock();
        if REOPEN.swap(false, Ordering::SeqCst) {
            reopen_locked(&mut sink);
        }
        let sink = sink.get_or_insert_with(|| Sink::Stderr(StderrSink::detect()));
        if !sink.write(record.level(), &message) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note = format!(
                "{dropped} earlier log records were dropped: the log target failed or was full"
            );
            if !sink.write(log::Level::Warn, &note) {
                DROPPED.fetch_add(dropped, Ordering::Relaxed);
            }
        }
    }

    fn flush(&self) {
        if let Some(Sink::Syslog(s)) = lock().as_mut()
            && let Transport::Tcp(t) = &mut s.transport
        {
            t.flush();
        }
    }
}

static LOGGER: Logger = Logger;

fn lock() -> MutexGuard<'static, Option<Sink>> {
    // A panic while formatting a record must not silence the process.
    SINK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs the logger at `level` (idempotent: a second call only sets the
/// level). Until [`configure`] the target is standard error.
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Switches to the target `config` names, at its level. A missing syslog
/// socket (or a remote name that does not resolve) is reported as a warning
/// and standard error is used instead; a log file that cannot be opened is
/// an error (and the target stays as it was).
pub fn configure(config: &LogConfig) -> Result<(), LogError> {
    init(config.level.filter());
    let (sink, fallback) = match config.target() {
        LogTarget::Stderr => (Sink::Stderr(StderrSink::detect()), None),
        LogTarget::File => {
            let path = config.file_path().expect("validated: file is set");
            let file = open_log_file(path).map_err(|source| LogError::File {
                path: path.to_owned(),
                source,
            })?;
            let (handoff, warning) = match Handoff::new() {
                Ok(h) => (Some(h), None),
                Err(e) => (
                    None,
                    Some(format!(
                        "log: socketpair() failed: {e}; workers will reopen {} by path, which fails if they cannot open it",
                        path.display()
                    )),
                ),
            };
            (
                Sink::File(FileSink {
                    path: path.to_owned(),
                    file,
                    handoff,
                }),
                warning,
            )
        }
        LogTarget::Syslog => match SyslogSink::new(config) {
            Ok(s) => (Sink::Syslog(s), None),
            Err(e) => (
                Sink::Stderr(StderrSink::detect()),
                Some(format!(
                    "log: cannot use syslog at {}: {e}; logging to standard error instead",
                    config.syslog
                )),
            ),
        },
    };
    *lock() = Some(sink);
    if let Some(warning) = fallback {
        log::warn!("{warning}");
    }
    Ok(())
}

/// The descriptors the current target uses: a forked worker must keep them
/// open when it closes the master's.
pub fn fds() -> Vec<RawFd> {
    match lock().as_ref() {
        Some(Sink::File(f)) => {
            let mut fds = vec![f.file.as_raw_fd()];
            fds.extend(f.handoff.as_ref().map(|h| h.recv.as_raw_fd()));
            fds
        }
        Some(Sink::Syslog(s)) => match &s.transport {
            Transport::Unix(u) => vec![u.sock.as_raw_fd()],
            Transport::Udp { sock, .. } => vec![sock.as_raw_fd()],
            Transport::Tcp(t) => t.sock.iter().map(AsRawFd::as_raw_fd).collect(),
        },
        _ => Vec::new(),
    }
}

/// In a freshly forked worker: its own count of dropped records starts at
/// zero (the master's are the master's to report).
pub fn after_fork() {
    DROPPED.store(0, Ordering::Relaxed);
    IN_CHILD.store(true, Ordering::Relaxed);
    // Only the master hands files out.
    if let Some(Sink::File(f)) = lock().as_mut()
        && let Some(h) = &mut f.handoff
    {
        h.send = None;
    }
}

/// In the master, after [`reopen`]: queues the log file just opened for
/// `children` processes (one message each; stale ones from an earlier
/// reopen are taken out first), so that each child, told by SIGUSR1,
/// writes to the new file even if it could not open it itself. Returns how
/// many could not be queued (the socket's buffer was full).
pub fn hand_out_reopened(children: usize) -> usize {
    let sink = lock();
    let Some(Sink::File(f)) = sink.as_ref() else {
        return 0;
    };
    let Some(h) = &f.handoff else { return 0 };
    let Some(send) = &h.send else { return 0 };
    // Messages a child never took (it logged nothing since, or exited).
    drop(h.newest());
    (0..children)
        .filter(|_| crate::sys::send_fd(send.as_fd(), f.file.as_fd()).is_err())
        .count()
}

/// Asks for the log target to be reopened before the next record.
/// Async-signal-safe: it only stores to an atomic.
pub fn request_reopen() {
    REOPEN.store(true, Ordering::SeqCst);
}

/// Reopens the log target now: the file at its path (logrotate renamed the
/// old one), or a new connection to the local syslog socket. Standard error
/// is inherited and has nothing to reopen. A file that cannot be reopened
/// is reported in the old one, which stays in use.
pub fn reopen() {
    REOPEN.store(false, Ordering::SeqCst);
    reopen_locked(&mut lock());
}

fn reopen_locked(sink: &mut Option<Sink>) {
    match sink {
        // A worker takes the file its master opened: it may have dropped
        // to a user that cannot open (or create) it, and should not need
        // to (nginx's master opens log files for its workers the same
        // way). Nothing queued (a SIGUSR1 sent to the worker alone): the
        // current file stays.
        Some(Sink::File(f)) if IN_CHILD.load(Ordering::Relaxed) && f.handoff.is_some() => {
            if let Some(file) = f.handoff.as_ref().and_then(Handoff::newest) {
                f.file = file;
            }
        }
        Some(Sink::File(f)) => match open_log_file(&f.path) {
            Ok(file) => f.file = file,
            Err(e) => {
                let note = format!(
                    "log: cannot reopen {}: {e}; still writing to the file opened before",
                    f.path.display()
                );
                let _ =
                    (&f.file).write(line(SystemTime::now(), log::Level::Warn, &note).as_bytes());
            }
        },
        Some(Sink::Syslog(s)) => {
            if let Transport::Unix(u) = &mut s.transport
                && let Ok(sock) = connect_unix(&u.path)
            {
                u.sock = sock;
            }
        }
        _ => {}
    }
}

/// Opens (or creates) the log file for appending. O_NOFOLLOW: the master
/// runs as root and reopens on SIGUSR1, after start; a symlink put in the
/// file's place (by whoever can write its directory) must not make it
/// append to, or create, the file the link names. A log path that is a
/// symlink is refused (ELOOP); its directories are trusted.
fn open_log_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
}

/// Where records go.
enum Sink {
    Stderr(StderrSink),
    File(FileSink),
    Syslog(SyslogSink),
}

impl Sink {
    /// Writes one record; false if it was dropped.
    fn write(&mut self, level: log::Level, message: &str) -> bool {
        match self {
            Sink::Stderr(s) => s.write(level, message),
            Sink::File(f) => {
                let text = line(SystemTime::now(), level, message);
                // One write(2): with O_APPEND the line lands whole at the
                // end, whichever process writes it. A short write (disk
                // full) is not retried: the rest could interleave.
                (&f.file)
                    .write(text.as_bytes())
                    .is_ok_and(|n| n == text.len())
            }
            Sink::Syslog(s) => s.write(level, message),
        }
    }
}

struct StderrSink {
    /// Standard error is the journal's stream: `<N>` prefixes, no timestamp.
    journal: bool,
    /// Standard error is a socket: written with MSG_DONTWAIT.
    socket: bool,
}

impl StderrSink {
    fn detect() -> StderrSink {
        let stat = nix::sys::stat::fstat(io::stderr().as_fd()).ok();
        let journal = match (std::env::var("JOURNAL_STREAM"), &stat) {
            (Ok(v), Some(st)) => journal_stream_matches(&v, st.st_dev, st.st_ino),
            _ => false,
        };
        let socket = stat.is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK);
        StderrSink { journal, socket }
    }

    fn write(&self, level: log::Level, message: &str) -> bool {
        let text = if self.journal {
            journal_line(level, message)
        } else {
            line(SystemTime::now(), level, message)
        };
        let stderr = io::stderr();
        let written = if self.socket {
            use nix::sys::socket::{MsgFlags, send};
            send(
                stderr.as_raw_fd(),
                text.as_bytes(),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            )
            .map_err(io::Error::from)
        } else {
            // std's stderr is unbuffered: this is one write(2).
            stderr.lock().write(text.as_bytes())
        };
        written.is_ok_and(|n| n == text.len())
    }
}

struct FileSink {
    path: PathBuf,
    file: File,
    /// How the master gives its workers the file it reopened: a
    /// SOCK_SEQPACKET pair made at [`configure`]. The master sends the new
    /// descriptor on `send`, one message per child; each child, on its
    /// reopen, takes the newest message from `recv`. None if the pair
    /// could not be made (each process then reopens by path).
    handoff: Option<Handoff>,
}

/// The two ends of the reopen hand-off. Workers keep only `recv`.
struct Handoff {
    send: Option<OwnedFd>,
    recv: OwnedFd,
}

impl Handoff {
    fn new() -> io::Result<Handoff> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (send, recv) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        Ok(Handoff {
            send: Some(send),
            recv,
        })
    }

    /// The newest descriptor queued, if any (older ones are closed).
    fn newest(&self) -> Option<File> {
        let mut newest = None;
        while let Ok(Some(fd)) = crate::sys::recv_fd(self.recv.as_fd()) {
            newest = Some(File::from(fd));
        }
        newest
    }
}

struct SyslogSink {
    format: SyslogFormat,
    facility: Facility,
    /// Our host name in RFC 5424 records and in RFC 3164 records sent over
    /// the network; local RFC 3164 records carry none, as syslog(3)'s do
    /// (journald's /dev/log would take it for the program's name).
    hostname: Option<String>,
    transport: Transport,
}

impl SyslogSink {
    fn new(config: &LogConfig) -> io::Result<SyslogSink> {
        let host = syslog::Formatter3164::default().hostname;
        let (transport, remote) = match &config.syslog {
            SyslogAddr::Unix(path) => (
                Transport::Unix(UnixSink {
                    sock: connect_unix(path)?,
                    path: path.clone(),
                }),
                false,
            ),
            SyslogAddr::Udp(a) => {
                let addr = resolve(a)?;
                let local: SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let sock = UdpSocket::bind(local)?;
                sock.set_nonblocking(true)?;
                (Transport::Udp { sock, addr }, true)
            }
            SyslogAddr::Tcp(a) => (Transport::Tcp(TcpSink::new(resolve(a)?)), true),
        };
        let hostname = match config.syslog_format {
            SyslogFormat::Rfc5424 => host,
            SyslogFormat::Rfc3164 if remote => host,
            SyslogFormat::Rfc3164 => None,
        };
        Ok(SyslogSink {
            format: config.syslog_format,
            facility: config.facility,
            hostname,
            transport,
        })
    }

    fn write(&mut self, level: log::Level, message: &str) -> bool {
        let pid = std::process::id();
        let host = self.hostname.as_deref();
        let record = match self.format {
            SyslogFormat::Rfc3164 => rfc3164(self.facility, host, pid, level, message),
            SyslogFormat::Rfc5424 => {
                rfc5424(SystemTime::now(), self.facility, host, pid, level, message)
            }
        };
        match &mut self.transport {
            Transport::Unix(u) => u.send(&record),
            Transport::Udp { sock, addr } => sock.send_to(&record, *addr).is_ok(),
            Transport::Tcp(t) => t.send(&tcp_frame(self.format, &record)),
        }
    }
}

enum Transport {
    Unix(UnixSink),
    Udp { sock: UdpSocket, addr: SocketAddr },
    Tcp(TcpSink),
}

fn resolve(host_port: &str) -> io::Result<SocketAddr> {
    host_port.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host_port} resolves to no address"),
        )
    })
}

fn connect_unix(path: &Path) -> io::Result<UnixDatagram> {
    let sock = UnixDatagram::unbound()?;
    sock.connect(path)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// The local syslog socket, shared by the master and its workers (each
/// datagram is one whole record, so nothing interleaves).
struct UnixSink {
    path: PathBuf,
    sock: UnixDatagram,
}

impl UnixSink {
    fn send(&mut self, record: &[u8]) -> bool {
        match self.sock.send(record) {
            Ok(_) => true,
            // The syslog daemon restarted: its new socket needs a new
            // connection (nonblocking: connect(2) on a Unix datagram
            // socket never waits).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNREFUSED | libc::ENOTCONN | libc::ECONNRESET)
                ) =>
            {
                match connect_unix(&self.path) {
                    Ok(sock) => {
                        self.sock = sock;
                        self.sock.send(record).is_ok()
                    }
                    Err(_) => false,
                }
            }
            // Full (EAGAIN) or anything else: dropped.
            Err(_) => false,
        }
    }
}

/// A TCP connection of this process's own, connected without blocking.
struct TcpSink {
    addr: SocketAddr,
    /// The process that made `sock`; a forked worker makes its own.
    owner: u32,
    sock: Option<socket2::Socket>,
    connected: bool,
    /// Framed records not yet sent (the tail of one may be partly sent).
    pending: Vec<u8>,
    /// No new connection before this, after a failed one.
    retry_at: Option<Instant>,
}

impl TcpSink {
    fn new(addr: SocketAddr) -> TcpSink {
        TcpSink {
            addr,
            owner: std::process::id(),
            sock: None,
            connected: false,
            pending: Vec::new(),
            retry_at: None,
        }
    }

    fn send(&mut self, frame: &[u8]) -> bool {
        let pid = std::process::id();
        if self.owner != pid {
            // Forked: the connection is the master's; closing our copy of
            // the descriptor leaves it alone.
            *self = TcpSink::new(self.addr);
        }
        if self.sock.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return false;
            }
            match connect_nonblocking(self.addr) {
                Ok(s) => self.sock = Some(s),
                Err(_) => {
                    self.fail();
                    return false;
                }
            }
        }
        if self.pending.len() + frame.len() > TCP_PENDING_MAX {
            return false;
        }
        self.pending.extend_from_slice(frame);
        self.flush()
    }

    /// Sends what is pending, as far as it goes without blocking; false if
    /// the connection failed (what was pending is lost).
    fn flush(&mut self) -> bool {
        let Some(sock) = &self.sock else {
            return false;
        };
        if !self.connected {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(0) | Err(_) => return true, // still connecting: kept
                Ok(_) => {}
            }
            match sock.take_error() {
                Ok(None) => self.connected = true,
                _ => {
                    self.fail();
                    return false;
                }
            }
        }
        while !self.pending.is_empty() {
            match sock.send_with_flags(&self.pending, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.fail();
                    return false;
                }
            }
        }
        true
    }

    fn fail(&mut self) {
        self.sock = None;
        self.connected = false;
        self.pending.clear();
        self.retry_at = Some(Instant::now() + RETRY);
    }
}

fn connect_nonblocking(addr: SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?; // close-on-exec: socket2 sets it
    sock.set_nonblocking(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => Ok(sock),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(sock),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------
// Formatting: pure functions of their arguments (plus the clock for 3164).

/// The syslog severity of a level: err 3, warning 4, info 6, debug 7.
pub fn severity(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// A stderr or file line: `TIMESTAMP preforkd[PID]: LEVEL: message\n`.
pub fn line(now: SystemTime, level: log::Level, message: &str) -> String {
    format!(
        "{} {TAG}[{}]: {level}: {message}\n",
        humantime::format_rfc3339_millis(now),
        std::process::id(),
    )
}

/// A line for journald's stream: `<N>preforkd[PID]: message\n`.
pub fn journal_line(level: log::Level, message: &str) -> String {
    format!(
        "<{}>{TAG}[{}]: {message}\n",
        severity(level),
        std::process::id()
    )
}

/// Whether `JOURNAL_STREAM` (`DEV:INODE`) names the file `dev`/`ino`.
pub fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    value
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// An RFC 5424 record: `<PRI>1 TIMESTAMP HOST preforkd PID - - message`
/// (no message id, no structured data). The `syslog` crate's formatter
/// writes a numeric message id where we want the nil value.
pub fn rfc5424(
    now: SystemTime,
    facility: Facility,
    hostname: Option<&str>,
    pid: u32,
    level: log::Level,
    message: &str,
) -> Vec<u8> {
    format!(
        "<{}>1 {} {} {TAG} {pid} - - {message}",
        u32::from(facility.code()) * 8 + u32::from(severity(level)),
        humantime::format_rfc3339_micros(now),
        hostname.filter(|h| !h.is_empty()).unwrap_or("-"),
    )
    .into_bytes()
}

/// An RFC 3164 record, `<PRI>Mmm dd hh:mm:ss [HOST ]preforkd[PID]: message`,
/// formatted by the `syslog` crate with this record's pid.
pub fn rfc3164(
    facility: Facility,
    hostname: Option<&str>,
    pid: u32,
    level: log::Level,
    message: &str,
) -> Vec<u8> {
    use syslog::{LogFormat, Severity};
    let formatter = syslog::Formatter3164 {
        facility: syslog::Facility::from_str(facility.name()).expect("a facility syslog knows"),
        hostname: hostname.map(str::to_owned),
        process: TAG.to_owned(),
        pid,
    };
    let severity = match level {
        log::Level::Error => Severity::LOG_ERR,
        log::Level::Warn => Severity::LOG_WARNING,
        log::Level::Info => Severity::LOG_INFO,
        log::Level::Debug | log::Level::Trace => Severity::LOG_DEBUG,
    };
    let mut out = Vec::with_capacity(64 + message.len());
    // Writing to a Vec cannot fail.
    let _ = formatter.format(&mut out, severity, message);
    out
}

/// A record framed for a TCP stream (RFC 6587): octet counting for RFC 5424
/// (`LEN SP RECORD`), a trailing newline for RFC 3164.
pub fn tcp_frame(format: SyslogFormat, record: &[u8]) -> Vec<u8> {
    match format {
        SyslogFormat::Rfc5424 => {
            let mut out = format!("{} ", record.len()).into_bytes();
            out.extend_from_slice(record);
            out
        }
        SyslogFormat::Rfc3164 => {
            let mut out = record.to_vec();
            out.push(b'\n');
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn facility(name: &str) -> Facility {
        name.parse().unwrap()
    }

    #[test]
    fn severities_are_syslogs() {
        let got: Vec<u8> = [
            log::Level::Error,
            log::Level::Warn,
            log::Level::Info,
            log::Level::Debug,
            log::Level::Trace,
        ]
        .into_iter()
        .map(severity)
        .collect();
        assert_eq!(got, [3, 4, 6, 7, 7]);
    }

    #[test]
    fn stderr_line_has_timestamp_pid_and_level() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(
            line(t, log::Level::Warn, "hello"),
            format!(
                "2023-11-14T22:13:20.123Z preforkd[{}]: WARN: hello\n",
                std::process::id()
            )
        );
    }

    #[test]
    fn journal_line_has_priority_and_no_timestamp() {
        assert_eq!(
            journal_line(log::Level::Error, "boom"),
            format!("<3>preforkd[{}]: boom\n", std::process::id())
        );
        assert!(journal_line(log::Level::Info, "x").starts_with("<6>"));
    }

    #[test]
    fn journal_stream_is_dev_colon_inode() {
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(!journal_stream_matches("8:1234", 8, 1235));
        assert!(!journal_stream_matches("9:1234", 8, 1234));
        assert!(!journal_stream_matches("garbage", 8, 1234));
        assert!(!journal_stream_matches("", 0, 0));
    }

    #[test]
    fn rfc5424_record() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let r = rfc5424(
            t,
            facility("local3"),
            Some("host1"),
            42,
            log::Level::Warn,
            "hi there",
        );
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "<156>1 2023-11-14T22:13:20.123456Z host1 preforkd 42 - - hi there"
        );
        let r = rfc5424(t, facility("kern"), None, 1, log::Level::Error, "x");
        assert!(
            String::from_utf8(r)
                .unwrap()
                .starts_with("<3>1 2023-11-14T22:13:20.123456Z - preforkd 1 - - x")
        );
    }

    #[test]
    fn rfc3164_record_carries_the_given_pid() {
        let r = String::from_utf8(rfc3164(
            facility("daemon"),
            None,
            4242,
            log::Level::Info,
            "ready",
        ))
        .unwrap();
        // <30>Mmm dd hh:mm:ss preforkd[4242]: ready
        assert!(r.starts_with("<30>"), "{r}");
        assert!(r.ends_with(" preforkd[4242]: ready"), "{r}");
        let stamp = &r[4..r.len() - " preforkd[4242]: ready".len()];
        assert_eq!(stamp.len(), "Jan 01 00:00:00".len(), "{r}");
        let r = String::from_utf8(rfc3164(
            facility("local7"),
            Some("web1"),
            7,
            log::Level::Debug,
            "m",
        ))
        .unwrap();
        assert!(r.starts_with("<191>"), "{r}");
        assert!(r.ends_with(" web1 preforkd[7]: m"), "{r}");
    }

    #[test]
    fn tcp_framing() {
        assert_eq!(tcp_frame(SyslogFormat::Rfc5424, b"<14>1 x"), b"7 <14>1 x");
        assert_eq!(tcp_frame(SyslogFormat::Rfc3164, b"<14>x"), b"<14>x\n");
    }
}
