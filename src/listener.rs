//! Binding listening sockets (TCP, UDP, Unix stream, Unix datagram) in the
//! master, before any fork.
//!
//! Owns: each listening socket from bind until the master exits, and the
//! Unix socket files the master created (removed on exit, only if they are
//! still the ones it made).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{Credentials, ListenAddr, SocketMode};

/// A listener that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A socket call failed.
    #[error("cannot listen on {addr}: {syscall}() failed: {source}")]
    Sys {
        /// The configured address.
        addr: ListenAddr,
        /// The call that failed.
        syscall: &'static str,
        /// What the OS said.
        source: io::Error,
    },
    /// Another process answers on the Unix socket path.
    #[error(
        "cannot listen on {addr}: another server is accepting connections on {path}; stop it or choose another path"
    )]
    InUse {
        /// The configured address.
        addr: ListenAddr,
        /// The live socket's path.
        path: PathBuf,
    },
    /// A `systemd:NAME` entry whose socket systemd did not pass (exit 78).
    #[error(
        "cannot listen on {addr}: systemd passed no socket named {name:?} (LISTEN_FDNAMES: {passed}); check FileDescriptorName= in the .socket unit, and that preforkd runs under socket activation"
    )]
    NotPassed {
        /// The configured address.
        addr: ListenAddr,
        /// The name asked for.
        name: String,
        /// The names systemd passed, or "none".
        passed: String,
    },
    /// A `systemd:NAME` socket of a kind the service's plugin does not
    /// serve (exit 78).
    #[error(
        "cannot listen on {addr}: systemd passed a {kind} socket ({bound}), which plugin {plugin:?} does not serve"
    )]
    WrongKind {
        /// The configured address.
        addr: ListenAddr,
        /// What the socket is.
        bound: ListenAddr,
        /// The service's plugin.
        plugin: String,
        /// "stream" or "datagram".
        kind: &'static str,
    },
    /// The Unix socket path exists and is not a socket.
    #[error("cannot listen on {addr}: {path} exists and is not a socket; refusing to remove it")]
    NotASocket {
        /// The configured address.
        addr: ListenAddr,
        /// The path in the way.
        path: PathBuf,
    },
}

/// A bound (and, for streams, listening) socket owned by the master.
#[derive(Debug)]
pub struct Listener {
    /// What names the socket across reloads and upgrades (see
    /// [`crate::config::ServiceConfig::listen_keys`]); the address as
    /// written unless the master sets another.
    pub key: String,
    /// The address as configured.
    pub addr: ListenAddr,
    /// The address actually bound (port 0 resolved to the kernel's choice).
    pub bound: ListenAddr,
    socket: OwnedFd,
    /// The socket file we created: path, device and inode, so that exit
    /// removes it only if it is still ours.
    created: Option<(PathBuf, u64, u64)>,
    /// Inherited from the previous master in a binary upgrade that has not
    /// completed: the previous master still serves on it, so it must never
    /// be shut down, nor its file removed, until the handover is confirmed.
    pub shared: bool,
    /// Passed by systemd (socket activation): systemd owns the socket and
    /// its file, so it is never unlinked, shut down, re-listened or chmoded.
    pub systemd: bool,
}

