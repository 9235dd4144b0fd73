//! A fleet behind HAProxy: three preforkd hosts, each in a network
//! namespace of its own (or on 127.0.0.2..4 where namespaces cannot be
//! made), HAProxy in front with the settings of docs/DEPLOYMENT.md (TCP
//! mode, `option httpchk GET /ready` on the metrics port, `inter 500ms
//! fall 2 rise 2`, `retries 3` + `option redispatch`), and clients
//! running through it while the fleet is restarted host by host (SIGTERM
//! with `shutdown_delay = "2s"`, then started again), upgraded host by
//! host (`preforkd upgrade`) and reloaded everywhere at once (`preforkd
//! reload`): no client request may fail in any of these. Then one host is
//! SIGKILLed: only the requests it had in flight may fail, and HAProxy
//! must take it out within its checks' time.
//!
//! An `exec` service answers with `$TCPREMOTEIP`: with PROXY protocol v2
//! ([`PROXY_V2`]) it must be the client's address, not HAProxy's.
//!
//! Needs HAProxy (`apt-get install haproxy`); skips with one line without
//! it.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use netns::{Mode, Net};

/// HAProxy sends a PROXY protocol v2 header (`send-proxy-v2`) and the
/// hosts' services expect it (`proxy_protocol = "v2"`, `proxy_from` the
/// balancer). `PREFORKD_FLEET_PROXY=0` or `=1` overrides it.
const PROXY_V2: bool = true;

fn proxy_v2() -> bool {
    match std::env::var("PREFORKD_FLEET_PROXY").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => PROXY_V2,
    }
}

const HOSTS: usize = 3;
/// HAProxy's check interval and fall count: a host is out of the pool
/// within INTER x FALL of its /ready turning 503.
const INTER_MS: u64 = 500;
const FALL: u64 = 2;
/// >= INTER x FALL, plus a margin (docs/DEPLOYMENT.md).
const SHUTDOWN_DELAY: &str = "2s";

/// Fixed ports inside a host's namespace (each namespace has its own).
const ECHO_PORT: u16 = 8009;
const WHO_PORT: u16 = 8010;
const METRICS_PORT: u16 = 9109;

/// The `who` service's program: reads a line, answers `TCPREMOTEIP LINE`.
const WHO: &str = r#"read line; printf "%s %s\n" "$TCPREMOTEIP" "$line""#;

/// A port free on `ip` now (bound to :0, then closed).
fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap_or_else(|e| panic!("bind {ip}:0: {e}"))
        .local_addr()
        .unwrap()
        .port()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

// ---------------------------------------------------------------------------
// The hosts.

struct Host {
    name: String,
    ip: Ipv4Addr,
    echo_port: u16,
    who_port: u16,
    metrics_port: u16,
    /// Config, pid file and control socket: they outlive each run.
    dir: tempfile::TempDir,
    /// The current run (its log in a temp dir of its own). After an
    /// upgrade its child has exited; the master is the pid file's, in the
    /// same process group, which drop kills.
    daemon: Option<Daemon>,
    runs: usize,
}

impl Host {
    fn new(net: &Net, i: usize) -> Host {
        let ip = net.hosts[i];
        let (echo_port, who_port, metrics_port) = match net.mode {
            Mode::Namespaces => (ECHO_PORT, WHO_PORT, METRICS_PORT),
            Mode::Loopback => (free_port(ip), free_port(ip), free_port(ip)),
        };
        let h = Host {
            name: format!("h{i}"),
            ip,
            echo_port,
            who_port,
            metrics_port,
            dir: tempdir(),
            daemon: None,
            runs: 0,
        };
        fs::write(h.config_path(), h.config(net)).unwrap();
        h
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("preforkd.toml")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("preforkd.pid")
    }

