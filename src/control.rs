//! The control socket: `[control] socket = PATH`, a Unix stream socket the
//! master creates with mode 0600. One request per line, one JSON answer per
//! line: `status`, `reload`, `upgrade`, `stop`, `scale SERVICE N`.
//!
//! The master side ([`Server`]) never blocks: every client is nonblocking,
//! its input and output buffers are bounded, a client that sends no
//! complete request within [`IDLE_TIMEOUT`] is dropped, and at
//! [`MAX_CLIENTS`] the client idle longest is closed for a new one, so
//! silent connections cannot lock the operator out. Only root and the
//! master's own user are answered (SO_PEERCRED); anyone else is closed on
//! without a word, and logged.
//!
//! The client side ([`call`]) is what `preforkd status|reload|upgrade|stop|
//! scale` use: send one line, wait for one line.
//!
//! Owns: the control listener (in the master) and the connected clients.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::PollFlags;
use serde_json::{Value, json};

use crate::config::MAX_WORKERS;
use crate::listener::Listener;

/// A client that has not sent a complete request this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line.
pub const MAX_REQUEST: usize = 4096;
/// Most answer bytes queued for a client that does not read.
pub const MAX_PENDING_OUTPUT: usize = 4 << 20;
/// Most clients connected at once; past it the client idle longest is
/// closed for a new one (clients with a request in progress wait in the
/// listen queue).
pub const MAX_CLIENTS: usize = 64;
/// How long accepting pauses after EMFILE or ENFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The master's state as JSON.
    Status,
    /// Reload the config; answered when the reload has succeeded or failed.
    Reload,
    /// Binary upgrade; answered when the new master is ready or has failed.
    Upgrade,
    /// Graceful stop; answered just before the master exits.
    Stop,
    /// Set a service's number of workers (until the next reload).
    Scale {
        /// The service.
        service: String,
        /// Its new pool size.
        workers: u32,
    },
}