impl Listener {
    /// Binds `addr`. Stream sockets listen with `backlog`; Unix socket files
    /// get `mode`. The socket is close-on-exec and nonblocking (workers poll,
    /// then accept; another worker may win the race).
    pub fn bind(
        addr: &ListenAddr,
        backlog: i32,
        mode: SocketMode,
    ) -> Result<Listener, ListenError> {
        let sys = |syscall: &'static str| {
            let addr = addr.clone();
            move |source: io::Error| ListenError::Sys {
                addr,
                syscall,
                source,
            }
        };
        match addr {
            ListenAddr::Tcp(sa) | ListenAddr::Udp(sa) => {
                let stream = matches!(addr, ListenAddr::Tcp(_));
                let ty = if stream { Type::STREAM } else { Type::DGRAM };
                let socket =
                    Socket::new(Domain::for_address(*sa), ty, None).map_err(sys("socket"))?;
                if sa.is_ipv6() {
                    socket
                        .set_only_v6(true)
                        .map_err(sys("setsockopt(IPV6_V6ONLY)"))?;
                }
                if stream {
                    socket
                        .set_reuse_address(true)
                        .map_err(sys("setsockopt(SO_REUSEADDR)"))?;
                }
                socket.bind(&SockAddr::from(*sa)).map_err(sys("bind"))?;
                if stream {
                    socket.listen(backlog).map_err(sys("listen"))?;
                }
                socket
                    .set_nonblocking(true)
                    .map_err(sys("fcntl(O_NONBLOCK)"))?;
                let local = socket
                    .local_addr()
                    .map_err(sys("getsockname"))?
                    .as_socket()
                    .expect("an inet socket has an inet address");
                let bound = if stream {
                    ListenAddr::Tcp(local)
                } else {
                    ListenAddr::Udp(local)
                };
                Ok(Listener {
                    key: addr.to_string(),
                    addr: addr.clone(),
                    bound,
                    socket: socket.into(),
                    created: None,
                    shared: false,
                    systemd: false,
                })
            }
            ListenAddr::Systemd(name) => Err(ListenError::NotPassed {
                addr: addr.clone(),
                name: name.clone(),
                passed: "none".into(),
            }),
            ListenAddr::Unix(path) | ListenAddr::UnixGram(path) => {
                let stream = matches!(addr, ListenAddr::Unix(_));
                clear_stale(addr, path, stream)?;
                let ty = if stream { Type::STREAM } else { Type::DGRAM };
                let socket = Socket::new(Domain::UNIX, ty, None).map_err(sys("socket"))?;
                let sockaddr = SockAddr::unix(path).map_err(sys("bind"))?;
                // The file is created by bind() with 0777 & ~umask; set the
                // umask so that it never exists with wider permissions than
                // `mode`. The master is single-threaded, so changing the
                // process-wide umask for the duration of bind() is safe.
                let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
                    0o777 & !mode.0,
                ));
                let bound = socket.bind(&sockaddr);
                nix::sys::stat::umask(old);
                bound.map_err(sys("bind"))?;
                // What bind() made, opened without following a symlink:
                // from here on the master acts on this inode only (its
                // directory may belong to the workers' user).
                let file = crate::sys::open_entry_nofollow(path).map_err(sys("open"))?;
                let meta = std::fs::File::from(file.try_clone().map_err(sys("dup"))?)
                    .metadata()
                    .map_err(sys("fstat"))?;
                let created = Some((path.clone(), meta.dev(), meta.ino()));
                let mut listener = Listener {
                    key: addr.to_string(),
                    addr: addr.clone(),
                    bound: addr.clone(),
                    socket: socket.into(),
                    created,
                    shared: false,
                    systemd: false,
                };
                // From here on, a failure removes the file we just made.
                let finish = |l: &Listener| -> Result<(), ListenError> {
                    if !meta.file_type().is_socket() {
                        return Err(sys("bind")(replaced(path)));
                    }
                    crate::sys::chmod_fd(file.as_fd(), mode.0).map_err(sys("chmod"))?;
                    let s = socket2::SockRef::from(&l.socket);
                    if stream {
                        s.listen(backlog).map_err(sys("listen"))?;
                    }
                    s.set_nonblocking(true).map_err(sys("fcntl(O_NONBLOCK)"))
                };
                if let Err(e) = finish(&listener) {
                    listener.remove_file();
                    return Err(e);
                }
                Ok(listener)
            }
        }
    }

    /// Takes over a socket inherited from the previous master (binary
    /// upgrade): checks that it is a socket of `addr`'s kind, bound where
    /// `addr` says (any port when `addr` has port 0), and makes it
    /// nonblocking and close-on-exec. The Unix socket file becomes ours to
    /// remove at exit once the handover is confirmed.
    pub fn adopt(addr: &ListenAddr, fd: OwnedFd) -> Result<Listener, ListenError> {
        let fail = |syscall: &'static str, source: io::Error| ListenError::Sys {
            addr: addr.clone(),
            syscall,
            source,
        };
        let socket = Socket::from(fd);
        let ty = socket
            .r#type()
            .map_err(|e| fail("getsockopt(SO_TYPE)", e))?;
        if let ListenAddr::Systemd(_) = addr {
            // Whatever kind systemd made; the plugin's fit is checked by
            // the master.
            let bound = kind_of(&socket).map_err(|e| fail("adopt", e))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| fail("fcntl(O_NONBLOCK)", e))?;
            crate::sys::set_cloexec(socket.as_fd(), true)
                .map_err(|e| fail("fcntl(FD_CLOEXEC)", e))?;
            return Ok(Listener {
                key: addr.to_string(),
                addr: addr.clone(),
                bound,
                socket: socket.into(),
                created: None,
                shared: true,
                systemd: true,
            });
        }
        let want = if addr.is_stream() {
            Type::STREAM
        } else {
            Type::DGRAM
        };
        let local = socket.local_addr().map_err(|e| fail("getsockname", e))?;
        let mismatch = |what: String| {
            fail(
                "adopt",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the inherited socket is {what}"),
                ),
            )
        };
        if ty != want {
            return Err(mismatch(format!("of type {ty:?}")));
        }
        let (bound, created) = match addr {
            ListenAddr::Tcp(want) | ListenAddr::Udp(want) => {
                let got = local
                    .as_socket()
                    .ok_or_else(|| mismatch("not an inet socket".into()))?;
                if got.ip() != want.ip() || (want.port() != 0 && got.port() != want.port()) {
                    return Err(mismatch(format!("bound to {got}")));
                }
                let bound = if addr.is_stream() {
                    ListenAddr::Tcp(got)
                } else {
                    ListenAddr::Udp(got)
                };
                (bound, None)
            }
            ListenAddr::Systemd(_) => unreachable!("handled above"),
            ListenAddr::Unix(path) | ListenAddr::UnixGram(path) => {
                if local.as_pathname() != Some(path.as_path()) {
                    return Err(mismatch(format!("bound to {:?}", local.as_pathname())));
                }
                let created = std::fs::symlink_metadata(path)
                    .ok()
                    .map(|m| (path.clone(), m.dev(), m.ino()));
                (addr.clone(), created)
            }
        };
        socket
            .set_nonblocking(true)
            .map_err(|e| fail("fcntl(O_NONBLOCK)", e))?;
        crate::sys::set_cloexec(socket.as_fd(), true).map_err(|e| fail("fcntl(FD_CLOEXEC)", e))?;
        Ok(Listener {
            key: addr.to_string(),
            addr: addr.clone(),
            bound,
            socket: socket.into(),
            created,
            shared: true,
            systemd: false,
        })
    }

    /// Takes over a socket passed by systemd for `addr` (a `systemd:NAME`
    /// entry, or an address it is bound to): checked like [`Listener::adopt`],
    /// but systemd keeps owning it: its file is never removed, and it is
    /// never shut down (systemd queues connections while we are away).
    pub fn adopt_systemd(addr: &ListenAddr, fd: OwnedFd) -> Result<Listener, ListenError> {
        let mut l = Listener::adopt(addr, fd)?;
        l.created = None;
        l.shared = false;
        l.systemd = true;
        Ok(l)
    }

    /// Whether this socket is bound to `addr` (for matching a socket passed
    /// by systemd with a `listen` address): same kind and address; a port
    /// 0 address matches nothing.
    pub fn fd_matches(fd: BorrowedFd<'_>, addr: &ListenAddr) -> bool {
        let s = socket2::SockRef::from(&fd);
        let Ok(bound) = kind_of(&s) else {
            return false;
        };
        match (addr, &bound) {
            (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) | (ListenAddr::Udp(a), ListenAddr::Udp(b)) => {
                a.port() != 0 && a == b
            }
            (ListenAddr::Unix(a), ListenAddr::Unix(b))
            | (ListenAddr::UnixGram(a), ListenAddr::UnixGram(b)) => a == b,
            _ => false,
        }
    }
    /// Applies a new backlog and socket file mode to a listener that a
    /// reload keeps: listen(2) again and chmod the file.
    pub fn update(
        &self,
        backlog: i32,
        mode: SocketMode,
        owner: Option<&Credentials>,
    ) -> io::Result<()> {
        if self.systemd {
            // The .socket unit's Backlog=, SocketMode= and SocketUser= rule.
            return Ok(());
        }
        if self.addr.is_stream() {
            socket2::SockRef::from(&self.socket).listen(backlog)?;
        }
        if let Some(file) = self.own_file()? {
            crate::sys::chmod_fd(file.as_fd(), mode.0)?;
            if let Some(c) = owner {
                crate::sys::chown_fd(file.as_fd(), c.uid.as_raw(), c.gid.as_raw())?;
            }
        }
        Ok(())
    }

    /// The socket file this listener created, opened without following a
    /// symlink, if it is still that file (a socket, same device and inode):
    /// the workers' user may own its directory and put anything there, and
    /// the master must never chmod or chown what a path leads to. None for
    /// sockets without a file of ours; an error if something else is there.
    fn own_file(&self) -> io::Result<Option<OwnedFd>> {
        let Some((path, dev, ino)) = &self.created else {
            return Ok(None);
        };
        let file = crate::sys::open_entry_nofollow(path)?;
        let meta = std::fs::File::from(file.try_clone()?).metadata()?;
        if meta.dev() != *dev || meta.ino() != *ino || !meta.file_type().is_socket() {
            return Err(replaced(path));
        }
        Ok(Some(file))
    }

    /// Gives the Unix socket file this listener created to the workers'
    /// user and group (`[daemon] user`/`group`), so that they can use it
    /// by path too. Nothing to do for other sockets or without `owner`.
    pub fn chown(&self, owner: Option<&Credentials>) -> Result<(), ListenError> {
        let Some(c) = owner else { return Ok(()) };
        let sys = |source| ListenError::Sys {
            addr: self.addr.clone(),
            syscall: "chown",
            source,
        };
        if let Some(file) = self.own_file().map_err(sys)? {
            crate::sys::chown_fd(file.as_fd(), c.uid.as_raw(), c.gid.as_raw()).map_err(sys)?;
        }
        Ok(())
    }

    /// Accepts one connection on a Unix stream listener (the control
    /// socket), close-on-exec.
    pub fn accept_unix(&self) -> io::Result<std::os::unix::net::UnixStream> {
        let (s, _) = socket2::SockRef::from(&self.socket).accept()?;
        Ok(std::os::unix::net::UnixStream::from(OwnedFd::from(s)))
    }

    /// Forgets the socket file: another master owns it now.
    pub fn forget_file(&mut self) {
        self.created = None;
    }

    /// A new descriptor for the same socket (for a worker to own).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.socket.try_clone()
    }

    /// Stops a stream listener from accepting at once, in every process that
    /// shares the socket: a fast stop. What is queued is reset (TCP).
    /// systemd's sockets are left alone: connections queue there until the
    /// service starts again.
    pub fn stop_accepting(&self) {
        if self.bound.is_stream() && !self.systemd {
            // Errors are of no consequence: the socket is closed right after.
            let _ = nix::sys::socket::shutdown(
                self.socket.as_raw_fd(),
                nix::sys::socket::Shutdown::Read,
            );
        }
    }

    /// First step of a graceful stop that loses nothing queued: no new
    /// client gets in, and every connection already queued (or, for TCP,
    /// whose handshake is under way) stays to be accepted.
    ///
    /// TCP: a socket filter on the listener drops every segment that opens
    /// a handshake (SYN without ACK), so a new client's SYN goes unanswered
    /// (it retransmits, and is refused once the listener closes); segments
    /// of handshakes already answered pass, and those connections complete
    /// into the queue. Unix: the socket file goes and shutdown(SHUT_RD)
    /// makes connect() fail with "connection refused", while the queue
    /// stays acceptable (Linux's af_unix keeps it). Not for systemd's
    /// sockets, nor datagram ones (nothing queues there but datagrams).
    pub fn refuse_new_clients(&mut self) -> io::Result<()> {
        if !self.bound.is_stream() || self.systemd {
            return Ok(());
        }
        match self.bound {
            ListenAddr::Tcp(_) => {
                socket2::SockRef::from(&self.socket).attach_filter(&DROP_HANDSHAKES)?
            }
            _ => {
                self.remove_file();
                nix::sys::socket::shutdown(
                    self.socket.as_raw_fd(),
                    nix::sys::socket::Shutdown::Read,
                )?;
            }
        }
        Ok(())
    }

    /// Second step, once no handshake is half open (see [`half_open`]):
    /// the TCP listener's filter drops everything, so nothing can join its
    /// queue any more and a worker that finds the queue empty knows it is
    /// empty for good ([`is_sealed`]). Unix listeners were sealed by the
    /// first step.
    pub fn seal(&self) -> io::Result<()> {
        if matches!(self.bound, ListenAddr::Tcp(_)) && !self.systemd {
            socket2::SockRef::from(&self.socket).attach_filter(&DROP_ALL)?;
        }
        Ok(())
    }

    /// The TCP port and address this listener is bound to, if it is a TCP
    /// listener of ours (for [`half_open`]).
    pub fn tcp_bound(&self) -> Option<std::net::SocketAddr> {
        match &self.bound {
            ListenAddr::Tcp(a) if !self.systemd => Some(*a),
            _ => None,
        }
    }

    /// Removes the Unix socket file this listener created, if it is still
    /// the same file (not one that somebody else bound since).
    pub fn remove_file(&mut self) {
        if let Some((path, dev, ino)) = self.created.take() {
            // Relative to the directory's descriptor, no symlink followed:
            // only the entry that is still our socket goes.
            if let Err(e) = crate::sys::unlink_if_same(&path, dev, ino) {
                log::warn!("cannot remove socket file {}: {e}", path.display());
            }
        }
    }
}