    fn config(&self, net: &Net) -> String {
        let dir = self.dir.path().display();
        let proxy = if proxy_v2() {
            format!(
                "proxy_protocol = \"v2\"\nproxy_from = [\"{}/32\"]\n",
                net.lb
            )
        } else {
            String::new()
        };
        format!(
            "[log]\nlevel = \"{level}\"\n\n[daemon]\npid_file = \"{dir}/preforkd.pid\"\nshutdown_delay = \"{SHUTDOWN_DELAY}\"\n\n\
             [control]\nsocket = \"{dir}/ctl.sock\"\n\n\
             [metrics]\nlisten = \"{ip}:{mp}\"\n\n\
             [[service]]\nname = \"echo\"\nlisten = [\"tcp://{ip}:{ep}\"]\n\
             workers = 2\nthreads = 8\ngraceful_timeout = \"10s\"\n{proxy}\n\
             [service.handler]\nplugin = \"echo\"\n\n\
             [[service]]\nname = \"who\"\nlisten = [\"tcp://{ip}:{wp}\"]\n\
             workers = 1\nthreads = 4\ngraceful_timeout = \"10s\"\n{proxy}\n\
             [service.handler]\nplugin = \"exec\"\n\n\
             [service.handler.options]\ncommand = [\"/bin/sh\", \"-c\", '{WHO}']\n",
            level = std::env::var("PREFORKD_FLEET_LOG").unwrap_or_else(|_| "info".into()),
            ip = self.ip,
            mp = self.metrics_port,
            ep = self.echo_port,
            wp = self.who_port,
        )
    }

    /// Starts a new run and waits until it is ready.
    fn start(&mut self, net: &Net, i: usize) {
        assert!(self.daemon.is_none(), "{} is running", self.name);
        let mut cmd = net.host_command(i, &bin());
        cmd.arg("-c").arg(self.config_path());
        let d = Daemon::spawn(cmd, tempdir(), &[]);
        d.wait_ready();
        self.runs += 1;
        self.daemon = Some(d);
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("a running host")
    }

    /// The current master (after an upgrade, not our child).
    fn master(&self) -> i32 {
        wait_for(DEADLINE, || pid_file_pid(&self.pid_file()))
            .unwrap_or_else(|| panic!("{}: no pid file; log:\n{}", self.name, self.log()))
    }

    fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        run_cli(&self.config_path(), args)
    }
}

// ---------------------------------------------------------------------------
// HAProxy.

struct Haproxy {
    /// HAProxy in its own process group (killed on drop), run by the
    /// Daemon harness; its stderr is the "log".
    proc: Daemon,
    stats: PathBuf,
    /// The echo frontend, a Unix socket (no TIME_WAIT on the client side).
    echo: PathBuf,
    /// The who frontend, TCP: the hosts must see the client's address.
    who: SocketAddrV4,
}

impl Haproxy {
    fn start(net: &Net, hosts: &[Host]) -> Haproxy {
        let dir = tempdir();
        let stats = dir.path().join("stats.sock");
        let echo = dir.path().join("echo.sock");
        let who_port = match net.mode {
            Mode::Namespaces => WHO_PORT,
            Mode::Loopback => free_port(net.lb),
        };
        let who = SocketAddrV4::new(net.lb, who_port);
        let send_proxy = if proxy_v2() { " send-proxy-v2" } else { "" };
        let mut echo_servers = String::new();
        let mut who_servers = String::new();
        for h in hosts {
            echo_servers += &format!(
                "    server {n} {ip}:{p} check port {mp} inter {INTER_MS}ms fall {FALL} rise 2{send_proxy}\n",
                n = h.name,
                ip = h.ip,
                p = h.echo_port,
                mp = h.metrics_port
            );
            who_servers += &format!(
                "    server {n} {ip}:{p} track echo/{n}{send_proxy}\n",
                n = h.name,
                ip = h.ip,
                p = h.who_port
            );
        }
        let config = format!(
            "global\n\
             \x20   stats socket {stats} level admin\n\
             \x20   log stderr format raw local0 info\n\
             \x20   maxconn 4096\n\n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   log global\n\
             \x20   option tcplog\n\
             \x20   option dontlog-normal\n\
             \x20   timeout connect 1s\n\
             \x20   timeout client 30s\n\
             \x20   timeout server 30s\n\
             \x20   timeout check 1s\n\
             \x20   retries 3\n\
             \x20   option redispatch 1\n\n\
             frontend echo\n\
             \x20   bind unix@{echo}\n\
             \x20   default_backend echo\n\n\
             frontend who\n\
             \x20   bind {who}\n\
             \x20   default_backend who\n\n\
             backend echo\n\
             \x20   balance roundrobin\n\
             \x20   option httpchk GET /ready\n\
             \x20   http-check expect status 200\n\
             {echo_servers}\n\
             backend who\n\
             \x20   balance roundrobin\n\
             {who_servers}",
            stats = stats.display(),
            echo = echo.display(),
        );
        let cfg = dir.path().join("haproxy.cfg");
        fs::write(&cfg, &config).unwrap();
        let mut cmd = net.lb_command("haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg);
        let proc = Daemon::spawn(cmd, dir, &[]);
        let h = Haproxy {
            proc,
            stats,
            echo,
            who,
        };
        wait_for(DEADLINE, || h.try_show_stat().ok()).unwrap_or_else(|| {
            panic!(
                "HAProxy's stats socket never answered; its output:\n{}\nconfig:\n{config}",
                h.proc.log_text()
            )
        });
        h
    }

    fn try_show_stat(&self) -> std::io::Result<Vec<HashMap<String, String>>> {
        let mut s = UnixStream::connect(&self.stats)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"show stat\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let mut lines = text.lines();
        let head: Vec<String> = lines
            .next()
            .and_then(|l| l.strip_prefix("# "))
            .ok_or_else(|| std::io::Error::other(format!("no header in {text:?}")))?
            .split(',')
            .map(str::to_string)
            .collect();
        Ok(lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                head.iter()
                    .cloned()
                    .zip(l.split(',').map(str::to_string))
                    .collect()
            })
            .collect())
    }

    /// `show stat`'s row of `backend`/`server`.
    fn server(&self, backend: &str, server: &str) -> HashMap<String, String> {
        let rows = self
            .try_show_stat()
            .unwrap_or_else(|e| panic!("show stat: {e}; HAProxy:\n{}", self.proc.log_text()));
        rows.into_iter()
            .find(|r| r["pxname"] == backend && r["svname"] == server)
            .unwrap_or_else(|| panic!("no {backend}/{server} in show stat"))
    }

    fn status(&self, server: &str) -> String {
        self.server("echo", server)["status"].clone()
    }

    /// Waits until `server`'s status is `want` ("UP", "DOWN"); returns how
    /// long that took.
    fn wait_status(&self, server: &str, want: &str, within: Duration) -> Duration {
        let t = Instant::now();
        let mut last = String::new();
        wait_for(within, || {
            last = self.status(server);
            (last == want).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "HAProxy never saw {server} {want} within {within:?} (last {last:?}); HAProxy:\n{}",
                self.proc.log_text()
            )
        });
        t.elapsed()
    }
}

