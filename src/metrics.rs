//! The `[metrics]` endpoint: a child process of its own (`preforkd:
//! metrics`) that serves `GET /metrics` in Prometheus' text format (0.0.4)
//! from shared memory: the scoreboard (workers' counters) and the master's
//! counters (src/stats.rs). The master only forks it, replaces it when it
//! dies and on reload, and binds its socket like every listener (so it
//! survives reloads and binary upgrades); no HTTP is parsed in the master.
//!
//! HTTP is kept minimal and bounded: one request per connection (`Connection:
//! close`), the whole request head within 5 s (else 408) and at most 8 KiB,
//! GET or HEAD of `/metrics` (a query string is ignored) answered 200,
//! `/ready` (200 `ready`, or 503 with the reason: starting, a pool with no
//! ready worker, shutdown delay, stopping) and `/live` (200 while the
//! master's loop turns, 503 once its heartbeat is 5 s old) for load
//! balancers and orchestrators, any other path 404, any other method 405, a
//! malformed head 400. One thread
//! serves every connection nonblocking from one poll(2) (at most 256; past
//! that the oldest without a complete head is closed), so slow clients
//! delay no scrape: a scrape is rendered and written the moment its head
//! is in.
//!
//! Owns (in the child): its copy of the metrics socket and the connection
//! it serves; the last value of each connection counter it reported.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::config::Credentials;
use crate::exit::worker as code;
use crate::scoreboard::{Counters, Scoreboard};
use crate::stats::{ExitCause, Readiness, Snapshot, SpawnCause, Stats, WorkerState};
use crate::sys;

/// Longest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Most clients connected at once; past it, the one connected longest
/// without a complete head is closed.
const MAX_CLIENTS: usize = 256;
/// How long a client may take to send its whole request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the whole answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the metrics child needs, taken from the master's state after fork.
pub(crate) struct MetricsSpec<'a> {
    /// The listening socket (a copy of the master's).
    pub listener: OwnedFd,
    /// The master's counters.
    pub stats: &'a Stats,
    /// The workers' counters.
    pub board: &'a Scoreboard,
    /// The master's pid, to notice its death.
    pub master: Pid,
    /// `[daemon] user`/`group`: what it drops to.
    pub credentials: Option<&'a Credentials>,
}

/// Runs the metrics child to its end; returns the process exit code.
pub(crate) fn run(spec: MetricsSpec<'_>) -> i32 {
    if let Err(e) = crate::signals::install_worker() {
        log::error!("metrics: cannot set up signals: {e}");
        return code::SETUP_ERROR;
    }
    crate::log::after_fork();
    let mut keep = vec![spec.listener.as_raw_fd()];
    keep.extend(crate::log::fds());
    if let Err(e) = sys::close_fds_except(&keep) {
        log::error!("metrics: close_range() failed: {e}");
        return code::SETUP_ERROR;
    }
    if let Some(creds) = spec.credentials
        && let Err(reason) = sys::drop_privileges(&creds.user, creds.uid, creds.gid, &creds.groups)
    {
        log::error!("metrics: {reason}");
        return code::SETUP_ERROR;
    }
    match sys::exit_with_parent(spec.master) {
        Ok(true) => {}
        Ok(false) => return code::ORPHANED,
        Err(e) => {
            log::error!("metrics: prctl(PR_SET_PDEATHSIG) failed: {e}");
            return code::SETUP_ERROR;
        }
    }
    sys::set_title("preforkd: metrics");
    let listener = std::net::TcpListener::from(spec.listener);
    match serve_all(&listener, spec.stats, spec.board) {
        Ok(()) => code::OK,
        Err(e) => {
            log::error!("metrics: poll() failed: {e}");
            code::SETUP_ERROR
        }
    }
}

/// One client connection, served by the event loop.
struct Conn {
    stream: TcpStream,
    /// The request head read so far.
    head: Vec<u8>,
    /// The answer, once the head is complete; `sent` bytes of it written.
    out: Option<Vec<u8>>,
    sent: usize,
    /// When the client is dropped: [`HEAD_TIMEOUT`] after accept for the
    /// whole head, then [`WRITE_TIMEOUT`] for the whole answer.
    deadline: Instant,
    /// When it was accepted (the oldest is evicted at the cap).
    since: Instant,
}