/// The error for a socket file that is not the one preforkd bound.
fn replaced(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is no longer the socket preforkd bound (replaced, or now a symlink): left alone; restart preforkd to bind it again",
            path.display()
        ),
    )
}

/// A Unix socket path that exists is probed with connect(): refused means a
/// stale file from a process that died (removed), accepted means a live
/// server owns it (an error), and anything that is not a socket is left alone.
fn clear_stale(addr: &ListenAddr, path: &Path, stream: bool) -> Result<(), ListenError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenError::Sys {
                addr: addr.clone(),
                syscall: "stat",
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket {
            addr: addr.clone(),
            path: path.to_owned(),
        });
    }
    // Nonblocking: a live server whose backlog is full makes a blocking
    // connect wait for ever; EAGAIN says just as well that someone listens.
    let probe = Socket::new(
        Domain::UNIX,
        if stream { Type::STREAM } else { Type::DGRAM },
        None,
    )
    .and_then(|s| {
        s.set_nonblocking(true)?;
        s.connect(&SockAddr::unix(path)?)
    });
    match probe {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(ListenError::InUse {
            addr: addr.clone(),
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale socket file {}", path.display());
            std::fs::remove_file(path).map_err(|source| ListenError::Sys {
                addr: addr.clone(),
                syscall: "unlink",
                source,
            })
        }
        Ok(()) => Err(ListenError::InUse {
            addr: addr.clone(),
            path: path.to_owned(),
        }),
        Err(source) => Err(ListenError::Sys {
            addr: addr.clone(),
            syscall: "connect",
            source,
        }),
    }
}