impl Request {
    /// Parses one request line.
    pub fn parse(line: &str) -> Result<Request, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => Ok(Request::Status),
            ["reload"] => Ok(Request::Reload),
            ["upgrade"] => Ok(Request::Upgrade),
            ["stop"] => Ok(Request::Stop),
            ["scale", service, n] => match n.parse::<u32>() {
                Ok(workers) if (1..=MAX_WORKERS).contains(&workers) => Ok(Request::Scale {
                    service: service.to_string(),
                    workers,
                }),
                _ => Err(format!(
                    "scale: the number of workers must be 1 to {MAX_WORKERS}, got {n:?}"
                )),
            },
            _ => Err(format!(
                "unknown request {:?}: expected status, reload, upgrade, stop or scale SERVICE N",
                truncate(line, 80)
            )),
        }
    }

    /// The request as sent on the wire (without the newline).
    pub fn to_line(&self) -> String {
        match self {
            Request::Status => "status".into(),
            Request::Reload => "reload".into(),
            Request::Upgrade => "upgrade".into(),
            Request::Stop => "stop".into(),
            Request::Scale { service, workers } => format!("scale {service} {workers}"),
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Identifies a connected client across loop iterations.
pub type ClientId = u64;

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// A request is being worked on: read nothing more until it is answered.
    waiting: bool,
    /// The client closed its side: drop it once the output is flushed.
    eof: bool,
    /// The connection is gone (POLLHUP, POLLERR): never polled again (poll
    /// would report it at once, for ever); dropped once nothing is pending.
    gone: bool,
    /// When the client last had nothing in progress.
    idle_since: Instant,
}

/// The master's end of the control socket.
pub struct Server {
    listener: Option<Listener>,
    clients: HashMap<ClientId, Client>,
    next_id: ClientId,
    /// Complete requests not yet taken by the master.
    queued: Vec<(ClientId, Request)>,
    /// Accepting paused (out of descriptors) until then.
    accept_paused_until: Option<Instant>,
}

/// What the master polls for the control socket, and what it found.
pub struct PollSet {
    tokens: Vec<Option<ClientId>>,
}

impl Server {
    /// Serves `listener` (bound by the master, or inherited).
    pub fn new(listener: Listener) -> Server {
        Server {
            listener: Some(listener),
            clients: HashMap::new(),
            next_id: 0,
            queued: Vec::new(),
            accept_paused_until: None,
        }
    }

    /// The listening socket, for a binary upgrade to hand over.
    pub fn listener(&self) -> Option<&Listener> {
        self.listener.as_ref()
    }

    /// Stops accepting; connected clients are still answered. The socket
    /// file is removed unless `keep_file` (the next master of an upgrade
    /// owns it) or it is still shared with the previous master.
    pub fn close_listener(&mut self, keep_file: bool) {
        if let Some(mut l) = self.listener.take()
            && !keep_file
            && !l.shared
        {
            l.remove_file();
        }
    }

    /// The handover from the previous master is confirmed: the socket and
    /// its file are ours.
    pub fn take_ownership(&mut self) {
        if let Some(l) = &mut self.listener {
            l.shared = false;
        }
    }

    /// The descriptors to poll, with their events; `poll_set` remembers
    /// which is which.
    pub fn poll_fds(&self) -> (Vec<(BorrowedFd<'_>, PollFlags)>, PollSet) {
        let mut fds = Vec::new();
        let mut tokens = Vec::new();
        // Not while the socket is still shared with the previous master
        // (it is in charge until the handover), nor at the client limit,
        // nor while out of descriptors: connections wait in the queue.
        let paused = self.accept_paused_until.is_some_and(|t| Instant::now() < t);
        if let Some(l) = &self.listener
            && !l.shared
            && !paused
            && (self.clients.len() < MAX_CLIENTS || self.oldest_idle(self.next_id).is_some())
        {
            fds.push((l.as_fd(), PollFlags::POLLIN));
            tokens.push(None);
        }
        for (id, c) in self.clients.iter().filter(|(_, c)| !c.gone) {
            let mut ev = PollFlags::empty();
            if !c.waiting && !c.eof {
                ev |= PollFlags::POLLIN;
            }
            if !c.output.is_empty() {
                ev |= PollFlags::POLLOUT;
            }
            fds.push((c.stream.as_fd(), ev));
            tokens.push(Some(*id));
        }
        (fds, PollSet { tokens })
    }

    /// Acts on what poll found: accepts, reads, writes.
    pub fn on_poll(&mut self, set: PollSet, revents: &[PollFlags]) {
        for (token, rev) in set.tokens.into_iter().zip(revents) {
            if rev.is_empty() {
                continue;
            }
            match token {
                None => self.accept_all(),
                Some(id) => self.client_io(id, *rev),
            }
        }
    }

    /// The complete requests read so far, oldest first.
    pub fn take_requests(&mut self) -> Vec<(ClientId, Request)> {
        std::mem::take(&mut self.queued)
    }

    /// Whether requests are waiting to be taken (the master must not sleep).
    pub fn has_requests(&self) -> bool {
        !self.queued.is_empty()
    }

    /// The client idle longest, among those accepted before `before`:
    /// connected, no request in progress and nothing left to write. It is
    /// the one to give way at the cap. (A client accepted in this round has
    /// not been read yet: its request may be on the way.)
    fn oldest_idle(&self, before: ClientId) -> Option<ClientId> {
        self.clients
            .iter()
            .filter(|(id, c)| **id < before && !c.waiting && c.output.is_empty())
            .min_by_key(|(id, c)| (c.idle_since, **id))
            .map(|(id, _)| *id)
    }

    fn accept_all(&mut self) {
        let round = self.next_id;
        loop {
            // At the cap, the client idle longest is closed to make room:
            // a stuck script that connects and says nothing must not lock
            // the operator out for IDLE_TIMEOUT (nginx drops idle
            // keepalive connections the same way when it runs short).
            // Clients with a request in progress are never evicted.
            if self.clients.len() >= MAX_CLIENTS {
                let Some(victim) = self.oldest_idle(round) else {
                    return;
                };
                // Accept first: evict only if someone is really waiting.
                let Some(stream) = self.accept_one() else {
                    return;
                };
                self.clients.remove(&victim);
                log::debug!("control socket: {MAX_CLIENTS} clients; the one idle longest closed");
                self.add_client(stream);
                continue;
            }
            let Some(stream) = self.accept_one() else {
                return;
            };
            self.add_client(stream);
        }
    }

    /// Accepts the next client that may talk to us, or None when there is
    /// none waiting (or accepting failed and is paused).
    fn accept_one(&mut self) -> Option<UnixStream> {
        let l = self.listener.as_ref()?;
        loop {
            let stream = match l.accept_unix() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE leave the listener readable: without a
                    // pause, poll would return at once for ever.
                    log::warn!(
                        "control socket: accept() failed: {e}; not accepting for {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return None;
                }
            };
            match peer_allowed(&stream) {
                Ok(()) => {}
                Err(why) => {
                    log::warn!("control socket: {why}; connection closed");
                    continue;
                }
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("control socket: cannot make a client nonblocking: {e}");
                continue;
            }
            return Some(stream);
        }
    }

    fn add_client(&mut self, stream: UnixStream) {
        let id = self.next_id;
        self.next_id += 1;
        self.clients.insert(
            id,
            Client {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                waiting: false,
                eof: false,
                gone: false,
                idle_since: Instant::now(),
            },
        );
    }

    fn client_io(&mut self, id: ClientId, rev: PollFlags) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if rev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
            && !c.waiting
            && !c.eof
        {
            let mut buf = [0u8; 1024];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.eof = true;
                        break;
                    }
                    Ok(n) => {
                        c.input.extend_from_slice(&buf[..n]);
                        // One line at most MAX_REQUEST, and no more than
                        // two of those buffered: a client cannot make the
                        // master read (or hold) without bound.
                        let line_too_long = c.input.len() > MAX_REQUEST
                            && !c.input[..MAX_REQUEST + 1].contains(&b'\n');
                        if line_too_long || c.input.len() > 2 * MAX_REQUEST {
                            let _ = c.stream.write_all(
                                (error(&format!("request longer than {MAX_REQUEST} bytes"))
                                    .to_string()
                                    + "\n")
                                    .as_bytes(),
                            );
                            self.clients.remove(&id);
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.clients.remove(&id);
                        return;
                    }
                }
            }
            self.next_request(id);
        }
        if rev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)
            && let Some(c) = self.clients.get_mut(&id)
        {
            c.gone = true;
        }
        self.flush(id);
    }

    /// Takes the next complete line of client `id`, if it is not busy.
    fn next_request(&mut self, id: ClientId) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        while !c.waiting {
            let Some(end) = c.input.iter().position(|&b| b == b'\n') else {
                break;
            };
            let line: Vec<u8> = c.input.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            match Request::parse(text) {
                Ok(r) => {
                    c.waiting = true;
                    self.queued.push((id, r));
                }
                Err(e) => queue(c, &error(&e)),
            }
        }
        if !c.waiting {
            c.idle_since = Instant::now();
        }
    }

    /// Answers client `id`'s request in progress; it may then send another.
    pub fn reply(&mut self, id: ClientId, answer: &Value) {
        let Some(c) = self.clients.get_mut(&id) else {
            return; // gone meanwhile
        };
        queue(c, answer);
        c.waiting = false;
        c.idle_since = Instant::now();
        // A request pipelined behind this one is next.
        self.next_request(id);
        self.flush(id);
    }

    /// Writes what can be written now; drops clients that are done or stuck.
    fn flush(&mut self, id: ClientId) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        while !c.output.is_empty() {
            match c.stream.write(&c.output) {
                Ok(0) => break,
                Ok(n) => {
                    c.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.clients.remove(&id);
                    return;
                }
            }
        }
        let done = c.output.is_empty() && !c.waiting;
        if c.output.len() > MAX_PENDING_OUTPUT
            || ((c.eof || c.gone) && done)
            || (c.gone && !c.waiting)
        {
            self.clients.remove(&id);
        }
    }

    /// When the next idle client times out, or accepting resumes.
    pub fn deadline(&self) -> Option<Instant> {
        self.clients
            .values()
            .filter(|c| !c.waiting)
            .map(|c| c.idle_since + IDLE_TIMEOUT)
            .chain(self.accept_paused_until)
            .min()
    }

    /// Drops clients idle past [`IDLE_TIMEOUT`].
    pub fn expire(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
        }
        self.clients
            .retain(|_, c| c.waiting || now < c.idle_since + IDLE_TIMEOUT);
    }

    /// Last words before the master exits: best effort, never blocking.
    /// The connections stay open (until the process exits).
    pub fn finish(&mut self) {
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
    }
}