/// The event loop: accepts, reads heads, writes answers, all nonblocking in
/// one thread, each client with a deadline for its whole head and then for
/// its whole answer. Rendering takes well under a millisecond, so a scrape
/// waits for nobody; a slow client costs a descriptor and a buffer, and at
/// [`MAX_CLIENTS`] the one connected longest without a request gives way.
fn serve_all(
    listener: &std::net::TcpListener,
    stats: &Stats,
    board: &Scoreboard,
) -> io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    listener.set_nonblocking(true)?;
    let mut last = HashMap::new();
    let mut conns: Vec<Conn> = Vec::new();
    while !sys::shutdown_requested() {
        let now = Instant::now();
        // The nearest deadline, rounded up so that it has passed on waking.
        let timeout = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now).as_millis() + 1)
            .min()
            .map_or(PollTimeout::NONE, |ms| {
                PollTimeout::from(ms.min(60_000) as u16)
            });
        let mut fds = vec![
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(sys::shutdown_fd(), PollFlags::POLLIN),
        ];
        for c in &conns {
            let ev = if c.out.is_some() {
                PollFlags::POLLOUT
            } else {
                PollFlags::POLLIN
            };
            fds.push(PollFd::new(c.stream.as_fd(), ev));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if sys::shutdown_requested() {
            break;
        }
        // Clients first (poll's entries 2.. are theirs, in order), then new
        // ones.
        let now = Instant::now();
        let mut keep = Vec::with_capacity(conns.len());
        for (c, ready) in conns.iter_mut().zip(&ready[2..]) {
            let alive = !*ready || step(c, stats, board, &mut last);
            if alive && now >= c.deadline && c.out.is_none() {
                // The whole head did not come in time: say so, if the
                // client still listens; never wait for it.
                let _ = c.stream.write(&respond(408, "Request Timeout\n", true));
            }
            keep.push(alive && now < c.deadline);
        }
        let mut keep = keep.into_iter();
        conns.retain(|_| keep.next().unwrap_or(true));
        if ready[0] {
            accept_all(listener, &mut conns);
        }
    }
    Ok(())
}

/// Accepts every waiting client; at [`MAX_CLIENTS`], the client connected
/// longest that has not sent its whole head is closed to make room (a
/// client whose answer is being written is about to leave anyway).
fn accept_all(listener: &std::net::TcpListener, conns: &mut Vec<Conn>) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and the like leave the listener readable: pause
                // instead of spinning; the clients held leave by their
                // deadlines.
                log::warn!("metrics: accept() failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        if conns.len() >= MAX_CLIENTS {
            let oldest = conns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.out.is_none())
                .min_by_key(|(_, c)| c.since)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    conns.swap_remove(i);
                }
                None => continue, // all are being answered: close this one
            }
        }
        let now = Instant::now();
        conns.push(Conn {
            stream,
            head: Vec::with_capacity(256),
            out: None,
            sent: 0,
            deadline: now + HEAD_TIMEOUT,
            since: now,
        });
    }
}