/// What a socket is, from the kernel: its type (SO_TYPE), domain
/// (its address family) and address, as a concrete [`ListenAddr`]. Only bound inet
/// and path-named Unix sockets of stream or datagram type qualify.
fn kind_of(socket: &Socket) -> io::Result<ListenAddr> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let ty = socket.r#type()?;
    let stream = if ty == Type::STREAM {
        true
    } else if ty == Type::DGRAM {
        false
    } else {
        return Err(bad(format!(
            "the socket is of type {ty:?}, not a stream or datagram socket"
        )));
    };
    // The address family getsockname(2) reports is the socket's domain
    // (SO_DOMAIN).
    let local = socket.local_addr()?;
    let domain = local.domain();
    if domain == Domain::IPV4 || domain == Domain::IPV6 {
        let sa = local
            .as_socket()
            .ok_or_else(|| bad("the inet socket has no address".into()))?;
        Ok(if stream {
            ListenAddr::Tcp(sa)
        } else {
            ListenAddr::Udp(sa)
        })
    } else if domain == Domain::UNIX {
        let path = local.as_pathname().ok_or_else(|| {
            bad("the Unix socket is abstract or unnamed; only path sockets are supported".into())
        })?;
        Ok(if stream {
            ListenAddr::Unix(path.to_owned())
        } else {
            ListenAddr::UnixGram(path.to_owned())
        })
    } else {
        Err(bad(format!(
            "the socket's domain {domain:?} is not inet or Unix"
        )))
    }
}