fn queue(c: &mut Client, answer: &Value) {
    c.output.extend_from_slice(answer.to_string().as_bytes());
    c.output.push(b'\n');
}

/// `{"ok": false, "error": REASON}`.
pub fn error(reason: &str) -> Value {
    json!({"ok": false, "error": reason})
}

/// Only root and the master's own user may control it.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("cannot read the peer's credentials (SO_PEERCRED): {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "refused client uid {} (pid {}): only root and uid {me} may use it",
            cred.uid(),
            cred.pid()
        ))
    }
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Could not connect.
    #[error("cannot connect to control socket {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The connection failed or timed out.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// What went wrong.
        source: io::Error,
    },
    /// The master closed the connection without an answer.
    #[error(
        "control socket {path}: the master closed the connection without answering (is this user allowed to use it? only root and the master's user are)"
    )]
    NoAnswer {
        /// The socket.
        path: String,
    },
    /// The answer was not JSON.
    #[error("control socket {path}: unreadable answer {answer:?}")]
    BadAnswer {
        /// The socket.
        path: String,
        /// What came back.
        answer: String,
    },
}

/// Sends `request` to the master at `path` and waits up to `timeout` for
/// its answer.
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Value, CallError> {
    let shown = path.display().to_string();
    let io_err = |source| CallError::Io {
        path: shown.clone(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| CallError::Connect {
        path: shown.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    // A master that refuses us closes at once: our request unread, so the
    // close may come as a reset rather than an EOF. Either way, no answer.
    let refused = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    };
    if let Err(e) = stream.write_all(format!("{}\n", request.to_line()).as_bytes()) {
        return Err(if refused(&e) {
            CallError::NoAnswer { path: shown }
        } else {
            io_err(e)
        });
    }
    let mut line = String::new();
    let read = BufReader::new(&stream).read_line(&mut line);
    if let Err(e) = &read
        && refused(e)
    {
        return Err(CallError::NoAnswer { path: shown });
    }
    let n = read.map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            io_err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}", humantime::format_duration(timeout)),
            ))
        } else {
            io_err(e)
        }
    })?;
    if n == 0 {
        return Err(CallError::NoAnswer { path: shown });
    }
    let answer: Value = serde_json::from_str(line.trim()).map_err(|_| CallError::BadAnswer {
        path: shown.clone(),
        answer: line.trim().to_string(),
    })?;
    if *request == Request::Stop && answer["ok"] == Value::Bool(true) {
        // The master answers `stop` just before it exits, and its end of
        // the connection closes with the process: wait for that.
        let mut rest = Vec::new();
        let _ = (&stream).read_to_end(&mut rest);
        // Descriptors close a moment before the process is a zombie.
        if let Some(pid) = answer["pid"].as_i64() {
            wait_exited(pid, timeout);
        }
    }
    Ok(answer)
}

/// Waits (bounded) until process `pid` is gone or a zombie.
fn wait_exited(pid: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat) => {
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.trim_start().chars().next());
                if matches!(state, Some('Z' | 'X') | None) {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_print() {
        for line in ["status", "reload", "upgrade", "stop", "scale echo 3"] {
            assert_eq!(Request::parse(line).unwrap().to_line(), line);
        }
        assert_eq!(
            Request::parse("  scale   web 12 ").unwrap(),
            Request::Scale {
                service: "web".into(),
                workers: 12
            }
        );
        assert!(
            Request::parse("scale web 0")
                .unwrap_err()
                .contains("1 to 4096")
        );
        assert!(Request::parse("scale web").is_err());
        assert!(
            Request::parse("hello")
                .unwrap_err()
                .contains("unknown request")
        );
    }
}