/// Reads or writes what client `c` is ready for; false when it is done
/// (answered, or gone).
fn step(c: &mut Conn, stats: &Stats, board: &Scoreboard, last: &mut HashMap<String, u64>) -> bool {
    if c.out.is_none() {
        let mut buf = [0u8; 1024];
        loop {
            match c.stream.read(&mut buf) {
                Ok(n) => {
                    c.head.extend_from_slice(&buf[..n]);
                    let complete = head_complete(&c.head);
                    // EOF before the head's end: answer what came (400).
                    if n == 0 || complete || c.head.len() >= MAX_HEAD {
                        c.out = Some(answer(&c.head, complete, stats, board, last));
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        c.deadline = Instant::now() + WRITE_TIMEOUT;
    }
    let Some(out) = &c.out else { return true };
    while c.sent < out.len() {
        match c.stream.write(&out[c.sent..]) {
            Ok(0) => return false,
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    let _ = c.stream.shutdown(std::net::Shutdown::Write);
    false
}

/// Whether `head` holds a whole request head (an empty line ends it).
pub fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// The whole answer to a request head (`complete` if its end was read).
fn answer(
    head: &[u8],
    complete: bool,
    stats: &Stats,
    board: &Scoreboard,
    last: &mut HashMap<String, u64>,
) -> Vec<u8> {
    let (status, body, send_body) = match parse_request(head, complete) {
        Err(status) => (status, format!("{}\n", reason(status)), true),
        Ok((method, path)) => {
            let path = path.split('?').next().unwrap_or("");
            if method != "GET" && method != "HEAD" {
                (405, "method not allowed: use GET\n".to_string(), true)
            } else if path == "/ready" {
                let (status, body) = ready(stats);
                (status, body, method != "HEAD")
            } else if path == "/live" {
                let (status, body) = live(stats.beat_ms(), sys::coarse_ms());
                (status, body, method != "HEAD")
            } else if path != "/metrics" {
                (
                    404,
                    "not found: metrics are at /metrics (health: /ready, /live)\n".to_string(),
                    true,
                )
            } else {
                // HEAD announces the length a GET's body has (RFC 9110
                // §9.3.2), so the text is rendered either way.
                let text = render(&stats.snapshot(), board, last);
                (200, text, method != "HEAD")
            }
        }
    };
    respond(status, &body, send_body)
}

/// `GET /ready`: 200 when the daemon takes clients (every service has a
/// ready worker; not starting, stopping or in its shutdown delay), else
/// 503 and why, in one line.
fn ready(stats: &Stats) -> (u16, String) {
    let why = match stats.readiness() {
        Readiness::Ready => return (200, "ready\n".to_string()),
        Readiness::Starting => "starting".to_string(),
        Readiness::Delay { until_ms } => {
            let left = until_ms.saturating_sub(sys::coarse_ms());
            format!("shutdown delay (stopping in {}s)", left.div_ceil(1000))
        }
        Readiness::Stopping => "stopping".to_string(),
        Readiness::Retiring => "retiring: a new master took over".to_string(),
        Readiness::Short {
            service,
            ready,
            size,
        } => {
            let name = stats.snapshot().services.get(service).map_or_else(
                || "a service".to_string(),
                |s| format!("service {}", s.name),
            );
            format!("{name} has {ready} of {size} workers ready")
        }
    };
    (503, format!("not ready: {why}\n"))
}

/// A master whose loop has not turned for this long is not live (it turns
/// at least once a second).
const LIVE_WITHIN_MS: u64 = 5000;

/// `GET /live`: 200 while the master's loop turns (its heartbeat at
/// `beat_ms`, coarse clock, is recent), else 503.
fn live(beat_ms: u64, now_ms: u64) -> (u16, String) {
    let age = now_ms.saturating_sub(beat_ms);
    if beat_ms != 0 && age <= LIVE_WITHIN_MS {
        return (200, "live\n".to_string());
    }
    (
        503,
        format!("not live: the master has not turned for {}s\n", age / 1000),
    )
}

/// The status line, headers and (if `send_body`) the body of an answer.
fn respond(status: u16, body: &str, send_body: bool) -> Vec<u8> {
    let content_type = if status == 200 {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if send_body {
        out.push_str(body);
    }
    out.into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The method and target of an HTTP/1.x request head (`complete` if its
/// end was read); Err(the HTTP status to answer) if it is not one. Pure, so
/// that it can be fuzzed (fuzz/).
pub fn parse_request(head: &[u8], complete: bool) -> Result<(String, String), u16> {
    if !complete {
        return Err(if head.len() >= MAX_HEAD { 431 } else { 400 });
    }
    let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
    let line = text.lines().next().ok_or(400u16)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') || method.is_empty() {
        return Err(400);
    }
    Ok((method.to_string(), target.to_string()))
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition text of a snapshot. `last` keeps each connection
/// counter's last value so that it never goes down: a worker's count is
/// read (served, then active) while it may be moving one connection from
/// active to served.
pub fn render(snap: &Snapshot, board: &Scoreboard, last: &mut HashMap<String, u64>) -> String {
    const POOLS: [&str; 3] = ["static", "dynamic", "ondemand"];
    let mut out = String::with_capacity(4096);
    struct Live {
        starting: u64,
        idle: u64,
        busy: u64,
        stopping: u64,
        active: u64,
        accepted: u64,
        refused: u64,
        bytes_in: u64,
        bytes_out: u64,
    }
    let live: Vec<Live> = snap
        .services
        .iter()
        .map(|s| {
            let mut l = Live {
                starting: 0,
                idle: 0,
                busy: 0,
                stopping: 0,
                active: 0,
                accepted: s.folded,
                refused: s.folded_refused,
                bytes_in: s.folded_bytes_in,
                bytes_out: s.folded_bytes_out,
            };
            for (state, slot) in &s.workers {
                let c = board.read(*slot);
                l.accepted += c.served + c.active;
                l.active += c.active;
                l.refused += c.refused;
                l.bytes_in += c.bytes_in;
                l.bytes_out += c.bytes_out;
                match state {
                    WorkerState::Starting => l.starting += 1,
                    WorkerState::Stopping => l.stopping += 1,
                    WorkerState::Ready if c.active > 0 => l.busy += 1,
                    WorkerState::Ready => l.idle += 1,
                }
            }
            let seen = last.entry(s.name.clone()).or_insert(0);
            l.accepted = l.accepted.max(*seen);
            *seen = l.accepted;
            l
        })
        .collect();
    let svc = |s: &str| format!("service=\"{}\"", escape(s));

    header(
        &mut out,
        "preforkd_workers",
        "gauge",
        "Workers by service and state (starting, idle, busy, stopping).",
    );
    for (s, l) in snap.services.iter().zip(&live) {
        for (state, n) in [
            ("starting", l.starting),
            ("idle", l.idle),
            ("busy", l.busy),
            ("stopping", l.stopping),
        ] {
            let _ = writeln!(
                out,
                "preforkd_workers{{{},state=\"{state}\"}} {n}",
                svc(&s.name)
            );
        }
    }
    header(
        &mut out,
        "preforkd_connections_accepted_total",
        "counter",
        "Connections (and datagrams) accepted by the service's workers.",
    );
    for (s, l) in snap.services.iter().zip(&live) {
        let _ = writeln!(
            out,
            "preforkd_connections_accepted_total{{{}}} {}",
            svc(&s.name),
            l.accepted
        );
    }
    for (name, help, value) in [
        (
            "preforkd_connections_refused_total",
            "Connections (and datagrams) refused by allow/deny or max_connections_per_ip.",
            (|l: &Live| l.refused) as fn(&Live) -> u64,
        ),
        (
            "preforkd_bytes_received_total",
            "Bytes read from clients (counted when each connection ends).",
            |l: &Live| l.bytes_in,
        ),
        (
            "preforkd_bytes_sent_total",
            "Bytes written to clients (counted when each connection ends).",
            |l: &Live| l.bytes_out,
        ),
    ] {
        header(&mut out, name, "counter", help);
        for (s, l) in snap.services.iter().zip(&live) {
            let _ = writeln!(out, "{name}{{{}}} {}", svc(&s.name), value(l));
        }
    }
    header(
        &mut out,
        "preforkd_connections_active",
        "gauge",
        "Connections being served now.",
    );
    for (s, l) in snap.services.iter().zip(&live) {
        let _ = writeln!(
            out,
            "preforkd_connections_active{{{}}} {}",
            svc(&s.name),
            l.active
        );
    }
    // Per live worker, by pid: each slot read once for both series.
    let workers: Vec<(&str, Counters)> = snap
        .services
        .iter()
        .flat_map(|s| {
            s.workers
                .iter()
                .map(|(_, slot)| (s.name.as_str(), board.read(*slot)))
        })
        .filter(|(_, c)| c.pid != 0)
        .collect();
    for (name, kind, help, value) in [
        (
            "preforkd_worker_connections",
            "gauge",
            "Connections each live worker is serving now (by pid).",
            (|c: &Counters| c.active) as fn(&Counters) -> u64,
        ),
        (
            "preforkd_worker_full_total",
            "counter",
            "Times each live event-driven worker was at worker_connections and stopped accepting, leaving new connections to the others (by pid).",
            |c: &Counters| c.full,
        ),
    ] {
        header(&mut out, name, kind, help);
        for (service, c) in &workers {
            let _ = writeln!(
                out,
                "{name}{{{},pid=\"{}\"}} {}",
                svc(service),
                c.pid,
                value(c)
            );
        }
    }
    header(
        &mut out,
        "preforkd_listen_queue_length",
        "gauge",
        "Connections waiting in the service's TCP accept queues (sampled by the master every second; TCP listeners only).",
    );
    for s in &snap.services {
        if let Some(q) = s.queue {
            let _ = writeln!(out, "preforkd_listen_queue_length{{{}}} {q}", svc(&s.name));
        }
    }
    header(
        &mut out,
        "preforkd_listen_backlog",
        "gauge",
        "The listen backlog of the service's TCP listeners.",
    );
    for s in &snap.services {
        if s.queue.is_some() {
            let _ = writeln!(
                out,
                "preforkd_listen_backlog{{{}}} {}",
                svc(&s.name),
                s.backlog
            );
        }
    }
    header(
        &mut out,
        "preforkd_worker_spawns_total",
        "counter",
        "Workers started, by cause (start, replace, grow, recycle).",
    );
    for s in &snap.services {
        for (cause, n) in SpawnCause::ALL.iter().zip(&s.spawns) {
            let _ = writeln!(
                out,
                "preforkd_worker_spawns_total{{{},cause=\"{}\"}} {n}",
                svc(&s.name),
                cause.label()
            );
        }
    }
    header(
        &mut out,
        "preforkd_worker_exits_total",
        "counter",
        "Workers that exited, by cause.",
    );
    for s in &snap.services {
        for (cause, n) in ExitCause::ALL.iter().zip(&s.exits) {
            let _ = writeln!(
                out,
                "preforkd_worker_exits_total{{{},cause=\"{}\"}} {n}",
                svc(&s.name),
                cause.label()
            );
        }
    }
    header(
        &mut out,
        "preforkd_pool_max_reached_total",
        "counter",
        "Times the pool had max_workers workers and none idle.",
    );
    for s in &snap.services {
        let _ = writeln!(
            out,
            "preforkd_pool_max_reached_total{{{}}} {}",
            svc(&s.name),
            s.at_max
        );
    }
    header(
        &mut out,
        "preforkd_pool_max_workers",
        "gauge",
        "max_workers of dynamic and ondemand pools.",
    );
    for s in &snap.services {
        if s.max_workers > 0 {
            let _ = writeln!(
                out,
                "preforkd_pool_max_workers{{{}}} {}",
                svc(&s.name),
                s.max_workers
            );
        }
    }
    header(
        &mut out,
        "preforkd_pool_info",
        "gauge",
        "The service's pool kind, as a label.",
    );
    for s in &snap.services {
        let kind = POOLS.get(s.pool_kind as usize).unwrap_or(&"static");
        let _ = writeln!(
            out,
            "preforkd_pool_info{{{},pool=\"{kind}\"}} 1",
            svc(&s.name)
        );
    }
    header(
        &mut out,
        "preforkd_reloads_total",
        "counter",
        "Reloads, by result.",
    );
    let _ = writeln!(
        out,
        "preforkd_reloads_total{{result=\"ok\"}} {}",
        snap.reloads_ok
    );
    let _ = writeln!(
        out,
        "preforkd_reloads_total{{result=\"failed\"}} {}",
        snap.reloads_failed
    );
    header(
        &mut out,
        "preforkd_generation",
        "gauge",
        "The generation in force (1 at start, one more per reload or upgrade attempt).",
    );
    let _ = writeln!(out, "preforkd_generation {}", snap.generation);
    header(
        &mut out,
        "preforkd_start_time_seconds",
        "gauge",
        "When the master started, in seconds since the Unix epoch.",
    );
    let _ = writeln!(
        out,
        "preforkd_start_time_seconds {}.{:03}",
        snap.start_ms / 1000,
        snap.start_ms % 1000
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_strictly() {
        let ok = |h: &str| parse_request(h.as_bytes(), true);
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(("GET".into(), "/metrics".into()))
        );
        assert_eq!(ok("GET /metrics\r\n\r\n"), Err(400));
        assert_eq!(ok("GET metrics HTTP/1.1\r\n\r\n"), Err(400));
        assert_eq!(ok("GET /metrics HTTP/2\r\n\r\n"), Err(400));
        assert_eq!(parse_request(b"GET /", false), Err(400));
        assert_eq!(parse_request(&[b'a'; MAX_HEAD], false), Err(431));
    }

    #[test]
    fn live_means_a_recent_heartbeat() {
        assert_eq!(live(10_000, 10_000).0, 200);
        assert_eq!(live(10_000, 15_000).0, 200);
        let (status, body) = live(10_000, 17_400);
        assert_eq!(status, 503);
        assert_eq!(body, "not live: the master has not turned for 7s\n");
        assert_eq!(live(0, 1000).0, 503, "no heartbeat yet");
    }

    #[test]
    fn ready_says_why_not() {
        let mut stats = Stats::new().unwrap();
        let echo = stats.service("echo").unwrap();
        stats.set_readiness(Readiness::Ready);
        assert_eq!(ready(&stats), (200, "ready\n".to_string()));
        stats.set_readiness(Readiness::Short {
            service: echo,
            ready: 0,
            size: 4,
        });
        assert_eq!(
            ready(&stats),
            (
                503,
                "not ready: service echo has 0 of 4 workers ready\n".to_string()
            )
        );
        stats.set_readiness(Readiness::Delay {
            until_ms: sys::coarse_ms() + 1500,
        });
        let (status, body) = ready(&stats);
        assert_eq!(status, 503);
        assert!(
            body.starts_with("not ready: shutdown delay (stopping in "),
            "{body}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