/// Classic BPF, run on each segment that reaches a TCP listener (its data
/// starts at the TCP header): drop a segment whose flags have SYN without
/// ACK, keep the rest whole.
const DROP_HANDSHAKES: [socket2::SockFilter; 5] = [
    // ldb [13]: the flags byte
    socket2::SockFilter::new(0x30, 0, 0, 13),
    // jset #ACK: keep
    socket2::SockFilter::new(0x45, 2, 0, 0x10),
    // jset #SYN: drop; else keep
    socket2::SockFilter::new(0x45, 0, 1, 0x02),
    // ret #0: drop
    socket2::SockFilter::new(0x06, 0, 0, 0),
    // ret #-1: keep the whole segment
    socket2::SockFilter::new(0x06, 0, 0, u32::MAX),
];

/// Drop every segment (`ret #0`): the sealed listener.
const DROP_ALL: [socket2::SockFilter; 1] = [socket2::SockFilter::new(0x06, 0, 0, 0)];

/// Whether a worker's stream listener was sealed by a stopping master
/// ([`Listener::seal`]): nothing can join its queue any more, so the
/// worker accepts until the queue is empty and every queued connection is
/// served. TCP: the socket's filter is [`DROP_ALL`], one instruction (only
/// preforkd attaches filters to its listeners); Unix: the listener was
/// shut down for reading, which poll(2) reports as POLLRDHUP.
pub fn is_sealed(socket: &WorkerSocket) -> bool {
    match socket {
        WorkerSocket::Tcp(l) => {
            let mut len: libc::socklen_t = 0;
            // SAFETY: with optlen 0, SO_GET_FILTER writes nothing to optval
            // (null) and stores the filter's length in instructions in
            // `len`, which lives across the call.
            let r = unsafe {
                libc::getsockopt(
                    l.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    std::ptr::null_mut(),
                    &mut len,
                )
            };
            r == 0 && len as usize == DROP_ALL.len()
        }
        WorkerSocket::Unix(l) => {
            let mut fd = libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: poll(2) reads and writes the one pollfd, which lives
            // across the call; a zero timeout does not block.
            let r = unsafe { libc::poll(&mut fd, 1, 0) };
            r == 1 && fd.revents & libc::POLLRDHUP != 0
        }
        WorkerSocket::Udp(_) | WorkerSocket::UnixGram(_) => false,
    }
}