// ---------------------------------------------------------------------------
// Clients.

/// The phases, in order; each request counts in the phase it started in.
const PHASES: [&str; 5] = [
    "steady",
    "rolling restart",
    "rolling upgrade",
    "reload everywhere",
    "SIGKILL of one host",
];

#[derive(Default, Debug, Clone)]
struct Tally {
    ok: u64,
    /// Persistent connections found closed (EOF waiting) before the next
    /// request was sent on them: a new one was opened. Not a failure.
    stale: u64,
    /// Persistent connections closed after a request was sent and before
    /// any byte of its answer (the keep-alive race: the worker closed at
    /// the boundary and drained the request unread). Sent again on a new
    /// connection, as HTTP keep-alive clients do; counted apart.
    resent: u64,
    failures: BTreeMap<&'static str, u64>,
    examples: Vec<String>,
}

impl Tally {
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
    fn fail(&mut self, kind: &'static str, what: String) {
        *self.failures.entry(kind).or_default() += 1;
        if self.examples.len() < 10 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            self.examples.push(format!(
                "at {}.{:03}: {what}",
                now.as_secs() % 86400,
                now.subsec_millis()
            ));
        }
    }
}

fn kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::NotFound => "refused",
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            "reset"
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout",
        ErrorKind::UnexpectedEof => "early EOF",
        _ => "other",
    }
}

struct Shared {
    stop: AtomicBool,
    phase: AtomicUsize,
    ok: AtomicU64,
    tallies: Vec<Mutex<Tally>>,
    /// Per client: the phase its current request started in.
    current: Vec<AtomicUsize>,
}

impl Shared {
    /// The phase a new request of client `c` counts in.
    fn begin(&self, c: usize) -> usize {
        let p = self.phase.load(Ordering::SeqCst);
        self.current[c].store(p, Ordering::SeqCst);
        p
    }
    fn record(&self, phase: usize, f: impl FnOnce(&mut Tally)) {
        f(&mut self.tallies[phase].lock().unwrap());
    }
    fn ok(&self, phase: usize) {
        self.ok.fetch_add(1, Ordering::SeqCst);
        self.record(phase, |t| t.ok += 1);
    }
}

struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Connect-loop clients, persistent clients (both echo, over HAProxy's
/// Unix frontend) and one `who` client (exec, over TCP, checking the
/// address the host saw).
const CONNECTORS: usize = 3;
const PERSISTENT: usize = 3;
const WHO_CLIENTS: usize = 1;
/// Requests on one persistent connection before it is closed and a new one
/// opened (spreads the persistent clients over the hosts); the last
/// persistent client keeps its connection until the host closes it, so
/// that the stops, upgrades and reloads meet a connection in use.
const PER_CONNECTION: u64 = 40;

impl Load {
    fn start(
        echo: &Path,
        who: SocketAddrV4,
        who_from: Option<Ipv4Addr>,
        expect_ip: Expect,
    ) -> Load {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            phase: AtomicUsize::new(0),
            ok: AtomicU64::new(0),
            tallies: PHASES.iter().map(|_| Mutex::default()).collect(),
            current: (0..CONNECTORS + PERSISTENT + WHO_CLIENTS)
                .map(|_| AtomicUsize::new(0))
                .collect(),
        });
        let mut threads = Vec::new();
        for c in 0..CONNECTORS + PERSISTENT {
            let (shared, echo) = (shared.clone(), echo.to_owned());
            let keep = c >= CONNECTORS;
            threads.push(std::thread::spawn(move || {
                echo_client(c, keep, &echo, &shared)
            }));
        }
        for c in 0..WHO_CLIENTS {
            let (shared, expect) = (shared.clone(), expect_ip.clone());
            threads.push(std::thread::spawn(move || {
                who_client(CONNECTORS + PERSISTENT + c, who, who_from, &expect, &shared)
            }));
        }
        Load { shared, threads }
    }

    /// Starts phase `p` once every request of the previous one has ended
    /// (each client has begun one in `p`), so that each phase counts only
    /// what it caused.
    fn set_phase(&self, p: usize) {
        self.shared.phase.store(p, Ordering::SeqCst);
        wait_for(DEADLINE, || {
            self.shared
                .current
                .iter()
                .all(|c| c.load(Ordering::SeqCst) == p)
                .then_some(())
        })
        .unwrap_or_else(|| panic!("a client is stuck in a request of phase {}", p - 1));
    }

    /// Waits until `n` more requests have been answered.
    fn progress(&self, n: u64, what: &str) {
        let from = self.shared.ok.load(Ordering::SeqCst);
        wait_for(DEADLINE, || {
            (self.shared.ok.load(Ordering::SeqCst) >= from + n).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "the clients got {} answers {what} (wanted {n}): {:?}",
                self.shared.ok.load(Ordering::SeqCst) - from,
                self.tallies()
            )
        });
    }

    fn tallies(&self) -> Vec<Tally> {
        self.shared
            .tallies
            .iter()
            .map(|t| t.lock().unwrap().clone())
            .collect()
    }

    fn finish(mut self) -> Vec<Tally> {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            t.join().expect("a client thread panicked");
        }
        self.tallies()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn unix_connect(path: &Path) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Whether the peer has closed (EOF waiting), without blocking.
fn peer_closed(fd: i32) -> Result<bool, std::io::Error> {
    let mut b = [0u8; 1];
    // SAFETY: recv(2) writes at most 1 byte into `b`, which is valid.
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Ok(true),
        n if n > 0 => Err(std::io::Error::other("data before the request")),
        _ => {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            }
        }
    }
}