/// Handshakes under way (SYN received, answered, final ACK not yet in) to
/// any of `bound`, from /proc/net/tcp and /proc/net/tcp6 of our network
/// namespace: the stop seals a listener when none is left, so that a
/// client whose SYN was answered is not cut off. 0 if the tables cannot be
/// read (the stop then waits its bound).
pub fn half_open(bound: &[std::net::SocketAddr]) -> usize {
    if bound.is_empty() {
        return 0;
    }
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut f = line.split_whitespace();
            let (Some(_), Some(local), Some(_), Some(state)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            // 03: TCP_SYN_RECV (a request socket).
            if state != "03" {
                continue;
            }
            let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            if bound.iter().any(|b| b.port() == port) {
                n += 1;
            }
        }
    }
    n
}

/// A listener as a worker uses it: the std type for its kind.
#[derive(Debug)]
pub enum WorkerSocket {
    /// TCP listener.
    Tcp(std::net::TcpListener),
    /// Unix stream listener.
    Unix(std::os::unix::net::UnixListener),
    /// UDP socket.
    Udp(std::net::UdpSocket),
    /// Unix datagram socket.
    UnixGram(UnixDatagram),
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl WorkerSocket {
    /// Wraps a listener's descriptor according to its configured kind.
    pub fn new(addr: &ListenAddr, fd: OwnedFd) -> WorkerSocket {
        match addr {
            ListenAddr::Tcp(_) => WorkerSocket::Tcp(fd.into()),
            ListenAddr::Unix(_) => WorkerSocket::Unix(fd.into()),
            ListenAddr::Udp(_) => WorkerSocket::Udp(fd.into()),
            ListenAddr::UnixGram(_) => WorkerSocket::UnixGram(fd.into()),
            ListenAddr::Systemd(_) => unreachable!("workers get the bound address"),
        }
    }
}

impl WorkerSocket {
    /// Sets what accepted TCP connections inherit from their listener:
    /// TCP_NODELAY (answers go out at once) and the read and write timeouts
    /// that let a blocked connection notice shutdown (see
    /// [`crate::handler::IO_TICK`]). Unix connections inherit nothing and get
    /// their timeouts when accepted. Idempotent, so every worker may do it.
    pub fn prepare_for_connections(&self) -> io::Result<()> {
        if let WorkerSocket::Tcp(l) = self {
            let s = socket2::SockRef::from(l);
            s.set_tcp_nodelay(true)?;
            s.set_read_timeout(Some(crate::handler::IO_TICK))?;
            s.set_write_timeout(Some(crate::handler::IO_TICK))?;
        }
        Ok(())
    }
}

impl AsFd for WorkerSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            WorkerSocket::Tcp(s) => s.as_fd(),
            WorkerSocket::Unix(s) => s.as_fd(),
            WorkerSocket::Udp(s) => s.as_fd(),
            WorkerSocket::UnixGram(s) => s.as_fd(),
        }
    }
}