/// How one exchange ended.
enum Answer {
    Exact,
    /// EOF before any byte of the answer.
    Closed,
    Failed(&'static str, String),
}

fn ask(s: &mut (impl Read + Write), msg: &[u8]) -> Answer {
    if let Err(e) = s.write_all(msg) {
        return Answer::Failed(kind(&e), format!("write: {e}"));
    }
    let mut got = vec![0u8; msg.len()];
    let mut n = 0;
    while n < got.len() {
        match s.read(&mut got[n..]) {
            Ok(0) if n == 0 => return Answer::Closed,
            Ok(0) => {
                return Answer::Failed(
                    "early EOF",
                    format!("EOF after {n} of {} bytes", msg.len()),
                );
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Answer::Failed(kind(&e), format!("read after {n} bytes: {e}")),
        }
    }
    if got == msg {
        Answer::Exact
    } else {
        Answer::Failed(
            "mismatch",
            format!(
                "sent {:?}, got {:?}",
                String::from_utf8_lossy(msg),
                String::from_utf8_lossy(&got)
            ),
        )
    }
}

/// An echo client through HAProxy. `keep`: several requests per
/// connection (looking for a waiting EOF before each); otherwise a new
/// connection per request, where an EOF before the answer is a failure
/// (no server, or a host that dropped it).
fn echo_client(c: usize, keep: bool, path: &Path, sh: &Shared) {
    let mut conn: Option<UnixStream> = None;
    let mut on_conn = 0u64;
    let mut i = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        let phase = sh.begin(c);
        let msg = format!(
            "client {c} request {i} {}\n",
            "x".repeat((i % 200) as usize)
        );
        let n = i;
        let what = |w: &str| format!("echo client {c} request {n} ({}): {w}", PHASES[phase]);
        i += 1;
        let mut resends = 0;
        let failed = loop {
            if let Some(s) = &conn {
                match peer_closed(s.as_raw_fd()) {
                    Ok(false) => {}
                    Ok(true) => {
                        sh.record(phase, |t| t.stale += 1);
                        conn = None;
                    }
                    Err(e) => {
                        sh.record(phase, |t| t.fail(kind(&e), what(&format!("peek: {e}"))));
                        conn = None;
                        break true;
                    }
                }
            }
            let s = match &mut conn {
                Some(s) => s,
                None => match unix_connect(path) {
                    Ok(s) => {
                        on_conn = 0;
                        conn.insert(s)
                    }
                    Err(e) => {
                        sh.record(phase, |t| t.fail(kind(&e), what(&format!("connect: {e}"))));
                        break true;
                    }
                },
            };
            on_conn += 1;
            match ask(s, msg.as_bytes()) {
                Answer::Exact => {
                    sh.ok(phase);
                    break false;
                }
                Answer::Closed if keep && on_conn > 1 && resends < 5 => {
                    sh.record(phase, |t| t.resent += 1);
                    conn = None;
                    resends += 1;
                }
                Answer::Closed => {
                    sh.record(phase, |t| {
                        t.fail("early EOF", what("EOF before any byte of the answer"))
                    });
                    conn = None;
                    break true;
                }
                Answer::Failed(k, w) => {
                    sh.record(phase, |t| t.fail(k, what(&w)));
                    conn = None;
                    break true;
                }
            }
        };
        let sticky = c == CONNECTORS + PERSISTENT - 1;
        if !keep || (on_conn >= PER_CONNECTION && !sticky) {
            conn = None;
        }
        if failed {
            // Not a hot loop against a broken fleet.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What the `who` program must say the client's address is.
#[derive(Clone)]
enum Expect {
    Exactly(Ipv4Addr),
    /// Without the PROXY header the host sees HAProxy, whatever address it
    /// used: anything but the client's.
    Not(Ipv4Addr),
}

/// A TCP connection from `from` (None: the kernel's choice) to `to`.
fn tcp_from(from: Option<Ipv4Addr>, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let Some(from) = from else {
        let s = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        return Ok(s);
    };
    fn sin(a: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    }
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor we own; the addresses
    // point to valid sockaddr_in of the length given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let local = sin(SocketAddrV4::new(from, 0));
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let remote = sin(to);
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// One exchange with the `who` service: the program's line, or what failed.
fn who_once(
    to: SocketAddrV4,
    from: Option<Ipv4Addr>,
    line: &str,
) -> Result<String, (&'static str, String)> {
    let mut s = tcp_from(from, to).map_err(|e| (kind(&e), format!("connect: {e}")))?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| (kind(&e), format!("write: {e}")))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .map_err(|e| (kind(&e), format!("read after {} bytes: {e}", got.len())))?;
    Ok(String::from_utf8_lossy(&got).into_owned())
}

fn who_client(c: usize, to: SocketAddrV4, from: Option<Ipv4Addr>, expect: &Expect, sh: &Shared) {
    let mut i = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        let phase = sh.begin(c);
        let line = format!("who {c} {i}");
        i += 1;
        let what = |w: &str| format!("who client {c} {line:?} ({}): {w}", PHASES[phase]);
        match who_once(to, from, &line) {
            Ok(got) => {
                let ip = got.strip_suffix(&format!(" {line}\n"));
                let good = match (ip, expect) {
                    (Some(ip), Expect::Exactly(want)) => ip == want.to_string(),
                    (Some(ip), Expect::Not(client)) => !ip.is_empty() && ip != client.to_string(),
                    (None, _) => false,
                };
                if good {
                    sh.ok(phase);
                } else if got.is_empty() {
                    sh.record(phase, |t| t.fail("early EOF", what("no answer")));
                } else {
                    sh.record(phase, |t| {
                        t.fail("mismatch", what(&format!("answer {got:?}")))
                    });
                }
            }
            Err((k, w)) => {
                sh.record(phase, |t| t.fail(k, what(&w)));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------------------

/// Kills every process of a host's runs (its Daemon's group) with SIGKILL.
fn kill_group(h: &Host) {
    let pgid = h.daemon().pid();
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

#[test]
fn a_fleet_behind_haproxy_loses_nothing() {
    if !have("haproxy") {
        eprintln!("skipped: haproxy not installed (apt-get install haproxy)");
        return;
    }
    let started = Instant::now();
    // Dropped last: the processes in the namespaces go first.
    let net = if std::env::var("PREFORKD_FLEET_LOOPBACK").as_deref() == Ok("1") {
        eprintln!("PREFORKD_FLEET_LOOPBACK=1: hosts on 127.0.0.2..127.0.0.4");
        Net::loopback(HOSTS)
    } else {
        Net::new(HOSTS)
    };
    let proxy = proxy_v2();
    eprintln!(
        "fleet: {:?}, hosts {:?}, balancer {}, client {}, PROXY v2 {}",
        net.mode,
        net.hosts,
        net.lb,
        net.client,
        if proxy { "on" } else { "off" }
    );
    let mut hosts: Vec<Host> = (0..HOSTS).map(|i| Host::new(&net, i)).collect();
    for (i, h) in hosts.iter_mut().enumerate() {
        h.start(&net, i);
    }
    let lb = Haproxy::start(&net, &hosts);
    for h in &hosts {
        lb.wait_status(&h.name, "UP", DEADLINE);
    }

    // The client's address as the hosts must see it: over the bridge from
    // the test's namespace; on loopback, from 127.0.0.9 (HAProxy uses
    // 127.0.0.1).
    let who_from = match net.mode {
        Mode::Namespaces => None,
        Mode::Loopback => Some(net.client),
    };
    let expect = if proxy {
        Expect::Exactly(net.client)
    } else {
        Expect::Not(net.client)
    };
    // One by hand first, for a readable failure.
    let first = who_once(lb.who, who_from, "hello")
        .unwrap_or_else(|e| panic!("who through HAProxy: {e:?}; h0 log:\n{}", hosts[0].log()));
    eprintln!(
        "who through HAProxy: {first:?} (client {}, balancer {})",
        net.client, net.lb
    );
    if proxy {
        assert_eq!(
            first,
            format!("{} hello\n", net.client),
            "the host saw HAProxy, not the client"
        );
    } else {
        assert_ne!(first, format!("{} hello\n", net.client));
    }

    let load = Load::start(&lb.echo, lb.who, who_from, expect);
    load.progress(300, "before the first phase");

    // 1. Rolling restart: SIGTERM, exit 0, start again, UP again.
    load.set_phase(1);
    let mut restart_report = Vec::new();
    let t_restart = Instant::now();
    for (i, h) in hosts.iter_mut().enumerate() {
        let t = Instant::now();
        h.daemon().signal(libc::SIGTERM);
        let down = lb.wait_status(&h.name, "DOWN", DEADLINE);
        let status = h
            .daemon
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(30));
        let exited = t.elapsed();
        let log = h.log();
        assert_eq!(status.code(), Some(0), "{} exit; log:\n{log}", h.name);
        assert!(!log.contains("SIGKILL"), "{}: {log}", h.name);
        h.daemon = None;
        h.start(&net, i);
        let up = lb.wait_status(&h.name, "UP", DEADLINE);
        let total = t.elapsed();
        eprintln!(
            "restart {}: HAProxy saw it DOWN {down:?} after SIGTERM, exited 0 at {exited:?}, UP again at {total:?} ({up:?} after its start)",
            h.name
        );
        restart_report.push((down, exited, total));
        load.progress(100, &format!("after restarting {}", h.name));
    }
    let restart_took = t_restart.elapsed();
    // The point of shutdown_delay: out of the pool before the stop.
    for (h, (down, exited, _)) in hosts.iter().zip(&restart_report) {
        assert!(
            down < exited,
            "{}: HAProxy marked it DOWN {down:?} after SIGTERM, after it exited ({exited:?})",
            h.name
        );
    }

    // 2. Rolling binary upgrade.
    load.set_phase(2);
    for h in &hosts {
        let old = h.master();
        let t = Instant::now();
        let out = h.cli(&["upgrade"]);
        assert!(
            out.status.success(),
            "{} upgrade: {}\nlog:\n{}",
            h.name,
            show(&out),
            h.log()
        );
        let new = h.master();
        assert_ne!(
            new, old,
            "{}: the pid file still names the old master",
            h.name
        );
        wait_for(DEADLINE, || (!alive(old)).then_some(()))
            .unwrap_or_else(|| panic!("{}: old master {old} still running", h.name));
        lb.wait_status(&h.name, "UP", DEADLINE);
        eprintln!(
            "upgrade {}: master {old} -> {new} in {:?}",
            h.name,
            t.elapsed()
        );
        load.progress(100, &format!("after upgrading {}", h.name));
    }

    // 3. Reload every host at once.
    load.set_phase(3);
    let t = Instant::now();
    let reloads: Vec<_> = hosts
        .iter()
        .map(|h| {
            let cfg = h.config_path();
            std::thread::spawn(move || run_cli(&cfg, &["reload"]))
        })
        .collect();
    for (h, r) in hosts.iter().zip(reloads) {
        let out = r.join().unwrap();
        assert!(
            out.status.success() && stdout(&out).starts_with("reloaded: generation "),
            "{} reload: {}\nlog:\n{}",
            h.name,
            show(&out),
            h.log()
        );
    }
    eprintln!("reload of {HOSTS} hosts at once: {:?}", t.elapsed());
    for h in &hosts {
        lb.wait_status(&h.name, "UP", DEADLINE);
    }
    load.progress(300, "after the reloads");

    // 4. SIGKILL one host (master and workers): only what it had in flight
    // may fail, and HAProxy must take it out within its checks' time.
    load.set_phase(4);
    let victim = &hosts[1];
    kill_group(victim);
    let down = lb.wait_status(&victim.name, "DOWN", Duration::from_secs(20));
    load.progress(300, "after the SIGKILL");
    let tallies = load.finish();

    let stats: Vec<_> = hosts
        .iter()
        .map(|h| {
            let r = lb.server("echo", &h.name);
            format!(
                "{}: {} sessions, {} connect errors, {} retries, {} redispatches",
                h.name, r["stot"], r["econ"], r["wretr"], r["wredis"]
            )
        })
        .collect();
    eprintln!("HAProxy echo backend: {}", stats.join("; "));
    for (i, h) in hosts.iter().enumerate() {
        let c = net.host_tcp_counters(i);
        if !c.is_empty() {
            eprintln!("{} TCP counters: {c}", h.name);
        }
    }
    for (p, t) in PHASES.iter().zip(&tallies) {
        eprintln!(
            "phase {p}: {} ok, {} failed {:?}, {} stale keep-alive connections replaced, {} resent after a clean close",
            t.ok,
            t.failed(),
            t.failures,
            t.stale,
            t.resent
        );
    }
    eprintln!(
        "rolling restart of {HOSTS} hosts: {restart_took:?}; SIGKILL: HAProxy marked {} DOWN after {down:?}, {} requests failed; whole test {:?}",
        victim.name,
        tallies[4].failed(),
        started.elapsed()
    );

    let logs = || {
        hosts
            .iter()
            .map(|h| format!("--- {}:\n{}", h.name, h.log()))
            .collect::<String>()
            + &format!("--- HAProxy:\n{}", lb.proc.log_text())
    };
    for (p, t) in PHASES.iter().zip(&tallies).take(4) {
        assert_eq!(t.failed(), 0, "phase {p}: {t:?}\n{}", logs());
        assert!(t.ok > 0, "phase {p}: nothing answered");
    }
    // In flight on the killed host: at most one request per client.
    let bound = (CONNECTORS + PERSISTENT + WHO_CLIENTS) as u64;
    assert!(
        tallies[4].failed() <= bound,
        "SIGKILL: {} failed, more than the {bound} clients could have had in flight: {:?}",
        tallies[4].failed(),
        tallies[4]
    );
    let limit = Duration::from_millis(INTER_MS * FALL) + Duration::from_secs(3);
    assert!(
        down <= limit,
        "HAProxy took {down:?} to mark the killed host DOWN (limit {limit:?})"
    );
}
